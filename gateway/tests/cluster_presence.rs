//! Presence across the nodes of a cluster (`API.md` §10 and §15: every node serves the
//! whole API), over three `chorus serve` processes: a watcher on one node sees a user
//! connect, go idle and leave through another, and a mode chosen through a third; a
//! node's death ends its users' presence after the grace; a node restarted learns who is
//! connected elsewhere.

mod common;

use common::{cluster_signup, settled, str_of, ClusterConfig, Server, User, Ws, AUTH_UNLIMITED};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// A two-second grace and a short presence window.
const FAST: &str = "presence_offline_grace_s = 2\npresence_flush_ms = 50\n";

/// How long anything here may take to show.
const WAIT: Duration = Duration::from_secs(20);

/// Waits for a `presence` frame that shows `user` as `status`, and returns its presence.
#[track_caller]
fn sees(ws: &mut Ws, user: &User, status: &str, what: &str) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let frame = ws.recv_type_within("presence", left);
        let Some(frame) = frame else {
            panic!("no presence frame showed {what} within {WAIT:?}");
        };
        let p = &frame["users"][&user.id];
        if p["status"] == status {
            return p.clone();
        }
    }
}

/// What `user` shows to `asker` through `s` (`GET .../presence`).
fn status_through(s: &Server, asker: &User, wid: &str, user: &User) -> String {
    let path = format!("/api/v1/workspaces/{wid}/presence?user_ids={}", user.id);
    let r = settled(|| s.call("GET", &path, Some(&asker.token), None));
    assert_eq!(r.status, 200, "{}", r.text);
    str_of(&r.body["presence"][0]["status"])
}

/// Waits until `user` shows `status` to `asker` through `s`.
#[track_caller]
fn shows_through(s: &Server, asker: &User, wid: &str, user: &User, status: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let now = status_through(s, asker, wid, user);
        if now == status {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} shows {now}, not {status}, through {}",
            user.email,
            s.base_url()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_watcher_sees_users_of_other_nodes_and_a_dead_node_ends_its_users_presence() {
    let config = ClusterConfig::three();
    let settings = format!("{AUTH_UNLIMITED}{FAST}");
    let mut nodes: Vec<Server> = (1..=3)
        .map(|id| Server::start(&config.node(id, &settings)))
        .collect();
    let (alice, bob, carol) = (
        cluster_signup(&nodes[0], "alice", None),
        cluster_signup(&nodes[1], "bob", None),
        cluster_signup(&nodes[2], "carol", None),
    );
    let r = settled(|| {
        let body = json!({"name": "acme"});
        nodes[0].call("POST", "/api/v1/workspaces", Some(&alice.token), Some(body))
    });
    assert_eq!(r.status, 201, "{}", r.text);
    let wid = str_of(&r.body["workspace"]["id"]);
    for u in [&bob, &carol] {
        let path = format!("/api/v1/workspaces/{wid}/members");
        let body = json!({"email": u.email});
        let r = settled(|| nodes[0].call("POST", &path, Some(&alice.token), Some(body.clone())));
        assert_eq!(r.status, 201, "{}", r.text);
    }
    // Every node has taken each peer's presence, on each of its two shards, once: from
    // now on what changes travels as it changes.
    for s in &nodes {
        let deadline = Instant::now() + WAIT;
        while s.metric("chorus_presence_snapshots_total") < 4.0 {
            assert!(Instant::now() < deadline, "presence never synchronized");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // Bob watches Alice from node 2; every node knows they share the workspace first.
    for s in &nodes {
        assert_eq!(status_through(s, &bob, &wid, &alice), "offline");
    }
    let (mut watcher, _) = nodes[1].connect(&bob);
    watcher.send(json!({"type": "presence:sub", "ref": "w", "user_ids": [alice.id]}));
    let ack = watcher.recv_type("ack");
    assert_eq!(ack["users"][&alice.id]["status"], "offline", "{ack}");

    // Alice connects through node 1: online on node 2's watcher and through node 3.
    let (mut alice_ws, _) = nodes[0].connect(&alice);
    sees(
        &mut watcher,
        &alice,
        "online",
        "alice online through node 1",
    );
    shows_through(&nodes[2], &bob, &wid, &alice, "online");
    // Idle there: away.
    alice_ws.send(json!({"type": "activity", "state": "idle"}));
    sees(&mut watcher, &alice, "away", "alice idle on node 1");
    // A mode chosen through node 3 shows on node 2, and a later one through node 2 wins.
    let dnd = json!({"mode": "dnd", "dnd_until": null});
    let r = settled(|| {
        nodes[2].call(
            "PUT",
            "/api/v1/me/presence",
            Some(&alice.token),
            Some(dnd.clone()),
        )
    });
    assert_eq!(r.status, 200, "{}", r.text);
    sees(
        &mut watcher,
        &alice,
        "dnd",
        "alice's dnd chosen through node 3",
    );
    shows_through(&nodes[0], &bob, &wid, &alice, "dnd");
    let auto = json!({"mode": "auto"});
    let r = nodes[1].call("PUT", "/api/v1/me/presence", Some(&alice.token), Some(auto));
    assert_eq!(r.status, 200, "{}", r.text);
    sees(
        &mut watcher,
        &alice,
        "away",
        "alice back in auto through node 2",
    );
    shows_through(&nodes[2], &bob, &wid, &alice, "away");
    watcher.ping("still here");

    // She leaves: offline once the grace is over, not before.
    let left = Instant::now();
    drop(alice_ws);
    sees(&mut watcher, &alice, "offline", "alice gone from node 1");
    assert!(
        left.elapsed() >= Duration::from_millis(1500),
        "offline after {:?}, within the two-second grace",
        left.elapsed()
    );
    shows_through(&nodes[2], &bob, &wid, &alice, "offline");

    // Offline, she chooses dnd through node 1, then auto through node 3, where nothing of
    // hers is left to keep; connected again through node 1, she is online, not dnd.
    for (i, mode) in [(0, "dnd"), (2, "auto")] {
        let body = json!({ "mode": mode });
        let r = nodes[i].call("PUT", "/api/v1/me/presence", Some(&alice.token), Some(body));
        assert_eq!(r.status, 200, "{}", r.text);
    }
    // Carol connects through node 3 and stays; Alice again through node 1, which dies.
    let (mut carol_ws, _) = nodes[2].connect(&carol);
    shows_through(&nodes[0], &bob, &wid, &carol, "online");
    let (_alice_again, _) = nodes[0].connect(&alice);
    let p = sees(&mut watcher, &alice, "online", "alice back on node 1");
    assert_eq!(p["dnd_until"], Value::Null, "{p}");
    shows_through(&nodes[0], &bob, &wid, &alice, "online");
    watcher.ping("before the kill");
    let killed = Instant::now();
    nodes[0].kill();
    sees(&mut watcher, &alice, "offline", "alice's node dead");
    eprintln!("alice offline {:?} after her node died", killed.elapsed());
    // Node 1 restarted knows nobody connected; it learns Carol is, on node 3.
    nodes[0].restart();
    carol_ws.ping("carol still here");
    shows_through(&nodes[0], &bob, &wid, &carol, "online");
    let (mut late, _) = nodes[0].connect(&bob);
    late.send(json!({"type": "presence:sub", "ref": "l", "user_ids": [carol.id]}));
    let ack = late.recv_type("ack");
    assert_eq!(ack["users"][&carol.id]["status"], "online", "{ack}");
    // And its own users reach the others again.
    let (_alice_third, _) = nodes[0].connect(&alice);
    sees(
        &mut watcher,
        &alice,
        "online",
        "alice on the restarted node 1",
    );
}
