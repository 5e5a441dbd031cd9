//! Message bodies over 64 KiB in a cluster of three `chorus serve` processes (`API.md`
//! §15: an ack means durable on a majority; every node serves the whole API). Such a body,
//! and the event frame that carries it, live in the engine's blob store, beside the log
//! rather than in it: the node that decides the post must have them on a majority of the
//! nodes before the ack, and a node without them fetches them from a peer.

mod common;

use common::{str_of, ClusterConfig, Server, User, AUTH_UNLIMITED, PASSWORD};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// How long a call may look for a node that answers it.
const WAIT: Duration = Duration::from_secs(20);

fn user(token: &str) -> User {
    User {
        id: String::new(),
        email: String::new(),
        token: token.to_owned(),
    }
}

/// Retries `call` on node `s` until it answers `want` (a 503 while a leader is elected,
/// or a 401/404 from a node whose directory lags, is retried); its body.
fn until_status(
    s: &Server,
    what: &str,
    want: u16,
    call: impl Fn(&Server) -> common::Resp,
) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let r = call(s);
        if r.status == want {
            return r.body;
        }
        assert!(
            matches!(r.status, 503 | 401 | 404) && Instant::now() < deadline,
            "{what} through {}: {} {}",
            s.addr,
            r.status,
            r.text
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The text of message `mid` in `cid` as node `s` serves it in the channel's history.
fn text_on(s: &Server, token: &str, cid: &str, mid: &str) -> String {
    let path = format!("/api/v1/channels/{cid}/messages?limit=50");
    let deadline = Instant::now() + WAIT;
    loop {
        let v = until_status(s, "the history", 200, |s| {
            s.call("GET", &path, Some(token), None)
        });
        let found = v["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .find(|m| m["id"] == json!(mid))
            .map(|m| str_of(&m["text"]));
        if let Some(text) = found {
            return text;
        }
        assert!(Instant::now() < deadline, "{} never showed {mid}", s.addr);
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The node (index from 0) that leads `partition`, as `s` sees it, once one does.
fn leader_of(s: &Server, token: &str, partition: &Value) -> usize {
    let deadline = Instant::now() + WAIT;
    loop {
        let v = s.ok("GET", "/api/v1/cluster", &user(token), None, 200);
        let leader = v["partitions"]
            .as_array()
            .expect("partitions")
            .iter()
            .find(|p| p["id"] == *partition)
            .and_then(|p| p["leader"].as_u64());
        if let Some(l) = leader {
            return l as usize - 1;
        }
        assert!(
            Instant::now() < deadline,
            "partition {partition} has no leader: {v}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A body of `len` bytes whose every line differs, so that a piece missing or repeated
/// shows.
fn big_text(len: usize) -> String {
    let mut s = String::with_capacity(len + 32);
    let mut i = 0;
    while s.len() < len {
        s.push_str(&format!("line {i} of a long message\n"));
        i += 1;
    }
    s.truncate(len);
    s
}

// The partition's leader stores a 200 KiB body; it is SIGKILLed right after the ack. The
// two others serve the whole body, and one of them delivers it live over its WebSocket;
// the leader, restarted with its blob store emptied, serves it again from its peers. With
// both other nodes stopped, a leader refuses a large post with 503.
#[test]
fn a_large_body_outlives_the_node_that_took_it() {
    let config = ClusterConfig::three();
    let mut nodes: Vec<Server> = (1..=3)
        .map(|id| Server::start(&config.node(id, AUTH_UNLIMITED)))
        .collect();
    let signup = json!({"email": "alice@example.com", "password": PASSWORD, "name": "alice"});
    let v = until_status(&nodes[0], "the sign-up", 201, |s| {
        s.call("POST", "/api/v1/auth/signup", None, Some(signup.clone()))
    });
    let token = str_of(&v["token"]);
    let v = until_status(&nodes[0], "the workspace", 201, |s| {
        let body = json!({"name": "acme"});
        s.call("POST", "/api/v1/workspaces", Some(&token), Some(body))
    });
    let wid = str_of(&v["workspace"]["id"]);
    let v = until_status(&nodes[0], "the channel", 201, |s| {
        let body = json!({"name": "general", "kind": "public"});
        let path = format!("/api/v1/workspaces/{wid}/channels");
        s.call("POST", &path, Some(&token), Some(body))
    });
    let cid = str_of(&v["channel"]["id"]);
    let partition = v["channel"]["partition"].clone();

    let leader = leader_of(&nodes[0], &token, &partition);
    let followers = [(leader + 1) % 3, (leader + 2) % 3];
    for &f in &followers {
        until_status(&nodes[f], "the channel on a follower", 200, |s| {
            s.call(
                "GET",
                &format!("/api/v1/channels/{cid}"),
                Some(&token),
                None,
            )
        });
    }
    let (mut ws, _) = nodes[followers[0]].connect(&user(&token));
    ws.ping("ready");
    // A subscription takes a moment to reach the channel's replica on the node: a small
    // post first, until the connection shows one.
    let deadline = Instant::now() + WAIT;
    for n in 0.. {
        let post = json!({"text": format!("hello {n}"), "client_msg_id": format!("hello {n}")});
        until_status(&nodes[leader], "a small post", 201, |s| {
            let path = format!("/api/v1/channels/{cid}/messages");
            s.call("POST", &path, Some(&token), Some(post.clone()))
        });
        let seen = ws.recv_type_within("event", Duration::from_millis(300));
        if seen.is_some_and(|e| e["event"]["type"] == "message:new") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the follower's connection saw no post"
        );
    }

    let body = big_text(200 * 1024);
    let post = json!({"text": body, "client_msg_id": "big"});
    let v = until_status(&nodes[leader], "the large post", 201, |s| {
        let path = format!("/api/v1/channels/{cid}/messages");
        s.call("POST", &path, Some(&token), Some(post.clone()))
    });
    let mid = str_of(&v["message"]["id"]);
    // Acknowledged: the leader's disk may go now.
    nodes[leader].kill();

    for &f in &followers {
        let got = text_on(&nodes[f], &token, &cid, &mid);
        assert!(
            got == body,
            "node {} serves {} bytes of the {}-byte body",
            f + 1,
            got.len(),
            body.len()
        );
    }

    let live = loop {
        let e = ws.recv_type("event");
        if e["event"]["message"]["id"] == json!(mid) {
            break e;
        }
    };
    let text = live["event"]["message"]["text"]
        .as_str()
        .unwrap_or_default();
    assert!(
        live["event"]["type"] == "message:new" && text == body,
        "the live event on node {} lacks the body ({} bytes of text)",
        followers[0] + 1,
        text.len()
    );

    // Back with its blob store emptied (a disk replaced): it reads the body from a peer.
    let blobs = nodes[leader].dir().join("data").join("blobs");
    for entry in std::fs::read_dir(&blobs).expect("the blob store") {
        let path = entry.expect("an entry").path();
        if path.is_dir() {
            for blob in std::fs::read_dir(&path).expect("a fan-out directory") {
                std::fs::remove_file(blob.expect("a blob").path()).expect("removed");
            }
        }
    }
    nodes[leader].restart();
    let got = text_on(&nodes[leader], &token, &cid, &mid);
    assert!(
        got == body,
        "the restarted node {} serves {} bytes of the {}-byte body",
        leader + 1,
        got.len(),
        body.len()
    );

    // A leader that cannot reach a majority with the body refuses the post for a retry
    // (503 with Retry-After), as it refuses any write it cannot commit; never an ack.
    let leader = leader_of(&nodes[0], &token, &partition);
    let others = [(leader + 1) % 3, (leader + 2) % 3];
    for &o in &others {
        nodes[o].signal("-STOP");
    }
    let post = json!({"text": big_text(100 * 1024), "client_msg_id": "unreachable"});
    let r = nodes[leader].call(
        "POST",
        &format!("/api/v1/channels/{cid}/messages"),
        Some(&token),
        Some(post),
    );
    for &o in &others {
        nodes[o].signal("-CONT");
    }
    r.assert_error(503, "unavailable");
    assert!(
        r.retry_after.is_some(),
        "503 without Retry-After: {}",
        r.text
    );
}
