//! The final check of a run, against the logs the node left on the simulated disk.
//!
//! The logs are the truth: what is in them is what was committed and survived. The
//! checker reads every partition's log and the metadata log straight from the disk, with
//! the stored frame of every event (from the blob store when it is large), and checks:
//!
//! 1. **One gapless order.** Each channel's events have seqs 1, 2, 3, … in log order, each
//!    once.
//! 2. **Durable before delivered.** Every event frame any client received is in the logs at
//!    its channel and seq, byte for byte: a frame of an event that a crash lost would show
//!    as a different event at that seq, or none.
//! 3. **Acknowledged means durable, exactly once.** Every operation has an identity no
//!    other has (a post's `client_msg_id`, an edit's text, an emoji): an acknowledged one
//!    is in the logs exactly once (a post at the seq its ack named); a refused one is not
//!    in them; one whose answer was lost (a crash, a closed session) is in them at most
//!    once.
//! 4. **Nothing unacknowledged appears.** Every event in the logs comes from an operation
//!    a client issued (or the first members of a channel its creator asked for). An event
//!    whose answer was lost may be there, but then it is durable (it is in the log) and
//!    counted once, as 3 says.
//!
//! The stream rules (gapless, no repeats, correct resumes) are checked as frames arrive,
//! by [`crate::model::World::on_event`] and [`crate::model::World::on_resumed`].

use crate::model::{OpKind, Outcome, World};
use bytes::Bytes;
use chorus_engine::blob::{BlobRef, BlobStore, StorageBlobStore};
use chorus_engine::domain::event::{self, Body, ChannelEvent, ChannelRecord, Decoded, MetaEvent};
use chorus_engine::ids::{ChannelId, UserId};
use chorus_log::{Log, LogConfig, SimRoot};
use futures::executor::block_on;
use std::collections::BTreeMap;

/// One committed channel event, as the logs hold it.
pub struct Committed {
    /// The record.
    pub record: ChannelRecord,
    /// The frame subscribers were sent.
    pub frame: Bytes,
}

/// What the logs hold.
#[derive(Default)]
pub struct Logs {
    /// Each channel's events, in log order.
    pub channels: BTreeMap<ChannelId, Vec<Committed>>,
    /// The first members of each channel the directory created.
    pub initial: BTreeMap<ChannelId, Vec<UserId>>,
    /// The names of the channels created, with their kind.
    pub created: Vec<(ChannelId, String, Vec<UserId>)>,
}

/// Reads every log of the node from the disk. Call it once the engine is closed.
pub fn read_logs(root: &SimRoot, partitions: u32) -> Result<Logs, String> {
    let mut logs = Logs::default();
    for record in read_log(root, "meta")? {
        match event::decode(&record.payload) {
            Ok(Decoded::Meta(m)) => {
                if let MetaEvent::ChannelCreated {
                    channel,
                    name,
                    members,
                    ..
                } = m.event
                {
                    logs.initial.insert(channel, members.clone());
                    logs.created.push((channel, name, members));
                }
            }
            other => return Err(format!("meta offset {}: {other:?}", record.offset)),
        }
    }
    let blobs = StorageBlobStore::new(root.clone());
    for p in 0..partitions {
        for record in read_log(root, &format!("p{p:05}"))? {
            let rec = match event::decode(&record.payload) {
                Ok(Decoded::Channel(rec)) => rec,
                // Read markers are no channel events: the frames checked here are events.
                Ok(Decoded::Read(_)) => continue,
                other => return Err(format!("p{p:05} offset {}: {other:?}", record.offset)),
            };
            let stored = event::stored_frame(&record.payload);
            let frame = if stored.first() == Some(&0) {
                let blob = BlobRef {
                    hash: stored[1..33].try_into().map_err(|_| "short reference")?,
                    len: u64::from_le_bytes(stored[33..41].try_into().map_err(|_| "short")?),
                };
                block_on(blobs.get(blob)).map_err(|e| format!("p{p:05}: frame blob: {e}"))?
            } else {
                Bytes::copy_from_slice(stored)
            };
            logs.channels
                .entry(rec.channel)
                .or_default()
                .push(Committed { record: rec, frame });
        }
    }
    Ok(logs)
}

fn read_log(root: &SimRoot, dir: &str) -> Result<Vec<chorus_log::Record>, String> {
    let storage = root.dir_now(dir);
    let (log, _) =
        block_on(Log::open(storage, LogConfig::default())).map_err(|e| format!("{dir}: {e}"))?;
    let mut out = Vec::new();
    let mut at = log.first_offset();
    while at < log.next_offset() {
        let records = block_on(log.read(at, 1 << 20)).map_err(|e| format!("{dir}: {e}"))?;
        let Some(last) = records.last() else { break };
        at = last.offset + 1;
        out.extend(records);
    }
    Ok(out)
}

/// Checks the run's observations and operations against the logs; returns every rule
/// broken.
pub fn check(world: &World, logs: &Logs) -> Vec<String> {
    let mut bad = world.violations.clone();
    check_order(logs, &mut bad);
    check_seen(world, logs, &mut bad);
    check_ops(world, logs, &mut bad);
    check_origins(world, logs, &mut bad);
    bad
}

fn check_order(logs: &Logs, bad: &mut Vec<String>) {
    for (channel, events) in &logs.channels {
        for (i, e) in events.iter().enumerate() {
            if e.record.seq != i as u64 + 1 {
                bad.push(format!(
                    "channel {channel}: the log's event {} has seq {}",
                    i + 1,
                    e.record.seq
                ));
                break;
            }
        }
    }
}

fn committed(logs: &Logs, channel: ChannelId, seq: u64) -> Option<&Committed> {
    let events = logs.channels.get(&channel)?;
    let e = events.get(seq.checked_sub(1)? as usize)?;
    (e.record.seq == seq).then_some(e)
}

fn check_seen(world: &World, logs: &Logs, bad: &mut Vec<String>) {
    for s in &world.seen {
        match committed(logs, s.channel, s.seq) {
            Some(e) if e.frame == s.frame => {}
            Some(e) => bad.push(format!(
                "user {} received {} seq {} as {}, but the log holds {}",
                s.user,
                s.channel,
                s.seq,
                String::from_utf8_lossy(&s.frame),
                String::from_utf8_lossy(&e.frame)
            )),
            None => bad.push(format!(
                "user {} received {} seq {}, which no log holds: {}",
                s.user,
                s.channel,
                s.seq,
                String::from_utf8_lossy(&s.frame)
            )),
        }
    }
}

/// The events of `channel` that match `f`, with their seqs.
fn matching(logs: &Logs, channel: ChannelId, mut f: impl FnMut(&ChannelEvent) -> bool) -> Vec<u64> {
    logs.channels
        .get(&channel)
        .into_iter()
        .flatten()
        .filter(|e| f(&e.record.event))
        .map(|e| e.record.seq)
        .collect()
}

fn text_of(body: &Body) -> Option<&str> {
    match body {
        Body::Text(t) => Some(t),
        Body::Blob { .. } | Body::Ciphertext(_) => None,
    }
}

fn check_ops(world: &World, logs: &Logs, bad: &mut Vec<String>) {
    // Posts are grouped by key: a post whose answer was lost is sent again with its key.
    let mut posts: BTreeMap<(UserId, &str), (ChannelId, Vec<&Outcome>)> = BTreeMap::new();
    for op in &world.ops {
        let found = match &op.kind {
            OpKind::Post { channel, key, .. } => {
                let e = posts
                    .entry((op.user, key.as_str()))
                    .or_insert((*channel, Vec::new()));
                e.1.push(&op.outcome);
                continue;
            }
            OpKind::Edit { message, text } => matching(logs, message.channel, |e| {
                matches!(e, ChannelEvent::MessageEdited { target, body, .. }
                    if *target == message.seq && text_of(body) == Some(text))
            }),
            OpKind::Delete { message } => matching(logs, message.channel, |e| {
                matches!(e, ChannelEvent::MessageDeleted { target, by }
                    if *target == message.seq && *by == op.user)
            }),
            OpKind::ReactAdd { message, emoji } => matching(logs, message.channel, |e| {
                matches!(e, ChannelEvent::ReactionAdded { target, emoji: x, user }
                    if *target == message.seq && x == emoji && *user == op.user)
            }),
            OpKind::ReactRemove { message, emoji } => matching(logs, message.channel, |e| {
                matches!(e, ChannelEvent::ReactionRemoved { target, emoji: x, user }
                    if *target == message.seq && x == emoji && *user == op.user)
            }),
            // Membership and directory operations have no identity of their own (a join of
            // a member changes nothing); they are checked by `check_origins`.
            _ => continue,
        };
        let ok = match op.outcome {
            Outcome::Acked(_) => found.len() == 1,
            Outcome::Refused(_) => found.is_empty(),
            Outcome::Unknown | Outcome::Pending => found.len() <= 1,
        };
        if !ok {
            bad.push(format!(
                "{:?} by {} ({:?}) is in the log {} times, at {found:?}",
                op.kind,
                op.user,
                op.outcome,
                found.len()
            ));
        }
    }
    for ((user, key), (channel, outcomes)) in posts {
        let found = matching(logs, channel, |e| {
            matches!(e, ChannelEvent::MessagePosted { user: u, client_msg_id: Some(k), .. }
                if *u == user && k == key)
        });
        let acked: Vec<u64> = outcomes
            .iter()
            .filter_map(|o| match o {
                Outcome::Acked(Some(m)) => Some(m["seq"].as_u64().unwrap_or(0)),
                _ => None,
            })
            .collect();
        let refused = outcomes.iter().all(|o| matches!(o, Outcome::Refused(_)));
        let ok = if !acked.is_empty() {
            found.len() == 1 && acked.iter().all(|s| *s == found[0])
        } else if refused {
            found.is_empty()
        } else {
            found.len() <= 1
        };
        if !ok {
            bad.push(format!(
                "post {key} by {user} in {channel} ({outcomes:?}) is in the log at {found:?}"
            ));
        }
    }
}

fn check_origins(world: &World, logs: &Logs, bad: &mut Vec<String>) {
    let mut joins: BTreeMap<(ChannelId, UserId), i64> = BTreeMap::new();
    let mut leaves: BTreeMap<(ChannelId, UserId), i64> = BTreeMap::new();
    for (channel, members) in &logs.initial {
        for u in members {
            *joins.entry((*channel, *u)).or_default() += 1;
        }
    }
    for op in &world.ops {
        match &op.kind {
            OpKind::Join { channel } => *joins.entry((*channel, op.user)).or_default() += 1,
            OpKind::Leave { channel } => *leaves.entry((*channel, op.user)).or_default() += 1,
            _ => {}
        }
    }
    for (name, created) in [("created channel", &logs.created)] {
        for (channel, channel_name, members) in created.iter() {
            let issued = world.ops.iter().any(|op| match &op.kind {
                OpKind::CreateChannel { name, .. } => name == channel_name,
                OpKind::OpenDm { with, .. } => {
                    channel_name.is_empty()
                        && members.contains(&op.user)
                        && with.iter().all(|u| members.contains(u))
                }
                _ => false,
            });
            if !issued {
                bad.push(format!(
                    "{name} {channel} {channel_name:?} was never asked for"
                ));
            }
        }
    }
    let issued =
        |pred: &dyn Fn(&OpKind, UserId) -> bool| world.ops.iter().any(|op| pred(&op.kind, op.user));
    for (channel, events) in &logs.channels {
        for e in events {
            let seq = e.record.seq;
            let known = match &e.record.event {
                ChannelEvent::MessagePosted {
                    user,
                    client_msg_id,
                    ..
                } => issued(&|k, u| {
                    matches!(k, OpKind::Post { channel: c, key, .. }
                        if u == *user && c == channel && Some(key) == client_msg_id.as_ref())
                }),
                // The simulation uploads no files and opens no encrypted channels, so a
                // post with files, or a device event, was never issued.
                ChannelEvent::MessagePostedWithFiles(_)
                | ChannelEvent::DeviceAdded { .. }
                | ChannelEvent::DeviceRemoved { .. } => false,
                ChannelEvent::MessageEdited { target, body, .. } => issued(&|k, _| {
                    matches!(k, OpKind::Edit { message, text }
                        if message.channel == *channel && message.seq == *target
                            && text_of(body) == Some(text))
                }),
                ChannelEvent::MessageDeleted { target, by } => issued(&|k, u| {
                    matches!(k, OpKind::Delete { message }
                        if u == *by && message.channel == *channel && message.seq == *target)
                }),
                ChannelEvent::ReactionAdded {
                    target,
                    emoji,
                    user,
                } => issued(&|k, u| {
                    matches!(k, OpKind::ReactAdd { message, emoji: x }
                        if u == *user && message.channel == *channel && message.seq == *target
                            && x == emoji)
                }),
                ChannelEvent::ReactionRemoved {
                    target,
                    emoji,
                    user,
                } => issued(&|k, u| {
                    matches!(k, OpKind::ReactRemove { message, emoji: x }
                        if u == *user && message.channel == *channel && message.seq == *target
                            && x == emoji)
                }),
                ChannelEvent::MemberJoined { user, .. } => {
                    let left = joins.entry((*channel, *user)).or_default();
                    *left -= 1;
                    *left >= 0
                }
                ChannelEvent::MemberLeft { user, .. } => {
                    let left = leaves.entry((*channel, *user)).or_default();
                    *left -= 1;
                    *left >= 0
                }
            };
            if !known {
                bad.push(format!(
                    "channel {channel} seq {seq}: {:?} was never asked for (or more often than asked)",
                    e.record.event
                ));
            }
        }
    }
}
