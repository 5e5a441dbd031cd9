//! The network edge of encrypted channels (`API.md` §14), as [`Session`] methods that join
//! the REST calls and the stream to a device's [`E2eeManager`] and a channel's
//! [`ChannelDevices`], which the caller owns: this module keeps no state.
//!
//! A send shares the channel's Megolm key with every listed device that lacks it (keys
//! queried and verified, one-time keys claimed, Olm sessions started, one to-device call),
//! encrypts, and posts the ciphertext with the tracker's `devices_seq`. A `stale_devices`
//! refusal means the channel has device events the tracker has not applied; they were
//! committed before the refusal, so they are at or below the channel's `last_seq`, and
//! the send reads the stream until the tracker has applied that seq, shares the key with
//! the new devices (or a new key, after a removal), encrypts again and resends under the
//! same `client_msg_id`, at most [`STALE_DEVICES_ATTEMPTS_MAX`] times.

use super::channel::{ChannelDevices, Incoming};
use super::E2eeManager;
use crate::error::Error;
use crate::rest::Session;
use crate::stream::{Stream, StreamHandle, StreamItem};
use crate::types::Message;
use std::collections::BTreeSet;
use std::time::Duration;
use tokio::time::{timeout_at, Instant};

/// Refusals as `stale_devices` in a row after which an encrypted send gives up with
/// [`Error::StaleDevices`]: each one means devices changed while sending, so more than a
/// few in a row means a channel whose devices churn faster than a send completes.
pub const STALE_DEVICES_ATTEMPTS_MAX: u32 = 5;
/// How long a refused send waits for the stream to hand out the device event it lacks.
pub const DEVICE_CATCH_UP_TIMEOUT: Duration = Duration::from_secs(10);
/// The error code of a send encrypted for an old device list.
pub const STALE_DEVICES: &str = "stale_devices";

/// How an encrypted message reaches the server.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Via {
    /// `POST` / `PATCH /api/v1/channels/{cid}/messages` (the default).
    #[default]
    Rest,
    /// `message:send` / `message:edit` on the stream's connection.
    Stream,
}

/// What an encrypted send or edit did.
#[derive(Debug)]
pub struct EncryptedPost {
    /// The message as the server stored it.
    pub message: Message,
    /// `stale_devices` refusals before it was taken.
    pub refusals: u32,
    /// Listed devices the key could not be shared with, `(user_id, device_id)`: no
    /// verified keys, or no one-time key to start an Olm session with. They cannot read
    /// the message.
    pub unreachable: Vec<(String, String)>,
    /// The stream items read while catching up with the channel's devices, already taken
    /// by [`E2eeManager::receive`] (room keys kept, messages decrypted): the caller's, in
    /// order, as if it had read them itself.
    pub received: Vec<Incoming>,
}

/// A send or an edit.
#[derive(Clone, Copy)]
enum Outgoing<'a> {
    New { client_msg_id: &'a str },
    Edit { message_id: &'a str },
}

impl Session {
    /// Takes one item of this device's stream for `channel`, as [`E2eeManager::receive`]
    /// does, after querying and verifying the keys of a to-device message's sender that
    /// the manager does not know yet.
    pub async fn receive_item(
        &self,
        manager: &mut E2eeManager,
        channel: &mut ChannelDevices,
        item: StreamItem,
    ) -> Result<Incoming, Error> {
        if let StreamItem::ToDevice(m) = &item {
            if manager.device(&m.sender_id, &m.sender_device_id).is_none() {
                self.learn_devices(manager, &[m.sender_id.as_str()]).await?;
            }
        }
        Ok(manager.receive(channel, item))
    }

    /// Makes sure every device `channel` lists has the channel's Megolm key: queries and
    /// verifies the keys of devices the manager does not know, starts Olm sessions where
    /// there are none and shares the key over to-device messages (nothing goes out once all
    /// have it). Answers the devices it could not reach.
    pub async fn share_channel_key(
        &self,
        manager: &mut E2eeManager,
        channel: &ChannelDevices,
    ) -> Result<Vec<(String, String)>, Error> {
        let own = (manager.account().user_id(), manager.account().device_id());
        let others: Vec<(&str, &str)> = channel.devices().filter(|d| *d != own).collect();
        let unknown: BTreeSet<&str> = (others.iter())
            .filter(|(u, d)| manager.device(u, d).is_none())
            .map(|(u, _)| *u)
            .collect();
        if !unknown.is_empty() {
            let users: Vec<&str> = unknown.into_iter().collect();
            self.learn_devices(manager, &users).await?;
        }
        let mut known = Vec::new();
        let mut unreachable = Vec::new();
        for (u, d) in others {
            match manager.device(u, d) {
                Some(device) => known.push(device.clone()),
                None => unreachable.push((u.to_owned(), d.to_owned())),
            }
        }
        let missing = (self.share_group_key(manager, channel.channel_id(), &known)).await?;
        unreachable.extend(missing.into_iter().map(|d| (d.user_id, d.device_id)));
        Ok(unreachable)
    }

    /// Sends `text` to the encrypted channel over REST: see [`Session::send_encrypted_via`].
    pub async fn send_encrypted(
        &self,
        manager: &mut E2eeManager,
        channel: &mut ChannelDevices,
        stream: &mut Stream,
        text: &str,
        client_msg_id: &str,
    ) -> Result<EncryptedPost, Error> {
        let outgoing = Outgoing::New { client_msg_id };
        (self.seal_and_post(manager, channel, stream, text, outgoing, Via::Rest)).await
    }

    /// Sends `text` to the encrypted channel `channel` tracks, from this session's device
    /// (whose `manager` it is), over REST or the stream's connection. Shares the key first
    /// ([`Session::share_channel_key`]), encrypts, and posts with the tracker's
    /// `devices_seq`; on `stale_devices` it catches up as [`Session::sync_channel`] does
    /// (reading `stream`, this session's stream fed from the channel's events), encrypts
    /// again and resends with the same `client_msg_id` (at most
    /// [`STALE_DEVICES_ATTEMPTS_MAX`] refusals, else [`Error::StaleDevices`]). The items
    /// it read on the way are in [`EncryptedPost::received`].
    pub async fn send_encrypted_via(
        &self,
        manager: &mut E2eeManager,
        channel: &mut ChannelDevices,
        stream: &mut Stream,
        text: &str,
        client_msg_id: &str,
        via: Via,
    ) -> Result<EncryptedPost, Error> {
        let outgoing = Outgoing::New { client_msg_id };
        (self.seal_and_post(manager, channel, stream, text, outgoing, via)).await
    }

    /// Edits a message of the encrypted channel to `text` (author only) over REST, with the
    /// key sharing and `stale_devices` handling of [`Session::send_encrypted_via`].
    pub async fn edit_encrypted(
        &self,
        manager: &mut E2eeManager,
        channel: &mut ChannelDevices,
        stream: &mut Stream,
        message_id: &str,
        text: &str,
    ) -> Result<EncryptedPost, Error> {
        let outgoing = Outgoing::Edit { message_id };
        (self.seal_and_post(manager, channel, stream, text, outgoing, Via::Rest)).await
    }

    async fn seal_and_post(
        &self,
        manager: &mut E2eeManager,
        channel: &mut ChannelDevices,
        stream: &mut Stream,
        text: &str,
        outgoing: Outgoing<'_>,
        via: Via,
    ) -> Result<EncryptedPost, Error> {
        let handle = stream.handle();
        let mut received = Vec::new();
        let mut refusals = 0;
        loop {
            let unreachable = self.share_channel_key(manager, channel).await?;
            let ciphertext = manager.encrypt_channel_message(channel.channel_id(), text)?;
            let posted = (self.post_sealed(channel, &ciphertext, outgoing, via, &handle)).await;
            match posted {
                Ok(message) => {
                    return Ok(EncryptedPost {
                        message,
                        refusals,
                        unreachable,
                        received,
                    })
                }
                Err(e) if e.code() == Some(STALE_DEVICES) => refusals += 1,
                Err(e) => return Err(e),
            }
            if refusals >= STALE_DEVICES_ATTEMPTS_MAX {
                return Err(Error::StaleDevices { attempts: refusals });
            }
            (self.catch_up(manager, channel, stream, &mut received)).await?;
        }
    }

    /// Posts one ciphertext with the tracker's `devices_seq`.
    async fn post_sealed(
        &self,
        channel: &ChannelDevices,
        ciphertext: &str,
        outgoing: Outgoing<'_>,
        via: Via,
        handle: &StreamHandle,
    ) -> Result<Message, Error> {
        let (cid, seq) = (channel.channel_id(), channel.devices_seq());
        match (outgoing, via) {
            (Outgoing::New { client_msg_id }, Via::Rest) => {
                let key = Some(client_msg_id);
                let posted = self
                    .post_ciphertext(cid, ciphertext, seq, key, None)
                    .await?;
                Ok(posted.message)
            }
            (Outgoing::New { client_msg_id }, Via::Stream) => {
                (handle.send_ciphertext(cid, ciphertext, seq, client_msg_id)).await
            }
            (Outgoing::Edit { message_id }, Via::Rest) => {
                (self.edit_ciphertext(cid, message_id, ciphertext, seq)).await
            }
            (Outgoing::Edit { message_id }, Via::Stream) => {
                (handle.edit_ciphertext(cid, message_id, ciphertext, seq)).await
            }
        }
    }

    /// Reads `stream` (this session's, fed from the channel's events) until `channel` has
    /// applied every event the channel had when this was called (its `last_seq` over
    /// REST), taking each item as [`Session::receive_item`] does and answering them in
    /// order. Waits at most [`DEVICE_CATCH_UP_TIMEOUT`], else fails with
    /// [`Error::DevicesNotSeen`]. A send does this after a `stale_devices` refusal; call
    /// it after opening a channel to start from its current devices.
    pub async fn sync_channel(
        &self,
        manager: &mut E2eeManager,
        channel: &mut ChannelDevices,
        stream: &mut Stream,
    ) -> Result<Vec<Incoming>, Error> {
        let mut received = Vec::new();
        (self.catch_up(manager, channel, stream, &mut received)).await?;
        Ok(received)
    }

    async fn catch_up(
        &self,
        manager: &mut E2eeManager,
        channel: &mut ChannelDevices,
        stream: &mut Stream,
        received: &mut Vec<Incoming>,
    ) -> Result<(), Error> {
        let target = self.channel(channel.channel_id()).await?.last_seq;
        let deadline = Instant::now() + DEVICE_CATCH_UP_TIMEOUT;
        while channel.last_seq() < target {
            let next = timeout_at(deadline, stream.next_item()).await;
            let item = next.map_err(|_| Error::DevicesNotSeen {
                devices_seq: channel.devices_seq(),
            })??;
            received.push(self.receive_item(manager, channel, item).await?);
        }
        Ok(())
    }

    /// Queries the devices of `users` and remembers those whose keys verify. A device
    /// known here with other keys is refused (and logged): identity keys never change.
    async fn learn_devices(&self, manager: &mut E2eeManager, users: &[&str]) -> Result<(), Error> {
        for device in self.query_keys(users).await?.devices {
            let (user, id) = (device.user_id.clone(), device.device_id.clone());
            if let Err(e) = manager.add_device(device) {
                tracing::warn!(%user, device = %id, error = %e, "a queried device was refused");
            }
        }
        Ok(())
    }
}
