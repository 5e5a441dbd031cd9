//! A single-thread executor with a seeded scheduler and simulated time.
//!
//! Every task of the simulated node (shard loops, partitions, the metadata owner, session
//! drivers, clients) is a future on this executor. Each step polls one task chosen at
//! random, by the seed, among those that are ready; so a seed fixes one interleaving, and
//! different seeds explore different ones. Time is simulated: it moves by a small random
//! amount per step (the cost of the work), and jumps to the next timer when no task is
//! ready. Nothing ever sleeps for real.
//!
//! Architecture invariant: a run is a pure function of its seed. The executor draws every
//! choice from one seeded generator and iterates only ordered collections.

use chorus_log::storage::sim::SimRng;
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

/// The most simulated time one step costs, in nanoseconds: each poll advances the clock
/// by a random amount up to this.
const STEP_NS_MAX: u64 = 20_000;

type BoxFuture = Pin<Box<dyn Future<Output = ()>>>;

/// The executor; clones share it.
#[derive(Clone)]
pub struct Executor {
    inner: Rc<Inner>,
}

struct Inner {
    rng: RefCell<SimRng>,
    /// Simulated nanoseconds since `base`.
    now_ns: Cell<u64>,
    base: Instant,
    /// Tasks by slot; `None` while a task is being polled, or after it finished.
    tasks: RefCell<Vec<Option<BoxFuture>>>,
    /// Who owns each slot's task (see [`Executor::spawn_owned`]); 0: nobody.
    owners: RefCell<Vec<u64>>,
    /// Slots free for reuse.
    free: RefCell<Vec<usize>>,
    ready: Arc<Mutex<Ready>>,
    /// Owners paused ([`Executor::pause`]): their tasks are not polled.
    paused: RefCell<BTreeSet<u64>>,
    /// Pauses so far, by owner: a resume due for an earlier pause does not end a later
    /// one ([`Executor::pause_for`]).
    pauses: RefCell<BTreeMap<u64, u64>>,
    /// Tasks of paused owners that were woken, polled once their owner resumes (they stay
    /// marked queued meanwhile, so that a wake does not queue them twice).
    parked: RefCell<Vec<usize>>,
    /// Timers by deadline, then by order of arming.
    timers: RefCell<BTreeMap<(u64, u64), Waker>>,
    timer_seq: Cell<u64>,
    steps: Cell<u64>,
}

/// The tasks woken and not yet polled, in the order they were woken.
#[derive(Default)]
struct Ready {
    queue: Vec<usize>,
    queued: Vec<bool>,
}

impl Ready {
    fn push(&mut self, id: usize) {
        if self.queued.len() <= id {
            self.queued.resize(id + 1, false);
        }
        if !self.queued[id] {
            self.queued[id] = true;
            self.queue.push(id);
        }
    }
}

/// Wakes one task by putting it in the ready queue. Wakers must be `Send + Sync`; the
/// queue is behind a mutex that only this one thread ever takes.
struct TaskWaker {
    id: usize,
    ready: Arc<Mutex<Ready>>,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.ready.lock().expect("ready").push(self.id);
    }
}

/// Why [`Executor::run_until`] stopped before its condition held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stall {
    /// No task is ready and no timer is armed: everything waits on something that will
    /// never happen (a deadlock), while the condition still does not hold.
    Quiescent,
    /// The step budget ran out while tasks kept running (a livelock, or a budget too
    /// small).
    Exhausted,
}

impl Executor {
    /// An executor whose choices all come from `seed`.
    pub fn new(seed: u64) -> Executor {
        Executor {
            inner: Rc::new(Inner {
                rng: RefCell::new(SimRng::new(seed)),
                now_ns: Cell::new(0),
                base: Instant::now(),
                tasks: RefCell::new(Vec::new()),
                owners: RefCell::new(Vec::new()),
                free: RefCell::new(Vec::new()),
                ready: Arc::default(),
                paused: RefCell::default(),
                pauses: RefCell::default(),
                parked: RefCell::default(),
                timers: RefCell::new(BTreeMap::new()),
                timer_seq: Cell::new(0),
                steps: Cell::new(0),
            }),
        }
    }

    /// The simulated monotonic clock.
    pub fn now(&self) -> Instant {
        self.inner.base + Duration::from_nanos(self.inner.now_ns.get())
    }

    /// Simulated time since the executor was made.
    pub fn elapsed(&self) -> Duration {
        Duration::from_nanos(self.inner.now_ns.get())
    }

    /// Steps taken so far (polls of a task).
    pub fn steps(&self) -> u64 {
        self.inner.steps.get()
    }

    /// A number in `0..n` from the executor's generator.
    pub fn below(&self, n: u64) -> u64 {
        self.inner.rng.borrow_mut().below(n.max(1))
    }

    /// True with chance `permille`/1000, from the executor's generator.
    pub fn chance(&self, permille: u32) -> bool {
        self.inner.rng.borrow_mut().chance(permille)
    }

    /// Runs `task` on the executor; the handle completes when it does.
    pub fn spawn(&self, task: impl Future<Output = ()> + 'static) -> JoinHandle {
        self.spawn_owned(0, task)
    }

    /// [`Executor::spawn`], for `owner` (a simulated process, not 0): the task dies with
    /// its owner's other tasks ([`Executor::kill_owned`]).
    pub fn spawn_owned(&self, owner: u64, task: impl Future<Output = ()> + 'static) -> JoinHandle {
        let done = Rc::new(Done::default());
        let signal = done.clone();
        let wrapped: BoxFuture = Box::pin(async move {
            task.await;
            signal.finish();
        });
        let id = match self.inner.free.borrow_mut().pop() {
            Some(id) => {
                self.inner.tasks.borrow_mut()[id] = Some(wrapped);
                self.inner.owners.borrow_mut()[id] = owner;
                id
            }
            None => {
                let mut tasks = self.inner.tasks.borrow_mut();
                tasks.push(Some(wrapped));
                self.inner.owners.borrow_mut().push(owner);
                tasks.len() - 1
            }
        };
        self.inner.ready.lock().expect("ready").push(id);
        JoinHandle { done }
    }

    /// Completes once `duration` of simulated time has passed.
    pub fn sleep(&self, duration: Duration) -> Sleep {
        let deadline = self.inner.now_ns.get() + duration.as_nanos() as u64;
        Sleep {
            executor: Rc::downgrade(&self.inner),
            deadline,
            key: None,
        }
    }

    /// Returns `Pending` once, so that other ready tasks may run first.
    pub fn yield_now(&self) -> YieldNow {
        YieldNow(false)
    }

    /// Polls one ready task, if there is one; whether one was polled.
    fn step(&self) -> bool {
        let id = {
            let mut ready = self.inner.ready.lock().expect("ready");
            if ready.queue.is_empty() {
                return false;
            }
            let at = self.inner.rng.borrow_mut().below(ready.queue.len() as u64) as usize;
            let id = ready.queue.swap_remove(at);
            let owner = self.inner.owners.borrow().get(id).copied().unwrap_or(0);
            if owner != 0 && self.inner.paused.borrow().contains(&owner) {
                // Still queued: it runs when its owner resumes.
                self.inner.parked.borrow_mut().push(id);
                return true;
            }
            ready.queued[id] = false;
            id
        };
        self.inner.steps.set(self.inner.steps.get() + 1);
        let cost = self.inner.rng.borrow_mut().below(STEP_NS_MAX + 1);
        self.inner.now_ns.set(self.inner.now_ns.get() + cost);
        let task = self
            .inner
            .tasks
            .borrow_mut()
            .get_mut(id)
            .and_then(Option::take);
        if let Some(mut task) = task {
            let waker = Waker::from(Arc::new(TaskWaker {
                id,
                ready: self.inner.ready.clone(),
            }));
            let mut cx = Context::from_waker(&waker);
            match task.as_mut().poll(&mut cx) {
                Poll::Ready(()) => self.inner.free.borrow_mut().push(id),
                Poll::Pending => self.inner.tasks.borrow_mut()[id] = Some(task),
            }
        }
        self.fire_timers();
        true
    }

    /// Wakes every timer whose deadline has passed.
    fn fire_timers(&self) {
        let now = self.inner.now_ns.get();
        loop {
            let due = {
                let mut timers = self.inner.timers.borrow_mut();
                match timers.first_key_value() {
                    Some((&(deadline, _), _)) if deadline <= now => timers.pop_first(),
                    _ => None,
                }
            };
            match due {
                Some((_, waker)) => waker.wake(),
                None => return,
            }
        }
    }

    /// Moves the clock to the next timer's deadline and fires it; whether there was one.
    fn jump_to_next_timer(&self) -> bool {
        let next = self
            .inner
            .timers
            .borrow()
            .first_key_value()
            .map(|(k, _)| k.0);
        match next {
            Some(deadline) => {
                if deadline > self.inner.now_ns.get() {
                    self.inner.now_ns.set(deadline);
                }
                self.fire_timers();
                true
            }
            None => false,
        }
    }

    /// Runs tasks until `done()` holds, jumping the clock to the next timer whenever no
    /// task is ready, for at most `steps_max` more steps.
    pub fn run_until(&self, mut done: impl FnMut() -> bool, steps_max: u64) -> Result<(), Stall> {
        let limit = self.steps() + steps_max;
        loop {
            if done() {
                return Ok(());
            }
            if self.steps() >= limit {
                return Err(Stall::Exhausted);
            }
            if !self.step() && !self.jump_to_next_timer() {
                return if done() {
                    Ok(())
                } else {
                    Err(Stall::Quiescent)
                };
            }
        }
    }

    /// Drops every task and timer at once: what a crash does to a process. Their
    /// destructors run after the executor forgot them, so they may touch it safely.
    pub fn kill_all(&self) {
        let tasks: Vec<Option<BoxFuture>> = std::mem::take(&mut *self.inner.tasks.borrow_mut());
        self.inner.owners.borrow_mut().clear();
        let timers = std::mem::take(&mut *self.inner.timers.borrow_mut());
        self.inner.free.borrow_mut().clear();
        {
            let mut ready = self.inner.ready.lock().expect("ready");
            ready.queue.clear();
            ready.queued.clear();
        }
        drop(timers);
        drop(tasks);
        self.inner.paused.borrow_mut().clear();
        self.inner.pauses.borrow_mut().clear();
        self.inner.parked.borrow_mut().clear();
        // Destructors may have spawned or woken: forget that too.
        self.inner.tasks.borrow_mut().clear();
        self.inner.owners.borrow_mut().clear();
        self.inner.timers.borrow_mut().clear();
        let mut ready = self.inner.ready.lock().expect("ready");
        ready.queue.clear();
        ready.queued.clear();
    }

    /// Drops every task `owner` spawned ([`Executor::spawn_owned`]), but the one being
    /// polled: what a crash does to one process of several. Their handles never complete.
    pub fn kill_owned(&self, owner: u64) {
        assert_ne!(owner, 0, "0 owns nothing");
        let mut killed = Vec::new();
        {
            let mut tasks = self.inner.tasks.borrow_mut();
            let owners = self.inner.owners.borrow();
            for (id, slot) in tasks.iter_mut().enumerate() {
                if owners[id] == owner && slot.is_some() {
                    killed.push((id, slot.take()));
                }
            }
        }
        {
            let mut ready = self.inner.ready.lock().expect("ready");
            let Ready { queue, queued } = &mut *ready;
            queue.retain(|&id| !killed.iter().any(|(k, _)| *k == id));
            self.inner
                .parked
                .borrow_mut()
                .retain(|&id| !killed.iter().any(|(k, _)| *k == id));
            for (id, _) in &killed {
                if let Some(q) = queued.get_mut(*id) {
                    *q = false;
                }
            }
        }
        self.inner
            .free
            .borrow_mut()
            .extend(killed.iter().map(|(id, _)| *id));
        // Their destructors run after the executor forgot them (they may touch it).
        drop(killed);
    }

    /// Stops polling `owner`'s tasks until [`Executor::resume`]: what SIGSTOP does to a
    /// process. Its timers still fire, and what wakes its tasks is kept for then.
    pub fn pause(&self, owner: u64) {
        assert_ne!(owner, 0, "0 owns nothing");
        self.inner.paused.borrow_mut().insert(owner);
        *self.inner.pauses.borrow_mut().entry(owner).or_default() += 1;
    }

    /// Pauses `owner` now; the future resumes it after `duration`, unless it was paused
    /// again meanwhile, and says whether it did.
    pub fn pause_for(&self, owner: u64, duration: Duration) -> impl Future<Output = bool> {
        self.pause(owner);
        let this = self.inner.pauses.borrow()[&owner];
        let ex = self.clone();
        async move {
            ex.sleep(duration).await;
            let last = ex.inner.pauses.borrow().get(&owner).copied();
            if last == Some(this) && ex.is_paused(owner) {
                ex.resume(owner);
                true
            } else {
                false
            }
        }
    }

    /// Polls `owner`'s tasks again, those woken while it was paused first among the ready.
    pub fn resume(&self, owner: u64) {
        if !self.inner.paused.borrow_mut().remove(&owner) {
            return;
        }
        let owners = self.inner.owners.borrow();
        let mut parked = self.inner.parked.borrow_mut();
        let mut ready = self.inner.ready.lock().expect("ready");
        parked.retain(|&id| {
            if owners.get(id) == Some(&owner) {
                ready.queue.push(id);
                false
            } else {
                true
            }
        });
    }

    /// Whether `owner` is paused.
    pub fn is_paused(&self, owner: u64) -> bool {
        self.inner.paused.borrow().contains(&owner)
    }

    /// How many tasks are alive.
    pub fn live_tasks(&self) -> usize {
        self.inner
            .tasks
            .borrow()
            .iter()
            .filter(|t| t.is_some())
            .count()
    }
}

/// Whether a spawned task finished, and who waits for it.
#[derive(Default)]
struct Done {
    finished: Cell<bool>,
    waiter: RefCell<Option<Waker>>,
}

impl Done {
    fn finish(&self) {
        self.finished.set(true);
        if let Some(w) = self.waiter.borrow_mut().take() {
            w.wake();
        }
    }
}

/// Completes when its task has finished. Dropping it does not cancel the task.
pub struct JoinHandle {
    done: Rc<Done>,
}

impl Future for JoinHandle {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.done.finished.get() {
            return Poll::Ready(());
        }
        *self.done.waiter.borrow_mut() = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// A simulated timer.
pub struct Sleep {
    executor: std::rc::Weak<Inner>,
    deadline: u64,
    key: Option<(u64, u64)>,
}

impl Future for Sleep {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let Some(inner) = self.executor.upgrade() else {
            return Poll::Pending;
        };
        if inner.now_ns.get() >= self.deadline {
            if let Some(key) = self.key.take() {
                inner.timers.borrow_mut().remove(&key);
            }
            return Poll::Ready(());
        }
        let mut timers = inner.timers.borrow_mut();
        if let Some(key) = self.key {
            if let Some(w) = timers.get_mut(&key) {
                if !w.will_wake(cx.waker()) {
                    *w = cx.waker().clone();
                }
                return Poll::Pending;
            }
        }
        let seq = inner.timer_seq.get();
        inner.timer_seq.set(seq + 1);
        let key = (self.deadline, seq);
        timers.insert(key, cx.waker().clone());
        drop(timers);
        self.key = Some(key);
        Poll::Pending
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if let (Some(key), Some(inner)) = (self.key, self.executor.upgrade()) {
            if let Ok(mut timers) = inner.timers.try_borrow_mut() {
                timers.remove(&key);
            }
        }
    }
}

/// Returns `Pending` once, waking itself at once.
pub struct YieldNow(bool);

impl Future for YieldNow {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            return Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Tasks interleave in an order fixed by the seed, and time jumps to timers without
    // sleeping for real.
    #[test]
    fn seeded_interleaving_and_simulated_time() {
        let run = |seed| {
            let ex = Executor::new(seed);
            let log = Rc::new(RefCell::new(Vec::new()));
            for t in 0..3 {
                let (ex2, log) = (ex.clone(), log.clone());
                drop(ex.spawn(async move {
                    for i in 0..3 {
                        log.borrow_mut().push((t, i));
                        ex2.sleep(Duration::from_secs(1)).await;
                    }
                }));
            }
            let started = Instant::now();
            ex.run_until(|| ex.live_tasks() == 0, 1000).unwrap();
            assert!(started.elapsed() < Duration::from_secs(1));
            assert!(ex.elapsed() >= Duration::from_secs(3));
            let order = log.borrow().clone();
            order
        };
        assert_eq!(run(1), run(1));
        assert!((0..20).any(|s| run(s) != run(1)), "every seed ran alike");
    }

    // Killing one owner's tasks leaves everyone else's running, and their slots are
    // reused by later tasks.
    #[test]
    fn killing_an_owner_kills_only_its_tasks() {
        let ex = Executor::new(7);
        let ticks = Rc::new(RefCell::new(BTreeMap::<u64, u32>::new()));
        for owner in [1, 1, 2] {
            let (ex2, ticks) = (ex.clone(), ticks.clone());
            drop(ex.spawn_owned(owner, async move {
                loop {
                    *ticks.borrow_mut().entry(owner).or_default() += 1;
                    ex2.sleep(Duration::from_millis(10)).await;
                }
            }));
        }
        ex.run_until(|| ex.elapsed() >= Duration::from_millis(100), 10_000)
            .unwrap();
        ex.kill_owned(1);
        assert_eq!(ex.live_tasks(), 1);
        let before = ticks.borrow().clone();
        let ex2 = ex.clone();
        let done = Rc::new(Cell::new(false));
        let d = done.clone();
        drop(ex.spawn_owned(3, async move {
            ex2.sleep(Duration::from_millis(50)).await;
            d.set(true);
        }));
        ex.run_until(|| done.get(), 10_000).unwrap();
        let after = ticks.borrow().clone();
        assert_eq!(after[&1], before[&1], "a killed task ran");
        assert!(after[&2] > before[&2], "the other owner's task stopped");
    }

    // A paused owner's tasks do not run, though their timers fire; resumed, they go on
    // from where they were; a paused owner can still be killed.
    #[test]
    fn a_paused_owner_runs_nothing_until_resumed() {
        let ex = Executor::new(11);
        let ticks = Rc::new(RefCell::new(BTreeMap::<u64, u32>::new()));
        for owner in [1, 2, 3] {
            let (ex2, ticks) = (ex.clone(), ticks.clone());
            drop(ex.spawn_owned(owner, async move {
                loop {
                    *ticks.borrow_mut().entry(owner).or_default() += 1;
                    ex2.sleep(Duration::from_millis(10)).await;
                }
            }));
        }
        let until = |ms: u64| {
            let ex2 = ex.clone();
            ex.run_until(|| ex2.elapsed() >= Duration::from_millis(ms), 100_000)
                .unwrap();
            ticks.borrow().clone()
        };
        until(50);
        ex.pause(1);
        ex.pause(3);
        assert!(ex.is_paused(1) && !ex.is_paused(2));
        let paused = until(100);
        let later = until(200);
        assert!(
            paused[&1] <= later[&1] && later[&1] - paused[&1] <= 1,
            "a paused task ran"
        );
        assert!(
            later[&2] >= paused[&2] + 9,
            "the other owner's task stopped"
        );
        ex.kill_owned(3);
        ex.resume(1);
        ex.resume(3);
        let resumed = until(300);
        assert!(
            resumed[&1] >= later[&1] + 9,
            "a resumed task stayed stopped"
        );
        assert_eq!(resumed[&3], later[&3], "a killed paused task ran");
        assert_eq!(ex.live_tasks(), 2);
        // A timed pause ends when due, but not a later pause of the same owner.
        let first = ex.pause_for(1, Duration::from_millis(50));
        ex.resume(1);
        let second = ex.pause_for(1, Duration::from_millis(200));
        let (a, b) = (Rc::new(Cell::new(None)), Rc::new(Cell::new(None)));
        let (a2, b2) = (a.clone(), b.clone());
        drop(ex.spawn(async move { a2.set(Some(first.await)) }));
        drop(ex.spawn(async move { b2.set(Some(second.await)) }));
        until(400);
        assert!(
            ex.is_paused(1),
            "an earlier pause's end resumed a later pause"
        );
        until(550);
        assert_eq!((a.get(), b.get()), (Some(false), Some(true)));
        assert!(!ex.is_paused(1));
    }

    // A task waiting for something that never comes is reported, not waited for forever.
    #[test]
    fn a_deadlock_is_reported() {
        let ex = Executor::new(0);
        let (_tx, rx) = futures::channel::oneshot::channel::<()>();
        drop(ex.spawn(async move {
            let _ = rx.await;
        }));
        assert_eq!(ex.run_until(|| false, 100), Err(Stall::Quiescent));
        ex.kill_all();
        assert_eq!(ex.live_tasks(), 0);
    }
}
