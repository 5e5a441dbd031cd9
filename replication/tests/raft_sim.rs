//! Deterministic simulation of Raft groups on the Chorus storage: raft-rs `RawNode`s over
//! [`RaftLog`] on the simulated disk, joined by a simulated network that drops, delays,
//! reorders and duplicates messages and is cut into partitions (halves, one node isolated,
//! a bridge), while nodes crash (losing whatever was not synced, some in the middle of
//! persisting a `Ready`) and restart, leaders propose, and nodes compact their logs behind
//! snapshots and install the leader's when they fall behind.
//!
//! Checked while it runs: a node applies indexes in order without gaps, and every node
//! applies the same entry at the same index (state machine safety); a snapshot installed
//! holds exactly what was applied up to its index. Checked after the faults heal and the
//! group converges: every node holds the same values in the same order; every value a
//! leader acknowledged (applied where it was proposed) is there exactly once; nothing that
//! was never proposed is.
//!
//! `CHORUS_RAFT_SEEDS=N` sets the number of seeds (default 1000); a failing seed is
//! printed, and `CHORUS_RAFT_SEED=S` replays exactly that one.

use chorus_log::storage::sim::SimRng;
use chorus_log::{LogConfig, SimConfig, SimRoot, SimStorage};
use chorus_replication::{Group, Journal, RaftLogError, StateMachine};
use futures::executor::block_on;
use raft::eraftpb::{
    ConfChange, ConfChangeSingle, ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType,
    Message, MessageType,
};
use raft::{Config, SnapshotStatus, StateRole};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

/// Steps of faults and proposals, then at most this many to converge.
const FAULT_STEPS: u64 = 1_200;
const CONVERGE_STEPS: u64 = 4_000;
/// Every node ticks once per this many steps.
const STEPS_PER_TICK: u64 = 2;
/// A node compacts once it applied this many entries past its snapshot.
const COMPACT_EVERY: u64 = 25;

#[derive(Clone, Copy)]
struct Faults {
    drop_permille: u32,
    dup_permille: u32,
    max_delay: u64,
    crash_permille: u32,
    /// Chance, per `Ready`, that the node's disk fails its next write or fsync: the node
    /// then dies part-way through persisting, and restarts from what the disk kept.
    disk_fault_permille: u32,
    partition_permille: u32,
    heal_permille: u32,
    propose_permille: u32,
    /// Chance that the leader proposes a membership change: removing a node, or adding
    /// back the one removed.
    conf_change_permille: u32,
    /// Chance that the leader hands its leadership off, as before a planned stop.
    hand_off_permille: u32,
}

const FAULTS: Faults = Faults {
    drop_permille: 50,
    dup_permille: 20,
    max_delay: 6,
    crash_permille: 4,
    disk_fault_permille: 1,
    partition_permille: 6,
    heal_permille: 10,
    propose_permille: 300,
    conf_change_permille: 6,
    hand_off_permille: 4,
};

const CALM: Faults = Faults {
    drop_permille: 0,
    dup_permille: 0,
    max_delay: 2,
    crash_permille: 0,
    disk_fault_permille: 0,
    partition_permille: 0,
    heal_permille: 0,
    propose_permille: 0,
    conf_change_permille: 0,
    hand_off_permille: 0,
};

type Node = Group<SimStorage, Values>;

/// The state machine: the values applied, in order, checked against every other node's.
struct Values {
    seed: u64,
    id: u64,
    truth: Rc<RefCell<Truth>>,
    values: Vec<u64>,
    applied: u64,
    /// Set once the node is open: a restore after that is a snapshot installed.
    running: bool,
}

impl StateMachine for Values {
    async fn apply(&mut self, entries: &[Entry]) -> Result<(), RaftLogError> {
        for e in entries {
            self.apply_one(e);
        }
        Ok(())
    }

    fn snapshot(&self) -> Vec<u8> {
        self.truth.borrow_mut().compactions += 1;
        encode_values(&self.values)
    }

    fn restore(&mut self, index: u64, data: &[u8]) {
        self.values = decode_values(data);
        self.applied = index;
        let mut truth = self.truth.borrow_mut();
        if self.running {
            truth.installs += 1;
        }
        assert_eq!(
            self.values,
            truth.committed_values(index),
            "seed {}: node {} restored a snapshot at {index} that differs",
            self.seed,
            self.id
        );
    }
}

impl Values {
    fn apply_one(&mut self, e: &Entry) {
        let (seed, id) = (self.seed, self.id);
        assert_eq!(
            e.index,
            self.applied + 1,
            "seed {seed}: node {id} applies {} after {}",
            e.index,
            self.applied
        );
        let normal = e.get_entry_type() == EntryType::EntryNormal;
        let value = (normal && !e.data.is_empty())
            .then(|| u64::from_le_bytes(e.data[..].try_into().expect("an 8-byte value")));
        if !normal {
            self.truth.borrow_mut().conf_changes_applied += 1;
        }
        let mut truth = self.truth.borrow_mut();
        let first = *truth.committed.entry(e.index).or_insert((e.term, value));
        assert_eq!(
            first,
            (e.term, value),
            "seed {seed}: node {id} applies a different entry at index {}",
            e.index
        );
        if let Some(v) = value {
            let proposer = truth.proposed.get(&v).copied();
            assert!(
                proposer.is_some(),
                "seed {seed}: value {v} was never proposed"
            );
            if proposer == Some(id) {
                truth.acked.insert(v);
            }
            self.values.push(v);
        }
        self.applied = e.index;
    }
}

struct InFlight {
    at: u64,
    msg: Message,
}

/// Everything the checker knows.
#[derive(Default)]
struct Truth {
    /// Value → the node it was proposed on.
    proposed: BTreeMap<u64, u64>,
    /// Values the proposing node applied: what a client was acknowledged.
    acked: BTreeSet<u64>,
    /// Index → (term, value) of the entry first applied there, by any node.
    committed: BTreeMap<u64, (u64, Option<u64>)>,
    /// What the faults did, so that a run that exercised nothing is noticed.
    crashes: usize,
    disk_faults: usize,
    installs: usize,
    compactions: usize,
    partitions: usize,
    conf_changes_applied: usize,
    hand_offs: usize,
}

impl Truth {
    /// The values the committed entries hold, up to `index`.
    fn committed_values(&self, index: u64) -> Vec<u64> {
        self.committed
            .range(..=index)
            .filter_map(|(_, (_, v))| *v)
            .collect()
    }
}

struct Sim {
    seed: u64,
    rng: SimRng,
    n: u64,
    roots: Vec<SimRoot>,
    nodes: Vec<Option<Node>>,
    /// When each node that is down comes back.
    down_until: Vec<u64>,
    /// `side[i]`: the partition side of node `i + 1`; a bridge node reaches every side.
    side: Vec<u8>,
    bridge: Option<u64>,
    net: Vec<InFlight>,
    /// What the transport tells senders of snapshots: (leader, follower, status). Without
    /// it a leader whose snapshot was lost would wait for that follower for good.
    snapshot_reports: Vec<(u64, u64, SnapshotStatus)>,
    now: u64,
    next_value: u64,
    truth: Rc<RefCell<Truth>>,
    faults: Faults,
}

fn conf(n: u64) -> ConfState {
    ConfState {
        voters: (1..=n).collect(),
        ..ConfState::default()
    }
}

fn log_config() -> LogConfig {
    LogConfig {
        segment_bytes_max: 4096,
        index_interval_bytes: 512,
        ..LogConfig::default()
    }
}

fn encode_values(values: &[u64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn decode_values(data: &[u8]) -> Vec<u64> {
    data.chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect()
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = SimRng::new(seed);
        let n = if rng.chance(500) { 3 } else { 5 };
        let roots = (0..n)
            .map(|i| {
                SimRoot::new(SimConfig {
                    seed: seed.wrapping_mul(31).wrapping_add(i),
                    yield_permille: 0,
                })
            })
            .collect();
        let mut sim = Sim {
            seed,
            rng,
            n,
            roots,
            nodes: (0..n).map(|_| None).collect(),
            down_until: vec![0; n as usize],
            side: vec![0; n as usize],
            bridge: None,
            net: Vec::new(),
            snapshot_reports: Vec::new(),
            now: 0,
            next_value: 1,
            truth: Rc::default(),
            faults: FAULTS,
        };
        for id in 1..=n {
            sim.start(id);
        }
        sim
    }

    fn start(&mut self, id: u64) {
        let root = &self.roots[(id - 1) as usize];
        let config = Config {
            id,
            election_tick: 10,
            // raft-rs draws each election timeout from the thread's own random generator,
            // which no seed reaches. A range of one value makes it fixed; the seeded jitter
            // of the ticks (see `step`) randomises elections instead.
            min_election_tick: 10,
            max_election_tick: 11,
            heartbeat_tick: 2,
            max_size_per_msg: 1024,
            max_inflight_msgs: 16,
            check_quorum: true,
            pre_vote: true,
            ..Config::default()
        };
        let machine = Values {
            seed: self.seed,
            id,
            truth: self.truth.clone(),
            values: Vec::new(),
            applied: 0,
            running: false,
        };
        // A journal rewrite every few hundred records: the sim passes many.
        let journal = block_on(Journal::open(root.dir_now("journal"), log_config(), 300))
            .unwrap_or_else(|e| panic!("seed {}: node {id}'s journal: {e}", self.seed));
        let mut node = block_on(Group::open(
            root.dir_now("group/state"),
            Rc::new(journal),
            0,
            &conf(self.n),
            config,
            machine,
            COMPACT_EVERY,
        ))
        .unwrap_or_else(|e| panic!("seed {}: node {id} cannot reopen: {e}", self.seed));
        node.machine_mut().running = true;
        self.nodes[(id - 1) as usize] = Some(node);
    }

    fn crash(&mut self, id: u64) {
        self.truth.borrow_mut().crashes += 1;
        self.nodes[(id - 1) as usize] = None;
        self.roots[(id - 1) as usize].crash();
        self.down_until[(id - 1) as usize] = self.now + 20 + self.rng.below(150);
    }

    fn reachable(&self, from: u64, to: u64) -> bool {
        self.bridge == Some(from)
            || self.bridge == Some(to)
            || self.side[(from - 1) as usize] == self.side[(to - 1) as usize]
    }

    fn send(&mut self, msgs: Vec<Message>) {
        for msg in msgs {
            if !self.reachable(msg.from, msg.to) || self.rng.chance(self.faults.drop_permille) {
                self.lost(&msg);
                continue;
            }
            let copies = if self.rng.chance(self.faults.dup_permille) {
                2
            } else {
                1
            };
            for _ in 0..copies {
                let at = self.now + 1 + self.rng.below(self.faults.max_delay);
                self.net.push(InFlight {
                    at,
                    msg: msg.clone(),
                });
            }
        }
    }

    /// A message that will never arrive: a snapshot's sender hears of it.
    fn lost(&mut self, msg: &Message) {
        if msg.get_msg_type() == MessageType::MsgSnapshot {
            self.snapshot_reports
                .push((msg.from, msg.to, SnapshotStatus::Failure));
        }
    }

    /// One `Ready` of node `id`; `false` if there was none or the node died of a disk
    /// fault part-way.
    fn ready(&mut self, id: u64) -> bool {
        let i = (id - 1) as usize;
        if self.rng.chance(self.faults.disk_fault_permille) {
            let dir = if self.rng.chance(500) {
                "group/state"
            } else {
                "journal"
            };
            let disk = self.roots[i].dir_now(dir);
            if self.rng.chance(500) {
                disk.fail_next_sync();
            } else {
                disk.fail_next_write();
            }
        }
        let node = self.nodes[i].as_mut().expect("live");
        let mut out = Vec::new();
        let result = block_on(node.on_ready(&mut |msgs| out.extend(msgs)));
        // The upkeep a replica's task does between turns (journal rewrites).
        let result = result.and_then(|had| block_on(node.tend()).map(|()| had));
        self.send(out);
        match result {
            Ok(had) => had,
            Err(_) => {
                // The node stops at its first storage error, as a real one must, and
                // comes back from what its disk kept.
                self.truth.borrow_mut().disk_faults += 1;
                self.crash(id);
                false
            }
        }
    }

    fn ready_all(&mut self) {
        for id in 1..=self.n {
            // A node keeps producing `Ready`s while stepping itself (a leader's own
            // acknowledgements); bounded, since each one makes progress.
            for _ in 0..8 {
                if self.nodes[(id - 1) as usize].is_none() || !self.ready(id) {
                    break;
                }
            }
        }
    }

    fn step(&mut self) {
        self.now += 1;
        let f = self.faults;
        // Faults.
        if self.rng.chance(f.crash_permille) {
            let id = 1 + self.rng.below(self.n);
            if self.nodes[(id - 1) as usize].is_some() {
                self.crash(id);
            }
        }
        if self.rng.chance(f.partition_permille) {
            self.partition();
        } else if self.rng.chance(f.heal_permille) {
            self.heal();
        }
        for id in 1..=self.n {
            let i = (id - 1) as usize;
            if self.nodes[i].is_none() && self.down_until[i] <= self.now {
                self.start(id);
            }
        }
        // Time.
        if self.now.is_multiple_of(STEPS_PER_TICK) {
            for i in 0..self.nodes.len() {
                // Clocks drift: a node misses one tick in five.
                if !self.rng.chance(200) {
                    if let Some(node) = self.nodes[i].as_mut() {
                        node.raw().tick();
                    }
                }
            }
        }
        // The network: everything due, in a random order.
        let mut due = Vec::new();
        let mut k = 0;
        while k < self.net.len() {
            if self.net[k].at <= self.now {
                due.push(self.net.swap_remove(k).msg);
            } else {
                k += 1;
            }
        }
        for (from, to, status) in std::mem::take(&mut self.snapshot_reports) {
            if let Some(node) = self.nodes[(from - 1) as usize].as_mut() {
                node.raw().report_snapshot(to, status);
            }
        }
        while !due.is_empty() {
            let m = due.swap_remove(self.rng.below(due.len() as u64) as usize);
            let snapshot = m.get_msg_type() == MessageType::MsgSnapshot;
            let (from, to) = (m.from, m.to);
            match self.nodes[(to - 1) as usize].as_mut() {
                Some(node) => {
                    let _ = node.raw().step(m);
                    if snapshot {
                        self.snapshot_reports
                            .push((from, to, SnapshotStatus::Finish));
                    }
                }
                None => self.lost(&m),
            }
        }
        // Clients.
        if self.rng.chance(f.propose_permille) {
            let id = 1 + self.rng.below(self.n);
            if let Some(node) = self.nodes[(id - 1) as usize].as_mut() {
                if node.raw_ref().raft.state == StateRole::Leader {
                    let v = self.next_value;
                    self.next_value += 1;
                    self.truth.borrow_mut().proposed.insert(v, id);
                    let _ = node.raw().propose(Vec::new(), v.to_le_bytes().to_vec());
                }
            }
        }
        if self.rng.chance(f.conf_change_permille) {
            self.change_membership();
        }
        if self.rng.chance(f.hand_off_permille) {
            if let Some((leader, _)) = self.leader_voters() {
                let node = self.nodes[(leader - 1) as usize]
                    .as_mut()
                    .expect("live leader");
                if node.hand_off_leadership().is_some() {
                    self.truth.borrow_mut().hand_offs += 1;
                }
            }
        }
        self.ready_all();
    }

    /// The leader's membership as it applied it, if there is a leader.
    fn leader_voters(&self) -> Option<(u64, BTreeSet<u64>)> {
        self.nodes.iter().flatten().find_map(|n| {
            let r = &n.raw_ref().raft;
            (r.state == StateRole::Leader)
                .then(|| (r.id, r.prs().conf().voters().ids().iter().collect()))
        })
    }

    /// Has the leader propose removing another node when all are voters, or adding back
    /// the one that is not. raft-rs takes one change at a time. (A leader is moved off a
    /// node before that node is removed; a removal a later leader applies to itself makes
    /// it step down, which `Group` does.)
    fn change_membership(&mut self) {
        let Some((leader, voters)) = self.leader_voters() else {
            return;
        };
        let missing: Vec<u64> = (1..=self.n).filter(|id| !voters.contains(id)).collect();
        let node = self.nodes[(leader - 1) as usize]
            .as_mut()
            .expect("live leader");
        let _ = match missing.first() {
            None => {
                let others: Vec<u64> = (1..=self.n).filter(|&id| id != leader).collect();
                let id = others[self.rng.below(others.len() as u64) as usize];
                let cc = ConfChange {
                    change_type: ConfChangeType::RemoveNode,
                    node_id: id,
                    ..ConfChange::default()
                };
                node.raw().propose_conf_change(Vec::new(), cc)
            }
            Some(&id) => {
                let cc = ConfChangeV2 {
                    changes: vec![ConfChangeSingle {
                        change_type: ConfChangeType::AddNode,
                        node_id: id,
                        ..ConfChangeSingle::default()
                    }]
                    .into(),
                    ..ConfChangeV2::default()
                };
                node.raw().propose_conf_change(Vec::new(), cc)
            }
        };
    }

    fn partition(&mut self) {
        self.truth.borrow_mut().partitions += 1;
        self.bridge = None;
        match self.rng.below(3) {
            // Halves.
            0 => {
                for s in self.side.iter_mut() {
                    *s = 0;
                }
                let mut ids: Vec<usize> = (0..self.n as usize).collect();
                for _ in 0..self.n / 2 {
                    let k = self.rng.below(ids.len() as u64) as usize;
                    self.side[ids.swap_remove(k)] = 1;
                }
            }
            // One node isolated.
            1 => {
                for s in self.side.iter_mut() {
                    *s = 0;
                }
                self.side[self.rng.below(self.n) as usize] = 1;
            }
            // A bridge: two halves that cannot reach each other, one node reaching both.
            _ => {
                let bridge = 1 + self.rng.below(self.n);
                for id in 1..=self.n {
                    self.side[(id - 1) as usize] = (id % 2) as u8;
                }
                self.bridge = Some(bridge);
            }
        }
    }

    fn heal(&mut self) {
        self.bridge = None;
        for s in self.side.iter_mut() {
            *s = 0;
        }
    }

    /// Whether every node has applied everything the leader holds, all of it committed.
    fn converged(&self) -> bool {
        let Some(leader) = self
            .nodes
            .iter()
            .flatten()
            .find(|n| n.raw_ref().raft.state == StateRole::Leader)
        else {
            return false;
        };
        let log = &leader.raw_ref().raft.raft_log;
        if log.committed != log.last_index() {
            return false;
        }
        // Every voter has applied everything; a node removed from the group need not.
        let voters: Vec<u64> = leader
            .raw_ref()
            .raft
            .prs()
            .conf()
            .voters()
            .ids()
            .iter()
            .collect();
        voters.iter().all(|id| {
            self.nodes[(id - 1) as usize]
                .as_ref()
                .is_some_and(|n| n.applied() == log.committed)
        })
    }

    /// Each node's role, term, applied and committed index, and log bounds.
    fn describe(&self) -> String {
        let mut out = String::new();
        for (k, n) in self.nodes.iter().enumerate() {
            let Some(n) = n else {
                out += &format!("node {}: down\n", k + 1);
                continue;
            };
            let (r, l) = (&n.raw_ref().raft, &n.raw_ref().raft.raft_log);
            let peers: Vec<String> = r
                .prs()
                .iter()
                .map(|(id, p)| format!("{id}:{:?}/{}/{}", p.state, p.matched, p.next_idx))
                .collect();
            out += &format!(
                "node {}: {:?} of term {}, applied {}, committed {}, log {}..={}, voters {:?}, \
                 progress {}\n",
                k + 1,
                r.state,
                r.term,
                n.applied(),
                l.committed,
                l.first_index(),
                l.last_index(),
                r.prs().conf().voters().ids().iter().collect::<Vec<_>>(),
                peers.join(" ")
            );
        }
        out
    }

    fn run(mut self) -> Report {
        for _ in 0..FAULT_STEPS {
            self.step();
        }
        self.faults = CALM;
        self.heal();
        for id in 1..=self.n {
            if self.nodes[(id - 1) as usize].is_none() {
                self.down_until[(id - 1) as usize] = self.now;
            }
        }
        let mut steps = 0;
        while !self.converged() {
            steps += 1;
            assert!(
                steps <= CONVERGE_STEPS,
                "seed {}: the healed group did not converge in {CONVERGE_STEPS} steps:\n{}",
                self.seed,
                self.describe()
            );
            self.step();
        }
        self.check()
    }

    fn check(&self) -> Report {
        let seed = self.seed;
        let (_, voters) = self
            .leader_voters()
            .expect("a converged group has a leader");
        let nodes: Vec<&Node> = voters
            .iter()
            .map(|id| {
                self.nodes[(id - 1) as usize]
                    .as_ref()
                    .expect("voters are live")
            })
            .collect();
        let truth = self.truth.borrow();
        let values = &nodes[0].machine().values;
        for (k, n) in nodes.iter().enumerate() {
            assert_eq!(
                &n.machine().values,
                values,
                "seed {seed}: voter {} holds other values than the first",
                k + 1
            );
        }
        assert_eq!(
            values,
            &truth.committed_values(u64::MAX),
            "seed {seed}: the values differ from the committed entries"
        );
        let unique: BTreeSet<u64> = values.iter().copied().collect();
        assert_eq!(
            unique.len(),
            values.len(),
            "seed {seed}: a value applied twice"
        );
        for v in &truth.acked {
            assert!(
                unique.contains(v),
                "seed {seed}: acknowledged value {v} is lost"
            );
        }
        let t = &truth;
        Report {
            proposed: t.proposed.len(),
            acked: t.acked.len(),
            kept: values.len(),
            faults: [
                t.crashes,
                t.disk_faults,
                t.partitions,
                t.installs,
                t.compactions,
                t.conf_changes_applied,
                t.hand_offs,
            ],
        }
    }
}

#[derive(Default)]
struct Report {
    proposed: usize,
    acked: usize,
    kept: usize,
    /// Crashes, disk faults part-way through a `Ready` (each also a crash), partitions,
    /// snapshots installed, compactions, membership changes applied (on any node),
    /// leadership hand-offs asked for.
    faults: [usize; 7],
}

impl Report {
    fn add(&mut self, r: &Report) {
        self.proposed += r.proposed;
        self.acked += r.acked;
        self.kept += r.kept;
        for (a, b) in self.faults.iter_mut().zip(r.faults) {
            *a += b;
        }
    }

    fn line(&self) -> String {
        let [crashes, disk, partitions, installs, compactions, changes, hand_offs] = self.faults;
        format!(
            "{} proposed, {} acknowledged, {} kept; {crashes} crashes ({disk} of them disk \
             faults part-way through a Ready), {partitions} partitions, {installs} snapshots \
             installed, {compactions} compactions, {changes} membership changes applied, \
             {hand_offs} leadership hand-offs",
            self.proposed, self.acked, self.kept
        )
    }
}

fn run_seed(seed: u64) -> Report {
    Sim::new(seed).run()
}

#[test]
fn raft_groups_keep_every_acknowledged_entry_under_faults() {
    if let Ok(seed) = std::env::var("CHORUS_RAFT_SEED") {
        let seed: u64 = seed.parse().expect("CHORUS_RAFT_SEED is a number");
        eprintln!("seed {seed}: {}", run_seed(seed).line());
        return;
    }
    let seeds: u64 = std::env::var("CHORUS_RAFT_SEEDS")
        .ok()
        .map(|s| s.parse().expect("CHORUS_RAFT_SEEDS is a number"))
        .unwrap_or(1_000);
    let mut total = Report::default();
    for seed in 0..seeds {
        let r = std::panic::catch_unwind(|| run_seed(seed)).unwrap_or_else(|_| {
            panic!("seed {seed} failed; replay it with CHORUS_RAFT_SEED={seed}")
        });
        total.add(&r);
    }
    eprintln!("{seeds} seeds: {}", total.line());
    // The faults must leave work to check: most proposals commit, some are lost, and
    // every kind of fault happened.
    assert!(
        total.acked * 2 > total.proposed,
        "too little was acknowledged"
    );
    assert!(
        total.kept < total.proposed,
        "no proposal was ever lost to a fault"
    );
    if seeds >= 100 {
        assert!(total.faults.iter().all(|&n| n > 0), "{}", total.line());
    }
}
