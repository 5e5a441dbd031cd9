//! The Raft state of one group that is not in its log: the hard state (term, vote,
//! commit), the membership, where the latest snapshot ends, and that snapshot's data when
//! it is small ([`INLINE_SNAPSHOT_BYTES`]; a snapshot of a chat partition is its log
//! position, some twenty bytes).
//!
//! It lives in one small file, `raft.state`, of two fixed slots. Each write goes to the
//! slot the last write did not use, with a sequence number and a checksum, and is then
//! fsynced: one positioned write and one `fdatasync`, no rename. A crash can tear only the
//! slot being written; the other still holds the previous state, which was durable before
//! this write began. Opening takes the valid slot with the higher sequence number.

use chorus_log::{Storage, StorageFile};
use protobuf::Message as _;
use raft::eraftpb::{ConfState, HardState};
use std::io;
use xxhash_rust::xxh3::xxh3_64;

/// The file's name in the group's state directory.
pub const STATE_FILE: &str = "raft.state";
/// Bytes of one slot; the file is two of them.
pub const SLOT_BYTES: usize = 4096;
const MAGIC: &[u8; 4] = b"CRST";
/// 2: the snapshot's data may be inline. A slot of version 1 has none (its snapshot is in
/// a file) and is still read.
const VERSION: u16 = 2;
/// The largest snapshot kept in the state's slots rather than in a file of its own.
pub const INLINE_SNAPSHOT_BYTES: usize = 1024;
/// Magic, version, body length.
const HEADER_BYTES: usize = 4 + 2 + 4;
const CHECKSUM_BYTES: usize = 8;

/// Everything the file holds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GroupState {
    /// Term, vote and commit index.
    pub hard: HardState,
    /// The membership as of the last entry applied. Written with the state, but a group
    /// that opens starts from `snapshot_conf`, since it applies again from the snapshot.
    pub conf: ConfState,
    /// The index the latest snapshot covers (0: none). The log holds entries after it.
    pub snapshot_index: u64,
    /// The term of the entry at `snapshot_index`.
    pub snapshot_term: u64,
    /// The membership at `snapshot_index`.
    pub snapshot_conf: ConfState,
    /// The snapshot's data, if it is kept here (at most [`INLINE_SNAPSHOT_BYTES`]);
    /// otherwise it is in a file of its own.
    pub snapshot_inline: Option<Vec<u8>>,
}

impl GroupState {
    fn encode(&self, seq: u64) -> io::Result<Vec<u8>> {
        let conf = self.conf.write_to_bytes().map_err(io::Error::other)?;
        let snapshot_conf = self
            .snapshot_conf
            .write_to_bytes()
            .map_err(io::Error::other)?;
        let mut body = Vec::with_capacity(64 + conf.len() + snapshot_conf.len());
        for n in [
            seq,
            self.hard.term,
            self.hard.vote,
            self.hard.commit,
            self.snapshot_index,
            self.snapshot_term,
        ] {
            body.extend_from_slice(&n.to_le_bytes());
        }
        for bytes in [&conf, &snapshot_conf] {
            body.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            body.extend_from_slice(bytes);
        }
        body.push(u8::from(self.snapshot_inline.is_some()));
        if let Some(bytes) = &self.snapshot_inline {
            body.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            body.extend_from_slice(bytes);
        }
        let mut slot = Vec::with_capacity(HEADER_BYTES + body.len() + CHECKSUM_BYTES);
        slot.extend_from_slice(MAGIC);
        slot.extend_from_slice(&VERSION.to_le_bytes());
        slot.extend_from_slice(&(body.len() as u32).to_le_bytes());
        slot.extend_from_slice(&body);
        let sum = xxh3_64(&slot);
        slot.extend_from_slice(&sum.to_le_bytes());
        if slot.len() > SLOT_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a group's state takes {} bytes, more than a slot's {SLOT_BYTES}",
                    slot.len()
                ),
            ));
        }
        Ok(slot)
    }

    /// The state and its sequence number, if `slot` holds a whole, checksummed one.
    fn decode(slot: &[u8]) -> Option<(u64, GroupState)> {
        if slot.len() < HEADER_BYTES || &slot[..4] != MAGIC {
            return None;
        }
        let version = u16::from_le_bytes(slot[4..6].try_into().ok()?);
        if !(1..=VERSION).contains(&version) {
            return None;
        }
        let len = u32::from_le_bytes(slot[6..10].try_into().ok()?) as usize;
        let end = HEADER_BYTES.checked_add(len)?;
        let sum_end = end.checked_add(CHECKSUM_BYTES)?;
        if sum_end > slot.len() {
            return None;
        }
        let sum = u64::from_le_bytes(slot[end..sum_end].try_into().ok()?);
        if xxh3_64(&slot[..end]) != sum {
            return None;
        }
        let mut body = Reader(&slot[HEADER_BYTES..end]);
        let seq = body.u64()?;
        let hard = HardState {
            term: body.u64()?,
            vote: body.u64()?,
            commit: body.u64()?,
            ..HardState::default()
        };
        let snapshot_index = body.u64()?;
        let snapshot_term = body.u64()?;
        let conf = ConfState::parse_from_bytes(body.bytes()?).ok()?;
        let snapshot_conf = ConfState::parse_from_bytes(body.bytes()?).ok()?;
        let snapshot_inline = match version {
            1 => None,
            _ => match body.u8()? {
                0 => None,
                1 => Some(body.bytes()?.to_vec()),
                _ => return None,
            },
        };
        Some((
            seq,
            GroupState {
                hard,
                conf,
                snapshot_index,
                snapshot_term,
                snapshot_conf,
                snapshot_inline,
            },
        ))
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn u8(&mut self) -> Option<u8> {
        let (head, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*head)
    }

    fn u64(&mut self) -> Option<u64> {
        let (head, rest) = self.0.split_at_checked(8)?;
        self.0 = rest;
        Some(u64::from_le_bytes(head.try_into().ok()?))
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(4)?;
        let len = u32::from_le_bytes(head.try_into().ok()?) as usize;
        let (bytes, rest) = rest.split_at_checked(len)?;
        self.0 = rest;
        Some(bytes)
    }
}

/// The open state file of one group.
pub struct StateFile<F: StorageFile> {
    file: F,
    /// The sequence number of the last durable write.
    seq: u64,
}

impl<F: StorageFile> StateFile<F> {
    /// Opens the file in `dir`, or creates it holding `initial` (durably, name included).
    /// Returns the state it holds.
    pub async fn open<S: Storage<File = F>>(
        dir: &S,
        initial: &GroupState,
    ) -> io::Result<(StateFile<F>, GroupState)> {
        let names = dir.list().await?;
        if !names.iter().any(|n| n == STATE_FILE) {
            // Written under a temporary name and renamed once durable, so that the file,
            // once it has its name, always holds a valid slot.
            let tmp = format!("{STATE_FILE}.tmp");
            if names.contains(&tmp) {
                dir.remove(&tmp).await?;
            }
            let file = dir.create(&tmp).await?;
            let mut this = StateFile { file, seq: 0 };
            this.write(initial).await?;
            dir.rename(&tmp, STATE_FILE).await?;
            dir.sync_dir().await?;
            return Ok((this, initial.clone()));
        }
        let file = dir.open(STATE_FILE).await?;
        let bytes = file.read_at(0, 2 * SLOT_BYTES).await?;
        let best = bytes
            .chunks(SLOT_BYTES)
            .filter_map(GroupState::decode)
            .max_by_key(|(seq, _)| *seq);
        match best {
            Some((seq, state)) => Ok((StateFile { file, seq }, state)),
            // The file gets its name only after its first write is durable, so a file
            // without a valid slot is damage, not a torn creation.
            None => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{STATE_FILE} holds no valid state"),
            )),
        }
    }

    /// Replaces the state, durably.
    pub async fn write(&mut self, state: &GroupState) -> io::Result<()> {
        let seq = self.seq + 1;
        let mut slot = state.encode(seq)?;
        // A whole slot, so that the write covers whole blocks: the disk need not read a
        // block back to keep bytes the write does not cover.
        slot.resize(SLOT_BYTES, 0);
        let at = (seq % 2) * SLOT_BYTES as u64;
        self.file.write_at(at, &slot).await?;
        self.file.sync_data().await?;
        self.seq = seq;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(term: u64) -> GroupState {
        let mut s = GroupState::default();
        s.hard.term = term;
        s.hard.vote = 2;
        s.hard.commit = term * 10;
        s.conf.voters = vec![1, 2, 3];
        s.snapshot_index = 7;
        s.snapshot_term = 1;
        s.snapshot_conf.voters = vec![1, 2];
        s
    }

    #[test]
    fn slots_round_trip_and_refuse_damage() {
        let s = sample(4);
        let mut inline = sample(5);
        inline.snapshot_inline = Some(b"position 42".to_vec());
        for s in [s, inline] {
            let slot = s.encode(9).unwrap();
            assert_eq!(GroupState::decode(&slot), Some((9, s)));
            for i in 0..slot.len() {
                let mut bad = slot.clone();
                bad[i] ^= 0x10;
                assert_eq!(GroupState::decode(&bad), None, "byte {i} flipped");
            }
        }
        let s = sample(4);
        let slot = s.encode(9).unwrap();
        assert_eq!(GroupState::decode(&slot[..slot.len() - 1]), None);
        assert_eq!(GroupState::decode(&[0u8; SLOT_BYTES]), None);
    }

    // A slot written before snapshots could be inline (version 1: no flag after the
    // memberships) reads as a state whose snapshot is in a file.
    #[test]
    fn a_version_1_slot_is_read() {
        let s = sample(3);
        let v2 = s.encode(4).unwrap();
        // Version 1's body is version 2's without the trailing flag byte.
        let body_end = v2.len() - CHECKSUM_BYTES - 1;
        let mut v1 = v2[..body_end].to_vec();
        v1[4..6].copy_from_slice(&1u16.to_le_bytes());
        let len = (body_end - HEADER_BYTES) as u32;
        v1[6..10].copy_from_slice(&len.to_le_bytes());
        let sum = xxh3_64(&v1);
        v1.extend_from_slice(&sum.to_le_bytes());
        assert_eq!(GroupState::decode(&v1), Some((4, s)));
    }

    #[test]
    fn too_many_members_for_a_slot_is_an_error() {
        let mut s = sample(1);
        s.conf.voters = (0..2_000).collect();
        assert!(s.encode(1).is_err());
    }
}
