//! The engine's blob store on a cluster node: message bodies over 64 KiB, and the event
//! frames that carry them, live beside a partition's log rather than in it (see
//! `chorus_engine::blob`), so Raft does not carry them. This store carries them instead.
//!
//! - **Put.** [`ReplicatedBlobs`] stores a blob on this node's disk, then sends it to every
//!   peer at once (`BLOB_PIECE`s, answered by `BLOB_DONE`, on connections of their own),
//!   and returns once a majority of the cluster's nodes, this one included, have it
//!   durably. The peers still sending go on in the background. A partition stores a body
//!   before it commits the event that names it, so an ack means the body is on a majority
//!   too, and the loss of any minority of nodes keeps a copy.
//! - **Get.** A blob this node does not hold, or holds damaged, is asked of each peer in
//!   turn (`BLOB_GET`); the first copy whose bytes match the reference is returned and
//!   kept here for the next read. This serves a node that was down when the blob was
//!   stored, one whose disk was replaced, and a follower that applies an event before the
//!   blob's background copy reaches it.
//!
//! Architecture invariant: an event that names a blob is proposed only after the blob is
//! durable on a majority of the nodes. A peer stores a blob only after checking its bytes
//! against its BLAKE3 hash, so a blob on any node is the one its reference names.
//!
//! A node whose blob store is shared by every node (an S3 bucket) sends nothing:
//! [`crate::NodeConfig::replicate_blobs`] is off.

use crate::node::Node;
use crate::transport::{within, Asker, BlobServer, Exchange};
use crate::wire::{self, BlobJoiner, BlobStatus, Frame};
use bytes::Bytes;
use chorus_engine::blob::{BlobError, BlobRef, BlobStore};
use futures::future::LocalBoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use std::cell::OnceCell;
use std::io;
use std::rc::Rc;
use std::time::Duration;

/// How long sending or fetching a blob may take: a base, plus a second per 8 MiB.
fn blob_timeout(len: u64) -> Duration {
    Duration::from_secs(5) + Duration::from_secs(len >> 23)
}

/// A shard's blob store on a cluster node: the local store `B`, copied to a majority of
/// the nodes on every put and read from peers when this node lacks a blob.
#[derive(Clone)]
pub struct ReplicatedBlobs<B> {
    local: B,
    /// The shard's node, once its first group opened (it owns the transport).
    node: Rc<OnceCell<Rc<Node>>>,
    replicate: bool,
}

impl<B: BlobStore + Clone + 'static> ReplicatedBlobs<B> {
    /// The store over `local`, copying through the transport of the node `node` will hold;
    /// when `replicate` is off (a store every node shares), just `local`.
    pub fn new(local: B, node: Rc<OnceCell<Rc<Node>>>, replicate: bool) -> ReplicatedBlobs<B> {
        ReplicatedBlobs {
            local,
            node,
            replicate,
        }
    }

    /// What serves peers' blob exchanges from this node's own store.
    pub fn server(&self) -> Rc<dyn BlobServer> {
        Rc::new(LocalServer(self.local.clone()))
    }

    /// The shard's node, if copies go through it.
    fn node(&self) -> Option<&Rc<Node>> {
        self.node.get().filter(|_| self.replicate)
    }
}

impl<B: BlobStore + Clone + 'static> BlobStore for ReplicatedBlobs<B> {
    async fn put(&self, bytes: Bytes) -> io::Result<BlobRef> {
        let blob = self.local.put(bytes.clone()).await?;
        if !self.replicate {
            return Ok(blob);
        }
        let transport = self
            .node()
            .ok_or_else(|| io::Error::other("this shard's cluster transport has not started"))?
            .transport()
            .clone();
        let peers: Vec<u64> = transport.peers().into_keys().collect();
        let sends = peers.into_iter().map(|peer| {
            let (asker, bytes) = (transport.asker(peer), bytes.clone());
            async move {
                let sent = match asker {
                    Ok(asker) => put_to(asker, blob, &bytes).await,
                    Err(e) => Err(e),
                };
                (peer, sent)
            }
        });
        on_majority(sends)
            .await
            .map(|()| blob)
            .map_err(|e| majority_error(format!("blob {}", blob.to_hex()), e))
    }

    async fn get(&self, blob: BlobRef) -> Result<Bytes, BlobError> {
        let missing = match self.local.get(blob).await {
            Ok(bytes) => return Ok(bytes),
            Err(e @ (BlobError::NotFound(_) | BlobError::Corrupt { .. })) => e,
            Err(e) => return Err(e),
        };
        let Some(node) = self.node() else {
            return Err(missing);
        };
        let transport = node.transport().clone();
        for peer in transport.peers().into_keys() {
            let Ok(asker) = transport.asker(peer) else {
                continue;
            };
            let Ok(Some(bytes)) = get_from(asker, blob).await else {
                continue;
            };
            if BlobRef::of(&bytes) != blob {
                tracing::warn!(peer, blob = %blob.to_hex(), "a peer sent a blob that is not the one asked for");
                continue;
            }
            let bytes = Bytes::from(bytes);
            // Kept here, so that the next read is local; the read succeeds either way.
            if let Err(e) = self.local.put(bytes.clone()).await {
                tracing::warn!(error = %e, blob = %blob.to_hex(), "a blob fetched from a peer could not be kept");
            }
            return Ok(bytes);
        }
        Err(missing)
    }
}

/// How far copies to the peers got when they fell short of a majority.
#[derive(Debug)]
pub struct ShortOfMajority {
    /// The nodes that hold the copy, this one included.
    pub stored: usize,
    /// The cluster's nodes.
    pub nodes: usize,
    /// Why each peer that failed did.
    pub failures: Vec<String>,
}

/// Waits for copies to the peers (`(peer, outcome)` each) until a majority of the nodes,
/// this one and the peers, hold the copy; the copies still running go on in the
/// background (every node should hold every copy, but the caller waits for a majority
/// only). Shared by the engine's blobs here and the gateway's files.
pub async fn on_majority<F>(sends: impl IntoIterator<Item = F>) -> Result<(), ShortOfMajority>
where
    F: std::future::Future<Output = (u64, io::Result<()>)> + 'static,
{
    let mut sends: FuturesUnordered<F> = sends.into_iter().collect();
    let nodes = sends.len() + 1;
    let majority = nodes / 2 + 1;
    let mut stored = 1;
    let mut failures = Vec::new();
    while stored < majority {
        match sends.next().await {
            Some((_, Ok(()))) => stored += 1,
            Some((peer, Err(e))) => failures.push(format!("node {peer}: {e}")),
            None => break,
        }
    }
    if !sends.is_empty() {
        glommio::spawn_local(async move { while sends.next().await.is_some() {} }).detach();
    }
    if stored >= majority {
        return Ok(());
    }
    Err(ShortOfMajority {
        stored,
        nodes,
        failures,
    })
}

/// The `NotConnected` error of `what`'s copies falling short of a majority (the engine
/// and the gateway refuse the write as unavailable, for a retry).
pub fn majority_error(what: String, short: ShortOfMajority) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        format!(
            "{what} is on {} of {} nodes, short of a majority ({})",
            short.stored,
            short.nodes,
            short.failures.join("; ")
        ),
    )
}

/// Sends `bytes`, the blob `blob` names, to the peer; `Ok` once the peer says it stored
/// them durably.
async fn put_to(asker: Asker, blob: BlobRef, bytes: &[u8]) -> io::Result<()> {
    within(blob_timeout(blob.len), async {
        let mut x = Exchange::open(asker).await?;
        for piece in wire::blob_pieces(&blob.hash, bytes) {
            x.write(&piece.map_err(io::Error::other)?).await?;
        }
        let answer = x.next().await?;
        x.finish().await;
        match answer {
            Frame::BlobDone {
                hash,
                status: BlobStatus::Stored,
            } if hash == blob.hash => Ok(()),
            Frame::BlobDone { status, .. } => {
                Err(io::Error::other(format!("the peer answered {status:?}")))
            }
            _ => Err(io::Error::other("an answer that is no BLOB_DONE")),
        }
    })
    .await
}

/// The blob `blob` names as the peer holds it; `None` if it does not. The bytes are not
/// checked here.
async fn get_from(asker: Asker, blob: BlobRef) -> io::Result<Option<Vec<u8>>> {
    within(blob_timeout(blob.len), async {
        let mut x = Exchange::open(asker).await?;
        let mut request = Vec::new();
        let get = Frame::BlobGet {
            hash: blob.hash,
            len: blob.len,
        };
        wire::encode(&get, &mut request).map_err(io::Error::other)?;
        x.write(&request).await?;
        let mut joiner = BlobJoiner::default();
        let found = loop {
            match x.next().await? {
                Frame::BlobPiece {
                    hash,
                    len,
                    offset,
                    bytes,
                } if hash == blob.hash && len == blob.len => {
                    let joined = joiner
                        .push(hash, len, offset, &bytes)
                        .map_err(io::Error::other)?;
                    if let Some((_, whole)) = joined {
                        break Some(whole);
                    }
                }
                Frame::BlobDone {
                    hash,
                    status: BlobStatus::Missing,
                } if hash == blob.hash => break None,
                _ => return Err(io::Error::other("an answer that is not the blob asked for")),
            }
        };
        x.finish().await;
        Ok(found)
    })
    .await
}

/// Serves peers' blob exchanges from this node's own store.
struct LocalServer<B>(B);

impl<B: BlobStore + Clone + 'static> BlobServer for LocalServer<B> {
    fn put(&self, hash: [u8; 32], bytes: Vec<u8>) -> LocalBoxFuture<'static, bool> {
        let store = self.0.clone();
        Box::pin(async move {
            let blob = BlobRef::of(&bytes);
            if blob.hash != hash {
                tracing::warn!("a peer sent a blob whose bytes are not its hash's; refused");
                return false;
            }
            match store.put(Bytes::from(bytes)).await {
                Ok(_) => true,
                Err(e) => {
                    tracing::warn!(error = %e, blob = %blob.to_hex(), "a peer's blob could not be stored");
                    false
                }
            }
        })
    }

    fn get(&self, hash: [u8; 32], len: u64) -> LocalBoxFuture<'static, Option<Bytes>> {
        let store = self.0.clone();
        Box::pin(async move { store.get(BlobRef { hash, len }).await.ok() })
    }
}
