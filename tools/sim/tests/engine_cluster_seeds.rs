//! The engine on a simulated cluster in the test command: seeds of 3 nodes, each a whole
//! engine whose partitions and directory commit through Raft groups, with posts through
//! whichever node leads while nodes crash, pause and the network loses and partitions;
//! every history read meanwhile must hold every post acknowledged before it; every node's
//! history of every channel must then be the same, every acknowledged post in it once at
//! its acknowledged seq, nothing never sent.
//!
//! `CHORUS_ENGINE_CLUSTER_SEED=<seed>` runs that one seed; `CHORUS_ENGINE_CLUSTER_SEEDS=<n>`
//! changes how many run.

use chorus_sim::cluster::engines::{run_engine_cluster_seed, EngineClusterReport};
use chorus_sim::cluster::test_seeds;

/// Seeds the test command runs.
const SEEDS: u64 = 200;

#[test]
fn engine_cluster_seeds_keep_every_rule() {
    let reports = test_seeds(
        "CHORUS_ENGINE_CLUSTER_SEED",
        "CHORUS_ENGINE_CLUSTER_SEEDS",
        SEEDS,
        run_engine_cluster_seed,
    );
    if reports.is_empty() {
        return;
    }
    let seeds = reports.len() as u64;
    let mut sum = EngineClusterReport::default();
    for r in reports {
        sum.steps += r.steps;
        sum.simulated += r.simulated;
        sum.acked += r.acked;
        sum.unanswered += r.unanswered;
        sum.delivered += r.delivered;
        sum.crashes += r.crashes;
        sum.clean_restarts += r.clean_restarts;
        sum.partitions_cut += r.partitions_cut;
        sum.pauses += r.pauses;
        sum.reads += r.reads;
        sum.reads_refused += r.reads_refused;
        sum.messages += r.messages;
    }
    println!(
        "{seeds} engine cluster seeds: {} steps, simulated {:?}; {} posts acknowledged, {} \
         unanswered, {} deliveries; {} crashes, {} planned restarts, {} partitions, {} \
         pauses; {} histories read under the faults ({} refused); {} messages in the \
         histories",
        sum.steps,
        sum.simulated,
        sum.acked,
        sum.unanswered,
        sum.delivered,
        sum.crashes,
        sum.clean_restarts,
        sum.partitions_cut,
        sum.pauses,
        sum.reads,
        sum.reads_refused,
        sum.messages
    );
    // The faults happened: a run that exercised nothing proves nothing.
    if seeds >= 50 {
        assert!(
            sum.crashes > seeds / 2 && sum.partitions_cut > seeds / 2,
            "too few faults"
        );
        assert!(sum.acked > seeds * 10, "too little was acknowledged");
        assert!(sum.clean_restarts > seeds / 4, "too few planned restarts");
        assert!(sum.pauses > seeds / 2, "too few pauses");
        assert!(
            sum.reads - sum.reads_refused > seeds * 5,
            "too few histories read under the faults"
        );
    }
}

// The same seed runs the same way twice.
#[test]
fn an_engine_cluster_seed_replays_exactly() {
    for seed in [2, 9] {
        let a = run_engine_cluster_seed(seed).unwrap();
        let b = run_engine_cluster_seed(seed).unwrap();
        assert_eq!((a.steps, a.digest), (b.steps, b.digest), "seed {seed}");
    }
}
