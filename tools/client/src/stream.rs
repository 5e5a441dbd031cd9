//! The event stream: one WebSocket session at a time, run by a background task, that an
//! application reads as one unbroken sequence of events per channel.
//!
//! # What the application sees
//!
//! [`Stream::next_event`] hands out every event of every channel the user is in, each
//! exactly once and in `seq` order per channel, across any number of lost connections.
//! [`StreamHandle::send`] returns once the server has acknowledged the message as durable.
//!
//! # How
//!
//! - The task keeps the last `seq` it delivered per channel ([`SeqTracker`]).
//! - On any disconnect (a socket error, close code 4000 "resume required", 1001 "going
//!   away", 4002, a missed heartbeat, or [`StreamHandle::force_disconnect`]) it reconnects
//!   after a jittered exponential [`Backoff`] and sends `resume` with those seqs as its very
//!   first frame: the server then sends what was missed, `resumed`, and live events.
//! - An event at or below the last delivered seq is a repeat and is dropped. An event past
//!   the next seq is a gap; the server promises never to cause one, so it is logged as a
//!   bug and the stream reconnects and resumes, which fills it. A `resumed` frame naming a
//!   later seq than was delivered is the same kind of gap.
//! - Requests wait in an outbox until answered. After a reconnection, unanswered sends are
//!   written again with the same `ref` and `client_msg_id`; the server's idempotency makes
//!   that safe, and the `ack` carries the first message. Edits, deletions and reactions are
//!   not repeated; if their answer was lost they fail with [`Error::Interrupted`].
//! - A `ping` goes out every half heartbeat interval (from `hello`). A connection on which
//!   the server said nothing for a whole interval is taken as dead.
//! - Delivered events wait in a bounded queue for the application. If it fills up, the
//!   task stops delivering (nothing is recorded as delivered), keeps serving answers, and
//!   once the application has read half the queue it reconnects and resumes from what was
//!   delivered: a slow reader costs a reconnection, never memory or events. Sending never
//!   waits for the application to read: a connection lost while the queue is full is
//!   opened again at once when requests are waiting, and otherwise once there is room.
//!
//! A session signed in on an end-to-end encryption device also gets its to-device messages
//! and `e2ee:keys_low` signals ([`Stream::next_item`]), in the order the server sent them
//! among the events (a room key before the message it opens). The server sends a to-device
//! message again on every connection until it is acknowledged
//! ([`StreamHandle::ack_to_device`]); the stream hands each ID out once, dropping any at or
//! below the last it delivered. While the application's queue is full they are dropped
//! like events, unacknowledged, and come again on the reconnection that follows.
//!
//! A channel is tracked from [`ConnectOptions::since`], or (by default) from the
//! `last_seq` that REST reports for every channel the user can see when the stream opens,
//! and otherwise from its first delivered event. A channel the user joins while the stream
//! is disconnected, and that has delivered nothing yet, starts where the new connection
//! starts: its events from the join to the reconnection are not replayed.

use crate::backoff::Backoff;
use crate::error::Error;
use crate::frames::{self, Content, EventFrame, Request, ServerFrame};
use crate::outbox::{Outbox, REQUESTS_ON_WIRE_MAX};
use crate::rest::{Client, Session};
use crate::tracker::{Membership, SeqTracker, Verdict};
use crate::types::{Message, ToDeviceMessage};
use futures_util::stream::SplitSink;
use futures_util::{FutureExt, SinkExt, StreamExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, timeout, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{header, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};
use tokio_tungstenite::WebSocketStream;

/// Events delivered and not yet read by the application, at most (by default).
pub const EVENT_QUEUE_MAX: usize = 8192;
/// Typing notices not yet read, at most; more are dropped (they are best effort anyway).
pub const TYPING_QUEUE_MAX: usize = 64;
/// Requests from handles not yet taken by the stream's task, at most; callers wait.
pub const COMMAND_QUEUE_MAX: usize = 1024;
/// Frames waiting to be written to the socket, at most: every request that may be on the
/// wire, plus room for pings and typing notices (which are dropped when there is none).
pub const WRITE_QUEUE_MAX: usize = REQUESTS_ON_WIRE_MAX + 64;
/// How long opening a connection (TCP, the upgrade, and `hello`) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a closing stream waits for the server's close frame.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long to hold requests after a `rate_limited` error that names no delay.
pub const RATE_LIMIT_RETRY_DEFAULT: Duration = Duration::from_secs(1);
/// The smallest heartbeat interval honoured, whatever `hello` says.
pub const HEARTBEAT_INTERVAL_MIN: Duration = Duration::from_millis(200);
/// The WebSocket close code that says the token was refused.
pub const CLOSE_UNAUTHORIZED: u16 = 4001;

/// tungstenite's read buffer. Its default, 128 KiB, is zeroed before every read attempt,
/// including each one that finds the socket empty; server frames are small, and a larger
/// one takes more reads.
const WS_READ_BUFFER_BYTES: usize = 16 * 1024;

fn ws_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(WS_READ_BUFFER_BYTES)
}

/// How a stream starts and behaves.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// The last seq the application has of each channel; the stream resumes after them.
    /// `None` (the default) asks REST for the `last_seq` of every channel the user can see,
    /// so that the stream misses nothing from the moment it opens.
    pub since: Option<HashMap<String, u64>>,
    /// The reconnection policy.
    pub backoff: Backoff,
    /// Events delivered and not yet read, at most (at least 2).
    pub event_queue_max: usize,
    /// How the stream reaches the server: a WebSocket (the default) or QUIC.
    pub transport: Transport,
}

impl Default for ConnectOptions {
    fn default() -> ConnectOptions {
        ConnectOptions {
            since: None,
            backoff: Backoff::default(),
            event_queue_max: EVENT_QUEUE_MAX,
            transport: Transport::WebSocket,
        }
    }
}

/// The transport of an event stream. Both carry the same frames, and the stream behaves
/// the same over either: resume, dedupe, reconnects.
#[derive(Clone, Debug, Default)]
pub enum Transport {
    /// `ws://…/ws/v1/connect` on the client's base URL.
    #[default]
    WebSocket,
    /// QUIC to this address, with the server certificate pinned.
    Quic(crate::quic::QuicTarget),
}

/// One event of a channel, as the server's `event` frame carries it.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// The channel.
    pub channel_id: String,
    /// Its seq in the channel: the previous event delivered for this channel had `seq - 1`.
    pub seq: u64,
    /// The event object: `{"type": "message:new" | "message:edited" | ..., ...}`.
    pub event: Value,
}

impl Event {
    /// The event's `type`, such as `message:new` or `member:joined`.
    pub fn kind(&self) -> &str {
        self.event["type"].as_str().unwrap_or("")
    }

    /// The message a `message:*` or `reaction:*` event carries, as it stands after the
    /// event; `None` for membership events.
    pub fn message(&self) -> Option<Message> {
        serde_json::from_value(self.event.get("message")?.clone()).ok()
    }

    /// How the event bears on the membership of `user_id`.
    fn membership(event: &Value, user_id: &str) -> Membership {
        let own = event["user_id"].as_str() == Some(user_id);
        match event["type"].as_str() {
            Some("member:joined") if own => Membership::SelfJoined,
            Some("member:left") if own => Membership::SelfLeft,
            _ => Membership::Other,
        }
    }
}

/// What a stream hands the application, in the order the server sent it.
#[derive(Clone, Debug, PartialEq)]
pub enum StreamItem {
    /// An event of a channel.
    Event(Event),
    /// A to-device message for this session's device (`API.md` §14); acknowledge it once
    /// handled, or it comes again on the next connection.
    ToDevice(ToDeviceMessage),
    /// The device has fewer than 10 unclaimed one-time keys left: publish more
    /// ([`Session::top_up_one_time_keys`]). Dropped, not repeated, when the queue is full.
    KeysLow {
        /// The device's unclaimed one-time keys.
        one_time_key_count: u64,
    },
}

/// A `typing` notice: someone is typing in a channel. Ephemeral: never replayed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Typing {
    /// The channel.
    pub channel_id: String,
    /// Who is typing.
    pub user_id: String,
}

/// What a stream has been through, for monitoring and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Connections opened, the first included.
    pub connections: u64,
    /// Connections lost (for any reason but closing the stream).
    pub disconnects: u64,
    /// Events handed to the application's queue.
    pub events_delivered: u64,
    /// Events dropped because their seq was delivered already (the server should send
    /// none).
    pub repeats_dropped: u64,
    /// Gaps seen, each followed by a reconnection (the server should cause none).
    pub gaps_detected: u64,
    /// Requests written again on a new connection because their answer never came.
    pub requests_rewritten: u64,
    /// Times the application's queue was full.
    pub queue_overflows: u64,
    /// `rate_limited` answers, each followed by a pause and a retry.
    pub rate_limited: u64,
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    disconnects: AtomicU64,
    events_delivered: AtomicU64,
    repeats_dropped: AtomicU64,
    gaps_detected: AtomicU64,
    requests_rewritten: AtomicU64,
    queue_overflows: AtomicU64,
    rate_limited: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    fn snapshot(&self) -> Stats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            connections: get(&self.connections),
            disconnects: get(&self.disconnects),
            events_delivered: get(&self.events_delivered),
            repeats_dropped: get(&self.repeats_dropped),
            gaps_detected: get(&self.gaps_detected),
            requests_rewritten: get(&self.requests_rewritten),
            queue_overflows: get(&self.queue_overflows),
            rate_limited: get(&self.rate_limited),
        }
    }
}

/// How an answer reaches the caller waiting for it.
type Reply = oneshot::Sender<Result<Value, Error>>;

enum Command {
    Request(Request, Reply),
    Typing(String),
    Cut,
    Close,
}

/// A fresh `client_msg_id`: 128 random bits in hex.
pub fn new_client_msg_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// The event stream of one user. Read it with [`Stream::next_event`]; send through it, or
/// through [`StreamHandle`]s from other tasks. Dropping it ends the connection.
pub struct Stream {
    events: mpsc::Receiver<StreamItem>,
    typing: mpsc::Receiver<Typing>,
    handle: StreamHandle,
    end: Arc<Mutex<Option<Error>>>,
    last: HashMap<String, u64>,
    task: Option<JoinHandle<()>>,
}

/// Sends requests on a stream's connection; cheap to clone, usable from any task. Its
/// calls fail with [`Error::Closed`] once the stream has ended.
#[derive(Clone)]
pub struct StreamHandle {
    commands: mpsc::Sender<Command>,
    counters: Arc<Counters>,
}

impl Session {
    /// Opens the event stream: connects, resumes from `options.since` (or from the current
    /// `last_seq` of every visible channel), and keeps the stream going in a background
    /// tokio task. Fails if this first connection cannot be made; later losses are
    /// repaired by reconnecting.
    pub async fn connect(&self, options: ConnectOptions) -> Result<Stream, Error> {
        let since = match &options.since {
            Some(since) => since.clone(),
            None => self.channel_seqs().await?,
        };
        let tracker = SeqTracker::seeded(&since);
        let conn = Conn::open(
            self.client(),
            &options.transport,
            &self.token,
            &tracker.since(),
        )
        .await
        .map_err(ConnectError::into_error)?;
        let queue_max = options.event_queue_max.max(2);
        let (events_tx, events) = mpsc::channel(queue_max);
        let (typing_tx, typing) = mpsc::channel(TYPING_QUEUE_MAX);
        let (commands_tx, commands) = mpsc::channel(COMMAND_QUEUE_MAX);
        let counters = Arc::new(Counters::default());
        bump(&counters.connections);
        let end = Arc::new(Mutex::new(None));
        let task = Task {
            client: self.client().clone(),
            transport: options.transport,
            token: self.token.clone(),
            user_id: self.user.id.clone(),
            backoff: options.backoff,
            queue_max,
            tracker,
            outbox: Outbox::new(),
            commands,
            events: events_tx,
            typing: typing_tx,
            counters: counters.clone(),
            end: end.clone(),
            rng: StdRng::from_entropy(),
            overflowed: false,
            to_device_last: 0,
        };
        let task = tokio::spawn(task.run(conn));
        Ok(Stream {
            events,
            typing,
            handle: StreamHandle {
                commands: commands_tx,
                counters,
            },
            end,
            last: HashMap::new(),
            task: Some(task),
        })
    }
}

impl Stream {
    /// The next event: in `seq` order per channel, never twice, never with a gap. Waits
    /// until one comes. Fails once the stream has ended: with the reason the first time
    /// (the token was refused, or reconnecting failed), with [`Error::Closed`] after.
    /// To-device messages and key signals met on the way are skipped (unacknowledged, so
    /// the server keeps them); a device's application reads [`Stream::next_item`] instead.
    pub async fn next_event(&mut self) -> Result<Event, Error> {
        loop {
            if let StreamItem::Event(event) = self.next_item().await? {
                return Ok(event);
            }
        }
    }

    /// The next item: an event (as [`Stream::next_event`] hands them out), a to-device
    /// message, or a key signal, in the order the server sent them. Fails as
    /// [`Stream::next_event`] does.
    pub async fn next_item(&mut self) -> Result<StreamItem, Error> {
        match self.events.recv().await {
            Some(item) => {
                if let StreamItem::Event(event) = &item {
                    self.last.insert(event.channel_id.clone(), event.seq);
                }
                Ok(item)
            }
            None => Err(self.ended()),
        }
    }

    fn ended(&self) -> Error {
        let mut end = self.end.lock().expect("the end slot is never poisoned");
        end.take().unwrap_or(Error::Closed)
    }

    /// The next typing notice, or `None` once the stream has ended. Notices that arrive
    /// while [`TYPING_QUEUE_MAX`] are unread are dropped.
    pub async fn next_typing(&mut self) -> Option<Typing> {
        self.typing.recv().await
    }

    /// The seq of the last event of `channel_id` that [`Stream::next_event`] returned.
    pub fn last_seq(&self, channel_id: &str) -> Option<u64> {
        self.last.get(channel_id).copied()
    }

    /// A handle to send on this stream from other tasks.
    pub fn handle(&self) -> StreamHandle {
        self.handle.clone()
    }

    /// Sends a message and waits for its `ack`; see [`StreamHandle::send`].
    pub async fn send(
        &self,
        channel_id: &str,
        text: &str,
        client_msg_id: &str,
    ) -> Result<Message, Error> {
        self.handle.send(channel_id, text, client_msg_id).await
    }

    /// Tells the channel that the user is typing; see [`StreamHandle::typing`].
    pub async fn typing(&self, channel_id: &str) -> Result<(), Error> {
        self.handle.typing(channel_id).await
    }

    /// Acknowledges to-device messages; see [`StreamHandle::ack_to_device`].
    pub async fn ack_to_device(&self, upto_id: &str) -> Result<(), Error> {
        self.handle.ack_to_device(upto_id).await
    }

    /// Measures a round trip; see [`StreamHandle::ping`].
    pub async fn ping(&self) -> Result<Duration, Error> {
        self.handle.ping().await
    }

    /// Cuts the connection; see [`StreamHandle::force_disconnect`].
    pub async fn force_disconnect(&self) {
        self.handle.force_disconnect().await
    }

    /// What the stream has been through so far.
    pub fn stats(&self) -> Stats {
        self.handle.stats()
    }

    /// Closes the connection cleanly (a close frame, and the server's answer) and ends the
    /// stream. Requests still waiting fail with [`Error::Closed`].
    pub async fn close(mut self) {
        let _ = self.handle.commands.send(Command::Close).await;
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl StreamHandle {
    async fn request(&self, request: Request) -> Result<Value, Error> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Request(request, tx))
            .await
            .map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)?
    }

    async fn message(&self, request: Request) -> Result<Message, Error> {
        let v = self.request(request).await?;
        serde_json::from_value(v.clone()).map_err(|e| Error::Decode(format!("ack: {e} in {v}")))
    }

    /// `message:send`: posts a message and returns it once the server has made it durable.
    /// If the connection drops first, it is sent again with the same `client_msg_id` on the
    /// next connection, so it is stored exactly once; use a fresh ID per message
    /// ([`new_client_msg_id`]). A rate limit is waited out. Fails with the server's error,
    /// or when the stream ends.
    pub async fn send(
        &self,
        channel_id: &str,
        text: &str,
        client_msg_id: &str,
    ) -> Result<Message, Error> {
        self.message(Request::Send {
            channel_id: channel_id.to_owned(),
            content: Content::Text(text.to_owned()),
            client_msg_id: client_msg_id.to_owned(),
            thread_id: None,
        })
        .await
    }

    /// `message:send` in an encrypted channel (`API.md` §14): posts a `ciphertext` made for
    /// the device list up to `devices_seq`, with the guarantees of [`StreamHandle::send`].
    /// A device list that is behind fails with the `stale_devices` code (status 0); the
    /// whole exchange, keys included, is [`Session::send_encrypted`]'s.
    pub async fn send_ciphertext(
        &self,
        channel_id: &str,
        ciphertext: &str,
        devices_seq: u64,
        client_msg_id: &str,
    ) -> Result<Message, Error> {
        self.message(Request::Send {
            channel_id: channel_id.to_owned(),
            content: Content::encrypted(ciphertext, devices_seq),
            client_msg_id: client_msg_id.to_owned(),
            thread_id: None,
        })
        .await
    }

    /// Like [`StreamHandle::send`], as a reply in the thread of `thread_id`.
    pub async fn send_reply(
        &self,
        channel_id: &str,
        thread_id: &str,
        text: &str,
        client_msg_id: &str,
    ) -> Result<Message, Error> {
        self.message(Request::Send {
            channel_id: channel_id.to_owned(),
            content: Content::Text(text.to_owned()),
            client_msg_id: client_msg_id.to_owned(),
            thread_id: Some(thread_id.to_owned()),
        })
        .await
    }

    /// `message:edit` (author only); returns the message as edited. Not repeated after a
    /// lost connection: fails with [`Error::Interrupted`] if its answer was lost.
    pub async fn edit(
        &self,
        channel_id: &str,
        message_id: &str,
        text: &str,
    ) -> Result<Message, Error> {
        self.message(Request::Edit {
            channel_id: channel_id.to_owned(),
            message_id: message_id.to_owned(),
            content: Content::Text(text.to_owned()),
        })
        .await
    }

    /// `message:edit` in an encrypted channel: a new `ciphertext` for the device list up to
    /// `devices_seq`, checked like a send's. Not repeated after a lost connection.
    pub async fn edit_ciphertext(
        &self,
        channel_id: &str,
        message_id: &str,
        ciphertext: &str,
        devices_seq: u64,
    ) -> Result<Message, Error> {
        self.message(Request::Edit {
            channel_id: channel_id.to_owned(),
            message_id: message_id.to_owned(),
            content: Content::encrypted(ciphertext, devices_seq),
        })
        .await
    }

    /// `message:delete`. Not repeated after a lost connection.
    pub async fn delete(&self, channel_id: &str, message_id: &str) -> Result<(), Error> {
        self.request(Request::Delete {
            channel_id: channel_id.to_owned(),
            message_id: message_id.to_owned(),
        })
        .await
        .map(|_| ())
    }

    /// `reaction:add`. Not repeated after a lost connection.
    pub async fn add_reaction(
        &self,
        channel_id: &str,
        message_id: &str,
        emoji: &str,
    ) -> Result<(), Error> {
        self.react(channel_id, message_id, emoji, true).await
    }

    /// `reaction:remove`. Not repeated after a lost connection.
    pub async fn remove_reaction(
        &self,
        channel_id: &str,
        message_id: &str,
        emoji: &str,
    ) -> Result<(), Error> {
        self.react(channel_id, message_id, emoji, false).await
    }

    async fn react(
        &self,
        channel: &str,
        message: &str,
        emoji: &str,
        add: bool,
    ) -> Result<(), Error> {
        self.request(Request::React {
            channel_id: channel.to_owned(),
            message_id: message.to_owned(),
            emoji: emoji.to_owned(),
            add,
        })
        .await
        .map(|_| ())
    }

    /// `to_device:ack`: acknowledges this device's to-device messages up to `upto_id`, so
    /// the server forgets them and stops sending them on new connections; returns once the
    /// server has done so. Repeated on the next connection if the answer was lost (which
    /// is harmless).
    pub async fn ack_to_device(&self, upto_id: &str) -> Result<(), Error> {
        self.request(Request::AckToDevice {
            upto_id: upto_id.to_owned(),
        })
        .await
        .map(|_| ())
    }

    /// `typing:start`: best effort, dropped while disconnected.
    pub async fn typing(&self, channel_id: &str) -> Result<(), Error> {
        self.commands
            .send(Command::Typing(channel_id.to_owned()))
            .await
            .map_err(|_| Error::Closed)
    }

    /// Sends a `ping` and waits for its `pong`; returns the round trip. (The stream also
    /// pings on its own to keep the connection alive.)
    pub async fn ping(&self) -> Result<Duration, Error> {
        let start = Instant::now();
        self.request(Request::Ping).await?;
        Ok(start.elapsed())
    }

    /// Drops the current connection abruptly, as a network failure would: no close frame,
    /// and a TCP reset. The stream then reconnects and resumes as after any failure. Meant
    /// for tests and fault injection.
    pub async fn force_disconnect(&self) {
        let _ = self.commands.send(Command::Cut).await;
    }

    /// What the stream has been through so far.
    pub fn stats(&self) -> Stats {
        self.counters.snapshot()
    }
}

// ---------------------------------------------------------------------------------------
// One connection
// ---------------------------------------------------------------------------------------

type Ws = WebSocketStream<TcpStream>;

/// What a connection's frames come from, whatever its transport.
type Reader =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<WsMessage, WsError>> + Send>>;

/// An open session: the reading half, the writer task that owns the writing half, and a
/// way to cut the connection as a network failure would.
struct Conn {
    read: Reader,
    writes: mpsc::Sender<WsMessage>,
    writer: JoinHandle<()>,
    cutter: Option<Cutter>,
    heartbeat: Duration,
}

/// How a connection is cut without a close handshake.
enum Cutter {
    /// A second descriptor of the TCP socket, to reset it.
    Tcp(TcpSocket),
    /// The QUIC connection and its endpoint, dropped together.
    Quic(quinn::Connection, quinn::Endpoint),
}

/// Why a connection could not be opened.
enum ConnectError {
    /// Worth another attempt.
    Retry(String),
    /// Not: the token was refused.
    Fatal(Error),
}

impl ConnectError {
    fn into_error(self) -> Error {
        match self {
            ConnectError::Retry(why) => Error::WebSocket(why),
            ConnectError::Fatal(e) => e,
        }
    }
}

fn retry(what: &str) -> impl Fn(std::io::Error) -> ConnectError + '_ {
    move |e| ConnectError::Retry(format!("{what}: {e}"))
}

impl Conn {
    /// Connects, upgrades, sends `resume` with `since` as the first frame (the server
    /// waits only briefly for it), and reads `hello`.
    async fn open(
        client: &Client,
        transport: &Transport,
        token: &str,
        since: &HashMap<String, u64>,
    ) -> Result<Conn, ConnectError> {
        let opening = async {
            match transport {
                Transport::WebSocket => Conn::open_now(client, token, since).await,
                Transport::Quic(target) => Conn::open_quic(target, token, since).await,
            }
        };
        match timeout(CONNECT_TIMEOUT, opening).await {
            Ok(result) => result,
            Err(_) => Err(ConnectError::Retry("connecting timed out".into())),
        }
    }

    /// Connects over QUIC: `auth`, then `resume` as the session's first frame, then reads
    /// `hello`.
    async fn open_quic(
        target: &crate::quic::QuicTarget,
        token: &str,
        since: &HashMap<String, u64>,
    ) -> Result<Conn, ConnectError> {
        let resume = frames::resume(since);
        let quic = crate::quic::open(target, token, resume, WRITE_QUEUE_MAX)
            .await
            .map_err(ConnectError::Retry)?;
        let mut rx = quic.read;
        let mut read: Reader = Box::pin(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)));
        let heartbeat = read_hello(&mut read).await?;
        Ok(Conn {
            read,
            writes: quic.writes,
            writer: quic.writer,
            cutter: Some(Cutter::Quic(quic.connection, quic.endpoint)),
            heartbeat,
        })
    }

    async fn open_now(
        client: &Client,
        token: &str,
        since: &HashMap<String, u64>,
    ) -> Result<Conn, ConnectError> {
        let url = client.ws_url();
        let host = url.host_str().unwrap_or("localhost").to_owned();
        let port = url.port_or_known_default().unwrap_or(80);
        let tcp = TcpStream::connect((host.as_str(), port))
            .await
            .map_err(retry("connect"))?;
        tcp.set_nodelay(true).map_err(retry("nodelay"))?;
        // A second descriptor of the same socket, kept to reset it on a forced cut.
        let std = tcp.into_std().map_err(retry("socket"))?;
        let cutter = TcpSocket::from_std_stream(std.try_clone().map_err(retry("socket"))?);
        let tcp = TcpStream::from_std(std).map_err(retry("socket"))?;
        let mut request = url
            .as_str()
            .into_client_request()
            .map_err(|e| ConnectError::Retry(e.to_string()))?;
        let bearer = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| ConnectError::Fatal(Error::Unauthorized))?;
        request.headers_mut().insert(header::AUTHORIZATION, bearer);
        let (ws, _) = tokio_tungstenite::client_async_with_config(request, tcp, Some(ws_config()))
            .await
            .map_err(upgrade_error)?;
        let (mut sink, read) = ws.split();
        let resume = WsMessage::text(frames::resume(since));
        sink.send(resume)
            .await
            .map_err(|e| ConnectError::Retry(e.to_string()))?;
        let mut read: Reader = Box::pin(read);
        let heartbeat = read_hello(&mut read).await?;
        let (writes, rx) = mpsc::channel(WRITE_QUEUE_MAX);
        let writer = tokio::spawn(write_loop(sink, rx));
        Ok(Conn {
            read,
            writes,
            writer,
            cutter: Some(Cutter::Tcp(cutter)),
            heartbeat,
        })
    }

    /// Queues a frame unless the queue is short of room for the requests that may still
    /// be written; for frames that may be dropped (pings, typing).
    fn write_droppable(&self, text: String) {
        if self.writes.capacity() > REQUESTS_ON_WIRE_MAX {
            let _ = self.writes.try_send(WsMessage::text(text));
        }
    }

    /// Resets the connection: no close frame, a TCP RST.
    fn cut(mut self) {
        match self.cutter.take() {
            // Set on the shared socket; the reset goes out when the last descriptor closes.
            Some(Cutter::Tcp(socket)) => {
                let _ = socket.set_zero_linger();
            }
            // Dropping the socket loses everything in flight; the server learns of it by its
            // heartbeat, as it would of a client whose network went away.
            Some(Cutter::Quic(connection, endpoint)) => {
                drop(connection);
                drop(endpoint);
            }
            None => {}
        }
    }

    /// Sends a close frame and waits briefly for the server's.
    async fn close(mut self) {
        let frame = CloseFrame {
            code: CloseCode::Normal,
            reason: "closing".into(),
        };
        let _ = self.writes.try_send(WsMessage::Close(Some(frame)));
        let _ = timeout(CLOSE_TIMEOUT, async {
            while let Some(Ok(m)) = self.read.next().await {
                if m.is_close() {
                    break;
                }
            }
        })
        .await;
    }
}

impl Conn {
    /// Fails the connection after the server broke the WebSocket protocol (RFC 6455
    /// §7.1.7): a close frame with `code`, flushed within [`CLOSE_TIMEOUT`], then the
    /// connection is dropped. Nothing of the broken message reached the application.
    async fn fail(&mut self, code: u16) {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: "protocol error".into(),
        };
        // Closing the queue behind the close frame lets the writer flush it and end.
        let (closed, _) = mpsc::channel(1);
        let writes = std::mem::replace(&mut self.writes, closed);
        let _ = writes.try_send(WsMessage::Close(Some(frame)));
        drop(writes);
        let _ = timeout(CLOSE_TIMEOUT, &mut self.writer).await;
    }
}

/// The close code RFC 6455 asks for after a read error, or `None` when the socket is gone
/// and nothing can be sent. The server maps its errors the same way.
fn fail_code(e: &WsError) -> Option<u16> {
    use tokio_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
    match e {
        WsError::Utf8(_) => Some(1007),
        WsError::Capacity(CapacityError::MessageTooLong { .. }) => Some(1009),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => None,
        WsError::Capacity(_) | WsError::Protocol(_) | WsError::AttackAttempt => Some(1002),
        _ => None,
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.writer.abort();
    }
}

fn upgrade_error(e: WsError) -> ConnectError {
    match e {
        WsError::Http(r) if r.status().as_u16() == 401 => ConnectError::Fatal(Error::Unauthorized),
        e => ConnectError::Retry(format!("upgrade: {e}")),
    }
}

/// Reads until `hello`; returns its heartbeat interval. The server sends it first.
async fn read_hello(read: &mut Reader) -> Result<Duration, ConnectError> {
    while let Some(message) = read.next().await {
        match message.map_err(|e| ConnectError::Retry(e.to_string()))? {
            WsMessage::Text(text) => match ServerFrame::parse(text.as_str()) {
                Ok(ServerFrame::Hello {
                    heartbeat_interval, ..
                }) => {
                    let interval = Duration::from_secs(heartbeat_interval);
                    return Ok(interval.max(HEARTBEAT_INTERVAL_MIN));
                }
                // QUIC refuses a token with an error frame before closing.
                Ok(ServerFrame::Error { code, .. }) if code == "unauthorized" => {
                    return Err(ConnectError::Fatal(Error::Unauthorized));
                }
                _ => {}
            },
            WsMessage::Close(frame) => return Err(close_error(frame.as_ref())),
            _ => {}
        }
    }
    Err(ConnectError::Retry("closed before hello".into()))
}

fn close_error(frame: Option<&CloseFrame>) -> ConnectError {
    match frame {
        Some(f) if u16::from(f.code) == CLOSE_UNAUTHORIZED => {
            ConnectError::Fatal(Error::Unauthorized)
        }
        Some(f) => ConnectError::Retry(format!("closed {} {}", u16::from(f.code), f.reason)),
        None => ConnectError::Retry("closed".into()),
    }
}

/// Writes queued frames, flushing once per burst, until the queue closes or the socket
/// fails. Ending is how the session learns of a write failure.
async fn write_loop(mut sink: SplitSink<Ws, WsMessage>, mut rx: mpsc::Receiver<WsMessage>) {
    while let Some(first) = rx.recv().await {
        if sink.feed(first).await.is_err() {
            return;
        }
        while let Ok(next) = rx.try_recv() {
            if sink.feed(next).await.is_err() {
                return;
            }
        }
        if sink.flush().await.is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------
// The task
// ---------------------------------------------------------------------------------------

/// How a connection ended.
enum End {
    /// The application closed the stream, or dropped it.
    Closed,
    /// Lost; reconnect and resume.
    Lost(String),
    /// Cannot go on.
    Fatal(Error),
}

struct Task {
    client: Client,
    transport: Transport,
    token: String,
    user_id: String,
    backoff: Backoff,
    queue_max: usize,
    tracker: SeqTracker,
    outbox: Outbox<Reply>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<StreamItem>,
    typing: mpsc::Sender<Typing>,
    counters: Arc<Counters>,
    end: Arc<Mutex<Option<Error>>>,
    rng: StdRng,
    /// The application's queue was full: events are being dropped until it has room and
    /// the stream has reconnected.
    overflowed: bool,
    /// The ID of the last to-device message delivered (0: none yet).
    to_device_last: u64,
}

impl Task {
    async fn run(mut self, first: Conn) {
        let mut conn = Some(first);
        let mut attempt = 0u32;
        let mut last_failure = String::new();
        loop {
            if let Some(c) = conn.take() {
                match self.serve(c).await {
                    End::Closed => return self.finish(Error::Closed),
                    End::Fatal(e) => return self.finish(e),
                    End::Lost(why) => {
                        tracing::debug!(user = %self.user_id, %why, "connection lost");
                        bump(&self.counters.disconnects);
                        // On a cluster, the next try goes to another node: this one may be
                        // down or cut off.
                        self.client.next_node();
                        for reply in self.outbox.disconnected() {
                            let _ = reply.send(Err(Error::Interrupted));
                        }
                        attempt = 0;
                        last_failure = why;
                    }
                }
            }
            if attempt >= self.backoff.attempts_max {
                let e = Error::ReconnectFailed {
                    attempts: attempt,
                    last: last_failure,
                };
                return self.finish(e);
            }
            let delay = self.backoff.delay(attempt, self.rng.gen());
            attempt += 1;
            if !self.idle(delay).await {
                return self.finish(Error::Closed);
            }
            let since = self.tracker.since();
            match Conn::open(&self.client, &self.transport, &self.token, &since).await {
                Ok(c) => {
                    bump(&self.counters.connections);
                    self.overflowed = false;
                    conn = Some(c);
                }
                Err(ConnectError::Fatal(e)) => return self.finish(e),
                Err(ConnectError::Retry(why)) => {
                    tracing::debug!(user = %self.user_id, %why, attempt, "reconnect failed");
                    self.client.next_node();
                    last_failure = why;
                }
            }
        }
    }

    /// Ends the stream: every waiting request fails, and the application's next read
    /// returns `error`.
    fn finish(mut self, error: Error) {
        for reply in self.outbox.drain() {
            let _ = reply.send(Err(copy_of(&error)));
        }
        if !matches!(error, Error::Closed) {
            tracing::warn!(user = %self.user_id, %error, "event stream ended");
        }
        *self.end.lock().expect("the end slot is never poisoned") = Some(error);
    }

    /// Waits `delay` between connections, taking requests meanwhile (they are written once
    /// connected); when the application's queue overflowed, also until half of it is free
    /// or a request is waiting. (A reconnection would only replay events the full queue
    /// drops, unless it carries requests; an application that sends without reading must
    /// still get its answers.) Returns false when the stream should end.
    async fn idle(&mut self, delay: Duration) -> bool {
        let deadline = Instant::now() + delay;
        let room = self.queue_max / 2;
        let mut waited = false;
        while !waited || (self.overflowed && self.outbox.is_empty()) {
            tokio::select! {
                _ = sleep_until(deadline), if !waited => waited = true,
                r = self.events.reserve_many(room), if self.overflowed => match r {
                    Ok(_) => self.overflowed = false,
                    Err(_) => return false,
                },
                command = self.commands.recv() => match command {
                    None | Some(Command::Close) => return false,
                    Some(Command::Request(request, reply)) => {
                        self.outbox.push(request, reply);
                    }
                    Some(Command::Typing(_) | Command::Cut) => {}
                },
                _ = self.events.closed() => return false,
            }
        }
        true
    }

    /// Runs one connection until it ends.
    async fn serve(&mut self, mut conn: Conn) -> End {
        let period = conn.heartbeat / 2;
        let mut ping = tokio::time::interval_at(Instant::now() + period, period);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_heard = Instant::now();
        let room = self.queue_max / 2;
        loop {
            if let Some(end) = self.write_requests(&conn) {
                return end;
            }
            let pause = self.outbox.paused_until().map(Instant::from_std);
            let step = tokio::select! {
                message = conn.read.next() => {
                    last_heard = Instant::now();
                    match message {
                        Some(Ok(m)) => self.on_message(m),
                        Some(Err(e)) => {
                            if let Some(code) = fail_code(&e) {
                                conn.fail(code).await;
                            }
                            Some(End::Lost(format!("read: {e}")))
                        }
                        None => Some(End::Lost("the server closed the socket".into())),
                    }
                }
                command = self.commands.recv() => match command {
                    None | Some(Command::Close) => {
                        conn.close().await;
                        return End::Closed;
                    }
                    Some(Command::Cut) => {
                        conn.cut();
                        return End::Lost("cut by force_disconnect".into());
                    }
                    Some(Command::Request(request, reply)) => {
                        self.outbox.push(request, reply);
                        None
                    }
                    Some(Command::Typing(channel)) => {
                        conn.write_droppable(frames::typing(&channel));
                        None
                    }
                },
                _ = ping.tick() => {
                    if last_heard.elapsed() > conn.heartbeat {
                        Some(End::Lost("heartbeat missed".into()))
                    } else {
                        conn.write_droppable(frames::ping(None));
                        None
                    }
                }
                _ = sleep_until(pause.unwrap_or_else(Instant::now)), if pause.is_some() => None,
                _ = &mut conn.writer => Some(End::Lost("write failed".into())),
                // Only whether there is room matters; the permits go back at once.
                room_again = self.events.reserve_many(room).map(|r| r.is_ok()),
                    if self.overflowed => match room_again {
                    true => Some(End::Lost("the event queue has room again; resuming".into())),
                    false => Some(End::Closed),
                },
                // The application dropped the stream.
                _ = self.events.closed() => {
                    conn.close().await;
                    return End::Closed;
                }
            };
            if let Some(end) = step {
                return end;
            }
        }
    }

    /// Writes what the outbox lets out now.
    fn write_requests(&mut self, conn: &Conn) -> Option<End> {
        let now = std::time::Instant::now();
        while let Some((frame, rewrite)) = self.outbox.next_to_write(now) {
            if rewrite {
                bump(&self.counters.requests_rewritten);
            }
            // Cannot be full: room is kept for every request that may be on the wire.
            if conn.writes.try_send(WsMessage::text(frame)).is_err() {
                return Some(End::Lost("the writer is gone".into()));
            }
        }
        None
    }

    fn on_message(&mut self, message: WsMessage) -> Option<End> {
        match message {
            WsMessage::Text(text) => match ServerFrame::parse(text.as_str()) {
                Ok(frame) => self.on_frame(frame),
                Err(e) => {
                    tracing::warn!(error = %e, "unreadable frame from the server");
                    None
                }
            },
            WsMessage::Close(frame) => Some(match close_error(frame.as_ref()) {
                ConnectError::Fatal(e) => End::Fatal(e),
                ConnectError::Retry(why) => End::Lost(why),
            }),
            _ => None,
        }
    }

    fn on_frame(&mut self, frame: ServerFrame) -> Option<End> {
        match frame {
            ServerFrame::Event(f) => return self.on_event(f),
            ServerFrame::Ack { reference, message } => {
                self.answer(&reference, Ok(message));
            }
            ServerFrame::Error {
                reference,
                code,
                message,
                retry_after_ms,
            } => self.on_error(&reference, code, message, retry_after_ms),
            ServerFrame::Pong { reference } => self.answer(&reference, Ok(Value::Null)),
            ServerFrame::Typing {
                channel_id,
                user_id,
            } => {
                let _ = self.typing.try_send(Typing {
                    channel_id,
                    user_id,
                });
            }
            ServerFrame::Resumed { channels } => return self.on_resumed(&channels),
            ServerFrame::ToDevice(m) => return self.on_to_device(m),
            ServerFrame::KeysLow { one_time_key_count } if !self.overflowed => {
                return self.push(StreamItem::KeysLow { one_time_key_count })
            }
            ServerFrame::Hello { .. } | ServerFrame::KeysLow { .. } | ServerFrame::Unknown => {}
        }
        None
    }

    fn answer(&mut self, reference: &Value, result: Result<Value, Error>) {
        let Some(r) = frames::ref_of(reference) else {
            return;
        };
        if let Some((_, reply)) = self.outbox.answered(r) {
            let _ = reply.send(result);
        }
    }

    fn on_error(&mut self, reference: &Value, code: String, message: String, after: Option<u64>) {
        let retry_after = after.map(Duration::from_millis);
        if code == "rate_limited" {
            if let Some(r) = frames::ref_of(reference) {
                let until =
                    std::time::Instant::now() + retry_after.unwrap_or(RATE_LIMIT_RETRY_DEFAULT);
                if self.outbox.retry_after(r, until) {
                    bump(&self.counters.rate_limited);
                    return;
                }
            }
        }
        if reference.is_null() {
            tracing::warn!(%code, %message, "the server refused a frame");
            return;
        }
        let error = Error::Api {
            status: 0,
            code,
            message,
            retry_after,
        };
        self.answer(reference, Err(error));
    }

    fn on_event(&mut self, f: EventFrame) -> Option<End> {
        if self.overflowed {
            self.tracker.hold(&f.channel_id, f.seq);
            return None;
        }
        let membership = Event::membership(&f.event, &self.user_id);
        match self.tracker.check(&f.channel_id, f.seq, membership) {
            Verdict::Repeat => {
                bump(&self.counters.repeats_dropped);
                tracing::warn!(channel = %f.channel_id, seq = f.seq, "the server repeated an event");
                None
            }
            Verdict::Gap { expected } => {
                bump(&self.counters.gaps_detected);
                tracing::error!(
                    channel = %f.channel_id, expected, got = f.seq,
                    "BUG: the server skipped events; reconnecting to resume"
                );
                Some(End::Lost(format!("gap in {}", f.channel_id)))
            }
            Verdict::Deliver => self.deliver(f, membership),
        }
    }

    fn deliver(&mut self, f: EventFrame, membership: Membership) -> Option<End> {
        let (channel, seq) = (f.channel_id.clone(), f.seq);
        let event = Event {
            channel_id: f.channel_id,
            seq: f.seq,
            event: f.event,
        };
        let end = self.push(StreamItem::Event(event));
        if self.overflowed {
            self.tracker.hold(&channel, seq);
        } else if end.is_none() {
            self.tracker.delivered(&channel, seq, membership);
            bump(&self.counters.events_delivered);
        }
        end
    }

    /// A to-device message goes to the application once: one at or below the last
    /// delivered ID is a repeat the server sends on every connection until acknowledged.
    fn on_to_device(&mut self, m: ToDeviceMessage) -> Option<End> {
        let id = m.seq();
        if self.overflowed || id.is_some_and(|id| id <= self.to_device_last) {
            return None;
        }
        let end = self.push(StreamItem::ToDevice(m));
        if end.is_none() && !self.overflowed {
            self.to_device_last = id.unwrap_or(self.to_device_last);
        }
        end
    }

    /// Puts an item in the application's queue; when it is full, marks the stream
    /// overflowed (the item is dropped, and the reconnection once there is room resumes).
    fn push(&mut self, item: StreamItem) -> Option<End> {
        match self.events.try_send(item) {
            Ok(()) => None,
            Err(mpsc::error::TrySendError::Full(_)) => {
                bump(&self.counters.queue_overflows);
                tracing::debug!(user = %self.user_id, "event queue full; will resume");
                self.overflowed = true;
                None
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Some(End::Closed),
        }
    }

    /// After a catch-up, every named channel must have been delivered up to the seq the
    /// server names; less is a gap.
    fn on_resumed(&mut self, channels: &HashMap<String, u64>) -> Option<End> {
        if self.overflowed {
            return None;
        }
        for (channel, &seq) in channels {
            let have = self.tracker.last(channel).unwrap_or(0);
            if have < seq {
                bump(&self.counters.gaps_detected);
                tracing::error!(
                    %channel, have, resumed = seq,
                    "BUG: resumed names events that never came; reconnecting"
                );
                return Some(End::Lost(format!("resume of {channel} fell short")));
            }
        }
        None
    }
}

/// The same error again, for each of several waiting callers.
fn copy_of(e: &Error) -> Error {
    match e {
        Error::Closed => Error::Closed,
        Error::Unauthorized => Error::Unauthorized,
        Error::Interrupted => Error::Interrupted,
        Error::ReconnectFailed { attempts, last } => Error::ReconnectFailed {
            attempts: *attempts,
            last: last.clone(),
        },
        other => Error::WebSocket(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event_frame(channel: &str, seq: u64, kind: &str, user: &str) -> String {
        serde_json::json!({
            "type": "event", "channel_id": channel, "seq": seq,
            "event": {"type": kind, "user_id": user},
        })
        .to_string()
    }

    fn task(queue_max: usize) -> (Task, mpsc::Receiver<StreamItem>) {
        let (events, rx) = mpsc::channel(queue_max);
        let (typing, _) = mpsc::channel(1);
        let (_, commands) = mpsc::channel(1);
        let task = Task {
            client: Client::new("http://127.0.0.1:9").unwrap(),
            transport: Transport::WebSocket,
            token: String::new(),
            user_id: "U1".into(),
            backoff: Backoff::default(),
            queue_max,
            tracker: SeqTracker::new(),
            outbox: Outbox::new(),
            commands,
            events,
            typing,
            counters: Arc::new(Counters::default()),
            end: Arc::new(Mutex::new(None)),
            rng: StdRng::seed_from_u64(1),
            overflowed: false,
            to_device_last: 0,
        };
        (task, rx)
    }

    /// The seq of the next queued item, which must be an event.
    fn next_seq(rx: &mut mpsc::Receiver<StreamItem>) -> u64 {
        match rx.try_recv() {
            Ok(StreamItem::Event(e)) => e.seq,
            other => panic!("expected an event, got {other:?}"),
        }
    }

    fn to_device_frame(id: u64) -> WsMessage {
        WsMessage::text(
            serde_json::json!({
                "type": "to_device", "id": id.to_string(), "sender_id": "U2",
                "sender_device_id": "D2", "content": {"n": id},
            })
            .to_string(),
        )
    }

    /// What is queued, as short labels: `e<seq>`, `t<id>`, `low<count>`.
    fn queued(rx: &mut mpsc::Receiver<StreamItem>) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(item) = rx.try_recv() {
            out.push(match item {
                StreamItem::Event(e) => format!("e{}", e.seq),
                StreamItem::ToDevice(m) => format!("t{}", m.id),
                StreamItem::KeysLow { one_time_key_count } => format!("low{one_time_key_count}"),
            });
        }
        out
    }

    // To-device messages and key signals reach the application among the events, in the
    // order the server sent them; a to-device message the server sends again (as on every
    // new connection until it is acknowledged) is handed out once.
    #[test]
    fn to_device_messages_are_delivered_once_in_order() {
        let (mut t, mut rx) = task(16);
        let low = serde_json::json!({"type": "e2ee:keys_low", "one_time_key_count": 9});
        let script = [
            to_device_frame(1),
            WsMessage::text(event_frame("C1", 1, "message:new", "U2")),
            to_device_frame(2),
            // A new connection: everything unacknowledged again, then more.
            to_device_frame(1),
            to_device_frame(2),
            WsMessage::text(low.to_string()),
            to_device_frame(3),
        ];
        for frame in script {
            assert!(t.on_message(frame).is_none());
        }
        assert_eq!(queued(&mut rx), ["t1", "e1", "t2", "low9", "t3"]);
    }

    // A to-device message that finds the queue full is not recorded as delivered, so the
    // resend on the reconnection that follows delivers it, once.
    #[test]
    fn a_full_queue_drops_to_device_messages_for_the_resend() {
        let (mut t, mut rx) = task(2);
        for id in 1..=3 {
            assert!(t.on_message(to_device_frame(id)).is_none());
        }
        assert!(t.overflowed);
        assert_eq!(queued(&mut rx), ["t1", "t2"]);
        t.overflowed = false;
        for id in 1..=3 {
            assert!(t.on_message(to_device_frame(id)).is_none());
        }
        assert_eq!(queued(&mut rx), ["t3"]);
    }

    // A fake frame sequence with a repeat, a gap and a short `resumed`: the application
    // gets each seq once and in order, the gap and the short resume each ask for a
    // reconnection, and the counters say what happened.
    #[test]
    fn frames_are_deduplicated_and_gaps_force_a_resume() {
        let (mut t, mut rx) = task(16);
        let mut delivered = Vec::new();
        let script = [
            (event_frame("C1", 1, "message:new", "U2"), false),
            (event_frame("C1", 2, "message:new", "U2"), false),
            (event_frame("C1", 2, "message:new", "U2"), false),
            (event_frame("C1", 4, "message:new", "U2"), true),
            (event_frame("C1", 3, "message:new", "U2"), false),
            (event_frame("C2", 7, "member:joined", "U1"), false),
            (
                serde_json::json!({"type":"resumed","channels":{"C1":3,"C2":7}}).to_string(),
                false,
            ),
            (
                serde_json::json!({"type":"resumed","channels":{"C1":5}}).to_string(),
                true,
            ),
        ];
        for (frame, reconnect) in &script {
            let end = t.on_message(WsMessage::text(frame.clone()));
            assert_eq!(end.is_some(), *reconnect, "{frame}");
            while let Ok(StreamItem::Event(e)) = rx.try_recv() {
                delivered.push((e.channel_id, e.seq));
            }
        }
        let want: Vec<(String, u64)> = [("C1", 1), ("C1", 2), ("C1", 3), ("C2", 7)]
            .iter()
            .map(|(c, s)| (c.to_string(), *s))
            .collect();
        assert_eq!(delivered, want);
        let stats = t.counters.snapshot();
        assert_eq!(stats.repeats_dropped, 1);
        assert_eq!(stats.gaps_detected, 2);
        assert_eq!(stats.events_delivered, 4);
    }

    // When the application's queue is full, nothing more is delivered or recorded, so the
    // resume that follows sends the dropped events again, each exactly once.
    #[test]
    fn a_full_queue_drops_undelivered_events_for_the_resume() {
        let (mut t, mut rx) = task(2);
        for seq in 1..=4 {
            assert!(t
                .on_message(WsMessage::text(event_frame("C1", seq, "message:new", "U2")))
                .is_none());
        }
        assert!(t.overflowed);
        assert_eq!(t.tracker.since(), HashMap::from([("C1".to_owned(), 2)]));
        assert_eq!(next_seq(&mut rx), 1);
        assert_eq!(next_seq(&mut rx), 2);
        // The reconnection clears the overflow; the resume starts after seq 2.
        t.overflowed = false;
        for seq in 3..=4 {
            t.on_message(WsMessage::text(event_frame("C1", seq, "message:new", "U2")));
        }
        assert_eq!(next_seq(&mut rx), 3);
        assert_eq!(next_seq(&mut rx), 4);
        assert_eq!(t.counters.snapshot().queue_overflows, 1);
    }

    // Answers reach the request they are for: an ack resolves a send with its message, an
    // error frame fails it with the server's code, and a rate limit keeps it waiting.
    #[test]
    fn answers_reach_their_requests() {
        let (mut t, _rx) = task(4);
        let send = |id: &str| Request::Send {
            channel_id: "C1".into(),
            content: Content::Text(id.into()),
            client_msg_id: id.into(),
            thread_id: None,
        };
        let (tx_a, mut rx_a) = oneshot::channel();
        let (tx_b, mut rx_b) = oneshot::channel();
        let (tx_c, mut rx_c) = oneshot::channel();
        let a = t.outbox.push(send("a"), tx_a);
        let b = t.outbox.push(send("b"), tx_b);
        let c = t.outbox.push(send("c"), tx_c);
        let now = std::time::Instant::now();
        while t.outbox.next_to_write(now).is_some() {}
        let frames = [
            serde_json::json!({"type":"ack","ref":a,"message":{"id":"M1-1"}}),
            serde_json::json!({"type":"error","ref":b,"code":"not_found","message":"no"}),
            serde_json::json!({"type":"error","ref":c,"code":"rate_limited","message":"slow",
                               "retry_after_ms":5}),
        ];
        for f in frames {
            assert!(t.on_message(WsMessage::text(f.to_string())).is_none());
        }
        assert_eq!(rx_a.try_recv().unwrap().unwrap()["id"], "M1-1");
        assert_eq!(
            rx_b.try_recv().unwrap().unwrap_err().code(),
            Some("not_found")
        );
        assert!(rx_c.try_recv().is_err(), "still waiting");
        assert!(t.outbox.paused_until().is_some());
        assert_eq!(t.counters.snapshot().rate_limited, 1);
    }

    // A close frame with 4001 ends the stream; any other close reconnects.
    #[test]
    fn close_codes() {
        let (mut t, _rx) = task(4);
        let close = |code: u16| {
            WsMessage::Close(Some(CloseFrame {
                code: CloseCode::from(code),
                reason: "x".into(),
            }))
        };
        assert!(matches!(
            t.on_message(close(4001)),
            Some(End::Fatal(Error::Unauthorized))
        ));
        for code in [4000, 1001, 4002, 1011] {
            assert!(matches!(t.on_message(close(code)), Some(End::Lost(_))));
        }
    }
}
