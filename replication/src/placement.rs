//! Where a cluster's groups live: which nodes vote in each partition's group, and which of
//! them should lead it.
//!
//! Every partition (and the metadata partition) is a group of [`replication_factor`]
//! voters: 3, or every node when there are fewer. Partition `p` of a cluster of nodes
//! `n_0 < n_1 < … < n_{N-1}` is voted on by the `RF` nodes that follow `n_{p mod N}` around
//! the ring, that node first; the first voter is the preferred leader, so leaderships
//! spread evenly over the nodes, and each node votes in `P × RF / N` groups. Every other
//! node of the cluster holds the group as a learner ([`learners`]): it receives and applies
//! every committed entry but neither votes nor counts towards a majority, so every node
//! holds every event once and delivers it to its own subscribers, while a commit waits
//! for two of three voters only. The placement is a pure function of the membership and
//! the partition, so every node computes the same one without asking.
//!
//! The preferred leader is to be reached by a leadership transfer once the group has a
//! leader, not by raft-rs's election priority: with priorities, a voter of higher
//! priority refuses a candidate whose log is as long as its own but newer, and that
//! candidate refuses it back, so the group can stay leaderless (the simulation found a
//! group of two voters stuck so). raft-rs 0.7 also stops when a node at term 0 refuses a
//! pre-vote, which priorities make possible.

/// Replicas per group: 3, or the number of nodes if fewer.
pub fn replication_factor(nodes: usize) -> usize {
    nodes.min(3)
}

/// The nodes that hold partition `partition`, its preferred leader first. `nodes` is the
/// cluster's node ids in any order; empty in, empty out.
pub fn replicas(partition: u32, nodes: &[u64]) -> Vec<u64> {
    let mut sorted = nodes.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let n = sorted.len();
    if n == 0 {
        return Vec::new();
    }
    let first = partition as usize % n;
    (0..replication_factor(n))
        .map(|k| sorted[(first + k) % n])
        .collect()
}

/// The nodes that hold partition `partition` without a vote: every node of `nodes` that
/// [`replicas`] leaves out, in id order.
pub fn learners(partition: u32, nodes: &[u64]) -> Vec<u64> {
    let voters = replicas(partition, nodes);
    let mut rest: Vec<u64> = nodes
        .iter()
        .copied()
        .filter(|n| !voters.contains(n))
        .collect();
    rest.sort_unstable();
    rest.dedup();
    rest
}

/// Whether `node` is the preferred leader of partition `partition`.
pub fn prefers(partition: u32, nodes: &[u64], node: u64) -> bool {
    replicas(partition, nodes).first() == Some(&node)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn three_replicas_or_all_nodes() {
        assert_eq!(replicas(0, &[]), Vec::<u64>::new());
        assert_eq!(replicas(5, &[7]), vec![7]);
        assert_eq!(replicas(1, &[2, 1]), vec![2, 1]);
        assert_eq!(replicas(0, &[3, 1, 2]), vec![1, 2, 3]);
        assert_eq!(replicas(4, &[1, 2, 3, 4, 5]), vec![5, 1, 2]);
        // The order nodes are listed in does not matter, nor repeats.
        assert_eq!(replicas(4, &[5, 4, 3, 2, 1, 1]), vec![5, 1, 2]);
    }

    // Over 16 partitions and the metadata partition, every node leads and holds its share,
    // within one, for every cluster size up to 7.
    #[test]
    fn leaders_and_replicas_spread_evenly() {
        for n in 1..=7u64 {
            let nodes: Vec<u64> = (1..=n).collect();
            let partitions = 17u32;
            let mut leads: BTreeMap<u64, u32> = BTreeMap::new();
            let mut holds: BTreeMap<u64, u32> = BTreeMap::new();
            for p in 0..partitions {
                let r = replicas(p, &nodes);
                assert_eq!(r.len(), replication_factor(n as usize));
                let distinct: std::collections::BTreeSet<u64> = r.iter().copied().collect();
                assert_eq!(distinct.len(), r.len(), "replicas are distinct nodes");
                *leads.entry(r[0]).or_default() += 1;
                for node in &r {
                    *holds.entry(*node).or_default() += 1;
                }
                assert!(prefers(p, &nodes, r[0]));
                assert!(r[1..].iter().all(|&other| !prefers(p, &nodes, other)));
            }
            let spread = |m: &BTreeMap<u64, u32>| {
                let (lo, hi) = (m.values().min().unwrap(), m.values().max().unwrap());
                assert_eq!(m.len() as u64, n, "every node takes part");
                hi - lo
            };
            assert!(spread(&leads) <= 1, "{n} nodes: leaders {leads:?}");
            assert!(spread(&holds) <= 3, "{n} nodes: replicas {holds:?}");
        }
    }

    #[test]
    fn every_node_holds_every_partition_as_voter_or_learner() {
        assert_eq!(learners(0, &[1, 2, 3]), Vec::<u64>::new());
        assert_eq!(learners(4, &[5, 4, 3, 2, 1, 1]), vec![3, 4]);
        for n in 1..=7u64 {
            let nodes: Vec<u64> = (1..=n).collect();
            for p in 0..17 {
                let (v, l) = (replicas(p, &nodes), learners(p, &nodes));
                let all: std::collections::BTreeSet<u64> = v.iter().chain(&l).copied().collect();
                assert_eq!(all.len(), nodes.len(), "{n} nodes, partition {p}");
                assert!(l.iter().all(|x| !v.contains(x)));
            }
        }
    }

    #[test]
    fn a_node_without_a_replica_is_never_preferred() {
        let nodes = [1, 2, 3, 4];
        let r = replicas(0, &nodes);
        let outside = *nodes.iter().find(|n| !r.contains(n)).unwrap();
        assert!(!prefers(0, &nodes, outside));
    }
}
