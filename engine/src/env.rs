//! The environment seam: everything a shard needs from the world around it.
//!
//! The engine's shards, partitions, metadata owner and dispatcher are plain Rust over the
//! [`Env`] trait: the clock, timers, spawning tasks, a pool for blocking work, the tree of
//! directories its logs, snapshots and layout file live in ([`StorageRoot`]), the blob
//! store ([`BlobStore`]), and how a partition's log commits ([`Durability`]: locally, or
//! through the partition's replication group in a cluster). [`GlommioEnv`] is the real one: glommio's executor, timers and
//! blocking pool, the system clock, and the local disk. The whole-node simulation
//! (`tools/sim`) implements it with a seeded single-thread scheduler, simulated time and
//! the simulated disk, and runs every shard of a node on one thread.
//!
//! Architecture invariant: no module of the engine but this one names glommio, the system
//! clock or `std::fs`, except the thread bootstrap (`shard`), the disk blob store
//! (`blob::DiskBlobStore`) and `Engine::open`, which builds the real environment;
//! everything else reaches them through an [`Env`].
//!
//! An `Env` value belongs to one shard and is cloned freely within it; it need not be
//! `Send`. Futures it returns are polled only on that shard.

use crate::blob::BlobStore;
use crate::durability::{Durability, LocalDurability};
use crate::error::EngineError;
use chorus_log::{Log, StorageRoot};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// What a shard needs from the world around it; see the module documentation.
pub trait Env: Clone + 'static {
    /// The tree of directories the engine's files live in.
    type Root: StorageRoot + 'static;
    /// Where bodies too large for the log go.
    type Blobs: BlobStore + Clone + 'static;
    /// A spawned task, which completes when the task does. Dropping it does not cancel
    /// the task.
    type Task: Future<Output = ()> + 'static;
    /// How a channel partition's log commits.
    type Durability: Durability + 'static;

    /// The directories.
    fn root(&self) -> &Self::Root;

    /// The blob store.
    fn blobs(&self) -> &Self::Blobs;

    /// The monotonic clock: durations are measured, and deadlines set, against it.
    fn now(&self) -> Instant;

    /// The wall clock, in microseconds since the Unix epoch: the time events are stamped
    /// with. It may go backwards; nothing orders by it.
    fn unix_us(&self) -> u64;

    /// Completes once `duration` has passed on [`Env::now`]'s clock.
    fn sleep(&self, duration: Duration) -> impl Future<Output = ()> + 'static;

    /// Runs `task` beside the caller, on this shard.
    fn spawn(&self, task: impl Future<Output = ()> + 'static) -> Self::Task;

    /// Runs `work`, which may block, off the shard's thread, and completes with its result.
    fn spawn_blocking<T, F>(&self, work: F) -> impl Future<Output = T> + 'static
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static;

    /// Gives the shard's other tasks a turn if this one has run long enough.
    fn yield_if_needed(&self) -> impl Future<Output = ()> + 'static;

    /// The commit path of channel partition `partition`, over its open local log.
    fn durability(
        &self,
        partition: u32,
        log: Log<DirOf<Self>>,
    ) -> impl Future<Output = Result<Self::Durability, EngineError>>;

    /// Whether [`Env::durability`] syncs every append to the logs (a single node, whose
    /// commit is its fsync), so that their directories are opened write-through
    /// ([`StorageRoot::dir_write_through`]): a commit is then one write, with no
    /// `fdatasync` after it. A cluster's logs are appended without a sync of their own (a
    /// node's Raft journal holds their entries durably) and say no: their directories are
    /// opened cached ([`StorageRoot::dir_cached`]: the page cache on a disk), since written
    /// through each of their appends would wait for the device, and written with O_DIRECT
    /// each rewrote the block it ended in.
    fn logs_sync_every_append(&self) -> bool {
        true
    }
}

/// The real environment: a glommio executor on a shard thread, the system clock, a
/// directory tree and a blob store.
#[derive(Clone, Debug)]
pub struct GlommioEnv<R, B> {
    root: R,
    blobs: B,
}

impl<R, B> GlommioEnv<R, B> {
    /// An environment over `root` and `blobs`. Its methods must be called on a glommio
    /// executor.
    pub fn new(root: R, blobs: B) -> GlommioEnv<R, B> {
        GlommioEnv { root, blobs }
    }
}

/// A task spawned on a glommio executor.
pub struct GlommioTask(glommio::task::JoinHandle<()>);

impl Future for GlommioTask {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // `None` means the task was cancelled, which is an end too.
        Pin::new(&mut self.0).poll(cx).map(drop)
    }
}

impl<R, B> Env for GlommioEnv<R, B>
where
    R: StorageRoot + 'static,
    B: BlobStore + Clone + 'static,
{
    type Root = R;
    type Blobs = B;
    type Task = GlommioTask;
    type Durability = LocalDurability<R::Dir>;

    fn root(&self) -> &R {
        &self.root
    }

    fn blobs(&self) -> &B {
        &self.blobs
    }

    fn now(&self) -> Instant {
        Instant::now()
    }

    fn unix_us(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0)
    }

    fn sleep(&self, duration: Duration) -> impl Future<Output = ()> + 'static {
        glommio::timer::sleep(duration)
    }

    fn spawn(&self, task: impl Future<Output = ()> + 'static) -> GlommioTask {
        GlommioTask(glommio::spawn_local(task).detach())
    }

    fn spawn_blocking<T, F>(&self, work: F) -> impl Future<Output = T> + 'static
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        glommio::executor().spawn_blocking(work)
    }

    fn yield_if_needed(&self) -> impl Future<Output = ()> + 'static {
        glommio::yield_if_needed()
    }

    async fn durability(
        &self,
        _partition: u32,
        log: Log<R::Dir>,
    ) -> Result<LocalDurability<R::Dir>, EngineError> {
        Ok(LocalDurability::new(log))
    }
}

/// The directory type of an environment's storage.
pub type DirOf<E> = <<E as Env>::Root as StorageRoot>::Dir;
