//! Worker processes: the connections of a run, spread over several processes so that no
//! process holds more open files than the machine allows (20,000 here), each process with
//! its own loopback source address so that no address runs out of ports. QUIC sessions
//! hold no file each (a worker's all share one UDP socket), so they are bounded by the
//! worker's memory and CPU instead ([`QUIC_SESSIONS_PER_WORKER_MAX`]).
//!
//! A worker is the `chorus-bench worker` subcommand. It reads one [`Job`] as a JSON line
//! on standard input, opens its connections, reports [`Report::Ready`], and then follows
//! [`Command`] lines from its parent while printing [`Report`] lines on standard output.
//! Each worker runs one current-thread tokio runtime: the generator shares two cores with
//! the server, so it must not spend CPU on thread hand-offs.

use super::client::{self, Conn, Dialer, Frame, Target, Transport};
use super::schedule::{self, Schedule};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::io::Write;
use std::net::IpAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

/// Connections one worker holds at most: below the per-process file limit (20,000) with
/// room for the process's own files, and below the ports one source address has
/// (32768–60999) even with earlier runs' sockets still in TIME_WAIT.
pub const CONNECTIONS_PER_WORKER_MAX: usize = 9_500;
/// QUIC sessions one worker holds at most. They need no file or port each; the bound is
/// the worker's one core: it spreads 50,000 sessions over two workers, so that opening
/// them (a TLS handshake each) uses both cores.
pub const QUIC_SESSIONS_PER_WORKER_MAX: usize = 25_000;
/// Connection handshakes a worker keeps in flight.
const CONNECT_IN_FLIGHT: usize = 64;
/// Tries to open one session before it counts as failed. A real client reconnects; a
/// storm of tens of thousands of handshakes on two shared cores loses a few (a QUIC
/// session's `auth` can miss the server's deadline when its packets are dropped). Every
/// retry is reported.
const CONNECT_ATTEMPTS_MAX: usize = 3;
/// How often an idle connection pings, well inside the server's two heartbeats (60 s).
pub(super) const PING_INTERVAL: Duration = Duration::from_secs(20);
/// Sessions told at once to ping or to close before the worker pauses: each then sends a
/// packet to the same server socket, and tens of thousands at once overflow its receive
/// buffer (208 KiB here); a QUIC session then waits out retransmission timeouts that back
/// off to many seconds, which would measure the burst rather than the server. 64 every
/// 5 ms is 12,800 a second per worker: at 32,000 (every 2 ms), two workers' pings to 50,000
/// sessions lost a few percent of their answers for over 40 s.
pub(super) const CONTROL_BATCH: usize = 64;
/// The pause between batches.
pub(super) const CONTROL_PAUSE: Duration = Duration::from_millis(5);

/// What a worker is asked to do.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Job {
    /// Open connections and send and receive chat messages on an open-loop schedule.
    Chat(ChatJob),
    /// Open idle connections, hold them, and report when each fan-out round arrived.
    Hold(HoldJob),
    /// Open connections, watch users' presence, and change this worker's users' status
    /// on the run's schedule ([`super::presence`]).
    Presence(super::presence::PresenceJob),
}

/// A worker's share of a `chat` run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChatJob {
    /// The server, and the transport.
    pub target: Target,
    /// This worker's source address.
    pub source: IpAddr,
    /// `(connection index, token)` of each connection this worker holds.
    pub connections: Vec<(usize, String)>,
    /// Connections in the whole run.
    pub total_connections: usize,
    /// Members per channel: connection `i` is in channel `i / members`.
    pub members: usize,
    /// Channel IDs by channel index.
    pub channel_ids: Vec<String>,
    /// Messages per second across the run.
    pub rate: f64,
    /// Nanoseconds of schedule before the measured window.
    pub warmup_ns: u64,
    /// Nanoseconds of the measured window.
    pub duration_ns: u64,
    /// How long to wait for late acks and deliveries after the last send, in nanoseconds.
    pub drain_ns: u64,
    /// Bytes of text per message.
    pub body_bytes: usize,
}

/// A worker's share of a `fanout` or `connections` run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HoldJob {
    /// The server, and the transport.
    pub target: Target,
    /// This worker's source address.
    pub source: IpAddr,
    /// One token per connection to open.
    pub tokens: Vec<String>,
}

/// What a parent tells a worker after the job.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Command {
    /// Presence: every connection sends its `presence:sub`.
    Subscribe,
    /// Chat and presence: the schedule starts at this wall-clock instant.
    Start {
        /// Wall-clock nanoseconds of message 0.
        start_ns: u64,
    },
    /// Hold: report round `round` now, complete or not.
    Flush {
        /// The round.
        round: u64,
    },
    /// Hold: every connection sends a `ping` with ref `live-{round}` (told
    /// [`CONTROL_BATCH`] at a time); their pongs are round `round`'s arrivals. A run
    /// numbers fan-out and ping rounds in one sequence.
    Ping {
        /// The round.
        round: u64,
    },
    /// Close everything and exit.
    Stop,
}

/// What a worker tells its parent.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Report {
    /// Every connection was tried.
    Ready {
        /// Connections open and authenticated.
        open: usize,
        /// Connections that failed, with the first error.
        failed: usize,
        /// Attempts that failed and were tried again (see [`CONNECT_ATTEMPTS_MAX`]).
        retried: usize,
        /// The first failed attempt, if any.
        first_error: Option<String>,
        /// Seconds from the first connect to the last `hello`.
        connect_secs: f64,
    },
    /// Chat: the schedule ran and the drain ended.
    ChatDone(ChatTotals),
    /// Presence: every `presence:sub` was acked (or the wait ended).
    Subscribed {
        /// `presence:sub` acks received.
        acked: usize,
        /// Users they added, summed over the connections.
        subscriptions: u64,
        /// Seconds from the first `presence:sub` to the last ack.
        secs: f64,
    },
    /// Presence: the schedule ran and the drain ended.
    PresenceDone(super::presence::PresenceTotals),
    /// Hold: a fan-out round's deliveries, or a ping round's pongs, on this worker.
    Round {
        /// The round.
        round: u64,
        /// Connections that received it.
        count: usize,
        /// Wall-clock nanoseconds of the first arrival (0 when none).
        first_ns: u64,
        /// Wall-clock nanoseconds of the last arrival (0 when none).
        last_ns: u64,
    },
}

/// A worker's measurements of a chat run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ChatTotals {
    /// Ack latencies, as `(µs, count)` pairs.
    pub ack: Vec<(u64, u64)>,
    /// Delivery latencies, as `(µs, count)` pairs.
    pub delivery: Vec<(u64, u64)>,
    /// Messages sent in the measured window.
    pub sent: u64,
    /// Acks received for them.
    pub acked: u64,
    /// Deliveries to this worker's connections that the window's messages should cause.
    pub expected: u64,
    /// Those that arrived.
    pub delivered: u64,
    /// `error` frames and unparsable frames received.
    pub errors: u64,
    /// Connections the server closed during the run.
    pub closed: u64,
}

/// A histogram's recorded values as `(value, count)` pairs, for a JSON line.
pub fn histogram_pairs(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

/// Adds `(value, count)` pairs into `h`.
pub fn add_pairs(h: &mut Histogram<u64>, pairs: &[(u64, u64)]) {
    for &(value, count) in pairs {
        h.saturating_record_n(value, count);
    }
}

/// Runs a worker on this process's standard input and output until told to stop.
pub fn run() -> anyhow::Result<()> {
    batch_scheduling();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut stdin = BufReader::new(tokio::io::stdin()).lines();
        let line = stdin.next_line().await?.unwrap_or_default();
        let job: Job = serde_json::from_str(&line)?;
        let local = tokio::task::LocalSet::new();
        match job {
            Job::Chat(job) => local.run_until(chat(job, stdin)).await,
            Job::Hold(job) => local.run_until(hold(job, stdin)).await,
            Job::Presence(job) => local.run_until(super::presence::work(job, stdin)).await,
        }
    })
}

/// Makes this thread, and every thread it starts, `SCHED_BATCH`: it gets its fair share of
/// CPU, but a wake-up does not preempt the thread running. The workers stand in for clients
/// on other machines; on loopback every frame a server writes wakes a worker from inside
/// the server's `sendmsg`, and a worker of the normal policy then took the CPU from the
/// server mid-write (in `presence`, 5 % of the server's CPU was that switch, and the
/// workers' CPU fell from 12.0 to 9.5 s with this). Every system measured gets the same
/// workers.
fn batch_scheduling() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler reads `param` and changes only this thread's policy.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } != 0 {
        eprintln!(
            "worker: SCHED_BATCH refused ({}); running with the normal policy",
            std::io::Error::last_os_error()
        );
    }
}

pub(super) type Stdin = tokio::io::Lines<BufReader<tokio::io::Stdin>>;

/// Prints one report line and flushes it, so the parent sees it at once.
pub(super) fn report(r: &Report) {
    let mut out = std::io::stdout().lock();
    let line = serde_json::to_string(r).expect("reports serialize");
    // A parent that is gone cannot be told anything; the next read of stdin ends the worker.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

pub(super) async fn next_command(stdin: &mut Stdin) -> anyhow::Result<Command> {
    match stdin.next_line().await? {
        Some(line) => Ok(serde_json::from_str(&line)?),
        None => Ok(Command::Stop),
    }
}

/// What a worker tells one session's task.
#[derive(Clone, Copy, Debug)]
pub(super) enum Control {
    /// Send a `ping` with ref `live-{round}`.
    Ping(u64),
    /// Close the session and end.
    Stop,
}

/// A session's task, and the channel that controls it.
pub(super) struct Running {
    control: mpsc::UnboundedSender<Control>,
    task: tokio::task::JoinHandle<()>,
}

/// Spawns `task` with its control channel; a task ends, closing its session, on
/// [`Control::Stop`] or when the channel closes.
pub(super) fn spawn_session<F, Fut>(task: F) -> Running
where
    F: FnOnce(mpsc::UnboundedReceiver<Control>) -> Fut,
    Fut: std::future::Future<Output = ()> + 'static,
{
    let (control, controlled) = mpsc::unbounded_channel();
    Running {
        control,
        task: tokio::task::spawn_local(task(controlled)),
    }
}

/// Tells every session `control`, [`CONTROL_BATCH`] at a time.
async fn tell_all(sessions: &[Running], control: Control) {
    for batch in sessions.chunks(CONTROL_BATCH) {
        for s in batch {
            let _ = s.control.send(control);
        }
        tokio::time::sleep(CONTROL_PAUSE).await;
    }
}

/// Tells every session to close, waits for their tasks (each bounded by
/// [`client::CLOSE_WAIT`]), then closes whatever the dialer still has open.
pub(super) async fn close_all(sessions: Vec<Running>, dialer: &Dialer) {
    tell_all(&sessions, Control::Stop).await;
    let tasks = sessions.into_iter().map(|s| s.task);
    let wait = client::CLOSE_WAIT + Duration::from_secs(1);
    let _ = tokio::time::timeout(wait, futures_util::future::join_all(tasks)).await;
    dialer.close().await;
}

/// Opens a session per token, [`CONNECT_IN_FLIGHT`] at a time, and hands each to
/// `on_open` with its token's index as soon as it is open (so a holder's heartbeat starts
/// at once, however long the rest take). Returns the [`Report::Ready`] to send.
pub(super) async fn connect_all(
    dialer: &Dialer,
    tokens: &[&str],
    mut on_open: impl FnMut(usize, Conn),
) -> Report {
    let started = Instant::now();
    let (mut open, mut failed) = (0, 0);
    let errors: RefCell<(usize, Option<String>)> = RefCell::default();
    let errors = &errors;
    let mut attempts = futures_util::stream::iter(tokens.iter().enumerate())
        .map(|(i, token)| async move {
            let mut attempt = 1;
            loop {
                match dialer.connect(token).await {
                    Err(e) if attempt < CONNECT_ATTEMPTS_MAX => {
                        let mut errors = errors.borrow_mut();
                        errors.0 += 1;
                        errors.1.get_or_insert_with(|| format!("{e:#}"));
                        attempt += 1;
                    }
                    result => return (i, result),
                }
            }
        })
        .buffer_unordered(CONNECT_IN_FLIGHT);
    while let Some((i, result)) = attempts.next().await {
        match result {
            Ok(conn) => {
                open += 1;
                on_open(i, conn);
            }
            Err(e) => {
                failed += 1;
                errors
                    .borrow_mut()
                    .1
                    .get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    let (retried, first_error) = errors.take();
    Report::Ready {
        open,
        failed,
        retried,
        first_error,
        connect_secs: started.elapsed().as_secs_f64(),
    }
}

// ---------------------------------------------------------------------------------------
// chat
// ---------------------------------------------------------------------------------------

/// The measured state a chat worker's connection tasks share.
struct ChatState {
    ack: Histogram<u64>,
    delivery: Histogram<u64>,
    totals: ChatTotals,
    window: (u64, u64),
}

impl ChatState {
    fn in_window(&self, due_ns: u64) -> bool {
        (self.window.0..self.window.1).contains(&due_ns)
    }

    fn on_frame(&mut self, text: &str) {
        let Ok(frame) = Frame::parse(text) else {
            self.totals.errors += 1;
            return;
        };
        let now = schedule::wall_ns();
        match frame.kind.as_ref() {
            "ack" => {
                let due = frame.reference.as_deref().and_then(|r| r.parse().ok());
                if let Some(due) = due.filter(|d| self.in_window(*d)) {
                    crate::latency::record(&mut self.ack, schedule::since(due, now));
                    self.totals.acked += 1;
                }
            }
            "event" => {
                let parsed = frame.new_message_text().and_then(schedule::parse_chat_text);
                if let Some((due, _sender)) = parsed {
                    if self.in_window(due) {
                        crate::latency::record(&mut self.delivery, schedule::since(due, now));
                        self.totals.delivered += 1;
                    }
                }
            }
            "error" => self.totals.errors += 1,
            _ => {}
        }
    }
}

async fn chat(job: ChatJob, mut stdin: Stdin) -> anyhow::Result<()> {
    let tokens: Vec<&str> = job.connections.iter().map(|(_, t)| t.as_str()).collect();
    let dialer = Dialer::new(&job.target, job.source)?;
    let mut sessions: Vec<Option<Conn>> = tokens.iter().map(|_| None).collect();
    let ready = connect_all(&dialer, &tokens, |i, conn| sessions[i] = Some(conn)).await;
    report(&ready);
    let Command::Start { start_ns } = next_command(&mut stdin).await? else {
        return Ok(());
    };
    let schedule = Schedule {
        start_ns,
        rate: job.rate,
    };
    let window = (
        start_ns + job.warmup_ns,
        start_ns + job.warmup_ns + job.duration_ns,
    );
    let total = schedule.count_in(Duration::from_nanos(job.warmup_ns + job.duration_ns));
    let state = Rc::new(RefCell::new(ChatState {
        ack: crate::latency::histogram_us(),
        delivery: crate::latency::histogram_us(),
        totals: ChatTotals::default(),
        window,
    }));
    // Connection index → this worker's sender queue, for the connections that are open.
    let mut senders: BTreeMap<usize, mpsc::UnboundedSender<String>> = BTreeMap::new();
    let mut per_channel = vec![0u64; job.channel_ids.len()];
    let mut running = Vec::new();
    for ((index, _), conn) in job.connections.iter().zip(sessions) {
        let Some(conn) = conn else { continue };
        let (tx, rx) = mpsc::unbounded_channel();
        senders.insert(*index, tx);
        per_channel[index / job.members] += 1;
        let state = state.clone();
        running.push(spawn_session(|control| {
            chat_connection(conn, rx, state, control)
        }));
    }
    // Deliveries this worker should see: each measured message reaches every one of this
    // worker's connections in its channel, its sender's own included (Chorus delivers a
    // message to every subscribed member; the peers count the same way).
    let mut expected = 0;
    for i in 0..total {
        let due = schedule.due_ns(i);
        if due >= window.0 && due < window.1 {
            expected += per_channel[channel_of_message(&job, i)];
        }
    }
    state.borrow_mut().totals.expected = expected;
    send_schedule(&job, schedule, total, &senders, &state).await;
    drop(senders);
    let deadline = tokio::time::Instant::now() + Duration::from_nanos(job.drain_ns);
    while tokio::time::Instant::now() < deadline {
        let done = {
            let t = &state.borrow().totals;
            t.delivered >= t.expected && t.acked >= t.sent
        };
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let totals = {
        let s = state.borrow();
        let mut totals = s.totals.clone();
        totals.ack = histogram_pairs(&s.ack);
        totals.delivery = histogram_pairs(&s.delivery);
        totals
    };
    report(&Report::ChatDone(totals));
    close_all(running, &dialer).await;
    Ok(())
}

/// The channel of message `i`: channels take turns.
pub fn channel_of_message(job: &ChatJob, i: u64) -> usize {
    (i % job.channel_ids.len() as u64) as usize
}

/// The sender of message `i`: within its channel, the members take turns.
pub fn sender_of_message(job: &ChatJob, i: u64) -> usize {
    let channel = channel_of_message(job, i);
    let first = channel * job.members;
    let size = (first + job.members).min(job.total_connections) - first;
    first + (i / job.channel_ids.len() as u64) as usize % size
}

/// Sends every message of the schedule that one of this worker's connections sends, each
/// when it falls due. The schedule runs on a thread of its own that sleeps until each due
/// time (tens of microseconds late at most), as the peers' senders do: tokio's timer
/// wakes up to a millisecond late, and that lateness would count against Chorus alone.
async fn send_schedule(
    job: &ChatJob,
    schedule: Schedule,
    total: u64,
    senders: &BTreeMap<usize, mpsc::UnboundedSender<String>>,
    state: &Rc<RefCell<ChatState>>,
) {
    let window = state.borrow().window;
    let job = job.clone();
    let senders = senders.clone();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("chat-schedule".into())
        .spawn(move || {
            let clock = schedule::WallSleeper::new();
            let mut sent = 0u64;
            for i in 0..total {
                let sender = sender_of_message(&job, i);
                let Some(tx) = senders.get(&sender) else {
                    continue;
                };
                let due = schedule.due_ns(i);
                clock.sleep_until(due);
                let channel = &job.channel_ids[sender / job.members];
                let text = schedule::chat_text(due, sender, job.body_bytes);
                let frame = serde_json::json!({
                    "type": "message:send", "ref": due.to_string(), "channel_id": channel,
                    "text": text, "client_msg_id": format!("{due}-{sender}"),
                });
                if tx.send(frame.to_string()).is_ok() && (window.0..window.1).contains(&due) {
                    sent += 1;
                }
            }
            drop(senders);
            let _ = done_tx.send(sent);
        })
        .expect("spawn the chat schedule thread");
    if let Ok(sent) = done_rx.await {
        state.borrow_mut().totals.sent += sent;
    }
}

async fn chat_connection(
    mut conn: Conn,
    mut outgoing: mpsc::UnboundedReceiver<String>,
    state: Rc<RefCell<ChatState>>,
    mut control: mpsc::UnboundedReceiver<Control>,
) {
    let mut sending = true;
    loop {
        tokio::select! {
            c = control.recv() => if matches!(c, Some(Control::Stop) | None) {
                return conn.close().await;
            },
            frame = conn.next_text() => match frame {
                Some(Ok(text)) => state.borrow_mut().on_frame(&text),
                Some(Err(_)) | None => {
                    state.borrow_mut().totals.closed += 1;
                    return;
                }
            },
            text = outgoing.recv(), if sending => match text {
                Some(text) => {
                    if conn.send_text(&text).await.is_err() {
                        state.borrow_mut().totals.closed += 1;
                        return;
                    }
                }
                None => sending = false,
            },
        }
    }
}

// ---------------------------------------------------------------------------------------
// hold (fanout, connections)
// ---------------------------------------------------------------------------------------

/// What a hold worker's connection tasks share: the arrivals of each round (count, first
/// and last wall-clock ns), and how many connections opened (final once the worker is
/// ready, before any round starts), so that the task completing a round reports it.
#[derive(Default)]
struct Held {
    rounds: RefCell<BTreeMap<u64, (usize, u64, u64)>>,
    open: Cell<usize>,
}

impl Held {
    /// Counts an arrival of `round` now, and reports the round once it reached everyone.
    fn arrived(&self, round: u64) {
        let now = schedule::wall_ns();
        let mut rounds = self.rounds.borrow_mut();
        let entry = rounds.entry(round).or_insert((0, now, now));
        entry.0 += 1;
        entry.2 = now;
        let complete = entry.0 == self.open.get();
        drop(rounds);
        if complete {
            report(&self.round_report(round));
        }
    }

    fn round_report(&self, round: u64) -> Report {
        let rounds = self.rounds.borrow();
        let (count, first_ns, last_ns) = rounds.get(&round).copied().unwrap_or_default();
        Report::Round {
            round,
            count,
            first_ns,
            last_ns,
        }
    }
}

/// The text of a fan-out message of round `round`.
pub fn fanout_text(round: u64) -> String {
    format!("fanout {round}")
}

fn parse_fanout_text(text: &str) -> Option<u64> {
    text.strip_prefix("fanout ")?.parse().ok()
}

/// The ref of a ping of ping round `round`.
fn live_ref(round: u64) -> String {
    format!("live-{round}")
}

fn parse_live_ref(reference: &str) -> Option<u64> {
    reference.strip_prefix("live-")?.parse().ok()
}

async fn hold(job: HoldJob, mut stdin: Stdin) -> anyhow::Result<()> {
    let tokens: Vec<&str> = job.tokens.iter().map(String::as_str).collect();
    let dialer = Dialer::new(&job.target, job.source)?;
    let held = Rc::new(Held::default());
    let count = tokens.len().max(1);
    let mut running = Vec::with_capacity(tokens.len());
    let ready = connect_all(&dialer, &tokens, |i, conn| {
        // Spread the heartbeats over the interval so they do not all arrive at once.
        let offset = PING_INTERVAL.mul_f64((i + 1) as f64 / count as f64);
        let held = held.clone();
        running.push(spawn_session(|control| {
            hold_connection(conn, offset, held, control)
        }));
    })
    .await;
    if let Report::Ready { open, .. } = ready {
        held.open.set(open);
    }
    report(&ready);
    loop {
        match next_command(&mut stdin).await? {
            Command::Flush { round } => report(&held.round_report(round)),
            Command::Ping { round } => tell_all(&running, Control::Ping(round)).await,
            Command::Stop => {
                close_all(running, &dialer).await;
                return Ok(());
            }
            other => anyhow::bail!("a hold worker does not take {other:?}"),
        }
    }
}

async fn hold_connection(
    mut conn: Conn,
    ping_offset: Duration,
    held: Rc<Held>,
    mut control: mpsc::UnboundedReceiver<Control>,
) {
    let start = tokio::time::Instant::now() + ping_offset;
    let mut heartbeat = tokio::time::interval_at(start, PING_INTERVAL);
    loop {
        let ping = tokio::select! {
            c = control.recv() => match c {
                Some(Control::Ping(round)) => {
                    serde_json::json!({"type": "ping", "ref": live_ref(round)}).to_string()
                }
                Some(Control::Stop) | None => return conn.close().await,
            },
            frame = conn.next_text() => {
                let Some(Ok(text)) = frame else { return };
                let Ok(frame) = Frame::parse(&text) else { continue };
                let fanout = frame.new_message_text().and_then(parse_fanout_text);
                let live = frame.reference.as_deref().and_then(parse_live_ref);
                if let Some(round) = fanout.or(live.filter(|_| frame.kind == "pong")) {
                    held.arrived(round);
                }
                continue;
            }
            _ = heartbeat.tick() => r#"{"type":"ping"}"#.to_owned(),
        };
        if conn.send_text(&ping).await.is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------
// the parent's side
// ---------------------------------------------------------------------------------------

/// A running worker process, seen from its parent.
pub struct WorkerHandle {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl WorkerHandle {
    /// Starts `exe worker` and hands it `job`. Call from inside a tokio runtime.
    pub async fn spawn(exe: &std::path::Path, job: &Job) -> anyhow::Result<WorkerHandle> {
        let mut child = tokio::process::Command::new(exe)
            .arg("worker")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdin = child.stdin.take().expect("stdin is piped");
        let stdout = BufReader::new(child.stdout.take().expect("stdout is piped")).lines();
        let mut handle = WorkerHandle {
            child,
            stdin,
            stdout,
        };
        handle.send_line(&serde_json::to_string(job)?).await?;
        Ok(handle)
    }

    async fn send_line(&mut self, line: &str) -> anyhow::Result<()> {
        self.stdin.write_all(line.as_bytes()).await?;
        self.stdin.write_all(b"\n").await?;
        self.stdin.flush().await?;
        Ok(())
    }

    /// The worker's process ID, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends a command.
    pub async fn command(&mut self, command: &Command) -> anyhow::Result<()> {
        self.send_line(&serde_json::to_string(command)?).await
    }

    /// The next report; an error if the worker exited.
    pub async fn report(&mut self) -> anyhow::Result<Report> {
        match self.stdout.next_line().await? {
            Some(line) => Ok(serde_json::from_str(&line)?),
            None => anyhow::bail!("a worker exited early: {:?}", self.child.wait().await?),
        }
    }

    /// Tells the worker to stop and waits for it to exit.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let _ = self.command(&Command::Stop).await;
        drop(self.stdin);
        let status = self.child.wait().await?;
        anyhow::ensure!(status.success(), "a worker failed: {status}");
        Ok(())
    }
}

/// The source address of worker `w` of a scenario: `127.0.0.2`, `127.0.0.3`, ...
pub fn source_address(w: usize) -> IpAddr {
    let n = u32::try_from(w + 2).expect("few workers");
    IpAddr::V4(std::net::Ipv4Addr::from(0x7f00_0000 + n))
}

/// How many workers `connections` sessions over `transport` need.
pub fn workers_for(connections: usize, transport: Transport) -> usize {
    let per_worker = match transport {
        Transport::WebSocket => CONNECTIONS_PER_WORKER_MAX,
        Transport::Quic => QUIC_SESSIONS_PER_WORKER_MAX,
    };
    connections.div_ceil(per_worker).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Histograms survive the trip through (value, count) pairs.
    #[test]
    fn histogram_pairs_round_trip() {
        let mut h = crate::latency::histogram_us();
        for v in [1, 5, 5, 900, 123_456] {
            h.record(v).unwrap();
        }
        let mut back = crate::latency::histogram_us();
        add_pairs(&mut back, &histogram_pairs(&h));
        assert_eq!(back.len(), 5);
        assert_eq!(back.value_at_quantile(0.5), h.value_at_quantile(0.5));
        assert_eq!(back.max(), h.max());
    }

    // Source addresses start at 127.0.0.2 and worker counts cover every connection.
    #[test]
    fn sources_and_worker_counts() {
        assert_eq!(source_address(0).to_string(), "127.0.0.2");
        assert_eq!(source_address(3).to_string(), "127.0.0.5");
        assert_eq!(workers_for(1, Transport::WebSocket), 1);
        assert_eq!(
            workers_for(CONNECTIONS_PER_WORKER_MAX, Transport::WebSocket),
            1
        );
        assert_eq!(workers_for(19_000, Transport::WebSocket), 2);
        assert_eq!(workers_for(19_000, Transport::Quic), 1);
        assert_eq!(workers_for(50_000, Transport::Quic), 2);
        assert_eq!(parse_fanout_text(&fanout_text(17)), Some(17));
        assert_eq!(parse_live_ref(&live_ref(3)), Some(3));
    }
}
