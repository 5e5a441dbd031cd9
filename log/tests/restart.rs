//! `Log::restart_at`: the log a Raft follower empties and restarts at a later offset when
//! it installs a snapshot. Checked whole, and with the simulated disk crashing at every
//! step of it: reopening finds the old records (a prefix of them, from the first), an empty
//! log, or the restarted one, and never old records at the new offsets or a hole.

use chorus_log::{Entry, Log, LogConfig, Record, SimConfig, SimStorage};
use futures::executor::block_on;
use futures::FutureExt;
use std::task::{Context, Poll};

fn small() -> LogConfig {
    LogConfig {
        segment_bytes_max: 4096,
        index_interval_bytes: 256,
        ..LogConfig::default()
    }
}

fn body(i: u64) -> Vec<u8> {
    format!("record {i} ").repeat(8).into_bytes()
}

fn append(log: &Log<SimStorage>, offset: u64) {
    let p = body(offset);
    let r = block_on(log.append(&[Entry {
        timestamp_us: offset,
        payload: &p,
    }]))
    .expect("append");
    assert_eq!(r, offset..offset + 1);
}

fn all(log: &Log<SimStorage>) -> Vec<Record> {
    block_on(log.read(log.first_offset(), usize::MAX)).expect("read")
}

#[test]
fn restart_moves_the_next_offset_and_keeps_nothing_old() {
    let s = SimStorage::new(SimConfig {
        seed: 1,
        yield_permille: 0,
    });
    let (log, _) = block_on(Log::open(s.clone(), small())).expect("open");
    for i in 1..=200 {
        append(&log, i);
    }
    assert!(log.segment_count() > 3, "the test needs several segments");
    block_on(log.restart_at(1_000)).expect("restart");
    assert_eq!((log.first_offset(), log.next_offset()), (1_000, 1_000));
    assert!(all(&log).is_empty());
    append(&log, 1_000);
    append(&log, 1_001);
    block_on(log.close()).expect("close");

    s.crash();
    let (log, _) = block_on(Log::open(s.clone(), small())).expect("reopen");
    assert_eq!((log.first_offset(), log.next_offset()), (1_000, 1_002));
    let records = all(&log);
    assert_eq!(records.len(), 2);
    for r in &records {
        assert_eq!(r.payload.as_ref(), body(r.offset).as_slice());
    }
    // Restarting at an earlier offset is allowed too: the log is simply emptied there.
    block_on(log.restart_at(7)).expect("restart lower");
    append(&log, 7);
    assert_eq!((log.first_offset(), log.next_offset()), (7, 8));
}

#[test]
fn a_crash_at_any_step_of_a_restart_leaves_a_whole_log() {
    let noop = futures::task::noop_waker();
    let mut outcomes = [0usize; 3];
    for seed in 0..40u64 {
        for polls in 0..30usize {
            let s = SimStorage::new(SimConfig {
                seed: seed * 1_000 + polls as u64,
                yield_permille: 700,
            });
            let (log, _) = block_on(Log::open(s.clone(), small())).expect("open");
            for i in 1..=120 {
                append(&log, i);
            }
            {
                let mut restart = Box::pin(log.restart_at(500));
                let mut cx = Context::from_waker(&noop);
                for _ in 0..polls {
                    if let Poll::Ready(r) = restart.poll_unpin(&mut cx) {
                        r.expect("restart");
                        break;
                    }
                }
            }
            drop(log);
            s.crash();
            let (log, _) = block_on(Log::open(s.clone(), small())).expect("reopen");
            let (first, next) = (log.first_offset(), log.next_offset());
            let records = all(&log);
            assert_eq!(
                records.len() as u64,
                next - first,
                "seed {seed}, {polls} polls"
            );
            for (k, r) in records.iter().enumerate() {
                assert_eq!(r.offset, first + k as u64);
                assert_eq!(r.payload.as_ref(), body(r.offset).as_slice());
            }
            if first == 500 {
                assert_eq!(next, 500, "the restarted log holds nothing");
                outcomes[2] += 1;
            } else {
                assert_eq!(first, 1, "a prefix of the old log starts at its start");
                assert!(next <= 121);
                outcomes[usize::from(next == 1)] += 1;
            }
            // Whatever it found, the restart can be done again, and then holds.
            block_on(log.restart_at(500)).expect("restart again");
            append(&log, 500);
            assert_eq!((log.first_offset(), log.next_offset()), (500, 501));
        }
    }
    // Every kind of leftover was seen: part of the old log, nothing, the new log.
    assert!(outcomes.iter().all(|&n| n > 0), "outcomes {outcomes:?}");
}
