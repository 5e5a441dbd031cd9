//! Redis pub/sub as the peer for `chat`, `fanout` and `connections`: the seeds' fan-out
//! design, in which every recipient holds a subscriber connection to its channel and every
//! message is one `PUBLISH` to that channel.
//!
//! Redis is not durable here, nor meant to be: the server runs with no persistence
//! (`--save "" --appendonly no`), and the `PUBLISH` reply that serves as the ack only says
//! how many subscribers the message was queued to. A report must say so next to its
//! figures. Messages published while a member is offline are lost to that member.
//!
//! Shapes map as follows. `chat`: connection `i` subscribes to the channel `chat.{i /
//! members}`; senders are a small pool of publisher connections (Redis forbids `PUBLISH` on
//! a connection in subscriber mode), which stand for the application servers that would
//! publish on a user's behalf. `fanout`: only the `online` members exist in Redis (a
//! channel has no members, only subscribers), so `members` does not matter. `connections`:
//! every connection subscribes to one channel, in channels of
//! [`CONNECTIONS_CHANNEL_MEMBERS`], like the Chorus driver's users.

use super::{
    check_fd_budget, fd_limit, find_binary, free_port, fresh_dir, loopback, run_all, run_chat,
    runtime, ChatDeliveries, ChatPlan, FanoutRounds, FanoutTally, PeerProcess, Publish,
    CONNECT_PARALLEL, FANOUT_BODY_BYTES, FANOUT_ROUND_DEADLINE, RSS_SETTLE,
};
use crate::load::procstat::{rss_bytes, UsageWindow};
use crate::load::schedule::{chat_text, wall_ns};
use crate::load::{
    ChatOutcome, ChatShape, ConnectionsOutcome, ConnectionsShape, FanoutOutcome, FanoutShape,
};
use anyhow::{ensure, Context};
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use redis::aio::{MultiplexedConnection, PubSub};
use redis::AsyncConnectionConfig;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Publisher connections for `chat`; each pipelines its `PUBLISH`es.
const PUBLISHERS: usize = 4;
/// Members per channel in `connections`, as in the Chorus driver.
pub const CONNECTIONS_CHANNEL_MEMBERS: usize = 50;
/// File descriptors `redis-server` keeps for itself beyond its clients (Redis's own
/// `CONFIG_MIN_RESERVED_FDS`).
const SERVER_RESERVED_FDS: u64 = 32;
/// The one channel of `fanout`.
const FANOUT_CHANNEL: &str = "fanout";
/// How long one client may take to connect under a connection storm.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether `redis-server` is installed.
pub fn available() -> bool {
    binary().is_some()
}

fn binary() -> Option<PathBuf> {
    find_binary("redis-server", &[])
}

/// Runs `chat` against Redis pub/sub and returns what it measured. The ack is the
/// `PUBLISH` reply, which is not durable.
pub fn chat(shape: &ChatShape, work_dir: &Path) -> anyhow::Result<ChatOutcome> {
    let plan = ChatPlan::new(shape)?;
    check_fd_budget(shape.connections + PUBLISHERS + 1)?;
    let server = RedisServer::start(work_dir, "redis-chat")?;
    let outcome = runtime()?.block_on(async {
        let client = server.client()?;
        let deliveries = ChatDeliveries::new();
        let subscribe = (0..shape.connections).map(|c| {
            let (client, deliveries) = (client.clone(), deliveries.clone());
            let channel = channel_name(plan.channel_of(c));
            async move {
                let pubsub = subscriber(&client, &channel).await?;
                tokio::spawn(pubsub.into_on_message().for_each(move |msg| {
                    deliveries.on_payload(c, msg.get_payload_bytes());
                    std::future::ready(())
                }));
                anyhow::Ok(())
            }
        });
        run_all(subscribe).await?;
        let mut control = publisher(&client).await?;
        let expected: Vec<(String, usize)> = (0..plan.channels)
            .map(|c| (channel_name(c), plan.channel_size(c)))
            .collect();
        check_subscribers(&mut control, &expected).await?;
        let mut publishers = Vec::with_capacity(PUBLISHERS);
        for _ in 0..PUBLISHERS {
            publishers.push(publisher(&client).await?);
        }
        run_chat(&plan, &deliveries, publish_fn(publishers), server.pid()).await
    })?;
    server.stop()?;
    Ok(outcome)
}

/// Runs `fanout` against Redis pub/sub: `online` subscribers of one channel, one
/// `PUBLISH` at a time.
pub fn fanout(shape: &FanoutShape, work_dir: &Path) -> anyhow::Result<FanoutOutcome> {
    ensure!(shape.online > 0, "fanout needs at least one online member");
    check_fd_budget(shape.online + 1)?;
    let server = RedisServer::start(work_dir, "redis-fanout")?;
    let outcome = runtime()?.block_on(async {
        let client = server.client()?;
        let rounds = FanoutRounds::new(shape.online);
        let subscribe = (0..shape.online).map(|_| {
            let (client, rounds) = (client.clone(), rounds.clone());
            async move {
                let pubsub = subscriber(&client, FANOUT_CHANNEL).await?;
                tokio::spawn(pubsub.into_on_message().for_each(move |msg| {
                    rounds.on_payload(msg.get_payload_bytes());
                    std::future::ready(())
                }));
                anyhow::Ok(())
            }
        });
        run_all(subscribe).await?;
        let mut publisher = publisher(&client).await?;
        check_subscribers(&mut publisher, &[(FANOUT_CHANNEL.to_owned(), shape.online)]).await?;
        let mut tally = FanoutTally::new();
        let usage = UsageWindow::start(server.pid());
        for round in 0..shape.rounds {
            rounds.open(round as u64);
            let sent_ns = wall_ns();
            let text = chat_text(sent_ns, round, FANOUT_BODY_BYTES);
            let receivers: usize = redis::cmd("PUBLISH")
                .arg(FANOUT_CHANNEL)
                .arg(text.as_bytes())
                .query_async(&mut publisher)
                .await
                .context("PUBLISH")?;
            ensure!(
                receivers == shape.online,
                "round {round} reached {receivers} subscribers of {}",
                shape.online
            );
            tally.add(&rounds.finish(sent_ns, FANOUT_ROUND_DEADLINE).await);
        }
        anyhow::Ok(tally.outcome(usage.finish()))
    })?;
    server.stop()?;
    Ok(outcome)
}

/// Runs `connections` against Redis: `connections` idle subscriber connections, each
/// subscribed to one channel; RSS is read after [`RSS_SETTLE`] of idleness before and
/// after.
pub fn connections(
    shape: &ConnectionsShape,
    work_dir: &Path,
) -> anyhow::Result<ConnectionsOutcome> {
    check_fd_budget(shape.connections + 1)?;
    let server = RedisServer::start(work_dir, "redis-connections")?;
    let outcome = runtime()?.block_on(async {
        let client = server.client()?;
        let mut control = publisher(&client).await?;
        tokio::time::sleep(RSS_SETTLE).await;
        let rss_before = rss_bytes(server.pid()).context("redis-server RSS")?;
        let started = Instant::now();
        let subscribe = (0..shape.connections).map(|c| {
            let client = client.clone();
            async move { subscriber(&client, &channel_name(c / CONNECTIONS_CHANNEL_MEMBERS)).await }
        });
        let held: Vec<PubSub> = futures::stream::iter(subscribe)
            .buffer_unordered(CONNECT_PARALLEL)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<anyhow::Result<_>>()?;
        let connect_secs = started.elapsed().as_secs_f64();
        tokio::time::sleep(RSS_SETTLE).await;
        let rss_after = rss_bytes(server.pid()).context("redis-server RSS")?;
        // Count what the server holds, not what the client believes it opened.
        let open = connected_clients(&mut control).await? - 1;
        drop(held);
        anyhow::Ok(ConnectionsOutcome {
            open,
            connect_rate: open as f64 / connect_secs.max(1e-9),
            connect_secs,
            live: None,
            rss_before,
            rss_after,
        })
    })?;
    server.stop()?;
    Ok(outcome)
}

/// The pub/sub channel of chat channel `index`.
fn channel_name(index: usize) -> String {
    format!("chat.{index}")
}

/// Opens a subscriber connection and subscribes it to `channel`; the subscription is
/// confirmed by the server when this returns.
async fn subscriber(client: &redis::Client, channel: &str) -> anyhow::Result<PubSub> {
    let connect = async {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(channel).await?;
        redis::RedisResult::Ok(pubsub)
    };
    tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .context("subscriber connect timed out")?
        .context("subscriber connect")
}

/// Opens a connection for commands, which pipelines concurrent requests and never times
/// them out itself (a late reply is a measured latency, not an error).
async fn publisher(client: &redis::Client) -> anyhow::Result<MultiplexedConnection> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(None);
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .context("publisher connect")
}

/// Checks with `PUBSUB NUMSUB` that each `(channel, subscribers)` pair holds, so that a
/// run never starts with subscriptions missing.
async fn check_subscribers(
    control: &mut MultiplexedConnection,
    expected: &[(String, usize)],
) -> anyhow::Result<()> {
    for chunk in expected.chunks(1_000) {
        let mut command = redis::cmd("PUBSUB");
        command.arg("NUMSUB");
        for (name, _) in chunk {
            command.arg(name);
        }
        let counts: Vec<(String, usize)> = command
            .query_async(control)
            .await
            .context("PUBSUB NUMSUB")?;
        ensure!(
            counts.len() == chunk.len(),
            "PUBSUB NUMSUB answered {counts:?}"
        );
        for ((name, want), (_, got)) in chunk.iter().zip(&counts) {
            ensure!(
                got == want,
                "channel {name} has {got} subscribers, not {want}"
            );
        }
    }
    Ok(())
}

/// `connected_clients` from `INFO clients`.
async fn connected_clients(control: &mut MultiplexedConnection) -> anyhow::Result<usize> {
    let info: String = redis::cmd("INFO")
        .arg("clients")
        .query_async(control)
        .await
        .context("INFO clients")?;
    info.lines()
        .find_map(|l| l.strip_prefix("connected_clients:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no connected_clients in INFO")
}

/// The `chat` publish function: `PUBLISH` on the publisher connections in turn.
fn publish_fn(publishers: Vec<MultiplexedConnection>) -> Publish {
    let next = AtomicUsize::new(0);
    Arc::new(move |channel: usize, payload: Bytes| {
        let index = next.fetch_add(1, Ordering::Relaxed) % publishers.len();
        let mut connection = publishers[index].clone();
        async move {
            let _receivers: i64 = redis::cmd("PUBLISH")
                .arg(channel_name(channel))
                .arg(&payload[..])
                .query_async(&mut connection)
                .await
                .context("PUBLISH")?;
            Ok(())
        }
        .boxed()
    })
}

/// A `redis-server` of our own: loopback only, no persistence, as many clients as its file
/// limit allows.
struct RedisServer {
    process: PeerProcess,
    port: u16,
}

impl RedisServer {
    fn start(work_dir: &Path, stem: &str) -> anyhow::Result<RedisServer> {
        let binary = binary().context("redis-server is not installed (bench/setup-peers.sh)")?;
        let dir = fresh_dir(work_dir, stem)?;
        let port = free_port()?;
        // The server inherits our file limit; asking for more clients than it allows only
        // makes Redis lower the number itself, with a warning.
        let max_clients = fd_limit().saturating_sub(SERVER_RESERVED_FDS).max(1);
        let mut command = Command::new(binary);
        command
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--maxclients", &max_clients.to_string()])
            .args(["--daemonize", "no", "--logfile", ""])
            .arg("--dir")
            .arg(&dir);
        let mut process = PeerProcess::spawn(
            "redis-server",
            command,
            dir.join("redis.log"),
            libc::SIGTERM,
        )?;
        process.wait_listening(loopback(port))?;
        Ok(RedisServer { process, port })
    }

    fn client(&self) -> anyhow::Result<redis::Client> {
        redis::Client::open(format!("redis://127.0.0.1:{}/", self.port)).context("redis URL")
    }

    fn pid(&self) -> u32 {
        self.process.pid()
    }

    fn stop(self) -> anyhow::Result<()> {
        self.process.stop()
    }
}
