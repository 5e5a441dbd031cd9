//! Uploaded files' bytes between the nodes of a cluster whose file store is each node's
//! own disk (`API.md` §15: every node serves the whole API).
//!
//! - **After an upload** the node that took it sends the bytes to every other node at once
//!   and answers the client only once a majority of the nodes (itself included) hold them
//!   durably ([`copy_to_majority`]); the copies still running go on in the background. So
//!   a file's record, committed after, never names bytes that the loss of a minority of
//!   nodes could take away.
//! - **A node that lacks bytes** it must serve or preview (it was down during the upload,
//!   or its disk was replaced) fetches them from a peer ([`ensure_local`]), checks them
//!   against their SHA-256, and keeps them.
//!
//! The bytes travel as calls between the nodes' servers (`chorus_replication::calls`, the
//! forwarded REST calls' path), one piece of at most [`PIECE_BYTES`] per call, so that no
//! frame is large and a file is never held whole in memory:
//! - `PUT`: `[MAGIC, 1]`, the SHA-256, the file's length and the piece's offset (u64 LE
//!   each), then the piece. The receiver appends it to an upload of its own, kept between
//!   calls per sender and SHA-256 (pieces come in order, one call after the other, on the
//!   same shard); after the last piece it checks the hash and publishes the bytes. Answer
//!   `[0]` (taken), or `[1]` (refused: out of order, a hash that does not match, a disk
//!   error).
//! - `GET`: `[MAGIC, 2]`, the SHA-256, the file's length and an offset. Answer `[0]` and
//!   at most [`PIECE_BYTES`] from the offset, or `[1]` if this node does not hold them.
//!
//! A request that begins with [`MAGIC`] is never JSON (a forwarded REST call begins with
//! `{`). Deleted files' bytes leave the other nodes' disks with their sweeps
//! (`super::sweep`).

use super::store::{self, FileStore, Pending, Sha256};
use crate::ctx::{off_shard, ShardCtx};
use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The first byte of a file call.
pub const MAGIC: u8 = 0xF1;
const PUT: u8 = 1;
const GET: u8 = 2;
/// Bytes of a file per call.
pub const PIECE_BYTES: usize = 4 << 20;
/// An upload from a peer that has not gone on for this long is dropped.
const RECEIVE_IDLE: Duration = Duration::from_secs(60);

/// Whether this node's file store needs copies on its peers: a cluster node on its own
/// disk (a bucket is every node's already).
pub fn copies(ctx: &ShardCtx) -> bool {
    ctx.shared.cluster.is_some() && !ctx.shared.files.store.is_remote()
}

/// Sends the stored bytes `sha` (`len` of them) to every peer, and returns once a majority
/// of the cluster's nodes, this one included, hold them; the rest go on in the background.
/// A `NotConnected` error if a majority could not be reached.
pub async fn copy_to_majority(ctx: &ShardCtx, sha: Sha256, len: u64) -> io::Result<()> {
    let Some(cluster) = &ctx.shared.cluster else {
        return Ok(());
    };
    let peers: Vec<u64> = cluster
        .nodes()
        .into_keys()
        .filter(|&n| n != cluster.me)
        .collect();
    let sends = peers.into_iter().map(|peer| {
        let (shared, shard) = (ctx.shared.clone(), ctx.shard);
        async move { (peer, put_to(&shared, shard, peer, sha, len).await) }
    });
    chorus_replication::blobs::on_majority(sends)
        .await
        .map_err(|e| {
            chorus_replication::blobs::majority_error(format!("file {}", store::hex(&sha)), e)
        })
}

/// Runs `work` on shard 0 of this node for a plain thread (a preview supervisor, the search
/// indexer), and waits for its outcome, at most `wait` (then `TimedOut`).
pub fn on_shard_zero<F, Fut>(
    shared: Arc<crate::ctx::Shared>,
    wait: Duration,
    work: F,
) -> io::Result<()>
where
    F: FnOnce(ShardCtx) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = io::Result<()>> + 'static,
{
    let (tx, rx) = std::sync::mpsc::channel();
    let engine = shared.engine.clone();
    futures::executor::block_on(engine.spawn_on(0, move || async move {
        let _ = tx.send(work(ShardCtx::new(shared, 0)).await);
    }))
    .map_err(io::Error::other)?;
    rx.recv_timeout(wait)
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "a peer did not answer in time"))?
}

/// [`ensure_local`] for a plain thread (a preview supervisor, the search indexer), on
/// shard 0, waiting at most `wait`.
pub fn ensure_local_waiting(
    shared: Arc<crate::ctx::Shared>,
    sha: Sha256,
    len: u64,
    wait: Duration,
) -> io::Result<()> {
    on_shard_zero(shared, wait, move |ctx| async move {
        ensure_local(&ctx, sha, len).await
    })
}

/// Makes sure this node holds the bytes `sha` (`len` of them): fetched from the first peer
/// that has them when it does not. An error if none does.
pub async fn ensure_local(ctx: &ShardCtx, sha: Sha256, len: u64) -> io::Result<()> {
    let store = ctx.shared.files.store.clone();
    let path = store.path_of(&sha);
    let held = off_shard(move || std::fs::metadata(path).is_ok_and(|m| m.len() == len)).await;
    if held || !copies(ctx) {
        return Ok(());
    }
    let cluster = ctx
        .shared
        .cluster
        .as_ref()
        .expect("copies are in a cluster");
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no peer holds the file");
    for peer in cluster.nodes().into_keys().filter(|&n| n != cluster.me) {
        match fetch_from(ctx, peer, sha, len).await {
            Ok(()) => return Ok(()),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Sends the bytes to one peer, a piece per call.
async fn put_to(
    shared: &crate::ctx::Shared,
    shard: u32,
    peer: u64,
    sha: Sha256,
    len: u64,
) -> io::Result<()> {
    let store = shared.files.store.clone();
    let reader = store.clone();
    let source = off_shard(move || reader.open_bytes(&sha, len)).await?;
    let source = Arc::new(source);
    let mut offset = 0;
    loop {
        let n = (len - offset).min(PIECE_BYTES as u64) as usize;
        let (store, source) = (store.clone(), source.clone());
        let piece = off_shard(move || store.read_at(&source, offset, n)).await?;
        let mut request = Vec::with_capacity(2 + 48 + piece.len());
        request.extend_from_slice(&[MAGIC, PUT]);
        request.extend_from_slice(&sha);
        request.extend_from_slice(&len.to_le_bytes());
        request.extend_from_slice(&offset.to_le_bytes());
        request.extend_from_slice(&piece);
        match shared.call_peer(shard, peer, &request).await?.first() {
            Some(0) => {}
            _ => return Err(io::Error::other("the peer refused a piece")),
        }
        offset += n as u64;
        if offset >= len {
            return Ok(());
        }
    }
}

/// Fetches the bytes from one peer, a piece per call, checks them and publishes them here.
async fn fetch_from(ctx: &ShardCtx, peer: u64, sha: Sha256, len: u64) -> io::Result<()> {
    let store = ctx.shared.files.store.clone();
    let begun = store.clone();
    let mut pending = off_shard(move || begun.begin()).await?;
    let mut offset = 0;
    while offset < len {
        let mut request = Vec::with_capacity(2 + 48);
        request.extend_from_slice(&[MAGIC, GET]);
        request.extend_from_slice(&sha);
        request.extend_from_slice(&len.to_le_bytes());
        request.extend_from_slice(&offset.to_le_bytes());
        let answer = ctx.shared.call_peer(ctx.shard, peer, &request).await?;
        let piece = match answer.split_first() {
            Some((0, piece)) if !piece.is_empty() || len == 0 => piece.to_vec(),
            _ => return Err(io::Error::new(io::ErrorKind::NotFound, "the peer lacks it")),
        };
        offset += piece.len() as u64;
        pending = off_shard(move || {
            pending.append(&piece)?;
            io::Result::Ok(pending)
        })
        .await?;
    }
    publish_checked(store, pending, sha, len).await
}

/// Finishes an upload of bytes from a peer: published if they are `len` bytes whose
/// SHA-256 is `sha`.
async fn publish_checked(
    store: Arc<FileStore>,
    pending: Pending,
    sha: Sha256,
    len: u64,
) -> io::Result<()> {
    // Pinned, so that a sweep of the store (`super::sweep`) cannot remove the bytes
    // between this publication and its own look at their age.
    let _pin = super::pin_upload(&store, sha).await;
    off_shard(move || {
        let done = pending.finish()?;
        if done.sha != sha || done.len != len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a peer's bytes are not the file's",
            ));
        }
        store.publish(done)
    })
    .await
}

/// Uploads from peers in progress on this shard: by sender and SHA-256, the upload, the
/// offset it has reached, and when it last took a piece.
type Receiving = HashMap<(u64, Sha256), (Pending, u64, Instant)>;

thread_local! {
    static RECEIVING: RefCell<Receiving> = RefCell::new(HashMap::new());
}

/// Answers a peer's file call (a request that begins with [`MAGIC`]).
pub async fn answer(ctx: &ShardCtx, from: u64, request: &[u8]) -> Vec<u8> {
    let refused = vec![1u8];
    let Some((&kind, rest)) = request.get(1..).and_then(|r| r.split_first()) else {
        return refused;
    };
    if rest.len() < 48 {
        return refused;
    }
    let sha: Sha256 = rest[..32].try_into().expect("32 bytes");
    let len = u64::from_le_bytes(rest[32..40].try_into().expect("8 bytes"));
    let offset = u64::from_le_bytes(rest[40..48].try_into().expect("8 bytes"));
    let body = &rest[48..];
    let store = ctx.shared.files.store.clone();
    match kind {
        PUT => match take_piece(store, from, sha, len, offset, body).await {
            Ok(()) => vec![0],
            Err(e) => {
                tracing::warn!(from, error = %e, file = %store::hex(&sha), "a peer's file piece was refused");
                refused
            }
        },
        GET if offset < len || (offset == 0 && len == 0) => {
            let n = (len - offset).min(PIECE_BYTES as u64) as usize;
            let read = off_shard(move || {
                let source = store.open_bytes(&sha, len)?;
                store.read_at(&source, offset, n)
            })
            .await;
            match read {
                Ok(piece) => {
                    let mut answer = Vec::with_capacity(1 + piece.len());
                    answer.push(0);
                    answer.extend_from_slice(&piece);
                    answer
                }
                Err(_) => refused,
            }
        }
        _ => refused,
    }
}

/// Takes one piece of a peer's upload; the last one publishes the bytes.
async fn take_piece(
    store: Arc<FileStore>,
    from: u64,
    sha: Sha256,
    len: u64,
    offset: u64,
    body: &[u8],
) -> io::Result<()> {
    let key = (from, sha);
    let now = Instant::now();
    let taken = RECEIVING.with(|r| {
        let mut r = r.borrow_mut();
        r.retain(|_, (_, _, at)| now.duration_since(*at) < RECEIVE_IDLE);
        r.remove(&key)
    });
    let (mut pending, at) = match taken {
        _ if offset == 0 => {
            let begun = store.clone();
            (off_shard(move || begun.begin()).await?, 0)
        }
        Some((pending, at, _)) => (pending, at),
        None => return Err(io::Error::other("a piece of an upload never begun")),
    };
    let end = offset + body.len() as u64;
    if at != offset || end > len || (body.is_empty() && len > 0) {
        return Err(io::Error::other("a piece out of order"));
    }
    let piece = body.to_vec();
    pending = off_shard(move || {
        pending.append(&piece)?;
        io::Result::Ok(pending)
    })
    .await?;
    if end < len {
        RECEIVING.with(|r| r.borrow_mut().insert(key, (pending, end, now)));
        return Ok(());
    }
    publish_checked(store, pending, sha, len).await
}
