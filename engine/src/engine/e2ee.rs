//! The engine calls of the end-to-end encryption key directory (`API.md` §14): devices,
//! their keys, and claims of one-time keys.
//!
//! Changes and claims are metadata commands, decided one at a time by the metadata owner
//! and durable in the metadata log before they are answered (see
//! [`crate::domain::e2ee`] for why claims are linearisable); queries are answered by the
//! caller's shard's replica, which the answer of every change waited for.

use super::Engine;
use crate::domain::e2ee::{ClaimedKey, E2eeCommand, E2eeOutcome, KeysUpload, ToDevice};
use crate::error::EngineError;
use crate::ids::UserId;
use crate::outcome::MetaOutcome;
use crate::runtime::meta::{MetaRead, MetaRequest};
use crate::view::UserDevices;

impl Engine {
    async fn e2ee(&self, cmd: E2eeCommand) -> Result<E2eeOutcome, EngineError> {
        let cmd = Box::new(cmd);
        match self.meta(|reply| MetaRequest::E2ee { cmd, reply }).await? {
            MetaOutcome::E2ee(o) => Ok(o),
            other => unreachable!("a key directory command answered {other:?}"),
        }
    }

    /// Registers a device ID for the user as they sign in with it; a known ID is left as it
    /// is. `Conflict` for an ID the user removed, `TooMany` past the devices limit.
    pub async fn register_device(&self, user: UserId, device: &str) -> Result<(), EngineError> {
        let cmd = E2eeCommand::Register {
            user,
            device: device.to_owned(),
            at_us: 0,
        };
        match self.e2ee(cmd).await? {
            E2eeOutcome::Registered => Ok(()),
            other => unreachable!("register_device answered {other:?}"),
        }
    }

    /// Stores a device's keys; answers how many of its one-time keys are unclaimed.
    pub async fn upload_keys(
        &self,
        user: UserId,
        device: &str,
        upload: KeysUpload,
    ) -> Result<u32, EngineError> {
        let cmd = E2eeCommand::Upload {
            user,
            device: device.to_owned(),
            upload: Box::new(upload),
        };
        match self.e2ee(cmd).await? {
            E2eeOutcome::KeyCount(n) => Ok(n),
            other => unreachable!("upload_keys answered {other:?}"),
        }
    }

    /// How many one-time keys of a device are unclaimed.
    pub async fn one_time_key_count(&self, user: UserId, device: &str) -> Result<u32, EngineError> {
        let device = device.to_owned();
        self.meta_read(user.0, |reply| MetaRead::OneTimeKeyCount {
            user,
            device,
            reply,
        })
        .await
    }

    /// The listed devices of those of `users` who share a workspace with `user`; the
    /// others are left out.
    pub async fn device_keys(
        &self,
        user: UserId,
        users: Vec<UserId>,
    ) -> Result<Vec<UserDevices>, EngineError> {
        self.meta_read(user.0, |reply| MetaRead::DeviceKeys { user, users, reply })
            .await
    }

    /// Claims one key of each device named: an unclaimed one-time key (handed out once,
    /// ever), or the fallback key when none is left. Devices of users who share no
    /// workspace with `user`, and devices with no key, get nothing. The keys come sorted by
    /// user and device.
    pub async fn claim_keys(
        &self,
        user: UserId,
        devices: Vec<(UserId, String)>,
    ) -> Result<Vec<ClaimedKey>, EngineError> {
        match self.e2ee(E2eeCommand::Claim { user, devices }).await? {
            E2eeOutcome::Claimed(mut keys) => {
                keys.sort_by(|a, b| (a.user, &a.device).cmp(&(b.user, &b.device)));
                Ok(keys)
            }
            other => unreachable!("claim_keys answered {other:?}"),
        }
    }

    /// Removes one of the user's devices: its credentials stop working and its ID is never
    /// registered again. `NotFound` for a device the user does not have.
    pub async fn remove_device(&self, user: UserId, device: &str) -> Result<(), EngineError> {
        let cmd = E2eeCommand::Remove {
            user,
            device: device.to_owned(),
        };
        match self.e2ee(cmd).await? {
            E2eeOutcome::Removed => Ok(()),
            other => unreachable!("remove_device answered {other:?}"),
        }
    }

    /// Queues to-device messages from the user's device, each `(user, device, content)`
    /// with `content` a JSON object's text. Messages to devices that do not exist or whose
    /// users share no workspace with the sender are dropped without a word; the same
    /// `txn_id` from the same device within 24 hours does nothing. `QueueFull` takes
    /// nothing when any recipient's queue is full.
    pub async fn send_to_device(
        &self,
        user: UserId,
        device: &str,
        txn_id: &str,
        messages: Vec<(UserId, String, String)>,
    ) -> Result<(), EngineError> {
        let cmd = E2eeCommand::SendToDevice {
            user,
            device: device.to_owned(),
            txn_id: txn_id.to_owned(),
            messages,
            at_us: 0,
        };
        match self.e2ee(cmd).await? {
            E2eeOutcome::ToDeviceSent => Ok(()),
            other => unreachable!("send_to_device answered {other:?}"),
        }
    }

    /// Acknowledges the device's to-device messages up to `upto`: they are dropped.
    pub async fn ack_to_device(
        &self,
        user: UserId,
        device: &str,
        upto: u64,
    ) -> Result<(), EngineError> {
        let cmd = E2eeCommand::AckToDevice {
            user,
            device: device.to_owned(),
            upto,
        };
        match self.e2ee(cmd).await? {
            E2eeOutcome::ToDeviceAcked => Ok(()),
            other => unreachable!("ack_to_device answered {other:?}"),
        }
    }

    /// The device's unacknowledged to-device messages after `after`, at most `limit`, and
    /// whether more follow.
    pub async fn to_device(
        &self,
        user: UserId,
        device: &str,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<ToDevice>, bool), EngineError> {
        let device = device.to_owned();
        self.meta_read(user.0, |reply| MetaRead::ToDevice {
            user,
            device,
            after,
            limit,
            reply,
        })
        .await
    }
}
