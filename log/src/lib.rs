//! `chorus-log`: the append-only, segmented, checksummed log of one Chorus partition.
//!
//! Chorus keeps every chat event in per-partition logs instead of Kafka and Cassandra. This
//! crate is one such log: [`Log::append`] returns a batch's offsets once it is durable, with
//! one `fdatasync` shared by every appender that arrived in time (group commit); reads go
//! from an offset with a byte budget; [`Log::truncate_after`] replaces an uncommitted tail
//! (Raft); [`Log::delete_before`] applies retention; and [`Log::open`] recovers whatever a
//! crash left. All I/O goes through the [`Storage`] trait, real ([`DiskStorage`]) or
//! simulated ([`SimStorage`]). The on-disk format is in [`mod@format`] and `DESIGN.md`.

pub mod error;
pub mod format;
pub mod index;
mod log;
pub mod storage;

pub use error::{AppendError, CorruptReason, Error, OpenError, ReadError, TruncateError};
pub use format::Record;
pub use log::{CorruptSegment, Entry, Log, LogConfig, RecoveryReport, TornTail};
pub use storage::{
    DiskFaults, DiskRoot, DiskStorage, FaultyRoot, Layer, Layered, LayeredRoot, SimConfig, SimRoot,
    SimStorage, Storage, StorageFile, StorageRoot,
};
