//! A partition's event log as the state machine of its group: the engine's commit path
//! in a cluster (through [`crate::ReplicatedDurability`]).
//!
//! A commit proposes its batch of events as one Raft entry ([`encode_batch`]); once the
//! entry is committed, every replica's [`EventLogMachine`] appends the batch's events to
//! its own `chorus-log` log (one append, one fsync for all the entries of a `Ready`), so
//! every replica holds the same events at the same offsets, and only committed ones. The
//! proposer learns where its batch went ([`ReplicatedLog::commit`]) with its proposal's
//! answer (the batch's first offset is the entry's [`StateMachine::outcome`]); whoever waits for the
//! log to grow is woken ([`ReplicatedLog::grown`]: a follower's partition, which then
//! applies what it did not decide).
//!
//! **Where the log stands in Raft's terms.** The machine keeps a cursor: the last Raft
//! index applied and the event-log offset after it. Its snapshot data is that cursor, so a
//! group that opens restores it, and raft-rs then applies again the entries after it,
//! which may already be in the event log (applied before a crash, after the last
//! snapshot): a batch is in the log when the log reaches past its offsets, and is skipped;
//! a batch only partly there (a torn append) gets its missing tail (its head is this very
//! entry's, and stays readable throughout); a batch past the log's end (a gap) cannot be,
//! and stops the group.
//!
//! **Catch-up by snapshot.** A follower further behind than the leader's log keeps entries
//! is sent a snapshot: the leader's cursor. The events up to the cursor's offset are in
//! every replica's event log that applied them (an event log is never compacted: it is the
//! channel's history), so the follower fetches what it lacks from a peer, the leader
//! first, over a connection of its own ([`crate::Transport::fetch`]), about
//! [`crate::wire::EVENTS_BYTES`] at a time, appending each piece (one fsync) before it asks
//! for the next, and takes the cursor once its log reaches it ([`EventLogMachine::catch_up`]).
//! Until then the group applies nothing, and a node that stops halfway fetches the rest when
//! it opens again (the snapshot is on disk, the events fetched so far too). The engine's own
//! partition snapshot does not travel: the follower's partition applies the fetched events
//! as it applies any others, and takes its own snapshots.
//!
//! Invariant: **an event is in the log only once its entry is committed**, and at the same
//! offset on every replica.

use crate::group::StateMachine;
use crate::raft_log::RaftLogError;
use crate::replica::{ProposeError, Replica};
use chorus_log::{Entry as Event, Log, Storage};
use raft::eraftpb::{Entry, EntryType};
use std::cell::{Cell, RefCell};
use std::ops::Range;
use std::rc::Rc;

/// The first and the longest wait before asking peers again for events none could send.
const CATCH_UP_BACKOFF_MIN: std::time::Duration = std::time::Duration::from_millis(50);
const CATCH_UP_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(1);

/// Encodes a batch of events as a Raft entry's data: a count, then per event its
/// timestamp, its length and its bytes (little-endian).
pub fn encode_batch(events: &[Event<'_>]) -> Vec<u8> {
    let bytes: usize = events.iter().map(|e| 12 + e.payload.len()).sum();
    let mut out = Vec::with_capacity(4 + bytes);
    out.extend_from_slice(&(events.len() as u32).to_le_bytes());
    for e in events {
        out.extend_from_slice(&e.timestamp_us.to_le_bytes());
        out.extend_from_slice(&(e.payload.len() as u32).to_le_bytes());
        out.extend_from_slice(e.payload);
    }
    out
}

/// The events of a batch's encoding; `None` if it is not one.
pub fn decode_batch(mut data: &[u8]) -> Option<Vec<Event<'_>>> {
    fn take<'a>(data: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = data.split_at_checked(n)?;
        *data = rest;
        Some(head)
    }
    let count = u32::from_le_bytes(take(&mut data, 4)?.try_into().ok()?);
    let mut events = Vec::with_capacity((count as usize).min(data.len() / 12));
    for _ in 0..count {
        let timestamp_us = u64::from_le_bytes(take(&mut data, 8)?.try_into().ok()?);
        let len = u32::from_le_bytes(take(&mut data, 4)?.try_into().ok()?);
        let payload = take(&mut data, len as usize)?;
        events.push(Event {
            timestamp_us,
            payload,
        });
    }
    data.is_empty().then_some(events)
}

/// Where the machine stands: the last index applied, and the log offset after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cursor {
    index: u64,
    offset: u64,
}

impl Cursor {
    fn encode(&self) -> Vec<u8> {
        [self.index.to_le_bytes(), self.offset.to_le_bytes()].concat()
    }

    /// The cursor in snapshot data; `start` when there is no snapshot yet (nothing
    /// applied, the log's first offset).
    fn decode(data: &[u8], start: Cursor) -> Option<Cursor> {
        if data.is_empty() {
            return Some(start);
        }
        let data: &[u8; 16] = data.try_into().ok()?;
        Some(Cursor {
            index: u64::from_le_bytes(data[..8].try_into().ok()?),
            offset: u64::from_le_bytes(data[8..].try_into().ok()?),
        })
    }
}

/// What the machine and the proposers on its node share.
struct Shared {
    /// The offset after the last event applied: the log's end once an apply is done (the
    /// log only ever holds committed events, so on a restart, all it holds).
    end: Cell<u64>,
    /// Who waits for `end` to grow ([`ReplicatedLog::grown`]).
    waiting: RefCell<Option<std::task::Waker>>,
}

impl Shared {
    fn set_end(&self, end: u64) {
        self.end.set(end);
        if let Some(w) = self.waiting.borrow_mut().take() {
            w.wake();
        }
    }
}

/// The state machine: applies committed batches to the event log.
pub struct EventLogMachine<S: Storage> {
    log: Rc<Log<S>>,
    cursor: Cursor,
    /// Data that is no snapshot of this machine was restored: the group stops.
    gap: Option<String>,
    /// A snapshot was restored whose offset the log does not reach yet: the cursor to take
    /// once the events before it are fetched ([`EventLogMachine::catch_up`]).
    behind: Option<Cursor>,
    /// The group's replica: its peers, and how to fetch events from them.
    replica: Rc<Replica>,
    /// The members the last snapshot named, asked too when catching up (the replica's
    /// voters are those of its last turn, none yet on a node that just joined).
    members: Vec<u64>,
    /// Where the last [`StateMachine::apply`] put each entry's events: its index and the
    /// batch's first offset, in index order.
    placed: Vec<(u64, u64)>,
    shared: Rc<Shared>,
}

impl<S: Storage> StateMachine for EventLogMachine<S> {
    async fn apply(&mut self, entries: &[Entry]) -> Result<(), RaftLogError> {
        if let Some(why) = &self.gap {
            return Err(RaftLogError::Corrupt(why.clone()));
        }
        if self.behind.is_some() {
            self.catch_up().await?;
        }
        let mut events: Vec<Event<'_>> = Vec::new();
        let mut placed = std::mem::take(&mut self.placed);
        placed.clear();
        let mut cursor = self.cursor;
        for e in entries {
            if e.index <= cursor.index {
                continue;
            }
            let batch = match e.get_entry_type() {
                EntryType::EntryNormal if !e.data.is_empty() => {
                    decode_batch(&e.data).ok_or_else(|| {
                        RaftLogError::Corrupt(format!("entry {} is not a batch of events", e.index))
                    })?
                }
                _ => Vec::new(),
            };
            let range = cursor.offset..cursor.offset + batch.len() as u64;
            if events.is_empty() {
                let next = self.log.next_offset();
                if range.end <= next {
                    // Appended before a crash, after the last snapshot: there already.
                    placed.push((e.index, range.start));
                    cursor = Cursor {
                        index: e.index,
                        offset: range.end,
                    };
                    continue;
                }
                if range.start > next {
                    return Err(RaftLogError::Corrupt(format!(
                        "entry {} belongs at offset {} but the event log ends at {next}",
                        e.index, range.start
                    )));
                }
                if range.start < next {
                    // A torn append: its head survived a crash, its tail did not. The head
                    // is this very entry's (committed entries never change, and each goes
                    // at the same offsets every time), so only the tail is appended. The
                    // head stays readable throughout: the partition may be reading it (a
                    // cut and a new append left a window in which the log ended before the
                    // end its readers were told).
                    let have = (next - range.start) as usize;
                    events.extend(batch.into_iter().skip(have));
                    placed.push((e.index, range.start));
                    cursor = Cursor {
                        index: e.index,
                        offset: range.end,
                    };
                    continue;
                }
            }
            events.extend(batch);
            placed.push((e.index, range.start));
            cursor = Cursor {
                index: e.index,
                offset: range.end,
            };
        }
        if !events.is_empty() {
            // No fsync: the entries are durable in this node's Raft log, and applied again
            // after a crash from the last snapshot on (see `persist`).
            let appended = self.log.append_unsynced(&events).await?;
            if appended.end != cursor.offset {
                return Err(RaftLogError::Corrupt(format!(
                    "the event log took the batches at {appended:?}, not ending at {}",
                    cursor.offset
                )));
            }
        }
        self.cursor = cursor;
        // Everything the log holds is committed: batches applied again after a restart
        // (skipped above) were there all along.
        self.shared.set_end(self.log.next_offset());
        self.placed = placed;
        Ok(())
    }

    fn outcome(&self, index: u64) -> u64 {
        // The group asks of the entries of the last call only. Those the cursor already
        // covered (restored by a snapshot) were not placed by it and have no proposer
        // waiting here: they answer the log's end.
        match self.placed.binary_search_by_key(&index, |&(at, _)| at) {
            Ok(i) => self.placed[i].1,
            Err(_) => self.cursor.offset,
        }
    }

    fn snapshot(&self) -> Vec<u8> {
        self.cursor.encode()
    }

    async fn persist(&mut self) -> Result<(), RaftLogError> {
        self.log.sync().await?;
        Ok(())
    }

    async fn catch_up(&mut self) -> Result<(), RaftLogError> {
        let Some(target) = self.behind else {
            return Ok(());
        };
        let mut backoff = CATCH_UP_BACKOFF_MIN;
        loop {
            let next = self.log.next_offset();
            if next >= target.offset {
                self.cursor = target;
                self.behind = None;
                self.shared.set_end(next);
                return Ok(());
            }
            if self.replica.stop_asked() {
                return Err(RaftLogError::Corrupt(format!(
                    "stopped while catching up: the event log ends at {next}, the snapshot \
                     at index {} names offset {} (the rest is fetched when it opens again)",
                    target.index, target.offset
                )));
            }
            if let Some(end) = self.fetch_some(next, target.offset).await? {
                self.shared.set_end(end);
                backoff = CATCH_UP_BACKOFF_MIN;
                continue;
            }
            tracing::warn!(
                group = self.replica.group_id(),
                from = next,
                to = target.offset,
                "no peer could send the events this node lacks; asking again"
            );
            self.replica.sleep(backoff).await;
            backoff = (backoff * 2).min(CATCH_UP_BACKOFF_MAX);
        }
    }

    fn members(&mut self, voters: &[u64], learners: &[u64]) {
        self.members = voters.iter().chain(learners).copied().collect();
    }

    fn restore(&mut self, index: u64, data: &[u8]) {
        let start = Cursor {
            index: 0,
            offset: self.log.first_offset(),
        };
        match Cursor::decode(data, start) {
            Some(c) if c.offset <= self.log.next_offset() && c.index == index => {
                // The log may hold more than the snapshot covers (applied since): all of
                // it committed, so its end stands.
                self.cursor = c;
            }
            Some(c) if c.index == index => {
                // Further than this log reaches: the events come from a peer.
                self.behind = Some(c);
            }
            _ => {
                self.gap = Some(format!("the snapshot at index {index} is not a cursor"));
            }
        }
    }
}

impl<S: Storage> EventLogMachine<S> {
    /// Asks the group's peers (the leader first) for the events from `from` on, before
    /// `to`, and appends what the first that has any sends; returns the log's new end, or
    /// `None` if no peer sent any.
    async fn fetch_some(&mut self, from: u64, to: u64) -> Result<Option<u64>, RaftLogError> {
        let leader = self.replica.status().leader;
        let mut peers = self.replica.voters();
        for m in &self.members {
            if !peers.contains(m) {
                peers.push(*m);
            }
        }
        peers.sort_by_key(|&p| p != leader);
        for peer in peers {
            let batch = match self.replica.fetch_events(peer, from, to).await {
                Ok(batch) => batch,
                Err(e) => {
                    tracing::debug!(peer, error = %e, "a peer did not send events");
                    continue;
                }
            };
            let Some(mut events) = decode_batch(&batch).filter(|e| !e.is_empty()) else {
                continue;
            };
            events.truncate((to - from) as usize);
            let appended = self.log.append(&events).await?;
            if appended.start != from {
                return Err(RaftLogError::Corrupt(format!(
                    "events fetched for offset {from} went to {appended:?}"
                )));
            }
            return Ok(Some(appended.end));
        }
        Ok(None)
    }
}

/// The events `log` holds from `from` on, before `to`, as a batch: about
/// [`crate::wire::EVENTS_BYTES`] of them at most, none if it does not hold `from`.
async fn read_batch<S: Storage>(log: &Log<S>, from: u64, to: u64) -> Vec<u8> {
    let records = log
        .read(from, crate::wire::EVENTS_BYTES)
        .await
        .unwrap_or_default();
    let events: Vec<Event<'_>> = records
        .iter()
        .take_while(|r| r.offset < to)
        .map(|r| Event {
            timestamp_us: r.timestamp_us,
            payload: &r.payload[..],
        })
        .collect();
    encode_batch(&events)
}

/// The proposer's side: commits batches through the group and reads the event log.
pub struct ReplicatedLog<S: Storage> {
    replica: Rc<Replica>,
    log: Rc<Log<S>>,
    shared: Rc<Shared>,
}

impl<S: Storage> ReplicatedLog<S> {
    /// The two ends for `log`, proposing through `replica`: the proposer's, and the
    /// machine to run the group with.
    pub fn new(replica: Rc<Replica>, log: Log<S>) -> (ReplicatedLog<S>, EventLogMachine<S>)
    where
        S: 'static,
    {
        let log = Rc::new(log);
        let shared = Rc::new(Shared {
            end: Cell::new(log.next_offset()),
            waiting: RefCell::new(None),
        });
        let machine = EventLogMachine {
            log: log.clone(),
            cursor: Cursor {
                index: 0,
                offset: log.first_offset(),
            },
            gap: None,
            behind: None,
            replica: replica.clone(),
            members: Vec::new(),
            placed: Vec::new(),
            shared: shared.clone(),
        };
        let source = log.clone();
        replica.set_source(Rc::new(move |from, to| {
            let log = source.clone();
            Box::pin(async move { read_batch(&log, from, to).await })
        }));
        (
            ReplicatedLog {
                replica,
                log,
                shared,
            },
            machine,
        )
    }

    /// Commits `events` as one batch: once a majority of the group holds it and this
    /// node's log has it, returns its offsets there (the same on every replica).
    pub async fn commit(&self, events: &[Event<'_>]) -> Result<Range<u64>, ProposeError> {
        let applied = self.replica.propose_applied(encode_batch(events)).await?;
        Ok(applied.outcome..applied.outcome + events.len() as u64)
    }

    /// The event log (committed events only).
    pub fn log(&self) -> &Log<S> {
        &self.log
    }

    /// The event log, to keep.
    pub fn log_rc(&self) -> Rc<Log<S>> {
        self.log.clone()
    }

    /// The offset after the last event applied here.
    pub fn end(&self) -> u64 {
        self.shared.end.get()
    }

    /// Completes once the events applied here reach past `end` (one waiter at a time:
    /// the partition that owns the log).
    pub async fn grown(&self, end: u64) {
        std::future::poll_fn(|cx| {
            if self.shared.end.get() > end {
                std::task::Poll::Ready(())
            } else {
                *self.shared.waiting.borrow_mut() = Some(cx.waker().clone());
                std::task::Poll::Pending
            }
        })
        .await
    }

    /// The group's replica this log commits through.
    pub fn replica(&self) -> &Rc<Replica> {
        &self.replica
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A batch comes back as it went in; anything cut short, or with bytes after its last
    // event, is refused rather than misread.
    #[test]
    fn batches_round_trip_and_refuse_what_is_not_one() {
        let payloads: [&[u8]; 3] = [b"", b"one", &[7u8; 300]];
        let events: Vec<Event<'_>> = payloads
            .iter()
            .enumerate()
            .map(|(i, p)| Event {
                timestamp_us: i as u64 * 1_000,
                payload: p,
            })
            .collect();
        let data = encode_batch(&events);
        let back = decode_batch(&data).expect("a batch");
        assert_eq!(back.len(), 3);
        for (a, b) in back.iter().zip(&events) {
            assert_eq!((a.timestamp_us, a.payload), (b.timestamp_us, b.payload));
        }
        assert_eq!(decode_batch(&encode_batch(&[])).map(|b| b.len()), Some(0));
        for cut in 0..data.len() {
            assert!(decode_batch(&data[..cut]).is_none(), "cut at {cut}");
        }
        let mut longer = data.clone();
        longer.push(0);
        assert!(decode_batch(&longer).is_none());
        // A count far beyond the bytes is refused without reserving for it.
        assert!(decode_batch(&u32::MAX.to_le_bytes()).is_none());
    }

    #[test]
    fn a_cursor_round_trips_and_no_snapshot_is_the_start() {
        let start = Cursor {
            index: 0,
            offset: 1,
        };
        let c = Cursor {
            index: 42,
            offset: 977,
        };
        assert_eq!(Cursor::decode(&c.encode(), start), Some(c));
        assert_eq!(Cursor::decode(&[], start), Some(start));
        assert_eq!(Cursor::decode(&[1, 2, 3], start), None);
    }
}
