//! End-to-end tests against the real `chorus` binary of what an adversarial test of it found
//! (issue 20): DMs and group DMs opened by many callers at the same moment, input that must
//! be refused (malformed emails, channel names that only look different, markup as an
//! emoji), and typing sent to a client that has just connected.
//!
//! Each test starts its own server through the shared harness. Every wait is bounded by the
//! harness's timeouts; no test sleeps to guess when something has happened.

mod common;

use common::{str_of, Server, User, PASSWORD, UNLIMITED};
use serde_json::{json, Value};
use std::collections::BTreeSet;

/// Callers opening one DM at the same moment.
const OPENERS: usize = 50;

/// The settings of these tests: no rate limit is reached, typing included.
fn config() -> String {
    format!("{UNLIMITED}typing_per_s = 1000000.0\n")
}

/// Opens the DM of `set` with `OPENERS` calls at once from as many threads, the callers
/// taking turns among the set's members; returns each answer's status and channel ID.
fn open_at_once(server: &Server, wid: &str, set: &[&User]) -> Vec<(u16, String)> {
    let start = std::sync::Barrier::new(OPENERS);
    std::thread::scope(|scope| {
        let threads: Vec<_> = (0..OPENERS)
            .map(|i| {
                let me = set[i % set.len()];
                let others: Vec<&str> = set
                    .iter()
                    .filter(|u| u.id != me.id)
                    .map(|u| u.id.as_str())
                    .collect();
                let start = &start;
                scope.spawn(move || {
                    let path = format!("/api/v1/workspaces/{wid}/dms");
                    let body = json!({ "user_ids": others });
                    start.wait();
                    let r = server.call("POST", &path, Some(&me.token), Some(body));
                    let id = r.body["channel"]["id"]
                        .as_str()
                        .unwrap_or(&r.text)
                        .to_owned();
                    (r.status, id)
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    })
}

/// Every answer is 200 or 201 with one channel ID, and exactly one call created it.
#[track_caller]
fn assert_one_channel(answers: &[(u16, String)], what: &str) -> String {
    let failed: Vec<&(u16, String)> = answers
        .iter()
        .filter(|(status, _)| *status != 200 && *status != 201)
        .collect();
    assert!(
        failed.is_empty(),
        "{what}: {} of {OPENERS} failed: {failed:?}",
        failed.len()
    );
    let ids: BTreeSet<&str> = answers.iter().map(|(_, id)| id.as_str()).collect();
    assert_eq!(ids.len(), 1, "{what}: opened as {ids:?}");
    let created = answers.iter().filter(|(status, _)| *status == 201).count();
    assert_eq!(created, 1, "{what}: created {created} times");
    ids.first().unwrap().to_string()
}

// 50 opens of one DM at the same moment, 25 by each side, all answer 200 or 201 with the
// one channel, which each member can use at once; so for every pair of four users.
#[test]
fn concurrent_dm_opens_all_get_the_one_channel() {
    let server = Server::start(&config());
    let users: Vec<User> = ["ann", "ben", "cat", "dan"]
        .into_iter()
        .map(|n| server.signup(n))
        .collect();
    let wid = server.workspace(&users[0], &[&users[1], &users[2], &users[3]]);
    for a in 0..users.len() {
        for b in a + 1..users.len() {
            let pair = [&users[a], &users[b]];
            let answers = open_at_once(&server, &wid, &pair);
            let what = format!("DM of {} and {}", users[a].email, users[b].email);
            let cid = assert_one_channel(&answers, &what);
            for u in pair {
                let m = server.post(u, &cid, "hello");
                assert_eq!(m["channel_id"], cid.as_str());
            }
        }
    }
}

// Group DMs opened by all their members at the same moment are one channel each too.
#[test]
fn concurrent_group_dm_opens_all_get_the_one_channel() {
    let server = Server::start(&config());
    let users: Vec<User> = ["gia", "hal", "ivy", "jon", "kim"]
        .into_iter()
        .map(|n| server.signup(n))
        .collect();
    let others: Vec<&User> = users[1..].iter().collect();
    let wid = server.workspace(&users[0], &others);
    let all: Vec<&User> = users.iter().collect();
    for set in [&all[..3], &all[1..4], &all[..4], &all[..]] {
        let answers = open_at_once(&server, &wid, set);
        let cid = assert_one_channel(&answers, &format!("group DM of {}", set.len()));
        let path = format!("/api/v1/channels/{cid}");
        for u in set {
            let c = server.ok("GET", &path, u, None, 200);
            assert_eq!(c["channel"]["kind"], "group_dm");
            assert_eq!(c["channel"]["last_seq"], set.len());
        }
    }
}

// Sign-up and adding a member refuse addresses a mail system would refuse, with 400.
#[test]
fn malformed_emails_are_refused() {
    let server = Server::start(&config());
    let owner = server.signup("owner");
    let wid = server.workspace(&owner, &[]);
    for bad in [
        "<>@example.com;DROP",
        "a@example.com;DROP",
        "a..b@example.com",
        ".a@example.com",
        "a@b@example.com",
        "a b@example.com",
        "a@localhost",
        "a@-bad.com",
        "\"q\"@example.com",
        "a@[127.0.0.1]",
    ] {
        let body = json!({"email": bad, "password": PASSWORD, "name": "x"});
        let r = server.call("POST", "/api/v1/auth/signup", None, Some(body));
        r.assert_error(400, "invalid_request");
        let path = format!("/api/v1/workspaces/{wid}/members");
        let r = server.call(
            "POST",
            &path,
            Some(&owner.token),
            Some(json!({"email": bad})),
        );
        r.assert_error(400, "invalid_request");
    }
    let body = json!({"email": "Zoe.Q+chat@Example.COM", "password": PASSWORD, "name": "Zoe"});
    let r = server.call("POST", "/api/v1/auth/signup", None, Some(body));
    assert_eq!(r.status, 201, "{}", r.text);
    let login = json!({"email": "zoe.q+chat@example.com", "password": PASSWORD});
    let r = server.call("POST", "/api/v1/auth/login", None, Some(login));
    assert_eq!(
        r.status, 200,
        "addresses are one account whatever their case: {}",
        r.text
    );
}

// A channel name that differs from another only by invisible code points or compatibility
// forms is the same name (409), and a name of nothing visible is refused (400).
#[test]
fn lookalike_channel_names_conflict() {
    let server = Server::start(&config());
    let owner = server.signup("owner");
    let wid = server.workspace(&owner, &[]);
    let path = format!("/api/v1/workspaces/{wid}/channels");
    let create = |name: &str| {
        let body = json!({"name": name, "kind": "public"});
        server.call("POST", &path, Some(&owner.token), Some(body))
    };
    assert_eq!(create("general").status, 201);
    for lookalike in [
        "gen\u{200B}eral",
        "\u{FEFF}general",
        "ｇｅｎｅｒａｌ",
        "General",
    ] {
        create(lookalike).assert_error(409, "conflict");
    }
    for invisible in ["\u{200B}", "\u{200B}\u{200D}\u{2060}\u{FE0F}"] {
        create(invisible).assert_error(400, "invalid_request");
    }
    let r = create("de\u{200B}sign");
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(
        r.body["channel"]["name"], "design",
        "the normalised name is stored"
    );
}

/// `s` percent-encoded, every byte, for a path segment.
fn encoded(s: &str) -> String {
    s.bytes().map(|b| format!("%{b:02X}")).collect()
}

// A reaction is a shortcode or one Unicode emoji: markup is refused with 400 over REST
// (both ways) and with an `error` frame over the WebSocket; shortcodes and emoji with skin
// tones, flags and ZWJ sequences are accepted both ways.
#[test]
fn reaction_emoji_are_checked_over_rest_and_websocket() {
    let server = Server::start(&config());
    let alice = server.signup("alice");
    let bob = server.signup("bob");
    let wid = server.workspace(&alice, &[&bob]);
    let cid = server.channel(&wid, &alice, "general", &[&bob]);
    let m = server.post(&alice, &cid, "react to me");
    let mid = str_of(&m["id"]);
    let reaction = |emoji: &str| {
        format!(
            "/api/v1/channels/{cid}/messages/{mid}/reactions/{}",
            encoded(emoji)
        )
    };
    for bad in ["<script>", "Tada", "👍👍", "a\u{200B}"] {
        for method in ["PUT", "DELETE"] {
            let r = server.call(method, &reaction(bad), Some(&bob.token), None);
            r.assert_error(400, "invalid_request");
        }
    }
    let good = [
        "+1",
        "white_check_mark",
        "👍🏽",
        "🇫🇷",
        "👨\u{200D}👩\u{200D}👧",
    ];
    for emoji in good {
        let r = server.call("PUT", &reaction(emoji), Some(&bob.token), None);
        assert_eq!(r.status, 204, "{emoji}: {}", r.text);
    }

    let (mut ws, _) = server.connect(&alice);
    ws.ping("start");
    ws.send(json!({
        "type": "reaction:add", "ref": "bad", "channel_id": cid, "message_id": mid,
        "emoji": "<script>"
    }));
    let error = ws.recv_type("error");
    assert_eq!(
        (&error["ref"], &error["code"]),
        (&json!("bad"), &json!("invalid_request"))
    );
    for (i, emoji) in good.iter().enumerate() {
        let reference = format!("good{i}");
        ws.send(json!({
            "type": "reaction:add", "ref": reference, "channel_id": cid, "message_id": mid,
            "emoji": emoji
        }));
        let ack = ws.recv_type("ack");
        assert_eq!(ack["ref"], reference.as_str(), "{emoji}: {ack}");
    }
    let messages = server.messages(&alice, &cid);
    let reactions = &messages.last().expect("the message")["reactions"];
    for emoji in good {
        let users: Vec<Value> = reactions[emoji].as_array().expect(emoji).clone();
        assert_eq!(users, vec![json!(bob.id), json!(alice.id)], "{emoji}");
    }
}

/// Times a client connects and is typed at at once, in the typing test.
const TYPING_ROUNDS: usize = 5;

// Typing sent to a client the moment its `hello` arrives, before it has sent anything, is
// delivered: the session's first moments (held until the client's first frame or the
// grace's end) lose nothing.
#[test]
fn typing_right_after_connecting_is_delivered() {
    let server = Server::start(&config());
    let alice = server.signup("alice");
    let bob = server.signup("bob");
    let wid = server.workspace(&alice, &[&bob]);
    let cid = server.channel(&wid, &alice, "general", &[&bob]);
    let (mut a, _) = server.connect(&alice);
    a.ping("start");
    for round in 0..TYPING_ROUNDS {
        let (mut b, _) = server.connect(&bob);
        a.send(json!({"type": "typing:start", "channel_id": cid}));
        let typing = b.recv_type("typing");
        assert_eq!(typing["channel_id"], cid.as_str(), "round {round}");
        assert_eq!(typing["user_id"], alice.id.as_str(), "round {round}");
    }
}
