//! Read markers and unread counts (`API.md` §9) against the real binary on real sockets:
//! markers only move forward and never past a channel's last seq; the counts follow the
//! rules for replies, deletions, edits, own messages, `<@id>`, `@here`, `@channel` and DMs;
//! every marker change reaches every connection of its user as a `read` frame, whichever
//! shard it lives on; markers survive SIGKILL and a drained restart; and nothing of
//! another workspace is reachable.

mod common;

use common::{str_of, Server, User, Ws, UNLIMITED};
use serde_json::{json, Value};

/// `POST /channels/{cid}/read` as `user`; the raw answer.
fn mark(server: &Server, user: &User, cid: &str, body: Value) -> common::Resp {
    let path = format!("/api/v1/channels/{cid}/read");
    server.call("POST", &path, Some(&user.token), Some(body))
}

/// Marks `seq` read and returns the `read` object answered.
#[track_caller]
fn mark_ok(server: &Server, user: &User, cid: &str, seq: u64) -> Value {
    let r = mark(server, user, cid, json!({ "seq": seq }));
    assert_eq!(r.status, 200, "{}", r.text);
    r.body["read"].clone()
}

/// The caller's `read` object of one channel, from `GET /workspaces/{wid}/unreads`.
#[track_caller]
fn read_of(server: &Server, user: &User, wid: &str, cid: &str) -> Value {
    unreads(server, user, wid)
        .into_iter()
        .find(|r| r["channel_id"] == cid)
        .unwrap_or_else(|| panic!("{cid} is not in the unreads"))
}

/// Every `read` object of the caller in a workspace, following the cursor.
#[track_caller]
fn unreads(server: &Server, user: &User, wid: &str) -> Vec<Value> {
    let path = format!("/api/v1/workspaces/{wid}/unreads");
    let v = server.ok("GET", &path, user, None, 200);
    assert!(v["next_cursor"].is_null(), "{v}");
    v["unreads"].as_array().expect("unreads").clone()
}

/// `(read_seq, unread_count, mention_count)` of a `read` object.
fn counts(read: &Value) -> (u64, u64, u64) {
    let n = |k: &str| read[k].as_u64().unwrap_or_else(|| panic!("{k} in {read}"));
    (n("read_seq"), n("unread_count"), n("mention_count"))
}

/// Posts `body` (text, thread_id, ...) as `user`; returns the message.
#[track_caller]
fn post(server: &Server, user: &User, cid: &str, body: Value) -> Value {
    let path = format!("/api/v1/channels/{cid}/messages");
    server.ok("POST", &path, user, Some(body), 201)["message"].clone()
}

fn seq_of(message: &Value) -> u64 {
    message["seq"].as_u64().expect("seq")
}

// A marker starts at the member's join, moves forward only (a lower seq is a no-op that
// answers the current marker), refuses a seq above the channel's last_seq with 400, and
// refuses bodies that are not `{"seq": <unsigned integer>}` with 400.
#[test]
fn markers_move_forward_only() {
    let server = Server::start(UNLIMITED);
    let alice = server.signup("alice");
    let bob = server.signup("bob");
    let wid = server.workspace(&alice, &[&bob]);
    let cid = server.channel(&wid, &alice, "general", &[&bob]); // alice 1, bob 2
    assert_eq!(counts(&read_of(&server, &bob, &wid, &cid)), (2, 0, 0));
    assert_eq!(counts(&read_of(&server, &alice, &wid, &cid)), (1, 0, 0));
    for i in 0..3 {
        server.post(&alice, &cid, &format!("m{i}")); // 3, 4, 5
    }
    assert_eq!(counts(&read_of(&server, &bob, &wid, &cid)), (2, 3, 0));

    let read = mark_ok(&server, &bob, &cid, 4);
    assert_eq!(read["channel_id"], cid.as_str());
    assert_eq!(read["last_seq"], 5);
    assert_eq!(counts(&read), (4, 1, 0));
    // Lower or equal: nothing moves, and the answer is the marker as it stands.
    assert_eq!(counts(&mark_ok(&server, &bob, &cid, 1)), (4, 1, 0));
    assert_eq!(counts(&mark_ok(&server, &bob, &cid, 4)), (4, 1, 0));
    assert_eq!(counts(&read_of(&server, &bob, &wid, &cid)), (4, 1, 0));

    mark(&server, &bob, &cid, json!({"seq": 6})).assert_error(400, "invalid_request");
    for bad in [
        json!({"seq": -1}),
        json!({"seq": "5"}),
        json!({}),
        json!({"seq": 1.5}),
    ] {
        mark(&server, &bob, &cid, bad).assert_error(400, "invalid_json");
    }
    assert_eq!(counts(&mark_ok(&server, &bob, &cid, 5)), (5, 0, 0));
    mark(&server, &bob, "C0000nope", json!({"seq": 1})).assert_error(404, "not_found");
}

// unread_count counts the messages after the marker that others posted and that are not
// deleted, replies included; mention_count those that mention the caller by <@id>, @here
// or @channel (as the text stands after edits), and every one in a DM. Own messages move
// the poster's marker; channel objects carry the caller's read state; the unreads list
// pages with its cursor.
#[test]
fn counts_follow_the_rules() {
    let server = Server::start(UNLIMITED);
    let alice = server.signup("alice");
    let bob = server.signup("bob");
    let wid = server.workspace(&alice, &[&bob]);
    let cid = server.channel(&wid, &alice, "general", &[&bob]); // alice 1, bob 2
    let a = &alice.id;
    let at = |want: (u64, u64, u64)| {
        assert_eq!(counts(&read_of(&server, &alice, &wid, &cid)), want);
    };

    let root = post(&server, &bob, &cid, json!({"text": "hello"})); // 3
    at((1, 1, 0));
    post(&server, &bob, &cid, json!({ "text": format!("hi <@{a}>") })); // 4
    at((1, 2, 1));
    post(&server, &bob, &cid, json!({"text": "@here standup"})); // 5
    at((1, 3, 2));
    post(&server, &bob, &cid, json!({"text": "@channel: deploy"})); // 6
    at((1, 4, 3));
    let thread = str_of(&root["id"]);
    post(
        &server,
        &bob,
        &cid,
        json!({"text": "a reply", "thread_id": thread}),
    ); // 7
    at((1, 5, 3));
    let reply = json!({ "text": format!("<@{a}> in a thread"), "thread_id": thread });
    post(&server, &bob, &cid, reply); // 8
    at((1, 6, 4));

    // Posting moves the poster's marker: alice's own message counts for no one's badge
    // of hers, and a self-mention is no mention.
    let own = post(
        &server,
        &alice,
        &cid,
        json!({ "text": format!("<@{a}> note") }),
    ); // 9
    at((seq_of(&own), 0, 0));
    let bob_read = read_of(&server, &bob, &wid, &cid);
    assert_eq!(
        counts(&bob_read),
        (8, 1, 0),
        "bob posted up to 8; alice's 9 is unread"
    );

    let plain = post(&server, &bob, &cid, json!({"text": "later"})); // 10
    let mention = post(
        &server,
        &bob,
        &cid,
        json!({ "text": format!("<@{a}> later") }),
    ); // 11
    at((9, 2, 1));
    // Deleting a message after the marker lowers the counts.
    let path = format!("/api/v1/channels/{cid}/messages/{}", str_of(&mention["id"]));
    server.ok("DELETE", &path, &bob, None, 204); // 12
    at((9, 1, 0));
    // An edit that adds a mention adds it to the count; one that takes it away takes it.
    let path = format!("/api/v1/channels/{cid}/messages/{}", str_of(&plain["id"]));
    let edit = |text: String| server.ok("PATCH", &path, &bob, Some(json!({ "text": text })), 200);
    edit(format!("later, <@{a}>")); // 13
    at((9, 1, 1));
    edit("later, no one".into()); // 14
    at((9, 1, 0));

    // A DM counts every unread message as a mention.
    let dms = format!("/api/v1/workspaces/{wid}/dms");
    let dm = server.ok("POST", &dms, &bob, Some(json!({"user_ids": [a]})), 201);
    let dm = str_of(&dm["channel"]["id"]);
    post(&server, &bob, &dm, json!({"text": "psst"}));
    post(&server, &bob, &dm, json!({"text": "still there?"}));
    let dm_read = read_of(&server, &alice, &wid, &dm);
    assert_eq!(
        (
            dm_read["unread_count"].as_u64(),
            dm_read["mention_count"].as_u64()
        ),
        (Some(2), Some(2))
    );

    // Channel objects in the workspace's list carry the caller's read state; a public
    // channel the caller is not in has no marker.
    let other = server.channel(&wid, &bob, "random", &[]);
    let path = format!("/api/v1/workspaces/{wid}/channels");
    let list = server.ok("GET", &path, &alice, None, 200);
    let by_id = |id: &str| {
        list["channels"]
            .as_array()
            .expect("channels")
            .iter()
            .find(|c| c["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("{id} not listed"))
    };
    let general = by_id(&cid);
    assert_eq!(counts(&general), (9, 1, 0), "{general}");
    assert_eq!(general["last_seq"], 14);
    let random = by_id(&other);
    assert!(random["read_seq"].is_null(), "{random}");
    assert_eq!(
        (
            random["unread_count"].as_u64(),
            random["mention_count"].as_u64()
        ),
        (Some(0), Some(0))
    );

    // The unreads list has every channel alice is in, and pages with its cursor.
    let all = unreads(&server, &alice, &wid);
    let ids: Vec<&str> = all
        .iter()
        .map(|r| r["channel_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2, "{all:?}");
    assert!(ids.contains(&cid.as_str()) && ids.contains(&dm.as_str()));
    let path = format!("/api/v1/workspaces/{wid}/unreads?limit=1");
    let first = server.ok("GET", &path, &alice, None, 200);
    assert_eq!(first["unreads"].as_array().unwrap().len(), 1);
    let cursor = str_of(&first["next_cursor"]);
    let path = format!("/api/v1/workspaces/{wid}/unreads?limit=1&cursor={cursor}");
    let second = server.ok("GET", &path, &alice, None, 200);
    assert!(second["next_cursor"].is_null(), "{second}");
    let paged = [&first["unreads"][0], &second["unreads"][0]];
    assert_eq!(
        paged.map(|r| r["channel_id"].clone()),
        [all[0]["channel_id"].clone(), all[1]["channel_id"].clone()]
    );
    let path = format!("/api/v1/workspaces/{wid}/unreads?limit=0");
    server
        .call("GET", &path, Some(&alice.token), None)
        .assert_error(400, "invalid_request");
    let path = format!("/api/v1/workspaces/{wid}/unreads?cursor=nope");
    server
        .call("GET", &path, Some(&alice.token), None)
        .assert_error(400, "invalid_request");
}

/// Reads frames until a `read` frame of `cid` arrives; returns its `read` object.
#[track_caller]
fn next_read(ws: &mut Ws, cid: &str) -> Value {
    loop {
        let f = ws.recv_type("read");
        if f["read"]["channel_id"] == cid {
            return f["read"].clone();
        }
    }
}

// Every marker change (a read:mark, a REST mark, the user's own post) reaches every one of
// the user's connections as a `read` frame, over both shards; a mark that moves nothing
// sends none; read:mark is answered with ack {ref, read}, and bad input with an error.
#[test]
fn read_frames_reach_every_connection() {
    let server = Server::start(UNLIMITED);
    let alice = server.signup("alice");
    let bob = server.signup("bob");
    let wid = server.workspace(&alice, &[&bob]);
    let cid = server.channel(&wid, &alice, "general", &[&bob]);
    // Connections land on either shard by the kernel's choice: six make both likely.
    let mut conns: Vec<Ws> = (0..6).map(|_| server.connect(&alice).0).collect();
    for (i, ws) in conns.iter_mut().enumerate() {
        ws.ping(&format!("start{i}"));
    }
    for i in 0..4 {
        server.post(&bob, &cid, &format!("m{i}")); // 3..=6
    }

    conns[0].send(json!({"type": "read:mark", "ref": "r1", "channel_id": cid, "seq": 4}));
    let ack = conns[0].recv_type("ack");
    assert_eq!(ack["ref"], "r1");
    assert_eq!(counts(&ack["read"]), (4, 2, 0), "{ack}");
    for ws in conns.iter_mut() {
        assert_eq!(counts(&next_read(ws, &cid)), (4, 2, 0));
    }

    // A no-op mark is acknowledged with the marker as it is, and sends no frame: the next
    // frame each connection gets is the REST mark after it.
    conns[1].send(json!({"type": "read:mark", "ref": 7, "channel_id": cid, "seq": 3}));
    let ack = conns[1].recv_type("ack");
    assert_eq!(
        (ack["ref"].clone(), counts(&ack["read"])),
        (json!(7), (4, 2, 0))
    );
    assert_eq!(counts(&mark_ok(&server, &alice, &cid, 5)), (5, 1, 0));
    for ws in conns.iter_mut() {
        assert_eq!(counts(&next_read(ws, &cid)), (5, 1, 0));
    }

    // Her own post moves her marker on every device.
    let own = server.post(&alice, &cid, "done");
    let seq = own["seq"].as_u64().unwrap();
    for ws in conns.iter_mut() {
        assert_eq!(counts(&next_read(ws, &cid)), (seq, 0, 0));
    }
    // Markers are private: bob's devices hear nothing of alice's.
    server.post(&bob, &cid, "bye");
    let (mut bob_ws, _) = server.connect(&bob);
    bob_ws.ping("b");
    assert_eq!(
        counts(&mark_ok(&server, &alice, &cid, seq + 1)),
        (seq + 1, 0, 0)
    );
    server.post(&alice, &cid, "see you");
    assert_eq!(
        counts(&mark_ok(&server, &bob, &cid, seq + 2)),
        (seq + 2, 0, 0)
    );
    let f = bob_ws.recv_type("read");
    assert_eq!(
        counts(&f["read"]),
        (seq + 2, 0, 0),
        "only bob's own marker: {f}"
    );

    // Bad input is answered with an error that names the problem, and the session goes on.
    let ws = &mut conns[2];
    let bad = [
        (
            json!({"type": "read:mark", "ref": "b1", "channel_id": cid, "seq": 999}),
            "invalid_request",
        ),
        (
            json!({"type": "read:mark", "ref": "b2", "channel_id": cid, "seq": "4"}),
            "invalid_request",
        ),
        (
            json!({"type": "read:mark", "ref": "b3", "channel_id": cid}),
            "invalid_request",
        ),
        (
            json!({"type": "read:mark", "ref": "b4", "channel_id": "nope", "seq": 1}),
            "not_found",
        ),
    ];
    for (frame, code) in bad {
        let reference = frame["ref"].clone();
        ws.send(frame);
        let e = ws.recv_type("error");
        assert_eq!(
            (e["ref"].clone(), e["code"].clone()),
            (reference, json!(code)),
            "{e}"
        );
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    ws.ping("alive");
}

// Markers are durable: after a SIGKILL (replaying the log), after a drain (loading the
// shutdown snapshot), and after a SIGKILL that follows marks made since the snapshot, every
// marker and count is as it was, and still only moves forward.
#[test]
fn markers_survive_sigkill_and_restart() {
    let mut server = Server::start(UNLIMITED);
    let alice = server.signup("alice");
    let bob = server.signup("bob");
    let wid = server.workspace(&alice, &[&bob]);
    let channels: Vec<String> = (0..4)
        .map(|i| server.channel(&wid, &alice, &format!("c{i}"), &[&bob]))
        .collect();
    for (i, cid) in channels.iter().enumerate() {
        for j in 0..=i {
            let text = if j % 2 == 0 {
                format!("<@{}> {j}", bob.id)
            } else {
                format!("{j}")
            };
            server.post(&alice, cid, &text);
        }
        mark_ok(&server, &bob, cid, 2 + i as u64);
    }
    let before = unreads(&server, &bob, &wid);
    assert_eq!(before.len(), 4);

    server.kill();
    server.restart();
    assert_eq!(unreads(&server, &bob, &wid), before, "after SIGKILL");
    let last = read_of(&server, &bob, &wid, &channels[3]);
    assert_eq!(
        counts(&mark_ok(&server, &bob, &channels[3], 1)),
        counts(&last)
    );

    // A drain writes each partition's snapshot; the restart loads the markers from it.
    assert!(server.terminate().success());
    let snapshots = server.dir().join("data").join("snapshots");
    let written = std::fs::read_dir(&snapshots).expect("snapshots").count();
    assert!(written > 0, "no snapshot in {snapshots:?}");
    server.restart();
    assert_eq!(
        unreads(&server, &bob, &wid),
        before,
        "after a drained restart"
    );
    let log = server.log();
    assert!(!log.contains("ignoring"), "a snapshot was not used: {log}");

    // Marks after the snapshot replay over it.
    let moved = mark_ok(&server, &bob, &channels[2], 5);
    assert_eq!(counts(&moved), (5, 0, 0), "the marker moved");
    server.kill();
    server.restart();
    assert_eq!(
        read_of(&server, &bob, &wid, &channels[2]),
        moved,
        "snapshot, then the log"
    );
}

// Nothing of another workspace is reachable: marking a channel there, or listing its
// unreads, is 404 as for things that do not exist, over REST and the WebSocket; and a
// public channel of one's own workspace that one has not joined cannot be marked.
#[test]
fn read_state_is_isolated() {
    let server = Server::start(UNLIMITED);
    let alice = server.signup("alice");
    let carol = server.signup("carol");
    let mine = server.workspace(&alice, &[]);
    let general = server.channel(&mine, &alice, "general", &[]);
    let theirs = server.workspace(&carol, &[]);
    let secret = server.channel(&theirs, &carol, "secret", &[]);
    server.post(&carol, &secret, "hidden");

    mark(&server, &alice, &secret, json!({"seq": 1})).assert_error(404, "not_found");
    let path = format!("/api/v1/workspaces/{theirs}/unreads");
    server
        .call("GET", &path, Some(&alice.token), None)
        .assert_error(404, "not_found");
    let (mut ws, _) = server.connect(&alice);
    ws.send(json!({"type": "read:mark", "ref": "x", "channel_id": secret, "seq": 1}));
    let e = ws.recv_type("error");
    assert_eq!(
        (e["ref"].clone(), e["code"].clone()),
        (json!("x"), json!("not_found"))
    );

    // Carol's public channel in alice's workspace, which alice never joined.
    let path = format!("/api/v1/workspaces/{mine}/members");
    server.ok(
        "POST",
        &path,
        &alice,
        Some(json!({"email": carol.email})),
        201,
    );
    let lobby = server.channel(&mine, &carol, "lobby", &[]);
    mark(&server, &alice, &lobby, json!({"seq": 1})).assert_error(404, "not_found");
    let ids: Vec<Value> = unreads(&server, &alice, &mine)
        .iter()
        .map(|r| r["channel_id"].clone())
        .collect();
    assert_eq!(ids, vec![json!(general)]);
    // Carol's marker in her own channel is hers alone.
    assert_eq!(
        counts(&read_of(&server, &carol, &theirs, &secret)),
        (2, 0, 0)
    );
}
