//! Durable appends to `Log<DiskStorage>` on the real disk, next to the best the same disk
//! can do, measured in the same run.
//!
//! Run it with `cargo bench -p chorus-bench --bench log_append`. It prints the raw limits of
//! the disk (a 4 KiB write + `fdatasync` loop, and 256 MiB of 1 MiB O_DIRECT writes + one
//! `fdatasync`), then a markdown table of 256-byte records appended in batches of 1, 16 and
//! 256 by 1, 4, 16 and 64 concurrent appender tasks, each number the median of
//! [`RUNS_PER_CELL`] runs, then a criterion group. Everything runs on one glommio
//! `LocalExecutor`, that is one core, as one shard of the server will.
//!
//! `CHORUS_BENCH_SECS` sets the length of each measurement (default 2 s, which makes the
//! whole run about a minute and a half); `CHORUS_BENCH_DIR` the directory the files go
//! in (default the system temporary directory), which must be on a real filesystem such as
//! ext4, since the log writes with O_DIRECT; `CHORUS_BENCH_PREALLOCATE` the log's
//! `preallocate_bytes` (its default, 4 MiB; 0 appends by growing the file).
//!
//! The log's storage is wrapped in a [`CountingStorage`], a pass-through that counts the
//! `fdatasync`s the log issues, so the table can show how many records each one carried.

use chorus_bench::counting::{counting, Counters, CountersSnapshot, CountingStorage};
use chorus_bench::latency::{self, median, LatencySummary};
use chorus_log::{DiskStorage, Entry, Log, LogConfig};
use criterion::{Criterion, Throughput};
use futures::{StreamExt, TryStreamExt};
use glommio::io::{DmaFile, OpenOptions};
use glommio::{LocalExecutor, LocalExecutorBuilder, Placement};
use hdrhistogram::Histogram;
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};
use tempfile::TempDir;

/// The payload of every appended record, in bytes.
const PAYLOAD_BYTES: usize = 256;
/// Records per `append` call, one table row group each.
const BATCHES: [usize; 3] = [1, 16, 256];
/// Concurrent appender tasks.
const APPENDERS: [usize; 4] = [1, 4, 16, 64];
/// Runs of every measurement; the median is reported, so one disturbed run does not decide.
const RUNS_PER_CELL: usize = 3;
/// The default length of one measurement.
const SECS_DEFAULT: Duration = Duration::from_secs(2);
/// The length of one measurement when criterion runs the bench as a test (`--test`): it
/// only has to show that the code works.
const SECS_TEST_MODE: Duration = Duration::from_millis(50);

/// The block written before each `fdatasync` of the raw sync loop.
const RAW_SYNC_BLOCK_BYTES: usize = 4096;
/// Bytes written by the raw sequential-bandwidth measurement.
const RAW_SEQ_TOTAL_BYTES: u64 = 256 << 20;
/// Bytes per write of the raw sequential-bandwidth measurement.
const RAW_SEQ_WRITE_BYTES: usize = 1 << 20;
/// Writes in flight in the deeper of the two sequential measurements.
const RAW_SEQ_IN_FLIGHT_MAX: usize = 4;

/// Appender tasks in the criterion group: the target load.
const CRITERION_APPENDERS: usize = 64;

/// The target throughput at 64 appenders, printed with the table as a reminder.
const TARGET_RECORDS_PER_S: f64 = 300_000.0;
/// The target p99 append-to-durable latency at that load.
const TARGET_P99_US: u64 = 3_000;
/// The target share of raw sequential bandwidth at large batches, in percent.
const TARGET_SEQ_PERCENT: f64 = 70.0;

type BenchLog = Log<CountingStorage<DiskStorage>>;

fn main() {
    let test_mode = std::env::args().any(|a| a == "--test");
    let (secs, runs) = if test_mode {
        (SECS_TEST_MODE, 1)
    } else {
        let secs = chorus_bench::env_duration_secs("CHORUS_BENCH_SECS", SECS_DEFAULT);
        (secs, RUNS_PER_CELL)
    };
    let base = std::env::var_os("CHORUS_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let plan = Plan { base, secs, runs };
    // One executor for everything, made once on this thread: the criterion closures below
    // re-enter it with `run`, which a thread spawned per measurement could not share.
    let ex = LocalExecutorBuilder::new(Placement::Unbound)
        .make()
        .expect("start a glommio executor");

    let raw = ex.run(measure_raw(&plan));
    let cells = ex.run(measure_cells(&plan));
    println!("{}", report(&plan, &raw, &cells));

    let mut c = Criterion::default().configure_from_args();
    criterion_group(&mut c, &ex, &plan);
    c.final_summary();
}

/// What every measurement shares.
struct Plan {
    /// The directory that holds each measurement's fresh temporary directory.
    base: PathBuf,
    /// The length of one measurement.
    secs: Duration,
    /// Runs per measurement.
    runs: usize,
}

impl Plan {
    fn fresh_dir(&self) -> TempDir {
        tempfile::Builder::new()
            .prefix("chorus-bench-")
            .tempdir_in(&self.base)
            .unwrap_or_else(|e| panic!("create a directory in {}: {e}", self.base.display()))
    }
}

/// The disk's limits, each the median of the runs.
struct RawLimits {
    /// 4 KiB write + fdatasync, always the same already-allocated block.
    overwrite: SyncRate,
    /// 4 KiB write + fdatasync, each at the end of a growing file, as the log writes.
    append: SyncRate,
    /// Sequential write bandwidth, MB/s, one 1 MiB write in flight.
    seq_mb_s_qd1: f64,
    /// Sequential write bandwidth, MB/s, [`RAW_SEQ_IN_FLIGHT_MAX`] writes in flight.
    seq_mb_s_deep: f64,
}

impl RawLimits {
    /// The best fsync rate the disk showed, the denominator of "records per raw fsync".
    fn syncs_per_s(&self) -> f64 {
        self.overwrite.per_s.max(self.append.per_s)
    }

    /// The best sequential bandwidth the disk showed.
    fn seq_mb_s(&self) -> f64 {
        self.seq_mb_s_qd1.max(self.seq_mb_s_deep)
    }
}

/// Operations per second and their latency percentiles.
#[derive(Clone, Copy, Default)]
struct SyncRate {
    per_s: f64,
    p50_us: f64,
    p99_us: f64,
}

async fn measure_raw(plan: &Plan) -> RawLimits {
    let mut overwrite = Vec::new();
    let mut append = Vec::new();
    let (mut qd1, mut deep) = (Vec::new(), Vec::new());
    for run in 0..plan.runs {
        eprintln!("raw disk limits, run {}/{}", run + 1, plan.runs);
        let dir = plan.fresh_dir();
        // The overwrite loop goes first on purpose: its file already holds a block of data
        // when it is opened, and glommio decides whether the device can be polled by reading
        // the first file a thread opens. An empty first file gives the wrong answer (see
        // chorus-log's `DiskStorage::probe_iopoll`).
        overwrite.push(raw_sync_loop(dir.path(), SyncTarget::Overwrite, plan.secs).await);
        append.push(raw_sync_loop(dir.path(), SyncTarget::Append, plan.secs).await);
        qd1.push(raw_sequential(dir.path(), 1).await);
        deep.push(raw_sequential(dir.path(), RAW_SEQ_IN_FLIGHT_MAX).await);
    }
    RawLimits {
        overwrite: median_rate(&overwrite),
        append: median_rate(&append),
        seq_mb_s_qd1: median(&qd1),
        seq_mb_s_deep: median(&deep),
    }
}

fn median_rate(runs: &[SyncRate]) -> SyncRate {
    let pick = |f: fn(&SyncRate) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
    SyncRate {
        per_s: pick(|r| r.per_s),
        p50_us: pick(|r| r.p50_us),
        p99_us: pick(|r| r.p99_us),
    }
}

/// Where the raw sync loop writes its block.
#[derive(Clone, Copy)]
enum SyncTarget {
    /// Always block 0 of a file that already holds it: the sync flushes data only.
    Overwrite,
    /// The next block at the end of the file: the sync also commits the new size and
    /// extent, as the log's syncs do (it does not preallocate).
    Append,
}

/// Writes one 4 KiB block and `fdatasync`s, in a loop, for `secs`.
async fn raw_sync_loop(dir: &Path, target: SyncTarget, secs: Duration) -> SyncRate {
    let path = dir.join("raw-sync");
    let block = [0xa5u8; RAW_SYNC_BLOCK_BYTES];
    std::fs::write(&path, block).expect("write the raw sync file");
    std::fs::File::open(&path)
        .and_then(|f| f.sync_all())
        .expect("sync the raw sync file");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .dma_open(&path)
        .await
        .expect("open the raw sync file with O_DIRECT");
    let mut buf = file.alloc_dma_buffer(RAW_SYNC_BLOCK_BYTES);
    buf.as_bytes_mut().copy_from_slice(&block);
    let buf = Rc::new(buf);
    let mut hist = latency::histogram_us();
    let start = Instant::now();
    let mut ops = 0u64;
    while start.elapsed() < secs {
        let pos = match target {
            SyncTarget::Overwrite => 0,
            SyncTarget::Append => (ops + 1) * RAW_SYNC_BLOCK_BYTES as u64,
        };
        let t = Instant::now();
        file.write_rc_at(Rc::clone(&buf), pos)
            .await
            .expect("raw write");
        file.fdatasync().await.expect("raw fdatasync");
        latency::record(&mut hist, t.elapsed());
        ops += 1;
    }
    let elapsed = start.elapsed();
    file.close().await.expect("close the raw sync file");
    std::fs::remove_file(&path).expect("remove the raw sync file");
    let s = LatencySummary::of(&hist);
    SyncRate {
        per_s: ops as f64 / elapsed.as_secs_f64(),
        p50_us: s.p50_us as f64,
        p99_us: s.p99_us as f64,
    }
}

/// Writes [`RAW_SEQ_TOTAL_BYTES`] to a new file in 1 MiB O_DIRECT writes, `in_flight` at a
/// time, then `fdatasync`s once; returns MB/s (10^6 bytes) over the whole, sync included.
async fn raw_sequential(dir: &Path, in_flight: usize) -> f64 {
    let path = dir.join("raw-seq");
    let file = DmaFile::create(&path)
        .await
        .expect("create the raw sequential file");
    let mut buf = file.alloc_dma_buffer(RAW_SEQ_WRITE_BYTES);
    buf.as_bytes_mut().fill(0x5a);
    // The writes only read the buffer, so concurrent ones can share it.
    let buf = Rc::new(buf);
    let writes = RAW_SEQ_TOTAL_BYTES / RAW_SEQ_WRITE_BYTES as u64;
    let start = Instant::now();
    futures::stream::iter(0..writes)
        .map(|i| file.write_rc_at(Rc::clone(&buf), i * RAW_SEQ_WRITE_BYTES as u64))
        .buffer_unordered(in_flight)
        .try_for_each(|_| async { Ok(()) })
        .await
        .expect("raw sequential write");
    file.fdatasync().await.expect("raw sequential fdatasync");
    let elapsed = start.elapsed();
    file.close().await.expect("close the raw sequential file");
    std::fs::remove_file(&path).expect("remove the raw sequential file");
    RAW_SEQ_TOTAL_BYTES as f64 / 1e6 / elapsed.as_secs_f64()
}

/// One run of one table cell.
struct CellRun {
    records: u64,
    appends: u64,
    /// Appends completed by the appender that completed fewest, and by the one that
    /// completed most: far apart means the log serves appenders unfairly.
    task_appends_min: u64,
    task_appends_max: u64,
    elapsed: Duration,
    io: CountersSnapshot,
    latency: LatencySummary,
}

/// One table cell: the medians of its runs.
struct Cell {
    batch: usize,
    appenders: usize,
    records_per_s: f64,
    appends_per_s: f64,
    syncs_per_s: f64,
    records_per_sync: f64,
    task_appends_min: f64,
    task_appends_max: f64,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
}

async fn measure_cells(plan: &Plan) -> Vec<Cell> {
    let mut cells = Vec::new();
    for batch in BATCHES {
        for appenders in APPENDERS {
            let mut runs = Vec::new();
            for _ in 0..plan.runs {
                runs.push(run_cell(plan, batch, appenders).await);
            }
            let cell = summarize(batch, appenders, &runs);
            eprintln!(
                "batch {batch:>3} x {appenders:>2} appenders: {:>9.0} records/s, p99 {:>6.0} µs",
                cell.records_per_s, cell.p99_us
            );
            cells.push(cell);
        }
    }
    cells
}

fn summarize(batch: usize, appenders: usize, runs: &[CellRun]) -> Cell {
    let pick = |f: &dyn Fn(&CellRun) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
    let secs = |r: &CellRun| r.elapsed.as_secs_f64();
    Cell {
        batch,
        appenders,
        records_per_s: pick(&|r| r.records as f64 / secs(r)),
        appends_per_s: pick(&|r| r.appends as f64 / secs(r)),
        syncs_per_s: pick(&|r| r.io.syncs as f64 / secs(r)),
        records_per_sync: pick(&|r| r.records as f64 / r.io.syncs.max(1) as f64),
        task_appends_min: pick(&|r| r.task_appends_min as f64),
        task_appends_max: pick(&|r| r.task_appends_max as f64),
        p50_us: pick(&|r| r.latency.p50_us as f64),
        p99_us: pick(&|r| r.latency.p99_us as f64),
        max_us: pick(&|r| r.latency.max_us as f64),
    }
}

/// Opens a new log in a fresh directory, runs `appenders` tasks appending `batch` records
/// at a time until `plan.secs` have passed, and closes it.
async fn run_cell(plan: &Plan, batch: usize, appenders: usize) -> CellRun {
    let dir = plan.fresh_dir();
    let (log, counters) = open_log(dir.path()).await;
    let log = Rc::new(log);
    let hist = Rc::new(RefCell::new(latency::histogram_us()));
    let before = counters.snapshot();
    let start = Instant::now();
    let stop = Stop::At(start + plan.secs);
    let tasks: Vec<_> = (0..appenders)
        .map(|_| glommio::spawn_local(appender(Rc::clone(&log), batch, stop, Rc::clone(&hist))))
        .collect();
    let mut per_task = Vec::with_capacity(appenders);
    for task in tasks {
        per_task.push(task.await);
    }
    // Appends that started before the deadline finish after it; the time they took counts.
    let elapsed = start.elapsed();
    let io = counters.snapshot() - before;
    close_log(log).await;
    let latency = LatencySummary::of(&hist.borrow());
    let appends: u64 = per_task.iter().sum();
    CellRun {
        records: appends * batch as u64,
        appends,
        task_appends_min: per_task.iter().copied().min().unwrap_or(0),
        task_appends_max: per_task.iter().copied().max().unwrap_or(0),
        elapsed,
        io,
        latency,
    }
}

async fn open_log(dir: &Path) -> (BenchLog, Rc<Counters>) {
    let disk = DiskStorage::open_dir(dir.join("log")).expect("open the log directory");
    let (storage, counters) = counting(disk);
    let config = LogConfig {
        preallocate_bytes: chorus_bench::env_u64(
            "CHORUS_BENCH_PREALLOCATE",
            LogConfig::default().preallocate_bytes,
        ),
        ..LogConfig::default()
    };
    let (log, _) = Log::open(storage, config).await.expect("open the log");
    (log, counters)
}

async fn close_log(log: Rc<BenchLog>) {
    let Ok(log) = Rc::try_unwrap(log) else {
        panic!("every appender has finished, so no one else holds the log");
    };
    log.close().await.expect("close the log");
}

/// When an appender stops.
#[derive(Clone, Copy)]
enum Stop {
    /// It starts no append after this instant.
    At(Instant),
    /// After this many appends.
    After(u64),
}

impl Stop {
    fn more(self, done: u64) -> bool {
        match self {
            Stop::At(deadline) => Instant::now() < deadline,
            Stop::After(n) => done < n,
        }
    }
}

/// Appends `batch` records at a time until `stop`, recording each append's latency from
/// the call to its durable return. Returns the number of appends.
async fn appender(
    log: Rc<BenchLog>,
    batch: usize,
    stop: Stop,
    hist: Rc<RefCell<Histogram<u64>>>,
) -> u64 {
    let payload: Vec<u8> = (0..PAYLOAD_BYTES).map(|i| i as u8).collect();
    let mut entries = vec![
        Entry {
            timestamp_us: 0,
            payload: &payload,
        };
        batch
    ];
    let mut appends = 0;
    while stop.more(appends) {
        let now_us = unix_now_us();
        entries.iter_mut().for_each(|e| e.timestamp_us = now_us);
        let t = Instant::now();
        log.append(&entries).await.expect("durable append");
        latency::record(&mut hist.borrow_mut(), t.elapsed());
        appends += 1;
    }
    appends
}

fn unix_now_us() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The markdown report: raw limits, targets, the table, and the cells that face a target.
fn report(plan: &Plan, raw: &RawLimits, cells: &[Cell]) -> String {
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line("## chorus-log: durable 256-byte appends on one core (glommio, O_DIRECT)".into());
    line(String::new());
    line(format!(
        "Directory {}; {:.1} s per measurement; every number is the median of {} run(s).",
        plan.base.display(),
        plan.secs.as_secs_f64(),
        plan.runs
    ));
    line(String::new());
    line("Raw limits of the same disk, measured in this run:".into());
    for (what, r) in [
        ("overwriting one allocated block", raw.overwrite),
        ("appending (the file grows, as the log's does)", raw.append),
    ] {
        line(format!(
            "- 4 KiB write + fdatasync, {what}: {} syncs/s, p50 {:.0} µs, p99 {:.0} µs",
            thousands(r.per_s),
            r.p50_us,
            r.p99_us
        ));
    }
    line(format!(
        "- 256 MiB in 1 MiB O_DIRECT writes + one fdatasync: {:.0} MB/s with 1 write in flight, {:.0} MB/s with {RAW_SEQ_IN_FLIGHT_MAX}",
        raw.seq_mb_s_qd1, raw.seq_mb_s_deep
    ));
    line(format!(
        "- Ratios below use the best of each: {} raw syncs/s and {:.0} MB/s.",
        thousands(raw.syncs_per_s()),
        raw.seq_mb_s()
    ));
    line(String::new());
    line(format!(
        "Targets (issue): ≥ {} durable 256-byte appends/s from 64 concurrent appenders on one core; p99 ≤ {} ms at that load; at large batches ≥ {TARGET_SEQ_PERCENT:.0}% of raw sequential write+fdatasync bandwidth.",
        thousands(TARGET_RECORDS_PER_S),
        TARGET_P99_US / 1000
    ));
    line(String::new());
    line("| batch | appenders | records/s | payload MB/s | appends/s | fsyncs/s | records/fsync | appends per appender, min–max | p50 µs | p99 µs | max µs | records/s ÷ raw syncs/s | % of raw seq MB/s |".into());
    line("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|".into());
    for c in cells {
        let mb_s = payload_mb_s(c.records_per_s);
        line(format!(
            "| {} | {} | {} | {:.1} | {} | {} | {:.1} | {}–{} | {:.0} | {:.0} | {:.0} | {:.1} | {:.1}% |",
            c.batch,
            c.appenders,
            thousands(c.records_per_s),
            mb_s,
            thousands(c.appends_per_s),
            thousands(c.syncs_per_s),
            c.records_per_sync,
            thousands(c.task_appends_min),
            thousands(c.task_appends_max),
            c.p50_us,
            c.p99_us,
            c.max_us,
            c.records_per_s / raw.syncs_per_s(),
            100.0 * mb_s / raw.seq_mb_s(),
        ));
    }
    line(String::new());
    line("Against the targets (64 appenders):".into());
    for c in cells.iter().filter(|c| c.appenders == 64) {
        let pct = 100.0 * payload_mb_s(c.records_per_s) / raw.seq_mb_s();
        line(format!(
            "- batch {}: {} records/s ({}), p99 {:.0} µs ({}), {pct:.1}% of raw sequential bandwidth{}; appends per appender {}–{}, max latency {:.0} µs",
            c.batch,
            thousands(c.records_per_s),
            verdict(c.records_per_s >= TARGET_RECORDS_PER_S),
            c.p99_us,
            verdict(c.p99_us <= TARGET_P99_US as f64),
            if c.batch == BATCHES[BATCHES.len() - 1] {
                format!(" ({})", verdict(pct >= TARGET_SEQ_PERCENT))
            } else {
                String::new()
            },
            thousands(c.task_appends_min),
            thousands(c.task_appends_max),
            c.max_us,
        ));
    }
    out
}

fn verdict(met: bool) -> &'static str {
    if met {
        "target met"
    } else {
        "target missed"
    }
}

/// Payload bandwidth in MB/s (10^6 bytes) of `records_per_s` records.
fn payload_mb_s(records_per_s: f64) -> f64 {
    records_per_s * PAYLOAD_BYTES as f64 / 1e6
}

/// `1234567.8` as `1,234,568`.
fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// Criterion's view of the two ends of the target load: 64 appenders with batches of 256
/// and of 1. One iteration is one durable `append` call, so the element throughput
/// criterion prints is records per second.
fn criterion_group(c: &mut Criterion, ex: &LocalExecutor, plan: &Plan) {
    let mut group = c.benchmark_group("log_append_durable");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for batch in [256, 1] {
        let dir = plan.fresh_dir();
        let log = Rc::new(ex.run(open_log(dir.path())).0);
        group.throughput(Throughput::Elements(batch as u64));
        let name = format!("batch{batch}_x{CRITERION_APPENDERS}");
        group.bench_function(name, |b| {
            b.iter_custom(|iters| ex.run(timed_appends(&log, batch, iters)))
        });
        ex.run(close_log(log));
    }
    group.finish();
}

/// Runs `iters` appends of `batch` records spread over [`CRITERION_APPENDERS`] tasks and
/// returns how long they took.
async fn timed_appends(log: &Rc<BenchLog>, batch: usize, iters: u64) -> Duration {
    let n = CRITERION_APPENDERS as u64;
    // Criterion only needs the time; the histogram is a sink shared by all tasks.
    let hist = Rc::new(RefCell::new(latency::histogram_us()));
    let start = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let share = iters / n + u64::from(i < iters % n);
            glommio::spawn_local(appender(
                Rc::clone(log),
                batch,
                Stop::After(share),
                Rc::clone(&hist),
            ))
        })
        .collect();
    for task in tasks {
        task.await;
    }
    let elapsed = start.elapsed();
    // Retention keeps the disk use bounded however many iterations criterion asks for. It
    // runs after the clock stops, so it is not measured.
    log.delete_before(log.next_offset())
        .await
        .expect("delete old segments");
    elapsed
}
