//! `chorus-engine`: the heart of Chorus.
//!
//! Thread-per-core shards own partitions; each partition owns a set of channels, keeps their
//! events in a `chorus-log` log, and fans committed events out to subscribers. The chat
//! domain (workspaces, channels, messages, threads, reactions, edits) is event-sourced and
//! lives in [`domain`]. Other servers embed the engine as their storage through [`Engine`]:
//!
//! ```no_run
//! use chorus_engine::{Engine, EngineConfig, domain::ChannelKind};
//! # async fn demo() -> Result<(), chorus_engine::EngineError> {
//! let engine = Engine::open(EngineConfig::new("/tmp/chorus-demo"))?;
//! let alice = engine.create_user("alice@example.com", "Alice", "<hash>").await?;
//! let ws = engine.create_workspace(alice.id, "acme").await?;
//! let general = engine.create_channel(alice.id, ws.id, "general", ChannelKind::Public).await?;
//! let (msg, _) = engine.post(alice.id, general.id, "hello", None, None).await?;
//! assert_eq!(msg.seq, 2); // seq 1 was Alice joining
//! # Ok(()) }
//! ```

#![deny(missing_docs)]

pub mod blob;
mod config;
pub mod consumer;
pub mod domain;
pub mod durability;
mod engine;
pub mod env;
mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod ids;
mod outcome;
pub mod presence;
pub mod queue;
pub(crate) mod runtime;
pub mod shard;
pub(crate) mod snapshot;
pub mod view;

pub use config::{EngineConfig, Observer, ObserverSlot, HELD_EPHEMERAL_FRAMES_MAX};
pub use consumer::{CommittedEvent, CommittedKind, CommittedPage, LogId};
pub use engine::{Consumer, Engine, Subscription, SubscriptionControl};
pub use error::{Corrupt, EngineError, IoError, Unavailable};
pub use outcome::{
    ChannelOutcome, MessagePage, MetaOutcome, NewFile, NotifyOutcome, PushChecks, PushRecipient,
    ReadOutcome, Recovery, SubscriberCount,
};
pub use runtime::dispatch::SubscriptionInfo;
