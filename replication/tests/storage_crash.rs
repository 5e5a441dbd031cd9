//! A group's storage across crashes of the simulated disk, stopped at every step of a
//! write: the state file comes back as the last state written whole or the one being
//! written, never a mixture and never an error; the Raft log comes back with every entry
//! it acknowledged, and a replaced tail stays replaced, for one group and for several
//! sharing their shard's journal.

mod common;

use chorus_log::{LogConfig, SimConfig, SimRoot, SimStorage, Storage as _};
use chorus_replication::state::{GroupState, StateFile};
use chorus_replication::{Journal, RaftLog};
use futures::executor::block_on;
use futures::FutureExt;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::Storage as _;
use std::future::Future;
use std::rc::Rc;
use std::task::{Context, Poll};

fn state(term: u64) -> GroupState {
    let mut s = GroupState::default();
    s.hard.term = term;
    s.hard.vote = term % 3 + 1;
    s.hard.commit = term * 2;
    s.conf.voters = vec![1, 2, 3];
    s.snapshot_conf.voters = vec![1, 2, 3];
    // Every other state carries its snapshot's data inline.
    s.snapshot_inline = term
        .is_multiple_of(2)
        .then(|| format!("position {term}").into_bytes());
    s
}

/// Polls `f` at most `polls` times; whether it finished.
fn poll_at_most<F: Future>(f: F, polls: usize) -> Option<F::Output> {
    let noop = futures::task::noop_waker();
    let mut cx = Context::from_waker(&noop);
    let mut f = Box::pin(f);
    for _ in 0..polls {
        if let Poll::Ready(out) = f.poll_unpin(&mut cx) {
            return Some(out);
        }
    }
    None
}

fn disk(seed: u64) -> SimStorage {
    SimStorage::new(SimConfig {
        seed,
        yield_permille: 600,
    })
}

#[test]
fn the_state_file_survives_a_crash_at_any_step() {
    for seed in 0..200u64 {
        for polls in 0..12 {
            let d = disk(seed * 100 + polls as u64);
            // Creation itself may be cut short: then there is no state yet, or the first.
            let created = poll_at_most(StateFile::open(&d, &state(1)), polls);
            let Some(opened) = created else {
                d.crash();
                let (_, got) = block_on(StateFile::open(&d, &state(9))).expect("reopen");
                assert!(got == state(1) || got == state(9), "seed {seed}: {got:?}");
                continue;
            };
            let (mut file, got) = opened.expect("open");
            assert_eq!(got, state(1));
            for t in 2..=4 {
                block_on(file.write(&state(t))).expect("write");
            }
            let finished = poll_at_most(file.write(&state(5)), polls).is_some();
            d.crash();
            let (_, got) = block_on(StateFile::open(&d, &state(99))).expect("reopen");
            if finished {
                assert_eq!(got, state(5), "seed {seed}, {polls} polls");
            } else {
                assert!(got == state(4) || got == state(5), "seed {seed}: {got:?}");
            }
        }
    }
}

fn conf() -> ConfState {
    ConfState {
        voters: vec![1, 2, 3],
        ..ConfState::default()
    }
}

fn entry(index: u64, term: u64) -> Entry {
    Entry {
        index,
        term,
        data: format!("entry {index} of term {term}").into_bytes().into(),
        ..Entry::default()
    }
}

fn small() -> LogConfig {
    LogConfig {
        segment_bytes_max: 2048,
        index_interval_bytes: 256,
        ..LogConfig::default()
    }
}

/// The shard's journal on `root` (opened again after each crash).
fn journal(root: &SimRoot) -> Rc<Journal<SimStorage>> {
    let j = Journal::open(root.dir_now("journal"), small(), 1_000);
    Rc::new(block_on(j).expect("open the journal"))
}

fn open(root: &SimRoot) -> RaftLog<SimStorage> {
    let j = journal(root);
    block_on(RaftLog::open(root.dir_now("g/state"), j, 0, &conf())).expect("open")
}

fn terms(log: &RaftLog<SimStorage>) -> Vec<(u64, u64)> {
    let (first, last) = (log.first_index().unwrap(), log.last_index().unwrap());
    if last < first {
        return Vec::new();
    }
    log.entries(first, last + 1, None, raft::GetEntriesContext::empty(false))
        .unwrap()
        .iter()
        .map(|e| (e.index, e.term))
        .collect()
}

#[test]
fn entries_hard_state_and_compaction_survive_reopening() {
    let root = SimRoot::new(SimConfig {
        seed: 3,
        yield_permille: 0,
    });
    let mut log = open(&root);
    assert_eq!(
        (log.first_index().unwrap(), log.last_index().unwrap()),
        (1, 0)
    );
    let batch: Vec<Entry> = (1..=60).map(|i| entry(i, 1)).collect();
    block_on(log.append(&batch)).unwrap();
    // A new leader of term 2 replaces the tail after 40.
    let tail: Vec<Entry> = (41..=45).map(|i| entry(i, 2)).collect();
    block_on(log.append(&tail)).unwrap();
    let hs = HardState {
        term: 2,
        vote: 3,
        commit: 44,
        ..HardState::default()
    };
    block_on(log.set_hard_state(&hs)).unwrap();
    // The compaction keeps the 10 entries up to its snapshot for followers a little behind.
    block_on(log.compact(30, b"state at 30".to_vec(), 10)).unwrap();
    assert_eq!(log.first_index().unwrap(), 21);
    assert_eq!(log.term(30).unwrap(), 1);
    assert_eq!(log.term(25).unwrap(), 1);
    assert!(log.term(19).is_err());
    let tail = log
        .entries(21, 31, None, raft::GetEntriesContext::empty(false))
        .unwrap();
    assert_eq!(
        tail.iter().map(|e| e.index).collect::<Vec<_>>(),
        (21..31).collect::<Vec<_>>()
    );
    assert!(log
        .entries(20, 31, None, raft::GetEntriesContext::empty(false))
        .is_err());
    drop(log);
    root.crash();

    let log = open(&root);
    let got = terms(&log);
    let want: Vec<(u64, u64)> = (31..=40)
        .map(|i| (i, 1))
        .chain((41..=45).map(|i| (i, 2)))
        .collect();
    assert_eq!(got, want);
    let initial = log.initial_state().unwrap();
    assert_eq!(initial.hard_state, hs);
    assert_eq!(initial.conf_state, conf());
    let snap = log.snapshot(0, 2).unwrap();
    assert_eq!(
        (snap.get_metadata().index, snap.get_metadata().term),
        (30, 1)
    );
    assert_eq!(&snap.data[..], b"state at 30");
    assert!(log
        .entries(20, 32, None, raft::GetEntriesContext::empty(false))
        .is_err());
    // Small, the snapshot lives in the state: no file.
    let files = |root: &SimRoot| -> Vec<String> {
        let mut names = block_on(root.dir_now("g/state").list()).unwrap();
        names.retain(|n| n.starts_with("snap-"));
        names
    };
    assert!(files(&root).is_empty(), "{:?}", files(&root));
    // A large one goes to a file, and a small one after it takes its place in the state
    // and removes the file; each comes back after a crash.
    let mut log = log;
    let large = vec![7u8; 5_000];
    block_on(log.compact(35, large.clone(), 10)).unwrap();
    assert_eq!(files(&root), ["snap-00000000000000000035"]);
    drop(log);
    root.crash();
    let mut log = open(&root);
    assert_eq!(&log.snapshot(0, 2).unwrap().data[..], &large[..]);
    block_on(log.compact(40, b"state at 40".to_vec(), 10)).unwrap();
    assert!(files(&root).is_empty(), "{:?}", files(&root));
    drop(log);
    root.crash();
    let log = open(&root);
    let snap = log.snapshot(0, 2).unwrap();
    assert_eq!(
        (snap.get_metadata().index, &snap.data[..]),
        (40, &b"state at 40"[..])
    );
}

#[test]
fn a_snapshot_install_survives_a_crash_at_any_step() {
    install_survives_a_crash(200, 30);
}

// The same with a snapshot inside the old log (of a later term): the old entries do not
// continue it, and entries appended after it must not be taken for theirs on the next open.
#[test]
fn a_snapshot_install_inside_the_log_survives_a_crash_at_any_step() {
    install_survives_a_crash(30, 30);
}

// The same with a snapshot too large for the state's slots: it goes to a file of its own.
#[test]
fn a_large_snapshot_install_survives_a_crash_at_any_step() {
    install_survives_a_crash(200, 3_000);
}

/// The data of a snapshot at `at`, `len` bytes long.
fn snapshot_data(at: u64, len: usize) -> Vec<u8> {
    let mut data = format!("the leader's state at {at}").into_bytes();
    data.resize(len, b'.');
    data
}

fn install_survives_a_crash(at: u64, len: usize) {
    let mut seen_old = 0;
    let mut seen_new = 0;
    for seed in 0..60u64 {
        for polls in 0..40 {
            // The disk yields before most operations, so the install stops part-way.
            let root = SimRoot::new(SimConfig {
                seed: seed * 1_000 + polls as u64,
                yield_permille: 600,
            });
            let mut log = open(&root);
            block_on(log.append(&(1..=50).map(|i| entry(i, 1)).collect::<Vec<_>>())).unwrap();
            let hs = HardState {
                term: 1,
                vote: 1,
                commit: 20,
                ..HardState::default()
            };
            block_on(log.set_hard_state(&hs)).unwrap();
            let mut snap = Snapshot::default();
            snap.mut_metadata().index = at;
            snap.mut_metadata().term = 3;
            snap.mut_metadata().set_conf_state(conf());
            snap.data = snapshot_data(at, len).into();
            let done = poll_at_most(log.apply_snapshot(&snap), polls)
                .map(|r| r.expect("install"))
                .is_some();
            drop(log);
            root.crash();
            let mut log = open(&root);
            let (first, last) = (log.first_index().unwrap(), log.last_index().unwrap());
            if log.state().snapshot_index == at {
                // Installed: nothing of the old log is served, the snapshot is whole.
                assert_eq!((first, last), (at + 1, at), "seed {seed}, {polls} polls");
                let s = log.snapshot(0, 2).unwrap();
                assert_eq!(s.data, snapshot_data(at, len));
                let inline = len <= chorus_replication::state::INLINE_SNAPSHOT_BYTES;
                assert_eq!(log.state().snapshot_inline.is_some(), inline);
                assert_eq!(log.initial_state().unwrap().hard_state.commit, at);
                // The entries after it are the group's from now on, across a crash too.
                let next: Vec<Entry> = (at + 1..=at + 5).map(|i| entry(i, 3)).collect();
                block_on(log.append(&next)).unwrap();
                drop(log);
                root.crash();
                let log = open(&root);
                let want: Vec<(u64, u64)> = (at + 1..=at + 5).map(|i| (i, 3)).collect();
                assert_eq!(terms(&log), want, "seed {seed}, {polls} polls");
                seen_new += 1;
            } else {
                assert!(!done, "an acknowledged install was lost");
                assert_eq!(terms(&log), (1..=50).map(|i| (i, 1)).collect::<Vec<_>>());
                assert_eq!(log.initial_state().unwrap().hard_state, hs);
                seen_old += 1;
            }
        }
    }
    assert!(
        seen_old > 0 && seen_new > 0,
        "old {seen_old}, new {seen_new}"
    );
}

/// Raft entries of batches of events: entry `i` holds `i % 3 + 1` events named `i.j`.
fn batches(n: u64) -> Vec<Entry> {
    (1..=n)
        .map(|i| {
            let payloads: Vec<Vec<u8>> = (0..i % 3 + 1)
                .map(|j| format!("{i}.{j}").into_bytes())
                .collect();
            let events: Vec<chorus_log::Entry<'_>> = payloads
                .iter()
                .map(|p| chorus_log::Entry {
                    timestamp_us: i,
                    payload: p,
                })
                .collect();
            let mut e = entry(i, 1);
            e.data = chorus_replication::event_log::encode_batch(&events).into();
            e
        })
        .collect()
}

/// Every record of `log`, as text.
fn event_texts(log: &chorus_log::Log<SimStorage>) -> Vec<String> {
    let mut out = Vec::new();
    let mut at = log.first_offset();
    while at < log.next_offset() {
        for r in block_on(log.read(at, 1 << 20)).expect("read") {
            at = r.offset + 1;
            out.push(String::from_utf8(r.payload.to_vec()).unwrap());
        }
    }
    out
}

// A partition's event log as its group's state machine, crashed at every step of applying
// two batches after two applied whole and persisted, then opened and given every entry again (as
// raft-rs does after a restart with no snapshot): what was appended is skipped, the rest
// appended, and the log ends holding each batch once, whole, in order. Then a batch torn
// by a crash (its head in the log) is cut and appended again.
#[test]
fn the_event_log_machine_applies_each_batch_once_across_a_crash() {
    use chorus_replication::{Replica, ReplicatedLog, StateMachine};
    let entries = batches(4);
    let want: Vec<String> = (1..=4u64)
        .flat_map(|i| (0..i % 3 + 1).map(move |j| format!("{i}.{j}")))
        .collect();
    let mut cut = 0;
    for seed in 0..12u64 {
        for polls in 0..30 {
            let d = disk(seed * 1_000 + polls as u64);
            let (log, _) =
                block_on(chorus_log::Log::open(d.clone(), LogConfig::default())).expect("open");
            let (_, mut machine) = ReplicatedLog::new(Replica::new(0), log);
            block_on(machine.apply(&entries[..2])).expect("apply");
            // Applied without an fsync: durable once persisted (before a snapshot).
            block_on(machine.persist()).expect("persist");
            let done = poll_at_most(machine.apply(&entries[2..]), polls);
            drop(machine);
            d.crash();
            let (log, _) =
                block_on(chorus_log::Log::open(d.clone(), LogConfig::default())).expect("reopen");
            let kept = event_texts(&log);
            assert!(
                want.starts_with(&kept),
                "seed {seed}: a prefix survives: {kept:?}"
            );
            // Batches of 2, 3, 1 and 2 events: the first two make 5.
            assert!(
                kept.len() >= 5,
                "seed {seed}: the first two batches were durable"
            );
            if done.is_none() && kept.len() < want.len() {
                cut += 1;
            }
            let (rlog, mut machine) = ReplicatedLog::new(Replica::new(0), log);
            machine.restore(0, &[]);
            block_on(machine.apply(&entries)).expect("apply again");
            assert_eq!(event_texts(rlog.log()), want, "seed {seed}, {polls} polls");
            assert_eq!(rlog.end(), rlog.log().next_offset());
        }
    }
    assert!(cut > 0, "some crash lost appended events");

    // This disk loses a write whole; a real one can keep the head of a batch's write, and
    // the log then keeps the records before the tear. The head of the fourth batch is in
    // the log: it is cut and the batch appended whole.
    let d = disk(7);
    let (log, _) = block_on(chorus_log::Log::open(d.clone(), LogConfig::default())).unwrap();
    let (rlog, mut machine) = ReplicatedLog::new(Replica::new(0), log);
    block_on(machine.apply(&entries[..3])).unwrap();
    let head = [chorus_log::Entry {
        timestamp_us: 4,
        payload: b"4.0",
    }];
    block_on(rlog.log().append(&head)).unwrap();
    drop((rlog, machine));
    let (log, _) = block_on(chorus_log::Log::open(d.clone(), LogConfig::default())).unwrap();
    let (rlog, mut machine) = ReplicatedLog::new(Replica::new(0), log);
    machine.restore(0, &[]);
    block_on(machine.apply(&entries)).unwrap();
    assert_eq!(event_texts(rlog.log()), want);
}

/// A one-voter group whose machine is an event log, on `root`: opened (or reopened), made
/// leader, and driven until it has nothing more to do.
fn event_log_group(
    root: &SimRoot,
) -> (
    chorus_replication::Group<SimStorage, chorus_replication::EventLogMachine<SimStorage>>,
    chorus_replication::ReplicatedLog<SimStorage>,
) {
    use chorus_replication::{Group, Replica, ReplicatedLog};
    let (log, _) = block_on(chorus_log::Log::open(root.dir_now("g/events"), small())).unwrap();
    let (rlog, machine) = ReplicatedLog::new(Replica::new(1), log);
    let (config, one) = common::single_voter();
    let mut group = block_on(Group::open(
        root.dir_now("g/state"),
        journal(root),
        0,
        &one,
        config,
        machine,
        // A snapshot every 4 entries: the test passes several.
        4,
    ))
    .expect("open the group");
    group.raw().campaign().expect("campaign");
    settle(&mut group);
    (group, rlog)
}

fn settle(
    group: &mut chorus_replication::Group<
        SimStorage,
        chorus_replication::EventLogMachine<SimStorage>,
    >,
) {
    while block_on(group.on_ready(&mut |_| {})).expect("ready") {}
}

// The event log is appended without an fsync of its own (its batches are durable in the
// Raft log), so a crash can take its tail; the group takes a snapshot (which names an
// event-log offset, and lets the entries before it be compacted) only after the event log
// is synced. So after a crash at any point the reopened group applies again what came
// after its snapshot and its event log ends holding every batch it applied, once each.
#[test]
fn a_group_rebuilds_its_unsynced_event_log_after_a_crash() {
    // With the leader's empty entry first, 22 batches end two entries past a snapshot.
    let entries = batches(22);
    let want: Vec<String> = (1..=22u64)
        .flat_map(|i| (0..i % 3 + 1).map(move |j| format!("{i}.{j}")))
        .collect();
    let mut lost_some = 0;
    for seed in 0..20u64 {
        let root = SimRoot::new(SimConfig {
            seed,
            yield_permille: 0,
        });
        let (mut group, rlog) = event_log_group(&root);
        for e in &entries {
            group.raw().propose(Vec::new(), e.data.to_vec()).unwrap();
            settle(&mut group);
        }
        assert_eq!(event_texts(rlog.log()), want, "seed {seed}: applied");
        drop((group, rlog));
        root.crash();
        let (log, _) = block_on(chorus_log::Log::open(root.dir_now("g/events"), small())).unwrap();
        if event_texts(&log).len() < want.len() {
            lost_some += 1;
        }
        drop(log);
        let (group, rlog) = event_log_group(&root);
        assert_eq!(
            event_texts(rlog.log()),
            want,
            "seed {seed}: after the crash"
        );
        assert!(group.raw_ref().store().state().snapshot_index > 0);
    }
    assert!(lost_some > 0, "some crash took part of the event log");
}

/// What a group of the shared-journal test should hold: its entries from `base` on, the
/// snapshot it last took, and the commit index it was told.
#[derive(Clone, Debug, Default)]
struct Model {
    entries: Vec<(u64, u64)>,
    snapshot: u64,
    commit: u64,
    term: u64,
}

impl Model {
    fn last(&self) -> u64 {
        self.entries.last().map_or(self.snapshot, |e| e.0)
    }
    /// The entries a reopened group must serve: those after its snapshot.
    fn after(&self, snapshot: u64) -> Vec<(u64, u64)> {
        self.entries
            .iter()
            .filter(|e| e.0 > snapshot)
            .copied()
            .collect()
    }
}

fn open_group(root: &SimRoot, journal: &Rc<Journal<SimStorage>>, g: u64) -> RaftLog<SimStorage> {
    let dir = root.dir_now(&format!("g{g}/state"));
    block_on(RaftLog::open(dir, journal.clone(), g, &conf())).expect("reopen a group")
}

/// One operation of the shared-journal test on group `g`: appends (`head` past the end, or
/// replacing a tail after the commit index), a snapshot installed, a compaction, or a
/// rewrite. Returns the future
/// and what the model becomes if it completes, with the models a crash part-way may leave.
#[allow(clippy::type_complexity)]
fn journal_op<'a>(
    log: &'a mut RaftLog<SimStorage>,
    m: &Model,
    rng: &mut chorus_log::storage::sim::SimRng,
) -> (
    std::pin::Pin<Box<dyn Future<Output = ()> + 'a>>,
    Model,
    Vec<Model>,
) {
    let mut done = m.clone();
    let pick = rng.below(10);
    if pick < 6 || m.last() == m.commit {
        // Append, replacing the uncommitted tail from `head` on half the time.
        let head = if m.last() > m.commit && rng.chance(500) {
            m.commit + 1 + rng.below(m.last() - m.commit)
        } else {
            m.last() + 1
        };
        if head <= m.last() {
            done.term += 1;
        }
        let n = 1 + rng.below(5);
        let entries: Vec<Entry> = (head..head + n).map(|i| entry(i, done.term)).collect();
        done.entries.retain(|e| e.0 < head);
        // A crash part-way keeps a prefix of the batch (none of it, or some records).
        let partial = (0..n)
            .map(|k| {
                let mut p = m.clone();
                p.entries.retain(|e| e.0 < head || k == 0);
                p.entries.extend((head..head + k).map(|i| (i, done.term)));
                p
            })
            .collect();
        done.entries
            .extend((head..head + n).map(|i| (i, done.term)));
        let fut = Box::pin(async move {
            log.append(&entries).await.expect("append");
        });
        return (fut, done, partial);
    }
    if pick == 6 {
        // A snapshot from a leader of a later term, at an index inside the uncommitted
        // tail or past the end: it replaces every entry.
        let index = m.commit + 1 + rng.below(m.last() + 5 - m.commit);
        done.term += 1;
        done.entries.clear();
        done.snapshot = index;
        done.commit = index;
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = index;
        snap.mut_metadata().term = done.term;
        snap.mut_metadata().set_conf_state(conf());
        snap.data = format!("installed at {index}").into_bytes().into();
        let fut = Box::pin(async move {
            log.apply_snapshot(&snap).await.expect("install");
        });
        return (fut, done, vec![m.clone()]);
    }
    if pick < 8 && m.commit > m.snapshot {
        let index = m.snapshot + 1 + rng.below(m.commit - m.snapshot);
        let keep = rng.below(6);
        done.snapshot = index;
        let fut = Box::pin(async move {
            log.compact(index, format!("at {index}").into_bytes(), keep)
                .await
                .expect("compact");
        });
        return (fut, done, vec![m.clone()]);
    }
    let fut = Box::pin(async move {
        log.rewrite_if_due().await.expect("rewrite");
    });
    (fut, done, vec![m.clone()])
}

// Four groups share one journal (rewrites after 40 records, small segments): entries
// appended, tails replaced, snapshots installed, compactions and rewrites, the journal's segments deleted behind
// every group's oldest entry; crashed at a random point of a random operation, reopened
// every group, and checked: each group serves exactly the entries it was acknowledged after
// its snapshot (or, for the operation cut short, what it would be left with).
#[test]
fn groups_sharing_a_journal_keep_their_entries_across_crashes() {
    let mut crashed_in_flight = 0;
    let mut deleted = 0;
    for seed in 0..150u64 {
        let mut rng = chorus_log::storage::sim::SimRng::new(seed);
        let root = SimRoot::new(SimConfig {
            seed,
            yield_permille: 300,
        });
        let open_journal = |root: &SimRoot| {
            let j = Journal::open(root.dir_now("journal"), small(), 40);
            Rc::new(block_on(j).expect("open the journal"))
        };
        let mut models: Vec<Model> = vec![Model::default(); 4];
        for cycle in 0..3 {
            let journal = open_journal(&root);
            let mut logs: Vec<RaftLog<SimStorage>> =
                (0..4).map(|g| open_group(&root, &journal, g)).collect();
            for (g, log) in logs.iter_mut().enumerate() {
                let want = models[g].after(log.state().snapshot_index);
                assert_eq!(terms(log), want, "seed {seed} cycle {cycle}: group {g}");
                // A restarted node learns the commit index from its leader again.
                log.set_commit(models[g].commit);
            }
            for _ in 0..rng.below(120) {
                // Group 0 busy, the others mostly idle: their entries pin the journal,
                // and are written again.
                let g = if rng.chance(750) {
                    0
                } else {
                    1 + rng.below(3) as usize
                };
                let m = models[g].clone();
                let (fut, done, _) = journal_op(&mut logs[g], &m, &mut rng);
                block_on(fut);
                models[g] = done;
                // Raft commits as it goes: the entries up to some index are committed.
                if models[g].last() > models[g].commit && rng.chance(400) {
                    let c = models[g].commit + 1 + rng.below(models[g].last() - models[g].commit);
                    models[g].commit = c;
                    logs[g].set_commit(c);
                }
            }
            if journal.first_offset() > 1 {
                deleted += 1;
            }
            // The last operation is cut short by the crash.
            let g = rng.below(4) as usize;
            let m = models[g].clone();
            let (fut, done, partial) = journal_op(&mut logs[g], &m, &mut rng);
            let finished = poll_at_most(fut, rng.below(10) as usize).is_some();
            drop(logs);
            drop(journal);
            root.crash();
            let journal = open_journal(&root);
            let log = open_group(&root, &journal, g as u64);
            let got = terms(&log);
            let snap = log.state().snapshot_index;
            let now = if finished {
                done
            } else {
                crashed_in_flight += 1;
                // The finished operation first: an install whose state was written is
                // finished, though the entries it dropped may match the old model's too.
                let all: Vec<Model> = [done].into_iter().chain(partial).collect();
                all.into_iter()
                    .find(|p| p.after(snap) == got)
                    .unwrap_or_else(|| panic!("seed {seed} cycle {cycle}: group {g} holds {got:?}"))
            };
            assert_eq!(now.after(snap), got, "seed {seed} cycle {cycle}: group {g}");
            models[g] = Model {
                snapshot: snap,
                commit: now.commit.max(snap),
                ..now
            };
            drop((log, journal));
        }
    }
    assert!(
        crashed_in_flight > 100,
        "{crashed_in_flight} crashes part-way"
    );
    assert!(deleted > 20, "the journal lost its head {deleted} times");
}
