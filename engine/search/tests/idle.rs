//! An index with nothing to do sleeps: a partition with no events (its log holds nothing a
//! consumer reads) does not wake the indexer again and again.

mod support;

use chorus_engine::domain::event::ChannelKind;
use chorus_search::query::parse;
use chorus_search::search::{run, Scope, Sort};
use futures::executor::block_on;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{threads_named, Indexed, NoFiles};

/// How long the index may take to show what the test waits for (a guard, not a
/// measurement).
const WAIT: Duration = Duration::from_secs(30);

/// The times the indexer's thread went to sleep so far (voluntary context switches).
fn indexer_sleeps() -> u64 {
    let indexer = threads_named("search-indexer");
    assert_eq!(indexer.len(), 1, "the indexer's thread");
    let status = std::fs::read_to_string(indexer[0].join("status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("voluntary_ctxt_switches:"))
        .unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn an_idle_index_sleeps() {
    let dir = tempfile::tempdir().unwrap();
    let indexed = Indexed::start(dir.path(), 4, Arc::new(NoFiles));
    let (engine, search) = (&indexed.engine, &indexed.search);
    // One channel: its partition has events, the three others none.
    let alice = block_on(engine.create_user("a@example.com", "alice", "h")).unwrap();
    let ws = block_on(engine.create_workspace(alice.id, "acme")).unwrap();
    let general =
        block_on(engine.create_channel(alice.id, ws.id, "general", ChannelKind::Public)).unwrap();
    block_on(engine.post(alice.id, general.id, "wombat", None, None)).unwrap();
    let scope = Scope {
        user: alice.id,
        workspace: ws.id,
        channels: vec![(general.id, "general".into())],
    };
    let deadline = Instant::now() + WAIT;
    let query = parse("wombat").unwrap();
    while run(&search.live(), &query, &scope, Sort::Relevance, 0, 10)
        .unwrap()
        .total
        != 1
    {
        assert!(Instant::now() < deadline, "never found");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Found, then nothing happens for two seconds (twenty batch windows): the indexer
    // sleeps once, until the next commit (a few more for a last read or commit in flight).
    std::thread::sleep(Duration::from_millis(500));
    let before = indexer_sleeps();
    std::thread::sleep(Duration::from_secs(2));
    let woke = indexer_sleeps() - before;
    assert!(woke <= 3, "the idle indexer woke {woke} times in 2 s");
    indexed.stop();
}
