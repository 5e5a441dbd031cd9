//! Fuzzes REST request bodies: parsed as every request type of the API, nothing may panic,
//! however deep or long the JSON.
//!
//! The checks live in `chorus_gateway::fuzzing::rest_body`, so the stable-toolchain test
//! `gateway/tests/fuzz_corpus.rs` replays this target's corpus through the same code.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    chorus_gateway::fuzzing::rest_body(data);
});
