//! The JSON shapes of `API.md`: users, workspaces, members, channels, messages, and the
//! `event` frame that every subscriber receives.
//!
//! A committed event is rendered into its frame once, by the partition that committed it,
//! and the same bytes go to every recipient.

use crate::domain::channel::{ChannelState, Message, StoredBody};
use crate::domain::e2ee::{ClaimedKey, DeviceKeys, E2eeDevice, ToDevice};
use crate::domain::event::{ChannelEvent, ChannelKind, Role};
use crate::domain::meta::{FileEntry, User, Workspace};
use crate::domain::notify::{self, ChannelPrefs, DndSchedule, NotifyPrefs, PushDevice};
use crate::domain::unread::ReadCounts;
use crate::ids::{ChannelId, FileId, MessageId, UserId, WorkspaceId};
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

/// The JSON of `value`, written into this thread's scratch buffer and copied out once at
/// its exact length. `serde_json::to_vec` starts a buffer at 128 bytes and doubles it as
/// it writes, so a frame of 600 bytes paid three reallocations and their copies, a page of
/// 20 KiB eight; and a `Vec` whose capacity is not its length costs `Bytes` another
/// allocation for its shared header. A buffer grown past 64 KiB is let go.
pub fn json<T: Serialize + ?Sized>(value: &T) -> serde_json::Result<bytes::Bytes> {
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    SCRATCH.with(|cell| {
        // A value whose serialization calls this again gets a buffer of its own.
        let Ok(mut buf) = cell.try_borrow_mut() else {
            return serde_json::to_vec(value).map(bytes::Bytes::from);
        };
        buf.clear();
        let written = serde_json::to_writer(&mut *buf, value);
        let out = written.map(|()| bytes::Bytes::copy_from_slice(&buf));
        if buf.capacity() > SCRATCH_KEPT {
            *buf = Vec::new();
        }
        out
    })
}

/// The most a thread's JSON scratch buffer keeps between uses: a history page of 50
/// messages fits; a larger answer gets its buffer back from the allocator each time.
const SCRATCH_KEPT: usize = 64 * 1024;

/// An RFC 3339 UTC time with microseconds, from microseconds since the epoch.
pub fn rfc3339(at_us: u64) -> String {
    Rfc3339(at_us).to_string()
}

/// A time in microseconds since the epoch, shown (and serialized) as [`rfc3339`] gives it,
/// with no `String` in between.
#[derive(Clone, Copy, Debug)]
pub struct Rfc3339(pub u64);

/// The first microsecond of the year 10000, which RFC 3339 cannot write.
const YEAR_10000_US: u64 = 253_402_300_800_000_000;

impl Rfc3339 {
    /// `YYYY-MM-DDTHH:MM:SS.ffffffZ`, written into a buffer on the stack: a page of history
    /// writes two per message, and `core::fmt` (which `humantime` goes through) made them a
    /// twentieth of a page's rendering. A time past the year 9999 shows as its last
    /// microsecond (`humantime` refused it, and `serde_json` panicked on the refusal).
    fn digits(self) -> [u8; 27] {
        let us = self.0.min(YEAR_10000_US - 1);
        let (secs, micros) = (us / 1_000_000, us % 1_000_000);
        let (days, rem) = (secs / 86_400, secs % 86_400);
        let (year, month, day) = civil_from_days(days);
        let mut out = *b"0000-00-00T00:00:00.000000Z";
        let mut put = |at: usize, width: usize, mut n: u64| {
            for i in (at..at + width).rev() {
                out[i] = b'0' + (n % 10) as u8;
                n /= 10;
            }
        };
        put(0, 4, year);
        put(5, 2, month);
        put(8, 2, day);
        put(11, 2, rem / 3600);
        put(14, 2, rem / 60 % 60);
        put(17, 2, rem % 60);
        put(20, 6, micros);
        out
    }
}

/// The written digits as text (they are ASCII by construction).
fn ascii(digits: &[u8]) -> &str {
    std::str::from_utf8(digits).expect("ascii digits")
}

/// The proleptic Gregorian (year, month, day) of a count of days since 1970-01-01: the
/// civil-from-days computation over 400-year eras (each 146,097 days), counted from
/// 0000-03-01 so that a leap day ends its year. The benchmark's report dates use it too.
pub fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

impl std::fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(ascii(&self.digits()))
    }
}

impl Serialize for Rfc3339 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(ascii(&self.digits()))
    }
}

/// `file`: `{"id","workspace_id","user_id","name","size","content_type","sha256",
/// "created_at","previews"}`, or `{"id","deleted":true}` once deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileView {
    /// The file's ID.
    pub id: FileId,
    /// Its workspace.
    pub workspace_id: WorkspaceId,
    /// The uploader.
    pub user_id: UserId,
    /// The name as given.
    pub name: String,
    /// Its length in bytes.
    pub size: u64,
    /// Its media type.
    pub content_type: String,
    /// The SHA-256 of its bytes.
    pub sha256: [u8; 32],
    /// When it was uploaded, in microseconds since the Unix epoch.
    pub created_at_us: u64,
    /// Whether it was deleted.
    pub deleted: bool,
    /// Its previews as decided so far: made, or never to be.
    pub previews: Vec<crate::domain::event::PreviewRecord>,
}

impl FileView {
    /// The decision about its preview of `kind`, if there is one yet.
    pub fn preview(&self, kind: &str) -> Option<&crate::domain::event::PreviewRecord> {
        self.previews.iter().find(|p| p.kind == kind)
    }

    /// The SHA-256 in lowercase hex.
    pub fn sha256_hex(&self) -> String {
        self.sha256.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl From<&FileEntry> for FileView {
    fn from(e: &FileEntry) -> FileView {
        let s = &e.stored;
        FileView {
            id: s.file,
            workspace_id: s.workspace,
            user_id: s.user,
            name: s.name.clone(),
            size: s.size,
            content_type: s.content_type.clone(),
            sha256: s.sha256,
            created_at_us: s.at_us,
            deleted: e.deleted,
            previews: e.previews.clone(),
        }
    }
}

impl Serialize for FileView {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.deleted {
            let mut map = s.serialize_map(Some(2))?;
            map.serialize_entry("id", &self.id)?;
            map.serialize_entry("deleted", &true)?;
            return map.end();
        }
        let mut map = s.serialize_map(Some(9))?;
        map.serialize_entry("id", &self.id)?;
        map.serialize_entry("workspace_id", &self.workspace_id)?;
        map.serialize_entry("user_id", &self.user_id)?;
        map.serialize_entry("name", &self.name)?;
        map.serialize_entry("size", &self.size)?;
        map.serialize_entry("content_type", &self.content_type)?;
        map.serialize_entry("sha256", &self.sha256_hex())?;
        map.serialize_entry("created_at", &rfc3339(self.created_at_us))?;
        // A key for each preview made: an image's dimensions, `{}` for an HTML one.
        let previews: serde_json::Map<String, serde_json::Value> = self
            .previews
            .iter()
            .filter_map(|p| {
                let made = p.made.as_ref()?;
                let value = if made.width == 0 {
                    serde_json::json!({})
                } else {
                    serde_json::json!({"width": made.width, "height": made.height})
                };
                Some((p.kind.clone(), value))
            })
            .collect();
        map.serialize_entry("previews", &previews)?;
        map.end()
    }
}

/// `user`: `{"id","email","name"}`.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct UserView {
    /// The user's ID.
    pub id: UserId,
    /// Login email.
    pub email: String,
    /// Display name.
    pub name: String,
}

impl From<&User> for UserView {
    fn from(u: &User) -> UserView {
        UserView {
            id: u.id,
            email: u.email.clone(),
            name: u.name.clone(),
        }
    }
}

/// `member`: a user with their workspace role.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct MemberView {
    /// The user's ID.
    pub id: UserId,
    /// Login email.
    pub email: String,
    /// Display name.
    pub name: String,
    /// `owner`, `admin` or `member`.
    pub role: &'static str,
}

impl MemberView {
    /// A member from a user and a role.
    pub fn new(u: &User, role: Role) -> MemberView {
        MemberView {
            id: u.id,
            email: u.email.clone(),
            name: u.name.clone(),
            role: role.as_str(),
        }
    }
}

/// `workspace`: `{"id","name"}`.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct WorkspaceView {
    /// The workspace's ID.
    pub id: WorkspaceId,
    /// Its name.
    pub name: String,
}

impl From<&Workspace> for WorkspaceView {
    fn from(w: &Workspace) -> WorkspaceView {
        WorkspaceView {
            id: w.id,
            name: w.name.clone(),
        }
    }
}

/// `channel`: `{"id","workspace_id","name","kind","encrypted","last_seq","partition"}`.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct ChannelView {
    /// The channel's ID.
    pub id: ChannelId,
    /// Its workspace.
    pub workspace_id: WorkspaceId,
    /// Its name (empty for DMs).
    pub name: String,
    /// `public`, `private`, `dm` or `group_dm`.
    pub kind: &'static str,
    /// Whether its messages are end-to-end encrypted (`API.md` §14).
    pub encrypted: bool,
    /// The seq of its last event.
    pub last_seq: u64,
    /// The partition that holds it (`API.md` §15; on a single node too, which leads them
    /// all).
    pub partition: u32,
    /// The caller's read state, in a list of the caller's channels (`API.md` §9): absent
    /// where the view is not for one caller.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub read: Option<ChannelReadFields>,
}

/// The caller's `read_seq`, `unread_count` and `mention_count` on a channel object. For a
/// public channel the caller is not in, `read_seq` is null and the counts are 0.
#[derive(Serialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelReadFields {
    /// The caller's read marker, or null when not a member.
    pub read_seq: Option<u64>,
    /// Messages after it that others posted and that are not deleted.
    pub unread_count: u64,
    /// Those of them that mention the caller.
    pub mention_count: u64,
}

impl ChannelReadFields {
    /// The fields for a member with `counts`, or for a non-member.
    pub fn of(counts: Option<ReadCounts>) -> ChannelReadFields {
        ChannelReadFields {
            read_seq: counts.map(|c| c.read_seq),
            unread_count: counts.map_or(0, |c| c.unread_count),
            mention_count: counts.map_or(0, |c| c.mention_count),
        }
    }
}

/// `read`: `{"channel_id","read_seq","last_seq","unread_count","mention_count"}`, one
/// member's read state in one channel (`API.md` §9).
#[derive(Serialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadView {
    /// The channel.
    pub channel_id: ChannelId,
    /// The highest seq the member has read.
    pub read_seq: u64,
    /// The channel's last seq.
    pub last_seq: u64,
    /// Messages after `read_seq` that others posted and that are not deleted.
    pub unread_count: u64,
    /// Those of them that mention the member (every one of them in a DM).
    pub mention_count: u64,
}

impl ReadView {
    /// A member's read state from the channel's counts.
    pub fn new(channel: ChannelId, last_seq: u64, c: ReadCounts) -> ReadView {
        ReadView {
            channel_id: channel,
            read_seq: c.read_seq,
            last_seq,
            unread_count: c.unread_count,
            mention_count: c.mention_count,
        }
    }

    /// The `read` frame that tells a member's connections about a marker change:
    /// `{"type":"read","read":{...}}`.
    pub fn frame(&self) -> bytes::Bytes {
        #[derive(Serialize)]
        struct Frame<'a> {
            r#type: &'static str,
            read: &'a ReadView,
        }
        json(&Frame {
            r#type: "read",
            read: self,
        })
        .expect("a read view serializes")
    }
}

impl ChannelView {
    /// A channel view.
    pub fn new(
        id: ChannelId,
        workspace: WorkspaceId,
        name: &str,
        kind: ChannelKind,
        last_seq: u64,
    ) -> ChannelView {
        ChannelView {
            id,
            workspace_id: workspace,
            name: name.to_owned(),
            kind: kind.as_str(),
            encrypted: kind.is_encrypted(),
            last_seq,
            partition: crate::domain::meta::partition_of(id),
            read: None,
        }
    }
}

/// `message`, as it stands. `text` is the resolved body (blob bodies are read by the
/// caller); a deleted message has an empty text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageView {
    /// The message's ID.
    pub id: MessageId,
    /// Its channel.
    pub channel_id: ChannelId,
    /// The seq of the event that created it.
    pub seq: u64,
    /// The author.
    pub user_id: UserId,
    /// The current text (empty in an encrypted channel).
    pub text: String,
    /// The current ciphertext, in an encrypted channel (`API.md` §14).
    pub ciphertext: Option<String>,
    /// The thread root, for a reply.
    pub thread_id: Option<MessageId>,
    /// Replies, for a root.
    pub reply_count: u32,
    /// Reactions in the order they first appeared.
    pub reactions: Vec<(String, Vec<UserId>)>,
    /// When it was last edited.
    pub edited_at: Option<u64>,
    /// Whether it was deleted.
    pub deleted: bool,
    /// When it was posted.
    pub created_at: u64,
    /// The client's idempotency key.
    pub client_msg_id: Option<String>,
    /// Its files (`API.md` §11), resolved by whoever makes the view.
    pub files: Vec<FileView>,
}

impl MessageView {
    /// A view of a message with its resolved text.
    pub fn new(channel: ChannelId, m: &Message, text: &str) -> MessageView {
        MessageView {
            id: MessageId {
                channel,
                seq: m.seq,
            },
            channel_id: channel,
            seq: m.seq,
            user_id: m.user,
            text: if m.deleted {
                String::new()
            } else {
                text.to_owned()
            },
            ciphertext: match m.body() {
                StoredBody::Ciphertext(c) if !m.deleted => Some(c.as_str().to_owned()),
                _ => None,
            },
            thread_id: m.thread.map(|seq| MessageId { channel, seq }),
            reply_count: m.reply_count,
            reactions: m.reactions.clone(),
            edited_at: m.edited_at,
            deleted: m.deleted,
            created_at: m.created_at,
            client_msg_id: m.client_msg_id.clone(),
            files: Vec::new(),
        }
    }
}

/// One body a message had, in its edit history: `{"text","ciphertext"?,"at"}`. In an
/// encrypted channel the text is empty and the ciphertext is the one it had then.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct VersionView {
    /// The text.
    pub text: String,
    /// The ciphertext, in an encrypted channel (`API.md` §14).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ciphertext: Option<String>,
    /// When it was set, RFC 3339.
    pub at: String,
}

struct Reactions<'a>(&'a [(String, Vec<UserId>)]);

impl Serialize for Reactions<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (emoji, users) in self.0 {
            map.serialize_entry(emoji, users)?;
        }
        map.end()
    }
}

impl Serialize for MessageView {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let fields = 13 + usize::from(self.ciphertext.is_some());
        let mut map = s.serialize_map(Some(fields))?;
        map.serialize_entry("id", &self.id)?;
        map.serialize_entry("channel_id", &self.channel_id)?;
        map.serialize_entry("seq", &self.seq)?;
        map.serialize_entry("user_id", &self.user_id)?;
        map.serialize_entry("text", &self.text)?;
        if let Some(c) = &self.ciphertext {
            map.serialize_entry("ciphertext", c)?;
        }
        map.serialize_entry("thread_id", &self.thread_id)?;
        map.serialize_entry("reply_count", &self.reply_count)?;
        map.serialize_entry("reactions", &Reactions(&self.reactions))?;
        map.serialize_entry("edited_at", &self.edited_at.map(Rfc3339))?;
        map.serialize_entry("deleted", &self.deleted)?;
        map.serialize_entry("created_at", &Rfc3339(self.created_at))?;
        map.serialize_entry("client_msg_id", &self.client_msg_id)?;
        map.serialize_entry("files", &self.files)?;
        map.end()
    }
}

/// The `event` object inside an event frame.
#[derive(Serialize)]
#[serde(tag = "type")]
enum EventBody<'a> {
    #[serde(rename = "message:new")]
    MessageNew { message: &'a MessageView },
    #[serde(rename = "message:edited")]
    MessageEdited { message: &'a MessageView },
    #[serde(rename = "message:deleted")]
    MessageDeleted {
        message: &'a MessageView,
        by: UserId,
    },
    #[serde(rename = "reaction:added")]
    ReactionAdded {
        message_id: MessageId,
        emoji: &'a str,
        user_id: UserId,
        message: &'a MessageView,
    },
    #[serde(rename = "reaction:removed")]
    ReactionRemoved {
        message_id: MessageId,
        emoji: &'a str,
        user_id: UserId,
        message: &'a MessageView,
    },
    #[serde(rename = "member:joined")]
    MemberJoined { user_id: UserId, by: UserId },
    #[serde(rename = "member:left")]
    MemberLeft { user_id: UserId, by: UserId },
    #[serde(rename = "device:added")]
    DeviceAdded { user_id: UserId, device_id: &'a str },
    #[serde(rename = "device:removed")]
    DeviceRemoved { user_id: UserId, device_id: &'a str },
}

#[derive(Serialize)]
struct EventFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    channel_id: ChannelId,
    seq: u64,
    event: EventBody<'a>,
}

/// Renders the `event` frame of a committed channel event, with the message as it stands
/// after the event. `view` makes a message's view (its body's text and its files resolved).
pub fn event_frame(
    state: &ChannelState,
    seq: u64,
    event: &ChannelEvent,
    view: impl Fn(&Message) -> MessageView,
) -> bytes::Bytes {
    let channel = state.id;
    let view_of = |target: u64| {
        state
            .message_at(target)
            .map(&view)
            .expect("an event's message exists once it is applied")
    };
    let mid = |seq| MessageId { channel, seq };
    let message;
    let body = match event {
        ChannelEvent::MemberJoined { user, by } => EventBody::MemberJoined {
            user_id: *user,
            by: *by,
        },
        ChannelEvent::MemberLeft { user, by } => EventBody::MemberLeft {
            user_id: *user,
            by: *by,
        },
        ChannelEvent::DeviceAdded { user, device } => EventBody::DeviceAdded {
            user_id: *user,
            device_id: device,
        },
        ChannelEvent::DeviceRemoved { user, device } => EventBody::DeviceRemoved {
            user_id: *user,
            device_id: device,
        },
        ChannelEvent::MessagePosted { .. } | ChannelEvent::MessagePostedWithFiles(_) => {
            message = view_of(seq);
            EventBody::MessageNew { message: &message }
        }
        ChannelEvent::MessageEdited { target, .. } => {
            message = view_of(*target);
            EventBody::MessageEdited { message: &message }
        }
        ChannelEvent::MessageDeleted { target, by } => {
            message = view_of(*target);
            EventBody::MessageDeleted {
                message: &message,
                by: *by,
            }
        }
        ChannelEvent::ReactionAdded {
            target,
            emoji,
            user,
        } => {
            message = view_of(*target);
            EventBody::ReactionAdded {
                message_id: mid(*target),
                emoji,
                user_id: *user,
                message: &message,
            }
        }
        ChannelEvent::ReactionRemoved {
            target,
            emoji,
            user,
        } => {
            message = view_of(*target);
            EventBody::ReactionRemoved {
                message_id: mid(*target),
                emoji,
                user_id: *user,
                message: &message,
            }
        }
    };
    json(&EventFrame {
        kind: "event",
        channel_id: channel,
        seq,
        event: body,
    })
    .expect("frames always serialize")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::channel::StoredBody;
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    // The stack-written RFC 3339 time is humantime's, character for character: around the
    // epoch, leap days and century years, a spread of instants up to the last microsecond
    // of 9999; past it (humantime refuses), that last microsecond.
    #[test]
    fn rfc3339_matches_humantime() {
        let day = 86_400_000_000u64;
        let mut times = vec![0, 1, 999_999, 1_000_000, day - 1, day, YEAR_10000_US - 1];
        for (y, m, d) in [
            (1972, 2, 29),
            (2000, 2, 29),
            (2000, 3, 1),
            (2100, 2, 28),
            (2100, 3, 1),
            (2400, 2, 29),
            (2026, 12, 31),
        ] {
            let at: SystemTime =
                humantime::parse_rfc3339(&format!("{y:04}-{m:02}-{d:02}T23:59:59.999999Z"))
                    .unwrap();
            let us = at.duration_since(UNIX_EPOCH).unwrap().as_micros() as u64;
            times.extend([us, us + 1, us - day]);
        }
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            times.push(x % YEAR_10000_US);
        }
        for us in times {
            let want = humantime::format_rfc3339_micros(UNIX_EPOCH + Duration::from_micros(us))
                .to_string();
            assert_eq!(Rfc3339(us).to_string(), want, "{us}");
            assert_eq!(
                serde_json::to_string(&Rfc3339(us)).unwrap(),
                format!("\"{want}\"")
            );
        }
        for past in [YEAR_10000_US, u64::MAX] {
            assert_eq!(Rfc3339(past).to_string(), "9999-12-31T23:59:59.999999Z");
        }
    }

    // A message renders with every field of API.md, reactions in order, and RFC 3339 times.
    #[test]
    fn message_shape() {
        let m = Message {
            seq: 5,
            user: UserId(2),
            versions: smallvec::smallvec![(StoredBody::Text("hi".into()), 0)],
            thread: Some(3),
            reply_count: 0,
            reactions: vec![
                ("tada".into(), vec![UserId(2)]),
                ("+1".into(), vec![UserId(1)]),
            ],
            edited_at: None,
            deleted: false,
            created_at: 1_500_000,
            client_msg_id: Some("k".into()),
            files: Box::default(),
        };
        let v = serde_json::to_value(MessageView::new(ChannelId(7), &m, "hi")).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        for k in [
            "id",
            "channel_id",
            "seq",
            "user_id",
            "text",
            "thread_id",
            "reply_count",
            "reactions",
            "edited_at",
            "deleted",
            "created_at",
            "client_msg_id",
        ] {
            assert!(keys.contains(&k), "{k} missing");
        }
        assert_eq!(v["created_at"], "1970-01-01T00:00:01.500000Z");
        assert_eq!(
            v["thread_id"],
            MessageId {
                channel: ChannelId(7),
                seq: 3
            }
            .to_string()
        );
        let text = serde_json::to_string(&MessageView::new(ChannelId(7), &m, "hi")).unwrap();
        assert!(text.find("tada").unwrap() < text.find("+1").unwrap());
    }
}

// ---------------------------------------------------------------------------------------
// Notification preferences (`API.md` §13)
// ---------------------------------------------------------------------------------------

/// `prefs`: `{"push","email","email_digest_s","keywords","dnd_schedule"}`.
impl Serialize for NotifyPrefs {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(5))?;
        map.serialize_entry("push", self.push.as_str())?;
        map.serialize_entry("email", self.email.as_str())?;
        map.serialize_entry("email_digest_s", &self.email_digest_s)?;
        map.serialize_entry("keywords", &self.keywords)?;
        map.serialize_entry("dnd_schedule", &self.dnd_schedule)?;
        map.end()
    }
}

/// `{"tz","days","start","end"}`, days Monday first.
impl Serialize for DndSchedule {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let days: Vec<&str> = (0..7)
            .filter(|i| self.starts_on(*i))
            .map(|i| notify::DAY_NAMES[i])
            .collect();
        let mut map = s.serialize_map(Some(4))?;
        map.serialize_entry("tz", &self.tz)?;
        map.serialize_entry("days", &days)?;
        map.serialize_entry("start", &notify::hhmm(self.start_min))?;
        map.serialize_entry("end", &notify::hhmm(self.end_min))?;
        map.end()
    }
}

/// `channel_prefs`: `{"channel_id","level","muted"}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelPrefsView {
    /// The channel.
    pub channel: ChannelId,
    /// The user's preferences for it.
    pub prefs: ChannelPrefs,
}

impl Serialize for ChannelPrefsView {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(3))?;
        map.serialize_entry("channel_id", &self.channel)?;
        map.serialize_entry("level", self.prefs.level.as_str())?;
        map.serialize_entry("muted", &self.prefs.muted)?;
        map.end()
    }
}

/// `device`: `{"id","app_id","pushkey","platform","created_at"}`.
impl Serialize for PushDevice {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(5))?;
        map.serialize_entry("id", &self.id)?;
        map.serialize_entry("app_id", &self.app_id)?;
        map.serialize_entry("pushkey", &self.pushkey)?;
        map.serialize_entry("platform", self.platform.as_str())?;
        map.serialize_entry("created_at", &rfc3339(self.at_us))?;
        map.end()
    }
}

/// A listed device's keys: `{"curve25519","ed25519","signature","created_at"}` (its ID is
/// the key it is listed under).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceKeysView {
    /// The device ID.
    pub device: String,
    /// Its keys.
    pub keys: DeviceKeys,
    /// When it was registered, in microseconds since the Unix epoch.
    pub created_at_us: u64,
}

impl DeviceKeysView {
    /// The view of a listed device.
    pub fn new(device: &str, d: &E2eeDevice) -> DeviceKeysView {
        DeviceKeysView {
            device: device.to_owned(),
            keys: d.keys.clone().expect("a listed device has keys"),
            created_at_us: d.created_at_us,
        }
    }
}

impl Serialize for DeviceKeysView {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(4))?;
        map.serialize_entry("curve25519", &self.keys.curve25519)?;
        map.serialize_entry("ed25519", &self.keys.ed25519)?;
        map.serialize_entry("signature", &self.keys.signature)?;
        map.serialize_entry("created_at", &rfc3339(self.created_at_us))?;
        map.end()
    }
}

/// A user's listed devices, as a keys query answers them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserDevices {
    /// The user.
    pub user: UserId,
    /// Their listed devices, in device ID order.
    pub devices: Vec<DeviceKeysView>,
}

/// A keys query's answer: `{"devices":{user_id:{device_id:{…}}}}`.
pub struct KeysQueryView<'a>(pub &'a [UserDevices]);

impl Serialize for KeysQueryView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        struct Devices<'a>(&'a [DeviceKeysView]);
        impl Serialize for Devices<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_map(self.0.iter().map(|d| (&d.device, d)))
            }
        }
        struct Users<'a>(&'a [UserDevices]);
        impl Serialize for Users<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_map(self.0.iter().map(|u| (u.user, Devices(&u.devices))))
            }
        }
        let mut map = s.serialize_map(Some(1))?;
        map.serialize_entry("devices", &Users(self.0))?;
        map.end()
    }
}

/// A claim's answer: `{"one_time_keys":{user_id:{device_id:{"key_id","key","fallback"}}}}`,
/// from keys sorted by user.
pub struct ClaimedKeysView<'a>(pub &'a [ClaimedKey]);

impl Serialize for ClaimedKeysView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        struct Key<'a>(&'a ClaimedKey);
        impl Serialize for Key<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut map = s.serialize_map(Some(3))?;
                map.serialize_entry("key_id", &self.0.key.id)?;
                map.serialize_entry("key", &self.0.key.key)?;
                map.serialize_entry("fallback", &self.0.fallback)?;
                map.end()
            }
        }
        struct Devices<'a>(&'a [ClaimedKey]);
        impl Serialize for Devices<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_map(self.0.iter().map(|k| (&k.device, Key(k))))
            }
        }
        struct Users<'a>(&'a [ClaimedKey]);
        impl Serialize for Users<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let by_user = self.0.chunk_by(|a, b| a.user == b.user);
                s.collect_map(by_user.map(|keys| (keys[0].user, Devices(keys))))
            }
        }
        let mut map = s.serialize_map(Some(1))?;
        map.serialize_entry("one_time_keys", &Users(self.0))?;
        map.end()
    }
}

/// A to-device message: `{"id","sender_id","sender_device_id","content"}`, the content as
/// it was sent.
impl Serialize for ToDevice {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serialize_to_device(self, None, s)
    }
}

/// A to-device message's fields, after `"type"` when `kind` is given (the frame).
fn serialize_to_device<S: Serializer>(
    m: &ToDevice,
    kind: Option<&str>,
    s: S,
) -> Result<S::Ok, S::Error> {
    let content: &serde_json::value::RawValue =
        serde_json::from_str(&m.content).map_err(serde::ser::Error::custom)?;
    let mut map = s.serialize_map(Some(4 + kind.is_some() as usize))?;
    if let Some(kind) = kind {
        map.serialize_entry("type", kind)?;
    }
    map.serialize_entry("id", &m.id.to_string())?;
    map.serialize_entry("sender_id", &m.sender)?;
    map.serialize_entry("sender_device_id", &m.sender_device)?;
    map.serialize_entry("content", content)?;
    map.end()
}

/// The `to_device` frame of a to-device message (`API.md` §14).
pub fn to_device_frame(m: &ToDevice) -> bytes::Bytes {
    struct Frame<'a>(&'a ToDevice);
    impl Serialize for Frame<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            serialize_to_device(self.0, Some("to_device"), s)
        }
    }
    json(&Frame(m)).expect("a to-device message holds the JSON object it was checked to be")
}

/// The `e2ee:keys_low` frame: a device has fewer than
/// [`crate::domain::e2ee::ONE_TIME_KEYS_LOW`] unclaimed one-time keys.
pub fn keys_low_frame(count: u32) -> bytes::Bytes {
    format!("{{\"type\":\"e2ee:keys_low\",\"one_time_key_count\":{count}}}")
        .into_bytes()
        .into()
}
