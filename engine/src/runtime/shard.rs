//! One shard at run time: how it starts (its logs, its partitions, the metadata owner on
//! shard 0) and its main loop.
//!
//! A shard has two inboxes ([`ShardInboxes`]). *Requests* go to its partitions, the
//! metadata owner and its metadata replica: commands, reads, scatters, metadata events to
//! apply, the dispatcher's registrations and catch-up asks. *Events* go to its dispatcher:
//! deliveries, registrations' answers, catch-up pages, and subscribers' own requests.
//!
//! The loop takes events at every turn and hands them to the dispatcher, which never
//! waits. It takes requests only while none is held: a request for a partition (or the
//! metadata owner) whose queue is full is *held*, in order, and the loop takes no further
//! request until the queue has room, while events keep flowing.
//!
//! Architecture invariant: a shard's loop never waits on a queue. Its one wait is for the
//! next message, the room a held request needs, or a timer. So nothing can wait on it in
//! a cycle: a partition waits only for its disk and for events inboxes, which every loop
//! drains at every turn; the metadata owner waits for requests inboxes, which a loop
//! drains as soon as its partitions take their requests; a loop waits (by holding) only
//! for its own partitions and metadata owner. Before this, a loop awaited a full
//! partition queue while the partition awaited room in that very loop's inbox (found by
//! the simulation on its third seed, with one shard).

use super::{dispatch, layout, meta, partition, Ack, PartitionMsg, Routes, ShardMsg};
use crate::domain::event::MetaEvent;
use crate::durability::Durability;
use crate::env::{DirOf, Env};
use crate::error::{Corrupt, EngineError, IoError, Unavailable};
use crate::queue::InboxReceiver;
use chorus_log::StorageRoot;
use futures::channel::oneshot;
use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};

/// The initial metadata replica handed to each shard at start.
pub(crate) type MetaSnapshot = Arc<crate::domain::meta::MetaState>;

/// How often a shard looks again at catch-ups waiting for their subscribers to read, and
/// at messages for full inboxes.
const RETRY_INTERVAL: std::time::Duration = std::time::Duration::from_millis(2);

/// The directory of the partitions' snapshot files, under the data directory.
const SNAPSHOT_DIR: &str = "snapshots";

/// How often a shard looks for subscribers whose receiving side is gone. A sweep walks
/// every subscriber of the shard (about 100 µs for 5,000), so it must not run per turn.
const SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// Most messages taken from one inbox in one turn.
const TURN_MESSAGES_MAX: usize = 1024;

/// The receiving ends of a shard's two inboxes.
pub(crate) struct ShardInboxes {
    /// For its partitions, metadata owner and replica.
    pub requests: InboxReceiver<ShardMsg>,
    /// For its dispatcher.
    pub events: InboxReceiver<ShardMsg>,
}

/// What a shard needs to run, besides its environment.
pub(crate) struct ShardSetup {
    pub id: u32,
    pub routes: Routes,
    pub inboxes: ShardInboxes,
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
        Ok((shard, inboxes, recovered)) => {
            let _ = ready.unbounded_send((id, Ok(recovered)));
            shard.serve(inboxes).await;
        }
        Err(e) => {
            let _ = ready.unbounded_send((id, Err(e)));
        }
    }
    let _ = stopped.send(());
}

/// The queues of a shard's partitions, shared by its loop and its metadata owner.
pub(crate) type PartitionQueues =
    Rc<RefCell<BTreeMap<u32, futures::channel::mpsc::Sender<PartitionMsg>>>>;

/// A request the loop took but whose queue had no room yet.
enum Held {
    Partition(u32, PartitionMsg),
    Meta(meta::MetaMsg),
}

struct Shard<E: Env> {
    id: u32,
    env: E,
    routes: Routes,
    observer: crate::config::ObserverSlot,
    /// The inbox depth last reported to the observer.
    depth_reported: usize,
    meta: Rc<RefCell<crate::domain::meta::MetaState>>,
    meta_owner: Option<futures::channel::mpsc::Sender<meta::MetaMsg>>,
    /// The queues of this shard's partitions, in partition order. The loop sends through
    /// these senders themselves (never clones), so that a full queue says so.
    partitions: PartitionQueues,
    tasks: Vec<E::Task>,
    dispatcher: dispatch::Dispatcher,
    /// Requests taken whose queue was full, oldest first. While any is held the loop
    /// takes no more requests, so requests keep their order and the held ones stay few.
    held: VecDeque<Held>,
    /// Requests the dispatcher sent this shard itself, handled as the next requests.
    own: VecDeque<ShardMsg>,
    /// Messages of the dispatcher for other shards whose inbox was full.
    waiting: Waiting<ShardMsg>,
    /// The presence of the users whose home shard this is (`crate::presence`).
    presence: crate::presence::PresenceTable,
    /// Every connected user, shared with this shard's partitions (see [`super::online`]).
    online: Rc<RefCell<super::online::ShardOnline>>,
    /// Presence deliveries for this shard's own dispatcher, handled as the next events.
    own_events: VecDeque<ShardMsg>,
    /// In a cluster: where this node's presence changes go for the other nodes, and the
    /// number of the last sent (`crate::presence::peers`).
    presence_peers: Option<(crate::presence::peers::Sink, u64)>,
}

/// Messages for full inboxes, per shard in the order they were sent.
///
/// Architecture invariant: a later message for a shard queues behind any that waits for
/// that shard's inbox, and they are tried again in order; so no message overtakes one sent
/// before it to the same shard. (Before, a message for a full inbox was tried again later
/// while later ones to the same shard went at once. An `Online` unregistration overtaking
/// its registration would leave the partition counting a subscription that is gone; it did
/// not happen in practice only because a subscription is unregistered no sooner than its
/// registration was answered, or swept 100 ms after it was abandoned.)
struct Waiting<M> {
    by_shard: BTreeMap<u32, VecDeque<M>>,
}

impl<M> Waiting<M> {
    fn new() -> Waiting<M> {
        Waiting {
            by_shard: BTreeMap::new(),
        }
    }

    fn is_empty(&self) -> bool {
        self.by_shard.is_empty()
    }

    /// Sends `msg` to `shard` with `try_send` (which hands a message back when the inbox
    /// is full), unless earlier messages for that shard wait: then it waits behind them.
    fn send(&mut self, shard: u32, msg: M, mut try_send: impl FnMut(u32, M) -> Result<(), M>) {
        if let Some(queue) = self.by_shard.get_mut(&shard) {
            queue.push_back(msg);
        } else if let Err(msg) = try_send(shard, msg) {
            self.by_shard.entry(shard).or_default().push_back(msg);
        }
    }

    /// Tries the waiting messages again, in order per shard, up to the first that still
    /// finds its inbox full.
    fn retry(&mut self, mut try_send: impl FnMut(u32, M) -> Result<(), M>) {
        for (shard, queue) in self.by_shard.iter_mut() {
            while let Some(msg) = queue.pop_front() {
                if let Err(msg) = try_send(*shard, msg) {
                    queue.push_front(msg);
                    break;
                }
            }
        }
        self.by_shard.retain(|_, queue| !queue.is_empty());
    }
}

/// Opens the log in the directory `name` of the environment's root.
async fn open_log<E: Env>(
    env: &E,
    name: &str,
    config: &crate::config::EngineConfig,
) -> Result<chorus_log::Log<DirOf<E>>, EngineError> {
    let log_config = chorus_log::LogConfig {
        segment_bytes_max: config.segment_bytes_max,
        preallocate_bytes: config.log_preallocate_bytes,
        ..chorus_log::LogConfig::default()
    };
    let storage = if env.logs_sync_every_append() {
        env.root().dir_write_through(name).await
    } else {
        env.root().dir_cached(name).await
    }
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
    Ok(log)
}

/// What woke an idle loop.
enum Wake {
    Event(Option<ShardMsg>),
    Request(Option<ShardMsg>),
    Room,
    Timer,
    Presence,
}

impl<E: Env> Shard<E> {
    async fn start(
        setup: ShardSetup,
        env: E,
    ) -> Result<(Shard<E>, ShardInboxes, Vec<crate::outcome::Recovery>), EngineError> {
        let ShardSetup {
            id,
            routes,
            inboxes,
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
                // The directory's group (in a cluster) is numbered after the partitions'.
                let log = open_log(&env, meta::META_LOG, &config).await?;
                let log = env.durability(config.partitions, log).await?;
                let state = meta::replay(&log, config.partitions).await?;
                for tx in meta_out {
                    let _ = tx.send(Arc::new(state.clone()));
                }
                let meta = Rc::new(RefCell::new(state));
                let (tx, rx) = futures::channel::mpsc::channel(config.partition_queue_requests);
                let owner = meta::MetaOwner {
                    env: env.clone(),
                    applied: std::cell::Cell::new(log.next_offset()),
                    partitions: config.partitions,
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
        let mut held = VecDeque::new();
        let online = Rc::new(RefCell::new(super::online::ShardOnline::new(
            routes.shard_count(),
        )));
        for p in (0..config.partitions).filter(|p| routes.owner(*p) == id) {
            let started = env.now();
            let log = open_log(&env, &partition::log_name(p), &config).await?;
            let log = env.durability(p, log).await?;
            let (part, uninitialised, restored) = partition::Partition::open(
                p,
                env.clone(),
                log,
                routes.clone(),
                partition::ShardShared {
                    meta: meta.clone(),
                    connected: online.clone(),
                },
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
                snapshot_offset: restored.snapshot_offset,
                replayed_events: restored.replayed,
                snapshot_refused: restored.snapshot_refused,
                took: env.now().duration_since(started),
            });
            let (tx, rx) = futures::channel::mpsc::channel(config.partition_queue_requests);
            // Channels whose first members a crash lost are initialised again, through the
            // loop like any request: however many there are, none is dropped for want of
            // room in the queue.
            for channel in uninitialised {
                held.push_back(Held::Partition(
                    p,
                    PartitionMsg::Init { channel, ack: None },
                ));
            }
            partitions.borrow_mut().insert(p, tx);
            tasks.push(env.spawn(part.run(rx)));
        }
        let dispatcher = dispatch::Dispatcher::new(
            id,
            routes.clone(),
            config.observer.clone(),
            config.presence_flush,
        );
        let shard = Shard {
            id,
            env,
            routes,
            observer: config.observer.clone(),
            depth_reported: 0,
            meta,
            meta_owner,
            partitions,
            tasks,
            dispatcher,
            held,
            own: VecDeque::new(),
            waiting: Waiting::new(),
            presence: crate::presence::PresenceTable::new(config.presence_offline_grace),
            online,
            own_events: VecDeque::new(),
            presence_peers: None,
        };
        Ok((shard, inboxes, recovered))
    }

    async fn serve(mut self, mut inboxes: ShardInboxes) {
        let mut batch = Vec::with_capacity(TURN_MESSAGES_MAX);
        let mut swept = self.env.now();
        let mut retry_at = None;
        let mut presence_at = None;
        'turns: loop {
            // Subscribers found to be cut off where the loop could not wait.
            if self.dispatcher.has_pending_cuts() {
                self.dispatcher.cut_pending().await;
            }
            // Events first: the dispatcher never waits, so whatever the requests wait for,
            // the partitions that deliver to this shard always get their messages in.
            batch.extend(self.own_events.drain(..));
            inboxes.events.drain_into(&mut batch, TURN_MESSAGES_MAX);
            for msg in batch.drain(..) {
                self.handle_event(msg).await;
            }
            self.route_outbox();
            if self.send_held() {
                batch.extend(self.own.drain(..));
                inboxes.requests.drain_into(&mut batch, TURN_MESSAGES_MAX);
                let mut requests = batch.drain(..);
                for msg in requests.by_ref() {
                    if let ShardMsg::Shutdown = msg {
                        break 'turns;
                    }
                    self.handle_request(msg);
                }
            }
            // The sweep walks every subscriber, so it runs by the clock: counted in turns, it
            // ran most often when the shard was least loaded, where a turn is one post.
            if self.env.now().duration_since(swept) >= SWEEP_INTERVAL {
                self.dispatcher.sweep().await;
                swept = self.env.now();
            }
            self.expire_presence();
            self.route_outbox();
            if let Some(o) = &self.observer.0 {
                let depth = inboxes.requests.len() + inboxes.events.len();
                o.queue_depth(depth as i64 - self.depth_reported as i64);
                self.depth_reported = depth;
            }
            let idle = inboxes.events.is_empty()
                && self.own_events.is_empty()
                && !self.dispatcher.has_pending_cuts()
                && (!self.held.is_empty() || (self.own.is_empty() && inboxes.requests.is_empty()));
            if !idle {
                continue;
            }
            let waiting = self.dispatcher.has_stalled() || !self.waiting.is_empty();
            if waiting && retry_at.is_none() {
                retry_at = Some(Box::pin(self.env.sleep(RETRY_INTERVAL)));
            }
            // A presence deadline (an offline grace, the end of a `dnd`, a subscriber's
            // presence window) is a timer of its own, armed for the earliest: the table is
            // never swept.
            let next = match (
                self.presence.next_deadline(),
                self.dispatcher.next_presence_window_end(),
            ) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            if next != presence_at.as_ref().map(|(at, _)| *at) {
                presence_at = next.map(|at| {
                    let wait = at.saturating_duration_since(self.env.now());
                    (at, Box::pin(self.env.sleep(wait)))
                });
            }
            let wake = std::future::poll_fn(|cx| {
                if let Some((_, timer)) = presence_at.as_mut() {
                    if std::future::Future::poll(timer.as_mut(), cx).is_ready() {
                        return Poll::Ready(Wake::Presence);
                    }
                }
                self.poll_wake(cx, &mut inboxes, &mut retry_at)
            });
            match wake.await {
                Wake::Event(Some(msg)) => self.handle_event(msg).await,
                Wake::Request(Some(msg)) => {
                    if let ShardMsg::Shutdown = msg {
                        break;
                    }
                    self.handle_request(msg);
                }
                Wake::Event(None) | Wake::Request(None) => break,
                Wake::Room => {}
                Wake::Presence => {
                    presence_at = None;
                    self.expire_presence();
                }
                Wake::Timer => {
                    retry_at = None;
                    self.dispatcher.retry_stalled().await;
                    let routes = &self.routes;
                    self.waiting
                        .retry(|shard, msg| try_route(routes, shard, msg));
                }
            }
        }
        // Held requests are answered, not dropped: their callers and the acknowledgements
        // of metadata events must hear.
        for held in std::mem::take(&mut self.held) {
            match held {
                Held::Partition(_, msg) => partition::fail(msg, &Unavailable::ShuttingDown),
                Held::Meta(msg) => meta::fail(msg, &Unavailable::ShuttingDown),
            }
        }
        // Closing the queues lets each task finish what it holds and close its log.
        self.meta_owner = None;
        self.partitions.borrow_mut().clear();
        for t in self.tasks.drain(..) {
            t.await;
        }
    }

    /// What the idle loop waits for: a message, room for the held request, or the retry
    /// timer.
    fn poll_wake(
        &mut self,
        cx: &mut Context<'_>,
        inboxes: &mut ShardInboxes,
        retry_at: &mut Option<std::pin::Pin<Box<impl std::future::Future<Output = ()>>>>,
    ) -> Poll<Wake> {
        if let Poll::Ready(msg) = inboxes.events.poll_recv(cx) {
            return Poll::Ready(Wake::Event(msg));
        }
        if self.held.is_empty() {
            if let Poll::Ready(msg) = inboxes.requests.poll_recv(cx) {
                return Poll::Ready(Wake::Request(msg));
            }
        } else if self.poll_room(cx).is_ready() {
            return Poll::Ready(Wake::Room);
        }
        if let Some(timer) = retry_at.as_mut() {
            if timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Wake::Timer);
            }
        }
        Poll::Pending
    }

    /// Ready once the first held request's queue has room (or is gone).
    fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let ready = match self.held.front() {
            None => return Poll::Ready(()),
            Some(Held::Partition(p, _)) => match self.partitions.borrow_mut().get_mut(p) {
                Some(tx) => tx.poll_ready(cx).map(drop),
                None => Poll::Ready(()),
            },
            Some(Held::Meta(_)) => match self.meta_owner.as_mut() {
                Some(tx) => tx.poll_ready(cx).map(drop),
                None => Poll::Ready(()),
            },
        };
        ready
    }

    /// Hands held requests to their queues, oldest first, until one finds no room; true
    /// when none is held any more.
    fn send_held(&mut self) -> bool {
        while let Some(held) = self.held.pop_front() {
            match self.offer(held) {
                None => {}
                Some(back) => {
                    self.held.push_front(back);
                    return false;
                }
            }
        }
        true
    }

    /// Offers a request to its queue; it comes back if the queue is full. A request for a
    /// queue that is gone (the shard is stopping) is answered as unavailable.
    fn offer(&mut self, held: Held) -> Option<Held> {
        match held {
            Held::Partition(p, msg) => {
                let mut queues = self.partitions.borrow_mut();
                let Some(tx) = queues.get_mut(&p) else {
                    partition::fail(msg, &Unavailable::ShuttingDown);
                    return None;
                };
                match tx.try_send(msg) {
                    Ok(()) => None,
                    Err(e) if e.is_full() => Some(Held::Partition(p, e.into_inner())),
                    Err(e) => {
                        partition::fail(e.into_inner(), &Unavailable::ShuttingDown);
                        None
                    }
                }
            }
            Held::Meta(msg) => {
                let Some(tx) = self.meta_owner.as_mut() else {
                    meta::fail(msg, &Unavailable::ShuttingDown);
                    return None;
                };
                match tx.try_send(msg) {
                    Ok(()) => None,
                    Err(e) if e.is_full() => Some(Held::Meta(e.into_inner())),
                    Err(e) => {
                        meta::fail(e.into_inner(), &Unavailable::ShuttingDown);
                        None
                    }
                }
            }
        }
    }

    /// Queues a request for a partition or the metadata owner: sent now if it has room and
    /// nothing is held before it, held otherwise.
    /// After a change of a user's listed devices, has every partition here bring the
    /// user's encrypted channels up to it; answers the acknowledgement to give when this
    /// shard is done, which (for such a change) waits for those partitions' commits too, so
    /// the change is published only once its channel events are.
    fn sync_devices(&mut self, event: &MetaEvent, ack: Arc<dyn Ack>) -> Arc<dyn Ack> {
        let MetaEvent::E2ee(change) = event else {
            return ack;
        };
        let Some(user) = change.lists_devices_of() else {
            return ack;
        };
        let ids: Vec<u32> = self.partitions.borrow().keys().copied().collect();
        let joined: Arc<dyn Ack> = Arc::new(super::Joined::new(ids.len() + 1, ack));
        for p in ids {
            let ack = joined.clone();
            self.forward(Held::Partition(
                p,
                PartitionMsg::DevicesChanged { user, ack },
            ));
        }
        joined
    }

    fn forward(&mut self, held: Held) {
        if !self.held.is_empty() {
            self.held.push_back(held);
        } else if let Some(back) = self.offer(held) {
            self.held.push_back(back);
        }
    }

    /// Sends what the dispatcher queued, without waiting: messages for this shard are
    /// handled by its own loop next, and a message for a full inbox waits, in order, behind
    /// any other waiting for that inbox.
    fn route_outbox(&mut self) {
        let routes = &self.routes;
        for (shard, msg) in std::mem::take(&mut self.dispatcher.outbox) {
            if shard == self.id {
                self.own.push_back(msg);
            } else {
                self.waiting
                    .send(shard, msg, |shard, msg| try_route(routes, shard, msg));
            }
        }
    }

    /// A request: for a partition, the metadata owner or replica, or the shard itself.
    /// Never waits.
    fn handle_request(&mut self, msg: ShardMsg) {
        match msg {
            ShardMsg::Meta(req) => self.forward(Held::Meta(meta::MetaMsg::Request(req))),
            ShardMsg::MetaCommitted(waiter) => {
                if self.meta_owner.is_some() {
                    self.forward(Held::Meta(meta::MetaMsg::Committed(waiter)));
                } else {
                    // Only shard 0 is asked, and it has the owner until it stops.
                    let _ = waiter.reply.send(Err(Unavailable::ShuttingDown.into()));
                }
            }
            ShardMsg::MetaEffects { record, ack } => {
                super::to_device::effects(&self.meta.borrow(), &mut self.dispatcher, &record.event);
                let ack = self.sync_devices(&record.event, ack);
                ack.done();
            }
            ShardMsg::MetaApplied { record, ack } => {
                self.meta.borrow_mut().apply(&record.event);
                super::to_device::effects(&self.meta.borrow(), &mut self.dispatcher, &record.event);
                let ack = self.sync_devices(&record.event, ack);
                if let crate::domain::event::MetaEvent::ChannelCreated { channel, .. } =
                    &record.event
                {
                    let p = crate::domain::meta::partition_of(*channel);
                    if self.partitions.borrow().contains_key(&p) {
                        let init = PartitionMsg::Init {
                            channel: *channel,
                            ack: Some(ack.clone()),
                        };
                        self.forward(Held::Partition(p, init));
                    }
                }
                ack.done();
            }
            ShardMsg::MetaRead(read) => meta::answer(&self.meta.borrow(), read),
            ShardMsg::Partition { partition, msg } => {
                if self.partitions.borrow().contains_key(&partition) {
                    self.forward(Held::Partition(partition, msg));
                } else {
                    partition::fail(msg, &Unavailable::ShuttingDown);
                }
            }
            ShardMsg::AllPartitions(make) => {
                let ids: Vec<u32> = self.partitions.borrow().keys().copied().collect();
                for p in ids {
                    self.forward(Held::Partition(p, make()));
                }
            }
            ShardMsg::Online {
                user,
                shard,
                delta,
                sub,
            } => {
                let version = self.online.borrow_mut().apply(user, shard, delta);
                let ids: Vec<u32> = self.partitions.borrow().keys().copied().collect();
                for p in ids {
                    let msg = PartitionMsg::Online {
                        user,
                        shard,
                        delta,
                        sub,
                        version,
                    };
                    self.forward(Held::Partition(p, msg));
                }
            }
            ShardMsg::PresenceConn { user, conn, report } => {
                let (now, unix) = (self.env.now(), self.env.unix_us());
                let (before, _) = self.presence.here(user);
                let change = match report {
                    super::ConnReport::Connected => self.presence.connect(unix, user, conn),
                    super::ConnReport::Active(a) => self.presence.activity(unix, user, conn, a),
                    super::ConnReport::Gone => self.presence.disconnect(now, unix, user, conn),
                };
                self.announce(change);
                let (active, last_active_us) = self.presence.here(user);
                if active != before {
                    self.tell_peers(crate::presence::peers::Record::Conns {
                        user,
                        active,
                        last_active_us,
                    });
                }
            }
            ShardMsg::PresenceMode {
                user,
                mode,
                dnd_until_us,
                reply,
            } => {
                let (now, unix) = (self.env.now(), self.env.unix_us());
                let (shown, change) = self.presence.set_mode(now, unix, user, mode, dnd_until_us);
                self.announce(change);
                let (mode, until) = self.presence.mode(user);
                self.tell_peers(crate::presence::peers::Record::Mode {
                    user,
                    mode,
                    dnd_until_us: until,
                    at_us: self.presence.mode_at(user),
                });
                let _ = reply.send(Ok((shown, mode, until)));
            }
            ShardMsg::PresenceWatch {
                watcher,
                conn,
                add,
                remove,
                out,
            } => {
                for user in remove {
                    self.presence.unwatch(user, conn);
                }
                let meta = self.meta.borrow();
                let mut found = Vec::with_capacity(add.len());
                for user in add {
                    // A user who shares no workspace with the watcher is offline to them,
                    // and is not watched: nothing of theirs ever reaches the watcher.
                    let (shown, seq) = if meta.share_workspace(watcher, user) {
                        self.presence.watch(user, conn)
                    } else {
                        (crate::presence::Presence::OFFLINE, u64::MAX)
                    };
                    found.push((user, shown, seq));
                }
                if let Some(out) = out {
                    out.add(found);
                }
            }
            ShardMsg::PresenceQuery { asker, users, out } => {
                let meta = self.meta.borrow();
                let found = users
                    .into_iter()
                    .map(|user| match asker {
                        None => (
                            user,
                            self.presence.get(user),
                            self.presence.reach(user).bits(),
                        ),
                        Some(asker) if meta.share_workspace(asker, user) => {
                            (user, self.presence.get(user), 0)
                        }
                        Some(_) => (user, crate::presence::Presence::OFFLINE, 0),
                    })
                    .collect();
                out.add(found);
            }
            ShardMsg::PresenceShare { out, reply } => {
                let seq = self.presence_peers.as_ref().map_or(0, |(_, seq)| *seq);
                self.presence_peers = Some((out, seq));
                let _ = reply.send(Ok(()));
            }
            ShardMsg::PresencePeer { from, input, reply } => {
                self.peer_input(from, input);
                let _ = reply.send(Ok(()));
            }
            ShardMsg::PresenceSnapshot { after, max, reply } => {
                let seq = self.presence_peers.as_ref().map_or(0, |(_, seq)| *seq);
                let (records, more) = self.presence.shared(after, max);
                let _ = reply.send(Ok((seq, records, more)));
            }
            ShardMsg::ReadBlob { blob, reply } => {
                let blobs = self.env.blobs().clone();
                drop(self.env.spawn(async move {
                    let _ = reply.send(crate::blob::BlobStore::get(&blobs, blob).await);
                }));
            }
            ShardMsg::Spawn(make) => drop(self.env.spawn(make())),
            ShardMsg::Shutdown => {}
            event => unreachable!("an event in the requests inbox: {}", event.name()),
        }
    }

    /// An event, for the dispatcher. Never waits: the dispatcher's messages go to its
    /// outbox.
    async fn handle_event(&mut self, msg: ShardMsg) {
        match msg {
            ShardMsg::Deliver(batch) => self.dispatcher.deliver(batch).await,
            ShardMsg::Subscribe {
                user,
                device,
                queue,
                held,
                reply,
            } => {
                let d = device.clone();
                self.dispatcher
                    .subscribe(user, device, queue, held, reply)
                    .await;
                if let Some(d) = d {
                    super::to_device::refill(&self.meta.borrow(), &mut self.dispatcher, user, &d);
                }
            }
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
            ShardMsg::PresenceDeliver { record, subs } => {
                let now = self.env.now();
                self.dispatcher.presence_deliver(now, record, subs).await
            }
            ShardMsg::PresenceSub {
                sub,
                op,
                users,
                reply,
            } => self.dispatcher.presence_sub(sub, op, users, reply),
            ShardMsg::PresenceActivity { sub, active } => {
                self.dispatcher.presence_activity(sub, active)
            }
            request => unreachable!("a request in the events inbox: {}", request.name()),
        }
    }

    /// Ends every presence deadline that has passed, and sends what changed; then every
    /// presence window of this shard's subscribers that is due.
    fn expire_presence(&mut self) {
        let now = self.env.now();
        self.dispatcher.end_presence_windows(now);
        if self.presence.next_deadline().is_some_and(|at| at <= now) {
            for change in self.presence.expire(now) {
                self.announce(Some(change));
            }
        }
    }

    /// Tells the other nodes of a cluster (when this node is one) a change of what this
    /// node says of one of its users, numbered next in the shard's sequence.
    fn tell_peers(&mut self, record: crate::presence::peers::Record) {
        if let Some((out, seq)) = &mut self.presence_peers {
            *seq += 1;
            if out.unbounded_send((*seq, vec![record])).is_err() {
                self.presence_peers = None;
            }
        }
    }

    /// What another node says of the users whose presence this shard owns, into the table;
    /// the changes go to the watchers.
    fn peer_input(&mut self, from: u64, input: crate::presence::peers::Input) {
        use crate::presence::peers::{Input, Record};
        let (now, unix) = (self.env.now(), self.env.unix_us());
        let mut changes = Vec::new();
        let records = match input {
            Input::Gone => {
                changes = self.presence.node_gone(now, from);
                Vec::new()
            }
            Input::Reset(records) => {
                let open: Vec<_> = records
                    .iter()
                    .filter_map(|r| match *r {
                        Record::Conns {
                            user,
                            active: Some(active),
                            last_active_us,
                        } => Some((user, active, last_active_us)),
                        _ => None,
                    })
                    .collect();
                changes = self.presence.node_reset(now, from, &open);
                records
                    .into_iter()
                    .filter(|r| matches!(r, Record::Mode { .. }))
                    .collect()
            }
            Input::Apply(records) => records,
        };
        for r in records {
            changes.extend(match r {
                Record::Conns {
                    user,
                    active,
                    last_active_us,
                } => self
                    .presence
                    .remote_conns(now, user, from, active, last_active_us),
                Record::Mode {
                    user,
                    mode,
                    dnd_until_us,
                    at_us,
                } => self
                    .presence
                    .mode_from(now, unix, user, mode, dnd_until_us, at_us),
            });
        }
        for change in changes {
            self.announce(Some(change));
        }
    }

    /// Sends a presence change to the connections watching its user: one message per
    /// shard that has any, carrying the record encoded once.
    fn announce(&mut self, change: Option<crate::presence::Change>) {
        let Some(change) = change else { return };
        let watchers = self.presence.watchers(change.user);
        if watchers.is_empty() {
            return;
        }
        let mut by_shard: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        for w in watchers {
            by_shard.entry(w.shard()).or_default().push(w.sub());
        }
        let record = crate::presence::Update::from(change).encode();
        let routes = &self.routes;
        for (shard, subs) in by_shard {
            let msg = ShardMsg::PresenceDeliver {
                record: record.clone(),
                subs,
            };
            if shard == self.id {
                self.own_events.push_back(msg);
            } else {
                self.waiting
                    .send(shard, msg, |shard, msg| try_route(routes, shard, msg));
            }
        }
    }
}

/// Sends a message to another shard without waiting; hands it back if the inbox is full.
/// A message for a shard that is gone (the engine is stopping) is dropped.
fn try_route(routes: &Routes, shard: u32, msg: ShardMsg) -> Result<(), ShardMsg> {
    match routes.try_send(shard, msg) {
        Err(crate::queue::SendError::Full(msg)) => Err(msg),
        Ok(()) | Err(crate::queue::SendError::Closed(_)) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    // A message for a shard whose inbox was full waits, and every later message for that
    // shard waits behind it: they arrive in the order sent, while other shards' go at once.
    #[test]
    fn waiting_messages_are_never_overtaken() {
        let room = RefCell::new(BTreeMap::from([(1u32, 0usize), (2, 10)]));
        let arrived = RefCell::new(Vec::new());
        let try_send = |shard: u32, msg: u32| {
            let mut room = room.borrow_mut();
            let left = room.get_mut(&shard).expect("shard");
            if *left == 0 {
                return Err(msg);
            }
            *left -= 1;
            arrived.borrow_mut().push((shard, msg));
            Ok(())
        };
        let mut waiting = Waiting::new();
        waiting.send(1, 10, try_send);
        waiting.send(2, 20, try_send);
        waiting.send(1, 11, try_send);
        // Shard 1's inbox has room for one now: the later message must not go first.
        room.borrow_mut().insert(1, 1);
        waiting.send(1, 12, try_send);
        waiting.retry(try_send);
        assert!(!waiting.is_empty());
        room.borrow_mut().insert(1, 5);
        waiting.retry(try_send);
        assert!(waiting.is_empty());
        assert_eq!(*arrived.borrow(), vec![(2, 20), (1, 10), (1, 11), (1, 12)]);
    }
}
