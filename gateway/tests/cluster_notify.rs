//! Pushes and email digests on a cluster (`API.md` §13 and §15), against three real
//! `chorus` processes, a push gateway sink and an SMTP server on loopback: every node
//! decides, only the directory's leader sends, and the others answer what it confirmed
//! (`chorus_notify::cluster`). So a message is pushed once, not once per node; when the
//! sending node dies, the next leader sends what is left and not what was sent.

mod common;

use common::push_sink::Sink;
use common::smtp::Smtp;
use common::{
    cluster_add_member, cluster_signup, settled, str_of, ClusterConfig, Server, User, UNLIMITED,
};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// How long anything here may take.
const WAIT: Duration = Duration::from_secs(30);
/// After the last expected push arrived, how long a repeat may still take to show.
const SETTLE: Duration = Duration::from_secs(2);

/// Nodes `ids` of `config`'s cluster, pushing to `sink`.
fn pushing_nodes(sink: &Sink, config: &ClusterConfig, ids: &[usize]) -> Vec<Server> {
    let extra = format!("{UNLIMITED}push_gateway_url = \"{}\"\n", sink.url);
    (ids.iter())
        .map(|&id| Server::start(&config.node_in(id, ids, &extra)))
        .collect()
}

/// Registers a push device of `user`'s with `key`, through node `s`.
fn push_device(s: &Server, user: &User, key: &str) {
    let r = settled(|| {
        let body = json!({"app_id": "chat.chorus", "pushkey": key, "platform": "fcm"});
        s.call(
            "POST",
            "/api/v1/me/push-devices",
            Some(&user.token),
            Some(body),
        )
    });
    assert_eq!(r.status, 201, "{}", r.text);
}

/// Posts `text` through node `s`; the message's ID.
fn post(s: &Server, user: &User, cid: &str, text: &str) -> String {
    let r = settled(|| {
        let path = format!("/api/v1/channels/{cid}/messages");
        s.call(
            "POST",
            &path,
            Some(&user.token),
            Some(json!({"text": text})),
        )
    });
    assert_eq!(r.status, 201, "{}", r.text);
    str_of(&r.body["message"]["id"])
}

/// The node (1-based) that leads the directory, as node `s` sees it once one is known.
fn directory_leader(s: &Server, user: &User) -> usize {
    let deadline = Instant::now() + WAIT;
    loop {
        let r = s.call("GET", "/api/v1/cluster", Some(&user.token), None);
        if let Some(leader) = r.body["directory"]["leader"].as_u64() {
            return leader as usize;
        }
        assert!(Instant::now() < deadline, "no directory leader: {}", r.text);
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How many pushes the sink took per message ID.
fn per_message(sink: &Sink) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for body in sink.accepted() {
        *counts
            .entry(str_of(&body["notification"]["event_id"]))
            .or_default() += 1;
    }
    counts
}

/// Waits until every node in `live` has answered every item in its outbox: the sending
/// node by sending, the others by what it confirmed.
fn outboxes_drained(nodes: &[Server], live: &[usize]) {
    let deadline = Instant::now() + WAIT;
    for &i in live {
        while nodes[i].metric("chorus_notify_outbox_depth") != 0.0 {
            assert!(
                Instant::now() < deadline,
                "node {} still holds {} items",
                i + 1,
                nodes[i].metric("chorus_notify_outbox_depth")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The sum of a metric over the nodes still running.
fn metric_sum(nodes: &[Server], live: &[usize], name: &str) -> f64 {
    live.iter().map(|&i| nodes[i].metric(name)).sum()
}

// Mentions posted through every node are pushed once each; the sending node (the
// directory's leader) is then SIGKILLed, and the next one pushes the later mentions once
// each without repeating the earlier ones; restarted, the killed node (which decided the
// later mentions again from its logs) repeats none of them either.
#[test]
fn a_cluster_pushes_each_message_once_across_the_senders_death() {
    let sink = Sink::start();
    let config = ClusterConfig::three();
    let mut nodes = pushing_nodes(&sink, &config, &[1, 2, 3]);
    let (alice, bob, _, cid) = common::cluster_pair(&nodes[0]);
    push_device(&nodes[2], &bob, "key-bob");

    let mention =
        |s: &Server, text: String| post(s, &alice, &cid, &format!("<@{}> {text}", bob.id));
    let mut before = Vec::new();
    for i in 0..12 {
        before.push(mention(&nodes[i % 3], format!("before {i}")));
    }
    for id in &before {
        sink.wait_for(id, "key-bob");
    }
    std::thread::sleep(SETTLE);
    let counts = per_message(&sink);
    for id in &before {
        assert_eq!(counts[id], 1, "pushed once, not once per node: {counts:?}");
    }
    let live: Vec<usize> = (0..3).collect();
    outboxes_drained(&nodes, &live);
    let elsewhere = metric_sum(&nodes, &live, "chorus_notify_answered_elsewhere_total");
    assert!(
        elsewhere >= 24.0,
        "the two other nodes answered their items unsent: {elsewhere}"
    );

    // The sending node dies; a survivor takes over.
    let leader = directory_leader(&nodes[0], &alice);
    nodes[leader - 1].kill();
    let live: Vec<usize> = (0..3).filter(|i| *i != leader - 1).collect();
    let mut after = Vec::new();
    for i in 0..12 {
        let through = &nodes[live[i % 2]];
        after.push(mention(through, format!("after {i}")));
    }
    for id in &after {
        sink.wait_for(id, "key-bob");
    }
    std::thread::sleep(SETTLE);
    let counts = per_message(&sink);
    for id in &before {
        assert_eq!(
            counts[id], 1,
            "a push the dead leader sent is not sent again: {counts:?}"
        );
    }
    for id in &after {
        assert_eq!(counts[id], 1, "pushed once after the failover: {counts:?}");
    }
    outboxes_drained(&nodes, &live);

    // The killed node comes back; whether or not it leads the directory again, it sends
    // nothing the others sent.
    nodes[leader - 1].restart();
    let deadline = Instant::now() + WAIT;
    while nodes[leader - 1]
        .call("GET", "/api/v1/cluster", Some(&alice.token), None)
        .status
        != 200
    {
        assert!(
            Instant::now() < deadline,
            "the restarted node never answered"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let last = mention(&nodes[leader - 1], "after the restart".into());
    sink.wait_for(&last, "key-bob");
    std::thread::sleep(SETTLE * 2);
    let counts = per_message(&sink);
    // (`last` may go out twice if the directory moves back to the restarted node while
    // it is sent: the bound of a change of sending node.)
    for id in before.iter().chain(&after) {
        assert_eq!(
            counts[id], 1,
            "nothing sent twice after the restart: {counts:?}"
        );
    }
    assert_eq!(
        counts.len(),
        25,
        "only messages sent were pushed: {counts:?}"
    );
    outboxes_drained(&nodes, &[0, 1, 2]);
}

// An email digest on a cluster: bob, offline, is mentioned through each of the three nodes
// within his digest window, and gets one digest listing the three messages, not one per
// node.
#[test]
fn a_cluster_sends_one_digest_per_window() {
    let Some(smtp) = Smtp::start() else {
        return;
    };
    let config = ClusterConfig::three();
    let nodes: Vec<Server> = (1..=3)
        .map(|id| Server::start(&config.node(id, &smtp.config())))
        .collect();
    let (alice, bob, wid, cid) = common::cluster_pair(&nodes[0]);
    let carol = cluster_signup(&nodes[2], "carol", None);
    cluster_add_member(&nodes[0], &alice, &wid, &carol);
    common::cluster_channel_member(&nodes[0], &alice, &cid, &carol);
    for (i, user) in [&bob, &carol].into_iter().enumerate() {
        let r = settled(|| {
            let body = json!({"email_digest_s": 2});
            let path = "/api/v1/me/notification-prefs";
            nodes[i].call("PATCH", path, Some(&user.token), Some(body))
        });
        assert_eq!(r.status, 200, "{}", r.text);
    }
    let mut ids = Vec::new();
    for (i, s) in nodes.iter().enumerate() {
        ids.push(post(s, &alice, &cid, &format!("<@{}> number {i}", bob.id)));
    }
    let (digest, _) = smtp.wait_for(&bob.email, 1);
    let text = digest["text"].as_str().unwrap_or_default();
    for i in 0..3 {
        assert!(text.contains(&format!("number {i}")), "{digest}");
    }
    // A barrier: a later digest to carol, decided after bob's, has arrived.
    post(&nodes[1], &alice, &cid, &format!("<@{}> barrier", carol.id));
    smtp.wait_for(&carol.email, 1);
    std::thread::sleep(Duration::from_millis(1500));
    let to_bob: Vec<Value> = smtp.to(&bob.email);
    assert_eq!(to_bob.len(), 1, "one digest, not one per node: {to_bob:?}");
    // The nodes that did not send answered their digests' items by what the sender
    // confirmed: none is left to be sent again by a later leader.
    outboxes_drained(&nodes, &[0, 1, 2]);
}

// A digest whose window is still open when the sending node dies is sent once, by the
// next one, with every message of the window.
#[test]
fn a_digest_open_when_the_sender_dies_is_sent_by_the_next() {
    let Some(smtp) = Smtp::start() else {
        return;
    };
    let config = ClusterConfig::three();
    let mut nodes: Vec<Server> = (1..=3)
        .map(|id| Server::start(&config.node(id, &smtp.config())))
        .collect();
    let (alice, bob, _, cid) = common::cluster_pair(&nodes[0]);
    let r = settled(|| {
        let body = json!({"email_digest_s": 3});
        let path = "/api/v1/me/notification-prefs";
        nodes[1].call("PATCH", path, Some(&bob.token), Some(body))
    });
    assert_eq!(r.status, 200, "{}", r.text);
    let leader = directory_leader(&nodes[0], &alice);
    let others: Vec<usize> = (0..3).filter(|i| *i != leader - 1).collect();
    for i in 0..2 {
        post(
            &nodes[others[i]],
            &alice,
            &cid,
            &format!("<@{}> open {i}", bob.id),
        );
    }
    // Every node has decided both (the leader's outbox is the one that would send).
    let deadline = Instant::now() + WAIT;
    while (0..3).any(|i| nodes[i].metric("chorus_notify_outbox_depth") < 2.0) {
        assert!(Instant::now() < deadline, "not decided on every node");
        std::thread::sleep(Duration::from_millis(20));
    }
    nodes[leader - 1].kill();
    let (digest, _) = smtp.wait_for(&bob.email, 1);
    let text = digest["text"].as_str().unwrap_or_default();
    assert!(
        text.contains("open 0") && text.contains("open 1"),
        "{digest}"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(smtp.to(&bob.email).len(), 1, "sent once");
    outboxes_drained(&nodes, &others);
}

// A node that joins a running cluster reads every log from its beginning; it decides only
// what is posted from its start on, not the history the cluster notified long ago.
#[test]
fn a_joining_node_does_not_decide_the_history() {
    let sink = Sink::start();
    let config = ClusterConfig::of(4);
    let mut nodes = pushing_nodes(&sink, &config, &[1, 2, 3]);
    let (alice, bob, _, cid) = common::cluster_pair(&nodes[0]);
    push_device(&nodes[2], &bob, "key-bob");
    let history: Vec<String> = (0..10)
        .map(|i| {
            post(
                &nodes[i % 3],
                &alice,
                &cid,
                &format!("<@{}> old {i}", bob.id),
            )
        })
        .collect();
    for id in &history {
        sink.wait_for(id, "key-bob");
    }
    // History: older than the decider's grace at node 4's first start.
    std::thread::sleep(chorus_notify::decider::FIRST_START_GRACE + Duration::from_secs(1));
    let joining = format!(
        "cluster_join = true\n{UNLIMITED}push_gateway_url = \"{}\"\n",
        sink.url
    );
    nodes.push(Server::start(&config.node_in(4, &[1, 2, 3, 4], &joining)));
    let r = nodes[0].call(
        "PUT",
        "/api/v1/cluster/members",
        None,
        Some(config.members_body(&[1, 2, 3, 4])),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    // Node 4 holds the channel's history, then decides a new mention (posted through it)
    // and answers it like the others.
    let deadline = Instant::now() + WAIT;
    let path = format!("/api/v1/channels/{cid}/messages?limit=200");
    loop {
        let r = nodes[3].call("GET", &path, Some(&alice.token), None);
        if r.status == 200 && r.body["messages"].as_array().is_some_and(|m| m.len() >= 10) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 4 never held the history: {}",
            r.text
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let new = post(&nodes[3], &alice, &cid, &format!("<@{}> new", bob.id));
    sink.wait_for(&new, "key-bob");
    // Node 4's decider reads its logs from the beginning: wait until it reached the new
    // mention and answered it (sent it, or heard it was sent).
    let decided_on_4 = || {
        nodes[3].metric("chorus_notify_answered_elsewhere_total")
            + nodes[3].metric("chorus_notify_pushes_sent_total")
    };
    let deadline = Instant::now() + WAIT;
    while decided_on_4() < 1.0 {
        assert!(
            Instant::now() < deadline,
            "node 4 never answered the new mention"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    outboxes_drained(&nodes, &[0, 1, 2, 3]);
    assert_eq!(decided_on_4(), 1.0, "node 4 decided the new mention only");
    std::thread::sleep(SETTLE);
    let counts = per_message(&sink);
    assert_eq!(counts.len(), 11, "{counts:?}");
    // (The new mention may go out twice if the directory moved to node 4 as it was sent.)
    assert!(
        history.iter().all(|id| counts[id] == 1),
        "each old mention pushed once, before node 4 came: {counts:?}"
    );
}

// A user active on one node is not pushed by the sending node, which is another: presence
// is the same on every node, and the decider asks it.
#[test]
fn a_user_active_on_another_node_is_not_pushed() {
    let sink = Sink::start();
    let config = ClusterConfig::three();
    let nodes = pushing_nodes(&sink, &config, &[1, 2, 3]);
    let (alice, bob, wid, cid) = common::cluster_pair(&nodes[0]);
    let carol = cluster_signup(&nodes[0], "carol", None);
    cluster_add_member(&nodes[0], &alice, &wid, &carol);
    common::cluster_channel_member(&nodes[0], &alice, &cid, &carol);
    push_device(&nodes[1], &bob, "key-bob");
    push_device(&nodes[1], &carol, "key-carol");
    // Bob is connected, active, through a node that does not send.
    let sender = directory_leader(&nodes[0], &alice) - 1;
    let (bobs, posts) = ((sender + 1) % 3, (sender + 2) % 3);
    let (mut ws, _) = nodes[bobs].connect(&bob);
    ws.send(json!({"type": "presence:sub", "ref": "me", "op": "add", "user_ids": [bob.id]}));
    let ack = ws.recv_type("ack");
    assert_eq!(ack["users"][&bob.id]["status"], "online", "{ack}");
    // The sending node sees him online.
    let path = format!("/api/v1/workspaces/{wid}/presence?user_ids={}", bob.id);
    let deadline = Instant::now() + WAIT;
    loop {
        let r = nodes[sender].call("GET", &path, Some(&alice.token), None);
        if r.body["presence"][0]["status"] == "online" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "bob never online on the sender: {}",
            r.text
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let seen = post(&nodes[posts], &alice, &cid, &format!("<@{}> live", bob.id));
    // A barrier: a mention of carol, offline, decided after bob's, is pushed.
    let barrier = post(
        &nodes[posts],
        &alice,
        &cid,
        &format!("<@{}> away", carol.id),
    );
    sink.wait_for(&barrier, "key-carol");
    std::thread::sleep(SETTLE);
    assert_eq!(
        sink.count(&seen),
        0,
        "bob, active, was pushed: {:?}",
        sink.accepted()
    );
    // Once he is gone (a closed connection in its offline grace does not count), he is
    // pushed: a mention every half second until one is (the close must reach the sender).
    drop(ws);
    let deadline = Instant::now() + WAIT;
    let mut later = Vec::new();
    while !later.iter().any(|m: &String| sink.count(m) > 0) {
        assert!(Instant::now() < deadline, "bob, gone, was never pushed");
        later.push(post(
            &nodes[posts],
            &alice,
            &cid,
            &format!("<@{}> later", bob.id),
        ));
        std::thread::sleep(Duration::from_millis(500));
    }
}
