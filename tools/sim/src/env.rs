//! The engine's environment in the simulation: the seeded executor's clock, timers and
//! tasks, the simulated disk (with latency, [`SlowRoot`]), and the blob store on it.

use crate::executor::{Executor, JoinHandle};
use crate::storage::SlowRoot;
use chorus_engine::blob::StorageBlobStore;
use chorus_engine::durability::LocalDurability;
use chorus_engine::env::Env;
use chorus_engine::EngineError;
use chorus_log::{Log, SimRoot, StorageRoot};
use std::future::Future;
use std::time::{Duration, Instant};

/// The simulated wall clock at the start of a run, in microseconds since the Unix epoch
/// (2026-01-01): event times are this plus simulated time.
pub const EPOCH_US: u64 = 1_767_225_600_000_000;

/// Chance, in 1/1000, that `yield_if_needed` yields.
const YIELD_PERMILLE: u32 = 100;

/// A shard's environment in the simulation. Every shard of the node shares the executor
/// and the disk, as the threads of a process share a machine.
#[derive(Clone)]
pub struct SimEnv {
    executor: Executor,
    root: SlowRoot,
    blobs: StorageBlobStore<SlowRoot>,
}

impl SimEnv {
    /// An environment on `executor` and the disk `root`.
    pub fn new(executor: Executor, root: SimRoot) -> SimEnv {
        let root = SlowRoot::new(root, executor.clone());
        SimEnv {
            executor,
            blobs: StorageBlobStore::new(root.clone()),
            root,
        }
    }
}

impl Env for SimEnv {
    type Root = SlowRoot;
    type Blobs = StorageBlobStore<SlowRoot>;
    type Task = JoinHandle;
    type Durability = LocalDurability<<SlowRoot as StorageRoot>::Dir>;

    fn root(&self) -> &SlowRoot {
        &self.root
    }

    fn blobs(&self) -> &StorageBlobStore<SlowRoot> {
        &self.blobs
    }

    fn now(&self) -> Instant {
        self.executor.now()
    }

    fn unix_us(&self) -> u64 {
        EPOCH_US + self.executor.elapsed().as_micros() as u64
    }

    fn sleep(&self, duration: Duration) -> impl Future<Output = ()> + 'static {
        self.executor.sleep(duration)
    }

    fn spawn(&self, task: impl Future<Output = ()> + 'static) -> JoinHandle {
        self.executor.spawn(task)
    }

    fn spawn_blocking<T, F>(&self, work: F) -> impl Future<Output = T> + 'static
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        // A blocking pool runs the work beside the shard: here, the caller lets others run
        // once and then does the work itself.
        let yielded = self.executor.yield_now();
        async move {
            yielded.await;
            work()
        }
    }

    fn yield_if_needed(&self) -> impl Future<Output = ()> + 'static {
        let yield_now = self.executor.chance(YIELD_PERMILLE);
        let yielded = self.executor.yield_now();
        async move {
            if yield_now {
                yielded.await;
            }
        }
    }

    async fn durability(
        &self,
        _partition: u32,
        log: Log<<SlowRoot as StorageRoot>::Dir>,
    ) -> Result<Self::Durability, EngineError> {
        Ok(LocalDurability::new(log))
    }
}
