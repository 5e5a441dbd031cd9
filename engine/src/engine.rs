//! The embeddable API: [`Engine`] opens the shards over a data directory, and every call
//! is a request to the shard that owns the data, answered once the answer is durable.
//!
//! API boundary: callers pass the authenticated user's ID and the IDs they name; the engine
//! resolves the workspace and checks membership itself (see the isolation invariant in
//! [`crate::domain`]). Transport, authentication and password hashing are the embedder's.
//! An `Engine` is `Send + Sync` and cheap to clone; it can be called from any thread,
//! including the shards' own.

use crate::blob::BlobStore;
use crate::consumer::{CommittedPage, Consumer, LogId, Waiter, Watermarks};
use crate::domain::channel::ChannelCommand;
use crate::domain::meta::{partition_of, User};
use crate::domain::{ChannelKind, DomainError, PAGE_LIMIT_MAX};
use crate::ids::{ChannelId, MessageId, UserId, WorkspaceId};
use crate::queue::{FrameReceiver, Inbox};
use crate::runtime::dispatch::SubscriptionInfo;
use crate::runtime::meta::{MetaRead, MetaRequest};
use crate::runtime::{
    ChannelRead, Gather, PartitionMsg, Reply, Routes, ShardMsg, ShardSetup, CURRENT_SHARD,
};
use crate::view::{ChannelView, MemberView, MessageView, UserView, WorkspaceView};
use bytes::Bytes;
use futures::channel::oneshot;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

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
    /// The size at which a log segment is sealed.
    pub segment_bytes_max: u64,
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
            segment_bytes_max: 64 * 1024 * 1024,
            pin: true,
            observer: ObserverSlot::default(),
            snapshot_every_events: 100_000,
            consumers: Vec::new(),
        }
    }
}

/// Why an engine call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The request was refused by the domain rules.
    #[error(transparent)]
    Domain(#[from] DomainError),
    /// The engine cannot serve this now: shutting down, or a partition stopped after a
    /// storage failure.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Stored data failed verification.
    #[error("corrupt data: {0}")]
    Corrupt(String),
    /// The data directory cannot be used.
    #[error("i/o error: {0}")]
    Io(String),
    /// The configuration does not fit the data directory.
    #[error("configuration: {0}")]
    Config(String),
}

/// The outcome of a metadata command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaOutcome {
    /// A created user.
    User(UserView),
    /// A created workspace.
    Workspace(WorkspaceView),
    /// An added member.
    Member(MemberView),
    /// A channel, and whether it was created by this call.
    Channel(ChannelView, bool),
}

/// The outcome of a channel command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelOutcome {
    /// The seq of the event stored, if one was.
    pub seq: Option<u64>,
    /// The message the command is about, as it stands after it.
    pub message: Option<MessageView>,
    /// Whether something new was stored (false for a repeated `client_msg_id`).
    pub created: bool,
}

/// The outcome of a channel read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadOutcome {
    /// A page of messages and the cursor of the next page.
    Page(Vec<MessageView>, Option<u64>),
    /// One message.
    Message(MessageView),
    /// A message's texts, oldest first, with RFC 3339 times.
    Versions(Vec<(String, String)>),
    /// A channel with its last committed seq.
    Channel(ChannelView),
}

/// A page of messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessagePage {
    /// The messages.
    pub messages: Vec<MessageView>,
    /// The cursor of the next page (a seq), if there is one.
    pub next_cursor: Option<u64>,
}

struct Inner {
    routes: Routes,
    config: EngineConfig,
    watermarks: Watermarks,
    recovery: Mutex<Vec<Recovery>>,
    threads: Mutex<Option<crate::shard::ShardSet<()>>>,
}

/// How one partition recovered when the engine opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovery {
    /// The partition.
    pub partition: u32,
    /// The log offset up to which the state came from a snapshot, if one was used.
    pub snapshot_offset: Option<u64>,
    /// Events replayed from the log (after the snapshot, or all of them).
    pub replayed_events: u64,
    /// How long the partition took to open, snapshot and replay included.
    pub took: std::time::Duration,
}

/// A running engine. Clones share it.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

/// Ephemeral frames (typing) a subscription keeps while it is held or catching up, to
/// deliver once its channel is live: the latest per typist and channel, and past this many
/// the newer are dropped.
pub const HELD_EPHEMERAL_FRAMES_MAX: usize = 64;

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
        rx.await
            .map_err(|_| EngineError::Unavailable("the shard stopped".into()))
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let msg = ShardMsg::Unsubscribe { sub: self.info.id };
        let _ = self.engine.inner.routes.shards[self.info.shard as usize].try_send(msg);
    }
}

async fn ask<T>(
    f: impl FnOnce(Reply<T>) -> ShardMsg,
    routes: &Routes,
    shard: u32,
) -> Result<T, EngineError> {
    let (tx, rx) = oneshot::channel();
    routes.send(shard, f(tx)).await?;
    rx.await
        .map_err(|_| EngineError::Unavailable("the shard stopped".into()))?
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
    pub fn open(config: EngineConfig) -> Result<Engine, EngineError> {
        if config.shards == 0 || config.partitions == 0 {
            return Err(EngineError::Config(
                "shards and partitions must be positive".into(),
            ));
        }
        if config.partitions > 1 << crate::domain::meta::PARTITION_BITS {
            return Err(EngineError::Config("too many partitions".into()));
        }
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| EngineError::Io(format!("{}: {e}", config.data_dir.display())))?;
        check_layout(&config)?;
        let snapshots = config.data_dir.join("snapshots");
        std::fs::create_dir_all(&snapshots)
            .map_err(|e| EngineError::Io(format!("{}: {e}", snapshots.display())))?;
        let blobs = Arc::new(
            BlobStore::open(&config.data_dir.join("blobs"))
                .map_err(|e| EngineError::Io(format!("blob store: {e}")))?,
        );
        let mut senders = Vec::new();
        let mut receivers = Vec::new();
        for _ in 0..config.shards {
            let (tx, rx) = Inbox::new(config.inbox_capacity);
            senders.push(tx);
            receivers.push(rx);
        }
        let routes = Routes {
            shards: Arc::new(senders),
            partitions: config.partitions,
        };
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let mut meta_out = Vec::new();
        let mut meta_in = vec![None];
        for _ in 1..config.shards {
            let (tx, rx) = std::sync::mpsc::channel();
            meta_out.push(tx);
            meta_in.push(Some(rx));
        }
        let mut setups: Vec<Option<ShardSetup>> = Vec::new();
        for (i, inbox) in receivers.into_iter().enumerate() {
            let (unused_tx, unused_rx) = std::sync::mpsc::channel();
            drop(unused_tx);
            setups.push(Some(ShardSetup {
                id: i as u32,
                routes: routes.clone(),
                inbox,
                config: config.clone(),
                blobs: blobs.clone(),
                meta_in: meta_in[i].take().unwrap_or(unused_rx),
                meta_out: if i == 0 {
                    std::mem::take(&mut meta_out)
                } else {
                    Vec::new()
                },
                ready: ready_tx.clone(),
            }));
        }
        drop(ready_tx);
        let setups = Arc::new(Mutex::new(setups));
        let threads = crate::shard::ShardSet::start(config.shards, config.pin, move |ctx| {
            let setup = setups.lock().expect("setups")[ctx.id]
                .take()
                .expect("each shard starts once");
            crate::runtime::run_shard(setup)
        })
        .map_err(|e| EngineError::Unavailable(format!("starting shards: {e}")))?;
        let engine = Engine {
            inner: Arc::new(Inner {
                routes,
                watermarks: Watermarks::new(config.consumers.len(), config.partitions),
                config,
                recovery: Mutex::new(Vec::new()),
                threads: Mutex::new(Some(threads)),
            }),
        };
        for _ in 0..engine.inner.config.shards {
            match ready_rx.recv() {
                Ok(Ok((_, recovered))) => {
                    let mut all = engine.inner.recovery.lock().expect("recovery");
                    all.extend(recovered);
                    all.sort_by_key(|r| r.partition);
                }
                Ok(Err(e)) => {
                    engine.shutdown();
                    return Err(e);
                }
                Err(_) => {
                    engine.shutdown();
                    return Err(EngineError::Unavailable("a shard failed to start".into()));
                }
            }
        }
        Ok(engine)
    }

    /// Stops every shard after the work in flight and closes the logs. Blocks until done.
    pub fn shutdown(&self) {
        for s in self.inner.routes.shards.iter() {
            // A full inbox drains: wait for room rather than lose the message and hang in
            // the join below.
            let _ = futures::executor::block_on(s.send(ShardMsg::Shutdown));
        }
        if let Some(t) = self.inner.threads.lock().expect("threads").take() {
            let _ = t.join();
        }
    }

    /// How each partition recovered when the engine opened, by partition.
    pub fn recovery(&self) -> Vec<Recovery> {
        self.inner.recovery.lock().expect("recovery").clone()
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
    ) -> Result<CommittedPage, EngineError> {
        let (tx, rx) = oneshot::channel();
        let waiter = Waiter { from, reply: tx };
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
        rx.await
            .map_err(|_| EngineError::Unavailable("the shard stopped".into()))?
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
        rx.await
            .map_err(|_| EngineError::Unavailable("the shard stopped".into()))?
    }

    fn check_partition(&self, partition: u32) -> Result<(), EngineError> {
        if partition >= self.inner.config.partitions {
            return Err(EngineError::Config(format!(
                "partition {partition} does not exist"
            )));
        }
        Ok(())
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
        self.meta_read(user.0, |reply| MetaRead::UserExists { user, reply })
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
        match self
            .meta(|reply| MetaRequest::OpenDm {
                user,
                workspace,
                users,
                reply,
            })
            .await?
        {
            MetaOutcome::Channel(c, true) => Ok((c, true)),
            MetaOutcome::Channel(c, false) => Ok((self.channel(user, c.id).await?, false)),
            other => unreachable!("open_dm answered {other:?}"),
        }
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
        let (tx, rx) = oneshot::channel();
        let gather = Gather::new(self.inner.config.partitions as usize, tx);
        for s in 0..self.inner.routes.shard_count() {
            let g = gather.clone();
            let msg = ShardMsg::AllPartitions(Box::new(move || PartitionMsg::Visible {
                user,
                workspace,
                out: g.clone(),
            }));
            self.inner.routes.send(s, msg).await?;
        }
        rx.await
            .map_err(|_| EngineError::Unavailable("a shard stopped".into()))?
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
        let out = self
            .command(
                user,
                channel,
                ChannelCommand::Post {
                    text: text.to_owned(),
                    client_msg_id: client_msg_id.map(str::to_owned),
                    thread,
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
        let out = self
            .command(
                user,
                message.channel,
                ChannelCommand::Edit {
                    message,
                    text: text.to_owned(),
                },
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
        match self
            .read(user, id.channel, ChannelRead::Message { id })
            .await?
        {
            ReadOutcome::Message(m) => Ok(m),
            other => unreachable!("message answered {other:?}"),
        }
    }

    /// Every text a message had, oldest first, with its time.
    pub async fn versions(
        &self,
        user: UserId,
        id: MessageId,
    ) -> Result<Vec<(String, String)>, EngineError> {
        match self
            .read(user, id.channel, ChannelRead::Versions { id })
            .await?
        {
            ReadOutcome::Versions(v) => Ok(v),
            other => unreachable!("versions answered {other:?}"),
        }
    }

    /// Subscribes to the events of every channel the user is in, live from now. From a
    /// shard thread the subscriber lives on that shard; otherwise on the user's home shard.
    pub async fn subscribe(&self, user: UserId) -> Result<Subscription, EngineError> {
        self.subscribe_with(user, false).await
    }

    /// Subscribes without delivering anything until [`Subscription::start`], which says
    /// where each channel resumes. Frames committed in between are not lost: `start`
    /// fetches them from the log. Typing meanwhile is kept (the latest per typist and
    /// channel, at most [`HELD_EPHEMERAL_FRAMES_MAX`]) and follows each channel's catch-up. A server uses this when a client may send `resume` as
    /// its first frame.
    pub async fn subscribe_held(&self, user: UserId) -> Result<Subscription, EngineError> {
        self.subscribe_with(user, true).await
    }

    async fn subscribe_with(&self, user: UserId, held: bool) -> Result<Subscription, EngineError> {
        let shard = self.local_shard(user.0);
        let (queue, frames) =
            crate::queue::subscriber_queue(self.inner.config.subscriber_queue_frames);
        let info = ask(
            |reply| ShardMsg::Subscribe {
                user,
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

/// Records the partition count in the data directory on first open and refuses a different
/// one later: channel IDs carry their partition.
fn check_layout(config: &EngineConfig) -> Result<(), EngineError> {
    let path = config.data_dir.join("ENGINE");
    let want = format!("chorus-engine layout 1\npartitions {}\n", config.partitions);
    match std::fs::read_to_string(&path) {
        Ok(have) if have == want => Ok(()),
        Ok(have) => Err(EngineError::Config(format!(
            "{} was created with a different layout: {have:?}",
            path.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let tmp = config.data_dir.join("ENGINE.tmp");
            let write = || -> std::io::Result<()> {
                use std::io::Write;
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(want.as_bytes())?;
                f.sync_all()?;
                std::fs::rename(&tmp, &path)?;
                std::fs::File::open(&config.data_dir)?.sync_all()
            };
            write().map_err(|e| EngineError::Io(format!("{}: {e}", path.display())))
        }
        Err(e) => Err(EngineError::Io(format!("{}: {e}", path.display()))),
    }
}
