//! The last `seq` delivered per channel, and the verdict on each incoming event: deliver
//! it, drop it as a repeat, or report a gap. Pure: no I/O and no clock, so that the rules
//! are tested on made-up frame sequences.
//!
//! # The rules
//!
//! - A channel the tracker has never heard of starts wherever its first event is.
//! - An event at or below the last delivered seq is a repeat and is dropped.
//! - The next seq is delivered.
//! - An event beyond the next seq is a gap. The server promises never to cause one, so the
//!   stream treats it as a bug: it logs it and reconnects, resuming from the last delivered
//!   seq, which fills the hole.
//!
//! A channel can also be *seeded* with a seq the application has not seen an event for
//! (the `last_seq` that REST reported when the stream started). Such a channel is not yet
//! confirmed: the user may not be a member, and then joins later at a much higher seq. So
//! until an event of it is delivered, its own `member:joined` event may start it anywhere.
//! The same holds again after the user's own `member:left`, since nothing is delivered to
//! a non-member and a rejoin resumes further on.

use std::collections::HashMap;

/// What to do with an incoming event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Deliver it: it is the next one of its channel (or the channel's first).
    Deliver,
    /// Drop it: its seq was delivered already.
    Repeat,
    /// Events are missing before it: `expected` is the seq that should have come.
    Gap {
        /// The seq that should have come next.
        expected: u64,
    },
}

/// How an event bears on the user's own membership of its channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Membership {
    /// Any other event.
    Other,
    /// `member:joined` of the stream's own user.
    SelfJoined,
    /// `member:left` of the stream's own user.
    SelfLeft,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Position {
    last: u64,
    /// Whether an event at `last` was delivered while the user was a member; see the
    /// module documentation.
    confirmed: bool,
}

/// The last delivered seq of every channel a stream has seen.
#[derive(Clone, Debug, Default)]
pub struct SeqTracker {
    channels: HashMap<String, Position>,
}

impl SeqTracker {
    /// A tracker that knows no channel yet.
    pub fn new() -> SeqTracker {
        SeqTracker::default()
    }

    /// A tracker seeded with a seq per channel, as from `last_seq` in REST answers: events
    /// up to those seqs count as seen, and the channels are not yet confirmed.
    pub fn seeded(since: &HashMap<String, u64>) -> SeqTracker {
        let channels = since
            .iter()
            .map(|(c, &last)| {
                let position = Position {
                    last,
                    confirmed: false,
                };
                (c.clone(), position)
            })
            .collect();
        SeqTracker { channels }
    }

    /// The verdict on an event, without recording anything.
    pub fn check(&self, channel: &str, seq: u64, membership: Membership) -> Verdict {
        let Some(p) = self.channels.get(channel) else {
            return Verdict::Deliver;
        };
        if seq <= p.last {
            return Verdict::Repeat;
        }
        if seq == p.last + 1 || (!p.confirmed && membership == Membership::SelfJoined) {
            return Verdict::Deliver;
        }
        Verdict::Gap {
            expected: p.last + 1,
        }
    }

    /// Records that the event was delivered.
    pub fn delivered(&mut self, channel: &str, seq: u64, membership: Membership) {
        let confirmed = membership != Membership::SelfLeft;
        match self.channels.get_mut(channel) {
            Some(p) => {
                *p = Position {
                    last: seq,
                    confirmed,
                }
            }
            None => {
                let position = Position {
                    last: seq,
                    confirmed,
                };
                self.channels.insert(channel.to_owned(), position);
            }
        }
    }

    /// Checks an event and records it when it is delivered.
    pub fn observe(&mut self, channel: &str, seq: u64, membership: Membership) -> Verdict {
        let verdict = self.check(channel, seq, membership);
        if verdict == Verdict::Deliver {
            self.delivered(channel, seq, membership);
        }
        verdict
    }

    /// Makes sure a channel is named in the next resume even though its event at `seq` is
    /// being dropped undelivered (the application's queue was full): a channel first heard
    /// of now starts just before it.
    pub fn hold(&mut self, channel: &str, seq: u64) {
        if !self.channels.contains_key(channel) {
            let position = Position {
                last: seq.saturating_sub(1),
                confirmed: false,
            };
            self.channels.insert(channel.to_owned(), position);
        }
    }

    /// The last delivered (or seeded) seq of a channel.
    pub fn last(&self, channel: &str) -> Option<u64> {
        self.channels.get(channel).map(|p| p.last)
    }

    /// What to send in a `resume` frame: every known channel with its last seq.
    pub fn since(&self) -> HashMap<String, u64> {
        self.channels
            .iter()
            .map(|(c, p)| (c.clone(), p.last))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Membership::Other;

    fn run(tracker: &mut SeqTracker, frames: &[(&str, u64)]) -> Vec<Verdict> {
        frames
            .iter()
            .map(|(c, s)| tracker.observe(c, *s, Other))
            .collect()
    }

    // Repeats are dropped, a gap is reported without moving the position, and the channel
    // continues from where it was once the missing events come.
    #[test]
    fn repeats_and_gaps() {
        let mut t = SeqTracker::new();
        let v = run(
            &mut t,
            &[
                ("a", 5),
                ("a", 6),
                ("a", 6),
                ("b", 1),
                ("a", 4),
                ("a", 8),
                ("a", 7),
                ("a", 8),
            ],
        );
        use Verdict::*;
        assert_eq!(
            v,
            vec![
                Deliver,
                Deliver,
                Repeat,
                Deliver,
                Repeat,
                Gap { expected: 7 },
                Deliver,
                Deliver
            ]
        );
        assert_eq!(t.last("a"), Some(8));
        assert_eq!(t.since(), HashMap::from([("a".into(), 8), ("b".into(), 1)]));
    }

    // A seeded channel is strict about ordinary events, but the user's own join may start
    // it anywhere until something of it was delivered; after the user leaves, again.
    #[test]
    fn seeded_channels_and_membership() {
        let mut t = SeqTracker::seeded(&HashMap::from([("c".into(), 10)]));
        assert_eq!(t.check("c", 10, Other), Verdict::Repeat);
        assert_eq!(t.check("c", 12, Other), Verdict::Gap { expected: 11 });
        assert_eq!(t.observe("c", 40, Membership::SelfJoined), Verdict::Deliver);
        assert_eq!(
            t.check("c", 42, Membership::SelfJoined),
            Verdict::Gap { expected: 41 }
        );
        assert_eq!(t.observe("c", 41, Membership::SelfLeft), Verdict::Deliver);
        assert_eq!(t.observe("c", 90, Membership::SelfJoined), Verdict::Deliver);
        assert_eq!(t.last("c"), Some(90));
    }

    // A dropped event of a new channel keeps the channel named for the resume, from just
    // before that event; a known channel keeps its position.
    #[test]
    fn hold_names_new_channels() {
        let mut t = SeqTracker::new();
        t.observe("a", 3, Other);
        t.hold("a", 9);
        t.hold("b", 9);
        assert_eq!(t.last("a"), Some(3));
        assert_eq!(t.last("b"), Some(8));
        assert_eq!(t.check("b", 9, Other), Verdict::Deliver);
    }
}
