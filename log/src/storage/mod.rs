//! The seam between the log and the bytes on a disk.
//!
//! The log never touches files directly: it works through [`Storage`] (one directory) and
//! [`StorageFile`] (one file in it). Two implementations exist. [`DiskStorage`] is the real
//! one: glommio `DmaFile` (O_DIRECT, io_uring) for writes and reads of the active segment,
//! and memmap2 for sealed segments. [`SimStorage`] keeps everything in memory and models
//! what a crash leaves behind: unsynced bytes lost or torn at 512-byte sectors, flipped bits,
//! and failed writes or fsyncs. Every durability test runs the same log code over it.
//!
//! API boundary: writes are positioned (`write_at`), never appended implicitly, so the log
//! alone decides where bytes go. `sync_data` is the only durability point for file
//! contents, and `sync_dir` the only one for creating, removing or renaming names.
//!
//! A node keeps many directories (one per log, and others for its snapshots and blobs).
//! [`StorageRoot`] is the tree they live in: it opens a directory by its path, creating it
//! durably if it is missing. [`DiskRoot`] is a directory of the file system; [`SimRoot`]
//! is a tree of simulated directories that crash together.
//!
//! A [`Layer`] sees a storage's writes and fsyncs before they reach it ([`Layered`],
//! [`LayeredRoot`]): the fault layer ([`FaultyRoot`]) fails fsyncs on demand.

use bytes::Bytes;
use std::io;

mod cached;
mod disk;
pub mod faulty;
pub mod layer;
pub mod sim;

pub use disk::{DiskRoot, DiskStorage};
pub use faulty::{DiskFaults, FaultyRoot};
pub use layer::{Layer, Layered, LayeredRoot};
pub use sim::{SimConfig, SimRoot, SimStorage};

/// A tree of directories, each a [`Storage`]: where a node keeps all of its files.
///
/// A path names a directory relative to the root, its components separated by `/`; the
/// empty path is the root itself. Components are plain names: never empty, `.` or `..`,
/// so no path leaves the tree.
#[allow(async_fn_in_trait)]
pub trait StorageRoot: Clone {
    /// The directory type.
    type Dir: Storage + Clone;

    /// Opens the directory at `path`, creating it (and its parents) if missing. A created
    /// directory is durable when this returns: its parent is synced.
    async fn dir(&self, path: &str) -> io::Result<Self::Dir>;

    /// Opens the directory at `path` as [`StorageRoot::dir`] does, for files that sync
    /// after every write (a log whose every append is fsynced). A storage that can make a
    /// write durable as it completes opens their files so (`O_DSYNC` on a disk), and their
    /// [`StorageFile::sync_data`] then has nothing left to do after writes alone: one
    /// device round trip per write instead of a write and a flush. Callers still call
    /// `sync_data` where they need durability, so nothing depends on which storage did
    /// this; the default is [`StorageRoot::dir`].
    async fn dir_write_through(&self, path: &str) -> io::Result<Self::Dir> {
        self.dir(path).await
    }

    /// Opens the directory at `path` as [`StorageRoot::dir`] does, for files synced only
    /// now and then, whose contents are held durably elsewhere until they are (a cluster
    /// node's partition event logs, whose records its Raft journal holds). A storage with
    /// a cache in front of its device writes into the cache (the page cache on a disk), so
    /// that appends cost a copy and the device sees each block about once however many
    /// appends fill it; [`StorageFile::sync_data`] writes them out. Nothing else differs:
    /// what a file reads back, and after a crash what it lost (at most what was written
    /// since its last `sync_data`). The default is [`StorageRoot::dir`].
    async fn dir_cached(&self, path: &str) -> io::Result<Self::Dir> {
        self.dir(path).await
    }
}

/// Checks that `path` is a relative path of plain names (see [`StorageRoot`]) and returns
/// its components.
pub fn path_components(path: &str) -> io::Result<Vec<&str>> {
    if path.is_empty() {
        return Ok(Vec::new());
    }
    let parts: Vec<&str> = path.split('/').collect();
    if parts
        .iter()
        .any(|p| p.is_empty() || *p == "." || *p == ".." || p.contains('\0'))
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not a relative path of plain names: {path:?}"),
        ));
    }
    Ok(parts)
}

/// One directory of files, as the log sees it.
///
/// Futures returned by these methods are not `Send`: a log is owned by one shard.
#[allow(async_fn_in_trait)]
pub trait Storage {
    /// The file handle type of this storage.
    type File: StorageFile;

    /// Creates a new, empty file. Fails if the name exists. The name is durable only after
    /// [`Storage::sync_dir`].
    async fn create(&self, name: &str) -> io::Result<Self::File>;

    /// Opens an existing file for reading and writing.
    async fn open(&self, name: &str) -> io::Result<Self::File>;

    /// Removes a name. Durable only after [`Storage::sync_dir`].
    async fn remove(&self, name: &str) -> io::Result<()>;

    /// Renames `from` to `to`, replacing `to` if it exists. Durable only after
    /// [`Storage::sync_dir`].
    async fn rename(&self, from: &str, to: &str) -> io::Result<()>;

    /// Lists the names in the directory, in no particular order.
    async fn list(&self) -> io::Result<Vec<String>>;

    /// Makes every create, remove and rename so far durable.
    async fn sync_dir(&self) -> io::Result<()>;
}

/// One open file.
#[allow(async_fn_in_trait, clippy::len_without_is_empty)]
pub trait StorageFile {
    /// Writes `data` at byte position `pos`, extending the file if needed. The bytes are
    /// visible to reads at once but durable only after [`StorageFile::sync_data`].
    async fn write_at(&self, pos: u64, data: &[u8]) -> io::Result<()>;

    /// Reads up to `len` bytes from `pos`; fewer only at the end of the file.
    async fn read_at(&self, pos: u64, len: usize) -> io::Result<Vec<u8>>;

    /// `fdatasync`: makes every write and truncation of this file so far durable.
    async fn sync_data(&self) -> io::Result<()>;

    /// Sets the file's length. Durable only after [`StorageFile::sync_data`].
    async fn truncate(&self, len: u64) -> io::Result<()>;

    /// The file's current length in bytes.
    async fn len(&self) -> io::Result<u64>;

    /// A read-only view of the whole file as it is now. The log maps only sealed segments,
    /// which no longer change while mapped.
    fn map(&self) -> io::Result<Bytes>;

    /// [`StorageFile::map`] for a file that is about to be read whole: the real storage
    /// reads it in at once (`MAP_POPULATE`) rather than a page fault at a time.
    fn map_populated(&self) -> io::Result<Bytes> {
        self.map()
    }

    /// Closes the handle.
    async fn close(self) -> io::Result<()>;
}
