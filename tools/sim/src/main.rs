//! Runs many seeds of the whole-node simulation, or of the cluster simulation: the long
//! run.
//!
//! `cargo run -p chorus-sim --release -- --seeds 100000 [--from 0] [--threads N]
//! [--cluster | --engine-cluster]`, or one seed with `CHORUS_SIM_SEED=<seed>`
//! (`CHORUS_CLUSTER_SEED` with `--cluster`, `CHORUS_ENGINE_CLUSTER_SEED` with
//! `--engine-cluster`). Prints a summary, and every failing seed with the command that replays
//! it; exits 1 if any seed failed.

use std::time::Instant;

fn main() {
    let mut seeds = 1000u64;
    let mut from = 0u64;
    let mut threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut cluster = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--cluster" || arg == "--engine-cluster" {
            cluster = Some(arg == "--engine-cluster");
            continue;
        }
        let mut value = || {
            args.next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or_else(|| usage(&arg))
        };
        match arg.as_str() {
            "--seeds" => seeds = value(),
            "--from" => from = value(),
            "--threads" => threads = value() as usize,
            _ => usage(&arg),
        }
    }
    if let Some(engines) = cluster {
        return cluster_main(from, seeds, threads, engines);
    }
    if let Ok(seed) = std::env::var("CHORUS_SIM_SEED") {
        let seed = seed.parse().unwrap_or_else(|_| usage("CHORUS_SIM_SEED"));
        let report = chorus_sim::run_seed(seed).map(|r| format!("{r:#?}"));
        return print_or_exit(report.map_err(|f| f.to_string()));
    }
    let started = Instant::now();
    let step = (seeds / 20).max(1);
    let summary = chorus_sim::run_seeds(from, seeds, threads, |n| {
        if n % step == 0 {
            eprintln!("{n}/{seeds} seeds, {:.0?}", started.elapsed());
        }
    });
    let took = started.elapsed();
    println!(
        "seeds {}..{}: {} run, {} passed, {} failed, in {:.1?} on {threads} threads",
        from,
        from + seeds,
        summary.seeds,
        summary.passed,
        summary.failures.len(),
        took
    );
    println!(
        "steps {} ({:.0} per seed), simulated time {:.1?}, crashes {}, events committed {}, operations {}, sessions cut off and resumed {}",
        summary.steps,
        summary.steps as f64 / summary.passed.max(1) as f64,
        summary.simulated,
        summary.crashes,
        summary.events,
        summary.ops,
        summary.resume_required
    );
    for failure in &summary.failures {
        eprintln!("{failure}");
    }
    if !summary.failures.is_empty() {
        std::process::exit(1);
    }
}

/// What one seed of a cluster simulation counted: (faults, events acknowledged, steps).
type Counted = Result<(u64, u64, u64), String>;

/// One seed of the cluster simulation, or of the engine on a simulated cluster.
fn cluster_seed(seed: u64, engines: bool) -> Counted {
    use chorus_sim::cluster::{engines::run_engine_cluster_seed, run_cluster_seed};
    if engines {
        run_engine_cluster_seed(seed).map(|r| {
            (
                r.crashes + r.clean_restarts + r.partitions_cut + r.pauses,
                r.acked,
                r.steps,
            )
        })
    } else {
        run_cluster_seed(seed).map(|r| {
            let faults =
                r.crashes + r.pauses + r.disk_faults + r.clean_restarts + r.partitions + r.removals;
            (faults, r.acked, r.steps)
        })
    }
}

/// The long run of the cluster simulation (`--cluster`) or of the engine on a simulated
/// cluster (`--engine-cluster`).
fn cluster_main(from: u64, seeds: u64, threads: usize, engines: bool) {
    let var = if engines {
        "CHORUS_ENGINE_CLUSTER_SEED"
    } else {
        "CHORUS_CLUSTER_SEED"
    };
    if let Ok(seed) = std::env::var(var) {
        let seed = seed.parse().unwrap_or_else(|_| usage(var));
        let report = if engines {
            chorus_sim::cluster::engines::run_engine_cluster_seed(seed).map(|r| format!("{r:#?}"))
        } else {
            chorus_sim::cluster::run_cluster_seed(seed).map(|r| format!("{r:#?}"))
        };
        return print_or_exit(report);
    }
    let started = Instant::now();
    let step = (seeds / 20).max(1);
    let done = std::sync::atomic::AtomicU64::new(0);
    let results = chorus_sim::cluster::run_parallel(from..from + seeds, threads, |seed| {
        let r = cluster_seed(seed, engines);
        let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        if n.is_multiple_of(step) {
            eprintln!("{n}/{seeds} seeds, {:.0?}", started.elapsed());
        }
        r
    });
    let (mut passed, mut faults, mut acked, mut steps) = (0u64, 0u64, 0u64, 0u64);
    let mut failures = Vec::new();
    for r in results {
        match r {
            Ok((f, a, s)) => {
                passed += 1;
                faults += f;
                acked += a;
                steps += s;
            }
            Err(f) => failures.push(f),
        }
    }
    println!(
        "{} seeds {}..{}: {passed} passed, {} failed, in {:.1?} on {threads} threads; \
         {faults} faults, {acked} acknowledged, {steps} steps",
        if engines { "engine cluster" } else { "cluster" },
        from,
        from + seeds,
        failures.len(),
        started.elapsed()
    );
    for failure in &failures {
        eprintln!("{failure}");
    }
    if !failures.is_empty() {
        std::process::exit(1);
    }
}

/// One seed's report, or its failure and exit status 1.
fn print_or_exit(report: Result<String, String>) {
    match report {
        Ok(report) => println!("{report}"),
        Err(failure) => {
            eprintln!("{failure}");
            std::process::exit(1);
        }
    }
}

fn usage(at: &str) -> ! {
    eprintln!(
        "usage: chorus-sim [--seeds N] [--from SEED] [--threads N] [--cluster | --engine-cluster] (bad: {at})"
    );
    eprintln!("       CHORUS_SIM_SEED=SEED chorus-sim");
    eprintln!("       CHORUS_CLUSTER_SEED=SEED chorus-sim --cluster");
    eprintln!("       CHORUS_ENGINE_CLUSTER_SEED=SEED chorus-sim --engine-cluster");
    std::process::exit(2);
}
