//! Replays the committed fuzz corpora of the gateway's decoders (`fuzz/corpus/client_frame/`,
//! `rest_body/`, `multipart/`, `quic_datagram/`) through the fuzz targets' checks on the stable toolchain,
//! so every input the fuzzer kept stays a regression test without nightly or libFuzzer.
//!
//! `write_seed_corpora` (ignored) writes the hand-made seed inputs the fuzzer started from;
//! run it with `--ignored` to make them again.

use serde_json::json;
use std::path::{Path, PathBuf};

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

/// Feeds every file of a target's corpus to `check`, and checks that the corpus holds
/// inputs that are accepted as well as inputs that are not.
fn replay(target: &str, check: fn(&[u8]) -> bool) {
    let dir = corpus(target);
    let (mut inputs, mut accepted) = (0, 0);
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read the corpus at {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("list the corpus").path();
        if !path.is_file() {
            continue;
        }
        let data = std::fs::read(&path).expect("read a corpus file");
        eprintln!("checking {} ({} bytes)", path.display(), data.len());
        inputs += 1;
        accepted += usize::from(check(&data));
    }
    assert!(inputs > 0, "the corpus at {} is empty", dir.display());
    assert!(accepted > 0, "no input in {} is accepted", dir.display());
    assert!(
        accepted < inputs,
        "every input in {} is accepted",
        dir.display()
    );
}

// Client frames, as WebSocket text and as length-prefixed QUIC frames, through the parser
// and a session core: nothing panics, the core stays within its bounds.
#[test]
fn client_frame_corpus_replays_cleanly() {
    replay("client_frame", chorus_gateway::fuzzing::client_frame);
}

// REST bodies, parsed as every request type: nothing panics, however deep.
#[test]
fn rest_body_corpus_replays_cleanly() {
    replay("rest_body", chorus_gateway::fuzzing::rest_body);
}

// Upload forms, read as the upload route reads them in chunks of every size: nothing
// panics, an accepted file is whole and within the limit.
#[test]
fn multipart_corpus_replays_cleanly() {
    replay("multipart", chorus_gateway::fuzzing::multipart);
}

// QUIC datagrams at the server's port: routing and a fresh endpoint never panic.
#[test]
fn quic_datagram_corpus_replays_cleanly() {
    replay("quic_datagram", chorus_gateway::fuzzing::quic_datagram);
}

fn length_prefixed(frames: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        out.extend_from_slice(&(f.len() as u32).to_be_bytes());
        out.extend_from_slice(f.as_bytes());
    }
    out
}

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = corpus(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

/// A client's first QUIC datagram (an Initial packet with a ClientHello) for our ALPN.
fn initial_datagram() -> Vec<u8> {
    let client = chorus_client::quic_client_config(&"0".repeat(64)).unwrap();
    let mut endpoint = quinn_proto::Endpoint::new(Default::default(), None, false, None);
    let now = std::time::Instant::now();
    let server = "127.0.0.1:8443".parse().unwrap();
    let (_, mut conn) = endpoint.connect(now, client, server, "localhost").unwrap();
    let mut buf = Vec::new();
    let t = conn.poll_transmit(now, 1, &mut buf).expect("an Initial");
    buf.truncate(t.size);
    buf
}

// Writes the seed inputs of the gateway's fuzz targets (run it on purpose, with --ignored).
#[test]
#[ignore]
fn write_seed_corpora() {
    let c = "C6000";
    let m = "M6000-2";
    let frames = [
        json!({"type": "ping", "ref": 1}),
        json!({"type": "resume", "since": {c: 1, "bad!": 2}}),
        json!({"type": "typing:start", "channel_id": c}),
        json!({"type": "message:send", "ref": "a", "channel_id": c, "text": "hi", "client_msg_id": "k", "thread_id": m}),
        json!({"type": "message:edit", "ref": "b", "channel_id": c, "message_id": m, "text": "yo"}),
        json!({"type": "message:delete", "ref": "c", "channel_id": c, "message_id": m}),
        json!({"type": "reaction:add", "ref": "d", "channel_id": c, "message_id": m, "emoji": "tada"}),
        json!({"type": "reaction:remove", "ref": "e", "channel_id": c, "message_id": m, "emoji": "👍🏽"}),
        json!({"type": "nope"}),
        json!({"type": "message:send", "ref": "f", "channel_id": c, "ciphertext": "CT", "devices_seq": 4, "client_msg_id": "k2"}),
        json!({"type": "message:send", "ref": "g", "channel_id": c, "text": "hi", "ciphertext": null, "devices_seq": -1}),
        json!({"type": "message:edit", "ref": "h", "channel_id": c, "message_id": m, "ciphertext": "CT2", "devices_seq": 5}),
    ];
    for (i, f) in frames.iter().enumerate() {
        write(
            "client_frame",
            &format!("seed-frame-{i}"),
            f.to_string().as_bytes(),
        );
    }
    let all: Vec<String> = frames.iter().map(|f| f.to_string()).collect();
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    write("client_frame", "seed-quic-run", &length_prefixed(&refs));
    write(
        "client_frame",
        "seed-quic-cut",
        &length_prefixed(&refs)[..30],
    );
    write("client_frame", "seed-not-json", b"{\"type\":");
    write(
        "client_frame",
        "seed-deep",
        format!("{}{}", "[".repeat(100), "]".repeat(100)).as_bytes(),
    );
    write(
        "client_frame",
        "seed-huge-prefix",
        &[0xff, 0xff, 0xff, 0xff, b'{'],
    );

    let bodies = [
        json!({"email": "a@example.com", "password": "correct horse", "name": "A"}),
        json!({"name": "acme"}),
        json!({"name": "general", "kind": "private"}),
        json!({"user_ids": ["U1", "U2"]}),
        json!({"user_id": "U1"}),
        json!({"text": "hi", "client_msg_id": "k", "thread_id": m}),
    ];
    for (i, b) in bodies.iter().enumerate() {
        write(
            "rest_body",
            &format!("seed-body-{i}"),
            b.to_string().as_bytes(),
        );
    }
    write("rest_body", "seed-array", b"[1,2,3]");
    write(
        "rest_body",
        "seed-deep-ignored",
        format!(
            "{{\"name\":\"x\",\"x\":{}{}}}",
            "[".repeat(100),
            "]".repeat(100)
        )
        .as_bytes(),
    );
    write("rest_body", "seed-not-utf8", b"{\"name\":\"\xff\"}");

    // A form part: name, filename, content type, value.
    type Part<'a> = (&'a str, Option<&'a str>, Option<&'a str>, &'a [u8]);
    let form = |parts: &[Part]| {
        let mut body = vec![7u8]; // the chunk size byte
        for (name, filename, ctype, value) in parts {
            body.extend_from_slice(b"--XyZ\r\nContent-Disposition: form-data; name=\"");
            body.extend_from_slice(name.as_bytes());
            body.push(b'"');
            if let Some(f) = filename {
                body.extend_from_slice(format!("; filename=\"{f}\"").as_bytes());
            }
            body.extend_from_slice(b"\r\n");
            if let Some(t) = ctype {
                body.extend_from_slice(format!("Content-Type: {t}\r\n").as_bytes());
            }
            body.extend_from_slice(b"\r\n");
            body.extend_from_slice(value);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b"--XyZ--\r\n");
        body
    };
    let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR";
    write(
        "multipart",
        "seed-text",
        &form(&[
            ("workspace_id", None, None, b"W1"),
            ("file", Some("a.txt"), Some("text/plain"), b"hello"),
        ]),
    );
    write(
        "multipart",
        "seed-png-traversal-name",
        &form(&[
            ("workspace_id", None, None, b"W1"),
            ("file", Some("../../x.png"), Some("image/png"), png),
        ]),
    );
    write(
        "multipart",
        "seed-mismatch",
        &form(&[
            ("workspace_id", None, None, b"W1"),
            ("file", Some("a.png"), Some("image/png"), b"<svg/>"),
        ]),
    );
    write(
        "multipart",
        "seed-file-first",
        &form(&[
            ("file", Some("a.txt"), None, b"x"),
            ("workspace_id", None, None, b"W1"),
        ]),
    );
    write(
        "multipart",
        "seed-too-large",
        &form(&[
            ("workspace_id", None, None, b"W1"),
            ("file", Some("big"), None, &[b'z'; 5000]),
        ]),
    );
    let mut cut = form(&[
        ("workspace_id", None, None, b"W1"),
        ("file", Some("a.txt"), None, b"hello"),
    ]);
    cut.truncate(cut.len() - 12);
    write("multipart", "seed-cut", &cut);

    write("quic_datagram", "seed-initial", &initial_datagram());
    write(
        "quic_datagram",
        "seed-short",
        &[0x40, 1, 2, 3, 4, 5, 6, 7, 8, 9],
    );
    write("quic_datagram", "seed-empty", b"");
}
