//! End-to-end tests of presence (`API.md` §10) against the real `chorus` binary over real
//! sockets: what a watcher sees as users connect, go idle, set modes and leave; the offline
//! grace; the coalescing of bursts; isolation between workspaces; and the limits.
//!
//! The servers run with a short grace and presence window. Reads have a timeout, so a
//! missing frame fails the test. Where a test must know that the owner has heard a report,
//! the reporting connection watches its own user: the ack travels the same ordered path
//! as the report, after it.

mod common;

use common::{Server, User, Ws, AUTH_UNLIMITED};
use serde_json::{json, Value};
use std::time::{Duration, Instant, SystemTime};

/// One-second grace, 50 ms window.
const FAST: &str = "presence_offline_grace_s = 1\npresence_flush_ms = 50\n";

/// A server with alice and bob in one workspace; returns it with the workspace's ID.
fn pair(config: &str) -> (Server, User, User, String) {
    let server = Server::start(&format!("{AUTH_UNLIMITED}{config}"));
    let alice = server.signup("alice");
    let bob = server.signup("bob");
    let wid = server.workspace(&alice, &[&bob]);
    (server, alice, bob, wid)
}

/// Sends `presence:sub` and returns the ack's users.
#[track_caller]
fn sub(ws: &mut Ws, op: &str, ids: &[&str]) -> Value {
    let reference = format!("sub-{}", ids.len());
    ws.send(json!({"type": "presence:sub", "ref": reference, "op": op, "user_ids": ids}));
    let ack = ws.recv_type("ack");
    assert_eq!(ack["ref"], reference, "{ack}");
    ack["users"].clone()
}

/// A connection of `watcher` that watches `users`, with the ack checked to say `offline`.
#[track_caller]
fn watching(server: &Server, watcher: &User, users: &[&User]) -> Ws {
    let (mut ws, _) = server.connect(watcher);
    let ids: Vec<&str> = users.iter().map(|u| u.id.as_str()).collect();
    let acked = sub(&mut ws, "set", &ids);
    for u in users {
        assert_eq!(acked[&u.id]["status"], "offline", "{acked}");
    }
    ws
}

/// The next `presence` frame: it must name `user`; returns that user's presence.
#[track_caller]
fn next_presence(ws: &mut Ws, user: &User) -> Value {
    let frame = ws.recv_type("presence");
    let p = frame["users"][&user.id].clone();
    assert!(
        p.is_object(),
        "a presence frame without {}: {frame}",
        user.id
    );
    assert_eq!(p["user_id"], user.id.as_str());
    p
}

/// The status `user` shows, as the owner knows it after every report this connection of
/// theirs made before (see the module documentation).
#[track_caller]
fn own_status(ws: &mut Ws, user: &User) -> String {
    let acked = sub(ws, "add", &[&user.id]);
    common::str_of(&acked[&user.id]["status"])
}

fn activity(ws: &mut Ws, state: &str) {
    ws.send(json!({"type": "activity", "state": state}));
}

fn set_presence(server: &Server, user: &User, body: Value) -> Value {
    server.ok("PUT", "/api/v1/me/presence", user, Some(body), 200)["presence"].clone()
}

// A user is online when a connection opens, away once it reports idle, online again when
// active, and the frames carry the presence object of API.md.
#[test]
fn presence_online_away_online() {
    let (server, alice, bob, _) = pair(FAST);
    let mut watcher = watching(&server, &alice, &[&bob]);
    let (mut b, _) = server.connect(&bob);
    let p = next_presence(&mut watcher, &bob);
    assert_eq!(p["status"], "online");
    assert!(p["last_active_at"].is_string(), "{p}");
    assert!(p["dnd_until"].is_null());
    activity(&mut b, "idle");
    assert_eq!(next_presence(&mut watcher, &bob)["status"], "away");
    activity(&mut b, "active");
    assert_eq!(next_presence(&mut watcher, &bob)["status"], "online");
}

// Presence is the aggregate of every connection: online while any is active, away only
// when all are idle; a connection going away leaves the others' state.
#[test]
fn presence_aggregates_connections() {
    let (server, alice, bob, _) = pair(FAST);
    let mut watcher = watching(&server, &alice, &[&bob]);
    let (mut b1, _) = server.connect(&bob);
    assert_eq!(next_presence(&mut watcher, &bob)["status"], "online");
    let (mut b2, _) = server.connect(&bob);
    activity(&mut b1, "idle");
    assert_eq!(own_status(&mut b1, &bob), "online", "b2 is still active");
    activity(&mut b2, "idle");
    assert_eq!(next_presence(&mut watcher, &bob)["status"], "away");
    assert_eq!(own_status(&mut b2, &bob), "away");
    activity(&mut b1, "active");
    assert_eq!(next_presence(&mut watcher, &bob)["status"], "online");
    // The active connection closes: the idle one that stays makes bob away.
    drop(b1);
    assert_eq!(next_presence(&mut watcher, &bob)["status"], "away");
    assert_eq!(own_status(&mut b2, &bob), "away");
}

// dnd shows with its end, and when dnd_until passes the user is back to auto (online)
// without any request: the owner's timer sends the transition.
#[test]
fn presence_dnd_expires() {
    let (server, alice, bob, _) = pair(FAST);
    let mut watcher = watching(&server, &alice, &[&bob]);
    let (_b, _) = server.connect(&bob);
    assert_eq!(next_presence(&mut watcher, &bob)["status"], "online");
    let until = humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(2));
    let own = set_presence(
        &server,
        &bob,
        json!({"mode": "dnd", "dnd_until": until.to_string()}),
    );
    assert_eq!(
        (own["status"].as_str(), own["mode"].as_str()),
        (Some("dnd"), Some("dnd"))
    );
    let p = next_presence(&mut watcher, &bob);
    assert_eq!(p["status"], "dnd");
    let shown =
        humantime::parse_rfc3339(p["dnd_until"].as_str().expect("dnd_until")).expect("RFC 3339");
    assert_eq!(
        humantime::format_rfc3339_seconds(shown).to_string(),
        until.to_string()
    );
    let p = next_presence(&mut watcher, &bob);
    assert_eq!(p["status"], "online");
    assert!(p["dnd_until"].is_null());
    assert!(SystemTime::now() >= shown, "dnd ended before dnd_until");
    let own = set_presence(&server, &bob, json!({"mode": "dnd"}));
    assert_eq!(
        (own["status"].as_str(), own["mode"].as_str()),
        (Some("dnd"), Some("dnd"))
    );
    assert!(own["dnd_until"].is_null(), "dnd until changed: {own}");
    assert_eq!(next_presence(&mut watcher, &bob)["status"], "dnd");
}

// An invisible user is offline to everyone else, with no last activity shown, and comes
// back when they choose auto again; `away` mode shows away however active they are.
#[test]
fn presence_invisible_and_away_modes() {
    let (server, alice, bob, wid) = pair(FAST);
    let mut watcher = watching(&server, &alice, &[&bob]);
    let (_b, _) = server.connect(&bob);
    assert_eq!(next_presence(&mut watcher, &bob)["status"], "online");
    let own = set_presence(&server, &bob, json!({"mode": "invisible"}));
    assert_eq!(
        (own["status"].as_str(), own["mode"].as_str()),
        (Some("offline"), Some("invisible"))
    );
    let p = next_presence(&mut watcher, &bob);
    assert_eq!(p["status"], "offline");
    assert!(p["last_active_at"].is_null(), "{p}");
    let q = format!("/api/v1/workspaces/{wid}/presence?user_ids={}", bob.id);
    let listed = server.ok("GET", &q, &alice, None, 200);
    assert_eq!(listed["presence"][0]["status"], "offline");
    set_presence(&server, &bob, json!({"mode": "away"}));
    assert_eq!(next_presence(&mut watcher, &bob)["status"], "away");
    set_presence(&server, &bob, json!({"mode": "auto"}));
    assert_eq!(next_presence(&mut watcher, &bob)["status"], "online");
}

// When the last connection goes, the user stays as they were for the grace, then goes
// offline, never before; a reconnect within the grace sends nothing at all.
#[test]
fn presence_offline_after_grace_only() {
    let (server, alice, bob, _) = pair(FAST);
    let mut watcher = watching(&server, &alice, &[&bob]);
    let (b, _) = server.connect(&bob);
    assert_eq!(next_presence(&mut watcher, &bob)["status"], "online");
    // Closed 300 ms (six windows) before a reconnect, well within the one-second grace.
    drop(b);
    std::thread::sleep(Duration::from_millis(300));
    let (mut b, _) = server.connect(&bob);
    activity(&mut b, "idle");
    // The first frame after the reconnect is the idle: no offline, no second online.
    assert_eq!(next_presence(&mut watcher, &bob)["status"], "away");
    let closed = Instant::now();
    drop(b);
    let p = next_presence(&mut watcher, &bob);
    assert_eq!(p["status"], "offline");
    assert!(
        closed.elapsed() >= Duration::from_secs(1),
        "offline before the grace ended"
    );
    assert!(p["last_active_at"].is_string(), "{p}");
}

// A connection that sends nothing for two heartbeat intervals is closed (4002), which ends
// its presence: offline after the grace.
#[test]
fn presence_silent_connection_goes_offline() {
    let config = format!("{FAST}heartbeat_interval_s = 1\n");
    let (server, alice, bob, _) = pair(&config);
    let mut watcher = watching(&server, &alice, &[&bob]);
    let (mut b, _) = server.connect(&bob);
    assert_eq!(next_presence(&mut watcher, &bob)["status"], "online");
    // Alice pings to stay; bob says nothing and is closed with 4002.
    let pinger = std::thread::spawn(move || {
        let mut frames = Vec::new();
        for i in 0..6 {
            watcher.ping(&format!("p{i}"));
            std::thread::sleep(Duration::from_millis(500));
            frames.push(());
        }
        watcher
    });
    let (code, _, _) = b.recv_close();
    assert_eq!(code, 4002);
    let mut watcher = pinger.join().expect("pinger");
    assert_eq!(next_presence(&mut watcher, &bob)["status"], "offline");
}

// A burst of flips reaches a watcher as at most one frame per window, ending with the
// latest status; a change undone within a window sends nothing.
#[test]
fn presence_bursts_are_coalesced() {
    let config = "presence_offline_grace_s = 1\npresence_flush_ms = 300\n";
    let (server, alice, bob, _) = pair(config);
    let mut watcher = watching(&server, &alice, &[&bob]);
    let (mut b, _) = server.connect(&bob);
    assert_eq!(next_presence(&mut watcher, &bob)["status"], "online");
    // Undone at once: idle then active in one write.
    activity(&mut b, "idle");
    activity(&mut b, "active");
    assert_eq!(own_status(&mut b, &bob), "online");
    // A burst of 40 flips, ending idle.
    let started = Instant::now();
    for i in 0..40 {
        activity(&mut b, if i % 2 == 0 { "idle" } else { "active" });
        std::thread::sleep(Duration::from_millis(5));
    }
    activity(&mut b, "idle");
    assert_eq!(own_status(&mut b, &bob), "away");
    let burst = started.elapsed();
    let mut frames = Vec::new();
    loop {
        let p = next_presence(&mut watcher, &bob);
        frames.push(common::str_of(&p["status"]));
        if p["status"] == "away" && frames.len() > 1 || frames == ["away"] {
            // The latest status has arrived; a burst ends in at most one window more.
            break;
        }
    }
    let windows = burst.as_millis() / 300 + 2;
    assert!(
        frames.len() as u128 <= windows,
        "{} frames for a burst of {burst:?}: {frames:?}",
        frames.len()
    );
    assert_eq!(frames.last().map(String::as_str), Some("away"));
    // Nothing else follows: the next frame is the next real change.
    activity(&mut b, "active");
    assert_eq!(next_presence(&mut watcher, &bob)["status"], "online");
}

// Users who share no workspace with the watcher are offline to them and never change,
// over the WebSocket and REST; another workspace's presence is not found.
#[test]
fn presence_is_isolated_between_workspaces() {
    let (server, alice, bob, wid) = pair(FAST);
    let carol = server.signup("carol");
    let other = server.workspace(&carol, &[]);
    let mut watcher = watching(&server, &alice, &[&carol, &bob]);
    let (_c, _) = server.connect(&carol);
    set_presence(&server, &carol, json!({"mode": "dnd"}));
    let (_b, _) = server.connect(&bob);
    let frame = watcher.recv_type("presence");
    assert!(frame["users"].get(&carol.id).is_none(), "{frame}");
    assert_eq!(frame["users"][&bob.id]["status"], "online");
    let acked = sub(&mut watcher, "add", &[&carol.id]);
    assert_eq!(acked[&carol.id]["status"], "offline");
    assert!(acked[&carol.id]["last_active_at"].is_null());
    let q = format!(
        "/api/v1/workspaces/{wid}/presence?user_ids={},{}",
        carol.id, bob.id
    );
    let listed = server.ok("GET", &q, &alice, None, 200);
    let ids: Vec<&str> = listed["presence"]
        .as_array()
        .expect("presence")
        .iter()
        .map(|p| p["user_id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, [bob.id.as_str()], "carol is not a member: {listed}");
    assert!(listed["next_cursor"].is_null());
    let q = format!("/api/v1/workspaces/{other}/presence?user_ids={}", carol.id);
    server
        .call("GET", &q, Some(&alice.token), None)
        .assert_error(404, "not_found");
    // Carol's own view of herself is hers.
    let own = set_presence(&server, &carol, json!({"mode": "auto"}));
    assert_eq!(own["status"], "online");
}

// Every limit answers clearly: over 1,000 watched users per connection (at once or in
// total) is `too_many` and changes nothing, over 500 ids per query is 400 `too_many`; bad
// modes and times are 400.
#[test]
fn presence_limits() {
    let (server, alice, bob, wid) = pair(FAST);
    let (mut ws, _) = server.connect(&alice);
    // Valid IDs of users that do not exist are answered offline and cost a slot each.
    let ids: Vec<String> = (1..=1001)
        .map(|i| chorus_engine::ids::UserId(1 << 40 | i).to_string())
        .collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    ws.send(json!({"type": "presence:sub", "ref": "big", "user_ids": refs}));
    let e = ws.recv_type("error");
    assert_eq!(
        (e["ref"].as_str(), e["code"].as_str()),
        (Some("big"), Some("too_many"))
    );
    let acked = sub(&mut ws, "set", &refs[..1000]);
    assert_eq!(acked.as_object().map(|m| m.len()), Some(1000));
    ws.send(json!({"type": "presence:sub", "ref": "one", "op": "add", "user_ids": [bob.id]}));
    let e = ws.recv_type("error");
    assert_eq!(
        (e["ref"].as_str(), e["code"].as_str()),
        (Some("one"), Some("too_many"))
    );
    let removed = sub(&mut ws, "remove", &refs[..1]);
    assert_eq!(removed, json!({}));
    let acked = sub(&mut ws, "add", &[&bob.id]);
    assert_eq!(acked[&bob.id]["status"], "offline", "bob has no connection");
    ws.send(json!({"type": "presence:sub", "ref": "x", "op": "swap", "user_ids": []}));
    assert_eq!(ws.recv_type("error")["code"], "invalid_request");

    let q = format!(
        "/api/v1/workspaces/{wid}/presence?user_ids={}",
        refs[..501].join(",")
    );
    server
        .call("GET", &q, Some(&alice.token), None)
        .assert_error(400, "too_many");
    let q = format!(
        "/api/v1/workspaces/{wid}/presence?user_ids={}",
        refs[..500].join(",")
    );
    let listed = server.ok("GET", &q, &alice, None, 200);
    assert_eq!(listed["presence"], json!([]), "none of them is a member");
    let put =
        |body: Value| server.call("PUT", "/api/v1/me/presence", Some(&alice.token), Some(body));
    put(json!({"mode": "busy"})).assert_error(400, "invalid_request");
    put(json!({"mode": "dnd", "dnd_until": "2001-01-01T00:00:00Z"}))
        .assert_error(400, "invalid_request");
    put(json!({"mode": "dnd", "dnd_until": "tomorrow"})).assert_error(400, "invalid_request");
    put(json!({"mode": "away", "dnd_until": "2099-01-01T00:00:00Z"}))
        .assert_error(400, "invalid_request");
}

// Presence is never written anywhere: after a restart everyone is offline, and a mode
// chosen before it is forgotten (a user who was dnd comes back online in mode auto).
#[test]
fn presence_restart_starts_everyone_offline() {
    let (mut server, alice, bob, wid) = pair(FAST);
    let (b, _) = server.connect(&bob);
    let own = set_presence(&server, &bob, json!({"mode": "dnd"}));
    assert_eq!(own["status"], "dnd");
    drop(b);
    server.kill();
    server.restart();
    let q = format!(
        "/api/v1/workspaces/{wid}/presence?user_ids={},{}",
        bob.id, alice.id
    );
    let listed = server.ok("GET", &q, &alice, None, 200);
    let statuses: Vec<&str> = listed["presence"]
        .as_array()
        .expect("presence")
        .iter()
        .map(|p| p["status"].as_str().expect("status"))
        .collect();
    assert_eq!(statuses, ["offline", "offline"], "{listed}");
    assert!(listed["presence"][0]["last_active_at"].is_null());
    let mut watcher = watching(&server, &alice, &[&bob]);
    let (_b, _) = server.connect(&bob);
    assert_eq!(next_presence(&mut watcher, &bob)["status"], "online");
}
