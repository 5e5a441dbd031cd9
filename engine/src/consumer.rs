//! Committed-event consumers: named readers of the committed events of each log (the
//! channel partitions and the metadata log), each from a cursor it keeps durably itself.
//!
//! **Seam.** A consumer (search indexing, notification decisions, previews, per-workspace
//! metrics) asks [`Consumer::read`] for the events after its cursor. The call answers at
//! once when there are some, and otherwise when the next commit of that log brings some:
//! consumers are woken by commits and never poll. The events come from the log, read by
//! the log's owner shard after its tick's replies and deliveries, so a consumer costs a
//! send nothing, and a slow or stopped consumer holds no memory: its events wait in the
//! log, not in a queue. The consumer stores its own state and cursor together (a file, an
//! index commit) and then calls [`Consumer::acknowledge`].
//!
//! **Architecture invariant: the retention watermark.** Each log's watermark is the lowest
//! cursor any declared consumer has acknowledged since the engine opened (0 until every
//! declared consumer has acknowledged one). No log segment at or after the watermark is ever
//! deleted ([`crate::Engine::delete_log_before`] clamps to it), so a consumer that restarts
//! from its durable cursor always finds its next event. Consumers are declared in
//! [`crate::EngineConfig::consumers`], before the engine opens, precisely so that the
//! watermark holds from the first moment: one that acknowledged nothing yet pins its logs
//! whole.
//!
//! **Priority.** A consumer's work is never on a send's path, and a burst (a fan-out to
//! 100,000 members, a re-index) can keep it busy for seconds, so a consumer's threads run
//! [`CONSUMER_NICE`] steps nicer than the process ([`lower_priority`], called first on
//! each of its threads; threads they start inherit it): they take what the shards leave.

use crate::domain::event::{self, ChannelRecord, Decoded, MetaRecord, ReadRecord};
use crate::error::{Corrupt, EngineError, Unavailable};
use crate::outcome::Reply;
use chorus_log::Record;
use std::sync::atomic::{AtomicU64, Ordering};

/// The most bytes of log payload one read returns (at least one event is always returned
/// when there is one).
pub const CONSUMER_READ_BYTES_MAX: usize = 256 * 1024;
/// Reads waiting for the next commit of one log. A consumer keeps at most one read in
/// flight per log, so this bounds the number of consumers, not their speed.
pub const CONSUMER_WAITERS_MAX: usize = 64;

/// How much nicer than the process a consumer's threads run.
pub const CONSUMER_NICE: i32 = 10;

/// Makes the calling thread [`CONSUMER_NICE`] steps nicer (at most 19); on Linux the
/// niceness is per thread, and threads it starts afterwards inherit it. Making a thread
/// nicer is always allowed, so an error is not expected; the thread works the same either
/// way.
pub fn lower_priority() -> std::io::Result<()> {
    // SAFETY: `nice` takes and returns an integer and changes only the calling thread's
    // niceness; `__errno_location` is this thread's errno, cleared first because -1 is
    // also a valid answer of `nice`.
    let failed = unsafe {
        *libc::__errno_location() = 0;
        libc::nice(CONSUMER_NICE) == -1 && *libc::__errno_location() != 0
    };
    if failed {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Makes the calling thread run only on CPU time that no other thread of the machine wants
/// (Linux's `SCHED_IDLE`); threads it starts afterwards inherit it. For a consumer's
/// threads whose work comes in bursts of milliseconds (the search index writer's): at
/// [`CONSUMER_NICE`] alone, a shard that wakes while such a burst holds its core can still
/// wait for the burst's time slice to end, and that wait was the tail of every delivery
/// (`DESIGN.md`, "The index writer's threads run only when idle"); a `SCHED_IDLE` thread
/// gives the core up the moment any other thread wakes. Two prices: while other threads
/// keep every core busy it hardly runs ([`IdleThreads`] lets its consumer raise it for a
/// while); and a shard must never wait for it, so such a thread must not send to the
/// shards (a shard's inbox reader waits for a push half done). Lowering one's own policy
/// is always allowed; an error is not expected.
pub fn idle_priority() -> std::io::Result<()> {
    set_policy(0, libc::SCHED_IDLE)
}

/// Sets thread `tid`'s policy (0: the calling thread), keeping its niceness.
fn set_policy(tid: libc::pid_t, policy: libc::c_int) -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `sched_setscheduler` reads `param`, a valid local, and changes only the
    // policy of the thread it names.
    if unsafe { libc::sched_setscheduler(tid, policy, &param) } == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The process's threads that run at `SCHED_IDLE` ([`idle_priority`]), raised to the
/// ordinary policy (at their niceness, [`CONSUMER_NICE`] steps nicer) while their consumer
/// finds itself starved, and lowered again afterwards.
///
/// Raising needs the right to raise a thread's priority: `CAP_SYS_NICE`, or an
/// `RLIMIT_NICE` that allows the threads' niceness. Without it [`IdleThreads::raise`]
/// fails and the threads stay idle-only.
#[derive(Debug, Default)]
pub struct IdleThreads {
    /// Each thread raised, and when it started (a thread ID is reused once its thread
    /// ends; one that now names another thread is left alone).
    raised: Vec<(libc::pid_t, u64)>,
}

/// When thread `tid` started (in clock ticks since boot), if it still exists: the 22nd
/// field of its `stat`, the 20th after its name, which may hold spaces and parentheses.
fn thread_start(tid: libc::pid_t) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

impl IdleThreads {
    /// Whether threads are raised now.
    pub fn raised(&self) -> bool {
        !self.raised.is_empty()
    }

    /// Moves every thread of the process that runs at `SCHED_IDLE` to the ordinary policy,
    /// and answers how many.
    pub fn raise(&mut self) -> std::io::Result<usize> {
        for task in std::fs::read_dir("/proc/self/task")? {
            let Some(tid) = task?.file_name().to_str().and_then(|t| t.parse().ok()) else {
                continue;
            };
            // SAFETY: `sched_getscheduler` only reads the named thread's policy.
            if unsafe { libc::sched_getscheduler(tid) } != libc::SCHED_IDLE {
                continue;
            }
            let Some(start) = thread_start(tid) else {
                continue;
            };
            match set_policy(tid, libc::SCHED_OTHER) {
                Ok(()) => self.raised.push((tid, start)),
                // The thread ended meanwhile.
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                Err(e) => {
                    let _ = self.lower();
                    return Err(e);
                }
            }
        }
        Ok(self.raised.len())
    }

    /// Puts the threads raised back to `SCHED_IDLE` (those that still exist), and answers
    /// the first error, if any (lowering is always allowed).
    pub fn lower(&mut self) -> std::io::Result<()> {
        let mut first = Ok(());
        for (tid, start) in self.raised.drain(..) {
            if thread_start(tid) != Some(start) {
                continue;
            }
            match set_policy(tid, libc::SCHED_IDLE) {
                Err(e) if e.raw_os_error() != Some(libc::ESRCH) && first.is_ok() => first = Err(e),
                _ => {}
            }
        }
        first
    }
}

/// A log consumers read: a channel partition, or the metadata log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LogId {
    /// The metadata log: accounts, workspaces, the channel directory.
    Meta,
    /// A channel partition's log.
    Partition(u32),
}

/// One committed event, as a consumer reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedEvent {
    /// Its offset in its log.
    pub offset: u64,
    /// The event.
    pub event: CommittedKind,
}

/// The kinds of record a log holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommittedKind {
    /// A metadata event.
    Meta(MetaRecord),
    /// A channel event, with its channel, workspace and seq.
    Channel(ChannelRecord),
    /// A member's read marker moved forward (not a channel event: no seq).
    Read(ReadRecord),
}

/// A page of a log's committed events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedPage {
    /// The events, in log order; at least one (none only from
    /// [`crate::Consumer::read_now`] at the log's end).
    pub events: Vec<CommittedEvent>,
    /// The offset to read from next: the cursor once these are processed.
    pub next: u64,
    /// The log's end when it was read (the offset after its last committed event): a
    /// consumer whose `next` reached it has caught up, and its next read waits.
    pub end: u64,
}

/// The cursors every declared consumer acknowledged, per log, since the engine opened.
pub(crate) struct Watermarks {
    partitions: u32,
    /// Per consumer, per log (the metadata log last): 0 until acknowledged.
    cursors: Vec<Vec<AtomicU64>>,
}

impl Watermarks {
    pub(crate) fn new(consumers: usize, partitions: u32) -> Watermarks {
        let logs = partitions as usize + 1;
        Watermarks {
            partitions,
            cursors: (0..consumers)
                .map(|_| (0..logs).map(|_| AtomicU64::new(0)).collect())
                .collect(),
        }
    }

    fn slot(&self, log: LogId) -> usize {
        match log {
            LogId::Partition(p) => {
                assert!(p < self.partitions, "partition {p} out of range");
                p as usize
            }
            LogId::Meta => self.partitions as usize,
        }
    }

    pub(crate) fn acknowledge(&self, consumer: usize, log: LogId, cursor: u64) {
        let slot = self.slot(log);
        self.cursors[consumer][slot].fetch_max(cursor, Ordering::AcqRel);
    }

    /// The lowest acknowledged cursor of `log` over every declared consumer: no segment at
    /// or after it may be deleted. `u64::MAX` when no consumer is declared.
    pub(crate) fn watermark(&self, log: LogId) -> u64 {
        let slot = self.slot(log);
        self.cursors
            .iter()
            .map(|c| c[slot].load(Ordering::Acquire))
            .min()
            .unwrap_or(u64::MAX)
    }
}

/// Turns log records into committed events. A record that does not decode is corrupt
/// data the log's checksum did not catch: the read fails rather than skip it.
pub(crate) fn page(
    records: Vec<Record>,
    end: u64,
    log: &str,
) -> Result<CommittedPage, EngineError> {
    let next = records.last().map_or(end, |r| r.offset + 1);
    let events = records
        .into_iter()
        .map(|r| {
            let event = match event::decode(&r.payload) {
                Ok(Decoded::Meta(m)) => CommittedKind::Meta(m),
                Ok(Decoded::Channel(c)) => CommittedKind::Channel(c),
                Ok(Decoded::Read(r)) => CommittedKind::Read(r),
                Err(source) => {
                    return Err(Corrupt::Event {
                        log: log.to_owned(),
                        offset: r.offset,
                        source,
                    }
                    .into())
                }
            };
            Ok(CommittedEvent {
                offset: r.offset,
                event,
            })
        })
        .collect::<Result<Vec<_>, EngineError>>()?;
    Ok(CommittedPage { events, next, end })
}

/// Answers a consumer's read from `log`: committed events only, from the log's first
/// offset if the consumer asks for less.
/// `name` is the log's directory, for errors.
pub(crate) async fn answer(log: &impl crate::durability::Durability, waiter: Waiter, name: &str) {
    let from = waiter.from.max(log.first_offset());
    let end = log.next_offset();
    let page = log
        .read(from, CONSUMER_READ_BYTES_MAX)
        .await
        .map_err(|e| {
            Corrupt::LogRead {
                log: name.to_owned(),
                source: std::sync::Arc::new(e),
            }
            .into()
        })
        .and_then(|records| page(records, end, name));
    let _ = waiter.reply.send(page);
}

/// A consumer's read; at the log's end it waits for the next commit, unless `wait` is
/// false: then it is answered at once with no events.
pub(crate) struct Waiter {
    pub from: u64,
    pub wait: bool,
    pub reply: Reply<CommittedPage>,
}

impl Waiter {
    /// Whether the read waits for a commit of a log whose next offset is `end`.
    pub(crate) fn parks_at(&self, end: u64) -> bool {
        self.wait && self.from >= end
    }
}

/// The reads waiting for a log's next commit, held by the log's owner.
#[derive(Default)]
pub(crate) struct Waiters {
    waiting: Vec<Waiter>,
}

impl Waiters {
    /// Parks a read until the log reaches past `from`; refuses when too many wait.
    pub(crate) fn park(&mut self, waiter: Waiter) {
        if self.waiting.len() >= CONSUMER_WAITERS_MAX {
            let _ = waiter
                .reply
                .send(Err(Unavailable::ConsumerReadsFull.into()));
            return;
        }
        self.waiting.push(waiter);
    }

    /// The reads the log can answer now that its next offset is `next`; the others stay.
    pub(crate) fn ready(&mut self, next: u64) -> Vec<Waiter> {
        if self.waiting.is_empty() {
            return Vec::new();
        }
        let (ready, waiting) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|w| w.from < next || w.reply.is_canceled());
        self.waiting = waiting;
        ready
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy_of(tid: libc::pid_t) -> libc::c_int {
        // SAFETY: reads the named thread's policy.
        unsafe { libc::sched_getscheduler(tid) }
    }

    // An idle-only thread is raised to the ordinary policy at its niceness and lowered
    // again; a thread that was never idle-only is left alone. (Raising needs
    // `CAP_SYS_NICE` or a large enough `RLIMIT_NICE`: the test runs as root.)
    #[test]
    fn idle_threads_are_raised_and_lowered() {
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let idle = std::thread::spawn(move || {
            lower_priority().unwrap();
            idle_priority().unwrap();
            // SAFETY: gettid has no preconditions.
            tid_tx.send(unsafe { libc::gettid() }).unwrap();
            done_rx.recv().unwrap();
        });
        let tid = tid_rx.recv().unwrap();
        // SAFETY: gettid has no preconditions.
        let me = unsafe { libc::gettid() };
        assert_eq!(policy_of(tid), libc::SCHED_IDLE);
        let mut threads = IdleThreads::default();
        assert!(!threads.raised());
        assert_eq!(threads.raise().unwrap(), 1);
        assert!(threads.raised());
        assert_eq!(policy_of(tid), libc::SCHED_OTHER);
        assert_eq!(policy_of(me), libc::SCHED_OTHER);
        // SAFETY: reads the named thread's niceness.
        let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t) };
        // SAFETY: as above, for this thread.
        let mine = unsafe { libc::getpriority(libc::PRIO_PROCESS, me as libc::id_t) };
        assert_eq!(nice, (mine + CONSUMER_NICE).min(19));
        threads.lower().unwrap();
        assert!(!threads.raised());
        assert_eq!(policy_of(tid), libc::SCHED_IDLE);
        assert_eq!(policy_of(me), libc::SCHED_OTHER);
        done_tx.send(()).unwrap();
        idle.join().unwrap();
    }

    // The watermark is the lowest acknowledged cursor over every declared consumer, 0 until
    // all have acknowledged, unbounded with none declared; cursors never move back.
    #[test]
    fn watermark_is_the_lowest_cursor() {
        let w = Watermarks::new(2, 4);
        assert_eq!(w.watermark(LogId::Partition(1)), 0);
        w.acknowledge(0, LogId::Partition(1), 50);
        assert_eq!(w.watermark(LogId::Partition(1)), 0);
        w.acknowledge(1, LogId::Partition(1), 30);
        assert_eq!(w.watermark(LogId::Partition(1)), 30);
        w.acknowledge(1, LogId::Partition(1), 10);
        assert_eq!(w.watermark(LogId::Partition(1)), 30);
        w.acknowledge(1, LogId::Partition(1), 80);
        assert_eq!(w.watermark(LogId::Partition(1)), 50);
        assert_eq!(w.watermark(LogId::Meta), 0);
        assert_eq!(Watermarks::new(0, 4).watermark(LogId::Meta), u64::MAX);
    }

    // Waiting reads are answered once the log reaches past them, and their number is
    // bounded.
    #[test]
    fn waiters_wake_on_commit() {
        let mut w = Waiters::default();
        let (tx, _rx1) = futures::channel::oneshot::channel();
        w.park(Waiter {
            from: 5,
            wait: true,
            reply: tx,
        });
        let (tx, _rx2) = futures::channel::oneshot::channel();
        w.park(Waiter {
            from: 9,
            wait: true,
            reply: tx,
        });
        assert!(w.ready(5).is_empty());
        assert_eq!(w.ready(6).len(), 1);
        assert_eq!(w.ready(10).len(), 1);
        let mut receivers = Vec::new();
        for _ in 0..CONSUMER_WAITERS_MAX + 1 {
            let (tx, rx) = futures::channel::oneshot::channel();
            w.park(Waiter {
                from: 100,
                wait: true,
                reply: tx,
            });
            receivers.push(rx);
        }
        let refused = receivers.last_mut().unwrap().try_recv().unwrap();
        assert!(matches!(refused, Some(Err(EngineError::Unavailable(_)))));
    }
}
