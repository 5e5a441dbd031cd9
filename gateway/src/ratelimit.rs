//! Rate limiting: a token bucket per user, and a bounded table of them per shard.
//!
//! Each shard owns its own [`Limiter`] and uses it from its own thread only, so the hot path
//! takes no lock and shares no cache line with other cores. The cost is that a user's budget
//! is per shard: a user whose connections land on several shards gets the budget on each.
//! Connections of one user mostly share a shard, and the limit exists to stop floods, not to
//! meter exactly, so that is the right trade. Time is always passed in as an `Instant`,
//! which keeps the arithmetic testable without sleeping.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Most buckets one limiter holds. At a few dozen bytes each this bounds a limiter to a few
/// MiB however many distinct users (or forged keys) arrive.
pub const LIMITER_ENTRIES_MAX: usize = 100_000;
/// When a full table has to evict active buckets, it evicts down to this fraction below the
/// limit (1/8), so that the O(n) eviction pass runs once per many insertions, not per each.
const EVICT_DIVISOR: usize = 8;
/// Slack in the token count that absorbs floating-point rounding, so that waiting exactly
/// the advertised retry-after always succeeds.
const TOKEN_EPSILON: f64 = 1e-9;
/// A retry-after is rounded up by this much for the same reason.
const RETRY_AFTER_ROUNDING: Duration = Duration::from_nanos(1);

/// A token bucket: holds up to `burst` tokens, refills at `rate_per_s`, and each request
/// takes one.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate_per_s: f64,
    burst: f64,
    tokens: f64,
    /// When `tokens` was last brought up to date; also when the bucket was last used.
    last: Instant,
}

impl TokenBucket {
    /// A full bucket. `rate_per_s` must be positive and `burst` at least one, which the
    /// configuration checks at start.
    pub fn new(rate_per_s: f64, burst: f64, now: Instant) -> TokenBucket {
        assert_valid(rate_per_s, burst);
        TokenBucket {
            rate_per_s,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes one token if there is one; otherwise says how long until there will be.
    pub fn try_take(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= 1.0 - TOKEN_EPSILON {
            self.tokens = (self.tokens - 1.0).max(0.0);
            return Ok(());
        }
        let wait_s = (1.0 - self.tokens) / self.rate_per_s;
        Err(Duration::from_secs_f64(wait_s) + RETRY_AFTER_ROUNDING)
    }

    /// Returns a token taken by a request that turned out not to count (a login that
    /// succeeded, for a limit on failures).
    pub fn give_back(&mut self) {
        self.tokens = (self.tokens + 1.0).min(self.burst);
    }

    /// Whether the bucket would be full at `now`, and so no different from a new one.
    pub fn is_full(&self, now: Instant) -> bool {
        self.tokens_at(now) >= self.burst
    }

    /// When the bucket was last used.
    pub fn last_used(&self) -> Instant {
        self.last
    }

    fn tokens_at(&self, now: Instant) -> f64 {
        // An `Instant` earlier than `last` adds nothing rather than panicking or removing
        // tokens.
        let elapsed_s = now.saturating_duration_since(self.last).as_secs_f64();
        (self.tokens + elapsed_s * self.rate_per_s).min(self.burst)
    }

    fn refill(&mut self, now: Instant) {
        self.tokens = self.tokens_at(now);
        self.last = self.last.max(now);
    }
}

/// Panics unless the rate is positive and the burst at least one token: anything else
/// would refuse every request forever or never refill.
fn assert_valid(rate_per_s: f64, burst: f64) {
    assert!(
        rate_per_s.is_finite() && rate_per_s > 0.0,
        "rate {rate_per_s}"
    );
    assert!(burst.is_finite() && burst >= 1.0, "burst {burst}");
}

/// Whole seconds for an HTTP `Retry-After` header: rounded up, and at least one, so a
/// client that obeys it is never refused again for the same reason.
pub fn retry_after_header_s(retry_after: Duration) -> u64 {
    let whole = retry_after.as_secs();
    let rounded = if retry_after.subsec_nanos() > 0 {
        whole + 1
    } else {
        whole
    };
    rounded.max(1)
}

/// Token buckets keyed by a `u64`: a user ID, or a hash of (user, channel) for typing.
///
/// Single-threaded, one per shard; see the module documentation for what that means for a
/// user's budget. The table holds at most its `entries_max` buckets: when it is full,
/// buckets that have refilled are dropped first (a full bucket is the same as a new one, so
/// nothing is lost), and only if that is not enough the least recently used are dropped,
/// which grants those users a fresh burst. That leak is the price of bounded memory.
#[derive(Debug)]
pub struct Limiter {
    rate_per_s: f64,
    burst: f64,
    entries_max: usize,
    buckets: HashMap<u64, TokenBucket>,
}

impl Limiter {
    /// A limiter of [`LIMITER_ENTRIES_MAX`] buckets, each refilling at `rate_per_s` up to
    /// `burst`.
    pub fn new(rate_per_s: f64, burst: f64) -> Limiter {
        Limiter::with_entries_max(rate_per_s, burst, LIMITER_ENTRIES_MAX)
    }

    /// A limiter that holds at most `entries_max` buckets.
    pub fn with_entries_max(rate_per_s: f64, burst: f64, entries_max: usize) -> Limiter {
        assert!(entries_max > 0, "a limiter needs room for one bucket");
        // Checked here as well as in each bucket, so a bad rate fails at start, not at the
        // first request.
        assert_valid(rate_per_s, burst);
        Limiter {
            rate_per_s,
            burst,
            entries_max,
            buckets: HashMap::new(),
        }
    }

    /// Takes one token from `key`'s bucket, creating a full one if it has none; on refusal,
    /// how long until a token is available.
    pub fn try_take(&mut self, key: u64, now: Instant) -> Result<(), Duration> {
        if let Some(bucket) = self.buckets.get_mut(&key) {
            return bucket.try_take(now);
        }
        if self.buckets.len() >= self.entries_max {
            self.make_room(now);
        }
        let mut bucket = TokenBucket::new(self.rate_per_s, self.burst, now);
        let taken = bucket.try_take(now);
        self.buckets.insert(key, bucket);
        assert!(self.buckets.len() <= self.entries_max);
        taken
    }

    /// Returns one token to `key`'s bucket (see [`TokenBucket::give_back`]).
    pub fn give_back(&mut self, key: u64) {
        if let Some(bucket) = self.buckets.get_mut(&key) {
            bucket.give_back();
        }
    }

    /// Drops every bucket that has refilled, returning how many. Callers may run it on a
    /// timer to give memory back between floods; the limiter also runs it when full.
    pub fn sweep(&mut self, now: Instant) -> usize {
        let before = self.buckets.len();
        self.buckets.retain(|_, bucket| !bucket.is_full(now));
        before - self.buckets.len()
    }

    /// Buckets held now.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no bucket is held.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Frees at least one slot, and usually an eighth of the table.
    fn make_room(&mut self, now: Instant) {
        self.sweep(now);
        let target = self.entries_max - (self.entries_max / EVICT_DIVISOR).max(1);
        if self.buckets.len() <= target {
            return;
        }
        let excess = self.buckets.len() - target;
        let mut by_age: Vec<(Instant, u64)> = self
            .buckets
            .iter()
            .map(|(key, bucket)| (bucket.last_used(), *key))
            .collect();
        // Only the `excess` oldest are needed, in no particular order: a partial selection
        // is O(n) where a sort would be O(n log n).
        by_age.select_nth_unstable(excess - 1);
        for (_, key) in &by_age[..excess] {
            self.buckets.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn bucket_allows_the_burst_then_refuses() {
        // Proves a new bucket grants exactly `burst` requests at once.
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1.0, 3.0, t0);
        for _ in 0..3 {
            assert_eq!(b.try_take(t0), Ok(()));
        }
        assert!(b.try_take(t0).is_err());
    }

    #[test]
    fn bucket_refills_at_the_rate_up_to_the_burst() {
        // Proves tokens come back at `rate_per_s` and never pile up past `burst`.
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 2.0, t0);
        b.try_take(t0).unwrap();
        b.try_take(t0).unwrap();
        assert!(b.try_take(t0 + ms(99)).is_err());
        assert_eq!(b.try_take(t0 + ms(100)), Ok(()), "one token after 1/rate");
        assert!(b.try_take(t0 + ms(100)).is_err());
        let later = t0 + Duration::from_secs(3600);
        assert!(b.is_full(later));
        assert_eq!(b.try_take(later), Ok(()));
        assert_eq!(b.try_take(later), Ok(()));
        assert!(
            b.try_take(later).is_err(),
            "an hour idle still buys only the burst"
        );
    }

    #[test]
    fn retry_after_is_the_exact_wait() {
        // Proves the refusal names the time until the next token, and that waiting exactly
        // that long succeeds.
        let t0 = Instant::now();
        let mut b = TokenBucket::new(2.0, 1.0, t0);
        b.try_take(t0).unwrap();
        let wait = b.try_take(t0).unwrap_err();
        assert!(wait >= ms(500) && wait <= ms(500) + ms(1), "{wait:?}");
        let wait = b.try_take(t0 + ms(200)).unwrap_err();
        assert!(wait >= ms(300) && wait <= ms(300) + ms(1), "{wait:?}");
        assert_eq!(b.try_take(t0 + ms(200) + wait), Ok(()));
        // Odd rates leave fractions that rounding must not turn into a second refusal.
        let mut b = TokenBucket::new(3.0, 1.0, t0);
        b.try_take(t0).unwrap();
        let wait = b.try_take(t0).unwrap_err();
        assert_eq!(b.try_take(t0 + wait), Ok(()));
    }

    #[test]
    fn time_going_backwards_adds_nothing() {
        // Proves an earlier `Instant` neither panics nor refills.
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut b = TokenBucket::new(1.0, 1.0, t0);
        b.try_take(t0).unwrap();
        assert!(b.try_take(t0 - Duration::from_secs(5)).is_err());
        assert!(b.try_take(t0 + ms(999)).is_err());
        assert_eq!(b.try_take(t0 + ms(1000)), Ok(()));
    }

    #[test]
    fn retry_after_header_rounds_up_to_whole_seconds() {
        // Proves the header value never tells a client to come back too early.
        assert_eq!(retry_after_header_s(Duration::ZERO), 1);
        assert_eq!(retry_after_header_s(ms(1)), 1);
        assert_eq!(retry_after_header_s(ms(1000)), 1);
        assert_eq!(retry_after_header_s(ms(1001)), 2);
    }

    #[test]
    fn limiter_keys_have_separate_budgets() {
        // Proves one key's exhaustion does not affect another's.
        let t0 = Instant::now();
        let mut l = Limiter::new(1.0, 1.0);
        assert_eq!(l.try_take(1, t0), Ok(()));
        assert!(l.try_take(1, t0).is_err());
        assert_eq!(l.try_take(2, t0), Ok(()));
        assert_eq!(l.len(), 2);
    }

    #[test]
    fn limiter_never_exceeds_its_bound_and_evicts_the_oldest() {
        // Proves the table stays within entries_max under a flood of new keys, and that
        // eviction spares the recently used.
        let t0 = Instant::now();
        let mut l = Limiter::with_entries_max(1.0, 2.0, 16);
        for key in 0..1000u64 {
            // Keys 0..1000 arrive 1 ms apart, too fast for any bucket to refill.
            let now = t0 + ms(key);
            l.try_take(key, now).unwrap();
            assert!(l.len() <= 16, "len {} at key {key}", l.len());
        }
        assert!(l.buckets.contains_key(&999));
        assert!(!l.buckets.contains_key(&0));
        // The survivor keeps its spent token: it was not reset by the flood.
        l.try_take(999, t0 + ms(999)).unwrap();
        assert!(l.try_take(999, t0 + ms(999)).is_err());
    }

    #[test]
    fn limiter_drops_refilled_buckets_first() {
        // Proves full buckets are swept before any active one is evicted.
        let t0 = Instant::now();
        let mut l = Limiter::with_entries_max(1.0, 1.0, 4);
        for key in 0..3 {
            l.try_take(key, t0).unwrap();
        }
        // Key 3 is used later, so it is still empty when keys 0..3 have refilled.
        let t1 = t0 + Duration::from_secs(2);
        l.try_take(3, t1).unwrap();
        l.try_take(4, t1).unwrap();
        assert_eq!(l.len(), 2, "three full buckets swept, key 4 added");
        assert!(l.try_take(3, t1).is_err(), "key 3 kept its state");
        assert_eq!(l.sweep(t1 + Duration::from_secs(2)), 2);
        assert!(l.is_empty());
    }
}
