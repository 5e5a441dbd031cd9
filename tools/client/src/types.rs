//! The JSON shapes of `API.md` as Rust types: users, workspaces, members, channels,
//! messages and the pages they come in.
//!
//! Every type reads the fields the contract names and ignores any others, so that this SDK
//! keeps working against a newer server that adds fields. IDs stay the opaque strings the
//! server hands out; times stay RFC 3339 strings.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// `user`: an account.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// The user's ID.
    pub id: String,
    /// Login email.
    pub email: String,
    /// Display name.
    pub name: String,
}

/// `workspace`: a team with its own members and channels.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workspace {
    /// The workspace's ID.
    pub id: String,
    /// Its name.
    pub name: String,
}

/// `member`: a user of a workspace, with their role in it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The user's ID.
    pub id: String,
    /// Login email.
    pub email: String,
    /// Display name.
    pub name: String,
    /// `owner`, `admin` or `member`; empty when the server did not say.
    #[serde(default)]
    pub role: String,
}

/// What kind of channel a channel is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChannelKind {
    /// Anyone in the workspace can see and join it.
    Public,
    /// Members only; others cannot see it.
    Private,
    /// A direct conversation between two users.
    Dm,
    /// A direct conversation between more than two users.
    GroupDm,
    /// A kind this SDK does not know yet (a newer server).
    #[serde(other)]
    Unknown,
}

/// `channel`: a conversation, with the seq of its last event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Channel {
    /// The channel's ID.
    pub id: String,
    /// Its workspace.
    pub workspace_id: String,
    /// Its name; empty for DMs.
    pub name: String,
    /// Its kind.
    pub kind: ChannelKind,
    /// The seq of its last event when the server answered.
    pub last_seq: u64,
    /// Whether it is an end-to-end encrypted DM or group DM (`API.md` §14), whose messages
    /// carry a `ciphertext` instead of a `text`. `false` when the server does not say (an
    /// older server has no encrypted channels).
    #[serde(default)]
    pub encrypted: bool,
}

/// `message`, as it stands after the latest event that touched it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// The message's ID.
    pub id: String,
    /// Its channel.
    pub channel_id: String,
    /// The seq of the event that created it.
    pub seq: u64,
    /// The author.
    pub user_id: String,
    /// The current text; empty once deleted.
    pub text: String,
    /// The thread root, for a reply.
    #[serde(default)]
    pub thread_id: Option<String>,
    /// Replies, for a thread root.
    #[serde(default)]
    pub reply_count: u32,
    /// Users per emoji. (The server lists emoji in the order they first appeared; this map
    /// sorts them by name.)
    #[serde(default)]
    pub reactions: BTreeMap<String, Vec<String>>,
    /// When it was last edited.
    #[serde(default)]
    pub edited_at: Option<String>,
    /// Whether it was deleted; a deleted message keeps its place.
    #[serde(default)]
    pub deleted: bool,
    /// When it was posted.
    pub created_at: String,
    /// The author's idempotency key, when the post carried one.
    #[serde(default)]
    pub client_msg_id: Option<String>,
    /// The Megolm ciphertext, in an encrypted channel (where `text` is empty); decrypt it
    /// with [`crate::e2ee::E2eeManager::decrypt_message`]. Absent elsewhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ciphertext: Option<String>,
}

/// One page of messages, with the cursor of the next page (`None` on the last page).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessagePage {
    /// The messages: newest first in a channel's history, oldest first in a thread.
    pub messages: Vec<Message>,
    /// Pass this as `before` (history) or `after` (replies) for the next page.
    pub next_cursor: Option<String>,
}

/// One body a message had, in its edit history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    /// The text (empty in an encrypted channel).
    pub text: String,
    /// The ciphertext it had then, in an encrypted channel.
    #[serde(default)]
    pub ciphertext: Option<String>,
    /// When it was set.
    pub at: String,
}

/// The answer of `GET /me`: the caller and their workspaces.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Me {
    /// The caller.
    pub user: User,
    /// The workspaces the caller belongs to.
    pub workspaces: Vec<Workspace>,
}

/// A posted message, and whether this call created it (`false`: the `client_msg_id` was
/// used before and this is the first message, unchanged).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Posted {
    /// The message.
    pub message: Message,
    /// Whether this call stored it.
    pub created: bool,
}

/// A to-device message (`API.md` §14), as `GET /e2ee/to-device` lists it and a `to_device`
/// frame carries it: opaque JSON from one device to another, here usually an Olm envelope
/// for [`crate::e2ee::E2eeManager::receive_to_device`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToDeviceMessage {
    /// Its ID in the recipient device's queue: an increasing integer, as a string.
    /// Acknowledging an ID acknowledges every message up to it.
    pub id: String,
    /// The user whose device sent it.
    pub sender_id: String,
    /// The device that sent it.
    pub sender_device_id: String,
    /// What was sent: a JSON object.
    pub content: serde_json::Value,
}

impl ToDeviceMessage {
    /// The ID as a number; `None` if the server sent something else.
    pub fn seq(&self) -> Option<u64> {
        self.id.parse().ok()
    }
}

/// One page of a device's to-device messages, oldest first; `next_cursor` is the last ID of
/// the page (`None` when it is empty), and reading after it acknowledges the page.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToDevicePage {
    /// The messages, in ID order.
    pub messages: Vec<ToDeviceMessage>,
    /// Pass this as `after` to read on (and acknowledge this page).
    pub next_cursor: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    // A message in the exact shape of API.md reads into the typed struct, and unknown
    // fields and kinds from a newer server are tolerated.
    #[test]
    fn message_and_channel_shapes() {
        let m: Message = serde_json::from_str(
            r#"{"id":"M1-2","channel_id":"C1","seq":2,"user_id":"U1","text":"hi",
                "thread_id":null,"reply_count":0,"reactions":{"tada":["U1","U2"]},
                "edited_at":null,"deleted":false,"created_at":"2026-01-01T00:00:00Z",
                "client_msg_id":"k1","future_field":true}"#,
        )
        .unwrap();
        assert_eq!(m.seq, 2);
        assert_eq!(m.reactions["tada"], vec!["U1", "U2"]);
        assert_eq!(m.client_msg_id.as_deref(), Some("k1"));
        let c: Channel = serde_json::from_str(
            r#"{"id":"C1","workspace_id":"W1","name":"","kind":"group_dm","last_seq":7}"#,
        )
        .unwrap();
        assert_eq!(c.kind, ChannelKind::GroupDm);
        assert!(!c.encrypted, "absent means a plain channel");
        assert_eq!(m.ciphertext, None);
        let c: Channel = serde_json::from_str(
            r#"{"id":"C2","workspace_id":"W1","name":"","kind":"dm","last_seq":3,"encrypted":true}"#,
        )
        .unwrap();
        assert!(c.encrypted);
        let m: Message = serde_json::from_str(
            r#"{"id":"M2-4","channel_id":"C2","seq":4,"user_id":"U1","text":"","thread_id":null,
                "reply_count":0,"reactions":{},"edited_at":null,"deleted":false,
                "created_at":"2026-01-01T00:00:00Z","client_msg_id":"k2","ciphertext":"{}"}"#,
        )
        .unwrap();
        assert_eq!(m.ciphertext.as_deref(), Some("{}"));
        let c: Channel = serde_json::from_str(
            r#"{"id":"C1","workspace_id":"W1","name":"x","kind":"broadcast","last_seq":0}"#,
        )
        .unwrap();
        assert_eq!(c.kind, ChannelKind::Unknown);
    }
}
