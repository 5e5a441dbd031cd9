//! Concurrent senders against a real engine (2 shards, 8 partitions, real disk): plain std
//! threads post to shared channels spread over both shards at once, and the channels keep
//! one gapless total order that every reader and every subscriber sees the same way.

use bytes::Bytes;
use chorus_engine::domain::meta::partition_of;
use chorus_engine::domain::ChannelKind;
use chorus_engine::ids::{ChannelId, UserId, WorkspaceId};
use chorus_engine::view::{MessageView, UserView};
use chorus_engine::{Engine, EngineConfig, Subscription};
use futures::executor::block_on;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

const SHARDS: usize = 2;
const PARTITIONS: u32 = 8;
/// Posting threads, one user each.
const USERS: usize = 6;
/// Messages each thread posts.
const POSTS_PER_USER: usize = 500;
/// Shared channels, each on its own partition, on both shards.
const CHANNELS: usize = 3;
/// How long a subscriber waits for a frame before the test fails (a guard, not a timing).
const FRAME_WAIT: Duration = Duration::from_secs(20);
/// Channels created at most while looking for ones on distinct partitions.
const CHANNEL_TRIES_MAX: usize = 64;

fn open(dir: &Path) -> Engine {
    let mut config = EngineConfig::new(dir);
    config.shards = SHARDS;
    config.partitions = PARTITIONS;
    config.pin = false;
    Engine::open(config).expect("open engine")
}

/// Wakes a parked std thread: lets a plain thread wait for a frame with a deadline.
struct Unpark(std::thread::Thread);

impl futures::task::ArcWake for Unpark {
    fn wake_by_ref(arc_self: &Arc<Self>) {
        arc_self.0.unpark();
    }
}

/// Waits for at least one frame and takes every frame ready now; fails after `FRAME_WAIT`.
fn recv_frames(sub: &mut Subscription, out: &mut Vec<Bytes>) {
    let deadline = Instant::now() + FRAME_WAIT;
    let waker = futures::task::waker(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    loop {
        match sub.receiver().poll_recv(&mut cx) {
            Poll::Ready(Ok(frame)) => {
                out.push(frame);
                sub.try_recv_batch(out, 1024).expect("not cut off");
                return;
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

/// The channel a thread's `i`th message goes to: round-robin, offset by thread.
fn channel_index(thread: usize, i: usize) -> usize {
    (thread + i) % CHANNELS
}

/// Creates public channels until `CHANNELS` of them sit on distinct partitions that cover
/// every shard (the partition of a new channel is a hash, so the test searches).
fn spread_channels(engine: &Engine, owner: UserId, ws: WorkspaceId) -> Vec<ChannelId> {
    let mut picked: Vec<ChannelId> = Vec::new();
    for n in 0..CHANNEL_TRIES_MAX {
        let c = block_on(engine.create_channel(owner, ws, &format!("c{n}"), ChannelKind::Public))
            .expect("create channel")
            .id;
        let p = partition_of(c);
        if picked.iter().any(|x| partition_of(*x) == p) {
            continue;
        }
        let shards: BTreeSet<u32> = picked
            .iter()
            .map(|x| partition_of(*x) % SHARDS as u32)
            .chain([p % SHARDS as u32])
            .collect();
        if picked.len() + 1 == CHANNELS && shards.len() < SHARDS {
            continue;
        }
        picked.push(c);
        if picked.len() == CHANNELS {
            return picked;
        }
    }
    panic!("no {CHANNELS} channels on distinct partitions in {CHANNEL_TRIES_MAX} tries");
}

/// One acknowledged post.
#[derive(Clone, Debug)]
struct Ack {
    channel: ChannelId,
    seq: u64,
    message: MessageView,
}

/// Reads a subscription until every channel in `last` has reached its last seq, checking
/// that each channel's frames come exactly once, in seq order, without gaps.
fn collect_events(
    mut sub: Subscription,
    mut next: HashMap<ChannelId, u64>,
    last: &HashMap<ChannelId, u64>,
) -> Vec<Value> {
    let mut events = Vec::new();
    let mut frames = Vec::new();
    while last.iter().any(|(c, l)| next[c] <= *l) {
        frames.clear();
        recv_frames(&mut sub, &mut frames);
        for f in &frames {
            let v: Value = serde_json::from_slice(f).expect("frame is JSON");
            // A poster's own `read` frames (its marker moved) are no channel events.
            if v["type"] == "read" {
                continue;
            }
            assert_eq!(v["type"], "event", "unexpected frame {v}");
            let c: ChannelId = v["channel_id"].as_str().unwrap().parse().unwrap();
            let seq = v["seq"].as_u64().unwrap();
            let want = next
                .get_mut(&c)
                .unwrap_or_else(|| panic!("frame of {c}: {v}"));
            assert_eq!(
                seq, *want,
                "channel {c}: frame out of order, repeated or missing"
            );
            *want += 1;
            events.push(v);
        }
    }
    events
}

// Six threads posting at once to three channels on two shards: every acknowledged post is
// stored exactly once in one gapless order that keeps each sender's order, and every
// subscriber receives every event of its channels once, in order.
#[test]
fn concurrent_senders_share_one_gapless_order() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path());
    let users: Vec<UserView> = (0..USERS)
        .map(|i| {
            let email = format!("u{i}@example.com");
            block_on(engine.create_user(&email, &format!("User {i}"), "hash")).unwrap()
        })
        .collect();
    let owner = users[0].id;
    let ws = block_on(engine.create_workspace(owner, "acme")).unwrap();
    for u in &users[1..] {
        block_on(engine.add_member(owner, ws.id, &u.email)).unwrap();
    }
    let channels = spread_channels(&engine, owner, ws.id);
    for u in &users[1..] {
        for c in &channels {
            block_on(engine.join(u.id, *c)).unwrap();
        }
    }
    // Each member's joining is one event, so the channels start at seq USERS, no messages.
    let visible = block_on(engine.channels(owner, ws.id)).unwrap();
    for c in &channels {
        let view = visible.iter().find(|v| v.id == *c).expect("visible");
        assert_eq!(view.last_seq, USERS as u64);
        assert!(full_history(&engine, owner, *c).is_empty());
    }

    let mut posts_to: HashMap<ChannelId, u64> = channels.iter().map(|c| (*c, 0)).collect();
    for t in 0..USERS {
        for i in 0..POSTS_PER_USER {
            *posts_to.get_mut(&channels[channel_index(t, i)]).unwrap() += 1;
        }
    }
    // One sentinel per channel, posted after every thread is done: anything a subscriber
    // could receive twice or late would come before it.
    let last: HashMap<ChannelId, u64> = posts_to
        .iter()
        .map(|(c, n)| (*c, USERS as u64 + n + 1))
        .collect();

    let start = Arc::new(Barrier::new(2 * USERS));
    let subscribers: Vec<_> = users
        .iter()
        .map(|u| {
            let (engine, start, last, channels) = (
                engine.clone(),
                start.clone(),
                last.clone(),
                channels.clone(),
            );
            let user = u.id;
            std::thread::spawn(move || {
                let sub = block_on(engine.subscribe(user)).expect("subscribe");
                let started: HashMap<ChannelId, u64> = sub.channels().iter().copied().collect();
                let next = channels
                    .iter()
                    .map(|c| (*c, started[c] + 1))
                    .collect::<HashMap<_, _>>();
                assert!(channels.iter().all(|c| started[c] == USERS as u64));
                start.wait();
                (user, collect_events(sub, next, &last))
            })
        })
        .collect();
    let started_at = Instant::now();
    let posters: Vec<_> = users
        .iter()
        .enumerate()
        .map(|(t, u)| {
            let (engine, start, channels) = (engine.clone(), start.clone(), channels.clone());
            let user = u.id;
            std::thread::spawn(move || {
                start.wait();
                let mut acks = Vec::with_capacity(POSTS_PER_USER);
                for i in 0..POSTS_PER_USER {
                    let channel = channels[channel_index(t, i)];
                    let text = format!("message {i} from thread {t}");
                    let key = format!("t{t}-m{i}");
                    let (message, created) =
                        block_on(engine.post(user, channel, &text, Some(&key), None))
                            .expect("post");
                    assert!(created, "a fresh client_msg_id stores a message");
                    assert_eq!((message.channel_id, message.user_id), (channel, user));
                    assert_eq!(message.text, text);
                    assert_eq!(message.client_msg_id.as_deref(), Some(key.as_str()));
                    assert_eq!(message.id.seq, message.seq);
                    acks.push(Ack {
                        channel,
                        seq: message.seq,
                        message,
                    });
                }
                acks
            })
        })
        .collect();
    let acks: Vec<Vec<Ack>> = posters.into_iter().map(|h| h.join().unwrap()).collect();
    let posting = started_at.elapsed();
    for c in &channels {
        block_on(engine.post(owner, *c, "sentinel", Some("sentinel"), None)).unwrap();
    }
    let streams: Vec<(UserId, Vec<Value>)> =
        subscribers.into_iter().map(|h| h.join().unwrap()).collect();
    println!(
        "{} posts from {USERS} threads in {posting:?}; every subscriber done after {:?}",
        USERS * POSTS_PER_USER,
        started_at.elapsed()
    );

    // The directory's last seqs: joins, then every post, then the sentinel.
    let visible = block_on(engine.channels(owner, ws.id)).unwrap();
    let mut stored: HashMap<ChannelId, BTreeMap<u64, MessageView>> = HashMap::new();
    for c in &channels {
        let view = visible.iter().find(|v| v.id == *c).expect("visible");
        assert_eq!(view.last_seq, last[c], "channel {c}: last_seq");
        let history = full_history(&engine, owner, *c);
        let seqs: Vec<u64> = history.iter().map(|m| m.seq).collect();
        // Joins were 1..=USERS; messages must fill the rest exactly, in order.
        let want: Vec<u64> = (USERS as u64 + 1..=last[c]).collect();
        assert_eq!(
            seqs, want,
            "channel {c}: history seqs have a gap or a repeat"
        );
        let keys: BTreeSet<&str> = history
            .iter()
            .map(|m| m.client_msg_id.as_deref().expect("every post has a key"))
            .collect();
        assert_eq!(
            keys.len(),
            history.len(),
            "channel {c}: a client_msg_id twice"
        );
        stored.insert(*c, history.into_iter().map(|m| (m.seq, m)).collect());
    }

    // Every acknowledged post is there, as acknowledged, and each sender's own messages
    // keep the order in which it sent them.
    let total: usize = stored.values().map(|h| h.len()).sum();
    assert_eq!(total, USERS * POSTS_PER_USER + CHANNELS);
    for (t, thread_acks) in acks.iter().enumerate() {
        for a in thread_acks {
            assert_eq!(stored[&a.channel].get(&a.seq), Some(&a.message));
        }
        for c in &channels {
            let sent: Vec<u64> = thread_acks
                .iter()
                .filter(|a| a.channel == *c)
                .map(|a| a.seq)
                .collect();
            let in_history: Vec<u64> = stored[c]
                .values()
                .filter(|m| m.user_id == users[t].id && m.text != "sentinel")
                .map(|m| m.seq)
                .collect();
            assert_eq!(
                sent, in_history,
                "thread {t} in {c}: order differs from sending"
            );
            assert!(sent.windows(2).all(|w| w[0] < w[1]));
        }
    }

    // Every subscriber got exactly the stored messages, rendered as history renders them.
    for (user, events) in &streams {
        assert_eq!(events.len(), total, "subscriber of {user}: event count");
        for v in events {
            let c: ChannelId = v["channel_id"].as_str().unwrap().parse().unwrap();
            let seq = v["seq"].as_u64().unwrap();
            assert_eq!(v["event"]["type"], "message:new");
            let want = serde_json::to_value(&stored[&c][&seq]).unwrap();
            assert_eq!(
                v["event"]["message"], want,
                "subscriber of {user}: {c} seq {seq}"
            );
        }
    }
    engine.shutdown();
}

// A channel's own entry, and an existing DM opened again, report the channel's last seq, as
// the channel list does.
#[test]
fn channel_entries_report_last_seq() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path());
    let alice = block_on(engine.create_user("a@example.com", "A", "hash")).unwrap();
    let bob = block_on(engine.create_user("b@example.com", "B", "hash")).unwrap();
    let ws = block_on(engine.create_workspace(alice.id, "acme")).unwrap();
    block_on(engine.add_member(alice.id, ws.id, &bob.email)).unwrap();
    let c =
        block_on(engine.create_channel(alice.id, ws.id, "general", ChannelKind::Public)).unwrap();
    let (dm, _) = block_on(engine.open_dm(alice.id, ws.id, vec![bob.id])).unwrap();
    for channel in [c.id, dm.id] {
        block_on(engine.post(alice.id, channel, "one", None, None)).unwrap();
        block_on(engine.post(alice.id, channel, "two", None, None)).unwrap();
    }
    let listed: HashMap<ChannelId, u64> = block_on(engine.channels(alice.id, ws.id))
        .unwrap()
        .into_iter()
        .map(|v| (v.id, v.last_seq))
        .collect();
    assert_eq!((listed[&c.id], listed[&dm.id]), (3, 4));
    let entry = block_on(engine.channel(alice.id, c.id)).unwrap();
    let (again, _) = block_on(engine.open_dm(bob.id, ws.id, vec![alice.id])).unwrap();
    engine.shutdown();
    assert_eq!(
        (entry.last_seq, again.last_seq),
        (3, 4),
        "channel() and open_dm() disagree with channels()"
    );
}

/// Users whose DMs and group DMs the concurrent-open test opens.
const DM_USERS: usize = 6;
/// Callers opening the same DM at once, half from each side.
const DM_OPENERS: usize = 50;

/// Opens the DM of `set` from `DM_OPENERS` threads at once, each caller a member of the set
/// in turn; returns every answer.
fn open_at_once(
    engine: &Engine,
    ws: WorkspaceId,
    set: &[UserId],
) -> Vec<Result<(ChannelId, bool), String>> {
    let start = Arc::new(Barrier::new(DM_OPENERS));
    let threads: Vec<_> = (0..DM_OPENERS)
        .map(|i| {
            let (engine, start, set) = (engine.clone(), start.clone(), set.to_vec());
            std::thread::spawn(move || {
                let me = set[i % set.len()];
                let others: Vec<UserId> = set.iter().copied().filter(|u| *u != me).collect();
                start.wait();
                block_on(engine.open_dm(me, ws, others))
                    .map(|(c, created)| (c.id, created))
                    .map_err(|e| format!("{me} opening {set:?}: {e}"))
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

// Every caller that opens a DM or group DM while others open the same one at the same
// moment gets that one channel, already usable (its members committed): exactly one call
// creates it, and none answers "not found".
#[test]
fn concurrent_dm_opens_all_get_the_one_channel() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path());
    let users: Vec<UserId> = (0..DM_USERS)
        .map(|i| {
            let email = format!("d{i}@example.com");
            block_on(engine.create_user(&email, &format!("D {i}"), "hash"))
                .unwrap()
                .id
        })
        .collect();
    let ws = block_on(engine.create_workspace(users[0], "acme"))
        .unwrap()
        .id;
    for i in 1..DM_USERS {
        block_on(engine.add_member(users[0], ws, &format!("d{i}@example.com"))).unwrap();
    }
    // Every pair, then group DMs of three and more, each new set opened by all at once.
    let mut sets: Vec<Vec<UserId>> = Vec::new();
    for a in 0..DM_USERS {
        for b in a + 1..DM_USERS {
            sets.push(vec![users[a], users[b]]);
        }
    }
    for n in 3..DM_USERS {
        sets.push(users[..n].to_vec());
        sets.push(users[DM_USERS - n..].to_vec());
    }
    sets.push(users.clone());
    for set in &sets {
        let answers = open_at_once(&engine, ws, set);
        let failed: Vec<&String> = answers.iter().filter_map(|r| r.as_ref().err()).collect();
        assert!(
            failed.is_empty(),
            "{} of {DM_OPENERS} opens failed: {failed:?}",
            failed.len()
        );
        let ids: BTreeSet<ChannelId> = answers.iter().map(|r| r.as_ref().unwrap().0).collect();
        assert_eq!(ids.len(), 1, "{set:?} opened as {ids:?}");
        let created = answers.iter().filter(|r| r.as_ref().unwrap().1).count();
        assert_eq!(created, 1, "{set:?} created {created} times");
        let c = *ids.first().unwrap();
        for u in set {
            let view = block_on(engine.channel(*u, c)).expect("a member sees the channel");
            assert_eq!(
                view.last_seq,
                set.len() as u64,
                "{set:?}: one join per member"
            );
        }
    }
    engine.shutdown();
}

/// Admins adding the same user at once, in the refusal test.
const ADDERS: usize = 8;
/// Users added, one after another, in the refusal test.
const ADDED_USERS: usize = 12;

// A refusal is never ahead of what the caller can read next: whoever hears that a user is
// "already a member" finds that user in the member list at once, on any shard, just as
// the caller whose add succeeded does.
#[test]
fn already_a_member_is_answered_only_once_every_shard_knows() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path());
    // Users on every home shard (a test thread's calls go to its user's home shard), so the
    // member list is read from every replica.
    let readers: Vec<UserId> = (0..SHARDS)
        .map(|i| {
            block_on(engine.create_user(&format!("o{i}@example.com"), "O", "hash"))
                .unwrap()
                .id
        })
        .collect();
    let ws = block_on(engine.create_workspace(readers[0], "acme"))
        .unwrap()
        .id;
    for i in 1..SHARDS {
        block_on(engine.add_member(readers[0], ws, &format!("o{i}@example.com"))).unwrap();
    }
    let users: Vec<UserView> = (0..ADDED_USERS)
        .map(|i| block_on(engine.create_user(&format!("n{i}@example.com"), "N", "hash")).unwrap())
        .collect();
    let homes: BTreeSet<u64> = readers.iter().map(|u| u.0 % SHARDS as u64).collect();
    assert_eq!(homes.len(), SHARDS, "a reader on every shard");
    // The workspace's owner adds; the readers read, each on its home shard.
    for u in &users {
        let start = Arc::new(Barrier::new(ADDERS));
        let threads: Vec<_> = (0..ADDERS)
            .map(|i| {
                let (engine, start, email) = (engine.clone(), start.clone(), u.email.clone());
                let (adder, reader) = (readers[0], readers[i % readers.len()]);
                std::thread::spawn(move || {
                    start.wait();
                    let added = block_on(engine.add_member(adder, ws, &email));
                    let members = block_on(engine.members(reader, ws)).unwrap();
                    (added.is_ok(), members.iter().any(|m| m.email == email))
                })
            })
            .collect();
        let answers: Vec<(bool, bool)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(
            answers.iter().filter(|a| a.0).count(),
            1,
            "{}: one add",
            u.email
        );
        assert!(
            answers.iter().all(|a| a.1),
            "{}: a caller did not find the member it was told of: {answers:?}",
            u.email
        );
    }
    engine.shutdown();
}
