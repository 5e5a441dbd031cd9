//! How current a cluster node's directory is known to be, so that the token of a removed
//! device is refused on every node once its removal is answered (`API.md` §14, §15).
//!
//! A token is checked against the node's own replica of the directory (one read on the
//! caller's shard). On a single node that replica holds every answered removal: the
//! directory answers only once its event is applied on every shard. In a cluster another
//! node's replica may lag the node that took the removal, by a few milliseconds, or for as
//! long as it is cut off. So a cluster node answers "this device is live" only while its
//! directory is known fresh, under a lease:
//!
//! - [`Freshness::current`] lets a check answer from the replica only within [`FRESH_FOR`]
//!   of the *asking* of a directory barrier that has since passed (the barrier waits until
//!   the replica, on every shard, holds every metadata event committed before it was
//!   asked). Otherwise the check passes a barrier first; a node that cannot (no directory
//!   leader confirms it) answers 503 `unavailable`, never a stale 200.
//! - A device's removal is answered [`REMOVAL_SETTLES`] after it is committed, longer than
//!   [`FRESH_FOR`].
//!
//! Why that is enough: a removal committed at `c` is answered at `a >= c + REMOVAL_SETTLES`.
//! A request that arrives after `a` is checked at `t >= a` and answered from the replica
//! only if a barrier asked at `s > t - FRESH_FOR > c` passed, and that barrier's replica
//! holds the removal. Both durations are measured on the monotonic clock of each node
//! (which runs on while a process is stopped); only their rates need agree, and the margin
//! between them covers that.
//!
//! Once the lease is half spent a check also asks a barrier in the background (one at a
//! time), so a steady stream of requests never waits for one. A token with no device
//! needs none of this: accounts are never removed, so "the account exists" cannot go
//! stale.

use chorus_engine::{Engine, EngineError};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long after a barrier was asked its node's directory counts as fresh.
pub const FRESH_FOR: Duration = Duration::from_millis(400);

/// How long after a device's removal is committed it is answered: longer than
/// [`FRESH_FOR`], by a margin for clocks whose rates differ.
pub const REMOVAL_SETTLES: Duration = Duration::from_millis(500);

/// A node's knowledge of how fresh its directory is. Shared by its shards.
pub struct Freshness {
    base: Instant,
    /// Nanoseconds after `base` at which the latest barrier that passed was asked, plus
    /// one; 0 while none has.
    asked: AtomicU64,
    /// Whether a barrier is being asked in the background.
    renewing: AtomicBool,
}

impl Default for Freshness {
    fn default() -> Freshness {
        Freshness {
            base: Instant::now(),
            asked: AtomicU64::new(0),
            renewing: AtomicBool::new(false),
        }
    }
}

impl Freshness {
    /// Returns once the directory here holds every metadata event committed more than
    /// [`FRESH_FOR`] ago (at once under the lease, else after a barrier); `MetaNotLeader`
    /// if a barrier was needed and no directory leader confirmed it. Answers whether it
    /// passed a barrier asked after the call began: then the directory holds every event
    /// committed before the call.
    pub async fn current(self: &Arc<Self>, engine: &Engine) -> Result<bool, EngineError> {
        let now = self.now();
        match self.age(now) {
            Some(age) if age < FRESH_FOR => {
                if age >= FRESH_FOR / 2 {
                    self.renew_in_background(engine);
                }
                Ok(false)
            }
            _ => self.pass(engine).await.map(|()| true),
        }
    }

    /// Asks a directory barrier and, once it passed, records when it was asked.
    async fn pass(&self, engine: &Engine) -> Result<(), EngineError> {
        let asked = self.now();
        engine.directory_barrier().await?;
        self.asked.fetch_max(asked + 1, Ordering::AcqRel);
        Ok(())
    }

    fn renew_in_background(self: &Arc<Self>, engine: &Engine) {
        if self.renewing.swap(true, Ordering::AcqRel) {
            return;
        }
        let (me, engine) = (self.clone(), engine.clone());
        glommio::spawn_local(async move {
            // A barrier that fails changes nothing: the lease runs out and the next check
            // asks its own.
            let _ = me.pass(&engine).await;
            me.renewing.store(false, Ordering::Release);
        })
        .detach();
    }

    /// How long ago the latest barrier that passed was asked; `None` if none has.
    fn age(&self, now: u64) -> Option<Duration> {
        match self.asked.load(Ordering::Acquire) {
            0 => None,
            asked => Some(Duration::from_nanos(now.saturating_sub(asked - 1))),
        }
    }

    fn now(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }
}
