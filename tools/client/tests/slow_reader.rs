//! A stream whose application reads no events, against a scripted server on a real socket:
//! its event queue overflows and the server cuts it off with 4000, and still a message sent
//! meanwhile is written on a new connection and answered. Sending never waits for the
//! application to read.

mod common;

use chorus_client::ConnectOptions;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// The application's event queue.
const QUEUE: usize = 4;
/// Events the server sends before it cuts the stream off: far more than [`QUEUE`].
const EVENTS: u64 = 20;
/// How long a send may take to be answered; the stream's first reconnection comes after a
/// backoff of well under a second.
const ANSWER_WAIT: Duration = Duration::from_secs(10);
const CHANNEL: &str = "C1";

type Ws = WebSocketStream<tokio::net::TcpStream>;

fn message(seq: u64, text: &str) -> Value {
    json!({"id": format!("M{seq}"), "channel_id": CHANNEL, "seq": seq, "user_id": "U2",
        "text": text, "created_at": "2026-12-02T00:00:00Z"})
}

async fn accept(listener: &TcpListener) -> Ws {
    let (tcp, _) = listener.accept().await.expect("accept");
    tokio_tungstenite::accept_async(tcp).await.expect("upgrade")
}

/// The next text frame from the client, as JSON.
async fn next_text(ws: &mut Ws) -> Value {
    loop {
        match ws.next().await.expect("a frame").expect("a readable frame") {
            Message::Text(t) => return serde_json::from_str(t.as_str()).expect("JSON"),
            Message::Close(c) => panic!("the client closed: {c:?}"),
            _ => {}
        }
    }
}

async fn hello(ws: &mut Ws) {
    let hello = r#"{"type":"hello","conn_id":"c","user_id":"U1","heartbeat_interval":30}"#;
    ws.send(Message::text(hello)).await.expect("hello");
}

/// First connection: `hello`, [`EVENTS`] events, then close 4000 ("resume required", as
/// the server cuts off a slow consumer); `cut` fires then. Second connection: answers the
/// first `message:send` with its `ack`. Returns the second connection's `resume` frame and
/// the connection itself, kept open.
async fn script(listener: TcpListener, cut: oneshot::Sender<()>) -> (Value, Ws) {
    let mut first = accept(&listener).await;
    next_text(&mut first).await;
    hello(&mut first).await;
    for seq in 1..=EVENTS {
        let event = json!({"type": "event", "channel_id": CHANNEL, "seq": seq,
            "event": {"type": "message:new", "message": message(seq, "hi")}});
        first
            .send(Message::text(event.to_string()))
            .await
            .expect("event");
    }
    let close = CloseFrame {
        code: CloseCode::from(4000),
        reason: "resume required".into(),
    };
    first
        .send(Message::Close(Some(close)))
        .await
        .expect("close");
    let _ = cut.send(());
    let mut second = accept(&listener).await;
    let resume = next_text(&mut second).await;
    hello(&mut second).await;
    loop {
        let frame = next_text(&mut second).await;
        if frame["type"] == "message:send" {
            let ack = json!({"type": "ack", "ref": frame["ref"],
                "message": message(EVENTS + 1, frame["text"].as_str().expect("text"))});
            second
                .send(Message::text(ack.to_string()))
                .await
                .expect("ack");
            return (resume, second);
        }
    }
}

// The application reads nothing: its queue overflows, the server cuts the stream off, and a
// message sent then is still written on the next connection and acknowledged. The resume
// of that connection starts after the last event the queue took.
#[tokio::test]
async fn a_reader_that_reads_nothing_can_still_send() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (cut_tx, cut_rx) = oneshot::channel();
    let server = tokio::spawn(script(listener, cut_tx));
    let session = common::session_at(addr);
    let options = ConnectOptions {
        since: Some(HashMap::from([(CHANNEL.to_owned(), 0)])),
        event_queue_max: QUEUE,
        ..ConnectOptions::default()
    };
    let mut stream = session.connect(options).await.expect("connect");
    cut_rx.await.expect("the server cut the stream off");
    let sent = tokio::time::timeout(ANSWER_WAIT, stream.send(CHANNEL, "later", "k1"))
        .await
        .expect("the send waited for the application to read its events")
        .expect("the send was answered");
    assert_eq!(sent.text, "later");
    let (resume, _second) = server.await.expect("server");
    assert_eq!(resume["type"], "resume");
    assert_eq!(resume["since"][CHANNEL], json!(QUEUE), "{resume}");
    assert_eq!(stream.stats().queue_overflows, 1);
    for seq in 1..=QUEUE as u64 {
        let event = stream.next_event().await.expect("a queued event");
        assert_eq!(event.seq, seq);
    }
}
