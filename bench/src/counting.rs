//! A pass-through [`Storage`](chorus_log::Storage) that counts what the log asks of the disk.
//!
//! Group commit is judged by how many records share one `fdatasync`, and the log does not
//! expose that. Wrapping its storage tells it exactly, without a change to the log and at
//! the cost of a few counter increments per flush.

use chorus_log::{Layer, Layered};
use std::cell::Cell;
use std::io;
use std::rc::Rc;

/// What a [`CountingStorage`] and its files have done so far.
#[derive(Debug, Default)]
pub struct Counters {
    syncs: Cell<u64>,
    writes: Cell<u64>,
    bytes_written: Cell<u64>,
}

/// A point-in-time copy of [`Counters`]; subtract two to get what happened between them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CountersSnapshot {
    /// `sync_data` calls on files (directory syncs are not counted).
    pub syncs: u64,
    /// `write_at` calls.
    pub writes: u64,
    /// Bytes passed to `write_at`, before the storage widens them to whole blocks.
    pub bytes_written: u64,
}

impl Counters {
    /// The counts so far.
    pub fn snapshot(&self) -> CountersSnapshot {
        CountersSnapshot {
            syncs: self.syncs.get(),
            writes: self.writes.get(),
            bytes_written: self.bytes_written.get(),
        }
    }
}

impl std::ops::Sub for CountersSnapshot {
    type Output = CountersSnapshot;

    fn sub(self, earlier: CountersSnapshot) -> CountersSnapshot {
        CountersSnapshot {
            syncs: self.syncs - earlier.syncs,
            writes: self.writes - earlier.writes,
            bytes_written: self.bytes_written - earlier.bytes_written,
        }
    }
}

/// The layer that counts: every clone shares the same [`Counters`].
#[derive(Clone, Debug, Default)]
pub struct Counting(Rc<Counters>);

impl Layer for Counting {
    fn write(&self, bytes: usize) -> io::Result<()> {
        let c = &self.0;
        c.writes.set(c.writes.get() + 1);
        c.bytes_written.set(c.bytes_written.get() + bytes as u64);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        self.0.syncs.set(self.0.syncs.get() + 1);
        Ok(())
    }
}

/// A [`Storage`](chorus_log::Storage) that counts the writes and syncs made through it
/// and its files.
pub type CountingStorage<S> = Layered<S, Counting>;

/// `inner` with fresh counters, and the counters (shared with every file opened through
/// it; keep them to read after the storage has moved into a log).
pub fn counting<S>(inner: S) -> (CountingStorage<S>, Rc<Counters>) {
    let layer = Counting::default();
    let counters = Rc::clone(&layer.0);
    (Layered::new(inner, layer), counters)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chorus_log::{Entry, Log, LogConfig, SimConfig, SimStorage};
    use futures::executor::block_on;

    // A log over the wrapper works as usual, and without preallocation each flush shows up
    // as one write and one sync of the records' exact encoded bytes.
    #[test]
    fn counts_one_write_and_sync_per_flush() {
        block_on(async {
            let sim = SimConfig {
                yield_permille: 0,
                ..SimConfig::default()
            };
            let (storage, counters) = counting(SimStorage::new(sim));
            let config = LogConfig {
                preallocate_bytes: 0,
                ..LogConfig::default()
            };
            let (log, _) = Log::open(storage, config).await.unwrap();
            let before = counters.snapshot();
            let payload = [7u8; 100];
            let batch = [Entry {
                timestamp_us: 1,
                payload: &payload,
            }; 3];
            assert_eq!(log.append(&batch).await.unwrap(), 1..4);
            let after = counters.snapshot() - before;
            let record_bytes = (chorus_log::format::RECORD_HEADER_BYTES + payload.len()) as u64;
            assert_eq!(
                after,
                CountersSnapshot {
                    syncs: 1,
                    writes: 1,
                    bytes_written: 3 * record_bytes,
                }
            );
            assert_eq!(log.read(1, 1 << 20).await.unwrap().len(), 3);
        });
    }

    // With zeros written ahead (the default), the first flush also writes the zeros, in
    // the same sync, and the flushes after it write only their records.
    #[test]
    fn preallocation_adds_one_write_to_the_first_flush() {
        block_on(async {
            let sim = SimConfig {
                yield_permille: 0,
                ..SimConfig::default()
            };
            let (storage, counters) = counting(SimStorage::new(sim));
            let (log, _) = Log::open(storage, LogConfig::default()).await.unwrap();
            let payload = [7u8; 100];
            let entry = [Entry {
                timestamp_us: 1,
                payload: &payload,
            }];
            let before = counters.snapshot();
            log.append(&entry).await.unwrap();
            let first = counters.snapshot() - before;
            assert_eq!((first.writes, first.syncs), (2, 1));
            let before = counters.snapshot();
            log.append(&entry).await.unwrap();
            let second = counters.snapshot() - before;
            assert_eq!((second.writes, second.syncs), (1, 1));
        });
    }
}
