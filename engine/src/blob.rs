//! The content-addressed blob store: message bodies over 64 KiB, and later files.
//!
//! This module owns a directory of immutable blobs, each named by the BLAKE3 hash of its
//! content, so a body stored twice is stored once and a [`BlobRef`] in the log names exactly
//! one byte string. BLAKE3 rather than the log's xxh3: xxh3 catches accidental corruption,
//! but a content address must also be collision resistant, or one user could craft a body
//! whose address collides with another's and have it served in its place.
//!
//! On-disk layout (version 1): `dir/tmp/` holds writes in progress; `dir/ab/cdef…` holds the
//! blob whose hash in lowercase hex is `abcdef…`, with the first byte as a fan-out
//! subdirectory so that no directory grows past a few thousand entries per million blobs.
//! The file holds the raw bytes and nothing else; its length and hash are checked on every
//! read.
//!
//! Architecture invariant: a [`BlobRef`] that [`BlobStore::put`] returned survives a crash.
//! The bytes are fsynced in a temporary file, renamed into place, and the directory that
//! gained the name is fsynced before `put` returns.
//!
//! [`BlobStore`] is the seam. [`DiskBlobStore`] is the real store: blocking `std::fs`, run
//! on glommio's blocking pool, so that a large body's writes and fsyncs never stall the
//! other partitions of its shard. [`StorageBlobStore`] keeps the same layout in any
//! [`StorageRoot`] (the simulation's disk), with one difference: a [`Storage`] renames only
//! within a directory, so a write in progress sits beside its final name as
//! `<name>.<n>.tmp` rather than in `tmp/`, and a crash may leave such a file behind.

use bytes::Bytes;
use chorus_log::{Storage, StorageFile, StorageRoot};
use std::cell::Cell;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The largest blob the store accepts, in bytes. `get` returns a blob in memory, so this is
/// also the most memory one read may take.
pub const BLOB_BYTES_MAX: u64 = 1 << 30;

/// The directory under the store's root that holds writes in progress. It is emptied on
/// open, so a crash mid-write leaves nothing behind for long.
const TMP_DIR: &str = "tmp";

/// The number of fan-out subdirectories: one per value of the hash's first byte.
const FANOUT_DIRS: usize = 256;

/// Makes temporary file names unique across the threads and stores of one process; the
/// process id makes them unique across processes.
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The address of a stored blob: the BLAKE3 hash of its bytes and their length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobRef {
    /// The BLAKE3 hash of the blob's bytes.
    pub hash: [u8; 32],
    /// The blob's length in bytes.
    pub len: u64,
}

impl BlobRef {
    /// The reference to `bytes`, whether or not they are stored.
    pub fn of(bytes: &[u8]) -> BlobRef {
        BlobRef {
            hash: *blake3::hash(bytes).as_bytes(),
            len: bytes.len() as u64,
        }
    }

    /// The hash in lowercase hex, 64 characters: the blob's name in the store. The length
    /// is not part of it; it travels beside the hash wherever a reference is stored.
    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.hash).to_hex().to_string()
    }

    /// The reference whose hash is the 64 hex digits `hex` (either case) and whose length
    /// is `len`.
    pub fn from_hex(hex: &str, len: u64) -> Result<BlobRef, ParseBlobRefError> {
        let hash = blake3::Hash::from_hex(hex).map_err(|_| ParseBlobRefError)?;
        Ok(BlobRef {
            hash: *hash.as_bytes(),
            len,
        })
    }
}

impl std::fmt::Display for BlobRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({} bytes)", self.to_hex(), self.len)
    }
}

/// [`BlobRef::from_hex`] was not given exactly 64 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a blob hash is 64 hex digits")]
pub struct ParseBlobRefError;

/// Why [`BlobStore::get`] returned no bytes.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// No blob with this hash is stored.
    #[error("blob {0} not found")]
    NotFound(BlobRef),
    /// A blob with this hash is stored, but its bytes do not match the reference.
    #[error("blob {blob} is corrupt: {problem}")]
    Corrupt {
        /// The reference that was asked for.
        blob: BlobRef,
        /// What did not match.
        problem: Corruption,
    },
    /// The file system failed.
    #[error("blob store I/O failed")]
    Io(#[from] io::Error),
}

/// How a stored blob failed verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Corruption {
    /// The file's length differs from the reference's.
    #[error("the file is {actual} bytes long")]
    Length {
        /// The length found on disk.
        actual: u64,
    },
    /// The length matches but the content hashes to something else.
    #[error("the content hash does not match")]
    Hash,
}

/// A content-addressed store of immutable blobs, as a shard uses it. Futures need not be
/// `Send`: a store handle belongs to one shard.
#[allow(async_fn_in_trait)]
pub trait BlobStore {
    /// Stores `bytes` durably and returns their reference. Storing the same bytes again
    /// returns the same reference without rewriting them. An error of kind
    /// `NotConnected` says the store cannot reach what durability needs now (a cluster's
    /// majority of nodes): the write that needed it is refused as unavailable, to be
    /// sent again.
    async fn put(&self, bytes: Bytes) -> io::Result<BlobRef>;

    /// Reads the blob `blob` names, checking its length and hash.
    async fn get(&self, blob: BlobRef) -> Result<Bytes, BlobError>;
}

/// The blob store on the local disk: a directory of files, read and written with blocking
/// `std::fs` on glommio's blocking pool. Clones share the directory, also across shards.
#[derive(Clone, Debug)]
pub struct DiskBlobStore {
    dir: Arc<BlobDir>,
}

impl DiskBlobStore {
    /// Opens the store at `dir`, creating it if needed, and removes writes that a crash
    /// left unfinished. Blocking: call it before the shards start.
    pub fn open(dir: &Path) -> io::Result<DiskBlobStore> {
        Ok(DiskBlobStore {
            dir: Arc::new(BlobDir::open(dir)?),
        })
    }

    /// The directory the store lives in.
    pub fn root(&self) -> &Path {
        &self.dir.root
    }
}

impl BlobStore for DiskBlobStore {
    async fn put(&self, bytes: Bytes) -> io::Result<BlobRef> {
        let dir = self.dir.clone();
        glommio::executor()
            .spawn_blocking(move || dir.put(&bytes))
            .await
    }

    async fn get(&self, blob: BlobRef) -> Result<Bytes, BlobError> {
        let dir = self.dir.clone();
        glommio::executor()
            .spawn_blocking(move || dir.get(&blob).map(Bytes::from))
            .await
    }
}

/// Reads and checks one blob of the disk store at `root` with blocking I/O, without
/// opening the store (which would clear writes in progress): for readers on threads of
/// their own, such as the search indexer, while the engine runs.
pub fn read_blob(root: &Path, blob: &BlobRef) -> Result<Vec<u8>, BlobError> {
    BlobDir {
        root: root.to_path_buf(),
    }
    .get(blob)
}

/// The blob store's directory on the local disk, with blocking methods. `&self` methods
/// are safe to call from many threads at once; one process owns a store directory at a
/// time.
#[derive(Debug)]
struct BlobDir {
    root: PathBuf,
}

impl BlobDir {
    /// Opens the store at `dir`, creating it if needed, and removes writes that a crash
    /// left unfinished.
    fn open(dir: &Path) -> io::Result<BlobDir> {
        fs::create_dir_all(dir)?;
        let store = BlobDir {
            root: dir.to_path_buf(),
        };
        // Creating every fan-out directory up front, and making the root's entries durable
        // once, means `put` never creates a directory. Otherwise two concurrent puts could
        // race on a new subdirectory, and the one that found it already there would return
        // before the other had made its entry in the root durable.
        let mut created = false;
        for index in 0..FANOUT_DIRS {
            created |= create_dir_if_missing(&store.root.join(format!("{index:02x}")))?;
        }
        created |= create_dir_if_missing(&store.tmp_dir())?;
        store.clear_tmp()?;
        if created {
            sync_dir(&store.root)?;
        }
        Ok(store)
    }

    /// Stores `bytes` durably and returns their reference. Storing the same bytes again
    /// returns the same reference without rewriting them. An error of kind
    /// `NotConnected` says the store cannot reach what durability needs now (a cluster's
    /// majority of nodes): the write that needed it is refused as unavailable, to be
    /// sent again.
    fn put(&self, bytes: &[u8]) -> io::Result<BlobRef> {
        check_size(bytes)?;
        let blob = BlobRef::of(bytes);
        let path = self.path_of(&blob);
        match fs::metadata(&path) {
            Ok(meta) if meta.len() == blob.len => {
                self.make_durable(&path)?;
                return Ok(blob);
            }
            // A file of the wrong length cannot be this content (renames are atomic, so it
            // is damage, not a write in progress): replace it below.
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        self.write_new(&path, bytes)?;
        Ok(blob)
    }

    /// Reads the blob `blob` names, checking its length and hash.
    fn get(&self, blob: &BlobRef) -> Result<Vec<u8>, BlobError> {
        let file = match File::open(self.path_of(blob)) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(BlobError::NotFound(*blob))
            }
            Err(e) => return Err(e.into()),
        };
        let actual = file.metadata()?.len();
        // `put` never stores more than the limit, so a longer file is damage, and reading
        // it would take unbounded memory.
        if actual != blob.len || actual > BLOB_BYTES_MAX {
            return Err(corrupt(blob, Corruption::Length { actual }));
        }
        // Read one byte past the expected length, so that a file that grew between the
        // length check and the read is caught too, and never more than that.
        let mut bytes = Vec::with_capacity(usize::try_from(blob.len).unwrap_or(0));
        file.take(blob.len + 1).read_to_end(&mut bytes)?;
        if bytes.len() as u64 != blob.len {
            let actual = bytes.len() as u64;
            return Err(corrupt(blob, Corruption::Length { actual }));
        }
        verify(blob, &bytes)?;
        Ok(bytes)
    }

    /// Whether a blob with this reference's hash is stored (without verifying it).
    #[cfg(test)]
    fn contains(&self, blob: &BlobRef) -> io::Result<bool> {
        self.path_of(blob).try_exists()
    }

    /// Where the blob `blob` names lives: `root/ab/cdef…`.
    fn path_of(&self, blob: &BlobRef) -> PathBuf {
        let hex = blob.to_hex();
        let (fanout, name) = hex.split_at(2);
        self.root.join(fanout).join(name)
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join(TMP_DIR)
    }

    /// Writes `bytes` to a temporary file, fsyncs it, renames it to `path` and fsyncs the
    /// directory that gained the name. A crash at any point leaves either no blob or the
    /// whole blob at `path`.
    fn write_new(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        let tmp = self.tmp_dir().join(format!(
            "{}.{}",
            std::process::id(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let result = write_synced(&tmp, bytes).and_then(|()| fs::rename(&tmp, path));
        if result.is_err() {
            // Best effort: `open` clears whatever is left anyway.
            let _ = fs::remove_file(&tmp);
        }
        result?;
        sync_dir(parent_of(path))
    }

    /// Makes an existing blob durable before `put` reports it: another thread may have
    /// renamed it into place a moment ago and not yet fsynced it or its directory.
    fn make_durable(&self, path: &Path) -> io::Result<()> {
        File::open(path)?.sync_all()?;
        sync_dir(parent_of(path))
    }

    fn clear_tmp(&self) -> io::Result<()> {
        for entry in fs::read_dir(self.tmp_dir())? {
            fs::remove_file(entry?.path())?;
        }
        Ok(())
    }
}

/// The blob store in a [`StorageRoot`], in the layout of the disk store: `blobs/ab/cdef…`.
/// Clones share their numbering of temporary files.
#[derive(Clone, Debug)]
pub struct StorageBlobStore<R> {
    root: R,
    tmp_counter: Rc<Cell<u64>>,
}

impl<R: StorageRoot> StorageBlobStore<R> {
    /// The store under `blobs/` of `root`.
    pub fn new(root: R) -> StorageBlobStore<R> {
        StorageBlobStore {
            root,
            tmp_counter: Rc::default(),
        }
    }

    async fn dir_of(&self, blob: &BlobRef) -> io::Result<(R::Dir, String)> {
        let hex = blob.to_hex();
        let (fanout, name) = hex.split_at(2);
        let dir = self.root.dir(&format!("blobs/{fanout}")).await?;
        Ok((dir, name.to_owned()))
    }
}

impl<R: StorageRoot> BlobStore for StorageBlobStore<R> {
    async fn put(&self, bytes: Bytes) -> io::Result<BlobRef> {
        check_size(&bytes)?;
        let blob = BlobRef::of(&bytes);
        let (dir, name) = self.dir_of(&blob).await?;
        match dir.open(&name).await {
            Ok(f) if f.len().await? == blob.len => {
                // Another put may have renamed it into place and not yet synced it.
                let synced = f.sync_data().await;
                f.close().await?;
                synced?;
                dir.sync_dir().await?;
                return Ok(blob);
            }
            // A file of the wrong length is damage: replace it.
            Ok(f) => f.close().await?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let n = self.tmp_counter.get();
        self.tmp_counter.set(n + 1);
        let tmp = format!("{name}.{n}.tmp");
        let f = dir.create(&tmp).await?;
        let written = async {
            f.write_at(0, &bytes).await?;
            f.truncate(blob.len).await?;
            f.sync_data().await
        }
        .await;
        let closed = f.close().await;
        if let Err(e) = written.and(closed) {
            let _ = dir.remove(&tmp).await;
            return Err(e);
        }
        dir.rename(&tmp, &name).await?;
        dir.sync_dir().await?;
        Ok(blob)
    }

    async fn get(&self, blob: BlobRef) -> Result<Bytes, BlobError> {
        let (dir, name) = self.dir_of(&blob).await?;
        let f = match dir.open(&name).await {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(BlobError::NotFound(blob)),
            Err(e) => return Err(e.into()),
        };
        let read = async {
            let actual = f.len().await?;
            if actual != blob.len || actual > BLOB_BYTES_MAX {
                return Err(corrupt(&blob, Corruption::Length { actual }));
            }
            Ok(f.read_at(0, blob.len as usize).await?)
        }
        .await;
        f.close().await?;
        let bytes = read?;
        if bytes.len() as u64 != blob.len {
            let actual = bytes.len() as u64;
            return Err(corrupt(&blob, Corruption::Length { actual }));
        }
        verify(&blob, &bytes)?;
        Ok(Bytes::from(bytes))
    }
}

/// Refuses a blob over [`BLOB_BYTES_MAX`].
fn check_size(bytes: &[u8]) -> io::Result<()> {
    if bytes.len() as u64 > BLOB_BYTES_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a blob of {} bytes exceeds {BLOB_BYTES_MAX}", bytes.len()),
        ));
    }
    Ok(())
}

/// Checks stored bytes against their reference's hash.
fn verify(blob: &BlobRef, bytes: &[u8]) -> Result<(), BlobError> {
    if *blake3::hash(bytes).as_bytes() != blob.hash {
        return Err(corrupt(blob, Corruption::Hash));
    }
    Ok(())
}

fn corrupt(blob: &BlobRef, problem: Corruption) -> BlobError {
    BlobError::Corrupt {
        blob: *blob,
        problem,
    }
}

fn parent_of(path: &Path) -> &Path {
    path.parent().expect("a blob path has a fan-out directory")
}

/// Creates `bytes` at the new file `path` and fsyncs them.
fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = OpenOptions::new().write(true).create_new(true).open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Creates the directory `path` unless it exists; returns whether it created it.
fn create_dir_if_missing(path: &Path) -> io::Result<bool> {
    match fs::create_dir(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// Fsyncs a directory, making the names created or renamed in it durable.
fn sync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom};

    /// A body just over the 64 KiB threshold that sends bodies here, with varied bytes.
    fn body(seed: u8) -> Vec<u8> {
        (0..64 * 1024 + 17)
            .map(|i: u32| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn put_then_get_round_trips() {
        // What put stores, get returns byte for byte, also after the store is reopened.
        let dir = tempfile::tempdir().unwrap();
        let store = BlobDir::open(dir.path()).unwrap();
        let bytes = body(1);
        let blob = store.put(&bytes).unwrap();
        assert_eq!(blob, BlobRef::of(&bytes));
        assert_eq!(blob.len, bytes.len() as u64);
        assert_eq!(store.get(&blob).unwrap(), bytes);
        assert_eq!(store.put(b"").unwrap(), BlobRef::of(b""));
        assert_eq!(store.get(&BlobRef::of(b"")).unwrap(), b"");
        drop(store);
        let store = BlobDir::open(dir.path()).unwrap();
        assert_eq!(store.get(&blob).unwrap(), bytes);
    }

    #[test]
    fn put_is_idempotent_and_does_not_rewrite() {
        // The same content gets the same reference, and the stored file is left untouched.
        let dir = tempfile::tempdir().unwrap();
        let store = BlobDir::open(dir.path()).unwrap();
        let first = store.put(&body(2)).unwrap();
        let path = store.path_of(&first);
        let inode_before = std::os::unix::fs::MetadataExt::ino(&fs::metadata(&path).unwrap());
        let second = store.put(&body(2)).unwrap();
        let inode_after = std::os::unix::fs::MetadataExt::ino(&fs::metadata(&path).unwrap());
        assert_eq!(first, second);
        assert_eq!(inode_before, inode_after, "the blob was rewritten");
        assert_ne!(store.put(&body(3)).unwrap(), first);
        assert_eq!(fs::read_dir(store.tmp_dir()).unwrap().count(), 0);
    }

    #[test]
    fn flipped_byte_is_corrupt() {
        // One flipped byte on disk is caught by the hash check, and a truncation by the
        // length check.
        let dir = tempfile::tempdir().unwrap();
        let store = BlobDir::open(dir.path()).unwrap();
        let blob = store.put(&body(4)).unwrap();
        let path = store.path_of(&blob);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut byte = [0u8; 1];
        file.seek(SeekFrom::Start(1000)).unwrap();
        file.read_exact(&mut byte).unwrap();
        file.seek(SeekFrom::Start(1000)).unwrap();
        file.write_all(&[byte[0] ^ 0x01]).unwrap();
        drop(file);
        assert!(matches!(
            store.get(&blob),
            Err(BlobError::Corrupt {
                problem: Corruption::Hash,
                ..
            })
        ));
        fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(10)
            .unwrap();
        assert!(matches!(
            store.get(&blob),
            Err(BlobError::Corrupt {
                problem: Corruption::Length { actual: 10 },
                ..
            })
        ));
        // A put of the same content repairs a blob whose length is wrong.
        store.put(&body(4)).unwrap();
        assert_eq!(store.get(&blob).unwrap(), body(4));
    }

    #[test]
    fn missing_blob_is_not_found() {
        // A reference to content never stored is NotFound, not an I/O error.
        let dir = tempfile::tempdir().unwrap();
        let store = BlobDir::open(dir.path()).unwrap();
        let blob = BlobRef::of(b"never stored");
        assert!(matches!(store.get(&blob), Err(BlobError::NotFound(b)) if b == blob));
        assert!(!store.contains(&blob).unwrap());
    }

    #[test]
    fn hex_round_trips_and_names_the_file() {
        // A reference survives its hex form, and its file sits under the first byte's dir.
        let dir = tempfile::tempdir().unwrap();
        let store = BlobDir::open(dir.path()).unwrap();
        let blob = store.put(b"hello").unwrap();
        let hex = blob.to_hex();
        assert_eq!(hex.len(), 64);
        assert_eq!(BlobRef::from_hex(&hex, blob.len), Ok(blob));
        assert_eq!(BlobRef::from_hex(&hex.to_uppercase(), blob.len), Ok(blob));
        assert_eq!(BlobRef::from_hex("abc", 5), Err(ParseBlobRefError));
        assert!(dir.path().join(&hex[..2]).join(&hex[2..]).is_file());
    }

    #[test]
    fn open_clears_unfinished_writes() {
        // A temporary file left by a crash mid-put is removed on the next open.
        let dir = tempfile::tempdir().unwrap();
        drop(BlobDir::open(dir.path()).unwrap());
        let leftover = dir.path().join(TMP_DIR).join("1234.0");
        fs::write(&leftover, b"half a blob").unwrap();
        let _store = BlobDir::open(dir.path()).unwrap();
        assert!(!leftover.exists());
    }

    // A blob in a storage root round trips, survives a crash once put returned, keeps the
    // disk layout, and is checked on every read.
    #[test]
    fn storage_store_round_trips_and_survives_a_crash() {
        use chorus_log::{SimConfig, SimRoot};
        use futures::executor::block_on;
        let root = SimRoot::new(SimConfig {
            seed: 3,
            yield_permille: 500,
        });
        let store = StorageBlobStore::new(root.clone());
        let bytes = Bytes::from(body(5));
        let blob = block_on(store.put(bytes.clone())).unwrap();
        assert_eq!(block_on(store.put(bytes.clone())).unwrap(), blob);
        root.crash();
        assert_eq!(block_on(store.get(blob)).unwrap(), bytes);
        let hex = blob.to_hex();
        let dir = root.dir_now(&format!("blobs/{}", &hex[..2]));
        assert_eq!(dir.contents(&hex[2..]).unwrap(), bytes);
        dir.flip_bit(&hex[2..], 7, 1);
        assert!(matches!(
            block_on(store.get(blob)),
            Err(BlobError::Corrupt {
                problem: Corruption::Hash,
                ..
            })
        ));
        let never = BlobRef::of(b"never stored");
        assert!(matches!(
            block_on(store.get(never)),
            Err(BlobError::NotFound(_))
        ));
    }
}
