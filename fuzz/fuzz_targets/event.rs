//! Fuzzes the decoding of event log payloads: whatever bytes a log hands back, decoding must
//! not panic, and an event it accepts must re-encode to a payload that decodes to the same
//! event and frame.
//!
//! The checks live in `chorus_engine::fuzzing::event`, so the stable-toolchain test
//! `engine/tests/fuzz_corpus.rs` replays this target's corpus through the same code.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    chorus_engine::fuzzing::event(data);
});
