//! Replays the committed fuzz corpus of the node-to-node frame decoder
//! (`fuzz/corpus/node_frame/`) through the fuzz target's checks on the stable toolchain, so
//! every input the fuzzer kept stays a regression test without nightly or libFuzzer.

use std::path::Path;

#[test]
fn node_frame_corpus_replays_cleanly() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/node_frame");
    let mut inputs = 0;
    for entry in std::fs::read_dir(&dir).expect("the node_frame corpus") {
        let path = entry.expect("list the corpus").path();
        let data = std::fs::read(&path).expect("read a corpus file");
        // A panic inside names no input; this line names the one that caused it.
        eprintln!("decoding {} ({} bytes)", path.display(), data.len());
        chorus_replication::wire::fuzz_decode(&data);
        inputs += 1;
    }
    assert!(inputs > 0, "the corpus at {} is empty", dir.display());
}
