//! The engine calls of notification preferences (`API.md` §13): a user's `prefs`, their
//! per-channel preferences, and their push devices.
//!
//! Changes are metadata commands, decided by the metadata owner and durable in the
//! metadata log before they are answered; reads are answered by the caller's shard's
//! replica, which the answer of every change waited for.

use super::Engine;
use crate::domain::notify::{
    ChannelPrefsInput, DeviceInput, NotifyCommand, NotifyPrefs, PrefsPatch, PushDevice,
};
use crate::error::EngineError;
use crate::ids::{ChannelId, DeviceId, UserId};
use crate::outcome::{MetaOutcome, NotifyOutcome};
use crate::runtime::meta::{MetaRead, MetaRequest};
use crate::view::ChannelPrefsView;

impl Engine {
    async fn notify(&self, cmd: NotifyCommand) -> Result<NotifyOutcome, EngineError> {
        let cmd = Box::new(cmd);
        match self
            .meta(|reply| MetaRequest::Notify { cmd, reply })
            .await?
        {
            MetaOutcome::Notify(n) => Ok(n),
            other => unreachable!("a notify command answered {other:?}"),
        }
    }

    /// The user's notification preferences (the defaults until they change any).
    pub async fn notify_prefs(&self, user: UserId) -> Result<NotifyPrefs, EngineError> {
        self.meta_read(user.0, |reply| MetaRead::NotifyPrefs { user, reply })
            .await
    }

    /// Changes the fields of the user's preferences that the patch names, each checked;
    /// answers the whole preferences as they now stand.
    pub async fn patch_notify_prefs(
        &self,
        user: UserId,
        patch: PrefsPatch,
    ) -> Result<NotifyPrefs, EngineError> {
        match self
            .notify(NotifyCommand::PatchPrefs { user, patch })
            .await?
        {
            NotifyOutcome::Prefs(p) => Ok(p),
            other => unreachable!("patch_notify_prefs answered {other:?}"),
        }
    }

    /// The user's preferences for a channel they can see; `NotFound` for any other.
    pub async fn channel_notify_prefs(
        &self,
        user: UserId,
        channel: ChannelId,
    ) -> Result<ChannelPrefsView, EngineError> {
        self.channel(user, channel).await?;
        self.meta_read(user.0, |reply| MetaRead::ChannelNotifyPrefs {
            user,
            channel,
            reply,
        })
        .await
    }

    /// Replaces the user's preferences for a channel they can see; `NotFound` for any
    /// other.
    pub async fn set_channel_notify_prefs(
        &self,
        user: UserId,
        channel: ChannelId,
        prefs: ChannelPrefsInput,
    ) -> Result<ChannelPrefsView, EngineError> {
        // Whether the user can see the channel is the partition's to say (a private
        // channel's members are there); the metadata owner checks the workspace again.
        self.channel(user, channel).await?;
        let cmd = NotifyCommand::SetChannel {
            user,
            channel,
            prefs,
        };
        match self.notify(cmd).await? {
            NotifyOutcome::Channel(c) => Ok(c),
            other => unreachable!("set_channel_notify_prefs answered {other:?}"),
        }
    }

    /// The user's push devices, in ID order.
    pub async fn push_devices(&self, user: UserId) -> Result<Vec<PushDevice>, EngineError> {
        self.meta_read(user.0, |reply| MetaRead::PushDevices { user, reply })
            .await
    }

    /// Registers a push device. The user's own device with the same `app_id` and
    /// `pushkey` keeps its ID; another user's moves to this user.
    pub async fn add_push_device(
        &self,
        user: UserId,
        device: DeviceInput,
    ) -> Result<PushDevice, EngineError> {
        let cmd = NotifyCommand::AddDevice {
            user,
            device,
            at_us: 0,
        };
        match self.notify(cmd).await? {
            NotifyOutcome::Device(d) => Ok(d),
            other => unreachable!("add_push_device answered {other:?}"),
        }
    }

    /// Removes one of the user's push devices; `NotFound` for anyone else's.
    pub async fn remove_push_device(
        &self,
        user: UserId,
        device: DeviceId,
    ) -> Result<(), EngineError> {
        match self
            .notify(NotifyCommand::RemoveDevice { user, device })
            .await?
        {
            NotifyOutcome::DeviceRemoved => Ok(()),
            other => unreachable!("remove_push_device answered {other:?}"),
        }
    }
}
