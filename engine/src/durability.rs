//! The commit seam: what "durable" means for a partition, and who decides its events.
//!
//! A partition's events are decided by one node at a time and committed through its
//! [`Durability`]. On a single node ([`LocalDurability`]) this node always decides, and a
//! batch is committed once it is fsynced into the partition's local log. In a cluster (the
//! replication crate's implementation) a batch is committed once a majority of the
//! partition's replicas hold it, only the partition's leader decides, and every replica's
//! log also grows by the batches other nodes' leaders committed: the partition applies
//! those as they come ([`Durability::grown`]), so its state follows the log wherever the
//! events were decided.
//!
//! The shape follows Raft's propose / persist / apply: [`Durability::commit`] proposes a
//! batch and returns once it is committed and in the local log (or says why it is not);
//! [`Durability::grown`] reports what was applied to the local log since; the log only
//! ever holds committed events.

use chorus_log::{AppendError, Entry, Log, ReadError, Record, Storage, TruncateError};
use std::ops::Range;
use std::sync::Arc;

/// Why a batch was not committed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommitError {
    /// The storage failed: nothing more can be committed through this log until it is
    /// opened again.
    #[error("{0}")]
    Failed(Arc<dyn std::error::Error + Send + Sync>),
    /// This node does not decide the partition's events: nothing was proposed.
    #[error("this node does not lead the partition (leader: {leader:?})")]
    NotLeader {
        /// The node that does, if known.
        leader: Option<u64>,
    },
    /// This node lost the partition's leadership before the batch was committed. With
    /// `may_commit` it may still be (and then comes back through [`Durability::grown`]);
    /// without, it never will be.
    #[error("leadership was lost before the batch committed")]
    Lost {
        /// The batch may still be committed by the group.
        may_commit: bool,
    },
}

impl From<AppendError> for CommitError {
    fn from(e: AppendError) -> CommitError {
        CommitError::Failed(Arc::new(e))
    }
}

/// Whether this node decides a partition's events now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leading {
    /// It does: every event committed before its leadership began is in its log.
    Yes,
    /// Another node does, or none yet.
    No {
        /// The node that leads, if known.
        leader: Option<u64>,
    },
}

/// Where a partition's events become durable, and where they are read back from.
#[allow(async_fn_in_trait)]
pub trait Durability {
    /// Commits a batch decided here and returns its log offsets. All of it or none of it
    /// is acknowledged. After [`CommitError::Failed`] the partition stops taking writes;
    /// after the other errors its decided state is ahead of its log and it rebuilds.
    async fn commit(&self, batch: &[Entry<'_>]) -> Result<Range<u64>, CommitError>;

    /// Completes once the log's end has passed `end`: events committed by another node's
    /// leader (or an earlier leadership's batch that committed late) were applied to the
    /// log. A log that only this node writes never does.
    async fn grown(&self, end: u64);

    /// Whether this node decides the partition's events now.
    fn leading(&self) -> Leading;

    /// Completes once every event committed anywhere before the call is in the local log
    /// (a read barrier: what a node awaits before it answers a read, so that a read sees
    /// every write acknowledged before it was sent; a leader passes it at once while no
    /// other node can have been elected, its lease in a cluster). `NotLeader` when that
    /// cannot be known now (no leader, or a leader that cannot confirm it still leads). A
    /// log that only this node writes holds every committed event already.
    async fn read_barrier(&self) -> Result<(), CommitError>;

    /// Whether other nodes' leaders append to this log too (a cluster), so that its
    /// events can be ahead of what this node's directory has applied.
    fn follows(&self) -> bool;

    /// Makes every record the local log holds durable on this node's disk: what a snapshot
    /// that names the log's offsets awaits before it is written. `'static`, so that the
    /// task writing the snapshot can await it. A log whose commits are fsynced as they are
    /// acknowledged needs nothing; a replica's log, which its Raft log can rebuild, is
    /// appended without an fsync of its own.
    fn sync(&self) -> impl std::future::Future<Output = std::io::Result<()>> + 'static;

    /// Reads durable records from an offset, up to a byte budget.
    async fn read(&self, from: u64, max_bytes: usize) -> Result<Vec<Record>, ReadError>;

    /// The offset after the last durable (committed) record.
    fn next_offset(&self) -> u64;

    /// The first offset still held.
    fn first_offset(&self) -> u64;

    /// Retention: removes whole segments before `offset`; returns the new first offset.
    async fn delete_before(&self, offset: u64) -> Result<u64, TruncateError>;

    /// Closes the log.
    async fn close(self) -> std::io::Result<()>;
}

/// Durable means fsynced into the local log (group commit), on whatever storage the log
/// was opened over; this node decides every event.
pub struct LocalDurability<S: Storage> {
    log: Log<S>,
}

impl<S: Storage> LocalDurability<S> {
    /// Wraps an open log.
    pub fn new(log: Log<S>) -> LocalDurability<S> {
        LocalDurability { log }
    }
}

impl<S: Storage> Durability for LocalDurability<S> {
    async fn commit(&self, batch: &[Entry<'_>]) -> Result<Range<u64>, CommitError> {
        Ok(self.log.append(batch).await?)
    }

    async fn grown(&self, _end: u64) {
        // Only this node appends, through `commit`.
        std::future::pending::<()>().await
    }

    fn leading(&self) -> Leading {
        Leading::Yes
    }

    async fn read_barrier(&self) -> Result<(), CommitError> {
        Ok(())
    }

    fn follows(&self) -> bool {
        false
    }

    fn sync(&self) -> impl std::future::Future<Output = std::io::Result<()>> + 'static {
        // Every commit was fsynced before it returned.
        std::future::ready(Ok(()))
    }

    async fn read(&self, from: u64, max_bytes: usize) -> Result<Vec<Record>, ReadError> {
        self.log.read(from, max_bytes).await
    }

    fn next_offset(&self) -> u64 {
        self.log.next_offset()
    }

    fn first_offset(&self) -> u64 {
        self.log.first_offset()
    }

    async fn delete_before(&self, offset: u64) -> Result<u64, TruncateError> {
        self.log.delete_before(offset).await
    }

    async fn close(self) -> std::io::Result<()> {
        self.log.close().await
    }
}
