//! The checks of the `search_query` fuzz target (`fuzz/fuzz_targets/search_query.rs`),
//! here so that `engine/search/tests/fuzz_corpus.rs` replays its corpus on stable.

use crate::highlight::{highlights, snippet};
use crate::index::{FileDoc, FileMeta, MessageDoc};
use crate::query::{parse, Parsed, QUERY_CHARS_MAX};
use crate::search::{run, run_files, Scope, Sort};
use crate::Live;
use chorus_engine::ids::{ChannelId, FileId, MessageId, UserId, WorkspaceId};
use std::sync::OnceLock;

/// Texts of the small index every accepted query runs against: words, accents, phrases,
/// CJK, in three segments, in two channels of a workspace and one of another.
const TEXTS: [&str; 9] = [
    "the build failed again",
    "failed to build the docs",
    "Café CRÈME deployment",
    "東京都に行きます 한국어",
    "deploymant e-mail threads",
    "a cat sat on the mat",
    "reply about llamas",
    "東京 tower in the rain",
    "zebra crossing",
];

fn index() -> &'static Live {
    static INDEX: OnceLock<Live> = OnceLock::new();
    INDEX.get_or_init(|| {
        let live = crate::index::create_in_ram().expect("an index in memory");
        let mut writer: tantivy::IndexWriter = live
            .index
            .writer_with_num_threads(1, 15_000_000)
            .expect("a writer");
        for (i, text) in TEXTS.iter().enumerate() {
            let doc = MessageDoc {
                workspace: WorkspaceId(1 + (i % 4 == 3) as u64),
                id: MessageId {
                    channel: ChannelId(1 + (i % 3) as u64),
                    seq: i as u64 + 1,
                },
                user: UserId(1 + (i % 2) as u64),
                at_us: i as i64 * 86_400_000_000,
                thread: (i % 3 == 0).then_some(1),
                reactions: (i % 2) as u64,
                text: (*text).to_owned(),
                files: if i % 4 == 1 {
                    vec![chorus_engine::ids::FileId(1)]
                } else {
                    Vec::new()
                },
            };
            writer
                .add_document(doc.to_document(&live.fields))
                .expect("a document");
            // Each text is also a file's text, named by the next text.
            let file = FileDoc {
                id: FileId(i as u64 + 1),
                workspace: WorkspaceId(1 + (i % 4 == 3) as u64),
                meta: Some(FileMeta {
                    user: UserId(1 + (i % 2) as u64),
                    name: TEXTS[(i + 1) % TEXTS.len()].to_owned(),
                    content_type: "text/plain".into(),
                    size: text.len() as u64,
                    sha256: [i as u8; 32],
                    at_us: i as i64 * 86_400_000_000,
                }),
                shares: [(ChannelId(1 + (i % 3) as u64), i as u64 + 1)].into(),
                text: (*text).to_owned(),
                text_pending: false,
            };
            writer
                .add_document(file.to_document(&live.fields))
                .expect("a document");
            if i % 3 == 2 {
                writer.commit().expect("a commit");
            }
        }
        writer.commit().expect("a commit");
        live.reader.reload().expect("a reload");
        live
    })
}

/// Runs `parsed` against the small index in both orders and at two offsets: tantivy
/// must not panic, and a page holds no more than the total says.
fn search(parsed: &Parsed) {
    let scope = Scope {
        user: UserId(1),
        workspace: WorkspaceId(1),
        channels: vec![
            (ChannelId(1), "general".into()),
            (ChannelId(2), "random".into()),
        ],
    };
    for sort in [Sort::Relevance, Sort::Newest] {
        for offset in [0, 2] {
            let hits = run(index(), parsed, &scope, sort, offset, 3).expect("the search runs");
            assert!(hits.ids.len() <= 3 && offset + hits.ids.len() <= hits.total.max(offset));
        }
    }
    if parsed.has_file || parsed.has_reaction || parsed.is_thread {
        return;
    }
    for offset in [0, 2] {
        let files = run_files(index(), parsed, &scope, offset, 3).expect("the search runs");
        assert!(files.hits.len() <= 3 && offset + files.hits.len() <= files.total.max(offset));
    }
}

/// Parses arbitrary bytes (as UTF-8, lossily) as a search query: nothing panics; an
/// accepted query is within the length limit and every text item holds a term; it runs
/// against a small index without panicking; and its highlights over the input itself,
/// and over a fixed text, are sorted, disjoint, non-empty ranges within the text.
/// Returns whether the query was accepted.
pub fn query(data: &[u8]) -> bool {
    let q = String::from_utf8_lossy(data);
    let Ok(parsed) = parse(&q) else {
        return false;
    };
    assert!(q.chars().count() <= QUERY_CHARS_MAX);
    for m in parsed.include.iter().chain(&parsed.exclude) {
        assert!(
            !m.words.is_empty() || !m.cjk.is_empty(),
            "an empty item: {m:?}"
        );
        assert!(m.words.iter().all(|w| !w.is_empty()));
    }
    for (from, to) in &parsed.windows {
        assert!(from < to, "an empty window");
    }
    search(&parsed);
    for text in [q.as_ref(), "a plain text to highlight"] {
        let chars = text.chars().count();
        let spans = highlights(&parsed, text);
        let mut end = 0;
        for (i, [s, e]) in spans.iter().copied().enumerate() {
            assert!(s < e && e <= chars, "span {s}..{e} of {chars}");
            assert!(i == 0 || s > end, "spans overlap or touch: {spans:?}");
            end = e;
        }
        if let Some(snip) = snippet(&parsed, text) {
            let chars = snip.text.chars().count();
            assert!(snip.highlights.iter().all(|[s, e]| s < e && *e <= chars));
        }
    }
    true
}
