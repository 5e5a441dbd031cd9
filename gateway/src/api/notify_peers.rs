//! Notifications on a cluster, the gateway's side (`chorus_notify::cluster` says what
//! travels and why): on shard 0, every [`PULL_EVERY`], this node finds whether it leads
//! the directory, which makes it the sending node. If it does not, it asks the
//! directory's leader what it answered; if it has just become it, it first asks every
//! peer it can reach what they heard, and only then lets its senders send. Peers' calls
//! for what this node confirmed are answered from its gate.

use crate::ctx::ShardCtx;
use chorus_notify::cluster::{Confirmed, Gate, MAGIC, PULL_EVERY};
use futures::future::{select, Either};
use std::rc::Rc;
use std::time::Duration;

/// The longest a pull may take before it counts as unanswered.
const PULL_TIMEOUT: Duration = Duration::from_secs(1);

/// Whether a call from a peer asks what this node confirmed.
pub fn is_notify(bytes: &[u8]) -> bool {
    bytes.first() == Some(&MAGIC)
}

/// Answers a peer's call: what this node confirmed (empty when it does not notify).
pub fn answer(ctx: &ShardCtx) -> Vec<u8> {
    match &ctx.shared.notify_gate {
        Some(gate) => gate.confirmed().encode(),
        None => Vec::new(),
    }
}

/// Asks `peer` what it confirmed; `None` if it did not answer in time or is not notifying.
async fn pull(ctx: &ShardCtx, peer: u64) -> Option<Confirmed> {
    let call = Box::pin(ctx.shared.call_peer(0, peer, &[MAGIC]));
    let late = Box::pin(glommio::timer::sleep(PULL_TIMEOUT));
    match select(call, late).await {
        Either::Left((Ok(bytes), _)) => Confirmed::decode(&bytes),
        Either::Left((Err(e), _)) => {
            tracing::debug!(peer, error = %e, "notifications: no confirmation from a peer");
            None
        }
        Either::Right(_) => None,
    }
}

/// Runs on shard 0 of a cluster node that notifies, for as long as the node runs.
pub async fn run(ctx: Rc<ShardCtx>) {
    let (Some(cluster), Some(gate)) = (&ctx.shared.cluster, &ctx.shared.notify_gate) else {
        return;
    };
    loop {
        glommio::timer::sleep(PULL_EVERY).await;
        let leader = ctx.shared.directory_leader();
        if leader == Some(cluster.me) {
            if !gate.sending() {
                take_over(&ctx, gate, cluster.me).await;
            }
            continue;
        }
        gate.set_sending(false);
        if let Some(leader) = leader {
            if let Some(confirmed) = pull(&ctx, leader).await {
                gate.heard(confirmed);
            }
        }
    }
}

/// Asks every peer what it heard, all at once, and then makes this node the sending node.
async fn take_over(ctx: &ShardCtx, gate: &Gate, me: u64) {
    let Some(cluster) = &ctx.shared.cluster else {
        return;
    };
    let peers: Vec<u64> = cluster.nodes().into_keys().filter(|n| *n != me).collect();
    let pulls = peers.iter().map(|&peer| pull(ctx, peer));
    let heard = futures::future::join_all(pulls).await;
    let answered = heard.iter().filter(|h| h.is_some()).count();
    for confirmed in heard.into_iter().flatten() {
        gate.heard(confirmed);
    }
    tracing::info!(
        peers = peers.len(),
        answered,
        "notifications: this node leads the directory and sends from now on"
    );
    gate.set_sending(true);
}
