//! The Chorus server under test: the real `chorus` binary, started on a data directory
//! that the harness seeded, on a free loopback port, and stopped with SIGTERM.
//!
//! Limits that exist to protect a public server from one abusive user are raised in the
//! server's TOML config (see [`ServerSettings`]); everything else runs with the defaults a
//! user gets from `chorus serve`.

use super::client::{Target, Transport};
use anyhow::{bail, Context};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

/// How long the server may take to print its `listening` line (it replays its logs first).
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a drain may take after SIGTERM before the server is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// The settings the harness gives a server, written to its TOML config.
#[derive(Clone, Debug)]
pub struct ServerSettings {
    /// Engine shards (threads); the engine default is one per core.
    pub shards: usize,
    /// Channel partitions; the seeding engine must use the same number.
    pub partitions: u32,
    /// Open connections the server accepts (its default, 16,000, is below what one process
    /// may hold here).
    pub connections_max: usize,
    /// Requests and frames per user per second. The load generator's users act far faster
    /// than people, so the per-user limiter is set out of the way.
    pub rate_per_s: f64,
    /// The push gateway's endpoint (`push_gateway_url`); `None`: no pushes, no decider.
    pub push_gateway_url: Option<String>,
    /// More TOML lines, appended as they are (a cluster node's `node_id`, `cluster` and
    /// `jwt_secret_file`).
    pub extra_toml: String,
}

impl Default for ServerSettings {
    fn default() -> ServerSettings {
        ServerSettings {
            shards: std::thread::available_parallelism().map_or(1, |n| n.get()),
            partitions: chorus_gateway::config::PARTITIONS_DEFAULT,
            connections_max: 19_800,
            rate_per_s: 1_000_000.0,
            push_gateway_url: None,
            extra_toml: String::new(),
        }
    }
}

impl ServerSettings {
    /// The TOML config file's text.
    pub fn toml(&self) -> String {
        // Each worker process connects from a loopback address of its own with up to
        // 9,500 connections, far above the per-address default meant for the internet.
        let mut text = format!(
            "partitions = {}\nconnections_max = {}\nconnections_per_ip_max = {}\n\
             rate_per_s = {:.1}\nrate_burst = {:.1}\n",
            self.partitions,
            self.connections_max,
            self.connections_max,
            self.rate_per_s,
            self.rate_per_s
        );
        if let Some(url) = &self.push_gateway_url {
            // A URL of the harness's own making: no quote or backslash to escape.
            text.push_str(&format!("push_gateway_url = \"{url}\"\n"));
        }
        text.push_str(&self.extra_toml);
        text
    }
}

/// A running `chorus serve`, stopped (SIGTERM, then SIGKILL) on drop.
pub struct ChorusServer {
    child: Child,
    _stdout: Stdout,
    /// The HTTP and WebSocket address it listens on.
    pub addr: SocketAddr,
    /// The QUIC address it listens on.
    pub quic_addr: Option<SocketAddr>,
    /// Its data directory.
    data: PathBuf,
    /// Where its standard error goes.
    pub log: PathBuf,
}

impl ChorusServer {
    /// Starts `binary` on `work_dir/data` (which may already hold seeded data) with
    /// `settings`, and waits until it accepts connections.
    pub fn start(
        binary: &Path,
        work_dir: &Path,
        settings: &ServerSettings,
    ) -> anyhow::Result<ChorusServer> {
        let config = work_dir.join("chorus.toml");
        std::fs::write(&config, settings.toml())?;
        let log = work_dir.join("server.log");
        // Appended to, so that a server restarted on the same directory keeps what its
        // earlier life logged.
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let mut child = Command::new(binary)
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir(work_dir))
            .args(["--http", "127.0.0.1:0", "--quic", "127.0.0.1:0"])
            .arg("--shards")
            .arg(settings.shards.to_string())
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .with_context(|| {
                format!(
                    "cannot start {} (build it with `cargo build --release -p chorus-gateway`)",
                    binary.display()
                )
            })?;
        let stdout = BufReader::new(child.stdout.take().expect("stdout is piped"));
        let started = read_line_within(stdout, START_TIMEOUT);
        let addrs = started.as_ref().and_then(|(_, line)| parse_listening(line));
        let (Some((addr, quic_addr)), Some((stdout, _))) = (addrs, started) else {
            let _ = child.kill();
            let _ = child.wait();
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            bail!("chorus did not print its listening line; its log:\n{tail}");
        };
        Ok(ChorusServer {
            child,
            _stdout: stdout,
            addr,
            quic_addr,
            data: data_dir(work_dir),
            log,
        })
    }

    /// Where sessions over `transport` connect. For QUIC, the certificate the server
    /// generated into its data directory is pinned, as a client that read the fingerprint
    /// from the server's log would pin it.
    pub fn target(&self, transport: Transport) -> anyhow::Result<Target> {
        Ok(match transport {
            Transport::WebSocket => Target::WebSocket(self.addr),
            Transport::Quic => {
                use chorus_gateway::quic::cert;
                let addr = self.quic_addr.context("the server serves no QUIC")?;
                let identity = cert::load(
                    &self.data.join(cert::CERT_FILE_NAME),
                    &self.data.join(cert::KEY_FILE_NAME),
                )
                .context("the server's QUIC certificate")?;
                Target::Quic {
                    addr,
                    pin_sha256: identity.fingerprint(),
                }
            }
        })
    }

    /// The server's process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no drain; only what the server made durable survives. Waits for the exit.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if self.child.try_wait()?.is_none() {
            self.child.kill()?;
            self.child.wait()?;
        }
        Ok(())
    }

    /// Drains the server with SIGTERM and waits for it; kills it after [`STOP_TIMEOUT`].
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> anyhow::Result<()> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        // SAFETY: kill with a valid signal on our own child's pid has no memory effects.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + STOP_TIMEOUT;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("chorus exited with {status}; see {}", self.log.display());
                }
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child.kill()?;
        self.child.wait()?;
        bail!(
            "chorus did not drain within {STOP_TIMEOUT:?} and was killed; the end of its log:\n{}",
            log_tail(&self.log)
        )
    }
}

impl Drop for ChorusServer {
    fn drop(&mut self) {
        let _ = self.stop_inner();
    }
}

/// The last lines of a server log, for an error message (the log goes with its run's
/// temporary directory).
fn log_tail(path: &Path) -> String {
    const LINES: usize = 20;
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LINES)..].join("\n")
}

/// The data directory inside a run's work directory.
pub fn data_dir(work_dir: &Path) -> PathBuf {
    work_dir.join("data")
}

/// The release `chorus` binary: the one in the release directory this executable runs
/// from (`target/release`, or `target/release/deps` for a benchmark), whatever target
/// directory that is (`CARGO_TARGET_DIR`, where `build_server` builds too); else this
/// workspace's `target/release`. A debug build of the harness still runs the release
/// server.
pub fn default_binary() -> PathBuf {
    let exe = std::env::current_exe().ok();
    let release = exe.as_deref().and_then(Path::parent).and_then(|dir| {
        let dir = if dir.ends_with("deps") {
            dir.parent()?
        } else {
            dir
        };
        dir.ends_with("release").then(|| dir.to_owned())
    });
    match release {
        Some(dir) => dir.join("chorus"),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/chorus"),
    }
}

type Stdout = BufReader<ChildStdout>;

/// The first line of `reader`, with the reader back, or `None` at end of file or timeout.
fn read_line_within(mut reader: Stdout, timeout: Duration) -> Option<(Stdout, String)> {
    // The read blocks; a helper thread does it so that a hung start fails the run instead
    // of hanging it. On a timeout the thread is left blocked until the child is killed.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let got = reader.read_line(&mut line).ok().filter(|n| *n > 0);
        let _ = tx.send(got.map(|_| (reader, line)));
    });
    rx.recv_timeout(timeout).ok().flatten()
}

/// The HTTP address and the QUIC address (`None` when disabled) in a
/// `listening http=ADDR quic=ADDR` line.
fn parse_listening(line: &str) -> Option<(SocketAddr, Option<SocketAddr>)> {
    let field = |name: &str| line.split_whitespace().find_map(|w| w.strip_prefix(name));
    let http = field("http=")?.parse().ok()?;
    Some((http, field("quic=").and_then(|a| a.parse().ok())))
}

/// How often [`search_ready`] asks.
const SEARCH_POLL_EVERY: Duration = Duration::from_millis(100);

/// Waits until the server at `root` (`http://host:port`) says in its `/metrics` that its
/// search index is `ready`: caught up with the logs. A server started on a seeded data
/// directory indexes all of it first, on the cores the figures are measured on.
pub async fn search_ready(
    client: &reqwest::Client,
    root: &str,
    give_up: Duration,
) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    loop {
        let text = client
            .get(format!("{root}/metrics"))
            .send()
            .await?
            .text()
            .await?;
        if text
            .lines()
            .any(|l| l == "chorus_search_index_state{state=\"ready\"} 1")
        {
            return Ok(());
        }
        anyhow::ensure!(
            started.elapsed() < give_up,
            "the search index was not ready within {give_up:?}"
        );
        tokio::time::sleep(SEARCH_POLL_EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The addresses come from the `http=` and `quic=` words of the server's first line.
    #[test]
    fn listening_line() {
        assert_eq!(
            parse_listening("listening http=127.0.0.1:4321 quic=disabled\n"),
            Some(("127.0.0.1:4321".parse().unwrap(), None))
        );
        assert_eq!(
            parse_listening("listening http=127.0.0.1:1 quic=127.0.0.1:2\n"),
            Some((
                "127.0.0.1:1".parse().unwrap(),
                Some("127.0.0.1:2".parse().unwrap())
            ))
        );
        assert_eq!(parse_listening("starting up"), None);
    }

    // The config names exactly the keys the server knows, so it is not refused.
    #[test]
    fn settings_toml_is_accepted_by_the_server_config() {
        let text = ServerSettings::default().toml();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).unwrap();
        let config = chorus_gateway::config::load_file(&path).unwrap();
        config.validate().unwrap();
        assert_eq!(config.connections_max, 19_800);
        let with_push = ServerSettings {
            push_gateway_url: Some("http://127.0.0.1:9/_matrix/push/v1/notify".into()),
            ..ServerSettings::default()
        };
        std::fs::write(&path, with_push.toml()).unwrap();
        let config = chorus_gateway::config::load_file(&path).unwrap();
        config.validate().unwrap();
        assert_eq!(
            config.push_gateway_url,
            "http://127.0.0.1:9/_matrix/push/v1/notify"
        );
    }
}
