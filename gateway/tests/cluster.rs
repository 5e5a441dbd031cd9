//! Three `chorus serve` processes as one cluster (`API.md` §15) on loopback: the directory
//! and the channels are written through any node (one that does not lead what a call
//! writes to forwards it to the one that does; while none leads, 503 `unavailable` with
//! `Retry-After`, never a false 201), every node serves the same history, the leader of the
//! channel's partition SIGKILLed leaves the others taking writes, and it comes back on its
//! data and catches up.

mod common;

use common::{ClusterConfig, Resp, Server, User, AUTH_UNLIMITED, PASSWORD};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// How long a write may look for a node that takes it.
const WRITE_WAIT: Duration = Duration::from_secs(20);

/// Sends a call to the nodes in turn until one takes it (anything but 503, or 401/404
/// from a node whose directory has not yet learnt what another node just committed);
/// every 503 must carry `Retry-After`. Returns the node's index and its answer.
fn anywhere(nodes: &[Option<Server>], what: &str, call: impl Fn(&Server) -> Resp) -> (usize, Resp) {
    let deadline = Instant::now() + WRITE_WAIT;
    loop {
        for (i, s) in nodes.iter().enumerate() {
            let Some(s) = s else { continue };
            let r = call(s);
            match r.status {
                503 => {
                    r.assert_error(503, "unavailable");
                    assert!(
                        r.retry_after.is_some(),
                        "503 without Retry-After: {}",
                        r.text
                    );
                }
                401 | 404 => {}
                _ => return (i, r),
            }
        }
        assert!(
            Instant::now() < deadline,
            "no node took {what} within {WRITE_WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn post(s: &Server, token: &str, cid: &str, text: &str) -> Resp {
    let body = json!({"text": text, "client_msg_id": text});
    s.call(
        "POST",
        &format!("/api/v1/channels/{cid}/messages"),
        Some(token),
        Some(body),
    )
}

/// The channel's message texts on one node, oldest first (empty while it does not know
/// the channel yet).
fn texts(s: &Server, token: &str, cid: &str) -> Vec<String> {
    let path = format!("/api/v1/channels/{cid}/messages?limit=200");
    let r = s.call("GET", &path, Some(token), None);
    if r.status != 200 {
        return Vec::new();
    }
    let mut out: Vec<String> = r.body["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["text"].as_str().unwrap_or_default().to_owned())
        .collect();
    out.reverse();
    out
}

fn wait_for_texts(s: &Server, token: &str, cid: &str, want: &[String], who: &str) {
    let deadline = Instant::now() + WRITE_WAIT;
    loop {
        let got = texts(s, token, cid);
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "{who} has {got:?}, not {want:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A caller with only a token, for the harness's calls.
fn user(token: &str) -> User {
    User {
        id: String::new(),
        email: String::new(),
        token: token.to_owned(),
    }
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + WRITE_WAIT;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Signs Alice up and makes her workspace, through whichever nodes take them: her token
/// and the workspace's ID.
fn alice_and_workspace(nodes: &[Option<Server>]) -> (String, String) {
    let body = json!({"email": "alice@example.com", "password": PASSWORD, "name": "alice"});
    let (_, r) = anywhere(nodes, "a sign-up", |s| {
        s.call("POST", "/api/v1/auth/signup", None, Some(body.clone()))
    });
    assert_eq!(r.status, 201, "{}", r.text);
    let token = str_of(&r.body["token"]);
    let (_, r) = anywhere(nodes, "the workspace", |s| {
        s.call(
            "POST",
            "/api/v1/workspaces",
            Some(&token),
            Some(json!({"name": "acme"})),
        )
    });
    assert_eq!(r.status, 201, "{}", r.text);
    let wid = str_of(&r.body["workspace"]["id"]);
    (token, wid)
}

/// Signs `name` up through whichever node takes it: the token.
fn sign_up(nodes: &[Option<Server>], name: &str) -> String {
    let signup =
        json!({"email": format!("{name}@example.com"), "password": PASSWORD, "name": name});
    let (_, r) = anywhere(nodes, "the sign-up", |s| {
        s.call("POST", "/api/v1/auth/signup", None, Some(signup.clone()))
    });
    assert_eq!(r.status, 201, "{}", r.text);
    str_of(&r.body["token"])
}

fn str_of(v: &Value) -> String {
    v.as_str().expect("a string").to_owned()
}

#[test]
fn three_processes_serve_one_cluster_and_survive_a_sigkill() {
    let config = ClusterConfig::three();
    let addrs = &config.addrs;
    let mut nodes: Vec<Option<Server>> = (1..=3)
        .map(|id| Some(Server::start(&config.node(id, AUTH_UNLIMITED))))
        .collect();

    let token = sign_up(&nodes, "alice");
    let (_, r) = anywhere(&nodes, "the workspace", |s| {
        s.call(
            "POST",
            "/api/v1/workspaces",
            Some(&token),
            Some(json!({"name": "acme"})),
        )
    });
    assert_eq!(r.status, 201, "{}", r.text);
    let wid = str_of(&r.body["workspace"]["id"]);
    let (_, r) = anywhere(&nodes, "the channel", |s| {
        let body = json!({"name": "general", "kind": "public"});
        s.call(
            "POST",
            &format!("/api/v1/workspaces/{wid}/channels"),
            Some(&token),
            Some(body),
        )
    });
    assert_eq!(r.status, 201, "{}", r.text);
    let cid = str_of(&r.body["channel"]["id"]);

    let mut want = Vec::new();
    for n in 0..10 {
        let text = format!("m{n:02}");
        let (_, r) = anywhere(&nodes, &text, |s| post(s, &token, &cid, &text));
        assert_eq!(r.status, 201, "{}", r.text);
        want.push(text);
    }
    // The same post sent to every node: each answers it, the two that do not lead the
    // channel's partition by forwarding it to the one that does, and it is in the channel
    // once, the same message everywhere.
    let forwarded_before: f64 = nodes
        .iter()
        .flatten()
        .map(|s| s.metric("chorus_forwarded_total"))
        .sum();
    let answers: Vec<Resp> = nodes
        .iter()
        .flatten()
        .map(|s| post(s, &token, &cid, "probe"))
        .collect();
    for r in &answers {
        assert!(r.status == 200 || r.status == 201, "{answers:?}");
        assert_eq!(r.body["message"]["id"], answers[0].body["message"]["id"]);
    }
    let forwarded: f64 = nodes
        .iter()
        .flatten()
        .map(|s| s.metric("chorus_forwarded_total"))
        .sum::<f64>()
        - forwarded_before;
    assert!(forwarded >= 2.0, "{forwarded} calls forwarded");
    want.push("probe".into());
    for (i, s) in nodes.iter().enumerate() {
        wait_for_texts(
            s.as_ref().unwrap(),
            &token,
            &cid,
            &want,
            &format!("node {}", i + 1),
        );
    }

    // Every node shows the cluster: itself, the three nodes up, and each partition's
    // leader among its three replicas.
    for (i, s) in nodes.iter().enumerate() {
        let v = s
            .as_ref()
            .unwrap()
            .ok("GET", "/api/v1/cluster", &user(&token), None, 200);
        assert_eq!(v["node_id"], i as u64 + 1, "{v}");
        let nodes_v = v["nodes"].as_array().unwrap();
        assert_eq!(nodes_v.len(), 3, "{v}");
        for (k, n) in nodes_v.iter().enumerate() {
            assert_eq!(n["id"], k as u64 + 1);
            assert_eq!(n["addr"], addrs[k].to_string());
        }
        // Each shard copies what it knows onto the board every 250 ms: a node under load
        // may show its peers, and its groups' voters, a moment after the writes above.
        let mut v = v;
        wait_until(&format!("node {} to see every node up", i + 1), || {
            v = s
                .as_ref()
                .unwrap()
                .ok("GET", "/api/v1/cluster", &user(&token), None, 200);
            let up = v["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .all(|n| n["up"] == true);
            let placed = v["partitions"]
                .as_array()
                .unwrap()
                .iter()
                .all(|p| p["replicas"] != json!([]));
            up && placed
        });
        for p in v["partitions"].as_array().unwrap() {
            assert_eq!(p["replicas"], json!([1, 2, 3]), "{v}");
            assert_eq!(p["learners"], json!([]), "{v}");
        }
    }

    // The channel names its partition, and the cluster that partition's leader.
    let channel = nodes[0].as_ref().unwrap().ok(
        "GET",
        &format!("/api/v1/channels/{cid}"),
        &user(&token),
        None,
        200,
    );
    let partition = channel["channel"]["partition"].clone();
    // A node starved of CPU past an election timeout (200 ms) asks for votes and shows its
    // groups without a leader until the leader's next heartbeat reaches it.
    let mut leader = None;
    wait_until(
        &format!("node 1 to name partition {partition}'s leader"),
        || {
            let v =
                nodes[0]
                    .as_ref()
                    .unwrap()
                    .ok("GET", "/api/v1/cluster", &user(&token), None, 200);
            leader = v["partitions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["id"] == partition)
                .and_then(|p| p["leader"].as_u64());
            leader.is_some()
        },
    );
    let leader = leader.unwrap() as usize - 1;

    // Over the WebSocket of a node that does not lead the partition: a send, an edit, a
    // reaction and a delete, each passed to the leader and acknowledged as if decided
    // here; a command the leader refuses comes back as its error.
    let follower = (leader + 1) % 3;
    let (mut ws, _) = nodes[follower].as_ref().unwrap().connect(&user(&token));
    ws.send(
        json!({"type": "message:send", "ref": "s", "channel_id": cid,
        "text": "over ws", "client_msg_id": "over ws"}),
    );
    let ack = ws.recv_type("ack");
    assert_eq!(
        (&ack["ref"], &ack["message"]["text"]),
        (&json!("s"), &json!("over ws")),
        "{ack}"
    );
    let mid = str_of(&ack["message"]["id"]);
    let seq = ack["message"]["seq"].as_u64().expect("a seq");
    // A read marker moved over the follower's WebSocket is moved by the leader.
    ws.send(json!({"type": "read:mark", "ref": "m", "channel_id": cid, "seq": seq}));
    let ack = ws.recv_type("ack");
    assert_eq!(
        (&ack["ref"], &ack["read"]["read_seq"]),
        (&json!("m"), &json!(seq)),
        "{ack}"
    );
    let unreads = nodes[leader].as_ref().unwrap().ok(
        "GET",
        &format!("/api/v1/workspaces/{wid}/unreads"),
        &user(&token),
        None,
        200,
    );
    let marked = unreads["unreads"].as_array().and_then(|u| {
        u.iter()
            .find(|r| r["channel_id"] == json!(cid))
            .map(|r| r["read_seq"].clone())
    });
    assert_eq!(marked, Some(json!(seq)), "{unreads}");
    ws.send(
        json!({"type": "message:edit", "ref": "e", "channel_id": cid,
        "message_id": mid, "text": "over ws, edited"}),
    );
    let ack = ws.recv_type("ack");
    assert_eq!(ack["message"]["text"], "over ws, edited", "{ack}");
    ws.send(
        json!({"type": "reaction:add", "ref": "r", "channel_id": cid,
        "message_id": mid, "emoji": "+1"}),
    );
    let ack = ws.recv_type("ack");
    assert_eq!(
        (&ack["ref"], &ack["message"]),
        (&json!("r"), &Value::Null),
        "{ack}"
    );
    let m = nodes[leader].as_ref().unwrap().ok(
        "GET",
        &format!("/api/v1/channels/{cid}/messages/{mid}"),
        &user(&token),
        None,
        200,
    );
    assert_eq!(
        m["message"]["reactions"]["+1"].as_array().map(Vec::len),
        Some(1),
        "{m}"
    );
    ws.send(
        json!({"type": "message:edit", "ref": "bad", "channel_id": cid,
        "message_id": mid, "text": ""}),
    );
    let refused = ws.recv_type("error");
    assert_eq!(
        (&refused["ref"], &refused["code"]),
        (&json!("bad"), &json!("invalid_request")),
        "{refused}"
    );
    ws.send(json!({"type": "message:delete", "ref": "d", "channel_id": cid, "message_id": mid}));
    let ack = ws.recv_type("ack");
    assert_eq!(ack["ref"], "d", "{ack}");
    drop(ws);
    // A deleted message stays in the history, with no text.
    want.push(String::new());

    // A channel made through one node takes a post through the next at once, and the
    // third serves it: no node answers 404 for what another just made (the directory
    // barrier), nor misses a post acknowledged elsewhere (the read barrier).
    for i in 0..3 {
        let (made, next, third) = (
            nodes[i].as_ref().unwrap(),
            nodes[(i + 1) % 3].as_ref().unwrap(),
            nodes[(i + 2) % 3].as_ref().unwrap(),
        );
        let r = made.call(
            "POST",
            &format!("/api/v1/workspaces/{wid}/channels"),
            Some(&token),
            Some(json!({"name": format!("fresh{i}"), "kind": "public"})),
        );
        assert_eq!(r.status, 201, "{}", r.text);
        let fresh = str_of(&r.body["channel"]["id"]);
        let r = post(next, &token, &fresh, "first words");
        assert_eq!(
            r.status,
            201,
            "a post through node {}: {}",
            (i + 1) % 3 + 1,
            r.text
        );
        assert_eq!(texts(third, &token, &fresh), ["first words"]);
    }

    // SIGKILL the channel's leader: the other two take the writes.
    nodes[leader].as_mut().unwrap().kill();
    let mut killed = nodes[leader].take().unwrap();
    let killed_at = Instant::now();
    let (took, r) = anywhere(&nodes, "a post after the kill", |s| {
        post(s, &token, &cid, "after")
    });
    let failover = killed_at.elapsed();
    assert_ne!(took, leader);
    assert_eq!(r.status, 201, "{}", r.text);
    want.push("after".into());
    for (i, s) in nodes.iter().enumerate() {
        if let Some(s) = s {
            wait_for_texts(s, &token, &cid, &want, &format!("node {}", i + 1));
        }
    }

    // The others show it down within 5 s of the kill.
    for s in nodes.iter().flatten() {
        loop {
            let v = s.ok("GET", "/api/v1/cluster", &user(&token), None, 200);
            if v["nodes"][leader]["up"] == false {
                break;
            }
            assert!(
                killed_at.elapsed() < Duration::from_secs(5),
                "still up: {v}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    // It comes back on its data and catches up.
    killed.restart();
    wait_for_texts(&killed, &token, &cid, &want, "the restarted node");
    eprintln!("leader SIGKILL -> first acknowledged write elsewhere: {failover:?}");
}

/// A base port for `tools/cluster` under which every port it uses for four nodes of two
/// shards is free: HTTP and QUIC on base + 10i, the cluster on base + 10i + 1 and + 2.
fn free_base_port() -> u16 {
    // Below the kernel's ephemeral range: a port checked free there can be handed to
    // another test's outgoing connection before the tool's node binds it (CI once failed
    // so, with a base of 38800 where the range begins at 32768).
    let ephemeral: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(49_152);
    let bases = (ephemeral.saturating_sub(20_000 + 50) / 100).max(1);
    let start = (std::process::id() % u32::from(bases)) as u16;
    (0..bases)
        .map(|k| 20_000 + (start + k) % bases * 100)
        .find(|base| {
            (1..=4u16).all(|i| {
                let port = base + 10 * i;
                let tcp = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
                tcp(port)
                    && tcp(port + 1)
                    && tcp(port + 2)
                    && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
            })
        })
        .expect("a free port range")
}

// `tools/cluster up 3` starts three nodes that form one cluster (a sign-up is taken by the
// directory's leader, and the others learn the account); `add 4` joins a fourth, which
// learns the account too; `remove 1` moves every partition off node 1 and stops it; `down`
// stops the rest.
#[test]
fn the_cluster_tool_starts_grows_shrinks_and_stops_a_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let base = free_base_port();
    let tool = concat!(env!("CARGO_MANIFEST_DIR"), "/../tools/cluster");
    // A failed step must not leave the nodes running: they are stopped when the test
    // ends, however it ends (after `down`, this finds nothing to stop).
    struct Down<'a>(&'a str, &'a std::path::Path);
    impl Drop for Down<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new(self.0)
                .args(["down", "--dir", self.1.to_str().unwrap()])
                .output();
        }
    }
    let _down = Down(tool, dir.path());
    let run = |args: &[&str]| {
        let out = std::process::Command::new(tool)
            .args(args)
            .args(["--dir", dir.path().to_str().unwrap()])
            .env("CHORUS_BIN", env!("CARGO_BIN_EXE_chorus"))
            .output()
            .expect("run tools/cluster");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "tools/cluster {args:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    let up = run(&["up", "3", "--base-port", &base.to_string()]);
    let urls: Vec<String> = up
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("http://")))
        .map(str::to_owned)
        .collect();
    assert_eq!(urls.len(), 3, "{up}");
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(10))
        .build();
    let signup = json!({"email": "bob@example.com", "password": PASSWORD, "name": "bob"});
    let deadline = Instant::now() + WRITE_WAIT;
    let token = 'found: loop {
        for url in &urls {
            let r = agent
                .post(&format!("{url}/api/v1/auth/signup"))
                .set("Content-Type", "application/json")
                .send_string(&signup.to_string());
            match r {
                Ok(r) if r.status() == 201 => {
                    let v: Value = serde_json::from_str(&r.into_string().unwrap()).unwrap();
                    break 'found str_of(&v["token"]);
                }
                Err(ureq::Error::Status(503, _)) => {}
                Err(e) => panic!("sign-up at {url}: {e}"),
                Ok(r) => panic!("sign-up at {url}: {}", r.status()),
            }
        }
        assert!(Instant::now() < deadline, "no node took the sign-up");
        std::thread::sleep(Duration::from_millis(50));
    };
    // Every node knows the account (the token works everywhere).
    let knows_bob = |url: &str| {
        let deadline = Instant::now() + WRITE_WAIT;
        loop {
            let r = agent
                .get(&format!("{url}/api/v1/me"))
                .set("Authorization", &format!("Bearer {token}"))
                .call();
            if r.is_ok() {
                break;
            }
            assert!(Instant::now() < deadline, "{url} never knew bob: {r:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    for url in &urls {
        knows_bob(url);
    }
    let added = run(&["add", "4"]);
    assert!(added.contains("{\"ask\":1}"), "{added}");
    knows_bob(&format!("http://127.0.0.1:{}", base + 40));
    // Every partition is held by all four nodes: three voters and one learner, as the
    // node added sees them.
    let view_of = |url: &str| -> Value {
        let r = agent
            .get(&format!("{url}/api/v1/cluster"))
            .set("Authorization", &format!("Bearer {token}"))
            .call()
            .expect("GET /api/v1/cluster");
        serde_json::from_str(&r.into_string().unwrap()).unwrap()
    };
    let deadline = Instant::now() + WRITE_WAIT;
    loop {
        let v = view_of(&format!("http://127.0.0.1:{}", base + 40));
        let held_by_all = v["partitions"].as_array().unwrap().iter().all(|p| {
            let ids = |k: &str| p[k].as_array().unwrap().len();
            let mut all: Vec<u64> = ["replicas", "learners"]
                .iter()
                .flat_map(|k| {
                    p[*k]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|n| n.as_u64().unwrap())
                })
                .collect();
            all.sort_unstable();
            ids("replicas") == 3 && ids("learners") == 1 && all == [1, 2, 3, 4]
        });
        if held_by_all {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 4 never held every partition: {v}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    run(&["remove", "1"]);
    assert!(!dir.path().join("n1/pid").exists());
    // Its data went with it (a removed node refuses to start on its old data), so it can
    // be added again, from nothing.
    assert!(!dir.path().join("n1/data").exists());
    let again = run(&["add", "1"]);
    assert!(again.contains("{\"ask\":3}"), "{again}");
    knows_bob(&urls[0]);
    run(&["down"]);
    for i in 1..=4 {
        assert!(!dir.path().join(format!("n{i}/pid")).exists());
        let log = std::fs::read_to_string(dir.path().join(format!("n{i}/log"))).unwrap();
        assert!(log.contains("stopped"), "node {i} did not drain: {log}");
    }
}

// Typing is no channel event: a node tells its own subscribers and passes it to every
// other node, which tells theirs. Alice types through node 1; Bob, connected to nodes 2
// and 3, sees it on both.
#[test]
fn typing_reaches_subscribers_on_every_node() {
    let config = ClusterConfig::three();
    let settings = format!("{AUTH_UNLIMITED}typing_per_s = 1000.0\n");
    let nodes: Vec<Option<Server>> = (1..=3)
        .map(|id| Some(Server::start(&config.node(id, &settings))))
        .collect();
    let sign_up = |name: &str| {
        let body =
            json!({"email": format!("{name}@example.com"), "password": PASSWORD, "name": name});
        let (_, r) = anywhere(&nodes, "a sign-up", |s| {
            s.call("POST", "/api/v1/auth/signup", None, Some(body.clone()))
        });
        assert_eq!(r.status, 201, "{}", r.text);
        (str_of(&r.body["token"]), str_of(&r.body["user"]["id"]))
    };
    let (alice, alice_id) = sign_up("alice");
    let (bob, _) = sign_up("bob");
    let (_, r) = anywhere(&nodes, "the workspace", |s| {
        let body = json!({"name": "acme"});
        s.call("POST", "/api/v1/workspaces", Some(&alice), Some(body))
    });
    assert_eq!(r.status, 201, "{}", r.text);
    let wid = str_of(&r.body["workspace"]["id"]);
    let (_, r) = anywhere(&nodes, "bob in the workspace", |s| {
        let path = format!("/api/v1/workspaces/{wid}/members");
        s.call(
            "POST",
            &path,
            Some(&alice),
            Some(json!({"email": "bob@example.com"})),
        )
    });
    assert_eq!(r.status, 201, "{}", r.text);
    let (_, r) = anywhere(&nodes, "the channel", |s| {
        let body = json!({"name": "general", "kind": "public"});
        let path = format!("/api/v1/workspaces/{wid}/channels");
        s.call("POST", &path, Some(&alice), Some(body))
    });
    assert_eq!(r.status, 201, "{}", r.text);
    let cid = str_of(&r.body["channel"]["id"]);
    let (_, r) = anywhere(&nodes, "bob in the channel", |s| {
        s.call(
            "POST",
            &format!("/api/v1/channels/{cid}/join"),
            Some(&bob),
            None,
        )
    });
    assert_eq!(r.status, 200, "{}", r.text);
    // Every node knows Bob is in the channel before he connects.
    for s in nodes.iter().flatten() {
        wait_until("bob's membership everywhere", || {
            let r = s.call("GET", &format!("/api/v1/channels/{cid}"), Some(&bob), None);
            r.status == 200
        });
    }
    let node = |i: usize| nodes[i].as_ref().unwrap();
    let (mut typist, _) = node(0).connect(&user(&alice));
    let mut watchers: Vec<_> = [1, 2]
        .iter()
        .map(|&i| node(i).connect(&user(&bob)).0)
        .collect();
    for (i, w) in watchers.iter_mut().enumerate() {
        w.ping(&format!("p{i}"));
    }
    let typing = json!({"type": "typing:start", "channel_id": cid});
    for (i, w) in watchers.iter_mut().enumerate() {
        // A subscription takes a moment to reach the channel's replica: Alice types again
        // until Bob's connection on this node sees it.
        let deadline = Instant::now() + WRITE_WAIT;
        let seen = loop {
            typist.send(typing.clone());
            if let Some(v) = w.recv_type_within("typing", Duration::from_millis(300)) {
                break v;
            }
            assert!(
                Instant::now() < deadline,
                "bob on node {} never saw alice typing on node 1",
                i + 2
            );
        };
        assert_eq!(
            (&seen["channel_id"], &seen["user_id"]),
            (&json!(cid), &json!(alice_id)),
            "{seen}"
        );
    }
}

// A node of another shape (here 8 partitions where the cluster has 16) is of another
// cluster (the shape is part of the cluster's id): the call to add it answers 409 naming
// it, nothing is asked, and every node still shows the three nodes it had; started again
// with the cluster's shape, it is added, and every node, the new one too, applies the
// ask.
#[test]
fn a_node_of_another_shape_is_not_added() {
    let config = ClusterConfig::of(4);
    let founders = [1, 2, 3];
    let nodes: Vec<Option<Server>> = founders
        .iter()
        .map(|&id| {
            Some(Server::start(&config.node_in(
                id,
                &founders,
                AUTH_UNLIMITED,
            )))
        })
        .collect();
    let token = sign_up(&nodes, "ops");
    let all = [1, 2, 3, 4];
    let joining = |extra: &str| {
        let settings = format!("cluster_join = true\n{extra}{AUTH_UNLIMITED}");
        Server::start(&config.node_in(4, &all, &settings))
    };
    let fourth = joining("partitions = 8\n");
    let body = config.members_body(&all);
    let first = nodes[0].as_ref().unwrap();
    let r = first.call("PUT", "/api/v1/cluster/members", None, Some(body.clone()));
    assert_eq!(r.status, 409, "{}", r.text);
    let message = r.body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("node 4") && message.contains("could not be reached"),
        "{message}"
    );
    for s in nodes.iter().flatten() {
        let v = s.ok("GET", "/api/v1/cluster", &user(&token), None, 200);
        assert_eq!(v["nodes"].as_array().map(Vec::len), Some(3), "{v}");
        assert_eq!(v["members_ask"], Value::Null, "{v}");
    }
    drop(fourth);
    let fourth = joining("");
    let r = first.call("PUT", "/api/v1/cluster/members", None, Some(body));
    assert_eq!(r.status, 200, "{}", r.text);
    let ask = r.body["ask"].as_u64().expect("the ask's number");
    let mut all_nodes: Vec<&Server> = nodes.iter().flatten().collect();
    all_nodes.push(&fourth);
    wait_asked(&all_nodes, &token, ask, &all);
}

/// Waits until every node in `nodes` shows members ask `ask` applied, placing the cluster
/// on `ids`.
#[track_caller]
fn wait_asked(nodes: &[&Server], token: &str, ask: u64, ids: &[usize]) {
    let ids: Vec<u64> = ids.iter().map(|&i| i as u64).collect();
    let deadline = Instant::now() + WRITE_WAIT;
    for (i, s) in nodes.iter().enumerate() {
        loop {
            let r = s.call("GET", "/api/v1/cluster", Some(token), None);
            let shown: Vec<u64> = r.body["nodes"]
                .as_array()
                .map(|n| n.iter().filter_map(|n| n["id"].as_u64()).collect())
                .unwrap_or_default();
            if r.status == 200 && r.body["members_ask"] == ask && shown == ids {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the {}th node never applied ask {ask} over {ids:?}: {}",
                i + 1,
                r.text
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Four nodes of `config`'s cluster, started as founders, and the token of an operator
/// account signed up through them.
fn four_nodes(config: &ClusterConfig) -> (Vec<Option<Server>>, String) {
    let all = [1, 2, 3, 4];
    let nodes: Vec<Option<Server>> = all
        .iter()
        .map(|&id| Some(Server::start(&config.node_in(id, &all, AUTH_UNLIMITED))))
        .collect();
    let token = sign_up(&nodes, "ops");
    (nodes, token)
}

// Two operators ask for different members at once, through different nodes: the asks
// are committed in one order, every node ends on the later one, and a node restarted
// afterwards (replaying the older ask too) stays on it.
#[test]
fn members_asked_at_once_are_agreed() {
    let config = ClusterConfig::of(4);
    let (mut nodes, token) = four_nodes(&config);
    // Node 4 out, through node 1; all four, through node 3.
    let asks = [(0, vec![1, 2, 3]), (2, vec![1, 2, 3, 4])];
    let start = std::sync::Barrier::new(asks.len());
    let answers: Vec<(u64, Vec<usize>)> = std::thread::scope(|scope| {
        let running: Vec<_> = asks
            .iter()
            .map(|(via, ids)| {
                let (server, body) = (nodes[*via].as_ref().unwrap(), config.members_body(ids));
                let start = &start;
                scope.spawn(move || {
                    start.wait();
                    let r = server.call("PUT", "/api/v1/cluster/members", None, Some(body));
                    assert_eq!(r.status, 200, "{}", r.text);
                    let ask = r.body["ask"].as_u64().expect("the ask's number");
                    (ask, ids.clone())
                })
            })
            .collect();
        running.into_iter().map(|t| t.join().unwrap()).collect()
    });
    assert_ne!(answers[0].0, answers[1].0, "{answers:?}");
    let (last, ids) = answers.iter().max().unwrap().clone();
    // Nodes 1–3 stay members either way (node 4 may be left out before it hears the last).
    fn members(nodes: &[Option<Server>]) -> Vec<&Server> {
        nodes[..3].iter().flatten().collect()
    }
    wait_asked(&members(&nodes), &token, last, &ids);
    let second = nodes[1].as_mut().unwrap();
    second.kill();
    second.restart();
    wait_asked(&members(&nodes), &token, last, &ids);
}

// A node down while it was removed (its groups walked off it without it, so its own
// directory never shows the ask) hears of its removal from its peers when it comes back:
// it keeps the ask and stops, where it used to go on serving what it held; started again,
// it refuses at once.
#[test]
fn a_node_removed_while_down_stops_when_it_comes_back() {
    let config = ClusterConfig::of(4);
    let (mut nodes, token) = four_nodes(&config);
    let status = nodes[3].as_mut().unwrap().terminate();
    assert!(status.success(), "node 4 exited {status}");
    let first = nodes[0].as_ref().unwrap();
    let body = config.members_body(&[1, 2, 3]);
    let r = first.call("PUT", "/api/v1/cluster/members", None, Some(body));
    assert_eq!(r.status, 200, "{}", r.text);
    let ask = r.body["ask"].as_u64().expect("the ask's number");
    let members: Vec<&Server> = nodes[..3].iter().flatten().collect();
    wait_asked(&members, &token, ask, &[1, 2, 3]);
    // Every group, the directory's too, has walked off node 4, as node 1 sees them.
    wait_until("node 4 to hold no group", || {
        let v = first.ok("GET", "/api/v1/cluster", &user(&token), None, 200);
        let mut groups = v["partitions"].as_array().cloned().unwrap_or_default();
        groups.push(v["directory"].clone());
        let holds_4 = |g: &Value, role: &str| {
            g[role]
                .as_array()
                .is_some_and(|ids| ids.iter().any(|n| n.as_u64() == Some(4)))
        };
        !groups
            .iter()
            .any(|g| holds_4(g, "replicas") || holds_4(g, "learners"))
    });
    let fourth = nodes[3].as_mut().unwrap();
    fourth.restart();
    let status = fourth
        .wait_exit(Duration::from_secs(30))
        .expect("node 4, removed while down, still runs 30 s after it came back");
    assert_eq!(status.code(), Some(1), "{}", fourth.log());
    assert!(
        fourth.log().contains(&format!("members ask {ask}")),
        "{}",
        fourth.log()
    );
    let refused = fourth
        .start_again()
        .expect_err("node 4 started again after it learnt of its removal");
    assert!(
        refused.contains("was removed from the cluster"),
        "{refused}"
    );
}

// Without --cluster the server is a cluster of one: node 1, with no cluster address,
// leading every partition.
#[test]
fn a_single_node_shows_itself_as_the_whole_cluster() {
    let s = Server::start(AUTH_UNLIMITED);
    let alice = s.signup("alice");
    let v = s.ok("GET", "/api/v1/cluster", &alice, None, 200);
    assert_eq!(v["node_id"], 1);
    assert_eq!(v["nodes"], json!([{"id": 1, "addr": null, "up": true}]));
    let parts = v["partitions"].as_array().unwrap();
    assert!(!parts.is_empty());
    for (i, p) in parts.iter().enumerate() {
        let want = json!({"id": i, "leader": 1, "replicas": [1], "learners": []});
        assert_eq!(*p, want);
    }
    s.call("GET", "/api/v1/cluster", None, None)
        .assert_error(401, "unauthorized");
}

// A sign-up passed to the directory's leader counts against the address's sign-up limit
// once, on the node the client called: with a burst of two per address, two sign-ups
// through each of the three nodes (six from one address, most of them forwarded) are all
// taken, and a third through any node is refused there.
#[test]
fn a_forwarded_sign_up_counts_once_against_the_address_limit() {
    let config = ClusterConfig::three();
    let limits = "signup_per_ip_burst = 2.0\nsignup_per_ip_per_hour = 1.0\n\
                  login_failures_per_ip_burst = 1000000.0\n\
                  login_failures_per_account_burst = 1000000.0\n\
                  login_failures_per_account_ip_burst = 1000000.0\n";
    let nodes: Vec<Option<Server>> = (1..=3)
        .map(|id| Some(Server::start(&config.node(id, limits))))
        .collect();
    // Every sign-up attempt counts, a 503 too: wait until every node reads the directory
    // (a login of nobody is 401, not 503) before signing up.
    let nobody = json!({"email": "nobody@example.com", "password": PASSWORD});
    for node in nodes.iter().map(|n| n.as_ref().unwrap()) {
        let deadline = Instant::now() + WRITE_WAIT;
        while node
            .call("POST", "/api/v1/auth/login", None, Some(nobody.clone()))
            .status
            != 401
        {
            assert!(Instant::now() < deadline, "the directory never answered");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let mut n = 0;
    for (i, node) in nodes.iter().enumerate() {
        let node = node.as_ref().unwrap();
        for _ in 0..2 {
            n += 1;
            let body =
                json!({"email": format!("u{n}@example.com"), "password": PASSWORD, "name": "u"});
            let r = node.call("POST", "/api/v1/auth/signup", None, Some(body));
            assert_eq!(
                r.status,
                201,
                "sign-up {n} through node {}: {}",
                i + 1,
                r.text
            );
        }
    }
    let body = json!({"email": "one-more@example.com", "password": PASSWORD, "name": "u"});
    let r = nodes[0]
        .as_ref()
        .unwrap()
        .call("POST", "/api/v1/auth/signup", None, Some(body));
    assert_eq!(r.status, 429, "{}", r.text);
}

// Failed logins count on every node: three wrong passwords for one account through node
// 1 spend its budget of three (per account and address) everywhere, so the right password
// through node 2 or 3 is refused 429 too. Without the nodes telling each other, each node
// had a budget of its own, three times the guesses.
#[test]
fn failed_logins_through_one_node_count_on_every_node() {
    let config = ClusterConfig::three();
    let limits = "signup_per_ip_burst = 1000000.0
                  login_failures_per_ip_burst = 1000000.0
                  login_failures_per_account_burst = 1000000.0
                  login_failures_per_account_ip_burst = 3.0
                  login_failures_per_account_ip_per_hour = 1.0
";
    let nodes: Vec<Option<Server>> = (1..=3)
        .map(|id| Some(Server::start(&config.node(id, limits))))
        .collect();
    let body = json!({"email": "alice@example.com", "password": PASSWORD, "name": "alice"});
    let (_, r) = anywhere(&nodes, "the sign-up", |s| {
        s.call("POST", "/api/v1/auth/signup", None, Some(body.clone()))
    });
    assert_eq!(r.status, 201, "{}", r.text);
    let node = |i: usize| nodes[i].as_ref().unwrap();
    let login = |i: usize, password: &str| {
        let body = json!({"email": "alice@example.com", "password": password});
        node(i).call("POST", "/api/v1/auth/login", None, Some(body))
    };
    // Every node knows her (a right password is not a failure, and gives its token back).
    for i in 0..3 {
        wait_until("alice known everywhere", || {
            login(i, PASSWORD).status == 200
        });
    }
    for n in 0..3 {
        let r = login(0, "wrong horse");
        assert_eq!(r.status, 401, "wrong password {n}: {}", r.text);
    }
    assert_eq!(login(0, PASSWORD).status, 429, "node 1's own budget");
    for i in [1, 2] {
        wait_until(
            &format!("node {} counting node 1's failures", i + 1),
            || {
                let r = login(i, PASSWORD);
                assert!(matches!(r.status, 200 | 429), "{}", r.text);
                r.status == 429
            },
        );
    }
}

// A channel made through one node is found at once through every node, the ones that do
// not lead its partition included: its history answers 200, never 404, though that node's
// directory may not have applied the channel yet when the read comes (the read runs again
// after the directory barrier; without that, a run of 40 channels found a 404 one time in
// two).
#[test]
fn a_new_channel_is_read_at_once_through_every_node() {
    let config = ClusterConfig::three();
    let nodes: Vec<Option<Server>> = (1..=3)
        .map(|id| Some(Server::start(&config.node(id, AUTH_UNLIMITED))))
        .collect();
    let body = json!({"email": "alice@example.com", "password": PASSWORD, "name": "alice"});
    let (_, r) = anywhere(&nodes, "a sign-up", |s| {
        s.call("POST", "/api/v1/auth/signup", None, Some(body.clone()))
    });
    assert_eq!(r.status, 201, "{}", r.text);
    let token = str_of(&r.body["token"]);
    let (_, r) = anywhere(&nodes, "the workspace", |s| {
        let body = json!({"name": "acme"});
        s.call("POST", "/api/v1/workspaces", Some(&token), Some(body))
    });
    assert_eq!(r.status, 201, "{}", r.text);
    let wid = str_of(&r.body["workspace"]["id"]);
    let path = format!("/api/v1/workspaces/{wid}/channels");
    let mut reads = 0;
    for i in 0..40 {
        let via = &nodes[i % 3].as_ref().unwrap();
        let body = json!({"name": format!("c{i}"), "kind": "public"});
        let r = via.call("POST", &path, Some(&token), Some(body));
        if r.status == 503 {
            continue;
        }
        assert_eq!(r.status, 201, "{}", r.text);
        let cid = str_of(&r.body["channel"]["id"]);
        for s in nodes.iter().flatten() {
            let r = s.call(
                "GET",
                &format!("/api/v1/channels/{cid}/messages"),
                Some(&token),
                None,
            );
            if r.status == 503 {
                r.assert_error(503, "unavailable");
                continue;
            }
            assert_eq!(
                r.status, 200,
                "channel c{i} read through {}: {}",
                s.addr, r.text
            );
            reads += 1;
        }
    }
    assert!(reads >= 90, "only {reads} of 120 reads were answered");
}

// A login through one node right after the sign-up through another succeeds: the node
// that does not know the account yet looks again once its directory has everything
// committed before the login (API.md §15: reads on any node see what was acknowledged).
#[test]
fn a_login_right_after_a_sign_up_elsewhere_succeeds() {
    let config = ClusterConfig::three();
    let nodes: Vec<Option<Server>> = (1..=3)
        .map(|id| Some(Server::start(&config.node(id, AUTH_UNLIMITED))))
        .collect();
    // Without the second look, two runs in three found one of the 80 logins refused.
    for i in 0..80 {
        let email = format!("u{i}@example.com");
        let body = json!({"email": email, "password": PASSWORD, "name": format!("u{i}")});
        let (took, r) = anywhere(&nodes, "a sign-up", |s| {
            s.call("POST", "/api/v1/auth/signup", None, Some(body.clone()))
        });
        assert_eq!(r.status, 201, "{}", r.text);
        let other = nodes[(took + 1 + i % 2) % 3].as_ref().unwrap();
        let login = json!({"email": email, "password": PASSWORD});
        let r = other.call("POST", "/api/v1/auth/login", None, Some(login));
        assert!(
            r.status == 200 || r.status == 503,
            "login {i} through another node: {} {}",
            r.status,
            r.text
        );
    }
}

// Lists read right after a write through another node show it: a workspace just made,
// its members, the unread state a read marker just moved, a post's history (API.md §15:
// a read on any node sees what was acknowledged before it).
#[test]
fn lists_right_after_a_write_elsewhere_show_it() {
    let config = ClusterConfig::three();
    let nodes: Vec<Option<Server>> = (1..=3)
        .map(|id| Some(Server::start(&config.node(id, AUTH_UNLIMITED))))
        .collect();
    let node = |i: usize| nodes[i % 3].as_ref().unwrap();
    let mut wrong = Vec::new();
    // Without the directory barrier before a list, each of three runs found workspace
    // lists (one to three of the 80) without the workspace just made.
    for i in 0..80 {
        let (a, b) = (node(i), node(i + 1));
        let body = json!({"email": format!("l{i}@example.com"), "password": PASSWORD, "name": "l"});
        let (_, r) = anywhere(&nodes, "a sign-up", |s| {
            s.call("POST", "/api/v1/auth/signup", None, Some(body.clone()))
        });
        assert_eq!(r.status, 201, "{}", r.text);
        let token = str_of(&r.body["token"]);
        let (_, r) = anywhere(&nodes[i % 3..=i % 3], "a workspace", |s| {
            s.call(
                "POST",
                "/api/v1/workspaces",
                Some(&token),
                Some(json!({"name": "w"})),
            )
        });
        assert_eq!(r.status, 201, "{}", r.text);
        let wid = str_of(&r.body["workspace"]["id"]);
        let r = b.call("GET", "/api/v1/workspaces", Some(&token), None);
        if !r.text.contains(&wid) {
            wrong.push(format!("{i}: workspaces {} {}", r.status, r.text));
        }
        let r = b.call("GET", "/api/v1/me", Some(&token), None);
        if !r.text.contains(&wid) {
            wrong.push(format!("{i}: me {} {}", r.status, r.text));
        }
        let r = b.call(
            "GET",
            &format!("/api/v1/workspaces/{wid}/members"),
            Some(&token),
            None,
        );
        if !r.text.contains(&format!("l{i}@example.com")) {
            wrong.push(format!("{i}: members {} {}", r.status, r.text));
        }
        let (_, r) = anywhere(&nodes, "a channel", |s| {
            let body = json!({"name": "c", "kind": "public"});
            s.call(
                "POST",
                &format!("/api/v1/workspaces/{wid}/channels"),
                Some(&token),
                Some(body),
            )
        });
        assert_eq!(r.status, 201, "{}", r.text);
        let cid = str_of(&r.body["channel"]["id"]);
        let (_, r) = anywhere(&nodes, "a post", |s| post(s, &token, &cid, "hello"));
        assert_eq!(r.status, 201, "{}", r.text);
        let seq = r.body["message"]["seq"].as_u64().expect("a seq");
        let r = a.call(
            "GET",
            &format!("/api/v1/channels/{cid}/messages"),
            Some(&token),
            None,
        );
        if !r.text.contains("hello") {
            wrong.push(format!("{i}: history {} {}", r.status, r.text));
        }
        let (_, r) = anywhere(&nodes, "a read marker", |s| {
            let body = json!({"seq": seq});
            s.call(
                "POST",
                &format!("/api/v1/channels/{cid}/read"),
                Some(&token),
                Some(body),
            )
        });
        assert_eq!(r.status, 200, "{}", r.text);
        let r = b.call(
            "GET",
            &format!("/api/v1/workspaces/{wid}/unreads"),
            Some(&token),
            None,
        );
        if !r.text.contains(&format!("\"read_seq\":{seq}")) {
            wrong.push(format!("{i}: unreads {} {}", r.status, r.text));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

// A channel made through one node is listed at once through the others, and takes a post
// at once through each (the 201 of its creation waits for its first members, which the
// partition's leader decides, wherever that is).
#[test]
fn a_new_channel_is_listed_and_takes_posts_at_once_through_every_node() {
    let config = ClusterConfig::three();
    let nodes: Vec<Option<Server>> = (1..=3)
        .map(|id| Some(Server::start(&config.node(id, AUTH_UNLIMITED))))
        .collect();
    let node = |i: usize| nodes[i % 3].as_ref().unwrap();
    let (token, wid) = alice_and_workspace(&nodes);
    let mut wrong = Vec::new();
    // Without the wait for the first members, one run in three found a channel missing
    // from a list made right after its creation.
    for i in 0..120 {
        let (_, r) = anywhere(&nodes[i % 3..=i % 3], "a channel", |s| {
            let body = json!({"name": format!("c{i}"), "kind": "public"});
            s.call(
                "POST",
                &format!("/api/v1/workspaces/{wid}/channels"),
                Some(&token),
                Some(body),
            )
        });
        assert_eq!(r.status, 201, "{}", r.text);
        let cid = str_of(&r.body["channel"]["id"]);
        for k in 1..3 {
            let s = node(i + k);
            let r = s.call(
                "GET",
                &format!("/api/v1/workspaces/{wid}/channels"),
                Some(&token),
                None,
            );
            if !r.text.contains(&cid) {
                wrong.push(format!(
                    "c{i} listed through {}: {} {}",
                    s.addr, r.status, r.text
                ));
            }
            let text = format!("c{i} through {k}");
            let r = post(s, &token, &cid, &text);
            if r.status != 201 {
                wrong.push(format!(
                    "c{i} post through {}: {} {}",
                    s.addr, r.status, r.text
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

// A client resumes on another node (API.md §15): connected to one node, it sees some
// posts; gone, it misses more; resuming on each other node from the last seq it saw, it
// gets exactly the posts it missed, in order, then `resumed`, then live posts. Before the
// read barrier on a follower's subscriptions, a node a few events behind answered the
// resume as if the user were in no channel (`resumed` named none) and then sent the
// channel from its first event: 4 runs of 13 failed so.
#[test]
fn a_stream_resumes_on_another_node_missing_nothing() {
    let config = ClusterConfig::three();
    let nodes: Vec<Option<Server>> = (1..=3)
        .map(|id| Some(Server::start(&config.node(id, AUTH_UNLIMITED))))
        .collect();
    let node = |i: usize| nodes[i % 3].as_ref().unwrap();
    let (token, wid) = alice_and_workspace(&nodes);
    let (_, r) = anywhere(&nodes, "the channel", |s| {
        let body = json!({"name": "general", "kind": "public"});
        s.call(
            "POST",
            &format!("/api/v1/workspaces/{wid}/channels"),
            Some(&token),
            Some(body),
        )
    });
    assert_eq!(r.status, 201, "{}", r.text);
    let cid = str_of(&r.body["channel"]["id"]);
    let mut n = 0;
    let post_next = |n: &mut usize| {
        let text = format!("m{n}");
        let (_, r) = anywhere(&nodes, &text, |s| post(s, &token, &cid, &text));
        assert_eq!(r.status, 201, "{}", r.text);
        *n += 1;
        (r.body["message"]["seq"].as_u64().expect("a seq"), text)
    };
    // The posts a stream shows of the channel, until `want` of them.
    let posts_seen = |ws: &mut common::Ws, want: usize| -> Vec<(u64, String)> {
        let mut seen = Vec::new();
        while seen.len() < want {
            let e = ws.recv_type("event");
            if e["channel_id"] == json!(cid) && e["event"]["type"] == "message:new" {
                let seq = e["seq"].as_u64().expect("a seq");
                seen.push((seq, str_of(&e["event"]["message"]["text"])));
            }
        }
        seen
    };
    let (mut ws, _) = node(0).connect(&user(&token));
    ws.ping("subscribed");
    // Live on the first node: posts until the stream shows one (its subscription takes a
    // moment to reach the channel's replica there).
    let mut last = loop {
        let (seq, text) = post_next(&mut n);
        if let Some(e) = ws.recv_type_within("event", Duration::from_millis(500)) {
            if e["event"]["message"]["text"] == json!(text) {
                break seq;
            }
        }
    };
    drop(ws);
    for i in 1..=2 {
        let missed: Vec<(u64, String)> = (0..5).map(|_| post_next(&mut n)).collect();
        let (mut ws, _) = node(i).connect(&user(&token));
        ws.send(json!({"type": "resume", "since": {cid.clone(): last}}));
        let got = posts_seen(&mut ws, missed.len());
        assert_eq!(got, missed, "resumed on node {}", i + 1);
        let resumed = ws.recv_type("resumed");
        assert_eq!(
            resumed["channels"][&cid],
            json!(missed.last().unwrap().0),
            "{resumed}"
        );
        // Live after it.
        let live = post_next(&mut n);
        assert_eq!(
            posts_seen(&mut ws, 1),
            vec![live.clone()],
            "live on node {}",
            i + 1
        );
        last = live.0;
    }
}

// QUIC sessions on nodes that may not lead the channel (`API.md` §15: every node serves
// the whole API, over each transport): messages sent over QUIC through a node that does
// not lead the channel's partition reach a QUIC session on the other such node, every one,
// in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_sessions_on_any_node_send_and_receive() {
    let (nodes, cid, followers) = tokio::task::spawn_blocking(|| {
        let config = ClusterConfig::three();
        let nodes: Vec<Server> = (1..=3)
            .map(|id| Server::start(&config.node(id, common::UNLIMITED)))
            .collect();
        let (alice, _, _, cid) = common::cluster_pair(&nodes[0]);
        // The two nodes that do not lead the channel's partition now.
        let channel = nodes[0].call(
            "GET",
            &format!("/api/v1/channels/{cid}"),
            Some(&alice.token),
            None,
        );
        let partition = channel.body["channel"]["partition"]
            .as_u64()
            .expect("partition");
        let view = nodes[0].call("GET", "/api/v1/cluster", Some(&alice.token), None);
        let leader = view.body["partitions"][partition as usize]["leader"].as_u64();
        let followers: Vec<usize> = (0..3).filter(|i| Some(*i as u64 + 1) != leader).collect();
        (nodes, cid, followers)
    })
    .await
    .unwrap();
    let open = |s: &Server, who: &'static str| {
        let client = chorus_client::Client::new(&s.base_url()).unwrap();
        let target = chorus_client::QuicTarget {
            addr: s.quic_addr.parse().expect("quic address"),
            server_name: "localhost".into(),
            pin_sha256: s.quic_pin(),
        };
        async move {
            let session = client
                .login(&format!("{who}@example.com"), PASSWORD)
                .await
                .unwrap();
            let options = chorus_client::ConnectOptions {
                transport: chorus_client::Transport::Quic(target),
                ..Default::default()
            };
            session.connect(options).await.unwrap()
        }
    };
    let alice = open(&nodes[followers[0]], "alice").await;
    let mut bob = open(&nodes[followers[1]], "bob").await;
    let handle = alice.handle();
    for i in 0..20 {
        let text = format!("q{i}");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match handle.send(&cid, &text, &text).await {
                Ok(m) => {
                    assert_eq!(m.text, text);
                    break;
                }
                Err(e) => {
                    assert!(Instant::now() < deadline, "{text}: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    let mut got = Vec::new();
    while got.len() < 20 {
        let next = tokio::time::timeout(Duration::from_secs(20), bob.next_event()).await;
        let event = next
            .expect("an event within 20 s")
            .expect("the stream goes on");
        if let Some(m) = event.message() {
            got.push(m.text);
        }
    }
    let want: Vec<String> = (0..20).map(|i| format!("q{i}")).collect();
    assert_eq!(got, want);
    assert_eq!(bob.stats().gaps_detected, 0);
    tokio::task::spawn_blocking(move || drop(nodes))
        .await
        .unwrap();
}
