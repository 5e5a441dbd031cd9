//! End-to-end tests of the WebSocket protocol of `API.md` against the real `chorus` binary,
//! over real sockets: the session, acks after durability, fan-out, typing, resume, bad
//! input, heartbeats, slow readers and the drain.
//!
//! Each test starts its own server on free ports with the settings it needs. Reads have a
//! timeout, so a missing frame fails the test instead of hanging it; no test sleeps to
//! guess when something has happened.

mod common;

use chorus_engine::ids::{ChannelId, MessageId};
use common::{Server, User, Ws, AUTH_UNLIMITED, READ_TIMEOUT};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};
use tungstenite::Message;

// ---------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------

/// The `event` frame's inner type.
fn event_type(v: &Value) -> &str {
    assert_eq!(v["type"], "event", "{v}");
    v["event"]["type"].as_str().unwrap()
}

/// A server with two members of one workspace sharing one channel.
fn pair(config: &str) -> (Server, User, User, String, String) {
    let server = Server::start(&format!("{AUTH_UNLIMITED}{config}"));
    let alice = server.signup("alice");
    let bob = server.signup("bob");
    let wid = server.workspace(&alice, &[&bob]);
    let cid = server.channel(&wid, &alice, "general", &[&bob]);
    (server, alice, bob, wid, cid)
}

// ---------------------------------------------------------------------------------------
// The session
// ---------------------------------------------------------------------------------------

// hello comes first with its fields; a send is acked with the durable message; the other
// member gets every event (new, reaction added and removed, edited, deleted) in seq order.
#[test]
fn send_ack_and_events_reach_the_other_member() {
    let (server, alice, bob, _, cid) = pair("");
    let (mut a, hello) = server.connect(&alice);
    assert_eq!(hello["user_id"], alice.id.as_str());
    assert_eq!(hello["heartbeat_interval"], 30);
    assert!(!hello["conn_id"].as_str().unwrap().is_empty());
    let (mut b, hello_b) = server.connect(&bob);
    assert_ne!(hello_b["conn_id"], hello["conn_id"]);
    a.ping("start");
    b.ping("start");

    a.send(json!({
        "type": "message:send", "ref": "s1", "channel_id": cid, "text": "hello bob",
        "client_msg_id": "k1"
    }));
    let ack = a.recv_type("ack");
    assert_eq!(ack["ref"], "s1");
    let m = &ack["message"];
    assert_eq!(m["text"], "hello bob");
    assert_eq!(m["client_msg_id"], "k1");
    assert_eq!(m["user_id"], alice.id.as_str());
    let mid = m["id"].as_str().unwrap().to_owned();
    let seq = m["seq"].as_u64().unwrap();
    // Durable and visible to everyone once acked.
    let page = server.ok(
        "GET",
        &format!("/api/v1/channels/{cid}/messages"),
        &bob,
        None,
        200,
    );
    assert_eq!(page["messages"][0]["id"], mid.as_str());

    let new = b.recv_type("event");
    assert_eq!(event_type(&new), "message:new");
    assert_eq!(new["channel_id"], cid.as_str());
    assert_eq!(new["seq"], seq);
    assert_eq!(new["event"]["message"], *m);

    let target = json!({"channel_id": cid, "message_id": mid});
    let with = |extra: Value| {
        let mut f = target.clone();
        f.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        f
    };
    a.send(with(
        json!({"type": "reaction:add", "ref": "r1", "emoji": "tada"}),
    ));
    let ack = a.recv_type("ack");
    assert_eq!(
        (ack["ref"].as_str(), ack["message"].is_null()),
        (Some("r1"), true)
    );
    a.send(with(
        json!({"type": "reaction:remove", "ref": "r2", "emoji": "tada"}),
    ));
    assert_eq!(a.recv_type("ack")["ref"], "r2");
    a.send(with(
        json!({"type": "message:edit", "ref": "e1", "text": "hello, bob"}),
    ));
    let ack = a.recv_type("ack");
    assert_eq!(ack["ref"], "e1");
    assert_eq!(ack["message"]["text"], "hello, bob");
    assert!(ack["message"]["edited_at"].is_string());
    a.send(with(json!({"type": "message:delete", "ref": "d1"})));
    let ack = a.recv_type("ack");
    assert_eq!(
        (ack["ref"].as_str(), ack["message"].is_null()),
        (Some("d1"), true)
    );

    let kinds = [
        "reaction:added",
        "reaction:removed",
        "message:edited",
        "message:deleted",
    ];
    for (want, kind) in (seq + 1..).zip(kinds) {
        let e = b.recv_type("event");
        assert_eq!(event_type(&e), kind, "{e}");
        assert_eq!(e["seq"], want);
        assert_eq!(e["event"]["message"]["id"], mid.as_str());
    }
    // Alice's own connection saw the same events, in the same order.
    let mut seqs = Vec::new();
    while seqs.len() < 5 {
        seqs.push(a.recv_type("event")["seq"].as_u64().unwrap());
    }
    assert_eq!(seqs, (seq..seq + 5).collect::<Vec<_>>());
}

// A channel the user joins after connecting streams its events on the open connection.
#[test]
fn channels_joined_after_connecting_stream_events() {
    let (server, alice, bob, wid, _) = pair("");
    let (mut b, _) = server.connect(&bob);
    b.ping("start");
    let later = server.channel(&wid, &alice, "later", &[]);
    server.ok(
        "POST",
        &format!("/api/v1/channels/{later}/join"),
        &bob,
        None,
        200,
    );
    let joined = b.recv_type("event");
    assert_eq!(event_type(&joined), "member:joined");
    assert_eq!(joined["channel_id"], later.as_str());
    assert_eq!(joined["event"]["user_id"], bob.id.as_str());
    let m = server.post(&alice, &later, "welcome");
    let new = b.recv_type("event");
    assert_eq!(event_type(&new), "message:new");
    assert_eq!(new["event"]["message"]["id"], m["id"]);
}

// typing reaches the other member (not the typist) and is never stored: the channel's seq
// does not move, and the next message follows the last one directly.
#[test]
fn typing_is_delivered_and_never_stored() {
    let (server, alice, bob, _, cid) = pair("");
    let (mut a, _) = server.connect(&alice);
    let (mut b, _) = server.connect(&bob);
    a.ping("start");
    b.ping("start");
    let before = server.last_seq(&alice, &cid);
    a.send(json!({"type": "typing:start", "channel_id": cid}));
    let typing = b.recv_type("typing");
    assert_eq!(typing["channel_id"], cid.as_str());
    assert_eq!(typing["user_id"], alice.id.as_str());
    assert_eq!(server.last_seq(&alice, &cid), before);
    // Alice's next frames are the pong and her own message, never her typing.
    a.ping("after-typing");
    let m = server.post(&alice, &cid, "typed");
    assert_eq!(m["seq"], before + 1);
    let e = a.recv();
    assert_eq!(event_type(&e), "message:new", "{e}");
    let e = b.recv();
    assert_eq!(event_type(&e), "message:new", "{e}");
}

// resume as the first frame replays exactly the events missed, in order, then `resumed`,
// then live events; a channel not named starts live without replay.
#[test]
fn resume_replays_exactly_the_missed_events() {
    let (server, alice, bob, wid, cid) = pair("");
    let other = server.channel(&wid, &alice, "other", &[&bob]);
    let (mut b, _) = server.connect(&bob);
    b.ping("start");
    for i in 0..3 {
        server.post(&alice, &cid, &format!("seen {i}"));
    }
    let last = server.last_seq(&alice, &cid);
    while b.recv_type("event")["seq"] != last {}
    drop(b);
    let missed: Vec<Value> = (0..5)
        .map(|i| server.post(&alice, &cid, &format!("missed {i}")))
        .collect();
    server.post(&alice, &other, "not replayed");

    let (mut b, _) = server.connect(&bob);
    b.send(json!({"type": "resume", "since": {cid.clone(): last}}));
    for m in &missed {
        let e = b.recv();
        assert_eq!(event_type(&e), "message:new", "{e}");
        assert_eq!(e["channel_id"], cid.as_str());
        assert_eq!(e["event"]["message"]["id"], m["id"]);
    }
    let resumed = b.recv();
    assert_eq!(resumed["type"], "resumed", "{resumed}");
    let through = missed.last().unwrap()["seq"].as_u64().unwrap();
    assert_eq!(resumed["channels"][&cid], through, "{resumed}");
    let live = server.post(&alice, &cid, "live");
    let live_other = server.post(&alice, &other, "live other");
    let e = b.recv();
    assert_eq!(e["seq"], through + 1, "{e}");
    assert_eq!(e["event"]["message"]["id"], live["id"]);
    let e = b.recv();
    assert_eq!(e["event"]["message"]["id"], live_other["id"], "{e}");
}

// ping is answered with pong echoing the ref, and a later resume on a live connection sends
// what is missing and `resumed`.
#[test]
fn ping_pong_and_a_later_resume() {
    let (server, alice, bob, _, cid) = pair("");
    let (mut b, _) = server.connect(&bob);
    b.send(json!({"type": "ping"}));
    let pong = b.recv();
    assert_eq!(pong["type"], "pong");
    assert!(pong["ref"].is_null());
    b.ping("p1");
    let m = server.post(&alice, &cid, "one");
    assert_eq!(b.recv_type("event")["seq"], m["seq"]);
    b.send(json!({"type": "resume", "ref": "again", "since": {cid.clone(): m["seq"]}}));
    let resumed = b.recv();
    assert_eq!(resumed["type"], "resumed", "{resumed}");
    assert_eq!(resumed["channels"][&cid], m["seq"]);
}

// ---------------------------------------------------------------------------------------
// Refusals and bad input
// ---------------------------------------------------------------------------------------

/// Sends raw bytes as an HTTP request and returns the status and the answer's head and
/// body (a 101 has no body, and its connection stays open).
fn raw_http(addr: &str, request: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "connection closed in {answer:?}");
        answer.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&answer[..head_end]).to_ascii_lowercase();
    let body_len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: ")?.trim().parse().ok())
        .unwrap_or(0);
    while answer.len() < head_end + body_len {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "connection closed in {answer:?}");
        answer.extend_from_slice(&buf[..n]);
    }
    let answer = String::from_utf8_lossy(&answer[..head_end + body_len]).into_owned();
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {answer:?}"));
    (status, answer)
}

// A missing or bad token is refused with HTTP 401 and the API error body, never upgraded;
// requests that are not a WebSocket upgrade get 400, 404 or 426.
#[test]
fn upgrades_are_refused_with_http_errors() {
    let server = Server::start("");
    let alice = server.signup("alice");
    match server.connect_raw("not-a-token") {
        Err(tungstenite::Error::Http(r)) => {
            assert_eq!(r.status(), 401);
            let body: Value = serde_json::from_slice(r.body().as_ref().unwrap()).unwrap();
            assert_eq!(body["error"]["code"], "unauthorized");
        }
        other => panic!("expected 401, got {:?}", other.map(|_| ())),
    }
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    let upgrade = |path: &str, auth: &str, version: &str, key: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: {version}\r\nSec-WebSocket-Key: {key}\r\n{auth}\r\n"
        )
    };
    let bearer = format!("Authorization: Bearer {}\r\n", alice.token);
    let (status, answer) = raw_http(&server.addr, &upgrade("/ws/v1/connect", "", "13", key));
    assert_eq!(status, 401, "{answer}");
    assert!(answer.contains("\"unauthorized\""), "{answer}");
    let (status, answer) = raw_http(&server.addr, &upgrade("/ws/v1/connect", &bearer, "8", key));
    assert_eq!(status, 426, "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("sec-websocket-version: 13"),
        "{answer}"
    );
    let (status, answer) = raw_http(
        &server.addr,
        &upgrade("/ws/v1/connect", &bearer, "13", "short"),
    );
    assert_eq!(status, 400, "{answer}");
    let (status, answer) = raw_http(
        &server.addr,
        &upgrade("/ws/v1/connectx", &bearer, "13", key),
    );
    assert_eq!(status, 404, "{answer}");
    let plain = format!("GET /ws/v1/connect HTTP/1.1\r\nHost: x\r\n{bearer}\r\n");
    let (status, answer) = raw_http(&server.addr, &plain);
    assert_eq!(status, 400, "{answer}");
    // The header form of the token upgrades too, and the server still serves.
    let (status, answer) = raw_http(&server.addr, &upgrade("/ws/v1/connect", &bearer, "13", key));
    assert_eq!(status, 101, "{answer}");
    assert!(answer.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{answer}");
    assert_eq!(server.call("GET", "/healthz", None, None).status, 200);
}

// A frame the client sends in the same packet as its upgrade request is not lost: a
// `resume` sent that way is the session's first frame.
#[test]
fn frames_sent_with_the_request_are_kept() {
    let (server, alice, bob, _, cid) = pair("");
    let first = server.post(&alice, &cid, "before")["seq"].as_u64().unwrap();
    let second = server.post(&alice, &cid, "missed");
    let resume = json!({"type": "resume", "since": {cid.clone(): first}}).to_string();
    assert!(resume.len() < 126);
    // A masked text frame with a zero mask key, whose payload is then sent as is.
    let mut frame = vec![0x81, 0x80 | resume.len() as u8, 0, 0, 0, 0];
    frame.extend_from_slice(resume.as_bytes());
    let mut request = format!(
        "GET /ws/v1/connect?token={} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        bob.token
    )
    .into_bytes();
    request.extend_from_slice(&frame);
    let mut s = TcpStream::connect(&server.addr).unwrap();
    s.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    s.write_all(&request).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed during the handshake");
        got.extend_from_slice(&buf[..n]);
    };
    assert!(
        got.starts_with(b"HTTP/1.1 101"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    let rest = got[head_end..].to_vec();
    let socket = tungstenite::WebSocket::from_partially_read(
        s,
        rest,
        tungstenite::protocol::Role::Client,
        None,
    );
    let mut ws = Ws::new(socket);
    assert_eq!(ws.recv()["type"], "hello");
    let e = ws.recv();
    assert_eq!(e["event"]["message"]["id"], second["id"], "{e}");
    assert_eq!(ws.recv()["type"], "resumed");
}

// Every kind of bad frame is answered with an `error` frame of the right code (echoing the
// ref when it could be read), and the connection keeps working: a ping after each gets its
// pong.
#[test]
fn bad_frames_get_error_frames_and_the_connection_survives() {
    let (server, alice, bob, _, cid) = pair("ws_frame_bytes_max = 65536\n");
    // Another workspace's channel, and a message of Alice's that Bob may not edit.
    let carol = server.signup("carol");
    let cwid = server.workspace(&carol, &[]);
    let foreign = server.channel(&cwid, &carol, "secret", &[]);
    let alices = server.post(&alice, &cid, "alice's")["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let other = server.channel(&server.workspace(&alice, &[]), &alice, "x", &[]);
    let other_msg = server.post(&alice, &other, "elsewhere")["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let unknown_channel = ChannelId(1 << 40).to_string();
    let own: ChannelId = cid.parse().unwrap();
    let unknown_msg = MessageId {
        channel: own,
        seq: 9999,
    }
    .to_string();

    let (mut b, _) = server.connect(&bob);
    let text = |s: &str| Message::text(s.to_owned());
    let js = |v: Value| Message::text(v.to_string());
    let send = |extra: Value| {
        let mut f = json!({"type": "message:send", "channel_id": cid, "text": "x"});
        let extra = extra.as_object().unwrap().clone();
        f.as_object_mut().unwrap().extend(extra);
        Message::text(f.to_string())
    };
    let edit = |mid: &str| {
        js(json!({
            "type": "message:edit", "ref": "e", "channel_id": cid, "message_id": mid, "text": "y"
        }))
    };
    let oversized = format!(r#"{{"type":"ping","pad":"{}"}}"#, "x".repeat(100_000));
    let null = || Value::Null;
    let cases: Vec<(&str, Message, &str, Value)> = vec![
        ("not json", text("hello"), "invalid_json", null()),
        (
            "truncated json",
            text(r#"{"type":"#),
            "invalid_json",
            null(),
        ),
        ("array", text("[1,2,3]"), "invalid_json", null()),
        ("string", text(r#""ping""#), "invalid_json", null()),
        ("number", text("42"), "invalid_json", null()),
        (
            "no type",
            text(r#"{"ref":"n"}"#),
            "invalid_request",
            json!("n"),
        ),
        (
            "type not a string",
            text(r#"{"type":5}"#),
            "invalid_request",
            null(),
        ),
        (
            "unknown type",
            text(r#"{"type":"message:shout","ref":"u"}"#),
            "unknown_type",
            json!("u"),
        ),
        (
            "ref not a string or number",
            text(r#"{"type":"ping","ref":{"a":1}}"#),
            "invalid_request",
            null(),
        ),
        (
            "missing channel_id",
            js(json!({"type": "message:send", "ref": 1, "text": "x"})),
            "invalid_request",
            json!(1),
        ),
        (
            "missing text",
            js(json!({"type": "message:send", "ref": 2, "channel_id": cid})),
            "invalid_request",
            json!(2),
        ),
        (
            "channel_id not a string",
            send(json!({"ref": "t1", "channel_id": 123})),
            "invalid_request",
            json!("t1"),
        ),
        (
            "text not a string",
            send(json!({"ref": "t2", "text": ["x"]})),
            "invalid_request",
            json!("t2"),
        ),
        (
            "client_msg_id not a string",
            send(json!({"ref": "t3", "client_msg_id": 7})),
            "invalid_request",
            json!("t3"),
        ),
        (
            "malformed channel id",
            send(json!({"ref": "i1", "channel_id": "C!!"})),
            "not_found",
            json!("i1"),
        ),
        (
            "unknown channel",
            send(json!({"ref": "i2", "channel_id": unknown_channel})),
            "not_found",
            json!("i2"),
        ),
        (
            "another workspace's channel",
            send(json!({"ref": "i3", "channel_id": foreign})),
            "not_found",
            json!("i3"),
        ),
        (
            "thread in another channel",
            send(json!({"ref": "i4", "thread_id": other_msg})),
            "not_found",
            json!("i4"),
        ),
        (
            "empty text",
            send(json!({"ref": "v1", "text": ""})),
            "invalid_request",
            json!("v1"),
        ),
        (
            "edit unknown message",
            edit(&unknown_msg),
            "not_found",
            json!("e"),
        ),
        (
            "edit message of another channel",
            edit(&other_msg),
            "not_found",
            json!("e"),
        ),
        (
            "edit someone else's message",
            edit(&alices),
            "forbidden",
            json!("e"),
        ),
        (
            "reaction without emoji",
            js(json!({
                "type": "reaction:add", "ref": "x1", "channel_id": cid, "message_id": alices
            })),
            "invalid_request",
            json!("x1"),
        ),
        (
            "typing channel not a string",
            text(r#"{"type":"typing:start","channel_id":7}"#),
            "invalid_request",
            null(),
        ),
        (
            "typing in another workspace",
            js(json!({"type": "typing:start", "ref": "ty", "channel_id": foreign})),
            "not_found",
            json!("ty"),
        ),
        (
            "resume since not a map",
            text(r#"{"type":"resume","since":"all"}"#),
            "invalid_request",
            null(),
        ),
        (
            "resume negative seq",
            js(json!({"type": "resume", "since": {cid.clone(): -1}})),
            "invalid_request",
            null(),
        ),
        (
            "resume malformed channel",
            text(r#"{"type":"resume","since":{"nope":1}}"#),
            "not_found",
            null(),
        ),
        (
            "binary frame",
            Message::binary(br#"{"type":"ping"}"#.to_vec()),
            "unsupported_frame",
            null(),
        ),
        ("oversized frame", text(&oversized), "too_large", null()),
    ];
    assert!(cases.len() >= 20);
    for (i, (name, frame, code, reference)) in cases.into_iter().enumerate() {
        b.send_raw(frame);
        let e = b.recv_type("error");
        assert_eq!(e["code"], code, "{name}: {e}");
        assert_eq!(e["ref"], reference, "{name}: {e}");
        assert!(
            e["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{name}: {e}"
        );
        b.ping(&format!("after {i}"));
    }
    // Nothing bad was stored, and the server still serves.
    assert_eq!(server.call("GET", "/healthz", None, None).status, 200);
    let page = server.ok(
        "GET",
        &format!("/api/v1/channels/{cid}/messages"),
        &bob,
        None,
        200,
    );
    assert_eq!(page["messages"].as_array().unwrap().len(), 1);
}

// A user over the rate limit gets `error` frames with `rate_limited` and retry_after_ms,
// and the connection stays up.
#[test]
fn rate_limited_frames_say_when_to_retry() {
    let (server, _alice, bob, _, cid) = pair("rate_per_s = 0.01\nrate_burst = 10.0\n");
    let (mut b, _) = server.connect(&bob);
    let mut acked = 0;
    let refused = loop {
        assert!(acked <= 10, "no rate limit after {acked} sends");
        b.send(json!({"type": "message:send", "ref": acked, "channel_id": cid, "text": "spam"}));
        // Bob's own messages come back as events too, and move his read marker.
        let v = loop {
            let v = b.recv_type_not("event");
            if v["type"] != "read" {
                break v;
            }
        };
        match v["type"].as_str() {
            Some("ack") => acked += 1,
            Some("error") => break v,
            _ => panic!("{v}"),
        }
    };
    assert_eq!(refused["code"], "rate_limited", "{refused}");
    assert_eq!(refused["ref"], acked);
    assert!(refused["retry_after_ms"].as_u64().unwrap() > 0, "{refused}");
    b.ping("still here");
}

impl Ws {
    /// The next frame that is not of the given type.
    fn recv_type_not(&mut self, kind: &str) -> Value {
        loop {
            let v = self.recv();
            if v["type"] != kind {
                return v;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Heartbeats, slow readers, drain
// ---------------------------------------------------------------------------------------

// A connection silent for two heartbeat intervals is closed with 4002, while one that pings
// in time outlives it.
#[test]
fn silent_connections_are_closed_after_two_heartbeats() {
    let (server, alice, bob, _, _) = pair("heartbeat_interval_s = 1\n");
    let (mut quiet, hello) = server.connect(&alice);
    assert_eq!(hello["heartbeat_interval"], 1);
    let started = Instant::now();
    let (mut lively, _) = server.connect(&bob);
    std::thread::scope(|s| {
        // A client that pings every 400 ms for three intervals.
        let pinger = s.spawn(move || {
            for n in 0.. {
                lively.ping(&format!("p{n}"));
                if started.elapsed() > Duration::from_secs(3) {
                    return lively;
                }
                std::thread::sleep(Duration::from_millis(400));
            }
            unreachable!()
        });
        let (code, reason, _) = quiet.recv_close();
        let silent_for = started.elapsed();
        assert_eq!((code, reason.as_str()), (4002, "heartbeat timeout"));
        assert!(silent_for >= Duration::from_millis(1900), "{silent_for:?}");
        let mut lively = pinger.join().unwrap();
        lively.ping("still alive");
    });
}

// A reader that stops reading is cut off with 4000 "resume required" once its bounded queue
// overflows; the frames before the close are in order, the server stays healthy, and
// resuming from the last frame seen gets the rest.
#[test]
fn slow_readers_are_cut_off_and_resume() {
    let (server, alice, bob, _, cid) = pair("ws_outbound_frames_max = 16\n");
    let (mut slow, _) = server.connect(&bob);
    slow.ping("start");
    // Posts until the engine reports the cut (past the socket's buffers and the queue of
    // 16); the bound only guards against a cut that never comes.
    let text = "x".repeat(128 * 1024);
    let mut posted = 0;
    while server.metric("chorus_slow_consumer_disconnects_total") < 1.0 {
        assert!(posted < 1000, "no cutoff after {posted} posts");
        server.post(&alice, &cid, &text);
        posted += 1;
    }
    let (code, reason, before) = slow.recv_close();
    assert_eq!((code, reason.as_str()), (4000, "resume required"));
    assert!(before.len() < posted, "all {posted} delivered");
    let seqs: Vec<u64> = before.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    assert_eq!(server.call("GET", "/healthz", None, None).status, 200);

    let last = seqs.last().copied().unwrap_or(0);
    let (mut b, _) = server.connect(&bob);
    b.send(json!({"type": "resume", "since": {cid.clone(): last}}));
    let end = server.last_seq(&alice, &cid);
    for want in last + 1..=end {
        let e = b.recv();
        assert_eq!(e["seq"], want, "{}", e["type"]);
    }
    assert_eq!(b.recv()["type"], "resumed");
}

// SIGTERM closes every WebSocket with 1001 "going away" and the server exits 0. The
// close comes from the drain itself, not from the engine's shutdown after the server's
// 10 s wait for connections to end, which closes the sessions too.
#[test]
fn drain_closes_with_going_away() {
    let (mut server, alice, _, _, _) = pair("");
    let (mut a, _) = server.connect(&alice);
    a.ping("start");
    let status = std::thread::scope(|s| {
        let signalled = Instant::now();
        let closed = s.spawn(move || (a.recv_close(), signalled.elapsed()));
        let status = server.terminate();
        let ((code, reason, _), after) = closed.join().unwrap();
        assert_eq!((code, reason.as_str()), (1001, "going away"));
        assert!(
            after < Duration::from_secs(5),
            "closed {after:?} after the signal"
        );
        status
    });
    assert!(status.success(), "{status:?}");
}
