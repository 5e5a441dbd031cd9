//! The newest written records are read from memory: a reader that follows the tail costs
//! the storage no read, and what it gets is what was written, across a seal, a truncation
//! and a restart. The storage is the simulated disk seen through a layer that counts reads.

use chorus_log::{Entry, Layer, Layered, Log, LogConfig, SimConfig, SimStorage};
use futures::executor::block_on;
use std::cell::Cell;
use std::io;
use std::rc::Rc;

#[derive(Clone, Default)]
struct CountReads(Rc<Cell<u64>>);

impl Layer for CountReads {
    fn read(&self, _bytes: usize) -> io::Result<()> {
        self.0.set(self.0.get() + 1);
        Ok(())
    }
}

type Storage = Layered<SimStorage, CountReads>;

fn open(config: LogConfig) -> (Log<Storage>, Rc<Cell<u64>>) {
    let sim = SimStorage::new(SimConfig {
        seed: 11,
        yield_permille: 0,
    });
    let layer = CountReads::default();
    let reads = Rc::clone(&layer.0);
    let (log, _) = block_on(Log::open(Layered::new(sim, layer), config)).expect("open");
    (log, reads)
}

fn body(tag: &str, i: u64) -> Vec<u8> {
    format!("{tag} record {i} ").repeat(8).into_bytes()
}

/// Appends `n` records, one flush each, tagged `tag` and numbered from the log's end.
fn append(log: &Log<Storage>, tag: &str, n: u64) {
    for _ in 0..n {
        let i = log.next_offset();
        let payload = body(tag, i);
        let entry = [Entry {
            timestamp_us: i,
            payload: &payload,
        }];
        block_on(log.append(&entry)).expect("append");
    }
}

/// Reads every record from `from` to the end and checks each against `tag(offset)`.
fn check(log: &Log<Storage>, from: u64, tag: impl Fn(u64) -> &'static str) {
    let records = block_on(log.read(from, 1 << 20)).expect("read");
    assert_eq!(
        records.len() as u64,
        log.next_offset() - from,
        "records from {from}"
    );
    for (r, offset) in records.iter().zip(from..) {
        assert_eq!(r.offset, offset);
        assert_eq!(r.payload.as_ref(), body(tag(offset), offset).as_slice());
    }
}

fn config(recent_bytes: usize) -> LogConfig {
    LogConfig {
        segment_bytes_max: 64 * 1024,
        index_interval_bytes: 512,
        recent_bytes,
        ..LogConfig::default()
    }
}

#[test]
fn a_reader_at_the_tail_reads_no_storage() {
    let (log, reads) = open(config(4096));
    append(&log, "a", 200);
    let before = reads.get();
    for from in [195, 200, 185] {
        check(&log, from, |_| "a");
    }
    assert_eq!(reads.get(), before, "tail reads went to the storage");
    // Older records than the kept bytes come from the storage, and are right.
    check(&log, log.first_offset(), |_| "a");
    assert!(reads.get() > before, "a read of the whole log read nothing");
}

#[test]
fn without_kept_bytes_every_read_goes_to_the_storage() {
    let (log, reads) = open(config(0));
    append(&log, "a", 20);
    let before = reads.get();
    check(&log, 19, |_| "a");
    assert!(reads.get() > before, "the counting layer saw no read");
}

#[test]
fn a_truncated_tail_is_never_read_back_from_memory() {
    let (log, _) = open(config(4096));
    append(&log, "old", 100);
    assert_eq!(log.first_offset(), 1);
    block_on(log.truncate_after(89)).expect("truncate");
    assert_eq!(log.next_offset(), 90);
    check(&log, 80, |_| "old");
    append(&log, "new", 10);
    check(&log, 80, |o| if o < 90 { "old" } else { "new" });
    // A cut before everything kept in memory, then new records at the same offsets.
    block_on(log.truncate_after(9)).expect("truncate");
    append(&log, "again", 30);
    check(&log, 1, |o| if o < 10 { "old" } else { "again" });
}

#[test]
fn records_stay_right_across_seals_and_a_restart() {
    let (log, reads) = open(config(4096));
    // About 200 bytes a record, 64 KiB segments: several seals.
    append(&log, "a", 1000);
    let before = reads.get();
    check(&log, log.next_offset() - 5, |_| "a");
    assert_eq!(reads.get(), before);
    check(&log, log.first_offset(), |_| "a");
    block_on(log.restart_at(5000)).expect("restart");
    append(&log, "b", 10);
    check(&log, 5000, |_| "b");
}
