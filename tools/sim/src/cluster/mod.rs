//! The cluster simulation: partitions replicated as Raft groups, run as a cluster node
//! runs them, under the seeded scheduler.
//!
//! One run is one seed. It starts 3 or 5 simulated nodes on one thread. Each node is a
//! simulated process with its own simulated disk ([`SlowRoot`] over a [`SimRoot`]): one
//! Raft journal, and for each of 1 to 3 groups a state directory, an event log, and the
//! replica task that a cluster node runs ([`chorus_replication::Replica`], its `Ready`
//! loop over [`chorus_replication::Group`], the event log as its state machine,
//! [`chorus_replication::ReplicatedLog`]), on the simulation's clock. The nodes talk over
//! the simulated network ([`net`]), which loses, delays, duplicates and reorders messages
//! and is cut into partitions (halves, one node alone, a bridge).
//!
//! Writers commit events through whichever node they believe leads, as the engine's
//! partitions do, following `NotLeader` hints. Meanwhile the nodes crash (their tasks
//! dropped, their disks keeping only what was synced), restart after a while, fail an
//! fsync (the node stops and recovers from its disk and its peers), or restart cleanly after
//! handing their leaderships off; leaderships move to each group's preferred node, logs are
//! compacted behind snapshots every few entries, and replicas far behind are caught up by
//! snapshot and a fetch of events from a peer.
//!
//! Then the faults stop and the network heals; every node comes back; each group must
//! commit one more event within a bounded time (liveness), and every replica must apply
//! everything. The checker then holds every group to the fault test's rules
//! ([`check`]): every node's event log holds the same events in the same order; every
//! acknowledged event is there exactly once, at the offset its acknowledgement named;
//! nothing that was never proposed is there, nor anything whose proposal was refused.
//!
//! `CHORUS_CLUSTER_SEED=<seed>` replays one seed; a seed is a pure function of its number.

mod check;
pub mod engines;
pub mod net;

use crate::executor::{Executor, JoinHandle, Stall};
use crate::storage::SlowRoot;
use chorus_log::{Entry as Event, Log, LogConfig, SimConfig, SimRoot, StorageRoot};
use chorus_replication::{
    placement, Clock, Group, Journal, ProposeError, RaftLogError, Replica, ReplicatedLog,
};
use futures::future::{select, Either, LocalBoxFuture};
use net::{Net, Weather, CALM};
use raft::eraftpb::ConfState;
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::time::{Duration, Instant};

type Dir = <SlowRoot as StorageRoot>::Dir;

/// raft-rs's tick, as a cluster node's (`NodeConfig`).
const TICK: Duration = Duration::from_millis(20);
/// Simulated time the faults last.
const FAULT_TIME: Duration = Duration::from_millis(2_500);
/// How long the healed cluster has to commit one more event in every group, and then to
/// apply everything on every replica.
const CONVERGE_TIME: Duration = Duration::from_secs(20);
/// A writer gives up waiting for an answer after this long (its node may have died with
/// the proposal).
const COMMIT_TIMEOUT: Duration = Duration::from_secs(2);
/// A group compacts its log once it applied this many entries past its snapshot.
const COMPACT_EVERY: u64 = 12;
/// The most steps a run may take.
const STEPS_MAX: u64 = 3_000_000;

const FAULTY: Weather = Weather {
    drop_permille: 40,
    dup_permille: 20,
    delay_us_max: 3_000,
    unreported_permille: 200,
};

/// The simulation's clock, for the replicas.
struct SimClock(Executor);

impl Clock for SimClock {
    fn now(&self) -> Instant {
        self.0.now()
    }

    fn sleep(&self, duration: Duration) -> LocalBoxFuture<'static, ()> {
        Box::pin(self.0.sleep(duration))
    }
}

/// What a seed ran and what it saw.
#[derive(Debug, Clone, Default)]
pub struct ClusterReport {
    pub seed: u64,
    pub nodes: u64,
    pub groups: u64,
    pub steps: u64,
    pub simulated: Duration,
    /// Events acknowledged to writers.
    pub acked: u64,
    /// Proposals whose fate the writer never learned (kept or not; both are allowed).
    pub uncertain: u64,
    /// Proposals refused (never to appear).
    pub refused: u64,
    pub crashes: u64,
    /// Nodes paused (SIGSTOP) and resumed.
    pub pauses: u64,
    /// Read indexes asked under the faults; those answered at once under a leader's
    /// lease; those refused.
    pub reads: u64,
    pub leased_reads: u64,
    pub reads_refused: u64,
    pub disk_faults: u64,
    pub clean_restarts: u64,
    pub partitions: u64,
    /// Nodes removed from every group (and added back later).
    pub removals: u64,
    pub messages: u64,
    pub dropped: u64,
    pub fetches: u64,
    /// Events in each node's logs at the end (summed over the groups).
    pub events: u64,
    /// A digest of the logs, equal for every replay of the seed.
    pub digest: u64,
}

/// Everything the writers learned, for the checker.
#[derive(Default)]
struct Truth {
    /// Event id → its group, for every event proposed.
    proposed: BTreeMap<u64, u64>,
    /// Event id → the offset its acknowledgement named.
    acked: BTreeMap<u64, u64>,
    /// Events whose proposal was refused (`NotLeader`, `Dropped`): never in a log.
    refused: BTreeSet<u64>,
    uncertain: u64,
}

/// Where a node is.
enum NodeState {
    Down,
    /// Opening its disk.
    Starting,
    Up(Rc<Life>),
}

/// One node's current life.
struct Life {
    proposers: BTreeMap<u64, Rc<ReplicatedLog<Dir>>>,
    /// Set when a group's task ended on a storage error: the node must restart.
    failed: Rc<Cell<bool>>,
}

struct Sim {
    ex: Executor,
    n: u64,
    groups: u64,
    roots: Vec<SimRoot>,
    net: Rc<Net>,
    lives: RefCell<Vec<NodeState>>,
    /// Why each node last failed to open (during the faults it is started again).
    open_errors: RefCell<BTreeMap<u64, String>>,
    /// Random election timeouts, in ticks, by node: raft-rs draws its own from a
    /// generator no seed reaches, so each node gets a fixed one drawn from the seed.
    election_ticks: Vec<usize>,
    truth: RefCell<Truth>,
    /// The first broken rule, or an error that ends the run.
    failure: RefCell<Option<String>>,
    writing: Cell<bool>,
    /// The nodes the groups are placed over, once a membership change asked it.
    placed: RefCell<Option<Vec<u64>>>,
    /// Planned restarts under way.
    restarting: Cell<u32>,
    /// Events committed around a cut-off leader ([`Sim::write_around`]).
    around: RefCell<Vec<JoinHandle>>,
    next_id: Cell<u64>,
    report: RefCell<ClusterReport>,
}

/// A simulated node, as its groups see it.
struct NodeCtx {
    ex: Executor,
    net: Rc<Net>,
    node: u64,
    /// The cluster's nodes are 1 to this.
    nodes: u64,
    election_ticks: usize,
    /// Set when one of the node's groups ends on a storage error: the node must restart.
    failed: Rc<Cell<bool>>,
}

impl NodeCtx {
    /// Node `node` of a cluster of nodes 1 to `nodes`, with its election timeout; and the
    /// flag its groups set when one ends on a storage error.
    fn new(
        ex: &Executor,
        net: &Rc<Net>,
        node: u64,
        nodes: u64,
        election_ticks: usize,
    ) -> (NodeCtx, Rc<Cell<bool>>) {
        let failed = Rc::new(Cell::new(false));
        let ctx = NodeCtx {
            ex: ex.clone(),
            net: net.clone(),
            node,
            nodes,
            election_ticks,
            failed: failed.clone(),
        };
        (ctx, failed)
    }

    /// Opens group `g` over its event log `log`, as a cluster node opens a group
    /// (`Node::open_group`): placement's voters (3, or all if fewer), every other node a
    /// learner, the first voter the preferred leader, its state under `g<id>/state` and its
    /// entries in the node's `journal`; and runs its replica as a task of the node's, on
    /// the simulation's clock and network. Returns the proposer and the task.
    async fn open_group(
        &self,
        root: &SlowRoot,
        journal: Rc<Journal<Dir>>,
        g: u64,
        log: Log<Dir>,
        compact_every: u64,
    ) -> Result<(ReplicatedLog<Dir>, JoinHandle), RaftLogError> {
        let (node, ex) = (self.node, &self.ex);
        let replica = Replica::with_clock(g, Rc::new(SimClock(ex.clone())));
        let all: Vec<u64> = (1..=self.nodes).collect();
        let voters = placement::replicas(g as u32, &all);
        replica.prefer(voters.first().copied());
        let bootstrap = ConfState {
            learners: all
                .iter()
                .copied()
                .filter(|n| !voters.contains(n))
                .collect(),
            voters,
            ..ConfState::default()
        };
        // Weak: the network holds the replica.
        let net = Rc::downgrade(&self.net);
        replica.set_fetch(Rc::new(move |peer, from, to| {
            let net = net.upgrade();
            Box::pin(async move {
                match net {
                    Some(net) => net.fetch(node, peer, g, from, to).await,
                    None => Err(std::io::Error::other("the network is gone")),
                }
            })
        }));
        let (proposer, machine) = ReplicatedLog::new(replica.clone(), log);
        let group = Group::open(
            root.dir(&format!("g{g}/state")).await?,
            journal,
            g,
            &bootstrap,
            raft_config(node, self.election_ticks),
            machine,
            compact_every,
        )
        .await?;
        self.net.attach(node, g, replica.clone());
        let net = self.net.clone();
        let run = replica.run(group, TICK, move |m| net.send(node, g, m));
        let failed = self.failed.clone();
        let task = ex.spawn_owned(node, async move {
            if run.await.is_err() {
                failed.set(true);
            }
        });
        Ok((proposer, task))
    }
}

/// Runs one seed, catching a panic as its failure.
fn catch_seed<T>(
    what: &str,
    seed: u64,
    run: impl FnOnce() -> Result<T, String>,
) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)).unwrap_or_else(|panic| {
        let text = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        Err(format!("{what} seed {seed} panicked: {text}"))
    })
}

/// What a stalled run means.
fn stall_text(s: Stall) -> String {
    match s {
        Stall::Quiescent => "deadlock: every task waits and no timer is armed".to_owned(),
        Stall::Exhausted => "no end within the step budget".to_owned(),
    }
}

/// Runs `run` on every seed of `seeds` over `threads` threads (each seed alone on one),
/// and returns the results in no particular order.
pub fn run_parallel<T: Send>(
    seeds: std::ops::Range<u64>,
    threads: usize,
    run: impl Fn(u64) -> T + Sync,
) -> Vec<T> {
    let threads = threads.max(1) as u64;
    let run = &run;
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let seeds = seeds.clone();
                scope.spawn(move || {
                    (seeds.start + t..seeds.end)
                        .step_by(threads as usize)
                        .map(run)
                        .collect::<Vec<T>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("a simulation thread"))
            .collect()
    })
}

/// The seed tests' driver: runs the one seed environment variable `one` names (printing
/// its report, or panicking with its failure) and returns nothing; otherwise runs
/// `many`'s number of seeds (`default` if unset) on every core, panics with the first
/// failures if any seed failed, and returns the reports to sum up.
pub fn test_seeds<R: std::fmt::Debug + Send>(
    one: &str,
    many: &str,
    default: u64,
    run: impl Fn(u64) -> Result<R, String> + Sync,
) -> Vec<R> {
    if let Some(seed) = crate::env_number(one) {
        match run(seed) {
            Ok(report) => println!("{report:#?}"),
            Err(failure) => panic!("{failure}"),
        }
        return Vec::new();
    }
    let seeds = crate::env_number(many).unwrap_or(default);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (reports, failures): (Vec<_>, Vec<_>) = run_parallel(0..seeds, threads, run)
        .into_iter()
        .partition(Result::is_ok);
    if !failures.is_empty() {
        let some: Vec<String> = failures.into_iter().filter_map(Result::err).collect();
        panic!(
            "{} of {seeds} seeds failed:\n{}",
            some.len(),
            some.iter().take(8).cloned().collect::<Vec<_>>().join("\n")
        );
    }
    reports.into_iter().filter_map(Result::ok).collect()
}

/// A node's raft-rs configuration, as a cluster node's, but for its election timeout:
/// `election_ticks` ticks always.
fn raft_config(node: u64, election_ticks: usize) -> raft::Config {
    raft::Config {
        id: node,
        election_tick: 10,
        min_election_tick: election_ticks,
        max_election_tick: election_ticks + 1,
        heartbeat_tick: 2,
        check_quorum: true,
        pre_vote: true,
        max_inflight_msgs: 16,
        max_size_per_msg: 4096,
        ..raft::Config::default()
    }
}

fn log_config() -> LogConfig {
    LogConfig {
        segment_bytes_max: 8 * 1024,
        index_interval_bytes: 512,
        ..LogConfig::default()
    }
}

impl Sim {
    fn new(seed: u64) -> Rc<Sim> {
        let ex = Executor::new(seed);
        let n = if ex.chance(500) { 3 } else { 5 };
        let groups = 1 + ex.below(3);
        let roots = (0..n)
            .map(|i| {
                SimRoot::new(SimConfig {
                    seed: seed.wrapping_mul(0x9E37_79B9).wrapping_add(i),
                    yield_permille: 100,
                })
            })
            .collect();
        let election_ticks = (0..n).map(|_| 10 + ex.below(10) as usize).collect();
        let net = Net::new(ex.clone(), n, FAULTY);
        Rc::new(Sim {
            n,
            groups,
            roots,
            net,
            lives: RefCell::new((0..n).map(|_| NodeState::Down).collect()),
            open_errors: RefCell::default(),
            election_ticks,
            truth: RefCell::default(),
            failure: RefCell::new(None),
            writing: Cell::new(true),
            placed: RefCell::new(None),
            restarting: Cell::new(0),
            around: RefCell::default(),
            next_id: Cell::new(1),
            report: RefCell::new(ClusterReport {
                seed,
                nodes: n,
                groups,
                ..ClusterReport::default()
            }),
            ex,
        })
    }

    fn fail(&self, problem: String) {
        self.failure.borrow_mut().get_or_insert(problem);
    }

    fn failed(&self) -> bool {
        self.failure.borrow().is_some()
    }

    /// The node each group should be led by: placement's first voter.
    fn preferred(&self, group: u64) -> u64 {
        let nodes = self.placed.borrow().clone();
        let nodes = nodes.unwrap_or_else(|| (1..=self.n).collect());
        placement::replicas(group as u32, &nodes)[0]
    }

    /// Places every group over `nodes` (a membership change: the nodes left out are
    /// removed from every group, the others added back), as the node's membership
    /// requests do on every node.
    fn place_on(&self, nodes: Vec<u64>) {
        *self.placed.borrow_mut() = Some(nodes.clone());
        for node in 1..=self.n {
            if let Some(life) = self.life(node) {
                for p in life.proposers.values() {
                    p.replica().place_on(nodes.clone());
                }
            }
        }
    }

    fn life(&self, node: u64) -> Option<Rc<Life>> {
        match &self.lives.borrow()[node as usize - 1] {
            NodeState::Up(life) => Some(life.clone()),
            _ => None,
        }
    }

    fn is_up(&self, node: u64) -> bool {
        self.life(node).is_some()
    }

    fn is_down(&self, node: u64) -> bool {
        matches!(self.lives.borrow()[node as usize - 1], NodeState::Down)
    }

    /// Starts node `node` on its disk, unless it is up or starting: its journal, and each
    /// group's replica as a task of the node's. A node that cannot open is down again
    /// (the error kept).
    async fn start(self: Rc<Sim>, node: u64) {
        if !self.is_down(node) {
            return;
        }
        self.lives.borrow_mut()[node as usize - 1] = NodeState::Starting;
        match self.clone().open(node).await {
            Ok(life) => {
                // The placement asked last, as the node's groups join: one asked while
                // they were opening did not reach them (`Node::open_group` alike).
                if let Some(nodes) = self.placed.borrow().clone() {
                    for p in life.proposers.values() {
                        p.replica().place_on(nodes.clone());
                    }
                }
                self.lives.borrow_mut()[node as usize - 1] = NodeState::Up(Rc::new(life));
                self.open_errors.borrow_mut().remove(&node);
            }
            Err(e) => {
                self.open_errors.borrow_mut().insert(node, e.to_string());
                self.kill(node, true);
            }
        }
    }

    async fn open(self: Rc<Sim>, node: u64) -> Result<Life, RaftLogError> {
        let root = SlowRoot::new(self.roots[node as usize - 1].clone(), self.ex.clone());
        // A rewrite every few hundred records: the runs pass many.
        let journal = Rc::new(Journal::open(root.dir("journal").await?, log_config(), 300).await?);
        let ticks = self.election_ticks[node as usize - 1];
        let (ctx, failed) = NodeCtx::new(&self.ex, &self.net, node, self.n, ticks);
        let mut proposers = BTreeMap::new();
        for g in 0..self.groups {
            let (log, _) = Log::open(root.dir(&format!("events-{g}")).await?, log_config()).await?;
            let (proposer, _task) = ctx
                .open_group(&root, journal.clone(), g, log, COMPACT_EVERY)
                .await?;
            proposers.insert(g, Rc::new(proposer));
        }
        Ok(Life { proposers, failed })
    }

    /// Kills node `node`'s tasks; its disk keeps only what was synced (and some of what
    /// was not) when `power_loss`.
    fn kill(&self, node: u64, power_loss: bool) {
        self.lives.borrow_mut()[node as usize - 1] = NodeState::Down;
        self.net.detach(node);
        self.ex.kill_owned(node);
        self.ex.resume(node);
        if power_loss {
            self.roots[node as usize - 1].crash();
        }
    }

    /// Brings node `node` back after `down`.
    fn restart_after(self: &Rc<Sim>, node: u64, down: Duration) {
        let sim = self.clone();
        drop(self.ex.spawn(async move {
            sim.ex.sleep(down).await;
            // Its own process: the node opens in a task of its own.
            let s = sim.clone();
            drop(sim.ex.spawn_owned(node, s.start(node)));
        }));
    }

    /// One writer of `group`: commits events, one at a time, through the node it believes
    /// leads, until the writing phase ends.
    async fn writer(self: Rc<Sim>, group: u64) {
        let mut node = self.preferred(group);
        while self.writing.get() && !self.failed() {
            // After a refusal or no answer, a longer pause: no leader may be known yet.
            let most = if self.commit_one(group, &mut node).await {
                4_000
            } else {
                20_000
            };
            let pause = Duration::from_micros(self.ex.below(most));
            self.ex.sleep(pause).await;
        }
    }

    /// Reads under the faults: a read index on a random node's replica of a random group
    /// (at once where that node leads under its lease) must leave the node's event log
    /// holding every event acknowledged before the read was asked.
    async fn reader(self: Rc<Sim>) {
        while self.writing.get() && !self.failed() {
            let pause = Duration::from_micros(500 + self.ex.below(10_000));
            self.ex.sleep(pause).await;
            let node = 1 + self.ex.below(self.n);
            let group = self.ex.below(self.groups);
            if !self.check_read(node, group).await {
                return;
            }
        }
    }

    /// Asks a read index of node `node`'s replica of `group`, and checks the node's event
    /// log then holds every event acknowledged before; false if it did not.
    async fn check_read(&self, node: u64, group: u64) -> bool {
        {
            let Some(life) = self.life(node) else {
                return true;
            };
            let log = life.proposers[&group].clone();
            let need = self.acked_end(group);
            let leased = log.replica().leases();
            let read = {
                let read = std::pin::pin!(log.replica().read_index());
                match select(read, self.ex.sleep(COMMIT_TIMEOUT)).await {
                    Either::Left((read, _)) => read.ok(),
                    Either::Right(_) => None,
                }
            };
            let mut report = self.report.borrow_mut();
            report.reads += 1;
            report.leased_reads += u64::from(leased);
            if read.is_none() {
                report.reads_refused += 1;
                return true;
            }
            drop(report);
            if log.end() < need {
                self.fail(format!(
                    "a stale read: node {node}'s replica of group {group} passed a read index \
                     (under its lease: {leased}) with its event log ending at {}, before {need}, \
                     the end of what was acknowledged before the read",
                    log.end()
                ));
                return false;
            }
        }
        true
    }

    /// Cuts `group`'s leader `cut` off alone, commits an event through the other nodes,
    /// and once it is acknowledged asks a read of `cut`.
    async fn write_around(self: Rc<Sim>, cut: u64, group: u64) {
        let mut sides = vec![0; self.n as usize];
        sides[cut as usize - 1] = 1;
        self.net.partition(sides, None);
        self.report.borrow_mut().partitions += 1;
        let until = self.ex.now() + FAULT_TIME;
        while self.ex.now() < until && !self.failed() {
            let mut node = 1 + self.ex.below(self.n);
            if node == cut {
                continue;
            }
            if self.commit_one(group, &mut node).await {
                self.check_read(cut, group).await;
                return;
            }
            self.ex.sleep(Duration::from_millis(5)).await;
        }
    }

    /// Pauses node `node` (SIGSTOP) for `down`, then resumes it.
    fn pause(self: &Rc<Sim>, node: u64, down: Duration) {
        let resumed = self.ex.pause_for(node, down);
        self.report.borrow_mut().pauses += 1;
        let sim = self.clone();
        drop(self.ex.spawn(async move {
            if resumed.await {
                // A leader that wakes may not know yet that another was elected.
                for group in 0..sim.groups {
                    if !sim.check_read(node, group).await {
                        return;
                    }
                }
            }
        }));
    }

    /// Proposes one new event to `group` through `node`; returns whether it was
    /// acknowledged. `node` moves to where the answer points.
    async fn commit_one(&self, group: u64, node: &mut u64) -> bool {
        let Some(proposer) = self.life(*node).map(|l| l.proposers[&group].clone()) else {
            *node = 1 + self.ex.below(self.n);
            return false;
        };
        // One to three events a commit, as a partition's tick batches them: a batch can
        // then be torn by a crash.
        let first = self.next_id.get();
        let ids: Vec<u64> = (first..first + 1 + self.ex.below(3)).collect();
        self.next_id.set(first + ids.len() as u64);
        let payloads: Vec<[u8; 8]> = ids.iter().map(|id| id.to_le_bytes()).collect();
        let events: Vec<Event<'_>> = payloads
            .iter()
            .map(|p| Event {
                timestamp_us: 0,
                payload: p,
            })
            .collect();
        {
            let mut truth = self.truth.borrow_mut();
            for &id in &ids {
                truth.proposed.insert(id, group);
            }
        }
        let answer = {
            let commit = std::pin::pin!(proposer.commit(&events));
            let timeout = self.ex.sleep(COMMIT_TIMEOUT);
            match select(commit, timeout).await {
                Either::Left((answer, _)) => Some(answer),
                Either::Right(_) => None,
            }
        };
        let mut truth = self.truth.borrow_mut();
        match answer {
            Some(Ok(offsets)) => {
                truth.acked.extend(ids.iter().copied().zip(offsets));
                return true;
            }
            Some(Err(ProposeError::NotLeader { leader })) => {
                truth.refused.extend(&ids);
                *node = leader.unwrap_or_else(|| 1 + self.ex.below(self.n));
            }
            Some(Err(ProposeError::Dropped)) => {
                truth.refused.extend(&ids);
            }
            Some(Err(ProposeError::Uncertain)) | None => {
                truth.uncertain += 1;
                *node = 1 + self.ex.below(self.n);
            }
        }
        false
    }

    /// The faults, one every few tens of milliseconds, until the fault time is over.
    async fn nemesis(self: Rc<Sim>) {
        let end = self.ex.now() + FAULT_TIME;
        while self.ex.now() < end && !self.failed() {
            let pause = Duration::from_millis(20 + self.ex.below(120));
            self.ex.sleep(pause).await;
            // A node whose disk failed stops; it comes back from its disk.
            for node in 1..=self.n {
                if self.life(node).is_some_and(|l| l.failed.get()) {
                    self.kill(node, true);
                    self.restart_after(node, Duration::from_millis(20 + self.ex.below(200)));
                }
            }
            let up: Vec<u64> = (1..=self.n).filter(|&n| self.is_up(n)).collect();
            let pick = |from: &[u64]| from[self.ex.below(from.len() as u64) as usize];
            match self.ex.below(100) {
                // A crash (power loss), and a restart a while later.
                0..=19 if !up.is_empty() => {
                    let node = pick(&up);
                    self.kill(node, true);
                    self.report.borrow_mut().crashes += 1;
                    self.restart_after(node, Duration::from_millis(20 + self.ex.below(400)));
                }
                // A disk that fails its next fsync (the journal's or an event log's).
                20..=27 if !up.is_empty() => {
                    let node = pick(&up);
                    let dir = if self.ex.chance(500) {
                        "journal".to_owned()
                    } else {
                        format!("events-{}", self.ex.below(self.groups))
                    };
                    self.roots[node as usize - 1].dir_now(&dir).fail_next_sync();
                    self.report.borrow_mut().disk_faults += 1;
                }
                // A planned restart: leaderships handed off first.
                28..=35 if !up.is_empty() => {
                    let node = pick(&up);
                    self.restarting.set(self.restarting.get() + 1);
                    let sim = self.clone();
                    drop(self.ex.spawn(async move {
                        sim.clone().clean_restart(node).await;
                        sim.restarting.set(sim.restarting.get() - 1);
                    }));
                }
                // A partition: halves, one node alone, or halves joined by a bridge.
                36..=55 => {
                    self.net.cut_at_random(true);
                    self.report.borrow_mut().partitions += 1;
                }
                56..=62 => self.net.heal(),
                // A group's leader cut off alone while an event commits through the
                // others: it must not pass a read without it.
                63..=66 if self.writing.get() => {
                    let group = self.ex.below(self.groups);
                    if let Some(leader) = up.iter().copied().find(|&n| self.net.leads(n, group)) {
                        self.around
                            .borrow_mut()
                            .push(self.ex.spawn(self.clone().write_around(leader, group)));
                    }
                }
                // SIGSTOP, and SIGCONT up to 600 ms later (past an election timeout), the
                // node leading most often among them.
                67..=72 if !up.is_empty() => {
                    let group = self.ex.below(self.groups);
                    let leader = up.iter().copied().find(|&n| self.net.leads(n, group));
                    let node = match leader {
                        Some(n) if self.ex.chance(600) => n,
                        _ => pick(&up),
                    };
                    if !self.ex.is_paused(node) {
                        let down = Duration::from_millis(20 + self.ex.below(580));
                        self.pause(node, down);
                    }
                }
                // A node removed from the cluster (every group moves off it), or every
                // node placed again.
                73..=78 => {
                    let all: Vec<u64> = (1..=self.n).collect();
                    let removed = self.placed.borrow().as_ref().is_some_and(|p| *p != all);
                    if removed || self.ex.chance(300) {
                        self.place_on(all);
                    } else {
                        let out = 1 + self.ex.below(self.n);
                        self.place_on(all.into_iter().filter(|&n| n != out).collect());
                        self.report.borrow_mut().removals += 1;
                    }
                }
                _ => {}
            }
        }
    }

    /// Hands off `node`'s leaderships, stops its groups, and starts it again on the same
    /// disk (nothing lost: every write was synced or is redone from peers).
    async fn clean_restart(self: Rc<Sim>, node: u64) {
        let Some(life) = self.life(node) else {
            return;
        };
        for p in life.proposers.values() {
            p.replica().stop_after_hand_off();
        }
        let until = self.ex.now() + Duration::from_secs(3);
        while self.ex.now() < until && life.proposers.values().any(|p| !p.replica().status().ended)
        {
            self.ex.sleep(Duration::from_millis(5)).await;
        }
        if !self.life(node).is_some_and(|l| Rc::ptr_eq(&l, &life)) {
            // It crashed meanwhile.
            return;
        }
        self.kill(node, false);
        self.report.borrow_mut().clean_restarts += 1;
        self.restart_after(node, Duration::from_millis(self.ex.below(50)));
    }

    /// The offset after the last event of `group` acknowledged to a writer.
    fn acked_end(&self, group: u64) -> u64 {
        let truth = self.truth.borrow();
        truth
            .acked
            .iter()
            .filter(|(id, _)| truth.proposed.get(id) == Some(&group))
            .map(|(_, &offset)| offset + 1)
            .max()
            .unwrap_or(0)
    }

    /// What each node's replica of `group` says of itself, for a failure's message.
    fn statuses(&self, group: u64) -> String {
        let each: Vec<String> = (1..=self.n)
            .map(|n| match self.life(n) {
                Some(l) => {
                    let r = l.proposers[&group].replica();
                    let st = r.status();
                    format!(
                        "node {n}: {:?} of term {}, leader {}, applied {}, voters {:?}, \
                         learners {:?}{}",
                        st.role,
                        st.term,
                        st.leader,
                        st.applied,
                        r.voters(),
                        r.learners(),
                        if st.ended { ", ended" } else { "" }
                    )
                }
                None => format!("node {n}: down"),
            })
            .collect();
        each.join("; ")
    }

    /// Brings back every node that is down or whose storage failed (a failed fsync can
    /// still be armed when the faults end: the node then stops and comes back as during
    /// them).
    async fn revive(self: &Rc<Sim>) -> Result<(), String> {
        for node in 1..=self.n {
            if self.life(node).is_some_and(|l| l.failed.get()) {
                self.kill(node, true);
            }
            while matches!(self.lives.borrow()[node as usize - 1], NodeState::Starting) {
                self.ex.sleep(Duration::from_millis(1)).await;
            }
            // A failed fsync still armed fails the first open; the second must not fail.
            for _ in 0..2 {
                self.clone().start(node).await;
            }
            if !self.is_up(node) {
                let why = self.open_errors.borrow().get(&node).cloned();
                return Err(format!("node {node} cannot open after the faults: {why:?}"));
            }
        }
        Ok(())
    }

    /// After the faults: every node up, the network calm; one more event committed in each
    /// group; then every replica applies everything.
    async fn converge(self: Rc<Sim>) -> Result<(), String> {
        self.net.heal();
        self.net.set_weather(CALM);
        if self.placed.borrow().is_some() {
            self.place_on((1..=self.n).collect());
        }
        while self.restarting.get() > 0 {
            self.ex.sleep(Duration::from_millis(5)).await;
        }
        self.revive().await?;
        let deadline = self.ex.now() + CONVERGE_TIME;
        for g in 0..self.groups {
            let mut node = self.preferred(g);
            while !self.commit_one(g, &mut node).await {
                if self.failed() {
                    return Err("failed while converging".into());
                }
                self.revive().await?;
                if self.ex.now() > deadline {
                    return Err(format!(
                        "group {g} committed nothing within {CONVERGE_TIME:?} of the faults' \
                         end; {}",
                        self.statuses(g)
                    ));
                }
                self.ex.sleep(Duration::from_millis(10)).await;
            }
        }
        // Every replica applies up to the leader's end.
        loop {
            let lives: Vec<Rc<Life>> = (1..=self.n).filter_map(|n| self.life(n)).collect();
            let mut behind = None;
            for g in 0..self.groups {
                let ends: Vec<u64> = lives.iter().map(|l| l.proposers[&g].end()).collect();
                // Equal ends are not enough: the node that acknowledged the last events may
                // have died at once, and the others not have applied them yet. Every
                // acknowledged event must be applied everywhere.
                let acked_end = self.acked_end(g);
                let max = ends.iter().copied().max().unwrap_or(0).max(acked_end);
                if ends.iter().any(|&e| e != max) {
                    behind = Some((g, ends));
                }
            }
            if lives.len() < self.n as usize || lives.iter().any(|l| l.failed.get()) {
                self.revive().await?;
                continue;
            }
            let Some((g, ends)) = behind else {
                return Ok(());
            };
            if self.ex.now() > deadline {
                return Err(format!(
                    "group {g}'s replicas did not converge: their logs end at {ends:?}; {}",
                    self.statuses(g)
                ));
            }
            self.ex.sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Runs one seed; `Err` names the first broken rule.
pub fn run_cluster_seed(seed: u64) -> Result<ClusterReport, String> {
    catch_seed("cluster", seed, || run(seed))
}

fn run(seed: u64) -> Result<ClusterReport, String> {
    let sim = Sim::new(seed);
    let _teardown = Teardown(sim.clone());
    let ex = sim.ex.clone();
    let fail = |what: String| {
        format!(
            "cluster seed {seed} ({} nodes, {} groups): {what}; replay with CHORUS_CLUSTER_SEED={seed}",
            sim.n, sim.groups
        )
    };
    for node in 1..=sim.n {
        drop(ex.spawn_owned(node, sim.clone().start(node)));
    }
    let done = Rc::new(Cell::new(false));
    {
        let (sim, done) = (sim.clone(), done.clone());
        drop(ex.spawn(async move {
            let mut writers = Vec::new();
            for g in 0..sim.groups {
                for _ in 0..2 {
                    writers.push(sim.ex.spawn(sim.clone().writer(g)));
                }
            }
            let reader = sim.ex.spawn(sim.clone().reader());
            sim.clone().nemesis().await;
            sim.writing.set(false);
            for node in 1..=sim.n {
                sim.ex.resume(node);
            }
            for w in writers {
                w.await;
            }
            reader.await;
            let around = std::mem::take(&mut *sim.around.borrow_mut());
            for task in around {
                task.await;
            }
            if let Err(e) = sim.clone().converge().await {
                sim.fail(e);
            }
            done.set(true);
        }));
    }
    ex.run_until(|| done.get() || sim.failed(), STEPS_MAX)
        .map_err(|s| fail(stall_text(s)))?;
    if let Some(problem) = sim.failure.borrow().clone() {
        return Err(fail(problem));
    }
    // Read every node's logs.
    let logs: Rc<RefCell<check::Logs>> = Rc::default();
    {
        let (sim, logs, done) = (sim.clone(), logs.clone(), done.clone());
        done.set(false);
        drop(ex.spawn(async move {
            for node in 1..=sim.n {
                let life = sim.life(node).expect("every node is up");
                let mut per_group = Vec::new();
                for g in 0..sim.groups {
                    per_group.push(check::read_all(life.proposers[&g].log()).await);
                }
                logs.borrow_mut().push(per_group);
            }
            done.set(true);
        }));
    }
    ex.run_until(|| done.get(), STEPS_MAX)
        .map_err(|s| fail(stall_text(s)))?;
    let logs = logs.borrow();
    let truth = sim.truth.borrow();
    check::check(&logs, &truth, sim.groups).map_err(fail)?;
    let stats = sim.net.stats();
    let mut report = sim.report.borrow().clone();
    report.steps = ex.steps();
    report.simulated = ex.elapsed();
    report.acked = truth.acked.len() as u64;
    report.uncertain = truth.uncertain;
    report.refused = truth.refused.len() as u64;
    report.messages = stats.sent;
    report.dropped = stats.dropped;
    report.fetches = stats.fetches;
    report.events = logs[0].iter().map(|g| g.len() as u64).sum();
    report.digest = check::digest(&logs);
    Ok(report)
}

/// Breaks the cycles a run leaves (its tasks hold the sim, which holds the executor and
/// the network, which holds the replicas), whatever the outcome.
struct Teardown(Rc<Sim>);

impl Drop for Teardown {
    fn drop(&mut self) {
        self.0.ex.kill_all();
        for node in 1..=self.0.n {
            self.0.net.detach(node);
        }
        self.0
            .lives
            .borrow_mut()
            .iter_mut()
            .for_each(|l| *l = NodeState::Down);
    }
}
