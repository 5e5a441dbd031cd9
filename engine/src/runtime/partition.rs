//! One partition at run time: its channels' state, its log, its subscriber index, and the
//! task that commits its events.
//!
//! The task works in ticks. It takes every request waiting (up to [`TICK_REQUESTS_MAX`]),
//! decides each command against the state and applies the resulting event at once (so the
//! next command sees it and gets the next seq), renders each event's frame once, appends
//! the whole tick as one batch through [`Durability`] (one fsync), and only then replies,
//! delivers, and answers the tick's reads. If the commit fails, the partition's in-memory
//! state is ahead of its log: it stops serving and the engine must be reopened.
//!
//! Architecture invariant: nothing is acknowledged, delivered or read before it is durable.
//! Reads and catch-ups are answered after the tick's commit, from committed state.

use super::{Ack, ChannelRead, Delivery, PartitionMsg, Reply, Routes, ShardMsg};
use crate::blob::{BlobRef, BlobStore};
use crate::domain::channel::{ChannelDecision, ChannelState, Message, StoredBody};
use crate::domain::event::{self, Body, ChannelEvent, ChannelRecord, Decoded, ReadRecord};
use crate::domain::meta::MetaState;
use crate::domain::{DomainError, Principal, INLINE_BODY_BYTES_MAX};
use crate::durability::{CommitError, Durability, Leading};
use crate::env::{DirOf, Env};
use crate::error::{Corrupt, EngineError, IoError, Unavailable};
use crate::ids::{ChannelId, UserId};
use crate::outcome::{ChannelOutcome, ReadOutcome};
use crate::runtime::online::{OnlineUsers, ShardOnline};
use crate::view::{rfc3339, ChannelReadFields, ChannelView, MessageView, ReadView};
use bytes::Bytes;
use chorus_log::{Entry, ReadError, Storage};
use futures::channel::mpsc;
use futures::StreamExt;
use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::rc::Rc;
use std::sync::Arc;

/// Most requests taken into one tick.
pub(crate) const TICK_REQUESTS_MAX: usize = 1024;

struct ChannelRt {
    state: ChannelState,
    /// The log offset of each event: `offsets[seq - 1]`.
    offsets: Vec<u64>,
    /// The last seq that is durable.
    committed: u64,
}

/// A partition and everything it owns.
pub(crate) struct Partition<E: Env> {
    pub id: u32,
    env: E,
    log: E::Durability,
    /// The log offset after the last record the state holds. It trails the log's end
    /// only in a cluster, while batches another node's leader committed wait to be
    /// applied ([`Partition::follow`]).
    applied: u64,
    channels: HashMap<ChannelId, ChannelRt>,
    /// Committed channel membership, by user.
    user_channels: HashMap<UserId, BTreeSet<ChannelId>>,
    /// Connections per shard of this partition's members (see [`crate::runtime::online`]).
    online: OnlineUsers,
    /// This shard's table of every connected user: a user who joins here without being a
    /// member before takes their counts from it.
    connected: Rc<RefCell<ShardOnline>>,
    /// Members whose counts were taken from `connected`, with the version taken: a queued
    /// change up to it is in the counts already. Cleared as the changes come through.
    synced: HashMap<UserId, u64>,
    /// Connections of members per shard, by channel: where its events go.
    channel_shards: HashMap<ChannelId, Vec<u32>>,
    /// Public channels here, by workspace.
    public: HashMap<crate::ids::WorkspaceId, BTreeSet<ChannelId>>,
    routes: Routes,
    meta: Rc<RefCell<MetaState>>,
    failed: Option<Unavailable>,
    observer: crate::config::ObserverSlot,
    snapshots: Snapshots<DirOf<E>>,
    /// Consumers' reads waiting for the next commit.
    consumers: crate::consumer::Waiters,
    /// Most events in one catch-up page ([`crate::EngineConfig::catch_up_events`]).
    catch_up_events: usize,
    /// Channels to give their first members once this node leads the partition: in a
    /// cluster every node's directory asks its own replica of the partition, and the one
    /// that leads (now or later) decides them.
    deferred_inits: BTreeSet<ChannelId>,
    /// Applying the log waits, and looks again after [`FOLLOW_RETRY`]: for this node's
    /// directory to learn of a channel whose events the log holds (the directory and the
    /// partition commit in different groups), or for an event's frame in the blob store
    /// that neither this node nor a peer could give yet.
    follow_later: bool,
    /// The offset of the event whose frame applying last waited for (so that the wait is
    /// reported once, not at every look).
    frame_missing_at: Option<u64>,
    /// On a follower: the directory's acknowledgements of new channels, each held until
    /// the channel's first members are applied here from the leader's log, or until its
    /// deadline ([`Partition::answer_init_waits`]).
    init_waits: Vec<(ChannelId, Arc<dyn super::Ack>, std::time::Instant)>,
}

/// How often a partition looks again whether it leads (to decide deferred first members),
/// or whether its directory knows a channel the log's next event is of.
const FOLLOW_RETRY: std::time::Duration = std::time::Duration::from_millis(50);

/// Whether `msg` starts a subscription here, or catches one up: on a follower, such
/// messages wait for the read barrier ([`Partition::current_for_subscribers`]).
fn subscribes(msg: &PartitionMsg) -> bool {
    matches!(
        msg,
        PartitionMsg::Online {
            delta: 1..,
            sub: Some(_),
            ..
        } | PartitionMsg::CatchUp { .. }
    )
}

/// How long a follower holds the directory's publication of a new channel for the
/// channel's first members to come from the partition's leader: the directory's later
/// answers wait behind it, so a partition without a leader delays them this long at most.
const INIT_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// How a partition's state was restored at its open.
pub(crate) struct Restored {
    /// The log offset up to which the state came from a snapshot, if one was used.
    pub snapshot_offset: Option<u64>,
    /// Events replayed from the log after it (or all of them).
    pub replayed: u64,
    /// Why a snapshot could not be used, if there was one.
    pub snapshot_refused: Option<String>,
}

/// Where a partition's snapshot goes, and when the next one is due.
pub(crate) struct Snapshots<D> {
    /// The directory of snapshot files.
    pub dir: D,
    /// The snapshot file's name in it.
    pub name: String,
    /// The least number of events between two snapshots.
    pub every_events: u64,
    /// Events committed since the last snapshot (or since the start of the log).
    since: u64,
    /// Events the last snapshot covered.
    covered: u64,
    /// A snapshot being written in the background.
    writing: Rc<std::cell::Cell<bool>>,
    /// The log offset the last durable snapshot covers (0: none): the log may be cut
    /// before it, never after.
    durable_offset: Rc<std::cell::Cell<u64>>,
    /// Why the snapshot last read at an open or a rebuild could not be used, if it could
    /// not.
    refused: Option<String>,
}

impl<D: Storage + Clone + 'static> Snapshots<D> {
    /// Snapshots named `name` in `dir`, taken at least `every_events` apart.
    pub(crate) fn new(dir: D, name: String, every_events: u64) -> Snapshots<D> {
        Snapshots {
            dir,
            name,
            every_events,
            since: 0,
            covered: 0,
            writing: Rc::new(std::cell::Cell::new(false)),
            durable_offset: Rc::new(std::cell::Cell::new(0)),
            refused: None,
        }
    }

    /// Whether a snapshot is due: [`Snapshots::every_events`] events since the last one,
    /// and at least an eighth of what the last one covered, so that the cost of writing
    /// snapshots stays a constant share of the cost of committing events however large
    /// the partition grows.
    fn due(&self) -> bool {
        self.since
            >= self
                .every_events
                .max(self.covered / SNAPSHOT_GROWTH_DIVISOR)
            && !self.writing.get()
    }
}

/// Writes a snapshot file covering the log up to `offset`, and records the offset once it
/// is durable. A failure is reported and otherwise ignored: the log still holds
/// everything, and the next snapshot tries again.
/// Writes a snapshot once `synced` (the log's [`Durability::sync`]) says every event it
/// covers is durable: a snapshot never names an offset a crash could take from the log.
async fn store_snapshot<D: Storage>(
    dir: D,
    name: String,
    file: Vec<u8>,
    offset: u64,
    durable: Rc<std::cell::Cell<u64>>,
    synced: impl std::future::Future<Output = std::io::Result<()>>,
) {
    if let Err(e) = synced.await {
        eprintln!("chorus: snapshot {name} not written: the log did not sync: {e}");
        return;
    }
    match crate::snapshot::store(&dir, &name, &file).await {
        Ok(()) => durable.set(durable.get().max(offset)),
        Err(e) => eprintln!("chorus: snapshot {name} not written: {e}"),
    }
}

/// A snapshot is taken once the events since the last one reach this fraction (1/8) of
/// the events it covered: see [`Snapshots::due`].
const SNAPSHOT_GROWTH_DIVISOR: u64 = 8;

/// A reply to send after the tick's commit.
enum Pending {
    Outcome(Reply<ChannelOutcome>, Result<ChannelOutcome, EngineError>),
    Read(Reply<ReadView>, Result<ReadView, EngineError>),
    Ack(Arc<dyn Ack>),
}

impl Pending {
    /// Answers with `why` instead: the tick's commit failed.
    fn fail(self, why: &Unavailable) {
        match self {
            Pending::Outcome(reply, _) => {
                let _ = reply.send(Err(why.clone().into()));
            }
            Pending::Read(reply, _) => {
                let _ = reply.send(Err(why.clone().into()));
            }
            Pending::Ack(ack) => ack.done(),
        }
    }

    /// Answers as decided: the tick's commit succeeded.
    fn answer(self) {
        match self {
            Pending::Outcome(reply, outcome) => {
                let _ = reply.send(outcome);
            }
            Pending::Read(reply, outcome) => {
                let _ = reply.send(outcome);
            }
            Pending::Ack(ack) => ack.done(),
        }
    }
}

/// A read marker moved in this tick: by a mark (with the record to log), or by a post
/// (the post's event is the record). Its `read` frame goes to the user's connections after
/// the commit.
struct Moved {
    user: UserId,
    /// The marker's log record, for a mark.
    payload: Option<Vec<u8>>,
    /// The `read` frame, rendered when the user has connections.
    frame: Option<Bytes>,
    at_us: u64,
}

/// One event decided in this tick.
struct Decided {
    channel: ChannelId,
    seq: u64,
    payload: Vec<u8>,
    frame: Bytes,
    membership: Option<(UserId, bool)>,
    /// The author, for a post (it moves the author's read marker).
    posted_by: Option<UserId>,
    at_us: u64,
}

/// The texts of the blob bodies a rendering needs, fetched before it: rendering (a view,
/// a frame) is synchronous, and the blob store is not. Usually empty: only bodies over
/// [`INLINE_BODY_BYTES_MAX`] live in the blob store.
#[derive(Default)]
struct BlobTexts(Vec<(BlobRef, Bytes)>);

impl BlobTexts {
    /// The text of a body: inline, or fetched. A blob that could not be read shows as an
    /// empty text, as it always has.
    fn text(&self, body: &StoredBody) -> String {
        match body {
            StoredBody::Text(t) => t.as_str().to_owned(),
            // An encrypted message has no text: its ciphertext is shown beside it.
            StoredBody::Ciphertext(_) => String::new(),
            StoredBody::Blob { hash, len } => {
                let wanted = BlobRef {
                    hash: **hash,
                    len: *len,
                };
                self.0
                    .iter()
                    .find(|(r, _)| *r == wanted)
                    .map(|(_, t)| String::from_utf8_lossy(t).into_owned())
                    .unwrap_or_default()
            }
        }
    }

    /// Remembers a text that was just stored under `blob`.
    fn insert(&mut self, blob: BlobRef, text: Bytes) {
        if !self.0.iter().any(|(r, _)| *r == blob) {
            self.0.push((blob, text));
        }
    }

    /// Fetches a body's text if it is in the blob store and not known yet.
    async fn fetch(&mut self, blobs: &impl BlobStore, body: &StoredBody) {
        let StoredBody::Blob { hash, len } = body else {
            return;
        };
        let blob = BlobRef {
            hash: **hash,
            len: *len,
        };
        if self.0.iter().any(|(r, _)| *r == blob) {
            return;
        }
        // A blob that cannot be read shows as an empty text.
        let text = blobs.get(blob).await.unwrap_or_default();
        self.0.push((blob, text));
    }

    /// Fetches the current bodies of `messages`.
    async fn fetch_all<'a>(
        &mut self,
        blobs: &impl BlobStore,
        messages: impl IntoIterator<Item = &'a Message>,
    ) {
        for m in messages {
            self.fetch(blobs, m.body()).await;
        }
    }
}

/// What a partition shares with the other partitions of its shard.
pub(crate) struct ShardShared {
    /// The shard's replica of the metadata.
    pub(crate) meta: Rc<RefCell<MetaState>>,
    /// The shard's table of every connected user.
    pub(crate) connected: Rc<RefCell<ShardOnline>>,
}

impl<E: Env> Partition<E> {
    /// Opens a partition: replays its log into state and finds channels of the directory
    /// that still need their first members.
    pub(crate) async fn open(
        id: u32,
        env: E,
        log: E::Durability,
        routes: Routes,
        shared: ShardShared,
        config: &crate::config::EngineConfig,
        snapshots: Snapshots<DirOf<E>>,
    ) -> Result<(Partition<E>, Vec<ChannelId>, Restored), EngineError> {
        let mut p = Partition {
            id,
            env,
            applied: log.first_offset(),
            log,
            channels: HashMap::new(),
            user_channels: HashMap::new(),
            online: OnlineUsers::new(routes.shard_count()),
            connected: shared.connected,
            synced: HashMap::new(),
            channel_shards: HashMap::new(),
            public: HashMap::new(),
            routes,
            meta: shared.meta,
            failed: None,
            observer: config.observer.clone(),
            snapshots,
            consumers: Default::default(),
            catch_up_events: config.catch_up_events,
            deferred_inits: BTreeSet::new(),
            follow_later: false,
            frame_missing_at: None,
            init_waits: Vec::new(),
        };
        let snapshot_offset = p.restore_snapshot().await;
        let from = snapshot_offset.unwrap_or(p.log.first_offset());
        let replayed = p.replay(from).await?;
        let uninitialised = {
            let meta = p.meta.borrow();
            let mut ids: Vec<ChannelId> = meta
                .channels()
                .filter(|c| crate::domain::meta::partition_of(c.id) == id)
                .filter(|c| p.channels.get(&c.id).is_none_or(|rt| rt.committed == 0))
                .map(|c| c.id)
                .collect();
            // The directory is a hash map: sort, so that the first members are committed
            // in the same order on every open (the simulation replays seeds exactly).
            ids.sort_unstable();
            ids
        };
        let restored = Restored {
            snapshot_offset,
            replayed,
            snapshot_refused: p.snapshots.refused.clone(),
        };
        Ok((p, uninitialised, restored))
    }

    /// Loads the partition's snapshot if there is a usable one, and returns the log offset
    /// it covers, from which the log is replayed (`None`: replay all of it). A snapshot that cannot be used is reported and ignored: the whole
    /// log is replayed instead, and the state is rebuilt from it alone.
    async fn restore_snapshot(&mut self) -> Option<u64> {
        self.snapshots.refused = None;
        let path = format!("snapshots/{}", self.snapshots.name);
        let first = self.log.first_offset();
        let loaded =
            match crate::snapshot::load(&self.snapshots.dir, &self.snapshots.name, self.id).await {
                Ok(Some(l)) => l,
                Ok(None) => return None,
                Err(e) => return self.refuse_snapshot(&path, e.to_string()),
            };
        if loaded.next_offset > self.log.next_offset() || loaded.next_offset < first {
            let why = format!(
                "it covers the log up to offset {}, but the log holds {}..{}",
                loaded.next_offset,
                first,
                self.log.next_offset()
            );
            return self.refuse_snapshot(&path, why);
        }
        match self.restore_from(&loaded) {
            Ok(events) => {
                self.snapshots.covered = events;
                self.snapshots.durable_offset.set(loaded.next_offset);
                Some(loaded.next_offset)
            }
            Err(e) => {
                self.channels.clear();
                self.user_channels.clear();
                self.public.clear();
                self.refuse_snapshot(&path, e.to_string())
            }
        }
    }

    /// Reports a snapshot that cannot be used, and notes why (the engine's
    /// [`crate::outcome::Recovery`] says it).
    fn refuse_snapshot(&mut self, path: &str, why: String) -> Option<u64> {
        eprintln!("chorus: ignoring {path}: {why}");
        self.snapshots.refused = Some(why);
        None
    }

    /// Restores the channels of a snapshot, returning the events it covered.
    fn restore_from(
        &mut self,
        loaded: &crate::snapshot::Loaded,
    ) -> Result<u64, crate::snapshot::SnapshotError> {
        let mut events = 0;
        for (state, offsets) in read_channels(loaded)? {
            let fits = {
                let meta = self.meta.borrow();
                match meta.channel(state.id) {
                    Some(c) => c.workspace == state.workspace,
                    // In a cluster the directory commits in a group of its own, and a
                    // restarted node's may not have applied the channel's creation yet:
                    // the snapshot holds committed events only, so the channel was
                    // created, and the directory learns it as it catches up.
                    None => self.log.follows(),
                }
            };
            if !fits || crate::domain::meta::partition_of(state.id) != self.id {
                return Err(crate::snapshot::SnapshotError(format!(
                    "channel {} does not match the directory",
                    state.id
                )));
            }
            events += state.last_seq();
            let id = state.id;
            for user in state.members() {
                self.user_channels.entry(user).or_default().insert(id);
            }
            if state.kind == crate::domain::event::ChannelKind::Public {
                self.public.entry(state.workspace).or_default().insert(id);
            }
            let committed = state.last_seq();
            self.channels.insert(
                id,
                ChannelRt {
                    state,
                    offsets,
                    committed,
                },
            );
        }
        Ok(events)
    }

    /// The partition's whole state as a snapshot file, covering the log up to its end.
    /// Call it only between ticks, when the state holds exactly the committed events.
    fn snapshot_file(&self) -> Vec<u8> {
        let mut w = crate::snapshot::Writer::with_capacity(1 << 16);
        // In channel order, so that the same state always makes the same file.
        let mut channels: Vec<&ChannelRt> = self.channels.values().collect();
        channels.sort_unstable_by_key(|rt| rt.state.id);
        write_channels(
            &mut w,
            channels.into_iter().map(|rt| {
                debug_assert_eq!(rt.committed, rt.state.last_seq());
                (&rt.state, &rt.offsets[..])
            }),
        );
        w.finish(self.id, self.applied)
    }

    /// Writes a snapshot in the background if one is due. The state is encoded here, on
    /// the shard (the only pause it costs), and written and fsynced by a task of its own
    /// while the partition goes on.
    fn maybe_snapshot(&mut self, committed_events: u64) {
        self.snapshots.since += committed_events;
        if self.failed.is_some() || !self.snapshots.due() {
            return;
        }
        let file = self.snapshot_file();
        let covered: u64 = self.channels.values().map(|rt| rt.committed).sum();
        self.snapshots.since = 0;
        self.snapshots.covered = covered;
        let writing = self.snapshots.writing.clone();
        writing.set(true);
        let (dir, name) = (self.snapshots.dir.clone(), self.snapshots.name.clone());
        let (offset, durable) = (self.applied, self.snapshots.durable_offset.clone());
        let synced = self.log.sync();
        drop(self.env.spawn(async move {
            store_snapshot(dir, name, file, offset, durable, synced).await;
            writing.set(false);
        }));
    }

    /// Writes a final snapshot at shutdown, after any background one, unless nothing
    /// changed since the last.
    async fn final_snapshot(&mut self) {
        while self.snapshots.writing.get() {
            self.env.sleep(std::time::Duration::from_millis(1)).await;
        }
        if self.failed.is_some() || self.snapshots.since == 0 {
            return;
        }
        let (dir, name) = (self.snapshots.dir.clone(), self.snapshots.name.clone());
        let (offset, durable) = (self.applied, self.snapshots.durable_offset.clone());
        let synced = self.log.sync();
        store_snapshot(dir, name, self.snapshot_file(), offset, durable, synced).await;
    }

    /// Replays the log from `from`, returning the events replayed.
    async fn replay(&mut self, from: u64) -> Result<u64, EngineError> {
        let mut at = from;
        let mut replayed = 0;
        let end = self.log.next_offset();
        while at < end {
            let records = self
                .log
                .read(at, 4 << 20)
                .await
                .map_err(|e| read_failed(self.id, e))?;
            let Some(last) = records.last() else { break };
            at = last.offset + 1;
            for r in records {
                let rec = match partition_record(self.id, &r)? {
                    PartitionRecord::Channel(rec)
                        if self.log.follows() && self.channel_rt(rec.channel).is_none() =>
                    {
                        // In a cluster the directory and this log commit in different
                        // groups, and this node's directory may not have applied the
                        // channel's creation yet (it had not when the node stopped): the
                        // rest is applied as the log is followed, once it has.
                        self.applied = r.offset;
                        self.follow_later = true;
                        return Ok(replayed);
                    }
                    PartitionRecord::Channel(rec) => rec,
                    PartitionRecord::Read(rec) => {
                        self.replay_mark(rec, r.offset)?;
                        self.snapshots.since += 1;
                        replayed += 1;
                        continue;
                    }
                };
                self.replay_one(rec, r.offset)?;
                self.snapshots.since += 1;
                replayed += 1;
            }
        }
        self.applied = at;
        Ok(replayed)
    }

    fn replay_one(&mut self, rec: ChannelRecord, offset: u64) -> Result<(), EngineError> {
        let id = self.id;
        let corrupt = |what: String| -> EngineError {
            Corrupt::Replay {
                log: log_name(id),
                what,
            }
            .into()
        };
        let rt = self
            .channel_rt(rec.channel)
            .ok_or_else(|| corrupt(format!("event of unknown channel {}", rec.channel)))?;
        if rec.seq != rt.state.last_seq() + 1 {
            return Err(corrupt(format!(
                "channel {}: seq {} after {}",
                rec.channel,
                rec.seq,
                rt.state.last_seq()
            )));
        }
        rt.state.apply(rec.seq, rec.at_us, &rec.event);
        rt.offsets.push(offset);
        rt.committed = rec.seq;
        if let Some((user, joined)) = membership_of(&rec.event) {
            let set = self.user_channels.entry(user).or_default();
            if joined {
                set.insert(rec.channel);
            } else {
                set.remove(&rec.channel);
            }
        }
        Ok(())
    }

    /// Replays a read marker. It was decided against the state its tick's events left, so
    /// it never names a seq beyond them.
    fn replay_mark(&mut self, rec: ReadRecord, offset: u64) -> Result<(), EngineError> {
        let log = log_name(self.id);
        let Some(rt) = self.channels.get_mut(&rec.channel) else {
            return Err(Corrupt::Replay {
                log,
                what: format!("read marker of unknown channel {} at {offset}", rec.channel),
            }
            .into());
        };
        if rec.seq > rt.state.last_seq() {
            return Err(Corrupt::Replay {
                log,
                what: format!(
                    "channel {}: read marker at {} after seq {}",
                    rec.channel,
                    rec.seq,
                    rt.state.last_seq()
                ),
            }
            .into());
        }
        // A marker of a member who left later in the same tick is gone with them.
        rt.state.mark_read(rec.user, rec.seq);
        Ok(())
    }

    /// The run-time state of a channel, created from the directory on first use.
    fn channel_rt(&mut self, channel: ChannelId) -> Option<&mut ChannelRt> {
        if !self.channels.contains_key(&channel) {
            let meta = self.meta.borrow();
            let c = meta.channel(channel)?;
            let state = ChannelState::new(c.id, c.workspace, c.kind, c.created_by);
            drop(meta);
            if state.kind == crate::domain::event::ChannelKind::Public {
                self.public
                    .entry(state.workspace)
                    .or_default()
                    .insert(channel);
            }
            self.channels.insert(
                channel,
                ChannelRt {
                    state,
                    offsets: Vec::new(),
                    committed: 0,
                },
            );
        }
        self.channels.get_mut(&channel)
    }

    /// The partition's task: ticks until its queue closes, then closes its log. Between
    /// ticks it applies what other nodes' leaders committed to its log as it comes.
    pub(crate) async fn run(mut self, mut rx: mpsc::Receiver<PartitionMsg>) {
        let mut tick = Vec::with_capacity(TICK_REQUESTS_MAX);
        loop {
            let first = {
                let next = rx.next();
                let wake = std::pin::pin!(self.wake());
                match futures::future::select(next, wake).await {
                    futures::future::Either::Left((msg, _)) => Some(msg),
                    futures::future::Either::Right(_) => None,
                }
            };
            let Some(first) = first else {
                // The log grew, or deferred first members may be due: an empty tick
                // follows the log and decides what is due.
                let events = self.tick(Vec::new()).await;
                self.maybe_snapshot(events);
                continue;
            };
            let Some(first) = first else { break };
            tick.push(first);
            while tick.len() < TICK_REQUESTS_MAX {
                match rx.try_recv() {
                    Ok(m) => tick.push(m),
                    Err(_) => break,
                }
            }
            let events = self.tick(std::mem::take(&mut tick)).await;
            self.maybe_snapshot(events);
        }
        for (_, ack, _) in self.init_waits.drain(..) {
            ack.done();
        }
        self.final_snapshot().await;
        let _ = self.log.close().await;
    }

    /// Completes when there is work besides requests: the log grew past the state, or it
    /// is time to look again at what waits (deferred first members, a channel the
    /// directory does not know yet). Never, for a stopped partition.
    async fn wake(&self) {
        if self.failed.is_some() {
            return std::future::pending().await;
        }
        if self.follow_later {
            return self.env.sleep(FOLLOW_RETRY).await;
        }
        let grown = std::pin::pin!(self.log.grown(self.applied));
        let retry = std::pin::pin!(async {
            if self.deferred_inits.is_empty() {
                std::future::pending::<()>().await
            }
            self.env.sleep(FOLLOW_RETRY).await
        });
        futures::future::select(grown, retry).await;
    }

    /// Acknowledges the first members of the channels whose initial events this follower
    /// has applied from the log, of those waited for past [`INIT_WAIT`], and of every
    /// one once the partition stopped.
    fn answer_init_waits(&mut self) {
        if self.init_waits.is_empty() {
            return;
        }
        let now = self.env.now();
        let (failed, channels) = (self.failed.is_some(), &self.channels);
        self.init_waits.retain(|(channel, ack, until)| {
            let applied = channels
                .get(channel)
                .is_some_and(|rt| rt.state.last_seq() > 0);
            let done = applied || failed || now >= *until;
            if done {
                ack.done();
            }
            !done
        });
    }

    /// Runs one tick, returning the events it committed (or applied from the log).
    async fn tick(&mut self, msgs: Vec<PartitionMsg>) -> u64 {
        let events = self.tick_once(msgs).await;
        self.answer_init_waits();
        events
    }

    /// [`Partition::tick`]'s work.
    async fn tick_once(&mut self, msgs: Vec<PartitionMsg>) -> u64 {
        // What the log holds beyond the state first: a leader decides only against every
        // event committed before it, and a follower's reads see what its log has.
        let mut followed = self.follow().await;
        if msgs.iter().any(subscribes) {
            followed += self.current_for_subscribers().await;
        }
        let leading = match self.log.leading() {
            Leading::Yes if self.applied == self.log.next_offset() => Leading::Yes,
            Leading::Yes => Leading::No { leader: None },
            other => other,
        };
        let not_leader = Unavailable::NotLeader {
            partition: self.id,
            leader: match leading {
                Leading::No { leader } => leader,
                Leading::Yes => None,
            },
        };
        let mut decided: Vec<Decided> = Vec::new();
        let mut moved: Vec<Moved> = Vec::new();
        let mut pending: Vec<Pending> = Vec::new();
        let mut reads: Vec<PartitionMsg> = Vec::new();
        if leading == Leading::Yes && self.failed.is_none() {
            for channel in std::mem::take(&mut self.deferred_inits) {
                self.init(channel, &mut decided).await;
            }
        }
        for msg in msgs {
            if let Some(why) = &self.failed {
                fail(msg, why);
                continue;
            }
            let decides = matches!(
                msg,
                PartitionMsg::Command { .. }
                    | PartitionMsg::MarkRead { .. }
                    | PartitionMsg::Init { .. }
                    | PartitionMsg::DevicesChanged { .. }
            );
            if decides && leading != Leading::Yes {
                // Only the leader decides; a channel's first members and its device events
                // come from the leader's log like any other event. First members are
                // decided here if this node comes to lead.
                if let PartitionMsg::Init { channel, ack } = msg {
                    self.deferred_inits.insert(channel);
                    // The directory publishes the channel once its first members are
                    // here, from the leader's log (or after a while without a leader).
                    if let Some(ack) = ack {
                        let until = self.env.now() + INIT_WAIT;
                        self.init_waits.push((channel, ack, until));
                    }
                    continue;
                }
                fail(msg, &not_leader);
                continue;
            }
            match msg {
                PartitionMsg::Command {
                    user,
                    channel,
                    cmd,
                    reply,
                } => {
                    let before = decided.len();
                    let outcome = self.command(user, channel, cmd, &mut decided).await;
                    self.moved_by_post(&decided[before..], &mut moved);
                    pending.push(Pending::Outcome(reply, outcome));
                }
                PartitionMsg::MarkRead {
                    user,
                    channel,
                    seq,
                    reply,
                } => {
                    let outcome = self.mark_read(user, channel, seq, &mut moved);
                    pending.push(Pending::Read(reply, outcome));
                }
                PartitionMsg::Init { channel, ack } => {
                    self.init(channel, &mut decided).await;
                    if let Some(ack) = ack {
                        pending.push(Pending::Ack(ack));
                    }
                }
                PartitionMsg::DevicesChanged { user, ack } => {
                    let mine = self.user_channels.get(&user).cloned().unwrap_or_default();
                    for channel in mine {
                        self.sync_devices(channel, &mut decided).await;
                    }
                    pending.push(Pending::Ack(ack));
                }
                PartitionMsg::Online {
                    user,
                    shard,
                    delta,
                    sub,
                    version,
                } => self.online(user, shard, delta, sub, version).await,
                PartitionMsg::Typing {
                    user,
                    channel,
                    reply,
                } => {
                    let r = self.typing(user, channel).await;
                    let _ = reply.send(r);
                }
                other => reads.push(other),
            }
        }
        let marks = moved.iter().filter(|m| m.payload.is_some()).count();
        if !decided.is_empty() || marks > 0 {
            if let Err(source) = self.commit(&decided, &moved).await {
                let why = match source {
                    CommitError::Failed(_) => {
                        let why = Unavailable::PartitionStopped {
                            partition: self.id,
                            source,
                        };
                        self.failed = Some(why.clone());
                        why
                    }
                    // The leadership went before the batch committed (or was never here):
                    // the state holds events the log does not, so it is rebuilt from the
                    // log, and nobody is told the events happened.
                    CommitError::NotLeader { leader } => {
                        self.rebuild().await;
                        Unavailable::NotLeader {
                            partition: self.id,
                            leader,
                        }
                    }
                    CommitError::Lost { .. } => {
                        self.rebuild().await;
                        Unavailable::NotLeader {
                            partition: self.id,
                            leader: None,
                        }
                    }
                };
                let why = self.failed.clone().unwrap_or(why);
                for p in pending {
                    p.fail(&why);
                }
                // The rebuilt state is this node's log, which another leader may have
                // moved past (a leader that woke from a pause with writes queued): reads
                // wait for the barrier as a follower's do.
                let (reads, caught_up) = self.behind_read_barrier(reads).await;
                for r in reads {
                    self.read_or_fail(r).await;
                }
                return followed + caught_up;
            }
            self.deliver(&decided, &moved).await;
        }
        self.answer_consumers().await;
        for p in pending {
            p.answer();
        }
        let (reads, caught_up) = self.behind_read_barrier(reads).await;
        for r in reads {
            self.read(r).await;
        }
        followed + caught_up + (decided.len() + marks) as u64
    }

    /// Before a subscription is registered or a resume catches up: passes the read
    /// barrier (at once on a leader under its lease) and applies what it let in, so that the
    /// subscription starts from every event acknowledged before it (`API.md` §15: a
    /// client resumes on any node). Without it, a follower a few events behind answered a
    /// resume as if the user were in none of its channels, and then sent the channel's
    /// events from its start. Where no leader confirms the barrier, what this node applied
    /// is used (as for lists). Returns the events applied.
    async fn current_for_subscribers(&mut self) -> u64 {
        if self.failed.is_some() {
            return 0;
        }
        match self.log.read_barrier().await {
            Ok(()) => self.follow().await,
            Err(_) => 0,
        }
    }

    /// A node answers its clients' reads only after the read barrier
    /// (`Durability::read_barrier`) and applying what it let in, so that a read sees every
    /// write acknowledged before it was sent, wherever it was decided. The leader passes it
    /// at once under its lease (its state is every committed event); a leader without one
    /// (it was paused, or cut off) confirms that it still leads first, or it would answer
    /// from a state another leader has moved past. Where the barrier cannot be passed (no
    /// leader now), reads of channel data are refused with `NotLeader` (a gateway passes
    /// them to the leader, or the client tries again), and lists gathered over partitions
    /// (channels, unreads) are answered from what this node applied. Returns the reads to
    /// answer, and the events applied.
    async fn behind_read_barrier(&mut self, reads: Vec<PartitionMsg>) -> (Vec<PartitionMsg>, u64) {
        let from_clients = |m: &PartitionMsg| {
            matches!(
                m,
                PartitionMsg::Read { .. }
                    | PartitionMsg::Unreads { .. }
                    | PartitionMsg::Visible { .. }
            )
        };
        if self.failed.is_some() || !reads.iter().any(from_clients) {
            return (reads, 0);
        }
        let (leader, applied) = match self.log.read_barrier().await {
            Ok(()) => {
                let applied = self.follow().await;
                if self.applied >= self.log.next_offset() {
                    return (reads, applied);
                }
                // The log holds events the state could not apply yet (a record of a
                // channel this node's directory has not applied): a read now would miss
                // them.
                (None, applied)
            }
            Err(CommitError::NotLeader { leader }) => (leader, 0),
            Err(_) => (None, 0),
        };
        let why = Unavailable::NotLeader {
            partition: self.id,
            leader,
        };
        let (refused, kept): (Vec<_>, Vec<_>) = reads
            .into_iter()
            .partition(|m| matches!(m, PartitionMsg::Read { .. }));
        for r in refused {
            fail(r, &why);
        }
        (kept, applied)
    }

    /// Answers a read, unless the partition has stopped.
    async fn read_or_fail(&mut self, r: PartitionMsg) {
        match &self.failed {
            Some(why) => fail(r, why),
            None => self.read(r).await,
        }
    }

    /// Consumers' reads that waited for the log to grow.
    async fn answer_consumers(&mut self) {
        for waiter in self.consumers.ready(self.log.next_offset()) {
            crate::consumer::answer(&self.log, waiter, &log_name(self.id)).await;
        }
    }

    /// Applies what the log holds beyond the state (batches another node's leader
    /// committed), delivers it to this node's subscribers as the leader's own commits are
    /// delivered, and returns the events applied. A record that does not fit the state
    /// stops the partition: the logs of a group's replicas are alike, so it cannot be
    /// skipped.
    async fn follow(&mut self) -> u64 {
        self.follow_later = false;
        if self.failed.is_some() || self.applied >= self.log.next_offset() {
            return 0;
        }
        match self.apply_followed().await {
            Ok(n) => n,
            Err(e) => {
                eprintln!("chorus: partition {} stopped: {e}", self.id);
                self.failed = Some(Unavailable::PartitionStopped {
                    partition: self.id,
                    source: CommitError::Failed(Arc::new(e)),
                });
                0
            }
        }
    }

    async fn apply_followed(&mut self) -> Result<u64, EngineError> {
        let end = self.log.next_offset();
        let (mut decided, mut moved) = (Vec::new(), Vec::new());
        let mut applied = 0;
        'read: while self.applied < end {
            let records = self
                .log
                .read(self.applied, 4 << 20)
                .await
                .map_err(|e| read_failed(self.id, e))?;
            if records.is_empty() {
                return Err(Corrupt::Replay {
                    log: log_name(self.id),
                    what: format!("no record at {} before the end {end}", self.applied),
                }
                .into());
            }
            for r in records {
                match partition_record(self.id, &r)? {
                    PartitionRecord::Channel(rec) if self.channel_rt(rec.channel).is_none() => {
                        // Committed in the partition's group before this node's directory
                        // applied the channel's creation: wait for it.
                        self.follow_later = true;
                        break 'read;
                    }
                    PartitionRecord::Channel(rec) => {
                        let stored = event::stored_frame(&r.payload);
                        let frame = match stored.first() {
                            Some(0) => match self.referenced_frame(stored).await {
                                Some(frame) => frame,
                                None => {
                                    // Never delivered without its frame: the store asked
                                    // the peers too (a cluster stores it on a majority
                                    // before the commit), so wait and ask again.
                                    let first = self.frame_missing_at.replace(r.offset);
                                    if first != Some(r.offset) {
                                        eprintln!(
                                            "chorus: partition {}: the frame of event {} of \
                                         channel {} is not in the blob store yet; applying \
                                         waits for it",
                                            self.id, rec.seq, rec.channel.0
                                        );
                                    }
                                    self.follow_later = true;
                                    break 'read;
                                }
                            },
                            _ => r.payload.slice(r.payload.len() - stored.len()..),
                        };
                        let d = Decided {
                            channel: rec.channel,
                            seq: rec.seq,
                            payload: Vec::new(),
                            frame,
                            membership: membership_of(&rec.event),
                            posted_by: rec.event.posted().map(|p| p.user),
                            at_us: rec.at_us,
                        };
                        self.replay_one(rec, r.offset)?;
                        if let Some((user, true)) = d.membership {
                            self.track(user, d.channel);
                        }
                        let at = decided.len();
                        decided.push(d);
                        self.moved_by_post(&decided[at..], &mut moved);
                    }
                    PartitionRecord::Read(rec) => {
                        let (user, channel, at_us) = (rec.user, rec.channel, r.timestamp_us);
                        self.replay_mark(rec, r.offset)?;
                        moved.push(Moved {
                            user,
                            payload: None,
                            frame: self.read_frame(user, channel),
                            at_us,
                        });
                    }
                }
                applied += 1;
                self.applied = r.offset + 1;
            }
        }
        self.deliver(&decided, &moved).await;
        self.answer_consumers().await;
        Ok(applied)
    }

    /// Drops the state and builds it again from the snapshot and the log: after a lost
    /// leadership it held events decided here that the log (committed events only) does
    /// not. What subscribers' shards are told stays as it was, since only committed
    /// events reach it.
    async fn rebuild(&mut self) {
        self.channels.clear();
        self.user_channels.clear();
        self.public.clear();
        let snapshot_offset = self.restore_snapshot().await;
        let from = snapshot_offset.unwrap_or(self.log.first_offset());
        self.snapshots.since = 0;
        if let Err(e) = self.replay(from).await {
            eprintln!("chorus: partition {} stopped: {e}", self.id);
            self.failed = Some(Unavailable::PartitionStopped {
                partition: self.id,
                source: CommitError::Failed(Arc::new(e)),
            });
            return;
        }
        // Where events go follows committed membership and the connections counted.
        self.channel_shards.clear();
        let members: Vec<(UserId, ChannelId)> = self
            .user_channels
            .iter()
            .flat_map(|(u, cs)| cs.iter().map(move |c| (*u, *c)))
            .collect();
        for (user, channel) in members {
            self.adjust_channel_shards(channel, user, 1);
        }
    }

    /// Posts just decided moved their authors' markers: their connections get a `read`
    /// frame after the commit (the post's own record makes the move durable).
    fn moved_by_post(&self, new: &[Decided], moved: &mut Vec<Moved>) {
        for d in new {
            let Some(user) = d.posted_by else { continue };
            moved.push(Moved {
                user,
                payload: None,
                frame: self.read_frame(user, d.channel),
                at_us: d.at_us,
            });
        }
    }

    /// The `read` frame of a user's marker in a channel, if the user has connections.
    fn read_frame(&self, user: UserId, channel: ChannelId) -> Option<Bytes> {
        // The shard's table too: a user who joins and posts in one tick is not counted
        // here until the join commits, and the post's frame is made before that.
        if !self.online.is_online(user) && !self.connected.borrow().users.is_online(user) {
            return None;
        }
        let view = self.read_view(user, channel)?;
        Some(view.frame())
    }

    /// A member's read state in a channel, from the state as decided so far.
    fn read_view(&self, user: UserId, channel: ChannelId) -> Option<ReadView> {
        let rt = self.channels.get(&channel)?;
        let counts = rt.state.read_counts(user)?;
        Some(ReadView::new(channel, rt.state.last_seq(), counts))
    }

    /// Decides a mark: moves the marker forward now (so the tick's later requests see it)
    /// and queues its record for the commit; a seq at or below the marker changes
    /// nothing. Either way the answer, sent after the commit, is the marker as it stands.
    fn mark_read(
        &mut self,
        user: UserId,
        channel: ChannelId,
        seq: u64,
        moved: &mut Vec<Moved>,
    ) -> Result<ReadView, EngineError> {
        let principal = self.principal(user, channel)?;
        let at_us = self.env.unix_us();
        let rt = self
            .channel_rt(channel)
            .ok_or(DomainError::NotFound("channel"))?;
        if rt.state.decide_read(&principal, seq)? {
            assert!(rt.state.mark_read(user, seq), "a decided mark moves");
            let record = ReadRecord {
                channel,
                workspace: rt.state.workspace,
                user,
                seq,
                at_us,
            };
            let payload = Some(event::encode_read(&record));
            let frame = self.read_frame(user, channel);
            moved.push(Moved {
                user,
                payload,
                frame,
                at_us,
            });
        }
        let view = self.read_view(user, channel);
        Ok(view.expect("a member has a marker"))
    }

    fn principal(&self, user: UserId, channel: ChannelId) -> Result<Principal, DomainError> {
        let meta = self.meta.borrow();
        let (p, _) = meta.channel_principal(user, channel)?;
        Ok(p)
    }

    /// Decides a command and applies its event; the outcome is sent after the commit.
    async fn command(
        &mut self,
        user: UserId,
        channel: ChannelId,
        cmd: crate::domain::channel::ChannelCommand,
        decided: &mut Vec<Decided>,
    ) -> Result<ChannelOutcome, EngineError> {
        let principal = self.principal(user, channel)?;
        self.sync_devices(channel, decided).await;
        let now = self.env.unix_us();
        let rt = self
            .channel_rt(channel)
            .ok_or(DomainError::NotFound("channel"))?;
        let mut texts = BlobTexts::default();
        match rt.state.decide(&principal, cmd, now)? {
            ChannelDecision::Event(event) => {
                let event = self
                    .finish_event(principal.workspace(), event, &mut texts)
                    .await?;
                let (seq, target) = self
                    .decide_event(channel, event, now, decided, &mut texts)
                    .await;
                let rt = &self.channels[&channel];
                let message = target
                    .and_then(|t| rt.state.message_at(t))
                    .map(|m| view(channel, m, &texts, &self.meta.borrow()));
                Ok(ChannelOutcome {
                    seq: Some(seq),
                    message,
                    created: true,
                })
            }
            ChannelDecision::Duplicate(seq) => {
                let rt = &self.channels[&channel];
                let m = rt.state.message_at(seq).expect("remembered message exists");
                texts.fetch(self.env.blobs(), m.body()).await;
                let message = Some(view(channel, m, &texts, &self.meta.borrow()));
                Ok(ChannelOutcome {
                    seq: None,
                    message,
                    created: false,
                })
            }
            ChannelDecision::Unchanged => Ok(ChannelOutcome {
                seq: None,
                message: None,
                created: false,
            }),
        }
    }

    /// The checks and storage a decided event still needs from outside the channel: a
    /// member to be added must belong to the workspace, and a body over the inline limit
    /// goes to the blob store (durably, before the event that references it commits).
    /// Both come after the domain's own checks, so a refused command reveals nothing and
    /// stores nothing. The blob store works off the shard, so only this partition waits
    /// for it.
    async fn finish_event(
        &self,
        workspace: crate::ids::WorkspaceId,
        event: ChannelEvent,
        texts: &mut BlobTexts,
    ) -> Result<ChannelEvent, EngineError> {
        Ok(match event {
            ChannelEvent::MemberJoined { user, .. }
                if self.meta.borrow().principal(user, workspace).is_err() =>
            {
                return Err(DomainError::NotFound("user").into());
            }
            ChannelEvent::MessagePosted {
                user,
                body,
                thread,
                client_msg_id,
                mentions,
            } => ChannelEvent::MessagePosted {
                user,
                body: self.to_blob(body, texts).await?,
                thread,
                client_msg_id,
                mentions,
            },
            ChannelEvent::MessagePostedWithFiles(mut p) => {
                self.check_files(workspace, p.user, &p.files)?;
                p.body = self.to_blob(p.body, texts).await?;
                ChannelEvent::MessagePostedWithFiles(p)
            }
            ChannelEvent::MessageEdited {
                target,
                body,
                mentions,
            } => ChannelEvent::MessageEdited {
                target,
                body: self.to_blob(body, texts).await?,
                mentions,
            },
            other => other,
        })
    }

    /// Files attached to a post must be live files the author uploaded to the channel's
    /// workspace; any other is unknown to them (404), as a file they cannot read is.
    fn check_files(
        &self,
        workspace: crate::ids::WorkspaceId,
        author: UserId,
        files: &[crate::ids::FileId],
    ) -> Result<(), EngineError> {
        let meta = self.meta.borrow();
        let own = |f: &crate::ids::FileId| {
            meta.live_file(workspace, *f)
                .is_some_and(|e| e.stored.user == author)
        };
        if !files.iter().all(own) {
            return Err(DomainError::NotFound("file").into());
        }
        Ok(())
    }

    /// A body over the inline limit, stored in the blob store; any other body as it is.
    async fn to_blob(&self, body: Body, texts: &mut BlobTexts) -> Result<Body, EngineError> {
        match body {
            Body::Text(t) if t.len() > INLINE_BODY_BYTES_MAX => {
                let bytes = Bytes::from(t.into_bytes());
                let r = self.env.blobs().put(bytes.clone()).await.map_err(|e| {
                    if e.kind() == std::io::ErrorKind::NotConnected {
                        // A cluster's store could not reach a majority of the nodes: as
                        // a leader that lost its majority, refused for a retry.
                        EngineError::from(Unavailable::NotLeader {
                            partition: self.id,
                            leader: None,
                        })
                    } else {
                        IoError::new("blob store", e).into()
                    }
                })?;
                texts.insert(r, bytes);
                Ok(Body::Blob {
                    hash: r.hash,
                    len: r.len,
                })
            }
            other => Ok(other),
        }
    }

    /// Applies a decided event, renders its frame, and queues it for the tick's commit.
    async fn decide_event(
        &mut self,
        channel: ChannelId,
        event: ChannelEvent,
        at_us: u64,
        decided: &mut Vec<Decided>,
        texts: &mut BlobTexts,
    ) -> (u64, Option<u64>) {
        let rt = self.channels.get_mut(&channel).expect("channel state");
        let seq = rt.state.last_seq() + 1;
        let target = target_of(&event, seq);
        // The frame shows the message the event is about: fetch its body first if it is
        // a blob (a new body was just stored, and `texts` has it).
        if let Some(m) = target.and_then(|t| rt.state.message_at(t)) {
            texts.fetch(self.env.blobs(), m.body()).await;
        }
        let rt = self.channels.get_mut(&channel).expect("channel state");
        rt.state.apply(seq, at_us, &event);
        let meta = &self.meta;
        let frame = crate::view::event_frame(&rt.state, seq, &event, |m| {
            view(channel, m, texts, &meta.borrow())
        });
        // A large body stays out of the log: a frame that carries one goes to the blob
        // store too, and the log keeps its reference (a zero byte, the hash and the length;
        // a JSON frame never starts with a zero byte).
        let large = matches!(
            target
                .and_then(|t| rt.state.message_at(t))
                .map(|m| m.body()),
            Some(StoredBody::Blob { .. })
        );
        let record = ChannelRecord {
            channel,
            workspace: rt.state.workspace,
            seq,
            at_us,
            event,
        };
        let payload = if large {
            match self.env.blobs().put(frame.clone()).await {
                Ok(r) => event::encode_channel(&record, &frame_reference(&r)),
                // Without the frame in the blob store the event cannot be replayed as it
                // was; keep it in the log rather than lose it.
                Err(_) => event::encode_channel(&record, &frame),
            }
        } else {
            event::encode_channel(&record, &frame)
        };
        let posted_by = record.event.posted().map(|p| p.user);
        decided.push(Decided {
            channel,
            seq,
            payload,
            frame,
            membership: membership_of(&record.event),
            posted_by,
            at_us,
        });
        (seq, target)
    }

    async fn init(&mut self, channel: ChannelId, decided: &mut Vec<Decided>) {
        let members = match self.meta.borrow().channel(channel) {
            Some(c) => c.initial_members.clone(),
            None => return,
        };
        let now = self.env.unix_us();
        let Some(rt) = self.channel_rt(channel) else {
            return;
        };
        if rt.state.last_seq() > 0 {
            return;
        }
        let mut texts = BlobTexts::default();
        for e in rt.state.initial_events(&members) {
            self.decide_event(channel, e, now, decided, &mut texts)
                .await;
        }
        self.sync_devices(channel, decided).await;
    }

    /// Brings an encrypted channel's device list up to the devices this shard's metadata
    /// replica lists for its members, deciding the device events it lacks ahead of
    /// anything else on the channel. Every command on the channel comes after this, so none
    /// is decided against a device list older than the directory's; and since the
    /// directory is the truth, a crash between a device change and its channel events
    /// loses nothing: the next command, or the next change, makes them. Nothing happens for
    /// a plain channel or an unknown one.
    async fn sync_devices(&mut self, channel: ChannelId, decided: &mut Vec<Decided>) {
        let Some(rt) = self.channel_rt(channel) else {
            return;
        };
        if !rt.state.kind.is_encrypted() {
            return;
        }
        let state = &self.channels[&channel].state;
        let listed: BTreeSet<(UserId, String)> = {
            let meta = self.meta.borrow();
            let keys = meta.e2ee();
            state
                .members()
                .flat_map(|u| keys.listed(u).map(move |(d, _)| (u, d.to_owned())))
                .collect()
        };
        let events = state.device_events(&listed);
        if events.is_empty() {
            return;
        }
        let (now, mut texts) = (self.env.unix_us(), BlobTexts::default());
        for e in events {
            self.decide_event(channel, e, now, decided, &mut texts)
                .await;
        }
    }

    /// Commits the tick's events and then its marks, as one batch. Marks go after the
    /// events: replayed in that order, a mark never names a seq the channel lacks, and the
    /// markers come out as they were decided, because a marker only moves forward and a
    /// join (which resets it) always lies above any mark decided before it.
    async fn commit(&mut self, decided: &[Decided], moved: &[Moved]) -> Result<(), CommitError> {
        let marks = moved
            .iter()
            .filter_map(|m| Some((m.at_us, m.payload.as_deref()?)));
        let entries: Vec<Entry<'_>> = decided
            .iter()
            .map(|d| (d.at_us, &d.payload[..]))
            .chain(marks)
            .map(|(timestamp_us, payload)| Entry {
                timestamp_us,
                payload,
            })
            .collect();
        let started = self.env.now();
        let committed = self.log.commit(&entries).await;
        if let (Some(o), Ok(_)) = (&self.observer.0, &committed) {
            o.committed(entries.len(), self.env.now().duration_since(started));
        }
        let range = committed?;
        if range.start != self.applied {
            // Something else reached the log between the state and this batch: what was
            // decided here was decided against a state that was not the log's.
            return Err(CommitError::Lost { may_commit: true });
        }
        self.applied = range.end;
        for (d, offset) in decided.iter().zip(range) {
            let rt = self.channels.get_mut(&d.channel).expect("channel state");
            rt.offsets.push(offset);
            rt.committed = d.seq;
            if let Some((user, joined)) = d.membership {
                if joined {
                    self.track(user, d.channel);
                }
                let set = self.user_channels.entry(user).or_default();
                if joined {
                    set.insert(d.channel);
                } else {
                    set.remove(&d.channel);
                }
            }
        }
        Ok(())
    }

    /// Sends each committed event to every shard with a subscriber for its channel, one
    /// message per shard per tick. The frame is shared, never copied.
    async fn deliver(&mut self, decided: &[Decided], moved: &[Moved]) {
        let shards = self.routes.shard_count() as usize;
        let mut out: Vec<Vec<Delivery>> = vec![Vec::new(); shards];
        for d in decided {
            if let Some((user, true)) = d.membership {
                self.adjust_channel_shards(d.channel, user, 1);
            }
            if let Some(counts) = self.channel_shards.get(&d.channel) {
                for (shard, n) in counts.iter().enumerate() {
                    if *n > 0 {
                        out[shard].push(Delivery {
                            channel: d.channel,
                            seq: d.seq,
                            frame: d.frame.clone(),
                            membership: d.membership,
                            ephemeral_from: None,
                            to_user: None,
                        });
                    }
                }
            }
            if let Some((user, false)) = d.membership {
                self.adjust_channel_shards(d.channel, user, -1);
                if !self.is_member(user) {
                    self.online.forget(user);
                    self.synced.remove(&user);
                }
            }
        }
        // Each marker change goes to every shard with a connection of its user, after the
        // tick's events (so a post's own frame comes before the read frame it causes).
        for m in moved {
            let Some(frame) = &m.frame else {
                continue;
            };
            for (shard, _) in self.online.shards_of(m.user) {
                out[shard as usize].push(Delivery {
                    channel: ChannelId(0),
                    seq: 0,
                    frame: frame.clone(),
                    membership: None,
                    ephemeral_from: None,
                    to_user: Some(m.user),
                });
            }
        }
        for (shard, batch) in out.into_iter().enumerate() {
            if !batch.is_empty() {
                let _ = self
                    .routes
                    .send(shard as u32, ShardMsg::Deliver(batch))
                    .await;
            }
        }
    }

    /// Sends a typing frame to the shards with subscribers of the channel, at once and
    /// without the log: typing is ephemeral.
    async fn typing(&mut self, user: UserId, channel: ChannelId) -> Result<(), EngineError> {
        let p = self.principal(user, channel)?;
        let member = self
            .channels
            .get(&channel)
            .is_some_and(|rt| rt.state.is_member(p.user()));
        if !member {
            return Err(DomainError::NotFound("channel").into());
        }
        let frame = serde_json::json!({
            "type": "typing",
            "channel_id": channel.to_string(),
            "user_id": user.to_string(),
        });
        let frame = crate::view::json(&frame).expect("json");
        let targets: Vec<u32> = self
            .channel_shards
            .get(&channel)
            .map(|counts| {
                counts
                    .iter()
                    .enumerate()
                    .filter(|(_, n)| **n > 0)
                    .map(|(i, _)| i as u32)
                    .collect()
            })
            .unwrap_or_default();
        for shard in targets {
            let d = Delivery {
                channel,
                seq: 0,
                frame: frame.clone(),
                membership: None,
                ephemeral_from: Some(user),
                to_user: None,
            };
            // Typing is best effort: a full inbox drops it rather than wait.
            let _ = self.routes.try_send(shard, ShardMsg::Deliver(vec![d]));
        }
        Ok(())
    }

    /// Whether `user` is in one of this partition's channels (as committed).
    fn is_member(&self, user: UserId) -> bool {
        self.user_channels.get(&user).is_some_and(|s| !s.is_empty())
    }

    /// A user is about to join channel `joining` here. One with no counts here (not a
    /// member, or a member with no connections as far as this partition has heard) takes
    /// them from the shard's table, with the version they are as of: the changes still
    /// queued up to it are then skipped, and the later ones counted. The channels the user
    /// is in here already route to those connections from now on, as the skipped changes
    /// would have made them (the joined one is added by its delivery).
    fn track(&mut self, user: UserId, joining: ChannelId) {
        if self.online.is_online(user) {
            return;
        }
        let connected = self.connected.borrow();
        for (shard, n) in connected.users.shards_of(user) {
            self.online.add(user, shard, n as i32);
        }
        self.synced.insert(user, connected.version);
        drop(connected);
        let already: Vec<ChannelId> = self
            .user_channels
            .get(&user)
            .map(|cs| cs.iter().copied().filter(|c| *c != joining).collect())
            .unwrap_or_default();
        for channel in already {
            self.adjust_channel_shards(channel, user, 1);
        }
    }

    /// Adds (or removes) a user's connections to the shards a channel's events go to.
    fn adjust_channel_shards(&mut self, channel: ChannelId, user: UserId, sign: i32) {
        if !self.online.is_online(user) {
            return;
        }
        let shards = self.routes.shard_count() as usize;
        let counts = self
            .channel_shards
            .entry(channel)
            .or_insert_with(|| vec![0; shards]);
        for (i, n) in self.online.shards_of(user) {
            let c = &mut counts[i as usize];
            *c = (*c as i64 + sign as i64 * n as i64).max(0) as u32;
        }
    }

    /// A user's connection count on a shard changed. With `sub`, the subscriber's shard
    /// gets this partition's channels of the user and their committed seqs, in order
    /// before any later delivery.
    async fn online(
        &mut self,
        user: UserId,
        shard: u32,
        delta: i32,
        sub: Option<u64>,
        version: u64,
    ) {
        let shards = self.routes.shard_count() as usize;
        // Counted: this member's counts were taken from the shard's table at or after this
        // change, so they hold it already.
        let counted = self.synced.get(&user).is_some_and(|v| version <= *v);
        if !self.synced.is_empty() {
            // Every change up to this one has come through.
            self.synced.retain(|_, v| *v > version);
        }
        let channels: Vec<ChannelId> = self
            .user_channels
            .get(&user)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        // Not a member (no channels here): nothing here routes to the user; a join takes
        // the user's counts from the shard's table.
        if !channels.is_empty() && !counted {
            self.online.add(user, shard, delta);
            for c in &channels {
                let counts = self
                    .channel_shards
                    .entry(*c)
                    .or_insert_with(|| vec![0; shards]);
                let n = &mut counts[shard as usize];
                *n = (*n as i64 + delta as i64).max(0) as u32;
            }
        }
        if let Some(sub) = sub {
            let seqs = channels
                .iter()
                .map(|c| (*c, self.channels.get(c).map_or(0, |rt| rt.committed)))
                .collect();
            let _ = self
                .routes
                .send(
                    shard,
                    ShardMsg::OnlineAck {
                        sub,
                        channels: seqs,
                    },
                )
                .await;
        }
    }

    async fn read(&mut self, msg: PartitionMsg) {
        match msg {
            PartitionMsg::Read {
                user,
                channel,
                read,
                reply,
            } => {
                let _ = reply.send(self.answer(user, channel, read).await);
            }
            PartitionMsg::UnreadTotals { users, out } => out.add(self.unread_totals(&users)),
            PartitionMsg::PushChecks {
                channel,
                seq,
                users,
                reply,
            } => {
                let _ = reply.send(self.push_checks(channel, seq, &users).await);
            }
            PartitionMsg::CatchUp {
                user,
                channel,
                after,
                max,
                shard,
                sub,
            } => {
                let reply = self.catch_up(user, channel, after, max, sub).await;
                let _ = self.routes.send(shard, reply).await;
            }
            PartitionMsg::Visible {
                user,
                workspace,
                out,
            } => out.add(self.visible(user, workspace)),
            PartitionMsg::FileReaders { user, file, out } => {
                let channels = self.user_channels.get(&user).map_or_else(Vec::new, |cs| {
                    cs.iter()
                        .filter(|c| {
                            self.channels
                                .get(c)
                                .is_some_and(|rt| rt.state.file_readable(user, file))
                        })
                        .copied()
                        .collect()
                });
                out.add(channels);
            }
            PartitionMsg::Unreads {
                user,
                workspace,
                after,
                limit,
                out,
            } => out.add(self.unreads(user, workspace, after, limit)),
            PartitionMsg::Audit { out } => {
                // The first partition of its shard also reports the shard's table.
                let owner = self.routes.owner(self.id);
                let first = (0..self.id).all(|p| self.routes.owner(p) != owner);
                let connected = self.connected.borrow();
                let shard_wide = connected.users.iter().filter(|_| first);
                let counts = self
                    .online
                    .iter()
                    .chain(shard_wide)
                    .map(|(user, shard, n)| crate::outcome::SubscriberCount {
                        partition: self.id,
                        user,
                        shard,
                        subscriptions: n,
                    })
                    .collect();
                out.add(counts);
            }
            PartitionMsg::Committed(waiter) if waiter.parks_at(self.log.next_offset()) => {
                self.consumers.park(waiter)
            }
            PartitionMsg::Committed(waiter) => {
                crate::consumer::answer(&self.log, waiter, &log_name(self.id)).await
            }
            PartitionMsg::DeleteBefore { offset, reply } => {
                let limit = offset.min(self.snapshots.durable_offset.get());
                let r = self.log.delete_before(limit).await;
                let r = r.map_err(|e| Unavailable::Retention(Arc::new(e)).into());
                let _ = reply.send(r);
            }
            PartitionMsg::Command { .. }
            | PartitionMsg::MarkRead { .. }
            | PartitionMsg::Init { .. }
            | PartitionMsg::DevicesChanged { .. }
            | PartitionMsg::Online { .. }
            | PartitionMsg::Typing { .. } => unreachable!("a tick handles these itself"),
        }
    }

    /// Answers a read from committed state. Bodies in the blob store are fetched first,
    /// so only this partition waits for them.
    async fn answer(
        &self,
        user: UserId,
        channel: ChannelId,
        read: ChannelRead,
    ) -> Result<ReadOutcome, EngineError> {
        let p = self.principal(user, channel)?;
        let rt = self
            .channels
            .get(&channel)
            .ok_or(DomainError::NotFound("channel"))?;
        let s = &rt.state;
        let blobs = self.env.blobs();
        let mut texts = BlobTexts::default();
        Ok(match read {
            ChannelRead::History { before, limit } => {
                let page = s.history(&p, before, limit)?;
                texts.fetch_all(blobs, page.items.iter().copied()).await;
                ReadOutcome::Page(
                    page.items
                        .iter()
                        .map(|m| view(channel, m, &texts, &self.meta.borrow()))
                        .collect(),
                    page.next_cursor,
                )
            }
            ChannelRead::Replies { root, after, limit } => {
                let page = s.replies(&p, root, after, limit)?;
                texts.fetch_all(blobs, page.items.iter().copied()).await;
                ReadOutcome::Page(
                    page.items
                        .iter()
                        .map(|m| view(channel, m, &texts, &self.meta.borrow()))
                        .collect(),
                    page.next_cursor,
                )
            }
            ChannelRead::Message { id, found } => {
                let m = if found {
                    s.found(&p, id)?
                } else {
                    s.get(&p, id)?
                };
                texts.fetch(blobs, m.body()).await;
                ReadOutcome::Message(view(channel, m, &texts, &self.meta.borrow()))
            }
            ChannelRead::Info => {
                let visible =
                    s.is_member(user) || s.kind == crate::domain::event::ChannelKind::Public;
                let meta = self.meta.borrow();
                let c = meta
                    .channel(channel)
                    .filter(|_| visible)
                    .ok_or(DomainError::NotFound("channel"))?;
                ReadOutcome::Channel(ChannelView::new(
                    c.id,
                    c.workspace,
                    &c.name,
                    c.kind,
                    rt.committed,
                ))
            }
            ChannelRead::Versions { id } => {
                let m = s.get(&p, id)?;
                if m.deleted {
                    return Ok(ReadOutcome::Versions(Vec::new()));
                }
                for (b, _) in m.versions.iter() {
                    texts.fetch(blobs, b).await;
                }
                ReadOutcome::Versions(
                    m.versions
                        .iter()
                        .map(|(b, at)| crate::view::VersionView {
                            text: texts.text(b),
                            ciphertext: match b {
                                StoredBody::Ciphertext(c) => Some(c.as_str().to_owned()),
                                _ => None,
                            },
                            at: rfc3339(*at),
                        })
                        .collect(),
                )
            }
        })
    }

    /// One page of a channel's events after `after`, read back from the log.
    async fn catch_up(
        &mut self,
        user: UserId,
        channel: ChannelId,
        after: u64,
        max: usize,
        sub: u64,
    ) -> ShardMsg {
        let empty = |done| ShardMsg::CatchUpReply {
            sub,
            channel,
            frames: Vec::new(),
            last: after,
            done,
        };
        let Some(rt) = self.channels.get(&channel) else {
            return empty(true);
        };
        // A member reads up to the end; a former member up to the event that removed them,
        // so a resume that raced their removal still ends with their `member:left`.
        let Some(limit) = rt.state.readable_until(user) else {
            return empty(true);
        };
        let end = rt.committed.min(limit);
        let from = after.min(end);
        let page = self.catch_up_events.min(max.max(1)) as u64;
        let to = end.min(from + page);
        let mut frames = Vec::with_capacity((to - from) as usize);
        for seq in from + 1..=to {
            let offset = rt.offsets[(seq - 1) as usize];
            let frame = match self.log.read(offset, 1).await {
                Ok(records) if records.first().is_some_and(|r| r.offset == offset) => {
                    let payload = records[0].payload.clone();
                    let stored = event::stored_frame(&payload);
                    match stored.first() {
                        Some(0) => match self.referenced_frame(stored).await {
                            Some(frame) => frame,
                            None => return empty(true),
                        },
                        _ => {
                            let start = payload.len() - stored.len();
                            payload.slice(start..)
                        }
                    }
                }
                _ => return empty(true),
            };
            frames.push(frame);
        }
        ShardMsg::CatchUpReply {
            sub,
            channel,
            frames,
            last: to,
            done: to >= end,
        }
    }

    /// The frame a log record refers to in the blob store.
    async fn referenced_frame(&self, stored: &[u8]) -> Option<Bytes> {
        let hash: [u8; 32] = stored.get(1..33)?.try_into().ok()?;
        let len = u64::from_le_bytes(stored.get(33..41)?.try_into().ok()?);
        self.env.blobs().get(BlobRef { hash, len }).await.ok()
    }

    /// The channels a user sees, from the indexes: the workspace's public channels here
    /// and the user's own channels. No partition scan.
    fn visible(
        &self,
        user: UserId,
        workspace: Option<crate::ids::WorkspaceId>,
    ) -> Vec<ChannelView> {
        let meta = self.meta.borrow();
        let mine = self.user_channels.get(&user).into_iter().flatten();
        let public = workspace
            .and_then(|w| self.public.get(&w))
            .into_iter()
            .flatten();
        let mut ids: Vec<ChannelId> = mine.chain(public).copied().collect();
        ids.sort_unstable();
        ids.dedup();
        ids.into_iter()
            .filter_map(|id| {
                let c = meta.channel(id)?;
                let reach = workspace.is_none_or(|w| c.workspace == w)
                    && meta.principal(user, c.workspace).is_ok();
                let rt = self.channels.get(&id)?;
                let mut view = ChannelView::new(c.id, c.workspace, &c.name, c.kind, rt.committed);
                // A workspace's list carries the caller's read state (API.md §9).
                if workspace.is_some() {
                    view.read = Some(ChannelReadFields::of(rt.state.read_counts(user)));
                }
                reach.then_some(view)
            })
            .collect()
    }

    /// The user's read state in each of their channels here of `workspace` after
    /// `after`, in channel order: at most `limit + 1`, so that the gatherer knows whether
    /// a next page exists. Each costs a few binary searches (see `domain::unread`).
    /// The message at `seq` as it is now, and each user's membership and read marker in
    /// the channel ([`PartitionMsg::PushChecks`]).
    async fn push_checks(
        &self,
        channel: ChannelId,
        seq: u64,
        users: &[UserId],
    ) -> Result<super::Recipients, EngineError> {
        let rt = self
            .channels
            .get(&channel)
            .ok_or(DomainError::NotFound("channel"))?;
        let s = &rt.state;
        let message = match s.message_at(seq) {
            Some(m) => {
                let mut texts = BlobTexts::default();
                texts.fetch(self.env.blobs(), m.body()).await;
                Some(view(channel, m, &texts, &self.meta.borrow()))
            }
            None => None,
        };
        let recipients = users
            .iter()
            .map(|u| {
                let read_seq = s.read_counts(*u).map_or(0, |c| c.read_seq);
                (s.is_member(*u), read_seq)
            })
            .collect();
        Ok((message, recipients))
    }

    /// Each user's unread messages over their channels of this partition.
    fn unread_totals(&self, users: &[UserId]) -> Vec<u64> {
        users
            .iter()
            .map(|u| {
                self.user_channels.get(u).map_or(0, |mine| {
                    mine.iter()
                        .filter_map(|c| self.channels.get(c)?.state.read_counts(*u))
                        .map(|c| c.unread_count)
                        .sum()
                })
            })
            .collect()
    }

    fn unreads(
        &self,
        user: UserId,
        workspace: crate::ids::WorkspaceId,
        after: Option<ChannelId>,
        limit: usize,
    ) -> Vec<ReadView> {
        use std::ops::Bound::{Excluded, Unbounded};
        let Some(mine) = self.user_channels.get(&user) else {
            return Vec::new();
        };
        let from = after.map_or(Unbounded, Excluded);
        mine.range((from, Unbounded))
            .filter_map(|id| {
                let rt = self.channels.get(id)?;
                if rt.state.workspace != workspace {
                    return None;
                }
                let counts = rt.state.read_counts(user)?;
                Some(ReadView::new(*id, rt.committed, counts))
            })
            .take(limit.saturating_add(1))
            .collect()
    }
}

/// The name of a partition's log directory, under the data directory.
/// A record of a channel partition's log.
enum PartitionRecord {
    Channel(ChannelRecord),
    Read(ReadRecord),
}

/// Decodes a record of partition `partition`'s log: a channel event or a read marker;
/// anything else is corrupt.
fn partition_record(
    partition: u32,
    r: &chorus_log::Record,
) -> Result<PartitionRecord, EngineError> {
    match event::decode(&r.payload) {
        Ok(Decoded::Channel(rec)) => Ok(PartitionRecord::Channel(rec)),
        Ok(Decoded::Read(rec)) => Ok(PartitionRecord::Read(rec)),
        Ok(Decoded::Meta(_)) => Err(Corrupt::Replay {
            log: log_name(partition),
            what: format!("metadata event at offset {}", r.offset),
        }
        .into()),
        Err(source) => Err(Corrupt::Event {
            log: log_name(partition),
            offset: r.offset,
            source,
        }
        .into()),
    }
}

pub(crate) fn log_name(partition: u32) -> String {
    format!("p{partition:05}")
}

fn read_failed(partition: u32, e: ReadError) -> EngineError {
    Corrupt::LogRead {
        log: log_name(partition),
        source: Arc::new(e),
    }
    .into()
}

/// Answers a request the partition will not serve.
pub(crate) fn fail(msg: PartitionMsg, why: &Unavailable) {
    let err = || EngineError::from(why.clone());
    match msg {
        PartitionMsg::Command { reply, .. } => {
            let _ = reply.send(Err(err()));
        }
        PartitionMsg::Read { reply, .. } => {
            let _ = reply.send(Err(err()));
        }
        PartitionMsg::Init { ack, .. } => {
            if let Some(a) = ack {
                a.done()
            }
        }
        PartitionMsg::DevicesChanged { ack, .. } => ack.done(),
        PartitionMsg::Visible { out, .. } => out.add(Vec::new()),
        PartitionMsg::FileReaders { out, .. } => out.add(Vec::new()),
        PartitionMsg::Unreads { out, .. } => out.add(Vec::new()),
        PartitionMsg::UnreadTotals { out, .. } => out.add(Vec::new()),
        PartitionMsg::PushChecks { reply, .. } => {
            let _ = reply.send(Err(err()));
        }
        PartitionMsg::MarkRead { reply, .. } => {
            let _ = reply.send(Err(err()));
        }
        PartitionMsg::Audit { out } => out.add(Vec::new()),
        PartitionMsg::Typing { reply, .. } => {
            let _ = reply.send(Err(err()));
        }
        PartitionMsg::Committed(waiter) => {
            let _ = waiter.reply.send(Err(err()));
        }
        PartitionMsg::DeleteBefore { reply, .. } => {
            let _ = reply.send(Err(err()));
        }
        PartitionMsg::Online { .. } | PartitionMsg::CatchUp { .. } => {}
    }
}

/// Writes a partition snapshot's body: the number of channels, then each channel's state
/// and the log offset of each of its events.
pub(crate) fn write_channels<'a>(
    w: &mut crate::snapshot::Writer,
    channels: impl ExactSizeIterator<Item = (&'a ChannelState, &'a [u64])>,
) {
    w.len(channels.len());
    for (state, offsets) in channels {
        state.snapshot(w);
        w.u64s(offsets);
    }
}

/// Reads a body written by [`write_channels`], checking everything the body alone can
/// show: each channel's state (see [`ChannelState::restore`]), one log offset per event,
/// and no bytes left over. Whether the channels belong here is the caller's to check.
pub(crate) fn read_channels(
    loaded: &crate::snapshot::Loaded,
) -> Result<Vec<(ChannelState, Vec<u64>)>, crate::snapshot::SnapshotError> {
    let mut r = loaded.body();
    // No capacity from the count: it is checked against 8 bytes left per channel, far
    // less than a channel's state takes in memory.
    let mut channels = Vec::new();
    for _ in 0..r.count(8)? {
        let state = ChannelState::restore(&mut r)?;
        let offsets = r.u64s()?;
        if offsets.len() as u64 != state.last_seq() {
            return Err(crate::snapshot::SnapshotError(format!(
                "channel {} has {} event offsets for {} events",
                state.id,
                offsets.len(),
                state.last_seq()
            )));
        }
        channels.push((state, offsets));
    }
    r.finish()?;
    Ok(channels)
}

/// How a log record refers to a frame kept in the blob store.
fn frame_reference(r: &BlobRef) -> Vec<u8> {
    let mut out = Vec::with_capacity(41);
    out.push(0);
    out.extend_from_slice(&r.hash);
    out.extend_from_slice(&r.len.to_le_bytes());
    out
}

fn membership_of(e: &ChannelEvent) -> Option<(UserId, bool)> {
    match e {
        ChannelEvent::MemberJoined { user, .. } => Some((*user, true)),
        ChannelEvent::MemberLeft { user, .. } => Some((*user, false)),
        _ => None,
    }
}

/// The seq of the message an event is about, if any.
fn target_of(e: &ChannelEvent, seq: u64) -> Option<u64> {
    match e {
        ChannelEvent::MessagePosted { .. } | ChannelEvent::MessagePostedWithFiles(_) => Some(seq),
        ChannelEvent::MessageEdited { target, .. }
        | ChannelEvent::MessageDeleted { target, .. }
        | ChannelEvent::ReactionAdded { target, .. }
        | ChannelEvent::ReactionRemoved { target, .. } => Some(*target),
        ChannelEvent::MemberJoined { .. }
        | ChannelEvent::MemberLeft { .. }
        | ChannelEvent::DeviceAdded { .. }
        | ChannelEvent::DeviceRemoved { .. } => None,
    }
}

/// A message as callers see it, with its body's text from `texts` if it is a blob.
/// Its files as they stand now (a deleted file as `{"id","deleted":true}`), from the
/// shard's metadata replica; a deleted message shows none.
fn view(channel: ChannelId, m: &Message, texts: &BlobTexts, meta: &MetaState) -> MessageView {
    let mut v = MessageView::new(channel, m, &texts.text(m.body()));
    if !m.deleted {
        v.files = m
            .files
            .iter()
            .filter_map(|f| meta.file_any(*f).map(crate::view::FileView::from))
            .collect();
    }
    v
}
