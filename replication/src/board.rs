//! What a node's shards know of the cluster, for whoever asks (`GET /api/v1/cluster`):
//! each group's leader, voters and learners as this node's replica last saw them, and when each peer
//! was last heard from. The shards write it (every [`PUBLISH_EVERY`]); anyone may read it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often a node's shards copy what they know onto the board.
pub const PUBLISH_EVERY: Duration = Duration::from_millis(250);

/// A group as this node sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupView {
    /// Its leader, if this node knows of one.
    pub leader: Option<u64>,
    /// Its voters.
    pub voters: Vec<u64>,
    /// Its learners: nodes that receive and apply every committed entry without a vote
    /// (every node of the cluster but the voters, and a node being added).
    pub learners: Vec<u64>,
}

#[derive(Default)]
struct State {
    groups: BTreeMap<u64, GroupView>,
    heard: BTreeMap<u64, Instant>,
}

/// The board: `Send` and `Sync`, shared by a node's shards and the gateway.
#[derive(Clone, Default)]
pub struct Board(Arc<Mutex<State>>);

impl std::fmt::Debug for Board {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Board")
    }
}

impl Board {
    /// Records how a group looks from here.
    pub fn set_group(&self, group: u64, view: GroupView) {
        self.0.lock().expect("board").groups.insert(group, view);
    }

    /// Records that `peer` was heard from at `at` (a later time wins).
    pub fn heard(&self, peer: u64, at: Instant) {
        let mut s = self.0.lock().expect("board");
        let t = s.heard.entry(peer).or_insert(at);
        *t = (*t).max(at);
    }

    /// Every group seen, by id.
    pub fn groups(&self) -> BTreeMap<u64, GroupView> {
        self.0.lock().expect("board").groups.clone()
    }

    /// When `peer` was last heard from, if ever.
    pub fn last_heard(&self, peer: u64) -> Option<Instant> {
        self.0.lock().expect("board").heard.get(&peer).copied()
    }
}
