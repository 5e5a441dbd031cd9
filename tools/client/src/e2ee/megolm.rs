//! Megolm, the channel layer: [`E2eeManager`]'s outbound session per encrypted channel,
//! whose session key it shares over Olm with every member device, the inbound sessions it
//! was given, and the `megolm.v1` envelope that becomes a message's `ciphertext`.
//!
//! An outbound session remembers which devices it was shared with, so sharing before every
//! send costs nothing once every device has it, and a device that appears later (the
//! `stale_devices` refusal of `API.md` §14) gets the key at the current ratchet index: it
//! can read what is sent from then on and nothing earlier. Rotation drops the outbound
//! session, and the next share makes a new one whose key no removed device ever receives.

use super::manager::{DeviceRef, E2eeManager};
use super::olm::OlmError;
use super::PeerDevice;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use vodozemac::megolm::{
    GroupSession, InboundGroupSession, MegolmMessage, SessionConfig, SessionKey, SessionOrdering,
};

/// The `algorithm` of a channel message's ciphertext envelope.
pub const ALGORITHM_MEGOLM: &str = "megolm.v1";
/// The `type` of the to-device payload that carries a Megolm session key.
pub const ROOM_KEY_TYPE: &str = "chorus.room_key";
/// The most messages one outbound session encrypts; the next share starts a new one, so
/// that a key leaked from one device exposes a bounded stretch of a channel.
pub const GROUP_SESSION_MESSAGES_MAX: u32 = 10_000;

/// The largest `ciphertext` the server takes (`API.md` §14).
pub const CIPHERTEXT_BYTES_MAX: usize = 64 * 1024;

/// The to-device messages to send, as the `messages` object of
/// `PUT /api/v1/e2ee/to-device/{txn_id}`: `{user_id: {device_id: CONTENT}}`.
pub type ToDeviceBatch = BTreeMap<String, BTreeMap<String, Value>>;

/// Why a channel message could not be encrypted or decrypted.
#[derive(Debug, thiserror::Error)]
pub enum MegolmError {
    /// The channel has no outbound session: call [`E2eeManager::share_group_key`] first.
    #[error("channel {0} has no shared Megolm session; share the key first")]
    NotShared(String),
    /// The text's ciphertext would be larger than the server takes.
    #[error("the ciphertext would be {bytes} bytes, over {CIPHERTEXT_BYTES_MAX}")]
    TooLarge {
        /// The ciphertext's size.
        bytes: usize,
    },
    /// The ciphertext is not a `megolm.v1` envelope, or its plaintext is not a message.
    #[error("malformed ciphertext: {0}")]
    Malformed(String),
    /// No key for the session the message names was received (yet).
    #[error("unknown Megolm session {session_id} from {sender_key}")]
    UnknownSession {
        /// The sender's Curve25519 key.
        sender_key: String,
        /// The Megolm session ID.
        session_id: String,
    },
    /// The message was sent in another channel than the one it was read in, or with a key
    /// shared for another channel.
    #[error("the message belongs to channel {found}, not {expected}")]
    WrongChannel {
        /// The channel it was read in.
        expected: String,
        /// The channel it names.
        found: String,
    },
    /// The message's author is not the user whose device shared the session that
    /// encrypted it.
    #[error("the message's author is {author}, but its session is {sender_id}'s")]
    WrongSender {
        /// The message's `user_id`.
        author: String,
        /// The user whose device shared the session.
        sender_id: String,
    },
    /// vodozemac refused to decrypt (a bad MAC or signature, or an index before the
    /// session's first known one).
    #[error("Megolm decryption failed: {0}")]
    Decryption(#[from] vodozemac::megolm::DecryptionError),
}

/// A decrypted channel message and the device whose session encrypted it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelPlaintext {
    /// The message's text.
    pub text: String,
    /// The user whose device shared the session; check it against the message's
    /// `sender_id`.
    pub sender_id: String,
    /// The device that shared the session.
    pub sender_device_id: String,
    /// The ratchet index the message was encrypted at.
    pub message_index: u32,
}

/// What a decrypted to-device message was.
#[derive(Clone, Debug, PartialEq)]
pub enum Received {
    /// A Megolm session key for a channel, now kept for decrypting.
    RoomKey {
        /// The channel it is for.
        channel_id: String,
        /// The Megolm session ID.
        session_id: String,
    },
    /// Any other payload, for the caller.
    Other(Value),
}

pub(super) struct OutboundGroup {
    pub(super) session: GroupSession,
    pub(super) shared_with: BTreeSet<DeviceRef>,
}

pub(super) struct InboundGroup {
    pub(super) session: InboundGroupSession,
    pub(super) channel_id: String,
    pub(super) sender_id: String,
    pub(super) sender_device_id: String,
}

/// A channel message's `ciphertext`, as JSON inside the string.
#[derive(Serialize, Deserialize)]
struct Envelope {
    algorithm: String,
    sender_key: String,
    session_id: String,
    body: String,
}

/// What Megolm encrypts: the text and the channel, so that a ciphertext copied into
/// another channel does not decrypt there.
#[derive(Serialize, Deserialize)]
struct Plaintext {
    channel_id: String,
    text: String,
}

/// The to-device payload that carries a session key.
#[derive(Deserialize)]
struct RoomKey {
    algorithm: String,
    channel_id: String,
    session_id: String,
    session_key: String,
}

impl E2eeManager {
    /// Makes sure `channel_id` has an outbound session and that every one of `devices`
    /// (the channel's member devices; this one is skipped) has its key, and answers the
    /// Olm-encrypted to-device messages that carry it to those that did not. The answer is
    /// empty once all have it. Devices count as having the key once it is answered here, so send the
    /// batch (repeating it under the same `txn_id` after a failure) before sending a
    /// message. A device without an Olm session fails the whole batch with
    /// [`OlmError::NoSession`]: claim a key for it and call this again.
    pub fn share_group_key(
        &mut self,
        channel_id: &str,
        devices: &[PeerDevice],
    ) -> Result<ToDeviceBatch, OlmError> {
        for device in devices {
            self.add_device(device.clone())?;
        }
        let me = (
            self.account.user_id().to_owned(),
            self.account.device_id().to_owned(),
        );
        let group = self.outbound_session(channel_id);
        let payload = json!({
            "type": ROOM_KEY_TYPE,
            "algorithm": ALGORITHM_MEGOLM,
            "channel_id": channel_id,
            "session_id": group.session.session_id(),
            "session_key": group.session.session_key().to_base64(),
        });
        let fresh: Vec<&PeerDevice> = devices
            .iter()
            .filter(|d| device_ref(d) != me && !group.shared_with.contains(&device_ref(d)))
            .collect();
        // Every session is checked before any is used, so that a refusal marks no device.
        if let Some(device) = fresh.iter().find(|d| !self.has_olm_session(d)) {
            return Err(OlmError::NoSession {
                user_id: device.user_id.clone(),
                device_id: device.device_id.clone(),
            });
        }
        let mut batch = ToDeviceBatch::new();
        for device in &fresh {
            let content = self.encrypt_to_device(device, &payload)?;
            let by_device = batch.entry(device.user_id.clone()).or_default();
            by_device.insert(device.device_id.clone(), content);
        }
        let group = self.outbound.get_mut(channel_id).expect("made above");
        group
            .shared_with
            .extend(fresh.iter().map(|d| device_ref(d)));
        Ok(batch)
    }

    /// Encrypts `text` for `channel_id` with its shared outbound session, answering the
    /// message's `ciphertext`. A text whose ciphertext would be over
    /// [`CIPHERTEXT_BYTES_MAX`] is refused (the session skips one index for it).
    pub fn encrypt_channel_message(
        &mut self,
        channel_id: &str,
        text: &str,
    ) -> Result<String, MegolmError> {
        let sender_key = self.account.curve25519();
        let group = self
            .outbound
            .get_mut(channel_id)
            .filter(|g| g.session.message_index() < GROUP_SESSION_MESSAGES_MAX)
            .ok_or_else(|| MegolmError::NotShared(channel_id.to_owned()))?;
        let plaintext = Plaintext {
            channel_id: channel_id.to_owned(),
            text: text.to_owned(),
        };
        let bytes = serde_json::to_vec(&plaintext).expect("strings always serialize");
        let envelope = Envelope {
            algorithm: ALGORITHM_MEGOLM.to_owned(),
            sender_key,
            session_id: group.session.session_id(),
            body: group.session.encrypt(&bytes).to_base64(),
        };
        let ciphertext = serde_json::to_string(&envelope).expect("an envelope always serializes");
        if ciphertext.len() > CIPHERTEXT_BYTES_MAX {
            return Err(MegolmError::TooLarge {
                bytes: ciphertext.len(),
            });
        }
        Ok(ciphertext)
    }

    /// Decrypts a message's `ciphertext` read in `channel_id`. Every failure (an unknown
    /// session, a damaged or forged ciphertext, a message from another channel) is counted
    /// in [`E2eeManager::undecryptable`] and returned.
    pub fn decrypt_channel_message(
        &mut self,
        channel_id: &str,
        ciphertext: &str,
    ) -> Result<ChannelPlaintext, MegolmError> {
        let decrypted = self.try_decrypt_channel_message(channel_id, ciphertext);
        if decrypted.is_err() {
            self.undecryptable += 1;
        }
        decrypted
    }

    fn try_decrypt_channel_message(
        &mut self,
        channel_id: &str,
        ciphertext: &str,
    ) -> Result<ChannelPlaintext, MegolmError> {
        let envelope: Envelope =
            serde_json::from_str(ciphertext).map_err(|e| MegolmError::Malformed(e.to_string()))?;
        if envelope.algorithm != ALGORITHM_MEGOLM {
            return Err(MegolmError::Malformed(format!(
                "algorithm {:?}",
                envelope.algorithm
            )));
        }
        let message = MegolmMessage::from_base64(&envelope.body)
            .map_err(|e| MegolmError::Malformed(e.to_string()))?;
        let key = (envelope.sender_key, envelope.session_id);
        let Some(group) = self.inbound.get_mut(&key) else {
            return Err(MegolmError::UnknownSession {
                sender_key: key.0,
                session_id: key.1,
            });
        };
        check_channel(channel_id, &group.channel_id)?;
        let decrypted = group.session.decrypt(&message)?;
        let plaintext: Plaintext = serde_json::from_slice(&decrypted.plaintext)
            .map_err(|e| MegolmError::Malformed(e.to_string()))?;
        check_channel(channel_id, &plaintext.channel_id)?;
        Ok(ChannelPlaintext {
            text: plaintext.text,
            sender_id: group.sender_id.clone(),
            sender_device_id: group.sender_device_id.clone(),
            message_index: decrypted.message_index,
        })
    }

    /// Discards the outbound session of `channel_id`, so that the next
    /// [`E2eeManager::share_group_key`] makes a new one: call it when a member leaves or a
    /// member's device is removed. Answers whether there was one.
    pub fn discard_outbound_session(&mut self, channel_id: &str) -> bool {
        self.outbound.remove(channel_id).is_some()
    }

    /// The ID of the outbound session of `channel_id`, if it has one.
    pub fn outbound_session_id(&self, channel_id: &str) -> Option<String> {
        self.outbound
            .get(channel_id)
            .map(|g| g.session.session_id())
    }

    /// Decrypts a to-device message (as [`E2eeManager::decrypt_to_device`]) and, when it
    /// carries a Megolm session key, keeps the session for decrypting that channel.
    pub fn receive_to_device(
        &mut self,
        sender_id: &str,
        sender_device_id: &str,
        content: &Value,
    ) -> Result<Received, OlmError> {
        let payload = self.decrypt_to_device(sender_id, sender_device_id, content)?;
        if payload.get("type").and_then(Value::as_str) != Some(ROOM_KEY_TYPE) {
            return Ok(Received::Other(payload));
        }
        let room_key: RoomKey =
            serde_json::from_value(payload).map_err(|e| OlmError::Malformed(e.to_string()))?;
        let sender = self.known_device(sender_id, sender_device_id)?;
        self.keep_room_key(&sender, room_key)
    }

    fn keep_room_key(&mut self, sender: &PeerDevice, key: RoomKey) -> Result<Received, OlmError> {
        if key.algorithm != ALGORITHM_MEGOLM {
            return Err(OlmError::Malformed(format!(
                "room key algorithm {:?}",
                key.algorithm
            )));
        }
        let session_key = SessionKey::from_base64(&key.session_key)
            .map_err(|e| OlmError::Malformed(e.to_string()))?;
        let session = InboundGroupSession::new(&session_key, SessionConfig::version_1());
        if session.session_id() != key.session_id {
            return Err(OlmError::Mismatch("the room key's session ID".into()));
        }
        let group = InboundGroup {
            session,
            channel_id: key.channel_id.clone(),
            sender_id: sender.user_id.clone(),
            sender_device_id: sender.device_id.clone(),
        };
        self.keep_inbound(sender.curve25519.clone(), group)?;
        Ok(Received::RoomKey {
            channel_id: key.channel_id,
            session_id: key.session_id,
        })
    }

    /// Keeps an inbound session, unless one already kept for the same ID reaches further
    /// back; a key that claims a kept session's ID but is not the same ratchet, or names
    /// another channel, is refused.
    fn keep_inbound(
        &mut self,
        sender_key: String,
        mut group: InboundGroup,
    ) -> Result<(), OlmError> {
        let key = (sender_key, group.session.session_id());
        if let Some(kept) = self.inbound.get_mut(&key) {
            if kept.channel_id != group.channel_id {
                return Err(OlmError::Mismatch(
                    "a room key moved to another channel".into(),
                ));
            }
            match group.session.compare(&mut kept.session) {
                SessionOrdering::Better => {}
                SessionOrdering::Equal | SessionOrdering::Worse => return Ok(()),
                SessionOrdering::Unconnected => {
                    return Err(OlmError::Mismatch("a room key reuses a session ID".into()));
                }
            }
        }
        self.inbound.insert(key, group);
        Ok(())
    }

    /// The outbound session of `channel_id`, made (with an inbound copy, so this device
    /// reads its own messages) when there is none or it is used up.
    fn outbound_session(&mut self, channel_id: &str) -> &mut OutboundGroup {
        let used_up = self
            .outbound
            .get(channel_id)
            .is_some_and(|g| g.session.message_index() >= GROUP_SESSION_MESSAGES_MAX);
        if used_up || !self.outbound.contains_key(channel_id) {
            let session = GroupSession::new(SessionConfig::version_1());
            let inbound = InboundGroup {
                session: InboundGroupSession::new(
                    &session.session_key(),
                    SessionConfig::version_1(),
                ),
                channel_id: channel_id.to_owned(),
                sender_id: self.account.user_id().to_owned(),
                sender_device_id: self.account.device_id().to_owned(),
            };
            self.inbound
                .insert((self.account.curve25519(), session.session_id()), inbound);
            let group = OutboundGroup {
                session,
                shared_with: BTreeSet::new(),
            };
            self.outbound.insert(channel_id.to_owned(), group);
        }
        self.outbound.get_mut(channel_id).expect("inserted above")
    }
}

fn device_ref(device: &PeerDevice) -> DeviceRef {
    (device.user_id.clone(), device.device_id.clone())
}

fn check_channel(expected: &str, found: &str) -> Result<(), MegolmError> {
    if expected == found {
        Ok(())
    } else {
        Err(MegolmError::WrongChannel {
            expected: expected.to_owned(),
            found: found.to_owned(),
        })
    }
}
