//! The session over QUIC (`API.md` §8) against the real binary on real UDP sockets: QUIC
//! and WebSocket clients in one channel, a client that changes its address in the middle
//! of a stream, and bad input, each answered while the server keeps serving.

mod common;

use chorus_client::{Client, ConnectOptions, QuicTarget, Session, Transport};
use common::{Server, User, UNLIMITED};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::Duration;

/// How long a test waits for a frame or a close it expects (a guard, not a timing).
const WAIT: Duration = Duration::from_secs(20);

fn target(server: &Server) -> QuicTarget {
    QuicTarget {
        addr: server.quic_addr.parse().expect("quic address"),
        server_name: "localhost".into(),
        pin_sha256: server.quic_pin(),
    }
}

/// A QUIC client that speaks the framing by hand, for what the SDK never sends.
struct Raw {
    endpoint: quinn::Endpoint,
    connection: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

/// How a raw read ended when it got no frame.
#[derive(Debug, PartialEq)]
enum Ended {
    /// The server closed the connection with this application error code.
    Closed(u64),
    /// Something else.
    Other(String),
}

impl Raw {
    async fn connect(server: &Server) -> Raw {
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let config = chorus_client::quic_client_config(&server.quic_pin()).unwrap();
        endpoint.set_default_client_config(config);
        let addr: SocketAddr = server.quic_addr.parse().unwrap();
        let connection = endpoint.connect(addr, "localhost").unwrap().await.unwrap();
        let (send, recv) = connection.open_bi().await.unwrap();
        Raw {
            endpoint,
            connection,
            send,
            recv,
        }
    }

    /// Connects and authenticates; returns the client after `hello`.
    async fn session(server: &Server, user: &User) -> Raw {
        let mut raw = Raw::connect(server).await;
        raw.send(&json!({"type": "auth", "token": user.token}))
            .await;
        let hello = raw.recv().await.expect("hello");
        assert_eq!(hello["type"], "hello", "{hello}");
        raw
    }

    async fn send_bytes(&mut self, bytes: &[u8]) {
        self.send.write_all(bytes).await.expect("write");
    }

    async fn send(&mut self, frame: &Value) {
        let body = frame.to_string().into_bytes();
        let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(&body);
        self.send_bytes(&bytes).await;
    }

    /// The next frame, or how the connection ended.
    async fn recv(&mut self) -> Result<Value, Ended> {
        let read = async {
            let mut prefix = [0u8; 4];
            self.recv.read_exact(&mut prefix).await.map_err(ended)?;
            let mut body = vec![0u8; u32::from_be_bytes(prefix) as usize];
            self.recv.read_exact(&mut body).await.map_err(ended)?;
            Ok(serde_json::from_slice(&body).expect("a JSON frame"))
        };
        tokio::time::timeout(WAIT, read)
            .await
            .expect("a frame or a close in time")
    }

    /// The next frame of a type, skipping others.
    async fn recv_type(&mut self, kind: &str) -> Value {
        loop {
            let v = self
                .recv()
                .await
                .unwrap_or_else(|e| panic!("no {kind}: {e:?}"));
            if v["type"] == kind {
                return v;
            }
        }
    }

    /// Reads until the connection ends; the frames seen before. A session that ends
    /// finishes its stream first, then closes the connection with its code.
    async fn until_closed(&mut self) -> (Ended, Vec<Value>) {
        let mut seen = Vec::new();
        loop {
            match self.recv().await {
                Ok(v) => seen.push(v),
                Err(Ended::Other(_)) => {
                    let closed = tokio::time::timeout(WAIT, self.connection.closed()).await;
                    let end = match closed.expect("the connection closes") {
                        quinn::ConnectionError::ApplicationClosed(c) => {
                            Ended::Closed(c.error_code.into_inner())
                        }
                        other => Ended::Other(other.to_string()),
                    };
                    return (end, seen);
                }
                Err(e) => return (e, seen),
            }
        }
    }

    async fn ping(&mut self, reference: &str) {
        self.send(&json!({"type": "ping", "ref": reference})).await;
        let pong = self.recv_type("pong").await;
        assert_eq!(pong["ref"], reference);
    }
}

fn ended(e: quinn::ReadExactError) -> Ended {
    match e {
        quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(
            quinn::ConnectionError::ApplicationClosed(close),
        )) => Ended::Closed(close.error_code.into_inner()),
        other => Ended::Other(other.to_string()),
    }
}

fn session(server: &Server, user: &User) -> Session {
    let client = Client::new(&server.base_url()).unwrap();
    let me = chorus_client::types::User {
        id: user.id.clone(),
        email: user.email.clone(),
        name: user.email.clone(),
    };
    client.session(user.token.clone(), me)
}

// A QUIC client and a WebSocket client in one channel hear each other, both ways, through
// the SDK's stream over either transport.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_and_websocket_share_a_channel() {
    let server = Server::start(UNLIMITED);
    let (alice, bob) = (server.signup("alice"), server.signup("bob"));
    let wid = server.workspace(&alice, &[&bob]);
    let cid = server.channel(&wid, &alice, "general", &[&bob]);
    let since = server.last_seq(&alice, &cid);
    let options = |transport| ConnectOptions {
        since: Some([(cid.clone(), since)].into()),
        transport,
        ..ConnectOptions::default()
    };
    let mut over_quic = session(&server, &alice)
        .connect(options(Transport::Quic(target(&server))))
        .await
        .expect("QUIC stream");
    let mut over_ws = session(&server, &bob)
        .connect(options(Transport::WebSocket))
        .await
        .expect("WebSocket stream");
    let sent = over_quic
        .send(&cid, "from quic", "q1")
        .await
        .expect("ack over QUIC");
    let got = over_ws.next_event().await.unwrap();
    assert_eq!(got.message().unwrap().id, sent.id);
    let sent = over_ws
        .send(&cid, "from ws", "w1")
        .await
        .expect("ack over WS");
    // Alice sees her own message first, then Bob's.
    let first = over_quic.next_event().await.unwrap();
    assert_eq!(first.message().unwrap().text, "from quic");
    let second = over_quic.next_event().await.unwrap();
    assert_eq!(second.message().unwrap().id, sent.id);
    assert_eq!(second.seq, first.seq + 1);
    over_quic.close().await;
    over_ws.close().await;
}

// A client whose UDP socket moves to a new port, again and again, in the middle of a
// stream of 1,000 messages keeps its connection: every message arrives once, in order,
// with no second hello, and the server forwarded datagrams between its shards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_keeps_the_session() {
    const MESSAGES: usize = 1_000;
    const REBINDS_MAX: usize = 40;
    let server = Server::start(UNLIMITED);
    let (alice, bob) = (server.signup("alice"), server.signup("bob"));
    let wid = server.workspace(&alice, &[&bob]);
    let cid = server.channel(&wid, &alice, "general", &[&bob]);
    let mut raw = Raw::session(&server, &bob).await;
    raw.ping("live").await;
    let before = server.metric("chorus_quic_datagrams_forwarded_total");
    let poster = {
        let (base, token, cid) = (server.base_url(), alice.token.clone(), cid.clone());
        std::thread::spawn(move || {
            let agent = ureq::agent();
            for i in 0..MESSAGES {
                agent
                    .post(&format!("{base}/api/v1/channels/{cid}/messages"))
                    .set("Authorization", &format!("Bearer {token}"))
                    .send_string(&json!({"text": format!("m{i}")}).to_string())
                    .expect("post");
            }
        })
    };
    let mut texts = Vec::new();
    let mut rebinds = 0;
    let mut last_seq = 0;
    while texts.len() < MESSAGES {
        let v = raw.recv().await.expect("an event");
        assert_ne!(v["type"], "hello", "the session started over");
        if v["type"] != "event" {
            continue;
        }
        let seq = v["seq"].as_u64().unwrap();
        assert!(seq > last_seq, "out of order: {seq} after {last_seq}");
        last_seq = seq;
        texts.push(v["event"]["message"]["text"].as_str().unwrap().to_owned());
        // Move to a new port every 25 messages until the server has forwarded between
        // shards (each move lands on the other shard half the time).
        let forwarded = server.metric("chorus_quic_datagrams_forwarded_total") > before;
        if texts.len() % 25 == 0 && !forwarded && rebinds < REBINDS_MAX {
            let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            raw.endpoint.rebind(socket).expect("rebind");
            rebinds += 1;
        }
    }
    poster.join().unwrap();
    let want: Vec<String> = (0..MESSAGES).map(|i| format!("m{i}")).collect();
    assert_eq!(texts, want);
    assert!(rebinds >= 1);
    assert!(
        server.metric("chorus_quic_datagrams_forwarded_total") > before,
        "{rebinds} moves and no datagram forwarded between shards"
    );
    assert_eq!(
        raw.connection.close_reason(),
        None,
        "the connection is still up"
    );
    raw.ping("still the same session").await;
}

// Bad input gets a clear error or close, and the server keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_answered() {
    let config = format!("{UNLIMITED}ws_frame_bytes_max = 65536\n");
    let server = Server::start(&config);
    let alice = server.signup("alice");

    // A garbage length prefix, over any limit: 1009 before its bytes are read.
    let mut raw = Raw::connect(&server).await;
    raw.send_bytes(&[0xff, 0xff, 0xff, 0xff, b'{']).await;
    assert_eq!(raw.until_closed().await.0, Ended::Closed(1009));

    // A frame before auth: an error naming the problem, then 4001.
    let mut raw = Raw::connect(&server).await;
    raw.send(&json!({"type": "ping", "ref": 1})).await;
    let (end, seen) = raw.until_closed().await;
    assert_eq!(end, Ended::Closed(4001));
    assert_eq!(seen[0]["code"], "unauthorized", "{seen:?}");

    // A bad token: the same.
    let mut raw = Raw::connect(&server).await;
    raw.send(&json!({"type": "auth", "token": "not.a.token"}))
        .await;
    let (end, seen) = raw.until_closed().await;
    assert_eq!(end, Ended::Closed(4001));
    assert_eq!(seen[0]["code"], "unauthorized", "{seen:?}");

    // A second bidirectional stream is refused (reset with 1002); the session goes on.
    let mut raw = Raw::session(&server, &alice).await;
    let (mut send2, mut recv2) = raw.connection.open_bi().await.unwrap();
    send2.write_all(&[0, 0, 0, 2, b'{', b'}']).await.ok();
    let refused = tokio::time::timeout(WAIT, recv2.read_to_end(1024))
        .await
        .unwrap();
    match refused {
        Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code))) => {
            assert_eq!(code.into_inner(), 1002)
        }
        other => panic!("the second stream was not refused: {other:?}"),
    }
    raw.ping("first stream still up").await;

    // A frame that is not UTF-8 after auth: 1007; a frame over the limit: 1009.
    raw.send_bytes(&[0, 0, 0, 3, b'"', 0xff, b'"']).await;
    assert_eq!(raw.until_closed().await.0, Ended::Closed(1007));
    let mut raw = Raw::session(&server, &alice).await;
    raw.send_bytes(&70_000u32.to_be_bytes()).await;
    assert_eq!(raw.until_closed().await.0, Ended::Closed(1009));

    // Random datagrams at the port are dropped.
    let noise = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..1_000 {
        let len = 1 + (i * 37) % 1400;
        let datagram: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        noise.send_to(&datagram, &server.quic_addr).unwrap();
    }

    // Through all of it the server kept serving, over QUIC and HTTP.
    let mut raw = Raw::session(&server, &alice).await;
    raw.ping("after the noise").await;
    assert_eq!(server.call("GET", "/healthz", None, None).status, 200);
}

// A client that authenticates and then never reads does not hold the server back: others
// are served while messages pile up for it, and the server's memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_reads() {
    let server = Server::start(UNLIMITED);
    let (alice, bob) = (server.signup("alice"), server.signup("bob"));
    let wid = server.workspace(&alice, &[&bob]);
    let cid = server.channel(&wid, &alice, "general", &[&bob]);
    let _deaf = Raw::session(&server, &bob).await;
    let rss_before = server.rss_kib();
    let text = "x".repeat(2_000);
    for _ in 0..2_000 {
        server.post(&alice, &cid, &text);
    }
    let mut listener = Raw::session(&server, &alice).await;
    listener.ping("served").await;
    let grown = server.rss_kib().saturating_sub(rss_before);
    assert!(
        grown < 64 * 1024,
        "RSS grew {grown} KiB for a client that never reads"
    );
}

// SIGTERM ends every QUIC session with 1001 after its stream is finished, and the server
// exits 0 within the drain: a draining shard keeps reading its socket, so the sessions'
// last acknowledgements still reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_closes_quic_sessions_with_going_away() {
    let server = Server::start(UNLIMITED);
    let alice = server.signup("alice");
    let mut sessions = Vec::new();
    for i in 0..20 {
        let mut raw = Raw::session(&server, &alice).await;
        raw.ping(&format!("up {i}")).await;
        sessions.push(raw);
    }
    let terminated = tokio::task::spawn_blocking(move || {
        let mut server = server;
        server.terminate()
    });
    for raw in &mut sessions {
        let (end, _) = raw.until_closed().await;
        assert_eq!(end, Ended::Closed(1001));
    }
    let status = terminated.await.expect("the drain");
    assert!(status.success(), "{status:?}");
}

// Presence over QUIC: the same session core watches, coalesces and sends `presence`
// frames as over the WebSocket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_over_quic() {
    let server = Server::start(&format!("{UNLIMITED}presence_flush_ms = 50\n"));
    let (alice, bob) = (server.signup("alice"), server.signup("bob"));
    server.workspace(&alice, &[&bob]);
    let mut raw = Raw::session(&server, &alice).await;
    let sub = json!({"type": "presence:sub", "ref": "s", "user_ids": [bob.id]});
    raw.send(&sub).await;
    let ack = raw.recv_type("ack").await;
    assert_eq!(ack["users"][&bob.id]["status"], "offline", "{ack}");
    let (mut ws, _) = tokio::task::block_in_place(|| server.connect(&bob));
    let online = raw.recv_type("presence").await;
    assert_eq!(online["users"][&bob.id]["status"], "online", "{online}");
    tokio::task::block_in_place(|| ws.send(json!({"type": "activity", "state": "idle"})));
    let away = raw.recv_type("presence").await;
    assert_eq!(away["users"][&bob.id]["status"], "away", "{away}");
    raw.endpoint.close(0u32.into(), b"done");
}

// read:mark over QUIC runs through the same session core as over the WebSocket: it is
// acknowledged with the read state, the marker change reaches the user's connections on
// both transports as a `read` frame, and bad input is answered with an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_mark_over_quic() {
    let server = Server::start(UNLIMITED);
    let (alice, bob) = (server.signup("alice"), server.signup("bob"));
    let wid = server.workspace(&alice, &[&bob]);
    let cid = server.channel(&wid, &alice, "general", &[&bob]);
    server.post(&bob, &cid, "one");
    server.post(&bob, &cid, "two");
    let mut quic = Raw::session(&server, &alice).await;
    quic.ping("q").await;
    let (mut ws, _) = server.connect(&alice);
    ws.ping("w");
    let mark = json!({"type": "read:mark", "ref": "m1", "channel_id": cid, "seq": 3});
    quic.send(&mark).await;
    // The ack and the `read` frame come in either order.
    let (mut ack, mut read) = (None, None);
    while ack.is_none() || read.is_none() {
        let v = quic.recv().await.expect("a frame");
        match v["type"].as_str() {
            Some("ack") => ack = Some(v),
            Some("read") => read = Some(v),
            _ => {}
        }
    }
    let (ack, read) = (ack.unwrap(), read.unwrap());
    assert_eq!(ack["ref"], "m1");
    let counts = (&ack["read"]["read_seq"], &ack["read"]["unread_count"]);
    assert_eq!(counts, (&json!(3), &json!(1)));
    assert_eq!(read["read"], ack["read"]);
    assert_eq!(ws.recv_type("read")["read"], ack["read"]);
    let above = json!({"type": "read:mark", "ref": "m2", "channel_id": cid, "seq": 99});
    quic.send(&above).await;
    let e = quic.recv_type("error").await;
    assert_eq!(
        (e["ref"].clone(), e["code"].clone()),
        (json!("m2"), json!("invalid_request"))
    );
    quic.ping("still").await;
}

/// Waits until `chorus_connections_open` reads `want`. Each scrape is an HTTP connection
/// of its own, counted while open (so the gauge reads at least 1), and the server counts
/// an earlier request's connection until it has seen it close, a moment after the answer:
/// one read may be above what the test means.
async fn connections_open_reach(server: &Server, want: f64) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let now = server.metric("chorus_connections_open");
        if now == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "chorus_connections_open stayed at {now}, not {want}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

// `chorus_connections_open` counts a QUIC session while its connection is open: it rises
// with each session and falls back to where it was once each closed, whether the client
// closed it or the server did, never below.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_sessions_are_counted_while_open() {
    let server = Server::start(UNLIMITED);
    let alice = server.signup("alice");
    let open = || server.metric("chorus_connections_open");
    // Nothing open but the scrape itself, once the signup's connection is seen closed.
    let base = 1.0;
    connections_open_reach(&server, base).await;
    let mut a = Raw::session(&server, &alice).await;
    let mut b = Raw::session(&server, &alice).await;
    a.ping("a").await;
    b.ping("b").await;
    connections_open_reach(&server, base + 2.0).await;

    a.connection.close(0u32.into(), b"bye");
    let mut c = Raw::connect(&server).await;
    c.send(&json!({"type": "ping", "ref": 1})).await;
    assert_eq!(c.until_closed().await.0, Ended::Closed(4001));
    b.connection.close(0u32.into(), b"bye");

    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let now = open();
        assert!(
            now >= base,
            "the gauge fell below its start: {now} < {base}"
        );
        if now == base {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} sessions still counted after every one closed",
            now - base
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Once their connections drained, their packets are counted.
    let deadline = std::time::Instant::now() + WAIT;
    while server.metric("chorus_quic_packets_sent_total") == 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no QUIC packets counted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(server.metric("chorus_quic_packets_lost_total"), 0.0);
}

/// `name` signed up on `device`: its token is bound to the device (`API.md` §14).
fn signup_on_device(server: &Server, name: &str, device: &str) -> User {
    let email = format!("{name}@example.com");
    let body =
        json!({"email": email, "password": common::PASSWORD, "name": name, "device_id": device});
    let r = server.call("POST", "/api/v1/auth/signup", None, Some(body));
    assert_eq!(r.status, 201, "{}", r.text);
    User {
        id: common::str_of(&r.body["user"]["id"]),
        email,
        token: common::str_of(&r.body["token"]),
    }
}

// A QUIC session opened with a device's token gets the device's to-device messages,
// acknowledges them with `to_device:ack`, and is closed with 4001 when the device is
// removed: the same session core as the WebSocket's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn to_device_over_quic() {
    let server = Server::start(UNLIMITED);
    let alice = signup_on_device(&server, "alice", "phone");
    let bob = signup_on_device(&server, "bob", "laptop");
    server.workspace(&alice, &[&bob]);
    let mut quic = Raw::session(&server, &bob).await;
    let messages = json!({"messages": {bob.id.clone(): {"laptop": {"hello": "quic"}}}});
    let r = server.call(
        "PUT",
        "/api/v1/e2ee/to-device/t1",
        Some(&alice.token),
        Some(messages),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    let frame = quic.recv_type("to_device").await;
    assert_eq!(
        (frame["id"].clone(), frame["content"].clone()),
        (json!("1"), json!({"hello": "quic"}))
    );
    quic.send(&json!({"type": "to_device:ack", "upto_id": "1", "ref": "a"}))
        .await;
    assert_eq!(quic.recv_type("ack").await["ref"], "a");
    let left = server.call("GET", "/api/v1/e2ee/to-device", Some(&bob.token), None);
    assert_eq!(left.body["messages"], json!([]), "acknowledged over QUIC");
    let r = server.call(
        "DELETE",
        "/api/v1/e2ee/devices/laptop",
        Some(&bob.token),
        None,
    );
    assert_eq!(r.status, 204);
    let (end, _) = quic.until_closed().await;
    assert!(matches!(end, Ended::Closed(4001)), "{end:?}");
}
