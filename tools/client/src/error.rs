//! The SDK's error type: what can go wrong with a REST call, a WebSocket request or the
//! event stream, told apart so that callers can react (retry after a rate limit, log in
//! again after a refused token, give up on a stream that could not reconnect).

use std::time::Duration;

/// Why a call of this SDK failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The HTTP request could not be made or its answer could not be read.
    #[error("HTTP transport failed: {0}")]
    Http(#[from] reqwest::Error),
    /// The server answered with an error in `API.md`'s format (a REST status, or an
    /// `error` frame on the WebSocket, whose status is 0).
    #[error("the server refused the request: {status} {code}: {message}")]
    Api {
        /// The HTTP status; 0 for an `error` frame.
        status: u16,
        /// The error's `code`, such as `not_found` or `rate_limited`.
        code: String,
        /// The server's explanation.
        message: String,
        /// How long to wait before trying again, when rate limited.
        retry_after: Option<Duration>,
    },
    /// The server answered something this SDK cannot read.
    #[error("unexpected answer from the server: {0}")]
    Decode(String),
    /// The base URL is not an `http://` URL with a host.
    #[error("bad base URL: {0}")]
    Url(String),
    /// The WebSocket could not be opened or failed.
    #[error("WebSocket failed: {0}")]
    WebSocket(String),
    /// The token was refused (HTTP 401 on upgrade, or close code 4001); log in again.
    #[error("the server refused the token")]
    Unauthorized,
    /// The stream lost its connection and every reconnection attempt failed.
    #[error("gave up reconnecting after {attempts} attempts; last failure: {last}")]
    ReconnectFailed {
        /// Attempts made in a row.
        attempts: u32,
        /// What the last one ran into.
        last: String,
    },
    /// The connection dropped before the server answered a request that is not safe to
    /// repeat (an edit, a deletion, a reaction): it may or may not have taken effect.
    #[error(
        "the connection dropped before the server answered; the request may have taken effect"
    )]
    Interrupted,
    /// An end-to-end encryption call was made with a session that is not signed in on the
    /// device it is about (keys are published only by their own device).
    #[error("this call needs a session on device {wanted}; the session's device is {have:?}")]
    WrongDevice {
        /// The device the call is about.
        wanted: String,
        /// The device the session's token is bound to, if any.
        have: Option<String>,
    },
    /// An Olm session could not be made, or a to-device message encrypted, for a call that
    /// joins the network to the device's cryptography (`crate::e2ee`).
    #[error(transparent)]
    Olm(#[from] crate::e2ee::OlmError),
    /// A channel message could not be encrypted (`crate::e2ee`).
    #[error(transparent)]
    Megolm(#[from] crate::e2ee::MegolmError),
    /// An encrypted send or edit was refused with `stale_devices` this many times in a
    /// row, catching up with the channel's devices each time
    /// ([`crate::e2ee::STALE_DEVICES_ATTEMPTS_MAX`]); nothing was stored.
    #[error("the channel's devices kept changing: refused {attempts} times as stale_devices")]
    StaleDevices {
        /// Refusals in a row.
        attempts: u32,
    },
    /// Catching up with an encrypted channel's events (after a `stale_devices` refusal,
    /// or in [`crate::Session::sync_channel`]), the stream did not hand out the events up
    /// to the channel's `last_seq` within [`crate::e2ee::DEVICE_CATCH_UP_TIMEOUT`] (it is
    /// not fed from the channel's events, or it is far behind).
    #[error(
        "the channel's events did not come from the stream in time (devices_seq {devices_seq})"
    )]
    DevicesNotSeen {
        /// The tracker's `devices_seq` when it gave up.
        devices_seq: u64,
    },
    /// The stream was closed, by [`crate::Stream::close`] or because it ended with an
    /// error that was already returned.
    #[error("the stream is closed")]
    Closed,
}

impl Error {
    /// The error's `code` when the server refused the request.
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    /// The HTTP status when the server refused a REST call.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}
