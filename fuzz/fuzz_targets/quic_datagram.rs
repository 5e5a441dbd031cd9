//! Fuzzes datagrams at the QUIC port: routing by connection ID, and a fresh endpoint of
//! ours handling the datagram (and any connection it opens). Nothing may panic.
//!
//! The checks live in `chorus_gateway::fuzzing::quic_datagram`, so the stable-toolchain test
//! `gateway/tests/fuzz_corpus.rs` replays this target's corpus through the same code.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    chorus_gateway::fuzzing::quic_datagram(data);
});
