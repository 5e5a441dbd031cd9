//! The decider: a committed-event consumer, on a thread of its own (never a shard's), that
//! turns each new message into the push items and email items of the outbox.
//!
//! - **Its own state.** It reads every channel partition (one read in flight each) and the
//!   metadata log (one read), and keeps what it needs from them: each channel's kind and
//!   name; users' display names; everyone's notification preferences and push devices
//!   (`MetaEvent::Notify`, applied to a [`NotifyState`] of its own); and, per channel, its
//!   members who could ever be notified ([`crate::candidates`]), updated at each join,
//!   departure, preference or device change. So a message costs the shard that committed
//!   it nothing, and the decider a walk of its candidates, not of the channel's members.
//! - **Order across logs.** The metadata log and the partitions are read concurrently, so
//!   before a page with messages to decide, the metadata log is read to its end as of then
//!   ([`Consumer::read_now`]): a message is decided with every preference and device
//!   committed before it.
//! - **Restart.** The state is stored as a snapshot ([`crate::snapshot`]) every
//!   [`SNAPSHOT_EVENTS`] events read and at stop, with the offsets it covers, which the
//!   decider then acknowledges to the engine (so retention may delete the logs before
//!   them). At start it loads the snapshot, if there is a usable one, and reads every log
//!   from its offsets (else from the logs' beginning); events before its stored cursors
//!   only rebuild state, events at and after them are decided. On a first start (no
//!   outbox) the cursors are the logs' ends when the engine opened: nothing posted before
//!   notifications were switched on is pushed. A node that joins a cluster opens on empty
//!   logs and reads them from the beginning as they arrive, so on a cluster node a message
//!   committed more than [`FIRST_START_GRACE`] before the first start is never decided
//!   either.
//! - **Deciding.** For a new message: the candidates are the members but the author whose
//!   level (the channel's, else `prefs.push`, or `prefs.email`) lets it through (`all`;
//!   `mentions` only on a mention, `@channel`/`@here`, a keyword, or a DM), not muted, and
//!   with a device (for a push) or a digest interval (for email), found from the kept
//!   sets: the members at `all`, plus those who want mentions that the message concerns. Only
//!   for those is presence asked (`Engine::reach`, one message to each of their presence
//!   owners, off the send path): an open connection in the `active` state, or mode `dnd`,
//!   means no push (a closed connection in its offline grace does not count). Then
//!   [`rules::decide`] has the last word (DND schedule included) and each device gets an
//!   item. Read state is checked by the sender, just before the push goes out.
//! - **Email follows the push rules, with the email level.** An active connection, the
//!   `dnd` mode or the DND schedule at the moment of the message keep it out of the digest
//!   too, as `API.md` §13 lists them for both: a message seen live was not missed, and
//!   do-not-disturb means nothing from that time reaches the user later either, by push or
//!   by email (a digest that delivered the DND hours' messages afterwards would be a
//!   delayed notification, which §13 rules out for pushes). `email_digest_s` 0 means no
//!   email at all.
//! - **Digest windows.** A message that notifies a user by email joins their open window,
//!   or opens one that closes `email_digest_s` later (that user's setting when it opens).
//!   Each such message is an email item keyed by `(user, window)`; the email sender sends
//!   one digest per window once it closes. Since a window opens only after the previous one
//!   closed, two digests to a user are at least `email_digest_s` apart. The open windows
//!   come back after a restart from the outbox's pending email items.
//! - **Durability.** The items of everything read in one round and the cursors after it
//!   are appended to the outbox as one batch, made durable before the senders see it
//!   ([`crate::outbox`]).

use crate::candidates::{Candidates, Posted, Standing};
use crate::outbox::{Cursors, EmailItem, Item, Outbox, Window};
use chorus_engine::consumer::{CommittedKind, CommittedPage, LogId};
use chorus_engine::domain::event::{Body, ChannelEvent, ChannelRecord, MetaEvent};
use chorus_engine::domain::notify::rules::{self, Message, Recipient};
use chorus_engine::domain::notify::NotifyState;
use chorus_engine::ids::{ChannelId, UserId};
use chorus_engine::presence::Reach;
use chorus_engine::{Consumer, Engine, EngineError};
use futures::channel::oneshot;
use futures::future::{select, Either, FutureExt, LocalBoxFuture};
use futures::stream::{FuturesUnordered, StreamExt};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// How long before the decider's first start a message may have been committed and still
/// be decided: messages older than that are history (a node joining a cluster reads every
/// log from its beginning, and must not decide what the cluster notified long ago). A
/// margin for clocks that differ between nodes, since a message's time is its leader's.
pub const FIRST_START_GRACE: Duration = Duration::from_secs(10);

/// How long the decider waits before reading a log again after a read failed.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// Events read between two snapshots of the decider's state (one is also taken at stop):
/// a restart reads at most about this many again, and the logs before the last snapshot
/// may be deleted by retention.
pub const SNAPSHOT_EVENTS: u64 = 100_000;

type Read = (LogId, Result<CommittedPage, EngineError>);

#[derive(Default)]
struct Channel {
    /// A DM or group DM: every message concerns every member.
    direct: bool,
    name: String,
}

/// The decider's state, built from the events it reads.
pub struct Decider {
    engine: Engine,
    consumer: Consumer,
    outbox: Arc<Outbox>,
    /// The stored cursors: events before them are already decided.
    decided: Cursors,
    /// The offsets to read next.
    reading: Cursors,
    channels: HashMap<ChannelId, Channel>,
    /// Each channel's members who could be notified, kept as memberships, preferences and
    /// devices change.
    candidates: Candidates,
    names: HashMap<UserId, String>,
    notify: NotifyState,
    /// Items decided in this round.
    items: Vec<Item>,
    /// Which kinds of notification are sent.
    modes: Modes,
    /// Each user's latest digest window (it may have closed since).
    windows: HashMap<UserId, Window>,
    /// Email items decided in this round.
    emails: Vec<EmailItem>,
    /// Events read since the last snapshot.
    since_snapshot: u64,
    /// Messages committed before this time (µs since the epoch) are not decided: the first
    /// start's time, less [`FIRST_START_GRACE`] (`<outbox dir>/since`).
    decide_from_us: u64,
}

/// Which kinds of notification this server sends.
#[derive(Clone, Copy, Debug)]
pub struct Modes {
    /// Pushes (a push gateway is configured).
    pub push: bool,
    /// Email digests (an SMTP server is configured).
    pub email: bool,
}

/// The digest window a message decided at `now_ms` joins: the user's latest one while it
/// is open, else a new one that closes `digest_s` later. A window closes at `closes`
/// exactly, the instant the email sender may send it.
pub fn window_at(latest: Option<Window>, now_ms: u64, digest_s: u32) -> Window {
    match latest {
        Some(w) if now_ms < w.closes => w,
        _ => Window {
            opened: now_ms,
            closes: now_ms + u64::from(digest_s) * 1000,
        },
    }
}

/// Starts the decider on a thread of its own. It stops when `stop` fires (or its sender is
/// dropped), after storing what it has decided.
pub fn spawn(
    engine: Engine,
    consumer: &str,
    outbox: Arc<Outbox>,
    stored: Option<Cursors>,
    modes: Modes,
    windows: HashMap<u64, Window>,
    stop: oneshot::Receiver<()>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let consumer = engine
        .consumer(consumer)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let since = outbox.dir().join("since");
    let decided = match stored {
        Some(c) => c,
        None => {
            // The first start's time first: a crash before the cursors below leaves a
            // first start again, which writes it again.
            let now_ms = jiff::Timestamp::now().as_millisecond().max(0);
            crate::outbox::store_file(&since, now_ms.to_string().as_bytes())?;
            let partitions = engine.ends_at_open();
            let first = Cursors {
                partitions,
                meta: 0,
            };
            // Stored at once, so that a restart before the first message keeps them.
            outbox.append(Vec::new(), Vec::new(), &first)?;
            first
        }
    };
    // A snapshot taken after cursors were stored lies within them; one ahead of them is of
    // another outbox.
    let snapshot = crate::snapshot::load(outbox.dir())
        .filter(|s| crate::snapshot::within(&s.header.cursors, &decided));
    // Only a cluster node can open on logs that fill from their beginning later (a single
    // node's first cursors leave out all history already), so only there does the time
    // count: a wall clock set back after a single node's first start cannot hide a
    // message. Outboxes made before the first start's time was kept decide every message
    // after their cursors, as they did.
    let first_start_ms: u64 = match outbox.gate() {
        Some(_) => std::fs::read_to_string(&since)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0),
        None => 0,
    };
    let grace_ms = FIRST_START_GRACE.as_millis() as u64;
    let decide_from_us = first_start_ms.saturating_sub(grace_ms) * 1000;
    let mut decider = Decider {
        engine,
        consumer,
        outbox,
        decided,
        reading: Cursors::default(),
        channels: HashMap::new(),
        candidates: Candidates::default(),
        names: HashMap::new(),
        notify: NotifyState::default(),
        items: Vec::new(),
        modes,
        windows: windows.into_iter().map(|(u, w)| (UserId(u), w)).collect(),
        emails: Vec::new(),
        since_snapshot: 0,
        decide_from_us,
    };
    if let Some(s) = snapshot {
        decider.restore(s);
    }
    std::thread::Builder::new()
        .name("notify-decider".into())
        .spawn(move || {
            chorus_engine::consumer::lower_priority().unwrap_or_else(
                |e| tracing::warn!(error = %e, "notify decider: priority not lowered"),
            );
            decider.run(stop)
        })
}

impl Decider {
    fn read(&self, log: LogId) -> LocalBoxFuture<'static, Read> {
        let consumer = self.consumer.clone();
        let from = match log {
            LogId::Meta => self.reading.meta,
            LogId::Partition(p) => self.reading.partitions.get(&p).copied().unwrap_or(0),
        };
        Box::pin(async move { (log, consumer.read(log, from).await) })
    }

    fn run(mut self, mut stop: oneshot::Receiver<()>) {
        // The metadata log first, up to where it was read before the restart: preferences
        // and devices known then are known before any message is decided again.
        while self.reading.meta < self.decided.meta {
            let read = self.read(LogId::Meta);
            match futures::executor::block_on(select(read, &mut stop)) {
                Either::Left((read, _)) => self.apply_page(read),
                Either::Right(_) => return,
            }
        }
        let partitions = self.engine.config().partitions;
        let mut reads: FuturesUnordered<LocalBoxFuture<'static, Read>> = (0..partitions)
            .map(|p| self.read(LogId::Partition(p)))
            .chain([self.read(LogId::Meta)])
            .collect();
        loop {
            let read = match futures::executor::block_on(select(reads.next(), &mut stop)) {
                Either::Left((Some(read), _)) => read,
                _ => return self.snapshot(),
            };
            self.take(read, &mut reads);
            while let Some(Some(read)) = reads.next().now_or_never() {
                self.take(read, &mut reads);
            }
            if let Err(e) = self.store() {
                // The outbox cannot be written: stop deciding rather than lose decisions;
                // a restart decides again from the stored cursors.
                tracing::error!(error = %e, "notify decider: the outbox failed; stopping");
                return;
            }
            if self.since_snapshot >= SNAPSHOT_EVENTS {
                self.snapshot();
            }
        }
    }

    /// Takes the state a snapshot holds, and reads the logs from its cursors on; they are
    /// acknowledged at once (the engine's watermarks start afresh at each open).
    fn restore(&mut self, s: crate::snapshot::Snapshot) {
        self.notify = s.notify;
        self.names = (s.header.names.into_iter())
            .map(|(u, n)| (UserId(u), n))
            .collect();
        self.channels = (s.header.channels.into_iter())
            .map(|(c, direct, name)| (ChannelId(c), Channel { direct, name }))
            .collect();
        for (channel, user) in s.header.members {
            let (channel, user) = (ChannelId(channel), UserId(user));
            let (standing, keywords) = self.standing(user, channel);
            self.candidates.joined(channel, user, standing, keywords);
        }
        self.reading = s.header.cursors;
        self.acknowledge();
    }

    /// Stores a snapshot of the state, which covers every event before the reading
    /// cursors, and acknowledges them: a restart reads from there. Called between rounds,
    /// when those cursors are stored too. A snapshot that cannot be written is only a
    /// warning: the last one (or the logs from their start) still serves a restart.
    fn snapshot(&mut self) {
        use crate::snapshot::{encode, path, sorted, Header};
        let header = Header {
            cursors: self.reading.clone(),
            names: sorted(self.names.iter().map(|(u, n)| (u.0, n.clone()))),
            channels: sorted(
                self.channels
                    .iter()
                    .map(|(c, ch)| (c.0, (ch.direct, ch.name.clone()))),
            )
            .into_iter()
            .map(|(c, (direct, name))| (c, direct, name))
            .collect(),
            members: self.candidates.memberships(),
        };
        let bytes = encode(&header, &self.notify);
        match crate::outbox::store_file(&path(self.outbox.dir()), &bytes) {
            Ok(()) => {
                self.since_snapshot = 0;
                self.acknowledge();
            }
            Err(e) => tracing::warn!(error = %e, "notify decider: snapshot not stored"),
        }
    }

    /// Tells the engine the reading cursors: the logs before them are not needed again.
    fn acknowledge(&self) {
        for (p, at) in &self.reading.partitions {
            self.consumer.acknowledge(LogId::Partition(*p), *at);
        }
        self.consumer.acknowledge(LogId::Meta, self.reading.meta);
    }

    /// Stores the round's items with the cursors after them, if anything was decided.
    fn store(&mut self) -> std::io::Result<()> {
        let mut moved = self.reading.meta > self.decided.meta;
        for (p, at) in &self.reading.partitions {
            let decided = self.decided.partitions.entry(*p).or_insert(0);
            if *at > *decided {
                *decided = *at;
                moved = true;
            }
        }
        self.decided.meta = self.decided.meta.max(self.reading.meta);
        if !moved {
            return Ok(());
        }
        let items = std::mem::take(&mut self.items);
        let emails = std::mem::take(&mut self.emails);
        self.outbox.append(items, emails, &self.decided)
    }

    /// Applies one page and asks for the next.
    fn take(&mut self, read: Read, reads: &mut FuturesUnordered<LocalBoxFuture<'static, Read>>) {
        let log = read.0;
        if let (LogId::Partition(p), Ok(page)) = (log, &read.1) {
            let from = self.decided.partitions.get(&p).copied().unwrap_or(0);
            if page.events.last().is_some_and(|e| e.offset >= from) {
                self.catch_up_meta();
            }
        }
        self.apply_page(read);
        reads.push(self.read(log));
    }

    /// Applies the metadata log up to its end as of now, before a page with messages to
    /// decide: every preference and device committed before a message is known when it is
    /// decided. (The metadata log and the partitions are read concurrently, so without
    /// this a partition's page could come first: a device added just before a message, or
    /// after a restart every device not yet read, would miss its push.)
    fn catch_up_meta(&mut self) {
        loop {
            let read = self.consumer.read_now(LogId::Meta, self.reading.meta);
            match futures::executor::block_on(read) {
                Ok(page) => {
                    let caught_up = page.next >= page.end;
                    self.apply_page((LogId::Meta, Ok(page)));
                    if caught_up {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "notify decider: metadata not caught up");
                    return;
                }
            }
        }
    }

    fn apply_page(&mut self, (log, page): Read) {
        match page {
            Ok(page) => {
                let from = match log {
                    LogId::Meta => self.decided.meta,
                    LogId::Partition(p) => self.decided.partitions.get(&p).copied().unwrap_or(0),
                };
                self.since_snapshot += page.events.len() as u64;
                let partition = match log {
                    LogId::Partition(p) => p,
                    LogId::Meta => 0,
                };
                for e in &page.events {
                    match &e.event {
                        CommittedKind::Channel(r) => {
                            self.apply(r, (partition, e.offset), e.offset >= from)
                        }
                        // A waiting read may bring back what a catch-up applied already.
                        CommittedKind::Meta(_) if e.offset < self.reading.meta => {}
                        CommittedKind::Meta(r) => self.apply_meta(&r.event),
                        CommittedKind::Read(_) => {}
                    }
                }
                match log {
                    LogId::Meta => self.reading.meta = self.reading.meta.max(page.next),
                    LogId::Partition(p) => {
                        self.reading.partitions.insert(p, page.next);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, ?log, "notify decider: read failed");
                std::thread::sleep(RETRY_INTERVAL);
            }
        }
    }

    fn apply_meta(&mut self, event: &MetaEvent) {
        match event {
            MetaEvent::UserCreated { user, name, .. } => {
                self.names.insert(*user, name.clone());
            }
            MetaEvent::ChannelCreated {
                channel,
                name,
                kind,
                ..
            } => {
                let c = self.channels.entry(*channel).or_default();
                c.direct = kind.is_direct();
                c.name = name.clone();
            }
            MetaEvent::Notify(change) => {
                let touched = self.notify.touched_by(change);
                self.notify.apply(change);
                for (user, only) in touched {
                    for channel in self.candidates.channels_of(user) {
                        if only.is_none_or(|c| c == channel) {
                            let (standing, keywords) = self.standing(user, channel);
                            self.candidates.set(channel, user, standing, keywords);
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// Applies a channel event at `at` (its partition and offset); decides it if `new`.
    fn apply(&mut self, r: &ChannelRecord, at: (u32, u64), new: bool) {
        match &r.event {
            ChannelEvent::MemberJoined { user, .. } => {
                let (standing, keywords) = self.standing(*user, r.channel);
                (self.candidates).joined(r.channel, *user, standing, keywords);
            }
            ChannelEvent::MemberLeft { user, .. } => self.candidates.left(r.channel, *user),
            _ if new => self.decide(r, at),
            _ => {}
        }
    }

    /// The members who could be notified of this message by their levels alone, pushed
    /// (with a device) or emailed (with a digest interval): the candidates, before presence
    /// and the rules' last word. `@here` counts as if everyone were online (presence is
    /// asked later, and only of the candidates).
    fn candidates(&self, r: &ChannelRecord, m: &Message<'_>) -> Vec<UserId> {
        let posted = Posted {
            author: m.author,
            mentions: m.mentions,
            direct: m.direct,
        };
        let text = m.text.to_lowercase();
        let has_keyword = |u| rules::keyword_in_lowercase(&self.notify.prefs(u).keywords, &text);
        self.candidates.of(r.channel, &posted, has_keyword)
    }

    /// What a member's levels allow at most in a channel, over the ways they can be
    /// reached (a push needs a device, an email a digest interval), and whether they have
    /// keywords.
    fn standing(&self, user: UserId, channel: ChannelId) -> (Standing, bool) {
        crate::candidates::standing(&self.notify, self.modes, user, channel)
    }

    /// The user's digest window for a message decided at `now_ms` (see [`window_at`]).
    fn window(&mut self, user: UserId, now_ms: u64, digest_s: u32) -> Window {
        let latest = self.windows.get(&user).copied();
        let window = window_at(latest, now_ms, digest_s);
        self.windows.insert(user, window);
        window
    }

    fn decide(&mut self, r: &ChannelRecord, (partition, offset): (u32, u64)) {
        let Some(posted) = r.event.posted() else {
            return;
        };
        // History from before the first start: a joining node's logs come from the
        // beginning.
        if r.at_us < self.decide_from_us {
            return;
        }
        let channel = self.channels.get(&r.channel);
        let direct = channel.is_some_and(|c| c.direct);
        // A body kept in the blob store (over 64 KiB) is not read here: no keyword
        // matches it; mentions and levels still apply. Ciphertext is never read: an
        // encrypted DM notifies by the DM rule alone (`API.md` §14).
        let text = match posted.body {
            Body::Text(t) => t.as_str(),
            Body::Blob { .. } | Body::Ciphertext(_) => "",
        };
        let m = Message {
            author: posted.user,
            text,
            mentions: posted.mentions,
            direct,
        };
        let candidates = self.candidates(r, &m);
        if candidates.is_empty() {
            return;
        }
        let reach = self.reach(&candidates);
        let now = jiff::Timestamp::now();
        let now_ms = now.as_millisecond().max(0) as u64;
        let room_name = channel.map(|c| c.name.clone()).unwrap_or_default();
        let author_name = self.names.get(&posted.user).cloned().unwrap_or_default();
        for user in candidates {
            let reach = reach.get(&user).copied().unwrap_or_default();
            // An active connection sees the message live.
            if reach.active {
                continue;
            }
            let prefs = self.notify.prefs(user);
            let recipient = Recipient {
                user,
                prefs,
                channel: self.notify.channel(user, r.channel),
                online: reach.online,
                dnd_mode: reach.dnd,
            };
            let decision = rules::decide(&recipient, &m, now);
            let high = rules::concerns(&recipient, &m);
            let digest_s = prefs.email_digest_s;
            if decision.email && self.modes.email && digest_s > 0 {
                let window = self.window(user, now_ms, digest_s);
                self.emails.push(EmailItem {
                    user: user.0,
                    window: window.opened,
                    closes: window.closes,
                    channel: r.channel.0,
                    seq: r.seq,
                    partition,
                    offset,
                    workspace: r.workspace.0,
                    author_name: author_name.clone(),
                    room_name: room_name.clone(),
                });
            }
            if !(decision.push && self.modes.push) {
                continue;
            }
            for d in self.notify.devices(user) {
                self.items.push(Item {
                    channel: r.channel.0,
                    seq: r.seq,
                    partition,
                    offset,
                    workspace: r.workspace.0,
                    user: user.0,
                    device: d.id.0,
                    app_id: d.app_id.clone(),
                    pushkey: d.pushkey.clone(),
                    author: posted.user.0,
                    author_name: author_name.clone(),
                    room_name: room_name.clone(),
                    high,
                });
            }
        }
    }

    /// What reaches each candidate, asked of their presence owners. When it cannot be
    /// asked, everyone counts as away and reachable: a push too many rather than one lost.
    /// The chunks are asked all at once (a fan-out to 100,000 is 200 of them).
    fn reach(&self, users: &[UserId]) -> HashMap<UserId, Reach> {
        let asks = users
            .chunks(chorus_engine::presence::PRESENCE_QUERY_MAX)
            .map(|chunk| self.engine.reach(chunk));
        let mut found = HashMap::new();
        for answer in futures::executor::block_on(futures::future::join_all(asks)) {
            match answer {
                Ok(list) => found.extend(list),
                Err(e) => tracing::warn!(error = %e, "notify decider: presence not known"),
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A window takes every message until it closes; the first message at or after its
    // close opens the next, with the interval the user has then.
    #[test]
    fn windows_open_at_a_message_and_close_digest_s_later() {
        let first = window_at(None, 10_000, 2);
        assert_eq!(
            first,
            Window {
                opened: 10_000,
                closes: 12_000
            }
        );
        assert_eq!(window_at(Some(first), 11_999, 900), first);
        let next = window_at(Some(first), 12_000, 5);
        assert_eq!(
            next,
            Window {
                opened: 12_000,
                closes: 17_000
            }
        );
    }
}
