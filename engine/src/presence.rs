//! Presence (`API.md` §10) as a pure state machine: the table a user's home shard keeps for
//! the users it owns, and the compact update record that carries a change to a watcher.
//!
//! [`PresenceTable`] touches no clock, timer, queue or socket. Its owner feeds it what
//! happened (a connection opened, reported active or idle, went away; a mode was set; a
//! connection started or stopped watching a user) together with the time, and asks it when
//! it must be woken next ([`PresenceTable::next_deadline`]). Each input answers the
//! [`Change`] of what others see, if there is one; the owner sends it to the watchers.
//! Deadlines (the offline grace, a `dnd_until`) are timer events: the owner sleeps until
//! the earliest and calls [`PresenceTable::expire`]; nothing sweeps the table.
//!
//! The status others see is derived, never stored as a fact:
//! - a user is *present* while a connection is open or the offline grace after the last one
//!   runs; a user who is not present, or whose mode is `invisible`, is `offline`;
//! - otherwise mode `dnd` shows `dnd`, mode `away` shows `away`, and mode `auto` shows
//!   `online` if any connection is active, `away` if every one reported idle, and, during
//!   the grace, whatever it showed when the last connection went.
//!
//! Presence lives only here, in memory: it is never written to a log, so a restart starts
//! everyone `offline` in mode `auto`.
//!
//! In a cluster every node keeps the whole table: a user's connections on other nodes, and
//! modes chosen there, come in as inputs too ([`PresenceTable::remote_conns`],
//! [`PresenceTable::mode_from`]), passed between the same shard of every node by
//! [`peers`]. So a watcher is registered, and answered, on its own node.

use crate::ids::UserId;
use bytes::Bytes;
use smallvec::SmallVec;
use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

/// Most users one connection watches (`API.md` §10).
pub const PRESENCE_WATCH_MAX: usize = 1_000;
/// Most users one presence query names (`API.md` §10).
pub const PRESENCE_QUERY_MAX: usize = 500;

/// How a `presence:sub` changes a connection's watched set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WatchOp {
    /// Replace the whole set.
    Set,
    /// Add to it.
    Add,
    /// Remove from it.
    Remove,
}

/// What others see.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Status {
    /// Present, and active on some connection.
    Online,
    /// Present, idle on every connection, or in mode `away`.
    Away,
    /// Present, in mode `dnd`.
    Dnd,
    /// Not present, or invisible.
    Offline,
}

impl Status {
    /// The name of `API.md`.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Online => "online",
            Status::Away => "away",
            Status::Dnd => "dnd",
            Status::Offline => "offline",
        }
    }

    fn code(self) -> u8 {
        self as u8
    }

    fn from_code(code: u8) -> Option<Status> {
        [Status::Online, Status::Away, Status::Dnd, Status::Offline]
            .get(code as usize)
            .copied()
    }
}

/// What the user chose.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Derived from the connections (the default).
    Auto,
    /// Always `away` while present.
    Away,
    /// `dnd` while present, until its deadline if it has one.
    Dnd,
    /// `offline` to everyone else.
    Invisible,
}

impl Mode {
    /// The name of `API.md`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Auto => "auto",
            Mode::Away => "away",
            Mode::Dnd => "dnd",
            Mode::Invisible => "invisible",
        }
    }

    /// Parses the name of `API.md`.
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "auto" => Some(Mode::Auto),
            "away" => Some(Mode::Away),
            "dnd" => Some(Mode::Dnd),
            "invisible" => Some(Mode::Invisible),
            _ => None,
        }
    }
}

/// A user's presence as others see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Presence {
    /// The status.
    pub status: Status,
    /// When `dnd` ends (microseconds since the Unix epoch), while the status is `dnd`.
    pub dnd_until_us: Option<u64>,
    /// When the user was last active (microseconds since the Unix epoch); never shown for
    /// an invisible user.
    pub last_active_us: Option<u64>,
}

impl Presence {
    /// What a user nobody knows about, or who shares no workspace with the asker, shows.
    pub const OFFLINE: Presence = Presence {
        status: Status::Offline,
        dnd_until_us: None,
        last_active_us: None,
    };

    /// Whether two presences show the same state: a status change is a change of the
    /// status or of the end of `dnd`; `last_active_us` alone is not one.
    pub fn same_state(&self, other: &Presence) -> bool {
        self.status == other.status && self.dnd_until_us == other.dnd_until_us
    }
}

/// A user's own presence: as others see it, with the mode they chose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OwnPresence {
    /// What others see.
    pub presence: Presence,
    /// The mode.
    pub mode: Mode,
    /// When `dnd` ends, in mode `dnd` with an end.
    pub dnd_until_us: Option<u64>,
}

/// What decides a push (`API.md` §13), as the presence owner knows it now: an open
/// connection in the `active` state (closed ones and the offline grace do not count), mode
/// `dnd` (connected or not), and whether others see the user online (for `@here`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reach {
    /// A connection is open and active.
    pub active: bool,
    /// The mode is `dnd`.
    pub dnd: bool,
    /// Others do not see them `offline`.
    pub online: bool,
}

impl Reach {
    /// In one word, for the gather of presence answers.
    pub(crate) fn bits(self) -> u64 {
        self.active as u64 | (self.dnd as u64) << 1 | (self.online as u64) << 2
    }

    pub(crate) fn from_bits(b: u64) -> Reach {
        Reach {
            active: b & 1 != 0,
            dnd: b & 2 != 0,
            online: b & 4 != 0,
        }
    }
}

/// A connection as the presence owner knows it: its shard and its subscription's ID on
/// that shard, in one word (16 bits of shard, 48 of subscription), so that a watcher costs
/// 8 bytes in a watched user's list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnKey(pub u64);

impl ConnKey {
    const SUB_BITS: u32 = 48;

    /// The key of subscription `sub` of `shard`.
    pub fn new(shard: u32, sub: u64) -> ConnKey {
        assert!(
            shard < 1 << 16,
            "shard {shard} does not fit a connection key"
        );
        assert!(
            sub < 1 << Self::SUB_BITS,
            "subscription {sub} does not fit a key"
        );
        ConnKey((u64::from(shard) << Self::SUB_BITS) | sub)
    }

    /// The connection's shard.
    pub fn shard(self) -> u32 {
        (self.0 >> Self::SUB_BITS) as u32
    }

    /// The connection's subscription on its shard.
    pub fn sub(self) -> u64 {
        self.0 & ((1 << Self::SUB_BITS) - 1)
    }
}

/// The home shard of a user: the shard that owns their presence.
pub fn home_shard(user: UserId, shards: u32) -> u32 {
    (xxhash_rust::xxh3::xxh3_64(&user.0.to_le_bytes()) % u64::from(shards.max(1))) as u32
}

/// A change of what others see of a user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Change {
    /// Whose.
    pub user: UserId,
    /// What they showed before.
    pub old: Presence,
    /// What they show now.
    pub new: Presence,
    /// The table's change number: every change of the table has a higher one than all
    /// before it, and [`PresenceTable::watch`] answers the last, so a watcher can tell a
    /// change its answer already includes from a later one.
    pub seq: u64,
}

/// Which deadline of a user.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Deadline {
    /// The offline grace after the last connection went.
    Grace,
    /// The end of `dnd`.
    Dnd,
}

/// One user's presence at their home shard.
#[derive(Debug)]
struct Entry {
    /// The open connections, each active (`true`) or idle.
    conns: SmallVec<[(ConnKey, bool); 2]>,
    /// The other nodes of a cluster where the user has a connection open, each with
    /// whether one of them is active.
    remote: SmallVec<[(u64, bool); 1]>,
    mode: Mode,
    /// When the mode was chosen (microseconds since the Unix epoch; 0: never chosen): of
    /// two choices made on different nodes, the later wins.
    mode_at_us: u64,
    /// The end of `dnd`: the deadline on the owner's clock and the wall time shown.
    dnd: Option<(Instant, u64)>,
    /// While the offline grace runs: when it ends.
    grace_until: Option<Instant>,
    /// The `auto` status shown when the last connection went, kept through the grace.
    kept: Status,
    last_active_us: Option<u64>,
    /// What watchers were last told (or would have been).
    shown: Presence,
    /// The connections watching this user.
    watchers: Vec<ConnKey>,
}

impl Entry {
    fn new() -> Entry {
        Entry {
            conns: SmallVec::new(),
            remote: SmallVec::new(),
            mode: Mode::Auto,
            mode_at_us: 0,
            dnd: None,
            grace_until: None,
            kept: Status::Offline,
            last_active_us: None,
            shown: Presence::OFFLINE,
            watchers: Vec::new(),
        }
    }

    /// Whether a connection is open, here or on another node.
    fn connected(&self) -> bool {
        !self.conns.is_empty() || !self.remote.is_empty()
    }

    /// Whether an open connection, here or on another node, is active.
    fn active(&self) -> bool {
        self.conns.iter().any(|(_, active)| *active) || self.remote.iter().any(|(_, a)| *a)
    }

    /// The `auto` status of the open connections.
    fn auto_status(&self) -> Status {
        if !self.connected() {
            self.kept
        } else if self.active() {
            Status::Online
        } else {
            Status::Away
        }
    }

    /// What others see now.
    fn derive(&self) -> Presence {
        let present = self.connected() || self.grace_until.is_some();
        let status = match self.mode {
            _ if !present => Status::Offline,
            Mode::Invisible => Status::Offline,
            Mode::Dnd => Status::Dnd,
            Mode::Away => Status::Away,
            Mode::Auto => self.auto_status(),
        };
        Presence {
            status,
            dnd_until_us: match status {
                Status::Dnd => self.dnd.map(|(_, wall)| wall),
                _ => None,
            },
            last_active_us: match self.mode {
                Mode::Invisible => None,
                _ => self.last_active_us,
            },
        }
    }

    /// Nothing here that a restart would not forget anyway... except `last_active_us`,
    /// which is kept for as long as the process runs.
    fn is_empty(&self) -> bool {
        !self.connected()
            && self.grace_until.is_none()
            && self.mode == Mode::Auto
            && self.watchers.is_empty()
            && self.last_active_us.is_none()
    }
}

/// The presence of the users one shard owns; see the module documentation.
#[derive(Debug)]
pub struct PresenceTable {
    grace: Duration,
    /// The number of the last change.
    seq: u64,
    users: HashMap<UserId, Entry>,
    /// When users the table forgot (nothing of theirs was left but mode `auto`) last
    /// chose their mode, so that an older choice from another node, coming late, is still
    /// known to be older: 16 bytes for each user who chose a mode since the start.
    chosen: HashMap<UserId, u64>,
    /// Every pending deadline, earliest first.
    deadlines: BTreeSet<(Instant, UserId, Deadline)>,
}

impl PresenceTable {
    /// An empty table; everyone is `offline`. `grace` is how long a user stays as they were
    /// after their last connection went.
    pub fn new(grace: Duration) -> PresenceTable {
        PresenceTable {
            grace,
            seq: 0,
            users: HashMap::new(),
            chosen: HashMap::new(),
            deadlines: BTreeSet::new(),
        }
    }

    /// What others see of `user` now.
    pub fn get(&self, user: UserId) -> Presence {
        self.users.get(&user).map_or(Presence::OFFLINE, |e| e.shown)
    }

    /// What the notification decider needs of `user` (`API.md` §13), whatever others see.
    pub fn reach(&self, user: UserId) -> Reach {
        self.users.get(&user).map_or(Reach::default(), |e| Reach {
            active: e.active(),
            dnd: e.mode == Mode::Dnd,
            online: e.shown.status != Status::Offline,
        })
    }

    /// The mode `user` chose, and the end of `dnd` shown, if any.
    pub fn mode(&self, user: UserId) -> (Mode, Option<u64>) {
        self.users.get(&user).map_or((Mode::Auto, None), |e| {
            (e.mode, e.dnd.map(|(_, wall)| wall))
        })
    }

    /// The connections watching `user`.
    pub fn watchers(&self, user: UserId) -> &[ConnKey] {
        self.users.get(&user).map_or(&[], |e| &e.watchers)
    }

    /// How many users the table holds (for tests and measurements).
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether the table holds no user.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// When [`Self::expire`] must be called next.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first().map(|(at, _, _)| *at)
    }

    /// A connection of `user` opened; it counts as active.
    pub fn connect(&mut self, unix_us: u64, user: UserId, conn: ConnKey) -> Option<Change> {
        let e = Self::entry(&mut self.users, &mut self.chosen, user);
        if !e.conns.iter().any(|(c, _)| *c == conn) {
            e.conns.push((conn, true));
        }
        e.last_active_us = Some(unix_us);
        if let Some(at) = e.grace_until.take() {
            self.deadlines.remove(&(at, user, Deadline::Grace));
        }
        self.settle(user)
    }

    /// What this node's own connections of `user` show the other nodes of a cluster:
    /// `None` when none is open, else whether one is active; with the last activity known.
    pub fn here(&self, user: UserId) -> (Option<bool>, Option<u64>) {
        self.users.get(&user).map_or((None, None), |e| {
            let here = (!e.conns.is_empty()).then(|| e.conns.iter().any(|(_, a)| *a));
            (here, e.last_active_us)
        })
    }

    /// What `node`'s connections of `user` show (as [`Self::here`] says it there): `None`
    /// when none is open there any more, else whether one is active. A user's last
    /// connection anywhere going starts the grace, as [`Self::disconnect`] does.
    pub fn remote_conns(
        &mut self,
        now: Instant,
        user: UserId,
        node: u64,
        state: Option<bool>,
        last_active_us: Option<u64>,
    ) -> Option<Change> {
        if state.is_none() && !self.users.contains_key(&user) {
            return None;
        }
        let e = Self::entry(&mut self.users, &mut self.chosen, user);
        e.last_active_us = e.last_active_us.max(last_active_us);
        let kept = e.auto_status();
        let i = e.remote.iter().position(|(n, _)| *n == node);
        match (state, i) {
            (Some(active), Some(i)) => e.remote[i].1 = active,
            (Some(active), None) => {
                e.remote.push((node, active));
                if let Some(at) = e.grace_until.take() {
                    self.deadlines.remove(&(at, user, Deadline::Grace));
                }
            }
            (None, Some(i)) => {
                e.remote.swap_remove(i);
                self.start_grace(now, user, kept);
            }
            (None, None) => {}
        }
        self.settle(user)
    }

    /// Every connection of `node` counts as closed (it has not been heard from for too
    /// long); the changes that makes.
    pub fn node_gone(&mut self, now: Instant, node: u64) -> Vec<Change> {
        let users: Vec<UserId> = self
            .users
            .iter()
            .filter(|(_, e)| e.remote.iter().any(|(n, _)| *n == node))
            .map(|(u, _)| *u)
            .collect();
        users
            .into_iter()
            .filter_map(|u| self.remote_conns(now, u, node, None, None))
            .collect()
    }

    /// `node`'s connections are those of `open` (each user's activity and last activity)
    /// and no others; the changes that makes.
    pub fn node_reset(
        &mut self,
        now: Instant,
        node: u64,
        open: &[(UserId, bool, Option<u64>)],
    ) -> Vec<Change> {
        let mut changes: Vec<Change> = open
            .iter()
            .filter_map(|&(u, active, last)| self.remote_conns(now, u, node, Some(active), last))
            .collect();
        let listed: std::collections::HashSet<UserId> = open.iter().map(|(u, _, _)| *u).collect();
        let stale: Vec<UserId> = self
            .users
            .iter()
            .filter(|(u, e)| !listed.contains(u) && e.remote.iter().any(|(n, _)| *n == node))
            .map(|(u, _)| *u)
            .collect();
        for u in stale {
            changes.extend(self.remote_conns(now, u, node, None, None));
        }
        changes
    }

    /// Starts the offline grace of `user` if no connection of theirs is open anywhere now;
    /// `kept` is the `auto` status shown before the last one went.
    fn start_grace(&mut self, now: Instant, user: UserId, kept: Status) {
        let Some(e) = self.users.get_mut(&user) else {
            return;
        };
        if e.connected() {
            return;
        }
        e.kept = kept;
        if let Some(at) = e.grace_until.take() {
            self.deadlines.remove(&(at, user, Deadline::Grace));
        }
        let at = now + self.grace;
        e.grace_until = Some(at);
        self.deadlines.insert((at, user, Deadline::Grace));
    }

    /// A connection of `user` reported the person active or idle.
    pub fn activity(
        &mut self,
        unix_us: u64,
        user: UserId,
        conn: ConnKey,
        active: bool,
    ) -> Option<Change> {
        let e = self.users.get_mut(&user)?;
        let (_, state) = e.conns.iter_mut().find(|(c, _)| *c == conn)?;
        // Activity ends or goes on now: either way, the person was active until now.
        if active || *state {
            e.last_active_us = Some(unix_us);
        }
        *state = active;
        self.settle(user)
    }

    /// A connection of `user` went away. When it was the last, the user stays as they were
    /// for the grace.
    pub fn disconnect(
        &mut self,
        now: Instant,
        unix_us: u64,
        user: UserId,
        conn: ConnKey,
    ) -> Option<Change> {
        let e = self.users.get_mut(&user)?;
        let i = e.conns.iter().position(|(c, _)| *c == conn)?;
        let kept = e.auto_status();
        let (_, active) = e.conns.swap_remove(i);
        if active {
            e.last_active_us = Some(unix_us);
        }
        self.start_grace(now, user, kept);
        self.settle(user)
    }

    /// `user` chose a mode; `dnd_until_us` (a wall time) ends a `dnd` mode, at `now` plus
    /// its distance from `unix_us` on the owner's clock. Answers what others see now.
    pub fn set_mode(
        &mut self,
        now: Instant,
        unix_us: u64,
        user: UserId,
        mode: Mode,
        dnd_until_us: Option<u64>,
    ) -> (Presence, Option<Change>) {
        let at_us = self.mode_at(user).max(unix_us.saturating_sub(1)) + 1;
        let change = self.choose(now, unix_us, user, mode, dnd_until_us, at_us);
        (self.get(user), change)
    }

    /// `user` chose a mode on another node at `at_us` (as [`Self::mode_at`] says it there):
    /// taken unless a later choice was; the change it makes.
    pub fn mode_from(
        &mut self,
        now: Instant,
        unix_us: u64,
        user: UserId,
        mode: Mode,
        dnd_until_us: Option<u64>,
        at_us: u64,
    ) -> Option<Change> {
        if at_us <= self.mode_at(user) {
            return None;
        }
        self.choose(now, unix_us, user, mode, dnd_until_us, at_us)
    }

    /// When `user`'s mode was last chosen (microseconds since the Unix epoch; 0: never).
    pub fn mode_at(&self, user: UserId) -> u64 {
        match self.users.get(&user) {
            Some(e) => e.mode_at_us,
            None => self.chosen.get(&user).copied().unwrap_or(0),
        }
    }

    /// Drops `user`'s entry, which holds nothing a restart would not forget too, but when
    /// they last chose a mode.
    fn forget(&mut self, user: UserId) {
        if let Some(e) = self.users.remove(&user) {
            if e.mode_at_us != 0 {
                self.chosen.insert(user, e.mode_at_us);
            }
        }
    }

    /// `user`'s entry in `users`, made if there is none (with when they last chose a mode,
    /// from `chosen`).
    fn entry<'a>(
        users: &'a mut HashMap<UserId, Entry>,
        chosen: &mut HashMap<UserId, u64>,
        user: UserId,
    ) -> &'a mut Entry {
        users.entry(user).or_insert_with(|| {
            let mut e = Entry::new();
            e.mode_at_us = chosen.remove(&user).unwrap_or(0);
            e
        })
    }

    /// What another node of a cluster needs to know of this one, whole: every user with a
    /// connection open here (whether one is active, and the last activity), and every mode
    /// chosen.
    ///
    /// One page of it: the users after `after` in ID order, as many as hold at most `max`
    /// records (each user's whole, and at least one user); and whether users remain.
    pub fn shared(&self, after: UserId, max: usize) -> (Vec<peers::Record>, bool) {
        let mut users: Vec<(&UserId, &Entry)> = self
            .users
            .iter()
            .filter(|(u, e)| **u > after && (!e.conns.is_empty() || e.mode_at_us != 0))
            .collect();
        users.sort_unstable_by_key(|(u, _)| **u);
        let mut records = Vec::new();
        let mut taken = 0;
        for (&user, e) in &users {
            if records.len() + 2 > max.max(2) && taken > 0 {
                break;
            }
            taken += 1;
            if !e.conns.is_empty() {
                records.push(peers::Record::Conns {
                    user,
                    active: Some(e.conns.iter().any(|(_, a)| *a)),
                    last_active_us: e.last_active_us,
                });
            }
            if e.mode_at_us != 0 {
                records.push(peers::Record::Mode {
                    user,
                    mode: e.mode,
                    dnd_until_us: e.dnd.map(|(_, wall)| wall),
                    at_us: e.mode_at_us,
                });
            }
        }
        (records, taken < users.len())
    }

    fn choose(
        &mut self,
        now: Instant,
        unix_us: u64,
        user: UserId,
        mode: Mode,
        dnd_until_us: Option<u64>,
        at_us: u64,
    ) -> Option<Change> {
        let e = Self::entry(&mut self.users, &mut self.chosen, user);
        if let Some((at, _)) = e.dnd.take() {
            self.deadlines.remove(&(at, user, Deadline::Dnd));
        }
        e.mode = mode;
        e.mode_at_us = at_us;
        if let (Mode::Dnd, Some(wall)) = (mode, dnd_until_us) {
            let at = now + Duration::from_micros(wall.saturating_sub(unix_us));
            e.dnd = Some((at, wall));
            self.deadlines.insert((at, user, Deadline::Dnd));
        }
        self.settle(user)
    }

    /// Every deadline at or before `now`, in time order: the grace ends (the user goes
    /// `offline`), `dnd` ends (the mode returns to `auto`). Answers the changes they make.
    pub fn expire(&mut self, now: Instant) -> Vec<Change> {
        let mut changes = Vec::new();
        while let Some(&(at, user, which)) = self.deadlines.first() {
            if at > now {
                break;
            }
            self.deadlines.pop_first();
            let Some(e) = self.users.get_mut(&user) else {
                continue;
            };
            match which {
                Deadline::Grace => e.grace_until = None,
                Deadline::Dnd => {
                    e.dnd = None;
                    e.mode = Mode::Auto;
                }
            }
            changes.extend(self.settle(user));
        }
        changes
    }

    /// `conn` watches `user` from now on (again, if it did); answers what `user` shows and
    /// the number of the last change, which that includes.
    pub fn watch(&mut self, user: UserId, conn: ConnKey) -> (Presence, u64) {
        let e = Self::entry(&mut self.users, &mut self.chosen, user);
        if !e.watchers.contains(&conn) {
            e.watchers.push(conn);
        }
        (e.shown, self.seq)
    }

    /// `conn` no longer watches `user`.
    pub fn unwatch(&mut self, user: UserId, conn: ConnKey) {
        let Some(e) = self.users.get_mut(&user) else {
            return;
        };
        if let Some(i) = e.watchers.iter().position(|c| *c == conn) {
            e.watchers.swap_remove(i);
            if e.watchers.capacity() > 4 * e.watchers.len().max(1) {
                e.watchers.shrink_to_fit();
            }
        }
        if e.is_empty() {
            self.forget(user);
        }
    }

    /// Brings what `user` shows up to date; the change, if the state shown changed.
    fn settle(&mut self, user: UserId) -> Option<Change> {
        let e = self.users.get_mut(&user)?;
        let new = e.derive();
        let old = e.shown;
        e.shown = new;
        if e.is_empty() {
            self.forget(user);
        }
        if old.same_state(&new) {
            return None;
        }
        self.seq += 1;
        Some(Change {
            user,
            old,
            new,
            seq: self.seq,
        })
    }
}

/// The first byte of an update record. Every frame of `API.md` is a JSON object and starts
/// with `{`, so a subscriber's queue can carry both and its reader tell them apart.
pub const UPDATE_TAG: u8 = 0;
/// The length of an update record.
pub const UPDATE_BYTES: usize = 44;

/// The first byte of a window ([`window_start`]).
pub const WINDOW_TAG: u8 = 1;

/// Starts a subscriber's presence window, as its reader will receive it: this tag byte,
/// then the window's update records ([`Update::encode`]) in the order the shard took them.
/// The shard that holds the subscriber gathers a window's records (the first one opens it)
/// and queues the whole window, with a wake-up, `presence_flush_ms` after it opened; the
/// reader then sends one `presence` frame for it. A window opens only with a record after
/// the previous window was queued, so windows are at least `presence_flush_ms` apart, and
/// a window costs the reader one queue slot and one wake-up, whatever it holds.
pub fn window_start(records: usize) -> Vec<u8> {
    let mut window = Vec::with_capacity(1 + records * UPDATE_BYTES);
    window.push(WINDOW_TAG);
    window
}

/// The most records one presence window holds: four changes of every user a subscriber
/// may watch, within one window (172 KiB), is a flood, not a burst.
pub const WINDOW_RECORDS_MAX: usize = 4 * PRESENCE_WATCH_MAX;

/// Appends an update record to a window made by [`window_start`]; false, leaving the
/// window as it was, when it already holds [`WINDOW_RECORDS_MAX`] records.
pub fn window_push(window: &mut Vec<u8>, record: &[u8]) -> bool {
    if window.len() / UPDATE_BYTES >= WINDOW_RECORDS_MAX {
        return false;
    }
    window.extend_from_slice(record);
    true
}

/// Whether a frame in a subscriber's queue is a presence window.
pub fn is_window(frame: &[u8]) -> bool {
    frame.first() == Some(&WINDOW_TAG)
}

/// A window's update records (each to be read with [`Update::decode`]).
pub fn window_records(window: &[u8]) -> impl Iterator<Item = &[u8]> {
    window
        .get(1..)
        .unwrap_or_default()
        .chunks_exact(UPDATE_BYTES)
}

/// A change of one watched user, as a watcher's connection receives it: encoded once by
/// the owner, shared by every watcher, and never sent to a client as is (the session turns
/// the latest of each user into a `presence` frame).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Update {
    /// Whose.
    pub user: UserId,
    /// What they showed before.
    pub old: Presence,
    /// What they show now.
    pub new: Presence,
    /// The owner's change number ([`Change::seq`]).
    pub seq: u64,
}

impl Update {
    /// The record: tag, version 1, old and new status, then little-endian user, old and
    /// new `dnd_until` and `last_active` (each 0 for none), and the change number.
    pub fn encode(&self) -> Bytes {
        let mut out = Vec::with_capacity(UPDATE_BYTES);
        out.extend_from_slice(&[
            UPDATE_TAG,
            1,
            self.old.status.code(),
            self.new.status.code(),
        ]);
        out.extend_from_slice(&self.user.0.to_le_bytes());
        out.extend_from_slice(&self.old.dnd_until_us.unwrap_or(0).to_le_bytes());
        out.extend_from_slice(&self.new.dnd_until_us.unwrap_or(0).to_le_bytes());
        out.extend_from_slice(&self.new.last_active_us.unwrap_or(0).to_le_bytes());
        out.extend_from_slice(&self.seq.to_le_bytes());
        Bytes::from(out)
    }

    /// Reads a record made by [`Update::encode`]; `None` for anything else.
    pub fn decode(bytes: &[u8]) -> Option<Update> {
        if bytes.len() != UPDATE_BYTES || bytes[0] != UPDATE_TAG || bytes[1] != 1 {
            return None;
        }
        let word = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[i..i + 8]);
            u64::from_le_bytes(b)
        };
        let some = |v: u64| (v != 0).then_some(v);
        let last_active_us = some(word(28));
        Some(Update {
            user: UserId(word(4)),
            old: Presence {
                status: Status::from_code(bytes[2])?,
                dnd_until_us: some(word(12)),
                last_active_us,
            },
            new: Presence {
                status: Status::from_code(bytes[3])?,
                dnd_until_us: some(word(20)),
                last_active_us,
            },
            seq: word(36),
        })
    }
}

impl From<Change> for Update {
    fn from(c: Change) -> Update {
        Update {
            user: c.user,
            old: c.old,
            new: c.new,
            seq: c.seq,
        }
    }
}

pub mod peers;
#[cfg(test)]
mod tests;
