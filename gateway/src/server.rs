//! The server: the engine, one HTTP/WebSocket listener per shard, and a graceful drain.
//!
//! Every shard binds the same address with `SO_REUSEPORT`, so the kernel spreads new
//! connections over the cores, and serves each connection on its own executor: HTTP through
//! hyper, WebSocket through tungstenite, and the connection's engine subscription on the
//! same shard. Nothing is shared between connections but the engine and atomic counters.
//!
//! SIGTERM (or SIGINT) drains: the listeners stop accepting, every WebSocket is closed with
//! "going away" (1001), requests in flight finish (their commits complete), then the engine
//! closes its logs and the process exits 0.

use crate::auth::Tokens;
use crate::config::Config;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::ratelimit::Limiter;
use bytes::Bytes;
use chorus_engine::{Engine, EngineConfig};
use futures::channel::oneshot;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How long a drain waits for connections to finish before closing the engine anyway.
const DRAIN_WAIT: Duration = Duration::from_secs(10);

/// What every shard shares.
pub struct Shared {
    /// The engine.
    pub engine: Engine,
    /// The settings.
    pub config: Config,
    /// Token signing and checking.
    pub tokens: Tokens,
    /// Counters for `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Set when the drain starts.
    pub draining: AtomicBool,
    /// Open connections across shards (HTTP and WebSocket).
    pub connections: AtomicUsize,
}

/// What one shard's connections share.
pub struct ShardCtx {
    /// The process-wide state.
    pub shared: Arc<Shared>,
    /// This shard's rate limiter (a user's budget is per shard).
    pub limiter: RefCell<Limiter>,
    /// Senders that tell this shard's WebSocket sessions to close for a drain.
    pub closers: RefCell<Vec<oneshot::Sender<()>>>,
}

impl ShardCtx {
    /// Registers a session to be told when the server drains.
    pub fn on_drain(&self) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let mut closers = self.closers.borrow_mut();
        // Sessions that ended dropped their receivers; forget their senders now and then,
        // so the list stays about as long as the open sessions (amortized O(1) a push).
        if closers.len() >= 64 && closers.len().is_power_of_two() {
            closers.retain(|c| !c.is_canceled());
        }
        closers.push(tx);
        rx
    }

    /// Takes one unit of the user's rate budget.
    pub fn take_rate(&self, user: u64) -> Result<(), ApiError> {
        self.limiter
            .borrow_mut()
            .try_take(user, std::time::Instant::now())
            .map_err(|after| {
                self.shared.metrics.rate_limited.inc();
                ApiError::rate_limited(after)
            })
    }
}

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The engine failed.
    #[error("engine: {0}")]
    Engine(#[from] chorus_engine::EngineError),
    /// A socket or file failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Runs the server until SIGTERM or SIGINT, then drains and returns.
pub fn serve(config: Config) -> Result<(), ServeError> {
    let shards = config.shard_count();
    let signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])?;
    let metrics = Arc::new(Metrics::default());
    let mut engine_config = EngineConfig::new(&config.data_dir);
    engine_config.observer =
        chorus_engine::ObserverSlot(Some(Arc::new(EngineMetrics(metrics.clone()))));
    engine_config.shards = shards;
    engine_config.partitions = config.partitions;
    engine_config.subscriber_queue_frames = config.ws_outbound_frames_max;
    let engine = Engine::open(engine_config)?;
    let tokens = Tokens::load_or_create(&config.jwt_secret_path(), config.token_ttl_s)?;
    let shared = Arc::new(Shared {
        engine: engine.clone(),
        config: config.clone(),
        tokens,
        metrics,
        draining: AtomicBool::new(false),
        connections: AtomicUsize::new(0),
    });
    let (addr, reserve) = reserve_port(config.http)?;
    let mut stops = Vec::new();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    for shard in 0..shards {
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        stops.push(stop_tx);
        let (shared, ready) = (shared.clone(), ready_tx.clone());
        futures::executor::block_on(
            engine.spawn_on(shard, move || accept_loop(shared, addr, stop_rx, ready)),
        )?;
    }
    drop(ready_tx);
    for _ in 0..shards {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(ServeError::Io(e)),
            Err(_) => return Err(std::io::Error::other("a listener did not start").into()),
        }
    }
    drop(reserve);
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening http={addr} quic=disabled")?;
        out.flush()?;
    }
    tracing::info!(%addr, shards, "serving");
    let mut signals = signals;
    let signal = signals.forever().next();
    tracing::info!(?signal, "draining");
    shared.draining.store(true, Ordering::SeqCst);
    for stop in stops {
        let _ = stop.send(());
    }
    let deadline = std::time::Instant::now() + DRAIN_WAIT;
    while shared.connections.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    engine.shutdown();
    tracing::info!("stopped");
    Ok(())
}

/// Feeds the engine's reports into the server's metrics.
struct EngineMetrics(Arc<Metrics>);

impl chorus_engine::Observer for EngineMetrics {
    fn committed(&self, events: usize, latency: Duration) {
        self.0.commits.add(events as u64);
        self.0.fsync_latency_seconds.observe_duration(latency);
    }

    fn delivered(&self, frames: usize) {
        self.0.deliveries.add(frames as u64);
    }

    fn cut_off(&self) {
        self.0.slow_consumer_disconnects.inc();
    }

    fn queue_depth(&self, delta: i64) {
        self.0.queue_depth.add(delta);
    }
}

/// Binds the address once, without listening, to learn the port (when it is 0) and keep
/// it while the shards bind it with `SO_REUSEPORT`.
fn reserve_port(addr: SocketAddr) -> std::io::Result<(SocketAddr, socket2::Socket)> {
    let domain = socket2::Domain::for_address(addr);
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.bind(&addr.into())?;
    let bound = s
        .local_addr()?
        .as_socket()
        .ok_or_else(|| std::io::Error::other("not an IP socket"))?;
    Ok((bound, s))
}

/// One shard's listener: accepts until the drain, serving each connection on this shard.
async fn accept_loop(
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: oneshot::Receiver<()>,
    ready: std::sync::mpsc::Sender<std::io::Result<()>>,
) {
    let listener = match glommio::net::TcpListener::bind(addr) {
        Ok(l) => {
            let _ = ready.send(Ok(()));
            l
        }
        Err(e) => {
            let _ = ready.send(Err(std::io::Error::other(e.to_string())));
            return;
        }
    };
    let ctx = Rc::new(ShardCtx {
        limiter: RefCell::new(Limiter::new(
            shared.config.rate_per_s,
            shared.config.rate_burst,
        )),
        shared,
        closers: RefCell::new(Vec::new()),
    });
    let mut stop = stop;
    loop {
        let accepted = {
            let accept = std::pin::pin!(listener.accept());
            match futures::future::select(accept, &mut stop).await {
                futures::future::Either::Left((r, _)) => r,
                futures::future::Either::Right(_) => break,
            }
        };
        let stream = match accepted {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                continue;
            }
        };
        let shared = &ctx.shared;
        let open = shared.connections.fetch_add(1, Ordering::SeqCst) + 1;
        if open > shared.config.connections_max {
            shared.connections.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(open, "connection limit reached; refusing");
            drop(stream);
            continue;
        }
        shared.metrics.connection_opened();
        let _ = stream.set_nodelay(true);
        let ctx = ctx.clone();
        glommio::spawn_local(async move {
            serve_connection(ctx.clone(), stream).await;
            ctx.shared.connections.fetch_sub(1, Ordering::SeqCst);
            ctx.shared.metrics.connection_closed();
        })
        .detach();
    }
    // Tell the WebSocket sessions of this shard to go away.
    for closer in ctx.closers.borrow_mut().drain(..) {
        let _ = closer.send(());
    }
}

/// Bytes peeked at the start of a connection to tell a WebSocket handshake from HTTP.
const WS_PREFIX: &[u8] = b"GET /ws/v1/connect";

/// Serves one TCP connection: a WebSocket session, or HTTP/1.1 requests.
///
/// hyper's own upgrade path needs a `Send` stream, and a glommio stream belongs to its
/// shard, so the two are told apart before either library reads: the first bytes are
/// peeked (not consumed), and a connection whose first request is `GET /ws/v1/connect`
/// goes whole to [`crate::ws::serve`], which does the handshake with tungstenite
/// (authenticating in its callback) and runs the session. Everything else goes to hyper.
async fn serve_connection(ctx: Rc<ShardCtx>, stream: glommio::net::TcpStream) {
    // Each branch is boxed, so a connection's task holds only the state of the protocol it
    // speaks: an idle WebSocket does not carry hyper's connection state, and the reverse.
    if is_websocket(&stream).await {
        Box::pin(crate::ws::serve(ctx, stream)).await;
        return;
    }
    let io = smol_hyper::rt::FuturesIo::new(stream);
    let mut drain = ctx.on_drain();
    let service = hyper::service::service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, std::convert::Infallible>(route(ctx, req).await) }
    });
    let mut conn = Box::pin(
        hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
            .max_buf_size(64 * 1024)
            .serve_connection(io, service),
    );
    let ended = match futures::future::select(conn.as_mut(), &mut drain).await {
        futures::future::Either::Left((ended, _)) => ended,
        futures::future::Either::Right(_) => {
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

/// Whether the connection starts with a WebSocket request line, by peeking until the
/// prefix is decided (or the peer stops sending).
async fn is_websocket(stream: &glommio::net::TcpStream) -> bool {
    let mut buf = [0u8; WS_PREFIX.len()];
    for _ in 0..WS_PEEKS_MAX {
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
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
    false
}

/// How many times a short first packet is peeked again before it is taken as HTTP.
const WS_PEEKS_MAX: usize = 200;

/// Routes a request: the WebSocket endpoint, operations endpoints, or the REST API.
async fn route(ctx: Rc<ShardCtx>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let started = std::time::Instant::now();
    let response = match req.uri().path() {
        // A WebSocket handshake must be the first request of its connection.
        "/ws/v1/connect" => ApiError::new(
            400,
            "invalid_request",
            "open the WebSocket on a new connection",
        )
        .response(),
        "/healthz" => text(200, "text/plain", "ok\n"),
        "/metrics" => text(
            200,
            crate::metrics::CONTENT_TYPE,
            &ctx.shared.metrics.render(),
        ),
        _ if ctx.shared.draining.load(Ordering::SeqCst) => {
            ApiError::unavailable("the server is shutting down").response()
        }
        _ => crate::api::handle(ctx.clone(), req).await,
    };
    ctx.shared
        .metrics
        .observe_request(response.status().as_u16(), started.elapsed());
    response
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

/// The user a request's token names: `Authorization: Bearer …` or `?token=…`. It reads
/// only the headers and URI, so the REST router and the WebSocket handshake share it.
pub fn authenticate(
    ctx: &ShardCtx,
    headers: &hyper::http::HeaderMap,
    uri: &hyper::http::Uri,
) -> Result<chorus_engine::ids::UserId, ApiError> {
    let from_header = headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let from_query = uri
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("token=")));
    let token = from_header
        .or(from_query)
        .ok_or_else(|| ApiError::unauthorized("a bearer token is required"))?;
    let sub = ctx
        .shared
        .tokens
        .verify(token, now_s())
        .map_err(|e| ApiError::unauthorized(format!("bad token: {e}")))?;
    sub.parse()
        .map_err(|_| ApiError::unauthorized("bad token: unknown subject"))
}

/// The current time in seconds, for tokens.
pub fn token_now() -> u64 {
    now_s()
}
