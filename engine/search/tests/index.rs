//! The index and the query builder without a server: the isolation filter (of messages
//! and of files), ranking, ordering and paging, the commit payload that carries the
//! cursors across a reopen, and an older format rebuilt, on an index in a temporary
//! directory written through the same documents the indexer writes.

use chorus_engine::ids::{ChannelId, FileId, MessageId, UserId, WorkspaceId};
use chorus_search::index::{self, FileDoc, FileMeta, MessageDoc, Payload, INDEX_FORMAT_VERSION};
use chorus_search::query::parse;
use chorus_search::search::{run, run_files, Scope, Sort};
use chorus_search::Search;

const W1: WorkspaceId = WorkspaceId(1);
const W2: WorkspaceId = WorkspaceId(2);
const ALICE: UserId = UserId(10);

fn doc(workspace: WorkspaceId, channel: u64, seq: u64, at_us: i64, text: &str) -> MessageDoc {
    MessageDoc {
        workspace,
        id: MessageId {
            channel: ChannelId(channel),
            seq,
        },
        user: ALICE,
        at_us,
        thread: None,
        reactions: 0,
        text: text.to_owned(),
        files: Vec::new(),
    }
}

/// An index holding `docs`, committed with `cursors`.
fn index_with(
    dir: &std::path::Path,
    docs: &[MessageDoc],
    cursors: &[(u32, u64)],
) -> std::sync::Arc<Search> {
    let search = Search::open(dir).unwrap();
    let live = search.live();
    let mut writer: tantivy::IndexWriter =
        live.index.writer_with_num_threads(1, 15_000_000).unwrap();
    for d in docs {
        writer.add_document(d.to_document(&live.fields)).unwrap();
    }
    let payload = Payload {
        version: INDEX_FORMAT_VERSION,
        cursors: cursors.iter().copied().collect(),
        meta: 0,
    };
    let mut prepared = writer.prepare_commit().unwrap();
    prepared.set_payload(&serde_json::to_string(&payload).unwrap());
    prepared.commit().unwrap();
    live.reader.reload().unwrap();
    search
}

fn scope(workspace: WorkspaceId, channels: &[(u64, &str)]) -> Scope {
    Scope {
        user: ALICE,
        workspace,
        channels: channels
            .iter()
            .map(|(c, n)| (ChannelId(*c), (*n).to_owned()))
            .collect(),
    }
}

fn seqs(search: &Search, q: &str, scope: &Scope, sort: Sort) -> (Vec<u64>, usize) {
    let hits = run(&search.live(), &parse(q).unwrap(), scope, sort, 0, 100).unwrap();
    (hits.ids.iter().map(|m| m.seq).collect(), hits.total)
}

// Only the scope's workspace and readable channels match, whatever the query says, and an
// in: outside the readable set, or an empty set, matches nothing.
#[test]
fn isolation_is_part_of_the_query() {
    let dir = tempfile::tempdir().unwrap();
    let search = index_with(
        dir.path(),
        &[
            doc(W1, 1, 1, 10, "shared secret"),
            doc(W1, 2, 2, 20, "shared secret"),
            doc(W2, 1, 3, 30, "shared secret"),
            doc(W2, 3, 4, 40, "shared secret"),
        ],
        &[],
    );
    let s = scope(W1, &[(1, "general")]);
    assert_eq!(seqs(&search, "secret", &s, Sort::Relevance), (vec![1], 1));
    assert_eq!(
        seqs(&search, "in:C2 secret", &s, Sort::Relevance),
        (vec![], 0)
    );
    assert_eq!(seqs(&search, "in:#general", &s, Sort::Newest), (vec![1], 1));
    assert_eq!(seqs(&search, "-nothing", &s, Sort::Newest), (vec![1], 1));
    assert_eq!(
        seqs(&search, "secret", &scope(W1, &[]), Sort::Relevance),
        (vec![], 0)
    );
    let both = scope(W2, &[(1, "a"), (3, "b")]);
    assert_eq!(
        seqs(&search, "secret", &both, Sort::Newest),
        (vec![4, 3], 2)
    );
}

// An exact match ranks above a match one edit away, even when the exact one is in a much
// longer text (a lower BM25); a word-less query lists the newest first.
#[test]
fn exact_above_one_edit_and_newest_order() {
    let dir = tempfile::tempdir().unwrap();
    let long = format!("deployment {}", "words ".repeat(200));
    let search = index_with(
        dir.path(),
        &[
            doc(W1, 1, 1, 10, "deploymant"),
            doc(W1, 1, 2, 20, &long),
            doc(W1, 1, 3, 30, "deploy"),
        ],
        &[],
    );
    let s = scope(W1, &[(1, "general")]);
    assert_eq!(
        seqs(&search, "deployment", &s, Sort::Relevance),
        (vec![2, 1], 2)
    );
    assert_eq!(
        seqs(&search, "deployment", &s, Sort::Newest),
        (vec![2, 1], 2)
    );
    assert_eq!(
        seqs(&search, "in:#general", &s, Sort::Relevance),
        (vec![3, 2, 1], 3)
    );
    let page = run(
        &search.live(),
        &parse("in:#general").unwrap(),
        &s,
        Sort::Newest,
        1,
        1,
    )
    .unwrap();
    assert_eq!((page.ids[0].seq, page.total), (2, 3));
}

// The cursors committed with the documents come back when the index is opened again, and
// an index whose metadata is damaged is started over, empty, with no cursors.
#[test]
fn cursors_live_in_the_commit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("search");
    let search = index_with(&path, &[doc(W1, 1, 1, 10, "kept")], &[(0, 7), (3, 42)]);
    drop(search);
    let opened = index::open(&path).unwrap();
    assert!(!opened.rebuilt);
    assert_eq!(
        opened
            .payload
            .cursors
            .clone()
            .into_iter()
            .collect::<Vec<_>>(),
        [(0, 7), (3, 42)]
    );
    assert_eq!(opened.reader.searcher().num_docs(), 1);
    drop(opened);
    for file in chorus_search::directory::IndexDirectory::commit_point_files(&path) {
        std::fs::write(file, b"{").unwrap();
    }
    let opened = index::open(&path).unwrap();
    assert!(opened.rebuilt);
    assert!(opened.payload.cursors.is_empty());
    assert_eq!(opened.reader.searcher().num_docs(), 0);
    assert!(dir.path().join("search.corrupt").exists());
}

// Excluded phrases and phrase prefixes work however the documents are split into
// segments, including when the phrase's first match comes after the first candidate
// (tantivy's phrase scorers assert on that backward seek; see `forward.rs`).
#[test]
fn excluded_phrases_over_any_segmentation() {
    let texts = [
        "Café CRÈME at noon",
        "the build failed again",
        "failed to build the docs",
        "deployment finished",
        "a cat sat failed",
    ];
    for split in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let search = Search::open(dir.path()).unwrap();
        let live = search.live();
        let mut writer: tantivy::IndexWriter =
            live.index.writer_with_num_threads(1, 15_000_000).unwrap();
        for (i, t) in texts.iter().enumerate() {
            let d = doc(W1, 1, i as u64 + 1, i as i64, t);
            writer.add_document(d.to_document(&live.fields)).unwrap();
            if split == 0 || (split == 1 && i % 2 == 0) {
                writer.commit().unwrap();
            }
        }
        writer.commit().unwrap();
        live.reader.reload().unwrap();
        let s = scope(W1, &[(1, "general")]);
        for q in [
            "failed -\"the docs\"",
            "failed -the-do*",
            "failed -\"to build\" -cat",
        ] {
            let (mut got, total) = seqs(&search, q, &s, Sort::Relevance);
            got.sort();
            let want: &[u64] = if q.ends_with("cat") { &[2] } else { &[2, 5] };
            assert_eq!(
                (got.as_slice(), total),
                (want, want.len()),
                "split {split}, q={q}"
            );
        }
    }
}

const BOB: UserId = UserId(11);

fn file(id: u64, workspace: WorkspaceId, user: UserId, name: &str, text: &str) -> FileDoc {
    FileDoc {
        id: FileId(id),
        workspace,
        meta: Some(FileMeta {
            user,
            name: name.to_owned(),
            content_type: "text/plain".into(),
            size: text.len() as u64,
            sha256: [id as u8; 32],
            at_us: id as i64,
        }),
        shares: Default::default(),
        text: text.to_owned(),
        text_pending: false,
    }
}

fn files_of(search: &Search, q: &str, scope: &Scope) -> (Vec<u64>, usize) {
    let parsed = chorus_search::query::parse_files(q).unwrap();
    let hits = run_files(&search.live(), &parsed, scope, 0, 100).unwrap();
    (hits.hits.iter().map(|h| h.id.0).collect(), hits.total)
}

// A file matches only for its uploader and the members of a readable channel where a
// live message shares it, only in its workspace, never while it is known by a share
// alone; in: keeps the shared ones; a name match ranks above a text match.
#[test]
fn files_follow_the_read_rule() {
    let dir = tempfile::tempdir().unwrap();
    let search = Search::open(&dir.path().join("search")).unwrap();
    let mut shared = file(3, W1, BOB, "report three", "");
    shared.shares.insert((ChannelId(1), 5));
    let mut hidden = file(4, W1, BOB, "report four", "");
    hidden.shares.insert((ChannelId(3), 1));
    let mut partial = FileDoc::partial(FileId(6), W1);
    partial.shares.insert((ChannelId(1), 6));
    partial.text = "report".into();
    let mut in_text = file(8, W1, ALICE, "misc", "a zebra crossing");
    in_text.meta.as_mut().unwrap().at_us = 100;
    let docs = [
        file(1, W1, ALICE, "report one", ""),
        file(2, W1, BOB, "report two", ""),
        shared,
        hidden,
        file(5, W2, ALICE, "report five", ""),
        partial,
        file(7, W1, ALICE, "zebra.txt", ""),
        in_text,
    ];
    let live = search.live();
    let mut writer: tantivy::IndexWriter =
        live.index.writer_with_num_threads(1, 15_000_000).unwrap();
    for d in &docs {
        writer.add_document(d.to_document(&live.fields)).unwrap();
    }
    // Messages never answer a file search, nor files a message search.
    writer
        .add_document(doc(W1, 1, 1, 10, "report zebra").to_document(&live.fields))
        .unwrap();
    writer.commit().unwrap();
    live.reader.reload().unwrap();
    let alice = scope(W1, &[(1, "general"), (2, "random")]);
    // Equal scores (the same name words): the newest first.
    assert_eq!(files_of(&search, "report", &alice), (vec![3, 1], 2));
    assert_eq!(
        files_of(&search, "report in:#general", &alice),
        (vec![3], 1)
    );
    assert_eq!(files_of(&search, "report in:C3", &alice), (vec![], 0));
    assert_eq!(files_of(&search, "report from:me", &alice), (vec![1], 1));
    assert_eq!(files_of(&search, "report -one", &alice), (vec![3], 1));
    assert_eq!(files_of(&search, "zebra", &alice), (vec![7, 8], 2));
    assert_eq!(files_of(&search, "zebras", &alice), (vec![7, 8], 2));
    assert_eq!(files_of(&search, "report", &scope(W2, &[])), (vec![5], 1));
    assert_eq!(
        seqs(&search, "report", &alice, Sort::Relevance),
        (vec![1], 1)
    );
}

// An index of format 2 (a fixture made by that version's code) is another schema and an
// older payload: it is moved aside and rebuilt from the logs, never read as version 3.
#[test]
fn format_2_is_rebuilt() {
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/index-v2");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("search");
    std::fs::create_dir(&path).unwrap();
    for entry in std::fs::read_dir(&fixture).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), path.join(entry.file_name())).unwrap();
    }
    let old = tantivy::Index::open_in_dir(&path).unwrap();
    let payload = old.load_metas().unwrap().payload.unwrap();
    assert!(payload.contains("\"version\":2"), "{payload}");
    assert_eq!(old.reader().unwrap().searcher().num_docs(), 1);
    drop(old);
    let opened = index::open(&path).unwrap();
    assert!(opened.rebuilt);
    assert!(opened.payload.cursors.is_empty());
    assert_eq!(opened.payload.version, INDEX_FORMAT_VERSION);
    assert_eq!(opened.reader.searcher().num_docs(), 0);
    assert!(dir.path().join("search.corrupt").exists());
}

/// Replaces `doc` (its ID deleted, then added again, as the indexer writes an edit) and
/// commits with the writer the indexer uses.
fn replace_and_commit(search: &Search, doc: &MessageDoc) -> tantivy::Result<()> {
    let live = search.live();
    let mut writer = chorus_search::indexer::open_writer(&live.index)?;
    writer.delete_term(live.fields.id_term(doc.id));
    writer.add_document(doc.to_document(&live.fields))?;
    writer.commit()?;
    writer.wait_merging_threads()
}

// A process killed inside a commit leaves the commit's files without its commit point. The
// next process indexes the same events again, reaches the same operation stamps, and
// its commit wants the same file names (the delete file of the first segment): it
// commits all the same, and the edited document is there once.
#[test]
fn a_killed_commits_files_are_not_in_the_next_ones_way() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("search");
    let first = doc(W1, 1, 1, 10, "kiwi");
    let other = doc(W1, 1, 2, 20, "kiwi other");
    drop(index_with(&path, &[first, other], &[]));
    let commit_point: Vec<(std::path::PathBuf, Vec<u8>)> =
        chorus_search::directory::IndexDirectory::commit_point_files(&path)
            .into_iter()
            .map(|f| (f.clone(), std::fs::read(&f).unwrap()))
            .collect();
    let edited = doc(W1, 1, 1, 10, "kiwi edited");
    let search = Search::open(&path).unwrap();
    replace_and_commit(&search, &edited).unwrap();
    drop(search);
    let files = |path: &std::path::Path| -> Vec<String> {
        std::fs::read_dir(path)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    assert!(
        files(&path).iter().any(|f| f.ends_with(".del")),
        "the edit wrote no delete file: {:?}",
        files(&path)
    );
    // The kill: the commit point as it was before the edit's commit.
    for (file, bytes) in &commit_point {
        std::fs::write(file, bytes).unwrap();
    }
    let search = Search::open(&path).unwrap();
    assert_eq!(search.live().reader.searcher().num_docs(), 2);
    replace_and_commit(&search, &edited).unwrap();
    search.live().reader.reload().unwrap();
    let w1 = scope(W1, &[(1, "general")]);
    assert_eq!(seqs(&search, "edited", &w1, Sort::Relevance), (vec![1], 1));
    assert_eq!(seqs(&search, "kiwi", &w1, Sort::Newest).1, 2);
}

// A segment with far more distinct terms than its term table and its dictionary builder's
// registry start with (the vendored tantivy-stacker and tantivy-fst start them small and
// grow them as terms come, where upstream takes their whole size at once;
// `vendor/README.md`): every term is in the segment's dictionary once, at its ordinal, and
// finds its message.
#[test]
fn a_segment_with_many_terms_keeps_every_term() {
    const LETTERS: &[u8] = b"bcfghjkmnpqrtvwxz";
    const TERMS: u64 = 20_000;
    // Four letters that differ from word to word, then four scattered ones, so that few
    // words share an ending and the dictionary has many nodes to compile.
    let word = |i: u64| {
        let base = LETTERS.len() as u64;
        let mut w = String::from("z");
        let (mut unique, mut scattered) = (i, i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 20);
        for _ in 0..4 {
            w.push(LETTERS[(unique % base) as usize] as char);
            unique /= base;
        }
        for _ in 0..4 {
            w.push(LETTERS[(scattered % base) as usize] as char);
            scattered /= base;
        }
        w
    };
    let dir = tempfile::tempdir().unwrap();
    let docs: Vec<MessageDoc> = (0..TERMS)
        .map(|i| doc(W1, 1, i + 1, i as i64, &word(i)))
        .collect();
    let search = index_with(&dir.path().join("search"), &docs, &[]);
    let live = search.live();
    let searcher = live.reader.searcher();
    assert_eq!(searcher.segment_readers().len(), 1, "one segment");
    let inverted = searcher.segment_readers()[0]
        .inverted_index(live.fields.text)
        .unwrap();
    let dictionary = inverted.terms();
    assert_eq!(dictionary.num_terms() as u64, TERMS);
    // The dictionary (an FST, built through the vendored tantivy-fst, whose registry of
    // compiled nodes grows as the tantivy-stacker table does) holds exactly these terms, in
    // order, each at its ordinal.
    let mut expected: Vec<String> = (0..TERMS).map(word).collect();
    expected.sort();
    let mut stream = dictionary.stream().unwrap();
    let mut listed = Vec::new();
    while stream.advance() {
        listed.push(String::from_utf8(stream.key().to_vec()).unwrap());
    }
    assert!(listed == expected, "the dictionary lists other terms");
    for (ord, term) in expected.iter().enumerate() {
        assert_eq!(
            dictionary.term_ord(term).unwrap(),
            Some(ord as u64),
            "{term}"
        );
    }
    let w1 = scope(W1, &[(1, "general")]);
    // Quoted: a bare word also finds the words one edit away.
    for i in (0..TERMS).step_by(97) {
        assert_eq!(
            seqs(&search, &format!("\"{}\"", word(i)), &w1, Sort::Relevance),
            (vec![i + 1], 1),
            "{}",
            word(i)
        );
    }
}
