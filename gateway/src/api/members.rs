//! Changing a cluster's members: `PUT /api/v1/cluster/members` (an operator's call, not a
//! client's; `tools/cluster add` and `remove` make it).
//!
//! The body names every node the cluster is to be placed on, with its address between
//! nodes: `{"key": "…", "nodes": {"1": "HOST:PORT", …}}`. A node added is one started with
//! `--join` (its groups wait to be added); a node left out is removed from every group,
//! after which it may be stopped.
//!
//! **Agreed through the directory.** The ask is a metadata command
//! ([`chorus_engine::Engine::ask_cluster`]): the directory's leader numbers it, one more
//! than the last, and it commits on a majority like any other; a node that does not lead
//! the directory forwards the call there. Every node, whichever took the call, then reads
//! the asks from its own replica of the directory, in the one order they committed in
//! ([`follow`], every [`FOLLOW_EVERY`]), and applies each newer than the one it has:
//! 1. it writes it to `cluster-members.json` in its data directory (temporary file, fsync,
//!    rename, directory fsync), so that after a restart it knows the nodes' addresses
//!    before its directory has caught up, and never goes back to an older ask;
//! 2. it hands it to its shards ([`chorus_replication::members::Members`]): the transports
//!    learn the addresses they lack, and every group this node leads, now or later, walks
//!    to placement over the nodes named, one configuration change at a time
//!    ([`chorus_replication::membership`]).
//!
//! Two operators asking at once are two asks in one order, and every node ends on the
//! later; a node that was down when the call was made applies it when its directory
//! catches up.
//!
//! **A node removed while it could not hear** (down, or cut off, while the call was made
//! and its groups were walked off it) never sees the ask in its own directory: the
//! directory's group no longer sends to it. So a node that counts itself a member also
//! asks its peers, every [`ASK_PEERS_EVERY`], which ask they applied ([`ASK_MAGIC`]); when
//! on [`REMOVED_AFTER`] checks in a row a peer has applied a newer ask that leaves it out,
//! and its own directory still does not show one, it keeps that ask as its own and stops
//! (exit 1, saying so): serving on would serve the past, and a restart then refuses to
//! start on the same data. A peer's answer is an ask committed in the directory, and
//! peers are of this cluster (its connections check the cluster's id), so the node takes
//! it as it would take its directory's.
//!
//! Every node of a cluster has the same shape (the same `partitions` and shard count: a
//! partition is the same group, on the same shard, on every node). The shape is part of
//! the cluster's id ([`cluster_id`]), which every node-to-node connection checks: a node
//! of another shape cannot talk to the others, so it never holds a group, whatever is
//! asked. Before asking, the node that takes the call reaches every node named that is not
//! a member yet (`"check": true`, nothing kept); one it cannot reach (not started, or
//! started with another secret or shape) makes the call 409, naming it, with nothing
//! asked. Members named may be down (a node is removed while another is down).
//!
//! The answer is 200 `{"ask": N}` once the ask is committed; `GET /api/v1/cluster` shows
//! on each node the number it applied (`members_ask`) and where each partition is. The
//! key must match `cluster_admin_key_file` (every node the same file); without that file
//! the call is 403 on every node. A change of members is slow on purpose (a learner
//! catches up before it votes).

use super::forward::{send_via, Forwarded};
use super::{Call, Reply};
use crate::error::ApiError;
use chorus_engine::domain::event::ClusterNode;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// The file a node keeps the members last asked for in.
const FILE: &str = "cluster-members.json";

/// The cluster's id, from the secret every node shares and the shape every node has: what
/// node-to-node connections check. A node of another cluster has another secret; a node
/// started with another shape cannot hold the same groups, and cannot connect either, so
/// an ask that names it never gives it a group. A digest, so the secret does not travel.
pub fn cluster_id(secret: &[u8], shape: Shape) -> u64 {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"chorus cluster id\0");
    ctx.update(&u64::from(shape.partitions).to_le_bytes());
    ctx.update(&(shape.shards as u64).to_le_bytes());
    ctx.update(secret);
    let digest = ctx.finish();
    u64::from_le_bytes(digest.as_ref()[..8].try_into().expect("8 bytes"))
}

#[derive(Deserialize)]
struct Request {
    key: String,
    nodes: BTreeMap<String, String>,
    /// Only answer (the node that takes the call reaches the nodes to add); keep nothing.
    #[serde(default)]
    check: bool,
}

/// What every node of a cluster must share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    partitions: u32,
    shards: usize,
}

impl Shape {
    /// This node's shape.
    pub fn of(config: &crate::config::Config) -> Shape {
        Shape {
            partitions: config.partitions,
            shards: config.shard_count(),
        }
    }
}

/// What `cluster-members.json` holds: the ask applied last, and its nodes.
#[derive(Serialize, Deserialize)]
struct Kept {
    ask: u64,
    nodes: BTreeMap<String, String>,
}

/// The members ask last applied, as `data_dir` keeps it (its number and nodes); `None` if
/// none was. A file of the build before asks were numbered (the nodes alone) is ask 0.
pub fn load(data_dir: &Path) -> std::io::Result<Option<(u64, BTreeMap<u64, SocketAddr>)>> {
    let text = match std::fs::read_to_string(data_dir.join(FILE)) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let kept = serde_json::from_str::<Kept>(&text)
        .or_else(|_| serde_json::from_str(&text).map(|nodes| Kept { ask: 0, nodes }));
    let kept = kept.map_err(|e| std::io::Error::other(format!("{FILE} does not parse: {e}")))?;
    parse_nodes(&kept.nodes)
        .map(|nodes| Some((kept.ask, nodes)))
        .map_err(|e| std::io::Error::other(format!("{FILE}: {}", e.message)))
}

impl Kept {
    fn of(ask: u64, nodes: &BTreeMap<u64, SocketAddr>) -> Kept {
        Kept {
            ask,
            nodes: nodes
                .iter()
                .map(|(id, addr)| (id.to_string(), addr.to_string()))
                .collect(),
        }
    }
}

fn save(data_dir: &Path, ask: u64, nodes: &BTreeMap<u64, SocketAddr>) -> std::io::Result<()> {
    use std::io::Write;
    let kept = Kept::of(ask, nodes);
    std::fs::create_dir_all(data_dir)?;
    let tmp = data_dir.join(format!("{FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(serde_json::to_string(&kept).expect("serializes").as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, data_dir.join(FILE))?;
    std::fs::File::open(data_dir)?.sync_all()
}

/// How often a node looks for a newer ask in its directory.
pub const FOLLOW_EVERY: Duration = Duration::from_millis(250);

/// How often a node that counts itself a member asks its peers which ask they applied.
pub const ASK_PEERS_EVERY: Duration = Duration::from_secs(2);

/// How many of those checks in a row must find the node left out before it stops: one
/// finding may be a node whose directory lags the peer by a moment.
pub const REMOVED_AFTER: u32 = 2;

/// The longest a peer may take to say which ask it applied before it counts as silent.
const ASK_TIMEOUT: Duration = Duration::from_secs(1);

/// The first byte of a peer's call that asks which members ask it applied (the other
/// calls between nodes start with 0xF1, 0xF2 and 0xF3, or are JSON).
pub const ASK_MAGIC: u8 = 0xF4;

/// Whether a call from a peer asks which members ask this node applied.
pub fn is_ask(bytes: &[u8]) -> bool {
    bytes.first() == Some(&ASK_MAGIC)
}

/// Answers a peer's call: the ask this node applied and its nodes, as
/// `cluster-members.json` holds them; empty if it applied none.
pub fn answer(shared: &crate::ctx::Shared) -> Vec<u8> {
    let Some((cluster, ask)) = shared
        .cluster
        .as_ref()
        .and_then(|c| Some((c, c.members.ask()?)))
    else {
        return Vec::new();
    };
    serde_json::to_vec(&Kept::of(ask, &cluster.nodes())).expect("serializes")
}

/// What a node removed from the cluster says when it stops or refuses to start.
pub fn removed(me: u64, ask: u64, nodes: &BTreeMap<u64, SocketAddr>, data_dir: &Path) -> String {
    format!(
        "node {me} was removed from the cluster (members ask {ask} names nodes {:?}); its \
         data in {} is no longer kept current and is not served. To add the node again, \
         empty that directory and start it with --join",
        nodes.keys().collect::<Vec<_>>(),
        data_dir.display()
    )
}

/// Applies every members ask newer than the one `members` has, as this node's directory
/// replica holds them, until `stop` fires, and stops the node if its peers show it was
/// removed (see the module's documentation). Runs on a shard; the file is written off it.
pub async fn follow(
    shared: std::sync::Arc<crate::ctx::Shared>,
    mut stop: futures::channel::oneshot::Receiver<()>,
) {
    use futures::future::{select, Either};
    let Some(cluster) = &shared.cluster else {
        return;
    };
    let (engine, members) = (&shared.engine, &cluster.members);
    let data_dir = &shared.config.data_dir;
    // Beside the directory's reads, so that a silent peer never delays them; dropped (and
    // so cancelled) when this returns.
    let _asking = glommio::spawn_local(ask_peers(shared.clone()));
    loop {
        let tick = glommio::timer::sleep(FOLLOW_EVERY);
        if let Either::Right(_) = select(std::pin::pin!(tick), &mut stop).await {
            return;
        }
        let ask = match engine.cluster_ask().await {
            Ok(Some(ask)) => ask,
            Ok(None) => continue,
            Err(e) => {
                tracing::debug!(error = %e, "cluster members: the directory was not read");
                continue;
            }
        };
        if members.ask().is_some_and(|applied| applied >= ask.number) {
            continue;
        }
        let nodes: Option<BTreeMap<u64, SocketAddr>> = ask
            .nodes
            .iter()
            .map(|n| Some((n.id, n.addr.parse().ok()?)))
            .collect();
        let Some(nodes) = nodes else {
            // The engine checked every address when it decided the ask.
            tracing::error!(
                ask = ask.number,
                "cluster members: an ask with a bad address"
            );
            continue;
        };
        if let Err(e) = apply(members, data_dir, ask.number, nodes).await {
            tracing::error!(error = %e, ask = ask.number, "cluster members: the ask was not kept");
        }
    }
}

/// Asks the peers which ask they applied, every [`ASK_PEERS_EVERY`], and stops the node
/// once [`REMOVED_AFTER`] checks in a row show it removed.
async fn ask_peers(shared: std::sync::Arc<crate::ctx::Shared>) {
    let mut left_out = 0;
    loop {
        glommio::timer::sleep(ASK_PEERS_EVERY).await;
        left_out = match removal_shown_by_peers(&shared).await {
            Some(_) if left_out + 1 < REMOVED_AFTER => left_out + 1,
            Some((ask, nodes)) => {
                stop_removed(&shared, ask, nodes).await;
                0
            }
            None => 0,
        };
    }
}

/// The newest ask a peer applied that leaves this node out, if it is newer than the one
/// this node applied and this node counts itself a member. A node that knows it was
/// removed is stopped by the operator once its groups have moved off it; a node started
/// with `--join` is no member until an ask adds it (the asks before it leave it out).
async fn removal_shown_by_peers(
    shared: &crate::ctx::Shared,
) -> Option<(u64, BTreeMap<u64, SocketAddr>)> {
    let cluster = shared.cluster.as_ref()?;
    let nodes = cluster.nodes();
    let mine = cluster.members.ask();
    let added = !shared.config.cluster_join || mine.is_some();
    if !added || !nodes.contains_key(&cluster.me) {
        return None;
    }
    let asks = nodes
        .keys()
        .filter(|peer| **peer != cluster.me)
        .map(|&peer| applied_by(shared, peer));
    futures::future::join_all(asks)
        .await
        .into_iter()
        .flatten()
        .filter(|(ask, nodes)| mine.is_none_or(|m| *ask > m) && !nodes.contains_key(&cluster.me))
        .max_by_key(|(ask, _)| *ask)
}

/// The ask `peer` applied and its nodes; `None` if it applied none or did not answer.
async fn applied_by(
    shared: &crate::ctx::Shared,
    peer: u64,
) -> Option<(u64, BTreeMap<u64, SocketAddr>)> {
    let what = "cluster members: the ask it applied";
    let bytes = shared
        .ask_peer(peer, &[ASK_MAGIC], ASK_TIMEOUT, what)
        .await?;
    let kept: Kept = serde_json::from_slice(&bytes).ok()?;
    Some((kept.ask, parse_nodes(&kept.nodes).ok()?))
}

/// Keeps `ask`, which leaves this node out, as this node's own, and stops the process
/// (exit 1); returns only if it cannot be kept (the node goes on, and the next checks try
/// again).
async fn stop_removed(shared: &crate::ctx::Shared, ask: u64, nodes: BTreeMap<u64, SocketAddr>) {
    let Some(cluster) = &shared.cluster else {
        return;
    };
    let data_dir = &shared.config.data_dir;
    if let Err(e) = apply(&cluster.members, data_dir, ask, nodes.clone()).await {
        tracing::error!(error = %e, ask, "cluster members: a removal shown by peers was not kept");
        return;
    }
    let removed = removed(cluster.me, ask, &nodes, data_dir);
    tracing::error!("{removed}; the node stops");
    eprintln!("chorus: {removed}; the node stops");
    std::process::exit(1);
}

/// Keeps ask `number` in the data directory, then hands it to the shards, unless this
/// node applied it or a newer one already. One at a time ([`KEEPING`]), off the shard: the
/// call's node and its follower may apply the same ask at once, and the file must never
/// go back to an older one.
async fn apply(
    members: &chorus_replication::members::Members,
    data_dir: &Path,
    number: u64,
    nodes: BTreeMap<u64, SocketAddr>,
) -> std::io::Result<()> {
    let (members, dir) = (members.clone(), data_dir.to_owned());
    glommio::executor()
        .spawn_blocking(move || {
            let _one = KEEPING.lock().unwrap_or_else(|e| e.into_inner());
            if members.ask().is_some_and(|applied| applied >= number) {
                return Ok(());
            }
            save(&dir, number, &nodes)?;
            if members.apply(number, &nodes) {
                tracing::info!(ask = number, nodes = ?nodes.keys().collect::<Vec<_>>(), "cluster members asked");
            }
            Ok(())
        })
        .await
}

/// Held while an ask is kept and applied.
static KEEPING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// At most this many nodes (as `cluster` is checked at start).
const NODES_MAX: usize = crate::config::CLUSTER_NODES_MAX;

fn parse_nodes(nodes: &BTreeMap<String, String>) -> Result<BTreeMap<u64, SocketAddr>, ApiError> {
    if nodes.is_empty() || nodes.len() > NODES_MAX {
        return Err(ApiError::invalid(format!(
            "nodes must name 1 to {NODES_MAX} nodes"
        )));
    }
    let mut out = BTreeMap::new();
    for (id, addr) in nodes {
        let id: u64 = id
            .parse()
            .ok()
            .filter(|id| *id > 0)
            .ok_or_else(|| ApiError::invalid(format!("{id:?} is not a node id")))?;
        let addr: SocketAddr = addr
            .parse()
            .map_err(|_| ApiError::invalid(format!("{addr:?} is not IP:PORT")))?;
        out.insert(id, addr);
    }
    Ok(out)
}

/// Whether two keys are equal, in time that depends on their lengths only.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `PUT /api/v1/cluster/members`.
pub(super) async fn put_members(call: &Call<'_>) -> Result<Reply, ApiError> {
    let shared = &call.ctx.shared;
    let Some(cluster) = &shared.cluster else {
        return Err(ApiError::new(
            409,
            "not_a_cluster",
            "this server is a single node: it has no members to change (start it with --cluster)",
        ));
    };
    let r: Request = call.json()?;
    let allowed = cluster.admin_key.as_deref().is_some_and(|key| {
        let key = String::from_utf8_lossy(key);
        same(key.trim().as_bytes(), r.key.as_bytes())
    });
    if !allowed {
        return Err(ApiError::new(
            403,
            "forbidden",
            "the key does not match this node's cluster_admin_key_file (or it has none)",
        ));
    }
    let nodes = parse_nodes(&r.nodes)?;
    if r.check {
        return Ok(Reply::json(200, &json!({})));
    }
    // A call forwarded to the directory's leader was checked by the node that took it.
    if !call.forwarded {
        reach_new_nodes(call, cluster, &r, &nodes).await?;
    }
    let asked = nodes
        .iter()
        .map(|(id, addr)| ClusterNode {
            id: *id,
            addr: addr.to_string(),
        })
        .collect();
    let number = call.engine().ask_cluster(asked).await?;
    // This node applies it now; every other one when its directory holds it.
    apply(&cluster.members, &shared.config.data_dir, number, nodes)
        .await
        .map_err(|e| {
            ApiError::new(
                500,
                "internal",
                format!("ask {number} is committed but this node could not keep it: {e}"),
            )
        })?;
    Ok(Reply::json(200, &json!({ "ask": number })))
}

/// Reaches every node in `nodes` that is not a member yet: 409, naming them, if any
/// cannot be reached.
async fn reach_new_nodes(
    call: &Call<'_>,
    cluster: &crate::ctx::ClusterView,
    r: &Request,
    nodes: &BTreeMap<u64, SocketAddr>,
) -> Result<(), ApiError> {
    let check = Forwarded {
        method: "PUT".to_owned(),
        path: "/api/v1/cluster/members".to_owned(),
        query: None,
        user: None,
        device: None,
        peer: call.peer,
        body: json!({"key": r.key, "nodes": r.nodes, "check": true}).to_string(),
    };
    let members = cluster.nodes();
    // A new node at the address named (a known one at the address known).
    let mut membership = cluster.membership();
    for (id, addr) in nodes {
        membership.nodes.entry(*id).or_insert(*addr);
    }
    let shape = Shape::of(&call.ctx.shared.config);
    let mut unreached = Vec::new();
    for peer in nodes.keys().filter(|p| !members.contains_key(p)) {
        let shard = call.ctx.shard;
        let answered = send_via(&call.ctx.shared, &membership, shard, *peer, &check).await;
        if answered.is_none_or(|a| a.status != 200) {
            unreached.push(format!("node {peer} at {}", membership.nodes[peer]));
        }
    }
    if unreached.is_empty() {
        return Ok(());
    }
    Err(ApiError::new(
        409,
        "conflict",
        format!(
            "nothing was changed: {} could not be reached. A node is added once it runs \
             (with --join), with this cluster's secret and shape ({} partitions, {} shards)",
            unreached.join(", "),
            shape.partitions,
            shape.shards
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cluster_id_depends_on_the_secret_and_the_shape() {
        let shape = Shape {
            partitions: 16,
            shards: 2,
        };
        let other = Shape {
            partitions: 8,
            shards: 2,
        };
        assert_eq!(
            cluster_id(b"one secret", shape),
            cluster_id(b"one secret", shape)
        );
        assert_ne!(
            cluster_id(b"one secret", shape),
            cluster_id(b"another secret", shape)
        );
        assert_ne!(
            cluster_id(b"one secret", shape),
            cluster_id(b"one secret", other)
        );
    }

    #[test]
    fn node_lists_are_checked() {
        let of = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        assert!(parse_nodes(&of(&[])).is_err());
        assert!(parse_nodes(&of(&[("0", "127.0.0.1:1")])).is_err());
        assert!(parse_nodes(&of(&[("x", "127.0.0.1:1")])).is_err());
        assert!(parse_nodes(&of(&[("1", "nowhere")])).is_err());
        let ok = parse_nodes(&of(&[("2", "127.0.0.1:7"), ("1", "127.0.0.1:5")])).unwrap();
        assert_eq!(ok.keys().copied().collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    fn what_was_asked_is_kept_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).unwrap().is_none());
        let nodes: BTreeMap<u64, SocketAddr> = [(3, "127.0.0.1:9".parse().unwrap())].into();
        save(dir.path(), 7, &nodes).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some((7, nodes.clone())));
        // The file of the build before asks were numbered: the nodes alone, ask 0.
        std::fs::write(dir.path().join(FILE), r#"{"3":"127.0.0.1:9"}"#).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some((0, nodes)));
    }
}
