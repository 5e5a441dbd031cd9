//! The open-loop schedule and the send times that travel inside messages.
//!
//! Message `i` of a run is due at `start + i / rate`, whatever happened to the messages
//! before it, and every latency is measured from that due time: a stall in the server (or
//! the generator) therefore shows as latency for every message it delays, instead of
//! silently slowing the sends down (coordinated omission). The due time is written into the
//! message text as nanoseconds of the wall clock, so any process on the machine can compute
//! a latency from a message alone, with no coordination.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Nanoseconds since the Unix epoch by the wall clock, which every process on the machine
/// shares.
pub fn wall_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// A fixed-rate schedule starting at a wall-clock instant.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    /// When message 0 is due, in wall-clock nanoseconds.
    pub start_ns: u64,
    /// Messages per second.
    pub rate: f64,
}

impl Schedule {
    /// When message `i` is due, in wall-clock nanoseconds.
    pub fn due_ns(&self, i: u64) -> u64 {
        self.start_ns + (i as f64 * 1e9 / self.rate) as u64
    }

    /// How many messages fall due in the first `span` of the schedule.
    pub fn count_in(&self, span: Duration) -> u64 {
        (span.as_secs_f64() * self.rate).ceil() as u64
    }
}

/// Sleeps a thread until wall-clock instants, by the monotonic clock: read once against
/// the wall clock, so a wall-clock step during a run moves no due time.
pub struct WallSleeper {
    epoch: std::time::Instant,
    epoch_wall_ns: u64,
}

impl WallSleeper {
    /// A sleeper whose wall clock is read now.
    pub fn new() -> WallSleeper {
        WallSleeper {
            epoch: std::time::Instant::now(),
            epoch_wall_ns: wall_ns(),
        }
    }

    /// Blocks the thread until `due_ns` (wall-clock nanoseconds); returns at once if it
    /// has passed.
    pub fn sleep_until(&self, due_ns: u64) {
        let at = self.epoch + Duration::from_nanos(due_ns.saturating_sub(self.epoch_wall_ns));
        let now = std::time::Instant::now();
        if at > now {
            std::thread::sleep(at - now);
        }
    }
}

impl Default for WallSleeper {
    fn default() -> WallSleeper {
        WallSleeper::new()
    }
}

/// The text of a chat message: its due time, its sender's connection index, then `x`
/// padding up to `body_bytes` (never shorter than the two numbers).
pub fn chat_text(due_ns: u64, sender: usize, body_bytes: usize) -> String {
    let mut text = format!("{due_ns} {sender} ");
    if text.len() < body_bytes {
        text.extend(std::iter::repeat_n('x', body_bytes - text.len()));
    }
    text
}

/// The due time and sender of a text made by [`chat_text`].
pub fn parse_chat_text(text: &str) -> Option<(u64, usize)> {
    let mut words = text.split(' ');
    let due_ns = words.next()?.parse().ok()?;
    let sender = words.next()?.parse().ok()?;
    Some((due_ns, sender))
}

/// Latency from a due time to `now_ns`; zero if the clock reads earlier (it cannot go
/// backwards by much on one machine, but a negative latency must not wrap around).
pub fn since(due_ns: u64, now_ns: u64) -> Duration {
    Duration::from_nanos(now_ns.saturating_sub(due_ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Due times advance by exactly 1/rate and the window count rounds up.
    #[test]
    fn schedule_spacing() {
        let s = Schedule {
            start_ns: 1_000,
            rate: 4.0,
        };
        assert_eq!(s.due_ns(0), 1_000);
        assert_eq!(s.due_ns(1), 250_001_000);
        assert_eq!(s.due_ns(8), 2_000_001_000);
        assert_eq!(s.count_in(Duration::from_millis(1_100)), 5);
    }

    // A text carries its due time and sender, padded to the body size, and round-trips.
    #[test]
    fn chat_text_round_trips() {
        let text = chat_text(1_700_000_000_123_456_789, 42, 64);
        assert_eq!(text.len(), 64);
        assert_eq!(
            parse_chat_text(&text),
            Some((1_700_000_000_123_456_789, 42))
        );
        let short = chat_text(5, 1, 0);
        assert_eq!(parse_chat_text(&short), Some((5, 1)));
        assert_eq!(parse_chat_text("hello world"), None);
        assert_eq!(since(10, 5), Duration::ZERO);
    }
}
