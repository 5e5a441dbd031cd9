//! Passwords and tokens: who a caller is.
//!
//! Passwords are stored only as argon2id hashes in PHC string form, which carry their own
//! salt and parameters, so the parameters can be raised later without breaking old hashes.
//! Tokens are HS256 JWTs signed with a secret kept in a file in the data directory; the
//! secret is created on first start and reused after, so tokens survive a restart. Both
//! halves are plain functions of their inputs (the clock is passed in as `now_s`), which is
//! what lets the tests check expiry without waiting.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{DecodingKey, EncodingKey, Header, Validation};
use rand::rngs::OsRng;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Argon2 memory cost in KiB: 19 MiB, OWASP's minimum for argon2id.
pub const ARGON2_M_COST_KIB: u32 = 19 * 1024;
/// Argon2 passes over memory, OWASP's minimum with 19 MiB.
pub const ARGON2_T_COST: u32 = 2;
/// Argon2 lanes. One, because the server parallelizes across requests, not within one.
pub const ARGON2_P_COST: u32 = 1;
/// Shortest password accepted, in bytes.
pub const PASSWORD_BYTES_MIN: usize = 8;
/// Longest password accepted, in bytes. Bounds the hashing work one request can ask for.
pub const PASSWORD_BYTES_MAX: usize = 256;

/// The `iss` claim of every token this server issues and the only one it accepts.
pub const TOKEN_ISSUER: &str = "chorus";
/// Bytes of a newly generated JWT secret: HS256's full key strength.
pub const SECRET_BYTES: usize = 32;
/// Shortest secret accepted from an existing file; a shorter one would weaken HS256.
pub const SECRET_BYTES_MIN: usize = 32;
/// Permissions of a created secret file: readable by the server's user only.
const SECRET_FILE_MODE: u32 = 0o600;

const ARGON2_PARAMS: Params =
    match Params::new(ARGON2_M_COST_KIB, ARGON2_T_COST, ARGON2_P_COST, None) {
        Ok(params) => params,
        Err(_) => panic!("argon2 parameters are out of range"),
    };

fn argon2() -> Argon2<'static> {
    Argon2::new(Algorithm::Argon2id, Version::V0x13, ARGON2_PARAMS)
}

/// Checks a new password against the length rules, saying what is wrong if it breaks them.
pub fn check_password(pw: &str) -> Result<(), &'static str> {
    if pw.len() < PASSWORD_BYTES_MIN {
        return Err("password must be at least 8 bytes");
    }
    if pw.len() > PASSWORD_BYTES_MAX {
        return Err("password must be at most 256 bytes");
    }
    Ok(())
}

/// Hashes a password with argon2id and a fresh random salt, as a PHC string.
///
/// This is deliberately slow (about 19 MiB of memory and tens of milliseconds of CPU), so
/// callers must run it off the shard thread, or it stalls every connection on that shard.
pub fn hash_password(pw: &str) -> String {
    let salt = SaltString::generate(&mut OsRng);
    argon2()
        .hash_password(pw.as_bytes(), &salt)
        .expect("argon2 accepts any password up to 4 GiB with fixed valid parameters")
        .to_string()
}

/// Whether `pw` matches a PHC hash made by [`hash_password`]. A malformed hash never
/// matches. The comparison is constant-time; the cost is that of hashing, so run it off the
/// shard thread too.
pub fn verify_password(pw: &str, phc: &str) -> bool {
    // Verification uses the parameters recorded in the hash, not the current constants,
    // so hashes made before a parameter change still verify.
    match PasswordHash::new(phc) {
        Ok(hash) => argon2().verify_password(pw.as_bytes(), &hash).is_ok(),
        Err(_) => false,
    }
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a JWT of ours: bad encoding, wrong algorithm, missing or wrong claims.
    #[error("malformed token")]
    Malformed,
    /// The signature does not match: tampered, or signed with another secret.
    #[error("bad token signature")]
    BadSignature,
    /// The token's lifetime is over.
    #[error("token expired")]
    Expired,
}

/// The claims of a Chorus token.
#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    /// The user ID.
    sub: String,
    /// Issued at, in seconds since the Unix epoch.
    iat: u64,
    /// Expires at, in seconds since the Unix epoch; invalid from this second on.
    exp: u64,
    /// Always [`TOKEN_ISSUER`].
    iss: String,
    /// The device the token is bound to (`API.md` §14), if it was issued for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dev: Option<String>,
}

/// Whom a valid token names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    /// The user ID string.
    pub user: String,
    /// The device the token is bound to, if any.
    pub device: Option<String>,
}

/// Issues and verifies the server's tokens with one secret.
pub struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl_s: u64,
}

impl std::fmt::Debug for Tokens {
    // The keys are left out so that the secret never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("ttl_s", &self.ttl_s)
            .finish_non_exhaustive()
    }
}

impl Tokens {
    /// Loads the secret from `path`, or on first start generates one and stores it there
    /// (mode 0600, durable before use). Tokens live `ttl_s` seconds.
    ///
    /// An existing file's whole content is the secret, so an operator may supply any 32 or
    /// more bytes; a shorter file is refused rather than silently weakening the signatures.
    pub fn load_or_create(path: &Path, ttl_s: u64) -> io::Result<Tokens> {
        let secret = match fs::read(path) {
            Ok(secret) => secret,
            Err(e) if e.kind() == io::ErrorKind::NotFound => create_secret(path)?,
            Err(e) => return Err(e),
        };
        if secret.len() < SECRET_BYTES_MIN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "JWT secret {} holds {} bytes; at least {SECRET_BYTES_MIN} are needed",
                    path.display(),
                    secret.len()
                ),
            ));
        }
        Ok(Tokens::from_secret(&secret, ttl_s))
    }

    /// Tokens signed with `secret`, living `ttl_s` seconds.
    pub fn from_secret(secret: &[u8], ttl_s: u64) -> Tokens {
        let mut validation = Validation::new(jsonwebtoken::Algorithm::HS256);
        validation.leeway = 0;
        validation.set_issuer(&[TOKEN_ISSUER]);
        validation.set_required_spec_claims(&["exp", "iss", "sub"]);
        // jsonwebtoken reads the system clock for `exp`; expiry is checked in `verify`
        // against the caller's `now_s` instead, so that time is an input.
        validation.validate_exp = false;
        Tokens {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            ttl_s,
        }
    }

    /// A token naming `user` (the user ID string), bound to `device` if one is given,
    /// valid from `now_s` for the TTL.
    pub fn issue(&self, user: &str, device: Option<&str>, now_s: u64) -> String {
        let claims = Claims {
            sub: user.to_owned(),
            iat: now_s,
            exp: now_s.saturating_add(self.ttl_s),
            iss: TOKEN_ISSUER.to_owned(),
            dev: device.map(str::to_owned),
        };
        let header = Header::new(jsonwebtoken::Algorithm::HS256);
        jsonwebtoken::encode(&header, &claims, &self.encoding)
            .expect("HMAC signing of plain string and integer claims cannot fail")
    }

    /// Whom a token names, if it is ours, intact, and not expired at `now_s`.
    pub fn verify(&self, token: &str, now_s: u64) -> Result<Subject, TokenError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::InvalidSignature => TokenError::BadSignature,
                ErrorKind::ExpiredSignature => TokenError::Expired,
                _ => TokenError::Malformed,
            })?;
        // RFC 7519: the token must not be accepted on or after `exp`.
        if now_s >= data.claims.exp {
            return Err(TokenError::Expired);
        }
        Ok(Subject {
            user: data.claims.sub,
            device: data.claims.dev,
        })
    }
}

/// Generates a secret and makes it durable at `path`, unless another process got there
/// first, in which case that one is used.
///
/// The secret is written to a temporary file, synced, and then hard-linked into place: the
/// link appears whole or not at all, so a crash can never leave a short key file behind, and
/// unlike a rename it never replaces a key that another starter already put there.
fn create_secret(path: &Path) -> io::Result<Vec<u8>> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    fs::create_dir_all(dir)?;
    let mut secret = vec![0u8; SECRET_BYTES];
    OsRng.fill_bytes(&mut secret);
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = Path::new(&tmp_name);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(SECRET_FILE_MODE)
        .open(tmp)?;
    file.write_all(&secret)?;
    file.sync_all()?;
    drop(file);
    let linked = fs::hard_link(tmp, path);
    fs::remove_file(tmp)?;
    match linked {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return fs::read(path),
        Err(e) => return Err(e),
    }
    // The new name is durable only once its directory is.
    File::open(dir)?.sync_all()?;
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const NOW_S: u64 = 1_700_000_000;
    const TTL_S: u64 = 3600;

    fn tokens(secret: u8) -> Tokens {
        Tokens::from_secret(&[secret; SECRET_BYTES], TTL_S)
    }

    #[test]
    fn token_round_trips_to_its_user() {
        // Proves a freshly issued token verifies and names the user it was issued to.
        let t = tokens(1);
        let token = t.issue("u42", None, NOW_S);
        assert_eq!(t.verify(&token, NOW_S).unwrap().user, "u42");
        assert_eq!(t.verify(&token, NOW_S + TTL_S - 1).unwrap().user, "u42");
    }

    #[test]
    fn token_carries_its_device() {
        // Proves a token issued for a device names it, and one issued without names none.
        let t = tokens(1);
        let bound = t.issue("u42", Some("phone-1"), NOW_S);
        let subject = t.verify(&bound, NOW_S).unwrap();
        assert_eq!(subject.device.as_deref(), Some("phone-1"));
        assert_eq!(subject.user, "u42");
        let unbound = t.issue("u42", None, NOW_S);
        assert_eq!(t.verify(&unbound, NOW_S).unwrap().device, None);
    }

    #[test]
    fn token_expires_at_exp_with_no_leeway() {
        // Proves expiry follows the passed clock exactly: valid until exp, refused from it.
        let t = tokens(1);
        let token = t.issue("u42", None, NOW_S);
        assert_eq!(t.verify(&token, NOW_S + TTL_S), Err(TokenError::Expired));
        assert_eq!(t.verify(&token, u64::MAX), Err(TokenError::Expired));
    }

    #[test]
    fn tampered_token_is_refused() {
        // Proves changing the claims (here, the user) breaks the signature.
        let t = tokens(1);
        let token = t.issue("u42", None, NOW_S);
        let forged = t.issue("u43", None, NOW_S);
        let mut parts: Vec<&str> = token.split('.').collect();
        parts[1] = forged.split('.').nth(1).unwrap();
        assert_eq!(
            t.verify(&parts.join("."), NOW_S),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn token_from_another_secret_is_refused() {
        // Proves a token signed with a different secret does not verify.
        let token = tokens(1).issue("u42", None, NOW_S);
        assert_eq!(
            tokens(2).verify(&token, NOW_S),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn garbage_and_foreign_tokens_are_malformed() {
        // Proves non-JWTs, a wrong issuer, and a missing claim are refused as malformed.
        let t = tokens(1);
        assert_eq!(t.verify("", NOW_S), Err(TokenError::Malformed));
        assert_eq!(t.verify("a.b.c", NOW_S), Err(TokenError::Malformed));
        let key = EncodingKey::from_secret(&[1; SECRET_BYTES]);
        let header = Header::new(jsonwebtoken::Algorithm::HS256);
        let foreign = serde_json::json!({"sub": "u1", "iat": NOW_S, "exp": NOW_S + 9, "iss": "x"});
        let token = jsonwebtoken::encode(&header, &foreign, &key).unwrap();
        assert_eq!(t.verify(&token, NOW_S), Err(TokenError::Malformed));
        let no_sub = serde_json::json!({"iat": NOW_S, "exp": NOW_S + 9, "iss": "chorus"});
        let token = jsonwebtoken::encode(&header, &no_sub, &key).unwrap();
        assert_eq!(t.verify(&token, NOW_S), Err(TokenError::Malformed));
    }

    #[test]
    fn key_file_is_created_once_private_and_reused() {
        // Proves the first start writes a 0600 secret and later starts reuse it, so tokens
        // survive a restart.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data").join("jwt.key");
        let first = Tokens::load_or_create(&path, TTL_S).unwrap();
        let secret = fs::read(&path).unwrap();
        assert_eq!(secret.len(), SECRET_BYTES);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, SECRET_FILE_MODE);
        let token = first.issue("u7", None, NOW_S);
        let second = Tokens::load_or_create(&path, TTL_S).unwrap();
        assert_eq!(fs::read(&path).unwrap(), secret);
        assert_eq!(second.verify(&token, NOW_S).unwrap().user, "u7");
        let names: Vec<_> = fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file is left behind");
    }

    #[test]
    fn short_key_file_is_refused() {
        // Proves a secret under 32 bytes stops the server instead of weakening tokens.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwt.key");
        fs::write(&path, b"too short").unwrap();
        let err = Tokens::load_or_create(&path, TTL_S).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn password_hash_verifies_only_the_same_password() {
        // Proves the argon2id hash accepts its password, refuses others and bad hashes,
        // and salts each hash differently.
        let phc = hash_password("correct horse");
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert!(verify_password("correct horse", &phc));
        assert!(!verify_password("correct horsf", &phc));
        assert!(!verify_password("correct horse", "not a hash"));
        assert_ne!(hash_password("correct horse"), phc);
    }

    #[test]
    fn password_length_rules() {
        // Proves the 8..=256 byte bounds, counted in bytes rather than characters.
        assert!(check_password("1234567").is_err());
        assert!(check_password("12345678").is_ok());
        assert!(check_password(&"x".repeat(256)).is_ok());
        assert!(check_password(&"x".repeat(257)).is_err());
        assert!(check_password("ééé").is_err(), "6 bytes");
    }
}
