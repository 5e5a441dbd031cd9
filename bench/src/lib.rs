//! `chorus-bench`: the helpers Chorus's benchmarks and load generators share.
//!
//! A benchmark here measures something a person compares against a target, so its numbers
//! must mean the same thing everywhere: [`latency`] turns per-operation durations into
//! percentiles and takes medians of repeated runs, and [`counting`] wraps a log's storage
//! to count the `fdatasync`s the log really issued, which no timing can tell.

pub mod counting;
pub mod latency;
pub mod load;
pub mod peers;

use std::path::Path;
use std::time::Duration;

/// Bytes of the files under `dir`, in every folder below it; 0 for what cannot be read.
pub fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Reads a run length in seconds from the environment variable `name`, or `default` when
/// it is unset.
///
/// # Panics
///
/// If the variable is set to anything but a positive, finite number of seconds: a typo
/// must not silently turn into the default and a benchmark of a different length.
pub fn env_duration_secs(name: &str, default: Duration) -> Duration {
    match std::env::var(name) {
        Err(_) => default,
        Ok(text) => parse_secs(&text)
            .unwrap_or_else(|| panic!("{name} must be a positive number of seconds, got {text:?}")),
    }
}

/// Reads a count from the environment variable `name`, or `default` when it is unset.
///
/// # Panics
///
/// If the variable is set to anything but a whole number.
pub fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Err(_) => default,
        Ok(text) => text
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a whole number, got {text:?}")),
    }
}

fn parse_secs(text: &str) -> Option<Duration> {
    let secs: f64 = text.trim().parse().ok()?;
    (secs.is_finite() && secs > 0.0).then(|| Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Whole and fractional seconds parse; zero, negatives and junk are refused.
    #[test]
    fn parse_secs_accepts_only_positive_numbers() {
        assert_eq!(parse_secs("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_secs(" 0.5 "), Some(Duration::from_millis(500)));
        for bad in ["0", "-1", "abc", "", "inf", "NaN"] {
            assert_eq!(parse_secs(bad), None, "{bad:?}");
        }
    }
}
