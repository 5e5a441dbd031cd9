//! `chorus-bench`: the load harness. It starts the real `chorus` server (and each peer:
//! Redis pub/sub, NATS JetStream, PostgreSQL, when installed) on this machine, drives the
//! same open-loop scenarios against each, and writes a markdown report with PNG latency
//! plots. `chorus-bench suite` runs the standard suite; each scenario also runs alone.

use anyhow::Context;
use chorus_bench::load::chorus::{say, ChorusRunner};
use chorus_bench::load::client::Transport;
use chorus_bench::load::cluster::ClusterShape;
use chorus_bench::load::files::{self, FilesShape};
use chorus_bench::load::notify::{self, NotifyShape};
use chorus_bench::load::presence::PresenceShape;
use chorus_bench::load::report::{self, Results, Run, RunInfo, Scenario};
use chorus_bench::load::search::{self, SearchOutcome, SearchShape};
use chorus_bench::load::server::{self, ServerSettings};
use chorus_bench::load::{
    plot, worker, ChatOutcome, ChatShape, ConnectionsShape, FanoutShape, HistoryShape,
};
use chorus_bench::peers;
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, Parser)]
#[command(
    name = "chorus-bench",
    about = "Load harness: Chorus against Redis, NATS and PostgreSQL"
)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Args)]
struct Common {
    /// The chorus server binary [default: target/release/chorus of this workspace]
    #[arg(long, global = true)]
    chorus_bin: Option<PathBuf>,
    /// Where each run's fresh data directories go [default: the system temporary dir]
    #[arg(long, global = true)]
    work_dir: Option<PathBuf>,
    /// Where the report and plots go (a new folder per invocation)
    #[arg(long, global = true, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/results"))]
    results_dir: PathBuf,
    /// Server shards [default: one per core]
    #[arg(long, global = true)]
    shards: Option<usize>,
    /// Worker processes at least (more when connections need them)
    #[arg(long, global = true, default_value_t = 1)]
    workers: usize,
    /// Run Chorus only, no peers
    #[arg(long, global = true)]
    no_peers: bool,
    /// Seed of the history cursors [default: from the clock, printed in the report]
    #[arg(long, global = true)]
    seed: Option<u64>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// C connections in channels of M members, R messages/s in total, open loop
    Chat(ChatArgs),
    /// One channel of many members, K online; one message at a time
    Fanout(FanoutArgs),
    /// K idle authenticated sessions (WebSocket, QUIC or both): server memory each, connect
    /// rate, a ping round that all must answer
    Connections(ConnectionsArgs),
    /// A channel of N messages; page reads at random cursors over REST
    History(HistoryArgs),
    /// K connections each watching W users' presence; a share of the users changes status
    /// every second
    Presence(PresenceArgs),
    /// Files: 20 MiB upload throughput against raw write+fsync, a 4000×3000 JPEG's thumb
    /// against vipsthumbnail, upload → thumb latency at 20 uploads/s (Chorus only)
    Files(FilesArgs),
    /// Message search against PostgreSQL full-text search on the same corpus: query
    /// latency with concurrent searchers, ack → searchable at a sustained rate, indexing
    /// CPU and index bytes per message
    Search(SearchArgs),
    /// Notifications: a push gateway sink measured alone, ack → push at 1,000 msgs/s with
    /// 10% mentions, an `@channel` fan-out to 100,000 offline members, and the sender's
    /// send latency during it with and without notifications (Chorus only)
    Notify(NotifyArgs),
    /// Replicated commits: one node against a cluster of N nodes on loopback, closed-loop
    /// acks/s and open-loop send → ack through each partition's leader, then leader
    /// SIGKILL → first write in its partitions (Chorus only)
    Cluster(ClusterArgs),
    /// Every scenario at the standard (or smoke) size, with peers, report, plots, README
    Suite(SuiteArgs),
    /// Internal: a worker process holding connections for its parent
    #[command(hide = true)]
    Worker,
}

#[derive(Debug, Clone, Args)]
struct ChatArgs {
    /// Connections (one user each)
    #[arg(long, default_value_t = 1_000)]
    connections: usize,
    /// Members per channel
    #[arg(long, default_value_t = 50)]
    members: usize,
    /// Messages per second in total
    #[arg(long, default_value_t = 1_000.0)]
    rate: f64,
    /// Measured seconds
    #[arg(long, default_value_t = 20.0)]
    duration: f64,
    /// Warm-up seconds before measuring
    #[arg(long, default_value_t = 5.0)]
    warmup: f64,
    /// Bytes of text per message
    #[arg(long, default_value_t = 100)]
    body_bytes: usize,
    /// The sessions' transport; `both` runs the same load over each, one after the other
    #[arg(long, value_enum, default_value_t = TransportArg::Websocket)]
    transport: TransportArg,
}

/// The transports a Chorus scenario runs over.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum TransportArg {
    /// WebSocket sessions (one TCP connection each)
    Websocket,
    /// QUIC sessions (API.md §8), a worker's all over one UDP socket
    Quic,
    /// WebSocket, then QUIC, each on a fresh server
    Both,
}

impl TransportArg {
    fn transports(self) -> &'static [Transport] {
        match self {
            TransportArg::Websocket => &[Transport::WebSocket],
            TransportArg::Quic => &[Transport::Quic],
            TransportArg::Both => &[Transport::WebSocket, Transport::Quic],
        }
    }
}

#[derive(Debug, Clone, Args)]
struct FilesArgs {
    /// A tiny size (2 uploads of 1 MiB, a 400×300 JPEG, 5 uploads/s for 1 s)
    #[arg(long)]
    smoke: bool,
    /// Fail when vipsthumbnail is missing [default: when CHORUS_REQUIRE_PEERS is set]
    #[arg(long)]
    require_vips: bool,
    /// Run only the upload-throughput part (uploads against raw writes)
    #[arg(long)]
    uploads_only: bool,
    /// How many 20 MiB uploads the throughput figure is the median of [default: 10]
    #[arg(long)]
    uploads: Option<usize>,
}

#[derive(Debug, Clone, Args)]
struct NotifyArgs {
    /// A tiny size (100 recipients at 100 msgs/s for 2 s, a 1,000-member `@channel`)
    #[arg(long)]
    smoke: bool,
    /// Offline recipients of the ack → push figure [default: 1,000]
    #[arg(long)]
    recipients: Option<usize>,
    /// Messages per second of the ack → push figure [default: 1,000]
    #[arg(long)]
    rate: Option<f64>,
    /// Seconds of messages of the ack → push figure [default: 20]
    #[arg(long)]
    secs: Option<f64>,
    /// Members of the `@channel` channel, its sender included [default: 100,000]
    #[arg(long)]
    fanout_members: Option<usize>,
    /// POSTs of the sink-alone measurement [default: 200,000]
    #[arg(long)]
    sink_requests: Option<usize>,
}

#[derive(Debug, Clone, Args)]
struct ClusterArgs {
    /// A tiny size (4 channels, 1 s loops at 100 msgs/s, one failover)
    #[arg(long)]
    smoke: bool,
    /// Nodes of the cluster [default: 3]
    #[arg(long)]
    nodes: Option<usize>,
    /// Channels, each with its own user and writing connection [default: 256]
    #[arg(long)]
    channels: Option<usize>,
    /// Sends in flight per connection in the closed loop (a session answers one at a time;
    /// the rest wait in its socket) [default: 2]
    #[arg(long)]
    depth: Option<usize>,
    /// Open-loop rates, messages/s in all, comma-separated [default: 1000,2000,4000]
    #[arg(long, value_delimiter = ',')]
    rates: Option<Vec<f64>>,
    /// Seconds of each loop [default: 8]
    #[arg(long)]
    secs: Option<f64>,
    /// Leaders SIGKILLed in turn [default: 3]
    #[arg(long)]
    failovers: Option<usize>,
    /// Connect to the nodes in turn, whoever leads, instead of to each partition's leader
    #[arg(long)]
    any_node: bool,
}

impl ClusterArgs {
    fn shape(&self) -> ClusterShape {
        let mut s = if self.smoke {
            ClusterShape::smoke()
        } else {
            ClusterShape::standard()
        };
        if let Some(n) = self.nodes {
            s.nodes = n;
        }
        if let Some(n) = self.channels {
            s.channels = n;
        }
        if let Some(n) = self.depth {
            s.depth = n;
        }
        if let Some(r) = &self.rates {
            s.rates = r.clone();
        }
        if let Some(secs) = self.secs {
            s.closed_secs = secs;
            s.open_secs = secs;
        }
        if let Some(n) = self.failovers {
            s.failovers = n;
        }
        s.any_node = self.any_node;
        s
    }
}

impl NotifyArgs {
    fn shape(&self) -> NotifyShape {
        let base = if self.smoke {
            NotifyShape::smoke()
        } else {
            NotifyShape::standard()
        };
        NotifyShape {
            recipients: self.recipients.unwrap_or(base.recipients),
            rate: self.rate.unwrap_or(base.rate),
            secs: self.secs.unwrap_or(base.secs),
            fanout_members: self.fanout_members.unwrap_or(base.fanout_members),
            sink_requests: self.sink_requests.unwrap_or(base.sink_requests),
            ..base
        }
    }
}

#[derive(Debug, Clone, Args)]
struct SearchArgs {
    /// A tiny size (2,000 messages, 40 queries, 100 msgs/s for 1 s)
    #[arg(long)]
    smoke: bool,
    /// Messages loaded [default: 1,000,000]
    #[arg(long)]
    messages: Option<usize>,
    /// Queries measured on each system [default: 2,000]
    #[arg(long)]
    queries: Option<usize>,
    /// Concurrent searchers [default: 4]
    #[arg(long)]
    searchers: Option<usize>,
    /// Freshness posts per second [default: 1,000]
    #[arg(long)]
    fresh_rate: Option<f64>,
    /// Seconds of freshness posts [default: 20]
    #[arg(long)]
    fresh_secs: Option<f64>,
    /// Runs, each on a fresh server and a fresh PostgreSQL; the medians of the key
    /// figures follow the tables
    #[arg(long, default_value_t = 1)]
    runs: usize,
}

impl SearchArgs {
    fn shape(&self) -> SearchShape {
        let base = if self.smoke {
            SearchShape::smoke()
        } else {
            SearchShape::standard()
        };
        SearchShape {
            messages: self.messages.unwrap_or(base.messages),
            queries: self.queries.unwrap_or(base.queries),
            searchers: self.searchers.unwrap_or(base.searchers),
            fresh_rate: self.fresh_rate.unwrap_or(base.fresh_rate),
            fresh_secs: self.fresh_secs.unwrap_or(base.fresh_secs),
            ..base
        }
    }
}

#[derive(Debug, Clone, Args)]
struct FanoutArgs {
    /// Members of the channel
    #[arg(long, default_value_t = 100_000)]
    members: usize,
    /// Members online
    #[arg(long, default_value_t = 19_000)]
    online: usize,
    /// Messages, one at a time
    #[arg(long, default_value_t = 20)]
    rounds: usize,
}

#[derive(Debug, Clone, Args)]
struct ConnectionsArgs {
    /// Idle connections to open
    #[arg(long, default_value_t = 19_000)]
    connections: usize,
    /// The sessions' transport; `both` runs the same size over each, one after the other
    #[arg(long, value_enum, default_value_t = TransportArg::Websocket)]
    transport: TransportArg,
}

#[derive(Debug, Clone, Args)]
struct HistoryArgs {
    /// Messages in the channel
    #[arg(long, default_value_t = 1_000_000)]
    messages: usize,
    /// Messages per page
    #[arg(long, default_value_t = 50)]
    page: usize,
    /// Page reads measured
    #[arg(long, default_value_t = 20_000)]
    queries: usize,
    /// Readers at once
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
}

#[derive(Debug, Clone, Args)]
struct PresenceArgs {
    /// Connections (one user each)
    #[arg(long, default_value_t = 19_000)]
    connections: usize,
    /// Users each connection watches
    #[arg(long, default_value_t = 100)]
    watched: usize,
    /// Percent of the users that change status each second
    #[arg(long, default_value_t = 5.0)]
    change_percent: f64,
    /// Measured seconds
    #[arg(long, default_value_t = 20.0)]
    duration: f64,
    /// Warm-up seconds before measuring
    #[arg(long, default_value_t = 5.0)]
    warmup: f64,
}

impl PresenceArgs {
    fn shape(&self) -> PresenceShape {
        PresenceShape {
            connections: self.connections,
            watched: self.watched,
            change_share: self.change_percent / 100.0,
            duration: Duration::from_secs_f64(self.duration),
            warmup: Duration::from_secs_f64(self.warmup),
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Size {
    /// The standard suite, under 15 minutes on a 2-core machine.
    Standard,
    /// A tiny run of every scenario, for the smoke test.
    Smoke,
}

#[derive(Debug, Clone, Args)]
struct SuiteArgs {
    /// Standard or smoke sizes
    #[arg(long, value_enum, default_value_t = Size::Standard)]
    size: Size,
    /// Leave bench/README.md's summary table alone
    #[arg(long)]
    no_readme: bool,
}

impl ChatArgs {
    fn shape(&self) -> ChatShape {
        ChatShape {
            connections: self.connections,
            members: self.members,
            rate: self.rate,
            duration: Duration::from_secs_f64(self.duration),
            warmup: Duration::from_secs_f64(self.warmup),
            body_bytes: self.body_bytes,
        }
    }
}

impl FanoutArgs {
    fn shape(&self) -> FanoutShape {
        FanoutShape {
            members: self.members,
            online: self.online,
            rounds: self.rounds,
        }
    }
}

impl HistoryArgs {
    fn shape(&self) -> HistoryShape {
        HistoryShape {
            messages: self.messages,
            page: self.page,
            queries: self.queries,
            concurrency: self.concurrency,
        }
    }
}

/// The four shapes of a suite, the rungs of the chat rate ladder, and the size of the
/// QUIC sessions run.
struct SuiteShapes {
    chat: ChatShape,
    ladder: Vec<ChatShape>,
    fanout: FanoutShape,
    connections: ConnectionsShape,
    quic_sessions: ConnectionsShape,
    history: HistoryShape,
    presence: PresenceShape,
    search: SearchShape,
}

/// The rungs of a ladder: `base` at each of `rates`, over a shorter window.
fn rungs(base: &ChatShape, rates: &[f64], warmup_s: f64, duration_s: f64) -> Vec<ChatShape> {
    rates
        .iter()
        .map(|&rate| ChatShape {
            rate,
            warmup: Duration::from_secs_f64(warmup_s),
            duration: Duration::from_secs_f64(duration_s),
            ..base.clone()
        })
        .collect()
}

/// The smoke test's settling time for RSS readings: its figures are not kept, its time is.
const SMOKE_RSS_SETTLE: Duration = Duration::from_millis(250);

fn suite_shapes(size: Size) -> SuiteShapes {
    let mut shapes = suite_sizes(size);
    shapes.ladder = match size {
        Size::Standard => rungs(&shapes.chat, &[2_000.0, 4_000.0, 8_000.0], 2.0, 8.0),
        Size::Smoke => rungs(&shapes.chat, &[200.0], 0.3, 0.5),
    };
    shapes
}

fn suite_sizes(size: Size) -> SuiteShapes {
    match size {
        Size::Standard => SuiteShapes {
            chat: ChatArgs {
                connections: 1_000,
                members: 50,
                rate: 1_000.0,
                duration: 20.0,
                warmup: 5.0,
                body_bytes: 100,
                transport: TransportArg::Both,
            }
            .shape(),
            ladder: Vec::new(),
            fanout: FanoutShape {
                members: 100_000,
                online: 19_000,
                rounds: 20,
            },
            connections: ConnectionsShape {
                connections: 19_000,
            },
            quic_sessions: ConnectionsShape {
                connections: report::targets::QUIC_SESSIONS,
            },
            history: HistoryShape {
                messages: 1_000_000,
                page: 50,
                queries: 20_000,
                concurrency: 4,
            },
            presence: PresenceArgs {
                connections: 19_000,
                watched: 100,
                change_percent: 5.0,
                duration: 20.0,
                warmup: 5.0,
            }
            .shape(),
            search: SearchShape::suite(),
        },
        Size::Smoke => SuiteShapes {
            chat: ChatArgs {
                connections: 20,
                members: 5,
                rate: 100.0,
                duration: 1.0,
                warmup: 0.5,
                body_bytes: 64,
                transport: TransportArg::Both,
            }
            .shape(),
            ladder: Vec::new(),
            fanout: FanoutShape {
                members: 300,
                online: 30,
                rounds: 3,
            },
            connections: ConnectionsShape { connections: 40 },
            quic_sessions: ConnectionsShape { connections: 60 },
            history: HistoryShape {
                messages: 2_000,
                page: 50,
                queries: 100,
                concurrency: 2,
            },
            presence: PresenceArgs {
                connections: 60,
                watched: 10,
                change_percent: 50.0,
                duration: 1.5,
                warmup: 0.5,
            }
            .shape(),
            search: SearchShape::smoke(),
        },
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Cmd::Worker = cli.command {
        return worker::run();
    }
    let started = Instant::now();
    let load_before = loadavg();
    let date = report::utc_date(chorus_bench::load::schedule::wall_ns() / 1_000_000_000);
    let progress = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg} {wide_bar} {pos}/{len}")
            .expect("a valid template"),
    );
    progress.enable_steady_tick(Duration::from_millis(200));
    let mut settings = ServerSettings::default();
    if let Some(shards) = cli.common.shards {
        settings.shards = shards;
    }
    let runner = ChorusRunner {
        binary: cli
            .common
            .chorus_bin
            .clone()
            .unwrap_or_else(server::default_binary),
        worker_exe: std::env::current_exe().context("find this executable")?,
        settings,
        work_root: cli
            .common
            .work_dir
            .clone()
            .unwrap_or_else(std::env::temp_dir),
        workers_min: cli.common.workers,
        rss_settle: match &cli.command {
            Cmd::Suite(SuiteArgs {
                size: Size::Smoke, ..
            }) => SMOKE_RSS_SETTLE,
            _ => chorus_bench::load::chorus::RSS_SETTLE,
        },
        progress: progress.clone(),
        notes: Default::default(),
    };
    if cli.common.chorus_bin.is_none() && !runner.binary.exists() {
        build_server(&progress)?;
    }
    anyhow::ensure!(
        runner.binary.exists(),
        "{} is missing; build it with `cargo build --release -p chorus-gateway` or pass \
         --chorus-bin",
        runner.binary.display()
    );
    if let Cmd::Files(a) = &cli.command {
        return files(&runner, a, &load_before);
    }
    if let Cmd::Notify(a) = &cli.command {
        return notify(&runner, a, &load_before);
    }
    if let Cmd::Cluster(a) = &cli.command {
        return cluster(&runner, a, &load_before);
    }
    if let Cmd::Search(a) = &cli.command {
        return search(&runner, a, !cli.common.no_peers, &load_before);
    }
    let seed = cli
        .common
        .seed
        .unwrap_or_else(chorus_bench::load::schedule::wall_ns);
    let peers = !cli.common.no_peers;
    let mut results = Results::default();
    let (name, readme) = match &cli.command {
        Cmd::Chat(a) => {
            results.chat = Some(chat(&runner, &a.shape(), a.transport, peers));
            ("chat", false)
        }
        Cmd::Fanout(a) => {
            results.fanout = Some(fanout(&runner, &a.shape(), peers));
            ("fanout", false)
        }
        Cmd::Connections(a) => {
            let shape = ConnectionsShape {
                connections: a.connections,
            };
            results.connections = Some(connections(&runner, &shape, a.transport, peers));
            ("connections", false)
        }
        Cmd::History(a) => {
            results.history = Some(history(&runner, &a.shape(), peers, seed));
            ("history", false)
        }
        Cmd::Presence(a) => {
            results.presence = Some(presence(&runner, &a.shape(), seed));
            ("presence", false)
        }
        Cmd::Suite(a) => {
            if peers && matches!(a.size, Size::Standard) {
                install_peers(&progress);
            }
            let shapes = suite_shapes(a.size);
            let both = TransportArg::Both;
            let first = chat(&runner, &shapes.chat, both, peers);
            results.ladder = ladder(&runner, &shapes.ladder, peers, &first);
            results.chat = Some(first);
            results.fanout = Some(fanout(&runner, &shapes.fanout, peers));
            results.connections = Some(connections(&runner, &shapes.connections, both, peers));
            results.quic_sessions = Some(connections(
                &runner,
                &shapes.quic_sessions,
                TransportArg::Quic,
                false,
            ));
            results.history = Some(history(&runner, &shapes.history, peers, seed));
            results.presence = Some(presence(&runner, &shapes.presence, seed));
            let searched = search_once(&runner, &shapes.search, peers);
            if let Err(why) = &searched {
                say(&progress, format!("search failed: {why:#}"));
            }
            results.search = Some((shapes.search, searched.map_err(|e| format!("{e:#}"))));
            ("suite", !a.no_readme)
        }
        Cmd::Worker | Cmd::Files(_) | Cmd::Search(_) | Cmd::Notify(_) | Cmd::Cluster(_) => {
            unreachable!("handled above")
        }
    };
    progress.finish_and_clear();
    let info = RunInfo {
        date,
        commit: commit(),
        machine: format!(
            "{}; load average (1, 5, 15 min) {load_before} at the start and {} at the end \
             (other work on this machine competes for the same cores)",
            machine(),
            loadavg()
        ),
        command: format!(
            "chorus-bench {} (history cursor seed {seed})",
            std::env::args().skip(1).collect::<Vec<_>>().join(" ")
        ),
        settings: runner.settings.clone(),
        wall_secs: started.elapsed().as_secs_f64(),
        notes: runner.notes.borrow().clone(),
    };
    let dir = write_report(&cli.common.results_dir, name, &info, &results)?;
    println!("{}", report::summary_table(&results));
    println!("{}", report::details(&results));
    for note in &info.notes {
        println!("{note}");
    }
    println!("report: {}", dir.join("report.md").display());
    if readme {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
        let old = std::fs::read_to_string(&path).unwrap_or_default();
        let table = format!(
            "Standard suite of {} at commit `{}` ({}); full report: `{}`.\n\n{}",
            info.date,
            info.commit,
            info.machine,
            dir.strip_prefix(env!("CARGO_MANIFEST_DIR"))
                .unwrap_or(&dir)
                .display(),
            report::summary_table(&results)
        );
        std::fs::write(&path, report::refresh_readme(&old, &table))?;
        println!("refreshed {}", path.display());
    }
    // A run in which Chorus itself failed is a failed run.
    let chorus_failed = [
        results.chat.as_ref().map(|s| chorus_error(&s.runs)),
        results.fanout.as_ref().map(|s| chorus_error(&s.runs)),
        results.connections.as_ref().map(|s| chorus_error(&s.runs)),
        results
            .quic_sessions
            .as_ref()
            .map(|s| chorus_error(&s.runs)),
        results.history.as_ref().map(|s| chorus_error(&s.runs)),
        results.presence.as_ref().map(|s| chorus_error(&s.runs)),
        results
            .search
            .as_ref()
            .map(|(_, o)| o.as_ref().err().map(|why| format!("search: {why}"))),
    ];
    if let Some(why) = chorus_failed.into_iter().flatten().flatten().next() {
        anyhow::bail!("a Chorus run failed: {why}");
    }
    Ok(())
}

/// Builds the release server, as on a fresh clone, with the cargo that runs this (or the
/// one on the PATH).
fn build_server(progress: &ProgressBar) -> anyhow::Result<()> {
    say(
        progress,
        "building the release chorus server (cargo build --release -p chorus-gateway)",
    );
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = std::process::Command::new(cargo)
        .args([
            "build",
            "--release",
            "-p",
            "chorus-gateway",
            "--bin",
            "chorus",
        ])
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .status()
        .context("run cargo to build the server")?;
    anyhow::ensure!(status.success(), "building the server failed: {status}");
    Ok(())
}

/// Runs `bench/setup-peers.sh` when a peer is missing; a failure is reported, and the
/// missing peers are then skipped with that reason in the report.
fn install_peers(progress: &ProgressBar) {
    if peers::redis::available()
        && peers::nats::available()
        && peers::nats::fsync_available()
        && peers::postgres::available()
    {
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("setup-peers.sh");
    progress.set_message("installing peers (setup-peers.sh)");
    match std::process::Command::new("bash").arg(&script).status() {
        Ok(status) if status.success() => {}
        other => say(progress, format!("{} failed: {other:?}", script.display())),
    }
}

fn chorus_error<O>(runs: &[Run<O>]) -> Option<String> {
    runs.iter()
        .filter(|r| r.system == report::CHORUS || r.system == report::CHORUS_QUIC)
        .find_map(|r| {
            r.outcome
                .as_ref()
                .err()
                .map(|e| format!("{}: {e}", r.system))
        })
}

/// The name of Chorus's runs over `transport`.
fn chorus_system(transport: Transport) -> &'static str {
    match transport {
        Transport::WebSocket => report::CHORUS,
        Transport::Quic => report::CHORUS_QUIC,
    }
}

fn run<O>(system: &str, progress: &ProgressBar, f: impl FnOnce() -> anyhow::Result<O>) -> Run<O> {
    progress.set_message(format!("{system}: starting"));
    let outcome = f().map_err(|e| format!("{e:#}"));
    if let Err(why) = &outcome {
        say(progress, format!("{system} failed: {why}"));
    }
    Run {
        system: system.into(),
        outcome,
    }
}

/// Runs a peer if it is wanted and installed; otherwise a run saying why not.
fn peer<O>(
    runner: &ChorusRunner,
    wanted: bool,
    system: &str,
    available: bool,
    f: impl FnOnce(&Path) -> anyhow::Result<O>,
) -> Option<Run<O>> {
    if !wanted {
        return None;
    }
    if !available {
        say(
            &runner.progress,
            format!("{system} is not installed: skipped (bench/setup-peers.sh installs it)"),
        );
        return Some(Run {
            system: system.into(),
            outcome: Err("not installed; see bench/setup-peers.sh".into()),
        });
    }
    Some(run(system, &runner.progress, || {
        std::fs::create_dir_all(&runner.work_root)?;
        let dir = tempfile::Builder::new()
            .prefix("chorus-bench-peer-")
            .tempdir_in(&runner.work_root)?;
        f(dir.path())
    }))
}

/// A peer's `chat` scenario function.
type ChatFn = fn(&ChatShape, &Path) -> anyhow::Result<ChatOutcome>;

/// The peers that run `chat` and climb its rate ladder, in report order: each one's name,
/// whether it is installed, and its scenario function.
fn chat_peers() -> Vec<(&'static str, bool, ChatFn)> {
    vec![
        (
            report::REDIS,
            peers::redis::available(),
            peers::redis::chat as ChatFn,
        ),
        (report::NATS, peers::nats::available(), peers::nats::chat),
        (
            report::NATS_FSYNC,
            peers::nats::fsync_available(),
            peers::nats::fsync_chat,
        ),
    ]
}

fn chat(
    runner: &ChorusRunner,
    shape: &ChatShape,
    transport: TransportArg,
    peers: bool,
) -> Scenario<ChatShape, ChatOutcome> {
    let mut runs: Vec<_> = (transport.transports().iter())
        .map(|&t| run(chorus_system(t), &runner.progress, || runner.chat(shape, t)))
        .collect();
    for (system, available, chat) in chat_peers() {
        runs.extend(peer(runner, peers, system, available, |d| chat(shape, d)));
    }
    Scenario {
        shape: shape.clone(),
        runs,
    }
}

/// Runs Chorus and every `chat` peer (Redis pub/sub and both NATS servers) up the rungs, each
/// until its first rung not sustained. The first rung always runs for every system that
/// ran the standard `chat` (`first`): a busy machine that pushed one run over the bar says
/// little about the next rate, and a report that shows the rung is more honest than one
/// that skips it.
fn ladder(
    runner: &ChorusRunner,
    rungs: &[ChatShape],
    peers: bool,
    first: &Scenario<ChatShape, ChatOutcome>,
) -> Vec<Scenario<ChatShape, ChatOutcome>> {
    let ran = |system: &str| first.outcome(system).is_some();
    let mut chorus_on = ran(report::CHORUS);
    // The peers still climbing: a peer drops out at its first rung not sustained.
    let mut climbing: Vec<_> = chat_peers()
        .into_iter()
        .filter(|(system, ..)| ran(system))
        .collect();
    let mut out = Vec::new();
    for shape in rungs {
        let mut runs = Vec::new();
        if chorus_on {
            let r = run(report::CHORUS, &runner.progress, || {
                runner.chat(shape, Transport::WebSocket)
            });
            chorus_on = r.outcome.as_ref().is_ok_and(report::sustained);
            runs.push(r);
        }
        climbing.retain(|&(system, available, chat)| {
            let r = peer(runner, peers, system, available, |d| chat(shape, d));
            let on = r
                .as_ref()
                .is_some_and(|r| r.outcome.as_ref().is_ok_and(report::sustained));
            runs.extend(r);
            on
        });
        if runs.is_empty() {
            break;
        }
        out.push(Scenario {
            shape: shape.clone(),
            runs,
        });
    }
    out
}

fn fanout(
    runner: &ChorusRunner,
    shape: &FanoutShape,
    peers: bool,
) -> Scenario<FanoutShape, chorus_bench::load::FanoutOutcome> {
    let mut runs = vec![run(report::CHORUS, &runner.progress, || {
        runner.fanout(shape)
    })];
    runs.extend(peer(
        runner,
        peers,
        report::REDIS,
        peers::redis::available(),
        |d| peers::redis::fanout(shape, d),
    ));
    runs.extend(peer(
        runner,
        peers,
        report::NATS,
        peers::nats::available(),
        |d| peers::nats::fanout(shape, d),
    ));
    Scenario {
        shape: shape.clone(),
        runs,
    }
}

fn connections(
    runner: &ChorusRunner,
    shape: &ConnectionsShape,
    transport: TransportArg,
    peers: bool,
) -> Scenario<ConnectionsShape, chorus_bench::load::ConnectionsOutcome> {
    let mut runs: Vec<_> = (transport.transports().iter())
        .map(|&t| {
            run(chorus_system(t), &runner.progress, || {
                runner.connections(shape, t)
            })
        })
        .collect();
    runs.extend(peer(
        runner,
        peers,
        report::REDIS,
        peers::redis::available(),
        |d| peers::redis::connections(shape, d),
    ));
    Scenario {
        shape: shape.clone(),
        runs,
    }
}

fn history(
    runner: &ChorusRunner,
    shape: &HistoryShape,
    peers: bool,
    seed: u64,
) -> Scenario<HistoryShape, chorus_bench::load::HistoryOutcome> {
    let mut runs = vec![run(report::CHORUS, &runner.progress, || {
        runner.history(shape, seed)
    })];
    runs.extend(peer(
        runner,
        peers,
        report::POSTGRES,
        peers::postgres::available(),
        |d| peers::postgres::history(shape, d),
    ));
    Scenario {
        shape: shape.clone(),
        runs,
    }
}

fn presence(
    runner: &ChorusRunner,
    shape: &PresenceShape,
    seed: u64,
) -> Scenario<PresenceShape, chorus_bench::load::presence::PresenceOutcome> {
    Scenario {
        shape: shape.clone(),
        runs: vec![run(report::CHORUS, &runner.progress, || {
            runner.presence(shape, seed)
        })],
    }
}

/// Writes `report.md` and the plots into a new folder of `results_dir`; returns it.
fn write_report(
    results_dir: &Path,
    name: &str,
    info: &RunInfo,
    results: &Results,
) -> anyhow::Result<PathBuf> {
    let stamp = info.date.trim_end_matches(" UTC").replace([' ', ':'], "-");
    let dir = results_dir.join(format!("{stamp}-{name}"));
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    std::fs::write(dir.join("report.md"), report::markdown(info, results))?;
    if let Some(s) = &results.chat {
        let mut series = Vec::new();
        for r in &s.runs {
            if let Ok(o) = &r.outcome {
                series.push((format!("{} delivery", r.system), &o.delivery));
                series.push((format!("{} ack", r.system), &o.ack));
            }
        }
        chart(
            &dir.join("chat.png"),
            "chat: intended send → ack and → each delivery",
            &series,
        );
    }
    if let Some(s) = &results.fanout {
        let mut series = Vec::new();
        for r in &s.runs {
            if let Ok(o) = &r.outcome {
                series.push((format!("{} last member", r.system), &o.last));
                series.push((format!("{} first member", r.system), &o.first));
            }
        }
        chart(
            &dir.join("fanout.png"),
            "fanout: send → first and last online member",
            &series,
        );
    }
    if let Some(s) = &results.history {
        let series: Vec<_> = s
            .runs
            .iter()
            .filter_map(|r| {
                r.outcome
                    .as_ref()
                    .ok()
                    .map(|o| (format!("{} page", r.system), &o.page))
            })
            .collect();
        chart(
            &dir.join("history.png"),
            "history: page read at a random cursor",
            &series,
        );
    }
    Ok(dir)
}

fn chart(path: &Path, title: &str, series: &[(String, &hdrhistogram::Histogram<u64>)]) {
    if series.is_empty() {
        return;
    }
    if let Err(e) = plot::percentile_chart(path, title, series) {
        eprintln!("warning: {}: {e:#}", path.display());
    }
}

fn commit() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(&root)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let head = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty =
        git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    if dirty {
        format!("{head} (with uncommitted changes)")
    } else {
        head
    }
}

/// The first three fields of `/proc/loadavg`.
/// `files`: runs alone and prints its table (no peers but vipsthumbnail, no plots).
fn files(runner: &ChorusRunner, a: &FilesArgs, load_before: &str) -> anyhow::Result<()> {
    let mut shape = if a.smoke {
        FilesShape::smoke()
    } else {
        FilesShape::standard()
    };
    shape.require_vips = a.require_vips || std::env::var_os("CHORUS_REQUIRE_PEERS").is_some();
    if let Some(n) = a.uploads {
        anyhow::ensure!(n > 0, "--uploads must be at least 1");
        shape.upload_files = n;
    }
    let header = || {
        println!(
            "files: {}; load average (1, 5, 15 min) {load_before} at the start, {} at the end\n",
            machine(),
            loadavg()
        );
    };
    if a.uploads_only {
        let uploads =
            files::run_uploads(&runner.binary, &runner.work_root, &shape, &runner.progress)?;
        runner.progress.finish_and_clear();
        header();
        print!("{}", uploads.table(&shape));
        println!(
            "\nuploads created: {}/{}",
            uploads.uploads_created, shape.upload_files
        );
        return Ok(());
    }
    let outcome = files::run(&runner.binary, &runner.work_root, &shape, &runner.progress)?;
    runner.progress.finish_and_clear();
    header();
    print!("{}", outcome.table(&shape));
    println!(
        "\nuploads created: {}/{}; thumbs ready: {}/{}",
        outcome.uploads.uploads_created,
        shape.upload_files,
        outcome.previews_ready,
        outcome.preview_sent
    );
    Ok(())
}

/// `cluster`: runs alone and prints its table (no peers, no plots).
fn cluster(runner: &ChorusRunner, a: &ClusterArgs, load_before: &str) -> anyhow::Result<()> {
    let shape = a.shape();
    let started = Instant::now();
    let outcome = chorus_bench::load::cluster::run(
        &runner.binary,
        &runner.work_root,
        &runner.settings,
        &shape,
        &runner.progress,
    )?;
    runner.progress.finish_and_clear();
    println!(
        "cluster: {}; {} shards and {} partitions per node, {}-byte messages; load average \
         (1, 5, 15 min) {load_before} at the start, {} at the end; {:.0} s\n",
        machine(),
        runner.settings.shards,
        runner.settings.partitions,
        shape.body_bytes,
        loadavg(),
        started.elapsed().as_secs_f64()
    );
    print!("{}", outcome.table(&shape));
    Ok(())
}

/// `notify`: runs alone and prints its table (no peers, no plots).
fn notify(runner: &ChorusRunner, a: &NotifyArgs, load_before: &str) -> anyhow::Result<()> {
    let shape = a.shape();
    let started = Instant::now();
    let outcome = notify::run(&runner.binary, &runner.work_root, &shape, &runner.progress)?;
    runner.progress.finish_and_clear();
    println!(
        "notify: {}; load average (1, 5, 15 min) {load_before} at the start, {} at the end\n",
        machine(),
        loadavg()
    );
    print!("{}", outcome.table(&shape));
    println!(
        "\nseeding through the engine (users, memberships, one push device each): {:.1} s for \
         {} recipients, {:.1} s for the {}-member channel; the whole run {:.0} s",
        outcome.seed_small.as_secs_f64(),
        shape.recipients,
        outcome.seed_big.as_secs_f64(),
        shape.fanout_members,
        started.elapsed().as_secs_f64()
    );
    println!(
        "the sender's slowest sends (ms after the `@channel` post it was due: send → ack ms): \
         with notifications {}; without {}",
        outcome.probes_notify.slowest_text(),
        outcome.probes_plain.slowest_text()
    );
    println!(
        "pushes: {}/{} for the mentions; {}/{} for `@channel`",
        outcome.pushes_received,
        outcome.pushes_expected,
        outcome.fanout_received,
        outcome.fanout_expected
    );
    println!(
        "sink errors in the server runs: {}; the server's notify metrics after the fan-out:\n{}",
        outcome.sink_errors, outcome.fanout_metrics
    );
    if let Some(log) = &outcome.kept_log {
        println!(
            "pushes were missing; the fan-out server's log: {}",
            log.display()
        );
    }
    Ok(())
}

/// Runs `search` on Chorus, then on PostgreSQL (unless `peers` is off or it is missing).
fn search_once(
    runner: &ChorusRunner,
    shape: &SearchShape,
    peers: bool,
) -> anyhow::Result<SearchOutcome> {
    let pg = peers && peers::postgres::available();
    search::run(
        &runner.binary,
        &runner.work_root,
        shape,
        &runner.progress,
        |job, dir| {
            anyhow::ensure!(
                pg,
                "{}",
                if peers {
                    "not installed; see bench/setup-peers.sh"
                } else {
                    "--no-peers"
                }
            );
            peers::postgres::search(job, dir)
        },
    )
}

/// `search`: runs alone and prints its table per run, then the medians of the key figures.
fn search(
    runner: &ChorusRunner,
    a: &SearchArgs,
    peers: bool,
    load_before: &str,
) -> anyhow::Result<()> {
    let shape = a.shape();
    let mut outcomes = Vec::new();
    for r in 0..a.runs.max(1) {
        runner
            .progress
            .set_message(format!("search: run {} of {}", r + 1, a.runs));
        let outcome = search_once(runner, &shape, peers)?;
        runner.progress.suspend(|| {
            println!("run {} of {}:\n\n{}", r + 1, a.runs, outcome.table(&shape));
        });
        outcomes.push(outcome);
    }
    runner.progress.finish_and_clear();
    println!(
        "search: {}; load average (1, 5, 15 min) {load_before} at the start, {} at the end\n",
        machine(),
        loadavg()
    );
    print!("{}", search::medians(&outcomes));
    Ok(())
}

fn loadavg() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1048576.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    format!(
        "{model}, {cores} cores, {mem_gib:.0} GiB, Linux {}, {} open files per process",
        kernel.trim(),
        limit.rlim_cur
    )
}
