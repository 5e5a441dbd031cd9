//! Snapshot files: a partition's state at a log offset, so that a restart reads one file
//! and replays only the log after it.
//!
//! A snapshot is an optimisation, never the source of truth: the log is. A snapshot that is
//! missing, of another version, damaged, or ahead of its log is ignored (with a line on
//! stderr) and the partition replays its whole log, as it did before snapshots existed.
//!
//! File format, version 4 (version 1 had no read markers, version 2 no files on messages,
//! version 3 no encrypted channels),
//! all integers little-endian:
//!
//! | bytes | field |
//! |---|---|
//! | 8 | magic `CHORSNAP` |
//! | 4 | format version (4) |
//! | 4 | partition id |
//! | 8 | `next_offset`: the log offset after the last event the snapshot covers |
//! | 8 | body length `n` |
//! | n | body (see `runtime::partition` and `domain::channel` for its contents) |
//! | 8 | xxh3-64 of every byte before it |
//!
//! Files are written as `NAME.tmp`, fsynced, renamed over `NAME`, and the directory is
//! fsynced, so a crash leaves either the old snapshot or the new one, never a mix. They
//! are read and written through a [`Storage`] directory (`snapshots/` of the data
//! directory), so that the simulated disk holds them too.

use chorus_log::{Storage, StorageFile};
use std::io;

const MAGIC: &[u8; 8] = b"CHORSNAP";
/// The snapshot format version written by this code. Version 3 added a message's files
/// (behind a flag bit that version 2 never sets), and version 4 encrypted channels (their
/// device lists and ciphertext bodies, in a channel kind older versions never write), so
/// version 2 and 3 files are read as they are.
pub const SNAPSHOT_FORMAT_VERSION: u32 = 4;
/// The oldest snapshot format version this code reads.
const SNAPSHOT_FORMAT_VERSION_MIN: u32 = 2;
const HEADER_BYTES: usize = 8 + 4 + 4 + 8 + 8;

/// Why a snapshot could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("snapshot: {0}")]
pub struct SnapshotError(pub String);

fn bad(what: impl Into<String>) -> SnapshotError {
    SnapshotError(what.into())
}

/// Builds a snapshot body.
#[derive(Default)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    /// An empty body with room for `bytes`.
    pub fn with_capacity(bytes: usize) -> Writer {
        Writer {
            buf: Vec::with_capacity(bytes),
        }
    }

    /// Appends a byte.
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }

    /// Appends a u32.
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    /// Appends a u64.
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    /// Appends a length: a u64, so no count is ever truncated.
    pub fn len(&mut self, n: usize) {
        self.u64(n as u64);
    }

    /// Appends bytes with their length.
    pub fn bytes(&mut self, v: &[u8]) {
        self.len(v.len());
        self.buf.extend_from_slice(v);
    }

    /// Appends a string with its length.
    pub fn str(&mut self, v: &str) {
        self.bytes(v.as_bytes());
    }

    /// Appends a slice of u64s with its length.
    pub fn u64s(&mut self, v: &[u64]) {
        self.len(v.len());
        self.buf.reserve(v.len() * 8);
        for x in v {
            self.buf.extend_from_slice(&x.to_le_bytes());
        }
    }

    /// The finished file: header, body, checksum.
    pub fn finish(self, partition: u32, next_offset: u64) -> Vec<u8> {
        seal(&self.buf, partition, next_offset)
    }
}

/// A snapshot file of `partition` around `body`: header, body, checksum.
pub fn seal(body: &[u8], partition: u32, next_offset: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES + body.len() + 8);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&SNAPSHOT_FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&partition.to_le_bytes());
    out.extend_from_slice(&next_offset.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(body);
    let sum = xxhash_rust::xxh3::xxh3_64(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    out
}

/// Reads a snapshot body. Every read checks its bounds, and counts are checked against
/// the bytes left, so damaged input fails cleanly instead of allocating without limit.
pub struct Reader<'a> {
    /// The whole file, which texts share.
    file: &'a bytes::Bytes,
    /// The body.
    buf: &'a [u8],
    /// Where the body starts in the file.
    base: usize,
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SnapshotError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or_else(|| bad(format!("truncated at byte {}", self.at)))?;
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }

    /// Reads a byte.
    pub fn u8(&mut self) -> Result<u8, SnapshotError> {
        Ok(self.take(1)?[0])
    }

    /// Reads a u32.
    pub fn u32(&mut self) -> Result<u32, SnapshotError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    /// Reads a u64.
    pub fn u64(&mut self) -> Result<u64, SnapshotError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    /// Reads a count of items of at least `item_bytes` each, refusing one that could not
    /// fit in the bytes left.
    pub fn count(&mut self, item_bytes: usize) -> Result<usize, SnapshotError> {
        let n = self.u64()?;
        let left = (self.buf.len() - self.at) as u64;
        if n.saturating_mul(item_bytes.max(1) as u64) > left {
            return Err(bad(format!(
                "count {n} at byte {} exceeds the file",
                self.at
            )));
        }
        Ok(n as usize)
    }

    /// Reads bytes written by [`Writer::bytes`].
    pub fn bytes(&mut self) -> Result<&'a [u8], SnapshotError> {
        let n = self.count(1)?;
        self.take(n)
    }

    /// Reads a string written by [`Writer::str`].
    pub fn string(&mut self) -> Result<String, SnapshotError> {
        let b = self.bytes()?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| bad(format!("invalid UTF-8 before byte {}", self.at)))
    }

    /// Reads bytes written by [`Writer::bytes`] (or a string written by [`Writer::str`])
    /// as a slice that shares the file's buffer: no allocation.
    pub fn shared_bytes(&mut self) -> Result<bytes::Bytes, SnapshotError> {
        let n = self.count(1)?;
        let start = self.base + self.at;
        self.take(n)?;
        Ok(self.file.slice(start..start + n))
    }

    /// Where the reader is in the body, for messages about what it read.
    pub fn position(&self) -> usize {
        self.at
    }

    /// Reads u64s written by [`Writer::u64s`].
    pub fn u64s(&mut self) -> Result<Vec<u64>, SnapshotError> {
        let n = self.count(8)?;
        let raw = self.take(n * 8)?;
        Ok(raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect())
    }

    /// Fails unless every byte was read.
    pub fn finish(self) -> Result<(), SnapshotError> {
        if self.at == self.buf.len() {
            Ok(())
        } else {
            Err(bad(format!("{} unread bytes", self.buf.len() - self.at)))
        }
    }
}

/// A snapshot read from a file and verified.
pub struct Loaded {
    /// The whole file.
    file: bytes::Bytes,
    /// The log offset after the last event the snapshot covers.
    pub next_offset: u64,
}

impl Loaded {
    /// A reader over the body.
    pub fn body(&self) -> Reader<'_> {
        Reader {
            file: &self.file,
            buf: &self.file[HEADER_BYTES..self.file.len() - 8],
            base: HEADER_BYTES,
            at: 0,
        }
    }
}

/// Parses and verifies a snapshot file of `partition`.
pub fn parse(file: impl Into<bytes::Bytes>, partition: u32) -> Result<Loaded, SnapshotError> {
    let file: bytes::Bytes = file.into();
    if file.len() < HEADER_BYTES + 8 || &file[..8] != MAGIC {
        return Err(bad("not a snapshot file"));
    }
    let u32_at = |at: usize| u32::from_le_bytes(file[at..at + 4].try_into().expect("4"));
    let u64_at = |at: usize| u64::from_le_bytes(file[at..at + 8].try_into().expect("8"));
    let version = u32_at(8);
    if !(SNAPSHOT_FORMAT_VERSION_MIN..=SNAPSHOT_FORMAT_VERSION).contains(&version) {
        return Err(bad(format!("format version {version} is not known")));
    }
    if u32_at(12) != partition {
        return Err(bad(format!("of partition {}, not {partition}", u32_at(12))));
    }
    let next_offset = u64_at(16);
    let body = u64_at(24);
    if body != (file.len() - HEADER_BYTES - 8) as u64 {
        return Err(bad("length does not match the file"));
    }
    let end = file.len() - 8;
    if xxhash_rust::xxh3::xxh3_64(&file[..end]) != u64_at(end) {
        return Err(bad("checksum mismatch"));
    }
    Ok(Loaded { file, next_offset })
}

/// Maps the snapshot `name` of `dir` and verifies it: `Ok(None)` when there is none.
///
/// The file is mapped, not read: restored texts share its pages, which stay in the page
/// cache (clean, so the kernel may drop and re-read them) instead of being copied into the
/// heap. A later snapshot is written to a new file and renamed over this one, so the
/// mapped file never changes while it is mapped.
pub async fn load<S: Storage>(
    dir: &S,
    name: &str,
    partition: u32,
) -> Result<Option<Loaded>, SnapshotError> {
    let failed = |e: io::Error| bad(format!("{name}: {e}"));
    let file = match dir.open(name).await {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(failed(e)),
    };
    let mapped = file.map_populated().map_err(failed);
    file.close().await.map_err(failed)?;
    let mapped = mapped?;
    if mapped.is_empty() {
        return Err(bad("empty file"));
    }
    parse(mapped, partition).map(Some)
}

/// The most bytes of a snapshot written with one call: the real storage copies each write
/// into a buffer of its own, so a snapshot is written in pieces rather than copied whole.
const WRITE_BYTES_MAX: usize = 4 << 20;

/// Writes `file` as `name` in `dir` atomically and durably: temporary file, fsync, rename,
/// fsync of the directory.
pub async fn store<S: Storage>(dir: &S, name: &str, file: &[u8]) -> io::Result<()> {
    let tmp = format!("{name}.tmp");
    // A crash may have left the temporary file of an earlier snapshot.
    match dir.remove(&tmp).await {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let f = dir.create(&tmp).await?;
    let written = async {
        for (i, piece) in file.chunks(WRITE_BYTES_MAX).enumerate() {
            f.write_at((i * WRITE_BYTES_MAX) as u64, piece).await?;
        }
        // The real storage pads its last block with zeros; the snapshot ends at its bytes.
        f.truncate(file.len() as u64).await?;
        f.sync_data().await
    }
    .await;
    let closed = f.close().await;
    written?;
    closed?;
    dir.rename(&tmp, name).await?;
    dir.sync_dir().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(7);
        w.u32(0xdead_beef);
        w.str("héllo");
        w.str("shared");
        w.u64s(&[1, 2, u64::MAX]);
        w.finish(3, 42)
    }

    // What is written reads back field by field, and every byte must be read.
    #[test]
    fn round_trip() {
        let loaded = parse(sample(), 3).unwrap();
        assert_eq!(loaded.next_offset, 42);
        let mut r = loaded.body();
        assert_eq!(r.u8().unwrap(), 7);
        assert_eq!(r.u32().unwrap(), 0xdead_beef);
        assert_eq!(r.string().unwrap(), "héllo");
        assert_eq!(&r.shared_bytes().unwrap()[..], b"shared");
        assert_eq!(r.u64s().unwrap(), vec![1, 2, u64::MAX]);
        r.finish().unwrap();
    }

    // Any flipped bit, a truncation, another partition's file, or an unknown version is
    // refused rather than decoded.
    #[test]
    fn damage_is_refused() {
        let good = sample();
        for i in 0..good.len() {
            for bit in [0x01u8, 0x80] {
                let mut f = good.clone();
                f[i] ^= bit;
                assert!(parse(f, 3).is_err(), "flip at byte {i} accepted");
            }
        }
        for n in 0..good.len() {
            assert!(parse(good[..n].to_vec(), 3).is_err(), "truncation to {n}");
        }
        assert!(parse(good.clone(), 4).is_err());
    }

    // A count larger than the bytes left fails instead of allocating.
    #[test]
    fn huge_counts_fail_cleanly() {
        let mut w = Writer::default();
        w.u64(u64::MAX / 2);
        let loaded = parse(w.finish(0, 0), 0).unwrap();
        assert!(loaded.body().u64s().is_err());
        assert!(loaded.body().bytes().is_err());
    }

    // A stored snapshot replaces the old one whole and leaves no temporary file, and a
    // crash after `store` returns keeps it.
    #[test]
    fn store_replaces_atomically() {
        let dir = chorus_log::SimStorage::new(chorus_log::SimConfig::default());
        futures::executor::block_on(async {
            assert!(load(&dir, "p00000.snap", 3).await.unwrap().is_none());
            store(&dir, "p00000.snap", &sample()).await.unwrap();
            store(&dir, "p00000.snap", &sample()).await.unwrap();
        });
        dir.crash();
        futures::executor::block_on(async {
            let loaded = load(&dir, "p00000.snap", 3).await.unwrap().unwrap();
            assert_eq!(loaded.next_offset, 42);
            assert_eq!(dir.list().await.unwrap(), vec!["p00000.snap".to_string()]);
        });
    }
}
