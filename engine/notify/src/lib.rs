//! Notifications for Chorus (`API.md` §13, issue 16): the decider, a committed-event
//! consumer that decides who is pushed for each new message; the outbox, a log of its own
//! where those decisions become durable; and the push sender, which delivers them to a
//! push gateway. Each runs on a thread of its own, never a shard's.
//!
//! Email digests are not built yet.

pub mod decider;
pub mod outbox;
pub mod sender;

use chorus_engine::Engine;
use futures::channel::oneshot;
use std::path::Path;

/// The running decider and sender.
pub struct Notifier {
    stops: Vec<oneshot::Sender<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// Opens the outbox under `dir` and starts the decider (as the engine's consumer
/// `consumer`) and the push sender to `push_gateway_url`.
pub fn start(
    engine: &Engine,
    consumer: &str,
    dir: &Path,
    push_gateway_url: &str,
) -> std::io::Result<Notifier> {
    let opened = outbox::Outbox::open(dir)?;
    let (stop_sender, stopped) = oneshot::channel();
    let sender = sender::spawn(
        engine.clone(),
        push_gateway_url.to_owned(),
        opened.outbox.clone(),
        opened.sent,
        stopped,
    )?;
    let (stop_decider, stopped) = oneshot::channel();
    let decider = decider::spawn(
        engine.clone(),
        consumer,
        opened.outbox,
        opened.cursors,
        stopped,
    )?;
    Ok(Notifier {
        stops: vec![stop_decider, stop_sender],
        threads: vec![decider, sender],
    })
}

impl Notifier {
    /// Stops the decider (after storing what it decided) and then the sender, and waits
    /// for both threads.
    pub fn stop(self) {
        for (stop, thread) in self.stops.into_iter().zip(self.threads) {
            let _ = stop.send(());
            let _ = thread.join();
        }
    }
}
