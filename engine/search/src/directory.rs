//! The index's directory: tantivy's memory-mapped directory, except for the two files
//! tantivy replaces whole (`meta.json`, the commit point, and `.managed.json`, the list of
//! files it may delete), which are written in place into one of two slot files each.
//!
//! tantivy writes a replaced file as a new temporary file renamed over the old one: a new
//! inode each time. It does so for `.managed.json` at every file a segment opens (eight or
//! so per segment) and for `meta.json` at every commit. On ext4 without a journal, each
//! inode allocated walks past every inode freed in the last seconds (`recently_deleted`),
//! and an index that commits ten times a second frees thousands: creating files was most
//! of its indexing thread's time. A slot file is created once and then rewritten.
//!
//! **Atomicity.** A slot holds a header (magic, sequence number, payload length, a 64-bit
//! XXH3 of all three and the payload) and the payload. A write goes to the slot that does
//! not hold the newest sequence, and is synced before it returns; a read takes the valid
//! slot with the highest sequence. A write torn by a crash fails its checksum, so the read
//! finds the previous contents: each file is either the old one or the new one, as with a
//! rename. An index made before slots existed has the plain file; it is read while no slot
//! is valid, and removed after the first slot write.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tantivy::directory::error::{DeleteError, LockError, OpenReadError, OpenWriteError};
use tantivy::directory::{
    DirectoryLock, FileHandle, Lock, MmapDirectory, WatchCallback, WatchCallbackList, WatchHandle,
    WritePtr,
};
use tantivy::Directory;

/// The files kept in slots.
const SLOTTED: [&str; 2] = ["meta.json", ".managed.json"];
const MAGIC: &[u8; 8] = b"chslot01";
/// Magic, sequence (u64), length (u32), checksum (u64).
const HEADER: usize = 8 + 8 + 4 + 8;

/// See the module documentation.
#[derive(Clone)]
pub struct IndexDirectory {
    inner: MmapDirectory,
    root: PathBuf,
    /// One writer at a time per directory, and the list of `meta.json`'s watchers.
    shared: Arc<Shared>,
}

struct Shared {
    writing: Mutex<()>,
    watchers: WatchCallbackList,
}

impl std::fmt::Debug for IndexDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IndexDirectory")
            .field("root", &self.root)
            .finish()
    }
}

impl IndexDirectory {
    /// The directory at `root`, which must exist.
    pub fn open(
        root: &Path,
    ) -> Result<IndexDirectory, tantivy::directory::error::OpenDirectoryError> {
        Ok(IndexDirectory {
            inner: MmapDirectory::open(root)?,
            root: root.to_owned(),
            shared: Arc::new(Shared {
                writing: Mutex::new(()),
                watchers: WatchCallbackList::default(),
            }),
        })
    }

    /// The files at `root` that hold the commit point (`meta.json`): its slots and the plain
    /// file of an index made before slots, those that exist, valid or not. An index
    /// directory with none of them holds no index; one whose files are all damaged holds a
    /// damaged one.
    pub fn commit_point_files(root: &Path) -> Vec<PathBuf> {
        let name = SLOTTED[0];
        [
            slot_path(root, name, 0),
            slot_path(root, name, 1),
            root.join(name),
        ]
        .into_iter()
        .filter(|p| p.exists())
        .collect()
    }

    fn slotted(path: &Path) -> Option<&'static str> {
        SLOTTED.into_iter().find(|name| path == Path::new(name))
    }

    fn slot_path(&self, name: &str, slot: u64) -> PathBuf {
        slot_path(&self.root, name, slot)
    }

    /// The newest valid contents of `name`'s slots: `(sequence, payload)`.
    fn newest(&self, name: &str) -> io::Result<Option<(u64, Vec<u8>)>> {
        let mut newest: Option<(u64, Vec<u8>)> = None;
        for slot in 0..2 {
            let bytes = match std::fs::read(self.slot_path(name, slot)) {
                Ok(bytes) => bytes,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            if let Some((seq, payload)) = decode(&bytes) {
                if newest.as_ref().is_none_or(|(s, _)| seq > *s) {
                    newest = Some((seq, payload.to_vec()));
                }
            }
        }
        Ok(newest)
    }

    fn write_slot(&self, name: &str, data: &[u8]) -> io::Result<()> {
        let _writing = self
            .shared
            .writing
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let seq = self.newest(name)?.map_or(1, |(seq, _)| seq + 1);
        let path = self.slot_path(name, seq % 2);
        let created = !path.exists();
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let bytes = encode(seq, data);
        file.write_all(&bytes)?;
        file.set_len(bytes.len() as u64)?;
        file.sync_data()?;
        if created {
            sync_dir(&self.root)?;
        }
        // The plain file of an index made before slots: the slot now supersedes it.
        let plain = self.root.join(name);
        match std::fs::remove_file(&plain) {
            Ok(()) => sync_dir(&self.root)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(())
    }
}

fn slot_path(root: &Path, name: &str, slot: u64) -> PathBuf {
    root.join(format!(".{name}.slot{slot}"))
}

fn checksum(seq: u64, payload: &[u8]) -> u64 {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    hasher.update(MAGIC);
    hasher.update(&seq.to_le_bytes());
    hasher.update(&(payload.len() as u32).to_le_bytes());
    hasher.update(payload);
    hasher.digest()
}

fn encode(seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(HEADER + payload.len());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&seq.to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&checksum(seq, payload).to_le_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

/// A slot's sequence and payload, or `None` for one that is torn, short or not a slot.
fn decode(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let header = bytes.get(..HEADER)?;
    if &header[..8] != MAGIC {
        return None;
    }
    let seq = u64::from_le_bytes(header[8..16].try_into().ok()?);
    let len = u32::from_le_bytes(header[16..20].try_into().ok()?) as usize;
    let sum = u64::from_le_bytes(header[20..28].try_into().ok()?);
    let payload = bytes.get(HEADER..HEADER.checked_add(len)?)?;
    (checksum(seq, payload) == sum).then_some((seq, payload))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Directory for IndexDirectory {
    fn get_file_handle(&self, path: &Path) -> Result<Arc<dyn FileHandle>, OpenReadError> {
        self.inner.get_file_handle(path)
    }

    fn delete(&self, path: &Path) -> Result<(), DeleteError> {
        if let Some(name) = Self::slotted(path) {
            let _writing = self
                .shared
                .writing
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            for file in [
                self.slot_path(name, 0),
                self.slot_path(name, 1),
                self.root.join(name),
            ] {
                match std::fs::remove_file(&file) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(DeleteError::IoError {
                            io_error: Arc::new(e),
                            filepath: path.to_owned(),
                        })
                    }
                }
            }
            return Ok(());
        }
        self.inner.delete(path)
    }

    fn exists(&self, path: &Path) -> Result<bool, OpenReadError> {
        if let Some(name) = Self::slotted(path) {
            let newest = self
                .newest(name)
                .map_err(|e| OpenReadError::wrap_io_error(e, path.to_owned()))?;
            if newest.is_some() {
                return Ok(true);
            }
        }
        self.inner.exists(path)
    }

    fn open_write(&self, path: &Path) -> Result<WritePtr, OpenWriteError> {
        self.inner.open_write(path)
    }

    fn atomic_read(&self, path: &Path) -> Result<Vec<u8>, OpenReadError> {
        if let Some(name) = Self::slotted(path) {
            let newest = self
                .newest(name)
                .map_err(|e| OpenReadError::wrap_io_error(e, path.to_owned()))?;
            if let Some((_, payload)) = newest {
                return Ok(payload);
            }
            // No valid slot: the plain file of an index made before slots, if any.
            let mut plain = Vec::new();
            return match File::open(self.root.join(name)) {
                Ok(mut f) => f
                    .read_to_end(&mut plain)
                    .map(|_| plain)
                    .map_err(|e| OpenReadError::wrap_io_error(e, path.to_owned())),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    Err(OpenReadError::FileDoesNotExist(path.to_owned()))
                }
                Err(e) => Err(OpenReadError::wrap_io_error(e, path.to_owned())),
            };
        }
        self.inner.atomic_read(path)
    }

    fn atomic_write(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        let Some(name) = Self::slotted(path) else {
            return self.inner.atomic_write(path, data);
        };
        self.write_slot(name, data)?;
        if name == SLOTTED[0] {
            // Watchers run on a thread of tantivy's; nothing here waits for them.
            drop(self.shared.watchers.broadcast());
        }
        Ok(())
    }

    fn sync_directory(&self) -> io::Result<()> {
        self.inner.sync_directory()
    }

    fn acquire_lock(&self, lock: &Lock) -> Result<DirectoryLock, LockError> {
        self.inner.acquire_lock(lock)
    }

    fn watch(&self, watch_callback: WatchCallback) -> tantivy::Result<WatchHandle> {
        Ok(self.shared.watchers.subscribe(watch_callback))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_valid_slot_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let d = IndexDirectory::open(dir.path()).unwrap();
        let meta = Path::new("meta.json");
        assert!(!d.exists(meta).unwrap());
        assert!(matches!(
            d.atomic_read(meta),
            Err(OpenReadError::FileDoesNotExist(_))
        ));
        for n in 0..5u8 {
            d.atomic_write(meta, &[n; 3]).unwrap();
            assert_eq!(d.atomic_read(meta).unwrap(), vec![n; 3]);
        }
        assert!(d.exists(meta).unwrap());
        // Two files only, whatever the number of writes.
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    // A write torn anywhere leaves the contents before it.
    #[test]
    fn a_torn_write_reads_as_the_one_before() {
        let dir = tempfile::tempdir().unwrap();
        let d = IndexDirectory::open(dir.path()).unwrap();
        let managed = Path::new(".managed.json");
        d.atomic_write(managed, b"[\"old\"]").unwrap();
        d.atomic_write(managed, b"[\"older-than-new\"]").unwrap();
        d.atomic_write(managed, b"[\"new one\"]").unwrap();
        // Sequence 3 went to slot 1; slot 0 holds sequence 2, the one before it.
        let newest = d.slot_path(".managed.json", 1);
        let whole = std::fs::read(&newest).unwrap();
        for cut in 0..whole.len() {
            std::fs::write(&newest, &whole[..cut]).unwrap();
            assert_eq!(d.atomic_read(managed).unwrap(), b"[\"older-than-new\"]");
        }
        let mut flipped = whole.clone();
        *flipped.last_mut().unwrap() ^= 1;
        std::fs::write(&newest, &flipped).unwrap();
        assert_eq!(d.atomic_read(managed).unwrap(), b"[\"older-than-new\"]");
        std::fs::write(&newest, &whole).unwrap();
        assert_eq!(d.atomic_read(managed).unwrap(), b"[\"new one\"]");
    }

    // An index made before slots is read from its plain file until the first write, which
    // removes it.
    #[test]
    fn a_plain_file_is_read_until_the_first_slot_write() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("meta.json"), b"{plain}").unwrap();
        let d = IndexDirectory::open(dir.path()).unwrap();
        let meta = Path::new("meta.json");
        assert!(d.exists(meta).unwrap());
        assert_eq!(d.atomic_read(meta).unwrap(), b"{plain}");
        d.atomic_write(meta, b"{slot}").unwrap();
        assert_eq!(d.atomic_read(meta).unwrap(), b"{slot}");
        assert!(!dir.path().join("meta.json").exists());
    }

    #[test]
    fn other_files_are_tantivys_own() {
        let dir = tempfile::tempdir().unwrap();
        let d = IndexDirectory::open(dir.path()).unwrap();
        d.atomic_write(Path::new("other.json"), b"x").unwrap();
        assert_eq!(std::fs::read(dir.path().join("other.json")).unwrap(), b"x");
        d.delete(Path::new("other.json")).unwrap();
        assert!(!dir.path().join("other.json").exists());
    }
}
