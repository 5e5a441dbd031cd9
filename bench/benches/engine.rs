//! The whole engine in one process, against the targets of its issue: sustained fan-out,
//! post-to-queue latency under an open-loop load, one very large channel, and restart time.
//!
//! Run it with `cargo bench -p chorus-bench --bench engine`. It prints the machine it ran on,
//! progress on stderr, and then a markdown table with one row per scenario, each number the
//! median of `CHORUS_BENCH_RUNS` runs (3) unless the row says otherwise. Every engine has
//! `CHORUS_BENCH_SHARDS` shards (2), `CHORUS_BENCH_PARTITIONS` partitions (16, the engine's
//! default), and `pin = true` (unpinned, and said so, if pinning fails). With the defaults
//! the whole run takes about two minutes.
//!
//! 1. **Sustained deliveries/s.** `CHORUS_BENCH_USERS` users (10,000), each subscribed, in
//!    channels of `CHORUS_BENCH_CHANNEL_MEMBERS` (50); each user is in
//!    `CHORUS_BENCH_CHANNELS_PER_USER` channels (1, so 200 channels). The workspace owner
//!    creates the channels and then leaves them, so every channel has exactly 50 members,
//!    all subscribed. `CHORUS_BENCH_POSTERS` threads (2) each keep `CHORUS_BENCH_IN_FLIGHT`
//!    posts (512) in flight (closed loop, as fast as the engine answers), spread over every
//!    channel; `CHORUS_BENCH_CONSUMERS` threads (2) own the subscriptions and drain them
//!    round-robin with `try_recv_batch`. Measured: frames taken out of subscriber queues per
//!    second over `CHORUS_BENCH_SECS` (5 s), after a warm-up.
//! 2. **Post-to-queue latency** at `CHORUS_BENCH_LATENCY_RATE` posts/s (5,000) over the same
//!    channels, so 50 recipients each, for `CHORUS_BENCH_LATENCY_SECS` (10 s) after a
//!    warm-up. The schedule is open loop: post `i` is due at `start + i / rate` and is sent
//!    then whatever happened to earlier posts, and latency is measured from that due time,
//!    so a stall cannot hide by delaying the posts behind it (coordinated omission). The due
//!    time travels in the message text. With `CHORUS_BENCH_LATENCY_CONSUMER=wake` (the
//!    default) each consumer thread runs one task per subscription that awaits `recv` and
//!    records `now - due` when woken; with `poll` the consumers poll round-robin as in
//!    scenario 1, which adds up to one pass over their queues to every latency. Each run
//!    also reports the cores the process kept busy, and the share of time the shard threads
//!    spent runnable but waiting for a CPU (`/proc/self/task/*/schedstat`), which tells a
//!    tail of the engine's own making from one of waiting for a core.
//! 3. **One channel of `CHORUS_BENCH_BIG_MEMBERS` (100,000) subscribed members.** Time from
//!    the start of a `post` call to the frame being in the queue of the last subscriber the
//!    dispatchers push to, over `CHORUS_BENCH_BIG_POSTS` (20) posts. The last subscriber of
//!    each shard is known because a dispatcher pushes in subscription order and the bench
//!    subscribes one sentinel per shard after all the others; after each post every queue
//!    is drained and counted, so a missing frame would show. Then every subscription is
//!    dropped at once and the bench reports whether and when the engine answers again.
//! 4. **Restart.** A data directory with `CHORUS_BENCH_RESTART_MESSAGES` (1,000,000)
//!    messages over [`RESTART_CHANNELS`] channels, and with `CHORUS_BENCH_RESTART_10M=1` also
//!    10,000,000; the time `Engine::open` takes to return, with a warm page cache, first
//!    from the snapshots the shutdown wrote (the wall time, and the CPU time it used, since
//!    a loaded machine stretches the wall time), then once with the snapshots removed, so
//!    that every partition replays its whole log.
//!
//! `CHORUS_BENCH_SCENARIOS` (`1,2,3,4`) picks scenarios; `CHORUS_BENCH_DIR` (the system
//! temporary directory) is where the data goes, and must allow O_DIRECT, as ext4 does.
//! Without the `--bench` argument that `cargo bench` passes (so under `cargo test --benches`)
//! or with criterion's `--test`, every size shrinks to a smoke test of a second or two.
//!
//! Everything runs on the same cores as the engine: on a small machine the posters and
//! consumers take CPU from the shards, and the numbers include that.

use chorus_bench::dir_bytes;
use chorus_bench::latency::{self, median};
use chorus_engine::domain::ChannelKind;
use chorus_engine::ids::{ChannelId, UserId, WorkspaceId};
use chorus_engine::{Engine, EngineConfig, EngineError, Subscription};
use futures::executor::{block_on, LocalPool};
use futures::stream::{FuturesUnordered, StreamExt};
use futures::task::LocalSpawnExt;
use hdrhistogram::Histogram;
use std::cell::Cell;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// Runs of every scenario whose median is reported.
const RUNS_DEFAULT: usize = 3;
/// Shards of every engine the bench opens: the issue's 2-core target.
const SHARDS_DEFAULT: usize = 2;
/// Channel partitions of every engine (the engine's default).
const PARTITIONS_DEFAULT: usize = 16;

/// Scenario 1 and 2: subscribed users.
const USERS_DEFAULT: usize = 10_000;
/// Scenario 1 and 2: members of each channel.
const CHANNEL_MEMBERS_DEFAULT: usize = 50;
/// Scenario 1 and 2: channels each user is in.
const CHANNELS_PER_USER_DEFAULT: usize = 1;
/// Scenario 1: the measured window of one run.
const SUSTAINED_SECS_DEFAULT: Duration = Duration::from_secs(5);
/// Scenario 1: load before the window opens, so that it starts in the steady state.
const SUSTAINED_WARMUP: Duration = Duration::from_secs(1);
/// Scenario 1: threads posting.
const POSTER_THREADS_DEFAULT: usize = 2;
/// Scenario 1: posts each poster thread keeps in flight.
const POSTS_IN_FLIGHT_PER_THREAD_DEFAULT: usize = 512;
/// Threads that own and drain the subscriptions (scenarios 1 and 2).
const CONSUMER_THREADS_DEFAULT: usize = 2;
/// Frames taken from one subscription in one `try_recv_batch`.
const RECV_BATCH_FRAMES_MAX: usize = 256;
/// A consumer that found every queue empty sleeps this long before the next pass.
const CONSUMER_IDLE_SLEEP: Duration = Duration::from_micros(100);
/// The text of every scenario-1 post: a short chat line.
const SUSTAINED_TEXT: &str = "the quick brown fox jumps over the lazy dog";

/// Scenario 2: posts per second.
const LATENCY_RATE_DEFAULT: u64 = 5_000;
/// Scenario 2: the measured window of one run.
const LATENCY_SECS_DEFAULT: Duration = Duration::from_secs(10);
/// Scenario 2: load before recording starts.
const LATENCY_WARMUP: Duration = Duration::from_secs(1);
/// Scenario 2: a consumer that found every queue empty sleeps this long.
const LATENCY_IDLE_SLEEP: Duration = Duration::from_micros(20);
/// Scenario 2: how long to wait for the last frames once every post is acknowledged.
const LATENCY_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Scenario 2: the marker before the run number and due time in a post's text.
const LATENCY_MARKER: &[u8] = b"bench-lat r";
/// The issue's p99 target for scenario 2.
const LATENCY_P99_TARGET_US: u64 = 2_000;

/// Scenario 3: members (and subscribers) of the one channel.
const BIG_MEMBERS_DEFAULT: usize = 100_000;
/// Scenario 3: posts timed.
const BIG_POSTS_DEFAULT: usize = 20;
/// Scenario 3: threads that drain the 100k queues between posts.
const BIG_DRAIN_THREADS: usize = 4;
/// Scenario 3: how long to wait for the engine after dropping every subscription.
const MASS_UNSUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(20);
/// The issue's target for scenario 3.
const BIG_TARGET: Duration = Duration::from_millis(50);

/// Scenario 4: messages in the data directory.
const RESTART_MESSAGES_DEFAULT: u64 = 1_000_000;
/// Scenario 4: messages in the large data directory (`CHORUS_BENCH_RESTART_10M=1`).
const RESTART_MESSAGES_LARGE: u64 = 10_000_000;
/// Scenario 4: opens timed of the large data directory; each replays all of it.
const RESTART_LARGE_RUNS: usize = 1;
/// Scenario 4: channels the messages are spread over.
const RESTART_CHANNELS: usize = 64;
/// Scenario 4: bytes of each message's text, about a line of chat.
const RESTART_TEXT_BYTES: usize = 100;
/// Scenario 4: the issue's target for 10M messages.
const RESTART_TARGET_10M: Duration = Duration::from_secs(3);

/// Setup: threads issuing calls concurrently.
const SETUP_THREADS: usize = 4;
/// Setup: calls each setup thread keeps in flight (a partition takes 1,024 per tick).
const SETUP_IN_FLIGHT_PER_THREAD: usize = 256;
/// The password hash every bench user gets; the engine stores it as given.
const PASSWORD_HASH: &str = "$argon2id$bench";
/// How long to wait for in-flight frames to stop arriving after the posters stop.
const QUIESCE_TIMEOUT: Duration = Duration::from_secs(10);
/// Consecutive unchanged readings, this far apart, that mean the queues are drained.
const QUIESCE_STEP: Duration = Duration::from_millis(50);

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing (and criterion's
    // convention is `--test`): anything but a real bench run gets the smoke-test sizes.
    let args: Vec<String> = std::env::args().collect();
    let test_mode = !args.iter().any(|a| a == "--bench") || args.iter().any(|a| a == "--test");
    let plan = Plan::from_env(test_mode);
    println!("{}", machine_facts(&plan));
    let mut rows = Vec::new();
    // Scenario 3 runs first, so that its memory figures start from an empty heap; it may
    // leave a wedged engine behind (see `mass_unsubscribe`), whose idle threads the later
    // scenarios run beside.
    let big_row = plan.wants(3).then(|| {
        let row = big_channel(&plan);
        eprintln!("{}", row.markdown());
        row
    });
    if plan.wants(1) || plan.wants(2) {
        let dir = plan.fresh_dir();
        let engine = open_engine(&plan, dir.path());
        let pop = Population::build(&engine, &plan);
        let mut slots = subscribe_all(&engine, &pop.users);
        if plan.wants(1) {
            rows.push(sustained(&plan, &pop, &mut slots));
            eprintln!("{}", rows.last().expect("row").markdown());
        }
        if plan.wants(2) {
            rows.push(latency_scenario(&plan, &pop, &mut slots));
            eprintln!("{}", rows.last().expect("row").markdown());
        }
        // Shut down before the subscriptions go: see `mass_unsubscribe`.
        engine.shutdown();
        drop(slots);
    }
    rows.extend(big_row);
    if plan.wants(4) {
        rows.extend(restart(&plan));
    }
    if PIN_FELL_BACK.load(Ordering::Relaxed) {
        println!("Pinning the shards failed at least once; those engines ran unpinned.\n");
    }
    println!("{}", table(&rows));
    println!("load average at the end: {}", read_trimmed("/proc/loadavg"));
}

/// Sizes and lengths, from the environment.
struct Plan {
    test_mode: bool,
    runs: usize,
    shards: usize,
    partitions: u32,
    scenarios: Vec<u32>,
    base: PathBuf,
    posters: usize,
    posts_in_flight: usize,
    consumers: usize,
    users: usize,
    channel_members: usize,
    channels_per_user: usize,
    sustained_secs: Duration,
    sustained_warmup: Duration,
    latency_rate: u64,
    latency_secs: Duration,
    latency_warmup: Duration,
    /// Scenario 2's consumers await each subscription instead of polling them.
    latency_waking: bool,
    big_members: usize,
    big_posts: usize,
    restart_messages: u64,
    restart_large: bool,
}

impl Plan {
    fn from_env(test_mode: bool) -> Plan {
        let scenarios = match std::env::var("CHORUS_BENCH_SCENARIOS") {
            Err(_) => vec![1, 2, 3, 4],
            Ok(text) => text
                .split(',')
                .map(|s| {
                    s.trim().parse().unwrap_or_else(|_| {
                        panic!("CHORUS_BENCH_SCENARIOS must list numbers 1 to 4, got {text:?}")
                    })
                })
                .collect(),
        };
        let base = std::env::var_os("CHORUS_BENCH_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        if test_mode {
            // Under `cargo test --benches` the bench only has to show that it works.
            return Plan {
                test_mode,
                runs: 1,
                shards: SHARDS_DEFAULT,
                partitions: PARTITIONS_DEFAULT as u32,
                scenarios,
                base,
                posters: POSTER_THREADS_DEFAULT,
                posts_in_flight: POSTS_IN_FLIGHT_PER_THREAD_DEFAULT,
                consumers: CONSUMER_THREADS_DEFAULT,
                users: 200,
                channel_members: 50,
                channels_per_user: 1,
                sustained_secs: Duration::from_millis(200),
                sustained_warmup: Duration::from_millis(50),
                latency_rate: 1_000,
                latency_secs: Duration::from_millis(200),
                latency_warmup: Duration::from_millis(50),
                latency_waking: true,
                big_members: 1_000,
                big_posts: 2,
                restart_messages: 2_000,
                restart_large: false,
            };
        }
        let secs = |name, default| chorus_bench::env_duration_secs(name, default);
        Plan {
            test_mode,
            runs: env_count("CHORUS_BENCH_RUNS", RUNS_DEFAULT),
            shards: env_count("CHORUS_BENCH_SHARDS", SHARDS_DEFAULT),
            partitions: env_count("CHORUS_BENCH_PARTITIONS", PARTITIONS_DEFAULT) as u32,
            scenarios,
            base,
            posters: env_count("CHORUS_BENCH_POSTERS", POSTER_THREADS_DEFAULT),
            posts_in_flight: env_count(
                "CHORUS_BENCH_IN_FLIGHT",
                POSTS_IN_FLIGHT_PER_THREAD_DEFAULT,
            ),
            consumers: env_count("CHORUS_BENCH_CONSUMERS", CONSUMER_THREADS_DEFAULT),
            users: env_count("CHORUS_BENCH_USERS", USERS_DEFAULT),
            channel_members: env_count("CHORUS_BENCH_CHANNEL_MEMBERS", CHANNEL_MEMBERS_DEFAULT),
            channels_per_user: env_count(
                "CHORUS_BENCH_CHANNELS_PER_USER",
                CHANNELS_PER_USER_DEFAULT,
            ),
            sustained_secs: secs("CHORUS_BENCH_SECS", SUSTAINED_SECS_DEFAULT),
            sustained_warmup: SUSTAINED_WARMUP,
            latency_rate: env_count("CHORUS_BENCH_LATENCY_RATE", LATENCY_RATE_DEFAULT as usize)
                as u64,
            latency_secs: secs("CHORUS_BENCH_LATENCY_SECS", LATENCY_SECS_DEFAULT),
            latency_warmup: LATENCY_WARMUP,
            latency_waking: match std::env::var("CHORUS_BENCH_LATENCY_CONSUMER").as_deref() {
                Err(_) | Ok("wake") => true,
                Ok("poll") => false,
                Ok(other) => {
                    panic!("CHORUS_BENCH_LATENCY_CONSUMER must be poll or wake, got {other:?}")
                }
            },
            big_members: env_count("CHORUS_BENCH_BIG_MEMBERS", BIG_MEMBERS_DEFAULT),
            big_posts: env_count("CHORUS_BENCH_BIG_POSTS", BIG_POSTS_DEFAULT),
            restart_messages: env_count(
                "CHORUS_BENCH_RESTART_MESSAGES",
                RESTART_MESSAGES_DEFAULT as usize,
            ) as u64,
            restart_large: std::env::var("CHORUS_BENCH_RESTART_10M").is_ok_and(|v| v == "1"),
        }
    }

    fn wants(&self, scenario: u32) -> bool {
        self.scenarios.contains(&scenario)
    }

    fn fresh_dir(&self) -> TempDir {
        tempfile::Builder::new()
            .prefix("chorus-bench-engine-")
            .tempdir_in(&self.base)
            .unwrap_or_else(|e| panic!("create a directory in {}: {e}", self.base.display()))
    }
}

/// A positive count from the environment variable `name`, or `default` when it is unset.
///
/// # Panics
///
/// If the variable is set to anything but a positive integer: a typo must not silently
/// become the default.
fn env_count(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Err(_) => default,
        Ok(text) => text
            .trim()
            .replace('_', "")
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .unwrap_or_else(|| panic!("{name} must be a positive integer, got {text:?}")),
    }
}

/// Starts a named thread in `scope`, so that profiles tell the harness from the shards.
fn spawn_named<'scope, T: Send + 'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    name: String,
    f: impl FnOnce() -> T + Send + 'scope,
) -> std::thread::ScopedJoinHandle<'scope, T> {
    std::thread::Builder::new()
        .name(name)
        .spawn_scoped(scope, f)
        .expect("start a thread")
}

/// One line of the result table.
struct Row {
    scenario: String,
    target: String,
    measured: String,
    runs: String,
    notes: String,
}

impl Row {
    fn markdown(&self) -> String {
        format!(
            "| {} | {} | {} | {} | {} |",
            self.scenario, self.target, self.measured, self.runs, self.notes
        )
    }
}

fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| scenario | target | measured (median) | runs | notes |\n|---|---|---|---|---|\n",
    );
    for r in rows {
        out.push_str(&r.markdown());
        out.push('\n');
    }
    out
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|e| format!("({path}: {e})"))
}

/// The value of a `key: value` line of a `/proc` file.
fn proc_field(path: &str, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().to_owned())
}

/// The process's resident memory, in MiB.
#[derive(Clone, Copy)]
struct Rss {
    /// Everything resident now, including mapped log segments the page cache holds.
    total: f64,
    /// Anonymous memory (the heap) resident now.
    anon: f64,
    /// The peak of `total`.
    peak: f64,
}

/// Hands freed heap memory back to the kernel, so that the resident set measured next
/// shows what is in use rather than what earlier scenarios left in the allocator.
/// CPU seconds (user + system) this process has used.
fn cpu_secs() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let usage = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` only releases free memory of glibc's allocator.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn rss_mib() -> Rss {
    let mib = |key| {
        proc_field("/proc/self/status", key)
            .and_then(|v| v.trim_end_matches("kB").trim().parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    Rss {
        total: mib("VmRSS"),
        anon: mib("RssAnon"),
        peak: mib("VmHWM"),
    }
}

fn machine_facts(plan: &Plan) -> String {
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = proc_field("/proc/cpuinfo", "model name").unwrap_or_default();
    let mem = proc_field("/proc/meminfo", "MemTotal").unwrap_or_default();
    format!(
        "## Chorus engine benchmark{}\n\n\
         - nproc: {nproc}; cpu: {cpu}; memory: {mem}\n\
         - kernel: {} ({})\n\
         - load average at the start: {}\n\
         - engine: {} shards, {} partitions, pin = true; data in {}\n\
         - posters, consumers and the shards share these cores, and other work may run on \
         the machine: the numbers include that.\n",
        if plan.test_mode {
            " (smoke test sizes)"
        } else {
            ""
        },
        read_trimmed("/proc/sys/kernel/osrelease"),
        read_trimmed("/proc/sys/kernel/version"),
        read_trimmed("/proc/loadavg"),
        plan.shards,
        plan.partitions,
        plan.base.display(),
    )
}

/// Set when an engine could not be opened pinned and was opened unpinned.
static PIN_FELL_BACK: AtomicBool = AtomicBool::new(false);

/// Opens an engine pinned to cores, or unpinned (noted in [`PIN_FELL_BACK`]) if that fails.
fn open_engine(plan: &Plan, dir: &Path) -> Engine {
    let mut config = EngineConfig::new(dir);
    config.shards = plan.shards;
    config.partitions = plan.partitions;
    config.pin = true;
    match Engine::open(config.clone()) {
        Ok(engine) => engine,
        Err(e) => {
            eprintln!("opening the engine pinned failed ({e}); opening it unpinned");
            config.pin = false;
            PIN_FELL_BACK.store(true, Ordering::Relaxed);
            Engine::open(config).expect("open the engine")
        }
    }
}

/// Runs `call(i)` for every `i` in `0..count` from [`SETUP_THREADS`] threads, each with
/// [`SETUP_IN_FLIGHT_PER_THREAD`] calls in flight, printing progress; returns the results
/// by index.
///
/// # Panics
///
/// If any call fails: a benchmark on a half-built population would measure nothing.
fn fan<T, F, Fut>(label: &str, count: usize, call: F) -> Vec<T>
where
    T: Send,
    F: Fn(usize) -> Fut + Sync,
    Fut: Future<Output = Result<T, EngineError>>,
{
    let lanes = SETUP_THREADS;
    let done = AtomicUsize::new(0);
    let step = (count / 5).max(1);
    let started = Instant::now();
    let mut out: Vec<(usize, T)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..lanes)
            .map(|lane| {
                let (call, done) = (&call, &done);
                spawn_named(s, format!("bench-setup-{lane}"), move || {
                    block_on(async move {
                        let mut got = Vec::new();
                        let mut pending = FuturesUnordered::new();
                        let mut next = lane;
                        loop {
                            while pending.len() < SETUP_IN_FLIGHT_PER_THREAD && next < count {
                                let (i, fut) = (next, call(next));
                                next += lanes;
                                pending.push(async move { (i, fut.await) });
                            }
                            let Some((i, result)) = pending.next().await else {
                                break;
                            };
                            got.push((i, result.unwrap_or_else(|e| panic!("{label} {i}: {e}"))));
                            let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                            if n.is_multiple_of(step) {
                                let secs = started.elapsed().as_secs_f64();
                                eprintln!("  {label}: {n}/{count} in {secs:.1} s");
                            }
                        }
                        got
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("a setup thread panicked"))
            .collect()
    });
    out.sort_unstable_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, v)| v).collect()
}

fn email(i: usize) -> String {
    format!("user{i}@bench.example")
}

/// The users and channels of scenarios 1 and 2.
struct Population {
    engine: Engine,
    users: Vec<UserId>,
    channels: Vec<ChannelId>,
    /// A member of each channel, who posts in it.
    posters: Vec<UserId>,
    /// Notes on the shape, for the table.
    shape: String,
}

impl Population {
    /// `users` users, each in `channels_per_user` public channels of exactly
    /// `channel_members` members. Membership slot `j` of user `u` is channel
    /// `j * (users / members) + perm_j(u) / members`, where `perm_j` multiplies by a stride
    /// coprime with the user count, so the groups of different slots differ.
    fn build(engine: &Engine, plan: &Plan) -> Population {
        let (n, m, k) = (plan.users, plan.channel_members, plan.channels_per_user);
        assert!(
            m > 0 && n >= m && n % m == 0,
            "CHORUS_BENCH_USERS ({n}) must be a multiple of CHORUS_BENCH_CHANNEL_MEMBERS ({m})"
        );
        let groups = n / m;
        let channel_count = k * groups;
        eprintln!("scenarios 1-2 setup: {n} users in {channel_count} channels of {m}");
        let started = Instant::now();
        let (owner, ws) = block_on(owner_and_workspace(engine));
        let users = fan("create_user", n, |i| async move {
            let (email, name) = (email(i), format!("User {i}"));
            let user = engine.create_user(&email, &name, PASSWORD_HASH).await;
            user.map(|u| u.id)
        });
        fan("add_member", n, |i| async move {
            engine.add_member(owner, ws, &email(i)).await.map(drop)
        });
        let channels = fan("create_channel", channel_count, |j| async move {
            let name = format!("c{j}");
            let c = engine
                .create_channel(owner, ws, &name, ChannelKind::Public)
                .await;
            c.map(|c| c.id)
        });
        let strides = coprime_strides(n, k, groups);
        let slot_channel = |u: usize, j: usize| j * groups + (u * strides[j] + j) % n / m;
        let mut members: Vec<Vec<usize>> = vec![Vec::new(); channel_count];
        for u in 0..n {
            for j in 0..k {
                members[slot_channel(u, j)].push(u);
            }
        }
        assert!(
            members.iter().all(|v| v.len() == m),
            "every channel has m members"
        );
        let (users_ref, channels_ref) = (&users, &channels);
        fan("join", n * k, |i| async move {
            let (u, j) = (i / k, i % k);
            let c = channels_ref[slot_channel(u, j)];
            engine.join(users_ref[u], c).await
        });
        fan("owner leaves", channel_count, |j| async move {
            engine
                .remove_channel_member(owner, channels_ref[j], owner)
                .await
        });
        let posters = members.iter().map(|v| users[v[0]]).collect();
        let secs = started.elapsed().as_secs_f64();
        eprintln!("scenarios 1-2 setup took {secs:.1} s");
        let shape = format!(
            "{n} subscribed users, {channel_count} public channels of {m}, {k} channel(s) per \
             user; setup {secs:.0} s"
        );
        Population {
            engine: engine.clone(),
            users,
            channels,
            posters,
            shape,
        }
    }
}

async fn owner_and_workspace(engine: &Engine) -> (UserId, WorkspaceId) {
    let owner = engine
        .create_user("owner@bench.example", "Owner", PASSWORD_HASH)
        .await
        .expect("create the owner");
    let ws = engine
        .create_workspace(owner.id, "bench")
        .await
        .expect("create the workspace");
    (owner.id, ws.id)
}

/// `k` multipliers coprime with `n`, so that `u -> u * s % n` permutes users; the first is
/// 1 and the others start past one group so that neighbours land in different channels.
fn coprime_strides(n: usize, k: usize, groups: usize) -> Vec<usize> {
    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    let mut strides = vec![1];
    let mut s = groups + 1;
    while strides.len() < k {
        if gcd(s, n) == 1 {
            strides.push(s);
        }
        s += 1;
    }
    strides
}

/// A subscription and whether it was cut off.
struct Slot {
    sub: Subscription,
    cut: bool,
}

fn subscribe_all(engine: &Engine, users: &[UserId]) -> Vec<Slot> {
    let started = Instant::now();
    let slots = fan("subscribe", users.len(), |i| async move {
        engine
            .subscribe(users[i])
            .await
            .map(|sub| Slot { sub, cut: false })
    });
    eprintln!(
        "{} subscriptions in {:.1} s",
        slots.len(),
        started.elapsed().as_secs_f64()
    );
    slots
}

fn sum(counters: &[AtomicU64]) -> u64 {
    counters.iter().map(|c| c.load(Ordering::Acquire)).sum()
}

/// Waits until `read` stops changing (the queues are drained), up to [`QUIESCE_TIMEOUT`].
fn quiesce(read: impl Fn() -> u64) {
    let deadline = Instant::now() + QUIESCE_TIMEOUT;
    let mut last = read();
    let mut steady = 0;
    while steady < 3 && Instant::now() < deadline {
        std::thread::sleep(QUIESCE_STEP);
        let now = read();
        steady = if now == last { steady + 1 } else { 0 };
        last = now;
    }
}

/// One run of scenario 1.
struct SustainedRun {
    deliveries_per_s: f64,
    posts_per_s: f64,
    deliveries_per_post: f64,
    cut: usize,
    errors: u64,
}

fn sustained(plan: &Plan, pop: &Population, slots: &mut [Slot]) -> Row {
    let mut runs = Vec::new();
    for run in 0..plan.runs {
        let r = sustained_run(plan, pop, slots);
        eprintln!(
            "sustained run {}/{}: {:.0} deliveries/s, {:.0} posts/s, {:.1} deliveries/post, \
             {} cut off, {} errors",
            run + 1,
            plan.runs,
            r.deliveries_per_s,
            r.posts_per_s,
            r.deliveries_per_post,
            r.cut,
            r.errors
        );
        runs.push(r);
    }
    let med = |f: fn(&SustainedRun) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
    let cut: usize = runs.iter().map(|r| r.cut).sum();
    let errors: u64 = runs.iter().map(|r| r.errors).sum();
    Row {
        scenario: "1. sustained deliveries/s".into(),
        target: "≥ 1,000,000/s".into(),
        measured: format!("{:.0}/s", med(|r| r.deliveries_per_s)),
        runs: format!("{} × {:.0} s", plan.runs, plan.sustained_secs.as_secs_f64()),
        notes: format!(
            "{}; {} poster threads × {} posts in flight, {} consumer threads; {:.0} posts/s, \
             {:.1} deliveries per \
             post; {cut} subscribers cut off, {errors} post errors; per run: {}",
            pop.shape,
            plan.posters,
            plan.posts_in_flight,
            plan.consumers,
            med(|r| r.posts_per_s),
            med(|r| r.deliveries_per_post),
            runs.iter()
                .map(|r| format!("{:.0}", r.deliveries_per_s))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn sustained_run(plan: &Plan, pop: &Population, slots: &mut [Slot]) -> SustainedRun {
    let delivered: Vec<AtomicU64> = (0..plan.consumers).map(|_| AtomicU64::new(0)).collect();
    let (stop_posting, stop_consuming) = (AtomicBool::new(false), AtomicBool::new(false));
    let (posts, errors) = (AtomicU64::new(0), AtomicU64::new(0));
    let per_consumer = slots.len().div_ceil(plan.consumers);
    std::thread::scope(|s| {
        let consumers: Vec<_> = slots
            .chunks_mut(per_consumer)
            .zip(&delivered)
            .enumerate()
            .map(|(i, (chunk, counter))| {
                let stop = &stop_consuming;
                spawn_named(s, format!("bench-consumer-{i}"), move || {
                    drain_loop(chunk, counter, stop, CONSUMER_IDLE_SLEEP, |_, _| {}).cut
                })
            })
            .collect();
        let posters: Vec<_> = (0..plan.posters)
            .map(|lane| {
                let (stop, posts, errors) = (&stop_posting, &posts, &errors);
                spawn_named(s, format!("bench-poster-{lane}"), move || {
                    post_closed_loop(plan, pop, lane, stop, posts, errors)
                })
            })
            .collect();
        std::thread::sleep(plan.sustained_warmup);
        let (d0, p0, t0) = (
            sum(&delivered),
            posts.load(Ordering::Acquire),
            Instant::now(),
        );
        std::thread::sleep(plan.sustained_secs);
        let (d1, p1, t1) = (
            sum(&delivered),
            posts.load(Ordering::Acquire),
            Instant::now(),
        );
        stop_posting.store(true, Ordering::Release);
        for p in posters {
            p.join().expect("a poster panicked");
        }
        quiesce(|| sum(&delivered));
        stop_consuming.store(true, Ordering::Release);
        let cut = consumers
            .into_iter()
            .map(|c| c.join().expect("a consumer panicked"))
            .sum();
        let secs = (t1 - t0).as_secs_f64();
        let all_posts = posts.load(Ordering::Acquire).max(1);
        SustainedRun {
            deliveries_per_s: (d1 - d0) as f64 / secs,
            posts_per_s: (p1 - p0) as f64 / secs,
            deliveries_per_post: sum(&delivered) as f64 / all_posts as f64,
            cut,
            errors: errors.load(Ordering::Acquire),
        }
    })
}

/// What a consumer saw.
struct Drained {
    /// Subscriptions found cut off.
    cut: usize,
    /// The mean time between two visits to the same queue, idle sleeps included.
    pass_mean: Duration,
}

/// Drains `slots` round-robin until `stop`, handing every batch taken to `each` with the
/// time it was taken and publishing the frames taken so far in `counter`; sleeps `idle`
/// after a pass that found every queue empty.
fn drain_loop(
    slots: &mut [Slot],
    counter: &AtomicU64,
    stop: &AtomicBool,
    idle: Duration,
    mut each: impl FnMut(&[bytes::Bytes], Instant),
) -> Drained {
    let mut frames = Vec::with_capacity(RECV_BATCH_FRAMES_MAX);
    let (mut total, mut cut, mut passes) = (0u64, 0usize, 0u64);
    let started = Instant::now();
    loop {
        passes += 1;
        // One more full pass after the stop, so nothing pushed before it is left behind.
        let stopping = stop.load(Ordering::Acquire);
        let mut pass = 0;
        for slot in slots.iter_mut().filter(|s| !s.cut) {
            match slot.sub.try_recv_batch(&mut frames, RECV_BATCH_FRAMES_MAX) {
                Ok(0) => {}
                Ok(_) => {
                    pass += frames.iter().filter(|f| !is_read_frame(f)).count();
                    each(&frames, Instant::now());
                }
                Err(_) => {
                    slot.cut = true;
                    cut += 1;
                }
            }
            frames.clear();
        }
        total += pass as u64;
        counter.store(total, Ordering::Release);
        if stopping {
            return Drained {
                cut,
                pass_mean: started.elapsed() / passes.max(1) as u32,
            };
        }
        if pass == 0 {
            std::thread::sleep(idle);
        }
    }
}

/// Keeps `plan.posts_in_flight` posts in flight until `stop`, over the channels `lane`,
/// `lane + plan.posters`, ... in turn, then waits for the ones in flight.
fn post_closed_loop(
    plan: &Plan,
    pop: &Population,
    lane: usize,
    stop: &AtomicBool,
    posts: &AtomicU64,
    errors: &AtomicU64,
) {
    let channels = pop.channels.len();
    block_on(async {
        let mut pending = FuturesUnordered::new();
        let mut next = lane;
        loop {
            while !stop.load(Ordering::Acquire) && pending.len() < plan.posts_in_flight {
                let c = next % channels;
                next += plan.posters;
                let post =
                    pop.engine
                        .post(pop.posters[c], pop.channels[c], SUSTAINED_TEXT, None, None);
                pending.push(post);
            }
            match pending.next().await {
                None => return,
                Some(Ok(_)) => posts.fetch_add(1, Ordering::Release),
                Some(Err(e)) => {
                    if errors.fetch_add(1, Ordering::Relaxed) == 0 {
                        eprintln!("post failed: {e}");
                    }
                    0
                }
            };
        }
    })
}

/// One run of scenario 2, in microseconds.
struct LatencyRun {
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
    max_us: u64,
    recorded: u64,
    /// How late the sender issued posts, p99: a floor under every latency.
    send_lag_p99_us: u64,
    /// p99 measured from the time the sender issued each post instead of its due time.
    from_send_p99_us: u64,
    /// Frames expected but never seen.
    missing: u64,
    /// The mean time between two polls of one queue (the slowest consumer's).
    pass_us: u64,
    cut: usize,
    errors: u64,
    /// Where the CPU went while the posts ran.
    cpu: CpuUse,
}

fn latency_scenario(plan: &Plan, pop: &Population, slots: &mut [Slot]) -> Row {
    let mut runs = Vec::new();
    for run in 0..plan.runs {
        let r = latency_run(plan, pop, slots, run as u8);
        eprintln!(
            "latency run {}/{}: p50 {} µs, p99 {} µs, p99.9 {} µs, max {} µs over {} \
             deliveries; sender lag p99 {} µs; p99 from the actual send {} µs; poll pass {} µs; \
             {} missing, {} cut off, {} errors; process CPU {:.2} cores (shards {:.2}), shard \
             threads waiting for a CPU {:.0}% of the time, load average {:.1}",
            run + 1,
            plan.runs,
            r.p50_us,
            r.p99_us,
            r.p999_us,
            r.max_us,
            r.recorded,
            r.send_lag_p99_us,
            r.from_send_p99_us,
            r.pass_us,
            r.missing,
            r.cut,
            r.errors,
            r.cpu.process_cores,
            r.cpu.shard_cores,
            r.cpu.shard_wait_share * 100.0,
            r.cpu.load_average,
        );
        runs.push(r);
    }
    let med = |f: fn(&LatencyRun) -> u64| {
        median(&runs.iter().map(|r| f(r) as f64).collect::<Vec<_>>()) as u64
    };
    let medf = |f: fn(&LatencyRun) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
    let p99 = med(|r| r.p99_us);
    let missing: u64 = runs.iter().map(|r| r.missing).sum();
    let cut: usize = runs.iter().map(|r| r.cut).sum();
    let errors: u64 = runs.iter().map(|r| r.errors).sum();
    Row {
        scenario: format!(
            "2. post → in recipient queue, {} msgs/s × {} recipients (open loop)",
            plan.latency_rate, plan.channel_members
        ),
        target: format!("p99 ≤ {} ms", LATENCY_P99_TARGET_US as f64 / 1000.0),
        measured: format!("p99 {:.2} ms", p99 as f64 / 1000.0),
        runs: format!("{} × {:.0} s", plan.runs, plan.latency_secs.as_secs_f64()),
        notes: format!(
            "p50 {} µs, p99.9 {} µs, max {} µs (medians of runs); latency from the scheduled \
             send time, observed by {}; sender lag p99 {} µs, p99 measured from the actual \
             send {} µs; per-run p99 µs: {}; {} \
             deliveries recorded per run; {missing} frames missing, {cut} cut off, {errors} \
             post errors; the process used {:.2} cores (shard threads {:.2}) and its shard \
             threads waited for a CPU {:.0}% of the time, load average {:.1}; population of \
             row 1",
            med(|r| r.p50_us),
            med(|r| r.p999_us),
            med(|r| r.max_us),
            if plan.latency_waking {
                format!(
                    "{} consumer threads awaiting `recv` (a task per subscription)",
                    plan.consumers
                )
            } else {
                format!(
                    "{} polling consumer threads, each queue polled every {} µs (mean)",
                    plan.consumers,
                    med(|r| r.pass_us)
                )
            },
            med(|r| r.send_lag_p99_us),
            med(|r| r.from_send_p99_us),
            runs.iter()
                .map(|r| r.p99_us.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            med(|r| r.recorded),
            medf(|r| r.cpu.process_cores),
            medf(|r| r.cpu.shard_cores),
            medf(|r| r.cpu.shard_wait_share) * 100.0,
            medf(|r| r.cpu.load_average),
        ),
    }
}

fn latency_run(plan: &Plan, pop: &Population, slots: &mut [Slot], run: u8) -> LatencyRun {
    let epoch = Instant::now();
    let received: Vec<AtomicU64> = (0..plan.consumers).map(|_| AtomicU64::new(0)).collect();
    let per_consumer = slots.len().div_ceil(plan.consumers);
    let stop = AtomicBool::new(false);
    // Posts start a little after the consumers, and recording after the warm-up.
    let start_ns = 20_000_000u64;
    let record_from_ns = start_ns + plan.latency_warmup.as_nanos() as u64;
    std::thread::scope(|s| {
        let mut wakers = Vec::new();
        let consumers: Vec<_> = slots
            .chunks_mut(per_consumer)
            .zip(&received)
            .enumerate()
            .map(|(i, (chunk, counter))| {
                let mark = Mark {
                    epoch,
                    run,
                    record_from_ns,
                };
                let stop = &stop;
                let (tx, rx) = futures::channel::oneshot::channel::<()>();
                wakers.push(tx);
                let waking = plan.latency_waking;
                spawn_named(s, format!("bench-consumer-{i}"), move || {
                    if waking {
                        await_latency(chunk, counter, mark, rx)
                    } else {
                        watch_latency(chunk, counter, mark, stop)
                    }
                })
            })
            .collect();
        let cpu_before = CpuSample::now();
        let sent = post_open_loop(plan, pop, epoch, start_ns, run);
        let cpu = CpuSample::now().since(&cpu_before);
        // Every subscriber of a channel is subscribed, so each post owes `members` frames.
        let expected = sent.acked * plan.channel_members as u64;
        let deadline = Instant::now() + LATENCY_DRAIN_TIMEOUT;
        while sum(&received) < expected && Instant::now() < deadline {
            std::thread::sleep(QUIESCE_STEP);
        }
        let seen = sum(&received);
        stop.store(true, Ordering::Release);
        for tx in wakers {
            let _ = tx.send(());
        }
        let mut all = Latencies::new();
        let (mut cut, mut pass_us) = (0, 0u64);
        for c in consumers {
            let (latencies, drained) = c.join().expect("a consumer panicked");
            all.add(&latencies);
            cut += drained.cut;
            pass_us = pass_us.max(drained.pass_mean.as_micros() as u64);
        }
        let histogram = &all.from_due;
        LatencyRun {
            p50_us: histogram.value_at_quantile(0.50),
            p99_us: histogram.value_at_quantile(0.99),
            p999_us: histogram.value_at_quantile(0.999),
            max_us: histogram.max(),
            recorded: histogram.len(),
            send_lag_p99_us: sent.lag.value_at_quantile(0.99),
            from_send_p99_us: all.from_send.value_at_quantile(0.99),
            missing: expected.saturating_sub(seen),
            pass_us,
            cut,
            errors: sent.errors,
            cpu,
        }
    })
}

/// CPU figures of this process at one moment: enough to tell, after a latency run, whether
/// its tail came from the engine's own work or from threads waiting for a core.
struct CpuSample {
    at: Instant,
    /// User plus system time of the whole process (exited threads included), in ticks.
    process_ticks: u64,
    /// Time the shard threads ran, and waited runnable for a CPU, in nanoseconds.
    shard_run_ns: u64,
    shard_wait_ns: u64,
}

/// What a [`CpuSample`] pair says about the time between them.
#[derive(Clone, Copy, Debug, Default)]
struct CpuUse {
    /// Cores the process kept busy (posters, consumers, shards and io_uring workers).
    process_cores: f64,
    /// Cores the shard threads kept busy.
    shard_cores: f64,
    /// Of the shard threads' run plus wait time, the share spent runnable but waiting for a CPU.
    shard_wait_share: f64,
    /// The one-minute load average at the end: other work on the machine.
    load_average: f64,
}

impl CpuSample {
    fn now() -> CpuSample {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
        let (mut run, mut wait) = (0, 0);
        for task in std::fs::read_dir("/proc/self/task")
            .into_iter()
            .flatten()
            .flatten()
        {
            let shard = std::fs::read_to_string(task.path().join("comm"))
                .is_ok_and(|c| c.starts_with("chorus-shard"));
            let Some(sched) = shard
                .then(|| std::fs::read_to_string(task.path().join("schedstat")).ok())
                .flatten()
            else {
                continue;
            };
            let mut numbers = sched
                .split_whitespace()
                .map(|n| n.parse::<u64>().unwrap_or(0));
            run += numbers.next().unwrap_or(0);
            wait += numbers.next().unwrap_or(0);
        }
        CpuSample {
            at: Instant::now(),
            process_ticks: field(11).unwrap_or(0) + field(12).unwrap_or(0),
            shard_run_ns: run,
            shard_wait_ns: wait,
        }
    }

    fn since(&self, before: &CpuSample) -> CpuUse {
        /// `/proc` reports CPU time in USER_HZ ticks, 100 per second in Linux's ABI.
        const TICKS_PER_S: f64 = 100.0;
        let secs = self.at.duration_since(before.at).as_secs_f64().max(1e-9);
        let run = self.shard_run_ns.saturating_sub(before.shard_run_ns) as f64;
        let wait = self.shard_wait_ns.saturating_sub(before.shard_wait_ns) as f64;
        let load_average = read_trimmed("/proc/loadavg")
            .split_whitespace()
            .next()
            .and_then(|l| l.parse().ok())
            .unwrap_or(0.0);
        CpuUse {
            process_cores: self.process_ticks.saturating_sub(before.process_ticks) as f64
                / TICKS_PER_S
                / secs,
            shard_cores: run / 1e9 / secs,
            shard_wait_share: if run + wait > 0.0 {
                wait / (run + wait)
            } else {
                0.0
            },
            load_average,
        }
    }
}

/// What a latency consumer needs to read the due time out of a frame.
#[derive(Clone, Copy)]
struct Mark {
    epoch: Instant,
    run: u8,
    record_from_ns: u64,
}

impl Mark {
    /// The text of a post due at `due_ns` and sent at `sent_ns` (after the epoch).
    fn text(&self, due_ns: u64, sent_ns: u64) -> String {
        // Keep in step with LATENCY_MARKER.
        format!("bench-lat r{:02} t{due_ns:020} s{sent_ns:020}", self.run)
    }

    /// The due and send times, in nanoseconds after the epoch, of a post of this run.
    fn times_ns(&self, frame: &[u8]) -> Option<(u64, u64)> {
        let text = std::str::from_utf8(frame).ok()?;
        let marker = std::str::from_utf8(LATENCY_MARKER).expect("ascii");
        let at = text.find(marker)? + marker.len();
        let digits = |from: usize, len: usize| -> Option<u64> {
            std::str::from_utf8(frame.get(from..from + len)?)
                .ok()?
                .parse()
                .ok()
        };
        let sent_at = at + 4 + 20;
        let run_matches = digits(at, 2)? == self.run as u64;
        if !run_matches || frame.get(at + 2..at + 4)? != b" t" {
            return None;
        }
        if frame.get(sent_at..sent_at + 2)? != b" s" {
            return None;
        }
        Some((digits(at + 4, 20)?, digits(sent_at + 2, 20)?))
    }

    /// Records a frame of this run seen at `now_ns`, if its post is past the warm-up.
    fn record(&self, frame: &[u8], now_ns: u64, into: &mut Latencies) {
        match self.times_ns(frame) {
            Some((due, sent)) if due >= self.record_from_ns => {
                let since = |t: u64| Duration::from_nanos(now_ns.saturating_sub(t));
                latency::record(&mut into.from_due, since(due));
                latency::record(&mut into.from_send, since(sent));
            }
            _ => {}
        }
    }
}

/// Whether a frame is a `read` frame (a poster's own marker moved with its post): the
/// scenarios count message deliveries, so these are left out of the counts.
fn is_read_frame(frame: &[u8]) -> bool {
    frame.starts_with(br#"{"type":"read""#)
}

/// Delivery latencies of one consumer, in microseconds.
struct Latencies {
    /// From the time the post was due: the measure of the scenario.
    from_due: Histogram<u64>,
    /// From the time the sender issued it, which leaves the sender's own lateness out.
    from_send: Histogram<u64>,
}

impl Latencies {
    fn new() -> Latencies {
        Latencies {
            from_due: latency::histogram_us(),
            from_send: latency::histogram_us(),
        }
    }

    fn add(&mut self, other: &Latencies) {
        self.from_due.add(&other.from_due).expect("same bounds");
        self.from_send.add(&other.from_send).expect("same bounds");
    }
}

/// Polls `slots` round-robin until `stop` and records `taken - due` for every frame of
/// this run; returns the histogram and what the consumer saw.
///
/// Polling rather than waiting on each subscription's waker keeps the cost of a push on the
/// shard as in scenario 1 (a wake per push is a cross-thread futex wake on this harness,
/// which is not what the gateway will pay), at the price of observing a frame up to one
/// pass late.
fn watch_latency(
    slots: &mut [Slot],
    counter: &AtomicU64,
    mark: Mark,
    stop: &AtomicBool,
) -> (Latencies, Drained) {
    let mut latencies = Latencies::new();
    let drained = drain_loop(slots, counter, stop, LATENCY_IDLE_SLEEP, |frames, taken| {
        let now_ns = taken.duration_since(mark.epoch).as_nanos() as u64;
        for frame in frames {
            mark.record(frame, now_ns, &mut latencies);
        }
    });
    (latencies, drained)
}

/// One task per subscription, woken by each push, recording `now - due` for every frame
/// of this run until `stop`; returns the histogram and what the consumer saw.
///
/// This is how an embedder that awaits `recv` sees frames: no polling delay, but every
/// push wakes a task on another thread, which the shard pays for.
fn await_latency(
    slots: &mut [Slot],
    counter: &AtomicU64,
    mark: Mark,
    stop: futures::channel::oneshot::Receiver<()>,
) -> (Latencies, Drained) {
    let latencies = std::cell::RefCell::new(Latencies::new());
    let cut = Cell::new(0usize);
    block_on(async {
        let mut watchers: FuturesUnordered<_> = slots
            .iter_mut()
            .filter(|s| !s.cut)
            .map(|slot| {
                let (latencies, cut) = (&latencies, &cut);
                async move {
                    loop {
                        let Ok(frame) = slot.sub.recv().await else {
                            slot.cut = true;
                            cut.set(cut.get() + 1);
                            return;
                        };
                        let now_ns = mark.epoch.elapsed().as_nanos() as u64;
                        if !is_read_frame(&frame) {
                            counter.fetch_add(1, Ordering::Release);
                        }
                        mark.record(&frame, now_ns, &mut latencies.borrow_mut());
                    }
                }
            })
            .collect();
        let all = async { while watchers.next().await.is_some() {} };
        futures::pin_mut!(all);
        futures::future::select(stop, all).await;
    });
    let drained = Drained {
        cut: cut.get(),
        pass_mean: Duration::ZERO,
    };
    (latencies.into_inner(), drained)
}

/// What the open-loop sender did.
struct Sent {
    acked: u64,
    errors: u64,
    /// How late each post was issued, in microseconds.
    lag: Histogram<u64>,
}

/// Issues post `i` at `start_ns + i / rate` (after the epoch), whatever happened to the
/// posts before it, round-robin over the channels; returns once every post is answered.
fn post_open_loop(plan: &Plan, pop: &Population, epoch: Instant, start_ns: u64, run: u8) -> Sent {
    let mark = Mark {
        epoch,
        run,
        record_from_ns: 0,
    };
    let interval_ns = 1_000_000_000 / plan.latency_rate;
    let window = plan.latency_warmup + plan.latency_secs;
    let total = window.as_nanos() as u64 / interval_ns;
    let mut pool = LocalPool::new();
    let spawner = pool.spawner();
    let (acked, errors) = (Rc::new(Cell::new(0u64)), Rc::new(Cell::new(0u64)));
    let mut lag = latency::histogram_us();
    for i in 0..total {
        let due = start_ns + i * interval_ns;
        let now = loop {
            pool.run_until_stalled();
            let now = epoch.elapsed().as_nanos() as u64;
            if now >= due {
                break now;
            }
            std::thread::sleep(Duration::from_nanos(due - now));
        };
        latency::record(&mut lag, Duration::from_nanos(now - due));
        let c = i as usize % pop.channels.len();
        let (engine, user, channel) = (pop.engine.clone(), pop.posters[c], pop.channels[c]);
        let text = mark.text(due, now);
        let (acked, errors) = (acked.clone(), errors.clone());
        spawner
            .spawn_local(async move {
                match engine.post(user, channel, &text, None, None).await {
                    Ok(_) => acked.set(acked.get() + 1),
                    Err(e) => {
                        if errors.get() == 0 {
                            eprintln!("post failed: {e}");
                        }
                        errors.set(errors.get() + 1);
                    }
                }
            })
            .expect("spawn a post");
        // Hand the post to its shard now, not at the next due time.
        pool.run_until_stalled();
    }
    pool.run();
    Sent {
        acked: acked.get(),
        errors: errors.get(),
        lag,
    }
}

/// Scenario 3: one channel whose every member is subscribed.
fn big_channel(plan: &Plan) -> Row {
    let n = plan.big_members;
    assert!(
        n > plan.shards,
        "CHORUS_BENCH_BIG_MEMBERS must exceed the shard count"
    );
    let dir = plan.fresh_dir();
    let engine = open_engine(plan, dir.path());
    trim_heap();
    let rss_before = rss_mib().total;
    let engine = &engine;
    eprintln!("scenario 3 setup: one channel of {n} members");
    let started = Instant::now();
    let (owner, ws) = block_on(owner_and_workspace(engine));
    let channel = block_on(engine.create_channel(owner, ws, "everyone", ChannelKind::Public))
        .expect("create the channel")
        .id;
    // The owner is member 0; the others are created, added and joined concurrently.
    let others = fan("create_user", n - 1, |i| async move {
        let (email, name) = (email(i), format!("User {i}"));
        let user = engine.create_user(&email, &name, PASSWORD_HASH).await;
        user.map(|u| u.id)
    });
    fan("add_member", n - 1, |i| async move {
        engine.add_member(owner, ws, &email(i)).await.map(drop)
    });
    let others_ref = &others;
    fan("join", n - 1, |i| async move {
        engine.join(others_ref[i], channel).await
    });
    let setup_secs = started.elapsed().as_secs_f64();
    let mut users = vec![owner];
    users.extend(others);
    trim_heap();
    let rss_setup = rss_mib().total;
    eprintln!("scenario 3 setup took {setup_secs:.1} s; RSS {rss_setup:.0} MiB");

    // A dispatcher pushes to a channel's subscribers in the order they subscribed, and a
    // subscriber lives on shard `user % shards`: the sentinels, one per shard and
    // subscribed after everyone else, are the last to get each frame on their shard.
    let shards = plan.shards as u64;
    let sentinel_ids: Vec<usize> = (0..shards)
        .map(|s| {
            (0..n)
                .rev()
                .find(|i| users[*i].0 % shards == s)
                .expect("a user on every shard")
        })
        .collect();
    let rest: Vec<UserId> = (0..n)
        .filter(|i| !sentinel_ids.contains(i))
        .map(|i| users[i])
        .collect();
    let started = Instant::now();
    let mut slots = subscribe_all(engine, &rest);
    let mut sentinels: Vec<Subscription> = sentinel_ids
        .iter()
        .map(|i| block_on(engine.subscribe(users[*i])).expect("subscribe a sentinel"))
        .collect();
    let subscribe_secs = started.elapsed().as_secs_f64();
    trim_heap();
    let Rss {
        total: rss_subscribed,
        peak: rss_peak,
        ..
    } = rss_mib();
    eprintln!(
        "{n} subscriptions in {subscribe_secs:.1} s; RSS {rss_subscribed:.0} MiB \
         (peak {rss_peak:.0} MiB)"
    );
    drain_all(&mut slots);

    let mut last_ms = Vec::new();
    let mut ack_ms = Vec::new();
    let mut missing = 0u64;
    for p in 0..plan.big_posts {
        let text = format!("a post to everyone, number {p}");
        let t0 = Instant::now();
        let (acked, seen) = block_on(async {
            let post = async {
                let r = engine.post(owner, channel, &text, None, None).await;
                r.expect("post to the big channel");
                Instant::now()
            };
            let watch = futures::future::join_all(sentinels.iter_mut().map(|s| async {
                s.recv().await.expect("a sentinel was cut off");
                Instant::now()
            }));
            futures::future::join(post, watch).await
        });
        let last = seen.iter().max().expect("a sentinel").duration_since(t0);
        last_ms.push(last.as_secs_f64() * 1e3);
        ack_ms.push(acked.duration_since(t0).as_secs_f64() * 1e3);
        let (frames, cut) = drain_all(&mut slots);
        missing += (rest.len() as u64).saturating_sub(frames);
        assert_eq!(cut, 0, "a big-channel subscriber was cut off");
        eprintln!(
            "  post {}/{}: last queue after {:.1} ms, ack after {:.1} ms, {frames} other \
             queues had it",
            p + 1,
            plan.big_posts,
            last_ms[p],
            ack_ms[p]
        );
    }
    let rss_peak = rss_mib().peak;
    let unsubscribed = mass_unsubscribe(engine, owner, slots, sentinels);
    let max = last_ms.iter().copied().fold(0.0, f64::max);
    Row {
        scenario: format!("3. one channel, {n} subscribers: post → last subscriber's queue"),
        target: format!("≤ {} ms", BIG_TARGET.as_millis()),
        measured: format!("{:.1} ms", median(&last_ms)),
        runs: format!("1 setup × {} posts", plan.big_posts),
        notes: format!(
            "max {max:.1} ms; post acknowledged after {:.1} ms (median); setup (create user, \
             add member, join ×{}) {setup_secs:.1} s, {n} subscribes {subscribe_secs:.1} s; \
             process RSS {rss_before:.0} MiB with the engine open, {rss_setup:.0} MiB after \
             setup, {rss_subscribed:.0} MiB subscribed ({:.1} KiB per subscription), peak \
             {rss_peak:.0} MiB; {missing} frames missing; then all {n} subscriptions dropped at \
             once: {unsubscribed}",
            median(&ack_ms),
            n - 1,
            (rss_subscribed - rss_setup) * 1024.0 / n as f64,
        ),
    }
}

/// Drops every subscription at once, as a gateway restart would, and reports how long the
/// engine takes to answer a request again; then shuts it down if it does.
///
/// A dropped `Subscription` sends its shard an `Unsubscribe` with `try_send`, and each one
/// makes the shard tell every partition; 100k of them overflow the shard inboxes. An engine
/// that never answers again is reported and left running (its `shutdown` would wait for
/// it forever), and the bench goes on.
fn mass_unsubscribe(
    engine: &Engine,
    user: UserId,
    slots: Vec<Slot>,
    sentinels: Vec<Subscription>,
) -> String {
    let (started, cpu_before) = (Instant::now(), shard_cpu_secs());
    drop(slots);
    drop(sentinels);
    let dropped = started.elapsed();
    let (tx, rx) = std::sync::mpsc::channel();
    let probe = engine.clone();
    std::thread::spawn(move || {
        let _ = tx.send(block_on(probe.user_channels(user)).is_ok());
    });
    match rx.recv_timeout(MASS_UNSUBSCRIBE_TIMEOUT) {
        Ok(_) => {
            let answered = started.elapsed();
            let (tx, rx) = std::sync::mpsc::channel();
            let closing = engine.clone();
            std::thread::spawn(move || {
                closing.shutdown();
                let _ = tx.send(());
            });
            let shutdown = match rx.recv_timeout(MASS_UNSUBSCRIBE_TIMEOUT) {
                Ok(()) => "shut down cleanly".to_owned(),
                Err(_) => format!(
                    "**`shutdown` did not return within {} s** (its `Shutdown` message is sent \
                     with `try_send` and is lost when the inbox is full)",
                    MASS_UNSUBSCRIBE_TIMEOUT.as_secs()
                ),
            };
            format!(
                "drops took {:.1} s, the engine answered again after {:.1} s, {shutdown}",
                dropped.as_secs_f64(),
                answered.as_secs_f64()
            )
        }
        Err(_) => format!(
            "**the engine did not answer within {} s** (left running; its shard threads used \
             {:.1} s of CPU meanwhile)",
            MASS_UNSUBSCRIBE_TIMEOUT.as_secs(),
            shard_cpu_secs() - cpu_before
        ),
    }
}

/// CPU time used so far by this process's shard threads, in seconds.
fn shard_cpu_secs() -> f64 {
    /// `/proc` reports CPU time in USER_HZ ticks, 100 per second in Linux's ABI.
    const TICKS_PER_S: f64 = 100.0;
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    let ticks: u64 = tasks
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|c| c.starts_with("chorus-shard"))
        })
        .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
        .map(|stat| {
            // Fields after the parenthesised name: utime and stime are the 12th and 13th.
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
            field(11).unwrap_or(0) + field(12).unwrap_or(0)
        })
        .sum();
    ticks as f64 / TICKS_PER_S
}

/// Empties every queue from [`BIG_DRAIN_THREADS`] threads; returns the frames taken and the
/// subscriptions found cut off.
fn drain_all(slots: &mut [Slot]) -> (u64, usize) {
    let per_thread = slots.len().div_ceil(BIG_DRAIN_THREADS).max(1);
    std::thread::scope(|s| {
        let threads: Vec<_> = slots
            .chunks_mut(per_thread)
            .enumerate()
            .map(|(i, chunk)| {
                spawn_named(s, format!("bench-drain-{i}"), move || {
                    let mut frames = Vec::with_capacity(RECV_BATCH_FRAMES_MAX);
                    let (mut taken, mut cut) = (0u64, 0usize);
                    for slot in chunk.iter_mut().filter(|s| !s.cut) {
                        loop {
                            match slot.sub.try_recv_batch(&mut frames, RECV_BATCH_FRAMES_MAX) {
                                Ok(0) => break,
                                Ok(n) => taken += n as u64,
                                Err(_) => {
                                    slot.cut = true;
                                    cut += 1;
                                    break;
                                }
                            }
                            frames.clear();
                        }
                    }
                    (taken, cut)
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("a drain thread panicked"))
            .fold((0, 0), |(a, b), (c, d)| (a + c, b + d))
    })
}

/// Scenario 4: restart time of a data directory of `restart_messages` messages, and of
/// 10M with `CHORUS_BENCH_RESTART_10M=1`.
fn restart(plan: &Plan) -> Vec<Row> {
    let dir = plan.fresh_dir();
    let engine = open_engine(plan, dir.path());
    let (owner, ws) = block_on(owner_and_workspace(&engine));
    let channel_count = if plan.test_mode { 4 } else { RESTART_CHANNELS };
    let channels = fan("create_channel", channel_count, |j| {
        let engine = &engine;
        async move {
            let name = format!("r{j}");
            let c = engine
                .create_channel(owner, ws, &name, ChannelKind::Public)
                .await;
            c.map(|c| c.id)
        }
    });
    let mut rows = Vec::new();
    let mut posted = 0;
    let mut engine = Some(engine);
    let mut sizes = vec![plan.restart_messages];
    if plan.restart_large && plan.restart_messages < RESTART_MESSAGES_LARGE {
        sizes.push(RESTART_MESSAGES_LARGE);
    }
    for (i, &size) in sizes.iter().enumerate() {
        let live = engine
            .take()
            .unwrap_or_else(|| open_engine(plan, dir.path()));
        eprintln!("scenario 4: posting messages {posted}..{size}");
        let started = Instant::now();
        post_many(&live, owner, &channels, posted, size);
        let post_rate = (size - posted) as f64 / started.elapsed().as_secs_f64();
        posted = size;
        live.shutdown();
        drop(live);
        let bytes = dir_bytes(dir.path());
        let runs = if i == 0 {
            plan.runs
        } else {
            RESTART_LARGE_RUNS
        };
        let (mut secs, mut heap) = (Vec::new(), Vec::new());
        for run in 0..runs {
            let (took, grew, replayed) = timed_open(plan, dir.path(), owner, channels[0]);
            assert_eq!(
                replayed, 0,
                "a clean shutdown leaves snapshots that cover the whole log"
            );
            secs.push(took);
            heap.push(grew);
            eprintln!(
                "  open {}/{runs} of {size} messages from snapshots: {took:.2} s, heap +{grew:.0} MiB",
                run + 1
            );
        }
        let med = median(&secs);
        let pro_rata = |size: u64| {
            if size < RESTART_MESSAGES_LARGE {
                format!(
                    " (pro rata {:.2} s)",
                    RESTART_TARGET_10M.as_secs_f64() * size as f64 / RESTART_MESSAGES_LARGE as f64
                )
            } else {
                String::new()
            }
        };
        rows.push(Row {
            scenario: format!("4. restart (Engine::open, snapshots) with {size} messages"),
            target: format!("10M < {} s{}", RESTART_TARGET_10M.as_secs(), pro_rata(size)),
            measured: format!("{med:.2} s ({:.0} msgs/s)", size as f64 / med),
            runs: format!("{runs} open(s)"),
            notes: format!(
                "{channel_count} channels, {RESTART_TEXT_BYTES}-byte texts, {:.0} MiB on disk, \
                 page cache warm; each partition loads the snapshot its shutdown wrote and \
                 replays no log; the open grew the heap by {:.0} MiB ({:.0} bytes per \
                 message); built at {post_rate:.0} posts/s; opens: {}",
                bytes as f64 / (1 << 20) as f64,
                median(&heap),
                median(&heap) * (1 << 20) as f64 / size as f64,
                secs.iter()
                    .map(|s| format!("{s:.2} s"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        });
        eprintln!("{}", rows.last().expect("row").markdown());
        // The same directory without its snapshots: the whole log is replayed, as after a
        // crash before the first snapshot. (Its shutdown writes the snapshots again.)
        for f in std::fs::read_dir(dir.path().join("snapshots")).expect("snapshots dir") {
            std::fs::remove_file(f.expect("entry").path()).expect("remove snapshot");
        }
        let (took, grew, replayed) = timed_open(plan, dir.path(), owner, channels[0]);
        eprintln!("  open of {size} messages replaying the whole log: {took:.2} s");
        rows.push(Row {
            scenario: format!("4. restart (Engine::open, no snapshot) with {size} messages"),
            target: "(comparison)".into(),
            measured: format!("{took:.2} s ({:.0} events/s)", replayed as f64 / took),
            runs: "1 open".into(),
            notes: format!(
                "the snapshots removed: every partition replays its whole log ({replayed} \
                 events); the open grew the heap by {grew:.0} MiB"
            ),
        });
        eprintln!("{}", rows.last().expect("row").markdown());
    }
    rows
}

/// Opens the engine on `dir` and reads one page, returning the seconds `Engine::open` took,
/// the MiB its state added to the heap, and the log events its partitions replayed.
fn timed_open(plan: &Plan, dir: &Path, owner: UserId, channel: ChannelId) -> (f64, f64, u64) {
    trim_heap();
    let before = rss_mib();
    let cpu_before = cpu_secs();
    let started = Instant::now();
    let reopened = open_engine(plan, dir);
    let took = started.elapsed().as_secs_f64();
    let cpu = cpu_secs() - cpu_before;
    eprintln!(
        "  open: {took:.2} s wall, {cpu:.2} CPU-s over {} shards ({:.2} s if each had a core)",
        plan.shards,
        cpu / plan.shards as f64
    );
    trim_heap();
    let grew = rss_mib().anon - before.anon;
    let replayed = reopened.recovery().iter().map(|r| r.replayed_events).sum();
    // The restored state must hold the last message posted.
    let page =
        block_on(reopened.history(owner, channel, None, 1)).expect("read history after restart");
    assert!(!page.messages.is_empty(), "history survived the restart");
    reopened.shutdown();
    (took, grew, replayed)
}

/// Posts messages `from..to` round-robin over `channels` as fast as the engine takes them.
fn post_many(engine: &Engine, user: UserId, channels: &[ChannelId], from: u64, to: u64) {
    let next = AtomicU64::new(from);
    let step = ((to - from) / 10).max(1);
    let started = Instant::now();
    std::thread::scope(|s| {
        for lane in 0..SETUP_THREADS {
            let next = &next;
            spawn_named(s, format!("bench-post-{lane}"), move || {
                block_on(async {
                    let mut pending = FuturesUnordered::new();
                    loop {
                        while pending.len() < SETUP_IN_FLIGHT_PER_THREAD * 2 {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            if i >= to {
                                break;
                            }
                            let c = channels[i as usize % channels.len()];
                            let text = restart_text(i);
                            pending.push(async move {
                                engine.post(user, c, &text, None, None).await.map(|_| i)
                            });
                        }
                        match pending.next().await {
                            None => return,
                            Some(Ok(i)) if (i - from + 1).is_multiple_of(step) => {
                                let secs = started.elapsed().as_secs_f64();
                                eprintln!("  posted about {} in {secs:.1} s", i - from + 1);
                            }
                            Some(Ok(_)) => {}
                            Some(Err(e)) => panic!("post {e}"),
                        }
                    }
                })
            });
        }
    });
}

fn restart_text(i: u64) -> String {
    let mut text = format!("restart message {i}: ");
    while text.len() < RESTART_TEXT_BYTES {
        text.push_str("lorem ipsum ");
    }
    text.truncate(RESTART_TEXT_BYTES);
    text
}
