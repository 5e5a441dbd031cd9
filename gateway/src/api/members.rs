//! Changing a cluster's members: `PUT /api/v1/cluster/members` (an operator's call, not a
//! client's; `tools/cluster add` and `remove` make it).
//!
//! The body names every node the cluster is to be placed on, with its address between
//! nodes: `{"key": "…", "nodes": {"1": "HOST:PORT", …}}`. A node added is one started with
//! `--join` (its groups wait to be added); a node left out is removed from every group,
//! after which it may be stopped. The node that takes the call passes it to every other
//! node it knows and to every node named (`"local": true`, so that none passes it on), and
//! each node:
//! 1. writes the request to `cluster-members.json` in its data directory (temporary file,
//!    fsync, rename, directory fsync), so that after a restart it goes on where it was;
//! 2. hands it to its shards ([`chorus_replication::members::Members`]): the transports
//!    learn the addresses they lack, and every group this node leads, now or later, walks
//!    to placement over the nodes named, one configuration change at a time
//!    ([`chorus_replication::membership`]).
//!
//! Every node of a cluster has the same shape (the same `partitions` and shard count: a
//! partition is the same group, on the same shard, on every node). Before anything is
//! kept, the node that takes the call asks every node it knows and every node named
//! whether it has its shape (`"check": true`, nothing kept); a node that does not answers
//! 409, and then so does the call, naming it, with nothing changed anywhere. A node that
//! cannot be reached is not checked (it checks again when the request reaches it).
//!
//! The answer is 200 with each node's outcome (`"applied"` or `"unreachable"`); the call is
//! idempotent, so an operator whose nodes were not all reached sends it again. The key must
//! match `cluster_admin_key_file` (every node the same file); without that file the call is
//! 403 on every node. A change of members is slow on purpose (a learner catches up before
//! it votes); `GET /api/v1/cluster` shows where each partition is.

use super::forward::{send, send_via, Forwarded};
use super::{Call, Reply};
use crate::error::ApiError;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

/// The file a node keeps the members last asked for in.
const FILE: &str = "cluster-members.json";

/// The cluster's id, from the secret every node shares: what node-to-node connections
/// check (a node of another cluster has another secret). A digest, so the secret does not
/// travel.
pub fn cluster_id(secret: &[u8]) -> u64 {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"chorus cluster id\0");
    ctx.update(secret);
    let digest = ctx.finish();
    u64::from_le_bytes(digest.as_ref()[..8].try_into().expect("8 bytes"))
}

#[derive(Deserialize)]
struct Request {
    key: String,
    nodes: BTreeMap<String, String>,
    #[serde(default)]
    local: bool,
    /// The shape of the node that took the call: this node refuses a request of another.
    #[serde(default)]
    shape: Option<Shape>,
    /// Only check the shape; keep nothing.
    #[serde(default)]
    check: bool,
}

/// What every node of a cluster must share.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Shape {
    partitions: u32,
    shards: usize,
}

impl Shape {
    fn of(config: &crate::config::Config) -> Shape {
        Shape {
            partitions: config.partitions,
            shards: config.shard_count(),
        }
    }

    /// Refused with 409 unless `theirs` is `self`.
    fn check(self, theirs: Shape) -> Result<(), ApiError> {
        if self == theirs {
            return Ok(());
        }
        Err(ApiError::new(
            409,
            "conflict",
            format!(
                "this node has {} partitions and {} shards, the cluster {} and {}: start it \
                 with the cluster's partitions and shards",
                self.partitions, self.shards, theirs.partitions, theirs.shards
            ),
        ))
    }
}

/// The members last asked for, as `data_dir` keeps them; `None` if never asked.
pub fn load(data_dir: &Path) -> std::io::Result<Option<BTreeMap<u64, SocketAddr>>> {
    let text = match std::fs::read_to_string(data_dir.join(FILE)) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let nodes: BTreeMap<String, String> = serde_json::from_str(&text)
        .map_err(|e| std::io::Error::other(format!("{FILE} does not parse: {e}")))?;
    parse_nodes(&nodes)
        .map(Some)
        .map_err(|e| std::io::Error::other(format!("{FILE}: {}", e.message)))
}

fn save(data_dir: &Path, nodes: &BTreeMap<String, String>) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(data_dir)?;
    let tmp = data_dir.join(format!("{FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(serde_json::to_string(nodes).expect("serializes").as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, data_dir.join(FILE))?;
    std::fs::File::open(data_dir)?.sync_all()
}

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
    let shape = Shape::of(&shared.config);
    if let Some(theirs) = r.shape {
        shape.check(theirs)?;
    }
    if r.check {
        return Ok(Reply::json(200, &json!({ "shape": shape })));
    }
    let nodes_json = serde_json::to_value(&r.nodes).expect("serializes");
    let ask = |check: bool| Forwarded {
        method: "PUT".to_owned(),
        path: "/api/v1/cluster/members".to_owned(),
        query: None,
        user: None,
        device: None,
        peer: call.peer,
        body: json!({"key": r.key, "nodes": nodes_json, "local": true, "shape": shape,
            "check": check})
        .to_string(),
    };
    if !r.local {
        // Every node known or named, at the address known (or named, for a new one).
        let mut membership = cluster.membership();
        for (id, addr) in &nodes {
            membership.nodes.entry(*id).or_insert(*addr);
        }
        let mut refused = Vec::new();
        for peer in membership.nodes.keys().filter(|p| **p != cluster.me) {
            let answered = send_via(shared, &membership, call.ctx.shard, *peer, &ask(true)).await;
            if let Some(a) = answered.filter(|a| a.status == 409) {
                let body: serde_json::Value =
                    serde_json::from_str(a.body.as_deref().unwrap_or("{}")).unwrap_or_default();
                let why = body["error"]["message"]
                    .as_str()
                    .unwrap_or("refused")
                    .to_owned();
                refused.push(format!("node {peer}: {why}"));
            }
        }
        if !refused.is_empty() {
            return Err(ApiError::new(
                409,
                "conflict",
                format!("nothing was changed: {}", refused.join("; ")),
            ));
        }
    }
    if !nodes.contains_key(&cluster.me) && r.local {
        // This node is being removed: it still applies the request, so that it stops
        // leading and its groups move off it.
        tracing::info!(
            node = cluster.me,
            "this node is being removed from the cluster"
        );
    }
    save(&shared.config.data_dir, &r.nodes).map_err(|e| {
        ApiError::new(
            500,
            "internal",
            format!("the members could not be kept: {e}"),
        )
    })?;
    cluster.members.set(&nodes);
    tracing::info!(nodes = ?nodes.keys().collect::<Vec<_>>(), "cluster members asked");
    let mut outcome = BTreeMap::new();
    outcome.insert(cluster.me.to_string(), "applied");
    if !r.local {
        let everyone: Vec<u64> = cluster.members.addresses().into_keys().collect();
        for peer in everyone.into_iter().filter(|p| *p != cluster.me) {
            let answered = send(shared, call.ctx.shard, peer, &ask(false)).await;
            let applied = answered.is_some_and(|a| a.status == 200);
            outcome.insert(
                peer.to_string(),
                if applied { "applied" } else { "unreachable" },
            );
        }
    }
    Ok(Reply::json(200, &json!({ "nodes": outcome })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cluster_id_depends_on_the_secret_only() {
        assert_eq!(cluster_id(b"one secret"), cluster_id(b"one secret"));
        assert_ne!(cluster_id(b"one secret"), cluster_id(b"another secret"));
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
        let nodes: BTreeMap<String, String> = [("3".into(), "127.0.0.1:9".into())].into();
        save(dir.path(), &nodes).unwrap();
        let back = load(dir.path()).unwrap().unwrap();
        assert_eq!(back[&3].to_string(), "127.0.0.1:9");
    }
}
