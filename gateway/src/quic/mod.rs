//! The QUIC driver of the client session (`API.md` §8): one UDP socket and one
//! `quinn-proto` endpoint per shard, driven by the shard itself, and per connection a task
//! that feeds the same [`crate::session::SessionCore`] the WebSocket driver feeds.
//!
//! quinn's own runtime needs `Send` futures and sockets, which glommio's are not, so the
//! shard drives `quinn-proto`'s sans-IO state machines directly: the endpoint task reads
//! datagrams and hands each to its connection; connection tasks run their connection's
//! timers, streams and session, and send their own datagrams.
//!
//! # Shards and migration
//!
//! Every shard binds the QUIC address with `SO_REUSEPORT`; the kernel picks a shard by a
//! datagram's 4-tuple. The connection IDs a shard issues name it ([`cid`]), so a datagram
//! that arrives at another shard, because its client changed address or port, is forwarded
//! to the owner over a bounded queue and handled there; the owner answers from its own
//! socket, bound to the same address. A new connection's first packets stay on the shard
//! that received them. Connection migration stays on.
//!
//! # Close codes
//!
//! A session ends with a QUIC application error code equal to the WebSocket close code of
//! the same reason ([`app_error_code`]): 1000 normal (the client closed), 1001 going away,
//! 1002 protocol error, 1007 a frame that is not UTF-8, 1009 a frame over the limit, 1011
//! unavailable, 4000 resume required, 4001 unauthorized, 4002 heartbeat timeout.

pub mod cert;
pub mod cid;
mod conn;

use crate::ctx::ShardCtx;
use crate::session::{CloseReason, Violation};
use bytes::BytesMut;
use futures::channel::{mpsc, oneshot};
use futures::future::{select, Either};
use futures::StreamExt;
use quinn_proto::{
    ConnectionEvent, ConnectionHandle, DatagramEvent, Endpoint, EndpointConfig, ServerConfig,
    TransportConfig, VarInt,
};
use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The ALPN protocol of a Chorus session.
pub const ALPN: &[u8] = b"chorus/1";
/// Datagrams one shard may have waiting to be forwarded to another; more are dropped, as
/// the network drops them.
pub const FORWARD_QUEUE_DATAGRAMS: usize = 1024;
/// Connection events one connection may have waiting; more are dropped.
pub const CONNECTION_EVENTS_MAX: usize = 256;
/// The largest datagram read.
pub const DATAGRAM_BYTES_MAX: usize = 65_536;
/// How long a connection may go without any packet before QUIC closes it.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Bidirectional streams a client may open at once: the session's, and one more that is
/// refused with an explanation rather than left waiting.
pub const BIDI_STREAMS_MAX: u32 = 2;
/// How long a draining shard keeps its endpoint for connections that are closing.
pub const DRAIN_WAIT: Duration = Duration::from_secs(5);
/// Bytes asked for each shard socket's receive and send buffers; the kernel caps the request
/// at `net.core.rmem_max` and `wmem_max` (4 MiB here). The default (208 KiB) holds about 150
/// full datagrams, so a burst of handshakes or acknowledgements from thousands of clients
/// overflowed it, and QUIC's backed-off retransmissions then took seconds.
pub const SOCKET_BUFFER_BYTES: usize = 4 << 20;
/// How often a draining endpoint looks whether its connections are done.
const DRAIN_POLL: Duration = Duration::from_millis(10);
/// Bytes of events in flight to one client before its send stream blocks.
pub const SEND_WINDOW_BYTES: u64 = 1 << 20;

/// The application error code of a close reason: the WebSocket close code of the same
/// reason, so that both transports document one table.
pub fn app_error_code(reason: CloseReason) -> u32 {
    match reason {
        CloseReason::PeerClosed => 1000,
        CloseReason::GoingAway => 1001,
        CloseReason::Violation(Violation::Framing) => 1002,
        CloseReason::Violation(Violation::InvalidUtf8) => 1007,
        CloseReason::Violation(Violation::TooLarge) => 1009,
        CloseReason::Unavailable => 1011,
        CloseReason::ResumeRequired => 4000,
        CloseReason::Revoked => CLOSE_UNAUTHORIZED,
        CloseReason::HeartbeatTimeout => 4002,
    }
}

/// The application error code of a refused or missing token.
pub const CLOSE_UNAUTHORIZED: u32 = 4001;

/// A datagram another shard received for a connection of this one.
pub struct Forwarded {
    remote: SocketAddr,
    data: BytesMut,
}

/// The forwarding queues between shards: shard `i` receives on the receiver of entry `i`.
pub struct Router {
    shards: Vec<mpsc::Sender<Forwarded>>,
}

impl Router {
    /// A router between `shards` shards, and each shard's receiving end.
    pub fn new(shards: usize) -> (Arc<Router>, Vec<mpsc::Receiver<Forwarded>>) {
        let (senders, receivers) = (0..shards)
            .map(|_| mpsc::channel(FORWARD_QUEUE_DATAGRAMS))
            .unzip();
        (Arc::new(Router { shards: senders }), receivers)
    }

    fn forward(&self, shard: usize, datagram: Forwarded) {
        // A full queue drops the datagram: QUIC retransmits what matters.
        let _ = self.shards[shard].clone().try_send(datagram);
    }
}

/// What every shard's endpoint shares: the server's TLS and transport settings, and the
/// keys that let shards route and reset each other's connections.
pub struct QuicSetup {
    /// The server's TLS and transport settings.
    pub server: Arc<ServerConfig>,
    /// The stateless-reset key, the same on every shard.
    pub reset_key: Arc<ring::hmac::Key>,
    /// The connection-ID key, the same on every shard.
    pub cid_key: cid::CidKey,
    /// The forwarding queues.
    pub router: Arc<Router>,
}

impl QuicSetup {
    /// The settings for `identity`, routing over `router`.
    pub fn new(identity: cert::Identity, router: Arc<Router>) -> std::io::Result<QuicSetup> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(std::io::Error::other)?
            .with_no_client_auth()
            .with_single_cert(identity.chain, identity.key)
            .map_err(std::io::Error::other)?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        tls.max_early_data_size = 0;
        let crypto = quinn_proto::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(std::io::Error::other)?;
        let mut server = ServerConfig::with_crypto(Arc::new(crypto));
        let mut transport = TransportConfig::default();
        transport
            .max_concurrent_bidi_streams(VarInt::from_u32(BIDI_STREAMS_MAX))
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            .send_window(SEND_WINDOW_BYTES)
            .max_idle_timeout(Some(
                IDLE_TIMEOUT
                    .try_into()
                    .expect("the idle timeout fits a varint"),
            ));
        server.transport_config(Arc::new(transport)).migration(true);
        let rng = ring::rand::SystemRandom::new();
        let reset_key = ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng)
            .map_err(|_| std::io::Error::other("no randomness for the reset key"))?;
        Ok(QuicSetup {
            server: Arc::new(server),
            reset_key: Arc::new(reset_key),
            cid_key: cid::CidKey::new(),
            router,
        })
    }

    /// A fresh endpoint for `shard`, with the shared keys.
    pub fn endpoint(&self, shard: usize) -> Endpoint {
        let mut config = EndpointConfig::new(self.reset_key.clone());
        let key = self.cid_key.clone();
        config.cid_generator(move || Box::new(cid::ShardCids::new(key.clone(), shard)));
        Endpoint::new(Arc::new(config), Some(self.server.clone()), true, None)
    }
}

/// Asks for [`SOCKET_BUFFER_BYTES`] of receive and send buffer on a shard's socket; a
/// smaller grant is logged, not refused.
pub fn size_socket_buffers(socket: &glommio::net::UdpSocket) {
    use std::os::fd::{AsRawFd, BorrowedFd};
    // SAFETY: the descriptor belongs to `socket`, which outlives this borrow.
    let fd = unsafe { BorrowedFd::borrow_raw(socket.as_raw_fd()) };
    let s = socket2::SockRef::from(&fd);
    let asked = (
        s.set_recv_buffer_size(SOCKET_BUFFER_BYTES),
        s.set_send_buffer_size(SOCKET_BUFFER_BYTES),
    );
    let granted = (s.recv_buffer_size(), s.send_buffer_size());
    tracing::debug!(?asked, ?granted, "quic socket buffers");
}

/// A connection's inbox of events from the endpoint, on its shard.
#[derive(Default)]
struct Mailbox {
    events: RefCell<std::collections::VecDeque<ConnectionEvent>>,
    waker: RefCell<Option<std::task::Waker>>,
}

impl Mailbox {
    fn push(&self, event: ConnectionEvent) {
        let mut events = self.events.borrow_mut();
        if events.len() < CONNECTION_EVENTS_MAX {
            events.push_back(event);
        }
        drop(events);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }
}

/// One shard's QUIC state, shared by its endpoint task and its connection tasks.
struct ShardQuic {
    endpoint: RefCell<Endpoint>,
    socket: glommio::net::UdpSocket,
    connections: RefCell<HashMap<ConnectionHandle, Rc<Mailbox>>>,
}

impl ShardQuic {
    /// Sends one datagram; a failure is the network's loss.
    async fn send(&self, data: &[u8], to: SocketAddr) {
        // A datagram that fits the socket's buffer is sent by a direct, non-blocking call:
        // a round trip through the ring for each would cost a wake-up of the task per
        // datagram. Only a full buffer waits on the ring.
        let sent = match self.try_send(data, to) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => self
                .socket
                .send_to(data, to)
                .await
                .map(drop)
                .map_err(std::io::Error::from),
            other => other,
        };
        if let Err(e) = sent {
            tracing::debug!(error = %e, %to, "quic send failed");
        }
    }

    /// Sends one datagram if the socket can take it now.
    fn try_send(&self, data: &[u8], to: SocketAddr) -> std::io::Result<()> {
        self.with_socket(|s| s.send_to_with_flags(data, &to.into(), libc::MSG_DONTWAIT))
            .map(drop)
    }

    /// Reads one datagram into `buf` if one is waiting.
    fn try_recv(&self, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
        // SAFETY: initialised bytes are valid `MaybeUninit` bytes, and the call only
        // writes them.
        let uninit = unsafe { &mut *(buf as *mut [u8] as *mut [std::mem::MaybeUninit<u8>]) };
        let (n, from) = self.with_socket(|s| s.recv_from_with_flags(uninit, libc::MSG_DONTWAIT))?;
        let from = from
            .as_socket()
            .ok_or_else(|| std::io::Error::other("a datagram from a non-IP address"))?;
        Ok((n, from))
    }

    fn with_socket<T>(&self, f: impl FnOnce(socket2::SockRef<'_>) -> T) -> T {
        use std::os::fd::{AsRawFd, BorrowedFd};
        // SAFETY: the descriptor belongs to `self.socket`, which outlives this borrow.
        let fd = unsafe { BorrowedFd::borrow_raw(self.socket.as_raw_fd()) };
        f(socket2::SockRef::from(&fd))
    }
}

/// Datagrams the endpoint task reads by direct calls before it lets the shard's other
/// tasks run.
const RECEIVES_PER_TURN: usize = 64;

/// Serves QUIC on `socket` for this shard until `stop` fires: reads datagrams, forwards
/// those of other shards' connections, and starts a task per new connection.
pub async fn serve_shard(
    ctx: Rc<ShardCtx>,
    setup: Arc<QuicSetup>,
    shard: usize,
    socket: glommio::net::UdpSocket,
    mut forwarded: mpsc::Receiver<Forwarded>,
    mut stop: oneshot::Receiver<()>,
) {
    let quic = Rc::new(ShardQuic {
        endpoint: RefCell::new(setup.endpoint(shard)),
        socket,
        connections: RefCell::new(HashMap::new()),
    });
    let mut buf = vec![0u8; DATAGRAM_BYTES_MAX];
    // The read waiting on the ring, kept across turns: dropping one in flight could lose
    // a datagram the kernel had already handed it.
    let mut waiting: Option<RingRecv> = None;
    let mut spare = Some(vec![0u8; DATAGRAM_BYTES_MAX]);
    // Set when the drain begins: the endpoint keeps reading, because closing connections
    // still need their peers' acknowledgements, until none is left or this passes.
    let mut drain_until: Option<Instant> = None;
    loop {
        if let Some(until) = drain_until {
            if quic.connections.borrow().is_empty() || Instant::now() >= until {
                break;
            }
        }
        // While datagrams are waiting, read them by direct calls; the ring is for waiting.
        let mut read = 0;
        while read < RECEIVES_PER_TURN {
            match quic.try_recv(&mut buf) {
                Ok((n, remote)) => {
                    read += 1;
                    on_datagram(&ctx, &quic, &setup, shard, remote, &buf[..n]).await;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::debug!(error = %e, "quic receive failed");
                    break;
                }
            }
        }
        while let Ok(f) = forwarded.try_recv() {
            handle(&ctx, &quic, f.remote, f.data).await;
        }
        if read == RECEIVES_PER_TURN {
            glommio::yield_if_needed().await;
            continue;
        }
        let wake = {
            let recv = waiting.get_or_insert_with(|| {
                let buf = spare
                    .take()
                    .unwrap_or_else(|| vec![0u8; DATAGRAM_BYTES_MAX]);
                ring_recv(quic.clone(), buf)
            });
            let next = select(recv.as_mut(), forwarded.next());
            let other = std::pin::pin!(async {
                match drain_until {
                    // A turn of the drain's check, in case nothing arrives.
                    Some(_) => glommio::timer::sleep(DRAIN_POLL).await,
                    None => {
                        let _ = (&mut stop).await;
                        drain_until = Some(Instant::now() + DRAIN_WAIT);
                    }
                }
            });
            match select(next, other).await {
                Either::Left((Either::Left(((ring_buf, got), _)), _)) => {
                    waiting = None;
                    let wake = match got {
                        Ok((n, remote)) => {
                            buf[..n].copy_from_slice(&ring_buf[..n]);
                            Wake::Datagram(remote, n)
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "quic receive failed");
                            Wake::Nothing
                        }
                    };
                    spare = Some(ring_buf);
                    wake
                }
                Either::Left((Either::Right((Some(f), _)), _)) => Wake::Forwarded(f),
                // The router is gone only when the server is: nothing can arrive any more.
                Either::Left((Either::Right((None, _)), _)) => break,
                Either::Right(_) => Wake::Nothing,
            }
        };
        match wake {
            Wake::Datagram(remote, n) => {
                on_datagram(&ctx, &quic, &setup, shard, remote, &buf[..n]).await
            }
            Wake::Forwarded(f) => handle(&ctx, &quic, f.remote, f.data).await,
            Wake::Nothing => {}
        }
    }
}

/// Routes a datagram this shard's socket received: to the shard its connection ID names,
/// or to this shard's endpoint.
async fn on_datagram(
    ctx: &Rc<ShardCtx>,
    quic: &Rc<ShardQuic>,
    setup: &QuicSetup,
    shard: usize,
    remote: SocketAddr,
    datagram: &[u8],
) {
    let shards = setup.router.shards.len();
    match cid::route(&setup.cid_key, datagram, shard, shards) {
        cid::Route::Shard(owner) => {
            ctx.shared.metrics.quic_forwarded.inc();
            let data = BytesMut::from(datagram);
            setup.router.forward(owner, Forwarded { remote, data });
        }
        cid::Route::Here => handle(ctx, quic, remote, BytesMut::from(datagram)).await,
    }
}

/// A read of one datagram through the ring, owning its buffer so that it can wait across
/// the endpoint task's turns.
type RingRecv =
    futures::future::LocalBoxFuture<'static, (Vec<u8>, std::io::Result<(usize, SocketAddr)>)>;

fn ring_recv(quic: Rc<ShardQuic>, mut buf: Vec<u8>) -> RingRecv {
    Box::pin(async move {
        let got = quic
            .socket
            .recv_from(&mut buf)
            .await
            .map_err(std::io::Error::from);
        (buf, got)
    })
}

/// What woke the endpoint task.
enum Wake {
    /// A datagram of `n` bytes from this address, in the receive buffer.
    Datagram(SocketAddr, usize),
    /// A datagram another shard forwarded.
    Forwarded(Forwarded),
    /// A failed read, the drain's start, or a turn of the drain's check.
    Nothing,
}

/// Hands one datagram of this shard to the endpoint and acts on what it says.
async fn handle(ctx: &Rc<ShardCtx>, quic: &Rc<ShardQuic>, remote: SocketAddr, data: BytesMut) {
    let mut response = Vec::new();
    let event =
        quic.endpoint
            .borrow_mut()
            .handle(Instant::now(), remote, None, None, data, &mut response);
    match event {
        Some(DatagramEvent::ConnectionEvent(ch, event)) => {
            if let Some(mailbox) = quic.connections.borrow().get(&ch) {
                mailbox.push(event);
            }
        }
        Some(DatagramEvent::NewConnection(incoming)) => {
            let refuse = ctx.shared.draining.load(Ordering::SeqCst);
            let accepted = {
                let mut endpoint = quic.endpoint.borrow_mut();
                if refuse {
                    Err(Some(endpoint.refuse(incoming, &mut response)))
                } else {
                    endpoint
                        .accept(incoming, Instant::now(), &mut response, None)
                        .map_err(|e| e.response)
                }
            };
            match accepted {
                Ok((ch, connection)) => start_connection(ctx, quic, ch, connection),
                Err(Some(t)) => quic.send(&response[..t.size], t.destination).await,
                Err(None) => {}
            }
        }
        Some(DatagramEvent::Response(t)) => quic.send(&response[..t.size], t.destination).await,
        None => {}
    }
}

/// Starts the task of a connection the endpoint accepted.
fn start_connection(
    ctx: &Rc<ShardCtx>,
    quic: &Rc<ShardQuic>,
    ch: ConnectionHandle,
    connection: quinn_proto::Connection,
) {
    let mailbox = Rc::new(Mailbox::default());
    quic.connections.borrow_mut().insert(ch, mailbox.clone());
    let (ctx, quic) = (ctx.clone(), quic.clone());
    // Boxed before the task captures it: see `conn::Driver::conn`.
    let connection = Box::new(connection);
    ctx.shared.quic_sessions.fetch_add(1, Ordering::SeqCst);
    ctx.shared.metrics.connection_opened();
    glommio::spawn_local(async move {
        conn::run(ctx.clone(), quic.clone(), ch, connection, mailbox).await;
        quic.connections.borrow_mut().remove(&ch);
        ctx.shared.quic_sessions.fetch_sub(1, Ordering::SeqCst);
    })
    .detach();
}
