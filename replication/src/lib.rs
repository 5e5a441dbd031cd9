//! `chorus-replication`: Chorus partitions as Raft groups on raft-rs (TiKV's `raft`).
//!
//! Consensus is raft-rs's: its `RawNode` decides, sans I/O. This crate owns what raft-rs
//! leaves to its user. So far that is the durable side of one group:
//! - [`Journal`]: the Raft entries of every group of a node's shard in one `chorus-log`
//!   log, so that the groups' `Ready`s share fsyncs; replayed per group at open, its
//!   segments deleted once no group keeps an entry in them;
//! - [`RaftLog`]: one group's entries (in memory, durable in the journal), its state in a
//!   two-slot [`state::StateFile`], and its latest snapshot; it is the `raft::Storage` the
//!   `RawNode` reads;
//! - [`Group`]: one group on one node, its `Ready` loop in the order raft-rs asks for
//!   (entries before hard state, votes and acknowledgements only after both), applying
//!   committed entries to a [`StateMachine`] and compacting behind its snapshots;
//! - [`Replica`]: a group as a task on the shard that owns it: raft-rs ticked on a timer,
//!   messages stepped as they come, the `Ready` loop run, and each proposal answered once
//!   its entry is applied (or it no longer can be);
//! - [`ReplicatedLog`]: a partition's event log as its group's state machine: a commit
//!   is one entry, and every replica appends its events at the same offsets once it is
//!   committed;
//! - [`ClusterEnv`]: the engine's environment on a cluster node, whose channel
//!   partitions commit through their groups ([`ReplicatedDurability`]) and whose blobs
//!   (message bodies over 64 KiB) are stored on a majority of the nodes before the events
//!   that name them, and fetched from a peer by a node that lacks one ([`blobs`]);
//! - [`Node`]: the groups one node holds (multi-Raft): a replica of each group placement
//!   puts there, one transport shared by all, messages routed by group, leaderships
//!   moved to each group's preferred node;
//! - [`Board`]: what a node's shards know of the cluster (leaders, voters, peers last heard
//!   from), for the gateway to show;
//! - [`placement`]: which nodes hold each partition (3, or all if fewer) and which should
//!   lead it, spread evenly, computed alike by every node;
//! - [`wire`]: the node-to-node frames (versioned, length-prefixed, checksummed, a batch of
//!   Raft messages per frame), and their decoder;
//! - [`transport`]: Raft messages between nodes over TCP on glommio, one connection per
//!   peer, a frame per batch;
//! - [`clock`]: the time a replica runs on, the system's or a simulation's;
//! - [`quiet_logger`]: raft-rs logs through `slog`, which Chorus does not use.
//!
//! Its deterministic simulation (`tests/raft_sim.rs`) runs groups of 3 and 5 nodes over
//! the simulated disk and a simulated network that drops, delays, reorders, duplicates and
//! partitions, with crashes, and checks that every acknowledged entry is kept, identically
//! and in the same order, on every node.

pub mod blobs;
pub mod board;
pub mod calls;
pub mod clock;
pub mod engine_env;
pub mod event_log;
pub mod group;
pub mod journal;
pub mod members;
pub mod membership;
pub mod node;
pub mod placement;
pub mod raft_log;
pub mod replica;
pub mod state;
pub mod transport;
pub mod wire;

pub use blobs::ReplicatedBlobs;
pub use board::{Board, GroupView};
pub use clock::{Clock, SharedClock, SystemClock};
pub use engine_env::{ClusterEnv, ReplicatedDurability};
pub use event_log::{EventLogMachine, ReplicatedLog};
pub use group::{Applied, Group, StateMachine};
pub use journal::Journal;
pub use node::{Node, NodeConfig, OnStorageError, EVENTS_PREALLOCATE_BYTES, PREALLOCATE_BYTES};
pub use raft_log::{RaftLog, RaftLogError};
pub use replica::{ProposeError, Replica};
pub use state::{GroupState, StateFile};

/// A logger for raft-rs that drops everything.
pub fn quiet_logger() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}
