//! Replays the committed fuzz corpus (`fuzz/corpus/decode/`) through the decode fuzz
//! target's checks on the stable toolchain, so every input the fuzzer ever kept, crashers
//! fixed since included, stays a regression test without nightly or libFuzzer.

use std::path::Path;

// Decoding never panics on any corpus input, and each decoded record re-encodes exactly.
#[test]
fn decode_corpus_replays_cleanly() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/decode");
    let mut inputs = 0;
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read the corpus at {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("list the corpus").path();
        if !path.is_file() {
            continue;
        }
        let data = std::fs::read(&path).expect("read a corpus file");
        // A panic inside names no input; this line names the one that caused it.
        eprintln!("decoding {} ({} bytes)", path.display(), data.len());
        chorus_log::format::fuzz_decode(&data);
        inputs += 1;
    }
    assert!(inputs > 0, "the corpus at {} is empty", dir.display());
}
