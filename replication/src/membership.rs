//! Moving a group to another set of nodes, one safe step at a time.
//!
//! A cluster's groups live where [`placement`] puts them over the cluster's nodes: three
//! voters, every other node a learner. When the nodes change (a node added, a node
//! removed), each group's leader walks its group from its configuration to the new
//! placement by single configuration changes (raft-rs's simple changes, one voter at a
//! time, never a joint configuration), each proposed only once the one before is applied:
//! 1. **add** every node of the new set the group lacks, as a learner (it catches up from
//!    the leader's log, or by snapshot, without counting towards any majority);
//! 2. **promote** a learner that placement makes a voter, once it holds every committed
//!    entry but the last few ([`CAUGHT_UP_SLACK`]; a voter that lags would slow every
//!    commit);
//! 3. **demote** a voter that placement no longer wants, once every voter it wants votes,
//!    so the group never has fewer voters than it will end with; a leader never demotes
//!    itself: it hands its leadership to a wanted voter that is caught up, and the next
//!    leader goes on;
//! 4. **remove** a node that is not in the new set, once it is only a learner.
//!
//! Safety does not depend on these rules (raft-rs checks each change, and a change
//! commits under the configuration before it); they keep the group available throughout:
//! at every step a majority of its voters are nodes that were voters at the step before.
//! [`next_step`] is the rule as a pure function, so every leader, and the tests, compute it
//! alike.

use crate::placement;

/// One configuration change (or hand-off) towards the wanted placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Add the node as a learner.
    AddLearner(u64),
    /// Make the learner a voter.
    Promote(u64),
    /// Make the voter a learner.
    Demote(u64),
    /// Take the learner out of the group.
    Remove(u64),
    /// Hand the leadership to this voter (the leader is to be demoted or removed).
    HandOff(u64),
}

/// What a leader knows of its group when it looks for the next step.
#[derive(Debug, Clone, Default)]
pub struct GroupConf {
    /// The leader's own id.
    pub me: u64,
    /// The group's voters.
    pub voters: Vec<u64>,
    /// The group's learners.
    pub learners: Vec<u64>,
    /// For each node of the group, the last entry it is known to hold.
    pub matched: Vec<(u64, u64)>,
    /// The leader's commit index.
    pub committed: u64,
}

/// How far behind the commit index a node may be and still count as caught up: under
/// steady writes a healthy learner trails by the appends in flight, and must not wait for
/// a quiet moment to be promoted.
pub const CAUGHT_UP_SLACK: u64 = 64;

impl GroupConf {
    fn caught_up(&self, node: u64) -> bool {
        self.matched
            .iter()
            .any(|&(n, m)| n == node && m + CAUGHT_UP_SLACK >= self.committed)
    }
}

/// The next step that takes group `group` from `conf` towards placement over `nodes`, or
/// `None` once it is there (or no step can be taken yet: a learner still catching up).
pub fn next_step(group: u32, conf: &GroupConf, nodes: &[u64]) -> Option<Step> {
    if nodes.is_empty() {
        return None;
    }
    let want_voters = placement::replicas(group, nodes);
    let holds = |n: &u64| conf.voters.contains(n) || conf.learners.contains(n);
    if let Some(&n) = nodes.iter().find(|n| !holds(n)) {
        return Some(Step::AddLearner(n));
    }
    if let Some(&n) = want_voters
        .iter()
        .find(|n| conf.learners.contains(n) && conf.caught_up(**n))
    {
        return Some(Step::Promote(n));
    }
    let all_wanted_vote = want_voters.iter().all(|n| conf.voters.contains(n));
    if all_wanted_vote {
        if let Some(&n) = conf.voters.iter().find(|n| !want_voters.contains(n)) {
            if n != conf.me {
                return Some(Step::Demote(n));
            }
            // Hand off to a wanted voter that holds every committed entry.
            return want_voters
                .iter()
                .find(|v| conf.caught_up(**v))
                .map(|&v| Step::HandOff(v));
        }
    }
    conf.learners
        .iter()
        .find(|n| !nodes.contains(n))
        .map(|&n| Step::Remove(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Applies steps as raft-rs would, all nodes caught up, until none is left; returns
    /// them. The leader is `me`, handed off as asked.
    fn walk(group: u32, mut conf: GroupConf, nodes: &[u64]) -> (Vec<Step>, GroupConf) {
        let mut steps = Vec::new();
        // The group never has fewer voters than it starts or ends with, whichever is less.
        let floor = conf
            .voters
            .len()
            .min(placement::replicas(group, nodes).len());
        while let Some(step) = next_step(group, &conf, nodes) {
            steps.push(step);
            assert!(steps.len() < 20, "no end: {steps:?}");
            match step {
                Step::AddLearner(n) => conf.learners.push(n),
                Step::Promote(n) => {
                    conf.learners.retain(|&l| l != n);
                    conf.voters.push(n);
                }
                Step::Demote(n) => {
                    assert_ne!(n, conf.me, "a leader never demotes itself");
                    conf.voters.retain(|&v| v != n);
                    conf.learners.push(n);
                }
                Step::Remove(n) => {
                    assert!(!conf.voters.contains(&n), "only learners are removed");
                    conf.learners.retain(|&l| l != n);
                }
                Step::HandOff(n) => {
                    assert!(conf.voters.contains(&n));
                    conf.me = n;
                }
            }
            assert!(
                conf.voters.len() >= floor,
                "{steps:?} left {:?}",
                conf.voters
            );
            let all: Vec<u64> = conf.voters.iter().chain(&conf.learners).copied().collect();
            conf.matched = all.iter().map(|&n| (n, conf.committed)).collect();
        }
        conf.voters.sort_unstable();
        conf.learners.sort_unstable();
        (steps, conf)
    }

    fn conf(me: u64, voters: &[u64], learners: &[u64]) -> GroupConf {
        let all = voters.iter().chain(learners);
        GroupConf {
            me,
            voters: voters.to_vec(),
            learners: learners.to_vec(),
            matched: all.map(|&n| (n, 10)).collect(),
            committed: 10,
        }
    }

    #[test]
    fn a_fourth_node_joins_every_group_and_takes_its_votes() {
        for g in 0..8u32 {
            let start = placement::replicas(g, &[1, 2, 3]);
            let (steps, end) = walk(g, conf(start[0], &start, &[]), &[1, 2, 3, 4]);
            assert_eq!(steps[0], Step::AddLearner(4), "group {g}: {steps:?}");
            let mut want = placement::replicas(g, &[1, 2, 3, 4]);
            want.sort_unstable();
            assert_eq!(end.voters, want, "group {g}");
            assert_eq!(end.learners, placement::learners(g, &[1, 2, 3, 4]));
            // Promotions come before demotions: never two voters.
            let promote = steps.iter().position(|s| matches!(s, Step::Promote(_)));
            let demote = steps.iter().position(|s| matches!(s, Step::Demote(_)));
            if let (Some(p), Some(d)) = (promote, demote) {
                assert!(p < d, "group {g}: {steps:?}");
            }
        }
    }

    #[test]
    fn a_removed_node_is_demoted_then_removed_and_a_leader_hands_off_first() {
        let nodes = [1, 2, 3, 4];
        for g in 0..8u32 {
            let voters = placement::replicas(g, &nodes);
            let learners = placement::learners(g, &nodes);
            // The leader is node 1 wherever it votes, so its own removal is exercised.
            let me = if voters.contains(&1) { 1 } else { voters[0] };
            let (steps, end) = walk(g, conf(me, &voters, &learners), &[2, 3, 4]);
            assert!(
                !end.voters.contains(&1) && !end.learners.contains(&1),
                "{steps:?}"
            );
            let mut want = placement::replicas(g, &[2, 3, 4]);
            want.sort_unstable();
            assert_eq!(end.voters, want, "group {g}: {steps:?}");
            let at = |want: Step| steps.iter().position(|s| *s == want);
            let demoted = at(Step::Demote(1));
            assert_eq!(
                demoted.is_some(),
                voters.contains(&1),
                "group {g}: {steps:?}"
            );
            if me == 1 {
                let hand_off = steps.iter().position(|s| matches!(s, Step::HandOff(_)));
                assert!(
                    hand_off.is_some() && hand_off < demoted,
                    "group {g}: {steps:?}"
                );
            }
            assert!(demoted < at(Step::Remove(1)), "group {g}: {steps:?}");
        }
    }

    #[test]
    fn a_lagging_learner_is_not_promoted_and_nothing_is_demoted_before() {
        let mut c = conf(1, &[1, 2, 3], &[4]);
        c.committed = 1_000;
        c.matched = vec![(1, 1_000), (2, 1_000), (3, 990), (4, 3)];
        // Group 1 of {1,2,3,4} wants 2, 3, 4 as voters: 4 must catch up first.
        assert_eq!(next_step(1, &c, &[1, 2, 3, 4]), None);
        c.matched[3] = (4, 1_000 - CAUGHT_UP_SLACK);
        assert_eq!(next_step(1, &c, &[1, 2, 3, 4]), Some(Step::Promote(4)));
    }

    #[test]
    fn nothing_to_do_where_placement_holds() {
        let nodes = [1, 2, 3, 4, 5];
        for g in 0..10u32 {
            let c = conf(
                placement::replicas(g, &nodes)[0],
                &placement::replicas(g, &nodes),
                &placement::learners(g, &nodes),
            );
            assert_eq!(next_step(g, &c, &nodes), None);
        }
        assert_eq!(next_step(0, &conf(1, &[1], &[]), &[]), None);
    }
}
