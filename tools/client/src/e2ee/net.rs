//! The network edge of end-to-end encryption: the calls of `API.md` §14 as [`Session`]
//! methods, and the few steps that join them to one device's [`E2eeManager`] (publishing
//! its keys, starting Olm sessions from claimed keys, sharing a channel's Megolm key).
//!
//! The rest of `e2ee` is pure and calls nothing; this module keeps no state. Keys are
//! marked published only once the server answered their upload with 200; every device a
//! key query returns is verified ([`PeerDevice::verified`]) before it is handed out, and the
//! ones that fail are counted and left out; a to-device send whose answer the network lost
//! is sent again under the same `txn_id`, which the server applies once.

use super::{DeviceAccount, DeviceKeys, E2eeManager, PeerDevice, ToDeviceBatch};
use super::{ONE_TIME_KEYS_PUBLISHED_MAX, TO_DEVICE_CONTENT_BYTES_MAX};
use crate::backoff::Backoff;
use crate::error::Error;
use crate::rest::{call, call_empty, field, paging, Session, PAGE_LIMIT_MAX};
use crate::types::ToDevicePage;
use reqwest::Method;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// Attempts of one to-device send, the first included, when the network fails it. Only a
/// failure to reach the server or read its answer is retried; a refusal (such as 429
/// `queue_full`) is returned to the caller, as for every other call.
pub const TO_DEVICE_SEND_ATTEMPTS_MAX: u32 = 5;

/// What a key query found: the devices whose keys verified, and the ones that did not.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueriedDevices {
    /// The devices whose signatures verified, by user and then device ID.
    pub devices: Vec<PeerDevice>,
    /// The devices that were left out, and why.
    pub rejected: Vec<RejectedDevice>,
}

/// A device a key query listed whose keys did not verify or could not be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RejectedDevice {
    /// The device's user.
    pub user_id: String,
    /// The device.
    pub device_id: String,
    /// What was wrong.
    pub reason: String,
}

/// One key that `keys/claim` handed out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimedKey {
    /// The device's user.
    pub user_id: String,
    /// The device.
    pub device_id: String,
    /// The key's ID.
    pub key_id: String,
    /// The Curve25519 key, unpadded base64.
    pub key: String,
    /// Whether it is the device's fallback key (it had no one-time key left).
    pub fallback: bool,
}

#[derive(Deserialize)]
struct ClaimedFields {
    key_id: String,
    key: String,
    #[serde(default)]
    fallback: bool,
}

/// A fresh `txn_id` for a to-device send: 128 random bits in hex.
pub fn new_txn_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

impl Session {
    /// Fails unless the token is bound to `device_id`.
    fn require_device(&self, device_id: &str) -> Result<(), Error> {
        if self.device_id.as_deref() == Some(device_id) {
            return Ok(());
        }
        Err(Error::WrongDevice {
            wanted: device_id.to_owned(),
            have: self.device_id.clone(),
        })
    }

    /// `POST /api/v1/e2ee/keys/upload` with a body made by the caller; answers the device's
    /// unclaimed one-time key count. Prefer [`Session::publish_keys`].
    pub async fn upload_keys(&self, body: &Value) -> Result<u64, Error> {
        let request = self.request(Method::POST, &["e2ee", "keys", "upload"]);
        let (_, v) = call(request.json(body)).await?;
        field(v, "one_time_key_count")
    }

    /// Uploads the account's unpublished keys (and its identity keys when
    /// `with_device_keys`), then marks them published; answers the device's unclaimed
    /// one-time key count. If the upload fails nothing is marked, so the same keys go
    /// again next time (the server takes a key it has as a no-op). The session must be
    /// signed in on the account's device.
    pub async fn publish_keys(
        &self,
        account: &mut DeviceAccount,
        with_device_keys: bool,
    ) -> Result<u64, Error> {
        self.require_device(account.device_id())?;
        let count = self
            .upload_keys(&account.upload_body(with_device_keys))
            .await?;
        account.mark_keys_as_published();
        Ok(count)
    }

    /// Makes and publishes one-time keys up to [`ONE_TIME_KEYS_PUBLISHED_MAX`] on the
    /// server, given the count the server last reported (an upload's answer, or an
    /// `e2ee:keys_low` frame's); answers the new count.
    pub async fn top_up_one_time_keys(
        &self,
        account: &mut DeviceAccount,
        server_count: u64,
    ) -> Result<u64, Error> {
        let on_server = usize::try_from(server_count).unwrap_or(usize::MAX);
        account.generate_one_time_keys(ONE_TIME_KEYS_PUBLISHED_MAX.saturating_sub(on_server));
        self.publish_keys(account, false).await
    }

    /// `POST /api/v1/e2ee/keys/query`: the devices of these users (those who share a
    /// workspace with the caller), each checked with [`PeerDevice::verified`]. A device
    /// whose keys do not verify is never returned as a device; it is in
    /// [`QueriedDevices::rejected`].
    pub async fn query_keys(&self, user_ids: &[&str]) -> Result<QueriedDevices, Error> {
        let request = self.request(Method::POST, &["e2ee", "keys", "query"]);
        let (_, v) = call(request.json(&json!({ "user_ids": user_ids }))).await?;
        let listed: BTreeMap<String, BTreeMap<String, Value>> = field(v, "devices")?;
        let found = verify_listed(listed);
        for r in &found.rejected {
            tracing::warn!(user = %r.user_id, device = %r.device_id, reason = %r.reason,
                "a queried device's keys were refused");
        }
        Ok(found)
    }

    /// `POST /api/v1/e2ee/keys/claim`: one key of each `(user_id, device_id)`; a device the
    /// server has nothing for (no key at all, or a user who shares no workspace with the
    /// caller) is absent from the answer.
    pub async fn claim_keys(&self, devices: &[(&str, &str)]) -> Result<Vec<ClaimedKey>, Error> {
        let mut by_user: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (user, device) in devices {
            by_user.entry(user).or_default().push(device);
        }
        let request = self.request(Method::POST, &["e2ee", "keys", "claim"]);
        let (_, v) = call(request.json(&json!({ "devices": by_user }))).await?;
        let answer: BTreeMap<String, BTreeMap<String, ClaimedFields>> = field(v, "one_time_keys")?;
        let mut keys = Vec::new();
        for (user_id, by_device) in answer {
            for (device_id, k) in by_device {
                keys.push(ClaimedKey {
                    user_id: user_id.clone(),
                    device_id,
                    key_id: k.key_id,
                    key: k.key,
                    fallback: k.fallback,
                });
            }
        }
        Ok(keys)
    }

    /// `PUT /api/v1/e2ee/to-device/{txn_id}` under a fresh `txn_id`, retried as
    /// [`Session::send_to_device_as`] says; answers the `txn_id`. An empty batch sends
    /// nothing.
    pub async fn send_to_device(&self, messages: &ToDeviceBatch) -> Result<String, Error> {
        let txn_id = new_txn_id();
        self.send_to_device_as(&txn_id, messages).await?;
        Ok(txn_id)
    }

    /// `PUT /api/v1/e2ee/to-device/{txn_id}`: sends `messages` from this session's device.
    /// When the request fails in the network (no answer came), it is sent again under the
    /// same `txn_id`, at most [`TO_DEVICE_SEND_ATTEMPTS_MAX`] times in all, after backoff
    /// delays; the server applies a `txn_id` of a device once in 24 h, so the messages
    /// arrive once whichever attempt got through. A caller that keeps the `txn_id` can
    /// repeat the call itself later with the same effect.
    pub async fn send_to_device_as(
        &self,
        txn_id: &str,
        messages: &ToDeviceBatch,
    ) -> Result<(), Error> {
        if messages.values().all(BTreeMap::is_empty) {
            return Ok(());
        }
        let body = json!({ "messages": messages });
        let backoff = Backoff::default();
        let mut attempt = 0;
        loop {
            let request = self.request(Method::PUT, &["e2ee", "to-device", txn_id]);
            match call_empty(request.json(&body)).await {
                Err(Error::Http(e)) if attempt + 1 < TO_DEVICE_SEND_ATTEMPTS_MAX => {
                    tracing::debug!(%txn_id, attempt, error = %e, "to-device send failed; again");
                    tokio::time::sleep(backoff.delay(attempt, rand::random())).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// `GET /api/v1/e2ee/to-device`: this device's to-device messages after `after`, at
    /// most `limit` (1 to 200). Reading after an ID acknowledges every message up to it,
    /// which the server then forgets.
    pub async fn to_device_messages(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<ToDevicePage, Error> {
        let mut url = self.client().api(&["e2ee", "to-device"]);
        paging(&mut url, "after", after, limit.clamp(1, PAGE_LIMIT_MAX));
        let (_, page) = call(self.request_url(Method::GET, url)).await?;
        Ok(page)
    }

    /// Acknowledges this device's to-device messages up to `upto_id` over REST (a read
    /// after it). Over a stream, [`crate::StreamHandle::ack_to_device`] does the same.
    pub async fn ack_to_device(&self, upto_id: &str) -> Result<(), Error> {
        self.to_device_messages(Some(upto_id), 1).await.map(|_| ())
    }

    /// `DELETE /api/v1/e2ee/devices/{device_id}`: removes one of the user's devices. Its
    /// tokens stop working, its streams close (with 4001, which ends them with
    /// [`Error::Unauthorized`]) and its to-device queue is dropped.
    pub async fn remove_device(&self, device_id: &str) -> Result<(), Error> {
        call_empty(self.request(Method::DELETE, &["e2ee", "devices", device_id])).await
    }

    /// Makes an Olm session with each of `devices` that has none (this device is skipped),
    /// from keys claimed in one call. Answers the devices the server had no key for, which
    /// remain without a session.
    pub async fn start_olm_sessions(
        &self,
        manager: &mut E2eeManager,
        devices: &[PeerDevice],
    ) -> Result<Vec<PeerDevice>, Error> {
        let me = own_device(manager);
        let me = (me.0.as_str(), me.1.as_str());
        let needed: Vec<&PeerDevice> = (devices.iter())
            .filter(|d| device_of(d) != me && !manager.has_olm_session(d))
            .collect();
        if needed.is_empty() {
            return Ok(Vec::new());
        }
        let names: Vec<(&str, &str)> = needed.iter().map(|d| device_of(d)).collect();
        let claimed = self.claim_keys(&names).await?;
        let mut missing = Vec::new();
        for device in needed {
            let key = claimed
                .iter()
                .find(|k| (k.user_id.as_str(), k.device_id.as_str()) == device_of(device));
            match key {
                Some(k) => manager.start_olm_session(device, &k.key)?,
                None => missing.push(device.clone()),
            }
        }
        Ok(missing)
    }

    /// Shares `channel_id`'s Megolm key with those of `devices` (the channel's member
    /// devices, this one included or not) that do not have it: starts the Olm sessions
    /// missing, encrypts the key for each, and sends it in one to-device call. Answers the
    /// devices it could not reach (no key to start a session with). If the send fails, the
    /// channel's outbound session is discarded, so that the next share makes a new one for
    /// every device instead of counting this one's recipients as served.
    pub async fn share_group_key(
        &self,
        manager: &mut E2eeManager,
        channel_id: &str,
        devices: &[PeerDevice],
    ) -> Result<Vec<PeerDevice>, Error> {
        self.require_device(manager.account().device_id())?;
        let missing = self.start_olm_sessions(manager, devices).await?;
        let reachable: Vec<PeerDevice> = (devices.iter())
            .filter(|d| !missing.contains(d))
            .cloned()
            .collect();
        let batch = manager.share_group_key(channel_id, &reachable)?;
        for chunk in split_batch(batch) {
            if let Err(e) = self.send_to_device(&chunk).await {
                manager.discard_outbound_session(channel_id);
                return Err(e);
            }
        }
        Ok(missing)
    }
}

/// `(user_id, device_id)` of a device.
fn device_of(device: &PeerDevice) -> (&str, &str) {
    (&device.user_id, &device.device_id)
}

fn own_device(manager: &E2eeManager) -> (String, String) {
    let account = manager.account();
    (account.user_id().to_owned(), account.device_id().to_owned())
}

/// Contents per to-device call, at most: the server takes 1,000 per call and 64 KiB each,
/// and one request stays well under its body limit this way.
const TO_DEVICE_CALL_MESSAGES_MAX: usize = 100;

/// Splits a batch into batches of at most [`TO_DEVICE_CALL_MESSAGES_MAX`] messages, each
/// sent as its own call.
fn split_batch(batch: ToDeviceBatch) -> Vec<ToDeviceBatch> {
    let mut out: Vec<ToDeviceBatch> = Vec::new();
    let mut in_last = TO_DEVICE_CALL_MESSAGES_MAX;
    for (user, devices) in batch {
        for (device, content) in devices {
            if in_last == TO_DEVICE_CALL_MESSAGES_MAX {
                out.push(ToDeviceBatch::new());
                in_last = 0;
            }
            debug_assert!(content.to_string().len() <= TO_DEVICE_CONTENT_BYTES_MAX);
            let last = out.last_mut().expect("pushed above");
            last.entry(user.clone())
                .or_default()
                .insert(device, content);
            in_last += 1;
        }
    }
    out
}

/// Verifies every device of a key query's `devices` answer.
fn verify_listed(listed: BTreeMap<String, BTreeMap<String, Value>>) -> QueriedDevices {
    let mut found = QueriedDevices::default();
    for (user_id, devices) in listed {
        for (device_id, keys) in devices {
            let checked = serde_json::from_value::<DeviceKeys>(keys)
                .map_err(|e| format!("unreadable keys: {e}"))
                .and_then(|k| {
                    PeerDevice::verified(&user_id, &device_id, &k).map_err(|e| e.to_string())
                });
            match checked {
                Ok(device) => found.devices.push(device),
                Err(reason) => found.rejected.push(RejectedDevice {
                    user_id: user_id.clone(),
                    device_id,
                    reason,
                }),
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    // A query answer with one good device, one whose keys were signed for another device
    // and one that is not keys at all: only the good one is a device, the others are
    // counted with their reasons.
    #[test]
    fn queried_devices_are_verified_one_by_one() {
        let good = DeviceAccount::new("U1", "LAPTOP");
        let moved = DeviceAccount::new("U1", "ELSEWHERE");
        let mut with_time = json!(good.device_keys());
        with_time["created_at"] = json!("2026-12-02T12:00:00Z");
        let listed = serde_json::from_value(json!({
            "U1": {
                "LAPTOP": with_time,
                "PHONE": moved.device_keys(),
                "TABLET": {"curve25519": 7},
            },
            "U2": {},
        }))
        .unwrap();
        let found = verify_listed(listed);
        assert_eq!(found.devices.len(), 1);
        assert_eq!(device_of(&found.devices[0]), ("U1", "LAPTOP"));
        let rejected: Vec<&str> = found.rejected.iter().map(|r| &*r.device_id).collect();
        assert_eq!(rejected, ["PHONE", "TABLET"]);
        assert!(found.rejected[1].reason.starts_with("unreadable"));
    }

    // A large batch goes out in calls of at most 100 messages, each message once.
    #[test]
    fn batches_are_split_into_bounded_calls() {
        let mut batch = ToDeviceBatch::new();
        for u in 0..3 {
            for d in 0..90 {
                batch
                    .entry(format!("U{u}"))
                    .or_default()
                    .insert(format!("D{d}"), json!({ "n": d }));
            }
        }
        let calls = split_batch(batch);
        let sizes: Vec<usize> = (calls.iter())
            .map(|c| c.values().map(BTreeMap::len).sum())
            .collect();
        assert_eq!(sizes, [100, 100, 70]);
        assert!(split_batch(ToDeviceBatch::new()).is_empty());
    }

    // A fresh txn_id is printable ASCII within the server's 128 bytes, and never repeats.
    #[test]
    fn txn_ids() {
        let (a, b) = (new_txn_id(), new_txn_id());
        assert_ne!(a, b);
        assert!(a.len() <= 128 && a.bytes().all(|c| c.is_ascii_graphic()));
    }
}
