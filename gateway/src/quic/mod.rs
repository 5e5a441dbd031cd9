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
        if let Err(e) = self.socket.send_to(data, to).await {
            tracing::debug!(error = %e, %to, "quic send failed");
        }
    }
}

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
    let shards = setup.router.shards.len();
    let quic = Rc::new(ShardQuic {
        endpoint: RefCell::new(setup.endpoint(shard)),
        socket,
        connections: RefCell::new(HashMap::new()),
    });
    let mut buf = vec![0u8; DATAGRAM_BYTES_MAX];
    loop {
        let received = {
            let recv = std::pin::pin!(quic.socket.recv_from(&mut buf));
            let next = select(recv, forwarded.next());
            match select(next, &mut stop).await {
                Either::Left((Either::Left((Ok((n, remote)), _)), _)) => Some((remote, n)),
                Either::Left((Either::Left((Err(e), _)), _)) => {
                    tracing::debug!(error = %e, "quic receive failed");
                    None
                }
                Either::Left((Either::Right((Some(f), _)), _)) => {
                    handle(&ctx, &quic, f.remote, f.data).await;
                    None
                }
                Either::Left((Either::Right((None, _)), _)) | Either::Right(_) => break,
            }
        };
        let Some((remote, n)) = received else {
            continue;
        };
        match cid::route(&setup.cid_key, &buf[..n], shard, shards) {
            cid::Route::Shard(owner) => {
                ctx.shared.metrics.quic_forwarded.inc();
                let data = BytesMut::from(&buf[..n]);
                setup.router.forward(owner, Forwarded { remote, data });
            }
            cid::Route::Here => handle(&ctx, &quic, remote, BytesMut::from(&buf[..n])).await,
        }
    }
    // Draining: every connection's session closes with 1001 through the drain signal its
    // session registered; the endpoint lives until they are done.
    let deadline = Instant::now() + DRAIN_WAIT;
    while !quic.connections.borrow().is_empty() && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
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
    ctx.shared.quic_sessions.fetch_add(1, Ordering::SeqCst);
    ctx.shared.metrics.connection_opened();
    glommio::spawn_local(async move {
        conn::run(ctx.clone(), quic.clone(), ch, connection, mailbox).await;
        quic.connections.borrow_mut().remove(&ch);
        ctx.shared.quic_sessions.fetch_sub(1, Ordering::SeqCst);
        ctx.shared.metrics.connection_closed();
    })
    .detach();
}
