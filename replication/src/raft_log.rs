//! The durable Raft log of one group: its entries in its shard's [`Journal`] (shared with
//! the shard's other groups, for one fsync per round between them), the rest of its state
//! in a [`StateFile`], and the latest snapshot's data in that state when it is small
//! ([`crate::state::INLINE_SNAPSHOT_BYTES`]), in a file of its own when it is not. It is
//! the `Storage` a raft-rs `RawNode` reads, and what its `Ready` loop persists into.
//!
//! Layout. The state directory holds `raft.state` and, for a large snapshot,
//! `snap-<index>` (its data). The entries are the group's records in the journal; opening
//! takes the run the journal recovered for the group.
//!
//! A compaction with a small snapshot is one state write: no file created, synced,
//! renamed and removed, no directory synced (a cluster node compacts each of its groups
//! every thousand entries).
//!
//! Invariants:
//! - **Entries before state.** A `Ready`'s entries are durable before its hard state is
//!   written, so a commit index on disk never points past the log on disk.
//! - **Snapshot before its mention.** A snapshot's data is durable before the state names
//!   its index: in the same slot write when inline, or as a file written, synced, renamed
//!   and its directory synced before; the entries are let go (a reset in the journal, or a
//!   pin moved past them), and the previous snapshot's file removed, only after that.
//! - **The term covers the log.** On open, a term below the last entry's (a crash came
//!   between a `Ready`'s entries and its hard state) is raised to it, with no vote.
//! - **The log continues the snapshot.** On open, entries that do not continue the
//!   snapshot (they end at or before it, start after it, or disagree about the term at
//!   its index: the traces of a crash during an install) are dropped, and a reset in the
//!   journal says so durably before any entry is written after them.
//!
//! raft-rs reads its storage synchronously, so the entries after the snapshot are kept in
//! memory (the journal is read only when the shard opens); compacting behind a snapshot
//! bounds them.

use crate::journal::Journal;
use crate::state::{GroupState, StateFile};
use chorus_log::{Storage, StorageFile};
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError};
use std::io;
use std::rc::Rc;

/// What can go wrong persisting or recovering a group.
#[derive(Debug, thiserror::Error)]
pub enum RaftLogError {
    /// The file system failed; the group must stop and be reopened.
    #[error("raft storage i/o: {0}")]
    Io(#[from] io::Error),
    /// The journal (the entries' log) failed.
    #[error("raft entry log: {0}")]
    Log(#[from] chorus_log::Error),
    /// What is on disk breaks an invariant.
    #[error("raft storage is inconsistent: {0}")]
    Corrupt(String),
}

impl From<chorus_log::OpenError> for RaftLogError {
    fn from(e: chorus_log::OpenError) -> Self {
        RaftLogError::Log(e.into())
    }
}
impl From<chorus_log::AppendError> for RaftLogError {
    fn from(e: chorus_log::AppendError) -> Self {
        RaftLogError::Log(e.into())
    }
}
impl From<chorus_log::ReadError> for RaftLogError {
    fn from(e: chorus_log::ReadError) -> Self {
        RaftLogError::Log(e.into())
    }
}
impl From<chorus_log::TruncateError> for RaftLogError {
    fn from(e: chorus_log::TruncateError) -> Self {
        RaftLogError::Log(e.into())
    }
}

fn snapshot_name(index: u64) -> String {
    format!("snap-{index:020}")
}

/// The durable log and state of one Raft group.
pub struct RaftLog<S: Storage> {
    dir: S,
    journal: Rc<Journal<S>>,
    group: u64,
    state_file: StateFile<S::File>,
    state: GroupState,
    /// The index of `entries[0]`: the first entry served. At most `snapshot_index + 1`: a
    /// compaction keeps a tail of entries behind its snapshot, so that a follower a little
    /// behind it is caught up from the log rather than sent the snapshot (after a restart
    /// the entries start after the snapshot again).
    base: u64,
    /// The entries `base ..= last`.
    entries: Vec<Entry>,
    /// The journal offset of each entry.
    offsets: Vec<u64>,
    /// The latest snapshot's data.
    snapshot_data: Vec<u8>,
    /// Entries a compaction let go, not yet freed: [`RaftLog::free_some`] drops a slice of
    /// them per turn of the group.
    released: Vec<Entry>,
}

/// Entries [`RaftLog::free_some`] drops at a time. Freeing the ten thousand entries a
/// compaction let go took 3–8 ms of one node's thread at once (each entry's data is cold
/// by then), in the middle of other groups' commits.
const FREE_PER_TURN: usize = 256;

impl<S: Storage> RaftLog<S> {
    /// Opens group `group`'s storage: the state in `dir`, the entries in `journal`. A new
    /// group starts with the membership `bootstrap` and nothing else.
    pub async fn open(
        dir: S,
        journal: Rc<Journal<S>>,
        group: u64,
        bootstrap: &ConfState,
    ) -> Result<RaftLog<S>, RaftLogError> {
        let initial = GroupState {
            conf: bootstrap.clone(),
            snapshot_conf: bootstrap.clone(),
            ..GroupState::default()
        };
        let (state_file, mut state) = StateFile::open(&dir, &initial).await?;
        // Applying starts again at the snapshot, so the membership does too; the changes
        // after it are applied again from the log.
        state.conf = state.snapshot_conf.clone();
        let snap = state.snapshot_index;
        // Snapshot files other than the current one are leftovers of a compaction or an
        // install that a crash interrupted (or of the file snapshot before an inline one).
        let inline = state.snapshot_inline.is_some();
        for name in dir.list().await? {
            let stale = name.starts_with("snap-") && (inline || name != snapshot_name(snap));
            if stale || name.ends_with(".tmp") {
                dir.remove(&name).await?;
            }
        }
        dir.sync_dir().await?;
        let snapshot_data = match (&state.snapshot_inline, snap) {
            (Some(data), _) => data.clone(),
            (None, 0) => Vec::new(),
            (None, _) => read_whole(&dir, &snapshot_name(snap)).await.map_err(|e| {
                RaftLogError::Corrupt(format!("the state names snapshot {snap}: {e}"))
            })?,
        };
        let run = journal.take(group).await;
        let mut this = RaftLog {
            dir,
            journal,
            group,
            state_file,
            state,
            base: snap + 1,
            entries: run.entries,
            offsets: run.offsets,
            snapshot_data,
            released: Vec::new(),
        };
        // A tail kept behind the snapshot is served for the node's life, not after a
        // restart: the entries start after the snapshot again.
        if this.entries_continue_snapshot() {
            let behind = this.entries.partition_point(|e| e.index <= snap);
            this.entries.drain(..behind);
            this.offsets.drain(..behind);
        } else {
            this.entries.clear();
            this.offsets.clear();
            this.journal.reset(group, snap + 1).await?;
        }
        this.pin();
        // A crash between a `Ready`'s entries and its hard state leaves entries of a term
        // the hard state never reached. The node's term must be at least its log's last
        // term; the vote it holds is of an older term, so it has none in this one (and
        // sent none: votes go out only once the hard state is durable).
        let last_term = this
            .entries
            .last()
            .map_or(this.state.snapshot_term, |e| e.term);
        if this.state.hard.term < last_term {
            this.state.hard.term = last_term;
            this.state.hard.vote = 0;
            this.write_state().await?;
        }
        let last = this.last();
        if this.state.hard.commit > last {
            return Err(RaftLogError::Corrupt(format!(
                "commit index {} is past the last entry {last} (a data directory written \
                 before the shard's Raft journal keeps its entries in g<group>/log, which \
                 this build does not read)",
                this.state.hard.commit
            )));
        }
        Ok(this)
    }

    /// Whether the recovered entries pick up right after the snapshot (or there are none).
    fn entries_continue_snapshot(&self) -> bool {
        let (snap, term) = (self.state.snapshot_index, self.state.snapshot_term);
        let Some(first) = self.entries.first().map(|e| e.index) else {
            return true;
        };
        if first == snap + 1 {
            return true;
        }
        // Starting before the snapshot, they continue it only if they reach it and agree
        // about the term at its index.
        first <= snap
            && self
                .entries
                .get((snap - first) as usize)
                .is_some_and(|e| e.term == term)
    }

    /// Tells the journal the oldest entry this group keeps.
    fn pin(&self) {
        self.journal.pin(self.group, self.offsets.first().copied());
    }

    /// Writes the entries again at the journal's end if the oldest of them pins the
    /// journal too far back (an idle group), so that the segments behind can go.
    pub async fn rewrite_if_due(&mut self) -> Result<(), RaftLogError> {
        let n = self.entries.len();
        if !self
            .offsets
            .first()
            .is_some_and(|&o| self.journal.due(o, n))
        {
            return Ok(());
        }
        self.offsets = self.journal.append(self.group, &self.entries).await?;
        self.pin();
        self.journal.collect().await
    }

    /// Frees some of the entries compactions let go (at most [`FREE_PER_TURN`]): the
    /// group calls it every turn, so that a compaction's entries are freed over its next
    /// turns instead of at once.
    pub fn free_some(&mut self) {
        let left = self.released.len().saturating_sub(FREE_PER_TURN);
        self.released.truncate(left);
    }

    fn first(&self) -> u64 {
        self.base
    }

    fn last(&self) -> u64 {
        self.base + self.entries.len() as u64 - 1
    }

    /// The group's state as last persisted.
    pub fn state(&self) -> &GroupState {
        &self.state
    }

    /// The latest snapshot's data (empty before the first).
    pub fn snapshot_data(&self) -> &[u8] {
        &self.snapshot_data
    }

    /// Persists a `Ready`'s entries. Entries at indexes the log already has replace them
    /// and everything after them (a new leader's log wins over an uncommitted tail).
    pub async fn append(&mut self, entries: &[Entry]) -> Result<(), RaftLogError> {
        let Some(head) = entries.first() else {
            return Ok(());
        };
        let (first, last) = (self.first(), self.last());
        if head.index < first || head.index > last + 1 {
            return Err(RaftLogError::Corrupt(format!(
                "entries from {} do not fit a log of {first}..={last}",
                head.index
            )));
        }
        if head.index <= last {
            // Replaced in the journal by the records below (replay keeps the last word).
            let keep = (head.index - first) as usize;
            self.entries.truncate(keep);
            self.offsets.truncate(keep);
        }
        let offsets = self.journal.append(self.group, entries).await?;
        self.entries.extend_from_slice(entries);
        self.offsets.extend(offsets);
        self.pin();
        Ok(())
    }

    /// Persists a hard state (after the entries of the same `Ready`). Only its term and
    /// vote must be durable before the `Ready`'s messages go; a newer commit index alone
    /// is noted as [`RaftLog::set_commit`] notes it, without a write or an fsync (most
    /// `Ready`s change nothing else).
    pub async fn set_hard_state(&mut self, hard: &HardState) -> Result<(), RaftLogError> {
        let was = &self.state.hard;
        if hard.term == was.term && hard.vote == was.vote {
            self.set_commit(hard.commit);
            return Ok(());
        }
        self.state.hard = hard.clone();
        self.write_state().await
    }

    /// Notes a newer commit index. It is written with the next state write: a restarted
    /// node learns anything newer from its leader again.
    pub fn set_commit(&mut self, commit: u64) {
        self.state.hard.commit = self.state.hard.commit.max(commit);
    }

    /// Notes the membership after a configuration change was applied. It need not be
    /// durable: a restarted group applies again from its snapshot, whose membership it
    /// starts from, and the change is in the log after it. A compaction takes it as the
    /// snapshot's membership.
    pub fn applied_conf_state(&mut self, conf: &ConfState) {
        self.state.conf = conf.clone();
    }

    async fn write_state(&mut self) -> Result<(), RaftLogError> {
        Ok(self.state_file.write(&self.state).await?)
    }

    /// Installs a snapshot received from the leader: it replaces the whole log.
    pub async fn apply_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), RaftLogError> {
        let meta = snapshot.get_metadata();
        if meta.index <= self.state.snapshot_index {
            return Ok(());
        }
        let old = self.stage_snapshot(meta.index, &snapshot.data).await?;
        self.state.snapshot_index = meta.index;
        self.state.snapshot_term = meta.term;
        self.state.snapshot_conf = meta.get_conf_state().clone();
        self.state.conf = meta.get_conf_state().clone();
        self.state.hard.commit = self.state.hard.commit.max(meta.index);
        self.state.hard.term = self.state.hard.term.max(meta.term);
        self.write_state().await?;
        self.journal.reset(self.group, meta.index + 1).await?;
        self.entries.clear();
        self.offsets.clear();
        self.pin();
        self.base = meta.index + 1;
        self.snapshot_data = snapshot.data.to_vec();
        self.remove_snapshot_file(old).await
    }

    /// Takes a snapshot of the state machine at `index` (applied, so committed) with its
    /// `data`, and lets the log go behind it but for the last `keep` entries up to it:
    /// those before are no longer served, and the log's whole segments before them are
    /// removed.
    pub async fn compact(
        &mut self,
        index: u64,
        data: Vec<u8>,
        keep: u64,
    ) -> Result<(), RaftLogError> {
        let (first, last) = (self.first(), self.last());
        if index <= self.state.snapshot_index {
            return Ok(());
        }
        if index > last || index > self.state.hard.commit {
            return Err(RaftLogError::Corrupt(format!(
                "cannot compact to {index}: the log ends at {last}, commit is {}",
                self.state.hard.commit
            )));
        }
        let term = self.entries[(index - first) as usize].term;
        let old = self.stage_snapshot(index, &data).await?;
        self.state.snapshot_index = index;
        self.state.snapshot_term = term;
        self.state.snapshot_conf = self.state.conf.clone();
        self.write_state().await?;
        let base = (index + 1).saturating_sub(keep).max(first);
        self.released
            .extend(self.entries.drain(..(base - first) as usize));
        self.offsets.drain(..(base - first) as usize);
        self.pin();
        self.base = base;
        self.snapshot_data = data;
        self.remove_snapshot_file(old).await?;
        self.journal.collect().await
    }

    /// Makes `data` the snapshot at `index` that the next state write names: inline when
    /// small, otherwise a file made durable now. Returns the index of the file snapshot
    /// the state names until then (0: none), to remove once that write is durable.
    async fn stage_snapshot(&mut self, index: u64, data: &[u8]) -> io::Result<u64> {
        let old_file = match self.state.snapshot_inline {
            Some(_) => 0,
            None => self.state.snapshot_index,
        };
        if data.len() <= crate::state::INLINE_SNAPSHOT_BYTES {
            self.state.snapshot_inline = Some(data.to_vec());
        } else {
            self.write_snapshot_file(index, data).await?;
            self.state.snapshot_inline = None;
        }
        Ok(old_file)
    }

    async fn write_snapshot_file(&self, index: u64, data: &[u8]) -> io::Result<()> {
        let name = snapshot_name(index);
        let tmp = format!("{name}.tmp");
        // A leftover of a crash: opening removes them, but a compaction may follow a
        // failed one in the same life.
        match self.dir.remove(&tmp).await {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let f = self.dir.create(&tmp).await?;
        f.write_at(0, &(data.len() as u64).to_le_bytes()).await?;
        f.write_at(8, data).await?;
        f.write_at(
            8 + data.len() as u64,
            &xxhash_rust::xxh3::xxh3_64(data).to_le_bytes(),
        )
        .await?;
        f.sync_data().await?;
        f.close().await?;
        self.dir.rename(&tmp, &name).await?;
        self.dir.sync_dir().await
    }

    async fn remove_snapshot_file(&self, index: u64) -> Result<(), RaftLogError> {
        if index != 0 {
            self.dir.remove(&snapshot_name(index)).await?;
            self.dir.sync_dir().await?;
        }
        Ok(())
    }
}

/// Reads a snapshot file: its length, its bytes, their checksum.
async fn read_whole<S: Storage>(dir: &S, name: &str) -> io::Result<Vec<u8>> {
    let f = dir.open(name).await?;
    let head = f.read_at(0, 8).await?;
    let len = u64::from_le_bytes(head.as_slice().try_into().map_err(|_| short(name))?);
    let body = f.read_at(8, len as usize + 8).await?;
    if body.len() != len as usize + 8 {
        return Err(short(name));
    }
    let (data, sum) = body.split_at(len as usize);
    if xxhash_rust::xxh3::xxh3_64(data).to_le_bytes() != sum {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{name}: checksum mismatch"),
        ));
    }
    Ok(data.to_vec())
}

fn short(name: &str) -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, format!("{name} is cut short"))
}

impl<S: Storage> raft::Storage for RaftLog<S> {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState {
            hard_state: self.state.hard.clone(),
            conf_state: self.state.conf.clone(),
        })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last() + 1 || low > high {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let base = self.first();
        let mut out = self.entries[(low - base) as usize..(high - base) as usize].to_vec();
        raft::util::limit_size(&mut out, max_size.into());
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.state.snapshot_index {
            return Ok(self.state.snapshot_term);
        }
        if idx < self.base {
            // The entry before the first one served is known too (`base - 1` is the
            // snapshot's index when no tail is kept).
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(self.entries[(idx - self.base) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        if request_index > self.state.snapshot_index {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        let mut meta = SnapshotMetadata {
            index: self.state.snapshot_index,
            term: self.state.snapshot_term,
            ..SnapshotMetadata::default()
        };
        meta.set_conf_state(self.state.snapshot_conf.clone());
        let mut snapshot = Snapshot {
            data: self.snapshot_data.clone().into(),
            ..Snapshot::default()
        };
        snapshot.set_metadata(meta);
        Ok(snapshot)
    }
}
