//! Restarts and resumes against a real engine on a real directory: what was acknowledged
//! before a clean shutdown is all there after reopening (idempotency keys, history, threads,
//! reactions, edits, DMs, memberships, seqs), and a subscriber that resumes from its last
//! seen seq gets exactly the events it missed, rendered byte for byte as they went out live.

use bytes::Bytes;
use chorus_engine::domain::meta::User;
use chorus_engine::domain::{ChannelKind, DomainError, INLINE_BODY_BYTES_MAX};
use chorus_engine::ids::{ChannelId, MessageId, UserId, WorkspaceId};
use chorus_engine::view::{ChannelView, MemberView, MessageView, UserView, WorkspaceView};
use chorus_engine::{Engine, EngineConfig, EngineError, Subscription};
use futures::executor::block_on;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// How long a subscriber waits for a frame before the test fails (a guard, not a timing).
const FRAME_WAIT: Duration = Duration::from_secs(20);
/// Messages posted into one channel so that its history spans several pages.
const PAGED_POSTS: usize = 250;
/// Messages a subscriber misses, more than two catch-up pages (256 events each).
const MISSED_POSTS: usize = 600;

fn open(dir: &Path) -> Engine {
    open_with(dir, EngineConfig::new(dir).snapshot_every_events)
}

fn open_with(dir: &Path, snapshot_every_events: u64) -> Engine {
    let mut config = EngineConfig::new(dir);
    config.shards = 2;
    config.partitions = 8;
    config.pin = false;
    config.snapshot_every_events = snapshot_every_events;
    Engine::open(config).expect("open engine")
}

fn user(engine: &Engine, name: &str) -> UserView {
    block_on(engine.create_user(&format!("{name}@example.com"), name, "hash")).unwrap()
}

/// Wakes a parked std thread: lets a plain thread wait for a frame with a deadline.
struct Unpark(std::thread::Thread);

impl futures::task::ArcWake for Unpark {
    fn wake_by_ref(arc_self: &Arc<Self>) {
        arc_self.0.unpark();
    }
}

/// The next frame, parsed; fails after `FRAME_WAIT` or on a cutoff.
fn next_frame(sub: &mut Subscription) -> (Value, Bytes) {
    let deadline = Instant::now() + FRAME_WAIT;
    let waker = futures::task::waker(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    loop {
        match sub.receiver().poll_recv(&mut cx) {
            Poll::Ready(Ok(frame)) => {
                let v: Value = serde_json::from_slice(&frame).expect("frame is JSON");
                // A poster's own `read` frames (its marker moved) are no channel events.
                if v["type"] != "read" {
                    return (v, frame);
                }
            }
            Poll::Ready(Err(cut)) => panic!("subscriber cut off: {cut}"),
            Poll::Pending => {
                let now = Instant::now();
                assert!(now < deadline, "no frame within {FRAME_WAIT:?}");
                std::thread::park_timeout(deadline - now);
            }
        }
    }
}

/// One event frame.
#[derive(Clone, Debug)]
struct Event {
    channel: ChannelId,
    seq: u64,
    kind: String,
    bytes: Bytes,
}

impl Event {
    fn of(v: &Value, bytes: Bytes) -> Event {
        assert_eq!(v["type"], "event", "expected an event frame, got {v}");
        Event {
            channel: v["channel_id"].as_str().unwrap().parse().unwrap(),
            seq: v["seq"].as_u64().unwrap(),
            kind: v["event"]["type"].as_str().unwrap().to_owned(),
            bytes,
        }
    }
}

/// Checks that an event continues its channel: exactly the next seq (a channel not yet in
/// `next` starts at 1).
fn advance(next: &mut BTreeMap<ChannelId, u64>, e: &Event) {
    let want = next.entry(e.channel).or_insert(1);
    assert_eq!(
        e.seq, *want,
        "channel {}: seq {} where {} was due (gap, repeat or reorder)",
        e.channel, e.seq, *want
    );
    *want += 1;
}

/// Reads event frames until every channel of `until` has reached its seq.
fn read_events(
    sub: &mut Subscription,
    next: &mut BTreeMap<ChannelId, u64>,
    until: &BTreeMap<ChannelId, u64>,
) -> Vec<Event> {
    let mut out = Vec::new();
    while until
        .iter()
        .any(|(c, last)| next.get(c).copied().unwrap_or(1) <= *last)
    {
        let (v, bytes) = next_frame(sub);
        let e = Event::of(&v, bytes);
        advance(next, &e);
        out.push(e);
    }
    out
}

/// Resumes and reads the answer: event frames up to the `resumed` frame, each channel
/// continuing from its `since`. Returns them and the `resumed` frame's last seqs.
fn resume(
    sub: &mut Subscription,
    since: &BTreeMap<ChannelId, u64>,
) -> (Vec<Event>, BTreeMap<ChannelId, u64>) {
    block_on(sub.resume(since.iter().map(|(c, s)| (*c, *s)).collect())).unwrap();
    let mut next: BTreeMap<ChannelId, u64> = since.iter().map(|(c, s)| (*c, s + 1)).collect();
    let mut out = Vec::new();
    loop {
        let (v, bytes) = next_frame(sub);
        if v["type"] == "resumed" {
            let resumed = v["channels"]
                .as_object()
                .expect("resumed channels")
                .iter()
                .map(|(c, s)| (c.parse().unwrap(), s.as_u64().unwrap()))
                .collect();
            return (out, resumed);
        }
        let e = Event::of(&v, bytes);
        assert!(
            since.contains_key(&e.channel),
            "frame of an unnamed channel: {v}"
        );
        advance(&mut next, &e);
        out.push(e);
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

/// Every reply of a thread, oldest first, read page by page with cursors.
fn all_replies(engine: &Engine, user: UserId, root: MessageId) -> Vec<MessageView> {
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let page = block_on(engine.replies(user, root, after, 2)).expect("replies");
        out.extend(page.messages);
        match page.next_cursor {
            Some(c) => after = Some(c),
            None => break,
        }
    }
    out
}

/// The last committed seq of each channel the user is in.
fn last_seqs(engine: &Engine, user: UserId) -> BTreeMap<ChannelId, u64> {
    block_on(engine.user_channels(user))
        .unwrap()
        .into_iter()
        .map(|c| (c.id, c.last_seq))
        .collect()
}

fn post(engine: &Engine, user: UserId, channel: ChannelId, text: &str) -> MessageView {
    block_on(engine.post(user, channel, text, None, None))
        .unwrap()
        .0
}

fn reply(engine: &Engine, user: UserId, root: MessageId, text: &str) -> MessageView {
    block_on(engine.post(user, root.channel, text, None, Some(root)))
        .unwrap()
        .0
}

// A post repeated with the same client_msg_id after a clean restart returns the first
// message and stores nothing.
#[test]
fn idempotent_post_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path());
    let alice = user(&engine, "alice");
    let bob = user(&engine, "bob");
    let ws = block_on(engine.create_workspace(alice.id, "acme")).unwrap();
    block_on(engine.add_member(alice.id, ws.id, &bob.email)).unwrap();
    let general =
        block_on(engine.create_channel(alice.id, ws.id, "general", ChannelKind::Public)).unwrap();
    block_on(engine.join(bob.id, general.id)).unwrap();
    let (first, created) =
        block_on(engine.post(alice.id, general.id, "hello", Some("k1"), None)).unwrap();
    assert!(created);
    let before = full_history(&engine, alice.id, general.id);
    let seqs_before = last_seqs(&engine, alice.id);
    engine.shutdown();

    let engine = open(dir.path());
    let (again, created) =
        block_on(engine.post(alice.id, general.id, "hello", Some("k1"), None)).unwrap();
    assert!(
        !created,
        "a repeated client_msg_id after restart stored a new message"
    );
    assert_eq!(again, first);
    // The key decides, not the text.
    let (other_text, created) =
        block_on(engine.post(alice.id, general.id, "hello again", Some("k1"), None)).unwrap();
    assert!(!created);
    assert_eq!(other_text, first);
    assert_eq!(full_history(&engine, alice.id, general.id), before);
    assert_eq!(last_seqs(&engine, alice.id), seqs_before);
    // Keys belong to their user: Bob's "k1" is a message of its own, at the next seq.
    let (bobs, created) =
        block_on(engine.post(bob.id, general.id, "mine", Some("k1"), None)).unwrap();
    assert!(created);
    assert_eq!(bobs.seq, seqs_before[&general.id] + 1);
    engine.shutdown();
}

/// Everything the API can read back, for comparison across a restart.
#[derive(Debug, PartialEq)]
struct Snapshot {
    users: Vec<Option<User>>,
    me: Vec<(UserView, Vec<WorkspaceView>)>,
    members: Vec<MemberView>,
    visible: Vec<Vec<ChannelView>>,
    joined: Vec<Vec<ChannelView>>,
    channels: BTreeMap<ChannelId, ChannelContent>,
}

/// A channel's messages, thread replies and edit histories.
#[derive(Debug, PartialEq)]
struct ChannelContent {
    history: Vec<MessageView>,
    replies: BTreeMap<u64, Vec<MessageView>>,
    versions: BTreeMap<u64, Vec<chorus_engine::view::VersionView>>,
}

fn snapshot(
    engine: &Engine,
    users: &[&UserView],
    ws: WorkspaceId,
    reader: UserId,
    channels: &[ChannelId],
) -> Snapshot {
    let mut content = BTreeMap::new();
    for c in channels {
        let history = full_history(engine, reader, *c);
        let mut replies = BTreeMap::new();
        let mut versions = BTreeMap::new();
        for m in &history {
            if m.reply_count > 0 {
                replies.insert(m.seq, all_replies(engine, reader, m.id));
            }
            for r in replies.get(&m.seq).into_iter().flatten().chain([m]) {
                if r.edited_at.is_some() {
                    versions.insert(r.seq, block_on(engine.versions(reader, r.id)).unwrap());
                }
            }
        }
        content.insert(
            *c,
            ChannelContent {
                history,
                replies,
                versions,
            },
        );
    }
    Snapshot {
        users: users
            .iter()
            .map(|u| block_on(engine.user_by_email(&u.email)).unwrap())
            .collect(),
        me: users
            .iter()
            .map(|u| block_on(engine.me(u.id)).unwrap())
            .collect(),
        members: block_on(engine.members(reader, ws)).unwrap(),
        visible: users
            .iter()
            .map(|u| block_on(engine.channels(u.id, ws)).unwrap())
            .collect(),
        joined: users
            .iter()
            .map(|u| block_on(engine.user_channels(u.id)).unwrap())
            .collect(),
        channels: content,
    }
}

// Everything survives a clean restart: users, workspace, memberships, history across pages,
// threads, reactions, edits with their versions, deletions, DMs (the same set opens the same
// channel), and each channel's next seq continues right after its last.
#[test]
fn clean_restart_keeps_all_state() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path());
    let (alice, bob, carol) = (
        user(&engine, "alice"),
        user(&engine, "bob"),
        user(&engine, "carol"),
    );
    let ws = block_on(engine.create_workspace(alice.id, "acme")).unwrap();
    for u in [&bob, &carol] {
        block_on(engine.add_member(alice.id, ws.id, &u.email)).unwrap();
    }
    let general = block_on(engine.create_channel(alice.id, ws.id, "general", ChannelKind::Public))
        .unwrap()
        .id;
    let secret = block_on(engine.create_channel(alice.id, ws.id, "secret", ChannelKind::Private))
        .unwrap()
        .id;
    block_on(engine.join(bob.id, general)).unwrap();
    block_on(engine.join(carol.id, general)).unwrap();
    block_on(engine.add_channel_member(alice.id, secret, bob.id)).unwrap();
    let (dm, created) = block_on(engine.open_dm(alice.id, ws.id, vec![bob.id])).unwrap();
    assert!(created);
    let (group, created) =
        block_on(engine.open_dm(alice.id, ws.id, vec![bob.id, carol.id])).unwrap();
    assert!(created);

    let hello = post(&engine, alice.id, general, "hello");
    let second = post(&engine, bob.id, general, "second");
    reply(&engine, bob.id, hello.id, "reply one");
    let r2 = reply(&engine, carol.id, hello.id, "reply two");
    reply(&engine, alice.id, hello.id, "reply three");
    block_on(engine.edit(carol.id, r2.id, "reply two, edited")).unwrap();
    block_on(engine.react(alice.id, hello.id, "+1", true)).unwrap();
    block_on(engine.react(bob.id, hello.id, "+1", true)).unwrap();
    block_on(engine.react(bob.id, hello.id, "tada", true)).unwrap();
    block_on(engine.react(carol.id, hello.id, "eyes", true)).unwrap();
    block_on(engine.react(carol.id, hello.id, "eyes", false)).unwrap();
    block_on(engine.edit(alice.id, hello.id, "hello, edited")).unwrap();
    block_on(engine.edit(alice.id, hello.id, "hello, edited twice")).unwrap();
    block_on(engine.delete(bob.id, second.id)).unwrap();
    block_on(engine.remove_channel_member(carol.id, general, carol.id)).unwrap();
    for i in 0..PAGED_POSTS {
        let author = if i % 2 == 0 { alice.id } else { bob.id };
        let key = format!("secret-{i}");
        block_on(engine.post(author, secret, &format!("secret {i}"), Some(&key), None)).unwrap();
    }
    post(&engine, alice.id, dm.id, "psst");
    post(&engine, bob.id, dm.id, "yes?");
    post(&engine, carol.id, group.id, "hi both");

    let users = [&alice, &bob, &carol];
    let channels = [general, secret, dm.id, group.id];
    let before = snapshot(&engine, &users, ws.id, alice.id, &channels);
    assert_eq!(before.channels[&secret].history.len(), PAGED_POSTS);
    assert_eq!(before.channels[&general].replies[&hello.seq].len(), 3);
    engine.shutdown();

    let engine = open(dir.path());
    let after = snapshot(&engine, &users, ws.id, alice.id, &channels);
    assert_eq!(after, before);

    // A DM is found again by its set of users, whoever opens it.
    let (again, created) = block_on(engine.open_dm(bob.id, ws.id, vec![alice.id])).unwrap();
    assert_eq!((again.id, created), (dm.id, false));
    let (again, created) =
        block_on(engine.open_dm(carol.id, ws.id, vec![bob.id, alice.id])).unwrap();
    assert_eq!((again.id, created), (group.id, false));
    // Carol left #general before the restart, and stays out.
    assert_eq!(
        block_on(engine.history(carol.id, general, None, 10)).unwrap_err(),
        EngineError::Domain(DomainError::NotFound("channel"))
    );
    // Bob's subscription starts from the restored last seqs.
    let sub = block_on(engine.subscribe(bob.id)).unwrap();
    let bobs: Vec<(ChannelId, u64)> = last_seqs(&engine, bob.id).into_iter().collect();
    assert_eq!(sub.channels(), bobs.as_slice());
    drop(sub);
    // The next event of every channel takes the seq right after its last.
    let last = last_seqs(&engine, alice.id);
    for c in channels {
        let m = post(&engine, alice.id, c, "after the restart");
        assert_eq!(m.seq, last[&c] + 1, "channel {c}: seq after restart");
    }
    engine.shutdown();
}

/// The snapshot files in a directory.
fn snapshot_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "snap"))
        .collect();
    files.sort();
    files
}

/// Copies the snapshot files of `dir` into `to`, or back.
fn copy_snapshots(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in std::fs::read_dir(from).unwrap() {
        let f = f.unwrap().path();
        if f.extension().is_some_and(|x| x == "snap") {
            std::fs::copy(&f, to.join(f.file_name().unwrap())).unwrap();
        }
    }
}

// A restart from snapshots gives exactly the state a replay of the whole log gives, whether
// the snapshot is the one written at shutdown (nothing to replay), an older one (the log
// after it is replayed), damaged (ignored: the whole log is replayed), or missing. Each
// reopen says which it used, so a snapshot that was silently ignored would fail the test.
#[test]
fn snapshots_restore_the_same_state_as_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let old = tempfile::tempdir().unwrap();
    // Snapshots every few events, so that several are written while the posts go on.
    let engine = open_with(dir.path(), 16);
    let (alice, bob) = (user(&engine, "alice"), user(&engine, "bob"));
    let ws = block_on(engine.create_workspace(alice.id, "acme")).unwrap();
    block_on(engine.add_member(alice.id, ws.id, &bob.email)).unwrap();
    let mut channels = Vec::new();
    for name in ["a", "b", "c", "d"] {
        let c = block_on(engine.create_channel(alice.id, ws.id, name, ChannelKind::Public))
            .unwrap()
            .id;
        block_on(engine.join(bob.id, c)).unwrap();
        channels.push(c);
    }
    let activity = |round: usize| {
        for (i, c) in channels.iter().enumerate() {
            let key = format!("k{round}-{i}");
            let root = block_on(engine.post(alice.id, *c, "root", Some(&key), None))
                .unwrap()
                .0;
            let r = reply(&engine, bob.id, root.id, &format!("reply {round}"));
            block_on(engine.edit(bob.id, r.id, "reply, edited")).unwrap();
            block_on(engine.react(bob.id, root.id, "+1", true)).unwrap();
            if round.is_multiple_of(3) {
                block_on(engine.delete(alice.id, root.id)).unwrap();
            }
            post(&engine, bob.id, *c, &format!("plain {round}"));
        }
    };
    for round in 0..30 {
        activity(round);
    }
    // Let the background snapshot writes land, then keep a copy of these older snapshots.
    std::thread::sleep(Duration::from_millis(300));
    copy_snapshots(&dir.path().join("snapshots"), old.path());
    assert!(
        !snapshot_files(old.path()).is_empty(),
        "no snapshot was written while posting"
    );
    for round in 30..60 {
        activity(round);
    }
    block_on(engine.remove_channel_member(bob.id, channels[0], bob.id)).unwrap();
    let users = [&alice, &bob];
    let before = snapshot(&engine, &users, ws.id, alice.id, &channels);
    let seqs = last_seqs(&engine, alice.id);
    engine.shutdown();

    let check = |what: &str, expect_snapshot: bool, expect_replay: bool, expect_refused: bool| {
        let engine = open_with(dir.path(), 16);
        let recovery = engine.recovery();
        let used = recovery
            .iter()
            .filter(|r| r.snapshot_offset.is_some())
            .count();
        // A snapshot that is there but cannot be used says why; one that is used, or
        // absent, says nothing.
        let refused = recovery
            .iter()
            .filter(|r| r.snapshot_refused.is_some())
            .count();
        assert_eq!(
            refused > 0,
            expect_refused,
            "{what}: snapshots refused: {recovery:?}"
        );
        let replayed: u64 = recovery.iter().map(|r| r.replayed_events).sum();
        assert_eq!(
            used > 0,
            expect_snapshot,
            "{what}: snapshots used: {recovery:?}"
        );
        assert_eq!(
            replayed > 0,
            expect_replay,
            "{what}: replayed: {recovery:?}"
        );
        assert_eq!(
            snapshot(&engine, &users, ws.id, alice.id, &channels),
            before,
            "{what}: state differs"
        );
        assert_eq!(last_seqs(&engine, alice.id), seqs, "{what}: seqs");
        // An idempotency key from before the restart still finds its message.
        let (m, created) =
            block_on(engine.post(alice.id, channels[1], "root", Some("k59-1"), None)).unwrap();
        assert!(!created, "{what}: a repeated key stored a new message");
        assert_eq!(m.seq, before.channels[&channels[1]].history[118].seq);
        engine.shutdown();
    };
    check("shutdown snapshot", true, false, false);
    copy_snapshots(old.path(), &dir.path().join("snapshots"));
    check("older snapshot and the log after it", true, true, false);
    for f in snapshot_files(&dir.path().join("snapshots")) {
        let mut bytes = std::fs::read(&f).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x40;
        std::fs::write(&f, bytes).unwrap();
    }
    check("damaged snapshots", false, true, true);
    for f in snapshot_files(&dir.path().join("snapshots")) {
        std::fs::remove_file(f).unwrap();
    }
    check("no snapshots", false, true, false);
    check("snapshots written at the last shutdown", true, false, false);
}

/// Checks that replayed frames are byte for byte the frames that went out live; on a
/// difference, names the JSON fields that differ rather than printing whole frames.
fn assert_same_frames(live: &BTreeMap<(ChannelId, u64), Bytes>, replayed: &[Event]) {
    for e in replayed {
        let want = live
            .get(&(e.channel, e.seq))
            .unwrap_or_else(|| panic!("{} seq {} never went out live", e.channel, e.seq));
        if e.bytes != want {
            let (a, b): (Value, Value) = (
                serde_json::from_slice(want).unwrap(),
                serde_json::from_slice(&e.bytes).unwrap(),
            );
            let mut diff = Vec::new();
            differences(&a, &b, "", &mut diff);
            panic!(
                "{} seq {} ({}): the replayed frame differs from the live one: {diff:#?}",
                e.channel, e.seq, e.kind
            );
        }
    }
}

/// The JSON paths where two values differ, each with both values cut short.
fn differences(a: &Value, b: &Value, path: &str, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let (va, vb) = (
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                );
                differences(va, vb, &format!("{path}/{k}"), out);
            }
        }
        _ if a != b => out.push(format!("{path}: live {} replayed {}", short(a), short(b))),
        _ => {}
    }
}

fn short(v: &Value) -> String {
    const SHOWN_CHARS_MAX: usize = 60;
    let s = v.to_string();
    if s.chars().count() <= SHOWN_CHARS_MAX {
        return s;
    }
    let head: String = s.chars().take(SHOWN_CHARS_MAX).collect();
    format!("{head}... ({} bytes)", s.len())
}

/// Alice, Bob, #general and their DM, with a subscriber of Alice's that started before any
/// channel existed and so sees every event of both channels live, from seq 1.
struct Chat {
    engine: Engine,
    alice: UserId,
    bob: UserId,
    general: ChannelId,
    dm: ChannelId,
    witness: Subscription,
    witness_next: BTreeMap<ChannelId, u64>,
    /// Every frame the witness received, by channel and seq.
    live: BTreeMap<(ChannelId, u64), Bytes>,
}

impl Chat {
    fn new(dir: &Path) -> Chat {
        let engine = open(dir);
        let (alice, bob) = (user(&engine, "alice").id, user(&engine, "bob"));
        let witness = block_on(engine.subscribe(alice)).unwrap();
        assert!(witness.channels().is_empty());
        let ws = block_on(engine.create_workspace(alice, "acme")).unwrap().id;
        block_on(engine.add_member(alice, ws, &bob.email)).unwrap();
        let general = block_on(engine.create_channel(alice, ws, "general", ChannelKind::Public))
            .unwrap()
            .id;
        block_on(engine.join(bob.id, general)).unwrap();
        let dm = block_on(engine.open_dm(alice, ws, vec![bob.id]))
            .unwrap()
            .0
            .id;
        Chat {
            engine,
            alice,
            bob: bob.id,
            general,
            dm,
            witness,
            witness_next: BTreeMap::new(),
            live: BTreeMap::new(),
        }
    }

    /// A bit of everything in both channels: posts, a thread, reactions, edits, a deletion.
    fn activity(&self, by: UserId, other: UserId, tag: &str) {
        let e = &self.engine;
        let root = post(e, by, self.general, &format!("{tag}: root"));
        let doomed = post(e, by, self.general, &format!("{tag}: doomed"));
        reply(e, other, root.id, &format!("{tag}: a reply"));
        block_on(e.react(other, root.id, "+1", true)).unwrap();
        block_on(e.react(by, root.id, "+1", true)).unwrap();
        block_on(e.react(other, root.id, "+1", false)).unwrap();
        block_on(e.edit(by, root.id, &format!("{tag}: root, edited"))).unwrap();
        block_on(e.delete(by, doomed.id)).unwrap();
        post(e, by, self.dm, &format!("{tag}: in the DM"));
        post(e, other, self.dm, &format!("{tag}: answer in the DM"));
    }

    /// Reads the witness up to the current last seqs and records its frames.
    fn witness_catch_up(&mut self) {
        let until = last_seqs(&self.engine, self.alice);
        for e in read_events(&mut self.witness, &mut self.witness_next, &until) {
            self.live.insert((e.channel, e.seq), e.bytes);
        }
    }

    /// Checks that replayed frames are byte for byte the frames that went out live.
    fn assert_same_as_live(&self, replayed: &[Event]) {
        assert_same_frames(&self.live, replayed);
    }
}

// A subscriber that drops and resumes from its last seen seqs gets exactly the events it
// missed, per channel in seq order, then `resumed` with the right last seqs, then live
// events: no gap, no repeat, and the same bytes the live subscriber got.
#[test]
fn resume_sends_exactly_the_missed_events_then_live_ones() {
    let dir = tempfile::tempdir().unwrap();
    let mut chat = Chat::new(dir.path());
    let (alice, bob) = (chat.alice, chat.bob);
    let mut sub = block_on(chat.engine.subscribe(bob)).unwrap();
    let mut seen: BTreeMap<ChannelId, u64> = sub.channels().iter().copied().collect();
    assert_eq!(seen.len(), 2);
    chat.activity(bob, alice, "before");
    let until = last_seqs(&chat.engine, bob);
    let mut next = seen.iter().map(|(c, s)| (*c, s + 1)).collect();
    for e in read_events(&mut sub, &mut next, &until) {
        seen.insert(e.channel, e.seq);
    }
    assert_eq!(seen, until);
    drop(sub);

    // Alice keeps going while Bob is away, for more events than one catch-up page holds.
    chat.activity(alice, alice, "missed");
    for i in 0..MISSED_POSTS {
        post(&chat.engine, alice, chat.general, &format!("missed {i}"));
    }
    let last = last_seqs(&chat.engine, bob);
    let mut sub = block_on(chat.engine.subscribe(bob)).unwrap();
    let started: BTreeMap<ChannelId, u64> = sub.channels().iter().copied().collect();
    assert_eq!(started, last);
    let (replayed, resumed) = resume(&mut sub, &seen);
    assert_eq!(resumed, last, "the resumed frame's last seqs");
    for (c, from) in &seen {
        let got: Vec<u64> = replayed
            .iter()
            .filter(|e| e.channel == *c)
            .map(|e| e.seq)
            .collect();
        assert_eq!(got, (from + 1..=last[c]).collect::<Vec<_>>(), "channel {c}");
    }
    let kinds: Vec<&str> = replayed
        .iter()
        .filter(|e| e.channel == chat.general)
        .map(|e| e.kind.as_str())
        .collect();
    let mut want = vec![
        "message:new",
        "message:new",
        "message:new",
        "reaction:added",
        "reaction:removed",
        "message:edited",
        "message:deleted",
    ];
    want.resize(want.len() + MISSED_POSTS, "message:new");
    assert_eq!(kinds, want);
    chat.witness_catch_up();
    chat.assert_same_as_live(&replayed);

    // Then live events, each once, right after.
    let mut next: BTreeMap<ChannelId, u64> = last.iter().map(|(c, s)| (*c, s + 1)).collect();
    post(&chat.engine, alice, chat.general, "live one");
    post(&chat.engine, alice, chat.dm, "live two");
    let until = last.iter().map(|(c, s)| (*c, s + 1)).collect();
    let live = read_events(&mut sub, &mut next, &until);
    assert_eq!(live.len(), 2);
    chat.engine.shutdown();
}

// Resuming from seq 0 replays each named channel from its first event, byte for byte as
// the events went out live, and a channel not named starts live.
#[test]
fn resume_from_zero_replays_everything() {
    let dir = tempfile::tempdir().unwrap();
    let mut chat = Chat::new(dir.path());
    let (alice, bob) = (chat.alice, chat.bob);
    chat.activity(alice, bob, "one");
    chat.activity(bob, alice, "two");
    chat.witness_catch_up();
    let last = last_seqs(&chat.engine, alice);

    let mut sub = block_on(chat.engine.subscribe(bob)).unwrap();
    let since = BTreeMap::from([(chat.general, 0)]);
    let (replayed, resumed) = resume(&mut sub, &since);
    assert_eq!(
        resumed,
        BTreeMap::from([(chat.general, last[&chat.general])])
    );
    assert_eq!(replayed.len() as u64, last[&chat.general]);
    assert_eq!(replayed[0].kind, "member:joined");
    chat.assert_same_as_live(&replayed);

    // The DM was not named: its next event arrives live, with nothing before it.
    let m = post(&chat.engine, alice, chat.dm, "live");
    let (v, _) = next_frame(&mut sub);
    let e = Event::of(&v, Bytes::new());
    assert_eq!((e.channel, e.seq), (chat.dm, m.seq));
    assert_eq!(m.seq, last[&chat.dm] + 1);
    chat.engine.shutdown();
}

// After a clean restart, events read back from the log render the very bytes that went out
// live before it, both from seq 0 and from the middle, and live events follow without a gap.
#[test]
fn resume_across_restart_replays_the_same_frames() {
    let dir = tempfile::tempdir().unwrap();
    let mut chat = Chat::new(dir.path());
    let (alice, bob) = (chat.alice, chat.bob);
    chat.activity(alice, bob, "one");
    chat.activity(bob, alice, "two");
    chat.witness_catch_up();
    let last = last_seqs(&chat.engine, alice);
    let Chat {
        engine,
        general,
        dm,
        witness,
        live,
        ..
    } = chat;
    drop(witness);
    engine.shutdown();

    let engine = open(dir.path());
    assert_eq!(last_seqs(&engine, alice), last);
    let mut sub = block_on(engine.subscribe(bob)).unwrap();
    let since = BTreeMap::from([(general, 0), (dm, 3)]);
    let (replayed, resumed) = resume(&mut sub, &since);
    assert_eq!(resumed, last);
    assert_eq!(
        replayed.len() as u64,
        last[&general] + last[&dm] - 3,
        "every event after the named seqs"
    );
    assert_same_frames(&live, &replayed);
    let m = post(&engine, bob, general, "after the restart");
    assert_eq!(m.seq, last[&general] + 1);
    let (v, _) = next_frame(&mut sub);
    let e = Event::of(&v, Bytes::new());
    assert_eq!((e.channel, e.seq), (general, m.seq));
    engine.shutdown();
}

// A reconnecting client subscribes (held) first and starts a moment later from its resume
// point; an event committed in between reaches it once, in order, in the catch-up.
#[test]
fn resume_after_subscribe_sends_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let chat = Chat::new(dir.path());
    let (alice, bob) = (chat.alice, chat.bob);
    let seen = last_seqs(&chat.engine, bob);
    chat.activity(alice, alice, "missed");
    let mut sub = block_on(chat.engine.subscribe_held(bob)).unwrap();
    // Committed after the subscription started and before the resume is asked for.
    post(&chat.engine, alice, chat.general, "in between");
    let last = last_seqs(&chat.engine, bob);
    block_on(sub.start(Some(seen.iter().map(|(c, s)| (*c, *s)).collect()))).unwrap();
    let mut next: BTreeMap<ChannelId, u64> = seen.iter().map(|(c, s)| (*c, s + 1)).collect();
    loop {
        let (v, bytes) = next_frame(&mut sub);
        if v["type"] == "resumed" {
            break;
        }
        advance(&mut next, &Event::of(&v, bytes));
    }
    let want: BTreeMap<ChannelId, u64> = last.iter().map(|(c, s)| (*c, s + 1)).collect();
    chat.engine.shutdown();
    assert_eq!(next, want);
}

// A message over the inline limit (its body in the blob store, its frame not in the log)
// replays as it went out live, not as it stands at the time of the resume.
#[test]
fn resume_replays_large_messages_as_they_were() {
    let dir = tempfile::tempdir().unwrap();
    let mut chat = Chat::new(dir.path());
    let (alice, bob) = (chat.alice, chat.bob);
    let big = "x".repeat(INLINE_BODY_BYTES_MAX + 1);
    let m = post(&chat.engine, alice, chat.general, &big);
    block_on(chat.engine.react(bob, m.id, "+1", true)).unwrap();
    reply(&chat.engine, bob, m.id, "that is long");
    block_on(chat.engine.edit(alice, m.id, &format!("{big}y"))).unwrap();
    chat.witness_catch_up();
    let mut sub = block_on(chat.engine.subscribe(bob)).unwrap();
    let (replayed, _) = resume(&mut sub, &BTreeMap::from([(chat.general, 0)]));
    chat.engine.shutdown();
    chat.assert_same_as_live(&replayed);
}

// A data directory is locked while an engine has it open: a second engine refuses it
// (rather than write the same logs), and a shut-down engine's directory opens again.
#[test]
fn a_data_directory_is_open_in_one_engine_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let first = open(dir.path());
    let second = Engine::open({
        let mut config = EngineConfig::new(dir.path());
        config.shards = 1;
        config.partitions = 8;
        config.pin = false;
        config
    });
    match second {
        Err(e) => assert!(e.to_string().contains("in use by another"), "{e}"),
        Ok(_) => panic!("a second engine opened a locked data directory"),
    }
    first.shutdown();
    drop(first);
    let again = open(dir.path());
    again.shutdown();
}
