//! Runs many seeds of the whole-node simulation: the long run.
//!
//! `cargo run -p chorus-sim --release -- --seeds 100000 [--from 0] [--threads N]`, or one
//! seed with `CHORUS_SIM_SEED=<seed>`. Prints a summary, and every failing seed with the
//! command that replays it; exits 1 if any seed failed.

use std::time::Instant;

fn main() {
    let mut seeds = 1000u64;
    let mut from = 0u64;
    let mut threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
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
    if let Ok(seed) = std::env::var("CHORUS_SIM_SEED") {
        let seed = seed.parse().unwrap_or_else(|_| usage("CHORUS_SIM_SEED"));
        match chorus_sim::run_seed(seed) {
            Ok(report) => println!("{report:#?}"),
            Err(failure) => {
                eprintln!("{failure}");
                std::process::exit(1);
            }
        }
        return;
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

fn usage(at: &str) -> ! {
    eprintln!("usage: chorus-sim [--seeds N] [--from SEED] [--threads N] (bad: {at})");
    eprintln!("       CHORUS_SIM_SEED=SEED chorus-sim");
    std::process::exit(2);
}
