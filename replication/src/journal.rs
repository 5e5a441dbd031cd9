//! The Raft journal of one node's shard: the entries of every group the shard holds, in
//! one `chorus-log` log, so that the `Ready`s of all its groups share fsyncs (the log's
//! group commit) instead of each group fsyncing a log of its own. On one disk the number of
//! fsyncs, not their bytes, bounds a node's commits: with sixteen groups per shard, sixteen
//! logs meant sixteen device flushes where one does.
//!
//! A record is one group's: `[group u64][kind u8][body]` (little-endian), with kind
//! `ENTRY` (the body an encoded Raft `Entry`) or `RESET` (the body the index the group's
//! next entry will have: every entry before it is gone, as after a snapshot install).
//! Replay reads the journal in order and keeps, per group, the run of entries the records
//! leave: an entry at an index the run holds replaces it and everything after it (a new
//! leader's entries over an uncommitted tail), one past the end extends the run, and one
//! elsewhere starts it again; a reset empties it. [`crate::RaftLog`] then keeps what
//! continues its snapshot.
//!
//! **Space.** Entries are served from memory; the journal is read only when it opens. Each
//! group pins the journal offset of the oldest entry it still keeps (its tail behind its
//! last snapshot included), and whole segments before every pin are deleted
//! ([`Journal::collect`]). A group that stays idle would pin its old entries for ever, so
//! a group whose pin falls more than `rewrite_after` records behind the journal's end, and
//! whose entries are few beside that span ([`Journal::due`]), writes them again at the
//! end ([`crate::RaftLog::rewrite_if_due`]: replay gives the same run); the journal does
//! the same for the groups not open in this process (their runs as recovered).
//!
//! Invariants:
//! - **A group's records are in its own order.** A group's entries and resets are written
//!   by its own task, one append after another, so replay sees them in the order raft-rs
//!   asked for them. The journal's rewrites of a group not yet open hold a lock that
//!   [`Journal::take`] (the group opening) waits for.
//! - **Nothing pinned is deleted.** Segments go only when every record in them lies before
//!   every group's pin, open or not.

use crate::raft_log::RaftLogError;
use chorus_log::{Entry as Record, Log, LogConfig, Storage};
use protobuf::Message as _;
use raft::eraftpb::Entry;
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::io;

const ENTRY: u8 = 1;
const RESET: u8 = 2;
/// Bytes read from the journal at a time when opening.
const OPEN_READ_BYTES: usize = 1 << 20;
/// A group's pin falling this many records behind the journal's end makes it write its
/// entries again, unless set otherwise ([`Journal::open`]).
pub const REWRITE_AFTER: u64 = 200_000;
/// A group's entries are written again only if the journal behind its oldest entry is
/// this many times their number.
const REWRITE_COST: u64 = 32;

/// The entries the journal holds for one group, with the journal offset of each.
#[derive(Debug, Default, Clone)]
pub struct Run {
    /// Consecutive entries, by index.
    pub entries: Vec<Entry>,
    /// The journal offset of each entry.
    pub offsets: Vec<u64>,
}

impl Run {
    fn place(&mut self, entry: Entry, offset: u64) {
        let index = entry.index;
        let keep = match self.entries.first() {
            Some(first) if index >= first.index && index <= first.index + self.len() => {
                (index - first.index) as usize
            }
            // Before the run, or past its end with a gap: the run starts again here.
            _ => 0,
        };
        self.entries.truncate(keep);
        self.offsets.truncate(keep);
        self.entries.push(entry);
        self.offsets.push(offset);
    }

    fn len(&self) -> u64 {
        self.entries.len() as u64
    }
}

/// One shard's Raft journal (see the module's documentation).
pub struct Journal<S: Storage> {
    log: Log<S>,
    /// Runs recovered at open and not yet taken by their group.
    recovered: RefCell<BTreeMap<u64, Run>>,
    /// Per group, the journal offset of the oldest entry it keeps (open or not).
    pins: RefCell<BTreeMap<u64, u64>>,
    rewrite_after: u64,
    /// The lowest pin at the last collection: the next runs when every pin passed it far
    /// enough.
    collected: Cell<u64>,
    /// Held while the journal rewrites a group not open, and by [`Journal::take`].
    rewriting: futures::lock::Mutex<()>,
}

impl<S: Storage> Journal<S> {
    /// Opens (or creates) the journal in `dir` and replays it. A group whose pin falls
    /// `rewrite_after` records behind the end writes its entries again.
    pub async fn open(
        dir: S,
        config: LogConfig,
        rewrite_after: u64,
    ) -> Result<Journal<S>, RaftLogError> {
        let (log, _report) = Log::open(dir, config).await?;
        let mut runs: BTreeMap<u64, Run> = BTreeMap::new();
        let mut at = log.first_offset();
        let next = log.next_offset();
        while at < next {
            let records = log.read(at, OPEN_READ_BYTES).await?;
            if records.is_empty() {
                return Err(RaftLogError::Corrupt(format!(
                    "the raft journal ends at {at}, before {next}"
                )));
            }
            for r in records {
                at = r.offset + 1;
                let (group, kind, body) = split(r.offset, &r.payload)?;
                let run = runs.entry(group).or_default();
                match kind {
                    ENTRY => run.place(decode(r.offset, body)?, r.offset),
                    RESET => *run = Run::default(),
                    _ => unreachable!("split checks the kind"),
                }
            }
        }
        runs.retain(|_, run| !run.entries.is_empty());
        let pins = runs.iter().map(|(g, run)| (*g, run.offsets[0])).collect();
        let first = log.first_offset();
        Ok(Journal {
            log,
            recovered: RefCell::new(runs),
            pins: RefCell::new(pins),
            rewrite_after,
            collected: Cell::new(first),
            rewriting: futures::lock::Mutex::new(()),
        })
    }

    /// Hands a group the entries recovered for it (once; none for a group the journal has
    /// no entries of). Its pin stays until the group sets its own.
    pub async fn take(&self, group: u64) -> Run {
        let _held = self.rewriting.lock().await;
        self.recovered
            .borrow_mut()
            .remove(&group)
            .unwrap_or_default()
    }

    /// Appends a group's entries (one fsync, shared with the other groups' appends that
    /// meet it) and returns their journal offsets.
    pub async fn append(&self, group: u64, entries: &[Entry]) -> Result<Vec<u64>, RaftLogError> {
        let payloads = entries
            .iter()
            .map(|e| {
                let mut p = head(group, ENTRY);
                e.write_to_vec(&mut p).map_err(io::Error::other)?;
                Ok(p)
            })
            .collect::<Result<Vec<_>, RaftLogError>>()?;
        let records: Vec<Record<'_>> = payloads
            .iter()
            .map(|p| Record {
                timestamp_us: 0,
                payload: p,
            })
            .collect();
        let range = self.log.append(&records).await?;
        Ok(range.collect())
    }

    /// Records durably that every entry of `group` is gone and its next will be at `next`.
    pub async fn reset(&self, group: u64, next: u64) -> Result<(), RaftLogError> {
        let mut p = head(group, RESET);
        p.extend_from_slice(&next.to_le_bytes());
        self.log
            .append(&[Record {
                timestamp_us: 0,
                payload: &p,
            }])
            .await?;
        Ok(())
    }

    /// Sets the journal offset of the oldest entry `group` keeps (`None`: it keeps none).
    pub fn pin(&self, group: u64, offset: Option<u64>) {
        let mut pins = self.pins.borrow_mut();
        match offset {
            Some(o) => pins.insert(group, o),
            None => pins.remove(&group),
        };
    }

    /// Whether a group keeping `entries` entries from journal offset `offset` on should
    /// write them again: its oldest lies `rewrite_after` records behind the end, and
    /// writing them costs less than a thirty-second of the journal that would be freed. A
    /// group that appends as much as its share keeps a tail spanning about `groups` times
    /// its length, and is left alone (its compactions move its pin); an idle or slow one
    /// is rewritten.
    pub fn due(&self, offset: u64, entries: usize) -> bool {
        let behind = self.log.next_offset().saturating_sub(offset);
        behind > self.rewrite_after && (entries as u64).saturating_mul(REWRITE_COST) < behind
    }

    /// Writes again the entries of the groups not open here whose pins are due, then
    /// deletes the whole segments before every pin, once the lowest pin has moved far
    /// enough since the last time (a fifth of `rewrite_after`).
    pub async fn collect(&self) -> Result<(), RaftLogError> {
        let due: Vec<u64> = {
            let pins = self.pins.borrow();
            let recovered = self.recovered.borrow();
            recovered
                .iter()
                .filter(|(g, run)| pins.get(g).is_some_and(|&o| self.due(o, run.entries.len())))
                .map(|(g, _)| g)
                .copied()
                .collect()
        };
        if !due.is_empty() {
            let _held = self.rewriting.lock().await;
            for group in due {
                let Some(run) = self.recovered.borrow().get(&group).cloned() else {
                    continue;
                };
                let offsets = self.append(group, &run.entries).await?;
                self.pin(group, offsets.first().copied());
                if let Some(r) = self.recovered.borrow_mut().get_mut(&group) {
                    r.offsets = offsets;
                }
            }
        }
        let lowest = (self.pins.borrow().values().min().copied()).unwrap_or(self.log.next_offset());
        if lowest >= self.collected.get() + (self.rewrite_after / 5).max(1) {
            self.log.delete_before(lowest).await?;
            self.collected.set(lowest);
        }
        Ok(())
    }

    /// The offset after the journal's last record.
    pub fn next_offset(&self) -> u64 {
        self.log.next_offset()
    }

    /// The first offset the journal still holds.
    pub fn first_offset(&self) -> u64 {
        self.log.first_offset()
    }
}

fn head(group: u64, kind: u8) -> Vec<u8> {
    let mut p = Vec::with_capacity(64);
    p.extend_from_slice(&group.to_le_bytes());
    p.push(kind);
    p
}

fn split(offset: u64, payload: &[u8]) -> Result<(u64, u8, &[u8]), RaftLogError> {
    let bad = |why: &str| RaftLogError::Corrupt(format!("raft journal record {offset}: {why}"));
    if payload.len() < 9 {
        return Err(bad("shorter than its head"));
    }
    let group = u64::from_le_bytes(payload[..8].try_into().expect("8 bytes"));
    let kind = payload[8];
    let body = &payload[9..];
    match kind {
        ENTRY => {}
        RESET if body.len() == 8 => {}
        RESET => return Err(bad("a reset of another length")),
        _ => return Err(bad("of no known kind")),
    }
    Ok((group, kind, body))
}

fn decode(offset: u64, body: &[u8]) -> Result<Entry, RaftLogError> {
    Entry::parse_from_bytes(body)
        .map_err(|e| RaftLogError::Corrupt(format!("raft journal record {offset}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            ..Entry::default()
        }
    }

    fn indexes(run: &Run) -> Vec<(u64, u64)> {
        run.entries.iter().map(|e| (e.index, e.term)).collect()
    }

    #[test]
    fn a_run_is_replaced_from_an_index_it_holds_and_starts_again_elsewhere() {
        let mut run = Run::default();
        for i in 5..=9 {
            run.place(entry(i, 1), i * 10);
        }
        run.place(entry(7, 2), 100);
        run.place(entry(8, 2), 101);
        assert_eq!(indexes(&run), [(5, 1), (6, 1), (7, 2), (8, 2)]);
        assert_eq!(run.offsets, [50, 60, 100, 101]);
        run.place(entry(9, 2), 102);
        assert_eq!(run.len(), 5);
        // Past the end with a gap, or before the start: only the new entry.
        run.place(entry(20, 3), 103);
        assert_eq!(indexes(&run), [(20, 3)]);
        run.place(entry(3, 3), 104);
        assert_eq!(indexes(&run), [(3, 3)]);
    }

    #[test]
    fn records_of_no_known_shape_are_refused() {
        assert!(split(1, &[0; 8]).is_err());
        let mut p = head(4, 9);
        p.push(0);
        assert!(split(1, &p).is_err());
        let mut p = head(4, RESET);
        p.extend_from_slice(&[0; 7]);
        assert!(split(1, &p).is_err());
        p.push(0);
        assert_eq!(split(1, &p).unwrap().0, 4);
    }
}
