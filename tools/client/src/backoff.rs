//! Reconnection delays: exponential backoff with jitter, as a pure function of the attempt
//! number and a random draw, so that its bounds can be tested without a clock.
//!
//! The jitter spreads the reconnections of many clients that lost the same server at the
//! same moment, so that a restarted server is not hit by all of them at once.

use std::time::Duration;

/// The ceiling of the first reconnection delay; each further attempt doubles it.
pub const RECONNECT_DELAY_BASE: Duration = Duration::from_millis(50);
/// The largest ceiling a reconnection delay grows to.
pub const RECONNECT_DELAY_MAX: Duration = Duration::from_secs(2);
/// Failed connection attempts in a row after which a stream gives up. With the delays
/// above this is close to a minute, long enough to ride out a server restart.
pub const RECONNECT_ATTEMPTS_MAX: u32 = 30;

/// A backoff policy: the delay before each reconnection attempt, and when to give up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// The ceiling of the first delay.
    pub base: Duration,
    /// The largest ceiling.
    pub max: Duration,
    /// Failed attempts in a row before giving up.
    pub attempts_max: u32,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff {
            base: RECONNECT_DELAY_BASE,
            max: RECONNECT_DELAY_MAX,
            attempts_max: RECONNECT_ATTEMPTS_MAX,
        }
    }
}

impl Backoff {
    /// The ceiling of the delay before attempt `attempt` (0 for the first reconnection):
    /// `base * 2^attempt`, at most `max`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// The delay before attempt `attempt`, for a random draw `jitter` in `[0, 1)`: between
    /// half the ceiling and the ceiling ("equal jitter"), so that it never collapses to zero
    /// and never exceeds `max`. A draw outside `[0, 1)` is clamped.
    pub fn delay(&self, attempt: u32, jitter: f64) -> Duration {
        let ceiling = self.ceiling(attempt);
        let half = ceiling / 2;
        let jitter = if jitter.is_finite() {
            jitter.clamp(0.0, 1.0)
        } else {
            0.0
        };
        (half + (ceiling - half).mul_f64(jitter)).min(ceiling)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Every delay lies between half its ceiling and the ceiling, ceilings double up to the
    // maximum and stay there, and no attempt number overflows.
    #[test]
    fn delays_stay_within_bounds() {
        let b = Backoff::default();
        assert_eq!(b.ceiling(0), RECONNECT_DELAY_BASE);
        assert_eq!(b.ceiling(1), RECONNECT_DELAY_BASE * 2);
        let mut previous = Duration::ZERO;
        for attempt in [0, 1, 2, 3, 5, 8, 13, 30, 31, 32, 1000, u32::MAX] {
            let ceiling = b.ceiling(attempt);
            assert!(ceiling >= previous, "ceilings never shrink");
            assert!(ceiling <= RECONNECT_DELAY_MAX);
            previous = ceiling;
            for jitter in [0.0, 0.25, 0.5, 0.999_999, 1.0, -3.0, 7.0, f64::NAN] {
                let d = b.delay(attempt, jitter);
                assert!(d >= ceiling / 2, "attempt {attempt} jitter {jitter}: {d:?}");
                assert!(d <= ceiling, "attempt {attempt} jitter {jitter}: {d:?}");
            }
        }
        assert_eq!(b.ceiling(u32::MAX), RECONNECT_DELAY_MAX);
    }

    // Enough attempts are allowed to wait out a server restart of several seconds.
    #[test]
    fn default_policy_outlasts_a_restart() {
        let b = Backoff::default();
        let least: Duration = (0..b.attempts_max).map(|a| b.delay(a, 0.0)).sum();
        assert!(least >= Duration::from_secs(20), "{least:?}");
    }
}
