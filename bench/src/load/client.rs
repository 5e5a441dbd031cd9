//! The load generator's side of a Chorus session, over either transport: a WebSocket from
//! a chosen loopback source address, or a QUIC connection (`API.md` §8) over the worker's
//! one quinn endpoint; and reading only the fields of a frame that a measurement needs.
//!
//! A worker holds thousands of these on one current-thread runtime, so nothing here spawns
//! threads or keeps more than the socket (WebSocket) or the quinn connection and a frame
//! buffer (QUIC) per session. The scenarios see one [`Conn`] type and never branch on the
//! transport.

use bytes::{Buf, BytesMut};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

/// An open WebSocket.
pub type Ws = WebSocketStream<TcpStream>;

/// The largest frame a QUIC session reads; the server's frames are far smaller.
pub const QUIC_FRAME_BYTES_MAX: usize = 8 * 1024 * 1024;
/// How long a QUIC connection may go without a packet before it is dropped: the server's
/// own limit, so that the client's shorter default (30 s) never ends a session whose
/// worker is still busy opening others.
const QUIC_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// The name a QUIC session sends in TLS; the pinned fingerprint, not the name, decides
/// trust.
const QUIC_SERVER_NAME: &str = "localhost";

/// Which transport a scenario's sessions use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Transport {
    /// A WebSocket per session, each a TCP socket and so an open file.
    WebSocket,
    /// QUIC sessions, all of a worker's over one UDP socket.
    Quic,
}

impl Transport {
    /// How reports name the transport.
    pub fn label(self) -> &'static str {
        match self {
            Transport::WebSocket => "WebSocket",
            Transport::Quic => "QUIC",
        }
    }
}

/// Where a worker's sessions connect.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Target {
    /// The server's HTTP address, for WebSockets.
    WebSocket(SocketAddr),
    /// The server's QUIC address and the SHA-256 of its certificate, pinned.
    Quic {
        /// The `quic=` address the server printed.
        addr: SocketAddr,
        /// The certificate's SHA-256, lowercase hex.
        pin_sha256: String,
    },
}

/// Opens sessions to one server from one source address. A QUIC dialer owns the worker's
/// [`QUIC_ENDPOINTS`] quinn endpoints (a UDP socket each), which its QUIC sessions share in
/// turn, so QUIC sessions cost the worker no file each.
pub enum Dialer {
    /// WebSockets from `source` (a port each).
    WebSocket {
        /// The server's HTTP address.
        server: SocketAddr,
        /// The loopback address sockets bind to.
        source: IpAddr,
    },
    /// QUIC connections over `endpoints`, in turn.
    Quic {
        /// The worker's endpoints, bound to its source address.
        endpoints: Vec<quinn::Endpoint>,
        /// The endpoint the next session opens over, modulo their number.
        next: std::sync::atomic::AtomicUsize,
        /// The server's QUIC address.
        server: SocketAddr,
    },
}

/// Endpoints (source ports) per QUIC worker. The server's kernel picks a shard by a
/// datagram's 4-tuple, so sessions over one socket would all land on one shard, which
/// clients on their own devices never do; sessions spread over 16 ports spread over the
/// shards as real clients' would.
pub const QUIC_ENDPOINTS: usize = 16;

/// Bytes asked for a worker endpoint's socket buffers: all of a worker's sessions share its
/// socket, and the default (208 KiB) dropped datagrams when thousands answered at once.
const QUIC_SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// A client endpoint bound to `bind`, with large socket buffers.
fn quic_endpoint(bind: SocketAddr) -> anyhow::Result<quinn::Endpoint> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(bind),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    // The kernel caps what it grants at net.core.rmem_max and wmem_max.
    socket.set_recv_buffer_size(QUIC_SOCKET_BUFFER_BYTES)?;
    socket.set_send_buffer_size(QUIC_SOCKET_BUFFER_BYTES)?;
    socket.bind(&bind.into())?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| anyhow::anyhow!("a QUIC endpoint needs a tokio runtime"))?;
    Ok(quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket.into(),
        runtime,
    )?)
}

impl Dialer {
    /// A dialer for `target` from `source`. A QUIC dialer binds its endpoint now, so call
    /// this inside a tokio runtime.
    pub fn new(target: &Target, source: IpAddr) -> anyhow::Result<Dialer> {
        Ok(match target {
            Target::WebSocket(server) => Dialer::WebSocket {
                server: *server,
                source,
            },
            Target::Quic { addr, pin_sha256 } => {
                let config = quic_config(pin_sha256)?;
                let endpoints = (0..QUIC_ENDPOINTS)
                    .map(|_| {
                        let mut endpoint = quic_endpoint(SocketAddr::new(source, 0))?;
                        endpoint.set_default_client_config(config.clone());
                        Ok(endpoint)
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?;
                Dialer::Quic {
                    endpoints,
                    next: Default::default(),
                    server: *addr,
                }
            }
        })
    }

    /// Opens a session authenticated with `token`, waits for its `hello`, and makes it live
    /// (see [`Conn::start_live`]).
    pub async fn connect(&self, token: &str) -> anyhow::Result<Conn> {
        let mut conn = match self {
            Dialer::WebSocket { server, source } => connect_ws(*server, *source, token).await?,
            Dialer::Quic {
                endpoints,
                next,
                server,
            } => {
                let turn = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let endpoint = &endpoints[turn % endpoints.len()];
                connect_quic(endpoint, *server, token).await?
            }
        };
        conn.start_live().await?;
        Ok(conn)
    }
}

/// How long a QUIC session that finished its stream waits for the server to close it.
pub const CLOSE_WAIT: Duration = Duration::from_secs(10);
/// How long a closing dialer waits for its endpoint's last connections to be done.
const ENDPOINT_CLOSE_WAIT: Duration = Duration::from_secs(2);

impl Dialer {
    /// Closes whatever QUIC connection is still open, all at once, and waits a little for
    /// the closes to go out: the backstop after [`Conn::close`], not the way to end many
    /// sessions (one datagram each, which a busy server's socket may drop).
    pub async fn close(&self) {
        if let Dialer::Quic { endpoints, .. } = self {
            for endpoint in endpoints {
                endpoint.close(quinn::VarInt::from_u32(1000), b"");
            }
            let idle = futures_util::future::join_all(endpoints.iter().map(|e| e.wait_idle()));
            let _ = tokio::time::timeout(ENDPOINT_CLOSE_WAIT, idle).await;
        }
    }
}

/// The quinn client configuration: the SDK's pinned TLS, and the server's idle timeout.
fn quic_config(pin_sha256: &str) -> anyhow::Result<quinn::ClientConfig> {
    let mut config = chorus_client::quic_client_config(pin_sha256).map_err(anyhow::Error::msg)?;
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(QUIC_IDLE_TIMEOUT.try_into()?));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// An open, authenticated session over either transport (its `hello` already read).
pub enum Conn {
    /// A WebSocket session.
    WebSocket(Box<Ws>),
    /// A QUIC session.
    Quic(QuicSession),
}

/// A QUIC session: the connection, and the session's bidirectional stream with a buffer
/// of bytes read but not yet framed.
pub struct QuicSession {
    connection: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    buffered: BytesMut,
}

impl Conn {
    /// Sends one text frame.
    pub async fn send_text(&mut self, text: &str) -> anyhow::Result<()> {
        use futures_util::SinkExt;
        match self {
            Conn::WebSocket(ws) => ws.send(Message::text(text)).await?,
            Conn::Quic(q) => q.send(text.as_bytes()).await?,
        }
        Ok(())
    }

    /// The next text frame; `None` once the session has ended. Cancel-safe: a frame that
    /// was partly read when the future was dropped is read on by the next call.
    pub async fn next_text(&mut self) -> Option<anyhow::Result<Utf8Bytes>> {
        use futures_util::StreamExt;
        match self {
            Conn::WebSocket(ws) => loop {
                match ws.next().await? {
                    Ok(Message::Text(text)) => return Some(Ok(text)),
                    Ok(Message::Close(_)) => return None,
                    Ok(_) => {}
                    Err(e) => return Some(Err(e.into())),
                }
            },
            Conn::Quic(q) => q.next_frame().await.transpose(),
        }
    }

    /// The server holds a new session's events for a short grace in case its first frame
    /// is a `resume`; any other first frame starts it live at once. A client with nothing
    /// to resume says so with a ping, so the run never waits out the grace, and the `pong`
    /// says the session is live: a measurement that starts after it finds no session still
    /// starting.
    async fn start_live(&mut self) -> anyhow::Result<()> {
        self.send_text(r#"{"type":"ping"}"#).await?;
        loop {
            match self.next_text().await {
                Some(Ok(text)) if Frame::parse(&text)?.kind == "pong" => return Ok(()),
                Some(Ok(_)) => {}
                other => anyhow::bail!("expected pong, got {other:?}"),
            }
        }
    }

    /// Ends the session so that the server hears of it. A WebSocket is dropped: its TCP
    /// connection closes, as at a process exit. A QUIC session finishes its stream, which
    /// QUIC retransmits until the server acknowledges it, and waits up to [`CLOSE_WAIT`]
    /// for the server to close the connection in answer; a bare CONNECTION_CLOSE is one
    /// datagram that a busy server socket may drop, leaving the session open there until
    /// its idle timeout.
    pub async fn close(self) {
        if let Conn::Quic(mut q) = self {
            if q.send.finish().is_ok() {
                let _ = tokio::time::timeout(CLOSE_WAIT, q.connection.closed()).await;
            }
        }
    }

    /// Reads whatever frames are already waiting, without waiting for more.
    pub async fn drain_ready(&mut self) {
        while let Ok(Some(Ok(_))) =
            tokio::time::timeout(Duration::from_millis(1), self.next_text()).await
        {}
    }
}

impl QuicSession {
    async fn send(&mut self, frame: &[u8]) -> anyhow::Result<()> {
        let len = u32::try_from(frame.len())?;
        let mut bytes = Vec::with_capacity(4 + frame.len());
        bytes.extend_from_slice(&len.to_be_bytes());
        bytes.extend_from_slice(frame);
        self.send.write_all(&bytes).await?;
        Ok(())
    }

    /// The next whole frame, or `None` when the stream or connection ended. Bytes are only
    /// ever moved from the stream into `buffered` in one step, so dropping this future
    /// between reads loses nothing.
    async fn next_frame(&mut self) -> anyhow::Result<Option<Utf8Bytes>> {
        loop {
            if let Some(frame) = take_frame(&mut self.buffered)? {
                return Ok(Some(frame));
            }
            match self.recv.read_chunk(usize::MAX, true).await {
                Ok(Some(chunk)) => self.buffered.extend_from_slice(&chunk.bytes),
                Ok(None) => return Ok(None),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl Drop for QuicSession {
    fn drop(&mut self) {
        // Closing says so to the server at once, as a WebSocket's TCP close does, instead
        // of leaving it to the idle timeout.
        self.connection.close(quinn::VarInt::from_u32(1000), b"");
    }
}

/// Splits one length-prefixed frame off the front of `buffered`, if it holds a whole one.
fn take_frame(buffered: &mut BytesMut) -> anyhow::Result<Option<Utf8Bytes>> {
    let Some(prefix) = buffered.first_chunk::<4>() else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(*prefix) as usize;
    anyhow::ensure!(len <= QUIC_FRAME_BYTES_MAX, "a frame of {len} bytes");
    if buffered.len() < 4 + len {
        return Ok(None);
    }
    buffered.advance(4);
    let frame = buffered.split_to(len).freeze();
    Ok(Some(Utf8Bytes::try_from(frame)?))
}

/// tungstenite's read buffer in a load worker. Its default, 128 KiB, is zeroed before every
/// read attempt, including each one that finds the socket empty: in `presence` that memset
/// was 35 % of the generator's CPU. Server frames are small; a larger one takes more reads.
const WS_READ_BUFFER_BYTES: usize = 4 * 1024;

fn ws_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(WS_READ_BUFFER_BYTES)
}

/// Opens a WebSocket to the server at `server` from `source` (any free port), authenticated
/// with `token`, and waits for its `hello`.
async fn connect_ws(server: SocketAddr, source: IpAddr, token: &str) -> anyhow::Result<Conn> {
    use futures_util::StreamExt;
    let socket = match source {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    defer_port_choice(&socket)?;
    socket.bind(SocketAddr::new(source, 0))?;
    let stream = socket.connect(server).await?;
    stream.set_nodelay(true)?;
    let url = format!("ws://{server}/ws/v1/connect?token={token}");
    let (mut ws, _) =
        tokio_tungstenite::client_async_with_config(url, stream, Some(ws_config())).await?;
    match ws.next().await {
        Some(Ok(Message::Text(text))) if Frame::parse(&text)?.kind == "hello" => {}
        other => anyhow::bail!("expected hello, got {other:?}"),
    }
    Ok(Conn::WebSocket(Box::new(ws)))
}

/// Opens a QUIC connection over `endpoint`, opens the session stream, authenticates with
/// `token` as its first frame (`API.md` §8), and waits for its `hello`.
async fn connect_quic(
    endpoint: &quinn::Endpoint,
    server: SocketAddr,
    token: &str,
) -> anyhow::Result<Conn> {
    let connection = endpoint.connect(server, QUIC_SERVER_NAME)?.await?;
    let (send, recv) = connection.open_bi().await?;
    let mut session = QuicSession {
        connection,
        send,
        recv,
        buffered: BytesMut::new(),
    };
    let auth = serde_json::json!({"type": "auth", "token": token}).to_string();
    session.send(auth.as_bytes()).await?;
    match session.next_frame().await? {
        Some(text) if Frame::parse(&text)?.kind == "hello" => {}
        other => anyhow::bail!("expected hello, got {other:?}"),
    }
    Ok(Conn::Quic(session))
}

/// Sets `IP_BIND_ADDRESS_NO_PORT`, so that binding to a source address leaves the port to
/// `connect`. Without it, `bind(addr, 0)` searches for a port free for every destination,
/// which costs the kernel more the more sockets are bound: at 9,500 connections it took a
/// whole core of system time while connecting.
fn defer_port_choice(socket: &TcpSocket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: a valid socket fd, and a pointer to an int of the size passed, as the option
    // expects.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The fields of a server frame the harness reads; everything else is skipped unparsed.
#[derive(Debug, Deserialize)]
pub struct Frame<'a> {
    /// `hello`, `event`, `ack`, `error`, `pong`, ...
    #[serde(rename = "type", borrow)]
    pub kind: Cow<'a, str>,
    /// The request's `ref`, echoed in `ack` and `error`.
    #[serde(rename = "ref", default, borrow)]
    pub reference: Option<Cow<'a, str>>,
    /// The event of an `event` frame.
    #[serde(default, borrow)]
    pub event: Option<EventBody<'a>>,
}

/// The `event` object of an `event` frame.
#[derive(Debug, Deserialize)]
pub struct EventBody<'a> {
    /// `message:new`, `member:joined`, ...
    #[serde(rename = "type", borrow)]
    pub kind: Cow<'a, str>,
    /// The message, for `message:*` events.
    #[serde(default, borrow)]
    pub message: Option<MessageBody<'a>>,
}

/// The one field of a message the harness reads.
#[derive(Debug, Deserialize)]
pub struct MessageBody<'a> {
    /// The message text, where senders put their due time.
    #[serde(borrow)]
    pub text: Cow<'a, str>,
}

impl<'a> Frame<'a> {
    /// Parses a frame's JSON text.
    pub fn parse(text: &'a str) -> serde_json::Result<Frame<'a>> {
        serde_json::from_str(text)
    }

    /// The text of a `message:new` event, if this is one.
    pub fn new_message_text(&self) -> Option<&str> {
        let event = self.event.as_ref().filter(|e| e.kind == "message:new")?;
        event.message.as_ref().map(|m| m.text.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // An event frame yields its message text; acks and hellos yield their type and ref.
    #[test]
    fn frames_parse() {
        let event = r#"{"type":"event","channel_id":"C1","seq":3,"event":{"type":"message:new",
            "message":{"id":"M1-3","text":"123 4 xx","reactions":{}}}}"#;
        let f = Frame::parse(event).unwrap();
        assert_eq!(f.new_message_text(), Some("123 4 xx"));
        let ack = r#"{"message":{"text":"9 1"},"ref":"77","type":"ack"}"#;
        let f = Frame::parse(ack).unwrap();
        assert_eq!(
            (f.kind.as_ref(), f.reference.as_deref()),
            ("ack", Some("77"))
        );
        assert_eq!(f.new_message_text(), None);
        let joined = r#"{"type":"event","event":{"type":"member:joined","user_id":"U1"}}"#;
        assert_eq!(Frame::parse(joined).unwrap().new_message_text(), None);
    }

    // Length-prefixed frames come off the buffer whole, one at a time, and only once all
    // their bytes are in; an oversized prefix is refused before its body arrives.
    #[test]
    fn quic_frames_split() {
        let mut b = BytesMut::new();
        for text in ["{\"type\":\"hello\"}", "{}"] {
            b.extend_from_slice(&(text.len() as u32).to_be_bytes());
            b.extend_from_slice(text.as_bytes());
        }
        let whole = b.clone();
        let mut partial = BytesMut::from(&whole[..whole.len() - 1]);
        assert_eq!(
            take_frame(&mut partial).unwrap().unwrap(),
            "{\"type\":\"hello\"}"
        );
        assert!(
            take_frame(&mut partial).unwrap().is_none(),
            "one byte short"
        );
        partial.extend_from_slice(&whole[whole.len() - 1..]);
        assert_eq!(take_frame(&mut partial).unwrap().unwrap(), "{}");
        assert!(partial.is_empty());
        let mut huge = BytesMut::from(&u32::MAX.to_be_bytes()[..]);
        assert!(take_frame(&mut huge).is_err());
    }
}
