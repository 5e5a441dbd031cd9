//! A QUIC peer written elsewhere: a Python client on aioquic, a QUIC stack independent of
//! the server's, speaks API.md §8's framing to the real binary. Skipped with a reason
//! when aioquic is not installed, except where `CHORUS_REQUIRE_PEERS` is set (CI installs
//! it and sets that).

mod common;

use common::{Server, UNLIMITED};
use serde_json::Value;
use std::process::Command;

fn aioquic_available() -> bool {
    Command::new("python3")
        .args(["-c", "import aioquic"])
        .status()
        .is_ok_and(|s| s.success())
}

// The aioquic client authenticates, resumes a channel (getting the event it missed), sends
// a message that is acknowledged and stored, and gets its pong.
#[test]
fn aioquic_client_speaks_the_protocol() {
    if !aioquic_available() {
        assert!(
            std::env::var_os("CHORUS_REQUIRE_PEERS").is_none(),
            "aioquic is not installed and CHORUS_REQUIRE_PEERS is set"
        );
        eprintln!("SKIPPED: aioquic is not installed (python3 -m pip install aioquic)");
        return;
    }
    let server = Server::start(UNLIMITED);
    let alice = server.signup("alice");
    let wid = server.workspace(&alice, &[]);
    let cid = server.channel(&wid, &alice, "general", &[]);
    let since = server.last_seq(&alice, &cid);
    server.post(&alice, &cid, "missed while away");
    let (host, port) = server.quic_addr.rsplit_once(':').unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers/aioquic_client.py");
    let out = Command::new("python3")
        .args([script, host, port, &server.quic_pin(), &alice.token, &cid])
        .arg(since.to_string())
        .output()
        .expect("run python3");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "aioquic client failed: {stderr}\nserver log:\n{}",
        server.log()
    );
    let seen: Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
    assert_eq!(seen["hello_user"], alice.id.as_str());
    assert_eq!(seen["replayed_seq"], since + 1);
    assert_eq!(seen["ack_ref"], "py-1");
    assert_eq!(seen["ack_text"], "hello from aioquic");
    assert_eq!(seen["own_seq"], since + 2);
    assert_eq!(seen["pong_ref"], "py-ping");
    let texts: Vec<String> = server
        .messages(&alice, &cid)
        .iter()
        .map(|m| m["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(texts, vec!["missed while away", "hello from aioquic"]);
}
