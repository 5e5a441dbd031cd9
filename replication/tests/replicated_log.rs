//! A partition's event log replicated by its group, on three nodes over real loopback TCP
//! with real directories: batches of events committed through the leader land at the same
//! offsets in every node's event log, once each, and only committed ones. A node that
//! restarts on its directories applies again what came after its last snapshot, and skips
//! what its event log already holds; a leader that stops is replaced and catches up after.

mod common;

use chorus_replication::transport::Membership;
use chorus_replication::{NodeConfig, ProposeError};
use common::{batch, free_addrs, wait_for, NodeHandle, MINUTE, RUN, STOP};
use raft::StateRole;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Default)]
struct Shared {
    /// Batches waiting to be committed by whichever node leads.
    proposals: VecDeque<u64>,
    /// Committed batches and where the proposer's log put them.
    acked: BTreeMap<u64, Range<u64>>,
    /// Batches whose proposer lost its leadership first.
    uncertain: BTreeSet<u64>,
    /// Each running node's role and event-log end.
    status: BTreeMap<u64, (StateRole, u64)>,
    /// Each stopped node's event log: (offset, payload) of every record.
    logs: BTreeMap<u64, Vec<(u64, Vec<u8>)>>,
}

async fn node_main(
    id: u64,
    nodes: BTreeMap<u64, SocketAddr>,
    dir: PathBuf,
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicU8>,
) {
    let listener = common::bind(nodes[&id]).await;
    let mut config = NodeConfig::new(Membership::new(id, nodes), 1);
    config.compact_every = 60;
    let (node, rlog) = common::event_log_node(config, dir, listener).await;
    while stop.load(Ordering::SeqCst) == RUN {
        glommio::timer::sleep(Duration::from_millis(2)).await;
        let role = node.status()[&0].role;
        let mine: Vec<u64> = {
            let mut s = shared.lock().unwrap();
            s.status.insert(id, (role, rlog.end()));
            common::take_if_leading(&mut s.proposals, role, 50)
        };
        for k in mine {
            let (rlog, shared) = (rlog.clone(), shared.clone());
            glommio::spawn_local(async move {
                let answer = common::commit_batch(&rlog, k).await;
                let mut s = shared.lock().unwrap();
                match answer {
                    Ok(range) => {
                        s.acked.insert(k, range);
                    }
                    Err(ProposeError::NotLeader { .. } | ProposeError::Dropped) => {
                        s.proposals.push_back(k)
                    }
                    Err(_) => {
                        s.uncertain.insert(k);
                    }
                }
            })
            .detach();
        }
    }
    node.stop(false).await.expect("the group's storage");
    glommio::timer::sleep(Duration::from_millis(20)).await;
    let records = common::records(rlog.log()).await;
    let mut s = shared.lock().unwrap();
    s.status.remove(&id);
    s.logs.insert(id, records);
}

struct Cluster {
    tmp: tempfile::TempDir,
    nodes: BTreeMap<u64, SocketAddr>,
    shared: Arc<Mutex<Shared>>,
    running: BTreeMap<u64, NodeHandle>,
}

impl Cluster {
    fn restart(&mut self, id: u64) {
        let (nodes, shared) = (self.nodes.clone(), self.shared.clone());
        let dir = self.tmp.path().join(format!("node-{id}"));
        let node = NodeHandle::spawn(move |stop| node_main(id, nodes, dir, shared, stop));
        self.running.insert(id, node);
    }

    fn stop(&mut self, id: u64) {
        self.running.remove(&id).expect("running").stop(STOP);
    }

    fn leader(&self) -> Option<u64> {
        let s = self.shared.lock().unwrap();
        s.status
            .iter()
            .find(|(_, (role, _))| *role == StateRole::Leader)
            .map(|(id, _)| *id)
    }

    fn propose(&self, ks: Range<u64>) {
        self.shared.lock().unwrap().proposals.extend(ks);
    }

    fn settled(&self, n: usize) -> bool {
        let s = self.shared.lock().unwrap();
        s.proposals.is_empty() && s.acked.len() + s.uncertain.len() == n
    }

    /// Whether the three running nodes' event logs end at the same offset.
    fn converged(&self) -> bool {
        let s = self.shared.lock().unwrap();
        let ends: BTreeSet<u64> = s.status.values().map(|(_, end)| *end).collect();
        s.status.len() == 3 && ends.len() == 1
    }
}

#[test]
fn every_replica_holds_the_committed_batches_at_the_same_offsets() {
    let mut c = Cluster {
        tmp: tempfile::tempdir().unwrap(),
        nodes: (1..).zip(free_addrs(3)).collect(),
        shared: Arc::default(),
        running: BTreeMap::new(),
    };
    for id in 1..=3 {
        c.restart(id);
    }
    wait_for("a leader", MINUTE, || c.leader().is_some());
    c.propose(0..100);
    wait_for("100 batches answered", MINUTE, || c.settled(100));
    // Fewer than a compaction's worth, so that the next restart applies them again.
    c.propose(100..130);
    wait_for("130 batches answered", MINUTE, || c.settled(130));

    // A follower restarts with nothing written meanwhile: it opens from its snapshot and
    // finds in its event log the batches raft-rs applies again.
    let follower = (1..=3).find(|&id| Some(id) != c.leader()).unwrap();
    c.stop(follower);
    c.restart(follower);
    wait_for("three nodes alike", MINUTE, || c.converged());

    // The leader stops abruptly; the others go on, and it catches up when it returns.
    let old = c.leader().expect("a leader");
    c.stop(old);
    wait_for("a new leader", MINUTE, || {
        c.leader().is_some_and(|l| l != old)
    });
    c.propose(130..140);
    wait_for("140 batches answered", MINUTE, || c.settled(140));
    c.restart(old);
    wait_for("three nodes alike", MINUTE, || c.converged());
    c.propose(140..240);
    wait_for("240 batches answered", MINUTE, || c.settled(240));
    wait_for("three nodes alike", MINUTE, || c.converged());
    for id in 1..=3 {
        c.stop(id);
    }

    let s = c.shared.lock().unwrap();
    let first = &s.logs[&1];
    for id in 2..=3 {
        assert_eq!(&s.logs[&id], first, "node {id}'s event log is node 1's");
    }
    // Each batch's events sit together, in order, once; acknowledged ones where the
    // proposer was told; nothing that was not proposed.
    let by_offset: BTreeMap<u64, &Vec<u8>> = first.iter().map(|(o, p)| (*o, p)).collect();
    let mut seen: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for (offset, payload) in first {
        let text = String::from_utf8(payload.clone()).unwrap();
        let (k, _) = text.split_once('.').unwrap();
        seen.entry(k.parse().unwrap()).or_default().push(*offset);
    }
    for (k, offsets) in &seen {
        let expected = batch(*k);
        assert_eq!(offsets.len(), expected.len(), "batch {k} once, whole");
        assert!(
            s.acked.contains_key(k) || s.uncertain.contains(k),
            "batch {k} was proposed"
        );
        for (i, o) in offsets.iter().enumerate() {
            assert_eq!(by_offset[o], &expected[i], "batch {k} in order");
        }
    }
    for (k, range) in &s.acked {
        assert_eq!(
            seen.get(k),
            Some(&range.clone().collect()),
            "batch {k} where told"
        );
    }
    assert!(s.acked.len() >= 230, "{} acknowledged", s.acked.len());
}
