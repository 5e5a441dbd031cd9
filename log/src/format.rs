//! The on-disk format of segments and records, version 1: encoding and checked decoding.
//!
//! This module is pure: bytes in, values or typed errors out. Every byte that comes from a
//! disk passes through [`decode_record`] or [`scan`] before the log uses it, and both are
//! fuzzed (`fuzz/`). `DESIGN.md` documents the layout byte by byte; the constants here are
//! the source of truth.
//!
//! Segment file: a 32-byte [`SegmentHeader`], then records back to back. Record: a 32-byte
//! header, then the payload. All integers are little-endian.
//!
//! ```text
//! segment header: magic "CHRSSEG\0" (8) | version u32 | reserved u32 | base_offset u64 | xxh3 u64
//! record header:  payload_len u32 | version u8 | flags u8 | reserved u16 | xxh3 u64 |
//!                 offset u64 | timestamp_us u64
//! ```
//!
//! The record checksum is xxh3-64 over the header with the checksum field zeroed, followed by
//! the payload. A header whose first 8 bytes are zero marks the end of the data: the real
//! storage pads the last block with zeros, and a crash can leave unwritten (zero) sectors.

use bytes::Bytes;
use xxhash_rust::xxh3::Xxh3;

/// The segment file format version written by this code.
pub const SEGMENT_VERSION: u32 = 1;
/// The record format version written by this code.
pub const RECORD_VERSION: u8 = 1;
/// Magic bytes at the start of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"CHRSSEG\0";
/// Bytes in a segment header.
pub const SEGMENT_HEADER_BYTES: usize = 32;
/// Bytes in a record header.
pub const RECORD_HEADER_BYTES: usize = 32;
/// The largest payload the format can describe. The log's configured limit is lower.
pub const RECORD_PAYLOAD_BYTES_MAX: u32 = 256 * 1024 * 1024;

/// The header at the start of a segment file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// The offset of the segment's first record.
    pub base_offset: u64,
}

/// Why a segment header could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SegmentHeaderError {
    /// The file is shorter than a header.
    #[error("segment header is truncated ({0} bytes)")]
    Truncated(usize),
    /// The magic bytes are wrong: not a Chorus segment.
    #[error("segment header has the wrong magic")]
    Magic,
    /// A version this code does not read.
    #[error("segment format version {0} is not supported")]
    Version(u32),
    /// The checksum does not match.
    #[error("segment header checksum mismatch")]
    Checksum,
    /// Reserved bytes that version 1 does not define are set.
    #[error("segment header has reserved bits set")]
    Reserved,
}

impl SegmentHeader {
    /// Encodes the header into its 32 bytes.
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_BYTES] {
        let mut out = [0u8; SEGMENT_HEADER_BYTES];
        out[0..8].copy_from_slice(&SEGMENT_MAGIC);
        out[8..12].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
        out[16..24].copy_from_slice(&self.base_offset.to_le_bytes());
        let sum = xxhash_rust::xxh3::xxh3_64(&out[0..24]);
        out[24..32].copy_from_slice(&sum.to_le_bytes());
        out
    }

    /// Decodes and verifies a header from the start of `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<SegmentHeader, SegmentHeaderError> {
        if bytes.len() < SEGMENT_HEADER_BYTES {
            return Err(SegmentHeaderError::Truncated(bytes.len()));
        }
        if bytes[0..8] != SEGMENT_MAGIC {
            return Err(SegmentHeaderError::Magic);
        }
        let sum = u64_at(bytes, 24);
        if xxhash_rust::xxh3::xxh3_64(&bytes[0..24]) != sum {
            return Err(SegmentHeaderError::Checksum);
        }
        let version = u32_at(bytes, 8);
        if version != SEGMENT_VERSION {
            return Err(SegmentHeaderError::Version(version));
        }
        if u32_at(bytes, 12) != 0 {
            return Err(SegmentHeaderError::Reserved);
        }
        Ok(SegmentHeader {
            base_offset: u64_at(bytes, 16),
        })
    }
}

/// One record decoded from bytes, borrowing its payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordRef<'a> {
    /// The record's offset in the log.
    pub offset: u64,
    /// Microseconds since the Unix epoch, as given by the appender.
    pub timestamp_us: u64,
    /// The payload bytes.
    pub payload: &'a [u8],
}

impl RecordRef<'_> {
    /// Bytes the record takes on disk, header included.
    pub fn encoded_len(&self) -> usize {
        RECORD_HEADER_BYTES + self.payload.len()
    }
}

/// One record read from the log, owning its payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The record's offset in the log.
    pub offset: u64,
    /// Microseconds since the Unix epoch, as given by the appender.
    pub timestamp_us: u64,
    /// The payload bytes.
    pub payload: Bytes,
}

/// What [`decode_record`] found at a position.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A whole, verified record.
    Record(RecordRef<'a>),
    /// The clean end of the data: no bytes left, or a zeroed header.
    End,
    /// Bytes that are not a valid record: torn, corrupt, or truncated.
    Invalid(RecordError),
}

/// Why bytes are not a valid record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// Fewer bytes than the header, or than the header says the payload needs.
    #[error("record is truncated: {available} of {needed} bytes present")]
    Truncated {
        /// Bytes needed for the whole record.
        needed: usize,
        /// Bytes present.
        available: usize,
    },
    /// A version this code does not read.
    #[error("record version {0} is not supported")]
    Version(u8),
    /// Flags or reserved bytes that version 1 does not define are set.
    #[error("record has reserved bits set")]
    Reserved,
    /// A length over [`RECORD_PAYLOAD_BYTES_MAX`].
    #[error("record length {0} exceeds the format's maximum")]
    Length(u32),
    /// The checksum does not match the bytes.
    #[error("record checksum mismatch")]
    Checksum,
}

/// Appends the encoding of one record to `out`.
pub fn encode_record(out: &mut Vec<u8>, offset: u64, timestamp_us: u64, payload: &[u8]) {
    assert!(payload.len() <= RECORD_PAYLOAD_BYTES_MAX as usize);
    let mut header = [0u8; RECORD_HEADER_BYTES];
    header[0..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    header[4] = RECORD_VERSION;
    header[16..24].copy_from_slice(&offset.to_le_bytes());
    header[24..32].copy_from_slice(&timestamp_us.to_le_bytes());
    let sum = record_checksum(&header, payload);
    header[8..16].copy_from_slice(&sum.to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(payload);
}

/// The checksum of a record: xxh3-64 over the header (checksum field zeroed), then payload.
fn record_checksum(header: &[u8], payload: &[u8]) -> u64 {
    let mut h = Xxh3::new();
    h.update(&header[0..8]);
    h.update(&[0u8; 8]);
    h.update(&header[16..RECORD_HEADER_BYTES]);
    h.update(payload);
    h.digest()
}

/// Decodes and verifies the record at the start of `bytes`.
pub fn decode_record(bytes: &[u8]) -> Decoded<'_> {
    if bytes.is_empty() {
        return Decoded::End;
    }
    let header_len = bytes.len().min(RECORD_HEADER_BYTES);
    if bytes[..header_len.min(8)].iter().all(|&b| b == 0) {
        return Decoded::End;
    }
    if bytes.len() < RECORD_HEADER_BYTES {
        return Decoded::Invalid(RecordError::Truncated {
            needed: RECORD_HEADER_BYTES,
            available: bytes.len(),
        });
    }
    let len = u32_at(bytes, 0);
    if bytes[4] != RECORD_VERSION {
        return Decoded::Invalid(RecordError::Version(bytes[4]));
    }
    if bytes[5..8] != [0, 0, 0] {
        return Decoded::Invalid(RecordError::Reserved);
    }
    if len > RECORD_PAYLOAD_BYTES_MAX {
        return Decoded::Invalid(RecordError::Length(len));
    }
    let needed = RECORD_HEADER_BYTES + len as usize;
    if bytes.len() < needed {
        return Decoded::Invalid(RecordError::Truncated {
            needed,
            available: bytes.len(),
        });
    }
    let payload = &bytes[RECORD_HEADER_BYTES..needed];
    if record_checksum(&bytes[..RECORD_HEADER_BYTES], payload) != u64_at(bytes, 8) {
        return Decoded::Invalid(RecordError::Checksum);
    }
    Decoded::Record(RecordRef {
        offset: u64_at(bytes, 16),
        timestamp_us: u64_at(bytes, 24),
        payload,
    })
}

/// How a scan of a segment's records ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanEnd {
    /// The bytes ended, or a zeroed header followed.
    Clean,
    /// An invalid record at the scan's end position.
    Invalid(RecordError),
    /// A valid record whose offset is not the one expected next (`found`).
    OffsetMismatch {
        /// The offset the record carries.
        found: u64,
    },
}

/// The result of scanning records from a starting position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scan {
    /// The offset after the last valid record.
    pub next_offset: u64,
    /// The byte position after the last valid record (relative to the scanned slice).
    pub end: usize,
    /// How the scan stopped.
    pub stop: ScanEnd,
}

/// Scans records from the start of `bytes`, expecting consecutive offsets from
/// `first_offset`, and calls `visit(position, record)` for each valid one.
pub fn scan<'a>(
    bytes: &'a [u8],
    first_offset: u64,
    mut visit: impl FnMut(usize, RecordRef<'a>),
) -> Scan {
    let mut pos = 0usize;
    let mut next = first_offset;
    loop {
        match decode_record(&bytes[pos..]) {
            Decoded::End => {
                return Scan {
                    next_offset: next,
                    end: pos,
                    stop: ScanEnd::Clean,
                }
            }
            Decoded::Invalid(e) => {
                return Scan {
                    next_offset: next,
                    end: pos,
                    stop: ScanEnd::Invalid(e),
                }
            }
            Decoded::Record(r) if r.offset != next => {
                return Scan {
                    next_offset: next,
                    end: pos,
                    stop: ScanEnd::OffsetMismatch { found: r.offset },
                }
            }
            Decoded::Record(r) => {
                visit(pos, r);
                pos += r.encoded_len();
                next += 1;
            }
        }
    }
}

/// Decodes arbitrary bytes as a record and as a whole segment, for fuzzing: it must never
/// panic, whatever the input, and what it decodes must re-encode to the same bytes.
pub fn fuzz_decode(data: &[u8]) {
    if let Decoded::Record(r) = decode_record(data) {
        let mut again = Vec::new();
        encode_record(&mut again, r.offset, r.timestamp_us, r.payload);
        assert_eq!(&again[..], &data[..r.encoded_len()]);
    }
    if let Ok(header) = SegmentHeader::decode(data) {
        let body = &data[SEGMENT_HEADER_BYTES..];
        let result = scan(body, header.base_offset, |pos, r| {
            assert!(pos + r.encoded_len() <= body.len());
        });
        assert!(result.end <= body.len());
        assert!(result.next_offset >= header.base_offset);
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    // A record round-trips, and every single flipped bit in it is detected.
    #[test]
    fn every_bit_flip_is_detected() {
        let mut buf = Vec::new();
        encode_record(&mut buf, 42, 7, b"hello chorus");
        match decode_record(&buf) {
            Decoded::Record(r) => {
                assert_eq!(
                    (r.offset, r.timestamp_us, r.payload),
                    (42, 7, &b"hello chorus"[..])
                )
            }
            other => panic!("expected a record, got {other:?}"),
        }
        for bit in 0..buf.len() * 8 {
            let mut bad = buf.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(
                !matches!(decode_record(&bad), Decoded::Record(_)),
                "flip of bit {bit} went unnoticed"
            );
        }
    }

    // A zeroed header is the clean end; a truncated record is invalid, never a record.
    #[test]
    fn zero_header_ends_and_truncation_is_invalid() {
        assert_eq!(decode_record(&[0u8; 64]), Decoded::End);
        let mut buf = Vec::new();
        encode_record(&mut buf, 1, 1, &[7u8; 100]);
        for cut in 1..buf.len() {
            assert!(matches!(
                decode_record(&buf[..cut]),
                Decoded::Invalid(RecordError::Truncated { .. })
            ));
        }
    }

    // A scan stops cleanly at zero padding and reports an offset that breaks the sequence.
    #[test]
    fn scan_checks_offsets() {
        let mut buf = Vec::new();
        encode_record(&mut buf, 5, 0, b"a");
        encode_record(&mut buf, 6, 0, b"b");
        buf.extend_from_slice(&[0u8; 100]);
        let s = scan(&buf, 5, |_, _| {});
        assert_eq!((s.next_offset, s.stop), (7, ScanEnd::Clean));
        let s = scan(&buf, 4, |_, _| {});
        assert_eq!(s.stop, ScanEnd::OffsetMismatch { found: 5 });
    }

    // The segment header round-trips and rejects damage.
    #[test]
    fn segment_header_round_trip() {
        let h = SegmentHeader { base_offset: 1234 };
        let bytes = h.encode();
        assert_eq!(SegmentHeader::decode(&bytes), Ok(h));
        let mut bad = bytes;
        bad[17] ^= 4;
        assert_eq!(
            SegmentHeader::decode(&bad),
            Err(SegmentHeaderError::Checksum)
        );
    }
}
