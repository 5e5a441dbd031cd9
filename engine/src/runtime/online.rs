//! Who has connections on which shard.
//!
//! Each shard keeps one table of every connected user ([`ShardOnline`]): every change of
//! a user's connections (on any shard) reaches every shard, which applies it there and
//! stamps it with the table's new version before handing it to its partitions. A
//! partition keeps counts only for its members (users in one of its channels), which is
//! what routing its events needs. When a user who was not a member joins, the partition
//! takes the user's counts from its shard's table, with the version they are as of, and
//! skips the changes it still has queued up to that version: they are in the counts
//! already. So with 16 partitions, a connection costs one entry per shard and one per
//! partition it is a member in, not sixteen.
//!
//! An entry is kept small: most users are connected on one shard, and such a user is one
//! 16-byte slot (the user, then the shard and the count packed in a word), with no
//! allocation of its own. A user connected on several shards has a count per shard in a
//! second map instead.

use std::collections::HashMap;

use crate::ids::UserId;

/// Connections per (user, shard); only counts above zero are held. A user is in at most
/// one of the two maps.
#[derive(Default)]
pub(crate) struct OnlineUsers {
    /// Users connected on one shard: the shard in the high 32 bits, the count in the low.
    one: HashMap<UserId, u64>,
    /// Users connected on more than one shard: a count per shard.
    many: HashMap<(UserId, u32), u32>,
    shards: u32,
}

/// A shard's table of every connected user, and how many changes it has applied.
#[derive(Default)]
pub(crate) struct ShardOnline {
    pub(crate) users: OnlineUsers,
    pub(crate) version: u64,
}

impl ShardOnline {
    pub(crate) fn new(shards: u32) -> ShardOnline {
        ShardOnline {
            users: OnlineUsers::new(shards),
            version: 0,
        }
    }

    /// Applies a change of `user`'s connections on `shard`; its version.
    pub(crate) fn apply(&mut self, user: UserId, shard: u32, delta: i32) -> u64 {
        self.users.add(user, shard, delta);
        self.version += 1;
        self.version
    }
}

fn pack(shard: u32, n: u32) -> u64 {
    (shard as u64) << 32 | n as u64
}

fn unpack(word: u64) -> (u32, u32) {
    ((word >> 32) as u32, word as u32)
}

fn apply(n: u32, delta: i32) -> u32 {
    (n as i64 + delta as i64).clamp(0, u32::MAX as i64) as u32
}

impl OnlineUsers {
    pub(crate) fn new(shards: u32) -> OnlineUsers {
        OnlineUsers {
            shards,
            ..OnlineUsers::default()
        }
    }

    /// Adds `delta` to `user`'s connections on `shard`, never below zero.
    pub(crate) fn add(&mut self, user: UserId, shard: u32, delta: i32) {
        if let Some(word) = self.one.get_mut(&user) {
            let (s, n) = unpack(*word);
            if s == shard {
                match apply(n, delta) {
                    0 => {
                        self.one.remove(&user);
                    }
                    n => *word = pack(s, n),
                }
            } else if delta > 0 {
                // A second shard: the user moves to the map of several.
                self.one.remove(&user);
                self.many.insert((user, s), n);
                self.many.insert((user, shard), delta as u32);
            }
            return;
        }
        let n = self.many.get(&(user, shard)).copied().unwrap_or(0);
        match apply(n, delta) {
            0 => {
                self.many.remove(&(user, shard));
            }
            n => {
                self.many.insert((user, shard), n);
            }
        }
        // Back to the compact form once one shard is left (or in it from the start).
        let only = {
            let mut left = self.shards_in_many(user);
            match (left.next(), left.next()) {
                (Some(only), None) => Some(only),
                _ => None,
            }
        };
        if let Some((s, n)) = only {
            self.many.remove(&(user, s));
            self.one.insert(user, pack(s, n));
        }
    }

    fn shards_in_many(&self, user: UserId) -> impl Iterator<Item = (u32, u32)> + '_ {
        (0..self.shards).filter_map(move |s| self.many.get(&(user, s)).map(|n| (s, *n)))
    }

    /// Drops everything held of `user`.
    pub(crate) fn forget(&mut self, user: UserId) {
        if self.one.remove(&user).is_none() {
            for s in 0..self.shards {
                self.many.remove(&(user, s));
            }
        }
    }

    /// Whether `user` has a connection on any shard.
    pub(crate) fn is_online(&self, user: UserId) -> bool {
        self.shards_of(user).next().is_some()
    }

    /// The shards where `user` has connections, each with how many, in shard order.
    pub(crate) fn shards_of(&self, user: UserId) -> impl Iterator<Item = (u32, u32)> + '_ {
        let one = self.one.get(&user).map(|w| unpack(*w));
        let many = if one.is_some() { 0 } else { self.shards };
        one.into_iter()
            .chain((0..many).filter_map(move |s| self.many.get(&(user, s)).map(|n| (s, *n))))
    }

    /// Every (user, shard, connections) held, in no particular order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (UserId, u32, u32)> + '_ {
        let one = self.one.iter().map(|(u, w)| {
            let (s, n) = unpack(*w);
            (*u, s, n)
        });
        one.chain(self.many.iter().map(|((u, s), n)| (*u, *s, *n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shards(t: &OnlineUsers, u: UserId) -> Vec<(u32, u32)> {
        t.shards_of(u).collect()
    }

    #[test]
    fn counts_per_shard_and_forgets_a_user_at_zero() {
        let mut t = OnlineUsers::new(3);
        let u = UserId(7);
        assert!(!t.is_online(u));
        t.add(u, 2, 1);
        assert_eq!(shards(&t, u), vec![(2, 1)]);
        t.add(u, 0, 1);
        t.add(u, 2, 1);
        assert!(t.is_online(u));
        assert_eq!(shards(&t, u), vec![(0, 1), (2, 2)]);
        t.add(u, 2, -1);
        t.add(u, 0, -1);
        assert_eq!(shards(&t, u), vec![(2, 1)]);
        // Back in the compact form, where a close on another shard changes nothing.
        assert_eq!((t.one.len(), t.many.len()), (1, 0));
        t.add(u, 1, -1);
        assert_eq!(shards(&t, u), vec![(2, 1)]);
        // A late or repeated close never goes below zero, nor leaves an entry behind.
        t.add(u, 2, -1);
        t.add(u, 2, -1);
        assert!(!t.is_online(u));
        assert_eq!(t.iter().count(), 0);
        assert!(!t.is_online(UserId(8)));
    }

    #[test]
    fn agrees_with_a_plain_count_per_shard() {
        // Every sequence of opens and closes over 3 users and 3 shards, up to a length, in
        // a fixed pseudo-random order, against the obvious table.
        let mut t = OnlineUsers::new(3);
        let mut plain = std::collections::BTreeMap::<(u64, u32), u32>::new();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let user = UserId(x % 3);
            let shard = ((x >> 8) % 3) as u32;
            let delta = if (x >> 16) % 5 < 3 { 1 } else { -1 };
            t.add(user, shard, delta);
            let n = plain.entry((user.0, shard)).or_insert(0);
            *n = apply(*n, delta);
            for u in 0..3 {
                let want: Vec<(u32, u32)> = (0..3)
                    .filter_map(|s| plain.get(&(u, s)).filter(|n| **n > 0).map(|n| (s, *n)))
                    .collect();
                assert_eq!(shards(&t, UserId(u)), want);
                assert_eq!(t.is_online(UserId(u)), !want.is_empty());
            }
            let mut all: Vec<_> = t.iter().map(|(u, s, n)| (u.0, s, n)).collect();
            all.sort();
            let want: Vec<_> = plain
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|((u, s), n)| (*u, *s, *n))
                .collect();
            assert_eq!(all, want);
        }
    }
}
