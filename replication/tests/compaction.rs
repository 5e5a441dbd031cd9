//! When a group compacts its Raft log. Several groups sharing one shard's journal, each a
//! single voter on the simulated disk, apply the same entries one at a time: each takes
//! its snapshots where its own phase says ([`compact_phase`]), so groups under the same
//! load do not all compact in the same turn; each keeps serving `compact_every` entries
//! behind its snapshot; and what they hold is whole after the journal is opened again.

mod common;

use chorus_log::{LogConfig, SimConfig, SimRoot, SimStorage};
use chorus_replication::group::compact_phase;
use chorus_replication::{Group, Journal, RaftLogError, StateMachine};
use futures::executor::block_on;
use raft::eraftpb::{Entry, EntryType};
use raft::Storage as _;
use std::collections::BTreeSet;
use std::rc::Rc;

/// Counts the normal entries applied; its snapshot is that count.
#[derive(Default)]
struct Counter(u64);

impl StateMachine for Counter {
    async fn apply(&mut self, entries: &[Entry]) -> Result<(), RaftLogError> {
        self.0 += entries
            .iter()
            .filter(|e| e.get_entry_type() == EntryType::EntryNormal && !e.data.is_empty())
            .count() as u64;
        Ok(())
    }
    fn snapshot(&self) -> Vec<u8> {
        self.0.to_le_bytes().to_vec()
    }
    fn restore(&mut self, _index: u64, data: &[u8]) {
        self.0 = data.try_into().map(u64::from_le_bytes).unwrap_or(0);
    }
}

const EVERY: u64 = 10;
const GROUPS: u64 = 8;

fn open(root: &SimRoot, journal: &Rc<Journal<SimStorage>>, g: u64) -> Group<SimStorage, Counter> {
    let (config, one) = common::single_voter();
    let dir = root.dir_now(&format!("g{g}/state"));
    block_on(Group::open(
        dir,
        journal.clone(),
        g,
        &one,
        config,
        Counter::default(),
        EVERY,
    ))
    .expect("open the group")
}

fn settle(group: &mut Group<SimStorage, Counter>) {
    while block_on(group.on_ready(&mut |_| {})).expect("ready") {}
}

fn journal(root: &SimRoot) -> Rc<Journal<SimStorage>> {
    let config = LogConfig {
        segment_bytes_max: 4096,
        index_interval_bytes: 256,
        ..LogConfig::default()
    };
    Rc::new(block_on(Journal::open(root.dir_now("journal"), config, 1_000)).expect("journal"))
}

/// The last index at or below `applied` where a group of this phase takes a snapshot: where
/// the applied index crosses a multiple of `EVERY` shifted back by the phase.
fn expected_snapshot(applied: u64, phase: u64) -> u64 {
    (1..=applied)
        .rev()
        .find(|i| (i + phase).is_multiple_of(EVERY))
        .unwrap_or(0)
}

#[test]
fn groups_compact_at_their_own_phase_and_keep_a_tail() {
    let root = SimRoot::new(SimConfig {
        seed: 7,
        yield_permille: 0,
    });
    let journal = journal(&root);
    let mut groups: Vec<_> = (0..GROUPS).map(|g| open(&root, &journal, g)).collect();
    for g in &mut groups {
        g.raw().campaign().expect("campaign");
        settle(g);
    }
    // The leader's empty entry is index 1; 45 values make index 46.
    for value in 0..45u64 {
        for g in &mut groups {
            g.raw()
                .propose(Vec::new(), value.to_le_bytes().to_vec())
                .unwrap();
            settle(g);
        }
    }
    let mut snapshots = BTreeSet::new();
    for (g, group) in groups.iter_mut().enumerate() {
        let phase = compact_phase(g as u64, EVERY);
        assert!(phase < EVERY, "group {g}: phase {phase}");
        let store = group.raw_ref().store();
        let snap = store.state().snapshot_index;
        assert_eq!(
            snap,
            expected_snapshot(46, phase),
            "group {g} (phase {phase})"
        );
        snapshots.insert(snap);
        // The entries behind the snapshot are served as far back as one interval.
        let first = store.first_index().unwrap();
        assert_eq!(first, (snap + 1).saturating_sub(EVERY).max(1), "group {g}");
        assert_eq!(store.last_index().unwrap(), 46);
        // Freeing what compactions let go, a slice per turn, loses nothing still served.
        for _ in 0..100 {
            settle(group);
        }
        let entries = group
            .raw_ref()
            .store()
            .entries(first, 47, u64::MAX, raft::GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(entries.len() as u64, 47 - first, "group {g}");
    }
    // Eight groups over an interval of ten: their snapshots are at several indexes.
    assert!(snapshots.len() >= 5, "snapshots at {snapshots:?}");

    // Opened again from the simulated disk, each group starts after its snapshot, with
    // every entry after it.
    drop(groups);
    root.crash();
    let journal = self::journal(&root);
    for g in 0..GROUPS {
        let group = open(&root, &journal, g);
        let store = group.raw_ref().store();
        let snap = store.state().snapshot_index;
        assert_eq!(snap, expected_snapshot(46, compact_phase(g, EVERY)));
        assert_eq!(store.first_index().unwrap(), snap + 1, "group {g}");
        assert_eq!(store.last_index().unwrap(), 46, "group {g}");
    }
}

#[test]
fn phases_spread_consecutive_groups_over_the_interval() {
    for every in [1u64, 2, 10, 1_000, 10_000] {
        for g in 0..1_000u64 {
            assert!(compact_phase(g, every) < every);
        }
    }
    assert_eq!(compact_phase(5, 0), 0, "no compaction, no phase");
    // Any 16 consecutive groups leave no gap wider than an eighth of the interval.
    for start in [0u64, 16, 1_000] {
        let mut phases: Vec<u64> = (start..start + 16)
            .map(|g| compact_phase(g, 1_000))
            .collect();
        phases.sort_unstable();
        let widest = phases
            .windows(2)
            .map(|w| w[1] - w[0])
            .chain([1_000 - phases[15] + phases[0]])
            .max()
            .unwrap();
        assert!(widest <= 125, "groups {start}..: phases {phases:?}");
    }
}
