//! What the tests that run nodes on real sockets share.
#![allow(dead_code)] // each test crate uses part of it

use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// How long any one wait of these tests may take.
pub const MINUTE: Duration = Duration::from_secs(60);

/// `n` loopback addresses free a moment ago.
pub fn free_addrs(n: usize) -> Vec<SocketAddr> {
    chorus_replication::engine_env::free_loopback_addrs(n, 1)
}

/// Waits until `ok`, failing the test after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Binds a node's listener, waiting while a restarted node finds its port still held.
pub async fn bind(addr: SocketAddr) -> glommio::net::TcpListener {
    loop {
        match glommio::net::TcpListener::bind(addr) {
            Ok(l) => break l,
            Err(_) => glommio::timer::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// A state machine of 8-byte values, kept where the test thread sees them: `place` finds
/// this node's list (of this group) in the shared state.
pub struct Values<S, F> {
    shared: std::sync::Arc<std::sync::Mutex<S>>,
    place: F,
}

impl<S, F: Fn(&mut S) -> &mut Vec<u64>> Values<S, F> {
    pub fn new(shared: std::sync::Arc<std::sync::Mutex<S>>, place: F) -> Values<S, F> {
        Values { shared, place }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Vec<u64>) -> T) -> T {
        let mut s = self.shared.lock().unwrap();
        f((self.place)(&mut s))
    }
}

impl<S, F: Fn(&mut S) -> &mut Vec<u64>> chorus_replication::StateMachine for Values<S, F> {
    async fn apply(
        &mut self,
        entries: &[raft::eraftpb::Entry],
    ) -> Result<(), chorus_replication::RaftLogError> {
        let applied = entries
            .iter()
            .filter(|e| e.get_entry_type() == raft::eraftpb::EntryType::EntryNormal)
            .filter(|e| !e.data.is_empty())
            .map(|e| u64::from_le_bytes(e.data[..].try_into().expect("8 bytes")));
        self.with(|values| values.extend(applied));
        Ok(())
    }

    fn snapshot(&self) -> Vec<u8> {
        self.with(|values| values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    fn restore(&mut self, _index: u64, data: &[u8]) {
        let restored = data
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        self.with(|values| *values = restored);
    }
}

/// How a node runs: on, stopping at once, or stopping once it handed off leadership.
pub const RUN: u8 = 0;
pub const STOP: u8 = 1;
pub const HAND_OFF: u8 = 2;

/// A node running on a thread of its own, on a glommio executor.
pub struct NodeHandle {
    stop: std::sync::Arc<std::sync::atomic::AtomicU8>,
    thread: std::thread::JoinHandle<()>,
}

impl NodeHandle {
    /// Runs the future `node(stop)` makes, where `stop` says how it is to end.
    pub fn spawn<F: std::future::Future<Output = ()> + 'static>(
        node: impl FnOnce(std::sync::Arc<std::sync::atomic::AtomicU8>) -> F + Send + 'static,
    ) -> NodeHandle {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicU8::new(RUN));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            glommio::LocalExecutorBuilder::default()
                .make()
                .expect("executor")
                .run(node(stop2));
        });
        NodeHandle { stop, thread }
    }

    /// Tells the node to stop (`STOP` or `HAND_OFF`) and waits until it has.
    pub fn stop(self, how: u8) {
        self.stop.store(how, std::sync::atomic::Ordering::SeqCst);
        self.thread.join().unwrap();
    }
}

/// The proposals a node takes on this turn: up to `max` from the front, if it leads.
pub fn take_if_leading<T>(
    queue: &mut std::collections::VecDeque<T>,
    role: raft::StateRole,
    max: usize,
) -> Vec<T> {
    let n = if role == raft::StateRole::Leader {
        queue.len().min(max)
    } else {
        0
    };
    queue.drain(..n).collect()
}

/// A node of one group whose state machine is an event log in `dir/events`: the node, and
/// the group's proposer.
pub async fn event_log_node(
    config: chorus_replication::NodeConfig,
    dir: std::path::PathBuf,
    listener: glommio::net::TcpListener,
) -> (
    chorus_replication::Node,
    std::rc::Rc<chorus_replication::ReplicatedLog<chorus_log::DiskStorage>>,
) {
    use chorus_log::{DiskRoot, DiskStorage, Log, LogConfig};
    use chorus_replication::{Node, ReplicatedLog};
    use std::cell::RefCell;
    use std::rc::Rc;
    let (events, _) = Log::open(
        DiskStorage::open_dir(dir.join("events")).unwrap(),
        LogConfig::default(),
    )
    .await
    .expect("the event log");
    let events = RefCell::new(Some(events));
    let rlog: Rc<RefCell<Option<ReplicatedLog<DiskStorage>>>> = Rc::default();
    let r2 = rlog.clone();
    let node = Node::start(config, DiskRoot::new(dir), listener, move |_, replica| {
        let log = events.borrow_mut().take().expect("one group");
        let (proposer, machine) = ReplicatedLog::new(replica.clone(), log);
        *r2.borrow_mut() = Some(proposer);
        machine
    })
    .await
    .expect("the node starts");
    let rlog = rlog.borrow_mut().take().expect("the group is on this node");
    (node, Rc::new(rlog))
}

/// The events of batch `k`: one to four, each naming the batch and its place.
pub fn batch(k: u64) -> Vec<Vec<u8>> {
    (0..k % 4 + 1)
        .map(|j| format!("{k}.{j}").into_bytes())
        .collect()
}

/// Commits batch `k` through `rlog` (its events stamped `k`): where its events went.
pub async fn commit_batch<S: chorus_log::Storage + 'static>(
    rlog: &chorus_replication::ReplicatedLog<S>,
    k: u64,
) -> Result<std::ops::Range<u64>, chorus_replication::ProposeError> {
    let payloads = batch(k);
    let events: Vec<chorus_log::Entry<'_>> = payloads
        .iter()
        .map(|p| chorus_log::Entry {
            timestamp_us: k,
            payload: p,
        })
        .collect();
    rlog.commit(&events).await
}

/// Every record of `log`, by offset.
pub async fn records<S: chorus_log::Storage>(log: &chorus_log::Log<S>) -> Vec<(u64, Vec<u8>)> {
    let mut records = Vec::new();
    let mut at = log.first_offset();
    while at < log.next_offset() {
        for r in log.read(at, 1 << 20).await.expect("read the event log") {
            at = r.offset + 1;
            records.push((r.offset, r.payload.to_vec()));
        }
    }
    records
}

/// raft-rs's configuration of node 1 and a membership of node 1 alone: a group that
/// elects itself at its first campaign.
pub fn single_voter() -> (raft::Config, raft::eraftpb::ConfState) {
    let config = raft::Config {
        id: 1,
        election_tick: 10,
        heartbeat_tick: 2,
        ..raft::Config::default()
    };
    let one = raft::eraftpb::ConfState {
        voters: vec![1],
        ..Default::default()
    };
    (config, one)
}
