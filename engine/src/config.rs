//! What an embedder configures: [`EngineConfig`], with every limit named, and the
//! [`Observer`] that hears about the engine's work.

use std::path::PathBuf;
use std::sync::Arc;

/// What the engine reports as it works, for an embedder's metrics. Called on shard
/// threads, on hot paths: implementations must be cheap (atomic counters) and never block.
pub trait Observer: Send + Sync {
    /// A partition committed `events` events in one batch, and the commit (write and
    /// fsync) took `latency`.
    fn committed(&self, events: usize, latency: std::time::Duration);
    /// `frames` frames were pushed into subscriber queues.
    fn delivered(&self, frames: usize);
    /// A subscriber was cut off because it fell behind.
    fn cut_off(&self);
    /// A shard's inbox depth changed by `delta` messages since its last report.
    fn queue_depth(&self, delta: i64);
}

/// An [`Observer`] slot in the configuration.
#[derive(Clone, Default)]
pub struct ObserverSlot(pub Option<Arc<dyn Observer>>);

impl std::fmt::Debug for ObserverSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Some(Observer)"
        } else {
            "None"
        })
    }
}

/// Settings of an engine. Every limit is named.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Where the logs and blobs live.
    pub data_dir: PathBuf,
    /// Shards (threads, one per core by default).
    pub shards: usize,
    /// Channel partitions. Fixed for the life of a data directory.
    pub partitions: u32,
    /// Messages a shard's inbox holds before senders wait.
    pub inbox_capacity: usize,
    /// Frames a subscriber's queue holds before the subscriber is cut off.
    pub subscriber_queue_frames: usize,
    /// Requests a partition's queue holds before the shard's loop waits for it.
    pub partition_queue_requests: usize,
    /// Most events in one page of a resuming subscriber's catch-up.
    pub catch_up_events: usize,
    /// The size at which a log segment is sealed.
    pub segment_bytes_max: u64,
    /// Zeros each partition log writes ahead of its records at a time
    /// (`chorus_log::LogConfig::preallocate_bytes`). A cluster node sets less: its many
    /// logs share one disk and cross their marks together (DESIGN.md, "Replication").
    pub log_preallocate_bytes: u64,
    /// Pin each shard to a core.
    pub pin: bool,
    /// Who hears about commits, deliveries and queue depths.
    pub observer: ObserverSlot,
    /// The least number of events a partition commits between two snapshots of its state.
    /// A partition also waits until the events since its last snapshot reach an eighth of
    /// what that snapshot covered, so that snapshots cost a constant share of commits. A
    /// restart loads each partition's last snapshot and replays only the log after it.
    pub snapshot_every_events: u64,
    /// The names of the committed-event consumers ([`crate::consumer`]). Declared before
    /// the engine opens so that their logs are kept for them from the first moment.
    pub consumers: Vec<String>,
    /// How long a user's presence stays as it was after their last connection went, before
    /// it becomes `offline` (`presence_offline_grace_s`, `API.md` §10).
    pub presence_offline_grace: std::time::Duration,
    /// How long a subscriber's presence window lasts (`presence_flush_ms`, `API.md` §10):
    /// the records of a window reach its reader together, in one queued frame
    /// ([`crate::presence::window_start`]), this long after its first.
    pub presence_flush: std::time::Duration,
}

impl EngineConfig {
    /// Defaults for a data directory: one shard per core, 16 partitions.
    pub fn new(data_dir: impl Into<PathBuf>) -> EngineConfig {
        EngineConfig {
            data_dir: data_dir.into(),
            shards: std::thread::available_parallelism().map_or(1, |n| n.get()),
            partitions: 16,
            inbox_capacity: 65536,
            subscriber_queue_frames: 4096,
            partition_queue_requests: 8192,
            catch_up_events: 256,
            segment_bytes_max: 64 * 1024 * 1024,
            log_preallocate_bytes: chorus_log::LogConfig::default().preallocate_bytes,
            pin: true,
            observer: ObserverSlot::default(),
            snapshot_every_events: 100_000,
            consumers: Vec::new(),
            presence_offline_grace: std::time::Duration::from_secs(30),
            presence_flush: std::time::Duration::from_millis(250),
        }
    }
}

/// Ephemeral frames (typing) a subscription keeps while it is held or catching up, to
/// deliver once its channel is live: the latest per typist and channel, and past this many
/// the newer are dropped.
pub const HELD_EPHEMERAL_FRAMES_MAX: usize = 64;
