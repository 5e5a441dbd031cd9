//! `notify`: the notifications benchmark of issue 16, against a push gateway sink of the
//! harness's own.
//!
//! 0. **The sink** is a minimal HTTP/1.1 server in Rust on loopback (a thread of its own
//!    with a current-thread tokio runtime; keep-alive; every POST answered 200
//!    `{"rejected":[]}` with head and body in one write, so that no client waits on a
//!    delayed ACK). It records, per `event_id`, how many POSTs and devices arrived and
//!    the wall-clock time of the first and the last (taken when the request's last byte
//!    is read). It is measured alone first: a `reqwest` client, as the server's push
//!    sender uses, with as many requests in flight as the sender allows
//!    (`chorus_notify::sender::IN_FLIGHT`), POSTs `sink_requests` bodies of the Matrix
//!    format; POSTs/s and request latency show that it is not what the figures measure.
//! 1. **Ack → push** (figure 1): `recipients` users with one device each, in channels of
//!    `members`, none connected (offline), default preferences (push level `mentions`).
//!    The first member of each channel posts over REST, `rate` messages per second in all,
//!    open loop, for `secs` seconds; every `mention_every`-th message mentions another
//!    member of its channel (`<@USER_ID>`), so it alone pushes. Latency: the sink's
//!    receive time − the wall-clock time the poster read its 201 (the ack).
//! 2. **`@channel` fan-out** (figure 2): one channel of `fanout_members` (its owner and
//!    the others), the others offline with one device each; the owner posts `@channel`
//!    once. Figure: the 201 → the last push POST received (and the first), and the pushes
//!    received against members − 1 (everyone but the sender).
//! 3. **The sender's send latency** (figure 3): from the `@channel` post on, the owner
//!    posts `probe_rate` plain messages per second for `probe_secs` seconds into a small
//!    channel of their own (so that these messages push nothing and cost the decider
//!    nothing: what they show is the fan-out's effect on the send path), open loop,
//!    intended send time → 201. The same data directory is then served again with no
//!    `push_gateway_url` (no decider, no sender) and the same posts are made: both are
//!    reported.
//!
//! Before each measured part, the server's search index is awaited (`ready` in its
//! `/metrics`: on the seeded directory it indexes every user first, which would take the
//! cores from the figures), and one message mentioning a recipient is posted and its push
//! awaited: the decider reads every log from its beginning at start, and this shows it has
//! caught up, so the figures do not include its start.

use super::schedule::wall_ns;
use super::seed;
use super::server::{self, ChorusServer, ServerSettings};
use anyhow::{ensure, Context};
use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use serde::Deserialize;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How much nicer than the harness the sink's thread runs (see [`Sink::start`]).
const SINK_NICE: i32 = 10;
/// The sink's one answer: head and body in one write.
const ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
content-length: 15\r\n\r\n{\"rejected\":[]}";
/// The sink's path, as a Matrix push gateway serves it.
const SINK_PATH: &str = "/_matrix/push/v1/notify";
/// How long the decider may take to catch up at start before the run fails.
const WARMUP_GIVE_UP: Duration = Duration::from_secs(300);
/// With pushes still missing, how long without a new one before the run stops waiting.
const STALL_GIVE_UP: Duration = Duration::from_secs(20);
/// How often a waiting run looks at the sink's counts.
const POLL_EVERY: Duration = Duration::from_millis(5);

/// The sizes of a `notify` run.
#[derive(Clone, Debug)]
pub struct NotifyShape {
    /// POSTs of the sink-alone measurement.
    pub sink_requests: usize,
    /// Requests in flight in the sink-alone measurement.
    pub sink_in_flight: usize,
    /// Figure 1: offline recipients, one device each.
    pub recipients: usize,
    /// Figure 1: members per channel.
    pub members: usize,
    /// Figure 1: messages per second, in all.
    pub rate: f64,
    /// Figure 1: seconds of messages.
    pub secs: f64,
    /// Figure 1: one message in this many mentions a member.
    pub mention_every: usize,
    /// Figure 2: members of the `@channel` channel, its sender included.
    pub fanout_members: usize,
    /// Figure 3: the sender's messages per second during the fan-out.
    pub probe_rate: f64,
    /// Figure 3: seconds of them.
    pub probe_secs: f64,
}

impl NotifyShape {
    /// The sizes.
    pub fn standard() -> NotifyShape {
        NotifyShape {
            sink_requests: 200_000,
            sink_in_flight: chorus_notify::sender::IN_FLIGHT,
            recipients: 1_000,
            members: 50,
            rate: 1_000.0,
            secs: 20.0,
            mention_every: 10,
            fanout_members: 100_000,
            probe_rate: 50.0,
            probe_secs: 10.0,
        }
    }

    /// A size that runs in seconds on a debug build.
    pub fn smoke() -> NotifyShape {
        NotifyShape {
            sink_requests: 2_000,
            sink_in_flight: chorus_notify::sender::IN_FLIGHT,
            recipients: 100,
            members: 20,
            rate: 100.0,
            secs: 2.0,
            mention_every: 10,
            fanout_members: 1_000,
            probe_rate: 20.0,
            probe_secs: 2.0,
        }
    }
}

/// The sink measured alone.
#[derive(Debug)]
pub struct SinkAlone {
    /// POSTs answered.
    pub answered: usize,
    /// POSTs the sink recorded (must equal `answered`).
    pub recorded: u64,
    /// POSTs per second over the whole measurement.
    pub per_s: f64,
    /// Request sent → answer read, microseconds.
    pub latency: Histogram<u64>,
}

/// What a `notify` run measured.
#[derive(Debug)]
pub struct NotifyOutcome {
    /// The sink alone.
    pub sink: SinkAlone,
    /// Figure 1: ack → push received, microseconds, one record per push.
    pub push: Histogram<u64>,
    /// Figure 1: intended send → ack of every message, microseconds.
    pub push_ack: Histogram<u64>,
    /// Figure 1: messages sent.
    pub sent: usize,
    /// Figure 1: pushes expected (the mentions) and the ones received for them.
    pub pushes_expected: usize,
    /// See `pushes_expected`.
    pub pushes_received: u64,
    /// Figure 1: POSTs for messages that should not have pushed.
    pub pushes_unexpected: u64,
    /// Figure 2: pushes expected (members − 1) and received for the `@channel` post.
    pub fanout_expected: usize,
    /// See `fanout_expected`.
    pub fanout_received: u64,
    /// Figure 2: devices named in those POSTs.
    pub fanout_devices: u64,
    /// Figure 2: ack → first and → last push received.
    pub fanout_first: Duration,
    /// See `fanout_first`.
    pub fanout_last: Duration,
    /// Figure 2: the `@channel` post's own intended send → ack.
    pub fanout_ack: Duration,
    /// Figure 3: the sender's intended send → ack during the fan-out, and with no
    /// notifications.
    pub probes_notify: ProbeRun,
    /// See `probes_notify`.
    pub probes_plain: ProbeRun,
    /// Figure 3, the run without notifications: the `@channel` post's intended send → ack.
    pub plain_fanout_ack: Duration,
    /// Seeding times: figure 1's data, figure 2's (users, memberships, devices).
    pub seed_small: Duration,
    /// See `seed_small`.
    pub seed_big: Duration,
    /// The server's `chorus_notify_*` metrics after the fan-out.
    pub fanout_metrics: String,
    /// Where the fan-out server's log was kept, when pushes were missing.
    pub kept_log: Option<std::path::PathBuf>,
    /// Requests the sink could not parse in the server runs.
    pub sink_errors: u64,
}

impl NotifyOutcome {
    /// The printed table.
    pub fn table(&self, shape: &NotifyShape) -> String {
        let ms = |us: u64| us as f64 / 1e3;
        let q = |h: &Histogram<u64>, p: f64| ms(h.value_at_quantile(p));
        let d = |x: Duration| x.as_secs_f64() * 1e3;
        let pct = |h: &Histogram<u64>| {
            format!(
                "p50 {:.1}, p99 {:.1}, max {:.1}",
                q(h, 0.5),
                q(h, 0.99),
                ms(h.max())
            )
        };
        let mut t = String::new();
        t.push_str("| measure | Chorus | beside it | target |\n|---|---|---|---|\n");
        t.push_str(&format!(
            "| gateway sink alone: {} POSTs, {} in flight, reqwest client (ms) | {:.0} POSTs/s; {} | {}/{} recorded | not the bottleneck |\n",
            self.sink.answered,
            shape.sink_in_flight,
            self.sink.per_s,
            pct(&self.sink.latency),
            self.sink.recorded,
            self.sink.answered,
        ));
        t.push_str(&format!(
            "| ack → push POST at the gateway, {} msgs/s for {} s, 1 in {} a mention, {} offline recipients (ms) | {}; {}/{} pushes | send → ack {}; {} unexpected pushes | p99 ≤ 1000 |\n",
            shape.rate,
            shape.secs,
            shape.mention_every,
            shape.recipients,
            pct(&self.push),
            self.pushes_received,
            self.pushes_expected,
            pct(&self.push_ack),
            self.pushes_unexpected,
        ));
        let spread = self
            .fanout_last
            .saturating_sub(self.fanout_first)
            .as_secs_f64();
        let rate = if spread > 0.0 {
            self.fanout_received as f64 / spread
        } else {
            0.0
        };
        t.push_str(&format!(
            "| `@channel` in a {}-member channel, all offline: ack → last push POST (ms) | {:.1} (first {:.1}); {}/{} pushes, {} devices | {:.0} pushes/s between first and last; send → ack {:.1} | ≤ 5000 |\n",
            shape.fanout_members,
            d(self.fanout_last),
            d(self.fanout_first),
            self.fanout_received,
            self.fanout_expected,
            self.fanout_devices,
            rate,
            d(self.fanout_ack),
        ));
        t.push_str(&format!(
            "| the sender's send → ack, {}/s for {} s from the `@channel` post, another channel (ms) | with notifications: {} | without: {} (`@channel` send → ack {:.1}) | unchanged |\n",
            shape.probe_rate,
            shape.probe_secs,
            pct(&self.probes_notify.latency),
            pct(&self.probes_plain.latency),
            d(self.plain_fanout_ack),
        ));
        t
    }
}

/// What the sink saw of one `event_id`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Seen {
    /// POSTs.
    pub posts: u64,
    /// Devices named in them.
    pub devices: u64,
    /// Wall-clock nanoseconds of the first POST's last byte.
    pub first_ns: u64,
    /// And of the last POST's.
    pub last_ns: u64,
}

#[derive(Default)]
struct Records {
    events: Mutex<HashMap<String, Seen>>,
    posts: AtomicU64,
    errors: AtomicU64,
}

/// The push gateway sink: a minimal HTTP/1.1 server on loopback, on a thread of its own.
pub struct Sink {
    addr: SocketAddr,
    records: Arc<Records>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sink {
    /// Binds a free loopback port and starts serving, on a thread [`SINK_NICE`] steps
    /// nicer than the harness.
    pub fn start() -> anyhow::Result<Sink> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let records = Arc::new(Records::default());
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let recs = records.clone();
        let thread = std::thread::Builder::new()
            .name("push-sink".into())
            .spawn(move || {
                // A push gateway runs on machines of its own: here it shares the
                // server's two cores, so it takes only what the server leaves.
                // SAFETY: `nice` changes only this thread's niceness.
                if unsafe { libc::nice(SINK_NICE) } == -1 {
                    eprintln!("the push sink's priority could not be lowered");
                }
                runtime.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
                    tokio::select! {
                        _ = accept(listener, recs) => {}
                        _ = stopped => {}
                    }
                });
            })?;
        Ok(Sink {
            addr,
            records,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The URL to give the server as `push_gateway_url`.
    pub fn url(&self) -> String {
        format!("http://{}{SINK_PATH}", self.addr)
    }

    /// POSTs received in all.
    pub fn posts(&self) -> u64 {
        self.records.posts.load(Ordering::Relaxed)
    }

    /// Requests the sink could not parse (connections it closed).
    pub fn errors(&self) -> u64 {
        self.records.errors.load(Ordering::Relaxed)
    }

    /// What arrived for `event_id`.
    pub fn seen(&self, event_id: &str) -> Seen {
        let events = self.records.events.lock().expect("not poisoned");
        events.get(event_id).copied().unwrap_or_default()
    }

    /// Everything that arrived, by `event_id`.
    pub fn all(&self) -> HashMap<String, Seen> {
        self.records.events.lock().expect("not poisoned").clone()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn accept(listener: tokio::net::TcpListener, records: Arc<Records>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let records = records.clone();
        tokio::spawn(async move {
            if serve(stream, &records).await.is_err() {
                records.errors.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
}

#[derive(Deserialize)]
struct Push {
    notification: Notification,
}

#[derive(Deserialize)]
struct Notification {
    event_id: String,
    #[serde(default)]
    devices: Vec<serde::de::IgnoredAny>,
}

/// Serves one kept-alive connection: each request read whole (head, then a
/// `content-length` body), recorded, and answered with [`ANSWER`] in one write.
async fn serve(mut stream: tokio::net::TcpStream, records: &Records) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf: Vec<u8> = Vec::with_capacity(16 << 10);
    let mut chunk = vec![0u8; 64 << 10];
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    loop {
        let head_end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return if buf.is_empty() {
                    Ok(())
                } else {
                    Err(bad("closed within a request head"))
                };
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| bad("head not UTF-8"))?;
        let mut len = None;
        for line in head.split("\r\n").skip(1) {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            if name.eq_ignore_ascii_case("content-length") {
                len = value.trim().parse::<usize>().ok();
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                return Err(bad("chunked bodies are not served"));
            }
        }
        let len = len.ok_or_else(|| bad("no content-length"))?;
        while buf.len() < head_end + len {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(bad("closed within a body"));
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let at_ns = wall_ns();
        let push: Push = serde_json::from_slice(&buf[head_end..head_end + len])
            .map_err(|_| bad("not a push body"))?;
        {
            let mut events = records.events.lock().expect("not poisoned");
            let seen = events.entry(push.notification.event_id).or_default();
            if seen.posts == 0 {
                seen.first_ns = at_ns;
            }
            seen.posts += 1;
            seen.devices += push.notification.devices.len() as u64;
            seen.last_ns = seen.last_ns.max(at_ns);
        }
        records.posts.fetch_add(1, Ordering::Relaxed);
        stream.write_all(ANSWER).await?;
        buf.drain(..head_end + len);
    }
}

/// A push body as the server's sender makes one, for the sink-alone measurement.
fn sample_body(i: usize) -> String {
    serde_json::json!({"notification": {
        "event_id": format!("sample-{i}"),
        "room_id": "01JCHANNEL0000000000000000",
        "type": "m.room.message",
        "sender": "01JSENDER00000000000000000",
        "sender_display_name": "User 0",
        "room_name": "c0",
        "prio": "high",
        "content": {"body": "notify bench message with a mention of someone, about a hundred bytes of text"},
        "counts": {"unread": 3},
        "devices": [{"app_id": "chorus.bench", "pushkey": format!("bench-key-{i}")}],
    }})
    .to_string()
}

/// Measures a fresh sink alone: `requests` POSTs, `in_flight` at once.
pub fn sink_alone(requests: usize, in_flight: usize) -> anyhow::Result<SinkAlone> {
    let sink = Sink::start()?;
    let url = sink.url();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(in_flight)
        .build()?;
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let hists = rt.block_on(async {
        let tasks: Vec<_> = (0..in_flight)
            .map(|_| {
                let (client, url, next) = (client.clone(), url.clone(), next.clone());
                tokio::spawn(async move {
                    let mut h = crate::latency::histogram_us();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= requests {
                            return anyhow::Ok(h);
                        }
                        let body = sample_body(i);
                        let sent = Instant::now();
                        let resp = client
                            .post(&url)
                            .header("content-type", "application/json")
                            .body(body)
                            .send()
                            .await?;
                        ensure!(resp.status() == 200, "the sink answered {}", resp.status());
                        resp.bytes().await?;
                        crate::latency::record(&mut h, sent.elapsed());
                    }
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.push(t.await.context("a sink client panicked")??);
        }
        anyhow::Ok(all)
    })?;
    let took = started.elapsed();
    let mut latency = crate::latency::histogram_us();
    for h in &hists {
        latency.add(h)?;
    }
    let answered = latency.len() as usize;
    ensure!(
        sink.errors() == 0,
        "the sink failed {} requests",
        sink.errors()
    );
    Ok(SinkAlone {
        answered,
        recorded: sink.posts(),
        per_s: answered as f64 / took.as_secs_f64(),
        latency,
    })
}

/// The REST API, as one user or another.
#[derive(Clone)]
struct Api {
    client: reqwest::Client,
    base: String,
}

#[derive(Deserialize)]
struct Posted {
    message: PostedMessage,
}

#[derive(Deserialize)]
struct PostedMessage {
    id: String,
}

impl Api {
    fn new(server: &ChorusServer) -> anyhow::Result<Api> {
        Ok(Api {
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(256)
                .build()?,
            base: format!("http://{}/api/v1", server.addr),
        })
    }

    /// The text of `GET /metrics`.
    async fn metrics(&self) -> anyhow::Result<String> {
        let root = self.base.trim_end_matches("/api/v1");
        let resp = self.client.get(format!("{root}/metrics")).send().await?;
        Ok(resp.text().await?)
    }

    /// The `chorus_notify_*` lines of `GET /metrics`.
    async fn notify_metrics(&self) -> anyhow::Result<String> {
        Ok(self
            .metrics()
            .await?
            .lines()
            .filter(|l| l.starts_with("chorus_notify_"))
            .collect::<Vec<_>>()
            .join("\n"))
    }

    /// Waits until the server's search index is `ready` (caught up with the logs).
    async fn search_ready(&self, give_up: Duration) -> anyhow::Result<()> {
        let root = self.base.trim_end_matches("/api/v1");
        server::search_ready(&self.client, root, give_up).await
    }

    /// Posts `text` as the holder of `token`; the message ID and the wall-clock time its
    /// 201 was read.
    async fn post(&self, token: &str, channel: &str, text: &str) -> anyhow::Result<(String, u64)> {
        let resp = self
            .client
            .post(format!("{}/channels/{channel}/messages", self.base))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(serde_json::json!({ "text": text }).to_string())
            .send()
            .await?;
        let status = resp.status().as_u16();
        let body = resp.bytes().await?;
        let acked = wall_ns();
        ensure!(
            status == 201,
            "post answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
        Ok((serde_json::from_slice::<Posted>(&body)?.message.id, acked))
    }
}

/// Waits until `event_id` has `want` POSTs at the sink, or none came for
/// [`STALL_GIVE_UP`] (or `first_give_up` before the first one); what arrived.
async fn await_pushes(sink: &Sink, event_id: &str, want: u64, first_give_up: Duration) -> Seen {
    let started = Instant::now();
    let (mut last_count, mut last_change) = (0, Instant::now());
    loop {
        let seen = sink.seen(event_id);
        if seen.posts >= want {
            return seen;
        }
        if seen.posts != last_count {
            (last_count, last_change) = (seen.posts, Instant::now());
        }
        let limit = if seen.posts == 0 {
            started + first_give_up
        } else {
            last_change + STALL_GIVE_UP
        };
        if Instant::now() > limit {
            return seen;
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Posts a mention of `whom` as `token` and waits for its push: the decider has caught up.
async fn warm_up(
    api: &Api,
    sink: &Sink,
    token: &str,
    channel: &str,
    whom: &str,
) -> anyhow::Result<()> {
    let (id, _) = api
        .post(token, channel, &format!("warm-up <@{whom}>"))
        .await?;
    let seen = await_pushes(sink, &id, 1, WARMUP_GIVE_UP).await;
    ensure!(
        seen.posts == 1,
        "the warm-up push did not arrive within {WARMUP_GIVE_UP:?}"
    );
    Ok(())
}

/// Runs the `notify` benchmark against `binary`, in fresh directories under `work_root`.
pub fn run(
    binary: &Path,
    work_root: &Path,
    shape: &NotifyShape,
    progress: &ProgressBar,
) -> anyhow::Result<NotifyOutcome> {
    ensure!(
        shape.members >= 2 && shape.recipients >= shape.members && shape.fanout_members >= 2,
        "a channel needs a poster and someone to mention"
    );
    ensure!(shape.mention_every > 0, "--mention-every must be positive");
    std::fs::create_dir_all(work_root)?;
    progress.set_message("notify: the gateway sink alone");
    let sink_alone = sink_alone(shape.sink_requests, shape.sink_in_flight)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let sink = Sink::start()?;

    // 1. Ack → push at 1,000 msgs/s, 10 % mentions.
    let dir = tempfile::Builder::new()
        .prefix("chorus-bench-notify-")
        .tempdir_in(work_root)?;
    let settings = ServerSettings {
        push_gateway_url: Some(sink.url()),
        ..ServerSettings::default()
    };
    let data = server::data_dir(dir.path());
    let seeding = Instant::now();
    let engine = seed::open_engine(&data, &settings)?;
    let pop = seed::users_in_channels(&engine, shape.recipients, shape.members, progress)
        .and_then(|pop| seed::push_devices(&engine, &pop.users, progress).map(|()| pop));
    engine.shutdown();
    let pop = pop?;
    let seed_small = seeding.elapsed();
    let tokens = seed::mint_tokens(&data, &pop.users)?;
    let server = ChorusServer::start(binary, dir.path(), &settings)?;
    let api = Api::new(&server)?;
    let channels: Vec<String> = pop.channels.iter().map(|c| c.to_string()).collect();
    let users: Vec<String> = pop.users.iter().map(|u| u.to_string()).collect();
    progress.set_message("notify: ack → push (waiting for the decider)");
    rt.block_on(api.search_ready(WARMUP_GIVE_UP))?;
    rt.block_on(warm_up(&api, &sink, &tokens[0], &channels[0], &users[1]))?;
    progress.set_message("notify: ack → push");
    let count = (shape.rate * shape.secs).round().max(1.0) as usize;
    let start = tokio::time::Instant::now() + Duration::from_millis(200);
    let posts: Vec<_> = (0..count)
        .map(|i| {
            let c = i % channels.len();
            let first = c * shape.members;
            let size = shape.members.min(users.len() - first);
            let mention = (i % shape.mention_every == 0 && size > 1)
                .then(|| first + 1 + (i / channels.len()) % (size - 1));
            let mut text = format!("notify bench message {i}");
            if let Some(m) = mention {
                text.push_str(&format!(" for <@{}>", users[m]));
            }
            text.push_str(" with some text to read");
            let (api, token, channel) = (api.clone(), tokens[first].clone(), channels[c].clone());
            let at = start + Duration::from_secs_f64(i as f64 / shape.rate);
            rt.spawn(async move {
                tokio::time::sleep_until(at).await;
                let (id, acked) = api.post(&token, &channel, &text).await?;
                anyhow::Ok((id, acked, at.elapsed(), mention.is_some()))
            })
        })
        .collect();
    let (push, push_ack, expected, received, unexpected) = rt.block_on(async {
        let mut acks = crate::latency::histogram_us();
        let mut mentioned = Vec::new();
        for p in posts {
            let (id, acked, took, mention) = p.await.context("a post panicked")??;
            crate::latency::record(&mut acks, took);
            if mention {
                mentioned.push((id, acked));
            }
        }
        // The last mention's push, then whatever else is missing.
        if let Some((id, _)) = mentioned.last() {
            await_pushes(&sink, id, 1, STALL_GIVE_UP).await;
        }
        let started = Instant::now();
        while Instant::now() < started + STALL_GIVE_UP
            && mentioned.iter().any(|(id, _)| sink.seen(id).posts == 0)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let all = sink.all();
        let mut latency = crate::latency::histogram_us();
        let mut received = 0;
        for (id, acked) in &mentioned {
            if let Some(seen) = all.get(id) {
                received += seen.posts;
                let us = seen.first_ns.saturating_sub(*acked) / 1_000;
                latency.record(us.max(1))?;
            }
        }
        // Every POST for a message that mentioned no one (the warm-up's aside), and every
        // second one for a mention.
        let total: u64 = all.values().map(|s| s.posts).sum();
        let unexpected = (total - received).saturating_sub(1) + (received - latency.len());
        anyhow::Ok((latency, acks, mentioned.len(), received, unexpected))
    })?;
    server.stop()?;
    drop(dir);

    // 2 and 3. `@channel` in a big channel, with and without notifications.
    let dir = tempfile::Builder::new()
        .prefix("chorus-bench-notify-fanout-")
        .tempdir_in(work_root)?;
    let data = server::data_dir(dir.path());
    let seeding = Instant::now();
    let engine = seed::open_engine(&data, &settings)?;
    let seeded =
        seed::one_big_channel(&engine, shape.fanout_members - 1, progress).and_then(|pop| {
            seed::push_devices(&engine, &pop.users, progress)?;
            let side =
                seed::small_channel(&engine, pop.owner, pop.workspace, "side", &pop.users[..1])?;
            Ok((pop, side))
        });
    engine.shutdown();
    let (pop, side) = seeded?;
    let seed_big = seeding.elapsed();
    let owner = seed::mint_tokens(&data, &[pop.owner])?.remove(0);
    let big = pop.channels[0].to_string();
    let side = side.to_string();
    let first_user = pop.users[0].to_string();

    progress.set_message("notify: @channel fan-out (waiting for the decider)");
    let server = ChorusServer::start(binary, dir.path(), &settings)?;
    let api = Api::new(&server)?;
    rt.block_on(api.search_ready(WARMUP_GIVE_UP))?;
    rt.block_on(warm_up(&api, &sink, &owner, &big, &first_user))?;
    progress.set_message("notify: @channel fan-out");
    let want = (shape.fanout_members - 1) as u64;
    let fan = rt.block_on(async {
        let (fan, probes) = fanout_and_probes(&api, &owner, &big, &side, shape).await?;
        let (id, acked, _) = &fan;
        let seen = await_pushes(&sink, id, want, WARMUP_GIVE_UP).await;
        let probes = probes.await??;
        let metrics = api
            .notify_metrics()
            .await
            .unwrap_or_else(|e| format!("{e:#}"));
        anyhow::Ok(((seen, *acked, fan.2), probes, metrics))
    })?;
    let (fan, probes_notify, fanout_metrics) = fan;
    let (seen, acked, fanout_ack) = fan;
    let kept_log = if seen.posts < want {
        // The log goes with the run's directory: keep it for a look at what went missing.
        let to = work_root.join("notify-fanout-server.log");
        std::fs::copy(&server.log, &to)?;
        Some(to)
    } else {
        None
    };
    server.stop()?;

    progress.set_message("notify: the same posts without notifications");
    let plain = ServerSettings {
        push_gateway_url: None,
        ..settings.clone()
    };
    let server = ChorusServer::start(binary, dir.path(), &plain)?;
    let api = Api::new(&server)?;
    let (plain_fanout_ack, probes_plain) = rt.block_on(async {
        api.search_ready(WARMUP_GIVE_UP).await?;
        // The same first post as the notifying run's warm-up, for the same caches.
        api.post(&owner, &big, &format!("warm-up <@{first_user}>"))
            .await?;
        let (fan, probes) = fanout_and_probes(&api, &owner, &big, &side, shape).await?;
        anyhow::Ok((fan.2, probes.await??))
    })?;
    server.stop()?;
    drop(dir);
    let since = |ns: u64| Duration::from_nanos(ns.saturating_sub(acked));
    Ok(NotifyOutcome {
        sink: sink_alone,
        push,
        push_ack,
        sent: count,
        pushes_expected: expected,
        pushes_received: received,
        pushes_unexpected: unexpected,
        fanout_expected: want as usize,
        fanout_received: seen.posts,
        fanout_devices: seen.devices,
        fanout_first: since(seen.first_ns),
        fanout_last: since(seen.last_ns),
        fanout_ack,
        probes_notify,
        probes_plain,
        plain_fanout_ack,
        seed_small,
        seed_big,
        fanout_metrics,
        kept_log,
        sink_errors: sink.errors(),
    })
}

/// How many of a run's slowest sends [`ProbeRun::slowest`] keeps.
const SLOWEST_KEPT: usize = 8;

/// The sender's sends of one run: intended send → ack, and the slowest of them.
#[derive(Debug)]
pub struct ProbeRun {
    /// Every send.
    pub latency: Histogram<u64>,
    /// The [`SLOWEST_KEPT`] slowest: when each was due, after the `@channel` post, and its
    /// latency, slowest first. Sends that fell in one stall were due together and answered
    /// together.
    pub slowest: Vec<(Duration, Duration)>,
}

impl ProbeRun {
    /// The slowest sends as `+due: latency` in milliseconds.
    pub fn slowest_text(&self) -> String {
        let each = self.slowest.iter().map(|(due, took)| {
            format!(
                "+{:.0}: {:.1}",
                due.as_secs_f64() * 1e3,
                took.as_secs_f64() * 1e3
            )
        });
        each.collect::<Vec<_>>().join(", ")
    }
}

type Probes = tokio::task::JoinHandle<anyhow::Result<ProbeRun>>;

/// Posts `@channel` into `big` and, from then on, the sender's plain messages into `side`
/// at `probe_rate` for `probe_secs`, open loop. Returns the `@channel` post's ID, ack time
/// and intended send → ack once it is acked, and the probes' task.
async fn fanout_and_probes(
    api: &Api,
    token: &str,
    big: &str,
    side: &str,
    shape: &NotifyShape,
) -> anyhow::Result<((String, u64, Duration), Probes)> {
    let start = tokio::time::Instant::now() + Duration::from_millis(200);
    let count = (shape.probe_rate * shape.probe_secs).round() as usize;
    let probes: Vec<_> = (1..=count)
        .map(|k| {
            let (api, token, side) = (api.clone(), token.to_owned(), side.to_owned());
            let at = start + Duration::from_secs_f64(k as f64 / shape.probe_rate);
            tokio::spawn(async move {
                tokio::time::sleep_until(at).await;
                api.post(&token, &side, &format!("probe {k} while the fan-out runs"))
                    .await?;
                anyhow::Ok((at - start, at.elapsed()))
            })
        })
        .collect();
    let probes = tokio::spawn(async move {
        let mut latency = crate::latency::histogram_us();
        let mut all = Vec::with_capacity(probes.len());
        for p in probes {
            let (due, took) = p.await.context("a probe panicked")??;
            crate::latency::record(&mut latency, took);
            all.push((due, took));
        }
        all.sort_by_key(|&(_, took)| std::cmp::Reverse(took));
        all.truncate(SLOWEST_KEPT);
        anyhow::Ok(ProbeRun {
            latency,
            slowest: all,
        })
    });
    tokio::time::sleep_until(start).await;
    let (id, acked) = api
        .post(token, big, "@channel everyone: the fan-out benchmark")
        .await?;
    Ok(((id, acked, start.elapsed()), probes))
}
