//! A file of a [`super::DiskStorage`] opened for the page cache rather than O_DIRECT: the
//! storage of logs that are synced only now and then ([`super::StorageRoot::dir_cached`]),
//! such as a cluster node's partition event logs, whose records its Raft journal holds
//! durably until the log syncs before a snapshot.
//!
//! Written through O_DIRECT, such a log sent every append to the device as whole blocks:
//! a 300-byte record rewrote the 4 KiB block it ended in, and a node whose groups each
//! applied a few entries per turn wrote some 60 MB/s for 15 MB/s of records, which on a
//! virtual disk capped near 200 MB/s made the device the commit's bottleneck. In the
//! cache, appends to one block meet before writeback, and the device sees each block about
//! once.
//!
//! Writes, reads, truncation and the length are plain system calls on the shard's thread:
//! a write into the cache is a copy (the log writes zeros ahead, so an append does not
//! grow the file either), and a read of records this process wrote finds them in the
//! cache. Only `fdatasync`, which waits for the device, goes through io_uring (glommio's
//! [`BufferedFile`], on a second descriptor of the same file), so the shard keeps running
//! while it flushes.
//!
//! **Written behind.** Left to the kernel, the pages would stay dirty until the log syncs
//! (a cluster node's event log, before each snapshot: some thousand entries apart, a
//! megabyte or more), and that `fdatasync` would write them all while its group waits,
//! queued with every journal's writes on the same device. So every [`WRITE_BEHIND_BYTES`]
//! of written records the file asks the kernel to start writing the whole pages behind
//! them (`sync_file_range` with `SYNC_FILE_RANGE_WRITE`, which does not wait for the
//! device): the device gets the records in large writes as they come, and a sync finds
//! little left. Zeros written ahead are not started: records are to be written over them.

use bytes::Bytes;
use glommio::io::BufferedFile;
use std::cell::Cell;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Bytes of records written between two requests to start their writeback; see the
/// module docs.
pub(super) const WRITE_BEHIND_BYTES: u64 = 256 * 1024;

/// Pages, as far as the written-behind ranges go: only whole ones are started.
const PAGE_BYTES: u64 = 4096;

/// One file written into the page cache; see the module docs.
#[derive(Debug)]
pub(super) struct CachedFile {
    file: File,
    /// The same file on a descriptor of its own, for `fdatasync` through io_uring.
    flusher: BufferedFile,
    path: PathBuf,
    /// Writeback was asked for every page before this position.
    started_to: Cell<u64>,
    /// Requests to start writeback made (tests look at it).
    #[cfg(test)]
    pub(super) started: Cell<u64>,
}

impl CachedFile {
    /// Opens `path` for reads and writes, creating it when `create_new` is set (failing if
    /// it exists).
    pub(super) fn open(path: PathBuf, create_new: bool) -> io::Result<CachedFile> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(create_new)
            .open(&path)?;
        let fd = file.try_clone()?.into_raw_fd();
        // SAFETY: `fd` is a descriptor this call just made and owns; the `BufferedFile`
        // takes it over and closes it.
        let flusher = unsafe { BufferedFile::from_raw_fd(fd) };
        Ok(CachedFile {
            file,
            flusher,
            path,
            started_to: Cell::new(0),
            #[cfg(test)]
            started: Cell::new(0),
        })
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    #[cfg(test)]
    pub(super) fn raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }

    pub(super) fn write_at(&self, pos: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, pos)?;
        if super::disk::all_zeros(data) {
            return Ok(());
        }
        let from = self.started_to.get().min(pos - pos % PAGE_BYTES);
        let end = pos + data.len() as u64;
        let to = end - end % PAGE_BYTES;
        if to >= from + WRITE_BEHIND_BYTES {
            // SAFETY: the descriptor is `self.file`'s, open while `self` is borrowed.
            let asked = unsafe {
                libc::sync_file_range(
                    self.file.as_raw_fd(),
                    from as i64,
                    (to - from) as i64,
                    libc::SYNC_FILE_RANGE_WRITE,
                )
            };
            if asked != 0 {
                return Err(io::Error::last_os_error());
            }
            self.started_to.set(to);
            #[cfg(test)]
            self.started.set(self.started.get() + 1);
        }
        Ok(())
    }

    /// Up to `len` bytes from `pos`, fewer where the file ends.
    pub(super) fn read_at(&self, pos: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        let mut have = 0;
        while have < len {
            match self.file.read_at(&mut buf[have..], pos + have as u64) {
                Ok(0) => break,
                Ok(n) => have += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        buf.truncate(have);
        Ok(buf)
    }

    pub(super) async fn sync_data(&self) -> io::Result<()> {
        Ok(self.flusher.fdatasync().await?)
    }

    pub(super) fn truncate(&self, len: u64) -> io::Result<()> {
        self.started_to
            .set(self.started_to.get().min(len - len % PAGE_BYTES));
        self.file.set_len(len)
    }

    pub(super) fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    pub(super) fn map(&self, populate: bool) -> io::Result<Bytes> {
        super::disk::map_file(&self.file, populate)
    }

    pub(super) async fn close(self) -> io::Result<()> {
        Ok(self.flusher.close().await?)
    }
}
