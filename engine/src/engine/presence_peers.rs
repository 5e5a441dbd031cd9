//! The engine calls that carry presence between the nodes of a cluster
//! (`crate::presence::peers`): the embedder's transport takes each shard's changes, gives
//! it what peers say, and asks it for snapshots. A single node makes none of them.

use super::{ask, Engine};
use crate::error::EngineError;
use crate::ids::UserId;
use crate::presence::peers::{Changes, Input, Record};
use crate::runtime::ShardMsg;

impl Engine {
    /// From now on, every change of what this node says of the users whose presence shard
    /// `shard` owns (a user's first connection here opened or last one closed, activity,
    /// a mode chosen here) comes out of the returned receiver, numbered in the shard's
    /// sequence, for the same shard of every other node.
    pub async fn presence_share(&self, shard: u32) -> Result<Changes, EngineError> {
        let (out, changes) = futures::channel::mpsc::unbounded();
        ask(
            |reply| ShardMsg::PresenceShare { out, reply },
            &self.inner.routes,
            shard,
        )
        .await?;
        Ok(changes)
    }

    /// What node `from` says of the users whose presence shard `shard` owns.
    pub async fn presence_from_peer(
        &self,
        shard: u32,
        from: u64,
        input: Input,
    ) -> Result<(), EngineError> {
        ask(
            |reply| ShardMsg::PresencePeer { from, input, reply },
            &self.inner.routes,
            shard,
        )
        .await
    }

    /// What this node says of the users whose presence shard `shard` owns: a page of the
    /// users after `after` (in ID order) of at most about `max` records, the number of the
    /// shard's sequence the page includes, and whether more pages follow.
    pub async fn presence_snapshot(
        &self,
        shard: u32,
        after: UserId,
        max: usize,
    ) -> Result<(u64, Vec<Record>, bool), EngineError> {
        ask(
            |reply| ShardMsg::PresenceSnapshot { after, max, reply },
            &self.inner.routes,
            shard,
        )
        .await
    }
}
