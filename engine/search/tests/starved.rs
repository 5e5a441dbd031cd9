//! The indexer on a real engine while other threads keep every core busy: its threads run
//! only when idle, so it is starved, and it raises them until it keeps up again.

mod support;

use chorus_engine::domain::event::ChannelKind;
use chorus_search::query::parse;
use chorus_search::search::{run, Scope, Sort};
use futures::executor::block_on;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{threads_named, Indexed, NoFiles};

/// How long the index may take to show what the test waits for (a guard, not a
/// measurement).
const WAIT: Duration = Duration::from_secs(60);

#[test]
fn a_starved_index_raises_its_threads() {
    let dir = tempfile::tempdir().unwrap();
    let indexed = Indexed::start(dir.path(), 2, Arc::new(NoFiles));
    let (engine, search) = (&indexed.engine, &indexed.search);
    let alice = block_on(engine.create_user("a@example.com", "alice", "h")).unwrap();
    let ws = block_on(engine.create_workspace(alice.id, "acme")).unwrap();
    let general =
        block_on(engine.create_channel(alice.id, ws.id, "general", ChannelKind::Public)).unwrap();
    let scope = Scope {
        user: alice.id,
        workspace: ws.id,
        channels: vec![(general.id, "general".into())],
    };
    let found = |q: &str| {
        run(
            &search.live(),
            &parse(q).unwrap(),
            &scope,
            Sort::Relevance,
            0,
            10,
        )
        .unwrap()
        .total
    };
    let wait_found = |q: &str| {
        let deadline = Instant::now() + WAIT;
        while found(q) != 1 {
            assert!(Instant::now() < deadline, "{q} never found");
            std::thread::sleep(Duration::from_millis(10));
        }
    };

    // The scheduling policy of the index writer's segment updater, a thread that lives as
    // long as the writer (the 39th field of its `stat` after the name). (The indexing
    // worker is replaced at every commit; one started while raised stays so until the
    // next commit replaces it.)
    let policy = || -> Vec<i32> {
        (threads_named("segment_updater").iter())
            .map(|t| {
                let stat = std::fs::read_to_string(t.join("stat")).unwrap();
                let rest: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
                rest[38].parse().unwrap()
            })
            .collect()
    };
    const SCHED_IDLE: i32 = 5;
    const SCHED_OTHER: i32 = 0;

    // With cores to spare, the index keeps up idle-only.
    block_on(engine.post(alice.id, general.id, "wombat", None, None)).unwrap();
    wait_found("wombat");
    assert_eq!(search.status.starved.load(Relaxed), 0);
    assert_eq!(policy(), [SCHED_IDLE]);

    // Ordinary threads take every core (one more than there are): the next batch waits
    // for CPU for over a second, and the index raises its threads.
    let busy = Arc::new(AtomicBool::new(true));
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let spinners: Vec<_> = (0..=cores)
        .map(|_| {
            let busy = busy.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while busy.load(Relaxed) {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            })
        })
        .collect();
    block_on(engine.post(alice.id, general.id, "quokka", None, None)).unwrap();
    let deadline = Instant::now() + WAIT;
    while search.status.starved.load(Relaxed) == 0 {
        assert!(Instant::now() < deadline, "the index was never raised");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(policy(), [SCHED_OTHER]);
    wait_found("quokka");
    // Raised, it keeps up with the cores still busy.
    block_on(engine.post(alice.id, general.id, "numbat", None, None)).unwrap();
    wait_found("numbat");
    busy.store(false, Relaxed);
    for s in spinners {
        s.join().unwrap();
    }
    assert!(search.status.starved.load(Relaxed) >= 1);
    // With the cores free again and no more posts, the indexer goes back to idle-only
    // on its own once the raise has lasted.
    let deadline = Instant::now() + chorus_search::starved::RAISED_FOR + WAIT;
    while policy() != [SCHED_IDLE] {
        assert!(Instant::now() < deadline, "still raised: {:?}", policy());
        std::thread::sleep(Duration::from_millis(50));
    }
    indexed.stop();
}
