//! The text of files, for file search: which files have text, how much of it is indexed,
//! and the extractor thread that fills it in.
//!
//! - **Which files.** Text and source code by media type (`text/*` and the `application/*`
//!   text types) or by name (a known source or text extension), then by content: UTF-8
//!   (a character cut at the read limit aside) without NUL bytes; anything else has no
//!   text. PDFs by media type or by the `.pdf` extension. Other files are found by name.
//! - **Bounds.** At most [`TEXT_BYTES_MAX`] bytes of text per file: the first 1 MiB of a
//!   text file is read, never the rest, and a PDF's text is cut there (the embedder also
//!   bounds the pages read and the time and memory spent).
//! - **Where.** Reading bytes and taking PDFs apart is the embedder's, through
//!   [`Sources`]: the server reads the bytes through its file store (the disk or S3) and
//!   runs PDFs in a sandboxed worker process. This crate decides what to extract and when.
//!
//! **Architecture invariant: the index is the extraction queue.** A file whose text is
//! still to be extracted is committed with the flag `text_pending`, in the same commit as
//! its record. The extractor thread asks the committed index for such files, extracts
//! their text off the indexer's thread (a large PDF never delays a message's freshness),
//! and hands it to the indexer, which writes the text and clears the flag in its next
//! commit. A crash at any point leaves the flag set, so the work is found again at the
//! next start; nothing is queued in memory that a crash could lose, and no queue can
//! overflow.

use crate::index::{FileDoc, FLAG_TEXT_PENDING, KIND_FILE};
use crate::Search;
use chorus_engine::blob::{BlobError, BlobRef};
use chorus_engine::ids::FileId;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tantivy::collector::TopDocs;
use tantivy::query::{BooleanQuery, Occur, TermQuery};
use tantivy::schema::IndexRecordOption;
use tantivy::{Order, TantivyDocument, Term};

/// The most text indexed per file, in bytes.
pub const TEXT_BYTES_MAX: usize = 1 << 20;
/// Files the extractor takes from the index at a time.
pub const EXTRACT_BATCH: usize = 16;
/// Tries per file when reading its bytes fails (the store is unreachable); then the file
/// is indexed without text.
pub const EXTRACT_TRIES_MAX: u32 = 3;
/// How long a file whose bytes could not be read waits before the next try.
pub const EXTRACT_RETRY: Duration = Duration::from_secs(2);
/// How long the extractor sleeps between looks at its stop flag while waiting.
const WAIT_SLICE: Duration = Duration::from_millis(500);

/// How a file's text is extracted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextKind {
    /// Text or source code: the bytes are the text, if they are UTF-8.
    Plain,
    /// A PDF: the text of its pages.
    Pdf,
}

/// Media types outside `text/*` whose content is text.
const TEXT_TYPES: [&str; 10] = [
    "application/json",
    "application/javascript",
    "application/xml",
    "application/x-sh",
    "application/x-yaml",
    "application/yaml",
    "application/toml",
    "application/sql",
    "application/x-httpd-php",
    "application/typescript",
];

/// Extensions of text and source files, for files stored with a generic type (a client
/// that sends `application/octet-stream` for `main.rs`).
const TEXT_EXTENSIONS: [&str; 58] = [
    "txt", "md", "markdown", "rst", "adoc", "csv", "tsv", "log", "json", "jsonl", "yaml", "yml",
    "toml", "ini", "cfg", "conf", "xml", "html", "htm", "css", "scss", "svg", "rs", "py", "rb",
    "go", "c", "h", "cc", "cpp", "hpp", "cxx", "java", "kt", "kts", "scala", "swift", "m", "cs",
    "fs", "js", "mjs", "cjs", "ts", "tsx", "jsx", "php", "pl", "lua", "sh", "bash", "zsh", "sql",
    "r", "hs", "ex", "exs", "erl",
];

/// How `name`, stored as `content_type`, has its text extracted; `None` when it is found
/// by name only.
pub fn text_kind(content_type: &str, name: &str) -> Option<TextKind> {
    let extension = name
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    if content_type == "application/pdf" || extension == "pdf" {
        return Some(TextKind::Pdf);
    }
    if content_type.starts_with("text/")
        || TEXT_TYPES.contains(&content_type)
        || TEXT_EXTENSIONS.contains(&extension.as_str())
    {
        return Some(TextKind::Plain);
    }
    None
}

/// The text of a text file from its first bytes (at most [`TEXT_BYTES_MAX`] of them are
/// used): `None` unless they are UTF-8 without NUL bytes. A character cut at the end of
/// what was read is dropped; a byte-order mark is not text.
pub fn plain_text(head: &[u8]) -> Option<String> {
    let head = &head[..head.len().min(TEXT_BYTES_MAX)];
    let text = match std::str::from_utf8(head) {
        Ok(t) => t,
        // Only a cut at the very end is allowed: up to 3 bytes of one character.
        Err(e) if e.error_len().is_none() && head.len() - e.valid_up_to() < 4 => {
            std::str::from_utf8(&head[..e.valid_up_to()]).ok()?
        }
        Err(_) => return None,
    };
    if text.contains('\0') {
        return None;
    }
    Some(text.strip_prefix('\u{feff}').unwrap_or(text).to_owned())
}

/// `text` cut to at most [`TEXT_BYTES_MAX`] bytes, on a character boundary.
pub fn cap_text(mut text: String) -> String {
    if text.len() > TEXT_BYTES_MAX {
        let mut end = TEXT_BYTES_MAX;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// A file whose text is wanted: what the embedder needs to find its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileToRead {
    /// The file.
    pub id: FileId,
    /// Its name.
    pub name: String,
    /// Its media type.
    pub content_type: String,
    /// Its length in bytes.
    pub size: u64,
    /// The SHA-256 of its bytes.
    pub sha256: [u8; 32],
}

/// What the indexer reads besides the logs, supplied by the embedder: message bodies in
/// the blob store, and files' text. Both are called on the indexer's or the extractor's
/// own thread, never a shard's, and may block.
pub trait Sources: Send + Sync {
    /// A message body kept in the blob store (on the disk, or in a bucket), checked
    /// against its reference.
    fn blob(&self, blob: &BlobRef) -> Result<Vec<u8>, BlobError>;

    /// The text of a file, at most [`TEXT_BYTES_MAX`] bytes. `Ok(None)` when it has none
    /// (binary, not UTF-8, a PDF without text or that could not be read, bytes already
    /// reclaimed); `Err` when its bytes could not be read now (tried again later).
    fn file_text(&self, file: &FileToRead, kind: TextKind) -> std::io::Result<Option<String>>;
}

/// A file's extracted text, on its way to the indexer.
#[derive(Debug)]
pub struct Extracted {
    /// The file.
    pub file: FileId,
    /// Its text (empty when it has none).
    pub text: String,
    /// The extractor's count of results sent, this one included: the indexer reports the
    /// highest it has committed.
    pub seq: u64,
}

/// The files whose text is still to be extracted, oldest first, at most `n` of them,
/// from the committed index.
pub fn pending(search: &Search, n: usize) -> tantivy::Result<Vec<FileToRead>> {
    let live = search.live();
    let f = &live.fields;
    let query = BooleanQuery::new(vec![
        (
            Occur::Must,
            Box::new(TermQuery::new(
                Term::from_field_text(f.flags, FLAG_TEXT_PENDING),
                IndexRecordOption::Basic,
            )),
        ),
        (
            Occur::Must,
            Box::new(TermQuery::new(
                f.kind_term(KIND_FILE),
                IndexRecordOption::Basic,
            )),
        ),
    ]);
    let searcher = live.reader.searcher();
    let top = TopDocs::with_limit(n.max(1)).order_by_fast_field::<i64>("at_us", Order::Asc);
    let mut out = Vec::new();
    for (_, address) in searcher.search(&query, &top)? {
        let doc: TantivyDocument = searcher.doc(address)?;
        let Some(file) = FileDoc::from_document(&doc, f) else {
            continue;
        };
        if let Some(meta) = file.meta {
            out.push(FileToRead {
                id: file.id,
                name: meta.name,
                content_type: meta.content_type,
                size: meta.size,
                sha256: meta.sha256,
            });
        }
    }
    Ok(out)
}

/// Starts the extractor thread: it extracts the text of the files the committed index
/// flags and sends it to the indexer on `results`, until `stop` is set or the indexer is
/// gone.
pub fn spawn(
    search: Arc<Search>,
    sources: Arc<dyn Sources>,
    results: futures::channel::mpsc::Sender<Extracted>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("search-extract".into())
        .spawn(move || {
            chorus_engine::consumer::lower_priority().unwrap_or_else(
                |e| tracing::warn!(error = %e, "search extractor: priority not lowered"),
            );
            Extractor {
                search,
                sources,
                results,
                stop,
                sent: 0,
                failures: HashMap::new(),
            }
            .run()
        })
}

struct Extractor {
    search: Arc<Search>,
    sources: Arc<dyn Sources>,
    results: futures::channel::mpsc::Sender<Extracted>,
    stop: Arc<AtomicBool>,
    /// Results sent so far.
    sent: u64,
    /// Files whose bytes could not be read: tries so far, and when to try again.
    failures: HashMap<FileId, (u32, Instant)>,
}

impl Extractor {
    fn run(mut self) {
        while !self.stop.load(Ordering::Acquire) {
            // Read before the look at the index: a commit after it ends the wait below.
            let commits = self.search.progress.commits();
            let todo = match pending(&self.search, EXTRACT_BATCH + self.failures.len()) {
                Ok(files) => files,
                Err(e) => {
                    tracing::warn!(error = %e, "search: could not list files to extract");
                    Vec::new()
                }
            };
            let now = Instant::now();
            let todo: Vec<FileToRead> = todo
                .into_iter()
                .filter(|f| self.failures.get(&f.id).is_none_or(|(_, at)| *at <= now))
                .take(EXTRACT_BATCH)
                .collect();
            if todo.is_empty() {
                // Nothing to do until a commit brings new files, or a retry comes due.
                self.search.progress.wait_commit(commits, WAIT_SLICE);
                continue;
            }
            for file in todo {
                if self.stop.load(Ordering::Acquire) {
                    return;
                }
                let Some(text) = self.extract(&file) else {
                    continue;
                };
                self.sent += 1;
                let result = Extracted {
                    file: file.id,
                    text,
                    seq: self.sent,
                };
                let sent =
                    futures::executor::block_on(futures::SinkExt::send(&mut self.results, result));
                if sent.is_err() {
                    return;
                }
            }
            // The next look at the index must see these results committed, or it would
            // find the same files still flagged.
            while !self.stop.load(Ordering::Acquire) && !self.search.progress.applied(self.sent) {
                self.search.progress.wait_applied(self.sent, WAIT_SLICE);
            }
        }
    }

    /// The file's text, or `None` to try again later.
    fn extract(&mut self, file: &FileToRead) -> Option<String> {
        let Some(kind) = text_kind(&file.content_type, &file.name) else {
            return Some(String::new());
        };
        match self.sources.file_text(file, kind) {
            Ok(text) => {
                self.failures.remove(&file.id);
                Some(cap_text(text.unwrap_or_default()))
            }
            Err(e) => {
                let tries = self.failures.get(&file.id).map_or(0, |(n, _)| *n) + 1;
                if tries >= EXTRACT_TRIES_MAX {
                    tracing::warn!(error = %e, file = %file.id, "search: file indexed without its text");
                    self.failures.remove(&file.id);
                    return Some(String::new());
                }
                tracing::debug!(error = %e, file = %file.id, tries, "search: file text not read yet");
                self.failures
                    .insert(file.id, (tries, Instant::now() + EXTRACT_RETRY));
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Types and extensions pick the extraction; anything else is found by name only.
    #[test]
    fn kinds() {
        assert_eq!(text_kind("application/pdf", "a"), Some(TextKind::Pdf));
        assert_eq!(
            text_kind("application/octet-stream", "Report.PDF"),
            Some(TextKind::Pdf)
        );
        assert_eq!(text_kind("text/plain", "notes"), Some(TextKind::Plain));
        assert_eq!(text_kind("application/json", "x"), Some(TextKind::Plain));
        assert_eq!(
            text_kind("application/octet-stream", "main.rs"),
            Some(TextKind::Plain)
        );
        assert_eq!(text_kind("image/png", "photo.png"), None);
        assert_eq!(text_kind("application/octet-stream", "blob"), None);
        assert_eq!(text_kind("application/zip", "src.zip"), None);
    }

    // Text is UTF-8 without NUL bytes; a character cut by the read limit is dropped, and
    // no more than the limit is kept.
    #[test]
    fn plain() {
        assert_eq!(plain_text(b"hello").as_deref(), Some("hello"));
        assert_eq!(
            plain_text("\u{feff}caf\u{e9}".as_bytes()).as_deref(),
            Some("caf\u{e9}")
        );
        assert_eq!(plain_text(b"caf\xc3").as_deref(), Some("caf"));
        assert_eq!(plain_text(b"\xff\xfe\x00a"), None);
        assert_eq!(plain_text(b"a\x00b"), None);
        assert_eq!(plain_text(b"caf\xc3x"), None);
        let long = "é".repeat(TEXT_BYTES_MAX);
        let got = plain_text(long.as_bytes()).unwrap();
        assert_eq!(got.len(), TEXT_BYTES_MAX);
        let capped = cap_text(format!("a{long}"));
        assert_eq!(capped.len(), TEXT_BYTES_MAX - 1);
    }
}
