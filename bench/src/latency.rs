//! Latency recording and summaries: microsecond histograms, their percentiles, and the
//! median of repeated runs.
//!
//! Every benchmark records one latency per operation into an hdrhistogram with three
//! significant digits, so p99 is exact to 0.1% however many operations ran, and reports
//! the median of several runs so that one disturbed run does not decide the result.

use hdrhistogram::Histogram;
use std::time::Duration;

/// The longest latency a histogram holds exactly; longer ones are recorded as this. A
/// durable append that takes a minute is a failure whatever its exact length.
pub const LATENCY_US_MAX: u64 = 60_000_000;

/// A new, empty histogram of latencies in microseconds, from 1 µs to [`LATENCY_US_MAX`].
pub fn histogram_us() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("constant bounds are valid")
}

/// Records `latency` in microseconds. Sub-microsecond latencies count as 1 µs, the
/// histogram's lowest value.
pub fn record(histogram: &mut Histogram<u64>, latency: Duration) {
    let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
    histogram.saturating_record(us.clamp(1, LATENCY_US_MAX));
}

/// The percentiles of one histogram that Chorus reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LatencySummary {
    /// Operations recorded.
    pub count: u64,
    /// The median latency, in microseconds.
    pub p50_us: u64,
    /// The 99th-percentile latency, in microseconds.
    pub p99_us: u64,
    /// The largest latency, in microseconds.
    pub max_us: u64,
}

impl LatencySummary {
    /// Summarizes `histogram`; all zeros when it is empty.
    pub fn of(histogram: &Histogram<u64>) -> LatencySummary {
        if histogram.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: histogram.len(),
            p50_us: histogram.value_at_quantile(0.50),
            p99_us: histogram.value_at_quantile(0.99),
            max_us: histogram.max(),
        }
    }
}

/// The median of `values`: the middle one, or the mean of the two middle ones.
///
/// # Panics
///
/// If `values` is empty or holds a NaN, both bugs in the caller.
pub fn median(values: &[f64]) -> f64 {
    assert!(!values.is_empty(), "median of no values");
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.partial_cmp(b).expect("no NaN in a median"));
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The median ignores one outlier run, in either direction, and averages an even count.
    #[test]
    fn median_of_runs() {
        assert_eq!(median(&[5.0]), 5.0);
        assert_eq!(median(&[1.0, 100.0, 3.0]), 3.0);
        assert_eq!(median(&[0.0, 4.0, 5.0]), 4.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
    }

    // Percentiles come from the recorded latencies, and out-of-range ones are clamped
    // rather than lost.
    #[test]
    fn summary_percentiles() {
        let mut h = histogram_us();
        assert_eq!(LatencySummary::of(&h), LatencySummary::default());
        for us in 1..=1000 {
            record(&mut h, Duration::from_micros(us));
        }
        let s = LatencySummary::of(&h);
        assert_eq!(
            (s.count, s.p50_us, s.p99_us, s.max_us),
            (1000, 500, 990, 1000)
        );

        let mut h = histogram_us();
        record(&mut h, Duration::from_nanos(10));
        record(&mut h, Duration::from_secs(3600));
        assert_eq!(h.min(), 1);
        assert!(h.equivalent(h.max(), LATENCY_US_MAX));
    }
}
