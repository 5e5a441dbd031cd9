//! Fuzzes the node-to-node frame decoder: bytes as a node reads them from a peer's TCP
//! connection, in pieces. Nothing may panic, and every frame accepted re-encodes to one
//! that decodes equal.
//!
//! The checks live in `chorus_replication::wire::fuzz_decode`, so the stable-toolchain
//! test `replication/tests/fuzz_corpus.rs` replays this target's corpus through the same
//! code.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    chorus_replication::wire::fuzz_decode(data);
});
