//! A simulated disk in memory, for deterministic durability and fault tests.
//!
//! Each file (an inode) keeps two images: `current`, what reads see (the page cache), and
//! `durable`, what the medium holds after the last `sync_data`. Writes and truncations since
//! that sync are kept in order. [`SimStorage::crash`] rebuilds every file from its durable
//! image and then, for each unsynced operation, keeps it, drops it, or (for a write) keeps a
//! random subset of its 512-byte sectors: a torn write. Names behave the same way: creates,
//! removes and renames since the last `sync_dir` survive a crash only as a random prefix.
//!
//! Faults on demand: [`SimStorage::fail_next_write`] and [`SimStorage::fail_next_sync`]
//! return EIO once; [`SimStorage::flip_bit`] damages stored bytes. Every random choice comes
//! from a seeded generator, so a seed replays exactly.

use super::{path_components, Storage, StorageFile, StorageRoot};
use bytes::Bytes;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

/// The sector size at which the simulated disk tears writes.
pub const SECTOR_BYTES: u64 = 512;

/// How the simulated disk behaves.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Seed of every random choice the disk makes.
    pub seed: u64,
    /// Chance, in 1/1000, that an operation yields to the executor once before finishing,
    /// so concurrent appenders interleave the way they do on a real disk.
    pub yield_permille: u32,
}

impl Default for SimConfig {
    fn default() -> SimConfig {
        SimConfig {
            seed: 0,
            yield_permille: 300,
        }
    }
}

/// A small, fixed, seedable generator (SplitMix64), so that seeds replay across platforms
/// and dependency versions.
#[derive(Clone, Debug)]
pub struct SimRng(u64);

impl SimRng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> SimRng {
        SimRng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True with chance `permille`/1000.
    pub fn chance(&mut self, permille: u32) -> bool {
        self.below(1000) < permille as u64
    }
}

#[derive(Clone, Debug)]
enum FileOp {
    Write { pos: u64, data: Vec<u8> },
    Truncate { len: u64 },
}

#[derive(Clone, Debug, Default)]
struct Inode {
    current: Vec<u8>,
    durable: Vec<u8>,
    unsynced: Vec<FileOp>,
}

#[derive(Clone, Debug)]
enum DirOp {
    Link { name: String, inode: u64 },
    Unlink { name: String },
}

#[derive(Debug)]
struct Disk {
    inodes: HashMap<u64, Inode>,
    names: BTreeMap<String, u64>,
    durable_names: BTreeMap<String, u64>,
    unsynced_dir: Vec<DirOp>,
    next_inode: u64,
    rng: SimRng,
    yield_permille: u32,
    fail_write: bool,
    fail_sync: bool,
    generation: u64,
}

/// A simulated directory. Clones share the same disk.
#[derive(Clone, Debug)]
pub struct SimStorage {
    disk: Rc<RefCell<Disk>>,
}

/// A handle to one simulated file. Handles from before a crash stop working after it.
#[derive(Debug)]
pub struct SimFile {
    disk: Rc<RefCell<Disk>>,
    inode: u64,
    generation: u64,
}

fn eio(what: &str) -> io::Error {
    io::Error::other(format!("simulated EIO on {what}"))
}

fn stale() -> io::Error {
    io::Error::other("file handle from before a simulated crash")
}

impl SimStorage {
    /// An empty simulated directory.
    pub fn new(config: SimConfig) -> SimStorage {
        SimStorage {
            disk: Rc::new(RefCell::new(Disk {
                inodes: HashMap::new(),
                names: BTreeMap::new(),
                durable_names: BTreeMap::new(),
                unsynced_dir: Vec::new(),
                next_inode: 1,
                rng: SimRng::new(config.seed),
                yield_permille: config.yield_permille,
                fail_write: false,
                fail_sync: false,
                generation: 0,
            })),
        }
    }

    /// The next write (of any file) fails with EIO and changes nothing.
    pub fn fail_next_write(&self) {
        self.disk.borrow_mut().fail_write = true;
    }

    /// The next `sync_data` fails with EIO; what it should have made durable stays
    /// unsynced and is at the mercy of the next crash.
    pub fn fail_next_sync(&self) {
        self.disk.borrow_mut().fail_sync = true;
    }

    /// Flips one bit of a file, in what reads see and in what survives a crash.
    pub fn flip_bit(&self, name: &str, byte: u64, bit: u8) {
        let mut disk = self.disk.borrow_mut();
        let id = *disk.names.get(name).expect("flip_bit: no such file");
        let inode = disk.inodes.get_mut(&id).expect("inode");
        for image in [&mut inode.current, &mut inode.durable] {
            if let Some(b) = image.get_mut(byte as usize) {
                *b ^= 1 << (bit % 8);
            }
        }
    }

    /// The bytes of a file as reads see them, if it exists.
    pub fn contents(&self, name: &str) -> Option<Vec<u8>> {
        let disk = self.disk.borrow();
        let id = disk.names.get(name)?;
        Some(disk.inodes[id].current.clone())
    }

    /// Simulates a power loss and restart: every open handle stops working, and each file
    /// and name keeps only what was durable plus a random part of what was not.
    pub fn crash(&self) {
        let mut guard = self.disk.borrow_mut();
        let disk = &mut *guard;
        disk.generation += 1;
        disk.fail_write = false;
        disk.fail_sync = false;
        let keep_dir_ops = disk.rng.below(disk.unsynced_dir.len() as u64 + 1) as usize;
        let mut names = disk.durable_names.clone();
        for op in disk.unsynced_dir.drain(..).take(keep_dir_ops) {
            match op {
                DirOp::Link { name, inode } => names.insert(name, inode),
                DirOp::Unlink { name } => names.remove(&name),
            };
        }
        disk.names = names.clone();
        disk.durable_names = names;
        let live: Vec<u64> = disk.names.values().copied().collect();
        disk.inodes.retain(|id, _| live.contains(id));
        let mut ids: Vec<u64> = disk.inodes.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            let inode = disk.inodes.get_mut(&id).expect("inode");
            let mut image = std::mem::take(&mut inode.durable);
            for op in inode.unsynced.drain(..) {
                apply_after_crash(&mut image, op, &mut disk.rng);
            }
            inode.current = image.clone();
            inode.durable = image;
        }
    }

    fn maybe_yield(&self) -> YieldOnce {
        let mut disk = self.disk.borrow_mut();
        let permille = disk.yield_permille;
        YieldOnce(disk.rng.chance(permille))
    }
}

/// A simulated tree of directories, each a [`SimStorage`] with choices seeded from the
/// tree's seed and its path. Clones share the tree.
///
/// A directory is durable once [`StorageRoot::dir`] returns, as on the real disk, which
/// syncs the parent of a directory it creates. [`SimRoot::crash`] crashes every directory
/// at once, as a power loss does.
#[derive(Clone, Debug)]
pub struct SimRoot {
    tree: Rc<RefCell<SimTree>>,
}

#[derive(Debug)]
struct SimTree {
    config: SimConfig,
    dirs: BTreeMap<String, SimStorage>,
}

impl SimRoot {
    /// An empty tree.
    pub fn new(config: SimConfig) -> SimRoot {
        SimRoot {
            tree: Rc::new(RefCell::new(SimTree {
                config,
                dirs: BTreeMap::new(),
            })),
        }
    }

    /// The directory at `path`, created if missing, without awaiting: for tests that
    /// inject faults into it or look at its files.
    ///
    /// # Panics
    ///
    /// If `path` is not a relative path of plain names.
    pub fn dir_now(&self, path: &str) -> SimStorage {
        path_components(path).expect("a relative path of plain names");
        let mut tree = self.tree.borrow_mut();
        let config = SimConfig {
            // Each directory makes its own choices, so that one directory's use does not
            // shift another's.
            seed: tree.config.seed ^ xxhash_rust::xxh3::xxh3_64(path.as_bytes()),
            ..tree.config.clone()
        };
        tree.dirs
            .entry(path.to_owned())
            .or_insert_with(|| SimStorage::new(config))
            .clone()
    }

    /// The paths of the directories that exist, in order.
    pub fn dirs(&self) -> Vec<String> {
        self.tree.borrow().dirs.keys().cloned().collect()
    }

    /// Simulates a power loss and restart of the whole tree: every directory crashes (see
    /// [`SimStorage::crash`]).
    pub fn crash(&self) {
        let dirs: Vec<SimStorage> = self.tree.borrow().dirs.values().cloned().collect();
        for dir in dirs {
            dir.crash();
        }
    }
}

impl StorageRoot for SimRoot {
    type Dir = SimStorage;

    async fn dir(&self, path: &str) -> io::Result<SimStorage> {
        path_components(path)?;
        Ok(self.dir_now(path))
    }
}

/// Applies one unsynced operation to a crashed file's image: kept, lost, or torn.
fn apply_after_crash(image: &mut Vec<u8>, op: FileOp, rng: &mut SimRng) {
    match (op, rng.below(3)) {
        (_, 0) => {}
        (FileOp::Truncate { len }, _) => image.resize(len as usize, 0),
        (FileOp::Write { pos, data }, 1) => write_into(image, pos, &data),
        (FileOp::Write { pos, data }, _) => {
            let end = pos + data.len() as u64;
            let mut sector = pos - pos % SECTOR_BYTES;
            while sector < end {
                let from = sector.max(pos);
                let to = (sector + SECTOR_BYTES).min(end);
                if rng.chance(500) {
                    let slice = &data[(from - pos) as usize..(to - pos) as usize];
                    write_into(image, from, slice);
                }
                sector += SECTOR_BYTES;
            }
        }
    }
}

fn write_into(image: &mut Vec<u8>, pos: u64, data: &[u8]) {
    let end = pos as usize + data.len();
    if image.len() < end {
        image.resize(end, 0);
    }
    image[pos as usize..end].copy_from_slice(data);
}

/// A future that returns `Pending` once (waking itself at once) when its flag is set.
struct YieldOnce(bool);

impl Future for YieldOnce {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            self.0 = false;
            cx.waker().wake_by_ref();
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }
}

impl Storage for SimStorage {
    type File = SimFile;

    async fn create(&self, name: &str) -> io::Result<SimFile> {
        self.maybe_yield().await;
        let mut disk = self.disk.borrow_mut();
        if disk.names.contains_key(name) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                name.to_owned(),
            ));
        }
        let inode = disk.next_inode;
        disk.next_inode += 1;
        disk.inodes.insert(inode, Inode::default());
        disk.names.insert(name.to_owned(), inode);
        disk.unsynced_dir.push(DirOp::Link {
            name: name.to_owned(),
            inode,
        });
        Ok(SimFile {
            disk: self.disk.clone(),
            inode,
            generation: disk.generation,
        })
    }

    async fn open(&self, name: &str) -> io::Result<SimFile> {
        self.maybe_yield().await;
        let disk = self.disk.borrow();
        let inode = *disk
            .names
            .get(name)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, name.to_owned()))?;
        Ok(SimFile {
            disk: self.disk.clone(),
            inode,
            generation: disk.generation,
        })
    }

    async fn remove(&self, name: &str) -> io::Result<()> {
        self.maybe_yield().await;
        let mut disk = self.disk.borrow_mut();
        if disk.names.remove(name).is_none() {
            return Err(io::Error::new(io::ErrorKind::NotFound, name.to_owned()));
        }
        disk.unsynced_dir.push(DirOp::Unlink {
            name: name.to_owned(),
        });
        Ok(())
    }

    async fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        self.maybe_yield().await;
        let mut disk = self.disk.borrow_mut();
        let inode = disk
            .names
            .remove(from)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, from.to_owned()))?;
        disk.names.insert(to.to_owned(), inode);
        // A rename is atomic: the new link and the removal of the old one land together.
        disk.unsynced_dir.push(DirOp::Link {
            name: to.to_owned(),
            inode,
        });
        let link = disk.unsynced_dir.len() - 1;
        disk.unsynced_dir.insert(
            link,
            DirOp::Unlink {
                name: from.to_owned(),
            },
        );
        Ok(())
    }

    async fn list(&self) -> io::Result<Vec<String>> {
        Ok(self.disk.borrow().names.keys().cloned().collect())
    }

    async fn sync_dir(&self) -> io::Result<()> {
        self.maybe_yield().await;
        let mut disk = self.disk.borrow_mut();
        disk.durable_names = disk.names.clone();
        disk.unsynced_dir.clear();
        Ok(())
    }
}

impl SimFile {
    fn with_inode<T>(&self, f: impl FnOnce(&mut Disk, u64) -> io::Result<T>) -> io::Result<T> {
        let mut disk = self.disk.borrow_mut();
        if disk.generation != self.generation || !disk.inodes.contains_key(&self.inode) {
            return Err(stale());
        }
        f(&mut disk, self.inode)
    }

    fn maybe_yield(&self) -> YieldOnce {
        SimStorage {
            disk: self.disk.clone(),
        }
        .maybe_yield()
    }
}

impl StorageFile for SimFile {
    async fn write_at(&self, pos: u64, data: &[u8]) -> io::Result<()> {
        self.maybe_yield().await;
        self.with_inode(|disk, id| {
            if std::mem::take(&mut disk.fail_write) {
                return Err(eio("write"));
            }
            let inode = disk.inodes.get_mut(&id).expect("inode");
            write_into(&mut inode.current, pos, data);
            inode.unsynced.push(FileOp::Write {
                pos,
                data: data.to_vec(),
            });
            Ok(())
        })
    }

    async fn read_at(&self, pos: u64, len: usize) -> io::Result<Vec<u8>> {
        self.with_inode(|disk, id| {
            let current = &disk.inodes[&id].current;
            let from = (pos as usize).min(current.len());
            let to = (from + len).min(current.len());
            Ok(current[from..to].to_vec())
        })
    }

    async fn sync_data(&self) -> io::Result<()> {
        self.maybe_yield().await;
        self.with_inode(|disk, id| {
            if std::mem::take(&mut disk.fail_sync) {
                return Err(eio("fsync"));
            }
            let inode = disk.inodes.get_mut(&id).expect("inode");
            inode.durable = inode.current.clone();
            inode.unsynced.clear();
            Ok(())
        })
    }

    async fn truncate(&self, len: u64) -> io::Result<()> {
        self.maybe_yield().await;
        self.with_inode(|disk, id| {
            let inode = disk.inodes.get_mut(&id).expect("inode");
            inode.current.resize(len as usize, 0);
            inode.unsynced.push(FileOp::Truncate { len });
            Ok(())
        })
    }

    async fn len(&self) -> io::Result<u64> {
        self.with_inode(|disk, id| Ok(disk.inodes[&id].current.len() as u64))
    }

    fn map(&self) -> io::Result<Bytes> {
        self.with_inode(|disk, id| Ok(Bytes::from(disk.inodes[&id].current.clone())))
    }

    async fn close(self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::executor::block_on;

    // Synced bytes always survive a crash; unsynced ones may be lost or torn, but never
    // turn into bytes that were not written.
    #[test]
    fn crash_keeps_synced_and_tears_the_rest() {
        for seed in 0..200 {
            let storage = SimStorage::new(SimConfig {
                seed,
                yield_permille: 0,
            });
            block_on(async {
                let f = storage.create("a").await.unwrap();
                storage.sync_dir().await.unwrap();
                f.write_at(0, &[1u8; 1000]).await.unwrap();
                f.sync_data().await.unwrap();
                f.write_at(1000, &[2u8; 3000]).await.unwrap();
            });
            storage.crash();
            let bytes = storage.contents("a").expect("synced name survives");
            assert!(bytes.len() >= 1000);
            assert!(bytes[..1000].iter().all(|&b| b == 1));
            assert!(bytes[1000..].iter().all(|&b| b == 2 || b == 0));
        }
    }

    // A root's directories are each a storage of their own, and a crash of the root
    // crashes all of them.
    #[test]
    fn root_crashes_every_directory() {
        let root = SimRoot::new(SimConfig {
            seed: 7,
            yield_permille: 0,
        });
        block_on(async {
            for path in ["", "p00001", "blobs/ab"] {
                let dir = root.dir(path).await.unwrap();
                let f = dir.create("synced").await.unwrap();
                f.write_at(0, b"kept").await.unwrap();
                f.sync_data().await.unwrap();
                dir.sync_dir().await.unwrap();
                f.write_at(4, &[9; 4096]).await.unwrap();
            }
            assert!(root.dir("../escape").await.is_err());
        });
        assert_eq!(root.dirs(), vec!["", "blobs/ab", "p00001"]);
        root.crash();
        let mut torn = 0;
        for path in ["", "p00001", "blobs/ab"] {
            let bytes = root.dir_now(path).contents("synced").unwrap();
            assert_eq!(&bytes[..4], b"kept");
            torn += (bytes.len() != 4 + 4096) as u32;
        }
        // Each directory chose for itself what its unsynced write left.
        assert!(torn > 0, "every unsynced write survived whole");
    }

    // An unsynced create may vanish at a crash; a synced one never does.
    #[test]
    fn names_need_sync_dir() {
        let mut lost = 0;
        for seed in 0..50 {
            let storage = SimStorage::new(SimConfig {
                seed,
                yield_permille: 0,
            });
            block_on(async {
                storage.create("kept").await.unwrap();
                storage.sync_dir().await.unwrap();
                storage.create("maybe").await.unwrap();
            });
            storage.crash();
            assert!(storage.contents("kept").is_some());
            lost += storage.contents("maybe").is_none() as u32;
        }
        assert!(lost > 0 && lost < 50, "lost {lost} of 50");
    }
}
