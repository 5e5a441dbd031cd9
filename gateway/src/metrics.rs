//! The server's counters, gauges and histograms, and their Prometheus text rendering.
//!
//! One [`Metrics`] is shared by every shard behind an `Arc`. Every update is a single
//! relaxed atomic add or store, with no lock, so recording costs the hot path almost
//! nothing; the price is that a scrape is not an atomic snapshot across metrics, which
//! Prometheus tolerates because each value is still monotonic or a plain gauge. `render`
//! writes text exposition format 0.0.4 by hand: the format is a few line shapes, and a
//! metrics library would bring a registry and locks we do not need.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// Prefix of every metric name.
pub const PREFIX: &str = "chorus_";
/// The `Content-Type` of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Upper bounds, in seconds, of the request duration buckets: from half a millisecond (a
/// cached read) to five seconds (far past any healthy request).
pub const REQUEST_DURATION_BUCKETS_S: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
/// Upper bounds, in seconds, of the fsync latency buckets: from 50 µs (NVMe with a
/// power-loss-protected cache) to one second (a stalled disk).
pub const FSYNC_LATENCY_BUCKETS_S: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// A durable batch write that takes this long is logged as a warning: the disk stalled,
/// and every post of the partition waited for it.
pub const SLOW_WRITE: Duration = Duration::from_millis(100);

/// Lets a warning through at most once per period, from any thread: a disk that stalls
/// every write logs once a second, not once a write.
#[derive(Debug)]
pub struct Throttle {
    start: std::time::Instant,
    every_ms: u64,
    /// Milliseconds since `start` before which no warning goes through.
    next_ms: AtomicU64,
}

impl Throttle {
    pub fn new(every: Duration) -> Throttle {
        Throttle {
            start: std::time::Instant::now(),
            every_ms: u64::try_from(every.as_millis()).unwrap_or(u64::MAX),
            next_ms: AtomicU64::new(0),
        }
    }

    /// Whether a warning at `now` goes through; when one does, the next waits a period.
    pub fn allow(&self, now: std::time::Instant) -> bool {
        let ms = u64::try_from(now.saturating_duration_since(self.start).as_millis())
            .unwrap_or(u64::MAX);
        let next = self.next_ms.load(Ordering::Relaxed);
        ms >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    ms.saturating_add(self.every_ms),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }
}

/// HTTP status classes counted: 1xx to 5xx.
const STATUS_CLASSES: usize = 5;
const STATUS_CLASS_LABELS: [&str; STATUS_CLASSES] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
const NANOS_PER_S: f64 = 1e9;

// Relaxed ordering throughout: each metric is an independent number, and no other memory
// is published through it, so there is nothing for a stronger ordering to order.

/// A number that only goes up.
///
/// Some are bumped for every frame by every shard (`ws_frames_out`), so each thread adds
/// to a stripe of its own, a cache line apart from the others: shards adding to one shared
/// line in turn made each add wait for the line to come over from the other core. A read
/// sums the stripes.
#[derive(Debug, Default)]
pub struct Counter([Stripe; STRIPES]);

/// Stripes of a [`Counter`]: threads past this many share them (still exact).
const STRIPES: usize = 8;

/// One stripe, on cache lines of its own (two: adjacent lines are fetched in pairs).
#[derive(Debug, Default)]
#[repr(align(128))]
struct Stripe(AtomicU64);

/// The stripe index of this thread, handed out in the order threads first add.
fn stripe() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static STRIPE: std::cell::Cell<usize> = const { std::cell::Cell::new(usize::MAX) };
    }
    STRIPE
        .try_with(|s| {
            if s.get() == usize::MAX {
                s.set(NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES);
            }
            s.get()
        })
        .unwrap_or(0)
}

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0[stripe()].0.fetch_add(n, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add)
    }
}

/// A number that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Subtracts one.
    pub fn dec(&self) {
        self.add(-1);
    }

    /// Adds `delta`, which may be negative.
    pub fn add(&self, delta: i64) {
        self.0.fetch_add(delta, Ordering::Relaxed);
    }

    /// Replaces the value.
    pub fn set(&self, value: i64) {
        self.0.store(value, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Observations in seconds, counted into fixed buckets.
///
/// Each bucket counts only the observations that fall in it (one atomic add per
/// observation); `render` adds them up into Prometheus's cumulative form. The count is the
/// sum of the buckets, so the `+Inf` bucket and `_count` always agree within a scrape.
#[derive(Debug)]
pub struct Histogram {
    bounds_s: &'static [f64],
    /// One counter per bound, plus one for observations above the last bound.
    buckets: Box<[AtomicU64]>,
    /// Total of all observations in nanoseconds: an integer, so it can be a lock-free add.
    sum_ns: AtomicU64,
}

/// A histogram's values at one moment, cumulative as Prometheus wants them.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// `(upper bound in seconds, observations at or below it)`, bounds ascending.
    pub buckets: Vec<(f64, u64)>,
    /// Observations in all, the `+Inf` bucket.
    pub count: u64,
    /// Total of all observations, in seconds.
    pub sum_s: f64,
}

impl Histogram {
    /// A histogram with the given ascending bucket upper bounds, in seconds.
    pub fn new(bounds_s: &'static [f64]) -> Histogram {
        assert!(
            bounds_s.windows(2).all(|w| w[0] < w[1]),
            "bucket bounds must ascend"
        );
        Histogram {
            bounds_s,
            buckets: (0..=bounds_s.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
        }
    }

    /// Records one observation of `secs` seconds. Negative or NaN values count as zero, so
    /// that a clock quirk cannot corrupt the sum.
    pub fn observe(&self, secs: f64) {
        let secs = if secs > 0.0 { secs } else { 0.0 };
        // The first bucket whose bound is at or above the value; Prometheus's `le` is
        // inclusive. Past the last bound, the overflow bucket.
        let index = self.bounds_s.partition_point(|&bound| bound < secs);
        self.buckets[index].fetch_add(1, Ordering::Relaxed);
        // `as` saturates, so an absurd value cannot wrap the sum.
        self.sum_ns
            .fetch_add((secs * NANOS_PER_S) as u64, Ordering::Relaxed);
    }

    /// Records one observation of a duration.
    pub fn observe_duration(&self, elapsed: Duration) {
        self.observe(elapsed.as_secs_f64());
    }

    /// The current buckets, cumulative, with the count and sum.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut total = 0;
        let mut buckets = Vec::with_capacity(self.bounds_s.len());
        for (bound, bucket) in self.bounds_s.iter().zip(self.buckets.iter()) {
            total += bucket.load(Ordering::Relaxed);
            buckets.push((*bound, total));
        }
        let overflow = self.buckets[self.bounds_s.len()].load(Ordering::Relaxed);
        HistogramSnapshot {
            buckets,
            count: total + overflow,
            sum_s: self.sum_ns.load(Ordering::Relaxed) as f64 / NANOS_PER_S,
        }
    }
}

/// Every metric of the server, shared by all shards.
#[derive(Debug)]
pub struct Metrics {
    /// Connections open now (HTTP and WebSocket).
    pub connections_open: Gauge,
    /// Connections accepted since start.
    pub connections_total: Counter,
    /// WebSocket frames received.
    pub ws_frames_in: Counter,
    /// WebSocket frames sent.
    pub ws_frames_out: Counter,
    /// HTTP requests answered, by status class; fed by [`Metrics::observe_request`].
    http_requests: [Counter; STATUS_CLASSES],
    /// Events committed durably.
    pub commits: Counter,
    /// Events delivered to subscribers.
    pub deliveries: Counter,
    /// Requests and frames refused by the rate limiter.
    pub rate_limited: Counter,
    /// REST calls this node passed to the node that leads what they write to, answered
    /// there.
    pub forwarded: Counter,
    /// Presence snapshots taken from peers: one per peer and shard when first heard, and
    /// one each time a peer's notices were missed or it restarted.
    pub presence_snapshots: Counter,
    /// Subscribers cut off because their outbound queue filled.
    pub slow_consumer_disconnects: Counter,
    /// Time from a request's arrival to its answer.
    pub request_duration_seconds: Histogram,
    /// Time one group commit took: the batch write and its fdatasync.
    pub fsync_latency_seconds: Histogram,
    /// Work waiting in queues. With several shards, have each add its change rather than
    /// set its own value, or the shards overwrite each other.
    pub queue_depth: Gauge,
    /// QUIC datagrams a shard received for a connection of another shard (a client that
    /// moved) and forwarded to it.
    pub quic_forwarded: Counter,
    /// Packets QUIC sent, and declared lost, on connections that ended, with the
    /// congestion events those losses caused: what a QUIC session's latency tail comes
    /// from when it is not the server.
    pub quic_packets_sent: Counter,
    /// See [`Metrics::quic_packets_sent`].
    pub quic_packets_lost: Counter,
    /// See [`Metrics::quic_packets_sent`].
    pub quic_congestion_events: Counter,
    /// Preview workers that crashed, were killed at their deadline, or died past a
    /// resource limit (files refused cleanly are not counted).
    pub preview_worker_crashes: Counter,
    /// Messages posted per workspace, as the `workspace_metrics` consumer last counted
    /// them. Behind a mutex: written once per page of events the consumer reads, read once
    /// per scrape, never on a request's path.
    workspace_messages: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
    /// Email digests handed to the SMTP server; shared with the notifier's email sender.
    pub notify_emails_sent: std::sync::Arc<AtomicU64>,
    /// The notifier's outbox depth and push counters; shared with its outbox and sender.
    pub notify: std::sync::Arc<chorus_notify::Stats>,
    /// The search index, once it is open.
    search: std::sync::OnceLock<std::sync::Arc<chorus_search::Search>>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    /// All metrics at zero.
    pub fn new() -> Metrics {
        Metrics {
            connections_open: Gauge::default(),
            connections_total: Counter::default(),
            ws_frames_in: Counter::default(),
            ws_frames_out: Counter::default(),
            http_requests: Default::default(),
            commits: Counter::default(),
            deliveries: Counter::default(),
            rate_limited: Counter::default(),
            forwarded: Counter::default(),
            presence_snapshots: Counter::default(),
            slow_consumer_disconnects: Counter::default(),
            request_duration_seconds: Histogram::new(REQUEST_DURATION_BUCKETS_S),
            fsync_latency_seconds: Histogram::new(FSYNC_LATENCY_BUCKETS_S),
            queue_depth: Gauge::default(),
            quic_forwarded: Counter::default(),
            quic_packets_sent: Counter::default(),
            quic_packets_lost: Counter::default(),
            quic_congestion_events: Counter::default(),
            preview_worker_crashes: Counter::default(),
            workspace_messages: Default::default(),
            notify_emails_sent: Default::default(),
            notify: Default::default(),
            search: Default::default(),
        }
    }

    /// Sets these workspaces' message counts (kept by the `workspace_metrics` consumer,
    /// which owns them; this is the copy a scrape reads). Workspaces not named keep theirs:
    /// the consumer passes the counts a page moved, not every count at every page.
    pub fn set_workspace_messages(&self, counts: &std::collections::BTreeMap<String, u64>) {
        let mut shown = self
            .workspace_messages
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for (workspace, &count) in counts {
            match shown.get_mut(workspace.as_str()) {
                Some(n) => *n = count,
                None => {
                    shown.insert(workspace.clone(), count);
                }
            }
        }
    }

    /// Records an accepted connection.
    pub fn connection_opened(&self) {
        self.connections_open.inc();
        self.connections_total.inc();
    }

    /// Records a closed connection.
    pub fn connection_closed(&self) {
        self.connections_open.dec();
    }

    /// Records an answered HTTP request: its status class and how long it took.
    pub fn observe_request(&self, status: u16, elapsed: Duration) {
        if let Some(class) = status_class(status) {
            self.http_requests[class].inc();
        }
        self.request_duration_seconds.observe_duration(elapsed);
    }

    /// HTTP requests answered with a status of class `digit`xx (1 to 5).
    pub fn http_requests(&self, digit: u16) -> u64 {
        status_class(digit * 100).map_or(0, |class| self.http_requests[class].get())
    }

    /// Records how long one fsync took.
    pub fn observe_fsync(&self, secs: f64) {
        self.fsync_latency_seconds.observe(secs);
    }

    /// Sets the queue depth gauge.
    pub fn set_queue_depth(&self, depth: i64) {
        self.queue_depth.set(depth);
    }

    /// Every metric in Prometheus text exposition format 0.0.4; see [`CONTENT_TYPE`].
    pub fn render(&self) -> String {
        let mut out = String::new();
        let gauge = |out: &mut String, name, help, value: i64| {
            header(out, name, help, "gauge");
            sample(out, name, "", value);
        };
        let counter = |out: &mut String, name, help, value: &Counter| {
            header(out, name, help, "counter");
            sample(out, name, "", value.get());
        };
        gauge(
            &mut out,
            "connections_open",
            "Connections open now.",
            self.connections_open.get(),
        );
        counter(
            &mut out,
            "connections_total",
            "Connections accepted since start.",
            &self.connections_total,
        );
        counter(
            &mut out,
            "ws_frames_in_total",
            "WebSocket frames received.",
            &self.ws_frames_in,
        );
        counter(
            &mut out,
            "ws_frames_out_total",
            "WebSocket frames sent.",
            &self.ws_frames_out,
        );
        let name = "http_requests_total";
        header(&mut out, name, "HTTP requests by status class.", "counter");
        for (label, count) in STATUS_CLASS_LABELS.iter().zip(&self.http_requests) {
            sample(&mut out, name, &format!("class=\"{label}\""), count.get());
        }
        counter(
            &mut out,
            "commits_total",
            "Events committed durably.",
            &self.commits,
        );
        counter(
            &mut out,
            "deliveries_total",
            "Events delivered to subscribers.",
            &self.deliveries,
        );
        counter(
            &mut out,
            "rate_limited_total",
            "Requests and frames refused by the rate limiter.",
            &self.rate_limited,
        );
        counter(
            &mut out,
            "forwarded_total",
            "REST calls passed to the node that leads what they write to, answered there.",
            &self.forwarded,
        );
        counter(
            &mut out,
            "presence_snapshots_total",
            "Presence snapshots taken from peers: first contact, missed notices, restarts.",
            &self.presence_snapshots,
        );
        counter(
            &mut out,
            "slow_consumer_disconnects_total",
            "Subscribers cut off because their outbound queue filled.",
            &self.slow_consumer_disconnects,
        );
        histogram(
            &mut out,
            "request_duration_seconds",
            "Time from a request's arrival to its answer.",
            &self.request_duration_seconds,
        );
        histogram(
            &mut out,
            "fsync_latency_seconds",
            "Time one group commit took: the batch write and its fdatasync.",
            &self.fsync_latency_seconds,
        );
        gauge(
            &mut out,
            "queue_depth",
            "Work waiting in queues.",
            self.queue_depth.get(),
        );
        counter(
            &mut out,
            "quic_datagrams_forwarded_total",
            "QUIC datagrams forwarded to the shard that owns their connection.",
            &self.quic_forwarded,
        );
        counter(
            &mut out,
            "quic_packets_sent_total",
            "QUIC packets sent, counted when their connection ends.",
            &self.quic_packets_sent,
        );
        counter(
            &mut out,
            "quic_packets_lost_total",
            "QUIC packets declared lost, counted when their connection ends.",
            &self.quic_packets_lost,
        );
        counter(
            &mut out,
            "quic_congestion_events_total",
            "QUIC congestion events (window reductions), counted when their connection ends.",
            &self.quic_congestion_events,
        );
        counter(
            &mut out,
            "preview_worker_crashes_total",
            "Preview workers that crashed, hit a resource limit, or were killed at their deadline.",
            &self.preview_worker_crashes,
        );
        let name = "notify_emails_sent_total";
        header(
            &mut out,
            name,
            "Email digests handed to the SMTP server.",
            "counter",
        );
        let emails = self.notify_emails_sent.load(Ordering::Relaxed);
        sample(&mut out, name, "", emails);
        render_notify(&mut out, &self.notify);
        let name = "workspace_messages_total";
        header(
            &mut out,
            name,
            "Messages posted, by workspace, counted from the log exactly once.",
            "counter",
        );
        let counts = self
            .workspace_messages
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for (workspace, count) in counts.iter() {
            sample(&mut out, name, &format!("workspace=\"{workspace}\""), count);
        }
        drop(counts);
        if let Some(search) = self.search.get() {
            render_search(&mut out, &search.status);
        }
        out
    }

    /// Reports the search index's state and counters from now on.
    pub fn set_search(&self, search: std::sync::Arc<chorus_search::Search>) {
        let _ = self.search.set(search);
    }
}

/// The notifier's outbox depth, push outcomes and ack-to-push latency. The latency is a
/// summary without quantiles (`_sum`, `_count`) and a `_max` gauge, like the search index
/// commit time: the sender keeps plain atomics, not a [`Histogram`], since the notify crate
/// does not depend on the gateway.
fn render_notify(out: &mut String, stats: &chorus_notify::Stats) {
    use std::sync::atomic::Ordering::Relaxed;
    let name = "notify_outbox_depth";
    let help = "Outbox items not answered yet: push items decided and not yet sent, dropped or given up, plus email items whose digest is not answered yet.";
    header(out, name, help, "gauge");
    sample(out, name, "", stats.outbox_depth.load(Relaxed));
    for (name, help, value) in [
        (
            "notify_pushes_sent_total",
            "Pushes the push gateway answered with a 2xx without rejecting their push key.",
            &stats.pushes_sent,
        ),
        (
            "notify_pushes_failed_total",
            "Pushes given up because the push gateway answered a 4xx other than 429 (other errors are retried until answered).",
            &stats.pushes_failed,
        ),
        (
            "notify_pushes_retried_total",
            "Push attempts repeated after a connection error, a 5xx, a 429 or a failed check.",
            &stats.pushes_retried,
        ),
        (
            "notify_pushes_rejected_total",
            "Pushes whose push key the push gateway rejected (the device is removed).",
            &stats.pushes_rejected,
        ),
        (
            "notify_pushes_dropped_total",
            "Pushes not sent because the message was read, deleted or no longer readable by the recipient before its turn.",
            &stats.pushes_dropped,
        ),
        (
            "notify_answered_elsewhere_total",
            "On a cluster node: push and email items answered without sending them, because the node that sends (the directory's leader) answered them.",
            &stats.answered_elsewhere,
        ),
    ] {
        header(out, name, help, "counter");
        sample(out, name, "", value.load(Relaxed));
    }
    let name = "notify_push_latency_seconds";
    let help = "Time from a message's commit to the push gateway's 2xx for its push.";
    header(out, name, help, "summary");
    let total_s = stats.push_latency_us_total.load(Relaxed) as f64 / 1e6;
    sample(out, &format!("{name}_sum"), "", total_s);
    let count = stats.push_latency_count.load(Relaxed);
    sample(out, &format!("{name}_count"), "", count);
    let name = "notify_push_latency_seconds_max";
    let help = "The longest time from a message's commit to the push gateway's 2xx since start.";
    header(out, name, help, "gauge");
    let max_s = stats.push_latency_us_max.load(Relaxed) as f64 / 1e6;
    sample(out, name, "", max_s);
}

/// The search index: one `search_index_state` sample per state (1 for the current one),
/// then its counters.
fn render_search(out: &mut String, status: &chorus_search::Status) {
    use std::sync::atomic::Ordering::Relaxed;
    let name = "search_index_state";
    let help = "The search index's state: 1 for the current one (rebuilding after a missing or damaged index, catching_up, ready, failed).";
    header(out, name, help, "gauge");
    let now = status.state();
    for state in chorus_search::State::ALL {
        let labels = format!("state=\"{}\"", state.as_str());
        sample(out, name, &labels, u8::from(state == now));
    }
    for (name, help, kind, value) in [
        (
            "search_index_rebuilds_total",
            "Times the search index was missing or damaged and rebuilt from the logs.",
            "counter",
            status.rebuilds.load(Relaxed),
        ),
        (
            "search_indexed_events_total",
            "Log records the search indexer has read.",
            "counter",
            status.events.load(Relaxed),
        ),
        (
            "search_index_commits_total",
            "Search index commits.",
            "counter",
            status.commits.load(Relaxed),
        ),
        (
            "search_index_messages",
            "Documents in the search index at its last commit: messages, and files (none in a workspace without uploads).",
            "gauge",
            status.docs.load(Relaxed),
        ),
        (
            "search_index_starved_total",
            "Times the search index was starved of CPU (a commit waited half a second or more) and its writer's idle-only threads were raised for a while.",
            "counter",
            status.starved.load(Relaxed),
        ),
        (
            "search_files_extracted_total",
            "Files whose text the search indexer extracted (or found to have none) since start.",
            "counter",
            status.files_extracted.load(Relaxed),
        ),
    ] {
        header(out, name, help, kind);
        sample(out, name, "", value);
    }
    for (name, help, kind, us) in [
        (
            "search_index_commit_seconds_total",
            "Time spent committing the search index and reloading its reader.",
            "counter",
            status.commit_us.load(Relaxed),
        ),
        (
            "search_index_commit_seconds_max",
            "The longest search index commit since start.",
            "gauge",
            status.commit_us_max.load(Relaxed),
        ),
    ] {
        header(out, name, help, kind);
        sample(out, name, "", us as f64 / 1e6);
    }
}

/// The index of a status's class in `http_requests`, if it is a valid HTTP status.
fn status_class(status: u16) -> Option<usize> {
    match status / 100 {
        digit @ 1..=5 => Some(usize::from(digit) - 1),
        _ => None,
    }
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    // Writing to a String cannot fail.
    let _ = writeln!(out, "# HELP {PREFIX}{name} {help}");
    let _ = writeln!(out, "# TYPE {PREFIX}{name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &str, value: impl std::fmt::Display) {
    let _ = if labels.is_empty() {
        writeln!(out, "{PREFIX}{name} {value}")
    } else {
        writeln!(out, "{PREFIX}{name}{{{labels}}} {value}")
    };
}

fn histogram(out: &mut String, name: &str, help: &str, histogram: &Histogram) {
    let snap = histogram.snapshot();
    header(out, name, help, "histogram");
    let bucket = format!("{name}_bucket");
    for (bound, count) in &snap.buckets {
        // f64's Display prints the shortest exact form without an exponent ("0.0005", "1"),
        // which Prometheus parses as a float.
        sample(out, &bucket, &format!("le=\"{bound}\""), count);
    }
    sample(out, &bucket, "le=\"+Inf\"", snap.count);
    sample(out, &format!("{name}_sum"), "", snap.sum_s);
    sample(out, &format!("{name}_count"), "", snap.count);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Arc;

    // Threads add to stripes of their own, more threads than stripes share them, and a
    // read sums every stripe: nothing added from any thread is lost or counted twice.
    #[test]
    fn a_counter_added_to_from_many_threads_reads_the_sum() {
        let counter = Arc::new(Counter::default());
        let threads: Vec<_> = (0..3 * STRIPES as u64)
            .map(|t| {
                let counter = counter.clone();
                std::thread::spawn(move || {
                    for _ in 0..1_000 {
                        counter.add(t + 1);
                    }
                    stripe()
                })
            })
            .collect();
        let stripes: std::collections::HashSet<usize> =
            threads.into_iter().map(|t| t.join().unwrap()).collect();
        let n = 3 * STRIPES as u64;
        assert_eq!(counter.get(), 1_000 * n * (n + 1) / 2);
        assert_eq!(stripes.len(), STRIPES, "every stripe taken by some thread");
        counter.inc();
        assert_eq!(counter.get(), 1_000 * n * (n + 1) / 2 + 1);
    }

    /// Parses the sample lines of an exposition into `name{labels}` → value, checking that
    /// each is `name[{labels}] value` with a float value.
    fn parse(text: &str) -> HashMap<String, f64> {
        let mut samples = HashMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (key, value) = line.rsplit_once(' ').expect("sample has a value");
            assert!(key.starts_with(PREFIX), "{line}");
            assert!(!key.contains(' '), "{line}");
            let value = match value {
                "+Inf" => f64::INFINITY,
                v => v
                    .parse()
                    .unwrap_or_else(|_| panic!("bad value in {line:?}")),
            };
            assert!(samples.insert(key.to_owned(), value).is_none(), "{line}");
        }
        samples
    }

    #[test]
    fn render_declares_every_family_once_with_its_type() {
        // Proves each metric family has one HELP and one TYPE line of the right kind, and
        // every line parses.
        let text = Metrics::new().render();
        for (name, kind) in [
            ("connections_open", "gauge"),
            ("connections_total", "counter"),
            ("ws_frames_in_total", "counter"),
            ("ws_frames_out_total", "counter"),
            ("http_requests_total", "counter"),
            ("commits_total", "counter"),
            ("deliveries_total", "counter"),
            ("rate_limited_total", "counter"),
            ("slow_consumer_disconnects_total", "counter"),
            ("request_duration_seconds", "histogram"),
            ("fsync_latency_seconds", "histogram"),
            ("queue_depth", "gauge"),
            ("quic_packets_sent_total", "counter"),
            ("quic_packets_lost_total", "counter"),
            ("quic_congestion_events_total", "counter"),
            ("preview_worker_crashes_total", "counter"),
            ("notify_emails_sent_total", "counter"),
            ("notify_outbox_depth", "gauge"),
            ("notify_pushes_sent_total", "counter"),
            ("notify_pushes_failed_total", "counter"),
            ("notify_pushes_retried_total", "counter"),
            ("notify_pushes_rejected_total", "counter"),
            ("notify_pushes_dropped_total", "counter"),
            ("notify_push_latency_seconds", "summary"),
            ("notify_push_latency_seconds_max", "gauge"),
        ] {
            let type_line = format!("# TYPE chorus_{name} {kind}\n");
            assert_eq!(text.matches(&type_line).count(), 1, "{type_line}");
            let help_line = format!("# HELP chorus_{name} ");
            assert_eq!(text.matches(&help_line).count(), 1, "{help_line}");
        }
        assert!(text.ends_with('\n'));
        parse(&text);
    }

    #[test]
    fn workspace_counts_not_named_keep_their_value() {
        // Proves the consumer can pass only the counts a page moved: the others stay.
        let m = Metrics::new();
        let counts = |pairs: &[(&str, u64)]| -> std::collections::BTreeMap<String, u64> {
            pairs.iter().map(|(w, n)| (w.to_string(), *n)).collect()
        };
        m.set_workspace_messages(&counts(&[("W1", 4), ("W2", 7)]));
        m.set_workspace_messages(&counts(&[("W2", 9), ("W3", 1)]));
        let s = parse(&m.render());
        let sample = |w: &str| s[&format!("chorus_workspace_messages_total{{workspace=\"{w}\"}}")];
        assert_eq!((sample("W1"), sample("W2"), sample("W3")), (4.0, 9.0, 1.0));
    }

    #[test]
    fn notify_stats_render_in_seconds() {
        // Proves the notifier's counters land in their own samples and the latency,
        // kept in microseconds, renders in seconds.
        use std::sync::atomic::Ordering::Relaxed;
        let m = Metrics::new();
        m.notify.outbox_depth.store(3, Relaxed);
        m.notify.pushes_sent.store(2, Relaxed);
        m.notify.pushes_retried.store(5, Relaxed);
        m.notify.pushes_rejected.store(1, Relaxed);
        m.notify.observe_push_latency(250_000);
        m.notify.observe_push_latency(1_250_000);
        let s = parse(&m.render());
        assert_eq!(s["chorus_notify_outbox_depth"], 3.0);
        assert_eq!(s["chorus_notify_pushes_sent_total"], 2.0);
        assert_eq!(s["chorus_notify_pushes_retried_total"], 5.0);
        assert_eq!(s["chorus_notify_pushes_rejected_total"], 1.0);
        assert_eq!(s["chorus_notify_pushes_failed_total"], 0.0);
        assert_eq!(s["chorus_notify_pushes_dropped_total"], 0.0);
        assert_eq!(s["chorus_notify_push_latency_seconds_sum"], 1.5);
        assert_eq!(s["chorus_notify_push_latency_seconds_count"], 2.0);
        assert_eq!(s["chorus_notify_push_latency_seconds_max"], 1.25);
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_agree_with_count() {
        // Proves bucket counts accumulate, `le` is inclusive, +Inf equals _count, and the
        // sum is in seconds.
        let m = Metrics::new();
        for secs in [0.0002, 0.0005, 0.003, 0.003, 7.0] {
            m.observe_request(200, Duration::from_secs_f64(secs));
        }
        m.request_duration_seconds.observe(-1.0);
        let s = parse(&m.render());
        let bucket =
            |le: &str| s[&format!("chorus_request_duration_seconds_bucket{{le=\"{le}\"}}")];
        assert_eq!(
            bucket("0.0005"),
            3.0,
            "-1 clamps to 0, and 0.0005 <= 0.0005"
        );
        assert_eq!(bucket("0.001"), 3.0);
        assert_eq!(bucket("0.005"), 5.0);
        assert_eq!(bucket("5"), 5.0);
        assert_eq!(bucket("+Inf"), 6.0, "7 s falls past the last bound");
        assert_eq!(s["chorus_request_duration_seconds_count"], 6.0);
        let sum = s["chorus_request_duration_seconds_sum"];
        assert!((sum - 7.0067).abs() < 1e-9, "{sum}");
        let snap = m.request_duration_seconds.snapshot();
        assert!(snap.buckets.windows(2).all(|w| w[0].1 <= w[1].1));
        assert_eq!(snap.buckets.len(), REQUEST_DURATION_BUCKETS_S.len());
    }

    #[test]
    fn counters_gauges_and_status_classes_render_their_values() {
        // Proves each update lands in its own sample, including from several threads.
        let m = Arc::new(Metrics::new());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let m = Arc::clone(&m);
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        m.ws_frames_in.inc();
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        let ms10 = Duration::from_millis(10);
        m.connection_opened();
        m.connection_opened();
        m.connection_closed();
        m.observe_request(201, ms10);
        m.observe_request(404, ms10);
        m.observe_request(429, ms10);
        m.observe_request(503, ms10);
        m.observe_request(999, ms10);
        m.deliveries.add(7);
        m.set_queue_depth(12);
        m.queue_depth.add(-2);
        m.observe_fsync(0.002);
        let s = parse(&m.render());
        assert_eq!(s["chorus_ws_frames_in_total"], 4000.0);
        assert_eq!(s["chorus_connections_open"], 1.0);
        assert_eq!(s["chorus_connections_total"], 2.0);
        assert_eq!(s["chorus_http_requests_total{class=\"2xx\"}"], 1.0);
        assert_eq!(s["chorus_http_requests_total{class=\"4xx\"}"], 2.0);
        assert_eq!(s["chorus_http_requests_total{class=\"5xx\"}"], 1.0);
        assert_eq!(m.http_requests(4), 2);
        assert_eq!(m.http_requests(9), 0);
        assert_eq!(s["chorus_request_duration_seconds_count"], 5.0);
        assert_eq!(s["chorus_deliveries_total"], 7.0);
        assert_eq!(s["chorus_queue_depth"], 10.0);
        assert_eq!(s["chorus_fsync_latency_seconds_bucket{le=\"0.0025\"}"], 1.0);
        assert_eq!(s["chorus_fsync_latency_seconds_bucket{le=\"0.001\"}"], 0.0);
    }

    // A warning goes through, then none for a period, then one again; two threads asking
    // at the same moment let one through.
    #[test]
    fn a_throttle_lets_one_warning_through_per_period() {
        let t = Throttle::new(Duration::from_secs(1));
        let at = |ms| t.start + Duration::from_millis(ms);
        assert!(t.allow(at(5)));
        assert!(!t.allow(at(5)));
        assert!(!t.allow(at(1_004)));
        assert!(t.allow(at(1_005)));
        assert!(!t.allow(at(1_500)));
        let through = std::thread::scope(|s| {
            let asks: Vec<_> = (0..4).map(|_| s.spawn(|| t.allow(at(3_000)))).collect();
            asks.into_iter()
                .filter_map(|a| a.join().unwrap().then_some(()))
                .count()
        });
        assert_eq!(through, 1);
    }
}
