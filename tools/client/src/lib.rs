//! `chorus-client`: the Rust SDK of a Chorus server, for applications, bots, the project's
//! end-to-end tests and its load harness.
//!
//! It speaks the public API of `API.md` over plain `http://` and `ws://` (no TLS), on
//! tokio:
//!
//! - [`Client`] signs up and logs in, on an end-to-end encryption device or not;
//!   [`Session`] holds the token and makes every REST call, answering with the typed shapes
//!   of [`types`]; [`e2ee`] holds a device's cryptography, and the §14 calls that publish
//!   its keys and carry its to-device messages.
//! - [`Session::connect`] opens the event [`Stream`]: every event of every channel the user
//!   is in, exactly once and in `seq` order per channel, however often the connection
//!   drops. It reconnects with jittered exponential backoff, resumes from the last seq it
//!   delivered, drops repeats, treats a gap as a server bug (logged, then repaired by
//!   resuming), and sends messages that are acknowledged only once durable, repeating a
//!   send whose answer was lost under the same `client_msg_id`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), chorus_client::Error> {
//! use chorus_client::{new_client_msg_id, ChannelKind, Client, ConnectOptions};
//! let client = Client::new("http://127.0.0.1:8080")?;
//! let ada = client.signup("ada@example.com", "correct horse", "Ada").await?;
//! let acme = ada.create_workspace("Acme").await?;
//! let general = ada.create_channel(&acme.id, "general", ChannelKind::Public).await?;
//! let mut stream = ada.connect(ConnectOptions::default()).await?;
//! let sent = stream.send(&general.id, "hello", &new_client_msg_id()).await?;
//! let event = stream.next_event().await?;
//! assert_eq!(event.message().map(|m| m.id), Some(sent.id));
//! # Ok(()) }
//! ```
//!
//! The pure parts (the seq tracker, the backoff, the outbox of unanswered requests, frame
//! parsing) have no I/O, and are tested on made-up frame sequences; `stream` is the thin
//! layer that drives them with sockets and timers.

#![warn(missing_docs)]

mod backoff;
pub mod e2ee;
mod error;
mod frames;
mod outbox;
mod quic;
mod rest;
mod stream;
mod tracker;
pub mod types;

pub use backoff::{Backoff, RECONNECT_ATTEMPTS_MAX, RECONNECT_DELAY_BASE, RECONNECT_DELAY_MAX};
pub use error::Error;
pub use outbox::REQUESTS_ON_WIRE_MAX;
pub use quic::{client_config as quic_client_config, fingerprint, QuicTarget};
pub use rest::{Client, Session, PAGE_LIMIT_MAX, REQUEST_TIMEOUT};
pub use stream::{
    new_client_msg_id, ConnectOptions, Event, Stats, Stream, StreamHandle, StreamItem, Transport,
    Typing, CLOSE_TIMEOUT, CLOSE_UNAUTHORIZED, COMMAND_QUEUE_MAX, CONNECT_TIMEOUT, EVENT_QUEUE_MAX,
    HEARTBEAT_INTERVAL_MIN, RATE_LIMIT_RETRY_DEFAULT, TYPING_QUEUE_MAX, WRITE_QUEUE_MAX,
};
pub use tracker::{Membership, SeqTracker, Verdict};
pub use types::{
    Channel, ChannelKind, Me, Member, Message, MessagePage, Posted, ToDeviceMessage, ToDevicePage,
    User, Version, Workspace,
};
