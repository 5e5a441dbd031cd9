//! Fuzzes client frames: as a WebSocket text message and as a run of length-prefixed QUIC
//! frames, through the frame parser and a session core that answers every call. Nothing
//! may panic, and the core stays within its bounds.
//!
//! The checks live in `chorus_gateway::fuzzing::client_frame`, so the stable-toolchain test
//! `gateway/tests/fuzz_corpus.rs` replays this target's corpus through the same code.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    chorus_gateway::fuzzing::client_frame(data);
});
