//! Real-process crash test of the engine: a child process opens the engine on a real
//! directory and posts from several threads, printing every acknowledged post; the parent
//! SIGKILLs it at a random moment, round after round, then opens the engine itself and checks
//! that every acknowledged post is there with its seq and text, that each channel's seqs run
//! from 1 without a gap, and that no post was stored twice, although each new child first
//! retries the post its predecessor may have had in flight.
//!
//! The child is this same test binary, started with `CHORUS_ENGINE_CRASH_DIR` set and asked
//! to run only `child_poster`. `CHORUS_ENGINE_KILLS` sets the number of kills (default 5);
//! `CHORUS_ENGINE_KILL_SEED` fixes the random choices (the kill timing itself is real time).

use chorus_engine::domain::ChannelKind;
use chorus_engine::ids::{ChannelId, UserId};
use chorus_engine::view::MessageView;
use chorus_engine::{Engine, EngineConfig, EngineError, Subscription};
use chorus_log::storage::sim::SimRng;
use futures::executor::block_on;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

const CHILD_DIR: &str = "CHORUS_ENGINE_CRASH_DIR";
/// The first post number of each child thread, comma-separated.
const CHILD_NEXT: &str = "CHORUS_ENGINE_CRASH_NEXT";
/// Posting threads in the child, one user each.
const POSTERS: usize = 4;
/// The channels every poster is in; thread `t` sends its `n`th post to `(t + n) % 2`.
const CHANNEL_NAMES: [&str; 2] = ["alpha", "beta"];
const KILLS_DEFAULT: u64 = 10;
/// A round's child is killed after 1 to this many acknowledgements.
const ACKS_BEFORE_KILL_MAX: u64 = 1500;
/// How long the parent waits for the child's next acknowledgement (a guard, not a timing).
const ACK_WAIT: Duration = Duration::from_secs(20);
/// How long the final check waits for a replayed frame (a guard, not a timing).
const FRAME_WAIT: Duration = Duration::from_secs(20);

fn open(dir: &Path) -> Engine {
    let mut config = EngineConfig::new(dir);
    config.shards = 2;
    config.partitions = 8;
    config.pin = false;
    // Snapshots every few dozen events, so that a kill finds snapshots being written and
    // recovery starts from one and replays the log after it.
    config.snapshot_every_events = SNAPSHOT_EVERY_EVENTS;
    Engine::open(config).expect("open engine")
}

/// Events between a partition's snapshots in this test.
const SNAPSHOT_EVERY_EVENTS: u64 = 64;

fn email(thread: usize) -> String {
    format!("poster{thread}@example.com")
}

fn key(thread: usize, n: u64) -> String {
    format!("t{thread}-n{n}")
}

fn parse_key(key: &str) -> (usize, u64) {
    let (t, n) = key
        .strip_prefix('t')
        .and_then(|k| k.split_once("-n"))
        .unwrap_or_else(|| panic!("not a key of this test: {key:?}"));
    (t.parse().unwrap(), n.parse().unwrap())
}

/// The text of a post, a function of its thread and number, 20 to 420 bytes long.
fn text(thread: usize, n: u64) -> String {
    format!(
        "post {n} of thread {thread} {}",
        ".".repeat((n % 401) as usize)
    )
}

/// Finds the users and channels an earlier run made, and makes whatever is missing, so that
/// every child (and a child killed during setup) ends with the same world.
async fn setup(engine: &Engine) -> Result<(Vec<UserId>, Vec<ChannelId>), EngineError> {
    let mut users = Vec::new();
    for t in 0..POSTERS {
        let id = match engine.user_by_email(&email(t)).await? {
            Some(u) => u.id,
            None => {
                engine
                    .create_user(&email(t), &format!("Poster {t}"), "hash")
                    .await?
                    .id
            }
        };
        users.push(id);
    }
    let owner = users[0];
    let ws = match engine.me(owner).await?.1.first() {
        Some(w) => w.id,
        None => engine.create_workspace(owner, "crash").await?.id,
    };
    let members = engine.members(owner, ws).await?;
    for (t, u) in users.iter().enumerate().skip(1) {
        if !members.iter().any(|m| m.id == *u) {
            engine.add_member(owner, ws, &email(t)).await?;
        }
    }
    let existing = engine.user_channels(owner).await?;
    let mut channels = Vec::new();
    for name in CHANNEL_NAMES {
        let id = match existing.iter().find(|c| c.name == name) {
            Some(c) => c.id,
            None => {
                engine
                    .create_channel(owner, ws, name, ChannelKind::Public)
                    .await?
                    .id
            }
        };
        for u in &users[1..] {
            engine.join(*u, id).await?;
        }
        channels.push(id);
    }
    Ok((users, channels))
}

// Not a test of its own: the body of the child process that the parent test kills.
#[test]
#[ignore = "run only as the child of sigkill_never_loses_or_duplicates_acknowledged_posts"]
fn child_poster() {
    let Ok(dir) = std::env::var(CHILD_DIR) else {
        return;
    };
    let next: Vec<u64> = std::env::var(CHILD_NEXT)
        .expect("first post numbers")
        .split(',')
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(next.len(), POSTERS);
    let engine = open(Path::new(&dir));
    let (users, channels) = block_on(setup(&engine)).expect("setup");
    let threads: Vec<_> = (0..POSTERS)
        .map(|t| {
            let (engine, user, channels, first) =
                (engine.clone(), users[t], channels.clone(), next[t]);
            std::thread::spawn(move || {
                for n in first.. {
                    let channel = channels[(t + n as usize) % channels.len()];
                    let (key, text) = (key(t, n), text(t, n));
                    let (m, _) = block_on(engine.post(user, channel, &text, Some(&key), None))
                        .expect("post");
                    assert_eq!((m.text.as_str(), m.user_id), (text.as_str(), user));
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "ack {channel} {} {} {key}", m.seq, m.id).unwrap();
                    out.flush().unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("poster");
    }
}

/// One acknowledged post, as the child printed it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Ack {
    channel: String,
    seq: u64,
    id: String,
    key: String,
}

fn parse_ack(line: &str) -> Option<Ack> {
    let rest = line.strip_prefix("ack ")?;
    let parts: Vec<&str> = rest.split(' ').collect();
    assert_eq!(parts.len(), 4, "malformed ack line {line:?}");
    Some(Ack {
        channel: parts[0].to_owned(),
        seq: parts[1].parse().expect("seq"),
        id: parts[2].to_owned(),
        key: parts[3].to_owned(),
    })
}

/// Records an acknowledgement. A post acknowledged twice must be the same message.
fn record(acked: &mut BTreeMap<String, Ack>, a: Ack) {
    if let Some(before) = acked.get(&a.key) {
        assert_eq!(
            *before, a,
            "a post was acknowledged as two different messages"
        );
    }
    acked.insert(a.key.clone(), a);
}

/// Runs one child until it has acknowledged `kill_after` posts, then SIGKILLs it.
fn run_child(dir: &Path, next: &[u64], kill_after: u64, acked: &mut BTreeMap<String, Ack>) {
    let next_arg: Vec<String> = next.iter().map(u64::to_string).collect();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_poster", "--ignored", "--nocapture", "-q"])
        .env(CHILD_DIR, dir)
        .env(CHILD_NEXT, next_arg.join(","))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // The test harness prints its own lines; the child prints only acks.
            if let Some(a) = parse_ack(&line) {
                if tx.send(a).is_err() {
                    break;
                }
            }
        }
    });
    let mut seen = 0;
    while seen < kill_after {
        match rx.recv_timeout(ACK_WAIT) {
            Ok(a) => {
                record(acked, a);
                seen += 1;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                panic!("the child acknowledged nothing for {ACK_WAIT:?}");
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                panic!("the child exited by itself: {:?}", child.wait());
            }
        }
    }
    child.kill().expect("SIGKILL");
    child.wait().unwrap();
    reader.join().unwrap();
    for a in rx.try_iter() {
        record(acked, a);
    }
}

/// Wakes a parked std thread: lets a plain thread wait for a frame with a deadline.
struct Unpark(std::thread::Thread);

impl futures::task::ArcWake for Unpark {
    fn wake_by_ref(arc_self: &Arc<Self>) {
        arc_self.0.unpark();
    }
}

/// The next frame, parsed; fails after `FRAME_WAIT` or on a cutoff.
fn next_frame(sub: &mut Subscription) -> Value {
    let deadline = Instant::now() + FRAME_WAIT;
    let waker = futures::task::waker(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    loop {
        match sub.receiver().poll_recv(&mut cx) {
            Poll::Ready(Ok(frame)) => return serde_json::from_slice(&frame).expect("JSON"),
            Poll::Ready(Err(cut)) => panic!("subscriber cut off: {cut}"),
            Poll::Pending => {
                let now = Instant::now();
                assert!(now < deadline, "no frame within {FRAME_WAIT:?}");
                std::thread::park_timeout(deadline - now);
            }
        }
    }
}

/// Every event of the channels from seq 1, read back from the logs through a resume, by
/// channel and seq; checks the `resumed` frame against `last`.
fn replay(
    engine: &Engine,
    user: UserId,
    last: &BTreeMap<ChannelId, u64>,
) -> BTreeMap<ChannelId, Vec<Value>> {
    let mut sub = block_on(engine.subscribe(user)).unwrap();
    block_on(sub.resume(last.keys().map(|c| (*c, 0)).collect())).unwrap();
    let mut events: BTreeMap<ChannelId, Vec<Value>> = BTreeMap::new();
    loop {
        let v = next_frame(&mut sub);
        if v["type"] == "resumed" {
            let resumed: BTreeMap<ChannelId, u64> = v["channels"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(c, s)| (c.parse().unwrap(), s.as_u64().unwrap()))
                .collect();
            assert_eq!(&resumed, last, "the resumed frame's last seqs");
            return events;
        }
        assert_eq!(v["type"], "event", "unexpected frame {v}");
        let c: ChannelId = v["channel_id"].as_str().unwrap().parse().unwrap();
        events.entry(c).or_default().push(v);
    }
}

/// Every top-level message of a channel, oldest first, read page by page with cursors.
fn full_history(engine: &Engine, user: UserId, channel: ChannelId) -> Vec<MessageView> {
    let mut out = Vec::new();
    let mut before = None;
    loop {
        let page = block_on(engine.history(user, channel, before, 200)).expect("history");
        out.extend(page.messages);
        match page.next_cursor {
            Some(c) => before = Some(c),
            None => break,
        }
    }
    out.reverse();
    out
}

/// Opens what the children left and checks it against every acknowledgement. `next` holds,
/// per thread, the number after its last acknowledged post: that post may or may not have
/// become durable before the last kill, but nothing after it can exist.
fn verify(dir: &Path, acked: &BTreeMap<String, Ack>, next: &[u64]) {
    let engine = open(dir);
    let recovery = engine.recovery();
    assert!(
        recovery.iter().any(|r| r.snapshot_offset.is_some()),
        "no partition recovered from a snapshot: {recovery:?}"
    );
    let users: Vec<UserId> = (0..POSTERS)
        .map(|t| {
            block_on(engine.user_by_email(&email(t)))
                .unwrap()
                .expect("poster exists")
                .id
        })
        .collect();
    let owner = users[0];
    let listed = block_on(engine.user_channels(owner)).unwrap();
    let channels: Vec<ChannelId> = CHANNEL_NAMES
        .iter()
        .map(|name| listed.iter().find(|c| c.name == *name).expect("channel").id)
        .collect();
    let last: BTreeMap<ChannelId, u64> = listed
        .iter()
        .filter(|c| channels.contains(&c.id))
        .map(|c| (c.id, c.last_seq))
        .collect();
    let events = replay(&engine, owner, &last);

    let mut stored: BTreeMap<String, MessageView> = BTreeMap::new();
    for (i, c) in channels.iter().enumerate() {
        let history = full_history(&engine, owner, *c);
        let events = &events[c];
        // One event per seq from 1 to the last: the members joining, then the posts.
        let seqs: Vec<u64> = events.iter().map(|v| v["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, (1..=last[c]).collect::<Vec<_>>(), "channel {c}: seqs");
        let joined = events
            .iter()
            .filter(|v| v["event"]["type"] == "member:joined")
            .count();
        assert_eq!(joined, POSTERS, "channel {c}: every poster joined once");
        let posted: Vec<&Value> = events
            .iter()
            .filter(|v| v["event"]["type"] == "message:new")
            .collect();
        assert_eq!(
            posted.len() + joined,
            events.len(),
            "channel {c}: other events"
        );
        assert_eq!(posted.len(), history.len(), "channel {c}: history vs log");
        for (v, m) in posted.iter().zip(&history) {
            assert_eq!(v["event"]["message"], serde_json::to_value(m).unwrap());
            let key = m.client_msg_id.clone().expect("every post has a key");
            let (t, n) = parse_key(&key);
            assert_eq!(m.text, text(t, n), "{key}: text");
            assert_eq!(m.user_id, users[t], "{key}: author");
            assert_eq!((t + n as usize) % channels.len(), i, "{key}: channel");
            let twice = stored.insert(key.clone(), m.clone());
            assert!(twice.is_none(), "{key} stored twice");
        }
    }
    for (key, a) in acked {
        let m = stored
            .get(key)
            .unwrap_or_else(|| panic!("acknowledged {key} ({a:?}) was lost"));
        assert_eq!(
            (m.channel_id.to_string(), m.seq, m.id.to_string()),
            (a.channel.clone(), a.seq, a.id.clone()),
            "{key}: stored elsewhere than acknowledged"
        );
    }
    // Each thread's posts are exactly its numbers from 0, up to its last acknowledged one
    // or the one after it (in flight at the last kill).
    for (t, next_n) in next.iter().enumerate() {
        let ns: Vec<u64> = stored
            .keys()
            .map(|k| parse_key(k))
            .filter(|(kt, _)| *kt == t)
            .map(|(_, n)| n)
            .collect::<BTreeSet<u64>>()
            .into_iter()
            .collect();
        let count = ns.len() as u64;
        assert_eq!(
            ns,
            (0..count).collect::<Vec<_>>(),
            "thread {t}: posts missing"
        );
        assert!(
            count == *next_n || count == next_n + 1,
            "thread {t}: {count} posts stored, {next_n} acknowledged"
        );
    }
    // The engine continues each channel right after its last seq.
    for c in &channels {
        let (m, _) = block_on(engine.post(owner, *c, "after the crashes", None, None)).unwrap();
        assert_eq!(m.seq, last[c] + 1, "channel {c}: seq after recovery");
    }
    engine.shutdown();
    println!(
        "{} acknowledged, {} stored, last seqs {last:?}",
        acked.len(),
        stored.len()
    );
}

// SIGKILL at random moments never loses an acknowledged post, never stores one twice (not
// even when a restarted client retries it), and leaves every channel gapless.
#[test]
fn sigkill_never_loses_or_duplicates_acknowledged_posts() {
    let kills: u64 = std::env::var("CHORUS_ENGINE_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(KILLS_DEFAULT);
    let seed: u64 = std::env::var("CHORUS_ENGINE_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!(
        "engine kill test seed {seed} (replay the choices with CHORUS_ENGINE_KILL_SEED={seed})"
    );
    let mut rng = SimRng::new(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut acked: BTreeMap<String, Ack> = BTreeMap::new();
    let mut next = vec![0u64; POSTERS];
    for round in 1..=kills {
        let kill_after = 1 + rng.below(ACKS_BEFORE_KILL_MAX);
        let started = Instant::now();
        run_child(dir.path(), &next, kill_after, &mut acked);
        // Each thread posts one message at a time, so only the post after its last
        // acknowledged one can have been in flight: the next child retries exactly that.
        for (key, _) in acked.iter() {
            let (t, n) = parse_key(key);
            next[t] = next[t].max(n + 1);
        }
        println!(
            "round {round}: killed after {kill_after} acks in {:?}; {} acknowledged in all",
            started.elapsed(),
            acked.len()
        );
    }
    verify(dir.path(), &acked, &next);
}
