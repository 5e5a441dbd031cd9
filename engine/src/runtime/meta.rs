//! The metadata partition at run time: its owner's commit task, and the reads every shard
//! answers from its replica.
//!
//! Shard 0 owns the metadata log. It decides each command against its replica and applies
//! the event at once, commits the tick with one fsync, and then sends the committed event
//! to every other shard. An event is published when every shard has applied it (and, for a
//! new channel, when its partition has committed the first members). Every answer, whether
//! it made an event or not, goes out only once every event decided before it is published
//! ([`Publication`]), so any shard the caller talks to next knows everything the answer was
//! decided from: a DM answered "exists already" is a DM whose members are committed.
//!
//! In a cluster the log commits through the directory's group: only the node that leads it
//! decides; every other node's owner applies what its log grows by and publishes it the
//! same way, and a leader that loses its leadership before its events commit rebuilds its
//! replica from the log ([`MetaOwner::follow`], [`MetaOwner::rebuild`]).

use super::{Ack, PartitionMsg, Reply, Routes, ShardMsg};
use crate::domain::e2ee::{E2eeChange, E2eeCommand, E2eeOutcome, ToDevice};
use crate::domain::event::{self, Decoded, MetaEvent, MetaRecord};
use crate::domain::meta::{partition_of, MetaCommand, MetaDecision, MetaState, User};
use crate::domain::notify::{NotifyChange, NotifyCommand, NotifyPrefs, PushDevice};
use crate::domain::{ChannelKind, DomainError};
use crate::durability::{CommitError, Durability, Leading};
use crate::env::Env;
use crate::error::{Corrupt, EngineError, Unavailable};
use crate::ids::{ChannelId, FileId, UserId, WorkspaceId};
use crate::outcome::{MetaOutcome, NotifyOutcome};
use crate::view::{
    ChannelPrefsView, ChannelView, DeviceKeysView, FileView, MemberView, UserDevices, UserView,
    WorkspaceView,
};
use chorus_log::Entry;
use futures::channel::mpsc;
use futures::StreamExt;
use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, VecDeque};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// A metadata command as callers send it: raw IDs, turned into principals by the owner.
pub(crate) enum MetaRequest {
    CreateUser {
        email: String,
        name: String,
        password_hash: String,
        reply: Reply<MetaOutcome>,
    },
    CreateWorkspace {
        user: UserId,
        name: String,
        reply: Reply<MetaOutcome>,
    },
    AddMember {
        user: UserId,
        workspace: WorkspaceId,
        email: String,
        reply: Reply<MetaOutcome>,
    },
    CreateChannel {
        user: UserId,
        workspace: WorkspaceId,
        name: String,
        kind: ChannelKind,
        reply: Reply<MetaOutcome>,
    },
    OpenDm {
        user: UserId,
        workspace: WorkspaceId,
        users: Vec<UserId>,
        encrypted: bool,
        reply: Reply<MetaOutcome>,
    },
    StoreFile {
        user: UserId,
        workspace: WorkspaceId,
        file: Box<crate::outcome::NewFile>,
        reply: Reply<MetaOutcome>,
    },
    DeleteFile {
        user: UserId,
        file: FileId,
        reply: Reply<MetaOutcome>,
    },
    RecordPreview {
        record: Box<crate::domain::event::PreviewRecord>,
        reply: Reply<MetaOutcome>,
    },
    Notify {
        cmd: Box<NotifyCommand>,
        reply: Reply<MetaOutcome>,
    },
    E2ee {
        cmd: Box<E2eeCommand>,
        reply: Reply<MetaOutcome>,
    },
    AskCluster {
        nodes: Vec<event::ClusterNode>,
        reply: Reply<MetaOutcome>,
    },
    /// Answered `Current` once every shard's directory holds every metadata event
    /// committed before the request (in a cluster, wherever it was decided).
    Barrier { reply: Reply<MetaOutcome> },
}

/// What the metadata owner's task receives.
pub(crate) enum MetaMsg {
    /// A command.
    Request(MetaRequest),
    /// A consumer's read of the metadata log.
    Committed(crate::consumer::Waiter),
}

/// A read of the metadata replica, answered by whichever shard gets it.
pub(crate) enum MetaRead {
    /// Whether the account exists and, when a device is named, the device is registered
    /// and not removed.
    UserExists {
        user: UserId,
        device: Option<String>,
        reply: Reply<bool>,
    },
    /// The listed devices of the users who share a workspace with the caller.
    DeviceKeys {
        user: UserId,
        users: Vec<UserId>,
        reply: Reply<Vec<UserDevices>>,
    },
    /// A device's to-device messages after an ID, at most a limit, and whether more
    /// follow.
    ToDevice {
        user: UserId,
        device: String,
        after: u64,
        limit: usize,
        reply: Reply<(Vec<ToDevice>, bool)>,
    },
    /// How many one-time keys of a device are unclaimed.
    OneTimeKeyCount {
        user: UserId,
        device: String,
        reply: Reply<u32>,
    },
    UserByEmail {
        email: String,
        reply: Reply<Option<User>>,
    },
    Me {
        user: UserId,
        reply: Reply<(UserView, Vec<WorkspaceView>)>,
    },
    Members {
        user: UserId,
        workspace: WorkspaceId,
        reply: Reply<Vec<MemberView>>,
    },
    /// Whether the user is a member of the workspace (`NotFound` if not).
    InWorkspace {
        user: UserId,
        workspace: WorkspaceId,
        reply: Reply<()>,
    },
    /// A live file of a workspace the user is in (`NotFound` otherwise).
    File {
        user: UserId,
        file: FileId,
        reply: Reply<FileView>,
    },
    /// A live file, whoever asks: for a caller holding a credential for the file itself.
    LinkedFile {
        file: FileId,
        reply: Reply<FileView>,
    },
    /// Live files with no preview decided yet, of media types `previewable` accepts.
    FilesWithoutPreviews {
        previewable: fn(&str) -> bool,
        reply: Reply<Vec<FileView>>,
    },
    /// Whether a live file still has these bytes.
    FileBytesInUse {
        sha256: [u8; 32],
        reply: Reply<bool>,
    },
    /// A user's notification preferences.
    NotifyPrefs {
        user: UserId,
        reply: Reply<NotifyPrefs>,
    },
    /// A user's preferences for a channel of a workspace they are in (`NotFound` otherwise).
    ChannelNotifyPrefs {
        user: UserId,
        channel: ChannelId,
        reply: Reply<ChannelPrefsView>,
    },
    /// A user's push devices.
    PushDevices {
        user: UserId,
        reply: Reply<Vec<PushDevice>>,
    },
    /// The cluster's nodes as last asked.
    ClusterAsk {
        reply: Reply<Option<event::ClusterAsk>>,
    },
}

/// Answers a read from a shard's replica.
pub(crate) fn answer(meta: &MetaState, read: MetaRead) {
    match read {
        MetaRead::UserExists {
            user,
            device,
            reply,
        } => {
            let live = meta.user(user).is_some()
                && device.is_none_or(|d| meta.e2ee().device(user, &d).is_some());
            let _ = reply.send(Ok(live));
        }
        MetaRead::DeviceKeys { user, users, reply } => {
            let mut seen = BTreeSet::new();
            let found = users
                .into_iter()
                .filter(|u| seen.insert(*u) && meta.share_workspace(user, *u))
                .map(|u| UserDevices {
                    user: u,
                    devices: (meta.e2ee().listed(u))
                        .map(|(id, d)| DeviceKeysView::new(id, d))
                        .collect(),
                })
                .collect();
            let _ = reply.send(Ok(found));
        }
        MetaRead::ToDevice {
            user,
            device,
            after,
            limit,
            reply,
        } => {
            let _ = reply.send(Ok(meta.e2ee().to_device(user, &device, after, limit)));
        }
        MetaRead::OneTimeKeyCount {
            user,
            device,
            reply,
        } => {
            let _ = reply.send(Ok(meta.e2ee().unclaimed(user, &device)));
        }
        MetaRead::UserByEmail { email, reply } => {
            let _ = reply.send(Ok(meta.user_by_email(&email).cloned()));
        }
        MetaRead::Me { user, reply } => {
            let r = meta
                .user(user)
                .map(|u| {
                    let ws = meta
                        .workspaces_of(user)
                        .into_iter()
                        .map(Into::into)
                        .collect();
                    (UserView::from(u), ws)
                })
                .ok_or(EngineError::Domain(DomainError::NotFound("user")));
            let _ = reply.send(r);
        }
        MetaRead::Members {
            user,
            workspace,
            reply,
        } => {
            let r = meta.principal(user, workspace).map(|p| {
                meta.workspace(&p)
                    .members
                    .iter()
                    .filter_map(|(u, role)| meta.user(*u).map(|u| MemberView::new(u, *role)))
                    .collect()
            });
            let _ = reply.send(r.map_err(Into::into));
        }
        MetaRead::InWorkspace {
            user,
            workspace,
            reply,
        } => {
            let r = meta.principal(user, workspace).map(drop);
            let _ = reply.send(r.map_err(Into::into));
        }
        MetaRead::File { user, file, reply } => {
            let r = meta
                .file_any(file)
                .filter(|e| !e.deleted)
                .filter(|e| meta.principal(user, e.stored.workspace).is_ok())
                .map(FileView::from)
                .ok_or(EngineError::Domain(DomainError::NotFound("file")));
            let _ = reply.send(r);
        }
        MetaRead::LinkedFile { file, reply } => {
            let r = meta
                .file_any(file)
                .filter(|e| !e.deleted)
                .map(FileView::from)
                .ok_or(EngineError::Domain(DomainError::NotFound("file")));
            let _ = reply.send(r);
        }
        MetaRead::FilesWithoutPreviews { previewable, reply } => {
            let files = meta
                .files_without_previews(previewable)
                .into_iter()
                .map(FileView::from)
                .collect();
            let _ = reply.send(Ok(files));
        }
        MetaRead::FileBytesInUse { sha256, reply } => {
            let _ = reply.send(Ok(meta.file_bytes_in_use(&sha256)));
        }
        MetaRead::NotifyPrefs { user, reply } => {
            let _ = reply.send(Ok(meta.notify().prefs(user).clone()));
        }
        MetaRead::ChannelNotifyPrefs {
            user,
            channel,
            reply,
        } => {
            let r = meta
                .channel_principal(user, channel)
                .map(|_| ChannelPrefsView {
                    channel,
                    prefs: meta.notify().channel(user, channel),
                });
            let _ = reply.send(r.map_err(Into::into));
        }
        MetaRead::PushDevices { user, reply } => {
            let devices = meta.notify().devices(user).into_iter().cloned().collect();
            let _ = reply.send(Ok(devices));
        }
        MetaRead::ClusterAsk { reply } => {
            let _ = reply.send(Ok(meta.cluster().cloned()));
        }
    }
}

/// The name of the metadata log's directory, under the data directory.
pub(crate) const META_LOG: &str = "meta";

/// Replays the metadata log into a fresh state.
pub(crate) async fn replay(
    log: &impl Durability,
    partitions: u32,
) -> Result<MetaState, EngineError> {
    let mut state = MetaState::new(partitions);
    let mut at = log.first_offset();
    while at < log.next_offset() {
        let records = log.read(at, 4 << 20).await.map_err(|e| Corrupt::LogRead {
            log: META_LOG.into(),
            source: Arc::new(e),
        })?;
        let Some(last) = records.last() else { break };
        at = last.offset + 1;
        for r in records {
            match event::decode(&r.payload) {
                Ok(Decoded::Meta(rec)) => state.apply(&rec.event),
                Ok(Decoded::Channel(_) | Decoded::Read(_)) => {
                    return Err(Corrupt::Replay {
                        log: META_LOG.into(),
                        what: format!("channel record at offset {}", r.offset),
                    }
                    .into())
                }
                Err(source) => {
                    return Err(Corrupt::Event {
                        log: META_LOG.into(),
                        offset: r.offset,
                        source,
                    }
                    .into())
                }
            }
        }
    }
    Ok(state)
}

/// The metadata owner's task.
pub(crate) struct MetaOwner<E: Env> {
    pub env: E,
    pub log: E::Durability,
    /// The log offset after the last record the state holds (see the partition's).
    pub applied: Cell<u64>,
    /// The engine's channel partitions (a rebuilt state needs it).
    pub partitions: u32,
    pub meta: Rc<RefCell<MetaState>>,
    pub routes: Routes,
    /// The shard's own partition queues, for the first members of channels it owns.
    pub local_partitions: super::shard::PartitionQueues,
    /// The events not yet published and the answers waiting for them.
    pub publication: Arc<Publication>,
    /// The number of the last event decided (the first is 1).
    pub last_event: Cell<u64>,
    /// Why the owner stopped: a commit failed, so its state is ahead of its log.
    pub failed: RefCell<Option<Unavailable>>,
}

/// The metadata events the owner has decided but not yet published, and the answers that
/// wait for them.
///
/// An event is *published* once it is committed, every shard has applied it, and (for a new
/// channel) the channel's partition has committed its first members. Every answer of the
/// owner, a refusal or an "exists already" as much as the creator's own, waits until every
/// event decided before it (its own included) is published: a caller then finds on any
/// shard, and in the channel's partition, everything its answer was decided from. Without
/// this, the second caller to open a DM heard "exists" while the first caller's channel
/// was still being set up, and its next request found no such channel.
///
/// Shared by the owner, which decides, and the shards, whose acknowledgements publish: a
/// mutex, taken a few times per metadata event, never on a channel's path.
#[derive(Default)]
pub(crate) struct Publication {
    flight: Mutex<Flight>,
}

/// An answer waiting for events to be published.
type Waiting = (u64, Reply<MetaOutcome>, Result<MetaOutcome, EngineError>);

#[derive(Default)]
struct Flight {
    /// Events decided and not yet published, by number.
    unpublished: BTreeSet<u64>,
    /// Answers in the order decided, each with the number of the last event decided before
    /// it: it goes out once that event and every one before it are published.
    waiting: VecDeque<Waiting>,
    /// The first event whose commit failed: it and every later one will never be published.
    failed_from: Option<(u64, Unavailable)>,
}

impl Publication {
    /// Event `n` was decided and applied on the owner.
    fn begin(&self, n: u64) {
        self.flight
            .lock()
            .expect("publication")
            .unpublished
            .insert(n);
    }

    /// Answers once every event up to `after` is published: now, if they are.
    fn answer(
        &self,
        after: u64,
        reply: Reply<MetaOutcome>,
        value: Result<MetaOutcome, EngineError>,
    ) {
        let mut f = self.flight.lock().expect("publication");
        if let Some((from, why)) = &f.failed_from {
            if after >= *from {
                let why = why.clone();
                drop(f);
                let _ = reply.send(Err(why.into()));
                return;
            }
        }
        if f.unpublished.first().is_some_and(|first| *first <= after) {
            f.waiting.push_back((after, reply, value));
            return;
        }
        drop(f);
        let _ = reply.send(value);
    }

    /// Events from `from` on were decided but will not be committed here (the leadership
    /// went): the answers that wait for them are answered `why`, and the numbers are
    /// free for the events this node applies instead.
    fn drop_from(&self, from: u64, why: &Unavailable) {
        let lost = {
            let mut f = self.flight.lock().expect("publication");
            f.unpublished.retain(|n| *n < from);
            let keep = f.waiting.iter().take_while(|w| w.0 < from).count();
            f.waiting.split_off(keep)
        };
        for (_, reply, _) in lost {
            let _ = reply.send(Err(why.clone().into()));
        }
    }

    /// Event `n` is published: answers whatever waited for it (and nothing earlier).
    pub(crate) fn published(&self, n: u64) {
        let ready = {
            let mut f = self.flight.lock().expect("publication");
            f.unpublished.remove(&n);
            let horizon = f.unpublished.first().copied().unwrap_or(u64::MAX);
            let mut ready = Vec::new();
            while f.waiting.front().is_some_and(|w| w.0 < horizon) {
                ready.extend(f.waiting.pop_front());
            }
            ready
        };
        for (_, reply, value) in ready {
            let _ = reply.send(value);
        }
    }

    /// The commit of events from `from` on failed: they will never be published, and the
    /// answers that wait for them are answered `Unavailable`.
    fn fail(&self, from: u64, why: &Unavailable) {
        self.flight.lock().expect("publication").failed_from = Some((from, why.clone()));
        self.drop_from(from, why);
    }
}

/// Counts the acknowledgements of one event's publication: one from each other shard, and
/// one from a new channel's partition once it has committed the first members.
struct Publishing {
    left: AtomicUsize,
    event: u64,
    publication: Arc<Publication>,
}

impl Ack for Publishing {
    fn done(&self) {
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.publication.published(self.event);
        }
    }
}

struct Decided {
    record: MetaRecord,
    payload: Vec<u8>,
    /// The event's number.
    number: u64,
}

/// What deciding one command gave: an event to commit (its answer waits for its
/// publication), or an answer that stores nothing.
enum Decision {
    Event(Decided),
    Answer(Reply<MetaOutcome>, Result<MetaOutcome, EngineError>),
}

impl<E: Env> MetaOwner<E> {
    pub(crate) async fn run(self, mut rx: mpsc::Receiver<MetaMsg>) {
        let mut tick = Vec::new();
        let mut reads = Vec::new();
        let mut consumers = crate::consumer::Waiters::default();
        loop {
            let first = {
                let next = rx.next();
                let grown = std::pin::pin!(async {
                    if self.failed.borrow().is_some() {
                        std::future::pending::<()>().await
                    }
                    self.log.grown(self.applied.get()).await
                });
                match futures::future::select(next, grown).await {
                    futures::future::Either::Left((msg, _)) => msg,
                    futures::future::Either::Right(_) => {
                        // Another node's leader committed events: apply and publish them,
                        // and answer the consumers waiting for them.
                        self.follow().await;
                        let end = self.log.next_offset();
                        for waiter in consumers.ready(end) {
                            crate::consumer::answer(&self.log, waiter, META_LOG).await;
                        }
                        continue;
                    }
                }
            };
            let Some(first) = first else { break };
            let mut next = Some(first);
            while let Some(msg) = next.take() {
                match msg {
                    MetaMsg::Request(r) => tick.push(r),
                    MetaMsg::Committed(w) => reads.push(w),
                }
                if tick.len() < super::partition::TICK_REQUESTS_MAX {
                    next = rx.try_recv().ok();
                }
            }
            self.tick(std::mem::take(&mut tick)).await;
            // Consumers read committed events only: after the tick's commit.
            let end = self.log.next_offset();
            reads.extend(consumers.ready(end));
            for waiter in reads.drain(..) {
                if waiter.parks_at(end) {
                    consumers.park(waiter);
                } else {
                    crate::consumer::answer(&self.log, waiter, META_LOG).await;
                }
            }
        }
        let _ = self.log.close().await;
    }

    async fn tick(&self, requests: Vec<MetaRequest>) {
        // What the log holds beyond the state first: the leader decides against every
        // committed event, and a follower refuses with its directory as current as it can.
        self.follow().await;
        if let Some(why) = self.failed.borrow().clone() {
            for req in requests {
                let _ = req.into_reply().send(Err(why.clone().into()));
            }
            return;
        }
        let leading = match self.log.leading() {
            Leading::Yes if self.applied.get() == self.log.next_offset() => Leading::Yes,
            Leading::Yes => Leading::No { leader: None },
            other => other,
        };
        let (barriers, requests): (Vec<_>, Vec<_>) = requests
            .into_iter()
            .partition(|r| matches!(r, MetaRequest::Barrier { .. }));
        self.barriers(barriers).await;
        if let Leading::No { leader } = leading {
            let why = Unavailable::MetaNotLeader { leader };
            for req in requests {
                let _ = req.into_reply().send(Err(why.clone().into()));
            }
            return;
        }
        let mut decided = Vec::new();
        for req in requests {
            match self.decide(req) {
                Decision::Event(d) => decided.push(d),
                Decision::Answer(reply, value) => {
                    self.publication.answer(self.last_event.get(), reply, value);
                }
            }
        }
        let Some(first) = decided.first().map(|d| d.number) else {
            return;
        };
        let entries: Vec<Entry<'_>> = decided
            .iter()
            .map(|d| Entry {
                timestamp_us: d.record.at_us,
                payload: &d.payload,
            })
            .collect();
        let committed = self.log.commit(&entries).await;
        let committed = match committed {
            Ok(range) if range.start == self.applied.get() => Ok(range),
            // Something else reached the log first: decided against another state.
            Ok(_) => Err(CommitError::Lost { may_commit: true }),
            Err(e) => Err(e),
        };
        match committed {
            Ok(range) => self.applied.set(range.end),
            Err(e @ CommitError::Failed(_)) => {
                // The state holds events the log does not: stop, as a partition does,
                // until the engine is reopened and replays the log.
                let why = Unavailable::MetaStopped(e);
                self.publication.fail(first, &why);
                *self.failed.borrow_mut() = Some(why);
                return;
            }
            Err(CommitError::NotLeader { leader }) => {
                return self.rebuild(first, leader).await;
            }
            Err(CommitError::Lost { .. }) => return self.rebuild(first, None).await,
        }
        for d in decided {
            self.publish(d).await;
        }
    }

    /// Answers directory barriers: the owner first passes its group's read barrier (a
    /// leader at once under its lease) and applies and publishes what that let in; then
    /// each is answered once every event applied here is published to every shard (the
    /// leader's own answers wait the same way). An owner that cannot pass the read barrier
    /// answers `MetaNotLeader`.
    async fn barriers(&self, barriers: Vec<MetaRequest>) {
        if barriers.is_empty() {
            return;
        }
        // A leader passes it too: under its lease at once, and otherwise by a read index,
        // which a deposed leader cannot pass.
        if let Err(e) = self.log.read_barrier().await {
            let leader = match e {
                CommitError::NotLeader { leader } => leader,
                _ => None,
            };
            let why = Unavailable::MetaNotLeader { leader };
            for b in barriers {
                let _ = b.into_reply().send(Err(why.clone().into()));
            }
            return;
        }
        self.follow().await;
        for b in barriers {
            let current = Ok(MetaOutcome::Current);
            self.publication
                .answer(self.last_event.get(), b.into_reply(), current);
        }
    }

    /// The leadership went before the tick's events (numbered from `first`) committed:
    /// the owner's state holds them and the log does not. The state is rebuilt from the
    /// log (the other shards only ever got committed events), and their answers are
    /// `MetaNotLeader`; an event that still commits comes back through the log.
    async fn rebuild(&self, first: u64, leader: Option<u64>) {
        let why = Unavailable::MetaNotLeader { leader };
        self.publication.drop_from(first, &why);
        self.last_event.set(first - 1);
        match replay(&self.log, self.partitions).await {
            Ok(state) => {
                *self.meta.borrow_mut() = state;
                self.applied.set(self.log.next_offset());
            }
            Err(e) => {
                eprintln!("chorus: the metadata owner stopped: {e}");
                let why = Unavailable::MetaStopped(CommitError::Failed(Arc::new(e)));
                self.publication.fail(first, &why);
                *self.failed.borrow_mut() = Some(why);
            }
        }
    }

    /// Applies what the log holds beyond the state (events another node's leader
    /// committed) and publishes each to the other shards, as the leader's own commits are.
    /// A record that is not a metadata event stops the owner.
    async fn follow(&self) {
        while self.failed.borrow().is_none() && self.applied.get() < self.log.next_offset() {
            let records = match self.log.read(self.applied.get(), 4 << 20).await {
                Ok(records) if !records.is_empty() => records,
                Ok(_) => {
                    return self.stop_following(format!(
                        "no record at {} before the end {}",
                        self.applied.get(),
                        self.log.next_offset()
                    ))
                }
                Err(e) => return self.stop_following(e.to_string()),
            };
            for r in records {
                let record = match event::decode(&r.payload) {
                    Ok(Decoded::Meta(rec)) => rec,
                    _ => {
                        return self
                            .stop_following(format!("offset {} is not a metadata event", r.offset))
                    }
                };
                self.meta.borrow_mut().apply(&record.event);
                let number = self.last_event.get() + 1;
                self.last_event.set(number);
                self.publication.begin(number);
                self.applied.set(r.offset + 1);
                self.publish(Decided {
                    record,
                    payload: Vec::new(),
                    number,
                })
                .await;
            }
        }
    }

    fn stop_following(&self, what: String) {
        let e = EngineError::from(Corrupt::Replay {
            log: META_LOG.into(),
            what,
        });
        eprintln!("chorus: the metadata owner stopped: {e}");
        let why = Unavailable::MetaStopped(CommitError::Failed(Arc::new(e)));
        self.publication.fail(self.last_event.get() + 1, &why);
        *self.failed.borrow_mut() = Some(why);
    }

    /// Decides and applies one command. An event's answer is queued at once, to go out
    /// when the event is published.
    fn decide(&self, req: MetaRequest) -> Decision {
        let mut meta = self.meta.borrow_mut();
        let (cmd, reply) = match req {
            // Answered by the tick before anything is decided.
            MetaRequest::Barrier { reply } => {
                return Decision::Answer(reply, Ok(MetaOutcome::Current));
            }
            MetaRequest::CreateUser {
                email,
                name,
                password_hash,
                reply,
            } => (
                Ok(MetaCommand::CreateUser {
                    email,
                    name,
                    password_hash,
                }),
                reply,
            ),
            MetaRequest::CreateWorkspace { user, name, reply } => (
                Ok(MetaCommand::CreateWorkspace { owner: user, name }),
                reply,
            ),
            MetaRequest::AddMember {
                user,
                workspace,
                email,
                reply,
            } => (
                meta.principal(user, workspace)
                    .map(|by| MetaCommand::AddMember { by, email }),
                reply,
            ),
            MetaRequest::CreateChannel {
                user,
                workspace,
                name,
                kind,
                reply,
            } => (
                meta.principal(user, workspace)
                    .map(|by| MetaCommand::CreateChannel { by, name, kind }),
                reply,
            ),
            MetaRequest::OpenDm {
                user,
                workspace,
                users,
                encrypted,
                reply,
            } => (
                meta.principal(user, workspace)
                    .map(|by| MetaCommand::OpenDm {
                        by,
                        users,
                        encrypted,
                    }),
                reply,
            ),
            MetaRequest::StoreFile {
                user,
                workspace,
                file,
                reply,
            } => (
                meta.principal(user, workspace)
                    .map(|by| MetaCommand::StoreFile {
                        by,
                        name: file.name,
                        size: file.size,
                        content_type: file.content_type,
                        sha256: file.sha256,
                        at_us: self.env.unix_us(),
                    }),
                reply,
            ),
            MetaRequest::RecordPreview { record, reply } => {
                (Ok(MetaCommand::RecordPreview { record: *record }), reply)
            }
            MetaRequest::AskCluster { nodes, reply } => {
                (Ok(MetaCommand::AskCluster { nodes }), reply)
            }
            MetaRequest::Notify { mut cmd, reply } => {
                // A device is stamped by the owner's clock, as a file is.
                if let NotifyCommand::AddDevice { at_us, .. } = &mut *cmd {
                    *at_us = self.env.unix_us();
                }
                (Ok(MetaCommand::Notify(*cmd)), reply)
            }
            MetaRequest::E2ee { mut cmd, reply } => {
                if let E2eeCommand::Register { at_us, .. }
                | E2eeCommand::SendToDevice { at_us, .. } = &mut *cmd
                {
                    *at_us = self.env.unix_us();
                }
                (Ok(MetaCommand::E2ee(*cmd)), reply)
            }
            MetaRequest::DeleteFile { user, file, reply } => {
                // A file of a workspace the user is not in is unknown to them.
                let workspace = meta.file_any(file).map(|e| e.stored.workspace);
                let by = workspace
                    .ok_or(DomainError::NotFound("file"))
                    .and_then(|w| meta.principal(user, w))
                    .map_err(|_| DomainError::NotFound("file"));
                (by.map(|by| MetaCommand::DeleteFile { by, file }), reply)
            }
        };
        let event = match cmd.and_then(|cmd| meta.decide(cmd)) {
            Err(e) => return Decision::Answer(reply, Err(e.into())),
            Ok(MetaDecision::Existing(c)) => {
                let view = meta
                    .channel(c)
                    .map(|c| ChannelView::new(c.id, c.workspace, &c.name, c.kind, 0))
                    .expect("existing channel");
                return Decision::Answer(reply, Ok(MetaOutcome::Channel(view, false)));
            }
            Ok(MetaDecision::E2ee(answer)) => {
                return Decision::Answer(reply, Ok(MetaOutcome::E2ee(answer)));
            }
            Ok(MetaDecision::New(e)) => e,
        };
        meta.apply(&event);
        let number = self.last_event.get() + 1;
        self.last_event.set(number);
        self.publication.begin(number);
        self.publication
            .answer(number, reply, Ok(outcome_of(&meta, &event)));
        let record = MetaRecord {
            at_us: self.env.unix_us(),
            event,
        };
        let payload = event::encode_meta(&record);
        Decision::Event(Decided {
            record,
            payload,
            number,
        })
    }

    /// Sends a committed event to every other shard, and a new channel's first members to
    /// its partition; their acknowledgements publish it.
    async fn publish(&self, d: Decided) {
        let others = self.routes.shard_count() as usize - 1;
        let new_channel = match &d.record.event {
            MetaEvent::ChannelCreated { channel, .. } => Some(*channel),
            _ => None,
        };
        // The owner's own shard applied the event when it was decided; its subscribers still
        // take the event's effects (to-device frames) before the event is published.
        let effects = super::to_device::has_effects(&d.record.event);
        let count = others + new_channel.is_some() as usize + effects as usize;
        if count == 0 {
            self.publication.published(d.number);
            return;
        }
        let ack: Arc<dyn Ack> = Arc::new(Publishing {
            left: AtomicUsize::new(count),
            event: d.number,
            publication: self.publication.clone(),
        });
        let record = Arc::new(d.record);
        if effects {
            let msg = ShardMsg::MetaEffects {
                record: record.clone(),
                ack: ack.clone(),
            };
            if self.routes.send(0, msg).await.is_err() {
                ack.done();
            }
        }
        for s in 1..self.routes.shard_count() {
            let msg = ShardMsg::MetaApplied {
                record: record.clone(),
                ack: ack.clone(),
            };
            if self.routes.send(s, msg).await.is_err() {
                ack.done();
            }
        }
        if let Some(c) = new_channel {
            let p = partition_of(c);
            if self.routes.owner(p) == 0 {
                let tx = self.local_partitions.borrow().get(&p).cloned();
                match tx {
                    Some(mut tx) => {
                        use futures::SinkExt;
                        let init = PartitionMsg::Init {
                            channel: c,
                            ack: Some(ack.clone()),
                        };
                        if tx.send(init).await.is_err() {
                            ack.done();
                        }
                    }
                    None => ack.done(),
                }
            }
        }
    }
}

/// Answers a message the owner will not serve.
pub(crate) fn fail(msg: MetaMsg, why: &Unavailable) {
    match msg {
        MetaMsg::Request(req) => {
            let _ = req.into_reply().send(Err(why.clone().into()));
        }
        MetaMsg::Committed(waiter) => {
            let _ = waiter.reply.send(Err(why.clone().into()));
        }
    }
}

impl MetaRequest {
    /// The reply of any request, to refuse it.
    fn into_reply(self) -> Reply<MetaOutcome> {
        match self {
            MetaRequest::CreateUser { reply, .. }
            | MetaRequest::CreateWorkspace { reply, .. }
            | MetaRequest::AddMember { reply, .. }
            | MetaRequest::CreateChannel { reply, .. }
            | MetaRequest::OpenDm { reply, .. }
            | MetaRequest::StoreFile { reply, .. }
            | MetaRequest::DeleteFile { reply, .. }
            | MetaRequest::RecordPreview { reply, .. }
            | MetaRequest::Notify { reply, .. }
            | MetaRequest::E2ee { reply, .. }
            | MetaRequest::AskCluster { reply, .. }
            | MetaRequest::Barrier { reply } => reply,
        }
    }
}

fn outcome_of(meta: &MetaState, e: &MetaEvent) -> MetaOutcome {
    match e {
        MetaEvent::UserCreated { user, .. } => {
            MetaOutcome::User(meta.user(*user).map(UserView::from).expect("created user"))
        }
        MetaEvent::WorkspaceCreated {
            workspace, name, ..
        } => MetaOutcome::Workspace(WorkspaceView {
            id: *workspace,
            name: name.clone(),
        }),
        MetaEvent::MemberAdded { user, role, .. } => MetaOutcome::Member(
            meta.user(*user)
                .map(|u| MemberView::new(u, *role))
                .expect("added user"),
        ),
        MetaEvent::ChannelCreated {
            channel,
            workspace,
            name,
            kind,
            members,
            ..
        } => MetaOutcome::Channel(
            ChannelView::new(*channel, *workspace, name, *kind, members.len() as u64),
            true,
        ),
        MetaEvent::FileStored(stored) => MetaOutcome::File(
            meta.file_any(stored.file)
                .map(FileView::from)
                .expect("stored file"),
        ),
        MetaEvent::PreviewMade(record) => MetaOutcome::File(
            meta.file_any(record.file)
                .map(FileView::from)
                .expect("previewed file"),
        ),
        MetaEvent::FileDeleted { file, .. } => MetaOutcome::File(
            meta.file_any(*file)
                .map(FileView::from)
                .expect("deleted file"),
        ),
        MetaEvent::Notify(change) => MetaOutcome::Notify(match &**change {
            NotifyChange::Prefs { prefs, .. } => NotifyOutcome::Prefs(prefs.clone()),
            NotifyChange::Channel { channel, prefs, .. } => {
                NotifyOutcome::Channel(ChannelPrefsView {
                    channel: *channel,
                    prefs: *prefs,
                })
            }
            NotifyChange::DeviceAdded(d) => NotifyOutcome::Device(d.clone()),
            NotifyChange::DeviceRemoved { .. } => NotifyOutcome::DeviceRemoved,
        }),
        MetaEvent::E2ee(change) => MetaOutcome::E2ee(match &**change {
            E2eeChange::DeviceRegistered { .. } => E2eeOutcome::Registered,
            E2eeChange::KeysUploaded { user, device, .. } => {
                E2eeOutcome::KeyCount(meta.e2ee().unclaimed(*user, device))
            }
            E2eeChange::KeysClaimed { keys, .. } => E2eeOutcome::Claimed(keys.clone()),
            E2eeChange::DeviceRemoved { .. } => E2eeOutcome::Removed,
            E2eeChange::ToDeviceSent { .. } => E2eeOutcome::ToDeviceSent,
            E2eeChange::ToDeviceAcked { .. } => E2eeOutcome::ToDeviceAcked,
        }),
        MetaEvent::ClusterAsked(ask) => MetaOutcome::ClusterAsked(ask.number),
    }
}
