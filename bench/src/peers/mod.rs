//! The peers: the systems Chorus replaces, run by the harness on this machine with the same
//! scenario shapes as Chorus, so one report row can compare them.
//!
//! Each scenario function starts its own peer server (on a free loopback port, with its data
//! in a fresh directory under the caller's `work_dir`), runs the scenario against it, stops
//! it and returns what it measured, in the vocabulary of [`crate::load`]. This module owns
//! what the peers share: the server process and its readiness, the open-loop `chat` driver
//! ([`run_chat`]), the delivery recorders, and the `fanout` round tracker.
//!
//! API boundary: the scenario functions are synchronous and build their own small tokio
//! runtime; nothing of tokio leaks to the caller.

pub mod nats;
pub mod postgres;
pub mod redis;

use crate::latency::{histogram_us, record};
use crate::load::procstat::UsageWindow;
use crate::load::schedule::{chat_text, parse_chat_text, since, wall_ns, Schedule};
use crate::load::{ChatOutcome, ChatShape, FanoutOutcome, ServerUsage};
use anyhow::{bail, ensure, Context};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::StreamExt;
use hdrhistogram::Histogram;
use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a peer server may take to accept connections after it is started.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a peer server may take to exit after its stop signal before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long after the last scheduled send a `chat` run waits for missing acks and
/// deliveries before counting them as lost (the same as the Chorus driver's).
pub const CHAT_DRAIN: Duration = Duration::from_secs(10);
/// How long a `fanout` round waits for its last online delivery before counting the
/// missing ones and moving on (the same as the Chorus driver's).
pub const FANOUT_ROUND_DEADLINE: Duration = Duration::from_secs(30);
/// How long a server is left idle before each RSS reading of a `connections` run, so that
/// buffers freed on a timer are freed (the same as the Chorus driver's).
pub const RSS_SETTLE: Duration = Duration::from_secs(2);
/// Bytes of text in each `fanout` message (the shape has no size; this is a short chat
/// line).
pub const FANOUT_BODY_BYTES: usize = 64;
/// Delay between planning a `chat` run and its first due time, so that the first messages
/// are not already late when the schedule starts.
const CHAT_LEAD: Duration = Duration::from_millis(200);
/// Connections opened at once while a scenario sets up its subscribers.
pub(crate) const CONNECT_PARALLEL: usize = 128;
/// File descriptors this process keeps free for itself (runtime, logs, `/proc` reads)
/// beyond the connections a scenario opens.
const FDS_RESERVED: u64 = 64;
/// Histogram shards per recorder: subscriber tasks on different worker threads rarely
/// share a lock.
const RECORDER_SHARDS: usize = 16;

/// A tokio runtime for one scenario: two workers, the machine's core count, which the peer
/// server shares with the load generator.
pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("building the tokio runtime")
}

/// A free TCP port on 127.0.0.1, found by binding port 0 and letting it go. Another
/// process could take it in between; the server's start then fails and says so.
pub(crate) fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a probe port")?;
    Ok(listener.local_addr()?.port())
}

/// The inodes of the TCP sockets (IPv4 and IPv6) listening on `port`, from
/// `/proc/net/tcp{,6}`: a line's second field is `address:PORT` in hex, its fourth the
/// state (`0A` is `LISTEN`), its tenth the inode.
fn listening_inodes(port: u16) -> Vec<u64> {
    let suffix = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .flat_map(|text| {
            text.lines()
                .skip(1)
                .filter_map(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    let listening = fields.get(3) == Some(&"0A");
                    let on_port = fields.get(1).is_some_and(|a| a.ends_with(&suffix));
                    (listening && on_port).then(|| fields.get(9)?.parse().ok())?
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The loopback address of `port`.
pub(crate) fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Finds executable `name` on `PATH`, then in the system `sbin` directories (not on a
/// normal user's `PATH`, but where Debian puts `nats-server`), then in `extra` directories.
pub(crate) fn find_binary(name: &str, extra: &[PathBuf]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let system = [
        "/usr/local/sbin",
        "/usr/sbin",
        "/sbin",
        "/usr/local/bin",
        "/usr/bin",
    ];
    std::env::split_paths(&path)
        .chain(system.iter().map(PathBuf::from))
        .chain(extra.iter().cloned())
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A fresh directory `work_dir/<stem>-<n>` for one run, so that two runs sharing a
/// `work_dir` never see each other's data.
pub(crate) fn fresh_dir(work_dir: &Path, stem: &str) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(work_dir)
        .with_context(|| format!("creating work dir {}", work_dir.display()))?;
    for n in 0..10_000 {
        let dir = work_dir.join(format!("{stem}-{n}"));
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
        }
    }
    bail!("no free run directory under {}", work_dir.display())
}

/// This process's limit on open files.
pub(crate) fn fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct we pass it.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    if rc == 0 {
        limit.rlim_cur
    } else {
        1024
    }
}

/// Fails unless `connections` more sockets fit under this process's file limit.
pub(crate) fn check_fd_budget(connections: usize) -> anyhow::Result<()> {
    let limit = fd_limit();
    ensure!(
        connections as u64 + FDS_RESERVED <= limit,
        "{connections} connections do not fit under this process's open-file limit of {limit} \
         ({FDS_RESERVED} kept for the process itself)"
    );
    Ok(())
}

/// A peer server process the harness started. It is stopped by [`PeerProcess::stop`], or
/// killed when dropped (a failed run must not leave servers behind).
pub(crate) struct PeerProcess {
    name: &'static str,
    child: Option<Child>,
    log: PathBuf,
    stop_signal: libc::c_int,
}

impl PeerProcess {
    /// Starts `command` with its output in `log`. `stop_signal` is the signal that asks it
    /// to shut down cleanly.
    pub(crate) fn spawn(
        name: &'static str,
        mut command: Command,
        log: PathBuf,
        stop_signal: libc::c_int,
    ) -> anyhow::Result<PeerProcess> {
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {name}: {command:?}"))?;
        Ok(PeerProcess {
            name,
            child: Some(child),
            log,
            stop_signal,
        })
    }

    /// The server's process id, for `/proc` readings.
    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Waits until the server accepts TCP connections on `addr`, failing early if it
    /// exits, with the end of its log in the error.
    pub(crate) fn wait_listening(&mut self, addr: SocketAddr) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "{} exited during start ({status}): {}",
                    self.name,
                    self.log_tail()
                );
            }
            if self.listens_on(addr.port()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not listen on {addr} within {START_TIMEOUT:?}",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the server process itself holds a socket listening on TCP `port`. A
    /// connection that succeeds is not proof: the port was free when the harness chose
    /// it, and until the server binds it another process may listen there (tests run in
    /// parallel, each choosing free ports), which once let a harness take a server as
    /// ready that refused the next connection.
    fn listens_on(&self, port: u16) -> bool {
        let Some(child) = self.child.as_ref() else {
            return false;
        };
        let listening = listening_inodes(port);
        if listening.is_empty() {
            return false;
        }
        let Ok(fds) = std::fs::read_dir(format!("/proc/{}/fd", child.id())) else {
            return false;
        };
        fds.flatten().any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|target| {
                let target = target.to_string_lossy();
                target
                    .strip_prefix("socket:[")
                    .and_then(|rest| rest.strip_suffix(']'))
                    .and_then(|inode| inode.parse::<u64>().ok())
                    .is_some_and(|inode| listening.contains(&inode))
            })
        })
    }

    /// The last lines of the server's log, for error messages.
    pub(crate) fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(12)..].join("\n");
        format!("(log {}):\n{tail}", self.log.display())
    }

    /// Asks the server to stop and waits for it, killing it after [`STOP_TIMEOUT`].
    pub(crate) fn stop(mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = libc::pid_t::try_from(child.id()).context("pid out of range")?;
        // SAFETY: kill has no memory effects; pid is our own child, not yet reaped.
        unsafe { libc::kill(pid, self.stop_signal) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.kill()?;
        child.wait()?;
        bail!(
            "{} did not stop within {STOP_TIMEOUT:?} and was killed",
            self.name
        )
    }
}

impl Drop for PeerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Latencies recorded by many tasks at once: a few histograms behind their own locks, so
/// tasks on different threads rarely wait for each other, merged at the end.
pub(crate) struct Recorder {
    shards: Vec<Mutex<Histogram<u64>>>,
    count: AtomicU64,
}

impl Recorder {
    pub(crate) fn new() -> Recorder {
        Recorder {
            shards: (0..RECORDER_SHARDS)
                .map(|_| Mutex::new(histogram_us()))
                .collect(),
            count: AtomicU64::new(0),
        }
    }

    /// Records one latency in shard `shard` (any number; it wraps).
    pub(crate) fn record(&self, shard: usize, latency: Duration) {
        let mut histogram = self.shards[shard % RECORDER_SHARDS]
            .lock()
            .expect("a recorder lock is never held across a panic");
        record(&mut histogram, latency);
        drop(histogram);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Latencies recorded so far.
    pub(crate) fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// All shards merged into one histogram.
    pub(crate) fn merged(&self) -> Histogram<u64> {
        let mut all = histogram_us();
        for shard in &self.shards {
            let shard = shard
                .lock()
                .expect("a recorder lock is never held across a panic");
            all.add(&*shard)
                .expect("histograms of one shape always add");
        }
        all
    }
}

/// The layout of a `chat` run, shared by every peer: who is in which channel, which
/// message goes where and when, and which messages are measured.
#[derive(Clone, Debug)]
pub(crate) struct ChatPlan {
    /// The shape the plan was made from.
    pub shape: ChatShape,
    /// Number of channels: `connections` split into groups of `members`.
    pub channels: usize,
    /// The send schedule; message `i` is due at `schedule.due_ns(i)`.
    pub schedule: Schedule,
    /// Index of the first measured message (the ones before it are the warm-up).
    pub first_measured: u64,
    /// Messages in the run, warm-up included.
    pub total: u64,
}

impl ChatPlan {
    /// Plans a run of `shape`. Its schedule starts when [`ChatPlan::started`] says.
    pub(crate) fn new(shape: &ChatShape) -> anyhow::Result<ChatPlan> {
        ensure!(shape.connections > 0, "chat needs at least one connection");
        ensure!(
            shape.members > 0,
            "chat needs at least one member per channel"
        );
        ensure!(
            shape.rate.is_finite() && shape.rate > 0.0,
            "chat needs a positive rate"
        );
        let schedule = Schedule {
            start_ns: 0,
            rate: shape.rate,
        };
        let first_measured = schedule.count_in(shape.warmup);
        let total = schedule.count_in(shape.warmup + shape.duration);
        Ok(ChatPlan {
            shape: shape.clone(),
            channels: shape.connections.div_ceil(shape.members),
            schedule,
            first_measured,
            total,
        })
    }

    /// The same plan with its first message due [`CHAT_LEAD`] from now.
    pub(crate) fn started(&self) -> ChatPlan {
        let mut plan = self.clone();
        plan.schedule.start_ns = wall_ns() + CHAT_LEAD.as_nanos() as u64;
        plan
    }

    /// The channel connection `connection` belongs to.
    pub(crate) fn channel_of(&self, connection: usize) -> usize {
        connection / self.shape.members
    }

    /// Members of channel `channel` (the last one may be smaller).
    pub(crate) fn channel_size(&self, channel: usize) -> usize {
        let first = channel * self.shape.members;
        (first + self.shape.members).min(self.shape.connections) - first
    }

    /// The channel of message `i`: channels take turns.
    pub(crate) fn channel_of_message(&self, i: u64) -> usize {
        (i % self.channels as u64) as usize
    }

    /// The sender of message `i`: within its channel, the members take turns.
    pub(crate) fn sender_of_message(&self, i: u64) -> usize {
        let channel = self.channel_of_message(i);
        let turn = (i / self.channels as u64) as usize;
        channel * self.shape.members + turn % self.channel_size(channel)
    }

    /// Messages in the measured window.
    pub(crate) fn sent(&self) -> u64 {
        self.total - self.first_measured
    }

    /// Deliveries the measured messages should cause: every member of the message's
    /// channel, the sender's own connection included (Chorus delivers a message to every
    /// subscribed member, its sender too).
    pub(crate) fn expected_deliveries(&self) -> u64 {
        (self.first_measured..self.total)
            .map(|i| self.channel_size(self.channel_of_message(i)) as u64)
            .sum()
    }

    /// The measured window `[start, end)` of due times, in wall-clock nanoseconds.
    pub(crate) fn window(&self) -> (u64, u64) {
        (
            self.schedule.due_ns(self.first_measured),
            self.window_end_ns(),
        )
    }

    /// The end of the measured window, in wall-clock nanoseconds.
    fn window_end_ns(&self) -> u64 {
        self.schedule.start_ns + (self.shape.warmup + self.shape.duration).as_nanos() as u64
    }
}

/// What the subscribers of a `chat` run record: one latency per delivery of a measured
/// message, from its due time to its arrival. Nothing is measured until [`run_chat`] opens
/// the window, so that deliveries of set-up probes cannot count.
pub(crate) struct ChatDeliveries {
    window_start_ns: AtomicU64,
    window_end_ns: AtomicU64,
    latencies: Recorder,
}

impl ChatDeliveries {
    pub(crate) fn new() -> Arc<ChatDeliveries> {
        Arc::new(ChatDeliveries {
            window_start_ns: AtomicU64::new(u64::MAX),
            window_end_ns: AtomicU64::new(0),
            latencies: Recorder::new(),
        })
    }

    fn open_window(&self, plan: &ChatPlan) {
        let (start, end) = plan.window();
        self.window_end_ns.store(end, Ordering::SeqCst);
        self.window_start_ns.store(start, Ordering::SeqCst);
    }

    /// Handles the payload of one delivery to subscriber `subscriber`. Warm-up messages
    /// and payloads that are not chat texts are ignored.
    pub(crate) fn on_payload(&self, subscriber: usize, payload: &[u8]) {
        let now_ns = wall_ns();
        let Some((due_ns, _sender)) = parse_payload(payload) else {
            return;
        };
        let start = self.window_start_ns.load(Ordering::Relaxed);
        if (start..self.window_end_ns.load(Ordering::Relaxed)).contains(&due_ns) {
            self.latencies.record(subscriber, since(due_ns, now_ns));
        }
    }
}

/// The due time and the second number (sender or round) at the head of a payload made by
/// [`chat_text`]. Only the head is decoded: the padding is never looked at.
pub(crate) fn parse_payload(payload: &[u8]) -> Option<(u64, usize)> {
    let head = &payload[..payload.len().min(48)];
    let end = head.iter().rposition(|&b| b == b' ')?;
    parse_chat_text(std::str::from_utf8(&head[..end]).ok()?)
}

/// Publishes one payload to a channel and resolves when the peer acknowledged it.
pub(crate) type Publish =
    Arc<dyn Fn(usize, Bytes) -> BoxFuture<'static, anyhow::Result<()>> + Send + Sync>;

/// Runs the open-loop schedule of `plan`, starting now, against a peer whose subscribers
/// already record into `deliveries`, and returns the outcome.
///
/// A dedicated thread keeps the schedule: it sleeps until each message is due (a thread
/// sleep is accurate to tens of microseconds, a tokio timer only to a millisecond) and
/// hands the send to the runtime as a task of its own, so a slow ack never delays a later
/// send. Acks and deliveries are timed from the due time.
pub(crate) async fn run_chat(
    plan: &ChatPlan,
    deliveries: &Arc<ChatDeliveries>,
    publish: Publish,
    server_pid: u32,
) -> anyhow::Result<ChatOutcome> {
    let plan = &plan.started();
    deliveries.open_window(plan);
    let acks = Arc::new(Recorder::new());
    let failures = Arc::new(AtomicU64::new(0));
    let first_failure: Arc<Mutex<Option<String>>> = Arc::default();
    let handle = tokio::runtime::Handle::current();
    let sender = {
        let (plan, acks) = (plan.clone(), acks.clone());
        let (failures, first_failure) = (failures.clone(), first_failure.clone());
        std::thread::Builder::new()
            .name("peer-schedule".into())
            .spawn(move || {
                keep_schedule(
                    &plan,
                    &handle,
                    &publish,
                    &acks,
                    &failures,
                    &first_failure,
                    server_pid,
                )
            })?
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = tx.send(sender.join());
    });
    let (server, generator_cpu_secs, elapsed) = rx
        .await
        .context("schedule thread vanished")?
        .map_err(|_| anyhow::anyhow!("schedule thread panicked"))?;

    // Drain: wait for the measured acks and deliveries still in flight, up to a deadline.
    let expected = plan.expected_deliveries();
    let deadline = Instant::now() + CHAT_DRAIN;
    while Instant::now() < deadline
        && (deliveries.latencies.count() < expected
            || acks.count() + failures.load(Ordering::Relaxed) < plan.sent())
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let outcome = ChatOutcome {
        ack: acks.merged(),
        delivery: deliveries.latencies.merged(),
        sent: plan.sent(),
        expected_deliveries: expected,
        delivered: deliveries.latencies.count(),
        elapsed,
        server,
        generator_cpu_secs,
    };
    if outcome.sent > 0 && outcome.ack.is_empty() {
        let why = first_failure
            .lock()
            .expect("no panics under this lock")
            .clone();
        bail!(
            "no measured message was acknowledged: {}",
            why.unwrap_or_else(|| "no ack before the drain deadline".into())
        );
    }
    Ok(outcome)
}

/// The schedule thread of [`run_chat`]: sends every message at its due time and samples the
/// server's usage over the measured window.
fn keep_schedule(
    plan: &ChatPlan,
    handle: &tokio::runtime::Handle,
    publish: &Publish,
    acks: &Arc<Recorder>,
    failures: &Arc<AtomicU64>,
    first_failure: &Arc<Mutex<Option<String>>>,
    server_pid: u32,
) -> (ServerUsage, f64, Duration) {
    let mut window = None;
    for i in 0..plan.total {
        let due_ns = plan.schedule.due_ns(i);
        sleep_until_wall(due_ns);
        if i == plan.first_measured {
            window = Some((
                UsageWindow::start(server_pid),
                UsageWindow::start(std::process::id()),
                Instant::now(),
            ));
        }
        let measured = i >= plan.first_measured;
        let text = chat_text(due_ns, plan.sender_of_message(i), plan.shape.body_bytes);
        let send = publish(plan.channel_of_message(i), Bytes::from(text));
        let (acks, failures, first_failure) =
            (acks.clone(), failures.clone(), first_failure.clone());
        handle.spawn(async move {
            match send.await {
                Ok(()) if measured => acks.record(i as usize, since(due_ns, wall_ns())),
                Ok(()) => {}
                Err(e) => {
                    failures.fetch_add(1, Ordering::Relaxed);
                    first_failure
                        .lock()
                        .expect("no panics under this lock")
                        .get_or_insert_with(|| format!("{e:#}"));
                }
            }
        });
    }
    sleep_until_wall(plan.window_end_ns());
    match window {
        Some((usage, generator, started)) => (
            usage.finish(),
            generator.finish().cpu_secs,
            started.elapsed(),
        ),
        None => (ServerUsage::default(), 0.0, Duration::ZERO),
    }
}

/// Sleeps this thread until the wall clock reads `due_ns` (returns at once if it already
/// does).
fn sleep_until_wall(due_ns: u64) {
    let now = wall_ns();
    if due_ns > now {
        std::thread::sleep(Duration::from_nanos(due_ns - now));
    }
}

/// The state of the current `fanout` round, updated by every online subscriber: how many
/// have the round's message, and when the first and the last of them got it.
pub(crate) struct FanoutRounds {
    online: usize,
    round: AtomicU64,
    arrived: AtomicUsize,
    first_ns: AtomicU64,
    last_ns: AtomicU64,
    complete: tokio::sync::Notify,
}

/// What one `fanout` round saw.
pub(crate) struct RoundResult {
    /// Send → first delivery, if any arrived.
    pub first: Option<Duration>,
    /// Send → last delivery, if every online member got it.
    pub last: Option<Duration>,
    /// Online members that did not get it before the deadline.
    pub missing: u64,
}

impl FanoutRounds {
    pub(crate) fn new(online: usize) -> Arc<FanoutRounds> {
        Arc::new(FanoutRounds {
            online,
            round: AtomicU64::new(u64::MAX),
            arrived: AtomicUsize::new(0),
            first_ns: AtomicU64::new(u64::MAX),
            last_ns: AtomicU64::new(0),
            complete: tokio::sync::Notify::new(),
        })
    }

    /// Opens round `round`; call before its message is sent.
    pub(crate) fn open(&self, round: u64) {
        self.arrived.store(0, Ordering::SeqCst);
        self.first_ns.store(u64::MAX, Ordering::SeqCst);
        self.last_ns.store(0, Ordering::SeqCst);
        self.round.store(round, Ordering::SeqCst);
    }

    /// Handles one delivery's payload (made by [`chat_text`] with the round as its second
    /// number); deliveries of any round but the open one are ignored.
    pub(crate) fn on_payload(&self, payload: &[u8]) {
        let now_ns = wall_ns();
        let Some((_, round)) = parse_payload(payload) else {
            return;
        };
        if round as u64 != self.round.load(Ordering::SeqCst) {
            return;
        }
        self.first_ns.fetch_min(now_ns, Ordering::SeqCst);
        self.last_ns.fetch_max(now_ns, Ordering::SeqCst);
        if self.arrived.fetch_add(1, Ordering::SeqCst) + 1 == self.online {
            self.complete.notify_one();
        }
    }

    /// Waits until every online member has the open round's message, or `patience`
    /// passes, and reports the round's times from `sent_ns`.
    pub(crate) async fn finish(&self, sent_ns: u64, patience: Duration) -> RoundResult {
        let deadline = tokio::time::Instant::now() + patience;
        while self.arrived.load(Ordering::SeqCst) < self.online {
            // A wake-up left over from an earlier round only costs one more check.
            let wait = tokio::time::timeout_at(deadline, self.complete.notified());
            if wait.await.is_err() {
                break;
            }
        }
        self.round.store(u64::MAX, Ordering::SeqCst);
        let arrived = self.arrived.load(Ordering::SeqCst).min(self.online);
        let first_ns = self.first_ns.load(Ordering::SeqCst);
        RoundResult {
            first: (arrived > 0).then(|| since(sent_ns, first_ns)),
            last: (arrived == self.online)
                .then(|| since(sent_ns, self.last_ns.load(Ordering::SeqCst))),
            missing: (self.online - arrived) as u64,
        }
    }
}

/// The `fanout` results so far: one first and one last latency per complete round.
pub(crate) struct FanoutTally {
    first: Histogram<u64>,
    last: Histogram<u64>,
    missing: u64,
}

impl FanoutTally {
    pub(crate) fn new() -> FanoutTally {
        FanoutTally {
            first: histogram_us(),
            last: histogram_us(),
            missing: 0,
        }
    }

    pub(crate) fn add(&mut self, round: &RoundResult) {
        if let Some(first) = round.first {
            record(&mut self.first, first);
        }
        if let Some(last) = round.last {
            record(&mut self.last, last);
        }
        self.missing += round.missing;
    }

    pub(crate) fn outcome(self, server: ServerUsage) -> FanoutOutcome {
        FanoutOutcome {
            first: self.first,
            last: self.last,
            missing: self.missing,
            server,
        }
    }
}

/// Runs the futures, [`CONNECT_PARALLEL`] at a time, failing on the first error.
pub(crate) async fn run_all<F>(futures: impl Iterator<Item = F>) -> anyhow::Result<()>
where
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut results = futures::stream::iter(futures).buffer_unordered(CONNECT_PARALLEL);
    while let Some(result) = results.next().await {
        result?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listener of another process on the port is not the server listening; the
    /// server's own is.
    #[test]
    fn only_the_servers_own_listener_counts() {
        let foreign = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = foreign.local_addr().unwrap().port();
        let dir = std::env::temp_dir().join(format!("chorus-listens-on-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut command = Command::new("python3");
        command.args([
            "-c",
            "import socket,sys,time\n\
             s=socket.socket(); s.bind(('127.0.0.1',0)); s.listen()\n\
             print(s.getsockname()[1], flush=True); time.sleep(30)",
        ]);
        let log = dir.join("server.log");
        let server = PeerProcess::spawn("python3", command, log.clone(), libc::SIGTERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let own = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Ok(port) = text.trim().parse::<u16>() {
                break port;
            }
            assert!(Instant::now() < deadline, "the server never said its port");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(
            !server.listens_on(port),
            "another process's listener counted"
        );
        assert!(
            server.listens_on(own),
            "the server's own listener was not found"
        );
        drop(foreign);
        server.stop().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn shape(connections: usize, members: usize) -> ChatShape {
        ChatShape {
            connections,
            members,
            rate: 10.0,
            duration: Duration::from_secs(2),
            warmup: Duration::from_secs(1),
            body_bytes: 32,
        }
    }

    // Connections split into channels of `members`, the last one smaller; messages visit
    // the channels in turn and each channel's members send in turn.
    #[test]
    fn chat_plan_layout() {
        let plan = ChatPlan::new(&shape(10, 4)).unwrap();
        assert_eq!(plan.channels, 3);
        assert_eq!(
            (0..3).map(|c| plan.channel_size(c)).collect::<Vec<_>>(),
            [4, 4, 2]
        );
        assert_eq!(plan.channel_of(9), 2);
        let senders: Vec<usize> = (0..9).map(|i| plan.sender_of_message(i)).collect();
        assert_eq!(senders, [0, 4, 8, 1, 5, 9, 2, 6, 8]);
        // 10 warm-up messages, 20 measured, each reaching its whole channel.
        assert_eq!((plan.first_measured, plan.total, plan.sent()), (10, 30, 20));
        // Measured messages 10..30 visit channels 1, 2, 0, 1, 2, 0, …: channel 0 (4
        // members) gets 6 of them, channel 1 (4 members) 7, channel 2 (2 members) 7.
        assert_eq!(plan.expected_deliveries(), 6 * 4 + 7 * 4 + 7 * 2);
    }

    // Only messages due inside the measured window count.
    #[test]
    fn chat_plan_window() {
        let plan = ChatPlan::new(&shape(4, 4)).unwrap().started();
        let measured = |i| (plan.window().0..plan.window().1).contains(&plan.schedule.due_ns(i));
        assert!(!measured(9));
        assert!(measured(10));
        assert!(measured(29));
        assert!(!measured(30));
    }

    // A payload's head decodes however long its padding, and junk decodes to nothing.
    #[test]
    fn payload_head_decodes() {
        let long = chat_text(1_700_000_000_000_000_000, 7, 4096);
        assert_eq!(
            parse_payload(long.as_bytes()),
            Some((1_700_000_000_000_000_000, 7))
        );
        assert_eq!(parse_payload(chat_text(3, 2, 0).as_bytes()), Some((3, 2)));
        assert_eq!(parse_payload(b"subscribe"), None);
        assert_eq!(parse_payload(b""), None);
    }

    // A fan-out round reports first and last arrival only for its own message, and counts
    // the members that never got it.
    #[tokio::test]
    async fn fanout_round_accounting() {
        let rounds = FanoutRounds::new(3);
        rounds.open(5);
        let sent_ns = wall_ns();
        let text = chat_text(sent_ns, 5, 0);
        rounds.on_payload(chat_text(sent_ns, 4, 0).as_bytes());
        rounds.on_payload(text.as_bytes());
        rounds.on_payload(text.as_bytes());
        rounds.on_payload(text.as_bytes());
        let result = rounds.finish(sent_ns, FANOUT_ROUND_DEADLINE).await;
        assert_eq!(result.missing, 0);
        assert!(result.first.unwrap() <= result.last.unwrap());

        rounds.open(6);
        rounds.on_payload(chat_text(sent_ns, 6, 0).as_bytes());
        let result = rounds.finish(sent_ns, Duration::from_millis(10)).await;
        assert_eq!((result.missing, result.last), (2, None));
        assert!(result.first.is_some());
    }
}
