//! `chorus-gateway`: the `chorus` server. It runs the Chorus engine and serves `API.md`
//! on the engine's own shards: REST over HTTP/1.1 (hyper), the WebSocket event stream
//! (tungstenite), JWT authentication and argon2id passwords.

pub mod api;
pub mod auth;
pub mod body;
pub mod config;
pub mod conn;
pub mod ctx;
pub mod error;
pub mod files;
pub mod fresh;
#[doc(hidden)]
pub mod fuzzing;
pub mod guard;
pub mod json;
pub mod memory;
pub mod metrics;
pub mod protocol;
pub mod quic;
pub mod ratelimit;
pub mod server;
pub mod session;
pub mod workspace_metrics;
pub mod ws;

pub use config::Config;
pub use server::{serve, ServeError};
