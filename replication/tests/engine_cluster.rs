//! The engine on three nodes of two shards each, its channel partitions and directory
//! replicated through their Raft groups (`ClusterEnv`): only the partition's leader
//! decides, every replica's partition applies the same events and delivers them to its own
//! subscribers, a write to a node that does not lead is refused (never acknowledged), the
//! leader's stop hands writes to another node, and a node that comes back catches up.
//!
//! The directory (users, workspace, channel) is made once, through whichever node leads the
//! metadata partition's group, and every node learns it from there.

mod common;

use chorus_engine::blob::DiskBlobStore;
use chorus_engine::domain::{ChannelKind, DomainError};
use chorus_engine::env::GlommioEnv;
use chorus_engine::ids::{ChannelId, UserId};
use chorus_engine::{Engine, EngineConfig, EngineError, Subscription, Unavailable};
use chorus_log::DiskRoot;
use chorus_replication::engine_env::free_loopback_addrs;
use chorus_replication::node::COMPACT_EVERY;
use chorus_replication::transport::{Cuts, Membership};
use chorus_replication::{ClusterEnv, NodeConfig};
use common::wait_for;
use futures::executor::block_on;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

const PARTITIONS: u32 = 4;
/// Shards per node: shard `s` of a node listens on its cluster port plus `s`.
const SHARDS: usize = 2;
const WAIT: Duration = Duration::from_secs(20);

fn open(id: u64, dir: &Path, addrs: &[SocketAddr]) -> Engine {
    open_with_cuts(id, dir, addrs, Cuts::default())
}

fn open_with_cuts(id: u64, dir: &Path, addrs: &[SocketAddr], cuts: Cuts) -> Engine {
    open_compacting(id, dir, addrs, cuts, COMPACT_EVERY)
}

/// A node whose groups compact their Raft logs every `compact_every` entries applied.
fn open_compacting(
    id: u64,
    dir: &Path,
    addrs: &[SocketAddr],
    cuts: Cuts,
    compact_every: u64,
) -> Engine {
    let membership = Membership {
        me: id,
        nodes: addrs
            .iter()
            .enumerate()
            .map(|(i, a)| (i as u64 + 1, *a))
            .collect(),
        cluster: None,
    };
    let mut node = NodeConfig::new(membership, PARTITIONS);
    node.cuts = cuts;
    node.compact_every = compact_every;
    let mut config = EngineConfig::new(dir);
    config.shards = SHARDS;
    config.partitions = PARTITIONS;
    config.pin = false;
    let root = DiskRoot::new(dir);
    let blobs = DiskBlobStore::open(&dir.join("blobs")).expect("blob store");
    Engine::open_with(config, move |ctx| {
        let env = GlommioEnv::new(root.clone(), blobs.clone());
        ClusterEnv::new(env, &node, ctx.id as u32)
    })
    .expect("open engine")
}

/// The directory, made once through whichever node leads it: two users, a workspace, a
/// public channel. Every node then learns it from the directory's group.
fn directory(engines: &[Option<Engine>]) -> (UserId, UserId, ChannelId) {
    let (_, alice) = anywhere(engines, "alice", |e| {
        block_on(e.create_user("a@example.com", "A", "hash"))
    });
    let (_, bob) = anywhere(engines, "bob", |e| {
        block_on(e.create_user("b@example.com", "B", "hash"))
    });
    let (_, ws) = anywhere(engines, "the workspace", |e| {
        block_on(e.create_workspace(alice.id, "acme"))
    });
    anywhere(engines, "bob's membership", |e| {
        block_on(e.add_member(alice.id, ws.id, &bob.email))
    });
    let (_, c) = anywhere(engines, "the channel", |e| {
        block_on(e.create_channel(alice.id, ws.id, "general", ChannelKind::Public))
    });
    (alice.id, bob.id, c.id)
}

fn dirs() -> Vec<tempfile::TempDir> {
    (0..3).map(|_| tempfile::tempdir().unwrap()).collect()
}

/// Three nodes, each with its fault switch, and a directory.
fn start(
    dirs: &[tempfile::TempDir],
    addrs: &[SocketAddr],
    cuts: &[Cuts],
) -> (Vec<Option<Engine>>, (UserId, UserId, ChannelId)) {
    let engines: Vec<Option<Engine>> = (0..3)
        .map(|i| {
            Some(open_with_cuts(
                i as u64 + 1,
                dirs[i].path(),
                addrs,
                cuts[i].clone(),
            ))
        })
        .collect();
    let ids = directory(&engines);
    (engines, ids)
}

/// Refused because the node does not lead (the partition, or the directory), or because
/// its directory has not learnt the channel yet (it lags the node that made it).
fn not_leader(e: &EngineError) -> bool {
    matches!(
        e,
        EngineError::Unavailable(Unavailable::NotLeader { .. } | Unavailable::MetaNotLeader { .. })
    )
}

fn retryable(e: &EngineError) -> bool {
    not_leader(e) || matches!(e, EngineError::Domain(DomainError::NotFound("channel")))
}

/// Runs a write on whichever node leads, trying the nodes in turn until one takes it;
/// returns that node's index and its answer.
fn anywhere<T>(
    engines: &[Option<Engine>],
    what: &str,
    write: impl Fn(&Engine) -> Result<T, EngineError>,
) -> (usize, T) {
    let deadline = Instant::now() + WAIT;
    loop {
        for (i, e) in engines.iter().enumerate() {
            let Some(e) = e else { continue };
            match write(e) {
                Ok(t) => return (i, t),
                Err(err) if retryable(&err) => {}
                Err(err) => panic!("{what} on node {}: {err}", i + 1),
            }
        }
        assert!(
            Instant::now() < deadline,
            "no node took {what} within {WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Posts through whichever node leads, with the same `client_msg_id` on every try.
fn post_anywhere(engines: &[Option<Engine>], user: UserId, c: ChannelId, text: &str) -> usize {
    anywhere(engines, text, |e| {
        block_on(e.post(user, c, text, Some(text), None))
    })
    .0
}

/// Every top-level message's (seq, text), oldest first; none while the node has not
/// applied the channel's first members, or cannot pass the read barrier now (it refuses
/// the read: a client would try again).
fn history(engine: &Engine, user: UserId, c: ChannelId) -> Vec<(u64, String)> {
    let page = match block_on(engine.history(user, c, None, 200)) {
        Ok(page) => page,
        Err(EngineError::Domain(chorus_engine::domain::DomainError::NotFound(_))) => {
            return Vec::new()
        }
        Err(e) if not_leader(&e) => return Vec::new(),
        Err(e) => panic!("history: {e}"),
    };
    let mut out: Vec<(u64, String)> = page.messages.into_iter().map(|m| (m.seq, m.text)).collect();
    out.reverse();
    out
}

/// The frames a subscription has now, as text.
fn drain(sub: &mut Subscription, out: &mut Vec<String>) {
    let mut frames = Vec::new();
    sub.try_recv_batch(&mut frames, 1_024).expect("not cut off");
    out.extend(
        frames
            .iter()
            .map(|f| String::from_utf8_lossy(f).into_owned()),
    );
}

#[test]
fn partitions_follow_their_leader_and_survive_its_stop() {
    let (dirs, addrs) = (dirs(), free_loopback_addrs(3, SHARDS as u16));
    let cuts: Vec<Cuts> = (0..3).map(|_| Cuts::default()).collect();
    let (mut engines, (alice, bob, c)) = start(&dirs, &addrs, &cuts);

    // Writes go to whichever node leads (the leadership may move to the partition's
    // preferred node meanwhile); a subscriber on node 1 gets each from its own node.
    anywhere(&engines, "bob's join", |e| block_on(e.join(bob, c)));
    let mut sub = block_on(engines[0].as_ref().unwrap().subscribe(bob)).expect("subscribe");
    let mut leader = 0;
    for n in 0..20 {
        leader = post_anywhere(&engines, alice, c, &format!("m{n:02}"));
    }
    let expected: Vec<String> = (0..20).map(|n| format!("m{n:02}")).collect();
    let texts = |h: Vec<(u64, String)>| h.into_iter().map(|(_, t)| t).collect::<Vec<_>>();
    // A read on any node sees every post acknowledged before it (the followers' read
    // barrier): no waiting.
    for (i, e) in engines.iter().enumerate() {
        let e = e.as_ref().unwrap();
        assert_eq!(
            texts(history(e, alice, c)),
            expected,
            "node {} right after the acknowledgements",
            i + 1
        );
    }
    let mut frames = Vec::new();
    wait_for("node 1's subscriber to get the posts", WAIT, || {
        drain(&mut sub, &mut frames);
        frames.len() >= 20
    });
    let at: Vec<Option<usize>> = expected
        .iter()
        .map(|t| {
            let tag = format!("\"text\":\"{t}\"");
            frames.iter().position(|f| f.contains(&tag))
        })
        .collect();
    assert!(at.iter().all(Option::is_some), "frames: {frames:?}");
    assert!(
        at.windows(2).all(|w| w[0] < w[1]),
        "out of order: {frames:?}"
    );

    // The same write sent to every node: the nodes that do not lead refuse it (nothing is
    // acknowledged there), and it is in the channel once.
    let mut refused = 0;
    for e in engines.iter().flatten() {
        match block_on(e.post(alice, c, "probe", Some("probe"), None)) {
            Ok(_) => {}
            Err(err) if not_leader(&err) => refused += 1,
            Err(err) => panic!("probe: {err}"),
        }
    }
    assert!(refused >= 2, "{refused} nodes refused the probe");
    post_anywhere(&engines, alice, c, "probe");
    let mut expected = expected;
    expected.push("probe".into());

    // The leader stops; another node takes the writes, and nothing acknowledged is lost.
    let before = history(engines[leader].as_ref().unwrap(), alice, c);
    let stopping = Instant::now();
    engines[leader].take().unwrap().shutdown();
    let stopped = stopping.elapsed();
    let next = post_anywhere(&engines, alice, c, "m20");
    let failover = stopping.elapsed();
    assert_ne!(next, leader);
    for n in 21..30 {
        post_anywhere(&engines, alice, c, &format!("m{n:02}"));
    }
    expected.extend((20..30).map(|n| format!("m{n:02}")));
    let mut histories = BTreeMap::new();
    for (i, e) in engines.iter().enumerate() {
        let Some(e) = e else { continue };
        wait_for(&format!("node {} to apply 31 posts", i + 1), WAIT, || {
            texts(history(e, alice, c)) == expected
        });
        histories.insert(i, history(e, alice, c));
    }
    let first = histories.values().next().unwrap().clone();
    assert!(
        histories.values().all(|h| *h == first),
        "the nodes' seqs differ"
    );
    assert_eq!(
        first[..before.len()],
        before[..],
        "what the old leader had changed"
    );

    // The directory takes writes without the stopped node too: a new channel, and a post
    // in it.
    let (_, ws) = anywhere(&engines, "a second workspace", |e| {
        block_on(e.create_workspace(alice, "later"))
    });
    let (_, later) = anywhere(&engines, "a channel made while a node is down", |e| {
        block_on(e.create_channel(alice, ws.id, "later", ChannelKind::Public))
    });
    post_anywhere(&engines, alice, later.id, "in the later channel");

    // The stopped node comes back with its data and catches up, the directory as well.
    engines[leader] = Some(open(leader as u64 + 1, dirs[leader].path(), &addrs));
    let back = engines[leader].as_ref().unwrap();
    let deadline = Instant::now() + WAIT;
    while history(back, alice, c) != first {
        assert!(
            Instant::now() < deadline,
            "the restarted node did not catch up: it has {:?}, the others {first:?}",
            history(back, alice, c)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let back = engines[leader].as_ref().unwrap();
    wait_for(
        "the restarted node to learn the later channel",
        WAIT,
        || {
            let h = history(back, alice, later.id);
            h.into_iter()
                .map(|(_, t)| t)
                .eq(["in the later channel".to_string()])
        },
    );
    eprintln!("clean stop of the leader: {stopped:?}; first write {failover:?} after it began");
    for e in engines.into_iter().flatten() {
        e.shutdown();
    }
}

// The leader is cut off from both other nodes while writes go to it and to the others. It
// acknowledges none of its own (it cannot reach a majority: they come back `NotLeader`
// once it steps down, its decided state dropped and rebuilt from its log), the other two
// elect a leader and take theirs, and once the cut heals the old leader's partition
// follows again: every node holds the same events at the same seqs, and none of the
// refused writes.
#[test]
fn an_isolated_leader_acknowledges_nothing_and_rebuilds() {
    let (dirs, addrs) = (dirs(), free_loopback_addrs(3, SHARDS as u16));
    let cuts: Vec<Cuts> = (0..3).map(|_| Cuts::default()).collect();
    let (engines, (alice, _, c)) = start(&dirs, &addrs, &cuts);
    let mut expected = Vec::new();
    for n in 0..5 {
        post_anywhere(&engines, alice, c, &format!("m{n:02}"));
        expected.push(format!("m{n:02}"));
    }
    // Past the move to the preferred leader, if there is one.
    std::thread::sleep(Duration::from_millis(1_500));
    let leader = post_anywhere(&engines, alice, c, "m05");
    expected.push("m05".into());

    for peer in (0..3).filter(|p| *p != leader) {
        cuts[leader].set(peer as u64 + 1, true);
    }
    let isolated = engines[leader].as_ref().unwrap();
    let mut refused = 0;
    for k in 0..5 {
        let text = format!("lost{k}");
        match block_on(isolated.post(alice, c, &text, Some(&text), None)) {
            Err(e) if not_leader(&e) => refused += 1,
            other => panic!("the isolated leader answered {text} with {other:?}"),
        }
    }
    let majority: Vec<Option<Engine>> = engines
        .iter()
        .enumerate()
        .map(|(i, e)| e.as_ref().filter(|_| i != leader).cloned())
        .collect();
    for n in 6..12 {
        let took = post_anywhere(&majority, alice, c, &format!("m{n:02}"));
        assert_ne!(took, leader);
        expected.push(format!("m{n:02}"));
    }
    // The cut-off node, no longer leading, cannot pass the read barrier: it refuses a read
    // rather than answer without the posts the others acknowledged.
    match block_on(isolated.history(alice, c, None, 200)) {
        Err(e) if not_leader(&e) => {}
        other => panic!("the cut-off node answered a read with {other:?}"),
    }
    for peer in 0..3 {
        cuts[leader].set(peer as u64 + 1, false);
    }
    let texts = |h: Vec<(u64, String)>| h.into_iter().map(|(_, t)| t).collect::<Vec<_>>();
    for (i, e) in engines.iter().enumerate() {
        let e = e.as_ref().unwrap();
        wait_for(
            &format!("node {} to hold the majority's posts", i + 1),
            WAIT,
            || texts(history(e, alice, c)) == expected,
        );
    }
    let first = history(engines[0].as_ref().unwrap(), alice, c);
    for e in engines.iter().flatten() {
        assert_eq!(history(e, alice, c), first, "the nodes' seqs differ");
    }
    // The old leader's partition serves again: a write through any node is taken, and
    // reaches it.
    post_anywhere(&engines, alice, c, "after");
    expected.push("after".into());
    let old = engines[leader].as_ref().unwrap();
    wait_for("the old leader to apply the next post", WAIT, || {
        texts(history(old, alice, c)) == expected
    });
    assert_eq!(refused, 5);
    for e in engines.into_iter().flatten() {
        e.shutdown();
    }
}

/// The names of a user's workspaces, as a node's directory has them.
fn workspaces(engine: &Engine, user: UserId) -> Vec<String> {
    let (_, list) = block_on(engine.me(user)).expect("me");
    let mut names: Vec<String> = list.into_iter().map(|w| w.name).collect();
    names.sort();
    names
}

// The same for the directory: its leader, cut off, acknowledges no directory write (its
// state, which applied the refused one, is rebuilt from its log), the other two take
// theirs, and after the cut heals every node's directory is alike, without the refused
// user.
#[test]
fn an_isolated_directory_leader_acknowledges_nothing_and_rebuilds() {
    let (dirs, addrs) = (dirs(), free_loopback_addrs(3, SHARDS as u16));
    let cuts: Vec<Cuts> = (0..3).map(|_| Cuts::default()).collect();
    let (engines, (alice, _, _)) = start(&dirs, &addrs, &cuts);
    // Past the move to the preferred leader, if there is one.
    std::thread::sleep(Duration::from_millis(1_500));
    let (leader, _) = anywhere(&engines, "a workspace", |e| {
        block_on(e.create_workspace(alice, "before"))
    });
    for peer in (0..3).filter(|p| *p != leader) {
        cuts[leader].set(peer as u64 + 1, true);
    }
    let isolated = engines[leader].as_ref().unwrap();
    let refused = block_on(isolated.create_user("refused@example.com", "R", "hash"));
    let refused = refused.unwrap_err();
    assert!(not_leader(&refused), "{refused}");
    let majority: Vec<Option<Engine>> = engines
        .iter()
        .enumerate()
        .map(|(i, e)| e.as_ref().filter(|_| i != leader).cloned())
        .collect();
    let (took, _) = anywhere(&majority, "a workspace of the majority", |e| {
        block_on(e.create_workspace(alice, "during"))
    });
    assert_ne!(took, leader);
    for peer in 0..3 {
        cuts[leader].set(peer as u64 + 1, false);
    }
    anywhere(&engines, "a workspace after the cut", |e| {
        block_on(e.create_workspace(alice, "after"))
    });
    let expected = ["acme", "after", "before", "during"]
        .map(String::from)
        .to_vec();
    for (i, e) in engines.iter().enumerate() {
        let e = e.as_ref().unwrap();
        wait_for(&format!("node {}'s directory", i + 1), WAIT, || {
            workspaces(e, alice) == expected
        });
        let user = block_on(e.user_by_email("refused@example.com")).expect("user_by_email");
        assert!(user.is_none(), "node {} has the refused user", i + 1);
    }
    for e in engines.into_iter().flatten() {
        e.shutdown();
    }
}

// A node stopped while its groups' leaders compacted their Raft logs well past where it
// stopped (every 8 entries) is caught up by snapshot when it comes back: it fetches the
// events it lacks from a peer, and then holds every message, at the same seqs as the
// others, and follows the writes after it.
#[test]
fn a_node_far_behind_catches_up_by_snapshot() {
    let (dirs, addrs) = (dirs(), free_loopback_addrs(3, SHARDS as u16));
    let open = |i: usize| open_compacting(i as u64 + 1, dirs[i].path(), &addrs, Cuts::default(), 8);
    let mut engines: Vec<Option<Engine>> = (0..3).map(|i| Some(open(i))).collect();
    let (alice, _, c) = directory(&engines);
    for n in 0..5 {
        post_anywhere(&engines, alice, c, &format!("before {n}"));
    }
    let down = 2;
    let node3 = engines[down].as_ref().unwrap();
    wait_for("node 3 to apply the first posts", WAIT, || {
        history(node3, alice, c).len() == 5
    });
    engines[down].take().unwrap().shutdown();

    // Many times the compaction interval, in the channel and in the directory.
    let (_, ws) = anywhere(&engines, "a workspace while node 3 is down", |e| {
        block_on(e.create_workspace(alice, "while down"))
    });
    let (_, later) = anywhere(&engines, "a channel while node 3 is down", |e| {
        block_on(e.create_channel(alice, ws.id, "later", ChannelKind::Public))
    });
    for n in 0..60 {
        post_anywhere(&engines, alice, c, &format!("while down {n}"));
    }
    post_anywhere(&engines, alice, later.id, "in the later channel");
    let first = history(engines[0].as_ref().unwrap(), alice, c);
    assert_eq!(first.len(), 65);

    engines[down] = Some(open(down));
    let back = engines[down].as_ref().unwrap();
    wait_for("node 3 to catch up with the channel", WAIT, || {
        history(back, alice, c) == first
    });
    wait_for("node 3 to catch up with the directory", WAIT, || {
        history(back, alice, later.id).len() == 1
    });
    post_anywhere(&engines, alice, c, "after");
    for (i, e) in engines.iter().enumerate() {
        let e = e.as_ref().unwrap();
        wait_for(
            &format!("node {} to apply the last post", i + 1),
            WAIT,
            || history(e, alice, c).len() == 66,
        );
    }
    let histories: Vec<_> = engines
        .iter()
        .flatten()
        .map(|e| history(e, alice, c))
        .collect();
    assert!(
        histories.windows(2).all(|w| w[0] == w[1]),
        "the nodes differ"
    );
    for e in engines.into_iter().flatten() {
        e.shutdown();
    }
}

// A node cut off from the directory's leader lags it; once the cut heals, the directory
// barrier brings its directory up to every event committed before the call, so a read
// right after it sees the workspace the others made meanwhile (without the barrier the
// read misses it: checked).
#[test]
fn the_directory_barrier_makes_a_lagging_directory_current() {
    let (dirs, addrs) = (dirs(), free_loopback_addrs(3, SHARDS as u16));
    let cuts: Vec<Cuts> = (0..3).map(|_| Cuts::default()).collect();
    let (engines, (alice, _, _)) = start(&dirs, &addrs, &cuts);
    // Past the move to the preferred leader, if there is one.
    std::thread::sleep(Duration::from_millis(1_500));
    let (leader, _) = anywhere(&engines, "a workspace", |e| {
        block_on(e.create_workspace(alice, "before"))
    });
    let lagging = (leader + 1) % 3;
    cuts[lagging].set(leader as u64 + 1, true);
    let (took, _) = anywhere(&engines, "a workspace while one node is cut off", |e| {
        block_on(e.create_workspace(alice, "while cut"))
    });
    assert_eq!(took, leader);
    cuts[lagging].set(leader as u64 + 1, false);
    let e = engines[lagging].as_ref().unwrap();
    let deadline = Instant::now() + WAIT;
    while let Err(err) = block_on(e.directory_barrier()) {
        assert!(not_leader(&err), "{err}");
        assert!(Instant::now() < deadline, "the barrier never passed");
    }
    assert!(
        workspaces(e, alice).contains(&"while cut".to_string()),
        "node {} after the barrier: {:?}",
        lagging + 1,
        workspaces(e, alice)
    );
    for e in engines.into_iter().flatten() {
        e.shutdown();
    }
}
