//! The notification preference calls of `API.md` §13: the caller's `prefs`, their
//! preferences for a channel, and their push devices.
//!
//! Bodies are parsed straight into the engine's input types
//! (`chorus_engine::domain::notify`), which also check them: this module only routes. A
//! channel the caller cannot see, and a device that is not theirs, are 404 like unknown
//! ones.

use super::{Call, List, One, Reply};
use crate::error::ApiError;
use crate::protocol::parse_id;
use chorus_engine::domain::notify::{ChannelPrefsInput, DeviceInput, PrefsPatch};

/// `GET /me/notification-prefs`.
pub(super) async fn get_prefs(call: &Call<'_>) -> Result<Reply, ApiError> {
    let prefs = call.engine().notify_prefs(call.user()).await?;
    Ok(Reply::json(200, &One("prefs", &prefs)))
}

/// `PATCH /me/notification-prefs`.
pub(super) async fn patch_prefs(call: &Call<'_>) -> Result<Reply, ApiError> {
    let patch: PrefsPatch = call.json()?;
    let prefs = call.engine().patch_notify_prefs(call.user(), patch).await?;
    Ok(Reply::json(200, &One("prefs", &prefs)))
}

/// `GET /channels/{cid}/notification-prefs`.
pub(super) async fn get_channel_prefs(call: &Call<'_>) -> Result<Reply, ApiError> {
    let cid = call.channel()?;
    let prefs = call.engine().channel_notify_prefs(call.user(), cid).await?;
    Ok(Reply::json(200, &One("channel_prefs", &prefs)))
}

/// `PUT /channels/{cid}/notification-prefs`.
pub(super) async fn put_channel_prefs(call: &Call<'_>) -> Result<Reply, ApiError> {
    let cid = call.channel()?;
    let input: ChannelPrefsInput = call.json()?;
    let prefs = call
        .engine()
        .set_channel_notify_prefs(call.user(), cid, input)
        .await?;
    Ok(Reply::json(200, &One("channel_prefs", &prefs)))
}

/// `GET /me/push-devices`.
pub(super) async fn list_devices(call: &Call<'_>) -> Result<Reply, ApiError> {
    let devices = call.engine().push_devices(call.user()).await?;
    // A user has at most a few devices: one page.
    Ok(Reply::json(200, &List("devices", &devices, None)))
}

/// `POST /me/push-devices`.
pub(super) async fn add_device(call: &Call<'_>) -> Result<Reply, ApiError> {
    let input: DeviceInput = call.json()?;
    let device = call.engine().add_push_device(call.user(), input).await?;
    Ok(Reply::json(201, &One("device", &device)))
}

/// `DELETE /me/push-devices/{did}`.
pub(super) async fn remove_device(call: &Call<'_>) -> Result<Reply, ApiError> {
    let device = parse_id(call.param("did"), "device")?;
    call.engine()
        .remove_push_device(call.user(), device)
        .await?;
    Ok(Reply::empty())
}

/// Parses `body` as each request of this module, for the fuzz target; how many accepted.
pub(super) fn parse_as_every_request(body: &[u8]) -> usize {
    [
        super::parse_json::<PrefsPatch>(body).is_ok(),
        super::parse_json::<ChannelPrefsInput>(body).is_ok(),
        super::parse_json::<DeviceInput>(body).is_ok(),
    ]
    .into_iter()
    .filter(|ok| *ok)
    .count()
}
