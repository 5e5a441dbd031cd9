//! One Raft group on one node: raft-rs's `RawNode` over a [`RaftLog`], the state machine
//! it feeds, and the `Ready` loop between them.
//!
//! The owner (a shard, or the simulation) ticks the group, steps it with the messages that
//! arrive, proposes, and then calls [`Group::on_ready`], which does what raft-rs asks in
//! the order it asks:
//! 1. send the messages a leader may send before persisting;
//! 2. install a snapshot, if one came;
//! 3. persist the new entries, then the hard state (entries before state);
//! 4. send the messages that needed the persisting (votes, append acknowledgements);
//! 5. advance, send what that released, and apply the committed entries (the Ready's
//!    and what advancing released), a leader that applied its own removal stepping down;
//! 7. compact behind a snapshot once enough was applied since the last one, and after
//!    every membership change (so the snapshot a new member is sent names it).
//!
//! Invariant: a message that promises something durable (a vote, an acknowledgement of
//! entries) is sent only after what it promises is on disk. After any storage error the
//! group must not go on: the caller drops it and reopens from disk.

use crate::journal::Journal;
use crate::raft_log::{RaftLog, RaftLogError};
use chorus_log::Storage;
use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeV2, ConfState, Entry, EntryType, Message};
use raft::{Config, RawNode};
use std::rc::Rc;

/// What a group's committed entries are applied to.
#[allow(async_fn_in_trait)]
pub trait StateMachine {
    /// Applies committed entries (index order, no gaps, across calls too; the leader's
    /// empty entries and configuration changes as well, after the group applied each change
    /// to its membership). When this returns the group counts the entries applied and
    /// answers their proposers. What was applied need not be durable yet: the entries are,
    /// in the group's Raft log, and after a crash the group applies again every entry after
    /// its last snapshot, which it takes only after [`StateMachine::persist`]. An error
    /// stops the group, as a storage error does.
    async fn apply(&mut self, entries: &[Entry]) -> Result<(), RaftLogError>;
    /// The state after every entry applied so far, as snapshot data.
    fn snapshot(&self) -> Vec<u8>;
    /// Makes everything applied so far durable: the group calls it before it takes a
    /// snapshot and compacts its log behind it.
    async fn persist(&mut self) -> Result<(), RaftLogError> {
        Ok(())
    }
    /// Replaces the state with a snapshot's, taken at `index`. What the snapshot names but
    /// this node lacks is fetched by [`StateMachine::catch_up`], which the group calls next.
    fn restore(&mut self, index: u64, data: &[u8]);
    /// Fetches from peers what the last snapshot restored names but this node does not
    /// hold yet, if anything; the group calls it after every restore (and when its task
    /// starts, for the snapshot restored at open). Entries are applied only after it.
    async fn catch_up(&mut self) -> Result<(), RaftLogError> {
        Ok(())
    }
    /// The group's members as a snapshot about to be caught up with names them (before
    /// [`StateMachine::catch_up`]): a node that joined learns its peers so, before its
    /// group has published any.
    fn members(&mut self, _voters: &[u64], _learners: &[u64]) {}
    /// What applying the entry at `index` gave, for its proposer: asked by the group right
    /// after the [`StateMachine::apply`] call that applied it, so the machine keeps only
    /// its last call's (the event log: the offset where the batch's events begin).
    fn outcome(&self, _index: u64) -> u64 {
        0
    }
}

/// Where in each `compact_every` entries group `group` compacts: when its applied index
/// crosses `k × compact_every − phase`. Groups under the same load advance together, so
/// with one phase for all (a compaction every `compact_every` entries after the last) a
/// node's groups all compacted in the same turn, each stopping its group for a state
/// write and freeing what it let go: at 50,000 commits/s on 16 groups, compacting every
/// 10,000 entries stalled every node 100–400 ms each 3.2 s (DESIGN.md, "When a group
/// compacts"). The phases spread the groups over the interval (Fibonacci hashing of the
/// group id), the same on every node.
pub fn compact_phase(group: u64, compact_every: u64) -> u64 {
    if compact_every == 0 {
        return 0;
    }
    // The fraction g·φ mod 1 (as 64 bits) scaled to the interval: consecutive ids land
    // far apart, and any few of them split it about evenly.
    let fraction = group.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((u128::from(fraction) * u128::from(compact_every)) >> 64) as u64
}

/// An entry applied, as [`Group::take_applied`] tells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Applied {
    /// Its Raft index.
    pub index: u64,
    /// The term it was proposed in.
    pub term: u64,
    /// What the state machine made of it ([`StateMachine::outcome`]).
    pub outcome: u64,
}

/// One group's consensus, storage and state machine.
pub struct Group<S: Storage, M: StateMachine> {
    raw: RawNode<RaftLog<S>>,
    machine: M,
    applied: u64,
    /// Compact about every this many entries applied (0: never).
    compact_every: u64,
    /// Where in each `compact_every` entries this group compacts ([`compact_phase`]).
    compact_phase: u64,
    /// A membership change was applied since the last compaction.
    conf_changed: bool,
    /// The index, term and outcome of each entry applied since the last [`Group::take_applied`],
    /// when tracked.
    applied_terms: Option<Vec<Applied>>,
    /// Read indexes raft-rs confirmed since the last [`Group::take_read_states`].
    read_states: Vec<raft::ReadState>,
}

impl<S: Storage, M: StateMachine> Group<S, M> {
    /// Opens group `group`'s storage (state in `dir`, entries in the shard's `journal`),
    /// restores the state machine from the latest snapshot, and starts raft-rs on it.
    /// `config.applied` is set here.
    #[allow(clippy::too_many_arguments)]
    pub async fn open(
        dir: S,
        journal: Rc<Journal<S>>,
        group: u64,
        bootstrap: &ConfState,
        mut config: Config,
        mut machine: M,
        compact_every: u64,
    ) -> Result<Group<S, M>, RaftLogError> {
        let store = RaftLog::open(dir, journal, group, bootstrap).await?;
        let applied = store.state().snapshot_index;
        machine.restore(applied, store.snapshot_data());
        config.applied = applied;
        let raw = RawNode::new(&config, store, &crate::quiet_logger())
            .map_err(|e| RaftLogError::Corrupt(format!("raft-rs refused the group: {e}")))?;
        Ok(Group {
            raw,
            machine,
            applied,
            compact_every,
            compact_phase: compact_phase(group, compact_every),
            conf_changed: false,
            applied_terms: None,
            read_states: Vec::new(),
        })
    }

    /// raft-rs's node: tick, step, propose, and its state.
    pub fn raw(&mut self) -> &mut RawNode<RaftLog<S>> {
        &mut self.raw
    }

    /// raft-rs's node, to look at.
    pub fn raw_ref(&self) -> &RawNode<RaftLog<S>> {
        &self.raw
    }

    /// The state machine.
    pub fn machine(&self) -> &M {
        &self.machine
    }

    /// The state machine, to change.
    pub fn machine_mut(&mut self) -> &mut M {
        &mut self.machine
    }

    /// Whether this node leads the group.
    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == raft::StateRole::Leader
    }

    /// Asks raft-rs to hand leadership to the voter whose log is furthest along (it sends
    /// that node what it lacks, then tells it to campaign at once). Returns the node asked,
    /// or `None` when this node does not lead or has no other voter. What a node does
    /// before it stops, so that writes wait for one election at most, not for a timeout.
    pub fn hand_off_leadership(&mut self) -> Option<u64> {
        if !self.is_leader() {
            return None;
        }
        let me = self.raw.raft.id;
        let prs = self.raw.raft.prs();
        let voters = prs.conf().voters().ids();
        let target = voters
            .iter()
            .filter(|&id| id != me)
            .filter_map(|id| prs.get(id).map(|p| (p.matched, id)))
            .max()
            .map(|(_, id)| id)?;
        self.raw.transfer_leader(target);
        Some(target)
    }

    /// The index of the last entry applied.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Starts (or stops) noting every entry applied, for [`Group::take_applied`]: how a
    /// proposer learns whether the entry applied at its proposal's index is its own, and
    /// what it gave.
    pub fn track_applied(&mut self, on: bool) {
        self.applied_terms = on.then(Vec::new);
    }

    /// Each entry applied since the last call, in order (empty when not tracked).
    pub fn take_applied(&mut self) -> Vec<Applied> {
        self.applied_terms
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// The read indexes raft-rs confirmed since the last call (see
    /// [`RawNode::read_index`]): each request's context, and the commit index a read made
    /// after it must wait for.
    pub fn take_read_states(&mut self) -> Vec<raft::ReadState> {
        std::mem::take(&mut self.read_states)
    }

    /// Handles one `Ready`, if there is one; `send` gets each batch of messages when it may
    /// go. Returns whether there was one.
    pub async fn on_ready(
        &mut self,
        send: &mut impl FnMut(Vec<Message>),
    ) -> Result<bool, RaftLogError> {
        self.raw.mut_store().free_some();
        if !self.raw.has_ready() {
            return Ok(false);
        }
        let mut rd = self.raw.ready();
        self.read_states.extend(rd.take_read_states());
        send(rd.take_messages());
        if !rd.snapshot().is_empty() {
            let snapshot = rd.snapshot().clone();
            self.raw.mut_store().apply_snapshot(&snapshot).await?;
            let index = snapshot.get_metadata().index;
            self.machine.restore(index, &snapshot.data);
            let conf = snapshot.get_metadata().get_conf_state();
            self.machine.members(&conf.voters, &conf.learners);
            self.machine.catch_up().await?;
            self.applied = index;
        }
        // Committed entries are applied after this Ready is persisted and advanced, not
        // before: a membership change can remove the leader itself, which must then step
        // down, and raft-rs allows no change of term between `ready` and `advance`.
        let committed = rd.take_committed_entries();
        self.raw.mut_store().append(rd.entries()).await?;
        if let Some(hs) = rd.hs() {
            self.raw.mut_store().set_hard_state(hs).await?;
        }
        send(rd.take_persisted_messages());
        let mut light = self.raw.advance(rd);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().set_commit(commit);
        }
        send(light.take_messages());
        self.apply(committed).await?;
        self.apply(light.take_committed_entries()).await?;
        self.raw.advance_apply();
        let snapshot_index = self.raw.store().state().snapshot_index;
        // After a membership change the snapshot must carry it at once: a node added back
        // behind the last snapshot refuses one that does not name it, and the entries it
        // would need instead are compacted.
        let due = self.compact_every > 0 && {
            let round = |i: u64| (i + self.compact_phase) / self.compact_every;
            round(self.applied) > round(snapshot_index)
        };
        if (due || std::mem::take(&mut self.conf_changed)) && self.applied > snapshot_index {
            self.machine.persist().await?;
            let data = self.machine.snapshot();
            // The entries up to the snapshot stay as long as between two snapshots: a
            // follower that far behind is caught up from the log, not by snapshot.
            let keep = self.compact_every;
            self.raw
                .mut_store()
                .compact(self.applied, data, keep)
                .await?;
        }
        Ok(true)
    }

    /// Upkeep between turns: an idle group's entries written again at the journal's end
    /// if they pin it too far back ([`RaftLog::rewrite_if_due`]).
    pub async fn tend(&mut self) -> Result<(), RaftLogError> {
        self.raw.mut_store().rewrite_if_due().await
    }

    async fn apply(&mut self, entries: Vec<Entry>) -> Result<(), RaftLogError> {
        if entries.is_empty() {
            return Ok(());
        }
        for e in &entries {
            let conf = match e.get_entry_type() {
                EntryType::EntryNormal => None,
                EntryType::EntryConfChange => {
                    let cc = ConfChange::parse_from_bytes(&e.data).map_err(|err| bad(e, err))?;
                    Some(self.raw.apply_conf_change(&cc))
                }
                EntryType::EntryConfChangeV2 => {
                    let cc = ConfChangeV2::parse_from_bytes(&e.data).map_err(|err| bad(e, err))?;
                    Some(self.raw.apply_conf_change(&cc))
                }
            };
            // raft-rs refuses a change that cannot apply (removing the last voter); the
            // membership then stays as it was, on every node alike.
            if let Some(Ok(conf)) = conf {
                self.raw.mut_store().applied_conf_state(&conf);
                self.step_down_if_removed(&conf);
                self.conf_changed = true;
            }
        }
        self.machine.apply(&entries).await?;
        let last = entries.last().expect("not empty");
        self.applied = last.index;
        if let Some(t) = &mut self.applied_terms {
            let machine = &self.machine;
            t.extend(entries.iter().map(|e| Applied {
                index: e.index,
                term: e.term,
                outcome: machine.outcome(e.index),
            }));
        }
        Ok(())
    }
}

impl<S: Storage, M: StateMachine> Group<S, M> {
    /// A leader that applied its own removal steps down into the next term. raft-rs leaves
    /// it leading (an untested branch there), and its next commit then panics looking for
    /// its own progress. Leaders are to be moved off a node before it is removed; this is
    /// for a removal decided by an earlier leader and applied by a later one.
    fn step_down_if_removed(&mut self, conf: &ConfState) {
        let r = &mut self.raw.raft;
        if r.state == raft::StateRole::Leader && !conf.voters.contains(&r.id) {
            let term = r.term + 1;
            r.become_follower(term, raft::INVALID_ID);
        }
    }
}

fn bad(e: &Entry, err: impl std::fmt::Display) -> RaftLogError {
    RaftLogError::Corrupt(format!(
        "the configuration change at {} does not parse: {err}",
        e.index
    ))
}
