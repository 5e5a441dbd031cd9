//! The engine in a cluster: an [`Env`] whose channel partitions commit through their
//! Raft groups ([`ReplicatedDurability`]) instead of the local log alone.
//!
//! Each engine shard runs a [`Node`] of its own: the groups of the partitions that shard
//! owns (group id = partition id), one transport for them. Shard `s` of a node listens on
//! its cluster address's port plus `s`, and talks to the same shard of every other node
//! (every node runs the same number of shards and partitions, so a partition lives on the
//! same shard everywhere). A partition's group is opened when the engine opens the
//! partition, over the partition's own log as its [`crate::EventLogMachine`]: every
//! replica's partition log holds the same committed events at the same offsets, the
//! leader's partition decides them, and every other replica's partition applies them as
//! its log grows (`chorus_engine::durability`).
//!
//! The directory (the metadata partition, on shard 0) is group number `partitions`, and
//! commits the same way.

use crate::blobs::ReplicatedBlobs;
use crate::event_log::ReplicatedLog;
use crate::node::{Node, NodeConfig};
use crate::replica::ProposeError;
use crate::transport::Membership;
use chorus_engine::blob::BlobStore;
use chorus_engine::durability::{CommitError, Durability, Leading};
use chorus_engine::env::{DirOf, Env, GlommioEnv};
use chorus_engine::{EngineError, IoError};
use chorus_log::{Entry, Log, ReadError, Record, Storage, StorageRoot, TruncateError};
use futures::future::LocalBoxFuture;
use raft::StateRole;
use std::cell::OnceCell;
use std::future::Future;
use std::net::SocketAddr;
use std::ops::Range;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// The cluster address shard `shard` of a node listens on: the node's address with the
/// shard added to its port.
pub fn shard_addr(node: SocketAddr, shard: u32) -> SocketAddr {
    SocketAddr::new(node.ip(), node.port() + shard as u16)
}

/// Free loopback cluster addresses for `nodes` nodes of `shards` shards each: each
/// address's next `shards - 1` ports are free too (at the moment of asking). For tests and
/// local clusters.
///
/// The ports lie below the kernel's ephemeral range, so that while a node is down its
/// port is not handed to another socket's outgoing connection (nor to a peer's redial,
/// which would then connect to itself), and the node can bind it again when it restarts.
pub fn free_loopback_addrs(nodes: usize, shards: u16) -> Vec<SocketAddr> {
    const LOWEST: u16 = 10_000;
    let below = ephemeral_ports_start()
        .saturating_sub(shards)
        .max(LOWEST + 1);
    let span = u32::from(below - LOWEST);
    let mut next = LOWEST as u32 + scatter() % span;
    let (mut out, mut held) = (Vec::new(), Vec::new());
    let ip = std::net::Ipv4Addr::LOCALHOST;
    for _ in 0..span {
        if out.len() == nodes {
            break;
        }
        let first = next as u16;
        next = LOWEST as u32 + (next + u32::from(shards) - LOWEST as u32) % span;
        let ports: Option<Vec<std::net::TcpListener>> = (0..shards)
            .map(|s| std::net::TcpListener::bind((ip, first + s)).ok())
            .collect();
        if let Some(ports) = ports {
            out.push(SocketAddr::from((ip, first)));
            held.extend(ports);
        }
    }
    assert_eq!(
        out.len(),
        nodes,
        "no {nodes} free runs of {shards} loopback ports"
    );
    out
}

/// Where the kernel's ephemeral (outgoing) ports begin: Linux's setting, or IANA's start.
fn ephemeral_ports_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(49_152)
}

/// A number that differs between processes and calls, to start the port search from a
/// different place each time (tests run side by side).
fn scatter() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish() as u32
}

/// A shard's environment in a cluster: the real one ([`GlommioEnv`]), with the shard's
/// [`Node`] for its partitions' groups, and its blob store copied to the other nodes
/// ([`ReplicatedBlobs`]).
#[derive(Clone)]
pub struct ClusterEnv<R: StorageRoot, B> {
    inner: GlommioEnv<R, B>,
    blobs: ReplicatedBlobs<B>,
    /// The shard's node config (its addresses the shard's).
    config: Rc<NodeConfig>,
    /// Started with the first group, on the shard's executor.
    node: Rc<OnceCell<Rc<Node>>>,
}

impl<R: StorageRoot + 'static, B: BlobStore + Clone + 'static> ClusterEnv<R, B> {
    /// Shard `shard`'s environment in a cluster of `config.membership` (whose addresses
    /// are the nodes', not the shards'). The shard binds its cluster address and starts
    /// its transport when the engine opens its first partition.
    pub fn new(inner: GlommioEnv<R, B>, config: &NodeConfig, shard: u32) -> ClusterEnv<R, B> {
        let mut config = config.clone();
        config.calls = config.calls.on_shard(shard);
        config.shard = shard;
        config.membership = Membership {
            me: config.membership.me,
            cluster: Some(config.membership.fingerprint()),
            nodes: config
                .membership
                .nodes
                .iter()
                .map(|(id, addr)| (*id, shard_addr(*addr, shard)))
                .collect(),
        };
        let node = Rc::<OnceCell<Rc<Node>>>::default();
        let blobs =
            ReplicatedBlobs::new(inner.blobs().clone(), node.clone(), config.replicate_blobs);
        ClusterEnv {
            inner,
            blobs,
            config: Rc::new(config),
            node,
        }
    }

    /// The shard's groups, once its first partition opened.
    pub fn node(&self) -> Option<&Rc<Node>> {
        self.node.get()
    }

    /// The shard's node, started on first use.
    fn started(&self) -> std::io::Result<&Rc<Node>> {
        if let Some(node) = self.node.get() {
            return Ok(node);
        }
        let me = self.config.membership.me;
        let addr = *self.config.membership.nodes.get(&me).ok_or_else(|| {
            std::io::Error::other(format!("node {me} is not one of the cluster's nodes"))
        })?;
        // Bound here, not by glommio: glommio binds with SO_REUSEPORT, which would let
        // this shard share a port that something else already listens on (another node's
        // shard, say). The standard library's listener has SO_REUSEADDR alone: it refuses
        // a port another socket listens on, and takes one whose only holders are its
        // predecessor's closed connections (TIME_WAIT after a kill or a restart).
        let bound = std::net::TcpListener::bind(addr)?;
        // SAFETY: the descriptor is a bound, listening TCP socket that nothing else owns
        // (`into_raw_fd` gave up the standard library's ownership of it).
        let listener = unsafe {
            use std::os::fd::{FromRawFd, IntoRawFd};
            glommio::net::TcpListener::from_raw_fd(bound.into_raw_fd())
        };
        Ok(self.node.get_or_init(|| {
            let node = Node::listen((*self.config).clone(), listener);
            // Before any await: a peer may send a blob as soon as the node listens.
            node.transport().serve_blobs(self.blobs.server());
            Rc::new(node)
        }))
    }
}

impl<R, B> Env for ClusterEnv<R, B>
where
    R: StorageRoot + 'static,
    B: BlobStore + Clone + 'static,
{
    type Root = R;
    type Blobs = ReplicatedBlobs<B>;
    type Task = <GlommioEnv<R, B> as Env>::Task;
    type Durability = ReplicatedDurability<R::Dir>;

    fn root(&self) -> &R {
        self.inner.root()
    }

    fn blobs(&self) -> &ReplicatedBlobs<B> {
        &self.blobs
    }

    fn now(&self) -> Instant {
        self.inner.now()
    }

    fn unix_us(&self) -> u64 {
        self.inner.unix_us()
    }

    fn sleep(&self, duration: Duration) -> impl Future<Output = ()> + 'static {
        self.inner.sleep(duration)
    }

    fn spawn(&self, task: impl Future<Output = ()> + 'static) -> Self::Task {
        self.inner.spawn(task)
    }

    fn spawn_blocking<T, F>(&self, work: F) -> impl Future<Output = T> + 'static
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        self.inner.spawn_blocking(work)
    }

    fn yield_if_needed(&self) -> impl Future<Output = ()> + 'static {
        self.inner.yield_if_needed()
    }

    fn logs_sync_every_append(&self) -> bool {
        // The event logs are appended unsynced; the shard's journal holds their entries.
        false
    }

    async fn durability(
        &self,
        partition: u32,
        log: Log<DirOf<Self>>,
    ) -> Result<ReplicatedDurability<R::Dir>, EngineError> {
        let node = self.started().map_err(|e| {
            EngineError::Io(IoError::new(
                format!("partition {partition}'s cluster address"),
                e,
            ))
        })?;
        let mut made = None;
        node.open_group(self.root(), u64::from(partition), |replica| {
            let (log, machine) = ReplicatedLog::new(replica.clone(), log);
            made = Some(log);
            machine
        })
        .await
        .map_err(|e| {
            EngineError::Io(IoError::new(
                format!("partition {partition}'s group"),
                std::io::Error::other(e.to_string()),
            ))
        })?;
        let node = node.clone();
        let group = u64::from(partition);
        Ok(ReplicatedDurability::new(
            made.expect("the group made its machine"),
            Box::new(move || {
                // The engine closes on a clean stop: the leadership moves first, so writes
                // wait for a hand-off, not an election.
                Box::pin(async move {
                    node.close_group(group, true)
                        .await
                        .map_err(|e| std::io::Error::other(e.to_string()))
                })
            }),
        ))
    }
}

/// Stops a partition's group when the engine closes the partition (the node's
/// `Node::close_group` on a server).
pub type CloseGroup = Box<dyn FnOnce() -> LocalBoxFuture<'static, std::io::Result<()>>>;

/// A partition's commit path in a cluster: a batch is committed once a majority of the
/// partition's group holds it, and the partition's log holds committed events only.
pub struct ReplicatedDurability<S: Storage> {
    log: ReplicatedLog<S>,
    close: CloseGroup,
}

impl<S: Storage> ReplicatedDurability<S> {
    /// The commit path through `log`'s group; `close` stops the group (its log closes
    /// with it).
    pub fn new(log: ReplicatedLog<S>, close: CloseGroup) -> ReplicatedDurability<S> {
        ReplicatedDurability { log, close }
    }
}

impl<S: Storage + 'static> Durability for ReplicatedDurability<S> {
    async fn commit(&self, batch: &[Entry<'_>]) -> Result<Range<u64>, CommitError> {
        self.log.commit(batch).await.map_err(|e| match e {
            ProposeError::NotLeader { leader } => CommitError::NotLeader { leader },
            ProposeError::Dropped => CommitError::Lost { may_commit: false },
            ProposeError::Uncertain => CommitError::Lost { may_commit: true },
        })
    }

    async fn grown(&self, end: u64) {
        self.log.grown(end).await
    }

    fn leading(&self) -> Leading {
        let status = self.log.replica().status();
        if status.current {
            Leading::Yes
        } else {
            Leading::No {
                leader: (status.leader != 0 && status.role != StateRole::Leader)
                    .then_some(status.leader),
            }
        }
    }

    async fn read_barrier(&self) -> Result<(), CommitError> {
        // The group's read index: once it is applied here, so is every event committed
        // before the call, and the event log holds them.
        self.log
            .replica()
            .read_index()
            .await
            .map(drop)
            .map_err(|e| match e {
                ProposeError::NotLeader { leader } => CommitError::NotLeader { leader },
                ProposeError::Dropped | ProposeError::Uncertain => {
                    CommitError::NotLeader { leader: None }
                }
            })
    }

    fn follows(&self) -> bool {
        true
    }

    fn sync(&self) -> impl Future<Output = std::io::Result<()>> + 'static {
        let log = self.log.log_rc();
        async move { log.sync().await.map_err(std::io::Error::other) }
    }

    async fn read(&self, from: u64, max_bytes: usize) -> Result<Vec<Record>, ReadError> {
        let end = self.log.end();
        let mut records = self.log.log().read(from, max_bytes).await?;
        // Only what the group applied: the log may be part-way through an append.
        records.retain(|r| r.offset < end);
        Ok(records)
    }

    fn next_offset(&self) -> u64 {
        self.log.end()
    }

    fn first_offset(&self) -> u64 {
        self.log.log().first_offset()
    }

    async fn delete_before(&self, offset: u64) -> Result<u64, TruncateError> {
        self.log
            .log()
            .delete_before(offset.min(self.log.end()))
            .await
    }

    async fn close(self) -> std::io::Result<()> {
        // The log is the group's too: it closes with the group (and the shard's
        // transport with its last group).
        (self.close)().await
    }
}
