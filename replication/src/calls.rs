//! Calls between nodes: a node's server hands a request it cannot decide (this node does
//! not lead the group the request writes to) to the server of the node that can, and
//! relays that node's answer.
//!
//! The bytes are the server's own (the gateway encodes a REST call); this module only
//! carries them. [`call`] takes a connection to the peer's cluster address of the same
//! shard (one an earlier call left open, or a new one that says `HELLO`), sends one `CALL`
//! frame and reads one `ANSWER` frame, within [`CALL_TIMEOUT`]; a connection answered
//! whole is kept for the next call, one the peer closed meanwhile is never used. On the receiving node the shard's transport hands the call to whatever
//! serves calls on that shard ([`Calls::serve`], the gateway), and writes its answer back; a
//! shard with nobody serving calls closes the connection, which the caller sees as an error.
//!
//! A call is made at most once: the caller does not resend it on an error (the request may
//! have been decided), and the callee does not pass it on again.

use crate::engine_env::shard_addr;
use crate::transport::{ask, Asker, Cuts, Membership};
use crate::wire::Frame;
use futures::channel::{mpsc, oneshot};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a call may take, its connection included: a write on the leader waits for a
/// majority, and a client is answered within `API.md` §15's 5 s either way.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(4);

/// A call from a peer, for this node's server.
pub struct Incoming {
    /// The node that sent it.
    pub from: u64,
    /// The request's bytes.
    pub request: Vec<u8>,
    /// Where the answer goes.
    pub answer: oneshot::Sender<Vec<u8>>,
}

/// Senders by shard.
type Senders<T> = Arc<Mutex<BTreeMap<u32, mpsc::UnboundedSender<T>>>>;

/// Who serves calls on each shard of this node. `Send` and `Sync`: the server registers on
/// each shard's thread, and each shard's transport hands its calls over.
#[derive(Clone, Debug, Default)]
pub struct Calls {
    servers: Senders<Incoming>,
    /// Who takes each shard's notices from peers ([`Calls::notices`]).
    noticed: Senders<(u64, Vec<u8>)>,
    /// Each shard's transport, for notices to peers ([`Calls::notify_peers`]).
    outgoing: Senders<Vec<u8>>,
    /// The shard whose calls this handle takes ([`Calls::on_shard`]).
    shard: u32,
}

impl Calls {
    /// Serves shard `shard`'s calls: they arrive on the returned receiver (in place of any
    /// registered before).
    pub fn serve(&self, shard: u32) -> mpsc::UnboundedReceiver<Incoming> {
        let (tx, rx) = mpsc::unbounded();
        self.servers.lock().expect("calls").insert(shard, tx);
        rx
    }

    /// This handle, for the transport of shard `shard`.
    pub(crate) fn on_shard(&self, shard: u32) -> Calls {
        Calls {
            servers: self.servers.clone(),
            noticed: self.noticed.clone(),
            outgoing: self.outgoing.clone(),
            shard,
        }
    }

    /// Takes shard `shard`'s notices from peers' servers: (from node, bytes), in place of
    /// whoever took them before.
    pub fn notices(&self, shard: u32) -> mpsc::UnboundedReceiver<(u64, Vec<u8>)> {
        let (tx, rx) = mpsc::unbounded();
        self.noticed.lock().expect("calls").insert(shard, tx);
        rx
    }

    /// Sends `notice` to the server of every peer this node knows, on the connections of
    /// shard `shard` (which the same shard of each peer takes): one way, best effort
    /// ([`crate::Transport::notify`]). Nothing is sent where no transport runs (a single
    /// node).
    pub fn notify_peers(&self, shard: u32, notice: Vec<u8>) {
        if let Some(tx) = self.outgoing.lock().expect("calls").get(&shard) {
            let _ = tx.unbounded_send(notice);
        }
    }

    /// A peer's notice, for this shard's server (dropped if nobody takes them).
    pub(crate) fn give_notice(&self, from: u64, notice: Vec<u8>) {
        if let Some(tx) = self.noticed.lock().expect("calls").get(&self.shard) {
            let _ = tx.unbounded_send((from, notice));
        }
    }

    /// What [`Calls::notify_peers`] asks of this shard's transport.
    pub(crate) fn outgoing(&self) -> mpsc::UnboundedReceiver<Vec<u8>> {
        let (tx, rx) = mpsc::unbounded();
        self.outgoing.lock().expect("calls").insert(self.shard, tx);
        rx
    }

    /// Hands a call to this shard's server and waits for its answer; `None` if nobody
    /// serves calls here, or the server dropped it.
    pub(crate) async fn take(&self, from: u64, request: Vec<u8>) -> Option<Vec<u8>> {
        let server = self
            .servers
            .lock()
            .expect("calls")
            .get(&self.shard)
            .cloned()?;
        let (answer, answered) = oneshot::channel();
        server
            .unbounded_send(Incoming {
                from,
                request,
                answer,
            })
            .ok()?;
        answered.await.ok()
    }
}

/// Calls `peer`'s server on shard `shard` from this node of `cluster` (whose addresses are
/// the nodes' cluster addresses, as `--cluster` gives them), and returns its answer. A peer
/// the fault layer cut this node off from cannot be called.
pub async fn call(
    cluster: &Membership,
    cuts: &Cuts,
    peer: u64,
    shard: u32,
    request: &[u8],
) -> std::io::Result<Vec<u8>> {
    let me = cluster.me;
    let addr = match cluster.nodes.get(&peer) {
        Some(addr) if peer != me && !cuts.contains(peer) => shard_addr(*addr, shard),
        _ => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                format!("node {peer} cannot be called"),
            ))
        }
    };
    let call = Frame::Call(request.to_vec());
    let asker = Asker {
        addr,
        me,
        fingerprint: cluster.fingerprint(),
    };
    match ask(asker, &call, CALL_TIMEOUT).await? {
        Frame::Answer(answer) => Ok(answer),
        _ => Err(std::io::Error::other("an answer that is no ANSWER")),
    }
}
