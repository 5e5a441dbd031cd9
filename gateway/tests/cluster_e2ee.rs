//! To-device messages (`API.md` §14) across the nodes of a cluster (§15: every node serves
//! the whole API): a message sent through one node reaches the recipient device's
//! connection on another, live, and is read and acknowledged through any node (over the
//! WebSocket of a node that does not lead the directory, the acknowledgement is taken by
//! the one that does).

mod common;

use common::{cluster_signup, settled, str_of, ClusterConfig, Server, User, PASSWORD, UNLIMITED};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// How long anything here may take.
const WAIT: Duration = Duration::from_secs(20);

/// The device's unacknowledged messages through `s`.
fn queued(s: &Server, device: &User) -> Vec<Value> {
    let r = settled(|| s.call("GET", "/api/v1/e2ee/to-device", Some(&device.token), None));
    assert_eq!(r.status, 200, "{}", r.text);
    r.body["messages"].as_array().cloned().expect("messages")
}

#[test]
fn a_to_device_message_sent_through_one_node_reaches_a_device_on_another() {
    let config = ClusterConfig::three();
    let nodes = config.start_all(UNLIMITED);
    let alice = cluster_signup(&nodes[0], "alice", Some("phone"));
    let bob = cluster_signup(&nodes[1], "bob", Some("laptop"));
    let wid = common::cluster_workspace(&nodes[0], &alice);
    common::cluster_add_member(&nodes[0], &alice, &wid, &bob);
    // Bob's laptop is connected through node 3; Alice sends through node 1.
    let (mut laptop, _) = nodes[2].connect(&bob);
    laptop.ping("connected");
    for n in 1..=3 {
        let r = settled(|| {
            let path = format!("/api/v1/e2ee/to-device/t{n}");
            let body = json!({"messages": {bob.id.clone(): {"laptop": {"n": n}}}});
            nodes[0].call("PUT", &path, Some(&alice.token), Some(body))
        });
        assert_eq!(r.status, 200, "{}", r.text);
        let frame = laptop
            .recv_type_within("to_device", WAIT)
            .unwrap_or_else(|| panic!("message {n} never reached the laptop on node 3"));
        assert_eq!(frame["id"], n.to_string(), "{frame}");
        assert_eq!(frame["content"], json!({"n": n}), "{frame}");
        assert_eq!(frame["sender_device_id"], "phone", "{frame}");
    }
    // Read through node 2, then acknowledged one by one over a WebSocket of the laptop on
    // each node (two of them do not lead the directory): each is an `ack`.
    assert_eq!(queued(&nodes[1], &bob).len(), 3);
    drop(laptop);
    for (i, s) in nodes.iter().enumerate() {
        let (mut ws, _) = s.connect(&bob);
        let upto = (i + 1).to_string();
        ws.send(json!({"type": "to_device:ack", "upto_id": upto, "ref": "ack"}));
        let answer = loop {
            let frame = ws.recv();
            if frame["ref"] == "ack" {
                break frame;
            }
        };
        assert_eq!(answer["type"], "ack", "through node {}: {answer}", i + 1);
    }
    let deadline = Instant::now() + WAIT;
    while !queued(&nodes[0], &bob).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the acknowledgement never reached node 1"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

// A device removed through one node is gone on every node: its connection on another node
// is closed as removed, and once the removal is answered its token is refused through
// every node at once (each node finds a device live only while its directory is known
// fresh: `gateway/src/fresh.rs`).
#[test]
fn a_device_removed_through_one_node_is_cut_off_on_another() {
    let config = ClusterConfig::three();
    let nodes = config.start_all(UNLIMITED);
    let bob = cluster_signup(&nodes[0], "bob", Some("laptop"));
    let tablet = login(&nodes[1], &bob, "tablet");
    let (mut ws, _) = nodes[2].connect(&tablet);
    ws.ping("connected");
    // Every node has just found the tablet live.
    for s in &nodes {
        let r = settled(|| s.call("GET", "/api/v1/me", Some(&tablet.token), None));
        assert_eq!(r.status, 200, "{}", r.text);
    }
    let r = settled(|| {
        let path = "/api/v1/e2ee/devices/tablet";
        nodes[0].call("DELETE", path, Some(&bob.token), None)
    });
    assert_eq!(r.status, 204, "{}", r.text);
    for (i, s) in nodes.iter().enumerate() {
        let r = s.call("GET", "/api/v1/me", Some(&tablet.token), None);
        assert_eq!(
            r.status,
            401,
            "the tablet's token through node {}: {}",
            i + 1,
            r.text
        );
        let r = s.call("GET", "/api/v1/me", Some(&bob.token), None);
        assert_eq!(r.status, 200, "the laptop's token through node {}", i + 1);
    }
    let (code, reason, _) = ws.recv_close();
    assert_eq!((code, reason.as_str()), (4001, "device removed"));
}

// A node cut off from the others cannot know that a device was removed through them: it
// refuses the device's token with 503 (it cannot tell), never takes it, and once the cut
// heals refuses it with 401.
#[test]
fn a_node_cut_off_during_a_removal_never_takes_the_removed_device() {
    let config = ClusterConfig::three();
    let nodes = config.start_all(UNLIMITED);
    let bob = cluster_signup(&nodes[0], "bob", Some("laptop"));
    let tablet = login(&nodes[0], &bob, "tablet");
    let r = settled(|| nodes[2].call("GET", "/api/v1/me", Some(&tablet.token), None));
    assert_eq!(r.status, 200, "{}", r.text);
    // Node 3 is cut off (its fault file is read every 100 ms), then the tablet is removed
    // through node 1 (once the other two have a directory leader, if node 3 was it).
    std::fs::write(config.fault_file(3), "cut 1\ncut 2\n").expect("fault file");
    std::thread::sleep(Duration::from_millis(300));
    let r = settled(|| {
        let path = "/api/v1/e2ee/devices/tablet";
        nodes[0].call("DELETE", path, Some(&bob.token), None)
    });
    assert_eq!(r.status, 204, "{}", r.text);
    for _ in 0..3 {
        let r = nodes[2].call("GET", "/api/v1/me", Some(&tablet.token), None);
        assert_eq!(
            r.status, 503,
            "the removed tablet through the cut-off node: {}",
            r.text
        );
    }
    let r = nodes[1].call("GET", "/api/v1/me", Some(&tablet.token), None);
    assert_eq!(r.status, 401, "through node 2: {}", r.text);
    std::fs::write(config.fault_file(3), "").expect("fault file");
    let deadline = Instant::now() + WAIT;
    loop {
        let r = nodes[2].call("GET", "/api/v1/me", Some(&tablet.token), None);
        if r.status == 401 {
            break;
        }
        assert_eq!(
            r.status, 503,
            "the tablet through node 3 after the cut: {}",
            r.text
        );
        assert!(Instant::now() < deadline, "node 3 never caught up");
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = settled(|| nodes[2].call("GET", "/api/v1/me", Some(&bob.token), None));
    assert_eq!(r.status, 200, "the laptop through node 3: {}", r.text);
}

/// Logs `user` in through `s` on `device`.
fn login(s: &Server, user: &User, device: &str) -> User {
    let r = settled(|| {
        let body = json!({"email": user.email, "password": PASSWORD, "device_id": device});
        s.call("POST", "/api/v1/auth/login", None, Some(body))
    });
    assert_eq!(r.status, 200, "{}", r.text);
    User {
        token: str_of(&r.body["token"]),
        ..user.clone()
    }
}

// One-time keys claimed concurrently through all three nodes are each handed out once:
// a claim through a node that does not lead the directory is decided by the one that
// does, never from the node's own replica.
#[test]
fn one_time_keys_claimed_through_every_node_are_handed_out_once() {
    use base64::Engine as _;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes);
    let config = ClusterConfig::three();
    let nodes = config.start_all(UNLIMITED);
    let alice = cluster_signup(&nodes[0], "alice", Some("phone"));
    let wid = common::cluster_workspace(&nodes[0], &alice);
    let claimers: Vec<User> = (0..30)
        .map(|i| {
            let c = cluster_signup(&nodes[i % 3], &format!("claimer{i}"), Some("d"));
            common::cluster_add_member(&nodes[0], &alice, &wid, &c);
            c
        })
        .collect();
    let keys: serde_json::Map<String, Value> = (0u32..20)
        .map(|i| {
            let mut key = [0u8; 32];
            key[..4].copy_from_slice(&i.to_le_bytes());
            (format!("k{i:05}"), json!(b64(&key)))
        })
        .collect();
    let body = json!({"one_time_keys": keys, "fallback_key": {"fb": b64(&[77; 32])}});
    let r = settled(|| {
        nodes[1].call(
            "POST",
            "/api/v1/e2ee/keys/upload",
            Some(&alice.token),
            Some(body.clone()),
        )
    });
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["one_time_key_count"], 20);

    let want = json!({"devices": { alice.id.clone(): ["phone"] }});
    let answers: Vec<Value> = std::thread::scope(|scope| {
        let handles: Vec<_> = (claimers.iter().enumerate())
            .map(|(i, c)| {
                let (s, want, alice) = (&nodes[i % 3], want.clone(), &alice);
                scope.spawn(move || {
                    let r = settled(|| {
                        s.call(
                            "POST",
                            "/api/v1/e2ee/keys/claim",
                            Some(&c.token),
                            Some(want.clone()),
                        )
                    });
                    assert_eq!(
                        r.status,
                        200,
                        "claim through node {}: {}",
                        i % 3 + 1,
                        r.text
                    );
                    r.body["one_time_keys"][&alice.id]["phone"].clone()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let one_time: Vec<String> = (answers.iter())
        .filter(|k| k["fallback"] == false)
        .map(|k| str_of(&k["key_id"]))
        .collect();
    let distinct: std::collections::BTreeSet<&String> = one_time.iter().collect();
    assert_eq!(
        one_time.len(),
        20,
        "every one-time key handed out: {answers:?}"
    );
    assert_eq!(distinct.len(), 20, "none twice: {one_time:?}");
    assert_eq!(answers.iter().filter(|k| k["fallback"] == true).count(), 10);
}
