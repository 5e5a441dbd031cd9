//! Fuzzes upload forms: `multipart/form-data` read as the upload route reads it (`multer`,
//! the workspace-then-file order, the size limit as bytes arrive, the type check), split
//! into chunks of every size. Nothing may panic, and an accepted file is whole.
//!
//! The checks live in `chorus_gateway::fuzzing::multipart`, so the stable-toolchain test
//! `gateway/tests/fuzz_corpus.rs` replays this target's corpus through the same code.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    chorus_gateway::fuzzing::multipart(data);
});
