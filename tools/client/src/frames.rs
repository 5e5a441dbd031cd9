//! The WebSocket frames of `API.md`: the ones the server sends, parsed into one enum, and
//! the ones the client sends, written as JSON text.
//!
//! Frame types this SDK does not know are read as [`ServerFrame::Unknown`] and ignored, so a
//! newer server can add some.

use crate::types::ToDeviceMessage;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;

/// A frame from the server.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(tag = "type")]
pub(crate) enum ServerFrame {
    #[serde(rename = "hello")]
    Hello {
        #[serde(default)]
        user_id: Option<String>,
        heartbeat_interval: u64,
    },
    #[serde(rename = "event")]
    Event(EventFrame),
    #[serde(rename = "ack")]
    Ack {
        #[serde(rename = "ref", default)]
        reference: Value,
        #[serde(default)]
        message: Value,
    },
    #[serde(rename = "error")]
    Error {
        #[serde(rename = "ref", default)]
        reference: Value,
        code: String,
        #[serde(default)]
        message: String,
        #[serde(default)]
        retry_after_ms: Option<u64>,
    },
    #[serde(rename = "typing")]
    Typing { channel_id: String, user_id: String },
    #[serde(rename = "pong")]
    Pong {
        #[serde(rename = "ref", default)]
        reference: Value,
    },
    #[serde(rename = "resumed")]
    Resumed {
        #[serde(default)]
        channels: HashMap<String, u64>,
    },
    #[serde(rename = "to_device")]
    ToDevice(ToDeviceMessage),
    #[serde(rename = "e2ee:keys_low")]
    KeysLow { one_time_key_count: u64 },
    #[serde(other)]
    Unknown,
}

/// The fields of an `event` frame.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub(crate) struct EventFrame {
    pub channel_id: String,
    pub seq: u64,
    pub event: Value,
}

impl ServerFrame {
    /// Parses a text frame.
    pub fn parse(text: &str) -> Result<ServerFrame, serde_json::Error> {
        serde_json::from_str(text)
    }
}

/// The numeric `ref` of an answer, when it is one this client could have sent.
pub(crate) fn ref_of(reference: &Value) -> Option<u64> {
    reference.as_u64()
}

/// `resume` with the last seq of every channel the client knows.
pub(crate) fn resume(since: &HashMap<String, u64>) -> String {
    json!({"type": "resume", "since": since}).to_string()
}

/// `ping`, with a `ref` when the caller waits for its `pong`.
pub(crate) fn ping(reference: Option<u64>) -> String {
    match reference {
        Some(r) => json!({"type": "ping", "ref": r}).to_string(),
        None => json!({"type": "ping"}).to_string(),
    }
}

/// `typing:start`.
pub(crate) fn typing(channel_id: &str) -> String {
    json!({"type": "typing:start", "channel_id": channel_id}).to_string()
}

/// What a message says: a `text` in a plain channel, or a `ciphertext` with the
/// `devices_seq` it was encrypted for in an encrypted one (`API.md` §14). One serializer for
/// a REST body and a WebSocket frame alike.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Content {
    Text(String),
    Encrypted {
        ciphertext: String,
        devices_seq: u64,
    },
}

impl Content {
    /// The content of a message of an encrypted channel.
    pub fn encrypted(ciphertext: &str, devices_seq: u64) -> Content {
        Content::Encrypted {
            ciphertext: ciphertext.to_owned(),
            devices_seq,
        }
    }

    /// Writes the content's fields into a request body or frame.
    pub fn write_into(&self, body: &mut Value) {
        match self {
            Content::Text(text) => body["text"] = json!(text),
            Content::Encrypted {
                ciphertext,
                devices_seq,
            } => {
                body["ciphertext"] = json!(ciphertext);
                body["devices_seq"] = json!(devices_seq);
            }
        }
    }
}

/// A request the client sends and the server answers with `ack` or `error`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Request {
    Send {
        channel_id: String,
        content: Content,
        client_msg_id: String,
        thread_id: Option<String>,
    },
    Edit {
        channel_id: String,
        message_id: String,
        content: Content,
    },
    Delete {
        channel_id: String,
        message_id: String,
    },
    React {
        channel_id: String,
        message_id: String,
        emoji: String,
        add: bool,
    },
    Ping,
    /// `to_device:ack`: the connection's device acknowledges its to-device messages.
    AckToDevice {
        upto_id: String,
    },
}

impl Request {
    /// The frame, with its `ref`.
    pub fn frame(&self, reference: u64) -> String {
        let v = match self {
            Request::Send {
                channel_id,
                content,
                client_msg_id,
                thread_id,
            } => {
                let mut v = json!({"type": "message:send", "ref": reference,
                    "channel_id": channel_id, "client_msg_id": client_msg_id});
                content.write_into(&mut v);
                if let Some(t) = thread_id {
                    v["thread_id"] = json!(t);
                }
                v
            }
            Request::Edit {
                channel_id,
                message_id,
                content,
            } => {
                let mut v = json!({"type": "message:edit", "ref": reference,
                    "channel_id": channel_id, "message_id": message_id});
                content.write_into(&mut v);
                v
            }
            Request::Delete {
                channel_id,
                message_id,
            } => json!({"type": "message:delete", "ref": reference, "channel_id": channel_id,
                        "message_id": message_id}),
            Request::React {
                channel_id,
                message_id,
                emoji,
                add,
            } => {
                let kind = if *add {
                    "reaction:add"
                } else {
                    "reaction:remove"
                };
                json!({"type": kind, "ref": reference, "channel_id": channel_id,
                       "message_id": message_id, "emoji": emoji})
            }
            Request::Ping => return ping(Some(reference)),
            Request::AckToDevice { upto_id } => {
                json!({"type": "to_device:ack", "ref": reference, "upto_id": upto_id})
            }
        };
        v.to_string()
    }

    /// Whether sending it twice has the effect of sending it once, so that it may be sent
    /// again after a reconnection when its answer never came. A send is, through its
    /// `client_msg_id`; a ping has no effect; acknowledging up to an ID again changes
    /// nothing.
    pub fn repeatable(&self) -> bool {
        matches!(
            self,
            Request::Send { .. } | Request::Ping | Request::AckToDevice { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Each server frame of API.md parses into its variant, and an unknown type is tolerated.
    #[test]
    fn server_frames_parse() {
        let f = ServerFrame::parse(
            r#"{"type":"hello","conn_id":"x","user_id":"U1","heartbeat_interval":30}"#,
        )
        .unwrap();
        assert!(matches!(
            f,
            ServerFrame::Hello {
                heartbeat_interval: 30,
                ..
            }
        ));
        let f = ServerFrame::parse(
            r#"{"type":"event","channel_id":"C1","seq":4,"event":{"type":"member:joined"}}"#,
        )
        .unwrap();
        assert!(matches!(f, ServerFrame::Event(EventFrame { seq: 4, .. })));
        let f = ServerFrame::parse(
            r#"{"type":"error","ref":7,"code":"rate_limited","message":"m","retry_after_ms":20}"#,
        )
        .unwrap();
        assert_eq!(
            f,
            ServerFrame::Error {
                reference: json!(7),
                code: "rate_limited".into(),
                message: "m".into(),
                retry_after_ms: Some(20),
            }
        );
        let f = ServerFrame::parse(r#"{"type":"resumed","channels":{"C1":9}}"#).unwrap();
        assert_eq!(
            f,
            ServerFrame::Resumed {
                channels: HashMap::from([("C1".into(), 9)])
            }
        );
        let f = ServerFrame::parse(
            r#"{"type":"to_device","id":"3","sender_id":"U1","sender_device_id":"D1",
                "content":{"algorithm":"olm.v1"}}"#,
        )
        .unwrap();
        assert!(matches!(f, ServerFrame::ToDevice(ToDeviceMessage { ref id, .. }) if id == "3"));
        let f = ServerFrame::parse(r#"{"type":"e2ee:keys_low","one_time_key_count":9}"#).unwrap();
        assert_eq!(
            f,
            ServerFrame::KeysLow {
                one_time_key_count: 9
            }
        );
        let f = ServerFrame::parse(r#"{"type":"presence","x":1}"#).unwrap();
        assert_eq!(f, ServerFrame::Unknown);
        assert!(ServerFrame::parse("{").is_err());
    }

    // A send and a to-device acknowledgement carry every field API.md names, and only
    // sends, pings and acknowledgements may be repeated.
    #[test]
    fn client_frames() {
        let send = Request::Send {
            channel_id: "C1".into(),
            content: Content::Text("hi".into()),
            client_msg_id: "k".into(),
            thread_id: None,
        };
        let v: Value = serde_json::from_str(&send.frame(3)).unwrap();
        assert_eq!(
            v,
            json!({"type":"message:send","ref":3,"channel_id":"C1","text":"hi","client_msg_id":"k"})
        );
        assert!(send.repeatable());
        let sealed = Request::Send {
            channel_id: "C2".into(),
            content: Content::Encrypted {
                ciphertext: "{...}".into(),
                devices_seq: 7,
            },
            client_msg_id: "k".into(),
            thread_id: None,
        };
        let v: Value = serde_json::from_str(&sealed.frame(5)).unwrap();
        assert_eq!(
            v,
            json!({"type":"message:send","ref":5,"channel_id":"C2","ciphertext":"{...}",
                   "devices_seq":7,"client_msg_id":"k"})
        );
        let edit = Request::Edit {
            channel_id: "C2".into(),
            message_id: "M2-9".into(),
            content: Content::Encrypted {
                ciphertext: "{..}".into(),
                devices_seq: 8,
            },
        };
        let v: Value = serde_json::from_str(&edit.frame(6)).unwrap();
        assert_eq!(
            v,
            json!({"type":"message:edit","ref":6,"channel_id":"C2","message_id":"M2-9",
                   "ciphertext":"{..}","devices_seq":8})
        );
        let delete = Request::Delete {
            channel_id: "C1".into(),
            message_id: "M1-1".into(),
        };
        assert!(!delete.repeatable());
        let ack = Request::AckToDevice {
            upto_id: "42".into(),
        };
        let v: Value = serde_json::from_str(&ack.frame(4)).unwrap();
        assert_eq!(v, json!({"type":"to_device:ack","ref":4,"upto_id":"42"}));
        assert!(ack.repeatable());
        let v: Value = serde_json::from_str(&resume(&HashMap::from([("C1".into(), 5)]))).unwrap();
        assert_eq!(v, json!({"type":"resume","since":{"C1":5}}));
    }
}
