//! Search (`API.md` §12) on a node of a cluster that lacks what it must index (`API.md`
//! §15: every node serves the whole API): each node indexes its own copy of the logs, and
//! the text of a body over 64 KiB, or of a file, lives beside the log, in the blob and file
//! stores. A node whose stores were emptied (a replaced disk) and whose index is rebuilt
//! fetches what it lacks from a peer, and finds the words again.

mod common;

use common::{
    cluster_channel, cluster_signup, cluster_workspace, settled, str_of, ClusterConfig, Server,
    User, UNLIMITED,
};
use serde_json::json;
use std::time::{Duration, Instant};

/// How long anything here may take.
const WAIT: Duration = Duration::from_secs(30);

/// Waits until a search of `kind` (`messages` or `files`) for `q` through `s` finds `id`.
#[track_caller]
fn finds(s: &Server, user: &User, wid: &str, kind: &str, q: &str, id: &str) {
    let path = format!("/api/v1/workspaces/{wid}/search/{kind}?q={q}");
    let field = if kind == "messages" {
        "message"
    } else {
        "file"
    };
    let deadline = Instant::now() + WAIT;
    loop {
        let r = settled(|| s.call("GET", &path, Some(&user.token), None));
        assert_eq!(r.status, 200, "{}", r.text);
        let results = r.body["results"].as_array().expect("results");
        if results.iter().any(|x| x[field]["id"] == id) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{q} never found {id} through {}: {}",
            s.base_url(),
            r.text
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Empties directory `dir`'s files, and those of its subdirectories but `keep`.
fn empty(dir: &std::path::Path, keep: &str) -> usize {
    let mut removed = 0;
    for entry in std::fs::read_dir(dir).expect("a directory") {
        let path = entry.expect("an entry").path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n != keep) {
                removed += empty(&path, keep);
            }
        } else {
            std::fs::remove_file(&path).expect("removed");
            removed += 1;
        }
    }
    removed
}

#[test]
fn a_node_that_lost_its_stores_fetches_what_it_indexes_from_a_peer() {
    let config = ClusterConfig::three();
    let mut nodes = config.start_all(UNLIMITED);
    let alice = cluster_signup(&nodes[0], "alice", None);
    let wid = cluster_workspace(&nodes[0], &alice);
    let cid = cluster_channel(&nodes[0], &alice, &wid, "general");
    // A body over 64 KiB, and a file, each with a word found nowhere else.
    let text = format!("quokkazebra {}", "lorem ipsum dolor ".repeat(5_000));
    let r = settled(|| {
        let body = json!({"text": text, "client_msg_id": "long"});
        let path = format!("/api/v1/channels/{cid}/messages");
        nodes[0].call("POST", &path, Some(&alice.token), Some(body))
    });
    assert_eq!(r.status, 201, "{}", r.text);
    let mid = str_of(&r.body["message"]["id"]);
    let notes = b"meeting notes\nthe marmotviolin plan\n".repeat(10);
    let r = settled(|| {
        common::upload_bytes_raw(&nodes[0], &alice, &wid, "notes.txt", "text/plain", &notes)
    });
    assert_eq!(r.status, 201, "{}", r.text);
    let fid = str_of(&r.body["file"]["id"]);
    for s in &nodes {
        finds(s, &alice, &wid, "messages", "quokkazebra", &mid);
        finds(s, &alice, &wid, "files", "marmotviolin", &fid);
    }
    // Node 3 loses its blobs, its files' bytes and its index, and starts again.
    nodes[2].kill();
    let data = nodes[2].dir().join("data");
    assert!(empty(&data.join("blobs"), "") > 0, "node 3 held no blob");
    assert!(empty(&data.join("files"), "tmp") > 0, "node 3 held no file");
    std::fs::remove_dir_all(data.join("search")).expect("the index removed");
    nodes[2].restart();
    finds(&nodes[2], &alice, &wid, "messages", "quokkazebra", &mid);
    finds(&nodes[2], &alice, &wid, "files", "marmotviolin", &fid);
}

// A message is found within one second of its ack (`API.md` §12) through every node, not
// only the one that took it: each node's indexer reads its own replica of the channel.
#[test]
fn a_message_is_found_through_every_node_within_a_second_of_its_ack() {
    let config = ClusterConfig::three();
    let nodes = config.start_all(UNLIMITED);
    let alice = cluster_signup(&nodes[0], "alice", None);
    let wid = cluster_workspace(&nodes[0], &alice);
    let cid = cluster_channel(&nodes[0], &alice, &wid, "general");
    let token = alice.token.clone();
    let mut slowest = Duration::ZERO;
    for i in 0..20 {
        let through = &nodes[i % 3];
        let word = format!("fresh{i}word");
        let r = settled(|| {
            let body = json!({"text": format!("{word} here"), "client_msg_id": word});
            let path = format!("/api/v1/channels/{cid}/messages");
            through.call("POST", &path, Some(&token), Some(body))
        });
        assert_eq!(r.status, 201, "{}", r.text);
        let acked = Instant::now();
        let mid = str_of(&r.body["message"]["id"]);
        let path = format!("/api/v1/workspaces/{wid}/search/messages?q={word}");
        for s in &nodes {
            loop {
                let r = s.call("GET", &path, Some(&token), None);
                let found = r.status == 200
                    && r.body["results"]
                        .as_array()
                        .is_some_and(|a| a.iter().any(|x| x["message"]["id"] == mid));
                if found {
                    break;
                }
                assert!(
                    acked.elapsed() < Duration::from_secs(5),
                    "{word} not found through {} 5 s after its ack",
                    s.base_url()
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            slowest = slowest.max(acked.elapsed());
        }
    }
    eprintln!("slowest: {slowest:?}");
    assert!(
        slowest < Duration::from_secs(1),
        "found {slowest:?} after its ack"
    );
}
