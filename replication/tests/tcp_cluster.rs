//! Three nodes of one Raft group, each on a glommio executor of its own, with their logs on
//! real directories and their messages over real loopback TCP through the node transport.
//! Values are proposed through whichever node leads; the leader is then stopped, the other
//! two elect another and go on, and the stopped node is restarted on its directories and
//! catches up. Every acknowledged value ends on every node, once, in the same order.
//! A client that is not a node of the cluster, or speaks garbage, is cut off, and the
//! group does not notice. A leader that stops handing its leadership off first stalls
//! writes for well under a second. A leader cut off from the others by the transports'
//! fault layer is replaced, and what it could not commit is never acknowledged.

mod common;

use chorus_log::{DiskStorage, LogConfig};
use chorus_replication::transport::{Handlers, Membership, Transport};
use chorus_replication::{Group, Journal, ProposeError, Replica};
use common::{free_addrs, wait_for, NodeHandle, Values, HAND_OFF, MINUTE, RUN, STOP};
use raft::eraftpb::ConfState;
use raft::{Config, StateRole};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const GROUP: u64 = 7;

/// What the test thread and the nodes share.
#[derive(Default)]
struct Shared {
    /// Values waiting to be proposed by whichever node leads.
    proposals: VecDeque<u64>,
    /// Values applied by the node that proposed them: acknowledged.
    acked: BTreeSet<u64>,
    /// When each acknowledgement came.
    acked_at: Vec<Instant>,
    /// Values a node proposed and stopped before it saw them applied: like a client whose
    /// request timed out, nobody knows whether they were committed.
    uncertain: BTreeSet<u64>,
    /// Each node's role and applied values.
    status: BTreeMap<u64, (StateRole, Vec<u64>)>,
    /// Links cut by the transports' fault layer: (node, peer), each node cutting its side.
    cut: BTreeSet<(u64, u64)>,
}

fn start_node(
    id: u64,
    nodes: BTreeMap<u64, SocketAddr>,
    dir: PathBuf,
    shared: Arc<Mutex<Shared>>,
) -> NodeHandle {
    NodeHandle::spawn(move |stop| node_main(id, nodes, dir, shared, stop))
}

async fn node_main(
    id: u64,
    nodes: BTreeMap<u64, SocketAddr>,
    dir: PathBuf,
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicU8>,
) {
    let listener = common::bind(nodes[&id]).await;
    let replica = Replica::new(GROUP);
    let (r1, r2) = (replica.clone(), replica.clone());
    let transport = Transport::start(
        Membership {
            me: id,
            nodes: nodes.clone(),
            cluster: None,
        },
        listener,
        Handlers {
            deliver: Box::new(move |_, group, m| {
                assert_eq!(group, GROUP);
                r1.step(m);
            }),
            on_lost: Box::new(move |peer, msgs| {
                for (_, m) in msgs {
                    r2.lost(peer, m);
                }
            }),
            serve: None,
            call: None,
            notice: None,
        },
    );
    let config = Config {
        id,
        election_tick: 10,
        heartbeat_tick: 2,
        check_quorum: true,
        pre_vote: true,
        max_inflight_msgs: 64,
        max_size_per_msg: 1 << 20,
        ..Config::default()
    };
    let conf = ConfState {
        voters: nodes.keys().copied().collect(),
        ..ConfState::default()
    };
    let machine = Values::new(shared.clone(), move |s: &mut Shared| {
        &mut s
            .status
            .entry(id)
            .or_insert((StateRole::Follower, Vec::new()))
            .1
    });
    let journal = Journal::open(
        DiskStorage::open_dir(dir.join("journal")).unwrap(),
        LogConfig::default(),
        chorus_replication::journal::REWRITE_AFTER,
    )
    .await
    .expect("open the journal");
    let group = Group::open(
        DiskStorage::open_dir(dir.join("state")).unwrap(),
        std::rc::Rc::new(journal),
        1,
        &conf,
        config,
        machine,
        200,
    )
    .await
    .expect("open the group");
    let t = transport.clone();
    let running = glommio::spawn_local(replica.clone().run(
        group,
        Duration::from_millis(20),
        move |m| t.send(GROUP, m),
    ));
    // The clients of this node: each value the test asks for is proposed by a task of its
    // own, which waits for the answer as a client would.
    loop {
        match stop.load(Ordering::SeqCst) {
            RUN => {}
            HAND_OFF => {
                replica.stop_after_hand_off();
                break;
            }
            _ => {
                replica.stop();
                break;
            }
        }
        glommio::timer::sleep(Duration::from_millis(2)).await;
        let status = replica.status();
        let batch: Vec<u64> = {
            let mut s = shared.lock().unwrap();
            for &p in nodes.keys().filter(|&&p| p != id) {
                transport.set_cut(p, s.cut.contains(&(id, p)));
            }
            s.status
                .entry(id)
                .or_insert((StateRole::Follower, Vec::new()))
                .0 = status.role;
            common::take_if_leading(&mut s.proposals, status.role, 100)
        };
        for v in batch {
            let (r, shared) = (replica.clone(), shared.clone());
            glommio::spawn_local(async move {
                let answer = r.propose(v.to_le_bytes().to_vec()).await;
                let mut s = shared.lock().unwrap();
                match answer {
                    Ok(_) => {
                        s.acked.insert(v);
                        s.acked_at.push(Instant::now());
                    }
                    // Certainly not in the log: to be proposed again.
                    Err(ProposeError::NotLeader { .. } | ProposeError::Dropped) => {
                        s.proposals.push_back(v)
                    }
                    // Like a client's timed-out request: nobody knows.
                    Err(ProposeError::Uncertain) => {
                        s.uncertain.insert(v);
                    }
                }
            })
            .detach();
        }
    }
    running.await.expect("the group's storage");
    transport.stop();
    // Let the proposing tasks take their answers before the node is gone.
    glommio::timer::sleep(Duration::from_millis(20)).await;
    shared.lock().unwrap().status.remove(&id);
}

/// Three nodes of one group, each on a thread of its own, with a leader.
struct Cluster {
    tmp: tempfile::TempDir,
    nodes: BTreeMap<u64, SocketAddr>,
    shared: Arc<Mutex<Shared>>,
    handles: BTreeMap<u64, NodeHandle>,
}

impl Cluster {
    fn start() -> Cluster {
        let addrs = free_addrs(3);
        let mut c = Cluster {
            tmp: tempfile::tempdir().unwrap(),
            nodes: (1..=3).zip(addrs).collect(),
            shared: Arc::default(),
            handles: BTreeMap::new(),
        };
        for id in 1..=3 {
            c.restart(id);
        }
        wait_for("a leader", MINUTE, || leader(&c.shared).is_some());
        c
    }

    /// Starts node `id` on its directories.
    fn restart(&mut self, id: u64) {
        let dir = self.tmp.path().join(format!("node-{id}"));
        let node = start_node(id, self.nodes.clone(), dir, self.shared.clone());
        self.handles.insert(id, node);
    }

    fn stop(&mut self, id: u64, how: u8) {
        self.handles.remove(&id).expect("a running node").stop(how);
    }

    fn stop_all(self) {
        for h in self.handles.into_values() {
            h.stop(STOP);
        }
    }
}

fn leader(shared: &Mutex<Shared>) -> Option<u64> {
    shared
        .lock()
        .unwrap()
        .status
        .iter()
        .find(|(_, (r, _))| *r == StateRole::Leader)
        .map(|(id, _)| *id)
}

fn propose(shared: &Mutex<Shared>, values: std::ops::Range<u64>) {
    shared.lock().unwrap().proposals.extend(values);
}

#[test]
fn a_three_node_group_over_tcp_keeps_every_acknowledged_value() {
    let mut c = Cluster::start();
    let (shared, nodes, minute) = (c.shared.clone(), c.nodes.clone(), MINUTE);

    propose(&shared, 0..500);
    wait_for("500 acknowledgements", minute, || settled(&shared, 500));

    // A client that is no node: garbage, then a HELLO of another cluster. Both are cut off.
    for bytes in [
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        hello_of_another_cluster(),
    ] {
        let mut c = std::net::TcpStream::connect(nodes[&1]).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(&bytes).unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(
            c.read(&mut buf).unwrap(),
            0,
            "the node closes the connection"
        );
    }

    // The leader stops; the other two go on.
    let old = leader(&shared).expect("a leader");
    c.stop(old, STOP);
    propose(&shared, 500..1_000);
    wait_for(
        "1,000 acknowledgements without the old leader",
        minute,
        || settled(&shared, 1_000),
    );
    let new = leader(&shared).expect("a new leader");
    assert_ne!(new, old);

    // The old leader comes back on its directories and catches up.
    c.restart(old);
    wait_for("every node to hold the same values", minute, || {
        all_alike(&shared)
    });
    check_values(&shared);
    c.stop_all();
}

/// Whether three nodes run and hold the same number of values, every acknowledged one at
/// least.
fn all_alike(shared: &Mutex<Shared>) -> bool {
    let s = shared.lock().unwrap();
    let first = s.status.values().next().map(|(_, v)| v.len());
    s.status.len() == 3
        && first >= Some(s.acked.len())
        && s.status.values().all(|(_, v)| Some(v.len()) == first)
}

/// Whether every one of the first `n` values is acknowledged, or was held by a node that
/// stopped (and so may or may not be in the log).
fn settled(shared: &Mutex<Shared>, n: usize) -> bool {
    let s = shared.lock().unwrap();
    s.proposals.is_empty() && s.acked.union(&s.uncertain).count() == n
}

/// Every node holds the same values in the same order: each once, every acknowledged one,
/// and nothing that was not proposed.
fn check_values(shared: &Mutex<Shared>) {
    let s = shared.lock().unwrap();
    let first = &s.status.values().next().unwrap().1;
    for (_, values) in s.status.values() {
        assert_eq!(
            values, first,
            "every node holds the same values in the same order"
        );
    }
    let unique: BTreeSet<u64> = first.iter().copied().collect();
    assert_eq!(unique.len(), first.len(), "no value twice");
    assert!(
        s.acked.is_subset(&unique),
        "every acknowledged value is kept"
    );
    let maybe: BTreeSet<u64> = s.acked.union(&s.uncertain).copied().collect();
    assert!(unique.is_subset(&maybe), "nothing that was not proposed");
}

/// The longest time between two acknowledgements from `from` on.
fn longest_stall(shared: &Mutex<Shared>, from: Instant) -> Duration {
    let s = shared.lock().unwrap();
    let mut times: Vec<Instant> = s.acked_at.iter().copied().filter(|t| *t >= from).collect();
    times.sort();
    times
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default()
}

/// Keeps proposing a value every 2 ms until told to stop; returns how many it proposed.
fn steady_writer(shared: Arc<Mutex<Shared>>, done: Arc<AtomicU8>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut v = 0;
        while done.load(Ordering::SeqCst) == RUN {
            shared.lock().unwrap().proposals.push_back(v);
            v += 1;
            std::thread::sleep(Duration::from_millis(2));
        }
        v
    })
}

#[test]
fn a_leader_that_hands_off_before_stopping_stalls_writes_briefly() {
    let mut c = Cluster::start();
    let (shared, minute) = (c.shared.clone(), MINUTE);
    let done = Arc::new(AtomicU8::new(RUN));
    let writer = steady_writer(shared.clone(), done.clone());
    wait_for("writes flowing", minute, || {
        shared.lock().unwrap().acked.len() > 200
    });

    // The leader hands its leadership off and stops. Later, for comparison, the next
    // leader stops at once, with no hand-off, and the rest wait out an election timeout.
    let handed = Instant::now();
    let old = leader(&shared).expect("a leader");
    c.stop(old, HAND_OFF);
    std::thread::sleep(Duration::from_millis(1_500));
    let stall_hand_off = longest_stall(&shared, handed);
    let second = leader(&shared).expect("a new leader");
    assert_ne!(second, old);

    // The old leader comes back; then the new leader is stopped abruptly.
    c.restart(old);
    wait_for("three nodes", minute, || {
        shared.lock().unwrap().status.len() == 3
    });
    std::thread::sleep(Duration::from_millis(300));
    let abrupt = Instant::now();
    let third = leader(&shared).expect("a leader");
    c.stop(third, STOP);
    std::thread::sleep(Duration::from_millis(1_500));
    let stall_abrupt = longest_stall(&shared, abrupt);

    done.store(STOP, Ordering::SeqCst);
    let proposed = writer.join().unwrap() as usize;
    wait_for("every write settled", minute, || settled(&shared, proposed));
    eprintln!(
        "longest stall of acknowledgements: {stall_hand_off:?} after a hand-off, \
         {stall_abrupt:?} after an abrupt stop ({proposed} values proposed)"
    );
    assert!(
        stall_hand_off < Duration::from_secs(1),
        "a hand-off stalled writes for {stall_hand_off:?}"
    );
    c.restart(third);
    wait_for("every node to hold the same values", minute, || {
        all_alike(&shared)
    });
    check_values(&shared);
    c.stop_all();
}

/// Cuts `node` off from every other node, both ways, through the transports' fault layer.
fn isolate(shared: &Mutex<Shared>, node: u64, others: impl Iterator<Item = u64>, cut: bool) {
    let mut s = shared.lock().unwrap();
    for other in others.filter(|&o| o != node) {
        for pair in [(node, other), (other, node)] {
            if cut {
                s.cut.insert(pair);
            } else {
                s.cut.remove(&pair);
            }
        }
    }
}

#[test]
fn an_isolated_leader_is_replaced_and_its_uncommitted_writes_dropped() {
    let c = Cluster::start();
    let (shared, minute) = (c.shared.clone(), MINUTE);
    let done = Arc::new(AtomicU8::new(RUN));
    let writer = steady_writer(shared.clone(), done.clone());
    wait_for("writes flowing", minute, || {
        shared.lock().unwrap().acked.len() > 200
    });

    // The leader is cut off from both followers. They elect one of themselves, and writes
    // go on through it; the old leader can commit nothing alone.
    let old = leader(&shared).expect("a leader");
    let cut_at = Instant::now();
    isolate(&shared, old, 1..=3, true);
    wait_for("a leader on the majority side", minute, || {
        let s = shared.lock().unwrap();
        s.status
            .iter()
            .any(|(id, (r, _))| *id != old && *r == StateRole::Leader)
    });
    let acked_then = shared.lock().unwrap().acked.len();
    wait_for("writes through the new leader", minute, || {
        shared.lock().unwrap().acked.len() > acked_then + 200
    });
    let stall = longest_stall(&shared, cut_at);

    // The link mends: the old leader steps down, its uncommitted tail is replaced, and it
    // catches up.
    isolate(&shared, old, 1..=3, false);
    std::thread::sleep(Duration::from_millis(500));
    done.store(STOP, Ordering::SeqCst);
    let proposed = writer.join().unwrap() as usize;
    wait_for("every write settled", minute, || settled(&shared, proposed));
    wait_for("every node to hold the same values", minute, || {
        all_alike(&shared)
    });
    check_values(&shared);
    let uncertain = shared.lock().unwrap().uncertain.len();
    assert!(
        uncertain > 0,
        "the isolated leader answered what it took, while it still led, as uncertain"
    );
    eprintln!(
        "isolating the leader stalled acknowledgements for at most {stall:?} \
         ({proposed} values proposed, {uncertain} answered uncertain)"
    );
    c.stop_all();
}

fn hello_of_another_cluster() -> Vec<u8> {
    let mut out = Vec::new();
    chorus_replication::wire::encode(
        &chorus_replication::wire::Frame::Hello {
            node: 2,
            cluster: 12345,
        },
        &mut out,
    )
    .unwrap();
    out
}
