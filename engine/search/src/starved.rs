//! The index writer's threads: idle-only while the index keeps up, raised while it is
//! starved.
//!
//! tantivy's threads (the indexing worker, which builds each segment, the segment updater
//! and the merges) run at `SCHED_IDLE` ([`chorus_engine::consumer::idle_priority`]): an
//! index commit is a burst of milliseconds of CPU, and at any other priority a shard that
//! woke during one waited for its time slice to end. They are started idle-only by
//! starting them from a thread that is ([`on_idle_thread`]): the writer is made there,
//! and every commit runs there, since tantivy starts a new indexing worker at each
//! commit. The indexer's own thread keeps the consumers' priority: it sends reads to the
//! shards, and an idle-only sender preempted half-way through a push into a shard's inbox
//! kept that shard waiting for it (one run of twelve stalled deliveries for 270 ms).
//!
//! While other threads keep every core busy, an idle-only thread hardly runs, and the
//! index would fall behind for as long as they do. The indexer waits for each commit at
//! most [`STARVED_AFTER`]; past that, every `SCHED_IDLE` thread of the process is raised
//! to the ordinary policy, ten steps nicer than the shards as every consumer's threads
//! ([`IdleThreads`]), for at least [`RAISED_FOR`]; they are lowered again after the first
//! commit past that which took less, or at once then if no batch comes. A process without
//! the right to raise them (`CAP_SYS_NICE`, or an `RLIMIT_NICE` of 10 or more) logs it
//! once and stays idle-only.

use crate::Status;
use chorus_engine::consumer::{idle_priority, IdleThreads};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// A commit that has not ended after this long is starved.
pub const STARVED_AFTER: Duration = Duration::from_millis(500);
/// The name of the short-lived thread that makes the writer and runs each commit.
pub const WRITER_THREAD: &str = "search-writer";
/// How long the writer's threads stay raised at least.
pub const RAISED_FOR: Duration = Duration::from_secs(10);

/// Runs `f` on a new `SCHED_IDLE` thread, so that the threads it starts are idle-only too,
/// and answers its result. While it has not answered after [`STARVED_AFTER`],
/// `starvation` raises the process's idle-only threads, this one among them (while they
/// are raised, those started since are raised at every commit too; an indexing worker
/// that a raised thread started is not idle-only at all, and is replaced at the next
/// commit).
pub(crate) fn on_idle_thread<T: Send>(
    starvation: &mut Starvation,
    status: &Status,
    f: impl FnOnce() -> T + Send,
) -> T {
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        // Named, or it would carry the indexer's name.
        std::thread::Builder::new()
            .name(WRITER_THREAD.into())
            .spawn_scoped(scope, move || {
                if let Err(e) = idle_priority() {
                    tracing::warn!(error = %e, "search: the writer's thread is not idle-only");
                }
                let _ = tx.send(f());
            })
            .expect("a thread for the index writer");
        match rx.recv_timeout(STARVED_AFTER) {
            Ok(out) => out,
            Err(_) => {
                starvation.starved(status);
                rx.recv().expect("the writer's thread answers")
            }
        }
    })
}

/// See the module documentation.
#[derive(Debug, Default)]
pub(crate) struct Starvation {
    threads: IdleThreads,
    raised_at: Option<Instant>,
    /// Raising was refused once: not tried again.
    refused: bool,
}

impl Starvation {
    /// When raised threads may be lowered, if they are raised: the indexer wakes by then
    /// even with no event to index, so threads raised by a last burst do not stay so.
    pub(crate) fn lower_at(&self) -> Option<Instant> {
        self.raised_at.map(|at| at + RAISED_FOR)
    }

    /// A commit has waited [`STARVED_AFTER`]: raises the idle-only threads.
    fn starved(&mut self, status: &Status) {
        if self.refused {
            return;
        }
        match self.threads.raise() {
            // Raised already: the threads started since are now too.
            Ok(_) if self.raised_at.is_some() => {}
            Ok(n) => {
                self.raised_at = Some(Instant::now());
                status.starved.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    threads = n,
                    "search: the index was starved of CPU; its writer's threads run at the \
                     consumers' priority for a while"
                );
            }
            Err(e) => {
                self.refused = true;
                tracing::warn!(
                    error = %e,
                    "search: the index is starved of CPU and its writer's threads cannot \
                     be raised (CAP_SYS_NICE or RLIMIT_NICE): it catches up when the cores \
                     are free"
                );
            }
        }
    }

    /// Called after each batch with the time its commit took (zero when the indexer woke
    /// with no batch: see [`Self::lower_at`]): lowers the threads once they were raised
    /// for [`RAISED_FOR`] and the commit did not starve; until then raises those the
    /// commit started (its new indexing worker).
    pub(crate) fn after_batch(&mut self, took: Duration) {
        let Some(at) = self.raised_at else {
            return;
        };
        if at.elapsed() >= RAISED_FOR && took < STARVED_AFTER {
            self.raised_at = None;
            if let Err(e) = self.threads.lower() {
                tracing::warn!(error = %e, "search: threads not lowered again");
            }
        } else if let Err(e) = self.threads.raise() {
            tracing::warn!(error = %e, "search: new threads not raised");
        }
    }
}

impl Drop for Starvation {
    // The indexer starts over with a new writer (and new threads): none stays raised.
    fn drop(&mut self) {
        if let Err(e) = self.threads.lower() {
            tracing::warn!(error = %e, "search: threads not lowered again");
        }
    }
}
