//! Real-process crash test: a child process appends to a log in a real directory through
//! `DiskStorage` (glommio, O_DIRECT; or the page cache, as a directory opened with
//! `dir_cached` is) and prints every acknowledged offset; the parent SIGKILLs it at a
//! random moment, reopens the log, and checks every acknowledged record.
//!
//! The child is this same test binary, started with `CHORUS_KILL_CHILD_DIR` set and asked
//! to run only `child_appender`. `CHORUS_KILL_ROUNDS` sets the number of kills (default 20);
//! `CHORUS_KILL_SEED` fixes the random choices (the kill timing itself is real time).

use chorus_log::storage::sim::SimRng;
use chorus_log::{DiskStorage, Entry, Log, LogConfig};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

const CHILD_DIR: &str = "CHORUS_KILL_CHILD_DIR";
const CHILD_RUN: &str = "CHORUS_KILL_CHILD_RUN";
/// Set to `1` when the child writes through the page cache.
const CHILD_CACHED: &str = "CHORUS_KILL_CHILD_CACHED";

/// The directory, with O_DIRECT files or page-cache ones.
fn storage(dir: &std::path::Path, cached: bool) -> std::io::Result<DiskStorage> {
    if cached {
        DiskStorage::open_dir_cached(dir)
    } else {
        DiskStorage::open_dir(dir)
    }
}

fn config() -> LogConfig {
    LogConfig {
        segment_bytes_max: 64 * 1024,
        index_interval_bytes: 1024,
        ..LogConfig::default()
    }
}

/// The payload of a tag: its 8 bytes, then 16 to 700 bytes that are a function of it.
fn payload(tag: u64) -> Vec<u8> {
    let mut r = SimRng::new(tag);
    let len = 16 + r.below(685) as usize;
    let mut out = tag.to_le_bytes().to_vec();
    out.extend((0..len).map(|_| r.next_u64() as u8));
    out
}

fn run_on_glommio<T: Send + 'static>(
    f: impl FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = T>>> + Send + 'static,
) -> T {
    glommio::LocalExecutorBuilder::default()
        .spawn(f)
        .expect("executor")
        .join()
        .expect("join")
}

// Not a test of its own: the body of the child process that the parent test kills.
#[test]
#[ignore = "run only as the child of sigkill_never_loses_acknowledged_records"]
fn child_appender() {
    let Ok(dir) = std::env::var(CHILD_DIR) else {
        return;
    };
    let run: u64 = std::env::var(CHILD_RUN).unwrap().parse().unwrap();
    let cached = std::env::var(CHILD_CACHED).is_ok_and(|v| v == "1");
    run_on_glommio(move || {
        Box::pin(async move {
            let storage = storage(dir.as_ref(), cached).expect("dir");
            let (log, _) = Log::open(storage, config()).await.expect("open");
            let log = Rc::new(log);
            let mut tasks = Vec::new();
            for task in 0..8u64 {
                let log = log.clone();
                tasks.push(glommio::spawn_local(async move {
                    for n in 0u64.. {
                        let base = (run << 40) | (task << 32) | (n << 2);
                        let tags: Vec<u64> = (0..1 + n % 3).map(|i| base + i).collect();
                        let bodies: Vec<Vec<u8>> = tags.iter().map(|t| payload(*t)).collect();
                        let entries: Vec<Entry<'_>> = bodies
                            .iter()
                            .zip(&tags)
                            .map(|(b, t)| Entry {
                                timestamp_us: *t,
                                payload: b,
                            })
                            .collect();
                        let range = log.append(&entries).await.expect("append");
                        let mut out = std::io::stdout().lock();
                        for (offset, tag) in range.zip(&tags) {
                            writeln!(out, "ack {offset} {tag}").unwrap();
                        }
                        out.flush().unwrap();
                    }
                }));
            }
            for t in tasks {
                t.await;
            }
        })
    });
}

/// Reads the whole log and checks it against the acknowledgements seen so far.
fn verify(dir: std::path::PathBuf, cached: bool, acked: BTreeMap<u64, u64>) -> Result<u64, String> {
    run_on_glommio(move || {
        Box::pin(async move {
            let storage = storage(&dir, cached).map_err(|e| e.to_string())?;
            let (log, _report) = Log::open(storage, config())
                .await
                .map_err(|e| format!("reopen: {e}"))?;
            let mut at = log.first_offset();
            let mut found = BTreeMap::new();
            loop {
                let chunk = log.read(at, 1 << 20).await.map_err(|e| e.to_string())?;
                let Some(last) = chunk.last() else { break };
                at = last.offset + 1;
                for r in chunk {
                    let tag = u64::from_le_bytes(r.payload[..8].try_into().unwrap());
                    if r.payload != payload(tag) || r.timestamp_us != tag {
                        return Err(format!("offset {}: bytes never appended", r.offset));
                    }
                    found.insert(r.offset, tag);
                }
            }
            let expected: Vec<u64> = (log.first_offset()..log.next_offset()).collect();
            if found.keys().copied().collect::<Vec<_>>() != expected {
                return Err("offsets have a gap".into());
            }
            for (offset, tag) in &acked {
                if found.get(offset) != Some(tag) {
                    return Err(format!(
                        "acknowledged offset {offset} (tag {tag}) lost: found {:?}",
                        found.get(offset)
                    ));
                }
            }
            log.close().await.map_err(|e| e.to_string())?;
            Ok(found.len() as u64)
        })
    })
}

// SIGKILL at random moments never loses an acknowledged record, over at least 20 kills.
#[test]
fn sigkill_never_loses_acknowledged_records() {
    kill_rounds(false);
}

// The same with the files written into the page cache (a directory opened with
// `dir_cached`): what the log reads back after each kill is every acknowledged record and
// nothing that was never appended.
#[test]
fn sigkill_never_loses_acknowledged_records_in_the_page_cache() {
    kill_rounds(true);
}

fn kill_rounds(cached: bool) {
    let rounds: u64 = std::env::var("CHORUS_KILL_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("CHORUS_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("kill test seed {seed} (replay the choices with CHORUS_KILL_SEED={seed})");
    let mut rng = SimRng::new(seed);
    let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
    let mut acked: BTreeMap<u64, u64> = BTreeMap::new();
    for round in 1..=rounds {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "child_appender",
                "--ignored",
                "--nocapture",
                "-q",
            ])
            .env(CHILD_DIR, dir.path())
            .env(CHILD_RUN, round.to_string())
            .env(CHILD_CACHED, if cached { "1" } else { "0" })
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let mut parts = line.split_whitespace();
                if parts.next() == Some("ack") {
                    let offset: u64 = parts.next().unwrap().parse().unwrap();
                    let tag: u64 = parts.next().unwrap().parse().unwrap();
                    if tx.send((offset, tag)).is_err() {
                        break;
                    }
                }
            }
        });
        let kill_after_acks = 1 + rng.below(3000);
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut seen = 0;
        while seen < kill_after_acks && Instant::now() < deadline {
            if let Ok((offset, tag)) = rx.recv_timeout(Duration::from_millis(100)) {
                acked.insert(offset, tag);
                seen += 1;
            }
        }
        assert!(seen > 0, "round {round}: the child acknowledged nothing");
        child.kill().expect("SIGKILL");
        child.wait().unwrap();
        reader.join().unwrap();
        acked.extend(rx.try_iter());
        let total = verify(dir.path().to_owned(), cached, acked.clone())
            .unwrap_or_else(|e| panic!("round {round} (seed {seed}): {e}"));
        println!(
            "round {round}: killed after {seen} acks; {} acknowledged, {total} in the log",
            acked.len()
        );
    }
}
