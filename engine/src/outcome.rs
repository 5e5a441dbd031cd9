//! What engine calls answer: the outcomes of commands and reads, and how partitions
//! recovered at open.

use crate::error::EngineError;
use crate::view::{ChannelView, FileView, MemberView, MessageView, UserView, WorkspaceView};

/// Where an engine call's answer goes: the caller waits on the other end.
pub(crate) type Reply<T> = futures::channel::oneshot::Sender<Result<T, EngineError>>;

/// The outcome of a metadata command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaOutcome {
    /// A created user.
    User(UserView),
    /// A created workspace.
    Workspace(WorkspaceView),
    /// An added member.
    Member(MemberView),
    /// A channel, and whether it was created by this call.
    Channel(ChannelView, bool),
    /// A stored file, or a deleted one as it was.
    File(FileView),
    /// Notification preferences or a push device, as they stand after the change.
    Notify(NotifyOutcome),
    /// What a key directory command answers.
    E2ee(crate::domain::e2ee::E2eeOutcome),
    /// A cluster ask, by its number.
    ClusterAsked(u64),
    /// The directory here holds every event committed before the request (a barrier).
    Current,
}

/// What a notification preferences command answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifyOutcome {
    /// The user's whole preferences.
    Prefs(crate::domain::notify::NotifyPrefs),
    /// The user's preferences for a channel.
    Channel(crate::view::ChannelPrefsView),
    /// A registered device.
    Device(crate::domain::notify::PushDevice),
    /// A device was removed.
    DeviceRemoved,
}

/// A file whose bytes are durable in the file store, to be recorded by
/// [`crate::Engine::store_file`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewFile {
    /// The name as the client gave it.
    pub name: String,
    /// Its length in bytes.
    pub size: u64,
    /// Its media type, `type/subtype`.
    pub content_type: String,
    /// The SHA-256 of its bytes.
    pub sha256: [u8; 32],
}

/// The outcome of a channel command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelOutcome {
    /// The seq of the event stored, if one was.
    pub seq: Option<u64>,
    /// The message the command is about, as it stands after it.
    pub message: Option<MessageView>,
    /// Whether something new was stored (false for a repeated `client_msg_id`).
    pub created: bool,
}

/// The outcome of a channel read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadOutcome {
    /// A page of messages and the cursor of the next page.
    Page(Vec<MessageView>, Option<u64>),
    /// One message.
    Message(MessageView),
    /// A message's bodies, oldest first, with RFC 3339 times.
    Versions(Vec<crate::view::VersionView>),
    /// A channel with its last committed seq.
    Channel(ChannelView),
}

/// What the push sender checks, in one round for many recipients of one message, before
/// pushing it ([`crate::Engine::push_checks`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushChecks {
    /// The message as it is now; `None` if the channel has no message at that seq.
    pub message: Option<MessageView>,
    /// Each recipient, in the order asked.
    pub recipients: Vec<PushRecipient>,
}

/// One recipient's side of [`PushChecks`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PushRecipient {
    /// Still a member of the message's channel (a former member may no longer read it).
    pub member: bool,
    /// Their read marker in the message's channel.
    pub read_seq: u64,
    /// Their unread messages over all their channels: the badge.
    pub unread: u64,
}

/// A page of messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessagePage {
    /// The messages.
    pub messages: Vec<MessageView>,
    /// The cursor of the next page (a seq), if there is one.
    pub next_cursor: Option<u64>,
}

/// One entry of a partition's subscriber index: how many live subscriptions of a user a
/// shard has, as the partition counts them (see [`crate::Engine::subscriber_index`]).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SubscriberCount {
    /// The partition.
    pub partition: u32,
    /// The user.
    pub user: crate::ids::UserId,
    /// The shard the subscriptions live on.
    pub shard: u32,
    /// How many.
    pub subscriptions: u32,
}

/// How one partition recovered when the engine opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovery {
    /// The partition.
    pub partition: u32,
    /// The log offset up to which the state came from a snapshot, if one was used.
    pub snapshot_offset: Option<u64>,
    /// Events replayed from the log (after the snapshot, or all of them).
    pub replayed_events: u64,
    /// Why the partition's snapshot could not be used, if there was one and it could not
    /// (the state was then rebuilt from the whole log).
    pub snapshot_refused: Option<String>,
    /// How long the partition took to open, snapshot and replay included.
    pub took: std::time::Duration,
}
