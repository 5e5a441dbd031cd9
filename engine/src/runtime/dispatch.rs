//! A shard's subscribers and the delivery of committed events to them.
//!
//! The dispatcher knows, for each local subscriber, the channels it follows and the next
//! `seq` it expects in each. A delivered frame is pushed to every local subscriber of its
//! channel as the same shared `Bytes`. A subscriber that falls behind (its bounded queue is
//! full) or would see a gap is cut off; it comes back by resuming.
//!
//! Resume: the subscriber names channels and the last seq it has. For each, the dispatcher
//! marks the channel as resuming (live frames for it are skipped), asks the channel's
//! partition for the events after that seq, pushes them in order, and turns the channel live
//! again after the last page. Because the partition answers through the same FIFO path as
//! its deliveries, every live frame skipped was included in a page, and every frame after the
//! last page comes after it: no gap, no repeat. A `resumed` frame follows the last page.

use super::{Delivery, PartitionMsg, Routes, ShardMsg};
use crate::ids::{ChannelId, UserId};
use crate::queue::{Cutoff, FrameSender, PushOutcome};
use bytes::Bytes;
use std::collections::{BTreeMap, HashMap};

/// What a new subscription starts with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscriptionInfo {
    /// The subscriber's ID on its shard.
    pub id: u64,
    /// The shard it lives on.
    pub shard: u32,
    /// The channels it follows, with the last committed seq of each when it started.
    pub channels: Vec<(ChannelId, u64)>,
}

struct Chan {
    /// The next seq this subscriber expects; `None` until known.
    next: Option<u64>,
    resuming: bool,
}

struct Sub {
    user: UserId,
    queue: FrameSender,
    channels: HashMap<ChannelId, Chan>,
    acks_waiting: usize,
    ready: Option<super::Reply<SubscriptionInfo>>,
    started: Vec<(ChannelId, u64)>,
    resuming: usize,
    resumed: BTreeMap<ChannelId, u64>,
}

/// The subscribers of one shard.
pub(crate) struct Dispatcher {
    shard: u32,
    routes: Routes,
    subs: HashMap<u64, Sub>,
    next_sub: u64,
    by_user: HashMap<UserId, Vec<u64>>,
    by_channel: HashMap<ChannelId, Vec<u64>>,
}

impl Dispatcher {
    pub(crate) fn new(shard: u32, routes: Routes) -> Dispatcher {
        Dispatcher {
            shard,
            routes,
            subs: HashMap::new(),
            next_sub: 1,
            by_user: HashMap::new(),
            by_channel: HashMap::new(),
        }
    }

    /// Registers a subscriber and tells every partition that the user is online here. The
    /// reply goes out when every partition has answered with the user's channels.
    pub(crate) async fn subscribe(
        &mut self,
        user: UserId,
        queue: FrameSender,
        reply: super::Reply<SubscriptionInfo>,
    ) {
        let id = self.next_sub;
        self.next_sub += 1;
        self.subs.insert(
            id,
            Sub {
                user,
                queue,
                channels: HashMap::new(),
                acks_waiting: self.routes.partitions as usize,
                ready: Some(reply),
                started: Vec::new(),
                resuming: 0,
                resumed: BTreeMap::new(),
            },
        );
        self.by_user.entry(user).or_default().push(id);
        self.broadcast_online(user, 1, Some(id)).await;
    }

    async fn broadcast_online(&self, user: UserId, delta: i32, sub: Option<u64>) {
        let shard = self.shard;
        for s in 0..self.routes.shard_count() {
            let msg = ShardMsg::AllPartitions(Box::new(move || PartitionMsg::Online {
                user,
                shard,
                delta,
                sub,
            }));
            let _ = self.routes.send(s, msg).await;
        }
    }

    /// A partition's answer to a registration.
    pub(crate) fn online_ack(&mut self, sub: u64, channels: Vec<(ChannelId, u64)>) {
        let Some(s) = self.subs.get_mut(&sub) else {
            return;
        };
        for (c, committed) in channels {
            s.channels.insert(
                c,
                Chan {
                    next: Some(committed + 1),
                    resuming: false,
                },
            );
            s.started.push((c, committed));
            self.by_channel.entry(c).or_default().push(sub);
        }
        s.acks_waiting -= 1;
        if s.acks_waiting == 0 {
            if let Some(reply) = s.ready.take() {
                let mut channels = std::mem::take(&mut s.started);
                channels.sort_unstable();
                let _ = reply.send(Ok(SubscriptionInfo {
                    id: sub,
                    shard: self.shard,
                    channels,
                }));
            }
        }
    }

    /// Pushes committed events to the local subscribers of their channels.
    pub(crate) async fn deliver(&mut self, batch: Vec<Delivery>) {
        let mut cut = Vec::new();
        for d in batch {
            if let Some((user, true)) = d.membership {
                for id in self.by_user.get(&user).cloned().unwrap_or_default() {
                    let s = self.subs.get_mut(&id).expect("indexed subscriber");
                    if let std::collections::hash_map::Entry::Vacant(e) =
                        s.channels.entry(d.channel)
                    {
                        e.insert(Chan {
                            next: Some(d.seq),
                            resuming: false,
                        });
                        self.by_channel.entry(d.channel).or_default().push(id);
                    }
                }
            }
            for id in self
                .by_channel
                .get(&d.channel)
                .map(Vec::as_slice)
                .unwrap_or(&[])
            {
                let s = self.subs.get_mut(id).expect("indexed subscriber");
                let chan = s.channels.get_mut(&d.channel).expect("followed channel");
                if chan.resuming || chan.next.is_some_and(|n| d.seq < n) {
                    continue;
                }
                if chan.next.is_some_and(|n| d.seq > n) {
                    cut.push((*id, Cutoff::Overflow));
                    continue;
                }
                chan.next = Some(d.seq + 1);
                if s.queue.push(d.frame.clone()) != PushOutcome::Queued {
                    cut.push((*id, Cutoff::Overflow));
                }
            }
            if let Some((user, false)) = d.membership {
                for id in self.by_user.get(&user).cloned().unwrap_or_default() {
                    if let Some(s) = self.subs.get_mut(&id) {
                        s.channels.remove(&d.channel);
                    }
                    if let Some(v) = self.by_channel.get_mut(&d.channel) {
                        v.retain(|x| *x != id);
                    }
                }
            }
        }
        for (id, why) in cut {
            self.cut_off(id, why).await;
        }
    }

    /// Starts a resume for the named channels.
    pub(crate) async fn resume(&mut self, sub: u64, since: Vec<(ChannelId, u64)>) {
        let Some(s) = self.subs.get_mut(&sub) else {
            return;
        };
        let user = s.user;
        let mut asks = Vec::new();
        for (c, seq) in since {
            if let Some(chan) = s.channels.get_mut(&c) {
                if !chan.resuming {
                    chan.resuming = true;
                    s.resuming += 1;
                }
                chan.next = Some(seq + 1);
                asks.push((c, seq));
            }
        }
        if s.resuming == 0 {
            self.finish_resume(sub).await;
            return;
        }
        for (c, seq) in asks {
            self.ask_catch_up(user, c, seq, sub).await;
        }
    }

    async fn ask_catch_up(&self, user: UserId, channel: ChannelId, after: u64, sub: u64) {
        let partition = crate::domain::meta::partition_of(channel);
        let msg = ShardMsg::Partition {
            partition,
            msg: PartitionMsg::CatchUp {
                user,
                channel,
                after,
                shard: self.shard,
                sub,
            },
        };
        let _ = self.routes.send(self.routes.owner(partition), msg).await;
    }

    /// A page of a resume arrived.
    pub(crate) async fn catch_up_page(
        &mut self,
        sub: u64,
        channel: ChannelId,
        frames: Vec<Bytes>,
        last: u64,
        done: bool,
    ) {
        let Some(s) = self.subs.get_mut(&sub) else {
            return;
        };
        let user = s.user;
        if !s.channels.contains_key(&channel) {
            return;
        }
        let overflowed = frames
            .into_iter()
            .any(|f| s.queue.push(f) != PushOutcome::Queued);
        if overflowed {
            self.cut_off(sub, Cutoff::Overflow).await;
            return;
        }
        let chan = s.channels.get_mut(&channel).expect("followed channel");
        chan.next = Some(last + 1);
        if !done {
            self.ask_catch_up(user, channel, last, sub).await;
            return;
        }
        if chan.resuming {
            chan.resuming = false;
            s.resuming -= 1;
        }
        s.resumed.insert(channel, last);
        if s.resuming == 0 {
            self.finish_resume(sub).await;
        }
    }

    async fn finish_resume(&mut self, sub: u64) {
        let Some(s) = self.subs.get_mut(&sub) else {
            return;
        };
        let channels: serde_json::Map<String, serde_json::Value> = std::mem::take(&mut s.resumed)
            .into_iter()
            .map(|(c, seq)| (c.to_string(), seq.into()))
            .collect();
        let frame = serde_json::json!({"type": "resumed", "channels": channels});
        let bytes = Bytes::from(serde_json::to_vec(&frame).expect("json"));
        if s.queue.push(bytes) != PushOutcome::Queued {
            self.cut_off(sub, Cutoff::Overflow).await;
        }
    }

    /// Removes a subscriber whose owner went away.
    pub(crate) async fn unsubscribe(&mut self, sub: u64) {
        if let Some(s) = self.remove(sub) {
            self.broadcast_online(s.user, -1, None).await;
        }
    }

    async fn cut_off(&mut self, sub: u64, why: Cutoff) {
        if let Some(s) = self.remove(sub) {
            s.queue.close(why);
            self.broadcast_online(s.user, -1, None).await;
        }
    }

    fn remove(&mut self, sub: u64) -> Option<Sub> {
        let s = self.subs.remove(&sub)?;
        if let Some(v) = self.by_user.get_mut(&s.user) {
            v.retain(|x| *x != sub);
            if v.is_empty() {
                self.by_user.remove(&s.user);
            }
        }
        for c in s.channels.keys() {
            if let Some(v) = self.by_channel.get_mut(c) {
                v.retain(|x| *x != sub);
                if v.is_empty() {
                    self.by_channel.remove(c);
                }
            }
        }
        Some(s)
    }

    /// Drops subscribers whose receiving side is gone.
    pub(crate) async fn sweep(&mut self) {
        let gone: Vec<u64> = self
            .subs
            .iter()
            .filter(|(_, s)| s.queue.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.unsubscribe(id).await;
        }
    }
}
