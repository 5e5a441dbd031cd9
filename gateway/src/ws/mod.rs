//! The WebSocket driver of the client session: the upgrade handshake of
//! `GET /ws/v1/connect`, then [`SessionCore`] driven over tungstenite, one task per
//! connection on the shard that accepted it.
//!
//! # What the driver does
//!
//! 1. The server hands over a connection whose first request line is the endpoint's. The
//!    request is read and answered with tungstenite's HTTP handshake code, on this shard's
//!    own stream (hyper's upgrade path needs a `Send` stream, which a glommio one is not),
//!    within the connection's header deadline. It is authenticated first (a bad token, or
//!    one of an account that does not exist, is answered 401 and never upgraded), then
//!    checked (RFC 6455), then answered 101.
//! 2. It subscribes *held* ([`chorus_engine::Engine::subscribe_held`]): nothing is
//!    delivered yet, and nothing committed from now on is lost. Then the session core runs:
//!    it decides what every client frame means, which engine calls to make, what to send
//!    and when to close (see `session`). The driver polls the socket, the subscription's
//!    queue, the call in flight, one timer and the drain signal, and feeds the core.
//! 3. The core's close reason becomes a close code ([`close_code`]); a WebSocket protocol
//!    violation fails the connection as RFC 6455 says ([`exit_for_read_error`]).
//!
//! # Close codes
//!
//! 1000/the client's own code echoed when the client closes; 1001 when the server drains;
//! 1002, 1007 and 1009 for protocol violations (TCP closed at once); 1011 when the engine
//! cannot start the session; [`CLOSE_RESUME_REQUIRED`] (4000) when the client fell a whole
//! queue behind; [`CLOSE_HEARTBEAT_TIMEOUT`] (4002) after two silent heartbeat intervals.
//! After a close it starts, the server waits up to [`CLOSE_LINGER`] for the client's.
//!
//! # Backpressure and memory
//!
//! Every buffer is bounded. Events wait in the engine's subscriber queue (at most
//! `ws_outbound_frames_max` frames). The driver moves at most a batch into the core and
//! writes the core's frames itself ([`out`]): one `sendmsg` per batch, straight from the
//! shared payloads, so a burst costs one system call and no copy. While frames wait for
//! the socket it takes nothing more, so the queue absorbs a slow client: a live event that
//! finds it full cuts the client off, and once the frames queued before the cut are
//! written the session closes with 4000; the client resumes from its last seq, which the
//! log still has. An idle connection holds a read buffer of [`READ_BUFFER_BYTES`] and a
//! few small structures; no write buffer outlives the frames in it.
//!
//! tungstenite's protocol state machine reads the client's frames and writes its own
//! (answers to pings and closes), driven directly over a small non-blocking adapter
//! (`SyncIo`) rather than through a stream wrapper: one task polls reads and writes of the
//! same socket in one place, with no lock between a reading and a writing half, and the
//! driver decides how each protocol error ends the connection.

mod out;

use crate::conn::Socket;
use crate::ctx::{Caller, ShardCtx};
use crate::error::ApiError;
use crate::session::{
    run_call, take_events, Answer, CloseReason, SessionConfig, SessionCore, SubscriptionControl,
    Violation, BATCH_FRAMES_MAX,
};
use bytes::Bytes;
use chorus_engine::Subscription;
use futures::channel::oneshot;
use futures::future::{poll_fn, LocalBoxFuture};
use futures::io::{AsyncRead, AsyncWrite};
use std::future::Future;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tungstenite::error::{CapacityError, Error as WsError};
use tungstenite::handshake::machine::{HandshakeMachine, RoundResult, StageResult};
use tungstenite::handshake::server::{Request as HandshakeRequest, Response as HandshakeResponse};
use tungstenite::handshake::{self};
use tungstenite::http::{self, header::HeaderName, HeaderValue};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocket, WebSocketConfig};
use tungstenite::{Message, Utf8Bytes};

/// The endpoint's path.
pub const WS_PATH: &str = "/ws/v1/connect";

/// Close code: the client fell too far behind; it should reconnect and `resume` from the
/// last seq it saw.
pub const CLOSE_RESUME_REQUIRED: u16 = 4000;
/// Close code reserved by `API.md` for a bad token; the upgrade answers 401 instead, so a
/// session never starts without a valid one.
pub const CLOSE_UNAUTHORIZED: u16 = 4001;
/// Close code: the client sent nothing, not even a ping, for two heartbeat intervals.
pub const CLOSE_HEARTBEAT_TIMEOUT: u16 = 4002;

/// tungstenite's read buffer, allocated for the life of the connection, and the most it
/// reads in one call. Client frames are small (a post of a few hundred characters is one
/// read); a larger one is read in several calls, into a buffer grown to its length. Every
/// idle connection holds it, so it is the smallest that takes a typical frame whole.
pub const READ_BUFFER_BYTES: usize = 512;
/// Bytes tungstenite gathers before it writes to the socket. It writes only its own small
/// frames (answers to pings and closes); the session's go through [`out`].
pub const WRITE_BUFFER_BYTES: usize = 16 * 1024;
/// The most tungstenite buffers: a few control frames. Only a safety net.
pub const OUTBOUND_FRAME_BYTES_MAX: usize = 16 * 1024 * 1024;
/// How long a closing connection waits to flush its close frame and hear the client's.
pub const CLOSE_LINGER: Duration = Duration::from_secs(5);
/// Slack above `ws_frame_bytes_max` that tungstenite still reads, so that a frame somewhat
/// over the limit gets a `too_large` error rather than a dropped connection. Far larger
/// frames close the connection with 1009 without being buffered.
pub const FRAME_SLACK_BYTES: usize = 64 * 1024;

// ---------------------------------------------------------------------------------------
// The handshake
// ---------------------------------------------------------------------------------------

/// Serves a connection whose first request line is `GET /ws/v1/connect`: reads the request,
/// answers it, and runs the session. A bad token is answered 401, a path other than the
/// endpoint 404, a request that is not a WebSocket upgrade 400 (426 with
/// `Sec-WebSocket-Version: 13` for another version), and a draining server 503; then the
/// connection is closed.
///
/// The future it returns is what an idle connection keeps, so it is small: the opening
/// (handshake and subscription) is boxed at once, taking the socket with it, and is gone
/// once the session runs; what remains is the session and its `run`.
pub fn serve(
    ctx: Rc<ShardCtx>,
    stream: Socket,
    deadline: Instant,
) -> impl std::future::Future<Output = ()> {
    let opening = Box::pin(open(ctx, stream, deadline));
    async move {
        // `let … else`, not `if let`: the latter keeps the `Option` beside the session for
        // the life of the connection.
        let Some(mut session) = opening.await else {
            return;
        };
        session.run().await;
    }
}

/// The handshake and the subscription: the session, if both succeeded. The handshake's and
/// the subscription's futures are boxed, as each is done before the next starts.
async fn open(ctx: Rc<ShardCtx>, stream: Socket, deadline: Instant) -> Option<Session> {
    let handshake = Box::pin(handshake(&ctx, stream));
    let (caller, mut ws) = crate::conn::until(deadline, handshake).await.flatten()?;
    let engine = &ctx.shared.engine;
    let device = caller.device.as_deref();
    let sub = match Box::pin(engine.subscribe_held_device(caller.user, device)).await {
        Ok(sub) => sub,
        Err(e) => {
            tracing::warn!(error = %e, "subscribe failed");
            Box::pin(close(&mut ws, Exit::Close(1011, "unavailable"))).await;
            return None;
        }
    };
    Some(Session::new(ctx, caller, ws, sub))
}

/// Reads the upgrade request and answers it, within the connection's header deadline.
/// Returns the user and the WebSocket when it was accepted. Everything it holds (the
/// request, its headers, the handshake's buffers) is gone once it returns, so an idle
/// session does not keep it.
async fn handshake(ctx: &ShardCtx, stream: Socket) -> Option<(Caller, WebSocket<SyncIo<Socket>>)> {
    let machine = HandshakeMachine::start_read(SyncIo::new(stream));
    let Some(StageResult::DoneReading {
        result: request,
        stream: io,
        tail,
    }) = drive(machine).await
    else {
        return None;
    };
    let (user, out) = match accept(ctx, &request).await {
        Ok((user, response)) => (Some(user), head_bytes(&response, &[])?),
        Err((e, extra)) => {
            let (response, body) = error_response(&e, extra);
            (None, head_bytes(&response, &body)?)
        }
    };
    drop(request);
    let io = match drive(HandshakeMachine::start_write(io, out)).await {
        Some(StageResult::DoneWriting(io)) => io,
        _ => return None,
    };
    let user = user?;
    let config = ws_config(ctx.shared.config.ws_frame_bytes_max);
    // Frames a client sent right behind its request are kept, not refused. They are copied
    // out of the handshake's read buffer so that its 4 KiB allocation is not kept as the
    // connection's read buffer.
    let ws = if tail.is_empty() {
        WebSocket::from_raw_socket(io, Role::Server, Some(config))
    } else {
        WebSocket::from_partially_read(io, tail.as_slice().to_vec(), Role::Server, Some(config))
    };
    Some((user, ws))
}

/// An answer's status line and headers, then its body.
fn head_bytes(response: &HandshakeResponse, body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    handshake::server::write_response(&mut out, response).ok()?;
    out.extend_from_slice(body);
    Some(out)
}

/// Runs tungstenite's handshake machine (reading the request, or writing the answer) until
/// its stage is done or the peer fails.
async fn drive(
    machine: HandshakeMachine<SyncIo<Socket>>,
) -> Option<StageResult<HandshakeRequest, SyncIo<Socket>>> {
    let mut machine = Some(machine);
    poll_fn(|cx| loop {
        let mut m = machine
            .take()
            .expect("the machine is put back before Pending");
        m.get_mut().set_waker(cx.waker());
        match m.single_round::<HandshakeRequest>() {
            Ok(RoundResult::WouldBlock(m)) => {
                machine = Some(m);
                return Poll::Pending;
            }
            Ok(RoundResult::Incomplete(m)) => machine = Some(m),
            Ok(RoundResult::StageFinished(done)) => return Poll::Ready(Some(done)),
            Err(e) => {
                tracing::debug!(error = %e, "websocket handshake failed");
                return Poll::Ready(None);
            }
        }
    })
    .await
}

/// A header an error answer needs besides its body.
type ExtraHeader = Option<(HeaderName, &'static str)>;

/// Decides the answer to an upgrade request: the user and the 101 response, or the error
/// and any header it needs.
async fn accept(
    ctx: &ShardCtx,
    request: &HandshakeRequest,
) -> Result<(Caller, HandshakeResponse), (ApiError, ExtraHeader)> {
    if request.uri().path() != WS_PATH {
        return Err((ApiError::new(404, "not_found", "no such endpoint"), None));
    }
    let user = crate::ctx::authenticate(ctx, request.headers(), request.uri())
        .await
        .map_err(|e| (e, None))?;
    if ctx.shared.draining.load(Ordering::SeqCst) {
        let e = ApiError::unavailable("the server is shutting down");
        return Err((e, None));
    }
    let version = request.headers().get(http::header::SEC_WEBSOCKET_VERSION);
    if version.is_some_and(|v| v.as_bytes() != b"13") {
        let e = ApiError::new(426, "upgrade_required", "Sec-WebSocket-Version must be 13");
        return Err((e, Some((http::header::SEC_WEBSOCKET_VERSION, "13"))));
    }
    match handshake::server::create_response(request) {
        Ok(response) => Ok((user, response)),
        Err(e) => Err((
            ApiError::invalid(format!("not a WebSocket upgrade: {e}")),
            None,
        )),
    }
}

/// An error answer in `API.md`'s format; the connection closes after it.
fn error_response(e: &ApiError, extra: ExtraHeader) -> (HandshakeResponse, Vec<u8>) {
    let body = e.body().to_string().into_bytes();
    let mut response = HandshakeResponse::new(());
    *response.status_mut() =
        http::StatusCode::from_u16(e.status).unwrap_or(http::StatusCode::BAD_REQUEST);
    let h = response.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(http::header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    h.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    if let Some((name, value)) = extra {
        h.insert(name, HeaderValue::from_static(value));
    }
    (response, body)
}

/// tungstenite's settings: reads up to the frame limit plus slack (the session answers
/// frames over the limit itself), and small buffers.
fn ws_config(frame_bytes_max: usize) -> WebSocketConfig {
    let hard = frame_bytes_max.saturating_add(FRAME_SLACK_BYTES);
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES)
        .max_write_buffer_size(WRITE_BUFFER_BYTES + OUTBOUND_FRAME_BYTES_MAX)
        .max_message_size(Some(hard))
        .max_frame_size(Some(hard))
}

// ---------------------------------------------------------------------------------------
// The non-blocking adapter
// ---------------------------------------------------------------------------------------

/// `std::io` over a `futures::io` stream for tungstenite: a call that would wait returns
/// `WouldBlock` after registering the session task's waker, so the task is polled again
/// when the socket is ready.
///
/// While the session's own frames are partly written (`gate`), tungstenite's writes are
/// refused as `WouldBlock`: its frames (answers to pings and closes) wait in its buffer and
/// go out between whole frames, never inside one.
struct SyncIo<S> {
    inner: S,
    waker: Waker,
    gate: bool,
    /// Reads register this waker instead of the task's, so that a session reads only when
    /// the socket may hold bytes: tungstenite zeroes its whole read buffer before every
    /// read attempt, including those that find nothing.
    reads: Arc<ReadWake>,
    read_waker: Waker,
}

/// The waker of a socket's reads: notes that the socket may be readable, then wakes the
/// task.
struct ReadWake {
    ready: AtomicBool,
    task: std::sync::Mutex<Waker>,
}

impl std::task::Wake for ReadWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.ready.store(true, Ordering::Release);
        self.task
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .wake_by_ref();
    }
}

impl<S> SyncIo<S> {
    fn new(inner: S) -> SyncIo<S> {
        let reads = Arc::new(ReadWake {
            ready: AtomicBool::new(true),
            task: std::sync::Mutex::new(futures::task::noop_waker()),
        });
        SyncIo {
            inner,
            waker: futures::task::noop_waker(),
            gate: false,
            read_waker: Waker::from(reads.clone()),
            reads,
        }
    }

    /// Sets the waker of the task polling now; called at the top of every poll.
    fn set_waker(&mut self, waker: &Waker) {
        if !self.waker.will_wake(waker) {
            self.waker = waker.clone();
            *self.reads.task.lock().unwrap_or_else(|e| e.into_inner()) = waker.clone();
        }
    }

    /// Whether a read may find bytes: none has found the socket empty since it last
    /// reported readable.
    fn may_read(&self) -> bool {
        self.reads.ready.load(Ordering::Acquire)
    }

    fn poll_io<T>(
        &mut self,
        f: impl FnOnce(Pin<&mut S>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> io::Result<T>
    where
        S: Unpin,
    {
        let mut cx = Context::from_waker(&self.waker);
        match f(Pin::new(&mut self.inner), &mut cx) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl<S: AsyncRead + Unpin> Read for SyncIo<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // Cleared before the attempt: a wake-up after it finds nothing sets it again.
        self.reads.ready.store(false, Ordering::Release);
        let mut cx = Context::from_waker(&self.read_waker);
        match Pin::new(&mut self.inner).poll_read(&mut cx, buf) {
            Poll::Ready(r) => {
                self.reads.ready.store(true, Ordering::Release);
                r
            }
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl<S: AsyncWrite + Unpin> Write for SyncIo<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.gate {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.poll_io(|s, cx| s.poll_write(cx, buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        self.poll_io(|s, cx| s.poll_flush(cx))
    }
}

fn would_block(e: &WsError) -> bool {
    matches!(e, WsError::Io(e) if e.kind() == io::ErrorKind::WouldBlock)
}

// ---------------------------------------------------------------------------------------
// The session
// ---------------------------------------------------------------------------------------

/// How the connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exit {
    /// The server closes: send a close frame with this code and reason, then wait up to
    /// [`CLOSE_LINGER`] for the client's close before closing TCP.
    Close(u16, &'static str),
    /// The client broke the WebSocket protocol (RFC 6455 §7.1.7, "fail the connection"):
    /// send a close frame with this code, then close TCP at once. Nothing more the client
    /// sent is read as frames, so nothing of a broken message is ever acted on.
    Fail(u16, &'static str),
    /// The client closed; tungstenite has queued the answer, which is flushed, and then TCP
    /// is closed at once.
    PeerClosed,
    /// The socket failed; nothing more can be sent.
    Gone,
}

/// The WebSocket close for a session's close reason.
fn close_code(reason: CloseReason) -> Exit {
    match reason {
        CloseReason::PeerClosed => Exit::PeerClosed,
        CloseReason::GoingAway => Exit::Close(1001, "going away"),
        CloseReason::ResumeRequired => Exit::Close(CLOSE_RESUME_REQUIRED, "resume required"),
        CloseReason::HeartbeatTimeout => Exit::Close(CLOSE_HEARTBEAT_TIMEOUT, "heartbeat timeout"),
        CloseReason::Revoked => Exit::Close(CLOSE_UNAUTHORIZED, "device removed"),
        CloseReason::Unavailable => Exit::Close(1011, "unavailable"),
        CloseReason::Violation(Violation::InvalidUtf8) => Exit::Fail(1007, "invalid UTF-8"),
        CloseReason::Violation(Violation::TooLarge) => Exit::Fail(1009, "message too large"),
        CloseReason::Violation(Violation::Framing) => Exit::Fail(1002, "protocol error"),
    }
}

/// A session on one WebSocket: the core, and everything it does not touch.
struct Session {
    ctx: Rc<ShardCtx>,
    ws: WebSocket<SyncIo<Socket>>,
    core: SessionCore,
    /// Taken when the session ends, so that the engine stops queueing for a closing client.
    sub: Option<Subscription>,
    control: SubscriptionControl,
    drain: oneshot::Receiver<()>,
    /// Whether `drain` holds this task's waker. It is polled once to leave it there, then
    /// only once the shard is closing (`ShardCtx::closing`): polled on every turn, it
    /// cost each delivery a waker clone and a cache miss on a line of its own.
    drain_waits: bool,
    /// Wakes the session at the core's next deadline; re-armed only when it fires or the
    /// deadline moves earlier, so frames cost no timer work.
    timer: glommio::timer::Timer,
    armed_for: Instant,
    /// Whether the timer holds the task's waker: a glommio timer re-inserts itself into the
    /// reactor's timer tree on every poll that finds it pending, so it is polled only when
    /// armed anew or due, not on every turn of the session.
    charged: bool,
    /// The engine call in flight.
    call: Option<LocalBoxFuture<'static, Answer>>,
    /// Frames taken from the subscription in one go.
    batch: Vec<Bytes>,
    /// The core's frames not yet (wholly) written to the socket.
    out: out::Outbound,
}

impl Session {
    fn new(
        ctx: Rc<ShardCtx>,
        caller: Caller,
        ws: WebSocket<SyncIo<Socket>>,
        sub: Subscription,
    ) -> Session {
        let config = &ctx.shared.config;
        let now = Instant::now();
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
        let armed_for = core.poll_timeout();
        let drain = ctx.on_drain();
        Session {
            control: sub.control(),
            sub: Some(sub),
            timer: glommio::timer::Timer::new(armed_for.saturating_duration_since(now)),
            armed_for,
            charged: false,
            ctx,
            ws,
            core,
            drain,
            drain_waits: false,
            call: None,
            batch: Vec::new(),
            out: out::Outbound::default(),
        }
    }

    async fn run(&mut self) {
        let mut exit = poll_fn(|cx| self.poll(cx)).await;
        // Unsubscribe before lingering: the engine stops queueing for a closing client.
        self.sub = None;
        self.call = None;
        if exit != Exit::Gone && !self.out.is_empty() {
            // The frames begun before the close go out whole, ahead of the close frame.
            let mut linger = glommio::timer::Timer::new(CLOSE_LINGER);
            let written = poll_fn(|cx| {
                self.ws.get_mut().set_waker(cx.waker());
                if Pin::new(&mut linger).poll(cx).is_ready() {
                    return Poll::Ready(false);
                }
                match self.write_out(cx) {
                    Ok(true) => Poll::Ready(true),
                    Ok(false) => Poll::Pending,
                    Err(_) => Poll::Ready(false),
                }
            })
            .await;
            if !written {
                exit = Exit::Gone;
            }
        }
        Box::pin(close(&mut self.ws, exit)).await;
    }

    /// Turns over every source until nothing is left to do or the session ends. A busy
    /// connection gives the shard back when its time slice is used up, as
    /// `yield_if_needed` would, so it never starves the shard's other tasks.
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Exit> {
        self.ws.get_mut().set_waker(cx.waker());
        loop {
            match self.turn(cx) {
                Err(exit) => return Poll::Ready(exit),
                Ok(false) => return Poll::Pending,
                Ok(true) if glommio::executor().need_preempt() => {
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Ok(true) => {}
            }
        }
    }

    /// One turn over every source; whether it did work that may allow more right away.
    fn turn(&mut self, cx: &mut Context<'_>) -> Result<bool, Exit> {
        if (!self.drain_waits || self.ctx.closing.get())
            && Pin::new(&mut self.drain).poll(cx).is_ready()
        {
            // The shard sends on every sender right after setting `closing`; a sender is
            // dropped unsent only with the shard's context, which this session holds.
            self.core.handle_drain();
        }
        self.drain_waits = true;
        // One clock read a turn at most, where each of the two that want it read its own.
        let mut clock = None;
        let mut busy = self.poll_call(cx);
        busy |= self.poll_outbound(cx, &mut clock)?;
        busy |= self.poll_inbound()?;
        busy |= self.poll_timer(cx, &mut clock);
        match self.core.poll_close() {
            Some(reason) => Err(close_code(reason)),
            None => Ok(busy),
        }
    }

    /// Polls the engine call in flight, and starts the next one the core asks for.
    fn poll_call(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progressed = false;
        loop {
            if let Some(call) = self.call.as_mut() {
                let Poll::Ready(answer) = call.as_mut().poll(cx) else {
                    return progressed;
                };
                self.call = None;
                self.core.handle_answer(Instant::now(), answer, &*self.ctx);
                progressed = true;
            }
            let Some(call) = self.core.poll_call() else {
                return progressed;
            };
            let engine = self.ctx.shared.engine.clone();
            let user = self.core.user();
            let relay = crate::api::Relay::of(&self.ctx);
            let control = self.control.clone();
            self.call = Some(Box::pin(run_call(engine, control, relay, user, call)));
        }
    }

    /// Moves frames from the subscription into the core and the core's frames to the
    /// socket: one batch, one `sendmsg` ([`out`]). While frames wait for the socket nothing
    /// more is taken from the subscription, so its bounded queue is what absorbs a slow
    /// client.
    fn poll_outbound(
        &mut self,
        cx: &mut Context<'_>,
        clock: &mut Option<Instant>,
    ) -> Result<bool, Exit> {
        if !self.write_out(cx)? {
            return Ok(false);
        }
        // tungstenite's own frames go out between whole frames of ours.
        match self.ws.flush() {
            Ok(()) => {}
            Err(e) if would_block(&e) => return Ok(false),
            Err(e) => return Err(self.write_failed(e)),
        }
        let sub = self.sub.as_mut().expect("subscribed while serving");
        let now = || *clock.get_or_insert_with(Instant::now);
        take_events(now, &mut self.core, sub, &mut self.batch, cx);
        let mut frames = 0;
        while frames < BATCH_FRAMES_MAX {
            let Some(frame) = self.core.poll_transmit() else {
                break;
            };
            self.out.push_text(frame);
            frames += 1;
        }
        // Deliveries and cutoffs are counted by the engine, which sees every subscriber.
        self.ctx.shared.metrics.ws_frames_out.add(frames as u64);
        Ok(frames > 0 && self.write_out(cx)?)
    }

    /// Writes the frames waiting for the socket; whether all went. When the socket is
    /// full, its own `poll_write` is handed the front bytes, which registers the task for
    /// writability, and tungstenite is held back until the frames are out (the gate).
    fn write_out(&mut self, cx: &mut Context<'_>) -> Result<bool, Exit> {
        let io = self.ws.get_mut();
        loop {
            let result = self.out.send_to(io.inner.as_raw_fd());
            match result {
                Ok(true) => {
                    io.gate = false;
                    return Ok(true);
                }
                Ok(false) => match Pin::new(&mut io.inner).poll_write(cx, self.out.front()) {
                    Poll::Ready(Ok(n)) if n > 0 => self.out.advance(n),
                    Poll::Ready(Ok(_)) => return Err(Exit::Gone),
                    Poll::Ready(Err(e)) => return Err(self.write_failed(WsError::Io(e))),
                    Poll::Pending => {
                        io.gate = true;
                        return Ok(false);
                    }
                },
                Err(e) => return Err(self.write_failed(WsError::Io(e))),
            }
        }
    }

    /// Reads client frames while the core wants them; returns whether one was read.
    fn poll_inbound(&mut self) -> Result<bool, Exit> {
        let mut read = false;
        while self.core.wants_client_frames() && self.ws.get_ref().may_read() {
            match self.ws.read() {
                Ok(message) => {
                    read = true;
                    self.ctx.shared.metrics.ws_frames_in.inc();
                    self.on_message(message);
                }
                Err(e) if would_block(&e) => break,
                Err(e) => match exit_for_read_error(&e) {
                    Exit::Gone => return Err(Exit::Gone),
                    exit => {
                        tracing::debug!(error = %e, user = %self.core.user(), ?exit, "websocket protocol error");
                        self.core.handle_violation(violation_of(exit));
                        break;
                    }
                },
            }
        }
        Ok(read)
    }

    fn on_message(&mut self, message: Message) {
        let now = Instant::now();
        match message {
            Message::Text(text) => self.core.handle_text(now, text.as_str(), &*self.ctx),
            Message::Binary(_) => self.core.handle_binary(now),
            // tungstenite answers pings itself; either way the client is alive.
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => self.core.handle_heard(now),
            Message::Close(_) => self.core.handle_peer_closed(),
        }
    }

    /// Fires the core's timeout when its deadline passed, and keeps the one timer armed
    /// for the next deadline; whether it fired. `clock` is the turn's reading, if one was
    /// taken: a deadline that passed since only waits for the timer's own wake-up.
    fn poll_timer(&mut self, cx: &mut Context<'_>, clock: &mut Option<Instant>) -> bool {
        let mut fired = false;
        loop {
            let due = self.core.poll_timeout();
            if due < self.armed_for {
                // The deadline moved earlier: re-arm now (rare: a grace, a held presence frame).
                self.arm(due);
            }
            if self.charged && *clock.get_or_insert_with(Instant::now) < self.armed_for {
                return fired;
            }
            if Pin::new(&mut self.timer).poll(cx).is_pending() {
                self.charged = true;
                return fired;
            }
            self.charged = false;
            fired = true;
            self.core.handle_timeout(Instant::now());
            if self.core.poll_close().is_some() {
                return fired;
            }
            let next = self.core.poll_timeout();
            self.arm(next);
        }
    }

    fn arm(&mut self, at: Instant) {
        self.armed_for = at;
        // A reset keeps the waker only of a timer still in the reactor: poll it again.
        self.charged = false;
        self.timer
            .reset(at.saturating_duration_since(Instant::now()));
    }

    fn write_failed(&self, e: WsError) -> Exit {
        tracing::debug!(error = %e, user = %self.core.user(), "websocket write failed");
        Exit::Gone
    }
}

/// The session's name for a protocol failure.
fn violation_of(exit: Exit) -> Violation {
    match exit {
        Exit::Fail(1007, _) => Violation::InvalidUtf8,
        Exit::Fail(1009, _) => Violation::TooLarge,
        _ => Violation::Framing,
    }
}

/// What RFC 6455 asks of the server after tungstenite reports `e` while reading. This is
/// the whole mapping of tungstenite's errors; `DESIGN.md` lists it as a table.
fn exit_for_read_error(e: &WsError) -> Exit {
    use tungstenite::error::ProtocolError as P;
    match e {
        // §8.1: a text message (in any of its fragments) or a close reason that is not
        // UTF-8 fails the connection with 1007. tungstenite stops at the first bad byte;
        // the partial message it was assembling is dropped with the session.
        WsError::Utf8(_) => Exit::Fail(1007, "invalid UTF-8"),
        // §7.4.1: 1009 for a message too big to process. Frames somewhat over the limit
        // are read whole and answered with a `too_large` error instead (see `on_message`).
        WsError::Capacity(CapacityError::MessageTooLong { .. }) => {
            Exit::Fail(1009, "message too large")
        }
        // The client closed TCP without a close frame: nothing can be sent.
        WsError::Protocol(P::ResetWithoutClosingHandshake) => Exit::Gone,
        // Reserved bits or opcodes, bad fragmentation, oversized or fragmented control
        // frames, an unmasked client frame, a 1-byte close payload: 1002.
        WsError::Capacity(_) | WsError::Protocol(_) | WsError::AttackAttempt => {
            Exit::Fail(1002, "protocol error")
        }
        // A broken socket, or a state tungstenite already ended: nothing can be sent.
        WsError::ConnectionClosed
        | WsError::AlreadyClosed
        | WsError::Io(_)
        | WsError::WriteBufferFull(_) => Exit::Gone,
        // Handshake-only errors cannot happen on an open session; treat them as broken.
        _ => Exit::Fail(1002, "protocol error"),
    }
}

/// Ends a session as `exit` says: sends the server's close frame (unless the socket is
/// gone), flushes it, and closes TCP. After a close the server starts, it first waits up to
/// [`CLOSE_LINGER`] for the client's close, so that the client reads the code; after the
/// client's close, or after failing the connection, it closes TCP at once. Frames the
/// client sends meanwhile are never acted on.
async fn close(ws: &mut WebSocket<SyncIo<Socket>>, exit: Exit) {
    let (frame, wait_for_peer) = match exit {
        Exit::Gone => return,
        Exit::PeerClosed => (None, false),
        Exit::Fail(code, reason) => (Some(close_frame(code, reason)), false),
        Exit::Close(code, reason) => (Some(close_frame(code, reason)), true),
    };
    if let Some(frame) = frame {
        match ws.close(Some(frame)) {
            Ok(()) => {}
            Err(e) if would_block(&e) => {}
            // Terminated: the answer to the client's close went out (see below).
            Err(WsError::ConnectionClosed) => {}
            Err(_) => return,
        }
    }
    let mut linger = glommio::timer::Timer::new(CLOSE_LINGER);
    let flushed = poll_fn(|cx| {
        ws.get_mut().set_waker(cx.waker());
        if Pin::new(&mut linger).poll(cx).is_ready() {
            return Poll::Ready(false);
        }
        match ws.flush() {
            Ok(()) => {}
            Err(e) if would_block(&e) => return Poll::Pending,
            // tungstenite reports the end of a completed handshake this way, after it
            // wrote the last close frame.
            Err(WsError::ConnectionClosed) => return Poll::Ready(true),
            Err(_) => return Poll::Ready(false),
        }
        if !wait_for_peer {
            return Poll::Ready(true);
        }
        loop {
            match ws.read() {
                Ok(_) => continue,
                Err(e) if would_block(&e) => return Poll::Pending,
                Err(_) => return Poll::Ready(true),
            }
        }
    })
    .await;
    if flushed {
        shut_down(ws.get_mut(), &mut linger).await;
    }
}

fn close_frame(code: u16, reason: &'static str) -> CloseFrame {
    CloseFrame {
        code: CloseCode::from(code),
        reason: Utf8Bytes::from_static(reason),
    }
}

/// Closes the sending half of TCP, so the client reads the end of the stream right after
/// the close frame, then reads and drops whatever the client still sends until it closes
/// too (or the linger ends). Closing a socket with unread input would reset the
/// connection, and a reset can destroy the close frame before the client reads it.
async fn shut_down(io: &mut SyncIo<Socket>, linger: &mut glommio::timer::Timer) {
    if io.inner.shutdown(std::net::Shutdown::Write).await.is_err() {
        return;
    }
    let mut scratch = [0u8; 1024];
    poll_fn(|cx| {
        io.set_waker(cx.waker());
        if Pin::new(&mut *linger).poll(cx).is_ready() {
            return Poll::Ready(());
        }
        loop {
            match io.read(&mut scratch) {
                Ok(0) => return Poll::Ready(()),
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
                Err(_) => return Poll::Ready(()),
            }
        }
    })
    .await;
}
