//! Presence between the nodes of a cluster, one shard's side of it
//! (`chorus_engine::presence::peers` says what travels and why): this shard's changes go
//! to the same shard of every peer as notices, with a keepalive every second; the peers'
//! notices pass through a [`Tracker`] into the engine; and a peer asking for a snapshot is
//! answered with the engine's. Notices travel with the server's other notices
//! (`chorus_replication::calls::Calls::notify_peers`); snapshots are calls.

use crate::ctx::ShardCtx;
use chorus_engine::ids::UserId;
use chorus_engine::presence::peers::{
    last_user, snapshot_request, snapshot_request_after, Action, Kind, Notice, Tracker, KEEPALIVE,
    MAGIC,
};
use futures::channel::mpsc;
use futures::StreamExt;
use std::rc::Rc;
use std::sync::OnceLock;
use std::task::Poll;
use std::time::Instant;

/// Whether a notice or call from a peer is presence's.
pub fn is_presence(bytes: &[u8]) -> bool {
    bytes.first() == Some(&MAGIC)
}

/// This process's incarnation: a peer that sees another one knows the node restarted.
fn incarnation() -> u64 {
    static INCARNATION: OnceLock<u64> = OnceLock::new();
    *INCARNATION.get_or_init(|| rand::random::<u64>() | 1)
}

/// Records in one page of a snapshot: about 2.6 MB at most, well within a frame.
const SNAPSHOT_PAGE_RECORDS: usize = 100_000;

/// Answers a peer's call for a page of this shard's snapshot; an empty answer to anything
/// else, or when the engine cannot answer (the peer asks again).
pub async fn answer(ctx: &ShardCtx, request: &[u8]) -> Vec<u8> {
    let Some(after) = snapshot_request_after(request) else {
        return Vec::new();
    };
    let page = ctx
        .shared
        .engine
        .presence_snapshot(ctx.shard, after, SNAPSHOT_PAGE_RECORDS);
    match page.await {
        Ok((seq, records, more)) => Notice {
            kind: if more {
                Kind::SnapshotPart
            } else {
                Kind::Snapshot
            },
            incarnation: incarnation(),
            seq,
            records,
        }
        .encode(),
        Err(e) => {
            tracing::debug!(error = %e, "no presence snapshot for a peer");
            Vec::new()
        }
    }
}

/// Starts this shard's side on a cluster node; presence notices from peers go to the
/// sender it answers.
pub fn start(ctx: Rc<ShardCtx>) -> mpsc::UnboundedSender<(u64, Vec<u8>)> {
    let (tx, notices) = mpsc::unbounded();
    glommio::spawn_local(run(ctx, notices)).detach();
    tx
}

/// What wakes the loop.
enum Next {
    Change(Option<(u64, Vec<chorus_engine::presence::peers::Record>)>),
    Notice(Option<(u64, Vec<u8>)>),
    Snapshot(u64, Option<Notice>),
    Tick,
}

async fn run(ctx: Rc<ShardCtx>, mut notices: mpsc::UnboundedReceiver<(u64, Vec<u8>)>) {
    let Some(cluster) = &ctx.shared.cluster else {
        return;
    };
    let (engine, shard) = (ctx.shared.engine.clone(), ctx.shard);
    let mut changes = match engine.presence_share(shard).await {
        Ok(changes) => changes,
        Err(e) => {
            tracing::warn!(shard, error = %e, "presence is not shared with the other nodes");
            return;
        }
    };
    let notify = |kind: Kind, seq: u64, records| {
        let notice = Notice {
            kind,
            incarnation: incarnation(),
            seq,
            records,
        };
        cluster.calls.notify_peers(shard, notice.encode());
    };
    let mut last = 0;
    let mut tracker = Tracker::new();
    let (asked, mut snapshots) = mpsc::unbounded::<(u64, Option<Notice>)>();
    let mut tick = Box::pin(glommio::timer::sleep(KEEPALIVE));
    loop {
        let next = std::future::poll_fn(|cx| {
            if let Poll::Ready(c) = changes.poll_next_unpin(cx) {
                return Poll::Ready(Next::Change(c));
            }
            if let Poll::Ready(Some((from, snapshot))) = snapshots.poll_next_unpin(cx) {
                return Poll::Ready(Next::Snapshot(from, snapshot));
            }
            if let Poll::Ready(n) = notices.poll_next_unpin(cx) {
                return Poll::Ready(Next::Notice(n));
            }
            if std::future::Future::poll(tick.as_mut(), cx).is_ready() {
                return Poll::Ready(Next::Tick);
            }
            Poll::Pending
        })
        .await;
        let now = Instant::now();
        let actions = match next {
            Next::Change(None) | Next::Notice(None) => return,
            Next::Change(Some((seq, records))) => {
                last = seq;
                notify(Kind::Changes, seq, records);
                Vec::new()
            }
            Next::Notice(Some((from, bytes))) => match Notice::decode(&bytes) {
                Some(notice) => tracker.heard(now, from, notice),
                None => {
                    tracing::debug!(from, "a presence notice that does not parse");
                    Vec::new()
                }
            },
            Next::Snapshot(from, Some(snapshot)) => {
                ctx.shared.metrics.presence_snapshots.inc();
                tracker.snapshot(now, from, snapshot)
            }
            Next::Snapshot(from, None) => {
                tracker.ask_failed(from);
                Vec::new()
            }
            Next::Tick => {
                tick = Box::pin(glommio::timer::sleep(KEEPALIVE));
                notify(Kind::Keepalive, last, Vec::new());
                tracker.tick(now)
            }
        };
        for action in actions {
            match action {
                Action::Table { from, input } => {
                    if let Err(e) = engine.presence_from_peer(shard, from, input).await {
                        tracing::debug!(from, error = %e, "a peer's presence was not taken");
                    }
                }
                Action::Ask { from } => {
                    tracing::debug!(from, shard, "asking a peer for its presence snapshot");
                    let (shared, asked) = (ctx.shared.clone(), asked.clone());
                    glommio::spawn_local(async move {
                        let snapshot = snapshot_of(&shared, shard, from).await;
                        let _ = asked.unbounded_send((from, snapshot));
                    })
                    .detach();
                }
            }
        }
    }
}

/// Asks `from` for its snapshot, page by page, and joins the pages into one, numbered as
/// the first page; `None` if a page did not come or the peer restarted meanwhile.
async fn snapshot_of(shared: &crate::ctx::Shared, shard: u32, from: u64) -> Option<Notice> {
    let mut after = UserId(0);
    let mut whole: Option<Notice> = None;
    loop {
        let answer = shared
            .call_peer(shard, from, &snapshot_request(after))
            .await
            .ok()?;
        let page = Notice::decode(&answer)?;
        let last = match page.kind {
            Kind::Snapshot => true,
            Kind::SnapshotPart => false,
            Kind::Changes | Kind::Keepalive => return None,
        };
        if !last && page.records.is_empty() {
            // A page that names nobody would be asked for again and again.
            return None;
        }
        after = last_user(&page.records).unwrap_or(after);
        match &mut whole {
            None => {
                whole = Some(Notice {
                    kind: Kind::Snapshot,
                    ..page
                })
            }
            Some(w) if w.incarnation == page.incarnation => w.records.extend(page.records),
            Some(_) => return None,
        }
        if last {
            return whole;
        }
    }
}
