//! A process's CPU time and resident memory, read from `/proc`, for [`ServerUsage`].
//!
//! The harness samples the server under test before and after a measured window; the CPU
//! figure is the difference (user + system, all threads), the RSS figure the later value.

use super::ServerUsage;

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
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A CPU reading taken at the start of a window, finished into a [`ServerUsage`] at its end.
#[derive(Clone, Copy, Debug)]
pub struct UsageWindow {
    pid: u32,
    cpu_start: f64,
}

impl UsageWindow {
    /// Starts a window on process `pid`.
    pub fn start(pid: u32) -> UsageWindow {
        UsageWindow {
            pid,
            cpu_start: cpu_secs(pid).unwrap_or(0.0),
        }
    }

    /// The CPU used since [`UsageWindow::start`] and the RSS now.
    pub fn finish(&self) -> ServerUsage {
        ServerUsage {
            cpu_secs: (cpu_secs(self.pid).unwrap_or(self.cpu_start) - self.cpu_start).max(0.0),
            rss_bytes: rss_bytes(self.pid).unwrap_or(0),
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

    // This very process is readable: some CPU used, some memory resident.
    #[test]
    fn reads_own_process() {
        let pid = std::process::id();
        assert!(cpu_secs(pid).is_some());
        assert!(rss_bytes(pid).unwrap() > 0);
    }
}
