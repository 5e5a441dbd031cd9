//! Files (`API.md` §11) in a cluster of three `chorus serve` processes, whose file store is
//! one S3 bucket (`moto_server`, started here on loopback; skipped with a reason when moto
//! is not installed, except where `CHORUS_REQUIRE_PEERS` is set) or each node's own disk.
//! Every node serves the whole API (§15): an upload through a node that does not lead the
//! directory is recorded by the one that does, and every node serves every file's
//! content, previews and signed links.

mod common;

use common::moto::Moto;
use common::{
    cluster_signup, cluster_workspace, get_bytes, settled, str_of, ClusterConfig, Server, User,
};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// How long a call may look for a node that answers it.
const WAIT: Duration = Duration::from_secs(20);

#[test]
fn every_node_takes_uploads_and_serves_every_file_in_s3() {
    let Some((_moto, s3)) = Moto::with_bucket() else {
        return;
    };
    let config = ClusterConfig::three();
    let nodes: Vec<Server> = (1..=3)
        .map(|id| Server::start(&config.node(id, &s3)))
        .collect();
    every_node_takes_uploads_and_serves_every_file(&nodes);
}

// With each node's own disk: an upload is copied to a majority before its 201; the node
// that took and recorded it SIGKILLed at once, the others serve it; restarted with its
// file store emptied, it fetches the bytes from a peer.
#[test]
fn files_on_each_nodes_disk_outlive_the_node_that_took_them() {
    let config = ClusterConfig::three();
    let mut nodes: Vec<Server> = (1..=3)
        .map(|id| Server::start(&config.node(id, common::UNLIMITED)))
        .collect();
    let (alice, wid) = every_node_takes_uploads_and_serves_every_file(&nodes);
    // Two pieces of a copy. Through the node that leads the directory (its own record,
    // not passed on, so no other node fetched the bytes for it): only the copies it made
    // before its 201 keep them.
    let mut took = None;
    for (i, s) in nodes.iter().enumerate() {
        // Other bytes for each node's try: the same bytes would be one stored file.
        let mut bytes = format!("// through node {}\n", i + 1).into_bytes();
        bytes.extend_from_slice(&b"fn late() {}\n".repeat(500_000));
        let before = s.metric("chorus_forwarded_total");
        let r = settled(|| {
            let name = format!("late{i}.rs");
            common::upload_bytes_raw(s, &alice, &wid, &name, "text/plain", &bytes)
        });
        assert_eq!(r.status, 201, "{}", r.text);
        if s.metric("chorus_forwarded_total") == before {
            took = Some((i, str_of(&r.body["file"]["id"]), bytes));
            break;
        }
    }
    let (leader, fid, bytes) = took.expect("the directory's leader records its own uploads");
    nodes[leader].kill();
    let path = format!("/api/v1/files/{fid}/content");
    for (i, s) in nodes.iter().enumerate().filter(|(i, _)| *i != leader) {
        let (status, got) = bytes_settled(s, &alice, &path);
        assert_eq!(status, 200, "node {}", i + 1);
        assert!(got == bytes, "node {} serves other bytes", i + 1);
    }
    let files = nodes[leader].dir().join("data").join("files");
    let mut removed = 0;
    for fanout in std::fs::read_dir(&files).expect("the file store") {
        let fanout = fanout.expect("an entry").path();
        if fanout.is_dir() && fanout.file_name().is_some_and(|n| n != "tmp") {
            for f in std::fs::read_dir(&fanout).expect("a fan-out directory") {
                std::fs::remove_file(f.expect("a file").path()).expect("removed");
                removed += 1;
            }
        }
    }
    assert!(removed >= 1, "node {} held no file's bytes", leader + 1);
    nodes[leader].restart();
    let (status, got) = bytes_settled(&nodes[leader], &alice, &path);
    assert_eq!(status, 200, "the restarted node");
    assert!(got == bytes, "the restarted node serves other bytes");
}

/// `GET path` on `s` as `user`, again while it answers 503 or 404 (a node still electing
/// leaders, or catching up after a restart): status and bytes.
fn bytes_settled(s: &Server, user: &User, path: &str) -> (u16, Vec<u8>) {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, got) = get_bytes(s, Some(user), path, None);
        if !matches!(status, 503 | 404) || Instant::now() > deadline {
            return (status, got);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Signs up two users on a cluster, makes a workspace and a channel, and checks that an
/// upload through each node is taken and that every node serves every file: content,
/// preview, signed links. Returns the uploader and the workspace.
fn every_node_takes_uploads_and_serves_every_file(nodes: &[Server]) -> (User, String) {
    let (alice, bob) = (
        cluster_signup(&nodes[0], "alice", None),
        cluster_signup(&nodes[0], "bob", None),
    );
    let wid = cluster_workspace(&nodes[0], &alice);
    common::cluster_add_member(&nodes[0], &alice, &wid, &bob);
    let r = settled(|| {
        let body = json!({"name": "general", "kind": "public"});
        let path = format!("/api/v1/workspaces/{wid}/channels");
        nodes[0].call("POST", &path, Some(&alice.token), Some(body))
    });
    assert_eq!(r.status, 201, "{}", r.text);
    let cid = str_of(&r.body["channel"]["id"]);
    let r = settled(|| {
        let path = format!("/api/v1/channels/{cid}/join");
        nodes[0].call("POST", &path, Some(&bob.token), None)
    });
    assert_eq!(r.status, 200, "{}", r.text);

    // An upload through each node: at least two of them do not lead the directory, and
    // pass the record to the one that does.
    let forwarded_before: f64 = nodes
        .iter()
        .map(|s| s.metric("chorus_forwarded_total"))
        .sum();
    let mut files = Vec::new();
    for (i, s) in nodes.iter().enumerate() {
        let bytes = format!(
            "fn node_{i}() {{\n    println!(\"uploaded through node {}\");\n}}\n",
            i + 1
        );
        let r = settled(|| {
            common::upload_bytes_raw(
                s,
                &alice,
                &wid,
                &format!("n{i}.rs"),
                "text/plain",
                bytes.as_bytes(),
            )
        });
        assert_eq!(r.status, 201, "upload through node {}: {}", i + 1, r.text);
        let fid = str_of(&r.body["file"]["id"]);
        // At once through the other nodes: each sees what was acknowledged before.
        for k in 1..3 {
            let other = &nodes[(i + k) % 3];
            let r = other.call(
                "GET",
                &format!("/api/v1/files/{fid}"),
                Some(&alice.token),
                None,
            );
            assert_eq!(
                r.status,
                200,
                "{fid} through node {}: {}",
                (i + k) % 3 + 1,
                r.text
            );
        }
        files.push((fid, bytes.into_bytes()));
    }
    let forwarded: f64 = nodes
        .iter()
        .map(|s| s.metric("chorus_forwarded_total"))
        .sum::<f64>()
        - forwarded_before;
    assert!(
        forwarded >= 2.0,
        "{forwarded} uploads recorded by another node"
    );
    // Shared in a message, so that Bob may read them too.
    let ids: Vec<&str> = files.iter().map(|(id, _)| id.as_str()).collect();
    let r = settled(|| {
        let body = json!({"text": "", "file_ids": ids, "client_msg_id": "files"});
        let path = format!("/api/v1/channels/{cid}/messages");
        nodes[0].call("POST", &path, Some(&alice.token), Some(body))
    });
    assert_eq!(r.status, 201, "{}", r.text);

    for (fid, bytes) in &files {
        for (i, s) in nodes.iter().enumerate() {
            // Content through every node, for the uploader and for a reader.
            for who in [&alice, &bob] {
                // Read at once: a node sees what was acknowledged before the read.
                let path = format!("/api/v1/files/{fid}/content");
                let (status, got) = get_bytes(s, Some(who), &path, None);
                assert_eq!(status, 200, "{fid} through node {}", i + 1);
                assert_eq!(&got, bytes, "{fid} through node {}", i + 1);
            }
            // The code preview, made once, served by every node.
            let path = format!("/api/v1/files/{fid}/preview/code");
            let deadline = Instant::now() + Duration::from_secs(60);
            let (status, html) = loop {
                let (status, html) = get_bytes(s, Some(&bob), &path, None);
                if !matches!(status, 202 | 404) || Instant::now() > deadline {
                    break (status, html);
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            assert_eq!(status, 200, "the preview of {fid} through node {}", i + 1);
            let html = String::from_utf8_lossy(&html);
            assert!(html.contains("uploaded through node"), "{html}");
        }
        // A signed link one node made works on every node.
        for (i, maker) in nodes.iter().enumerate() {
            let link: Value =
                maker.ok("POST", &format!("/api/v1/files/{fid}/url"), &bob, None, 200);
            let url = str_of(&link["url"]);
            for (k, s) in nodes.iter().enumerate() {
                let (status, got) = get_bytes(s, None, &url, None);
                assert_eq!(
                    (status, &got),
                    (200, bytes),
                    "a link from node {} on node {}",
                    i + 1,
                    k + 1
                );
            }
        }
    }
    (alice, wid)
}

/// Whether node `s`'s file store holds the bytes whose SHA-256 is `sha`.
fn holds(s: &Server, sha: &[u8]) -> bool {
    let hex: String = sha.iter().map(|b| format!("{b:02x}")).collect();
    let (fanout, name) = hex.split_at(2);
    let path = s.dir().join("data").join("files").join(fanout).join(name);
    path.exists()
}

fn wait_for(what: &str, ok: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

// A file deleted through one node leaves every node's disk (each node's sweep removes
// bytes no live file has), while a live file's bytes stay everywhere, sweep after sweep;
// bytes nobody recorded (an upload whose node died before its record) go too.
#[test]
fn a_deleted_files_bytes_leave_every_nodes_disk() {
    let config = ClusterConfig::three();
    let settings = format!(
        "{}file_sweep_interval_s = 1\nfile_sweep_min_age_s = 2\n",
        common::UNLIMITED
    );
    let nodes: Vec<Server> = (1..=3)
        .map(|id| Server::start(&config.node(id, &settings)))
        .collect();
    let alice = cluster_signup(&nodes[0], "alice", None);
    let wid = cluster_workspace(&nodes[0], &alice);
    let mut files = Vec::new();
    for name in ["gone.bin", "kept.bin"] {
        let bytes = format!("the bytes of {name}\n").repeat(1_000).into_bytes();
        let r = settled(|| {
            let ctype = "application/octet-stream";
            common::upload_bytes_raw(&nodes[0], &alice, &wid, name, ctype, &bytes)
        });
        assert_eq!(r.status, 201, "{}", r.text);
        let sha = ring::digest::digest(&ring::digest::SHA256, &bytes);
        files.push((str_of(&r.body["file"]["id"]), sha.as_ref().to_vec()));
    }
    for (i, s) in nodes.iter().enumerate() {
        for (_, sha) in &files {
            wait_for(&format!("node {}'s copy", i + 1), || holds(s, sha));
        }
    }
    // An orphan on node 3: bytes under a name no file has.
    let orphan = [7u8; 32];
    let orphan_path = {
        let hex: String = orphan.iter().map(|b| format!("{b:02x}")).collect();
        let dir = nodes[2].dir().join("data").join("files").join(&hex[..2]);
        dir.join(&hex[2..])
    };
    std::fs::write(&orphan_path, b"nobody's").expect("the orphan");
    // Past the minimum age and a few sweeps: the live files stay, the orphan goes.
    wait_for("the orphan swept", || !orphan_path.exists());
    std::thread::sleep(Duration::from_secs(2));
    for (i, s) in nodes.iter().enumerate() {
        for (fid, sha) in &files {
            assert!(holds(s, sha), "node {} lost live file {fid}'s bytes", i + 1);
        }
    }
    let (gone, kept) = (&files[0], &files[1]);
    let r = settled(|| {
        let path = format!("/api/v1/files/{}", gone.0);
        nodes[1].call("DELETE", &path, Some(&alice.token), None)
    });
    assert_eq!(r.status, 204, "{}", r.text);
    for (i, s) in nodes.iter().enumerate() {
        wait_for(
            &format!("the deleted bytes gone from node {}", i + 1),
            || !holds(s, &gone.1),
        );
        assert!(
            holds(s, &kept.1),
            "node {} lost the kept file's bytes",
            i + 1
        );
    }
}

/// Uploads a small file through each live node until one records it itself (no record
/// passed on, by the metric): that node leads the directory. Returns its index.
fn directory_leader(nodes: &[Server], live: &[usize], alice: &User, wid: &str) -> usize {
    let deadline = Instant::now() + WAIT;
    loop {
        for &i in live {
            let s = &nodes[i];
            let before = s.metric("chorus_forwarded_total");
            let bytes = format!("probe {i} {:?}", Instant::now()).into_bytes();
            let r = settled(|| {
                let ctype = "application/octet-stream";
                common::upload_bytes_raw(s, alice, wid, "probe.bin", ctype, &bytes)
            });
            assert_eq!(r.status, 201, "{}", r.text);
            if s.metric("chorus_forwarded_total") == before {
                return i;
            }
        }
        assert!(Instant::now() < deadline, "no node leads the directory");
    }
}

/// Waits until `s` serves the `code` preview of `fid`; its bytes.
fn preview_on(s: &Server, user: &User, fid: &str, who: &str) -> Vec<u8> {
    let path = format!("/api/v1/files/{fid}/preview/code");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (status, got) = get_bytes(s, Some(user), &path, None);
        if status == 200 {
            return got;
        }
        assert!(
            matches!(status, 202 | 404 | 503) && Instant::now() < deadline,
            "the preview through {who}: {status} {}",
            String::from_utf8_lossy(&got)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

// On the nodes' disks, a preview the directory's leader queued and died before making is
// made by the next leader, and its bytes are on a majority before its record: the node
// that made it SIGKILLed in turn, the others still serve it.
#[test]
fn a_preview_outlives_the_leader_that_queued_it_and_the_one_that_made_it() {
    let config = ClusterConfig::three();
    let mut nodes: Vec<Server> = (1..=3)
        .map(|id| Server::start(&config.node(id, common::UNLIMITED)))
        .collect();
    let alice = cluster_signup(&nodes[0], "alice", None);
    let wid = cluster_workspace(&nodes[0], &alice);
    let first = directory_leader(&nodes, &[0, 1, 2], &alice, &wid);
    // The upload through the leader, which is SIGKILLed as soon as it answers: its preview
    // was queued there, and most likely not made.
    let code = b"fn survivor() {\n    println!(\"made by another leader\");\n}\n".repeat(50);
    let r = common::upload_bytes_raw(&nodes[first], &alice, &wid, "s.rs", "text/plain", &code);
    assert_eq!(r.status, 201, "{}", r.text);
    nodes[first].kill();
    let fid = str_of(&r.body["file"]["id"]);
    let others: Vec<usize> = (0..3).filter(|&i| i != first).collect();
    // Read through the new leader alone: a node that serves a preview it lacks fetches
    // it, which would make a copy of its own.
    let maker = directory_leader(&nodes, &others, &alice, &wid);
    let html = preview_on(&nodes[maker], &alice, &fid, &format!("node {}", maker + 1));
    assert!(String::from_utf8_lossy(&html).contains("made by another leader"));
    // The node that made it dies too, once the first is back: the two others serve it,
    // one from the copy made before the record, the other fetched from that one.
    nodes[first].restart();
    nodes[maker].kill();
    for i in (0..3).filter(|&i| i != maker) {
        let html = preview_on(&nodes[i], &alice, &fid, &format!("node {}", i + 1));
        assert!(
            String::from_utf8_lossy(&html).contains("made by another leader"),
            "node {} after the maker died",
            i + 1
        );
    }
}

// A file deleted through one node is gone at once through another: its metadata and its
// content answer 404 right after the deletion's 204 (30 rounds).
#[test]
fn a_file_deleted_through_one_node_is_gone_at_once_through_another() {
    let config = ClusterConfig::three();
    let nodes: Vec<Server> = (1..=3)
        .map(|id| Server::start(&config.node(id, common::UNLIMITED)))
        .collect();
    let alice = cluster_signup(&nodes[0], "alice", None);
    let wid = cluster_workspace(&nodes[0], &alice);
    let mut wrong = Vec::new();
    for i in 0..30 {
        let (a, b) = (&nodes[i % 3], &nodes[(i + 1) % 3]);
        let bytes = format!("file {i}\n").repeat(100).into_bytes();
        let r = settled(|| {
            let ctype = "application/octet-stream";
            common::upload_bytes_raw(a, &alice, &wid, "f.bin", ctype, &bytes)
        });
        assert_eq!(r.status, 201, "{}", r.text);
        let fid = str_of(&r.body["file"]["id"]);
        let r = settled(|| {
            a.call(
                "DELETE",
                &format!("/api/v1/files/{fid}"),
                Some(&alice.token),
                None,
            )
        });
        assert_eq!(r.status, 204, "{}", r.text);
        let r = b.call(
            "GET",
            &format!("/api/v1/files/{fid}"),
            Some(&alice.token),
            None,
        );
        if r.status != 404 {
            wrong.push(format!("{i}: metadata {} {}", r.status, r.text));
        }
        let (status, _) = get_bytes(
            b,
            Some(&alice),
            &format!("/api/v1/files/{fid}/content"),
            None,
        );
        if status != 404 {
            wrong.push(format!("{i}: content {status}"));
        }
    }
    assert!(wrong.is_empty(), "{} stale reads: {wrong:#?}", wrong.len());
}
