//! The cluster's nodes as last asked (an operator adding or removing a node), shared by
//! every shard of a node and its server.
//!
//! A node starts knowing the addresses `--cluster` gives and no request. Asks are
//! numbered by the embedder in one order for the whole cluster (the server keeps them in
//! its replicated directory), and a node applies only an ask newer than the one it has:
//! one replaying its directory after a restart never goes back to an older one. When
//! asked to place the cluster on a set of nodes ([`Members::apply`]), every shard's
//! [`crate::Node`]
//! sees the new version within [`crate::board::PUBLISH_EVERY`]: its transport learns the
//! addresses it lacked ([`crate::transport::Transport::add_peer`]; an address once known
//! is kept, a removed node's too), and its groups are asked to move there
//! ([`crate::Node::place_on`]). `Send` and `Sync`: the server sets it from a request
//! thread, the shards read it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

/// What [`Members::read`] gives: the version, every address known, the nodes asked.
pub type Asked = (u64, BTreeMap<u64, SocketAddr>, Option<Vec<u64>>);

/// See the module's documentation.
#[derive(Clone, Debug, Default)]
pub struct Members(Arc<Mutex<State>>);

#[derive(Debug, Default)]
struct State {
    /// Grows with each ask applied.
    version: u64,
    /// The number of the ask applied, if any.
    ask: Option<u64>,
    /// Every node ever known, by id: its cluster address.
    addresses: BTreeMap<u64, SocketAddr>,
    /// The nodes last asked for, if any.
    asked: Option<Vec<u64>>,
}

impl Members {
    /// Knows `addresses` (`--cluster`'s), with nothing asked yet.
    pub fn new(addresses: BTreeMap<u64, SocketAddr>) -> Members {
        Members(Arc::new(Mutex::new(State {
            version: 0,
            ask: None,
            addresses,
            asked: None,
        })))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies ask number `ask`, to place the cluster on `nodes`, unless this node applied
    /// it or a later one already (then `false`): their addresses are learned (a known node
    /// keeps the address it has) and every group moves there.
    pub fn apply(&self, ask: u64, nodes: &BTreeMap<u64, SocketAddr>) -> bool {
        let mut s = self.state();
        if s.ask.is_some_and(|applied| applied >= ask) {
            return false;
        }
        for (id, addr) in nodes {
            s.addresses.entry(*id).or_insert(*addr);
        }
        s.ask = Some(ask);
        s.asked = Some(nodes.keys().copied().collect());
        s.version += 1;
        true
    }

    /// The number of the ask applied, if any.
    pub fn ask(&self) -> Option<u64> {
        self.state().ask
    }

    /// Every node known, with its address.
    pub fn addresses(&self) -> BTreeMap<u64, SocketAddr> {
        self.state().addresses.clone()
    }

    /// The version, the addresses and the nodes asked, read together.
    pub fn read(&self) -> Asked {
        let s = self.state();
        (s.version, s.addresses.clone(), s.asked.clone())
    }

    /// What [`Members::read`] gives, if the version is past `seen`; otherwise nothing,
    /// and nothing is copied (the shards look every [`crate::board::PUBLISH_EVERY`]).
    pub fn read_if_newer(&self, seen: u64) -> Option<Asked> {
        let s = self.state();
        (s.version > seen).then(|| (s.version, s.addresses.clone(), s.asked.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ask_adds_addresses_keeps_known_ones_and_names_the_nodes() {
        let a = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        let m = Members::new([(1, a(1)), (2, a(2))].into());
        assert_eq!(m.read(), (0, [(1, a(1)), (2, a(2))].into(), None));
        assert!(m.apply(0, &[(2, a(9)), (3, a(3))].into()));
        let (version, addresses, asked) = m.read();
        assert_eq!((version, m.ask()), (1, Some(0)));
        assert_eq!(addresses, [(1, a(1)), (2, a(2)), (3, a(3))].into());
        assert_eq!(asked, Some(vec![2, 3]));
        assert_eq!(m.read_if_newer(1), None);
        assert_eq!(m.read_if_newer(0).map(|r| r.0), Some(1));
    }

    // A node replaying its directory meets older asks after newer ones it applied before
    // its restart: it never goes back to them.
    #[test]
    fn an_ask_no_newer_than_the_one_applied_changes_nothing() {
        let a = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        let m = Members::new([(1, a(1))].into());
        assert!(m.apply(5, &[(1, a(1)), (2, a(2))].into()));
        assert!(!m.apply(4, &[(1, a(1))].into()));
        assert!(!m.apply(5, &[(1, a(1))].into()));
        assert_eq!(m.read().2, Some(vec![1, 2]));
        assert!(m.apply(6, &[(2, a(2))].into()));
        assert_eq!(
            (m.read().0, m.ask(), m.read().2),
            (2, Some(6), Some(vec![2]))
        );
    }
}
