//! The engine on the simulated cluster: every node a whole engine (its shard loop, its
//! channel partitions and its directory) whose partitions commit through their Raft groups,
//! as `chorus serve --cluster` runs it, on the seeded scheduler.
//!
//! A node's environment ([`NodeEnv`]) is the whole-node simulation's ([`SimEnv`]: simulated
//! clock, timers and disk) with two changes: its tasks belong to the node, so that a crash
//! kills them together, and each partition's log commits through its group
//! ([`chorus_replication::ReplicatedDurability`]: a `Replica` on the simulation's clock, its
//! entries in the node's journal, its messages on the simulated network). Group `p` is
//! partition `p`; the directory is group `partitions`.
//!
//! Users, a workspace and its channels are made through whichever node leads the
//! directory; then writers post to the channels through whichever node leads each
//! channel's partition (a node that does not lead refuses, and the writer tries another),
//! sending a post again with the same `client_msg_id` after an answer it did not get, while
//! nodes crash and restart, and the network loses, delays and partitions. After the faults
//! heal, each channel must take one more post, and then every node's history of every
//! channel must be the same, with every acknowledged post exactly once at the seq its
//! acknowledgement named, and nothing that was never sent.

use super::net::{Net, CALM};
use super::{catch_seed, stall_text, NodeCtx, FAULTY};
use crate::env::SimEnv;
use crate::executor::{Executor, JoinHandle};
use crate::storage::SlowRoot;
use chorus_engine::blob::StorageBlobStore;
use chorus_engine::domain::{ChannelKind, DomainError};
use chorus_engine::env::{DirOf, Env};
use chorus_engine::ids::{ChannelId, UserId};
use chorus_engine::{Engine, EngineError, IoError, Unavailable};
use chorus_log::{Log, SimConfig, SimRoot, StorageRoot};
use chorus_replication::engine_env::ReplicatedDurability;
use chorus_replication::Journal;
use futures::future::{select, Either};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::rc::Rc;
use std::time::{Duration, Instant};

type Dir = <SlowRoot as StorageRoot>::Dir;

/// Simulated time the faults last.
const FAULT_TIME: Duration = Duration::from_millis(2_000);
/// How long the healed cluster has to take a post in every channel and agree.
const CONVERGE_TIME: Duration = Duration::from_secs(30);
/// A writer gives up on an answer after this long, and sends the post again.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
/// Compaction of the groups' Raft logs, every this many entries applied.
const COMPACT_EVERY: u64 = 16;
const STEPS_MAX: u64 = 4_000_000;

/// What one node's shard shares between its partitions.
struct NodePart {
    ctx: NodeCtx,
    journal: futures::lock::Mutex<Option<Rc<Journal<Dir>>>>,
}

/// A simulated cluster node's environment (see the module documentation).
#[derive(Clone)]
pub struct NodeEnv {
    inner: SimEnv,
    part: Rc<NodePart>,
}

fn io(what: String, e: impl std::fmt::Display) -> EngineError {
    EngineError::Io(IoError::new(what, std::io::Error::other(e.to_string())))
}

impl Env for NodeEnv {
    type Root = SlowRoot;
    type Blobs = StorageBlobStore<SlowRoot>;
    type Task = JoinHandle;
    type Durability = ReplicatedDurability<Dir>;

    fn root(&self) -> &SlowRoot {
        self.inner.root()
    }

    fn blobs(&self) -> &StorageBlobStore<SlowRoot> {
        self.inner.blobs()
    }

    fn now(&self) -> Instant {
        self.inner.now()
    }

    fn unix_us(&self) -> u64 {
        self.inner.unix_us()
    }

    fn sleep(&self, duration: Duration) -> impl Future<Output = ()> + 'static {
        self.inner.sleep(duration)
    }

    fn spawn(&self, task: impl Future<Output = ()> + 'static) -> JoinHandle {
        self.part.ctx.ex.spawn_owned(self.part.ctx.node, task)
    }

    fn spawn_blocking<T, F>(&self, work: F) -> impl Future<Output = T> + 'static
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        self.inner.spawn_blocking(work)
    }

    fn yield_if_needed(&self) -> impl Future<Output = ()> + 'static {
        self.inner.yield_if_needed()
    }

    fn logs_sync_every_append(&self) -> bool {
        // As a real cluster node's: the event logs are appended unsynced.
        false
    }

    async fn durability(
        &self,
        partition: u32,
        log: Log<DirOf<Self>>,
    ) -> Result<ReplicatedDurability<Dir>, EngineError> {
        let part = &self.part;
        let g = u64::from(partition);
        let root = self.root().clone();
        let journal = {
            let mut held = part.journal.lock().await;
            match held.as_ref() {
                Some(j) => j.clone(),
                None => {
                    let dir = root
                        .dir("journal")
                        .await
                        .map_err(|e| io("journal".into(), e))?;
                    let j = Journal::open(dir, super::log_config(), 300)
                        .await
                        .map_err(|e| io("journal".into(), e))?;
                    let j = Rc::new(j);
                    *held = Some(j.clone());
                    j
                }
            }
        };
        let (rlog, task) = part
            .ctx
            .open_group(&root, journal, g, log, COMPACT_EVERY)
            .await
            .map_err(|e| io(format!("group {g}"), e))?;
        let replica = rlog.replica().clone();
        Ok(ReplicatedDurability::new(
            rlog,
            Box::new(move || {
                Box::pin(async move {
                    replica.stop_after_hand_off();
                    task.await;
                    Ok(())
                })
            }),
        ))
    }
}

/// What a seed of the engine cluster ran and saw.
#[derive(Debug, Clone, Default)]
pub struct EngineClusterReport {
    pub seed: u64,
    pub nodes: u64,
    pub partitions: u32,
    pub channels: u64,
    pub steps: u64,
    pub simulated: Duration,
    /// Posts acknowledged.
    pub acked: u64,
    /// Posts whose answer never came (sent again with the same key, or given up).
    pub unanswered: u64,
    /// Posts delivered to the subscribers, over every node.
    pub delivered: u64,
    pub crashes: u64,
    /// Nodes paused (SIGSTOP) and resumed.
    pub pauses: u64,
    /// Histories read under the faults, and those a node refused (no leader confirmed).
    pub reads: u64,
    pub reads_refused: u64,
    /// Engines closed and opened again.
    pub clean_restarts: u64,
    pub partitions_cut: u64,
    /// Messages in each node's history at the end (summed over the channels).
    pub messages: u64,
    pub digest: u64,
}

/// A channel's history on one node: (seq, text), oldest first.
type History = Vec<(u64, String)>;

/// `[node][channel]`: every node's history of every channel.
type Histories = Vec<Vec<History>>;

/// A node's engine, and whether one of its groups ended on a storage error.
type Running = (Engine, Rc<Cell<bool>>);

/// What the writers learned.
#[derive(Default)]
struct Truth {
    /// Every text sent, by channel.
    sent: BTreeMap<ChannelId, BTreeSet<String>>,
    /// Text → the seq its acknowledgement named.
    acked: BTreeMap<String, u64>,
    /// The texts acknowledged in each channel, in the order the acknowledgements came.
    acked_in: BTreeMap<ChannelId, Vec<String>>,
    unanswered: u64,
    /// Every post a subscriber was delivered: (node, channel as its frames name it, seq,
    /// text).
    delivered: Vec<(u64, String, u64, String)>,
}

struct World {
    ex: Executor,
    n: u64,
    partitions: u32,
    roots: Vec<SimRoot>,
    net: Rc<Net>,
    election_ticks: Vec<usize>,
    engines: RefCell<Vec<Option<Running>>>,
    /// Nodes opening now.
    starting: RefCell<BTreeSet<u64>>,
    /// Nodes closing for a planned restart.
    closing: RefCell<BTreeSet<u64>>,
    /// Engines started so far on each node (`[node - 1]`: the number of its life).
    lives_started: RefCell<Vec<u64>>,
    truth: RefCell<Truth>,
    failure: RefCell<Option<String>>,
    writing: Cell<bool>,
    /// The user whose subscription on every node watches every channel, once made.
    watcher: Cell<Option<UserId>>,
    /// The posts made around a cut-off leader ([`World::write_around`]).
    around: RefCell<Vec<JoinHandle>>,
    /// The user who reads histories under the faults, and the channels, once made.
    reader: Cell<Option<UserId>>,
    channels: RefCell<Vec<ChannelId>>,
    /// The nodes whose watcher is subscribed in their current life.
    watching: RefCell<BTreeSet<u64>>,
    report: RefCell<EngineClusterReport>,
}

/// A refusal a writer answers by asking another node (or the same one later).
fn retryable(e: &EngineError) -> bool {
    matches!(
        e,
        EngineError::Unavailable(
            Unavailable::NotLeader { .. }
                | Unavailable::MetaNotLeader { .. }
                | Unavailable::ShuttingDown
                | Unavailable::ShardStopped
        ) | EngineError::Domain(DomainError::NotFound(_))
    )
}

impl World {
    fn engine(&self, node: u64) -> Option<Engine> {
        self.engines.borrow()[node as usize - 1]
            .as_ref()
            .map(|(e, _)| e.clone())
    }

    fn fail(&self, problem: String) {
        self.failure.borrow_mut().get_or_insert(problem);
    }

    /// Starts node `node` on its disk, unless it is up or opening.
    async fn start(self: Rc<World>, node: u64) {
        if self.engine(node).is_some() || !self.starting.borrow_mut().insert(node) {
            return;
        }
        let ticks = self.election_ticks[node as usize - 1];
        let (ctx, failed) = NodeCtx::new(&self.ex, &self.net, node, self.n, ticks);
        let part = Rc::new(NodePart {
            ctx,
            journal: futures::lock::Mutex::new(None),
        });
        let inner = SimEnv::new(self.ex.clone(), self.roots[node as usize - 1].clone());
        let env = move |_| NodeEnv {
            inner: inner.clone(),
            part: part.clone(),
        };
        let mut config = crate::engine_config(1, self.partitions);
        // Queues of a real size: the faults here are the cluster's, not backpressure.
        config.inbox_capacity = 64;
        config.partition_queue_requests = 16;
        config.subscriber_queue_frames = 1024;
        let opened = Engine::start_local(config, env).await;
        self.starting.borrow_mut().remove(&node);
        match opened {
            Ok(engine) => {
                // Every snapshot here was written whole and holds committed events only:
                // each must be usable, however far the node's directory lags.
                for r in engine.recovery() {
                    if let Some(why) = r.snapshot_refused {
                        self.fail(format!(
                            "node {node} could not use partition {}'s snapshot: {why}",
                            r.partition
                        ));
                    }
                }
                self.lives_started.borrow_mut()[node as usize - 1] += 1;
                self.engines.borrow_mut()[node as usize - 1] = Some((engine.clone(), failed));
                if let Some(user) = self.watcher.get() {
                    drop(
                        self.ex
                            .spawn_owned(node, self.clone().watch(node, engine, user)),
                    );
                }
            }
            Err(e) => {
                // A failed fsync still armed, or a group that could not open: the node
                // stays down, to be started again.
                self.ex.kill_owned(node);
                self.net.detach(node);
                self.roots[node as usize - 1].crash();
                if !self.writing.get() {
                    self.fail(format!("node {node} did not open after the faults: {e}"));
                }
            }
        }
    }

    /// Subscribes `user` on node `node` and notes every post delivered, holding each
    /// channel's seqs to rising order within a subscription. Dies with the node.
    async fn watch(self: Rc<World>, node: u64, engine: Engine, user: UserId) {
        loop {
            let mut sub = loop {
                match engine.subscribe(user).await {
                    Ok(sub) => break sub,
                    Err(_) => self.ex.sleep(Duration::from_millis(10)).await,
                }
            };
            let mut last: BTreeMap<String, u64> = BTreeMap::new();
            self.watching.borrow_mut().insert(node);
            while let Ok(frame) = sub.recv().await {
                let Ok(v) = serde_json::from_slice::<serde_json::Value>(&frame) else {
                    self.fail(format!("node {node} delivered a frame that is not JSON"));
                    return;
                };
                if v["type"] != "event" {
                    continue;
                }
                let channel = v["channel_id"].as_str().unwrap_or_default().to_owned();
                let seq = v["seq"].as_u64().unwrap_or_default();
                if let Some(&before) = last.get(&channel) {
                    if seq <= before {
                        self.fail(format!(
                            "node {node} delivered seq {seq} of {channel} after seq {before}"
                        ));
                        return;
                    }
                }
                last.insert(channel.clone(), seq);
                if v["event"]["type"] == "message:new" {
                    let text = v["event"]["message"]["text"].as_str().unwrap_or_default();
                    self.truth
                        .borrow_mut()
                        .delivered
                        .push((node, channel, seq, text.to_owned()));
                }
            }
            // Cut off (a slow reader): subscribe again.
        }
    }

    /// Closes node `node`'s engine and starts it again, unless it crashes meanwhile.
    async fn clean_restart(self: Rc<World>, node: u64) {
        let life = self.lives_started.borrow()[node as usize - 1];
        if let Some(engine) = self.engine(node) {
            engine.close().await;
            let same = self.lives_started.borrow()[node as usize - 1] == life;
            if same && self.engine(node).is_some() {
                self.watching.borrow_mut().remove(&node);
                self.engines.borrow_mut()[node as usize - 1] = None;
                self.net.detach(node);
                self.ex.kill_owned(node);
                self.report.borrow_mut().clean_restarts += 1;
                self.clone().start(node).await;
            }
        }
        self.closing.borrow_mut().remove(&node);
    }

    /// A power loss on node `node`.
    fn crash(&self, node: u64) {
        self.watching.borrow_mut().remove(&node);
        let engine = self.engines.borrow_mut()[node as usize - 1].take();
        drop(engine);
        self.net.detach(node);
        self.ex.kill_owned(node);
        self.ex.resume(node);
        self.roots[node as usize - 1].crash();
    }

    /// Pauses node `node` (SIGSTOP) for `ms`, then resumes it (SIGCONT): its tasks stop,
    /// its clock and everyone else's go on, and messages to it wait.
    fn pause(self: &Rc<World>, node: u64, ms: u64) {
        let resumed = self.ex.pause_for(node, Duration::from_millis(ms));
        self.report.borrow_mut().pauses += 1;
        let w = self.clone();
        drop(self.ex.spawn(async move {
            if resumed.await {
                // A leader that wakes may not know yet that another was elected: read
                // every channel there at once.
                let reader = w.reader.get();
                let channels = w.channels.borrow().clone();
                if let Some(user) = reader {
                    for c in channels {
                        if !w.check_read(node, user, c).await {
                            return;
                        }
                    }
                }
            }
        }));
    }

    /// Reads a channel's whole history on a node now and then while the writers write:
    /// a read must see every post acknowledged before it was sent, whichever node
    /// acknowledged it (`API.md` §15), or be refused.
    async fn read_under_faults(self: Rc<World>, user: UserId, channels: Vec<ChannelId>) {
        while self.writing.get() && self.failure.borrow().is_none() {
            self.ex
                .sleep(Duration::from_micros(1_000 + self.ex.below(30_000)))
                .await;
            let node = 1 + self.ex.below(self.n);
            let c = channels[self.ex.below(channels.len() as u64) as usize];
            if !self.check_read(node, user, c).await {
                return;
            }
        }
    }

    /// Posts to channel `c` through any node but `cut` (its leader, cut off), and once the
    /// post is acknowledged, reads the channel on `cut`.
    async fn write_around(self: Rc<World>, cut: u64, user: UserId, c: ChannelId) {
        let k = self.report.borrow().partitions_cut;
        let text = format!("around{k}");
        let by = self.ex.now() + FAULT_TIME;
        if self.post_avoiding(Some(cut), user, c, text, by).await {
            self.check_read(cut, user, c).await;
        }
    }

    /// Reads channel `c`'s whole history on node `node` as `user`, and checks that it
    /// holds every post acknowledged before the read was sent; false if it did not.
    async fn check_read(&self, node: u64, user: UserId, c: ChannelId) -> bool {
        {
            let Some(engine) = self.engine(node) else {
                return true;
            };
            let before: Vec<String> = self
                .truth
                .borrow()
                .acked_in
                .get(&c)
                .cloned()
                .unwrap_or_default();
            let read = {
                let read = std::pin::pin!(history(&engine, user, c));
                match select(read, self.ex.sleep(ANSWER_TIMEOUT)).await {
                    Either::Left((read, _)) => read,
                    Either::Right(_) => None,
                }
            };
            self.report.borrow_mut().reads += 1;
            let Some(read) = read else {
                self.report.borrow_mut().reads_refused += 1;
                return true;
            };
            let have: BTreeSet<&String> = read.iter().map(|(_, t)| t).collect();
            if let Some(missing) = before.iter().find(|t| !have.contains(t)) {
                let seq = self.truth.borrow().acked.get(missing).copied();
                self.fail(format!(
                    "a stale read: node {node}'s history of {c} ({} messages, up to seq {:?}) \
                     lacks {missing}, acknowledged at seq {seq:?} before the read was sent",
                    read.len(),
                    read.last().map(|(s, _)| *s)
                ));
                return false;
            }
        }
        true
    }

    /// Runs `write` on the nodes in turn, from a random one, until one takes it or
    /// `deadline`; `None` then.
    async fn anywhere<T, F, Fut>(&self, deadline: Instant, write: F) -> Option<T>
    where
        F: Fn(Engine) -> Fut,
        Fut: Future<Output = Result<T, EngineError>>,
    {
        self.anywhere_but(None, deadline, write).await
    }

    /// [`World::anywhere`], never on node `avoid`.
    async fn anywhere_but<T, F, Fut>(
        &self,
        avoid: Option<u64>,
        deadline: Instant,
        write: F,
    ) -> Option<T>
    where
        F: Fn(Engine) -> Fut,
        Fut: Future<Output = Result<T, EngineError>>,
    {
        let mut node = 1 + self.ex.below(self.n);
        while self.ex.now() < deadline {
            let engine = self.engine(node).filter(|_| avoid != Some(node));
            if let Some(engine) = engine {
                let answer = {
                    let call = std::pin::pin!(write(engine));
                    match select(call, self.ex.sleep(ANSWER_TIMEOUT)).await {
                        Either::Left((answer, _)) => Some(answer),
                        Either::Right(_) => None,
                    }
                };
                match answer {
                    Some(Ok(t)) => return Some(t),
                    Some(Err(
                        e @ EngineError::Unavailable(Unavailable::PartitionStopped { .. }),
                    )) => {
                        // It would answer nothing more until its node restarted, and no
                        // disk here fails: a committed event that did not fit, or a log
                        // that read short.
                        self.fail(format!("on node {node}: {e}"));
                        return None;
                    }
                    Some(Err(e)) if retryable(&e) => {}
                    Some(Err(e)) => {
                        self.fail(format!("a write on node {node} failed: {e}"));
                        return None;
                    }
                    None => {}
                }
            }
            node = node % self.n + 1;
            self.ex.sleep(Duration::from_millis(5)).await;
        }
        None
    }

    /// Posts `text` to `channel` as `user` until a node acknowledges it (the same key each
    /// time) or the writing ends; records what it learns.
    async fn post(
        &self,
        user: UserId,
        channel: ChannelId,
        text: String,
        deadline: Instant,
    ) -> bool {
        self.post_avoiding(None, user, channel, text, deadline)
            .await
    }

    /// [`World::post`], never through node `avoid`.
    async fn post_avoiding(
        &self,
        avoid: Option<u64>,
        user: UserId,
        channel: ChannelId,
        text: String,
        deadline: Instant,
    ) -> bool {
        self.truth
            .borrow_mut()
            .sent
            .entry(channel)
            .or_default()
            .insert(text.clone());
        let t = text.clone();
        let answer = self
            .anywhere_but(avoid, deadline, |e| {
                let t = t.clone();
                async move { e.post(user, channel, &t, Some(&t), None).await }
            })
            .await;
        let mut truth = self.truth.borrow_mut();
        match answer {
            Some((view, _)) => {
                if !truth.acked.contains_key(&text) {
                    truth
                        .acked_in
                        .entry(channel)
                        .or_default()
                        .push(text.clone());
                }
                if let Some(before) = truth.acked.insert(text.clone(), view.seq) {
                    if before != view.seq {
                        drop(truth);
                        self.fail(format!(
                            "{text} was acknowledged at seq {before}, then at {}",
                            view.seq
                        ));
                    }
                }
                true
            }
            None => {
                truth.unanswered += 1;
                false
            }
        }
    }

    /// The faults: crashes and restarts, partitions, until the fault time is over.
    async fn nemesis(self: Rc<World>) {
        let end = self.ex.now() + FAULT_TIME;
        while self.ex.now() < end && self.failure.borrow().is_none() {
            self.ex
                .sleep(Duration::from_millis(30 + self.ex.below(150)))
                .await;
            for node in 1..=self.n {
                let failed = self.engines.borrow()[node as usize - 1]
                    .as_ref()
                    .is_some_and(|(_, f)| f.get());
                if failed {
                    self.crash(node);
                    drop(self.ex.spawn(self.clone().start(node)));
                }
            }
            match self.ex.below(100) {
                0..=24 => {
                    let node = 1 + self.ex.below(self.n);
                    if self.engine(node).is_some() {
                        self.crash(node);
                        self.report.borrow_mut().crashes += 1;
                        let (w, down) = (self.clone(), 20 + self.ex.below(300));
                        drop(self.ex.spawn(async move {
                            w.ex.sleep(Duration::from_millis(down)).await;
                            w.clone().start(node).await;
                        }));
                    }
                }
                25..=44 => {
                    self.net.cut_at_random(false);
                    self.report.borrow_mut().partitions_cut += 1;
                }
                45..=64 => self.net.heal(),
                // A planned restart: the engine closes (its groups hand their leaderships
                // off first), and opens again on the same disk.
                65..=72 => {
                    let node = 1 + self.ex.below(self.n);
                    if self.engine(node).is_some() && self.closing.borrow_mut().insert(node) {
                        drop(self.ex.spawn(self.clone().clean_restart(node)));
                    }
                }
                // SIGSTOP, and SIGCONT up to 600 ms later (past an election timeout).
                73..=82 => {
                    let node = 1 + self.ex.below(self.n);
                    if self.engine(node).is_some() && !self.ex.is_paused(node) {
                        self.pause(node, 20 + self.ex.below(580));
                    }
                }
                // A channel's leader cut off alone while a post goes through the others:
                // it must not answer a read from before the post.
                93..=96 => {
                    let channels = self.channels.borrow().clone();
                    if let (Some(user), false) = (self.reader.get(), channels.is_empty()) {
                        let c = channels[self.ex.below(channels.len() as u64) as usize];
                        let group = u64::from(chorus_engine::domain::meta::partition_of(c));
                        if let Some(node) = (1..=self.n).find(|&node| self.net.leads(node, group)) {
                            let mut sides = vec![0; self.n as usize];
                            sides[node as usize - 1] = 1;
                            self.net.partition(sides, None);
                            self.report.borrow_mut().partitions_cut += 1;
                            let task = self.ex.spawn(self.clone().write_around(node, user, c));
                            self.around.borrow_mut().push(task);
                        }
                    }
                }
                // A partition's leader paused past an election timeout: it wakes still
                // believing it leads.
                83..=92 => {
                    let group = self.ex.below(u64::from(self.partitions));
                    let leader = (1..=self.n).find(|&node| self.net.leads(node, group));
                    if let Some(node) = leader.filter(|&node| !self.ex.is_paused(node)) {
                        self.pause(node, 250 + self.ex.below(350));
                    }
                }
                _ => {}
            }
        }
    }
}

/// Runs one seed of the engine cluster; `Err` names the first broken rule.
pub fn run_engine_cluster_seed(seed: u64) -> Result<EngineClusterReport, String> {
    catch_seed("engine cluster", seed, || run(seed))
}

fn run(seed: u64) -> Result<EngineClusterReport, String> {
    let ex = Executor::new(seed);
    let n = 3;
    let partitions = 1 + ex.below(3) as u32;
    let world = Rc::new(World {
        n,
        partitions,
        roots: (0..n)
            .map(|i| {
                SimRoot::new(SimConfig {
                    seed: seed.wrapping_mul(0x2545_F491).wrapping_add(i),
                    yield_permille: 100,
                })
            })
            .collect(),
        net: Net::new(ex.clone(), n, CALM),
        election_ticks: (0..n).map(|_| 10 + ex.below(10) as usize).collect(),
        engines: RefCell::new((0..n).map(|_| None).collect()),
        starting: RefCell::default(),
        closing: RefCell::default(),
        lives_started: RefCell::new(vec![0; n as usize]),
        truth: RefCell::default(),
        failure: RefCell::new(None),
        writing: Cell::new(true),
        watcher: Cell::new(None),
        reader: Cell::new(None),
        channels: RefCell::default(),
        around: RefCell::default(),
        watching: RefCell::default(),
        report: RefCell::new(EngineClusterReport {
            seed,
            nodes: n,
            partitions,
            ..EngineClusterReport::default()
        }),
        ex: ex.clone(),
    });
    let _teardown = Teardown(world.clone());
    let fail = |what: String| {
        format!(
            "engine cluster seed {seed} ({n} nodes, {partitions} partitions): {what}; replay \
             with CHORUS_ENGINE_CLUSTER_SEED={seed}"
        )
    };
    let histories: Rc<RefCell<Option<Histories>>> = Rc::default();
    {
        let (w, out) = (world.clone(), histories.clone());
        drop(ex.spawn(async move {
            match scenario(w.clone()).await {
                Ok(h) => *out.borrow_mut() = Some(h),
                Err(e) => w.fail(e),
            }
        }));
    }
    ex.run_until(
        || histories.borrow().is_some() || world.failure.borrow().is_some(),
        STEPS_MAX,
    )
    .map_err(|s| fail(stall_text(s)))?;
    if let Some(problem) = world.failure.borrow().clone() {
        return Err(fail(problem));
    }
    let histories = histories.borrow_mut().take().expect("set");
    let truth = world.truth.borrow();
    check(&histories, &truth).map_err(fail)?;
    let mut report = world.report.borrow().clone();
    report.steps = ex.steps();
    report.simulated = ex.elapsed();
    report.acked = truth.acked.len() as u64;
    report.unanswered = truth.unanswered;
    report.delivered = truth.delivered.len() as u64;
    report.channels = histories[0].len() as u64;
    report.messages = histories[0].iter().map(|c| c.len() as u64).sum();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (seq, text) in histories.iter().flatten().flatten() {
        for b in seq.to_le_bytes().iter().chain(text.as_bytes()) {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    report.digest = h;
    Ok(report)
}

/// Breaks the cycles a run leaves, whatever its outcome.
struct Teardown(Rc<World>);

impl Drop for Teardown {
    fn drop(&mut self) {
        self.0
            .engines
            .borrow_mut()
            .iter_mut()
            .for_each(|e| *e = None);
        self.0.ex.kill_all();
        for node in 1..=self.0.n {
            self.0.net.detach(node);
        }
    }
}

/// Setup, writes under faults, convergence; returns every node's history of every
/// channel: `[node][channel]`, (seq, text) oldest first.
async fn scenario(w: Rc<World>) -> Result<Histories, String> {
    for node in 1..=w.n {
        w.clone().start(node).await;
    }
    let setup_by = w.ex.now() + CONVERGE_TIME;
    let users = 2 + w.ex.below(2);
    let mut ids = Vec::new();
    for u in 0..users {
        let email = format!("u{u}@example.com");
        let user = w
            .anywhere(setup_by, |e| {
                let email = email.clone();
                async move { e.create_user(&email, "U", "hash").await }
            })
            .await
            .ok_or("setup: no node made a user")?;
        ids.push((user.id, email));
    }
    let owner = ids[0].0;
    let ws = w
        .anywhere(setup_by, |e| async move {
            e.create_workspace(owner, "acme").await
        })
        .await
        .ok_or("setup: no node made the workspace")?;
    for (_, email) in &ids[1..] {
        w.anywhere(setup_by, |e| {
            let email = email.clone();
            async move { e.add_member(owner, ws.id, &email).await }
        })
        .await
        .ok_or("setup: no node added a member")?;
    }
    let mut channels = Vec::new();
    for c in 0..1 + w.ex.below(3) {
        let name = format!("c{c}");
        let channel = w
            .anywhere(setup_by, |e| {
                let name = name.clone();
                async move {
                    e.create_channel(owner, ws.id, &name, ChannelKind::Public)
                        .await
                }
            })
            .await
            .ok_or("setup: no node made a channel")?;
        for &(user, _) in &ids[1..] {
            w.anywhere(setup_by, |e| async move { e.join(user, channel.id).await })
                .await
                .ok_or("setup: no node took a join")?;
        }
        channels.push(channel.id);
    }
    if let Some(f) = w.failure.borrow().clone() {
        return Err(f);
    }
    // A member of every channel watches on every node.
    let watcher = ids[ids.len() - 1].0;
    w.watcher.set(Some(watcher));
    for node in 1..=w.n {
        if let Some(engine) = w.engine(node) {
            drop(w.ex.spawn_owned(node, w.clone().watch(node, engine, watcher)));
        }
    }
    // Writes under faults.
    w.net.set_weather(FAULTY);
    let mut writers = Vec::new();
    for (i, &c) in channels.iter().enumerate() {
        for (k, &(user, _)) in ids.iter().enumerate() {
            let w2 = w.clone();
            writers.push(w.ex.spawn(async move {
                let mut m = 0;
                while w2.writing.get() && w2.failure.borrow().is_none() {
                    let text = format!("c{i}u{k}m{m}");
                    m += 1;
                    // Gives up only when the writing ends: a post not acknowledged by then
                    // may or may not be in the channel.
                    let by = w2.ex.now() + CONVERGE_TIME;
                    let _ = w2.post(user, c, text, by).await;
                    w2.ex
                        .sleep(Duration::from_micros(w2.ex.below(20_000)))
                        .await;
                }
            }));
        }
    }
    w.reader.set(Some(owner));
    *w.channels.borrow_mut() = channels.clone();
    let reader =
        w.ex.spawn(w.clone().read_under_faults(owner, channels.clone()));
    w.clone().nemesis().await;
    w.writing.set(false);
    for node in 1..=w.n {
        w.ex.resume(node);
    }
    reader.await;
    // Heal, and bring every node back.
    w.net.heal();
    w.net.set_weather(CALM);
    let by = w.ex.now() + CONVERGE_TIME;
    while !w.closing.borrow().is_empty() {
        w.ex.sleep(Duration::from_millis(5)).await;
    }
    for node in 1..=w.n {
        let failed = w.engines.borrow()[node as usize - 1]
            .as_ref()
            .is_some_and(|(_, f)| f.get());
        if failed {
            w.crash(node);
        }
        while w.starting.borrow().contains(&node) {
            w.ex.sleep(Duration::from_millis(5)).await;
        }
        w.clone().start(node).await;
        if w.engine(node).is_none() {
            return Err(format!("node {node} is not up after the faults"));
        }
    }
    // Posts still waiting for an answer get it (or give up) before anything is read.
    for writer in writers {
        writer.await;
    }
    let around = std::mem::take(&mut *w.around.borrow_mut());
    for task in around {
        task.await;
    }
    // Every node's watcher is subscribed before the last posts, which it must get.
    while w.watching.borrow().len() < w.n as usize {
        if w.ex.now() > by {
            return Err("not every node's subscriber subscribed after the faults".into());
        }
        w.ex.sleep(Duration::from_millis(5)).await;
    }
    // Liveness: one more post in every channel.
    for (i, &c) in channels.iter().enumerate() {
        if !w.post(owner, c, format!("final{i}"), by).await {
            return Err(format!(
                "channel c{i} took no post within {CONVERGE_TIME:?} of the faults' end"
            ));
        }
    }
    // Every node's history, once they agree (a follower may still be applying).
    loop {
        let mut all = Vec::new();
        for node in 1..=w.n {
            let engine = w.engine(node).ok_or(format!("node {node} went down"))?;
            let mut per_channel = Vec::new();
            for &c in &channels {
                per_channel.push(history(&engine, owner, c).await);
            }
            all.push(per_channel);
        }
        let agree = all.iter().all(|h| h.iter().all(Option::is_some))
            && all.windows(2).all(|p| p[0] == p[1]);
        // Every node delivers the last posts (made once every node was up) to its own
        // subscriber.
        let delivered = (1..=w.n).all(|node| {
            (0..channels.len()).all(|i| {
                let last = format!("final{i}");
                w.truth
                    .borrow()
                    .delivered
                    .iter()
                    .any(|(n, _, _, text)| *n == node && *text == last)
            })
        });
        // Agreeing is not enough: the node that acknowledged the last posts may have died
        // at once, before the others applied them. Every acknowledged post must be there.
        let missing = if agree {
            let have: BTreeSet<&String> =
                all[0].iter().flatten().flatten().map(|(_, t)| t).collect();
            let truth = w.truth.borrow();
            truth.acked.keys().filter(|t| !have.contains(t)).count()
        } else {
            0
        };
        if agree && delivered && missing == 0 {
            return Ok(all
                .into_iter()
                .map(|node| node.into_iter().map(Option::unwrap).collect())
                .collect());
        }
        if w.ex.now() > by {
            let ends: Vec<Vec<Option<usize>>> = all
                .iter()
                .map(|n| n.iter().map(|c| c.as_ref().map(Vec::len)).collect())
                .collect();
            return Err(format!(
                "the nodes' histories did not agree, or the last posts were not delivered on \
                 every node, within {CONVERGE_TIME:?}: agree {agree}, delivered {delivered}, \
                 acknowledged posts missing {missing}; messages per node and channel {ends:?}"
            ));
        }
        w.ex.sleep(Duration::from_millis(20)).await;
    }
}

/// A channel's whole history on one node, (seq, text) oldest first; `None` if the node
/// refuses the read now.
async fn history(engine: &Engine, user: UserId, c: ChannelId) -> Option<History> {
    let mut out = Vec::new();
    let mut before = None;
    loop {
        let page = engine.history(user, c, before, 100).await.ok()?;
        out.extend(page.messages.iter().map(|m| (m.seq, m.text.clone())));
        match page.next_cursor {
            Some(cursor) => before = Some(cursor),
            None => break,
        }
    }
    out.reverse();
    Some(out)
}

/// The fault test's rules on every node's histories.
fn check(histories: &Histories, truth: &Truth) -> Result<(), String> {
    let first = &histories[0];
    for (i, node) in histories.iter().enumerate().skip(1) {
        if node != first {
            return Err(format!(
                "node {} and node 1 hold different histories",
                i + 1
            ));
        }
    }
    let sent: BTreeSet<&String> = truth.sent.values().flatten().collect();
    let mut seen: BTreeMap<&String, u64> = BTreeMap::new();
    for channel in first {
        for w in channel.windows(2) {
            if w[1].0 <= w[0].0 {
                return Err(format!("seqs out of order: {} after {}", w[1].0, w[0].0));
            }
        }
        for (seq, text) in channel {
            if !sent.contains(text) {
                return Err(format!("{text:?} at seq {seq} was never sent"));
            }
            if let Some(before) = seen.insert(text, *seq) {
                return Err(format!("{text} is there twice, at seqs {before} and {seq}"));
            }
        }
    }
    // Nothing delivered that is not in the history, where it was delivered.
    for (node, channel, seq, text) in &truth.delivered {
        if seen.get(text) != Some(seq) {
            return Err(format!(
                "node {node} delivered {text:?} as seq {seq} of {channel}, but the history has \
                 it at {:?}",
                seen.get(text)
            ));
        }
    }
    for (text, &seq) in &truth.acked {
        match seen.get(text) {
            Some(&at) if at == seq => {}
            Some(&at) => {
                return Err(format!(
                    "{text} was acknowledged at seq {seq} but is at {at}"
                ))
            }
            None => return Err(format!("{text}, acknowledged at seq {seq}, is lost")),
        }
    }
    Ok(())
}
