//! Isolation tests: every read and write is tried against channels, messages, workspaces
//! and users the caller cannot reach (another workspace's, and the private channels and DMs
//! of others in the caller's own workspace). Each is refused as not found, with exactly the
//! error a made-up ID of the same kind gets, so an answer never reveals that the target
//! exists; nothing changes; and no subscriber receives a frame of a channel it is not in.

use chorus_engine::domain::{ChannelKind, DomainError};
use chorus_engine::ids::{ChannelId, MessageId, UserId, WorkspaceId};
use chorus_engine::{Engine, EngineConfig, EngineError, Subscription};
use futures::executor::block_on;
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

/// How long a frame may take to arrive before the test fails (a guard, not a timing guess).
const FRAME_TIMEOUT: Duration = Duration::from_secs(10);
/// A workspace, user or channel number no test ever allocates.
const MADE_UP_NUMBER: u64 = 1 << 30;

fn open_engine(dir: &Path) -> Engine {
    let mut config = EngineConfig::new(dir);
    config.shards = 2;
    config.partitions = 8;
    config.pin = false;
    Engine::open(config).expect("open engine")
}

/// A channel ID in the same partition as `real` whose number was never allocated.
fn made_up_channel(real: ChannelId) -> ChannelId {
    ChannelId((MADE_UP_NUMBER << 16) | (real.0 & 0xffff))
}

/// A channel ID whose partition the engine does not have.
fn made_up_partition_channel(real: ChannelId) -> ChannelId {
    ChannelId((real.0 & !0xffff) | 0xfff0)
}

fn made_up_messages(real: MessageId) -> Vec<MessageId> {
    vec![
        // A message of a channel that does not exist.
        MessageId {
            channel: made_up_channel(real.channel),
            seq: real.seq,
        },
        // A message the (existing, unreachable) channel does not have.
        MessageId {
            channel: real.channel,
            seq: 999_999,
        },
    ]
}

/// The call on the real target is refused as not found, and every made-up target of the
/// same kind gets exactly the same error.
fn assert_hidden<T: Debug>(
    what: &str,
    real: Result<T, EngineError>,
    fakes: Vec<Result<T, EngineError>>,
) {
    let err = match real {
        Ok(v) => panic!("{what}: allowed on an unreachable target: {v:?}"),
        Err(e) => e,
    };
    assert!(
        matches!(err, EngineError::Domain(DomainError::NotFound(_))),
        "{what}: refused with {err:?}, which is not a not-found"
    );
    for (i, fake) in fakes.into_iter().enumerate() {
        match fake {
            Ok(v) => panic!("{what}: allowed on made-up target {i}: {v:?}"),
            Err(e) => assert_eq!(
                e, err,
                "{what}: the real target and made-up target {i} answer differently"
            ),
        }
    }
}

/// Two workspaces with overlapping membership, channels of every kind, and in each channel
/// a thread root (with a reaction) and a reply.
struct World {
    engine: Engine,
    dir: tempfile::TempDir,
    alice: UserId,
    bob: UserId,
    carol: UserId,
    dave: UserId,
    erin: UserId,
    frank: UserId,
    /// Owned by alice; bob, erin and frank are members.
    ws_a: WorkspaceId,
    /// Owned by carol; dave and frank are members.
    ws_b: WorkspaceId,
    a_general: ChannelId,
    a_secret: ChannelId,
    a_dm_alice_erin: ChannelId,
    a_dm_erin_frank: ChannelId,
    a_gdm: ChannelId,
    b_general: ChannelId,
    b_secret: ChannelId,
    b_dm: ChannelId,
    /// Per channel: a thread root and a reply to it.
    msgs: BTreeMap<ChannelId, (MessageId, MessageId)>,
}

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = open_engine(dir.path());
        let user = |name: &str| {
            block_on(engine.create_user(&format!("{name}@example.com"), name, "h"))
                .expect("user")
                .id
        };
        let (alice, bob, carol, dave, erin, frank) = (
            user("alice"),
            user("bob"),
            user("carol"),
            user("dave"),
            user("erin"),
            user("frank"),
        );
        let ws_a = block_on(engine.create_workspace(alice, "acme"))
            .expect("ws")
            .id;
        let ws_b = block_on(engine.create_workspace(carol, "globex"))
            .expect("ws")
            .id;
        for name in ["bob", "erin", "frank"] {
            block_on(engine.add_member(alice, ws_a, &format!("{name}@example.com"))).expect("add");
        }
        for name in ["dave", "frank"] {
            block_on(engine.add_member(carol, ws_b, &format!("{name}@example.com"))).expect("add");
        }
        let channel = |by, ws, name, kind| {
            block_on(engine.create_channel(by, ws, name, kind))
                .expect("channel")
                .id
        };
        let dm =
            |by, ws, users: Vec<UserId>| block_on(engine.open_dm(by, ws, users)).expect("dm").0.id;
        let a_general = channel(alice, ws_a, "general", ChannelKind::Public);
        let a_secret = channel(alice, ws_a, "secret", ChannelKind::Private);
        let a_dm_alice_erin = dm(alice, ws_a, vec![erin]);
        let a_dm_erin_frank = dm(erin, ws_a, vec![frank]);
        let a_gdm = dm(alice, ws_a, vec![erin, frank]);
        let b_general = channel(carol, ws_b, "general", ChannelKind::Public);
        let b_secret = channel(carol, ws_b, "secret", ChannelKind::Private);
        let b_dm = dm(carol, ws_b, vec![dave]);
        for (who, c) in [(bob, a_general), (erin, a_general), (frank, a_general)] {
            block_on(engine.join(who, c)).expect("join");
        }
        block_on(engine.add_channel_member(alice, a_secret, erin)).expect("add");
        for who in [dave, frank] {
            block_on(engine.join(who, b_general)).expect("join");
        }
        block_on(engine.add_channel_member(carol, b_secret, dave)).expect("add");
        let mut msgs = BTreeMap::new();
        for (author, replier, c) in [
            (alice, bob, a_general),
            (alice, erin, a_secret),
            (alice, erin, a_dm_alice_erin),
            (erin, frank, a_dm_erin_frank),
            (frank, alice, a_gdm),
            (carol, frank, b_general),
            (carol, dave, b_secret),
            (dave, carol, b_dm),
        ] {
            let (root, _) =
                block_on(engine.post(author, c, "a root", Some("k"), None)).expect("post");
            let (reply, _) =
                block_on(engine.post(replier, c, "a reply", None, Some(root.id))).expect("reply");
            block_on(engine.react(replier, root.id, "eyes", true)).expect("react");
            msgs.insert(c, (root.id, reply.id));
        }
        World {
            engine,
            dir,
            alice,
            bob,
            carol,
            dave,
            erin,
            frank,
            ws_a,
            ws_b,
            a_general,
            a_secret,
            a_dm_alice_erin,
            a_dm_erin_frank,
            a_gdm,
            b_general,
            b_secret,
            b_dm,
            msgs,
        }
    }

    fn all_channels(&self) -> Vec<ChannelId> {
        self.msgs.keys().copied().collect()
    }

    /// The last seq of every channel, as its members see it.
    fn last_seqs(&self) -> BTreeMap<ChannelId, u64> {
        let mut seqs = BTreeMap::new();
        for u in [
            self.alice, self.bob, self.carol, self.dave, self.erin, self.frank,
        ] {
            for c in block_on(self.engine.user_channels(u)).expect("user_channels") {
                seqs.insert(c.id, c.last_seq);
            }
        }
        seqs
    }

    /// A member of the channel (one who can read its root).
    fn member_of(&self, c: ChannelId) -> UserId {
        let (root, _) = self.msgs[&c];
        [self.alice, self.carol, self.erin, self.frank, self.dave]
            .into_iter()
            .find(|u| block_on(self.engine.message(*u, root)).is_ok())
            .expect("a member")
    }

    /// Tries every channel-scoped call as `caller` on channel `target`, which the caller is
    /// not a member of, and on made-up IDs of the same kinds.
    fn probe_channel(&self, caller: UserId, target: ChannelId) {
        let e = &self.engine;
        let label = |call: &str| format!("{call} by {caller} on {target}");
        let fakes = [made_up_channel(target), made_up_partition_channel(target)];
        let on_channels = |call: &str, f: &dyn Fn(ChannelId) -> Result<(), EngineError>| {
            assert_hidden(
                &label(call),
                f(target),
                fakes.iter().map(|c| f(*c)).collect(),
            );
        };
        let member = self.member_of(target);
        on_channels("channel", &|c| block_on(e.channel(caller, c)).map(drop));
        on_channels("join", &|c| block_on(e.join(caller, c)));
        on_channels("add_channel_member(self)", &|c| {
            block_on(e.add_channel_member(caller, c, caller))
        });
        on_channels("add_channel_member(member)", &|c| {
            block_on(e.add_channel_member(caller, c, member))
        });
        on_channels("remove_channel_member(self)", &|c| {
            block_on(e.remove_channel_member(caller, c, caller))
        });
        on_channels("remove_channel_member(member)", &|c| {
            block_on(e.remove_channel_member(caller, c, member))
        });
        on_channels("post", &|c| {
            block_on(e.post(caller, c, "let me in", None, None)).map(drop)
        });
        on_channels("post with client_msg_id", &|c| {
            block_on(e.post(caller, c, "let me in", Some("k"), None)).map(drop)
        });
        on_channels("history", &|c| {
            block_on(e.history(caller, c, None, 50)).map(drop)
        });
        on_channels("history with cursor", &|c| {
            block_on(e.history(caller, c, Some(100), 10)).map(drop)
        });

        let (root, reply) = self.msgs[&target];
        for (which, id) in [("root", root), ("reply", reply)] {
            let on_messages = |call: &str, f: &dyn Fn(MessageId) -> Result<(), EngineError>| {
                let what = format!("{call} of the {which} by {caller} in {target}");
                assert_hidden(
                    &what,
                    f(id),
                    made_up_messages(id).into_iter().map(f).collect(),
                );
            };
            on_messages("reply", &|m| {
                block_on(e.post(caller, m.channel, "a reply", None, Some(m))).map(drop)
            });
            on_messages("replies", &|m| {
                block_on(e.replies(caller, m, None, 50)).map(drop)
            });
            on_messages("message", &|m| block_on(e.message(caller, m)).map(drop));
            on_messages("versions", &|m| block_on(e.versions(caller, m)).map(drop));
            on_messages("edit", &|m| {
                block_on(e.edit(caller, m, "mine now")).map(drop)
            });
            on_messages("react add", &|m| block_on(e.react(caller, m, "eyes", true)));
            on_messages("react remove", &|m| {
                block_on(e.react(caller, m, "eyes", false))
            });
            on_messages("delete", &|m| block_on(e.delete(caller, m)));
        }
    }

    /// Tries every workspace-scoped call as `caller` on workspace `target`, which the caller
    /// does not belong to, and on a made-up workspace. `member_email` is a member of the
    /// target workspace, `member` their ID.
    fn probe_workspace(
        &self,
        caller: UserId,
        target: WorkspaceId,
        member: UserId,
        member_email: &str,
    ) {
        let e = &self.engine;
        let fake = WorkspaceId(MADE_UP_NUMBER);
        let on_ws = |call: &str, f: &dyn Fn(WorkspaceId) -> Result<(), EngineError>| {
            let what = format!("{call} by {caller} in {target}");
            assert_hidden(&what, f(target), vec![f(fake)]);
        };
        on_ws("members", &|w| block_on(e.members(caller, w)).map(drop));
        on_ws("channels", &|w| block_on(e.channels(caller, w)).map(drop));
        on_ws("create_channel public", &|w| {
            block_on(e.create_channel(caller, w, "intruder", ChannelKind::Public)).map(drop)
        });
        on_ws("create_channel private", &|w| {
            block_on(e.create_channel(caller, w, "intruder", ChannelKind::Private)).map(drop)
        });
        on_ws("open_dm alone", &|w| {
            block_on(e.open_dm(caller, w, vec![])).map(drop)
        });
        on_ws("open_dm with a member", &|w| {
            block_on(e.open_dm(caller, w, vec![member])).map(drop)
        });
        on_ws("add_member of a member", &|w| {
            block_on(e.add_member(caller, w, member_email)).map(drop)
        });
        on_ws("add_member of self", &|w| {
            let me = ["alice", "bob", "carol", "dave", "erin", "frank"]
                .into_iter()
                .map(|n| format!("{n}@example.com"))
                .find(|m| {
                    block_on(e.user_by_email(m))
                        .ok()
                        .flatten()
                        .is_some_and(|u| u.id == caller)
                })
                .expect("caller's email");
            block_on(e.add_member(caller, w, &me)).map(drop)
        });
    }
}

// Outsiders get, for every call on another workspace, exactly a made-up ID's not-found.
#[test]
fn foreign_workspace_targets_look_like_made_up_ones() {
    let w = World::new();
    let before = w.last_seqs();
    for caller in [w.bob, w.alice, w.erin] {
        for c in [w.b_general, w.b_secret, w.b_dm] {
            w.probe_channel(caller, c);
        }
        w.probe_workspace(caller, w.ws_b, w.dave, "dave@example.com");
    }
    for caller in [w.carol, w.dave] {
        for c in [
            w.a_general,
            w.a_secret,
            w.a_dm_alice_erin,
            w.a_dm_erin_frank,
            w.a_gdm,
        ] {
            w.probe_channel(caller, c);
        }
        w.probe_workspace(caller, w.ws_a, w.bob, "bob@example.com");
    }
    assert_eq!(w.last_seqs(), before, "a refused call stored an event");
    w.engine.shutdown();
}

// Private channels and others' DMs of one's own workspace answer exactly like made-up IDs.
#[test]
fn own_workspace_channels_outside_membership_look_like_made_up_ones() {
    let w = World::new();
    let before = w.last_seqs();
    for (caller, targets) in [
        (
            w.bob,
            vec![w.a_secret, w.a_dm_alice_erin, w.a_dm_erin_frank, w.a_gdm],
        ),
        (w.alice, vec![w.a_dm_erin_frank]),
        (
            w.frank,
            vec![w.a_secret, w.a_dm_alice_erin, w.b_secret, w.b_dm],
        ),
        (w.dave, vec![]),
    ] {
        for c in targets {
            w.probe_channel(caller, c);
        }
    }
    assert_eq!(w.last_seqs(), before, "a refused call stored an event");
    w.engine.shutdown();
}

// Foreign thread roots and users used in one's own channels are refused like made-up IDs.
#[test]
fn foreign_ids_inside_own_channels_look_like_made_up_ones() {
    let w = World::new();
    let e = &w.engine;
    let before = w.last_seqs();
    let fake_user = UserId(MADE_UP_NUMBER);
    for c in [
        w.b_general,
        w.b_secret,
        w.b_dm,
        w.a_secret,
        w.a_dm_erin_frank,
    ] {
        let (root, _) = w.msgs[&c];
        let what = format!("reply in bob's channel to a root of {c}");
        let reply_to =
            |m: MessageId| block_on(e.post(w.bob, w.a_general, "x", None, Some(m))).map(drop);
        assert_hidden(
            &what,
            reply_to(root),
            made_up_messages(root).into_iter().map(reply_to).collect(),
        );
    }
    for other in [w.carol, w.dave] {
        let dm = |u: UserId| block_on(e.open_dm(w.bob, w.ws_a, vec![u])).map(drop);
        assert_hidden(
            "open_dm with a foreign user",
            dm(other),
            vec![dm(fake_user)],
        );
        let gdm = |u: UserId| block_on(e.open_dm(w.bob, w.ws_a, vec![w.erin, u])).map(drop);
        assert_hidden(
            "group DM with a foreign user",
            gdm(other),
            vec![gdm(fake_user)],
        );
        let add = |u: UserId| block_on(e.add_channel_member(w.bob, w.a_general, u));
        assert_hidden(
            "add a foreign user to a channel",
            add(other),
            vec![add(fake_user)],
        );
        let remove = |u: UserId| block_on(e.remove_channel_member(w.alice, w.a_general, u));
        assert_hidden(
            "remove a foreign user from a channel",
            remove(other),
            vec![remove(fake_user)],
        );
    }
    // frank is in both workspaces, but not in workspace B's private channel: adding him to
    // workspace A's channels works, adding dave (B only) does not.
    block_on(e.add_channel_member(w.alice, w.a_secret, w.frank)).expect("frank is in A");
    let before_frank = {
        let mut b = before.clone();
        *b.get_mut(&w.a_secret).expect("secret") += 1;
        b
    };
    assert_eq!(
        w.last_seqs(),
        before_frank,
        "only the allowed call stored an event"
    );
    w.engine.shutdown();
}

// Listings show a user only the workspaces, channels and members within reach.
#[test]
fn listings_show_only_what_is_within_reach() {
    let w = World::new();
    let e = &w.engine;
    let ids = |v: Vec<chorus_engine::view::ChannelView>| {
        let mut ids: Vec<ChannelId> = v.into_iter().map(|c| c.id).collect();
        ids.sort();
        ids
    };
    let sorted = |mut v: Vec<ChannelId>| {
        v.sort();
        v
    };
    assert_eq!(
        ids(block_on(e.user_channels(w.bob)).expect("mine")),
        vec![w.a_general]
    );
    assert_eq!(
        ids(block_on(e.channels(w.bob, w.ws_a)).expect("visible")),
        vec![w.a_general],
        "bob sees the public channel only"
    );
    assert_eq!(
        ids(block_on(e.user_channels(w.frank)).expect("mine")),
        sorted(vec![w.a_general, w.a_dm_erin_frank, w.a_gdm, w.b_general])
    );
    assert_eq!(
        ids(block_on(e.channels(w.frank, w.ws_b)).expect("visible")),
        vec![w.b_general]
    );
    assert_eq!(
        ids(block_on(e.channels(w.alice, w.ws_a)).expect("visible")),
        sorted(vec![w.a_general, w.a_secret, w.a_dm_alice_erin, w.a_gdm]),
        "the owner does not see the DMs of others"
    );
    let (me, workspaces) = block_on(e.me(w.bob)).expect("me");
    assert_eq!(me.id, w.bob);
    assert_eq!(
        workspaces.iter().map(|x| x.id).collect::<Vec<_>>(),
        vec![w.ws_a]
    );
    let members: Vec<UserId> = block_on(e.members(w.frank, w.ws_b))
        .expect("members")
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(members, vec![w.carol, w.dave, w.frank]);
    w.engine.shutdown();
}

// ---------------------------------------------------------------------------------------
// Subscriptions
// ---------------------------------------------------------------------------------------

type Frames = mpsc::Receiver<Result<Vec<u8>, String>>;

/// Moves a subscription to a thread that forwards its frames, so the test can wait for a
/// frame with a timeout. The thread ends when the engine shuts down.
fn forward(mut sub: Subscription) -> Frames {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || loop {
        match block_on(sub.recv()) {
            Ok(frame) => {
                if tx.send(Ok(frame.to_vec())).is_err() {
                    break;
                }
            }
            Err(e) => {
                let _ = tx.send(Err(e.to_string()));
                break;
            }
        }
    });
    rx
}

fn next_frame(rx: &Frames, ctx: &str) -> serde_json::Value {
    match rx.recv_timeout(FRAME_TIMEOUT) {
        Ok(Ok(bytes)) => serde_json::from_slice(&bytes).expect("a frame is JSON"),
        Ok(Err(e)) => panic!("{ctx}: the subscription ended: {e}"),
        Err(_) => panic!("{ctx}: no frame within {FRAME_TIMEOUT:?}"),
    }
}

/// Posts a sentinel in a channel the subscriber is in and asserts that it is the very next
/// frame: every frame of the operations before it would have come first.
fn expect_sentinel(w: &World, rx: &Frames, channel: ChannelId, ctx: &str) {
    let (m, _) = block_on(w.engine.post(w.alice, channel, "sentinel", None, None)).expect("post");
    let frame = next_frame(rx, ctx);
    assert_eq!(
        frame["channel_id"],
        channel.to_string(),
        "{ctx}: got {frame}"
    );
    assert_eq!(frame["seq"], m.seq, "{ctx}: got {frame}");
    assert_eq!(
        frame["event"]["message"]["text"], "sentinel",
        "{ctx}: got {frame}"
    );
}

/// Every kind of event in `channel`, by its members.
fn churn(w: &World, channel: ChannelId, author: UserId, other: UserId) {
    let e = &w.engine;
    let (root, _) = w.msgs[&channel];
    let (m, _) = block_on(e.post(author, channel, "secret stuff", None, None)).expect("post");
    block_on(e.post(other, channel, "secret reply", None, Some(m.id))).expect("reply");
    block_on(e.edit(author, m.id, "edited secret")).expect("edit");
    block_on(e.react(other, m.id, "tada", true)).expect("react");
    block_on(e.react(other, m.id, "tada", false)).expect("unreact");
    block_on(e.react(author, root, "heart", true)).expect("react");
    block_on(e.delete(author, m.id)).expect("delete");
}

// A subscriber never receives a frame of a channel it is not a member of.
#[test]
fn subscriber_gets_no_frames_of_channels_it_is_not_in() {
    let w = World::new();
    let e = &w.engine;
    // Everyone subscribes, so that both shards have subscribers for every channel and the
    // per-subscriber filtering is what keeps bob's queue clean.
    let subs: Vec<Frames> = [w.alice, w.bob, w.carol, w.dave, w.erin, w.frank]
        .into_iter()
        .map(|u| forward(block_on(e.subscribe(u)).expect("subscribe")))
        .collect();
    let bob = &subs[1];
    churn(&w, w.b_general, w.carol, w.frank);
    churn(&w, w.b_secret, w.carol, w.dave);
    churn(&w, w.b_dm, w.dave, w.carol);
    churn(&w, w.a_secret, w.alice, w.erin);
    churn(&w, w.a_dm_alice_erin, w.erin, w.alice);
    churn(&w, w.a_dm_erin_frank, w.frank, w.erin);
    churn(&w, w.a_gdm, w.frank, w.alice);
    block_on(e.add_channel_member(w.alice, w.a_secret, w.frank)).expect("add");
    block_on(e.remove_channel_member(w.alice, w.a_secret, w.frank)).expect("remove");
    let new_private =
        block_on(e.create_channel(w.alice, w.ws_a, "new-secret", ChannelKind::Private))
            .expect("channel")
            .id;
    block_on(e.post(w.alice, new_private, "hidden", None, None)).expect("post");
    let new_public_b = block_on(e.create_channel(w.carol, w.ws_b, "news", ChannelKind::Public))
        .expect("channel")
        .id;
    block_on(e.post(w.carol, new_public_b, "hidden", None, None)).expect("post");
    assert_eq!(
        block_on(e.open_dm(w.alice, w.ws_a, vec![w.erin, w.frank, w.carol])).map(drop),
        Err(DomainError::NotFound("user").into()),
        "carol is not in workspace A"
    );
    block_on(e.open_dm(w.erin, w.ws_a, vec![w.alice, w.frank])).expect("existing group DM");
    block_on(e.open_dm(w.erin, w.ws_a, vec![])).expect("erin's own DM");
    expect_sentinel(&w, bob, w.a_general, "bob after others' events");
    // Bob was never told anything else, even later.
    assert!(matches!(bob.try_recv(), Err(mpsc::TryRecvError::Empty)));
    drop(subs);
    w.engine.shutdown();
}

// A subscriber follows only its channels, and stops right after its own member:left.
#[test]
fn removed_member_stops_receiving_frames() {
    let w = World::new();
    let e = &w.engine;
    block_on(e.add_channel_member(w.alice, w.a_secret, w.bob)).expect("add bob");
    let team = block_on(e.create_channel(w.alice, w.ws_a, "team", ChannelKind::Public))
        .expect("channel")
        .id;
    block_on(e.join(w.bob, team)).expect("join");
    let sub = block_on(e.subscribe(w.bob)).expect("subscribe");
    let mut followed: Vec<ChannelId> = sub.channels().iter().map(|(c, _)| *c).collect();
    followed.sort();
    let mut want = vec![w.a_general, w.a_secret, team];
    want.sort();
    assert_eq!(
        followed, want,
        "a subscription follows exactly the user's channels"
    );
    let bob = forward(sub);

    block_on(e.remove_channel_member(w.alice, w.a_secret, w.bob)).expect("remove bob");
    let left = next_frame(&bob, "bob's removal");
    assert_eq!(left["channel_id"], w.a_secret.to_string());
    assert_eq!(left["event"]["type"], "member:left");
    assert_eq!(left["event"]["user_id"], w.bob.to_string());
    churn(&w, w.a_secret, w.alice, w.erin);
    expect_sentinel(&w, &bob, w.a_general, "bob after his removal");

    block_on(e.remove_channel_member(w.bob, team, w.bob)).expect("bob leaves");
    let left = next_frame(&bob, "bob's leave");
    assert_eq!(left["channel_id"], team.to_string());
    assert_eq!(left["event"]["type"], "member:left");
    block_on(e.post(w.alice, team, "after bob left", None, None)).expect("post");
    expect_sentinel(&w, &bob, w.a_general, "bob after he left");
    drop(bob);
    w.engine.shutdown();
}

// A resume naming channels the subscriber is not in replays nothing of them.
#[test]
fn resume_ignores_channels_the_subscriber_is_not_in() {
    let w = World::new();
    let e = &w.engine;
    let sub = block_on(e.subscribe(w.bob)).expect("subscribe");
    let since: Vec<(ChannelId, u64)> = w
        .all_channels()
        .into_iter()
        .chain([made_up_channel(w.b_secret)])
        .map(|c| (c, 0))
        .collect();
    block_on(sub.resume(since)).expect("resume");
    let bob = forward(sub);
    let general_last = block_on(e.user_channels(w.bob))
        .expect("channels")
        .into_iter()
        .find(|c| c.id == w.a_general)
        .expect("general")
        .last_seq;
    for seq in 1..=general_last {
        let frame = next_frame(&bob, "resume");
        assert_eq!(
            frame["channel_id"],
            w.a_general.to_string(),
            "replayed {frame}"
        );
        assert_eq!(frame["seq"], seq);
    }
    let resumed = next_frame(&bob, "resumed");
    assert_eq!(resumed["type"], "resumed");
    let named: Vec<&String> = resumed["channels"]
        .as_object()
        .expect("channels")
        .keys()
        .collect();
    assert_eq!(named, vec![&w.a_general.to_string()]);
    expect_sentinel(&w, &bob, w.a_general, "bob after resume");
    drop(bob);
    w.engine.shutdown();
}

// ---------------------------------------------------------------------------------------
// Regressions: each of these failed against the engine at commit aa94a9f (an outsider's
// answer differed from a made-up channel's; a refused large post left a blob behind).
// ---------------------------------------------------------------------------------------

// Adding an outside user to an unreachable channel answers exactly like a made-up channel.
#[test]
fn add_channel_member_does_not_reveal_unreachable_channels() {
    let w = World::new();
    let e = &w.engine;
    for c in [w.a_secret, w.a_dm_alice_erin, w.a_gdm] {
        for target in [w.carol, UserId(MADE_UP_NUMBER)] {
            let add = |c| block_on(e.add_channel_member(w.bob, c, target));
            assert_hidden(
                &format!("add_channel_member of {target} by bob on {c}"),
                add(c),
                vec![add(made_up_channel(c)), add(made_up_partition_channel(c))],
            );
        }
    }
    w.engine.shutdown();
}

fn blob_files(dir: &Path) -> usize {
    let mut n = 0;
    for sub in std::fs::read_dir(dir.join("blobs")).expect("blobs dir") {
        let sub = sub.expect("entry").path();
        if sub.is_dir() && sub.file_name().is_some_and(|n| n != "tmp") {
            n += std::fs::read_dir(&sub).expect("fan-out dir").count();
        }
    }
    n
}

// A refused large post or edit leaves nothing behind in the blob store.
#[test]
fn refused_large_post_stores_no_blob() {
    let w = World::new();
    let e = &w.engine;
    let big = "z".repeat(100 * 1024);
    let before = blob_files(w.dir.path());
    let r = block_on(e.post(w.bob, w.b_secret, &big, None, None));
    assert_eq!(r.map(drop), Err(DomainError::NotFound("channel").into()));
    let (root, _) = w.msgs[&w.b_general];
    let r = block_on(e.edit(w.bob, root, &big));
    assert_eq!(r.map(drop), Err(DomainError::NotFound("channel").into()));
    // In a channel bob is in, a large text that is blank, or a large edit of another's
    // message, is refused before anything is stored too.
    let blank = " ".repeat(100 * 1024);
    let r = block_on(e.post(w.bob, w.a_general, &blank, None, None));
    assert!(matches!(
        r,
        Err(EngineError::Domain(DomainError::Invalid(_)))
    ));
    let (alices, _) = w.msgs[&w.a_general];
    let r = block_on(e.edit(w.bob, alices, &big));
    assert!(matches!(
        r,
        Err(EngineError::Domain(DomainError::Forbidden(_)))
    ));
    assert_eq!(
        blob_files(w.dir.path()),
        before,
        "a refused call stored a blob"
    );
    w.engine.shutdown();
}
