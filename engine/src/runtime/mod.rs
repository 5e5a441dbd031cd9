//! The shards at run time: the messages they exchange, and each shard's main loop.
//!
//! Every shard has one bounded inbox ([`crate::queue::Inbox`]) that any thread may send to.
//! The main loop drains it in batches (a tick) and routes each message: metadata commands to
//! the metadata owner (shard 0), channel requests to the task of the partition that owns the
//! channel, and deliveries, subscriptions and resumes to the shard's dispatcher.
//!
//! Architecture invariant: messages from one shard to another arrive in the order they were
//! sent, because each sender pushes into the target's FIFO inbox from one thread. Resume
//! and subscription correctness rest on it: a partition's reply to a subscriber shard and
//! the deliveries it sends afterwards cannot overtake each other.

pub(crate) mod dispatch;
pub(crate) mod layout;
pub(crate) mod meta;
pub(crate) mod partition;

use crate::domain::channel::ChannelCommand;
use crate::domain::event::MetaRecord;
use crate::domain::meta::MetaState;
use crate::env::{DirOf, Env};
use crate::error::{Corrupt, EngineError, IoError, Unavailable};
use crate::ids::{ChannelId, MessageId, UserId, WorkspaceId};
use crate::outcome::{ChannelOutcome, ReadOutcome};
use crate::queue::{FrameSender, InboxSender};
use crate::view::ChannelView;
use bytes::Bytes;
use chorus_log::StorageRoot;
use futures::channel::oneshot;
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// A reply to whoever asked.
pub(crate) type Reply<T> = oneshot::Sender<Result<T, EngineError>>;

thread_local! {
    /// The shard this thread runs, if it is a shard thread of its own (set by the thread
    /// bootstrap, never by a shard's loop: the simulation runs every shard on one thread).
    pub(crate) static CURRENT_SHARD: Cell<Option<u32>> = const { Cell::new(None) };
}

/// An acknowledgement that any shard can give: a shard applied a metadata event, or a
/// partition committed a new channel's first members. Every holder calls `done` exactly
/// once, on its failure paths too: a metadata event is published only when all have, and
/// the owner's later answers wait for that.
pub(crate) trait Ack: Send + Sync {
    fn done(&self);
}

/// A read of channel data.
#[derive(Clone, Debug)]
pub(crate) enum ChannelRead {
    History {
        before: Option<u64>,
        limit: usize,
    },
    Replies {
        root: MessageId,
        after: Option<u64>,
        limit: usize,
    },
    Message {
        id: MessageId,
    },
    Versions {
        id: MessageId,
    },
    /// The channel's directory entry and last committed seq.
    Info,
}

/// A request for a partition.
pub(crate) enum PartitionMsg {
    Command {
        user: UserId,
        channel: ChannelId,
        cmd: ChannelCommand,
        reply: Reply<ChannelOutcome>,
    },
    Read {
        user: UserId,
        channel: ChannelId,
        read: ChannelRead,
        reply: Reply<ReadOutcome>,
    },
    /// A channel was created in the directory: give it its first members.
    Init {
        channel: ChannelId,
        ack: Option<Arc<dyn Ack>>,
    },
    /// A user's connections on a shard changed (+1 or -1).
    Online {
        user: UserId,
        shard: u32,
        delta: i32,
        sub: Option<u64>,
    },
    /// Events of a channel after a seq, for a resuming subscriber: at most `max`.
    CatchUp {
        user: UserId,
        channel: ChannelId,
        after: u64,
        max: usize,
        shard: u32,
        sub: u64,
    },
    /// A member is typing: tell the channel's other subscribers, log nothing.
    Typing {
        user: UserId,
        channel: ChannelId,
        reply: Reply<()>,
    },
    /// The channels a user can see in a workspace (or is a member of, in all workspaces).
    Visible {
        user: UserId,
        workspace: Option<WorkspaceId>,
        out: Arc<Gather>,
    },
    /// A consumer's read of committed events: answered now, or at the next commit.
    Committed(crate::consumer::Waiter),
    /// Retention: delete whole segments before the offset (already clamped to the
    /// consumers' watermark), never after the last durable snapshot.
    DeleteBefore { offset: u64, reply: Reply<u64> },
}

/// Gathers the answers of every partition to a scatter query.
pub(crate) struct Gather {
    left: AtomicUsize,
    items: Mutex<Vec<ChannelView>>,
    reply: Mutex<Option<Reply<Vec<ChannelView>>>>,
}

impl Gather {
    pub(crate) fn new(count: usize, reply: Reply<Vec<ChannelView>>) -> Arc<Gather> {
        Arc::new(Gather {
            left: AtomicUsize::new(count),
            items: Mutex::new(Vec::new()),
            reply: Mutex::new(Some(reply)),
        })
    }

    pub(crate) fn add(&self, mut views: Vec<ChannelView>) {
        self.items.lock().expect("gather").append(&mut views);
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            let mut items = std::mem::take(&mut *self.items.lock().expect("gather"));
            items.sort_by_key(|c| c.id);
            if let Some(reply) = self.reply.lock().expect("gather").take() {
                let _ = reply.send(Ok(items));
            }
        }
    }
}

/// One committed event for the subscribers of one shard.
#[derive(Clone, Debug)]
pub(crate) struct Delivery {
    pub channel: ChannelId,
    pub seq: u64,
    pub frame: Bytes,
    /// A membership change this event makes: the user, and whether they joined.
    pub membership: Option<(UserId, bool)>,
    /// An ephemeral frame (typing) from this user: it has no seq (`seq` is 0), is never
    /// logged, and does not go back to its sender.
    pub ephemeral_from: Option<UserId>,
}

/// A message to a shard.
pub(crate) enum ShardMsg {
    /// A metadata command (metadata owner only).
    Meta(meta::MetaRequest),
    /// A committed metadata event to apply.
    MetaApplied {
        record: Arc<MetaRecord>,
        ack: Arc<dyn Ack>,
    },
    /// A read of the metadata replica.
    MetaRead(meta::MetaRead),
    /// A consumer's read of the metadata log (metadata owner only).
    MetaCommitted(crate::consumer::Waiter),
    /// A request for a partition this shard owns.
    Partition { partition: u32, msg: PartitionMsg },
    /// The same request for every partition this shard owns (scatter).
    AllPartitions(Box<dyn Fn() -> PartitionMsg + Send>),
    /// Committed events for this shard's subscribers.
    Deliver(Vec<Delivery>),
    /// A new subscriber on this shard; a held one gets no live frames until `Start`.
    Subscribe {
        user: UserId,
        queue: FrameSender,
        held: bool,
        reply: Reply<dispatch::SubscriptionInfo>,
    },
    /// A held subscriber starts: each named channel from its seq, the others from where
    /// the subscription began; `announce` sends a `resumed` frame after the catch-up.
    Start {
        sub: u64,
        since: Vec<(ChannelId, u64)>,
        announce: bool,
    },
    /// A subscriber is gone.
    Unsubscribe { sub: u64 },
    /// A partition's answer to a subscriber's registration: its channels and last seqs.
    OnlineAck {
        sub: u64,
        channels: Vec<(ChannelId, u64)>,
    },
    /// A subscriber resumes channels after the given seqs. The reply says whether it can
    /// be done in order: not when a channel would have to go back before a frame this
    /// subscriber was already sent.
    Resume {
        sub: u64,
        since: Vec<(ChannelId, u64)>,
        reply: Option<futures::channel::oneshot::Sender<bool>>,
    },
    /// A page of catch-up frames for a resuming subscriber.
    CatchUpReply {
        sub: u64,
        channel: ChannelId,
        frames: Vec<Bytes>,
        last: u64,
        done: bool,
    },
    /// Run a task of the embedder on this shard (a server's accept loop, say).
    Spawn(Box<dyn FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>> + Send>),
    /// Stop: finish what is in flight, close the logs, and exit.
    Shutdown,
}

/// Where every shard's inbox is, and how partitions map to shards.
#[derive(Clone)]
pub(crate) struct Routes {
    pub shards: Arc<Vec<InboxSender<ShardMsg>>>,
    pub partitions: u32,
}

impl Routes {
    pub(crate) fn shard_count(&self) -> u32 {
        self.shards.len() as u32
    }

    /// The shard that owns a partition.
    pub(crate) fn owner(&self, partition: u32) -> u32 {
        partition % self.shard_count()
    }

    /// Sends a message, waiting for room if the inbox is full.
    pub(crate) async fn send(&self, shard: u32, msg: ShardMsg) -> Result<(), EngineError> {
        self.shards[shard as usize]
            .send(msg)
            .await
            .map_err(|_| Unavailable::ShuttingDown.into())
    }
}

/// The initial metadata replica handed to each shard at start.
pub(crate) type MetaSnapshot = Arc<MetaState>;

/// How often a shard looks again at catch-ups waiting for their subscribers to read.
const CATCH_UP_RETRY: std::time::Duration = std::time::Duration::from_millis(2);

/// The directory of the partitions' snapshot files, under the data directory.
const SNAPSHOT_DIR: &str = "snapshots";

/// How often a shard looks for subscribers whose receiving side is gone. A sweep walks
/// every subscriber of the shard (about 100 µs for 5,000), so it must not run per turn.
const SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// What a shard needs to run, besides its environment.
pub(crate) struct ShardSetup {
    pub id: u32,
    pub routes: Routes,
    pub inbox: crate::queue::InboxReceiver<ShardMsg>,
    pub config: crate::config::EngineConfig,
    /// Shard 0 sends each other shard the metadata replica it starts from.
    pub meta_in: Option<oneshot::Receiver<MetaSnapshot>>,
    pub meta_out: Vec<oneshot::Sender<MetaSnapshot>>,
    /// Reports when this shard serves (or why it cannot).
    pub ready: futures::channel::mpsc::UnboundedSender<(u32, Started)>,
}

/// How a shard's start went: the recovery of each of its partitions, or why it failed.
pub(crate) type Started = Result<Vec<crate::outcome::Recovery>, EngineError>;

/// The main loop of one shard; `stopped` is told when it has stopped, its logs closed.
pub(crate) async fn run_shard<E: Env>(setup: ShardSetup, env: E, stopped: oneshot::Sender<()>) {
    let ready = setup.ready.clone();
    let id = setup.id;
    match Shard::start(setup, env).await {
        Ok((shard, inbox, recovered)) => {
            let _ = ready.unbounded_send((id, Ok(recovered)));
            shard.serve(inbox).await;
        }
        Err(e) => {
            let _ = ready.unbounded_send((id, Err(e)));
        }
    }
    let _ = stopped.send(());
}

struct Shard<E: Env> {
    id: u32,
    env: E,
    routes: Routes,
    observer: crate::config::ObserverSlot,
    /// The inbox depth last reported to the observer.
    depth_reported: usize,
    meta: std::rc::Rc<std::cell::RefCell<MetaState>>,
    meta_owner: Option<futures::channel::mpsc::Sender<meta::MetaMsg>>,
    /// The queues of this shard's partitions, in partition order.
    partitions: PartitionQueues,
    tasks: Vec<E::Task>,
    dispatcher: dispatch::Dispatcher,
}

/// The queues of a shard's partitions, shared by its loop and its metadata owner.
pub(crate) type PartitionQueues = std::rc::Rc<
    std::cell::RefCell<
        std::collections::BTreeMap<u32, futures::channel::mpsc::Sender<PartitionMsg>>,
    >,
>;

/// Opens the log in the directory `name` of the environment's root.
async fn open_log<E: Env>(
    env: &E,
    name: &str,
    config: &crate::config::EngineConfig,
) -> Result<crate::durability::LocalDurability<DirOf<E>>, EngineError> {
    let log_config = chorus_log::LogConfig {
        segment_bytes_max: config.segment_bytes_max,
        ..chorus_log::LogConfig::default()
    };
    let storage = env
        .root()
        .dir(name)
        .await
        .map_err(|e| IoError::new(name, e))?;
    let (log, report) = chorus_log::Log::open(storage, log_config)
        .await
        .map_err(|e| Corrupt::LogOpen {
            log: name.to_owned(),
            source: Arc::new(e),
        })?;
    if report.torn_tail.is_some() || !report.removed_segments.is_empty() {
        eprintln!("chorus: recovered {name}: {report:?}");
    }
    Ok(crate::durability::LocalDurability::new(log))
}

impl<E: Env> Shard<E> {
    async fn start(
        setup: ShardSetup,
        env: E,
    ) -> Result<
        (
            Shard<E>,
            crate::queue::InboxReceiver<ShardMsg>,
            Vec<crate::outcome::Recovery>,
        ),
        EngineError,
    > {
        use std::cell::RefCell;
        use std::rc::Rc;
        let ShardSetup {
            id,
            routes,
            inbox,
            config,
            meta_in,
            meta_out,
            ..
        } = setup;
        let mut tasks = Vec::new();
        let partitions = PartitionQueues::default();
        let (meta, meta_owner) = match meta_in {
            None => {
                // Shard 0 checks the layout before anything is opened, and the others open
                // nothing until it sends them the metadata replica.
                layout::check(&env, config.partitions).await?;
                let log = open_log(&env, meta::META_LOG, &config).await?;
                let state = meta::replay(&log, config.partitions).await?;
                for tx in meta_out {
                    let _ = tx.send(Arc::new(state.clone()));
                }
                let meta = Rc::new(RefCell::new(state));
                let (tx, rx) = futures::channel::mpsc::channel(config.partition_queue_requests);
                let owner = meta::MetaOwner {
                    env: env.clone(),
                    log,
                    meta: meta.clone(),
                    routes: routes.clone(),
                    local_partitions: partitions.clone(),
                    publication: Arc::default(),
                    last_event: std::cell::Cell::new(0),
                    failed: std::cell::RefCell::new(None),
                };
                tasks.push(env.spawn(owner.run(rx)));
                (meta, Some(tx))
            }
            Some(meta_in) => {
                let snapshot = meta_in.await.map_err(|_| Unavailable::ShardDidNotStart)?;
                (Rc::new(RefCell::new((*snapshot).clone())), None)
            }
        };
        let snapshots = env
            .root()
            .dir(SNAPSHOT_DIR)
            .await
            .map_err(|e| IoError::new(SNAPSHOT_DIR, e))?;
        let mut recovered = Vec::new();
        for p in (0..config.partitions).filter(|p| routes.owner(*p) == id) {
            let started = env.now();
            let log = open_log(&env, &partition::log_name(p), &config).await?;
            let (part, uninitialised, (snapshot_offset, replayed_events)) =
                partition::Partition::open(
                    p,
                    env.clone(),
                    log,
                    routes.clone(),
                    meta.clone(),
                    &config,
                    partition::Snapshots::new(
                        snapshots.clone(),
                        format!("p{p:05}.snap"),
                        config.snapshot_every_events,
                    ),
                )
                .await?;
            recovered.push(crate::outcome::Recovery {
                partition: p,
                snapshot_offset,
                replayed_events,
                took: env.now().duration_since(started),
            });
            let (mut tx, rx) = futures::channel::mpsc::channel(config.partition_queue_requests);
            for channel in uninitialised {
                let _ = tx.try_send(PartitionMsg::Init { channel, ack: None });
            }
            partitions.borrow_mut().insert(p, tx);
            tasks.push(env.spawn(part.run(rx)));
        }
        let dispatcher = dispatch::Dispatcher::new(id, routes.clone(), config.observer.clone());
        Ok((
            Shard {
                id,
                env,
                routes: routes.clone(),
                observer: config.observer.clone(),
                depth_reported: 0,
                meta,
                meta_owner,
                partitions,
                tasks,
                dispatcher,
            },
            inbox,
            recovered,
        ))
    }

    async fn serve(mut self, mut inbox: crate::queue::InboxReceiver<ShardMsg>) {
        let mut batch = Vec::with_capacity(1024);
        let mut swept = self.env.now();
        // Messages this shard sent itself, and messages for full inboxes, to try again.
        let mut own: std::collections::VecDeque<ShardMsg> = std::collections::VecDeque::new();
        let mut retry: Vec<(u32, ShardMsg)> = Vec::new();
        'outer: loop {
            self.route_outbox(&mut own, &mut retry);
            batch.extend(own.drain(..));
            if batch.is_empty() && inbox.drain_into(&mut batch, 1024) == 0 {
                if self.dispatcher.has_stalled() || !retry.is_empty() {
                    // A catch-up waits for its subscriber to read: look again soon.
                    let wake = self.env.sleep(CATCH_UP_RETRY);
                    let next = std::pin::pin!(inbox.recv());
                    match futures::future::select(next, std::pin::pin!(wake)).await {
                        futures::future::Either::Left((Some(m), _)) => batch.push(m),
                        futures::future::Either::Left((None, _)) => break,
                        futures::future::Either::Right(_) => {}
                    }
                    self.dispatcher.retry_stalled().await;
                    self.dispatcher.outbox.append(&mut retry);
                } else {
                    match inbox.recv().await {
                        Some(m) => batch.push(m),
                        None => break,
                    }
                }
            }
            for msg in batch.drain(..) {
                if let ShardMsg::Shutdown = msg {
                    break 'outer;
                }
                self.handle(msg).await;
            }
            // The sweep walks every subscriber, so it runs by the clock: counted in turns, it
            // ran most often when the shard was least loaded, where a turn is one post.
            if self.env.now().duration_since(swept) >= SWEEP_INTERVAL {
                self.dispatcher.sweep().await;
                swept = self.env.now();
            }
            if let Some(o) = &self.observer.0 {
                let depth = inbox.len();
                o.queue_depth(depth as i64 - self.depth_reported as i64);
                self.depth_reported = depth;
            }
        }
        // Closing the queues lets each task finish what it holds and close its log.
        self.meta_owner = None;
        self.partitions.borrow_mut().clear();
        for t in self.tasks.drain(..) {
            t.await;
        }
    }

    /// Sends what the dispatcher queued, without waiting: messages for this shard are
    /// handled by its own loop next, and a message for a full inbox is tried again later.
    fn route_outbox(
        &mut self,
        own: &mut std::collections::VecDeque<ShardMsg>,
        retry: &mut Vec<(u32, ShardMsg)>,
    ) {
        for (shard, msg) in self.dispatcher.outbox.drain(..) {
            if shard == self.id {
                own.push_back(msg);
                continue;
            }
            match self.routes.shards[shard as usize].try_send(msg) {
                Ok(()) => {}
                Err(crate::queue::SendError::Full(msg)) => retry.push((shard, msg)),
                Err(crate::queue::SendError::Closed(_)) => {}
            }
        }
    }

    async fn handle(&mut self, msg: ShardMsg) {
        use futures::SinkExt;
        match msg {
            ShardMsg::Meta(req) => {
                if let Some(tx) = self.meta_owner.as_mut() {
                    let _ = tx.send(meta::MetaMsg::Request(req)).await;
                }
            }
            ShardMsg::MetaCommitted(waiter) => match self.meta_owner.as_mut() {
                Some(tx) => {
                    let _ = tx.send(meta::MetaMsg::Committed(waiter)).await;
                }
                // Only shard 0 is asked, and it has the owner until it stops.
                None => {
                    let _ = waiter.reply.send(Err(Unavailable::ShuttingDown.into()));
                }
            },
            ShardMsg::MetaApplied { record, ack } => {
                self.meta.borrow_mut().apply(&record.event);
                if let crate::domain::event::MetaEvent::ChannelCreated { channel, .. } =
                    &record.event
                {
                    let p = crate::domain::meta::partition_of(*channel);
                    let tx = self.partitions.borrow().get(&p).cloned();
                    if let Some(mut tx) = tx {
                        let init = PartitionMsg::Init {
                            channel: *channel,
                            ack: Some(ack.clone()),
                        };
                        if tx.send(init).await.is_err() {
                            ack.done();
                        }
                    }
                }
                ack.done();
            }
            ShardMsg::MetaRead(read) => meta::answer(&self.meta.borrow(), read),
            ShardMsg::Partition { partition, msg } => {
                let tx = self.partitions.borrow().get(&partition).cloned();
                if let Some(mut tx) = tx {
                    let _ = tx.send(msg).await;
                }
            }
            ShardMsg::AllPartitions(make) => {
                let txs: Vec<_> = self.partitions.borrow().values().cloned().collect();
                for mut tx in txs {
                    let _ = tx.send(make()).await;
                }
            }
            ShardMsg::Deliver(batch) => self.dispatcher.deliver(batch).await,
            ShardMsg::Subscribe {
                user,
                queue,
                held,
                reply,
            } => self.dispatcher.subscribe(user, queue, held, reply).await,
            ShardMsg::Start {
                sub,
                since,
                announce,
            } => self.dispatcher.start(sub, since, announce).await,
            ShardMsg::Unsubscribe { sub } => self.dispatcher.unsubscribe(sub).await,
            ShardMsg::OnlineAck { sub, channels } => self.dispatcher.online_ack(sub, channels),
            ShardMsg::Resume { sub, since, reply } => {
                let done = self.dispatcher.resume(sub, since).await;
                if let Some(reply) = reply {
                    let _ = reply.send(done);
                }
            }
            ShardMsg::CatchUpReply {
                sub,
                channel,
                frames,
                last,
                done,
            } => {
                self.dispatcher
                    .catch_up_page(sub, channel, frames, last, done)
                    .await
            }
            ShardMsg::Spawn(make) => drop(self.env.spawn(make())),
            ShardMsg::Shutdown => {}
        }
    }
}
