//! An encrypted channel as one device sees it (`API.md` §14), without I/O:
//! [`ChannelDevices`] follows the channel's members and devices from its events, and
//! [`E2eeManager::receive`] takes one stream item (a to-device message, a device or
//! membership event, a message) and does what it means for the channel.
//!
//! # The device list
//!
//! The server makes devices part of the channel's order: `device:added` and
//! `device:removed` events, each with its own `seq`. The tracker applies events in seq
//! order and ignores any at or below the last one it applied, so a repeat (a resume that
//! overlaps) changes nothing. `devices_seq` is the seq of the newest device event applied:
//! a send names it, and the server refuses the send (`stale_devices`) if the channel has a
//! newer device event, so a message is never encrypted for a device list older than the
//! channel's.
//!
//! # What a device can read
//!
//! A Megolm key reaches a device only once the channel lists it: a message whose event
//! comes after the device's own `device:added` was sent by someone who knew the device
//! (the server checked `devices_seq`), so it must decrypt, and a failure is counted in
//! [`E2eeManager::undecryptable`]. A message from before that event was never meant for
//! the device (there is no key backup), so it is reported as
//! [`Incoming::BeforeThisDevice`] and not tried.
//!
//! Rotation: a removed device, or a member leaving, discards this device's outbound
//! session of the channel, so the next send shares a new key with the devices that remain
//! and with no other.

use super::manager::{DeviceRef, E2eeManager};
use super::{ChannelPlaintext, MegolmError, OlmError, Received};
use crate::stream::{Event, StreamItem};
use crate::types::Message;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeSet;

/// The members and devices of one encrypted channel, from its events. It serializes, so an
/// application can keep it with its other state and, after a restart, resume the channel's
/// stream from [`ChannelDevices::last_seq`] instead of from the first event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelDevices {
    channel_id: String,
    /// This device, `(user_id, device_id)`.
    own: DeviceRef,
    members: BTreeSet<String>,
    devices: BTreeSet<DeviceRef>,
    devices_seq: u64,
    last_seq: u64,
    /// The seq of this device's own `device:added`, once seen.
    own_added_seq: Option<u64>,
    /// Whether the first event applied was the channel's first (seq 1), so that not
    /// having seen this device's `device:added` means it is not listed yet.
    from_first_event: bool,
}

/// A change of an encrypted channel's devices or members.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceChange {
    /// `device:added`: a member's device joined the channel's device list.
    Added {
        /// The device's user.
        user_id: String,
        /// The device.
        device_id: String,
    },
    /// `device:removed`: a member's device left the list (it was deleted).
    Removed {
        /// The device's user.
        user_id: String,
        /// The device.
        device_id: String,
    },
    /// `member:joined`.
    MemberJoined {
        /// The member.
        user_id: String,
    },
    /// `member:left`: the member's devices leave the list with them.
    MemberLeft {
        /// The member.
        user_id: String,
    },
}

impl DeviceChange {
    /// Whether the channel's outbound Megolm session must be discarded: someone who could
    /// read with it is gone.
    pub fn rotates(&self) -> bool {
        matches!(
            self,
            DeviceChange::Removed { .. } | DeviceChange::MemberLeft { .. }
        )
    }
}

/// What applying one event did to a [`ChannelDevices`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    /// Its seq was applied already (or is older): nothing changed.
    Repeat,
    /// It is not a device or membership event; only the last seq moved.
    Unchanged,
    /// The devices or members changed.
    Changed(DeviceChange),
}

impl ChannelDevices {
    /// The tracker of `channel_id` for the device `device_id` of `user_id`, before any
    /// event. Feed it every event of the channel from its first one (connect the stream
    /// with `since` naming the channel at 0), so that it sees the devices listed when the
    /// channel was made.
    pub fn new(channel_id: &str, user_id: &str, device_id: &str) -> ChannelDevices {
        ChannelDevices {
            channel_id: channel_id.to_owned(),
            own: (user_id.to_owned(), device_id.to_owned()),
            members: BTreeSet::new(),
            devices: BTreeSet::new(),
            devices_seq: 0,
            last_seq: 0,
            own_added_seq: None,
            from_first_event: false,
        }
    }

    /// The channel.
    pub fn channel_id(&self) -> &str {
        &self.channel_id
    }

    /// The seq of the newest device event applied (0 before any): what a send names.
    pub fn devices_seq(&self) -> u64 {
        self.devices_seq
    }

    /// The seq of the last event applied (0 before any).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// The channel's devices, `(user_id, device_id)`, sorted; this one included.
    pub fn devices(&self) -> impl Iterator<Item = (&str, &str)> {
        self.devices.iter().map(|(u, d)| (u.as_str(), d.as_str()))
    }

    /// Whether the device is in the channel's list.
    pub fn has_device(&self, user_id: &str, device_id: &str) -> bool {
        self.devices
            .contains(&(user_id.to_owned(), device_id.to_owned()))
    }

    /// The channel's members, sorted.
    pub fn members(&self) -> impl Iterator<Item = &str> {
        self.members.iter().map(String::as_str)
    }

    /// Whether a ciphertext of the event at `seq` was meant for this device: the event
    /// comes after this device's own `device:added`. When the tracker did not start at the
    /// channel's first event and has not seen that one, it cannot tell, and answers yes.
    pub fn meant_for_this_device(&self, seq: u64) -> bool {
        match self.own_added_seq {
            Some(added) => seq > added,
            None => !self.from_first_event,
        }
    }

    /// Applies the channel event at `seq` (the `event` object of an `event` frame).
    pub fn apply(&mut self, seq: u64, event: &Value) -> Applied {
        if seq <= self.last_seq {
            return Applied::Repeat;
        }
        if self.last_seq == 0 {
            self.from_first_event = seq == 1;
        }
        self.last_seq = seq;
        let Some(change) = change_of(event) else {
            return Applied::Unchanged;
        };
        self.change(seq, &change);
        Applied::Changed(change)
    }

    fn change(&mut self, seq: u64, change: &DeviceChange) {
        match change {
            DeviceChange::Added { user_id, device_id } => {
                let device = (user_id.clone(), device_id.clone());
                if device == self.own {
                    self.own_added_seq = Some(seq);
                }
                self.devices.insert(device);
                self.devices_seq = seq;
            }
            DeviceChange::Removed { user_id, device_id } => {
                self.devices.remove(&(user_id.clone(), device_id.clone()));
                self.devices_seq = seq;
            }
            DeviceChange::MemberJoined { user_id } => {
                self.members.insert(user_id.clone());
            }
            DeviceChange::MemberLeft { user_id } => {
                self.members.remove(user_id);
                self.devices.retain(|(user, _)| user != user_id);
            }
        }
    }
}

/// The device or membership change an event object describes, if any.
fn change_of(event: &Value) -> Option<DeviceChange> {
    let user_id = event["user_id"].as_str()?.to_owned();
    let device_id = || event["device_id"].as_str().map(str::to_owned);
    match event["type"].as_str()? {
        "device:added" => Some(DeviceChange::Added {
            user_id,
            device_id: device_id()?,
        }),
        "device:removed" => Some(DeviceChange::Removed {
            user_id,
            device_id: device_id()?,
        }),
        "member:joined" => Some(DeviceChange::MemberJoined { user_id }),
        "member:left" => Some(DeviceChange::MemberLeft { user_id }),
        _ => None,
    }
}

/// What one stream item meant for an encrypted channel and this device.
#[derive(Debug)]
pub enum Incoming {
    /// A to-device message, decrypted: a room key is kept for decrypting. Acknowledge its
    /// `id` once handled ([`crate::Stream::ack_to_device`]).
    ToDevice {
        /// The message's ID in this device's queue.
        id: String,
        /// What it was, or why it could not be read.
        received: Result<Received, OlmError>,
    },
    /// A `message:new` or `message:edited` of the channel, and its decryption (a failure
    /// is counted in [`E2eeManager::undecryptable`]).
    Message {
        /// The event's seq.
        seq: u64,
        /// The message as the server has it (`text` empty, the `ciphertext` set).
        message: Message,
        /// Its plaintext.
        plaintext: Result<ChannelPlaintext, MegolmError>,
    },
    /// A message of the channel sent before this device was listed in it: no key for it
    /// was ever shared with this device, so it is not tried.
    BeforeThisDevice {
        /// The event's seq.
        seq: u64,
        /// The message.
        message: Message,
    },
    /// The channel's devices or members changed (after a removal or a departure, the
    /// outbound session was discarded).
    Devices(DeviceChange),
    /// Anything else: another event of the channel (a reaction, a deletion), a repeat, an
    /// event of another channel, a key signal.
    Other(StreamItem),
}

impl E2eeManager {
    /// Takes one item of this device's stream for the encrypted channel `channel`: keeps
    /// the room key a to-device message carries, applies the channel's device and
    /// membership events (discarding the outbound session when someone leaves, see
    /// [`DeviceChange::rotates`]), and decrypts its messages. Feed it every item in the
    /// order the stream hands them out, so that a room key is kept before the message it
    /// opens. The sender of a to-device message must be known
    /// ([`E2eeManager::add_device`]); [`crate::Session::receive_item`] queries unknown
    /// senders first.
    pub fn receive(&mut self, channel: &mut ChannelDevices, item: StreamItem) -> Incoming {
        match item {
            StreamItem::ToDevice(m) => {
                let received =
                    self.receive_to_device(&m.sender_id, &m.sender_device_id, &m.content);
                Incoming::ToDevice { id: m.id, received }
            }
            StreamItem::Event(event) if event.channel_id == channel.channel_id => {
                self.receive_event(channel, event)
            }
            other => Incoming::Other(other),
        }
    }

    fn receive_event(&mut self, channel: &mut ChannelDevices, event: Event) -> Incoming {
        match channel.apply(event.seq, &event.event) {
            Applied::Repeat => Incoming::Other(StreamItem::Event(event)),
            Applied::Changed(change) => {
                self.follow_change(&channel.channel_id, &change);
                Incoming::Devices(change)
            }
            Applied::Unchanged => self.read_message(channel, event),
        }
    }

    /// Forgets a removed device and rotates the channel's key when someone left.
    fn follow_change(&mut self, channel_id: &str, change: &DeviceChange) {
        if let DeviceChange::Removed { user_id, device_id } = change {
            self.remove_device(user_id, device_id);
        }
        if change.rotates() {
            self.discard_outbound_session(channel_id);
        }
    }

    fn read_message(&mut self, channel: &ChannelDevices, event: Event) -> Incoming {
        let is_message = matches!(event.kind(), "message:new" | "message:edited");
        let message = event
            .message()
            .filter(|m| is_message && m.ciphertext.is_some());
        let Some(message) = message else {
            return Incoming::Other(StreamItem::Event(event));
        };
        let seq = event.seq;
        if !channel.meant_for_this_device(seq) {
            return Incoming::BeforeThisDevice { seq, message };
        }
        let plaintext = self.decrypt_message(&message);
        Incoming::Message {
            seq,
            message,
            plaintext,
        }
    }

    /// Decrypts a message of an encrypted channel (as delivered or listed by REST), and
    /// checks that the device that shared the session belongs to its author, so that the
    /// server cannot pass one member's message off as another's. Failures are counted in
    /// [`E2eeManager::undecryptable`]; a message without a ciphertext is
    /// [`MegolmError::Malformed`].
    pub fn decrypt_message(&mut self, message: &Message) -> Result<ChannelPlaintext, MegolmError> {
        let Some(ciphertext) = message.ciphertext.as_deref() else {
            self.undecryptable += 1;
            return Err(MegolmError::Malformed(
                "the message has no ciphertext".into(),
            ));
        };
        let plaintext = self.decrypt_channel_message(&message.channel_id, ciphertext)?;
        if plaintext.sender_id != message.user_id {
            self.undecryptable += 1;
            return Err(MegolmError::WrongSender {
                author: message.user_id.clone(),
                sender_id: plaintext.sender_id,
            });
        }
        Ok(plaintext)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::e2ee::{DeviceAccount, PeerDevice};
    use crate::types::ToDeviceMessage;
    use serde_json::json;

    const CHANNEL: &str = "C9";

    fn item(seq: u64, event: Value) -> StreamItem {
        StreamItem::Event(Event {
            channel_id: CHANNEL.into(),
            seq,
            event,
        })
    }

    fn added(user: &str, device: &str) -> Value {
        json!({"type": "device:added", "user_id": user, "device_id": device})
    }

    fn removed(user: &str, device: &str) -> Value {
        json!({"type": "device:removed", "user_id": user, "device_id": device})
    }

    fn joined(user: &str) -> Value {
        json!({"type": "member:joined", "user_id": user})
    }

    /// A `message:new` (or another `message:*` kind) event of `user` carrying `ciphertext`.
    fn message(kind: &str, seq: u64, user: &str, ciphertext: &str) -> Value {
        json!({"type": kind, "message": {
            "id": format!("M9-{seq}"), "channel_id": CHANNEL, "seq": seq, "user_id": user,
            "text": "", "thread_id": null, "reply_count": 0, "reactions": {},
            "edited_at": null, "deleted": false, "created_at": "2026-12-02T12:00:00Z",
            "client_msg_id": null, "ciphertext": ciphertext}})
    }

    /// The first events of a new encrypted DM of U1 (device A) and U2 (devices B, C).
    fn opening() -> Vec<StreamItem> {
        vec![
            item(1, joined("U1")),
            item(2, joined("U2")),
            item(3, added("U1", "A")),
            item(4, added("U2", "B")),
            item(5, added("U2", "C")),
        ]
    }

    fn names(channel: &ChannelDevices) -> Vec<String> {
        channel.devices().map(|(u, d)| format!("{u}/{d}")).collect()
    }

    fn apply_all(channel: &mut ChannelDevices, items: &[StreamItem]) -> Vec<Applied> {
        let mut applied = Vec::new();
        for i in items {
            let StreamItem::Event(e) = i else { continue };
            applied.push(channel.apply(e.seq, &e.event));
        }
        applied
    }

    // The tracker follows members and devices from the channel's events, names the seq of
    // the newest device event (a message does not move it), and ignores a repeat or an
    // older event.
    #[test]
    fn the_tracker_follows_device_events_in_seq_order() {
        let mut channel = ChannelDevices::new(CHANNEL, "U1", "A");
        apply_all(&mut channel, &opening());
        assert_eq!(names(&channel), ["U1/A", "U2/B", "U2/C"]);
        assert_eq!(channel.members().collect::<Vec<_>>(), ["U1", "U2"]);
        assert_eq!((channel.devices_seq(), channel.last_seq()), (5, 5));
        assert_eq!(
            channel.apply(6, &message("message:new", 6, "U1", "x")),
            Applied::Unchanged
        );
        assert_eq!(channel.devices_seq(), 5);
        // A resume that overlaps hands out seq 4 again: nothing changes.
        assert_eq!(channel.apply(4, &removed("U2", "B")), Applied::Repeat);
        assert_eq!(channel.apply(6, &added("U2", "D")), Applied::Repeat);
        assert!(channel.has_device("U2", "B"));
        let change = channel.apply(7, &removed("U2", "B"));
        let Applied::Changed(change) = change else {
            panic!("{change:?}")
        };
        assert!(change.rotates());
        assert_eq!(names(&channel), ["U1/A", "U2/C"]);
        assert_eq!(channel.devices_seq(), 7);
        let change = channel.apply(8, &added("U2", "D"));
        assert!(matches!(change, Applied::Changed(ref c) if !c.rotates()));
        assert_eq!((channel.devices_seq(), channel.last_seq()), (8, 8));
        let kept: ChannelDevices =
            serde_json::from_str(&serde_json::to_string(&channel).unwrap()).unwrap();
        assert_eq!(kept, channel, "kept across a restart");
    }

    // A tracker fed from the channel's first event knows that a device not listed yet was
    // not meant to read; one that started later cannot tell, and lets every message be
    // tried.
    #[test]
    fn what_a_device_was_meant_to_read() {
        let mut from_start = ChannelDevices::new(CHANNEL, "U2", "C");
        apply_all(&mut from_start, &opening()[..4]);
        assert!(!from_start.meant_for_this_device(4));
        from_start.apply(5, &added("U2", "C"));
        assert!(!from_start.meant_for_this_device(5));
        assert!(from_start.meant_for_this_device(6));
        let mut late = ChannelDevices::new(CHANNEL, "U2", "C");
        late.apply(9, &message("message:new", 9, "U1", "x"));
        assert!(late.meant_for_this_device(9));
    }

    // A member who leaves takes their devices out of the list, and that rotates the key;
    // a member's joining does not.
    #[test]
    fn a_member_leaving_takes_their_devices() {
        let mut channel = ChannelDevices::new(CHANNEL, "U1", "A");
        apply_all(&mut channel, &opening());
        let left = channel.apply(6, &json!({"type": "member:left", "user_id": "U2"}));
        let Applied::Changed(change) = left else {
            panic!("{left:?}")
        };
        assert!(change.rotates());
        assert_eq!(names(&channel), ["U1/A"]);
        assert_eq!(channel.members().collect::<Vec<_>>(), ["U1"]);
        let back = channel.apply(7, &joined("U2"));
        assert!(matches!(back, Applied::Changed(ref c) if !c.rotates()));
        // Malformed device events (no device) change nothing.
        let odd = channel.apply(8, &json!({"type": "device:added", "user_id": "U2"}));
        assert_eq!(odd, Applied::Unchanged);
    }

    /// Ada (U1/A) and Bob's device B, each knowing the other's keys, with an Olm session
    /// from Ada to B.
    fn pair() -> (E2eeManager, E2eeManager) {
        let mut ada = E2eeManager::new(DeviceAccount::new("U1", "A"));
        let mut bob = E2eeManager::new(DeviceAccount::new("U2", "B"));
        let b = peer(&bob);
        let (_, otk) = bob
            .account_mut()
            .generate_one_time_keys(1)
            .pop_first()
            .unwrap();
        bob.account_mut().mark_keys_as_published();
        ada.start_olm_session(&b, &otk).unwrap();
        bob.add_device(peer(&ada)).unwrap();
        (ada, bob)
    }

    fn peer(device: &E2eeManager) -> PeerDevice {
        let a = device.account();
        PeerDevice::verified(a.user_id(), a.device_id(), &a.device_keys()).unwrap()
    }

    /// Ada's key for the channel, shared with B, as the to-device item B's stream hands out.
    fn room_key_item(ada: &mut E2eeManager, bob: &E2eeManager, id: &str) -> StreamItem {
        let batch = ada.share_group_key(CHANNEL, &[peer(bob)]).unwrap();
        StreamItem::ToDevice(ToDeviceMessage {
            id: id.into(),
            sender_id: "U1".into(),
            sender_device_id: "A".into(),
            content: batch["U2"]["B"].clone(),
        })
    }

    // Bob's device takes the room key from the to-device item, then decrypts Ada's
    // message:new and message:edited events; a repeat is not decrypted twice, and a
    // reaction is just passed on. Nothing is undecryptable.
    #[test]
    fn receive_takes_the_key_then_decrypts() {
        let (mut ada, mut bob) = pair();
        let mut channel = ChannelDevices::new(CHANNEL, "U2", "B");
        for i in opening() {
            assert!(matches!(bob.receive(&mut channel, i), Incoming::Devices(_)));
        }
        let key = bob.receive(&mut channel, room_key_item(&mut ada, &bob, "1"));
        assert!(
            matches!(key, Incoming::ToDevice { ref id, received: Ok(Received::RoomKey { .. }) } if id == "1"),
            "{key:?}"
        );
        let first = ada.encrypt_channel_message(CHANNEL, "hello").unwrap();
        let got = bob.receive(
            &mut channel,
            item(6, message("message:new", 6, "U1", &first)),
        );
        let Incoming::Message { seq, plaintext, .. } = got else {
            panic!("{got:?}")
        };
        assert_eq!((seq, plaintext.unwrap().text.as_str()), (6, "hello"));
        let again = bob.receive(
            &mut channel,
            item(6, message("message:new", 6, "U1", &first)),
        );
        assert!(matches!(again, Incoming::Other(_)), "a repeat: {again:?}");
        let edit = ada
            .encrypt_channel_message(CHANNEL, "hello, edited")
            .unwrap();
        let got = bob.receive(
            &mut channel,
            item(7, message("message:edited", 6, "U1", &edit)),
        );
        let Incoming::Message { plaintext, .. } = got else {
            panic!("{got:?}")
        };
        assert_eq!(plaintext.unwrap().text, "hello, edited");
        let reaction = json!({"type": "reaction:added", "user_id": "U2", "emoji": "tada"});
        assert!(matches!(
            bob.receive(&mut channel, item(8, reaction)),
            Incoming::Other(_)
        ));
        assert_eq!(bob.undecryptable(), 0);
    }

    // A device listed after a message was sent does not try it (no key was ever meant for
    // it), and that is not counted as undecryptable; what comes after its device:added is
    // tried, and counted when it fails.
    #[test]
    fn messages_from_before_the_device_are_not_tried() {
        let (mut ada, mut bob) = pair();
        let mut channel = ChannelDevices::new(CHANNEL, "U2", "B");
        let start = [
            item(1, joined("U1")),
            item(2, joined("U2")),
            item(3, added("U1", "A")),
        ];
        apply_all(&mut channel, &start);
        ada.share_group_key(CHANNEL, &[]).unwrap();
        let early = ada.encrypt_channel_message(CHANNEL, "before B").unwrap();
        let got = bob.receive(
            &mut channel,
            item(4, message("message:new", 4, "U1", &early)),
        );
        assert!(
            matches!(got, Incoming::BeforeThisDevice { seq: 4, .. }),
            "{got:?}"
        );
        let got = bob.receive(&mut channel, item(5, added("U2", "B")));
        assert!(matches!(got, Incoming::Devices(DeviceChange::Added { .. })));
        assert!(!channel.meant_for_this_device(5) && channel.meant_for_this_device(6));
        bob.receive(&mut channel, room_key_item(&mut ada, &bob, "1"));
        let late = ada.encrypt_channel_message(CHANNEL, "after B").unwrap();
        let got = bob.receive(
            &mut channel,
            item(6, message("message:new", 6, "U1", &late)),
        );
        let Incoming::Message { plaintext, .. } = got else {
            panic!("{got:?}")
        };
        assert_eq!(plaintext.unwrap().text, "after B");
        assert_eq!(bob.undecryptable(), 0, "the early message is not counted");
        let got = bob.receive(
            &mut channel,
            item(7, message("message:new", 7, "U1", &early)),
        );
        assert!(
            matches!(
                got,
                Incoming::Message {
                    plaintext: Err(_),
                    ..
                }
            ),
            "{got:?}"
        );
        assert_eq!(
            bob.undecryptable(),
            1,
            "after its device:added, a failure counts"
        );
    }

    // A device:removed forgets the device and discards the outbound session, so the next
    // share makes a new session; a message whose author is not the key's sender is refused
    // and counted.
    #[test]
    fn removal_rotates_and_authors_are_checked() {
        let (mut ada, bob) = pair();
        let mut channel = ChannelDevices::new(CHANNEL, "U1", "A");
        apply_all(&mut channel, &opening());
        let _ = room_key_item(&mut ada, &bob, "1");
        let first = ada.outbound_session_id(CHANNEL).unwrap();
        let ciphertext = ada.encrypt_channel_message(CHANNEL, "mine").unwrap();
        let got = ada.receive(&mut channel, item(6, removed("U2", "C")));
        assert!(matches!(
            got,
            Incoming::Devices(DeviceChange::Removed { .. })
        ));
        assert_eq!(ada.outbound_session_id(CHANNEL), None, "discarded");
        assert!(ada.device("U2", "B").is_some());
        let got = ada.receive(&mut channel, item(7, removed("U2", "B")));
        assert!(matches!(got, Incoming::Devices(_)));
        assert!(ada.device("U2", "B").is_none(), "forgotten");
        ada.share_group_key(CHANNEL, &[]).unwrap();
        assert_ne!(ada.outbound_session_id(CHANNEL).unwrap(), first);
        // Ada's own message, attributed by the server to U2: refused.
        let forged: Message =
            serde_json::from_value(message("message:new", 8, "U2", &ciphertext)["message"].clone())
                .unwrap();
        let r = ada.decrypt_message(&forged);
        assert!(matches!(r, Err(MegolmError::WrongSender { .. })), "{r:?}");
        let mut honest = forged.clone();
        honest.user_id = "U1".into();
        assert_eq!(ada.decrypt_message(&honest).unwrap().text, "mine");
        honest.ciphertext = None;
        assert!(ada.decrypt_message(&honest).is_err());
        assert_eq!(ada.undecryptable(), 2);
    }
}
