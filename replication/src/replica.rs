//! One group on this node as a running task: what its owner (a shard) talks to.
//!
//! The owner hands in what the transport delivers ([`Replica::step`], [`Replica::lost`])
//! and proposes ([`Replica::propose`]), and a task of its own on the same executor
//! ([`Replica::run`]) does the rest: it ticks raft-rs on a timer, steps it, runs the
//! [`Group`]'s `Ready` loop, and answers each proposal once its entry is applied or can
//! no longer be. The task sleeps until there is input or the next tick is due; it never
//! polls.
//!
//! What a proposal's answer means:
//! - `Ok(index)`: the entry is committed (durable on a majority) and applied here, at
//!   `index` ([`Replica::propose_applied`] also gives what the state machine made of it:
//!   [`StateMachine::outcome`]);
//! - [`ProposeError::NotLeader`]: nothing was proposed; try the leader it names;
//! - [`ProposeError::Dropped`]: the entry is certainly not committed (raft-rs refused it,
//!   or a new leader's entry took its index), so sending it again is safe;
//! - [`ProposeError::Uncertain`]: this node stopped leading, or stopped, before the entry
//!   was applied; it may or may not be committed, like a client's timed-out request. Only
//!   an idempotent retry is safe.
//!
//! Invariant: a proposal is answered `Ok` only after the state machine applied its entry,
//! and only if the entry applied at its index is the one proposed (same index and term).

use crate::clock::{SharedClock, SystemClock};
use crate::group::{Applied, Group, StateMachine};
use crate::raft_log::RaftLogError;
use chorus_log::Storage;
use futures::channel::oneshot;
use futures::future::LocalBoxFuture;
use raft::eraftpb::{Message, MessageType};
use raft::{ProgressState, SnapshotStatus, StateRole};
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

/// Why a proposal was not answered with its index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    /// This node does not lead the group; nothing was proposed.
    #[error("this node does not lead the group (leader: {leader:?})")]
    NotLeader {
        /// The leader this node knows of, if any.
        leader: Option<u64>,
    },
    /// The entry is certainly not committed.
    #[error("the proposal was dropped: it is not committed")]
    Dropped,
    /// The entry may or may not be committed.
    #[error("leadership was lost before the proposal was applied: it may or may not be committed")]
    Uncertain,
}

/// What the owner sees of the group, updated after every turn of the task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// This node's role.
    pub role: StateRole,
    /// The leader this node knows of (0: none).
    pub leader: u64,
    /// The current term.
    pub term: u64,
    /// The last index applied here.
    pub applied: u64,
    /// This node leads, and has applied the first entry of its term: every entry of an
    /// earlier term that will ever be committed is applied here, so what it decides now
    /// is decided against all of them.
    pub current: bool,
    /// The task has ended (stopped, or a storage error: the group must be reopened).
    pub ended: bool,
}

/// How the task stops (the more urgent first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stop {
    /// At once.
    Now,
    /// Once leadership is handed to another voter (or this node does not lead, or a
    /// transfer did not finish within [`HAND_OFF_TIMEOUT`]).
    AfterHandOff,
}

/// How long a stopping leader waits for its leadership to move before stopping anyway
/// (raft-rs gives up a transfer after an election timeout).
pub const HAND_OFF_TIMEOUT: Duration = Duration::from_secs(2);

type Answer = oneshot::Sender<Result<u64, ProposeError>>;
/// A proposal's answer: its entry as applied.
type Proposed = oneshot::Sender<Result<Applied, ProposeError>>;

#[derive(Default)]
struct Inputs {
    messages: Vec<Message>,
    lost: Vec<(u64, Message)>,
    proposals: Vec<(Vec<u8>, Proposed)>,
    reads: Vec<Answer>,
    stop: Option<Stop>,
}

impl Inputs {
    fn is_empty(&self) -> bool {
        self.messages.is_empty()
            && self.lost.is_empty()
            && self.proposals.is_empty()
            && self.reads.is_empty()
            && self.stop.is_none()
    }
}

/// How long a read index may take to be confirmed by the leader and applied here before
/// the read is refused (`NotLeader`): the leader was unknown, lost, or had not yet
/// committed an entry of its term.
pub const READ_INDEX_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a read index may go unconfirmed before it is asked again (with a new
/// context): raft-rs does not resend one whose messages were lost, as they are while a
/// link comes back after a cut.
pub const READ_INDEX_RETRY: Duration = Duration::from_millis(150);

/// A read index waiting: for raft-rs to confirm it, then for the group to apply it.
struct Reading {
    deadline: Instant,
    /// When it was last asked of raft-rs.
    asked_at: Instant,
    answer: Answer,
}

/// The owner's side of a running group.
pub struct Replica {
    group_id: u64,
    inputs: RefCell<Inputs>,
    waker: RefCell<Option<Waker>>,
    status: Cell<Status>,
    /// The node that should lead, if not whichever won the election.
    preferred: Cell<Option<u64>>,
    /// The group's voters as of the task's last turn.
    voters: RefCell<Vec<u64>>,
    /// The group's learners as of the task's last turn.
    learners: RefCell<Vec<u64>>,
    /// The nodes the group is to be placed on, once asked ([`Replica::place_on`]).
    target: RefCell<Option<Vec<u64>>>,
    /// How this node asks a peer for the group's events (set by the node).
    fetch: RefCell<Option<Fetch>>,
    /// How this node reads the group's events for a peer (set by the state machine's
    /// owner).
    source: RefCell<Option<Source>>,
    /// The time the task runs on.
    clock: SharedClock,
    /// This node's lease as leader, (term, until): no other node can be elected before
    /// `until` (see [`Replica::leases`]).
    lease: Cell<Option<(u64, Instant)>>,
    /// How long a confirmed read index makes a lease last (set when the task starts).
    lease_length: Cell<Duration>,
    /// When a read index was last asked only to renew the lease.
    renew_asked: Cell<Option<Instant>>,
    /// This replica's life, in its read indexes' contexts ([`incarnation`]).
    incarnation: u64,
}

/// A number no other replica of this process, nor of an earlier process on this
/// machine, has: the wall clock's nanoseconds when the process first asked, plus how many
/// replicas it made before.
fn incarnation() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static STARTED: OnceLock<u64> = OnceLock::new();
    static MADE: AtomicU64 = AtomicU64::new(0);
    let started = *STARTED.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    started.wrapping_add(MADE.fetch_add(1, Ordering::Relaxed))
}

/// Asks a peer for a group's events: (peer, from, to) → a batch
/// ([`crate::event_log::encode_batch`]) of what the peer holds from `from` on, before `to`.
pub type Fetch = Rc<dyn Fn(u64, u64, u64) -> LocalBoxFuture<'static, std::io::Result<Vec<u8>>>>;

/// Reads this node's events of a group for a peer: (from, to) → a batch of what it holds
/// from `from` on, before `to` (none if it does not hold `from`).
pub type Source = Rc<dyn Fn(u64, u64) -> LocalBoxFuture<'static, Vec<u8>>>;

/// Whether `m` asks for a vote (or a pre-vote) in an election, not in a hand-off.
fn asks_vote(m: &Message) -> bool {
    matches!(
        m.get_msg_type(),
        MessageType::MsgRequestVote | MessageType::MsgRequestPreVote
    ) && m.context.as_ref() as &[u8] != raft::CAMPAIGN_TRANSFER
}

/// How long a leader waits before it tries again to hand its leadership to the preferred
/// node, after a try that did not take.
pub const PREFER_RETRY: Duration = Duration::from_secs(2);

/// How long a leader waits for a follower it sent a snapshot to before it takes the
/// snapshot as lost and probes the follower again. raft-rs sends a follower nothing more
/// while its snapshot is out, and learns it arrived only from the follower's answer: if that
/// answer is lost (a connection that broke after the snapshot was written), the follower
/// would be left behind until the next change of leader.
pub const SNAPSHOT_ANSWER_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a leader waits before it tries a membership step again ([`Replica::place_on`]):
/// a change raft-rs dropped, or a hand-off that did not take.
pub const TARGET_RETRY: Duration = Duration::from_millis(500);

impl Replica {
    /// A replica of group `group_id`, not running yet: the transport can be given it
    /// before [`Replica::run`] starts. It runs on the system's clock.
    pub fn new(group_id: u64) -> Rc<Replica> {
        Replica::with_clock(group_id, Rc::new(SystemClock))
    }

    /// [`Replica::new`] on `clock` (a simulated one).
    pub fn with_clock(group_id: u64, clock: SharedClock) -> Rc<Replica> {
        Rc::new(Replica {
            group_id,
            inputs: RefCell::default(),
            waker: RefCell::new(None),
            status: Cell::new(Status {
                role: StateRole::Follower,
                leader: 0,
                term: 0,
                applied: 0,
                current: false,
                ended: false,
            }),
            preferred: Cell::new(None),
            voters: RefCell::default(),
            learners: RefCell::default(),
            target: RefCell::new(None),
            fetch: RefCell::new(None),
            source: RefCell::new(None),
            clock,
            lease: Cell::new(None),
            lease_length: Cell::new(Duration::ZERO),
            renew_asked: Cell::new(None),
            incarnation: incarnation(),
        })
    }

    /// The time the replica runs on.
    pub fn now(&self) -> Instant {
        self.clock.now()
    }

    /// Completes once `duration` has passed on the replica's clock.
    pub fn sleep(&self, duration: Duration) -> LocalBoxFuture<'static, ()> {
        self.clock.sleep(duration)
    }

    /// Sets how this node asks a peer for the group's events (the node's transport).
    pub fn set_fetch(&self, fetch: Fetch) {
        *self.fetch.borrow_mut() = Some(fetch);
    }

    /// Asks `peer` for the group's events from `from` on, before `to` (see [`Fetch`]).
    pub async fn fetch_events(&self, peer: u64, from: u64, to: u64) -> std::io::Result<Vec<u8>> {
        let fetch = self.fetch.borrow().clone();
        match fetch {
            Some(f) => f(peer, from, to).await,
            None => Err(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "this replica has no way to reach its peers",
            )),
        }
    }

    /// Sets how this node reads the group's events for a peer.
    pub fn set_source(&self, source: Source) {
        *self.source.borrow_mut() = Some(source);
    }

    /// This node's events of the group from `from` on, before `to`, for a peer (see
    /// [`Source`]); none if there is no source.
    pub async fn serve_events(&self, from: u64, to: u64) -> Vec<u8> {
        let source = self.source.borrow().clone();
        match source {
            Some(s) => s(from, to).await,
            None => crate::event_log::encode_batch(&[]),
        }
    }

    /// Whether the task was asked to stop.
    pub fn stop_asked(&self) -> bool {
        self.inputs.borrow().stop.is_some()
    }

    /// Names the node that should lead the group. A leader that is not that node hands its
    /// leadership over once that node holds every entry the leader has (so the hand-over
    /// costs no catch-up), and tries again [`PREFER_RETRY`] after a try that did not take;
    /// it looks at each tick. How leaderships are spread over the nodes (see [`crate::placement`]).
    pub fn prefer(&self, node: Option<u64>) {
        self.preferred.set(node);
    }

    /// The group's id.
    pub fn group_id(&self) -> u64 {
        self.group_id
    }

    /// The group as of the task's last turn.
    pub fn status(&self) -> Status {
        self.status.get()
    }

    /// The group's voters as of the task's last turn.
    pub fn voters(&self) -> Vec<u64> {
        self.voters.borrow().clone()
    }

    /// The group's learners as of the task's last turn.
    pub fn learners(&self) -> Vec<u64> {
        self.learners.borrow().clone()
    }

    /// Asks that the group be placed over `nodes` ([`crate::placement`]): while this node
    /// leads, it walks the group's configuration there one change at a time
    /// ([`crate::membership`]), looking at each tick, and the group's preferred leader
    /// becomes placement's first voter over `nodes`.
    pub fn place_on(&self, nodes: Vec<u64>) {
        let voters = crate::placement::replicas(self.group_id as u32, &nodes);
        self.preferred.set(voters.first().copied());
        *self.target.borrow_mut() = Some(nodes);
    }

    /// A message from a peer, for this group.
    pub fn step(&self, msg: Message) {
        self.input(|i| i.messages.push(msg));
    }

    /// A message this node sent that will not arrive.
    pub fn lost(&self, peer: u64, msg: Message) {
        self.input(|i| i.lost.push((peer, msg)));
    }

    /// Proposes `data` as the next entry and waits until it is applied here (or can no
    /// longer be; see the module's documentation). Answers `NotLeader` at once on a node
    /// that did not lead at the task's last turn.
    pub async fn propose(&self, data: Vec<u8>) -> Result<u64, ProposeError> {
        self.propose_applied(data).await.map(|a| a.index)
    }

    /// [`Replica::propose`], answering with the entry as applied: its index, term and what
    /// the state machine made of it.
    pub async fn propose_applied(&self, data: Vec<u8>) -> Result<Applied, ProposeError> {
        let status = self.status.get();
        if status.ended {
            // Its last word on the leader may be itself.
            return Err(ProposeError::NotLeader { leader: None });
        }
        if status.role != StateRole::Leader {
            return Err(ProposeError::NotLeader {
                leader: (status.leader != 0).then_some(status.leader),
            });
        }
        let (tx, rx) = oneshot::channel();
        self.input(|i| i.proposals.push((data, tx)));
        // The task answers every proposal it takes, and those left when it ends are
        // dropped with it: whether they were taken is unknown.
        rx.await.unwrap_or(Err(ProposeError::Uncertain))
    }

    /// Waits until every entry committed before the call is applied here (Raft's read
    /// index, confirmed by the leader, which answers from its lease), and returns the index
    /// applied. `NotLeader` when no leader is known or it did not confirm within
    /// [`READ_INDEX_TIMEOUT`].
    pub async fn read_index(&self) -> Result<u64, ProposeError> {
        if self.status.get().ended {
            return Err(ProposeError::NotLeader { leader: None });
        }
        if self.leases() {
            // No other leader can have been elected: every acknowledged entry was
            // acknowledged here, and applied here first.
            self.renew_lease_if_due();
            return Ok(self.status.get().applied);
        }
        let (tx, rx) = oneshot::channel();
        self.input(|i| i.reads.push(tx));
        rx.await
            .unwrap_or(Err(ProposeError::NotLeader { leader: None }))
    }

    /// Whether this node leads the group, current in its term, under a lease: a read index
    /// it confirmed (a round of heartbeats a majority answered) was asked less than
    /// [`Replica::lease_length`] ago. Each voter that answered ignores vote requests for an
    /// election timeout after (raft-rs's check-quorum rule), a restarted voter grants no
    /// vote for an election timeout after it starts, and a leader that hands its leadership
    /// off or changes the membership drops its lease first: so no other node can lead
    /// before the lease ends, and this node's state holds every acknowledged entry. The
    /// time is the monotonic clock's, which runs on while a process is paused: a leader
    /// that wakes from SIGSTOP finds its lease over.
    ///
    /// Architecture invariant: a leader answers reads from its own state only under its
    /// lease; otherwise through a read index like any node.
    pub fn leases(&self) -> bool {
        let status = self.status.get();
        if status.ended || !status.current {
            return false;
        }
        matches!(self.lease.get(), Some((term, until)) if term == status.term && self.now() < until)
    }

    /// How long a confirmed read index keeps the lease: 9/10 of the election timeout less
    /// a tick (a follower's first tick after it heard from the leader may come at once).
    pub fn lease_length(&self) -> Duration {
        self.lease_length.get()
    }

    /// Asks a read index of the leader's own, to renew its lease before it ends, once the
    /// lease is half spent (at most one every [`READ_INDEX_RETRY`]).
    fn renew_lease_if_due(&self) {
        let Some((_, until)) = self.lease.get() else {
            return;
        };
        let now = self.now();
        if until.saturating_duration_since(now) > self.lease_length() / 2 {
            return;
        }
        if self
            .renew_asked
            .get()
            .is_some_and(|at| now.saturating_duration_since(at) < READ_INDEX_RETRY)
        {
            return;
        }
        self.renew_asked.set(Some(now));
        // Nobody waits for the answer: the task renews the lease when raft-rs confirms.
        let (tx, _) = oneshot::channel();
        self.input(|i| i.reads.push(tx));
    }

    /// Stops the task at once. Pending proposals are answered `Uncertain`.
    pub fn stop(&self) {
        self.input(|i| i.stop = Some(Stop::Now));
    }

    /// Stops the task once this node's leadership has moved to another voter, so that
    /// writes wait for one election at most, not for an election timeout.
    pub fn stop_after_hand_off(&self) {
        self.input(|i| {
            i.stop.get_or_insert(Stop::AfterHandOff);
        });
    }

    fn input(&self, f: impl FnOnce(&mut Inputs)) {
        f(&mut self.inputs.borrow_mut());
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// Waits until there is input, or `until`.
    async fn wait(&self, until: Instant) {
        let input = std::future::poll_fn(|cx| {
            if self.inputs.borrow().is_empty() {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        });
        let timer = self.sleep(until.saturating_duration_since(self.now()));
        futures::future::select(std::pin::pin!(input), timer).await;
    }

    /// Runs the group until [`Replica::stop`] (or a storage error), ticking raft-rs every
    /// `tick`; `send` gets each message for a peer. Returns the group, to be closed or
    /// looked at.
    pub async fn run<S: Storage, M: StateMachine>(
        self: Rc<Self>,
        mut group: Group<S, M>,
        tick: Duration,
        mut send: impl FnMut(Message),
    ) -> Result<Group<S, M>, RaftLogError> {
        group.track_applied(true);
        let election_ticks = group.raw_ref().raft.election_timeout() as u32;
        let election_timeout = tick * election_ticks;
        self.lease_length
            .set(tick * election_ticks.saturating_sub(1) * 9 / 10);
        self.lease.set(None);
        // Votes this node refuses until then (see [`Replica::leases`]).
        let quiet_until = self.now() + election_timeout;
        // A snapshot installed before a restart may be ahead of the state machine (see
        // [`StateMachine::catch_up`]); the voters are known from here on.
        self.publish(&group, false);
        group.machine_mut().catch_up().await?;
        let mut pending: BTreeMap<u64, (u64, Proposed)> = BTreeMap::new();
        let mut next_tick = self.now() + tick;
        let mut handing_off: Option<Instant> = None;
        let mut stopping: Option<Stop> = None;
        let mut preferred_tried: Option<Instant> = None;
        let mut target_tried: Option<Instant> = None;
        // Read indexes asked of raft-rs, by request context; and those it confirmed, with
        // the index to apply before answering.
        let mut asked: BTreeMap<u64, Reading> = BTreeMap::new();
        // Reads that came while no leader was known: asked once one is.
        let mut unasked: Vec<Reading> = Vec::new();
        let mut confirmed: Vec<(u64, Reading)> = Vec::new();
        let mut next_read: u64 = 0;
        // Followers a snapshot was sent to, since when (see [`SNAPSHOT_ANSWER_TIMEOUT`]).
        let mut snapshots_out: BTreeMap<u64, Instant> = BTreeMap::new();
        let result = loop {
            self.wait(next_tick).await;
            let inputs = std::mem::take(&mut *self.inputs.borrow_mut());
            if let Some(how) = inputs.stop {
                stopping = Some(stopping.map_or(how, |was| was.min(how)));
            }
            let stop_now = match stopping {
                None => false,
                Some(Stop::Now) => true,
                Some(Stop::AfterHandOff) if !group.is_leader() => true,
                Some(Stop::AfterHandOff) => match handing_off {
                    None => {
                        self.lease.set(None);
                        group.hand_off_leadership();
                        handing_off = Some(self.now());
                        false
                    }
                    Some(at) => self.now().saturating_duration_since(at) > HAND_OFF_TIMEOUT,
                },
            };
            if stop_now {
                // Answered below, with those that came after this turn.
                let mut left = self.inputs.borrow_mut();
                left.proposals.extend(inputs.proposals);
                left.reads.extend(inputs.reads);
                break Ok(());
            }
            let quiet = self.now() < quiet_until;
            for m in inputs.messages {
                if quiet && asks_vote(&m) {
                    // A lease this node granted before it restarted may still run: it
                    // votes for nobody (and so does not learn the term) for an election
                    // timeout after it starts. A hand-off is the leader's own doing.
                    continue;
                }
                // A message raft-rs refuses (of another group's term, or garbled in a way
                // the frame checksum missed) changes nothing; Raft tolerates its loss.
                let _ = group.raw().step(m);
            }
            if !group.is_leader() {
                self.lease.set(None);
            }
            for (peer, m) in inputs.lost {
                group.raw().report_unreachable(peer);
                if m.get_msg_type() == MessageType::MsgSnapshot {
                    group.raw().report_snapshot(peer, SnapshotStatus::Failure);
                }
            }
            let now = self.now();
            unasked.extend(inputs.reads.into_iter().map(|answer| Reading {
                deadline: now + READ_INDEX_TIMEOUT,
                asked_at: now,
                answer,
            }));
            let leader_known = group.raw_ref().raft.leader_id != 0;
            for mut reading in std::mem::take(&mut unasked) {
                if !leader_known {
                    if now >= reading.deadline {
                        let refusal = Err(ProposeError::NotLeader { leader: None });
                        let _ = reading.answer.send(refusal);
                    } else {
                        unasked.push(reading);
                    }
                    continue;
                }
                next_read += 1;
                // The leader keys pending reads by their context, and answers a request
                // whose context is pending already with the pending one's index: this
                // node's id makes it unique across the nodes that ask, the incarnation
                // across this replica's lives (a restarted node's first reads were
                // answered with the index of a request its previous life left pending,
                // long stale: cluster seeds 15984 and 39814).
                let me = group.raw_ref().raft.id;
                let ctx = [me, self.incarnation, next_read].map(u64::to_le_bytes);
                group.raw().read_index(ctx.concat());
                reading.asked_at = now;
                asked.insert(next_read, reading);
            }
            for (data, answer) in inputs.proposals {
                if !group.is_leader() || handing_off.is_some() {
                    let leader = group.raw_ref().raft.leader_id;
                    let leader = (leader != 0 && !group.is_leader()).then_some(leader);
                    let _ = answer.send(Err(ProposeError::NotLeader { leader }));
                    continue;
                }
                match group.raw().propose(Vec::new(), data) {
                    Ok(()) => {
                        let raft = &group.raw_ref().raft;
                        let index = raft.raft_log.last_index();
                        pending.insert(index, (raft.term, answer));
                    }
                    Err(_) => {
                        let _ = answer.send(Err(ProposeError::Dropped));
                    }
                }
            }
            if self.now() >= next_tick {
                group.raw().tick();
                next_tick = self.now() + tick;
            }
            if stopping.is_none() {
                self.move_to_preferred(&mut group, &mut preferred_tried);
                self.move_to_target(&mut group, &mut target_tried);
            }
            let mut failed = None;
            loop {
                match group
                    .on_ready(&mut |msgs| msgs.into_iter().for_each(&mut send))
                    .await
                {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            if failed.is_none() {
                failed = group.tend().await.err();
            }
            self.give_up_lost_snapshots(&mut group, &mut snapshots_out);
            for applied in group.take_applied() {
                let Applied { index, term, .. } = applied;
                // Entries below the oldest pending proposal are others' (or a previous
                // term's of this node, answered already).
                while let Some(entry) = pending.first_entry() {
                    if *entry.key() > index {
                        break;
                    }
                    let (at, (proposed_term, answer)) = entry.remove_entry();
                    let _ = answer.send(if at == index && proposed_term == term {
                        Ok(applied)
                    } else if at == index {
                        Err(ProposeError::Dropped)
                    } else {
                        // Passed over: an entry at `at` was applied unseen (a snapshot).
                        Err(ProposeError::Uncertain)
                    });
                }
            }
            for state in group.take_read_states() {
                let word = |at: usize| {
                    let bytes = state.request_ctx.get(at..at + 8)?;
                    Some(u64::from_le_bytes(bytes.try_into().ok()?))
                };
                let ctx = word(16).filter(|_| word(8) == Some(self.incarnation));
                if let Some(reading) = ctx.and_then(|c| asked.remove(&c)) {
                    self.extend_lease(&group, reading.asked_at, handing_off.is_some());
                    confirmed.push((state.index, reading));
                }
            }
            self.answer_reads(&group, &mut asked, &mut confirmed, &mut unasked);
            if let Some(e) = failed {
                break Err(e);
            }
            if !group.is_leader() {
                for (_, (_, answer)) in std::mem::take(&mut pending) {
                    let _ = answer.send(Err(ProposeError::Uncertain));
                }
            }
            self.publish(&group, false);
        };
        for (_, (_, answer)) in pending {
            let _ = answer.send(Err(ProposeError::Uncertain));
        }
        // Proposals that came after the last turn were never proposed.
        for (_, answer) in std::mem::take(&mut self.inputs.borrow_mut().proposals) {
            let _ = answer.send(Err(ProposeError::Dropped));
        }
        let reads = std::mem::take(&mut self.inputs.borrow_mut().reads);
        let waiting =
            (asked.into_values().chain(unasked)).chain(confirmed.into_iter().map(|(_, r)| r));
        for answer in reads.into_iter().chain(waiting.map(|r| r.answer)) {
            let _ = answer.send(Err(ProposeError::NotLeader { leader: None }));
        }
        self.publish(&group, true);
        result.map(|()| group)
    }

    /// A read index asked at `asked_at` was confirmed: on a leader, a majority answered
    /// heartbeats sent after that, so its lease runs to `asked_at` and
    /// [`Replica::lease_length`] (unless it is handing its leadership off).
    fn extend_lease<S: Storage, M: StateMachine>(
        &self,
        group: &Group<S, M>,
        asked_at: Instant,
        handing_off: bool,
    ) {
        let raft = &group.raw_ref().raft;
        if !group.is_leader()
            || handing_off
            || raft.lead_transferee.is_some()
            || raft.has_pending_conf()
        {
            return;
        }
        let until = asked_at + self.lease_length();
        let longer = match self.lease.get() {
            Some((term, was)) if term == raft.term => until > was,
            _ => true,
        };
        if longer {
            self.lease.set(Some((raft.term, until)));
        }
    }

    /// Answers the confirmed read indexes the group has applied, refuses those past their
    /// deadline, and puts those unconfirmed for [`READ_INDEX_RETRY`] back to be asked
    /// again.
    fn answer_reads<S: Storage, M: StateMachine>(
        &self,
        group: &Group<S, M>,
        asked: &mut BTreeMap<u64, Reading>,
        confirmed: &mut Vec<(u64, Reading)>,
        unasked: &mut Vec<Reading>,
    ) {
        if asked.is_empty() && confirmed.is_empty() {
            return;
        }
        let (now, applied) = (self.now(), group.applied());
        let leader = group.raw_ref().raft.leader_id;
        let refusal = ProposeError::NotLeader {
            leader: (leader != 0 && !group.is_leader()).then_some(leader),
        };
        for (index, reading) in std::mem::take(confirmed) {
            if index <= applied {
                let _ = reading.answer.send(Ok(index));
            } else if now >= reading.deadline {
                let _ = reading.answer.send(Err(refusal));
            } else {
                confirmed.push((index, reading));
            }
        }
        let late: Vec<u64> = asked
            .iter()
            .filter(|(_, r)| now >= r.deadline || now >= r.asked_at + READ_INDEX_RETRY)
            .map(|(c, _)| *c)
            .collect();
        for c in late {
            let Some(r) = asked.remove(&c) else { continue };
            if now >= r.deadline {
                let _ = r.answer.send(Err(refusal));
            } else {
                unasked.push(r);
            }
        }
    }

    /// Takes as lost every snapshot a follower has not answered within
    /// [`SNAPSHOT_ANSWER_TIMEOUT`]: raft-rs then probes that follower again (and sends
    /// another snapshot if it still needs one).
    fn give_up_lost_snapshots<S: Storage, M: StateMachine>(
        &self,
        group: &mut Group<S, M>,
        out: &mut BTreeMap<u64, Instant>,
    ) {
        if !group.is_leader() {
            out.clear();
            return;
        }
        let now = self.now();
        let waiting: Vec<u64> = group
            .raw_ref()
            .raft
            .prs()
            .iter()
            .filter(|(_, p)| p.state == ProgressState::Snapshot)
            .map(|(&id, _)| id)
            .collect();
        out.retain(|id, _| waiting.contains(id));
        for id in waiting {
            let since = *out.entry(id).or_insert(now);
            if now.saturating_duration_since(since) >= SNAPSHOT_ANSWER_TIMEOUT {
                group.raw().report_snapshot(id, SnapshotStatus::Failure);
                out.remove(&id);
            }
        }
    }

    /// Hands the leadership to the preferred node, when this node leads, is not it, and
    /// that node holds every entry this one has.
    fn move_to_preferred<S: Storage, M: StateMachine>(
        &self,
        group: &mut Group<S, M>,
        tried: &mut Option<Instant>,
    ) {
        let Some(to) = self.preferred.get() else {
            return;
        };
        let raft = &group.raw_ref().raft;
        if !group.is_leader() || to == raft.id || raft.lead_transferee.is_some() {
            return;
        }
        if tried.is_some_and(|at| self.now().saturating_duration_since(at) < PREFER_RETRY) {
            return;
        }
        let last = raft.raft_log.last_index();
        if raft.prs().get(to).is_some_and(|p| p.matched == last) {
            *tried = Some(self.now());
            self.lease.set(None);
            group.raw().transfer_leader(to);
        }
    }

    /// Takes the next step towards the placement asked with [`Replica::place_on`], if this
    /// node leads and no change is pending; tries again after [`TARGET_RETRY`] (a change
    /// raft-rs dropped, a hand-off that did not take).
    fn move_to_target<S: Storage, M: StateMachine>(
        &self,
        group: &mut Group<S, M>,
        tried: &mut Option<Instant>,
    ) {
        use crate::membership::{next_step, GroupConf, Step};
        use raft::eraftpb::{ConfChangeSingle, ConfChangeType, ConfChangeV2};
        let target = self.target.borrow();
        let Some(nodes) = target.as_ref() else {
            return;
        };
        let raft = &group.raw_ref().raft;
        if !group.is_leader() || raft.has_pending_conf() || raft.lead_transferee.is_some() {
            return;
        }
        if tried.is_some_and(|at| self.now().saturating_duration_since(at) < TARGET_RETRY) {
            return;
        }
        let conf = raft.prs().conf();
        let now = GroupConf {
            me: raft.id,
            voters: conf.voters().ids().iter().collect(),
            learners: conf.learners().iter().copied().collect(),
            matched: raft.prs().iter().map(|(&id, p)| (id, p.matched)).collect(),
            committed: raft.raft_log.committed,
        };
        let Some(step) = next_step(self.group_id as u32, &now, nodes) else {
            return;
        };
        drop(target);
        *tried = Some(self.now());
        // A new configuration's majorities are not the ones that granted the lease.
        self.lease.set(None);
        let (change_type, node_id) = match step {
            Step::HandOff(to) => {
                group.raw().transfer_leader(to);
                return;
            }
            Step::AddLearner(n) | Step::Demote(n) => (ConfChangeType::AddLearnerNode, n),
            Step::Promote(n) => (ConfChangeType::AddNode, n),
            Step::Remove(n) => (ConfChangeType::RemoveNode, n),
        };
        let change = ConfChangeV2 {
            changes: vec![ConfChangeSingle {
                change_type,
                node_id,
                ..ConfChangeSingle::default()
            }]
            .into(),
            ..ConfChangeV2::default()
        };
        if let Err(e) = group.raw().propose_conf_change(Vec::new(), change) {
            tracing::warn!(group = self.group_id, ?step, error = %e, "a membership step was refused");
        } else {
            tracing::info!(group = self.group_id, ?step, "membership step proposed");
        }
    }

    fn publish<S: Storage, M: StateMachine>(&self, group: &Group<S, M>, ended: bool) {
        let raft = &group.raw_ref().raft;
        let applied = group.applied();
        // Every turn publishes: compare in place, and allocate only when the voters or
        // learners changed.
        let conf = raft.prs().conf();
        let ids = conf.voters().ids();
        let known = self.voters.borrow();
        let same = known.len() == ids.len() && known.iter().all(|v| ids.contains(*v));
        drop(known);
        if !same {
            let mut voters: Vec<u64> = ids.iter().collect();
            voters.sort_unstable();
            *self.voters.borrow_mut() = voters;
        }
        let learners = conf.learners();
        let known = self.learners.borrow();
        let same = known.len() == learners.len() && known.iter().all(|l| learners.contains(l));
        drop(known);
        if !same {
            let mut sorted: Vec<u64> = learners.iter().copied().collect();
            sorted.sort_unstable();
            *self.learners.borrow_mut() = sorted;
        }
        self.status.set(Status {
            role: raft.state,
            leader: raft.leader_id,
            term: raft.term,
            applied,
            current: raft.state == StateRole::Leader
                && !ended
                && raft.raft_log.term(applied).is_ok_and(|t| t == raft.term),
            ended,
        });
    }
}
