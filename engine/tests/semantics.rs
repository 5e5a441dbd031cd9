//! Semantics tests of the engine's public API, one behaviour of `API.md` per test: threads,
//! edits and their history, deletions, reactions, DMs and group DMs, history pagination,
//! `client_msg_id` idempotency, large bodies and the blob store, and the `event` frames a
//! subscriber receives.

use chorus_engine::domain::{ChannelKind, DomainError};
use chorus_engine::ids::{ChannelId, MessageId, UserId, WorkspaceId};
use chorus_engine::view::MessageView;
use chorus_engine::{Engine, EngineConfig, EngineError, Subscription};
use futures::executor::block_on;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

/// How long a frame may take to arrive before the test fails (a guard, not a timing guess).
const FRAME_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest text the API accepts, in bytes.
const TEXT_BYTES_MAX: usize = 1024 * 1024;
/// The largest page.
const PAGE_LIMIT_MAX: usize = 200;

fn open_engine(dir: &Path) -> Engine {
    let mut config = EngineConfig::new(dir);
    config.shards = 2;
    config.partitions = 8;
    config.pin = false;
    Engine::open(config).expect("open engine")
}

/// A workspace owned by alice, with bob, carol and dave (and `extra` more users) as
/// members, and a public channel `general` that everyone has joined.
struct World {
    engine: Engine,
    dir: tempfile::TempDir,
    alice: UserId,
    bob: UserId,
    carol: UserId,
    dave: UserId,
    extra: Vec<UserId>,
    ws: WorkspaceId,
    general: ChannelId,
}

impl World {
    fn new(extra: usize) -> World {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = open_engine(dir.path());
        let names: Vec<String> = ["alice", "bob", "carol", "dave"]
            .into_iter()
            .map(str::to_owned)
            .chain((0..extra).map(|i| format!("user{i}")))
            .collect();
        let ids: Vec<UserId> = names
            .iter()
            .map(|n| {
                block_on(engine.create_user(&format!("{n}@example.com"), n, "h"))
                    .expect("user")
                    .id
            })
            .collect();
        let ws = block_on(engine.create_workspace(ids[0], "acme"))
            .expect("workspace")
            .id;
        for n in &names[1..] {
            block_on(engine.add_member(ids[0], ws, &format!("{n}@example.com"))).expect("member");
        }
        let general = block_on(engine.create_channel(ids[0], ws, "general", ChannelKind::Public))
            .expect("channel")
            .id;
        for u in &ids[1..] {
            block_on(engine.join(*u, general)).expect("join");
        }
        World {
            engine,
            dir,
            alice: ids[0],
            bob: ids[1],
            carol: ids[2],
            dave: ids[3],
            extra: ids[4..].to_vec(),
            ws,
            general,
        }
    }

    fn post(&self, user: UserId, channel: ChannelId, text: &str) -> MessageView {
        let (m, created) =
            block_on(self.engine.post(user, channel, text, None, None)).expect("post");
        assert!(created);
        m
    }

    fn reply(&self, user: UserId, root: MessageId, text: &str) -> MessageView {
        block_on(self.engine.post(user, root.channel, text, None, Some(root)))
            .expect("reply")
            .0
    }

    fn message(&self, user: UserId, id: MessageId) -> MessageView {
        block_on(self.engine.message(user, id)).expect("message")
    }

    fn texts(&self, user: UserId, id: MessageId) -> Vec<String> {
        block_on(self.engine.versions(user, id))
            .expect("versions")
            .into_iter()
            .map(|v| v.text)
            .collect()
    }

    /// The seq of the channel's last event, from the user's channel list.
    fn last_seq(&self, user: UserId, channel: ChannelId) -> u64 {
        block_on(self.engine.user_channels(user))
            .expect("user_channels")
            .into_iter()
            .find(|c| c.id == channel)
            .expect("a member's channel")
            .last_seq
    }

    /// Every top-level message, newest first, paged with `limit`.
    fn all_history(&self, user: UserId, channel: ChannelId, limit: usize) -> Vec<MessageView> {
        let mut out = Vec::new();
        let mut cursor = None;
        loop {
            let page =
                block_on(self.engine.history(user, channel, cursor, limit)).expect("history");
            assert!(page.messages.len() <= limit);
            let more = page.next_cursor.is_some();
            if more {
                assert_eq!(page.messages.len(), limit, "only the last page is short");
            }
            out.extend(page.messages);
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        out
    }

    fn shutdown(self) {
        self.engine.shutdown();
    }
}

fn domain(r: Result<impl std::fmt::Debug, EngineError>) -> DomainError {
    match r {
        Err(EngineError::Domain(e)) => e,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn seqs(messages: &[MessageView]) -> Vec<u64> {
    messages.iter().map(|m| m.seq).collect()
}

// ---------------------------------------------------------------------------------------
// Threads
// ---------------------------------------------------------------------------------------

// A root counts its replies, which stay out of the history and page oldest first exactly.
#[test]
fn threads_count_replies_and_page_them_oldest_first() {
    let w = World::new(0);
    let root = w.post(w.alice, w.general, "root");
    let replies: Vec<MessageView> = (0..7)
        .map(|i| {
            let by = if i % 2 == 0 { w.bob } else { w.carol };
            w.reply(by, root.id, &format!("reply {i}"))
        })
        .collect();
    for r in &replies {
        assert_eq!(r.thread_id, Some(root.id));
        assert_eq!(r.reply_count, 0);
    }
    let history = block_on(w.engine.history(w.dave, w.general, None, 50)).expect("history");
    assert_eq!(
        seqs(&history.messages),
        vec![root.seq],
        "replies are not in the history"
    );
    assert_eq!(history.messages[0].reply_count, 7);
    assert_eq!(w.message(w.dave, root.id).reply_count, 7);

    let mut after = None;
    let mut got = Vec::new();
    let mut pages = 0;
    loop {
        let page = block_on(w.engine.replies(w.dave, root.id, after, 3)).expect("replies");
        pages += 1;
        got.extend(page.messages);
        match page.next_cursor {
            Some(c) => after = Some(c),
            None => break,
        }
    }
    assert_eq!(pages, 3, "7 replies in pages of 3");
    assert_eq!(
        seqs(&got),
        seqs(&replies),
        "oldest first, nothing lost or repeated"
    );
    let texts: Vec<&str> = got.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(
        texts,
        (0..7).map(|i| format!("reply {i}")).collect::<Vec<_>>()
    );
    let all = block_on(w.engine.replies(w.dave, root.id, None, PAGE_LIMIT_MAX)).expect("replies");
    assert_eq!(seqs(&all.messages), seqs(&replies));
    assert_eq!(all.next_cursor, None);
    w.shutdown();
}

// Threads are one level deep and need a live root in the same channel.
#[test]
fn a_reply_cannot_start_a_thread() {
    let w = World::new(0);
    let e = &w.engine;
    let root = w.post(w.alice, w.general, "root");
    let reply = w.reply(w.bob, root.id, "reply");
    let nested = block_on(e.post(w.carol, w.general, "nested", None, Some(reply.id)));
    assert!(matches!(domain(nested), DomainError::Invalid(_)));
    assert_eq!(
        domain(block_on(e.replies(w.alice, reply.id, None, 10))),
        DomainError::NotFound("thread")
    );
    let other = block_on(e.create_channel(w.alice, w.ws, "other", ChannelKind::Public))
        .expect("channel")
        .id;
    let elsewhere = w.post(w.alice, other, "elsewhere");
    assert_eq!(
        domain(block_on(e.post(
            w.alice,
            w.general,
            "x",
            None,
            Some(elsewhere.id)
        ))),
        DomainError::NotFound("message"),
        "a root of another channel"
    );
    let missing = MessageId {
        channel: w.general,
        seq: 999,
    };
    assert_eq!(
        domain(block_on(e.post(
            w.alice,
            w.general,
            "x",
            None,
            Some(missing)
        ))),
        DomainError::NotFound("message")
    );
    block_on(e.delete(w.alice, root.id)).expect("delete");
    assert!(matches!(
        domain(block_on(e.post(
            w.bob,
            w.general,
            "late",
            None,
            Some(root.id)
        ))),
        DomainError::Conflict(_)
    ));
    let kept = block_on(e.replies(w.bob, root.id, None, 10)).expect("replies of a deleted root");
    assert_eq!(seqs(&kept.messages), vec![reply.seq]);
    w.shutdown();
}

// ---------------------------------------------------------------------------------------
// Edits
// ---------------------------------------------------------------------------------------

// Edits keep every version oldest first, and only the author (not even an admin) edits.
#[test]
fn edits_keep_every_version_and_only_the_author_edits() {
    let w = World::new(0);
    let e = &w.engine;
    let m = w.post(w.alice, w.general, "v1");
    assert_eq!(m.edited_at, None);
    block_on(e.edit(w.alice, m.id, "v2")).expect("edit");
    let edited = block_on(e.edit(w.alice, m.id, "v3")).expect("edit");
    assert_eq!(edited.text, "v3");
    assert!(edited.edited_at.is_some());
    let versions = block_on(e.versions(w.bob, m.id)).expect("versions");
    let texts: Vec<&str> = versions.iter().map(|v| v.text.as_str()).collect();
    assert_eq!(texts, ["v1", "v2", "v3"]);
    let times: Vec<&str> = versions.iter().map(|v| v.at.as_str()).collect();
    assert!(
        times.windows(2).all(|p| p[0] <= p[1]),
        "oldest first: {times:?}"
    );
    assert!(
        times.iter().all(|t| t.ends_with('Z')),
        "RFC 3339 UTC: {times:?}"
    );

    assert!(matches!(
        domain(block_on(e.edit(w.bob, m.id, "bob's"))),
        DomainError::Forbidden(_)
    ));
    let theirs = w.post(w.bob, w.general, "bob's own");
    assert!(matches!(
        domain(block_on(e.edit(w.alice, theirs.id, "owner's"))),
        DomainError::Forbidden(_)
    ));
    for blank in ["", "   ", "\n\t"] {
        assert!(matches!(
            domain(block_on(e.edit(w.alice, m.id, blank))),
            DomainError::Invalid(_)
        ));
    }
    assert_eq!(
        w.texts(w.carol, m.id),
        ["v1", "v2", "v3"],
        "refused edits store nothing"
    );
    assert_eq!(w.message(w.carol, m.id).text, "v3");
    let page = block_on(e.history(w.carol, w.general, None, 1)).expect("history");
    assert_eq!(page.messages[0].id, theirs.id);

    let reply = w.reply(w.bob, m.id, "r1");
    block_on(e.edit(w.bob, reply.id, "r2")).expect("edit a reply");
    let replies = block_on(e.replies(w.alice, m.id, None, 10)).expect("replies");
    assert_eq!(replies.messages[0].text, "r2");
    assert_eq!(w.texts(w.alice, reply.id), ["r1", "r2"]);
    w.shutdown();
}

// ---------------------------------------------------------------------------------------
// Deletions
// ---------------------------------------------------------------------------------------

// A deleted message keeps its place with text "" and deleted, and is frozen from then on.
#[test]
fn deleted_messages_keep_their_place_with_empty_text() {
    let w = World::new(0);
    let e = &w.engine;
    let m1 = w.post(w.alice, w.general, "one");
    let m2 = w.post(w.alice, w.general, "two");
    let m3 = w.post(w.alice, w.general, "three");
    let reply = w.reply(w.bob, m2.id, "a reply");
    block_on(e.react(w.bob, m2.id, "eyes", true)).expect("react");
    block_on(e.delete(w.alice, m2.id)).expect("delete");

    let page = block_on(e.history(w.bob, w.general, None, 10)).expect("history");
    assert_eq!(seqs(&page.messages), vec![m3.seq, m2.seq, m1.seq]);
    let gone = &page.messages[1];
    assert_eq!(gone.text, "");
    assert!(gone.deleted);
    assert!(gone.reactions.is_empty());
    assert_eq!(gone.reply_count, 1);
    assert_eq!(&w.message(w.carol, m2.id), gone);
    assert_eq!(page.messages[0].text, "three");
    assert!(!page.messages[0].deleted);
    let replies = block_on(e.replies(w.bob, m2.id, None, 10)).expect("replies");
    assert_eq!(seqs(&replies.messages), vec![reply.seq]);

    assert!(matches!(
        domain(block_on(e.edit(w.alice, m2.id, "again"))),
        DomainError::Conflict(_)
    ));
    assert!(matches!(
        domain(block_on(e.react(w.bob, m2.id, "tada", true))),
        DomainError::Conflict(_)
    ));
    let before = w.last_seq(w.alice, w.general);
    block_on(e.delete(w.alice, m2.id)).expect("deleting again is not an error");
    assert_eq!(w.last_seq(w.alice, w.general), before, "and stores nothing");
    w.shutdown();
}

// Only the author, the channel creator or a workspace admin may delete; others get 403.
#[test]
fn only_author_channel_creator_or_workspace_admin_may_delete() {
    let w = World::new(0);
    let e = &w.engine;
    let room = block_on(e.create_channel(w.dave, w.ws, "daves-room", ChannelKind::Public))
        .expect("channel")
        .id;
    for u in [w.alice, w.bob, w.carol] {
        block_on(e.join(u, room)).expect("join");
    }
    let b: Vec<MessageView> = (0..3)
        .map(|i| w.post(w.bob, room, &format!("b{i}")))
        .collect();
    let c1 = w.post(w.carol, room, "c1");

    let refused = domain(block_on(e.delete(w.carol, b[0].id)));
    assert!(matches!(refused, DomainError::Forbidden(_)));
    assert_eq!(refused.status(), 403);
    assert!(matches!(
        domain(block_on(e.delete(w.bob, c1.id))),
        DomainError::Forbidden(_)
    ));
    block_on(e.delete(w.bob, b[0].id)).expect("the author");
    block_on(e.delete(w.dave, b[1].id)).expect("the channel's creator");
    block_on(e.delete(w.alice, b[2].id)).expect("the workspace owner");
    for m in &b {
        assert!(w.message(w.carol, m.id).deleted);
    }
    assert!(!w.message(w.carol, c1.id).deleted);

    // The creator of one channel has no say in another.
    let in_general = w.post(w.bob, w.general, "in general");
    assert!(matches!(
        domain(block_on(e.delete(w.dave, in_general.id))),
        DomainError::Forbidden(_)
    ));
    w.shutdown();
}

// Deleting a message takes its texts with it: its edit history no longer shows them.
#[test]
fn deletion_removes_the_edit_history_texts() {
    let w = World::new(0);
    let m = w.post(w.alice, w.general, "a secret");
    block_on(w.engine.edit(w.alice, m.id, "a second secret")).expect("edit");
    block_on(w.engine.delete(w.alice, m.id)).expect("delete");
    let texts = w.texts(w.bob, m.id);
    assert!(
        texts.iter().all(|t| !t.contains("secret")),
        "a deleted message's versions still show {texts:?}"
    );
    w.shutdown();
}

// ---------------------------------------------------------------------------------------
// Reactions
// ---------------------------------------------------------------------------------------

// Reactions are idempotent and keep the first-appearance order of emoji and of users.
#[test]
fn reactions_are_idempotent_and_ordered() {
    let w = World::new(0);
    let e = &w.engine;
    let m = w.post(w.alice, w.general, "react to me");
    let reactions = || w.message(w.dave, m.id).reactions;
    let r = |pairs: &[(&str, &[UserId])]| -> Vec<(String, Vec<UserId>)> {
        pairs
            .iter()
            .map(|(e, us)| (e.to_string(), us.to_vec()))
            .collect()
    };
    let start = w.last_seq(w.alice, w.general);
    let react = |u, emoji: &str, add| block_on(e.react(u, m.id, emoji, add)).expect("react");

    react(w.bob, "+1", true);
    react(w.carol, "tada", true);
    react(w.alice, "+1", true);
    assert_eq!(
        reactions(),
        r(&[("+1", &[w.bob, w.alice]), ("tada", &[w.carol])])
    );
    react(w.bob, "+1", true);
    assert_eq!(
        w.last_seq(w.alice, w.general),
        start + 3,
        "a repeated add stores nothing"
    );
    react(w.bob, "+1", false);
    react(w.bob, "+1", false);
    assert_eq!(reactions(), r(&[("+1", &[w.alice]), ("tada", &[w.carol])]));
    react(w.alice, "+1", false);
    assert_eq!(reactions(), r(&[("tada", &[w.carol])]));
    react(w.bob, "+1", true);
    assert_eq!(reactions(), r(&[("tada", &[w.carol]), ("+1", &[w.bob])]));
    react(w.dave, "tada", false);
    assert_eq!(
        w.last_seq(w.alice, w.general),
        start + 6,
        "one event per change, none for no-ops"
    );

    let long = "e".repeat(65);
    for bad in ["", "a b", "x/y", "tab\t", long.as_str()] {
        assert!(
            matches!(
                domain(block_on(e.react(w.bob, m.id, bad, true))),
                DomainError::Invalid(_)
            ),
            "{bad:?}"
        );
    }
    react(w.bob, &"e".repeat(64), true);
    w.shutdown();
}

// ---------------------------------------------------------------------------------------
// DMs
// ---------------------------------------------------------------------------------------

// The same set of users in a workspace always gets the same DM, created only once.
#[test]
fn dms_are_one_channel_per_set_of_users() {
    let w = World::new(0);
    let e = &w.engine;
    let (dm, created) = block_on(e.open_dm(w.alice, w.ws, vec![w.bob])).expect("dm");
    assert!(created);
    assert_eq!((dm.kind, dm.name.as_str(), dm.last_seq), ("dm", "", 2));
    for (by, users) in [
        (w.bob, vec![w.alice]),
        (w.alice, vec![w.bob, w.bob, w.alice]),
        (w.bob, vec![w.bob, w.alice]),
    ] {
        let (again, created) = block_on(e.open_dm(by, w.ws, users)).expect("dm");
        assert!(!created);
        assert_eq!(again.id, dm.id);
    }
    w.post(w.bob, dm.id, "hi alice");
    let (again, _) = block_on(e.open_dm(w.alice, w.ws, vec![w.bob])).expect("dm");
    assert_eq!(
        again.last_seq, 3,
        "an existing DM answers with its current last seq"
    );
    assert_eq!(
        block_on(e.channel(w.alice, dm.id))
            .expect("channel")
            .last_seq,
        3
    );

    let (alone, created) = block_on(e.open_dm(w.alice, w.ws, vec![])).expect("self DM");
    assert!(created);
    assert_eq!((alone.kind, alone.last_seq), ("dm", 1));
    assert_ne!(alone.id, dm.id);
    let (again, created) = block_on(e.open_dm(w.alice, w.ws, vec![w.alice])).expect("self DM");
    assert_eq!((again.id, created), (alone.id, false));

    let other = block_on(e.create_workspace(w.bob, "elsewhere"))
        .expect("ws")
        .id;
    block_on(e.add_member(w.bob, other, "alice@example.com")).expect("member");
    let (there, created) = block_on(e.open_dm(w.alice, other, vec![w.bob])).expect("dm");
    assert!(created, "a DM belongs to one workspace");
    assert_ne!(there.id, dm.id);
    assert_eq!(there.workspace_id, other);
    w.shutdown();
}

// A group DM holds 3 to 9 users, 10 are refused, and DM membership never changes.
#[test]
fn group_dms_hold_up_to_nine_and_dm_membership_is_fixed() {
    let w = World::new(6);
    let e = &w.engine;
    let (group, created) = block_on(e.open_dm(w.alice, w.ws, vec![w.bob, w.carol])).expect("gdm");
    assert!(created);
    assert_eq!((group.kind, group.last_seq), ("group_dm", 3));
    let (again, created) = block_on(e.open_dm(w.carol, w.ws, vec![w.bob, w.alice])).expect("gdm");
    assert_eq!((again.id, created), (group.id, false));

    let mut eight = vec![w.bob, w.carol, w.dave];
    eight.extend(&w.extra[..5]);
    let (nine, created) = block_on(e.open_dm(w.alice, w.ws, eight.clone())).expect("9 users");
    assert!(created);
    assert_eq!((nine.kind, nine.last_seq), ("group_dm", 9));
    let mut nine_others = eight.clone();
    nine_others.push(w.extra[5]);
    assert!(matches!(
        domain(block_on(e.open_dm(w.alice, w.ws, nine_others))),
        DomainError::Invalid(_)
    ));

    let (dm, _) = block_on(e.open_dm(w.alice, w.ws, vec![w.bob])).expect("dm");
    for c in [dm.id, group.id] {
        let forbidden = |r: Result<(), EngineError>| matches!(domain(r), DomainError::Forbidden(_));
        assert!(forbidden(block_on(
            e.add_channel_member(w.alice, c, w.dave)
        )));
        assert!(forbidden(block_on(
            e.remove_channel_member(w.alice, c, w.bob)
        )));
        assert!(forbidden(block_on(
            e.remove_channel_member(w.bob, c, w.bob)
        )));
        assert_eq!(
            domain(block_on(e.join(w.dave, c))),
            DomainError::NotFound("channel")
        );
    }
    let dave_sees: Vec<ChannelId> = block_on(e.user_channels(w.dave))
        .expect("channels")
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert!(dave_sees.contains(&nine.id));
    assert!(!dave_sees.contains(&group.id) && !dave_sees.contains(&dm.id));
    w.shutdown();
}

// ---------------------------------------------------------------------------------------
// History pagination
// ---------------------------------------------------------------------------------------

// History pages run newest first and each cursor continues exactly, at any page size.
#[test]
fn history_pages_newest_first_and_cursors_continue_exactly() {
    let w = World::new(0);
    let e = &w.engine;
    let busy = block_on(e.create_channel(w.alice, w.ws, "busy", ChannelKind::Public))
        .expect("channel")
        .id;
    let mut top = Vec::new();
    for i in 0..250 {
        let m = w.post(w.alice, busy, &format!("m{i}"));
        if i % 10 == 0 {
            w.reply(w.alice, m.id, "a reply, not in the history");
        }
        top.push(m.seq);
    }
    top.reverse();
    for limit in [1, 7, 50, 199, 200] {
        let all = w.all_history(w.alice, busy, limit);
        assert_eq!(seqs(&all), top, "limit {limit}");
    }
    let first = block_on(e.history(w.alice, busy, None, PAGE_LIMIT_MAX)).expect("history");
    assert_eq!(first.messages.len(), 200);
    assert_eq!(first.messages[0].text, "m249");
    let second =
        block_on(e.history(w.alice, busy, first.next_cursor, PAGE_LIMIT_MAX)).expect("history");
    assert_eq!(second.messages.len(), 50);
    assert_eq!(
        second.messages[0].seq, top[200],
        "the next page starts right after the last"
    );
    assert_eq!(second.next_cursor, None);
    w.shutdown();
}

// Every limit from 1 to 200 is honoured; 0, 201 and beyond are refused as invalid.
#[test]
fn page_limits_are_one_to_two_hundred() {
    let w = World::new(0);
    let e = &w.engine;
    let root = w.post(w.alice, w.general, "root");
    for i in 0..210 {
        w.post(w.alice, w.general, &format!("m{i}"));
    }
    for limit in 1..=PAGE_LIMIT_MAX {
        let page = block_on(e.history(w.bob, w.general, None, limit)).expect("history");
        assert_eq!(page.messages.len(), limit);
        assert!(page.next_cursor.is_some());
        block_on(e.replies(w.bob, root.id, None, limit)).expect("replies");
    }
    for limit in [0, PAGE_LIMIT_MAX + 1, usize::MAX] {
        assert!(matches!(
            domain(block_on(e.history(w.bob, w.general, None, limit))),
            DomainError::Invalid(_)
        ));
        assert!(matches!(
            domain(block_on(e.replies(w.bob, root.id, None, limit))),
            DomainError::Invalid(_)
        ));
    }
    w.shutdown();
}

// ---------------------------------------------------------------------------------------
// client_msg_id
// ---------------------------------------------------------------------------------------

// A same-user client_msg_id repeat returns the first message and stores and sends nothing.
#[test]
fn client_msg_id_repeats_store_nothing() {
    let w = World::new(0);
    let e = &w.engine;
    let carol = forward(block_on(e.subscribe(w.carol)).expect("subscribe"));
    let (first, created) =
        block_on(e.post(w.alice, w.general, "first", Some("k1"), None)).expect("post");
    assert!(created);
    assert_eq!(first.client_msg_id.as_deref(), Some("k1"));
    expect_next(&carol, w.general, first.seq, "message:new");
    let seq = w.last_seq(w.alice, w.general);
    let (again, created) =
        block_on(e.post(w.alice, w.general, "second try", Some("k1"), None)).expect("repeat");
    assert!(!created);
    assert_eq!(again, first, "the first message, as it was");
    let (again, created) =
        block_on(e.post(w.alice, w.general, "third try", Some("k1"), Some(first.id)))
            .expect("repeat");
    assert_eq!((again.id, created), (first.id, false));
    assert_eq!(
        w.last_seq(w.alice, w.general),
        seq,
        "a repeat stores nothing"
    );

    let (bobs, created) =
        block_on(e.post(w.bob, w.general, "bob's", Some("k1"), None)).expect("post");
    assert!(created);
    assert_ne!(bobs.id, first.id);
    expect_next(&carol, w.general, bobs.seq, "message:new");
    let other = block_on(e.create_channel(w.alice, w.ws, "other", ChannelKind::Public))
        .expect("channel")
        .id;
    let (there, created) =
        block_on(e.post(w.alice, other, "there", Some("k1"), None)).expect("post");
    assert!(created);
    assert_eq!(there.channel_id, other);

    let longest = "k".repeat(128);
    block_on(e.post(w.alice, w.general, "long key", Some(&longest), None)).expect("128 bytes");
    for bad in [String::new(), "k".repeat(129)] {
        assert!(matches!(
            domain(block_on(e.post(
                w.alice,
                w.general,
                "bad key",
                Some(&bad),
                None
            ))),
            DomainError::Invalid(_)
        ));
    }
    let firsts = w
        .all_history(w.dave, w.general, 50)
        .into_iter()
        .filter(|m| m.client_msg_id.as_deref() == Some("k1"))
        .count();
    assert_eq!(firsts, 2, "alice's and bob's, once each");
    w.shutdown();
}

// ---------------------------------------------------------------------------------------
// Large bodies
// ---------------------------------------------------------------------------------------

/// About 100 KiB of mixed one- to four-byte characters, cut at a character boundary.
fn big_text(seed: &str) -> String {
    let mut s = String::new();
    while s.len() < 100 * 1024 {
        s.push_str(seed);
        s.push_str(" héllo wörld ✓ 🎉 ");
    }
    let mut cut = 100 * 1024;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    s.truncate(cut);
    s
}

/// The sizes of the blobs stored under `<data_dir>/blobs` (writes in progress excluded).
fn blob_sizes(dir: &Path) -> Vec<u64> {
    let mut sizes = Vec::new();
    for sub in std::fs::read_dir(dir.join("blobs")).expect("blobs dir") {
        let sub = sub.expect("entry").path();
        if sub.is_dir() && sub.file_name().is_some_and(|n| n != "tmp") {
            for f in std::fs::read_dir(&sub).expect("fan-out dir") {
                sizes.push(f.expect("blob").metadata().expect("metadata").len());
            }
        }
    }
    sizes
}

// A 100 KiB text round-trips exactly via the blob store, across a restart and a resume.
#[test]
fn large_bodies_round_trip_through_the_blob_store() {
    let w = World::new(0);
    let (t1, t2) = (big_text("first"), big_text("second"));
    assert!(t1.len() > 64 * 1024 && t1 != t2);
    let bob = forward(block_on(w.engine.subscribe(w.bob)).expect("subscribe"));
    let (m, _) = block_on(w.engine.post(w.alice, w.general, &t1, None, None)).expect("post");
    assert_eq!(m.text, t1);
    let frame = expect_next(&bob, w.general, m.seq, "message:new");
    assert_eq!(frame["event"]["message"]["text"], t1.as_str());
    assert!(
        blob_sizes(w.dir.path()).contains(&(t1.len() as u64)),
        "the body is a blob of its own"
    );
    let page = block_on(w.engine.history(w.bob, w.general, None, 1)).expect("history");
    assert_eq!(page.messages[0].text, t1);
    assert_eq!(w.message(w.carol, m.id).text, t1);
    let edited = block_on(w.engine.edit(w.alice, m.id, &t2)).expect("edit");
    assert_eq!(edited.text, t2);
    let frame = expect_next(&bob, w.general, m.seq + 1, "message:edited");
    assert_eq!(frame["event"]["message"]["text"], t2.as_str());
    assert_eq!(w.texts(w.bob, m.id), [t1.clone(), t2.clone()]);
    drop(bob);

    // After a restart the bodies come back from the blob store, and a resume replays each
    // event with the message as it stood then.
    let World {
        engine,
        dir,
        alice,
        bob,
        general,
        ..
    } = w;
    engine.shutdown();
    let engine = open_engine(dir.path());
    assert_eq!(
        block_on(engine.message(bob, m.id)).expect("message").text,
        t2
    );
    let versions: Vec<String> = block_on(engine.versions(alice, m.id))
        .expect("versions")
        .into_iter()
        .map(|v| v.text)
        .collect();
    assert_eq!(versions, [t1.clone(), t2.clone()]);
    let sub = block_on(engine.subscribe(bob)).expect("subscribe");
    block_on(sub.resume(vec![(general, m.seq - 1)])).expect("resume");
    let frames = forward(sub);
    let frame = expect_next(&frames, general, m.seq, "message:new");
    assert_eq!(frame["event"]["message"]["text"], t1.as_str());
    let frame = expect_next(&frames, general, m.seq + 1, "message:edited");
    assert_eq!(frame["event"]["message"]["text"], t2.as_str());
    assert_eq!(next_frame(&frames, "resumed")["type"], "resumed");
    drop(frames);
    engine.shutdown();
}

// A 1 MiB text is accepted; one byte more is refused as too large (413), storing nothing.
#[test]
fn texts_over_one_mebibyte_are_refused() {
    let w = World::new(0);
    let e = &w.engine;
    let max = "m".repeat(TEXT_BYTES_MAX);
    let over = "o".repeat(TEXT_BYTES_MAX + 1);
    let (m, _) = block_on(e.post(w.alice, w.general, &max, None, None)).expect("1 MiB");
    assert_eq!(w.message(w.bob, m.id).text.len(), TEXT_BYTES_MAX);
    let seq = w.last_seq(w.alice, w.general);
    let blobs = blob_sizes(w.dir.path()).len();
    let refused = domain(block_on(e.post(w.alice, w.general, &over, None, None)));
    assert!(matches!(refused, DomainError::TooLarge(_)));
    assert_eq!(refused.status(), 413);
    assert!(matches!(
        domain(block_on(e.edit(w.alice, m.id, &over))),
        DomainError::TooLarge(_)
    ));
    assert_eq!(w.last_seq(w.alice, w.general), seq);
    assert_eq!(
        blob_sizes(w.dir.path()).len(),
        blobs,
        "nothing stored for a refused text"
    );
    w.shutdown();
}

// ---------------------------------------------------------------------------------------
// Subscription frames
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

/// The next frame that is not a `read` frame (a poster's own marker moving: not what these
/// tests are about; `gateway/tests/read_state.rs` checks them).
fn next_frame(rx: &Frames, ctx: &str) -> serde_json::Value {
    loop {
        let v: serde_json::Value = match rx.recv_timeout(FRAME_TIMEOUT) {
            Ok(Ok(bytes)) => serde_json::from_slice(&bytes).expect("a frame is JSON"),
            Ok(Err(e)) => panic!("{ctx}: the subscription ended: {e}"),
            Err(_) => panic!("{ctx}: no frame within {FRAME_TIMEOUT:?}"),
        };
        if v["type"] != "read" {
            return v;
        }
    }
}

/// The next frame is the `event` frame of `channel`'s event `seq`, of type `kind`; for
/// message events it carries the message.
fn expect_next(rx: &Frames, channel: ChannelId, seq: u64, kind: &str) -> serde_json::Value {
    let f = next_frame(rx, kind);
    assert_eq!(f["type"], "event", "{f}");
    assert_eq!(f["channel_id"], channel.to_string(), "{f}");
    assert_eq!(f["seq"], seq, "{f}");
    assert_eq!(f["event"]["type"], kind, "{f}");
    if kind.starts_with("message:") || kind.starts_with("reaction:") {
        let m = &f["event"]["message"];
        assert!(m.is_object(), "{kind} carries the message: {f}");
        assert_eq!(m["channel_id"], channel.to_string(), "{f}");
    }
    f
}

// A subscriber gets one event frame per event of its channels, with the API's fields.
#[test]
fn subscription_frames_carry_every_event_type() {
    let w = World::new(0);
    let e = &w.engine;
    let bob = forward(block_on(e.subscribe(w.bob)).expect("subscribe"));
    let room = block_on(e.create_channel(w.alice, w.ws, "room", ChannelKind::Private))
        .expect("channel")
        .id;
    block_on(e.add_channel_member(w.alice, room, w.bob)).expect("add bob");
    let f = expect_next(&bob, room, 2, "member:joined");
    assert_eq!(f["event"]["user_id"], w.bob.to_string());
    assert_eq!(f["event"]["by"], w.alice.to_string());

    let (m, _) = block_on(e.post(w.alice, room, "hello", Some("c-1"), None)).expect("post");
    let f = expect_next(&bob, room, 3, "message:new");
    let msg = &f["event"]["message"];
    assert_eq!(msg["id"], m.id.to_string());
    assert_eq!(msg["seq"], 3);
    assert_eq!(msg["user_id"], w.alice.to_string());
    assert_eq!(msg["text"], "hello");
    assert_eq!(msg["thread_id"], serde_json::Value::Null);
    assert_eq!(msg["reply_count"], 0);
    assert_eq!(msg["reactions"], serde_json::json!({}));
    assert_eq!(msg["edited_at"], serde_json::Value::Null);
    assert_eq!(msg["deleted"], false);
    assert_eq!(msg["client_msg_id"], "c-1");
    assert!(msg["created_at"].as_str().is_some_and(|t| t.ends_with('Z')));

    let reply = w.reply(w.bob, m.id, "a reply");
    let f = expect_next(&bob, room, 4, "message:new");
    assert_eq!(f["event"]["message"]["thread_id"], m.id.to_string());
    assert_eq!(f["event"]["message"]["id"], reply.id.to_string());

    block_on(e.edit(w.alice, m.id, "hello, edited")).expect("edit");
    let f = expect_next(&bob, room, 5, "message:edited");
    assert_eq!(f["event"]["message"]["text"], "hello, edited");
    assert_eq!(f["event"]["message"]["reply_count"], 1);
    assert!(f["event"]["message"]["edited_at"].is_string());

    block_on(e.react(w.bob, m.id, "tada", true)).expect("react");
    let f = expect_next(&bob, room, 6, "reaction:added");
    assert_eq!(
        f["event"]["message"]["reactions"],
        serde_json::json!({"tada": [w.bob.to_string()]})
    );
    assert_eq!(f["event"]["message"]["id"], m.id.to_string());
    block_on(e.react(w.bob, m.id, "tada", false)).expect("unreact");
    let f = expect_next(&bob, room, 7, "reaction:removed");
    assert_eq!(f["event"]["message"]["reactions"], serde_json::json!({}));

    block_on(e.delete(w.alice, m.id)).expect("delete");
    let f = expect_next(&bob, room, 8, "message:deleted");
    assert_eq!(f["event"]["message"]["text"], "");
    assert_eq!(f["event"]["message"]["deleted"], true);

    block_on(e.add_channel_member(w.bob, room, w.carol)).expect("add carol");
    let f = expect_next(&bob, room, 9, "member:joined");
    assert_eq!(f["event"]["user_id"], w.carol.to_string());
    block_on(e.remove_channel_member(w.carol, room, w.carol)).expect("carol leaves");
    let f = expect_next(&bob, room, 10, "member:left");
    assert_eq!(f["event"]["user_id"], w.carol.to_string());
    block_on(e.remove_channel_member(w.bob, room, w.bob)).expect("bob leaves");
    let f = expect_next(&bob, room, 11, "member:left");
    assert_eq!(f["event"]["user_id"], w.bob.to_string());

    // Nothing of the room after bob left: the next frame is from a channel he is in.
    w.post(w.alice, room, "after bob left");
    let sentinel = w.post(w.alice, w.general, "sentinel");
    let f = expect_next(&bob, w.general, sentinel.seq, "message:new");
    assert_eq!(f["event"]["message"]["text"], "sentinel");
    drop(bob);
    w.shutdown();
}

// A connected user who joins a channel in a partition where they were in no channel gets
// its events live: the partition takes the user's connections from its shard's table of
// connected users at the join, and counts them from then on (a reconnect included).
#[test]
fn a_connected_user_joining_a_new_partition_gets_its_events() {
    let w = World::new(0);
    let e = &w.engine;
    let general = chorus_engine::domain::meta::partition_of(w.general);
    let side = (0..32)
        .map(|i| {
            block_on(e.create_channel(w.alice, w.ws, &format!("side{i}"), ChannelKind::Public))
                .expect("channel")
                .id
        })
        .find(|c| chorus_engine::domain::meta::partition_of(*c) != general)
        .expect("a channel in another partition than general's");
    // Bob is the only subscriber, so nothing else routes the channel to his shard.
    let mut bob = block_on(e.subscribe(w.bob)).expect("subscribe");
    block_on(e.join(w.bob, side)).expect("join");
    let f = next_event(&mut bob, "the join");
    assert_eq!(
        (f["seq"].as_u64(), &f["event"]["type"]),
        (Some(2), &"member:joined".into())
    );
    assert_eq!(f["event"]["user_id"], w.bob.to_string());
    w.post(w.alice, side, "first");
    let f = next_event(&mut bob, "the first post");
    assert_eq!(f["event"]["message"]["text"], "first", "{f}");

    // Gone and back: the partition counted the disconnect and counts the new connection.
    drop(bob);
    let mut bob = block_on(e.subscribe(w.bob)).expect("subscribe again");
    w.post(w.alice, side, "second");
    let f = next_event(&mut bob, "the second post");
    assert_eq!(f["event"]["message"]["text"], "second", "{f}");
    assert_eq!(f["channel_id"], side.to_string());
    drop(bob);
    w.shutdown();
}

/// The next `event` frame of a subscription (other frames, such as `read`, skipped).
fn next_event(sub: &mut Subscription, ctx: &str) -> serde_json::Value {
    loop {
        let f = recv_within(sub, ctx);
        if f["type"] == "event" {
            return f;
        }
    }
}

// A member removed mid-resume gets every event through its member:left, then `resumed`.
#[test]
fn removal_during_a_resume_still_ends_the_resume() {
    let w = World::new(0);
    let e = &w.engine;
    let room = block_on(e.create_channel(w.alice, w.ws, "busy", ChannelKind::Public))
        .expect("channel")
        .id;
    block_on(e.join(w.bob, room)).expect("join");
    // Enough events for a dozen catch-up pages, posted concurrently so they share commits.
    let texts: Vec<String> = (0..3000).map(|i| format!("m{i}")).collect();
    let posts = texts.iter().map(|t| e.post(w.alice, room, t, None, None));
    for r in block_on(futures::future::join_all(posts)) {
        r.expect("post");
    }
    let sub = block_on(e.subscribe(w.bob)).expect("subscribe");
    block_on(sub.resume(vec![(room, 0)])).expect("resume");
    block_on(e.remove_channel_member(w.alice, room, w.bob)).expect("remove bob");
    let last = w.last_seq(w.alice, room);
    let frames = forward(sub);
    let sentinel = w.post(w.alice, w.general, "sentinel");
    let mut room_seqs = Vec::new();
    let mut resumed = false;
    let mut sentinel_seen = false;
    // Live frames of another channel may overtake a catch-up of several pages; wait for
    // both the sentinel and the end of the resume.
    while !(resumed && sentinel_seen) {
        let f = next_frame(&frames, "the resume");
        if f["type"] == "resumed" {
            resumed = true;
            continue;
        }
        if f["channel_id"] == w.general.to_string() {
            assert_eq!(f["seq"], sentinel.seq);
            sentinel_seen = true;
            continue;
        }
        assert_eq!(f["channel_id"], room.to_string(), "{f}");
        room_seqs.push(f["seq"].as_u64().expect("seq"));
        if room_seqs.len() as u64 == last {
            assert_eq!(f["event"]["type"], "member:left", "{f}");
        }
    }
    assert!(
        resumed,
        "the resume never ended: {} of the room's {last} events came, the last {:?}",
        room_seqs.len(),
        room_seqs.last()
    );
    assert_eq!(room_seqs, (1..=last).collect::<Vec<_>>());
    drop(frames);
    w.shutdown();
}

/// The next frame of a subscription the test keeps (to call `resume` on it meanwhile). A
/// timer thread ends the wait after the failure guard's timeout.
fn recv_within(sub: &mut Subscription, ctx: &str) -> serde_json::Value {
    let (tx, timeout) = futures::channel::oneshot::channel::<()>();
    std::thread::spawn(move || {
        std::thread::sleep(FRAME_TIMEOUT);
        let _ = tx.send(());
    });
    match block_on(futures::future::select(Box::pin(sub.recv()), timeout)) {
        futures::future::Either::Left((Ok(bytes), _)) => {
            serde_json::from_slice(&bytes).expect("a frame is JSON")
        }
        futures::future::Either::Left((Err(e), _)) => panic!("{ctx}: the subscription ended: {e}"),
        futures::future::Either::Right(_) => panic!("{ctx}: no frame within {FRAME_TIMEOUT:?}"),
    }
}

/// The seqs of the frames up to the next `resumed` frame.
fn until_resumed(sub: &mut Subscription, ctx: &str) -> Vec<u64> {
    let mut seqs = Vec::new();
    loop {
        let f = recv_within(sub, ctx);
        if f["type"] == "resumed" {
            return seqs;
        }
        seqs.push(f["seq"].as_u64().expect("seq"));
    }
}

// A second resume never sends again a frame the first one sent (Subscription::resume).
#[test]
fn a_second_resume_sends_nothing_twice() {
    let w = World::new(0);
    let e = &w.engine;
    for i in 0..5 {
        w.post(w.alice, w.general, &format!("m{i}"));
    }
    let last = w.last_seq(w.bob, w.general);
    let mut sub = block_on(e.subscribe(w.bob)).expect("subscribe");
    block_on(sub.resume(vec![(w.general, 0)])).expect("resume");
    let first = until_resumed(&mut sub, "the first resume");
    assert_eq!(first, (1..=last).collect::<Vec<_>>());
    // Going back before frames already sent cannot be done in order: refused, nothing sent.
    let done = block_on(sub.resume(vec![(w.general, 0)])).expect("second resume");
    assert!(!done, "a resume behind what was sent is refused");
    let sentinel = w.post(w.alice, w.general, "sentinel");
    let next = recv_within(&mut sub, "after the refused resume");
    assert_eq!(
        next["seq"].as_u64(),
        Some(sentinel.seq),
        "frames sent twice: {next}"
    );
    drop(sub);
    w.shutdown();
}

// Posts racing from several threads get one gapless seq order, seen alike by every reader.
#[test]
fn concurrent_posts_get_gapless_seqs_in_one_order() {
    const THREADS: usize = 4;
    const POSTS_PER_THREAD: usize = 150;
    let w = World::new(0);
    let start = w.last_seq(w.alice, w.general);
    let carol = forward(block_on(w.engine.subscribe(w.carol)).expect("subscribe"));
    let authors = [w.alice, w.bob, w.carol, w.dave];
    let per_thread: Vec<Vec<u64>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (engine, general, author) = (w.engine.clone(), w.general, authors[t]);
                scope.spawn(move || {
                    (0..POSTS_PER_THREAD)
                        .map(|i| {
                            let text = format!("t{t} m{i}");
                            block_on(engine.post(author, general, &text, None, None))
                                .expect("post")
                                .0
                                .seq
                        })
                        .collect::<Vec<u64>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("poster"))
            .collect()
    });
    for seqs in &per_thread {
        assert!(
            seqs.windows(2).all(|p| p[0] < p[1]),
            "one thread's posts in its order"
        );
    }
    let mut all: Vec<u64> = per_thread.concat();
    all.sort_unstable();
    let total = (THREADS * POSTS_PER_THREAD) as u64;
    assert_eq!(
        all,
        (start + 1..=start + total).collect::<Vec<_>>(),
        "no gap, no repeat"
    );
    let history = w.all_history(w.dave, w.general, PAGE_LIMIT_MAX);
    let mut newest_first = all.clone();
    newest_first.reverse();
    assert_eq!(seqs(&history), newest_first);
    for seq in start + 1..=start + total {
        let f = next_frame(&carol, "carol's stream");
        assert_eq!(f["seq"], seq, "frames in seq order, one each");
    }
    drop(carol);
    w.shutdown();
}

// An attentive subscriber can always resume: the catch-up waits for room in its queue.
#[test]
fn resume_paces_its_catch_up_to_the_subscriber_queue() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = EngineConfig::new(dir.path());
    config.shards = 2;
    config.partitions = 8;
    config.pin = false;
    config.subscriber_queue_frames = 16;
    let e = Engine::open(config).expect("open");
    let a = block_on(e.create_user("a@example.com", "a", "h"))
        .expect("user")
        .id;
    let b = block_on(e.create_user("b@example.com", "b", "h"))
        .expect("user")
        .id;
    let ws = block_on(e.create_workspace(a, "w")).expect("ws").id;
    block_on(e.add_member(a, ws, "b@example.com")).expect("member");
    let c = block_on(e.create_channel(a, ws, "c", ChannelKind::Public))
        .expect("channel")
        .id;
    block_on(e.join(b, c)).expect("join");
    for i in 0..100 {
        block_on(e.post(a, c, &format!("m{i}"), None, None)).expect("post");
    }
    let sub = block_on(e.subscribe(b)).expect("subscribe");
    block_on(sub.resume(vec![(c, 0)])).expect("resume");
    let frames = forward(sub);
    for seq in 1..=102 {
        let f = next_frame(&frames, "the catch-up");
        assert_eq!(f["seq"], seq);
    }
    assert_eq!(next_frame(&frames, "resumed")["type"], "resumed");
    drop(frames);
    e.shutdown();
}

// ---------------------------------------------------------------------------------------
// Typing
// ---------------------------------------------------------------------------------------

/// The frames of a subscription up to its next `resumed` frame (left out).
fn frames_until_resumed(sub: &mut Subscription, ctx: &str) -> Vec<serde_json::Value> {
    let mut frames = Vec::new();
    loop {
        let f = recv_within(sub, ctx);
        if f["type"] == "resumed" {
            return frames;
        }
        frames.push(f);
    }
}

/// The typists of a run of `typing` frames of `channel`, in order.
fn typists(frames: &[serde_json::Value], channel: ChannelId) -> Vec<String> {
    frames
        .iter()
        .map(|f| {
            assert_eq!(f["type"], "typing", "{f}");
            assert_eq!(f["channel_id"], channel.to_string(), "{f}");
            f["user_id"].as_str().expect("user_id").to_owned()
        })
        .collect()
}

// Typing sent to a subscription before it starts (the gateway's first moments after
// `hello`) is not lost: it is kept, the latest per typist, and delivered once its channel
// is live, after the catch-up; after that, typing goes out at once.
#[test]
fn typing_before_start_is_delivered_once_the_channel_is_live() {
    let w = World::new(0);
    let e = &w.engine;
    let mut bob = block_on(e.subscribe_held(w.bob)).expect("subscribe");
    block_on(e.typing(w.alice, w.general)).expect("typing");
    let m = w.post(w.carol, w.general, "while bob was held");
    block_on(e.typing(w.carol, w.general)).expect("typing");
    block_on(e.typing(w.alice, w.general)).expect("typing again");
    block_on(e.typing(w.bob, w.general)).expect("bob's own typing");
    block_on(bob.start(Some(Vec::new()))).expect("start");
    let frames = frames_until_resumed(&mut bob, "the start");
    assert_eq!(
        frames[0]["seq"], m.seq,
        "the catch-up comes first: {frames:?}"
    );
    let mut who = typists(&frames[1..], w.general);
    who.sort();
    let mut want = vec![w.alice.to_string(), w.carol.to_string()];
    want.sort();
    assert_eq!(who, want, "one frame per typist, none of bob's own");

    block_on(e.typing(w.dave, w.general)).expect("live typing");
    let live = recv_within(&mut bob, "live typing");
    assert_eq!(typists(&[live], w.general), vec![w.dave.to_string()]);
    drop(bob);
    w.shutdown();
}

// A held subscription keeps at most HELD_EPHEMERAL_FRAMES_MAX typing frames: the memory a
// subscription that never starts can hold is bounded.
#[test]
fn typing_kept_for_a_held_subscription_is_bounded() {
    let max = chorus_engine::HELD_EPHEMERAL_FRAMES_MAX;
    let w = World::new(max + 2);
    let e = &w.engine;
    let mut bob = block_on(e.subscribe_held(w.bob)).expect("subscribe");
    for u in &w.extra {
        block_on(e.typing(*u, w.general)).expect("typing");
    }
    block_on(bob.start(Some(Vec::new()))).expect("start");
    let frames = frames_until_resumed(&mut bob, "the start");
    let who = typists(&frames, w.general);
    let first: Vec<String> = w.extra[..max].iter().map(|u| u.to_string()).collect();
    assert_eq!(
        who, first,
        "the first {max} typists, in order; later ones dropped"
    );
    drop(bob);
    w.shutdown();
}

// ---------------------------------------------------------------------------------------
// Input validation
// ---------------------------------------------------------------------------------------

// Sign-up and adding a member by email refuse what a mail system would refuse; addresses
// are one account whatever their case.
#[test]
fn malformed_emails_are_refused() {
    let w = World::new(0);
    let e = &w.engine;
    for bad in [
        "<>@example.com;DROP",
        "no-at-sign",
        "a@b@example.com",
        "a..b@example.com",
        ".a@example.com",
        "a@localhost",
        "a@-x.com",
        "a b@example.com",
        "a@example.com;DROP",
    ] {
        assert!(
            matches!(
                domain(block_on(e.create_user(bad, "n", "h"))),
                DomainError::Invalid(_)
            ),
            "sign-up with {bad:?}"
        );
        assert!(
            matches!(
                domain(block_on(e.add_member(w.alice, w.ws, bad))),
                DomainError::Invalid(_)
            ),
            "add_member with {bad:?}"
        );
    }
    let erin =
        block_on(e.create_user(" Erin.O'Neil+chat@Example.COM ", "Erin", "h")).expect("user");
    assert_eq!(
        erin.email, "Erin.O'Neil+chat@Example.COM",
        "stored as given, trimmed"
    );
    assert!(matches!(
        domain(block_on(e.create_user(
            "erin.o'neil+chat@example.com",
            "E",
            "h"
        ))),
        DomainError::Conflict(_)
    ));
    let found = block_on(e.user_by_email("ERIN.O'NEIL+CHAT@EXAMPLE.COM")).expect("lookup");
    assert_eq!(found.map(|u| u.id), Some(erin.id));
    block_on(e.add_member(w.alice, w.ws, "erin.o'neil+chat@example.com")).expect("member");
    w.shutdown();
}

// Channel names are normalised before they are stored and compared: invisible code points
// and compatibility forms cannot make a second `general`, and a name of nothing visible is
// refused.
#[test]
fn channel_names_are_normalised_before_uniqueness() {
    let w = World::new(0);
    let e = &w.engine;
    let create = |name: &str| block_on(e.create_channel(w.alice, w.ws, name, ChannelKind::Public));
    for lookalike in [
        "gen\u{200B}eral",
        "\u{FEFF}general",
        "general\u{2060}",
        "g\u{AD}eneral",
        "ｇｅｎｅｒａｌ",
        "GENERAL",
        "Gen\u{200D}eral",
    ] {
        assert!(
            matches!(domain(create(lookalike)), DomainError::Conflict(_)),
            "{lookalike:?} beside general"
        );
    }
    for invisible in [
        "\u{200B}",
        "\u{200B}\u{200C}\u{200D}\u{2060}",
        "\u{FE0F}\u{E0041}",
        " \u{200B} ",
    ] {
        assert!(
            matches!(domain(create(invisible)), DomainError::Invalid(_)),
            "{invisible:?}"
        );
    }
    let c = create("ｄｅｓｉｇｎ\u{200B}").expect("channel");
    assert_eq!(c.name, "design", "the normalised name is stored");
    let listed = block_on(e.channel(w.alice, c.id)).expect("channel");
    assert_eq!(listed.name, "design");
    assert!(matches!(domain(create("design")), DomainError::Conflict(_)));
    let cafe = create("café").expect("precomposed");
    assert!(matches!(
        domain(create("cafe\u{301}")),
        DomainError::Conflict(_)
    ));
    assert_eq!(cafe.name, "café");
    w.shutdown();
}

// A reaction is a shortcode or one Unicode emoji sequence; markup and other text are
// refused both ways, and refusals store nothing.
#[test]
fn reaction_emoji_are_shortcodes_or_unicode_emoji() {
    let w = World::new(0);
    let e = &w.engine;
    let m = w.post(w.alice, w.general, "react to me");
    let before = w.last_seq(w.alice, w.general);
    for bad in [
        "<script>", "Tada", ":tada:", "👍👍", "a👍", "é", "🇫", "\u{200B}",
    ] {
        for add in [true, false] {
            assert!(
                matches!(
                    domain(block_on(e.react(w.bob, m.id, bad, add))),
                    DomainError::Invalid(_)
                ),
                "{bad:?} add={add}"
            );
        }
    }
    assert_eq!(w.last_seq(w.alice, w.general), before, "nothing stored");
    let good = [
        "+1",
        "white_check_mark",
        "👍🏽",
        "🇫🇷",
        "👨\u{200D}👩\u{200D}👧",
        "1\u{FE0F}\u{20E3}",
    ];
    for emoji in good {
        block_on(e.react(w.bob, m.id, emoji, true)).unwrap_or_else(|err| panic!("{emoji}: {err}"));
    }
    let names: Vec<String> = w
        .message(w.carol, m.id)
        .reactions
        .into_iter()
        .map(|(e, _)| e)
        .collect();
    assert_eq!(names, good);
    for emoji in good {
        block_on(e.react(w.bob, m.id, emoji, false)).expect("remove");
    }
    assert!(w.message(w.carol, m.id).reactions.is_empty());
    w.shutdown();
}

// The push sender's checks, for many recipients of one message in one round: the message
// as it is now (edited text, then deleted), and per recipient whether they are still a
// member, their read marker, and their unread messages over all their channels.
#[test]
fn push_checks_answer_each_recipient_in_one_round() {
    let w = World::new(1);
    let e = &w.engine;
    let user0 = w.extra[0];
    let random = block_on(e.create_channel(w.alice, w.ws, "random", ChannelKind::Public))
        .expect("channel")
        .id;
    block_on(e.join(w.bob, random)).expect("join");
    w.post(w.alice, random, "elsewhere");
    let m = w.post(w.alice, w.general, "first draft");
    block_on(e.edit(w.alice, m.id, "final text")).expect("edit");
    block_on(e.mark_read(w.carol, w.general, m.seq)).expect("read");
    block_on(e.remove_channel_member(w.alice, w.general, w.dave)).expect("remove");

    let users = vec![w.bob, w.carol, w.dave, user0, w.bob];
    let found = block_on(e.push_checks(m.id, users)).expect("checks");
    let message = found.message.expect("the message");
    assert_eq!(message.text, "final text");
    assert!(!message.deleted);
    let r = &found.recipients;
    assert_eq!(r.len(), 5);
    assert!(r[0].member && r[0].read_seq < m.seq);
    assert_eq!(r[0].unread, 2, "the message and the post in random");
    assert!(r[1].member && r[1].read_seq >= m.seq);
    assert_eq!(r[1].unread, 0);
    assert!(!r[2].member, "dave was removed");
    assert!(r[3].member && r[3].read_seq < m.seq);
    assert_eq!(r[3].unread, 1);
    assert_eq!(r[4], r[0], "a user asked twice is answered twice");

    block_on(e.delete(w.alice, m.id)).expect("delete");
    let found = block_on(e.push_checks(m.id, vec![w.bob])).expect("checks");
    assert!(found.message.expect("kept in place").deleted);
    assert_eq!(found.recipients[0].unread, 1, "a deletion lowers the count");
    let beyond = MessageId {
        channel: w.general,
        seq: m.seq + 1_000,
    };
    let found = block_on(e.push_checks(beyond, vec![w.bob])).expect("checks");
    assert!(found.message.is_none());
    let nowhere = MessageId {
        channel: ChannelId(u64::MAX),
        seq: 1,
    };
    assert!(matches!(
        block_on(e.push_checks(nowhere, vec![w.bob])),
        Err(EngineError::Domain(_))
    ));
    w.shutdown();
}
