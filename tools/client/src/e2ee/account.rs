//! [`DeviceAccount`]: one device's long-lived Olm account (its identity keys, its
//! one-time keys and its fallback key) and the pieces of the `keys/upload` body of
//! `API.md` §14 that it produces.
//!
//! One-time and fallback keys share one `KEY_ID` space per device on the server, while
//! vodozemac counts each kind from zero; the IDs handed out here carry a prefix per kind
//! (`otk:` and `fallback:`) so the two never collide into a 409 `key_conflict`.

use super::keys::{canonical_device_json, DeviceKeys};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use vodozemac::olm::{Account, AccountPickle};
use vodozemac::{Curve25519PublicKey, KeyId};

/// The most one-time keys a device keeps published at once; more would make the account
/// forget private keys for published ones (vodozemac keeps a bounded store of them).
pub const ONE_TIME_KEYS_PUBLISHED_MAX: usize = 50;

/// The prefix of a one-time key's `KEY_ID`.
const ONE_TIME_KEY_ID_PREFIX: &str = "otk:";
/// The prefix of a fallback key's `KEY_ID`.
const FALLBACK_KEY_ID_PREFIX: &str = "fallback:";

/// One device's Olm account: identity keys, one-time keys and the fallback key, for the
/// user and device it was made for.
pub struct DeviceAccount {
    user_id: String,
    device_id: String,
    pub(super) account: Account,
}

impl std::fmt::Debug for DeviceAccount {
    // The account's keys are secrets; only the public identity is shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceAccount")
            .field("user_id", &self.user_id)
            .field("device_id", &self.device_id)
            .field("curve25519", &self.curve25519())
            .finish_non_exhaustive()
    }
}

impl DeviceAccount {
    /// A new account with fresh identity keys for `device_id` of `user_id` (such as `U12`).
    pub fn new(user_id: &str, device_id: &str) -> DeviceAccount {
        DeviceAccount {
            user_id: user_id.to_owned(),
            device_id: device_id.to_owned(),
            account: Account::new(),
        }
    }

    /// The user this device belongs to.
    pub fn user_id(&self) -> &str {
        &self.user_id
    }

    /// This device's ID.
    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    /// The Curve25519 identity key, unpadded base64: what other devices make Olm sessions
    /// with, and the `sender_key` of everything this device encrypts.
    pub fn curve25519(&self) -> String {
        self.account.curve25519_key().to_base64()
    }

    /// The Ed25519 signing key, unpadded base64.
    pub fn ed25519(&self) -> String {
        self.account.ed25519_key().to_base64()
    }

    /// The `device_keys` of a key upload: both identity keys and this device's signature
    /// over their [`canonical_device_json`].
    pub fn device_keys(&self) -> DeviceKeys {
        let curve25519 = self.curve25519();
        let ed25519 = self.ed25519();
        let signed = canonical_device_json(&self.user_id, &self.device_id, &curve25519, &ed25519);
        let signature = self.account.sign(signed.as_bytes()).to_base64();
        DeviceKeys {
            curve25519,
            ed25519,
            signature,
        }
    }

    /// Makes up to `count` new one-time keys, never more than [`ONE_TIME_KEYS_PUBLISHED_MAX`]
    /// unpublished ones in all, and answers every unpublished one as `{"KEY_ID":"KEY"}`.
    /// They stay unpublished, and are answered again, until
    /// [`DeviceAccount::mark_keys_as_published`] is called after a successful upload. Ask
    /// for [`ONE_TIME_KEYS_PUBLISHED_MAX`] less the upload answer's `one_time_key_count`:
    /// the account keeps a bounded number of private keys and forgets the oldest first.
    pub fn generate_one_time_keys(&mut self, count: usize) -> BTreeMap<String, String> {
        let room = ONE_TIME_KEYS_PUBLISHED_MAX.saturating_sub(self.account.one_time_keys().len());
        self.account.generate_one_time_keys(count.min(room));
        self.one_time_keys()
    }

    /// The one-time keys not yet marked as published, as `{"KEY_ID":"KEY"}`.
    pub fn one_time_keys(&self) -> BTreeMap<String, String> {
        key_map(ONE_TIME_KEY_ID_PREFIX, self.account.one_time_keys())
    }

    /// Makes a new fallback key, the one handed out when the server has no one-time key
    /// left for this device; the previous one is kept for sessions still being started
    /// with it. Answers the unpublished fallback key as `{"KEY_ID":"KEY"}`.
    pub fn generate_fallback_key(&mut self) -> BTreeMap<String, String> {
        self.account.generate_fallback_key();
        self.fallback_key()
    }

    /// The fallback key not yet marked as published, as `{"KEY_ID":"KEY"}` (empty if none).
    pub fn fallback_key(&self) -> BTreeMap<String, String> {
        key_map(FALLBACK_KEY_ID_PREFIX, self.account.fallback_key())
    }

    /// Marks every one-time and fallback key made so far as published. Call it only once
    /// the server answered the upload that carried them with 200: keys marked but never
    /// uploaded would never be used, and keys uploaded but not marked are uploaded again
    /// (the same key under the same ID, which the server takes as a no-op).
    pub fn mark_keys_as_published(&mut self) {
        self.account.mark_keys_as_published();
    }

    /// The whole `keys/upload` body: the device keys when `with_device_keys`, and the
    /// unpublished one-time and fallback keys, each field left out when it has nothing.
    pub fn upload_body(&self, with_device_keys: bool) -> Value {
        let mut body = serde_json::Map::new();
        if with_device_keys {
            body.insert("device_keys".into(), json!(self.device_keys()));
        }
        let one_time_keys = self.one_time_keys();
        if !one_time_keys.is_empty() {
            body.insert("one_time_keys".into(), json!(one_time_keys));
        }
        let fallback_key = self.fallback_key();
        if !fallback_key.is_empty() {
            body.insert("fallback_key".into(), json!(fallback_key));
        }
        Value::Object(body)
    }

    pub(super) fn pickle(&self) -> AccountPickle {
        self.account.pickle()
    }

    pub(super) fn from_pickle(user_id: String, device_id: String, pickle: AccountPickle) -> Self {
        DeviceAccount {
            user_id,
            device_id,
            account: Account::from_pickle(pickle),
        }
    }
}

fn key_map(prefix: &str, keys: HashMap<KeyId, Curve25519PublicKey>) -> BTreeMap<String, String> {
    keys.into_iter()
        .map(|(id, key)| (format!("{prefix}{}", id.to_base64()), key.to_base64()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::e2ee::verify_device_keys;

    // A device's own upload verifies as another client would check it.
    #[test]
    fn own_device_keys_verify() {
        let account = DeviceAccount::new("U1", "LAPTOP");
        verify_device_keys("U1", "LAPTOP", &account.device_keys()).unwrap();
        assert!(verify_device_keys("U1", "PHONE", &account.device_keys()).is_err());
    }

    // One-time and fallback key IDs never collide, though vodozemac counts both from zero.
    #[test]
    fn one_time_and_fallback_ids_are_distinct() {
        let mut account = DeviceAccount::new("U1", "LAPTOP");
        let otks = account.generate_one_time_keys(3);
        let fallback = account.generate_fallback_key();
        assert_eq!(otks.len(), 3);
        assert_eq!(fallback.len(), 1);
        assert!(fallback.keys().all(|id| !otks.contains_key(id)));
    }

    // Keys stay unpublished, and in the upload body, until marked; then they are gone
    // from it, and the count of unpublished keys is bounded.
    #[test]
    fn keys_are_marked_published_only_when_told() {
        let mut account = DeviceAccount::new("U1", "LAPTOP");
        let first = account.generate_one_time_keys(5);
        assert_eq!(account.one_time_keys(), first);
        account.generate_fallback_key();
        let body = account.upload_body(true);
        assert_eq!(body["one_time_keys"].as_object().unwrap().len(), 5);
        assert!(body["fallback_key"].is_object());
        account.mark_keys_as_published();
        assert!(account.one_time_keys().is_empty());
        let body = account.upload_body(false);
        assert_eq!(body, json!({}));
        let many = account.generate_one_time_keys(10 * ONE_TIME_KEYS_PUBLISHED_MAX);
        assert_eq!(many.len(), ONE_TIME_KEYS_PUBLISHED_MAX);
    }
}
