//! What the simulated clients know and did: the harness's memory, which outlives every
//! crash of the node. Every operation a client issues is recorded with its outcome, and
//! every frame a client receives is checked at once against the stream rules and kept for
//! the final check against the logs (`checker`).

use bytes::Bytes;
use chorus_engine::ids::{ChannelId, MessageId, UserId, WorkspaceId};
use serde_json::Value;
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

/// An operation a client issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpKind {
    /// `message:send`, identified by its `client_msg_id`.
    Post {
        /// The channel.
        channel: ChannelId,
        /// The idempotency key: unique per operation, reused only by a retry.
        key: String,
        /// Whether the text is over the inline limit (a blob).
        large: bool,
    },
    /// `message:edit` with a text no other operation uses.
    Edit {
        /// The message.
        message: MessageId,
        /// The new text.
        text: String,
    },
    /// `message:delete`.
    Delete {
        /// The message.
        message: MessageId,
    },
    /// `reaction:add` with an emoji no other operation adds.
    ReactAdd {
        /// The message.
        message: MessageId,
        /// The emoji.
        emoji: String,
    },
    /// `reaction:remove` of an emoji this user added.
    ReactRemove {
        /// The message.
        message: MessageId,
        /// The emoji.
        emoji: String,
    },
    /// Joining a public channel (through the API, as REST does).
    Join {
        /// The channel.
        channel: ChannelId,
    },
    /// Leaving a channel.
    Leave {
        /// The channel.
        channel: ChannelId,
    },
    /// Creating a channel.
    CreateChannel {
        /// The workspace.
        workspace: WorkspaceId,
        /// The name, unique per run.
        name: String,
    },
    /// Opening a DM.
    OpenDm {
        /// The workspace.
        workspace: WorkspaceId,
        /// The other members.
        with: Vec<UserId>,
    },
}

/// How an operation ended, as far as its client knows.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Issued, no answer yet.
    Pending,
    /// Answered with success; for posts and edits, the message as the ack showed it.
    Acked(Option<Value>),
    /// Refused by the rules (a 4xx error): it must have changed nothing.
    Refused(String),
    /// Its answer was lost (a crash, a closed session, a 503): it may or may not have
    /// taken effect, and if it did, exactly once.
    Unknown,
}

/// One issued operation.
#[derive(Debug, Clone)]
pub struct Op {
    /// Who issued it.
    pub user: UserId,
    /// What it was.
    pub kind: OpKind,
    /// How it ended.
    pub outcome: Outcome,
}

/// A message a user posted and was acknowledged.
#[derive(Debug, Clone)]
pub struct Mine {
    /// The message.
    pub id: MessageId,
    /// A delete of it was issued (acknowledged or not): it is not touched again.
    pub deleted: bool,
}

/// What one simulated user knows.
#[derive(Debug)]
pub struct UserState {
    /// The user.
    pub id: UserId,
    /// The workspaces the user belongs to.
    pub workspaces: Vec<WorkspaceId>,
    /// The channels the user believes it is a member of.
    pub channels: BTreeSet<ChannelId>,
    /// The last seq received per channel, over every connection: where a resume starts.
    pub last: BTreeMap<ChannelId, u64>,
    /// Channels whose last event received was the user's own `member:left`.
    pub left: BTreeSet<ChannelId>,
    /// Acknowledged posts of the user.
    pub mine: Vec<Mine>,
    /// Acknowledged reactions of the user, not removed since.
    pub reactions: Vec<(MessageId, String)>,
    /// Posts whose outcome is unknown, to send again with the same key.
    pub retry: Vec<(ChannelId, String, bool)>,
    /// Connections made.
    pub connections: u64,
    /// The channels the current connection named in its first-frame `resume`: their
    /// streams continue from the last seq received. `None` when it did not resume.
    pub resumed: Option<BTreeSet<ChannelId>>,
    /// The channels the current connection has received an event of.
    pub this_connection: BTreeSet<ChannelId>,
    /// The highest `read_seq` a `read` frame showed per channel, over every connection.
    pub read: BTreeMap<ChannelId, u64>,
}

impl UserState {
    /// A new connection, which resumed the channels `named` (or did not resume).
    pub fn connected(&mut self, named: Option<BTreeSet<ChannelId>>) {
        self.connections += 1;
        self.resumed = named;
        self.this_connection.clear();
    }

    /// A user who knows nothing yet.
    pub fn new(id: UserId) -> UserState {
        UserState {
            id,
            workspaces: Vec::new(),
            channels: BTreeSet::new(),
            last: BTreeMap::new(),
            left: BTreeSet::new(),
            mine: Vec::new(),
            reactions: Vec::new(),
            retry: Vec::new(),
            connections: 0,
            resumed: None,
            this_connection: BTreeSet::new(),
            read: BTreeMap::new(),
        }
    }
}

/// A frame a client received: checked against the final logs.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Who received it.
    pub user: UserId,
    /// The channel.
    pub channel: ChannelId,
    /// Its seq.
    pub seq: u64,
    /// The bytes as received.
    pub frame: Bytes,
}

/// Counts for the report.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counters {
    /// Connections opened.
    pub connections: u64,
    /// Sessions that ended with resume required.
    pub resume_required: u64,
    /// Sessions that ended for a heartbeat timeout.
    pub heartbeat_timeouts: u64,
    /// `resumed` frames received and checked.
    pub resumed: u64,
    /// Event frames received.
    pub events: u64,
    /// Typing frames received.
    pub typing: u64,
    /// `presence` frames received and checked.
    pub presence: u64,
    /// `read` frames received and checked.
    pub reads: u64,
    /// Operations issued.
    pub ops: u64,
    /// Operations acknowledged.
    pub acked: u64,
    /// Operations refused.
    pub refused: u64,
    /// Operations whose outcome was lost.
    pub unknown: u64,
}

/// Everything the clients know; shared by every client task through [`WorldRef`].
#[derive(Debug, Default)]
pub struct World {
    /// The users, by index.
    pub users: Vec<UserState>,
    /// Every operation issued, by number.
    pub ops: Vec<Op>,
    /// Every event frame received.
    pub seen: Vec<Seen>,
    /// Rules broken, found as frames arrived.
    pub violations: Vec<String>,
    /// Counts for the report.
    pub counters: Counters,
    /// Makes names and keys unique per run.
    pub next_unique: u64,
    /// The workspaces, with their public channels and all their members.
    pub workspaces: Vec<WorkspaceModel>,
}

/// A workspace as the harness set it up.
#[derive(Debug, Clone)]
pub struct WorkspaceModel {
    /// The workspace.
    pub id: WorkspaceId,
    /// Its members, by user index.
    pub members: Vec<usize>,
    /// Its public channels.
    pub public: Vec<ChannelId>,
}

/// A shared handle on the world.
pub type WorldRef = Rc<RefCell<World>>;

thread_local! {
    static TRACE: bool = std::env::var("CHORUS_SIM_TRACE").is_ok_and(|v| v == "1");
}

/// Whether `CHORUS_SIM_TRACE=1` asks for a trace of every client's actions on stderr.
pub fn tracing() -> bool {
    TRACE.with(|t| *t)
}

impl World {
    /// A number no other call returns in this run.
    pub fn unique(&mut self) -> u64 {
        self.next_unique += 1;
        self.next_unique
    }

    /// Records an issued operation; returns its number.
    pub fn issue(&mut self, user: UserId, kind: OpKind) -> usize {
        self.counters.ops += 1;
        self.ops.push(Op {
            user,
            kind,
            outcome: Outcome::Pending,
        });
        self.ops.len() - 1
    }

    /// Records how an operation ended.
    pub fn settle(&mut self, op: usize, outcome: Outcome) {
        match &outcome {
            Outcome::Acked(_) => self.counters.acked += 1,
            Outcome::Refused(_) => self.counters.refused += 1,
            Outcome::Unknown => self.counters.unknown += 1,
            Outcome::Pending => {}
        }
        self.ops[op].outcome = outcome;
    }

    /// Every operation still pending lost its answer (the node crashed).
    pub fn lose_pending(&mut self) {
        let pending: Vec<usize> = (0..self.ops.len())
            .filter(|i| self.ops[*i].outcome == Outcome::Pending)
            .collect();
        for op in pending {
            self.after_unknown(op);
            self.settle(op, Outcome::Unknown);
        }
    }

    /// What a client does about an operation whose outcome it will never learn: a post is
    /// sent again with the same key; a message whose delete may have happened is left
    /// alone.
    pub fn after_unknown(&mut self, op: usize) {
        let Op { user, kind, .. } = self.ops[op].clone();
        let Some(u) = self.users.iter_mut().find(|u| u.id == user) else {
            return;
        };
        match kind {
            OpKind::Post {
                channel,
                key,
                large,
            } => u.retry.push((channel, key, large)),
            OpKind::Delete { message } | OpKind::Edit { message, .. } => {
                if let Some(m) = u.mine.iter_mut().find(|m| m.id == message) {
                    m.deleted = true;
                }
            }
            _ => {}
        }
    }

    /// Checks an event frame received by `user` against the stream rules, and records it.
    ///
    /// Per channel, each event's seq is one more than the last the user received, on this
    /// connection or (for a channel its first-frame `resume` named) an earlier one. The
    /// gaps allowed: a rejoin (after the user's own `member:left`, the next event of the
    /// channel is its own `member:joined`, at any later seq), and the first event of a
    /// channel on a connection that did not resume it (the session starts live: what
    /// happened while the user was away is not sent). A seq never repeats. (A catch-up
    /// that reaches past the user's leave, because it rejoined since, goes on gaplessly
    /// through what happened while it was out, as its history would show it.)
    pub fn on_event(&mut self, user_index: usize, frame: &Bytes, v: &Value) {
        self.counters.events += 1;
        let user = self.users[user_index].id;
        let (Some(channel), Some(seq)) = (
            v["channel_id"]
                .as_str()
                .and_then(|c| c.parse::<ChannelId>().ok()),
            v["seq"].as_u64(),
        ) else {
            self.violations.push(format!(
                "user {user}: an event frame without channel or seq: {v}"
            ));
            return;
        };
        let kind = v["event"]["type"].as_str().unwrap_or("");
        let about_me = v["event"]["user_id"].as_str() == Some(&user.to_string());
        let u = &mut self.users[user_index];
        let rejoin = kind == "member:joined" && about_me;
        let fresh = !u.this_connection.contains(&channel)
            && !u
                .resumed
                .as_ref()
                .is_some_and(|named| named.contains(&channel));
        u.this_connection.insert(channel);
        if fresh {
            // The user may have left and rejoined while away.
            u.left.remove(&channel);
        }
        match u.last.get(&channel) {
            Some(&last) if seq <= last => self.violations.push(format!(
                "user {user}, channel {channel}: seq {seq} after {last} (a repeat or out of order)"
            )),
            Some(&last) if seq > last + 1 && !fresh && !(rejoin && u.left.contains(&channel)) => {
                self.violations.push(format!(
                    "user {user}, channel {channel}: seq {seq} after {last} (a gap)"
                ))
            }
            _ => {}
        }
        u.last.insert(channel, seq);
        if about_me && kind == "member:left" {
            u.left.insert(channel);
            u.channels.remove(&channel);
        } else if rejoin {
            u.left.remove(&channel);
            u.channels.insert(channel);
        }
        self.seen.push(Seen {
            user,
            channel,
            seq,
            frame: frame.clone(),
        });
    }

    /// Checks a `read` frame (`API.md` §9): a marker only moves forward, so a user's
    /// `read_seq` in a channel never goes back, over every connection and every crash (a
    /// frame goes out only once its marker is durable); it never passes the channel's
    /// `last_seq`; and the mentions counted are among the unread messages.
    pub fn on_read(&mut self, user_index: usize, v: &Value) {
        self.counters.reads += 1;
        let u = &mut self.users[user_index];
        let r = &v["read"];
        let fields = (
            r["channel_id"]
                .as_str()
                .and_then(|c| c.parse::<ChannelId>().ok()),
            r["read_seq"].as_u64(),
            r["last_seq"].as_u64(),
            r["unread_count"].as_u64(),
            r["mention_count"].as_u64(),
        );
        let (Some(channel), Some(read), Some(last), Some(unread), Some(mentions)) = fields else {
            self.violations
                .push(format!("user {}: a malformed read frame: {v}", u.id));
            return;
        };
        let before = u.read.insert(channel, read).unwrap_or(0);
        if read < before {
            self.violations.push(format!(
                "user {}, channel {channel}: read_seq {read} after {before} (a marker went back)",
                u.id
            ));
            u.read.insert(channel, before);
        }
        if read > last || mentions > unread || (read == last && unread > 0) {
            self.violations
                .push(format!("user {}: an inconsistent read frame: {v}", u.id));
        }
    }

    /// Checks a `resumed` frame: each channel it names ends at the last seq the user
    /// received, so the catch-up gave exactly what was missed.
    pub fn on_resumed(&mut self, user_index: usize, v: &Value) {
        self.counters.resumed += 1;
        let u = &self.users[user_index];
        let Some(channels) = v["channels"].as_object() else {
            self.violations
                .push(format!("user {}: a resumed frame without channels", u.id));
            return;
        };
        for (c, seq) in channels {
            let Ok(channel) = c.parse::<ChannelId>() else {
                continue;
            };
            let have = u.last.get(&channel).copied().unwrap_or(0);
            if seq.as_u64() != Some(have) {
                self.violations.push(format!(
                    "user {}, channel {channel}: resumed at {seq}, but the last event received was {have}",
                    u.id
                ));
            }
        }
    }
}
