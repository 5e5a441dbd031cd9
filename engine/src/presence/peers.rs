//! Presence between the nodes of a cluster (`API.md` §15: every node serves the whole API).
//!
//! Every node keeps the whole presence table of its users' home shards, so that watchers are
//! registered and answered on their own node. What a node must hear from the others is
//! what their own clients did: for each user, whether a connection is open there and
//! whether one is active ([`Record::Conns`]), and a mode chosen there ([`Record::Mode`]).
//! Shard `s` of a node tells shard `s` of every other node (every node runs the same
//! shards, so it is the same users' home shard there) each change, in a [`Notice`].
//!
//! Notices travel one way and best effort, so each carries the sender's incarnation
//! (chosen when its process started) and a sequence number, and the sender repeats its
//! last number in a keepalive every [`KEEPALIVE`]. The [`Tracker`] of the receiver takes a
//! notice only in sequence. When it misses one (a gap, a new incarnation, a keepalive
//! ahead of it) it asks the sender for its whole state, a snapshot answered with the
//! number it includes, which replaces what it knew of that node; notices that came
//! meanwhile wait for it, and those the snapshot includes are dropped. A node not heard
//! from for [`SILENT_MAX`] counts as having no connection open: its users' offline grace
//! starts, so a node heard again within the grace (and resynchronized) changes nothing
//! others see.
//!
//! Modes chosen on two nodes are ordered by when they were chosen: the later wins
//! ([`crate::presence::PresenceTable::mode_from`]).

use super::Mode;
use crate::ids::UserId;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The first byte of a presence notice, snapshot or snapshot request: never the `{` of a
/// JSON notice or call.
pub const MAGIC: u8 = 0xF2;
const VERSION: u8 = 1;
/// How often a node repeats its last sequence number to its peers.
pub const KEEPALIVE: Duration = Duration::from_secs(1);
/// A peer not heard from for this long counts as having no connection open.
pub const SILENT_MAX: Duration = Duration::from_secs(4);
/// Notices kept while a snapshot is asked for: past it they are dropped, and the next
/// notice asks again.
const WAITING_MAX: usize = 4_096;

/// Where a shard sends each change of its users' presence on this node, with its number
/// in the shard's sequence, for the other nodes.
pub type Sink = futures::channel::mpsc::UnboundedSender<(u64, Vec<Record>)>;

/// What a [`Sink`] sends.
pub type Changes = futures::channel::mpsc::UnboundedReceiver<(u64, Vec<Record>)>;

/// What one node says of one user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record {
    /// The user's connections on that node: `None` when none is open, else whether one is
    /// active; with the last activity it knows.
    Conns {
        /// Whose.
        user: UserId,
        /// None open, or whether one is active.
        active: Option<bool>,
        /// When the user was last active (microseconds since the Unix epoch).
        last_active_us: Option<u64>,
    },
    /// The user chose a mode there, at `at_us`.
    Mode {
        /// Whose.
        user: UserId,
        /// The mode.
        mode: Mode,
        /// When `dnd` ends.
        dnd_until_us: Option<u64>,
        /// When it was chosen (microseconds since the Unix epoch).
        at_us: u64,
    },
}

const CONNS: u8 = 1;
const MODE: u8 = 2;

impl Record {
    fn encode(&self, out: &mut Vec<u8>) {
        match *self {
            Record::Conns {
                user,
                active,
                last_active_us,
            } => {
                out.push(CONNS);
                out.extend_from_slice(&user.0.to_le_bytes());
                out.push(match active {
                    None => 0,
                    Some(false) => 1,
                    Some(true) => 2,
                });
                out.extend_from_slice(&last_active_us.unwrap_or(0).to_le_bytes());
            }
            Record::Mode {
                user,
                mode,
                dnd_until_us,
                at_us,
            } => {
                out.push(MODE);
                out.extend_from_slice(&user.0.to_le_bytes());
                out.push(match mode {
                    Mode::Auto => 0,
                    Mode::Away => 1,
                    Mode::Dnd => 2,
                    Mode::Invisible => 3,
                });
                out.extend_from_slice(&dnd_until_us.unwrap_or(0).to_le_bytes());
                out.extend_from_slice(&at_us.to_le_bytes());
            }
        }
    }

    /// One record from the front of `bytes`, and what follows it.
    fn decode(bytes: &[u8]) -> Option<(Record, &[u8])> {
        let (&tag, rest) = bytes.split_first()?;
        let word = |b: &[u8], i: usize| -> Option<u64> {
            Some(u64::from_le_bytes(b.get(i..i + 8)?.try_into().ok()?))
        };
        let some = |v: u64| (v != 0).then_some(v);
        match tag {
            CONNS => {
                let user = UserId(word(rest, 0)?);
                let active = match *rest.get(8)? {
                    0 => None,
                    1 => Some(false),
                    2 => Some(true),
                    _ => return None,
                };
                let last_active_us = some(word(rest, 9)?);
                let record = Record::Conns {
                    user,
                    active,
                    last_active_us,
                };
                Some((record, &rest[17..]))
            }
            MODE => {
                let user = UserId(word(rest, 0)?);
                let mode = match *rest.get(8)? {
                    0 => Mode::Auto,
                    1 => Mode::Away,
                    2 => Mode::Dnd,
                    3 => Mode::Invisible,
                    _ => return None,
                };
                let dnd_until_us = some(word(rest, 9)?);
                let at_us = word(rest, 17)?;
                let record = Record::Mode {
                    user,
                    mode,
                    dnd_until_us,
                    at_us,
                };
                Some((record, &rest[25..]))
            }
            _ => None,
        }
    }
}

/// What a notice is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Changes, the next number of the sender's sequence.
    Changes,
    /// Nothing new: the sender's last number.
    Keepalive,
    /// The sender's whole state, which includes its sequence up to the number (or the
    /// last page of it).
    Snapshot,
    /// A page of the sender's state that more pages follow, from the user after the last
    /// one it names ([`snapshot_request`]).
    SnapshotPart,
}

/// What one node's shard tells the same shard of another.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    /// What it is.
    pub kind: Kind,
    /// The sender's incarnation: a new one when its process starts.
    pub incarnation: u64,
    /// The number in the sender's sequence.
    pub seq: u64,
    /// The records.
    pub records: Vec<Record>,
}

impl Notice {
    /// The notice's bytes: [`MAGIC`], version, kind, then incarnation and sequence number
    /// (u64 LE), then the records.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(19 + self.records.len() * 26);
        out.extend_from_slice(&[
            MAGIC,
            VERSION,
            match self.kind {
                Kind::Changes => 0,
                Kind::Keepalive => 1,
                Kind::Snapshot => 2,
                Kind::SnapshotPart => 4,
            },
        ]);
        out.extend_from_slice(&self.incarnation.to_le_bytes());
        out.extend_from_slice(&self.seq.to_le_bytes());
        for r in &self.records {
            r.encode(&mut out);
        }
        out
    }

    /// Reads what [`Notice::encode`] made; `None` for anything else.
    pub fn decode(bytes: &[u8]) -> Option<Notice> {
        let [MAGIC, VERSION, kind, ..] = *bytes else {
            return None;
        };
        let kind = match kind {
            0 => Kind::Changes,
            1 => Kind::Keepalive,
            2 => Kind::Snapshot,
            4 => Kind::SnapshotPart,
            _ => return None,
        };
        let word = |i: usize| -> Option<u64> {
            Some(u64::from_le_bytes(bytes.get(i..i + 8)?.try_into().ok()?))
        };
        let (incarnation, seq) = (word(3)?, word(11)?);
        let mut rest = &bytes[19..];
        let mut records = Vec::new();
        while !rest.is_empty() {
            let (record, next) = Record::decode(rest)?;
            records.push(record);
            rest = next;
        }
        Some(Notice {
            kind,
            incarnation,
            seq,
            records,
        })
    }
}

/// The request for the page of a snapshot that begins with the user after `after` (the
/// first page: after user 0). A snapshot too large for one answer comes in pages
/// ([`Kind::SnapshotPart`], then a last [`Kind::Snapshot`]); the asker joins them and
/// takes the first page's number for the whole. Records hold states, not steps, so the
/// changes numbered after the first page, applied over the later pages, end where the
/// sender is.
pub fn snapshot_request(after: UserId) -> Vec<u8> {
    let mut request = vec![MAGIC, VERSION, 3];
    request.extend_from_slice(&after.0.to_le_bytes());
    request
}

/// The user a request made by [`snapshot_request`] asks to begin after; `None` for
/// anything else.
pub fn snapshot_request_after(bytes: &[u8]) -> Option<UserId> {
    match bytes {
        [MAGIC, VERSION, 3, after @ ..] => Some(UserId(u64::from_le_bytes(after.try_into().ok()?))),
        _ => None,
    }
}

/// The last user a page of a snapshot names (the next page begins after it).
pub fn last_user(records: &[Record]) -> Option<UserId> {
    records
        .iter()
        .map(|r| match *r {
            Record::Conns { user, .. } | Record::Mode { user, .. } => user,
        })
        .max()
}

/// What a peer's notices change in the presence table of its users' home shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// The peer's changes, in order.
    Apply(Vec<Record>),
    /// The peer's whole state: its connections are those these records name open, and no
    /// others.
    Reset(Vec<Record>),
    /// The peer has not been heard from for too long: none of its connections counts.
    Gone,
}

/// What the [`Tracker`] asks its owner to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Give the table `input` from node `from`.
    Table {
        /// The peer.
        from: u64,
        /// What it changes.
        input: Input,
    },
    /// Ask node `from` for a snapshot, and pass the answer to [`Tracker::snapshot`] (or
    /// call [`Tracker::ask_failed`]).
    Ask {
        /// The peer.
        from: u64,
    },
}

/// What a receiver knows of one peer.
#[derive(Debug)]
struct Peer {
    incarnation: u64,
    /// The last number taken.
    seq: u64,
    /// Whether the table holds the peer's state up to `seq`.
    synced: bool,
    /// Whether a snapshot has been asked for and not answered.
    asking: bool,
    /// Changes that came while out of sync: (incarnation, number, records).
    waiting: Vec<(u64, u64, Vec<Record>)>,
    heard: Instant,
    /// Whether the table was told the peer is gone (and not told of it since).
    gone: bool,
}

/// Takes the notices of every peer of one shard in sequence, as the module documentation
/// says; pure: its owner feeds it the notices, snapshots and time, and does what it asks.
#[derive(Debug, Default)]
pub struct Tracker {
    peers: BTreeMap<u64, Peer>,
}

impl Tracker {
    /// An empty tracker: nothing heard from anyone.
    pub fn new() -> Tracker {
        Tracker::default()
    }

    /// A notice from `from` (changes or a keepalive; a snapshot goes to
    /// [`Tracker::snapshot`]).
    pub fn heard(&mut self, now: Instant, from: u64, notice: Notice) -> Vec<Action> {
        match notice.kind {
            Kind::Snapshot => return self.snapshot(now, from, notice),
            // Pages are joined by the asker before they come here.
            Kind::SnapshotPart => return Vec::new(),
            Kind::Changes | Kind::Keepalive => {}
        }
        let p = self.peers.entry(from).or_insert_with(|| Peer {
            incarnation: notice.incarnation,
            seq: 0,
            synced: false,
            asking: false,
            waiting: Vec::new(),
            heard: now,
            gone: false,
        });
        p.heard = now;
        if p.synced && p.incarnation == notice.incarnation {
            match notice.kind {
                Kind::Changes if notice.seq <= p.seq => return Vec::new(),
                Kind::Changes if notice.seq == p.seq + 1 => {
                    p.seq = notice.seq;
                    let input = Input::Apply(notice.records);
                    return vec![Action::Table { from, input }];
                }
                Kind::Keepalive if notice.seq <= p.seq => return Vec::new(),
                _ => p.synced = false,
            }
        }
        if notice.kind == Kind::Changes {
            if p.waiting.len() >= WAITING_MAX {
                p.waiting.clear();
            }
            p.waiting
                .push((notice.incarnation, notice.seq, notice.records));
        }
        if p.asking {
            return Vec::new();
        }
        p.asking = true;
        vec![Action::Ask { from }]
    }

    /// `from`'s answer to a request for its snapshot: it replaces what the table knew of
    /// `from`, then the changes that came after it, in order, as far as they go unbroken.
    pub fn snapshot(&mut self, now: Instant, from: u64, notice: Notice) -> Vec<Action> {
        let Some(p) = self.peers.get_mut(&from) else {
            return Vec::new();
        };
        p.asking = false;
        p.heard = now;
        p.gone = false;
        p.synced = true;
        p.incarnation = notice.incarnation;
        p.seq = notice.seq;
        let mut actions = vec![Action::Table {
            from,
            input: Input::Reset(notice.records),
        }];
        let mut waiting = std::mem::take(&mut p.waiting);
        waiting.sort_by_key(|(_, seq, _)| *seq);
        for (incarnation, seq, records) in waiting {
            if incarnation != p.incarnation || seq <= p.seq {
                continue;
            }
            if seq != p.seq + 1 {
                // A gap: the next notice asks again.
                p.synced = false;
                break;
            }
            p.seq = seq;
            let input = Input::Apply(records);
            actions.push(Action::Table { from, input });
        }
        actions
    }

    /// A snapshot asked of `from` did not come: the next notice asks again.
    pub fn ask_failed(&mut self, from: u64) {
        if let Some(p) = self.peers.get_mut(&from) {
            p.asking = false;
        }
    }

    /// Peers silent for longer than [`SILENT_MAX`] by `now` are gone (once each time).
    pub fn tick(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        for (&from, p) in &mut self.peers {
            if !p.gone && now.saturating_duration_since(p.heard) > SILENT_MAX {
                p.gone = true;
                p.synced = false;
                p.waiting.clear();
                actions.push(Action::Table {
                    from,
                    input: Input::Gone,
                });
            }
        }
        actions
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conns(user: u64, active: Option<bool>) -> Record {
        Record::Conns {
            user: UserId(user),
            active,
            last_active_us: Some(5),
        }
    }

    fn notice(kind: Kind, incarnation: u64, seq: u64, records: Vec<Record>) -> Notice {
        Notice {
            kind,
            incarnation,
            seq,
            records,
        }
    }

    #[test]
    fn notices_read_back_as_written_and_garbage_reads_as_nothing() {
        let records = vec![
            conns(1, None),
            conns(2, Some(false)),
            conns(3, Some(true)),
            Record::Mode {
                user: UserId(4),
                mode: Mode::Dnd,
                dnd_until_us: Some(77),
                at_us: 99,
            },
            Record::Mode {
                user: UserId(5),
                mode: Mode::Invisible,
                dnd_until_us: None,
                at_us: 1,
            },
        ];
        let n = notice(Kind::Changes, 7, 8, records);
        let bytes = n.encode();
        assert_eq!(Notice::decode(&bytes).as_ref(), Some(&n));
        for cut in 0..bytes.len() {
            // A cut between records reads as the records before it; anywhere else it reads
            // as nothing.
            if let Some(d) = Notice::decode(&bytes[..cut]) {
                assert!(d.records.len() < n.records.len(), "cut at {cut}");
                assert_eq!(d.records, n.records[..d.records.len()], "cut at {cut}");
            }
        }
        let mut bad = bytes.clone();
        bad[19] = 9;
        assert_eq!(Notice::decode(&bad), None);
        assert_eq!(Notice::decode(b"{\"Typing\":{}}"), None);
        let request = snapshot_request(UserId(77));
        assert_eq!(snapshot_request_after(&request), Some(UserId(77)));
        assert_eq!(Notice::decode(&request), None);
        assert_eq!(snapshot_request_after(&bytes), None);
        assert_eq!(snapshot_request_after(&request[..10]), None);
        let part = notice(Kind::SnapshotPart, 1, 2, vec![conns(9, Some(true))]);
        assert_eq!(Notice::decode(&part.encode()), Some(part));
    }

    #[test]
    fn changes_in_sequence_apply_and_a_gap_asks_for_a_snapshot_that_resumes_them() {
        let t0 = Instant::now();
        let mut t = Tracker::new();
        // Nothing known yet: ask.
        let a = t.heard(t0, 2, notice(Kind::Keepalive, 1, 4, vec![]));
        assert_eq!(a, vec![Action::Ask { from: 2 }]);
        // Changes while asking wait, and do not ask again.
        let a = t.heard(
            t0,
            2,
            notice(Kind::Changes, 1, 5, vec![conns(1, Some(true))]),
        );
        assert!(a.is_empty());
        let a = t.heard(
            t0,
            2,
            notice(Kind::Changes, 1, 6, vec![conns(2, Some(true))]),
        );
        assert!(a.is_empty());
        // The snapshot includes 5: it resets, then 6 applies.
        let snap = notice(Kind::Snapshot, 1, 5, vec![conns(1, Some(true))]);
        let a = t.snapshot(t0, 2, snap);
        assert_eq!(
            a,
            vec![
                Action::Table {
                    from: 2,
                    input: Input::Reset(vec![conns(1, Some(true))])
                },
                Action::Table {
                    from: 2,
                    input: Input::Apply(vec![conns(2, Some(true))])
                }
            ]
        );
        // In sequence: applied; old: dropped; keepalive behind: nothing.
        let a = t.heard(t0, 2, notice(Kind::Changes, 1, 7, vec![conns(3, None)]));
        assert_eq!(a.len(), 1);
        assert!(t
            .heard(t0, 2, notice(Kind::Changes, 1, 7, vec![]))
            .is_empty());
        assert!(t
            .heard(t0, 2, notice(Kind::Keepalive, 1, 7, vec![]))
            .is_empty());
        // A keepalive ahead (a notice was lost): ask.
        let a = t.heard(t0, 2, notice(Kind::Keepalive, 1, 9, vec![]));
        assert_eq!(a, vec![Action::Ask { from: 2 }]);
        t.ask_failed(2);
        // A new incarnation (the peer restarted): ask again.
        let a = t.heard(t0, 2, notice(Kind::Changes, 2, 1, vec![]));
        assert_eq!(a, vec![Action::Ask { from: 2 }]);
    }

    #[test]
    fn a_silent_peer_is_gone_once_and_asked_again_when_heard() {
        let t0 = Instant::now();
        let mut t = Tracker::new();
        t.heard(t0, 3, notice(Kind::Keepalive, 1, 0, vec![]));
        t.snapshot(t0, 3, notice(Kind::Snapshot, 1, 0, vec![]));
        assert!(t.tick(t0 + SILENT_MAX).is_empty());
        let later = t0 + SILENT_MAX + Duration::from_millis(1);
        let gone = Action::Table {
            from: 3,
            input: Input::Gone,
        };
        assert_eq!(t.tick(later), vec![gone]);
        assert!(t.tick(later + SILENT_MAX * 2).is_empty());
        // Heard again, even in sequence: its state must be asked for.
        let a = t.heard(later, 3, notice(Kind::Keepalive, 1, 0, vec![]));
        assert_eq!(a, vec![Action::Ask { from: 3 }]);
    }
}
