//! Segments that retention keeps as spares (`LogConfig::recycle_segments`): the next
//! segments take their blocks, so no zeros are written ahead of their records; what a
//! spare held before never reads back as a record, after a clean reopen or a crash. The
//! storage is the simulated disk seen through a layer that counts the bytes written.

use chorus_log::{
    DiskStorage, Entry, Layer, Layered, Log, LogConfig, SimConfig, SimStorage, Storage as _,
};
use futures::executor::block_on;
use std::cell::Cell;
use std::io;
use std::rc::Rc;

#[derive(Clone, Default)]
struct CountWrites(Rc<Cell<u64>>);

impl Layer for CountWrites {
    fn write(&self, bytes: usize) -> io::Result<()> {
        self.0.set(self.0.get() + bytes as u64);
        Ok(())
    }
}

type Storage = Layered<SimStorage, CountWrites>;

const SEGMENT_BYTES: u64 = 64 * 1024;
const RECORD_BYTES: usize = 200;

fn config(recycle_segments: usize) -> LogConfig {
    LogConfig {
        segment_bytes_max: SEGMENT_BYTES,
        index_interval_bytes: 1024,
        preallocate_bytes: 16 * 1024,
        recycle_segments,
        ..LogConfig::default()
    }
}

fn open(sim: &SimStorage, config: LogConfig) -> (Log<Storage>, Rc<Cell<u64>>) {
    let layer = CountWrites::default();
    let written = Rc::clone(&layer.0);
    let (log, _) = block_on(Log::open(Layered::new(sim.clone(), layer), config)).expect("open");
    (log, written)
}

fn body(tag: &str, i: u64) -> Vec<u8> {
    let mut b = format!("{tag} record {i} ").into_bytes();
    b.resize(RECORD_BYTES, b'.');
    b
}

/// Appends `n` records, one flush each, tagged `tag` and numbered from the log's end.
async fn append_to<S: chorus_log::Storage>(log: &Log<S>, tag: &str, n: u64) {
    let first = log.next_offset();
    for i in first..first + n {
        let payload = body(tag, i);
        let entry = Entry {
            timestamp_us: i,
            payload: &payload,
        };
        log.append(&[entry]).await.expect("append");
    }
}

fn append(log: &Log<Storage>, tag: &str, n: u64) {
    block_on(append_to(log, tag, n));
}

/// Reads every record from `from` to the end and checks each against `tag(offset)`.
fn check(log: &Log<Storage>, from: u64, tag: impl Fn(u64) -> &'static str) {
    let mut at = from;
    while at < log.next_offset() {
        let records = block_on(log.read(at, 1 << 20)).expect("read");
        assert!(!records.is_empty(), "nothing read at {at}");
        for r in records {
            assert_eq!(r.offset, at);
            assert_eq!(r.payload.as_ref(), body(tag(at), at).as_slice());
            at += 1;
        }
    }
}

fn spares(sim: &SimStorage) -> Vec<String> {
    let mut names: Vec<String> = block_on(sim.list())
        .expect("list")
        .into_iter()
        .filter(|n| n.ends_with(".spare"))
        .collect();
    names.sort();
    names
}

/// Records per segment, about.
fn per_segment() -> u64 {
    SEGMENT_BYTES / (RECORD_BYTES as u64 + 32)
}

/// Fills four segments, lets retention take at least two, and then measures the bytes
/// written while two more segments fill.
fn bytes_written_after_retention(recycle_segments: usize) -> (u64, SimStorage) {
    let sim = SimStorage::new(SimConfig {
        seed: 5,
        yield_permille: 0,
    });
    let (log, written) = open(&sim, config(recycle_segments));
    append(&log, "a", 4 * per_segment());
    let segments = log.segment_count();
    assert!(segments >= 4);
    let first = block_on(log.delete_before(3 * per_segment())).expect("retention");
    let removed = segments - log.segment_count();
    assert!(removed >= 2, "retention removed {removed} segments");
    assert_eq!(spares(&sim).len(), recycle_segments.min(removed));
    let before = written.get();
    append(&log, "b", 2 * per_segment());
    check(&log, first, |o| {
        if o < 4 * per_segment() + 1 {
            "a"
        } else {
            "b"
        }
    });
    (written.get() - before, sim)
}

#[test]
fn segments_made_from_spares_write_no_zeros() {
    let records = 2 * per_segment() * (RECORD_BYTES as u64 + 32);
    let (plain, _) = bytes_written_after_retention(0);
    let (recycled, sim) = bytes_written_after_retention(2);
    // Both spares became segments.
    assert_eq!(spares(&sim), Vec::<String>::new());
    // Without spares the zeros ahead cost about as much as the records again (each flush
    // also writes its last block's records again: these are single-record flushes).
    assert!(
        plain > recycled + records / 2,
        "without spares {plain} bytes, with {recycled}, records {records}"
    );
}

#[test]
fn a_spares_old_records_never_read_back() {
    let sim = SimStorage::new(SimConfig {
        seed: 7,
        yield_permille: 0,
    });
    let (log, _) = open(&sim, config(1));
    append(&log, "a", 3 * per_segment());
    block_on(log.delete_before(2 * per_segment())).expect("retention");
    assert_eq!(spares(&sim).len(), 1);
    // Into the segment made from the spare, only a few records: the spare's old records
    // lie right after them.
    while spares(&sim).len() == 1 {
        append(&log, "b", 1);
    }
    append(&log, "b", 3);
    let next = log.next_offset();
    let b_from = 3 * per_segment() + 1;
    let tag = move |o| if o < b_from { "a" } else { "b" };
    check(&log, log.first_offset(), tag);

    // A crash: every record was synced, so all are there, and nothing after them.
    drop(log);
    sim.crash();
    let (log, _) = open(&sim, config(1));
    assert_eq!(log.next_offset(), next);
    check(&log, log.first_offset(), tag);
    append(&log, "b", 5);
    check(&log, log.first_offset(), tag);

    // A clean close and reopen, with spares no longer wanted: none are kept.
    block_on(log.delete_before(b_from)).expect("retention");
    assert_eq!(spares(&sim).len(), 1);
    block_on(log.close()).expect("close");
    let (log, _) = open(&sim, config(0));
    assert_eq!(spares(&sim), Vec::<String>::new());
    assert_eq!(log.next_offset(), next + 5);
    check(&log, log.first_offset(), tag);
}

// On a real disk, with every write synced as it completes (a Raft journal's files): a
// spare keeps its blocks, the segment made from it grows no file, and every record reads
// back after a reopen.
#[test]
fn a_disk_log_reuses_its_spares() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("journal");
    glommio::LocalExecutorBuilder::default()
        .spawn(move || async move {
            let open = |recycle| {
                let path = path.clone();
                async move {
                    let storage = DiskStorage::open_dir_write_through(&path).expect("dir");
                    let (log, _) = Log::open(storage, config(recycle)).await.expect("open");
                    log
                }
            };
            let spares = |path: &std::path::Path| {
                let mut n: Vec<u64> = std::fs::read_dir(path)
                    .expect("list")
                    .filter_map(|e| e.ok())
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".spare"))
                    .map(|e| e.metadata().expect("metadata").len())
                    .collect();
                n.sort();
                n
            };
            let log = open(1).await;
            append_to(&log, "d", 3 * per_segment()).await;
            log.delete_before(2 * per_segment())
                .await
                .expect("retention");
            let kept = spares(&path);
            assert_eq!(kept.len(), 1);
            assert!(kept[0] >= SEGMENT_BYTES / 2, "a spare of {} bytes", kept[0]);
            // The next segment is the spare: no file grows past what the spare had.
            let mut segments_len = 0;
            while spares(&path).len() == 1 {
                append_to(&log, "d", 1).await;
            }
            for e in std::fs::read_dir(&path).expect("list").flatten() {
                if e.file_name().to_string_lossy().ends_with(".seg") {
                    segments_len = segments_len.max(e.metadata().expect("metadata").len());
                }
            }
            assert!(
                segments_len <= SEGMENT_BYTES + 4096,
                "a segment of {segments_len}"
            );
            append_to(&log, "d", 10).await;
            let (first, next) = (log.first_offset(), log.next_offset());
            log.close().await.expect("close");
            let log = open(1).await;
            assert_eq!(log.first_offset(), first);
            assert_eq!(log.next_offset(), next);
            let mut at = first;
            while at < next {
                for r in log.read(at, 1 << 20).await.expect("read") {
                    assert_eq!(r.offset, at);
                    assert_eq!(r.payload.as_ref(), body("d", at).as_slice());
                    at += 1;
                }
            }
        })
        .expect("spawn")
        .join()
        .expect("test thread");
}
