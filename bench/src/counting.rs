//! A pass-through [`Storage`] that counts what the log asks of the disk.
//!
//! Group commit is judged by how many records share one `fdatasync`, and the log does not
//! expose that. Wrapping its storage tells it exactly, without a change to the log and at
//! the cost of a few counter increments per flush.

use bytes::Bytes;
use chorus_log::{Storage, StorageFile};
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

/// Wraps a [`Storage`] and counts the writes and syncs made through it and its files.
#[derive(Debug)]
pub struct CountingStorage<S> {
    inner: S,
    counters: Rc<Counters>,
}

impl<S: Storage> CountingStorage<S> {
    /// Wraps `inner` with fresh counters.
    pub fn new(inner: S) -> CountingStorage<S> {
        CountingStorage {
            inner,
            counters: Rc::default(),
        }
    }

    /// The counters, shared with every file opened through this storage; keep a clone to
    /// read them after the storage has moved into a log.
    pub fn counters(&self) -> Rc<Counters> {
        Rc::clone(&self.counters)
    }

    fn wrap(&self, file: S::File) -> CountingFile<S::File> {
        CountingFile {
            inner: file,
            counters: Rc::clone(&self.counters),
        }
    }
}

impl<S: Storage> Storage for CountingStorage<S> {
    type File = CountingFile<S::File>;

    async fn create(&self, name: &str) -> io::Result<Self::File> {
        Ok(self.wrap(self.inner.create(name).await?))
    }

    async fn open(&self, name: &str) -> io::Result<Self::File> {
        Ok(self.wrap(self.inner.open(name).await?))
    }

    async fn remove(&self, name: &str) -> io::Result<()> {
        self.inner.remove(name).await
    }

    async fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        self.inner.rename(from, to).await
    }

    async fn list(&self) -> io::Result<Vec<String>> {
        self.inner.list().await
    }

    async fn sync_dir(&self) -> io::Result<()> {
        self.inner.sync_dir().await
    }
}

/// A file of a [`CountingStorage`].
#[derive(Debug)]
pub struct CountingFile<F> {
    inner: F,
    counters: Rc<Counters>,
}

impl<F: StorageFile> StorageFile for CountingFile<F> {
    async fn write_at(&self, pos: u64, data: &[u8]) -> io::Result<()> {
        let c = &self.counters;
        c.writes.set(c.writes.get() + 1);
        c.bytes_written
            .set(c.bytes_written.get() + data.len() as u64);
        self.inner.write_at(pos, data).await
    }

    async fn read_at(&self, pos: u64, len: usize) -> io::Result<Vec<u8>> {
        self.inner.read_at(pos, len).await
    }

    async fn sync_data(&self) -> io::Result<()> {
        self.counters.syncs.set(self.counters.syncs.get() + 1);
        self.inner.sync_data().await
    }

    async fn truncate(&self, len: u64) -> io::Result<()> {
        self.inner.truncate(len).await
    }

    async fn len(&self) -> io::Result<u64> {
        self.inner.len().await
    }

    fn map(&self) -> io::Result<Bytes> {
        self.inner.map()
    }

    async fn close(self) -> io::Result<()> {
        self.inner.close().await
    }
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
            let storage = CountingStorage::new(SimStorage::new(sim));
            let counters = storage.counters();
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
            let storage = CountingStorage::new(SimStorage::new(sim));
            let counters = storage.counters();
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
