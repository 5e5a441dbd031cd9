//! `cluster`: the replicated commit path measured through the real server (issue 18's
//! benchmark, replicated mode), a single node against a cluster of `chorus` processes on
//! loopback in the same run.
//!
//! 1. **Two legs, one shape.** A single node (no `--cluster`, RF=1), then `nodes` nodes
//!    (`--node-id`, `--cluster`, one JWT secret; RF=3 with three nodes), each of the same
//!    shards and partitions. Through node 1: `channels` users, each signing up and making
//!    a workspace and a public channel of its own (so each connection below is sent its
//!    own channel's events and no other); `GET /api/v1/cluster` names the leader of each
//!    channel's partition, and one post per channel through its leader (retried while it
//!    answers 503) shows that every partition takes writes before anything is measured.
//! 2. **Commits.** One WebSocket per channel, to the node that leads the channel's
//!    partition (what a client that reads the cluster map does; a node that does not lead
//!    would forward each send to the one that does), sends `message:send` of
//!    `body_bytes` bytes of text, each with its own `client_msg_id`. An `ack` means the
//!    message is durable on a majority of its partition's replicas (API.md §15).
//!    - *Closed loop:* `depth` sends in flight per connection for `closed_secs`: acks per
//!      second, and the server CPU (every node's, user + system) per ack. A session
//!      answers its commands one at a time, in order (the rest wait in its socket), so
//!      the concurrency is the number of connections, and the default is many channels.
//!    - *Open loop:* `rate` sends per second in all, spread evenly over the connections
//!      on a fixed schedule for `open_secs` (each connection's schedule a share of its
//!      period after the last's: all sending at the same instants made bursts of one send
//!      per connection, which made the median ten times longer): intended send time →
//!      ack, p50 / p99 / max.
//!      A send still unanswered [`DRAIN`] after the window marks the rate as not
//!      sustained.
//!
//!    Before each loop the run waits for every node's search index to stand still, so
//!    that indexing the last window's messages is not measured in the next.
//!
//!    With `any_node`, connections go to the nodes in turn instead, as behind a load
//!    balancer: a node that does not lead a channel's partition passes each send on to
//!    the one that does (`API.md` §15), and the figures include that.
//! 3. **Failover** (the cluster leg only), `failovers` rounds: the node that leads the
//!    most of the channels' partitions is SIGKILLed, and at once one prober per such
//!    partition posts to a channel in it over REST through another node, again every
//!    10 ms (the same `client_msg_id`, as a client retries) while the answer is not 201.
//!    Figure: SIGKILL → the first 201 in each partition, and the round's slowest. The
//!    node is then restarted on its data and the next round waits until every partition
//!    has a leader again.

use super::client::{Conn, Dialer, Frame, Target, Ws};
use super::procstat;
use super::server::{ChorusServer, ServerSettings};
use crate::latency::{self, LatencySummary};
use anyhow::{bail, ensure, Context};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// How long a cluster may take to elect leaders and take its first writes.
const READY_GIVE_UP: Duration = Duration::from_secs(60);
/// How long one REST call may take before it is tried again.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// A failover prober's wait between a refused post and the next try.
const PROBE_EVERY: Duration = Duration::from_millis(10);
/// How long a failover may take before the run fails.
const FAILOVER_GIVE_UP: Duration = Duration::from_secs(30);
/// How long the sends of a measured window may take to be answered after it.
const DRAIN: Duration = Duration::from_secs(10);
/// A closed-loop connection's pause after an `error` answer before it sends again.
const ERROR_PAUSE: Duration = Duration::from_millis(10);
/// Users and channels made at once while setting up.
const SETUP_IN_FLIGHT: usize = 16;
/// How long a node's search index must stand still to count as caught up.
const QUIET: Duration = Duration::from_millis(500);
/// After a restarted node is back, time for its preferred leaderships to return to it.
const SETTLE: Duration = Duration::from_secs(3);

/// The sizes of a `cluster` run.
#[derive(Clone, Debug)]
pub struct ClusterShape {
    /// Nodes of the cluster leg (the replication factor is three, or this if fewer).
    pub nodes: usize,
    /// Channels, each with one writing connection.
    pub channels: usize,
    /// Bytes of text per message.
    pub body_bytes: usize,
    /// Sends in flight per connection in the closed loop.
    pub depth: usize,
    /// Seconds of the closed loop.
    pub closed_secs: f64,
    /// Messages per second in all, one open loop each.
    pub rates: Vec<f64>,
    /// Seconds of each open loop.
    pub open_secs: f64,
    /// Leaders SIGKILLed in turn.
    pub failovers: usize,
    /// Connections go to the nodes in turn, whoever leads (a load balancer's spread), not
    /// to each partition's leader: a node that does not lead passes each send on.
    pub any_node: bool,
}

impl ClusterShape {
    /// The size the figures are taken at.
    pub fn standard() -> ClusterShape {
        ClusterShape {
            nodes: 3,
            channels: 256,
            body_bytes: 256,
            depth: 2,
            closed_secs: 8.0,
            rates: vec![1_000.0, 2_000.0, 4_000.0],
            open_secs: 8.0,
            failovers: 3,
            any_node: false,
        }
    }

    /// A tiny run, for the smoke test.
    pub fn smoke() -> ClusterShape {
        ClusterShape {
            nodes: 3,
            channels: 4,
            body_bytes: 256,
            depth: 2,
            closed_secs: 1.0,
            rates: vec![100.0],
            open_secs: 1.0,
            failovers: 1,
            any_node: false,
        }
    }
}

/// What one leg (one node, or the cluster) measured.
#[derive(Clone, Debug)]
pub struct Leg {
    /// Acks per second in the closed loop.
    pub closed_per_s: f64,
    /// Server CPU (every node's) per ack in the closed loop, µs.
    pub server_us_per_ack: f64,
    /// The generator's own CPU per ack in the closed loop, µs.
    pub generator_us_per_ack: f64,
    /// Closed-loop sends answered with an `error`, by code.
    pub closed_errors: BTreeMap<String, u64>,
    /// Each open loop: its rate and what it measured.
    pub open: Vec<(f64, OpenLoop)>,
}

/// What one open loop measured.
#[derive(Clone, Debug)]
pub struct OpenLoop {
    /// Intended send time → ack.
    pub ack: LatencySummary,
    /// Messages sent.
    pub sent: u64,
    /// Acks received.
    pub acked: u64,
    /// Sends answered with an `error`, by code.
    pub errors: BTreeMap<String, u64>,
}

/// One failover round.
#[derive(Clone, Debug)]
pub struct Failover {
    /// The node SIGKILLed.
    pub node: u64,
    /// SIGKILL → first 201, per partition it led, in milliseconds.
    pub first_write_ms: Vec<f64>,
}

impl Failover {
    /// The round's slowest partition, in milliseconds.
    pub fn slowest_ms(&self) -> f64 {
        self.first_write_ms.iter().copied().fold(0.0, f64::max)
    }
}

/// What a `cluster` run measured.
#[derive(Clone, Debug)]
pub struct ClusterOutcome {
    /// A single node (RF=1).
    pub single: Leg,
    /// The cluster.
    pub cluster: Leg,
    /// The replication factor of the cluster leg.
    pub replication_factor: usize,
    /// The failover rounds.
    pub failovers: Vec<Failover>,
}

impl ClusterOutcome {
    /// The report: one row per figure, the single node and the cluster side by side.
    pub fn table(&self, shape: &ClusterShape) -> String {
        let rf = self.replication_factor;
        let via = if shape.any_node {
            "each connection to the nodes in turn, whoever leads"
        } else {
            "each connection to its partition's leader"
        };
        let mut out = format!(
            "{via}\n\n| figure | RF=1 (one node) | RF={rf} ({} nodes) | RF={rf} / RF=1 |\n|---|---|---|---|\n",
            shape.nodes
        );
        let (s, c) = (&self.single, &self.cluster);
        out.push_str(&format!(
            "| closed loop, {} channels × {} in flight: acks/s | {:.0} | {:.0} | {:.2} |\n",
            shape.channels,
            shape.depth,
            s.closed_per_s,
            c.closed_per_s,
            c.closed_per_s / s.closed_per_s.max(f64::MIN_POSITIVE)
        ));
        out.push_str(&format!(
            "| server CPU per ack (all nodes), µs | {:.1} | {:.1} | {:.2} |\n",
            s.server_us_per_ack,
            c.server_us_per_ack,
            c.server_us_per_ack / s.server_us_per_ack.max(f64::MIN_POSITIVE)
        ));
        out.push_str(&format!(
            "| generator CPU per ack, µs | {:.1} | {:.1} | |\n",
            s.generator_us_per_ack, c.generator_us_per_ack
        ));
        for ((rate, so), (_, co)) in s.open.iter().zip(&c.open) {
            let cell = |o: &OpenLoop| {
                let unanswered = o.sent - o.acked - o.errors.values().sum::<u64>();
                let over = if unanswered > 0 {
                    format!(
                        "; **not sustained**: {unanswered} unanswered {} s after the window",
                        DRAIN.as_secs()
                    )
                } else {
                    String::new()
                };
                format!(
                    "p50 {:.2} / p99 {:.2} / max {:.1} ms; {}/{} acked{}{over}",
                    o.ack.p50_us as f64 / 1e3,
                    o.ack.p99_us as f64 / 1e3,
                    o.ack.max_us as f64 / 1e3,
                    o.acked,
                    o.sent,
                    errors_note(&o.errors)
                )
            };
            out.push_str(&format!(
                "| {rate:.0} msgs/s open loop: send → ack | {} | {} | p99 {:.2} |\n",
                cell(so),
                cell(co),
                co.ack.p99_us as f64 / so.ack.p99_us.max(1) as f64
            ));
        }
        if !self.failovers.is_empty() {
            let rounds: Vec<String> = self
                .failovers
                .iter()
                .map(|f| {
                    format!(
                        "node {}: {} partitions, slowest {:.0} ms",
                        f.node,
                        f.first_write_ms.len(),
                        f.slowest_ms()
                    )
                })
                .collect();
            let slowest: Vec<f64> = self.failovers.iter().map(Failover::slowest_ms).collect();
            out.push_str(&format!(
                "| leader SIGKILL → first write in each of its partitions | | median of rounds' slowest {:.0} ms ({}) | |\n",
                latency::median(&slowest),
                rounds.join("; ")
            ));
        }
        out
    }
}

/// `"; 3 errors (unavailable 3)"`, or nothing when there were none.
fn errors_note(errors: &BTreeMap<String, u64>) -> String {
    let total: u64 = errors.values().sum();
    if total == 0 {
        return String::new();
    }
    let each: Vec<String> = errors.iter().map(|(k, n)| format!("{k} {n}")).collect();
    format!("; {total} errors ({})", each.join(", "))
}

/// Runs both legs and the failover rounds.
pub fn run(
    binary: &Path,
    work_root: &Path,
    base: &ServerSettings,
    shape: &ClusterShape,
    progress: &ProgressBar,
) -> anyhow::Result<ClusterOutcome> {
    ensure!(shape.nodes >= 1, "--nodes must be at least 1");
    ensure!(shape.channels >= 1, "--channels must be at least 1");
    ensure!(shape.depth >= 1, "--depth must be at least 1");
    std::fs::create_dir_all(work_root)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;

    progress.set_message("cluster: one node");
    let single = {
        let dir = tempfile::Builder::new()
            .prefix("chorus-bench-cluster-1-")
            .tempdir_in(work_root)?;
        let mut nodes = Nodes::start(binary, dir.path(), base, 1)?;
        let leg = rt.block_on(measure(&mut nodes, shape, progress, "one node"));
        nodes.stop_all();
        leg.context("one node")?
    };

    progress.set_message(format!("cluster: {} nodes", shape.nodes));
    let dir = tempfile::Builder::new()
        .prefix("chorus-bench-cluster-n-")
        .tempdir_in(work_root)?;
    let mut nodes = Nodes::start(binary, dir.path(), base, shape.nodes)?;
    let result = rt.block_on(async {
        let cluster = measure(&mut nodes, shape, progress, "cluster").await?;
        let mut failovers = Vec::new();
        if shape.nodes >= 3 {
            for round in 0..shape.failovers {
                progress.set_message(format!(
                    "cluster: failover {} of {}",
                    round + 1,
                    shape.failovers
                ));
                failovers.push(failover(&mut nodes).await?);
            }
        }
        anyhow::Ok((cluster, failovers))
    });
    nodes.stop_all();
    let (cluster, failovers) = match result {
        Ok(r) => r,
        Err(e) => {
            // The nodes' logs and data, for whoever looks into the failure.
            let kept = dir.keep();
            return Err(e.context(format!(
                "{} nodes (their directories are kept in {})",
                shape.nodes,
                kept.display()
            )));
        }
    };
    Ok(ClusterOutcome {
        single,
        cluster,
        replication_factor: shape.nodes.min(3),
        failovers,
    })
}

/// The nodes of one leg, each in a directory of its own, and what the bench knows of the
/// workspace it made there.
struct Nodes {
    binary: PathBuf,
    /// Node `i + 1`'s directory and settings, and the server while it runs.
    nodes: Vec<(PathBuf, ServerSettings, Option<ChorusServer>)>,
    http: Http,
    /// The channels, once made: id, partition, and the token of its one member.
    channels: Vec<(String, u64, String)>,
}

impl Nodes {
    /// Starts `n` nodes in `dir` (one node with no `--cluster` when `n` is 1), node 1 first
    /// (it writes the JWT secret the others read).
    fn start(binary: &Path, dir: &Path, base: &ServerSettings, n: usize) -> anyhow::Result<Nodes> {
        let mut nodes = Vec::new();
        let cluster_addrs = chorus_replication::engine_env::free_loopback_addrs(
            n,
            u16::try_from(base.shards).context("shards")?,
        );
        let cluster: Vec<String> = cluster_addrs
            .iter()
            .enumerate()
            .map(|(i, a)| format!("{}={a}", i + 1))
            .collect();
        for i in 1..=n {
            let work = dir.join(format!("n{i}"));
            std::fs::create_dir_all(&work)?;
            let mut settings = base.clone();
            // The bench signs up a user per channel, all from one address.
            settings.extra_toml =
                "signup_per_ip_burst = 1000000.0\nsignup_per_ip_per_hour = 1000000.0\n".into();
            if n > 1 {
                settings.extra_toml += &format!(
                    "node_id = {i}\ncluster = \"{}\"\njwt_secret_file = \"{}\"\n",
                    cluster.join(","),
                    dir.join("jwt.key").display()
                );
            }
            let server = ChorusServer::start(binary, &work, &settings)
                .with_context(|| format!("start node {i}"))?;
            nodes.push((work, settings, Some(server)));
        }
        Ok(Nodes {
            binary: binary.to_owned(),
            nodes,
            http: Http::new()?,
            channels: Vec::new(),
        })
    }

    /// Node `id`'s HTTP address, if it runs.
    fn addr(&self, id: u64) -> Option<SocketAddr> {
        let (_, _, server) = self.nodes.get(usize::try_from(id).ok()?.checked_sub(1)?)?;
        server.as_ref().map(|s| s.addr)
    }

    /// The process IDs of the running nodes.
    fn pids(&self) -> Vec<u32> {
        self.nodes
            .iter()
            .filter_map(|(_, _, s)| s.as_ref().map(ChorusServer::pid))
            .collect()
    }

    /// The running nodes' CPU seconds, summed.
    fn cpu_secs(&self) -> f64 {
        self.pids().into_iter().filter_map(procstat::cpu_secs).sum()
    }

    /// The ids of the running nodes.
    fn running(&self) -> Vec<u64> {
        (1..=self.nodes.len() as u64)
            .filter(|id| self.addr(*id).is_some())
            .collect()
    }

    fn stop_all(&mut self) {
        for (_, _, server) in &mut self.nodes {
            if let Some(s) = server.take() {
                let _ = s.stop();
            }
        }
    }

    /// The leader of every partition, by partition, as node `via` sees the cluster; a
    /// partition with no leader known is left out.
    async fn leaders(&self, via: u64) -> anyhow::Result<HashMap<u64, u64>> {
        let addr = self.addr(via).context("that node is down")?;
        let token = &self.channels.first().context("no channels")?.2;
        let (status, body) = self
            .http
            .call("GET", addr, "/api/v1/cluster", token, None)
            .await?;
        ensure!(
            status == 200,
            "GET /api/v1/cluster answered {status}: {body}"
        );
        let parts = body["partitions"]
            .as_array()
            .context("no partitions in the cluster map")?;
        Ok(parts
            .iter()
            .filter_map(|p| Some((p["id"].as_u64()?, p["leader"].as_u64()?)))
            .collect())
    }

    /// One channel of each partition that has any: partition → the channel's index.
    fn one_per_partition(&self) -> BTreeMap<u64, usize> {
        let mut out = BTreeMap::new();
        for (i, (_, partition, _)) in self.channels.iter().enumerate() {
            out.entry(*partition).or_insert(i);
        }
        out
    }

    /// Waits until every running node's search index has taken every event (its count of
    /// indexed events the same twice, [`QUIET`] apart), so that one window's backlog is not
    /// indexed during the next and measured there.
    async fn quiesce(&self) -> anyhow::Result<()> {
        let started = Instant::now();
        let mut last = Vec::new();
        loop {
            let mut now = Vec::new();
            for id in self.running() {
                let addr = self.addr(id).context("that node is down")?;
                let (_, text) = self.http.text(addr, "/metrics").await?;
                let indexed = text
                    .lines()
                    .find_map(|l| l.strip_prefix("chorus_search_indexed_events_total "))
                    .and_then(|v| v.trim().parse::<u64>().ok());
                now.push(indexed);
            }
            if now == last {
                return Ok(());
            }
            ensure!(
                started.elapsed() < READY_GIVE_UP,
                "the search indexes were still busy {READY_GIVE_UP:?} after the window"
            );
            last = now;
            tokio::time::sleep(QUIET).await;
        }
    }

    /// Posts `text` to channel `i` through node `via` with `client_msg_id` `cmid`; the
    /// answer's status.
    async fn post(&self, via: u64, i: usize, text: &str, cmid: &str) -> anyhow::Result<u16> {
        let addr = self.addr(via).context("that node is down")?;
        let (channel, _, token) = &self.channels[i];
        let path = format!("/api/v1/channels/{channel}/messages");
        let body = json!({"text": text, "client_msg_id": cmid});
        Ok(self
            .http
            .call("POST", addr, &path, token, Some(body))
            .await?
            .0)
    }
}

/// A REST client with a short timeout per call.
struct Http {
    client: reqwest::Client,
}

impl Http {
    fn new() -> anyhow::Result<Http> {
        Ok(Http {
            client: reqwest::Client::builder()
                .timeout(CALL_TIMEOUT)
                .pool_max_idle_per_host(64)
                .build()?,
        })
    }

    /// One call; its status and JSON body (`null` when it has none).
    async fn call(
        &self,
        method: &str,
        addr: SocketAddr,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let url = format!("http://{addr}{path}");
        let mut req = match method {
            "GET" => self.client.get(url),
            "POST" => self.client.post(url),
            other => bail!("no {other} calls here"),
        };
        if !token.is_empty() {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        if let Some(body) = body {
            req = req
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await?;
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    }

    /// A GET's status and text.
    async fn text(&self, addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
        let resp = self
            .client
            .get(format!("http://{addr}{path}"))
            .send()
            .await?;
        Ok((resp.status().as_u16(), resp.text().await?))
    }

    /// `call`, tried again while it fails or answers 503, until `give_up`; the first other
    /// answer.
    async fn call_until_up(
        &self,
        addr: SocketAddr,
        method: &str,
        path: &str,
        token: &str,
        body: Value,
    ) -> anyhow::Result<(u16, Value)> {
        let started = Instant::now();
        loop {
            match self
                .call(method, addr, path, token, Some(body.clone()))
                .await
            {
                Ok((503, _)) | Err(_) if started.elapsed() < READY_GIVE_UP => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => return other,
            }
        }
    }
}

/// Makes the bench's users, each with a workspace and a channel of its own (through
/// node 1), waits until every channel takes a post through its leader, then measures the
/// closed and open loops. Each user is the one member of one channel, so that each
/// connection is sent its own channel's events and no other.
async fn measure(
    nodes: &mut Nodes,
    shape: &ClusterShape,
    progress: &ProgressBar,
    what: &str,
) -> anyhow::Result<Leg> {
    let first = nodes.addr(1).context("node 1 is down")?;
    progress.set_message(format!(
        "cluster: {what}, {} users and channels",
        shape.channels
    ));
    let http = &nodes.http;
    let made: Vec<anyhow::Result<(String, u64, String)>> =
        futures_util::stream::iter(0..shape.channels)
            .map(|i| user_with_channel(http, first, i))
            .buffered(SETUP_IN_FLIGHT)
            .collect()
            .await;
    for m in made {
        nodes.channels.push(m?);
    }
    let leaders = wait_for_leaders(nodes).await?;
    let mut conns = Vec::new();
    let running = nodes.running();
    for (i, (channel, partition, token)) in nodes.channels.iter().enumerate() {
        let node = if shape.any_node {
            running[i % running.len()]
        } else {
            leaders[partition]
        };
        let addr = nodes.addr(node).context("a leader is down")?;
        let dialer = Dialer::new(&Target::WebSocket(addr), IpAddr::V4(Ipv4Addr::LOCALHOST))?;
        let Conn::WebSocket(ws) = dialer.connect(token).await? else {
            bail!("a WebSocket dialer opened another kind of session");
        };
        conns.push((ws, channel.clone()));
    }
    let body = "x".repeat(shape.body_bytes);

    nodes.quiesce().await?;
    progress.set_message(format!("cluster: {what}, closed loop"));
    let cpu_before = nodes.cpu_secs();
    let gen_before = procstat::cpu_secs(std::process::id()).unwrap_or(0.0);
    let started = Instant::now();
    let end = started + Duration::from_secs_f64(shape.closed_secs);
    let closed = drive_all(&mut conns, Pace::Closed(shape.depth), started, end, &body).await;
    let closed = with_leaders(nodes, &leaders, closed).await?;
    let secs = started.elapsed().as_secs_f64();
    let cpu = nodes.cpu_secs() - cpu_before;
    let gen = procstat::cpu_secs(std::process::id()).unwrap_or(0.0) - gen_before;
    let acked = closed.acked.max(1) as f64;

    let mut open = Vec::new();
    for &rate in &shape.rates {
        progress.set_message(format!("cluster: {what}, waiting for the search indexes"));
        nodes.quiesce().await?;
        progress.set_message(format!("cluster: {what}, {rate:.0} msgs/s"));
        let per_conn = rate / conns.len() as f64;
        let start = Instant::now() + Duration::from_millis(100);
        let end = start + Duration::from_secs_f64(shape.open_secs);
        let t = drive_all(&mut conns, Pace::Open(per_conn), start, end, &body).await;
        let t = with_leaders(nodes, &leaders, t).await?;
        open.push((
            rate,
            OpenLoop {
                ack: LatencySummary::of(&t.latency),
                sent: t.sent,
                acked: t.acked,
                errors: t.errors,
            },
        ));
    }
    for (ws, _) in conns {
        drop(ws);
    }
    Ok(Leg {
        closed_per_s: closed.acked as f64 / secs.max(f64::MIN_POSITIVE),
        server_us_per_ack: cpu * 1e6 / acked,
        generator_us_per_ack: gen * 1e6 / acked,
        closed_errors: closed.errors,
        open,
    })
}

/// Signs up user `i` through `first`, who makes a workspace and a public channel `c{i}`:
/// the channel's id and partition, and the user's token.
async fn user_with_channel(
    http: &Http,
    first: SocketAddr,
    i: usize,
) -> anyhow::Result<(String, u64, String)> {
    let signup = json!({"email": format!("bench{i}@cluster.local"),
        "password": "correct horse battery staple", "name": format!("Bench {i}")});
    let (status, body) = http
        .call_until_up(first, "POST", "/api/v1/auth/signup", "", signup)
        .await?;
    ensure!(status == 201, "sign-up {i} answered {status}: {body}");
    let token = body["token"].as_str().context("no token")?.to_owned();
    let workspace = json!({"name": format!("bench {i}")});
    let (status, body) = http
        .call_until_up(first, "POST", "/api/v1/workspaces", &token, workspace)
        .await?;
    ensure!(status == 201, "workspace {i} answered {status}: {body}");
    let wid = body["workspace"]["id"]
        .as_str()
        .context("no workspace id")?;
    let channel = json!({"name": format!("c{i}"), "kind": "public"});
    let path = format!("/api/v1/workspaces/{wid}/channels");
    let (status, body) = http
        .call_until_up(first, "POST", &path, &token, channel)
        .await?;
    ensure!(status == 201, "channel c{i} answered {status}: {body}");
    let id = body["channel"]["id"].as_str().context("no channel id")?;
    let partition = body["channel"]["partition"]
        .as_u64()
        .context("no partition")?;
    Ok((id.to_owned(), partition, token))
}

/// `result`, or its error with the partitions' leaders at the start and now (as each
/// running node sees them): what a stuck or refused send is to be read against.
async fn with_leaders<T>(
    nodes: &Nodes,
    at_start: &HashMap<u64, u64>,
    result: anyhow::Result<T>,
) -> anyhow::Result<T> {
    let Err(e) = result else { return result };
    let mut now = Vec::new();
    for id in nodes.running() {
        let mut map: Vec<(u64, u64)> = match nodes.leaders(id).await {
            Ok(m) => m.into_iter().collect(),
            Err(e) => {
                now.push(format!("node {id}: {e}"));
                continue;
            }
        };
        map.sort_unstable();
        now.push(format!("node {id}: {map:?}"));
    }
    let channels: Vec<String> = nodes
        .channels
        .iter()
        .map(|(c, p, _)| format!("{c} in {p}"))
        .collect();
    let mut start: Vec<_> = at_start.iter().collect();
    start.sort_unstable();
    Err(e.context(format!(
        "channels: {}; leaders (partition, node) at the start: {start:?}; now: {}",
        channels.join(", "),
        now.join("; ")
    )))
}

/// Waits until every channel's partition has a leader that takes a post through it (one
/// channel's post per partition); the leaders then.
async fn wait_for_leaders(nodes: &Nodes) -> anyhow::Result<HashMap<u64, u64>> {
    let started = Instant::now();
    'again: loop {
        ensure!(
            started.elapsed() < READY_GIVE_UP,
            "the partitions had no leaders taking writes within {READY_GIVE_UP:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Some(&via) = nodes.running().first() else {
            bail!("no node runs");
        };
        let Ok(leaders) = nodes.leaders(via).await else {
            continue;
        };
        for (partition, i) in nodes.one_per_partition() {
            let Some(&leader) = leaders.get(&partition) else {
                continue 'again;
            };
            if nodes.addr(leader).is_none() {
                continue 'again;
            }
            let cmid = format!("ready-{}-{i}", crate::load::schedule::wall_ns());
            match nodes.post(leader, i, "ready", &cmid).await {
                Ok(201) => {}
                _ => continue 'again,
            }
        }
        return Ok(leaders);
    }
}

/// How a connection paces its sends.
#[derive(Clone, Copy)]
enum Pace {
    /// This many in flight at all times.
    Closed(usize),
    /// This many per second, on a fixed schedule.
    Open(f64),
}

/// What the connections of one window counted.
struct Tally {
    sent: u64,
    acked: u64,
    errors: BTreeMap<String, u64>,
    latency: Histogram<u64>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            sent: 0,
            acked: 0,
            errors: BTreeMap::new(),
            latency: latency::histogram_us(),
        }
    }

    fn add(&mut self, other: Tally) -> anyhow::Result<()> {
        self.sent += other.sent;
        self.acked += other.acked;
        for (k, n) in other.errors {
            *self.errors.entry(k).or_default() += n;
        }
        self.latency.add(other.latency)?;
        Ok(())
    }
}

/// Drives every connection from `start` until `end`, then waits for their last answers.
async fn drive_all(
    conns: &mut [(Box<Ws>, String)],
    pace: Pace,
    start: Instant,
    end: Instant,
    body: &str,
) -> anyhow::Result<Tally> {
    let window = crate::load::schedule::wall_ns();
    let n = conns.len();
    let runs = conns.iter_mut().enumerate().map(|(i, (ws, channel))| {
        let prefix = format!("{window}-{i}");
        // Each open-loop schedule starts its own share of a period later, so that the
        // connections' sends interleave evenly instead of all coming at once.
        let start = match pace {
            Pace::Open(per_s) => start + Duration::from_secs_f64(i as f64 / (n as f64 * per_s)),
            Pace::Closed(_) => start,
        };
        drive(ws, channel, pace, start, end, body, prefix)
    });
    let mut total = Tally::new();
    for t in futures_util::future::join_all(runs).await {
        total.add(t?)?;
    }
    Ok(total)
}

/// One connection's sends to `channel`: paced by `pace` from `start` until `end`; acks
/// awaited until [`DRAIN`] after it. Latency runs from the intended send time (open loop)
/// or the send (closed loop) to the ack.
async fn drive(
    ws: &mut Ws,
    channel: &str,
    pace: Pace,
    start: Instant,
    end: Instant,
    body: &str,
    prefix: String,
) -> anyhow::Result<Tally> {
    let mut t = Tally::new();
    let mut pending: HashMap<u64, Instant> = HashMap::new();
    let mut next: u64 = 0;
    let mut paused_until = start;
    tokio::time::sleep_until(start).await;
    let due = |k: u64| match pace {
        Pace::Open(per_s) => start + Duration::from_secs_f64(k as f64 / per_s),
        Pace::Closed(_) => start,
    };
    let drain_end = end + DRAIN;
    loop {
        let now = Instant::now();
        let sending = now < end;
        if !sending && pending.is_empty() {
            break;
        }
        if now >= drain_end {
            // More than the server could take: what is still unanswered counts as such.
            break;
        }
        // Send whatever is due now.
        let wake = match pace {
            Pace::Closed(depth) if sending && now >= paused_until => {
                while pending.len() < depth {
                    send(ws, channel, body, &prefix, next).await?;
                    pending.insert(next, Instant::now());
                    next += 1;
                    t.sent += 1;
                }
                drain_end
            }
            Pace::Closed(_) if sending => paused_until,
            Pace::Open(_) if sending => {
                while due(next) <= now && due(next) < end {
                    send(ws, channel, body, &prefix, next).await?;
                    pending.insert(next, due(next));
                    next += 1;
                    t.sent += 1;
                }
                due(next).min(end)
            }
            _ => drain_end,
        };
        let frame = tokio::select! {
            frame = ws.next() => frame,
            _ = tokio::time::sleep_until(wake) => continue,
        };
        let text = match frame {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(why))) => bail!("the server closed the connection: {why:?}"),
            None => bail!("the connection ended"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
        };
        let frame = Frame::parse(&text)?;
        let Some(k) = frame
            .reference
            .as_deref()
            .and_then(|r| r.parse::<u64>().ok())
        else {
            continue;
        };
        let Some(sent_at) = pending.remove(&k) else {
            continue;
        };
        match frame.kind.as_ref() {
            "ack" => {
                t.acked += 1;
                latency::record(&mut t.latency, sent_at.elapsed());
            }
            _ => {
                let code: Value = serde_json::from_str(&text)?;
                let code = code["code"].as_str().unwrap_or("?").to_owned();
                *t.errors.entry(code).or_default() += 1;
                paused_until = Instant::now() + ERROR_PAUSE;
            }
        }
    }
    Ok(t)
}

/// Sends message `k` of this connection.
async fn send(ws: &mut Ws, channel: &str, body: &str, prefix: &str, k: u64) -> anyhow::Result<()> {
    let frame = json!({
        "type": "message:send", "ref": k.to_string(), "channel_id": channel,
        "text": body, "client_msg_id": format!("{prefix}-{k}"),
    });
    ws.send(Message::text(frame.to_string())).await?;
    Ok(())
}

/// One failover round: once every partition has a leader that takes writes, SIGKILL the
/// node leading the most of the channels' partitions, probe each of those partitions
/// through another node until it takes a post, and restart the node.
async fn failover(nodes: &mut Nodes) -> anyhow::Result<Failover> {
    // Time for preferred leaders to move back to a node restarted by the last round.
    tokio::time::sleep(SETTLE).await;
    let leaders = wait_for_leaders(nodes).await?;
    let per_partition = nodes.one_per_partition();
    let mut led: BTreeMap<u64, usize> = BTreeMap::new();
    for p in per_partition.keys() {
        *led.entry(leaders[p]).or_default() += 1;
    }
    let (&victim, _) = led
        .iter()
        .max_by_key(|(id, n)| (**n, std::cmp::Reverse(**id)))
        .context("no leaders")?;
    let via = *nodes
        .running()
        .iter()
        .find(|id| **id != victim)
        .context("no other node runs")?;
    let targets: Vec<usize> = per_partition
        .iter()
        .filter(|(p, _)| leaders[*p] == victim)
        .map(|(_, i)| *i)
        .collect();

    let index = usize::try_from(victim)? - 1;
    let killed_at = Instant::now();
    nodes.nodes[index]
        .2
        .as_mut()
        .context("the victim is down")?
        .kill()?;
    nodes.nodes[index].2 = None;
    let nodes_ref = &*nodes;
    let probes = targets.iter().map(|&i| async move {
        let cmid = format!("failover-{}-{i}", crate::load::schedule::wall_ns());
        loop {
            ensure!(
                killed_at.elapsed() < FAILOVER_GIVE_UP,
                "no write in a partition of node {victim} within {FAILOVER_GIVE_UP:?} of its SIGKILL"
            );
            if let Ok(201) = nodes_ref.post(via, i, "failover probe", &cmid).await {
                return anyhow::Ok(killed_at.elapsed().as_secs_f64() * 1e3);
            }
            tokio::time::sleep(PROBE_EVERY).await;
        }
    });
    let first_write_ms = futures_util::future::try_join_all(probes).await?;

    let (work, settings, _) = &nodes.nodes[index];
    let server = ChorusServer::start(&nodes.binary, work, settings)
        .with_context(|| format!("restart node {victim}"))?;
    nodes.nodes[index].2 = Some(server);
    Ok(Failover {
        node: victim,
        first_write_ms,
    })
}
