//! Signed links to a file's content (`POST /files/{fid}/url`): a link that works without
//! a token until it expires, for `<img src>` and a CDN in front of the server.
//!
//! A link is `/api/v1/files/{fid}/content?expires={unix seconds}&sig={hex}`, where `sig` is
//! HMAC-SHA256 over the file ID and the expiry under a key kept in the data directory
//! (`file_url.key`, 32 random bytes, made at first start), so links survive a restart and
//! any change to the ID or the expiry breaks the signature. A cluster's nodes share one
//! key instead, derived from the JWT secret they share, so that a link one node made
//! works on every node. The link grants reading that
//! one file's content until it expires; a deleted file answers 404 all the same, because
//! the content route looks the file up on every request.

use chorus_engine::ids::FileId;
use ring::hmac;
use std::io::{self, Write};
use std::path::Path;

/// The key file's name in the data directory.
pub const KEY_FILE_NAME: &str = "file_url.key";
const KEY_BYTES: usize = 32;

/// Why a link was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// The signature does not match the file and expiry (or is not hex).
    #[error("the link's signature is not valid")]
    Tampered,
    /// The link's time is over.
    #[error("the link has expired")]
    Expired,
}

/// Signs and checks links.
pub struct Signer {
    key: hmac::Key,
}

impl Signer {
    /// Loads the key from `data_dir`, making it on first start.
    pub fn load_or_create(data_dir: &Path) -> io::Result<Signer> {
        let path = data_dir.join(KEY_FILE_NAME);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => create_key(&path)?,
            Err(e) => return Err(e),
        };
        if bytes.len() != KEY_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} must hold {KEY_BYTES} bytes", path.display()),
            ));
        }
        Ok(Signer::new(&bytes))
    }

    /// The signer every node of a cluster whose JWT secret is `secret` shares: its key is
    /// HMAC-SHA256 of a fixed label under the secret, so it reveals nothing of the secret
    /// and differs from every token's signature.
    pub fn for_cluster(secret: &[u8]) -> Signer {
        let derived = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, secret),
            b"chorus file links, version 1",
        );
        Signer::new(derived.as_ref())
    }

    /// A signer with this key.
    pub fn new(key: &[u8]) -> Signer {
        Signer {
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
        }
    }

    /// The link to `file` valid until `expires` (Unix seconds): a path and query.
    pub fn link(&self, file: FileId, expires: u64) -> String {
        let tag = hmac::sign(&self.key, message(file, expires).as_bytes());
        let sig: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        format!("/api/v1/files/{file}/content?expires={expires}&sig={sig}")
    }

    /// Checks a link's `expires` and `sig` for `file` at `now` (Unix seconds).
    pub fn check(&self, file: FileId, expires: &str, sig: &str, now: u64) -> Result<(), LinkError> {
        let expires: u64 = expires.parse().map_err(|_| LinkError::Tampered)?;
        let sig = unhex(sig).ok_or(LinkError::Tampered)?;
        hmac::verify(&self.key, message(file, expires).as_bytes(), &sig)
            .map_err(|_| LinkError::Tampered)?;
        if now > expires {
            return Err(LinkError::Expired);
        }
        Ok(())
    }
}

fn message(file: FileId, expires: u64) -> String {
    format!("chorus-file-link\n{file}\n{expires}")
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() != 64 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn create_key(path: &Path) -> io::Result<Vec<u8>> {
    use ring::rand::SecureRandom;
    use std::os::unix::fs::OpenOptionsExt;
    let mut key = vec![0u8; KEY_BYTES];
    ring::rand::SystemRandom::new()
        .fill(&mut key)
        .map_err(|_| io::Error::other("no randomness for the link key"))?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(&key)?;
    file.sync_all()?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    // A link checks for its own file and expiry only: another file, another expiry, a
    // changed signature, or a time past the expiry are refused.
    #[test]
    fn links_check_file_expiry_and_signature() {
        let signer = Signer::new(&[3; 32]);
        let link = signer.link(FileId(5), 1000);
        let query = link.split_once('?').unwrap().1;
        let (e, s) = query.split_once('&').unwrap();
        let (expires, sig) = (&e["expires=".len()..], &s["sig=".len()..]);
        assert_eq!(signer.check(FileId(5), expires, sig, 999), Ok(()));
        assert_eq!(signer.check(FileId(5), expires, sig, 1000), Ok(()));
        assert_eq!(
            signer.check(FileId(5), expires, sig, 1001),
            Err(LinkError::Expired)
        );
        assert_eq!(
            signer.check(FileId(6), expires, sig, 0),
            Err(LinkError::Tampered)
        );
        assert_eq!(
            signer.check(FileId(5), "2000", sig, 0),
            Err(LinkError::Tampered)
        );
        let mut bad = sig.to_owned();
        bad.replace_range(0..1, if &sig[..1] == "0" { "1" } else { "0" });
        assert_eq!(
            signer.check(FileId(5), expires, &bad, 0),
            Err(LinkError::Tampered)
        );
        assert_eq!(
            signer.check(FileId(5), expires, "zz", 0),
            Err(LinkError::Tampered)
        );
        let other = Signer::new(&[4; 32]);
        assert_eq!(
            other.check(FileId(5), expires, sig, 0),
            Err(LinkError::Tampered)
        );
    }
}
