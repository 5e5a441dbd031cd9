//! `presence`: presence at scale over real connections (API.md §10).
//!
//! Every connection is its own user, in one workspace, and watches `watched` other users
//! with one `presence:sub`. Then a fixed share of the users changes status every second:
//! the user's one connection reports `activity` `idle` (its status becomes `away`) and,
//! at its next change, `active` (back to `online`). The server delivers each change as a
//! `presence` frame, coalesced per connection over `presence_flush_ms`, to every connection
//! that watches the user.
//!
//! The schedule of changes is a pure function of the plan ([`PresencePlan`]), so every
//! process knows when each change fell due without being told: change `k` is due at
//! `start + k / rate`, made by user `k × stride mod users`, and sets `away` on the user's
//! even-numbered changes and `online` on the odd ones. A user's changes are `users / rate`
//! seconds apart (20 s at the standard size), far longer than a flush window, so a
//! `presence` frame that reports status `s` for user `u` answers exactly one change: the
//! latest of `u`'s changes to `s` that fell due before it arrived. Latency runs from that
//! due time, in any worker (open loop, as `chat`).
//!
//! Measured: change → frame at every subscriber; deliveries expected and made; server
//! memory per subscription (RSS with the subscriptions, less RSS with the same connections
//! before any); server CPU per change and per update delivered; the generator's CPU.

use super::chorus::{nanos, sleep_until_wall, ChorusRunner};
use super::client::{Conn, Dialer, Target, Transport};
use super::procstat::{self, UsageWindow};
use super::schedule::{self, wall_ns, Schedule, WallSleeper};
use super::seed;
use super::server::{self, ChorusServer};
use super::worker::{
    self, close_all, connect_all, next_command, report, spawn_session, Command, Control, Report,
    Stdin,
};
use super::ServerUsage;
use anyhow::{bail, ensure, Context};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::net::IpAddr;
use std::rc::Rc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Members per channel of the seeded users: channels play no part in presence, but every
/// seeded user is in one, as in the other scenarios.
const CHANNEL_MEMBERS: usize = 50;
/// How long a worker waits for its sessions' `presence:sub` acks.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long after the last change a worker keeps counting frames: several flush windows.
const DRAIN: Duration = Duration::from_secs(3);
/// The ref of every `presence:sub`.
const SUB_REF: &str = "presence-sub";

/// The shape of a `presence` run.
#[derive(Clone, Debug)]
pub struct PresenceShape {
    /// Connections, one user each.
    pub connections: usize,
    /// Users each connection watches.
    pub watched: usize,
    /// Share of the users that changes status each second (0.05 = 5 %).
    pub change_share: f64,
    /// How long the measured part of the run lasts.
    pub duration: Duration,
    /// A run-in before measuring, whose results are discarded.
    pub warmup: Duration,
}

impl PresenceShape {
    /// Status changes per second, over all users.
    pub fn rate(&self) -> f64 {
        self.connections as f64 * self.change_share
    }
}

/// What a `presence` run measured.
#[derive(Clone, Debug)]
pub struct PresenceOutcome {
    /// Due time of a change → its `presence` frame at a subscriber, one record per update
    /// delivered in the measured window.
    pub frame: Histogram<u64>,
    /// Due time of a change → its `activity` written to the socket by the generator, one
    /// record per change in the window: the generator's own lateness, which `frame`
    /// includes.
    pub sent: Histogram<u64>,
    /// Changes made in the measured window.
    pub changes: u64,
    /// Updates those changes should cause: one per subscriber of the changed user.
    pub expected: u64,
    /// Updates that arrived.
    pub delivered: u64,
    /// Updates that matched no change of the schedule, and `error` frames (should be 0).
    pub unexpected: u64,
    /// Connections the server closed during the run (should be 0).
    pub closed: u64,
    /// Subscriptions made (every `presence:sub` acked, times the users in it).
    pub subscriptions: u64,
    /// Seconds from the first `presence:sub` to the last ack (the slowest worker's).
    pub subscribe_secs: f64,
    /// Server RSS with every connection open, before any subscription, in bytes.
    pub rss_connected: u64,
    /// Server RSS with every subscription made, in bytes.
    pub rss_subscribed: u64,
    /// The server's resource use over the measured window.
    pub server: ServerUsage,
    /// CPU seconds the worker processes used over the measured window.
    pub generator_cpu_secs: f64,
    /// The server's `presence_flush_ms`, which the latency target adds 50 ms to.
    pub flush_ms: u64,
}

impl PresenceOutcome {
    /// Server memory per subscription, in bytes.
    pub fn bytes_per_subscription(&self) -> f64 {
        self.rss_subscribed.saturating_sub(self.rss_connected) as f64
            / self.subscriptions.max(1) as f64
    }

    /// Server CPU per update delivered (one change to one subscriber), in microseconds.
    pub fn cpu_us_per_update(&self) -> f64 {
        self.server.cpu_secs * 1e6 / self.delivered.max(1) as f64
    }

    /// Server CPU per status change, all its subscribers included, in microseconds.
    pub fn cpu_us_per_change(&self) -> f64 {
        self.server.cpu_secs * 1e6 / self.changes.max(1) as f64
    }
}

/// Who watches whom and who changes when: the same in every process of a run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PresencePlan {
    /// Users, one per connection.
    pub users: usize,
    /// Users each connection watches.
    pub watched: usize,
    /// Changes per second over all users.
    pub rate: f64,
    /// Seed of the watch lists.
    pub seed: u64,
}

impl PresencePlan {
    /// The multiplier that spreads consecutive changes over the users (and so over the
    /// workers and the server's shards): the first of a few primes that shares no factor
    /// with the user count, so that `k × stride mod users` visits every user once per
    /// `users` changes.
    fn stride(&self) -> u64 {
        let n = self.users.max(1) as u64;
        [7_919, 7_927, 7_933, 7_937]
            .into_iter()
            .find(|p| gcd(*p, n) == 1)
            .unwrap_or(1)
    }

    /// The user who makes change `k`.
    pub fn user_of(&self, k: u64) -> usize {
        ((k % self.users as u64) * self.stride() % self.users as u64) as usize
    }

    /// Each user's first change: `first[u]` is the smallest `k` with `user_of(k) == u`;
    /// the user's later ones are `first[u] + j × users`.
    pub fn first_changes(&self) -> Vec<u64> {
        let mut first = vec![0; self.users];
        for k in 0..self.users as u64 {
            first[self.user_of(k)] = k;
        }
        first
    }

    /// The status change `k` sets: `away` on a user's even-numbered changes (its `j`-th,
    /// counting from 0), `online` on the odd ones.
    pub fn status_of(&self, k: u64) -> &'static str {
        if (k / self.users as u64).is_multiple_of(2) {
            "away"
        } else {
            "online"
        }
    }

    /// The users connection `c` watches: `watched` distinct others, drawn from the seed.
    pub fn watched_by(&self, c: usize) -> Vec<usize> {
        let want = self.watched.min(self.users.saturating_sub(1));
        let mut rng = super::history::XorShift::new(
            (self.seed ^ c as u64)
                .wrapping_add(1)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let mut picked = std::collections::BTreeSet::new();
        while picked.len() < want {
            let u = rng.below(self.users as u64) as usize;
            if u != c {
                picked.insert(u);
            }
        }
        picked.into_iter().collect()
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// A worker's share of a `presence` run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PresenceJob {
    /// The server (WebSocket).
    pub target: Target,
    /// This worker's source address.
    pub source: IpAddr,
    /// `(user index, token)` of each connection this worker holds.
    pub connections: Vec<(usize, String)>,
    /// Every user's ID, by index.
    pub user_ids: Vec<String>,
    /// The plan of the run.
    pub plan: PresencePlan,
    /// Nanoseconds of schedule before the measured window.
    pub warmup_ns: u64,
    /// Nanoseconds of the measured window.
    pub duration_ns: u64,
}

/// A worker's measurements of a presence run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PresenceTotals {
    /// Change → frame latencies, as `(µs, count)` pairs.
    pub frame: Vec<(u64, u64)>,
    /// Change → `activity` written latencies, as `(µs, count)` pairs.
    pub sent: Vec<(u64, u64)>,
    /// Changes this worker's users made in the window.
    pub changes: u64,
    /// Updates this worker's connections should receive for the window's changes.
    pub expected: u64,
    /// Those that arrived.
    pub delivered: u64,
    /// Updates matching no scheduled change, and `error` frames.
    pub unexpected: u64,
    /// Connections the server closed.
    pub closed: u64,
}

/// A frame for a connection to send; a change carries its due time.
struct Outgoing {
    text: String,
    due_ns: Option<u64>,
}

/// The parts of a server frame a presence worker reads.
#[derive(Deserialize)]
struct PresenceFrame<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(rename = "ref", default, borrow)]
    reference: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    users: Option<HashMap<Cow<'a, str>, UserStatus<'a>>>,
}

#[derive(Deserialize)]
struct UserStatus<'a> {
    #[serde(borrow)]
    status: Cow<'a, str>,
}

/// What a presence worker's connection tasks share.
struct Watching {
    plan: PresencePlan,
    /// User ID → user index.
    index: HashMap<String, usize>,
    /// Each user's first change (see [`PresencePlan::first_changes`]).
    first: Vec<u64>,
    /// The schedule, once started.
    schedule: Option<Schedule>,
    window: (u64, u64),
    frame: Histogram<u64>,
    sent: Histogram<u64>,
    totals: PresenceTotals,
    /// `presence:sub` acks received, and the users they added.
    acked: usize,
    subscribed: u64,
}

impl Watching {
    fn on_frame(&mut self, text: &str) {
        let Ok(frame) = serde_json::from_str::<PresenceFrame>(text) else {
            self.totals.unexpected += 1;
            return;
        };
        match (frame.kind.as_ref(), frame.users) {
            ("ack", Some(users)) if frame.reference.as_deref() == Some(SUB_REF) => {
                self.acked += 1;
                self.subscribed += users.len() as u64;
            }
            ("presence", Some(users)) => {
                let now = wall_ns();
                for (id, status) in users {
                    self.on_update(&id, &status.status, now);
                }
            }
            ("error", _) => self.totals.unexpected += 1,
            _ => {}
        }
    }

    /// Finds the change that an update reports and records its latency.
    fn on_update(&mut self, id: &str, status: &str, now: u64) {
        let (Some(schedule), Some(&u)) = (self.schedule, self.index.get(id)) else {
            self.totals.unexpected += 1;
            return;
        };
        let (n, first) = (self.plan.users as u64, self.first[u]);
        // The user's latest change due by now, then the one before it if that is the one
        // whose status this is.
        let mut latest = None;
        let mut j = 0;
        while schedule.due_ns(first + j * n) <= now {
            latest = Some(first + j * n);
            j += 1;
        }
        let change = latest.and_then(|k| {
            if self.plan.status_of(k) == status {
                Some(k)
            } else {
                k.checked_sub(n)
                    .filter(|p| *p >= first && self.plan.status_of(*p) == status)
            }
        });
        let Some(k) = change else {
            self.totals.unexpected += 1;
            return;
        };
        let due = schedule.due_ns(k);
        if (self.window.0..self.window.1).contains(&due) {
            crate::latency::record(&mut self.frame, schedule::since(due, now));
            self.totals.delivered += 1;
        }
    }
}

/// The worker side of a `presence` run: connect, subscribe when told, make this worker's
/// users' changes from the start time, then report what arrived.
pub async fn work(job: PresenceJob, mut stdin: Stdin) -> anyhow::Result<()> {
    let tokens: Vec<&str> = job.connections.iter().map(|(_, t)| t.as_str()).collect();
    let dialer = Dialer::new(&job.target, job.source)?;
    let state = Rc::new(RefCell::new(Watching {
        plan: job.plan.clone(),
        index: job
            .user_ids
            .iter()
            .enumerate()
            .map(|(i, id)| (id.clone(), i))
            .collect(),
        first: job.plan.first_changes(),
        schedule: None,
        window: (0, 0),
        frame: crate::latency::histogram_us(),
        sent: crate::latency::histogram_us(),
        totals: PresenceTotals::default(),
        acked: 0,
        subscribed: 0,
    }));
    // User index → that user's outgoing frames, for the connections that opened.
    let mut senders: HashMap<usize, mpsc::UnboundedSender<Outgoing>> = HashMap::new();
    let mut running = Vec::new();
    let ready = connect_all(&dialer, &tokens, |i, conn| {
        let (tx, rx) = mpsc::unbounded_channel();
        senders.insert(job.connections[i].0, tx);
        let state = state.clone();
        running.push(spawn_session(|control| {
            presence_connection(conn, rx, state, control)
        }));
    })
    .await;
    report(&ready);
    loop {
        match next_command(&mut stdin).await? {
            Command::Subscribe => subscribe(&job, &senders, &state).await,
            Command::Start { start_ns } => {
                make_changes(&job, start_ns, &senders, &state).await;
                let totals = {
                    let s = state.borrow();
                    PresenceTotals {
                        frame: worker::histogram_pairs(&s.frame),
                        sent: worker::histogram_pairs(&s.sent),
                        ..s.totals.clone()
                    }
                };
                report(&Report::PresenceDone(totals));
            }
            Command::Stop => {
                drop(senders);
                close_all(running, &dialer).await;
                return Ok(());
            }
            other => bail!("a presence worker does not take {other:?}"),
        }
    }
}

/// Sends every connection's `presence:sub`, [`worker::CONTROL_BATCH`] at a time, and
/// reports [`Report::Subscribed`] once all are acked (or at [`SUBSCRIBE_TIMEOUT`]).
async fn subscribe(
    job: &PresenceJob,
    senders: &HashMap<usize, mpsc::UnboundedSender<Outgoing>>,
    state: &Rc<RefCell<Watching>>,
) {
    let started = std::time::Instant::now();
    let ids = |c: usize| -> Vec<&str> {
        job.plan
            .watched_by(c)
            .into_iter()
            .map(|u| job.user_ids[u].as_str())
            .collect()
    };
    let mine: Vec<usize> = job.connections.iter().map(|(c, _)| *c).collect();
    for batch in mine.chunks(worker::CONTROL_BATCH) {
        for c in batch {
            if let Some(tx) = senders.get(c) {
                let frame = serde_json::json!({
                    "type": "presence:sub", "ref": SUB_REF, "user_ids": ids(*c),
                });
                let _ = tx.send(Outgoing {
                    text: frame.to_string(),
                    due_ns: None,
                });
            }
        }
        tokio::time::sleep(worker::CONTROL_PAUSE).await;
    }
    let deadline = tokio::time::Instant::now() + SUBSCRIBE_TIMEOUT;
    while state.borrow().acked < senders.len() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let s = state.borrow();
    report(&Report::Subscribed {
        acked: s.acked,
        subscriptions: s.subscribed,
        secs: started.elapsed().as_secs_f64(),
    });
}

/// Makes this worker's users' changes, each when it falls due, from a thread of its own
/// (as `chat`'s sends: the tokio timer of a busy worker would add its own lateness), then
/// counts frames for [`DRAIN`] longer.
async fn make_changes(
    job: &PresenceJob,
    start_ns: u64,
    senders: &HashMap<usize, mpsc::UnboundedSender<Outgoing>>,
    state: &Rc<RefCell<Watching>>,
) {
    let plan = &job.plan;
    let schedule = Schedule {
        start_ns,
        rate: plan.rate,
    };
    let window = (
        start_ns + job.warmup_ns,
        start_ns + job.warmup_ns + job.duration_ns,
    );
    let total = schedule.count_in(Duration::from_nanos(job.warmup_ns + job.duration_ns));
    {
        let mut s = state.borrow_mut();
        (s.schedule, s.window) = (Some(schedule), window);
        // Each watched user's changes in the window reach every one of this worker's
        // connections that watches the user.
        let mut watchers = vec![0u64; plan.users];
        for (c, _) in &job.connections {
            if senders.contains_key(c) {
                for u in plan.watched_by(*c) {
                    watchers[u] += 1;
                }
            }
        }
        for k in 0..total {
            let due = schedule.due_ns(k);
            if (window.0..window.1).contains(&due) {
                let u = plan.user_of(k);
                s.totals.expected += watchers[u];
                s.totals.changes += u64::from(senders.contains_key(&u));
            }
        }
    }
    let mine: Vec<(u64, mpsc::UnboundedSender<Outgoing>)> = (0..total)
        .filter_map(|k| Some((k, senders.get(&plan.user_of(k))?.clone())))
        .collect();
    let plan = plan.clone();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("presence-schedule".into())
        .spawn(move || {
            let clock = WallSleeper::new();
            for (k, tx) in mine {
                clock.sleep_until(schedule.due_ns(k));
                let state = if plan.status_of(k) == "away" {
                    "idle"
                } else {
                    "active"
                };
                let due_ns = schedule.due_ns(k);
                let _ = tx.send(Outgoing {
                    text: format!(r#"{{"type":"activity","state":"{state}"}}"#),
                    due_ns: Some(due_ns),
                });
            }
            let _ = done_tx.send(());
        })
        .expect("spawn the presence schedule thread");
    let _ = done_rx.await;
    let deadline = tokio::time::Instant::now() + DRAIN;
    while tokio::time::Instant::now() < deadline {
        let done = {
            let t = &state.borrow().totals;
            t.delivered >= t.expected
        };
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn presence_connection(
    mut conn: Conn,
    mut outgoing: mpsc::UnboundedReceiver<Outgoing>,
    state: Rc<RefCell<Watching>>,
    mut control: mpsc::UnboundedReceiver<Control>,
) {
    let mut heartbeat = tokio::time::interval(worker::PING_INTERVAL);
    heartbeat.tick().await;
    loop {
        let Outgoing { text, due_ns } = tokio::select! {
            c = control.recv() => match c {
                Some(Control::Stop) | None => return conn.close().await,
                Some(_) => continue,
            },
            frame = conn.next_text() => match frame {
                Some(Ok(text)) => {
                    state.borrow_mut().on_frame(&text);
                    continue;
                }
                Some(Err(_)) | None => {
                    state.borrow_mut().totals.closed += 1;
                    return;
                }
            },
            text = outgoing.recv() => match text {
                Some(text) => text,
                None => return conn.close().await,
            },
            _ = heartbeat.tick() => Outgoing { text: r#"{"type":"ping"}"#.to_owned(), due_ns: None },
        };
        if conn.send_text(&text).await.is_err() {
            state.borrow_mut().totals.closed += 1;
            return;
        }
        if let Some(due) = due_ns {
            let mut s = state.borrow_mut();
            if (s.window.0..s.window.1).contains(&due) {
                crate::latency::record(&mut s.sent, schedule::since(due, wall_ns()));
            }
        }
    }
}

impl ChorusRunner {
    /// `presence` against Chorus, over WebSocket.
    pub fn presence(
        &self,
        shape: &PresenceShape,
        seed_value: u64,
    ) -> anyhow::Result<PresenceOutcome> {
        ensure!(
            shape.connections > shape.watched && shape.change_share > 0.0,
            "presence needs more users than each watches, and some changes"
        );
        let dir = self.fresh_dir()?;
        let n = shape.connections;
        let pop = self.seed(dir.path(), |e| {
            seed::users_in_channels(e, n, CHANNEL_MEMBERS, &self.progress)
        })?;
        let tokens = seed::mint_tokens(&server::data_dir(dir.path()), &pop.users)?;
        let server = ChorusServer::start(&self.binary, dir.path(), &self.settings)?;
        let target = server.target(Transport::WebSocket)?;
        let plan = PresencePlan {
            users: n,
            watched: shape.watched,
            rate: shape.rate(),
            seed: seed_value,
        };
        let user_ids: Vec<String> = pop.users.iter().map(|u| u.to_string()).collect();
        let pid = server.pid();
        let outcome = Self::runtime()?.block_on(async {
            self.progress
                .set_message(format!("presence: connecting {n}"));
            let (mut workers, open, _) = self
                .spawn_workers(n, Transport::WebSocket, 1, |w, range| {
                    worker::Job::Presence(PresenceJob {
                        target: target.clone(),
                        source: worker::source_address(w),
                        connections: range.map(|i| (i, tokens[i].clone())).collect(),
                        user_ids: user_ids.clone(),
                        plan: plan.clone(),
                        warmup_ns: nanos(shape.warmup),
                        duration_ns: nanos(shape.duration),
                    })
                })
                .await?;
            ensure!(open == n, "only {open} of {n} presence connections opened");
            tokio::time::sleep(self.rss_settle).await;
            let rss_connected = procstat::rss_bytes(pid).context("server RSS")?;
            self.progress.set_message(format!(
                "presence: {n} connections subscribing to {} users each",
                shape.watched
            ));
            for w in &mut workers {
                w.command(&Command::Subscribe).await?;
            }
            let (mut acked, mut subscriptions, mut subscribe_secs) = (0, 0, 0f64);
            for w in &mut workers {
                match w.report().await? {
                    Report::Subscribed {
                        acked: a,
                        subscriptions: s,
                        secs,
                    } => {
                        (acked, subscriptions) = (acked + a, subscriptions + s);
                        subscribe_secs = subscribe_secs.max(secs);
                    }
                    other => bail!("expected subscriptions, got {other:?}"),
                }
            }
            ensure!(acked == n, "only {acked} of {n} presence:sub were acked");
            // The answers to the subscriptions (11 KiB each at the standard size) are
            // freed once written; the server gives such a burst back to the kernel at the
            // first housekeeping round that finds its resident size settled (the second
            // after the burst at the latest), and what it holds after that is what it
            // keeps.
            let settle = if self.rss_settle >= super::chorus::RSS_SETTLE {
                self.rss_settle + 2 * chorus_gateway::memory::HOUSEKEEPING_INTERVAL
            } else {
                self.rss_settle
            };
            tokio::time::sleep(settle).await;
            let rss_subscribed = procstat::rss_bytes(pid).context("server RSS")?;
            let start_ns = wall_ns() + 200_000_000;
            for w in &mut workers {
                w.command(&Command::Start { start_ns }).await?;
            }
            self.progress
                .set_message(format!("presence: {:.0} changes/s", plan.rate));
            let window_start = start_ns + nanos(shape.warmup);
            sleep_until_wall(window_start).await;
            let usage = UsageWindow::start(pid);
            let generator: Vec<UsageWindow> = workers
                .iter()
                .filter_map(|w| w.pid())
                .map(UsageWindow::start)
                .collect();
            sleep_until_wall(window_start + nanos(shape.duration)).await;
            let server_usage = usage.finish();
            let generator_cpu_secs = generator.iter().map(|w| w.finish().cpu_secs).sum();
            self.progress.set_message("presence: draining");
            let mut outcome = PresenceOutcome {
                frame: crate::latency::histogram_us(),
                sent: crate::latency::histogram_us(),
                changes: 0,
                expected: 0,
                delivered: 0,
                unexpected: 0,
                closed: 0,
                subscriptions,
                subscribe_secs,
                rss_connected,
                rss_subscribed,
                server: server_usage,
                generator_cpu_secs,
                flush_ms: chorus_gateway::config::PRESENCE_FLUSH_MS_DEFAULT,
            };
            for mut w in workers {
                match w.report().await? {
                    Report::PresenceDone(t) => {
                        worker::add_pairs(&mut outcome.frame, &t.frame);
                        worker::add_pairs(&mut outcome.sent, &t.sent);
                        outcome.changes += t.changes;
                        outcome.expected += t.expected;
                        outcome.delivered += t.delivered;
                        outcome.unexpected += t.unexpected;
                        outcome.closed += t.closed;
                    }
                    other => bail!("expected presence totals, got {other:?}"),
                }
                w.stop().await?;
            }
            if outcome.unexpected + outcome.closed > 0 || outcome.delivered < outcome.expected {
                self.warn(format!(
                    "presence: {} of {} updates delivered, {} unexpected frames, {} \
                     connections closed",
                    outcome.delivered, outcome.expected, outcome.unexpected, outcome.closed
                ));
            }
            Ok(outcome)
        });
        self.stop_server(server, "presence");
        outcome
    }
}

/// The report's summary rows for a presence run: memory per subscription against 64
/// bytes, change → frame p99 against `presence_flush_ms` + 50 ms, and the CPU per change.
pub fn summary_rows(outcome: Result<&PresenceOutcome, String>) -> Vec<[String; 3]> {
    let o = match outcome {
        Ok(o) => o,
        Err(why) => {
            return vec![[
                "presence at scale".into(),
                format!("n/a ({why})"),
                "unknown".into(),
            ]]
        }
    };
    let p99 = o.frame.value_at_quantile(0.99);
    let bound_us = (o.flush_ms + 50) * 1000;
    let all = o.delivered >= o.expected && o.unexpected == 0;
    vec![
        [
            "presence: server memory per subscription ≤ 64 B".into(),
            format!(
                "{:.1} B ({} subscriptions)",
                o.bytes_per_subscription(),
                o.subscriptions
            ),
            verdict(o.bytes_per_subscription() <= 64.0),
        ],
        [
            format!(
                "presence: change → `presence` frame p99 ≤ presence_flush_ms + 50 ms ({} ms), \
                 every update delivered",
                o.flush_ms + 50
            ),
            format!(
                "{:.1} ms; {} of {} updates",
                p99 as f64 / 1000.0,
                o.delivered,
                o.expected
            ),
            verdict(p99 <= bound_us && all),
        ],
        [
            "presence: server CPU per status change delivered (reported)".into(),
            format!(
                "{:.2} µs per update, {:.0} µs per change (generator {:.1} CPU s beside the \
                 server's {:.1})",
                o.cpu_us_per_update(),
                o.cpu_us_per_change(),
                o.generator_cpu_secs,
                o.server.cpu_secs
            ),
            "reported".into(),
        ],
    ]
}

fn verdict(met: bool) -> String {
    if met { "**met**" } else { "**not met**" }.into()
}

/// The report's details section for a presence run.
pub fn details(shape: &PresenceShape, outcome: Result<&PresenceOutcome, String>) -> String {
    let mut out = format!(
        "### presence\n\n{} WebSocket connections, one user each in one workspace, each \
         watching {} others; {:.0} % of the users change status each second ({:.0} changes/s: \
         `activity` idle, then active), {:.0} s measured after {:.0} s of warm-up. Latency \
         runs from each change's due time to its `presence` frame at each subscriber.\n\n",
        shape.connections,
        shape.watched,
        shape.change_share * 100.0,
        shape.rate(),
        shape.duration.as_secs_f64(),
        shape.warmup.as_secs_f64()
    );
    let o = match outcome {
        Ok(o) => o,
        Err(why) => return out + &format!("Chorus failed: {why}\n\n"),
    };
    let q = |x: f64| o.frame.value_at_quantile(x) as f64 / 1000.0;
    out += &format!(
        "| figure | value |\n|---|---|\n\
         | change → frame p50 / p99 / max | {:.1} / {:.1} / {:.1} ms |\n\
         | change → `activity` written by the generator p50 / p99 / max | {:.1} / {:.1} / {:.1} ms |\n\
         | updates delivered / expected | {} / {} ({} unexpected, {} connections closed) |\n\
         | changes in the window | {} |\n\
         | subscriptions | {} (acked within {:.1} s) |\n\
         | server RSS connected / subscribed | {:.1} / {:.1} MiB: {:.1} B per subscription |\n\
         | server CPU in the window | {:.2} s: {:.2} µs per update, {:.0} µs per change |\n\
         | generator CPU in the window | {:.2} s |\n\n",
        q(0.5),
        q(0.99),
        o.frame.max() as f64 / 1000.0,
        o.sent.value_at_quantile(0.5) as f64 / 1000.0,
        o.sent.value_at_quantile(0.99) as f64 / 1000.0,
        o.sent.max() as f64 / 1000.0,
        o.delivered,
        o.expected,
        o.unexpected,
        o.closed,
        o.changes,
        o.subscriptions,
        o.subscribe_secs,
        o.rss_connected as f64 / 1048576.0,
        o.rss_subscribed as f64 / 1048576.0,
        o.bytes_per_subscription(),
        o.server.cpu_secs,
        o.cpu_us_per_update(),
        o.cpu_us_per_change(),
        o.generator_cpu_secs
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(users: usize) -> PresencePlan {
        PresencePlan {
            users,
            watched: 10,
            rate: 50.0,
            seed: 7,
        }
    }

    // Every user changes once per `users` changes, the first-change table inverts
    // `user_of`, and statuses alternate away, online, away.
    #[test]
    fn changes_visit_every_user_in_turn() {
        for users in [60, 7_919, 19_000] {
            let p = plan(users);
            let first = p.first_changes();
            let mut seen = vec![false; users];
            for k in 0..users as u64 {
                let u = p.user_of(k);
                assert!(!seen[u], "user {u} twice in one round");
                seen[u] = true;
                assert_eq!(first[u], k);
                assert_eq!(p.user_of(k + users as u64), u);
            }
            assert_eq!(p.status_of(first[3]), "away");
            assert_eq!(p.status_of(first[3] + users as u64), "online");
            assert_eq!(p.status_of(first[3] + 2 * users as u64), "away");
        }
    }

    // Watch lists are distinct, never the watcher itself, and the same in every process.
    #[test]
    fn watch_lists_are_distinct_and_stable() {
        let p = plan(100);
        for c in 0..100 {
            let w = p.watched_by(c);
            assert_eq!(w.len(), 10);
            assert!(!w.contains(&c));
            assert_eq!(w, p.watched_by(c));
        }
        assert_ne!(p.watched_by(1), p.watched_by(2));
    }

    // A frame is matched to the latest change of its status that fell due before it; one
    // that matches nothing is counted as unexpected.
    #[test]
    fn updates_find_their_change() {
        let p = plan(4);
        let schedule = Schedule {
            start_ns: 1_000_000_000,
            rate: 50.0,
        };
        let first = p.first_changes();
        let mut w = Watching {
            plan: p.clone(),
            index: (0..4).map(|i| (format!("U{i}"), i)).collect(),
            first: first.clone(),
            schedule: Some(schedule),
            window: (0, u64::MAX),
            frame: crate::latency::histogram_us(),
            sent: crate::latency::histogram_us(),
            totals: PresenceTotals::default(),
            acked: 0,
            subscribed: 0,
        };
        let due = schedule.due_ns(first[2]);
        w.on_update("U2", "away", due + 3_000_000);
        assert_eq!(w.totals.delivered, 1);
        assert_eq!(w.frame.max() / 1000, 3);
        // `online` before the user's second change is due matches nothing.
        w.on_update("U2", "online", due + 4_000_000);
        assert_eq!(w.totals.unexpected, 1);
        // After the second change (`online`), an `away` frame still finds the first.
        let second = schedule.due_ns(first[2] + 4);
        w.on_update("U2", "online", second + 1_000_000);
        w.on_update("U2", "away", second + 2_000_000);
        assert_eq!(w.totals.delivered, 3);
        w.on_update("nobody", "away", second);
        assert_eq!(w.totals.unexpected, 2);
    }
}
