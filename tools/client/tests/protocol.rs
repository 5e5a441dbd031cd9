//! The SDK's side of RFC 6455, against a scripted server on a real socket: a server frame
//! that breaks the WebSocket protocol fails the connection with the RFC's close code, as
//! the Chorus server does towards clients, and nothing of it reaches the application.

mod common;

use chorus_client::ConnectOptions;
use futures_util::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

/// How long the scripted server waits for the client's close frame.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Serves one WebSocket connection: `hello`, then `frame`; returns the close code the
/// client answers with (`None` if it closed without one).
async fn serve_once(listener: TcpListener, frame: Frame) -> Option<u16> {
    let (tcp, _) = listener.accept().await.expect("accept");
    let mut ws = tokio_tungstenite::accept_async(tcp).await.expect("upgrade");
    let hello = r#"{"type":"hello","conn_id":"c","user_id":"U1","heartbeat_interval":30}"#;
    ws.send(Message::text(hello)).await.expect("hello");
    ws.send(Message::Frame(frame)).await.expect("frame");
    let read = async {
        while let Some(message) = ws.next().await {
            match message {
                Ok(Message::Close(f)) => return f.map(|f| u16::from(f.code)),
                Ok(_) => continue,
                Err(e) => panic!("the client broke the connection without a close: {e}"),
            }
        }
        panic!("the client closed TCP without a close frame")
    };
    tokio::time::timeout(CLOSE_WAIT, read)
        .await
        .expect("the client never closed")
}

/// Connects a stream to the scripted server, which sends `frame` after `hello`.
async fn close_code_for(frame: Frame) -> Option<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(serve_once(listener, frame));
    let session = common::session_at(addr);
    let options = ConnectOptions {
        since: Some(HashMap::new()),
        ..ConnectOptions::default()
    };
    let stream = session.connect(options).await.expect("connect");
    let code = server.await.expect("server task");
    drop(stream);
    code
}

// A text frame of invalid UTF-8 from the server is answered with close 1007.
#[tokio::test]
async fn invalid_utf8_from_the_server_fails_with_1007() {
    let frame = Frame::message(
        b"{\"type\":\"pong\",\"x\":\"\xff\"}".to_vec(),
        OpCode::Data(Data::Text),
        true,
    );
    assert_eq!(close_code_for(frame).await, Some(1007));
}

// A frame with a reserved opcode from the server is answered with close 1002.
#[tokio::test]
async fn a_reserved_opcode_from_the_server_fails_with_1002() {
    let frame = Frame::message(b"x".to_vec(), OpCode::Data(Data::Reserved(3)), true);
    assert_eq!(close_code_for(frame).await, Some(1002));
}
