//! The key file: an [`E2eeManager`] saved to disk and loaded back, encrypted at rest with a
//! key derived from a passphrase.
//!
//! Format, version 1 (all integers big-endian):
//!
//! | bytes | field |
//! |---|---|
//! | 12 | magic `CHORUS-E2EE\0` |
//! | 1 | format version, 1 |
//! | 4, 4, 4 | argon2id memory (KiB), passes, lanes |
//! | 16 | argon2id salt |
//! | 12 | ChaCha20-Poly1305 nonce |
//! | rest | ChaCha20-Poly1305 ciphertext and tag of the JSON snapshot |
//!
//! The header is the AEAD's associated data, so a changed parameter fails like a wrong
//! passphrase instead of deriving another key. Each save draws a new salt and nonce, so a
//! key and nonce pair is never used twice. The snapshot holds vodozemac pickles (the
//! account, Olm sessions, Megolm sessions) and the verified devices; it exists in the clear
//! only in memory, and is wiped after use. A save writes a temporary file beside the
//! target, fsyncs it, renames it over the target and fsyncs the directory, so a crash
//! leaves the old file or the new one, never a mix.

use super::account::DeviceAccount;
use super::manager::{DeviceRef, E2eeManager};
use super::megolm::{InboundGroup, OutboundGroup};
use super::PeerDevice;
use argon2::{Algorithm, Argon2, Params, Version};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use vodozemac::megolm::{
    GroupSession, GroupSessionPickle, InboundGroupSession, InboundGroupSessionPickle,
};
use vodozemac::olm::{AccountPickle, Session, SessionPickle};
use zeroize::Zeroizing;

/// The first bytes of every key file.
pub const KEY_FILE_MAGIC: &[u8; 12] = b"CHORUS-E2EE\0";
/// The key file format this code writes.
pub const KEY_FILE_VERSION: u8 = 1;
/// argon2id memory per derivation, in KiB (19 MiB, OWASP's floor for argon2id).
pub const KDF_MEMORY_KIB: u32 = 19 * 1024;
/// argon2id passes.
pub const KDF_PASSES: u32 = 2;
/// argon2id lanes.
pub const KDF_LANES: u32 = 1;
/// The most argon2id memory a key file may ask for, in KiB: a damaged or hostile header
/// must not make loading allocate without bound.
pub const KDF_MEMORY_KIB_MAX: u32 = 1024 * 1024;
/// The most argon2id passes a key file may ask for.
pub const KDF_PASSES_MAX: u32 = 64;
/// The most argon2id lanes a key file may ask for.
pub const KDF_LANES_MAX: u32 = 16;

const SALT_BYTES: usize = 16;
const NONCE_BYTES: usize = 12;
const HEADER_BYTES: usize = KEY_FILE_MAGIC.len() + 1 + 12 + SALT_BYTES + NONCE_BYTES;

/// Why a key file could not be written.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    /// Writing, syncing or renaming failed; the previous file, if any, is intact.
    #[error("could not write the key file {path}: {source}")]
    Io {
        /// The file being written.
        path: PathBuf,
        /// What the file system said.
        source: io::Error,
    },
}

/// Why a key file could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("could not read the key file {path}: {source}")]
    Io {
        /// The file being read.
        path: PathBuf,
        /// What the file system said.
        source: io::Error,
    },
    /// The file does not start like a key file, or is too short to be one.
    #[error("not a Chorus key file")]
    NotAKeyFile,
    /// The file was written in a format this code does not read.
    #[error("key file format {0} is not supported (this code reads format {KEY_FILE_VERSION})")]
    UnsupportedVersion(u8),
    /// The header asks for key derivation parameters out of bounds.
    #[error("the key file's key derivation parameters are out of bounds")]
    BadParameters,
    /// Decryption failed: the passphrase is wrong, or the file was altered.
    #[error("wrong passphrase (or the key file was altered)")]
    WrongPassphrase,
    /// The file decrypted but its contents are not a snapshot this code reads.
    #[error("the key file decrypted but its contents are damaged: {0}")]
    Corrupt(String),
}

#[derive(Serialize, Deserialize)]
struct Snapshot {
    user_id: String,
    device_id: String,
    account: AccountPickle,
    devices: Vec<PeerDevice>,
    olm: Vec<(String, Vec<SessionPickle>)>,
    outbound: Vec<OutboundRecord>,
    inbound: Vec<InboundRecord>,
}

#[derive(Serialize, Deserialize)]
struct OutboundRecord {
    channel_id: String,
    session: GroupSessionPickle,
    shared_with: Vec<DeviceRef>,
}

#[derive(Serialize, Deserialize)]
struct InboundRecord {
    sender_key: String,
    channel_id: String,
    sender_id: String,
    sender_device_id: String,
    session: InboundGroupSessionPickle,
}

impl E2eeManager {
    /// This state, encrypted under `passphrase` in the key file format.
    pub fn to_encrypted_bytes(&self, passphrase: &str) -> Vec<u8> {
        let snapshot = self.snapshot();
        let json = Zeroizing::new(serde_json::to_vec(&snapshot).expect("pickles serialize"));
        seal(passphrase.as_bytes(), &json)
    }

    /// The state encrypted in `bytes` by [`E2eeManager::to_encrypted_bytes`].
    pub fn from_encrypted_bytes(bytes: &[u8], passphrase: &str) -> Result<Self, LoadError> {
        let json = open(passphrase.as_bytes(), bytes)?;
        let snapshot: Snapshot =
            serde_json::from_slice(&json).map_err(|e| LoadError::Corrupt(e.to_string()))?;
        Ok(Self::from_snapshot(snapshot))
    }

    /// Writes this state to `path`, encrypted under `passphrase`, replacing the file
    /// atomically. The count of undecryptable messages is not saved.
    pub fn save(&self, path: &Path, passphrase: &str) -> Result<(), SaveError> {
        let bytes = self.to_encrypted_bytes(passphrase);
        write_atomically(path, &bytes).map_err(|source| SaveError::Io {
            path: path.to_owned(),
            source,
        })
    }

    /// Reads the state saved at `path` with `passphrase`.
    pub fn load(path: &Path, passphrase: &str) -> Result<Self, LoadError> {
        let bytes = fs::read(path).map_err(|source| LoadError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_encrypted_bytes(&bytes, passphrase)
    }

    fn snapshot(&self) -> Snapshot {
        let mut devices: Vec<PeerDevice> = self.devices.values().cloned().collect();
        devices.sort_by(|a, b| (&a.user_id, &a.device_id).cmp(&(&b.user_id, &b.device_id)));
        let olm = self
            .olm
            .iter()
            .map(|(key, sessions)| (key.clone(), sessions.iter().map(Session::pickle).collect()))
            .collect();
        let outbound = self
            .outbound
            .iter()
            .map(|(channel_id, group)| OutboundRecord {
                channel_id: channel_id.clone(),
                session: group.session.pickle(),
                shared_with: group.shared_with.iter().cloned().collect(),
            })
            .collect();
        let inbound = self
            .inbound
            .iter()
            .map(|((sender_key, _), group)| InboundRecord {
                sender_key: sender_key.clone(),
                channel_id: group.channel_id.clone(),
                sender_id: group.sender_id.clone(),
                sender_device_id: group.sender_device_id.clone(),
                session: group.session.pickle(),
            })
            .collect();
        Snapshot {
            user_id: self.account.user_id().to_owned(),
            device_id: self.account.device_id().to_owned(),
            account: self.account.pickle(),
            devices,
            olm,
            outbound,
            inbound,
        }
    }

    fn from_snapshot(snapshot: Snapshot) -> Self {
        let account =
            DeviceAccount::from_pickle(snapshot.user_id, snapshot.device_id, snapshot.account);
        let mut manager = E2eeManager::new(account);
        for device in snapshot.devices {
            let key = (device.user_id.clone(), device.device_id.clone());
            manager.devices.insert(key, device);
        }
        for (key, sessions) in snapshot.olm {
            let sessions = sessions.into_iter().map(Session::from_pickle).collect();
            manager.olm.insert(key, sessions);
        }
        for record in snapshot.outbound {
            let group = OutboundGroup {
                session: GroupSession::from_pickle(record.session),
                shared_with: record.shared_with.into_iter().collect(),
            };
            manager.outbound.insert(record.channel_id, group);
        }
        for record in snapshot.inbound {
            let session = InboundGroupSession::from_pickle(record.session);
            let key = (record.sender_key, session.session_id());
            let group = InboundGroup {
                session,
                channel_id: record.channel_id,
                sender_id: record.sender_id,
                sender_device_id: record.sender_device_id,
            };
            manager.inbound.insert(key, group);
        }
        manager
    }
}

/// Encrypts `plaintext` under a key derived from `passphrase` with a new salt and nonce,
/// answering the whole key file.
fn seal(passphrase: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let mut salt = [0u8; SALT_BYTES];
    let mut nonce = [0u8; NONCE_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut salt);
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let mut header = Vec::with_capacity(HEADER_BYTES);
    header.extend_from_slice(KEY_FILE_MAGIC);
    header.push(KEY_FILE_VERSION);
    for n in [KDF_MEMORY_KIB, KDF_PASSES, KDF_LANES] {
        header.extend_from_slice(&n.to_be_bytes());
    }
    header.extend_from_slice(&salt);
    header.extend_from_slice(&nonce);
    assert_eq!(header.len(), HEADER_BYTES);
    let params = Params::new(KDF_MEMORY_KIB, KDF_PASSES, KDF_LANES, Some(32))
        .expect("the built-in parameters are valid");
    let key = derive_key(passphrase, &salt, params);
    let cipher = ChaCha20Poly1305::new(&Key::from(*key));
    let payload = Payload {
        msg: plaintext,
        aad: &header,
    };
    let ciphertext = cipher
        .encrypt(&Nonce::from(nonce), payload)
        .expect("ChaCha20-Poly1305 encrypts any length this process can hold");
    let mut file = header;
    file.extend_from_slice(&ciphertext);
    file
}

/// Decrypts a key file made by [`seal`], checking its header first.
fn open(passphrase: &[u8], file: &[u8]) -> Result<Zeroizing<Vec<u8>>, LoadError> {
    if file.len() < HEADER_BYTES || !file.starts_with(KEY_FILE_MAGIC) {
        return Err(LoadError::NotAKeyFile);
    }
    let (header, ciphertext) = file.split_at(HEADER_BYTES);
    let version = header[KEY_FILE_MAGIC.len()];
    if version != KEY_FILE_VERSION {
        return Err(LoadError::UnsupportedVersion(version));
    }
    let at = KEY_FILE_MAGIC.len() + 1;
    let word = |i: usize| {
        let start = at + 4 * i;
        u32::from_be_bytes(header[start..start + 4].try_into().expect("4 bytes"))
    };
    let (memory, passes, lanes) = (word(0), word(1), word(2));
    if memory > KDF_MEMORY_KIB_MAX || passes > KDF_PASSES_MAX || lanes > KDF_LANES_MAX {
        return Err(LoadError::BadParameters);
    }
    let params =
        Params::new(memory, passes, lanes, Some(32)).map_err(|_| LoadError::BadParameters)?;
    let salt = &header[at + 12..at + 12 + SALT_BYTES];
    let nonce: [u8; NONCE_BYTES] = header[at + 12 + SALT_BYTES..]
        .try_into()
        .expect("the header ends with the nonce");
    let key = derive_key(passphrase, salt, params);
    let cipher = ChaCha20Poly1305::new(&Key::from(*key));
    let payload = Payload {
        msg: ciphertext,
        aad: header,
    };
    cipher
        .decrypt(&Nonce::from(nonce), payload)
        .map(Zeroizing::new)
        .map_err(|_| LoadError::WrongPassphrase)
}

fn derive_key(passphrase: &[u8], salt: &[u8], params: Params) -> Zeroizing<[u8; 32]> {
    let mut key = Zeroizing::new([0u8; 32]);
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password_into(passphrase, salt, key.as_mut_slice())
        .expect("the salt and output lengths are fixed and valid");
    key
}

/// Replaces `path` with `bytes`: a new temporary file beside it (readable by its owner
/// only), written and fsynced, renamed over `path`, and the directory fsynced so that the
/// rename itself survives a crash.
fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the path names no file"))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let temp = dir.join(format!(
        ".{}.{:016x}.tmp",
        name.to_string_lossy(),
        rand::random::<u64>()
    ));
    let written = write_and_sync(&temp, bytes).and_then(|()| fs::rename(&temp, path));
    if written.is_err() {
        // Best effort: the temporary file is useless, and the error that matters is returned.
        let _ = fs::remove_file(&temp);
    }
    written?;
    File::open(dir)?.sync_all()
}

fn write_and_sync(temp: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(temp)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    // A sealed file opens with its passphrase only, and any changed byte fails the same way.
    #[test]
    fn seal_and_open() {
        let file = seal(b"correct horse", b"secret snapshot");
        assert_eq!(
            open(b"correct horse", &file).unwrap().as_slice(),
            b"secret snapshot"
        );
        assert!(matches!(
            open(b"wrong", &file),
            Err(LoadError::WrongPassphrase)
        ));
        for at in [KEY_FILE_MAGIC.len() + 4, HEADER_BYTES - 1, file.len() - 1] {
            let mut altered = file.clone();
            altered[at] ^= 1;
            let err = open(b"correct horse", &altered).unwrap_err();
            assert!(
                matches!(err, LoadError::WrongPassphrase),
                "byte {at}: {err}"
            );
        }
    }

    // Headers that are not ours, from another version or asking for huge parameters are
    // refused before any key is derived.
    #[test]
    fn bad_headers_are_refused() {
        let file = seal(b"pw", b"x");
        assert!(matches!(
            open(b"pw", &file[..10]),
            Err(LoadError::NotAKeyFile)
        ));
        let mut other = file.clone();
        other[0] = b'X';
        assert!(matches!(open(b"pw", &other), Err(LoadError::NotAKeyFile)));
        let mut newer = file.clone();
        newer[KEY_FILE_MAGIC.len()] = 2;
        assert!(matches!(
            open(b"pw", &newer),
            Err(LoadError::UnsupportedVersion(2))
        ));
        let mut huge = file;
        huge[KEY_FILE_MAGIC.len() + 1] = 0xff;
        assert!(matches!(open(b"pw", &huge), Err(LoadError::BadParameters)));
    }

    // Two saves of the same state use different salts and nonces.
    #[test]
    fn every_seal_is_fresh() {
        let a = seal(b"pw", b"same");
        let b = seal(b"pw", b"same");
        assert_ne!(
            a[KEY_FILE_MAGIC.len() + 13..],
            b[KEY_FILE_MAGIC.len() + 13..]
        );
    }

    // A save replaces the file whole and leaves no temporary file behind.
    #[test]
    fn atomic_write_replaces_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        write_atomically(&path, b"one").unwrap();
        write_atomically(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("keys")]);
    }
}
