//! A process's CPU time, resident memory and context switches, read from `/proc`, for
//! [`ServerUsage`].
//!
//! The harness samples the server under test before and after a measured window; the CPU
//! figure is the difference (user + system, all threads), the RSS figure the later value.
//!
//! Context switches are counted per thread: `/proc/PID/status` shows only the main
//! thread's, so a window sums `voluntary_ctxt_switches` and `nonvoluntary_ctxt_switches`
//! over `/proc/PID/task/*/status`, each thread's count at the end less its count at the
//! start (a thread born in the window counts from zero). A thread that exits inside the
//! window takes its switches with it: they are lost, not counted. That undercounts a
//! server whose helper threads come and go, such as io_uring's io-wq workers, which exit
//! after a while idle.

use super::ServerUsage;
use std::collections::HashMap;

/// CPU seconds (user + system) that process `pid` has used so far, or `None` if it is gone.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let ticks = parse_stat_ticks(&stat)?;
    // SAFETY: sysconf has no preconditions; it only reads a system constant.
    let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (per_sec > 0).then(|| ticks as f64 / per_sec as f64)
}

/// Resident set size of process `pid` in bytes, or `None` if it is gone.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vm_rss(&status)
}

/// Context switches of one thread: `(voluntary, involuntary)`.
pub type Switches = (u64, u64);

/// The context switches of every live thread of process `pid`, by thread id; empty if the
/// process is gone. A thread that exits while the directory is read is left out.
pub fn thread_switches(pid: u32) -> HashMap<u32, Switches> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return HashMap::new();
    };
    tasks
        .flatten()
        .filter_map(|entry| {
            let tid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let status = std::fs::read_to_string(entry.path().join("status")).ok()?;
            Some((tid, parse_switches(&status)?))
        })
        .collect()
}

/// The switches between two [`thread_switches`] readings, summed over the threads alive
/// at the end: each thread's end count less its start count, or all of it for a thread
/// born since. Threads gone by the end are not in `end`, and their switches are lost.
pub fn switches_between(start: &HashMap<u32, Switches>, end: &HashMap<u32, Switches>) -> Switches {
    end.iter().fold((0, 0), |(vol, invol), (tid, &(v, i))| {
        let (v0, i0) = start.get(tid).copied().unwrap_or((0, 0));
        (vol + v.saturating_sub(v0), invol + i.saturating_sub(i0))
    })
}

/// CPU seconds (user + system) used so far by the threads of process `pid` whose name
/// (`comm`, at most 15 bytes) starts with one of `prefixes`. Threads that have exited are
/// not counted.
pub fn named_threads_cpu_secs(pid: u32, prefixes: &[&str]) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    // SAFETY: sysconf has no preconditions; it only reads a system constant.
    let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let ticks: u64 = tasks
        .flatten()
        .filter_map(|entry| {
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            let name = &stat[stat.find('(')? + 1..stat.rfind(')')?];
            prefixes
                .iter()
                .any(|p| name.starts_with(p))
                .then(|| parse_stat_ticks(&stat))
                .flatten()
        })
        .sum();
    ticks as f64 / per_sec
}

/// `utime + stime` in clock ticks from the text of `/proc/PID/stat`. The command name (field
/// 2) may hold spaces and parentheses, so fields are counted from the last `)`.
fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// `VmRSS` in bytes from the text of `/proc/PID/status`.
fn parse_vm_rss(status: &str) -> Option<u64> {
    let kib = status_field(status, "VmRSS:")?;
    Some(kib * 1024)
}

/// `(voluntary_ctxt_switches, nonvoluntary_ctxt_switches)` from the text of a thread's
/// `status` file; `None` unless both are there.
fn parse_switches(status: &str) -> Option<Switches> {
    Some((
        status_field(status, "voluntary_ctxt_switches:")?,
        status_field(status, "nonvoluntary_ctxt_switches:")?,
    ))
}

/// The first number after `key` on the line of a `status` text that starts with it.
fn status_field(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

/// Readings taken at the start of a window, finished into a [`ServerUsage`] at its end.
#[derive(Clone, Debug)]
pub struct UsageWindow {
    pid: u32,
    cpu_start: f64,
    switches_start: HashMap<u32, Switches>,
}

impl UsageWindow {
    /// Starts a window on process `pid`.
    pub fn start(pid: u32) -> UsageWindow {
        UsageWindow {
            pid,
            cpu_start: cpu_secs(pid).unwrap_or(0.0),
            switches_start: thread_switches(pid),
        }
    }

    /// The CPU and context switches used since [`UsageWindow::start`], and the RSS now.
    pub fn finish(&self) -> ServerUsage {
        let (voluntary, involuntary) =
            switches_between(&self.switches_start, &thread_switches(self.pid));
        ServerUsage {
            cpu_secs: (cpu_secs(self.pid).unwrap_or(self.cpu_start) - self.cpu_start).max(0.0),
            rss_bytes: rss_bytes(self.pid).unwrap_or(0),
            voluntary_switches: voluntary,
            involuntary_switches: involuntary,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The tick fields are found after a command name with spaces and parentheses, and RSS
    // is converted from KiB.
    #[test]
    fn parses_proc_texts() {
        let stat = "4242 (chorus (x) y) S 1 2 3 4 5 6 7 8 9 10 250 75 0 0 20 0 3 0";
        assert_eq!(parse_stat_ticks(stat), Some(325));
        let status = "Name:\tchorus\nVmPeak:\t  10 kB\nVmRSS:\t    2048 kB\nThreads: 3\n";
        assert_eq!(parse_vm_rss(status), Some(2048 * 1024));
        assert_eq!(parse_vm_rss("Name: x\n"), None);
    }

    // Both switch counts are read from a thread's status text (the voluntary key is not
    // mistaken for the end of the nonvoluntary one), and a text without them gives none.
    #[test]
    fn parses_context_switches() {
        let status = "Name:\tchorus-shard-0\nThreads:\t5\nSigQ:\t0/95913\n\
                      nonvoluntary_ctxt_switches:\t17\nvoluntary_ctxt_switches:\t123456\n";
        assert_eq!(parse_switches(status), Some((123_456, 17)));
        assert_eq!(
            parse_switches("Name:\tx\nvoluntary_ctxt_switches:\t3\n"),
            None
        );
    }

    // A window counts each surviving thread's increase, a thread born in it from zero, and
    // nothing for a thread that exited (its switches are lost, never negative).
    #[test]
    fn sums_switches_over_threads() {
        let start = HashMap::from([(1, (100, 10)), (2, (50, 5)), (3, (7, 7))]);
        let end = HashMap::from([(1, (160, 12)), (2, (50, 9)), (4, (20, 1))]);
        assert_eq!(switches_between(&start, &end), (60 + 20, 2 + 4 + 1));
        assert_eq!(switches_between(&end, &end), (0, 0));
    }

    // This very process is readable: some CPU used, some memory resident, and a thread
    // born in the window that sleeps five times shows at least five voluntary switches.
    #[test]
    fn reads_own_process() {
        let pid = std::process::id();
        assert!(cpu_secs(pid).is_some());
        assert!(rss_bytes(pid).unwrap() > 0);
        let window = UsageWindow::start(pid);
        let (slept_tx, slept_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let sleeper = std::thread::spawn(move || {
            for _ in 0..5 {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            slept_tx.send(()).unwrap();
            // Alive until the window is read: an exited thread's switches are lost.
            let _ = done_rx.recv();
        });
        slept_rx.recv().unwrap();
        let usage = window.finish();
        done_tx.send(()).unwrap();
        sleeper.join().unwrap();
        assert!(usage.voluntary_switches >= 5, "{usage:?}");
    }
}
