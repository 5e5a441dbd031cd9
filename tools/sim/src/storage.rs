//! The simulated disk with latency: every operation of [`SimRoot`]'s directories takes
//! simulated time, an fsync the most, as on a real device.
//!
//! Without it an fsync would finish within a step or two, and a crash would almost never
//! fall between a commit's write and its fsync, where "acknowledged only when durable"
//! and "delivered only when durable" are at stake. With it, a commit is in flight for
//! tens of steps, and crashes at random steps land inside those windows often.

use crate::executor::Executor;
use bytes::Bytes;
use chorus_log::storage::sim::SimFile;
use chorus_log::{SimRoot, SimStorage, Storage, StorageFile, StorageRoot};
use std::io;
use std::time::Duration;

/// The most simulated time one write or read takes, in microseconds.
const IO_US_MAX: u64 = 40;
/// The most simulated time one `fdatasync` or directory sync takes, in microseconds.
const SYNC_US_MAX: u64 = 1_500;

/// A [`SimRoot`] whose operations take simulated time.
#[derive(Clone)]
pub struct SlowRoot {
    inner: SimRoot,
    ex: Executor,
}

impl SlowRoot {
    /// `inner`, with latency drawn from `ex`.
    pub fn new(inner: SimRoot, ex: Executor) -> SlowRoot {
        SlowRoot { inner, ex }
    }
}

async fn wait(ex: &Executor, us_max: u64) {
    let us = ex.below(us_max + 1);
    if us > 0 {
        ex.sleep(Duration::from_micros(us)).await;
    }
}

impl StorageRoot for SlowRoot {
    type Dir = SlowDir;

    async fn dir(&self, path: &str) -> io::Result<SlowDir> {
        Ok(SlowDir {
            inner: self.inner.dir(path).await?,
            ex: self.ex.clone(),
        })
    }
}

/// A directory of a [`SlowRoot`].
#[derive(Clone)]
pub struct SlowDir {
    inner: SimStorage,
    ex: Executor,
}

impl Storage for SlowDir {
    type File = SlowFile;

    async fn create(&self, name: &str) -> io::Result<SlowFile> {
        wait(&self.ex, IO_US_MAX).await;
        Ok(SlowFile {
            inner: self.inner.create(name).await?,
            ex: self.ex.clone(),
        })
    }

    async fn open(&self, name: &str) -> io::Result<SlowFile> {
        wait(&self.ex, IO_US_MAX).await;
        Ok(SlowFile {
            inner: self.inner.open(name).await?,
            ex: self.ex.clone(),
        })
    }

    async fn remove(&self, name: &str) -> io::Result<()> {
        wait(&self.ex, IO_US_MAX).await;
        self.inner.remove(name).await
    }

    async fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        wait(&self.ex, IO_US_MAX).await;
        self.inner.rename(from, to).await
    }

    async fn list(&self) -> io::Result<Vec<String>> {
        self.inner.list().await
    }

    async fn sync_dir(&self) -> io::Result<()> {
        wait(&self.ex, SYNC_US_MAX).await;
        self.inner.sync_dir().await
    }
}

/// A file of a [`SlowDir`].
pub struct SlowFile {
    inner: SimFile,
    ex: Executor,
}

impl StorageFile for SlowFile {
    async fn write_at(&self, pos: u64, data: &[u8]) -> io::Result<()> {
        wait(&self.ex, IO_US_MAX).await;
        self.inner.write_at(pos, data).await
    }

    async fn read_at(&self, pos: u64, len: usize) -> io::Result<Vec<u8>> {
        wait(&self.ex, IO_US_MAX).await;
        self.inner.read_at(pos, len).await
    }

    async fn sync_data(&self) -> io::Result<()> {
        wait(&self.ex, SYNC_US_MAX).await;
        self.inner.sync_data().await
    }

    async fn truncate(&self, len: u64) -> io::Result<()> {
        wait(&self.ex, IO_US_MAX).await;
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
