//! The shards at run time: the messages they exchange and where they go ([`Routes`]);
//! each shard's start and main loop are in [`shard`].
//!
//! Every shard has two bounded inboxes ([`crate::queue::Inbox`]) that any thread may send
//! to: requests (metadata commands to the metadata owner on shard 0, channel requests to
//! the task of the partition that owns the channel, metadata events to apply) and events
//! (deliveries, registrations' answers, catch-up pages, subscriptions and resumes, for the
//! shard's dispatcher). [`ShardMsg::is_event`] says which a message goes to.
//!
//! Architecture invariant: messages of one kind (requests, or events) from one sender to a
//! shard arrive in the order they were sent, because the sender pushes into that FIFO inbox
//! from one thread, and a shard's dispatcher sends a message for a full inbox only after
//! the ones it sent that inbox before. Resume and subscription correctness rest on it: a
//! partition's answer to a subscriber's shard and the deliveries it sends afterwards (all
//! events) cannot overtake each other, nor can a dispatcher's registration and its later
//! unregistration (both requests).

pub(crate) mod dispatch;
pub(crate) mod layout;
pub(crate) mod meta;
pub(crate) mod online;
pub(crate) mod partition;
pub(crate) mod shard;
pub(crate) mod to_device;

pub(crate) use shard::{run_shard, ShardInboxes, ShardSetup, Started};

use crate::domain::channel::ChannelCommand;
use crate::domain::event::MetaRecord;
use crate::error::{EngineError, Unavailable};
use crate::ids::{ChannelId, MessageId, UserId, WorkspaceId};
use crate::outcome::{ChannelOutcome, ReadOutcome};
use crate::presence::{ConnKey, Mode, Presence, WatchOp};
use crate::queue::{FrameSender, InboxSender};
use crate::view::{ChannelView, ReadView};
use bytes::Bytes;
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

pub(crate) use crate::outcome::Reply;

thread_local! {
    /// The shard this thread runs, if it is a shard thread of its own (set by the thread
    /// bootstrap, never by a shard's loop: the simulation runs every shard on one thread).
    pub(crate) static CURRENT_SHARD: Cell<Option<u32>> = const { Cell::new(None) };
}

/// An acknowledgement that any shard can give: a shard applied a metadata event, or a
/// partition committed a new channel's first members. Every holder calls `done` exactly
/// once, on its failure paths too: a metadata event is published only when all have, and
/// the owner's later answers wait for that.
pub(crate) trait Ack: Send + Sync {
    fn done(&self);
}

/// An acknowledgement given once `n` others are: each of them calls `done` once, and the
/// last gives the one it wraps.
pub(crate) struct Joined {
    left: std::sync::atomic::AtomicUsize,
    then: Arc<dyn Ack>,
}

impl Joined {
    pub(crate) fn new(n: usize, then: Arc<dyn Ack>) -> Joined {
        Joined {
            left: std::sync::atomic::AtomicUsize::new(n),
            then,
        }
    }
}

impl Ack for Joined {
    fn done(&self) {
        if self.left.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) == 1 {
            self.then.done();
        }
    }
}

/// A read of channel data.
#[derive(Clone, Debug)]
pub(crate) enum ChannelRead {
    History {
        before: Option<u64>,
        limit: usize,
    },
    Replies {
        root: MessageId,
        after: Option<u64>,
        limit: usize,
    },
    /// One message; `found`: read by search's rule (`Channel::found`), not a member's.
    Message {
        id: MessageId,
        found: bool,
    },
    Versions {
        id: MessageId,
    },
    /// The channel's directory entry and last committed seq.
    Info,
}

/// A request for a partition.
pub(crate) enum PartitionMsg {
    Command {
        user: UserId,
        channel: ChannelId,
        cmd: ChannelCommand,
        reply: Reply<ChannelOutcome>,
    },
    Read {
        user: UserId,
        channel: ChannelId,
        read: ChannelRead,
        reply: Reply<ReadOutcome>,
    },
    /// Move the user's read marker forward to `seq` (`API.md` §9): durable, not an event.
    MarkRead {
        user: UserId,
        channel: ChannelId,
        seq: u64,
        reply: Reply<ReadView>,
    },
    /// The user's read state in their channels of a workspace after `after`: at most
    /// `limit` of them, in channel order.
    Unreads {
        user: UserId,
        workspace: WorkspaceId,
        after: Option<ChannelId>,
        limit: usize,
        out: Arc<Gather<ReadView>>,
    },
    /// What the push sender checks before pushing message `seq` of `channel` to these
    /// users. No access check: the engine's own consumers ask it.
    PushChecks {
        channel: ChannelId,
        seq: u64,
        users: Arc<Vec<UserId>>,
        reply: Reply<Recipients>,
    },
    /// Each user's unread messages over all their channels of this partition, in the
    /// order of `users`, added into `out`.
    UnreadTotals {
        users: Arc<Vec<UserId>>,
        out: Arc<SumGather>,
    },
    /// A channel was created in the directory: give it its first members.
    Init {
        channel: ChannelId,
        ack: Option<Arc<dyn Ack>>,
    },
    /// The user's listed devices changed in this shard's metadata replica: bring the
    /// device lists of the user's encrypted channels here up to it (`API.md` §14), and
    /// acknowledge once that is committed.
    DevicesChanged { user: UserId, ack: Arc<dyn Ack> },
    /// A user's connections on a shard changed (+1 or -1): the change's `version` in the
    /// partition's shard's table of connected users ([`online::ShardOnline`]).
    Online {
        user: UserId,
        shard: u32,
        delta: i32,
        sub: Option<u64>,
        version: u64,
    },
    /// Events of a channel after a seq, for a resuming subscriber: at most `max`.
    CatchUp {
        user: UserId,
        channel: ChannelId,
        after: u64,
        max: usize,
        shard: u32,
        sub: u64,
    },
    /// A member is typing: tell the channel's other subscribers, log nothing.
    Typing {
        user: UserId,
        channel: ChannelId,
        reply: Reply<()>,
    },
    /// The channels a user can see in a workspace (or is a member of, in all workspaces).
    Visible {
        user: UserId,
        workspace: Option<WorkspaceId>,
        out: Arc<Gather<ChannelView>>,
    },
    /// The channels where a user can read a live message that carries a file.
    FileReaders {
        user: UserId,
        file: crate::ids::FileId,
        out: Arc<Gather<ChannelId>>,
    },
    /// The partition's subscriber index, for [`crate::Engine::subscriber_index`].
    Audit { out: Arc<Audit> },
    /// A consumer's read of committed events: answered now, or at the next commit.
    Committed(crate::consumer::Waiter),
    /// Retention: delete whole segments before the offset (already clamped to the
    /// consumers' watermark), never after the last durable snapshot.
    DeleteBefore { offset: u64, reply: Reply<u64> },
}

/// Something a scatter query gathers, answered in channel order.
pub(crate) trait OfChannel {
    fn channel(&self) -> ChannelId;
}

impl OfChannel for ChannelView {
    fn channel(&self) -> ChannelId {
        self.id
    }
}

impl OfChannel for ChannelId {
    fn channel(&self) -> ChannelId {
        *self
    }
}

impl OfChannel for ReadView {
    fn channel(&self) -> ChannelId {
        self.channel_id
    }
}

/// Answers one reply once `count` parts (partitions or shards) have each added their part,
/// merged into one value: the gather of a scatter query. Each kind of query is an alias
/// with its own constructor below.
pub(crate) struct Fold<A, P> {
    left: AtomicUsize,
    acc: Mutex<A>,
    merge: fn(&mut A, P),
    finish: fn(&mut A),
    reply: Mutex<Option<Reply<A>>>,
}

impl<A: Default, P> Fold<A, P> {
    fn new(
        count: usize,
        acc: A,
        merge: fn(&mut A, P),
        finish: fn(&mut A),
        reply: Reply<A>,
    ) -> Arc<Fold<A, P>> {
        let fold = Arc::new(Fold {
            left: AtomicUsize::new(count),
            acc: Mutex::new(acc),
            merge,
            finish,
            reply: Mutex::new(Some(reply)),
        });
        if count == 0 {
            fold.answer();
        }
        fold
    }

    /// Adds one part; the last part answers.
    pub(crate) fn add(&self, part: P) {
        (self.merge)(&mut self.acc.lock().expect("fold"), part);
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.answer();
        }
    }

    fn answer(&self) {
        let mut acc = self.acc.lock().expect("fold");
        (self.finish)(&mut acc);
        if let Some(reply) = self.reply.lock().expect("fold").take() {
            let _ = reply.send(Ok(std::mem::take(&mut *acc)));
        }
    }
}

/// What a connection tells its user's presence owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ConnReport {
    /// It opened (active).
    Connected,
    /// The person became active (`true`) or idle.
    Active(bool),
    /// It closed.
    Gone,
}

/// What users show, each with their ID and the owner's change number it includes.
pub(crate) type Presences = Vec<(UserId, Presence, u64)>;

/// Gathers the presence owners' answers about the users each owns, sorted by user.
pub(crate) type PresenceGather = Fold<Presences, Presences>;

/// Answers `reply` with `items` and what `count` owners add (at once when `count` is 0).
pub(crate) fn presence_gather(
    count: usize,
    items: Presences,
    reply: Reply<Presences>,
) -> Arc<PresenceGather> {
    Fold::new(
        count,
        items,
        append,
        |items| items.sort_unstable_by_key(|(u, _, _)| *u),
        reply,
    )
}

/// The message at a seq as it is now (`None` if there is none), and for each asked user,
/// in order, whether they are a member of its channel and their read marker there.
pub(crate) type Recipients = (Option<crate::view::MessageView>, Vec<(bool, u64)>);

/// Adds up, element by element, what every partition counts for one list (the users of
/// [`PartitionMsg::UnreadTotals`]); fewer counts than the list's length count as zeros.
pub(crate) type SumGather = Fold<Vec<u64>, Vec<u64>>;

/// Answers `reply` with `len` sums once `count` partitions have added theirs.
pub(crate) fn sum_gather(count: usize, len: usize, reply: Reply<Vec<u64>>) -> Arc<SumGather> {
    let add_up = |sums: &mut Vec<u64>, counts: Vec<u64>| {
        for (sum, n) in sums.iter_mut().zip(counts) {
            *sum += n;
        }
    };
    Fold::new(count, vec![0; len], add_up, |_| {}, reply)
}

/// Gathers every partition's subscriber index, sorted.
pub(crate) type Audit =
    Fold<Vec<crate::outcome::SubscriberCount>, Vec<crate::outcome::SubscriberCount>>;

/// Answers `reply` once `count` partitions have added their subscriber counts.
pub(crate) fn audit(
    count: usize,
    reply: Reply<Vec<crate::outcome::SubscriberCount>>,
) -> Arc<Audit> {
    Fold::new(
        count,
        Vec::new(),
        append,
        |items| items.sort_unstable(),
        reply,
    )
}

/// The answers of every partition to a scatter query, sorted by channel.
pub(crate) type Gather<T> = Fold<Vec<T>, Vec<T>>;

/// Answers `reply` once `count` partitions have added their items.
pub(crate) fn gather<T: OfChannel>(count: usize, reply: Reply<Vec<T>>) -> Arc<Gather<T>> {
    Fold::new(
        count,
        Vec::new(),
        append,
        |items| items.sort_by_key(|c| c.channel()),
        reply,
    )
}

fn append<T>(items: &mut Vec<T>, mut part: Vec<T>) {
    items.append(&mut part);
}

/// One committed event for the subscribers of one shard.
#[derive(Clone, Debug)]
pub(crate) struct Delivery {
    pub channel: ChannelId,
    pub seq: u64,
    pub frame: Bytes,
    /// A membership change this event makes: the user, and whether they joined.
    pub membership: Option<(UserId, bool)>,
    /// An ephemeral frame (typing) from this user: it has no seq (`seq` is 0), is never
    /// logged, and does not go back to its sender.
    pub ephemeral_from: Option<UserId>,
    /// A frame for this user's subscribers only, whatever channels they follow (a `read`
    /// frame: a marker change reaches every connection of its user). It has no seq.
    pub to_user: Option<UserId>,
}

/// A message to a shard.
pub(crate) enum ShardMsg {
    /// A metadata command (metadata owner only).
    Meta(meta::MetaRequest),
    /// A committed metadata event to apply.
    MetaApplied {
        record: Arc<MetaRecord>,
        ack: Arc<dyn Ack>,
    },
    /// A committed metadata event the metadata owner's shard applied when it decided it:
    /// only its effects on this shard's subscribers are left (to-device frames).
    MetaEffects {
        record: Arc<MetaRecord>,
        ack: Arc<dyn Ack>,
    },
    /// A read of the metadata replica.
    MetaRead(meta::MetaRead),
    /// A consumer's read of the metadata log (metadata owner only).
    MetaCommitted(crate::consumer::Waiter),
    /// A request for a partition this shard owns.
    Partition { partition: u32, msg: PartitionMsg },
    /// The same request for every partition this shard owns (scatter).
    AllPartitions(Box<dyn Fn() -> PartitionMsg + Send>),
    /// A user's connections on `shard` changed (+1 or -1): applied to this shard's table of
    /// connected users, then told to every partition it owns; with `sub`, each partition
    /// answers that subscriber with the user's channels there.
    Online {
        user: UserId,
        shard: u32,
        delta: i32,
        sub: Option<u64>,
    },
    /// Committed events for this shard's subscribers.
    Deliver(Vec<Delivery>),
    /// A new subscriber on this shard; a held one gets no live frames until `Start`.
    Subscribe {
        user: UserId,
        /// The end-to-end encryption device of the credential, if any.
        device: Option<Arc<str>>,
        queue: FrameSender,
        held: bool,
        reply: Reply<dispatch::SubscriptionInfo>,
    },
    /// A held subscriber starts: each named channel from its seq, the others from where
    /// the subscription began; `announce` sends a `resumed` frame after the catch-up.
    Start {
        sub: u64,
        since: Vec<(ChannelId, u64)>,
        announce: bool,
    },
    /// A subscriber is gone.
    Unsubscribe { sub: u64 },
    /// A partition's answer to a subscriber's registration: its channels and last seqs.
    OnlineAck {
        sub: u64,
        channels: Vec<(ChannelId, u64)>,
    },
    /// A subscriber resumes channels after the given seqs. The reply says whether it can
    /// be done in order: not when a channel would have to go back before a frame this
    /// subscriber was already sent.
    Resume {
        sub: u64,
        since: Vec<(ChannelId, u64)>,
        reply: Option<futures::channel::oneshot::Sender<bool>>,
    },
    /// A page of catch-up frames for a resuming subscriber.
    CatchUpReply {
        sub: u64,
        channel: ChannelId,
        frames: Vec<Bytes>,
        last: u64,
        done: bool,
    },
    /// A connection's report to its user's presence owner (this shard).
    PresenceConn {
        user: UserId,
        conn: ConnKey,
        report: ConnReport,
    },
    /// A user sets their presence mode, at their presence owner (this shard).
    PresenceMode {
        user: UserId,
        mode: Mode,
        dnd_until_us: Option<u64>,
        reply: Reply<(Presence, Mode, Option<u64>)>,
    },
    /// A connection starts or stops watching users whose presence this shard owns. Those
    /// added are answered through `out`.
    PresenceWatch {
        watcher: UserId,
        conn: ConnKey,
        add: Vec<UserId>,
        remove: Vec<UserId>,
        out: Option<Arc<PresenceGather>>,
    },
    /// What users whose presence this shard owns show, as `asker` may see them; with no
    /// asker (the notification decider), what reaches them instead: each answer's third
    /// field is [`crate::presence::Reach::bits`].
    PresenceQuery {
        asker: Option<UserId>,
        users: Vec<UserId>,
        out: Arc<PresenceGather>,
    },
    /// A presence change for this shard's subscribers `subs`, the user's watchers: an
    /// [`crate::presence::Update`] record, encoded once by the owner.
    PresenceDeliver { record: Bytes, subs: Vec<u64> },
    /// A subscriber changes the set of users it watches.
    PresenceSub {
        sub: u64,
        op: WatchOp,
        users: Vec<UserId>,
        reply: Reply<Presences>,
    },
    /// A subscriber's person became active or idle.
    PresenceActivity { sub: u64, active: bool },
    /// From now on this shard tells the other nodes of a cluster what changes of its
    /// users' presence on this node: each change's records go to `out`, numbered in the
    /// shard's sequence (`crate::presence::peers`).
    PresenceShare {
        out: crate::presence::peers::Sink,
        reply: Reply<()>,
    },
    /// What node `from` says of the users whose presence this shard owns.
    PresencePeer {
        from: u64,
        input: crate::presence::peers::Input,
        reply: Reply<()>,
    },
    /// What this node says of the users whose presence this shard owns, a page from the
    /// user after `after` on, the number of the shard's sequence that includes, and
    /// whether more pages follow.
    PresenceSnapshot {
        after: UserId,
        max: usize,
        reply: Reply<(u64, Vec<crate::presence::peers::Record>, bool)>,
    },
    /// Read a blob through this shard's blob store (which, in a cluster, fetches it from a
    /// peer when this node lacks it).
    ReadBlob {
        blob: crate::blob::BlobRef,
        reply: futures::channel::oneshot::Sender<Result<Bytes, crate::blob::BlobError>>,
    },
    /// Run a task of the embedder on this shard (a server's accept loop, say).
    Spawn(Box<dyn FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>> + Send>),
    /// Stop: finish what is in flight, close the logs, and exit.
    Shutdown,
}

/// Where every shard's inboxes are, and how partitions map to shards.
#[derive(Clone)]
pub(crate) struct Routes {
    pub shards: Arc<Vec<ShardSenders>>,
    pub partitions: u32,
}

/// The sending ends of a shard's two inboxes (see [`shard`]).
pub(crate) struct ShardSenders {
    /// For its partitions, metadata owner and replica.
    pub requests: InboxSender<ShardMsg>,
    /// For its dispatcher.
    pub events: InboxSender<ShardMsg>,
}

impl ShardMsg {
    /// Whether the message is for the shard's dispatcher (its events inbox), rather than
    /// for its partitions, metadata owner or replica (its requests inbox).
    pub(crate) fn is_event(&self) -> bool {
        matches!(
            self,
            ShardMsg::Deliver(_)
                | ShardMsg::Subscribe { .. }
                | ShardMsg::Start { .. }
                | ShardMsg::Unsubscribe { .. }
                | ShardMsg::OnlineAck { .. }
                | ShardMsg::Resume { .. }
                | ShardMsg::CatchUpReply { .. }
                | ShardMsg::PresenceDeliver { .. }
                | ShardMsg::PresenceSub { .. }
                | ShardMsg::PresenceActivity { .. }
        )
    }

    /// The message's kind, for messages about it.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            ShardMsg::Meta(_) => "Meta",
            ShardMsg::MetaApplied { .. } => "MetaApplied",
            ShardMsg::MetaEffects { .. } => "MetaEffects",
            ShardMsg::MetaRead(_) => "MetaRead",
            ShardMsg::MetaCommitted(_) => "MetaCommitted",
            ShardMsg::Partition { .. } => "Partition",
            ShardMsg::AllPartitions(_) => "AllPartitions",
            ShardMsg::Online { .. } => "Online",
            ShardMsg::Deliver(_) => "Deliver",
            ShardMsg::Subscribe { .. } => "Subscribe",
            ShardMsg::Start { .. } => "Start",
            ShardMsg::Unsubscribe { .. } => "Unsubscribe",
            ShardMsg::OnlineAck { .. } => "OnlineAck",
            ShardMsg::Resume { .. } => "Resume",
            ShardMsg::CatchUpReply { .. } => "CatchUpReply",
            ShardMsg::PresenceConn { .. } => "PresenceConn",
            ShardMsg::PresenceMode { .. } => "PresenceMode",
            ShardMsg::PresenceWatch { .. } => "PresenceWatch",
            ShardMsg::PresenceQuery { .. } => "PresenceQuery",
            ShardMsg::PresenceDeliver { .. } => "PresenceDeliver",
            ShardMsg::PresenceSub { .. } => "PresenceSub",
            ShardMsg::PresenceActivity { .. } => "PresenceActivity",
            ShardMsg::PresenceShare { .. } => "PresenceShare",
            ShardMsg::PresencePeer { .. } => "PresencePeer",
            ShardMsg::PresenceSnapshot { .. } => "PresenceSnapshot",
            ShardMsg::ReadBlob { .. } => "ReadBlob",
            ShardMsg::Spawn(_) => "Spawn",
            ShardMsg::Shutdown => "Shutdown",
        }
    }
}

impl Routes {
    pub(crate) fn shard_count(&self) -> u32 {
        self.shards.len() as u32
    }

    /// The shard that owns a partition.
    pub(crate) fn owner(&self, partition: u32) -> u32 {
        partition % self.shard_count()
    }

    /// The inbox of `shard` that takes `msg`.
    fn inbox(&self, shard: u32, msg: &ShardMsg) -> &InboxSender<ShardMsg> {
        let s = &self.shards[shard as usize];
        if msg.is_event() {
            &s.events
        } else {
            &s.requests
        }
    }

    /// Sends a message, waiting for room if the inbox is full.
    pub(crate) async fn send(&self, shard: u32, msg: ShardMsg) -> Result<(), EngineError> {
        self.inbox(shard, &msg)
            .send(msg)
            .await
            .map_err(|_| Unavailable::ShuttingDown.into())
    }

    /// Sends a message if its inbox has room, without waiting.
    pub(crate) fn try_send(
        &self,
        shard: u32,
        msg: ShardMsg,
    ) -> Result<(), crate::queue::SendError<ShardMsg>> {
        self.inbox(shard, &msg).try_send(msg)
    }
}
