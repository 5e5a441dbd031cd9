//! Notifications on a cluster, the gateway's side (`chorus_notify::cluster` says what
//! travels and why): on shard 0, every [`PULL_EVERY`], this node finds whether it leads
//! the directory, which makes it the sending node. If it does not, it asks the
//! directory's leader what it answered; if it has just become it, it first asks every
//! peer what they heard (for a few seconds, those that do not answer at once), and only
//! then lets its senders send. Peers' calls for what this node confirmed are answered
//! from its gate.

use crate::ctx::ShardCtx;
use chorus_notify::cluster::{Confirmed, Gate, MAGIC, PULL_EVERY};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// The longest a pull may take before it counts as unanswered.
const PULL_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a node that has just become the sending node keeps asking the peers that did
/// not answer (one busy past [`PULL_TIMEOUT`], one whose connection is not up yet right
/// after a restart, or one that does not notify at all) before it sends without them.
/// What an unheard peer confirmed may be sent again, so a few seconds of patience buy
/// fewer repeated notifications at the price of a later first one when a peer is gone.
const TAKE_OVER_PATIENCE: Duration = Duration::from_secs(3);

/// The pause between two rounds of asking the peers that did not answer.
const TAKE_OVER_RETRY: Duration = Duration::from_millis(200);

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
    let what = "notifications: what it confirmed";
    let bytes = ctx
        .shared
        .ask_peer(peer, &[MAGIC], PULL_TIMEOUT, what)
        .await?;
    Confirmed::decode(&bytes)
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

/// Asks every peer what it heard, all at once, asks again those that did not answer
/// until [`TAKE_OVER_PATIENCE`] has passed, and then makes this node the sending node.
async fn take_over(ctx: &ShardCtx, gate: &Gate, me: u64) {
    let Some(cluster) = &ctx.shared.cluster else {
        return;
    };
    let peers: Vec<u64> = cluster.nodes().into_keys().filter(|n| *n != me).collect();
    let deadline = Instant::now() + TAKE_OVER_PATIENCE;
    let mut unheard = peers.clone();
    loop {
        let pulls = unheard.iter().map(|&peer| pull(ctx, peer));
        let heard = futures::future::join_all(pulls).await;
        let mut still = Vec::new();
        for (peer, confirmed) in unheard.iter().zip(heard) {
            match confirmed {
                Some(confirmed) => gate.heard(confirmed),
                None => still.push(*peer),
            }
        }
        unheard = still;
        if unheard.is_empty() || Instant::now() >= deadline {
            break;
        }
        glommio::timer::sleep(TAKE_OVER_RETRY).await;
    }
    // The directory may have moved on while we asked; the loop in `run` then starts over.
    if ctx.shared.directory_leader() != Some(me) {
        return;
    }
    tracing::info!(
        peers = peers.len(),
        answered = peers.len() - unheard.len(),
        ?unheard,
        "notifications: this node leads the directory and sends from now on"
    );
    gate.set_sending(true);
}
