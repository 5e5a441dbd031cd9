//! Notifications on a cluster (`API.md` §15): every node decides, one node sends.
//!
//! - **Every node decides.** Each node runs the decider on its own replicas of the logs,
//!   so its outbox holds the decisions of every message, as a single node's does. A node
//!   that takes over sending has nothing to catch up.
//! - **One node sends**, the *sending node*: the directory's leader. The gateway tells the
//!   [`Gate`] whether this node is it ([`Gate::set_sending`]); the senders of the others
//!   hold their items.
//! - **What was answered travels as a [`Confirmed`].** Every item names its message's
//!   event by position, `(partition, offset)`, and an event has the same offset on every
//!   replica, so a position means the same on every node. The sending node's
//!   [`Confirmed`] says, per partition, the offset before which every item it decided is
//!   answered (pushed, dropped, given up, or answered through confirmation), and which
//!   items after it are answered too. The other nodes pull it from the sending node every
//!   [`PULL_EVERY`] ([`Gate::heard`]) and answer their own items it covers without sending
//!   them.
//! - **The sending node's decisions win.** A node's presence view can differ for a few
//!   milliseconds from another's, so two nodes may decide one message differently. An
//!   item another node decided and the sending node did not is answered once the
//!   sending node's frontier passes it; an item only the sending node decided is sent by
//!   it, and lost only if it dies before sending it.
//! - **Confirmations only add.** A fact heard stays true whoever sends next: frontiers
//!   merge by their maximum and the answered items by their union ([`Confirmed::merge`]).
//! - **Taking over.** A node that becomes the sending node first asks every peer it can
//!   reach for what it heard, and only then sends. So a leader's last confirmations reach
//!   its successor through any node that pulled them. What the old sending node answered
//!   after its last confirmation left it is sent again, with the same `event_id`: at most
//!   one [`PULL_EVERY`] of pushes plus the requests in flight, as a crash of a single node
//!   repeats what was answered since its last store.
//! - **Facts come from a node that sent.** A node serves its own answered items only once
//!   it has been the sending node since it started; before, it serves only what it heard.
//!   A follower's own frontier would claim messages it decided differently.

use crate::outbox::{Cursors, EmailItem, Item};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// The first byte of a peer's call for this node's [`Confirmed`] (files' calls are `0xF1`,
/// presence's `0xF2`).
pub const MAGIC: u8 = 0xF3;
/// How often a node that does not send asks the sending node what it answered.
pub const PULL_EVERY: Duration = Duration::from_millis(250);
/// The most answered items of each kind one [`Confirmed`] carries past its frontier (the
/// lowest positions: any subset is true, and the lowest are those most likely to be
/// waiting elsewhere).
pub const ANSWERED_MAX: usize = 50_000;

/// A push item's position and recipient: `(partition, offset, user, device)`.
pub type PushKey = (u32, u64, u64, u64);
/// An email item's position and recipient: `(partition, offset, user)`.
pub type EmailKey = (u32, u64, u64);

fn push_key(item: &Item) -> PushKey {
    (item.partition, item.offset, item.user, item.device)
}

fn email_key(item: &EmailItem) -> EmailKey {
    (item.partition, item.offset, item.user)
}

/// What a sending node answered: true facts, whoever sends next.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirmed {
    /// Per partition, the offset before which every push item is answered.
    pub push: BTreeMap<u32, u64>,
    /// Per partition, the offset before which every email item is answered.
    pub email: BTreeMap<u32, u64>,
    /// Push items answered at or after their partition's frontier.
    pub pushes: BTreeSet<PushKey>,
    /// Email items answered at or after their partition's frontier.
    pub emails: BTreeSet<EmailKey>,
}

fn below(frontier: &BTreeMap<u32, u64>, partition: u32, offset: u64) -> bool {
    frontier.get(&partition).is_some_and(|f| offset < *f)
}

impl Confirmed {
    /// Whether this push item is answered.
    pub fn covers_push(&self, item: &Item) -> bool {
        below(&self.push, item.partition, item.offset) || self.pushes.contains(&push_key(item))
    }

    /// Whether this email item is answered.
    pub fn covers_email(&self, item: &EmailItem) -> bool {
        below(&self.email, item.partition, item.offset) || self.emails.contains(&email_key(item))
    }

    /// Adds what `other` says: each frontier the further of the two, the answered items
    /// of both (those below the frontiers dropped). Answers whether it learned anything.
    pub fn merge(&mut self, other: Confirmed) -> bool {
        let mut learned = false;
        for (frontier, theirs) in [(&mut self.push, other.push), (&mut self.email, other.email)] {
            for (p, f) in theirs {
                let mine = frontier.entry(p).or_insert(0);
                learned |= f > *mine;
                *mine = (*mine).max(f);
            }
        }
        for k in other.pushes {
            learned |= self.pushes.insert(k);
        }
        for k in other.emails {
            learned |= self.emails.insert(k);
        }
        self.prune();
        learned
    }

    /// Drops the answered items their frontier covers.
    fn prune(&mut self) {
        let (push, email) = (&self.push, &self.email);
        self.pushes.retain(|k| !below(push, k.0, k.1));
        self.emails.retain(|k| !below(email, k.0, k.1));
    }

    /// At most [`ANSWERED_MAX`] answered items of each kind, the lowest.
    fn capped(mut self) -> Confirmed {
        cap(&mut self.pushes);
        cap(&mut self.emails);
        self
    }

    /// The answer to a peer's call: [`MAGIC`], then JSON.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![MAGIC];
        serde_json::to_writer(&mut out, self).expect("a confirmation serializes");
        out
    }

    /// Reads an answer made by [`Confirmed::encode`]; `None` if it is not one.
    pub fn decode(bytes: &[u8]) -> Option<Confirmed> {
        match bytes.split_first() {
            Some((&MAGIC, json)) => serde_json::from_slice(json).ok(),
            _ => None,
        }
    }
}

/// Keeps the lowest [`ANSWERED_MAX`] of `set`.
fn cap<K: Ord + Copy>(set: &mut BTreeSet<K>) {
    if let Some(&first_dropped) = set.iter().nth(ANSWERED_MAX) {
        set.split_off(&first_dropped);
    }
}

/// Waits until the gate changes; for ever without a gate (a single node).
pub(crate) async fn next_change(changes: &mut Option<tokio::sync::watch::Receiver<u64>>) {
    match changes {
        Some(c) => {
            let _ = c.changed().await;
        }
        None => std::future::pending().await,
    }
}

/// What this node decided and answered, by position.
#[derive(Default)]
struct Ledger {
    /// Per partition, the offset the decider reads next: everything before is decided.
    decided: BTreeMap<u32, u64>,
    /// Decided and not answered: how many items each position holds.
    pending_push: BTreeMap<(u32, u64), u32>,
    pending_email: BTreeMap<(u32, u64), u32>,
    /// Answered, possibly past the frontier (pruned now and then).
    answered_push: BTreeSet<PushKey>,
    answered_email: BTreeSet<EmailKey>,
    /// Answers since the last prune.
    since_prune: usize,
}

/// Per partition decided, the first pending offset, or the decided end if none.
fn frontier(
    decided: &BTreeMap<u32, u64>,
    pending: &BTreeMap<(u32, u64), u32>,
) -> BTreeMap<u32, u64> {
    decided
        .iter()
        .map(|(&p, &end)| {
            let first = pending.range((p, 0)..=(p, u64::MAX)).next();
            (p, first.map_or(end, |((_, at), _)| (*at).min(end)))
        })
        .collect()
}

fn settle(pending: &mut BTreeMap<(u32, u64), u32>, at: (u32, u64)) {
    if let Some(n) = pending.get_mut(&at) {
        *n -= 1;
        if *n == 0 {
            pending.remove(&at);
        }
    }
}

impl Ledger {
    fn confirmed(&mut self, push: bool, email: bool) -> Confirmed {
        self.prune();
        let mut c = Confirmed::default();
        if push {
            c.push = frontier(&self.decided, &self.pending_push);
            c.pushes = self.answered_push.clone();
        }
        if email {
            c.email = frontier(&self.decided, &self.pending_email);
            c.emails = self.answered_email.clone();
        }
        c
    }

    /// Drops the answered items below their frontier.
    fn prune(&mut self) {
        let push = frontier(&self.decided, &self.pending_push);
        let email = frontier(&self.decided, &self.pending_email);
        self.answered_push.retain(|k| !below(&push, k.0, k.1));
        self.answered_email.retain(|k| !below(&email, k.0, k.1));
        self.since_prune = 0;
    }

    fn answered(&mut self) {
        self.since_prune += 1;
        if self.since_prune >= 4_096 {
            self.prune();
        }
    }
}

/// Where a cluster node's decider, senders and gateway meet.
pub struct Gate {
    /// The kinds this node decides (push, email), set at start.
    modes: OnceLock<(bool, bool)>,
    ledger: Mutex<Ledger>,
    heard: Mutex<Confirmed>,
    sending: AtomicBool,
    /// Whether this node has been the sending node since it started.
    has_sent: AtomicBool,
    /// Bumped when `heard` or `sending` changes: the senders look again.
    changed: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("sending", &self.sending())
            .finish_non_exhaustive()
    }
}

impl Default for Gate {
    fn default() -> Gate {
        Gate {
            modes: OnceLock::new(),
            ledger: Mutex::default(),
            heard: Mutex::default(),
            sending: AtomicBool::new(false),
            has_sent: AtomicBool::new(false),
            changed: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl Gate {
    /// A gate that does not send until told to.
    pub fn new() -> Gate {
        Gate::default()
    }

    pub(crate) fn set_modes(&self, push: bool, email: bool) {
        let _ = self.modes.set((push, email));
    }

    /// Whether this node's senders send.
    pub fn sending(&self) -> bool {
        self.sending.load(Ordering::SeqCst)
    }

    /// Makes this node the sending node, or not.
    pub fn set_sending(&self, on: bool) {
        if on {
            self.has_sent.store(true, Ordering::SeqCst);
        }
        if self.sending.swap(on, Ordering::SeqCst) != on {
            tracing::info!(sending = on, "notifications: this node's senders change");
            self.changed.send_modify(|v| *v += 1);
        }
    }

    /// Adds what another node confirmed.
    pub fn heard(&self, confirmed: Confirmed) {
        let learned = self.heard.lock().expect("heard lock").merge(confirmed);
        if learned {
            self.changed.send_modify(|v| *v += 1);
        }
    }

    /// What this node can tell a peer: what it heard, and what it answered itself once it
    /// has sent.
    pub fn confirmed(&self) -> Confirmed {
        let mut c = self.heard.lock().expect("heard lock").clone();
        if self.has_sent.load(Ordering::SeqCst) {
            let (push, email) = self.modes.get().copied().unwrap_or_default();
            let own = self
                .ledger
                .lock()
                .expect("ledger lock")
                .confirmed(push, email);
            c.merge(own);
        }
        c.capped()
    }

    /// Runs `f` on what this node heard.
    pub(crate) fn with_heard<T>(&self, f: impl FnOnce(&Confirmed) -> T) -> T {
        f(&self.heard.lock().expect("heard lock"))
    }

    /// A receiver that changes when the senders should look again.
    pub(crate) fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The decider stored these items, and its cursors after them.
    pub(crate) fn decided<'a>(
        &self,
        items: impl Iterator<Item = &'a Item>,
        emails: impl Iterator<Item = &'a EmailItem>,
        cursors: Option<&Cursors>,
    ) {
        let mut ledger = self.ledger.lock().expect("ledger lock");
        for i in items {
            *ledger
                .pending_push
                .entry((i.partition, i.offset))
                .or_default() += 1;
        }
        for e in emails {
            *ledger
                .pending_email
                .entry((e.partition, e.offset))
                .or_default() += 1;
        }
        if let Some(c) = cursors {
            for (&p, &o) in &c.partitions {
                let d = ledger.decided.entry(p).or_default();
                *d = (*d).max(o);
            }
        }
    }

    /// These push items are answered.
    pub(crate) fn answered_pushes<'a>(&self, items: impl Iterator<Item = &'a Item>) {
        let mut ledger = self.ledger.lock().expect("ledger lock");
        for i in items {
            settle(&mut ledger.pending_push, (i.partition, i.offset));
            ledger.answered_push.insert(push_key(i));
            ledger.answered();
        }
    }

    /// These email items are answered.
    pub(crate) fn answered_emails<'a>(&self, items: impl Iterator<Item = &'a EmailItem>) {
        let mut ledger = self.ledger.lock().expect("ledger lock");
        for e in items {
            settle(&mut ledger.pending_email, (e.partition, e.offset));
            ledger.answered_email.insert(email_key(e));
            ledger.answered();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(partition: u32, offset: u64, user: u64) -> Item {
        Item {
            channel: 1,
            seq: offset,
            partition,
            offset,
            workspace: 2,
            user,
            device: 7,
            app_id: "app".into(),
            pushkey: "key".into(),
            author: 5,
            author_name: "ann".into(),
            room_name: "general".into(),
            high: true,
        }
    }

    fn email(partition: u32, offset: u64, user: u64) -> EmailItem {
        EmailItem {
            user,
            window: 10,
            closes: 20,
            channel: 1,
            seq: offset,
            partition,
            offset,
            workspace: 2,
            author_name: "ann".into(),
            room_name: "general".into(),
        }
    }

    fn cursors(pairs: &[(u32, u64)]) -> Cursors {
        Cursors {
            partitions: pairs.iter().copied().collect(),
            meta: 0,
        }
    }

    // The frontier stops at the first item not answered; items answered past it are
    // named; everything decided before it is covered, whether this node had an item there
    // or not (the sending node's decisions win).
    #[test]
    fn the_sending_nodes_frontier_stops_at_its_first_unanswered_item() {
        let gate = Gate::new();
        gate.set_modes(true, true);
        let items = [
            item(0, 10, 1),
            item(0, 20, 1),
            item(0, 30, 1),
            item(1, 5, 1),
        ];
        let emails = [email(0, 20, 1)];
        gate.decided(
            items.iter(),
            emails.iter(),
            Some(&cursors(&[(0, 40), (1, 9)])),
        );
        gate.answered_pushes([&items[0], &items[2], &items[3]].into_iter());
        // Not yet the sending node: nothing of its own is told.
        assert_eq!(gate.confirmed(), Confirmed::default());
        gate.set_sending(true);
        let c = gate.confirmed();
        assert_eq!(c.push, BTreeMap::from([(0, 20), (1, 9)]));
        assert_eq!(c.pushes, BTreeSet::from([push_key(&items[2])]));
        assert_eq!(c.email, BTreeMap::from([(0, 20), (1, 9)]));
        assert!(c.covers_push(&items[0]) && c.covers_push(&items[2]) && c.covers_push(&items[3]));
        assert!(!c.covers_push(&items[1]));
        // Another node's item at an offset this node decided without one is covered.
        assert!(c.covers_push(&item(0, 15, 9)));
        assert!(!c.covers_push(&item(0, 35, 9)));
        assert!(!c.covers_email(&emails[0]));
        gate.answered_emails(emails.iter());
        gate.answered_pushes([&items[1]].into_iter());
        let c = gate.confirmed();
        assert_eq!(c.push, BTreeMap::from([(0, 40), (1, 9)]));
        assert!(c.pushes.is_empty(), "pruned below the frontier: {c:?}");
        assert!(c.covers_email(&emails[0]));
        // A kind this node does not decide is never claimed.
        let push_only = Gate::new();
        push_only.set_modes(true, false);
        push_only.decided([].iter(), [].iter(), Some(&cursors(&[(0, 40)])));
        push_only.set_sending(true);
        assert!(push_only.confirmed().email.is_empty());
    }

    // What was heard only grows: frontiers by their maximum, answered items by union, and
    // an answered item below a frontier is dropped.
    #[test]
    fn confirmations_merge_by_maximum_and_union() {
        let mut a = Confirmed {
            push: BTreeMap::from([(0, 10), (1, 50)]),
            pushes: BTreeSet::from([(0, 12, 1, 7), (0, 30, 1, 7)]),
            ..Default::default()
        };
        let b = Confirmed {
            push: BTreeMap::from([(0, 20), (1, 40), (2, 5)]),
            pushes: BTreeSet::from([(1, 45, 1, 7)]),
            emails: BTreeSet::from([(0, 3, 1)]),
            ..Default::default()
        };
        a.merge(b);
        assert_eq!(a.push, BTreeMap::from([(0, 20), (1, 50), (2, 5)]));
        assert_eq!(a.pushes, BTreeSet::from([(0, 30, 1, 7)]));
        assert_eq!(a.emails, BTreeSet::from([(0, 3, 1)]));
        assert_eq!(Confirmed::decode(&a.encode()), Some(a.clone()));
        assert_eq!(Confirmed::decode(b"{}"), None);
        assert_eq!(Confirmed::decode(&[MAGIC, b'x']), None);
    }

    // A confirmation carries at most ANSWERED_MAX answered items of a kind, the lowest.
    #[test]
    fn a_confirmation_is_capped() {
        let many = Confirmed {
            pushes: (0..ANSWERED_MAX as u64 + 10)
                .map(|o| (0, o, 1, 1))
                .collect(),
            ..Default::default()
        }
        .capped();
        assert_eq!(many.pushes.len(), ANSWERED_MAX);
        assert_eq!(
            many.pushes.last(),
            Some(&(0, ANSWERED_MAX as u64 - 1, 1, 1))
        );
    }

    // Hearing something new wakes the senders; hearing it again does not.
    #[test]
    fn hearing_news_wakes_the_senders() {
        let gate = Gate::new();
        let mut changes = gate.subscribe();
        let news = Confirmed {
            push: BTreeMap::from([(0, 10)]),
            ..Default::default()
        };
        gate.heard(news.clone());
        assert!(changes.has_changed().unwrap());
        changes.borrow_and_update();
        gate.heard(news);
        assert!(!changes.has_changed().unwrap());
        gate.set_sending(true);
        assert!(changes.has_changed().unwrap());
        assert!(gate.with_heard(|h| h.covers_push(&item(0, 9, 1))));
    }
}
