//! The client protocol of `API.md` §6–§7, independent of the transport: the frames a
//! client may send, parsed and checked into [`ClientFrame`]s, and the frames the server
//! builds. The WebSocket driver and the QUIC driver carry the same frames; QUIC frames
//! them with a 4-byte big-endian length ([`decode_length_prefixed`]).
//!
//! Everything here is a pure function of its input, which is what the fuzz targets call.

use crate::error::ApiError;
use bytes::Bytes;
use chorus_engine::domain::channel::{Content, Sealed};
use chorus_engine::ids::{ChannelId, MessageId, UserId};
use chorus_engine::presence::{OwnPresence, Presence, WatchOp, PRESENCE_WATCH_MAX};
use chorus_engine::view::{rfc3339, Rfc3339};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::HashMap;

/// The largest frame the length-prefixed (QUIC) form admits, whatever the configured
/// limit: the prefix is read before the frame, so this bounds what a peer can make the
/// server wait for.
pub const LENGTH_PREFIXED_FRAME_BYTES_MAX: usize = 16 * 1024 * 1024;

// ---------------------------------------------------------------------------------------
// Client frames
// ---------------------------------------------------------------------------------------

/// A frame the client may send, parsed and checked.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientFrame {
    /// `ping`: answered with `pong`.
    Ping,
    /// A resume: the channels to resume, and the IDs named that do not parse, which are
    /// reported and skipped rather than failing the whole frame.
    Resume {
        /// The channels and the last seq the client has of each.
        since: Vec<(ChannelId, u64)>,
        /// IDs that do not parse, at most 64 characters of each.
        unknown: Vec<String>,
    },
    /// `typing:start` in a channel.
    Typing(ChannelId),
    /// `read:mark`: move the caller's read marker in a channel forward to `seq`.
    MarkRead {
        /// The channel.
        channel: ChannelId,
        /// The highest seq read.
        seq: u64,
    },
    /// A change to a channel, answered with `ack` once durable.
    Command(Command),
    /// `presence:sub`: change the set of users whose presence the connection watches.
    PresenceSub {
        /// How the set changes.
        op: WatchOp,
        /// The users named, at most [`PRESENCE_WATCH_MAX`].
        users: Vec<UserId>,
    },
    /// `activity`: the person became active (`true`) or idle.
    Activity(bool),
    /// `to_device:ack`: the connection's device acknowledges its to-device messages up to
    /// an ID (`API.md` §14).
    ToDeviceAck {
        /// The last ID acknowledged.
        upto: u64,
    },
}

/// A request that changes a channel: rate limited, answered with an `ack`.
#[derive(Debug, Clone, PartialEq)]
#[allow(missing_docs)] // The variants are the frames of API.md §6, field for field.
pub enum Command {
    Send {
        channel: ChannelId,
        content: Content,
        client_msg_id: Option<String>,
        thread: Option<MessageId>,
        files: Vec<chorus_engine::ids::FileId>,
    },
    Edit {
        message: MessageId,
        content: Content,
    },
    Delete {
        message: MessageId,
    },
    React {
        message: MessageId,
        emoji: String,
        add: bool,
    },
}

#[derive(Deserialize)]
struct SendFields {
    channel_id: String,
    #[serde(flatten)]
    content: crate::protocol::ContentFields,
    #[serde(default)]
    client_msg_id: Option<String>,
    #[serde(default)]
    thread_id: Option<String>,
    #[serde(default)]
    file_ids: Vec<String>,
}

#[derive(Deserialize)]
struct EditFields {
    channel_id: String,
    message_id: String,
    #[serde(flatten)]
    content: crate::protocol::ContentFields,
}

#[derive(Deserialize)]
struct TargetFields {
    channel_id: String,
    message_id: String,
}

#[derive(Deserialize)]
struct ReactFields {
    channel_id: String,
    message_id: String,
    emoji: String,
}

#[derive(Deserialize)]
struct TypingFields {
    channel_id: String,
}

#[derive(Deserialize)]
struct PresenceSubFields {
    user_ids: Vec<String>,
    #[serde(default)]
    op: Option<String>,
}

#[derive(Deserialize)]
struct ActivityFields {
    state: String,
}

#[derive(Deserialize)]
struct MarkReadFields {
    channel_id: String,
    seq: u64,
}

#[derive(Deserialize)]
struct ToDeviceAckFields {
    upto_id: String,
}

#[derive(Deserialize)]
struct ResumeFields {
    since: HashMap<String, u64>,
}

/// Parses a text frame into the `ref` to echo and the frame, or the error to answer.
pub fn parse_frame(text: &str) -> (Value, Result<ClientFrame, ApiError>) {
    if !crate::json::depth_within(text.as_bytes(), crate::json::JSON_DEPTH_MAX) {
        return (Value::Null, Err(crate::api::too_deep()));
    }
    let mut object = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(object)) => object,
        Ok(_) => return (Value::Null, Err(bad_json("a frame must be a JSON object"))),
        Err(e) => return (Value::Null, Err(bad_json(format!("malformed JSON: {e}")))),
    };
    let reference = match object.remove("ref") {
        None | Some(Value::Null) => Value::Null,
        Some(r @ (Value::String(_) | Value::Number(_))) => r,
        Some(_) => {
            let e = ApiError::invalid("ref must be a string or a number");
            return (Value::Null, Err(e));
        }
    };
    let kind = match object.remove("type") {
        Some(Value::String(kind)) => kind,
        Some(_) => return (reference, Err(ApiError::invalid("type must be a string"))),
        None => return (reference, Err(ApiError::invalid("a frame needs a type"))),
    };
    let frame = frame_of(&kind, object);
    (reference, frame)
}

fn frame_of(kind: &str, object: Map<String, Value>) -> Result<ClientFrame, ApiError> {
    let frame = match kind {
        "ping" => ClientFrame::Ping,
        "resume" => {
            let f: ResumeFields = fields(object)?;
            let mut since = Vec::with_capacity(f.since.len());
            let mut unknown = Vec::new();
            for (c, seq) in f.since {
                match c.parse::<ChannelId>() {
                    Ok(id) => since.push((id, seq)),
                    Err(_) => unknown.push(c.chars().take(64).collect()),
                }
            }
            // In channel order, not the hash map's: the engine asks for catch-ups in this
            // order, and a simulated run must replay exactly.
            since.sort_unstable();
            unknown.sort();
            ClientFrame::Resume { since, unknown }
        }
        "typing:start" => {
            let f: TypingFields = fields(object)?;
            ClientFrame::Typing(parse_id(&f.channel_id, "channel")?)
        }
        "to_device:ack" => {
            let f: ToDeviceAckFields = fields(object)?;
            let upto = (f.upto_id.parse())
                .map_err(|_| ApiError::invalid("upto_id is a to-device message ID"))?;
            ClientFrame::ToDeviceAck { upto }
        }
        "read:mark" => {
            let f: MarkReadFields = fields(object)?;
            ClientFrame::MarkRead {
                channel: parse_id(&f.channel_id, "channel")?,
                seq: f.seq,
            }
        }
        "message:send" => {
            let f: SendFields = fields(object)?;
            let channel = parse_id(&f.channel_id, "channel")?;
            let thread = f.thread_id.map(|t| message_in(&t, channel)).transpose()?;
            ClientFrame::Command(Command::Send {
                channel,
                content: f.content.content()?,
                client_msg_id: f.client_msg_id,
                thread,
                files: file_ids(&f.file_ids)?,
            })
        }
        "message:edit" => {
            let f: EditFields = fields(object)?;
            let message = target(&f.channel_id, &f.message_id)?;
            ClientFrame::Command(Command::Edit {
                message,
                content: f.content.content()?,
            })
        }
        "message:delete" => {
            let f: TargetFields = fields(object)?;
            let message = target(&f.channel_id, &f.message_id)?;
            ClientFrame::Command(Command::Delete { message })
        }
        "reaction:add" | "reaction:remove" => {
            let f: ReactFields = fields(object)?;
            let message = target(&f.channel_id, &f.message_id)?;
            ClientFrame::Command(Command::React {
                message,
                emoji: f.emoji,
                add: kind == "reaction:add",
            })
        }
        "presence:sub" => {
            let f: PresenceSubFields = fields(object)?;
            let op = match f.op.as_deref() {
                None | Some("set") => WatchOp::Set,
                Some("add") => WatchOp::Add,
                Some("remove") => WatchOp::Remove,
                Some(_) => return Err(ApiError::invalid("op must be set, add or remove")),
            };
            if f.user_ids.len() > PRESENCE_WATCH_MAX {
                return Err(too_many_watched(f.user_ids.len()));
            }
            let users = f
                .user_ids
                .iter()
                .map(|u| parse_id(u, "user"))
                .collect::<Result<Vec<UserId>, _>>()?;
            ClientFrame::PresenceSub { op, users }
        }
        "activity" => {
            let f: ActivityFields = fields(object)?;
            match f.state.as_str() {
                "active" => ClientFrame::Activity(true),
                "idle" => ClientFrame::Activity(false),
                _ => return Err(ApiError::invalid("state must be active or idle")),
            }
        }
        other => {
            let shown: String = other.chars().take(64).collect();
            return Err(ApiError::new(
                400,
                "unknown_type",
                format!("unknown frame type {shown:?}"),
            ));
        }
    };
    Ok(frame)
}

/// The error for a `presence:sub` naming more users than a connection may watch.
pub fn too_many_watched(count: usize) -> ApiError {
    ApiError::new(
        400,
        "too_many",
        format!("a connection watches at most {PRESENCE_WATCH_MAX} users, not {count}"),
    )
}

fn fields<T: DeserializeOwned>(object: Map<String, Value>) -> Result<T, ApiError> {
    serde_json::from_value(Value::Object(object)).map_err(|e| ApiError::invalid(e.to_string()))
}

fn bad_json(message: impl Into<String>) -> ApiError {
    ApiError::bad_json(message)
}

/// An ID from a frame, a path or a body: one that does not parse names nothing, so it is
/// not found, like an unknown ID and like an ID of another workspace.
pub(crate) fn parse_id<T: std::str::FromStr>(s: &str, what: &str) -> Result<T, ApiError> {
    s.parse().map_err(|_| ApiError::not_found(what))
}

/// The `file_ids` of a post, REST or WebSocket alike: at most
/// [`chorus_engine::domain::FILES_PER_MESSAGE_MAX`] (400 `too_many` before any is parsed), and
/// an ID that does not parse is unknown (404), like a file of someone else.
pub(crate) fn file_ids(ids: &[String]) -> Result<Vec<chorus_engine::ids::FileId>, ApiError> {
    let max = chorus_engine::domain::FILES_PER_MESSAGE_MAX;
    if ids.len() > max {
        return Err(chorus_engine::domain::DomainError::TooMany(format!(
            "a message carries at most {max} files"
        ))
        .into());
    }
    ids.iter().map(|f| parse_id(f, "file")).collect()
}

/// A post's or an edit's content, REST or WebSocket alike: `text`, or `ciphertext` with the
/// `devices_seq` it was encrypted for (`API.md` §14). Which one the channel takes is its
/// decision; both at once fit no channel (400 `encryption_mismatch`).
#[derive(Deserialize)]
pub(crate) struct ContentFields {
    #[serde(default, deserialize_with = "crate::json::given_string")]
    text: Option<String>,
    #[serde(default, deserialize_with = "crate::json::given_string")]
    ciphertext: Option<String>,
    #[serde(default)]
    devices_seq: Option<u64>,
}

impl ContentFields {
    /// The content the fields give.
    pub(crate) fn content(self) -> Result<Content, ApiError> {
        match self.ciphertext {
            None => Ok(Content::Text(self.text.unwrap_or_default())),
            Some(_) if self.text.as_deref().is_some_and(|t| !t.is_empty()) => {
                Err(chorus_engine::domain::DomainError::EncryptionMismatch(
                    "a message carries \"text\" or \"ciphertext\", never both".into(),
                )
                .into())
            }
            Some(ciphertext) => Ok(Content::Sealed(Box::new(Sealed {
                ciphertext,
                devices_seq: self.devices_seq,
            }))),
        }
    }
}

/// A message ID that must name a message of `channel`: the engine routes a message call by
/// the channel inside the ID, so one of another channel would reach past the named one.
pub(crate) fn message_in(s: &str, channel: ChannelId) -> Result<MessageId, ApiError> {
    let id: MessageId = parse_id(s, "message")?;
    if id.channel != channel {
        return Err(ApiError::not_found("message"));
    }
    Ok(id)
}

fn target(channel: &str, message: &str) -> Result<MessageId, ApiError> {
    message_in(message, parse_id(channel, "channel")?)
}

// ---------------------------------------------------------------------------------------
// Server frames
// ---------------------------------------------------------------------------------------

/// A JSON value as a frame.
pub fn encode(value: &Value) -> Bytes {
    chorus_engine::view::json(value).expect("a JSON value always serializes")
}

/// `{"type":"error","ref","code","message"}`, with `retry_after_ms` when rate limited.
pub fn error_frame(reference: &Value, e: &ApiError) -> Bytes {
    encode(&error_value(reference, e))
}

/// The `error` frame as a JSON value, for callers that add fields.
pub fn error_value(reference: &Value, e: &ApiError) -> Value {
    let mut frame = json!({
        "type": "error",
        "ref": reference,
        "code": e.code,
        "message": e.message,
    });
    if let Some(after) = e.retry_after {
        let ms = u64::try_from(after.as_millis()).unwrap_or(u64::MAX).max(1);
        frame["retry_after_ms"] = json!(ms);
    }
    frame
}

/// `hello`, the first frame of every session.
pub fn hello(conn_id: u64, user: chorus_engine::ids::UserId, heartbeat_interval_s: u64) -> Bytes {
    encode(&json!({
        "type": "hello",
        "conn_id": format!("{conn_id:016x}"),
        "user_id": user,
        "heartbeat_interval": heartbeat_interval_s,
    }))
}

/// `pong`, the answer to `ping`.
pub fn pong(reference: &Value) -> Bytes {
    encode(&json!({"type": "pong", "ref": reference}))
}

/// `ack` of a `read:mark`, with the caller's read state as it stands.
pub fn ack_read(reference: &Value, read: &chorus_engine::view::ReadView) -> Bytes {
    encode(&json!({"type": "ack", "ref": reference, "read": read}))
}

/// `ack` with a read marker already in JSON (a `read:mark` the leader answered).
pub fn ack_read_value(reference: &Value, read: &Value) -> Bytes {
    encode(&json!({"type": "ack", "ref": reference, "read": read}))
}

/// `ack`, with the message the command changed (`null` for deletions and reactions).
pub fn ack(reference: &Value, message: Option<&chorus_engine::view::MessageView>) -> Bytes {
    let frame = Ack {
        kind: "ack",
        reference,
        message,
    };
    chorus_engine::view::json(&frame).expect("an ack always serializes")
}

/// An `ack` written straight from its message (the engine's view, or the leader's JSON):
/// through a JSON value it took a map and a string for every field of the message, at
/// every send.
#[derive(Serialize)]
struct Ack<'a, M> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(rename = "ref")]
    reference: &'a Value,
    message: Option<&'a M>,
}

/// `ack` with a message already in JSON (a command the leader answered).
pub fn ack_value(reference: &Value, message: &Value) -> Bytes {
    let frame = Ack {
        kind: "ack",
        reference,
        message: Some(message),
    };
    chorus_engine::view::json(&frame).expect("an ack always serializes")
}

/// `presence`: `{"user_id","status","dnd_until","last_active_at"}`.
pub fn presence_value(user: UserId, p: &Presence) -> Value {
    serde_json::to_value(PresenceOut(user, p)).expect("a presence always serializes")
}

/// A user's own `presence`, with the `mode` they chose (`PUT /me/presence`).
pub fn own_presence_value(user: UserId, own: &OwnPresence) -> Value {
    let mut value = presence_value(user, &own.presence);
    value["mode"] = json!(own.mode.as_str());
    if own.presence.dnd_until_us.is_none() {
        value["dnd_until"] = json!(own.dnd_until_us.map(rfc3339));
    }
    value
}

/// A `presence` object serialized straight from the engine's record: the same fields as
/// [`presence_value`], with no intermediate JSON value (a frame of a hundred users would
/// otherwise allocate a map and its strings per user).
struct PresenceOut<'a>(UserId, &'a Presence);

impl Serialize for PresenceOut<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        let PresenceOut(user, p) = self;
        let mut map = s.serialize_map(Some(4))?;
        map.serialize_entry("user_id", user)?;
        map.serialize_entry("status", p.status.as_str())?;
        map.serialize_entry("dnd_until", &p.dnd_until_us.map(Rfc3339))?;
        map.serialize_entry("last_active_at", &p.last_active_us.map(Rfc3339))?;
        map.end()
    }
}

/// `{user_id: presence, ...}` of `users`, serialized as it is iterated.
struct PresenceMap<I>(std::cell::Cell<Option<I>>);

impl<'a, I: Iterator<Item = (&'a UserId, &'a Presence)>> Serialize for PresenceMap<I> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let users = self.0.take().into_iter().flatten();
        s.collect_map(users.map(|(u, p)| (u, PresenceOut(*u, p))))
    }
}

/// Serializes a frame of `type` with `ref` (if any) and `users`.
fn encode_presence<'a>(
    kind: &str,
    reference: Option<&Value>,
    users: impl IntoIterator<Item = (&'a UserId, &'a Presence)>,
) -> Bytes {
    #[derive(Serialize)]
    struct Frame<'r, M> {
        #[serde(rename = "type")]
        kind: &'r str,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'r Value>,
        users: M,
    }
    let frame = Frame {
        kind,
        reference,
        users: PresenceMap(std::cell::Cell::new(Some(users.into_iter()))),
    };
    chorus_engine::view::json(&frame).expect("a presence frame always serializes")
}

/// `ack {"ref","users":{user_id: presence}}`, the answer to `presence:sub`.
pub fn presence_ack<'a>(
    reference: &Value,
    users: impl IntoIterator<Item = (&'a UserId, &'a Presence)>,
) -> Bytes {
    encode_presence("ack", Some(reference), users)
}

/// `presence {"users":{user_id: presence}}`: the latest status of each user that changed.
pub fn presence_frame<'a>(users: impl IntoIterator<Item = (&'a UserId, &'a Presence)>) -> Bytes {
    encode_presence("presence", None, users)
}

// ---------------------------------------------------------------------------------------
// The length-prefixed form (QUIC)
// ---------------------------------------------------------------------------------------

/// Why a length-prefixed frame cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length prefix is over the limit; the stream cannot be trusted further.
    #[error("a frame of {0} bytes is over the limit")]
    TooLarge(usize),
    /// The frame is not UTF-8.
    #[error("a frame is not valid UTF-8")]
    InvalidUtf8,
}

/// Reads one frame from the front of `buf`: a 4-byte big-endian length, then that many
/// bytes of UTF-8 JSON. Returns the text and the bytes it took, or `None` while the frame
/// is incomplete. A length over `max` is refused before its bytes arrive.
pub fn decode_length_prefixed(buf: &[u8], max: usize) -> Result<Option<(&str, usize)>, FrameError> {
    let Some(prefix) = buf.first_chunk::<4>() else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(*prefix) as usize;
    if len > max.min(LENGTH_PREFIXED_FRAME_BYTES_MAX) {
        return Err(FrameError::TooLarge(len));
    }
    let Some(frame) = buf.get(4..4 + len) else {
        return Ok(None);
    };
    let text = std::str::from_utf8(frame).map_err(|_| FrameError::InvalidUtf8)?;
    Ok(Some((text, 4 + len)))
}

/// Writes `frame` in the length-prefixed form.
pub fn encode_length_prefixed(frame: &[u8], out: &mut Vec<u8>) {
    let len = u32::try_from(frame.len()).expect("frames are far below 4 GiB");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(frame);
}

#[cfg(test)]
mod tests {
    use super::*;

    // Presence frames and acks, written straight from the records, are the JSON of
    // API.md §10: each user's object under their id, times in RFC 3339, nulls kept.
    #[test]
    fn presence_frames_are_the_documented_json() {
        use chorus_engine::presence::Status;
        let (a, b) = (UserId(7), UserId(9));
        let pa = Presence {
            status: Status::Dnd,
            dnd_until_us: Some(1_700_000_000_000_000),
            last_active_us: Some(1_699_999_999_500_000),
        };
        let pb = Presence {
            status: Status::Offline,
            dnd_until_us: None,
            last_active_us: None,
        };
        let users = [(a, pa), (b, pb)];
        let frame: Value =
            serde_json::from_slice(&presence_frame(users.iter().map(|(u, p)| (u, p)))).unwrap();
        let expected_a = json!({"user_id": a, "status": "dnd",
            "dnd_until": "2023-11-14T22:13:20.000000Z",
            "last_active_at": "2023-11-14T22:13:19.500000Z"});
        let expected_b = json!({"user_id": b, "status": "offline", "dnd_until": null,
            "last_active_at": null});
        assert_eq!(
            frame,
            json!({"type": "presence", "users": {a.to_string(): expected_a.clone(),
                b.to_string(): expected_b.clone()}})
        );
        let ack: Value = serde_json::from_slice(&presence_ack(
            &json!("r1"),
            users.iter().map(|(u, p)| (u, p)),
        ))
        .unwrap();
        assert_eq!(
            ack,
            json!({"type": "ack", "ref": "r1", "users": {a.to_string(): expected_a,
                b.to_string(): expected_b}})
        );
        assert_eq!(presence_value(b, &pb)["status"], "offline");
    }

    // An ack written straight from the view is the JSON the value-built one was: every
    // field of the message, times in RFC 3339, and a null message for a command without one.
    #[test]
    fn acks_are_the_json_of_their_message() {
        use chorus_engine::domain::channel::{Message, StoredBody};
        use chorus_engine::view::MessageView;
        let m = Message {
            seq: 5,
            user: UserId(2),
            versions: vec![(StoredBody::Text("hi \"there\"".into()), 0)].into(),
            thread: Some(3),
            reply_count: 1,
            reactions: vec![("tada".into(), vec![UserId(2)])],
            edited_at: Some(2_500_000),
            deleted: false,
            created_at: 1_500_000,
            client_msg_id: Some("k".into()),
            files: Box::default(),
        };
        let view = MessageView::new(ChannelId(7), &m, "hi \"there\"");
        let reference = json!({"n": 1});
        let frame: Value = serde_json::from_slice(&ack(&reference, Some(&view))).unwrap();
        let expected = json!({"type": "ack", "ref": reference, "message": view});
        assert_eq!(frame, expected);
        assert_eq!(frame["message"]["edited_at"], "1970-01-01T00:00:02.500000Z");
        assert_eq!(frame["message"]["id"], "M7-5");
        let bare: Value = serde_json::from_slice(&ack(&json!("r"), None)).unwrap();
        assert_eq!(bare, json!({"type": "ack", "ref": "r", "message": null}));
    }

    fn code_of(text: &str) -> &'static str {
        match parse_frame(text).1 {
            Ok(f) => panic!("{text} parsed as {f:?}"),
            Err(e) => e.code,
        }
    }

    // Each kind of bad frame maps to its documented error code, and the ref is echoed when
    // it could be read.
    #[test]
    fn bad_frames_get_their_codes() {
        assert_eq!(code_of("{"), "invalid_json");
        assert_eq!(code_of("[1,2]"), "invalid_json");
        assert_eq!(code_of(r#"{"ref":1}"#), "invalid_request");
        assert_eq!(code_of(r#"{"type":7}"#), "invalid_request");
        assert_eq!(code_of(r#"{"type":"nope"}"#), "unknown_type");
        assert_eq!(
            code_of(r#"{"type":"message:send","text":"x"}"#),
            "invalid_request"
        );
        assert_eq!(
            code_of(r#"{"type":"message:send","channel_id":5,"text":"x"}"#),
            "invalid_request"
        );
        assert_eq!(
            code_of(r#"{"type":"message:send","channel_id":"C!","text":"x"}"#),
            "not_found"
        );
        assert_eq!(
            code_of(r#"{"type":"message:edit","channel_id":"C1","message_id":"M2-1","text":"x"}"#),
            "not_found"
        );
        assert_eq!(
            code_of(r#"{"type":"resume","since":{"C1":-1}}"#),
            "invalid_request"
        );
        let (reference, _) = parse_frame(r#"{"type":"nope","ref":"r1"}"#);
        assert_eq!(reference, json!("r1"));
    }

    // Good frames parse into what the session runs.
    #[test]
    fn good_frames_parse() {
        let c = ChannelId(9).to_string();
        let m = MessageId {
            channel: ChannelId(9),
            seq: 3,
        }
        .to_string();
        let send = json!({
            "type": "message:send", "ref": "a", "channel_id": c, "text": "hi",
            "client_msg_id": "k", "thread_id": m
        })
        .to_string();
        match parse_frame(&send).1 {
            Ok(ClientFrame::Command(Command::Send { thread, .. })) => {
                assert_eq!(thread.map(|t| t.seq), Some(3))
            }
            other => panic!("{other:?}"),
        }
        let resume = format!(r#"{{"type":"resume","since":{{"{c}":4}}}}"#);
        match parse_frame(&resume).1 {
            Ok(ClientFrame::Resume { since, unknown }) => {
                assert_eq!(since, vec![(ChannelId(9), 4)]);
                assert!(unknown.is_empty());
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_frame(r#"{"type":"ping"}"#).1,
            Ok(ClientFrame::Ping)
        ));
    }

    // Length-prefixed frames decode whole, wait for more when cut, and refuse oversized
    // lengths and invalid UTF-8.
    #[test]
    fn length_prefixed_frames() {
        let mut buf = Vec::new();
        encode_length_prefixed(br#"{"type":"ping"}"#, &mut buf);
        encode_length_prefixed(b"{}", &mut buf);
        let (first, used) = decode_length_prefixed(&buf, 1024).unwrap().unwrap();
        assert_eq!(first, r#"{"type":"ping"}"#);
        let (second, used2) = decode_length_prefixed(&buf[used..], 1024).unwrap().unwrap();
        assert_eq!((second, used + used2), ("{}", buf.len()));
        for cut in 0..used {
            assert_eq!(decode_length_prefixed(&buf[..cut], 1024), Ok(None));
        }
        assert_eq!(
            decode_length_prefixed(&[0, 0, 4, 1], 1024),
            Err(FrameError::TooLarge(1025))
        );
        assert_eq!(
            decode_length_prefixed(&[0, 0, 0, 1, 0xff], 1024),
            Err(FrameError::InvalidUtf8)
        );
    }

    // The error frame carries retry_after_ms only when rate limited.
    #[test]
    fn error_frame_shape() {
        let e = ApiError::rate_limited(std::time::Duration::from_millis(1500));
        let v: Value = serde_json::from_slice(&error_frame(&json!(3), &e)).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["ref"], 3);
        assert_eq!(v["code"], "rate_limited");
        assert_eq!(v["retry_after_ms"], 1500);
        let v: Value =
            serde_json::from_slice(&error_frame(&Value::Null, &ApiError::not_found("x"))).unwrap();
        assert!(v.get("retry_after_ms").is_none());
        assert!(v["ref"].is_null());
    }
}
