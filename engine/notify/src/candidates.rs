//! Who could ever be notified of a message, kept per channel as memberships and preferences
//! change (issue 16's precomputation), so that deciding a message walks its candidates and
//! not its members.
//!
//! A member's *standing* in a channel is what their levels allow at most, over the ways
//! they can be reached (a push needs a device, an email a digest interval): [`Standing::All`]
//! is notified of every message, [`Standing::Mentions`] only of one that concerns them (a
//! mention of them, `@channel`, `@here`, a keyword of theirs, or any message of a DM), and
//! [`Standing::Never`] of nothing (muted, or levels `none`, or unreachable). A channel keeps
//! its members of the first two standings, and those of the second with keywords apart.
//! So a message without `@channel`/`@here` in a channel that is not a DM costs the
//! members at `all`, a lookup per user it names, and a keyword test per member with
//! keywords; only `@channel`, `@here` and DMs cost one step per member who wants mentions.
//!
//! API boundary: this module holds sets, and computes a standing from preferences and
//! devices ([`standing`]); the decider tells it of every change, and the rules still have
//! the last word on each candidate.

use crate::decider::Modes;
use chorus_engine::domain::event::Mentions;
use chorus_engine::domain::notify::{rules, Level, NotifyState};
use chorus_engine::ids::{ChannelId, UserId};
use std::collections::{BTreeSet, HashMap};

/// What a member's levels allow at most in a channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Standing {
    /// Nothing reaches them.
    Never,
    /// Messages that concern them.
    Mentions,
    /// Every message.
    All,
}

/// What a member's levels allow at most in a channel, over the ways `modes` can reach them
/// (a push needs a device, an email a digest interval), and whether they have keywords.
pub fn standing(
    notify: &NotifyState,
    modes: Modes,
    user: UserId,
    channel: ChannelId,
) -> (Standing, bool) {
    let in_channel = notify.channel(user, channel);
    let prefs = notify.prefs(user);
    if in_channel.muted {
        return (Standing::Never, false);
    }
    let of = |level| match rules::level(in_channel, level) {
        Level::All => Standing::All,
        Level::Mentions => Standing::Mentions,
        Level::None => Standing::Never,
    };
    let push = if modes.push && notify.has_devices(user) {
        of(prefs.push)
    } else {
        Standing::Never
    };
    let email = if modes.email && prefs.email_digest_s > 0 {
        of(prefs.email)
    } else {
        Standing::Never
    };
    (push.max(email), !prefs.keywords.is_empty())
}

/// One channel's members who could be notified.
#[derive(Default, Debug)]
struct Members {
    all: BTreeSet<UserId>,
    mentions: BTreeSet<UserId>,
    /// The members of `mentions` with keywords.
    keyworded: BTreeSet<UserId>,
}

/// A message as the candidates see it.
pub struct Posted<'a> {
    /// Its author, never a candidate.
    pub author: UserId,
    /// Its mentions.
    pub mentions: &'a Mentions,
    /// Whether its channel is a DM (every message concerns every member).
    pub direct: bool,
}

/// The candidates of every channel, and each user's channels.
#[derive(Default, Debug)]
pub struct Candidates {
    channels: HashMap<ChannelId, Members>,
    of_user: HashMap<UserId, BTreeSet<ChannelId>>,
}

impl Candidates {
    /// A user became a member of a channel with this standing (and keywords or not).
    pub fn joined(&mut self, channel: ChannelId, user: UserId, standing: Standing, keywords: bool) {
        self.of_user.entry(user).or_default().insert(channel);
        self.set(channel, user, standing, keywords);
    }

    /// A user left a channel.
    pub fn left(&mut self, channel: ChannelId, user: UserId) {
        if let Some(set) = self.of_user.get_mut(&user) {
            set.remove(&channel);
            if set.is_empty() {
                self.of_user.remove(&user);
            }
        }
        self.set(channel, user, Standing::Never, false);
    }

    /// A member's standing or keywords changed.
    pub fn set(&mut self, channel: ChannelId, user: UserId, standing: Standing, keywords: bool) {
        let m = self.channels.entry(channel).or_default();
        m.all.remove(&user);
        m.mentions.remove(&user);
        m.keyworded.remove(&user);
        match standing {
            Standing::Never => {}
            Standing::All => {
                m.all.insert(user);
            }
            Standing::Mentions => {
                m.mentions.insert(user);
                if keywords {
                    m.keyworded.insert(user);
                }
            }
        }
    }

    /// Every membership, as `(channel, user)` IDs in user order.
    pub fn memberships(&self) -> Vec<(u64, u64)> {
        (self.of_user.iter())
            .flat_map(|(u, cs)| cs.iter().map(move |c| (c.0, u.0)))
            .collect()
    }

    /// The channels a user is a member of.
    pub fn channels_of(&self, user: UserId) -> Vec<ChannelId> {
        (self.of_user.get(&user).into_iter().flatten().copied()).collect()
    }

    /// The candidates of a message, in user order: every member at `all`, and the members
    /// who want mentions that it concerns; `has_keyword` says whether a member's keyword
    /// is in its text. Never its author.
    pub fn of(
        &self,
        channel: ChannelId,
        m: &Posted<'_>,
        has_keyword: impl Fn(UserId) -> bool,
    ) -> Vec<UserId> {
        let Some(c) = self.channels.get(&channel) else {
            return Vec::new();
        };
        let mut out = if m.direct || m.mentions.channel || m.mentions.here {
            merged(&c.all, &c.mentions)
        } else {
            let named = m.mentions.users.iter().filter(|u| c.mentions.contains(u));
            let keyword = c.keyworded.iter().filter(|u| has_keyword(**u));
            let mut some: Vec<UserId> = c.all.iter().chain(named).chain(keyword).copied().collect();
            some.sort_unstable();
            some.dedup();
            some
        };
        out.retain(|u| *u != m.author);
        out
    }
}

/// The union of two disjoint sets, in order, in one pass.
fn merged(a: &BTreeSet<UserId>, b: &BTreeSet<UserId>) -> Vec<UserId> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut a, mut b) = (a.iter().peekable(), b.iter().peekable());
    loop {
        let next = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) if x < y => a.next(),
            (Some(_), Some(_)) | (None, Some(_)) => b.next(),
            (Some(_), None) => a.next(),
            (None, None) => return out,
        };
        out.extend(next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    const C: ChannelId = ChannelId(7);

    /// The candidates by their definition, walking every member.
    fn walk(
        members: &BTreeMap<UserId, (Standing, bool)>,
        m: &Posted<'_>,
        has_keyword: impl Fn(UserId) -> bool,
    ) -> Vec<UserId> {
        let concerns = |u: UserId, keywords: bool| {
            m.direct
                || m.mentions.channel
                || m.mentions.here
                || m.mentions.users.contains(&u)
                || (keywords && has_keyword(u))
        };
        members
            .iter()
            .filter(|(u, _)| **u != m.author)
            .filter(|(u, (s, k))| match s {
                Standing::All => true,
                Standing::Mentions => concerns(**u, *k),
                Standing::Never => false,
            })
            .map(|(u, _)| *u)
            .collect()
    }

    // Through a random run of joins, departures and changes of standing and keywords, the
    // kept candidates of every kind of message are exactly those found by walking every
    // member.
    #[test]
    fn kept_candidates_match_a_walk_of_the_members() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let standings = [Standing::Never, Standing::Mentions, Standing::All];
        let mut kept = Candidates::default();
        let mut members: BTreeMap<UserId, (Standing, bool)> = BTreeMap::new();
        for step in 0..3_000 {
            let user = UserId(next(40));
            match next(3) {
                0 if members.contains_key(&user) => {
                    kept.left(C, user);
                    members.remove(&user);
                }
                _ => {
                    let (s, k) = (standings[next(3) as usize], next(2) == 0);
                    if members.insert(user, (s, k)).is_none() {
                        kept.joined(C, user, s, k);
                    } else {
                        kept.set(C, user, s, k);
                    }
                }
            }
            let named: Vec<UserId> = (0..next(3)).map(|_| UserId(next(40))).collect();
            let mentions = Mentions {
                users: named,
                here: next(8) == 0,
                channel: next(8) == 0,
            };
            let m = Posted {
                author: UserId(next(40)),
                mentions: &mentions,
                direct: next(10) == 0,
            };
            let keyword = |u: UserId| u.0 % 3 == step % 3;
            assert_eq!(
                kept.of(C, &m, keyword),
                walk(&members, &m, keyword),
                "step {step}"
            );
            let mine = kept.channels_of(user);
            assert_eq!(mine.is_empty(), !members.contains_key(&user));
        }
    }
}
