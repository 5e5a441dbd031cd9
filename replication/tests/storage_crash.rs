//! A group's storage across crashes of the simulated disk, stopped at every step of a
//! write: the state file comes back as the last state written whole or the one being
//! written, never a mixture and never an error; the Raft log comes back with every entry
//! it acknowledged, and a replaced tail stays replaced.

use chorus_log::{LogConfig, SimConfig, SimRoot, SimStorage};
use chorus_replication::state::{GroupState, StateFile};
use chorus_replication::RaftLog;
use futures::executor::block_on;
use futures::FutureExt;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::Storage as _;
use std::future::Future;
use std::task::{Context, Poll};

fn state(term: u64) -> GroupState {
    let mut s = GroupState::default();
    s.hard.term = term;
    s.hard.vote = term % 3 + 1;
    s.hard.commit = term * 2;
    s.conf.voters = vec![1, 2, 3];
    s.snapshot_conf.voters = vec![1, 2, 3];
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

fn open(root: &SimRoot) -> RaftLog<SimStorage> {
    block_on(RaftLog::open(
        root.dir_now("g/state"),
        root.dir_now("g/log"),
        small(),
        &conf(),
    ))
    .expect("open")
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
}

#[test]
fn a_snapshot_install_survives_a_crash_at_any_step() {
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
            snap.mut_metadata().index = 200;
            snap.mut_metadata().term = 3;
            snap.mut_metadata().set_conf_state(conf());
            snap.data = b"the leader's state at 200".to_vec().into();
            let done = poll_at_most(log.apply_snapshot(&snap), polls)
                .map(|r| r.expect("install"))
                .is_some();
            drop(log);
            root.crash();
            let log = open(&root);
            let (first, last) = (log.first_index().unwrap(), log.last_index().unwrap());
            if log.state().snapshot_index == 200 {
                // Installed: nothing of the old log is served, the snapshot is whole.
                assert_eq!((first, last), (201, 200), "seed {seed}, {polls} polls");
                let s = log.snapshot(0, 2).unwrap();
                assert_eq!(&s.data[..], b"the leader's state at 200");
                assert_eq!(log.initial_state().unwrap().hard_state.commit, 200);
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
            let (_, mut machine) = ReplicatedLog::new(Replica::new(0), log, None);
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
            let (rlog, mut machine) = ReplicatedLog::new(Replica::new(0), log, None);
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
    let (rlog, mut machine) = ReplicatedLog::new(Replica::new(0), log, None);
    block_on(machine.apply(&entries[..3])).unwrap();
    let head = [chorus_log::Entry {
        timestamp_us: 4,
        payload: b"4.0",
    }];
    block_on(rlog.log().append(&head)).unwrap();
    drop((rlog, machine));
    let (log, _) = block_on(chorus_log::Log::open(d.clone(), LogConfig::default())).unwrap();
    let (rlog, mut machine) = ReplicatedLog::new(Replica::new(0), log, None);
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
    let (rlog, machine) = ReplicatedLog::new(Replica::new(1), log, None);
    let config = raft::Config {
        id: 1,
        election_tick: 10,
        heartbeat_tick: 2,
        ..raft::Config::default()
    };
    let one = ConfState {
        voters: vec![1],
        ..ConfState::default()
    };
    let mut group = block_on(Group::open(
        root.dir_now("g/state"),
        root.dir_now("g/log"),
        small(),
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
