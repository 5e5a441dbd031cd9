//! The sparse offset index of one segment, in memory and as its `.idx` file (version 1).
//!
//! The index holds one entry per `interval_bytes` of records: the entry's offset and the
//! byte position of its record in the segment. A lookup finds the last entry at or before an
//! offset in O(log n), and the reader scans forward from there, at most one interval.
//!
//! The index is derived data. It is written once, when its segment is sealed, and a missing,
//! damaged or stale index file is rebuilt by scanning the segment.
//!
//! ```text
//! index file: magic "CHRSIDX\0" (8) | version u32 | count u32 | base_offset u64 |
//!             next_offset u64 | segment_len u64 | count × (offset u64, position u64) |
//!             xxh3 u64 over everything before it
//! ```

/// The index file format version written by this code.
pub const INDEX_VERSION: u32 = 1;
const INDEX_MAGIC: [u8; 8] = *b"CHRSIDX\0";
const INDEX_HEADER_BYTES: usize = 40;

/// One index entry: a record's offset and its byte position in the segment file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    /// The record's offset.
    pub offset: u64,
    /// The record's byte position in the segment file.
    pub position: u64,
}

/// The sparse index of one segment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SparseIndex {
    entries: Vec<IndexEntry>,
    interval_bytes: u64,
}

/// What an index file says about its segment, besides the entries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexFile {
    /// The segment's base offset.
    pub base_offset: u64,
    /// The offset after the segment's last record.
    pub next_offset: u64,
    /// The segment's length in bytes when the index was written.
    pub segment_len: u64,
    /// The entries.
    pub index: SparseIndex,
}

impl SparseIndex {
    /// An empty index that adds an entry every `interval_bytes` of records.
    pub fn new(interval_bytes: u64) -> SparseIndex {
        SparseIndex {
            entries: Vec::new(),
            interval_bytes: interval_bytes.max(1),
        }
    }

    /// Notes a record appended at `position`; adds an entry if the interval has passed.
    pub fn observe(&mut self, offset: u64, position: u64) {
        let due = match self.entries.last() {
            None => true,
            Some(last) => position >= last.position + self.interval_bytes,
        };
        if due {
            self.entries.push(IndexEntry { offset, position });
        }
    }

    /// The last entry at or before `offset`, if any.
    pub fn lookup(&self, offset: u64) -> Option<IndexEntry> {
        let i = self.entries.partition_point(|e| e.offset <= offset);
        i.checked_sub(1).map(|i| self.entries[i])
    }

    /// Drops the entries for offsets at or after `offset`.
    pub fn truncate_from(&mut self, offset: u64) {
        let i = self.entries.partition_point(|e| e.offset < offset);
        self.entries.truncate(i);
    }

    /// The number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the index has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl IndexFile {
    /// Encodes the index file.
    pub fn encode(&self) -> Vec<u8> {
        let n = self.index.entries.len();
        let mut out = Vec::with_capacity(INDEX_HEADER_BYTES + n * 16 + 8);
        out.extend_from_slice(&INDEX_MAGIC);
        out.extend_from_slice(&INDEX_VERSION.to_le_bytes());
        out.extend_from_slice(&(n as u32).to_le_bytes());
        out.extend_from_slice(&self.base_offset.to_le_bytes());
        out.extend_from_slice(&self.next_offset.to_le_bytes());
        out.extend_from_slice(&self.segment_len.to_le_bytes());
        for e in &self.index.entries {
            out.extend_from_slice(&e.offset.to_le_bytes());
            out.extend_from_slice(&e.position.to_le_bytes());
        }
        let sum = xxhash_rust::xxh3::xxh3_64(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        out
    }

    /// Decodes and verifies an index file; `None` if it is damaged in any way, including
    /// entries out of order or outside the segment.
    pub fn decode(bytes: &[u8], interval_bytes: u64) -> Option<IndexFile> {
        if bytes.len() < INDEX_HEADER_BYTES + 8 || bytes[0..8] != INDEX_MAGIC {
            return None;
        }
        let (body, sum) = bytes.split_at(bytes.len() - 8);
        if xxhash_rust::xxh3::xxh3_64(body) != u64::from_le_bytes(sum.try_into().ok()?) {
            return None;
        }
        let word = |at: usize| u64::from_le_bytes(body[at..at + 8].try_into().expect("8"));
        let version = u32::from_le_bytes(body[8..12].try_into().ok()?);
        let count = u32::from_le_bytes(body[12..16].try_into().ok()?) as usize;
        if version != INDEX_VERSION || body.len() != INDEX_HEADER_BYTES + count * 16 {
            return None;
        }
        let file = IndexFile {
            base_offset: word(16),
            next_offset: word(24),
            segment_len: word(32),
            index: SparseIndex {
                entries: (0..count)
                    .map(|i| IndexEntry {
                        offset: word(INDEX_HEADER_BYTES + i * 16),
                        position: word(INDEX_HEADER_BYTES + i * 16 + 8),
                    })
                    .collect(),
                interval_bytes: interval_bytes.max(1),
            },
        };
        file.is_consistent().then_some(file)
    }

    fn is_consistent(&self) -> bool {
        let e = &self.index.entries;
        self.next_offset >= self.base_offset
            && e.windows(2)
                .all(|w| w[0].offset < w[1].offset && w[0].position < w[1].position)
            && e.iter().all(|x| {
                x.offset >= self.base_offset
                    && x.offset < self.next_offset
                    && x.position < self.segment_len
            })
    }
}

/// Decodes arbitrary bytes as an index file, for fuzzing: it must never panic, whatever the
/// input, and a file it accepts must re-encode to exactly the same bytes and find each of
/// its entries. The bytes are tried as they are and again with their last 8 bytes replaced
/// by the right checksum, so that a fuzzer reaches the checks behind the checksum.
/// Returns whether either was accepted.
pub fn fuzz_decode(data: &[u8]) -> bool {
    let mut accepted = fuzz_check(data);
    if let Some(end) = data.len().checked_sub(8) {
        let mut sealed = data.to_vec();
        let sum = xxhash_rust::xxh3::xxh3_64(&sealed[..end]);
        sealed[end..].copy_from_slice(&sum.to_le_bytes());
        accepted |= fuzz_check(&sealed);
    }
    accepted
}

fn fuzz_check(bytes: &[u8]) -> bool {
    let Some(file) = IndexFile::decode(bytes, 4096) else {
        return false;
    };
    assert_eq!(
        file.encode(),
        bytes,
        "an accepted index re-encodes differently"
    );
    for e in &file.index.entries {
        assert_eq!(file.index.lookup(e.offset), Some(*e));
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    // Lookups find the last entry at or before an offset; the file round-trips and any
    // damage makes decoding refuse it.
    #[test]
    fn lookup_and_file_round_trip() {
        let mut idx = SparseIndex::new(100);
        for i in 0..50u64 {
            idx.observe(10 + i, 32 + i * 40);
        }
        assert_eq!(idx.lookup(9), None);
        assert_eq!(idx.lookup(10).map(|e| e.offset), Some(10));
        let e = idx.lookup(30).expect("entry");
        assert!(e.offset <= 30 && 30 - e.offset <= 3);
        let file = IndexFile {
            base_offset: 10,
            next_offset: 60,
            segment_len: 32 + 50 * 40,
            index: idx,
        };
        let bytes = file.encode();
        assert_eq!(IndexFile::decode(&bytes, 100), Some(file));
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            assert_eq!(IndexFile::decode(&bad, 100), None, "damage at byte {i}");
        }
    }
}
