//! The log of one partition: group-committed appends, reads, truncation, retention, and
//! recovery on open.
//!
//! A log is a directory of segments named by base offset (`00000000000000000001.seg`), each
//! with a sparse index (`.idx`) written when it is sealed. The last segment is the active
//! one and takes every append.
//!
//! Group commit: an appender encodes its records into the shared `pending` buffer, which
//! gives them their offsets. If no flush is running it becomes the flusher: it takes the
//! whole buffer, writes it, and issues one `fdatasync` for it. Otherwise it waits for the
//! running flush to end, and then either finds its records durable or becomes the next
//! flusher, taking everyone who arrived meanwhile. Waiting is a notification, not a lock
//! queue, so every appender wakes after every flush and none can be starved.
//!
//! Architecture invariant: offsets are gapless. Records at offsets below `written_next` are
//! written and readable; nothing at or above it is ever returned by a read. Records below
//! `synced_next` are durable too: every record is, once its `append` returns; one appended
//! with [`Log::append_unsynced`] only after a later fsync (the next synced append's, or
//! [`Log::sync`]'s), and a crash before that may take it, with any records after it.
//!
//! Architecture invariant: after any write, fsync, truncate or directory error the log is
//! poisoned. It never retries, because after a failed fsync the kernel may have dropped the
//! dirty pages while reads still show them (PostgreSQL's "fsyncgate"). Reopening rebuilds
//! the state from what is really on disk.

use crate::error::{AppendError, CorruptReason, OpenError, ReadError, TruncateError};
use crate::format::{self, Decoded, Record, ScanEnd, SegmentHeader, SEGMENT_HEADER_BYTES};
use crate::index::{IndexFile, SparseIndex};
use crate::storage::{Storage, StorageFile};
use bytes::Bytes;
use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::ops::Range;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

/// Settings of one log. Every limit is named and bounded.
#[derive(Clone, Debug)]
pub struct LogConfig {
    /// A segment is sealed and a new one started when the next batch would take it past
    /// this size. A single batch larger than this gets a segment of its own.
    pub segment_bytes_max: u64,
    /// Bytes of records between two entries of the sparse index.
    pub index_interval_bytes: u64,
    /// The largest payload of one record.
    pub record_bytes_max: usize,
    /// Encoded bytes waiting for the next flush; an appender that would pass this flushes
    /// first, so memory stays bounded however many appenders arrive.
    pub pending_bytes_max: usize,
    /// Bytes fetched at a time when reading the active segment.
    pub read_chunk_bytes: usize,
    /// Zeros written ahead of the active segment's end, this much at a time (0: none).
    /// An append then overwrites blocks the file already has instead of growing it, so
    /// its `fdatasync` has no file size to commit and io_uring can issue the write without
    /// a kernel worker; the file grows once per this many bytes. Recovery reads the zeros
    /// as the end of the records and cuts them, as it cuts the padding of a last block.
    pub preallocate_bytes: u64,
    /// Bytes of the newest written records kept in memory (up to twice this), so that the
    /// readers that follow the tail (consumers, Raft followers, a resume) get them without
    /// a device read: the files are written with O_DIRECT, so no page cache holds them.
    /// 0 for a log read only when it opens (a Raft journal): nothing is copied.
    pub recent_bytes: usize,
    /// Segments that retention ([`Log::delete_before`]) keeps as spares instead of
    /// deleting them, up to this many (0: none). A new segment is then a spare renamed,
    /// its blocks already written, so the zeros written ahead of its records
    /// ([`LogConfig::preallocate_bytes`]) are left out until the records pass the spare's
    /// length: for a log whose old segments go as fast as new ones come (a Raft journal),
    /// a device writes each record's bytes once instead of once as zeros and once as the
    /// record. Recovery tells the end of the records by their offsets, which only grow:
    /// an old record left after them has an offset below the segment's base. After a
    /// crash, bytes of the spare's old records after the last new one are reported as a
    /// torn tail, as a torn write would be: the two look the same.
    pub recycle_segments: usize,
}

impl Default for LogConfig {
    fn default() -> LogConfig {
        LogConfig {
            segment_bytes_max: 64 * 1024 * 1024,
            index_interval_bytes: 4096,
            record_bytes_max: 8 * 1024 * 1024,
            pending_bytes_max: 16 * 1024 * 1024,
            read_chunk_bytes: 64 * 1024,
            preallocate_bytes: 4 * 1024 * 1024,
            recent_bytes: 256 * 1024,
            recycle_segments: 0,
        }
    }
}

/// Preallocation ends on a multiple of this, so the zeros fill whole blocks.
const PREALLOCATE_ALIGN: u64 = 4096;

/// One record to append.
#[derive(Clone, Copy, Debug)]
pub struct Entry<'a> {
    /// Microseconds since the Unix epoch; the log stores it and does not interpret it.
    pub timestamp_us: u64,
    /// The payload.
    pub payload: &'a [u8],
}

/// What [`Log::open`] found and repaired.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segments in the log after recovery.
    pub segments: usize,
    /// Bytes cut from the end of the active segment, zero padding included.
    pub tail_bytes_cut: u64,
    /// Where a torn or corrupt tail started, if non-zero bytes were cut.
    pub torn_tail: Option<TornTail>,
    /// Base offsets of segment files removed: created but never made durable, or left
    /// behind by an interrupted truncation.
    pub removed_segments: Vec<u64>,
    /// Base offsets of sealed segments whose index was missing, damaged or stale and was
    /// rebuilt by a scan.
    pub rebuilt_indexes: Vec<u64>,
    /// Sealed segments holding a corrupt record. Reads before it work; reads of it fail.
    pub corrupt_segments: Vec<CorruptSegment>,
    /// Whether the active segment's index, written by a clean close, was used instead of
    /// a scan of the segment.
    pub active_index_used: bool,
}

/// A torn or corrupt tail that recovery cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TornTail {
    /// The base offset of the active segment.
    pub segment_base: u64,
    /// The byte position where the cut started.
    pub position: u64,
    /// The first offset that was not kept.
    pub offset: u64,
    /// What was found there.
    pub reason: ScanEnd,
}

/// A corrupt record found in a sealed segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CorruptSegment {
    /// The segment's base offset.
    pub segment_base: u64,
    /// The first offset that cannot be read.
    pub offset: u64,
    /// Its byte position.
    pub position: u64,
}

/// A segment as the log tracks it.
struct Segment<F> {
    base: u64,
    /// The offset after the last durable record.
    next: u64,
    /// Bytes of header and durable records.
    len: u64,
    index: SparseIndex,
    /// The open handle: always for the active segment, lazily for sealed ones.
    file: Option<Rc<F>>,
    /// The mapped bytes of a sealed segment, once read.
    map: Option<Bytes>,
}

impl<F> Segment<F> {
    /// A new segment at `base` holding only its header: the active one.
    fn empty(base: u64, file: F, config: &LogConfig) -> Segment<F> {
        Segment {
            base,
            next: base,
            len: SEGMENT_HEADER_BYTES as u64,
            index: SparseIndex::new(config.index_interval_bytes),
            file: Some(Rc::new(file)),
            map: None,
        }
    }
}

struct State<F> {
    segments: Vec<Segment<F>>,
    /// Where the zeros written ahead of the active segment's records end (at least its
    /// `len`): see [`LogConfig::preallocate_bytes`].
    allocated: u64,
    first_offset: u64,
    /// Offsets below this are written and readable.
    written_next: u64,
    /// Offsets below this are durable (at most `written_next`).
    synced_next: u64,
    /// A pending record was appended by [`Log::append`]: the next flush fsyncs.
    sync_wanted: bool,
    /// The offset the next appended record gets.
    assigned_next: u64,
    /// Encoded records waiting for the next flush, starting at offset `written_next`.
    pending: Vec<u8>,
    /// Position of each pending record within `pending`, for the index.
    pending_positions: Vec<u32>,
    /// An emptied buffer kept for the next batch.
    spare: Vec<u8>,
    /// The newest written bytes of one segment.
    recent: Recent,
    poisoned: Option<String>,
    /// Set while a truncation runs: offsets are about to be reassigned, so appenders wait.
    truncating: bool,
    /// Bumped by every truncation, so that a read that raced one retries.
    epoch: u64,
    /// Records enqueued since open. An appender's ticket is this count after its batch.
    /// Tickets, not offsets, tell an appender that its flush is done: a truncation reuses
    /// offsets, tickets only grow.
    tickets_enqueued: u64,
    /// Records flushed since open (and synced, unless appended unsynced).
    tickets_written: u64,
    /// Spare segment files kept by retention for the next segments, by name
    /// ([`LogConfig::recycle_segments`]); the last is taken first.
    spares: Vec<String>,
    /// A flush, truncation, retention or close is running.
    busy: bool,
    /// Bumped whenever `busy` is released; waiters wake on a change.
    changes: u64,
    /// Tasks waiting for the next change.
    waiters: Vec<Waker>,
}

/// The append-only segmented log of one partition. Owned by one shard; share it between
/// that shard's tasks with `Rc`.
pub struct Log<S: Storage> {
    storage: S,
    config: LogConfig,
    state: RefCell<State<S::File>>,
}

/// Exclusive use of the log's files; releasing it wakes every waiter.
struct Busy<'a, F> {
    state: &'a RefCell<State<F>>,
}

impl<F> Drop for Busy<'_, F> {
    fn drop(&mut self) {
        let mut st = self.state.borrow_mut();
        st.busy = false;
        st.changes += 1;
        for w in st.waiters.drain(..) {
            w.wake();
        }
    }
}

/// Returns `Pending` once (waking itself at once) when its flag is set: a yield to the
/// executor's other ready tasks.
struct YieldOnce(bool);

impl Future for YieldOnce {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if std::mem::take(&mut self.0) {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(())
    }
}

/// Resolves at the first change after `seen`.
struct Changed<'a, F> {
    state: &'a RefCell<State<F>>,
    seen: u64,
}

impl<F> Future for Changed<'_, F> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut st = self.state.borrow_mut();
        if st.changes != self.seen {
            return Poll::Ready(());
        }
        // A task polled again before the change (beside other futures) is not queued
        // twice: each queued waker is a reference to its task.
        if !st.waiters.iter().any(|w| w.will_wake(cx.waker())) {
            st.waiters.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

fn segment_name(base: u64) -> String {
    format!("{base:020}.seg")
}

fn index_name(base: u64) -> String {
    format!("{base:020}.idx")
}

/// The name of a segment kept as a spare: its old base, under another extension.
fn spare_name(base: u64) -> String {
    format!("{base:020}.spare")
}

fn parse_name(name: &str, ext: &str) -> Option<u64> {
    let stem = name.strip_suffix(ext)?;
    (stem.len() == 20 && stem.bytes().all(|b| b.is_ascii_digit()))
        .then(|| stem.parse().ok())
        .flatten()
}

fn not_found_ok(r: io::Result<()>) -> io::Result<()> {
    match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

impl<S: Storage> Log<S> {
    /// Opens the log in `storage`, creating it if empty, and recovers: it verifies the tail
    /// of the active segment, cuts a torn or corrupt tail, rebuilds missing indexes, and
    /// reports what it did.
    pub async fn open(
        storage: S,
        config: LogConfig,
    ) -> Result<(Log<S>, RecoveryReport), OpenError> {
        let mut report = RecoveryReport::default();
        let (segments, spares) = Recovery {
            storage: &storage,
            config: &config,
            report: &mut report,
        }
        .run()
        .await?;
        report.segments = segments.len();
        let first_offset = segments[0].base;
        let next = segments.last().expect("at least one segment").next;
        let log = Log {
            storage,
            config,
            state: RefCell::new(State {
                allocated: segments.last().expect("at least one segment").len,
                segments,
                first_offset,
                written_next: next,
                synced_next: next,
                sync_wanted: false,
                assigned_next: next,
                pending: Vec::new(),
                pending_positions: Vec::new(),
                spare: Vec::new(),
                recent: Recent::default(),
                poisoned: None,
                truncating: false,
                epoch: 0,
                tickets_enqueued: 0,
                tickets_written: 0,
                spares,
                busy: false,
                changes: 0,
                waiters: Vec::new(),
            }),
        };
        Ok((log, report))
    }

    /// The first offset still in the log (retention moves it forward).
    pub fn first_offset(&self) -> u64 {
        self.state.borrow().first_offset
    }

    /// The offset of the last written record; `first_offset() - 1` when the log is empty
    /// (a new log starts at offset 1, so an empty new log answers 0).
    pub fn last_offset(&self) -> u64 {
        self.state.borrow().written_next - 1
    }

    /// The offset after the last written record (durable too, unless appended with
    /// [`Log::append_unsynced`] and not synced since).
    pub fn next_offset(&self) -> u64 {
        self.state.borrow().written_next
    }

    /// Why the log is poisoned, if it is.
    pub fn poisoned(&self) -> Option<String> {
        self.state.borrow().poisoned.clone()
    }

    /// The number of segment files.
    pub fn segment_count(&self) -> usize {
        self.state.borrow().segments.len()
    }

    /// Appends a batch and returns its offsets once every record in it is durable. Batches
    /// of concurrent appenders share one fsync (group commit).
    pub async fn append(&self, batch: &[Entry<'_>]) -> Result<Range<u64>, AppendError> {
        self.append_as(batch, true).await
    }

    /// Appends a batch and returns its offsets once it is written: readable at once, but
    /// durable only after a later fsync (the next [`Log::append`]'s, a seal's, or
    /// [`Log::sync`]'s). A crash before that may take it, and every record after it. For a
    /// log that can be rebuilt after a crash from a durable copy elsewhere: a replica's
    /// event log, whose batches its Raft log holds.
    pub async fn append_unsynced(&self, batch: &[Entry<'_>]) -> Result<Range<u64>, AppendError> {
        self.append_as(batch, false).await
    }

    /// Appends a batch without waiting for its write: returns its offsets once they are
    /// assigned (waiting only while the pending buffer is full, writing it). The records are
    /// readable once [`Log::written`] reaches past them, and durable after a later fsync,
    /// as with [`Log::append_unsynced`]. Whoever waits with [`Log::written`] (or appends,
    /// or syncs) writes them; nothing writes them otherwise.
    pub async fn enqueue_unsynced(&self, batch: &[Entry<'_>]) -> Result<Range<u64>, AppendError> {
        let bytes = self.encoded_len(batch)?;
        loop {
            if let Some((range, _)) = self.try_enqueue(batch, bytes)? {
                return Ok(range);
            }
            self.flush_or_wait().await;
        }
    }

    /// The offset after the last record appended, written or still pending: where the next
    /// append goes ([`Log::next_offset`] is the end of what is written).
    pub fn appended_next(&self) -> u64 {
        self.state.borrow().assigned_next
    }

    /// Completes once every record before `end` (or before the log's end, if a truncation
    /// moved it below) is written and readable, writing what is pending if no flush runs.
    /// Syncs nothing of its own.
    pub async fn written(&self, end: u64) -> Result<(), AppendError> {
        loop {
            {
                let st = self.state.borrow();
                if let Some(why) = &st.poisoned {
                    return Err(AppendError::Poisoned(why.clone()));
                }
                if st.written_next >= end.min(st.assigned_next) {
                    return Ok(());
                }
            }
            self.flush_or_wait().await;
        }
    }

    /// Makes every record written or pending durable: at most one fsync, shared with any
    /// flush that runs meanwhile. Returns at once when nothing needs it.
    pub async fn sync(&self) -> Result<(), AppendError> {
        let target = self.state.borrow().assigned_next;
        loop {
            {
                let mut st = self.state.borrow_mut();
                if let Some(why) = &st.poisoned {
                    return Err(AppendError::Poisoned(why.clone()));
                }
                // A truncation may have moved the end below the target: what is there.
                if st.synced_next >= target.min(st.assigned_next) {
                    return Ok(());
                }
                st.sync_wanted = true;
            }
            match self.try_busy() {
                Ok(_busy) => {
                    if self.state.borrow().pending.is_empty() {
                        self.sync_written().await;
                    } else {
                        self.flush_locked().await;
                    }
                }
                Err(seen) => self.changed(seen).await,
            }
        }
    }

    /// Fsyncs the active segment, whose records are all written. The caller holds [`Busy`].
    async fn sync_written(&self) {
        let (file, next) = {
            let st = self.state.borrow();
            let active = st.segments.last().expect("active segment");
            (
                active.file.clone().expect("active file is open"),
                st.written_next,
            )
        };
        if let Err(e) = file.sync_data().await {
            return self.poison("fdatasync", &e);
        }
        let mut st = self.state.borrow_mut();
        st.synced_next = st.synced_next.max(next);
        st.sync_wanted = false;
    }

    async fn append_as(&self, batch: &[Entry<'_>], sync: bool) -> Result<Range<u64>, AppendError> {
        let bytes = self.encoded_len(batch)?;
        let (range, ticket) = loop {
            if let Some(enqueued) = self.try_enqueue(batch, bytes)? {
                if sync {
                    self.state.borrow_mut().sync_wanted = true;
                }
                break enqueued;
            }
            self.flush_or_wait().await;
        };
        loop {
            if let Some(result) = self.append_outcome(&range, ticket) {
                return result;
            }
            self.flush_or_wait().await;
        }
    }

    /// The bytes `batch` takes encoded; refused if a record is over the limit.
    fn encoded_len(&self, batch: &[Entry<'_>]) -> Result<usize, AppendError> {
        let max = self.config.record_bytes_max;
        if let Some(e) = batch.iter().find(|e| e.payload.len() > max) {
            return Err(AppendError::RecordTooLarge {
                len: e.payload.len(),
                max,
            });
        }
        Ok(batch
            .iter()
            .map(|e| e.payload.len() + format::RECORD_HEADER_BYTES)
            .sum())
    }

    /// Flushes what is pending if nothing else runs; otherwise waits for the running
    /// operation to end.
    async fn flush_or_wait(&self) {
        match self.try_busy() {
            Ok(_busy) => self.flush_locked().await,
            Err(seen) => self.changed(seen).await,
        }
    }

    /// Takes exclusive use of the files, or returns the change count to wait past.
    fn try_busy(&self) -> Result<Busy<'_, S::File>, u64> {
        let mut st = self.state.borrow_mut();
        if st.busy {
            return Err(st.changes);
        }
        st.busy = true;
        Ok(Busy { state: &self.state })
    }

    /// Waits until exclusive use of the files is free, and takes it.
    async fn busy(&self) -> Busy<'_, S::File> {
        loop {
            match self.try_busy() {
                Ok(b) => return b,
                Err(seen) => self.changed(seen).await,
            }
        }
    }

    fn changed(&self, seen: u64) -> Changed<'_, S::File> {
        Changed {
            state: &self.state,
            seen,
        }
    }

    /// Encodes a batch into the pending buffer if it fits; `None` if a flush must come first.
    fn try_enqueue(
        &self,
        batch: &[Entry<'_>],
        bytes: usize,
    ) -> Result<Option<(Range<u64>, u64)>, AppendError> {
        let mut st = self.state.borrow_mut();
        if let Some(why) = &st.poisoned {
            return Err(AppendError::Poisoned(why.clone()));
        }
        let full =
            !st.pending.is_empty() && st.pending.len() + bytes > self.config.pending_bytes_max;
        if full || st.truncating {
            return Ok(None);
        }
        let first = st.assigned_next;
        for (i, e) in batch.iter().enumerate() {
            let at = st.pending.len() as u32;
            st.pending_positions.push(at);
            format::encode_record(&mut st.pending, first + i as u64, e.timestamp_us, e.payload);
        }
        st.assigned_next += batch.len() as u64;
        st.tickets_enqueued += batch.len() as u64;
        Ok(Some((first..st.assigned_next, st.tickets_enqueued)))
    }

    fn append_outcome(
        &self,
        range: &Range<u64>,
        ticket: u64,
    ) -> Option<Result<Range<u64>, AppendError>> {
        let st = self.state.borrow();
        if st.tickets_written >= ticket {
            Some(Ok(range.clone()))
        } else {
            st.poisoned
                .as_ref()
                .map(|why| Err(AppendError::Poisoned(why.clone())))
        }
    }

    /// Writes everything pending, and fsyncs it if a synced append or [`Log::sync`] wants
    /// that. The caller holds [`Busy`]. Failures poison the log; the waiting appenders see
    /// that when they wake.
    async fn flush_locked(&self) {
        if self.state.borrow().pending.is_empty() {
            return;
        }
        // Let the appenders that the last flush woke run first: they append again at once,
        // and this flush takes them too instead of leaving them for the next fsync.
        YieldOnce(true).await;
        let (mut batch, positions, next, ticket, needs_roll, sync) = {
            let mut st = self.state.borrow_mut();
            if st.poisoned.is_some() || st.pending.is_empty() {
                return;
            }
            let sync = std::mem::take(&mut st.sync_wanted);
            let spare = std::mem::take(&mut st.spare);
            let batch = std::mem::replace(&mut st.pending, spare);
            let positions = std::mem::take(&mut st.pending_positions);
            let active = st.segments.last().expect("active segment");
            let needs_roll = active.len > SEGMENT_HEADER_BYTES as u64
                && active.len + batch.len() as u64 > self.config.segment_bytes_max;
            (
                batch,
                positions,
                st.assigned_next,
                st.tickets_enqueued,
                needs_roll,
                sync,
            )
        };
        if needs_roll {
            if let Err(e) = self.roll().await {
                return self.poison("segment rollover", &e);
            }
        }
        let (file, pos, allocated) = {
            let st = self.state.borrow();
            let active = st.segments.last().expect("active segment");
            (
                active.file.clone().expect("active file is open"),
                active.len,
                st.allocated.max(active.len),
            )
        };
        let end = pos + batch.len() as u64;
        if self.config.preallocate_bytes > 0 && end > allocated {
            // Grow the file by whole blocks of zeros past this batch, before the batch is
            // written over their start; one fdatasync below covers both.
            let ahead = (end + self.config.preallocate_bytes)
                .min(self.config.segment_bytes_max.max(end))
                .next_multiple_of(PREALLOCATE_ALIGN);
            let zeros = vec![0u8; (ahead - allocated) as usize];
            if let Err(e) = file.write_at(allocated, &zeros).await {
                return self.poison("preallocation", &e);
            }
            self.state.borrow_mut().allocated = ahead;
        }
        if let Err(e) = file.write_at(pos, &batch).await {
            return self.poison("write", &e);
        }
        if sync {
            if let Err(e) = file.sync_data().await {
                return self.poison("fdatasync", &e);
            }
        }
        let mut st = self.state.borrow_mut();
        if sync {
            st.synced_next = next;
        }
        let first = st.written_next;
        let base = st.segments.last().expect("active segment").base;
        if self.config.recent_bytes > 0 {
            st.recent.wrote(base, pos, &batch, self.config.recent_bytes);
        }
        let active = st.segments.last_mut().expect("active segment");
        for (i, at) in positions.iter().enumerate() {
            active.index.observe(first + i as u64, pos + *at as u64);
        }
        active.len += batch.len() as u64;
        active.next = next;
        st.written_next = next;
        st.tickets_written = ticket;
        // Keep the buffer's capacity for the next batch: no allocation per flush.
        batch.clear();
        if batch.capacity() <= self.config.pending_bytes_max.saturating_mul(2) {
            st.spare = batch;
        }
    }

    fn poison(&self, what: &str, e: &io::Error) {
        let mut st = self.state.borrow_mut();
        if st.poisoned.is_none() {
            st.poisoned = Some(format!("{what} failed: {e}"));
        }
    }

    /// Cuts the active segment to its records (the storage's block padding and any zeros
    /// written ahead go) and writes its index, as a sealed segment has: for a seal, and for
    /// a clean close.
    async fn index_active(
        &self,
        file: &S::File,
        len: u64,
        base: u64,
        next: u64,
        index: SparseIndex,
    ) -> io::Result<()> {
        // A sealed segment is exactly its records, so its index can be checked against
        // its length.
        file.truncate(len).await?;
        file.sync_data().await?;
        let idx = IndexFile {
            base_offset: base,
            next_offset: next,
            segment_len: len,
            index,
        };
        write_index(&self.storage, &idx).await
    }

    /// Seals the active segment and starts a new one at the next offset to flush.
    async fn roll(&self) -> io::Result<()> {
        let (file, len, base, next, index) = {
            let st = self.state.borrow();
            let a = st.segments.last().expect("active segment");
            let file = a.file.clone().expect("active file is open");
            (file, a.len, a.base, a.next, a.index.clone())
        };
        self.index_active(&file, len, base, next, index).await?;
        let spare = self.state.borrow_mut().spares.pop();
        let (new_file, allocated) = match spare {
            Some(name) => reuse_spare(&self.storage, &name, next).await?,
            None => (
                create_segment(&self.storage, next).await?,
                SEGMENT_HEADER_BYTES as u64,
            ),
        };
        let map = file.map()?;
        let mut st = self.state.borrow_mut();
        let sealed = st.segments.last_mut().expect("active segment");
        sealed.map = Some(map);
        sealed.file = None;
        // The seal fsynced every record before the new segment.
        st.synced_next = st.synced_next.max(next);
        st.allocated = allocated;
        st.segments
            .push(Segment::empty(next, new_file, &self.config));
        Ok(())
    }

    /// Reads written records from `from`, stopping once `max_bytes` of payload are
    /// gathered; the first record is returned even if it alone is larger. Reading at or past
    /// the end returns nothing.
    pub async fn read(&self, from: u64, max_bytes: usize) -> Result<Vec<Record>, ReadError> {
        loop {
            let epoch = self.state.borrow().epoch;
            let result = self.read_once(from, max_bytes).await;
            if self.state.borrow().epoch == epoch {
                return result;
            }
        }
    }

    async fn read_once(&self, from: u64, max_bytes: usize) -> Result<Vec<Record>, ReadError> {
        let (first, end) = {
            let st = self.state.borrow();
            (st.first_offset, st.written_next)
        };
        if from < first {
            return Err(ReadError::Deleted {
                offset: from,
                first,
            });
        }
        let mut out = Vec::new();
        let mut used = 0usize;
        let mut offset = from;
        while offset < end && (out.is_empty() || used < max_bytes) {
            let before = out.len();
            self.read_segment(offset, end, max_bytes, &mut out, &mut used)
                .await?;
            if out.len() == before {
                break;
            }
            offset = out.last().map(|r: &Record| r.offset + 1).unwrap_or(offset);
        }
        Ok(out)
    }

    /// Reads records from the segment holding `offset`, up to `end` and the byte budget.
    async fn read_segment(
        &self,
        offset: u64,
        end: u64,
        max_bytes: usize,
        out: &mut Vec<Record>,
        used: &mut usize,
    ) -> Result<(), ReadError> {
        let (source, base, seg_next, seg_len, start) = self.segment_source(offset).await?;
        let stop = seg_next.min(end);
        let mut pos = start.position;
        let mut expect = start.offset;
        let mut buf = Bytes::new();
        let mut buf_pos = pos;
        let chunk = self
            .config
            .read_chunk_bytes
            .max(max_bytes.saturating_add(4096));
        while expect < stop && (out.is_empty() || *used < max_bytes) {
            let rel = (pos - buf_pos) as usize;
            let decoded = if rel <= buf.len() {
                format::decode_record(&buf[rel..])
            } else {
                Decoded::End
            };
            let corrupt_err = |reason| ReadError::Corrupt {
                offset: expect,
                segment_base: base,
                position: pos,
                reason,
            };
            match decoded {
                Decoded::Record(r) if r.offset == expect => {
                    if expect >= offset {
                        out.push(Record {
                            offset: r.offset,
                            timestamp_us: r.timestamp_us,
                            payload: Bytes::copy_from_slice(r.payload),
                        });
                        *used += r.payload.len();
                    }
                    pos += r.encoded_len() as u64;
                    expect += 1;
                }
                Decoded::Record(r) => return Err(corrupt_err(CorruptReason::Offset(r.offset))),
                Decoded::Invalid(format::RecordError::Truncated { needed, .. })
                    if pos + needed as u64 <= seg_len && buf_pos + (buf.len() as u64) < seg_len =>
                {
                    let want = needed.max(chunk).min((seg_len - pos) as usize);
                    buf = self.fetch(&source, base, pos, want).await?;
                    buf_pos = pos;
                }
                Decoded::End if buf_pos + (buf.len() as u64) < seg_len && pos < seg_len => {
                    let want = chunk.min((seg_len - pos) as usize);
                    buf = self.fetch(&source, base, pos, want).await?;
                    buf_pos = pos;
                }
                Decoded::Invalid(e) => return Err(corrupt_err(CorruptReason::Record(e))),
                Decoded::End => return Err(corrupt_err(CorruptReason::EarlyEnd)),
            }
        }
        Ok(())
    }

    /// Bytes `[pos, pos + len)` of the segment at `base`, from memory when they are among
    /// the newest written (then possibly fewer: up to the end of what was written), else
    /// from `source`.
    async fn fetch(
        &self,
        source: &Source<S::File>,
        base: u64,
        pos: u64,
        len: usize,
    ) -> io::Result<Bytes> {
        if let Some(bytes) = self.state.borrow().recent.get(base, pos, len) {
            return Ok(bytes);
        }
        source.fetch(pos, len).await
    }

    /// Where to read the segment holding `offset` from, and the index entry to start at.
    ///
    /// A sealed segment is read through its map. No read holds a map across an await, so
    /// a truncation (which drops the map before cutting the file) never leaves a reader on
    /// unmapped pages.
    async fn segment_source(
        &self,
        offset: u64,
    ) -> Result<(Source<S::File>, u64, u64, u64, Start), ReadError> {
        let (i, base, next, len, start, source) = {
            let st = self.state.borrow();
            let i = st
                .segments
                .partition_point(|s| s.base <= offset)
                .saturating_sub(1);
            let s = &st.segments[i];
            let start = s
                .index
                .lookup(offset)
                .map(|e| Start {
                    offset: e.offset,
                    position: e.position,
                })
                .unwrap_or(Start {
                    offset: s.base,
                    position: SEGMENT_HEADER_BYTES as u64,
                });
            let source = if i + 1 == st.segments.len() {
                Some(Source::File(s.file.clone().expect("active file is open")))
            } else {
                s.map.clone().map(Source::Mapped)
            };
            (i, s.base, s.next, s.len, start, source)
        };
        let source = match source {
            Some(source) => source,
            None => {
                let f = self.storage.open(&segment_name(base)).await?;
                let map = f.map()?;
                f.close().await?;
                let mut st = self.state.borrow_mut();
                if let Some(s) = st.segments.get_mut(i).filter(|s| s.base == base) {
                    s.map = Some(map.clone());
                }
                Source::Mapped(map)
            }
        };
        Ok((source, base, next, len, start))
    }

    /// Removes every record after `offset`, durably, as Raft does with an uncommitted tail.
    /// Pending appends are flushed first. `truncate_after(first_offset() - 1)` empties the
    /// log; an offset at or past the end changes nothing.
    pub async fn truncate_after(&self, offset: u64) -> Result<(), TruncateError> {
        let _busy = self.busy().await;
        self.flush_locked().await;
        let (first, next) = {
            let st = self.state.borrow();
            if let Some(why) = &st.poisoned {
                return Err(TruncateError::Poisoned(why.clone()));
            }
            (st.first_offset, st.written_next)
        };
        if offset + 1 >= next {
            return Ok(());
        }
        if offset + 1 < first {
            return Err(TruncateError::BeforeStart { offset, first });
        }
        let cut = offset + 1;
        let position = self.locate(cut).await?;
        self.state.borrow_mut().truncating = true;
        let result = self.truncate_locked(cut, position).await;
        self.state.borrow_mut().truncating = false;
        if let Err(e) = &result {
            self.poison("truncate", e);
        }
        result.map_err(TruncateError::Io)
    }

    /// The byte position of record `offset` in its segment.
    async fn locate(&self, offset: u64) -> Result<u64, ReadError> {
        let (source, base, _, len, start) = self.segment_source(offset).await?;
        let bytes = source
            .fetch(start.position, (len - start.position) as usize)
            .await?;
        let mut found = None;
        let scan = format::scan(&bytes, start.offset, |pos, r| {
            if r.offset == offset {
                found = Some(start.position + pos as u64);
            }
        });
        found.ok_or(ReadError::Corrupt {
            offset,
            segment_base: base,
            position: start.position + scan.end as u64,
            reason: CorruptReason::EarlyEnd,
        })
    }

    async fn truncate_locked(&self, cut: u64, position: u64) -> io::Result<()> {
        let (k, base, later) = {
            let st = self.state.borrow();
            let k = st.segments.partition_point(|s| s.base <= cut) - 1;
            let later: Vec<u64> = st.segments[k + 1..].iter().map(|s| s.base).collect();
            (k, st.segments[k].base, later)
        };
        // The index of the kept segment goes first: a crash from here on must not find an
        // index that describes records which are gone.
        not_found_ok(self.storage.remove(&index_name(base)).await)?;
        let open = self.state.borrow().segments[k].file.clone();
        let file = match open {
            Some(f) => f,
            None => Rc::new(self.storage.open(&segment_name(base)).await?),
        };
        file.truncate(position).await?;
        file.sync_data().await?;
        for b in later.iter().rev() {
            self.storage.remove(&segment_name(*b)).await?;
            not_found_ok(self.storage.remove(&index_name(*b)).await)?;
        }
        self.storage.sync_dir().await?;
        let mut st = self.state.borrow_mut();
        st.recent.cut(base, position);
        st.segments.truncate(k + 1);
        let s = &mut st.segments[k];
        s.next = cut;
        s.len = position;
        s.index.truncate_from(cut);
        s.map = None;
        s.file = Some(file);
        st.written_next = cut;
        st.synced_next = cut;
        st.assigned_next = cut;
        st.allocated = position;
        st.epoch += 1;
        Ok(())
    }

    /// Retention: removes every sealed segment whose records all lie before `offset`, and
    /// returns the new first offset. Whole segments only: records before `offset` may remain.
    pub async fn delete_before(&self, offset: u64) -> Result<u64, TruncateError> {
        let _busy = self.busy().await;
        let doomed: Vec<u64> = {
            let st = self.state.borrow();
            if let Some(why) = &st.poisoned {
                return Err(TruncateError::Poisoned(why.clone()));
            }
            let sealed = &st.segments[..st.segments.len() - 1];
            sealed
                .iter()
                .filter(|s| s.next <= offset)
                .map(|s| s.base)
                .collect()
        };
        if doomed.is_empty() {
            return Ok(self.first_offset());
        }
        let result = self.retire_segments(&doomed).await;
        if let Err(e) = &result {
            self.poison("delete", e);
            return Err(TruncateError::Io(result.unwrap_err()));
        }
        let mut st = self.state.borrow_mut();
        // A spare's blocks are written again by the segment that takes it: a read that
        // raced this one tries again (and finds its offsets deleted).
        st.epoch += 1;
        st.segments.drain(..doomed.len());
        st.first_offset = st.segments[0].base;
        Ok(st.first_offset)
    }

    /// Empties the log and makes `next` the offset of the next record, durably: what a
    /// Raft follower does when it installs a snapshot that replaces its whole log. Pending
    /// appends are flushed first (and then removed with the rest).
    ///
    /// Crash safety: the old segments are removed newest first, then a new segment is
    /// created at `next`. A crash part-way leaves a prefix of the old log, or an empty log,
    /// or the new one: never a log with a hole, and never old records at the new offsets.
    /// The caller, which knows where the log should start, calls this again on reopening.
    pub async fn restart_at(&self, next: u64) -> Result<(), TruncateError> {
        let _busy = self.busy().await;
        self.flush_locked().await;
        if let Some(why) = &self.state.borrow().poisoned {
            return Err(TruncateError::Poisoned(why.clone()));
        }
        self.state.borrow_mut().truncating = true;
        let result = self.restart_locked(next).await;
        self.state.borrow_mut().truncating = false;
        if let Err(e) = &result {
            self.poison("restart", e);
        }
        result.map_err(TruncateError::Io)
    }

    async fn restart_locked(&self, next: u64) -> io::Result<()> {
        let bases: Vec<u64> = self
            .state
            .borrow()
            .segments
            .iter()
            .map(|s| s.base)
            .collect();
        for b in bases.iter().rev() {
            self.storage.remove(&segment_name(*b)).await?;
            not_found_ok(self.storage.remove(&index_name(*b)).await)?;
        }
        self.storage.sync_dir().await?;
        let file = create_segment(&self.storage, next).await?;
        let mut st = self.state.borrow_mut();
        st.segments.clear();
        st.segments.push(Segment::empty(next, file, &self.config));
        st.recent = Recent::default();
        st.first_offset = next;
        st.written_next = next;
        st.synced_next = next;
        st.assigned_next = next;
        st.allocated = SEGMENT_HEADER_BYTES as u64;
        st.epoch += 1;
        Ok(())
    }

    /// Retention's removal of the sealed segments at `bases`: each is kept as a spare
    /// while fewer than [`LogConfig::recycle_segments`] are kept, else deleted.
    async fn retire_segments(&self, bases: &[u64]) -> io::Result<()> {
        // Oldest first: a crash part-way leaves a log that starts later, never one with a
        // hole in the middle.
        for b in bases {
            let spare = spare_name(*b);
            let keep = {
                let spares = &self.state.borrow().spares;
                // A base seen again (after a truncation) must not name two spares.
                spares.len() < self.config.recycle_segments && !spares.contains(&spare)
            };
            if keep {
                self.storage.rename(&segment_name(*b), &spare).await?;
                self.state.borrow_mut().spares.push(spare);
            } else {
                self.storage.remove(&segment_name(*b)).await?;
            }
            not_found_ok(self.storage.remove(&index_name(*b)).await)?;
        }
        self.storage.sync_dir().await
    }

    /// Flushes what is pending and closes the files. A log that is not poisoned also
    /// writes the active segment's index, as a seal does, so that the next open can trust
    /// it instead of reading and checking the whole active segment (see `activate`).
    pub async fn close(self) -> io::Result<()> {
        {
            let _busy = self.busy().await;
            self.flush_locked().await;
        }
        let active = {
            let st = self.state.borrow();
            let a = st.segments.last().expect("active segment");
            match (&st.poisoned, &a.file) {
                (None, Some(file)) => Some((file.clone(), a.len, a.base, a.next, a.index.clone())),
                _ => None,
            }
        };
        if let Some((file, len, base, next, index)) = active {
            self.index_active(&file, len, base, next, index).await?;
            self.storage.sync_dir().await?;
        }
        let st = self.state.into_inner();
        for s in st.segments {
            if let Some(f) = s.file.and_then(|f| Rc::try_unwrap(f).ok()) {
                f.close().await?;
            }
        }
        Ok(())
    }
}

/// The newest written bytes of one segment: `bytes` are its bytes from position `pos`, up
/// to its end when they were last appended to. Only the active segment is appended to, so
/// they stay right for a segment just sealed, until the new one's first write replaces
/// them; a truncation cuts them with the segment.
#[derive(Default)]
struct Recent {
    /// The base offset of the segment they belong to.
    base: u64,
    pos: u64,
    bytes: Vec<u8>,
}

impl Recent {
    fn end(&self) -> u64 {
        self.pos + self.bytes.len() as u64
    }

    /// Takes `data`, just written at `pos` of the segment at `base`, keeping the newest
    /// `keep` to `2 * keep` bytes: trimming only past twice the bound moves each byte at
    /// most once.
    fn wrote(&mut self, base: u64, pos: u64, data: &[u8], keep: usize) {
        if self.base != base || self.end() != pos {
            self.base = base;
            self.pos = pos;
            self.bytes.clear();
        }
        self.bytes.extend_from_slice(data);
        if self.bytes.len() > 2 * keep {
            let cut = self.bytes.len() - keep;
            self.bytes.drain(..cut);
            self.pos += cut as u64;
        }
    }

    /// The segment at `base` now ends at `len`; later segments are gone.
    fn cut(&mut self, base: u64, len: u64) {
        if self.base < base {
            return;
        }
        if self.base > base || len <= self.pos {
            *self = Recent {
                base,
                pos: len,
                bytes: Vec::new(),
            };
        } else {
            self.bytes.truncate((len - self.pos) as usize);
        }
    }

    /// Up to `len` bytes from `pos` of the segment at `base`, if `pos` is held.
    fn get(&self, base: u64, pos: u64, len: usize) -> Option<Bytes> {
        if self.base != base || pos < self.pos || pos >= self.end() {
            return None;
        }
        let from = (pos - self.pos) as usize;
        let to = from.saturating_add(len).min(self.bytes.len());
        Some(Bytes::copy_from_slice(&self.bytes[from..to]))
    }
}

#[derive(Clone, Copy, Debug)]
struct Start {
    offset: u64,
    position: u64,
}

/// Where a segment's bytes come from: its map when sealed, its file when active.
enum Source<F> {
    Mapped(Bytes),
    File(Rc<F>),
}

impl<F: StorageFile> Source<F> {
    async fn fetch(&self, pos: u64, len: usize) -> io::Result<Bytes> {
        match self {
            Source::Mapped(m) => {
                let from = (pos as usize).min(m.len());
                let to = from.saturating_add(len).min(m.len());
                Ok(m.slice(from..to))
            }
            Source::File(f) => Ok(Bytes::from(f.read_at(pos, len).await?)),
        }
    }
}

async fn create_segment<S: Storage>(storage: &S, base: u64) -> io::Result<S::File> {
    let name = segment_name(base);
    let file = storage.create(&name).await?;
    write_header(&file, base).await?;
    storage.sync_dir().await?;
    Ok(file)
}

/// Writes the header of the segment at `base` into `file`, durably.
async fn write_header<F: StorageFile>(file: &F, base: u64) -> io::Result<()> {
    file.write_at(0, &SegmentHeader { base_offset: base }.encode())
        .await?;
    file.sync_data().await
}

/// Makes the spare `name` the segment at `base`: its header first, durably, under the
/// spare's name (so that the name a crash leaves holds either an old spare or a new,
/// empty segment: its first old record's offset is below `base`), then the rename. Returns
/// the file and its length: blocks already written, where no zeros need to go.
async fn reuse_spare<S: Storage>(storage: &S, name: &str, base: u64) -> io::Result<(S::File, u64)> {
    let file = storage.open(name).await?;
    write_header(&file, base).await?;
    storage.rename(name, &segment_name(base)).await?;
    storage.sync_dir().await?;
    let len = file.len().await?.max(SEGMENT_HEADER_BYTES as u64);
    Ok((file, len))
}

/// Writes an index file through a temporary name and a rename; the caller syncs the
/// directory.
async fn write_index<S: Storage>(storage: &S, idx: &IndexFile) -> io::Result<()> {
    let name = index_name(idx.base_offset);
    let tmp = format!("{name}.tmp");
    not_found_ok(storage.remove(&tmp).await)?;
    let f = storage.create(&tmp).await?;
    let bytes = idx.encode();
    f.write_at(0, &bytes).await?;
    f.truncate(bytes.len() as u64).await?;
    f.sync_data().await?;
    f.close().await?;
    storage.rename(&tmp, &name).await
}

/// The recovery procedure of [`Log::open`].
struct Recovery<'a, S: Storage> {
    storage: &'a S,
    config: &'a LogConfig,
    report: &'a mut RecoveryReport,
}

impl<S: Storage> Recovery<'_, S> {
    /// The segments, and the spares kept ([`LogConfig::recycle_segments`]), oldest first.
    async fn run(mut self) -> Result<(Vec<Segment<S::File>>, Vec<String>), OpenError> {
        let mut bases = Vec::new();
        let mut spares = Vec::new();
        for name in self.storage.list().await? {
            if name.ends_with(".tmp") {
                self.storage.remove(&name).await?;
            } else if let Some(b) = parse_name(&name, ".seg") {
                bases.push(b);
            } else if let Some(b) = parse_name(&name, ".spare") {
                spares.push(b);
            }
        }
        spares.sort_unstable();
        // More than are wanted (the setting was lowered): the rest go.
        let extra = spares.len().saturating_sub(self.config.recycle_segments);
        for b in spares.drain(..extra) {
            self.storage.remove(&spare_name(b)).await?;
        }
        let spares = spares.into_iter().map(spare_name).collect();
        bases.sort_unstable();
        let mut segments: Vec<Segment<S::File>> = Vec::new();
        let mut i = 0;
        while i < bases.len() {
            let base = bases[i];
            let Some(seg) = self.load(base, bases.get(i + 1).copied()).await? else {
                // A segment whose header never became durable holds nothing acknowledged.
                self.remove_segment(base).await?;
                bases.remove(i);
                continue;
            };
            if let Some(prev) = segments.last() {
                if seg.base < prev.next {
                    return Err(OpenError::Overlap {
                        name: segment_name(seg.base),
                        prev_next: prev.next,
                    });
                }
                if seg.base > prev.next {
                    // An interrupted truncation: the earlier segment was cut, the later
                    // ones were not yet removed. They hold nothing that was kept.
                    for b in bases.drain(i..) {
                        self.remove_segment(b).await?;
                    }
                    break;
                }
            }
            segments.push(seg);
            i += 1;
        }
        self.storage.sync_dir().await?;
        Ok((self.finish(segments).await?, spares))
    }

    async fn remove_segment(&mut self, base: u64) -> io::Result<()> {
        self.storage.remove(&segment_name(base)).await?;
        not_found_ok(self.storage.remove(&index_name(base)).await)?;
        self.report.removed_segments.push(base);
        Ok(())
    }

    /// Makes the last segment the active one (recovering its tail), or creates the first.
    async fn finish(
        mut self,
        mut segments: Vec<Segment<S::File>>,
    ) -> Result<Vec<Segment<S::File>>, OpenError> {
        match segments.pop() {
            None => {
                let file = create_segment(self.storage, 1).await?;
                segments.push(self.empty_segment(1, file));
            }
            Some(last) => {
                let active = self.activate(last).await?;
                segments.push(active);
            }
        }
        Ok(segments)
    }

    fn empty_segment(&self, base: u64, file: S::File) -> Segment<S::File> {
        Segment::empty(base, file, self.config)
    }

    /// Loads a segment's header and, for a sealed one, its index (or a scan). `None` if it
    /// is the last segment and its header was never written. `next_base` is the base of the
    /// segment after it, for a sealed one.
    async fn load(
        &mut self,
        base: u64,
        next_base: Option<u64>,
    ) -> Result<Option<Segment<S::File>>, OpenError> {
        let name = segment_name(base);
        let file = self.storage.open(&name).await?;
        let file_len = file.len().await?;
        let head = file.read_at(0, SEGMENT_HEADER_BYTES).await?;
        if next_base.is_none() && head.iter().all(|&b| b == 0) {
            file.close().await?;
            return Ok(None);
        }
        let header = SegmentHeader::decode(&head).map_err(|source| OpenError::SegmentHeader {
            name: name.clone(),
            source,
        })?;
        if header.base_offset != base {
            return Err(OpenError::SegmentBase {
                name,
                found: header.base_offset,
            });
        }
        let Some(next_base) = next_base else {
            // The active segment is scanned in full by `activate`.
            return Ok(Some(self.empty_segment(base, file)));
        };
        if let Some(idx) = self.read_index(base, file_len).await? {
            file.close().await?;
            return Ok(Some(Segment {
                base,
                next: idx.next_offset,
                len: file_len,
                index: idx.index,
                file: None,
                map: None,
            }));
        }
        let map = file.map()?;
        file.close().await?;
        let (index, scan) = self.scan(base, &map);
        let end = SEGMENT_HEADER_BYTES as u64 + scan.end as u64;
        self.report.rebuilt_indexes.push(base);
        let mut seg = Segment {
            base,
            next: scan.next_offset,
            len: end,
            index,
            file: None,
            map: Some(map),
        };
        if scan.stop != ScanEnd::Clean {
            // The offsets up to the next segment exist but cannot be read. Readers get an
            // error for them rather than a silent hole; everything before stays readable.
            self.report.corrupt_segments.push(CorruptSegment {
                segment_base: base,
                offset: scan.next_offset,
                position: end,
            });
            seg.next = next_base.max(scan.next_offset);
            seg.len = file_len;
        } else if end == file_len {
            let idx = IndexFile {
                base_offset: base,
                next_offset: seg.next,
                segment_len: file_len,
                index: seg.index.clone(),
            };
            write_index(self.storage, &idx).await?;
        }
        Ok(Some(seg))
    }

    async fn read_index(&self, base: u64, segment_len: u64) -> io::Result<Option<IndexFile>> {
        let f = match self.storage.open(&index_name(base)).await {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let len = f.len().await?;
        let bytes = f.read_at(0, len as usize).await?;
        f.close().await?;
        Ok(IndexFile::decode(&bytes, self.config.index_interval_bytes)
            .filter(|idx| idx.base_offset == base && idx.segment_len == segment_len))
    }

    fn scan(&self, base: u64, bytes: &[u8]) -> (SparseIndex, format::Scan) {
        let mut index = SparseIndex::new(self.config.index_interval_bytes);
        let body = bytes.get(SEGMENT_HEADER_BYTES..).unwrap_or(&[]);
        let scan = format::scan(body, base, |pos, r| {
            index.observe(r.offset, (SEGMENT_HEADER_BYTES + pos) as u64)
        });
        (index, scan)
    }

    /// Scans the last segment, cuts a torn or corrupt tail (and zero padding) durably, and
    /// leaves it open for appends.
    async fn activate(&mut self, mut seg: Segment<S::File>) -> Result<Segment<S::File>, OpenError> {
        let file = match seg.file.take() {
            Some(f) => f,
            None => Rc::new(self.storage.open(&segment_name(seg.base)).await?),
        };
        let file_len = file.len().await?;
        if let Some(idx) = self.read_index(seg.base, file_len).await? {
            // Written by a clean close, and the segment has not changed since: trust it
            // as a sealed segment's index is trusted (every record is still checked when
            // read). It goes, durably, before anything is appended, so that it can never
            // describe a segment that has grown or been cut since.
            self.storage.remove(&index_name(seg.base)).await?;
            self.storage.sync_dir().await?;
            self.report.active_index_used = true;
            seg.next = idx.next_offset;
            seg.len = file_len;
            seg.index = idx.index;
            seg.map = None;
            seg.file = Some(file);
            return Ok(seg);
        }
        not_found_ok(self.storage.remove(&index_name(seg.base)).await)?;
        let bytes = file.read_at(0, file_len as usize).await?;
        let (index, scan) = self.scan(seg.base, &bytes);
        let end = SEGMENT_HEADER_BYTES as u64 + scan.end as u64;
        if end < file_len {
            let tail = &bytes[end as usize..];
            if scan.stop != ScanEnd::Clean || tail.iter().any(|&b| b != 0) {
                self.report.torn_tail = Some(TornTail {
                    segment_base: seg.base,
                    position: end,
                    offset: scan.next_offset,
                    reason: scan.stop,
                });
            }
            self.report.tail_bytes_cut = file_len - end;
            file.truncate(end).await?;
            file.sync_data().await?;
        }
        seg.next = scan.next_offset;
        seg.len = end;
        seg.index = index;
        seg.map = None;
        seg.file = Some(file);
        Ok(seg)
    }
}
