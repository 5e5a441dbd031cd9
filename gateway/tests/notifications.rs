//! End-to-end tests of notification preferences (`API.md` §13) against the real `chorus`
//! binary: the caller's `prefs` with their defaults and checks, per-channel preferences
//! and their isolation, push devices, and all of it surviving SIGKILL.
//!
//! Each test starts one server and restarts it once; no test starts several at once, so
//! that a loaded machine does not keep one from printing its address in time.

mod common;

use common::{Server, User, UNLIMITED};
use serde_json::{json, Value};

const PREFS: &str = "/api/v1/me/notification-prefs";
const DEVICES: &str = "/api/v1/me/push-devices";

fn channel_prefs(cid: &str) -> String {
    format!("/api/v1/channels/{cid}/notification-prefs")
}

/// A PATCH of the caller's prefs that must succeed; returns the prefs it answers.
#[track_caller]
fn patch(s: &Server, user: &User, body: Value) -> Value {
    s.ok("PATCH", PREFS, user, Some(body), 200)["prefs"].clone()
}

/// A push device's registration body.
fn device(app_id: &str, pushkey: &str, platform: &str) -> Value {
    json!({"app_id": app_id, "pushkey": pushkey, "platform": platform})
}

/// Registers a push device, which must succeed; returns the device.
#[track_caller]
fn add_device(s: &Server, user: &User, app_id: &str, pushkey: &str, platform: &str) -> Value {
    let body = device(app_id, pushkey, platform);
    s.ok("POST", DEVICES, user, Some(body), 201)["device"].clone()
}

/// The IDs of a user's push devices, as listed.
#[track_caller]
fn device_ids(s: &Server, user: &User) -> Vec<String> {
    let v = s.ok("GET", DEVICES, user, None, 200);
    assert_eq!(v["next_cursor"], Value::Null);
    v["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|d| common::str_of(&d["id"]))
        .collect()
}

/// A call that must fail with 400 and `API.md`'s error body; returns the message.
#[track_caller]
fn refused(s: &Server, method: &str, path: &str, user: &User, body: Value, code: &str) -> String {
    let r = s.call(method, path, Some(&user.token), Some(body));
    r.assert_error(400, code);
    common::str_of(&r.body["error"]["message"])
}

// A new user has §13's defaults; a PATCH changes exactly the fields it names and answers
// the whole prefs; every bad value is refused with 400 and changes nothing; unknown fields
// are ignored as everywhere in the API; and the prefs survive a SIGKILL.
#[test]
fn prefs_defaults_patch_validation_and_restart() {
    let mut s = Server::start(UNLIMITED);
    let alice = s.signup("alice");
    let bob = s.signup("bob");
    let defaults = json!({
        "push": "mentions", "email": "mentions", "email_digest_s": 900,
        "keywords": [], "dnd_schedule": null,
    });
    assert_eq!(s.ok("GET", PREFS, &alice, None, 200)["prefs"], defaults);

    let p = patch(&s, &alice, json!({"push": "all"}));
    assert_eq!(p["push"], "all");
    assert_eq!(p["email"], "mentions", "untouched");
    let p = patch(&s, &alice, json!({"email": "none", "email_digest_s": 3600}));
    assert_eq!((&p["push"], &p["email"]), (&json!("all"), &json!("none")));
    assert_eq!(p["email_digest_s"], 3600);
    let p = patch(
        &s,
        &alice,
        json!({"keywords": [" Deploy ", "deploy", "on call"]}),
    );
    assert_eq!(
        p["keywords"],
        json!(["Deploy", "on call"]),
        "trimmed, repeats dropped"
    );
    let schedule =
        json!({"tz": "Asia/Tokyo", "days": ["sun", "fri"], "start": "22:00", "end": "07:00"});
    let p = patch(
        &s,
        &alice,
        json!({"dnd_schedule": schedule, "future_field": 1}),
    );
    assert_eq!(
        p["dnd_schedule"],
        json!({"tz": "Asia/Tokyo", "days": ["fri", "sun"], "start": "22:00", "end": "07:00"})
    );
    assert!(p.get("future_field").is_none());
    let saved = s.ok("GET", PREFS, &alice, None, 200)["prefs"].clone();
    assert_eq!(saved, p);
    // Another user's prefs are their own.
    assert_eq!(s.ok("GET", PREFS, &bob, None, 200)["prefs"], defaults);

    // Every bad value: 400 with the error body, and nothing changes.
    let fifty_one: Vec<String> = (0..51).map(|i| format!("k{i}")).collect();
    let fifty: Vec<String> = (0..50).map(|i| format!("k{i}")).collect();
    let long = "k".repeat(65);
    let tz = |tz: &str| json!({"dnd_schedule": {"tz": tz, "days": ["mon"], "start": "22:00", "end": "07:00"}});
    let when = |days: Value, start: &str, end: &str| json!({"dnd_schedule": {"tz": "Europe/Paris", "days": days, "start": start, "end": end}});
    let invalid = [
        json!({"push": "loud"}),
        json!({"email": "sometimes"}),
        json!({"email_digest_s": 604801}),
        json!({"keywords": [long]}),
        json!({"keywords": [""]}),
        tz("Mars/Olympus"),
        tz("+02:00"),
        when(json!(["mon", "funday"]), "22:00", "07:00"),
        when(json!([]), "22:00", "07:00"),
        when(json!(["mon"]), "25:00", "07:00"),
        when(json!(["mon"]), "22:00", "7:00"),
        when(json!(["mon"]), "22:00", "22:00"),
        json!({"push": "all", "keywords": [long]}),
    ];
    for body in invalid {
        let message = refused(&s, "PATCH", PREFS, &alice, body.clone(), "invalid_request");
        assert!(!message.is_empty(), "{body}");
    }
    let message = refused(
        &s,
        "PATCH",
        PREFS,
        &alice,
        tz("Mars/Olympus"),
        "invalid_request",
    );
    assert!(message.contains("IANA"), "{message}");
    refused(
        &s,
        "PATCH",
        PREFS,
        &alice,
        json!({"keywords": fifty_one}),
        "too_many",
    );
    for wrong_type in [
        json!({"email_digest_s": -1}),
        json!({"keywords": "deploy"}),
        json!({"push": 1}),
    ] {
        refused(&s, "PATCH", PREFS, &alice, wrong_type, "invalid_json");
    }
    assert_eq!(s.ok("GET", PREFS, &alice, None, 200)["prefs"], saved);
    // Exactly 50 keywords, each up to 64 characters, are fine; null clears the schedule.
    let p = patch(&s, &alice, json!({"keywords": fifty}));
    assert_eq!(p["keywords"].as_array().unwrap().len(), 50);
    let p = patch(
        &s,
        &alice,
        json!({"keywords": ["k".repeat(64)], "dnd_schedule": null}),
    );
    assert_eq!(p["dnd_schedule"], Value::Null);
    let p = patch(&s, &alice, json!({"dnd_schedule": schedule}));
    let last = s.ok("GET", PREFS, &alice, None, 200)["prefs"].clone();
    assert_eq!(last, p);

    s.kill();
    s.restart();
    assert_eq!(s.ok("GET", PREFS, &alice, None, 200)["prefs"], last);
    assert_eq!(s.ok("GET", PREFS, &bob, None, 200)["prefs"], defaults);
}

// Channel preferences are set and read back per user and channel, a bad level is refused,
// and a channel the caller cannot see (another workspace's, or a private one they are not
// in) is 404 like an unknown one. Push devices are added, listed and deleted; deleting
// another user's device is 404 and leaves it. All of it survives a SIGKILL.
#[test]
fn channel_prefs_devices_isolation_and_restart() {
    let mut s = Server::start(UNLIMITED);
    let alice = s.signup("alice");
    let bob = s.signup("bob");
    let mallory = s.signup("mallory");
    let wid = s.workspace(&alice, &[&bob]);
    let general = s.channel(&wid, &alice, "general", &[&bob]);
    let secret_body = json!({"name": "secret", "kind": "private"});
    let secret = s.ok(
        "POST",
        &format!("/api/v1/workspaces/{wid}/channels"),
        &alice,
        Some(secret_body),
        201,
    );
    let secret = common::str_of(&secret["channel"]["id"]);
    let wm = s.workspace(&mallory, &[]);
    let theirs = s.channel(&wm, &mallory, "theirs", &[]);

    let default = json!({"channel_id": general, "level": "default", "muted": false});
    let path = channel_prefs(&general);
    assert_eq!(
        s.ok("GET", &path, &alice, None, 200)["channel_prefs"],
        default
    );
    let set = json!({"level": "all", "muted": true});
    let got = s.ok("PUT", &path, &alice, Some(set), 200)["channel_prefs"].clone();
    assert_eq!(
        got,
        json!({"channel_id": general, "level": "all", "muted": true})
    );
    assert_eq!(s.ok("GET", &path, &alice, None, 200)["channel_prefs"], got);
    assert_eq!(
        s.ok("GET", &path, &bob, None, 200)["channel_prefs"],
        default
    );
    // A PUT replaces the whole value: what it leaves out takes its default.
    let bobs = s.ok("PUT", &path, &bob, Some(json!({"level": "none"})), 200);
    assert_eq!(bobs["channel_prefs"]["muted"], false);
    let secret_prefs = json!({"level": "mentions", "muted": false});
    s.ok(
        "PUT",
        &channel_prefs(&secret),
        &alice,
        Some(secret_prefs),
        200,
    );
    for level in ["loud", "MENTIONS", ""] {
        let body = json!({"level": level});
        refused(&s, "PUT", &path, &alice, body, "invalid_request");
    }
    refused(
        &s,
        "PUT",
        &path,
        &alice,
        json!({"muted": "yes"}),
        "invalid_json",
    );
    // Out of reach: another workspace's channel, a private channel bob is not in, a
    // made-up one; all answer exactly alike, and nothing changes.
    let unknown = s.call("GET", &channel_prefs("C0"), Some(&mallory.token), None);
    unknown.assert_error(404, "not_found");
    let body = json!({"level": "none", "muted": true});
    for (user, cid) in [(&mallory, &general), (&bob, &secret), (&alice, &theirs)] {
        for (method, body) in [("GET", None), ("PUT", Some(body.clone()))] {
            let r = s.call(method, &channel_prefs(cid), Some(&user.token), body);
            r.assert_error(404, "not_found");
            assert_eq!(r.body["error"], unknown.body["error"], "{method} {cid}");
        }
    }
    assert_eq!(s.ok("GET", &path, &alice, None, 200)["channel_prefs"], got);

    // Devices.
    let d1 = add_device(&s, &alice, "io.chorus.ios", "k1", "apns");
    assert_eq!(d1["app_id"], "io.chorus.ios");
    assert_eq!(d1["pushkey"], "k1");
    assert_eq!(d1["platform"], "apns");
    let d1_id = common::str_of(&d1["id"]);
    let again = add_device(&s, &alice, "io.chorus.ios", "k1", "apns");
    assert_eq!(again["id"], d1["id"], "the same key is the same device");
    let d2_id = common::str_of(&add_device(&s, &alice, "io.chorus.web", "k2", "webpush")["id"]);
    let b1_id = common::str_of(&add_device(&s, &bob, "io.chorus.android", "kb", "fcm")["id"]);
    let huge = "k".repeat(513);
    for (app, key, platform) in [("a", "k", "gcm"), ("", "k", "fcm"), ("a", &huge, "fcm")] {
        let body = device(app, key, platform);
        refused(&s, "POST", DEVICES, &alice, body, "invalid_request");
    }
    refused(
        &s,
        "POST",
        DEVICES,
        &alice,
        json!({"app_id": "a"}),
        "invalid_json",
    );
    assert_eq!(device_ids(&s, &alice), [d1_id.clone(), d2_id.clone()]);
    assert_eq!(device_ids(&s, &bob), std::slice::from_ref(&b1_id));
    // Someone else's device, and a made-up one, are 404 alike; bob keeps his.
    let theirs_r = s.call(
        "DELETE",
        &format!("{DEVICES}/{b1_id}"),
        Some(&alice.token),
        None,
    );
    theirs_r.assert_error(404, "not_found");
    let made_up = s.call(
        "DELETE",
        &format!("{DEVICES}/Dzzzz"),
        Some(&alice.token),
        None,
    );
    assert_eq!(theirs_r.body, made_up.body);
    let not_an_id = s.call(
        "DELETE",
        &format!("{DEVICES}/nope"),
        Some(&alice.token),
        None,
    );
    not_an_id.assert_error(404, "not_found");
    assert_eq!(device_ids(&s, &bob), std::slice::from_ref(&b1_id));
    let r = s.call(
        "DELETE",
        &format!("{DEVICES}/{d2_id}"),
        Some(&alice.token),
        None,
    );
    assert_eq!(r.status, 204, "{}", r.text);
    let r = s.call(
        "DELETE",
        &format!("{DEVICES}/{d2_id}"),
        Some(&alice.token),
        None,
    );
    r.assert_error(404, "not_found");
    assert_eq!(device_ids(&s, &alice), std::slice::from_ref(&d1_id));

    s.kill();
    s.restart();
    assert_eq!(s.ok("GET", &path, &alice, None, 200)["channel_prefs"], got);
    let bobs_after = s.ok("GET", &path, &bob, None, 200)["channel_prefs"].clone();
    assert_eq!(bobs_after["level"], "none");
    let secret_after = s.ok("GET", &channel_prefs(&secret), &alice, None, 200);
    assert_eq!(secret_after["channel_prefs"]["level"], "mentions");
    assert_eq!(device_ids(&s, &alice), [d1_id]);
    assert_eq!(device_ids(&s, &bob), [b1_id]);
    // IDs are not given out twice after a restart.
    let d3 = add_device(&s, &alice, "io.chorus.web", "k3", "webpush");
    assert_ne!(common::str_of(&d3["id"]), d2_id);
}
