//! A device's public identity as `API.md` §14 publishes it: the `device_keys` object, the
//! canonical JSON its signature covers, and the check every client makes on another
//! device's keys before it encrypts anything for that device or trusts a key it sent.

use serde::{Deserialize, Serialize};
use vodozemac::{Curve25519PublicKey, Ed25519PublicKey, Ed25519Signature};

/// The `device_keys` object of a key upload, and of each device in a key query's answer
/// (whose extra `created_at` is ignored): unpadded base64 keys and the device's signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceKeys {
    /// The Curve25519 identity key, which Olm sessions are made with.
    pub curve25519: String,
    /// The Ed25519 signing key, which signs these keys.
    pub ed25519: String,
    /// The Ed25519 signature over [`canonical_device_json`] of this device.
    pub signature: String,
}

/// Why another device's keys were not accepted.
#[derive(Debug, thiserror::Error)]
pub enum KeyCheckError {
    /// A key is not an unpadded base64 key of the right length.
    #[error("the device's {which} key is malformed: {reason}")]
    MalformedKey {
        /// `curve25519` or `ed25519`.
        which: &'static str,
        /// What the decoder said.
        reason: String,
    },
    /// The signature is not a base64 Ed25519 signature.
    #[error("the device's signature is malformed: {0}")]
    MalformedSignature(String),
    /// The signature does not match the keys, the user and the device it is said to be for.
    #[error("the device's signature does not verify: {0}")]
    BadSignature(String),
}

/// The field order below is the alphabetical order of the keys, so serde_json writes the
/// canonical form directly: sorted keys, no whitespace.
#[derive(Serialize)]
struct SignedFields<'a> {
    curve25519: &'a str,
    device_id: &'a str,
    ed25519: &'a str,
    user_id: &'a str,
}

/// The canonical JSON of `{"curve25519","device_id","ed25519","user_id"}` that a device's
/// signature covers: keys sorted, no whitespace, strings escaped as JSON requires. The user
/// and device IDs are inside it so that keys cannot be passed off as another device's.
pub fn canonical_device_json(
    user_id: &str,
    device_id: &str,
    curve25519: &str,
    ed25519: &str,
) -> String {
    let fields = SignedFields {
        curve25519,
        device_id,
        ed25519,
        user_id,
    };
    serde_json::to_string(&fields).expect("a struct of strings always serializes")
}

/// Checks that `keys` were signed by their own Ed25519 key for this user and device, and
/// that both keys decode. A client calls this on every device a key query returns, and
/// uses no device whose keys fail.
pub fn verify_device_keys(
    user_id: &str,
    device_id: &str,
    keys: &DeviceKeys,
) -> Result<(), KeyCheckError> {
    PeerDevice::verified(user_id, device_id, keys).map(|_| ())
}

/// Another device (or another of this user's devices) whose keys were verified: the one
/// thing Olm sessions are made with and to-device messages are accepted from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerDevice {
    /// The user who owns the device, such as `U12`.
    pub user_id: String,
    /// The device's ID, unique for its user.
    pub device_id: String,
    /// The device's Curve25519 identity key, unpadded base64.
    pub curve25519: String,
    /// The device's Ed25519 signing key, unpadded base64.
    pub ed25519: String,
}

impl PeerDevice {
    /// The device named by `user_id` and `device_id`, after [`verify_device_keys`]'s checks.
    pub fn verified(
        user_id: &str,
        device_id: &str,
        keys: &DeviceKeys,
    ) -> Result<PeerDevice, KeyCheckError> {
        Curve25519PublicKey::from_base64(&keys.curve25519).map_err(|e| {
            KeyCheckError::MalformedKey {
                which: "curve25519",
                reason: e.to_string(),
            }
        })?;
        let ed25519 = Ed25519PublicKey::from_base64(&keys.ed25519).map_err(|e| {
            KeyCheckError::MalformedKey {
                which: "ed25519",
                reason: e.to_string(),
            }
        })?;
        let signature = Ed25519Signature::from_base64(&keys.signature)
            .map_err(|e| KeyCheckError::MalformedSignature(e.to_string()))?;
        let signed = canonical_device_json(user_id, device_id, &keys.curve25519, &keys.ed25519);
        ed25519
            .verify(signed.as_bytes(), &signature)
            .map_err(|e| KeyCheckError::BadSignature(e.to_string()))?;
        Ok(PeerDevice {
            user_id: user_id.to_owned(),
            device_id: device_id.to_owned(),
            curve25519: keys.curve25519.clone(),
            ed25519: keys.ed25519.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The signed form is exactly the sorted, whitespace-free object, with JSON escaping.
    #[test]
    fn canonical_json_is_sorted_and_compact() {
        let json = canonical_device_json("U12", "PHONE", "c+/k", "e\"d");
        assert_eq!(
            json,
            r#"{"curve25519":"c+/k","device_id":"PHONE","ed25519":"e\"d","user_id":"U12"}"#
        );
    }

    // Keys that are not base64 keys are told apart from keys whose signature is wrong.
    #[test]
    fn malformed_keys_are_named() {
        let keys = DeviceKeys {
            curve25519: "not a key".into(),
            ed25519: "x".into(),
            signature: "y".into(),
        };
        let err = verify_device_keys("U1", "D1", &keys).unwrap_err();
        assert!(
            matches!(
                err,
                KeyCheckError::MalformedKey {
                    which: "curve25519",
                    ..
                }
            ),
            "{err}"
        );
    }
}
