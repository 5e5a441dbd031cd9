//! The key directory calls of `API.md` §14: a device uploads its keys, a caller queries the
//! devices of users they share a workspace with and claims their keys, and a user removes
//! one of their devices.
//!
//! The engine checks every key and signature and decides every claim
//! (`chorus_engine::domain::e2ee`); this module parses and routes. Users the caller shares
//! no workspace with are left out of every answer, exactly as users that do not exist.

use super::{Call, Reply};
use crate::error::ApiError;
use chorus_engine::domain::e2ee::{
    DeviceKey, DeviceKeys, KeysUpload, NAMES_PER_CALL_MAX, TO_DEVICE_CONTENT_BYTES_MAX,
};
use chorus_engine::domain::PAGE_LIMIT_MAX;
use chorus_engine::ids::UserId;
use chorus_engine::view::{ClaimedKeysView, KeysQueryView};
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Deserialize)]
struct UploadReq {
    #[serde(default)]
    device_keys: Option<DeviceKeysReq>,
    #[serde(default)]
    one_time_keys: Option<BTreeMap<String, String>>,
    #[serde(default)]
    fallback_key: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
struct DeviceKeysReq {
    curve25519: String,
    ed25519: String,
    signature: String,
}

#[derive(Deserialize)]
struct QueryReq {
    user_ids: Vec<String>,
}

#[derive(Deserialize)]
struct ClaimReq {
    devices: BTreeMap<String, Vec<String>>,
}

#[derive(Deserialize)]
struct ToDeviceReq {
    messages: BTreeMap<String, BTreeMap<String, serde_json::Value>>,
}

/// To-device messages in a page when the request names no `limit`.
const TO_DEVICE_PAGE_DEFAULT: usize = 100;

fn keys(map: BTreeMap<String, String>) -> Vec<DeviceKey> {
    map.into_iter()
        .map(|(id, key)| DeviceKey { id, key })
        .collect()
}

/// `POST /e2ee/keys/upload`.
pub(super) async fn upload(call: &Call<'_>) -> Result<Reply, ApiError> {
    let device = call.device()?;
    let r: UploadReq = call.json()?;
    let mut fallback = keys(r.fallback_key.unwrap_or_default());
    if fallback.len() > 1 {
        return Err(ApiError::invalid("fallback_key holds one key"));
    }
    let upload = KeysUpload {
        device_keys: r.device_keys.map(|k| DeviceKeys {
            curve25519: k.curve25519,
            ed25519: k.ed25519,
            signature: k.signature,
        }),
        one_time_keys: keys(r.one_time_keys.unwrap_or_default()),
        fallback_key: fallback.pop(),
    };
    let count = call
        .engine()
        .upload_keys(call.user(), device, upload)
        .await?;
    Ok(Reply::json(
        200,
        &serde_json::json!({ "one_time_key_count": count }),
    ))
}

/// `POST /e2ee/keys/query`.
pub(super) async fn query(call: &Call<'_>) -> Result<Reply, ApiError> {
    let r: QueryReq = call.json()?;
    if r.user_ids.len() > NAMES_PER_CALL_MAX {
        return Err(too_many("user_ids"));
    }
    // An ID that does not parse names nobody, like one of a user who does not exist.
    let users = r.user_ids.iter().filter_map(|u| u.parse().ok()).collect();
    let found = call.engine().device_keys(call.user(), users).await?;
    Ok(Reply::json(200, &KeysQueryView(&found)))
}

/// `POST /e2ee/keys/claim`.
pub(super) async fn claim(call: &Call<'_>) -> Result<Reply, ApiError> {
    let r: ClaimReq = call.json()?;
    if r.devices.values().map(Vec::len).sum::<usize>() > NAMES_PER_CALL_MAX {
        return Err(too_many("devices"));
    }
    let devices = (r.devices.into_iter())
        .filter_map(|(u, ds)| Some((u.parse::<UserId>().ok()?, ds)))
        .flat_map(|(u, ds)| ds.into_iter().map(move |d| (u, d)))
        .collect();
    let keys = call.engine().claim_keys(call.user(), devices).await?;
    Ok(Reply::json(200, &ClaimedKeysView(&keys)))
}

/// `DELETE /e2ee/devices/{device_id}`. In a cluster the answer waits until no node can
/// still find the device live (`crate::fresh`).
pub(super) async fn remove_device(call: &Call<'_>) -> Result<Reply, ApiError> {
    let device = call.param("device_id");
    call.engine().remove_device(call.user(), device).await?;
    if call.ctx.shared.cluster.is_some() {
        glommio::timer::sleep(crate::fresh::REMOVAL_SETTLES).await;
    }
    Ok(Reply::empty())
}

/// `PUT /e2ee/to-device/{txn_id}`.
pub(super) async fn send_to_device(call: &Call<'_>) -> Result<Reply, ApiError> {
    let device = call.device()?;
    let txn_id = call.param("txn_id");
    let r: ToDeviceReq = call.json()?;
    if r.messages.values().map(BTreeMap::len).sum::<usize>() > NAMES_PER_CALL_MAX {
        return Err(too_many("messages"));
    }
    let mut messages = Vec::new();
    for (user, devices) in r.messages {
        // A user ID that does not parse names nobody: its messages go nowhere, as for
        // a user who does not exist.
        let Ok(user) = user.parse::<UserId>() else {
            continue;
        };
        for (to, content) in devices {
            if !content.is_object() {
                return Err(ApiError::invalid("each to-device content is a JSON object"));
            }
            let text = content.to_string();
            if text.len() > TO_DEVICE_CONTENT_BYTES_MAX {
                return Err(ApiError::too_large(format!(
                    "a to-device content is at most {TO_DEVICE_CONTENT_BYTES_MAX} bytes"
                )));
            }
            messages.push((user, to, text));
        }
    }
    let engine = call.engine();
    engine
        .send_to_device(call.user(), device, txn_id, messages)
        .await?;
    Ok(Reply::json(200, &serde_json::json!({})))
}

/// `GET /e2ee/to-device`: reading after an ID acknowledges everything up to it.
pub(super) async fn list_to_device(call: &Call<'_>) -> Result<Reply, ApiError> {
    let device = call.device()?;
    let after = match call.query("after")? {
        None => 0,
        Some(v) => v
            .parse::<u64>()
            .map_err(|_| ApiError::invalid("after is a to-device message ID"))?,
    };
    let limit = call.limit_within(TO_DEVICE_PAGE_DEFAULT, PAGE_LIMIT_MAX)?;
    let (user, engine) = (call.user(), call.engine());
    if after > 0 {
        engine.ack_to_device(user, device, after).await?;
    }
    let (messages, _) = engine.to_device(user, device, after, limit).await?;
    // The next read names the last ID of this page, which acknowledges it.
    let next = messages.last().map(|m| m.id.to_string());
    Ok(Reply::json(
        200,
        &serde_json::json!({ "messages": messages, "next_cursor": next }),
    ))
}

fn too_many(field: &str) -> ApiError {
    ApiError::new(
        400,
        "too_many",
        format!("{field} names at most {NAMES_PER_CALL_MAX}"),
    )
}

/// Parses `body` as each request of this module, for the fuzz target; how many accepted.
pub(super) fn parse_as_every_request(body: &[u8]) -> usize {
    [
        super::parse_json::<UploadReq>(body).is_ok(),
        super::parse_json::<QueryReq>(body).is_ok(),
        super::parse_json::<ClaimReq>(body).is_ok(),
        super::parse_json::<ToDeviceReq>(body).is_ok(),
    ]
    .into_iter()
    .filter(|ok| *ok)
    .count()
}
