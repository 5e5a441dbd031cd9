//! The time a replica runs on: raft-rs's ticks, the deadlines of reads and hand-offs, and
//! the waits between attempts. [`SystemClock`] is the real one (the system's monotonic
//! clock and glommio's timers); the cluster simulation (`tools/sim`) gives its replicas
//! its own simulated time, so that a seed fixes when every tick and timeout falls.
//!
//! Architecture invariant: the replica task ([`crate::Replica`]) and the event log's
//! catch-up ([`crate::EventLogMachine`]) read the time and wait only through their
//! replica's clock.

use futures::future::LocalBoxFuture;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// A monotonic clock with timers.
pub trait Clock {
    /// The time now.
    fn now(&self) -> Instant;

    /// Completes once `duration` has passed on this clock.
    fn sleep(&self, duration: Duration) -> LocalBoxFuture<'static, ()>;
}

/// The system's monotonic clock, with glommio's timers: it must be used on a glommio
/// executor.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn sleep(&self, duration: Duration) -> LocalBoxFuture<'static, ()> {
        Box::pin(glommio::timer::sleep(duration))
    }
}

/// A shared clock, as replicas hold one.
pub type SharedClock = Rc<dyn Clock>;
