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
use crate::blob::BlobStore;
use crate::domain::channel::{ChannelDecision, ChannelState, Message, StoredBody};
use crate::domain::event::{self, Body, ChannelEvent, ChannelRecord, Decoded};
use crate::domain::meta::MetaState;
use crate::domain::{DomainError, Principal, INLINE_BODY_BYTES_MAX};
use crate::durability::{Durability, LocalDurability};
use crate::engine::{ChannelOutcome, EngineError, ReadOutcome};
use crate::ids::{ChannelId, UserId};
use crate::view::{rfc3339, ChannelView, MessageView};
use bytes::Bytes;
use chorus_log::Entry;
use futures::channel::mpsc;
use futures::StreamExt;
use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::rc::Rc;
use std::sync::Arc;

/// Most requests taken into one tick.
pub(crate) const TICK_REQUESTS_MAX: usize = 1024;
/// Most events in one catch-up page.
pub(crate) const CATCH_UP_EVENTS_MAX: usize = 256;
/// Requests waiting for a partition's task, past which the shard's loop waits.
pub(crate) const PARTITION_QUEUE_MAX: usize = 8192;

struct ChannelRt {
    state: ChannelState,
    /// The log offset of each event: `offsets[seq - 1]`.
    offsets: Vec<u64>,
    /// The last seq that is durable.
    committed: u64,
}

/// A partition and everything it owns.
pub(crate) struct Partition {
    pub id: u32,
    log: LocalDurability,
    channels: HashMap<ChannelId, ChannelRt>,
    /// Committed channel membership, by user.
    user_channels: HashMap<UserId, BTreeSet<ChannelId>>,
    /// Connections per shard, by user.
    online: HashMap<UserId, Vec<u32>>,
    /// Connections of members per shard, by channel: where its events go.
    channel_shards: HashMap<ChannelId, Vec<u32>>,
    /// Public channels here, by workspace.
    public: HashMap<crate::ids::WorkspaceId, BTreeSet<ChannelId>>,
    routes: Routes,
    meta: Rc<RefCell<MetaState>>,
    blobs: Arc<BlobStore>,
    failed: Option<String>,
    observer: crate::engine::ObserverSlot,
    snapshots: Snapshots,
    /// Consumers' reads waiting for the next commit.
    consumers: crate::consumer::Waiters,
}

/// Where a partition's snapshot goes, and when the next one is due.
pub(crate) struct Snapshots {
    /// The snapshot file.
    pub path: std::path::PathBuf,
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
}

impl Snapshots {
    /// Snapshots at `path`, taken at least `every_events` apart.
    pub(crate) fn new(path: std::path::PathBuf, every_events: u64) -> Snapshots {
        Snapshots {
            path,
            every_events,
            since: 0,
            covered: 0,
            writing: Rc::new(std::cell::Cell::new(false)),
            durable_offset: Rc::new(std::cell::Cell::new(0)),
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

/// Writes a snapshot file covering the log up to `offset` on glommio's blocking pool, and
/// records the offset once it is durable. A failure is reported and otherwise ignored: the
/// log still holds everything, and the next snapshot tries again.
async fn store_snapshot(
    path: std::path::PathBuf,
    file: Vec<u8>,
    offset: u64,
    durable: Rc<std::cell::Cell<u64>>,
) {
    let shown = path.display().to_string();
    let r = glommio::executor()
        .spawn_blocking(move || crate::snapshot::store(&path, &file))
        .await;
    match r {
        Ok(()) => durable.set(durable.get().max(offset)),
        Err(e) => eprintln!("chorus: snapshot {shown} not written: {e}"),
    }
}

/// A snapshot is taken once the events since the last one reach this fraction (1/8) of
/// the events it covered: see [`Snapshots::due`].
const SNAPSHOT_GROWTH_DIVISOR: u64 = 8;

/// A reply to send after the tick's commit.
enum Pending {
    Outcome(Reply<ChannelOutcome>, Result<ChannelOutcome, EngineError>),
    Ack(Arc<dyn Ack>),
}

/// One event decided in this tick.
struct Decided {
    channel: ChannelId,
    seq: u64,
    payload: Vec<u8>,
    frame: Bytes,
    membership: Option<(UserId, bool)>,
    at_us: u64,
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

impl Partition {
    /// Opens a partition: replays its log into state and finds channels of the directory
    /// that still need their first members.
    pub(crate) async fn open(
        id: u32,
        log: LocalDurability,
        routes: Routes,
        meta: Rc<RefCell<MetaState>>,
        blobs: Arc<BlobStore>,
        observer: crate::engine::ObserverSlot,
        snapshots: Snapshots,
    ) -> Result<(Partition, Vec<ChannelId>, (Option<u64>, u64)), EngineError> {
        let mut p = Partition {
            id,
            log,
            channels: HashMap::new(),
            user_channels: HashMap::new(),
            online: HashMap::new(),
            channel_shards: HashMap::new(),
            public: HashMap::new(),
            routes,
            meta,
            blobs,
            failed: None,
            observer,
            snapshots,
            consumers: Default::default(),
        };
        let snapshot_offset = p.restore_snapshot();
        let from = snapshot_offset.unwrap_or(p.log.first_offset());
        let replayed = p.replay(from).await?;
        let uninitialised = {
            let meta = p.meta.borrow();
            meta.channels()
                .filter(|c| crate::domain::meta::partition_of(c.id) == id)
                .filter(|c| p.channels.get(&c.id).is_none_or(|rt| rt.committed == 0))
                .map(|c| c.id)
                .collect()
        };
        Ok((p, uninitialised, (snapshot_offset, replayed)))
    }

    /// Loads the partition's snapshot if there is a usable one, and returns the log offset
    /// it covers, from which the log is replayed (`None`: replay all of it). A snapshot that cannot be used is reported and ignored: the whole
    /// log is replayed instead, and the state is rebuilt from it alone.
    fn restore_snapshot(&mut self) -> Option<u64> {
        let path = self.snapshots.path.clone();
        let first = self.log.first_offset();
        let loaded = match crate::snapshot::load(&path, self.id) {
            Ok(Some(l)) => l,
            Ok(None) => return None,
            Err(e) => {
                eprintln!("chorus: ignoring {}: {e}", path.display());
                return None;
            }
        };
        if loaded.next_offset > self.log.next_offset() || loaded.next_offset < first {
            eprintln!(
                "chorus: ignoring {}: it covers the log up to offset {}, but the log holds {}..{}",
                path.display(),
                loaded.next_offset,
                first,
                self.log.next_offset()
            );
            return None;
        }
        match self.restore_from(&loaded) {
            Ok(events) => {
                self.snapshots.covered = events;
                self.snapshots.durable_offset.set(loaded.next_offset);
                Some(loaded.next_offset)
            }
            Err(e) => {
                eprintln!("chorus: ignoring {}: {e}", path.display());
                self.channels.clear();
                self.user_channels.clear();
                self.public.clear();
                None
            }
        }
    }

    /// Restores the channels of a snapshot, returning the events it covered.
    fn restore_from(
        &mut self,
        loaded: &crate::snapshot::Loaded,
    ) -> Result<u64, crate::snapshot::SnapshotError> {
        let mut events = 0;
        for (state, offsets) in read_channels(loaded)? {
            let known = {
                let meta = self.meta.borrow();
                meta.channel(state.id).is_some_and(|c| {
                    c.workspace == state.workspace
                        && crate::domain::meta::partition_of(c.id) == self.id
                })
            };
            if !known {
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
        write_channels(
            &mut w,
            self.channels.values().map(|rt| {
                debug_assert_eq!(rt.committed, rt.state.last_seq());
                (&rt.state, &rt.offsets[..])
            }),
        );
        w.finish(self.id, self.log.next_offset())
    }

    /// Writes a snapshot in the background if one is due. The state is encoded here, on
    /// the shard (the only pause it costs), and written and fsynced on glommio's blocking
    /// pool while the partition goes on.
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
        let path = self.snapshots.path.clone();
        let (offset, durable) = (
            self.log.next_offset(),
            self.snapshots.durable_offset.clone(),
        );
        glommio::spawn_local(async move {
            store_snapshot(path, file, offset, durable).await;
            writing.set(false);
        })
        .detach();
    }

    /// Writes a final snapshot at shutdown, after any background one, unless nothing
    /// changed since the last.
    async fn final_snapshot(&mut self) {
        while self.snapshots.writing.get() {
            glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
        }
        if self.failed.is_some() || self.snapshots.since == 0 {
            return;
        }
        let durable = self.snapshots.durable_offset.clone();
        let (path, offset) = (self.snapshots.path.clone(), self.log.next_offset());
        store_snapshot(path, self.snapshot_file(), offset, durable).await;
    }

    /// Replays the log from `from`, returning the events replayed.
    async fn replay(&mut self, from: u64) -> Result<u64, EngineError> {
        let mut at = from;
        let mut replayed = 0;
        let end = self.log.next_offset();
        while at < end {
            let records = self.log.read(at, 4 << 20).await.map_err(storage)?;
            let Some(last) = records.last() else { break };
            at = last.offset + 1;
            for r in records {
                let rec = match event::decode(&r.payload) {
                    Ok(Decoded::Channel(rec)) => rec,
                    Ok(Decoded::Meta(_)) => {
                        return Err(EngineError::Corrupt(format!(
                            "partition {}: metadata event at offset {}",
                            self.id, r.offset
                        )))
                    }
                    Err(e) => {
                        return Err(EngineError::Corrupt(format!(
                            "partition {} offset {}: {e}",
                            self.id, r.offset
                        )))
                    }
                };
                self.replay_one(rec, r.offset)?;
                self.snapshots.since += 1;
                replayed += 1;
            }
        }
        Ok(replayed)
    }

    fn replay_one(&mut self, rec: ChannelRecord, offset: u64) -> Result<(), EngineError> {
        let rt = self.channel_rt(rec.channel).ok_or_else(|| {
            EngineError::Corrupt(format!("event of unknown channel {}", rec.channel))
        })?;
        if rec.seq != rt.state.last_seq() + 1 {
            return Err(EngineError::Corrupt(format!(
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

    /// The partition's task: ticks until its queue closes, then closes its log.
    pub(crate) async fn run(mut self, mut rx: mpsc::Receiver<PartitionMsg>) {
        let mut tick = Vec::with_capacity(TICK_REQUESTS_MAX);
        while let Some(first) = rx.next().await {
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
        self.final_snapshot().await;
        let _ = self.log.close().await;
    }

    /// Runs one tick, returning the events it committed.
    async fn tick(&mut self, msgs: Vec<PartitionMsg>) -> u64 {
        let mut decided: Vec<Decided> = Vec::new();
        let mut pending: Vec<Pending> = Vec::new();
        let mut reads: Vec<PartitionMsg> = Vec::new();
        for msg in msgs {
            if let Some(why) = &self.failed {
                fail(msg, why);
                continue;
            }
            match msg {
                PartitionMsg::Command {
                    user,
                    channel,
                    cmd,
                    reply,
                } => {
                    let outcome = self.command(user, channel, cmd, &mut decided);
                    pending.push(Pending::Outcome(reply, outcome));
                }
                PartitionMsg::Init { channel, ack } => {
                    self.init(channel, &mut decided);
                    if let Some(ack) = ack {
                        pending.push(Pending::Ack(ack));
                    }
                }
                PartitionMsg::Online {
                    user,
                    shard,
                    delta,
                    sub,
                } => self.online(user, shard, delta, sub).await,
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
        if !decided.is_empty() {
            if let Err(e) = self.commit(&decided).await {
                let why = format!("partition {} stopped: {e}", self.id);
                self.failed = Some(why.clone());
                for p in pending {
                    match p {
                        Pending::Outcome(reply, _) => {
                            let _ = reply.send(Err(EngineError::Unavailable(why.clone())));
                        }
                        Pending::Ack(ack) => ack.done(),
                    }
                }
                for r in reads {
                    fail(r, &why);
                }
                return 0;
            }
            self.deliver(&decided).await;
        }
        for waiter in self.consumers.ready(self.log.next_offset()) {
            crate::consumer::answer(&self.log, waiter).await;
        }
        for p in pending {
            match p {
                Pending::Outcome(reply, outcome) => {
                    let _ = reply.send(outcome);
                }
                Pending::Ack(ack) => ack.done(),
            }
        }
        for r in reads {
            self.read(r).await;
        }
        decided.len() as u64
    }

    fn principal(&self, user: UserId, channel: ChannelId) -> Result<Principal, DomainError> {
        let meta = self.meta.borrow();
        let (p, _) = meta.channel_principal(user, channel)?;
        Ok(p)
    }

    /// Decides a command and applies its event; the outcome is sent after the commit.
    fn command(
        &mut self,
        user: UserId,
        channel: ChannelId,
        cmd: crate::domain::channel::ChannelCommand,
        decided: &mut Vec<Decided>,
    ) -> Result<ChannelOutcome, EngineError> {
        let principal = self.principal(user, channel)?;
        let now = now_us();
        let rt = self
            .channel_rt(channel)
            .ok_or(DomainError::NotFound("channel"))?;
        match rt.state.decide(&principal, cmd, now)? {
            ChannelDecision::Event(event) => {
                let event = self.finish_event(principal.workspace(), event)?;
                let (seq, target) = self.decide_event(channel, event, now, decided);
                let rt = &self.channels[&channel];
                let message = target
                    .and_then(|t| rt.state.message_at(t))
                    .map(|m| self.view(channel, m));
                Ok(ChannelOutcome {
                    seq: Some(seq),
                    message,
                    created: true,
                })
            }
            ChannelDecision::Duplicate(seq) => {
                let rt = &self.channels[&channel];
                let m = rt.state.message_at(seq).expect("remembered message exists");
                let message = Some(self.view(channel, m));
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
    /// stores nothing.
    fn finish_event(
        &self,
        workspace: crate::ids::WorkspaceId,
        event: ChannelEvent,
    ) -> Result<ChannelEvent, EngineError> {
        let large = |body: &Body| matches!(body, Body::Text(t) if t.len() > INLINE_BODY_BYTES_MAX);
        let to_blob = |body: Body| -> Result<Body, EngineError> {
            match body {
                Body::Text(t) if t.len() > INLINE_BODY_BYTES_MAX => {
                    let r = self
                        .blobs
                        .put(t.as_bytes())
                        .map_err(|e| EngineError::Io(format!("blob store: {e}")))?;
                    Ok(Body::Blob {
                        hash: r.hash,
                        len: r.len,
                    })
                }
                other => Ok(other),
            }
        };
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
            } if large(&body) => ChannelEvent::MessagePosted {
                user,
                body: to_blob(body)?,
                thread,
                client_msg_id,
                mentions,
            },
            ChannelEvent::MessageEdited {
                target,
                body,
                mentions,
            } if large(&body) => ChannelEvent::MessageEdited {
                target,
                body: to_blob(body)?,
                mentions,
            },
            other => other,
        })
    }

    /// Applies a decided event, renders its frame, and queues it for the tick's commit.
    fn decide_event(
        &mut self,
        channel: ChannelId,
        event: ChannelEvent,
        at_us: u64,
        decided: &mut Vec<Decided>,
    ) -> (u64, Option<u64>) {
        let blobs = self.blobs.clone();
        let rt = self.channels.get_mut(&channel).expect("channel state");
        let seq = rt.state.last_seq() + 1;
        let target = target_of(&event, seq);
        rt.state.apply(seq, at_us, &event);
        let frame = crate::view::event_frame(&rt.state, seq, &event, |m| body_text(&blobs, m));
        // A large body stays out of the log: a frame that carries one goes to the blob
        // store too, and the log keeps its reference (a zero byte, the hash and the length;
        // a JSON frame never starts with a zero byte).
        let large = matches!(
            target
                .and_then(|t| rt.state.message_at(t))
                .map(|m| m.body()),
            Some(StoredBody::Blob { .. })
        );
        let reference;
        let stored: &[u8] = if large {
            reference = match blobs.put(&frame) {
                Ok(r) => frame_reference(&r),
                // Without the frame in the blob store the event cannot be replayed as it
                // was; keep it in the log rather than lose it.
                Err(_) => frame.clone(),
            };
            &reference
        } else {
            &frame
        };
        let record = ChannelRecord {
            channel,
            workspace: rt.state.workspace,
            seq,
            at_us,
            event,
        };
        let payload = event::encode_channel(&record, stored);
        decided.push(Decided {
            channel,
            seq,
            payload,
            frame: Bytes::from(frame),
            membership: membership_of(&record.event),
            at_us,
        });
        (seq, target)
    }

    fn init(&mut self, channel: ChannelId, decided: &mut Vec<Decided>) {
        let members = match self.meta.borrow().channel(channel) {
            Some(c) => c.initial_members.clone(),
            None => return,
        };
        let Some(rt) = self.channel_rt(channel) else {
            return;
        };
        if rt.state.last_seq() > 0 {
            return;
        }
        let now = now_us();
        for e in rt.state.initial_events(&members) {
            self.decide_event(channel, e, now, decided);
        }
    }

    async fn commit(&mut self, decided: &[Decided]) -> Result<(), EngineError> {
        let entries: Vec<Entry<'_>> = decided
            .iter()
            .map(|d| Entry {
                timestamp_us: d.at_us,
                payload: &d.payload,
            })
            .collect();
        let started = std::time::Instant::now();
        let committed = self.log.commit(&entries).await;
        if let (Some(o), Ok(_)) = (&self.observer.0, &committed) {
            o.committed(entries.len(), started.elapsed());
        }
        let range =
            committed.map_err(|e| EngineError::Unavailable(format!("commit failed: {e}")))?;
        for (d, offset) in decided.iter().zip(range) {
            let rt = self.channels.get_mut(&d.channel).expect("channel state");
            rt.offsets.push(offset);
            rt.committed = d.seq;
            if let Some((user, joined)) = d.membership {
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
    async fn deliver(&mut self, decided: &[Decided]) {
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
                        });
                    }
                }
            }
            if let Some((user, false)) = d.membership {
                self.adjust_channel_shards(d.channel, user, -1);
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
        let frame = Bytes::from(serde_json::to_vec(&frame).expect("json"));
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
            };
            // Typing is best effort: a full inbox drops it rather than wait.
            let _ = self.routes.shards[shard as usize].try_send(ShardMsg::Deliver(vec![d]));
        }
        Ok(())
    }

    /// Adds (or removes) a user's connections to the shards a channel's events go to.
    fn adjust_channel_shards(&mut self, channel: ChannelId, user: UserId, sign: i32) {
        let Some(per_shard) = self.online.get(&user) else {
            return;
        };
        let shards = self.routes.shard_count() as usize;
        let counts = self
            .channel_shards
            .entry(channel)
            .or_insert_with(|| vec![0; shards]);
        for (i, n) in per_shard.iter().enumerate() {
            counts[i] = (counts[i] as i64 + sign as i64 * *n as i64).max(0) as u32;
        }
    }

    /// A user's connection count on a shard changed. With `sub`, the subscriber's shard
    /// gets this partition's channels of the user and their committed seqs, in order
    /// before any later delivery.
    async fn online(&mut self, user: UserId, shard: u32, delta: i32, sub: Option<u64>) {
        let shards = self.routes.shard_count() as usize;
        let entry = self.online.entry(user).or_insert_with(|| vec![0; shards]);
        entry[shard as usize] = (entry[shard as usize] as i64 + delta as i64).max(0) as u32;
        if entry.iter().all(|n| *n == 0) {
            self.online.remove(&user);
        }
        let channels: Vec<ChannelId> = self
            .user_channels
            .get(&user)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        for c in &channels {
            let counts = self
                .channel_shards
                .entry(*c)
                .or_insert_with(|| vec![0; shards]);
            let n = &mut counts[shard as usize];
            *n = (*n as i64 + delta as i64).max(0) as u32;
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

    fn view(&self, channel: ChannelId, m: &Message) -> MessageView {
        MessageView::new(channel, m, &body_text(&self.blobs, m))
    }

    async fn read(&mut self, msg: PartitionMsg) {
        match msg {
            PartitionMsg::Read {
                user,
                channel,
                read,
                reply,
            } => {
                let _ = reply.send(self.answer(user, channel, read));
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
            PartitionMsg::Committed(waiter) if waiter.from >= self.log.next_offset() => {
                self.consumers.park(waiter)
            }
            PartitionMsg::Committed(waiter) => crate::consumer::answer(&self.log, waiter).await,
            PartitionMsg::DeleteBefore { offset, reply } => {
                let limit = offset.min(self.snapshots.durable_offset.get());
                let r = self.log.delete_before(limit).await;
                let r = r.map_err(|e| EngineError::Unavailable(format!("retention: {e}")));
                let _ = reply.send(r);
            }
            other => fail(other, "unexpected request"),
        }
    }

    fn answer(
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
        Ok(match read {
            ChannelRead::History { before, limit } => {
                let page = s.history(&p, before, limit)?;
                ReadOutcome::Page(
                    page.items.iter().map(|m| self.view(channel, m)).collect(),
                    page.next_cursor,
                )
            }
            ChannelRead::Replies { root, after, limit } => {
                let page = s.replies(&p, root, after, limit)?;
                ReadOutcome::Page(
                    page.items.iter().map(|m| self.view(channel, m)).collect(),
                    page.next_cursor,
                )
            }
            ChannelRead::Message { id } => ReadOutcome::Message(self.view(channel, s.get(&p, id)?)),
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
                ReadOutcome::Versions(
                    m.versions
                        .iter()
                        .map(|(b, at)| (body_of(&self.blobs, b), rfc3339(*at)))
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
        let page = CATCH_UP_EVENTS_MAX.min(max.max(1)) as u64;
        let to = end.min(from + page);
        let mut frames = Vec::with_capacity((to - from) as usize);
        for seq in from + 1..=to {
            let offset = rt.offsets[(seq - 1) as usize];
            let frame = match self.log.read(offset, 1).await {
                Ok(records) if records.first().is_some_and(|r| r.offset == offset) => {
                    let payload = records[0].payload.clone();
                    let stored = event::stored_frame(&payload);
                    match stored.first() {
                        Some(0) => match self.referenced_frame(stored) {
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
    fn referenced_frame(&self, stored: &[u8]) -> Option<Bytes> {
        let hash: [u8; 32] = stored.get(1..33)?.try_into().ok()?;
        let len = u64::from_le_bytes(stored.get(33..41)?.try_into().ok()?);
        let r = crate::blob::BlobRef { hash, len };
        self.blobs.get(&r).ok().map(Bytes::from)
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
                reach.then(|| ChannelView::new(c.id, c.workspace, &c.name, c.kind, rt.committed))
            })
            .collect()
    }
}

fn storage(e: chorus_log::ReadError) -> EngineError {
    EngineError::Corrupt(e.to_string())
}

fn fail(msg: PartitionMsg, why: &str) {
    let err = || EngineError::Unavailable(why.to_owned());
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
        PartitionMsg::Visible { out, .. } => out.add(Vec::new()),
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
fn frame_reference(r: &crate::blob::BlobRef) -> Vec<u8> {
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
        ChannelEvent::MessagePosted { .. } => Some(seq),
        ChannelEvent::MessageEdited { target, .. }
        | ChannelEvent::MessageDeleted { target, .. }
        | ChannelEvent::ReactionAdded { target, .. }
        | ChannelEvent::ReactionRemoved { target, .. } => Some(*target),
        ChannelEvent::MemberJoined { .. } | ChannelEvent::MemberLeft { .. } => None,
    }
}

fn body_of(blobs: &BlobStore, b: &StoredBody) -> String {
    match b {
        StoredBody::Text(t) => t.as_str().to_owned(),
        StoredBody::Blob { hash, len } => blobs
            .get(&crate::blob::BlobRef {
                hash: **hash,
                len: *len,
            })
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default(),
    }
}

fn body_text(blobs: &BlobStore, m: &Message) -> String {
    body_of(blobs, m.body())
}
