//! Replicated commits on loopback (issue 18's throughput and latency rows, at the level of
//! the replication crate: a partition's event log as its group's state machine, without
//! the engine in front). `CHORUS_BENCH_GROUPS` (16) groups on 3 nodes (RF=3) and, in the
//! same run, on 1 node (RF=1); each node a glommio executor on a thread of its own, its
//! groups' Raft logs and event logs in real directories, the nodes talking over TCP.
//! Leaderships spread over the nodes (each group's preferred node), and every commit is
//! proposed on its group's leader.
//!
//! Measured, for each of RF=3 and RF=1:
//! - **Throughput**: `CHORUS_BENCH_WRITERS` (64) writers per group, each committing
//!   `CHORUS_BENCH_BATCH` (1) 256-byte events as one entry and then the next (closed
//!   loop), for `CHORUS_BENCH_SECS` (15) seconds: events committed per second. With 0
//!   writers the closed loop is left out.
//! - **Latency at a fixed rate**: `CHORUS_BENCH_RATE` (50,000) events per second spread
//!   over the groups, each sent at its due time whatever came back (open loop), for the
//!   same time: due time → commit answered, p50 / p99 / max; and the process's CPU time
//!   meanwhile (every node's, the writers' and the kernel workers' of the fsyncs) per
//!   event sent, and as cores busy. `CHORUS_BENCH_COMPACT_EVERY` (10,000) sets the
//!   entries between compactions. 15 s at 50,000/s is past the second compaction of
//!   every group (a group's first lets nothing go: it keeps as many entries behind its
//!   snapshot) and past the heap's growth to its steady size (about 400 MB for the three
//!   nodes): in 5 s the figures were those of a warm-up alone.
//!
//! `CHORUS_BENCH_NODES=3` (or 1) runs that cluster alone; `CHORUS_BENCH_TIMELINE=1` prints
//! the open loop's slowest commit in every 100 ms of due times that had one of 5 ms or
//! more, to see when a stall came.
//!
//! The nodes and the writers share the machine's cores, so these are the cluster's figures
//! on one box, with every node's fsyncs on the same disk.
//!
//! Run it with `cargo bench -p chorus-bench --bench replication`. Without `--bench` (under
//! `cargo test --benches`) it is a short smoke run.

use chorus_log::{DiskRoot, DiskStorage, Entry as Event, Log, LogConfig};
use chorus_replication::transport::Membership;
use chorus_replication::{placement, Node, NodeConfig, ProposeError, ReplicatedLog};
use hdrhistogram::Histogram;
use raft::StateRole;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

const EVENT_BYTES: usize = 256;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name} is a number")))
        .unwrap_or(default)
}

#[derive(Clone, Copy)]
struct Shape {
    groups: u32,
    /// Events per commit (one Raft entry).
    batch: u64,
    writers: u64,
    rate: u64,
    secs: f64,
}

/// What one node measured.
#[derive(Default)]
struct Measured {
    closed_commits: u64,
    open_sent: u64,
    open_failed: u64,
    closed_failed: u64,
    latency: Option<Histogram<u64>>,
    /// The process's CPU time during the open loop (every node's, seen from each).
    open_cpu: Duration,
    /// Failed commits by why.
    why: BTreeMap<&'static str, u64>,
    /// The open loop's slowest commit in each 100 ms of due times (`CHORUS_BENCH_TIMELINE`).
    timeline: BTreeMap<u64, u64>,
}

/// Keeps in `timeline` the slowest commit of each slot.
fn keep_worst(timeline: &mut BTreeMap<u64, u64>, slot: u64, us: u64) {
    let worst = timeline.entry(slot).or_default();
    *worst = (*worst).max(us);
}

fn why(e: &ProposeError) -> &'static str {
    match e {
        ProposeError::NotLeader { .. } => "not leader",
        ProposeError::Dropped => "dropped",
        ProposeError::Uncertain => "uncertain",
    }
}

/// One commit's events: `n` times the payload.
fn events(payload: &[u8], n: u64) -> Vec<Event<'_>> {
    let e = Event {
        timestamp_us: 0,
        payload,
    };
    vec![e; n as usize]
}

fn free_addrs(n: usize) -> Vec<SocketAddr> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners.iter().map(|l| l.local_addr().unwrap()).collect()
}

/// Waits until every node of the run is here.
async fn together(barrier: &Arc<Barrier>) {
    let barrier = barrier.clone();
    glommio::executor()
        .spawn_blocking(move || {
            barrier.wait();
        })
        .await;
}

/// CPU time the process has used so far (user and system, every thread).
fn process_cpu() -> Duration {
    // SAFETY: `rusage` is plain integers, valid when zeroed; getrusage only fills it.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let ok = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    assert_eq!(ok, 0, "getrusage");
    let t = |v: libc::timeval| Duration::new(v.tv_sec as u64, v.tv_usec as u32 * 1_000);
    t(u.ru_utime) + t(u.ru_stime)
}

/// Runs one node until both phases are over; returns what its writers measured.
async fn node_main(
    me: u64,
    nodes: BTreeMap<u64, SocketAddr>,
    dir: PathBuf,
    shape: Shape,
    settled: Arc<Barrier>,
    leaders: Arc<Mutex<BTreeMap<u32, u64>>>,
) -> Measured {
    let listener = glommio::net::TcpListener::bind(nodes[&me]).expect("bind");
    let ids: Vec<u64> = nodes.keys().copied().collect();
    let mut config = NodeConfig::new(Membership::new(me, nodes), shape.groups);
    // Compactions keep as many entries behind their snapshot, so a follower a little
    // behind the leader's compaction is caught up from the log (a snapshot would carry
    // only the event log's cursor, not its events, and stop the follower's group).
    config.compact_every = env("CHORUS_BENCH_COMPACT_EVERY", 10_000);
    let mut event_logs = Vec::new();
    for g in 0..shape.groups {
        if placement::replicas(g, &ids).contains(&me) {
            // As a cluster node opens its partitions' logs: in the page cache, zeroing
            // less ahead than the journals (`NodeConfig::log`).
            let storage = DiskStorage::open_dir_cached(dir.join(format!("events-{g}"))).unwrap();
            let config = LogConfig {
                preallocate_bytes: chorus_replication::EVENTS_PREALLOCATE_BYTES,
                ..LogConfig::default()
            };
            let (log, _) = Log::open(storage, config).await.unwrap();
            event_logs.push((u64::from(g), log));
        }
    }
    let logs = RefCell::new(event_logs.into_iter().collect::<BTreeMap<_, _>>());
    let proposers: Rc<RefCell<BTreeMap<u64, Rc<ReplicatedLog<DiskStorage>>>>> = Rc::default();
    let p2 = proposers.clone();
    let node = Node::start(config, DiskRoot::new(dir), listener, move |g, replica| {
        let log = logs.borrow_mut().remove(&g).expect("its event log");
        let (proposer, machine) = ReplicatedLog::new(replica.clone(), log);
        p2.borrow_mut().insert(g, Rc::new(proposer));
        machine
    })
    .await
    .expect("the node starts");
    // Wait until every group is led by its preferred node, as every node sees it.
    loop {
        glommio::timer::sleep(Duration::from_millis(10)).await;
        for (g, st) in node.status() {
            if st.role == StateRole::Leader {
                leaders.lock().unwrap().insert(g as u32, me);
            } else {
                let mut l = leaders.lock().unwrap();
                if l.get(&(g as u32)) == Some(&me) {
                    l.remove(&(g as u32));
                }
            }
        }
        let l = leaders.lock().unwrap();
        let done = (0..shape.groups).all(|g| l.get(&g) == placement::replicas(g, &ids).first());
        if done {
            break;
        }
    }
    // Every node stops looking before any starts writing.
    together(&settled).await;
    let mine: Vec<(u64, Rc<ReplicatedLog<DiskStorage>>)> = node
        .status()
        .iter()
        .filter(|(_, st)| st.role == StateRole::Leader)
        .map(|(&g, _)| (g, proposers.borrow()[&g].clone()))
        .collect();
    let payload = Rc::new(vec![b'x'; EVENT_BYTES]);
    let measured = Rc::new(RefCell::new(Measured {
        latency: Some(Histogram::new_with_bounds(1, 60_000_000, 3).unwrap()),
        ..Measured::default()
    }));

    // Closed loop: writers per group, each commit after the last.
    let end = Instant::now() + Duration::from_secs_f64(shape.secs);
    let mut tasks = Vec::new();
    for (_, log) in &mine {
        for _ in 0..shape.writers {
            let (log, payload, m) = (log.clone(), payload.clone(), measured.clone());
            tasks.push(glommio::spawn_local(async move {
                let e = events(&payload, shape.batch);
                while Instant::now() < end {
                    match log.commit(&e).await {
                        Ok(_) if Instant::now() <= end => {
                            m.borrow_mut().closed_commits += shape.batch
                        }
                        Ok(_) => {}
                        Err(e) => {
                            {
                                let mut m = m.borrow_mut();
                                m.closed_failed += shape.batch;
                                *m.why.entry(why(&e)).or_default() += 1;
                            }
                            // As a client would, and not to spin: this writer does not
                            // follow a leadership that moved.
                            glommio::timer::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
            }));
        }
    }
    for t in tasks {
        t.await;
    }
    glommio::timer::sleep(Duration::from_millis(200)).await;
    together(&settled).await;
    let cpu_before = process_cpu();

    // Open loop: each group's share of the rate, every event at its due time.
    let start = Instant::now() + Duration::from_millis(50);
    // Commits per second per group: the rate is in events.
    let per_group = shape.rate as f64 / f64::from(shape.groups) / shape.batch as f64;
    let total = (per_group * shape.secs) as u64;
    let mut tasks = Vec::new();
    for (g, log) in &mine {
        let (log, payload, m) = (log.clone(), payload.clone(), measured.clone());
        // Each group's schedule starts its share of a period later: sends spread evenly,
        // not every group's at the same instants.
        let phase = *g as f64 / f64::from(shape.groups);
        tasks.push(glommio::spawn_local(async move {
            // Sends in flight, counted rather than kept: 250,000 finished tasks held to
            // the end grew the heap a page at a time (page faults were 8% of a profile),
            // and RF=1's largest wait fell from 80 to 10 ms without them.
            let in_flight = Rc::new(std::cell::Cell::new(0u64));
            for k in 0..total {
                let due = start + Duration::from_secs_f64((k as f64 + phase) / per_group);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    glommio::timer::sleep(wait).await;
                }
                let (log, payload, m) = (log.clone(), payload.clone(), m.clone());
                let done = in_flight.clone();
                done.set(done.get() + 1);
                glommio::spawn_local(async move {
                    let e = events(&payload, shape.batch);
                    let answer = log.commit(&e).await;
                    let us = due.elapsed().as_micros() as u64;
                    let mut m = m.borrow_mut();
                    m.open_sent += shape.batch;
                    let slot = (due - start).as_millis() as u64 / 100;
                    keep_worst(&mut m.timeline, slot, us);
                    match answer {
                        Ok(_) => m.latency.as_mut().unwrap().saturating_record(us.max(1)),
                        Err(e) => {
                            m.open_failed += shape.batch;
                            *m.why.entry(why(&e)).or_default() += 1;
                        }
                    }
                    done.set(done.get() - 1);
                })
                .detach();
            }
            while in_flight.get() > 0 {
                glommio::timer::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    for t in tasks {
        t.await;
    }
    // Nodes stop together, so no group loses its majority while others still write.
    together(&settled).await;
    // The whole process's: every node's executor and the kernel workers of its fsyncs (so
    // each node reports it, and the cluster's figure is one node's).
    measured.borrow_mut().open_cpu = process_cpu() - cpu_before;
    node.stop(false).await.expect("storage");
    Rc::try_unwrap(measured)
        .ok()
        .expect("the writers are done")
        .into_inner()
}

/// Runs a cluster of `n` nodes and sums what they measured.
fn run(n: usize, shape: Shape) -> Measured {
    let tmp = tempfile::tempdir().unwrap();
    let nodes: BTreeMap<u64, SocketAddr> = (1..).zip(free_addrs(n)).collect();
    let settled = Arc::new(Barrier::new(n));
    let leaders = Arc::new(Mutex::new(BTreeMap::new()));
    let threads: Vec<_> = nodes
        .keys()
        .map(|&me| {
            let (nodes, dir) = (nodes.clone(), tmp.path().join(format!("node-{me}")));
            let (settled, leaders) = (settled.clone(), leaders.clone());
            std::thread::spawn(move || {
                glommio::LocalExecutorBuilder::default()
                    .make()
                    .expect("executor")
                    .run(node_main(me, nodes, dir, shape, settled, leaders))
            })
        })
        .collect();
    let mut sum = Measured {
        latency: Some(Histogram::new_with_bounds(1, 60_000_000, 3).unwrap()),
        ..Measured::default()
    };
    for t in threads {
        let m = t.join().expect("a node");
        sum.closed_commits += m.closed_commits;
        sum.closed_failed += m.closed_failed;
        sum.open_sent += m.open_sent;
        sum.open_failed += m.open_failed;
        sum.open_cpu = sum.open_cpu.max(m.open_cpu);
        for (w, n) in m.why {
            *sum.why.entry(w).or_default() += n;
        }
        for (slot, us) in m.timeline {
            keep_worst(&mut sum.timeline, slot, us);
        }
        sum.latency
            .as_mut()
            .unwrap()
            .add(m.latency.unwrap())
            .unwrap();
    }
    sum
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let shape = if full {
        Shape {
            groups: env("CHORUS_BENCH_GROUPS", 16) as u32,
            batch: env("CHORUS_BENCH_BATCH", 1),
            writers: env("CHORUS_BENCH_WRITERS", 64),
            rate: env("CHORUS_BENCH_RATE", 50_000),
            secs: env("CHORUS_BENCH_SECS", 15) as f64,
        }
    } else {
        Shape {
            groups: 4,
            batch: 2,
            writers: 4,
            rate: 1_000,
            secs: 0.5,
        }
    };
    println!(
        "replicated commits: {} groups, {} writers per group (closed loop), {} events/s (open loop), {} s each, {EVENT_BYTES}-byte events, {} per commit",
        shape.groups, shape.writers, shape.rate, shape.secs, shape.batch
    );
    println!("| cluster | committed/s (closed loop) | open loop: p50 / p99 / max | open loop: CPU per event, cores busy | failed |");
    println!("|---|---|---|---|---|");
    let mut rates = Vec::new();
    // `CHORUS_BENCH_NODES=3` (or 1): that cluster alone, as for a profile.
    let only = std::env::var("CHORUS_BENCH_NODES").ok();
    for n in [3, 1] {
        if only.as_ref().is_some_and(|o| *o != n.to_string()) {
            continue;
        }
        let m = run(n, shape);
        let rate = m.closed_commits as f64 / shape.secs;
        rates.push(rate);
        let h = m.latency.unwrap();
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1_000.0;
        let why: Vec<String> = m.why.iter().map(|(w, n)| format!("{n} {w}")).collect();
        let cpu = m.open_cpu.as_secs_f64();
        println!(
            "| RF={} ({n} node{}) | {rate:.0} | {:.2} / {:.2} / {:.2} ms ({} sent) | {:.1} µs, {:.2} | {} closed, {} open{} |",
            n.min(3),
            if n == 1 { "" } else { "s" },
            ms(0.5),
            ms(0.99),
            h.max() as f64 / 1_000.0,
            m.open_sent,
            cpu * 1e6 / m.open_sent.max(1) as f64,
            cpu / shape.secs,
            m.closed_failed,
            m.open_failed,
            if why.is_empty() { String::new() } else { format!(" ({})", why.join(", ")) }
        );
        // CHORUS_BENCH_WRITERS=0 leaves the closed loop out (the open loop alone, on
        // groups no closed loop has filled first).
        assert!(
            shape.writers == 0 || m.closed_commits > 0,
            "nothing was committed"
        );
        assert!(m.open_sent > 0, "nothing was sent at the fixed rate");
        if std::env::var_os("CHORUS_BENCH_TIMELINE").is_some() {
            let slow: Vec<String> = m
                .timeline
                .iter()
                .filter(|(_, &us)| us >= 5_000)
                .map(|(slot, us)| {
                    format!(
                        "{:.1} s: {:.1} ms",
                        *slot as f64 / 10.0,
                        *us as f64 / 1_000.0
                    )
                })
                .collect();
            println!(
                "  slowest commit per 100 ms, where ≥ 5 ms: {}",
                slow.join(", ")
            );
        }
    }
    if shape.writers > 0 && rates.len() == 2 {
        println!("RF=3 throughput / RF=1: {:.2}", rates[0] / rates[1]);
    }
}
