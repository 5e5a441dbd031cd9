//! The commit seam: what "durable" means for a partition.
//!
//! Today a batch is durable once it is fsynced into the partition's local log. The
//! replication work will add an implementation that is durable once a majority of replicas
//! have it, without touching the domain or the shards: they only ever call [`Durability`].

use chorus_log::{AppendError, Entry, Log, ReadError, Record, Storage, TruncateError};
use std::ops::Range;

/// Where a partition's events become durable, and where they are read back from.
#[allow(async_fn_in_trait)]
pub trait Durability {
    /// Makes a batch durable and returns its log offsets. All of it or none of it is
    /// acknowledged; after an error the partition stops taking writes.
    async fn commit(&self, batch: &[Entry<'_>]) -> Result<Range<u64>, AppendError>;

    /// Reads durable records from an offset, up to a byte budget.
    async fn read(&self, from: u64, max_bytes: usize) -> Result<Vec<Record>, ReadError>;

    /// The offset after the last durable record.
    fn next_offset(&self) -> u64;

    /// The first offset still held.
    fn first_offset(&self) -> u64;

    /// Retention: removes whole segments before `offset`; returns the new first offset.
    async fn delete_before(&self, offset: u64) -> Result<u64, TruncateError>;
}

/// Durable means fsynced into the local log (group commit), on whatever storage the log
/// was opened over.
pub struct LocalDurability<S: Storage> {
    log: Log<S>,
}

impl<S: Storage> LocalDurability<S> {
    /// Wraps an open log.
    pub fn new(log: Log<S>) -> LocalDurability<S> {
        LocalDurability { log }
    }

    /// Closes the log.
    pub async fn close(self) -> std::io::Result<()> {
        self.log.close().await
    }
}

impl<S: Storage> Durability for LocalDurability<S> {
    async fn commit(&self, batch: &[Entry<'_>]) -> Result<Range<u64>, AppendError> {
        self.log.append(batch).await
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
}
