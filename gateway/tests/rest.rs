//! End-to-end tests of the REST API of `API.md` against the real `chorus` binary on real
//! sockets: the whole flow, bad input, workspace isolation, the OpenAPI document, and the
//! rate limit. Each test starts its own server on a free port in a fresh data directory.

mod common;

use chorus_engine::ids::{ChannelId, MessageId, UserId, WorkspaceId};
use common::{upload_file, Resp, User, AUTH_UNLIMITED, PASSWORD};
use serde_json::{json, Value};
use std::time::Instant;

/// The request body limit the tests configure: small, so the 413 case sends little.
const BODY_LIMIT: usize = 2 * 1024 * 1024;
/// Settings for every test but the rate-limit one: a rate no test reaches.
const FAST: &str =
    "rate_per_s = 100000.0\nrate_burst = 100000.0\nrequest_body_bytes_max = 2097152\n";

/// The shared harness's server with the REST conveniences these tests read best with.
struct Server(common::Server);

impl std::ops::Deref for Server {
    type Target = common::Server;

    fn deref(&self) -> &common::Server {
        &self.0
    }
}

impl Server {
    fn start(config: &str) -> Server {
        Server(common::Server::start(&format!("{AUTH_UNLIMITED}{config}")))
    }

    /// Sends a request as a user (or anonymously), with a JSON body if given.
    fn call(&self, method: &str, path: &str, user: Option<&User>, body: Option<Value>) -> Resp {
        let token = user.map(|u| u.token.as_str());
        self.0.call(method, path, token, body)
    }

    fn get(&self, path: &str, user: &User) -> Resp {
        self.call("GET", path, Some(user), None)
    }

    fn send(&self, method: &str, path: &str, user: &User, body: Value) -> Resp {
        self.call(method, path, Some(user), Some(body))
    }

    fn signup(&self, email: &str, name: &str) -> User {
        let r = self.call(
            "POST",
            "/api/v1/auth/signup",
            None,
            Some(json!({"email": email, "password": PASSWORD, "name": name})),
        );
        let body = ok(r, 201);
        assert_eq!(body["user"]["email"], email);
        assert_eq!(body["user"]["name"], name);
        User {
            id: body["user"]["id"].as_str().expect("id").to_owned(),
            email: email.to_owned(),
            token: body["token"].as_str().expect("token").to_owned(),
        }
    }

    /// Creates a workspace owned by `owner` with `members` added; returns its ID.
    fn workspace(&self, owner: &User, name: &str, members: &[&User]) -> String {
        let w = ok(
            self.send("POST", "/api/v1/workspaces", owner, json!({"name": name})),
            201,
        );
        let wid = str_of(&w["workspace"]["id"]);
        for m in members {
            let path = format!("/api/v1/workspaces/{wid}/members");
            ok(
                self.send("POST", &path, owner, json!({"email": m.email})),
                201,
            );
        }
        wid
    }

    fn channel(&self, user: &User, wid: &str, name: &str, kind: &str) -> String {
        let path = format!("/api/v1/workspaces/{wid}/channels");
        let c = ok(
            self.send("POST", &path, user, json!({"name": name, "kind": kind})),
            201,
        );
        assert_eq!(c["channel"]["kind"], kind);
        str_of(&c["channel"]["id"])
    }

    fn post(&self, user: &User, cid: &str, body: Value) -> Value {
        let path = format!("/api/v1/channels/{cid}/messages");
        ok(self.send("POST", &path, user, body), 201)["message"].clone()
    }

    /// Joins a public channel.
    fn join(&self, user: &User, cid: &str) {
        let r = self.call(
            "POST",
            &format!("/api/v1/channels/{cid}/join"),
            Some(user),
            None,
        );
        assert_eq!(r.status, 200, "{}", r.text);
    }

    /// Checks that the server still answers: `/healthz` and an authenticated call.
    fn assert_serving(&self, user: &User) {
        let h = self.raw("GET", "/healthz", &[], None);
        assert_eq!(h.status, 200, "{}", h.text);
        ok(self.get("/api/v1/me", user), 200);
    }
}

fn str_of(v: &Value) -> String {
    v.as_str()
        .unwrap_or_else(|| panic!("not a string: {v}"))
        .to_owned()
}

/// Asserts a JSON success answer and returns its body.
#[track_caller]
fn ok(r: Resp, status: u16) -> Value {
    assert_eq!(r.status, status, "{}", r.text);
    assert_eq!(r.content_type.as_deref(), Some("application/json"));
    r.body
}

/// Asserts an error answer in `API.md`'s shape: `{"error": {"code", "message"}}` only.
#[track_caller]
fn err(r: &Resp, status: u16, code: &str) {
    assert_eq!(r.status, status, "{}", r.text);
    assert_eq!(r.content_type.as_deref(), Some("application/json"));
    let obj = r.body.as_object().expect("an object");
    assert_eq!(obj.len(), 1, "{}", r.text);
    let e = r.body["error"].as_object().expect("error object");
    assert_eq!(e.len(), 2, "{}", r.text);
    assert_eq!(e["code"], code, "{}", r.text);
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{}",
        r.text
    );
}

fn texts(messages: &Value) -> Vec<String> {
    messages
        .as_array()
        .expect("array")
        .iter()
        .map(|m| str_of(&m["text"]))
        .collect()
}

fn ids(items: &Value) -> Vec<String> {
    items
        .as_array()
        .expect("array")
        .iter()
        .map(|m| str_of(&m["id"]))
        .collect()
}

// The whole REST flow of API.md works against the real binary: accounts, workspaces,
// members, channels, DMs, channel membership, messages, threads, edits and their history,
// deletions, reactions, pagination and idempotent posting.
#[test]
fn rest_flow() {
    let s = Server::start(FAST);
    let alice = s.signup("alice@example.com", "Alice");
    let bob = s.signup("bob@example.com", "Bob");
    let carol = s.signup("carol@example.com", "Carol");

    // Login gives a working token for the same user.
    let login = ok(
        s.call(
            "POST",
            "/api/v1/auth/login",
            None,
            Some(json!({"email": "alice@example.com", "password": PASSWORD})),
        ),
        200,
    );
    assert_eq!(login["user"]["id"], alice.id.as_str());
    let alice = User {
        token: str_of(&login["token"]),
        ..alice
    };
    let me = ok(s.get("/api/v1/me", &alice), 200);
    assert_eq!(me["user"]["email"], "alice@example.com");
    assert_eq!(me["workspaces"], json!([]));

    // A workspace with members.
    let wid = s.workspace(&alice, "acme", &[&bob, &carol]);
    let me = ok(s.get("/api/v1/me", &alice), 200);
    assert_eq!(me["workspaces"], json!([{"id": wid, "name": "acme"}]));
    let members_path = format!("/api/v1/workspaces/{wid}/members");
    err(
        &s.send("POST", &members_path, &alice, json!({"email": bob.email})),
        409,
        "conflict",
    );
    err(
        &s.send(
            "POST",
            &members_path,
            &bob,
            json!({"email": "x@example.com"}),
        ),
        403,
        "forbidden",
    );
    let members = ok(s.get(&members_path, &bob), 200);
    assert_eq!(members["next_cursor"], Value::Null);
    let mut emails: Vec<String> = members["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| str_of(&m["email"]))
        .collect();
    emails.sort();
    assert_eq!(emails, [&*alice.email, &*bob.email, &*carol.email]);
    let roles: Vec<&Value> = members["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m["role"])
        .collect();
    assert!(roles.contains(&&json!("owner")));

    // Public and private channels; bob sees only the public one until added.
    let general = s.channel(&alice, &wid, "general", "public");
    let secret = s.channel(&alice, &wid, "secret", "private");
    let channels_path = format!("/api/v1/workspaces/{wid}/channels");
    let mut all = ids(&ok(s.get(&channels_path, &alice), 200)["channels"]);
    all.sort();
    let mut want = vec![general.clone(), secret.clone()];
    want.sort();
    assert_eq!(all, want);
    let listed = ok(s.get(&channels_path, &bob), 200);
    assert_eq!(ids(&listed["channels"]), std::slice::from_ref(&general));
    assert_eq!(listed["next_cursor"], Value::Null);

    // DMs: the same set is the same channel, whoever opens it.
    let dms = format!("/api/v1/workspaces/{wid}/dms");
    let dm = ok(
        s.send("POST", &dms, &alice, json!({"user_ids": [bob.id]})),
        201,
    );
    assert_eq!(dm["channel"]["kind"], "dm");
    let again = ok(
        s.send("POST", &dms, &alice, json!({"user_ids": [bob.id]})),
        200,
    );
    assert_eq!(again["channel"]["id"], dm["channel"]["id"]);
    let from_bob = ok(
        s.send("POST", &dms, &bob, json!({"user_ids": [alice.id]})),
        200,
    );
    assert_eq!(from_bob["channel"]["id"], dm["channel"]["id"]);
    let group = ok(
        s.send(
            "POST",
            &dms,
            &alice,
            json!({"user_ids": [bob.id, carol.id]}),
        ),
        201,
    );
    assert_eq!(group["channel"]["kind"], "group_dm");
    let group_again = ok(
        s.send(
            "POST",
            &dms,
            &carol,
            json!({"user_ids": [alice.id, bob.id]}),
        ),
        200,
    );
    assert_eq!(group_again["channel"]["id"], group["channel"]["id"]);

    // Joining: public channels only; a private one is not found.
    let joined = ok(
        s.call(
            "POST",
            &format!("/api/v1/channels/{general}/join"),
            Some(&bob),
            None,
        ),
        200,
    );
    assert_eq!(joined["channel"]["id"], general.as_str());
    err(
        &s.call(
            "POST",
            &format!("/api/v1/channels/{secret}/join"),
            Some(&bob),
            None,
        ),
        404,
        "not_found",
    );

    // Adding and removing a channel member.
    let secret_members = format!("/api/v1/channels/{secret}/members");
    let added = ok(
        s.send(
            "POST",
            &secret_members,
            &alice,
            json!({"user_id": carol.id}),
        ),
        201,
    );
    assert_eq!(added["channel"]["id"], secret.as_str());
    assert!(ids(&ok(s.get(&channels_path, &carol), 200)["channels"]).contains(&secret));
    let removed = s.call(
        "DELETE",
        &format!("{secret_members}/{}", carol.id),
        Some(&alice),
        None,
    );
    assert_eq!(removed.status, 204, "{}", removed.text);
    assert_eq!(removed.text, "");
    err(
        &s.get(&format!("/api/v1/channels/{secret}"), &carol),
        404,
        "not_found",
    );

    // Posting: every field of a message.
    let root = s.post(&alice, &general, json!({"text": "hello"}));
    assert_eq!(root["text"], "hello");
    assert_eq!(root["user_id"], alice.id.as_str());
    assert_eq!(root["channel_id"], general.as_str());
    assert_eq!(root["thread_id"], Value::Null);
    assert_eq!(root["reply_count"], 0);
    assert_eq!(root["reactions"], json!({}));
    assert_eq!(root["edited_at"], Value::Null);
    assert_eq!(root["deleted"], false);
    assert_eq!(root["client_msg_id"], Value::Null);
    assert!(root["seq"].as_u64().unwrap() > 0);
    assert!(str_of(&root["created_at"]).ends_with('Z'));
    let root_id = str_of(&root["id"]);
    let root_path = format!("/api/v1/channels/{general}/messages/{root_id}");

    // Thread replies, oldest first; the root counts them; history lists top level only.
    let r1 = s.post(
        &bob,
        &general,
        json!({"text": "first", "thread_id": root_id}),
    );
    let r2 = s.post(
        &bob,
        &general,
        json!({"text": "second", "thread_id": root_id}),
    );
    assert_eq!(r1["thread_id"], root_id.as_str());
    let replies = ok(s.get(&format!("{root_path}/replies"), &alice), 200);
    assert_eq!(texts(&replies["messages"]), ["first", "second"]);
    assert_eq!(replies["next_cursor"], Value::Null);
    let paged = ok(s.get(&format!("{root_path}/replies?limit=1"), &alice), 200);
    assert_eq!(texts(&paged["messages"]), ["first"]);
    let cursor = str_of(&paged["next_cursor"]);
    let rest = ok(
        s.get(
            &format!("{root_path}/replies?limit=1&after={cursor}"),
            &alice,
        ),
        200,
    );
    assert_eq!(ids(&rest["messages"]), [str_of(&r2["id"])]);
    assert_eq!(
        ok(s.get(&root_path, &bob), 200)["message"]["reply_count"],
        2
    );
    let top = ok(
        s.get(&format!("/api/v1/channels/{general}/messages"), &bob),
        200,
    );
    assert_eq!(texts(&top["messages"]), ["hello"]);

    // Edits: author only, with every version kept.
    let edited = ok(
        s.send("PATCH", &root_path, &alice, json!({"text": "hello, world"})),
        200,
    );
    assert_eq!(edited["message"]["text"], "hello, world");
    assert!(edited["message"]["edited_at"].is_string());
    err(
        &s.send("PATCH", &root_path, &bob, json!({"text": "mine now"})),
        403,
        "forbidden",
    );
    let history = ok(s.get(&format!("{root_path}/history"), &bob), 200);
    let versions = history["versions"].as_array().unwrap();
    assert_eq!(texts(&history["versions"]), ["hello", "hello, world"]);
    assert!(versions.iter().all(|v| v["at"].is_string()));

    // Reactions, with a percent-encoded emoji.
    for (user, emoji) in [(&bob, "tada"), (&alice, "tada"), (&alice, "%2B1")] {
        let r = s.call(
            "PUT",
            &format!("{root_path}/reactions/{emoji}"),
            Some(user),
            None,
        );
        assert_eq!(r.status, 204, "{}", r.text);
    }
    s.join(&carol, &general);
    let reacted = ok(s.get(&root_path, &carol), 200);
    assert_eq!(
        reacted["message"]["reactions"],
        json!({"tada": [bob.id, alice.id], "+1": [alice.id]})
    );
    let r = s.call(
        "DELETE",
        &format!("{root_path}/reactions/tada"),
        Some(&alice),
        None,
    );
    assert_eq!(r.status, 204, "{}", r.text);
    let reacted = ok(s.get(&root_path, &alice), 200);
    assert_eq!(
        reacted["message"]["reactions"],
        json!({"tada": [bob.id], "+1": [alice.id]})
    );

    // Deletion keeps the message's place with an empty text.
    let r = s.call("DELETE", &root_path, Some(&alice), None);
    assert_eq!(r.status, 204, "{}", r.text);
    let gone = ok(s.get(&root_path, &bob), 200);
    assert_eq!(gone["message"]["text"], "");
    assert_eq!(gone["message"]["deleted"], true);

    // Pagination over 120 messages, newest first, 50 at a time.
    let busy = s.channel(&alice, &wid, "busy", "public");
    for i in 0..120 {
        s.post(&alice, &busy, json!({"text": format!("m{i}")}));
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = Vec::new();
    loop {
        let mut path = format!("/api/v1/channels/{busy}/messages?limit=50");
        if let Some(c) = &cursor {
            path.push_str(&format!("&before={c}"));
        }
        let page = ok(s.get(&path, &alice), 200);
        pages.push(page["messages"].as_array().unwrap().len());
        seen.extend(page["messages"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(pages, [50, 50, 20]);
    let want: Vec<String> = (0..120).rev().map(|i| format!("m{i}")).collect();
    assert_eq!(texts(&Value::Array(seen.clone())), want);
    let seqs: Vec<u64> = seen.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] > w[1]), "{seqs:?}");

    // A repeated client_msg_id answers 200 with the first message and stores nothing new.
    let body = json!({"text": "once", "client_msg_id": "k-1"});
    let first = s.post(&alice, &busy, body.clone());
    let repeat = ok(
        s.send(
            "POST",
            &format!("/api/v1/channels/{busy}/messages"),
            &alice,
            body,
        ),
        200,
    );
    assert_eq!(repeat["message"], first);
    assert_eq!(first["client_msg_id"], "k-1");
    let newest = ok(
        s.get(&format!("/api/v1/channels/{busy}/messages?limit=2"), &alice),
        200,
    );
    assert_eq!(texts(&newest["messages"]), ["once", "m119"]);
}

/// How a bad-input case authenticates.
enum Auth<'a> {
    None,
    As(&'a User),
    Header(&'a str),
}

/// One bad request and the error it must get.
struct Case<'a> {
    what: &'static str,
    method: &'static str,
    path: String,
    auth: Auth<'a>,
    body: Option<Vec<u8>>,
    status: u16,
    code: &'static str,
}

fn case<'a>(
    what: &'static str,
    method: &'static str,
    path: String,
    auth: Auth<'a>,
    body: Option<Vec<u8>>,
    expect: (u16, &'static str),
) -> Case<'a> {
    Case {
        what,
        method,
        path,
        auth,
        body,
        status: expect.0,
        code: expect.1,
    }
}

fn js(v: Value) -> Option<Vec<u8>> {
    Some(v.to_string().into_bytes())
}

fn bytes(b: &[u8]) -> Option<Vec<u8>> {
    Some(b.to_vec())
}

// Bad REST input of every kind is answered with the status and error shape of API.md, and
// the server keeps serving afterwards.
#[test]
fn rest_bad_input() {
    let s = Server::start(FAST);
    let alice = s.signup("alice@example.com", "Alice");
    let bob = s.signup("bob@example.com", "Bob");
    let wid = s.workspace(&alice, "acme", &[&bob]);
    let cid = s.channel(&alice, &wid, "general", "public");
    let other = s.channel(&alice, &wid, "other", "public");
    s.join(&bob, &cid);
    let root = str_of(&s.post(&alice, &cid, json!({"text": "root"}))["id"]);
    let reply = str_of(&s.post(&alice, &cid, json!({"text": "r", "thread_id": root}))["id"]);
    let elsewhere = str_of(&s.post(&alice, &other, json!({"text": "x"}))["id"]);
    let made_up_channel = {
        let c: ChannelId = cid.parse().unwrap();
        ChannelId(c.0 + (1000 << 16)).to_string()
    };
    let msgs = format!("/api/v1/channels/{cid}/messages");
    let root_path = format!("{msgs}/{root}");
    let a = || Auth::As(&alice);
    let (bad, invalid) = ((400, "invalid_json"), (400, "invalid_request"));
    let tampered = format!("Bearer {}x", alice.token);
    let not_found = (404, "not_found");
    let signup = || "/api/v1/auth/signup".to_owned();
    let big_text = "a".repeat(1024 * 1024 + 1);
    // One case per line: what it is, the request, and the error it must get.
    #[rustfmt::skip]
    let cases = vec![
        case("malformed JSON", "POST", signup(), Auth::None, bytes(b"{\"email\":"), bad),
        case("array body", "POST", signup(), Auth::None, bytes(b"[\"a\",\"b\",\"c\"]"), bad),
        case("string body", "POST", signup(), Auth::None, bytes(b"\"hi\""), bad),
        case("wrong field type", "POST", signup(), Auth::None,
            js(json!({"email": 5, "password": PASSWORD, "name": "n"})), bad),
        case("missing field", "POST", signup(), Auth::None,
            js(json!({"email": "z@example.com", "password": PASSWORD})), bad),
        case("short password", "POST", signup(), Auth::None,
            js(json!({"email": "z@example.com", "password": "x", "name": "Z"})), invalid),
        case("bad email", "POST", signup(), Auth::None,
            js(json!({"email": "not-an-email", "password": PASSWORD, "name": "Z"})), invalid),
        case("taken email", "POST", signup(), Auth::None,
            js(json!({"email": "ALICE@example.com", "password": PASSWORD, "name": "A"})),
            (409, "conflict")),
        case("wrong password", "POST", "/api/v1/auth/login".into(), Auth::None,
            js(json!({"email": "alice@example.com", "password": "wrong password"})),
            (401, "unauthorized")),
        case("unknown email", "POST", "/api/v1/auth/login".into(), Auth::None,
            js(json!({"email": "nobody@example.com", "password": "wrong password"})),
            (401, "unauthorized")),
        case("no token", "GET", "/api/v1/me".into(), Auth::None, None, (401, "unauthorized")),
        case("bad token", "GET", "/api/v1/me".into(), Auth::Header("Bearer not.a.jwt"), None,
            (401, "unauthorized")),
        case("tampered token", "GET", "/api/v1/me".into(), Auth::Header(&tampered), None,
            (401, "unauthorized")),
        case("basic auth", "GET", "/api/v1/me".into(), Auth::Header("Basic YTpi"), None,
            (401, "unauthorized")),
        case("unknown route", "GET", "/api/v1/nope".into(), a(), None, not_found),
        case("unknown root", "GET", "/api/v2/me".into(), a(), None, not_found),
        case("trailing slash", "GET", "/api/v1/me/".into(), a(), None, not_found),
        case("wrong method", "PUT", "/api/v1/me".into(), a(), None, (405, "method_not_allowed")),
        case("wrong method on list", "DELETE", "/api/v1/workspaces".into(), a(), None,
            (405, "method_not_allowed")),
        case("invalid UTF-8", "POST", "/api/v1/workspaces".into(), a(),
            bytes(b"{\"name\":\"\xff\xfe\"}"), bad),
        case("empty body", "POST", "/api/v1/workspaces".into(), a(), bytes(b""), bad),
        case("no body", "POST", "/api/v1/workspaces".into(), a(), None, bad),
        case("empty name", "POST", "/api/v1/workspaces".into(), a(), js(json!({"name": " "})),
            invalid),
        case("name of wrong type", "POST", "/api/v1/workspaces".into(), a(),
            js(json!({"name": ["x"]})), bad),
        case("DM kind for a channel", "POST", format!("/api/v1/workspaces/{wid}/channels"), a(),
            js(json!({"name": "x", "kind": "dm"})), invalid),
        case("channel name with spaces", "POST", format!("/api/v1/workspaces/{wid}/channels"),
            a(), js(json!({"name": "a b", "kind": "public"})), invalid),
        case("user_ids not an array", "POST", format!("/api/v1/workspaces/{wid}/dms"), a(),
            js(json!({"user_ids": bob.id})), bad),
        case("unparseable user ID", "POST", format!("/api/v1/workspaces/{wid}/dms"), a(),
            js(json!({"user_ids": ["nobody"]})), not_found),
        case("user_id of wrong type", "POST", format!("/api/v1/channels/{cid}/members"), a(),
            js(json!({"user_id": 7})), bad),
        case("empty text", "POST", msgs.clone(), a(), js(json!({"text": ""})), invalid),
        case("blank text", "POST", msgs.clone(), a(), js(json!({"text": " \n "})), invalid),
        case("text of wrong type", "POST", msgs.clone(), a(), js(json!({"text": 5})), bad),
        case("null text", "POST", msgs.clone(), a(), js(json!({"text": null})), bad),
        case("text over 1 MiB", "POST", msgs.clone(), a(), js(json!({"text": big_text})),
            (413, "too_large")),
        case("body over the limit", "POST", msgs.clone(), a(),
            Some(vec![b' '; BODY_LIMIT + 1024]), (413, "too_large")),
        case("empty client_msg_id", "POST", msgs.clone(), a(),
            js(json!({"text": "x", "client_msg_id": ""})), invalid),
        case("long client_msg_id", "POST", msgs.clone(), a(),
            js(json!({"text": "x", "client_msg_id": "k".repeat(129)})), invalid),
        case("unparseable thread_id", "POST", msgs.clone(), a(),
            js(json!({"text": "x", "thread_id": "M"})), not_found),
        case("thread_id of another channel", "POST", msgs.clone(), a(),
            js(json!({"text": "x", "thread_id": elsewhere})), not_found),
        case("reply to a reply", "POST", msgs.clone(), a(),
            js(json!({"text": "x", "thread_id": reply})), invalid),
        case("limit 0", "GET", format!("{msgs}?limit=0"), a(), None, invalid),
        case("limit 201", "GET", format!("{msgs}?limit=201"), a(), None, invalid),
        case("limit abc", "GET", format!("{msgs}?limit=abc"), a(), None, invalid),
        case("limit -1", "GET", format!("{msgs}?limit=-1"), a(), None, invalid),
        case("bad cursor", "GET", format!("{msgs}?before=garbage"), a(), None, invalid),
        case("numeric cursor", "GET", format!("{msgs}?before=12"), a(), None, invalid),
        case("bad replies cursor", "GET", format!("{root_path}/replies?after=zz"), a(), None,
            invalid),
        case("unparseable channel", "GET", "/api/v1/channels/nope/messages".into(), a(), None,
            not_found),
        case("unknown channel", "GET", format!("/api/v1/channels/{made_up_channel}/messages"),
            a(), None, not_found),
        case("unknown workspace", "GET", "/api/v1/workspaces/Wzzzzzz/members".into(), a(),
            None, not_found),
        case("unknown message", "PATCH", format!("{msgs}/M1-1"), a(),
            js(json!({"text": "x"})), not_found),
        case("message of another channel", "GET", format!("{msgs}/{elsewhere}"), a(), None,
            not_found),
        case("unparseable message", "GET", format!("{msgs}/Mnope"), a(), None, not_found),
        case("unparseable member", "DELETE", format!("/api/v1/channels/{cid}/members/x"), a(),
            None, not_found),
        case("emoji with a space", "PUT", format!("{root_path}/reactions/a%20b"), a(), None,
            invalid),
        case("emoji too long", "PUT", format!("{root_path}/reactions/{}", "e".repeat(65)), a(),
            None, invalid),
        case("emoji not UTF-8", "PUT", format!("{root_path}/reactions/%FF"), a(), None, invalid),
        case("edit by another user", "PATCH", root_path.clone(), Auth::As(&bob),
            js(json!({"text": "x"})), (403, "forbidden")),
    ];
    assert!(cases.len() >= 50, "{} cases", cases.len());
    for c in &cases {
        let header;
        let headers: Vec<(&str, &str)> = match &c.auth {
            Auth::None => vec![],
            Auth::As(u) => {
                header = format!("Bearer {}", u.token);
                vec![("Authorization", header.as_str())]
            }
            Auth::Header(h) => vec![("Authorization", h)],
        };
        let r = s.raw(c.method, &c.path, &headers, c.body.as_deref());
        assert_eq!(r.status, c.status, "{}: {}", c.what, r.text);
        err(&r, c.status, c.code);
        if c.status == 405 {
            assert!(r.allow.is_some(), "{}: no Allow header", c.what);
        }
    }

    // Wrong password and unknown email are indistinguishable.
    let login = |email: &str| {
        s.call(
            "POST",
            "/api/v1/auth/login",
            None,
            Some(json!({"email": email, "password": "wrong password"})),
        )
        .text
    };
    assert_eq!(login("alice@example.com"), login("nobody@example.com"));

    // Unknown fields are ignored, for forward compatibility.
    ok(
        s.send(
            "POST",
            "/api/v1/workspaces",
            &alice,
            json!({"name": "x", "future": [1]}),
        ),
        201,
    );
    s.assert_serving(&alice);
    s.post(&alice, &cid, json!({"text": "still here"}));
}

/// The calls a stranger tries, with `{w}`, `{c}`, `{m}`, `{u}` standing for the target's
/// IDs and `{me}`, `{wme}`, `{cme}` for the stranger's own.
#[rustfmt::skip]
const STRANGER_CALLS: &[(&str, &str, Option<&str>)] = &[
    ("GET", "/api/v1/workspaces/{w}/members", None),
    ("POST", "/api/v1/workspaces/{w}/members", Some(r#"{"email":"mallory@example.com"}"#)),
    ("GET", "/api/v1/workspaces/{w}/channels", None),
    ("POST", "/api/v1/workspaces/{w}/channels", Some(r#"{"name":"evil","kind":"public"}"#)),
    ("POST", "/api/v1/workspaces/{w}/dms", Some(r#"{"user_ids":["{u}"]}"#)),
    ("POST", "/api/v1/workspaces/{wme}/dms", Some(r#"{"user_ids":["{u}"]}"#)),
    ("GET", "/api/v1/channels/{c}", None),
    ("POST", "/api/v1/channels/{c}/join", None),
    ("POST", "/api/v1/channels/{c}/members", Some(r#"{"user_id":"{me}"}"#)),
    ("POST", "/api/v1/channels/{cme}/members", Some(r#"{"user_id":"{u}"}"#)),
    ("DELETE", "/api/v1/channels/{c}/members/{u}", None),
    ("DELETE", "/api/v1/channels/{c}/members/{me}", None),
    ("POST", "/api/v1/channels/{c}/messages", Some(r#"{"text":"hi"}"#)),
    ("POST", "/api/v1/channels/{cme}/messages", Some(r#"{"text":"hi","thread_id":"{m}"}"#)),
    ("GET", "/api/v1/channels/{c}/messages", None),
    ("GET", "/api/v1/channels/{c}/messages/{m}", None),
    ("PATCH", "/api/v1/channels/{c}/messages/{m}", Some(r#"{"text":"x"}"#)),
    ("DELETE", "/api/v1/channels/{c}/messages/{m}", None),
    ("GET", "/api/v1/channels/{c}/messages/{m}/replies", None),
    ("GET", "/api/v1/channels/{c}/messages/{m}/history", None),
    ("PUT", "/api/v1/channels/{c}/messages/{m}/reactions/tada", None),
    ("DELETE", "/api/v1/channels/{c}/messages/{m}/reactions/tada", None),
    ("GET", "/api/v1/channels/{c}/notification-prefs", None),
    ("PUT", "/api/v1/channels/{c}/notification-prefs", Some(r#"{"level":"all","muted":true}"#)),
];

// A user of workspace B who tries every call with workspace A's IDs gets 404, with exactly
// the body that made-up IDs get, and nothing in A changes.
#[test]
fn rest_isolation() {
    let s = Server::start(FAST);
    let alice = s.signup("alice@example.com", "Alice");
    let bob = s.signup("bob@example.com", "Bob");
    let mallory = s.signup("mallory@example.com", "Mallory");
    let wa = s.workspace(&alice, "a", &[&bob]);
    let wb = s.workspace(&mallory, "b", &[]);
    let cb = s.channel(&mallory, &wb, "mine", "public");
    let public = s.channel(&alice, &wa, "general", "public");
    let private = s.channel(&alice, &wa, "secret", "private");
    let dm_path = format!("/api/v1/workspaces/{wa}/dms");
    let dm = str_of(
        &ok(
            s.send("POST", &dm_path, &alice, json!({"user_ids": [bob.id]})),
            201,
        )["channel"]["id"],
    );
    let mut targets = Vec::new();
    for c in [&public, &private, &dm] {
        let root = s.post(&alice, c, json!({"text": "a's secret"}));
        s.post(&alice, c, json!({"text": "reply", "thread_id": root["id"]}));
        targets.push((c.clone(), str_of(&root["id"])));
    }
    let before = |c: &str| {
        ok(
            s.get(&format!("/api/v1/channels/{c}/messages"), &alice),
            200,
        )
    };
    let snapshot: Vec<Value> = targets.iter().map(|(c, _)| before(c)).collect();

    // Made-up IDs of the same shapes: a channel in a real partition, a message in it.
    let made_up_w = WorkspaceId(wa.parse::<WorkspaceId>().unwrap().0 + 1000).to_string();
    let made_up_c = ChannelId(public.parse::<ChannelId>().unwrap().0 + (1000 << 16));
    let made_up_m = MessageId {
        channel: made_up_c,
        seq: 2,
    }
    .to_string();
    let made_up_u = UserId(1_000_000).to_string();
    let fill = |t: &str, w: &str, c: &str, m: &str, u: &str| {
        t.replace("{wme}", &wb)
            .replace("{cme}", &cb)
            .replace("{me}", &mallory.id)
            .replace("{w}", w)
            .replace("{c}", c)
            .replace("{m}", m)
            .replace("{u}", u)
    };
    let mut compared = 0;
    for (c, m) in &targets {
        for (method, path, body) in STRANGER_CALLS {
            let run = |w: &str, c: &str, m: &str, u: &str| {
                let body = body.map(|b| fill(b, w, c, m, u).into_bytes());
                let auth = format!("Bearer {}", mallory.token);
                s.raw(
                    method,
                    &fill(path, w, c, m, u),
                    &[("Authorization", &auth)],
                    body.as_deref(),
                )
            };
            let real = run(&wa, c, m, &alice.id);
            let fake = run(&made_up_w, &made_up_c.to_string(), &made_up_m, &made_up_u);
            err(&real, 404, "not_found");
            assert_eq!(real.text, fake.text, "{method} {path} reveals something");
            compared += 1;
        }
    }
    assert_eq!(compared, STRANGER_CALLS.len() * 3);

    // Nothing in A changed, and A's lists do not show B's user.
    let after: Vec<Value> = targets.iter().map(|(c, _)| before(c)).collect();
    assert_eq!(after, snapshot);
    let members = ok(
        s.get(&format!("/api/v1/workspaces/{wa}/members"), &alice),
        200,
    );
    assert_eq!(members["members"].as_array().unwrap().len(), 2);
    let channels = ok(
        s.get(&format!("/api/v1/workspaces/{wa}/channels"), &alice),
        200,
    );
    assert_eq!(channels["channels"].as_array().unwrap().len(), 3);
    let me = ok(s.get("/api/v1/me", &mallory), 200);
    assert_eq!(ids(&me["workspaces"]), [wb]);
}

/// Every call of API.md, as (method, path) in the OpenAPI document's spelling.
#[rustfmt::skip]
const API_MD_CALLS: &[(&str, &str)] = &[
    ("post", "/api/v1/auth/signup"),
    ("post", "/api/v1/auth/login"),
    ("get", "/api/v1/me"),
    ("get", "/api/v1/cluster"),
    ("post", "/api/v1/workspaces"),
    ("post", "/api/v1/workspaces/{wid}/members"),
    ("get", "/api/v1/workspaces/{wid}/members"),
    ("get", "/api/v1/workspaces/{wid}/channels"),
    ("post", "/api/v1/workspaces/{wid}/channels"),
    ("post", "/api/v1/workspaces/{wid}/dms"),
    ("post", "/api/v1/channels/{cid}/join"),
    ("post", "/api/v1/channels/{cid}/members"),
    ("delete", "/api/v1/channels/{cid}/members/{uid}"),
    ("post", "/api/v1/channels/{cid}/messages"),
    ("get", "/api/v1/channels/{cid}/messages"),
    ("get", "/api/v1/channels/{cid}/messages/{mid}/replies"),
    ("patch", "/api/v1/channels/{cid}/messages/{mid}"),
    ("delete", "/api/v1/channels/{cid}/messages/{mid}"),
    ("get", "/api/v1/channels/{cid}/messages/{mid}/history"),
    ("put", "/api/v1/channels/{cid}/messages/{mid}/reactions/{emoji}"),
    ("delete", "/api/v1/channels/{cid}/messages/{mid}/reactions/{emoji}"),
    ("put", "/api/v1/me/presence"),
    ("get", "/api/v1/workspaces/{wid}/presence"),
    ("post", "/api/v1/channels/{cid}/read"),
    ("get", "/api/v1/workspaces/{wid}/unreads"),
    ("post", "/api/v1/files/upload"),
    ("get", "/api/v1/files/{fid}"),
    ("get", "/api/v1/files/{fid}/content"),
    ("post", "/api/v1/files/{fid}/url"),
    ("delete", "/api/v1/files/{fid}"),
    ("get", "/api/v1/files/{fid}/preview/{kind}"),
    ("get", "/api/v1/me/notification-prefs"),
    ("patch", "/api/v1/me/notification-prefs"),
    ("put", "/api/v1/channels/{cid}/notification-prefs"),
    ("post", "/api/v1/me/push-devices"),
    ("delete", "/api/v1/me/push-devices/{did}"),
    ("post", "/api/v1/e2ee/keys/upload"),
    ("post", "/api/v1/e2ee/keys/query"),
    ("post", "/api/v1/e2ee/keys/claim"),
    ("delete", "/api/v1/e2ee/devices/{device_id}"),
    ("put", "/api/v1/e2ee/to-device/{txn_id}"),
    ("get", "/api/v1/e2ee/to-device"),
];

/// A request body for an operation, from its schema's required fields.
fn sample_body(op: &Value, n: usize, carol: &User, bob: &User) -> Option<Vec<u8>> {
    let schema = &op["requestBody"]["content"]["application/json"]["schema"];
    let required = schema["required"].as_array()?;
    let mut body = serde_json::Map::new();
    for field in required {
        let name = field.as_str().expect("field name");
        let value = match name {
            "email" => json!(carol.email),
            "password" => json!(PASSWORD),
            "name" => json!(format!("n{n}")),
            "text" => json!("hello"),
            "user_ids" => json!([bob.id]),
            "user_id" => json!(bob.id),
            "mode" => json!("auto"),
            "seq" => json!(1),
            "app_id" => json!("io.chorus.test"),
            "pushkey" => json!(format!("key{n}")),
            "platform" => json!("fcm"),
            "devices" => json!({ bob.id.clone(): ["d1"] }),
            "messages" => json!({ bob.id.clone(): {"d1": {"n": n}} }),
            "key" => json!("not the key"),
            "nodes" => json!({"1": "127.0.0.1:1"}),
            other => panic!("no sample for required field {other}"),
        };
        body.insert(name.to_owned(), value);
    }
    Some(Value::Object(body).to_string().into_bytes())
}

// /api/v1/openapi.json is an OpenAPI 3 document that lists every call of API.md, and every
// operation it lists answers on the real server (never 404, 405 or 5xx).
#[test]
fn rest_openapi_routes_answer() {
    let s = Server::start(FAST);
    let doc = s.raw("GET", "/api/v1/openapi.json", &[], None);
    let doc = ok(doc, 200);
    assert!(str_of(&doc["openapi"]).starts_with("3."));
    assert!(doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer");
    let paths = doc["paths"].as_object().expect("paths");
    for (method, path) in API_MD_CALLS {
        assert!(
            paths.get(*path).and_then(|p| p.get(*method)).is_some(),
            "{method} {path} missing"
        );
    }

    let alice = s.signup("alice@example.com", "Alice");
    let bob = s.signup("bob@example.com", "Bob");
    let carol = s.signup("carol@example.com", "Carol");
    let wid = s.workspace(&alice, "acme", &[&bob]);
    let cid = s.channel(&alice, &wid, "general", "public");
    let mut operations = 0;
    for (n, (path, item)) in paths.iter().enumerate() {
        for (method, op) in item.as_object().expect("path item") {
            // Each call gets a fresh message, and bob back in the channel, so that one
            // call's deletion cannot turn another's target into a 404.
            let members = format!("/api/v1/channels/{cid}/members");
            ok(
                s.send("POST", &members, &alice, json!({"user_id": bob.id})),
                201,
            );
            let mid = str_of(&s.post(&alice, &cid, json!({"text": "target"}))["id"]);
            let fid = upload_file(&s, &alice, &wid);
            let did = if path.contains("{did}") {
                let body = json!({"app_id": "io.chorus.test", "pushkey": format!("d{n}"), "platform": "apns"});
                str_of(
                    &ok(s.send("POST", "/api/v1/me/push-devices", &alice, body), 201)["device"]
                        ["id"],
                )
            } else {
                String::new()
            };
            // An end-to-end encryption device of alice's, registered by signing in on it.
            let device_id = format!("dev{n}");
            if path.contains("{device_id}") {
                let body = json!({"email": "alice@example.com", "password": PASSWORD, "device_id": device_id});
                ok(s.call("POST", "/api/v1/auth/login", None, Some(body)), 200);
            }
            let url = path
                .replace("{device_id}", &device_id)
                .replace("{txn_id}", &format!("txn{n}"))
                .replace("{did}", &did)
                .replace("{fid}", &fid)
                .replace("{kind}", "code")
                .replace("{wid}", &wid)
                .replace("{cid}", &cid)
                .replace("{mid}", &mid)
                .replace("{uid}", &bob.id)
                .replace("{emoji}", "tada");
            for p in op["parameters"].as_array().expect("parameters") {
                if p["in"] == "path" {
                    assert!(path.contains(&format!("{{{}}}", str_of(&p["name"]))));
                }
            }
            let public = op["security"] == json!([]);
            let body = sample_body(op, n, &carol, &bob);
            let method = method.to_uppercase();
            // What the document says needs a token does: without one, 401.
            if !public {
                let r = s.raw(&method, &url, &[], body.as_deref());
                err(&r, 401, "unauthorized");
            }
            let auth = format!("Bearer {}", alice.token);
            let headers: Vec<(&str, &str)> = if public {
                vec![]
            } else {
                vec![("Authorization", &auth)]
            };
            let r = s.raw(&method, &url, &headers, body.as_deref());
            assert!(
                r.status != 404 && r.status != 405 && r.status < 500,
                "{method} {path} answered {}: {}",
                r.status,
                r.text
            );
            assert!(str_of(&op["summary"]).len() > 3);
            operations += 1;
        }
    }
    assert!(operations >= API_MD_CALLS.len());
}

// A burst of calls over the configured per-user rate is refused with 429, the error shape
// of API.md and a Retry-After header, and the server keeps serving.
#[test]
fn rest_rate_limit() {
    let s = Server::start("rate_per_s = 1.0\nrate_burst = 5.0\n");
    let alice = s.signup("alice@example.com", "Alice");
    let started = Instant::now();
    let answers: Vec<Resp> = (0..30).map(|_| s.get("/api/v1/me", &alice)).collect();
    let elapsed_s = started.elapsed().as_secs_f64();
    let allowed = answers.iter().filter(|r| r.status == 200).count();
    let limited: Vec<&Resp> = answers.iter().filter(|r| r.status == 429).collect();
    assert_eq!(allowed + limited.len(), answers.len());
    // Each of the two shards has its own bucket of 5, refilled at 1 per second.
    let most = 2.0 * (5.0 + elapsed_s.ceil());
    assert!(
        (allowed as f64) <= most,
        "{allowed} allowed in {elapsed_s}s"
    );
    assert!(!limited.is_empty());
    for r in limited {
        err(r, 429, "rate_limited");
        let after: u64 = r
            .retry_after
            .as_deref()
            .expect("Retry-After")
            .parse()
            .expect("seconds");
        assert!((1..=5).contains(&after), "{after}");
    }
    let h = s.raw("GET", "/healthz", &[], None);
    assert_eq!(h.status, 200);
}
