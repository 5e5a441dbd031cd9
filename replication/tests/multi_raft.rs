//! Many groups on a few nodes (multi-Raft), each node a `Node` on a glommio executor of its
//! own, with its groups' logs in real directories and their messages over real loopback
//! TCP, one transport per node. Leaderships go to each group's preferred node (its first
//! replica), so they spread over the nodes; a node that stops hands its leaderships off
//! first, and takes its own back after it returns and catches up. Every node holds every
//! group, three as voters and the rest as learners; every acknowledged value ends on every
//! node, once, in the same order.

mod common;

use chorus_log::DiskRoot;
use chorus_replication::placement;
use chorus_replication::replica::Status;
use chorus_replication::transport::Membership;
use chorus_replication::{Node, NodeConfig, ProposeError};
use common::{free_addrs, wait_for, NodeHandle, Values, HAND_OFF, MINUTE, RUN, STOP};
use raft::StateRole;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the test thread and the nodes share.
#[derive(Default)]
struct Shared {
    /// (group, value) waiting to be proposed by the node that leads the group.
    proposals: VecDeque<(u64, u64)>,
    /// Values answered `Ok`.
    acked: BTreeSet<(u64, u64)>,
    /// Values whose proposer lost its leadership or stopped before knowing.
    uncertain: BTreeSet<(u64, u64)>,
    /// Each running node's groups as it last saw them.
    status: BTreeMap<u64, BTreeMap<u64, Status>>,
    /// The values each node applied, by (node, group).
    values: BTreeMap<(u64, u64), Vec<u64>>,
    /// The nodes every group is to be placed on, when asked ([`Node::place_on`]), with a
    /// number that grows with each ask.
    place_on: Option<(u64, Vec<u64>)>,
    /// Each running node's groups' voters and learners as it last saw them.
    confs: BTreeMap<(u64, u64), (Vec<u64>, Vec<u64>)>,
}

async fn node_main(
    id: u64,
    nodes: BTreeMap<u64, SocketAddr>,
    initial: Option<Vec<u64>>,
    groups: u32,
    dir: PathBuf,
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicU8>,
) {
    let listener = common::bind(nodes[&id]).await;
    let mut config = NodeConfig::new(Membership::new(id, nodes), groups);
    config.initial = initial;
    config.compact_every = 50;
    let s2 = shared.clone();
    let node = Node::start(config, DiskRoot::new(dir), listener, move |group, _| {
        Values::new(s2.clone(), move |s: &mut Shared| {
            s.values.entry((id, group)).or_default()
        })
    })
    .await
    .expect("the node starts");
    let node = std::rc::Rc::new(node);
    let mut placed = 0;
    let hand_off = loop {
        match stop.load(Ordering::SeqCst) {
            RUN => {}
            how => break how == HAND_OFF,
        }
        glommio::timer::sleep(Duration::from_millis(2)).await;
        let status = node.status();
        let batch: Vec<(u64, u64)> = {
            let mut s = shared.lock().unwrap();
            if let Some((n, nodes)) = &s.place_on {
                if *n > placed {
                    node.place_on(nodes);
                    placed = *n;
                }
            }
            for g in status.keys() {
                let r = node.replica(*g).expect("a group it holds");
                s.confs.insert((id, *g), (r.voters(), r.learners()));
            }
            let mut mine = Vec::new();
            s.proposals.retain(|&(g, v)| {
                let leads = status
                    .get(&g)
                    .is_some_and(|st| st.role == StateRole::Leader);
                if leads {
                    mine.push((g, v));
                }
                !leads
            });
            s.status.insert(id, status);
            mine
        };
        for (g, v) in batch {
            let (node, shared) = (node.clone(), shared.clone());
            glommio::spawn_local(async move {
                let answer = node.propose(g, v.to_le_bytes().to_vec()).await;
                let mut s = shared.lock().unwrap();
                match answer {
                    Ok(_) => {
                        s.acked.insert((g, v));
                    }
                    Err(ProposeError::NotLeader { .. } | ProposeError::Dropped) => {
                        s.proposals.push_back((g, v))
                    }
                    Err(ProposeError::Uncertain) => {
                        s.uncertain.insert((g, v));
                    }
                }
            })
            .detach();
        }
    };
    let stopped = node.stop(hand_off).await;
    // Let the proposing tasks take their answers before the node is gone.
    glommio::timer::sleep(Duration::from_millis(20)).await;
    stopped.expect("the groups' storage");
    shared.lock().unwrap().status.remove(&id);
}

fn start_node(
    id: u64,
    nodes: BTreeMap<u64, SocketAddr>,
    initial: Option<Vec<u64>>,
    groups: u32,
    dir: PathBuf,
    shared: Arc<Mutex<Shared>>,
) -> NodeHandle {
    NodeHandle::spawn(move |stop| node_main(id, nodes, initial, groups, dir, shared, stop))
}

/// A cluster of nodes on threads of their own.
struct Cluster {
    tmp: tempfile::TempDir,
    nodes: BTreeMap<u64, SocketAddr>,
    /// The nodes the groups are placed on (the founders, until [`Cluster::place_on`]).
    members: Vec<u64>,
    groups: u32,
    shared: Arc<Mutex<Shared>>,
    handles: BTreeMap<u64, NodeHandle>,
}

impl Cluster {
    fn start(nodes: usize, groups: u32) -> Cluster {
        Cluster::start_of(nodes, nodes, groups)
    }

    /// A cluster begun by the first `founders` of `nodes` nodes (the others known by
    /// address, not started).
    fn start_of(nodes: usize, founders: usize, groups: u32) -> Cluster {
        let mut c = Cluster {
            tmp: tempfile::tempdir().unwrap(),
            nodes: (1..).zip(free_addrs(nodes)).collect(),
            members: (1..=founders as u64).collect(),
            groups,
            shared: Arc::default(),
            handles: BTreeMap::new(),
        };
        for id in c.members.clone() {
            c.restart(id);
        }
        c
    }

    fn ids(&self) -> Vec<u64> {
        self.members.clone()
    }

    fn restart(&mut self, id: u64) {
        let initial = self.members.contains(&id).then(|| self.members.clone());
        self.start_node(id, initial);
    }

    /// Starts node `id` with the groups' initial nodes `initial` (`None`: it joins).
    fn start_node(&mut self, id: u64, initial: Option<Vec<u64>>) {
        let dir = self.tmp.path().join(format!("node-{id}"));
        let h = start_node(
            id,
            self.nodes.clone(),
            initial,
            self.groups,
            dir,
            self.shared.clone(),
        );
        self.handles.insert(id, h);
    }

    /// Asks every running node to place every group over `nodes`.
    fn place_on(&mut self, nodes: &[u64]) {
        let mut s = self.shared.lock().unwrap();
        let n = s.place_on.as_ref().map_or(1, |(n, _)| n + 1);
        s.place_on = Some((n, nodes.to_vec()));
        self.members = nodes.to_vec();
    }

    /// Whether every running member sees every group placed over the members: placement's
    /// voters, every other member a learner, no one else.
    fn placed(&self) -> bool {
        let s = self.shared.lock().unwrap();
        let members = &self.members;
        (0..self.groups).all(|g| {
            let mut voters = placement::replicas(g, members);
            voters.sort_unstable();
            let learners = placement::learners(g, members);
            members
                .iter()
                .filter(|n| self.handles.contains_key(n))
                .all(|n| {
                    s.confs.get(&(*n, u64::from(g))) == Some(&(voters.clone(), learners.clone()))
                })
        })
    }

    fn stop(&mut self, id: u64, how: u8) {
        self.handles.remove(&id).expect("a running node").stop(how);
    }

    fn stop_all(mut self) {
        for id in self.handles.keys().copied().collect::<Vec<_>>() {
            self.stop(id, STOP);
        }
    }

    /// Each group's leader as the running nodes see it: the one node that says it leads.
    fn leaders(&self) -> BTreeMap<u64, u64> {
        let s = self.shared.lock().unwrap();
        let mut leaders = BTreeMap::new();
        for (&node, groups) in &s.status {
            for (&g, st) in groups {
                if st.role == StateRole::Leader {
                    leaders.insert(g, node);
                }
            }
        }
        leaders
    }

    /// Whether every group is led by its preferred node.
    fn leaders_preferred(&self) -> bool {
        let ids = self.ids();
        let leaders = self.leaders();
        (0..self.groups).all(|g| leaders.get(&u64::from(g)) == placement::replicas(g, &ids).first())
    }

    fn propose(&self, values: impl Iterator<Item = (u64, u64)>) {
        self.shared.lock().unwrap().proposals.extend(values);
    }

    /// Whether every value proposed was answered.
    fn settled(&self, n: usize) -> bool {
        let s = self.shared.lock().unwrap();
        s.proposals.is_empty() && s.acked.union(&s.uncertain).count() == n
    }

    /// Whether every node holds as many values of every group as the others.
    fn converged(&self) -> bool {
        let ids = self.ids();
        let s = self.shared.lock().unwrap();
        (0..self.groups).all(|g| {
            let lens: BTreeSet<usize> = ids
                .iter()
                .map(|&n| s.values.get(&(n, u64::from(g))).map_or(0, Vec::len))
                .collect();
            lens.len() == 1
        })
    }

    /// Every node (voter or learner) holds the same values of a group in the same order,
    /// each once, every acknowledged one, nothing never proposed.
    fn check_values(&self) {
        let ids = self.ids();
        let s = self.shared.lock().unwrap();
        for g in 0..self.groups {
            let group = u64::from(g);
            let first = &s.values[&(ids[0], group)];
            for n in &ids {
                assert_eq!(
                    &s.values[&(*n, group)],
                    first,
                    "group {g} alike on node {n}"
                );
            }
            let unique: BTreeSet<u64> = first.iter().copied().collect();
            assert_eq!(unique.len(), first.len(), "no value twice in group {g}");
            for &(ag, v) in s.acked.iter().filter(|(ag, _)| *ag == group) {
                assert!(unique.contains(&v), "acknowledged ({ag}, {v}) is kept");
            }
            for v in &unique {
                assert!(
                    s.acked.contains(&(group, *v)) || s.uncertain.contains(&(group, *v)),
                    "({g}, {v}) was proposed"
                );
            }
        }
    }
}

#[test]
fn seventeen_groups_on_three_nodes_spread_their_leaders_and_keep_every_value() {
    let mut c = Cluster::start(3, 17);
    wait_for("every group led by its preferred node", MINUTE, || {
        c.leaders_preferred()
    });
    let per_node = c.leaders().values().fold(BTreeMap::new(), |mut m, n| {
        *m.entry(*n).or_insert(0) += 1;
        m
    });
    assert_eq!(
        per_node.values().copied().collect::<BTreeSet<_>>(),
        [5, 6].into()
    );

    let round = |from: u64| (0..17u64).flat_map(move |g| (from..from + 20).map(move |v| (g, v)));
    c.propose(round(0));
    wait_for("340 values answered", MINUTE, || c.settled(340));
    assert_eq!(
        c.shared.lock().unwrap().acked.len(),
        340,
        "all acknowledged"
    );

    // Node 1 hands its leaderships off and stops; the others go on without it.
    c.stop(1, HAND_OFF);
    let stopped = std::time::Instant::now();
    wait_for("every group led by node 2 or 3", MINUTE, || {
        c.leaders().len() == 17
    });
    // The hand-offs were done before the node stopped: no group waited for an election.
    assert!(
        stopped.elapsed() < Duration::from_secs(1),
        "{:?}",
        stopped.elapsed()
    );
    c.propose(round(100));
    wait_for("680 values answered", MINUTE, || c.settled(680));

    // It comes back, catches up, and takes back the groups it is preferred for.
    c.restart(1);
    wait_for("leaders back where preferred", MINUTE, || {
        c.leaders_preferred()
    });
    c.propose(round(200));
    wait_for("1,020 values answered", MINUTE, || c.settled(1_020));
    wait_for("every replica caught up", MINUTE, || c.converged());
    c.check_values();
    c.stop_all();
}

/// Five nodes: every group has three voters (placement's) and two learners. Learners hold
/// every value but are no majority: with two of a group's voters down, the three nodes
/// left (its third voter and its two learners) commit nothing in it, while a group whose
/// voters are up goes on; once the voters return, the waiting values commit.
#[test]
fn eight_groups_on_five_nodes_vote_on_three_and_teach_the_rest() {
    let mut c = Cluster::start(5, 8);
    wait_for("every group led by its preferred node", MINUTE, || {
        c.leaders_preferred()
    });
    {
        let s = c.shared.lock().unwrap();
        for (node, groups) in &s.status {
            assert_eq!(groups.len(), 8, "node {node} holds every group");
        }
    }
    c.propose((0..8u64).flat_map(|g| (0..30).map(move |v| (g, v))));
    wait_for("240 values answered", MINUTE, || c.settled(240));
    wait_for("every node caught up", MINUTE, || c.converged());

    // Group 0's voters are 1, 2 and 3; group 3's are 4, 5 and 1.
    let ids = c.ids();
    assert_eq!(placement::replicas(0, &ids), vec![1, 2, 3]);
    assert_eq!(placement::replicas(3, &ids), vec![4, 5, 1]);
    c.stop(2, STOP);
    c.stop(3, STOP);
    c.propose((100..110).flat_map(|v| [(0, v), (3, v)]));
    wait_for("group 3's values acknowledged", MINUTE, || {
        let s = c.shared.lock().unwrap();
        (100..110).all(|v| s.acked.contains(&(3, v)))
    });
    std::thread::sleep(Duration::from_millis(500));
    {
        let s = c.shared.lock().unwrap();
        let zero: Vec<u64> = s
            .acked
            .iter()
            .filter(|(g, v)| *g == 0 && *v >= 100)
            .map(|x| x.1)
            .collect();
        assert!(
            zero.is_empty(),
            "group 0 committed {zero:?} with one voter of three up"
        );
    }
    c.restart(2);
    c.restart(3);
    wait_for("260 values answered", MINUTE, || c.settled(260));
    wait_for("every node caught up", MINUTE, || c.converged());
    c.check_values();
    c.stop_all();
}

/// Membership under traffic. Node 4 joins a cluster of three: its groups start with no
/// configuration, and every group's leader adds it as a learner, promotes it where
/// placement over four nodes wants its vote, and demotes the voter it replaces. Then node 1
/// leaves: every leader demotes and removes it (a group it leads is handed off first).
/// Values flow throughout; every member ends with every value, once, in the same order.
#[test]
fn a_node_joins_and_another_leaves_while_values_flow() {
    let mut c = Cluster::start_of(4, 3, 8);
    wait_for("every group led by its preferred node", MINUTE, || {
        c.leaders_preferred()
    });
    let round = |from: u64| (0..8u64).flat_map(move |g| (from..from + 20).map(move |v| (g, v)));
    c.propose(round(0));
    c.start_node(4, None);
    c.place_on(&[1, 2, 3, 4]);
    c.propose(round(20));
    wait_for("every group placed over nodes 1 to 4", MINUTE, || {
        c.placed()
    });
    wait_for("320 values answered", MINUTE, || c.settled(320));
    wait_for("every member caught up", MINUTE, || c.converged());
    c.check_values();
    wait_for(
        "leaders where placement over four nodes prefers",
        MINUTE,
        || c.leaders_preferred(),
    );

    c.place_on(&[2, 3, 4]);
    c.propose(round(40));
    wait_for("every group placed over nodes 2 to 4", MINUTE, || {
        c.placed()
    });
    wait_for("480 values answered", MINUTE, || c.settled(480));
    c.stop(1, STOP);
    c.propose(round(60));
    wait_for("640 values answered", MINUTE, || c.settled(640));
    wait_for("every member caught up", MINUTE, || c.converged());
    c.check_values();
    assert_eq!(
        c.shared.lock().unwrap().acked.len(),
        640,
        "every value acknowledged"
    );
    c.stop_all();
}
