//! The whole-node simulation in the test command: a thousand seeds, each a different
//! interleaving, workload and set of crashes of a whole node, and a check that a seed
//! replays exactly.
//!
//! `CHORUS_SIM_SEED=<seed>` runs that one seed (to replay a failure);
//! `CHORUS_SIM_SEEDS=<n>` changes how many seeds run.

use chorus_sim::{run_seed, run_seeds};

/// Seeds the test command runs.
const SEEDS: u64 = 1000;

// Every seed keeps every rule: one gapless order per channel, acknowledged events durable
// exactly once, nothing delivered before it is durable, streams gapless across resumes,
// and no deadlock.
#[test]
fn seeds_keep_every_rule() {
    if let Ok(seed) = std::env::var("CHORUS_SIM_SEED") {
        let seed: u64 = seed.parse().expect("CHORUS_SIM_SEED is a number");
        match run_seed(seed) {
            Ok(report) => println!("{report:#?}"),
            Err(failure) => panic!("{failure}"),
        }
        return;
    }
    let seeds = std::env::var("CHORUS_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(SEEDS);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let summary = run_seeds(0, seeds, threads, |_| {});
    println!(
        "{} seeds: {} steps, simulated {:?}, {} crashes, {} events, {} operations, {} resumes required",
        summary.seeds,
        summary.steps,
        summary.simulated,
        summary.crashes,
        summary.events,
        summary.ops,
        summary.resume_required
    );
    if let Some(first) = summary.failures.first() {
        let seeds: Vec<u64> = summary.failures.iter().map(|f| f.seed).collect();
        panic!("{} seeds failed: {seeds:?}\n{first}", seeds.len());
    }
}

// The same seed runs the same way twice: same steps, same frames, same logs, though every
// hash map in the process is seeded differently.
#[test]
fn a_seed_replays_exactly() {
    for seed in [3, 11] {
        let a = run_seed(seed).map_err(|f| f.to_string()).unwrap();
        let b = run_seed(seed).map_err(|f| f.to_string()).unwrap();
        assert_eq!((a.steps, a.digest), (b.steps, b.digest), "seed {seed}");
    }
}
