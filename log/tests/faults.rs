//! Targeted fault tests on the simulated disk: flipped bits, failed writes and fsyncs, torn
//! tails, damaged indexes, and the basic contracts of read, truncate, retention and
//! restart (a log emptied and continued at a later offset, crashed at every step).

use chorus_log::{
    AppendError, CorruptReason, Entry, Log, LogConfig, ReadError, SimConfig, SimStorage, Storage,
};
use futures::executor::block_on;

fn storage() -> SimStorage {
    SimStorage::new(SimConfig {
        seed: 7,
        yield_permille: 0,
    })
}

fn small() -> LogConfig {
    LogConfig {
        segment_bytes_max: 4096,
        index_interval_bytes: 256,
        ..LogConfig::default()
    }
}

fn body(i: u64) -> Vec<u8> {
    format!("record number {i} ").repeat(5).into_bytes()
}

fn open(s: &SimStorage) -> (Log<SimStorage>, chorus_log::RecoveryReport) {
    block_on(Log::open(s.clone(), small())).expect("open")
}

fn open_unallocated(s: &SimStorage) -> (Log<SimStorage>, chorus_log::RecoveryReport) {
    let config = LogConfig {
        preallocate_bytes: 0,
        ..small()
    };
    block_on(Log::open(s.clone(), config)).expect("open")
}

/// Appends records 1..=n one at a time.
fn fill(log: &Log<SimStorage>, n: u64) {
    for i in 1..=n {
        append_at(log, i);
    }
}

fn names(s: &SimStorage, ext: &str) -> Vec<String> {
    let mut v: Vec<String> = block_on(s.list())
        .expect("list")
        .into_iter()
        .filter(|n| n.ends_with(ext))
        .collect();
    v.sort();
    v
}

fn read_all(log: &Log<SimStorage>, from: u64) -> Result<Vec<u64>, ReadError> {
    let mut out = Vec::new();
    let mut at = from;
    loop {
        let chunk = block_on(log.read(at, 1000))?;
        let Some(last) = chunk.last() else {
            return Ok(out);
        };
        at = last.offset + 1;
        for r in chunk {
            assert_eq!(r.payload, body(r.offset), "payload of {}", r.offset);
            out.push(r.offset);
        }
    }
}

// A flipped bit in a sealed segment is found by the read that reaches it; everything
// before it stays readable, and open does not hide it.
#[test]
fn flipped_bit_in_sealed_segment_is_detected() {
    let s = storage();
    let (log, _) = open(&s);
    fill(&log, 200);
    assert!(log.segment_count() >= 3);
    drop(log);
    let seg = &names(&s, ".seg")[1];
    s.flip_bit(seg, 32 + 32 + 5, 3);
    let (log, report) = open(&s);
    assert!(report.corrupt_segments.is_empty(), "index present: no scan");
    let first_of_seg: u64 = seg[..20].parse().unwrap();
    let before = read_all(&log, 1).unwrap_err();
    match before {
        ReadError::Corrupt { offset, reason, .. } => {
            assert_eq!(offset, first_of_seg);
            assert_eq!(
                reason,
                CorruptReason::Record(chorus_log::format::RecordError::Checksum)
            );
        }
        other => panic!("expected corruption, got {other}"),
    }
    let ok = block_on(log.read(1, usize::MAX)).unwrap_or_default();
    assert!(ok.is_empty() || ok.last().unwrap().offset < first_of_seg);
    let upto: Vec<u64> = (1..first_of_seg)
        .flat_map(|o| block_on(log.read(o, 1)).unwrap())
        .map(|r| r.offset)
        .collect();
    assert_eq!(upto, (1..first_of_seg).collect::<Vec<_>>());

    // Without the index, open scans the segment and reports the corruption itself.
    drop(log);
    block_on(s.remove(&seg.replace(".seg", ".idx"))).unwrap();
    let (log, report) = open(&s);
    assert_eq!(report.corrupt_segments.len(), 1);
    assert_eq!(report.corrupt_segments[0].offset, first_of_seg);
    assert!(matches!(
        block_on(log.read(first_of_seg, 10)),
        Err(ReadError::Corrupt { .. })
    ));
    assert_eq!(log.last_offset(), 200, "later segments are kept");
}

// An EIO on fsync poisons the log: the batch is not acknowledged, every later append
// fails, and reopening recovers every acknowledged record.
#[test]
fn eio_on_fsync_poisons() {
    let s = storage();
    let (log, _) = open(&s);
    fill(&log, 10);
    s.fail_next_sync();
    let p = body(11);
    let e = block_on(log.append(&[Entry {
        timestamp_us: 0,
        payload: &p,
    }]))
    .unwrap_err();
    assert!(matches!(e, AppendError::Poisoned(_)), "{e}");
    let again = block_on(log.append(&[Entry {
        timestamp_us: 0,
        payload: &p,
    }]));
    assert!(matches!(again, Err(AppendError::Poisoned(_))));
    assert!(log.poisoned().unwrap().contains("fdatasync"));
    assert!(block_on(log.truncate_after(5)).is_err());
    drop(log);
    s.crash();
    let (log, _) = open(&s);
    assert!(log.poisoned().is_none());
    assert_eq!(
        read_all(&log, 1).unwrap()[..10],
        (1..=10).collect::<Vec<_>>()[..]
    );
}

// An EIO on write poisons the log the same way.
#[test]
fn eio_on_write_poisons() {
    let s = storage();
    let (log, _) = open(&s);
    fill(&log, 3);
    s.fail_next_write();
    let p = body(4);
    let entry = [Entry {
        timestamp_us: 0,
        payload: &p,
    }];
    assert!(matches!(
        block_on(log.append(&entry)),
        Err(AppendError::Poisoned(_))
    ));
    assert!(matches!(
        block_on(log.append(&entry)),
        Err(AppendError::Poisoned(_))
    ));
    drop(log);
    let (log, _) = open(&s);
    assert_eq!(log.last_offset(), 3);
    fill_from(&log, 4, 6);
    assert_eq!(read_all(&log, 1).unwrap(), (1..=6).collect::<Vec<_>>());
}

fn fill_from(log: &Log<SimStorage>, from: u64, to: u64) {
    for i in from..=to {
        let p = body(i);
        let r = block_on(log.append(&[Entry {
            timestamp_us: i,
            payload: &p,
        }]))
        .unwrap();
        assert_eq!(r.start, i);
    }
}

// A torn tail (garbage after the last record of the active segment) is cut and reported,
// and appends continue at the right offset.
#[test]
fn torn_tail_is_truncated() {
    let s = storage();
    // The file ends where the records end: no zeros written ahead.
    let (log, _) = open_unallocated(&s);
    fill(&log, 5);
    drop(log);
    let active = names(&s, ".seg").pop().unwrap();
    let len = s.contents(&active).unwrap().len() as u64;
    block_on(async {
        use chorus_log::StorageFile;
        let f = s.open(&active).await.unwrap();
        let mut torn = Vec::new();
        chorus_log::format::encode_record(&mut torn, 6, 6, &body(6));
        torn.truncate(torn.len() - 7);
        f.write_at(len, &torn).await.unwrap();
        f.sync_data().await.unwrap();
    });
    let (log, report) = open(&s);
    let torn = report.torn_tail.expect("torn tail reported");
    assert_eq!((torn.offset, torn.position), (6, len));
    assert!(report.tail_bytes_cut > 0);
    assert_eq!(log.last_offset(), 5);
    fill_from(&log, 6, 8);
    assert_eq!(read_all(&log, 1).unwrap(), (1..=8).collect::<Vec<_>>());
}

// A flipped bit in the active segment's last record makes it a corrupt tail: cut, reported.
#[test]
fn flipped_bit_in_active_tail_is_cut() {
    let s = storage();
    // The file ends where the records end: no zeros written ahead.
    let (log, _) = open_unallocated(&s);
    fill(&log, 5);
    drop(log);
    let active = names(&s, ".seg").pop().unwrap();
    let len = s.contents(&active).unwrap().len() as u64;
    s.flip_bit(&active, len - 3, 0);
    let (log, report) = open(&s);
    assert_eq!(report.torn_tail.unwrap().offset, 5);
    assert_eq!(log.last_offset(), 4);
}

// A missing or damaged index is rebuilt from its segment, and reads still work.
#[test]
fn damaged_index_is_rebuilt() {
    let s = storage();
    let (log, _) = open(&s);
    fill(&log, 150);
    drop(log);
    let idx = names(&s, ".idx");
    assert!(idx.len() >= 2);
    block_on(s.remove(&idx[0])).unwrap();
    s.flip_bit(&idx[1], 50, 1);
    let (log, report) = open(&s);
    assert_eq!(report.rebuilt_indexes.len(), 2);
    assert_eq!(read_all(&log, 1).unwrap(), (1..=150).collect::<Vec<_>>());
    drop(log);
    let (_, report) = open(&s);
    assert!(
        report.rebuilt_indexes.is_empty(),
        "rebuilt indexes were written back"
    );
}

// The read budget, truncation across segments, and retention behave as documented.
#[test]
fn read_budget_truncate_and_retention() {
    let s = storage();
    let (log, _) = open(&s);
    fill(&log, 120);
    let one = block_on(log.read(10, 1)).unwrap();
    assert_eq!(
        one.len(),
        1,
        "the first record is returned even over budget"
    );
    let some = block_on(log.read(10, 300)).unwrap();
    assert!(some.len() > 1 && some.len() < 10);
    assert!(block_on(log.read(121, 100)).unwrap().is_empty());

    block_on(log.truncate_after(30)).unwrap();
    assert_eq!(log.last_offset(), 30);
    fill_from(&log, 31, 60);
    assert_eq!(read_all(&log, 1).unwrap(), (1..=60).collect::<Vec<_>>());

    let first = block_on(log.delete_before(45)).unwrap();
    assert!(first > 1 && first <= 45);
    assert!(matches!(
        block_on(log.read(1, 10)),
        Err(ReadError::Deleted { .. })
    ));
    drop(log);
    let (log, _) = open(&s);
    assert_eq!(log.first_offset(), first);
    assert_eq!(
        read_all(&log, first).unwrap(),
        (first..=60).collect::<Vec<_>>()
    );
    block_on(log.truncate_after(first - 1)).unwrap();
    assert_eq!(log.next_offset(), first);
    assert!(block_on(log.truncate_after(first - 2)).is_err());
}

// Payloads over the configured limit are refused without touching the log.
#[test]
fn oversized_record_is_refused() {
    let s = storage();
    let (log, _) = open(&s);
    let big = vec![0u8; small().record_bytes_max + 1];
    let e = block_on(log.append(&[Entry {
        timestamp_us: 0,
        payload: &big,
    }]))
    .unwrap_err();
    assert!(matches!(e, AppendError::RecordTooLarge { .. }));
    fill(&log, 2);
}

// A clean close writes the active segment's index, and the next open uses it instead of a
// scan, once: the index is removed before anything is appended, so a crash after more
// appends scans again and finds them all. A record damaged after the close is still found
// by the read that reaches it.
#[test]
fn clean_close_index_is_trusted_once() {
    let s = storage();
    let (log, report) = open(&s);
    assert!(!report.active_index_used);
    fill(&log, 30);
    let active = names(&s, ".seg").last().cloned().unwrap();
    block_on(log.close()).unwrap();
    let active_idx = active.replace(".seg", ".idx");
    assert!(names(&s, ".idx").contains(&active_idx));

    let (log, report) = open(&s);
    assert!(report.active_index_used, "{report:?}");
    assert!(!names(&s, ".idx").contains(&active_idx));
    assert_eq!(read_all(&log, 1).unwrap(), (1..=30).collect::<Vec<_>>());
    for i in 31..=40 {
        let p = body(i);
        let r = block_on(log.append(&[Entry {
            timestamp_us: i,
            payload: &p,
        }]))
        .unwrap();
        assert_eq!(r, i..i + 1);
    }
    drop(log);
    s.crash();
    let (log, report) = open(&s);
    assert!(!report.active_index_used, "{report:?}");
    assert_eq!(read_all(&log, 1).unwrap(), (1..=40).collect::<Vec<_>>());
    block_on(log.close()).unwrap();

    let active = names(&s, ".seg").last().cloned().unwrap();
    let len = s.contents(&active).unwrap().len() as u64;
    s.flip_bit(&active, len - 3, 2);
    let (log, report) = open(&s);
    assert!(report.active_index_used, "{report:?}");
    assert!(
        read_all(&log, 1).is_err(),
        "a damaged record was read as good"
    );
}

// Zeros written ahead of the records grow the file in whole blocks, once per many appends;
// recovery takes them as the end of the records and cuts them without calling the tail
// torn, and appends go on where the records end.
#[test]
fn preallocated_zeros_are_cut_quietly() {
    let s = storage();
    let (log, _) = open(&s);
    fill(&log, 5);
    drop(log);
    let active = names(&s, ".seg").pop().unwrap();
    let bytes = s.contents(&active).unwrap();
    assert_eq!(bytes.len() % 4096, 0, "preallocation fills whole blocks");
    assert!(bytes.ends_with(&[0u8; 64]), "no zeros ahead of the records");
    let (log, report) = open(&s);
    assert!(report.torn_tail.is_none(), "{report:?}");
    assert!(report.tail_bytes_cut > 0, "{report:?}");
    assert_eq!(read_all(&log, 1).unwrap(), (1..=5).collect::<Vec<_>>());
    fill_from(&log, 6, 8);
    drop(log);
    let (log, _) = open(&s);
    assert_eq!(read_all(&log, 1).unwrap(), (1..=8).collect::<Vec<_>>());
}

// `Log::restart_at`: the log a Raft follower empties and restarts at a later offset when
// it installs a snapshot. Checked whole, and with the simulated disk crashing at every
// step of it: reopening finds the old records (a prefix of them, from the first), an empty
// log, or the restarted one, and never old records at the new offsets or a hole.

/// Appends one record, which must land at `offset`.
fn append_at(log: &Log<SimStorage>, offset: u64) {
    let p = body(offset);
    let r = block_on(log.append(&[Entry {
        timestamp_us: offset,
        payload: &p,
    }]))
    .expect("append");
    assert_eq!(r, offset..offset + 1);
}

#[test]
fn restart_moves_the_next_offset_and_keeps_nothing_old() {
    let s = storage();
    let (log, _) = open(&s);
    fill(&log, 200);
    assert!(log.segment_count() > 3, "the test needs several segments");
    block_on(log.restart_at(1_000)).expect("restart");
    assert_eq!((log.first_offset(), log.next_offset()), (1_000, 1_000));
    assert!(read_all(&log, 1_000).unwrap().is_empty());
    append_at(&log, 1_000);
    append_at(&log, 1_001);
    block_on(log.close()).expect("close");

    s.crash();
    let (log, _) = open(&s);
    assert_eq!((log.first_offset(), log.next_offset()), (1_000, 1_002));
    assert_eq!(read_all(&log, 1_000).unwrap(), vec![1_000, 1_001]);
    // Restarting at an earlier offset is allowed too: the log is simply emptied there.
    block_on(log.restart_at(7)).expect("restart lower");
    append_at(&log, 7);
    assert_eq!((log.first_offset(), log.next_offset()), (7, 8));
}

#[test]
fn a_crash_at_any_step_of_a_restart_leaves_a_whole_log() {
    use futures::FutureExt;
    use std::task::{Context, Poll};
    let noop = futures::task::noop_waker();
    let mut outcomes = [0usize; 3];
    for seed in 0..40u64 {
        for polls in 0..30usize {
            let s = SimStorage::new(SimConfig {
                seed: seed * 1_000 + polls as u64,
                yield_permille: 700,
            });
            let (log, _) = open(&s);
            fill(&log, 120);
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
            let (log, _) = open(&s);
            let (first, next) = (log.first_offset(), log.next_offset());
            assert_eq!(
                read_all(&log, first).unwrap(),
                (first..next).collect::<Vec<_>>(),
                "seed {seed}, {polls} polls"
            );
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
            append_at(&log, 500);
            assert_eq!((log.first_offset(), log.next_offset()), (500, 501));
        }
    }
    // Every kind of leftover was seen: part of the old log, nothing, the new log.
    assert!(outcomes.iter().all(|&n| n > 0), "outcomes {outcomes:?}");
}
