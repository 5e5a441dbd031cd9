//! The server under an attacker's and a careless client's hands, against the real binary:
//! memory per sign-up, tokens of accounts that do not exist, the sign-up and login limits,
//! slow and silent connections, HEAD, a partly malformed resume, and deeply nested JSON.

mod common;

use chorus_engine::ids::UserId;
use common::{Server, User, PASSWORD, UNLIMITED};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

// Sign-ups keep no memory beyond the account itself: RSS grows by a few KiB per user over
// hundreds of sign-ups (each hashes a password with 19 MiB of argon2 memory).
#[test]
fn signups_do_not_leak_memory() {
    const WARM_UP: usize = 40;
    const MEASURED: usize = 300;
    const KIB_PER_USER_MAX: u64 = 24;
    let server = Server::start(UNLIMITED);
    let signup_range = |from: usize, to: usize| {
        std::thread::scope(|s| {
            for t in 0..4 {
                let server = &server;
                s.spawn(move || {
                    for i in (from + t..to).step_by(4) {
                        server.signup(&format!("user{i}"));
                    }
                });
            }
        });
    };
    signup_range(0, WARM_UP);
    let before = server.rss_kib();
    signup_range(WARM_UP, WARM_UP + MEASURED);
    let after = server.rss_kib();
    let per_user = after.saturating_sub(before) / MEASURED as u64;
    eprintln!("RSS {before} KiB -> {after} KiB over {MEASURED} sign-ups: {per_user} KiB each");
    assert!(
        per_user <= KIB_PER_USER_MAX,
        "RSS grew {per_user} KiB per sign-up ({before} -> {after} KiB)"
    );
}

/// A token signed with the server's own key for `user`, who need not exist.
fn forged_token(server: &Server, user: &str) -> String {
    let key = server.dir().join("data").join("jwt.key");
    let tokens = chorus_gateway::auth::Tokens::load_or_create(&key, 3600).expect("jwt.key");
    tokens.issue(user, None, chorus_gateway::ctx::token_now())
}

// A correctly signed token naming no account is refused like any bad token: 401 on REST,
// and the WebSocket upgrade is refused with 401.
#[test]
fn tokens_of_nonexistent_users_are_refused() {
    let server = Server::start(UNLIMITED);
    let real = server.signup("alice");
    let ghost = forged_token(&server, &UserId(987_654_321).to_string());
    server
        .call("GET", "/api/v1/me", Some(&ghost), None)
        .assert_error(401, "unauthorized");
    let create = json!({"name": "ghost town"});
    server
        .call("POST", "/api/v1/workspaces", Some(&ghost), Some(create))
        .assert_error(401, "unauthorized");
    match server.connect_raw(&ghost) {
        Err(tungstenite::Error::Http(r)) => assert_eq!(r.status(), 401),
        Err(e) => panic!("expected HTTP 401, got {e}"),
        Ok(_) => panic!("the upgrade was accepted for a ghost user"),
    }
    // A forged token for a real user works: the check is the account, not the token.
    let forged_real = forged_token(&server, &real.id);
    assert_eq!(
        server
            .call("GET", "/api/v1/me", Some(&forged_real), None)
            .status,
        200
    );
}

// The Authorization scheme is case-insensitive (RFC 9110 §11.1).
#[test]
fn bearer_scheme_in_any_case() {
    let server = Server::start(UNLIMITED);
    let alice = server.signup("alice");
    for scheme in ["bearer", "BEARER", "Bearer", "bEaReR"] {
        let auth = format!("{scheme} {}", alice.token);
        let r = server.raw("GET", "/api/v1/me", &[("Authorization", &auth)], None);
        assert_eq!(r.status, 200, "{scheme}: {}", r.text);
    }
    let r = server.raw("GET", "/api/v1/me", &[("Authorization", "Basic abc")], None);
    r.assert_error(401, "unauthorized");
}

/// Sends a raw HTTP/1.1 request from `source` and returns the status and the whole answer.
fn http_from(
    server: &Server,
    source: IpAddr,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String) {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::new(source, 0).into())
        .expect("bind source");
    let addr: SocketAddr = server.addr.parse().unwrap();
    socket.connect(&addr.into()).expect("connect");
    let mut stream: TcpStream = socket.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {answer:?}"));
    (status, answer)
}

fn login_body(email: &str, password: &str) -> String {
    json!({"email": email, "password": password}).to_string()
}

/// The `Retry-After` of a raw answer, in seconds.
fn retry_after(answer: &str) -> Option<u64> {
    answer
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("retry-after:")
                .map(str::to_owned)
        })
        .and_then(|v| v.trim().parse().ok())
}

// Failed logins are limited per (account, address), per address and per account, and
// sign-ups per address: past each budget the answer is 429 with Retry-After, and the
// owner of an attacked account can still log in from their own address.
#[test]
fn login_and_signup_limits() {
    let config = "rate_per_s = 1000000.0\nrate_burst = 1000000.0\n\
                  login_failures_per_account_ip_burst = 3.0\n\
                  login_failures_per_ip_burst = 6.0\n\
                  signup_per_ip_burst = 4.0\n";
    let server = Server::start(config);
    let attacker: IpAddr = [127, 0, 0, 1].into();
    let owner: IpAddr = [127, 0, 0, 2].into();
    let spray: IpAddr = [127, 0, 0, 3].into();
    // Sign-ups: four from one address, then 429; another address still signs up.
    for i in 0..4 {
        let body = json!({"email": format!("u{i}@example.com"), "password": PASSWORD, "name": "U"});
        let (status, answer) = http_from(
            &server,
            attacker,
            "POST",
            "/api/v1/auth/signup",
            &body.to_string(),
        );
        assert_eq!(status, 201, "{answer}");
    }
    let body = json!({"email": "u9@example.com", "password": PASSWORD, "name": "U"}).to_string();
    let (status, answer) = http_from(&server, attacker, "POST", "/api/v1/auth/signup", &body);
    assert_eq!(status, 429, "{answer}");
    assert!(retry_after(&answer).is_some_and(|s| s >= 1), "{answer}");
    let (status, answer) = http_from(&server, owner, "POST", "/api/v1/auth/signup", &body);
    assert_eq!(status, 201, "{answer}");

    // Guessing u0's password from one address: three failures, then 429 before any check,
    // even for the right password.
    for _ in 0..3 {
        let (status, _) = http_from(
            &server,
            attacker,
            "POST",
            "/api/v1/auth/login",
            &login_body("u0@example.com", "wrong password"),
        );
        assert_eq!(status, 401);
    }
    let (status, answer) = http_from(
        &server,
        attacker,
        "POST",
        "/api/v1/auth/login",
        &login_body("u0@example.com", PASSWORD),
    );
    assert_eq!(status, 429, "{answer}");
    assert!(retry_after(&answer).is_some_and(|s| s >= 1), "{answer}");
    // The owner, from their own address, is not locked out.
    let (status, answer) = http_from(
        &server,
        owner,
        "POST",
        "/api/v1/auth/login",
        &login_body("u0@example.com", PASSWORD),
    );
    assert_eq!(status, 200, "{answer}");

    // Spraying many accounts from one address: six failures in all, then 429.
    for i in 0..6 {
        let (status, _) = http_from(
            &server,
            spray,
            "POST",
            "/api/v1/auth/login",
            &login_body(&format!("nobody{i}@example.com"), "wrong password"),
        );
        assert_eq!(status, 401);
    }
    let (status, answer) = http_from(
        &server,
        spray,
        "POST",
        "/api/v1/auth/login",
        &login_body("u1@example.com", "wrong password"),
    );
    assert_eq!(status, 429, "{answer}");
    // Successful logins do not count against anyone.
    for _ in 0..5 {
        let (status, _) = http_from(
            &server,
            owner,
            "POST",
            "/api/v1/auth/login",
            &login_body("u1@example.com", PASSWORD),
        );
        assert_eq!(status, 200);
    }
}

/// Reads from a socket until the server closes it; returns how long that took, or `None`
/// if it stayed open for `wait`.
fn closed_within(stream: &mut TcpStream, wait: Duration) -> Option<Duration> {
    let start = Instant::now();
    stream.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Some(start.elapsed())
            }
            Err(_) => return None,
        }
    }
}

// Slowloris: connections that never complete a request head are dropped at the header
// deadline, an idle keep-alive connection at the idle deadline, one address cannot hold
// more than its share of connections, and other clients are served all along.
#[test]
fn slow_and_silent_connections_are_dropped() {
    let config = format!(
        "{UNLIMITED}http_header_timeout_s = 1\nhttp_idle_timeout_s = 2\n\
         connections_per_ip_max = 4\n"
    );
    let server = Server::start(&config);
    // Signed up from another address with `Connection: close`, so that no pooled
    // keep-alive connection of 127.0.0.1 counts against its share below.
    let signup = json!({"email": "alice@example.com", "password": PASSWORD, "name": "A"});
    let (status, answer) = http_from(
        &server,
        [127, 0, 0, 9].into(),
        "POST",
        "/api/v1/auth/signup",
        &signup.to_string(),
    );
    assert_eq!(status, 201, "{answer}");
    let body: Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    let token = body["token"].as_str().unwrap().to_owned();
    let addr: SocketAddr = server.addr.parse().unwrap();
    let bound = Duration::from_secs(4);

    // A silent connection.
    let mut silent = TcpStream::connect(addr).unwrap();
    // A request head at one byte every 300 ms: never done within the deadline.
    let mut slow = TcpStream::connect(addr).unwrap();
    // A WebSocket upgrade sent just as slowly.
    let mut slow_ws = TcpStream::connect(addr).unwrap();
    let drip = std::thread::spawn({
        let mut slow = slow.try_clone().unwrap();
        let mut slow_ws = slow_ws.try_clone().unwrap();
        move || {
            let head = b"GET /api/v1/me HTTP/1.1\r\nHost: x\r\n";
            let ws_head = b"GET /ws/v1/connect?token=x HTTP/1.1\r\nHost: x\r\n";
            for i in 0..20 {
                let a = slow.write_all(&head[i % head.len()..][..1]);
                let b = slow_ws.write_all(&ws_head[i % ws_head.len()..][..1]);
                if a.is_err() && b.is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(300));
            }
        }
    });
    // One address's share is four connections: the three above and one more; a fifth is
    // closed at once.
    let _fourth = TcpStream::connect(addr).unwrap();
    let mut fifth = TcpStream::connect(addr).unwrap();
    let refused = closed_within(&mut fifth, Duration::from_secs(2));
    assert!(
        refused.is_some(),
        "a fifth connection from one address was kept"
    );
    // Meanwhile another address is served.
    let (status, _) = http_from(&server, [127, 0, 0, 2].into(), "GET", "/healthz", "");
    assert_eq!(status, 200);
    for (name, stream) in [
        ("silent", &mut silent),
        ("slow", &mut slow),
        ("slow upgrade", &mut slow_ws),
    ] {
        let took = closed_within(stream, bound);
        assert!(
            took.is_some(),
            "the {name} connection was still open after {bound:?}"
        );
    }
    drip.join().unwrap();

    // An idle keep-alive connection is closed after its idle deadline, not before a
    // request that arrives in time is served.
    let mut keep = TcpStream::connect(addr).unwrap();
    let request =
        format!("GET /api/v1/me HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n");
    keep.write_all(request.as_bytes()).unwrap();
    keep.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = keep.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let took = closed_within(&mut keep, Duration::from_secs(6)).expect("idle connection kept");
    assert!(
        took >= Duration::from_millis(1500),
        "closed after only {took:?}"
    );
}

/// Reads HTTP answers from `stream` until `count` have arrived whole (by their
/// `Content-Length`) or the server closes; returns each one's head (lowercase) and body.
fn read_answers(stream: &mut TcpStream, count: usize) -> Vec<(String, String)> {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut bytes = Vec::new();
    let mut answers = Vec::new();
    let mut buf = [0u8; 4096];
    while answers.len() < count {
        let text = String::from_utf8_lossy(&bytes).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let head = text[..end].to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            if text.len() >= end + 4 + length {
                answers.push((head, text[end + 4..end + 4 + length].to_owned()));
                bytes.drain(..end + 4 + length);
                continue;
            }
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
        }
    }
    answers
}

// A request answered before its body is read (here a 401) keeps its keep-alive connection:
// the server reads the rest of the body, even when it arrives after the head, and the next
// request on the connection is served. A body too large to read through is answered with
// `Connection: close`, so the client knows not to reuse the connection.
#[test]
fn an_unread_body_keeps_the_connection_or_says_close() {
    let server = Server::start(UNLIMITED);
    let addr: SocketAddr = server.addr.parse().unwrap();
    let body = format!("{{\"text\": \"{}\"}}", "x".repeat(100_000));
    let head = |length: usize| {
        format!(
            "POST /api/v1/channels/c1/read HTTP/1.1\r\nHost: x\r\n\
             Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
        )
    };
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.write_all(head(body.len()).as_bytes()).unwrap();
    // The body comes late, as from a client that writes the head and the body apart.
    std::thread::sleep(Duration::from_millis(300));
    stream.write_all(body.as_bytes()).unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let answers = read_answers(&mut stream, 2);
    assert_eq!(answers.len(), 2, "the connection closed: {answers:?}");
    assert!(answers[0].0.starts_with("http/1.1 401"), "{:?}", answers[0]);
    assert!(
        !answers[0].0.contains("connection: close"),
        "{:?}",
        answers[0]
    );
    assert!(answers[1].0.starts_with("http/1.1 200"), "{:?}", answers[1]);
    assert_eq!(answers[1].1, "ok\n");

    // Declared far larger than the server reads through: the answer says close.
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.write_all(head(50 * 1024 * 1024).as_bytes()).unwrap();
    stream.write_all(body.as_bytes()).unwrap();
    let answers = read_answers(&mut stream, 1);
    assert_eq!(answers.len(), 1, "no answer");
    assert!(answers[0].0.starts_with("http/1.1 401"), "{:?}", answers[0]);
    assert!(
        answers[0].0.contains("connection: close"),
        "{:?}",
        answers[0]
    );
}

// HEAD is answered wherever GET is, with the GET's status and headers and no body.
#[test]
fn head_works_like_get_without_the_body() {
    let server = Server::start(UNLIMITED);
    let alice = server.signup("alice");
    let auth = format!("Bearer {}", alice.token);
    let get = server.raw("GET", "/api/v1/me", &[("Authorization", &auth)], None);
    let head = server.raw("HEAD", "/api/v1/me", &[("Authorization", &auth)], None);
    assert_eq!(head.status, 200, "{}", head.text);
    assert!(head.text.is_empty(), "HEAD answered a body: {}", head.text);
    assert_eq!(head.content_type, get.content_type);
    assert_eq!(
        head.content_length.as_deref(),
        Some(get.text.len().to_string().as_str())
    );
    assert_eq!(server.raw("HEAD", "/healthz", &[], None).status, 200);
    assert_eq!(
        server.raw("HEAD", "/api/v1/openapi.json", &[], None).status,
        200
    );
    // HEAD without a token is refused like GET.
    assert_eq!(server.raw("HEAD", "/api/v1/me", &[], None).status, 401);
    // A POST-only path says which methods it has.
    let r = server.raw("HEAD", "/api/v1/auth/login", &[], None);
    assert_eq!(r.status, 405);
    assert_eq!(r.allow.as_deref(), Some("POST"));
    let r = server.raw("PUT", "/api/v1/me", &[("Authorization", &auth)], None);
    assert_eq!(r.allow.as_deref(), Some("GET, HEAD"));
}

// A resume that names one malformed channel ID replays the valid channels and reports the
// bad ID in an error frame that names it.
#[test]
fn partial_resume_replays_the_valid_channels() {
    let server = Server::start(UNLIMITED);
    let alice = server.signup("alice");
    let wid = server.workspace(&alice, &[]);
    let cid = server.channel(&wid, &alice, "general", &[]);
    let first = server.post(&alice, &cid, "one")["seq"].as_u64().unwrap();
    server.post(&alice, &cid, "two");
    let (mut ws, _) = server.connect(&alice);
    ws.send(json!({"type": "resume", "ref": "r", "since": {cid.clone(): first, "nope!": 3}}));
    let error = ws.recv_type("error");
    assert_eq!(error["code"], "not_found", "{error}");
    assert_eq!(error["channel_ids"], json!(["nope!"]), "{error}");
    assert!(
        error["message"].as_str().unwrap().contains("nope!"),
        "{error}"
    );
    let event = ws.recv_type("event");
    assert_eq!(event["event"]["message"]["text"], "two", "{event}");
    let resumed = ws.recv_type("resumed");
    assert!(resumed["channels"][&cid].is_u64(), "{resumed}");
    ws.ping("alive");
}

fn nested(levels: usize) -> String {
    "[".repeat(levels) + &"]".repeat(levels)
}

// JSON nested deeper than 64 levels is refused before it is parsed, in REST bodies (even
// in a field the call ignores) and in WebSocket frames; the connection stays up.
#[test]
fn deeply_nested_json_is_refused() {
    let server = Server::start(UNLIMITED);
    let alice: User = server.signup("alice");
    let body = format!(
        r#"{{"email":"deep@example.com","password":"{PASSWORD}","name":"D","x":{}}}"#,
        nested(200_000)
    );
    let r = server.raw("POST", "/api/v1/auth/signup", &[], Some(body.as_bytes()));
    r.assert_error(400, "invalid_json");
    // Sixty levels are fine.
    let body = format!(r#"{{"name":"ok","x":{}}}"#, nested(60));
    let auth = format!("Bearer {}", alice.token);
    let r = server.raw(
        "POST",
        "/api/v1/workspaces",
        &[("Authorization", &auth)],
        Some(body.as_bytes()),
    );
    assert_eq!(r.status, 201, "{}", r.text);
    let (mut ws, _) = server.connect(&alice);
    let frame = format!(r#"{{"type":"ping","ref":"deep","x":{}}}"#, nested(100_000));
    ws.send_raw(tungstenite::Message::text(frame));
    let e: Value = ws.recv_type("error");
    assert_eq!(e["code"], "invalid_json", "{e}");
    ws.ping("still up");
}

// A second server on a port a server already serves refuses to start, and touches no data:
// SO_REUSEPORT would otherwise let it take half of the first one's clients.
#[test]
fn a_second_server_on_the_same_port_refuses_to_start() {
    let server = Server::start(UNLIMITED);
    let dir = tempfile::tempdir().unwrap();
    for (http, quic) in [
        (server.addr.as_str(), "127.0.0.1:0"),
        ("127.0.0.1:0", server.quic_addr.as_str()),
    ] {
        let data = dir.path().join("data");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_chorus"))
            .args(["serve", "--http", http, "--quic", quic, "--shards", "1"])
            .arg("--data-dir")
            .arg(&data)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "a second server started on {http} {quic}"
        );
        assert!(stderr.contains("in use by another process"), "{stderr}");
        assert!(
            !data.exists(),
            "the refused server created its data directory"
        );
    }
    assert_eq!(server.call("GET", "/healthz", None, None).status, 200);
}
