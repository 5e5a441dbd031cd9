//! The file store on the local disk: uploaded files' bytes, content-addressed by SHA-256.
//!
//! Layout (file store version 1), under `<data>/files/`: `tmp/` holds uploads in progress
//! (emptied at open); `ab/cdef…` holds the bytes whose SHA-256 in lowercase hex is
//! `abcdef…`, the first byte naming one of 256 fan-out directories made at open. A file
//! holds the raw bytes and nothing else. The same bytes uploaded twice are stored once.
//!
//! This is a namespace apart from the engine's blob store (`blobs/`, BLAKE3, message
//! bodies): message bodies are never deleted, while a file's bytes are reclaimed once no
//! live file has them, and keeping the two apart means a deletion never has to ask the
//! channel partitions whether a message body happens to share the bytes.
//!
//! Every method here blocks; callers run them on glommio's blocking pool, so that a large
//! upload's writes and fsyncs never stall the shard's other connections.
//!
//! The bytes live on the local disk (the default) or in an S3 bucket (`blob_store =
//! "s3://bucket"`, through `object_store`), under the same names (`ab/cdef…`). Uploads are
//! spooled to `tmp/` on the local disk either way, hashed as they arrive, and only then
//! published: renamed into place, or sent to the bucket as a multipart upload in 8 MiB
//! parts (skipped when the bucket has the object already) and the local copy removed.
//! `object_store` needs tokio, so the S3 backend keeps a small tokio runtime of its own and
//! its blocking methods wait on it; no shard ever runs tokio.
//!
//! Architecture invariant: bytes are durable before their metadata. An upload is written
//! to `tmp/`, fsynced, renamed to its address and the fan-out directory fsynced, and only
//! then is its record committed to the metadata log.
//!
//! Architecture invariant: bytes a live file has are never removed. Removal is decided
//! under the store's pin table ([`Pins`]): an upload pins its SHA-256 from before it
//! publishes the bytes until its record is on every shard, and a removal marks the SHA-256
//! before it checks that no live file has it, so the two cannot interleave.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The store's directory under the data directory.
pub const FILES_DIR: &str = "files";
/// Uploads in progress, under the store's directory.
pub const TMP_DIR: &str = "tmp";
const FANOUT_DIRS: usize = 256;

/// A SHA-256.
pub type Sha256 = [u8; 32];

/// Bytes of one part of a multipart upload to S3.
const S3_PART_BYTES: usize = 8 << 20;
/// Parts of one upload in flight at once.
const S3_PARTS_IN_FLIGHT: usize = 2;

/// Where the bytes live.
pub enum Backend {
    /// Files under the store's directory.
    Disk,
    /// Objects in a bucket.
    S3(Arc<S3>),
}

/// An S3 bucket, and the tokio runtime its client runs on.
pub struct S3 {
    runtime: tokio::runtime::Runtime,
    bucket: Arc<dyn object_store::ObjectStore>,
}

/// How to reach an S3 bucket.
#[derive(Clone, Debug)]
pub struct S3Config {
    /// The bucket.
    pub bucket: String,
    /// The endpoint URL (`None`: AWS's).
    pub endpoint: Option<String>,
    /// The region.
    pub region: String,
    /// The access key ID.
    pub access_key_id: Option<String>,
    /// The secret access key.
    pub secret_access_key: Option<String>,
    /// Whether plain HTTP is allowed (a local S3 such as moto).
    pub allow_http: bool,
}

impl S3 {
    /// A client of the bucket, with a one-thread tokio runtime for it.
    pub fn connect(config: &S3Config) -> io::Result<S3> {
        let mut builder = object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(&config.bucket)
            .with_region(&config.region)
            .with_allow_http(config.allow_http);
        if let Some(endpoint) = &config.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let Some(key) = &config.access_key_id {
            builder = builder.with_access_key_id(key);
        }
        if let Some(secret) = &config.secret_access_key {
            builder = builder.with_secret_access_key(secret);
        }
        let bucket = builder.build().map_err(object_error)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("chorus-s3")
            .enable_all()
            .build()?;
        Ok(S3 {
            runtime,
            bucket: Arc::new(bucket),
        })
    }

    fn key(sha: &Sha256) -> object_store::path::Path {
        let hex = hex(sha);
        object_store::path::Path::from(format!("{}/{}", &hex[..2], &hex[2..]))
    }

    /// Sends a finished upload to the bucket unless the bucket has it already.
    fn publish(&self, tmp: &Path, sha: &Sha256, len: u64) -> io::Result<()> {
        use std::io::Read;
        let key = S3::key(sha);
        self.runtime.block_on(async {
            match self.bucket.head(&key).await {
                Ok(meta) if meta.size == len => return Ok(()),
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(object_error(e)),
            }
            let upload = self
                .bucket
                .put_multipart(&key)
                .await
                .map_err(object_error)?;
            let mut writer =
                object_store::WriteMultipart::new_with_chunk_size(upload, S3_PART_BYTES);
            let mut file = File::open(tmp)?;
            let mut buf = vec![0u8; S3_PART_BYTES];
            loop {
                let n = file.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                writer
                    .wait_for_capacity(S3_PARTS_IN_FLIGHT)
                    .await
                    .map_err(object_error)?;
                writer.write(&buf[..n]);
            }
            writer.finish().await.map_err(object_error)?;
            Ok(())
        })
    }

    fn size(&self, sha: &Sha256) -> io::Result<u64> {
        let key = S3::key(sha);
        self.runtime
            .block_on(self.bucket.head(&key))
            .map(|m| m.size)
            .map_err(object_error)
    }

    fn read_at(&self, sha: &Sha256, at: u64, n: usize) -> io::Result<Vec<u8>> {
        let key = S3::key(sha);
        let bytes = self
            .runtime
            .block_on(self.bucket.get_range(&key, at..at + n as u64))
            .map_err(object_error)?;
        if bytes.len() != n {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the object is shorter than its record",
            ));
        }
        Ok(bytes.to_vec())
    }

    fn remove(&self, sha: &Sha256) -> io::Result<()> {
        let key = S3::key(sha);
        match self.runtime.block_on(self.bucket.delete(&key)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(object_error(e)),
        }
    }
}

/// The engine's blob store (message bodies over 64 KiB, and their frames) in the same
/// bucket, under `blobs/ab/cdef…` by BLAKE3 as on the disk. Blocking calls go to glommio's
/// blocking pool, and from there to the bucket's runtime.
#[derive(Clone)]
pub struct S3BlobStore(pub Arc<S3>);

impl S3BlobStore {
    fn key(blob: &chorus_engine::blob::BlobRef) -> object_store::path::Path {
        let hex = blob.to_hex();
        object_store::path::Path::from(format!("blobs/{}/{}", &hex[..2], &hex[2..]))
    }
}

impl chorus_engine::blob::BlobStore for S3BlobStore {
    async fn put(&self, bytes: bytes::Bytes) -> io::Result<chorus_engine::blob::BlobRef> {
        let s3 = self.0.clone();
        glommio::executor()
            .spawn_blocking(move || {
                let blob = chorus_engine::blob::BlobRef::of(&bytes);
                let key = S3BlobStore::key(&blob);
                s3.runtime.block_on(async {
                    match s3.bucket.head(&key).await {
                        Ok(meta) if meta.size == blob.len => return Ok(blob),
                        Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                        Err(e) => return Err(object_error(e)),
                    }
                    s3.bucket
                        .put(&key, bytes.into())
                        .await
                        .map_err(object_error)?;
                    Ok(blob)
                })
            })
            .await
    }

    async fn get(
        &self,
        blob: chorus_engine::blob::BlobRef,
    ) -> Result<bytes::Bytes, chorus_engine::blob::BlobError> {
        let this = self.clone();
        glommio::executor()
            .spawn_blocking(move || this.get_blocking(&blob))
            .await
    }
}

impl S3BlobStore {
    /// Reads a blob and checks it against its reference, blocking: for glommio's blocking
    /// pool, and for threads of their own such as the search indexer.
    pub fn get_blocking(
        &self,
        blob: &chorus_engine::blob::BlobRef,
    ) -> Result<bytes::Bytes, chorus_engine::blob::BlobError> {
        use chorus_engine::blob::{BlobError, Corruption};
        let blob = *blob;
        let key = S3BlobStore::key(&blob);
        let s3 = &self.0;
        let got = s3
            .runtime
            .block_on(async { s3.bucket.get(&key).await?.bytes().await });
        let bytes = match got {
            Ok(b) => b,
            Err(object_store::Error::NotFound { .. }) => return Err(BlobError::NotFound(blob)),
            Err(e) => return Err(BlobError::Io(object_error(e))),
        };
        let actual = chorus_engine::blob::BlobRef::of(&bytes);
        if actual.len != blob.len {
            let problem = Corruption::Length { actual: actual.len };
            return Err(BlobError::Corrupt { blob, problem });
        }
        if actual.hash != blob.hash {
            let problem = Corruption::Hash;
            return Err(BlobError::Corrupt { blob, problem });
        }
        Ok(bytes)
    }
}

fn object_error(e: object_store::Error) -> io::Error {
    match e {
        object_store::Error::NotFound { .. } => io::Error::new(io::ErrorKind::NotFound, e),
        other => io::Error::other(other),
    }
}

/// Opened bytes, to read ranges of.
pub enum Source {
    /// A local file.
    File(File),
    /// An object in the bucket.
    Object(Sha256),
}

/// The file store.
pub struct FileStore {
    root: PathBuf,
    tmp_counter: AtomicU64,
    backend: Backend,
    /// The pin table: which SHA-256s an upload or a removal holds.
    pub pins: Pins,
}

impl std::fmt::Debug for FileStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let backend = match self.backend {
            Backend::Disk => "disk",
            Backend::S3(_) => "s3",
        };
        f.debug_struct("FileStore")
            .field("root", &self.root)
            .field("backend", &backend)
            .finish()
    }
}

impl FileStore {
    /// Opens the store with its bytes on the local disk; see [`FileStore::open_with`].
    pub fn open(data_dir: &Path) -> io::Result<FileStore> {
        FileStore::open_with(data_dir, Backend::Disk)
    }

    /// Opens the store under `data_dir` (its uploads in progress, and its bytes when they
    /// are on the disk), creating it if needed, and removes uploads that a crash left
    /// unfinished. Blocking: call it before the shards serve.
    pub fn open_with(data_dir: &Path, backend: Backend) -> io::Result<FileStore> {
        let root = data_dir.join(FILES_DIR);
        fs::create_dir_all(&root)?;
        let mut created = false;
        for index in 0..FANOUT_DIRS {
            created |= create_dir_if_missing(&root.join(format!("{index:02x}")))?;
        }
        created |= create_dir_if_missing(&root.join(TMP_DIR))?;
        for entry in fs::read_dir(root.join(TMP_DIR))? {
            fs::remove_file(entry?.path())?;
        }
        if created {
            sync_dir(&root)?;
            sync_dir(data_dir)?;
        }
        Ok(FileStore {
            root,
            tmp_counter: AtomicU64::new(0),
            backend,
            pins: Pins::default(),
        })
    }

    /// Whether the bytes live in a bucket rather than on the local disk.
    pub fn is_remote(&self) -> bool {
        matches!(self.backend, Backend::S3(_))
    }

    /// Where the bytes with this SHA-256 live: `files/ab/cdef…`.
    pub fn path_of(&self, sha: &Sha256) -> PathBuf {
        let hex = hex(sha);
        let (fanout, name) = hex.split_at(2);
        self.root.join(fanout).join(name)
    }

    /// A new name in `tmp/`, for a file written elsewhere (a preview worker's output).
    /// The process ID makes names unique across processes too: a worker of a server that
    /// was killed may still be writing its output when the next server starts.
    pub fn tmp_path(&self) -> PathBuf {
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        self.root
            .join(TMP_DIR)
            .join(format!("{}.{n}", std::process::id()))
    }

    /// Starts an upload: a new temporary file (see [`PendingBytes`] for how it is
    /// written).
    pub fn begin(&self) -> io::Result<Pending> {
        let path = self.tmp_path();
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok(Pending {
            bytes: PendingBytes {
                path: Some(path),
                file,
                len: 0,
            },
            hash: PendingHash {
                sha: ring::digest::Context::new(&ring::digest::SHA256),
                len: 0,
            },
        })
    }

    /// Moves a finished upload to its address and makes the name durable. When the same
    /// bytes are stored already, the upload is dropped and the stored copy made durable
    /// (another upload may have renamed it into place a moment ago) and marked as just
    /// stored, so that a sweep leaves it alone ([`FileStore::stored_before`]).
    pub fn publish(&self, mut done: Finished) -> io::Result<()> {
        if let Backend::S3(s3) = &self.backend {
            let sent = s3.publish(
                done.path
                    .as_deref()
                    .expect("an unpublished upload has its file"),
                &done.sha,
                done.len,
            );
            // Dropping `done` removes the local copy, sent or not.
            drop(done);
            return sent;
        }
        let path = self.path_of(&done.sha);
        let tmp = done
            .path
            .take()
            .expect("an unpublished upload has its file");
        match fs::metadata(&path) {
            Ok(meta) if meta.len() == done.len => {
                fs::remove_file(&tmp)?;
                let stored = OpenOptions::new().write(true).open(&path)?;
                stored.set_modified(std::time::SystemTime::now())?;
                stored.sync_all()?;
            }
            // A file of the wrong length is damage: the rename replaces it.
            Ok(_) => fs::rename(&tmp, &path)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => fs::rename(&tmp, &path)?,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        }
        sync_dir(parent_of(&path))
    }

    /// Opens the bytes with this SHA-256 for reading, checking their length.
    pub fn open_bytes(&self, sha: &Sha256, len: u64) -> io::Result<Source> {
        let (source, actual) = match &self.backend {
            Backend::Disk => {
                let file = File::open(self.path_of(sha))?;
                let actual = file.metadata()?.len();
                (Source::File(file), actual)
            }
            Backend::S3(s3) => (Source::Object(*sha), s3.size(sha)?),
        };
        if actual != len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("stored file {} is {actual} bytes, not {len}", hex(sha)),
            ));
        }
        Ok(source)
    }

    /// Reads exactly `n` bytes at `at` of opened bytes.
    pub fn read_at(&self, source: &Source, at: u64, n: usize) -> io::Result<Vec<u8>> {
        match (source, &self.backend) {
            (Source::File(file), _) => {
                use std::os::unix::fs::FileExt;
                let mut buf = vec![0u8; n];
                file.read_exact_at(&mut buf, at)?;
                Ok(buf)
            }
            (Source::Object(sha), Backend::S3(s3)) => s3.read_at(sha, at, n),
            (Source::Object(_), Backend::Disk) => unreachable!("objects come from S3"),
        }
    }

    /// A local file with the bytes, for a preview worker: the stored file itself on the
    /// disk, or a copy from the bucket in `tmp/` (the caller removes it when `true`).
    pub fn local_copy(&self, sha: &Sha256, len: u64) -> io::Result<(PathBuf, bool)> {
        let Backend::S3(_) = &self.backend else {
            return Ok((self.path_of(sha), false));
        };
        let source = self.open_bytes(sha, len)?;
        let path = self.tmp_path();
        let copied = (|| {
            let mut out = File::create(&path)?;
            let mut at = 0;
            while at < len {
                let n = (len - at).min(S3_PART_BYTES as u64) as usize;
                out.write_all(&self.read_at(&source, at, n)?)?;
                at += n as u64;
            }
            Ok(())
        })();
        if let Err(e) = copied {
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        Ok((path, true))
    }

    /// The SHA-256 of every stored file on the local disk last stored before `before`
    /// (none on S3).
    pub fn stored_before(&self, before: std::time::SystemTime) -> io::Result<Vec<Sha256>> {
        let mut found = Vec::new();
        if self.is_remote() {
            return Ok(found);
        }
        for index in 0..FANOUT_DIRS {
            let fanout = format!("{index:02x}");
            for entry in fs::read_dir(self.root.join(&fanout))? {
                let entry = entry?;
                let name = entry.file_name();
                let Some(sha) = name
                    .to_str()
                    .and_then(|n| unhex_sha(&format!("{fanout}{n}")))
                else {
                    continue;
                };
                if entry.metadata()?.modified()? < before {
                    found.push(sha);
                }
            }
        }
        Ok(found)
    }

    /// Removes the bytes with this SHA-256 if they were last stored before `before`;
    /// whether they were removed. The caller holds the removal's pin, as for
    /// [`FileStore::remove`].
    pub fn remove_if_stored_before(
        &self,
        sha: &Sha256,
        before: std::time::SystemTime,
    ) -> io::Result<bool> {
        match fs::metadata(self.path_of(sha)) {
            Ok(meta) if meta.modified()? < before => self.remove(sha).map(|()| true),
            Ok(_) => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Removes the bytes with this SHA-256 and makes the removal durable. The caller holds
    /// the removal's pin and has checked that no live file has them.
    pub fn remove(&self, sha: &Sha256) -> io::Result<()> {
        if let Backend::S3(s3) = &self.backend {
            return s3.remove(sha);
        }
        let path = self.path_of(sha);
        match fs::remove_file(&path) {
            Ok(()) => sync_dir(parent_of(&path)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// An upload in progress: its temporary file and the SHA-256 of what was written so far.
/// Dropped unfinished, it removes its temporary file, so an upload refused or cut off
/// leaves nothing behind.
///
/// Writing a piece and hashing it are independent, so an upload can do both side by
/// side on two threads: [`Pending::split`] gives the two halves, [`Pending::join`] puts
/// them back together once each has taken the same bytes.
pub struct Pending {
    bytes: PendingBytes,
    hash: PendingHash,
}

/// The temporary file of an upload, and how many bytes it has taken. Dropped unfinished,
/// it removes the file.
///
/// Each piece is written through the page cache and its write-back started at once
/// (`sync_file_range`), so the disk works while the rest arrives and the fsync at the end
/// has little left; once the file is durable its pages are dropped from the cache
/// (`POSIX_FADV_DONTNEED`). An upload is written once and read rarely (its previews, a
/// later download), and on this project's virtual machines a page the guest has not used
/// lately costs more than the disk write itself: 40 files of 20 MiB written one after
/// another and kept ran at 223 MiB/s, the same files with their pages dropped after the
/// fsync at 391 MiB/s, as fast as files deleted right after (390), since each reuses the
/// pages the last one freed. `O_DIRECT` (from an aligned buffer, 2 MiB writes, which
/// this replaced) avoids the cache too, but ran at 231 MiB/s on the same disk in the same
/// minute: with no write-back to merge them, its writes reach the device one at a time.
pub struct PendingBytes {
    path: Option<PathBuf>,
    file: File,
    /// Bytes written.
    len: u64,
}

/// The SHA-256 of an upload's bytes so far, and how many there were.
pub struct PendingHash {
    sha: ring::digest::Context,
    len: u64,
}

impl Pending {
    /// Appends bytes: hashes them, writes them, and starts writing them to the disk.
    pub fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.hash.update(bytes);
        self.bytes.write_chunks(&[bytes])
    }

    /// The two halves, to be given the same bytes in the same order.
    pub fn split(self) -> (PendingBytes, PendingHash) {
        (self.bytes, self.hash)
    }

    /// The halves of [`Pending::split`] together again. They must have taken the same
    /// bytes: halves of different lengths are refused (and the file removed).
    pub fn join(bytes: PendingBytes, hash: PendingHash) -> io::Result<Pending> {
        if bytes.len != hash.len {
            return Err(io::Error::other(format!(
                "an upload's halves differ: {} bytes written, {} hashed",
                bytes.len, hash.len
            )));
        }
        Ok(Pending { bytes, hash })
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.bytes.len
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.bytes.len == 0
    }

    /// Fsyncs the bytes, drops their pages from the cache and computes their SHA-256.
    pub fn finish(self) -> io::Result<Finished> {
        let Pending { mut bytes, hash } = self;
        bytes.file.sync_all()?;
        drop_cached(&bytes.file);
        let digest = hash.sha.finish();
        let mut sha = [0u8; 32];
        sha.copy_from_slice(digest.as_ref());
        Ok(Finished {
            path: bytes.path.take(),
            sha,
            len: bytes.len,
        })
    }
}

impl PendingBytes {
    /// Writes each chunk in turn, then starts writing them to the disk without waiting
    /// (one write-back request for them all), so that the fsync at the end has little
    /// left to do: the disk works while the rest of the upload arrives.
    pub fn write_chunks(&mut self, chunks: &[impl AsRef<[u8]>]) -> io::Result<()> {
        let start = self.len;
        for chunk in chunks {
            self.file.write_all(chunk.as_ref())?;
            self.len += chunk.as_ref().len() as u64;
        }
        start_writeback(&self.file, start, self.len - start);
        Ok(())
    }
}

impl PendingHash {
    /// Hashes bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.sha.update(bytes);
        self.len += bytes.len() as u64;
    }

    /// Hashes each chunk in turn.
    pub fn update_chunks(&mut self, chunks: &[impl AsRef<[u8]>]) {
        for chunk in chunks {
            self.update(chunk.as_ref());
        }
    }
}

/// Asks the kernel to start writing a range of `file` to the disk, and returns at once
/// (`sync_file_range` with `SYNC_FILE_RANGE_WRITE`). Only a head start: durability still
/// comes from the fsync, so a failure here is ignored.
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is open for as long as `file` is borrowed; the call reads no
    // memory of ours.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// Drops `file`'s pages from the page cache (`posix_fadvise` with `POSIX_FADV_DONTNEED`;
/// clean pages only, so after the fsync all of them). Only advice: a failure is ignored.
fn drop_cached(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is open for as long as `file` is borrowed; no memory is passed.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
    }
}

impl Drop for PendingBytes {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            let _ = fs::remove_file(path);
        }
    }
}

/// An upload whose bytes are durable in `tmp/`, not yet at their address. Dropped
/// unpublished, it removes its temporary file.
pub struct Finished {
    path: Option<PathBuf>,
    /// The SHA-256 of the bytes.
    pub sha: Sha256,
    /// Their length.
    pub len: u64,
}

impl Drop for Finished {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            let _ = fs::remove_file(path);
        }
    }
}

/// Which SHA-256s uploads and removals hold, process-wide. An upload pins its SHA-256
/// while it publishes the bytes and commits the record; a removal marks its SHA-256 while
/// it checks and removes. An upload waits for a removal of the same bytes to finish (it
/// then stores them again), and a removal gives way to any upload of them.
#[derive(Debug, Default)]
pub struct Pins {
    table: Mutex<HashMap<Sha256, Pin>>,
}

#[derive(Debug, Default)]
struct Pin {
    uploads: u32,
    removing: bool,
}

impl Pins {
    /// Pins `sha` for an upload, unless a removal holds it (then `false`: try again).
    pub fn pin_upload(&self, sha: &Sha256) -> bool {
        let mut table = self.table.lock().expect("pins");
        let pin = table.entry(*sha).or_default();
        if pin.removing {
            return false;
        }
        pin.uploads += 1;
        true
    }

    /// Releases an upload's pin.
    pub fn unpin_upload(&self, sha: &Sha256) {
        let mut table = self.table.lock().expect("pins");
        if let Some(pin) = table.get_mut(sha) {
            pin.uploads -= 1;
            if pin.uploads == 0 && !pin.removing {
                table.remove(sha);
            }
        }
    }

    /// Marks `sha` for removal, unless an upload or another removal holds it.
    pub fn mark_removing(&self, sha: &Sha256) -> bool {
        let mut table = self.table.lock().expect("pins");
        if table.contains_key(sha) {
            return false;
        }
        table.insert(
            *sha,
            Pin {
                uploads: 0,
                removing: true,
            },
        );
        true
    }

    /// Ends a removal.
    pub fn unmark_removing(&self, sha: &Sha256) {
        self.table.lock().expect("pins").remove(sha);
    }
}

/// A SHA-256 in lowercase hex.
pub fn hex(sha: &Sha256) -> String {
    sha.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 whose lowercase hex is `s` (64 digits), as [`hex`] writes it.
pub fn unhex_sha(s: &str) -> Option<Sha256> {
    let digits = s.as_bytes();
    if digits.len() != 64 {
        return None;
    }
    let mut sha = [0u8; 32];
    for (i, pair) in digits.chunks(2).enumerate() {
        let pair = std::str::from_utf8(pair).ok()?;
        if !pair
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return None;
        }
        sha[i] = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(sha)
}

fn parent_of(path: &Path) -> &Path {
    path.parent()
        .expect("a stored file has a fan-out directory")
}

fn create_dir_if_missing(path: &Path) -> io::Result<bool> {
    match fs::create_dir(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

fn sync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    // A SHA-256 comes back from its hex; anything but 64 lowercase hex digits is refused.
    #[test]
    fn sha_hex_round_trips() {
        let sha: Sha256 = std::array::from_fn(|i| (i * 37 + 5) as u8);
        assert_eq!(unhex_sha(&hex(&sha)), Some(sha));
        let upper = hex(&sha).to_uppercase();
        for bad in [
            &hex(&sha)[1..],
            &upper,
            &format!("{}g", &hex(&sha)[1..]),
            "",
            "+f",
        ] {
            assert_eq!(unhex_sha(bad), None, "{bad}");
        }
    }

    // Bytes last stored before a time are listed and removed; storing them again marks
    // them as just stored, so they are neither listed nor removed any more.
    #[test]
    fn storing_again_keeps_bytes_from_a_sweep() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let put = |bytes: &[u8]| {
            let mut up = store.begin().unwrap();
            up.append(bytes).unwrap();
            let done = up.finish().unwrap();
            let sha = done.sha;
            store.publish(done).unwrap();
            sha
        };
        let (a, b) = (put(b"old bytes"), put(b"other bytes"));
        let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3_600);
        for sha in [a, b] {
            let f = OpenOptions::new()
                .write(true)
                .open(store.path_of(&sha))
                .unwrap();
            f.set_modified(hour_ago).unwrap();
        }
        let minute_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
        let mut listed = store.stored_before(minute_ago).unwrap();
        listed.sort();
        let mut both = vec![a, b];
        both.sort();
        assert_eq!(listed, both);
        assert_eq!(put(b"old bytes"), a);
        assert_eq!(store.stored_before(minute_ago).unwrap(), vec![b]);
        assert!(!store.remove_if_stored_before(&a, minute_ago).unwrap());
        assert!(store.path_of(&a).exists());
        assert!(store.remove_if_stored_before(&b, minute_ago).unwrap());
        assert!(!store.path_of(&b).exists());
        assert!(!store.remove_if_stored_before(&b, minute_ago).unwrap());
    }

    // An upload lands at the address of its SHA-256 with exactly its bytes, a second upload
    // of the same bytes is stored once, and nothing stays in tmp/.
    #[test]
    fn upload_publish_and_dedupe() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let mut up = store.begin().unwrap();
        up.append(b"hello ").unwrap();
        up.append(b"world").unwrap();
        let done = up.finish().unwrap();
        let sha = done.sha;
        assert_eq!(
            hex(&sha),
            "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9"
        );
        store.publish(done).unwrap();
        assert_eq!(fs::read(store.path_of(&sha)).unwrap(), b"hello world");
        let mut again = store.begin().unwrap();
        again.append(b"hello world").unwrap();
        store.publish(again.finish().unwrap()).unwrap();
        assert_eq!(
            fs::read_dir(dir.path().join("files/tmp")).unwrap().count(),
            0
        );
        assert!(store.open_bytes(&sha, 11).is_ok());
        assert!(store.open_bytes(&sha, 12).is_err());
        store.remove(&sha).unwrap();
        assert!(!store.path_of(&sha).exists());
    }

    // An upload's halves, written and hashed on two threads piece by piece, finish as the
    // same upload appended whole; halves that took different bytes are refused, and
    // nothing stays in tmp/.
    #[test]
    fn halves_on_two_threads_make_the_same_upload() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut whole = store.begin().unwrap();
        whole.append(&bytes).unwrap();
        let whole = whole.finish().unwrap();

        let mut pending = store.begin().unwrap();
        for piece in bytes.chunks(1 << 20) {
            let chunks: Vec<bytes::Bytes> = piece
                .chunks(70_000)
                .map(bytes::Bytes::copy_from_slice)
                .collect();
            let (mut file, mut hash) = pending.split();
            let to_hash = chunks.clone();
            let hashing = std::thread::spawn(move || {
                hash.update_chunks(&to_hash);
                hash
            });
            file.write_chunks(&chunks).unwrap();
            pending = Pending::join(file, hashing.join().unwrap()).unwrap();
        }
        assert_eq!(pending.len(), bytes.len() as u64);
        let split = pending.finish().unwrap();
        assert_eq!((split.sha, split.len), (whole.sha, whole.len));
        store.publish(split).unwrap();
        assert_eq!(fs::read(store.path_of(&whole.sha)).unwrap(), bytes);

        let (mut file, hash) = store.begin().unwrap().split();
        file.write_chunks(&[b"only written"]).unwrap();
        assert!(Pending::join(file, hash).is_err());
        drop(whole);
        assert_eq!(
            fs::read_dir(dir.path().join("files/tmp")).unwrap().count(),
            0
        );
    }

    // Uploads of every length around the server's piece come back byte for byte: none,
    // less than a piece, exactly one, one and a byte, and several with an unaligned tail,
    // fed in chunks that straddle the pieces' ends.
    #[test]
    fn uploads_of_every_length_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let b = super::super::UPLOAD_FLUSH_BYTES;
        for (n, len) in [0, 1, b - 1, b, b + 1, 3 * b + 4095]
            .into_iter()
            .enumerate()
        {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 31 + n) as u8).collect();
            let mut up = store.begin().unwrap();
            for chunk in bytes.chunks(300_007) {
                up.append(chunk).unwrap();
            }
            let done = up.finish().unwrap();
            assert_eq!(done.len, len as u64);
            let sha = done.sha;
            store.publish(done).unwrap();
            assert_eq!(fs::read(store.path_of(&sha)).unwrap(), bytes, "{len} bytes");
        }
    }

    // A finished upload's pages are no longer in the page cache: written, they are; once
    // durable, they are dropped (so the next upload reuses them). On a filesystem whose
    // pages are its storage (tmpfs) there is nothing to drop, and nothing to check.
    #[test]
    fn a_finished_upload_leaves_no_pages_cached() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        // SAFETY: statfs writes into the zeroed struct we pass, for a path we own.
        let mut fs_info: libc::statfs = unsafe { std::mem::zeroed() };
        let c_path = std::ffi::CString::new(dir.path().as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::statfs(c_path.as_ptr(), &mut fs_info) }, 0);
        if fs_info.f_type == libc::TMPFS_MAGIC {
            eprintln!("the test directory is on tmpfs: no page cache to drop");
            return;
        }
        let len = 8 << 20;
        let mut up = store.begin().unwrap();
        up.append(&vec![7u8; len]).unwrap();
        let path = up.bytes.path.clone().unwrap();
        let written = resident_pages(&path, len);
        let done = up.finish().unwrap();
        let durable = resident_pages(&path, len);
        let pages = len / 4096;
        assert!(
            written > pages / 2,
            "{written} of {pages} pages cached once written"
        );
        assert!(
            durable < pages / 20,
            "{durable} of {pages} pages still cached"
        );
        drop(done);
    }

    /// How many of the first `len` bytes' pages of the file at `path` are in memory.
    fn resident_pages(path: &Path, len: usize) -> usize {
        use std::os::fd::AsRawFd;
        let file = File::open(path).unwrap();
        let page = 4096;
        let mut flags = vec![0u8; len.div_ceil(page)];
        // SAFETY: a shared read-only mapping of `len` bytes of an open file of at least
        // that length, unmapped below; mincore writes one byte per page into `flags`,
        // which has room for every page of the mapping. Mapping faults nothing in.
        unsafe {
            let at = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            );
            assert_ne!(at, libc::MAP_FAILED);
            assert_eq!(libc::mincore(at, len, flags.as_mut_ptr()), 0);
            libc::munmap(at, len);
        }
        flags.iter().filter(|f| **f & 1 == 1).count()
    }

    // An upload dropped before it is published leaves nothing behind, and open clears what
    // a crash left in tmp/.
    #[test]
    fn abandoned_uploads_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let mut up = store.begin().unwrap();
        up.append(&[7; 1000]).unwrap();
        drop(up);
        let mut up = store.begin().unwrap();
        up.append(&[8; 1000]).unwrap();
        drop(up.finish().unwrap());
        assert_eq!(
            fs::read_dir(dir.path().join("files/tmp")).unwrap().count(),
            0
        );
        fs::write(dir.path().join("files/tmp/99"), b"half").unwrap();
        drop(store);
        FileStore::open(dir.path()).unwrap();
        assert_eq!(
            fs::read_dir(dir.path().join("files/tmp")).unwrap().count(),
            0
        );
    }

    // A removal cannot start while an upload holds the bytes, and an upload waits while a
    // removal does.
    #[test]
    fn pins_exclude_removal_and_upload() {
        let pins = Pins::default();
        let sha = [1u8; 32];
        assert!(pins.pin_upload(&sha));
        assert!(!pins.mark_removing(&sha));
        pins.unpin_upload(&sha);
        assert!(pins.mark_removing(&sha));
        assert!(!pins.pin_upload(&sha));
        assert!(!pins.mark_removing(&sha));
        pins.unmark_removing(&sha);
        assert!(pins.pin_upload(&sha));
    }
}
