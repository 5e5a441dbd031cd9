//! Connection IDs that name the shard owning their connection, and the routing of
//! datagrams by them.
//!
//! Every shard binds the QUIC address with `SO_REUSEPORT`, and the kernel hands each
//! datagram to a shard by its 4-tuple. A client that migrates (a new address or port) thus
//! lands on another shard, whose endpoint does not know its connection. The connection IDs
//! a shard issues therefore carry its index, so that any shard can forward such a datagram
//! to the owner.
//!
//! The index is not in the clear: RFC 9000 §5.1 asks that an observer cannot link the IDs of
//! one connection. An ID is 6 random bytes, the shard index masked with a byte of a keyed
//! hash of those 6 bytes, and a second byte of that hash that lets a shard tell its own IDs
//! from random ones (one false match in 256). The key is secret and the same on every
//! shard of a process.

use quinn_proto::{ConnectionId, ConnectionIdGenerator, InvalidCid};
use std::hash::BuildHasher;
use std::time::Duration;

/// The length of every connection ID the server issues.
pub const CID_LEN: usize = 8;
/// Random bytes at the front of an ID.
const RANDOM_LEN: usize = 6;
/// Shards an ID can name: one byte.
pub const SHARDS_MAX: usize = 256;

/// The process's key for connection IDs: every shard gets a copy.
#[derive(Clone, Debug)]
pub struct CidKey(std::collections::hash_map::RandomState);

impl CidKey {
    /// A fresh random key.
    pub fn new() -> CidKey {
        CidKey(std::collections::hash_map::RandomState::new())
    }

    fn mask(&self, random: &[u8]) -> [u8; 2] {
        let h = self.0.hash_one(random).to_le_bytes();
        [h[0], h[1]]
    }

    /// The shard an ID of ours names, or `None` for an ID we did not issue.
    pub fn shard_of(&self, cid: &[u8]) -> Option<usize> {
        if cid.len() != CID_LEN {
            return None;
        }
        let [mask, check] = self.mask(&cid[..RANDOM_LEN]);
        (cid[RANDOM_LEN + 1] == check).then_some(usize::from(cid[RANDOM_LEN] ^ mask))
    }
}

impl Default for CidKey {
    fn default() -> CidKey {
        CidKey::new()
    }
}

/// Issues connection IDs naming one shard.
pub struct ShardCids {
    key: CidKey,
    shard: u8,
}

impl ShardCids {
    /// IDs naming `shard` (below [`SHARDS_MAX`]).
    pub fn new(key: CidKey, shard: usize) -> ShardCids {
        let shard = u8::try_from(shard).expect("a QUIC shard index fits a byte");
        ShardCids { key, shard }
    }
}

impl ConnectionIdGenerator for ShardCids {
    fn generate_cid(&mut self) -> ConnectionId {
        let mut id = [0u8; CID_LEN];
        rand::Rng::fill(&mut rand::thread_rng(), &mut id[..RANDOM_LEN]);
        let [mask, check] = self.key.mask(&id[..RANDOM_LEN]);
        id[RANDOM_LEN] = self.shard ^ mask;
        id[RANDOM_LEN + 1] = check;
        ConnectionId::new(&id)
    }

    fn validate(&self, cid: &ConnectionId) -> Result<(), InvalidCid> {
        match self.key.shard_of(cid) {
            Some(shard) if shard == usize::from(self.shard) => Ok(()),
            _ => Err(InvalidCid),
        }
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// Where a datagram goes: the shard that received it, or the shard its destination ID
/// names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Handle here: a new connection's first packets (their destination ID is the
    /// client's, and the kernel keeps them on one shard by their 4-tuple), or anything
    /// not ours, which the endpoint answers or drops.
    Here,
    /// Forward to this shard.
    Shard(usize),
}

/// Decides where a datagram goes from its first packet's header, without decrypting it.
pub fn route(key: &CidKey, datagram: &[u8], here: usize, shards: usize) -> Route {
    let Some(&first) = datagram.first() else {
        return Route::Here;
    };
    let dcid = if first & 0x80 != 0 {
        // Long header: version (4), then the destination ID's length and the ID. Initial
        // (type 0) and 0-RTT (type 1) packets carry the client's chosen ID.
        let kind = (first >> 4) & 0x03;
        if kind <= 1 {
            return Route::Here;
        }
        let Some(&len) = datagram.get(5) else {
            return Route::Here;
        };
        datagram.get(6..6 + usize::from(len))
    } else {
        // Short header: the ID follows the first byte, at the length we issue.
        datagram.get(1..1 + CID_LEN)
    };
    match dcid.and_then(|cid| key.shard_of(cid)) {
        Some(shard) if shard != here && shard < shards => Route::Shard(shard),
        _ => Route::Here,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // IDs name their shard to anyone with the key, are recognised as ours, differ every
    // time, and do not show the shard in the clear.
    #[test]
    fn ids_carry_their_shard() {
        let key = CidKey::new();
        let mut gen = ShardCids::new(key.clone(), 3);
        let ids: Vec<ConnectionId> = (0..64).map(|_| gen.generate_cid()).collect();
        for id in &ids {
            assert_eq!(id.len(), CID_LEN);
            assert_eq!(key.shard_of(id), Some(3));
            assert!(gen.validate(id).is_ok());
        }
        let shard_bytes: std::collections::BTreeSet<u8> = ids.iter().map(|id| id[6]).collect();
        assert!(shard_bytes.len() > 8, "the shard byte is masked");
        let other = ShardCids::new(CidKey::new(), 3);
        let foreign = ids.iter().filter(|id| other.validate(id).is_ok()).count();
        assert!(foreign < 8, "another key recognises {foreign} of 64");
    }

    // Short-header packets go to the shard their ID names; a new connection's Initial
    // stays where it arrived; garbage stays too.
    #[test]
    fn routing() {
        let key = CidKey::new();
        let id = ShardCids::new(key.clone(), 1).generate_cid();
        let mut short = vec![0x40];
        short.extend_from_slice(&id);
        short.extend_from_slice(&[0; 20]);
        assert_eq!(route(&key, &short, 0, 2), Route::Shard(1));
        assert_eq!(route(&key, &short, 1, 2), Route::Here);
        assert_eq!(route(&key, &short, 0, 1), Route::Here, "no such shard");
        let mut initial = vec![0xc0, 0, 0, 0, 1, 8];
        initial.extend_from_slice(&id);
        assert_eq!(route(&key, &initial, 0, 2), Route::Here);
        let mut handshake = vec![0xe0, 0, 0, 0, 1, 8];
        handshake.extend_from_slice(&id);
        assert_eq!(route(&key, &handshake, 0, 2), Route::Shard(1));
        for garbage in [&[][..], &[0x40], &[0xff, 1, 2], &[0xe0, 0, 0, 0, 1, 200]] {
            assert_eq!(route(&key, garbage, 0, 2), Route::Here);
        }
    }
}
