//! The chat domain, event-sourced and free of I/O: commands are decided against state into
//! events, and events are applied to state. The shards persist, deliver and answer; this
//! module only decides.
//!
//! Architecture invariant (isolation): every decision about a workspace's data takes a
//! [`Principal`], and a `Principal` can only be made by [`meta::MetaState::principal`], which
//! checks that the user is a member of that workspace. A channel decision further checks
//! channel membership. Anything outside the caller's reach is answered with
//! [`DomainError::NotFound`], exactly as for things that do not exist.

pub mod channel;
// Like `event`: rkyv's resolver types have no docs; every hand-written item has.
#[allow(missing_docs)]
pub mod e2ee;
// rkyv's derives generate resolver types without docs; every hand-written item in `event`
// is documented.
#[allow(missing_docs)]
pub mod event;
pub mod input;
pub mod mention;
pub mod meta;
// Like `event`: rkyv's resolver types have no docs; every hand-written item has.
#[allow(missing_docs)]
pub mod notify;
pub mod unread;

use crate::ids::{UserId, WorkspaceId};
pub use event::{Body, ChannelKind, Role};
pub(crate) use input::check_name;

/// Longest message text accepted, in bytes (1 MiB).
pub const TEXT_BYTES_MAX: usize = 1024 * 1024;
/// Bodies longer than this go to the blob store; the log keeps a reference.
pub const INLINE_BODY_BYTES_MAX: usize = 64 * 1024;
/// Longest channel or workspace name, in characters.
pub const NAME_CHARS_MAX: usize = 80;
/// Longest display name, in characters.
pub const USER_NAME_CHARS_MAX: usize = 100;
/// Longest email address, in bytes.
pub const EMAIL_BYTES_MAX: usize = 254;
/// Longest emoji name, in bytes.
pub const EMOJI_BYTES_MAX: usize = 64;
/// Longest client message ID, in bytes.
pub const CLIENT_MSG_ID_BYTES_MAX: usize = 128;
/// Most files one message may carry (`API.md` §11).
pub const FILES_PER_MESSAGE_MAX: usize = 10;
/// Most bytes of an encrypted message's ciphertext (`API.md` §14).
pub const CIPHERTEXT_BYTES_MAX: usize = 64 * 1024;
/// Most users in a group DM, the caller included.
pub const GROUP_DM_USERS_MAX: usize = 9;
/// How long a `client_msg_id` is remembered: a repeat within this window never stores a
/// second message. Older keys are forgotten (the window is at least 24 hours).
pub const IDEMPOTENCY_WINDOW_US: u64 = 48 * 3600 * 1_000_000;
/// Most items in one page of a list.
pub const PAGE_LIMIT_MAX: usize = 200;

/// A user acting inside one workspace whose membership the engine has checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Principal {
    user: UserId,
    workspace: WorkspaceId,
    role: Role,
}

impl Principal {
    /// The acting user.
    pub fn user(&self) -> UserId {
        self.user
    }

    /// The workspace the principal is scoped to.
    pub fn workspace(&self) -> WorkspaceId {
        self.workspace
    }

    /// The user's role in that workspace.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Only the metadata state makes principals, after checking membership; tests and the
    /// model use this too.
    pub(crate) fn checked(user: UserId, workspace: WorkspaceId, role: Role) -> Principal {
        Principal {
            user,
            workspace,
            role,
        }
    }
}

/// Why a command or query was refused. Each maps to one HTTP status of `API.md`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// 400: the input is malformed or violates a rule.
    #[error("{0}")]
    Invalid(String),
    /// 403: the caller can see the target but may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// 404: unknown, or outside the caller's reach (never revealed which).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// 409: conflicts with the current state.
    #[error("{0}")]
    Conflict(String),
    /// 413: too large.
    #[error("{0}")]
    TooLarge(String),
    /// 400 `too_many`: a request names more items than a limit allows.
    #[error("{0}")]
    TooMany(String),
    /// 400 `bad_signature`: a device's keys are not signed by its own key.
    #[error("{0}")]
    BadSignature(String),
    /// 409 `key_conflict`: a key ID already names another key.
    #[error("{0}")]
    KeyConflict(String),
    /// 429 `queue_full`: a recipient's queue is full; nothing was taken.
    #[error("{0}")]
    QueueFull(String),
    /// 400 `encryption_mismatch`: text for an encrypted channel, or ciphertext for a plain
    /// one.
    #[error("{0}")]
    EncryptionMismatch(String),
    /// 409 `stale_devices`: the send was encrypted for a device list the channel has moved
    /// past; nothing was stored.
    #[error("{0}")]
    StaleDevices(String),
}

impl DomainError {
    /// The snake_case error code of `API.md`.
    pub fn code(&self) -> &'static str {
        match self {
            DomainError::Invalid(_) => "invalid_request",
            DomainError::Forbidden(_) => "forbidden",
            DomainError::NotFound(_) => "not_found",
            DomainError::Conflict(_) => "conflict",
            DomainError::TooLarge(_) => "too_large",
            DomainError::TooMany(_) => "too_many",
            DomainError::BadSignature(_) => "bad_signature",
            DomainError::KeyConflict(_) => "key_conflict",
            DomainError::QueueFull(_) => "queue_full",
            DomainError::EncryptionMismatch(_) => "encryption_mismatch",
            DomainError::StaleDevices(_) => "stale_devices",
        }
    }

    /// The HTTP status of `API.md`.
    pub fn status(&self) -> u16 {
        match self {
            DomainError::Invalid(_) => 400,
            DomainError::Forbidden(_) => 403,
            DomainError::NotFound(_) => 404,
            DomainError::Conflict(_) => 409,
            DomainError::TooLarge(_) => 413,
            DomainError::TooMany(_) => 400,
            DomainError::BadSignature(_) => 400,
            DomainError::KeyConflict(_) => 409,
            DomainError::QueueFull(_) => 429,
            DomainError::EncryptionMismatch(_) => 400,
            DomainError::StaleDevices(_) => 409,
        }
    }
}
