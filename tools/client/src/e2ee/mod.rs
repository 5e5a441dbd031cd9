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
//!
//! - `net` is the network edge: the §14 calls as [`crate::Session`] methods
//!   ([`crate::Session::publish_keys`], [`crate::Session::query_keys`],
//!   [`crate::Session::claim_keys`], [`crate::Session::send_to_device`], ...) and the steps
//!   that join them to a manager ([`crate::Session::share_group_key`]). The stream hands
//!   out `to_device` and `e2ee:keys_low` frames as [`crate::StreamItem`]s.
//!
//! API boundary: everything but `net` makes no network calls and knows no REST shapes
//! beyond the JSON of §14's bodies; `net` keeps no state. Deliberately absent so far:
//! cross-signing and user verification (a device is trusted when its own signature
//! verifies), key backup, and replay detection of a Megolm message index.
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

mod account;
mod keys;
mod manager;
mod megolm;
mod net;
mod olm;
mod store;

pub use account::{DeviceAccount, ONE_TIME_KEYS_PUBLISHED_MAX};
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
