//! The search threads' priority: idle-only while the index keeps up, raised while it is
//! starved.
//!
//! The indexer and the threads it starts run at `SCHED_IDLE`
//! ([`chorus_engine::consumer::idle_priority`]), so an index commit never holds a core a
//! shard wakes up for. While other threads keep every core busy, such a thread hardly
//! runs, and the index would fall behind for as long as they do. A batch that took
//! [`STARVED_AFTER`] from its first event to the end of its commit (ten windows) means
//! that: the search threads are raised to the ordinary policy, ten steps nicer than the
//! shards as every consumer's threads, for at least [`RAISED_FOR`], and lowered again
//! after the first batch past that which took less than [`STARVED_AFTER`], or at once
//! then if no batch comes. A process
//! without the right to raise them (`CAP_SYS_NICE`, or an `RLIMIT_NICE` of 10 or more)
//! logs it once and stays idle-only.

use crate::Status;
use chorus_engine::consumer::IdleThreads;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// A batch that took this long, from its first event to the end of its commit, was
/// starved.
pub const STARVED_AFTER: Duration = Duration::from_secs(1);
/// How long the search threads stay raised at least.
pub const RAISED_FOR: Duration = Duration::from_secs(10);

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

    /// Called after each batch with the time it took from its first event to the end of
    /// its commit (zero when the indexer woke with no batch: see [`Self::lower_at`]).
    pub(crate) fn after_batch(&mut self, took: Duration, status: &Status) {
        match self.raised_at {
            None if took >= STARVED_AFTER && !self.refused => match self.threads.raise() {
                Ok(n) => {
                    self.raised_at = Some(Instant::now());
                    status.starved.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        took_ms = took.as_millis() as u64,
                        threads = n,
                        "search: the index was starved of CPU; its threads run at the \
                         consumers' priority for a while"
                    );
                }
                Err(e) => {
                    self.refused = true;
                    tracing::warn!(
                        error = %e,
                        "search: the index is starved of CPU and its threads cannot be \
                         raised (CAP_SYS_NICE or RLIMIT_NICE): it catches up when the \
                         cores are free"
                    );
                }
            },
            Some(at) if at.elapsed() >= RAISED_FOR && took < STARVED_AFTER => {
                self.raised_at = None;
                if let Err(e) = self.threads.lower() {
                    tracing::warn!(error = %e, "search: threads not lowered again");
                }
            }
            _ => {}
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
