//! `chorus-search`: message and file search for Chorus (`API.md` §12).
//!
//! - [`indexer`]: a committed-event consumer on a thread of its own that indexes every
//!   channel partition's messages, and the metadata log's files, into one tantivy index,
//!   its cursors in the index's own commits.
//! - [`extract`]: which files have text, and the extractor thread that fills it in off
//!   the indexer's thread.
//! - [`query`]: the query language, parsed without an index (and fuzzed).
//! - [`search`]: a parsed query, confined to the caller's readable channels inside the
//!   query itself, run against the index.
//! - [`highlight`]: where a query matched a message's text or a file's name, in Unicode
//!   scalar values, and a file's snippet.
//! - [`people`]: the member search (a prefix of a name word or of the email).
//! - [`text`]: the tokenizers that index and queries share.

pub mod directory;
pub mod extract;
pub mod forward;
#[doc(hidden)]
pub mod fuzzing;
pub mod highlight;
pub mod index;
pub mod indexer;
pub mod people;
pub mod query;
pub mod search;
pub mod starved;
pub mod text;

use index::{Fields, OpenError};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;
use tantivy::{Index, IndexReader};

/// The index as queries and the indexer use it now. When the index starts over, a new one
/// replaces it; queries that hold the old one finish on it.
pub struct Live {
    /// The index.
    pub index: Index,
    /// Its reader, reloaded by the indexer after each commit.
    pub reader: IndexReader,
    /// Its fields.
    pub fields: Fields,
}

/// The search index of a server: shared by the indexer thread and every query.
pub struct Search {
    dir: PathBuf,
    live: RwLock<Arc<Live>>,
    /// The cursors of the last commit: the partitions', and the metadata log's.
    cursors: Mutex<(BTreeMap<u32, u64>, u64)>,
    /// What `/metrics` reports.
    pub status: Status,
    /// Commits, and extraction results committed, for the extractor to wait on.
    pub progress: Progress,
}

impl Search {
    /// Opens the index at `dir`; a missing or damaged one is started over, to be rebuilt
    /// from the logs once the indexer runs.
    pub fn open(dir: &Path) -> Result<Arc<Search>, OpenError> {
        let opened = index::open(dir)?;
        let status = Status::default();
        if opened.rebuilt {
            status.start_rebuild();
        }
        Ok(Arc::new(Search {
            dir: dir.to_owned(),
            live: RwLock::new(Arc::new(Live {
                index: opened.index,
                reader: opened.reader,
                fields: opened.fields,
            })),
            cursors: Mutex::new((opened.payload.cursors, opened.payload.meta)),
            status,
            progress: Progress::default(),
        }))
    }

    /// The index now.
    pub fn live(&self) -> Arc<Live> {
        self.live.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn cursors(&self) -> (BTreeMap<u32, u64>, u64) {
        self.cursors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn set_cursors(&self, cursors: BTreeMap<u32, u64>, meta: u64) {
        *self.cursors.lock().unwrap_or_else(|e| e.into_inner()) = (cursors, meta);
    }

    /// Moves the index aside and starts an empty one, cursors at 0.
    pub(crate) fn start_over(&self) -> Result<(), OpenError> {
        let opened = index::start_over(&self.dir)?;
        self.set_cursors(BTreeMap::new(), 0);
        *self.live.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(Live {
            index: opened.index,
            reader: opened.reader,
            fields: opened.fields,
        });
        self.status.start_rebuild();
        Ok(())
    }
}

/// How far the indexer has come, for the extractor thread to wait on: the number of
/// commits, and the highest extraction result committed.
#[derive(Debug, Default)]
pub struct Progress {
    state: Mutex<(u64, u64)>,
    changed: Condvar,
}

impl Progress {
    /// Commits so far.
    pub fn commits(&self) -> u64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).0
    }

    /// Whether the extraction result `seq` (and every one before it) is committed.
    pub fn applied(&self, seq: u64) -> bool {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).1 >= seq
    }

    /// A commit happened, holding extraction results up to `applied`.
    pub(crate) fn committed(&self, applied: u64) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.0 += 1;
        s.1 = s.1.max(applied);
        self.changed.notify_all();
    }

    /// The extraction results up to `seq` will never be committed: the commit that held
    /// them failed and the index starts over. Their files keep the flag in the rebuilt
    /// index (it comes from their records), so the extractor, no longer waiting for them,
    /// finds them again there.
    pub(crate) fn dropped(&self, seq: u64) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.1 = s.1.max(seq);
        self.changed.notify_all();
    }

    /// Waits until there were more than `commits` commits, at most `timeout`.
    pub fn wait_commit(&self, commits: u64, timeout: Duration) {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let _ = self
            .changed
            .wait_timeout_while(s, timeout, |s| s.0 <= commits);
    }

    /// Waits until the extraction result `seq` is committed, at most `timeout`.
    pub fn wait_applied(&self, seq: u64, timeout: Duration) {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let _ = self.changed.wait_timeout_while(s, timeout, |s| s.1 < seq);
    }
}

/// Where the index stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    /// The indexer has not started.
    Opening = 0,
    /// The index was missing or damaged and is being built again from the logs.
    Rebuilding = 1,
    /// Indexing what was committed while the server was down.
    CatchingUp = 2,
    /// The index holds every partition's log as it was when the server opened, and
    /// follows new commits.
    Ready = 3,
    /// Indexing stopped (see the log); queries answer from what the index holds.
    Failed = 4,
}

impl State {
    /// Its name in `/metrics`.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Opening => "opening",
            State::Rebuilding => "rebuilding",
            State::CatchingUp => "catching_up",
            State::Ready => "ready",
            State::Failed => "failed",
        }
    }

    /// Every state, in order.
    pub const ALL: [State; 5] = [
        State::Opening,
        State::Rebuilding,
        State::CatchingUp,
        State::Ready,
        State::Failed,
    ];
}

/// Counters and the state of the index, for `/metrics`.
#[derive(Debug, Default)]
pub struct Status {
    state: AtomicU8,
    rebuilding: AtomicBool,
    /// Times the index was found missing or damaged and started over.
    pub rebuilds: AtomicU64,
    /// Log records read by the indexer.
    pub events: AtomicU64,
    /// Index commits.
    pub commits: AtomicU64,
    /// Time spent in commits (the commit and the reload), in microseconds.
    pub commit_us: AtomicU64,
    /// The longest commit so far, in microseconds.
    pub commit_us_max: AtomicU64,
    /// Documents (messages and files) in the index at its last commit.
    pub docs: AtomicU64,
    /// Files whose text was extracted (or found to have none).
    pub files_extracted: AtomicU64,
    /// Times the index was starved of CPU and its writer's threads raised ([`starved`]).
    pub starved: AtomicU64,
}

impl Status {
    /// The state now.
    pub fn state(&self) -> State {
        State::ALL[self.state.load(Ordering::Acquire) as usize]
    }

    pub(crate) fn set_state(&self, state: State) {
        if state == State::Ready {
            self.rebuilding.store(false, Ordering::Release);
        }
        self.state.store(state as u8, Ordering::Release);
    }

    pub(crate) fn rebuilding(&self) -> bool {
        self.rebuilding.load(Ordering::Acquire)
    }

    fn start_rebuild(&self) {
        self.rebuilds.fetch_add(1, Ordering::Relaxed);
        self.rebuilding.store(true, Ordering::Release);
        self.set_state(State::Rebuilding);
    }
}

impl std::fmt::Debug for Search {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Search")
            .field("dir", &self.dir)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}
