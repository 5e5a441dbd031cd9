//! The decider's snapshot, `<data>/notify/decider.snap`: what the decider built from the
//! logs (channels, display names, memberships, preferences and devices) and the offsets
//! of every log it had read when it took it. A restart loads it and reads the logs from
//! those offsets instead of from their beginning, and the decider acknowledges them to the
//! engine, so the logs before them may be deleted by retention.
//!
//! A snapshot is an optimisation, never the source of truth: one that is missing, damaged,
//! of another version, or ahead of the outbox's stored cursors is ignored (with a warning),
//! and the decider reads every log from its beginning as before.
//!
//! Format, version 1: magic `CHNOTIFY`, u32 LE version, u32 LE length and a JSON
//! [`Header`], u32 LE count and that many preference changes, each a u32 LE length and the
//! change as the metadata log encodes it (`MetaEvent::Notify`, validated on reading), then
//! a u32 LE CRC-32 of every byte before it. Written through a temporary file, fsync and
//! rename ([`crate::outbox::store_file`]).

use crate::outbox::Cursors;
use chorus_engine::domain::event::{self, Decoded, MetaEvent, MetaRecord};
use chorus_engine::domain::notify::NotifyState;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"CHNOTIFY";
/// The snapshot format version written by this code.
pub const VERSION: u32 = 1;

/// The decider's state, as a snapshot holds it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// The offset of each log to read next: the state covers everything before them.
    pub cursors: Cursors,
    /// Users' display names, by user ID.
    pub names: Vec<(u64, String)>,
    /// Channels: ID, whether a DM, name.
    pub channels: Vec<(u64, bool, String)>,
    /// Memberships: channel ID, user ID.
    pub members: Vec<(u64, u64)>,
}

/// A loaded snapshot.
#[derive(Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// Everything but preferences.
    pub header: Header,
    /// Preferences and devices.
    pub notify: NotifyState,
}

/// The snapshot's path under the notifications directory.
pub fn path(dir: &Path) -> PathBuf {
    dir.join("decider.snap")
}

/// Encodes a snapshot.
pub fn encode(header: &Header, notify: &NotifyState) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&VERSION.to_le_bytes());
    let json = serde_json::to_vec(header).expect("a header always serializes");
    put_bytes(&mut out, &json);
    let changes = notify.changes();
    out.extend_from_slice(&(changes.len() as u32).to_le_bytes());
    for change in changes {
        let record = MetaRecord {
            at_us: 0,
            event: MetaEvent::Notify(Box::new(change)),
        };
        put_bytes(&mut out, &event::encode_meta(&record));
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Decodes a snapshot, checking its checksum, version and every record.
pub fn decode(bytes: &[u8]) -> Result<Snapshot, String> {
    let (body, crc) = bytes
        .split_last_chunk::<4>()
        .ok_or("shorter than its checksum")?;
    if crc32fast::hash(body) != u32::from_le_bytes(*crc) {
        return Err("checksum mismatch".into());
    }
    let mut r = Reader(body);
    if r.take(8)? != MAGIC {
        return Err("not a decider snapshot".into());
    }
    let version = r.u32()?;
    if version != VERSION {
        return Err(format!("format version {version} is not known"));
    }
    let len = r.u32()? as usize;
    let header: Header = serde_json::from_slice(r.take(len)?).map_err(|e| e.to_string())?;
    let mut notify = NotifyState::default();
    for _ in 0..r.u32()? {
        let len = r.u32()? as usize;
        match event::decode(r.take(len)?).map_err(|e| e.to_string())? {
            Decoded::Meta(MetaRecord {
                event: MetaEvent::Notify(change),
                ..
            }) => notify.apply(&change),
            other => return Err(format!("not a preference change: {other:?}")),
        }
    }
    if !r.0.is_empty() {
        return Err(format!("{} bytes after the last change", r.0.len()));
    }
    Ok(Snapshot { header, notify })
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("truncated".into());
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }
}

/// Loads the snapshot in `dir` if there is a usable one: none, or a damaged one, is
/// `None` (the latter with a warning).
pub fn load(dir: &Path) -> Option<Snapshot> {
    let bytes = match std::fs::read(path(dir)) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(error = %e, "notify decider: snapshot not read; reading the logs whole");
            return None;
        }
    };
    match decode(&bytes) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "notify decider: snapshot ignored; reading the logs whole");
            None
        }
    }
}

/// Whether a snapshot's cursors are at or before the stored ones in every log: a snapshot
/// is taken after its cursors were stored, so one ahead of them belongs to another outbox.
pub fn within(snapshot: &Cursors, stored: &Cursors) -> bool {
    snapshot.meta <= stored.meta
        && (snapshot.partitions.iter())
            .all(|(p, at)| *at <= stored.partitions.get(p).copied().unwrap_or(0))
}

/// A map's entries sorted by key, as [`Header`] lists them.
pub fn sorted<K: Copy + Ord, V: Clone>(map: impl IntoIterator<Item = (K, V)>) -> Vec<(K, V)> {
    let mut v: Vec<(K, V)> = map.into_iter().collect();
    v.sort_unstable_by_key(|(k, _)| *k);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use chorus_engine::domain::notify::{NotifyChange, NotifyPrefs, Platform, PushDevice};
    use chorus_engine::ids::{DeviceId, UserId};

    fn sample() -> (Header, NotifyState) {
        let mut notify = NotifyState::default();
        notify.apply(&NotifyChange::Prefs {
            user: UserId(2),
            prefs: NotifyPrefs {
                keywords: vec!["deploy".into()],
                ..Default::default()
            },
        });
        notify.apply(&NotifyChange::DeviceAdded(PushDevice {
            id: DeviceId(5),
            user: UserId(2),
            app_id: "chat.test".into(),
            pushkey: "k".into(),
            platform: Platform::Fcm,
            at_us: 1,
        }));
        let header = Header {
            cursors: Cursors {
                partitions: [(0, 7), (1, 9)].into(),
                meta: 12,
            },
            names: vec![(2, "bob".into())],
            channels: vec![(40, false, "general".into()), (41, true, String::new())],
            members: vec![(40, 2), (41, 2)],
        };
        (header, notify)
    }

    // A snapshot reads back as written; any flipped bit or truncation is refused, never
    // misread.
    #[test]
    fn round_trip_and_damage() {
        let (header, notify) = sample();
        let bytes = encode(&header, &notify);
        let back = decode(&bytes).unwrap();
        assert_eq!((back.header, back.notify), (header, notify));
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            assert!(decode(&bad).is_err(), "flip at {i} accepted");
        }
        for n in 0..bytes.len() {
            assert!(decode(&bytes[..n]).is_err(), "truncation to {n} accepted");
        }
    }

    // A snapshot is used only if it lies within the stored cursors.
    #[test]
    fn within_the_stored_cursors() {
        let at = |p0, meta| Cursors {
            partitions: [(0, p0)].into(),
            meta,
        };
        assert!(within(&at(5, 5), &at(5, 6)));
        assert!(!within(&at(6, 5), &at(5, 6)));
        assert!(!within(&at(5, 7), &at(5, 6)));
        assert!(within(&Cursors::default(), &at(0, 0)));
    }
}
