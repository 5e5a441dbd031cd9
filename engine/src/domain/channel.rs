//! The state of one channel: members, messages, threads, reactions, edit history, and the
//! idempotency keys of recent sends; its commands, and its reads.
//!
//! A channel's partition decides its commands one at a time and applies each event before
//! deciding the next, so every event gets the next `seq` and sees all the ones before it.
//! Reads go through per-channel indexes (top-level messages by seq, replies by thread), so
//! none scans a partition.

use super::event::{Body, ChannelEvent, ChannelKind, Mentions, PostedWithFiles};
use super::input::check_emoji;
use super::mention;
use super::unread::{ReadCounts, ReadIndex};
use super::{DomainError, Principal};
use super::{
    CIPHERTEXT_BYTES_MAX, CLIENT_MSG_ID_BYTES_MAX, FILES_PER_MESSAGE_MAX, IDEMPOTENCY_WINDOW_US,
    TEXT_BYTES_MAX,
};
use crate::ids::{ChannelId, FileId, MessageId, UserId, WorkspaceId};
use crate::snapshot::{Reader, SnapshotError, Writer};
use keys::Keys;
use std::collections::{BTreeSet, HashMap};

mod keys;

/// UTF-8 text that shares its bytes. A message's text is its own allocation when it was
/// posted, or a slice of the snapshot it was restored from: a restart then allocates
/// nothing per message, and the snapshot's buffer becomes the texts' arena.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Text(bytes::Bytes);

impl Text {
    /// Shares `bytes` as text if they are UTF-8.
    pub fn from_shared(bytes: bytes::Bytes) -> Result<Text, std::str::Utf8Error> {
        std::str::from_utf8(&bytes)?;
        Ok(Text(bytes))
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        // SAFETY: every constructor takes a `String` or checks the bytes are UTF-8, and
        // the bytes never change.
        unsafe { std::str::from_utf8_unchecked(&self.0) }
    }
}

impl From<String> for Text {
    fn from(s: String) -> Text {
        Text(bytes::Bytes::from(s))
    }
}

impl From<&str> for Text {
    fn from(s: &str) -> Text {
        Text(bytes::Bytes::copy_from_slice(s.as_bytes()))
    }
}

impl std::fmt::Debug for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

/// A message body as the channel state holds it: the text, or the blob store's reference
/// to a body over the inline limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoredBody {
    /// The text itself.
    Text(Text),
    /// A body in the blob store.
    Blob {
        /// The blob's BLAKE3 hash.
        hash: Box<[u8; 32]>,
        /// Its length in bytes.
        len: u64,
    },
    /// The ciphertext of an encrypted channel's message, opaque to the server.
    Ciphertext(Text),
}

impl From<&Body> for StoredBody {
    fn from(b: &Body) -> StoredBody {
        match b {
            Body::Text(t) => StoredBody::Text(Text::from(t.as_str())),
            Body::Blob { hash, len } => StoredBody::Blob {
                hash: Box::new(*hash),
                len: *len,
            },
            Body::Ciphertext(c) => StoredBody::Ciphertext(Text::from(c.as_str())),
        }
    }
}

/// What a post or an edit carries, as the client sent it: text for a plain channel, or
/// ciphertext for an encrypted one (`API.md` §14). Which one a channel takes is its
/// decision, so a mismatch is refused with `encryption_mismatch`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content {
    /// Text (possibly empty, for a post with files).
    Text(String),
    /// Ciphertext and the device list it was encrypted for.
    Sealed(Box<Sealed>),
}

/// An encrypted message as the client sent it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sealed {
    /// The ciphertext, opaque to the server.
    pub ciphertext: String,
    /// The seq of the newest device event the sender had seen, if it said.
    pub devices_seq: Option<u64>,
}

impl From<String> for Content {
    fn from(text: String) -> Content {
        Content::Text(text)
    }
}

/// A message's bodies with the time it got each, oldest first. Most messages are never
/// edited, so one version is kept inline, without an allocation of its own.
pub type Versions = smallvec::SmallVec<[(StoredBody, u64); 1]>;

/// A message as it stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The seq of the event that created it.
    pub seq: u64,
    /// The author.
    pub user: UserId,
    /// Every body it had with the time it got it, oldest first; the last is current.
    pub versions: Versions,
    /// The root's seq, for a thread reply.
    pub thread: Option<u64>,
    /// Replies, for a thread root.
    pub reply_count: u32,
    /// Reactions: emoji and the users who reacted, in the order they first appeared.
    pub reactions: Vec<(String, Vec<UserId>)>,
    /// When it was last edited.
    pub edited_at: Option<u64>,
    /// Whether it was deleted.
    pub deleted: bool,
    /// When it was posted.
    pub created_at: u64,
    /// The client's idempotency key.
    pub client_msg_id: Option<String>,
    /// The files it was posted with (empty for most messages, and then unallocated).
    pub files: Box<[FileId]>,
}

impl Message {
    /// The current body.
    pub fn body(&self) -> &StoredBody {
        &self.versions.last().expect("a message has a body").0
    }
}

/// A channel command from a principal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChannelCommand {
    /// Post a message, or a reply when `thread` is set.
    Post {
        /// The text or ciphertext.
        content: Content,
        /// The client's idempotency key.
        client_msg_id: Option<String>,
        /// The thread root.
        thread: Option<MessageId>,
        /// Files to attach; the partition checks that the author uploaded them to this
        /// workspace. Boxed (and `None` when there are none) to keep a shard's message
        /// within 128 bytes: every request crosses a queue by value.
        files: Option<Box<Vec<FileId>>>,
    },
    /// Replace a message's text (author only).
    Edit {
        /// The message.
        message: MessageId,
        /// The new text or ciphertext.
        content: Content,
    },
    /// Delete a message (author, channel creator, or workspace admin).
    Delete {
        /// The message.
        message: MessageId,
    },
    /// Add or remove the caller's reaction.
    React {
        /// The message.
        message: MessageId,
        /// The emoji name.
        emoji: String,
        /// Add (true) or remove (false).
        add: bool,
    },
    /// Join a public channel.
    Join,
    /// Add a workspace member (already checked by the caller against the directory).
    AddMember {
        /// The user to add.
        user: UserId,
    },
    /// Leave (self) or remove a member (channel creator or workspace admin).
    RemoveMember {
        /// The user to remove.
        user: UserId,
    },
}

/// What deciding a channel command yields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChannelDecision {
    /// An event to commit.
    Event(ChannelEvent),
    /// A repeated `client_msg_id`: answer with this existing message, store nothing.
    Duplicate(u64),
    /// Already so (a reaction already there, a member already in): nothing to store.
    Unchanged,
}

/// One page of a list, and the cursor for the next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page<T> {
    /// The items.
    pub items: Vec<T>,
    /// Where the next page starts, if there is one.
    pub next_cursor: Option<u64>,
}

/// The state of one channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelState {
    /// The channel.
    pub id: ChannelId,
    /// Its workspace.
    pub workspace: WorkspaceId,
    /// Its kind.
    pub kind: ChannelKind,
    /// Its creator (the channel admin).
    pub created_by: UserId,
    members: BTreeSet<UserId>,
    last_seq: u64,
    /// Every message, in seq order (they are created in seq order), found by binary
    /// search: no hashing, and no per-entry overhead beyond the message itself.
    messages: Vec<Message>,
    top_level: Vec<u64>,
    replies: HashMap<u64, Vec<u64>>,
    /// The idempotency keys of the messages sent within the window.
    idempotency: Keys,
    /// Former members and the seq of the event that removed them.
    departed: HashMap<UserId, u64>,
    /// The members' read markers and the unread indexes (`API.md` §9).
    reads: ReadIndex,
    /// The messages that carry each file, by seq: who may read a file (`API.md` §11).
    file_refs: HashMap<FileId, Vec<u64>>,
    /// An encrypted channel's device list: the members' devices its events added and did
    /// not remove (`API.md` §14).
    devices: BTreeSet<(UserId, String)>,
    /// The seq of its newest device event (0: none).
    devices_seq: u64,
}

/// A post's text: within the limit, and not empty unless the post carries files; at most
/// [`FILES_PER_MESSAGE_MAX`] files, none twice.
fn check_post_text(text: &str, files: &[FileId]) -> Result<(), DomainError> {
    if files.len() > FILES_PER_MESSAGE_MAX {
        return Err(DomainError::TooMany(format!(
            "a message carries at most {FILES_PER_MESSAGE_MAX} files"
        )));
    }
    if files
        .iter()
        .enumerate()
        .any(|(i, f)| files[..i].contains(f))
    {
        return Err(DomainError::Invalid("a file is attached twice".into()));
    }
    if files.is_empty() {
        return check_text(text);
    }
    if text.len() > TEXT_BYTES_MAX {
        return Err(DomainError::TooLarge(format!(
            "text is longer than {TEXT_BYTES_MAX} bytes"
        )));
    }
    Ok(())
}

fn check_text(text: &str) -> Result<(), DomainError> {
    if text.len() > TEXT_BYTES_MAX {
        return Err(DomainError::TooLarge(format!(
            "text is longer than {TEXT_BYTES_MAX} bytes"
        )));
    }
    if text.trim().is_empty() {
        return Err(DomainError::Invalid("text must not be empty".into()));
    }
    Ok(())
}

/// Whether `user` has reacted to `m` with `emoji`.
fn has_reaction(m: &Message, emoji: &str, user: UserId) -> bool {
    m.reactions
        .iter()
        .any(|(e, users)| e == emoji && users.contains(&user))
}

impl ChannelState {
    /// A channel with no events yet.
    pub fn new(
        id: ChannelId,
        workspace: WorkspaceId,
        kind: ChannelKind,
        created_by: UserId,
    ) -> ChannelState {
        ChannelState {
            id,
            workspace,
            kind,
            created_by,
            members: BTreeSet::new(),
            last_seq: 0,
            messages: Vec::new(),
            top_level: Vec::new(),
            replies: HashMap::new(),
            idempotency: Keys::default(),
            departed: HashMap::new(),
            reads: ReadIndex::default(),
            file_refs: HashMap::new(),
            devices: BTreeSet::new(),
            devices_seq: 0,
        }
    }

    /// The seq of the last event.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Whether a user is a member.
    pub fn is_member(&self, user: UserId) -> bool {
        self.members.contains(&user)
    }

    /// The last seq a user may read in the event stream: everything for a member, up to
    /// the event that removed them for a former member, nothing for anyone else.
    pub fn readable_until(&self, user: UserId) -> Option<u64> {
        if self.members.contains(&user) {
            Some(u64::MAX)
        } else {
            self.departed.get(&user).copied()
        }
    }

    /// The members, in ID order.
    pub fn members(&self) -> impl Iterator<Item = UserId> + '_ {
        self.members.iter().copied()
    }

    /// The events that give a new channel its first members.
    pub fn initial_events(&self, members: &[UserId]) -> Vec<ChannelEvent> {
        members
            .iter()
            .filter(|u| !self.members.contains(u))
            .map(|u| ChannelEvent::MemberJoined {
                user: *u,
                by: self.created_by,
            })
            .collect()
    }

    /// The device events that bring an encrypted channel's device list to `listed`, the
    /// devices the directory lists for its members now: removals first, then additions,
    /// each in (user, device) order. Empty for a plain channel, and when nothing changed.
    pub fn device_events(&self, listed: &BTreeSet<(UserId, String)>) -> Vec<ChannelEvent> {
        if !self.kind.is_encrypted() {
            return Vec::new();
        }
        let removed =
            (self.devices.difference(listed)).map(|(user, device)| ChannelEvent::DeviceRemoved {
                user: *user,
                device: device.clone(),
            });
        let added =
            (listed.difference(&self.devices)).map(|(user, device)| ChannelEvent::DeviceAdded {
                user: *user,
                device: device.clone(),
            });
        removed.chain(added).collect()
    }

    /// An encrypted channel's device list, and the seq of its newest device event.
    pub fn devices(&self) -> (&BTreeSet<(UserId, String)>, u64) {
        (&self.devices, self.devices_seq)
    }

    /// The body of a post or an edit, if the channel takes its content: text in a plain
    /// channel (checked as [`check_post_text`] does), ciphertext in an encrypted one, with
    /// the device event it was encrypted after (for [`ChannelState::check_devices`]). Files
    /// cannot go with ciphertext: their bytes would be readable by the server.
    fn body_of(
        &self,
        content: Content,
        files: &[FileId],
    ) -> Result<(Body, Option<u64>), DomainError> {
        let sealed = match (self.kind.is_encrypted(), content) {
            (false, Content::Text(text)) => {
                check_post_text(&text, files)?;
                return Ok((Body::Text(text), None));
            }
            (false, Content::Sealed(_)) => {
                return Err(DomainError::EncryptionMismatch(
                    "ciphertext is for encrypted channels; this one takes \"text\"".into(),
                ))
            }
            (true, Content::Text(text)) if !text.is_empty() => {
                return Err(DomainError::EncryptionMismatch(
                    "an encrypted channel takes \"ciphertext\", never \"text\"".into(),
                ))
            }
            (true, Content::Text(_)) => {
                return Err(DomainError::Invalid(
                    "a message of an encrypted channel carries \"ciphertext\"".into(),
                ))
            }
            (true, Content::Sealed(sealed)) => *sealed,
        };
        if !files.is_empty() {
            return Err(DomainError::Invalid(
                "files cannot be attached in an encrypted channel".into(),
            ));
        }
        if sealed.ciphertext.is_empty() {
            return Err(DomainError::Invalid("ciphertext must not be empty".into()));
        }
        if sealed.ciphertext.len() > CIPHERTEXT_BYTES_MAX {
            return Err(DomainError::TooLarge(format!(
                "ciphertext is longer than {CIPHERTEXT_BYTES_MAX} bytes"
            )));
        }
        let Some(seen) = sealed.devices_seq else {
            return Err(DomainError::Invalid(
                "devices_seq is required in an encrypted channel".into(),
            ));
        };
        if seen > self.last_seq {
            return Err(DomainError::Invalid(format!(
                "devices_seq {seen} is above the channel's last_seq {}",
                self.last_seq
            )));
        }
        Ok((Body::Ciphertext(sealed.ciphertext), Some(seen)))
    }

    /// Refuses ciphertext encrypted before the channel's newest device event: a device it
    /// was not encrypted for could not read it (409 `stale_devices`).
    fn check_devices(&self, seen: Option<u64>) -> Result<(), DomainError> {
        match seen {
            Some(seen) if seen < self.devices_seq => Err(DomainError::StaleDevices(format!(
                "the channel's devices changed at seq {}, after devices_seq {seen}",
                self.devices_seq
            ))),
            _ => Ok(()),
        }
    }

    /// Mentions of a body: parsed from text, never from ciphertext.
    fn mentions_of(&self, body: &Body) -> Mentions {
        match body {
            Body::Text(text) => self.mentions(text),
            Body::Blob { .. } | Body::Ciphertext(_) => Mentions::default(),
        }
    }

    /// Whether `user` can read a message of this channel that carries `file` and is not
    /// deleted: the rule for reading a file that is not one's own (`API.md` §11).
    pub fn file_readable(&self, user: UserId, file: FileId) -> bool {
        self.members.contains(&user)
            && self.file_refs.get(&file).is_some_and(|seqs| {
                seqs.iter()
                    .any(|seq| self.msg(*seq).is_some_and(|m| !m.deleted))
            })
    }

    fn check_reach(&self, by: &Principal) -> Result<(), DomainError> {
        if by.workspace() != self.workspace || !self.members.contains(&by.user()) {
            return Err(DomainError::NotFound("channel"));
        }
        Ok(())
    }

    /// The message at `seq`, found from where its seq says it is ([`position_from`]): the
    /// newest message, which every post reads back three times (to fetch its body, to
    /// build its frame and its answer), takes two probes at the array's hot end, where a
    /// binary search over a large channel took some twenty cache misses from its middle.
    fn msg(&self, seq: u64) -> Option<&Message> {
        let i = self.index_of(seq)?;
        Some(&self.messages[i])
    }

    fn index_of(&self, seq: u64) -> Option<usize> {
        let i = position_from(&self.messages, seq);
        (self.messages.get(i)?.seq == seq).then_some(i)
    }

    /// The messages at `seqs`, which rise and are all indexed, in that order. Both lists
    /// are sorted by seq, so each is looked for after the one before it, from where the
    /// seqs say it should be (see [`position_from`]): a page's messages usually sit side by
    /// side, and a channel's seqs are nearly evenly spread over its messages. A 50-message
    /// page of a channel of a million messages made 50 binary searches, each about 20 cache
    /// misses in a large array, a tenth of the server's CPU in `chorus-bench history`; then
    /// a search doubling its step from the array's start, which still paid some 40 misses
    /// for the first message, 8 % of a shard's time in a page read.
    fn msgs_at<'a>(&'a self, seqs: &'a [u64]) -> impl Iterator<Item = &'a Message> + 'a {
        let mut from = 0;
        seqs.iter().map(move |&seq| {
            let i = from + position_from(&self.messages[from..], seq);
            let m = &self.messages[i];
            assert_eq!(m.seq, seq, "indexed message exists");
            from = i + 1;
            m
        })
    }

    fn msg_mut(&mut self, seq: u64) -> Option<&mut Message> {
        let i = self.index_of(seq)?;
        Some(&mut self.messages[i])
    }

    fn message(&self, id: MessageId) -> Result<&Message, DomainError> {
        if id.channel != self.id {
            return Err(DomainError::NotFound("message"));
        }
        self.msg(id.seq).ok_or(DomainError::NotFound("message"))
    }

    fn live_message(&self, id: MessageId) -> Result<&Message, DomainError> {
        let m = self.message(id)?;
        if m.deleted {
            return Err(DomainError::Conflict("the message was deleted".into()));
        }
        Ok(m)
    }

    /// Decides a command. `now_us` is the time the event will carry.
    pub fn decide(
        &self,
        by: &Principal,
        cmd: ChannelCommand,
        now_us: u64,
    ) -> Result<ChannelDecision, DomainError> {
        if cmd == ChannelCommand::Join {
            return self.decide_join(by);
        }
        self.check_reach(by)?;
        let event = match cmd {
            ChannelCommand::Post {
                content,
                client_msg_id,
                thread,
                files,
            } => {
                let files = files.map(|f| *f).unwrap_or_default();
                let (body, seen) = self.body_of(content, &files)?;
                if let Some(key) = &client_msg_id {
                    if key.is_empty() || key.len() > CLIENT_MSG_ID_BYTES_MAX {
                        return Err(DomainError::Invalid(format!(
                            "client_msg_id must be 1 to {CLIENT_MSG_ID_BYTES_MAX} bytes"
                        )));
                    }
                    // A resend of a message that got through answers it, whatever the
                    // devices did since.
                    if let Some(seq) = self.remembered(by.user(), key, now_us) {
                        return Ok(ChannelDecision::Duplicate(seq));
                    }
                }
                self.check_devices(seen)?;
                let thread = match thread {
                    None => None,
                    Some(root) => {
                        let m = self.live_message(root)?;
                        if m.thread.is_some() {
                            return Err(DomainError::Invalid(
                                "a reply cannot start a thread".into(),
                            ));
                        }
                        Some(root.seq)
                    }
                };
                let mentions = self.mentions_of(&body);
                if files.is_empty() {
                    ChannelEvent::MessagePosted {
                        user: by.user(),
                        mentions,
                        body,
                        thread,
                        client_msg_id,
                    }
                } else {
                    ChannelEvent::MessagePostedWithFiles(Box::new(PostedWithFiles {
                        user: by.user(),
                        mentions,
                        body,
                        thread,
                        client_msg_id,
                        files,
                    }))
                }
            }
            ChannelCommand::Edit { message, content } => {
                let (body, seen) = self.body_of(content, &[])?;
                self.check_devices(seen)?;
                let m = self.live_message(message)?;
                if m.user != by.user() {
                    return Err(DomainError::Forbidden(
                        "only the author may edit a message".into(),
                    ));
                }
                ChannelEvent::MessageEdited {
                    target: message.seq,
                    mentions: self.mentions_of(&body),
                    body,
                }
            }
            ChannelCommand::Delete { message } => {
                let m = self.message(message)?;
                let allowed =
                    m.user == by.user() || self.created_by == by.user() || by.role().is_admin();
                if !allowed {
                    return Err(DomainError::Forbidden(
                        "only the author or an admin may delete a message".into(),
                    ));
                }
                if m.deleted {
                    return Ok(ChannelDecision::Unchanged);
                }
                ChannelEvent::MessageDeleted {
                    target: message.seq,
                    by: by.user(),
                }
            }
            ChannelCommand::React {
                message,
                emoji,
                add,
            } => {
                // A reaction stored before the emoji rules existed can still be taken
                // back by its user; anything else must pass them.
                let legacy = !add
                    && self
                        .live_message(message)
                        .is_ok_and(|m| has_reaction(m, &emoji, by.user()));
                if !legacy {
                    check_emoji(&emoji)?;
                }
                let m = self.live_message(message)?;
                let present = has_reaction(m, &emoji, by.user());
                match (add, present) {
                    (true, true) | (false, false) => return Ok(ChannelDecision::Unchanged),
                    (true, false) => ChannelEvent::ReactionAdded {
                        target: message.seq,
                        emoji,
                        user: by.user(),
                    },
                    (false, true) => ChannelEvent::ReactionRemoved {
                        target: message.seq,
                        emoji,
                        user: by.user(),
                    },
                }
            }
            ChannelCommand::AddMember { user } => {
                if self.kind.is_direct() {
                    return Err(DomainError::Forbidden(
                        "the members of a DM are fixed".into(),
                    ));
                }
                if self.members.contains(&user) {
                    return Ok(ChannelDecision::Unchanged);
                }
                ChannelEvent::MemberJoined {
                    user,
                    by: by.user(),
                }
            }
            ChannelCommand::RemoveMember { user } => {
                if self.kind.is_direct() {
                    return Err(DomainError::Forbidden(
                        "the members of a DM are fixed".into(),
                    ));
                }
                let allowed =
                    user == by.user() || self.created_by == by.user() || by.role().is_admin();
                if !allowed {
                    return Err(DomainError::Forbidden(
                        "only the channel's creator or an admin may remove others".into(),
                    ));
                }
                if !self.members.contains(&user) {
                    return Err(DomainError::NotFound("member"));
                }
                ChannelEvent::MemberLeft {
                    user,
                    by: by.user(),
                }
            }
            ChannelCommand::Join => unreachable!("handled above"),
        };
        Ok(ChannelDecision::Event(event))
    }

    fn decide_join(&self, by: &Principal) -> Result<ChannelDecision, DomainError> {
        if by.workspace() != self.workspace {
            return Err(DomainError::NotFound("channel"));
        }
        if self.members.contains(&by.user()) {
            return Ok(ChannelDecision::Unchanged);
        }
        if self.kind != ChannelKind::Public {
            return Err(DomainError::NotFound("channel"));
        }
        Ok(ChannelDecision::Event(ChannelEvent::MemberJoined {
            user: by.user(),
            by: by.user(),
        }))
    }

    fn mentions(&self, text: &str) -> Mentions {
        mention::parse(text)
    }

    fn remembered(&self, user: UserId, key: &str, now_us: u64) -> Option<u64> {
        let seq = self.idempotency.get(&self.messages, user, key)?;
        let at = self.msg(seq)?.created_at;
        (now_us.saturating_sub(at) < IDEMPOTENCY_WINDOW_US).then_some(seq)
    }

    /// Applies an event with its seq and time. Seqs must come in order.
    pub fn apply(&mut self, seq: u64, at_us: u64, event: &ChannelEvent) {
        assert_eq!(
            seq,
            self.last_seq + 1,
            "channel {} seq out of order",
            self.id
        );
        self.last_seq = seq;
        match event {
            ChannelEvent::MemberJoined { user, .. } => {
                self.members.insert(*user);
                self.departed.remove(user);
                self.reads.joined(*user, seq);
            }
            ChannelEvent::MemberLeft { user, .. } => {
                self.members.remove(user);
                self.departed.insert(*user, seq);
                self.reads.left(*user);
            }
            ChannelEvent::MessagePosted { .. } | ChannelEvent::MessagePostedWithFiles(_) => {
                let p = event.posted().expect("a post");
                self.reads.posted(seq, p.user, p.mentions);
                match p.thread {
                    Some(root) => {
                        self.replies.entry(root).or_default().push(seq);
                        if let Some(r) = self.msg_mut(root) {
                            r.reply_count += 1;
                        }
                    }
                    None => self.top_level.push(seq),
                }
                for f in p.files {
                    self.file_refs.entry(*f).or_default().push(seq);
                }
                self.messages.push(Message {
                    seq,
                    user: p.user,
                    versions: smallvec::smallvec![(StoredBody::from(p.body), at_us)],
                    thread: p.thread,
                    reply_count: 0,
                    reactions: Vec::new(),
                    edited_at: None,
                    deleted: false,
                    created_at: at_us,
                    client_msg_id: p.client_msg_id.cloned(),
                    files: p.files.into(),
                });
                if p.client_msg_id.is_some() {
                    self.idempotency
                        .remember(&self.messages, at_us, IDEMPOTENCY_WINDOW_US);
                }
            }
            ChannelEvent::MessageEdited {
                target,
                body,
                mentions,
            } => {
                if let Some(m) = self.msg_mut(*target) {
                    m.versions.push((StoredBody::from(body), at_us));
                    m.edited_at = Some(at_us);
                    if !m.deleted {
                        let author = m.user;
                        self.reads.edited(*target, author, mentions);
                    }
                }
            }
            ChannelEvent::MessageDeleted { target, .. } => {
                if let Some(author) = self.msg(*target).filter(|m| !m.deleted).map(|m| m.user) {
                    self.reads.deleted(*target, author);
                }
                if let Some(m) = self.msg_mut(*target) {
                    // A deletion removes the texts from the state: the message keeps its
                    // place, empty. (The log keeps its events, as the audit trail.)
                    m.deleted = true;
                    m.reactions.clear();
                    m.versions = smallvec::smallvec![(StoredBody::Text(Text::from("")), at_us)];
                }
            }
            ChannelEvent::ReactionAdded {
                target,
                emoji,
                user,
            } => {
                if let Some(m) = self.msg_mut(*target) {
                    match m.reactions.iter_mut().find(|(e, _)| e == emoji) {
                        Some((_, users)) => users.push(*user),
                        None => m.reactions.push((emoji.clone(), vec![*user])),
                    }
                }
            }
            ChannelEvent::ReactionRemoved {
                target,
                emoji,
                user,
            } => {
                if let Some(m) = self.msg_mut(*target) {
                    if let Some((_, users)) = m.reactions.iter_mut().find(|(e, _)| e == emoji) {
                        users.retain(|u| u != user);
                    }
                    m.reactions.retain(|(_, users)| !users.is_empty());
                }
            }
            ChannelEvent::DeviceAdded { user, device } => {
                self.devices.insert((*user, device.clone()));
                self.devices_seq = seq;
            }
            ChannelEvent::DeviceRemoved { user, device } => {
                self.devices.remove(&(*user, device.clone()));
                self.devices_seq = seq;
            }
        }
    }

    /// Decides a read marker: whether marking `seq` read moves the principal's marker
    /// (a lower or equal seq is a no-op that answers the current marker). A seq above the
    /// channel's last is refused; a channel the principal is not in is not found.
    pub fn decide_read(&self, by: &Principal, seq: u64) -> Result<bool, DomainError> {
        self.check_reach(by)?;
        if seq > self.last_seq {
            return Err(DomainError::Invalid(format!(
                "seq {seq} is above the channel's last_seq {}",
                self.last_seq
            )));
        }
        Ok(self.reads.marker(by.user()).is_none_or(|m| m < seq))
    }

    /// Moves a member's read marker forward to `seq` (never back, never past the last
    /// seq); returns whether it moved. Not a channel event: the seq stays as it is.
    pub fn mark_read(&mut self, user: UserId, seq: u64) -> bool {
        seq <= self.last_seq && self.reads.mark(user, seq)
    }

    /// A member's read marker and unread counts; `None` for anyone else. In a DM or group
    /// DM every unread message counts as a mention.
    pub fn read_counts(&self, user: UserId) -> Option<ReadCounts> {
        self.reads.counts(user, self.kind.is_direct())
    }

    /// A message the principal may read.
    pub fn get(&self, by: &Principal, id: MessageId) -> Result<&Message, DomainError> {
        self.check_reach(by)?;
        self.message(id)
    }

    /// A message by seq, for rendering events (no access check: the caller delivers only to
    /// members).
    pub fn message_at(&self, seq: u64) -> Option<&Message> {
        self.msg(seq)
    }

    /// A message as search shows it (`API.md` §12): to a member, or, in a public channel,
    /// to any member of its workspace.
    pub fn found(&self, by: &Principal, id: MessageId) -> Result<&Message, DomainError> {
        let reach = self.members.contains(&by.user()) || self.kind == ChannelKind::Public;
        if by.workspace() != self.workspace || !reach {
            return Err(DomainError::NotFound("channel"));
        }
        self.message(id)
    }

    /// Top-level messages before `before` (a seq), newest first.
    pub fn history(
        &self,
        by: &Principal,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Page<&Message>, DomainError> {
        self.check_reach(by)?;
        let end = match before {
            Some(b) => self.top_level.partition_point(|s| *s < b),
            None => self.top_level.len(),
        };
        let start = end.saturating_sub(limit);
        let mut items: Vec<&Message> = self.msgs_at(&self.top_level[start..end]).collect();
        items.reverse();
        let next_cursor = (start > 0).then(|| self.top_level[start]);
        Ok(Page { items, next_cursor })
    }

    /// Replies of a thread after `after` (a seq), oldest first.
    pub fn replies(
        &self,
        by: &Principal,
        root: MessageId,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Page<&Message>, DomainError> {
        self.check_reach(by)?;
        let m = self.message(root)?;
        if m.thread.is_some() {
            return Err(DomainError::NotFound("thread"));
        }
        let all = self
            .replies
            .get(&root.seq)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let start = match after {
            Some(a) => all.partition_point(|s| *s <= a),
            None => 0,
        };
        let end = (start + limit).min(all.len());
        let items = self.msgs_at(&all[start..end]).collect();
        let next_cursor = (end < all.len()).then(|| all[end - 1]);
        Ok(Page { items, next_cursor })
    }
}

/// Where `seq` is, or would be, in `messages` (sorted by seq): the index of the first
/// message whose seq is not below it. The search starts where `seq` would sit if the seqs
/// were evenly spread between the first and the last message, and doubles its step away
/// from there until it has passed `seq`, then halves: a few cache misses when the guess is
/// near, never more than about twice a binary search's.
fn position_from(messages: &[Message], seq: u64) -> usize {
    let (Some(first), Some(last)) = (messages.first(), messages.last()) else {
        return 0;
    };
    if seq <= first.seq {
        return 0;
    }
    if seq > last.seq {
        return messages.len();
    }
    let span = u128::from(last.seq - first.seq);
    let guess = (u128::from(seq - first.seq) * (messages.len() - 1) as u128 / span) as usize;
    let below = |i: usize| messages[i].seq < seq;
    let (lo, hi) = if below(guess) {
        // messages[lo] is below seq; messages[hi], if any, is not.
        let (mut lo, mut step) = (guess, 1);
        while lo + step < messages.len() && below(lo + step) {
            lo += step;
            step *= 2;
        }
        (lo + 1, (lo + step).min(messages.len()))
    } else {
        // messages[hi] is not below seq; messages[lo - 1], if any, is.
        let (mut hi, mut step) = (guess, 1);
        while step <= hi && !below(hi - step) {
            hi -= step;
            step *= 2;
        }
        (hi.saturating_sub(step - 1), hi)
    };
    lo + messages[lo..hi].partition_point(|m| m.seq < seq)
}

/// Snapshot codes of channel kinds and body kinds (snapshot format version 1).
fn kind_code(kind: ChannelKind) -> u8 {
    match kind {
        ChannelKind::Public => 0,
        ChannelKind::Private => 1,
        ChannelKind::Dm => 2,
        ChannelKind::GroupDm => 3,
        ChannelKind::EncryptedDm => 4,
        ChannelKind::EncryptedGroupDm => 5,
    }
}

fn kind_of(code: u8) -> Result<ChannelKind, SnapshotError> {
    Ok(match code {
        0 => ChannelKind::Public,
        1 => ChannelKind::Private,
        2 => ChannelKind::Dm,
        3 => ChannelKind::GroupDm,
        4 => ChannelKind::EncryptedDm,
        5 => ChannelKind::EncryptedGroupDm,
        other => return Err(SnapshotError(format!("unknown channel kind {other}"))),
    })
}

const MSG_DELETED: u8 = 1;
const MSG_EDITED: u8 = 2;
const MSG_KEYED: u8 = 4;
/// Snapshot version 3: the message carries files, written after its key.
const MSG_FILES: u8 = 8;
const BODY_TEXT: u8 = 0;
const BODY_BLOB: u8 = 1;
/// Snapshot version 4: an encrypted channel's ciphertext.
const BODY_CIPHERTEXT: u8 = 2;

fn write_body(w: &mut Writer, body: &StoredBody) {
    match body {
        StoredBody::Text(t) => {
            w.u8(BODY_TEXT);
            w.str(t.as_str());
        }
        StoredBody::Blob { hash, len } => {
            w.u8(BODY_BLOB);
            w.bytes(&hash[..]);
            w.u64(*len);
        }
        StoredBody::Ciphertext(c) => {
            w.u8(BODY_CIPHERTEXT);
            w.str(c.as_str());
        }
    }
}

fn read_body(r: &mut Reader<'_>) -> Result<StoredBody, SnapshotError> {
    let text = |r: &mut Reader<'_>| {
        let bytes = r.shared_bytes()?;
        Text::from_shared(bytes)
            .map_err(|_| SnapshotError(format!("invalid UTF-8 before byte {}", r.position())))
    };
    match r.u8()? {
        BODY_TEXT => text(r).map(StoredBody::Text),
        BODY_CIPHERTEXT => text(r).map(StoredBody::Ciphertext),
        BODY_BLOB => {
            let hash: [u8; 32] = r
                .bytes()?
                .try_into()
                .map_err(|_| SnapshotError("a blob hash is not 32 bytes".into()))?;
            Ok(StoredBody::Blob {
                hash: Box::new(hash),
                len: r.u64()?,
            })
        }
        other => Err(SnapshotError(format!("unknown body kind {other}"))),
    }
}

impl ChannelState {
    /// Writes the whole state into a snapshot body: identity, members, former members,
    /// every message in seq order, and the idempotency window. The indexes (top-level
    /// messages, thread replies) are not written: [`ChannelState::restore`] rebuilds them
    /// from the messages, which come in seq order.
    pub(crate) fn snapshot(&self, w: &mut Writer) {
        w.u64(self.id.0);
        w.u64(self.workspace.0);
        w.u8(kind_code(self.kind));
        w.u64(self.created_by.0);
        w.u64(self.last_seq);
        w.len(self.members.len());
        for u in &self.members {
            w.u64(u.0);
        }
        w.len(self.departed.len());
        for (u, seq) in &self.departed {
            w.u64(u.0);
            w.u64(*seq);
        }
        w.len(self.messages.len());
        for m in &self.messages {
            w.u64(m.seq);
            w.u64(m.user.0);
            w.u64(m.thread.unwrap_or(0));
            w.u32(m.reply_count);
            w.u64(m.created_at);
            let flags = if m.deleted { MSG_DELETED } else { 0 }
                | if m.edited_at.is_some() { MSG_EDITED } else { 0 }
                | if m.client_msg_id.is_some() {
                    MSG_KEYED
                } else {
                    0
                }
                | if m.files.is_empty() { 0 } else { MSG_FILES };
            w.u8(flags);
            if let Some(at) = m.edited_at {
                w.u64(at);
            }
            if let Some(key) = &m.client_msg_id {
                w.str(key);
            }
            if !m.files.is_empty() {
                w.len(m.files.len());
                for f in &m.files {
                    w.u64(f.0);
                }
            }
            w.len(m.versions.len());
            for (body, at) in &m.versions {
                write_body(w, body);
                w.u64(*at);
            }
            w.len(m.reactions.len());
            for (emoji, users) in &m.reactions {
                w.str(emoji);
                w.len(users.len());
                for u in users {
                    w.u64(u.0);
                }
            }
        }
        w.len(self.idempotency.len());
        for seq in self.idempotency.seqs() {
            let m = self.msg(seq).expect("a remembered key's message");
            w.u64(m.user.0);
            w.str(
                m.client_msg_id
                    .as_deref()
                    .expect("a remembered message's key"),
            );
            w.u64(seq);
        }
        // The keys still to be forgotten, oldest first (read back only by earlier versions,
        // which kept them as a queue of their own).
        w.len(self.idempotency.pending(&self.messages).count());
        for m in self.idempotency.pending(&self.messages) {
            w.u64(m.created_at);
            w.u64(m.user.0);
            w.str(m.client_msg_id.as_deref().expect("a pending message's key"));
        }
        let markers = self.reads.markers_sorted();
        w.len(markers.len());
        for (u, seq) in markers {
            w.u64(u.0);
            w.u64(seq);
        }
        let mentions = self.reads.mentions_sorted();
        w.len(mentions.len());
        for (seq, m) in mentions {
            w.u64(seq);
            w.u8(u8::from(m.here) | u8::from(m.channel) << 1);
            w.len(m.users.len());
            for u in &m.users {
                w.u64(u.0);
            }
        }
        // Version 4: an encrypted channel's device list (no older version has one).
        if self.kind.is_encrypted() {
            w.u64(self.devices_seq);
            w.len(self.devices.len());
            for (u, device) in &self.devices {
                w.u64(u.0);
                w.str(device);
            }
        }
    }

    /// Reads a state written by [`ChannelState::snapshot`], checking that its messages come
    /// in seq order and that every reference (thread roots, idempotency keys) points at a
    /// message it holds.
    pub(crate) fn restore(r: &mut Reader<'_>) -> Result<ChannelState, SnapshotError> {
        let fail = |what: String| SnapshotError(what);
        let mut s = ChannelState::new(
            ChannelId(r.u64()?),
            WorkspaceId(r.u64()?),
            kind_of(r.u8()?)?,
            UserId(r.u64()?),
        );
        s.last_seq = r.u64()?;
        for _ in 0..r.count(8)? {
            s.members.insert(UserId(r.u64()?));
        }
        for _ in 0..r.count(16)? {
            s.departed.insert(UserId(r.u64()?), r.u64()?);
        }
        let n = r.count(45)?;
        s.messages.reserve(n);
        let mut prev = 0;
        for _ in 0..n {
            let seq = r.u64()?;
            if seq <= prev || seq > s.last_seq {
                return Err(fail(format!(
                    "channel {}: message seq {seq} out of order",
                    s.id
                )));
            }
            prev = seq;
            let user = UserId(r.u64()?);
            let thread = match r.u64()? {
                0 => None,
                root => Some(root),
            };
            let reply_count = r.u32()?;
            let created_at = r.u64()?;
            let flags = r.u8()?;
            let edited_at = if flags & MSG_EDITED != 0 {
                Some(r.u64()?)
            } else {
                None
            };
            let client_msg_id = if flags & MSG_KEYED != 0 {
                Some(r.string()?)
            } else {
                None
            };
            let files: Box<[FileId]> = if flags & MSG_FILES != 0 {
                (0..r.count(8)?)
                    .map(|_| r.u64().map(FileId))
                    .collect::<Result<_, _>>()?
            } else {
                Box::default()
            };
            for f in files.iter() {
                s.file_refs.entry(*f).or_default().push(seq);
            }
            let nv = r.count(9)?;
            if nv == 0 {
                return Err(fail(format!("channel {}: message {seq} has no body", s.id)));
            }
            let mut versions = Versions::with_capacity(nv);
            for _ in 0..nv {
                let body = read_body(r)?;
                versions.push((body, r.u64()?));
            }
            let mut reactions = Vec::new();
            for _ in 0..r.count(16)? {
                let emoji = r.string()?;
                let users = (0..r.count(8)?)
                    .map(|_| r.u64().map(UserId))
                    .collect::<Result<Vec<_>, _>>()?;
                reactions.push((emoji, users));
            }
            match thread {
                Some(root) => {
                    if s.msg(root).is_none() {
                        return Err(fail(format!("channel {}: reply {seq} to no root", s.id)));
                    }
                    s.replies.entry(root).or_default().push(seq);
                }
                None => s.top_level.push(seq),
            }
            s.messages.push(Message {
                seq,
                user,
                versions,
                thread,
                reply_count,
                reactions,
                edited_at,
                deleted: flags & MSG_DELETED != 0,
                created_at,
                client_msg_id,
                files,
            });
        }
        for _ in 0..r.count(24)? {
            let user = UserId(r.u64()?);
            let key = r.string()?;
            let seq = r.u64()?;
            s.idempotency
                .restore(&s.messages, user, &key, seq)
                .map_err(|why| fail(format!("channel {}: {why}", s.id)))?;
        }
        s.idempotency.restored(&s.messages);
        // The queue an earlier version kept: the table above says all it did.
        for _ in 0..r.count(24)? {
            r.u64()?;
            r.u64()?;
            r.string()?;
        }
        s.restore_reads(r)?;
        if s.kind.is_encrypted() {
            s.devices_seq = r.u64()?;
            if s.devices_seq > s.last_seq {
                return Err(fail(format!("channel {}: devices_seq ahead", s.id)));
            }
            for _ in 0..r.count(9)? {
                let user = UserId(r.u64()?);
                s.devices.insert((user, r.string()?));
            }
        }
        Ok(s)
    }

    /// Reads the read markers and the mentions of live messages that
    /// [`ChannelState::snapshot`] wrote last, and rebuilds the unread indexes from them and
    /// the messages. A marker must belong to a member and lie within the channel; a
    /// mention must belong to a live message.
    fn restore_reads(&mut self, r: &mut Reader<'_>) -> Result<(), SnapshotError> {
        let fail = |what: String| SnapshotError(what);
        let mut markers = Vec::new();
        for _ in 0..r.count(16)? {
            let (user, seq) = (UserId(r.u64()?), r.u64()?);
            if !self.members.contains(&user) || seq > self.last_seq {
                return Err(fail(format!(
                    "channel {}: marker of {user} at {seq}",
                    self.id
                )));
            }
            markers.push((user, seq));
        }
        let mut mentions = HashMap::new();
        for _ in 0..r.count(17)? {
            let seq = r.u64()?;
            let flags = r.u8()?;
            let users = (0..r.count(8)?)
                .map(|_| r.u64().map(UserId))
                .collect::<Result<Vec<_>, _>>()?;
            if self.msg(seq).is_none_or(|m| m.deleted) {
                return Err(fail(format!("channel {}: mentions of no message", self.id)));
            }
            let m = Mentions {
                users,
                here: flags & 1 != 0,
                channel: flags & 2 != 0,
            };
            mentions.insert(seq, m);
        }
        // The index is rebuilt in seq order, as the events built it: a member's marker is
        // then set to what the snapshot recorded.
        let mut reads = ReadIndex::default();
        let none = Mentions::default();
        for m in &self.messages {
            reads.posted(m.seq, m.user, mentions.get(&m.seq).unwrap_or(&none));
            if m.deleted {
                reads.deleted(m.seq, m.user);
            }
        }
        for (user, seq) in markers {
            reads.restore_marker(user, seq);
        }
        if let Some(u) = self.members.iter().find(|u| reads.marker(**u).is_none()) {
            return Err(fail(format!(
                "channel {}: member {u} has no marker",
                self.id
            )));
        }
        self.reads = reads;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Role;

    const W: WorkspaceId = WorkspaceId(1);
    const C: ChannelId = ChannelId(2);

    fn p(user: u64, role: Role) -> Principal {
        Principal::checked(UserId(user), W, role)
    }

    fn step(
        s: &mut ChannelState,
        by: &Principal,
        cmd: ChannelCommand,
    ) -> Result<ChannelDecision, DomainError> {
        let d = s.decide(by, cmd, 1_000 + s.last_seq())?;
        if let ChannelDecision::Event(e) = &d {
            let seq = s.last_seq() + 1;
            s.apply(seq, 1_000 + seq, e);
        }
        Ok(d)
    }

    fn post(text: &str, key: Option<&str>, thread: Option<u64>) -> ChannelCommand {
        ChannelCommand::Post {
            content: Content::Text(text.into()),
            client_msg_id: key.map(Into::into),
            thread: thread.map(|seq| MessageId { channel: C, seq }),
            files: None,
        }
    }

    fn mid(seq: u64) -> MessageId {
        MessageId { channel: C, seq }
    }

    // Threads, edits with history, deletions, reactions and idempotent sends behave as the
    // API says, and outsiders get NotFound for everything.
    #[test]
    fn semantics() {
        let mut s = ChannelState::new(C, W, ChannelKind::Public, UserId(1));
        for e in s.initial_events(&[UserId(1)]) {
            let seq = s.last_seq() + 1;
            s.apply(seq, 0, &e);
        }
        let (a, b, admin) = (p(1, Role::Member), p(2, Role::Member), p(3, Role::Admin));
        assert_eq!(
            step(&mut s, &b, post("hi", None, None)),
            Err(DomainError::NotFound("channel"))
        );
        step(&mut s, &b, ChannelCommand::Join).unwrap();
        assert_eq!(
            step(&mut s, &b, ChannelCommand::Join),
            Ok(ChannelDecision::Unchanged)
        );
        step(&mut s, &a, post("root", Some("k1"), None)).unwrap(); // seq 3
        assert_eq!(
            step(&mut s, &a, post("root", Some("k1"), None)),
            Ok(ChannelDecision::Duplicate(3))
        );
        step(&mut s, &b, post("reply", None, Some(3))).unwrap(); // seq 4
        assert!(matches!(
            step(&mut s, &b, post("r2", None, Some(4))),
            Err(DomainError::Invalid(_))
        ));
        assert_eq!(s.message_at(3).unwrap().reply_count, 1);
        let hist = s.history(&a, None, 10).unwrap();
        assert_eq!(
            hist.items.iter().map(|m| m.seq).collect::<Vec<_>>(),
            vec![3]
        );
        let rep = s.replies(&a, mid(3), None, 10).unwrap();
        assert_eq!(rep.items.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![4]);

        assert!(matches!(
            step(
                &mut s,
                &b,
                ChannelCommand::Edit {
                    message: mid(3),
                    content: Content::Text("x".into()),
                }
            ),
            Err(DomainError::Forbidden(_))
        ));
        step(
            &mut s,
            &a,
            ChannelCommand::Edit {
                message: mid(3),
                content: Content::Text("root v2".into()),
            },
        )
        .unwrap();
        let m = s.get(&a, mid(3)).unwrap();
        assert_eq!(m.versions.len(), 2);
        assert_eq!(m.body(), &StoredBody::Text("root v2".into()));

        step(
            &mut s,
            &b,
            ChannelCommand::React {
                message: mid(3),
                emoji: "+1".into(),
                add: true,
            },
        )
        .unwrap();
        assert_eq!(
            step(
                &mut s,
                &b,
                ChannelCommand::React {
                    message: mid(3),
                    emoji: "+1".into(),
                    add: true
                }
            ),
            Ok(ChannelDecision::Unchanged)
        );
        assert_eq!(
            s.message_at(3).unwrap().reactions,
            vec![("+1".to_string(), vec![UserId(2)])]
        );
        assert!(matches!(
            step(&mut s, &b, ChannelCommand::Delete { message: mid(3) }),
            Err(DomainError::Forbidden(_))
        ));
        let admin = admin_join(&mut s, admin);
        step(&mut s, &admin, ChannelCommand::Delete { message: mid(3) }).unwrap();
        let m = s.message_at(3).unwrap();
        assert!(m.deleted && m.reactions.is_empty());
        assert!(matches!(
            step(
                &mut s,
                &a,
                ChannelCommand::Edit {
                    message: mid(3),
                    content: Content::Text("y".into()),
                }
            ),
            Err(DomainError::Conflict(_))
        ));
        let outsider = Principal::checked(UserId(1), WorkspaceId(9), Role::Owner);
        assert_eq!(
            s.get(&outsider, mid(3)),
            Err(DomainError::NotFound("channel"))
        );
    }

    fn admin_join(s: &mut ChannelState, admin: Principal) -> Principal {
        step(s, &admin, ChannelCommand::Join).unwrap();
        admin
    }

    /// A private channel whose one member is user 1, and that member.
    fn one_member() -> (ChannelState, Principal) {
        let mut s = ChannelState::new(C, W, ChannelKind::Private, UserId(1));
        s.apply(
            1,
            0,
            &ChannelEvent::MemberJoined {
                user: UserId(1),
                by: UserId(1),
            },
        );
        let a = p(1, Role::Member);
        (s, a)
    }

    // The search from a guess finds what a binary search finds, for every seq present or
    // absent, over evenly and unevenly spread seqs (runs of dense seqs, long gaps).
    #[test]
    fn position_from_agrees_with_binary_search() {
        let message = |seq| Message {
            seq,
            user: UserId(1),
            versions: smallvec::smallvec![(StoredBody::Text("m".into()), 0)],
            thread: None,
            reply_count: 0,
            reactions: Vec::new(),
            edited_at: None,
            deleted: false,
            created_at: 0,
            client_msg_id: None,
            files: Box::default(),
        };
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for len in [0usize, 1, 2, 3, 7, 100, 1000] {
            for shape in 0..4 {
                let mut seq = 1 + next() % 5;
                let messages: Vec<Message> = (0..len)
                    .map(|i| {
                        let m = message(seq);
                        seq += match shape {
                            0 => 1,
                            1 => 1 + next() % 3,
                            2 if i % 50 == 49 => 1 + next() % 100_000,
                            2 => 1,
                            _ => 1 + next() % (1 << (next() % 20)),
                        };
                        m
                    })
                    .collect();
                let top = messages.last().map_or(10, |m| m.seq + 3);
                let probes = (0..=top.min(3000)).chain((0..3000).map(|_| next() % (top + 1)));
                for probe in probes {
                    let want = messages.partition_point(|m| m.seq < probe);
                    assert_eq!(
                        position_from(&messages, probe),
                        want,
                        "len {len} shape {shape} seq {probe}"
                    );
                }
            }
        }
    }

    // History pages newest first with a cursor that continues exactly where it stopped.
    #[test]
    fn history_pages() {
        let (mut s, a) = one_member();
        for i in 0..25 {
            step(&mut s, &a, post(&format!("m{i}"), None, None)).unwrap();
        }
        let mut seen = Vec::new();
        let mut cursor = None;
        loop {
            let page = s.history(&a, cursor, 10).unwrap();
            seen.extend(page.items.iter().map(|m| m.seq));
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        assert_eq!(seen, (2..=26).rev().collect::<Vec<_>>());
    }

    // Pages of a channel whose top-level messages sit between runs of replies of every
    // length (0 to 40), and of each thread, hold exactly the messages a lookup of each seq
    // finds: the search from the last message found skips the replies between.
    #[test]
    fn pages_skip_replies_between_their_messages() {
        let (mut s, a) = one_member();
        let mut roots = Vec::new();
        for i in 0..41u64 {
            step(&mut s, &a, post(&format!("root {i}"), None, None)).unwrap();
            let root = s.last_seq();
            roots.push(root);
            // Replies to this root and to an older one, interleaved.
            for r in 0..i {
                let to = if r % 3 == 0 {
                    roots[(r as usize) % roots.len()]
                } else {
                    root
                };
                step(&mut s, &a, post(&format!("reply {i}.{r}"), None, Some(to))).unwrap();
            }
        }
        let seqs = |items: &[&Message]| -> Vec<u64> { items.iter().map(|m| m.seq).collect() };
        for limit in [1, 7, 50] {
            let mut cursor = None;
            let mut seen = Vec::new();
            loop {
                let page = s.history(&a, cursor, limit).unwrap();
                for m in &page.items {
                    assert_eq!(s.msg(m.seq).map(|x| x.seq), Some(m.seq));
                    assert!(m.thread.is_none(), "a reply in the history");
                }
                seen.extend(seqs(&page.items));
                match page.next_cursor {
                    Some(c) => cursor = Some(c),
                    None => break,
                }
            }
            let mut want = roots.clone();
            want.reverse();
            assert_eq!(seen, want, "history by {limit}");
        }
        for &root in &roots {
            let page = s.replies(&a, mid(root), None, 100).unwrap();
            let got = seqs(&page.items);
            let mut want: Vec<u64> = (1..=s.last_seq())
                .filter(|&q| s.msg(q).is_some_and(|m| m.thread == Some(root)))
                .collect();
            want.truncate(100);
            assert_eq!(got, want, "replies of {root}");
        }
    }

    // A key finds its message within the window and not after; the table forgets a key once
    // its message has left the window, keeps a key that a later message took over, and a
    // snapshot restores what it remembers and goes on forgetting from there.
    #[test]
    fn idempotency_keys_within_the_window() {
        const H: u64 = 3_600 * 1_000_000;
        let mut s = ChannelState::new(C, W, ChannelKind::Public, UserId(1));
        for e in s.initial_events(&[UserId(1), UserId(2)]) {
            let seq = s.last_seq() + 1;
            s.apply(seq, 0, &e);
        }
        let (a, b) = (p(1, Role::Member), p(2, Role::Member));
        let send = |s: &mut ChannelState, by: &Principal, key: &str, now: u64| {
            let d = s.decide(by, post("text", Some(key), None), now).unwrap();
            match d {
                ChannelDecision::Event(e) => {
                    let seq = s.last_seq() + 1;
                    s.apply(seq, now, &e);
                    seq
                }
                ChannelDecision::Duplicate(seq) => seq,
                other => panic!("{other:?}"),
            }
        };
        let k1 = send(&mut s, &a, "k1", H);
        let k2 = send(&mut s, &a, "k2", 3 * H);
        assert_eq!(
            send(&mut s, &a, "k1", 3 * H),
            k1,
            "a resend within the window"
        );
        let other = send(&mut s, &b, "k1", 3 * H);
        assert_ne!(other, k1, "another author's key is another key");
        assert_eq!(s.idempotency.len(), 3);
        // 49 hours after k1: k1's message left the window, so the same key makes a new
        // message and the table holds that one; k2 is still within it.
        let k1_again = send(&mut s, &a, "k1", 50 * H);
        assert_ne!(k1_again, k1);
        assert_eq!(send(&mut s, &a, "k2", 50 * H), k2);
        assert_eq!(s.remembered(UserId(1), "k1", 50 * H), Some(k1_again));
        assert_eq!(s.idempotency.len(), 3, "k1 taken over, k2 and b's k1 kept");

        let mut w = Writer::default();
        s.snapshot(&mut w);
        let loaded = crate::snapshot::parse(w.finish(0, 1), 0).unwrap();
        let mut r = loaded.body();
        let mut back = ChannelState::restore(&mut r).unwrap();
        r.finish().unwrap();
        assert_eq!(back, s);
        for s in [&mut s, &mut back] {
            // 60 hours: everything before k1_again has left the window and is forgotten.
            let k3 = send(s, &b, "k3", 60 * H);
            let mut left: Vec<u64> = s.idempotency.seqs().collect();
            left.sort_unstable();
            assert_eq!(left, [k1_again, k3]);
            assert_eq!(s.remembered(UserId(1), "k2", 60 * H), None);
            assert_eq!(send(s, &a, "k1", 60 * H), k1_again);
        }
    }

    // A snapshot of a channel with every kind of event (threads, edits, deletions,
    // reactions, idempotency keys, a member who left, a blob body, files, mentions, a read
    // marker)
    // restores to an equal state, indexes and unread counts included.
    #[test]
    fn snapshot_round_trip() {
        let mut s = ChannelState::new(C, W, ChannelKind::Private, UserId(1));
        s.apply(
            1,
            0,
            &ChannelEvent::MemberJoined {
                user: UserId(1),
                by: UserId(1),
            },
        );
        s.apply(
            2,
            0,
            &ChannelEvent::MemberJoined {
                user: UserId(2),
                by: UserId(1),
            },
        );
        let (a, b) = (p(1, Role::Member), p(2, Role::Member));
        step(&mut s, &a, post("root", Some("k1"), None)).unwrap(); // 3
        step(&mut s, &b, post("reply", Some("k2"), Some(3))).unwrap(); // 4
        step(&mut s, &a, post("other", None, None)).unwrap(); // 5
        let edit = ChannelCommand::Edit {
            message: mid(3),
            content: Content::Text("root v2".into()),
        };
        step(&mut s, &a, edit).unwrap();
        let react = |emoji: &str| ChannelCommand::React {
            message: mid(3),
            emoji: emoji.into(),
            add: true,
        };
        step(&mut s, &a, react("+1")).unwrap();
        step(&mut s, &b, react("+1")).unwrap();
        step(&mut s, &b, react("eyes")).unwrap();
        step(&mut s, &a, ChannelCommand::Delete { message: mid(5) }).unwrap();
        let seq = s.last_seq() + 1;
        let blob = Body::Blob {
            hash: [7; 32],
            len: 70_000,
        };
        let big = ChannelEvent::MessagePosted {
            user: UserId(2),
            body: blob,
            thread: None,
            client_msg_id: None,
            mentions: Mentions::default(),
        };
        s.apply(seq, 9_999, &big);
        let with_files = ChannelCommand::Post {
            content: Content::Text(String::new()),
            client_msg_id: None,
            thread: None,
            files: Some(Box::new(vec![FileId(40), FileId(41)])),
        };
        step(&mut s, &b, with_files).unwrap();
        assert!(s.file_readable(UserId(2), FileId(41)));
        assert!(!s.file_readable(UserId(3), FileId(41)));
        assert!(!s.file_readable(UserId(2), FileId(42)));
        let mention = format!("hey <@{}>", UserId(1));
        step(&mut s, &b, post(&mention, None, None)).unwrap();
        step(&mut s, &b, post("@here", None, Some(3))).unwrap();
        assert!(
            !s.mark_read(UserId(1), 4),
            "user 1 posted 5: its marker is past 4"
        );
        assert!(s.mark_read(UserId(1), seq));
        step(&mut s, &a, ChannelCommand::RemoveMember { user: UserId(2) }).unwrap();

        let mut w = Writer::default();
        s.snapshot(&mut w);
        let loaded = crate::snapshot::parse(w.finish(0, 1), 0).unwrap();
        let mut r = loaded.body();
        let back = ChannelState::restore(&mut r).unwrap();
        r.finish().unwrap();
        assert_eq!(back, s);
        assert_eq!(
            back.history(&a, None, 10)
                .unwrap()
                .items
                .iter()
                .map(|m| m.seq)
                .collect::<Vec<_>>(),
            vec![seq + 2, seq + 1, seq, 5, 3]
        );
        assert_eq!(
            &*back.message_at(seq + 1).unwrap().files,
            [FileId(40), FileId(41)]
        );
        assert_eq!(back.replies(&a, mid(3), None, 10).unwrap().items.len(), 2);
        assert_eq!(back.readable_until(UserId(2)), Some(s.last_seq()));
        let counts = back.read_counts(UserId(1)).unwrap();
        assert_eq!(Some(counts), s.read_counts(UserId(1)));
        assert_eq!(
            (counts.read_seq, counts.unread_count, counts.mention_count),
            (seq, 3, 2)
        );
    }

    // A reaction stored before the emoji rules existed can be taken back by its user, and
    // by no one else; a new one like it is refused.
    #[test]
    fn reactions_from_before_the_emoji_rules_can_be_removed() {
        let mut s = ChannelState::new(C, W, ChannelKind::Public, UserId(1));
        for e in s.initial_events(&[UserId(1)]) {
            let seq = s.last_seq() + 1;
            s.apply(seq, 0, &e);
        }
        let (a, b) = (p(1, Role::Member), p(2, Role::Member));
        step(&mut s, &b, ChannelCommand::Join).unwrap(); // 2
        step(&mut s, &a, post("root", None, None)).unwrap(); // 3
        let seq = s.last_seq() + 1;
        let legacy = ChannelEvent::ReactionAdded {
            target: 3,
            emoji: "<b>".into(),
            user: UserId(1),
        };
        s.apply(seq, 2_000, &legacy);
        let react = |add: bool| ChannelCommand::React {
            message: mid(3),
            emoji: "<b>".into(),
            add,
        };
        assert!(matches!(
            step(&mut s, &a, react(true)),
            Err(DomainError::Invalid(_))
        ));
        assert!(matches!(
            step(&mut s, &b, react(false)),
            Err(DomainError::Invalid(_))
        ));
        assert!(matches!(
            step(&mut s, &a, react(false)),
            Ok(ChannelDecision::Event(ChannelEvent::ReactionRemoved { .. }))
        ));
        assert!(s.message_at(3).unwrap().reactions.is_empty());
    }

    fn sealed_content(ciphertext: &str, devices_seq: Option<u64>) -> Content {
        Content::Sealed(Box::new(Sealed {
            ciphertext: ciphertext.into(),
            devices_seq,
        }))
    }

    fn sealed(ciphertext: &str, devices_seq: Option<u64>, key: Option<&str>) -> ChannelCommand {
        ChannelCommand::Post {
            content: sealed_content(ciphertext, devices_seq),
            client_msg_id: key.map(Into::into),
            thread: None,
            files: None,
        }
    }

    fn devices(list: &[(u64, &str)]) -> BTreeSet<(UserId, String)> {
        list.iter()
            .map(|(u, d)| (UserId(*u), (*d).to_owned()))
            .collect()
    }

    fn apply_all(s: &mut ChannelState, events: Vec<ChannelEvent>) {
        for e in events {
            let seq = s.last_seq() + 1;
            s.apply(seq, 1_000 + seq, &e);
        }
    }

    // An encrypted channel follows its members' devices with events, takes ciphertext
    // only, refuses a send encrypted for an older device list and stores nothing for it,
    // and never parses its ciphertext; a plain channel refuses ciphertext. The device list
    // and the ciphertexts survive a snapshot.
    #[test]
    fn encrypted_channels() {
        let mut s = ChannelState::new(C, W, ChannelKind::EncryptedDm, UserId(1));
        let members = s.initial_events(&[UserId(1), UserId(2)]);
        apply_all(&mut s, members);
        let listed = devices(&[(1, "A1"), (2, "B1")]);
        let first = s.device_events(&listed);
        assert_eq!(first.len(), 2);
        apply_all(&mut s, first);
        assert_eq!(s.devices(), (&listed, 4));
        assert!(
            s.device_events(&listed).is_empty(),
            "in step: nothing to add"
        );
        let (a, b) = (p(1, Role::Member), p(2, Role::Member));

        assert!(matches!(
            step(&mut s, &a, post("hello", None, None)),
            Err(DomainError::EncryptionMismatch(_))
        ));
        assert!(matches!(
            step(&mut s, &a, post("", None, None)),
            Err(DomainError::Invalid(_))
        ));
        assert!(matches!(
            step(&mut s, &a, sealed("c", None, None)),
            Err(DomainError::Invalid(_))
        ));
        assert!(matches!(
            step(&mut s, &a, sealed("c", Some(99), None)),
            Err(DomainError::Invalid(_))
        ));
        assert!(matches!(
            step(&mut s, &a, sealed("", Some(4), None)),
            Err(DomainError::Invalid(_))
        ));
        let big = "x".repeat(CIPHERTEXT_BYTES_MAX + 1);
        assert!(matches!(
            step(&mut s, &a, sealed(&big, Some(4), None)),
            Err(DomainError::TooLarge(_))
        ));
        let mut with_files = sealed("c", Some(4), None);
        if let ChannelCommand::Post { files, .. } = &mut with_files {
            *files = Some(Box::new(vec![FileId(1)]));
        }
        assert!(matches!(
            step(&mut s, &a, with_files),
            Err(DomainError::Invalid(_))
        ));
        assert_eq!(s.last_seq(), 4, "nothing refused is stored");

        let mention = format!("<@{}> @channel", UserId(2));
        let post = step(&mut s, &a, sealed(&mention, Some(4), Some("k1"))); // 5
        let Ok(ChannelDecision::Event(ChannelEvent::MessagePosted { mentions, .. })) = post else {
            panic!("{post:?}");
        };
        assert_eq!(mentions, Mentions::default(), "ciphertext is never parsed");
        let m = s.message_at(5).unwrap();
        assert_eq!(
            m.body(),
            &StoredBody::Ciphertext(Text::from(mention.as_str()))
        );

        // Bob's second device is listed: the channel gets its event, and a send encrypted
        // for the list before it is refused, then taken once resent for the new list.
        let more = devices(&[(1, "A1"), (2, "B1"), (2, "B2")]);
        let added = s.device_events(&more);
        assert_eq!(
            added,
            vec![ChannelEvent::DeviceAdded {
                user: UserId(2),
                device: "B2".into()
            }]
        );
        apply_all(&mut s, added); // 6
        assert!(matches!(
            step(&mut s, &b, sealed("c2", Some(5), Some("k2"))),
            Err(DomainError::StaleDevices(_))
        ));
        assert_eq!(s.last_seq(), 6);
        step(&mut s, &b, sealed("c2", Some(6), Some("k2"))).unwrap(); // 7

        // The first send got through: its resend answers it, stale or not.
        assert_eq!(
            step(&mut s, &a, sealed("c", Some(4), Some("k1"))),
            Ok(ChannelDecision::Duplicate(5))
        );

        // Edits carry new ciphertext, for the current list too.
        let edit = |content| ChannelCommand::Edit {
            message: mid(5),
            content,
        };
        assert!(matches!(
            step(&mut s, &a, edit(Content::Text("plain".into()))),
            Err(DomainError::EncryptionMismatch(_))
        ));
        assert!(matches!(
            step(&mut s, &a, edit(sealed_content("c1'", Some(5)))),
            Err(DomainError::StaleDevices(_))
        ));
        step(&mut s, &a, edit(sealed_content("c1'", Some(7)))).unwrap(); // 8
        assert_eq!(
            s.message_at(5).unwrap().body(),
            &StoredBody::Ciphertext(Text::from("c1'"))
        );

        // A removal is an event too; the list and the ciphertexts survive a snapshot.
        let fewer = devices(&[(1, "A1"), (2, "B2")]);
        let removed = s.device_events(&fewer);
        assert_eq!(
            removed,
            vec![ChannelEvent::DeviceRemoved {
                user: UserId(2),
                device: "B1".into()
            }]
        );
        apply_all(&mut s, removed); // 9
        assert_eq!(s.devices(), (&fewer, 9));
        let mut w = Writer::default();
        s.snapshot(&mut w);
        let loaded = crate::snapshot::parse(w.finish(0, 1), 0).unwrap();
        let mut r = loaded.body();
        let back = ChannelState::restore(&mut r).unwrap();
        r.finish().unwrap();
        assert_eq!(back, s);

        // A plain channel takes no ciphertext and emits no device events.
        let mut plain = ChannelState::new(C, W, ChannelKind::Dm, UserId(1));
        let members = plain.initial_events(&[UserId(1), UserId(2)]);
        apply_all(&mut plain, members);
        assert!(plain.device_events(&listed).is_empty());
        assert!(matches!(
            step(&mut plain, &a, sealed("c", Some(2), None)),
            Err(DomainError::EncryptionMismatch(_))
        ));
    }
}
