//! The cluster simulation's checker: the fault test's rules, applied to every node's
//! event log of every group once the cluster has converged.

use super::{Dir, Truth};
use chorus_log::Log;
use std::collections::BTreeMap;

/// One group's events on one node, in order: (offset, event id).
pub(super) type Events = Vec<(u64, u64)>;

/// `[node][group]`: every node's events of every group.
pub(super) type Logs = Vec<Vec<Events>>;

/// The events of `log`, in order.
pub(super) async fn read_all(log: &Log<Dir>) -> Events {
    let mut out = Vec::new();
    let mut at = log.first_offset();
    while at < log.next_offset() {
        let records = log.read(at, 64 * 1024).await.unwrap_or_default();
        if records.is_empty() {
            break;
        }
        for r in records {
            let id = <[u8; 8]>::try_from(&r.payload[..]).map_or(u64::MAX, u64::from_le_bytes);
            out.push((r.offset, id));
            at = r.offset + 1;
        }
    }
    out
}

/// Checks every group's logs against what the writers learned.
pub(super) fn check(logs: &Logs, truth: &Truth, groups: u64) -> Result<(), String> {
    for g in 0..groups as usize {
        let first = &logs[0][g];
        // One order everywhere: the same events at the same offsets on every node.
        for (i, node) in logs.iter().enumerate().skip(1) {
            if node[g] != *first {
                let at = first.iter().zip(&node[g]).position(|(a, b)| a != b);
                return Err(format!(
                    "group {g}: node {} holds {} events and node 1 {}; they differ first at \
                     position {at:?}",
                    i + 1,
                    node[g].len(),
                    first.len()
                ));
            }
        }
        // No gap, nothing twice, nothing never proposed or refused.
        let mut seen: BTreeMap<u64, u64> = BTreeMap::new();
        for (k, &(offset, id)) in first.iter().enumerate() {
            if k > 0 && offset != first[k - 1].0 + 1 {
                return Err(format!("group {g}: a gap before offset {offset}"));
            }
            if truth.proposed.get(&id) != Some(&(g as u64)) {
                return Err(format!(
                    "group {g}: event {id} at offset {offset} was never proposed to it"
                ));
            }
            if truth.refused.contains(&id) {
                return Err(format!(
                    "group {g}: event {id} at offset {offset} was refused to its writer"
                ));
            }
            if let Some(before) = seen.insert(id, offset) {
                return Err(format!(
                    "group {g}: event {id} is there twice, at {before} and {offset}"
                ));
            }
        }
        // Every acknowledged event, where its acknowledgement said.
        for (&id, &offset) in &truth.acked {
            if truth.proposed[&id] != g as u64 {
                continue;
            }
            match seen.get(&id) {
                Some(&at) if at == offset => {}
                Some(&at) => {
                    return Err(format!(
                        "group {g}: event {id} was acknowledged at offset {offset} but is at {at}"
                    ))
                }
                None => {
                    return Err(format!(
                        "group {g}: event {id}, acknowledged at offset {offset}, is lost"
                    ))
                }
            }
        }
    }
    Ok(())
}

/// A digest of every log.
pub(super) fn digest(logs: &Logs) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for node in logs {
        for group in node {
            for &(offset, id) in group {
                for v in [offset, id] {
                    h ^= v;
                    h = h.wrapping_mul(0x0100_0000_01b3);
                }
            }
            h ^= 0xff;
        }
    }
    h
}
