//! The idempotency keys a channel remembers: for each `(author, client_msg_id)` sent within
//! the window, the seq of the message it made.
//!
//! The message itself holds its author and key, so the table holds only seqs (8 bytes an
//! entry): a key's hash is taken from the message its seq names, and a lookup compares
//! against that message. Nothing is copied per message, and a lookup allocates nothing.
//! Keys leave the table as their messages leave the window, oldest first, found by walking
//! the channel's messages (they are in seq order, and so in time order) from where the last
//! walk stopped.
//!
//! *Invariant: every seq in the table names a message in the channel that has a key, and
//! no two seqs in it name messages with the same author and key.*

use super::{position_from, Message};
use crate::ids::UserId;
use hashbrown::HashTable;
use std::hash::{BuildHasher, RandomState};

/// The keys of one channel's messages in the idempotency window.
#[derive(Clone, Default)]
pub(super) struct Keys {
    /// Keyed per table (the keys are the clients' choice).
    state: RandomState,
    /// Seqs of keyed messages, hashed by their author and key.
    table: HashTable<u64>,
    /// Every message before this index has left the window, or was looked at when it did.
    expired_to: usize,
}

impl Keys {
    fn hash(&self, user: UserId, key: &str) -> u64 {
        self.state.hash_one((user.0, key))
    }

    /// The seq of the message `user` sent with `key`, if the table remembers it.
    pub(super) fn get(&self, messages: &[Message], user: UserId, key: &str) -> Option<u64> {
        self.table
            .find(self.hash(user, key), |&seq| {
                let m = message(messages, seq);
                m.user == user && m.client_msg_id.as_deref() == Some(key)
            })
            .copied()
    }

    /// Remembers the newest of `messages`, which has a key, in place of any earlier message
    /// with its author and key; first forgets the keys of the messages that left the window
    /// at `now_us`.
    pub(super) fn remember(&mut self, messages: &[Message], now_us: u64, window_us: u64) {
        self.expire(messages, now_us, window_us);
        let newest = messages.last().expect("the message is in the channel");
        let key = newest.client_msg_id.as_deref().expect("a keyed message");
        let hash = self.hash(newest.user, key);
        let state = &self.state;
        let rehash = |&seq: &u64| hash_of(state, message(messages, seq));
        let entry = self.table.entry(
            hash,
            |&seq| {
                let m = message(messages, seq);
                m.user == newest.user && m.client_msg_id.as_deref() == Some(key)
            },
            rehash,
        );
        match entry {
            hashbrown::hash_table::Entry::Occupied(mut e) => *e.get_mut() = newest.seq,
            hashbrown::hash_table::Entry::Vacant(e) => {
                e.insert(newest.seq);
            }
        }
    }

    /// Forgets the key of each message older than the window, oldest first, unless a later
    /// message took its key over.
    fn expire(&mut self, messages: &[Message], now_us: u64, window_us: u64) {
        while let Some(m) = messages.get(self.expired_to) {
            if now_us.saturating_sub(m.created_at) < window_us {
                break;
            }
            self.expired_to += 1;
            let Some(key) = m.client_msg_id.as_deref() else {
                continue;
            };
            if let Ok(e) = self
                .table
                .find_entry(self.hash(m.user, key), |&s| s == m.seq)
            {
                e.remove();
            }
        }
    }

    /// Restores a remembered key from a snapshot: `seq` must name a message of `user` with
    /// `key`, and no other remembered one. Call [`Keys::restored`] after the last.
    pub(super) fn restore(
        &mut self,
        messages: &[Message],
        user: UserId,
        key: &str,
        seq: u64,
    ) -> Result<(), &'static str> {
        let i = position_from(messages, seq);
        let m = messages
            .get(i)
            .filter(|m| m.seq == seq)
            .ok_or("key of no message")?;
        if m.user != user || m.client_msg_id.as_deref() != Some(key) {
            return Err("key of another message");
        }
        if self.get(messages, user, key).is_some() {
            return Err("key remembered twice");
        }
        let state = &self.state;
        self.table.insert_unique(self.hash(user, key), seq, |&s| {
            hash_of(state, message(messages, s))
        });
        Ok(())
    }

    /// Ends a restore: the next expiry starts at the oldest message remembered.
    pub(super) fn restored(&mut self, messages: &[Message]) {
        self.expired_to = self
            .table
            .iter()
            .map(|&seq| position_from(messages, seq))
            .min()
            .unwrap_or(messages.len());
    }

    /// How many keys are remembered.
    pub(super) fn len(&self) -> usize {
        self.table.len()
    }

    /// The remembered seqs, in no order.
    pub(super) fn seqs(&self) -> impl Iterator<Item = u64> + '_ {
        self.table.iter().copied()
    }

    /// The keyed messages not yet past the window's walk, oldest first: what an earlier
    /// version kept as its queue of keys to forget (snapshots still carry it).
    pub(super) fn pending<'m>(&self, messages: &'m [Message]) -> impl Iterator<Item = &'m Message> {
        messages
            .get(self.expired_to..)
            .unwrap_or_default()
            .iter()
            .filter(|m| m.client_msg_id.is_some())
    }

    fn sorted(&self) -> Vec<u64> {
        let mut seqs: Vec<u64> = self.seqs().collect();
        seqs.sort_unstable();
        seqs
    }
}

/// Two tables are equal when they remember the same messages (their hashes are keyed apart).
impl PartialEq for Keys {
    fn eq(&self, other: &Keys) -> bool {
        self.sorted() == other.sorted()
    }
}

impl Eq for Keys {}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("seqs", &self.sorted())
            .field("expired_to", &self.expired_to)
            .finish()
    }
}

/// The message at `seq`, which the table's invariant says is there.
fn message(messages: &[Message], seq: u64) -> &Message {
    let m = &messages[position_from(messages, seq)];
    debug_assert_eq!(m.seq, seq);
    m
}

fn hash_of(state: &RandomState, m: &Message) -> u64 {
    let key = m
        .client_msg_id
        .as_deref()
        .expect("a remembered message has a key");
    state.hash_one((m.user.0, key))
}
