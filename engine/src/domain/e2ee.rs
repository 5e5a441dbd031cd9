//! The key directory of end-to-end encryption (`API.md` §14): a user's devices, each
//! device's identity keys, and its pool of one-time keys and fallback key; how each is
//! checked, claimed and stored.
//!
//! It lives in the metadata state ([`E2eeState`], a part of [`super::meta::MetaState`]) and
//! changes through one metadata event, [`super::event::MetaEvent::E2ee`]. The metadata
//! owner decides every command against its state, one at a time, applies the event before
//! it decides the next, and answers only once the event is durable and every shard has
//! applied it. That order is what makes claims linearisable: two concurrent claims of the
//! last one-time key of a device are two commands decided one after the other, and the
//! second sees the first's event; a claim is answered only after its event is committed,
//! so a crash can never hand the same key out again.
//!
//! The server checks a device's signature over its keys (so a key in the log was signed by
//! the device's ed25519 key), but it cannot vouch for the keys themselves: clients check
//! the signature again and decide whom to trust.

use super::DomainError;
use crate::ids::UserId;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use base64::Engine as _;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};

/// Most devices one user may have.
pub const DEVICES_PER_USER_MAX: usize = 20;
/// Most unclaimed one-time keys one device may hold.
pub const ONE_TIME_KEYS_MAX: usize = 200;
/// Most keys (one-time and fallback) in one upload.
pub const KEYS_PER_UPLOAD_MAX: usize = 100;
/// Most devices named in one claim, and most users named in one query.
pub const NAMES_PER_CALL_MAX: usize = 1000;
/// Fewer unclaimed one-time keys than this, and the device is told to upload more.
pub const ONE_TIME_KEYS_LOW: u32 = 10;
/// Longest device ID, in bytes.
pub const DEVICE_ID_BYTES_MAX: usize = 64;
/// Longest key ID, in bytes.
pub const KEY_ID_BYTES_MAX: usize = 64;
/// Most to-device messages waiting for one device: a full queue refuses more, never drops.
pub const TO_DEVICE_QUEUE_MAX: usize = 10_000;
/// Largest to-device content, in bytes of JSON.
pub const TO_DEVICE_CONTENT_BYTES_MAX: usize = 64 * 1024;
/// To-device messages a connection is sent ahead of its acknowledgements: more wait until
/// it acknowledges some (or are read over REST).
pub const TO_DEVICE_WINDOW: usize = 100;
/// Longest to-device transaction ID, in bytes.
pub const TXN_ID_BYTES_MAX: usize = 128;
/// How long a to-device transaction ID is remembered: the same one again within this time
/// does nothing.
pub const TXN_KEPT_US: u64 = 24 * 3600 * 1_000_000;

/// A device's identity keys, as uploaded: unpadded base64, the signature by the ed25519 key
/// over [`canonical_device_json`].
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(attr(allow(missing_docs)))]
pub struct DeviceKeys {
    /// The Curve25519 identity key.
    pub curve25519: String,
    /// The Ed25519 signing key.
    pub ed25519: String,
    /// The Ed25519 signature.
    pub signature: String,
}

/// A one-time or fallback key of a device.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(attr(allow(missing_docs)))]
pub struct DeviceKey {
    /// Its ID, unique within the device.
    pub id: String,
    /// The key.
    pub key: String,
}

/// A key handed out by a claim.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(attr(allow(missing_docs)))]
pub struct ClaimedKey {
    /// The device's user.
    pub user: UserId,
    /// The device.
    pub device: String,
    /// The key.
    pub key: DeviceKey,
    /// Whether it is the device's fallback key (handed out and kept) rather than a
    /// one-time key (handed out once, ever).
    pub fallback: bool,
}

/// A to-device message, as its device's queue keeps it.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(attr(allow(missing_docs)))]
pub struct ToDevice {
    /// Its ID: increasing per device, from 1.
    pub id: u64,
    /// The sender.
    pub sender: UserId,
    /// The sender's device.
    pub sender_device: String,
    /// The content: a JSON object, as sent.
    pub content: String,
}

/// A to-device message for one device.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(attr(allow(missing_docs)))]
pub struct ToDeviceFor {
    /// The device's user.
    pub user: UserId,
    /// The device.
    pub device: String,
    /// The message.
    pub message: ToDevice,
}

/// A change of the key directory, as the metadata log stores it.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(attr(allow(missing_docs)))]
pub enum E2eeChange {
    /// A user signed in with a new device ID.
    DeviceRegistered {
        /// The user.
        user: UserId,
        /// The device.
        device: String,
        /// When, in microseconds since the Unix epoch.
        at_us: u64,
    },
    /// A device uploaded keys; only the keys it did not have are here.
    KeysUploaded {
        /// The user.
        user: UserId,
        /// The device.
        device: String,
        /// Its identity keys, the first time they are uploaded.
        device_keys: Option<DeviceKeys>,
        /// New one-time keys.
        one_time_keys: Vec<DeviceKey>,
        /// A new fallback key, replacing the one before.
        fallback_key: Option<DeviceKey>,
    },
    /// Keys were handed out. The one-time keys among them are gone from their pools.
    KeysClaimed {
        /// Who claimed them.
        by: UserId,
        /// The keys, fallback keys included.
        keys: Vec<ClaimedKey>,
    },
    /// A device was removed; its ID is never used again by its user.
    DeviceRemoved {
        /// The user.
        user: UserId,
        /// The device.
        device: String,
    },
    /// A device sent to-device messages under a transaction ID; only the messages to
    /// devices that exist and share a workspace with the sender are here.
    ToDeviceSent {
        /// The sender.
        sender: UserId,
        /// The sender's device.
        sender_device: String,
        /// The transaction ID.
        txn_id: String,
        /// When, in microseconds since the Unix epoch: the transaction is remembered for
        /// [`TXN_KEPT_US`] from then.
        at_us: u64,
        /// The messages, each with its ID in its device's queue.
        messages: Vec<ToDeviceFor>,
    },
    /// A device acknowledged its to-device messages up to an ID.
    ToDeviceAcked {
        /// The user.
        user: UserId,
        /// The device.
        device: String,
        /// The last ID acknowledged.
        upto: u64,
    },
}

impl E2eeChange {
    /// The user whose listed devices this change adds to or removes from: a device is
    /// listed from its first identity keys until it is removed. Encrypted channels follow
    /// these changes with their device events.
    pub fn lists_devices_of(&self) -> Option<UserId> {
        match self {
            E2eeChange::KeysUploaded {
                user,
                device_keys: Some(_),
                ..
            }
            | E2eeChange::DeviceRemoved { user, .. } => Some(*user),
            _ => None,
        }
    }
}

/// A keys upload, as the client sent it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeysUpload {
    /// Identity keys.
    pub device_keys: Option<DeviceKeys>,
    /// One-time keys.
    pub one_time_keys: Vec<DeviceKey>,
    /// A fallback key.
    pub fallback_key: Option<DeviceKey>,
}

/// A command of the key directory. The caller has checked that the user exists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum E2eeCommand {
    /// A user signs in with a device ID: a new ID registers a device, a known one is
    /// answered as it is.
    Register {
        /// The user.
        user: UserId,
        /// The device.
        device: String,
        /// The time, set by the metadata owner.
        at_us: u64,
    },
    /// A device uploads keys.
    Upload {
        /// The user.
        user: UserId,
        /// The device.
        device: String,
        /// What it uploads.
        upload: Box<KeysUpload>,
    },
    /// A user claims one key of each of these devices.
    Claim {
        /// The claimer.
        user: UserId,
        /// The devices.
        devices: Vec<(UserId, String)>,
    },
    /// A user removes one of their devices.
    Remove {
        /// The user.
        user: UserId,
        /// The device.
        device: String,
    },
    /// A device sends to-device messages: `(user, device, content)` each.
    SendToDevice {
        /// The sender.
        user: UserId,
        /// The sender's device.
        device: String,
        /// The transaction ID.
        txn_id: String,
        /// The messages.
        messages: Vec<(UserId, String, String)>,
        /// The time, set by the metadata owner.
        at_us: u64,
    },
    /// A device acknowledges its to-device messages up to an ID.
    AckToDevice {
        /// The user.
        user: UserId,
        /// The device.
        device: String,
        /// The last ID acknowledged.
        upto: u64,
    },
}

impl E2eeCommand {
    /// The user who acts.
    pub fn user(&self) -> UserId {
        match self {
            E2eeCommand::Register { user, .. }
            | E2eeCommand::Upload { user, .. }
            | E2eeCommand::Claim { user, .. }
            | E2eeCommand::Remove { user, .. }
            | E2eeCommand::SendToDevice { user, .. }
            | E2eeCommand::AckToDevice { user, .. } => *user,
        }
    }
}

/// What a key directory command answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum E2eeOutcome {
    /// The device is registered.
    Registered,
    /// The device's unclaimed one-time keys after an upload.
    KeyCount(u32),
    /// The keys handed out.
    Claimed(Vec<ClaimedKey>),
    /// The device was removed.
    Removed,
    /// The to-device messages were accepted (or the transaction was seen before).
    ToDeviceSent,
    /// The to-device messages were acknowledged.
    ToDeviceAcked,
}

/// What deciding a key directory command yields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum E2eeDecision {
    /// A change to commit and apply; the answer follows from it.
    Change(E2eeChange),
    /// Nothing changes: the answer.
    Answer(E2eeOutcome),
}

/// A registered device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct E2eeDevice {
    /// When it was registered, in microseconds since the Unix epoch.
    pub created_at_us: u64,
    /// Its identity keys, once uploaded: the device is listed from then on.
    pub keys: Option<DeviceKeys>,
    /// Every key ID it ever uploaded (one-time or fallback), with its key.
    key_ids: HashMap<String, String>,
    /// Its unclaimed one-time keys, by ID: the lowest is claimed first.
    unclaimed: BTreeSet<String>,
    /// The ID of its fallback key.
    fallback: Option<String>,
    /// Its to-device messages not yet acknowledged, in ID order.
    inbox: VecDeque<ToDevice>,
    /// The ID its next to-device message gets.
    next_message: u64,
}

/// A sender device's transaction.
type Txn = (UserId, String, String);

/// Every user's devices and keys.
#[derive(Clone, Debug, Default)]
pub struct E2eeState {
    devices: HashMap<UserId, BTreeMap<String, E2eeDevice>>,
    removed: HashSet<(UserId, String)>,
    /// To-device transactions of the last [`TXN_KEPT_US`], with their times.
    txns: HashMap<Txn, u64>,
    /// The same, oldest first, to forget them.
    txn_order: VecDeque<(u64, Txn)>,
}

impl E2eeState {
    /// A live device.
    pub fn device(&self, user: UserId, device: &str) -> Option<&E2eeDevice> {
        self.devices.get(&user)?.get(device)
    }

    /// The user's devices that have uploaded identity keys, by device ID.
    pub fn listed(&self, user: UserId) -> impl Iterator<Item = (&str, &E2eeDevice)> {
        self.devices
            .get(&user)
            .into_iter()
            .flatten()
            .filter(|(_, d)| d.keys.is_some())
            .map(|(id, d)| (id.as_str(), d))
    }

    /// A device's to-device messages after `after`, at most `limit`, and whether more
    /// follow.
    pub fn to_device(
        &self,
        user: UserId,
        device: &str,
        after: u64,
        limit: usize,
    ) -> (Vec<ToDevice>, bool) {
        let Some(d) = self.device(user, device) else {
            return (Vec::new(), false);
        };
        let start = d.inbox.partition_point(|m| m.id <= after);
        let page: Vec<ToDevice> = d.inbox.iter().skip(start).take(limit).cloned().collect();
        let more = d.inbox.len() > start + page.len();
        (page, more)
    }

    /// How many of a device's unacknowledged to-device messages have IDs up to `upto`.
    pub fn to_device_upto(&self, user: UserId, device: &str, upto: u64) -> usize {
        self.device(user, device)
            .map_or(0, |d| d.inbox.partition_point(|m| m.id <= upto))
    }

    /// How many one-time keys of a device are unclaimed.
    pub fn unclaimed(&self, user: UserId, device: &str) -> u32 {
        self.device(user, device)
            .map_or(0, |d| d.unclaimed.len() as u32)
    }

    /// Decides a command. `shares(a, b)` says whether two users share a workspace: keys of
    /// anyone else are never handed out.
    pub fn decide(
        &self,
        cmd: E2eeCommand,
        shares: impl Fn(UserId, UserId) -> bool,
    ) -> Result<E2eeDecision, DomainError> {
        Ok(match cmd {
            E2eeCommand::Register {
                user,
                device,
                at_us,
            } => {
                check_device_id(&device)?;
                if self.removed.contains(&(user, device.clone())) {
                    return Err(DomainError::Conflict(format!(
                        "device {device} was removed; sign in with another device_id"
                    )));
                }
                let mine = self.devices.get(&user);
                if mine.is_some_and(|m| m.contains_key(&device)) {
                    return Ok(E2eeDecision::Answer(E2eeOutcome::Registered));
                }
                if mine.map_or(0, BTreeMap::len) >= DEVICES_PER_USER_MAX {
                    return Err(DomainError::TooMany(format!(
                        "at most {DEVICES_PER_USER_MAX} devices per user; remove one first"
                    )));
                }
                E2eeDecision::Change(E2eeChange::DeviceRegistered {
                    user,
                    device,
                    at_us,
                })
            }
            E2eeCommand::Upload {
                user,
                device,
                upload,
            } => self.decide_upload(user, device, *upload)?,
            E2eeCommand::Claim { user, devices } => {
                if devices.len() > NAMES_PER_CALL_MAX {
                    return Err(DomainError::TooMany(format!(
                        "at most {NAMES_PER_CALL_MAX} devices per claim"
                    )));
                }
                let mut seen = HashSet::new();
                let mut keys = Vec::new();
                for (owner, name) in devices {
                    if !seen.insert((owner, name.clone())) || !shares(user, owner) {
                        continue;
                    }
                    let Some(d) = self.device(owner, &name) else {
                        continue;
                    };
                    let (id, fallback) = match (d.unclaimed.first(), &d.fallback) {
                        (Some(id), _) => (id, false),
                        (None, Some(id)) => (id, true),
                        (None, None) => continue,
                    };
                    keys.push(ClaimedKey {
                        user: owner,
                        device: name,
                        key: DeviceKey {
                            id: id.clone(),
                            key: d.key_ids[id].clone(),
                        },
                        fallback,
                    });
                }
                if keys.iter().all(|k| k.fallback) {
                    E2eeDecision::Answer(E2eeOutcome::Claimed(keys))
                } else {
                    E2eeDecision::Change(E2eeChange::KeysClaimed { by: user, keys })
                }
            }
            E2eeCommand::Remove { user, device } => {
                if self.device(user, &device).is_none() {
                    return Err(DomainError::NotFound("device"));
                }
                E2eeDecision::Change(E2eeChange::DeviceRemoved { user, device })
            }
            E2eeCommand::SendToDevice {
                user,
                device,
                txn_id,
                messages,
                at_us,
            } => self.decide_send(user, device, txn_id, messages, at_us, shares)?,
            E2eeCommand::AckToDevice { user, device, upto } => {
                let d = self
                    .device(user, &device)
                    .ok_or(DomainError::NotFound("device"))?;
                if d.inbox.front().is_none_or(|m| m.id > upto) {
                    E2eeDecision::Answer(E2eeOutcome::ToDeviceAcked)
                } else {
                    E2eeDecision::Change(E2eeChange::ToDeviceAcked { user, device, upto })
                }
            }
        })
    }

    fn decide_send(
        &self,
        user: UserId,
        device: String,
        txn_id: String,
        messages: Vec<(UserId, String, String)>,
        at_us: u64,
        shares: impl Fn(UserId, UserId) -> bool,
    ) -> Result<E2eeDecision, DomainError> {
        if self.device(user, &device).is_none() {
            return Err(DomainError::NotFound("device"));
        }
        let printable = txn_id.bytes().all(|b| b.is_ascii_graphic());
        if txn_id.is_empty() || txn_id.len() > TXN_ID_BYTES_MAX || !printable {
            return Err(DomainError::Invalid(format!(
                "txn_id is 1 to {TXN_ID_BYTES_MAX} printable ASCII characters"
            )));
        }
        let txn = (user, device, txn_id);
        if self
            .txns
            .get(&txn)
            .is_some_and(|at| at_us < at.saturating_add(TXN_KEPT_US))
        {
            return Ok(E2eeDecision::Answer(E2eeOutcome::ToDeviceSent));
        }
        if messages.len() > NAMES_PER_CALL_MAX {
            return Err(DomainError::TooMany(format!(
                "at most {NAMES_PER_CALL_MAX} to-device messages per call"
            )));
        }
        let mut taken: HashMap<(UserId, &str), u64> = HashMap::new();
        let mut out = Vec::new();
        for (to, name, content) in &messages {
            if content.len() > TO_DEVICE_CONTENT_BYTES_MAX {
                return Err(DomainError::TooLarge(format!(
                    "a to-device content is at most {TO_DEVICE_CONTENT_BYTES_MAX} bytes"
                )));
            }
            // Devices of users who share no workspace with the sender, and devices that do
            // not exist, get nothing, and the sender is not told which.
            let Some(d) = self.device(*to, name).filter(|_| shares(user, *to)) else {
                continue;
            };
            let n = taken.entry((*to, name.as_str())).or_default();
            if d.inbox.len() + *n as usize >= TO_DEVICE_QUEUE_MAX {
                return Err(DomainError::QueueFull(format!(
                    "device {name} of {to} holds {TO_DEVICE_QUEUE_MAX} unacknowledged to-device messages; nothing was sent"
                )));
            }
            let id = d.next_message.max(1) + *n;
            *n += 1;
            out.push(ToDeviceFor {
                user: *to,
                device: name.clone(),
                message: ToDevice {
                    id,
                    sender: user,
                    sender_device: txn.1.clone(),
                    content: content.clone(),
                },
            });
        }
        let (sender, sender_device, txn_id) = txn;
        Ok(E2eeDecision::Change(E2eeChange::ToDeviceSent {
            sender,
            sender_device,
            txn_id,
            at_us,
            messages: out,
        }))
    }

    fn decide_upload(
        &self,
        user: UserId,
        device: String,
        upload: KeysUpload,
    ) -> Result<E2eeDecision, DomainError> {
        let d = self
            .device(user, &device)
            .ok_or(DomainError::NotFound("device"))?;
        let count = upload.one_time_keys.len() + upload.fallback_key.is_some() as usize;
        if count > KEYS_PER_UPLOAD_MAX {
            return Err(DomainError::TooMany(format!(
                "at most {KEYS_PER_UPLOAD_MAX} keys per upload"
            )));
        }
        let device_keys =
            match upload.device_keys {
                None => None,
                Some(k) => {
                    check_device_keys(user, &device, &k)?;
                    match &d.keys {
                        None => Some(k),
                        Some(old) if *old == k => None,
                        Some(_) => return Err(DomainError::KeyConflict(
                            "this device's keys are set and cannot change; sign in as a new device"
                                .into(),
                        )),
                    }
                }
            };
        // A key is new, the same again (nothing to do), or a conflict.
        let is_new = |k: &DeviceKey| -> Result<bool, DomainError> {
            check_key_id(&k.id)?;
            check_key("a one-time or fallback key", &k.key, 32)?;
            match d.key_ids.get(&k.id) {
                Some(key) if *key == k.key => Ok(false),
                Some(_) => Err(DomainError::KeyConflict(format!(
                    "key id {} is already used for another key",
                    k.id
                ))),
                None => Ok(true),
            }
        };
        let mut one_time_keys = Vec::new();
        for k in &upload.one_time_keys {
            if is_new(k)? {
                one_time_keys.push(k.clone());
            }
        }
        let fallback_key = match &upload.fallback_key {
            Some(k) if is_new(k)? => Some(k.clone()),
            _ => None,
        };
        if fallback_key
            .as_ref()
            .is_some_and(|f| one_time_keys.iter().any(|k| k.id == f.id))
        {
            return Err(DomainError::KeyConflict(
                "a fallback key's id is also a one-time key's".into(),
            ));
        }
        let mut ids = BTreeSet::new();
        if one_time_keys.iter().any(|k| !ids.insert(k.id.as_str())) {
            // Two one-time keys of one upload under one ID: JSON objects cannot carry it,
            // but the engine's callers are not only JSON.
            return Err(DomainError::KeyConflict(
                "two one-time keys of this upload share an id".into(),
            ));
        }
        if d.unclaimed.len() + one_time_keys.len() > ONE_TIME_KEYS_MAX {
            return Err(DomainError::TooMany(format!(
                "a device holds at most {ONE_TIME_KEYS_MAX} unclaimed one-time keys; it has {}",
                d.unclaimed.len()
            )));
        }
        if device_keys.is_none() && one_time_keys.is_empty() && fallback_key.is_none() {
            return Ok(E2eeDecision::Answer(E2eeOutcome::KeyCount(
                d.unclaimed.len() as u32,
            )));
        }
        Ok(E2eeDecision::Change(E2eeChange::KeysUploaded {
            user,
            device,
            device_keys,
            one_time_keys,
            fallback_key,
        }))
    }

    /// Applies a committed change.
    pub fn apply(&mut self, change: &E2eeChange) {
        match change {
            E2eeChange::DeviceRegistered {
                user,
                device,
                at_us,
            } => {
                self.devices.entry(*user).or_default().insert(
                    device.clone(),
                    E2eeDevice {
                        created_at_us: *at_us,
                        keys: None,
                        key_ids: HashMap::new(),
                        unclaimed: BTreeSet::new(),
                        fallback: None,
                        inbox: VecDeque::new(),
                        next_message: 1,
                    },
                );
            }
            E2eeChange::KeysUploaded {
                user,
                device,
                device_keys,
                one_time_keys,
                fallback_key,
            } => {
                let Some(d) = self.devices.get_mut(user).and_then(|m| m.get_mut(device)) else {
                    return;
                };
                if let Some(k) = device_keys {
                    d.keys = Some(k.clone());
                }
                for k in one_time_keys {
                    d.key_ids.insert(k.id.clone(), k.key.clone());
                    d.unclaimed.insert(k.id.clone());
                }
                if let Some(k) = fallback_key {
                    d.key_ids.insert(k.id.clone(), k.key.clone());
                    d.fallback = Some(k.id.clone());
                }
            }
            E2eeChange::KeysClaimed { keys, .. } => {
                for k in keys.iter().filter(|k| !k.fallback) {
                    if let Some(d) = self
                        .devices
                        .get_mut(&k.user)
                        .and_then(|m| m.get_mut(&k.device))
                    {
                        d.unclaimed.remove(&k.key.id);
                    }
                }
            }
            E2eeChange::DeviceRemoved { user, device } => {
                if let Some(m) = self.devices.get_mut(user) {
                    m.remove(device);
                    if m.is_empty() {
                        self.devices.remove(user);
                    }
                }
                self.removed.insert((*user, device.clone()));
            }
            E2eeChange::ToDeviceSent {
                sender,
                sender_device,
                txn_id,
                at_us,
                messages,
            } => {
                while let Some((at, _)) = self.txn_order.front() {
                    if at.saturating_add(TXN_KEPT_US) > *at_us {
                        break;
                    }
                    let (at, old) = self.txn_order.pop_front().expect("front");
                    if self.txns.get(&old) == Some(&at) {
                        self.txns.remove(&old);
                    }
                }
                let txn = (*sender, sender_device.clone(), txn_id.clone());
                self.txns.insert(txn.clone(), *at_us);
                self.txn_order.push_back((*at_us, txn));
                for m in messages {
                    let d = self
                        .devices
                        .get_mut(&m.user)
                        .and_then(|ds| ds.get_mut(&m.device));
                    if let Some(d) = d {
                        d.next_message = m.message.id + 1;
                        d.inbox.push_back(m.message.clone());
                    }
                }
            }
            E2eeChange::ToDeviceAcked { user, device, upto } => {
                let d = self.devices.get_mut(user).and_then(|ds| ds.get_mut(device));
                if let Some(d) = d {
                    while d.inbox.front().is_some_and(|m| m.id <= *upto) {
                        d.inbox.pop_front();
                    }
                }
            }
        }
    }
}

/// The bytes a device's ed25519 key signs: the JSON object of its curve25519 key, device
/// ID, ed25519 key and user ID, keys sorted, no whitespace (`API.md` §14).
pub fn canonical_device_json(
    user: UserId,
    device: &str,
    curve25519: &str,
    ed25519: &str,
) -> String {
    let q = |s: &str| serde_json::to_string(s).expect("a string serializes");
    format!(
        "{{\"curve25519\":{},\"device_id\":{},\"ed25519\":{},\"user_id\":{}}}",
        q(curve25519),
        q(device),
        q(ed25519),
        q(&user.to_string())
    )
}

/// Checks a device ID: 1 to [`DEVICE_ID_BYTES_MAX`] ASCII letters, digits, `-`, `_` or `.`.
pub fn check_device_id(device: &str) -> Result<(), DomainError> {
    let ok = !device.is_empty()
        && device.len() <= DEVICE_ID_BYTES_MAX
        && device
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(DomainError::Invalid(format!(
            "device_id is 1 to {DEVICE_ID_BYTES_MAX} ASCII letters, digits, '-', '_' or '.'"
        )))
    }
}

fn check_key_id(id: &str) -> Result<(), DomainError> {
    let ok = !id.is_empty()
        && id.len() <= KEY_ID_BYTES_MAX
        && id.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'+' | b'/')
        });
    if ok {
        Ok(())
    } else {
        Err(DomainError::Invalid(format!(
            "a key id is 1 to {KEY_ID_BYTES_MAX} ASCII letters, digits, or '-_.:+/'"
        )))
    }
}

/// Decodes an unpadded base64 key of `len` bytes.
fn check_key(what: &str, key: &str, len: usize) -> Result<Vec<u8>, DomainError> {
    STANDARD_NO_PAD
        .decode(key)
        .ok()
        .filter(|b| b.len() == len)
        .ok_or_else(|| DomainError::Invalid(format!("{what} is {len} bytes in unpadded base64")))
}

/// Checks a device's keys: well-formed, and signed by its ed25519 key over
/// [`canonical_device_json`].
pub fn check_device_keys(user: UserId, device: &str, k: &DeviceKeys) -> Result<(), DomainError> {
    check_key("curve25519", &k.curve25519, 32)?;
    let ed = check_key("ed25519", &k.ed25519, 32)?;
    let sig = STANDARD_NO_PAD
        .decode(&k.signature)
        .ok()
        .and_then(|b| <[u8; 64]>::try_from(b).ok())
        .ok_or_else(|| {
            DomainError::BadSignature("signature is 64 bytes in unpadded base64".into())
        })?;
    let key = ed25519_dalek::VerifyingKey::from_bytes(&ed.try_into().expect("32 bytes"))
        .map_err(|_| DomainError::BadSignature("ed25519 is not a valid public key".into()))?;
    let signed = canonical_device_json(user, device, &k.curve25519, &k.ed25519);
    key.verify_strict(
        signed.as_bytes(),
        &ed25519_dalek::Signature::from_bytes(&sig),
    )
    .map_err(|_| {
        DomainError::BadSignature(
            "signature does not verify over the device's canonical JSON".into(),
        )
    })
}

#[cfg(test)]
mod tests;
