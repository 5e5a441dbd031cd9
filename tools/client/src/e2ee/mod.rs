//! The cryptography of end-to-end encrypted DMs (`API.md` §14), on vodozemac: Olm sessions
//! between devices carry Megolm session keys, and Megolm encrypts channel messages once for
//! every member device. The server only stores and relays what this module produces.
//!
//! - [`DeviceAccount`] is a device's identity and the key upload body it publishes;
//!   [`verify_device_keys`] is the check of another device's keys.

mod account;
mod keys;

pub use account::{DeviceAccount, ONE_TIME_KEYS_PUBLISHED_MAX};
pub use keys::{canonical_device_json, verify_device_keys, DeviceKeys, KeyCheckError, PeerDevice};
