//! Deterministic crash-consistency property test of the log on the simulated disk.
//!
//! Each seed runs phases of concurrent appends and reads, truncations and retention, with
//! small segments so rollovers are frequent, and crashes the disk at a random poll of a
//! random phase (a torn, partly lost state). A third of the appenders do not wait for an
//! fsync (`append_unsynced`), half of those not for the write either (`enqueue_unsynced`,
//! then `written`), and some phases sync the log. After reopening it checks that
//! every acknowledged record (and every unsynced one a finished `sync` covered) is present
//! and byte-identical, that nothing which was never appended
//! appears, and that offsets have no gaps. Two crash cycles per seed.
//!
//! `CHORUS_LOG_SEEDS=N` sets the number of seeds (default 1000); a failing seed is printed
//! and `CHORUS_LOG_SEED=S` replays exactly that one.

use chorus_log::storage::sim::SimRng;
use chorus_log::{Entry, Log, LogConfig, SimConfig, SimStorage};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Wake, Waker};

/// A deterministic single-threaded executor: it polls one woken task at a time, chosen by
/// the seed, and stops after a budget of polls (the crash point).
struct Executor {
    tasks: Vec<Option<Task>>,
}

/// A spawned future and the flag its waker sets.
type Task = (Pin<Box<dyn Future<Output = ()>>>, Arc<Flag>);

struct Flag(AtomicBool);

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::SeqCst);
    }
}

enum Run {
    Done,
    Crashed,
}

impl Executor {
    fn spawn(&mut self, f: impl Future<Output = ()> + 'static) {
        self.tasks
            .push(Some((Box::pin(f), Arc::new(Flag(AtomicBool::new(true))))));
    }

    fn run(&mut self, rng: &mut SimRng, budget: &mut u64) -> Run {
        loop {
            let ready: Vec<usize> = (0..self.tasks.len())
                .filter(|&i| {
                    self.tasks[i]
                        .as_ref()
                        .is_some_and(|t| t.1 .0.load(Ordering::SeqCst))
                })
                .collect();
            if ready.is_empty() {
                assert!(
                    self.tasks.iter().all(Option::is_none),
                    "deadlock: tasks are pending and none is woken"
                );
                self.tasks.clear();
                return Run::Done;
            }
            if *budget == 0 {
                self.tasks.clear();
                return Run::Crashed;
            }
            *budget -= 1;
            let i = ready[rng.below(ready.len() as u64) as usize];
            let (fut, flag) = self.tasks[i].as_mut().expect("task");
            flag.0.store(false, Ordering::SeqCst);
            let waker = Waker::from(flag.clone());
            if fut
                .as_mut()
                .poll(&mut Context::from_waker(&waker))
                .is_ready()
            {
                self.tasks[i] = None;
            }
        }
    }
}

/// What the test knows: every payload ever submitted (by tag), and which offsets were
/// acknowledged with which tag.
#[derive(Default)]
struct Model {
    /// tag -> payload length; the bytes are a pure function of the tag.
    submitted: HashMap<u64, usize>,
    /// Acknowledged and not truncated: these must survive any crash.
    acked: BTreeMap<u64, u64>,
    /// Written by `append_unsynced` and not synced since (nor truncated): a crash may take
    /// these, and every record after them.
    unsynced: BTreeMap<u64, u64>,
    /// Records at or above this offset must survive (retention may drop those below).
    keep_from: u64,
    /// A retention call in flight: a crash during it may drop records below this offset.
    deleting: Option<u64>,
    next_tag: u64,
}

fn payload(tag: u64, len: usize) -> Vec<u8> {
    let mut out = tag.to_le_bytes().to_vec();
    let mut r = SimRng::new(tag.wrapping_mul(0x9E37_79B9));
    out.extend((0..len).map(|_| r.next_u64() as u8));
    out
}

/// The tag of a stored payload, if it is byte-identical to something submitted.
fn check_payload(model: &Model, bytes: &[u8]) -> Result<u64, String> {
    let tag = u64::from_le_bytes(
        bytes
            .get(..8)
            .ok_or("payload shorter than its tag")?
            .try_into()
            .expect("8"),
    );
    let len = model
        .submitted
        .get(&tag)
        .ok_or(format!("tag {tag} was never appended"))?;
    if payload(tag, *len) != bytes {
        return Err(format!("payload of tag {tag} is not byte-identical"));
    }
    Ok(tag)
}

type Shared<T> = Rc<RefCell<T>>;

fn spawn_appender(
    ex: &mut Executor,
    log: &Rc<Log<SimStorage>>,
    model: &Shared<Model>,
    rng: &mut SimRng,
) {
    let appends = 1 + rng.below(5);
    let mut plans = Vec::new();
    for _ in 0..appends {
        let n = 1 + rng.below(4) as usize;
        let mut m = model.borrow_mut();
        let batch: Vec<(u64, Vec<u8>)> = (0..n)
            .map(|_| {
                let tag = m.next_tag;
                m.next_tag += 1;
                let len = match rng.below(10) {
                    0 => rng.below(3000) as usize,
                    _ => rng.below(300) as usize,
                };
                m.submitted.insert(tag, len);
                (tag, payload(tag, len))
            })
            .collect();
        plans.push(batch);
    }
    // A third of the appenders do not wait for an fsync; half of those do not wait for
    // the write either (they take their offsets, then wait until they are written).
    let unsynced = rng.chance(333);
    let enqueued = unsynced && rng.chance(500);
    let (log, model) = (log.clone(), model.clone());
    ex.spawn(async move {
        for batch in plans {
            let entries: Vec<Entry<'_>> = batch
                .iter()
                .map(|(tag, p)| Entry {
                    timestamp_us: *tag,
                    payload: p,
                })
                .collect();
            let range = if enqueued {
                log.enqueue_unsynced(&entries).await
            } else if unsynced {
                log.append_unsynced(&entries).await
            } else {
                log.append(&entries).await
            };
            let range = range.expect("append on a healthy disk");
            for (offset, (tag, _)) in range.clone().zip(&batch) {
                let mut m = model.borrow_mut();
                let into = if unsynced {
                    &mut m.unsynced
                } else {
                    &mut m.acked
                };
                let old = into.insert(offset, *tag);
                assert!(old.is_none(), "offset {offset} acknowledged twice");
            }
            if enqueued {
                log.written(range.end)
                    .await
                    .expect("written on a healthy disk");
            }
        }
    });
}

/// A task that syncs the log: once it returns, every record written before it was called
/// must survive a crash.
fn spawn_sync(ex: &mut Executor, log: &Rc<Log<SimStorage>>, model: &Shared<Model>) {
    let (log, model) = (log.clone(), model.clone());
    ex.spawn(async move {
        let written: Vec<u64> = model.borrow().unsynced.keys().copied().collect();
        log.sync().await.expect("sync on a healthy disk");
        let mut m = model.borrow_mut();
        for offset in written {
            // Truncated meanwhile, if it is gone.
            if let Some(tag) = m.unsynced.remove(&offset) {
                m.acked.insert(offset, tag);
            }
        }
    });
}

fn spawn_reader(
    ex: &mut Executor,
    log: &Rc<Log<SimStorage>>,
    model: &Shared<Model>,
    rng: &mut SimRng,
    errors: &Shared<Vec<String>>,
) {
    let (log, model, errors) = (log.clone(), model.clone(), errors.clone());
    let pick = rng.next_u64();
    let budget = rng.below(2000) as usize;
    ex.spawn(async move {
        let (first, last) = (log.first_offset(), log.last_offset());
        let from = first + pick % (last + 2 - first);
        let records = log
            .read(from, budget)
            .await
            .expect("read on a healthy disk");
        let m = model.borrow();
        for (i, r) in records.iter().enumerate() {
            let problem = if r.offset != from + i as u64 {
                Some(format!("read from {from} returned offset {}", r.offset))
            } else {
                match check_payload(&m, &r.payload) {
                    Err(e) => Some(e),
                    Ok(tag)
                        if (m.acked.get(&r.offset))
                            .or(m.unsynced.get(&r.offset))
                            .is_some_and(|t| *t != tag) =>
                    {
                        Some(format!("read of {} returned another record", r.offset))
                    }
                    Ok(_) => None,
                }
            };
            errors.borrow_mut().extend(problem);
        }
    });
}

/// Runs random phases on an open log until the crash budget runs out or the phases end.
fn run_phases(
    log: &Rc<Log<SimStorage>>,
    model: &Shared<Model>,
    rng: &mut SimRng,
    budget: &mut u64,
) -> Result<(), String> {
    let errors: Shared<Vec<String>> = Rc::default();
    let phases = 3 + rng.below(12);
    for _ in 0..phases {
        let mut ex = Executor { tasks: Vec::new() };
        match rng.below(10) {
            0 => {
                let (first, last) = (log.first_offset(), log.last_offset());
                let span = last + 1 - (first - 1);
                let keep = first - 1 + rng.below(span.max(1));
                // Acknowledged records past the cut stop being required as soon as the
                // truncation starts: a crash may or may not have removed them.
                let mut m = model.borrow_mut();
                m.acked.retain(|o, _| *o <= keep);
                m.unsynced.retain(|o, _| *o <= keep);
                drop(m);
                let log = log.clone();
                ex.spawn(async move {
                    log.truncate_after(keep).await.expect("truncate");
                });
            }
            1 => {
                let (first, last) = (log.first_offset(), log.last_offset());
                let before = first + rng.below(last + 2 - first);
                model.borrow_mut().deleting = Some(before);
                let (log, model2) = (log.clone(), model.clone());
                ex.spawn(async move {
                    let new_first = log.delete_before(before).await.expect("delete");
                    assert!(new_first <= before.max(first));
                    let mut m = model2.borrow_mut();
                    m.keep_from = m.keep_from.max(new_first);
                    m.deleting = None;
                });
            }
            _ => {
                for _ in 0..1 + rng.below(8) {
                    spawn_appender(&mut ex, log, model, rng);
                }
                for _ in 0..rng.below(3) {
                    spawn_reader(&mut ex, log, model, rng, &errors);
                }
                if rng.chance(300) {
                    spawn_sync(&mut ex, log, model);
                }
            }
        }
        let outcome = ex.run(rng, budget);
        if let Some(e) = errors.borrow().first() {
            return Err(e.clone());
        }
        if let Run::Crashed = outcome {
            return Ok(());
        }
    }
    Ok(())
}

/// Reads the whole log after a reopen and checks it against the model.
fn verify(log: &Log<SimStorage>, model: &Model) -> Result<(), String> {
    let first = log.first_offset();
    let mut all = Vec::new();
    let mut at = first;
    loop {
        let chunk = futures::executor::block_on(log.read(at, 1 << 16))
            .map_err(|e| format!("read after reopen: {e}"))?;
        let Some(last) = chunk.last() else { break };
        at = last.offset + 1;
        all.extend(chunk);
    }
    if at != log.next_offset() {
        return Err(format!(
            "read ended at {at}, log says next is {}",
            log.next_offset()
        ));
    }
    let mut seen = HashMap::new();
    for (i, r) in all.iter().enumerate() {
        if r.offset != first + i as u64 {
            return Err(format!(
                "gap: expected offset {}, found {}",
                first + i as u64,
                r.offset
            ));
        }
        let tag = check_payload(model, &r.payload)?;
        if let Some(o) = seen.insert(tag, r.offset) {
            return Err(format!("tag {tag} appears at offsets {o} and {}", r.offset));
        }
        if r.timestamp_us != tag {
            return Err(format!("timestamp of offset {} changed", r.offset));
        }
    }
    let keep_from = model.keep_from.max(model.deleting.unwrap_or(0));
    for (&offset, &tag) in model.acked.range(keep_from..) {
        let found = offset
            .checked_sub(first)
            .and_then(|i| all.get(i as usize))
            .map(|r| u64::from_le_bytes(r.payload[..8].try_into().expect("8")));
        if found != Some(tag) {
            return Err(format!(
                "acknowledged offset {offset} (tag {tag}) lost: found {found:?}, log is {first}..{at}"
            ));
        }
    }
    Ok(())
}

fn open(storage: &SimStorage, config: &LogConfig) -> Result<Rc<Log<SimStorage>>, String> {
    let (log, _report) = futures::executor::block_on(Log::open(storage.clone(), config.clone()))
        .map_err(|e| format!("reopen failed: {e}"))?;
    Ok(Rc::new(log))
}

fn run_seed(seed: u64) -> Result<(), String> {
    let mut rng = SimRng::new(seed);
    let storage = SimStorage::new(SimConfig {
        seed: rng.next_u64(),
        yield_permille: rng.below(600) as u32,
    });
    let config = LogConfig {
        segment_bytes_max: 1024 + rng.below(8192),
        index_interval_bytes: 64 + rng.below(1024),
        record_bytes_max: 1 << 16,
        pending_bytes_max: 2048 + rng.below(16384) as usize,
        read_chunk_bytes: 256 + rng.below(4096) as usize,
        // Half the seeds write zeros ahead of the records, half do not.
        preallocate_bytes: if rng.chance(500) { 0 } else { rng.below(8192) },
        // A third of the seeds read every record from the storage; the rest keep a short
        // run of the newest bytes in memory, often shorter than one record.
        recent_bytes: if rng.chance(333) {
            0
        } else {
            rng.below(4096) as usize
        },
        // Half the seeds keep up to three deleted segments as spares for the next ones.
        recycle_segments: if rng.chance(500) {
            0
        } else {
            1 + rng.below(3) as usize
        },
    };
    let model: Shared<Model> = Rc::default();
    for _cycle in 0..2 {
        let log = open(&storage, &config)?;
        verify(&log, &model.borrow())?;
        let mut budget = rng.below(3000);
        run_phases(&log, &model, &mut rng, &mut budget)?;
        drop(log);
        storage.crash();
        let log = open(&storage, &config)?;
        verify(&log, &model.borrow())?;
        let mut m = model.borrow_mut();
        m.deleting = None;
        m.keep_from = m.keep_from.max(log.first_offset());
        // What the crash kept of them is in the log now, and stays unless truncated.
        let kept: Vec<(u64, u64)> = std::mem::take(&mut m.unsynced)
            .into_iter()
            .filter(|(o, _)| *o < log.next_offset())
            .collect();
        m.acked.extend(kept);
    }
    Ok(())
}

// Every acknowledged record survives random crashes byte for byte, nothing unappended
// appears, and offsets stay gapless, over at least 1,000 seeds.
#[test]
fn crash_consistency_over_seeds() {
    let seeds: Vec<u64> = match std::env::var("CHORUS_LOG_SEED") {
        Ok(s) => vec![s.parse().expect("CHORUS_LOG_SEED is a number")],
        Err(_) => {
            let n = std::env::var("CHORUS_LOG_SEEDS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(1000u64);
            (0..n).collect()
        }
    };
    let mut failed = Vec::new();
    for &seed in &seeds {
        let outcome = std::panic::catch_unwind(|| run_seed(seed));
        let error = match outcome {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => e,
            Err(p) => p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into()),
        };
        eprintln!(
            "seed {seed} failed: {error}\n  replay: CHORUS_LOG_SEED={seed} cargo test -p chorus-log --test crash_sim"
        );
        failed.push(seed);
    }
    assert!(
        failed.is_empty(),
        "{} of {} seeds failed: {failed:?}",
        failed.len(),
        seeds.len()
    );
    println!("{} seeds passed", seeds.len());
}
