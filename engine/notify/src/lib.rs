//! Notifications for Chorus (`API.md` §13, issue 16): the decider, a committed-event
//! consumer that decides who is pushed, and whose email digest lists, each new message;
//! the outbox, a log of its own where those decisions become durable; the push sender,
//! which delivers pushes to a push gateway; and the email sender, which sends one digest
//! per closed window through SMTP. Each runs on a thread of its own, never a shard's.

pub mod decider;
pub mod email;
pub mod outbox;
pub mod sender;

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
    let opened = outbox::Outbox::open(dir)?;
    let modes = decider::Modes {
        push: settings.push_gateway_url.is_some(),
        email: settings.email.is_some(),
    };
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
