//! The session core driven with scripted inputs and simulated time, as a transport would
//! drive it, with no socket, timer or engine.

use super::*;
use chorus_engine::domain::channel::Content;
use chorus_engine::ids::MessageId;
use chorus_engine::presence::{window_start, Status};
use std::cell::{Cell, RefCell};

/// Budgets the tests control: how many commands pass, and whether typing does.
struct FakeLimits {
    commands_left: Cell<u32>,
    typing: Cell<bool>,
    typing_asked: RefCell<Vec<ChannelId>>,
}

impl FakeLimits {
    fn generous() -> FakeLimits {
        FakeLimits {
            commands_left: Cell::new(u32::MAX),
            typing: Cell::new(true),
            typing_asked: RefCell::new(Vec::new()),
        }
    }
}

impl Limits for FakeLimits {
    fn take_rate(&self, _user: UserId) -> Result<(), ApiError> {
        match self.commands_left.get() {
            0 => Err(ApiError::rate_limited(Duration::from_millis(1500))),
            n => {
                self.commands_left.set(n - 1);
                Ok(())
            }
        }
    }

    fn typing_allowed(&self, _user: UserId, channel: ChannelId) -> bool {
        self.typing_asked.borrow_mut().push(channel);
        self.typing.get()
    }
}

const USER: UserId = UserId(7);
const CONFIG: SessionConfig = SessionConfig {
    heartbeat_interval_s: 30,
    frame_bytes_max: 1024,
    presence_flush: Duration::from_millis(250),
};

/// A core and the simulated clock driving it.
struct Harness {
    core: SessionCore,
    now: Instant,
    limits: FakeLimits,
}

impl Harness {
    fn new() -> Harness {
        Harness::with(CONFIG)
    }

    fn with(config: SessionConfig) -> Harness {
        let now = Instant::now();
        Harness {
            core: SessionCore::new(USER, 0xabc, config, now),
            now,
            limits: FakeLimits::generous(),
        }
    }

    /// A harness whose session started live (the grace ran out) with `hello` read.
    fn live() -> Harness {
        Harness::live_with(CONFIG)
    }

    fn live_with(config: SessionConfig) -> Harness {
        let mut h = Harness::with(config);
        assert_eq!(h.sent()[0]["type"], "hello");
        h.advance(RESUME_GRACE);
        assert_eq!(h.core.poll_call(), Some(Call::Start { since: None }));
        h.answer(Answer::Started(true));
        h
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
        if self.now >= self.core.poll_timeout() {
            self.core.handle_timeout(self.now);
        }
    }

    fn text(&mut self, frame: Value) {
        let text = frame.to_string();
        self.core.handle_text(self.now, &text, &self.limits);
    }

    fn answer(&mut self, answer: Answer) {
        self.core.handle_answer(self.now, answer, &self.limits);
    }

    /// Every frame the core has to send now, as JSON.
    fn sent(&mut self) -> Vec<Value> {
        std::iter::from_fn(|| self.core.poll_transmit())
            .map(|b| serde_json::from_slice(&b).expect("JSON"))
            .collect()
    }
}

fn channel() -> ChannelId {
    ChannelId(42)
}

// The first frame is hello, with the heartbeat interval and the connection's id.
#[test]
fn hello_comes_first() {
    let mut h = Harness::new();
    let sent = h.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0]["type"], "hello");
    assert_eq!(sent[0]["heartbeat_interval"], 30);
    assert_eq!(sent[0]["conn_id"], "0000000000000abc");
    assert_eq!(sent[0]["user_id"], USER.to_string());
}

// Without a first frame the session starts live when the grace ends, and not before.
#[test]
fn grace_ends_in_a_live_start() {
    let mut h = Harness::new();
    assert_eq!(h.core.poll_timeout(), h.now + RESUME_GRACE);
    h.advance(RESUME_GRACE - Duration::from_millis(1));
    assert_eq!(h.core.poll_call(), None);
    h.advance(Duration::from_millis(1));
    assert_eq!(h.core.poll_call(), Some(Call::Start { since: None }));
    assert!(!h.core.wants_client_frames(), "no frames while starting");
    h.answer(Answer::Started(true));
    assert!(h.core.wants_client_frames());
}

// A resume as the first frame starts from the client's seqs, and unparseable channel IDs
// are reported by name while the others resume.
#[test]
fn resume_as_first_frame() {
    let mut h = Harness::new();
    h.sent();
    let cid = channel().to_string();
    h.text(json!({"type": "resume", "ref": "r", "since": {cid: 5, "bad!": 1}}));
    assert_eq!(
        h.core.poll_call(),
        Some(Call::Start {
            since: Some(vec![(channel(), 5)])
        })
    );
    let sent = h.sent();
    assert_eq!(sent[0]["code"], "not_found");
    assert_eq!(sent[0]["channel_ids"], json!(["bad!"]));
    assert_eq!(sent[0]["ref"], "r");
}

// A first frame that is not resume starts the session live and is handled once started,
// in order, before any later frame.
#[test]
fn first_frame_is_handled_after_the_start() {
    let mut h = Harness::new();
    h.sent();
    h.text(json!({"type": "ping", "ref": 1}));
    assert_eq!(h.core.poll_call(), Some(Call::Start { since: None }));
    assert!(h.sent().is_empty(), "nothing answered before the start");
    h.answer(Answer::Started(true));
    let sent = h.sent();
    assert_eq!(sent, vec![json!({"type": "pong", "ref": 1})]);
}

// A failed start closes the session as unavailable.
#[test]
fn failed_start_closes() {
    let mut h = Harness::new();
    h.advance(RESUME_GRACE);
    h.core.poll_call();
    h.answer(Answer::Started(false));
    assert_eq!(h.core.poll_close(), Some(CloseReason::Unavailable));
}

// Commands become one engine call at a time; no client frame is taken until its answer,
// which is an ack carrying the message, or an error carrying the ref.
#[test]
fn commands_are_serialised_and_acked() {
    let mut h = Harness::live();
    let cid = channel().to_string();
    h.text(json!({"type": "message:send", "ref": "a", "channel_id": cid, "text": "hi"}));
    assert!(!h.core.wants_client_frames(), "a call is waiting");
    let call = h.core.poll_call().expect("a call");
    let Call::Command {
        reference,
        command: Command::Send { content, .. },
    } = call
    else {
        panic!("{call:?}");
    };
    assert_eq!(
        (reference.clone(), content),
        (json!("a"), Content::Text("hi".into()))
    );
    assert!(!h.core.wants_client_frames(), "a call is in flight");
    assert_eq!(h.core.poll_call(), None, "one call at a time");
    h.answer(Answer::Command {
        reference,
        result: Ok(None),
    });
    assert!(h.core.wants_client_frames());
    assert_eq!(
        h.sent(),
        vec![json!({"type": "ack", "ref": "a", "message": null})]
    );
    let mid = MessageId {
        channel: channel(),
        seq: 3,
    }
    .to_string();
    h.text(json!({"type": "message:delete", "ref": 9, "channel_id": channel().to_string(), "message_id": mid}));
    let call = h.core.poll_call().expect("a call");
    assert!(matches!(
        call,
        Call::Command {
            command: Command::Delete { .. },
            ..
        }
    ));
    h.answer(Answer::Command {
        reference: json!(9),
        result: Err(ApiError::new(403, "forbidden", "not yours")),
    });
    let sent = h.sent();
    assert_eq!(sent[0]["type"], "error");
    assert_eq!(sent[0]["ref"], 9);
    assert_eq!(sent[0]["code"], "forbidden");
}

// Over the rate, a command is answered with rate_limited and retry_after_ms, and makes no
// engine call.
#[test]
fn rate_limited_commands() {
    let mut h = Harness::live();
    h.limits.commands_left.set(0);
    let cid = channel().to_string();
    h.text(json!({"type": "message:send", "ref": "x", "channel_id": cid, "text": "hi"}));
    assert_eq!(h.core.poll_call(), None);
    let sent = h.sent();
    assert_eq!(sent[0]["code"], "rate_limited");
    assert_eq!(sent[0]["retry_after_ms"], 1500);
}

// Typing over its budget is dropped quietly; within it, it is a call answered only when it
// fails.
#[test]
fn typing_is_quiet() {
    let mut h = Harness::live();
    let cid = channel().to_string();
    h.limits.typing.set(false);
    h.text(json!({"type": "typing:start", "channel_id": cid}));
    assert_eq!(h.core.poll_call(), None);
    assert!(h.sent().is_empty());
    h.limits.typing.set(true);
    h.text(json!({"type": "typing:start", "ref": "t", "channel_id": cid}));
    let call = h.core.poll_call().expect("typing call");
    assert_eq!(
        call,
        Call::Typing {
            reference: json!("t"),
            channel: channel()
        }
    );
    h.answer(Answer::Typing {
        reference: json!("t"),
        result: Ok(()),
    });
    assert!(
        h.sent().is_empty(),
        "no answer to a typing notice that went out"
    );
    assert_eq!(h.limits.typing_asked.borrow().len(), 2);
}

// Bad frames get error frames with their codes and the session stays up.
#[test]
fn bad_frames_get_errors() {
    let mut h = Harness::live();
    h.core.handle_text(h.now, "not json", &h.limits);
    h.core.handle_binary(h.now);
    let big = format!(r#"{{"type":"ping","pad":"{}"}}"#, "x".repeat(2000));
    h.core.handle_text(h.now, &big, &h.limits);
    let codes: Vec<_> = h.sent().iter().map(|f| f["code"].clone()).collect();
    assert_eq!(
        codes,
        vec![
            json!("invalid_json"),
            json!("unsupported_frame"),
            json!("too_large")
        ]
    );
    assert_eq!(h.core.poll_close(), None);
}

// Answers queue up to their bound; then the core takes no client frames until they are
// sent.
#[test]
fn answers_are_bounded() {
    let mut h = Harness::live();
    for i in 0..REPLIES_MAX {
        assert!(h.core.wants_client_frames(), "after {i}");
        h.text(json!({"type": "ping", "ref": i}));
    }
    assert!(!h.core.wants_client_frames());
    assert_eq!(h.sent().len(), REPLIES_MAX);
    assert!(h.core.wants_client_frames());
}

// Silence for two heartbeat intervals closes the session; any frame heard, even a
// transport ping, moves the deadline.
#[test]
fn heartbeat_timeout() {
    let mut h = Harness::live();
    let silence = Duration::from_secs(60);
    h.advance(silence - Duration::from_secs(1));
    h.core.handle_heard(h.now);
    h.advance(silence - Duration::from_secs(1));
    assert_eq!(h.core.poll_close(), None);
    h.advance(Duration::from_secs(1));
    assert_eq!(h.core.poll_close(), Some(CloseReason::HeartbeatTimeout));
    assert!(!h.core.wants_client_frames());
    assert_eq!(h.core.poll_call(), None);
}

// Events go out after answers, the core takes at most a batch of them, and a cutoff closes
// the session only once every event queued before it was sent.
#[test]
fn events_then_cutoff() {
    let mut h = Harness::live();
    assert_eq!(h.core.event_room(), BATCH_FRAMES_MAX);
    for i in 0..3 {
        h.core.push_event(
            h.now,
            Bytes::from(format!(r#"{{"type":"event","seq":{i}}}"#)),
        );
    }
    h.text(json!({"type": "ping", "ref": "p"}));
    assert_eq!(h.core.event_room(), BATCH_FRAMES_MAX - 3);
    h.core.handle_cutoff(Cutoff::Overflow);
    assert_eq!(h.core.event_room(), 0, "nothing after the cut");
    assert_eq!(h.core.poll_close(), None, "queued frames go first");
    let sent = h.sent();
    assert_eq!(sent[0]["type"], "pong");
    assert_eq!(sent[3]["seq"], 2);
    assert_eq!(h.core.poll_close(), Some(CloseReason::ResumeRequired));
}

// A late resume that would go back before frames already sent closes with
// ResumeRequired; a resume that worked answers nothing.
#[test]
fn late_resume() {
    let mut h = Harness::live();
    let cid = channel().to_string();
    h.text(json!({"type": "resume", "ref": "r", "since": {cid.clone(): 1}}));
    assert!(matches!(h.core.poll_call(), Some(Call::Resume { .. })));
    h.answer(Answer::Resumed {
        reference: json!("r"),
        result: Ok(true),
    });
    assert!(h.sent().is_empty());
    h.text(json!({"type": "resume", "ref": "s", "since": {cid: 0}}));
    h.core.poll_call();
    h.answer(Answer::Resumed {
        reference: json!("s"),
        result: Ok(false),
    });
    assert_eq!(h.core.poll_close(), Some(CloseReason::ResumeRequired));
}

// Drain, the client's close and protocol violations each end the session with their
// reason, and the first reason wins.
#[test]
fn close_reasons() {
    let mut h = Harness::live();
    h.core.handle_drain();
    h.core.handle_peer_closed();
    assert_eq!(h.core.poll_close(), Some(CloseReason::GoingAway));
    let mut h = Harness::live();
    h.core.handle_violation(Violation::InvalidUtf8);
    assert_eq!(
        h.core.poll_close(),
        Some(CloseReason::Violation(Violation::InvalidUtf8))
    );
    let mut h = Harness::live();
    h.core.handle_peer_closed();
    assert_eq!(h.core.poll_close(), Some(CloseReason::PeerClosed));
}

// An idle session gives back the queue slots a burst took.
#[test]
fn idle_session_shrinks() {
    let mut h = Harness::live();
    for _ in 0..BATCH_FRAMES_MAX {
        h.core.push_event(h.now, Bytes::from_static(b"{}"));
    }
    h.sent();
    assert!(h.core.events.capacity() <= IDLE_SLOTS_MAX);
}

/// Watches users, as a client's `presence:sub` and the engine's answer do.
fn watch(h: &mut Harness, users: &[u64]) {
    let ids: Vec<String> = users.iter().map(|u| UserId(*u).to_string()).collect();
    h.text(json!({"type": "presence:sub", "ref": "w", "user_ids": ids}));
    assert!(matches!(h.core.poll_call(), Some(Call::PresenceSub { .. })));
    let offline = users
        .iter()
        .map(|u| (UserId(*u), Presence::OFFLINE, 0))
        .collect();
    h.answer(Answer::PresenceSub {
        reference: json!("w"),
        result: Ok(offline),
    });
    assert_eq!(h.sent()[0]["type"], "ack");
}

/// A record of the owner's change number `seq`.
fn update_at(seq: u64, user: u64, old: Status, new: Status) -> Bytes {
    let p = |status| Presence {
        status,
        dnd_until_us: None,
        last_active_us: None,
    };
    Update {
        user: UserId(user),
        old: p(old),
        new: p(new),
        seq,
    }
    .encode()
}

/// A presence window as the engine queues it, holding `records`.
fn window(records: &[Bytes]) -> Bytes {
    let mut w = window_start(records.len());
    for r in records {
        w.extend_from_slice(r);
    }
    Bytes::from(w)
}

fn update(user: u64, old: Status, new: Status) -> Bytes {
    thread_local!(static SEQ: Cell<u64> = const { Cell::new(100) });
    let seq = SEQ.with(|s| {
        s.set(s.get() + 1);
        s.get()
    });
    update_at(seq, user, old, new)
}

// A burst of presence changes, queued by the engine as one window, becomes one frame with
// only each user's latest status; a change undone within the window sends nothing; a
// window a backlog brought sooner than a window after the last frame is held back until a
// window has passed.
#[test]
fn presence_is_coalesced_per_window() {
    use chorus_engine::presence::Status::{Away, Offline, Online};
    let mut h = Harness::live();
    watch(&mut h, &[1, 2]);
    let mut burst = vec![update(1, Offline, Online)];
    for (old, new) in [(Online, Away), (Away, Online), (Online, Away)] {
        burst.push(update(1, old, new));
    }
    burst.push(update(2, Online, Away));
    burst.push(update(2, Away, Online));
    h.core.push_event(h.now, window(&burst));
    let sent = h.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0]["type"], "presence");
    let users = sent[0]["users"].as_object().expect("users");
    assert_eq!(users.len(), 1, "user 2 changed and changed back: {sent:?}");
    assert_eq!(users[&UserId(1).to_string()]["status"], "away");
    // Undone within the next window: no frame at all.
    h.advance(Duration::from_millis(300));
    h.core.push_event(
        h.now,
        window(&[update(1, Away, Online), update(1, Online, Away)]),
    );
    assert!(h.sent().is_empty());
    assert!(
        h.core.poll_timeout() > h.now + Duration::from_secs(1),
        "no timer for presence"
    );
    // Two windows at once (the reader was behind): the second frame waits until a window
    // after the first.
    h.core.push_event(h.now, window(&[update(1, Away, Online)]));
    assert_eq!(h.sent().len(), 1);
    h.core.push_event(h.now, window(&[update(2, Online, Away)]));
    assert!(h.sent().is_empty(), "held back");
    assert_eq!(h.core.poll_timeout(), h.now + Duration::from_millis(250));
    h.advance(Duration::from_millis(249));
    assert!(h.sent().is_empty(), "held back");
    h.advance(Duration::from_millis(1));
    let sent = h.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0]["users"][UserId(2).to_string()]["status"], "away");
}

// The session drops a record of a user it no longer watches (a removal crossed it on its
// way; the engine leaves this filter to the session, which changes its set first), and
// keeps the rest of the window.
#[test]
fn presence_records_of_unwatched_users_are_dropped() {
    use chorus_engine::presence::Status::{Away, Offline, Online};
    let mut h = Harness::live();
    watch(&mut h, &[1, 2]);
    let removed = [UserId(2).to_string()];
    h.text(json!({"type": "presence:sub", "ref": "r", "op": "remove", "user_ids": removed}));
    assert!(matches!(h.core.poll_call(), Some(Call::PresenceSub { .. })));
    h.core.push_event(
        h.now,
        window(&[update(1, Offline, Online), update(2, Offline, Away)]),
    );
    let sent = h.sent();
    assert_eq!(sent.len(), 1, "{sent:?}");
    let users = sent[0]["users"].as_object().expect("users");
    assert_eq!(users.len(), 1, "user 2 is no longer watched: {sent:?}");
    assert_eq!(users[&UserId(1).to_string()]["status"], "online");
}

// `presence:sub` becomes one engine call whose answer is the ack with every user added;
// a change already in the window is measured from what the ack said.
#[test]
fn presence_sub_is_acked_with_the_users() {
    use chorus_engine::presence::Status::{Away, Offline, Online};
    let mut h = Harness::live();
    h.text(json!({"type": "presence:sub", "ref": "s", "user_ids": [UserId(1).to_string()]}));
    let Some(Call::PresenceSub { op, users, .. }) = h.core.poll_call() else {
        panic!("a presence call");
    };
    assert_eq!((op, users.clone()), (WatchOp::Set, vec![UserId(1)]));
    let shown = Presence {
        status: Away,
        dnd_until_us: None,
        last_active_us: None,
    };
    h.answer(Answer::PresenceSub {
        reference: json!("s"),
        result: Ok(vec![(UserId(1), shown, 7)]),
    });
    let sent = h.sent();
    assert_eq!(sent[0]["type"], "ack");
    assert_eq!(sent[0]["users"][UserId(1).to_string()]["status"], "away");
    // Changes the ack included (up to 7), arriving late (they crossed a re-watch), are
    // dropped; a later one is not.
    h.core.push_event(
        h.now,
        window(&[
            update_at(5, 1, Online, Away),
            update_at(6, 1, Offline, Online),
        ]),
    );
    assert!(h.sent().is_empty(), "the ack already said away");
    h.core
        .push_event(h.now, window(&[update_at(8, 1, Away, Online)]));
    assert_eq!(
        h.sent()[0]["users"][UserId(1).to_string()]["status"],
        "online"
    );
}

// A change that reaches the connection before the ack of the `presence:sub` that added
// its user waits for the ack: sent first, it would be undone by the older status the ack
// shows. It goes in the next frame after the ack, a window after the last frame; one the
// ack included is dropped.
#[test]
fn changes_before_their_ack_wait_for_it() {
    use chorus_engine::presence::Status::{Away, Online};
    let away = Presence {
        status: Away,
        dnd_until_us: None,
        last_active_us: None,
    };
    let mut h = Harness::live();
    watch(&mut h, &[2]);
    let (one, two, three) = (UserId(1), UserId(2), UserId(3));
    h.text(json!({"type": "presence:sub", "ref": "a", "op": "add", "user_ids": [one.to_string(), three.to_string()]}));
    let Some(Call::PresenceSub { .. }) = h.core.poll_call() else {
        panic!("a presence call");
    };
    // User 1 came online (change 5) and user 3 too (change 8) after the owner answered
    // (changes 4 and 9); user 2's change goes out at once.
    h.core.push_event(
        h.now,
        window(&[
            update_at(5, 1, Away, Online),
            update_at(8, 3, Away, Online),
            update_at(3, 2, Away, Online),
        ]),
    );
    let sent = h.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0]["users"].as_object().unwrap().len(), 1);
    assert_eq!(sent[0]["users"][two.to_string()]["status"], "online");
    h.advance(Duration::from_millis(10));
    h.answer(Answer::PresenceSub {
        reference: json!("a"),
        result: Ok(vec![(one, away, 4), (three, away, 9)]),
    });
    let sent = h.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0]["type"], "ack");
    assert_eq!(sent[0]["users"][one.to_string()]["status"], "away");
    h.advance(Duration::from_millis(239));
    assert!(h.sent().is_empty(), "a window after the last frame");
    h.advance(Duration::from_millis(1));
    let sent = h.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0]["type"], "presence");
    let users = sent[0]["users"].as_object().unwrap();
    assert_eq!(
        users.len(),
        1,
        "the ack included user 3's change: {users:?}"
    );
    assert_eq!(users[&one.to_string()]["status"], "online");
}

// Over 1,000 users is refused with `too_many` before the engine is asked; activity reaches
// the engine only when it changes.
#[test]
fn presence_limits_and_activity() {
    let mut h = Harness::live_with(SessionConfig {
        frame_bytes_max: 1 << 20,
        ..CONFIG
    });
    let ids: Vec<String> = (0..1001).map(|i| UserId(i).to_string()).collect();
    h.text(json!({"type": "presence:sub", "ref": 9, "user_ids": ids}));
    assert_eq!(h.core.poll_call(), None);
    let sent = h.sent();
    assert_eq!(
        (sent[0]["code"].as_str(), sent[0]["ref"].as_i64()),
        (Some("too_many"), Some(9))
    );
    h.text(json!({"type": "activity", "state": "active"}));
    assert_eq!(h.core.poll_call(), None, "a connection starts active");
    h.text(json!({"type": "activity", "state": "idle"}));
    assert_eq!(h.core.poll_call(), Some(Call::Activity { active: false }));
    h.answer(Answer::Activity);
    h.text(json!({"type": "activity", "state": "idle"}));
    assert_eq!(h.core.poll_call(), None);
    h.text(json!({"type": "activity", "state": "asleep"}));
    assert_eq!(h.sent()[0]["code"], "invalid_request");
}
