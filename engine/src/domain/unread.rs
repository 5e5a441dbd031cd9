//! Read markers and the indexes that count a member's unread messages and mentions in one
//! channel (`API.md` §9), without walking messages.
//!
//! A marker is the highest seq a member has read. It starts at the seq of their joining,
//! moves to the seq of every message they post, and otherwise moves only when they mark a
//! seq above it: **markers only move forward**. It is not a channel event: it takes no seq.
//!
//! The counts are differences of sorted positions found by binary search: the messages
//! after a marker, minus the deleted ones after it, minus the member's own after it (and
//! likewise for mentions). So answering a member's counts costs a few binary searches
//! however long the channel is. Each list is append-mostly: a new message's seq is the
//! largest yet, so it is pushed; a deletion is recorded in a short sorted list of removed
//! positions instead of shifting the long one.

use super::event::Mentions;
use crate::ids::UserId;
use std::collections::HashMap;

/// Sorted message positions (seqs), with the ones removed since kept apart: the count
/// after a seq is the positions after it minus the removed ones after it. Two are equal
/// when they hold the same positions now, whatever was added and removed on the way.
#[derive(Clone, Debug, Default)]
struct Positions {
    /// Every position ever added, sorted.
    seqs: Vec<u64>,
    /// The positions of `seqs` removed since, sorted.
    gone: Vec<u64>,
}

impl Positions {
    /// Adds a position (again, if it was removed).
    fn add(&mut self, seq: u64) {
        if let Ok(i) = self.gone.binary_search(&seq) {
            self.gone.remove(i);
            return;
        }
        match self.seqs.last() {
            None => self.seqs.push(seq),
            Some(last) if *last < seq => self.seqs.push(seq),
            Some(_) => {
                if let Err(i) = self.seqs.binary_search(&seq) {
                    self.seqs.insert(i, seq);
                }
            }
        }
    }

    /// Removes a position, if it is there.
    fn remove(&mut self, seq: u64) {
        if self.seqs.binary_search(&seq).is_ok() {
            if let Err(i) = self.gone.binary_search(&seq) {
                self.gone.insert(i, seq);
            }
        }
    }

    /// The positions held now, in order.
    fn live(&self) -> impl Iterator<Item = u64> + '_ {
        let mut gone = self.gone.iter().peekable();
        self.seqs.iter().copied().filter(move |s| {
            while gone.next_if(|g| **g < *s).is_some() {}
            gone.next_if(|g| **g == *s).is_none()
        })
    }

    /// How many positions there are after `after`.
    fn count_after(&self, after: u64) -> u64 {
        (count_above(&self.seqs, after) - count_above(&self.gone, after)) as u64
    }
}

/// How many of `sorted` are above `after`, searched from the end: a marker is mostly at or
/// near the channel's newest message (a member who posts has read up to their post), so
/// the step doubles back from the last position, in memory the latest appends left warm,
/// and the answer is usually found in one or two probes where a binary search started
/// from the middle of a long list.
fn count_above(sorted: &[u64], after: u64) -> usize {
    let n = sorted.len();
    let mut step = 1;
    // sorted[n - lo..] are all above `after`; below the window [n - hi, n - lo) none are.
    let mut lo = 0;
    while lo + step <= n && sorted[n - lo - step] > after {
        lo += step;
        step *= 2;
    }
    let hi = (lo + step).min(n);
    let window = &sorted[n - hi..n - lo];
    lo + window.len() - window.partition_point(|s| *s <= after)
}

impl PartialEq for Positions {
    fn eq(&self, other: &Positions) -> bool {
        self.live().eq(other.live())
    }
}

impl Eq for Positions {}

/// Positions by user. Two are equal when every user holds the same positions now (a user
/// whose positions were all removed equals one never listed).
#[derive(Clone, Debug, Default)]
struct ByUser(HashMap<UserId, Positions>);

impl ByUser {
    fn count_after(&self, user: UserId, after: u64) -> u64 {
        self.0.get(&user).map_or(0, |p| p.count_after(after))
    }

    fn add(&mut self, user: UserId, seq: u64) {
        self.0.entry(user).or_default().add(seq);
    }

    fn remove(&mut self, user: UserId, seq: u64) {
        if let Some(p) = self.0.get_mut(&user) {
            p.remove(seq);
        }
    }
}

impl PartialEq for ByUser {
    fn eq(&self, other: &ByUser) -> bool {
        let empty = Positions::default();
        let covers =
            |a: &ByUser, b: &ByUser| a.0.iter().all(|(u, p)| *p == *b.0.get(u).unwrap_or(&empty));
        covers(self, other) && covers(other, self)
    }
}

impl Eq for ByUser {}

/// One member's read state in a channel, as `API.md` §9's `read` object counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadCounts {
    /// The highest seq the member has read.
    pub read_seq: u64,
    /// The messages after it that others posted and that are not deleted.
    pub unread_count: u64,
    /// Those of them that mention the member (all of them in a DM).
    pub mention_count: u64,
}

/// The read markers of a channel's members and its unread indexes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReadIndex {
    /// Each member's marker.
    markers: HashMap<UserId, u64>,
    /// Every message, with the deleted ones removed.
    messages: Positions,
    /// Each author's messages, with the deleted ones removed.
    by_author: ByUser,
    /// Messages that mention everyone (`@here`, `@channel`).
    broadcast: Positions,
    /// Each author's messages that mention everyone.
    broadcast_by_author: ByUser,
    /// Messages that mention a user by ID but not everyone, by mentioned user, never
    /// counting the author's mention of themselves.
    direct: ByUser,
    /// The author and mentions of each live message that has any, so that an edit or a
    /// deletion can take them out again.
    mentions: HashMap<u64, (UserId, Mentions)>,
}

impl ReadIndex {
    /// A member joined at `seq`: their marker starts there (a rejoin starts afresh).
    pub fn joined(&mut self, user: UserId, seq: u64) {
        self.markers.insert(user, seq);
    }

    /// A member left: their marker goes with them.
    pub fn left(&mut self, user: UserId) {
        self.markers.remove(&user);
    }

    /// A message was posted at `seq`; its author has read up to it. Returns whether the
    /// author's marker moved.
    pub fn posted(&mut self, seq: u64, author: UserId, mentions: &Mentions) -> bool {
        self.messages.add(seq);
        self.by_author.add(author, seq);
        self.add_mentions(seq, author, mentions);
        self.mark(author, seq)
    }

    /// A live message's text changed: its mentions are replaced.
    pub fn edited(&mut self, seq: u64, author: UserId, mentions: &Mentions) {
        self.remove_mentions(seq);
        self.add_mentions(seq, author, mentions);
    }

    /// A live message was deleted: it counts no more.
    pub fn deleted(&mut self, seq: u64, author: UserId) {
        self.messages.remove(seq);
        self.by_author.remove(author, seq);
        self.remove_mentions(seq);
    }

    /// Moves a member's marker forward to `seq`; a lower or equal seq, or a user who is not
    /// a member, changes nothing. Returns whether it moved.
    pub fn mark(&mut self, user: UserId, seq: u64) -> bool {
        match self.markers.get_mut(&user) {
            Some(m) if *m < seq => {
                *m = seq;
                true
            }
            _ => false,
        }
    }

    /// A member's marker.
    pub fn marker(&self, user: UserId) -> Option<u64> {
        self.markers.get(&user).copied()
    }

    /// A member's counts; with `every_message_mentions` (a DM), every unread message counts
    /// as a mention.
    pub fn counts(&self, user: UserId, every_message_mentions: bool) -> Option<ReadCounts> {
        let read_seq = self.marker(user)?;
        let unread_count =
            self.messages.count_after(read_seq) - self.by_author.count_after(user, read_seq);
        let mention_count = if every_message_mentions {
            unread_count
        } else {
            self.broadcast.count_after(read_seq)
                - self.broadcast_by_author.count_after(user, read_seq)
                + self.direct.count_after(user, read_seq)
        };
        Some(ReadCounts {
            read_seq,
            unread_count,
            mention_count,
        })
    }

    fn add_mentions(&mut self, seq: u64, author: UserId, m: &Mentions) {
        if m.here || m.channel {
            self.broadcast.add(seq);
            self.broadcast_by_author.add(author, seq);
        } else {
            for u in m.users.iter().filter(|u| **u != author) {
                self.direct.add(*u, seq);
            }
        }
        if m.here || m.channel || !m.users.is_empty() {
            self.mentions.insert(seq, (author, m.clone()));
        }
    }

    fn remove_mentions(&mut self, seq: u64) {
        let Some((author, m)) = self.mentions.remove(&seq) else {
            return;
        };
        if m.here || m.channel {
            self.broadcast.remove(seq);
            self.broadcast_by_author.remove(author, seq);
        } else {
            for u in &m.users {
                self.direct.remove(*u, seq);
            }
        }
    }

    /// The markers, in user order (for snapshots: one state makes one file).
    pub(crate) fn markers_sorted(&self) -> Vec<(UserId, u64)> {
        let mut v: Vec<(UserId, u64)> = self.markers.iter().map(|(u, s)| (*u, *s)).collect();
        v.sort_unstable();
        v
    }

    /// The mentions of live messages, in seq order (for snapshots).
    pub(crate) fn mentions_sorted(&self) -> Vec<(u64, &Mentions)> {
        let mut v: Vec<(u64, &Mentions)> =
            self.mentions.iter().map(|(s, (_, m))| (*s, m)).collect();
        v.sort_unstable_by_key(|(s, _)| *s);
        v
    }

    /// Sets a marker as a snapshot recorded it.
    pub(crate) fn restore_marker(&mut self, user: UserId, seq: u64) {
        self.markers.insert(user, seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: UserId = UserId(1);
    const B: UserId = UserId(2);
    const C: UserId = UserId(3);

    fn m(users: &[UserId], here: bool, channel: bool) -> Mentions {
        Mentions {
            users: users.to_vec(),
            here,
            channel,
        }
    }

    /// The counts a plain walk over the messages gives, to check the index against.
    fn walk(
        msgs: &[(u64, UserId, Mentions, bool)],
        user: UserId,
        read: u64,
        dm: bool,
    ) -> (u64, u64) {
        let mine = |(seq, author, _, deleted): &&(u64, UserId, Mentions, bool)| {
            *seq > read && *author != user && !*deleted
        };
        let unread = msgs.iter().filter(mine).count() as u64;
        let mentions = msgs
            .iter()
            .filter(mine)
            .filter(|(_, _, m, _)| dm || m.here || m.channel || m.users.contains(&user))
            .count() as u64;
        (unread, mentions)
    }

    // Own messages, deletions, @here, @channel, <@id> and self-mentions count as §9 says,
    // and a marker moves forward only.
    #[test]
    fn counts_follow_the_rules() {
        let mut ix = ReadIndex::default();
        ix.joined(A, 1);
        ix.joined(B, 2);
        assert!(
            ix.posted(3, B, &m(&[A], false, false)),
            "posting moves the marker"
        );
        assert_eq!(ix.marker(B), Some(3));
        ix.posted(4, B, &m(&[], true, false));
        ix.posted(5, B, &m(&[A, B], false, true));
        ix.posted(6, A, &m(&[A], false, false)); // A's own: moves A's marker to 6
        assert_eq!(ix.counts(A, false).unwrap().read_seq, 6);
        assert!(!ix.mark(A, 2), "a lower seq is a no-op");
        assert_eq!(ix.marker(A), Some(6));
        ix.posted(7, B, &m(&[A], false, false));
        ix.posted(8, B, &m(&[], false, false));
        let c = ix.counts(A, false).unwrap();
        assert_eq!((c.unread_count, c.mention_count), (2, 1));
        ix.deleted(7, B);
        let c = ix.counts(A, false).unwrap();
        assert_eq!((c.unread_count, c.mention_count), (1, 0));
        // B sees nothing of its own; a DM counts every unread message as a mention.
        ix.joined(C, 8);
        ix.posted(9, A, &m(&[], false, false));
        assert_eq!(ix.counts(C, true).unwrap().mention_count, 1);
        assert_eq!(
            ix.counts(B, false).unwrap().unread_count,
            1,
            "B posted up to 8"
        );
        assert_eq!(ix.counts(B, false).unwrap().mention_count, 0);
        ix.left(C);
        assert_eq!(ix.counts(C, false), None);
        assert!(!ix.mark(C, 9), "a former member has no marker to move");
    }

    // An edit replaces a message's mentions: added, removed, or turned into @channel.
    #[test]
    fn edits_replace_mentions() {
        let mut ix = ReadIndex::default();
        ix.joined(A, 1);
        ix.joined(B, 2);
        ix.posted(3, B, &m(&[], false, false));
        assert_eq!(ix.counts(A, false).unwrap().mention_count, 0);
        ix.edited(3, B, &m(&[A], false, false));
        assert_eq!(ix.counts(A, false).unwrap().mention_count, 1);
        ix.edited(3, B, &m(&[A], false, true));
        assert_eq!(ix.counts(A, false).unwrap().mention_count, 1);
        ix.edited(3, B, &m(&[], false, false));
        assert_eq!(ix.counts(A, false).unwrap().mention_count, 0);
        ix.edited(3, B, &m(&[A], true, false));
        ix.deleted(3, B);
        let c = ix.counts(A, false).unwrap();
        assert_eq!((c.unread_count, c.mention_count), (0, 0));
    }

    // Under a seeded random mix of posts, edits, deletions and marks, the index's counts
    // equal a walk over the messages for every member and marker (seed printed on failure).
    #[test]
    fn counts_equal_a_walk() {
        for seed in 0..200u64 {
            let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut next = |n: u64| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % n
            };
            let users = [A, B, C];
            let mut ix = ReadIndex::default();
            let mut msgs: Vec<(u64, UserId, Mentions, bool)> = Vec::new();
            let mut markers: HashMap<UserId, u64> = HashMap::new();
            for (i, u) in users.iter().enumerate() {
                ix.joined(*u, i as u64 + 1);
                markers.insert(*u, i as u64 + 1);
            }
            let mut seq = users.len() as u64;
            for _ in 0..60 {
                let mention = |next: &mut dyn FnMut(u64) -> u64| {
                    let users: Vec<UserId> =
                        users.iter().copied().filter(|_| next(4) == 0).collect();
                    m(&users, next(8) == 0, next(8) == 0)
                };
                match next(5) {
                    0 | 1 => {
                        seq += 1;
                        let author = users[next(3) as usize];
                        let men = mention(&mut next);
                        ix.posted(seq, author, &men);
                        let mk = markers.get_mut(&author).unwrap();
                        *mk = (*mk).max(seq);
                        msgs.push((seq, author, men, false));
                    }
                    2 if !msgs.is_empty() => {
                        let i = next(msgs.len() as u64) as usize;
                        if !msgs[i].3 {
                            let men = mention(&mut next);
                            ix.edited(msgs[i].0, msgs[i].1, &men);
                            msgs[i].2 = men;
                        }
                        seq += 1;
                    }
                    3 if !msgs.is_empty() => {
                        let i = next(msgs.len() as u64) as usize;
                        if !msgs[i].3 {
                            ix.deleted(msgs[i].0, msgs[i].1);
                            msgs[i].3 = true;
                        }
                        seq += 1;
                    }
                    _ => {
                        let u = users[next(3) as usize];
                        let to = next(seq + 1);
                        let moved = ix.mark(u, to);
                        assert_eq!(moved, to > markers[&u], "seed {seed}");
                        let mk = markers.get_mut(&u).unwrap();
                        *mk = (*mk).max(to);
                    }
                }
                for u in users {
                    for dm in [false, true] {
                        let c = ix.counts(u, dm).unwrap();
                        assert_eq!(c.read_seq, markers[&u], "seed {seed}");
                        let want = walk(&msgs, u, markers[&u], dm);
                        assert_eq!((c.unread_count, c.mention_count), want, "seed {seed}");
                    }
                }
            }
        }
    }

    // Counting from the end agrees with a binary search for every cut, over lists of every
    // length up to 70 (each doubling step's edge) and a long one with gaps.
    #[test]
    fn count_above_agrees_with_a_binary_search() {
        let mut lists: Vec<Vec<u64>> = (0..70u64)
            .map(|n| (1..=n).map(|i| i * 3).collect())
            .collect();
        lists.push((0..5_000u64).map(|i| i * i % 7 + i * 10).collect());
        for sorted in &lists {
            let top = sorted.last().copied().unwrap_or(0) + 2;
            for after in 0..=top {
                let want = sorted.len() - sorted.partition_point(|s| *s <= after);
                assert_eq!(
                    count_above(sorted, after),
                    want,
                    "len {} after {after}",
                    sorted.len()
                );
            }
        }
    }
}
