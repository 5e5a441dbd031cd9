//! The events of the chat domain and their on-disk encoding (event format version 1).
//!
//! Every change is an event; state is their fold. Metadata events (users, workspaces,
//! workspace membership, the channel directory) live in the metadata partition's log; channel
//! events (messages, edits, deletions, reactions, channel membership) live in the log of the
//! channel's partition, one log record per event, each with its channel `seq`.
//!
//! A partition's log also holds read markers (`b'R'`): a member's marker moved forward.
//! They are not channel events and take no seq (`API.md` §9).
//!
//! A log payload is one byte of event format version, one byte of kind (`b'M'` metadata,
//! `b'C'` channel, `b'R'` read marker), a u32 (little-endian) length of the archive, the record in rkyv's
//! archived form (little-endian, unaligned, 32-bit relative pointers: the features pinned in
//! `Cargo.toml` are part of the format), and then, for a channel event, the JSON `event`
//! frame exactly as live subscribers received it. Storing the frame lets resume replay an
//! event with the message as it stood then, without rendering it again. Decoding validates
//! the archive (bytecheck) before anything is used.

use crate::ids::{ChannelId, FileId, UserId, WorkspaceId};

/// The event format version written by this code.
pub const EVENT_FORMAT_VERSION: u8 = 1;
const KIND_META: u8 = b'M';
const KIND_CHANNEL: u8 = b'C';
const KIND_READ: u8 = b'R';

/// A member's role in a workspace.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
#[rkyv(attr(allow(missing_docs)))]
pub enum Role {
    /// Created the workspace; can do everything.
    Owner,
    /// Manages members and moderates channels.
    Admin,
    /// An ordinary member.
    Member,
}

impl Role {
    /// Whether the role may manage members and delete others' messages.
    pub fn is_admin(self) -> bool {
        matches!(self, Role::Owner | Role::Admin)
    }

    /// The API name of the role.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Admin => "admin",
            Role::Member => "member",
        }
    }
}

/// The kind of a channel.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
#[rkyv(attr(allow(missing_docs)))]
pub enum ChannelKind {
    /// Any workspace member may see and join it.
    Public,
    /// Members only; others are added by a member.
    Private,
    /// A direct conversation of one or two users.
    Dm,
    /// A direct conversation of three to nine users.
    GroupDm,
    /// A DM whose messages are end-to-end encrypted (`API.md` §14): the server holds only
    /// their ciphertext. (New kinds go at the end: a kind is archived as its index.)
    EncryptedDm,
    /// A group DM whose messages are end-to-end encrypted.
    EncryptedGroupDm,
}

impl ChannelKind {
    /// The API name of the kind.
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelKind::Public => "public",
            ChannelKind::Private => "private",
            ChannelKind::Dm | ChannelKind::EncryptedDm => "dm",
            ChannelKind::GroupDm | ChannelKind::EncryptedGroupDm => "group_dm",
        }
    }

    /// Whether membership is fixed at creation (DMs).
    pub fn is_direct(self) -> bool {
        matches!(
            self,
            ChannelKind::Dm
                | ChannelKind::GroupDm
                | ChannelKind::EncryptedDm
                | ChannelKind::EncryptedGroupDm
        )
    }

    /// Whether messages are end-to-end encrypted: the channel holds ciphertext only, and
    /// its members' devices are part of its order.
    pub fn is_encrypted(self) -> bool {
        matches!(
            self,
            ChannelKind::EncryptedDm | ChannelKind::EncryptedGroupDm
        )
    }
}

/// A message body: inline text, or a reference into the blob store for large bodies.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(attr(allow(missing_docs)))]
pub enum Body {
    /// The text itself.
    Text(String),
    /// A body over the inline limit, stored in the content-addressed blob store.
    Blob {
        /// The blob's BLAKE3 hash.
        hash: [u8; 32],
        /// Its length in bytes.
        len: u64,
    },
    /// The ciphertext of a message of an encrypted channel, opaque to the server: never
    /// parsed, indexed or previewed. At most 64 KiB, so always inline.
    Ciphertext(String),
}

/// Mentions parsed from a message's text, for notifications.
#[derive(
    Clone, Debug, Default, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
#[rkyv(attr(allow(missing_docs)))]
pub struct Mentions {
    /// Users named with `<@U…>` or `@U…`, deduplicated, in order of appearance.
    pub users: Vec<UserId>,
    /// `@here`: the members who are online.
    pub here: bool,
    /// `@channel`: every member.
    pub channel: bool,
}

/// An event of the metadata partition.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(attr(allow(missing_docs)))]
pub enum MetaEvent {
    /// An account was created.
    UserCreated {
        /// The new user.
        user: UserId,
        /// Login email, unique (compared in lowercase).
        email: String,
        /// Display name.
        name: String,
        /// The password hash (PHC string); the engine stores it and never interprets it.
        password_hash: String,
    },
    /// A workspace was created; its creator is its owner.
    WorkspaceCreated {
        /// The new workspace.
        workspace: WorkspaceId,
        /// Its name.
        name: String,
        /// The creator.
        owner: UserId,
    },
    /// A user was added to a workspace.
    MemberAdded {
        /// The workspace.
        workspace: WorkspaceId,
        /// The added user.
        user: UserId,
        /// The role given.
        role: Role,
        /// Who added them.
        by: UserId,
    },
    /// A channel was created. Its first members join through channel events in its own
    /// partition.
    ChannelCreated {
        /// The new channel.
        channel: ChannelId,
        /// Its workspace.
        workspace: WorkspaceId,
        /// Its name (empty for DMs).
        name: String,
        /// Its kind.
        kind: ChannelKind,
        /// The creator.
        created_by: UserId,
        /// The members it starts with, sorted.
        members: Vec<UserId>,
    },
    /// A file was uploaded; its bytes are in the file store under their SHA-256. Boxed so
    /// that the archived enum keeps its size: a record of an older variant is found at the
    /// end of its payload by that size, so growing it would misread every older log.
    FileStored(Box<StoredFile>),
    /// A file's preview of one kind was made, or will never be (boxed like `FileStored`).
    PreviewMade(Box<PreviewRecord>),
    /// A file was deleted; its ID is never used again.
    FileDeleted {
        /// The file.
        file: FileId,
        /// Its workspace.
        workspace: WorkspaceId,
        /// Who deleted it.
        by: UserId,
    },
    /// A user's notification preferences, channel preferences or push devices changed
    /// (`API.md` §13); the change carries the full resulting value. Boxed like
    /// `FileStored`.
    Notify(Box<super::notify::NotifyChange>),
    /// A device or its end-to-end encryption keys changed, or keys were claimed (`API.md`
    /// §14). Boxed like `FileStored`.
    E2ee(Box<super::e2ee::E2eeChange>),
    /// An operator asked for a cluster to be placed on these nodes (`PUT
    /// /api/v1/cluster/members`). Kept in the directory so that every node applies the
    /// asks in one order; the engine stores them and never acts on them. Boxed like
    /// `FileStored`.
    ClusterAsked(Box<ClusterAsk>),
}

/// The nodes an operator asked a cluster to be placed on.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(attr(allow(missing_docs)))]
pub struct ClusterAsk {
    /// Numbered from 1 in the directory's order: each ask one more than the one before.
    pub number: u64,
    /// The nodes, by ID, each with its address between nodes (`IP:PORT`).
    pub nodes: Vec<ClusterNode>,
}

/// One node of a [`ClusterAsk`].
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(attr(allow(missing_docs)))]
pub struct ClusterNode {
    /// Its ID (never 0).
    pub id: u64,
    /// Its address between nodes, `IP:PORT`.
    pub addr: String,
}

/// The outcome of making one preview of a file.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(attr(allow(missing_docs)))]
pub struct PreviewRecord {
    /// The file.
    pub file: FileId,
    /// The preview kind (`thumb`, `page1`, `code`).
    pub kind: String,
    /// The preview, or `None` when the file has none of this kind (`no_preview`).
    pub made: Option<PreviewMade>,
}

/// A preview that was made: its bytes are in the file store under their SHA-256.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(attr(allow(missing_docs)))]
pub struct PreviewMade {
    /// Its width in pixels (0 for HTML).
    pub width: u32,
    /// Its height in pixels (0 for HTML).
    pub height: u32,
    /// Its length in bytes.
    pub size: u64,
    /// Its media type.
    pub content_type: String,
    /// The SHA-256 of its bytes.
    pub sha256: [u8; 32],
}

/// What the metadata log keeps of an uploaded file.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(attr(allow(missing_docs)))]
pub struct StoredFile {
    /// The file.
    pub file: FileId,
    /// Its workspace.
    pub workspace: WorkspaceId,
    /// The uploader.
    pub user: UserId,
    /// The name as the client gave it; never used as a path.
    pub name: String,
    /// Its length in bytes.
    pub size: u64,
    /// Its media type (`type/subtype`, lowercase).
    pub content_type: String,
    /// The SHA-256 of its bytes: its address in the file store.
    pub sha256: [u8; 32],
    /// When it was stored, in microseconds since the Unix epoch.
    pub at_us: u64,
}

/// A metadata event with its time.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(attr(allow(missing_docs)))]
pub struct MetaRecord {
    /// Microseconds since the Unix epoch.
    pub at_us: u64,
    /// The event.
    pub event: MetaEvent,
}

/// An event of one channel.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(attr(allow(missing_docs)))]
pub enum ChannelEvent {
    /// A user became a member.
    MemberJoined {
        /// The new member.
        user: UserId,
        /// Who added them (themselves when joining).
        by: UserId,
    },
    /// A user stopped being a member.
    MemberLeft {
        /// The former member.
        user: UserId,
        /// Who removed them (themselves when leaving).
        by: UserId,
    },
    /// A message was posted; its ID is this event's seq.
    MessagePosted {
        /// The author.
        user: UserId,
        /// The body.
        body: Body,
        /// The root message's seq, for a thread reply.
        thread: Option<u64>,
        /// The client's idempotency key.
        client_msg_id: Option<String>,
        /// Mentions in the text.
        mentions: Mentions,
    },
    /// A message was posted with files; otherwise as [`ChannelEvent::MessagePosted`].
    /// Boxed, so that the archived channel event keeps its size and older logs still read
    /// (see [`MetaEvent::FileStored`]).
    MessagePostedWithFiles(Box<PostedWithFiles>),
    /// A message's text was replaced.
    MessageEdited {
        /// The message's seq.
        target: u64,
        /// The new body.
        body: Body,
        /// Mentions in the new text.
        mentions: Mentions,
    },
    /// A message was deleted; it keeps its place with an empty text.
    MessageDeleted {
        /// The message's seq.
        target: u64,
        /// Who deleted it.
        by: UserId,
    },
    /// A user reacted to a message.
    ReactionAdded {
        /// The message's seq.
        target: u64,
        /// The emoji name.
        emoji: String,
        /// Who reacted.
        user: UserId,
    },
    /// A user withdrew a reaction.
    ReactionRemoved {
        /// The message's seq.
        target: u64,
        /// The emoji name.
        emoji: String,
        /// Who withdrew it.
        user: UserId,
    },
    /// A member's device joined an encrypted channel's device list: messages after this
    /// event must be readable by it (`API.md` §14).
    DeviceAdded {
        /// The member.
        user: UserId,
        /// The device.
        device: String,
    },
    /// A member's device left an encrypted channel's device list.
    DeviceRemoved {
        /// The member.
        user: UserId,
        /// The device.
        device: String,
    },
}

/// A message posted with files.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(attr(allow(missing_docs)))]
pub struct PostedWithFiles {
    /// The author.
    pub user: UserId,
    /// The body (may be empty).
    pub body: Body,
    /// The root message's seq, for a thread reply.
    pub thread: Option<u64>,
    /// The client's idempotency key.
    pub client_msg_id: Option<String>,
    /// Mentions in the text.
    pub mentions: Mentions,
    /// The files, in the order given; uploaded by the author to the channel's workspace.
    pub files: Vec<FileId>,
}

/// A posted message, whichever event carried it.
#[derive(Clone, Copy, Debug)]
pub struct Posted<'a> {
    /// The author.
    pub user: UserId,
    /// The body.
    pub body: &'a Body,
    /// The root message's seq, for a thread reply.
    pub thread: Option<u64>,
    /// The client's idempotency key.
    pub client_msg_id: Option<&'a String>,
    /// Mentions in the text.
    pub mentions: &'a Mentions,
    /// The files.
    pub files: &'a [FileId],
}

impl ChannelEvent {
    /// The message this event posts, if it posts one.
    pub fn posted(&self) -> Option<Posted<'_>> {
        match self {
            ChannelEvent::MessagePosted {
                user,
                body,
                thread,
                client_msg_id,
                mentions,
            } => Some(Posted {
                user: *user,
                body,
                thread: *thread,
                client_msg_id: client_msg_id.as_ref(),
                mentions,
                files: &[],
            }),
            ChannelEvent::MessagePostedWithFiles(p) => Some(Posted {
                user: p.user,
                body: &p.body,
                thread: p.thread,
                client_msg_id: p.client_msg_id.as_ref(),
                mentions: &p.mentions,
                files: &p.files,
            }),
            _ => None,
        }
    }
}

/// A channel event with its place in the channel's order.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(attr(allow(missing_docs)))]
pub struct ChannelRecord {
    /// The channel.
    pub channel: ChannelId,
    /// The channel's workspace.
    pub workspace: WorkspaceId,
    /// The event's seq: 1 for the channel's first event, then one more each time.
    pub seq: u64,
    /// Microseconds since the Unix epoch.
    pub at_us: u64,
    /// The event.
    pub event: ChannelEvent,
}

/// A member's read marker moved forward to `seq`. Durable, private to the member, and not
/// a channel event: it takes no seq of its own, and no subscriber's stream shows it.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(attr(allow(missing_docs)))]
pub struct ReadRecord {
    /// The channel.
    pub channel: ChannelId,
    /// The channel's workspace.
    pub workspace: WorkspaceId,
    /// The member.
    pub user: UserId,
    /// The highest seq the member has read, at most the channel's last seq when marked.
    pub seq: u64,
    /// Microseconds since the Unix epoch.
    pub at_us: u64,
}

/// A decoded log payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A metadata event.
    Meta(MetaRecord),
    /// A channel event.
    Channel(ChannelRecord),
    /// A read marker.
    Read(ReadRecord),
}

/// Why a log payload is not a valid event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Shorter than its prefix says.
    #[error("event payload is truncated")]
    Empty,
    /// A format version this code does not read.
    #[error("event format version {0} is not supported")]
    Version(u8),
    /// An unknown kind byte.
    #[error("unknown event kind {0:#x}")]
    Kind(u8),
    /// The archive failed validation.
    #[error("event archive is invalid: {0}")]
    Archive(String),
}

fn encode_with<T>(kind: u8, value: &T, frame: &[u8]) -> Vec<u8>
where
    T: for<'a> rkyv::Serialize<
        rkyv::api::high::HighSerializer<
            rkyv::util::AlignedVec,
            rkyv::ser::allocator::ArenaHandle<'a>,
            rkyv::rancor::Error,
        >,
    >,
{
    let body = rkyv::to_bytes::<rkyv::rancor::Error>(value).expect("events always serialize");
    let mut out = Vec::with_capacity(body.len() + 6 + frame.len());
    out.push(EVENT_FORMAT_VERSION);
    out.push(kind);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out.extend_from_slice(frame);
    out
}

/// Encodes a metadata record as a log payload.
pub fn encode_meta(record: &MetaRecord) -> Vec<u8> {
    encode_with(KIND_META, record, &[])
}

/// Encodes a channel record and its rendered frame as a log payload.
pub fn encode_channel(record: &ChannelRecord, frame: &[u8]) -> Vec<u8> {
    encode_with(KIND_CHANNEL, record, frame)
}

/// Encodes a read marker as a log payload.
pub fn encode_read(record: &ReadRecord) -> Vec<u8> {
    encode_with(KIND_READ, record, &[])
}

/// The stored frame of a channel event payload (already validated by [`decode`]).
pub fn stored_frame(payload: &[u8]) -> &[u8] {
    let len = u32::from_le_bytes(payload[2..6].try_into().expect("4 bytes")) as usize;
    &payload[6 + len..]
}

/// Decodes and validates a log payload.
pub fn decode(payload: &[u8]) -> Result<Decoded, DecodeError> {
    let [version, kind, rest @ ..] = payload else {
        return Err(DecodeError::Empty);
    };
    if *version != EVENT_FORMAT_VERSION {
        return Err(DecodeError::Version(*version));
    }
    let body = match rest {
        [a, b, c, d, tail @ ..] => {
            let len = u32::from_le_bytes([*a, *b, *c, *d]) as usize;
            tail.get(..len).ok_or(DecodeError::Empty)?
        }
        _ => return Err(DecodeError::Empty),
    };
    let archive = |e: rkyv::rancor::Error| DecodeError::Archive(e.to_string());
    match *kind {
        KIND_META => rkyv::from_bytes::<MetaRecord, rkyv::rancor::Error>(body)
            .map(Decoded::Meta)
            .map_err(archive),
        KIND_CHANNEL => rkyv::from_bytes::<ChannelRecord, rkyv::rancor::Error>(body)
            .map(Decoded::Channel)
            .map_err(archive),
        KIND_READ => rkyv::from_bytes::<ReadRecord, rkyv::rancor::Error>(body)
            .map(Decoded::Read)
            .map_err(archive),
        other => Err(DecodeError::Kind(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Events round-trip through the log encoding, and damaged payloads are refused, never
    // misread.
    #[test]
    fn round_trip_and_damage() {
        let rec = ChannelRecord {
            channel: ChannelId(3),
            workspace: WorkspaceId(1),
            seq: 9,
            at_us: 1_700_000_000_000_000,
            event: ChannelEvent::MessagePosted {
                user: UserId(2),
                body: Body::Text("hello <@U1>".into()),
                thread: Some(4),
                client_msg_id: Some("abc".into()),
                mentions: Mentions {
                    users: vec![UserId(1)],
                    here: false,
                    channel: true,
                },
            },
        };
        let bytes = encode_channel(&rec, b"{\"frame\":1}");
        assert_eq!(decode(&bytes), Ok(Decoded::Channel(rec.clone())));
        assert_eq!(stored_frame(&bytes), b"{\"frame\":1}");
        assert_eq!(decode(&[]), Err(DecodeError::Empty));
        let mut v2 = bytes.clone();
        v2[0] = 2;
        assert_eq!(decode(&v2), Err(DecodeError::Version(2)));
        for cut in 2..bytes.len() {
            let _ = decode(&bytes[..cut]);
        }
        let meta = MetaRecord {
            at_us: 5,
            event: MetaEvent::ChannelCreated {
                channel: ChannelId(8),
                workspace: WorkspaceId(1),
                name: "general".into(),
                kind: ChannelKind::Public,
                created_by: UserId(2),
                members: vec![UserId(2)],
            },
        };
        assert_eq!(decode(&encode_meta(&meta)), Ok(Decoded::Meta(meta)));
        let file = MetaRecord {
            at_us: 7,
            event: MetaEvent::FileStored(Box::new(StoredFile {
                file: FileId(9),
                workspace: WorkspaceId(1),
                user: UserId(2),
                name: "../../x".into(),
                size: 5,
                content_type: "text/plain".into(),
                sha256: [7; 32],
                at_us: 7,
            })),
        };
        assert_eq!(decode(&encode_meta(&file)), Ok(Decoded::Meta(file)));
        let prefs = MetaRecord {
            at_us: 8,
            event: MetaEvent::Notify(Box::new(crate::domain::notify::NotifyChange::Prefs {
                user: UserId(2),
                prefs: crate::domain::notify::NotifyPrefs {
                    keywords: vec!["deploy".into()],
                    ..Default::default()
                },
            })),
        };
        assert_eq!(decode(&encode_meta(&prefs)), Ok(Decoded::Meta(prefs)));
        let ask = MetaRecord {
            at_us: 9,
            event: MetaEvent::ClusterAsked(Box::new(ClusterAsk {
                number: 3,
                nodes: vec![ClusterNode {
                    id: 4,
                    addr: "127.0.0.1:7004".into(),
                }],
            })),
        };
        assert_eq!(decode(&encode_meta(&ask)), Ok(Decoded::Meta(ask)));
        let read = ReadRecord {
            channel: ChannelId(8),
            workspace: WorkspaceId(1),
            user: UserId(2),
            seq: 7,
            at_us: 6,
        };
        let bytes = encode_read(&read);
        assert_eq!(bytes[1], b'R');
        assert_eq!(decode(&bytes), Ok(Decoded::Read(read)));
        for cut in 2..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err());
        }
    }

    // The archived metadata event keeps the size it had before files: a record is found at
    // the end of its payload by this size, so a larger enum would misread older logs.
    #[test]
    fn archived_meta_event_keeps_its_size() {
        assert_eq!(std::mem::size_of::<ArchivedMetaEvent>(), 42);
        assert_eq!(std::mem::size_of::<ArchivedChannelEvent>(), 78);
    }

    // A post with files round-trips and reads as a post.
    #[test]
    fn posts_with_files() {
        let rec = ChannelRecord {
            channel: ChannelId(3),
            workspace: WorkspaceId(1),
            seq: 2,
            at_us: 9,
            event: ChannelEvent::MessagePostedWithFiles(Box::new(PostedWithFiles {
                user: UserId(2),
                body: Body::Text(String::new()),
                thread: None,
                client_msg_id: Some("k".into()),
                mentions: Mentions::default(),
                files: vec![FileId(5), FileId(6)],
            })),
        };
        let bytes = encode_channel(&rec, b"{}");
        assert_eq!(decode(&bytes), Ok(Decoded::Channel(rec.clone())));
        let posted = rec.event.posted().unwrap();
        assert_eq!(posted.files, [FileId(5), FileId(6)]);
        assert_eq!(posted.client_msg_id.map(String::as_str), Some("k"));
    }

    // Device events and ciphertext bodies (API.md §14) round-trip through the log encoding.
    #[test]
    fn encrypted_channel_events() {
        for (seq, event) in [
            ChannelEvent::DeviceAdded {
                user: UserId(2),
                device: "PHONE".into(),
            },
            ChannelEvent::DeviceRemoved {
                user: UserId(2),
                device: "PHONE".into(),
            },
            ChannelEvent::MessagePosted {
                user: UserId(2),
                body: Body::Ciphertext("{\"session_id\":\"s\"}".into()),
                thread: None,
                client_msg_id: Some("k".into()),
                mentions: Mentions::default(),
            },
        ]
        .into_iter()
        .enumerate()
        {
            let rec = ChannelRecord {
                channel: ChannelId(3),
                workspace: WorkspaceId(1),
                seq: seq as u64 + 1,
                at_us: 9,
                event,
            };
            let bytes = encode_channel(&rec, b"{}");
            assert_eq!(decode(&bytes), Ok(Decoded::Channel(rec)));
        }
    }
}
