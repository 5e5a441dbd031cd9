//! The groups one node holds (multi-Raft): a [`Replica`] of every group of the cluster,
//! one [`Transport`] that all of them share, and the routing between the two by group id.
//!
//! Groups are numbered `0..groups`. Group `g` starts with `placement::replicas(g, nodes)`
//! as its voters and every other node as a learner ([`placement::learners`]), so every node
//! holds every group: a voter where placement puts its vote, a learner elsewhere. Its state
//! is under `g<id>/state` and its entries under `g<id>/log` in the node's storage root.
//! Each group's first voter is its preferred leader ([`Replica::prefer`]): whichever node
//! wins an election hands the leadership over once that node has caught up, so leaderships
//! spread over the nodes.
//!
//! A message for a group this node does not hold (not opened yet, or a peer with another
//! placement: it cannot be one of the same cluster, whose fingerprint the transport
//! checks) is dropped.

use crate::board::{self, Board, GroupView};
use crate::calls::Calls;
use crate::group::{Group, StateMachine};
use crate::journal::Journal;
use crate::members::Members;
use crate::placement;
use crate::raft_log::RaftLogError;
use crate::replica::{ProposeError, Replica, Status};
use crate::transport::{Cuts, Handlers, Membership, Transport};
use chorus_log::{LogConfig, StorageRoot};
use glommio::net::TcpListener;
use glommio::task::JoinHandle;
use raft::eraftpb::ConfState;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Entries a group applies between two compactions of its Raft log, unless set otherwise
/// ([`NodeConfig::compact_every`]).
pub const COMPACT_EVERY: u64 = 1_000;

/// How a node runs its groups.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// This node and every node of the cluster, with their addresses between nodes.
    pub membership: Membership,
    /// The nodes whose groups began the cluster: a group opened for the first time starts
    /// with placement over them as its configuration. `None`: this node joins a running
    /// cluster, and its groups start with no configuration, waiting for their leaders to
    /// add it ([`Node::place_on`] on the cluster's nodes). The default: every node of
    /// `membership`.
    pub initial: Option<Vec<u64>>,
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
    /// The shard's Raft journal (every group's entries, see [`crate::Journal`]).
    pub log: LogConfig,
    /// A group whose oldest entry lies this many journal records behind the end writes
    /// its entries again, so that the segments behind can go.
    pub rewrite_after: u64,
    /// The transport's fault layer (none cut, unless a test cuts some).
    pub cuts: Cuts,
    /// Where the node's groups and peers are shown (see [`Board`]).
    pub board: Board,
    /// Who serves peers' calls on this node (see [`crate::calls`]).
    pub calls: Calls,
    /// The nodes the cluster is asked to be placed on, shared by the node's shards (see
    /// [`Members`]).
    pub members: Members,
    /// The shard this node's groups run on: its cluster port is the node's plus this.
    pub shard: u32,
    /// Told when a group ends on a storage error (see [`OnStorageError`]).
    pub on_storage_error: OnStorageError,
    /// Whether the engine's blobs are copied to the other nodes ([`crate::blobs`]): on,
    /// unless every node shares one blob store (an S3 bucket).
    pub replicate_blobs: bool,
}

/// What a node does when one of its groups ends on a storage error (a failed write or
/// fsync poisons the group's logs: they are never retried, see `chorus_log`). By default
/// the error is logged and the group stays down on this node while the node goes on; a
/// server sets a hook that stops the whole node (fail-stop), so that it restarts, recovers
/// its logs from what its disk really holds, and is caught up by its peers, rather than
/// staying a member that never answers.
#[derive(Clone, Default)]
pub struct OnStorageError(pub Option<StorageErrorHook>);

/// The hook of [`OnStorageError`]: called with the group and its error.
pub type StorageErrorHook = std::sync::Arc<dyn Fn(u64, &RaftLogError) + Send + Sync>;

impl std::fmt::Debug for OnStorageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "hook" } else { "log" })
    }
}

/// Zeros a cluster node's logs (its Raft journals and its partitions' event logs) write
/// ahead of their records at a time, where a single node's write 4 MiB: a node's many logs
/// share one disk, groups under the same load cross their marks together, and every fsync
/// on the disk waits behind the zeros. At 2,000 commits/s on 3 nodes, 4 MiB made p99 54–75
/// ms, 512 KiB 5.3–9.7 ms (DESIGN.md, "Replication").
pub const PREALLOCATE_BYTES: u64 = 512 * 1024;

/// Segments of a Raft journal kept for its next ones instead of deleted
/// (`LogConfig::recycle_segments`): a journal writes as many bytes as it holds records,
/// where zeros written ahead doubled them (at 50,000 commits/s on 3 nodes, 44 of the
/// disk's 149 MB/s, each 512 KiB on its node's commit path for 2 to 5 ms; DESIGN.md,
/// "Replication").
pub const JOURNAL_SPARES: usize = 2;

/// Zeros a cluster node's partition event logs write ahead at a time: less than its
/// journals ([`PREALLOCATE_BYTES`]). An event log is written without an fsync of its own
/// (the journal holds its entries durably), so its zeros only spare each append a trip
/// through a kernel worker, and partitions under the same load cross their marks together:
/// 16 groups at 50,000 commits/s crossed 512 KiB marks every 0.6 s, 8 MiB of zeros per node
/// at once, and each time every commit waited some 40 ms behind them on the disk (RF=3
/// p99 median of three 38.3 ms at 512 KiB, 21.3 at 128 KiB, 22.5 at 64 KiB; DESIGN.md,
/// "Replication").
pub const EVENTS_PREALLOCATE_BYTES: u64 = 128 * 1024;

impl NodeConfig {
    /// A node of `membership` with `groups` groups, raft-rs ticking every 20 ms, elections
    /// after 10 ticks without a leader (200 ms), heartbeats every 2.
    pub fn new(membership: Membership, groups: u32) -> NodeConfig {
        NodeConfig {
            initial: Some(membership.nodes.keys().copied().collect()),
            membership,
            groups,
            tick: Duration::from_millis(20),
            election_ticks: 10,
            heartbeat_ticks: 2,
            compact_every: COMPACT_EVERY,
            log: LogConfig {
                preallocate_bytes: PREALLOCATE_BYTES,
                // Read only when the shard opens (groups keep their entries in memory).
                recent_bytes: 0,
                // Its old segments go as fast as new ones come (every group's pin passes
                // them): their blocks take the new records, with no zeros written first.
                recycle_segments: JOURNAL_SPARES,
                ..LogConfig::default()
            },
            rewrite_after: crate::journal::REWRITE_AFTER,
            cuts: Cuts::default(),
            board: Board::default(),
            calls: Calls::default(),
            members: Members::default(),
            shard: 0,
            on_storage_error: OnStorageError::default(),
            replicate_blobs: true,
        }
    }
}

/// A group's running task: what it ended with.
type GroupTask = JoinHandle<Result<(), RaftLogError>>;

/// One node's groups, running on the current glommio executor.
pub struct Node {
    me: u64,
    config: NodeConfig,
    transport: Rc<Transport>,
    /// The groups opened here, by id: where the transport delivers their messages.
    replicas: Rc<RefCell<BTreeMap<u64, Rc<Replica>>>>,
    tasks: RefCell<Vec<(u64, GroupTask)>>,
    /// The nodes the groups were last asked to be placed on ([`Node::place_on`]), for
    /// groups opened after.
    placed_on: Rc<RefCell<Option<Vec<u64>>>>,
    /// The shard's Raft journal, opened with the first group (a `Journal` over the
    /// storage root's directories; `Any` as the node is not generic over the root).
    journal: futures::lock::Mutex<Option<Rc<dyn std::any::Any>>>,
}

impl Node {
    /// Opens every group of the cluster (each on its directories under `root`, its state
    /// machine from `machine(group, its replica)`), starts the transport on `listener`, and
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
        let node = Node::listen(config, listener);
        for g in 0..node.config.groups {
            let id = u64::from(g);
            node.open_group(&root, id, |r| machine(id, r)).await?;
        }
        Ok(node)
    }

    /// A node with no group open yet: the transport runs on `listener`, and messages for
    /// groups not (yet) opened here are dropped (Raft sends again).
    pub fn listen(config: NodeConfig, listener: TcpListener) -> Node {
        let replicas: Rc<RefCell<BTreeMap<u64, Rc<Replica>>>> = Rc::default();
        let (routes, lost_routes, serve_routes) =
            (replicas.clone(), replicas.clone(), replicas.clone());
        let heard: Rc<RefCell<BTreeMap<u64, Instant>>> = Rc::default();
        let hearing = heard.clone();
        let transport = Transport::start_with_cuts(
            config.membership.clone(),
            listener,
            Handlers {
                deliver: Box::new(move |from, group, m| {
                    hearing.borrow_mut().insert(from, Instant::now());
                    if let Some(r) = routes.borrow().get(&group) {
                        r.step(m);
                    }
                }),
                on_lost: Box::new(move |peer, msgs| {
                    let routes = lost_routes.borrow();
                    for (group, m) in msgs {
                        if let Some(r) = routes.get(&group) {
                            r.lost(peer, m);
                        }
                    }
                }),
                call: Some({
                    let calls = config.calls.clone();
                    Box::new(move |from, request| {
                        let calls = calls.clone();
                        Box::pin(async move { calls.take(from, request).await })
                    })
                }),
                notice: Some({
                    let calls = config.calls.clone();
                    Box::new(move |from, notice| calls.give_notice(from, notice))
                }),
                serve: Some(Box::new(move |group, from, to| {
                    let replica = serve_routes.borrow().get(&group).cloned();
                    Box::pin(async move {
                        match replica {
                            Some(r) => r.serve_events(from, to).await,
                            None => crate::event_log::encode_batch(&[]),
                        }
                    })
                })),
            },
            config.cuts.clone(),
        );
        let placed_on: Rc<RefCell<Option<Vec<u64>>>> = Rc::default();
        glommio::spawn_local(send_notices(
            config.calls.outgoing(),
            Rc::downgrade(&transport),
        ))
        .detach();
        glommio::spawn_local(publish(
            transport.clone(),
            replicas.clone(),
            heard,
            config.board.clone(),
        ))
        .detach();
        glommio::spawn_local(follow_members(
            config.members.clone(),
            config.shard,
            Rc::downgrade(&transport),
            replicas.clone(),
            placed_on.clone(),
        ))
        .detach();
        Node {
            me: config.membership.me,
            config,
            transport,
            replicas,
            tasks: RefCell::default(),
            placed_on,
            journal: futures::lock::Mutex::new(None),
        }
    }

    /// The shard's Raft journal under `root` (`journal/s<shard>`), opened (and replayed)
    /// by the first group to ask.
    async fn journal<R: StorageRoot>(&self, root: &R) -> Result<Rc<Journal<R::Dir>>, RaftLogError>
    where
        R::Dir: 'static,
    {
        let mut held = self.journal.lock().await;
        if let Some(any) = held.as_ref() {
            return any.clone().downcast::<Journal<R::Dir>>().map_err(|_| {
                RaftLogError::Corrupt("groups of one node opened over two kinds of storage".into())
            });
        }
        // Every append to the journal is synced: its files make each write durable as it
        // completes, with no separate flush (`StorageRoot::dir_write_through`).
        let dir = root
            .dir_write_through(&format!("journal/s{}", self.config.shard))
            .await?;
        let journal =
            Rc::new(Journal::open(dir, self.config.log.clone(), self.config.rewrite_after).await?);
        *held = Some(journal.clone());
        Ok(journal)
    }

    /// The voters group `group` starts with ([`placement::replicas`] over the initial
    /// nodes; none on a joining node).
    pub fn voters(&self, group: u64) -> Vec<u64> {
        placement::replicas(group as u32, self.initial())
    }

    /// The learners group `group` starts with: every other initial node
    /// ([`placement::learners`]).
    pub fn learners(&self, group: u64) -> Vec<u64> {
        placement::learners(group as u32, self.initial())
    }

    fn initial(&self) -> &[u64] {
        self.config.initial.as_deref().unwrap_or_default()
    }

    /// Asks every group this node holds to be placed over `nodes`: where this node leads
    /// (now or later), it walks the group there one membership change at a time
    /// ([`crate::membership`]). How a node is added (`nodes` with it, the node started
    /// with [`NodeConfig::initial`] `None`) or removed (`nodes` without it); every node is
    /// asked alike, so that whichever leads a group moves it.
    pub fn place_on(&self, nodes: &[u64]) {
        place_all(&self.replicas.borrow(), &self.placed_on, nodes);
    }

    /// Opens group `group` on its directory under `root` (`g<id>/state`; its entries in
    /// the shard's journal),
    /// with the state machine `machine` makes for its replica, and runs it as a task of
    /// the current executor: as a voter if placement gives this node a vote, as a learner
    /// otherwise. Its first voter is its preferred leader.
    pub async fn open_group<R: StorageRoot, M: StateMachine + 'static>(
        &self,
        root: &R,
        group: u64,
        machine: impl FnOnce(&Rc<Replica>) -> M,
    ) -> Result<Rc<Replica>, RaftLogError>
    where
        R::Dir: 'static,
    {
        let config = &self.config;
        let (voters, learners) = (self.voters(group), self.learners(group));
        if !config.membership.nodes.contains_key(&self.me)
            || self.replicas.borrow().contains_key(&group)
        {
            return Err(RaftLogError::Corrupt(format!(
                "group {group} cannot be opened on node {}: the node is not of the \
                 cluster, or the group is open already",
                self.me
            )));
        }
        let state = root.dir(&format!("g{group}/state")).await?;
        let journal = self.journal(root).await?;
        let raft = raft::Config {
            id: self.me,
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
            learners,
            ..ConfState::default()
        };
        let replica = Replica::new(group);
        replica.prefer(voters.first().copied());
        // Weak: the transport's handlers reach the replica, which must not keep the
        // transport alive in turn.
        let transport = Rc::downgrade(&self.transport);
        replica.set_fetch(Rc::new(move |peer, from, to| {
            let transport = transport.upgrade();
            Box::pin(async move {
                match transport {
                    Some(t) => t.fetch(peer, group, from, to).await,
                    None => Err(std::io::Error::other("the node's transport is gone")),
                }
            })
        }));
        let opened = Group::open(
            state,
            journal,
            group,
            &bootstrap,
            raft,
            machine(&replica),
            config.compact_every,
        )
        .await?;
        // The placement asked last, read as the replica joins the others with no wait
        // between: one asked while the group was opening reached only those.
        if let Some(nodes) = self.placed_on.borrow().as_ref() {
            replica.place_on(nodes.clone());
        }
        self.replicas.borrow_mut().insert(group, replica.clone());
        let t = self.transport.clone();
        let run = replica
            .clone()
            .run(opened, config.tick, move |m| t.send(group, m));
        let on_error = config.on_storage_error.clone();
        let task = glommio::spawn_local(async move {
            let ended = run.await.map(drop);
            if let Err(e) = &ended {
                tracing::error!(group, error = %e, "a group ended on a storage error");
                if let Some(hook) = &on_error.0 {
                    hook(group, e);
                }
            }
            ended
        })
        .detach();
        self.tasks.borrow_mut().push((group, task));
        Ok(replica)
    }

    /// The transport the node's groups share.
    pub fn transport(&self) -> &Rc<Transport> {
        &self.transport
    }

    /// This node's id.
    pub fn id(&self) -> u64 {
        self.me
    }

    /// This node's replica of `group`, if it holds one.
    pub fn replica(&self, group: u64) -> Option<Rc<Replica>> {
        self.replicas.borrow().get(&group).cloned()
    }

    /// The groups this node holds, with their status.
    pub fn status(&self) -> BTreeMap<u64, Status> {
        self.replicas
            .borrow()
            .iter()
            .map(|(&g, r)| (g, r.status()))
            .collect()
    }

    /// Proposes `data` to `group` through this node (see [`Replica::propose`]); a group
    /// this node does not hold answers `NotLeader` with no leader known.
    pub async fn propose(&self, group: u64, data: Vec<u8>) -> Result<u64, ProposeError> {
        let replica = self.replica(group);
        match replica {
            Some(r) => r.propose(data).await,
            None => Err(ProposeError::NotLeader { leader: None }),
        }
    }

    /// Stops group `group` (once its leadership, if this node holds it, moved to another
    /// voter, with `hand_off`) and waits for its task to end; once no group is left open,
    /// stops the transport and closes its listener. Returns the storage error the group
    /// ended with, if any.
    pub async fn close_group(&self, group: u64, hand_off: bool) -> Result<(), RaftLogError> {
        let replica = self.replicas.borrow().get(&group).cloned();
        let Some(replica) = replica else {
            return Ok(());
        };
        if hand_off {
            replica.stop_after_hand_off();
        } else {
            replica.stop();
        }
        let task = {
            let mut tasks = self.tasks.borrow_mut();
            let at = tasks.iter().position(|(g, _)| *g == group);
            at.map(|i| tasks.swap_remove(i).1)
        };
        let ended = match task {
            Some(task) => task.await.unwrap_or(Ok(())),
            None => Ok(()),
        };
        // Routed to until it stopped: a hand-off needs the peers' answers.
        self.replicas.borrow_mut().remove(&group);
        if self.replicas.borrow().is_empty() {
            self.transport.stop_and_close().await;
        }
        ended
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
        for r in self.replicas.borrow().values() {
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

fn place_all(
    replicas: &BTreeMap<u64, Rc<Replica>>,
    placed_on: &RefCell<Option<Vec<u64>>>,
    nodes: &[u64],
) {
    *placed_on.borrow_mut() = Some(nodes.to_vec());
    for r in replicas.values() {
        r.place_on(nodes.to_vec());
    }
}

/// Follows the node's [`Members`] every [`board::PUBLISH_EVERY`] until the transport is
/// gone or stopped: a new version adds the addresses the transport lacks (this shard's
/// ports) and asks every group to move to the nodes asked.
async fn follow_members(
    members: Members,
    shard: u32,
    transport: std::rc::Weak<Transport>,
    replicas: Rc<RefCell<BTreeMap<u64, Rc<Replica>>>>,
    placed_on: Rc<RefCell<Option<Vec<u64>>>>,
) {
    let mut seen = 0;
    loop {
        match transport.upgrade() {
            Some(t) if !t.is_stopped() => {
                if let Some((version, addresses, asked)) = members.read_if_newer(seen) {
                    seen = version;
                    for (id, addr) in addresses {
                        t.add_peer(id, crate::engine_env::shard_addr(addr, shard));
                    }
                    if let Some(nodes) = asked {
                        place_all(&replicas.borrow(), &placed_on, &nodes);
                    }
                }
            }
            _ => return,
        }
        glommio::timer::sleep(board::PUBLISH_EVERY).await;
    }
}

/// Sends each notice the server asks to send ([`Calls::notify_peers`]) to every peer,
/// until the transport is gone.
async fn send_notices(
    mut notices: futures::channel::mpsc::UnboundedReceiver<Vec<u8>>,
    transport: std::rc::Weak<Transport>,
) {
    use futures::StreamExt;
    while let Some(notice) = notices.next().await {
        let Some(t) = transport.upgrade().filter(|t| !t.is_stopped()) else {
            return;
        };
        for peer in t.peers().into_keys() {
            t.notify(peer, notice.clone());
        }
    }
}

/// Copies what this shard's groups and transport know onto the board every
/// [`board::PUBLISH_EVERY`], until the transport stops.
async fn publish(
    transport: Rc<Transport>,
    replicas: Rc<RefCell<BTreeMap<u64, Rc<Replica>>>>,
    heard: Rc<RefCell<BTreeMap<u64, Instant>>>,
    board: Board,
) {
    while !transport.is_stopped() {
        for (peer, at) in std::mem::take(&mut *heard.borrow_mut()) {
            board.heard(peer, at);
        }
        let groups: Vec<(u64, Status, Vec<u64>, Vec<u64>)> = replicas
            .borrow()
            .iter()
            .map(|(g, r)| (*g, r.status(), r.voters(), r.learners()))
            .collect();
        for (group, status, voters, learners) in groups {
            let leader = (status.leader != 0).then_some(status.leader);
            let view = GroupView {
                leader,
                voters,
                learners,
            };
            board.set_group(group, view);
        }
        glommio::timer::sleep(board::PUBLISH_EVERY).await;
    }
}
