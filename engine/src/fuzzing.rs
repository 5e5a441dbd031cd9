//! Checked entries to the engine's decoders, for the fuzz targets in `fuzz/` and for the
//! replay of their corpora on the stable toolchain (`engine/tests/fuzz_corpus.rs`). Each
//! takes arbitrary bytes, must not panic whatever they are, and asserts what a successful
//! decode promises. Hidden from the documentation: this is not part of the engine's API.

use crate::domain::event::{self, Decoded};
use crate::runtime::partition::{read_channels, write_channels};
use crate::snapshot;

/// Decodes arbitrary bytes as an event log payload with [`event::decode`], the check every
/// payload read from a log passes. A payload it accepts must re-encode to one that decodes
/// to the same event with the same stored frame, and that re-encoding is canonical: it
/// encodes back to itself byte for byte. The input itself need not: validation does not
/// look at bytes that no field covers (the padding after an enum variant shorter than its
/// largest, bytes that no pointer reaches), and a pointer may place its data anywhere in
/// the archive. Returns whether the payload was accepted.
pub fn event(data: &[u8]) -> bool {
    let Ok(decoded) = event::decode(data) else {
        return false;
    };
    let frame = event::stored_frame(data);
    let again = encode(&decoded, frame);
    let redecoded = event::decode(&again).expect("a re-encoded event decodes");
    assert_eq!(redecoded, decoded, "an event changed in re-encoding");
    if let Decoded::Channel(_) = decoded {
        assert_eq!(
            event::stored_frame(&again),
            frame,
            "the stored frame changed"
        );
    }
    assert_eq!(
        encode(&redecoded, event::stored_frame(&again)),
        again,
        "re-encoding is not canonical"
    );
    true
}

fn encode(decoded: &Decoded, frame: &[u8]) -> Vec<u8> {
    match decoded {
        Decoded::Meta(record) => event::encode_meta(record),
        Decoded::Channel(record) => event::encode_channel(record, frame),
        Decoded::Read(record) => event::encode_read(record),
    }
}

/// Decodes arbitrary bytes as a partition's snapshot: as a whole file, and as a body sealed
/// into a file with a right header and checksum, so that a fuzzer reaches the body's checks
/// behind the checksum. The file is verified with `snapshot::parse` and its channels are
/// read as a restart reads them (`ChannelState::restore` for each); counts are checked
/// against the bytes left, so no length the bytes cannot back is ever allocated. Channels
/// that are accepted must write out to a snapshot that reads back to the same channels.
/// Returns whether either file was accepted.
pub fn snapshot(data: &[u8]) -> bool {
    let partition = data
        .get(12..16)
        .map_or(0, |b| u32::from_le_bytes(b.try_into().expect("4 bytes")));
    let mut accepted = snapshot_file(data.to_vec(), partition);
    if let Some(end) = data.len().checked_sub(8) {
        let mut sealed = data.to_vec();
        let sum = xxhash_rust::xxh3::xxh3_64(&sealed[..end]);
        sealed[end..].copy_from_slice(&sum.to_le_bytes());
        accepted |= snapshot_file(sealed, partition);
    }
    accepted |= snapshot_file(snapshot::seal(data, partition, 1), partition);
    accepted
}

fn snapshot_file(file: Vec<u8>, partition: u32) -> bool {
    let Ok(loaded) = snapshot::parse(file, partition) else {
        return false;
    };
    let Ok(channels) = read_channels(&loaded) else {
        return false;
    };
    let mut w = snapshot::Writer::default();
    write_channels(&mut w, channels.iter().map(|(s, o)| (s, &o[..])));
    let again = snapshot::parse(w.finish(partition, loaded.next_offset), partition)
        .expect("a written snapshot parses");
    assert_eq!(again.next_offset, loaded.next_offset);
    let reread = read_channels(&again).expect("a written snapshot reads back");
    assert_eq!(
        reread, channels,
        "channels changed in a snapshot's round trip"
    );
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::channel::ChannelState;
    use crate::domain::event::{
        Body, ChannelEvent, ChannelKind, ChannelRecord, Mentions, MetaEvent, MetaRecord, Role,
    };
    use crate::ids::{ChannelId, UserId, WorkspaceId};

    /// A channel with every kind of event: members who joined and left, a thread, an edit,
    /// a deletion, reactions, idempotency keys and a blob body.
    fn busy_channel() -> ChannelState {
        let mut s = ChannelState::new(ChannelId(2), WorkspaceId(1), ChannelKind::Public, UserId(1));
        let post = |user, text: &str, thread, key: Option<&str>| ChannelEvent::MessagePosted {
            user: UserId(user),
            body: Body::Text(text.into()),
            thread,
            client_msg_id: key.map(Into::into),
            mentions: Mentions::default(),
        };
        let events = [
            ChannelEvent::MemberJoined {
                user: UserId(1),
                by: UserId(1),
            },
            ChannelEvent::MemberJoined {
                user: UserId(2),
                by: UserId(1),
            },
            post(1, "root", None, Some("k1")),
            post(2, "reply", Some(3), Some("k2")),
            post(1, "other", None, None),
            ChannelEvent::MessageEdited {
                target: 3,
                body: Body::Text("root, edited".into()),
                mentions: Mentions::default(),
            },
            ChannelEvent::ReactionAdded {
                target: 3,
                emoji: "+1".into(),
                user: UserId(2),
            },
            ChannelEvent::MessageDeleted {
                target: 5,
                by: UserId(1),
            },
            ChannelEvent::MessagePosted {
                user: UserId(2),
                body: Body::Blob {
                    hash: [7; 32],
                    len: 70_000,
                },
                thread: None,
                client_msg_id: None,
                mentions: Mentions::default(),
            },
            ChannelEvent::MemberLeft {
                user: UserId(2),
                by: UserId(2),
            },
        ];
        for (i, e) in events.iter().enumerate() {
            let seq = i as u64 + 1;
            s.apply(seq, 1_000 + seq, e);
        }
        s
    }

    /// The body of a partition snapshot holding `channels`, each with made-up log offsets.
    fn body_of(channels: &[ChannelState]) -> Vec<u8> {
        let offsets: Vec<Vec<u64>> = channels
            .iter()
            .map(|s| (1..=s.last_seq()).map(|seq| seq * 3).collect())
            .collect();
        let mut w = snapshot::Writer::default();
        write_channels(
            &mut w,
            channels.iter().zip(&offsets).map(|(s, o)| (s, &o[..])),
        );
        let file = w.finish(0, 1);
        file[32..file.len() - 8].to_vec()
    }

    // A real snapshot is accepted and round-trips, as a whole file and as a body alone.
    #[test]
    fn valid_snapshot_round_trips() {
        let quiet = ChannelState::new(ChannelId(9), WorkspaceId(1), ChannelKind::Dm, UserId(3));
        let body = body_of(&[busy_channel(), quiet]);
        assert!(snapshot(&snapshot::seal(&body, 4, 77)));
        assert!(snapshot(&body));
    }

    // A huge count written over any 8 bytes of a real snapshot is refused (or read as
    // something valid) without allocating for it: nothing is reserved from a count the
    // bytes left cannot back.
    #[test]
    fn huge_counts_are_refused() {
        let body = body_of(&[busy_channel()]);
        for at in 0..=body.len() - 8 {
            for huge in [u64::MAX, u64::MAX / 45, 1 << 40] {
                let mut bad = body.clone();
                bad[at..at + 8].copy_from_slice(&huge.to_le_bytes());
                snapshot(&bad);
            }
        }
    }

    // Every kind of event is accepted and round-trips; cut short or versioned otherwise,
    // it is refused without a panic.
    #[test]
    fn events_round_trip_and_damage_is_refused() {
        let meta = MetaRecord {
            at_us: 5,
            event: MetaEvent::MemberAdded {
                workspace: WorkspaceId(1),
                user: UserId(2),
                role: Role::Admin,
                by: UserId(1),
            },
        };
        let channel = ChannelRecord {
            channel: ChannelId(3),
            workspace: WorkspaceId(1),
            seq: 4,
            at_us: 6,
            event: ChannelEvent::ReactionRemoved {
                target: 2,
                emoji: "a longer emoji name".into(),
                user: UserId(2),
            },
        };
        let payloads = [
            event::encode_meta(&meta),
            event::encode_channel(&channel, b"{\"type\":\"event\"}"),
        ];
        for p in &payloads {
            assert!(event(p));
            for cut in 0..p.len() - 1 {
                let _ = event(&p[..cut]);
            }
            let mut v2 = p.clone();
            v2[0] = 2;
            assert!(!event(&v2));
        }
    }
}
