//! One accepted TCP connection: telling a WebSocket handshake from HTTP, the deadlines that
//! drop clients too slow to send a request, and serving HTTP/1.1 through hyper.
//!
//! # Deadlines (slowloris)
//!
//! A connection that holds a slot without completing requests is dropped:
//!
//! - its first request head (HTTP, or the WebSocket upgrade) must be complete within
//!   `http_header_timeout_s` of the accept, whether the client is silent or sends a byte a
//!   second;
//! - a later request's head must be complete within `http_header_timeout_s` of its first
//!   byte;
//! - a keep-alive connection may sit idle between requests for `http_idle_timeout_s`.
//!
//! While a request is being served there is no deadline: request bodies are bounded by
//! `request_body_bytes_max`, and a WebSocket session has its own heartbeat. Each
//! connection has one timer, re-armed only when it fires. Together with
//! `connections_per_ip_max` (see `server`), one address cannot hold the server's
//! connection slots for long.

use crate::ctx::ShardCtx;
use crate::error::ApiError;
use bytes::Bytes;
use futures::future::{select, Either};
use futures::io::{AsyncRead, AsyncWrite};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use std::cell::Cell;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// Bytes peeked at the start of a connection to tell a WebSocket handshake from HTTP.
const WS_PREFIX: &[u8] = b"GET /ws/v1/connect";
/// The first and the longest pause between two peeks at a request line that arrives in
/// pieces; the pause doubles in between, so a slow sender costs few wake-ups.
const PEEK_PAUSE_MIN: Duration = Duration::from_millis(1);
const PEEK_PAUSE_MAX: Duration = Duration::from_millis(100);

/// The socket of a connection.
pub type Socket = glommio::net::TcpStream;

/// Serves one TCP connection: a WebSocket session, or HTTP/1.1 requests.
///
/// hyper's own upgrade path needs a `Send` stream, and a glommio stream belongs to its
/// shard, so the two are told apart before either library reads: the first bytes are
/// peeked (not consumed), and a connection whose first request is `GET /ws/v1/connect`
/// goes whole to [`crate::ws::serve`], which does the handshake with tungstenite and runs
/// the session. Everything else goes to hyper.
///
/// Every phase is boxed, so that a connection's task holds a pointer and not the largest
/// phase inline: the peek (and the socket while it waits) is boxed before the returned
/// future exists, and is gone once decided; an idle WebSocket does not carry hyper's
/// connection state, and the reverse.
pub fn serve(ctx: Rc<ShardCtx>, stream: Socket) -> impl std::future::Future<Output = ()> {
    let header_timeout = Duration::from_secs(ctx.shared.config.http_header_timeout_s);
    let deadline = Instant::now() + header_timeout;
    let peek = Box::pin(async move {
        let websocket = until(deadline, is_websocket(&stream)).await;
        (stream, websocket)
    });
    async move {
        let (stream, websocket) = peek.await;
        match websocket {
            Some(true) => Box::pin(crate::ws::serve(ctx, stream, deadline)).await,
            Some(false) => Box::pin(serve_http(ctx, stream, deadline)).await,
            None => {}
        }
    }
}

/// Runs `fut` until `deadline`; `None` if the deadline came first.
pub async fn until<T>(deadline: Instant, fut: impl std::future::Future<Output = T>) -> Option<T> {
    let left = deadline.saturating_duration_since(Instant::now());
    let timer = glommio::timer::Timer::new(left);
    match select(std::pin::pin!(fut), timer).await {
        Either::Left((value, _)) => Some(value),
        Either::Right(_) => None,
    }
}

/// Whether the connection starts with a WebSocket request line, by peeking until the
/// prefix is decided (or the peer stops sending).
async fn is_websocket(stream: &Socket) -> bool {
    let mut buf = [0u8; WS_PREFIX.len()];
    let mut pause = PEEK_PAUSE_MIN;
    loop {
        let n = match stream.peek(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => n,
        };
        if buf[..n] != WS_PREFIX[..n] {
            return false;
        }
        if n == WS_PREFIX.len() {
            return true;
        }
        // A request line split over packets: wait for more of it.
        glommio::timer::sleep(pause).await;
        pause = (pause * 2).min(PEEK_PAUSE_MAX);
    }
}

/// Where a connection is between requests, for its deadline.
struct Clock {
    /// Requests being served.
    busy: Cell<u32>,
    /// When the first byte of the next request head arrived (the accept, for the first).
    head_started: Cell<Option<Instant>>,
    /// When the last response was handed to hyper.
    idle_since: Cell<Instant>,
    header_timeout: Duration,
    idle_timeout: Duration,
}

impl Clock {
    /// When the connection must be dropped if nothing changes, or `None` while a request
    /// is being served.
    fn deadline(&self) -> Option<Instant> {
        if self.busy.get() > 0 {
            return None;
        }
        Some(match self.head_started.get() {
            Some(started) => started + self.header_timeout,
            None => self.idle_since.get() + self.idle_timeout,
        })
    }

    fn bytes_read(&self) {
        if self.busy.get() == 0 && self.head_started.get().is_none() {
            self.head_started.set(Some(Instant::now()));
        }
    }

    fn request_started(&self) {
        self.busy.set(self.busy.get() + 1);
        self.head_started.set(None);
    }

    fn request_done(&self) {
        self.busy.set(self.busy.get() - 1);
        self.idle_since.set(Instant::now());
    }

    /// Completes when the deadline passes; the one timer is re-armed only when it fires.
    async fn expired(&self) {
        loop {
            let wait = match self.deadline() {
                Some(deadline) => match deadline.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => left,
                    _ => return,
                },
                None => self.header_timeout,
            };
            glommio::timer::sleep(wait).await;
        }
    }
}

/// The socket as hyper reads it, telling the clock when request bytes arrive.
struct Watched {
    inner: Socket,
    clock: Rc<Clock>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            if n > 0 {
                this.clock.bytes_read();
            }
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

/// Serves HTTP/1.1 requests until the client closes, a deadline passes, or the drain.
async fn serve_http(ctx: Rc<ShardCtx>, stream: Socket, first_head_deadline: Instant) {
    let config = &ctx.shared.config;
    let header_timeout = Duration::from_secs(config.http_header_timeout_s);
    let clock = Rc::new(Clock {
        busy: Cell::new(0),
        head_started: Cell::new(Some(first_head_deadline - header_timeout)),
        idle_since: Cell::new(Instant::now()),
        header_timeout,
        idle_timeout: Duration::from_secs(config.http_idle_timeout_s),
    });
    let peer = stream.peer_addr().ok().map(|a| a.ip());
    let io = smol_hyper::rt::FuturesIo::new(Watched {
        inner: stream,
        clock: clock.clone(),
    });
    let mut drain = ctx.on_drain();
    let service_clock = clock.clone();
    let service = hyper::service::service_fn(move |req| {
        let (ctx, clock) = (ctx.clone(), service_clock.clone());
        clock.request_started();
        async move {
            let response = route(ctx, req, peer).await;
            clock.request_done();
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    let mut conn = Box::pin(
        hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
            .max_buf_size(64 * 1024)
            .serve_connection(io, service),
    );
    let expired = std::pin::pin!(clock.expired());
    let stop = select(expired, &mut drain);
    let ended = match select(conn.as_mut(), stop).await {
        Either::Left((ended, _)) => ended,
        Either::Right((Either::Left(_), _)) => {
            // Too slow to send a request, or idle too long: the slot goes to someone else.
            tracing::debug!(?peer, "http connection dropped at its deadline");
            return;
        }
        Either::Right((Either::Right(_), _)) => {
            // Draining: finish the request in flight, if any, then close; an idle
            // keep-alive connection closes at once.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = ended {
        tracing::debug!(error = %e, "connection ended");
    }
}

/// Routes a request: the WebSocket endpoint, operations endpoints, or the REST API.
///
/// What the handler leaves of the request body is read here before the answer goes out
/// (see [`crate::body`]); when it cannot be, the answer says `Connection: close`.
async fn route(
    ctx: Rc<ShardCtx>,
    req: Request<Incoming>,
    peer: Option<std::net::IpAddr>,
) -> Response<crate::files::Body> {
    let started = Instant::now();
    let leftover = crate::body::Leftover::default();
    let req = req.map(|b| leftover.wrap(b));
    let mut response = dispatch(&ctx, req, peer).await;
    let deadline = Instant::now() + Duration::from_secs(ctx.shared.config.http_header_timeout_s);
    if !leftover.finish(deadline).await {
        response.headers_mut().insert(
            hyper::header::CONNECTION,
            hyper::header::HeaderValue::from_static("close"),
        );
    }
    ctx.shared
        .metrics
        .observe_request(response.status().as_u16(), started.elapsed());
    response
}

/// The handler of a request: the WebSocket endpoint, operations endpoints, or the REST API.
async fn dispatch(
    ctx: &Rc<ShardCtx>,
    req: Request<crate::body::ReqBody>,
    peer: Option<std::net::IpAddr>,
) -> Response<crate::files::Body> {
    let boxed = crate::files::boxed;
    match req.uri().path() {
        // A WebSocket handshake must be the first request of its connection.
        "/ws/v1/connect" => boxed(
            ApiError::new(
                400,
                "invalid_request",
                "open the WebSocket on a new connection",
            )
            .response(),
        ),
        "/healthz" => boxed(text(200, "text/plain", "ok\n")),
        "/metrics" => boxed(text(
            200,
            crate::metrics::CONTENT_TYPE,
            &ctx.shared.metrics.render(),
        )),
        _ if ctx.shared.draining.load(Ordering::SeqCst) => {
            boxed(ApiError::unavailable("the server is shutting down").response())
        }
        p if p.starts_with("/api/v1/files/") => crate::files::handle(ctx.clone(), req).await,
        _ => boxed(crate::api::handle(ctx.clone(), req, peer).await),
    }
}

/// A plain response.
pub fn text(status: u16, content_type: &'static str, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_owned())));
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::OK);
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    r
}
