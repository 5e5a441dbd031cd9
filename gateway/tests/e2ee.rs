//! End-to-end tests of the end-to-end encryption key directory (`API.md` §14) against the
//! real `chorus` binary: devices bound to tokens, signed identity keys, one-time and
//! fallback keys claimed exactly once under concurrency and across SIGKILL, removal, and
//! isolation between workspaces.
//!
//! The keys are made here with ed25519-dalek, as a client's Olm account would make them:
//! the server checks the signature over the canonical JSON and nothing else of the keys.

mod common;

use base64::engine::general_purpose::STANDARD_NO_PAD;
use base64::Engine as _;
use common::{str_of, Server, User, UNLIMITED};
use ed25519_dalek::{Signer, SigningKey};
use serde_json::{json, Value};
use std::collections::BTreeSet;

const UPLOAD: &str = "/api/v1/e2ee/keys/upload";
const QUERY: &str = "/api/v1/e2ee/keys/query";
const CLAIM: &str = "/api/v1/e2ee/keys/claim";

fn b64(bytes: &[u8]) -> String {
    STANDARD_NO_PAD.encode(bytes)
}

/// Signs up `name` on device `device`.
#[track_caller]
fn signup_on(s: &Server, name: &str, device: &str) -> User {
    let email = format!("{name}@example.com");
    let body =
        json!({"email": email, "password": common::PASSWORD, "name": name, "device_id": device});
    let r = s.call("POST", "/api/v1/auth/signup", None, Some(body));
    assert_eq!(r.status, 201, "signup {name}: {}", r.text);
    assert_eq!(r.body["device_id"], device);
    User {
        id: str_of(&r.body["user"]["id"]),
        email,
        token: str_of(&r.body["token"]),
    }
}

/// Logs `user` in on `device`: the answer, for tests of refusals.
fn login_on(s: &Server, user: &User, device: &str) -> common::Resp {
    let body = json!({"email": user.email, "password": common::PASSWORD, "device_id": device});
    s.call("POST", "/api/v1/auth/login", None, Some(body))
}

/// `user` logged in on another device: the same user with that device's token.
#[track_caller]
fn on_device(s: &Server, user: &User, device: &str) -> User {
    let r = login_on(s, user, device);
    assert_eq!(r.status, 200, "login on {device}: {}", r.text);
    User {
        token: str_of(&r.body["token"]),
        ..user.clone()
    }
}

/// A device's `device_keys`, signed by the ed25519 key made from `seed` as §14 says.
fn device_keys(user: &User, device: &str, seed: u8) -> Value {
    let signing = SigningKey::from_bytes(&[seed; 32]);
    let curve = b64(&[seed ^ 0x5a; 32]);
    let ed = b64(signing.verifying_key().as_bytes());
    let canonical = format!(
        r#"{{"curve25519":"{curve}","device_id":"{device}","ed25519":"{ed}","user_id":"{}"}}"#,
        user.id
    );
    let signature = b64(&signing.sign(canonical.as_bytes()).to_bytes());
    json!({"curve25519": curve, "ed25519": ed, "signature": signature})
}

/// `n` one-time keys with IDs `k{from}`…, each key distinct.
fn one_time_keys(from: u32, n: u32) -> Value {
    let keys: serde_json::Map<String, Value> = (from..from + n)
        .map(|i| {
            let mut key = [0u8; 32];
            key[..4].copy_from_slice(&i.to_le_bytes());
            (format!("k{i:05}"), json!(b64(&key)))
        })
        .collect();
    Value::Object(keys)
}

/// An upload that must succeed; its `one_time_key_count`.
#[track_caller]
fn upload(s: &Server, user: &User, body: Value) -> u64 {
    let v = s.ok("POST", UPLOAD, user, Some(body), 200);
    v["one_time_key_count"]
        .as_u64()
        .expect("one_time_key_count")
}

/// A claim of one key of each of `devices`, which must succeed; the answer's keys.
#[track_caller]
fn claim(s: &Server, by: &User, devices: Value) -> Value {
    s.ok("POST", CLAIM, by, Some(json!({"devices": devices})), 200)["one_time_keys"].clone()
}

// A device is listed from its first identity key upload, with the keys it signed and its
// creation time; the server refuses keys not signed by the device, a key ID reused for
// another key, and changed identity keys, and takes the same upload again as a no-op.
// Users who share no workspace with the caller are left out of queries and claims.
#[test]
fn keys_are_signed_listed_and_only_within_shared_workspaces() {
    let s = Server::start(UNLIMITED);
    let alice = signup_on(&s, "alice", "alice-phone");
    let bob = signup_on(&s, "bob", "bob-laptop");
    let carol = signup_on(&s, "carol", "carol-1");
    s.workspace(&alice, &[&bob]);
    s.workspace(&carol, &[]);
    let query = |by: &User, ids: &[&str]| {
        s.ok("POST", QUERY, by, Some(json!({"user_ids": ids})), 200)["devices"].clone()
    };

    // Registered at sign-up, but listed only from the first key upload.
    assert_eq!(query(&bob, &[&alice.id]), json!({ alice.id.clone(): {} }));
    let keys = device_keys(&alice, "alice-phone", 1);
    assert_eq!(upload(&s, &alice, json!({"device_keys": keys})), 0);
    let listed = query(&bob, &[&alice.id, &bob.id, "not-an-id"]);
    let phone = &listed[&alice.id]["alice-phone"];
    assert_eq!(phone["curve25519"], keys["curve25519"]);
    assert_eq!(phone["ed25519"], keys["ed25519"]);
    assert_eq!(phone["signature"], keys["signature"]);
    assert!(str_of(&phone["created_at"]).ends_with('Z'));
    assert_eq!(listed[&bob.id], json!({}), "bob's device has no keys yet");
    assert_eq!(
        listed.as_object().unwrap().len(),
        2,
        "an unparsable ID names nobody"
    );
    // The same keys again change nothing; other keys for the device are refused.
    assert_eq!(upload(&s, &alice, json!({"device_keys": keys})), 0);
    let other = device_keys(&alice, "alice-phone", 2);
    let r = s.call(
        "POST",
        UPLOAD,
        Some(&alice.token),
        Some(json!({"device_keys": other})),
    );
    r.assert_error(409, "key_conflict");
    // Keys signed for another device, or by another key, are not the device's.
    let bobs_claimed = device_keys(&alice, "bob-laptop", 3);
    let r = s.call(
        "POST",
        UPLOAD,
        Some(&bob.token),
        Some(json!({"device_keys": bobs_claimed})),
    );
    r.assert_error(400, "bad_signature");
    let mut forged = device_keys(&bob, "bob-laptop", 4);
    forged["curve25519"] = json!(b64(&[9; 32]));
    let r = s.call(
        "POST",
        UPLOAD,
        Some(&bob.token),
        Some(json!({"device_keys": forged})),
    );
    r.assert_error(400, "bad_signature");

    // One-time keys: counted, the same again is a no-op, a reused ID is a conflict.
    assert_eq!(
        upload(&s, &alice, json!({"one_time_keys": one_time_keys(0, 30)})),
        30
    );
    assert_eq!(
        upload(&s, &alice, json!({"one_time_keys": one_time_keys(20, 20)})),
        40
    );
    let mut clash = one_time_keys(0, 1);
    clash["k00000"] = json!(b64(&[200; 32]));
    let r = s.call(
        "POST",
        UPLOAD,
        Some(&alice.token),
        Some(json!({"one_time_keys": clash})),
    );
    r.assert_error(409, "key_conflict");
    let fallback_clash = json!({"fallback_key": {"k00003": b64(&[201; 32])}});
    let r = s.call("POST", UPLOAD, Some(&alice.token), Some(fallback_clash));
    r.assert_error(409, "key_conflict");

    // Carol shares no workspace with alice: she sees no device and claims no key, and
    // alice's query leaves her out.
    assert_eq!(query(&carol, &[&alice.id]), json!({}));
    assert_eq!(
        claim(&s, &carol, json!({ alice.id.clone(): ["alice-phone"] })),
        json!({})
    );
    assert_eq!(
        query(&alice, &[&carol.id, &bob.id])
            .as_object()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        upload(&s, &alice, json!({})),
        40,
        "carol's claim took nothing"
    );
    let claimed = claim(
        &s,
        &bob,
        json!({ alice.id.clone(): ["alice-phone", "no-such-device"] }),
    );
    assert_eq!(claimed[&alice.id]["alice-phone"]["key_id"], "k00000");
    assert_eq!(claimed[&alice.id]["alice-phone"]["fallback"], false);
    assert_eq!(claimed[&alice.id].as_object().unwrap().len(), 1);
    assert_eq!(upload(&s, &alice, json!({})), 39);
}

// Fifty concurrent claims of one device holding twenty one-time keys: each key is handed
// out once, the thirty others get the fallback key, which is kept; a SIGKILL and restart
// hand out no claimed key again.
#[test]
fn concurrent_claims_hand_out_each_key_once_even_across_a_kill() {
    let mut s = Server::start(UNLIMITED);
    let alice = signup_on(&s, "alice", "phone");
    let claimers: Vec<User> = (0..50)
        .map(|i| signup_on(&s, &format!("claimer{i}"), "d"))
        .collect();
    let refs: Vec<&User> = claimers.iter().collect();
    s.workspace(&alice, &refs);
    let fallback = b64(&[77; 32]);
    let body = json!({"one_time_keys": one_time_keys(0, 20), "fallback_key": {"fb": fallback}});
    assert_eq!(upload(&s, &alice, body), 20);

    let want = json!({ alice.id.clone(): ["phone"] });
    let answers: Vec<Value> = std::thread::scope(|scope| {
        let handles: Vec<_> = (claimers.iter())
            .map(|c| scope.spawn(|| claim(&s, c, want.clone())))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let keys: Vec<&Value> = answers.iter().map(|a| &a[&alice.id]["phone"]).collect();
    let one_time: Vec<String> = (keys.iter())
        .filter(|k| k["fallback"] == false)
        .map(|k| str_of(&k["key_id"]))
        .collect();
    let distinct: BTreeSet<&String> = one_time.iter().collect();
    assert_eq!(one_time.len(), 20, "every one-time key handed out");
    assert_eq!(distinct.len(), 20, "none twice: {one_time:?}");
    let fallbacks = keys.iter().filter(|k| k["fallback"] == true);
    assert!(fallbacks
        .clone()
        .all(|k| k["key_id"] == "fb" && k["key"] == json!(fallback)));
    assert_eq!(fallbacks.count(), 30);
    assert_eq!(upload(&s, &alice, json!({})), 0);

    // After a SIGKILL the claims are still made: only the fallback key is left.
    s.kill();
    s.restart();
    assert_eq!(upload(&s, &alice, json!({})), 0);
    let after = claim(&s, &claimers[0], want.clone());
    assert_eq!(after[&alice.id]["phone"]["fallback"], true);
    // A claimed key's ID stays taken, with its key or another.
    let again = json!({"one_time_keys": {"k00005": b64(&[1; 32])}});
    let r = s.call("POST", UPLOAD, Some(&alice.token), Some(again));
    r.assert_error(409, "key_conflict");
}

// Removing a device: its tokens stop working at once and after a restart, it leaves the
// listing, its ID can never sign in again, and only its user can remove it. At most 20
// devices per user.
#[test]
fn a_removed_device_is_gone_for_good() {
    let mut s = Server::start(UNLIMITED);
    let alice = signup_on(&s, "alice", "phone");
    let bob = signup_on(&s, "bob", "bob-1");
    s.workspace(&alice, &[&bob]);
    let laptop = on_device(&s, &alice, "laptop");
    upload(
        &s,
        &laptop,
        json!({"device_keys": device_keys(&alice, "laptop", 5)}),
    );
    let listed = |by: &User| {
        let v = s.ok(
            "POST",
            QUERY,
            by,
            Some(json!({"user_ids": [alice.id]})),
            200,
        );
        let devices = v["devices"][&alice.id]
            .as_object()
            .cloned()
            .unwrap_or_default();
        devices.keys().cloned().collect::<Vec<_>>()
    };
    assert_eq!(listed(&bob), ["laptop"]);

    // Bob cannot remove it: it is not his (404, as for a device that does not exist).
    let path = "/api/v1/e2ee/devices/laptop";
    s.call("DELETE", path, Some(&bob.token), None)
        .assert_error(404, "not_found");
    assert_eq!(s.call("DELETE", path, Some(&alice.token), None).status, 204);
    let r = s.call("GET", "/api/v1/me", Some(&laptop.token), None);
    r.assert_error(401, "unauthorized");
    assert_eq!(listed(&bob), Vec::<String>::new());
    s.call("DELETE", path, Some(&alice.token), None)
        .assert_error(404, "not_found");
    login_on(&s, &alice, "laptop").assert_error(409, "conflict");
    // The other device is untouched.
    assert_eq!(
        s.call("GET", "/api/v1/me", Some(&alice.token), None).status,
        200
    );

    s.kill();
    s.restart();
    let r = s.call("GET", "/api/v1/me", Some(&laptop.token), None);
    r.assert_error(401, "unauthorized");
    login_on(&s, &alice, "laptop").assert_error(409, "conflict");

    // The device limit counts live devices: alice has one (phone), so 19 more fit.
    for i in 0..19 {
        on_device(&s, &alice, &format!("d{i}"));
    }
    login_on(&s, &alice, "one-too-many").assert_error(400, "too_many");
    // Signing in again on a known device is not a new device.
    on_device(&s, &alice, "d3");
}

// Bad input: every refusal has §2's error body and changes nothing.
#[test]
fn bad_key_input_is_refused() {
    let s = Server::start(UNLIMITED);
    let alice = signup_on(&s, "alice", "phone");
    let plain = s.signup("plain");
    let bad_device = json!({"email": "x@example.com", "password": common::PASSWORD, "name": "x", "device_id": "has space"});
    let r = s.call("POST", "/api/v1/auth/signup", None, Some(bad_device));
    r.assert_error(400, "invalid_request");
    assert_eq!(
        s.call(
            "POST",
            "/api/v1/auth/login",
            None,
            Some(json!({"email": "x@example.com", "password": common::PASSWORD}))
        )
        .status,
        401,
        "the refused sign-up made no account"
    );
    // Uploading needs a token bound to a device.
    let r = s.call(
        "POST",
        UPLOAD,
        Some(&plain.token),
        Some(json!({"one_time_keys": one_time_keys(0, 1)})),
    );
    r.assert_error(400, "invalid_request");
    let refused = [
        (
            json!({"one_time_keys": one_time_keys(0, 101)}),
            400,
            "too_many",
        ),
        (
            json!({"one_time_keys": {"k1": "not base64!"}}),
            400,
            "invalid_request",
        ),
        (
            json!({"one_time_keys": {"k1": b64(&[1; 16])}}),
            400,
            "invalid_request",
        ),
        (
            json!({"one_time_keys": {"bad id": b64(&[1; 32])}}),
            400,
            "invalid_request",
        ),
        (
            json!({"fallback_key": {"a": b64(&[1; 32]), "b": b64(&[2; 32])}}),
            400,
            "invalid_request",
        ),
        (
            json!({"device_keys": {"curve25519": "x"}}),
            400,
            "invalid_json",
        ),
        (json!({"one_time_keys": [1, 2]}), 400, "invalid_json"),
    ];
    for (body, status, code) in refused {
        let r = s.call("POST", UPLOAD, Some(&alice.token), Some(body.clone()));
        assert_eq!(r.status, status, "{body}: {}", r.text);
        r.assert_error(status, code);
    }
    assert_eq!(upload(&s, &alice, json!({})), 0, "nothing was stored");
    // A device holds at most 200 unclaimed one-time keys.
    assert_eq!(
        upload(&s, &alice, json!({"one_time_keys": one_time_keys(0, 100)})),
        100
    );
    assert_eq!(
        upload(
            &s,
            &alice,
            json!({"one_time_keys": one_time_keys(100, 100)})
        ),
        200
    );
    let r = s.call(
        "POST",
        UPLOAD,
        Some(&alice.token),
        Some(json!({"one_time_keys": one_time_keys(200, 1)})),
    );
    r.assert_error(400, "too_many");
    // Queries and claims name at most 1,000.
    let ids: Vec<String> = (0..1001).map(|i| format!("U{i}")).collect();
    let r = s.call(
        "POST",
        QUERY,
        Some(&alice.token),
        Some(json!({"user_ids": ids})),
    );
    r.assert_error(400, "too_many");
    let devices: Vec<String> = (0..1001).map(|i| format!("d{i}")).collect();
    let r = s.call(
        "POST",
        CLAIM,
        Some(&alice.token),
        Some(json!({"devices": {alice.id.clone(): devices}})),
    );
    r.assert_error(400, "too_many");
    assert_eq!(upload(&s, &alice, json!({})), 200);
}

const TO_DEVICE: &str = "/api/v1/e2ee/to-device";

/// Sends to-device messages from `from`'s device under `txn`; the answer.
fn send_to_device(s: &Server, from: &User, txn: &str, messages: Value) -> common::Resp {
    let path = format!("{TO_DEVICE}/{txn}");
    s.call(
        "PUT",
        &path,
        Some(&from.token),
        Some(json!({ "messages": messages })),
    )
}

/// A device's to-device messages after `after` (which acknowledges up to it).
#[track_caller]
fn read_to_device(s: &Server, device: &User, after: Option<u64>) -> Vec<Value> {
    let path = match after {
        Some(a) => format!("{TO_DEVICE}?after={a}"),
        None => TO_DEVICE.to_owned(),
    };
    let v = s.ok("GET", &path, device, None, 200);
    let messages = v["messages"].as_array().cloned().expect("messages");
    let last = messages
        .last()
        .map(|m| m["id"].clone())
        .unwrap_or(Value::Null);
    assert_eq!(v["next_cursor"], last);
    messages
}

// To-device messages over REST: each device gets its own, in ID order, with the sender's
// user and device; a transaction ID again does nothing; messages stay until read past,
// also across a SIGKILL; users of other workspaces get nothing; and a removed device's
// queue goes with it.
#[test]
fn to_device_messages_are_kept_until_acknowledged() {
    let mut s = Server::start(UNLIMITED);
    let alice = signup_on(&s, "alice", "phone");
    let laptop = signup_on(&s, "bob", "laptop");
    let tablet = on_device(&s, &laptop, "tablet");
    let carol = signup_on(&s, "carol", "carol-1");
    s.workspace(&alice, &[&laptop]);
    s.workspace(&carol, &[]);

    let to_all = |n: u32| {
        json!({
            laptop.id.clone(): {"laptop": {"n": n, "for": "laptop"}, "tablet": {"n": n}, "nope": {"n": n}},
            carol.id.clone(): {"carol-1": {"n": n}},
        })
    };
    assert_eq!(send_to_device(&s, &alice, "t1", to_all(1)).status, 200);
    assert_eq!(
        send_to_device(&s, &alice, "t1", to_all(99)).status,
        200,
        "replayed"
    );
    assert_eq!(send_to_device(&s, &alice, "t2", to_all(2)).status, 200);
    let got = read_to_device(&s, &laptop, None);
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(
        got[0],
        json!({"id": "1", "sender_id": alice.id, "sender_device_id": "phone", "content": {"n": 1, "for": "laptop"}})
    );
    assert_eq!(got[1]["id"], "2");
    assert_eq!(got[1]["content"]["n"], 2);
    assert!(
        read_to_device(&s, &carol, None).is_empty(),
        "carol shares no workspace with alice"
    );
    // Reading without `after` acknowledges nothing; reading after 1 drops 1.
    assert_eq!(read_to_device(&s, &laptop, None).len(), 2);
    let rest = read_to_device(&s, &laptop, Some(1));
    assert_eq!(
        rest.iter().map(|m| str_of(&m["id"])).collect::<Vec<_>>(),
        ["2"]
    );

    s.kill();
    s.restart();
    assert_eq!(
        read_to_device(&s, &laptop, None).len(),
        1,
        "the acknowledgement was durable"
    );
    assert_eq!(
        read_to_device(&s, &tablet, None).len(),
        2,
        "the tablet acknowledged nothing"
    );
    assert_eq!(send_to_device(&s, &alice, "t2", to_all(98)).status, 200);
    assert_eq!(
        read_to_device(&s, &tablet, None).len(),
        2,
        "a transaction is remembered across restarts"
    );
    assert!(read_to_device(&s, &laptop, Some(2)).is_empty());
    // A page at a time.
    for n in 3..8 {
        assert_eq!(
            send_to_device(&s, &alice, &format!("t{n}"), to_all(n)).status,
            200
        );
    }
    let v = s.ok("GET", &format!("{TO_DEVICE}?limit=2"), &laptop, None, 200);
    assert_eq!(v["messages"].as_array().unwrap().len(), 2);
    assert_eq!(v["next_cursor"], "4");

    // A removed device's queue is dropped with it.
    assert_eq!(
        s.call(
            "DELETE",
            "/api/v1/e2ee/devices/tablet",
            Some(&laptop.token),
            None
        )
        .status,
        204
    );
    s.call("GET", TO_DEVICE, Some(&tablet.token), None)
        .assert_error(401, "unauthorized");
}

// Bad to-device input: every refusal with §2's error body, nothing queued.
#[test]
fn bad_to_device_input_is_refused() {
    let s = Server::start(UNLIMITED);
    let alice = signup_on(&s, "alice", "phone");
    let bob = signup_on(&s, "bob", "laptop");
    let plain = s.signup("plain");
    s.workspace(&alice, &[&bob, &plain]);
    let to_bob = |content: Value| json!({ bob.id.clone(): {"laptop": content} });
    send_to_device(&s, &plain, "t", to_bob(json!({}))).assert_error(400, "invalid_request");
    send_to_device(&s, &alice, "t", to_bob(json!("not an object")))
        .assert_error(400, "invalid_request");
    let big = json!({"pad": "x".repeat(64 * 1024)});
    send_to_device(&s, &alice, "t", to_bob(big)).assert_error(413, "too_large");
    let r = s.call(
        "PUT",
        &format!("{TO_DEVICE}/t"),
        Some(&alice.token),
        Some(json!({"messages": [1]})),
    );
    r.assert_error(400, "invalid_json");
    let many: serde_json::Map<String, Value> =
        (0..1001).map(|i| (format!("d{i}"), json!({}))).collect();
    send_to_device(&s, &alice, "t", json!({ bob.id.clone(): many })).assert_error(400, "too_many");
    for q in ["?after=x", "?limit=0", "?limit=201"] {
        let r = s.call("GET", &format!("{TO_DEVICE}{q}"), Some(&bob.token), None);
        r.assert_error(400, "invalid_request");
    }
    s.call("GET", TO_DEVICE, Some(&plain.token), None)
        .assert_error(400, "invalid_request");
    assert!(
        read_to_device(&s, &bob, None).is_empty(),
        "nothing was queued"
    );
}

// A device's queue holds 10,000 messages: the next send is refused with 429 and a
// Retry-After, nothing of it is taken (not even for another device), and once the device
// reads past some, sends go through again.
#[test]
fn a_full_to_device_queue_refuses_and_never_drops() {
    let s = Server::start(UNLIMITED);
    let alice = signup_on(&s, "alice", "phone");
    let bob = signup_on(&s, "bob", "laptop");
    let tablet = on_device(&s, &bob, "tablet");
    s.workspace(&alice, &[&bob]);
    const QUEUE: u32 = 10_000;
    const SENDERS: u32 = 8;
    std::thread::scope(|scope| {
        for t in 0..SENDERS {
            let (s, alice, bob) = (&s, &alice, &bob);
            scope.spawn(move || {
                for i in (t..QUEUE).step_by(SENDERS as usize) {
                    let r = send_to_device(
                        s,
                        alice,
                        &format!("f{i}"),
                        json!({ bob.id.clone(): {"laptop": {"i": i}} }),
                    );
                    assert_eq!(r.status, 200, "{}", r.text);
                }
            });
        }
    });
    let both = json!({ bob.id.clone(): {"laptop": {"i": "over"}, "tablet": {"i": "over"}} });
    let r = send_to_device(&s, &alice, "over", both.clone());
    r.assert_error(429, "queue_full");
    assert!(r.retry_after.is_some(), "429 comes with Retry-After");
    assert!(
        read_to_device(&s, &tablet, None).is_empty(),
        "nothing of the refused call was taken"
    );
    // Every one of the 10,000 is there once, in ID order: read page by page, each read
    // acknowledging the page before it.
    let mut seen = BTreeSet::new();
    let mut after = 0;
    loop {
        let page = read_to_device(&s, &bob, Some(after));
        let Some(last) = page.last() else { break };
        for m in &page {
            after += 1;
            assert_eq!(str_of(&m["id"]), after.to_string());
            assert!(seen.insert(m["content"]["i"].as_u64().unwrap()), "{m}");
        }
        assert_eq!(str_of(&last["id"]), after.to_string());
    }
    assert_eq!(seen, (0..u64::from(QUEUE)).collect::<BTreeSet<_>>());
    // Read past, the queue has room again.
    assert_eq!(send_to_device(&s, &alice, "over", both).status, 200);
    assert_eq!(read_to_device(&s, &tablet, None).len(), 1);
    assert_eq!(read_to_device(&s, &bob, None).len(), 1);
}

/// The frames of `ws` up to and including the `event` frame of message `text`.
#[track_caller]
fn frames_until_message(ws: &mut common::Ws, text: &str) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let v = ws.recv();
        let done = v["type"] == "event" && v["event"]["message"]["text"] == text;
        seen.push(v);
        if done {
            return seen;
        }
        assert!(seen.len() < 10_000, "no event for {text}");
    }
}

/// The to-device IDs among `frames`, in order.
fn to_device_ids(frames: &[Value]) -> Vec<String> {
    (frames.iter())
        .filter(|f| f["type"] == "to_device")
        .map(|f| str_of(&f["id"]))
        .collect()
}

// Over the WebSocket: a device's connections get its to-device messages live, ahead of a
// channel event accepted after them, and no other device's; unacknowledged messages come
// again on every new connection of the device, first; `to_device:ack` drops them; a
// connection is sent at most 100 beyond what was acknowledged, and each acknowledgement
// refills the window.
#[test]
fn to_device_frames_reach_their_device_in_order_until_acknowledged() {
    let s = Server::start(UNLIMITED);
    let alice = signup_on(&s, "alice", "phone");
    let laptop = signup_on(&s, "bob", "laptop");
    let tablet = on_device(&s, &laptop, "tablet");
    let plain = User {
        token: str_of(&login_on(&s, &laptop, "laptop").body["token"]),
        ..laptop.clone()
    };
    let wid = s.workspace(&alice, &[&laptop]);
    let cid = s.channel(&wid, &alice, "general", &[&laptop]);
    let (mut ws_laptop, _) = s.connect(&laptop);
    let (mut ws_tablet, _) = s.connect(&tablet);
    // A plain token (no device) of bob's gets nothing of any device.
    let plain_token = {
        let body = json!({"email": laptop.email, "password": common::PASSWORD});
        str_of(&s.call("POST", "/api/v1/auth/login", None, Some(body)).body["token"])
    };
    let mut ws_plain = s.connect_raw(&plain_token).expect("upgrade");
    assert_eq!(ws_plain.recv()["type"], "hello");
    drop(plain);

    let to_laptop = |n: u32| json!({ laptop.id.clone(): {"laptop": {"n": n}} });
    assert_eq!(send_to_device(&s, &alice, "t1", to_laptop(1)).status, 200);
    s.post(&alice, &cid, "after one");
    let frames = frames_until_message(&mut ws_laptop, "after one");
    assert_eq!(to_device_ids(&frames), ["1"]);
    let first = frames.iter().find(|f| f["type"] == "to_device").unwrap();
    assert_eq!(first["sender_id"], alice.id);
    assert_eq!(first["sender_device_id"], "phone");
    assert_eq!(first["content"], json!({"n": 1}));
    for ws in [&mut ws_tablet, &mut ws_plain] {
        let frames = frames_until_message(ws, "after one");
        assert!(to_device_ids(&frames).is_empty(), "{frames:?}");
    }

    // Not acknowledged: a new connection of the laptop gets it again, before anything.
    drop(ws_laptop);
    let (mut again, _) = s.connect(&laptop);
    let frame = again.recv();
    assert_eq!(
        (frame["type"].clone(), frame["id"].clone()),
        (json!("to_device"), json!("1"))
    );
    again.send(json!({"type": "to_device:ack", "upto_id": "1", "ref": "a1"}));
    assert_eq!(again.recv_type("ack")["ref"], "a1");
    drop(again);
    let (mut third, _) = s.connect(&laptop);
    s.post(&alice, &cid, "after ack");
    assert!(to_device_ids(&frames_until_message(&mut third, "after ack")).is_empty());

    // A window of 100: of 150 sent, 100 come; acknowledging 50 brings the other 50.
    for n in 0..150 {
        assert_eq!(
            send_to_device(&s, &alice, &format!("w{n}"), to_laptop(n)).status,
            200
        );
    }
    s.post(&alice, &cid, "after 150");
    let frames = frames_until_message(&mut third, "after 150");
    let ids = to_device_ids(&frames);
    assert_eq!(ids.len(), 100);
    assert_eq!((ids[0].as_str(), ids[99].as_str()), ("2", "101"));
    third.send(json!({"type": "to_device:ack", "upto_id": "51", "ref": "a51"}));
    assert_eq!(third.recv_type("ack")["ref"], "a51");
    s.post(&alice, &cid, "after ack 51");
    let ids = to_device_ids(&frames_until_message(&mut third, "after ack 51"));
    let want: Vec<String> = (102..=151).map(|i| i.to_string()).collect();
    assert_eq!(ids, want);
    // A bad acknowledgement is an error; one from a connection with no device too.
    third.send(json!({"type": "to_device:ack", "upto_id": "x", "ref": "bad"}));
    assert_eq!(third.recv_type("error")["ref"], "bad");
    ws_plain.send(json!({"type": "to_device:ack", "upto_id": "1", "ref": "nodev"}));
    let e = ws_plain.recv_type("error");
    assert_eq!(
        (e["ref"].clone(), e["code"].clone()),
        (json!("nodev"), json!("invalid_request"))
    );
}

// The device's connections hear when its one-time keys run low (fewer than 10), and a
// removed device's connections are closed with 4001 while the user's others stay.
#[test]
fn keys_low_signal_and_removed_device_connections_close() {
    let s = Server::start(UNLIMITED);
    let alice = signup_on(&s, "alice", "phone");
    let laptop = signup_on(&s, "bob", "laptop");
    let tablet = on_device(&s, &laptop, "tablet");
    s.workspace(&alice, &[&laptop]);
    assert_eq!(
        upload(&s, &laptop, json!({"one_time_keys": one_time_keys(0, 11)})),
        11
    );
    let (mut ws_laptop, _) = s.connect(&laptop);
    let (mut ws_tablet, _) = s.connect(&tablet);
    // 11 → 10: not low yet; 10 → 9: low.
    claim(&s, &alice, json!({ laptop.id.clone(): ["laptop"] }));
    claim(&s, &alice, json!({ laptop.id.clone(): ["laptop"] }));
    let low = ws_laptop.recv_type("e2ee:keys_low");
    assert_eq!(low["one_time_key_count"], 9);
    ws_laptop.ping("p");
    assert!(
        !ws_laptop.stash_holds("e2ee:keys_low"),
        "one signal for the claim that crossed the line, none before"
    );

    let r = s.call(
        "DELETE",
        "/api/v1/e2ee/devices/tablet",
        Some(&laptop.token),
        None,
    );
    assert_eq!(r.status, 204);
    let (code, reason, _) = ws_tablet.recv_close();
    assert_eq!((code, reason.as_str()), (4001, "device removed"));
    ws_laptop.ping("still here");
}

/// The events of `channel` after `since`, in order, as a new connection of `user` that
/// resumes from there reads them.
fn events_since(s: &Server, user: &User, channel: &str, since: u64) -> Vec<Value> {
    let (mut ws, _) = s.connect(user);
    ws.send(json!({"type": "resume", "since": {channel: since}}));
    let mut events = Vec::new();
    loop {
        let f = ws.recv();
        match f["type"].as_str() {
            Some("resumed") => return events,
            Some("event") if f["channel_id"] == channel => events.push(f),
            _ => {}
        }
    }
}

/// `(type, user_id, device_id)` of device events.
fn device_events(events: &[Value]) -> Vec<(String, String, String)> {
    events
        .iter()
        .map(|f| &f["event"])
        .filter(|e| str_of(&e["type"]).starts_with("device:"))
        .map(|e| {
            (
                str_of(&e["type"]),
                str_of(&e["user_id"]),
                str_of(&e["device_id"]),
            )
        })
        .collect()
}

// An encrypted DM is its own channel; it starts with its members' listed devices and
// follows their additions and removals with events, committed before the key upload or
// removal is answered. It takes ciphertext only, encrypted for its newest device list: a
// stale send or edit is refused (REST and WebSocket alike) and stores nothing, the resend
// is taken, and the message carries the ciphertext with an empty text. Every §14 error of
// a send has its code, and search never finds an encrypted message.
#[test]
fn encrypted_dms_take_ciphertext_for_their_current_devices_only() {
    let s = Server::start(UNLIMITED);
    let alice = signup_on(&s, "alice", "alice-phone");
    let bob = signup_on(&s, "bob", "bob-laptop");
    let wid = s.workspace(&alice, &[&bob]);
    upload(
        &s,
        &alice,
        json!({"device_keys": device_keys(&alice, "alice-phone", 1)}),
    );
    upload(
        &s,
        &bob,
        json!({"device_keys": device_keys(&bob, "bob-laptop", 2)}),
    );
    let dms = format!("/api/v1/workspaces/{wid}/dms");
    let open = |by: &User, to: &User, encrypted: bool| {
        let body = json!({"user_ids": [to.id], "encrypted": encrypted});
        s.call("POST", &dms, Some(&by.token), Some(body))
    };
    let plain = open(&alice, &bob, false);
    assert_eq!(
        (plain.status, &plain.body["channel"]["encrypted"]),
        (201, &json!(false))
    );
    let sealed = open(&alice, &bob, true);
    assert_eq!(sealed.status, 201, "{}", sealed.text);
    let channel = &sealed.body["channel"];
    assert_eq!(
        (&channel["encrypted"], &channel["kind"]),
        (&json!(true), &json!("dm"))
    );
    assert_ne!(channel["id"], plain.body["channel"]["id"]);
    let again = open(&bob, &alice, true);
    assert_eq!(
        (again.status, &again.body["channel"]["id"]),
        (200, &channel["id"])
    );
    let cid = str_of(&channel["id"]);
    let plain_id = str_of(&plain.body["channel"]["id"]);

    // Two joins, then one device:added per listed device, in (user, device) order.
    let start = events_since(&s, &bob, &cid, 0);
    let types: Vec<String> = start.iter().map(|f| str_of(&f["event"]["type"])).collect();
    assert_eq!(
        types,
        [
            "member:joined",
            "member:joined",
            "device:added",
            "device:added"
        ]
    );
    let mut expected = vec![
        (
            "device:added".to_owned(),
            alice.id.clone(),
            "alice-phone".to_owned(),
        ),
        (
            "device:added".to_owned(),
            bob.id.clone(),
            "bob-laptop".to_owned(),
        ),
    ];
    expected.sort();
    assert_eq!(device_events(&start), expected);
    assert_eq!(s.last_seq(&alice, &cid), 4);

    // Bad sends, each with its code; none stores anything.
    let post = |by: &User, channel: &str, body: Value| {
        let path = format!("/api/v1/channels/{channel}/messages");
        s.call("POST", &path, Some(&by.token), Some(body))
    };
    post(&alice, &cid, json!({"text": "hello"})).assert_error(400, "encryption_mismatch");
    post(
        &alice,
        &plain_id,
        json!({"ciphertext": "CT", "devices_seq": 1}),
    )
    .assert_error(400, "encryption_mismatch");
    post(
        &alice,
        &cid,
        json!({"text": "hi", "ciphertext": "CT", "devices_seq": 4}),
    )
    .assert_error(400, "encryption_mismatch");
    post(&alice, &cid, json!({"ciphertext": "CT"})).assert_error(400, "invalid_request");
    post(&alice, &cid, json!({"ciphertext": "", "devices_seq": 4}))
        .assert_error(400, "invalid_request");
    post(&alice, &cid, json!({"ciphertext": "CT", "devices_seq": 99}))
        .assert_error(400, "invalid_request");
    let big = "A".repeat(64 * 1024 + 1);
    post(&alice, &cid, json!({"ciphertext": big, "devices_seq": 4})).assert_error(413, "too_large");
    assert_eq!(s.last_seq(&alice, &cid), 4);

    // A send for the current list is stored as sent, with an empty text.
    let r = post(
        &alice,
        &cid,
        json!({"ciphertext": "CT-zebrafish-1", "devices_seq": 4, "client_msg_id": "m1"}),
    );
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.body["message"]["text"], "");
    assert_eq!(r.body["message"]["ciphertext"], "CT-zebrafish-1");
    let first = str_of(&r.body["message"]["id"]);

    // Bob's phone uploads its keys: by the answer, the channel has its event.
    let phone = on_device(&s, &bob, "bob-phone");
    upload(
        &s,
        &phone,
        json!({"device_keys": device_keys(&bob, "bob-phone", 3)}),
    );
    assert_eq!(s.last_seq(&alice, &cid), 6);
    let added = events_since(&s, &bob, &cid, 5);
    assert_eq!(
        device_events(&added),
        [(
            "device:added".to_owned(),
            bob.id.clone(),
            "bob-phone".to_owned()
        )]
    );
    assert_eq!(added[0]["seq"], 6);

    // Encrypted for the list before it: refused over REST and over the WebSocket, and
    // nothing stored; the resend for the new list is taken.
    post(
        &alice,
        &cid,
        json!({"ciphertext": "CT-2", "devices_seq": 4, "client_msg_id": "m2"}),
    )
    .assert_error(409, "stale_devices");
    let (mut alice_ws, _) = s.connect(&alice);
    alice_ws.send(
        json!({"type": "message:send", "ref": "w1", "channel_id": cid,
        "ciphertext": "CT-2", "devices_seq": 5, "client_msg_id": "m2"}),
    );
    let refused = alice_ws.recv_type("error");
    assert_eq!(
        (&refused["ref"], &refused["code"]),
        (&json!("w1"), &json!("stale_devices"))
    );
    alice_ws.send(
        json!({"type": "message:send", "ref": "w2", "channel_id": cid,
        "text": "plain words"}),
    );
    let refused = alice_ws.recv_type("error");
    assert_eq!(refused["code"], "encryption_mismatch");
    assert_eq!(s.last_seq(&alice, &cid), 6);
    alice_ws.send(
        json!({"type": "message:send", "ref": "w3", "channel_id": cid,
        "ciphertext": "CT-2", "devices_seq": 6, "client_msg_id": "m2"}),
    );
    let ack = alice_ws.recv_type("ack");
    assert_eq!(
        (&ack["ref"], &ack["message"]["ciphertext"]),
        (&json!("w3"), &json!("CT-2"))
    );
    assert_eq!(ack["message"]["seq"], 7);

    // Edits carry new ciphertext, for the current list.
    let edit_path = format!("/api/v1/channels/{cid}/messages/{first}");
    let edit = |body: Value| s.call("PATCH", &edit_path, Some(&alice.token), Some(body));
    edit(json!({"text": "plain"})).assert_error(400, "encryption_mismatch");
    edit(json!({"ciphertext": "CT-1b", "devices_seq": 4})).assert_error(409, "stale_devices");
    let r = edit(json!({"ciphertext": "CT-1b", "devices_seq": 7}));
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        (&r.body["message"]["text"], &r.body["message"]["ciphertext"]),
        (&json!(""), &json!("CT-1b"))
    );

    // Removing the phone is an event of the channel too, before the removal is answered.
    let r = s.call(
        "DELETE",
        "/api/v1/e2ee/devices/bob-phone",
        Some(&phone.token),
        None,
    );
    assert_eq!(r.status, 204, "{}", r.text);
    let removed = events_since(&s, &bob, &cid, 8);
    assert_eq!(
        device_events(&removed),
        [(
            "device:removed".to_owned(),
            bob.id.clone(),
            "bob-phone".to_owned()
        )]
    );
    post(
        &alice,
        &cid,
        json!({"ciphertext": "CT-3", "devices_seq": 7}),
    )
    .assert_error(409, "stale_devices");

    // Search finds the plain DM's word, never the ciphertext that holds it too.
    post(
        &alice,
        &plain_id,
        json!({"text": "zebrafish in the plain DM"}),
    );
    let path = format!("/api/v1/workspaces/{wid}/search/messages?q=zebrafish");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let results = loop {
        let r = s.ok("GET", &path, &alice, None, 200);
        if r["total"].as_u64() > Some(0) || std::time::Instant::now() > deadline {
            break r["results"].clone();
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let channels: Vec<String> = (results.as_array().unwrap().iter())
        .map(|r| str_of(&r["message"]["channel_id"]))
        .collect();
    assert_eq!(channels, [plain_id], "{results}");
    let search = format!("/api/v1/workspaces/{wid}/search/messages?q=CT");
    assert_eq!(s.ok("GET", &search, &alice, None, 200)["total"], 0);
}
