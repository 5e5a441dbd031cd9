//! The engine's errors: [`EngineError`], what every call fails with, and the typed reasons
//! inside it.
//!
//! An error that wraps another keeps it as its source (`std::error::Error::source`), not as
//! text: a commit's [`crate::durability::CommitError`] that stopped a partition, an [`OpenError`] or [`ReadError`]
//! met while recovering, an `io::Error` of the storage. Sources that are not `Clone` are
//! shared through an `Arc`, because one failure is the answer to many callers: every
//! request a stopped partition refuses carries the same [`Unavailable::PartitionStopped`].

use crate::domain::event::DecodeError;
use crate::domain::DomainError;
use chorus_log::{OpenError, ReadError, TruncateError};
use std::io;
use std::sync::Arc;

/// Why an engine call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// The request was refused by the domain rules.
    #[error(transparent)]
    Domain(#[from] DomainError),
    /// The engine cannot serve this now: shutting down, or a partition stopped after a
    /// storage failure.
    #[error("unavailable: {0}")]
    Unavailable(#[from] Unavailable),
    /// Stored data failed verification.
    #[error("corrupt data: {0}")]
    Corrupt(#[from] Corrupt),
    /// The data directory cannot be used.
    #[error("i/o error: {0}")]
    Io(#[from] IoError),
    /// The configuration does not fit the data directory.
    #[error("configuration: {0}")]
    Config(String),
}

/// Two errors are equal when they are of the same kind and say the same: domain refusals
/// compare by value, the others by their message, since their sources (an `io::Error`, a
/// log error) have no equality of their own.
impl PartialEq for EngineError {
    fn eq(&self, other: &EngineError) -> bool {
        match (self, other) {
            (EngineError::Domain(a), EngineError::Domain(b)) => a == b,
            (EngineError::Config(a), EngineError::Config(b)) => a == b,
            (a, b) => {
                std::mem::discriminant(a) == std::mem::discriminant(b)
                    && a.to_string() == b.to_string()
            }
        }
    }
}

impl Eq for EngineError {}

/// Why the engine cannot serve a call now.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Unavailable {
    /// The engine is shutting down: the shard's inbox is closed.
    #[error("the engine is shutting down")]
    ShuttingDown,
    /// The shard that had the request stopped before it answered.
    #[error("the shard stopped")]
    ShardStopped,
    /// A partition's commit failed, so its state is ahead of its log (or, in a cluster, a
    /// committed event it applies does not fit its state): it answers nothing until the
    /// engine is reopened and replays the log.
    #[error("partition {partition} stopped: {source}")]
    PartitionStopped {
        /// The partition.
        partition: u32,
        /// Why its commit failed.
        source: crate::durability::CommitError,
    },
    /// In a cluster: this node does not decide the partition's events now (another node
    /// leads it, none does yet, or this node lost the leadership before the request's
    /// events committed: they were not acknowledged, and a retry with the same
    /// `client_msg_id` is safe).
    #[error("partition {partition} is not led here (leader: {leader:?})")]
    NotLeader {
        /// The partition.
        partition: u32,
        /// The node that leads it, if known.
        leader: Option<u64>,
    },
    /// In a cluster: this node does not decide metadata events now (users, workspaces,
    /// channels, files, devices); as [`Unavailable::NotLeader`] for a partition.
    #[error("the directory is not led here (leader: {leader:?})")]
    MetaNotLeader {
        /// The node that leads it, if known.
        leader: Option<u64>,
    },
    /// The metadata owner's commit failed; it stops as a partition does.
    #[error("metadata commit failed: {0}")]
    MetaStopped(#[source] crate::durability::CommitError),
    /// The shard threads could not be started.
    #[error("starting shards: {0}")]
    Start(#[source] Arc<crate::shard::StartError>),
    /// A shard ended before it reported whether it serves.
    #[error("a shard failed to start")]
    ShardDidNotStart,
    /// Too many consumer reads wait for a log's next commit.
    #[error("too many consumer reads waiting")]
    ConsumerReadsFull,
    /// Retention could not remove a log's segments.
    #[error("retention: {0}")]
    Retention(#[source] Arc<TruncateError>),
}

/// Stored data that failed verification, or that contradicts itself.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Corrupt {
    /// A log could not be recovered.
    #[error("{log}: {source}")]
    LogOpen {
        /// The log's directory, relative to the data directory.
        log: String,
        /// What the log found.
        source: Arc<OpenError>,
    },
    /// A record could not be read back.
    #[error("{log}: {source}")]
    LogRead {
        /// The log's directory, relative to the data directory.
        log: String,
        /// What the read found.
        source: Arc<ReadError>,
    },
    /// A record's payload is not an event.
    #[error("{log} offset {offset}: {source}")]
    Event {
        /// The log's directory, relative to the data directory.
        log: String,
        /// The record's offset.
        offset: u64,
        /// Why it does not decode.
        source: DecodeError,
    },
    /// Valid events that do not fit together (a gap in a channel's seqs, an event of a
    /// channel the directory does not know).
    #[error("{log}: {what}")]
    Replay {
        /// The log's directory, relative to the data directory.
        log: String,
        /// What does not fit.
        what: String,
    },
}

/// A failed operation of the storage, with what was being done.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{what}: {source}")]
pub struct IoError {
    /// What was being done, or to which file.
    pub what: String,
    /// The operating system's error.
    #[source]
    pub source: Arc<io::Error>,
}

impl IoError {
    /// An error of `what`.
    pub fn new(what: impl Into<String>, source: io::Error) -> IoError {
        IoError {
            what: what.into(),
            source: Arc::new(source),
        }
    }
}
