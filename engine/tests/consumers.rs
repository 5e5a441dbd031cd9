//! Committed-event consumers against a real engine on a real directory: a consumer reads
//! every committed event of every log exactly once and in order, is woken by a commit
//! rather than polling, and the retention watermark keeps every segment a consumer still
//! needs, across a restart.

use chorus_engine::domain::event::{ChannelEvent, MetaEvent};
use chorus_engine::domain::ChannelKind;
use chorus_engine::ids::ChannelId;
use chorus_engine::{CommittedKind, Consumer, Engine, EngineConfig, EngineError, LogId};
use futures::executor::block_on;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

fn open(dir: &Path, consumers: &[&str], segment_bytes_max: u64) -> Engine {
    let mut config = EngineConfig::new(dir);
    config.shards = 2;
    config.partitions = 4;
    config.pin = false;
    config.segment_bytes_max = segment_bytes_max;
    config.consumers = consumers.iter().map(|c| c.to_string()).collect();
    Engine::open(config).expect("open engine")
}

// A consumer reads each channel message exactly once, in each channel's seq order, across
// all partitions, and the metadata log's events too.
#[test]
fn consumer_reads_every_committed_event_once() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), &["counter"], 64 * 1024 * 1024);
    let consumer = engine.consumer("counter").unwrap();
    assert!(
        engine.consumer("nobody").is_err(),
        "undeclared consumers are refused"
    );
    let ada = block_on(engine.create_user("ada@example.com", "Ada", "h")).unwrap();
    let ws = block_on(engine.create_workspace(ada.id, "acme")).unwrap();
    let mut channels = Vec::new();
    for i in 0..6 {
        let c =
            block_on(engine.create_channel(ada.id, ws.id, &format!("c{i}"), ChannelKind::Public));
        channels.push(c.unwrap().id);
    }
    for i in 0..120 {
        let c = channels[i % channels.len()];
        block_on(engine.post(ada.id, c, &format!("m{i}"), None, None)).unwrap();
    }
    let mut seen: BTreeMap<ChannelId, Vec<u64>> = BTreeMap::new();
    let mut posts = 0;
    let partitions: std::collections::BTreeSet<u32> = channels
        .iter()
        .map(|c| chorus_engine::domain::meta::partition_of(*c))
        .collect();
    assert_eq!(
        engine.logs().len(),
        5,
        "four partitions and the metadata log"
    );
    // Only logs that hold events are read here: a read of an empty log waits for its
    // first commit.
    for log in partitions.into_iter().map(LogId::Partition) {
        let (events, _) = drain_committed(&consumer, log);
        for e in events {
            if let CommittedKind::Channel(r) = e {
                seen.entry(r.channel).or_default().push(r.seq);
                if matches!(r.event, ChannelEvent::MessagePosted { .. }) {
                    posts += 1;
                }
            }
        }
    }
    assert_eq!(posts, 120);
    for (channel, seqs) in &seen {
        let want: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(
            seqs, &want,
            "channel {channel} read in seq order, once each"
        );
    }
    assert_eq!(seen.len(), channels.len());
    let (meta, _) = drain_committed(&consumer, LogId::Meta);
    let kinds: Vec<_> = meta
        .iter()
        .filter_map(|e| match e {
            CommittedKind::Meta(m) => Some(std::mem::discriminant(&m.event)),
            _ => None,
        })
        .collect();
    assert_eq!(
        kinds.len(),
        meta.len(),
        "the metadata log holds metadata events only"
    );
    assert!(meta.iter().any(
        |e| matches!(e, CommittedKind::Meta(m) if matches!(m.event, MetaEvent::UserCreated { .. }))
    ));
    engine.shutdown();
}

/// Reads a log from its start to its end as it stands now.
fn drain_committed(consumer: &Consumer, log: LogId) -> (Vec<CommittedKind>, u64) {
    let mut events = Vec::new();
    let mut from = 0;
    loop {
        let page = block_on(consumer.read(log, from)).expect("read");
        assert!(!page.events.is_empty(), "a read answers with events");
        assert!(page
            .events
            .windows(2)
            .all(|w| w[1].offset == w[0].offset + 1));
        from = page.next;
        events.extend(page.events.into_iter().map(|e| e.event));
        if from >= page.end {
            return (events, from);
        }
    }
}

// A read at the end of a log waits, and the next commit of that log answers it with the
// new event: consumers are woken by commits.
#[test]
fn a_waiting_read_is_woken_by_the_commit() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), &["waiter"], 64 * 1024 * 1024);
    let consumer = engine.consumer("waiter").unwrap();
    let ada = block_on(engine.create_user("ada@example.com", "Ada", "h")).unwrap();
    let ws = block_on(engine.create_workspace(ada.id, "acme")).unwrap();
    let c = block_on(engine.create_channel(ada.id, ws.id, "general", ChannelKind::Public))
        .unwrap()
        .id;
    let log = LogId::Partition(chorus_engine::domain::meta::partition_of(c));
    let (_, end) = drain_committed(&consumer, log);
    let waiting = std::thread::spawn({
        let consumer = consumer.clone();
        move || block_on(consumer.read(log, end))
    });
    // The read is parked (no event past `end` exists); the post wakes it.
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !waiting.is_finished(),
        "a read at the end answered without a commit"
    );
    block_on(engine.post(ada.id, c, "wake up", None, None)).unwrap();
    let page = waiting.join().unwrap().expect("read");
    assert_eq!(page.events.len(), 1);
    assert_eq!(page.events[0].offset, end);
    let CommittedKind::Channel(r) = &page.events[0].event else {
        panic!("{:?}", page.events[0])
    };
    assert!(matches!(r.event, ChannelEvent::MessagePosted { .. }));
    assert_eq!(page.next, end + 1);
    engine.shutdown();
}

// Retention never deletes a segment at or after the lowest acknowledged cursor of the
// declared consumers, nor after the last durable snapshot; what is kept is readable from
// the cursor after a restart.
#[test]
fn retention_keeps_what_consumers_still_need() {
    let dir = tempfile::tempdir().unwrap();
    // Small segments, so that a partition's log has many to delete.
    let segment = 4 * 1024;
    let engine = open(dir.path(), &["slow", "fast"], segment);
    let ada = block_on(engine.create_user("ada@example.com", "Ada", "h")).unwrap();
    let ws = block_on(engine.create_workspace(ada.id, "acme")).unwrap();
    let c = block_on(engine.create_channel(ada.id, ws.id, "general", ChannelKind::Public))
        .unwrap()
        .id;
    let p = chorus_engine::domain::meta::partition_of(c);
    let log = LogId::Partition(p);
    for i in 0..400 {
        let text = format!("message {i} {}", "x".repeat(100));
        block_on(engine.post(ada.id, c, &text, None, None)).unwrap();
    }
    // Before any consumer acknowledged, nothing may go.
    assert_eq!(engine.retention_watermark(log), 0);
    assert_eq!(block_on(engine.delete_log_before(p, u64::MAX)).unwrap(), 1);
    // Reopen, so that the shutdown snapshot makes the log's prefix deletable.
    engine.shutdown();
    drop(engine);
    let engine = open(dir.path(), &["slow", "fast"], segment);
    let (slow, fast) = (
        engine.consumer("slow").unwrap(),
        engine.consumer("fast").unwrap(),
    );
    slow.acknowledge(log, 150);
    fast.acknowledge(log, 390);
    assert_eq!(engine.retention_watermark(log), 150);
    let first = block_on(engine.delete_log_before(p, u64::MAX)).unwrap();
    assert!(first > 1, "whole segments before the watermark go");
    assert!(
        first <= 150,
        "the log now starts at {first}, past the slow consumer's cursor"
    );
    // The slow consumer reads on from its cursor; nothing it needs is gone.
    let page = block_on(slow.read(log, 150)).unwrap();
    assert_eq!(page.events[0].offset, 150);
    // A consumer whose cursor fell before the new start reads from the start.
    let page = block_on(slow.read(log, 0)).unwrap();
    assert_eq!(page.events[0].offset, first);
    // Cursors only move forward, so the watermark does too.
    slow.acknowledge(log, 10);
    assert_eq!(engine.retention_watermark(log), 150);
    let r: Result<u64, EngineError> = block_on(engine.delete_log_before(99, 1));
    assert!(r.is_err(), "no such partition");
    engine.shutdown();
}
