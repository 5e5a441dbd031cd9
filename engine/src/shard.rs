//! The thread-per-core bootstrap: starting the shards and waiting for them to end.
//!
//! This module owns the shard threads and nothing that runs on them. [`ShardSet::start`]
//! starts one glommio [`LocalExecutor`] per shard, each on its own thread named
//! `chorus-shard-{i}` and pinned to one CPU, and runs a caller-supplied future on it; [`ShardSet::join`] waits for every shard and reports the ones that panicked. What a
//! shard does (its inbox, partitions, fan-out) is the caller's business.
//!
//! Pinning: shard `i` is pinned to the `i % n`-th online CPU, so more shards than CPUs
//! share CPUs rather than failing (tests on a 2-core machine start more). If pinning fails
//! (a container whose cpuset excludes that CPU, for instance), or when the environment
//! variable [`NO_PIN_ENV`] is `1`, the shard runs unpinned instead: a slower shard beats
//! no shard.
//!
//! Each shard's blocking pool (`spawn_blocking`: file I/O, hashing, password hashing) is
//! [`BLOCKING_THREADS`] threads, unpinned: work handed off the shard should not compete
//! with the shard for its own CPU when another core is idle. An upload hashes one piece
//! while writing it on these two threads.
//!
//! Architecture invariant: `start` either starts every shard or none. Each thread first
//! builds its executor and reports back; only when all have succeeded does any of them run
//! the caller's future, so a failed start leaves no half-started set of shards behind.

use glommio::{CpuSet, LocalExecutor, LocalExecutorBuilder, Placement, PoolPlacement};
use std::any::Any;
use std::future::Future;
use std::io;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::{self, JoinHandle};

/// The most shards one process may start. A bound on threads and per-shard memory, set
/// far above any core count we expect.
pub const SHARD_COUNT_MAX: usize = 1024;

/// Setting this environment variable to `1` starts every shard unpinned.
pub const NO_PIN_ENV: &str = "CHORUS_NO_PIN";

/// Threads of each shard's blocking pool, placed by the kernel (not pinned).
pub const BLOCKING_THREADS: usize = 2;

/// Submission entries of each of a shard's io_uring rings (glommio's default is 128). The
/// kernel sizes a ring's table of pending polls from it: `log2(completion entries) - 5`
/// bits, at most 8. At 128 that is 8 buckets, so with thousands of sockets waiting to be
/// readable every cancellation (glommio cancels and re-arms its preemption timers on each
/// turn of the reactor, and the kernel looks for a cancelled request among the polls
/// first) walked chains of a thousand polls: 8 % of the server's CPU in the `presence`
/// benchmark. At 4,096 the table has its 256 buckets, for about 1 MiB of rings per shard.
pub const RING_DEPTH: usize = 4096;

/// The depth tried when [`RING_DEPTH`] cannot be had: glommio's default.
const RING_DEPTH_FALLBACK: usize = 128;

/// The prefix of every shard thread's name; shard `i`'s thread is `chorus-shard-{i}`.
const THREAD_NAME_PREFIX: &str = "chorus-shard-";

/// What a shard knows about itself when it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardContext {
    /// This shard's index, `0..count`.
    pub id: usize,
    /// How many shards the set has.
    pub count: usize,
}

/// [`ShardSet::start`] failed; no shard is running.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The count was 0 or over [`SHARD_COUNT_MAX`].
    #[error("a shard count of {0} is outside 1..={SHARD_COUNT_MAX}")]
    Count(usize),
    /// The operating system would not start a thread.
    #[error("could not start the thread of shard {shard}")]
    Spawn {
        /// The shard whose thread did not start.
        shard: usize,
        /// Why.
        source: io::Error,
    },
    /// A shard could not build its executor, even unpinned (io_uring unavailable, or
    /// locked memory too low, for instance).
    #[error("shard {shard} could not build its executor: {reason}")]
    Executor {
        /// The shard that failed.
        shard: usize,
        /// glommio's explanation.
        reason: String,
    },
}

/// [`ShardSet::join`] found shards that panicked. Every other shard ran to its end.
#[derive(Debug, thiserror::Error)]
#[error("{}", describe_panics(.panics))]
pub struct JoinError {
    /// One entry per shard that panicked, by shard index; never empty.
    pub panics: Vec<ShardPanic>,
}

/// One shard's panic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardPanic {
    /// The shard that panicked.
    pub shard: usize,
    /// The panic's message, when it was a string.
    pub message: String,
}

/// A set of running shards, one thread and one glommio executor each.
#[derive(Debug)]
pub struct ShardSet<T = ()> {
    threads: Vec<JoinHandle<Option<T>>>,
}

impl<T: Send + 'static> ShardSet<T> {
    /// Starts `count` shards and runs `shard_main(context)` on each. With `pin`, shard `i`
    /// is pinned to a CPU as the module documentation describes, unless [`NO_PIN_ENV`] is
    /// `1`; without it, every shard runs unpinned.
    ///
    /// `shard_main` is shared by every shard thread, so it must be `Send + Sync`; the
    /// future it returns lives and dies on its shard's thread, so it need not be `Send`.
    /// Returns once every shard has built its executor; each then starts its future.
    pub fn start<F, Fut>(count: usize, pin: bool, shard_main: F) -> Result<ShardSet<T>, StartError>
    where
        F: Fn(ShardContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = T> + 'static,
    {
        if count == 0 || count > SHARD_COUNT_MAX {
            return Err(StartError::Count(count));
        }
        let cpus = if pin && !pinning_disabled_by_env() {
            online_cpus()
        } else {
            Vec::new()
        };
        let shard_main = Arc::new(shard_main);
        let mut starting = Vec::with_capacity(count);
        for id in 0..count {
            let placement = placement_of(id, &cpus);
            match spawn_shard(ShardContext { id, count }, placement, shard_main.clone()) {
                Ok(shard) => starting.push(shard),
                Err(source) => {
                    abort(starting);
                    return Err(StartError::Spawn { shard: id, source });
                }
            }
        }
        if let Some(error) = first_start_failure(&starting) {
            abort(starting);
            return Err(error);
        }
        let threads = starting
            .into_iter()
            .map(|shard| {
                // A shard that died after reporting ready reports its panic at `join`.
                let _ = shard.go.send(true);
                shard.thread
            })
            .collect();
        Ok(ShardSet { threads })
    }

    /// How many shards the set has.
    pub fn count(&self) -> usize {
        self.threads.len()
    }

    /// Waits for every shard's future to end and returns their outputs by shard index,
    /// or the shards that panicked.
    pub fn join(self) -> Result<Vec<T>, JoinError> {
        let mut outputs = Vec::with_capacity(self.threads.len());
        let mut panics = Vec::new();
        for (shard, thread) in self.threads.into_iter().enumerate() {
            match thread.join() {
                Ok(Some(output)) => outputs.push(output),
                // Only an aborted start returns `None`, and a started set never aborts.
                Ok(None) => unreachable!("shard {shard} was told to stop after a good start"),
                Err(payload) => panics.push(ShardPanic {
                    shard,
                    message: panic_message(payload.as_ref()),
                }),
            }
        }
        if panics.is_empty() {
            Ok(outputs)
        } else {
            Err(JoinError { panics })
        }
    }
}

/// A shard thread that has been spawned but not yet told whether to run.
struct StartingShard<T> {
    id: usize,
    /// Reports whether the executor was built (`Err` holds glommio's reason).
    ready: mpsc::Receiver<Result<(), String>>,
    /// `true` runs the shard's future; `false` (or a drop) makes the thread exit at once.
    go: mpsc::Sender<bool>,
    thread: JoinHandle<Option<T>>,
}

fn spawn_shard<T, F, Fut>(
    context: ShardContext,
    placement: Placement,
    shard_main: Arc<F>,
) -> io::Result<StartingShard<T>>
where
    T: Send + 'static,
    F: Fn(ShardContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = T> + 'static,
{
    let (ready_tx, ready) = mpsc::channel();
    let (go, go_rx) = mpsc::channel();
    // We spawn the thread ourselves, rather than through `LocalExecutorBuilder::spawn`, so
    // that the thread carries exactly our name (glommio appends its own id) and so that we
    // can fall back to an unpinned executor inside the thread when pinning fails.
    let thread = thread::Builder::new()
        .name(format!("{THREAD_NAME_PREFIX}{}", context.id))
        .spawn(move || {
            let executor = match build_executor(placement) {
                Ok(executor) => executor,
                Err(reason) => {
                    let _ = ready_tx.send(Err(reason));
                    return None;
                }
            };
            let _ = ready_tx.send(Ok(()));
            if go_rx.recv() != Ok(true) {
                return None;
            }
            Some(executor.run(shard_main(context)))
        })?;
    Ok(StartingShard {
        id: context.id,
        ready,
        go,
        thread,
    })
}

/// Builds an executor on the current thread at `placement`, or unpinned if that fails;
/// either way with a blocking pool of [`BLOCKING_THREADS`] unpinned threads.
fn build_executor(placement: Placement) -> Result<LocalExecutor, String> {
    let pinned = matches!(placement, Placement::Fixed(_));
    let make = |placement: Placement| {
        let build = |depth| {
            LocalExecutorBuilder::new(placement.clone())
                .ring_depth(depth)
                .blocking_thread_pool_placement(PoolPlacement::Unbound(BLOCKING_THREADS))
                .make()
        };
        // A kernel that cannot give rings this deep still runs the shard, with
        // glommio's own depth.
        build(RING_DEPTH).or_else(|_| build(RING_DEPTH_FALLBACK))
    };
    match make(placement) {
        Ok(executor) => Ok(executor),
        Err(_) if pinned => make(Placement::Unbound).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// Waits for every starting shard to report, and returns the first failure.
fn first_start_failure<T>(starting: &[StartingShard<T>]) -> Option<StartError> {
    let mut failure = None;
    for shard in starting {
        let reason = match shard.ready.recv() {
            Ok(Ok(())) => continue,
            Ok(Err(reason)) => reason,
            // The thread ended without reporting: it panicked while building.
            Err(mpsc::RecvError) => "the shard thread died while starting".to_string(),
        };
        failure.get_or_insert(StartError::Executor {
            shard: shard.id,
            reason,
        });
    }
    failure
}

/// Tells every starting shard to exit without running, and waits for them.
fn abort<T>(starting: Vec<StartingShard<T>>) {
    for shard in starting {
        let _ = shard.go.send(false);
        // A thread that panicked while starting was already reported; nothing more to do.
        let _ = shard.thread.join();
    }
}

/// Whether [`NO_PIN_ENV`] asks for unpinned shards.
fn pinning_disabled_by_env() -> bool {
    std::env::var(NO_PIN_ENV).is_ok_and(|value| value == "1")
}

/// The online CPUs to pin to, in id order; empty (unpinned) if they cannot be listed.
fn online_cpus() -> Vec<usize> {
    let mut cpus: Vec<usize> = match CpuSet::online() {
        Ok(set) => set.into_iter().map(|location| location.cpu).collect(),
        Err(_) => Vec::new(),
    };
    cpus.sort_unstable();
    cpus.dedup();
    cpus
}

fn placement_of(shard: usize, cpus: &[usize]) -> Placement {
    if cpus.is_empty() {
        Placement::Unbound
    } else {
        Placement::Fixed(cpus[shard % cpus.len()])
    }
}

fn describe_panics(panics: &[ShardPanic]) -> String {
    let each: Vec<String> = panics
        .iter()
        .map(|p| format!("shard {} panicked: {}", p.shard, p.message))
        .collect();
    each.join("; ")
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(message) = payload.downcast_ref::<&str>() {
        (*message).to_string()
    } else if let Some(message) = payload.downcast_ref::<String>() {
        message.clone()
    } else {
        "a panic without a message".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;

    #[test]
    fn every_shard_runs_on_its_own_named_thread() {
        // Three shards start, each learns its id and the count, runs on the thread named
        // for it, and returns its output to join in shard order.
        let (ids_tx, ids_rx) = mpsc::channel();
        let shards = ShardSet::start(3, true, move |context: ShardContext| {
            let ids_tx = ids_tx.clone();
            async move {
                // The future need not be Send: an Rc lives across an await point.
                let local = Rc::new(context.id);
                glommio::yield_if_needed().await;
                let name = thread::current().name().map(str::to_string);
                ids_tx.send((context.id, context.count, name)).unwrap();
                *local * 10
            }
        })
        .unwrap();
        assert_eq!(shards.count(), 3);
        assert_eq!(shards.join().unwrap(), vec![0, 10, 20]);
        let mut seen: Vec<_> = ids_rx.iter().collect();
        seen.sort();
        let expected: Vec<_> = (0..3)
            .map(|id| (id, 3, Some(format!("chorus-shard-{id}"))))
            .collect();
        assert_eq!(seen, expected);
    }

    #[test]
    fn unbound_shards_start_too() {
        // Shards start without pinning, the mode used where pinning is unavailable.
        let shards =
            ShardSet::start(2, false, |context: ShardContext| async move { context.id }).unwrap();
        assert_eq!(shards.join().unwrap(), vec![0, 1]);
    }

    #[test]
    fn a_panicking_shard_is_reported_by_join() {
        // A shard that panics is reported by join with its index and message, while the
        // other shards still run to their end.
        let shards = ShardSet::start(3, true, |context: ShardContext| async move {
            if context.id == 1 {
                panic!("shard one gives up");
            }
            context.id
        })
        .unwrap();
        let error = shards.join().unwrap_err();
        assert_eq!(
            error.panics,
            vec![ShardPanic {
                shard: 1,
                message: "shard one gives up".to_string()
            }]
        );
        assert!(error.to_string().contains("shard one gives up"));
    }

    #[test]
    fn a_bad_count_is_refused() {
        // Zero shards, or more than the limit, is an error rather than a silent no-op.
        let start = |count| ShardSet::start(count, true, |_: ShardContext| async {});
        assert!(matches!(start(0), Err(StartError::Count(0))));
        assert!(matches!(
            start(SHARD_COUNT_MAX + 1),
            Err(StartError::Count(_))
        ));
    }
}
