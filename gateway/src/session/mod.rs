//! The client session of `API.md` §6–§7 as a sans-IO state machine, [`SessionCore`], that
//! every transport drives the same way.
//!
//! The core never touches a socket, a timer or the engine. A driver feeds it what happened
//! (a text frame, engine frames, the answer of an engine call, the time) and asks it what
//! to do (a frame to send, an engine call to make, when to wake it next, whether and why to
//! close). The WebSocket driver (`ws`) maps that onto tungstenite and close codes; a QUIC
//! driver maps it onto a stream; the tests and the whole-node simulation drive it with
//! scripted inputs and simulated time.
//!
//! # The session
//!
//! 1. [`SessionCore::new`] queues `hello`. The engine subscription is *held* by then.
//! 2. The first client frame, or [`RESUME_GRACE`] without one, starts the subscription:
//!    from the client's seqs if that frame is `resume`, otherwise live ([`Call::Start`]).
//! 3. Live: frames are parsed and answered; commands become engine calls, one at a time in
//!    the order the client sent them, answered with `ack` or `error` once the engine
//!    answers. While a call is in flight the core takes no client frames
//!    ([`SessionCore::wants_client_frames`]), so a pipelining client waits in its own
//!    buffers, not in server memory.
//! 4. It ends for a [`CloseReason`]: the client closed or broke the protocol, it was silent
//!    for two heartbeat intervals, it fell too far behind (after the frames queued before
//!    the cut are sent), the server drains, or the engine could not start the session.
//!
//! Every queue is bounded: answers by [`REPLIES_MAX`] (the core stops taking client frames
//! when full), events by [`BATCH_FRAMES_MAX`] ([`SessionCore::event_room`]); the rest waits
//! in the engine's bounded subscriber queue.

mod calls;
#[cfg(test)]
mod tests;
mod watched;

pub use calls::{run_call, take_events, SubscriptionControl};

use crate::error::ApiError;
use crate::protocol::{self, ClientFrame, Command};
use bytes::Bytes;
use chorus_engine::ids::{ChannelId, UserId};
use chorus_engine::presence::{self, Presence, Update, WatchOp, PRESENCE_WATCH_MAX};
use chorus_engine::queue::Cutoff;
use chorus_engine::view::{MessageView, ReadView};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

/// How long the session waits for a `resume` as the first frame before it starts live.
pub const RESUME_GRACE: Duration = Duration::from_millis(200);
/// Answers (acks, errors, pongs) waiting to be sent; when full, the core takes no client
/// frames until they drain.
pub const REPLIES_MAX: usize = 16;
/// Engine frames the core holds for sending at once.
pub const BATCH_FRAMES_MAX: usize = 64;
/// Slots an idle session keeps in each queue after a burst.
pub const IDLE_SLOTS_MAX: usize = 8;

/// The settings a session needs.
#[derive(Debug, Clone, Copy)]
pub struct SessionConfig {
    /// Seconds between heartbeats, announced in `hello`; two of them silent end the session.
    pub heartbeat_interval_s: u64,
    /// The largest text frame answered; a larger one (that the transport still read) gets
    /// a `too_large` error.
    pub frame_bytes_max: usize,
    /// The presence window (`presence_flush_ms`): at most one `presence` frame per window,
    /// holding each changed user's latest status. The engine times the windows (see
    /// [`SessionCore::push_event`]); the core holds a frame back only when a backlog brings
    /// two windows closer than this.
    pub presence_flush: Duration,
}

/// Why a session ends. The driver maps each to its transport's close (a WebSocket code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client closed.
    PeerClosed,
    /// The server is draining, or the engine shut the subscription down.
    GoingAway,
    /// The client fell a whole queue behind, or asked to resume before frames it was
    /// already sent: it reconnects and resumes.
    ResumeRequired,
    /// Nothing was heard from the client for two heartbeat intervals.
    HeartbeatTimeout,
    /// The engine could not start the session.
    Unavailable,
    /// The session's device was removed: its credentials no longer work.
    Revoked,
    /// The client broke the transport's protocol.
    Violation(Violation),
}

/// How the client broke the transport's protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// A text message that is not UTF-8.
    InvalidUtf8,
    /// A message far over the size limit.
    TooLarge,
    /// Any other violation of the framing.
    Framing,
}

/// What the core needs from the shard around it: the per-user budgets.
pub trait Limits {
    /// Takes one unit of the user's request budget, or says when to retry.
    fn take_rate(&self, user: UserId) -> Result<(), ApiError>;
    /// Whether the user may send a typing notice to the channel now.
    fn typing_allowed(&self, user: UserId, channel: ChannelId) -> bool;
}

/// An engine call the session asks its driver to make; its result comes back as an
/// [`Answer`].
#[derive(Debug, Clone, PartialEq)]
pub enum Call {
    /// Start the held subscription: from these seqs, or live.
    Start {
        /// The client's seqs, when its first frame was `resume`.
        since: Option<Vec<(ChannelId, u64)>>,
    },
    /// Resume named channels of the started subscription.
    Resume {
        /// The frame's `ref`.
        reference: Value,
        /// The channels and seqs.
        since: Vec<(ChannelId, u64)>,
    },
    /// A command that changes a channel.
    Command {
        /// The frame's `ref`.
        reference: Value,
        /// The command.
        command: Command,
    },
    /// A typing notice.
    Typing {
        /// The frame's `ref`.
        reference: Value,
        /// The channel.
        channel: ChannelId,
    },
    /// A change of the users whose presence the connection watches.
    PresenceSub {
        /// The frame's `ref`.
        reference: Value,
        /// How the set changes.
        op: WatchOp,
        /// The users named.
        users: Vec<UserId>,
    },
    /// The person became active (`true`) or idle.
    Activity {
        /// Which.
        active: bool,
    },
    /// Acknowledge the device's to-device messages up to an ID.
    AckToDevice {
        /// The frame's `ref` (`Null` when it had none: then only an error is answered).
        reference: Value,
        /// The connection's device.
        device: String,
        /// The last ID acknowledged.
        upto: u64,
    },
    /// Move the read marker of a channel forward.
    MarkRead {
        /// The frame's `ref`.
        reference: Value,
        /// The channel.
        channel: ChannelId,
        /// The highest seq read.
        seq: u64,
    },
}

/// The message a command changed, as the `ack` carries it.
#[derive(Debug, Clone, PartialEq)]
pub enum Acked {
    /// Decided by this node's engine.
    Here(MessageView),
    /// Decided by the leader a cluster node passed the command to: the message as its
    /// REST answer gave it.
    Relayed(Value),
}

/// A read marker as a `read:mark` is acknowledged with.
#[derive(Debug, Clone, PartialEq)]
pub enum ReadAck {
    /// Moved by this node's engine.
    Here(ReadView),
    /// Moved by the leader a cluster node passed the call to: the marker as its REST
    /// answer gave it.
    Relayed(Value),
}

/// The result of a [`Call`].
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// The subscription started (`true`) or could not (`false`).
    Started(bool),
    /// A resume was done (`Ok(true)`), or would go back before frames already sent.
    Resumed {
        /// The frame's `ref`.
        reference: Value,
        /// What the engine said.
        result: Result<bool, ApiError>,
    },
    /// A command took effect (with the message it changed, if any), or failed.
    Command {
        /// The frame's `ref`.
        reference: Value,
        /// What the engine (or the leader, for a command passed to it) said.
        result: Result<Option<Acked>, ApiError>,
    },
    /// A typing notice went out, or failed.
    Typing {
        /// The frame's `ref`.
        reference: Value,
        /// What the engine said.
        result: Result<(), ApiError>,
    },
    /// The watched set changed, with what each added user shows; or it did not.
    PresenceSub {
        /// The frame's `ref`.
        reference: Value,
        /// What the engine said.
        result: Result<Vec<(UserId, Presence, u64)>, ApiError>,
    },
    /// The activity was reported (or the session is ending anyway).
    Activity,
    /// To-device messages were acknowledged, or not.
    AckedToDevice {
        /// The frame's `ref`.
        reference: Value,
        /// What the engine said.
        result: Result<(), ApiError>,
    },
    /// A read marker was marked (with the caller's read state), or the mark failed.
    Read {
        /// The frame's `ref`.
        reference: Value,
        /// What the engine (or the leader it was passed to) said.
        result: Result<ReadAck, ApiError>,
    },
}

/// Where the session is.
#[derive(Debug)]
enum Phase {
    /// Waiting for the first frame until the deadline.
    Grace { until: Instant },
    /// The subscription is starting; nothing is live yet.
    Starting,
    /// Started.
    Live,
}

/// A parsed client frame and its `ref`.
type Parsed = (Value, Result<ClientFrame, ApiError>);

/// One client session; see the module documentation.
#[derive(Debug)]
pub struct SessionCore {
    user: UserId,
    /// The end-to-end encryption device of the session's credential, if any.
    device: Option<String>,
    config: SessionConfig,
    phase: Phase,
    last_heard: Instant,
    /// Answers to send, before any event.
    replies: VecDeque<Bytes>,
    /// Engine frames to send, in order.
    events: VecDeque<Bytes>,
    /// The call to hand to the driver next.
    call: Option<Box<Call>>,
    /// Whether the driver is running a call.
    in_flight: bool,
    /// The first frame, when it was not `resume`: handled once the subscription started.
    /// Boxed, like `call`: it is there only while a session starts.
    after_start: Option<Box<Parsed>>,
    /// The engine cut the subscription off; the session closes once what was queued
    /// before the cut is sent.
    cut: Option<Cutoff>,
    close: Option<CloseReason>,
    /// Presence changes of this window, per user: what the client was last told (or would
    /// have been), the latest, and its change number. See [`SessionCore::flush_presence`].
    /// The engine times the windows: it queues each window whole when it ends.
    presence: HashMap<UserId, (Presence, Presence, u64)>,
    /// When the last `presence` frame went out.
    presence_sent_at: Option<Instant>,
    /// A window ended sooner than `presence_flush` after that frame (the reader was behind):
    /// its frame goes out then.
    presence_flush_at: Option<Instant>,
    /// The users the client watches, as of the last `presence:sub` handled, each with the
    /// owner's change number its ack included (0 until the ack): a record of anyone else
    /// (one that crossed a removal on its way), or of a change the ack included (one that
    /// was on its way when the user was watched again), is dropped.
    watching: watched::Watched,
    /// The activity last reported to the engine; a connection starts active.
    active: bool,
}

impl SessionCore {
    /// A session of `user`, opened at `now`; `hello` is its first frame.
    pub fn new(user: UserId, conn_id: u64, config: SessionConfig, now: Instant) -> SessionCore {
        let mut replies = VecDeque::new();
        replies.push_back(protocol::hello(conn_id, user, config.heartbeat_interval_s));
        SessionCore {
            user,
            device: None,
            config,
            phase: Phase::Grace {
                until: now + RESUME_GRACE,
            },
            last_heard: now,
            replies,
            events: VecDeque::new(),
            call: None,
            in_flight: false,
            after_start: None,
            cut: None,
            close: None,
            presence: HashMap::new(),
            presence_sent_at: None,
            presence_flush_at: None,
            watching: watched::Watched::default(),
            active: true,
        }
    }

    /// The session of a credential bound to an end-to-end encryption device: it may
    /// acknowledge the device's to-device messages.
    pub fn with_device(mut self, device: Option<String>) -> SessionCore {
        self.device = device;
        self
    }

    /// The user the session belongs to.
    pub fn user(&self) -> UserId {
        self.user
    }

    fn silence_max(&self) -> Duration {
        Duration::from_secs(self.config.heartbeat_interval_s.saturating_mul(2))
    }

    // -----------------------------------------------------------------------------------
    // Inputs
    // -----------------------------------------------------------------------------------

    /// A complete text frame from the client.
    pub fn handle_text(&mut self, now: Instant, text: &str, limits: &impl Limits) {
        self.last_heard = now;
        if text.len() > self.config.frame_bytes_max {
            let limit = self.config.frame_bytes_max;
            let e = ApiError::too_large(format!("a frame may hold at most {limit} bytes"));
            self.reply_error(&Value::Null, &e);
            return;
        }
        let parsed = protocol::parse_frame(text);
        match self.phase {
            Phase::Grace { .. } => self.start(Some(parsed)),
            Phase::Starting => {
                // Drivers take no frames while the start is in flight; keep the frame
                // rather than lose it if one does.
                assert!(self.after_start.is_none(), "a frame arrived while starting");
                self.after_start = Some(Box::new(parsed));
            }
            Phase::Live => self.on_frame(parsed, limits),
        }
    }

    /// A binary frame: not used by the protocol, answered with an error.
    pub fn handle_binary(&mut self, now: Instant) {
        self.last_heard = now;
        let e = ApiError {
            code: "unsupported_frame",
            ..ApiError::invalid("frames are JSON text; binary frames are not used")
        };
        self.reply_error(&Value::Null, &e);
    }

    /// A frame of the transport's own (a WebSocket ping or pong): the client is alive.
    pub fn handle_heard(&mut self, now: Instant) {
        self.last_heard = now;
    }

    /// The client broke the transport's protocol.
    pub fn handle_violation(&mut self, violation: Violation) {
        self.close_with(CloseReason::Violation(violation));
    }

    /// The client closed.
    pub fn handle_peer_closed(&mut self) {
        self.close_with(CloseReason::PeerClosed);
    }

    /// The server drains.
    pub fn handle_drain(&mut self) {
        self.close_with(CloseReason::GoingAway);
    }

    /// An engine frame for the client; the driver passes at most [`Self::event_room`]. A
    /// presence window ([`presence::window_start`]) is not sent as is: its latest change of
    /// each user becomes one `presence` frame.
    pub fn push_event(&mut self, now: Instant, frame: Bytes) {
        if !presence::is_window(&frame) {
            self.events.push_back(frame);
            return;
        }
        for record in presence::window_records(&frame) {
            match Update::decode(record) {
                Some(update) => self.take_update(update),
                None => tracing::error!("a presence record that does not decode"),
            }
        }
        self.flush_when_due(now);
    }

    /// Sends the window's changes now, or a window after the last frame if that is later.
    fn flush_when_due(&mut self, now: Instant) {
        match self.presence_sent_at {
            Some(sent) if now < sent + self.config.presence_flush => {
                self.presence_flush_at
                    .get_or_insert(sent + self.config.presence_flush);
            }
            _ => self.flush_presence(now),
        }
    }

    /// Keeps the latest change of a watched user for the next `presence` frame; a change
    /// the subscription already showed (its ack was as new) is dropped.
    fn take_update(&mut self, update: Update) {
        if self
            .watching
            .get(&update.user)
            .is_none_or(|after| update.seq <= after)
        {
            return;
        }
        self.presence
            .entry(update.user)
            .and_modify(|(_, latest, seq)| (*latest, *seq) = (update.new, update.seq))
            .or_insert((update.old, update.new, update.seq));
    }

    /// The engine cut the subscription off.
    pub fn handle_cutoff(&mut self, cutoff: Cutoff) {
        self.cut = Some(cutoff);
    }

    /// The answer of the call last taken with [`Self::poll_call`].
    pub fn handle_answer(&mut self, now: Instant, answer: Answer, limits: &impl Limits) {
        assert!(self.in_flight, "an answer without a call");
        self.in_flight = false;
        match answer {
            Answer::Started(false) => self.close_with(CloseReason::Unavailable),
            Answer::Started(true) => {
                self.phase = Phase::Live;
                if let Some(parsed) = self.after_start.take() {
                    self.on_frame(*parsed, limits);
                }
            }
            Answer::Resumed { reference, result } => match result {
                Ok(true) => {}
                // Frames of a named channel already went out after the point asked for:
                // sending older ones now would break the order, so the client reconnects
                // and resumes as its first frame.
                Ok(false) => self.close_with(CloseReason::ResumeRequired),
                Err(e) => self.reply_error(&reference, &e),
            },
            Answer::Command { reference, result } => {
                let frame = match result {
                    Ok(None) => protocol::ack(&reference, None),
                    Ok(Some(Acked::Here(message))) => protocol::ack(&reference, Some(&message)),
                    Ok(Some(Acked::Relayed(message))) => protocol::ack_value(&reference, &message),
                    Err(e) => protocol::error_frame(&reference, &e),
                };
                self.replies.push_back(frame);
            }
            Answer::Typing { reference, result } => {
                if let Err(e) = result {
                    self.reply_error(&reference, &e);
                }
            }
            Answer::PresenceSub { reference, result } => match result {
                Ok(users) => {
                    // The ack tells the client where each added user stands: a change in
                    // this window is measured from there.
                    self.watching
                        .acked(users.iter().map(|(user, _, seq)| (user, *seq)));
                    for (user, shown, seq) in &users {
                        match self.presence.get_mut(user) {
                            // The ack includes that change already.
                            Some((_, _, latest)) if *latest <= *seq => {
                                self.presence.remove(user);
                            }
                            Some((told, _, _)) => *told = *shown,
                            None => {}
                        }
                    }
                    let shown = users.iter().map(|(u, p, _)| (u, p));
                    self.replies
                        .push_back(protocol::presence_ack(&reference, shown));
                    self.flush_held(now);
                }
                Err(e) => {
                    self.watching.settle();
                    self.reply_error(&reference, &e);
                    self.flush_held(now);
                }
            },
            Answer::Activity => {}
            Answer::AckedToDevice { reference, result } => match result {
                Ok(()) if reference.is_null() => {}
                Ok(()) => self.replies.push_back(protocol::ack(&reference, None)),
                Err(e) => self.reply_error(&reference, &e),
            },
            Answer::Read { reference, result } => {
                let frame = match result {
                    Ok(ReadAck::Here(read)) => protocol::ack_read(&reference, &read),
                    Ok(ReadAck::Relayed(read)) => protocol::ack_read_value(&reference, &read),
                    Err(e) => protocol::error_frame(&reference, &e),
                };
                self.replies.push_back(frame);
            }
        }
    }

    /// Time passed: the resume grace may be over, the client may be silent too long.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.presence_flush_at.is_some_and(|at| now >= at) {
            self.flush_presence(now);
        }
        if let Phase::Grace { until } = self.phase {
            if now >= until {
                self.start(None);
            }
        }
        if now.saturating_duration_since(self.last_heard) >= self.silence_max() {
            self.close_with(CloseReason::HeartbeatTimeout);
        }
    }

    // -----------------------------------------------------------------------------------
    // Outputs
    // -----------------------------------------------------------------------------------

    /// The call to hand to the driver next. Boxed: an idle session holds no call, and
    /// inline it would take a call's size in every session.
    fn set_call(&mut self, call: Call) {
        self.call = Some(Box::new(call));
    }

    /// The engine call to make now, if any; its [`Answer`] must come back before the next.
    pub fn poll_call(&mut self) -> Option<Call> {
        if self.in_flight || self.close.is_some() {
            return None;
        }
        let call = self.call.take()?;
        self.in_flight = true;
        Some(*call)
    }

    /// The next frame to send: answers first, then events.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        if let Some(frame) = self.replies.pop_front() {
            return Some(frame);
        }
        let frame = self.events.pop_front();
        if frame.is_none() {
            // An idle session does not keep what a burst took. Answers are few (the
            // `hello`, then one per client frame), so their queue is not kept at all.
            if self.replies.capacity() > 0 {
                self.replies = VecDeque::new();
            }
            shrink(&mut self.events);
        }
        frame
    }

    /// When the driver must call [`Self::handle_timeout`] next.
    pub fn poll_timeout(&self) -> Instant {
        let heartbeat = self.last_heard + self.silence_max();
        let next = match self.phase {
            Phase::Grace { until } => until.min(heartbeat),
            _ => heartbeat,
        };
        self.presence_flush_at.map_or(next, |at| at.min(next))
    }

    /// Why the session must end now, if it must. After a cut, that is once every frame
    /// queued before it was sent.
    pub fn poll_close(&self) -> Option<CloseReason> {
        if self.close.is_some() {
            return self.close;
        }
        match self.cut {
            Some(cut) if self.replies.is_empty() && self.events.is_empty() => Some(match cut {
                Cutoff::Overflow => CloseReason::ResumeRequired,
                Cutoff::Closed => CloseReason::GoingAway,
                Cutoff::Revoked => CloseReason::Revoked,
            }),
            _ => None,
        }
    }

    /// Whether the driver should read the next client frame now.
    pub fn wants_client_frames(&self) -> bool {
        self.close.is_none()
            && !self.in_flight
            && self.call.is_none()
            && self.after_start.is_none()
            && self.replies.len() < REPLIES_MAX
    }

    /// How many engine frames the core takes now (none after a cut or a close).
    pub fn event_room(&self) -> usize {
        if self.cut.is_some() || self.close.is_some() {
            return 0;
        }
        BATCH_FRAMES_MAX.saturating_sub(self.events.len())
    }

    // -----------------------------------------------------------------------------------
    // Internals
    // -----------------------------------------------------------------------------------

    /// Ends the presence window: one `presence` frame with the latest status of every user
    /// whose status differs from what the client was last told; nothing for a change undone
    /// within the window. The engine's windows are at least a window apart, and one that a
    /// backlog delivered sooner than that after the last frame is held back
    /// ([`Self::push_event`]), so frames are too.
    ///
    /// Changes of a user whose ack has not come yet are held for the frame after the ack:
    /// sent before it, they would be undone by the older status the ack shows.
    fn flush_presence(&mut self, now: Instant) {
        self.presence_flush_at = None;
        let watching = &self.watching;
        let mut changed: Vec<(UserId, Presence)> = Vec::new();
        self.presence.retain(|user, (told, latest, _)| {
            if watching.pending(user) {
                return true;
            }
            if !told.same_state(latest) {
                changed.push((*user, *latest));
            }
            false
        });
        if self.presence.capacity() > IDLE_SLOTS_MAX {
            self.presence.shrink_to(IDLE_SLOTS_MAX);
        }
        if changed.is_empty() {
            return;
        }
        changed.sort_unstable_by_key(|(u, _)| *u);
        let frame = protocol::presence_frame(changed.iter().map(|(u, p)| (u, p)));
        self.events.push_back(frame);
        self.presence_sent_at = Some(now);
    }

    /// After an ack: changes held for it go out in the next frame.
    fn flush_held(&mut self, now: Instant) {
        if !self.presence.is_empty() {
            self.flush_when_due(now);
        }
    }

    fn close_with(&mut self, reason: CloseReason) {
        self.close.get_or_insert(reason);
    }

    /// The first frame, or the grace's end (`None`), starts the subscription: from the
    /// client's seqs if the frame is `resume`; otherwise live, and the frame is handled
    /// once started.
    fn start(&mut self, first: Option<Parsed>) {
        let since = match first {
            Some((reference, Ok(ClientFrame::Resume { since, unknown }))) => {
                self.report_unknown(&reference, &unknown);
                Some(since)
            }
            other => {
                self.after_start = other.map(Box::new);
                None
            }
        };
        self.phase = Phase::Starting;
        self.set_call(Call::Start { since });
    }

    fn on_frame(&mut self, (reference, parsed): Parsed, limits: &impl Limits) {
        let frame = match parsed {
            Ok(frame) => frame,
            Err(e) => return self.reply_error(&reference, &e),
        };
        match frame {
            ClientFrame::Ping => self.replies.push_back(protocol::pong(&reference)),
            ClientFrame::Resume { since, unknown } => {
                self.report_unknown(&reference, &unknown);
                self.set_call(Call::Resume { reference, since });
            }
            ClientFrame::Typing(channel) => {
                // Extra notices are dropped quietly: typing is best effort, and clients
                // send it on every keystroke.
                if limits.typing_allowed(self.user, channel) {
                    self.set_call(Call::Typing { reference, channel });
                }
            }
            ClientFrame::MarkRead { channel, seq } => match limits.take_rate(self.user) {
                Ok(()) => self.set_call(Call::MarkRead {
                    reference,
                    channel,
                    seq,
                }),
                Err(e) => self.reply_error(&reference, &e),
            },
            ClientFrame::Command(command) => match limits.take_rate(self.user) {
                Ok(()) => self.set_call(Call::Command { reference, command }),
                Err(e) => self.reply_error(&reference, &e),
            },
            ClientFrame::PresenceSub { op, users } => match limits.take_rate(self.user) {
                Ok(()) => self.presence_sub(reference, op, users),
                Err(e) => self.reply_error(&reference, &e),
            },
            ClientFrame::ToDeviceAck { upto } => {
                match (&self.device, limits.take_rate(self.user)) {
                    (None, _) => {
                        let e = ApiError::invalid(
                        "this connection's token is bound to no device: sign in with a device_id",
                    );
                        self.reply_error(&reference, &e);
                    }
                    (Some(device), Ok(())) => {
                        let device = device.clone();
                        self.set_call(Call::AckToDevice {
                            reference,
                            device,
                            upto,
                        });
                    }
                    (Some(_), Err(e)) => self.reply_error(&reference, &e),
                }
            }
            ClientFrame::Activity(active) => {
                // Only a change reaches the owner: clients may report on every keystroke.
                if active != self.active {
                    self.active = active;
                    self.set_call(Call::Activity { active });
                }
            }
        }
    }

    /// Changes the watched set at once (so that no record of a user removed is turned into
    /// a frame from now on) and asks the engine to follow. Past the limit, nothing changes
    /// and the answer is `too_many`.
    fn presence_sub(&mut self, reference: Value, op: WatchOp, users: Vec<UserId>) {
        let count = match op {
            WatchOp::Set => users.iter().collect::<HashSet<_>>().len(),
            WatchOp::Add => {
                let new: HashSet<&UserId> = users
                    .iter()
                    .filter(|u| !self.watching.contains(u))
                    .collect();
                self.watching.len() + new.len()
            }
            WatchOp::Remove => 0,
        };
        if count > PRESENCE_WATCH_MAX {
            return self.reply_error(&reference, &protocol::too_many_watched(count));
        }
        match op {
            WatchOp::Set => self.watching.set(&users),
            WatchOp::Add => self.watching.add(&users),
            WatchOp::Remove => self.watching.remove(&users),
        }
        let watching = &self.watching;
        self.presence.retain(|u, _| watching.contains(u));
        self.set_call(Call::PresenceSub {
            reference,
            op,
            users,
        });
    }

    /// Names the channels of a `resume` whose IDs do not parse: the others are resumed,
    /// and the client learns which of its seqs were ignored.
    fn report_unknown(&mut self, reference: &Value, unknown: &[String]) {
        if unknown.is_empty() {
            return;
        }
        let e = ApiError::new(
            404,
            "not_found",
            format!("unknown channel ids, not resumed: {}", unknown.join(", ")),
        );
        let mut frame = protocol::error_value(reference, &e);
        frame["channel_ids"] = json!(unknown);
        self.replies.push_back(protocol::encode(&frame));
    }

    fn reply_error(&mut self, reference: &Value, e: &ApiError) {
        self.replies.push_back(protocol::error_frame(reference, e));
    }
}

fn shrink(queue: &mut VecDeque<Bytes>) {
    if queue.is_empty() && queue.capacity() > IDLE_SLOTS_MAX {
        queue.shrink_to(IDLE_SLOTS_MAX);
    }
}
