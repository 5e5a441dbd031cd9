//! The harness's smoke test: every scenario at a tiny size, against the real `chorus`
//! binary, through the real `chorus-bench` binary, so the harness can never rot.
//!
//! The server binary is built first (`cargo build -p chorus-gateway --bin chorus`, a no-op
//! under `cargo test --workspace`, which has built it already). Peers run too when their
//! binaries are installed; the test prints which ones ran and which were skipped.

use std::path::PathBuf;
use std::process::Command;

/// The debug `chorus` binary of this workspace, built if it is missing or stale.
fn chorus_binary() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let status = Command::new(env!("CARGO"))
        .args(["build", "-p", "chorus-gateway", "--bin", "chorus"])
        .current_dir(&root)
        .status()
        .expect("run cargo build for the chorus binary");
    assert!(status.success(), "building the chorus binary failed");
    // The test executable lives in target/<profile>/deps; the binary in target/<profile>.
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let binary = profile_dir.join("chorus");
    assert!(binary.exists(), "{} is missing", binary.display());
    binary
}

fn bench(args: &[&str], results: &std::path::Path, chorus: &std::path::Path) -> String {
    let work = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_chorus-bench"))
        .arg("--chorus-bin")
        .arg(chorus)
        .arg("--work-dir")
        .arg(work.path())
        .arg("--results-dir")
        .arg(results)
        .args(args)
        .output()
        .expect("run chorus-bench");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "chorus-bench {args:?} failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    eprint!("{stderr}");
    stdout
}

/// The Chorus (WebSocket) row of a report table whose first two cells are the system and
/// `what`: its cells.
fn chorus_row<'a>(stdout: &'a str, what: &str) -> Vec<&'a str> {
    system_row(stdout, "Chorus", what)
}

/// The row of `system` in a report table whose second cell is `what`: its cells.
fn system_row<'a>(stdout: &'a str, system: &str, what: &str) -> Vec<&'a str> {
    let prefix = format!("| {system} | {what} |");
    let line = stdout
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no {system} {what} row in:\n{stdout}"));
    line.split('|')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect()
}

/// The cells of the first line of `out` that starts with `prefix` (the first, before the
/// leading `|`, is empty).
fn row_cells(out: &str, prefix: &str) -> Vec<String> {
    let line = out
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} row in\n{out}"));
    line.split('|').map(|c| c.trim().to_owned()).collect()
}

/// The "what a delivery costs" row of `system` in the chat details: server CPU µs and
/// context switches per delivery, and the load generator's CPU µs per delivery.
fn per_delivery(stdout: &str, system: &str) -> Option<(f64, f64, f64)> {
    let prefix = format!("| {system} | ");
    stdout
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .find_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let us = |cell: &str| cell.strip_suffix(" µs")?.parse::<f64>().ok();
            let switches = cells.get(3)?.split_whitespace().next()?.parse().ok()?;
            Some((us(cells.get(2)?)?, switches, us(cells.get(4)?)?))
        })
}

// The smoke-size suite runs every scenario on Chorus (and each installed peer), writes a
// report with plots, and every Chorus figure is real: each expected delivery arrived, no
// fan-out delivery is missing, every connection opened, no history page was wrong.
#[test]
fn smoke_suite_runs_every_scenario() {
    let chorus = chorus_binary();
    let results = tempfile::tempdir().unwrap();
    let out = bench(
        &["suite", "--size", "smoke", "--no-readme"],
        results.path(),
        &chorus,
    );

    let row = chorus_row(&out, "delivery");
    let count: u64 = row[2].parse().unwrap();
    assert_eq!(
        count,
        100 * 5,
        "100 measured messages × 5 members each:\n{out}"
    );
    let sent_row = out
        .lines()
        .find(|l| l.starts_with("| Chorus | 100 |"))
        .unwrap_or_else(|| panic!("sent/expected/delivered row:\n{out}"));
    assert!(
        sent_row.starts_with("| Chorus | 100 | 500 | 500 |"),
        "{sent_row}"
    );

    // What a delivery cost, over both transports: real server CPU and context switches
    // (a server that delivers 500 messages blocks and wakes), and the generator's CPU.
    for system in ["Chorus", "Chorus QUIC"] {
        let (cpu_us, switches, generator_us) = per_delivery(&out, system)
            .unwrap_or_else(|| panic!("{system}'s cost per delivery:\n{out}"));
        assert!(
            cpu_us > 0.0 && switches > 0.0 && generator_us > 0.0,
            "{system}: {cpu_us} µs, {switches} switches, generator {generator_us} µs"
        );
    }
    for row in [
        "| server CPU per delivery in `chat` ≤ Redis pub/sub's",
        "| durable deliveries/s ≥ 3× NATS JetStream's, both fsyncing every ack",
        "| deliveries/s ≥ 3× NATS JetStream 2.9's",
        "| deliveries/s ≥ 1.0× Redis pub/sub's",
    ] {
        assert!(out.contains(row), "summary row {row:?}:\n{out}");
    }

    let rung = out
        .lines()
        .find(|l| l.starts_with("| Chorus | 200 |"))
        .unwrap_or_else(|| panic!("the rate ladder's Chorus rung:\n{out}"));
    assert!(
        rung.contains("| 500 / 500 |"),
        "100 measured messages × 5: {rung}"
    );

    let last = chorus_row(&out, "last member");
    assert_eq!(last[2], "3", "three fan-out rounds");
    let fanout = out
        .lines()
        .find(|l| l.starts_with("| Chorus | 0 | RSS"))
        .map(|_| ());
    assert!(fanout.is_some(), "no missing fan-out delivery:\n{out}");

    let conns = out
        .lines()
        .find(|l| l.starts_with("| Chorus | 40 |"))
        .unwrap_or_else(|| panic!("all 40 connections open:\n{out}"));
    assert!(conns.contains("KiB"), "{conns}");

    // The QUIC variants: the same chat load, every delivery in; every idle session open
    // and answering its ping, in `connections` and in the sessions-at-scale run.
    let quic = system_row(&out, "Chorus QUIC", "delivery");
    assert_eq!(quic[2], "500", "100 measured messages × 5 members:\n{out}");
    assert!(
        out.contains("| Chorus QUIC | 100 | 500 | 500 |"),
        "QUIC sent/expected/delivered:\n{out}"
    );
    for n in [40, 60] {
        let (prefix, live) = (format!("| Chorus QUIC | {n} |"), format!("| {n} within"));
        assert!(
            out.lines()
                .any(|l| l.starts_with(&prefix) && l.contains(&live)),
            "{n} QUIC sessions open and live:\n{out}"
        );
    }
    for target in [
        "over QUIC ≤ 1.2×",
        "per idle QUIC session",
        "idle QUIC sessions on one",
    ] {
        assert!(out.contains(target), "summary row {target:?}:\n{out}");
    }

    // Presence over real connections: every scheduled change reached every subscriber,
    // and no frame reported a status nobody set.
    let presence = out
        .lines()
        .find(|l| l.starts_with("| updates delivered / expected |"))
        .unwrap_or_else(|| panic!("a presence run:\n{out}"));
    let value = presence.split('|').nth(2).unwrap_or_default().trim();
    let (delivered, rest) = value.split_once(" / ").unwrap_or_default();
    let expected = rest.split_whitespace().next().unwrap_or_default();
    assert_eq!(delivered, expected, "every update delivered: {presence}");
    assert!(delivered.parse::<u64>().unwrap_or(0) > 0, "{presence}");
    assert!(
        presence.contains("(0 unexpected, 0 connections closed)"),
        "{presence}"
    );
    assert!(
        out.contains("| presence: server memory per subscription ≤ 64 B |"),
        "{out}"
    );

    let page = chorus_row(&out, "page");
    assert_eq!(page[2], "100", "100 page reads");

    // Search joins the suite: its two targets are in the summary, its table in the details.
    for row in ["| search: query p99 ≤", "| search: ack → searchable p99 ≤"] {
        assert!(out.contains(row), "summary row {row:?}:\n{out}");
    }
    assert!(
        out.contains("; 100/100 found;"),
        "every freshness message found:\n{out}"
    );
    let history = out
        .lines()
        .find(|l| l.starts_with("| Chorus |") && l.contains(" s | 0 | RSS"));
    assert!(history.is_some(), "no wrong history page:\n{out}");

    // CI sets CHORUS_REQUIRE_PEERS after installing them: there a peer that did not run
    // is a failure, not a skip.
    let required = std::env::var_os("CHORUS_REQUIRE_PEERS").is_some();
    for peer in [
        "Redis pub/sub",
        "NATS JetStream 2.9 (no fsync per ack)",
        "NATS JetStream 2.10+ (fsync every ack)",
        "PostgreSQL",
    ] {
        if out.contains(&format!("| {peer} |")) {
            eprintln!("smoke: peer {peer} ran");
            if peer != "PostgreSQL" {
                // CPU comes in clock ticks (10 ms), fewer than one of which Redis can use at
                // this size, so only its switches must show: a server that delivered 500
                // messages woke for them.
                let (cpu_us, switches, _) = per_delivery(&out, peer)
                    .unwrap_or_else(|| panic!("{peer}'s cost per delivery:\n{out}"));
                assert!(
                    cpu_us >= 0.0 && switches > 0.0,
                    "{peer}: {cpu_us} µs, {switches}"
                );
                // Every chat peer climbs the rate ladder too, its first rung at least.
                let rung = format!("| {peer} | 200 |");
                let rung = out
                    .lines()
                    .find(|l| l.starts_with(&rung))
                    .unwrap_or_else(|| panic!("{peer}'s ladder rung:\n{out}"));
                assert!(rung.contains("| 500 / 500 |"), "{rung}");
            }
        } else {
            assert!(!required, "peer {peer} did not run:\n{out}");
            eprintln!("smoke: peer {peer} did not run (not installed, or failed: see the report)");
        }
    }

    let dirs: Vec<_> = std::fs::read_dir(results.path()).unwrap().collect();
    assert_eq!(dirs.len(), 1, "one report folder");
    let dir = dirs.into_iter().next().unwrap().unwrap().path();
    let report = std::fs::read_to_string(dir.join("report.md")).unwrap();
    assert!(
        report.contains("## Summary against the targets"),
        "{report}"
    );
    for png in ["chat.png", "fanout.png", "history.png"] {
        let bytes = std::fs::read(dir.join(png)).unwrap();
        assert_eq!(&bytes[1..4], b"PNG", "{png}");
    }
}

// A scenario also runs alone from its own subcommand and flags.
#[test]
fn one_scenario_runs_alone() {
    let chorus = chorus_binary();
    let results = tempfile::tempdir().unwrap();
    let out = bench(
        &[
            "--no-peers",
            "chat",
            "--connections",
            "6",
            "--members",
            "3",
            "--rate",
            "20",
            "--duration",
            "0.5",
            "--warmup",
            "0.2",
        ],
        results.path(),
        &chorus,
    );
    let row = chorus_row(&out, "ack");
    assert_eq!(row[2], "10", "20/s for 0.5 s:\n{out}");
}

// `files` at its smoke size: every upload 201, every thumb ready, the ratios real. The vips
// comparison is skipped only when vipsthumbnail is missing and CHORUS_REQUIRE_PEERS unset
// (the binary itself fails when it is set and vips is missing).
#[test]
fn files_smoke() {
    let chorus = chorus_binary();
    let results = tempfile::tempdir().unwrap();
    let out = bench(&["files", "--smoke"], results.path(), &chorus);
    assert!(
        out.contains("uploads created: 2/2; thumbs ready: 5/5"),
        "{out}"
    );
    let cells = |prefix: &str| row_cells(&out, prefix);
    let upload = cells("| upload 2 ×");
    let ratio: f64 = upload[4].parse().unwrap();
    assert!(ratio > 0.0 && ratio.is_finite(), "{out}");
    let thumb = cells("| thumb of 400×300");
    assert!(thumb[2].contains("(360×270;"), "{out}");
    let vips = std::process::Command::new("vipsthumbnail")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if vips {
        let r: f64 = thumb[4].parse().unwrap();
        assert!(r > 0.0 && r.is_finite(), "{out}");
        assert!(thumb[3].contains("(360×270)"), "{out}");
    } else {
        eprintln!("vipsthumbnail is not installed: the thumb comparison was skipped");
    }
    let preview = cells("| upload → thumb ready");
    assert!(preview[2].starts_with("p50 "), "{out}");
}

// `search` at its smoke size: every loaded message searchable, every freshness message
// found by polling and by its token, and the table's figures real; PostgreSQL answers the
// same queries when installed (required under CHORUS_REQUIRE_PEERS).
#[test]
fn search_smoke() {
    let chorus = chorus_binary();
    let results = tempfile::tempdir().unwrap();
    let out = bench(&["search", "--smoke"], results.path(), &chorus);
    let cells = |prefix: &str| row_cells(&out, prefix);
    let query = cells("| query (ms), 2000 messages");
    assert!(query[2].starts_with("p50 "), "{out}");
    let fresh = cells("| ack → searchable");
    assert!(
        fresh[2].contains("; 100/100 found; 2/2 found by token"),
        "every freshness message found:\n{out}"
    );
    let bytes = cells("| bytes per message");
    let per: f64 = bytes[2].parse().unwrap();
    assert!(per > 0.0 && per.is_finite(), "{out}");
    let required = std::env::var_os("CHORUS_REQUIRE_PEERS").is_some();
    if query[3].starts_with("n/a") {
        assert!(!required, "PostgreSQL did not run:\n{out}");
        eprintln!("smoke: PostgreSQL did not run: {}", query[3]);
    } else {
        assert!(query[3].starts_with("p50 "), "{out}");
        let same = cells("| queries with the same `total`");
        assert!(
            same[2].ends_with("of 40 (Chorus also matches words of 5+ letters one edit away)"),
            "{out}"
        );
    }
}

// `notify` at its smoke size: the sink recorded every POST of its own measurement, every
// mention pushed once and nothing else, every member but the sender got the `@channel`
// push, and the figures are real.
#[test]
fn notify_smoke() {
    let chorus = chorus_binary();
    let results = tempfile::tempdir().unwrap();
    let out = bench(&["notify", "--smoke"], results.path(), &chorus);
    assert!(
        out.contains("pushes: 20/20 for the mentions; 999/999 for `@channel`"),
        "{out}"
    );
    let cells = |prefix: &str| row_cells(&out, prefix);
    let sink = cells("| gateway sink alone");
    assert_eq!(sink[3], "2000/2000 recorded", "{out}");
    let push = cells("| ack → push POST at the gateway");
    assert!(push[2].starts_with("p50 "), "{out}");
    assert!(push[3].ends_with("; 0 unexpected pushes"), "{out}");
    let fanout = cells("| `@channel` in a 1000-member channel");
    assert!(fanout[2].contains("999/999 pushes, 999 devices"), "{out}");
    let probes = cells("| the sender's send → ack");
    assert!(probes[2].starts_with("with notifications: p50 "), "{out}");
    assert!(probes[3].starts_with("without: p50 "), "{out}");
    // The slowest sends of each run, with when they were due.
    let slowest = out
        .lines()
        .find(|l| l.starts_with("the sender's slowest sends"));
    let slowest = slowest.unwrap_or_else(|| panic!("{out}"));
    assert!(slowest.contains("with notifications +"), "{slowest}");
    assert!(slowest.contains("; without +"), "{slowest}");
}

// `cluster` at its smoke size: a single node and three real nodes each acknowledged every
// open-loop send with no error, both closed loops committed, and a SIGKILLed leader's
// partitions took a write again through another node.
#[test]
fn cluster_smoke() {
    let chorus = chorus_binary();
    let results = tempfile::tempdir().unwrap();
    let out = bench(&["cluster", "--smoke"], results.path(), &chorus);
    let cells = |prefix: &str| row_cells(&out, prefix);
    let closed = cells("| closed loop, 4 channels × 2 in flight: acks/s");
    for cell in &closed[2..4] {
        let rate: f64 = cell.parse().unwrap_or_else(|_| panic!("{out}"));
        assert!(rate > 0.0, "{out}");
    }
    let open = cells("| 100 msgs/s open loop: send → ack");
    for cell in &open[2..4] {
        assert!(cell.starts_with("p50 "), "{out}");
        assert!(cell.ends_with("; 100/100 acked"), "{out}");
    }
    let failover = cells("| leader SIGKILL → first write in each of its partitions");
    assert!(
        failover[3].starts_with("median of rounds' slowest "),
        "{out}"
    );
    assert!(failover[3].contains(" partitions, slowest "), "{out}");
}
