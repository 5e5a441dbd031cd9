//! [`E2eeManager`]: everything one device knows for end-to-end encryption, in memory and
//! without I/O: its account, the other devices whose keys it verified, its Olm sessions,
//! its Megolm sessions, and the count of channel messages it could not decrypt. The Olm
//! and Megolm operations live in `olm.rs` and `megolm.rs`; saving and loading it in
//! `store.rs`.

use super::megolm::{InboundGroup, OutboundGroup};
use super::olm::OlmError;
use super::{DeviceAccount, PeerDevice};
use std::collections::HashMap;
use vodozemac::olm::Session;

/// A device as `(user_id, device_id)`.
pub(super) type DeviceRef = (String, String);

/// One device's end-to-end encryption state. It makes no network calls: it answers the
/// bodies to upload and the to-device messages to send, and takes what the server
/// delivered.
pub struct E2eeManager {
    pub(super) account: DeviceAccount,
    /// Devices whose keys were verified, by user and device.
    pub(super) devices: HashMap<DeviceRef, PeerDevice>,
    /// Olm sessions by the other device's Curve25519 key, least recently used first.
    pub(super) olm: HashMap<String, Vec<Session>>,
    /// This device's Megolm session per channel ID.
    pub(super) outbound: HashMap<String, OutboundGroup>,
    /// Megolm sessions to decrypt with, by sender Curve25519 key and session ID.
    pub(super) inbound: HashMap<(String, String), InboundGroup>,
    pub(super) undecryptable: u64,
}

impl std::fmt::Debug for E2eeManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("E2eeManager")
            .field("account", &self.account)
            .field("devices", &self.devices.len())
            .field("olm_peers", &self.olm.len())
            .field("outbound", &self.outbound.len())
            .field("inbound", &self.inbound.len())
            .field("undecryptable", &self.undecryptable)
            .finish()
    }
}

impl E2eeManager {
    /// The state of a device with this account and nothing else yet.
    pub fn new(account: DeviceAccount) -> E2eeManager {
        E2eeManager {
            account,
            devices: HashMap::new(),
            olm: HashMap::new(),
            outbound: HashMap::new(),
            inbound: HashMap::new(),
            undecryptable: 0,
        }
    }

    /// This device's account.
    pub fn account(&self) -> &DeviceAccount {
        &self.account
    }

    /// This device's account, to make and publish keys.
    pub fn account_mut(&mut self) -> &mut DeviceAccount {
        &mut self.account
    }

    /// Remembers a device whose keys were verified ([`PeerDevice::verified`]), so that
    /// to-device messages from it are accepted. The same device with other keys is refused:
    /// a device's identity keys never change, so new ones mean a server or an attacker
    /// substituted them.
    pub fn add_device(&mut self, device: PeerDevice) -> Result<(), OlmError> {
        let key = (device.user_id.clone(), device.device_id.clone());
        match self.devices.get(&key) {
            Some(known) if *known != device => Err(OlmError::KeysChanged {
                user_id: device.user_id,
                device_id: device.device_id,
            }),
            Some(_) => Ok(()),
            None => {
                self.devices.insert(key, device);
                Ok(())
            }
        }
    }

    /// The verified device `device_id` of `user_id`, if it is known here.
    pub fn device(&self, user_id: &str, device_id: &str) -> Option<&PeerDevice> {
        self.devices
            .get(&(user_id.to_owned(), device_id.to_owned()))
    }

    /// Forgets a device (after `device:removed`, or a member's leaving) and discards every
    /// outbound Megolm session it was given, so that nothing sent from now on can be read
    /// with a key it holds. Answers the channels whose session was discarded.
    pub fn remove_device(&mut self, user_id: &str, device_id: &str) -> Vec<String> {
        let key = (user_id.to_owned(), device_id.to_owned());
        self.devices.remove(&key);
        let mut channels: Vec<String> = self
            .outbound
            .iter()
            .filter(|(_, group)| group.shared_with.contains(&key))
            .map(|(channel, _)| channel.clone())
            .collect();
        channels.sort();
        for channel in &channels {
            self.outbound.remove(channel);
        }
        channels
    }

    /// How many channel messages [`E2eeManager::decrypt_channel_message`] could not
    /// decrypt since this state was made or loaded.
    pub fn undecryptable(&self) -> u64 {
        self.undecryptable
    }
}
