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
//! last page comes after it: no gap, no repeat. A `resumed` frame follows the last page of
//! the last channel, naming the last seq sent of each. A channel whose catch-up ends while
//! others still catch up is *parked*: its live frames wait, in order and within the
//! queue's capacity, until `resumed` is out, so every live event of a resumed channel comes
//! after `resumed`, as `API.md` says. A resume asked while one is catching up is refused
//! (the client starts over): two catch-ups of one channel would send its frames twice.
//!
//! Ephemeral frames (typing) have no seq and are not in the log, so a catch-up cannot bring
//! them back: a subscriber whose channel is not live yet keeps them (bounded) and gets them
//! after that channel's catch-up.

use super::{ConnReport, Delivery, PartitionMsg, Routes, ShardMsg};
use crate::config::HELD_EPHEMERAL_FRAMES_MAX;
use crate::domain::DomainError;
use crate::error::Unavailable;
use crate::ids::{ChannelId, UserId};
use crate::presence::{ConnKey, WatchOp, PRESENCE_WATCH_MAX};
use crate::queue::{Cutoff, FrameSender, PushOutcome};
use bytes::Bytes;
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    /// Whether a frame of this channel went out to this subscriber; a resume may go
    /// back before `next` only while none has.
    sent: bool,
    /// The user left while this channel was resuming: drop it once the catch-up (which
    /// ends with the `member:left` event) is done.
    leaving: bool,
    /// Its catch-up is done but the resume it belongs to is not: its live frames wait in
    /// the outlet's parked list until the `resumed` frame is out.
    parked: bool,
    /// Followed only for a resume's catch-up, because the resume named it though the
    /// subscription did not follow it (see `follow_former`): named in `resumed` only if the
    /// catch-up brought something.
    former: bool,
}

/// A subscriber's state in one channel, shared by the subscriber and the channel's member
/// list, so that a delivery reaches it without a lookup.
type ChanRef = Rc<RefCell<Chan>>;

/// Where a subscriber's frames go, shared by the subscriber and every member list it is in.
struct Outlet {
    queue: FrameSender,
    /// Set when the subscriber is removed: member lists drop it lazily (see `remove`).
    gone: Cell<bool>,
    /// Frames of channels whose catch-up is done while the resume is not, in the order
    /// they came: they follow the `resumed` frame, as `API.md` says live events do. With
    /// the queued frames they never exceed the queue's capacity: past that, the subscriber
    /// is cut off, as it would have been had they gone to its queue.
    parked: RefCell<Vec<Bytes>>,
}

impl Outlet {
    /// Sends a frame: to the queue, or to the parked list while its channel is parked.
    /// False when it does not fit: the subscriber must be cut off.
    fn send(&self, frame: Bytes, parked: bool) -> bool {
        if !parked {
            return self.queue.push(frame) == PushOutcome::Queued;
        }
        let mut list = self.parked.borrow_mut();
        if list.len() + self.queue.len() >= self.queue.capacity() {
            return false;
        }
        list.push(frame);
        true
    }
}

/// One subscriber in a channel's member list: everything a delivery needs, reached
/// through two pointers rather than two hash lookups per recipient.
struct Member {
    sub: u64,
    outlet: Rc<Outlet>,
    chan: ChanRef,
}

struct Sub {
    user: UserId,
    /// The end-to-end encryption device of its credential, if any.
    device: Option<Arc<str>>,
    /// The ID of the last to-device message it was sent (0 for none).
    to_device_sent: u64,
    /// Live frames are held back (skipped, then fetched from the log) until `start`.
    held: bool,
    outlet: Rc<Outlet>,
    channels: HashMap<ChannelId, ChanRef>,
    acks_waiting: usize,
    ready: Option<super::Reply<SubscriptionInfo>>,
    started: Vec<(ChannelId, u64)>,
    resuming: usize,
    resumed: BTreeMap<ChannelId, u64>,
    /// Send a `resumed` frame when the catch-up ends.
    announce: bool,
    /// Ephemeral frames for channels not live yet (held, or catching up), delivered after
    /// the channel's catch-up: the latest per channel and sender, at most
    /// [`HELD_EPHEMERAL_FRAMES_MAX`].
    held_ephemeral: Vec<HeldFrame>,
    /// Channels the user left while subscribed, with the seq of the `member:left` this
    /// subscription was sent: a later resume naming one has nothing more to get from it,
    /// and must not go back before it.
    departed: HashMap<ChannelId, u64>,
    /// The users whose presence this subscriber watches (registered with each one's home
    /// shard), at most [`crate::presence::PRESENCE_WATCH_MAX`].
    /// Sorted, without repeats: a set of at most a thousand IDs, 8 bytes each.
    watching: Vec<UserId>,
    /// The open presence window ([`crate::presence::window_start`]): its records so far;
    /// it is queued when it ends.
    presence_window: Option<Vec<u8>>,
}

/// An ephemeral frame kept for a channel that is not live yet.
struct HeldFrame {
    channel: ChannelId,
    from: UserId,
    frame: Bytes,
}

impl Sub {
    /// Keeps an ephemeral frame until its channel is live. A newer frame of the same sender
    /// and channel replaces the older (typing says only "typing now"); past the bound, newer
    /// senders are dropped, so a subscription that never starts holds bounded memory.
    fn hold_ephemeral(&mut self, channel: ChannelId, from: UserId, frame: &Bytes) {
        let same = |h: &&mut HeldFrame| h.channel == channel && h.from == from;
        if let Some(h) = self.held_ephemeral.iter_mut().find(same) {
            h.frame = frame.clone();
        } else if self.held_ephemeral.len() < HELD_EPHEMERAL_FRAMES_MAX {
            self.held_ephemeral.push(HeldFrame {
                channel,
                from,
                frame: frame.clone(),
            });
        }
    }

    /// The ephemeral frames kept for a channel, in the order they were first kept.
    fn take_held(&mut self, channel: ChannelId) -> Vec<Bytes> {
        if self.held_ephemeral.is_empty() {
            return Vec::new();
        }
        let (mine, rest) = std::mem::take(&mut self.held_ephemeral)
            .into_iter()
            .partition(|h| h.channel == channel);
        self.held_ephemeral = rest;
        mine.into_iter().map(|h: HeldFrame| h.frame).collect()
    }
}

/// The subscribers of one shard.
pub(crate) struct Dispatcher {
    shard: u32,
    routes: Routes,
    /// Boxed: a subscriber is a few hundred bytes, and the map's free slots (up to
    /// half of them after it grows) would each take that much inline.
    subs: HashMap<u64, Box<Sub>>,
    next_sub: u64,
    by_user: HashMap<UserId, Vec<u64>>,
    /// The local subscribers of each channel, in subscription order.
    by_channel: HashMap<ChannelId, Vec<Member>>,
    /// Subscribers gone since each channel's list was last compacted.
    stale: HashMap<ChannelId, usize>,
    /// Catch-up pages waiting for room in their subscriber's queue.
    stalled: Vec<(UserId, ChannelId, u64, u64)>,
    observer: crate::config::ObserverSlot,
    /// Messages for shards (this one included), sent by the shard's loop. The dispatcher
    /// runs inside that loop, so it must never wait on an inbox: waiting on its own full
    /// inbox would wait forever.
    pub(crate) outbox: Vec<(u32, ShardMsg)>,
    /// Subscribers to cut off at the next turn: found where the loop cannot wait.
    pending_cuts: Vec<(u64, Cutoff)>,
    /// How long a presence window lasts (`presence_flush_ms`).
    presence_flush: Duration,
    /// Open presence windows, by when each ends: opened in time order with the same
    /// length (rounded down to the same ticks), so a queue is already sorted.
    presence_windows: VecDeque<(Instant, u64)>,
    /// Where the shard's presence ticks count from: the first window's opening.
    presence_epoch: Option<Instant>,
}

/// Presence windows end on ticks of a `PRESENCE_TICKS`th of a window, shared by all of a
/// shard's subscribers: the shard then ends a few hundred windows per timer instead of
/// one, and their sessions write their frames in one run, so a window costs no timer or
/// wake-up of its own. A window ends on the last tick before `presence_flush` is over, so
/// it is at most one tick shorter; its frame still comes a whole `presence_flush` after
/// the last one, since a window opens only after the last one was pushed, at a tick or
/// later, and ticks are a whole fraction of the window (a window pushed late by a busy
/// shard can make the next one early by as much: the session then holds that frame back
/// until `presence_flush` after its last). Rounded up instead, as they were, every window
/// ended one tick later, and every change waited that much longer.
const PRESENCE_TICKS: u32 = 25;

/// Records a new presence window has room for before it grows: most hold one or two.
const PRESENCE_WINDOW_RECORDS_FIRST: usize = 2;

/// `at` rounded down to the presence tick counted from `epoch` at or before it.
fn window_end_tick(epoch: Instant, at: Instant, window: Duration) -> Instant {
    let tick = (window / PRESENCE_TICKS).as_nanos().max(1);
    let ticks = at.duration_since(epoch).as_nanos() / tick;
    epoch + Duration::from_nanos(u64::try_from(ticks * tick).unwrap_or(u64::MAX))
}

/// A catch-up page is asked for only when the subscriber's queue has at least this much
/// room (or is empty); otherwise it waits for the subscriber to read.
const CATCH_UP_ROOM_MIN: usize = 64;

impl Dispatcher {
    pub(crate) fn new(
        shard: u32,
        routes: Routes,
        observer: crate::config::ObserverSlot,
        presence_flush: Duration,
    ) -> Dispatcher {
        Dispatcher {
            shard,
            routes,
            subs: HashMap::new(),
            next_sub: 1,
            by_user: HashMap::new(),
            by_channel: HashMap::new(),
            stale: HashMap::new(),
            stalled: Vec::new(),
            observer,
            outbox: Vec::new(),
            pending_cuts: Vec::new(),
            presence_flush,
            presence_windows: VecDeque::new(),
            presence_epoch: None,
        }
    }

    /// Registers a subscriber and tells every partition that the user is online here. The
    /// reply goes out when every partition has answered with the user's channels.
    pub(crate) async fn subscribe(
        &mut self,
        user: UserId,
        device: Option<Arc<str>>,
        queue: FrameSender,
        held: bool,
        reply: super::Reply<SubscriptionInfo>,
    ) {
        let id = self.next_sub;
        self.next_sub += 1;
        self.subs.insert(
            id,
            Box::new(Sub {
                user,
                device,
                to_device_sent: 0,
                held,
                outlet: Rc::new(Outlet {
                    queue,
                    gone: Cell::new(false),
                    parked: RefCell::new(Vec::new()),
                }),
                channels: HashMap::new(),
                acks_waiting: self.routes.partitions as usize,
                ready: Some(reply),
                started: Vec::new(),
                resuming: 0,
                resumed: BTreeMap::new(),
                announce: false,
                held_ephemeral: Vec::new(),
                departed: HashMap::new(),
                watching: Vec::new(),
                presence_window: None,
            }),
        );
        self.by_user.entry(user).or_default().push(id);
        // Every subscription is a connection of its user, for presence.
        let conn = ConnKey::new(self.shard, id);
        let report = ConnReport::Connected;
        let home = self.home(user);
        self.outbox
            .push((home, ShardMsg::PresenceConn { user, conn, report }));
        self.broadcast_online(user, 1, Some(id)).await;
    }

    async fn broadcast_online(&mut self, user: UserId, delta: i32, sub: Option<u64>) {
        let shard = self.shard;
        for s in 0..self.routes.shard_count() {
            let msg = ShardMsg::Online {
                user,
                shard,
                delta,
                sub,
            };
            self.outbox.push((s, msg));
        }
    }

    /// A partition's answer to a registration.
    pub(crate) fn online_ack(&mut self, sub: u64, channels: Vec<(ChannelId, u64)>) {
        let Some(s) = self.subs.get_mut(&sub) else {
            return;
        };
        for (c, committed) in channels {
            let fresh = Chan {
                next: Some(committed + 1),
                resuming: s.held,
                sent: false,
                leaving: false,
                parked: false,
                former: false,
            };
            s.started.push((c, committed));
            // A join delivered before this answer already listed the channel: its state
            // is replaced in place, so that the member list keeps one entry.
            if let Some(chan) = s.channels.get(&c) {
                *chan.borrow_mut() = fresh;
                continue;
            }
            let chan = Rc::new(RefCell::new(fresh));
            s.channels.insert(c, chan.clone());
            self.by_channel.entry(c).or_default().push(Member {
                sub,
                outlet: s.outlet.clone(),
                chan,
            });
        }
        s.acks_waiting -= 1;
        if s.acks_waiting == 0 {
            if let Some(reply) = s.ready.take() {
                let mut channels = std::mem::take(&mut s.started);
                channels.sort_unstable();
                // The subscription keeps it for its life: no spare slots.
                channels.shrink_to_fit();
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
        let mut pushed = 0usize;
        for d in batch {
            if let Some(from) = d.ephemeral_from {
                self.deliver_ephemeral(&d, from, &mut cut);
                continue;
            }
            if let Some(user) = d.to_user {
                pushed += self.deliver_to_user(user, &d.frame, &mut cut);
                continue;
            }
            if let Some((user, true)) = d.membership {
                for id in self.by_user.get(&user).cloned().unwrap_or_default() {
                    let s = self.subs.get_mut(&id).expect("indexed subscriber");
                    let held = s.held;
                    // Joined while a resume catches up: the channel's frames follow `resumed`.
                    let parked = !held && s.announce && s.resuming > 0;
                    s.departed.remove(&d.channel);
                    match s.channels.entry(d.channel) {
                        std::collections::hash_map::Entry::Vacant(e) => {
                            let chan = Rc::new(RefCell::new(Chan {
                                next: Some(d.seq),
                                resuming: held,
                                sent: false,
                                leaving: false,
                                parked,
                                former: false,
                            }));
                            e.insert(chan.clone());
                            self.by_channel.entry(d.channel).or_default().push(Member {
                                sub: id,
                                outlet: s.outlet.clone(),
                                chan,
                            });
                        }
                        // Back in a channel whose catch-up was to end with the user's
                        // leave: the catch-up brings this join too, and the channel stays.
                        std::collections::hash_map::Entry::Occupied(e) => {
                            e.get().borrow_mut().leaving = false;
                        }
                    }
                }
            }
            let members = self.by_channel.get(&d.channel).map(Vec::as_slice);
            for m in members.unwrap_or(&[]) {
                // A subscriber that is gone may still be listed (see `remove`).
                if m.outlet.gone.get() {
                    continue;
                }
                let mut chan = m.chan.borrow_mut();
                if chan.resuming || chan.next.is_some_and(|n| d.seq < n) {
                    continue;
                }
                if chan.next.is_some_and(|n| d.seq > n) {
                    cut.push((m.sub, Cutoff::Overflow));
                    continue;
                }
                chan.next = Some(d.seq + 1);
                chan.sent = true;
                if m.outlet.send(d.frame.clone(), chan.parked) {
                    pushed += 1;
                } else {
                    cut.push((m.sub, Cutoff::Overflow));
                }
            }
            if let Some((user, false)) = d.membership {
                for id in self.by_user.get(&user).cloned().unwrap_or_default() {
                    let Some(s) = self.subs.get_mut(&id) else {
                        continue;
                    };
                    match s.channels.get(&d.channel) {
                        // The catch-up in flight ends with this event; drop the channel then.
                        Some(chan) if chan.borrow().resuming => chan.borrow_mut().leaving = true,
                        Some(_) => {
                            s.channels.remove(&d.channel);
                            s.departed.insert(d.channel, d.seq);
                            if let Some(v) = self.by_channel.get_mut(&d.channel) {
                                v.retain(|m| m.sub != id);
                            }
                        }
                        // Not followed by this subscription (its registration with the
                        // channel's partition is not answered yet, or it never was in it):
                        // it was not sent this `member:left`, so it has not departed, and a
                        // resume naming the channel still catches up to it.
                        None => {}
                    }
                }
            }
        }
        if let Some(o) = &self.observer.0 {
            if pushed > 0 {
                o.delivered(pushed);
            }
        }
        for (id, why) in cut {
            self.cut_off(id, why).await;
        }
    }

    /// Pushes an ephemeral frame to the subscribers of its channel, except its sender's
    /// own. A subscriber whose channel is not live yet (held until `start`, or catching up)
    /// keeps it and gets it right after the catch-up: pushed now, it would come before the
    /// catch-up's events, or before the client has said where to resume.
    fn deliver_ephemeral(&mut self, d: &Delivery, from: UserId, cut: &mut Vec<(u64, Cutoff)>) {
        let mut waiting = Vec::new();
        let members = self.by_channel.get(&d.channel).map(Vec::as_slice);
        for m in members.unwrap_or(&[]) {
            if m.outlet.gone.get() {
                continue;
            }
            let Some(s) = self.subs.get(&m.sub) else {
                continue;
            };
            if s.user == from {
                continue;
            }
            if m.chan.borrow().resuming {
                waiting.push(m.sub);
                continue;
            }
            if !m.outlet.send(d.frame.clone(), m.chan.borrow().parked) {
                cut.push((m.sub, Cutoff::Overflow));
            }
        }
        for sub in waiting {
            if let Some(s) = self.subs.get_mut(&sub) {
                s.hold_ephemeral(d.channel, from, &d.frame);
            }
        }
    }

    /// Pushes a frame to every local subscriber of one user (a `read` frame), whatever
    /// channels it follows and whether they are live: it is no channel event, so it has no
    /// place in a channel's order to keep. Returns how many took it.
    fn deliver_to_user(
        &mut self,
        user: UserId,
        frame: &Bytes,
        cut: &mut Vec<(u64, Cutoff)>,
    ) -> usize {
        let mut pushed = 0;
        for id in self.by_user.get(&user).map(Vec::as_slice).unwrap_or(&[]) {
            let Some(s) = self.subs.get(id) else {
                continue;
            };
            if s.outlet.gone.get() {
                continue;
            }
            if s.outlet.send(frame.clone(), false) {
                pushed += 1;
            } else {
                cut.push((*id, Cutoff::Overflow));
            }
        }
        pushed
    }

    /// The local subscribers of an end-to-end encryption device, each with the ID of the
    /// last to-device message it was sent.
    pub(crate) fn device_subs(&self, user: UserId, device: &str) -> Vec<(u64, u64)> {
        let ids = self.by_user.get(&user).map(Vec::as_slice).unwrap_or(&[]);
        ids.iter()
            .filter_map(|id| Some((*id, self.subs.get(id)?)))
            .filter(|(_, s)| s.device.as_deref() == Some(device) && !s.outlet.gone.get())
            .map(|(id, s)| (id, s.to_device_sent))
            .collect()
    }

    /// Pushes frames for a device to one of its subscribers: to-device messages up to
    /// `sent` (which becomes its last sent), or a signal (`sent` unchanged). A subscriber
    /// whose queue is full is cut off at the next turn.
    pub(crate) fn push_device_frames(&mut self, sub: u64, frames: Vec<Bytes>, sent: Option<u64>) {
        let Some(s) = self.subs.get_mut(&sub) else {
            return;
        };
        if let Some(sent) = sent {
            s.to_device_sent = sent;
        }
        for frame in frames {
            if !s.outlet.send(frame, false) {
                self.pending_cuts.push((sub, Cutoff::Overflow));
                return;
            }
        }
    }

    /// Ends the subscriptions of a removed device, at the next turn.
    pub(crate) fn revoke_device(&mut self, user: UserId, device: &str) {
        for (sub, _) in self.device_subs(user, device) {
            self.pending_cuts.push((sub, Cutoff::Revoked));
        }
    }

    /// Cuts off the subscribers found since the last turn.
    pub(crate) async fn cut_pending(&mut self) {
        for (sub, why) in std::mem::take(&mut self.pending_cuts) {
            self.cut_off(sub, why).await;
        }
    }

    /// Whether subscribers wait to be cut off.
    pub(crate) fn has_pending_cuts(&self) -> bool {
        !self.pending_cuts.is_empty()
    }

    /// Starts a held subscriber: every channel catches up from the log, the named ones
    /// after the given seq, the others after the seq the subscription began at (so the
    /// live frames held back meanwhile are not lost). With `announce`, a `resumed` frame
    /// follows.
    pub(crate) async fn start(&mut self, sub: u64, since: Vec<(ChannelId, u64)>, announce: bool) {
        let Some(s) = self.subs.get_mut(&sub) else {
            return;
        };
        if !s.held {
            let _ = self.resume(sub, since).await;
            return;
        }
        s.held = false;
        self.follow_former(sub, &since);
        let Some(s) = self.subs.get_mut(&sub) else {
            return;
        };
        let since: HashMap<ChannelId, u64> = since.into_iter().collect();
        let user = s.user;
        let mut asks = Vec::new();
        for (c, chan) in s.channels.iter() {
            let mut chan = chan.borrow_mut();
            if let Some(seq) = since.get(c) {
                chan.next = Some(seq + 1);
                if !chan.former {
                    s.resumed.insert(*c, *seq);
                }
            }
            if !chan.resuming {
                chan.resuming = true;
            }
            s.resuming += 1;
            asks.push((*c, chan.next.map_or(0, |n| n - 1)));
        }
        s.announce = announce;
        if asks.is_empty() {
            self.finish_resume(sub).await;
            return;
        }
        // The channels are a hash map: ask in channel order, so that a run replays exactly
        // (the simulation depends on it).
        asks.sort_unstable();
        for (c, after) in asks {
            self.ask_catch_up(user, c, after, sub).await;
        }
    }

    /// Resumes named channels of a live subscriber. It never sends a frame twice and never
    /// sends out of order: if a named channel would have to go back before a frame this
    /// subscriber was already sent, nothing changes and the answer is `false` (the client
    /// must reconnect and resume as it starts).
    pub(crate) async fn resume(&mut self, sub: u64, since: Vec<(ChannelId, u64)>) -> bool {
        let Some(s) = self.subs.get_mut(&sub) else {
            return false;
        };
        // A resume while another is catching up would ask a second catch-up of a channel
        // whose first is in flight, and send its frames twice: refused, so the client
        // starts over, as for a resume that would go back.
        if s.resuming > 0 {
            return false;
        }
        let behind = since.iter().any(|(c, seq)| {
            let live = s.channels.get(c).is_some_and(|chan| {
                let chan = chan.borrow();
                chan.sent && chan.next.is_some_and(|n| seq + 1 < n)
            });
            live || s.departed.get(c).is_some_and(|left| seq < left)
        });
        if behind {
            return false;
        }
        self.follow_former(sub, &since);
        let Some(s) = self.subs.get_mut(&sub) else {
            return false;
        };
        let user = s.user;
        let mut asks = Vec::new();
        for (c, seq) in since {
            if let Some(chan) = s.channels.get(&c) {
                let mut chan = chan.borrow_mut();
                let after = match chan.next {
                    Some(n) if chan.sent => seq.max(n - 1),
                    _ => seq,
                };
                if !chan.resuming {
                    chan.resuming = true;
                    s.resuming += 1;
                }
                chan.next = Some(after + 1);
                if !chan.former {
                    s.resumed.insert(c, after);
                }
                asks.push((c, after));
            }
        }
        s.announce = true;
        if s.resuming == 0 {
            self.finish_resume(sub).await;
            return true;
        }
        for (c, after) in asks {
            self.ask_catch_up(user, c, after, sub).await;
        }
        true
    }

    /// Follows, for one catch-up, the channels a resume names that the subscription does
    /// not follow: the user may have left one while away, and then what happened in it
    /// after the seq named, up to the user's own `member:left`, is still theirs to get (its
    /// partition reads a former member's catch-up up to the removal, and a channel the user
    /// never was in gives nothing). Each is dropped when its catch-up ends, unless the user
    /// joined again meanwhile.
    fn follow_former(&mut self, sub: u64, since: &[(ChannelId, u64)]) {
        let Some(s) = self.subs.get_mut(&sub) else {
            return;
        };
        for (c, seq) in since {
            if s.channels.contains_key(c)
                || s.departed.contains_key(c)
                || crate::domain::meta::partition_of(*c) >= self.routes.partitions
            {
                continue;
            }
            let chan = Rc::new(RefCell::new(Chan {
                next: Some(seq + 1),
                resuming: false,
                sent: false,
                leaving: true,
                parked: false,
                former: true,
            }));
            s.channels.insert(*c, chan.clone());
            self.by_channel.entry(*c).or_default().push(Member {
                sub,
                outlet: s.outlet.clone(),
                chan,
            });
        }
    }

    /// Asks for the next page of a catch-up, no larger than the room left in the
    /// subscriber's queue; with too little room, parks it until the subscriber reads.
    async fn ask_catch_up(&mut self, user: UserId, channel: ChannelId, after: u64, sub: u64) {
        let Some(s) = self.subs.get(&sub) else {
            return;
        };
        let queue = &s.outlet.queue;
        let room = queue.capacity().saturating_sub(queue.len());
        if room < CATCH_UP_ROOM_MIN.min(queue.capacity()) {
            self.stalled.push((user, channel, after, sub));
            return;
        }
        let partition = crate::domain::meta::partition_of(channel);
        let msg = ShardMsg::Partition {
            partition,
            msg: PartitionMsg::CatchUp {
                user,
                channel,
                after,
                max: room,
                shard: self.shard,
                sub,
            },
        };
        self.outbox.push((self.routes.owner(partition), msg));
    }

    /// Whether catch-ups wait for their subscribers to read.
    pub(crate) fn has_stalled(&self) -> bool {
        !self.stalled.is_empty()
    }

    /// Retries the catch-ups that waited for room.
    pub(crate) async fn retry_stalled(&mut self) {
        for (user, channel, after, sub) in std::mem::take(&mut self.stalled) {
            self.ask_catch_up(user, channel, after, sub).await;
        }
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
        let Some(chan) = s.channels.get(&channel).cloned() else {
            return;
        };
        let sent = !frames.is_empty();
        let overflowed = frames
            .into_iter()
            .any(|f| s.outlet.queue.push(f) != PushOutcome::Queued);
        if overflowed {
            self.cut_off(sub, Cutoff::Overflow).await;
            return;
        }
        let (leaving, parked, former, sent_any) = {
            let mut chan = chan.borrow_mut();
            chan.next = Some(last + 1);
            chan.sent |= sent;
            if done && chan.resuming {
                chan.resuming = false;
                s.resuming = s.resuming.saturating_sub(1);
                // Other channels still catch up: this one's live frames wait for `resumed`.
                chan.parked = s.announce && s.resuming > 0;
            }
            (done && chan.leaving, chan.parked, chan.former, chan.sent)
        };
        if !done {
            self.ask_catch_up(user, channel, last, sub).await;
            return;
        }
        // The channel is live: the ephemeral frames kept for it follow its catch-up, unless
        // the user left it.
        let held = s.take_held(channel);
        if !leaving && held.into_iter().any(|f| !s.outlet.send(f, parked)) {
            self.cut_off(sub, Cutoff::Overflow).await;
            return;
        }
        if leaving {
            s.channels.remove(&channel);
            if sent_any {
                s.departed.insert(channel, last);
            }
            if let Some(v) = self.by_channel.get_mut(&channel) {
                v.retain(|m| m.sub != sub);
            }
        }
        if former {
            // A channel the user was never in brings nothing, and is not named.
            if sent_any {
                s.resumed.insert(channel, last);
            }
        } else if let Some(r) = s.resumed.get_mut(&channel) {
            *r = last;
        }
        if s.resuming == 0 {
            self.finish_resume(sub).await;
        }
    }

    /// Ends a resume: the `resumed` frame (when one was asked for), then the live frames
    /// parked meanwhile, and every channel is live.
    async fn finish_resume(&mut self, sub: u64) {
        let Some(s) = self.subs.get_mut(&sub) else {
            return;
        };
        for chan in s.channels.values() {
            chan.borrow_mut().parked = false;
        }
        let parked = std::mem::take(&mut *s.outlet.parked.borrow_mut());
        let resumed = std::mem::take(&mut s.resumed);
        let mut fits = true;
        if std::mem::take(&mut s.announce) {
            let channels: serde_json::Map<String, serde_json::Value> = resumed
                .into_iter()
                .map(|(c, seq)| (c.to_string(), seq.into()))
                .collect();
            let frame = serde_json::json!({"type": "resumed", "channels": channels});
            let bytes = crate::view::json(&frame).expect("json");
            fits = s.outlet.queue.push(bytes) == PushOutcome::Queued;
        }
        fits = fits
            && parked
                .into_iter()
                .all(|f| s.outlet.queue.push(f) == PushOutcome::Queued);
        if !fits {
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
        if let Some(o) = &self.observer.0 {
            o.cut_off();
        }
        if let Some(s) = self.remove(sub) {
            s.outlet.queue.close(why);
            self.broadcast_online(s.user, -1, None).await;
        }
    }

    fn remove(&mut self, sub: u64) -> Option<Sub> {
        let mut s = self.subs.remove(&sub)?;
        s.outlet.gone.set(true);
        // The connection is gone for presence, and watches no one any more.
        let conn = ConnKey::new(self.shard, sub);
        // In user order, so that a simulated run replays exactly.
        let watched = std::mem::take(&mut s.watching);
        self.send_watch(s.user, conn, Vec::new(), watched, None);
        let report = ConnReport::Gone;
        let (user, home) = (s.user, self.home(s.user));
        self.outbox
            .push((home, ShardMsg::PresenceConn { user, conn, report }));
        if let Some(v) = self.by_user.get_mut(&s.user) {
            v.retain(|x| *x != sub);
            if v.is_empty() {
                self.by_user.remove(&s.user);
            }
        }
        // A channel's list is cleaned lazily: the gone subscriber is skipped by deliveries,
        // and the list is compacted once half of it is gone. Removing each subscriber
        // eagerly would make a mass disconnect from a big channel quadratic.
        for c in s.channels.keys() {
            let Some(v) = self.by_channel.get_mut(c) else {
                continue;
            };
            let stale = self.stale.entry(*c).or_insert(0);
            *stale += 1;
            if *stale * 2 >= v.len() {
                v.retain(|m| !m.outlet.gone.get());
                self.stale.remove(c);
                if v.is_empty() {
                    self.by_channel.remove(c);
                }
            }
        }
        Some(*s)
    }

    /// The home shard of a user: their presence owner.
    fn home(&self, user: UserId) -> u32 {
        crate::presence::home_shard(user, self.routes.shard_count())
    }

    /// A subscriber changes the set of users it watches: the set is checked against the
    /// limit, and each change goes to the home shard of the user it names, one message per
    /// shard. The owners answer what the added users show, through `reply`.
    pub(crate) fn presence_sub(
        &mut self,
        sub: u64,
        op: WatchOp,
        mut users: Vec<UserId>,
        reply: super::Reply<super::Presences>,
    ) {
        let Some(s) = self.subs.get_mut(&sub) else {
            let _ = reply.send(Err(Unavailable::ShuttingDown.into()));
            return;
        };
        users.sort_unstable();
        users.dedup();
        let count = match op {
            WatchOp::Set => users.len(),
            WatchOp::Add => {
                let new = users
                    .iter()
                    .filter(|u| s.watching.binary_search(u).is_err());
                s.watching.len() + new.count()
            }
            WatchOp::Remove => 0,
        };
        if count > PRESENCE_WATCH_MAX {
            let e = DomainError::TooMany(format!(
                "a connection watches at most {PRESENCE_WATCH_MAX} users; this would be {count}"
            ));
            let _ = reply.send(Err(e.into()));
            return;
        }
        let (add, remove) = match op {
            WatchOp::Set => {
                let gone: Vec<UserId> = s
                    .watching
                    .iter()
                    .filter(|u| users.binary_search(u).is_err())
                    .copied()
                    .collect();
                s.watching = users.clone();
                s.watching.shrink_to_fit();
                (users, gone)
            }
            WatchOp::Add => {
                s.watching.extend(users.iter().copied());
                s.watching.sort_unstable();
                s.watching.dedup();
                (users, Vec::new())
            }
            WatchOp::Remove => {
                users.retain(|u| match s.watching.binary_search(u) {
                    Ok(at) => {
                        s.watching.remove(at);
                        true
                    }
                    Err(_) => false,
                });
                if s.watching.capacity() > 2 * s.watching.len() + 16 {
                    s.watching.shrink_to_fit();
                }
                (Vec::new(), users)
            }
        };
        let user = s.user;
        self.send_watch(
            user,
            ConnKey::new(self.shard, sub),
            add,
            remove,
            Some(reply),
        );
    }

    /// Sends the watch changes of a connection to the users' home shards, one message per
    /// shard; the answers for the added users gather into `reply`.
    fn send_watch(
        &mut self,
        watcher: UserId,
        conn: ConnKey,
        add: Vec<UserId>,
        remove: Vec<UserId>,
        reply: Option<super::Reply<super::Presences>>,
    ) {
        let mut by_shard: BTreeMap<u32, (Vec<UserId>, Vec<UserId>)> = BTreeMap::new();
        for u in add {
            by_shard.entry(self.home(u)).or_default().0.push(u);
        }
        for u in remove {
            by_shard.entry(self.home(u)).or_default().1.push(u);
        }
        let asked = by_shard.values().filter(|(a, _)| !a.is_empty()).count();
        let gather = reply.map(|r| super::presence_gather(asked, Vec::new(), r));
        for (shard, (add, remove)) in by_shard {
            let out = gather.clone().filter(|_| !add.is_empty());
            let msg = ShardMsg::PresenceWatch {
                watcher,
                conn,
                add,
                remove,
                out,
            };
            self.outbox.push((shard, msg));
        }
    }

    /// A subscriber's person became active or idle: their presence owner hears it.
    pub(crate) fn presence_activity(&mut self, sub: u64, active: bool) {
        let Some(s) = self.subs.get(&sub) else {
            return;
        };
        let (user, home) = (s.user, self.home(s.user));
        let conn = ConnKey::new(self.shard, sub);
        let report = ConnReport::Active(active);
        self.outbox
            .push((home, ShardMsg::PresenceConn { user, conn, report }));
    }

    /// Adds a presence record to the open window of each local subscriber it names,
    /// opening one if none is. A window holds at most
    /// [`crate::presence::WINDOW_RECORDS_MAX`] records: one that would hold more cuts the
    /// subscriber off, as a full queue does. (A subscriber whose queue closed is found when
    /// its window is pushed, and by the sweep.) One that stopped watching the user since
    /// the owner sent the record still gets it: the session drops records of users it does
    /// not watch (it knows first), and looking the user up here too cost two cache misses
    /// per record.
    pub(crate) async fn presence_deliver(&mut self, now: Instant, record: Bytes, subs: Vec<u64>) {
        let mut cut = Vec::new();
        for sub in subs {
            let Some(s) = self.subs.get_mut(&sub) else {
                continue;
            };
            let window = s.presence_window.get_or_insert_with(|| {
                let epoch = *self.presence_epoch.get_or_insert(now);
                let end = window_end_tick(epoch, now + self.presence_flush, self.presence_flush);
                self.presence_windows.push_back((end, sub));
                crate::presence::window_start(PRESENCE_WINDOW_RECORDS_FIRST)
            });
            if !crate::presence::window_push(window, &record) {
                cut.push(sub);
            }
        }
        for sub in cut {
            self.cut_off(sub, Cutoff::Overflow).await;
        }
    }

    /// When the earliest open presence window ends.
    pub(crate) fn next_presence_window_end(&self) -> Option<Instant> {
        self.presence_windows.front().map(|(at, _)| *at)
    }

    /// Ends every presence window due by `now`: its subscriber gets the end mark, and a
    /// wake-up. A subscriber whose queue is full is cut off at the next turn.
    pub(crate) fn end_presence_windows(&mut self, now: Instant) {
        while let Some(&(at, sub)) = self.presence_windows.front() {
            if at > now {
                break;
            }
            self.presence_windows.pop_front();
            let Some(s) = self.subs.get_mut(&sub) else {
                continue;
            };
            let Some(window) = s.presence_window.take() else {
                continue;
            };
            if s.outlet.queue.push(Bytes::from(window)) == PushOutcome::Overflowed {
                self.pending_cuts.push((sub, Cutoff::Overflow));
            }
        }
    }

    /// Drops subscribers whose receiving side is gone.
    pub(crate) async fn sweep(&mut self) {
        let mut gone: Vec<u64> = self
            .subs
            .iter()
            .filter(|(_, s)| s.outlet.queue.is_closed())
            .map(|(id, _)| *id)
            .collect();
        // In subscription order, not the hash map's, so that a run replays exactly.
        gone.sort_unstable();
        for id in gone {
            self.unsubscribe(id).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A window ends on the tick at or before `presence_flush` after it opened, and a window
    // that opens at or after the end of the last one ends a whole window after it.
    #[test]
    fn presence_windows_end_on_ticks_a_window_apart() {
        let (epoch, window) = (Instant::now(), Duration::from_millis(250));
        let tick = window / PRESENCE_TICKS;
        let ms = Duration::from_millis;
        let end = |opened: Duration| window_end_tick(epoch, epoch + opened + window, window);
        assert_eq!(end(ms(0)), epoch + window);
        assert_eq!(end(ms(3)), epoch + window);
        assert_eq!(end(tick), epoch + window + tick);
        assert_eq!(end(ms(19)), epoch + window + tick);
        let mut last = end(ms(7));
        for pushed_late_by in [0, 1, 9, 10, 11, 23, 250, 251] {
            let opened = last - epoch + ms(pushed_late_by);
            let next = end(opened);
            assert!(next >= last + window, "{pushed_late_by} ms late");
            assert!(next <= epoch + opened + window && next + tick > epoch + opened + window);
            last = next;
        }
    }
}
