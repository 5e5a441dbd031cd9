//! The cluster simulation in the test command: a thousand seeds, each 3 or 5 nodes running
//! Raft groups under faults (crashes, pauses, failed fsyncs, planned restarts, partitions,
//! nodes removed and added back, a lossy network), each checked for acknowledged events
//! kept exactly once and one order on every node, and for read indexes (a leader's lease
//! among them) that never miss an acknowledged event; and a check that a seed replays
//! exactly.
//!
//! `CHORUS_CLUSTER_SEED=<seed>` runs that one seed (to replay a failure);
//! `CHORUS_CLUSTER_SEEDS=<n>` changes how many seeds run.

use chorus_sim::cluster::{run_cluster_seed, test_seeds, ClusterReport};

/// Seeds the test command runs.
const SEEDS: u64 = 1000;

#[test]
fn cluster_seeds_keep_every_rule() {
    let reports = test_seeds(
        "CHORUS_CLUSTER_SEED",
        "CHORUS_CLUSTER_SEEDS",
        SEEDS,
        run_cluster_seed,
    );
    if reports.is_empty() {
        return;
    }
    let seeds = reports.len() as u64;
    let mut sum = ClusterReport::default();
    for r in reports {
        sum.steps += r.steps;
        sum.simulated += r.simulated;
        sum.acked += r.acked;
        sum.uncertain += r.uncertain;
        sum.refused += r.refused;
        sum.crashes += r.crashes;
        sum.pauses += r.pauses;
        sum.reads += r.reads;
        sum.leased_reads += r.leased_reads;
        sum.reads_refused += r.reads_refused;
        sum.disk_faults += r.disk_faults;
        sum.clean_restarts += r.clean_restarts;
        sum.partitions += r.partitions;
        sum.removals += r.removals;
        sum.messages += r.messages;
        sum.dropped += r.dropped;
        sum.fetches += r.fetches;
        sum.events += r.events;
    }
    println!(
        "{seeds} cluster seeds: {} steps, simulated {:?}; {} acknowledged, {} uncertain, {} refused; \
         {} crashes, {} pauses, {} failed fsyncs, {} planned restarts, {} partitions, {} nodes \
         removed; {} reads ({} under a lease, {} refused); {} messages ({} lost), {} fetches of \
         events; {} events in the logs",
        sum.steps, sum.simulated, sum.acked, sum.uncertain, sum.refused, sum.crashes,
        sum.pauses, sum.disk_faults, sum.clean_restarts, sum.partitions, sum.removals,
        sum.reads, sum.leased_reads, sum.reads_refused, sum.messages, sum.dropped,
        sum.fetches, sum.events
    );
    // The faults happened: a run that exercised nothing proves nothing.
    if seeds >= 100 {
        assert!(
            sum.crashes > seeds && sum.partitions > seeds,
            "too few faults"
        );
        assert!(sum.disk_faults > seeds / 2 && sum.clean_restarts > seeds / 2);
        assert!(sum.removals > seeds / 2, "too few membership changes");
        assert!(
            sum.fetches > 0,
            "no replica was caught up by a snapshot and a fetch"
        );
        assert!(sum.acked > seeds * 20, "too little was acknowledged");
        assert!(sum.pauses > seeds / 2, "too few pauses");
        assert!(
            sum.leased_reads > seeds && sum.reads - sum.reads_refused > seeds * 5,
            "too few reads, or none under a lease"
        );
    }
}

// The same seed runs the same way twice.
#[test]
fn a_cluster_seed_replays_exactly() {
    for seed in [5, 12] {
        let a = run_cluster_seed(seed).unwrap();
        let b = run_cluster_seed(seed).unwrap();
        assert_eq!((a.steps, a.digest), (b.steps, b.digest), "seed {seed}");
    }
}
