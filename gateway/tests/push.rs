//! End-to-end tests of pushes (`API.md` §13, issue 16 steps 2–4) against the real `chorus`
//! binary: the decider, the outbox and the push sender, with the push gateway sink of
//! `common::push_sink` on loopback.
//!
//! "Nothing arrives" is checked after a barrier: a later message that must push, once it
//! arrived, plus a short grace, since the sender may answer items out of order.

mod common;

use common::push_sink::{Answer, Sink, ARRIVE_WAIT};
use common::{str_of, Server, User, Ws, UNLIMITED};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
/// The sender's bound on requests in flight (`chorus_notify::sender::IN_FLIGHT`).
const IN_FLIGHT: usize = 32;
/// After a barrier arrived, how long earlier pushes may still be on their way.
const SETTLE: Duration = Duration::from_millis(500);

fn server(sink: &Sink) -> Server {
    Server::start(&format!("{UNLIMITED}push_gateway_url = \"{}\"\n", sink.url))
}

/// A server pushing to `sink`, with alice and bob in a channel; answers the channel's ID.
fn pair(sink: &Sink) -> (Server, User, User, String) {
    let s = server(sink);
    let alice = s.signup("alice");
    let bob = s.signup("bob");
    let wid = s.workspace(&alice, &[&bob]);
    let cid = s.channel(&wid, &alice, "general", &[&bob]);
    (s, alice, bob, cid)
}

/// Registers a push device with pushkey `key`; returns its ID.
#[track_caller]
fn device(s: &Server, user: &User, key: &str) -> String {
    let body = json!({"app_id": "chat.chorus", "pushkey": key, "platform": "fcm"});
    let v = s.ok("POST", "/api/v1/me/push-devices", user, Some(body), 201);
    str_of(&v["device"]["id"])
}

/// Posts and returns the message's ID.
#[track_caller]
fn post(s: &Server, user: &User, cid: &str, text: &str) -> String {
    str_of(&s.post(user, cid, text)["id"])
}

/// A connection of `user` whose presence owner has heard it (its own status acked).
#[track_caller]
fn online(s: &Server, user: &User) -> Ws {
    let (mut ws, _) = s.connect(user);
    ws.send(json!({"type": "presence:sub", "ref": "me", "op": "add", "user_ids": [user.id]}));
    let ack = ws.recv_type("ack");
    assert_eq!(ack["users"][&user.id]["status"], "online", "{ack}");
    ws
}

// Who is pushed for one message, rule by rule: a mention to an offline member, with the
// Matrix push gateway body of API.md §13; a keyword; any message of a DM. And who is not:
// the author, a `none` level, a muted channel, an active connection, do-not-disturb
// mode (without a connection), a `mentions` level that is not named.
#[test]
fn push_goes_to_whom_the_rules_name() {
    let sink = Sink::start();
    let s = server(&sink);
    let names = [
        "alice", "bob", "carol", "dave", "erin", "frank", "gina", "harry", "ivan",
    ];
    let u: BTreeMap<&str, User> = names.iter().map(|n| (*n, s.signup(n))).collect();
    let others: Vec<&User> = names[1..].iter().map(|n| &u[n]).collect();
    let wid = s.workspace(&u["alice"], &others);
    let cid = s.channel(&wid, &u["alice"], "general", &others);
    for n in names {
        device(&s, &u[n], &format!("key-{n}"));
    }
    // carol wants nothing; dave muted the channel; gina has a keyword.
    s.ok(
        "PATCH",
        "/api/v1/me/notification-prefs",
        &u["carol"],
        Some(json!({"push": "none"})),
        200,
    );
    let path = format!("/api/v1/channels/{cid}/notification-prefs");
    s.ok("PUT", &path, &u["dave"], Some(json!({"muted": true})), 200);
    s.ok(
        "PATCH",
        "/api/v1/me/notification-prefs",
        &u["gina"],
        Some(json!({"keywords": ["Deploy"]})),
        200,
    );
    // erin is active; frank set do-not-disturb (and is not connected); ivan closed his
    // connection, and the offline grace (30 s by default) that still shows him online to
    // others does not stop his push.
    let _erin = online(&s, &u["erin"]);
    drop(online(&s, &u["ivan"]));
    std::thread::sleep(Duration::from_millis(300));
    s.ok(
        "PUT",
        "/api/v1/me/presence",
        &u["frank"],
        Some(json!({"mode": "dnd"})),
        200,
    );

    let mentioned: Vec<String> = ["alice", "bob", "carol", "dave", "erin", "frank", "ivan"]
        .iter()
        .map(|n| format!("<@{}>", u[n].id))
        .collect();
    let text = format!("{} the deploy is done", mentioned.join(" "));
    let m = post(&s, &u["alice"], &cid, &text);
    let n = sink.wait_for(&m, "key-bob");
    assert_eq!(n["room_id"], cid.as_str());
    assert_eq!(n["type"], "m.room.message");
    assert_eq!(n["sender"], u["alice"].id.as_str());
    assert_eq!(n["sender_display_name"], "alice");
    assert_eq!(n["room_name"], "general");
    assert_eq!(n["prio"], "high");
    assert_eq!(n["content"]["body"], text.as_str());
    assert_eq!(n["counts"]["unread"], 1);
    assert_eq!(
        n["devices"],
        json!([{"app_id": "chat.chorus", "pushkey": "key-bob"}])
    );
    // The keyword matches whole words in any case; harry (level mentions) is not named.
    let g = sink.wait_for(&m, "key-gina");
    assert_eq!(g["prio"], "high");
    sink.wait_for(&m, "key-ivan");

    // A DM pushes any message.
    let dm = s.ok(
        "POST",
        &format!("/api/v1/workspaces/{wid}/dms"),
        &u["alice"],
        Some(json!({"user_ids": [u["harry"].id]})),
        201,
    );
    let dm = str_of(&dm["channel"]["id"]);
    let d = post(&s, &u["alice"], &dm, "lunch?");
    let h = sink.wait_for(&d, "key-harry");
    assert_eq!(h["prio"], "high");
    assert_eq!(h["content"]["body"], "lunch?");

    // The barrier: a later push arrived, so every decision about `m` is made.
    let later = post(&s, &u["alice"], &cid, &format!("<@{}> later", u["bob"].id));
    sink.wait_for(&later, "key-bob");
    std::thread::sleep(SETTLE);
    assert_eq!(
        sink.count(&m),
        3,
        "only bob, gina, ivan: {:?}",
        sink.accepted()
    );
    assert_eq!(sink.count(&d), 1);
    assert_eq!(sink.count(&later), 1);
}

// An encrypted DM pushes any message as a DM does, and the push carries none of it: the
// server never reads ciphertext (API.md §14), so the body is empty and the ciphertext is
// nowhere in what the push gateway receives, whatever keyword it holds.
#[test]
fn an_encrypted_dm_pushes_without_its_ciphertext() {
    let sink = Sink::start();
    let (s, alice, bob, _) = pair(&sink);
    device(&s, &bob, "key-bob");
    s.ok(
        "PATCH",
        "/api/v1/me/notification-prefs",
        &bob,
        Some(json!({"keywords": ["zebrafish"]})),
        200,
    );
    let wid = str_of(&s.ok("GET", "/api/v1/me", &alice, None, 200)["workspaces"][0]["id"]);
    let dm = s.ok(
        "POST",
        &format!("/api/v1/workspaces/{wid}/dms"),
        &alice,
        Some(json!({"user_ids": [bob.id], "encrypted": true})),
        201,
    );
    let dm = str_of(&dm["channel"]["id"]);
    // Neither member has devices with keys: the channel's events are its two joins.
    let body = json!({"ciphertext": "CT-zebrafish-secret", "devices_seq": 2});
    let path = format!("/api/v1/channels/{dm}/messages");
    let m = s.ok("POST", &path, &alice, Some(body), 201);
    let m = str_of(&m["message"]["id"]);
    let n = sink.wait_for(&m, "key-bob");
    assert_eq!(n["content"]["body"], "");
    let everything = serde_json::to_string(&sink.accepted()).unwrap();
    assert!(!everything.contains("zebrafish"), "{everything}");
}

// The gateway failing (500s, then connections closed) delays pushes but loses none;
// what was read, or deleted, before the push could go out is dropped; an edit before it
// pushes the current text.
#[test]
fn pushes_wait_for_the_gateway_and_are_checked_again() {
    let sink = Sink::start();
    let (s, alice, bob, cid) = pair(&sink);
    device(&s, &bob, "key-bob");
    let mention = |text: &str| post(&s, &alice, &cid, &format!("<@{}> {text}", bob.id));

    sink.answer(Answer::Fail);
    let read = mention("read soon");
    sink.wait_attempts(2);
    let seq = s.last_seq(&bob, &cid);
    let mark = format!("/api/v1/channels/{cid}/read");
    s.ok("POST", &mark, &bob, Some(json!({"seq": seq})), 200);
    let edited = mention("first draft");
    let deleted = mention("oops");
    let late = mention("late but there");
    s.ok(
        "PATCH",
        &format!("/api/v1/channels/{cid}/messages/{edited}"),
        &alice,
        Some(json!({"text": format!("<@{}> final text", bob.id)})),
        200,
    );
    let r = s.call(
        "DELETE",
        &format!("/api/v1/channels/{cid}/messages/{deleted}"),
        Some(&alice.token),
        None,
    );
    assert_eq!(r.status, 204, "{}", r.text);
    let before = sink.attempts();
    sink.answer(Answer::Close);
    sink.wait_attempts(before + 3);
    assert!(sink.accepted().is_empty(), "{:?}", sink.accepted());
    sink.answer(Answer::Ok);

    let n = sink.wait_for(&late, "key-bob");
    assert_eq!(
        n["content"]["body"],
        format!("<@{}> late but there", bob.id)
    );
    let e = sink.wait_for(&edited, "key-bob");
    assert_eq!(e["content"]["body"], format!("<@{}> final text", bob.id));
    let barrier = mention("barrier");
    sink.wait_for(&barrier, "key-bob");
    std::thread::sleep(SETTLE);
    assert_eq!(sink.count(&read), 0, "read before the push: dropped");
    assert_eq!(sink.count(&deleted), 0, "deleted before the push: dropped");
    assert_eq!(sink.count(&late), 1);
    assert_eq!(sink.count(&edited), 1);
}

// A gateway that answers a push key as rejected gets that device removed; the user's
// other device stays.
#[test]
fn rejected_pushkeys_remove_their_device() {
    let sink = Sink::start();
    let (s, alice, bob, cid) = pair(&sink);
    let gone = device(&s, &bob, "key-gone");
    let kept = device(&s, &bob, "key-kept");
    sink.answer(Answer::Reject(vec!["key-gone".into()]));
    let m = post(&s, &alice, &cid, &format!("<@{}> hi", bob.id));
    sink.wait_for(&m, "key-gone");
    sink.wait_for(&m, "key-kept");
    let deadline = Instant::now() + ARRIVE_WAIT;
    loop {
        let v = s.ok("GET", "/api/v1/me/push-devices", &bob, None, 200);
        let ids: Vec<String> = v["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| str_of(&d["id"]))
            .collect();
        if ids == vec![kept.clone()] {
            break;
        }
        assert!(ids.contains(&gone), "{ids:?}");
        assert!(
            Instant::now() < deadline,
            "the rejected device stayed: {ids:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    sink.answer(Answer::Ok);
    let next = post(&s, &alice, &cid, &format!("<@{}> again", bob.id));
    sink.wait_for(&next, "key-kept");
    std::thread::sleep(SETTLE);
    assert_eq!(sink.count(&next), 1, "no push to the removed device");
}

// SIGKILL during a stream of mentions: after each restart every acknowledged message is
// pushed; a repeat happens only across a kill and carries the same event_id. Repeats are
// reported per kill.
#[test]
fn sigkill_loses_no_push() {
    const KILLS: usize = 3;
    const PER_ROUND: usize = 15;
    let sink = Sink::start();
    let (mut s, alice, bob, cid) = pair(&sink);
    device(&s, &bob, "key-bob");
    let mut sent: Vec<String> = Vec::new();
    let mut repeats = Vec::new();
    for round in 0..=KILLS {
        for i in 0..PER_ROUND {
            sent.push(post(
                &s,
                &alice,
                &cid,
                &format!("<@{}> {round}.{i}", bob.id),
            ));
        }
        if round == KILLS {
            break;
        }
        // Kill with pushes in flight: some answered, some not yet.
        std::thread::sleep(Duration::from_millis(round as u64 * 30));
        s.kill();
        s.restart();
        for id in &sent {
            sink.wait_for(id, "key-bob");
        }
        let accepted = sink.accepted();
        repeats.push(accepted.len() - count_distinct(&accepted));
    }
    for id in &sent {
        sink.wait_for(id, "key-bob");
    }
    std::thread::sleep(SETTLE);
    let accepted = sink.accepted();
    assert_eq!(
        count_distinct(&accepted),
        sent.len(),
        "every message pushed"
    );
    let mut per_id: BTreeMap<String, usize> = BTreeMap::new();
    for b in &accepted {
        *per_id
            .entry(str_of(&b["notification"]["event_id"]))
            .or_default() += 1;
    }
    let mut last = 0;
    for (kill, total) in repeats.iter().enumerate() {
        let these = total - last;
        eprintln!("kill {}: {these} repeated pushes", kill + 1);
        // At most the requests in flight at the kill, and those answered since the
        // sender last stored its cursor.
        assert!(these <= IN_FLIGHT, "kill {}: {these} repeats", kill + 1);
        last = *total;
    }
    let repeated: usize = per_id.values().map(|n| n - 1).sum();
    assert_eq!(repeated, last, "no repeat after the last kill");
    assert!(
        per_id.keys().all(|id| sent.contains(id)),
        "only messages sent: every repeat has a sent event_id"
    );
}

/// Waits until the `/metrics` sample `name` (without the `chorus_` prefix) is `value`:
/// the sender counts an answer just after the sink recorded it.
#[track_caller]
fn wait_metric(s: &Server, name: &str, value: f64) {
    let name = format!("chorus_{name}");
    let deadline = Instant::now() + ARRIVE_WAIT;
    loop {
        let now = s.metric(&name);
        if now == value {
            return;
        }
        assert!(Instant::now() < deadline, "{name} is {now}, not {value}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// The notify metrics count what the sender did, exactly: pushes sent (with one latency
// observation each, within the test's time), retried (one per 500 answer), dropped (read
// while the gateway failed), failed (a 400), rejected (the push key listed), and the
// outbox depth back at 0 once everything is answered.
#[test]
fn notify_metrics_count_each_push_outcome() {
    let started = Instant::now();
    let sink = Sink::start();
    let (s, alice, bob, cid) = pair(&sink);
    device(&s, &bob, "key-bob");
    let mention = |text: &str| post(&s, &alice, &cid, &format!("<@{}> {text}", bob.id));

    for i in 0..5 {
        let m = mention(&format!("hello {i}"));
        sink.wait_for(&m, "key-bob");
    }
    wait_metric(&s, "notify_pushes_sent_total", 5.0);
    wait_metric(&s, "notify_outbox_depth", 0.0);
    assert_eq!(s.metric("chorus_notify_push_latency_seconds_count"), 5.0);
    let sum = s.metric("chorus_notify_push_latency_seconds_sum");
    let max = s.metric("chorus_notify_push_latency_seconds_max");
    let elapsed = started.elapsed().as_secs_f64();
    assert!(
        max > 0.0 && max <= sum && sum <= 5.0 * elapsed,
        "{max} {sum}"
    );
    assert_eq!(s.metric("chorus_notify_pushes_retried_total"), 0.0);

    // The gateway fails: one mention is read meanwhile (dropped), the other waits.
    sink.answer(Answer::Fail);
    let read = mention("read soon");
    sink.wait_attempts(7);
    let seq = s.last_seq(&bob, &cid);
    let mark = format!("/api/v1/channels/{cid}/read");
    s.ok("POST", &mark, &bob, Some(json!({"seq": seq})), 200);
    let waits = mention("waits");
    sink.wait_attempts(sink.attempts() + 1);
    // The outbox holds what is not answered: the waiting mention (and the read one, until
    // its next attempt checks it again).
    assert!(s.metric("chorus_notify_outbox_depth") >= 1.0);
    sink.answer(Answer::Ok);
    sink.wait_for(&waits, "key-bob");
    wait_metric(&s, "notify_pushes_sent_total", 6.0);
    wait_metric(&s, "notify_pushes_dropped_total", 1.0);
    wait_metric(&s, "notify_outbox_depth", 0.0);
    assert_eq!(sink.count(&read), 0);
    let failed_answers = sink.attempts() - sink.accepted().len();
    assert!(failed_answers >= 2, "{failed_answers}");
    assert_eq!(
        s.metric("chorus_notify_pushes_retried_total"),
        failed_answers as f64,
        "one retry per 500"
    );
    assert_eq!(s.metric("chorus_notify_push_latency_seconds_count"), 6.0);

    // A 400 is given up; a rejected push key is counted, and neither is sent.
    sink.answer(Answer::Refuse);
    let before = sink.attempts();
    mention("refused");
    sink.wait_attempts(before + 1);
    wait_metric(&s, "notify_pushes_failed_total", 1.0);
    sink.answer(Answer::Reject(vec!["key-bob".into()]));
    let rejected = mention("rejected");
    sink.wait_for(&rejected, "key-bob");
    wait_metric(&s, "notify_pushes_rejected_total", 1.0);
    wait_metric(&s, "notify_outbox_depth", 0.0);
    assert_eq!(s.metric("chorus_notify_pushes_sent_total"), 6.0);
    assert_eq!(s.metric("chorus_notify_push_latency_seconds_count"), 6.0);
    assert_eq!(s.metric("chorus_notify_pushes_dropped_total"), 1.0);
    assert_eq!(s.metric("chorus_notify_pushes_failed_total"), 1.0);
}

// SIGKILL 20 times, at random moments, while a client posts a stream of mentions to an
// offline member with a push device: every acknowledged message is pushed, and a push
// repeats only across a kill, with the same event_id, never more than the sender's
// in-flight bound at one kill (the sender's cursor is stored without waiting for the
// disk, so a kill repeats what was in flight). The repeats per kill are printed for the
// design notes: 0.10-0.45 on average in our runs, but one run in about fifteen went past
// one per kill (a burst after a restart), so that is reported, not asserted.
#[test]
fn sigkill_20_times_during_a_stream_every_push_arrives() {
    use rand::Rng;
    const KILLS: usize = 20;
    let sink = Sink::start();
    let (mut s, alice, bob, cid) = pair(&sink);
    device(&s, &bob, "key-bob");
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poster = {
        let (acked, stop) = (acked.clone(), stop.clone());
        let url = format!("{}/api/v1/channels/{cid}/messages", s.base_url());
        let auth = format!("Bearer {}", alice.token);
        let bob_id = bob.id.clone();
        std::thread::spawn(move || {
            let agent = ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(5))
                .max_idle_connections(0)
                .build();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let body = json!({"text": format!("<@{bob_id}> {i}")});
                // A post cut off by a kill has no answer: it may or may not be committed,
                // so only acknowledged ones must be pushed.
                let request = agent
                    .post(&url)
                    .set("authorization", &auth)
                    .set("content-type", "application/json");
                match request.send_string(&body.to_string()) {
                    Ok(r) if r.status() == 201 => {
                        let text = r.into_string().expect("a body");
                        let v: Value = serde_json::from_str(&text).expect("json");
                        acked.lock().unwrap().push(str_of(&v["message"]["id"]));
                    }
                    _ => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        })
    };
    let mut rng = rand::thread_rng();
    // How many pushes the sink had taken at each kill, to charge each repeat to a kill.
    let mut marks = Vec::new();
    for _ in 0..KILLS {
        std::thread::sleep(Duration::from_millis(rng.gen_range(50..400)));
        s.kill();
        marks.push(sink.accepted().len());
        s.restart();
    }
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    poster.join().expect("poster");
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > KILLS, "a stream: {} acked", acked.len());
    for id in &acked {
        sink.wait_for(id, "key-bob");
    }
    let barrier = post(&s, &alice, &cid, &format!("<@{}> barrier", bob.id));
    sink.wait_for(&barrier, "key-bob");
    std::thread::sleep(SETTLE);
    let mut per_id: BTreeMap<String, usize> = BTreeMap::new();
    // A repeat at position j of a push last taken at i is charged to the last kill
    // between them (the one whose restart resent it); `age` is how many pushes before
    // that kill the sink had taken it.
    let mut last_at: BTreeMap<String, usize> = BTreeMap::new();
    let mut per_kill = vec![0usize; KILLS];
    let mut ages = Vec::new();
    for (j, b) in sink.accepted().iter().enumerate() {
        let n = &b["notification"];
        assert_eq!(n["devices"][0]["pushkey"], "key-bob");
        let id = str_of(&n["event_id"]);
        *per_id.entry(id.clone()).or_default() += 1;
        if let Some(i) = last_at.insert(id, j) {
            let kill = marks.iter().rposition(|&m| m > i && m <= j);
            let kill = kill.expect("a repeat only across a kill");
            per_kill[kill] += 1;
            ages.push(marks[kill] - i);
        }
    }
    eprintln!("repeats per kill: {per_kill:?}; taken this many pushes before the kill: {ages:?}");
    assert!(per_kill.iter().all(|&n| n <= IN_FLIGHT), "{per_kill:?}");
    assert!(acked.iter().all(|id| per_id.contains_key(id)));
    // Every repeat is counted by event_id: a repeated push carries its message's ID.
    let repeats: usize = per_id.values().map(|n| n - 1).sum();
    let most = per_id.values().max().copied().unwrap_or(0);
    eprintln!(
        "{} messages acked, {} pushed, {repeats} repeats over {KILLS} kills: {:.2} per kill (one message at most {most} times)",
        acked.len(),
        per_id.len(),
        repeats as f64 / KILLS as f64
    );
    assert!(
        repeats <= IN_FLIGHT * KILLS,
        "{repeats} repeats over {KILLS} kills"
    );
    assert!(most <= KILLS + 1, "a push repeats at most once per kill");
}

fn count_distinct(bodies: &[Value]) -> usize {
    let ids: std::collections::BTreeSet<String> = bodies
        .iter()
        .map(|b| str_of(&b["notification"]["event_id"]))
        .collect();
    ids.len()
}

// The committed-event consumers' threads (the notification decider, the search indexer,
// its extractor and the index writer's threads) run nicer than the rest of the server
// (the shards among it), so a fan-out or an indexing burst they work through for seconds
// yields the CPU to sends; the index writer's threads run only when idle (`SCHED_IDLE`),
// so an index commit gives up its core the moment a shard wakes. The push sender keeps the
// process's priority: its delay is what a crash repeats.
#[test]
fn consumer_threads_run_nicer_than_the_shards() {
    let sink = Sink::start();
    let s = server(&sink);
    // A name, niceness and scheduling policy from a `stat`: "tid (name) state …", the
    // niceness the 17th field after the name, the policy the 39th.
    let parse_all = |stat: &str| -> (String, i32, i32) {
        let open = stat.find('(').unwrap();
        let close = stat.rfind(')').unwrap();
        let rest: Vec<&str> = stat[close + 2..].split(' ').collect();
        let name = stat[open + 1..close].to_string();
        (name, rest[16].parse().unwrap(), rest[38].parse().unwrap())
    };
    let parse = |stat: &str| -> (String, i32) {
        let (name, nice, _) = parse_all(stat);
        (name, nice)
    };
    let policies = || -> Vec<(String, i32)> {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", s.pid())).expect("threads");
        tasks
            .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("stat")).ok())
            .map(|stat| {
                let (name, _, policy) = parse_all(&stat);
                (name, policy)
            })
            .collect()
    };
    let read_threads = || -> Vec<(String, i32)> {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", s.pid())).expect("threads");
        tasks
            .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("stat")).ok())
            .map(|stat| parse(&stat))
            .collect()
    };
    let main_stat = std::fs::read_to_string(format!("/proc/{}/stat", s.pid())).unwrap();
    let process = parse(&main_stat).1;
    let want = (process + chorus_engine::consumer::CONSUMER_NICE).min(19);
    let consumers = [
        "notify-decider",
        "search-indexer",
        "search-extract",
        "thrd-tantivy-in",
    ];
    // The consumers start once the engine is up.
    let deadline = Instant::now() + ARRIVE_WAIT;
    let mut threads = read_threads();
    let started = |threads: &[(String, i32)]| {
        (consumers.iter().chain(&["notify-push"])).all(|c| threads.iter().any(|(n, _)| n == c))
    };
    // A thread has its name from its spawn and lowers its priority first thing once it
    // runs: wait for both.
    let niced = |threads: &[(String, i32)]| {
        consumers.iter().all(|c| {
            let mut of = threads.iter().filter(|(n, _)| n == c).peekable();
            of.peek().is_some() && of.all(|(_, nice)| *nice == want)
        })
    };
    while !(started(&threads) && niced(&threads)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        threads = read_threads();
    }
    let nice_of = |named: &dyn Fn(&str) -> bool| -> Vec<i32> {
        (threads.iter())
            .filter(|(n, _)| named(n))
            .map(|(_, nice)| *nice)
            .collect()
    };
    for name in consumers {
        let nice = nice_of(&|n| n == name);
        assert!(!nice.is_empty(), "{name}: {threads:?}");
        assert!(nice.iter().all(|&n| n == want), "{name}: {threads:?}");
    }
    let push = nice_of(&|n| n == "notify-push");
    assert_eq!(push, vec![process], "{threads:?}");
    let shards = nice_of(&|n| n.starts_with("chorus-shard-"));
    assert!(!shards.is_empty(), "{threads:?}");
    assert!(shards.iter().all(|&n| n == process), "{threads:?}");
    // The policy is set right after the niceness, on the same thread.
    const SCHED_OTHER: i32 = 0;
    const SCHED_IDLE: i32 = 5;
    // The index writer's threads are idle-only: its segment updater, which lives as long
    // as the writer, shows it (its indexing worker is replaced at every commit, and one
    // started while the index was starved keeps the raised priority until then).
    let idle = ["segment_updater"];
    let mut policy = policies();
    let settled = |policy: &[(String, i32)]| {
        (policy.iter())
            .filter(|(n, _)| idle.contains(&n.as_str()))
            .all(|(_, p)| *p == SCHED_IDLE)
    };
    while !settled(&policy) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        policy = policies();
    }
    for (name, p) in &policy {
        let want = match idle.contains(&name.as_str()) {
            true => SCHED_IDLE,
            false => SCHED_OTHER,
        };
        let checked = idle.contains(&name.as_str())
            || name == "search-indexer"
            || name == "search-extract"
            || name == "notify-decider"
            || name == "notify-push"
            || name.starts_with("chorus-shard-");
        if checked {
            assert_eq!(*p, want, "{name}: {policy:?}");
        }
    }
    assert!(
        policy.iter().any(|(n, _)| n == "segment_updater"),
        "{policy:?}"
    );
}
