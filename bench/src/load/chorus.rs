//! The four scenarios run against Chorus: seed a fresh data directory, start the real
//! `chorus` binary on it, drive it from worker processes, and return the same outcome
//! types the peers return. `chat` and `connections` run over either transport (WebSocket
//! or QUIC); `fanout` and `history` over WebSocket and REST.

use super::client::{Conn, Dialer, Transport};
use super::procstat::{self, UsageWindow};
use super::schedule::{self, wall_ns};
use super::seed::{self, Population};
use super::server::{self, ChorusServer, ServerSettings};
use super::worker::{self, ChatJob, Command, HoldJob, Job, Report, WorkerHandle};
use super::{
    ChatOutcome, ChatShape, ConnectionsOutcome, ConnectionsShape, FanoutOutcome, FanoutShape,
    HistoryOutcome, HistoryShape, LiveCheck,
};
use anyhow::{bail, ensure, Context};
use indicatif::ProgressBar;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Worker processes that `chat` uses at least, over either transport: one per core. A QUIC
/// client's per-packet work (decryption, acknowledgements, stream reassembly) on a single
/// thread fell behind 1,000 sessions receiving 25,000 deliveries/s, so the generator's
/// queue was measured (QUIC delivery p50 105–130 ms with one worker, 10–13 ms with two,
/// the WebSocket's 5–7 ms).
const CHAT_WORKERS_MIN: usize = 2;

/// How long after the last scheduled send a chat run waits for late acks and deliveries.
const CHAT_DRAIN: Duration = Duration::from_secs(10);
/// How long a fan-out round may take before the missing deliveries are counted.
const ROUND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the server settles before and after connections open, for RSS readings (the
/// standard size; [`ChorusRunner::rss_settle`]).
pub const RSS_SETTLE: Duration = Duration::from_secs(2);
/// How long the server may take to end the sessions the workers closed: a QUIC connection
/// closed by its peer lingers for three probe timeouts (RFC 9000 §10.2), seconds when its
/// round-trip estimate comes from a storm of handshakes on a busy machine.
const CLOSE_SETTLE: Duration = Duration::from_secs(15);
/// Bytes of text of each history message.
const HISTORY_BODY_BYTES: usize = 100;
/// How long the history server may take to index its seeded log for search before reads.
const HISTORY_SEARCH_READY_GIVE_UP: Duration = Duration::from_secs(600);

/// Where and how Chorus runs.
#[derive(Clone, Debug)]
pub struct ChorusRunner {
    /// The `chorus` binary.
    pub binary: PathBuf,
    /// The `chorus-bench` binary, run as `chorus-bench worker` for the connections.
    pub worker_exe: PathBuf,
    /// The server's settings.
    pub settings: ServerSettings,
    /// Where each run's fresh directory is made.
    pub work_root: PathBuf,
    /// Workers at least (more when the connections need them).
    pub workers_min: usize,
    /// How long the server settles before and after connections open, for RSS readings:
    /// [`RSS_SETTLE`], shorter in the smoke test, whose figures are not kept.
    pub rss_settle: Duration,
    /// The progress bar of the run.
    pub progress: ProgressBar,
    /// What the server said about itself during the runs (from its `/metrics`), for the
    /// report.
    pub notes: std::cell::RefCell<Vec<String>>,
}

impl ChorusRunner {
    pub(super) fn fresh_dir(&self) -> anyhow::Result<tempfile::TempDir> {
        std::fs::create_dir_all(&self.work_root)?;
        Ok(tempfile::Builder::new()
            .prefix("chorus-bench-")
            .tempdir_in(&self.work_root)?)
    }

    pub(super) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
        Ok(tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?)
    }

    /// Seeds `dir` with `build`, then returns the population and tokens for `who`.
    pub(super) fn seed<F>(&self, dir: &std::path::Path, build: F) -> anyhow::Result<Population>
    where
        F: FnOnce(&chorus_engine::Engine) -> anyhow::Result<Population>,
    {
        let data = server::data_dir(dir);
        let engine = seed::open_engine(&data, &self.settings)?;
        let result = build(&engine);
        engine.shutdown();
        result
    }

    /// Spawns workers for `count` sessions over `transport`, split evenly, and waits until
    /// all are ready.
    pub(super) async fn spawn_workers<F>(
        &self,
        count: usize,
        transport: Transport,
        at_least: usize,
        make: F,
    ) -> anyhow::Result<(Vec<WorkerHandle>, usize, f64)>
    where
        F: Fn(usize, std::ops::Range<usize>) -> Job,
    {
        let workers = worker::workers_for(count, transport)
            .max(self.workers_min)
            .max(at_least)
            .min(count.max(1));
        let mut handles = Vec::new();
        for w in 0..workers {
            let range = (count * w / workers)..(count * (w + 1) / workers);
            handles.push(WorkerHandle::spawn(&self.worker_exe, &make(w, range)).await?);
        }
        let (mut open, mut connect_secs) = (0, 0f64);
        for h in &mut handles {
            match h.report().await? {
                Report::Ready {
                    open: o,
                    failed,
                    retried,
                    first_error,
                    connect_secs: secs,
                } => {
                    if failed + retried > 0 {
                        self.warn(format!(
                            "{} sessions: {failed} failed to open, {retried} attempts failed \
                             and were retried; first error: {}",
                            transport.label(),
                            first_error.unwrap_or_default()
                        ));
                    }
                    open += o;
                    connect_secs = connect_secs.max(secs);
                }
                other => bail!("expected a worker to be ready, got {other:?}"),
            }
        }
        Ok((handles, open, connect_secs))
    }

    /// `chat` against Chorus, every session over `transport`.
    ///
    /// The sessions are split over [`CHAT_WORKERS_MIN`] worker processes or more.
    pub fn chat(&self, shape: &ChatShape, transport: Transport) -> anyhow::Result<ChatOutcome> {
        ensure!(
            shape.connections >= 2 && shape.members >= 2,
            "chat needs 2+ members"
        );
        let dir = self.fresh_dir()?;
        let (c, m) = (shape.connections, shape.members);
        let pop = self.seed(dir.path(), |e| {
            seed::users_in_channels(e, c, m, &self.progress)
        })?;
        let tokens = seed::mint_tokens(&server::data_dir(dir.path()), &pop.users)?;
        let server = ChorusServer::start(&self.binary, dir.path(), &self.settings)?;
        let channel_ids: Vec<String> = pop.channels.iter().map(|c| c.to_string()).collect();
        let target = server.target(transport)?;
        let outcome = Self::runtime()?.block_on(async {
            self.progress
                .set_message(format!("chat over {}: connecting", transport.label()));
            let (workers, open, _) = self
                .spawn_workers(c, transport, CHAT_WORKERS_MIN, |w, range| {
                    Job::Chat(ChatJob {
                        target: target.clone(),
                        source: worker::source_address(w),
                        connections: range.map(|i| (i, tokens[i].clone())).collect(),
                        total_connections: c,
                        members: m,
                        channel_ids: channel_ids.clone(),
                        rate: shape.rate,
                        warmup_ns: nanos(shape.warmup),
                        duration_ns: nanos(shape.duration),
                        drain_ns: nanos(CHAT_DRAIN),
                        body_bytes: shape.body_bytes,
                    })
                })
                .await?;
            ensure!(open == c, "only {open} of {c} chat connections opened");
            let outcome = self.chat_measure(shape, workers, server.pid()).await?;
            if transport == Transport::Quic {
                self.check_closed(server.addr).await;
                match quic_loss_note(server.addr).await {
                    Ok(note) => self
                        .notes
                        .borrow_mut()
                        .push(format!("chat over QUIC: {note}")),
                    Err(e) => say(&self.progress, format!("warning: no QUIC counts: {e:#}")),
                }
            }
            match commit_note(server.addr).await {
                Ok(note) => self.notes.borrow_mut().push(format!("chat: {note}")),
                Err(e) => say(&self.progress, format!("warning: no /metrics: {e:#}")),
            }
            Ok(outcome)
        })?;
        self.stop_server(server, "chat");
        Ok(outcome)
    }

    async fn chat_measure(
        &self,
        shape: &ChatShape,
        mut workers: Vec<WorkerHandle>,
        pid: u32,
    ) -> anyhow::Result<ChatOutcome> {
        // Start a little ahead so that every worker has the command before message 0.
        let start_ns = wall_ns() + 200_000_000;
        for w in &mut workers {
            w.command(&Command::Start { start_ns }).await?;
        }
        let window_start = start_ns + nanos(shape.warmup);
        let window_end = window_start + nanos(shape.duration);
        sleep_until_wall(start_ns).await;
        let total_ms = (window_end - start_ns) / 1_000_000;
        self.progress.set_length(total_ms);
        self.progress.set_position(0);
        self.progress
            .set_message("chat: warm-up and measured window (ms)");
        let mut usage = None;
        let mut generator: Vec<UsageWindow> = Vec::new();
        loop {
            let now = wall_ns();
            if usage.is_none() && now >= window_start {
                usage = Some(UsageWindow::start(pid));
                generator = workers
                    .iter()
                    .filter_map(|w| w.pid())
                    .map(UsageWindow::start)
                    .collect();
            }
            if now >= window_end {
                break;
            }
            self.progress.set_position((now - start_ns) / 1_000_000);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let server = usage.unwrap_or_else(|| UsageWindow::start(pid)).finish();
        let generator_cpu_secs = generator.iter().map(|w| w.finish().cpu_secs).sum();
        self.progress.set_message("chat: draining");
        let mut outcome = ChatOutcome {
            ack: crate::latency::histogram_us(),
            delivery: crate::latency::histogram_us(),
            sent: 0,
            expected_deliveries: 0,
            delivered: 0,
            elapsed: shape.duration,
            server,
            generator_cpu_secs,
        };
        let (mut errors, mut closed, mut acked) = (0, 0, 0);
        for mut w in workers {
            match w.report().await? {
                Report::ChatDone(t) => {
                    worker::add_pairs(&mut outcome.ack, &t.ack);
                    worker::add_pairs(&mut outcome.delivery, &t.delivery);
                    outcome.sent += t.sent;
                    outcome.expected_deliveries += t.expected;
                    outcome.delivered += t.delivered;
                    (errors, closed, acked) =
                        (errors + t.errors, closed + t.closed, acked + t.acked);
                }
                other => bail!("expected chat totals, got {other:?}"),
            }
            w.stop().await?;
        }
        if errors + closed > 0 || acked < outcome.sent {
            say(
                &self.progress,
                format!(
                    "warning: chat saw {errors} error frames, {closed} closed connections, \
                 {acked} of {} acks",
                    outcome.sent
                ),
            );
        }
        Ok(outcome)
    }

    /// `fanout` against Chorus.
    pub fn fanout(&self, shape: &FanoutShape) -> anyhow::Result<FanoutOutcome> {
        ensure!(
            shape.online < shape.members,
            "the sender is a member who is not counted online"
        );
        let dir = self.fresh_dir()?;
        let pop = self.seed(dir.path(), |e| {
            seed::one_big_channel(e, shape.members - 1, &self.progress)
        })?;
        let mut who = vec![pop.owner];
        who.extend_from_slice(&pop.users[..shape.online]);
        let tokens = seed::mint_tokens(&server::data_dir(dir.path()), &who)?;
        let server = ChorusServer::start(&self.binary, dir.path(), &self.settings)?;
        let usage = UsageWindow::start(server.pid());
        let channel = pop.channels[0].to_string();
        let target = server.target(Transport::WebSocket)?;
        let outcome = Self::runtime()?.block_on(async {
            self.progress
                .set_message(format!("fanout: connecting {}", shape.online));
            let online = &tokens[1..];
            let (workers, open, _) = self
                .spawn_workers(online.len(), Transport::WebSocket, 1, |w, range| {
                    hold_job(&target, w, &online[range])
                })
                .await?;
            ensure!(
                open == shape.online,
                "only {open} of {} online members connected",
                shape.online
            );
            let sender = Dialer::new(&target, "127.0.0.1".parse()?)?
                .connect(&tokens[0])
                .await?;
            self.fanout_rounds(shape, sender, workers, &channel).await
        });
        let mut outcome = outcome?;
        outcome.server = usage.finish();
        self.stop_server(server, "fanout");
        Ok(outcome)
    }

    async fn fanout_rounds(
        &self,
        shape: &FanoutShape,
        mut sender: Conn,
        mut workers: Vec<WorkerHandle>,
        channel: &str,
    ) -> anyhow::Result<FanoutOutcome> {
        let mut outcome = FanoutOutcome {
            first: crate::latency::histogram_us(),
            last: crate::latency::histogram_us(),
            missing: 0,
            server: Default::default(),
        };
        self.progress.set_message("fanout: rounds");
        self.progress.set_length(shape.rounds as u64);
        self.progress.set_position(0);
        for round in 0..shape.rounds as u64 {
            let frame = serde_json::json!({
                "type": "message:send", "ref": round.to_string(), "channel_id": channel,
                "text": worker::fanout_text(round), "client_msg_id": format!("fanout-{round}"),
            });
            let sent_ns = wall_ns();
            sender.send_text(&frame.to_string()).await?;
            let (mut count, mut first, mut last) = (0, u64::MAX, 0);
            for w in &mut workers {
                let (n, first_ns, last_ns) = round_of(w, round).await?;
                if n > 0 {
                    (first, last) = (first.min(first_ns), last.max(last_ns));
                }
                count += n;
            }
            outcome.missing += (shape.online - count) as u64;
            if count > 0 {
                let (to_first, to_last) = (
                    schedule::since(sent_ns, first),
                    schedule::since(sent_ns, last),
                );
                crate::latency::record(&mut outcome.first, to_first);
                crate::latency::record(&mut outcome.last, to_last);
                say(
                    &self.progress,
                    format!(
                        "fanout round {round}: {count} delivered, first {:.1} ms, last {:.1} ms",
                        to_first.as_secs_f64() * 1e3,
                        to_last.as_secs_f64() * 1e3
                    ),
                );
            }
            // The sender's own copy and its ack, read so that its queue never fills.
            sender.drain_ready().await;
            self.progress.inc(1);
        }
        for w in workers {
            w.stop().await?;
        }
        Ok(outcome)
    }

    /// `connections` against Chorus: idle sessions over `transport`, server RSS each,
    /// and a ping round that every session must answer.
    pub fn connections(
        &self,
        shape: &ConnectionsShape,
        transport: Transport,
    ) -> anyhow::Result<ConnectionsOutcome> {
        let dir = self.fresh_dir()?;
        let k = shape.connections;
        let pop = self.seed(dir.path(), |e| {
            seed::users_in_channels(e, k, CONNECTIONS_CHANNEL_MEMBERS, &self.progress)
        })?;
        let tokens = seed::mint_tokens(&server::data_dir(dir.path()), &pop.users)?;
        let server = ChorusServer::start(&self.binary, dir.path(), &self.settings)?;
        let target = server.target(transport)?;
        let outcome = Self::runtime()?.block_on(async {
            tokio::time::sleep(self.rss_settle).await;
            let rss_before = procstat::rss_bytes(server.pid()).context("server RSS")?;
            self.progress.set_message(format!(
                "connections: opening {k} over {}",
                transport.label()
            ));
            let (mut workers, open, connect_secs) = self
                .spawn_workers(k, transport, 1, |w, range| {
                    hold_job(&target, w, &tokens[range])
                })
                .await?;
            tokio::time::sleep(self.rss_settle).await;
            let rss_after = procstat::rss_bytes(server.pid()).context("server RSS")?;
            self.progress
                .set_message(format!("connections: pinging {open}"));
            let live = ping_round(&mut workers, 0).await?;
            for w in workers {
                w.stop().await?;
            }
            self.check_closed(server.addr).await;
            Ok::<_, anyhow::Error>(ConnectionsOutcome {
                open,
                connect_rate: open as f64 / connect_secs.max(1e-9),
                connect_secs,
                live: Some(live),
                rss_before,
                rss_after,
            })
        })?;
        self.stop_server(server, "connections");
        Ok(outcome)
    }

    /// `history` against Chorus.
    pub fn history(&self, shape: &HistoryShape, seed_value: u64) -> anyhow::Result<HistoryOutcome> {
        ensure!(
            shape.messages >= shape.page && shape.page >= 1,
            "history needs a full page"
        );
        let dir = self.fresh_dir()?;
        let loading = Instant::now();
        let pop = self.seed(dir.path(), |e| {
            let pop = seed::users_in_channels(e, 0, 0, &self.progress)?;
            let channel = futures::executor::block_on(e.create_channel(
                pop.owner,
                pop.workspace,
                "history",
                chorus_engine::domain::ChannelKind::Public,
            ))?;
            seed::post_history(
                e,
                pop.owner,
                channel.id,
                shape.messages,
                HISTORY_BODY_BYTES,
                &self.progress,
            )?;
            let engine_reads = engine_history_reads(e, pop.owner, channel.id, shape, seed_value)?;
            self.notes.borrow_mut().push(format!(
                "history: the same reads through the embedded engine, in process (no HTTP, \
                 JWT or JSON; the layer a PostgreSQL query compares with): p50 {:.3} ms, \
                 p99 {:.3} ms, max {:.3} ms over {} reads",
                engine_reads.value_at_quantile(0.5) as f64 / 1000.0,
                engine_reads.value_at_quantile(0.99) as f64 / 1000.0,
                engine_reads.max() as f64 / 1000.0,
                engine_reads.len()
            ));
            Ok(Population {
                channels: vec![channel.id],
                ..pop
            })
        })?;
        let load = loading.elapsed();
        let token = seed::mint_tokens(&server::data_dir(dir.path()), &[pop.owner])?.remove(0);
        self.progress
            .set_message("history: server replaying its log");
        let server = ChorusServer::start(&self.binary, dir.path(), &self.settings)?;
        // The reads are of a settled server: one started on a seeded directory indexes all
        // of it for search first (a million messages), on the cores the reads need.
        self.progress
            .set_message("history: server indexing its log for search");
        let rt = Self::runtime()?;
        rt.block_on(server::search_ready(
            &reqwest::Client::new(),
            &format!("http://{}", server.addr),
            HISTORY_SEARCH_READY_GIVE_UP,
        ))?;
        let usage = UsageWindow::start(server.pid());
        let channel = pop.channels[0].to_string();
        let (page, wrong) = rt.block_on(super::history::read_pages(
            &format!("http://{}", server.addr),
            &token,
            &pop.owner.to_string(),
            &channel,
            shape,
            seed_value,
            &self.progress,
        ))?;
        let server_usage = usage.finish();
        self.stop_server(server, "history");
        Ok(HistoryOutcome {
            page,
            load,
            wrong,
            server: server_usage,
        })
    }
}

/// Reads `shape.queries` pages at random cursors straight from the engine, `concurrency` at
/// a time, and returns their latencies (call → page in hand).
fn engine_history_reads(
    engine: &chorus_engine::Engine,
    user: chorus_engine::ids::UserId,
    channel: chorus_engine::ids::ChannelId,
    shape: &HistoryShape,
    seed_value: u64,
) -> anyhow::Result<hdrhistogram::Histogram<u64>> {
    use futures::stream::{FuturesUnordered, StreamExt as _};
    let mut rng = super::history::XorShift::new(seed_value ^ 0x5EED);
    let (lowest, span) = (
        shape.page as u64 + 2,
        (shape.messages - shape.page) as u64 + 1,
    );
    let mut hist = crate::latency::histogram_us();
    futures::executor::block_on(async {
        let mut pending = FuturesUnordered::new();
        for _ in 0..shape.queries {
            if pending.len() >= shape.concurrency.max(1) {
                let (started, page): (Instant, Result<_, _>) =
                    pending.next().await.expect("pending reads");
                page?;
                crate::latency::record(&mut hist, started.elapsed());
            }
            let before = lowest + rng.below(span);
            pending.push(async move {
                let started = Instant::now();
                (
                    started,
                    engine
                        .history(user, channel, Some(before), shape.page)
                        .await,
                )
            });
        }
        while let Some((started, page)) = pending.next().await {
            page?;
            crate::latency::record(&mut hist, started.elapsed());
        }
        Ok::<_, chorus_engine::EngineError>(())
    })?;
    Ok(hist)
}

impl ChorusRunner {
    /// Warns when sessions are still open on the server after every worker closed its own
    /// and exited: the server would then be measured, and drained, with sessions nobody
    /// holds.
    async fn check_closed(&self, addr: std::net::SocketAddr) {
        // One client, so one kept-alive connection: the request's own, counted open too.
        let client = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + CLOSE_SETTLE;
        let mut open = None;
        while tokio::time::Instant::now() < deadline {
            open = metric(&client, addr, "chorus_connections_open").await.ok();
            if open.is_some_and(|n| n <= 1.0) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let open = open.map_or("unknown".into(), |n| format!("{}", n - 1.0));
        self.warn(format!(
            "{open} sessions still open on the server {CLOSE_SETTLE:?} after the workers \
             closed theirs"
        ));
    }

    /// Shows a warning and keeps it for the report's notes.
    pub(super) fn warn(&self, line: String) {
        say(&self.progress, format!("warning: {line}"));
        self.notes.borrow_mut().push(format!("warning: {line}"));
    }

    /// Stops the server. One that does not drain in time is killed and reported in the
    /// notes, and the figures measured before stay: the drain is the server's own concern,
    /// not what the run measured.
    pub(super) fn stop_server(&self, server: ChorusServer, scenario: &str) {
        if let Err(e) = server.stop() {
            self.warn(format!("{scenario}: {e:#}"));
        }
    }
}

/// One unlabelled value of the server's `/metrics`.
async fn metric(
    client: &reqwest::Client,
    addr: std::net::SocketAddr,
    name: &str,
) -> anyhow::Result<f64> {
    let text = client
        .get(format!("http://{addr}/metrics"))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .with_context(|| format!("{name} in /metrics"))
}

/// Members per channel of the users of a `connections` run (each is in one channel, as
/// every chat user is, and the channels are idle).
const CONNECTIONS_CHANNEL_MEMBERS: usize = 50;

fn hold_job(target: &super::client::Target, w: usize, tokens: &[String]) -> Job {
    Job::Hold(HoldJob {
        target: target.clone(),
        source: worker::source_address(w),
        tokens: tokens.to_vec(),
    })
}

/// Asks every session of `workers` for a `pong` at once (ping round `round`) and waits
/// for the answers, or for [`ROUND_TIMEOUT`].
async fn ping_round(workers: &mut [WorkerHandle], round: u64) -> anyhow::Result<LiveCheck> {
    let sent_ns = wall_ns();
    for w in workers.iter_mut() {
        w.command(&Command::Ping { round }).await?;
    }
    let (mut answered, mut last) = (0, sent_ns);
    for w in workers.iter_mut() {
        let (count, _, last_ns) = round_of(w, round).await?;
        answered += count;
        last = last.max(last_ns);
    }
    Ok(LiveCheck {
        answered,
        last: schedule::since(sent_ns, last),
    })
}

/// Worker `w`'s arrivals of `round`: complete, or as far as they got by [`ROUND_TIMEOUT`].
/// A late complete report of an earlier round (sent while its flush was on the way) is
/// skipped.
async fn round_of(w: &mut WorkerHandle, round: u64) -> anyhow::Result<(usize, u64, u64)> {
    let mut deadline = tokio::time::Instant::now() + ROUND_TIMEOUT;
    let mut flushed = false;
    loop {
        let report = match tokio::time::timeout_at(deadline, w.report()).await {
            Ok(r) => r?,
            Err(_) if !flushed => {
                flushed = true;
                deadline = tokio::time::Instant::now() + ROUND_TIMEOUT;
                w.command(&Command::Flush { round }).await?;
                continue;
            }
            Err(_) => bail!("a worker did not answer a flush of round {round}"),
        };
        match report {
            Report::Round { round: r, .. } if r < round => continue,
            Report::Round {
                round: r,
                count,
                first_ns,
                last_ns,
            } if r == round => return Ok((count, first_ns, last_ns)),
            other => bail!("expected round {round}, got {other:?}"),
        }
    }
}

/// The QUIC packets of the sessions that ended, as the server's `/metrics` counts them:
/// sent, declared lost, and the congestion events the losses caused.
async fn quic_loss_note(addr: std::net::SocketAddr) -> anyhow::Result<String> {
    // Counted when a connection has drained, a few probe timeouts after it closed.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let client = reqwest::Client::new();
    let sent = metric(&client, addr, "chorus_quic_packets_sent_total").await?;
    let lost = metric(&client, addr, "chorus_quic_packets_lost_total").await?;
    let events = metric(&client, addr, "chorus_quic_congestion_events_total").await?;
    Ok(format!(
        "the server declared {lost:.0} of the {sent:.0} packets it sent lost ({:.3} %), \
         in {events:.0} congestion events (whole run, warm-up included)",
        100.0 * lost / sent.max(1.0)
    ))
}

/// The server's group commits as its `/metrics` counts them: how many, events per commit,
/// and the bucket bounds of the median, p99 and slowest of one durable batch write (a
/// stall in a run's deliveries that a slow write explains shows in the last).
async fn commit_note(addr: std::net::SocketAddr) -> anyhow::Result<String> {
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await?
        .error_for_status()?
        .text()
        .await?;
    let value = |name: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    };
    let events = value("chorus_commits_total").context("chorus_commits_total")?;
    let commits = value("chorus_fsync_latency_seconds_count").context("fsync count")?;
    let mut buckets: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("chorus_fsync_latency_seconds_bucket{le=\"")?;
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let bound = |q: f64| {
        let le = buckets
            .iter()
            .find(|(_, count)| *count >= q * commits)
            .map_or(f64::INFINITY, |b| b.0);
        format!("≤ {} ms", le * 1000.0)
    };
    Ok(format!(
        "the server made {commits:.0} group commits of {events:.0} events ({:.1} events each, \
         over the whole run, warm-up included); one durable batch write (an O_DSYNC write, or a write and its fdatasync) took p50 {} \
         and p99 {}, the slowest {} (bucket bounds of its /metrics)",
        events / commits.max(1.0),
        bound(0.5),
        bound(0.99),
        bound(1.0)
    ))
}

/// Prints a line above the progress bar, or on standard error when there is no bar (not
/// a terminal), so that warnings are never lost.
pub fn say(progress: &ProgressBar, line: impl AsRef<str>) {
    if progress.is_hidden() {
        eprintln!("{}", line.as_ref());
    } else {
        progress.println(line);
    }
}

pub(super) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

pub(super) async fn sleep_until_wall(ns: u64) {
    let now = wall_ns();
    if ns > now {
        tokio::time::sleep(Duration::from_nanos(ns - now)).await;
    }
}
