//! Storage layers: a [`Storage`] (or a [`StorageRoot`]) seen through a [`Layer`] that is
//! asked before each write and fsync, and may count it or fail it. Everything else passes
//! through unchanged.
//!
//! Two layers exist: the fault layer ([`super::faulty`]: fsyncs that fail on demand, for
//! fault tests of real processes) and the benchmarks' counters of writes and fsyncs.

use super::{Storage, StorageFile, StorageRoot};
use bytes::Bytes;
use std::io;

/// What a layer does before the calls that reach the device. Each answers `Ok` to let the
/// call through, or the error the call then returns without reaching the layer below.
pub trait Layer: Clone {
    /// Before a file's `write_at` of `bytes` bytes.
    fn write(&self, bytes: usize) -> io::Result<()> {
        let _ = bytes;
        Ok(())
    }

    /// Before a file's `read_at` of `bytes` bytes.
    fn read(&self, bytes: usize) -> io::Result<()> {
        let _ = bytes;
        Ok(())
    }

    /// Before a file's `sync_data`.
    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }

    /// Before a directory's `sync_dir`.
    fn sync_dir(&self) -> io::Result<()> {
        Ok(())
    }
}

/// A [`StorageRoot`] whose directories are [`Layered`].
#[derive(Clone, Debug)]
pub struct LayeredRoot<R, L> {
    inner: R,
    layer: L,
}

impl<R, L> LayeredRoot<R, L> {
    /// `inner`, seen through `layer`.
    pub fn new(inner: R, layer: L) -> LayeredRoot<R, L> {
        LayeredRoot { inner, layer }
    }
}

impl<R: StorageRoot, L: Layer> StorageRoot for LayeredRoot<R, L> {
    type Dir = Layered<R::Dir, L>;

    async fn dir(&self, path: &str) -> io::Result<Self::Dir> {
        let inner = self.inner.dir(path).await?;
        Ok(Layered::new(inner, self.layer.clone()))
    }

    async fn dir_write_through(&self, path: &str) -> io::Result<Self::Dir> {
        let inner = self.inner.dir_write_through(path).await?;
        Ok(Layered::new(inner, self.layer.clone()))
    }

    async fn dir_cached(&self, path: &str) -> io::Result<Self::Dir> {
        let inner = self.inner.dir_cached(path).await?;
        Ok(Layered::new(inner, self.layer.clone()))
    }
}

/// A directory seen through a [`Layer`], and so is every file opened in it.
#[derive(Clone, Debug)]
pub struct Layered<S, L> {
    inner: S,
    layer: L,
}

impl<S, L: Clone> Layered<S, L> {
    /// `inner`, seen through `layer`.
    pub fn new(inner: S, layer: L) -> Layered<S, L> {
        Layered { inner, layer }
    }

    fn wrap<F>(&self, inner: F) -> LayeredFile<F, L> {
        LayeredFile {
            inner,
            layer: self.layer.clone(),
        }
    }
}

impl<S: Storage, L: Layer> Storage for Layered<S, L> {
    type File = LayeredFile<S::File, L>;

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
        self.layer.sync_dir()?;
        self.inner.sync_dir().await
    }
}

/// A file of a [`Layered`] directory.
#[derive(Debug)]
pub struct LayeredFile<F, L> {
    inner: F,
    layer: L,
}

impl<F: StorageFile, L: Layer> StorageFile for LayeredFile<F, L> {
    async fn write_at(&self, pos: u64, data: &[u8]) -> io::Result<()> {
        self.layer.write(data.len())?;
        self.inner.write_at(pos, data).await
    }

    async fn read_at(&self, pos: u64, len: usize) -> io::Result<Vec<u8>> {
        self.layer.read(len)?;
        self.inner.read_at(pos, len).await
    }

    async fn sync_data(&self) -> io::Result<()> {
        self.layer.sync_data()?;
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

    fn map_populated(&self) -> io::Result<Bytes> {
        self.inner.map_populated()
    }

    async fn close(self) -> io::Result<()> {
        self.inner.close().await
    }
}
