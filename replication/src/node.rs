//! The groups one node holds (multi-Raft): a [`Replica`] of each group that
//! [`placement`](crate::placement) puts on this node, one [`Transport`] that all of them
//! share, and the routing between the two by group id.
//!
//! Groups are numbered `0..groups`. Group `g` lives on `placement::replicas(g, nodes)` and
//! starts with those nodes as its voters; its state is under `g<id>/state` and its entries
//! under `g<id>/log` in the node's storage root. Each group's first replica is its
//! preferred leader ([`Replica::prefer`]): whichever node wins an election hands the
//! leadership over once that node has caught up, so leaderships spread over the nodes.
//!
//! A message for a group this node does not hold (a peer with another placement: it cannot
//! be one of the same cluster, whose fingerprint the transport checks) is dropped.

use crate::group::{Group, StateMachine};
use crate::placement;
use crate::raft_log::RaftLogError;
use crate::replica::{ProposeError, Replica, Status};
use crate::transport::{Handlers, Membership, Transport};
use chorus_log::{LogConfig, StorageRoot};
use glommio::net::TcpListener;
use glommio::task::JoinHandle;
use raft::eraftpb::ConfState;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

/// How a node runs its groups.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// This node and every node of the cluster, with their addresses between nodes.
    pub membership: Membership,
    /// Groups in the cluster, numbered from 0.
    pub groups: u32,
    /// raft-rs's tick.
    pub tick: Duration,
    /// Ticks without a leader's word before a follower stands for election.
    pub election_ticks: usize,
    /// Ticks between a leader's heartbeats.
    pub heartbeat_ticks: usize,
    /// Entries applied between two compactions of a group's log (0: never).
    pub compact_every: u64,
    /// Each group's entry log.
    pub log: LogConfig,
}

impl NodeConfig {
    /// A node of `membership` with `groups` groups, raft-rs ticking every 20 ms, elections
    /// after 10 ticks without a leader (200 ms), heartbeats every 2.
    pub fn new(membership: Membership, groups: u32) -> NodeConfig {
        NodeConfig {
            membership,
            groups,
            tick: Duration::from_millis(20),
            election_ticks: 10,
            heartbeat_ticks: 2,
            compact_every: 1_000,
            log: LogConfig::default(),
        }
    }
}

/// A group's running task: what it ended with.
type GroupTask = JoinHandle<Result<(), RaftLogError>>;

/// One node's groups, running on the current glommio executor.
pub struct Node {
    me: u64,
    transport: Rc<Transport>,
    replicas: BTreeMap<u64, Rc<Replica>>,
    tasks: std::cell::RefCell<Vec<(u64, GroupTask)>>,
}

impl Node {
    /// Opens every group placement gives this node (each on its directories under `root`,
    /// its state machine from `machine(group, its replica)`), starts the transport on `listener`, and
    /// runs each group as a task of the current executor.
    pub async fn start<R: StorageRoot + 'static, M: StateMachine + 'static>(
        config: NodeConfig,
        root: R,
        listener: TcpListener,
        mut machine: impl FnMut(u64, &Rc<Replica>) -> M,
    ) -> Result<Node, RaftLogError>
    where
        R::Dir: 'static,
    {
        let me = config.membership.me;
        let nodes: Vec<u64> = config.membership.nodes.keys().copied().collect();
        let mut opened = Vec::new();
        let mut replicas = BTreeMap::new();
        for g in 0..config.groups {
            let voters = placement::replicas(g, &nodes);
            if !voters.contains(&me) {
                continue;
            }
            let id = u64::from(g);
            let state = root.dir(&format!("g{id}/state")).await?;
            let log = root.dir(&format!("g{id}/log")).await?;
            let raft = raft::Config {
                id: me,
                election_tick: config.election_ticks,
                heartbeat_tick: config.heartbeat_ticks,
                check_quorum: true,
                pre_vote: true,
                max_inflight_msgs: 64,
                max_size_per_msg: 1 << 20,
                ..raft::Config::default()
            };
            let bootstrap = ConfState {
                voters: voters.clone(),
                ..ConfState::default()
            };
            let replica = Replica::new(id);
            replica.prefer(voters.first().copied());
            let group = Group::open(
                state,
                log,
                config.log.clone(),
                &bootstrap,
                raft,
                machine(id, &replica),
                config.compact_every,
            )
            .await?;
            replicas.insert(id, replica.clone());
            opened.push((replica, group));
        }
        let routes = Rc::new(replicas.clone());
        let lost_routes = routes.clone();
        let transport = Transport::start(
            config.membership.clone(),
            listener,
            Handlers {
                deliver: Box::new(move |_, group, m| {
                    if let Some(r) = routes.get(&group) {
                        r.step(m);
                    }
                }),
                on_lost: Box::new(move |peer, msgs| {
                    for (group, m) in msgs {
                        if let Some(r) = lost_routes.get(&group) {
                            r.lost(peer, m);
                        }
                    }
                }),
            },
        );
        let tasks = opened
            .into_iter()
            .map(|(replica, group)| {
                let id = replica.group_id();
                let t = transport.clone();
                let run = replica.run(group, config.tick, move |m| t.send(id, m));
                let task = glommio::spawn_local(async move { run.await.map(drop) }).detach();
                (id, task)
            })
            .collect();
        Ok(Node {
            me,
            transport,
            replicas,
            tasks: std::cell::RefCell::new(tasks),
        })
    }

    /// This node's id.
    pub fn id(&self) -> u64 {
        self.me
    }

    /// This node's replica of `group`, if it holds one.
    pub fn replica(&self, group: u64) -> Option<&Rc<Replica>> {
        self.replicas.get(&group)
    }

    /// The groups this node holds, with their status.
    pub fn status(&self) -> BTreeMap<u64, Status> {
        self.replicas
            .iter()
            .map(|(&g, r)| (g, r.status()))
            .collect()
    }

    /// Proposes `data` to `group` through this node (see [`Replica::propose`]); a group
    /// this node does not hold answers `NotLeader` with no leader known.
    pub async fn propose(&self, group: u64, data: Vec<u8>) -> Result<u64, ProposeError> {
        match self.replicas.get(&group) {
            Some(r) => r.propose(data).await,
            None => Err(ProposeError::NotLeader { leader: None }),
        }
    }

    /// The transport's fault layer: cuts this node off from `peer` both ways, or mends it.
    pub fn set_cut(&self, peer: u64, cut: bool) {
        self.transport.set_cut(peer, cut);
    }

    /// Stops every group, after handing each leadership this node holds to another voter
    /// when `hand_off` (so that writes wait for one election at most), then the transport.
    /// Returns the first storage error a group ended with, if any. Proposals still waiting
    /// are answered as their groups stop.
    pub async fn stop(&self, hand_off: bool) -> Result<(), RaftLogError> {
        for r in self.replicas.values() {
            if hand_off {
                r.stop_after_hand_off();
            } else {
                r.stop();
            }
        }
        let mut first_error = Ok(());
        let tasks = std::mem::take(&mut *self.tasks.borrow_mut());
        for (group, task) in tasks {
            match task.await {
                Some(Ok(())) => {}
                Some(Err(e)) => {
                    tracing::error!(group, error = %e, "a group ended on a storage error");
                    if first_error.is_ok() {
                        first_error = Err(e);
                    }
                }
                None => {}
            }
        }
        self.transport.stop();
        first_error
    }
}
