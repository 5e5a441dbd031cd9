//! Presence at scale, in one process (issue 13's benchmark, in the engine and the session
//! core rather than over sockets): `CHORUS_BENCH_CONNS` connections (19,000), each its own
//! user in one workspace and each watching `CHORUS_BENCH_WATCH` (100) users chosen at
//! random, so 1.9M subscriptions; then `CHORUS_BENCH_CHANGE_PCT` (5) percent of the users
//! change status every second (a connection reports idle, or active again) for
//! `CHORUS_BENCH_SECS` (20) seconds.
//!
//! Measured:
//! - **Memory per subscription**: the bytes the allocator holds after every watch is
//!   registered, less before, over the number of subscriptions (the owner's watcher lists
//!   and the dispatchers' watched sets), plus the session core's own watched map, measured
//!   on `CHORUS_BENCH_SESSIONS` (1,000) cores fed the same `presence:sub`.
//! - **Server CPU per status change delivered**: the process's CPU time less the bench
//!   thread's own, over the update records taken out of the subscriber queues.
//! - **Change → window latency**: from the activity report to the window holding its
//!   record in each watcher's queue, polled every millisecond. The watcher's shard gathers
//!   a connection's records into a window of `presence_flush_ms` and pushes it whole when
//!   it ends (see `DESIGN.md`), so this includes the window: it is when the `presence`
//!   frame can go. The run fails if no record reached a watcher (it measured nothing:
//!   until 2026-12-05 this bench read only lone records, and since windows came it had
//!   counted none).
//!
//! Run it with `cargo bench -p chorus-bench --bench presence`. Without `--bench` (under
//! `cargo test --benches`) every size shrinks to a smoke test. `CHORUS_BENCH_SHARDS` (2).

use chorus_engine::ids::UserId;
use chorus_engine::presence::{Update, WatchOp};
use chorus_engine::{Engine, EngineConfig, EngineError, Subscription};
use chorus_gateway::session::{Answer, Call, Limits, SessionConfig, SessionCore};
use futures::executor::block_on;
use futures::stream::{FuturesUnordered, StreamExt};
use std::alloc::{GlobalAlloc, Layout, System};
use std::future::Future;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

/// The system allocator, counting the bytes it holds.
struct Counting;

static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is passed to the system allocator unchanged; the counter only adds.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's layout, as given.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: a block this allocator gave out, with its layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live() -> isize {
    LIVE_BYTES.load(Ordering::Relaxed)
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A seeded generator (SplitMix64).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) % n as u64) as usize
    }
}

/// Runs `call(i)` for every `i` below `count`, `in_flight` at a time, in order of `i`.
fn fan<T, F, Fut>(count: usize, in_flight: usize, call: F) -> Vec<T>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<T, EngineError>>,
{
    block_on(async {
        let mut out: Vec<(usize, T)> = Vec::with_capacity(count);
        let mut pending = FuturesUnordered::new();
        let mut next = 0;
        loop {
            while pending.len() < in_flight && next < count {
                let (i, fut) = (next, call(next));
                next += 1;
                pending.push(async move { (i, fut.await) });
            }
            let Some((i, r)) = pending.next().await else {
                break;
            };
            out.push((i, r.unwrap_or_else(|e| panic!("call {i}: {e}"))));
        }
        out.sort_by_key(|(i, _)| *i);
        out.into_iter().map(|(_, t)| t).collect()
    })
}

/// CPU seconds of the whole process, and of the calling thread.
fn cpu_s() -> (f64, f64) {
    let read = |clock| {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes the timespec it is given.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
    };
    (
        read(libc::CLOCK_PROCESS_CPUTIME_ID),
        read(libc::CLOCK_THREAD_CPUTIME_ID),
    )
}

struct NoLimits;

impl Limits for NoLimits {
    fn take_rate(&self, _: UserId) -> Result<(), chorus_gateway::error::ApiError> {
        Ok(())
    }
    fn typing_allowed(&self, _: UserId, _: chorus_engine::ids::ChannelId) -> bool {
        true
    }
}

/// Bytes the session core keeps per watched user: `sessions` cores, each fed a
/// `presence:sub` of `watch` users and its answer.
fn session_bytes_per_watch(sessions: usize, watch: usize, users: &[UserId]) -> f64 {
    let config = SessionConfig {
        heartbeat_interval_s: 30,
        frame_bytes_max: 1 << 20,
        presence_flush: Duration::from_millis(250),
    };
    let now = Instant::now();
    let mut rng = Rng(7);
    let mut cores: Vec<SessionCore> = (0..sessions)
        .map(|i| SessionCore::new(users[i % users.len()], i as u64, config, now))
        .collect();
    for core in &mut cores {
        core.handle_timeout(now + Duration::from_secs(1));
        let _ = core.poll_call();
        core.handle_answer(now, Answer::Started(true), &NoLimits);
        while core.poll_transmit().is_some() {}
    }
    let frames: Vec<String> = (0..sessions)
        .map(|_| {
            let ids: Vec<String> = (0..watch)
                .map(|_| users[rng.below(users.len())].to_string())
                .collect();
            serde_json::json!({"type": "presence:sub", "ref": 1, "user_ids": ids}).to_string()
        })
        .collect();
    let before = live();
    for (core, frame) in cores.iter_mut().zip(&frames) {
        core.handle_text(now, frame, &NoLimits);
        let Some(Call::PresenceSub { users, .. }) = core.poll_call() else {
            panic!("a presence call");
        };
        let found = users
            .into_iter()
            .map(|u| (u, chorus_engine::presence::Presence::OFFLINE, 0))
            .collect();
        core.handle_answer(
            now,
            Answer::PresenceSub {
                reference: serde_json::json!(1),
                result: Ok(found),
            },
            &NoLimits,
        );
        while core.poll_transmit().is_some() {}
    }
    let after = live();
    drop(frames);
    (after - before) as f64 / (sessions * watch) as f64
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let smoke = !args.iter().any(|a| a == "--bench") || args.iter().any(|a| a == "--test");
    let size = |name, full, small| env_or(name, if smoke { small } else { full });
    let conns = size("CHORUS_BENCH_CONNS", 19_000, 300);
    let watch = size("CHORUS_BENCH_WATCH", 100, 20).min(conns);
    let change_pct = size("CHORUS_BENCH_CHANGE_PCT", 5, 5);
    let secs = size("CHORUS_BENCH_SECS", 20, 2);
    let sessions = size("CHORUS_BENCH_SESSIONS", 1_000, 50);
    let shards = env_or("CHORUS_BENCH_SHARDS", 2);
    println!(
        "presence: {conns} connections x {watch} watched users, {change_pct}%/s changing, \
         {secs} s, {shards} shards; load average {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = EngineConfig::new(dir.path());
    config.shards = shards;
    config.pin = false;
    let engine = Engine::open(config).expect("open the engine");
    let owner = block_on(engine.create_user("owner@bench.example", "Owner", "$argon2id$bench"))
        .expect("owner");
    let ws = block_on(engine.create_workspace(owner.id, "bench")).expect("workspace");
    let email = |i: usize| format!("u{i}@bench.example");
    let users: Vec<UserId> = fan(conns, 256, |i| {
        let (engine, email) = (&engine, email(i));
        async move {
            let u = engine
                .create_user(&email, "User", "$argon2id$bench")
                .await?;
            engine.add_member(owner.id, ws.id, &email).await?;
            Ok(u.id)
        }
    });
    eprintln!("{conns} users in the workspace");

    let mut subs: Vec<Subscription> = fan(conns, 256, |i| engine.subscribe(users[i]));
    let mut rng = Rng(1);
    let watched: Vec<Vec<UserId>> = (0..conns)
        .map(|_| (0..watch).map(|_| users[rng.below(conns)]).collect())
        .collect();
    let controls: Vec<_> = subs.iter().map(Subscription::control).collect();
    // Let the connection reports settle before measuring.
    std::thread::sleep(Duration::from_millis(500));
    let before = live();
    let acked: Vec<usize> = fan(conns, 64, |i| {
        let (control, list) = (&controls[i], watched[i].clone());
        async move {
            let found = control.watch_presence(WatchOp::Set, list).await?;
            Ok(found.len())
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    let after = live();
    let targets: usize = watched
        .iter()
        .map(|w| {
            let mut w = w.clone();
            w.sort_unstable();
            w.dedup();
            w.len()
        })
        .sum();
    assert_eq!(acked.iter().sum::<usize>(), targets);
    let engine_bytes = (after - before) as f64 / targets as f64;
    let session_bytes = session_bytes_per_watch(sessions, watch, &users);
    println!(
        "memory per subscription: engine {engine_bytes:.1} B (owner + dispatcher), \
         session core {session_bytes:.1} B, total {:.1} B ({targets} subscriptions)",
        engine_bytes + session_bytes
    );

    // Status changes: every 10 ms a share of the users flips between idle and active; each
    // flip is one change shown to that user's watchers.
    let index: std::collections::HashMap<UserId, usize> =
        users.iter().enumerate().map(|(i, u)| (*u, i)).collect();
    let mut active = vec![true; conns];
    let mut flipped_at: Vec<Option<Instant>> = vec![None; conns];
    let mut hist = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
    let tick = Duration::from_millis(10);
    let per_tick = conns as f64 * change_pct as f64 / 100.0 / 100.0;
    let (mut owed, mut changes, mut records) = (0.0, 0u64, 0u64);
    let mut batch = Vec::new();
    let (cpu0, mine0) = cpu_s();
    let started = Instant::now();
    let mut next_tick = started;
    while started.elapsed() < Duration::from_secs(secs as u64) {
        if Instant::now() >= next_tick {
            next_tick += tick;
            owed += per_tick;
            while owed >= 1.0 {
                owed -= 1.0;
                let i = rng.below(conns);
                active[i] = !active[i];
                flipped_at[i] = Some(Instant::now());
                block_on(controls[i].report_activity(active[i])).expect("activity");
                changes += 1;
            }
        }
        let mut got = 0;
        for sub in subs.iter_mut() {
            let _ = sub.try_recv_batch(&mut batch, 256);
            for frame in batch.drain(..) {
                // Records come in windows, each pushed whole when it ends
                // (`presence::window_start`); a lone record is read as well.
                let records: Vec<&[u8]> = match chorus_engine::presence::is_window(&frame) {
                    true => chorus_engine::presence::window_records(&frame).collect(),
                    false => vec![&frame[..]],
                };
                for record in records {
                    let Some(update) = Update::decode(record) else {
                        continue;
                    };
                    got += 1;
                    if let Some(at) = flipped_at[index[&update.user]] {
                        hist.record(at.elapsed().as_micros() as u64)
                            .expect("record");
                    }
                }
            }
        }
        records += got;
        if got == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let wall = started.elapsed().as_secs_f64();
    let (cpu1, mine1) = cpu_s();
    let server_cpu = (cpu1 - cpu0) - (mine1 - mine0);
    println!(
        "{changes} changes ({:.0}/s), {records} records delivered ({:.0}/s); server CPU \
         {server_cpu:.2} s = {:.2} us per change delivered ({:.2} cores)",
        changes as f64 / wall,
        records as f64 / wall,
        server_cpu * 1e6 / records.max(1) as f64,
        server_cpu / wall
    );
    println!(
        "change -> its window in the watcher's queue (the window, presence_flush_ms = 250, \
         included): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        hist.value_at_quantile(0.5) as f64 / 1e3,
        hist.value_at_quantile(0.99) as f64 / 1e3,
        hist.max() as f64 / 1e3,
    );
    // A run that delivered nothing measured nothing: it must not pass for a figure.
    assert!(records > 0, "no presence record reached a watcher");
    drop(subs);
    engine.shutdown();
}
