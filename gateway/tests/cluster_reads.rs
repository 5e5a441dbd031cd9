//! Reads through one node right after writes through another (`API.md` §15: a read on any
//! node sees every event acknowledged before it was sent), over three `chorus serve`
//! processes: a private channel's new member lists it, an edit and a reaction show in the
//! message, a DM opened elsewhere is read and posted to, a removed member no longer lists
//! the channel, and a deleted message reads as deleted.

mod common;

use common::{str_of, ClusterConfig, Resp, Server, AUTH_UNLIMITED, PASSWORD};
use serde_json::json;
use std::time::{Duration, Instant};

/// `call` until it answers something but 503 (a leader being elected): that answer.
fn settled(call: impl Fn() -> Resp) -> Resp {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = call();
        if r.status != 503 || Instant::now() > deadline {
            return r;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn writes_through_one_node_are_read_at_once_through_another() {
    let config = ClusterConfig::three();
    let nodes: Vec<Server> = (1..=3)
        .map(|id| Server::start(&config.node(id, AUTH_UNLIMITED)))
        .collect();
    let mut wrong = Vec::new();
    for i in 0..30 {
        let (a, b) = (&nodes[i % 3], &nodes[(i + 1) % 3]);
        let call =
            |s: &Server, method: &str, path: &str, token: &str, body: Option<serde_json::Value>| {
                settled(|| s.call(method, path, Some(token), body.clone()))
            };
        let sign_up = |name: String| {
            let body =
                json!({"email": format!("{name}@example.com"), "password": PASSWORD, "name": name});
            let r = settled(|| a.call("POST", "/api/v1/auth/signup", None, Some(body.clone())));
            assert_eq!(r.status, 201, "{}", r.text);
            (str_of(&r.body["token"]), str_of(&r.body["user"]["id"]))
        };
        let ((ta, _), (tb, ub)) = (sign_up(format!("a{i}")), sign_up(format!("b{i}")));
        let r = call(
            a,
            "POST",
            "/api/v1/workspaces",
            &ta,
            Some(json!({"name": "w"})),
        );
        assert_eq!(r.status, 201, "{}", r.text);
        let wid = str_of(&r.body["workspace"]["id"]);
        let body = json!({"email": format!("b{i}@example.com")});
        let r = call(
            a,
            "POST",
            &format!("/api/v1/workspaces/{wid}/members"),
            &ta,
            Some(body),
        );
        assert_eq!(r.status, 201, "{}", r.text);
        let body = json!({"name": "p", "kind": "private"});
        let r = call(
            a,
            "POST",
            &format!("/api/v1/workspaces/{wid}/channels"),
            &ta,
            Some(body),
        );
        assert_eq!(r.status, 201, "{}", r.text);
        let cid = str_of(&r.body["channel"]["id"]);
        let body = json!({"user_id": ub});
        let r = call(
            a,
            "POST",
            &format!("/api/v1/channels/{cid}/members"),
            &ta,
            Some(body),
        );
        assert!(r.status == 200 || r.status == 201, "{}", r.text);
        let r = call(
            b,
            "GET",
            &format!("/api/v1/workspaces/{wid}/channels"),
            &tb,
            None,
        );
        if !r.text.contains(&cid) {
            wrong.push(format!(
                "{i}: the new member's list {} {}",
                r.status, r.text
            ));
        }
        let body = json!({"text": "first"});
        let r = call(
            a,
            "POST",
            &format!("/api/v1/channels/{cid}/messages"),
            &ta,
            Some(body),
        );
        assert_eq!(r.status, 201, "{}", r.text);
        let mid = str_of(&r.body["message"]["id"]);
        let message = format!("/api/v1/channels/{cid}/messages/{mid}");
        let r = call(a, "PATCH", &message, &ta, Some(json!({"text": "edited"})));
        assert_eq!(r.status, 200, "{}", r.text);
        let r = call(b, "GET", &message, &tb, None);
        if r.body["message"]["text"] != "edited" {
            wrong.push(format!("{i}: the edit {} {}", r.status, r.text));
        }
        let r = call(a, "PUT", &format!("{message}/reactions/%2B1"), &ta, None);
        assert!(r.status < 300, "{}", r.text);
        let r = call(b, "GET", &message, &tb, None);
        if !r.text.contains("+1") {
            wrong.push(format!("{i}: the reaction {} {}", r.status, r.text));
        }
        let body = json!({"user_ids": [ub]});
        let r = call(
            a,
            "POST",
            &format!("/api/v1/workspaces/{wid}/dms"),
            &ta,
            Some(body),
        );
        assert!(r.status == 200 || r.status == 201, "{}", r.text);
        let dm = str_of(&r.body["channel"]["id"]);
        let r = call(b, "GET", &format!("/api/v1/channels/{dm}"), &tb, None);
        if r.status != 200 {
            wrong.push(format!("{i}: the DM {} {}", r.status, r.text));
        }
        let body = json!({"text": "hi"});
        let r = call(
            b,
            "POST",
            &format!("/api/v1/channels/{dm}/messages"),
            &tb,
            Some(body),
        );
        if r.status != 201 {
            wrong.push(format!("{i}: a post to the DM {} {}", r.status, r.text));
        }
        let r = call(
            a,
            "DELETE",
            &format!("/api/v1/channels/{cid}/members/{ub}"),
            &ta,
            None,
        );
        assert!(r.status < 300, "{}", r.text);
        let r = call(
            b,
            "GET",
            &format!("/api/v1/workspaces/{wid}/channels"),
            &tb,
            None,
        );
        if r.status != 200 || r.text.contains(&cid) {
            wrong.push(format!(
                "{i}: the removed member's list {} {}",
                r.status, r.text
            ));
        }
        let r = call(a, "DELETE", &message, &ta, None);
        assert!(r.status < 300, "{}", r.text);
        let r = call(b, "GET", &message, &ta, None);
        if r.status != 404 && r.body["message"]["deleted"] != true {
            wrong.push(format!("{i}: the deletion {} {}", r.status, r.text));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

// A member added to a channel through one node, while connected through another, gets the
// channel's events live there from then on; removed, gets none.
#[test]
fn a_member_added_elsewhere_gets_the_channel_live_and_a_removed_one_stops() {
    let config = ClusterConfig::three();
    let nodes: Vec<Server> = (1..=3)
        .map(|id| Server::start(&config.node(id, AUTH_UNLIMITED)))
        .collect();
    let alice = common::cluster_signup(&nodes[0], "alice", None);
    let bob = common::cluster_signup(&nodes[0], "bob", None);
    let (ta, ub) = (alice.token.clone(), bob.id.clone());
    let wid = common::cluster_workspace(&nodes[0], &alice);
    common::cluster_add_member(&nodes[0], &alice, &wid, &bob);
    let call = |s: &Server, method: &str, path: &str, body: Option<serde_json::Value>| {
        settled(|| s.call(method, path, Some(&ta), body.clone()))
    };
    let body = json!({"name": "p", "kind": "private"});
    let r = call(
        &nodes[0],
        "POST",
        &format!("/api/v1/workspaces/{wid}/channels"),
        Some(body),
    );
    let cid = str_of(&r.body["channel"]["id"]);
    // Bob is connected through node 3 before he is in the channel.
    let (mut ws, _) = nodes[2].connect(&bob);
    ws.ping("connected");
    let r = call(
        &nodes[0],
        "POST",
        &format!("/api/v1/channels/{cid}/members"),
        Some(json!({"user_id": ub})),
    );
    assert!(r.status == 200 || r.status == 201, "{}", r.text);
    let post = |text: &str| {
        let body = json!({"text": text, "client_msg_id": text});
        let r = call(
            &nodes[0],
            "POST",
            &format!("/api/v1/channels/{cid}/messages"),
            Some(body),
        );
        assert_eq!(r.status, 201, "{}", r.text);
    };
    post("welcome");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let Some(frame) = ws.recv_type_within("event", left) else {
            panic!("bob on node 3 never got the post after he was added");
        };
        if frame["event"]["message"]["text"] == "welcome" {
            break;
        }
    }
    let r = call(
        &nodes[0],
        "DELETE",
        &format!("/api/v1/channels/{cid}/members/{ub}"),
        None,
    );
    assert!(r.status < 300, "{}", r.text);
    post("after the removal");
    // Ping twice over: by then the post was delivered wherever it would go.
    std::thread::sleep(Duration::from_millis(500));
    ws.ping("later");
    let mut seen = Vec::new();
    while let Some(frame) = ws.recv_type_within("event", Duration::from_millis(300)) {
        seen.push(frame["event"]["message"]["text"].clone());
    }
    assert!(
        !seen.contains(&json!("after the removal")),
        "a removed member got a post: {seen:?}"
    );
}

// What the directory holds of a user, written through one node, is read at once through
// another: notification preferences, a channel's preferences, push devices, to-device
// messages (30 rounds; a node whose directory lags must catch up before it answers).
#[test]
fn directory_writes_through_one_node_are_read_at_once_through_another() {
    let config = ClusterConfig::three();
    let nodes: Vec<Server> = (1..=3)
        .map(|id| Server::start(&config.node(id, common::UNLIMITED)))
        .collect();
    let alice = common::cluster_signup(&nodes[0], "alice", Some("phone"));
    let bob = common::cluster_signup(&nodes[0], "bob", Some("laptop"));
    let (ta, tb, ub) = (alice.token.clone(), bob.token.clone(), bob.id.clone());
    let wid = common::cluster_workspace(&nodes[0], &alice);
    common::cluster_add_member(&nodes[0], &alice, &wid, &bob);
    let cid = common::cluster_channel(&nodes[0], &alice, &wid, "general");
    let mut wrong = Vec::new();
    for i in 0..30 {
        let (a, b) = (&nodes[i % 3], &nodes[(i + 1) % 3]);
        let word = format!("kw{i}");
        let r = settled(|| {
            let body = json!({"keywords": [word]});
            a.call(
                "PATCH",
                "/api/v1/me/notification-prefs",
                Some(&tb),
                Some(body),
            )
        });
        assert_eq!(r.status, 200, "{}", r.text);
        let r = settled(|| b.call("GET", "/api/v1/me/notification-prefs", Some(&tb), None));
        if r.body["prefs"]["keywords"] != json!([word]) {
            wrong.push(format!("{i}: prefs {}", r.text));
        }
        let level = ["all", "mentions", "none"][i % 3];
        let path = format!("/api/v1/channels/{cid}/notification-prefs");
        let r = settled(|| {
            let body = json!({"level": level, "muted": false});
            a.call("PUT", &path, Some(&tb), Some(body))
        });
        assert_eq!(r.status, 200, "{}", r.text);
        let r = settled(|| b.call("GET", &path, Some(&tb), None));
        if r.body["channel_prefs"]["level"] != level {
            wrong.push(format!("{i}: channel prefs {}", r.text));
        }
        let r = settled(|| {
            let body = json!({"app_id": "app", "pushkey": format!("key{i}"), "platform": "fcm"});
            a.call("POST", "/api/v1/me/push-devices", Some(&tb), Some(body))
        });
        assert_eq!(r.status, 201, "{}", r.text);
        let device = str_of(&r.body["device"]["id"]);
        let r = settled(|| b.call("GET", "/api/v1/me/push-devices", Some(&tb), None));
        if !r.text.contains(&format!("key{i}")) {
            wrong.push(format!("{i}: push devices {}", r.text));
        }
        let path = format!("/api/v1/me/push-devices/{device}");
        let r = settled(|| a.call("DELETE", &path, Some(&tb), None));
        assert_eq!(r.status, 204, "{}", r.text);
        let r = settled(|| {
            let body = json!({"messages": {ub.clone(): {"laptop": {"n": i}}}});
            a.call(
                "PUT",
                &format!("/api/v1/e2ee/to-device/t{i}"),
                Some(&ta),
                Some(body),
            )
        });
        assert_eq!(r.status, 200, "{}", r.text);
        let r = settled(|| b.call("GET", "/api/v1/e2ee/to-device?limit=100", Some(&tb), None));
        let last = r.body["messages"]
            .as_array()
            .and_then(|m| m.last().cloned());
        if last.map(|m| m["content"]["n"].clone()) != Some(json!(i)) {
            wrong.push(format!("{i}: to-device {}", r.text));
        }
    }
    assert!(wrong.is_empty(), "{} stale reads: {wrong:#?}", wrong.len());
}

// A post through one node shows at once through another in the channel's `last_seq` and
// in the other member's unread count (30 rounds).
#[test]
fn a_post_elsewhere_counts_at_once_in_last_seq_and_unreads() {
    let config = ClusterConfig::three();
    let nodes: Vec<Server> = (1..=3)
        .map(|id| Server::start(&config.node(id, common::UNLIMITED)))
        .collect();
    let alice = common::cluster_signup(&nodes[0], "alice", None);
    let bob = common::cluster_signup(&nodes[0], "bob", None);
    let wid = common::cluster_workspace(&nodes[0], &alice);
    common::cluster_add_member(&nodes[0], &alice, &wid, &bob);
    let cid = common::cluster_channel(&nodes[0], &alice, &wid, "general");
    let r = settled(|| {
        let path = format!("/api/v1/channels/{cid}/join");
        nodes[0].call("POST", &path, Some(&bob.token), None)
    });
    assert_eq!(r.status, 200, "{}", r.text);
    let mut wrong = Vec::new();
    for i in 0..30 {
        let (a, b) = (&nodes[i % 3], &nodes[(i + 1) % 3]);
        let r = settled(|| {
            let body = json!({"text": format!("post {i}"), "client_msg_id": format!("p{i}")});
            a.call(
                "POST",
                &format!("/api/v1/channels/{cid}/messages"),
                Some(&alice.token),
                Some(body),
            )
        });
        assert_eq!(r.status, 201, "{}", r.text);
        let seq = r.body["message"]["seq"].clone();
        let r = b.call(
            "GET",
            &format!("/api/v1/channels/{cid}"),
            Some(&bob.token),
            None,
        );
        if r.body["channel"]["last_seq"] != seq {
            wrong.push(format!("{i}: last_seq {} for {seq}", r.text));
        }
        let r = b.call(
            "GET",
            &format!("/api/v1/workspaces/{wid}/unreads"),
            Some(&bob.token),
            None,
        );
        let unread = r.body["unreads"]
            .as_array()
            .and_then(|u| u.iter().find(|x| x["channel_id"] == cid.as_str()).cloned());
        if unread.as_ref().map(|u| u["unread_count"].clone()) != Some(json!(i + 1)) {
            wrong.push(format!("{i}: unreads {}", r.text));
        }
    }
    assert!(wrong.is_empty(), "{} stale reads: {wrong:#?}", wrong.len());
}

// Two members who open their DM at the same moment through different nodes get the same
// channel (10 pairs).
#[test]
fn a_dm_opened_at_once_through_two_nodes_is_one_channel() {
    let config = ClusterConfig::three();
    let nodes: Vec<Server> = (1..=3)
        .map(|id| Server::start(&config.node(id, common::UNLIMITED)))
        .collect();
    let owner = common::cluster_signup(&nodes[0], "owner", None);
    let wid = common::cluster_workspace(&nodes[0], &owner);
    for i in 0..10 {
        let (a, b) = (
            common::cluster_signup(&nodes[0], &format!("a{i}"), None),
            common::cluster_signup(&nodes[0], &format!("b{i}"), None),
        );
        for u in [&a, &b] {
            common::cluster_add_member(&nodes[0], &owner, &wid, u);
        }
        let path = format!("/api/v1/workspaces/{wid}/dms");
        let open = |s: &Server, me: &common::User, other: &common::User| {
            let body = json!({"user_ids": [other.id]});
            settled(|| s.call("POST", &path, Some(&me.token), Some(body.clone())))
        };
        let (one, two) = std::thread::scope(|scope| {
            let one = scope.spawn(|| open(&nodes[1], &a, &b));
            let two = scope.spawn(|| open(&nodes[2], &b, &a));
            (one.join().unwrap(), two.join().unwrap())
        });
        assert!(
            one.status < 300 && two.status < 300,
            "{} / {}",
            one.text,
            two.text
        );
        assert_eq!(
            one.body["channel"]["id"], two.body["channel"]["id"],
            "pair {i}: {} / {}",
            one.text, two.text
        );
    }
}

// One email signed up at once through three nodes is one account: one 201 and two 409s,
// ten times over; and the account's password works through every node.
#[test]
fn one_email_signed_up_at_once_through_three_nodes_is_one_account() {
    let config = ClusterConfig::three();
    let nodes: Vec<Server> = (1..=3)
        .map(|id| Server::start(&config.node(id, AUTH_UNLIMITED)))
        .collect();
    for i in 0..10 {
        let email = format!("same{i}@example.com");
        let answers: Vec<Resp> = std::thread::scope(|scope| {
            let handles: Vec<_> = (nodes.iter().enumerate())
                .map(|(n, s)| {
                    let body =
                        json!({"email": email, "password": PASSWORD, "name": format!("n{n}")});
                    scope.spawn(move || {
                        settled(|| s.call("POST", "/api/v1/auth/signup", None, Some(body.clone())))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let statuses: Vec<u16> = answers.iter().map(|r| r.status).collect();
        let created: Vec<&Resp> = answers.iter().filter(|r| r.status == 201).collect();
        assert_eq!(created.len(), 1, "round {i}: {statuses:?}");
        assert_eq!(
            statuses.iter().filter(|s| **s == 409).count(),
            2,
            "round {i}: {statuses:?}"
        );
        let id = str_of(&created[0].body["user"]["id"]);
        for s in &nodes {
            let body = json!({"email": email, "password": PASSWORD});
            let r = settled(|| s.call("POST", "/api/v1/auth/login", None, Some(body.clone())));
            assert_eq!(r.status, 200, "{}", r.text);
            assert_eq!(str_of(&r.body["user"]["id"]), id);
        }
    }
}

// A file uploaded through one node is attached at once to a message posted through
// another: the partition that decides the post knows every file recorded before it,
// wherever the upload was taken.
#[test]
fn a_file_uploaded_through_one_node_is_attached_at_once_through_another() {
    let config = ClusterConfig::three();
    let nodes: Vec<Server> = (1..=3)
        .map(|id| Server::start(&config.node(id, common::UNLIMITED)))
        .collect();
    let alice = common::cluster_signup(&nodes[0], "alice", None);
    let wid = common::cluster_workspace(&nodes[0], &alice);
    let cid = common::cluster_channel(&nodes[0], &alice, &wid, "general");
    let mut refused = Vec::new();
    for i in 0..30 {
        let (up, post) = (&nodes[i % 3], &nodes[(i + 1) % 3]);
        let r =
            settled(|| common::upload_bytes_raw(up, &alice, &wid, "t.txt", "text/plain", b"hello"));
        assert_eq!(r.status, 201, "{}", r.text);
        let fid = str_of(&r.body["file"]["id"]);
        let body = json!({"text": format!("file {i}"), "file_ids": [fid]});
        let path = format!("/api/v1/channels/{cid}/messages");
        let r = settled(|| post.call("POST", &path, Some(&alice.token), Some(body.clone())));
        if r.status != 201 {
            refused.push(format!("{i}: {} {}", r.status, r.text));
            continue;
        }
        assert_eq!(
            str_of(&r.body["message"]["files"][0]["id"]),
            fid,
            "{}",
            r.text
        );
    }
    assert!(refused.is_empty(), "refused: {refused:?}");
}

// A channel made through one node takes a post through another at once, and a member
// added through one node posts through another at once.
#[test]
fn a_channel_made_through_one_node_takes_posts_at_once_through_another() {
    let config = ClusterConfig::three();
    let nodes: Vec<Server> = (1..=3)
        .map(|id| Server::start(&config.node(id, common::UNLIMITED)))
        .collect();
    let alice = common::cluster_signup(&nodes[0], "alice", None);
    let bob = common::cluster_signup(&nodes[1], "bob", None);
    let wid = common::cluster_workspace(&nodes[0], &alice);
    common::cluster_add_member(&nodes[0], &alice, &wid, &bob);
    let mut refused = Vec::new();
    for i in 0..30 {
        let (make, post) = (&nodes[i % 3], &nodes[(i + 1) % 3]);
        let r = settled(|| {
            let body = json!({"name": format!("c{i}"), "kind": "public"});
            let path = format!("/api/v1/workspaces/{wid}/channels");
            make.call("POST", &path, Some(&alice.token), Some(body))
        });
        assert_eq!(r.status, 201, "{}", r.text);
        let cid = str_of(&r.body["channel"]["id"]);
        let path = format!("/api/v1/channels/{cid}/messages");
        let body = json!({"text": format!("first {i}")});
        let r = settled(|| post.call("POST", &path, Some(&alice.token), Some(body.clone())));
        if r.status != 201 {
            refused.push(format!("post {i}: {} {}", r.status, r.text));
        }
        let members = format!("/api/v1/channels/{cid}/members");
        let r = settled(|| {
            let body = json!({"user_id": bob.id});
            make.call("POST", &members, Some(&alice.token), Some(body))
        });
        assert_eq!(r.status, 201, "{}", r.text);
        let body = json!({"text": format!("bob {i}")});
        let r = settled(|| post.call("POST", &path, Some(&bob.token), Some(body.clone())));
        if r.status != 201 {
            refused.push(format!("bob's post {i}: {} {}", r.status, r.text));
        }
    }
    assert!(refused.is_empty(), "refused: {refused:?}");
}
