//! The real [`Storage`]: one directory on a local filesystem, files written with O_DIRECT
//! (or, in a directory opened with [`StorageRoot::dir_cached`], into the page cache: see
//! `cached.rs`).
//!
//! This module owns every system call the log makes on a disk. File contents go through
//! glommio's [`DmaFile`] (O_DIRECT over io_uring), so writes bypass the page cache and
//! `fdatasync` has only the drive's cache left to flush. Names (create, remove, rename,
//! list) and truncation are cheap metadata calls made with `std::fs` on the shard's
//! thread, and a sealed segment is read through a read-only memory map.
//!
//! Truncation is not glommio's `DmaFile::truncate`: that one runs on glommio's blocking
//! thread, and under load its answer reached the shard seconds late (the replication
//! benchmark with one group: on both followers the `ftruncate` of a segment seal held the
//! group's task 6.4 s, past every election timeout, until the load stopped, while no
//! thread of the process waited in the kernel; with `ftruncate` here, 60–230 µs). A plain
//! `ftruncate` on the shard's thread costs that once per sealed segment. Not reproduced
//! outside that load, so no unit test pins it; the benchmark's failure count does.
//!
//! O_DIRECT only accepts I/O whose position and length are multiples of the device's
//! logical block size ([`DmaFile::alignment`], 512 or 4096 bytes), while the log writes
//! records at any byte position. [`DirectFile`] hides that: each write is widened to whole
//! blocks, filled with the bytes those blocks already hold around the new data. To make an
//! append cost no read, the file remembers the contents of the block holding its last
//! written byte, and how long the file physically is.
//!
//! Architecture invariant: a file's physical length is a multiple of the alignment after
//! every write, with zeros after the logical end. The log's recovery treats an all-zero
//! record header as the end of data, and it truncates a segment to its logical length when
//! it seals it, so mapped segments end exactly where their data does.

use super::cached::CachedFile;
use super::{path_components, Storage, StorageFile, StorageRoot};
use bytes::Bytes;
use glommio::io::{DmaFile, OpenOptions};
use glommio::sync::Semaphore;
use std::cell::{Cell, RefCell};
use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// A directory of log files on a local filesystem.
///
/// Cloning is cheap: clones share the directory handle.
#[derive(Clone, Debug)]
pub struct DiskStorage {
    dir: Rc<Dir>,
}

/// The directory a [`DiskStorage`] and its clones share.
#[derive(Debug)]
struct Dir {
    path: PathBuf,
    /// Kept open so that [`Storage::sync_dir`] can fsync the directory itself, which is
    /// what makes a created, removed or renamed name durable.
    handle: File,
    /// How its files are opened.
    mode: Mode,
}

/// How a directory's files are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// O_DIRECT: [`DiskStorage::open_dir`].
    Direct,
    /// O_DIRECT and `O_DSYNC`: [`DiskStorage::open_dir_write_through`].
    WriteThrough,
    /// The page cache: [`DiskStorage::open_dir_cached`].
    Cached,
}

impl DiskStorage {
    /// Opens the directory at `path`, creating it and its parents if missing.
    pub fn open_dir(path: impl AsRef<Path>) -> io::Result<DiskStorage> {
        DiskStorage::open(path.as_ref(), Mode::Direct)
    }

    /// Opens the directory at `path` as [`DiskStorage::open_dir`] does, its files opened
    /// with `O_DSYNC`: each write is durable when it completes (the kernel flushes the
    /// drive's cache after it, or writes it with FUA), so [`StorageFile::sync_data`] skips
    /// its `fdatasync` unless a truncation came since the last. For files that are synced
    /// after every write anyway: the journal of a cluster node's shard, where the separate
    /// `fdatasync` cost a kernel worker's wake-up and one more completion per round.
    pub fn open_dir_write_through(path: impl AsRef<Path>) -> io::Result<DiskStorage> {
        DiskStorage::open(path.as_ref(), Mode::WriteThrough)
    }

    /// Opens the directory at `path` as [`DiskStorage::open_dir`] does, its files written
    /// into the page cache and not with O_DIRECT (`cached.rs`): for logs synced only now
    /// and then, whose appends then cost a copy and reach the device in large writes
    /// started behind them.
    pub fn open_dir_cached(path: impl AsRef<Path>) -> io::Result<DiskStorage> {
        DiskStorage::open(path.as_ref(), Mode::Cached)
    }

    fn open(path: &Path, mode: Mode) -> io::Result<DiskStorage> {
        let path = path.to_path_buf();
        std::fs::create_dir_all(&path)?;
        let handle = File::open(&path)?;
        Ok(DiskStorage {
            dir: Rc::new(Dir { path, handle, mode }),
        })
    }

    /// The directory this storage works in.
    pub fn path(&self) -> &Path {
        &self.dir.path
    }

    /// The full path of `name`.
    ///
    /// # Panics
    ///
    /// If `name` is not a plain file name, or is the reserved [`IOPOLL_PROBE_NAME`]: the log
    /// chooses every name itself, so a path separator or a `..` here is a bug that could
    /// reach outside the directory.
    fn file_path(&self, name: &str) -> PathBuf {
        assert!(
            !name.is_empty()
                && name != "."
                && name != ".."
                && name != IOPOLL_PROBE_NAME
                && !name.contains(['/', '\0']),
            "storage names are plain file names, got {name:?}"
        );
        self.dir.path.join(name)
    }

    /// Opens `name` for reads and writes, creating it when `create_new` is set.
    async fn open_file(&self, name: &str, create_new: bool) -> io::Result<DiskFile> {
        let path = self.file_path(name);
        if self.dir.mode == Mode::Cached {
            return Ok(DiskFile(Backing::Cached(CachedFile::open(
                path, create_new,
            )?)));
        }
        self.probe_iopoll().await?;
        let write_through = self.dir.mode == Mode::WriteThrough;
        let file = OpenOptions::new()
            .create_new(create_new)
            .read(true)
            .write(true)
            .custom_flags(if write_through { libc::O_DSYNC } else { 0 })
            .dma_open(&path)
            .await?;
        // A new file is known to be empty; an existing one is asked once, so that appends
        // know which blocks already hold data without reading them.
        let len = if create_new {
            0
        } else {
            file.file_size().await?
        };
        Ok(DiskFile(Backing::Direct(DirectFile::new(
            file,
            path,
            len,
            write_through,
        ))))
    }

    /// Makes sure glommio has decided whether this directory's device can be polled by
    /// reading real data, before any file of it is opened on this thread.
    ///
    /// glommio probes iopoll once per device and thread, with a one-block read of the first
    /// file it opens there. When that file is empty (as every segment is when created) the
    /// kernel answers the read without touching the device, so glommio wrongly decides the
    /// device can be polled, and every later read of data fails with EOPNOTSUPP on a device
    /// without poll queues (such as the virtio disk of the development machines). Opening a
    /// file that holds a block of data first makes the probe's answer true on every device.
    async fn probe_iopoll(&self) -> io::Result<()> {
        let probes = IOPOLL_PROBES.with(Rc::clone);
        let device = self.dir.handle.metadata()?.dev();
        if probes.devices.borrow().contains(&device) {
            return Ok(());
        }
        // Held across the probe so that a second open on this thread cannot reach glommio's
        // probe with its own empty file first.
        let _permit = probes.lock.acquire_permit(1).await?;
        if probes.devices.borrow().contains(&device) {
            return Ok(());
        }
        let path = self.dir.path.join(IOPOLL_PROBE_NAME);
        std::fs::write(&path, [0; IOPOLL_PROBE_BYTES])?;
        let opened = OpenOptions::new().read(true).dma_open(&path).await;
        std::fs::remove_file(&path)?;
        opened?.close().await?;
        probes.devices.borrow_mut().push(device);
        Ok(())
    }
}

/// A directory of the file system as a [`StorageRoot`]: the data directory of a node.
///
/// Cloning is cheap, and a root may be shared across threads; each opened directory
/// ([`DiskStorage`]) belongs to the thread that opened it.
#[derive(Clone, Debug)]
pub struct DiskRoot {
    path: std::sync::Arc<PathBuf>,
}

impl DiskRoot {
    /// The tree under `path`, which is created (with its parents) when a directory of it
    /// is first opened.
    pub fn new(path: impl AsRef<Path>) -> DiskRoot {
        DiskRoot {
            path: std::sync::Arc::new(path.as_ref().to_path_buf()),
        }
    }

    /// Where the tree is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl DiskRoot {
    /// The directory at `path` under the root, created (durably) if missing.
    fn make_dir(&self, path: &str) -> io::Result<PathBuf> {
        let mut at = self.path.to_path_buf();
        std::fs::create_dir_all(&at)?;
        for part in path_components(path)? {
            let parent = at.clone();
            at.push(part);
            match std::fs::create_dir(&at) {
                // A new name is durable only once its directory is synced.
                Ok(()) => File::open(&parent)?.sync_all()?,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        Ok(at)
    }
}

impl StorageRoot for DiskRoot {
    type Dir = DiskStorage;

    async fn dir(&self, path: &str) -> io::Result<DiskStorage> {
        DiskStorage::open_dir(self.make_dir(path)?)
    }

    async fn dir_write_through(&self, path: &str) -> io::Result<DiskStorage> {
        DiskStorage::open_dir_write_through(self.make_dir(path)?)
    }

    async fn dir_cached(&self, path: &str) -> io::Result<DiskStorage> {
        DiskStorage::open_dir_cached(self.make_dir(path)?)
    }
}

/// A name reserved in every storage directory for the file of [`DiskStorage::probe_iopoll`].
/// It exists only during the probe, or after a crash during one; it is never listed.
const IOPOLL_PROBE_NAME: &str = ".iopoll-probe";

/// The size of the probe file: glommio's probe reads one block at offset 0, and no device
/// block is larger than this.
const IOPOLL_PROBE_BYTES: usize = 4096;

/// The devices this thread has probed, and the lock that lets one probe run at a time.
struct IopollProbes {
    lock: Semaphore,
    devices: RefCell<Vec<u64>>,
}

thread_local! {
    // Per thread, like glommio's own record of the probe's answer.
    static IOPOLL_PROBES: Rc<IopollProbes> = Rc::new(IopollProbes {
        lock: Semaphore::new(1),
        devices: RefCell::new(Vec::new()),
    });
}

impl Storage for DiskStorage {
    type File = DiskFile;

    async fn create(&self, name: &str) -> io::Result<DiskFile> {
        self.open_file(name, true).await
    }

    async fn open(&self, name: &str) -> io::Result<DiskFile> {
        self.open_file(name, false).await
    }

    async fn remove(&self, name: &str) -> io::Result<()> {
        std::fs::remove_file(self.file_path(name))
    }

    async fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        std::fs::rename(self.file_path(from), self.file_path(to))
    }

    async fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.dir.path)? {
            let entry = entry?;
            if !entry.file_type()?.is_file() {
                continue;
            }
            // The log creates only UTF-8 names, so a name that is not UTF-8 is none of its
            // files; it is skipped rather than mangled into a name that cannot be opened.
            match entry.file_name().into_string() {
                Ok(name) if name != IOPOLL_PROBE_NAME => names.push(name),
                _ => {}
            }
        }
        Ok(names)
    }

    async fn sync_dir(&self) -> io::Result<()> {
        self.dir.handle.sync_all()
    }
}

/// One file of a [`DiskStorage`]: written with O_DIRECT, or into the page cache in a
/// directory opened with [`StorageRoot::dir_cached`].
#[derive(Debug)]
pub struct DiskFile(Backing);

#[derive(Debug)]
enum Backing {
    Direct(DirectFile),
    Cached(CachedFile),
}

impl DiskFile {
    /// The path the file was opened at. It goes stale if the file is renamed while open.
    pub fn path(&self) -> &Path {
        match &self.0 {
            Backing::Direct(f) => &f.path,
            Backing::Cached(f) => f.path(),
        }
    }

    #[cfg(test)]
    fn direct(&self) -> &DirectFile {
        match &self.0 {
            Backing::Direct(f) => f,
            Backing::Cached(_) => panic!("{} is not an O_DIRECT file", self.path().display()),
        }
    }
}

impl StorageFile for DiskFile {
    async fn write_at(&self, pos: u64, data: &[u8]) -> io::Result<()> {
        match &self.0 {
            Backing::Direct(f) => f.write_at(pos, data).await,
            Backing::Cached(f) => f.write_at(pos, data),
        }
    }

    async fn read_at(&self, pos: u64, len: usize) -> io::Result<Vec<u8>> {
        match &self.0 {
            Backing::Direct(f) => f.read_at(pos, len).await,
            Backing::Cached(f) => f.read_at(pos, len),
        }
    }

    async fn sync_data(&self) -> io::Result<()> {
        match &self.0 {
            Backing::Direct(f) => f.sync_data().await,
            Backing::Cached(f) => f.sync_data().await,
        }
    }

    async fn truncate(&self, len: u64) -> io::Result<()> {
        match &self.0 {
            Backing::Direct(f) => f.truncate(len).await,
            Backing::Cached(f) => f.truncate(len),
        }
    }

    async fn len(&self) -> io::Result<u64> {
        match &self.0 {
            Backing::Direct(f) => f.len().await,
            Backing::Cached(f) => f.len(),
        }
    }

    fn map(&self) -> io::Result<Bytes> {
        match &self.0 {
            Backing::Direct(f) => f.map(),
            Backing::Cached(f) => f.map(false),
        }
    }

    fn map_populated(&self) -> io::Result<Bytes> {
        match &self.0 {
            Backing::Direct(f) => f.map_populated(),
            Backing::Cached(f) => f.map(true),
        }
    }

    async fn close(self) -> io::Result<()> {
        match self.0 {
            Backing::Direct(f) => f.close().await,
            Backing::Cached(f) => f.close().await,
        }
    }
}

/// One file of a [`DiskStorage`], open for O_DIRECT reads and writes.
///
/// Callers may write at any byte position; the file widens each write to whole blocks
/// itself. Two rules keep that correct, and the second is checked:
/// - only this handle writes to the file while it is open, so what it remembers about the
///   file's end stays true;
/// - writes and truncations do not overlap: each is awaited before the next starts,
///   because two writes sharing a block would each put back the other's old bytes.
#[derive(Debug)]
pub struct DirectFile {
    file: DmaFile,
    path: PathBuf,
    /// The I/O alignment of the file's device, in bytes.
    alignment: u64,
    /// What this handle knows of the file's end; `None` when a write failed or was
    /// dropped midway, after which blocks are read back from the file until the next
    /// truncation makes the end known again.
    known: RefCell<Option<Known>>,
    /// Set while a write or truncation is in flight, to catch overlapping ones.
    busy: Cell<bool>,
    /// Blocks read back from the device to complete a write (tests look at it).
    reads_back: Cell<u64>,
    /// Opened with `O_DSYNC`: every completed write is durable.
    write_through: bool,
    /// A truncation came since the last `fdatasync`, which `O_DSYNC` does not cover.
    flush_owed: Cell<bool>,
    /// `fdatasync`s issued (tests look at it).
    flushes: Cell<u64>,
}

/// The end of a file as its handle last left it.
#[derive(Debug)]
struct Known {
    /// Every byte at or past this position is zero: past the physical end (a read gives
    /// zeros there), or written as zeros (the log's preallocation) and not written since.
    /// A write whose block reaches into them fills the block with zeros instead of
    /// reading it back from the device.
    zeros_from: u64,
    /// The block holding the last written byte, when that byte does not end a block.
    tail: Option<Block>,
    /// The block holding the last write's first byte, when that byte does not begin a
    /// block and the block is not `tail`: after the log writes zeros ahead from where its
    /// next append goes, that append starts in it.
    head: Option<Block>,
}

impl Known {
    /// A file `len` bytes long, of which no block is remembered.
    fn ending_at(len: u64) -> Known {
        Known {
            zeros_from: len,
            tail: None,
            head: None,
        }
    }
}

/// The exact contents of one aligned block of the file.
struct Block {
    start: u64,
    bytes: Box<[u8]>,
}

impl fmt::Debug for Block {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Block")
            .field("start", &self.start)
            .field("len", &self.bytes.len())
            .finish()
    }
}

/// Marks a file busy for as long as it lives, including when its future is dropped.
struct Exclusive<'a>(&'a Cell<bool>);

impl<'a> Exclusive<'a> {
    fn enter(busy: &'a Cell<bool>) -> Self {
        assert!(
            !busy.replace(true),
            "overlapping writes or truncations of one DirectFile"
        );
        Exclusive(busy)
    }
}

impl Drop for Exclusive<'_> {
    fn drop(&mut self) {
        self.0.set(false);
    }
}

impl DirectFile {
    fn new(file: DmaFile, path: PathBuf, len: u64, write_through: bool) -> DirectFile {
        let alignment = file.alignment();
        assert!(alignment.is_power_of_two(), "alignment {alignment}");
        DirectFile {
            file,
            path,
            alignment,
            known: RefCell::new(Some(Known::ending_at(len))),
            busy: Cell::new(false),
            reads_back: Cell::new(0),
            write_through,
            flush_owed: Cell::new(false),
            flushes: Cell::new(0),
        }
    }

    fn align_down(&self, pos: u64) -> u64 {
        pos & !(self.alignment - 1)
    }

    fn align_up(&self, pos: u64) -> u64 {
        self.align_down(pos + self.alignment - 1)
    }

    /// Copies bytes `[from, from + dst.len())` of the block at `block_start`, as the file
    /// holds them now, into `dst`. Bytes past the end of the file read as zeros, as they
    /// would after the file is extended over them.
    async fn copy_from_block(
        &self,
        known: Option<&Known>,
        block_start: u64,
        from: usize,
        dst: &mut [u8],
    ) -> io::Result<()> {
        if let Some(known) = known {
            let cached = [&known.tail, &known.head].into_iter().flatten();
            if let Some(block) = cached.into_iter().find(|b| b.start == block_start) {
                dst.copy_from_slice(&block.bytes[from..from + dst.len()]);
                return Ok(());
            }
            if block_start + from as u64 >= known.zeros_from {
                dst.fill(0);
                return Ok(());
            }
        }
        self.reads_back.set(self.reads_back.get() + 1);
        let read = self
            .file
            .read_at_aligned(block_start, self.alignment as usize)
            .await?;
        let have = read.get(from..).unwrap_or(&[]);
        let have = &have[..have.len().min(dst.len())];
        dst[..have.len()].copy_from_slice(have);
        dst[have.len()..].fill(0);
        Ok(())
    }

    /// A second descriptor of the open file, for the calls glommio does not offer: they
    /// reach the file itself, not the path it was opened at, which a rename may have
    /// changed.
    fn dup(&self) -> io::Result<File> {
        // SAFETY: the descriptor belongs to `self.file`, which keeps it open for as long as
        // `self` is borrowed, and it is only duplicated here.
        let fd = unsafe { BorrowedFd::borrow_raw(self.file.as_raw_fd()) };
        Ok(File::from(fd.try_clone_to_owned()?))
    }
}

impl StorageFile for DirectFile {
    /// Writes whole aligned blocks covering `[pos, pos + data.len())`, keeping the bytes
    /// the first and last block already hold outside that range.
    ///
    /// Past the old end of the file the last block is padded with zeros, so the physical
    /// length becomes a multiple of the device's block size; see the module docs for why the
    /// log accepts that.
    async fn write_at(&self, pos: u64, data: &[u8]) -> io::Result<()> {
        // A plain pwrite of nothing changes nothing, not even the length.
        if data.is_empty() {
            return Ok(());
        }
        let _exclusive = Exclusive::enter(&self.busy);
        // Taken, not borrowed: if this write fails or is dropped midway, the file's end is
        // no longer known, and the handle must read blocks back rather than trust memory.
        let known = self.known.take();
        let end = pos + data.len() as u64;
        let start = self.align_down(pos);
        let end_aligned = self.align_up(end);
        let tail_start = self.align_down(end);
        let head_len = (pos - start) as usize;
        let data_end = (end - start) as usize;

        let mut buf = self.file.alloc_dma_buffer((end_aligned - start) as usize);
        let bytes = buf.as_bytes_mut();
        if head_len > 0 {
            self.copy_from_block(known.as_ref(), start, 0, &mut bytes[..head_len])
                .await?;
        }
        if end < end_aligned {
            let from = (end - tail_start) as usize;
            self.copy_from_block(known.as_ref(), tail_start, from, &mut bytes[data_end..])
                .await?;
        }
        bytes[head_len..data_end].copy_from_slice(data);
        // Copied before the buffer is handed to the kernel: this block is where the next
        // append starts, and remembering it saves that append a read.
        let tail = (end < end_aligned).then(|| Block {
            start: tail_start,
            bytes: bytes[(tail_start - start) as usize..].into(),
        });
        let head = (head_len > 0 && start != tail_start).then(|| Block {
            start,
            bytes: bytes[..self.alignment as usize].into(),
        });

        let expected = buf.len();
        let written = self.file.write_at(buf, start).await?;
        if written != expected {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!(
                    "{}: short O_DIRECT write at {start}: {written} of {expected} bytes",
                    self.path.display()
                ),
            ));
        }
        *self.known.borrow_mut() = known.map(|known| {
            let zeros_from = if end < known.zeros_from {
                // Within the data: the zeros after it are untouched.
                known.zeros_from
            } else if all_zeros(data) {
                // Zeros written over the start of the zeros (or past it): still zeros.
                known.zeros_from.min(pos)
            } else {
                // The block's bytes after `end` came from the zeros, and are zeros.
                end
            };
            Known {
                zeros_from,
                tail,
                head,
            }
        });
        Ok(())
    }

    /// Reads through whole aligned blocks and returns the requested range, cut at the end of
    /// the file.
    async fn read_at(&self, pos: u64, len: usize) -> io::Result<Vec<u8>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        // glommio's unaligned `DmaFile::read_at` is not used: when the file ends inside the
        // requested range it returns bytes from past the end (it cuts the result at the
        // length read from the aligned start, not from `pos`).
        let start = self.align_down(pos);
        let end_aligned = self.align_up(pos + len as u64);
        let read = self
            .file
            .read_at_aligned(start, (end_aligned - start) as usize)
            .await?;
        let skip = (pos - start) as usize;
        let have = read.get(skip..).unwrap_or(&[]);
        Ok(have[..have.len().min(len)].to_vec())
    }

    async fn sync_data(&self) -> io::Result<()> {
        // Under O_DSYNC each write was durable when it completed; a truncation is not a
        // write, so one since the last flush still needs one.
        if self.write_through && !self.flush_owed.get() {
            return Ok(());
        }
        // Cleared before the flush: a truncation while it runs owes another.
        self.flush_owed.set(false);
        self.flushes.set(self.flushes.get() + 1);
        if let Err(e) = self.file.fdatasync().await {
            self.flush_owed.set(true);
            return Err(e.into());
        }
        Ok(())
    }

    async fn truncate(&self, len: u64) -> io::Result<()> {
        let _exclusive = Exclusive::enter(&self.busy);
        self.flush_owed.set(true);
        // The remembered tail block may lie past the new end, so it is dropped; once the
        // truncation succeeds the length is known exactly again.
        *self.known.borrow_mut() = None;
        self.dup()?.set_len(len)?;
        *self.known.borrow_mut() = Some(Known::ending_at(len));
        Ok(())
    }

    /// The physical length, which after a write includes the zero padding up to the next
    /// multiple of the device's block size. Asked of the open descriptor, as `map` is, so
    /// that it is right after a rename (glommio's own asks the path it opened).
    async fn len(&self) -> io::Result<u64> {
        Ok(self.dup()?.metadata()?.len())
    }

    /// Maps the file through its open descriptor, so the map is right even if the file was
    /// renamed since it was opened.
    fn map(&self) -> io::Result<Bytes> {
        map_file(&self.dup()?, false)
    }

    fn map_populated(&self) -> io::Result<Bytes> {
        map_file(&self.dup()?, true)
    }

    async fn close(self) -> io::Result<()> {
        Ok(self.file.close().await?)
    }
}

/// Maps all of `file` (nothing for an empty one, which mmap refuses), its pages read in
/// at once if `populate`.
pub(super) fn map_file(file: &File, populate: bool) -> io::Result<Bytes> {
    if file.metadata()?.len() == 0 {
        return Ok(Bytes::new());
    }
    let mut options = memmap2::MmapOptions::new();
    if populate {
        options.populate();
    }
    // SAFETY: a mapping is only sound while nothing changes the file under it. The log
    // maps only sealed segments, which are never written or truncated again while a map of
    // them lives (a truncation would make reads past the new end fault).
    let map = unsafe { options.map(file)? };
    Ok(Bytes::from_owner(map))
}

/// Whether every byte of `data` is zero. Preallocation writes hundreds of KiB of zeros at a
/// time: a bytewise `all` runs a byte a cycle (256 µs for 512 KiB, measured), an OR over each
/// 4 KiB, which the compiler vectorizes, 8.5 µs; a record stops it at its first 4 KiB.
pub(super) fn all_zeros(data: &[u8]) -> bool {
    data.chunks(4096)
        .all(|chunk| chunk.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use glommio::LocalExecutorBuilder;
    use std::future::Future;

    /// Runs `test` on a fresh glommio executor with an empty directory on the real disk
    /// (not tmpfs, where O_DIRECT is not used).
    fn run<F, Fut>(test: F)
    where
        F: FnOnce(DiskStorage) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        in_root(|root| async move {
            test(DiskStorage::open_dir(root.path().join("segments")).unwrap()).await
        });
    }

    /// Runs `test` on a glommio executor of its own, with a root under a new temporary
    /// directory.
    fn in_root<F, Fut>(test: F)
    where
        F: FnOnce(DiskRoot) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        let dir = tempfile::tempdir().unwrap();
        let root = DiskRoot::new(dir.path().join("data"));
        LocalExecutorBuilder::default()
            .spawn(move || test(root))
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn all_zeros_finds_a_single_non_zero_byte_anywhere() {
        assert!(all_zeros(&[]));
        let mut data = vec![0u8; 512 * 1024 + 17];
        assert!(all_zeros(&data));
        for at in [0, 4095, 4096, 300_000, data.len() - 1] {
            data[at] = 0x80;
            assert!(!all_zeros(&data), "the byte at {at}");
            data[at] = 0;
        }
    }

    // A write-through directory opens its files with O_DSYNC, and their sync_data flushes
    // only after a truncation (which O_DSYNC does not cover); a plain directory's flushes
    // every time. What the files hold is the same either way.
    #[test]
    fn write_through_files_flush_only_after_a_truncation() {
        in_root(|root| async move {
            let through = root.dir_write_through("journal").await.unwrap();
            let plain = root.dir("events").await.unwrap();
            for (storage, dsync) in [(through, true), (plain, false)] {
                let file = storage.create("00000000.log").await.unwrap();
                // SAFETY: F_GETFL only reads the descriptor's flags.
                let flags = unsafe { libc::fcntl(file.direct().file.as_raw_fd(), libc::F_GETFL) };
                assert_eq!(flags & libc::O_DSYNC != 0, dsync, "O_DSYNC");
                let data = pattern(7, 5000);
                file.write_at(0, &data).await.unwrap();
                file.sync_data().await.unwrap();
                file.write_at(5000, &data).await.unwrap();
                file.sync_data().await.unwrap();
                assert_eq!(file.direct().flushes.get(), if dsync { 0 } else { 2 });
                file.truncate(7000).await.unwrap();
                file.sync_data().await.unwrap();
                file.sync_data().await.unwrap();
                assert_eq!(file.direct().flushes.get(), if dsync { 1 } else { 4 });
                let mut expected = data.clone();
                expected.extend_from_slice(&data[..2000]);
                assert_eq!(file.read_at(0, 10_000).await.unwrap(), expected);
                file.close().await.unwrap();
                let again = storage.open("00000000.log").await.unwrap();
                assert_eq!(again.read_at(0, 10_000).await.unwrap(), expected);
            }
        });
    }

    // A cached directory's files are plain page-cache files: not O_DIRECT, exactly as long
    // as what was written (no block padding), read back at any position, cut by a
    // truncation, and the same when opened again.
    #[test]
    fn cached_files_hold_exactly_what_was_written() {
        in_root(|root| async move {
            let storage = root.dir_cached("events").await.unwrap();
            let file = storage.create("00000000.log").await.unwrap();
            let Backing::Cached(cached) = &file.0 else {
                panic!("an O_DIRECT file in a cached directory");
            };
            // SAFETY: F_GETFL only reads the descriptor's flags.
            let flags = unsafe { libc::fcntl(cached.raw_fd(), libc::F_GETFL) };
            assert_eq!(flags & libc::O_DIRECT, 0, "O_DIRECT");
            let data = pattern(3, 5000);
            file.write_at(0, &data).await.unwrap();
            file.write_at(4999, &data[..700]).await.unwrap();
            file.sync_data().await.unwrap();
            let mut expected = data[..4999].to_vec();
            expected.extend_from_slice(&data[..700]);
            assert_eq!(file.len().await.unwrap(), expected.len() as u64);
            assert_eq!(file.read_at(0, 10_000).await.unwrap(), expected);
            assert_eq!(file.read_at(4000, 100).await.unwrap(), expected[4000..4100]);
            assert!(file.read_at(6000, 10).await.unwrap().is_empty());
            file.truncate(3000).await.unwrap();
            assert_eq!(file.len().await.unwrap(), 3000);
            assert_eq!(file.map().unwrap().as_ref(), &expected[..3000]);
            file.close().await.unwrap();
            let again = storage.open("00000000.log").await.unwrap();
            assert_eq!(again.read_at(0, 10_000).await.unwrap(), expected[..3000]);
            assert!(
                storage.create("00000000.log").await.is_err(),
                "created twice"
            );

            // Writeback is asked for once per `WRITE_BEHIND_BYTES` of records, never for
            // zeros written ahead.
            let file = storage.create("00000001.log").await.unwrap();
            let Backing::Cached(cached) = &file.0 else {
                panic!("an O_DIRECT file in a cached directory");
            };
            file.write_at(0, &vec![0u8; 1 << 20]).await.unwrap();
            assert_eq!(cached.started.get(), 0, "zeros ahead started");
            let record = pattern(9, 3000);
            let mut at = 0;
            while at < 600 * 1024 {
                file.write_at(at, &record).await.unwrap();
                at += record.len() as u64;
            }
            assert_eq!(cached.started.get(), 2);
            file.sync_data().await.unwrap();
            assert_eq!(file.read_at(at - 3000, 3000).await.unwrap(), record);
        });
    }

    /// Bytes that differ at every position, so a misplaced or lost byte shows.
    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
            .collect()
    }

    // Odd-sized appends at unaligned positions read back exactly, through read_at and map.
    #[test]
    fn unaligned_appends_read_back() {
        run(|storage| async move {
            let file = storage.create("00000000.log").await.unwrap();
            let mut expected = Vec::new();
            for (i, len) in [1, 37, 600, 5000, 3, 4096, 511].into_iter().enumerate() {
                let data = pattern(i as u8, len);
                file.write_at(expected.len() as u64, &data).await.unwrap();
                expected.extend_from_slice(&data);
                let physical = file.len().await.unwrap();
                assert_eq!(physical, file.direct().align_up(expected.len() as u64));
            }
            file.sync_data().await.unwrap();
            let read = file.read_at(0, expected.len()).await.unwrap();
            assert_eq!(read, expected);
            let read = file.read_at(38, 600).await.unwrap();
            assert_eq!(read, expected[38..638]);

            file.truncate(expected.len() as u64).await.unwrap();
            assert_eq!(file.len().await.unwrap(), expected.len() as u64);
            assert_eq!(&file.map().unwrap()[..], &expected[..]);
            file.close().await.unwrap();

            let file = storage.open("00000000.log").await.unwrap();
            assert_eq!(file.read_at(0, expected.len()).await.unwrap(), expected);
            assert_eq!(&file.map().unwrap()[..], &expected[..]);
        });
    }

    // A read that runs past the end returns exactly the bytes up to the end, and none past.
    #[test]
    fn read_past_end_is_cut_at_end() {
        run(|storage| async move {
            let file = storage.create("a").await.unwrap();
            let data = pattern(7, 700);
            file.write_at(0, &data).await.unwrap();
            file.truncate(700).await.unwrap();
            assert_eq!(file.read_at(100, 1000).await.unwrap(), data[100..]);
            assert_eq!(file.read_at(690, 4096).await.unwrap(), data[690..]);
            assert!(file.read_at(700, 10).await.unwrap().is_empty());
            assert!(file.read_at(5000, 10).await.unwrap().is_empty());
            // Before the truncation the zero padding is part of the file and reads as such.
            file.write_at(700, &[9]).await.unwrap();
            let padded = file.read_at(0, 10_000).await.unwrap();
            assert_eq!(padded.len() as u64, file.direct().align_up(701));
            assert!(padded[701..].iter().all(|&b| b == 0));
        });
    }

    // Writing after a truncation to an unaligned length keeps the bytes before it, including
    // those in the same block that the handle must read back from disk.
    #[test]
    fn write_after_unaligned_truncate_keeps_prefix() {
        run(|storage| async move {
            let file = storage.create("a").await.unwrap();
            let data = pattern(1, 3000);
            file.write_at(0, &data).await.unwrap();
            file.truncate(1234).await.unwrap();
            let more = pattern(2, 100);
            file.write_at(1234, &more).await.unwrap();
            let mut expected = data[..1234].to_vec();
            expected.extend_from_slice(&more);
            assert_eq!(file.read_at(0, 5000).await.unwrap()[..1334], expected[..]);

            // A freshly opened handle knows no tail block and must read it back too.
            file.close().await.unwrap();
            let file = storage.open("a").await.unwrap();
            let last = pattern(3, 10);
            file.write_at(1334, &last).await.unwrap();
            expected.extend_from_slice(&last);
            file.truncate(expected.len() as u64).await.unwrap();
            assert_eq!(&file.map().unwrap()[..], &expected[..]);
        });
    }

    // Overwriting a range inside existing data keeps the bytes on both sides of it.
    #[test]
    fn overwrite_inside_keeps_both_sides() {
        run(|storage| async move {
            let file = storage.create("a").await.unwrap();
            let mut expected = pattern(4, 9000);
            file.write_at(0, &expected).await.unwrap();
            for (pos, len) in [(0, 64), (100, 10), (500, 5000), (8999, 1)] {
                let patch = pattern(pos as u8, len);
                file.write_at(pos as u64, &patch).await.unwrap();
                expected[pos..pos + len].copy_from_slice(&patch);
            }
            assert_eq!(file.read_at(0, 9000).await.unwrap(), expected);
        });
    }

    // Appends into zeros written ahead (the log's preallocation) read nothing back from
    // the device, and every byte reads back right; zeros written inside the data, and a
    // fresh handle, change nothing of what is kept.
    #[test]
    fn appends_into_preallocated_zeros_read_nothing_back() {
        run(|storage| async move {
            let file = storage.create("a").await.unwrap();
            let mut expected = pattern(1, 1000);
            file.write_at(0, &expected).await.unwrap();
            file.write_at(1000, &vec![0; 64 * 1024 - 1000])
                .await
                .unwrap();
            for (i, len) in [700, 333, 1, 4096, 5000].into_iter().enumerate() {
                let data = pattern(i as u8 + 2, len);
                file.write_at(expected.len() as u64, &data).await.unwrap();
                expected.extend_from_slice(&data);
            }
            assert_eq!(file.direct().reads_back.get(), 0);
            let read = file.read_at(0, 64 * 1024).await.unwrap();
            assert_eq!(read[..expected.len()], expected[..]);
            assert!(read[expected.len()..].iter().all(|&b| b == 0));

            // Zeros inside the data: the bytes after them are data still, and are kept.
            file.write_at(100, &[0; 50]).await.unwrap();
            expected[100..150].fill(0);
            let patch = pattern(9, 20);
            file.write_at(140, &patch).await.unwrap();
            expected[140..160].copy_from_slice(&patch);
            let read = file.read_at(0, expected.len()).await.unwrap();
            assert_eq!(read, expected);

            // A fresh handle knows only the file's length, and reads its blocks back.
            file.close().await.unwrap();
            let file = storage.open("a").await.unwrap();
            let last = pattern(11, 10);
            file.write_at(expected.len() as u64, &last).await.unwrap();
            expected.extend_from_slice(&last);
            assert!(file.direct().reads_back.get() >= 1);
            let read = file.read_at(0, 64 * 1024).await.unwrap();
            assert_eq!(read[..expected.len()], expected[..]);
            assert!(read[expected.len()..].iter().all(|&b| b == 0));
        });
    }

    // Writing past the end leaves a hole of zeros, like a sparse pwrite.
    #[test]
    fn write_past_end_leaves_zeros() {
        run(|storage| async move {
            let file = storage.create("a").await.unwrap();
            file.write_at(0, &[1, 2, 3]).await.unwrap();
            file.write_at(6000, &[4]).await.unwrap();
            let read = file.read_at(0, 6001).await.unwrap();
            assert_eq!(read[..3], [1, 2, 3]);
            assert!(read[3..6000].iter().all(|&b| b == 0));
            assert_eq!(read[6000], 4);
        });
    }

    // An empty file maps to empty bytes rather than failing.
    #[test]
    fn empty_file_maps_empty() {
        run(|storage| async move {
            let file = storage.create("a").await.unwrap();
            assert!(file.map().unwrap().is_empty());
            assert_eq!(file.len().await.unwrap(), 0);
            assert!(file.read_at(0, 100).await.unwrap().is_empty());
        });
    }

    // Creating a name that exists fails with AlreadyExists and leaves the file alone.
    #[test]
    fn create_existing_fails() {
        run(|storage| async move {
            let file = storage.create("a").await.unwrap();
            file.write_at(0, b"keep").await.unwrap();
            let err = storage.create("a").await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
            assert_eq!(file.read_at(0, 4).await.unwrap(), b"keep");
            let err = storage.open("missing").await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::NotFound);
        });
    }

    // list shows only regular files, and remove and rename change it as expected.
    #[test]
    fn list_remove_rename() {
        run(|storage| async move {
            std::fs::create_dir(storage.path().join("subdir")).unwrap();
            for name in ["a", "b", "c"] {
                storage.create(name).await.unwrap().close().await.unwrap();
            }
            storage.sync_dir().await.unwrap();
            let sorted = |mut names: Vec<String>| {
                names.sort();
                names
            };
            assert_eq!(sorted(storage.list().await.unwrap()), ["a", "b", "c"]);

            storage.remove("b").await.unwrap();
            storage.rename("a", "c").await.unwrap();
            storage.rename("c", "d").await.unwrap();
            storage.sync_dir().await.unwrap();
            assert_eq!(sorted(storage.list().await.unwrap()), ["d"]);
            let err = storage.remove("b").await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::NotFound);
        });
    }

    // A map and a length taken through the descriptor follow the file across a rename (a
    // log's spare segment is renamed before it is used).
    #[test]
    fn map_and_len_follow_rename() {
        run(|storage| async move {
            let file = storage.create("a.tmp").await.unwrap();
            file.write_at(0, b"sealed").await.unwrap();
            file.truncate(6).await.unwrap();
            storage.rename("a.tmp", "a").await.unwrap();
            assert_eq!(&file.map().unwrap()[..], b"sealed");
            assert_eq!(file.len().await.unwrap(), 6);
        });
    }

    // A root opens nested directories, creating them, and refuses paths that would leave
    // it; a populated map reads the same bytes as a plain one.
    #[test]
    fn root_opens_nested_directories() {
        in_root(|root| async move {
            let blobs = root.dir("blobs/ab").await.unwrap();
            let file = blobs.create("x").await.unwrap();
            file.write_at(0, b"blob").await.unwrap();
            file.truncate(4).await.unwrap();
            assert_eq!(&file.map_populated().unwrap()[..], b"blob");
            assert_eq!(
                root.dir("").await.unwrap().list().await.unwrap(),
                Vec::<String>::new()
            );
            for bad in ["../x", "a//b", "/abs", "a/./b"] {
                assert!(root.dir(bad).await.is_err(), "{bad}");
            }
            assert!(root.path().join("blobs").join("ab").join("x").is_file());
        });
    }

    // Overlapping writes to one file are a caller bug, caught instead of corrupting a block.
    #[test]
    fn overlapping_writes_panic() {
        let result = std::panic::catch_unwind(|| {
            run(|storage| async move {
                let file = storage.create("a").await.unwrap();
                let first = pattern(1, 100_000);
                let (a, b) = futures::join!(file.write_at(0, &first), file.write_at(5, b"x"));
                a.unwrap();
                b.unwrap();
            })
        });
        assert!(result.is_err());
    }

    // Data written to a file that was the thread's first open reads back: glommio's iopoll
    // probe was answered by a real read, not by the new empty file.
    #[test]
    fn first_open_on_a_thread_reads_back() {
        run(|storage| async move {
            let file = storage.create("first").await.unwrap();
            file.write_at(0, &pattern(5, 4096)).await.unwrap();
            assert_eq!(file.read_at(0, 4096).await.unwrap(), pattern(5, 4096));
        });
    }

    // A probe file left behind by a crash is neither listed nor in the way of the next probe.
    #[test]
    fn leftover_probe_file_is_not_listed() {
        run(|storage| async move {
            std::fs::write(storage.path().join(IOPOLL_PROBE_NAME), b"left").unwrap();
            assert!(storage.list().await.unwrap().is_empty());
            storage.create("a").await.unwrap();
            assert_eq!(storage.list().await.unwrap(), ["a"]);
            assert!(!storage.path().join(IOPOLL_PROBE_NAME).exists());
        });
    }

    // Names that could reach outside the directory are refused.
    #[test]
    #[should_panic(expected = "plain file names")]
    fn path_names_panic() {
        let dir = tempfile::tempdir().unwrap();
        let storage = DiskStorage::open_dir(dir.path()).unwrap();
        storage.file_path("../escape");
    }
}
