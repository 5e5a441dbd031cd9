//! What end-to-end encryption devices (`API.md` §14) do to a shard's subscribers: their
//! to-device messages, `e2ee:keys_low` signals, and the end of a removed device's
//! connections.
//!
//! Every shard applies the metadata events; each then looks after its own subscribers, so
//! the messages reach a device's connections on whichever shard they live. A connection is
//! sent at most [`TO_DEVICE_WINDOW`] messages beyond what its device acknowledged: on
//! subscribing it gets the oldest unacknowledged ones, new ones follow while the window has
//! room, and each acknowledgement refills it. A message is therefore sent again on every new
//! connection until it is acknowledged, and a device with a long backlog is never cut off
//! for it. The metadata owner publishes an event only once every shard has done this, so a
//! to-device message accepted before a channel event is in the connection's queue before
//! that event.

use super::dispatch::Dispatcher;
use crate::domain::e2ee::{E2eeChange, ONE_TIME_KEYS_LOW, TO_DEVICE_WINDOW};
use crate::domain::event::MetaEvent;
use crate::domain::meta::MetaState;
use crate::ids::UserId;
use crate::view::{keys_low_frame, to_device_frame};
use std::collections::BTreeSet;

/// Whether an event touches subscribers of the devices it names.
pub(crate) fn has_effects(event: &MetaEvent) -> bool {
    matches!(event, MetaEvent::E2ee(_))
}

/// Applies an event's effects on this shard's subscribers, from the replica that applied
/// it.
pub(crate) fn effects(meta: &MetaState, dispatcher: &mut Dispatcher, event: &MetaEvent) {
    let MetaEvent::E2ee(change) = event else {
        return;
    };
    match &**change {
        E2eeChange::ToDeviceSent { messages, .. } => {
            // A send names each device once (a JSON object per user), up to 1,000.
            let devices: BTreeSet<(UserId, &str)> = messages
                .iter()
                .map(|m| (m.user, m.device.as_str()))
                .collect();
            for (user, device) in devices {
                refill(meta, dispatcher, user, device);
            }
        }
        E2eeChange::ToDeviceAcked { user, device, .. } => refill(meta, dispatcher, *user, device),
        E2eeChange::KeysClaimed { keys, .. } => {
            let claimed: BTreeSet<(UserId, &str)> = (keys.iter())
                .filter(|k| !k.fallback)
                .map(|k| (k.user, k.device.as_str()))
                .collect();
            for (user, device) in claimed {
                let left = meta.e2ee().unclaimed(user, device);
                if left < ONE_TIME_KEYS_LOW {
                    for (sub, _) in dispatcher.device_subs(user, device) {
                        dispatcher.push_device_frames(sub, vec![keys_low_frame(left)], None);
                    }
                }
            }
        }
        E2eeChange::DeviceRemoved { user, device } => dispatcher.revoke_device(*user, device),
        E2eeChange::DeviceRegistered { .. } | E2eeChange::KeysUploaded { .. } => {}
    }
}

/// Sends each local subscriber of the device its unacknowledged to-device messages that it
/// was not sent yet, as far as its window allows.
pub(crate) fn refill(meta: &MetaState, dispatcher: &mut Dispatcher, user: UserId, device: &str) {
    let keys = meta.e2ee();
    for (sub, sent) in dispatcher.device_subs(user, device) {
        let room = TO_DEVICE_WINDOW.saturating_sub(keys.to_device_upto(user, device, sent));
        if room == 0 {
            continue;
        }
        let (page, _) = keys.to_device(user, device, sent, room);
        let Some(last) = page.last().map(|m| m.id) else {
            continue;
        };
        let frames = page.iter().map(to_device_frame).collect();
        dispatcher.push_device_frames(sub, frames, Some(last));
    }
}
