//! Typed errors, one enum per operation, and the umbrella [`Error`].

use crate::format::{RecordError, SegmentHeaderError};
use std::io;

/// Why [`crate::Log::open`] failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The storage failed.
    #[error("log open: i/o error: {0}")]
    Io(#[from] io::Error),
    /// A segment's header is damaged (not merely unwritten): the log refuses to guess.
    #[error("log open: segment {name}: {source}")]
    SegmentHeader {
        /// The segment file's name.
        name: String,
        /// What is wrong with the header.
        source: SegmentHeaderError,
    },
    /// A segment's header names a different base offset than its file name.
    #[error("log open: segment {name} says its base offset is {found}")]
    SegmentBase {
        /// The segment file's name.
        name: String,
        /// The base offset in the header.
        found: u64,
    },
    /// Two segments claim the same offsets.
    #[error("log open: segment {name} overlaps the one before it (which ends before {prev_next})")]
    Overlap {
        /// The later segment's name.
        name: String,
        /// The offset after the earlier segment's last record.
        prev_next: u64,
    },
}

/// Why [`crate::Log::append`] failed. A failed append was not acknowledged: its records
/// may or may not be found after a restart.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// An earlier write or fsync failed; the log takes no more writes until it is reopened.
    #[error("log is poisoned after an i/o failure ({0}); reopen it to recover")]
    Poisoned(String),
    /// One payload is larger than the configured maximum.
    #[error("record of {len} bytes exceeds the limit of {max} bytes")]
    RecordTooLarge {
        /// The payload's length.
        len: usize,
        /// The configured limit.
        max: usize,
    },
}

/// Why [`crate::Log::read`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The offset was removed by retention; the log now starts at `first`.
    #[error("offset {offset} was deleted; the log starts at {first}")]
    Deleted {
        /// The offset asked for.
        offset: u64,
        /// The first offset still in the log.
        first: u64,
    },
    /// A stored record failed verification. Everything before it stays readable.
    #[error(
        "corrupt record at offset {offset} (segment {segment_base}, byte {position}): {reason}"
    )]
    Corrupt {
        /// The offset that could not be read.
        offset: u64,
        /// The base offset of its segment.
        segment_base: u64,
        /// The byte position in the segment file.
        position: u64,
        /// What the check found.
        reason: CorruptReason,
    },
    /// The storage failed.
    #[error("log read: i/o error: {0}")]
    Io(#[from] io::Error),
}

/// What a failed verification found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CorruptReason {
    /// The record's bytes are invalid.
    #[error("{0}")]
    Record(#[from] RecordError),
    /// A valid record with the wrong offset.
    #[error("found offset {0} instead")]
    Offset(u64),
    /// The segment's data ends before the offsets it must hold.
    #[error("segment data ends early")]
    EarlyEnd,
}

/// Why [`crate::Log::truncate_after`] or [`crate::Log::delete_before`] failed.
#[derive(Debug, thiserror::Error)]
pub enum TruncateError {
    /// The log is poisoned; reopen it.
    #[error("log is poisoned after an i/o failure ({0}); reopen it to recover")]
    Poisoned(String),
    /// Truncating there would leave a hole before the log's first offset.
    #[error("cannot truncate after {offset}: the log starts at {first}")]
    BeforeStart {
        /// The offset asked for.
        offset: u64,
        /// The log's first offset.
        first: u64,
    },
    /// The records to keep could not be located.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// The storage failed; the log is now poisoned.
    #[error("log truncate: i/o error: {0}")]
    Io(#[from] io::Error),
}

/// Any error of the log.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Opening failed.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// Appending failed.
    #[error(transparent)]
    Append(#[from] AppendError),
    /// Reading failed.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// Truncating or deleting failed.
    #[error(transparent)]
    Truncate(#[from] TruncateError),
}
