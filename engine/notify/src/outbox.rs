//! The outbox: a log of its own, `<data>/notify/outbox.log`, of push items keyed
//! `(message, user, device)`, of email items keyed `(user, digest window)` (one record per
//! message of the window), and of the decider's cursors.
//!
//! - **Framing.** Each record is `len: u32 LE`, `crc32: u32 LE` of the payload, then the
//!   payload (JSON, [`Record`]).
//! - **Atomic decisions.** The decider appends the items of a batch and then one
//!   [`Record::Cursors`] record with the offsets to read next in every log, written and
//!   synced in pieces of at most [`SYNC_PIECE_BYTES`] ([`write_synced`]); the batch counts
//!   only once the last piece is synced. At open, everything after the last whole cursors
//!   record is cut off (a torn write, or items whose cursors never became durable): those
//!   events are read and decided again. So items and the cursors that produced them become durable together, and no
//!   decision is ever stored twice.
//! - **The sender's cursor** is the byte offset before which every item was answered
//!   (pushed, dropped, or given up), with the offsets of the items after it answered too
//!   (out of order). Each store overwrites `<data>/notify/sent.now` in place, framed like a
//!   record and without an fsync; at most every [`SENT_DURABLE_EVERY`] it is also written
//!   to `<data>/notify/sent` through a temporary file, fsync and rename (see
//!   [`Outbox::store_sent`]). The other items at and after it are pending: they are kept
//!   in memory and sent (again, after a crash: a repeat carries the same `event_id`).
//! - **Compaction.** When the answered head is at least [`COMPACT_BYTES`] and half the
//!   log, the log is rewritten from its first pending item, every record at its offset
//!   (a [`Record::Base`] first): at open, and while running when a sender's cursor is
//!   stored durably (`compact`).
//! - **The email sender's cursor** is kept the same way in `<data>/notify/emailed`, apart
//!   from the push sender's: email items wait for their window to close (up to
//!   `email_digest_s`), and pushes must not wait behind them. The email items at and after
//!   it are pending, and they tell the decider which digest windows are open
//!   ([`Opened::windows`]), so a window outlives a crash.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

/// Largest record accepted when reading back (a longer length is a torn or foreign tail).
const RECORD_BYTES_MAX: u32 = 1 << 20;
/// Answered bytes at the head of the outbox above which it is compacted (and only when
/// they are at least half of it).
pub const COMPACT_BYTES: u64 = 16 << 20;
/// The least time between two fsynced stores of the push sender's cursor (each also asks
/// whether to compact).
pub const SENT_DURABLE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
/// The most the outbox writes before it syncs: a big batch (an `@channel` in a channel of
/// 100,000 is about 30 MB) is written and synced in pieces of this size (see
/// [`write_synced`]).
pub const SYNC_PIECE_BYTES: usize = 1 << 20;

/// One push to one device of one user, for one message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    /// The message's channel.
    pub channel: u64,
    /// The message's seq.
    pub seq: u64,
    /// The message's partition and the offset of its event in that partition's log: the
    /// same on every node of a cluster (0 in items stored before positions were kept).
    #[serde(default)]
    pub partition: u32,
    /// See `partition`.
    #[serde(default)]
    pub offset: u64,
    /// The channel's workspace.
    pub workspace: u64,
    /// The recipient.
    pub user: u64,
    /// The recipient's device.
    pub device: u64,
    /// The device's app ID at decision time.
    pub app_id: String,
    /// The device's push key at decision time.
    pub pushkey: String,
    /// The author.
    pub author: u64,
    /// The author's display name.
    pub author_name: String,
    /// The channel's name (empty for DMs).
    pub room_name: String,
    /// `prio` `high`: a mention, a keyword, or a DM.
    pub high: bool,
}

impl Item {
    /// The key no two items share: `(message, user, device)`.
    pub fn key(&self) -> (u64, u64, u64, u64) {
        (self.channel, self.seq, self.user, self.device)
    }
}

/// One message for one user's email digest: the window is the key the sender groups by.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmailItem {
    /// The recipient.
    pub user: u64,
    /// When the digest window opened (Unix ms): with `user`, the digest's key.
    pub window: u64,
    /// When the window closes and the digest is due (Unix ms).
    pub closes: u64,
    /// The message's channel.
    pub channel: u64,
    /// The message's seq.
    pub seq: u64,
    /// The message's partition and the offset of its event in that partition's log: the
    /// same on every node of a cluster (0 in items stored before positions were kept).
    #[serde(default)]
    pub partition: u32,
    /// See `partition`.
    #[serde(default)]
    pub offset: u64,
    /// The channel's workspace.
    pub workspace: u64,
    /// The author's display name.
    pub author_name: String,
    /// The channel's name (empty for DMs).
    pub room_name: String,
}

/// A digest window the decider adds messages to until it closes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// When it opened (Unix ms).
    pub opened: u64,
    /// When it closes (Unix ms).
    pub closes: u64,
}

/// A record of the outbox log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Record {
    /// A push to send.
    Item(Item),
    /// A message for an email digest.
    Email(EmailItem),
    /// The decider's cursors after the items before this record: (partition, offset)
    /// pairs (a list: an internally tagged enum cannot read back integer map keys), and
    /// the metadata log's.
    Cursors {
        /// Each partition's offset to read next.
        partitions: Vec<(u32, u64)>,
        /// The metadata log's offset to read next.
        meta: u64,
    },
    /// First in a compacted file: its byte 0 is at offset `base` of the outbox, so every
    /// record keeps the offset it had before the compaction (the senders' cursors name
    /// records by offset).
    Base {
        /// The offset of the file's first byte.
        base: u64,
    },
}

/// An item with its place in the log.
#[derive(Clone, Debug)]
pub struct Pending<T = Item> {
    /// The offset of its record.
    pub at: u64,
    /// The offset after it.
    pub end: u64,
    /// The item.
    pub item: T,
}

/// The decider's cursors, as last stored.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursors {
    /// Each partition's offset to read next.
    pub partitions: BTreeMap<u32, u64>,
    /// The metadata log's offset to read next.
    pub meta: u64,
}

/// The outbox, shared by the decider (appends) and the sender (takes, then answers).
pub struct Outbox {
    dir: PathBuf,
    inner: Mutex<Inner>,
    /// Wakes the push sender when items were appended.
    pub appended: tokio::sync::Notify,
    /// Wakes the email sender when email items were appended.
    pub emails_appended: tokio::sync::Notify,
    /// Counters: the outbox keeps `outbox_depth`; the senders count what they answer.
    pub stats: Arc<crate::Stats>,
    /// The push sender's cursor files.
    sent: Mutex<SentFiles>,
    /// On a cluster node, where what is decided is counted by position
    /// ([`crate::cluster`]).
    gate: std::sync::OnceLock<Arc<crate::cluster::Gate>>,
}

/// Where the push sender's cursor is stored: `sent.now`, overwritten at every store, and
/// when `sent` was last written durably.
struct SentFiles {
    now: File,
    durable_at: std::time::Instant,
}

struct Inner {
    file: File,
    /// The log's length (the offset after its last record).
    len: u64,
    /// The offset of the file's first byte (after a compaction, a [`Record::Base`]).
    base: u64,
    /// The last cursors appended: a compaction keeps them.
    cursors: Option<Cursors>,
    /// The push sender's cursor as last stored: every push item before it is answered.
    push_from: u64,
    /// The end of the last push item taken by the sender.
    taken_end: u64,
    /// The offsets of the email items not answered yet.
    emails_pending: BTreeSet<u64>,
    /// Answered bytes at the head above which a store compacts the log (and only when they
    /// are at least half of it).
    compact_bytes: u64,
    /// Items appended and not yet taken by the sender.
    queue: VecDeque<Pending>,
    /// Email items appended and not yet taken by the email sender.
    emails: VecDeque<Pending<EmailItem>>,
}

/// What [`Outbox::open`] found.
pub struct Opened {
    /// The outbox.
    pub outbox: Arc<Outbox>,
    /// The decider's stored cursors (`None` on a first start).
    pub cursors: Option<Cursors>,
    /// The sender's stored cursor.
    pub sent: u64,
    /// The email sender's stored cursor.
    pub emailed: u64,
    /// Each user's latest digest window among the pending email items: the windows that
    /// may still be open.
    pub windows: HashMap<u64, Window>,
}

fn frame(record: &Record, out: &mut Vec<u8>) {
    let payload = serde_json::to_vec(record).expect("a record serializes");
    frame_payload(&payload, out);
}

/// Appends `payload` framed: its length, its CRC32, then itself.
fn frame_payload(payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// The payload of the whole frame at the start of `bytes`: `None` when it is torn, too
/// long or fails its checksum.
fn unframe(bytes: &[u8]) -> Option<&[u8]> {
    let len = u32::from_le_bytes(bytes.get(0..4)?.try_into().ok()?);
    let crc = u32::from_le_bytes(bytes.get(4..8)?.try_into().ok()?);
    if len > RECORD_BYTES_MAX {
        return None;
    }
    let payload = bytes.get(8..8 + len as usize)?;
    (crc32fast::hash(payload) == crc).then_some(payload)
}

/// Reads whole records from the start; answers them with their offsets and the offset
/// after the last whole one.
fn scan(bytes: &[u8]) -> (Vec<(u64, u64, Record)>, u64) {
    let mut records = Vec::new();
    let mut at = 0usize;
    while let Some(payload) = unframe(&bytes[at..]) {
        let Ok(record) = serde_json::from_slice::<Record>(payload) else {
            break;
        };
        let end = at + 8 + payload.len();
        records.push((at as u64, end as u64, record));
        at = end;
    }
    (records, at as u64)
}

/// Writes `bytes` to `path` durably: a temporary file written and synced in pieces, a
/// rename, a directory fsync.
pub fn store_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = File::create(&tmp)?;
    // The last piece's `fdatasync` made the bytes and the file's size durable; nothing
    // else of the inode matters before the rename. An empty file has no piece.
    write_synced(&mut file, bytes)?;
    if bytes.is_empty() {
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}

/// Writes `bytes` and makes them durable, [`SYNC_PIECE_BYTES`] at a time: each piece is
/// written and synced before the next is written. The shards' logs share the disk, and a
/// log's fsync waits behind whatever the device has queued: one 30 MB sync held the
/// sender's own sends up to 280 ms, while with pieces a shard's sync waits for one piece
/// at most. A crash between pieces leaves a prefix, which the outbox's open cuts off (it
/// ends before the batch's cursors record) and a temporary file's rename never publishes.
pub fn write_synced(file: &mut File, bytes: &[u8]) -> std::io::Result<()> {
    for piece in bytes.chunks(SYNC_PIECE_BYTES) {
        file.write_all(piece)?;
        file.sync_data()?;
    }
    Ok(())
}

impl Outbox {
    /// The notifications directory the outbox lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Opens (or creates) the outbox in `dir`. Cuts off whatever follows the last whole
    /// cursors record, and queues the items at and after the sender's cursor; sets
    /// `stats.outbox_depth` to the items queued.
    pub fn open(dir: &Path, stats: Arc<crate::Stats>) -> std::io::Result<Opened> {
        Outbox::open_compacting(dir, stats, COMPACT_BYTES)
    }

    /// [`Outbox::open`], compacting when at least `compact_bytes` (and half the file) are
    /// answered.
    fn open_compacting(
        dir: &Path,
        stats: Arc<crate::Stats>,
        compact_bytes: u64,
    ) -> std::io::Result<Opened> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("outbox.log");
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let (records, _) = scan(&bytes);
        let (sent, answered) = read_sent(dir)?;
        let (emailed, emails_answered) = read_cursor(&dir.join("emailed"))?;
        let mut cursors = None;
        let mut base = 0;
        let mut kept = 0;
        let mut items = Vec::new();
        let mut emails = Vec::new();
        for (at, end, record) in records {
            let (at, end) = (at + base, end + base);
            match record {
                Record::Item(item) => items.push(Pending { at, end, item }),
                Record::Email(item) => emails.push(Pending { at, end, item }),
                Record::Cursors { partitions, meta } => {
                    let partitions = partitions.into_iter().collect();
                    cursors = Some(Cursors { partitions, meta });
                    kept = end;
                }
                Record::Base { base: b } if at == 0 => {
                    base = b;
                    kept = b + end;
                }
                Record::Base { .. } => {}
            }
        }
        items.retain(|p| p.end <= kept && p.at >= sent && !answered.contains(&p.at));
        emails.retain(|p| p.end <= kept && p.at >= emailed && !emails_answered.contains(&p.at));
        let windows = open_windows(&emails);
        if (bytes.len() as u64) + base > kept {
            tracing::warn!(
                cut = bytes.len() as u64 + base - kept,
                "notify outbox: cutting off records after the last stored cursors"
            );
            file.set_len(kept - base)?;
            file.sync_all()?;
        }
        file.seek(SeekFrom::End(0))?;
        let depth = (items.len() + emails.len()) as u64;
        stats.outbox_depth.store(depth, Ordering::Relaxed);
        // What was read becomes the durable cursor, so that a power cut never goes back
        // past a compaction.
        store_file(&dir.join("sent"), cursor_text(sent, &answered).as_bytes())?;
        let now = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join("sent.now"))?;
        let sent_files = SentFiles {
            now,
            durable_at: std::time::Instant::now(),
        };
        let outbox = Arc::new(Outbox {
            dir: dir.to_owned(),
            inner: Mutex::new(Inner {
                file,
                len: kept,
                base,
                cursors: cursors.clone(),
                push_from: 0,
                taken_end: 0,
                emails_pending: emails.iter().map(|p| p.at).collect(),
                compact_bytes,
                queue: items.into(),
                emails: emails.into(),
            }),
            appended: tokio::sync::Notify::new(),
            emails_appended: tokio::sync::Notify::new(),
            stats,
            sent: Mutex::new(sent_files),
            gate: std::sync::OnceLock::new(),
        });
        // Everything before the first pending item is answered: past a threshold, the
        // file starts again there.
        outbox.compact_if_due(&mut outbox.inner.lock().expect("outbox lock"))?;
        Ok(Opened {
            outbox,
            cursors,
            sent,
            emailed,
            windows,
        })
    }

    /// Appends push items, email items and then the cursors after them, in one write, and
    /// fsyncs; then queues the items for their senders and wakes them.
    pub fn append(
        &self,
        items: Vec<Item>,
        emails: Vec<EmailItem>,
        cursors: &Cursors,
    ) -> std::io::Result<()> {
        let mut bytes = Vec::new();
        let mut inner = self.inner.lock().expect("outbox lock");
        let base = inner.len;
        let placed = place(items, Record::Item, base, &mut bytes);
        let emails = place(emails, Record::Email, base, &mut bytes);
        frame(
            &Record::Cursors {
                partitions: cursors.partitions.iter().map(|(p, o)| (*p, *o)).collect(),
                meta: cursors.meta,
            },
            &mut bytes,
        );
        write_synced(&mut inner.file, &bytes)?;
        inner.len += bytes.len() as u64;
        inner.cursors = Some(cursors.clone());
        inner.emails_pending.extend(emails.iter().map(|p| p.at));
        let added = (placed.len() + emails.len()) as u64;
        self.stats.outbox_depth.fetch_add(added, Ordering::Relaxed);
        if let Some(gate) = self.gate.get() {
            let (items, mails) = (
                placed.iter().map(|p| &p.item),
                emails.iter().map(|p| &p.item),
            );
            gate.decided(items, mails, Some(cursors));
        }
        let (any, any_email) = (!placed.is_empty(), !emails.is_empty());
        inner.queue.extend(placed);
        inner.emails.extend(emails);
        drop(inner);
        if any {
            self.appended.notify_one();
        }
        if any_email {
            self.emails_appended.notify_one();
        }
        Ok(())
    }

    /// Counts what is decided by position in `gate` from now on, starting with the items
    /// pending now (call it before any sender takes).
    pub fn attach(&self, gate: Arc<crate::cluster::Gate>) {
        let inner = self.inner.lock().expect("outbox lock");
        let (items, mails) = (
            inner.queue.iter().map(|p| &p.item),
            inner.emails.iter().map(|p| &p.item),
        );
        gate.decided(items, mails, inner.cursors.as_ref());
        let _ = self.gate.set(gate);
    }

    /// The gate of a cluster node ([`Outbox::attach`]).
    pub fn gate(&self) -> Option<&Arc<crate::cluster::Gate>> {
        self.gate.get()
    }

    /// The push items and the email items waiting for their senders.
    pub fn waiting(&self) -> (u64, u64) {
        let inner = self.inner.lock().expect("outbox lock");
        (inner.queue.len() as u64, inner.emails.len() as u64)
    }

    /// Counts `n` items answered by their sender (sent, dropped or given up), out of
    /// `stats.outbox_depth`.
    pub fn answered(&self, n: u64) {
        self.stats.outbox_depth.fetch_sub(n, Ordering::Relaxed);
    }

    /// Takes the email items queued since the last call, in log order.
    pub fn take_emails(&self) -> Vec<Pending<EmailItem>> {
        self.inner
            .lock()
            .expect("outbox lock")
            .emails
            .drain(..)
            .collect()
    }

    /// Stores the email sender's cursor durably (temporary file, fsync, rename, directory
    /// fsync), then compacts the log if its answered head has grown enough
    /// (`Outbox::compact_if_due`).
    pub fn store_emailed(&self, emailed: u64, answered: &BTreeSet<u64>) -> std::io::Result<()> {
        store_file(
            &self.dir.join("emailed"),
            cursor_text(emailed, answered).as_bytes(),
        )?;
        let mut inner = self.inner.lock().expect("outbox lock");
        inner.emails_pending = inner.emails_pending.split_off(&emailed);
        inner.emails_pending.retain(|at| !answered.contains(at));
        self.compact_if_due(&mut inner)
    }

    /// Rewrites the log from its first pending item, of either kind, when the answered
    /// records before it are at least `compact_bytes` and half the log, as opening does
    /// ([`compact`]): appends wait for it (it holds the lock), and every record keeps its
    /// offset, so the senders' cursors and the queued items stay valid. The cursors it
    /// goes by are already stored, so whichever file a crash leaves, what it holds
    /// past them reads the same.
    fn compact_if_due(&self, inner: &mut Inner) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        // The first push item not answered: the cursor, unless every item taken is
        // answered, when it is the first not taken yet.
        let first_push = if inner.push_from >= inner.taken_end {
            inner.queue.front().map_or(inner.len, |p| p.at)
        } else {
            inner.push_from
        };
        let first_email = inner.emails_pending.first().copied();
        let from = first_email.map_or(first_push, |e| e.min(first_push));
        if !worth_compacting(from, inner.base, inner.len, inner.compact_bytes) {
            return Ok(());
        }
        let mut tail = vec![0; (inner.len - from) as usize];
        inner.file.read_exact_at(&mut tail, from - inner.base)?;
        let path = self.dir.join("outbox.log");
        if let Some((file, base)) = compact(&path, from, inner.cursors.as_ref(), &tail)? {
            inner.file = file;
            inner.base = base;
        }
        Ok(())
    }

    /// Takes the items queued since the last call, in log order.
    pub fn take(&self) -> Vec<Pending> {
        let mut inner = self.inner.lock().expect("outbox lock");
        let taken: Vec<Pending> = inner.queue.drain(..).collect();
        if let Some(last) = taken.last() {
            inner.taken_end = last.end;
        }
        taken
    }

    /// The log's length: the sender's cursor when nothing is pending.
    pub fn len(&self) -> u64 {
        self.inner.lock().expect("outbox lock").len
    }

    /// Whether the log holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stores the sender's cursor, with the offsets of the items after it that were
    /// answered too (at most the requests in flight), so that a restart resends only what
    /// was answered after this store.
    ///
    /// The store overwrites `sent.now` in place, framed with its length and checksum, and
    /// does not wait for the disk: a killed process leaves it in the page cache, so a
    /// SIGKILL repeats only the pushes answered since the last store (the time of one
    /// `pwrite`, not of an fsync). A power cut can leave it stale or torn: a torn one is
    /// not read (checksum), and `sent`, written durably at the first store
    /// [`SENT_DURABLE_EVERY`] after its previous write (and at open), is read with it.
    /// Either cursor only passes answered items, so the older one resends more (with the
    /// same `event_id`s) and loses nothing.
    pub fn store_sent(&self, sent: u64, answered: &BTreeSet<u64>) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let text = cursor_text(sent, answered);
        let mut framed = Vec::with_capacity(text.len() + 8);
        frame_payload(text.as_bytes(), &mut framed);
        let mut files = self.sent.lock().expect("sent cursor lock");
        files.now.write_all_at(&framed, 0)?;
        if files.durable_at.elapsed() < SENT_DURABLE_EVERY {
            return Ok(());
        }
        files.durable_at = std::time::Instant::now();
        store_file(&self.dir.join("sent"), text.as_bytes())?;
        drop(files);
        // Whether to compact is asked here, at most once a second, and by a cursor
        // stored durably.
        let mut inner = self.inner.lock().expect("outbox lock");
        inner.push_from = sent;
        self.compact_if_due(&mut inner)
    }
}

/// A sender's way through the outbox: the items it took and has not answered, and those
/// answered after the first of them (answers come out of order). Its cursor is the offset
/// before which every item taken is answered.
pub struct Progress {
    open: BTreeSet<u64>,
    answered: BTreeSet<u64>,
    taken_end: u64,
}

impl Progress {
    /// Starting at a stored cursor.
    pub fn new(cursor: u64) -> Progress {
        Progress {
            open: BTreeSet::new(),
            answered: BTreeSet::new(),
            taken_end: cursor,
        }
    }

    /// An item taken, at `at` up to `end`.
    pub fn took(&mut self, at: u64, end: u64) {
        self.open.insert(at);
        self.taken_end = self.taken_end.max(end);
    }

    /// Items answered, by offset: the cursor to store now, and the offsets answered
    /// after it.
    pub fn answered(&mut self, ats: impl IntoIterator<Item = u64>) -> (u64, &BTreeSet<u64>) {
        for at in ats {
            self.open.remove(&at);
            self.answered.insert(at);
        }
        let cursor = self.open.first().copied().unwrap_or(self.taken_end);
        self.answered = self.answered.split_off(&cursor);
        (cursor, &self.answered)
    }
}

/// Rewrites the outbox at `path` to start at offset `from`: a [`Record::Base`] that keeps
/// every later record at its offset, the decider's last cursors (records before `from` are
/// all answered, but the cursors must stay), then `tail`, the records from `from` on. The
/// new file replaces the old one whole (temporary file, fsync, rename, directory fsync), so
/// a crash leaves one or the other, and either reads the same. Answers the new file, open
/// for appending, and its base (`None`, leaving the file as it is, when `from` is too near
/// the start for the head to fit before it).
fn compact(
    path: &Path,
    from: u64,
    cursors: Option<&Cursors>,
    tail: &[u8],
) -> std::io::Result<Option<(File, u64)>> {
    let head = |base: u64| {
        let mut out = Vec::new();
        frame(&Record::Base { base }, &mut out);
        if let Some(c) = cursors {
            let partitions = c.partitions.iter().map(|(p, o)| (*p, *o)).collect();
            frame(
                &Record::Cursors {
                    partitions,
                    meta: c.meta,
                },
                &mut out,
            );
        }
        out
    };
    // The head's length depends on the digits of `base`: settle it (a round or two).
    let mut base = from;
    for _ in 0..4 {
        base = from.saturating_sub(head(base).len() as u64);
    }
    if base + head(base).len() as u64 != from {
        return Ok(None);
    }
    let mut bytes = head(base);
    bytes.extend_from_slice(tail);
    tracing::info!(
        from,
        kept = bytes.len(),
        "notify outbox: compacted the answered records away"
    );
    store_file(path, &bytes)?;
    let file = OpenOptions::new().read(true).append(true).open(path)?;
    Ok(Some((file, base)))
}

/// Whether a log of records from `base` to `len` whose first pending one is at `from` is
/// worth rewriting from there: at least `compact_bytes` answered, and half of it.
fn worth_compacting(from: u64, base: u64, len: u64, compact_bytes: u64) -> bool {
    let answered = from.saturating_sub(base);
    answered >= compact_bytes && answered * 2 >= len - base
}

/// Frames records for `items` after `base + bytes.len()`, answering them with their places.
fn place<T: Clone>(
    items: Vec<T>,
    record: fn(T) -> Record,
    base: u64,
    bytes: &mut Vec<u8>,
) -> Vec<Pending<T>> {
    let mut placed = Vec::with_capacity(items.len());
    for item in items {
        let at = base + bytes.len() as u64;
        frame(&record(item.clone()), bytes);
        let end = base + bytes.len() as u64;
        placed.push(Pending { at, end, item });
    }
    placed
}

/// A sender's cursor file: the cursor, then the offsets after it that were answered too.
fn cursor_text(cursor: u64, answered: &BTreeSet<u64>) -> String {
    let mut text = cursor.to_string();
    for at in answered.range(cursor..) {
        text.push(' ');
        text.push_str(&at.to_string());
    }
    text
}

/// Reads the push sender's cursor: `sent`, and `sent.now` when it is whole (its frame's
/// length and checksum hold). Both only ever pass answered items, so what either says is
/// true, and they are merged: the further cursor, with the answered offsets of both after
/// it.
fn read_sent(dir: &Path) -> std::io::Result<(u64, BTreeSet<u64>)> {
    let (mut sent, mut answered) = read_cursor(&dir.join("sent"))?;
    let bytes = match std::fs::read(dir.join("sent.now")) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    if let Some((now, now_answered)) = unframe_cursor(&bytes) {
        sent = sent.max(now);
        answered.extend(now_answered);
        answered = answered.split_off(&sent);
    }
    Ok((sent, answered))
}

/// The cursor in a `sent.now` frame: `None` when it is empty, torn or not a cursor.
fn unframe_cursor(bytes: &[u8]) -> Option<(u64, BTreeSet<u64>)> {
    let text = std::str::from_utf8(unframe(bytes)?).ok()?;
    (!text.is_empty()).then(|| parse_cursor(text))
}

/// Parses a cursor's text: the cursor, then the answered offsets after it.
fn parse_cursor(text: &str) -> (u64, BTreeSet<u64>) {
    let mut numbers = text
        .split_whitespace()
        .filter_map(|n| n.parse::<u64>().ok());
    let cursor = numbers.next().unwrap_or(0);
    (cursor, numbers.collect())
}

/// Reads a sender's cursor file (absent: nothing answered yet).
fn read_cursor(path: &Path) -> std::io::Result<(u64, BTreeSet<u64>)> {
    let text = match std::fs::read_to_string(path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    Ok(parse_cursor(&text))
}

/// Each user's latest window among pending email items.
fn open_windows(emails: &[Pending<EmailItem>]) -> HashMap<u64, Window> {
    let mut windows: HashMap<u64, Window> = HashMap::new();
    for p in emails {
        let w = Window {
            opened: p.item.window,
            closes: p.item.closes,
        };
        let latest = windows.entry(p.item.user).or_insert(w);
        if w.opened > latest.opened {
            *latest = w;
        }
    }
    windows
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(seq: u64) -> Item {
        Item {
            channel: 1,
            seq,
            partition: 0,
            offset: seq,
            workspace: 2,
            user: 3,
            device: 4,
            app_id: "app".into(),
            pushkey: "key".into(),
            author: 5,
            author_name: "ann".into(),
            room_name: "general".into(),
            high: true,
        }
    }

    fn email(user: u64, window: u64, seq: u64) -> EmailItem {
        EmailItem {
            user,
            window,
            closes: window + 900_000,
            channel: 1,
            seq,
            partition: 0,
            offset: seq,
            workspace: 2,
            author_name: "ann".into(),
            room_name: "general".into(),
        }
    }

    fn cursors(p0: u64) -> Cursors {
        Cursors {
            partitions: [(0, p0)].into(),
            meta: 7,
        }
    }

    // Items and their cursors survive a reopen; the sender's cursor hides what was
    // answered; a torn tail and items without cursors after them are cut off.
    #[test]
    fn items_and_cursors_are_durable_together() {
        let dir = tempfile::tempdir().unwrap();
        let opened = Outbox::open(dir.path(), Default::default()).unwrap();
        assert!(opened.cursors.is_none());
        let outbox = opened.outbox;
        outbox
            .append(vec![item(1), item(2)], vec![], &cursors(10))
            .unwrap();
        let taken = outbox.take();
        assert_eq!(taken.len(), 2);
        outbox.append(vec![item(3)], vec![], &cursors(20)).unwrap();
        outbox.store_sent(taken[1].end, &BTreeSet::new()).unwrap();
        let whole = outbox.len();
        drop(outbox);
        // A batch whose cursors record was torn: items written, cursors not whole.
        let mut torn = Vec::new();
        frame(&Record::Item(item(4)), &mut torn);
        frame(
            &Record::Cursors {
                partitions: vec![(0, 30)],
                meta: 7,
            },
            &mut torn,
        );
        torn.truncate(torn.len() - 3);
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join("outbox.log"))
            .unwrap();
        f.write_all(&torn).unwrap();
        drop(f);
        let opened = Outbox::open(dir.path(), Default::default()).unwrap();
        assert_eq!(opened.cursors.as_ref().unwrap().partitions[&0], 20);
        assert_eq!(opened.outbox.len(), whole);
        let pending = opened.outbox.take();
        assert_eq!(
            pending.iter().map(|p| p.item.seq).collect::<Vec<_>>(),
            vec![3]
        );
        // An item answered after the cursor is not sent again.
        opened
            .outbox
            .append(vec![item(5), item(6)], vec![], &cursors(40))
            .unwrap();
        let later = opened.outbox.take();
        opened
            .outbox
            .store_sent(pending[0].at, &[later[0].at].into())
            .unwrap();
        drop(opened);
        let again = Outbox::open(dir.path(), Default::default())
            .unwrap()
            .outbox
            .take();
        let seqs: Vec<u64> = again.iter().map(|p| p.item.seq).collect();
        assert_eq!(seqs, vec![3, 6]);
    }

    // A batch bigger than one synced piece counts only whole: cut after its first piece
    // (a crash between two syncs), the reopened outbox holds the batch before it and its
    // cursors; written whole, every item of it comes back.
    #[test]
    fn a_batch_synced_in_pieces_counts_only_whole() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path(), Default::default()).unwrap().outbox;
        outbox.append(vec![item(1)], vec![], &cursors(10)).unwrap();
        let before = outbox.len();
        let big: Vec<Item> = (2..6_002)
            .map(|seq| Item {
                pushkey: "k".repeat(400),
                ..item(seq)
            })
            .collect();
        outbox.append(big, vec![], &cursors(20)).unwrap();
        let whole = outbox.len();
        assert!(whole - before > 2 * SYNC_PIECE_BYTES as u64, "{whole}");
        drop(outbox);
        let log = dir.path().join("outbox.log");
        let copy = dir.path().join("whole.log");
        std::fs::copy(&log, &copy).unwrap();
        let f = OpenOptions::new().write(true).open(&log).unwrap();
        f.set_len(before + SYNC_PIECE_BYTES as u64).unwrap();
        drop(f);
        let opened = Outbox::open(dir.path(), Default::default()).unwrap();
        assert_eq!(opened.cursors.as_ref().unwrap().partitions[&0], 10);
        assert_eq!(opened.outbox.len(), before);
        let seqs: Vec<u64> = opened.outbox.take().iter().map(|p| p.item.seq).collect();
        assert_eq!(seqs, vec![1]);
        drop(opened);
        std::fs::rename(&copy, &log).unwrap();
        let opened = Outbox::open(dir.path(), Default::default()).unwrap();
        assert_eq!(opened.cursors.as_ref().unwrap().partitions[&0], 20);
        assert_eq!(opened.outbox.take().len(), 6_001);
    }

    // The push sender's cursor is stored without an fsync in `sent.now`, and durably in
    // `sent` at open (and at most every second): a reopen reads the newer of the two, a
    // torn `sent.now` falls back to `sent` (resending more, losing nothing), and a stale
    // one never takes the cursor back.
    #[test]
    fn the_sent_cursor_survives_a_torn_or_stale_store() {
        let dir = tempfile::tempdir().unwrap();
        let pending_seqs = || -> Vec<u64> {
            let opened = Outbox::open(dir.path(), Default::default()).unwrap();
            opened.outbox.take().iter().map(|p| p.item.seq).collect()
        };
        let outbox = Outbox::open(dir.path(), Default::default()).unwrap().outbox;
        let items = (1..=5).map(item).collect();
        outbox.append(items, vec![], &cursors(10)).unwrap();
        let taken = outbox.take();
        outbox.store_sent(taken[1].end, &BTreeSet::new()).unwrap();
        let stale = std::fs::read(dir.path().join("sent.now")).unwrap();
        drop(outbox);
        // The quick store alone is read back (and becomes the durable one at this open).
        assert_eq!(pending_seqs(), vec![3, 4, 5]);

        let outbox = Outbox::open(dir.path(), Default::default()).unwrap().outbox;
        outbox.take();
        outbox
            .store_sent(taken[3].end, &[taken[4].at].into())
            .unwrap();
        drop(outbox);
        // Torn: `sent` has the cursor of the last open.
        let now = dir.path().join("sent.now");
        let whole = std::fs::read(&now).unwrap();
        std::fs::write(&now, &whole[..whole.len() - 2]).unwrap();
        assert_eq!(pending_seqs(), vec![3, 4, 5]);

        // Whole again, and stored durably at that open; then a stale `sent.now`.
        std::fs::write(&now, &whole).unwrap();
        assert!(pending_seqs().is_empty());
        std::fs::write(&now, &stale).unwrap();
        assert!(pending_seqs().is_empty(), "a stale store never goes back");
    }

    // Email items survive a reopen apart from push items: the email cursor hides the
    // digests answered, the push cursor does not touch them, and the pending ones name each
    // user's latest window.
    #[test]
    fn email_items_have_their_own_cursor_and_windows() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path(), Default::default()).unwrap().outbox;
        let first = vec![email(3, 1_000, 1), email(4, 2_000, 2)];
        outbox.append(vec![item(1)], first, &cursors(10)).unwrap();
        outbox
            .append(vec![], vec![email(3, 5_000, 3)], &cursors(20))
            .unwrap();
        assert_eq!(outbox.take().len(), 1);
        let taken = outbox.take_emails();
        assert_eq!(taken.len(), 3);
        // Every push answered; of the emails, only user 4's window.
        outbox.store_sent(outbox.len(), &BTreeSet::new()).unwrap();
        outbox
            .store_emailed(taken[0].at, &[taken[1].at].into())
            .unwrap();
        drop(outbox);
        let opened = Outbox::open(dir.path(), Default::default()).unwrap();
        assert!(opened.outbox.take().is_empty());
        let pending = opened.outbox.take_emails();
        let seqs: Vec<u64> = pending.iter().map(|p| p.item.seq).collect();
        assert_eq!(seqs, vec![1, 3]);
        assert_eq!(opened.windows.len(), 1);
        assert_eq!(
            opened.windows[&3],
            Window {
                opened: 5_000,
                closes: 905_000
            }
        );
    }

    // Opening an outbox whose head is answered rewrites it from its first pending item,
    // keeping every record's offset: the pending items and the decider's cursors come
    // back the same, an item answered after the sender's cursor stays answered, and what
    // is appended afterwards follows at the offsets it would have had. A second open
    // finds nothing more to cut, and a crash at any point of the rewrite leaves one whole
    // file or the other.
    #[test]
    fn an_answered_head_is_compacted_away() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path(), Default::default()).unwrap().outbox;
        for batch in 0..20 {
            let items = (0..10).map(|i| item(batch * 10 + i)).collect();
            outbox.append(items, vec![], &cursors(batch + 1)).unwrap();
        }
        let taken = outbox.take();
        // Answered: the first 150 in order, and one more further on.
        let cursor = taken[150].at;
        let late = taken[160].at;
        outbox.store_sent(cursor, &[late].into()).unwrap();
        let (whole, before) = (
            outbox.len(),
            std::fs::metadata(dir.path().join("outbox.log"))
                .unwrap()
                .len(),
        );
        drop(outbox);

        let opened = Outbox::open_compacting(dir.path(), Default::default(), 1).unwrap();
        let size = std::fs::metadata(dir.path().join("outbox.log"))
            .unwrap()
            .len();
        assert!(size < before / 3, "{size} of {before} bytes kept");
        assert_eq!(opened.cursors.as_ref().unwrap().partitions[&0], 20);
        assert_eq!(opened.outbox.len(), whole);
        let pending = opened.outbox.take();
        let expected: Vec<(u64, u64)> = (taken[150..].iter())
            .filter(|p| p.at != late)
            .map(|p| (p.at, p.item.seq))
            .collect();
        let got: Vec<(u64, u64)> = pending.iter().map(|p| (p.at, p.item.seq)).collect();
        assert_eq!(got, expected);
        opened
            .outbox
            .append(vec![item(500)], vec![], &cursors(21))
            .unwrap();
        let appended = opened.outbox.take();
        assert_eq!(
            appended[0].at, whole,
            "appended at the offset it would have had"
        );
        drop(opened);

        let again = Outbox::open_compacting(dir.path(), Default::default(), 1).unwrap();
        assert_eq!(again.cursors.as_ref().unwrap().partitions[&0], 21);
        let seqs: Vec<u64> = again.outbox.take().iter().map(|p| p.item.seq).collect();
        let mut want: Vec<u64> = expected.iter().map(|(_, s)| *s).collect();
        want.push(500);
        assert_eq!(seqs, want);
        drop(again);
        // The rewrite is a whole file or nothing: a leftover temporary file changes
        // nothing.
        std::fs::write(dir.path().join("outbox.tmp"), b"torn").unwrap();
        let last = Outbox::open(dir.path(), Default::default()).unwrap();
        assert_eq!(last.outbox.take().len(), want.len());
    }

    // A running outbox compacts itself too: once the push sender's cursor is stored
    // durably past an answered head (or the email sender's is), the log is rewritten
    // from its first pending item while the senders and the decider go on, every record
    // at its offset; a reopen reads the same.
    #[test]
    fn a_running_outbox_compacts_its_answered_head() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("outbox.log");
        let size = || std::fs::metadata(&log).unwrap().len();
        let opened = Outbox::open_compacting(dir.path(), Default::default(), 1).unwrap();
        let outbox = opened.outbox;
        for batch in 0..20 {
            let items = (0..10).map(|i| item(batch * 10 + i)).collect();
            let emails = vec![email(3, 1_000, batch)];
            outbox.append(items, emails, &cursors(batch + 1)).unwrap();
        }
        let taken = outbox.take();
        let emails = outbox.take_emails();
        let before = size();
        // The email sender answers every digest: the pushes still hold the head.
        outbox
            .store_emailed(emails.last().unwrap().end, &BTreeSet::new())
            .unwrap();
        assert_eq!(size(), before);
        // The push sender's cursor, not yet stored durably: nothing moves.
        let cursor = taken[150].at;
        outbox.store_sent(cursor, &BTreeSet::new()).unwrap();
        assert_eq!(size(), before);
        std::thread::sleep(SENT_DURABLE_EVERY + std::time::Duration::from_millis(50));
        outbox.store_sent(cursor, &BTreeSet::new()).unwrap();
        assert!(size() < before / 3, "{} of {before} bytes kept", size());
        // Appends go on at the offsets they would have had.
        let whole = outbox.len();
        outbox
            .append(vec![item(500)], vec![], &cursors(21))
            .unwrap();
        assert_eq!(outbox.take()[0].at, whole);
        drop(outbox);
        let again = Outbox::open(dir.path(), Default::default()).unwrap();
        assert_eq!(again.cursors.as_ref().unwrap().partitions[&0], 21);
        let seqs: Vec<u64> = again.outbox.take().iter().map(|p| p.item.seq).collect();
        assert_eq!(seqs, (150..200).chain([500]).collect::<Vec<u64>>());
        assert!(again.outbox.take_emails().is_empty());
    }

    // With no push items, answering the digests alone compacts the log.
    #[test]
    fn answered_digests_alone_compact_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open_compacting(dir.path(), Default::default(), 1)
            .unwrap()
            .outbox;
        for batch in 0..20 {
            let emails = (0..10).map(|i| email(3, 1_000, batch * 10 + i)).collect();
            outbox.append(vec![], emails, &cursors(batch + 1)).unwrap();
        }
        let emails = outbox.take_emails();
        let before = std::fs::metadata(dir.path().join("outbox.log"))
            .unwrap()
            .len();
        outbox
            .store_emailed(emails[190].at, &BTreeSet::new())
            .unwrap();
        let after = std::fs::metadata(dir.path().join("outbox.log"))
            .unwrap()
            .len();
        assert!(after < before / 5, "{after} of {before} bytes kept");
        drop(outbox);
        let again = Outbox::open(dir.path(), Default::default()).unwrap();
        let seqs: Vec<u64> = again
            .outbox
            .take_emails()
            .iter()
            .map(|p| p.item.seq)
            .collect();
        assert_eq!(seqs, (190..200).collect::<Vec<u64>>());
    }
}
