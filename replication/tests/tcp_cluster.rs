//! Three nodes of one Raft group, each on a glommio executor of its own, with their logs on
//! real directories and their messages over real loopback TCP through the node transport.
//! Values are proposed through whichever node leads; the leader is then stopped, the other
//! two elect another and go on, and the stopped node is restarted on its directories and
//! catches up. Every acknowledged value ends on every node, once, in the same order.
//! A client that is not a node of the cluster, or speaks garbage, is cut off, and the
//! group does not notice.

use chorus_log::{DiskStorage, LogConfig};
use chorus_replication::transport::{Handlers, Membership, Transport};
use chorus_replication::{Group, StateMachine};
use raft::eraftpb::{ConfState, Entry, Message, MessageType};
use raft::{Config, SnapshotStatus, StateRole};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
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
    /// Each node's role and applied values.
    status: BTreeMap<u64, (StateRole, Vec<u64>)>,
}

struct Values {
    values: Vec<u64>,
    mine: Rc<RefCell<BTreeSet<u64>>>,
    shared: Arc<Mutex<Shared>>,
}

impl StateMachine for Values {
    fn apply(&mut self, e: &Entry) {
        if e.data.is_empty() {
            return;
        }
        let v = u64::from_le_bytes(e.data[..].try_into().expect("8 bytes"));
        self.values.push(v);
        if self.mine.borrow_mut().remove(&v) {
            self.shared.lock().unwrap().acked.insert(v);
        }
    }
    fn snapshot(&self) -> Vec<u8> {
        self.values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }
    fn restore(&mut self, _index: u64, data: &[u8]) {
        self.values = data
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
    }
}

struct NodeHandle {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

fn free_addrs(n: usize) -> Vec<SocketAddr> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners.iter().map(|l| l.local_addr().unwrap()).collect()
}

fn start_node(
    id: u64,
    nodes: BTreeMap<u64, SocketAddr>,
    dir: PathBuf,
    shared: Arc<Mutex<Shared>>,
) -> NodeHandle {
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let thread = std::thread::spawn(move || {
        glommio::LocalExecutorBuilder::default()
            .make()
            .expect("executor")
            .run(node_main(id, nodes, dir, shared, stop2));
    });
    NodeHandle { stop, thread }
}

async fn node_main(
    id: u64,
    nodes: BTreeMap<u64, SocketAddr>,
    dir: PathBuf,
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
) {
    let listener = loop {
        // A restarted node may find its port still held for a moment.
        match glommio::net::TcpListener::bind(nodes[&id]) {
            Ok(l) => break l,
            Err(_) => glommio::timer::sleep(Duration::from_millis(20)).await,
        }
    };
    let inbox: Rc<RefCell<Vec<Message>>> = Rc::default();
    let lost: Rc<RefCell<Vec<(u64, Message)>>> = Rc::default();
    let (i2, l2) = (inbox.clone(), lost.clone());
    let transport = Transport::start(
        Membership {
            me: id,
            nodes: nodes.clone(),
        },
        listener,
        Handlers {
            deliver: Box::new(move |_, group, m| {
                assert_eq!(group, GROUP);
                i2.borrow_mut().push(m);
            }),
            on_lost: Box::new(move |peer, msgs| {
                l2.borrow_mut()
                    .extend(msgs.into_iter().map(|(_, m)| (peer, m)))
            }),
        },
    );
    let mine: Rc<RefCell<BTreeSet<u64>>> = Rc::default();
    let machine = Values {
        values: Vec::new(),
        mine: mine.clone(),
        shared: shared.clone(),
    };
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
    let mut group = Group::open(
        DiskStorage::open_dir(dir.join("state")).unwrap(),
        DiskStorage::open_dir(dir.join("log")).unwrap(),
        LogConfig::default(),
        &conf,
        config,
        machine,
        200,
    )
    .await
    .expect("open the group");
    let mut last_tick = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        glommio::timer::sleep(Duration::from_millis(2)).await;
        for m in inbox.borrow_mut().drain(..) {
            let _ = group.raw().step(m);
        }
        for (peer, m) in lost.borrow_mut().drain(..) {
            group.raw().report_unreachable(peer);
            if m.get_msg_type() == MessageType::MsgSnapshot {
                group.raw().report_snapshot(peer, SnapshotStatus::Failure);
            }
        }
        if last_tick.elapsed() >= Duration::from_millis(20) {
            last_tick = Instant::now();
            group.raw().tick();
        }
        let role = group.raw_ref().raft.state;
        if role == StateRole::Leader {
            let batch: Vec<u64> = {
                let mut s = shared.lock().unwrap();
                let n = s.proposals.len().min(100);
                s.proposals.drain(..n).collect()
            };
            for v in batch {
                mine.borrow_mut().insert(v);
                if group
                    .raw()
                    .propose(Vec::new(), v.to_le_bytes().to_vec())
                    .is_err()
                {
                    mine.borrow_mut().remove(&v);
                    shared.lock().unwrap().proposals.push_back(v);
                }
            }
        }
        let t = transport.clone();
        while group
            .on_ready(&mut |msgs| {
                for m in msgs {
                    t.send(GROUP, m);
                }
            })
            .await
            .expect("storage")
        {}
        let values = group.machine().values.clone();
        shared
            .lock()
            .unwrap()
            .status
            .insert(id, (group.raw_ref().raft.state, values));
    }
    transport.stop();
    // Proposals this node took but did not get committed go back to the queue.
    let mut s = shared.lock().unwrap();
    for v in mine.borrow().iter() {
        if !s.acked.contains(v) {
            s.proposals.push_back(*v);
        }
    }
    s.status.remove(&id);
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
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
    let tmp = tempfile::tempdir().unwrap();
    let addrs = free_addrs(3);
    let nodes: BTreeMap<u64, SocketAddr> = (1..=3).zip(addrs).collect();
    let shared = Arc::new(Mutex::new(Shared::default()));
    let mut handles: BTreeMap<u64, NodeHandle> = BTreeMap::new();
    for id in 1..=3 {
        let dir = tmp.path().join(format!("node-{id}"));
        handles.insert(id, start_node(id, nodes.clone(), dir, shared.clone()));
    }
    let minute = Duration::from_secs(60);
    wait_for("a leader", minute, || leader(&shared).is_some());

    propose(&shared, 0..500);
    wait_for("500 acknowledgements", minute, || {
        shared.lock().unwrap().acked.len() == 500
    });

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
    let h = handles.remove(&old).unwrap();
    h.stop.store(true, Ordering::SeqCst);
    h.thread.join().unwrap();
    propose(&shared, 500..1_000);
    wait_for(
        "1,000 acknowledgements without the old leader",
        minute,
        || shared.lock().unwrap().acked.len() == 1_000,
    );
    let new = leader(&shared).expect("a new leader");
    assert_ne!(new, old);

    // The old leader comes back on its directories and catches up.
    let dir = tmp.path().join(format!("node-{old}"));
    handles.insert(old, start_node(old, nodes.clone(), dir, shared.clone()));
    wait_for("every node to hold every value", minute, || {
        let s = shared.lock().unwrap();
        s.status.len() == 3 && s.status.values().all(|(_, v)| v.len() == 1_000)
    });
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
    assert_eq!(unique, s.acked, "exactly the acknowledged values");
    drop(s);
    for h in handles.into_values() {
        h.stop.store(true, Ordering::SeqCst);
        h.thread.join().unwrap();
    }
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
