//! The push sender: on a thread of its own with a tokio current-thread runtime (never a
//! shard's), it POSTs the outbox's items to the push gateway in the Matrix push gateway
//! format (`API.md` §13).
//!
//! - **Client.** One `reqwest` client: keep-alive connections, at most [`IN_FLIGHT`]
//!   requests at once (items wait in memory, in log order, for a place).
//! - **Checked again before each attempt.** The message is read as it is now: deleted, or
//!   no longer the recipient's to read (they left) → dropped; edited → the current text.
//!   Their read marker at or past it → dropped. So nothing read is pushed, whatever the
//!   delay. The badge is their unread messages over all their channels.
//! - **Checked in batches.** Consecutive items of one message (a fan-out lays them out
//!   together) are checked together, up to [`CHECK_BATCH_MAX`] at a time, in one
//!   [`Engine::push_checks`] round: one request to the channel's partition and one to each
//!   partition for the badges, however many recipients. At most [`BATCHES_IN_FLIGHT`]
//!   batches are open at once; their POSTs share the [`IN_FLIGHT`] places.
//! - **Retry.** A 5xx, a 429 or a connection error is retried after an exponential
//!   backoff with jitter ([`backoff`]), for as long as it takes: an item is answered only
//!   by the gateway, or dropped by the checks. Another 4xx gives the item up (the gateway
//!   will never take that body), with a warning.
//! - **Rejected push keys.** A 200 answer's `rejected` keys remove the device through the
//!   engine's push-device delete path (a metadata event, so the decider forgets it too).
//! - **Cursor.** After items are answered, the offset before which every item is answered
//!   is stored, with the items answered after it ([`Outbox::store_sent`]). A crash resends
//!   the items answered since the last store, with the same `event_id` (the message ID):
//!   the only way a push repeats.
//! - **Counts.** Each attempt to deliver an item ends as sent, rejected, failed (given up)
//!   or dropped in [`Stats`], and each retry is counted, for the gateway's metrics; a sent
//!   push adds its ack-to-push latency, from the message's `created_at` to the 2xx.

use crate::cluster::Gate;
use crate::outbox::{Item, Outbox, Pending, Progress};
use crate::Stats;
use chorus_engine::ids::{ChannelId, DeviceId, MessageId, UserId};
use chorus_engine::{Engine, EngineError};
use futures::channel::oneshot;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

/// Most push requests in flight at once.
pub const IN_FLIGHT: usize = 32;
/// Most items of one message checked in one round.
pub const CHECK_BATCH_MAX: usize = 256;
/// Most batches being checked or posted at once (a batch whose item waits to be retried
/// keeps its place, as a single item did before batching).
pub const BATCHES_IN_FLIGHT: usize = 32;
/// The first retry's delay.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// The longest delay between two attempts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long one request may take before it counts as a connection error.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The delay before attempt `n + 1` (after `n` failures): doubling from [`BACKOFF_MIN`] up
/// to [`BACKOFF_MAX`], then a random point in its upper half, so that many items failing
/// together do not retry together.
pub fn backoff(failures: u32) -> Duration {
    let full = BACKOFF_MIN
        .saturating_mul(1u32 << failures.min(16))
        .min(BACKOFF_MAX);
    let half = full / 2;
    half + half.mul_f64(fastrand::f64())
}

/// Starts the sender on a thread of its own; it stops when `stop` fires or its sender is
/// dropped (items not answered yet are sent after the next start).
pub fn spawn(
    engine: Engine,
    url: String,
    outbox: Arc<Outbox>,
    sent: u64,
    stop: oneshot::Receiver<()>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let url = reqwest::Url::parse(&url)
        .map_err(|e| std::io::Error::other(format!("push_gateway_url {url:?}: {e}")))?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(IN_FLIGHT)
        .pool_idle_timeout(Duration::from_secs(90))
        .timeout(REQUEST_TIMEOUT)
        .build()
        .map_err(std::io::Error::other)?;
    crate::on_own_thread("notify-push", move || {
        let sender = Sender {
            engine,
            url,
            client,
            posts: Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT)),
        };
        sender.run(outbox, sent, stop)
    })
}

#[derive(Clone)]
struct Sender {
    engine: Engine,
    /// Parsed once: a URL given as a string is parsed again for every request.
    url: reqwest::Url,
    client: reqwest::Client,
    /// The places for requests in flight.
    posts: Arc<tokio::sync::Semaphore>,
}

/// How the push gateway answered a push.
enum Answer {
    /// A 2xx, the push key not rejected.
    Sent,
    /// A 2xx listing the push key in `rejected`.
    Rejected,
    /// A 4xx other than 429: given up.
    Refused,
}

/// The next batch: the first waiting item and those after it of the same message, up to
/// [`CHECK_BATCH_MAX`].
fn next_batch(waiting: &mut VecDeque<Pending>) -> Vec<Pending> {
    let mut batch: Vec<Pending> = Vec::new();
    while let Some(p) = waiting.front() {
        let same = batch
            .first()
            .is_none_or(|f| (f.item.channel, f.item.seq) == (p.item.channel, p.item.seq));
        if !same || batch.len() >= CHECK_BATCH_MAX {
            break;
        }
        batch.extend(waiting.pop_front());
    }
    batch
}

/// A push in the Matrix push gateway format (`API.md` §13).
#[derive(Serialize)]
struct Body<'a> {
    notification: Notification<'a>,
}

#[derive(Serialize)]
struct Notification<'a> {
    event_id: &'a str,
    room_id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    sender: &'a str,
    sender_display_name: &'a str,
    room_name: &'a str,
    prio: &'static str,
    content: Content<'a>,
    counts: Counts,
    devices: [Device<'a>; 1],
}

#[derive(Serialize)]
struct Content<'a> {
    body: &'a str,
}

#[derive(Serialize)]
struct Counts {
    unread: u64,
}

#[derive(Serialize)]
struct Device<'a> {
    app_id: &'a str,
    pushkey: &'a str,
}

/// What a push gateway answers: the push keys it rejected (anything else is ignored).
#[derive(Default, Deserialize)]
struct GatewayAnswer {
    #[serde(default)]
    rejected: Vec<String>,
}

/// What the checks before an attempt found.
enum Check {
    /// Send this body (JSON), of a message committed at this time (µs since the epoch).
    Send(Vec<u8>, u64),
    /// Read, deleted, or no longer the recipient's: nothing to send.
    Drop(&'static str),
}

/// Takes out of `waiting`, from index `from` on, the items the sending node answered.
fn answered_elsewhere(gate: &Gate, waiting: &mut VecDeque<Pending>, from: usize) -> Vec<Pending> {
    let mut elsewhere = Vec::new();
    if from >= waiting.len() {
        return elsewhere;
    }
    let tail: Vec<Pending> = waiting.drain(from..).collect();
    gate.with_heard(|heard| {
        for p in tail {
            match heard.covers_push(&p.item) {
                true => elsewhere.push(p),
                false => waiting.push_back(p),
            }
        }
    });
    elsewhere
}

/// Counts `finished` items answered, and stores the cursor after them.
fn settle(outbox: &Outbox, finished: Vec<Pending>, progress: &mut Progress) {
    outbox.answered(finished.len() as u64);
    if let Some(gate) = outbox.gate() {
        gate.answered_pushes(finished.iter().map(|p| &p.item));
    }
    let (cursor, answered) = progress.answered(finished.iter().map(|p| p.at));
    if let Err(e) = outbox.store_sent(cursor, answered) {
        tracing::error!(error = %e, "notify sender: cursor not stored");
    }
}

impl Sender {
    async fn run(self, outbox: Arc<Outbox>, sent: u64, mut stop: oneshot::Receiver<()>) {
        let mut waiting: VecDeque<Pending> = VecDeque::new();
        let mut progress = Progress::new(sent);
        let mut tasks = tokio::task::JoinSet::new();
        let gate = outbox.gate().cloned();
        let mut changes = gate.as_ref().map(|g| g.subscribe());
        // Whether what the sending node answered changed since the items were looked at
        // (at the start, what was heard before this sender ran).
        let mut changed = true;
        loop {
            let taken = outbox.take();
            let fresh = taken.len();
            for p in taken {
                progress.took(p.at, p.end);
                waiting.push_back(p);
            }
            // On a cluster, what the sending node answered is answered here unsent: the
            // items just taken, or all waiting when what it answered has changed.
            if let Some(gate) = &gate {
                let from = if std::mem::take(&mut changed) {
                    0
                } else {
                    waiting.len() - fresh
                };
                let elsewhere = answered_elsewhere(gate, &mut waiting, from);
                if !elsewhere.is_empty() {
                    let n = elsewhere.len() as u64;
                    outbox.stats.answered_elsewhere.fetch_add(n, Relaxed);
                    settle(&outbox, elsewhere, &mut progress);
                }
            }
            let sending = gate.as_ref().is_none_or(|g| g.sending());
            while sending && tasks.len() < BATCHES_IN_FLIGHT {
                let batch = next_batch(&mut waiting);
                if batch.is_empty() {
                    break;
                }
                let sender = self.clone();
                let stats = outbox.stats.clone();
                tasks.spawn_local(async move {
                    sender.send_batch(&batch, &stats).await;
                    batch
                });
            }
            let change = crate::cluster::next_change(&mut changes);
            tokio::select! {
                _ = outbox.appended.notified() => {}
                _ = change => changed = true,
                Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                    let mut finished: Vec<Pending> = done.into_iter().flatten().collect();
                    while let Some(Ok(batch)) = tasks.try_join_next() {
                        finished.extend(batch);
                    }
                    settle(&outbox, finished, &mut progress);
                }
                _ = &mut stop => return,
            }
        }
    }

    /// Sends a batch of items of one message: one round of checks for all of them, then
    /// their POSTs, concurrently within the [`IN_FLIGHT`] places. An item whose first
    /// attempt fails (or whose checks could not be made) goes on alone with retries
    /// ([`Self::send`]).
    async fn send_batch(&self, batch: &[Pending], stats: &Stats) {
        let items: Vec<&Item> = batch.iter().map(|p| &p.item).collect();
        // `None`: the checks could not be made, which counts as a failed first attempt.
        let checks: Vec<Option<Check>> = match self.checks(&items).await {
            Ok(checks) => checks.into_iter().map(Some).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "notify sender: checks failed");
                items.iter().map(|_| None).collect()
            }
        };
        let each = items
            .into_iter()
            .zip(checks)
            .map(|(item, check)| async move {
                let over = match check {
                    Some(check) => self.attempt(item, check, stats, 0).await,
                    None => false,
                };
                if !over {
                    stats.pushes_retried.fetch_add(1, Relaxed);
                    tokio::time::sleep(backoff(0)).await;
                    self.send(item, stats, 1).await;
                }
            });
        futures::future::join_all(each).await;
    }

    /// Sends one item until the gateway answers it or the checks drop it, and counts how
    /// it ended in `stats`; `failures` attempts failed before.
    async fn send(&self, item: &Item, stats: &Stats, mut failures: u32) {
        loop {
            match self.checks(&[item]).await {
                Ok(mut checks) => {
                    let check = checks.pop().expect("one check per item");
                    if self.attempt(item, check, stats, failures).await {
                        return;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "notify sender: checks failed"),
            }
            tokio::time::sleep(backoff(failures)).await;
            failures += 1;
            stats.pushes_retried.fetch_add(1, Relaxed);
        }
    }

    /// One attempt at a checked item: whether it is over (dropped, or answered by the
    /// gateway), counted in `stats`; `false` if it is to be tried again.
    async fn attempt(&self, item: &Item, check: Check, stats: &Stats, failures: u32) -> bool {
        let (body, created_us) = match check {
            Check::Drop(why) => {
                tracing::debug!(why, seq = item.seq, "notify sender: push dropped");
                stats.pushes_dropped.fetch_add(1, Relaxed);
                return true;
            }
            Check::Send(body, created_us) => (body, created_us),
        };
        let answer = {
            let _place = self
                .posts
                .acquire()
                .await
                .expect("the places are never closed");
            self.post(item, body).await
        };
        let counter = match answer {
            Ok(Answer::Sent) => {
                let now_us = jiff::Timestamp::now().as_microsecond().max(0) as u64;
                stats.observe_push_latency(now_us.saturating_sub(created_us));
                &stats.pushes_sent
            }
            Ok(Answer::Rejected) => &stats.pushes_rejected,
            Ok(Answer::Refused) => &stats.pushes_failed,
            Err(e) => {
                tracing::warn!(error = %e, failures, "notify sender: push failed");
                return false;
            }
        };
        counter.fetch_add(1, Relaxed);
        true
    }

    /// Posts a body: `Ok` once answered (2xx, or a 4xx that no retry would change).
    async fn post(&self, item: &Item, body: Vec<u8>) -> Result<Answer, String> {
        let resp = self
            .client
            .post(self.url.clone())
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status();
        if status.is_server_error() || status.as_u16() == 429 {
            return Err(format!("push gateway answered {status}"));
        }
        if !status.is_success() {
            tracing::warn!(%status, seq = item.seq, "notify sender: the push gateway refused a push; given up");
            return Ok(Answer::Refused);
        }
        let answer: GatewayAnswer = match resp.bytes().await {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_default(),
            Err(_) => GatewayAnswer::default(),
        };
        let rejected = answer.rejected.contains(&item.pushkey);
        if rejected {
            let (user, device) = (UserId(item.user), DeviceId(item.device));
            match self.engine.remove_push_device(user, device).await {
                Ok(()) | Err(EngineError::Domain(_)) => {}
                Err(e) => tracing::warn!(error = %e, "notify sender: rejected device not removed"),
            }
            return Ok(Answer::Rejected);
        }
        Ok(Answer::Sent)
    }

    /// Checks items of one message (the first one's) against the message and each
    /// recipient's read state as they are now, in one round; one check per item, in order.
    async fn checks(&self, items: &[&Item]) -> Result<Vec<Check>, EngineError> {
        let Some(first) = items.first() else {
            return Ok(Vec::new());
        };
        let id = MessageId {
            channel: ChannelId(first.channel),
            seq: first.seq,
        };
        let users = items.iter().map(|i| UserId(i.user)).collect();
        let found = match self.engine.push_checks(id, users).await {
            Ok(found) => found,
            Err(EngineError::Domain(_)) => {
                return Ok(items.iter().map(|_| Check::Drop("not readable")).collect())
            }
            Err(e) => return Err(e),
        };
        let Some(message) = found.message else {
            return Ok(items.iter().map(|_| Check::Drop("not readable")).collect());
        };
        if message.deleted {
            return Ok(items.iter().map(|_| Check::Drop("deleted")).collect());
        }
        // The items are of one message: one author.
        let sender = UserId(first.author).to_string();
        let (event_id, room_id) = (id.to_string(), id.channel.to_string());
        let checks = items.iter().zip(found.recipients).map(|(item, r)| {
            if !r.member {
                return Check::Drop("not readable");
            }
            if r.read_seq >= item.seq {
                return Check::Drop("read");
            }
            let body = Body {
                notification: Notification {
                    event_id: &event_id,
                    room_id: &room_id,
                    kind: "m.room.message",
                    sender: &sender,
                    sender_display_name: &item.author_name,
                    room_name: &item.room_name,
                    prio: if item.high { "high" } else { "low" },
                    content: Content {
                        body: &message.text,
                    },
                    counts: Counts { unread: r.unread },
                    devices: [Device {
                        app_id: &item.app_id,
                        pushkey: &item.pushkey,
                    }],
                },
            };
            let json = serde_json::to_vec(&body).expect("a push body always serializes");
            Check::Send(json, message.created_at)
        });
        Ok(checks.collect())
    }
}
