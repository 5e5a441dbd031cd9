//! The cryptography of end-to-end encrypted DMs (`API.md` §14), on vodozemac: Olm sessions
//! between devices carry Megolm session keys, and Megolm encrypts channel messages once for
//! every member device. The server only stores and relays what this module produces.
//!
//! - [`DeviceAccount`] is a device's identity and the key upload body it publishes;
//!   [`verify_device_keys`] is the check of another device's keys.
//! - [`E2eeManager`] holds one device's sessions: Olm to-device messages
//!   ([`E2eeManager::encrypt_to_device`]), Megolm channel messages
//!   ([`E2eeManager::encrypt_channel_message`]), key sharing and rotation, and the count of
//!   messages it could not decrypt.
//! - [`E2eeManager::save`] and [`E2eeManager::load`] keep it in a file encrypted with a
//!   passphrase.
//! - [`ChannelDevices`] follows one encrypted channel's members and devices from its
//!   `device:added` / `device:removed` / `member:*` events, and its `devices_seq`;
//!   [`E2eeManager::receive`] takes one stream item for a channel: it keeps room keys from
//!   to-device messages, applies device events (discarding the outbound session when a
//!   device is removed or a member leaves, so the next send rotates the key) and decrypts
//!   `message:new` / `message:edited` ([`Incoming`]).
//!
//! - `net` is the network edge: the §14 calls as [`crate::Session`] methods
//!   ([`crate::Session::publish_keys`], [`crate::Session::query_keys`],
//!   [`crate::Session::claim_keys`], [`crate::Session::send_to_device`], ...) and the steps
//!   that join them to a manager ([`crate::Session::share_group_key`]). The stream hands
//!   out `to_device` and `e2ee:keys_low` frames as [`crate::StreamItem`]s.
//! - `channel_net` is the edge of encrypted channels: [`crate::Session::open_encrypted_dm`]
//!   opens one; [`crate::Session::send_encrypted`] (and [`crate::Session::edit_encrypted`])
//!   shares the key with every listed device that lacks it, encrypts, posts with the
//!   tracker's `devices_seq`, and on `stale_devices` catches the tracker up from the stream
//!   and resends under the same `client_msg_id`; [`crate::Session::receive_item`] is
//!   [`E2eeManager::receive`] after querying an unknown sender's keys.
//!
//! API boundary: everything but `net` and `channel_net` makes no network calls and knows
//! no REST shapes beyond the JSON of §14's bodies and messages; `net` and `channel_net`
//! keep no state (the caller owns the manager, the tracker and the stream). Deliberately
//! absent so far: cross-signing and user verification (a device is trusted when its own
//! signature verifies), key backup (a device reads nothing sent before it was listed in a
//! channel), and replay detection of a Megolm message index.
//!
//! In memory, without a server:
//!
//! ```
//! use chorus_client::e2ee::{DeviceAccount, E2eeManager, PeerDevice, Received};
//! let mut ada = E2eeManager::new(DeviceAccount::new("U1", "LAPTOP"));
//! let mut bob = E2eeManager::new(DeviceAccount::new("U2", "PHONE"));
//! // Each side verifies the other's published keys; Ada claims one of Bob's one-time keys.
//! let bob_device = PeerDevice::verified("U2", "PHONE", &bob.account().device_keys()).unwrap();
//! let ada_device = PeerDevice::verified("U1", "LAPTOP", &ada.account().device_keys()).unwrap();
//! let (_, otk) = bob.account_mut().generate_one_time_keys(1).pop_first().unwrap();
//! bob.account_mut().mark_keys_as_published();
//! ada.start_olm_session(&bob_device, &otk).unwrap();
//! bob.add_device(ada_device).unwrap();
//! // Ada shares the channel's Megolm key over Olm, then sends.
//! let batch = ada.share_group_key("C7", &[bob_device]).unwrap();
//! let content = &batch["U2"]["PHONE"];
//! assert!(matches!(bob.receive_to_device("U1", "LAPTOP", content), Ok(Received::RoomKey { .. })));
//! let ciphertext = ada.encrypt_channel_message("C7", "hello").unwrap();
//! assert_eq!(bob.decrypt_channel_message("C7", &ciphertext).unwrap().text, "hello");
//! ```
//!
//! Through a server, in an encrypted DM (the stream is fed from the channel's first
//! event, so the tracker sees every device the channel lists):
//!
//! ```no_run
//! # async fn demo(ada: chorus_client::Session, mut device: chorus_client::e2ee::E2eeManager,
//! #     workspace_id: &str, bob_id: &str) -> Result<(), chorus_client::Error> {
//! use chorus_client::e2ee::{ChannelDevices, Incoming};
//! use chorus_client::{new_client_msg_id, ConnectOptions};
//! let dm = ada.open_encrypted_dm(workspace_id, &[bob_id]).await?;
//! let since = Some([(dm.id.clone(), 0)].into());
//! let mut stream = ada.connect(ConnectOptions { since, ..ConnectOptions::default() }).await?;
//! let account = device.account();
//! let mut channel = ChannelDevices::new(&dm.id, account.user_id(), account.device_id());
//! ada.send_encrypted(&mut device, &mut channel, &mut stream, "hi Bob", &new_client_msg_id())
//!     .await?;
//! loop {
//!     let item = stream.next_item().await?;
//!     if let Incoming::Message { plaintext: Ok(p), .. } =
//!         ada.receive_item(&mut device, &mut channel, item).await?
//!     {
//!         println!("{}: {}", p.sender_id, p.text);
//!     }
//! }
//! # }
//! ```

mod account;
mod channel;
mod channel_net;
mod keys;
mod manager;
mod megolm;
mod net;
mod olm;
mod store;

pub use account::{DeviceAccount, ONE_TIME_KEYS_PUBLISHED_MAX};
pub use channel::{Applied, ChannelDevices, DeviceChange, Incoming};
pub use channel_net::{
    EncryptedPost, Via, DEVICE_CATCH_UP_TIMEOUT, STALE_DEVICES, STALE_DEVICES_ATTEMPTS_MAX,
};
pub use keys::{canonical_device_json, verify_device_keys, DeviceKeys, KeyCheckError, PeerDevice};
pub use manager::E2eeManager;
pub use megolm::{
    ChannelPlaintext, MegolmError, Received, ToDeviceBatch, ALGORITHM_MEGOLM, CIPHERTEXT_BYTES_MAX,
    GROUP_SESSION_MESSAGES_MAX, ROOM_KEY_TYPE,
};
pub use net::{
    new_txn_id, ClaimedKey, QueriedDevices, RejectedDevice, TO_DEVICE_SEND_ATTEMPTS_MAX,
};
pub use olm::{OlmError, ALGORITHM_OLM, SESSIONS_PER_DEVICE_MAX, TO_DEVICE_CONTENT_BYTES_MAX};
pub use store::{
    LoadError, SaveError, KDF_LANES, KDF_LANES_MAX, KDF_MEMORY_KIB, KDF_MEMORY_KIB_MAX, KDF_PASSES,
    KDF_PASSES_MAX, KEY_FILE_MAGIC, KEY_FILE_VERSION,
};
