//! Read state at scale (issue 13): a user in 1,000 channels asks `GET /unreads` (target p99
//! ≤ 5 ms), and marks channels read at 5,000 marks/s sustained, each mark moving a marker
//! forward (so each is a durable write), against the release `chorus` binary over HTTP.
//!
//! The data directory is seeded through the embedded engine (as the load harness seeds it):
//! a reader in `CHORUS_BENCH_UNREADS_CHANNELS` channels (1,000), each holding
//! `CHORUS_BENCH_UNREADS_MESSAGES` messages (60) from another member, a fifth of them
//! mentioning the reader and a tenth `@here`. Then, per run:
//!
//! 1. `GET /unreads` one request at a time for `CHORUS_BENCH_UNREADS_QUERIES` (2,000)
//!    requests, the server otherwise idle: latency from send to the whole body.
//! 2. Marks open loop at `CHORUS_BENCH_MARK_RATE` (5,000/s) for `CHORUS_BENCH_MARK_SECS`
//!    (10 s), each request due at `start + i / rate` and timed from its due time (so falling
//!    behind shows as latency), while `GET /unreads` goes on one at a time beside it.
//!
//! `CHORUS_BENCH_RUNS` (3) runs on a fresh server each, and the medians are printed. Build
//! the server first: `cargo build --release -p chorus-gateway`, then
//! `cargo bench -p chorus-bench --bench unreads`. The client shares the machine's cores
//! with the server: the figures are for the pair.

use chorus_bench::latency::{self, LatencySummary};
use chorus_bench::load::seed;
use chorus_bench::load::server::{self, ChorusServer, ServerSettings};
use chorus_bench::{env_duration_secs, env_u64};
use chorus_engine::domain::ChannelKind;
use chorus_engine::ids::{ChannelId, UserId};
use futures::executor::block_on;
use futures::stream::{FuturesUnordered, StreamExt};
use hdrhistogram::Histogram;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The password hash of the seeded users; no one logs in with it (tokens are minted).
const PASSWORD_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$YmVuY2hzYWx0$bm90LWEtcmVhbC1oYXNo";
/// Seeding calls kept in flight.
const SEED_IN_FLIGHT: usize = 2_048;
/// Marks in flight at most; past this the open loop falls behind (and shows it).
const MARKS_IN_FLIGHT_MAX: usize = 512;

struct Seeded {
    reader: UserId,
    workspace: String,
    channels: Vec<ChannelId>,
    /// The same unreads asked of the embedded engine in process (no HTTP, JWT or JSON).
    in_process: LatencySummary,
}

fn seed_data(
    data: &std::path::Path,
    settings: &ServerSettings,
    channels: usize,
    messages: usize,
) -> Seeded {
    let engine = seed::open_engine(data, settings).expect("open the engine");
    let seeded = block_on(async {
        let poster = engine
            .create_user("poster@bench.example", "Poster", PASSWORD_HASH)
            .await?;
        let reader = engine
            .create_user("reader@bench.example", "Reader", PASSWORD_HASH)
            .await?;
        let ws = engine.create_workspace(poster.id, "bench").await?;
        engine
            .add_member(poster.id, ws.id, "reader@bench.example")
            .await?;
        let mut ids = Vec::with_capacity(channels);
        for c in 0..channels {
            let ch = engine
                .create_channel(poster.id, ws.id, &format!("c{c}"), ChannelKind::Public)
                .await?;
            ids.push(ch.id);
        }
        let joins: FuturesUnordered<_> = ids.iter().map(|c| engine.join(reader.id, *c)).collect();
        joins
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        let mention = format!("<@{}> have a look", reader.id);
        let mut pending = FuturesUnordered::new();
        for i in 0..channels * messages {
            if pending.len() >= SEED_IN_FLIGHT {
                pending.next().await.expect("pending")?;
            }
            let text = match i % 10 {
                0 => "@here standup".to_owned(),
                1 | 6 => mention.clone(),
                _ => format!("message {i}"),
            };
            let (engine, poster, channel) = (&engine, poster.id, ids[i % channels]);
            pending.push(async move {
                engine
                    .post(poster, channel, &text, None, None)
                    .await
                    .map(drop)
            });
        }
        while let Some(r) = pending.next().await {
            r?;
        }
        let mut in_process = latency::histogram_us();
        for _ in 0..env_u64("CHORUS_BENCH_UNREADS_QUERIES", 2_000) {
            let started = Instant::now();
            let (reads, _) = engine.unreads(reader.id, ws.id, None, channels).await?;
            latency::record(&mut in_process, started.elapsed());
            assert_eq!(reads.len(), channels);
        }
        Ok::<_, chorus_engine::EngineError>(Seeded {
            reader: reader.id,
            workspace: ws.id.to_string(),
            channels: ids,
            in_process: LatencySummary::of(&in_process),
        })
    })
    .expect("seed");
    engine.shutdown();
    seeded
}

/// One `GET /unreads`: its latency, checking that it lists every channel.
async fn unreads_once(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    channels: usize,
) -> Duration {
    let started = Instant::now();
    let r = client
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .expect("GET /unreads");
    assert_eq!(r.status(), 200);
    let body = r.bytes().await.expect("body");
    let took = started.elapsed();
    let v: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(
        v["unreads"].as_array().map(Vec::len),
        Some(channels),
        "every channel"
    );
    took
}

struct RunResult {
    idle: LatencySummary,
    under_load: LatencySummary,
    marks: LatencySummary,
    marks_per_s: f64,
}

fn run_once(
    seeded: &Seeded,
    messages: usize,
    dir: &std::path::Path,
    settings: &ServerSettings,
) -> RunResult {
    let queries = env_u64("CHORUS_BENCH_UNREADS_QUERIES", 2_000);
    let rate = env_u64("CHORUS_BENCH_MARK_RATE", 5_000) as f64;
    let span = env_duration_secs("CHORUS_BENCH_MARK_SECS", Duration::from_secs(10));
    let token = seed::mint_tokens(&server::data_dir(dir), &[seeded.reader])
        .expect("token")
        .remove(0);
    let server =
        ChorusServer::start(&server::default_binary(), dir, settings).expect("start chorus");
    let base = format!("http://{}/api/v1", server.addr);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let result = rt.block_on(async {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(MARKS_IN_FLIGHT_MAX)
            .build()
            .expect("client");
        let url = format!("{base}/workspaces/{}/unreads", seeded.workspace);
        let n = seeded.channels.len();
        // Warm the connection and the server's caches.
        for _ in 0..20 {
            unreads_once(&client, &url, &token, n).await;
        }
        let mut idle = latency::histogram_us();
        for _ in 0..queries {
            latency::record(&mut idle, unreads_once(&client, &url, &token, n).await);
        }

        // Marks, open loop, with unreads asked one at a time beside them.
        let total = (rate * span.as_secs_f64()) as u64;
        assert!(
            total.div_ceil(n as u64) < messages as u64,
            "{total} marks need more than {messages} messages per channel to move forward"
        );
        let done = Arc::new(AtomicU64::new(0));
        let reader_done = done.clone();
        let (rc, rurl, rtoken) = (client.clone(), url.clone(), token.clone());
        let sampler = tokio::spawn(async move {
            let mut h = latency::histogram_us();
            while reader_done.load(Ordering::Acquire) < total {
                latency::record(&mut h, unreads_once(&rc, &rurl, &rtoken, n).await);
            }
            h
        });
        let started = Instant::now();
        let mut in_flight = FuturesUnordered::new();
        let mut marks: Histogram<u64> = latency::histogram_us();
        for i in 0..total {
            let due = started + Duration::from_secs_f64(i as f64 / rate);
            while in_flight.len() >= MARKS_IN_FLIGHT_MAX {
                latency::record(&mut marks, in_flight.next().await.expect("in flight"));
            }
            tokio::time::sleep_until(due.into()).await;
            // Pass k marks every channel at seq 2 + k: always forward, never past the
            // channel's last seq (2 joins, then the messages).
            let channel = seeded.channels[i as usize % n];
            let seq = 2 + 1 + i / n as u64;
            let (client, token, done) = (client.clone(), token.clone(), done.clone());
            let url = format!("{base}/channels/{channel}/read");
            let mark = tokio::spawn(async move {
                let r = client
                    .post(url)
                    .bearer_auth(token)
                    .body(format!("{{\"seq\":{seq}}}"))
                    .send()
                    .await
                    .expect("POST read");
                assert_eq!(r.status(), 200);
                let v: serde_json::Value =
                    serde_json::from_slice(&r.bytes().await.expect("body")).expect("JSON");
                assert_eq!(v["read"]["read_seq"], seq, "the marker moved");
                done.fetch_add(1, Ordering::AcqRel);
                due.elapsed()
            });
            in_flight.push(async move { mark.await.expect("a mark failed") });
        }
        while let Some(took) = in_flight.next().await {
            latency::record(&mut marks, took);
        }
        let elapsed = started.elapsed();
        let under_load = sampler.await.expect("sampler");
        RunResult {
            idle: LatencySummary::of(&idle),
            under_load: LatencySummary::of(&under_load),
            marks: LatencySummary::of(&marks),
            marks_per_s: total as f64 / elapsed.as_secs_f64(),
        }
    });
    server.stop().expect("stop chorus");
    result
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn main() {
    let channels = env_u64("CHORUS_BENCH_UNREADS_CHANNELS", 1_000) as usize;
    let messages = env_u64("CHORUS_BENCH_UNREADS_MESSAGES", 60) as usize;
    let runs = env_u64("CHORUS_BENCH_RUNS", 3);
    let settings = ServerSettings::default();
    let mut results = Vec::new();
    for run in 0..runs {
        let dir = tempfile::tempdir().expect("tempdir");
        let seeded = seed_data(&server::data_dir(dir.path()), &settings, channels, messages);
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        let r = run_once(&seeded, messages, dir.path(), &settings);
        println!(
            "run {run}: engine.unreads in process p50 {:.2} ms p99 {:.2} ms; GET /unreads ({channels} channels) idle p50 {:.2} ms p99 {:.2} ms max {:.2} ms; \
             beside marks p50 {:.2} ms p99 {:.2} ms ({} requests); marks {:.0}/s, p50 {:.2} ms p99 {:.2} ms max {:.2} ms; \
             load {}",
            ms(seeded.in_process.p50_us),
            ms(seeded.in_process.p99_us),
            ms(r.idle.p50_us),
            ms(r.idle.p99_us),
            ms(r.idle.max_us),
            ms(r.under_load.p50_us),
            ms(r.under_load.p99_us),
            r.under_load.count,
            r.marks_per_s,
            ms(r.marks.p50_us),
            ms(r.marks.p99_us),
            ms(r.marks.max_us),
            load.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        );
        results.push(r);
    }
    let med =
        |f: &dyn Fn(&RunResult) -> f64| latency::median(&results.iter().map(f).collect::<Vec<_>>());
    println!(
        "median of {runs}: GET /unreads idle p99 {:.2} ms (p50 {:.2}), beside marks p99 {:.2} ms; \
         marks {:.0}/s sustained, p99 {:.2} ms (target: unreads p99 <= 5 ms, marks 5,000/s)",
        med(&|r| ms(r.idle.p99_us)),
        med(&|r| ms(r.idle.p50_us)),
        med(&|r| ms(r.under_load.p99_us)),
        med(&|r| r.marks_per_s),
        med(&|r| ms(r.marks.p99_us)),
    );
}
