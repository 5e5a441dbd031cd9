//! Fuzzes the decoding of segment index files: whatever bytes an index file holds, decoding
//! must not panic, and an index it accepts must re-encode to exactly the same bytes.
//!
//! The checks live in `chorus_log::index::fuzz_decode`, so the stable-toolchain test
//! `log/tests/fuzz_corpus.rs` replays this target's corpus through the same code.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    chorus_log::index::fuzz_decode(data);
});
