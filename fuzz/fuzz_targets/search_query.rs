//! Fuzzes search queries (`API.md` §12): parsing, searching messages and files, and
//! highlighting never panic; an accepted query's highlights are sorted, disjoint ranges
//! within the text, and a snippet's highlights lie within the snippet.
//!
//! The checks live in `chorus_search::fuzzing::query`, so the stable-toolchain test
//! `engine/search/tests/fuzz_corpus.rs` replays this target's corpus through the same code.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    chorus_search::fuzzing::query(data);
});
