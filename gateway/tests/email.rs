//! End-to-end tests of email digests (`API.md` §13, "Email") against the real `chorus`
//! binary and a real SMTP server on loopback (`common::smtp`: aiosmtpd). Skipped with a
//! reason when aiosmtpd is not installed, except where `CHORUS_REQUIRE_PEERS` is set (CI
//! installs it and sets that).
//!
//! "Nothing arrives" is checked after a barrier: a digest to another user that was decided
//! in the same round and must arrive, plus a grace for the senders' other digests.

mod common;

use common::smtp::{Smtp, ARRIVE_WAIT, PUBLIC_URL};
use common::{str_of, Server, User};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// After a barrier arrived, how long other digests of the same round may still take.
const SETTLE: Duration = Duration::from_millis(1500);

/// Sets a user's notification preferences.
#[track_caller]
fn prefs(s: &Server, user: &User, body: Value) {
    s.ok(
        "PATCH",
        "/api/v1/me/notification-prefs",
        user,
        Some(body),
        200,
    );
}

/// Posts; answers the message's ID.
#[track_caller]
fn post(s: &Server, user: &User, cid: &str, text: &str) -> String {
    str_of(&s.post(user, cid, text)["id"])
}

/// Marks a channel read up to the message `mid` (its seq).
#[track_caller]
fn read_up_to(s: &Server, user: &User, cid: &str, mid: &str) {
    let seq = s
        .messages(user, cid)
        .into_iter()
        .find(|m| m["id"] == mid)
        .expect("the message")["seq"]
        .clone();
    let path = format!("/api/v1/channels/{cid}/read");
    s.ok("POST", &path, user, Some(json!({ "seq": seq })), 200);
}

fn link(cid: &str, mid: &str) -> String {
    format!("{PUBLIC_URL}/channels/{cid}/messages/{mid}")
}

/// The text part's lines from a section's title up to the next blank line.
fn section<'a>(text: &'a str, title: &str) -> Vec<&'a str> {
    text.lines()
        .skip_while(|l| *l != title)
        .skip(1)
        .take_while(|l| !l.is_empty())
        .collect()
}

// One digest per window lists, grouped by channel (in the order of each channel's first
// listed message), the messages of the window still unread when it closes, with their
// current text and a link under public_url, in both a text and an HTML part; read or
// deleted messages are left out; the next window's digest comes no sooner than
// email_digest_s later.
#[test]
fn digest_lists_unread_messages_by_channel() {
    let Some(smtp) = Smtp::start() else { return };
    let s = Server::start(&smtp.config());
    let alice = s.signup("alice");
    let bob = s.signup("bob");
    let wid = s.workspace(&alice, &[&bob]);
    let general = s.channel(&wid, &alice, "general", &[&bob]);
    let random = s.channel(&wid, &alice, "random", &[&bob]);
    let digest_s = 3;
    prefs(
        &s,
        &bob,
        json!({"email": "all", "email_digest_s": digest_s}),
    );
    let read = post(&s, &alice, &general, "read before the digest");
    let kept = post(&s, &alice, &random, "in <random> & kept");
    let deleted = post(&s, &alice, &general, "deleted before the digest");
    let edited = post(&s, &alice, &general, "first text");
    read_up_to(&s, &bob, &general, &read);
    let path = format!("/api/v1/channels/{general}/messages/{deleted}");
    s.ok("DELETE", &path, &alice, None, 204);
    let path = format!("/api/v1/channels/{general}/messages/{edited}");
    s.ok(
        "PATCH",
        &path,
        &alice,
        Some(json!({"text": "edited text"})),
        200,
    );

    let (m, first_at) = smtp.wait_for(&bob.email, 1);
    assert_eq!(m["from"], "Chorus <chorus@example.com>");
    assert_eq!(m["to"], bob.email);
    assert_eq!(m["multipart"], "multipart/alternative");
    assert_eq!(m["subject"], "2 unread messages in Chorus");
    let text = m["text"].as_str().expect("a text part");
    let html = m["html"].as_str().expect("an HTML part");
    assert_eq!(
        section(text, "#general"),
        vec![
            "- alice: edited text".to_owned(),
            format!("  {}", link(&general, &edited))
        ]
    );
    assert_eq!(
        section(text, "#random"),
        vec![
            "- alice: in <random> & kept".to_owned(),
            format!("  {}", link(&random, &kept))
        ]
    );
    for gone in ["read before", "deleted before", "first text"] {
        assert!(
            !text.contains(gone) && !html.contains(gone),
            "{gone}: {text}"
        );
    }
    let general_at = html.find("<h2>#general</h2>").expect("general in HTML");
    let random_at = html.find("<h2>#random</h2>").expect("random in HTML");
    let edited_at = html.find("edited text").unwrap();
    let kept_at = html.find("in &lt;random&gt; &amp; kept").expect("escaped");
    // Channels in the order of their first listed message: `kept` was posted first.
    assert!(
        random_at < kept_at && kept_at < general_at && general_at < edited_at,
        "{html}"
    );
    assert!(html.contains(&format!("href=\"{}\"", link(&general, &edited))));
    assert!(html.contains(&format!("href=\"{}\"", link(&random, &kept))));
    wait_metric(&s, "chorus_notify_emails_sent_total", 1.0);

    // The next message opens the next window: its digest comes a window later.
    let next = post(&s, &alice, &general, "next window");
    let (m, second_at) = smtp.wait_for(&bob.email, 2);
    assert_eq!(m["subject"], "1 unread message in Chorus");
    assert!(m["text"].as_str().unwrap().contains(&link(&general, &next)));
    let gap = second_at - first_at;
    assert!(
        gap >= Duration::from_secs(digest_s),
        "digests {gap:?} apart"
    );
    std::thread::sleep(SETTLE);
    assert_eq!(smtp.to(&bob.email).len(), 2, "one digest per window");
}

// Nothing is emailed to whoever read everything of the window, to whoever's email level
// is none (theirs or the channel's), for a message their level `mentions` lets through
// no mention of, or to whoever switched email off or muted the channel while the window
// was open; the barrier is a digest of the same round to another user.
#[test]
fn nothing_is_sent_when_read_or_not_wanted() {
    let Some(smtp) = Smtp::start() else { return };
    let s = Server::start(&smtp.config());
    let alice = s.signup("alice");
    let names = [
        "reader", "none", "quiet", "mentions", "off", "muter", "barrier",
    ];
    let users: Vec<User> = names.iter().map(|n| s.signup(n)).collect();
    let [reader, none, quiet, mentions, off, muter, barrier] = &users[..] else {
        unreachable!()
    };
    let members: Vec<&User> = users.iter().collect();
    let wid = s.workspace(&alice, &members);
    let cid = s.channel(&wid, &alice, "general", &members);
    for u in [reader, quiet, off, muter, barrier] {
        prefs(&s, u, json!({"email": "all", "email_digest_s": 2}));
    }
    prefs(&s, none, json!({"email": "none", "email_digest_s": 1}));
    prefs(
        &s,
        mentions,
        json!({"email": "mentions", "email_digest_s": 1}),
    );
    let path = format!("/api/v1/channels/{cid}/notification-prefs");
    let body = json!({"level": "none", "muted": false});
    s.ok("PUT", &path, quiet, Some(body), 200);

    let m = post(&s, &alice, &cid, "hello everyone");
    // Decided for reader, off, muter and barrier first: what follows is checked at send time.
    wait_for_email_items(&s, 4);
    read_up_to(&s, reader, &cid, &m);
    prefs(&s, off, json!({"email": "none"}));
    let body = json!({"level": "default", "muted": true});
    s.ok("PUT", &path, muter, Some(body), 200);
    let (digest, _) = smtp.wait_for(&barrier.email, 1);
    assert!(digest["text"].as_str().unwrap().contains("hello everyone"));
    std::thread::sleep(SETTLE);
    for u in [reader, none, quiet, mentions, off, muter] {
        assert_eq!(smtp.to(&u.email), Vec::<Value>::new(), "{}", u.email);
    }
    assert_eq!(s.metric("chorus_notify_emails_sent_total"), 1.0);
}

// A transient SMTP refusal delays the digest without losing it or sending it twice.
#[test]
fn a_refused_digest_is_retried() {
    let Some(smtp) = Smtp::refusing(2) else {
        return;
    };
    let s = Server::start(&smtp.config());
    let alice = s.signup("alice");
    let bob = s.signup("bob");
    let wid = s.workspace(&alice, &[&bob]);
    let cid = s.channel(&wid, &alice, "general", &[&bob]);
    prefs(&s, &bob, json!({"email": "all", "email_digest_s": 1}));
    let m = post(&s, &alice, &cid, "worth the wait");
    // The outbox depth counts the email item while its window is open, and not once the
    // digest is answered.
    wait_depth(&s, 1.0);
    let (digest, _) = smtp.wait_for(&bob.email, 1);
    assert!(digest["text"].as_str().unwrap().contains(&link(&cid, &m)));
    let refused = |v: &Value| v["refused"] == true;
    assert_eq!(
        smtp.received
            .lock()
            .unwrap()
            .iter()
            .filter(|v| refused(v))
            .count(),
        2
    );
    std::thread::sleep(SETTLE);
    assert_eq!(smtp.to(&bob.email).len(), 1);
    assert_eq!(s.metric("chorus_notify_emails_sent_total"), 1.0);
    wait_depth(&s, 0.0);
}

/// Waits until `chorus_notify_outbox_depth` is `depth` (the sender counts an answer just
/// after the SMTP server took it).
#[track_caller]
fn wait_depth(s: &Server, depth: f64) {
    wait_metric(s, "chorus_notify_outbox_depth", depth);
}

/// Waits for a metric to read `value`: the sender counts an email once its SMTP session
/// returns, a moment after the SMTP server has the message.
fn wait_metric(s: &Server, name: &str, value: f64) {
    let deadline = Instant::now() + ARRIVE_WAIT;
    loop {
        let now = s.metric(name);
        if now == value {
            return;
        }
        assert!(Instant::now() < deadline, "{name} {now}, not {value}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The outbox log's text (its records are JSON), empty before it exists.
fn outbox_text(s: &Server) -> String {
    let path = s.dir().join("data/notify/outbox.log");
    String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
}

/// Waits until the decider stored `n` email items.
#[track_caller]
fn wait_for_email_items(s: &Server, n: usize) {
    let deadline = Instant::now() + ARRIVE_WAIT;
    while outbox_text(s).matches("\"t\":\"email\"").count() < n {
        assert!(
            Instant::now() < deadline,
            "fewer than {n} email items stored"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `closes` of the first email item in the outbox, once the decider stored one.
#[track_caller]
fn stored_window_closes(s: &Server) -> u64 {
    let deadline = Instant::now() + ARRIVE_WAIT;
    loop {
        let text = outbox_text(s);
        if let Some(at) = text.find("\"closes\":") {
            let digits: String = text[at + 9..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            return digits.parse().expect("closes");
        }
        assert!(Instant::now() < deadline, "no email item stored: {text:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

// A SIGKILL while a window is open loses nothing: after the restart the window is still
// open (a message posted before it closes joins it) and its one digest goes out.
#[test]
fn sigkill_while_a_window_is_open_still_sends_it() {
    let Some(smtp) = Smtp::start() else { return };
    let mut s = Server::start(&smtp.config());
    let alice = s.signup("alice");
    let bob = s.signup("bob");
    let wid = s.workspace(&alice, &[&bob]);
    let cid = s.channel(&wid, &alice, "general", &[&bob]);
    prefs(&s, &bob, json!({"email": "all", "email_digest_s": 6}));
    let before = post(&s, &alice, &cid, "before the kill");
    let closes = stored_window_closes(&s);
    s.kill();
    s.restart();
    let after = post(&s, &alice, &cid, "after the restart");
    // Whether the second message made it into the window depends on how long the restart
    // took; it is in exactly one digest either way, and it must have joined when it was
    // posted well before the window closed.
    let surely_joined = now_ms() + 500 < closes;
    let (m, _) = smtp.wait_for(&bob.email, 1);
    let text = m["text"].as_str().unwrap();
    assert!(text.contains(&link(&cid, &before)), "{text}");
    if text.contains(&link(&cid, &after)) {
        std::thread::sleep(SETTLE);
        assert_eq!(smtp.to(&bob.email).len(), 1, "one digest for the window");
    } else {
        assert!(
            !surely_joined,
            "posted in the open window but not in its digest"
        );
        eprintln!("the restart outlasted the window; the second message waits for its own");
        let (m, _) = smtp.wait_for(&bob.email, 2);
        let text = m["text"].as_str().unwrap();
        assert!(text.contains(&link(&cid, &after)) && !text.contains(&before));
    }
}
