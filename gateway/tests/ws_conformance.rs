//! RFC 6455 conformance of the WebSocket endpoint, over raw frames against the real
//! binary: which violations fail the connection and with which close code, that nothing of
//! a broken message is ever acted on, and that the server closes TCP right after its close
//! frame when the client already closed or broke the protocol.

mod common;

use common::{Server, User, Ws, UNLIMITED};
use serde_json::{json, Value};
use std::io::Read;
use std::time::{Duration, Instant};
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::Frame;
use tungstenite::Message;

/// How soon after its close frame the server must have closed TCP.
const TCP_CLOSE_WITHIN: Duration = Duration::from_secs(1);

fn text_frame(bytes: &[u8], fin: bool) -> Frame {
    Frame::message(bytes.to_vec(), OpCode::Data(Data::Text), fin)
}

fn continuation(bytes: &[u8], fin: bool) -> Frame {
    Frame::message(bytes.to_vec(), OpCode::Data(Data::Continue), fin)
}

/// A control frame with any payload: tungstenite builds only well-formed ones, so a ping's
/// header is rewritten.
fn control(opcode: Control, payload: &[u8], fin: bool) -> Frame {
    let mut frame = Frame::ping(payload.to_vec());
    frame.header_mut().opcode = OpCode::Control(opcode);
    frame.header_mut().is_final = fin;
    frame
}

fn close_with_payload(payload: &[u8]) -> Frame {
    control(Control::Close, payload, true)
}

/// A `message:send` split into fragments at the given byte positions.
fn fragments(message: &[u8], cuts: &[usize]) -> Vec<Frame> {
    let mut bounds = vec![0];
    bounds.extend_from_slice(cuts);
    bounds.push(message.len());
    let n = bounds.len() - 1;
    (0..n)
        .map(|i| {
            let part = &message[bounds[i]..bounds[i + 1]];
            if i == 0 {
                text_frame(part, n == 1)
            } else {
                continuation(part, i == n - 1)
            }
        })
        .collect()
}

/// What the server did with the frames of one case.
#[derive(Debug)]
struct Outcome {
    /// The JSON frames after `hello`, up to the close frame.
    frames: Vec<Value>,
    /// The close code, or `None` when the connection stayed up.
    close: Option<u16>,
    /// Whether TCP was closed within [`TCP_CLOSE_WITHIN`] of the close frame.
    tcp_closed: bool,
}

/// Sends the frames, then a JSON `ping`; reads until its `pong` (the connection stayed up)
/// or a close frame, and then whether the server closes TCP.
fn run(ws: &mut Ws, frames: Vec<Frame>) -> Outcome {
    for frame in frames {
        // The server may already have failed the connection; later writes may then fail.
        if ws.socket.send(Message::Frame(frame)).is_err() {
            break;
        }
    }
    let _ = ws.socket.send(Message::text(
        json!({"type": "ping", "ref": "probe"}).to_string(),
    ));
    let mut frames = Vec::new();
    loop {
        match ws.socket.read() {
            Ok(Message::Text(t)) => {
                let v: Value = serde_json::from_str(&t).expect("JSON");
                if v["type"] == "pong" && v["ref"] == "probe" {
                    return Outcome {
                        frames,
                        close: None,
                        tcp_closed: false,
                    };
                }
                frames.push(v);
            }
            Ok(Message::Close(frame)) => {
                let close = Some(frame.map_or(1005, |f| u16::from(f.code)));
                let tcp_closed = reads_eof(ws);
                return Outcome {
                    frames,
                    close,
                    tcp_closed,
                };
            }
            Ok(_) => {}
            Err(e) => panic!("expected a frame or a close, got {e} after {frames:?}"),
        }
    }
}

/// Whether a raw read of the socket meets the end of the stream within
/// [`TCP_CLOSE_WITHIN`] (tungstenite's own reply to the close is never sent).
fn reads_eof(ws: &mut Ws) -> bool {
    let stream = ws.socket.get_mut();
    stream
        .set_read_timeout(Some(TCP_CLOSE_WITHIN))
        .expect("timeout");
    let start = Instant::now();
    let mut buf = [0u8; 256];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return start.elapsed() <= TCP_CLOSE_WITHIN,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

fn setup() -> (Server, User, String) {
    let server = Server::start(UNLIMITED);
    let alice = server.signup("alice");
    let wid = server.workspace(&alice, &[]);
    let cid = server.channel(&wid, &alice, "general", &[]);
    (server, alice, cid)
}

fn send_bytes(cid: &str, text: &[u8]) -> Vec<u8> {
    let mut m = format!(
        r#"{{"type":"message:send","ref":"r1","channel_id":"{cid}","client_msg_id":"k1","text":""#
    )
    .into_bytes();
    m.extend_from_slice(text);
    m.extend_from_slice(br#""}"#);
    m
}

// The exact attack from the report: a `message:send` in three fragments whose middle one
// is not UTF-8 fails the connection with 1007, gets no ack, and stores nothing.
#[test]
fn fragmented_invalid_utf8_fails_with_1007_and_stores_nothing() {
    let (server, alice, cid) = setup();
    let (mut ws, _) = server.connect(&alice);
    let head = format!(
        r#"{{"type":"message:send","ref":"r1","channel_id":"{cid}","client_msg_id":"k1","text":"pay 100"#
    );
    let frames = vec![
        text_frame(head.as_bytes(), false),
        continuation(b"\xff0", false),
        continuation(br#" euros"}"#, true),
    ];
    let outcome = run(&mut ws, frames);
    assert_eq!(outcome.close, Some(1007), "{outcome:?}");
    assert!(outcome.frames.is_empty(), "no ack or error: {outcome:?}");
    assert!(outcome.tcp_closed, "TCP stayed open: {outcome:?}");
    // Nothing of the message exists, under any spelling.
    let messages = server.messages(&alice, &cid);
    for m in &messages {
        let text = m["text"].as_str().unwrap_or_default();
        assert!(
            !text.contains("pay") && !text.contains("euros"),
            "stored {m}"
        );
    }
    // The channel's log holds only its creation: no event of the message either.
    let (mut again, _) = server.connect(&alice);
    again.ping("alive");
    assert!(messages.is_empty(), "{messages:?}");
}

/// One row of the conformance table.
struct Case {
    name: &'static str,
    frames: Vec<Frame>,
    /// The close code the server must send, or `None` if the connection must stay up.
    close: Option<u16>,
}

// Table: each violation gets the RFC's action and close code, and the server closes TCP
// right after its close frame; valid input split at awkward places is accepted.
#[test]
fn violations_get_the_rfc_close_codes() {
    let (server, alice, cid) = setup();
    let good = send_bytes(&cid, "caf\u{e9} \u{1f600}".as_bytes());
    // The byte position inside "é" (C3 A9) and inside the emoji (F0 9F 98 80).
    let e_acute = good.windows(2).position(|w| w == [0xc3, 0xa9]).unwrap() + 1;
    let emoji = good.windows(2).position(|w| w == [0xf0, 0x9f]).unwrap() + 2;
    let bad_single = send_bytes(&cid, b"x\xffy");
    let overlong = send_bytes(&cid, b"\xc0\xaf");
    let surrogate = send_bytes(&cid, b"\xed\xa0\x80");
    let truncated_at_end = good[..e_acute].to_vec();
    let mut reason_bad = 1000u16.to_be_bytes().to_vec();
    reason_bad.extend_from_slice(b"bye \xff");
    let mut rsv = text_frame(br#"{"type":"ping"}"#, true);
    rsv.header_mut().rsv1 = true;
    let cases = vec![
        Case {
            name: "valid UTF-8 split inside characters",
            frames: fragments(&good, &[e_acute, emoji]),
            close: None,
        },
        Case {
            name: "invalid UTF-8 in a single frame",
            frames: fragments(&bad_single, &[]),
            close: Some(1007),
        },
        Case {
            name: "overlong encoding",
            frames: fragments(&overlong, &[]),
            close: Some(1007),
        },
        Case {
            name: "UTF-16 surrogate",
            frames: fragments(&surrogate, &[]),
            close: Some(1007),
        },
        Case {
            name: "invalid UTF-8 in the first fragment",
            frames: fragments(&bad_single, &[bad_single.len() - 3]),
            close: Some(1007),
        },
        Case {
            name: "invalid UTF-8 in the middle fragment",
            frames: fragments(&bad_single, &[10, bad_single.len() - 3]),
            close: Some(1007),
        },
        Case {
            name: "invalid UTF-8 in the last fragment",
            frames: fragments(&bad_single, &[10]),
            close: Some(1007),
        },
        Case {
            name: "a character cut by a fragment boundary and never completed",
            frames: vec![
                text_frame(&good[..e_acute], false),
                continuation(b"A\"}", true),
            ],
            close: Some(1007),
        },
        Case {
            name: "a message that ends inside a character",
            frames: fragments(&truncated_at_end, &[5]),
            close: Some(1007),
        },
        Case {
            name: "close with an invalid UTF-8 reason",
            frames: vec![close_with_payload(&reason_bad)],
            close: Some(1007),
        },
        Case {
            name: "close with a 1-byte payload",
            frames: vec![close_with_payload(&[0x03])],
            close: Some(1002),
        },
        Case {
            name: "close with code 999",
            frames: vec![close_with_payload(&999u16.to_be_bytes())],
            close: Some(1002),
        },
        Case {
            name: "close with reserved code 1005",
            frames: vec![close_with_payload(&1005u16.to_be_bytes())],
            close: Some(1002),
        },
        Case {
            name: "close with code 5000",
            frames: vec![close_with_payload(&5000u16.to_be_bytes())],
            close: Some(1002),
        },
        Case {
            name: "close with a valid code is echoed",
            frames: vec![close_with_payload(&3000u16.to_be_bytes())],
            close: Some(3000),
        },
        Case {
            name: "an empty close is answered with an empty close",
            frames: vec![close_with_payload(&[])],
            close: Some(1005),
        },
        Case {
            name: "reserved bit set",
            frames: vec![rsv],
            close: Some(1002),
        },
        Case {
            name: "reserved opcode",
            frames: vec![Frame::message(
                b"x".to_vec(),
                OpCode::Data(Data::Reserved(3)),
                true,
            )],
            close: Some(1002),
        },
        Case {
            name: "continuation without a start",
            frames: vec![continuation(br#"{"type":"ping"}"#, true)],
            close: Some(1002),
        },
        Case {
            name: "a new message inside a fragmented one",
            frames: vec![text_frame(b"{", false), text_frame(b"}", true)],
            close: Some(1002),
        },
        Case {
            name: "fragmented ping",
            frames: vec![control(Control::Ping, b"x", false)],
            close: Some(1002),
        },
    ];
    for case in cases {
        let (mut ws, _) = server.connect(&alice);
        let outcome = run(&mut ws, case.frames);
        assert_eq!(outcome.close, case.close, "{}: {outcome:?}", case.name);
        match case.close {
            None => {
                let acked = outcome.frames.iter().any(|f| f["type"] == "ack");
                assert!(acked, "{}: {outcome:?}", case.name);
            }
            Some(_) => {
                assert!(outcome.tcp_closed, "{}: TCP stayed open", case.name);
                let answers: Vec<_> = outcome
                    .frames
                    .iter()
                    .filter(|f| f["type"] != "event")
                    .collect();
                assert!(answers.is_empty(), "{}: {answers:?}", case.name);
            }
        }
    }
    // Only the one valid message was stored, and the server still serves.
    let texts: Vec<_> = server
        .messages(&alice, &cid)
        .iter()
        .map(|m| m["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(texts, vec!["caf\u{e9} \u{1f600}"]);
    let (mut ws, _) = server.connect(&alice);
    ws.ping("still serving");
}

// After the client's close, nothing it sends is acted on: a JSON ping behind the close gets
// no pong, and the server answers the close and closes TCP.
#[test]
fn nothing_is_answered_after_the_clients_close() {
    let (server, alice, _) = setup();
    let (mut ws, _) = server.connect(&alice);
    let frames = vec![close_with_payload(&1000u16.to_be_bytes())];
    // `run` sends a ping after the frames: it must not be answered.
    let outcome = run(&mut ws, frames);
    assert_eq!(outcome.close, Some(1000), "{outcome:?}");
    assert!(outcome.frames.is_empty(), "{outcome:?}");
    assert!(outcome.tcp_closed, "{outcome:?}");
}
