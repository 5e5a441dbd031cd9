//! The QUIC endpoint's certificate: a configured PEM certificate chain and key, or a
//! self-signed one generated into the data directory on first start and reused after, so
//! that a client that pinned its fingerprint keeps working across restarts.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// File names of the generated certificate and key in the data directory.
pub const CERT_FILE_NAME: &str = "quic-cert.pem";
/// See [`CERT_FILE_NAME`].
pub const KEY_FILE_NAME: &str = "quic-key.pem";
/// Names the generated certificate is valid for.
const SELF_SIGNED_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// A certificate chain and its key, ready for rustls.
pub struct Identity {
    /// The chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    /// The SHA-256 fingerprint of the leaf certificate, as lowercase hex: what a client pins.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.chain[0])
    }
}

/// The SHA-256 of a certificate's DER bytes, as lowercase hex.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, cert.as_ref());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Loads the configured certificate and key; with none configured, the generated pair in
/// `data_dir`, generating it on first start.
pub fn load_or_create(configured: Option<(&Path, &Path)>, data_dir: &Path) -> io::Result<Identity> {
    let (cert, key): (PathBuf, PathBuf) = match configured {
        Some((cert, key)) => (cert.to_owned(), key.to_owned()),
        None => {
            let (cert, key) = (data_dir.join(CERT_FILE_NAME), data_dir.join(KEY_FILE_NAME));
            if !cert.exists() || !key.exists() {
                generate(&cert, &key)?;
            }
            (cert, key)
        }
    };
    load(&cert, &key)
}

fn invalid(path: &Path, e: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{}: {e}", path.display()),
    )
}

/// Reads a PEM certificate chain and a PEM private key.
pub fn load(cert: &Path, key: &Path) -> io::Result<Identity> {
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| invalid(cert, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(cert, e))?;
    if chain.is_empty() {
        return Err(invalid(cert, "no certificate in the file"));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| invalid(key, e))?;
    Ok(Identity { chain, key })
}

/// Generates a self-signed certificate and key and stores them durably: the key readable by
/// the server's user only, each file written through a temporary name and a rename, then
/// the directory fsynced.
fn generate(cert_path: &Path, key_path: &Path) -> io::Result<()> {
    let names: Vec<String> = SELF_SIGNED_NAMES.iter().map(|n| n.to_string()).collect();
    let generated = rcgen::generate_simple_self_signed(names).map_err(io::Error::other)?;
    let dir = cert_path.parent().expect("the data directory");
    std::fs::create_dir_all(dir)?;
    write_durably(
        key_path,
        generated.signing_key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_durably(cert_path, generated.cert.pem().as_bytes(), 0o644)?;
    std::fs::File::open(dir)?.sync_all()
}

fn write_durably(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    // A generated certificate is stored, reused on the next start (same fingerprint), and
    // its key is private; a configured pair is used as given.
    #[test]
    fn generated_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create(None, dir.path()).unwrap();
        let again = load_or_create(None, dir.path()).unwrap();
        assert_eq!(first.fingerprint(), again.fingerprint());
        assert_eq!(first.fingerprint().len(), 64);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(KEY_FILE_NAME))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let other = tempfile::tempdir().unwrap();
        let configured = (
            dir.path().join(CERT_FILE_NAME),
            dir.path().join(KEY_FILE_NAME),
        );
        let used = load_or_create(Some((&configured.0, &configured.1)), other.path()).unwrap();
        assert_eq!(used.fingerprint(), first.fingerprint());
        assert!(!other.path().join(CERT_FILE_NAME).exists());
        assert!(load(&other.path().join("none.pem"), &configured.1).is_err());
    }
}
