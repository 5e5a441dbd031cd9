//! Node-to-node frames: what nodes of a cluster say to each other over their TCP
//! connections.
//!
//! Every frame is versioned, length-prefixed and checksummed:
//!
//! ```text
//! magic "CR" (2) | version (1) | kind (1) | body length (u32 LE) | xxh3-64 of the body (u64 LE) | body
//! ```
//!
//! Kinds, version 1:
//! - `HELLO` (1): the first frame on a connection, from the side that opened it: the
//!   sender's node id (u64) and the fingerprint of its cluster membership (u64), so that a
//!   node of another cluster, or one started with another `--cluster`, is refused.
//! - `RAFT` (2): a batch of Raft messages, all the sender had for this peer when it wrote:
//!   a count (u32), then for each the group id (u64), the encoded message's length (u32)
//!   and the raft-rs `Message` (protobuf).
//! - `PART` (3): one piece of a message too large for one frame (a snapshot): the group id
//!   (u64), the piece's number and the number of pieces (u32 each), then the piece's bytes
//!   of the encoded message. The pieces of a message follow each other on a connection;
//!   the reader joins them and parses the message once the last has come.
//! - `FETCH` (4): a request for a group's committed events, on a connection of its own
//!   (catch-up after a snapshot, see [`crate::event_log`]): the group id, the first offset
//!   wanted and the offset after the last (u64 each).
//! - `EVENTS` (5): the answer to a `FETCH`: the group id and the offset of the first event
//!   (u64 each), then the events as a batch ([`crate::event_log::encode_batch`]; none when
//!   the node does not hold the offset asked for).
//! - `CALL` (6): a request the sender's server could not decide, for this node's server to
//!   serve ([`crate::calls`]), on a connection of its own: opaque bytes.
//! - `ANSWER` (7): the answer to a `CALL`: opaque bytes.
//! - `NOTICE` (8): a one-way notice for this node's server ([`crate::calls::Calls`]), on the
//!   connection that carries the sender's Raft messages: opaque bytes. Best effort.
//! - `BLOB_PIECE` (9): a piece of a blob of the engine's blob store (a message body over
//!   64 KiB, or the event frame that carries it; see [`crate::blobs`]), on a connection of
//!   its own: the blob's BLAKE3 hash (32 bytes), its length and the piece's offset in it
//!   (u64 each), then at most [`PART_BYTES`] of its bytes. The pieces of a blob follow
//!   each other in order; a blob of no bytes is one empty piece. Sent to store a blob on
//!   the receiving node, and as the answer to a `BLOB_GET`.
//! - `BLOB_GET` (10): a request for a blob the receiving node holds: its hash and length.
//! - `BLOB_DONE` (11): the end of a blob exchange: the hash and a status (u8): stored (0),
//!   not held here (1), or not stored (2).
//!
//! A reader checks the length against [`FRAME_BYTES_MAX`] before it waits for the body, and
//! the magic, version, kind, checksum and every inner length before it trusts any of it.
//! Any error ends the connection: the stream cannot be resynchronised, and the peer
//! reconnects.

use bytes::{Buf, BytesMut};
use protobuf::Message as _;
use raft::eraftpb::Message;
use xxhash_rust::xxh3::xxh3_64;

/// The frame magic.
pub const MAGIC: [u8; 2] = *b"CR";
/// The version this code writes and reads.
pub const VERSION: u8 = 1;
/// Magic, version, kind, body length, checksum.
pub const HEADER_BYTES: usize = 2 + 1 + 1 + 4 + 8;
/// The largest body a node accepts. Raft messages carry entries (raft-rs bounds an append
/// by `max_size_per_msg`); a message larger than [`PART_BYTES`] (a snapshot) goes in
/// `PART` frames.
pub const FRAME_BYTES_MAX: usize = 16 << 20;
/// Bytes of an encoded message per `PART` frame.
pub const PART_BYTES: usize = 4 << 20;
/// The most pieces of one message: 1 GiB of snapshot at most.
pub const PARTS_MAX: u32 = 256;
const KIND_HELLO: u8 = 1;
const KIND_RAFT: u8 = 2;
const KIND_PART: u8 = 3;
const KIND_FETCH: u8 = 4;
const KIND_EVENTS: u8 = 5;
const KIND_CALL: u8 = 6;
const KIND_ANSWER: u8 = 7;
const KIND_NOTICE: u8 = 8;
const KIND_BLOB_PIECE: u8 = 9;
const KIND_BLOB_GET: u8 = 10;
const KIND_BLOB_DONE: u8 = 11;
/// The largest blob a node sends or takes, in bytes: the engine's blob store's limit.
pub const BLOB_BYTES_MAX: u64 = chorus_engine::blob::BLOB_BYTES_MAX;
/// Bytes of events an `EVENTS` frame carries at most (one event may make it larger, up to
/// the frame limit).
pub const EVENTS_BYTES: usize = 1 << 20;

/// One frame.
#[derive(Clone, Debug, PartialEq)]
pub enum Frame {
    /// Who opened the connection.
    Hello {
        /// Its node id.
        node: u64,
        /// The fingerprint of its cluster membership ([`cluster_fingerprint`]).
        cluster: u64,
    },
    /// Raft messages, each for a group.
    Raft(Vec<(u64, Message)>),
    /// A piece of one encoded message of a group.
    Part {
        /// The message's group.
        group: u64,
        /// This piece's number, from 0.
        part: u32,
        /// How many pieces the message has.
        parts: u32,
        /// The piece's bytes.
        bytes: Vec<u8>,
    },
    /// A request for a group's committed events `from..to`.
    Fetch {
        /// The group.
        group: u64,
        /// The first offset wanted.
        from: u64,
        /// The offset after the last one wanted.
        to: u64,
    },
    /// Events of a group from offset `from` on, as a batch.
    Events {
        /// The group.
        group: u64,
        /// The first event's offset.
        from: u64,
        /// The events ([`crate::event_log::encode_batch`]).
        batch: Vec<u8>,
    },
    /// A request for the receiving node's server.
    Call(Vec<u8>),
    /// The answer to a `CALL`.
    Answer(Vec<u8>),
    /// A notice for the receiving node's server, on the connection that carries Raft
    /// messages: one way, best effort (what is lost is not sent again), such as a
    /// typing indicator for the node's own subscribers.
    Notice(Vec<u8>),
    /// A piece of a blob (see [`BlobJoiner`]).
    BlobPiece {
        /// The blob's BLAKE3 hash.
        hash: [u8; 32],
        /// The blob's length in bytes.
        len: u64,
        /// Where this piece begins in the blob.
        offset: u64,
        /// The piece's bytes.
        bytes: Vec<u8>,
    },
    /// A request for a blob.
    BlobGet {
        /// The blob's BLAKE3 hash.
        hash: [u8; 32],
        /// Its length in bytes.
        len: u64,
    },
    /// The end of a blob exchange.
    BlobDone {
        /// The blob's BLAKE3 hash.
        hash: [u8; 32],
        /// What became of it.
        status: BlobStatus,
    },
}

/// How a blob exchange ended ([`Frame::BlobDone`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlobStatus {
    /// The blob is stored durably on the node that answers.
    Stored = 0,
    /// The node does not hold the blob asked for.
    Missing = 1,
    /// The node did not store the blob: its bytes did not match their hash, or its disk
    /// failed.
    Failed = 2,
}

/// Why a byte stream is not a stream of frames.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Not a Chorus node frame.
    #[error("bad magic {0:02x?}: not a Chorus node")]
    Magic([u8; 2]),
    /// A version this node does not speak.
    #[error("frame version {0}; this node speaks {VERSION}")]
    Version(u8),
    /// A kind this version does not have.
    #[error("unknown frame kind {0}")]
    Kind(u8),
    /// A body over [`FRAME_BYTES_MAX`].
    #[error("a frame of {0} bytes is over the limit of {FRAME_BYTES_MAX}")]
    TooLarge(usize),
    /// The body is not what its checksum says.
    #[error("frame checksum mismatch")]
    Checksum,
    /// The body does not hold what its kind says.
    #[error("malformed {kind} frame: {why}")]
    Malformed {
        /// The frame's kind.
        kind: &'static str,
        /// What is wrong.
        why: String,
    },
}

/// The fingerprint of a membership: the sorted `(id, address)` pairs, hashed.
pub fn cluster_fingerprint(nodes: &[(u64, String)]) -> u64 {
    let mut sorted: Vec<&(u64, String)> = nodes.iter().collect();
    sorted.sort();
    let mut bytes = Vec::new();
    for (id, addr) in sorted {
        bytes.extend_from_slice(&id.to_le_bytes());
        bytes.extend_from_slice(&(addr.len() as u32).to_le_bytes());
        bytes.extend_from_slice(addr.as_bytes());
    }
    xxh3_64(&bytes)
}

/// Appends `frame` to `out`.
pub fn encode(frame: &Frame, out: &mut Vec<u8>) -> Result<(), WireError> {
    match frame {
        Frame::Hello { node, cluster } => {
            let start = begin(out);
            out.extend_from_slice(&node.to_le_bytes());
            out.extend_from_slice(&cluster.to_le_bytes());
            seal(out, start, KIND_HELLO)
        }
        Frame::Raft(msgs) => encode_raft(msgs, out),
        Frame::Part {
            group,
            part,
            parts,
            bytes,
        } => encode_part(*group, *part, *parts, bytes, out),
        Frame::Fetch { group, from, to } => {
            let start = begin(out);
            for v in [group, from, to] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            seal(out, start, KIND_FETCH)
        }
        Frame::Events { group, from, batch } => {
            let start = begin(out);
            out.extend_from_slice(&group.to_le_bytes());
            out.extend_from_slice(&from.to_le_bytes());
            out.extend_from_slice(batch);
            seal(out, start, KIND_EVENTS)
        }
        Frame::Call(bytes) | Frame::Answer(bytes) | Frame::Notice(bytes) => {
            let start = begin(out);
            out.extend_from_slice(bytes);
            let kind = match frame {
                Frame::Call(_) => KIND_CALL,
                Frame::Answer(_) => KIND_ANSWER,
                _ => KIND_NOTICE,
            };
            seal(out, start, kind)
        }
        Frame::BlobPiece {
            hash,
            len,
            offset,
            bytes,
        } => encode_blob_piece(hash, *len, *offset, bytes, out),
        Frame::BlobGet { hash, len } => {
            let start = begin(out);
            out.extend_from_slice(hash);
            out.extend_from_slice(&len.to_le_bytes());
            seal(out, start, KIND_BLOB_GET)
        }
        Frame::BlobDone { hash, status } => {
            let start = begin(out);
            out.extend_from_slice(hash);
            out.push(*status as u8);
            seal(out, start, KIND_BLOB_DONE)
        }
    }
}

/// Appends a `BLOB_PIECE` frame to `out`: `bytes` at `offset` of the blob `hash` of `len`
/// bytes.
pub fn encode_blob_piece(
    hash: &[u8; 32],
    len: u64,
    offset: u64,
    bytes: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), WireError> {
    if bytes.len() > PART_BYTES || len > BLOB_BYTES_MAX || offset + bytes.len() as u64 > len {
        return Err(WireError::Malformed {
            kind: "blob piece",
            why: format!(
                "{} bytes at {offset} of a blob of {len} (pieces of at most {PART_BYTES}, \
                 blobs of at most {BLOB_BYTES_MAX})",
                bytes.len()
            ),
        });
    }
    let start = begin(out);
    out.extend_from_slice(hash);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(bytes);
    seal(out, start, KIND_BLOB_PIECE)
}

/// The pieces of `blob`, whose BLAKE3 hash is `hash`, as `BLOB_PIECE` frames: one at a
/// time, so that a large blob is never encoded whole.
pub fn blob_pieces<'a>(
    hash: &'a [u8; 32],
    blob: &'a [u8],
) -> impl Iterator<Item = Result<Vec<u8>, WireError>> + 'a {
    let len = blob.len() as u64;
    let pieces = blob.len().div_ceil(PART_BYTES).max(1);
    (0..pieces).map(move |i| {
        let from = (i * PART_BYTES).min(blob.len());
        let to = (from + PART_BYTES).min(blob.len());
        let mut out = Vec::with_capacity(HEADER_BYTES + 48 + (to - from));
        encode_blob_piece(hash, len, from as u64, &blob[from..to], &mut out).map(|()| out)
    })
}

/// A whole blob: its hash, as its sender named it, and its bytes.
pub type Blob = ([u8; 32], Vec<u8>);

/// Joins the pieces of one blob as they arrive on a connection.
#[derive(Default)]
pub struct BlobJoiner {
    /// The hash, the length, and the bytes so far.
    open: Option<([u8; 32], u64, Vec<u8>)>,
}

impl BlobJoiner {
    /// Takes a piece; the blob's hash and bytes once its last piece came. A piece out of
    /// order or of another blob is an error (the connection ends). The bytes are not
    /// checked against the hash here: that is the store's check.
    pub fn push(
        &mut self,
        hash: [u8; 32],
        len: u64,
        offset: u64,
        bytes: &[u8],
    ) -> Result<Option<Blob>, WireError> {
        let bad = |why: &str| WireError::Malformed {
            kind: "blob piece",
            why: why.to_owned(),
        };
        if offset == 0 {
            if self.open.is_some() {
                return Err(bad("a blob begun before the last one ended"));
            }
            // Grown as pieces come, not reserved from a length the peer claims.
            self.open = Some((hash, len, Vec::new()));
        }
        let Some((h, n, buf)) = self.open.as_mut() else {
            return Err(bad("a piece of a blob never begun"));
        };
        if (*h, *n, buf.len() as u64) != (hash, len, offset) {
            return Err(bad("a piece out of order"));
        }
        buf.extend_from_slice(bytes);
        if (buf.len() as u64) < *n {
            return Ok(None);
        }
        let (h, _, buf) = self.open.take().expect("open");
        Ok(Some((h, buf)))
    }
}

/// Appends a `PART` frame to `out`.
pub fn encode_part(
    group: u64,
    part: u32,
    parts: u32,
    bytes: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), WireError> {
    if part >= parts || parts > PARTS_MAX {
        return Err(WireError::Malformed {
            kind: "part",
            why: format!("piece {part} of {parts} (at most {PARTS_MAX})"),
        });
    }
    let start = begin(out);
    out.extend_from_slice(&group.to_le_bytes());
    out.extend_from_slice(&part.to_le_bytes());
    out.extend_from_slice(&parts.to_le_bytes());
    out.extend_from_slice(bytes);
    seal(out, start, KIND_PART)
}

/// Encodes one message as `PART` frames appended to `out`.
pub fn encode_parts(group: u64, msg: &Message, out: &mut Vec<u8>) -> Result<(), WireError> {
    let encoded = msg.write_to_bytes().map_err(|e| WireError::Malformed {
        kind: "part",
        why: e.to_string(),
    })?;
    let parts = encoded.len().div_ceil(PART_BYTES).max(1);
    let parts = u32::try_from(parts)
        .ok()
        .filter(|&n| n <= PARTS_MAX)
        .ok_or(WireError::TooLarge(encoded.len()))?;
    for (i, piece) in encoded.chunks(PART_BYTES).enumerate() {
        encode_part(group, i as u32, parts, piece, out)?;
    }
    Ok(())
}

/// Joins the pieces of one message as they arrive on a connection.
#[derive(Default)]
pub struct Joiner {
    /// The group, the number of pieces, the next piece expected, the bytes so far.
    open: Option<(u64, u32, u32, Vec<u8>)>,
}

impl Joiner {
    /// Takes a piece; the whole message once its last piece came. A piece out of order, of
    /// another group, or a message that does not parse is an error (the connection ends).
    pub fn push(
        &mut self,
        group: u64,
        part: u32,
        parts: u32,
        bytes: &[u8],
    ) -> Result<Option<(u64, Message)>, WireError> {
        let bad = |why: &str| WireError::Malformed {
            kind: "part",
            why: why.to_owned(),
        };
        if part == 0 {
            if self.open.is_some() {
                return Err(bad("a message begun before the last one ended"));
            }
            self.open = Some((group, parts, 0, Vec::new()));
        }
        let Some((g, n, next, buf)) = self.open.as_mut() else {
            return Err(bad("a piece of a message never begun"));
        };
        if (*g, *n, *next) != (group, parts, part) {
            return Err(bad("a piece out of order"));
        }
        buf.extend_from_slice(bytes);
        *next += 1;
        if *next < *n {
            return Ok(None);
        }
        let (g, _, _, buf) = self.open.take().expect("open");
        let msg = Message::parse_from_bytes(&buf)
            .map_err(|e| bad(&format!("a message that does not parse: {e}")))?;
        Ok(Some((g, msg)))
    }
}

/// Appends a `RAFT` frame of `msgs` to `out` (what [`encode`] does for [`Frame::Raft`],
/// without owning the messages).
pub fn encode_raft(msgs: &[(u64, Message)], out: &mut Vec<u8>) -> Result<(), WireError> {
    let start = begin(out);
    out.extend_from_slice(&(msgs.len() as u32).to_le_bytes());
    for (group, msg) in msgs {
        out.extend_from_slice(&group.to_le_bytes());
        let len_at = out.len();
        out.extend_from_slice(&[0u8; 4]);
        if let Err(e) = msg.write_to_vec(out) {
            out.truncate(start);
            return Err(WireError::Malformed {
                kind: "raft",
                why: e.to_string(),
            });
        }
        let len = (out.len() - len_at - 4) as u32;
        out[len_at..len_at + 4].copy_from_slice(&len.to_le_bytes());
    }
    seal(out, start, KIND_RAFT)
}

/// Reserves a header; returns where the frame starts.
fn begin(out: &mut Vec<u8>) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER_BYTES]);
    start
}

/// Fills in the header of the frame at `start`, whose body is the rest of `out`.
fn seal(out: &mut Vec<u8>, start: usize, kind: u8) -> Result<(), WireError> {
    let body_len = out.len() - start - HEADER_BYTES;
    if body_len > FRAME_BYTES_MAX {
        out.truncate(start);
        return Err(WireError::TooLarge(body_len));
    }
    let sum = xxh3_64(&out[start + HEADER_BYTES..]);
    let header = &mut out[start..start + HEADER_BYTES];
    header[..2].copy_from_slice(&MAGIC);
    header[2] = VERSION;
    header[3] = kind;
    header[4..8].copy_from_slice(&(body_len as u32).to_le_bytes());
    header[8..16].copy_from_slice(&sum.to_le_bytes());
    Ok(())
}

/// Reads frames from a byte stream that arrives in pieces.
#[derive(Default)]
pub struct Decoder {
    buf: BytesMut,
}

impl Decoder {
    /// A decoder with nothing read.
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// Adds bytes read from the stream.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes held that are not yet a whole frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next whole frame, `None` if more bytes are needed. After an error the stream is
    /// not to be read further.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, WireError> {
        if self.buf.len() < HEADER_BYTES {
            // What there is of the header is checked already, so a stream of garbage is
            // refused at its first bytes, not after a header's worth.
            return check_partial_header(&self.buf).map(|()| None);
        }
        let h = &self.buf[..HEADER_BYTES];
        check_partial_header(h)?;
        let kind = h[3];
        let len = u32::from_le_bytes(h[4..8].try_into().expect("4 bytes")) as usize;
        let sum = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
        if len > FRAME_BYTES_MAX {
            return Err(WireError::TooLarge(len));
        }
        if self.buf.len() < HEADER_BYTES + len {
            return Ok(None);
        }
        self.buf.advance(HEADER_BYTES);
        let body = self.buf.split_to(len);
        if xxh3_64(&body) != sum {
            return Err(WireError::Checksum);
        }
        decode_body(kind, &body).map(Some)
    }
}

fn check_partial_header(h: &[u8]) -> Result<(), WireError> {
    let magic_seen = h.len().min(2);
    if h[..magic_seen] != MAGIC[..magic_seen] {
        let mut m = [0u8; 2];
        m[..magic_seen].copy_from_slice(&h[..magic_seen]);
        return Err(WireError::Magic(m));
    }
    if let Some(&v) = h.get(2) {
        if v != VERSION {
            return Err(WireError::Version(v));
        }
    }
    if let Some(&k) = h.get(3) {
        if !(KIND_HELLO..=KIND_BLOB_DONE).contains(&k) {
            return Err(WireError::Kind(k));
        }
    }
    Ok(())
}

fn decode_body(kind: u8, body: &[u8]) -> Result<Frame, WireError> {
    let name = match kind {
        KIND_HELLO => "hello",
        KIND_RAFT => "raft",
        KIND_PART => "part",
        KIND_FETCH => "fetch",
        KIND_EVENTS => "events",
        KIND_CALL => "call",
        KIND_NOTICE => "notice",
        KIND_BLOB_PIECE => "blob piece",
        KIND_BLOB_GET => "blob get",
        KIND_BLOB_DONE => "blob done",
        _ => "answer",
    };
    let bad = |why: &str| WireError::Malformed {
        kind: name,
        why: why.to_owned(),
    };
    let mut r = body;
    let frame = match kind {
        KIND_HELLO => {
            let node = take_u64(&mut r).ok_or_else(|| bad("short"))?;
            let cluster = take_u64(&mut r).ok_or_else(|| bad("short"))?;
            Frame::Hello { node, cluster }
        }
        KIND_PART => {
            let group = take_u64(&mut r).ok_or_else(|| bad("short"))?;
            let part = take_u32(&mut r).ok_or_else(|| bad("short"))?;
            let parts = take_u32(&mut r).ok_or_else(|| bad("short"))?;
            if part >= parts || parts > PARTS_MAX {
                return Err(bad("a piece number past the pieces, or too many pieces"));
            }
            if r.len() > PART_BYTES {
                return Err(bad("a piece larger than a piece may be"));
            }
            let bytes = std::mem::take(&mut r).to_vec();
            Frame::Part {
                group,
                part,
                parts,
                bytes,
            }
        }
        KIND_FETCH => {
            let group = take_u64(&mut r).ok_or_else(|| bad("short"))?;
            let from = take_u64(&mut r).ok_or_else(|| bad("short"))?;
            let to = take_u64(&mut r).ok_or_else(|| bad("short"))?;
            Frame::Fetch { group, from, to }
        }
        KIND_EVENTS => {
            let group = take_u64(&mut r).ok_or_else(|| bad("short"))?;
            let from = take_u64(&mut r).ok_or_else(|| bad("short"))?;
            if crate::event_log::decode_batch(r).is_none() {
                return Err(bad("events that are not a batch"));
            }
            let batch = std::mem::take(&mut r).to_vec();
            Frame::Events { group, from, batch }
        }
        KIND_CALL => Frame::Call(std::mem::take(&mut r).to_vec()),
        KIND_ANSWER => Frame::Answer(std::mem::take(&mut r).to_vec()),
        KIND_NOTICE => Frame::Notice(std::mem::take(&mut r).to_vec()),
        KIND_BLOB_PIECE => {
            let hash = take_hash(&mut r).ok_or_else(|| bad("short"))?;
            let len = take_u64(&mut r).ok_or_else(|| bad("short"))?;
            let offset = take_u64(&mut r).ok_or_else(|| bad("short"))?;
            let fits = offset
                .checked_add(r.len() as u64)
                .is_some_and(|end| end <= len);
            if r.len() > PART_BYTES || len > BLOB_BYTES_MAX || !fits {
                return Err(bad("a piece past its blob, or larger than a piece may be"));
            }
            let bytes = std::mem::take(&mut r).to_vec();
            Frame::BlobPiece {
                hash,
                len,
                offset,
                bytes,
            }
        }
        KIND_BLOB_GET => {
            let hash = take_hash(&mut r).ok_or_else(|| bad("short"))?;
            let len = take_u64(&mut r).ok_or_else(|| bad("short"))?;
            Frame::BlobGet { hash, len }
        }
        KIND_BLOB_DONE => {
            let hash = take_hash(&mut r).ok_or_else(|| bad("short"))?;
            let (&code, rest) = r.split_first().ok_or_else(|| bad("short"))?;
            r = rest;
            let status = match code {
                0 => BlobStatus::Stored,
                1 => BlobStatus::Missing,
                2 => BlobStatus::Failed,
                _ => return Err(bad("an unknown status")),
            };
            Frame::BlobDone { hash, status }
        }
        _ => {
            let count = take_u32(&mut r).ok_or_else(|| bad("no count"))? as usize;
            // Each message takes at least 12 bytes, so a count the body cannot back is
            // refused before anything is allocated for it.
            if count > r.len() / 12 {
                return Err(bad("a count larger than the body"));
            }
            let mut msgs = Vec::with_capacity(count);
            for _ in 0..count {
                let group = take_u64(&mut r).ok_or_else(|| bad("short"))?;
                let len = take_u32(&mut r).ok_or_else(|| bad("short"))? as usize;
                let (bytes, rest) = r
                    .split_at_checked(len)
                    .ok_or_else(|| bad("a message past the body"))?;
                let msg = Message::parse_from_bytes(bytes)
                    .map_err(|e| bad(&format!("a message that does not parse: {e}")))?;
                msgs.push((group, msg));
                r = rest;
            }
            Frame::Raft(msgs)
        }
    };
    if !r.is_empty() {
        return Err(bad("bytes after the last field"));
    }
    Ok(frame)
}

fn take_u64(r: &mut &[u8]) -> Option<u64> {
    let (head, rest) = r.split_at_checked(8)?;
    *r = rest;
    Some(u64::from_le_bytes(head.try_into().ok()?))
}

fn take_hash(r: &mut &[u8]) -> Option<[u8; 32]> {
    let (head, rest) = r.split_at_checked(32)?;
    *r = rest;
    head.try_into().ok()
}

fn take_u32(r: &mut &[u8]) -> Option<u32> {
    let (head, rest) = r.split_at_checked(4)?;
    *r = rest;
    Some(u32::from_le_bytes(head.try_into().ok()?))
}

/// The fuzz target's check (`fuzz/fuzz_targets/node_frame.rs`), also replayed on stable:
/// the input is fed to a decoder in pieces whose sizes its first byte picks; nothing
/// panics, and every frame accepted re-encodes to a frame that decodes equal. Also tried
/// with a right checksum put into the input's header, so the fuzzer gets past it.
pub fn fuzz_decode(data: &[u8]) {
    let Some((&step, rest)) = data.split_first() else {
        return;
    };
    let mut inputs = vec![rest.to_vec()];
    if rest.len() >= HEADER_BYTES {
        let mut fixed = rest.to_vec();
        let sum = xxh3_64(&fixed[HEADER_BYTES..]);
        let len = (fixed.len() - HEADER_BYTES) as u32;
        fixed[4..8].copy_from_slice(&len.to_le_bytes());
        fixed[8..16].copy_from_slice(&sum.to_le_bytes());
        inputs.push(fixed);
    }
    for input in inputs {
        let mut decoder = Decoder::new();
        let piece = usize::from(step).max(1);
        'feed: for chunk in input.chunks(piece) {
            decoder.extend(chunk);
            loop {
                match decoder.next_frame() {
                    Ok(Some(frame)) => {
                        let mut out = Vec::new();
                        encode(&frame, &mut out).expect("an accepted frame encodes");
                        let mut again = Decoder::new();
                        again.extend(&out);
                        let back = again.next_frame().expect("a re-encoded frame decodes");
                        assert_eq!(again.buffered(), 0);
                        assert_eq!(
                            back.as_ref().map(raft_fields),
                            Some(raft_fields(&frame)),
                            "a re-encoded frame decodes to what was encoded"
                        );
                    }
                    Ok(None) => break,
                    Err(_) => break 'feed,
                }
            }
        }
    }
}

/// What Raft reads of a frame. Protobuf keeps fields it does not know and merges repeated
/// sub-messages, so two messages that carry the same Raft fields can differ in what else
/// they hold; that is what the fuzz check compares.
fn raft_fields(frame: &Frame) -> String {
    match frame {
        Frame::Hello { node, cluster } => format!("hello {node} {cluster}"),
        Frame::Part {
            group,
            part,
            parts,
            bytes,
        } => format!("part {group} {part}/{parts} {bytes:?}"),
        Frame::Fetch { group, from, to } => format!("fetch {group} {from}..{to}"),
        Frame::Call(bytes) => format!("call {bytes:?}"),
        Frame::Answer(bytes) => format!("answer {bytes:?}"),
        Frame::Notice(bytes) => format!("notice {bytes:?}"),
        Frame::Events { group, from, batch } => format!("events {group} {from} {batch:?}"),
        Frame::BlobPiece {
            hash,
            len,
            offset,
            bytes,
        } => format!("blob piece {hash:?} {len} {offset} {bytes:?}"),
        Frame::BlobGet { hash, len } => format!("blob get {hash:?} {len}"),
        Frame::BlobDone { hash, status } => format!("blob done {hash:?} {status:?}"),
        Frame::Raft(msgs) => {
            let mut out = String::from("raft");
            for (group, m) in msgs {
                let meta = m.get_snapshot().get_metadata();
                out += &format!(
                    " [{group} {:?} {}>{} t{} lt{} i{} c{} ct{} r{} h{} s{}/{}/{:?}/{}",
                    m.get_msg_type(),
                    m.from,
                    m.to,
                    m.term,
                    m.log_term,
                    m.index,
                    m.commit,
                    m.commit_term,
                    m.reject,
                    m.reject_hint,
                    meta.index,
                    meta.term,
                    meta.get_conf_state().voters,
                    m.get_snapshot().data.len(),
                );
                for e in m.get_entries() {
                    out += &format!(
                        " e{}/{}/{:?}/{:?}",
                        e.index,
                        e.term,
                        e.get_entry_type(),
                        &e.data[..]
                    );
                }
                out += "]";
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::eraftpb::{Entry, MessageType};

    fn append(to: u64, n: u64) -> Message {
        Message {
            msg_type: MessageType::MsgAppend,
            to,
            from: 1,
            term: 3,
            index: n,
            entries: vec![Entry {
                index: n + 1,
                term: 3,
                data: vec![7u8; 300].into(),
                ..Entry::default()
            }]
            .into(),
            ..Message::default()
        }
    }

    fn frames() -> Vec<Frame> {
        vec![
            Frame::Hello {
                node: 2,
                cluster: 0xfeed,
            },
            Frame::Raft(vec![(7, append(2, 10)), (8, append(2, 11))]),
            Frame::Raft(Vec::new()),
            Frame::Fetch {
                group: 3,
                from: 1_000,
                to: 5_000,
            },
            Frame::Events {
                group: 3,
                from: 1_000,
                batch: crate::event_log::encode_batch(&[
                    chorus_log::Entry {
                        timestamp_us: 5,
                        payload: b"one",
                    },
                    chorus_log::Entry {
                        timestamp_us: 6,
                        payload: b"",
                    },
                ]),
            },
            Frame::Events {
                group: 3,
                from: 9,
                batch: crate::event_log::encode_batch(&[]),
            },
            Frame::Call(b"{\"method\":\"POST\"}".to_vec()),
            Frame::Notice(b"{\"typing\":1}".to_vec()),
            Frame::Answer(Vec::new()),
            Frame::BlobPiece {
                hash: [7; 32],
                len: 10,
                offset: 4,
                bytes: b"abc".to_vec(),
            },
            Frame::BlobGet {
                hash: [9; 32],
                len: 1 << 20,
            },
            Frame::BlobDone {
                hash: [9; 32],
                status: BlobStatus::Missing,
            },
        ]
    }

    #[test]
    fn a_blob_goes_in_pieces_and_comes_back_whole() {
        let blob: Vec<u8> = (0..(2 * PART_BYTES + 5) as u32).map(|i| i as u8).collect();
        let hash = [3u8; 32];
        let mut d = Decoder::new();
        for piece in blob_pieces(&hash, &blob) {
            d.extend(&piece.unwrap());
        }
        let mut joiner = BlobJoiner::default();
        let (mut whole, mut pieces) = (None, 0);
        while let Some(f) = d.next_frame().unwrap() {
            let Frame::BlobPiece {
                hash,
                len,
                offset,
                bytes,
            } = f
            else {
                panic!("a blob piece");
            };
            pieces += 1;
            if let Some(b) = joiner.push(hash, len, offset, &bytes).unwrap() {
                whole = Some(b);
            }
        }
        assert_eq!(pieces, 3);
        assert_eq!(whole, Some((hash, blob)));
        // A blob of no bytes is one empty piece.
        let empty: Vec<_> = blob_pieces(&hash, &[]).collect();
        assert_eq!(empty.len(), 1);
        let mut d = Decoder::new();
        d.extend(empty[0].as_ref().unwrap());
        let Some(Frame::BlobPiece {
            len: 0,
            offset: 0,
            bytes,
            ..
        }) = d.next_frame().unwrap()
        else {
            panic!("an empty piece");
        };
        assert!(bytes.is_empty());
        // A piece out of order, of another blob, or of none begun ends the connection.
        let mut j = BlobJoiner::default();
        assert!(j.push(hash, 10, 4, b"x").is_err());
        let mut j = BlobJoiner::default();
        j.push(hash, 10, 0, b"abc").unwrap();
        assert!(j.push(hash, 10, 4, b"x").is_err());
        let mut j = BlobJoiner::default();
        j.push(hash, 10, 0, b"abc").unwrap();
        assert!(j.push([4; 32], 10, 3, b"x").is_err());
        let mut j = BlobJoiner::default();
        j.push(hash, 10, 0, b"abc").unwrap();
        assert!(j.push(hash, 10, 0, b"abc").is_err());
        // A piece past its blob's end, or of a blob over the limit, is refused at both ends.
        assert!(encode_blob_piece(&hash, 2, 0, b"abc", &mut Vec::new()).is_err());
        assert!(encode_blob_piece(&hash, BLOB_BYTES_MAX + 1, 0, b"", &mut Vec::new()).is_err());
        let mut out = Vec::new();
        encode_blob_piece(&hash, 3, 0, b"abc", &mut out).unwrap();
        out[HEADER_BYTES + 32] = 2; // the length, now shorter than the piece
        let sum = xxh3_64(&out[HEADER_BYTES..]);
        out[8..16].copy_from_slice(&sum.to_le_bytes());
        let mut d = Decoder::new();
        d.extend(&out);
        assert!(d.next_frame().is_err());
    }

    #[test]
    fn events_that_are_not_a_batch_are_refused() {
        let mut out = Vec::new();
        let frame = Frame::Events {
            group: 1,
            from: 0,
            batch: vec![2, 0, 0, 0, 1],
        };
        encode(&frame, &mut out).unwrap();
        let mut d = Decoder::new();
        d.extend(&out);
        assert!(matches!(
            d.next_frame(),
            Err(WireError::Malformed { kind: "events", .. })
        ));
    }

    #[test]
    fn frames_round_trip_whole_and_byte_by_byte() {
        let mut stream = Vec::new();
        for f in frames() {
            encode(&f, &mut stream).unwrap();
        }
        let mut d = Decoder::new();
        d.extend(&stream);
        let mut got = Vec::new();
        while let Some(f) = d.next_frame().unwrap() {
            got.push(f);
        }
        assert_eq!(got, frames());
        let mut d = Decoder::new();
        let mut got = Vec::new();
        for b in &stream {
            d.extend(std::slice::from_ref(b));
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, frames());
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn bad_streams_are_refused_with_a_reason() {
        let mut good = Vec::new();
        encode(&frames()[1], &mut good).unwrap();
        let refuse = |bytes: &[u8]| {
            let mut d = Decoder::new();
            d.extend(bytes);
            d.next_frame().unwrap_err()
        };
        assert_eq!(refuse(b"GET / HTTP/1.1\r\n"), WireError::Magic(*b"GE"));
        assert_eq!(refuse(b"X"), WireError::Magic(*b"X\0"));
        let mut v = good.clone();
        v[2] = 9;
        assert_eq!(refuse(&v[..3]), WireError::Version(9));
        let mut k = good.clone();
        k[3] = 77;
        assert_eq!(refuse(&k), WireError::Kind(77));
        let mut big = good.clone();
        big[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            refuse(&big[..HEADER_BYTES]),
            WireError::TooLarge(u32::MAX as usize)
        );
        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert_eq!(refuse(&flipped), WireError::Checksum);
        // A count the body cannot back, with a right checksum.
        let mut body = 1_000_000u32.to_le_bytes().to_vec();
        body.extend_from_slice(&[0u8; 12]);
        let mut lying = MAGIC.to_vec();
        lying.extend_from_slice(&[VERSION, KIND_RAFT]);
        lying.extend_from_slice(&(body.len() as u32).to_le_bytes());
        lying.extend_from_slice(&xxh3_64(&body).to_le_bytes());
        lying.extend_from_slice(&body);
        assert!(matches!(refuse(&lying), WireError::Malformed { .. }));
        // A partial frame is not an error, only not yet a frame.
        let mut d = Decoder::new();
        d.extend(&good[..good.len() - 1]);
        assert_eq!(d.next_frame(), Ok(None));
    }

    #[test]
    fn a_large_message_goes_in_pieces_and_comes_back_whole() {
        let mut snap = Message {
            msg_type: MessageType::MsgSnapshot,
            to: 2,
            from: 1,
            term: 5,
            ..Message::default()
        };
        snap.mut_snapshot().data = (0..10_000_000u32)
            .map(|i| i as u8)
            .collect::<Vec<u8>>()
            .into();
        snap.mut_snapshot().mut_metadata().index = 77;
        let mut stream = Vec::new();
        encode_parts(9, &snap, &mut stream).unwrap();
        let mut d = Decoder::new();
        d.extend(&stream);
        let mut joiner = Joiner::default();
        let mut whole = None;
        let mut pieces = 0;
        while let Some(f) = d.next_frame().unwrap() {
            let Frame::Part {
                group,
                part,
                parts,
                bytes,
            } = f
            else {
                panic!("a part frame");
            };
            assert!(bytes.len() <= PART_BYTES);
            pieces += 1;
            if let Some(m) = joiner.push(group, part, parts, &bytes).unwrap() {
                whole = Some(m);
            }
        }
        assert_eq!(pieces, 3);
        assert_eq!(whole, Some((9, snap)));
        // Out of order, or a piece of nothing begun, ends the connection.
        let mut j = Joiner::default();
        assert!(j.push(1, 1, 3, b"x").is_err());
        let mut j = Joiner::default();
        j.push(1, 0, 3, b"x").unwrap();
        assert!(j.push(1, 2, 3, b"x").is_err());
        let mut j = Joiner::default();
        j.push(1, 0, 2, b"x").unwrap();
        assert!(j.push(2, 1, 2, b"x").is_err());
        assert!(encode_part(1, 3, 3, b"", &mut Vec::new()).is_err());
    }

    #[test]
    fn fingerprints_ignore_order_and_see_addresses() {
        let a = vec![(1, "h:1".to_owned()), (2, "h:2".to_owned())];
        let b = vec![(2, "h:2".to_owned()), (1, "h:1".to_owned())];
        let c = vec![(1, "h:1".to_owned()), (2, "h:3".to_owned())];
        assert_eq!(cluster_fingerprint(&a), cluster_fingerprint(&b));
        assert_ne!(cluster_fingerprint(&a), cluster_fingerprint(&c));
    }
}
