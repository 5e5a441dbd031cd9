//! Replays the committed corpus of the `search_query` fuzz target
//! (`fuzz/corpus/search_query/`) through its checks on the stable toolchain, so every input
//! the fuzzer kept stays a regression test without nightly or libFuzzer.

use std::path::Path;

// Queries, valid and not, through the parser and the highlighter: nothing panics, and the
// corpus holds both accepted and refused queries.
#[test]
fn search_query_corpus_replays_cleanly() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/search_query");
    let (mut inputs, mut accepted) = (0, 0);
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("list the corpus").path();
        let data = std::fs::read(&path).expect("read a corpus file");
        inputs += 1;
        accepted += usize::from(chorus_search::fuzzing::query(&data));
    }
    assert!(accepted > 0, "no input in {} is accepted", dir.display());
    assert!(
        accepted < inputs,
        "every input in {} is accepted",
        dir.display()
    );
}
