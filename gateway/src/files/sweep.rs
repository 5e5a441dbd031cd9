//! The sweep of the file store on the local disk: bytes that no live file has are removed.
//!
//! The node that takes a deletion removes the file's bytes at once (`super::reclaim`).
//! The other nodes of a cluster hold copies too (`super::peers`), and an upload whose
//! record never came (its node died between the bytes and the record) leaves bytes that
//! no file names. So shard 0 of every node on the local disk sweeps its store every
//! `file_sweep_interval_s`: each stored file last stored more than `file_sweep_min_age_s`
//! ago is removed if no live file has it, as a deletion would remove it (under the
//! removal's pin, after the directory's read barrier in a cluster, so that the look at the
//! directory includes every record committed before the sweep began).
//!
//! Why the age: a cluster node holds an upload's bytes a moment before the record that
//! names them is committed, and that record may be decided on another node. Bytes stored,
//! or stored again, within the minimum age are left alone; storing bytes that are stored
//! already marks them as just stored (`FileStore::publish`), and a peer's copy is
//! published under an upload's pin, so a sweep cannot remove it between its publication
//! and the sweep's own look at its age.

use crate::ctx::{off_shard, ShardCtx};
use std::rc::Rc;
use std::time::{Duration, SystemTime};

/// Sweeps this node's store every `file_sweep_interval_s`, for as long as the server runs;
/// nothing on S3 (the node that takes a deletion removes the bucket's copy).
pub async fn run(ctx: Rc<ShardCtx>) {
    if ctx.shared.files.store.is_remote() {
        return;
    }
    let every = Duration::from_secs(ctx.shared.config.file_sweep_interval_s);
    loop {
        glommio::timer::sleep(every).await;
        let removed = sweep(&ctx).await;
        if removed > 0 {
            tracing::info!(removed, "the file store's sweep removed unused bytes");
        }
    }
}

/// One sweep; how many files' bytes it removed.
pub async fn sweep(ctx: &ShardCtx) -> usize {
    let min_age = Duration::from_secs(ctx.shared.config.file_sweep_min_age_s);
    let Some(before) = SystemTime::now().checked_sub(min_age) else {
        return 0;
    };
    let store = ctx.shared.files.store.clone();
    let old = match off_shard(move || store.stored_before(before)).await {
        Ok(old) => old,
        Err(e) => {
            tracing::warn!(error = %e, "the file store's sweep could not list the store");
            return 0;
        }
    };
    if old.is_empty() {
        return 0;
    }
    if ctx.shared.cluster.is_some() {
        if let Err(e) = ctx.shared.engine.directory_barrier().await {
            tracing::debug!(error = %e, "the file store's sweep waits for the directory");
            return 0;
        }
    }
    let mut removed = 0;
    for sha in old {
        if super::reclaim_if(ctx, sha, Some(before)).await {
            removed += 1;
        }
    }
    removed
}
