//! One QUIC connection: its `quinn-proto` state machine, its session stream, and the
//! session core behind it.
//!
//! The client opens the first bidirectional stream and sends `{"type":"auth","token"}` in
//! the length-prefixed form; the server answers with `hello` and the session runs as over
//! a WebSocket: the same [`SessionCore`], the same engine calls ([`run_call`]), the same
//! frames. A length prefix over `ws_frame_bytes_max` closes with 1009 before its bytes are
//! read; a frame that is not UTF-8 with 1007. The driver reads the stream only while the
//! core wants frames, so QUIC's flow control, not server memory, holds back a client that
//! pipelines; it takes events only while the stream accepts writes, so the engine's
//! bounded subscriber queue holds back, and at worst cuts off, a client that does not read.

use super::{app_error_code, Mailbox, ShardQuic, CLOSE_UNAUTHORIZED};
use crate::ctx::{Caller, ShardCtx};
use crate::error::ApiError;
use crate::protocol::{self, FrameError};
use crate::session::{
    run_call, take_events, Answer, CloseReason, SessionConfig, SessionCore, SubscriptionControl,
    Violation, BATCH_FRAMES_MAX,
};
use bytes::{Bytes, BytesMut};
use chorus_engine::Subscription;
use futures::channel::oneshot;
use futures::future::{poll_fn, LocalBoxFuture};
use quinn_proto::{
    Connection, ConnectionHandle, Dir, Event, ReadError, StreamEvent, StreamId, VarInt, WriteError,
};
use serde::Deserialize;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// Datagrams sent per wake-up before the task lets the shard's other tasks run.
const TRANSMITS_PER_TURN: usize = 64;

/// Where the session is.
enum Phase {
    /// Waiting for the `auth` frame, until the deadline.
    Auth { until: Instant },
    /// Checking the token and subscribing.
    Opening(LocalBoxFuture<'static, Result<(Caller, Subscription), ApiError>>),
    /// The session runs.
    Live(Box<Live>),
    /// The session ended: its last frames are being delivered (the send stream is
    /// finished) before the connection closes with this code, at the latest at `until`.
    Finishing {
        code: u32,
        why: String,
        until: Instant,
    },
    /// Closed; waiting for QUIC to finish.
    Closing,
}

/// How long a session that ended waits for its last frames to be acknowledged before the
/// connection closes anyway.
const FINISH_LINGER: Duration = Duration::from_secs(2);

/// A running session: the core and what it does not touch.
struct Live {
    core: SessionCore,
    sub: Subscription,
    control: SubscriptionControl,
    call: Option<LocalBoxFuture<'static, Answer>>,
    batch: Vec<Bytes>,
}

/// The connection and its session stream.
struct Driver {
    ctx: Rc<ShardCtx>,
    quic: Rc<ShardQuic>,
    ch: ConnectionHandle,
    /// Boxed: the state machine is about 6 KiB, and a value held across the task's first
    /// await is laid out in its future once per place it passes through.
    conn: Box<Connection>,
    mailbox: Rc<Mailbox>,
    stream: Option<StreamId>,
    /// Bytes read from the stream and not yet a whole frame.
    inbox: BytesMut,
    /// Chunks accepted by the driver and not yet by the stream: a length prefix, then its
    /// frame, in order.
    outbox: VecDeque<Bytes>,
    phase: Phase,
    /// The server's drain signal, until it fires.
    drain: Option<oneshot::Receiver<()>>,
    timer: glommio::timer::Timer,
    frame_bytes_max: usize,
}

#[derive(Deserialize)]
struct AuthFrame {
    #[serde(rename = "type")]
    kind: String,
    token: String,
}

/// Runs a connection until QUIC has drained it, and counts it closed in the metrics.
pub(super) async fn run(
    ctx: Rc<ShardCtx>,
    quic: Rc<ShardQuic>,
    ch: ConnectionHandle,
    conn: Box<Connection>,
    mailbox: Rc<Mailbox>,
) {
    let header_timeout = Duration::from_secs(ctx.shared.config.http_header_timeout_s);
    let mut d = Driver {
        drain: Some(ctx.on_drain()),
        frame_bytes_max: ctx.shared.config.ws_frame_bytes_max,
        ctx,
        quic,
        ch,
        conn,
        mailbox,
        stream: None,
        inbox: BytesMut::new(),
        outbox: VecDeque::new(),
        phase: Phase::Auth {
            until: Instant::now() + header_timeout,
        },
        timer: glommio::timer::Timer::new(Duration::from_secs(3600)),
    };
    // The datagram being sent. It is let go before the task waits, so that an idle
    // session holds no send buffer (quinn-proto sizes it to the path's MTU when it writes).
    let mut transmit = Vec::new();
    // `chorus_connections_open` counts a session until its connection closes, not until
    // QUIC's draining period (three probe timeouts, seconds on a busy machine) ends.
    let mut counted_closed = false;
    loop {
        d.pump(Instant::now());
        if !counted_closed && d.conn.is_closed() {
            d.ctx.shared.metrics.connection_closed();
            counted_closed = true;
        }
        // Send what QUIC has to send, a bounded number per turn.
        let mut sent = 0;
        while sent < TRANSMITS_PER_TURN {
            transmit.clear();
            let Some(t) = d.conn.poll_transmit(Instant::now(), 1, &mut transmit) else {
                break;
            };
            d.quic.send(&transmit[..t.size], t.destination).await;
            sent += 1;
        }
        if d.conn.is_drained() {
            break;
        }
        if sent == TRANSMITS_PER_TURN {
            glommio::yield_if_needed().await;
            continue;
        }
        transmit = Vec::new();
        poll_fn(|cx| d.wait(cx)).await;
    }
    if !counted_closed {
        d.ctx.shared.metrics.connection_closed();
    }
    let path = d.conn.stats().path;
    let metrics = &d.ctx.shared.metrics;
    metrics.quic_packets_sent.add(path.sent_packets);
    metrics.quic_packets_lost.add(path.lost_packets);
    metrics.quic_congestion_events.add(path.congestion_events);
    // The endpoint forgets the connection.
    while let Some(event) = d.conn.poll_endpoint_events() {
        d.quic.endpoint.borrow_mut().handle_event(d.ch, event);
    }
}

impl Driver {
    /// Does everything that can be done now without waiting.
    fn pump(&mut self, now: Instant) {
        while let Some(event) = self.mailbox.events.borrow_mut().pop_front() {
            self.conn.handle_event(event);
        }
        if self.conn.poll_timeout().is_some_and(|t| t <= now) {
            self.conn.handle_timeout(now);
        }
        while let Some(event) = self.conn.poll() {
            self.on_event(event);
        }
        self.session(now);
        while let Some(event) = self.conn.poll_endpoint_events() {
            let back = self.quic.endpoint.borrow_mut().handle_event(self.ch, event);
            if let Some(back) = back {
                self.conn.handle_event(back);
            }
        }
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Stream(StreamEvent::Opened { dir: Dir::Bi }) => {
                while let Some(id) = self.conn.streams().accept(Dir::Bi) {
                    if self.stream.is_none() {
                        self.stream = Some(id);
                    } else {
                        // One session per connection: a second stream is refused, and the
                        // session goes on.
                        let code = VarInt::from_u32(1002);
                        let _ = self.conn.recv_stream(id).stop(code);
                        let _ = self.conn.send_stream(id).reset(code);
                    }
                }
            }
            Event::Stream(StreamEvent::Finished { id }) if Some(id) == self.stream => {
                if let Phase::Finishing { code, why, .. } = &self.phase {
                    let (code, why) = (*code, why.clone());
                    self.close_now(code, &why);
                }
            }
            Event::ConnectionLost { reason } => {
                tracing::debug!(%reason, "quic connection lost");
                self.phase = Phase::Closing;
            }
            _ => {}
        }
    }

    /// Moves the session forward: auth, opening, or the live exchange.
    fn session(&mut self, now: Instant) {
        match &mut self.phase {
            Phase::Auth { until } => {
                if now >= *until {
                    return self.refuse("no auth frame in time");
                }
                match self.next_frame() {
                    Ok(Some(text)) => self.authenticate(&text),
                    Ok(None) => {}
                    Err(reason) => self.close(reason),
                }
            }
            Phase::Opening(_) => {}
            Phase::Live(_) => self.live(now),
            Phase::Finishing { code, why, until } => {
                let due = (now >= *until).then(|| (*code, why.clone()));
                self.flush_outbox();
                if let Some((code, why)) = due {
                    self.close_now(code, &why);
                }
            }
            Phase::Closing => {}
        }
    }

    /// The first frame must be `auth` with a token of an existing account.
    fn authenticate(&mut self, text: &str) {
        let token = match serde_json::from_str::<AuthFrame>(text) {
            Ok(f) if f.kind == "auth" => f.token,
            _ => return self.refuse("the first frame must be {\"type\":\"auth\",\"token\"}"),
        };
        let ctx = self.ctx.clone();
        self.phase = Phase::Opening(Box::pin(async move {
            let caller = crate::ctx::authenticate_token(&ctx, &token).await?;
            let engine = &ctx.shared.engine;
            let sub = (engine.subscribe_held_device(caller.user, caller.device.as_deref())).await?;
            Ok((caller, sub))
        }));
    }

    /// Answers a refused `auth` with an error frame and closes with 4001.
    fn refuse(&mut self, why: &str) {
        let e = ApiError::unauthorized(why);
        self.queue_frame(protocol::error_frame(&serde_json::Value::Null, &e));
        self.flush_outbox();
        self.close_code(CLOSE_UNAUTHORIZED, why);
    }

    fn start_session(&mut self, caller: Caller, sub: Subscription, now: Instant) {
        let config = &self.ctx.shared.config;
        let core = SessionCore::new(
            caller.user,
            rand::random(),
            SessionConfig {
                heartbeat_interval_s: config.heartbeat_interval_s,
                frame_bytes_max: config.ws_frame_bytes_max,
                presence_flush: std::time::Duration::from_millis(config.presence_flush_ms),
            },
            now,
        )
        .with_device(caller.device);
        self.phase = Phase::Live(Box::new(Live {
            core,
            control: sub.control(),
            sub,
            call: None,
            batch: Vec::new(),
        }));
    }

    /// The live exchange: client frames into the core, the core's frames onto the stream.
    fn live(&mut self, now: Instant) {
        loop {
            let Phase::Live(live) = &mut self.phase else {
                return;
            };
            if !live.core.wants_client_frames() {
                break;
            }
            match self.next_frame() {
                Ok(Some(text)) => {
                    let Phase::Live(live) = &mut self.phase else {
                        return;
                    };
                    self.ctx.shared.metrics.ws_frames_in.inc();
                    live.core.handle_text(now, &text, &*self.ctx);
                }
                Ok(None) => break,
                Err(reason) => {
                    let Phase::Live(live) = &mut self.phase else {
                        return;
                    };
                    match reason {
                        CloseReason::Violation(v) => live.core.handle_violation(v),
                        _ => live.core.handle_peer_closed(),
                    }
                    break;
                }
            }
        }
        if let Phase::Live(live) = &mut self.phase {
            if now >= live.core.poll_timeout() {
                live.core.handle_timeout(now);
            }
        }
        self.write_frames();
        let Phase::Live(live) = &mut self.phase else {
            return;
        };
        if let Some(reason) = live.core.poll_close() {
            self.close(reason);
        }
    }

    /// Hands the core's frames to the stream while it accepts them.
    fn write_frames(&mut self) {
        self.flush_outbox();
        let mut frames = 0;
        while self.outbox.is_empty() && frames < BATCH_FRAMES_MAX {
            let Phase::Live(live) = &mut self.phase else {
                return;
            };
            let Some(frame) = live.core.poll_transmit() else {
                break;
            };
            self.queue_frame(frame);
            self.flush_outbox();
            frames += 1;
        }
        self.ctx.shared.metrics.ws_frames_out.add(frames as u64);
    }

    fn queue_frame(&mut self, frame: Bytes) {
        let len = u32::try_from(frame.len()).expect("frames are far below 4 GiB");
        self.outbox
            .push_back(Bytes::copy_from_slice(&len.to_be_bytes()));
        self.outbox.push_back(frame);
    }

    /// Writes queued chunks until the stream blocks.
    fn flush_outbox(&mut self) {
        let Some(id) = self.stream else {
            return;
        };
        while !self.outbox.is_empty() {
            let (front, _) = self.outbox.as_mut_slices();
            match self.conn.send_stream(id).write_chunks(front) {
                Ok(written) => {
                    self.outbox.drain(..written.chunks);
                    if written.bytes == 0 {
                        return;
                    }
                }
                Err(WriteError::Blocked) => return,
                Err(_) => {
                    // The client stopped reading the session's stream: nothing more can be
                    // said on it.
                    self.outbox.clear();
                    return self.close(CloseReason::PeerClosed);
                }
            }
        }
    }

    /// The next whole frame of the session stream, if one has arrived.
    fn next_frame(&mut self) -> Result<Option<String>, CloseReason> {
        loop {
            match protocol::decode_length_prefixed(&self.inbox, self.frame_bytes_max) {
                Ok(Some((text, used))) => {
                    let text = text.to_owned();
                    let _ = self.inbox.split_to(used);
                    return Ok(Some(text));
                }
                Ok(None) => {}
                Err(FrameError::TooLarge(_)) => {
                    return Err(CloseReason::Violation(Violation::TooLarge))
                }
                Err(FrameError::InvalidUtf8) => {
                    return Err(CloseReason::Violation(Violation::InvalidUtf8))
                }
            }
            if !self.read_stream()? {
                return Ok(None);
            }
        }
    }

    /// Reads what the stream has into the inbox, up to one frame's worth; whether it read
    /// anything. The end of the stream is the client closing.
    fn read_stream(&mut self) -> Result<bool, CloseReason> {
        let Some(id) = self.stream else {
            return Ok(false);
        };
        let room = (self.frame_bytes_max + 4).saturating_sub(self.inbox.len());
        if room == 0 {
            return Ok(false);
        }
        let mut recv = self.conn.recv_stream(id);
        let mut chunks = match recv.read(true) {
            Ok(chunks) => chunks,
            Err(_) => return Err(CloseReason::PeerClosed),
        };
        let result = match chunks.next(room) {
            Ok(Some(chunk)) => {
                self.inbox.extend_from_slice(&chunk.bytes);
                Ok(true)
            }
            Ok(None) => Err(CloseReason::PeerClosed),
            Err(ReadError::Blocked) => Ok(false),
            Err(ReadError::Reset(_)) => Err(CloseReason::PeerClosed),
        };
        let _ = chunks.finalize();
        result
    }

    fn close(&mut self, reason: CloseReason) {
        let code = app_error_code(reason);
        match reason {
            // The client closed, or broke the framing: nothing more is worth delivering.
            CloseReason::PeerClosed | CloseReason::Violation(_) => {
                self.close_now(code, &format!("{reason:?}"))
            }
            _ => self.close_code(code, &format!("{reason:?}")),
        }
    }

    /// Ends the session with `code` once the frames already written are delivered: the
    /// send stream is finished, and the connection closes when the client acknowledged
    /// all of it, or after [`FINISH_LINGER`].
    fn close_code(&mut self, code: u32, why: &str) {
        if matches!(self.phase, Phase::Closing | Phase::Finishing { .. }) {
            return;
        }
        let finished = self
            .stream
            .is_some_and(|id| self.conn.send_stream(id).finish().is_ok());
        if !finished {
            return self.close_now(code, why);
        }
        self.phase = Phase::Finishing {
            code,
            why: why.to_owned(),
            until: Instant::now() + FINISH_LINGER,
        };
    }

    fn close_now(&mut self, code: u32, why: &str) {
        if matches!(self.phase, Phase::Closing) {
            return;
        }
        tracing::debug!(code, why, "quic session closed");
        self.phase = Phase::Closing;
        let reason = Bytes::copy_from_slice(why.as_bytes());
        self.conn
            .close(Instant::now(), VarInt::from_u32(code), reason);
    }

    /// Waits until something needs doing: an event from the endpoint, a timer, the drain,
    /// the session's engine call or frames.
    fn wait(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        *self.mailbox.waker.borrow_mut() = Some(cx.waker().clone());
        if !self.mailbox.events.borrow().is_empty() {
            return Poll::Ready(());
        }
        let drained = self
            .drain
            .as_mut()
            .is_some_and(|drain| Pin::new(drain).poll(cx).is_ready());
        if drained {
            // The drain fires once. (A receiver put in its place would be ready at once,
            // its sender gone, and the task would spin without yielding its shard.)
            self.drain = None;
            match &mut self.phase {
                Phase::Live(live) => live.core.handle_drain(),
                Phase::Closing | Phase::Finishing { .. } => {}
                _ => self.close(CloseReason::GoingAway),
            }
            return Poll::Ready(());
        }
        let now = Instant::now();
        if let Some(ready) = self.poll_session(cx, now) {
            return ready;
        }
        let deadline = [self.conn.poll_timeout(), self.session_deadline()]
            .into_iter()
            .flatten()
            .min();
        match deadline {
            Some(at) if at <= now => Poll::Ready(()),
            Some(at) => {
                self.timer.reset(at - now);
                match Pin::new(&mut self.timer).poll(cx) {
                    Poll::Ready(_) => Poll::Ready(()),
                    Poll::Pending => Poll::Pending,
                }
            }
            None => Poll::Pending,
        }
    }

    fn session_deadline(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Auth { until } | Phase::Finishing { until, .. } => Some(*until),
            Phase::Live(live) => Some(live.core.poll_timeout()),
            _ => None,
        }
    }

    /// Polls the session's futures; `Some` when one made progress.
    fn poll_session(&mut self, cx: &mut Context<'_>, now: Instant) -> Option<Poll<()>> {
        if let Phase::Opening(opening) = &mut self.phase {
            return match opening.as_mut().poll(cx) {
                Poll::Ready(Ok((caller, sub))) => {
                    self.start_session(caller, sub, now);
                    Some(Poll::Ready(()))
                }
                Poll::Ready(Err(e)) => {
                    self.refuse(&e.message);
                    Some(Poll::Ready(()))
                }
                Poll::Pending => None,
            };
        }
        let Phase::Live(live) = &mut self.phase else {
            return None;
        };
        let mut progressed = false;
        loop {
            if let Some(call) = live.call.as_mut() {
                let Poll::Ready(answer) = call.as_mut().poll(cx) else {
                    break;
                };
                live.call = None;
                live.core.handle_answer(Instant::now(), answer, &*self.ctx);
                progressed = true;
            }
            let Some(call) = live.core.poll_call() else {
                break;
            };
            let engine = self.ctx.shared.engine.clone();
            let user = live.core.user();
            let relay = crate::api::Relay::of(&self.ctx);
            let control = live.control.clone();
            live.call = Some(Box::pin(run_call(engine, control, relay, user, call)));
        }
        // Events only while the stream takes writes: otherwise the engine's bounded queue
        // holds them, and cuts the client off when it is full.
        if self.outbox.is_empty() {
            progressed |= take_events(|| now, &mut live.core, &mut live.sub, &mut live.batch, cx);
        }
        progressed.then_some(Poll::Ready(()))
    }
}
