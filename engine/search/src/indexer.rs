//! The indexer: a committed-event consumer that keeps the index in step with every
//! channel partition's log and with the metadata log's files, on a thread of its own
//! (never a shard's).
//!
//! - **Cursor.** The offset to read next in each partition and in the metadata log is the
//!   commit payload of the index ([`crate::index::Payload`]): documents and cursors are
//!   one tantivy commit, so after a crash at any moment the index holds exactly the events
//!   before its cursors, and indexing resumes from them. Only after a commit are the
//!   cursors acknowledged to the engine (its retention watermark keeps the log from them
//!   on).
//! - **Documents.** A post adds its message; an edit writes it again with the new text, a
//!   reaction with the new count (a document is replaced whole: deleted by its ID term,
//!   then added); a deletion removes it. Every write deletes the ID first, so an event
//!   indexed again (it cannot be, but the rule costs nothing) never makes a second
//!   document. Encrypted messages do not exist in this build's domain; when they do, their
//!   posts must be skipped here (`BRIEF.md`: the server cannot read them).
//! - **Files.** `FileStored` writes a file's document (name, uploader, time, and the flag
//!   `text_pending` when its type has text, see [`crate::extract`]); `FileDeleted` removes
//!   it. A post with files adds `(channel, seq)` to each file's shares, and the deletion
//!   of that message takes it back: the file document's channels are the channels where a
//!   live message carries it, which is who besides the uploader may read it (`API.md`
//!   §11). The logs are read independently, so a share may be indexed before the file's
//!   record; it then makes a partial document that no search matches until the record
//!   arrives. (A share indexed after the file's deletion leaves such a partial document
//!   for good: a few bytes, never a result.) Extracted text comes back from the extractor
//!   thread and is written into the file's document, which clears the flag.
//! - **Batching.** A batch opens with its first event and takes every page and text
//!   answered within [`BATCH_WINDOW`] after it; then one commit and one explicit
//!   `reload()` of the reader (`ReloadPolicy::Manual`), the moment from which the batch is
//!   searchable. A commit's cost is mostly fixed (a segment's files created and synced,
//!   its term dictionary builders, and the merges the segments make), so commits are
//!   spaced by the window rather than run back to back.
//! - **Failure.** A commit that fails (the directory was removed, the disk failed) starts
//!   the index over: it is moved aside, created empty, and rebuilt from the logs while
//!   queries keep being answered from what it holds. The texts in the failed batch are
//!   lost with it; the extractor is told ([`crate::Progress`]) and finds their files
//!   flagged again in the rebuilt index. A writer opens by removing the files of a commit
//!   a killed process left unfinished ([`open_writer`]).

use crate::extract::{text_kind, Extracted, Sources};
use crate::index::{Fields, FileDoc, FileMeta, MessageDoc, Payload, INDEX_FORMAT_VERSION};
use crate::starved::{on_idle_thread, Starvation};
use crate::{Search, State};
use chorus_engine::consumer::{CommittedKind, CommittedPage, LogId};
use chorus_engine::domain::event::{Body, ChannelEvent, ChannelRecord, MetaEvent, MetaRecord};
use chorus_engine::ids::{FileId, MessageId};
use chorus_engine::{Consumer, Engine, EngineError};
use futures::channel::{mpsc, oneshot};
use futures::future::{select, Either, LocalBoxFuture};
use futures::stream::{FuturesUnordered, StreamExt};
use futures::task::ArcWake;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tantivy::collector::TopDocs;
use tantivy::query::TermQuery;
use tantivy::schema::IndexRecordOption;
use tantivy::{IndexWriter, TantivyDocument};

/// How long a batch gathers events after its first, before its commit: an event is
/// searchable at most this long plus a commit after it is read.
pub const BATCH_WINDOW: Duration = Duration::from_millis(100);
/// Segments smaller than this many documents are merged as if they had this many.
pub const MERGE_MIN_LAYER_DOCS: u32 = 500;

/// How long the indexer waits before reading a log again after a read failed.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// The writer's memory budget (tantivy's arena, one indexing thread).
pub const WRITER_BYTES: usize = 32 << 20;

/// tantivy's log merge policy, with small segments in layers of their own. Its default
/// puts every segment under 10,000 documents in one layer, so with a commit every window
/// each merge of eight rewrote the one growing segment with seven small ones: each
/// document written about six times before it reached 10,000.
fn merge_policy() -> tantivy::merge_policy::LogMergePolicy {
    let mut policy = tantivy::merge_policy::LogMergePolicy::default();
    policy.set_min_layer_size(MERGE_MIN_LAYER_DOCS);
    policy
}

/// The index's writer: one indexing thread, [`WRITER_BYTES`], [`merge_policy`].
///
/// Files a killed process left behind are removed first: a commit writes its segments'
/// files before its commit point, and tantivy collects unreferenced files only after a
/// commit succeeds. The first commit after a restart indexes the same events again and
/// reaches the same operation stamps, and a delete file is named by its segment and stamp
/// (`<segment>.<stamp>.del`): it found the dead commit's file in its way and failed.
pub fn open_writer(index: &tantivy::Index) -> tantivy::Result<IndexWriter<TantivyDocument>> {
    let writer = index.writer_with_num_threads(1, WRITER_BYTES)?;
    writer.set_merge_policy(Box::new(merge_policy()));
    writer.garbage_collect_files().wait()?;
    Ok(writer)
}

type Read = (LogId, Result<CommittedPage, EngineError>);

/// What the indexer's loop woke up for.
enum Next {
    Read(Read),
    Text(Extracted),
    /// The extractor's channel closed.
    TextsGone,
    Stop,
}

/// What the indexer needs from the server.
pub struct IndexerConfig {
    /// The engine whose logs it indexes.
    pub engine: Engine,
    /// Its consumer name, declared in the engine's configuration.
    pub consumer: String,
    /// Message bodies in the blob store, and files' text.
    pub sources: Arc<dyn Sources>,
}

/// Starts the indexer on a thread of its own, and the extractor on another. The indexer
/// stops when `stop` fires (or its sender is dropped), after committing what it has; the
/// extractor stops with it (after the file it is on, whose work the next start redoes).
pub fn spawn(
    search: Arc<Search>,
    config: IndexerConfig,
    stop: oneshot::Receiver<()>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let (tx, rx) = mpsc::channel(crate::extract::EXTRACT_BATCH);
    let stop_extracting = Arc::new(AtomicBool::new(false));
    crate::extract::spawn(
        search.clone(),
        config.sources.clone(),
        tx,
        stop_extracting.clone(),
    )?;
    std::thread::Builder::new()
        .name("search-indexer".into())
        .spawn(move || {
            // Before the index writer starts its threads, which inherit it (and are
            // idle-only besides: `crate::starved`).
            chorus_engine::consumer::lower_priority().unwrap_or_else(
                |e| tracing::warn!(error = %e, "search indexer: priority not lowered"),
            );
            run(search, config, stop, rx);
            stop_extracting.store(true, Ordering::Release);
        })
}

fn run(
    search: Arc<Search>,
    config: IndexerConfig,
    mut stop: oneshot::Receiver<()>,
    extracted: mpsc::Receiver<Extracted>,
) {
    let mut extracted = Some(extracted);
    let consumer = match config.engine.consumer(&config.consumer) {
        Ok(c) => c,
        Err(e) => return fail(&search, &e.to_string()),
    };
    // Each partition's log end when the engine opened: the index is ready once its
    // cursors reached all of them.
    let ends: BTreeMap<u32, u64> = config.engine.ends_at_open();
    let partitions = config.engine.config().partitions;
    loop {
        let mut indexer = match Indexer::new(&search, &consumer, &config, &ends) {
            Ok(i) => i,
            Err(e) => return fail(&search, &e),
        };
        match indexer.run(partitions, &mut stop, &mut extracted) {
            Ok(()) => return,
            Err(e) => {
                tracing::error!(error = %e, "search index failed; rebuilding it from the logs");
                // The texts taken into the failed batch are lost with it; an extractor
                // waiting for their commit would wait for good.
                search.progress.dropped(indexer.extracted);
                drop(indexer);
                if let Err(e) = search.start_over() {
                    return fail(&search, &e.to_string());
                }
            }
        }
    }
}

/// The indexer's next event: the stop first, then a page or an extracted text, whichever
/// is answered; `None` once `deadline` passes with none of them.
fn wait(
    stop: &mut oneshot::Receiver<()>,
    reads: &mut FuturesUnordered<LocalBoxFuture<'static, Read>>,
    extracted: &mut Option<mpsc::Receiver<Extracted>>,
    deadline: Option<Instant>,
) -> Option<Next> {
    // Once the extractor is gone (it stopped or failed), its channel answers `None` at
    // once, every time: stop asking it rather than spin.
    let texts = std::pin::pin!(async {
        match extracted.as_mut() {
            Some(rx) => rx.next().await,
            None => futures::future::pending().await,
        }
    });
    // Every log may be waiting for the batch's commit (none read): then only a text, the
    // stop or the deadline can come.
    let read = std::pin::pin!(async {
        match reads.next().await {
            Some(read) => read,
            None => futures::future::pending().await,
        }
    });
    // The stop first: `select` polls its left side first, and while the index catches up
    // some read is always ready, so a stop polled second would wait for the whole backlog
    // (a cluster node under load took 8 s to drain).
    let next = select(stop, select(read, texts));
    let next = match deadline {
        Some(deadline) => block_until(next, deadline)?,
        None => futures::executor::block_on(next),
    };
    Some(match next {
        Either::Right((Either::Left((read, _)), _)) => Next::Read(read),
        Either::Right((Either::Right((Some(text), _)), _)) => Next::Text(text),
        Either::Right((Either::Right((None, _)), _)) => Next::TextsGone,
        Either::Left(_) => Next::Stop,
    })
}

/// Polls `future` on this thread, parked between wake-ups, until it is ready (`Some`) or
/// `deadline` passes (`None`).
fn block_until<F: Future>(future: F, deadline: Instant) -> Option<F::Output> {
    struct Unpark(std::thread::Thread);
    impl ArcWake for Unpark {
        fn wake_by_ref(this: &Arc<Self>) {
            this.0.unpark();
        }
    }
    let waker = futures::task::waker(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return Some(out);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        // A wake-up, a spurious return or the deadline: each is followed by a poll.
        std::thread::park_timeout(deadline - now);
    }
}

fn fail(search: &Search, why: &str) {
    tracing::error!(error = why, "search indexing stopped");
    search.status.set_state(State::Failed);
}

struct Indexer<'a> {
    search: &'a Search,
    consumer: &'a Consumer,
    sources: &'a dyn Sources,
    fields: Fields,
    writer: IndexWriter<TantivyDocument>,
    reader: tantivy::IndexReader,
    cursors: BTreeMap<u32, u64>,
    /// The metadata log's cursor.
    meta: u64,
    /// Each partition's log end when the engine opened.
    ends: BTreeMap<u32, u64>,
    /// Partitions whose cursor has not reached that end yet.
    behind: BTreeSet<u32>,
    /// The metadata log's end when indexing started (users for people search): the index
    /// is not ready before its cursor reached it either.
    meta_end: u64,
    /// Documents written since the last commit (`None`: deleted), which the reader does
    /// not see yet.
    pending: HashMap<MessageId, Option<MessageDoc>>,
    /// File documents written since the last commit (`None`: deleted).
    pending_files: HashMap<FileId, Option<FileDoc>>,
    /// The highest extraction result taken into this batch.
    extracted: u64,
    dirty: bool,
    /// Logs answered at their end in this batch, read again only once it is committed
    /// (see [`Indexer::take`]).
    caught_up: Vec<LogId>,
    /// The writer's threads' priority ([`crate::starved`]).
    starvation: Starvation,
}

impl<'a> Indexer<'a> {
    fn new(
        search: &'a Search,
        consumer: &'a Consumer,
        config: &'a IndexerConfig,
        ends: &BTreeMap<u32, u64>,
    ) -> Result<Indexer<'a>, String> {
        let live = search.live();
        // Made on an idle-only thread, so that the writer's threads are.
        let mut starvation = Starvation::default();
        let writer = on_idle_thread(&mut starvation, &search.status, || open_writer(&live.index))
            .map_err(|e| e.to_string())?;
        let (cursors, meta) = search.cursors();
        // The metadata log's end now, from a read that does not wait (its events are read
        // again by the indexing loop).
        let meta_end = futures::executor::block_on(consumer.read_now(LogId::Meta, meta))
            .map(|page| page.end)
            .map_err(|e| e.to_string())?;
        let behind: BTreeSet<u32> = ends
            .iter()
            .filter(|(p, end)| cursors.get(p).copied().unwrap_or(0) < **end)
            .map(|(p, _)| *p)
            .collect();
        let state = match (
            behind.is_empty() && meta >= meta_end,
            search.status.rebuilding(),
        ) {
            (true, _) => State::Ready,
            (false, true) => State::Rebuilding,
            (false, false) => State::CatchingUp,
        };
        search.status.set_state(state);
        Ok(Indexer {
            search,
            consumer,
            sources: config.sources.as_ref(),
            fields: live.fields,
            reader: live.reader.clone(),
            writer,
            cursors,
            meta,
            ends: ends.clone(),
            behind,
            meta_end,
            pending: HashMap::new(),
            pending_files: HashMap::new(),
            extracted: 0,
            dirty: false,
            caught_up: Vec::new(),
            starvation,
        })
    }

    /// The offset to read `log` from next.
    fn cursor(&self, log: LogId) -> u64 {
        match log {
            LogId::Meta => self.meta,
            LogId::Partition(p) => self.cursors.get(&p).copied().unwrap_or(0),
        }
    }

    fn read(&self, log: LogId) -> LocalBoxFuture<'static, Read> {
        let consumer = self.consumer.clone();
        let from = self.cursor(log);
        Box::pin(async move {
            let page = consumer.read(log, from).await;
            (log, page)
        })
    }

    /// Indexes until `stop` fires (`Ok`) or a commit fails (`Err`).
    fn run(
        &mut self,
        partitions: u32,
        stop: &mut oneshot::Receiver<()>,
        extracted: &mut Option<mpsc::Receiver<Extracted>>,
    ) -> Result<(), String> {
        let mut reads: FuturesUnordered<LocalBoxFuture<'static, Read>> = (0..partitions)
            .map(|p| self.read(LogId::Partition(p)))
            .chain([self.read(LogId::Meta)])
            .collect();
        loop {
            // The first event of a batch, however long it takes to come; then whatever
            // comes within the batch window after it, so one commit carries it all.
            let mut stopping = false;
            let mut deadline = None;
            while !stopping {
                // With no batch open, raised threads are lowered in time even if no event
                // comes.
                let until = deadline.or(self.starvation.lower_at());
                let Some(next) = wait(stop, &mut reads, extracted, until) else {
                    break;
                };
                deadline.get_or_insert_with(|| Instant::now() + BATCH_WINDOW);
                match next {
                    Next::Read(read) => self.take(read, &mut reads)?,
                    Next::Text(text) => self.take_text(text)?,
                    Next::TextsGone => {
                        tracing::error!(
                            "search: the text extractor stopped; files keep their names only"
                        );
                        *extracted = None;
                    }
                    Next::Stop => stopping = true,
                }
            }
            if !stopping {
                self.top_up()?;
            }
            if self.dirty {
                self.commit()?;
            }
            if deadline.is_none() {
                // Woken with no batch (see `Starvation::lower_at`).
                self.starvation.after_batch(Duration::ZERO);
            }
            if stopping {
                return Ok(());
            }
            for log in std::mem::take(&mut self.caught_up) {
                reads.push(self.read(log));
            }
        }
    }

    /// Applies one read. A log with more committed events than the page is read again at
    /// once; one read to its end is read again after the batch's commit (with a last look
    /// at the window's end, [`Self::top_up`]): under a steady rate each commit of a
    /// partition would otherwise answer a read and wake its shard for the next one.
    fn take(
        &mut self,
        (log, page): Read,
        reads: &mut FuturesUnordered<LocalBoxFuture<'static, Read>>,
    ) -> Result<(), String> {
        let more = match page {
            Ok(page) => {
                self.apply_page(log, &page)?;
                page.next < page.end
            }
            Err(e) => {
                tracing::warn!(error = %e, ?log, "search indexer: read failed");
                std::thread::sleep(RETRY_INTERVAL);
                true
            }
        };
        if more {
            reads.push(self.read(log));
        } else {
            self.caught_up.push(log);
        }
        Ok(())
    }

    /// At the end of a batch's window, takes what the logs read to their end in it have
    /// committed since, without waiting, so that it is in this commit.
    fn top_up(&mut self) -> Result<(), String> {
        let reads = self.caught_up.iter().map(|&log| {
            let consumer = self.consumer.clone();
            let from = self.cursor(log);
            async move { (log, consumer.read_now(log, from).await) }
        });
        let pages = futures::executor::block_on(futures::future::join_all(reads));
        for (log, page) in pages {
            match page {
                Ok(page) => self.apply_page(log, &page)?,
                // The read after the commit tries again.
                Err(e) => tracing::warn!(error = %e, ?log, "search indexer: read failed"),
            }
        }
        Ok(())
    }

    /// Indexes a page's events and moves its log's cursor past them.
    fn apply_page(&mut self, log: LogId, page: &CommittedPage) -> Result<(), String> {
        for e in &page.events {
            match &e.event {
                CommittedKind::Channel(r) => self.apply(r)?,
                CommittedKind::Meta(r) => self.apply_meta(r)?,
                CommittedKind::Read(_) => {}
            }
        }
        let n = page.events.len() as u64;
        self.search.status.events.fetch_add(n, Ordering::Relaxed);
        // A page with no events still moves the cursor (to the log's first offset, when
        // it was below): a read from the old one would be answered at once again, and
        // the indexer would wake every batch window for it. Such a move alone is not
        // worth a commit; the next one carries it.
        let cursor = match log {
            LogId::Meta => &mut self.meta,
            LogId::Partition(p) => self.cursors.entry(p).or_insert(0),
        };
        *cursor = (*cursor).max(page.next);
        if n > 0 {
            self.dirty = true;
        }
        Ok(())
    }

    /// Writes a file's extracted text, unless the file is gone or has its text already.
    fn take_text(&mut self, extracted: Extracted) -> Result<(), String> {
        self.extracted = self.extracted.max(extracted.seq);
        self.dirty = true;
        self.search
            .status
            .files_extracted
            .fetch_add(1, Ordering::Relaxed);
        let Some(mut doc) = self.current_file(extracted.file)? else {
            return Ok(());
        };
        if !doc.text_pending {
            return Ok(());
        }
        doc.text = extracted.text;
        doc.text_pending = false;
        self.put_file(doc)
    }

    fn apply_meta(&mut self, r: &MetaRecord) -> Result<(), String> {
        match &r.event {
            MetaEvent::FileStored(s) => {
                let mut doc = self
                    .current_file(s.file)?
                    .unwrap_or_else(|| FileDoc::partial(s.file, s.workspace));
                doc.workspace = s.workspace;
                doc.text_pending = text_kind(&s.content_type, &s.name).is_some();
                doc.meta = Some(FileMeta {
                    user: s.user,
                    name: s.name.clone(),
                    content_type: s.content_type.clone(),
                    size: s.size,
                    sha256: s.sha256,
                    at_us: s.at_us as i64,
                });
                self.put_file(doc)
            }
            MetaEvent::FileDeleted { file, .. } => {
                self.writer.delete_term(self.fields.file_term(*file));
                self.pending_files.insert(*file, None);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Adds or takes back the share of `files` by the message `(channel, seq)`.
    fn share(
        &mut self,
        r: &ChannelRecord,
        files: &[FileId],
        seq: u64,
        shared: bool,
    ) -> Result<(), String> {
        for file in files {
            let current = self.current_file(*file)?;
            let mut doc = match (current, shared) {
                (Some(doc), _) => doc,
                (None, true) => FileDoc::partial(*file, r.workspace),
                (None, false) => continue,
            };
            if shared {
                doc.shares.insert((r.channel, seq));
            } else {
                doc.shares.remove(&(r.channel, seq));
            }
            self.put_file(doc)?;
        }
        Ok(())
    }

    fn apply(&mut self, r: &ChannelRecord) -> Result<(), String> {
        let id = |seq| MessageId {
            channel: r.channel,
            seq,
        };
        match &r.event {
            ChannelEvent::MessagePosted { .. } | ChannelEvent::MessagePostedWithFiles(_) => {
                let Some(posted) = r.event.posted() else {
                    return Ok(());
                };
                // An encrypted message is never searched: it gets no document, so its
                // edits and reactions find none either (`API.md` §14).
                if matches!(posted.body, Body::Ciphertext(_)) {
                    return Ok(());
                }
                let doc = MessageDoc {
                    workspace: r.workspace,
                    id: id(r.seq),
                    user: posted.user,
                    at_us: r.at_us as i64,
                    thread: posted.thread,
                    reactions: 0,
                    text: self.body_text(posted.body),
                    files: posted.files.to_vec(),
                };
                self.share(r, posted.files, r.seq, true)?;
                self.add(doc)
            }
            ChannelEvent::MessageEdited { target, body, .. } => {
                let text = self.body_text(body);
                self.change(r, id(*target), |d| d.text = text)
            }
            ChannelEvent::ReactionAdded { target, .. } => {
                self.change(r, id(*target), |d| d.reactions += 1)
            }
            ChannelEvent::ReactionRemoved { target, .. } => self.change(r, id(*target), |d| {
                d.reactions = d.reactions.saturating_sub(1)
            }),
            ChannelEvent::MessageDeleted { target, .. } => {
                if let Some(doc) = self.current(r, id(*target))? {
                    self.share(r, &doc.files, *target, false)?;
                }
                self.writer.delete_term(self.fields.id_term(id(*target)));
                self.pending.insert(id(*target), None);
                Ok(())
            }
            ChannelEvent::MemberJoined { .. }
            | ChannelEvent::MemberLeft { .. }
            | ChannelEvent::DeviceAdded { .. }
            | ChannelEvent::DeviceRemoved { .. } => Ok(()),
        }
    }

    /// Rewrites a message's document with `f` applied; a message not in the index
    /// (deleted) is left out.
    fn change(
        &mut self,
        r: &ChannelRecord,
        id: MessageId,
        f: impl FnOnce(&mut MessageDoc),
    ) -> Result<(), String> {
        let Some(mut doc) = self.current(r, id)? else {
            return Ok(());
        };
        f(&mut doc);
        self.put(doc)
    }

    /// Replaces a message's document.
    fn put(&mut self, doc: MessageDoc) -> Result<(), String> {
        self.writer.delete_term(self.fields.id_term(doc.id));
        self.add(doc)
    }

    /// Adds a new message's document, with no delete before it: no document of that ID
    /// can be in the index (a post is applied once, after the committed cursor), and a
    /// pending delete costs every commit a lookup of its term in every segment.
    fn add(&mut self, doc: MessageDoc) -> Result<(), String> {
        self.writer
            .add_document(doc.to_document(&self.fields))
            .map_err(|e| e.to_string())?;
        self.pending.insert(doc.id, Some(doc));
        Ok(())
    }

    fn put_file(&mut self, doc: FileDoc) -> Result<(), String> {
        self.writer.delete_term(self.fields.file_term(doc.id));
        self.writer
            .add_document(doc.to_document(&self.fields))
            .map_err(|e| e.to_string())?;
        self.pending_files.insert(doc.id, Some(doc));
        Ok(())
    }

    /// A file's document as it stands: written in this batch, or committed.
    fn current_file(&self, id: FileId) -> Result<Option<FileDoc>, String> {
        if let Some(doc) = self.pending_files.get(&id) {
            return Ok(doc.clone());
        }
        let Some(stored) = self.stored(self.fields.file_term(id))? else {
            return Ok(None);
        };
        Ok(FileDoc::from_document(&stored, &self.fields))
    }

    /// The committed document with this ID term.
    fn stored(&self, term: tantivy::Term) -> Result<Option<TantivyDocument>, String> {
        let searcher = self.reader.searcher();
        let query = TermQuery::new(term, IndexRecordOption::Basic);
        let top = searcher
            .search(&query, &TopDocs::with_limit(1).order_by_score())
            .map_err(|e| e.to_string())?;
        let Some((_, address)) = top.first() else {
            return Ok(None);
        };
        searcher.doc(*address).map(Some).map_err(|e| e.to_string())
    }

    /// A message's document as it stands: written in this batch, or committed.
    fn current(&self, r: &ChannelRecord, id: MessageId) -> Result<Option<MessageDoc>, String> {
        if let Some(doc) = self.pending.get(&id) {
            return Ok(doc.clone());
        }
        let Some(stored) = self.stored(self.fields.id_term(id))? else {
            return Ok(None);
        };
        Ok(MessageDoc::from_document(
            &stored,
            &self.fields,
            r.workspace,
        ))
    }

    /// A body's text; one in the blob store is read from it (a body that cannot be read
    /// is indexed without text, with a warning, rather than stopping the index).
    fn body_text(&self, body: &Body) -> String {
        match body {
            Body::Text(t) => t.clone(),
            Body::Ciphertext(_) => String::new(),
            Body::Blob { hash, len } => {
                let blob = chorus_engine::blob::BlobRef {
                    hash: *hash,
                    len: *len,
                };
                match self
                    .sources
                    .blob(&blob)
                    .map_err(|e| e.to_string())
                    .and_then(|b| String::from_utf8(b).map_err(|e| e.to_string()))
                {
                    Ok(text) => text,
                    Err(e) => {
                        tracing::warn!(error = %e, blob = %blob.to_hex(), "search: body not indexed");
                        String::new()
                    }
                }
            }
        }
    }

    /// Commits the batch with its cursors, makes it searchable, then acknowledges.
    fn commit(&mut self) -> Result<(), String> {
        let payload = Payload {
            version: INDEX_FORMAT_VERSION,
            cursors: self.cursors.clone(),
            meta: self.meta,
        };
        let json = serde_json::to_string(&payload).expect("the payload serializes");
        let started = Instant::now();
        // On an idle-only thread: tantivy starts the next indexing worker here.
        let writer = &mut self.writer;
        on_idle_thread(&mut self.starvation, &self.search.status, || {
            let mut prepared = writer.prepare_commit()?;
            prepared.set_payload(&json);
            prepared.commit()
        })
        .map_err(|e| e.to_string())?;
        self.starvation.after_batch(started.elapsed());
        self.reader.reload().map_err(|e| e.to_string())?;
        self.pending.clear();
        self.pending_files.clear();
        self.dirty = false;
        self.search.set_cursors(self.cursors.clone(), self.meta);
        self.search.progress.committed(self.extracted);
        let status = &self.search.status;
        status.commits.fetch_add(1, Ordering::Relaxed);
        let took = started.elapsed().as_micros() as u64;
        status.commit_us.fetch_add(took, Ordering::Relaxed);
        status.commit_us_max.fetch_max(took, Ordering::Relaxed);
        status
            .docs
            .store(self.reader.searcher().num_docs(), Ordering::Relaxed);
        for (p, cursor) in &self.cursors {
            self.consumer.acknowledge(LogId::Partition(*p), *cursor);
        }
        self.consumer.acknowledge(LogId::Meta, self.meta);
        let (cursors, ends) = (&self.cursors, &self.ends);
        self.behind
            .retain(|p| cursors.get(p).copied().unwrap_or(0) < ends.get(p).copied().unwrap_or(0));
        if self.behind.is_empty() && self.meta >= self.meta_end {
            status.set_state(State::Ready);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_until_returns_at_the_deadline_without_a_value() {
        let start = Instant::now();
        let out = block_until(
            futures::future::pending::<()>(),
            start + Duration::from_millis(30),
        );
        assert_eq!(out, None);
        assert!(start.elapsed() >= Duration::from_millis(30));
    }

    #[test]
    fn block_until_takes_a_value_sent_from_another_thread() {
        let (tx, rx) = oneshot::channel();
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            tx.send(7).unwrap();
        });
        let out = block_until(rx, Instant::now() + Duration::from_secs(30));
        assert_eq!(out, Some(Ok(7)));
        sender.join().unwrap();
    }
}
