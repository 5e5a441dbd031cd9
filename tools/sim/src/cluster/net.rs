//! The simulated network between the nodes of a simulated cluster: every Raft message,
//! and every fetch of events a lagging replica makes, goes through it.
//!
//! A message is lost, delayed, duplicated (and so reordered) at the seed's choice, and never
//! crosses a partition or reaches a node that is down. A message that could not go, or was
//! lost, is reported to its sender's replica most of the time, as the node transport
//! reports what it could not write (`Replica::lost`); sometimes not, as when the frame was
//! written and the connection died after it.

use crate::executor::Executor;
use chorus_replication::Replica;
use raft::eraftpb::Message;
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

/// How often the network misbehaves, in 1/1000.
#[derive(Clone, Copy, Debug)]
pub struct Weather {
    /// Chance that a message is lost.
    pub drop_permille: u32,
    /// Chance that a message arrives twice.
    pub dup_permille: u32,
    /// The longest a message takes, in microseconds.
    pub delay_us_max: u64,
    /// Chance that a loss is not reported to the sender.
    pub unreported_permille: u32,
}

/// A calm network: nothing lost, short delays (the convergence phase).
pub const CALM: Weather = Weather {
    drop_permille: 0,
    dup_permille: 0,
    delay_us_max: 500,
    unreported_permille: 0,
};

/// What the network did.
#[derive(Debug, Default, Clone, Copy)]
pub struct NetStats {
    pub sent: u64,
    pub dropped: u64,
    pub duplicated: u64,
    pub fetches: u64,
}

/// The network; clones of the `Rc` share it.
pub struct Net {
    ex: Executor,
    /// The replicas of the nodes that are up, by (node, group).
    replicas: RefCell<BTreeMap<(u64, u64), Rc<Replica>>>,
    /// `side[node - 1]`: the side of the partition each node is on.
    side: RefCell<Vec<u8>>,
    /// A node that reaches every side.
    bridge: Cell<Option<u64>>,
    weather: Cell<Weather>,
    stats: Cell<NetStats>,
}

impl Net {
    /// A network of `nodes` nodes, all on one side.
    pub fn new(ex: Executor, nodes: u64, weather: Weather) -> Rc<Net> {
        Rc::new(Net {
            ex,
            replicas: RefCell::default(),
            side: RefCell::new(vec![0; nodes as usize]),
            bridge: Cell::new(None),
            weather: Cell::new(weather),
            stats: Cell::default(),
        })
    }

    /// A node's replica of `group` is up and takes messages.
    pub fn attach(&self, node: u64, group: u64, replica: Rc<Replica>) {
        self.replicas.borrow_mut().insert((node, group), replica);
    }

    /// A node is down: nothing reaches it.
    pub fn detach(&self, node: u64) {
        self.replicas.borrow_mut().retain(|(n, _), _| *n != node);
    }

    /// Cuts the cluster: node `n` goes to side `sides[n - 1]`, and `bridge`, if any,
    /// reaches every side.
    pub fn partition(&self, sides: Vec<u8>, bridge: Option<u64>) {
        *self.side.borrow_mut() = sides;
        self.bridge.set(bridge);
    }

    /// Cuts the cluster as the seed draws: halves (any split), or one node alone; with
    /// `bridges`, sometimes a node that reaches both sides.
    pub fn cut_at_random(&self, bridges: bool) {
        let n = self.side.borrow().len() as u64;
        let mut sides: Vec<u8> = (0..n).map(|_| self.ex.below(2) as u8).collect();
        let bridge = (bridges && self.ex.chance(300)).then(|| 1 + self.ex.below(n));
        if self.ex.chance(300) {
            sides = vec![0; n as usize];
            sides[self.ex.below(n) as usize] = 1;
        }
        self.partition(sides, bridge);
    }

    /// Every node reaches every other again.
    pub fn heal(&self) {
        self.side.borrow_mut().iter_mut().for_each(|s| *s = 0);
        self.bridge.set(None);
    }

    pub fn set_weather(&self, weather: Weather) {
        self.weather.set(weather);
    }

    pub fn stats(&self) -> NetStats {
        self.stats.get()
    }

    fn count(&self, f: impl FnOnce(&mut NetStats)) {
        let mut s = self.stats.get();
        f(&mut s);
        self.stats.set(s);
    }

    /// Whether `from` can reach `to` now (both sides up, not partitioned apart).
    fn reaches(&self, from: u64, to: u64) -> bool {
        let side = self.side.borrow();
        let same = side.get(from as usize - 1) == side.get(to as usize - 1);
        let linked = same || self.bridge.get() == Some(from) || self.bridge.get() == Some(to);
        linked && self.replicas.borrow().keys().any(|(n, _)| *n == to)
    }

    /// Whether node `node`'s replica of `group` is up and leads, as of its last turn.
    pub fn leads(&self, node: u64, group: u64) -> bool {
        self.replica(node, group)
            .is_some_and(|r| r.status().role == raft::StateRole::Leader)
    }

    fn replica(&self, node: u64, group: u64) -> Option<Rc<Replica>> {
        self.replicas.borrow().get(&(node, group)).cloned()
    }

    /// Sends `msg` of `group` from `from` to `msg.to`.
    pub fn send(self: &Rc<Net>, from: u64, group: u64, msg: Message) {
        let w = self.weather.get();
        self.count(|s| s.sent += 1);
        let to = msg.to;
        if !self.reaches(from, to) || self.ex.chance(w.drop_permille) {
            self.count(|s| s.dropped += 1);
            if !self.ex.chance(w.unreported_permille) {
                // Reported later, as a transport notices a broken connection.
                let (net, delay) = (self.clone(), self.delay(w));
                drop(self.ex.spawn(async move {
                    net.ex.sleep(delay).await;
                    if let Some(r) = net.replica(from, group) {
                        r.lost(to, msg);
                    }
                }));
            }
            return;
        }
        let copies = if self.ex.chance(w.dup_permille) {
            self.count(|s| s.duplicated += 1);
            2
        } else {
            1
        };
        for _ in 0..copies {
            let (net, msg, delay) = (self.clone(), msg.clone(), self.delay(w));
            drop(self.ex.spawn(async move {
                net.ex.sleep(delay).await;
                if net.reaches(from, to) {
                    if let Some(r) = net.replica(to, group) {
                        r.step(msg);
                    }
                }
            }));
        }
    }

    fn delay(&self, w: Weather) -> Duration {
        Duration::from_micros(self.ex.below(w.delay_us_max + 1))
    }

    /// `asker` fetches `group`'s events `from..to` from `peer` (what
    /// `Transport::fetch` does over a connection of its own).
    pub async fn fetch(
        self: Rc<Net>,
        asker: u64,
        peer: u64,
        group: u64,
        from: u64,
        to: u64,
    ) -> std::io::Result<Vec<u8>> {
        self.count(|s| s.fetches += 1);
        let w = self.weather.get();
        self.ex.sleep(self.delay(w)).await;
        let unreachable = || std::io::Error::other("the peer cannot be reached");
        if !self.reaches(asker, peer) || self.ex.chance(w.drop_permille) {
            return Err(unreachable());
        }
        // A paused peer answers once it resumes.
        while self.ex.is_paused(peer) {
            self.ex.sleep(Duration::from_millis(1)).await;
        }
        let source = self.replica(peer, group).ok_or_else(unreachable)?;
        let batch = source.serve_events(from, to).await;
        self.ex.sleep(self.delay(w)).await;
        if !self.reaches(peer, asker) {
            return Err(unreachable());
        }
        Ok(batch)
    }
}
