//! The WebSocket endpoint `GET /ws/v1/connect`: the upgrade handshake, and the session that
//! runs on the connection afterwards, one task per connection on the shard that accepted it.
//!
//! # The session
//!
//! 1. The server hands over a connection whose first request line is the endpoint's. The
//!    request is read and answered with tungstenite's HTTP handshake code, on this shard's
//!    own stream (hyper's upgrade path needs a `Send` stream, which a glommio one is not).
//!    It is authenticated first (a bad token is answered 401 and never upgraded), then
//!    checked (RFC 6455), then answered 101.
//! 2. The session subscribes *held* ([`chorus_engine::Engine::subscribe_held`]): nothing
//!    is delivered yet, and nothing committed from now on is lost. Then it sends `hello`.
//! 3. It waits up to [`RESUME_GRACE`] for the client's first frame. A `resume` there starts
//!    the subscription from the client's seqs (missed events, then `resumed`, then live);
//!    anything else, or silence, starts it live from the subscription's beginning.
//! 4. Then one loop selects over the client's frames, the subscription's frames, the answer
//!    of the request in flight, the heartbeat deadline and the server's drain signal.
//!
//! Requests run one at a time per connection, in the order the client sent them, while
//! events keep flowing: a connection's posts land in its channel in the order it sent them,
//! and an `ack` goes out only once the engine has made the message durable. While a request
//! is in flight the session reads no further client frames, so a client that pipelines waits
//! in its own TCP buffers rather than in server memory.
//!
//! # Frames the server sends, and the close codes
//!
//! `hello`, `event` (the engine's encoded-once bytes, never re-encoded), `ack`
//! `{"ref","message"|null}`, `error` `{"ref"|null,"code","message"}` (plus `retry_after_ms`
//! when rate limited), `typing`, `pong`, `resumed`. A well-formed frame that breaks
//! `API.md` gets an `error` and the connection stays up: `invalid_json` (not JSON, or not
//! an object), `unsupported_frame` (binary frames), `too_large` (over
//! `ws_frame_bytes_max`), `unknown_type`, `invalid_request` (missing fields, wrong types),
//! `not_found` (unknown, malformed or foreign IDs: never revealed which), `rate_limited`,
//! and the engine's codes as in REST.
//!
//! A frame that breaks the WebSocket protocol itself fails the connection as RFC 6455 says
//! ([`exit_for_read_error`]): 1007 for a text message or close reason that is not UTF-8
//! (nothing of that message is acted on), 1009 for a message far over the limit, 1002 for
//! every other violation. The server sends its close frame and closes TCP at once, as it
//! does after answering the client's own close.
//!
//! Close codes the server starts: [`CLOSE_RESUME_REQUIRED`] (4000) when the client fell too
//! far behind; [`CLOSE_HEARTBEAT_TIMEOUT`] (4002) when it was silent for two heartbeat
//! intervals; 1001 "going away" when the server drains; 1011 when the engine cannot serve
//! the session. After these it waits up to [`CLOSE_LINGER`] for the client's close. After
//! any of them the client reconnects and resumes. Answers `ack`, `error` and `pong` carry
//! the request's `ref`; `typing:start` is answered only when it fails, and typing notices
//! over `typing_per_s` for a (user, channel) on a shard are dropped quietly.
//!
//! # Backpressure and memory
//!
//! Every buffer is bounded. Events wait in the engine's subscriber queue (at most
//! `ws_outbound_frames_max` frames). The session takes a batch of at most
//! [`BATCH_FRAMES_MAX`] out, hands it to tungstenite and flushes once, so a burst costs one
//! write per batch rather than one per frame. While the socket is blocked it takes nothing
//! more, so the queue absorbs a slow client: a live event that finds it full cuts the client
//! off (a catch-up instead waits for room), and once the session has written what was
//! queued before the cut it closes with 4000; the client resumes from its last seq, which
//! the log still has. The session learns of the cut when the socket drains; a client that
//! never reads again holds only those bounded buffers until the heartbeat closes it (its
//! answers back up, so its JSON frames stop being read too). An idle connection
//! holds a read buffer of [`READ_BUFFER_BYTES`] and a few small structures; write buffers
//! grow only while there is something to write.
//!
//! tungstenite's protocol state machine is driven directly over a small non-blocking
//! adapter (`SyncIo`) rather than through a stream wrapper: one task polls reads and
//! writes of the same socket in one place, with no lock between a reading and a writing
//! half, and the session decides how each protocol error ends the connection.

use crate::conn::Socket;
use crate::ctx::ShardCtx;
use crate::error::ApiError;
use bytes::Bytes;
use chorus_engine::ids::{ChannelId, MessageId, UserId};
use chorus_engine::queue::Cutoff;
use chorus_engine::view::MessageView;
use chorus_engine::Subscription;
use futures::channel::oneshot;
use futures::future::{poll_fn, LocalBoxFuture};
use futures::io::{AsyncRead, AsyncWrite};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io::{self, Read, Write};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
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

/// How long the session waits for a `resume` as the first frame before it starts live.
pub const RESUME_GRACE: Duration = Duration::from_millis(200);
/// tungstenite's read buffer, allocated for the life of the connection. Client frames are
/// small; a larger one is read in several calls. This is most of an idle connection's cost.
pub const READ_BUFFER_BYTES: usize = 2 * 1024;
/// Bytes tungstenite gathers before it writes to the socket; a batch is flushed at its end
/// anyway. The buffer only grows while a batch is being written.
pub const WRITE_BUFFER_BYTES: usize = 16 * 1024;
/// The largest frame the server writes: a 1 MiB text escapes to at most ~6 MiB of JSON.
/// Only a safety net: the session never writes while the socket is blocked, so the write
/// buffer holds at most [`WRITE_BUFFER_BYTES`] plus one frame.
pub const OUTBOUND_FRAME_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Frames handed to tungstenite before one flush.
pub const BATCH_FRAMES_MAX: usize = 64;
/// Staging slots a connection keeps between bursts.
pub const STAGED_IDLE_SLOTS_MAX: usize = 8;
/// Answers (acks, errors, pongs) waiting to be written; when full, the session stops reading
/// client frames until the socket drains.
pub const REPLIES_MAX: usize = 16;
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
pub async fn serve(ctx: Rc<ShardCtx>, stream: Socket, deadline: Instant) {
    // The handshake's and the subscription's futures are boxed: they are done before the
    // session starts, and inline they would enlarge every idle connection's task.
    let handshake = Box::pin(handshake(&ctx, stream));
    let Some((user, mut ws)) = crate::conn::until(deadline, handshake).await.flatten() else {
        return;
    };
    let sub = match Box::pin(ctx.shared.engine.subscribe_held(user)).await {
        Ok(sub) => sub,
        Err(e) => {
            tracing::warn!(error = %e, "subscribe failed");
            Box::pin(close(&mut ws, Exit::Close(1011, "unavailable"))).await;
            return;
        }
    };
    // Owned here and borrowed by `run`: an async fn taking it by value would hold it twice.
    let mut session = Session::new(ctx, user, ws, sub);
    session.run().await;
}

/// Reads the upgrade request and answers it, within the connection's header deadline.
/// Returns the user and the WebSocket when it was accepted. Everything it holds (the
/// request, its headers, the handshake's buffers) is gone once it returns, so an idle
/// session does not keep it.
async fn handshake(ctx: &ShardCtx, stream: Socket) -> Option<(UserId, WebSocket<SyncIo<Socket>>)> {
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
) -> Result<(UserId, HandshakeResponse), (ApiError, ExtraHeader)> {
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
struct SyncIo<S> {
    inner: S,
    waker: Waker,
}

impl<S> SyncIo<S> {
    fn new(inner: S) -> SyncIo<S> {
        SyncIo {
            inner,
            waker: futures::task::noop_waker(),
        }
    }

    /// Sets the waker of the task polling now; called at the top of every poll.
    fn set_waker(&mut self, waker: &Waker) {
        if !self.waker.will_wake(waker) {
            self.waker = waker.clone();
        }
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
        self.poll_io(|s, cx| s.poll_read(cx, buf))
    }
}

impl<S: AsyncWrite + Unpin> Write for SyncIo<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
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

/// Why a session ends.
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

/// What woke the session loop.
enum Step {
    /// A frame from the client, or the error reading it.
    Client(Result<Message, WsError>),
    /// The first-frame grace ran out without a client frame.
    GraceOver,
    /// A full batch went out and more may be ready: yield, then go on.
    More,
    /// The session must end.
    Exit(Exit),
}

/// What the outbound side did in one poll.
enum Outbound {
    /// Nothing more to do until a waker fires.
    Idle,
    /// Wrote and may have more right away.
    More,
    /// The session must end.
    Exit(Exit),
}

struct Session {
    ctx: Rc<ShardCtx>,
    user: UserId,
    ws: WebSocket<SyncIo<Socket>>,
    /// Taken when the session ends, so that the engine stops queueing for a closing client.
    sub: Option<Subscription>,
    drain: oneshot::Receiver<()>,
    /// Set until the subscription is started by the first frame or the grace's end.
    grace: Option<glommio::timer::Timer>,
    /// Fires when the client may have been silent too long; see `poll_heartbeat`.
    heartbeat: glommio::timer::Timer,
    last_heard: Instant,
    silence_max: Duration,
    /// Event frames taken from the subscription and not yet given to tungstenite: at most
    /// one batch.
    staged: Vec<Bytes>,
    /// Answers to the client, written before events.
    replies: VecDeque<Bytes>,
    /// The request in flight, which answers with a frame or nothing.
    request: Option<LocalBoxFuture<'static, Option<Bytes>>>,
    /// The socket refused the last write; flush before writing more.
    blocked: bool,
    frame_bytes_max: usize,
}

impl Session {
    fn new(
        ctx: Rc<ShardCtx>,
        user: UserId,
        ws: WebSocket<SyncIo<Socket>>,
        sub: Subscription,
    ) -> Session {
        let config = &ctx.shared.config;
        let silence_max = Duration::from_secs(config.heartbeat_interval_s.saturating_mul(2));
        let frame_bytes_max = config.ws_frame_bytes_max;
        let drain = ctx.on_drain();
        Session {
            ctx,
            user,
            ws,
            sub: Some(sub),
            drain,
            grace: Some(glommio::timer::Timer::new(RESUME_GRACE)),
            heartbeat: glommio::timer::Timer::new(silence_max),
            last_heard: Instant::now(),
            silence_max,
            staged: Vec::new(),
            replies: VecDeque::new(),
            request: None,
            blocked: false,
            frame_bytes_max,
        }
    }

    async fn run(&mut self) {
        let hello = encode(&json!({
            "type": "hello",
            "conn_id": format!("{:016x}", rand::random::<u64>()),
            "user_id": self.user,
            "heartbeat_interval": self.ctx.shared.config.heartbeat_interval_s,
        }));
        self.replies.push_back(hello);
        let exit = self.serve().await;
        // Unsubscribe before lingering: the engine stops queueing for a closing client.
        self.sub = None;
        Box::pin(close(&mut self.ws, exit)).await;
    }

    /// The session loop; returns how to end.
    async fn serve(&mut self) -> Exit {
        loop {
            let step = poll_fn(|cx| self.poll_step(cx)).await;
            // The handlers' futures are boxed: they run once per client frame, and inline
            // they would enlarge every idle connection's task by their size.
            let next = match step {
                Step::Client(Ok(message)) => Box::pin(self.on_message(message)).await,
                Step::Client(Err(e)) => Some(self.on_read_error(e)),
                Step::GraceOver => {
                    self.grace = None;
                    Box::pin(self.start(None)).await
                }
                Step::More => None,
                Step::Exit(exit) => Some(exit),
            };
            if let Some(exit) = next {
                return exit;
            }
            // A busy connection must not starve the shard's other tasks.
            glommio::yield_if_needed().await;
        }
    }

    /// Polls every source once, in an order that lets each make progress under load.
    fn poll_step(&mut self, cx: &mut Context<'_>) -> Poll<Step> {
        self.ws.get_mut().set_waker(cx.waker());
        if Pin::new(&mut self.drain).poll(cx).is_ready() {
            // A dropped sender means the shard is going away too.
            return Poll::Ready(Step::Exit(Exit::Close(1001, "going away")));
        }
        if let Some(request) = self.request.as_mut() {
            if let Poll::Ready(answer) = request.as_mut().poll(cx) {
                self.request = None;
                self.replies.extend(answer);
            }
        }
        let outbound = match self.poll_outbound(cx) {
            Outbound::Exit(exit) => return Poll::Ready(Step::Exit(exit)),
            other => other,
        };
        if self.request.is_none() && self.replies.len() < REPLIES_MAX {
            match self.ws.read() {
                Err(e) if would_block(&e) => {}
                other => return Poll::Ready(Step::Client(other)),
            }
        }
        if let Some(grace) = self.grace.as_mut() {
            if Pin::new(grace).poll(cx).is_ready() {
                return Poll::Ready(Step::GraceOver);
            }
        }
        if self.poll_heartbeat(cx) {
            return Poll::Ready(Step::Exit(Exit::Close(
                CLOSE_HEARTBEAT_TIMEOUT,
                "heartbeat timeout",
            )));
        }
        match outbound {
            Outbound::More => Poll::Ready(Step::More),
            _ => Poll::Pending,
        }
    }

    /// Whether the client has been silent for too long. The timer is re-armed for the
    /// remainder when frames arrived meanwhile, so it costs one wake-up per interval rather
    /// than a timer per frame.
    fn poll_heartbeat(&mut self, cx: &mut Context<'_>) -> bool {
        while Pin::new(&mut self.heartbeat).poll(cx).is_ready() {
            let silent = self.last_heard.elapsed();
            if silent >= self.silence_max {
                return true;
            }
            self.heartbeat.reset(self.silence_max - silent);
        }
        false
    }

    /// Moves frames from the subscription and the replies to the socket: one batch, one
    /// flush. While the socket is blocked nothing more is taken from the subscription, so
    /// its bounded queue is what absorbs a slow client, and the engine cuts the client off
    /// when it overflows (a catch-up instead waits for room).
    fn poll_outbound(&mut self, cx: &mut Context<'_>) -> Outbound {
        if self.blocked {
            match self.ws.flush() {
                Ok(()) => self.blocked = false,
                Err(e) if would_block(&e) => return Outbound::Idle,
                Err(e) => return Outbound::Exit(self.write_failed(e)),
            }
        }
        let (cutoff, waiting) = self.fill_staging(cx);
        let (replies, events) = match self.write_batch() {
            Ok(counts) => counts,
            Err(e) => return Outbound::Exit(self.write_failed(e)),
        };
        // Deliveries and cutoffs are counted by the engine, which sees every subscriber.
        let frames = (replies + events) as u64;
        self.ctx.shared.metrics.ws_frames_out.add(frames);
        if self.blocked {
            // The socket's waker is registered; it fires when the client reads.
            return Outbound::Idle;
        }
        if self.staged.is_empty() && self.staged.capacity() > STAGED_IDLE_SLOTS_MAX {
            // An idle connection should not keep what a burst took.
            self.staged.shrink_to(STAGED_IDLE_SLOTS_MAX);
        }
        match cutoff {
            // The frames queued before the cutoff went out first.
            Some(cutoff) if self.staged.is_empty() => Outbound::Exit(self.cut_off(cutoff)),
            _ if waiting && self.staged.is_empty() => Outbound::Idle,
            _ => Outbound::More,
        }
    }

    /// Takes the subscription's ready frames into staging, up to its bound. Returns the
    /// cutoff once every frame before it was taken, and whether the queue's waker is
    /// registered (it was found empty).
    fn fill_staging(&mut self, cx: &mut Context<'_>) -> (Option<Cutoff>, bool) {
        let room = BATCH_FRAMES_MAX.saturating_sub(self.staged.len());
        if room == 0 {
            return (None, false);
        }
        let sub = self.sub.as_mut().expect("subscribed while serving");
        match sub.try_recv_batch(&mut self.staged, room) {
            Ok(0) => {}
            Ok(_) => return (None, false),
            Err(cutoff) => return (Some(cutoff), false),
        }
        match sub.receiver().poll_recv(cx) {
            Poll::Ready(Ok(frame)) => {
                self.staged.push(frame);
                (None, false)
            }
            Poll::Ready(Err(cutoff)) => (Some(cutoff), false),
            Poll::Pending => (None, true),
        }
    }

    /// Hands the replies and up to a batch of staged events to tungstenite, then flushes
    /// once. Returns how many of each went out (or were accepted before the socket blocked).
    fn write_batch(&mut self) -> Result<(usize, usize), WsError> {
        let mut replies = 0;
        while !self.blocked {
            let Some(frame) = self.replies.pop_front() else {
                break;
            };
            self.write_frame(frame)?;
            replies += 1;
        }
        let mut events = 0;
        while !self.blocked && events < self.staged.len().min(BATCH_FRAMES_MAX) {
            let frame = std::mem::take(&mut self.staged[events]);
            events += 1;
            self.write_frame(frame)?;
        }
        self.staged.drain(..events);
        if replies + events > 0 && !self.blocked {
            match self.ws.flush() {
                Ok(()) => {}
                Err(e) if would_block(&e) => self.blocked = true,
                Err(e) => return Err(e),
            }
        }
        Ok((replies, events))
    }

    /// Gives one frame to tungstenite. A `WouldBlock` means it was accepted but the socket
    /// is full: the session stops writing until a flush succeeds.
    fn write_frame(&mut self, frame: Bytes) -> Result<(), WsError> {
        // Every frame is serde_json output or the engine's, which is also serde_json's.
        let text = Utf8Bytes::try_from(frame).map_err(|_| {
            WsError::Io(io::Error::new(
                io::ErrorKind::InvalidData,
                "an outbound frame is not UTF-8",
            ))
        })?;
        match self.ws.write(Message::Text(text)) {
            Ok(()) => Ok(()),
            Err(e) if would_block(&e) => {
                self.blocked = true;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn write_failed(&self, e: WsError) -> Exit {
        tracing::debug!(error = %e, user = %self.user, "websocket write failed");
        Exit::Gone
    }

    fn cut_off(&self, cutoff: Cutoff) -> Exit {
        match cutoff {
            Cutoff::Overflow => {
                tracing::debug!(user = %self.user, "slow websocket client cut off");
                Exit::Close(CLOSE_RESUME_REQUIRED, "resume required")
            }
            Cutoff::Closed => Exit::Close(1001, "going away"),
        }
    }

    /// A read error ends the session: every error tungstenite reports while reading is a
    /// broken protocol or a broken socket, and RFC 6455 fails the connection for the first.
    /// (Frames that are well-formed but break `API.md` are answered in `on_message`.)
    fn on_read_error(&self, e: WsError) -> Exit {
        let exit = exit_for_read_error(&e);
        if exit != Exit::Gone {
            tracing::debug!(error = %e, user = %self.user, ?exit, "websocket protocol error");
        }
        exit
    }

    fn heard(&mut self) {
        self.last_heard = Instant::now();
        self.ctx.shared.metrics.ws_frames_in.inc();
    }

    async fn on_message(&mut self, message: Message) -> Option<Exit> {
        self.heard();
        match message {
            Message::Text(text) if text.len() > self.frame_bytes_max => {
                let limit = self.frame_bytes_max;
                let err = ApiError::too_large(format!("a frame may hold at most {limit} bytes"));
                self.reply_error(&Value::Null, &err);
                None
            }
            Message::Text(text) => self.on_text(text.as_str()).await,
            Message::Binary(_) => {
                let err = ApiError::invalid("frames are JSON text; binary frames are not used");
                self.reply_error(
                    &Value::Null,
                    &ApiError {
                        code: "unsupported_frame",
                        ..err
                    },
                );
                None
            }
            // tungstenite answers pings itself; either way the client is alive.
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => None,
            Message::Close(_) => Some(Exit::PeerClosed),
        }
    }

    async fn on_text(&mut self, text: &str) -> Option<Exit> {
        let (reference, parsed) = parse_frame(text);
        if self.grace.take().is_some() {
            // The first frame decides where the subscription starts.
            let since = match &parsed {
                Ok(ClientFrame::Resume { since, unknown }) => {
                    self.report_unknown(&reference, unknown);
                    Some(since.clone())
                }
                _ => None,
            };
            if let Some(exit) = self.start(since.clone()).await {
                return Some(exit);
            }
            if since.is_some() {
                return None;
            }
        }
        match parsed {
            Ok(frame) => self.on_frame(reference, frame).await,
            Err(e) => {
                self.reply_error(&reference, &e);
                None
            }
        }
    }

    /// Starts the held subscription: from the client's seqs, or live.
    async fn start(&mut self, since: Option<Vec<(ChannelId, u64)>>) -> Option<Exit> {
        let sub = self.sub.as_ref().expect("subscribed while serving");
        match sub.start(since).await {
            Ok(()) => None,
            Err(e) => {
                tracing::warn!(error = %e, user = %self.user, "starting a subscription failed");
                Some(Exit::Close(1011, "unavailable"))
            }
        }
    }

    async fn on_frame(&mut self, reference: Value, frame: ClientFrame) -> Option<Exit> {
        match frame {
            ClientFrame::Ping => {
                self.replies
                    .push_back(encode(&json!({"type": "pong", "ref": reference})));
            }
            ClientFrame::Resume { since, unknown } => {
                self.report_unknown(&reference, &unknown);
                let sub = self.sub.as_ref().expect("subscribed while serving");
                match sub.resume(since).await {
                    Ok(true) => {}
                    // Live frames of a named channel already went out after the point the
                    // client asks for: sending the older ones now would break the order.
                    // The client reconnects and resumes as its first frame.
                    Ok(false) => {
                        return Some(Exit::Close(CLOSE_RESUME_REQUIRED, "resume required"))
                    }
                    Err(e) => self.reply_error(&reference, &ApiError::from(e)),
                }
            }
            ClientFrame::Typing(channel) => {
                if self.ctx.typing_allowed(self.user, channel) {
                    let engine = self.ctx.shared.engine.clone();
                    let user = self.user;
                    self.request = Some(Box::pin(async move {
                        let r = engine.typing(user, channel).await;
                        r.err().map(|e| error_frame(&reference, &ApiError::from(e)))
                    }));
                }
            }
            ClientFrame::Command(command) => match self.ctx.take_rate(self.user.0) {
                Ok(()) => self.request = Some(command.run(&self.ctx, self.user, reference)),
                Err(e) => self.reply_error(&reference, &e),
            },
        }
        None
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
        let mut frame = error_value(reference, &e);
        frame["channel_ids"] = json!(unknown);
        self.replies.push_back(encode(&frame));
    }

    fn reply_error(&mut self, reference: &Value, e: &ApiError) {
        self.replies.push_back(error_frame(reference, e));
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

// ---------------------------------------------------------------------------------------
// Client frames
// ---------------------------------------------------------------------------------------

/// A frame the client may send, parsed and checked.
#[derive(Debug)]
enum ClientFrame {
    Ping,
    /// A resume: the channels to resume, and the IDs named that do not parse, which are
    /// reported and skipped rather than failing the whole frame.
    Resume {
        since: Vec<(ChannelId, u64)>,
        unknown: Vec<String>,
    },
    Typing(ChannelId),
    Command(Command),
}

/// A request that changes a channel: rate limited, answered with an `ack`.
#[derive(Debug)]
enum Command {
    Send {
        channel: ChannelId,
        text: String,
        client_msg_id: Option<String>,
        thread: Option<MessageId>,
    },
    Edit {
        message: MessageId,
        text: String,
    },
    Delete {
        message: MessageId,
    },
    React {
        message: MessageId,
        emoji: String,
        add: bool,
    },
}

impl Command {
    /// The engine call, answering with its `ack` or `error` frame once it is durable.
    fn run(
        self,
        ctx: &ShardCtx,
        user: UserId,
        reference: Value,
    ) -> LocalBoxFuture<'static, Option<Bytes>> {
        let engine = ctx.shared.engine.clone();
        Box::pin(async move {
            let result: Result<Option<MessageView>, _> = match self {
                Command::Send {
                    channel,
                    text,
                    client_msg_id,
                    thread,
                } => engine
                    .post(user, channel, &text, client_msg_id.as_deref(), thread)
                    .await
                    .map(|(m, _)| Some(m)),
                Command::Edit { message, text } => {
                    engine.edit(user, message, &text).await.map(Some)
                }
                Command::Delete { message } => engine.delete(user, message).await.map(|()| None),
                Command::React {
                    message,
                    emoji,
                    add,
                } => engine
                    .react(user, message, &emoji, add)
                    .await
                    .map(|()| None),
            };
            Some(match result {
                Ok(message) => {
                    encode(&json!({"type": "ack", "ref": reference, "message": message}))
                }
                Err(e) => error_frame(&reference, &ApiError::from(e)),
            })
        })
    }
}

#[derive(Deserialize)]
struct SendFields {
    channel_id: String,
    text: String,
    #[serde(default)]
    client_msg_id: Option<String>,
    #[serde(default)]
    thread_id: Option<String>,
}

#[derive(Deserialize)]
struct EditFields {
    channel_id: String,
    message_id: String,
    text: String,
}

#[derive(Deserialize)]
struct TargetFields {
    channel_id: String,
    message_id: String,
}

#[derive(Deserialize)]
struct ReactFields {
    channel_id: String,
    message_id: String,
    emoji: String,
}

#[derive(Deserialize)]
struct TypingFields {
    channel_id: String,
}

#[derive(Deserialize)]
struct ResumeFields {
    since: HashMap<String, u64>,
}

/// Parses a text frame into the `ref` to echo and the frame, or the error to answer.
fn parse_frame(text: &str) -> (Value, Result<ClientFrame, ApiError>) {
    if !crate::json::depth_within(text.as_bytes(), crate::json::JSON_DEPTH_MAX) {
        return (Value::Null, Err(crate::api::too_deep()));
    }
    let mut object = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(object)) => object,
        Ok(_) => return (Value::Null, Err(bad_json("a frame must be a JSON object"))),
        Err(e) => return (Value::Null, Err(bad_json(format!("malformed JSON: {e}")))),
    };
    let reference = match object.remove("ref") {
        None | Some(Value::Null) => Value::Null,
        Some(r @ (Value::String(_) | Value::Number(_))) => r,
        Some(_) => {
            let e = ApiError::invalid("ref must be a string or a number");
            return (Value::Null, Err(e));
        }
    };
    let kind = match object.remove("type") {
        Some(Value::String(kind)) => kind,
        Some(_) => return (reference, Err(ApiError::invalid("type must be a string"))),
        None => return (reference, Err(ApiError::invalid("a frame needs a type"))),
    };
    let frame = frame_of(&kind, object);
    (reference, frame)
}

fn frame_of(kind: &str, object: Map<String, Value>) -> Result<ClientFrame, ApiError> {
    let frame = match kind {
        "ping" => ClientFrame::Ping,
        "resume" => {
            let f: ResumeFields = fields(object)?;
            let mut since = Vec::with_capacity(f.since.len());
            let mut unknown = Vec::new();
            for (c, seq) in f.since {
                match c.parse::<ChannelId>() {
                    Ok(id) => since.push((id, seq)),
                    Err(_) => unknown.push(c.chars().take(64).collect()),
                }
            }
            unknown.sort();
            ClientFrame::Resume { since, unknown }
        }
        "typing:start" => {
            let f: TypingFields = fields(object)?;
            ClientFrame::Typing(parse_id(&f.channel_id, "channel")?)
        }
        "message:send" => {
            let f: SendFields = fields(object)?;
            let channel = parse_id(&f.channel_id, "channel")?;
            let thread = f.thread_id.map(|t| message_in(&t, channel)).transpose()?;
            ClientFrame::Command(Command::Send {
                channel,
                text: f.text,
                client_msg_id: f.client_msg_id,
                thread,
            })
        }
        "message:edit" => {
            let f: EditFields = fields(object)?;
            let message = target(&f.channel_id, &f.message_id)?;
            ClientFrame::Command(Command::Edit {
                message,
                text: f.text,
            })
        }
        "message:delete" => {
            let f: TargetFields = fields(object)?;
            let message = target(&f.channel_id, &f.message_id)?;
            ClientFrame::Command(Command::Delete { message })
        }
        "reaction:add" | "reaction:remove" => {
            let f: ReactFields = fields(object)?;
            let message = target(&f.channel_id, &f.message_id)?;
            ClientFrame::Command(Command::React {
                message,
                emoji: f.emoji,
                add: kind == "reaction:add",
            })
        }
        other => {
            let shown: String = other.chars().take(64).collect();
            return Err(ApiError::new(
                400,
                "unknown_type",
                format!("unknown frame type {shown:?}"),
            ));
        }
    };
    Ok(frame)
}

fn fields<T: DeserializeOwned>(object: Map<String, Value>) -> Result<T, ApiError> {
    serde_json::from_value(Value::Object(object)).map_err(|e| ApiError::invalid(e.to_string()))
}

fn bad_json(message: impl Into<String>) -> ApiError {
    ApiError::bad_json(message)
}

/// An ID that does not parse names nothing, so it is not found, as in REST.
fn parse_id<T: std::str::FromStr>(s: &str, what: &str) -> Result<T, ApiError> {
    s.parse().map_err(|_| ApiError::not_found(what))
}

/// A message of the given channel; one of another channel is not found there.
fn message_in(s: &str, channel: ChannelId) -> Result<MessageId, ApiError> {
    let id: MessageId = parse_id(s, "message")?;
    if id.channel != channel {
        return Err(ApiError::not_found("message"));
    }
    Ok(id)
}

fn target(channel: &str, message: &str) -> Result<MessageId, ApiError> {
    message_in(message, parse_id(channel, "channel")?)
}

// ---------------------------------------------------------------------------------------
// Server frames
// ---------------------------------------------------------------------------------------

fn encode(value: &Value) -> Bytes {
    Bytes::from(serde_json::to_vec(value).expect("a JSON value always serializes"))
}

/// `{"type":"error","ref","code","message"}`, with `retry_after_ms` when rate limited.
fn error_frame(reference: &Value, e: &ApiError) -> Bytes {
    encode(&error_value(reference, e))
}

fn error_value(reference: &Value, e: &ApiError) -> Value {
    let mut frame = json!({
        "type": "error",
        "ref": reference,
        "code": e.code,
        "message": e.message,
    });
    if let Some(after) = e.retry_after {
        let ms = u64::try_from(after.as_millis()).unwrap_or(u64::MAX).max(1);
        frame["retry_after_ms"] = json!(ms);
    }
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code_of(text: &str) -> &'static str {
        match parse_frame(text).1 {
            Ok(f) => panic!("{text} parsed as {f:?}"),
            Err(e) => e.code,
        }
    }

    // Each kind of bad frame maps to its documented error code, and the ref is echoed when
    // it could be read.
    #[test]
    fn bad_frames_get_their_codes() {
        assert_eq!(code_of("{"), "invalid_json");
        assert_eq!(code_of("[1,2]"), "invalid_json");
        assert_eq!(code_of(r#"{"ref":1}"#), "invalid_request");
        assert_eq!(code_of(r#"{"type":7}"#), "invalid_request");
        assert_eq!(code_of(r#"{"type":"nope"}"#), "unknown_type");
        assert_eq!(
            code_of(r#"{"type":"message:send","text":"x"}"#),
            "invalid_request"
        );
        assert_eq!(
            code_of(r#"{"type":"message:send","channel_id":5,"text":"x"}"#),
            "invalid_request"
        );
        assert_eq!(
            code_of(r#"{"type":"message:send","channel_id":"C!","text":"x"}"#),
            "not_found"
        );
        assert_eq!(
            code_of(r#"{"type":"message:edit","channel_id":"C1","message_id":"M2-1","text":"x"}"#),
            "not_found"
        );
        assert_eq!(
            code_of(r#"{"type":"resume","since":{"C1":-1}}"#),
            "invalid_request"
        );
        let (reference, _) = parse_frame(r#"{"type":"nope","ref":"r1"}"#);
        assert_eq!(reference, json!("r1"));
    }

    // Good frames parse into what the session runs.
    #[test]
    fn good_frames_parse() {
        let c = ChannelId(9).to_string();
        let m = MessageId {
            channel: ChannelId(9),
            seq: 3,
        }
        .to_string();
        let send = json!({
            "type": "message:send", "ref": "a", "channel_id": c, "text": "hi",
            "client_msg_id": "k", "thread_id": m
        })
        .to_string();
        match parse_frame(&send).1 {
            Ok(ClientFrame::Command(Command::Send { thread, .. })) => {
                assert_eq!(thread.map(|t| t.seq), Some(3))
            }
            other => panic!("{other:?}"),
        }
        let resume = format!(r#"{{"type":"resume","since":{{"{c}":4}}}}"#);
        match parse_frame(&resume).1 {
            Ok(ClientFrame::Resume { since, unknown }) => {
                assert_eq!(since, vec![(ChannelId(9), 4)]);
                assert!(unknown.is_empty());
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_frame(r#"{"type":"ping"}"#).1,
            Ok(ClientFrame::Ping)
        ));
    }

    // The error frame carries retry_after_ms only when rate limited.
    #[test]
    fn error_frame_shape() {
        let e = ApiError::rate_limited(Duration::from_millis(1500));
        let v: Value = serde_json::from_slice(&error_frame(&json!(3), &e)).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["ref"], 3);
        assert_eq!(v["code"], "rate_limited");
        assert_eq!(v["retry_after_ms"], 1500);
        let v: Value =
            serde_json::from_slice(&error_frame(&Value::Null, &ApiError::not_found("x"))).unwrap();
        assert!(v.get("retry_after_ms").is_none());
        assert!(v["ref"].is_null());
    }
}
