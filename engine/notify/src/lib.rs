//! Notifications for Chorus (`API.md` §13, issue 16): the decider, a committed-event
//! consumer that decides who is pushed, and whose email digest lists, each new message;
//! the outbox, a log of its own where those decisions become durable; the push sender,
//! which delivers pushes to a push gateway; and the email sender, which sends one digest
//! per closed window through SMTP. Each runs on a thread of its own, never a shard's.

pub mod candidates;
pub mod cluster;
pub mod decider;
pub mod email;
pub mod outbox;
pub mod sender;
pub mod snapshot;

use chorus_engine::Engine;
use futures::channel::oneshot;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

/// What to notify through, and where to count it.
#[derive(Clone, Debug, Default)]
pub struct Settings {
    /// The push gateway's notify endpoint; `None`: no pushes.
    pub push_gateway_url: Option<String>,
    /// The SMTP server and the digests' sender; `None`: no email.
    pub email: Option<email::EmailConfig>,
    /// Digests handed to the SMTP server, for the gateway's metrics.
    pub emails_sent: Arc<AtomicU64>,
    /// The outbox's and the push sender's counters, for the gateway's metrics.
    pub stats: Arc<Stats>,
    /// On a cluster node: where the senders learn whether they send and what the sending
    /// node answered ([`cluster`]); `None` on a single node, which always sends.
    pub gate: Option<Arc<cluster::Gate>>,
}

/// What the outbox and the push sender count, for the gateway's metrics. Plain relaxed
/// atomics: each is an independent number that a scrape reads on its own.
///
/// Every push item the decider stores ends in exactly one of `pushes_sent`,
/// `pushes_rejected`, `pushes_failed` or `pushes_dropped` (once per attempt to deliver
/// it: an item resent after a crash counts again), so that their sum against the items
/// decided shows where pushes go.
#[derive(Debug, Default)]
pub struct Stats {
    /// Items in the outbox not answered yet: push items decided and not yet answered by
    /// the push gateway (or dropped, or given up), plus email items whose digest is not
    /// answered yet. Set from the log at open, so it survives a restart.
    pub outbox_depth: AtomicU64,
    /// Pushes the push gateway answered with a 2xx without rejecting their push key.
    pub pushes_sent: AtomicU64,
    /// Pushes given up: the push gateway answered a 4xx other than 429, which no retry
    /// would change. (Connection errors, 5xx and 429 are retried for as long as it takes,
    /// so they never end here.)
    pub pushes_failed: AtomicU64,
    /// Attempts repeated after a connection error, a 5xx, a 429, or checks that could not
    /// read the engine: one per retry, not per item.
    pub pushes_retried: AtomicU64,
    /// Pushes whose push key the push gateway rejected (a 2xx listing it in `rejected`):
    /// the device is removed.
    pub pushes_rejected: AtomicU64,
    /// Pushes not sent because, when their turn came, the message was read, deleted, or
    /// no longer the recipient's to read.
    pub pushes_dropped: AtomicU64,
    /// On a cluster node: items (push or email) answered without sending them, because the
    /// sending node answered them ([`cluster`]).
    pub answered_elsewhere: AtomicU64,
    /// Ack-to-push latency, from the message's commit (its `created_at`) to the push
    /// gateway's 2xx answer, of the pushes counted in `pushes_sent`: total and largest
    /// in microseconds, and how many were observed.
    pub push_latency_us_total: AtomicU64,
    /// See [`Stats::push_latency_us_total`].
    pub push_latency_us_max: AtomicU64,
    /// See [`Stats::push_latency_us_total`].
    pub push_latency_count: AtomicU64,
}

impl Stats {
    /// Records one push's ack-to-push latency.
    pub fn observe_push_latency(&self, us: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.push_latency_us_total.fetch_add(us, Relaxed);
        self.push_latency_us_max.fetch_max(us, Relaxed);
        self.push_latency_count.fetch_add(1, Relaxed);
    }
}

/// Starts a sender on a thread of its own named `name`, with a current-thread tokio runtime
/// (built first, so that a failure shows before the thread starts) and a local task set,
/// on which a sender spawns its requests (`spawn_local`). A sender keeps the process's
/// priority, unlike the decider: what a crash repeats is what it answered and had not yet
/// stored, and a nicer sender on busy cores stored late (3.25 repeats per kill against
/// 0.10–0.30).
fn on_own_thread<F, Fut>(name: &str, task: F) -> std::io::Result<std::thread::JoinHandle<()>>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let local = tokio::task::LocalSet::new();
            local.block_on(&runtime, task());
        })
}

/// The running decider and senders.
pub struct Notifier {
    stops: Vec<oneshot::Sender<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// Opens the outbox under `dir` and starts the decider (as the engine's consumer
/// `consumer`) and a sender for each kind of notification `settings` configures.
pub fn start(
    engine: &Engine,
    consumer: &str,
    dir: &Path,
    settings: Settings,
) -> std::io::Result<Notifier> {
    let opened = outbox::Outbox::open(dir, settings.stats.clone())?;
    let modes = decider::Modes {
        push: settings.push_gateway_url.is_some(),
        email: settings.email.is_some(),
    };
    if let Some(gate) = &settings.gate {
        gate.set_modes(modes.push, modes.email);
        opened.outbox.attach(gate.clone());
    }
    // Items of a kind with no sender now (its setting was removed) stay in the outbox for
    // a later start that has one, but nothing here waits on them: the depth leaves them out.
    let (pushes, emails) = opened.outbox.waiting();
    let depth = u64::from(modes.push) * pushes + u64::from(modes.email) * emails;
    (settings.stats.outbox_depth).store(depth, std::sync::atomic::Ordering::Relaxed);
    // The senders first: a sender that cannot start (an `email_from` that does not parse)
    // stops the server before anything is decided.
    let mut senders = Vec::new();
    if let Some(url) = settings.push_gateway_url {
        let (stop, stopped) = oneshot::channel();
        let outbox = opened.outbox.clone();
        let thread = sender::spawn(engine.clone(), url, outbox, opened.sent, stopped)?;
        senders.push((stop, thread));
    }
    if let Some(config) = settings.email {
        let (stop, stopped) = oneshot::channel();
        let thread = email::spawn(
            engine.clone(),
            config,
            opened.outbox.clone(),
            opened.emailed,
            settings.emails_sent,
            stopped,
        )?;
        senders.push((stop, thread));
    }
    let (stop, stopped) = oneshot::channel();
    let decider = decider::spawn(
        engine.clone(),
        consumer,
        opened.outbox,
        opened.cursors,
        modes,
        opened.windows,
        stopped,
    )?;
    // The decider is stopped first, so that it stores what it decided before the senders go.
    let (stops, threads) = std::iter::once((stop, decider)).chain(senders).unzip();
    Ok(Notifier { stops, threads })
}

impl Notifier {
    /// Stops the decider (after storing what it decided) and then the senders, and waits
    /// for each thread.
    pub fn stop(self) {
        for (stop, thread) in self.stops.into_iter().zip(self.threads) {
            let _ = stop.send(());
            let _ = thread.join();
        }
    }
}
