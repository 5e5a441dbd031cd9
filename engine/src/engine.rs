//! The embeddable API: [`Engine`] opens the shards over a data directory, and every call
//! is a request to the shard that owns the data, answered once the answer is durable.
//!
//! API boundary: callers pass the authenticated user's ID and the IDs they name; the engine
//! resolves the workspace and checks membership itself (see the isolation invariant in
//! [`crate::domain`]). Transport, authentication and password hashing are the embedder's.
//! An `Engine` is `Send + Sync` and cheap to clone; it can be called from any thread,
//! including the shards' own.

mod e2ee;
mod notify;
mod presence_peers;

use crate::blob::{BlobStore, DiskBlobStore};
use crate::config::EngineConfig;
use crate::consumer::{CommittedPage, LogId, Waiter, Watermarks};
use crate::domain::channel::{ChannelCommand, Content};
use crate::domain::meta::{partition_of, User};
use crate::domain::{ChannelKind, DomainError, PAGE_LIMIT_MAX};
use crate::env::{Env, GlommioEnv};
use crate::error::{EngineError, IoError, Unavailable};
use crate::ids::{ChannelId, FileId, MessageId, UserId, WorkspaceId};
use crate::outcome::{
    ChannelOutcome, MessagePage, MetaOutcome, PushChecks, PushRecipient, ReadOutcome, Recovery,
};
use crate::queue::{FrameReceiver, Inbox};
use crate::runtime::dispatch::SubscriptionInfo;
use crate::runtime::meta::{MetaRead, MetaRequest};
use crate::runtime::{
    ChannelRead, Gather, OfChannel, PartitionMsg, Reply, Routes, ShardInboxes, ShardMsg,
    ShardSenders, ShardSetup, Started, CURRENT_SHARD,
};
use crate::view::{
    ChannelView, FileView, MemberView, MessageView, ReadView, UserView, WorkspaceView,
};
use bytes::Bytes;
use chorus_log::DiskRoot;
use futures::channel::oneshot;
use std::sync::{Arc, Mutex};

struct Inner {
    routes: Routes,
    config: EngineConfig,
    watermarks: Watermarks,
    recovery: Mutex<Vec<Recovery>>,
    threads: Mutex<Option<crate::shard::ShardSet<()>>>,
    /// Each shard's word that it stopped.
    stopped: Mutex<Vec<oneshot::Receiver<()>>>,
    /// The open lock file of the data directory, when the engine runs on disk.
    data_dir_lock: Mutex<Option<std::fs::File>>,
}

/// The name of the lock file in a data directory.
pub const LOCK_FILE_NAME: &str = "LOCK";

/// Takes the exclusive lock of a data directory (`flock` on its `LOCK` file, released when
/// the file is closed, also by a crash), or says that another engine holds it.
fn lock_data_dir(dir: &std::path::Path) -> Result<std::fs::File, EngineError> {
    use std::os::fd::AsRawFd;
    let path = dir.join(LOCK_FILE_NAME);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| IoError::new(path.display().to_string(), e))?;
    // SAFETY: flock on a descriptor this function owns; it changes no memory.
    let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if locked != 0 {
        let e = std::io::Error::last_os_error();
        let what = format!(
            "{} is in use by another chorus engine (locked by {})",
            dir.display(),
            path.display()
        );
        return Err(IoError::new(what, e).into());
    }
    Ok(file)
}

/// A running engine. Clones share it.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

/// A subscriber: the committed events of every channel its user is in, as JSON frames,
/// including channels joined after it started. Dropping it unsubscribes.
pub struct Subscription {
    engine: Engine,
    info: SubscriptionInfo,
    frames: FrameReceiver,
}

impl Subscription {
    /// The channels followed at the start, with their last committed seq.
    pub fn channels(&self) -> &[(ChannelId, u64)] {
        &self.info.channels
    }

    /// The next frame; an error once the subscriber was cut off (then resume with a new
    /// subscription).
    pub async fn recv(&mut self) -> Result<Bytes, crate::queue::Cutoff> {
        self.frames.recv().await
    }

    /// Every frame ready now, up to `max`, without waiting.
    pub fn try_recv_batch(
        &mut self,
        out: &mut Vec<Bytes>,
        max: usize,
    ) -> Result<usize, crate::queue::Cutoff> {
        self.frames.try_recv_batch(out, max)
    }

    /// The frame receiver, for callers that poll it themselves.
    pub fn receiver(&mut self) -> &mut FrameReceiver {
        &mut self.frames
    }

    /// Starts a subscription made with [`Engine::subscribe_held`]; see
    /// [`SubscriptionControl::start`].
    pub async fn start(&self, resume: Option<Vec<(ChannelId, u64)>>) -> Result<(), EngineError> {
        self.control().start(resume).await
    }

    /// Resumes named channels of a started subscription; see
    /// [`SubscriptionControl::resume`].
    pub async fn resume(&self, since: Vec<(ChannelId, u64)>) -> Result<bool, EngineError> {
        self.control().resume(since).await
    }

    /// A handle that starts and resumes this subscription apart from its frames, so that a
    /// caller can wait on both at once.
    pub fn control(&self) -> SubscriptionControl {
        SubscriptionControl {
            engine: self.engine.clone(),
            id: self.info.id,
            shard: self.info.shard,
        }
    }
}

/// A declared committed-event consumer ([`crate::consumer`]); cheap to clone, usable from
/// any thread.
#[derive(Clone)]
pub struct Consumer {
    engine: Engine,
    index: usize,
}

impl Consumer {
    /// The consumer's name, as declared.
    pub fn name(&self) -> &str {
        &self.engine.config().consumers[self.index]
    }

    /// The committed events of `log` at and after offset `from`, at most about
    /// [`crate::consumer::CONSUMER_READ_BYTES_MAX`] of them; waits for the next commit when
    /// there are none. A `from` below the log's first offset reads from its first offset.
    pub async fn read(&self, log: LogId, from: u64) -> Result<CommittedPage, EngineError> {
        self.engine.read_committed(log, from, true).await
    }

    /// Reads like [`Self::read`], but at the log's end answers at once, with no events and
    /// the log's end: how a consumer learns, without waiting, that it has caught up.
    pub async fn read_now(&self, log: LogId, from: u64) -> Result<CommittedPage, EngineError> {
        self.engine.read_committed(log, from, false).await
    }

    /// Says the consumer has durably processed every event of `log` before offset
    /// `cursor`: the log's segments before the lowest such cursor may be deleted. A cursor
    /// lower than one acknowledged before is ignored (cursors only move forward).
    pub fn acknowledge(&self, log: LogId, cursor: u64) {
        self.engine
            .watermarks()
            .acknowledge(self.index, log, cursor);
    }
}

/// Starts and resumes a [`Subscription`]; cheap to clone. Calls after the subscription was
/// dropped change nothing.
#[derive(Clone)]
pub struct SubscriptionControl {
    engine: Engine,
    id: u64,
    shard: u32,
}

impl SubscriptionControl {
    /// Starts a subscription made with [`Engine::subscribe_held`]. With `Some(since)`, every
    /// event after the given seq of each named channel comes first, in order, then a
    /// `resumed` frame; channels not named start where the subscription began. Then live
    /// events. Nothing is sent twice and nothing is skipped.
    pub async fn start(&self, resume: Option<Vec<(ChannelId, u64)>>) -> Result<(), EngineError> {
        let announce = resume.is_some();
        let msg = ShardMsg::Start {
            sub: self.id,
            since: resume.unwrap_or_default(),
            announce,
        };
        self.engine.inner.routes.send(self.shard, msg).await
    }

    /// Resumes named channels of a started subscription: the events after the given seq
    /// that this subscription has not been sent yet, then a `resumed` frame. It never sends
    /// a frame twice or out of order, so it cannot go back before a frame already sent:
    /// then it changes nothing and answers `Ok(false)`, and the client must start over
    /// ([`Engine::subscribe_held`] and [`Subscription::start`] on a new subscription).
    pub async fn resume(&self, since: Vec<(ChannelId, u64)>) -> Result<bool, EngineError> {
        let (tx, rx) = oneshot::channel();
        let msg = ShardMsg::Resume {
            sub: self.id,
            since,
            reply: Some(tx),
        };
        self.engine.inner.routes.send(self.shard, msg).await?;
        rx.await.map_err(|_| Unavailable::ShardStopped.into())
    }
}

impl SubscriptionControl {
    /// Changes the set of users whose presence this subscription watches (`API.md` §10),
    /// at most [`crate::presence::PRESENCE_WATCH_MAX`] (more is `DomainError::TooMany` and
    /// changes nothing), and answers what each added user shows now, with the owner's
    /// number of the last change that includes. A user who shares no workspace with the
    /// subscriber shows `offline` (number `u64::MAX`) and is never reported again. Later
    /// changes of a watched user arrive in the subscription's frames as
    /// [`crate::presence::Update`] records, which are not JSON: the reader turns them into
    /// its own frames, and drops a record whose `seq` is not above the number answered
    /// (a change the answer already includes, still on its way).
    pub async fn watch_presence(
        &self,
        op: crate::presence::WatchOp,
        users: Vec<UserId>,
    ) -> Result<Vec<(UserId, crate::presence::Presence, u64)>, EngineError> {
        let (tx, rx) = oneshot::channel();
        let msg = ShardMsg::PresenceSub {
            sub: self.id,
            op,
            users,
            reply: tx,
        };
        self.engine.inner.routes.send(self.shard, msg).await?;
        rx.await.map_err(|_| Unavailable::ShardStopped)?
    }

    /// Tells the user's presence owner that the person on this connection became active
    /// (`true`) or idle. A subscription counts as an active connection from its start.
    pub async fn report_activity(&self, active: bool) -> Result<(), EngineError> {
        let msg = ShardMsg::PresenceActivity {
            sub: self.id,
            active,
        };
        self.engine.inner.routes.send(self.shard, msg).await
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let msg = ShardMsg::Unsubscribe { sub: self.info.id };
        let _ = self.engine.inner.routes.try_send(self.info.shard, msg);
    }
}

async fn ask<T>(
    f: impl FnOnce(Reply<T>) -> ShardMsg,
    routes: &Routes,
    shard: u32,
) -> Result<T, EngineError> {
    let (tx, rx) = oneshot::channel();
    routes.send(shard, f(tx)).await?;
    rx.await.map_err(|_| Unavailable::ShardStopped)?
}

fn validate_limit(limit: usize) -> Result<usize, EngineError> {
    if limit == 0 || limit > PAGE_LIMIT_MAX {
        return Err(DomainError::Invalid(format!("limit must be 1 to {PAGE_LIMIT_MAX}")).into());
    }
    Ok(limit)
}

impl Engine {
    /// Opens (or creates) the engine in `config.data_dir` and starts its shards. Returns
    /// once every shard has recovered its partitions and serves.
    ///
    /// The data directory is locked for the life of the engine: a second engine (in this
    /// process or another) refuses to open it rather than write the same logs.
    pub fn open(config: EngineConfig) -> Result<Engine, EngineError> {
        validate(&config)?;
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| IoError::new(config.data_dir.display().to_string(), e))?;
        let blobs = DiskBlobStore::open(&config.data_dir.join("blobs"))
            .map_err(|e| IoError::new("blob store", e))?;
        Engine::open_in(config, blobs, |_, env| env)
    }

    /// Opens the engine as [`Engine::open`] does, with message bodies over the inline limit
    /// in `blobs` rather than in `blobs/` of the data directory (an S3 bucket, say).
    pub fn open_with_blobs<B>(config: EngineConfig, blobs: B) -> Result<Engine, EngineError>
    where
        B: BlobStore + Clone + Send + Sync + 'static,
    {
        Engine::open_in(config, blobs, |_, env| env)
    }

    /// Opens the engine as [`Engine::open_with_blobs`] does, each shard in the environment
    /// `wrap` makes of the real one on the shard's thread: how a cluster node puts its
    /// partitions on their replication groups.
    pub fn open_in<B, E, W>(config: EngineConfig, blobs: B, wrap: W) -> Result<Engine, EngineError>
    where
        B: BlobStore + Clone + Send + Sync + 'static,
        E: Env,
        W: Fn(crate::shard::ShardContext, GlommioEnv<DiskRoot, B>) -> E + Send + Sync + 'static,
    {
        let root = DiskRoot::new(&config.data_dir);
        Engine::open_on(config, root, blobs, wrap)
    }

    /// Opens the engine as [`Engine::open_in`] does, its files in `root`, a tree over
    /// `config.data_dir` (which is locked as [`Engine::open`] locks it): the disk seen
    /// through a fault layer ([`chorus_log::FaultyRoot`]) in fault tests of real processes.
    pub fn open_on<R, B, E, W>(
        config: EngineConfig,
        root: R,
        blobs: B,
        wrap: W,
    ) -> Result<Engine, EngineError>
    where
        R: chorus_log::StorageRoot + Send + Sync + 'static,
        B: BlobStore + Clone + Send + Sync + 'static,
        E: Env,
        W: Fn(crate::shard::ShardContext, GlommioEnv<R, B>) -> E + Send + Sync + 'static,
    {
        validate(&config)?;
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| IoError::new(config.data_dir.display().to_string(), e))?;
        let lock = lock_data_dir(&config.data_dir)?;
        let engine = Engine::open_with(config, move |ctx| {
            wrap(ctx, GlommioEnv::new(root.clone(), blobs.clone()))
        })?;
        *engine.inner.data_dir_lock.lock().expect("lock") = Some(lock);
        Ok(engine)
    }

    /// Opens the engine as [`Engine::open`] does, with each shard in the environment `env`
    /// makes for it on the shard's own thread (a glommio executor): its directories, its
    /// blob store, its clock. `config.data_dir` is not used.
    pub fn open_with<E, F>(config: EngineConfig, env: F) -> Result<Engine, EngineError>
    where
        E: Env,
        F: Fn(crate::shard::ShardContext) -> E + Send + Sync + 'static,
    {
        validate(&config)?;
        let Plan {
            routes,
            setups,
            mut ready,
            stopped,
        } = Plan::new(&config);
        let setups: Vec<Option<(ShardSetup, _)>> = setups.into_iter().map(Some).collect();
        let setups = Arc::new(Mutex::new(setups));
        let threads = crate::shard::ShardSet::start(config.shards, config.pin, move |ctx| {
            let (setup, stopped) = setups.lock().expect("setups")[ctx.id]
                .take()
                .expect("each shard starts once");
            // This thread is the shard's own: calls made on it go to this shard.
            CURRENT_SHARD.with(|c| c.set(Some(ctx.id as u32)));
            crate::runtime::run_shard(setup, env(ctx), stopped)
        })
        .map_err(|e| Unavailable::Start(Arc::new(e)))?;
        let engine = Engine::new(routes, config, stopped, Some(threads));
        let started = futures::executor::block_on(collect_starts(&mut ready, engine.shard_count()));
        match started {
            Ok(recovered) => {
                *engine.inner.recovery.lock().expect("recovery") = recovered;
                Ok(engine)
            }
            Err(e) => {
                engine.shutdown();
                Err(e)
            }
        }
    }

    /// Starts the engine's shards as tasks on the calling task's executor, shard `i` in the
    /// environment `env(i)` (whose `spawn` runs its task), and returns once every shard
    /// serves. This is how the simulation runs a whole node on one thread. Stop it with
    /// [`Engine::close`], or drop its executor to simulate a crash.
    pub async fn start_local<E: Env>(
        config: EngineConfig,
        env: impl Fn(u32) -> E,
    ) -> Result<Engine, EngineError> {
        validate(&config)?;
        let Plan {
            routes,
            setups,
            mut ready,
            stopped,
        } = Plan::new(&config);
        for (setup, stopped) in setups {
            let env = env(setup.id);
            drop(env.spawn(crate::runtime::run_shard(setup, env.clone(), stopped)));
        }
        let engine = Engine::new(routes, config, stopped, None);
        match collect_starts(&mut ready, engine.shard_count()).await {
            Ok(recovered) => {
                *engine.inner.recovery.lock().expect("recovery") = recovered;
                Ok(engine)
            }
            Err(e) => {
                engine.close().await;
                Err(e)
            }
        }
    }

    fn new(
        routes: Routes,
        config: EngineConfig,
        stopped: Vec<oneshot::Receiver<()>>,
        threads: Option<crate::shard::ShardSet<()>>,
    ) -> Engine {
        Engine {
            inner: Arc::new(Inner {
                routes,
                watermarks: Watermarks::new(config.consumers.len(), config.partitions),
                config,
                recovery: Mutex::new(Vec::new()),
                data_dir_lock: Mutex::new(None),
                threads: Mutex::new(threads),
                stopped: Mutex::new(stopped),
            }),
        }
    }

    /// Stops every shard after the work in flight and closes the logs. Blocks until done.
    pub fn shutdown(&self) {
        for s in 0..self.inner.routes.shard_count() {
            // A full inbox drains: wait for room rather than lose the message and hang in
            // the join below.
            let _ = futures::executor::block_on(self.inner.routes.send(s, ShardMsg::Shutdown));
        }
        if let Some(t) = self.inner.threads.lock().expect("threads").take() {
            let _ = t.join();
        }
        // The logs are closed: another engine may open the directory now.
        self.inner.data_dir_lock.lock().expect("lock").take();
    }

    /// Stops every shard after the work in flight and closes the logs, without blocking
    /// the thread: the way to stop an engine started with [`Engine::start_local`].
    pub async fn close(&self) {
        for s in 0..self.inner.routes.shard_count() {
            let _ = self.inner.routes.send(s, ShardMsg::Shutdown).await;
        }
        let stopped = std::mem::take(&mut *self.inner.stopped.lock().expect("stopped"));
        for shard in stopped {
            let _ = shard.await;
        }
    }

    /// How each partition recovered when the engine opened, by partition.
    pub fn recovery(&self) -> Vec<Recovery> {
        self.inner.recovery.lock().expect("recovery").clone()
    }

    /// Each partition's log end when the engine opened (the offset after its last event):
    /// where a consumer that starts now has caught up with what came before it.
    pub fn ends_at_open(&self) -> std::collections::BTreeMap<u32, u64> {
        self.recovery()
            .iter()
            .map(|r| {
                (
                    r.partition,
                    r.snapshot_offset.unwrap_or(0) + r.replayed_events,
                )
            })
            .collect()
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// The committed-event consumer declared in [`EngineConfig::consumers`] as `name`.
    pub fn consumer(&self, name: &str) -> Result<Consumer, EngineError> {
        let index = self
            .inner
            .config
            .consumers
            .iter()
            .position(|c| c == name)
            .ok_or_else(|| {
                EngineError::Config(format!("consumer {name:?} is not declared in the config"))
            })?;
        Ok(Consumer {
            engine: self.clone(),
            index,
        })
    }

    pub(crate) fn watermarks(&self) -> &Watermarks {
        &self.inner.watermarks
    }

    /// The logs consumers read: every channel partition, then the metadata log.
    pub fn logs(&self) -> Vec<LogId> {
        (0..self.inner.config.partitions)
            .map(LogId::Partition)
            .chain([LogId::Meta])
            .collect()
    }

    /// The retention watermark of a log: no segment at or after it is ever deleted.
    pub fn retention_watermark(&self, log: LogId) -> u64 {
        self.inner.watermarks.watermark(log)
    }

    pub(crate) async fn read_committed(
        &self,
        log: LogId,
        from: u64,
        wait: bool,
    ) -> Result<CommittedPage, EngineError> {
        let (tx, rx) = oneshot::channel();
        let waiter = Waiter {
            from,
            wait,
            reply: tx,
        };
        let routes = &self.inner.routes;
        let (shard, msg) = match log {
            LogId::Meta => (0, ShardMsg::MetaCommitted(waiter)),
            LogId::Partition(p) => {
                self.check_partition(p)?;
                let msg = PartitionMsg::Committed(waiter);
                (routes.owner(p), ShardMsg::Partition { partition: p, msg })
            }
        };
        routes.send(shard, msg).await?;
        rx.await.map_err(|_| Unavailable::ShardStopped)?
    }

    /// Retention: deletes the whole sealed segments of a channel partition's log that lie
    /// before `offset`, but never at or after its retention watermark (the lowest cursor
    /// of the declared consumers) nor after its last durable snapshot (the state before it
    /// then lives only in the snapshot). Returns the log's new first offset. The metadata
    /// log is replayed whole at every start and is never cut.
    pub async fn delete_log_before(&self, partition: u32, offset: u64) -> Result<u64, EngineError> {
        self.check_partition(partition)?;
        let watermark = self.retention_watermark(LogId::Partition(partition));
        let limit = offset.min(watermark);
        let (tx, rx) = oneshot::channel();
        let msg = PartitionMsg::DeleteBefore {
            offset: limit,
            reply: tx,
        };
        let shard = self.inner.routes.owner(partition);
        self.inner
            .routes
            .send(shard, ShardMsg::Partition { partition, msg })
            .await?;
        rx.await.map_err(|_| Unavailable::ShardStopped)?
    }

    fn check_partition(&self, partition: u32) -> Result<(), EngineError> {
        if partition >= self.inner.config.partitions {
            return Err(EngineError::Config(format!(
                "partition {partition} does not exist"
            )));
        }
        Ok(())
    }

    /// Every partition's subscriber index: how many live subscriptions of each user each
    /// shard has, as the partitions count them (each shard's table of connected users is
    /// reported by its first partition). Once every subscription is gone, and the
    /// shards have swept, it is empty. For tests and the simulation, which check that the
    /// index never keeps a subscription that is gone.
    #[doc(hidden)]
    pub async fn subscriber_index(&self) -> Result<Vec<crate::SubscriberCount>, EngineError> {
        let (tx, rx) = oneshot::channel();
        let audit = crate::runtime::audit(self.inner.config.partitions as usize, tx);
        for s in 0..self.inner.routes.shard_count() {
            let a = audit.clone();
            let msg =
                ShardMsg::AllPartitions(Box::new(move || PartitionMsg::Audit { out: a.clone() }));
            self.inner.routes.send(s, msg).await?;
        }
        rx.await.map_err(|_| Unavailable::ShardStopped)?
    }

    /// The number of shards.
    pub fn shard_count(&self) -> usize {
        self.inner.config.shards
    }

    /// The shard the calling thread runs, if it is a shard thread.
    pub fn current_shard() -> Option<usize> {
        CURRENT_SHARD.with(|c| c.get()).map(|s| s as usize)
    }

    /// Runs a task on a shard's executor, beside the engine's own work: an embedding server
    /// runs its accept loop on every shard this way, so each connection lives on one core
    /// with the subscriptions it makes. `make` is sent to the shard and called there; the
    /// future it returns need not be `Send`. The task ends when the shard stops.
    pub async fn spawn_on<F, Fut>(&self, shard: usize, make: F) -> Result<(), EngineError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + 'static,
    {
        let boxed: Box<
            dyn FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>> + Send,
        > = Box::new(move || Box::pin(make()));
        self.inner
            .routes
            .send(shard as u32, ShardMsg::Spawn(boxed))
            .await
    }

    /// Reads a blob (a message body over 64 KiB, say) through the engine's blob store, on
    /// the calling thread's shard or the blob's: in a cluster, a blob this node lacks is
    /// fetched from a peer and kept. For readers beside the engine (the search indexer).
    pub async fn blob(&self, blob: crate::blob::BlobRef) -> Result<Bytes, crate::blob::BlobError> {
        let (reply, answer) = oneshot::channel();
        let shard = self.local_shard(u64::from_le_bytes(blob.hash[..8].try_into().expect("8")));
        let stopped = || crate::blob::BlobError::Io(std::io::Error::other("the engine stopped"));
        self.inner
            .routes
            .send(shard, ShardMsg::ReadBlob { blob, reply })
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    fn local_shard(&self, key: u64) -> u32 {
        CURRENT_SHARD
            .with(|c| c.get())
            .unwrap_or((key % self.inner.routes.shard_count() as u64) as u32)
    }

    async fn meta(
        &self,
        f: impl FnOnce(Reply<MetaOutcome>) -> MetaRequest,
    ) -> Result<MetaOutcome, EngineError> {
        ask(|r| ShardMsg::Meta(f(r)), &self.inner.routes, 0).await
    }

    async fn meta_read<T>(
        &self,
        key: u64,
        f: impl FnOnce(Reply<T>) -> MetaRead,
    ) -> Result<T, EngineError> {
        let shard = self.local_shard(key);
        ask(|r| ShardMsg::MetaRead(f(r)), &self.inner.routes, shard).await
    }

    /// Returns once this node's directory (users, workspaces, channels, files, devices)
    /// holds every metadata event committed before the call, wherever it was decided: on
    /// a single node, once what was decided is published to every shard; in a cluster, a
    /// node that does not lead the directory first passes its read barrier. What a caller
    /// does before answering "not found" in a cluster, where the directory here may lag
    /// the node that just took a write. `MetaNotLeader` when no leader confirms in time.
    pub async fn directory_barrier(&self) -> Result<(), EngineError> {
        self.meta(|reply| MetaRequest::Barrier { reply })
            .await
            .map(drop)
    }

    /// Records an operator's ask to place a cluster on `nodes` (ID and `IP:PORT` between
    /// nodes) and answers its number once it is committed. The engine only keeps it, in the
    /// directory, so that every node reads the asks in one order
    /// ([`Engine::cluster_ask`]); acting on it is the embedder's.
    pub async fn ask_cluster(
        &self,
        nodes: Vec<crate::domain::event::ClusterNode>,
    ) -> Result<u64, EngineError> {
        match self
            .meta(|reply| MetaRequest::AskCluster { nodes, reply })
            .await?
        {
            MetaOutcome::ClusterAsked(number) => Ok(number),
            other => unreachable!("ask_cluster answered {other:?}"),
        }
    }

    /// The last cluster ask this node's directory holds, if any.
    pub async fn cluster_ask(
        &self,
    ) -> Result<Option<crate::domain::event::ClusterAsk>, EngineError> {
        self.meta_read(0, |reply| MetaRead::ClusterAsk { reply })
            .await
    }

    /// Creates an account. The password hash is stored as given.
    pub async fn create_user(
        &self,
        email: &str,
        name: &str,
        password_hash: &str,
    ) -> Result<UserView, EngineError> {
        let (email, name, password_hash) =
            (email.to_owned(), name.to_owned(), password_hash.to_owned());
        match self
            .meta(|reply| MetaRequest::CreateUser {
                email,
                name,
                password_hash,
                reply,
            })
            .await?
        {
            MetaOutcome::User(u) => Ok(u),
            other => unreachable!("create_user answered {other:?}"),
        }
    }

    /// Whether an account exists, answered by the caller's own shard's replica; an
    /// embedder checks it when a credential names a user.
    pub async fn user_exists(&self, user: UserId) -> Result<bool, EngineError> {
        self.credential_live(user, None).await
    }

    /// Whether an account exists and, when a credential is bound to one of its devices
    /// (`API.md` §14), that device is registered and not removed; answered by the caller's
    /// own shard's replica.
    pub async fn credential_live(
        &self,
        user: UserId,
        device: Option<&str>,
    ) -> Result<bool, EngineError> {
        let device = device.map(str::to_owned);
        self.meta_read(user.0, |reply| MetaRead::UserExists {
            user,
            device,
            reply,
        })
        .await
    }

    /// An account by login email, with its password hash, for the embedder's login.
    pub async fn user_by_email(&self, email: &str) -> Result<Option<User>, EngineError> {
        let email = email.to_owned();
        self.meta_read(0, |reply| MetaRead::UserByEmail { email, reply })
            .await
    }

    /// The user and the workspaces they belong to.
    pub async fn me(&self, user: UserId) -> Result<(UserView, Vec<WorkspaceView>), EngineError> {
        self.meta_read(user.0, |reply| MetaRead::Me { user, reply })
            .await
    }

    /// Creates a workspace owned by `user`.
    pub async fn create_workspace(
        &self,
        user: UserId,
        name: &str,
    ) -> Result<WorkspaceView, EngineError> {
        let name = name.to_owned();
        match self
            .meta(|reply| MetaRequest::CreateWorkspace { user, name, reply })
            .await?
        {
            MetaOutcome::Workspace(w) => Ok(w),
            other => unreachable!("create_workspace answered {other:?}"),
        }
    }

    /// Adds a user, by email, to a workspace (owners and admins only).
    pub async fn add_member(
        &self,
        user: UserId,
        workspace: WorkspaceId,
        email: &str,
    ) -> Result<MemberView, EngineError> {
        let email = email.to_owned();
        match self
            .meta(|reply| MetaRequest::AddMember {
                user,
                workspace,
                email,
                reply,
            })
            .await?
        {
            MetaOutcome::Member(m) => Ok(m),
            other => unreachable!("add_member answered {other:?}"),
        }
    }

    /// The members of a workspace the user belongs to.
    pub async fn members(
        &self,
        user: UserId,
        workspace: WorkspaceId,
    ) -> Result<Vec<MemberView>, EngineError> {
        self.meta_read(user.0, |reply| MetaRead::Members {
            user,
            workspace,
            reply,
        })
        .await
    }

    /// Creates a public or private channel; the caller is its first member.
    pub async fn create_channel(
        &self,
        user: UserId,
        workspace: WorkspaceId,
        name: &str,
        kind: ChannelKind,
    ) -> Result<ChannelView, EngineError> {
        let name = name.to_owned();
        match self
            .meta(|reply| MetaRequest::CreateChannel {
                user,
                workspace,
                name,
                kind,
                reply,
            })
            .await?
        {
            MetaOutcome::Channel(c, _) => Ok(c),
            other => unreachable!("create_channel answered {other:?}"),
        }
    }

    /// The DM or group DM of exactly the caller and `users`; `true` if created now. Callers
    /// opening the same set at once all get the one channel, and only once its members are
    /// committed, so the channel can be read and posted to as soon as this returns.
    pub async fn open_dm(
        &self,
        user: UserId,
        workspace: WorkspaceId,
        users: Vec<UserId>,
    ) -> Result<(ChannelView, bool), EngineError> {
        self.open_dm_of(user, workspace, users, false).await
    }

    /// The end-to-end encrypted DM or group DM of exactly the caller and `users`
    /// (`API.md` §14), a different channel from the plain one; otherwise as
    /// [`Engine::open_dm`]. It starts with a `device:added` event for every device its
    /// members have listed.
    pub async fn open_encrypted_dm(
        &self,
        user: UserId,
        workspace: WorkspaceId,
        users: Vec<UserId>,
    ) -> Result<(ChannelView, bool), EngineError> {
        self.open_dm_of(user, workspace, users, true).await
    }

    async fn open_dm_of(
        &self,
        user: UserId,
        workspace: WorkspaceId,
        users: Vec<UserId>,
        encrypted: bool,
    ) -> Result<(ChannelView, bool), EngineError> {
        match self
            .meta(|reply| MetaRequest::OpenDm {
                user,
                workspace,
                users,
                encrypted,
                reply,
            })
            .await?
        {
            MetaOutcome::Channel(c, true) => Ok((c, true)),
            MetaOutcome::Channel(c, false) => Ok((self.channel(user, c.id).await?, false)),
            other => unreachable!("open_dm answered {other:?}"),
        }
    }

    /// Records a file whose bytes are durable in the file store, uploaded by `user` to
    /// `workspace`. The answer comes once the record is durable and every shard knows it.
    pub async fn store_file(
        &self,
        user: UserId,
        workspace: WorkspaceId,
        file: crate::outcome::NewFile,
    ) -> Result<FileView, EngineError> {
        match self
            .meta(|reply| MetaRequest::StoreFile {
                user,
                workspace,
                file: Box::new(file),
                reply,
            })
            .await?
        {
            MetaOutcome::File(f) => Ok(f),
            other => unreachable!("store_file answered {other:?}"),
        }
    }

    /// Deletes a file (its uploader or a workspace admin) and answers it as it was. Its
    /// bytes stay in the file store until the embedder finds them unused
    /// ([`Engine::file_bytes_in_use`]).
    pub async fn delete_file(&self, user: UserId, file: FileId) -> Result<FileView, EngineError> {
        match self
            .meta(|reply| MetaRequest::DeleteFile { user, file, reply })
            .await?
        {
            MetaOutcome::File(f) => Ok(f),
            other => unreachable!("delete_file answered {other:?}"),
        }
    }

    /// A live file, for a caller that holds a credential for this file itself (a signed
    /// link the embedder checked): no user or workspace is checked here.
    pub async fn linked_file(&self, file: FileId) -> Result<FileView, EngineError> {
        self.meta_read(file.0, |reply| MetaRead::LinkedFile { file, reply })
            .await
    }

    /// A live file of a workspace the user belongs to; `NotFound` for a deleted file, an
    /// unknown one, and one of another workspace alike. Who else may read it is the
    /// embedder's rule on top of this.
    pub async fn file(&self, user: UserId, file: FileId) -> Result<FileView, EngineError> {
        self.meta_read(user.0, |reply| MetaRead::File { user, file, reply })
            .await
    }

    /// Records the preview of one kind of a live file: made (its bytes already durable in
    /// the file store) or never to be. `Conflict` if that kind is recorded already.
    pub async fn record_preview(
        &self,
        record: crate::domain::event::PreviewRecord,
    ) -> Result<FileView, EngineError> {
        let record = Box::new(record);
        match self
            .meta(|reply| MetaRequest::RecordPreview { record, reply })
            .await?
        {
            MetaOutcome::File(f) => Ok(f),
            other => unreachable!("record_preview answered {other:?}"),
        }
    }

    /// Live files none of whose previews is decided yet, in ID order, of the media types
    /// `previewable` accepts (the others never get one: listing them would cost every
    /// caller a walk of them).
    pub async fn files_without_previews(
        &self,
        previewable: fn(&str) -> bool,
    ) -> Result<Vec<FileView>, EngineError> {
        self.meta_read(0, |reply| MetaRead::FilesWithoutPreviews {
            previewable,
            reply,
        })
        .await
    }

    /// `NotFound` unless the user is a member of the workspace.
    pub async fn check_member(
        &self,
        user: UserId,
        workspace: WorkspaceId,
    ) -> Result<(), EngineError> {
        self.meta_read(user.0, |reply| MetaRead::InWorkspace {
            user,
            workspace,
            reply,
        })
        .await
    }

    /// The channels where `user` can read a message, not deleted, that carries `file`:
    /// who besides its uploader may read a file (`API.md` §11). Asks every partition.
    pub async fn file_channels(
        &self,
        user: UserId,
        file: FileId,
    ) -> Result<Vec<ChannelId>, EngineError> {
        self.ask_partitions(move |out| PartitionMsg::FileReaders { user, file, out })
            .await
    }

    /// Asks every partition for its part of an answer (`ask` makes a partition's request
    /// around the gatherer they share) and answers all the parts, in no order.
    async fn ask_partitions<T: OfChannel + Send + 'static>(
        &self,
        ask: impl Fn(Arc<Gather<T>>) -> PartitionMsg + Clone + Send + 'static,
    ) -> Result<Vec<T>, EngineError> {
        let (tx, rx) = oneshot::channel();
        let gather = crate::runtime::gather(self.inner.config.partitions as usize, tx);
        for s in 0..self.inner.routes.shard_count() {
            let (g, ask) = (gather.clone(), ask.clone());
            let msg = ShardMsg::AllPartitions(Box::new(move || ask(g.clone())));
            self.inner.routes.send(s, msg).await?;
        }
        rx.await.map_err(|_| Unavailable::ShardStopped)?
    }

    /// Whether a live file has the bytes with this SHA-256, on the caller's shard's replica.
    pub async fn file_bytes_in_use(&self, sha256: [u8; 32]) -> Result<bool, EngineError> {
        self.meta_read(0, |reply| MetaRead::FileBytesInUse { sha256, reply })
            .await
    }

    /// The channels the user can see in a workspace: every public one and the others they
    /// are in.
    pub async fn channels(
        &self,
        user: UserId,
        workspace: WorkspaceId,
    ) -> Result<Vec<ChannelView>, EngineError> {
        self.members(user, workspace).await?;
        self.scatter(user, Some(workspace)).await
    }

    /// The channels the user is a member of, in every workspace.
    pub async fn user_channels(&self, user: UserId) -> Result<Vec<ChannelView>, EngineError> {
        self.scatter(user, None).await
    }

    async fn scatter(
        &self,
        user: UserId,
        workspace: Option<WorkspaceId>,
    ) -> Result<Vec<ChannelView>, EngineError> {
        self.ask_partitions(move |out| PartitionMsg::Visible {
            user,
            workspace,
            out,
        })
        .await
    }

    /// A channel the user can see (a member, or a public channel of their workspace),
    /// with its last committed seq.
    pub async fn channel(
        &self,
        user: UserId,
        channel: ChannelId,
    ) -> Result<ChannelView, EngineError> {
        match self.read(user, channel, ChannelRead::Info).await? {
            ReadOutcome::Channel(c) => Ok(c),
            other => unreachable!("channel answered {other:?}"),
        }
    }

    fn partition_shard(&self, channel: ChannelId) -> Result<(u32, u32), EngineError> {
        let p = partition_of(channel);
        if p >= self.inner.config.partitions {
            return Err(DomainError::NotFound("channel").into());
        }
        Ok((p, self.inner.routes.owner(p)))
    }

    async fn command(
        &self,
        user: UserId,
        channel: ChannelId,
        cmd: ChannelCommand,
    ) -> Result<ChannelOutcome, EngineError> {
        let (partition, shard) = self.partition_shard(channel)?;
        ask(
            |reply| ShardMsg::Partition {
                partition,
                msg: PartitionMsg::Command {
                    user,
                    channel,
                    cmd,
                    reply,
                },
            },
            &self.inner.routes,
            shard,
        )
        .await
    }

    async fn read(
        &self,
        user: UserId,
        channel: ChannelId,
        read: ChannelRead,
    ) -> Result<ReadOutcome, EngineError> {
        let (partition, shard) = self.partition_shard(channel)?;
        ask(
            |reply| ShardMsg::Partition {
                partition,
                msg: PartitionMsg::Read {
                    user,
                    channel,
                    read,
                    reply,
                },
            },
            &self.inner.routes,
            shard,
        )
        .await
    }

    /// Posts a message (or a thread reply). Returns the message and whether it is new: a
    /// repeated `client_msg_id` from the same user returns the first message.
    pub async fn post(
        &self,
        user: UserId,
        channel: ChannelId,
        text: &str,
        client_msg_id: Option<&str>,
        thread: Option<MessageId>,
    ) -> Result<(MessageView, bool), EngineError> {
        self.post_with_files(user, channel, text, client_msg_id, thread, Vec::new())
            .await
    }

    /// Posts a message with files (at most 10, each a live file the user uploaded to the
    /// channel's workspace; `text` may then be empty). Otherwise as [`Engine::post`].
    pub async fn post_with_files(
        &self,
        user: UserId,
        channel: ChannelId,
        text: &str,
        client_msg_id: Option<&str>,
        thread: Option<MessageId>,
        files: Vec<FileId>,
    ) -> Result<(MessageView, bool), EngineError> {
        let content = Content::Text(text.to_owned());
        self.post_content(user, channel, content, client_msg_id, thread, files)
            .await
    }

    /// Posts text or, in an encrypted channel, ciphertext (`API.md` §14); otherwise as
    /// [`Engine::post_with_files`].
    pub async fn post_content(
        &self,
        user: UserId,
        channel: ChannelId,
        content: Content,
        client_msg_id: Option<&str>,
        thread: Option<MessageId>,
        files: Vec<FileId>,
    ) -> Result<(MessageView, bool), EngineError> {
        let out = self
            .command(
                user,
                channel,
                ChannelCommand::Post {
                    content,
                    client_msg_id: client_msg_id.map(str::to_owned),
                    thread,
                    files: (!files.is_empty()).then(|| Box::new(files)),
                },
            )
            .await?;
        Ok((
            out.message.expect("a post answers its message"),
            out.created,
        ))
    }

    /// Edits a message (author only).
    pub async fn edit(
        &self,
        user: UserId,
        message: MessageId,
        text: &str,
    ) -> Result<MessageView, EngineError> {
        self.edit_content(user, message, Content::Text(text.to_owned()))
            .await
    }

    /// Replaces a message's text or, in an encrypted channel, its ciphertext (author only).
    pub async fn edit_content(
        &self,
        user: UserId,
        message: MessageId,
        content: Content,
    ) -> Result<MessageView, EngineError> {
        let out = self
            .command(
                user,
                message.channel,
                ChannelCommand::Edit { message, content },
            )
            .await?;
        Ok(out.message.expect("an edit answers its message"))
    }

    /// Deletes a message (author, channel creator, or workspace admin).
    pub async fn delete(&self, user: UserId, message: MessageId) -> Result<(), EngineError> {
        self.command(user, message.channel, ChannelCommand::Delete { message })
            .await
            .map(drop)
    }

    /// Adds or removes the user's reaction.
    pub async fn react(
        &self,
        user: UserId,
        message: MessageId,
        emoji: &str,
        add: bool,
    ) -> Result<(), EngineError> {
        self.command(
            user,
            message.channel,
            ChannelCommand::React {
                message,
                emoji: emoji.to_owned(),
                add,
            },
        )
        .await
        .map(drop)
    }

    /// Tells the channel's other members' subscribers that the user is typing. Ephemeral:
    /// never logged, never replayed, dropped rather than queued when a shard is busy. A
    /// subscriber whose channel is not live yet (held, or catching up) gets it after the
    /// catch-up.
    pub async fn typing(&self, user: UserId, channel: ChannelId) -> Result<(), EngineError> {
        let (partition, shard) = self.partition_shard(channel)?;
        ask(
            |reply| ShardMsg::Partition {
                partition,
                msg: PartitionMsg::Typing {
                    user,
                    channel,
                    reply,
                },
            },
            &self.inner.routes,
            shard,
        )
        .await
    }

    /// Marks a channel read up to `seq` (`API.md` §9) and answers the caller's read state.
    /// The marker only moves forward: a `seq` at or below it changes nothing and answers
    /// the marker as it stands. A `seq` above the channel's last is refused (`Invalid`); a
    /// channel the caller is not a member of is `NotFound`. A move is durable before the
    /// answer, is not a channel event (no seq), and every connection of the caller gets a
    /// `read` frame.
    pub async fn mark_read(
        &self,
        user: UserId,
        channel: ChannelId,
        seq: u64,
    ) -> Result<ReadView, EngineError> {
        let (partition, shard) = self.partition_shard(channel)?;
        ask(
            |reply| ShardMsg::Partition {
                partition,
                msg: PartitionMsg::MarkRead {
                    user,
                    channel,
                    seq,
                    reply,
                },
            },
            &self.inner.routes,
            shard,
        )
        .await
    }

    /// The caller's read state in every channel of the workspace they are a member of,
    /// in channel order: at most `limit` after the channel `after`, and the channel to
    /// continue after when there are more. No message is walked: each channel's counts
    /// come from its indexes.
    pub async fn unreads(
        &self,
        user: UserId,
        workspace: WorkspaceId,
        after: Option<ChannelId>,
        limit: usize,
    ) -> Result<(Vec<ReadView>, Option<ChannelId>), EngineError> {
        self.meta_read(user.0, |reply| MetaRead::InWorkspace {
            user,
            workspace,
            reply,
        })
        .await?;
        let mut reads = self
            .ask_partitions(move |out| PartitionMsg::Unreads {
                user,
                workspace,
                after,
                limit,
                out,
            })
            .await?;
        let next = (reads.len() > limit).then(|| {
            reads.truncate(limit);
            reads.last().map(|r| r.channel_id)
        });
        Ok((reads, next.flatten()))
    }

    /// What the push sender checks before pushing message `id` to `users`, for all of them
    /// in one round: the message as it is now, and for each user (in order) whether they
    /// are still a member of its channel, their read marker there, and their unread
    /// messages over all their channels. Costs one request to the channel's partition and
    /// one to every partition for the totals, however many users; no access check (for
    /// the engine's own consumers).
    pub async fn push_checks(
        &self,
        id: MessageId,
        users: Vec<UserId>,
    ) -> Result<PushChecks, EngineError> {
        let (partition, shard) = self.partition_shard(id.channel)?;
        let users = Arc::new(users);
        let asked = users.clone();
        let here = ask(
            |reply| ShardMsg::Partition {
                partition,
                msg: PartitionMsg::PushChecks {
                    channel: id.channel,
                    seq: id.seq,
                    users: asked,
                    reply,
                },
            },
            &self.inner.routes,
            shard,
        );
        let ((message, members), totals) =
            futures::future::try_join(here, self.unread_totals(users)).await?;
        let recipients = members
            .into_iter()
            .zip(totals)
            .map(|((member, read_seq), unread)| PushRecipient {
                member,
                read_seq,
                unread,
            })
            .collect();
        Ok(PushChecks {
            message,
            recipients,
        })
    }

    /// Each user's unread messages over all their channels, in the order of `users`.
    async fn unread_totals(&self, users: Arc<Vec<UserId>>) -> Result<Vec<u64>, EngineError> {
        let (tx, rx) = oneshot::channel();
        let partitions = self.inner.config.partitions as usize;
        let out = crate::runtime::sum_gather(partitions, users.len(), tx);
        for s in 0..self.inner.routes.shard_count() {
            let (out, users) = (out.clone(), users.clone());
            let ask = move || PartitionMsg::UnreadTotals {
                users: users.clone(),
                out: out.clone(),
            };
            let msg = ShardMsg::AllPartitions(Box::new(ask));
            self.inner.routes.send(s, msg).await?;
        }
        rx.await.map_err(|_| Unavailable::ShardStopped)?
    }

    /// Joins a public channel.
    pub async fn join(&self, user: UserId, channel: ChannelId) -> Result<(), EngineError> {
        self.command(user, channel, ChannelCommand::Join)
            .await
            .map(drop)
    }

    /// Adds a workspace member to a channel.
    pub async fn add_channel_member(
        &self,
        user: UserId,
        channel: ChannelId,
        target: UserId,
    ) -> Result<(), EngineError> {
        self.command(user, channel, ChannelCommand::AddMember { user: target })
            .await
            .map(drop)
    }

    /// Removes a member from a channel (themselves, or by the creator or an admin).
    pub async fn remove_channel_member(
        &self,
        user: UserId,
        channel: ChannelId,
        target: UserId,
    ) -> Result<(), EngineError> {
        self.command(user, channel, ChannelCommand::RemoveMember { user: target })
            .await
            .map(drop)
    }

    /// Top-level messages, newest first, before a cursor.
    pub async fn history(
        &self,
        user: UserId,
        channel: ChannelId,
        before: Option<u64>,
        limit: usize,
    ) -> Result<MessagePage, EngineError> {
        let limit = validate_limit(limit)?;
        match self
            .read(user, channel, ChannelRead::History { before, limit })
            .await?
        {
            ReadOutcome::Page(messages, next_cursor) => Ok(MessagePage {
                messages,
                next_cursor,
            }),
            other => unreachable!("history answered {other:?}"),
        }
    }

    /// A thread's replies, oldest first, after a cursor.
    pub async fn replies(
        &self,
        user: UserId,
        root: MessageId,
        after: Option<u64>,
        limit: usize,
    ) -> Result<MessagePage, EngineError> {
        let limit = validate_limit(limit)?;
        match self
            .read(
                user,
                root.channel,
                ChannelRead::Replies { root, after, limit },
            )
            .await?
        {
            ReadOutcome::Page(messages, next_cursor) => Ok(MessagePage {
                messages,
                next_cursor,
            }),
            other => unreachable!("replies answered {other:?}"),
        }
    }

    /// One message.
    pub async fn message(&self, user: UserId, id: MessageId) -> Result<MessageView, EngineError> {
        self.one_message(user, id, false).await
    }

    /// A message search found, read by search's rule (`API.md` §12): the caller's channels
    /// and their workspace's public channels, joined or not.
    pub async fn found_message(
        &self,
        user: UserId,
        id: MessageId,
    ) -> Result<MessageView, EngineError> {
        self.one_message(user, id, true).await
    }

    async fn one_message(
        &self,
        user: UserId,
        id: MessageId,
        found: bool,
    ) -> Result<MessageView, EngineError> {
        match self
            .read(user, id.channel, ChannelRead::Message { id, found })
            .await?
        {
            ReadOutcome::Message(m) => Ok(m),
            other => unreachable!("message answered {other:?}"),
        }
    }

    /// Every body a message had, oldest first, with its time (in an encrypted channel, each
    /// with its ciphertext).
    pub async fn versions(
        &self,
        user: UserId,
        id: MessageId,
    ) -> Result<Vec<crate::view::VersionView>, EngineError> {
        match self
            .read(user, id.channel, ChannelRead::Versions { id })
            .await?
        {
            ReadOutcome::Versions(v) => Ok(v),
            other => unreachable!("versions answered {other:?}"),
        }
    }

    /// Sets the user's presence mode (`API.md` §10) at their home shard, and answers their
    /// own presence as others see it, with the mode. `dnd_until_us` (microseconds since the
    /// Unix epoch) ends a `dnd` mode, when the mode returns to `auto`; it is ignored for
    /// other modes. Presence is never logged: a restart forgets every mode.
    pub async fn set_presence(
        &self,
        user: UserId,
        mode: crate::presence::Mode,
        dnd_until_us: Option<u64>,
    ) -> Result<crate::presence::OwnPresence, EngineError> {
        let shard = crate::presence::home_shard(user, self.inner.routes.shard_count());
        let dnd_until_us = dnd_until_us.filter(|_| mode == crate::presence::Mode::Dnd);
        let (presence, mode, dnd_until_us) = ask(
            |reply| ShardMsg::PresenceMode {
                user,
                mode,
                dnd_until_us,
                reply,
            },
            &self.inner.routes,
            shard,
        )
        .await?;
        Ok(crate::presence::OwnPresence {
            presence,
            mode,
            dnd_until_us,
        })
    }

    /// What `users` show, as `asker` sees them, for the members of a workspace the asker
    /// belongs to: users who are not members of it are left out (the answer keeps the
    /// order asked, once each). At most [`crate::presence::PRESENCE_QUERY_MAX`] users.
    pub async fn presence(
        &self,
        asker: UserId,
        workspace: WorkspaceId,
        users: &[UserId],
    ) -> Result<Vec<(UserId, crate::presence::Presence)>, EngineError> {
        use crate::presence::PRESENCE_QUERY_MAX;
        if users.len() > PRESENCE_QUERY_MAX {
            return Err(DomainError::TooMany(format!(
                "at most {PRESENCE_QUERY_MAX} user ids per query, not {}",
                users.len()
            ))
            .into());
        }
        let members: std::collections::HashSet<UserId> = self
            .members(asker, workspace)
            .await?
            .into_iter()
            .map(|m| m.id)
            .collect();
        let mut wanted: Vec<UserId> = Vec::new();
        for u in users {
            if members.contains(u) && !wanted.contains(u) {
                wanted.push(*u);
            }
        }
        let found: std::collections::HashMap<UserId, crate::presence::Presence> = self
            .ask_presence_owners(Some(asker), &wanted)
            .await?
            .into_iter()
            .map(|(u, p, _)| (u, p))
            .collect();
        Ok(wanted
            .into_iter()
            .filter_map(|u| found.get(&u).map(|p| (u, *p)))
            .collect())
    }

    /// What decides a push for each of `users` (`API.md` §13), from their presence owners:
    /// for the notification decider, which has checked they are members of the message's
    /// channel. In the order asked; at most [`crate::presence::PRESENCE_QUERY_MAX`].
    pub async fn reach(
        &self,
        users: &[UserId],
    ) -> Result<Vec<(UserId, crate::presence::Reach)>, EngineError> {
        use crate::presence::{Reach, PRESENCE_QUERY_MAX};
        if users.len() > PRESENCE_QUERY_MAX {
            return Err(DomainError::TooMany(format!("at most {PRESENCE_QUERY_MAX} users")).into());
        }
        let found: std::collections::HashMap<UserId, Reach> = self
            .ask_presence_owners(None, users)
            .await?
            .into_iter()
            .map(|(u, _, bits)| (u, Reach::from_bits(bits)))
            .collect();
        Ok(users
            .iter()
            .map(|u| (*u, found.get(u).copied().unwrap_or_default()))
            .collect())
    }

    /// Asks each user's presence owner (their home shard) about them, all owners at once.
    async fn ask_presence_owners(
        &self,
        asker: Option<UserId>,
        users: &[UserId],
    ) -> Result<crate::runtime::Presences, EngineError> {
        let shards = self.inner.routes.shard_count();
        let mut by_shard: std::collections::BTreeMap<u32, Vec<UserId>> = Default::default();
        for u in users {
            let home = crate::presence::home_shard(*u, shards);
            by_shard.entry(home).or_default().push(*u);
        }
        let (tx, rx) = oneshot::channel();
        let gather = crate::runtime::presence_gather(by_shard.len(), Vec::new(), tx);
        for (shard, users) in by_shard {
            let out = gather.clone();
            let msg = ShardMsg::PresenceQuery { asker, users, out };
            self.inner.routes.send(shard, msg).await?;
        }
        rx.await.map_err(|_| Unavailable::ShardStopped)?
    }

    /// Subscribes to the events of every channel the user is in, live from now. From a
    /// shard thread the subscriber lives on that shard; otherwise on the user's home shard.
    pub async fn subscribe(&self, user: UserId) -> Result<Subscription, EngineError> {
        self.subscribe_with(user, None, false).await
    }

    /// Subscribes without delivering anything until [`Subscription::start`], which says
    /// where each channel resumes. Frames committed in between are not lost: `start`
    /// fetches them from the log. Typing meanwhile is kept (the latest per typist and
    /// channel, at most [`HELD_EPHEMERAL_FRAMES_MAX`]) and follows each channel's catch-up. A server uses this when a client may send `resume` as
    /// its first frame.
    pub async fn subscribe_held(&self, user: UserId) -> Result<Subscription, EngineError> {
        self.subscribe_with(user, None, true).await
    }

    /// [`Engine::subscribe_held`] for a credential bound to an end-to-end encryption
    /// device (`API.md` §14): the subscription also gets the device's to-device messages,
    /// the unacknowledged ones first (a window of [`crate::domain::e2ee::TO_DEVICE_WINDOW`]
    /// at a time, refilled as they are acknowledged), its `e2ee:keys_low` signals, and is
    /// cut off with [`crate::queue::Cutoff::Revoked`] when the device is removed.
    pub async fn subscribe_held_device(
        &self,
        user: UserId,
        device: Option<&str>,
    ) -> Result<Subscription, EngineError> {
        self.subscribe_with(user, device.map(Arc::from), true).await
    }

    async fn subscribe_with(
        &self,
        user: UserId,
        device: Option<Arc<str>>,
        held: bool,
    ) -> Result<Subscription, EngineError> {
        let shard = self.local_shard(user.0);
        let (queue, frames) =
            crate::queue::subscriber_queue(self.inner.config.subscriber_queue_frames);
        let info = ask(
            |reply| ShardMsg::Subscribe {
                user,
                device,
                queue,
                held,
                reply,
            },
            &self.inner.routes,
            shard,
        )
        .await?;
        Ok(Subscription {
            engine: self.clone(),
            info,
            frames,
        })
    }
}

/// Refuses a configuration no engine can run with.
fn validate(config: &EngineConfig) -> Result<(), EngineError> {
    if config.shards == 0 || config.partitions == 0 {
        return Err(EngineError::Config(
            "shards and partitions must be positive".into(),
        ));
    }
    if config.partitions > 1 << crate::domain::meta::PARTITION_BITS {
        return Err(EngineError::Config("too many partitions".into()));
    }
    Ok(())
}

/// The inboxes, routes and start-up channels of a node's shards, before they run.
struct Plan {
    routes: Routes,
    /// Each shard's setup, and the sender it tells when it stopped.
    setups: Vec<(ShardSetup, oneshot::Sender<()>)>,
    ready: futures::channel::mpsc::UnboundedReceiver<(u32, Started)>,
    stopped: Vec<oneshot::Receiver<()>>,
}

impl Plan {
    fn new(config: &EngineConfig) -> Plan {
        let mut senders = Vec::new();
        let mut receivers = Vec::new();
        for _ in 0..config.shards {
            let (requests, requests_rx) = Inbox::new(config.inbox_capacity);
            let (events, events_rx) = Inbox::new(config.inbox_capacity);
            senders.push(ShardSenders { requests, events });
            receivers.push(ShardInboxes {
                requests: requests_rx,
                events: events_rx,
            });
        }
        let routes = Routes {
            shards: Arc::new(senders),
            partitions: config.partitions,
        };
        let (ready_tx, ready) = futures::channel::mpsc::unbounded();
        let mut meta_out = Vec::new();
        let mut meta_in = vec![None];
        for _ in 1..config.shards {
            let (tx, rx) = oneshot::channel();
            meta_out.push(tx);
            meta_in.push(Some(rx));
        }
        let mut setups = Vec::new();
        let mut stopped = Vec::new();
        for (i, inboxes) in receivers.into_iter().enumerate() {
            let (stopped_tx, stopped_rx) = oneshot::channel();
            stopped.push(stopped_rx);
            let setup = ShardSetup {
                id: i as u32,
                routes: routes.clone(),
                inboxes,
                config: config.clone(),
                meta_in: meta_in[i].take(),
                meta_out: if i == 0 {
                    std::mem::take(&mut meta_out)
                } else {
                    Vec::new()
                },
                ready: ready_tx.clone(),
            };
            setups.push((setup, stopped_tx));
        }
        Plan {
            routes,
            setups,
            ready,
            stopped,
        }
    }
}

/// Waits for every shard to report its start, and returns the recovery of every
/// partition, or the error that stopped the start. Shard 0's error comes first: when it
/// fails (a layout that does not fit, a damaged metadata log), the others fail only
/// because it did.
async fn collect_starts(
    ready: &mut futures::channel::mpsc::UnboundedReceiver<(u32, Started)>,
    shards: usize,
) -> Result<Vec<Recovery>, EngineError> {
    use futures::StreamExt;
    let mut recovered = Vec::new();
    let mut failures = Vec::new();
    for _ in 0..shards {
        match ready.next().await {
            Some((_, Ok(r))) => recovered.extend(r),
            Some((shard, Err(e))) => failures.push((shard, e)),
            // A shard thread died without reporting.
            None => failures.push((u32::MAX, Unavailable::ShardDidNotStart.into())),
        }
    }
    failures.sort_by_key(|(shard, _)| *shard);
    match failures.into_iter().next() {
        Some((_, e)) => Err(e),
        None => {
            recovered.sort_by_key(|r| r.partition);
            Ok(recovered)
        }
    }
}
