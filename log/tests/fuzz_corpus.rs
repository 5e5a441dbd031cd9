//! Replays the committed fuzz corpora (`fuzz/corpus/decode/`, `fuzz/corpus/index/`) through
//! the fuzz targets' checks on the stable toolchain, so every input the fuzzer ever kept,
//! crashers fixed since included, stays a regression test without nightly or libFuzzer.

use std::path::{Path, PathBuf};

/// Every file in `fuzz/corpus/<target>/`, with its path; fails if there is none.
fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read the corpus at {}: {e}", dir.display()));
    let mut inputs = Vec::new();
    for entry in entries {
        let path = entry.expect("list the corpus").path();
        if path.is_file() {
            let data = std::fs::read(&path).expect("read a corpus file");
            inputs.push((path, data));
        }
    }
    assert!(
        !inputs.is_empty(),
        "the corpus at {} is empty",
        dir.display()
    );
    inputs
}

// Decoding never panics on any corpus input, and each decoded record re-encodes exactly.
#[test]
fn decode_corpus_replays_cleanly() {
    for (path, data) in corpus("decode") {
        // A panic inside names no input; this line names the one that caused it.
        eprintln!("decoding {} ({} bytes)", path.display(), data.len());
        chorus_log::format::fuzz_decode(&data);
    }
}

// Index files: decoding never panics, and an accepted file re-encodes exactly; the corpus
// holds files that are accepted as well as files that are not.
#[test]
fn index_corpus_replays_cleanly() {
    let (mut inputs, mut accepted) = (0, 0);
    for (path, data) in corpus("index") {
        eprintln!("decoding {} ({} bytes)", path.display(), data.len());
        inputs += 1;
        accepted += usize::from(chorus_log::index::fuzz_decode(&data));
    }
    assert!(accepted > 0, "no index in the corpus is accepted");
    assert!(accepted < inputs, "every index in the corpus is accepted");
}
