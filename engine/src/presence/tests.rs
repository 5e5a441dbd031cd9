//! The presence table against a plain model under random events and simulated time.

use super::*;
use std::collections::BTreeMap;

const GRACE: Duration = Duration::from_secs(3);
const EPOCH_US: u64 = 1_700_000_000_000_000;

/// A seeded generator (SplitMix64), so that a failing seed replays exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One user in the model: the facts, with the status computed from them at any time.
#[derive(Default)]
struct ModelUser {
    conns: BTreeMap<u64, bool>,
    mode: Option<Mode>,
    /// The end of `dnd`: on the clock, and as shown.
    dnd: Option<(Instant, u64)>,
    /// When the last connection went, and the `auto` status it left behind.
    left: Option<(Instant, Status)>,
}

impl ModelUser {
    /// Connection `c` closes, if open; the grace starts if it was the last.
    fn close(&mut self, now: Instant, c: u64) {
        let auto = if self.conns.values().any(|a| *a) {
            Status::Online
        } else {
            Status::Away
        };
        if self.conns.remove(&c).is_some() && self.conns.is_empty() {
            self.left = Some((now, auto));
        }
    }

    fn state(&self, t: Instant) -> (Status, Option<u64>) {
        let dnd_over = self.dnd.is_some_and(|(at, _)| t >= at);
        let mode = match self.mode.unwrap_or(Mode::Auto) {
            Mode::Dnd if dnd_over => Mode::Auto,
            m => m,
        };
        let in_grace = self.left.is_some_and(|(at, _)| t < at + GRACE);
        if (self.conns.is_empty() && !in_grace) || mode == Mode::Invisible {
            return (Status::Offline, None);
        }
        match mode {
            Mode::Dnd => (Status::Dnd, self.dnd.map(|(_, wall)| wall)),
            Mode::Away => (Status::Away, None),
            _ if self.conns.is_empty() => (self.left.expect("in grace").1, None),
            _ if self.conns.values().any(|a| *a) => (Status::Online, None),
            _ => (Status::Away, None),
        }
    }
}

struct Run {
    seed: u64,
    start: Instant,
    now: Instant,
    table: PresenceTable,
    model: Vec<ModelUser>,
    /// What a watcher that got every change would show.
    seen: Vec<Presence>,
    last_seq: u64,
}

impl Run {
    fn unix(&self) -> u64 {
        EPOCH_US + (self.now - self.start).as_micros() as u64
    }

    fn take(&mut self, change: Option<Change>, step: usize) {
        let Some(c) = change else { return };
        let u = c.user.0 as usize;
        assert!(
            c.old.same_state(&self.seen[u]),
            "seed {} step {step}: a change from {:?}, but the watcher saw {:?}",
            self.seed,
            c.old,
            self.seen[u]
        );
        assert!(
            !c.old.same_state(&c.new),
            "seed {}: an empty change",
            self.seed
        );
        assert!(c.seq > self.last_seq, "seed {}: numbers go up", self.seed);
        self.last_seq = c.seq;
        self.seen[u] = c.new;
    }

    fn check(&self, step: usize, what: &str) {
        for (u, m) in self.model.iter().enumerate() {
            let (status, dnd) = m.state(self.now);
            let seen = self.seen[u];
            assert_eq!(
                (seen.status, seen.dnd_until_us),
                (status, dnd),
                "seed {} step {step} ({what}) user {u} at {:?}",
                self.seed,
                self.now - self.start
            );
            assert!(self.table.get(UserId(u as u64)).same_state(&seen));
        }
    }

    /// Moves the clock to `to`, waking at every deadline on the way as the owner's timer
    /// does, and checks the model at each.
    fn advance(&mut self, to: Instant, step: usize) {
        while let Some(at) = self.table.next_deadline().filter(|at| *at <= to) {
            assert!(at >= self.now, "seed {}: a deadline in the past", self.seed);
            self.now = at;
            for c in self.table.expire(at) {
                self.take(Some(c), step);
            }
            self.check(step, "deadline");
        }
        self.now = to;
        self.check(step, "advance");
    }
}

fn run(seed: u64, steps: usize) {
    let mut rng = Rng(seed);
    let start = Instant::now();
    let users = 1 + rng.below(4) as usize;
    let mut r = Run {
        seed,
        start,
        now: start,
        table: PresenceTable::new(GRACE),
        model: (0..users).map(|_| ModelUser::default()).collect(),
        seen: vec![Presence::OFFLINE; users],
        last_seq: 0,
    };
    // The last time a mode was chosen, per user: a choice from another node comes later.
    let mut chosen_at = vec![0u64; users];
    for step in 0..steps {
        let u = rng.below(users as u64) as usize;
        let user = UserId(u as u64);
        // Connections 0 to 2 are this node's; 3 and 4 stand for all of nodes 2 and 3's.
        let c = rng.below(5);
        let node = (c >= 3).then(|| c - 1);
        let conn = ConnKey::new(0, (u as u64) * 8 + c);
        let (now, unix) = (r.now, r.unix());
        let open = r.model[u].conns.contains_key(&c);
        match rng.below(12) {
            0..=1 if !open => {
                let change = match node {
                    None => r.table.connect(unix, user, conn),
                    Some(n) => r.table.remote_conns(now, user, n, Some(true), Some(unix)),
                };
                r.model[u].conns.insert(c, true);
                r.model[u].left = None;
                r.take(change, step);
            }
            0..=2 if open => {
                let active = rng.below(2) == 0;
                let change = match node {
                    None => r.table.activity(unix, user, conn, active),
                    Some(n) => r.table.remote_conns(now, user, n, Some(active), Some(unix)),
                };
                r.model[u].conns.insert(c, active);
                r.take(change, step);
            }
            3 if open => {
                r.model[u].close(now, c);
                let change = match node {
                    None => r.table.disconnect(now, unix, user, conn),
                    Some(n) => r.table.remote_conns(now, user, n, None, None),
                };
                r.take(change, step);
            }
            10 => {
                // Node 2 is gone: none of its connections counts any more.
                for m in &mut r.model {
                    m.close(now, 3);
                }
                for change in r.table.node_gone(now, 2) {
                    r.take(Some(change), step);
                }
            }
            11 => {
                // Node 3 says, whole, which users have a connection open there.
                let mut open = Vec::new();
                for (u, m) in r.model.iter_mut().enumerate() {
                    match rng.below(3) {
                        0 => m.close(now, 4),
                        a => {
                            if m.conns.insert(4, a == 2).is_none() {
                                m.left = None;
                            }
                            open.push((UserId(u as u64), a == 2, Some(unix)));
                        }
                    }
                }
                for change in r.table.node_reset(now, 3, &open) {
                    r.take(Some(change), step);
                }
            }
            9 => {
                // A mode chosen on another node, later than any before.
                let mode =
                    [Mode::Auto, Mode::Away, Mode::Dnd, Mode::Invisible][rng.below(4) as usize];
                let until = (mode == Mode::Dnd && rng.below(3) > 0)
                    .then(|| unix + 1 + rng.below(5_000_000));
                chosen_at[u] = chosen_at[u].max(unix) + 1;
                let change = r
                    .table
                    .mode_from(now, unix, user, mode, until, chosen_at[u]);
                let m = &mut r.model[u];
                m.mode = Some(mode);
                m.dnd = until.map(|wall| (now + Duration::from_micros(wall - unix), wall));
                r.take(change, step);
                // The same choice again, or an older one, changes nothing.
                let again = r
                    .table
                    .mode_from(now, unix, user, Mode::Away, None, chosen_at[u]);
                assert_eq!(again, None, "seed {seed}: a choice taken twice");
            }
            4 => {
                let mode =
                    [Mode::Auto, Mode::Away, Mode::Dnd, Mode::Invisible][rng.below(4) as usize];
                let until = (mode == Mode::Dnd && rng.below(3) > 0)
                    .then(|| unix + 1 + rng.below(5_000_000));
                let (own, change) = r.table.set_mode(now, unix, user, mode, until);
                chosen_at[u] = r.table.mode_at(user);
                let m = &mut r.model[u];
                m.mode = Some(mode);
                m.dnd = until.map(|wall| (now + Duration::from_micros(wall - unix), wall));
                r.take(change, step);
                assert!(own.same_state(&r.seen[u]));
                assert_eq!(r.table.mode(user), (mode, until));
            }
            _ => {
                let to = now + Duration::from_micros(rng.below(2_000_000));
                r.advance(to, step);
            }
        }
        r.check(step, "event");
    }
    // Everyone leaves: after the grace and every dnd, all are offline and nothing is left
    // but what a restart would forget too.
    for u in 0..users {
        let conns: Vec<u64> = r.model[u].conns.keys().copied().collect();
        for c in conns {
            let (now, unix) = (r.now, r.unix());
            r.model[u].close(now, c);
            let user = UserId(u as u64);
            let change = match c {
                0..=2 => r
                    .table
                    .disconnect(now, unix, user, ConnKey::new(0, u as u64 * 8 + c)),
                _ => r.table.remote_conns(now, user, c - 1, None, None),
            };
            r.take(change, steps);
        }
    }
    let end = r.now + GRACE + Duration::from_secs(6);
    r.advance(end, steps);
    assert!(r.seen.iter().all(|p| p.status == Status::Offline));
    assert_eq!(
        r.table.next_deadline(),
        None,
        "seed {seed}: a deadline left"
    );
}

// The table's changes, folded as a watcher folds them, always show what the plain model
// computes from the facts, at every event and at every deadline, over many seeds.
#[test]
fn table_matches_the_model() {
    let seeds: u64 = std::env::var("CHORUS_PRESENCE_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2_000);
    for seed in 0..seeds {
        run(seed, 200);
    }
}

// A reconnect within the grace changes nothing others see; after the grace the user is
// offline, once.
#[test]
fn reconnect_within_grace_is_silent() {
    let t0 = Instant::now();
    let mut table = PresenceTable::new(GRACE);
    let u = UserId(7);
    let (a, b) = (ConnKey::new(0, 1), ConnKey::new(1, 1));
    let on = table.connect(EPOCH_US, u, a).expect("online");
    assert_eq!(on.new.status, Status::Online);
    assert_eq!(table.disconnect(t0, EPOCH_US, u, a), None);
    assert!(table
        .expire(t0 + GRACE - Duration::from_millis(1))
        .is_empty());
    assert_eq!(table.connect(EPOCH_US, u, b), None);
    assert_eq!(table.next_deadline(), None);
    assert_eq!(
        table.disconnect(t0 + Duration::from_secs(2), EPOCH_US, u, b),
        None
    );
    let off = table.expire(t0 + Duration::from_secs(2) + GRACE);
    assert_eq!(off.len(), 1);
    assert_eq!(off[0].new.status, Status::Offline);
    assert_eq!(off[0].new.last_active_us, Some(EPOCH_US));
}

// Watchers are kept per watched user, once each, and a user nobody watches or sees is
// forgotten.
#[test]
fn watchers_are_kept_once_and_forgotten() {
    let mut table = PresenceTable::new(GRACE);
    let u = UserId(3);
    let (a, b) = (ConnKey::new(2, 9), ConnKey::new(0, 4));
    assert_eq!(table.watch(u, a), (Presence::OFFLINE, 0));
    table.watch(u, a);
    table.watch(u, b);
    assert_eq!(table.watchers(u), &[a, b]);
    table.unwatch(u, a);
    assert_eq!(table.watchers(u), &[b]);
    table.unwatch(u, b);
    assert!(table.is_empty());
    assert_eq!((a.shard(), a.sub()), (2, 9));
}

// An update record survives its encoding, and no JSON frame reads as one.
#[test]
fn update_records_round_trip() {
    let update = Update {
        user: UserId(42),
        old: Presence::OFFLINE,
        new: Presence {
            status: Status::Dnd,
            dnd_until_us: Some(EPOCH_US + 5),
            last_active_us: Some(EPOCH_US),
        },
        seq: 9,
    };
    let bytes = update.encode();
    assert_eq!(bytes.len(), UPDATE_BYTES);
    assert_eq!(bytes[0], UPDATE_TAG);
    let back = Update::decode(&bytes).expect("decodes");
    assert_eq!(back.new, update.new);
    assert_eq!((back.user, back.seq), (update.user, 9));
    assert!(back.old.same_state(&update.old));
    assert_eq!(Update::decode(br#"{"type":"event"}"#), None);
}

// A window carries its records in order, each as encoded; it holds at most
// WINDOW_RECORDS_MAX of them; and neither a record nor a JSON frame reads as a window.
#[test]
fn windows_carry_records_up_to_their_bound() {
    let record = |seq: u64| {
        Update {
            user: UserId(seq % 7 + 1),
            old: Presence::OFFLINE,
            new: Presence {
                status: Status::Online,
                dnd_until_us: None,
                last_active_us: Some(EPOCH_US),
            },
            seq,
        }
        .encode()
    };
    let mut window = window_start(2);
    for seq in 1..=WINDOW_RECORDS_MAX as u64 {
        assert!(window_push(&mut window, &record(seq)), "record {seq} fits");
    }
    let full = window.clone();
    assert!(!window_push(&mut window, &record(0)), "one over the bound");
    assert_eq!(window, full, "a refused record leaves the window as it was");
    assert!(is_window(&window));
    let seqs: Vec<u64> = window_records(&window)
        .map(|r| Update::decode(r).expect("decodes").seq)
        .collect();
    assert_eq!(seqs, (1..=WINDOW_RECORDS_MAX as u64).collect::<Vec<_>>());
    let empty = window_start(0);
    assert_eq!(window_records(&empty).count(), 0);
    assert!(is_window(&empty));
    assert!(!is_window(&record(1)));
    assert!(!is_window(br#"{"type":"event"}"#));
}

// What reaches a user for pushes: an active open connection, not the grace after it; mode
// `dnd` with or without a connection; and its bits round-trip.
#[test]
fn reach_counts_open_active_connections_and_dnd() {
    let t0 = Instant::now();
    let mut table = PresenceTable::new(GRACE);
    let u = UserId(9);
    let a = ConnKey::new(0, 1);
    assert_eq!(table.reach(u), Reach::default());
    table.connect(EPOCH_US, u, a);
    assert!(table.reach(u).active && table.reach(u).online);
    table.activity(EPOCH_US, u, a, false);
    assert!(!table.reach(u).active && table.reach(u).online);
    table.activity(EPOCH_US, u, a, true);
    table.disconnect(t0, EPOCH_US, u, a);
    let graced = table.reach(u);
    assert!(!graced.active && graced.online, "{graced:?}");
    let v = UserId(10);
    table.set_mode(t0, EPOCH_US, v, Mode::Dnd, None);
    assert!(table.reach(v).dnd && !table.reach(v).active);
    for r in [graced, table.reach(v)] {
        assert_eq!(Reach::from_bits(r.bits()), r);
    }
}

// What a node shares of its table comes in pages by user ID, each user whole (a connection
// and a mode in the same page), at least one user a page, and the pages together are all.
#[test]
fn the_shared_state_pages_by_user_whole() {
    let t0 = Instant::now();
    let mut table = PresenceTable::new(GRACE);
    for u in 1..=5u64 {
        table.connect(EPOCH_US, UserId(u * 10), ConnKey::new(0, u));
        if u % 2 == 1 {
            table.set_mode(t0, EPOCH_US, UserId(u * 10), Mode::Away, None);
        }
    }
    // Someone only watched shares nothing.
    table.watch(UserId(99), ConnKey::new(0, 77));
    let user = |r: &peers::Record| match *r {
        peers::Record::Conns { user, .. } | peers::Record::Mode { user, .. } => user.0,
    };
    let (all, more) = table.shared(UserId(0), usize::MAX);
    assert!(!more);
    assert_eq!(all.len(), 8);
    let mut after = UserId(0);
    let mut pages = Vec::new();
    loop {
        let (page, more) = table.shared(after, 3);
        assert!(!page.is_empty());
        assert!(page.len() <= 3 || page.iter().all(|r| user(r) == user(&page[0])));
        after = peers::last_user(&page).expect("a user");
        pages.push(page);
        if !more {
            break;
        }
    }
    let joined: Vec<u64> = pages.iter().flatten().map(user).collect();
    let mut sorted = joined.clone();
    sorted.sort();
    assert_eq!(joined, sorted, "pages in user order");
    assert_eq!(joined.len(), 8);
    for page in &pages[..pages.len() - 1] {
        let last = user(page.last().unwrap());
        assert!(
            pages.iter().flatten().filter(|r| user(r) == last).count()
                == page.iter().filter(|r| user(r) == last).count(),
            "user {last} split over pages"
        );
    }
}
