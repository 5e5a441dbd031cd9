//! `chorus-sim`: the whole-node deterministic simulation of Chorus.
//!
//! One run is one seed. On one thread, under a seeded scheduler with simulated time
//! ([`executor`]), it runs a whole node: every shard's loop, its partitions, the metadata
//! owner and the dispatchers (the real engine, through [`chorus_engine::Engine::start_local`]
//! and the environment seam, [`env::SimEnv`]), the simulated disk ([`chorus_log::SimRoot`]),
//! and one session core per client connection ([`driver`], the role `gateway/src/ws/` plays). Every
//! queue is tiny (inbox 4, partition queue 2, subscriber queue 8, catch-up page 3), so
//! backpressure, cut-offs and catch-ups happen all the time.
//!
//! Simulated users in several workspaces post, edit, delete, react, join and leave, open
//! DMs, type, read slowly, vanish and resume ([`client`]); the node crashes, losing what
//! was not synced, and reopens on the same disk. [`model`] checks every frame as it
//! arrives, [`checker`] checks everything against the logs at the end, and
//! [`run_seed`] reports the first seed that breaks a rule; `CHORUS_SIM_SEED=<seed>` replays
//! it exactly.
//!
//! [`cluster`] runs a cluster of Raft groups on the same scheduler: several simulated
//! nodes, a simulated network, and the fault test's checker.

pub mod checker;
pub mod client;
pub mod cluster;
pub mod driver;
pub mod env;
pub mod executor;
pub mod model;
pub mod pipe;
pub mod storage;

use crate::executor::{Executor, Stall};
use crate::model::{OpKind, Outcome, UserState, WorkspaceModel, World, WorldRef};
use chorus_engine::domain::ChannelKind;
use chorus_engine::ids::UserId;
use chorus_engine::{Engine, EngineConfig};
use chorus_log::{SimConfig, SimRoot};
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

/// The most steps one phase of a run may take (setup, one life of the node, the close).
/// A phase that needs more is stuck: a livelock, or work that never ends.
pub const PHASE_STEPS_MAX: u64 = 2_000_000;

/// A crash comes at a random step of a life, at most this many steps into it (a life of
/// the node takes some 300 to 1,500 steps).
const CRASH_STEPS_MAX: u64 = 700;

/// The capacities of the simulated node: tiny, so that every queue fills.
pub fn engine_config(shards: usize, partitions: u32) -> EngineConfig {
    let mut c = EngineConfig::new("/nonexistent/the-simulation-has-no-data-dir");
    c.shards = shards;
    c.partitions = partitions;
    c.pin = false;
    c.inbox_capacity = 4;
    c.partition_queue_requests = 2;
    c.subscriber_queue_frames = 8;
    c.catch_up_events = 3;
    // Small segments and frequent snapshots, so that rolling segments, snapshots and
    // restarts from them happen in every run.
    c.segment_bytes_max = 64 * 1024;
    c.snapshot_every_events = 16;
    // A short offline grace, so that presence deadlines fire in every run.
    c.presence_offline_grace = std::time::Duration::from_secs(1);
    c
}

/// The shape of one run, drawn from its seed.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Shards of the node.
    pub shards: usize,
    /// Channel partitions.
    pub partitions: u32,
    /// Users.
    pub users: usize,
    /// Workspaces.
    pub workspaces: usize,
    /// Channels created per workspace at setup.
    pub channels_per_workspace: usize,
    /// Lives of the node: each but the last may end in a crash.
    pub lives: usize,
    /// Actions per client per life.
    pub actions: usize,
}

impl Shape {
    fn of(ex: &Executor) -> Shape {
        Shape {
            shards: 1 + ex.below(3) as usize,
            partitions: 2 + ex.below(5) as u32,
            users: 4 + ex.below(4) as usize,
            workspaces: 1 + ex.below(2) as usize,
            channels_per_workspace: 2 + ex.below(2) as usize,
            lives: 2 + ex.below(2) as usize,
            actions: 6 + ex.below(10) as usize,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// The shape drawn from it.
    pub shape: Shape,
    /// Scheduler steps (task polls).
    pub steps: u64,
    /// Simulated time.
    pub simulated: Duration,
    /// Crashes of the node.
    pub crashes: u32,
    /// Counts of what the clients did and saw.
    pub counters: model::Counters,
    /// Events in the logs at the end.
    pub events: u64,
    /// A digest of everything observable, equal for every replay of the seed.
    pub digest: u64,
}

/// A seed that broke a rule.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The seed, to replay with `CHORUS_SIM_SEED`.
    pub seed: u64,
    /// What went wrong: the first rules broken.
    pub problems: Vec<String>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "simulation seed {} failed; replay with CHORUS_SIM_SEED={} cargo test -p chorus-sim",
            self.seed, self.seed
        )?;
        for p in self.problems.iter().take(12) {
            writeln!(f, "  {p}")?;
        }
        if self.problems.len() > 12 {
            writeln!(f, "  … and {} more", self.problems.len() - 12)?;
        }
        Ok(())
    }
}

/// The number in environment variable `name`, if it is set.
///
/// # Panics
///
/// If it is set to something else than a number.
pub fn env_number(name: &str) -> Option<u64> {
    std::env::var(name)
        .ok()
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name} is a number")))
}

/// Runs one seed: a node's whole life under one interleaving, then the checks.
pub fn run_seed(seed: u64) -> Result<Report, Failure> {
    Run::new(seed).go()
}

struct Run {
    seed: u64,
    ex: Executor,
    root: SimRoot,
    shape: Shape,
    world: WorldRef,
    crashes: u32,
}

fn fail(seed: u64, problem: impl Into<String>) -> Failure {
    Failure {
        seed,
        problems: vec![problem.into()],
    }
}

impl Run {
    fn new(seed: u64) -> Run {
        let ex = Executor::new(seed);
        let shape = Shape::of(&ex);
        Run {
            seed,
            root: SimRoot::new(SimConfig {
                seed: seed ^ 0x5EED_D15C,
                yield_permille: 200,
            }),
            shape,
            world: Rc::default(),
            ex,
            crashes: 0,
        }
    }

    fn config(&self) -> EngineConfig {
        engine_config(self.shape.shards, self.shape.partitions)
    }

    /// Runs the executor until `done`, failing the seed if it deadlocks or never ends.
    fn run_until(&self, what: &str, done: impl FnMut() -> bool) -> Result<(), Failure> {
        self.ex.run_until(done, PHASE_STEPS_MAX).map_err(|stall| {
            let why = match stall {
                Stall::Quiescent => "deadlock: every task waits and no timer is armed",
                Stall::Exhausted => "no end within the step budget (livelock?)",
            };
            fail(
                self.seed,
                format!(
                    "{what}: {why} (step {}, simulated {:?}, {} tasks alive)",
                    self.ex.steps(),
                    self.ex.elapsed(),
                    self.ex.live_tasks()
                ),
            )
        })
    }

    /// Runs `task` to its end on the executor and returns its output.
    fn run_task<T: 'static>(
        &self,
        what: &str,
        task: impl std::future::Future<Output = T> + 'static,
    ) -> Result<T, Failure> {
        let slot: Rc<RefCell<Option<T>>> = Rc::default();
        let out = slot.clone();
        drop(self.ex.spawn(async move {
            let value = task.await;
            *out.borrow_mut() = Some(value);
        }));
        self.run_until(what, || slot.borrow().is_some())?;
        let value = slot.borrow_mut().take().expect("set");
        Ok(value)
    }

    /// Opens the engine on the disk as it is.
    fn open(&self) -> Result<Engine, Failure> {
        let (ex, root, config) = (self.ex.clone(), self.root.clone(), self.config());
        let env = move |_| env::SimEnv::new(ex.clone(), root.clone());
        self.run_task("opening the engine", Engine::start_local(config, env))?
            .map_err(|e| fail(self.seed, format!("the engine did not open: {e}")))
    }

    /// Every session has ended: once the shards have swept, no partition may still count a
    /// subscription. One kept would route events to a shard for nobody, for good (a
    /// registration overtaken by its own unregistration does that).
    fn audit_subscribers(&self, engine: &Engine) -> Result<(), Failure> {
        let (engine, ex) = (engine.clone(), self.ex.clone());
        let audit = async move {
            // Two sweep intervals, and a first audit to turn every shard's loop, so that
            // unsubscriptions lost to full inboxes are swept.
            ex.sleep(Duration::from_millis(250)).await;
            let _ = engine.subscriber_index().await;
            ex.sleep(Duration::from_millis(250)).await;
            engine.subscriber_index().await
        };
        match self.run_task("auditing the subscriber index", audit)? {
            Ok(counts) if counts.is_empty() => Ok(()),
            Ok(counts) => Err(Failure {
                seed: self.seed,
                problems: counts
                    .iter()
                    .map(|c| {
                        format!(
                            "partition {} still counts {} subscription(s) of {} on shard {} after every session ended",
                            c.partition, c.subscriptions, c.user, c.shard
                        )
                    })
                    .collect(),
            }),
            Err(e) => Err(fail(self.seed, format!("auditing the subscriber index: {e}"))),
        }
    }

    fn go(mut self) -> Result<Report, Failure> {
        let mut engine = self.open()?;
        let world = self.world.clone();
        let setup = setup(engine.clone(), world, self.shape, self.ex.clone());
        self.run_task("setup", setup)?;
        for life in 0..self.shape.lives {
            let last = life + 1 == self.shape.lives;
            let crash_at = (!last && self.ex.chance(700))
                .then(|| self.ex.steps() + 1 + self.ex.below(CRASH_STEPS_MAX));
            let finished = Rc::new(Cell::new(0usize));
            for index in 0..self.shape.users {
                let client =
                    client::Client::new(index, engine.clone(), self.ex.clone(), self.world.clone());
                let finished = finished.clone();
                let actions = self.shape.actions;
                drop(self.ex.spawn(async move {
                    client.run(actions).await;
                    finished.set(finished.get() + 1);
                }));
            }
            let users = self.shape.users;
            let ex = self.ex.clone();
            self.run_until(&format!("life {life} of the node"), || {
                finished.get() == users || crash_at.is_some_and(|at| ex.steps() >= at)
            })?;
            if finished.get() < users {
                // A power loss: every task dies at once, unsynced data is lost or torn.
                self.crashes += 1;
                if model::tracing() {
                    eprintln!("[{:>8} {:>12?}] CRASH", self.ex.steps(), self.ex.elapsed());
                }
                drop(engine);
                self.ex.kill_all();
                self.world.borrow_mut().lose_pending();
                self.root.crash();
                engine = self.open()?;
            }
        }
        self.audit_subscribers(&engine)?;
        let closing = engine.clone();
        self.run_task("closing the engine", async move { closing.close().await })?;
        drop(engine);
        self.ex.kill_all();
        self.world.borrow_mut().lose_pending();
        let logs = checker::read_logs(&self.root, self.shape.partitions)
            .map_err(|e| fail(self.seed, format!("reading the logs: {e}")))?;
        let world = self.world.borrow();
        let problems = checker::check(&world, &logs);
        if !problems.is_empty() {
            return Err(Failure {
                seed: self.seed,
                problems,
            });
        }
        Ok(Report {
            seed: self.seed,
            shape: self.shape,
            steps: self.ex.steps(),
            simulated: self.ex.elapsed(),
            crashes: self.crashes,
            counters: world.counters,
            events: logs.channels.values().map(|v| v.len() as u64).sum(),
            digest: digest(&world, &logs, self.ex.steps()),
        })
    }
}

/// A digest of what the clients saw and did, and of the logs: equal on every replay.
fn digest(world: &World, logs: &checker::Logs, steps: u64) -> u64 {
    let mut h = xxh(steps.to_le_bytes().as_slice(), 0);
    for s in &world.seen {
        h = xxh(&s.frame, h ^ s.user.0);
    }
    for op in &world.ops {
        h = xxh(format!("{:?}{:?}", op.kind, op.outcome).as_bytes(), h);
    }
    for events in logs.channels.values() {
        for e in events {
            h = xxh(&e.frame, h);
        }
    }
    h
}

fn xxh(bytes: &[u8], seed: u64) -> u64 {
    // FNV-1a: the simulation needs a stable digest, not a strong one.
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Creates the users, workspaces, channels and memberships of a run through the engine's
/// API, as an administrator would over REST.
async fn setup(engine: Engine, world: WorldRef, shape: Shape, ex: Executor) {
    let mut users = Vec::new();
    for i in 0..shape.users {
        let u = engine
            .create_user(&format!("u{i}@sim.example"), &format!("User {i}"), "hash")
            .await
            .expect("create user");
        users.push(u.id);
        world.borrow_mut().users.push(UserState::new(u.id));
    }
    for w in 0..shape.workspaces {
        let owner = w % shape.users;
        let ws = engine
            .create_workspace(users[owner], &format!("w{w}"))
            .await
            .expect("create workspace");
        let mut members = vec![owner];
        for (i, _) in users.iter().enumerate() {
            if i != owner && (ex.chance(700) || members.len() < 3) {
                engine
                    .add_member(users[owner], ws.id, &format!("u{i}@sim.example"))
                    .await
                    .expect("add member");
                members.push(i);
            }
        }
        let mut model = WorkspaceModel {
            id: ws.id,
            members: members.clone(),
            public: Vec::new(),
        };
        for &m in &members {
            world.borrow_mut().users[m].workspaces.push(ws.id);
        }
        for k in 0..shape.channels_per_workspace {
            let private = k > 0 && ex.chance(250);
            let kind = if private {
                ChannelKind::Private
            } else {
                ChannelKind::Public
            };
            let name = format!("w{w}c{k}");
            let op = world.borrow_mut().issue(
                users[owner],
                OpKind::CreateChannel {
                    workspace: ws.id,
                    name: name.clone(),
                },
            );
            let c = engine
                .create_channel(users[owner], ws.id, &name, kind)
                .await
                .expect("create channel");
            world.borrow_mut().settle(op, Outcome::Acked(None));
            world.borrow_mut().users[owner].channels.insert(c.id);
            if !private {
                model.public.push(c.id);
            }
            for &m in &members {
                if m == owner || !ex.chance(600) {
                    continue;
                }
                let user: UserId = users[m];
                let op = world
                    .borrow_mut()
                    .issue(user, OpKind::Join { channel: c.id });
                if private {
                    engine
                        .add_channel_member(users[owner], c.id, user)
                        .await
                        .expect("add channel member");
                } else {
                    engine.join(user, c.id).await.expect("join");
                }
                let mut w = world.borrow_mut();
                w.settle(op, Outcome::Acked(None));
                w.users[m].channels.insert(c.id);
            }
        }
        world.borrow_mut().workspaces.push(model);
    }
}

/// What a batch of seeds did.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    /// Seeds run.
    pub seeds: u64,
    /// Seeds that passed.
    pub passed: u64,
    /// Scheduler steps over every seed.
    pub steps: u64,
    /// Simulated time over every seed.
    pub simulated: Duration,
    /// Crashes over every seed.
    pub crashes: u64,
    /// Events committed over every seed.
    pub events: u64,
    /// Operations issued over every seed.
    pub ops: u64,
    /// Sessions cut off and resumed over every seed.
    pub resume_required: u64,
    /// The failures, by seed.
    pub failures: Vec<Failure>,
}

impl Summary {
    fn add(&mut self, r: Result<Report, Failure>) {
        self.seeds += 1;
        match r {
            Ok(r) => {
                self.passed += 1;
                self.steps += r.steps;
                self.simulated += r.simulated;
                self.crashes += r.crashes as u64;
                self.events += r.events;
                self.ops += r.counters.ops;
                self.resume_required += r.counters.resume_required;
            }
            Err(f) => self.failures.push(f),
        }
    }

    fn merge(&mut self, other: Summary) {
        self.seeds += other.seeds;
        self.passed += other.passed;
        self.steps += other.steps;
        self.simulated += other.simulated;
        self.crashes += other.crashes;
        self.events += other.events;
        self.ops += other.ops;
        self.resume_required += other.resume_required;
        self.failures.extend(other.failures);
    }
}

/// Runs seeds `from..from + count` on `threads` threads (each seed on one thread, alone),
/// and sums them up. `progress` is called after each seed with the seeds done so far.
pub fn run_seeds(from: u64, count: u64, threads: usize, progress: impl Fn(u64) + Sync) -> Summary {
    let threads = threads.max(1) as u64;
    let done = std::sync::atomic::AtomicU64::new(0);
    let mut total = Summary::default();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (done, progress) = (&done, &progress);
                scope.spawn(move || {
                    let mut summary = Summary::default();
                    let mut seed = from + t;
                    while seed < from + count {
                        summary.add(run_seed(seed));
                        let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                        progress(n);
                        seed += threads;
                    }
                    summary
                })
            })
            .collect();
        for h in handles {
            total.merge(h.join().expect("a simulation thread panicked"));
        }
    });
    total.failures.sort_by_key(|f| f.seed);
    total
}
