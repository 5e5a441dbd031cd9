//! The outbox: a log of its own, `<data>/notify/outbox.log`, of push items keyed
//! `(message, user, device)`, and of the decider's cursors.
//!
//! - **Framing.** Each record is `len: u32 LE`, `crc32: u32 LE` of the payload, then the
//!   payload (JSON, [`Record`]). A record is appended whole by one write.
//! - **Atomic decisions.** The decider appends the items of a batch and then one
//!   [`Record::Cursors`] record with the offsets to read next in every log, in one write and
//!   one fsync. At open, everything after the last whole cursors record is cut off (a torn
//!   write, or items whose cursors never became durable): those events are read and decided
//!   again. So items and the cursors that produced them become durable together, and no
//!   decision is ever stored twice.
//! - **The sender's cursor** is the byte offset before which every item was answered
//!   (pushed, dropped, or given up), with the offsets of the items after it answered too
//!   (out of order), in `<data>/notify/sent`, written through a temporary file, fsync,
//!   rename and directory fsync. The other items at and after it are pending: they are
//!   kept in memory and sent (again, after a crash: a repeat carries the same `event_id`).

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Largest record accepted when reading back (a longer length is a torn or foreign tail).
const RECORD_BYTES_MAX: u32 = 1 << 20;

/// One push to one device of one user, for one message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    /// The message's channel.
    pub channel: u64,
    /// The message's seq.
    pub seq: u64,
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

/// A record of the outbox log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Record {
    /// A push to send.
    Item(Item),
    /// The decider's cursors after the items before this record: (partition, offset)
    /// pairs (a list: an internally tagged enum cannot read back integer map keys), and
    /// the metadata log's.
    Cursors {
        /// Each partition's offset to read next.
        partitions: Vec<(u32, u64)>,
        /// The metadata log's offset to read next.
        meta: u64,
    },
}

/// An item with its place in the log.
#[derive(Clone, Debug)]
pub struct Pending {
    /// The offset of its record.
    pub at: u64,
    /// The offset after it.
    pub end: u64,
    /// The item.
    pub item: Item,
}

/// The decider's cursors, as last stored.
#[derive(Clone, Debug, Default)]
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
    /// Wakes the sender when items were appended.
    pub appended: tokio::sync::Notify,
}

struct Inner {
    file: File,
    len: u64,
    /// Items appended and not yet taken by the sender.
    queue: VecDeque<Pending>,
}

/// What [`Outbox::open`] found.
pub struct Opened {
    /// The outbox.
    pub outbox: Arc<Outbox>,
    /// The decider's stored cursors (`None` on a first start).
    pub cursors: Option<Cursors>,
    /// The sender's stored cursor.
    pub sent: u64,
}

fn frame(record: &Record, out: &mut Vec<u8>) {
    let payload = serde_json::to_vec(record).expect("a record serializes");
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
}

/// Reads whole records from the start; answers them with their offsets and the offset
/// after the last whole one.
fn scan(bytes: &[u8]) -> (Vec<(u64, u64, Record)>, u64) {
    let mut records = Vec::new();
    let mut at = 0usize;
    while bytes.len() - at >= 8 {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().expect("4 bytes"));
        let start = at + 8;
        if len > RECORD_BYTES_MAX || bytes.len() - start < len as usize {
            break;
        }
        let payload = &bytes[start..start + len as usize];
        if crc32fast::hash(payload) != crc {
            break;
        }
        let Ok(record) = serde_json::from_slice::<Record>(payload) else {
            break;
        };
        let end = start + len as usize;
        records.push((at as u64, end as u64, record));
        at = end;
    }
    (records, at as u64)
}

/// Writes `bytes` to `path` durably: a temporary file, fsync, rename, directory fsync.
pub fn store_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}

impl Outbox {
    /// Opens (or creates) the outbox in `dir`. Cuts off whatever follows the last whole
    /// cursors record, and queues the items at and after the sender's cursor.
    pub fn open(dir: &Path) -> std::io::Result<Opened> {
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
        // The cursor, then the offsets of items after it that were answered too.
        let text = match std::fs::read_to_string(dir.join("sent")) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e),
        };
        let mut numbers = text
            .split_whitespace()
            .filter_map(|n| n.parse::<u64>().ok());
        let sent = numbers.next().unwrap_or(0);
        let answered: BTreeSet<u64> = numbers.collect();
        let mut cursors = None;
        let mut kept = 0;
        let mut items = Vec::new();
        for (at, end, record) in records {
            match record {
                Record::Item(item) => items.push(Pending { at, end, item }),
                Record::Cursors { partitions, meta } => {
                    let partitions = partitions.into_iter().collect();
                    cursors = Some(Cursors { partitions, meta });
                    kept = end;
                }
            }
        }
        items.retain(|p| p.end <= kept && p.at >= sent && !answered.contains(&p.at));
        if (bytes.len() as u64) > kept {
            tracing::warn!(
                cut = bytes.len() as u64 - kept,
                "notify outbox: cutting off records after the last stored cursors"
            );
            file.set_len(kept)?;
            file.sync_all()?;
        }
        file.seek(SeekFrom::End(0))?;
        let outbox = Arc::new(Outbox {
            dir: dir.to_owned(),
            inner: Mutex::new(Inner {
                file,
                len: kept,
                queue: items.into(),
            }),
            appended: tokio::sync::Notify::new(),
        });
        Ok(Opened {
            outbox,
            cursors,
            sent,
        })
    }

    /// Appends items and then the cursors after them, in one write, and fsyncs; then
    /// queues the items for the sender and wakes it.
    pub fn append(&self, items: Vec<Item>, cursors: &Cursors) -> std::io::Result<()> {
        let mut bytes = Vec::new();
        let mut inner = self.inner.lock().expect("outbox lock");
        let base = inner.len;
        let mut placed = Vec::with_capacity(items.len());
        for item in items {
            let at = base + bytes.len() as u64;
            let record = Record::Item(item);
            frame(&record, &mut bytes);
            let Record::Item(item) = record else {
                unreachable!()
            };
            placed.push(Pending {
                at,
                end: base + bytes.len() as u64,
                item,
            });
        }
        frame(
            &Record::Cursors {
                partitions: cursors.partitions.iter().map(|(p, o)| (*p, *o)).collect(),
                meta: cursors.meta,
            },
            &mut bytes,
        );
        inner.file.write_all(&bytes)?;
        inner.file.sync_data()?;
        inner.len += bytes.len() as u64;
        let any = !placed.is_empty();
        inner.queue.extend(placed);
        drop(inner);
        if any {
            self.appended.notify_one();
        }
        Ok(())
    }

    /// Takes the items queued since the last call, in log order.
    pub fn take(&self) -> Vec<Pending> {
        self.inner
            .lock()
            .expect("outbox lock")
            .queue
            .drain(..)
            .collect()
    }

    /// The log's length: the sender's cursor when nothing is pending.
    pub fn len(&self) -> u64 {
        self.inner.lock().expect("outbox lock").len
    }

    /// Whether the log holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stores the sender's cursor durably, with the offsets of the items after it that
    /// were answered too (at most the requests in flight), so that a restart resends only
    /// what was answered after this store.
    pub fn store_sent(&self, sent: u64, answered: &BTreeSet<u64>) -> std::io::Result<()> {
        let mut text = sent.to_string();
        for at in answered.range(sent..) {
            text.push(' ');
            text.push_str(&at.to_string());
        }
        store_file(&self.dir.join("sent"), text.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(seq: u64) -> Item {
        Item {
            channel: 1,
            seq,
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
        let opened = Outbox::open(dir.path()).unwrap();
        assert!(opened.cursors.is_none());
        let outbox = opened.outbox;
        outbox.append(vec![item(1), item(2)], &cursors(10)).unwrap();
        let taken = outbox.take();
        assert_eq!(taken.len(), 2);
        outbox.append(vec![item(3)], &cursors(20)).unwrap();
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
        let opened = Outbox::open(dir.path()).unwrap();
        assert_eq!(opened.cursors.as_ref().unwrap().partitions[&0], 20);
        assert_eq!(opened.outbox.len(), whole);
        let pending = opened.outbox.take();
        assert_eq!(
            pending.iter().map(|p| p.item.seq).collect::<Vec<_>>(),
            vec![3]
        );
        // An item answered after the cursor is not sent again.
        let cursor = taken[0].at;
        opened
            .outbox
            .store_sent(cursor, &[taken[1].at].into())
            .unwrap();
        drop(opened);
        let again = Outbox::open(dir.path()).unwrap().outbox.take();
        let seqs: Vec<u64> = again.iter().map(|p| p.item.seq).collect();
        assert_eq!(seqs, vec![1, 3]);
    }
}
