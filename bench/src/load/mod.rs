//! The load harness's shared vocabulary: the shape of each scenario and what a run of it
//! measured. Chorus (`chorus` driver) and every peer (`peers::redis`, `peers::nats`,
//! `peers::postgres`) take the same shape and return the same outcome, so one report row
//! can put them side by side.
//!
//! Latencies are microseconds in [`crate::latency::histogram_us`] histograms, measured
//! from the *intended* send time of an open-loop schedule, never from the moment the
//! generator got round to sending.

pub mod chorus;
pub mod client;
pub mod cluster;
pub mod corpus;
pub mod files;
pub mod history;
pub mod notify;
pub mod plot;
pub mod presence;
pub mod procstat;
pub mod report;
pub mod schedule;
pub mod search;
pub mod seed;
pub mod server;
pub mod worker;

use hdrhistogram::Histogram;
use std::time::Duration;

/// `chat`: `connections` clients, grouped into channels of `members`; messages are sent at
/// `rate` per second in total, spread over the senders on a fixed schedule.
#[derive(Clone, Debug)]
pub struct ChatShape {
    /// Connected clients, each one member of exactly one channel.
    pub connections: usize,
    /// Members per channel (the last channel may be smaller).
    pub members: usize,
    /// Messages per second, in total, across all channels.
    pub rate: f64,
    /// How long the measured part of the run lasts.
    pub duration: Duration,
    /// A run-in before measuring, whose results are discarded.
    pub warmup: Duration,
    /// Bytes of text per message.
    pub body_bytes: usize,
}

/// What a `chat` run measured.
#[derive(Clone, Debug)]
pub struct ChatOutcome {
    /// Intended send time → the server's acknowledgement (durable for Chorus and NATS;
    /// Redis's `PUBLISH` reply, which is not durable).
    pub ack: Histogram<u64>,
    /// Intended send time → arrival at each recipient, one record per delivery.
    pub delivery: Histogram<u64>,
    /// Messages sent in the measured window.
    pub sent: u64,
    /// Deliveries the sent messages should cause (sent × recipients per message).
    pub expected_deliveries: u64,
    /// Deliveries that arrived before the run's drain deadline.
    pub delivered: u64,
    /// Length of the measured window.
    pub elapsed: Duration,
    /// The server's resource use over the measured window.
    pub server: ServerUsage,
    /// CPU seconds the load generator used over the measured window: the worker processes
    /// for Chorus, this process for the peers. It shares the server's two cores.
    pub generator_cpu_secs: f64,
}

/// `fanout`: one channel of `members`, of whom `online` hold a live subscription; one
/// message at a time, `rounds` times.
#[derive(Clone, Debug)]
pub struct FanoutShape {
    /// Members of the channel.
    pub members: usize,
    /// Members that are connected and subscribed.
    pub online: usize,
    /// Messages sent, one after another (the next once the last online member has it).
    pub rounds: usize,
}

/// What a `fanout` run measured.
#[derive(Clone, Debug)]
pub struct FanoutOutcome {
    /// Send → first online delivery, one record per round.
    pub first: Histogram<u64>,
    /// Send → last online delivery, one record per round.
    pub last: Histogram<u64>,
    /// Deliveries that never arrived before a round's deadline (should be 0).
    pub missing: u64,
    /// The server's resource use over the run.
    pub server: ServerUsage,
}

/// `connections`: `connections` idle, authenticated sessions (WebSocket or QUIC for
/// Chorus; a peer's own connections).
#[derive(Clone, Debug)]
pub struct ConnectionsShape {
    /// Connections to open and hold.
    pub connections: usize,
}

/// What a `connections` run measured.
#[derive(Clone, Debug)]
pub struct ConnectionsOutcome {
    /// Connections that were open and authenticated at the end.
    pub open: usize,
    /// Connections per second while opening.
    pub connect_rate: f64,
    /// Seconds from the first connect to the last session open (the slowest worker's).
    pub connect_secs: f64,
    /// The liveness check after the RSS reading, where the run makes one.
    pub live: Option<LiveCheck>,
    /// Server RSS before the first connection, in bytes.
    pub rss_before: u64,
    /// Server RSS with all connections open and idle, in bytes.
    pub rss_after: u64,
}

/// Every open session was asked to answer at once (a `ping` with a ref each), proving it
/// live rather than merely counted.
#[derive(Clone, Copy, Debug)]
pub struct LiveCheck {
    /// Sessions whose `pong` came back.
    pub answered: usize,
    /// From sending the pings to the last `pong` (or to the give-up time).
    pub last: Duration,
}

/// `history`: a channel of `messages`; `queries` page reads at random `before` cursors,
/// `page` messages each, with `concurrency` readers.
#[derive(Clone, Debug)]
pub struct HistoryShape {
    /// Messages in the channel.
    pub messages: usize,
    /// Messages per page.
    pub page: usize,
    /// Page reads measured.
    pub queries: usize,
    /// Readers at once.
    pub concurrency: usize,
}

/// What a `history` run measured.
#[derive(Clone, Debug)]
pub struct HistoryOutcome {
    /// One record per page read: request → full page parsed.
    pub page: Histogram<u64>,
    /// Time to load the channel before measuring.
    pub load: Duration,
    /// Pages that came back short or wrong (should be 0).
    pub wrong: u64,
    /// The server's resource use over the measured reads.
    pub server: ServerUsage,
}

/// A server process's resource use, read from `/proc/PID/stat`, `/proc/PID/status` and
/// each thread's `/proc/PID/task/TID/status` (see [`procstat`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct ServerUsage {
    /// CPU seconds (user + system) the process used in the window.
    pub cpu_secs: f64,
    /// Resident set size at the end of the window, in bytes.
    pub rss_bytes: u64,
    /// Voluntary context switches (a thread blocked: a wait, a park, a sleep) in the
    /// window, summed over the threads alive at its end; those of threads that exited
    /// during the window are lost.
    pub voluntary_switches: u64,
    /// Involuntary context switches (a thread preempted) in the window, counted as
    /// [`ServerUsage::voluntary_switches`] are.
    pub involuntary_switches: u64,
}

impl ServerUsage {
    /// Voluntary and involuntary context switches together.
    pub fn switches(&self) -> u64 {
        self.voluntary_switches + self.involuntary_switches
    }
}
