//! Olm, the device-to-device layer: [`E2eeManager`]'s sessions with other devices, made
//! from a claimed one-time key (outbound) or from a pre-key message (inbound), reused for
//! every later message, and the `olm.v1` to-device envelope of `API.md` §14.
//!
//! A to-device plaintext names its sender and recipient (users, devices and Ed25519 keys)
//! inside the encryption, and a receiver accepts it only from a device whose verified keys
//! it already holds and whose claims match what the server says: the server relays these
//! messages and could otherwise replay one to another device or pass it off as another's.

use super::manager::{DeviceRef, E2eeManager};
use super::PeerDevice;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use vodozemac::olm::{OlmMessage, Session, SessionConfig};
use vodozemac::Curve25519PublicKey;

/// The `algorithm` of an Olm to-device envelope.
pub const ALGORITHM_OLM: &str = "olm.v1";
/// The most Olm sessions kept with one device; the least recently used one goes first.
pub const SESSIONS_PER_DEVICE_MAX: usize = 8;
/// The largest to-device `CONTENT` the server takes (`API.md` §14), serialized.
pub const TO_DEVICE_CONTENT_BYTES_MAX: usize = 64 * 1024;

/// Why an Olm session could not be made, or a to-device message encrypted or decrypted.
#[derive(Debug, thiserror::Error)]
pub enum OlmError {
    /// The device's keys are not known here: query and verify them first
    /// ([`E2eeManager::add_device`]).
    #[error("device {user_id}/{device_id} is unknown; query and verify its keys first")]
    UnknownDevice {
        /// The device's user.
        user_id: String,
        /// The device.
        device_id: String,
    },
    /// A known device was presented with other keys than the ones verified before.
    #[error("device {user_id}/{device_id} is known with other keys")]
    KeysChanged {
        /// The device's user.
        user_id: String,
        /// The device.
        device_id: String,
    },
    /// There is no Olm session with the device: claim one of its one-time keys and call
    /// [`E2eeManager::start_olm_session`].
    #[error("no Olm session with device {user_id}/{device_id}; claim a one-time key first")]
    NoSession {
        /// The device's user.
        user_id: String,
        /// The device.
        device_id: String,
    },
    /// A key (a claimed one-time key or a sender key) is not a Curve25519 key.
    #[error("malformed key: {0}")]
    MalformedKey(String),
    /// The to-device content is not an `olm.v1` envelope, or its plaintext is not ours.
    #[error("malformed to-device message: {0}")]
    Malformed(String),
    /// vodozemac refused to make the session.
    #[error("the Olm session could not be made: {0}")]
    SessionCreation(#[from] vodozemac::olm::SessionCreationError),
    /// The encrypted payload would be larger than the server takes.
    #[error("the to-device message would be {bytes} bytes, over {TO_DEVICE_CONTENT_BYTES_MAX}")]
    TooLarge {
        /// The envelope's serialized size.
        bytes: usize,
    },
    /// vodozemac refused to encrypt.
    #[error("Olm encryption failed: {0}")]
    Encryption(#[from] vodozemac::olm::EncryptionError),
    /// No session decrypted the message.
    #[error("no Olm session decrypts the message: {0}")]
    Decryption(String),
    /// The plaintext's claims (sender, recipient, keys) do not match the envelope, the
    /// server's sender fields or this device.
    #[error("the to-device message's claims do not match: {0}")]
    Mismatch(String),
}

/// The `CONTENT` of an Olm to-device message, as sent.
#[derive(Serialize, Deserialize)]
struct Envelope {
    algorithm: String,
    sender_key: String,
    #[serde(rename = "type")]
    message_type: usize,
    body: String,
}

/// What is encrypted inside an envelope: the payload and who it is from and for.
#[derive(Serialize, Deserialize)]
struct Plaintext {
    sender: String,
    sender_device: String,
    sender_ed25519: String,
    recipient: String,
    recipient_device: String,
    recipient_ed25519: String,
    content: Value,
}

impl E2eeManager {
    /// Whether an Olm session with the device exists, so that a one-time key need not be
    /// claimed for it.
    pub fn has_olm_session(&self, device: &PeerDevice) -> bool {
        self.olm
            .get(&device.curve25519)
            .is_some_and(|sessions| !sessions.is_empty())
    }

    /// Makes an outbound Olm session with `device` from a one-time (or fallback) key that
    /// `keys/claim` handed out for it, and keeps it as the session to use with that device.
    pub fn start_olm_session(
        &mut self,
        device: &PeerDevice,
        one_time_key: &str,
    ) -> Result<(), OlmError> {
        self.add_device(device.clone())?;
        let identity = parse_curve(&device.curve25519)?;
        let one_time_key = parse_curve(one_time_key)?;
        let session = self.account.account.create_outbound_session(
            SessionConfig::version_1(),
            identity,
            one_time_key,
        )?;
        self.keep_session(&device.curve25519, session);
        Ok(())
    }

    /// Encrypts `payload` (a JSON object) for `device` with the most recently used session,
    /// answering the `olm.v1` envelope to send as the to-device `CONTENT`.
    pub fn encrypt_to_device(
        &mut self,
        device: &PeerDevice,
        payload: &Value,
    ) -> Result<Value, OlmError> {
        let plaintext = Plaintext {
            sender: self.account.user_id().to_owned(),
            sender_device: self.account.device_id().to_owned(),
            sender_ed25519: self.account.ed25519(),
            recipient: device.user_id.clone(),
            recipient_device: device.device_id.clone(),
            recipient_ed25519: device.ed25519.clone(),
            content: payload.clone(),
        };
        let bytes = serde_json::to_vec(&plaintext).expect("JSON values always serialize");
        let no_session = || OlmError::NoSession {
            user_id: device.user_id.clone(),
            device_id: device.device_id.clone(),
        };
        let sessions = self
            .olm
            .get_mut(&device.curve25519)
            .ok_or_else(no_session)?;
        let session = sessions.last_mut().ok_or_else(no_session)?;
        let (message_type, body) = session.encrypt(&bytes)?.to_parts();
        let envelope = Envelope {
            algorithm: ALGORITHM_OLM.to_owned(),
            sender_key: self.account.curve25519(),
            message_type,
            body: vodozemac::base64_encode(body),
        };
        let bytes = serde_json::to_vec(&envelope).expect("an envelope always serializes");
        if bytes.len() > TO_DEVICE_CONTENT_BYTES_MAX {
            return Err(OlmError::TooLarge { bytes: bytes.len() });
        }
        Ok(serde_json::to_value(envelope).expect("an envelope always serializes"))
    }

    /// Decrypts a to-device `content` that the server says `sender_id`'s device
    /// `sender_device_id` sent, and answers its payload. The sender must be a device whose
    /// keys were verified ([`E2eeManager::add_device`]); a pre-key message from it makes a
    /// new inbound session (using up the one-time key it names) unless one of the
    /// sessions already made with it matches.
    pub fn decrypt_to_device(
        &mut self,
        sender_id: &str,
        sender_device_id: &str,
        content: &Value,
    ) -> Result<Value, OlmError> {
        let sender = self.known_device(sender_id, sender_device_id)?;
        let envelope: Envelope = serde_json::from_value(content.clone())
            .map_err(|e| OlmError::Malformed(e.to_string()))?;
        if envelope.algorithm != ALGORITHM_OLM {
            return Err(OlmError::Malformed(format!(
                "algorithm {:?}",
                envelope.algorithm
            )));
        }
        if envelope.sender_key != sender.curve25519 {
            return Err(OlmError::Mismatch(
                "sender_key is not the sender device's identity key".into(),
            ));
        }
        let body = vodozemac::base64_decode(&envelope.body)
            .map_err(|e| OlmError::Malformed(e.to_string()))?;
        let message = OlmMessage::from_parts(envelope.message_type, &body)
            .map_err(|e| OlmError::Malformed(e.to_string()))?;
        let bytes = self.olm_decrypt(&sender.curve25519, &message)?;
        let plaintext: Plaintext =
            serde_json::from_slice(&bytes).map_err(|e| OlmError::Malformed(e.to_string()))?;
        self.check_claims(&sender, &plaintext)?;
        Ok(plaintext.content)
    }

    /// Tries the sessions with this sender, newest first; a pre-key message for a session
    /// not made yet makes a new inbound session. A pre-key message for a session that
    /// exists but does not decrypt it (a replay) fails without trying to make it again.
    fn olm_decrypt(&mut self, sender_key: &str, message: &OlmMessage) -> Result<Vec<u8>, OlmError> {
        let sessions = self.olm.entry(sender_key.to_owned()).or_default();
        let mut last_error = None;
        for i in (0..sessions.len()).rev() {
            if let OlmMessage::PreKey(pre_key) = message {
                if pre_key.session_id() != sessions[i].session_id() {
                    continue;
                }
            }
            match sessions[i].decrypt(message) {
                Ok(bytes) => {
                    // The session the peer last used is the one to answer on.
                    let session = sessions.remove(i);
                    sessions.push(session);
                    return Ok(bytes);
                }
                Err(e) => last_error = Some(e.to_string()),
            }
        }
        let (OlmMessage::PreKey(pre_key), None) = (message, &last_error) else {
            let reason = last_error.unwrap_or_else(|| "no session with this device".into());
            return Err(OlmError::Decryption(reason));
        };
        let identity = parse_curve(sender_key)?;
        let created = self.account.account.create_inbound_session(
            SessionConfig::version_1(),
            identity,
            pre_key,
        )?;
        self.keep_session(sender_key, created.session);
        Ok(created.plaintext)
    }

    fn check_claims(&self, sender: &PeerDevice, plaintext: &Plaintext) -> Result<(), OlmError> {
        if plaintext.sender != sender.user_id || plaintext.sender_device != sender.device_id {
            return Err(OlmError::Mismatch(
                "the plaintext names another sender than the server".into(),
            ));
        }
        if plaintext.sender_ed25519 != sender.ed25519 {
            return Err(OlmError::Mismatch(
                "the plaintext names another signing key than the sender's".into(),
            ));
        }
        let me = &self.account;
        if plaintext.recipient != me.user_id()
            || plaintext.recipient_device != me.device_id()
            || plaintext.recipient_ed25519 != me.ed25519()
        {
            return Err(OlmError::Mismatch(
                "the message was encrypted for another device".into(),
            ));
        }
        Ok(())
    }

    /// Keeps `session` as the newest with the device of `curve25519`, dropping the least
    /// recently used one past [`SESSIONS_PER_DEVICE_MAX`].
    fn keep_session(&mut self, curve25519: &str, session: Session) {
        let sessions = self.olm.entry(curve25519.to_owned()).or_default();
        sessions.push(session);
        if sessions.len() > SESSIONS_PER_DEVICE_MAX {
            sessions.remove(0);
        }
    }

    pub(super) fn known_device(
        &self,
        user_id: &str,
        device_id: &str,
    ) -> Result<PeerDevice, OlmError> {
        let key: DeviceRef = (user_id.to_owned(), device_id.to_owned());
        self.devices
            .get(&key)
            .cloned()
            .ok_or_else(|| OlmError::UnknownDevice {
                user_id: user_id.to_owned(),
                device_id: device_id.to_owned(),
            })
    }
}

fn parse_curve(key: &str) -> Result<Curve25519PublicKey, OlmError> {
    Curve25519PublicKey::from_base64(key).map_err(|e| OlmError::MalformedKey(e.to_string()))
}
