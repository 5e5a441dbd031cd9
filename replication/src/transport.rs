//! The node transport: Raft messages between the nodes of a cluster over TCP, on glommio.
//!
//! TCP, not QUIC, between nodes: the nodes of a cluster sit on one network, a connection
//! per pair of nodes is long-lived, and head-of-line blocking across groups is what a batch
//! per peer costs anyway; TCP needs no certificates between nodes and is what every
//! operator's firewall and load balancer understands.
//!
//! Each node keeps one outbound connection to every peer, opened by a task of its own that
//! reconnects with backoff (50 ms doubling to 1 s) and says `HELLO` first. [`Transport::send`]
//! queues a message for its peer; the peer's task takes everything queued whenever it is
//! free to write and sends it as one `RAFT` frame (a batch per peer, not a write per
//! message). A queue past [`QUEUE_MESSAGES_MAX`] drops new messages, which Raft
//! tolerates (it retries), so a dead peer costs bounded memory. Messages that could not be
//! written, the queue's drops included, are handed back through `on_lost`, so that the
//! owner can tell raft-rs the peer is unreachable and a snapshot was not delivered.
//!
//! Inbound connections are accepted on the node's cluster address. The first frame must be
//! a `HELLO` from a node of the membership with the same fingerprint; anything else closes
//! the connection. After it, every message of every `RAFT` frame goes to `deliver`, with
//! the sending node. A message larger than a piece (a snapshot) travels alone, in `PART`
//! frames that the reader joins. Every decoding error closes the connection too; the peer
//! reconnects.
//!
//! A peer catching up after a snapshot fetches events on a connection of its own
//! ([`Transport::fetch`]): `HELLO`, then `FETCH`, answered by one `EVENTS` frame that the
//! owner's `serve` handler fills; the asker then closes it. A peer's server calls this
//! node's the same way (`CALL`, answered by one `ANSWER`; see [`crate::calls`]), and its
//! blob store stores and reads blobs on this node's ([`crate::blobs`]): `BLOB_PIECE`s
//! answered by `BLOB_DONE`, or `BLOB_GET` answered by the blob's pieces or a `BLOB_DONE`
//! saying it is not held here, served by the [`BlobServer`] set with
//! [`Transport::serve_blobs`].
//!
//! The fault layer: [`Transport::set_cut`] cuts this node off from a peer, both ways (what
//! it would send is lost, what arrives from it is dropped), so that fault tests can
//! partition a cluster of real processes without touching the host's network.

use crate::wire::{self, BlobJoiner, BlobStatus, Decoder, Frame, Joiner};
use futures::future::LocalBoxFuture;
use futures::io::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use protobuf::Message as _;
use raft::eraftpb::Message;
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::task::Waker;
use std::time::{Duration, Instant};

/// Messages queued for one peer beyond which new ones are dropped.
pub const QUEUE_MESSAGES_MAX: usize = 65_536;
/// How long a notice waits for a connection to its peer before it is dropped: long enough
/// to outlast a reconnection (backoff up to [`BACKOFF_MAX`]) and a peer's restart, short
/// enough that a failed login counted late still falls in the window it was counted for.
pub const NOTICE_KEEP: Duration = Duration::from_secs(5);
/// Bytes read from a connection at a time.
const READ_BYTES: usize = 64 * 1024;
/// The first and the longest wait between connection attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a fetch of events may take, its connection included.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is in the cluster.
#[derive(Clone, Debug, Default)]
pub struct Membership {
    /// This node.
    pub me: u64,
    /// Every node, this one included, and its cluster address (more may be added while
    /// the transport runs: [`Transport::add_peer`]).
    pub nodes: BTreeMap<u64, SocketAddr>,
    /// The cluster's id, which both ends of a connection must share; `None`: a fingerprint
    /// of `nodes` (a cluster whose nodes never change). A cluster that adds nodes needs an
    /// id that does not depend on them: `chorus serve` derives it from the cluster's shared
    /// token secret.
    pub cluster: Option<u64>,
}

impl Membership {
    /// `me` among `nodes`, the cluster's id a fingerprint of `nodes`.
    pub fn new(me: u64, nodes: BTreeMap<u64, SocketAddr>) -> Membership {
        Membership {
            me,
            nodes,
            cluster: None,
        }
    }

    /// The fingerprint both ends of a connection must share: the cluster's id.
    pub fn fingerprint(&self) -> u64 {
        if let Some(id) = self.cluster {
            return id;
        }
        let pairs: Vec<(u64, String)> = self
            .nodes
            .iter()
            .map(|(id, addr)| (*id, addr.to_string()))
            .collect();
        wire::cluster_fingerprint(&pairs)
    }
}

/// The fault layer's switch: the peers a node is cut off from, both ways (what it would
/// send them is lost, what they send is dropped). `Send` and `Sync`, so that every shard's
/// transport of a node can share one, and a test on another thread can throw it.
#[derive(Clone, Debug, Default)]
pub struct Cuts {
    peers: std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<u64>>>,
    /// Whether any peer is cut: the path of every message looks at this alone.
    any: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Cuts {
    /// Cuts this node off from `peer`, or mends the link.
    pub fn set(&self, peer: u64, cut: bool) {
        let mut peers = self.peers.lock().expect("cuts");
        if cut {
            peers.insert(peer);
        } else {
            peers.remove(&peer);
        }
        self.any
            .store(!peers.is_empty(), std::sync::atomic::Ordering::Release);
    }

    /// Whether this node is cut off from `peer`.
    pub fn contains(&self, peer: u64) -> bool {
        self.any.load(std::sync::atomic::Ordering::Acquire)
            && self.peers.lock().expect("cuts").contains(&peer)
    }
}

/// Set once the transport stops; tasks waiting on it wake.
///
/// Each wait holds one slot for its waker, given back when the wait is dropped: a task
/// that waits anew for every read of a connection (through [`or_stop`]) must not pile up
/// wakers, each a reference to the task (glommio panics past 32,767 of them).
#[derive(Default)]
struct Stop {
    set: Cell<bool>,
    waiters: RefCell<BTreeMap<u64, Waker>>,
    next: Cell<u64>,
}

impl Stop {
    fn get(&self) -> bool {
        self.set.get()
    }

    fn set(&self) {
        self.set.set(true);
        for (_, w) in std::mem::take(&mut *self.waiters.borrow_mut()) {
            w.wake();
        }
    }

    /// Resolves once the transport stops.
    fn wait(&self) -> StopWait<'_> {
        StopWait {
            stop: self,
            slot: None,
        }
    }
}

/// A wait for [`Stop`]; its waker's slot goes when it is dropped.
struct StopWait<'a> {
    stop: &'a Stop,
    slot: Option<u64>,
}

impl std::future::Future for StopWait<'_> {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if self.stop.set.get() {
            return std::task::Poll::Ready(());
        }
        let slot = match self.slot {
            Some(slot) => slot,
            None => {
                let slot = self.stop.next.get();
                self.stop.next.set(slot + 1);
                self.slot = Some(slot);
                slot
            }
        };
        let mut waiters = self.stop.waiters.borrow_mut();
        match waiters.get(&slot) {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => {
                waiters.insert(slot, cx.waker().clone());
            }
        }
        std::task::Poll::Pending
    }
}

impl Drop for StopWait<'_> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot {
            self.stop.waiters.borrow_mut().remove(&slot);
        }
    }
}

/// Runs `f` until it finishes or the transport stops; `None` if it stopped.
async fn or_stop<T>(stop: &Stop, f: impl std::future::Future<Output = T>) -> Option<T> {
    use futures::future::{select, Either};
    let f = std::pin::pin!(f);
    let s = std::pin::pin!(stop.wait());
    match select(f, s).await {
        Either::Left((out, _)) => Some(out),
        Either::Right(_) => None,
    }
}

/// Messages for one peer, and the task that sends them.
struct Outbox {
    queue: RefCell<Batch>,
    /// Notices for the peer's server ([`Transport::notify`]), with when each was queued.
    notices: RefCell<Vec<(Instant, Vec<u8>)>>,
    waker: RefCell<Option<Waker>>,
}

impl Outbox {
    /// Wakes the task that sends, if it waits.
    fn wake(&self) {
        let waker = self.waker.borrow_mut().take();
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Keeps the notices for the next connection, except those queued [`NOTICE_KEEP`]
    /// ago or more.
    fn keep_notices(&self) {
        self.notices
            .borrow_mut()
            .retain(|(at, _)| at.elapsed() < NOTICE_KEEP);
    }
}

/// Messages of groups: (group id, message).
pub type Batch = Vec<(u64, Message)>;

/// What answers a peer's `FETCH`: (group, from, to) → the events this node holds from
/// `from` on, before `to`, as a batch (none if it holds none).
pub type Serve = Box<dyn Fn(u64, u64, u64) -> LocalBoxFuture<'static, Vec<u8>>>;

/// What the owner of the transport is told.
pub struct Handlers {
    /// A message arrived: (from node, group, message).
    pub deliver: Box<dyn Fn(u64, u64, Message)>,
    /// Messages for a peer that will not arrive: (peer, [(group, message)]).
    pub on_lost: Box<dyn Fn(u64, Batch)>,
    /// A peer fetches events (see [`Transport::fetch`]); `None` answers every fetch with
    /// no events.
    pub serve: Option<Serve>,
    /// A peer's server calls this node's ([`crate::calls`]); `None` closes every call.
    pub call: Option<Answer>,
    /// A peer's server sent this node's a notice ([`Transport::notify`]): (from node,
    /// bytes). `None` drops notices.
    pub notice: Option<Notice>,
}

/// What takes a peer's `NOTICE`: (from node, bytes).
pub type Notice = Box<dyn Fn(u64, Vec<u8>)>;

/// What answers a peer's `CALL`: (from node, request) → the answer (`None`: nobody serves
/// calls here).
pub type Answer = Box<dyn Fn(u64, Vec<u8>) -> LocalBoxFuture<'static, Option<Vec<u8>>>>;

/// What serves peers' blob exchanges on this node ([`crate::blobs`]).
pub trait BlobServer {
    /// Stores `bytes` as the blob whose BLAKE3 hash is `hash`, once they are checked
    /// against it; whether they are now stored durably.
    fn put(&self, hash: [u8; 32], bytes: Vec<u8>) -> LocalBoxFuture<'static, bool>;
    /// The blob `hash` and `len` name, if this node's own store holds it (never asking a
    /// peer in turn).
    fn get(&self, hash: [u8; 32], len: u64) -> LocalBoxFuture<'static, Option<bytes::Bytes>>;
}

/// Where a transport's connections find the [`BlobServer`], once one is set.
type BlobServers = Rc<RefCell<Option<Rc<dyn BlobServer>>>>;

/// How to ask one peer on a connection of its own ([`Exchange`]): its address, this
/// node's id and the cluster's fingerprint.
#[derive(Clone, Copy, Debug)]
pub struct Asker {
    pub(crate) addr: SocketAddr,
    pub(crate) me: u64,
    pub(crate) fingerprint: u64,
}

/// The peers a transport knows, by id, with their addresses: shared with the tasks that
/// accept and read connections, which refuse a node not among them.
type Peers = Rc<RefCell<BTreeMap<u64, SocketAddr>>>;

/// Who this node is to the connections it accepts.
#[derive(Clone)]
struct Known {
    me: u64,
    fingerprint: u64,
    peers: Peers,
}

/// The transport of one node.
pub struct Transport {
    known: Known,
    outboxes: RefCell<BTreeMap<u64, Rc<Outbox>>>,
    handlers: Rc<Handlers>,
    stopped: Rc<Stop>,
    /// Peers this node is cut off from (the fault layer).
    cut: Cuts,
    /// The task that accepts, which owns the listener.
    accepting: RefCell<Option<glommio::task::JoinHandle<()>>>,
    /// What serves peers' blob exchanges (none until [`Transport::serve_blobs`]).
    blobs: BlobServers,
}

impl Transport {
    /// Starts accepting on `listener` and connecting to every peer, on the current glommio
    /// executor.
    pub fn start(
        membership: Membership,
        listener: TcpListener,
        handlers: Handlers,
    ) -> Rc<Transport> {
        Transport::start_with_cuts(membership, listener, handlers, Cuts::default())
    }

    /// [`Transport::start`], with the fault layer's switch `cuts` (which may be shared
    /// with other transports of the node, and with a test on another thread).
    pub fn start_with_cuts(
        membership: Membership,
        listener: TcpListener,
        handlers: Handlers,
        cuts: Cuts,
    ) -> Rc<Transport> {
        let known = Known {
            me: membership.me,
            fingerprint: membership.fingerprint(),
            peers: Rc::new(RefCell::new(BTreeMap::new())),
        };
        let t = Rc::new(Transport {
            known,
            outboxes: RefCell::default(),
            handlers: Rc::new(handlers),
            stopped: Rc::default(),
            cut: cuts,
            accepting: RefCell::new(None),
            blobs: BlobServers::default(),
        });
        for (&peer, &addr) in &membership.nodes {
            t.add_peer(peer, addr);
        }
        let accepting = glommio::spawn_local(accept_loop(
            listener,
            t.known.clone(),
            t.handlers.clone(),
            t.stopped.clone(),
            t.cut.clone(),
            t.blobs.clone(),
        ))
        .detach();
        *t.accepting.borrow_mut() = Some(accepting);
        t
    }

    /// Adds node `peer` at `addr`: a connection to it is kept from now on, and its
    /// connections are accepted. A node known already keeps the address it was first given
    /// (a node's address does not change while it is a member); this node is not its own
    /// peer.
    pub fn add_peer(&self, peer: u64, addr: SocketAddr) {
        if peer == self.known.me || self.known.peers.borrow().contains_key(&peer) {
            return;
        }
        self.known.peers.borrow_mut().insert(peer, addr);
        let outbox = Rc::new(Outbox {
            queue: RefCell::new(Vec::new()),
            notices: RefCell::new(Vec::new()),
            waker: RefCell::new(None),
        });
        self.outboxes.borrow_mut().insert(peer, outbox.clone());
        glommio::spawn_local(send_loop(
            self.known.me,
            self.known.fingerprint,
            peer,
            addr,
            outbox,
            self.handlers.clone(),
            self.stopped.clone(),
        ))
        .detach();
    }

    /// The peers this transport knows, with their addresses.
    pub fn peers(&self) -> BTreeMap<u64, SocketAddr> {
        self.known.peers.borrow().clone()
    }

    /// Whether the transport was stopped.
    pub fn is_stopped(&self) -> bool {
        self.stopped.get()
    }

    /// Stops the transport ([`Transport::stop`]) and returns once its listener is
    /// closed, so that the port is free for a node started after it.
    pub async fn stop_and_close(&self) {
        self.stop();
        let accepting = self.accepting.borrow_mut().take();
        if let Some(task) = accepting {
            task.await;
        }
    }

    /// The fault layer: cuts this node off from `peer` both ways, or mends the link.
    pub fn set_cut(&self, peer: u64, cut: bool) {
        self.cut.set(peer, cut);
    }

    /// Serves peers' blob exchanges with `server` from now on (until then, a peer's blob
    /// is refused and its requests find nothing).
    pub fn serve_blobs(&self, server: Rc<dyn BlobServer>) {
        *self.blobs.borrow_mut() = Some(server);
    }

    /// How to ask `peer` on a connection of its own; an error if the peer is unknown or
    /// cut off.
    pub fn asker(&self, peer: u64) -> std::io::Result<Asker> {
        match self.known.peers.borrow().get(&peer) {
            Some(&addr) if !self.cut.contains(peer) && !self.stopped.get() => Ok(Asker {
                addr,
                me: self.known.me,
                fingerprint: self.known.fingerprint,
            }),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                format!("node {peer} cannot be asked"),
            )),
        }
    }

    /// Asks `peer` for `group`'s committed events from offset `from` on, before `to`, on a
    /// connection of its own (so that a catch-up's bulk does not hold up the Raft messages
    /// of every group), and returns them as a batch: at most about
    /// [`wire::EVENTS_BYTES`] of them, none if the peer does not hold `from`.
    pub async fn fetch(
        &self,
        peer: u64,
        group: u64,
        from: u64,
        to: u64,
    ) -> std::io::Result<Vec<u8>> {
        let asker = self.asker(peer)?;
        let request = Frame::Fetch { group, from, to };
        let asked = ask(asker, &request, FETCH_TIMEOUT);
        match or_stop(&self.stopped, asked).await {
            Some(Ok(Frame::Events {
                group: g,
                from: f,
                batch,
            })) if g == group && f == from => Ok(batch),
            Some(Ok(_)) => Err(std::io::Error::other(
                "an answer that is not the events asked for",
            )),
            Some(Err(e)) => Err(e),
            None => Err(std::io::Error::other("the transport stopped")),
        }
    }

    /// Queues a message of `group` for its `to` node. A message for an unknown node, or
    /// past a full queue, is lost (and reported so).
    pub fn send(&self, group: u64, msg: Message) {
        let outbox = self.outboxes.borrow().get(&msg.to).cloned();
        let Some(outbox) = outbox.filter(|_| !self.cut.contains(msg.to)) else {
            (self.handlers.on_lost)(msg.to, vec![(group, msg)]);
            return;
        };
        let mut queue = outbox.queue.borrow_mut();
        if queue.len() >= QUEUE_MESSAGES_MAX {
            drop(queue);
            (self.handlers.on_lost)(msg.to, vec![(group, msg)]);
            return;
        }
        queue.push((group, msg));
        drop(queue);
        outbox.wake();
    }

    /// Queues a notice for `peer`'s server, sent on the connection that carries Raft
    /// messages to it. Best effort: a notice for an unknown or cut-off peer, or past a full
    /// queue, is dropped; one that finds no connection waits for the next, up to
    /// [`NOTICE_KEEP`]; one whose own write fails is dropped (part of it may have gone,
    /// and a notice counted twice is worse than one lost).
    pub fn notify(&self, peer: u64, notice: Vec<u8>) {
        let outbox = self.outboxes.borrow().get(&peer).cloned();
        let Some(outbox) = outbox.filter(|_| !self.cut.contains(peer)) else {
            return;
        };
        let mut notices = outbox.notices.borrow_mut();
        if notices.len() >= QUEUE_MESSAGES_MAX {
            return;
        }
        notices.push((Instant::now(), notice));
        drop(notices);
        outbox.wake();
    }

    /// Stops connecting and accepting, closes the listener and every connection.
    pub fn stop(&self) {
        self.stopped.set();
        for outbox in self.outboxes.borrow().values() {
            outbox.wake();
        }
    }
}

/// Waits until the outbox has messages (or the transport stops).
async fn queued(outbox: &Outbox, stopped: &Stop) {
    std::future::poll_fn(|cx| {
        if stopped.get() || !outbox.queue.borrow().is_empty() || !outbox.notices.borrow().is_empty()
        {
            std::task::Poll::Ready(())
        } else {
            *outbox.waker.borrow_mut() = Some(cx.waker().clone());
            std::task::Poll::Pending
        }
    })
    .await
}

async fn send_loop(
    me: u64,
    fingerprint: u64,
    peer: u64,
    addr: SocketAddr,
    outbox: Rc<Outbox>,
    handlers: Rc<Handlers>,
    stopped: Rc<Stop>,
) {
    let mut backoff = BACKOFF_MIN;
    let mut conn: Option<TcpStream> = None;
    let mut buf = Vec::new();
    let mut last_write = Instant::now();
    while !stopped.get() {
        queued(&outbox, &stopped).await;
        if stopped.get() {
            break;
        }
        // A connection left quiet for a while may have been closed by the peer (it
        // restarted, say): the first write into it would be lost without an error, a
        // notice with it. The peer never writes on this connection, so a byte or the end
        // of the stream says it is gone.
        if conn
            .as_ref()
            .is_some_and(|c| last_write.elapsed() >= QUIET_CHECK_AFTER && !open_and_quiet(c))
        {
            conn = None;
        }
        last_write = Instant::now();
        if conn.is_none() {
            match connect(addr, me, fingerprint).await {
                Ok(c) => {
                    conn = Some(c);
                    backoff = BACKOFF_MIN;
                }
                Err(_) => {
                    // What waited for a peer that cannot be reached is lost; Raft resends.
                    let lost = std::mem::take(&mut *outbox.queue.borrow_mut());
                    (handlers.on_lost)(peer, lost);
                    // Notices wait for the next connection, for a while.
                    outbox.keep_notices();
                    glommio::timer::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            }
        }
        let batch = std::mem::take(&mut *outbox.queue.borrow_mut());
        buf.clear();
        let mut written = Ok(());
        for part in split_batch(batch) {
            let encoded = match &part[..] {
                // A message too large for a frame (a snapshot) goes in pieces.
                [(group, msg)] if msg.compute_size() as usize > wire::PART_BYTES => {
                    wire::encode_parts(*group, msg, &mut buf)
                }
                _ => wire::encode_raft(&part, &mut buf),
            };
            if encoded.is_err() {
                // Over what a frame, or the pieces of one message, may carry: it can never
                // be sent.
                buf.clear();
                (handlers.on_lost)(peer, part);
                continue;
            }
            let c = conn.as_mut().expect("connected");
            written = c.write_all(&buf).await;
            buf.clear();
            if written.is_err() {
                (handlers.on_lost)(peer, part);
                break;
            }
        }
        if written.is_err() {
            // The connection failed before the notices went: they wait for the next one.
            outbox.keep_notices();
        } else {
            let notices = std::mem::take(&mut *outbox.notices.borrow_mut());
            if !notices.is_empty() {
                for (_, notice) in notices {
                    // A notice too large for a frame is dropped.
                    let _ = wire::encode(&Frame::Notice(notice), &mut buf);
                }
                let c = conn.as_mut().expect("connected");
                written = c.write_all(&buf).await;
                buf.clear();
            }
        }
        if written.is_err() {
            conn = None;
        }
    }
    if let Some(mut c) = conn {
        let _ = c.close().await;
    }
}

/// Splits a batch so that each frame stays well under the frame limit, and each message
/// over a piece's size is alone.
fn split_batch(batch: Batch) -> Vec<Batch> {
    let budget = wire::FRAME_BYTES_MAX / 2;
    let mut parts = Vec::new();
    let mut part = Vec::new();
    let mut bytes = 0;
    for (group, msg) in batch {
        let size = msg.compute_size() as usize + 12;
        // A message over a piece's size travels alone, in pieces.
        let alone = size > wire::PART_BYTES;
        if !part.is_empty() && (alone || bytes + size > budget) {
            parts.push(std::mem::take(&mut part));
            bytes = 0;
        }
        bytes += size;
        part.push((group, msg));
        if alone {
            parts.push(std::mem::take(&mut part));
            bytes = 0;
        }
    }
    if !part.is_empty() {
        parts.push(part);
    }
    parts
}

/// Opens a connection of its own to the peer (or takes an idle one), sends `request` and
/// returns the first frame that comes back, all within `timeout`.
pub(crate) async fn ask(
    asker: Asker,
    request: &Frame,
    timeout: Duration,
) -> std::io::Result<Frame> {
    let mut out = Vec::new();
    wire::encode(request, &mut out).map_err(std::io::Error::other)?;
    within(timeout, async move {
        let mut x = Exchange::open(asker).await?;
        x.write(&out).await?;
        let answer = x.next().await?;
        x.finish().await;
        Ok(answer)
    })
    .await
}

/// `f`, or a `TimedOut` error once `timeout` has passed.
pub(crate) async fn within<T>(
    timeout: Duration,
    f: impl std::future::Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
    let timer = glommio::timer::Timer::new(timeout);
    match futures::future::select(std::pin::pin!(f), timer).await {
        futures::future::Either::Left((answer, _)) => answer,
        futures::future::Either::Right(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

/// One request and its answer on a connection of its own to a peer: opened (or taken
/// idle), written, read frame by frame, and kept for the next request if the answer was
/// read whole.
pub(crate) struct Exchange {
    addr: SocketAddr,
    c: TcpStream,
    decoder: Decoder,
    buf: Vec<u8>,
}

impl Exchange {
    /// A connection to the peer: an idle one, or a new one that has said `HELLO`.
    pub(crate) async fn open(asker: Asker) -> std::io::Result<Exchange> {
        let c = match take_idle(asker.addr) {
            Some(c) => c,
            None => connect(asker.addr, asker.me, asker.fingerprint).await?,
        };
        Ok(Exchange {
            addr: asker.addr,
            c,
            decoder: Decoder::new(),
            buf: vec![0u8; READ_BYTES],
        })
    }

    /// Writes encoded frames.
    pub(crate) async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.c.write_all(bytes).await
    }

    /// The next frame the peer sends.
    pub(crate) async fn next(&mut self) -> std::io::Result<Frame> {
        loop {
            if let Some(frame) = self.decoder.next_frame().map_err(std::io::Error::other)? {
                return Ok(frame);
            }
            let n = self.c.read(&mut self.buf).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.decoder.extend(&self.buf[..n]);
        }
    }

    /// Ends the exchange: the connection is kept for the next request to the peer if
    /// nothing more than the answer came (anything more would be a broken peer).
    pub(crate) async fn finish(mut self) {
        if self.decoder.buffered() == 0 {
            give_idle(self.addr, self.c);
        } else {
            let _ = self.c.close().await;
        }
    }
}

/// Connections to peers' cluster addresses whose last request was answered whole, kept
/// open for the next [`ask`] to the same address on this thread (the peer's connection
/// loop answers any number of requests in turn). A call then costs no connect and no
/// `HELLO`: with sends forwarded this way, reuse took the cluster's CPU per ack from 471
/// to 381 µs (`chorus-bench cluster --any-node`, medians of three runs).
const IDLE_PER_PEER: usize = 16;

/// How long a peer's outgoing connection may stay unwritten before the next write first
/// checks that the peer has not closed it.
const QUIET_CHECK_AFTER: Duration = Duration::from_millis(200);

thread_local! {
    static IDLE: RefCell<BTreeMap<SocketAddr, Vec<TcpStream>>> = const {
        RefCell::new(BTreeMap::new())
    };
}

/// An idle connection to `addr` that the peer has not closed, if there is one. A peer
/// that restarted closed its end: such connections are dropped here, never written to.
fn take_idle(addr: SocketAddr) -> Option<TcpStream> {
    loop {
        let c = IDLE.with(|idle| idle.borrow_mut().get_mut(&addr)?.pop())?;
        if open_and_quiet(&c) {
            return Some(c);
        }
    }
}

/// Keeps `c` for the next request to `addr`, unless enough are kept already.
fn give_idle(addr: SocketAddr, c: TcpStream) {
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        let kept = idle.entry(addr).or_default();
        if kept.len() < IDLE_PER_PEER {
            kept.push(c);
        }
    });
}

/// Whether the peer has neither closed `c` nor sent anything unasked on it: a
/// non-blocking peek finds no byte and no end of stream.
fn open_and_quiet(c: &TcpStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut byte = 0u8;
    // SAFETY: `recv` on the stream's own open socket into one byte this frame owns;
    // MSG_PEEK leaves any byte in the socket and MSG_DONTWAIT never blocks.
    let n = unsafe {
        libc::recv(
            c.as_raw_fd(),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock
}

pub(crate) async fn connect(
    addr: SocketAddr,
    me: u64,
    fingerprint: u64,
) -> std::io::Result<TcpStream> {
    let mut c = TcpStream::connect_timeout(addr, CONNECT_TIMEOUT)
        .await
        .map_err(std::io::Error::from)?;
    // With nobody listening at a loopback address, the kernel may pick that very port for
    // the dial's own end, and the socket then connects to itself.
    if c.local_addr().ok() == Some(addr) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            format!("nobody listens at {addr} (the dial connected to itself)"),
        ));
    }
    c.set_nodelay(true).map_err(std::io::Error::from)?;
    let mut hello = Vec::new();
    wire::encode(
        &Frame::Hello {
            node: me,
            cluster: fingerprint,
        },
        &mut hello,
    )
    .map_err(std::io::Error::other)?;
    c.write_all(&hello).await?;
    Ok(c)
}

async fn accept_loop(
    listener: TcpListener,
    known: Known,
    handlers: Rc<Handlers>,
    stopped: Rc<Stop>,
    cut: Cuts,
    blobs: BlobServers,
) {
    // The listener is dropped, and so closed, when the transport stops: a node restarted
    // in the same process must not share its port with a listener nobody accepts on.
    while let Some(accepted) = or_stop(&stopped, listener.accept()).await {
        let Ok(stream) = accepted else {
            glommio::timer::sleep(BACKOFF_MIN).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        glommio::spawn_local(read_loop(
            stream,
            known.clone(),
            handlers.clone(),
            stopped.clone(),
            cut.clone(),
            blobs.clone(),
        ))
        .detach();
    }
}

/// Reads one inbound connection until it ends, errs, or says something it should not.
async fn read_loop(
    mut stream: TcpStream,
    known: Known,
    handlers: Rc<Handlers>,
    stopped: Rc<Stop>,
    cut: Cuts,
    blobs: BlobServers,
) {
    let mut decoder = Decoder::new();
    let mut joiner = Joiner::default();
    let mut blob_in = BlobJoiner::default();
    let mut buf = vec![0u8; READ_BYTES];
    let mut from = None;
    while let Some(read) = or_stop(&stopped, stream.read(&mut buf)).await {
        let n = match read {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        decoder.extend(&buf[..n]);
        loop {
            let frame = match decoder.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "a cluster connection sent a bad frame; closing it");
                    let _ = stream.close().await;
                    return;
                }
            };
            match (frame, from) {
                (Frame::Hello { node, cluster }, None) => {
                    let peer = known.peers.borrow().contains_key(&node);
                    if !peer || cluster != known.fingerprint {
                        tracing::warn!(
                            node,
                            "a node of another cluster or membership connected; closing it"
                        );
                        let _ = stream.close().await;
                        return;
                    }
                    from = Some(node);
                }
                (Frame::Raft(_), Some(node)) if cut.contains(node) => {}
                (Frame::Raft(msgs), Some(node)) => {
                    for (group, msg) in msgs {
                        // A message must come from the node the connection said it is.
                        if msg.from == node && msg.to == known.me {
                            (handlers.deliver)(node, group, msg);
                        }
                    }
                }
                (
                    Frame::Part {
                        group,
                        part,
                        parts,
                        bytes,
                    },
                    Some(node),
                ) => match joiner.push(group, part, parts, &bytes) {
                    Ok(Some((group, msg))) => {
                        let cut_off = cut.contains(node);
                        if !cut_off && msg.from == node && msg.to == known.me {
                            (handlers.deliver)(node, group, msg);
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "a cluster connection sent bad pieces; closing it");
                        let _ = stream.close().await;
                        return;
                    }
                },
                (Frame::Call(request), Some(node)) if !cut.contains(node) => {
                    let answer = match &handlers.call {
                        Some(call) => call(node, request).await,
                        None => None,
                    };
                    let mut out = Vec::new();
                    let written = match answer {
                        Some(a) => {
                            wire::encode(&Frame::Answer(a), &mut out).is_ok()
                                && stream.write_all(&out).await.is_ok()
                        }
                        None => false,
                    };
                    if !written {
                        let _ = stream.close().await;
                        return;
                    }
                }
                (Frame::Notice(notice), Some(node)) => {
                    if let Some(deliver) = handlers.notice.as_ref().filter(|_| !cut.contains(node))
                    {
                        deliver(node, notice);
                    }
                }
                (
                    Frame::BlobPiece {
                        hash,
                        len,
                        offset,
                        bytes,
                    },
                    Some(node),
                ) if !cut.contains(node) => {
                    let whole = match blob_in.push(hash, len, offset, &bytes) {
                        Ok(whole) => whole,
                        Err(e) => {
                            tracing::warn!(error = %e, "a cluster connection sent bad blob pieces; closing it");
                            let _ = stream.close().await;
                            return;
                        }
                    };
                    if let Some((hash, bytes)) = whole {
                        let server = blobs.borrow().clone();
                        let stored = match server {
                            Some(s) => s.put(hash, bytes).await,
                            None => false,
                        };
                        let status = if stored {
                            BlobStatus::Stored
                        } else {
                            BlobStatus::Failed
                        };
                        let mut out = Vec::new();
                        let answer = Frame::BlobDone { hash, status };
                        if wire::encode(&answer, &mut out).is_err()
                            || stream.write_all(&out).await.is_err()
                        {
                            let _ = stream.close().await;
                            return;
                        }
                    }
                }
                (Frame::BlobGet { hash, len }, Some(node)) if !cut.contains(node) => {
                    let server = blobs.borrow().clone();
                    let held = match server {
                        Some(s) => s.get(hash, len).await,
                        None => None,
                    };
                    let written = match held {
                        Some(blob) => {
                            let mut ok = true;
                            for piece in wire::blob_pieces(&hash, &blob) {
                                ok = match piece {
                                    Ok(frame) => stream.write_all(&frame).await.is_ok(),
                                    Err(_) => false,
                                };
                                if !ok {
                                    break;
                                }
                            }
                            ok
                        }
                        None => {
                            let mut out = Vec::new();
                            let status = BlobStatus::Missing;
                            wire::encode(&Frame::BlobDone { hash, status }, &mut out).is_ok()
                                && stream.write_all(&out).await.is_ok()
                        }
                    };
                    if !written {
                        let _ = stream.close().await;
                        return;
                    }
                }
                (
                    Frame::Fetch { .. }
                    | Frame::Call(_)
                    | Frame::BlobPiece { .. }
                    | Frame::BlobGet { .. },
                    Some(node),
                ) if cut.contains(node) => {
                    let _ = stream.close().await;
                    return;
                }
                (Frame::Fetch { group, from, to }, Some(_)) => {
                    let batch = match &handlers.serve {
                        Some(serve) => serve(group, from, to).await,
                        None => crate::event_log::encode_batch(&[]),
                    };
                    let mut out = Vec::new();
                    let answer = Frame::Events { group, from, batch };
                    if wire::encode(&answer, &mut out).is_err()
                        || stream.write_all(&out).await.is_err()
                    {
                        let _ = stream.close().await;
                        return;
                    }
                }
                _ => {
                    tracing::warn!("a cluster connection broke the HELLO-first rule; closing it");
                    let _ = stream.close().await;
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pending at its first poll (waking its task at once), ready at the next: the shape
    /// of a read that waits for bytes.
    struct OnceLater(bool);

    impl std::future::Future for OnceLater {
        type Output = ();
        fn poll(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<()> {
            if self.0 {
                return std::task::Poll::Ready(());
            }
            self.0 = true;
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        }
    }

    // A connection's task waits for the stop beside every read: 40,000 such waits, more
    // than glommio lets one task hand out wakers (32,767), leave none behind. Waits that
    // kept their wakers made the executor panic ("Waker invariant broken") on a busy
    // node-to-node connection.
    #[test]
    fn waits_for_the_stop_give_their_wakers_back() {
        glommio::LocalExecutorBuilder::default()
            .make()
            .unwrap()
            .run(async {
                let stop = Stop::default();
                for _ in 0..40_000 {
                    assert_eq!(or_stop(&stop, OnceLater(false)).await, Some(()));
                }
                assert!(stop.waiters.borrow().is_empty());
                let waiting = or_stop(&stop, std::future::pending::<()>());
                let mut waiting = std::pin::pin!(waiting);
                assert!(futures::poll!(waiting.as_mut()).is_pending());
                assert_eq!(stop.waiters.borrow().len(), 1);
                stop.set();
                assert_eq!(waiting.await, None);
            });
    }
}
