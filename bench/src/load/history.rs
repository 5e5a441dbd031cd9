//! Reading history pages over REST at random `before` cursors, the measured part of the
//! `history` scenario against Chorus.
//!
//! `concurrency` readers each issue their share of the queries one after another (closed
//! loop: a page read is a user scrolling, and the next scroll follows the last page).
//! Every page is checked: it must hold exactly `page` messages, the newest one just before
//! the cursor, newest first.

use super::HistoryShape;
use chorus_client::types::User;
use chorus_client::Client;
use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use std::time::Instant;

/// A small, seeded xorshift generator: the cursors of a run are reproducible from its seed.
#[derive(Clone, Debug)]
pub struct XorShift(u64);

impl XorShift {
    /// A generator from `seed` (any value; zero is replaced).
    pub fn new(seed: u64) -> XorShift {
        XorShift(seed.max(1))
    }

    /// The next value in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x % n.max(1)
    }
}

/// Reads `shape.queries` pages at random cursors; returns the latencies and the count of
/// wrong pages. The channel's messages are seqs `2..=messages + 1` (seq 1 is its creator
/// joining).
pub async fn read_pages(
    base_url: &str,
    token: &str,
    user_id: &str,
    channel: &str,
    shape: &HistoryShape,
    seed: u64,
    progress: &ProgressBar,
) -> anyhow::Result<(Histogram<u64>, u64)> {
    let user = User {
        id: user_id.to_owned(),
        email: String::new(),
        name: String::new(),
    };
    let session = Client::new(base_url)?.session(token.to_owned(), user);
    progress.set_message("history: reading pages");
    progress.set_length(shape.queries as u64);
    progress.set_position(0);
    let readers = (0..shape.concurrency.max(1)).map(|r| {
        let session = session.clone();
        let mut rng = XorShift::new(
            seed.wrapping_add(r as u64)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let share = shape.queries / shape.concurrency.max(1)
            + usize::from(r < shape.queries % shape.concurrency.max(1));
        async move {
            let mut hist = crate::latency::histogram_us();
            let mut wrong = 0u64;
            // Cursors from page + 2 (the oldest full page) to messages + 2 (the newest).
            let lowest = shape.page as u64 + 2;
            let span = shape.messages as u64 - shape.page as u64 + 1;
            for _ in 0..share {
                let before = lowest + rng.below(span);
                let cursor = chorus_gateway::api::encode_cursor(before);
                let started = Instant::now();
                let page = session.messages(channel, Some(&cursor), shape.page).await?;
                crate::latency::record(&mut hist, started.elapsed());
                let newest = page.messages.first().map(|m| m.seq);
                if page.messages.len() != shape.page || newest != Some(before - 1) {
                    wrong += 1;
                }
                progress.inc(1);
            }
            Ok::<_, anyhow::Error>((hist, wrong))
        }
    });
    let mut total = crate::latency::histogram_us();
    let mut wrong = 0;
    for result in futures::future::join_all(readers).await {
        let (hist, w) = result?;
        total.add(&hist)?;
        wrong += w;
    }
    Ok((total, wrong))
}

#[cfg(test)]
mod tests {
    use super::*;

    // The generator stays in range and replays from its seed.
    #[test]
    fn xorshift_is_seeded_and_bounded() {
        let (mut a, mut b) = (XorShift::new(7), XorShift::new(7));
        for _ in 0..1000 {
            let v = a.below(10);
            assert!(v < 10);
            assert_eq!(v, b.below(10));
        }
    }
}
