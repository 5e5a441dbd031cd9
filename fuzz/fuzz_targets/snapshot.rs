//! Fuzzes the parsing of partition snapshots: whatever bytes a snapshot file holds, parsing
//! and restoring its channels must not panic nor allocate for a count the bytes cannot
//! back, and channels it accepts must write out to a snapshot that restores them equal.
//!
//! The checks live in `chorus_engine::fuzzing::snapshot`, so the stable-toolchain test
//! `engine/tests/fuzz_corpus.rs` replays this target's corpus through the same code.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    chorus_engine::fuzzing::snapshot(data);
});
