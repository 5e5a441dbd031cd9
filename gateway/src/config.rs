//! The server's settings: every knob of `chorus serve`, its default, and where its value
//! comes from.
//!
//! A setting is taken from the first place that names it: a command-line flag or its
//! environment variable (clap resolves those two, flag first), then the TOML file given with
//! `--config`, then the built-in default. The file holds the same keys as [`Config`] and a
//! key the server does not know is refused, so that a typo cannot silently leave a limit at
//! its default. The merged result is checked once, here, so the rest of the gateway can rely
//! on every limit being usable.

use chorus_engine::domain::meta::PARTITION_BITS;
use clap::{Args, Parser, Subcommand};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Where data lives unless told otherwise.
pub const DATA_DIR_DEFAULT: &str = "./chorus-data";
/// HTTP and WebSocket listen address unless told otherwise.
pub const HTTP_DEFAULT: &str = "127.0.0.1:8080";
/// QUIC (UDP) listen address unless told otherwise.
pub const QUIC_DEFAULT: &str = "127.0.0.1:8443";
/// Channel partitions of a new data directory.
pub const PARTITIONS_DEFAULT: u32 = 16;
/// Seconds between heartbeats the server announces in `hello`.
pub const HEARTBEAT_INTERVAL_S_DEFAULT: u64 = 30;
/// Largest HTTP request body. A 1 MiB message text escapes to at most ~6 MiB of JSON
/// (`\u00XX` for control bytes), so 8 MiB admits any valid message with room for the rest.
pub const REQUEST_BODY_BYTES_MAX_DEFAULT: usize = 8 * 1024 * 1024;
/// Largest WebSocket frame, sized like the HTTP body for the same reason.
pub const WS_FRAME_BYTES_MAX_DEFAULT: usize = 8 * 1024 * 1024;
/// Frames queued for one WebSocket subscriber before it is cut off as a slow consumer.
pub const WS_OUTBOUND_FRAMES_MAX_DEFAULT: usize = 4096;
/// Open connections across all shards.
pub const CONNECTIONS_MAX_DEFAULT: usize = 16_000;
/// Sustained requests plus frames per user per second.
pub const RATE_PER_S_DEFAULT: f64 = 50.0;
/// Requests plus frames a user may send at once after being idle.
pub const RATE_BURST_DEFAULT: f64 = 200.0;
/// Typing notices per user per channel per second.
pub const TYPING_PER_S_DEFAULT: f64 = 1.0;
/// Lifetime of an issued token: seven days.
pub const TOKEN_TTL_S_DEFAULT: u64 = 7 * 24 * 60 * 60;
/// Sign-ups one source address may make at once.
pub const SIGNUP_PER_IP_BURST_DEFAULT: f64 = 10.0;
/// Sign-ups one source address may make per hour, sustained.
pub const SIGNUP_PER_IP_PER_HOUR_DEFAULT: f64 = 30.0;
/// Failed logins one source address may make at once, whatever the accounts.
pub const LOGIN_FAILURES_PER_IP_BURST_DEFAULT: f64 = 30.0;
/// Failed logins one source address may make per hour, sustained.
pub const LOGIN_FAILURES_PER_IP_PER_HOUR_DEFAULT: f64 = 300.0;
/// Failed logins on one account from one source address at once.
pub const LOGIN_FAILURES_PER_ACCOUNT_IP_BURST_DEFAULT: f64 = 10.0;
/// Failed logins on one account from one source address per hour, sustained.
pub const LOGIN_FAILURES_PER_ACCOUNT_IP_PER_HOUR_DEFAULT: f64 = 60.0;
/// Failed logins on one account from all addresses at once: the global ceiling.
pub const LOGIN_FAILURES_PER_ACCOUNT_BURST_DEFAULT: f64 = 100.0;
/// Failed logins on one account from all addresses per hour, sustained.
pub const LOGIN_FAILURES_PER_ACCOUNT_PER_HOUR_DEFAULT: f64 = 600.0;
/// Seconds a client has to send a whole HTTP request head (or WebSocket upgrade request).
pub const HTTP_HEADER_TIMEOUT_S_DEFAULT: u64 = 10;
/// Seconds an HTTP keep-alive connection may sit idle between requests.
pub const HTTP_IDLE_TIMEOUT_S_DEFAULT: u64 = 60;
/// Open connections from one source address across all shards.
pub const CONNECTIONS_PER_IP_MAX_DEFAULT: usize = 1_000;
/// Seconds a user's presence stays as it was after their last connection went, before it
/// becomes `offline` (`API.md` §10).
pub const PRESENCE_OFFLINE_GRACE_S_DEFAULT: u64 = 30;
/// Milliseconds of a connection's presence window: at most one `presence` frame per window.
pub const PRESENCE_FLUSH_MS_DEFAULT: u64 = 250;
/// Largest uploaded file in bytes (`API.md` §11).
pub const FILE_BYTES_MAX_DEFAULT: u64 = 100 << 20;
/// Default `file_sweep_interval_s`: an hour.
pub const FILE_SWEEP_INTERVAL_S_DEFAULT: u64 = 3_600;
/// Default `file_sweep_min_age_s`: an hour.
pub const FILE_SWEEP_MIN_AGE_S_DEFAULT: u64 = 3_600;
/// Seconds a signed file link works.
pub const FILE_URL_TTL_S_DEFAULT: u64 = 300;
/// Milliseconds a preview worker may run (wall clock) before it is killed.
pub const PREVIEW_TIMEOUT_MS_DEFAULT: u64 = 60_000;
/// Seconds of CPU a preview worker may use (RLIMIT_CPU).
pub const PREVIEW_CPU_S_DEFAULT: u64 = 30;
/// Address space of a preview worker in bytes (RLIMIT_AS).
pub const PREVIEW_MEMORY_BYTES_MAX_DEFAULT: u64 = 2 << 30;
/// Preview workers running at once.
pub const PREVIEW_WORKERS_DEFAULT: usize = 2;
/// Name of the JWT secret file inside the data directory.
pub const JWT_SECRET_FILE_NAME: &str = "jwt.key";

/// Most shards a server may run. Far above any core count we expect, low enough that a
/// mistyped value fails at start instead of spawning threads until memory runs out.
pub const SHARDS_MAX: usize = 1024;
/// Most partitions: a channel ID holds its partition in `PARTITION_BITS` bits.
pub const PARTITIONS_MAX: u32 = 1 << PARTITION_BITS;

/// Every setting of the server, each with a default.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Directory of the logs, blobs, the JWT secret and the QUIC certificate.
    pub data_dir: PathBuf,
    /// HTTP and WebSocket listen address; port 0 picks a free port.
    pub http: SocketAddr,
    /// QUIC (UDP) listen address; port 0 picks a free port.
    pub quic: SocketAddr,
    /// Shards (threads); 0 means one per core.
    pub shards: usize,
    /// Channel partitions. Fixed for the life of a data directory.
    pub partitions: u32,
    /// Seconds between heartbeats, announced to clients in `hello`.
    pub heartbeat_interval_s: u64,
    /// Largest HTTP request body in bytes; a larger one is answered 413.
    pub request_body_bytes_max: usize,
    /// Largest WebSocket frame in bytes.
    pub ws_frame_bytes_max: usize,
    /// Frames queued for one subscriber before it is disconnected as too slow.
    pub ws_outbound_frames_max: usize,
    /// Open connections across all shards; more are refused.
    pub connections_max: usize,
    /// Sustained requests plus frames per user per second.
    pub rate_per_s: f64,
    /// Requests plus frames a user may send at once after being idle.
    pub rate_burst: f64,
    /// Typing notices per user per channel per second; extra ones are dropped.
    pub typing_per_s: f64,
    /// Lifetime of an issued token in seconds.
    pub token_ttl_s: u64,
    /// File holding the JWT signing secret; `None` means `<data_dir>/jwt.key`.
    pub jwt_secret_file: Option<PathBuf>,
    /// Sign-ups one source address may make at once.
    pub signup_per_ip_burst: f64,
    /// Sign-ups one source address may make per hour, sustained.
    pub signup_per_ip_per_hour: f64,
    /// Failed logins one source address may make at once, over all accounts.
    pub login_failures_per_ip_burst: f64,
    /// Failed logins one source address may make per hour, sustained.
    pub login_failures_per_ip_per_hour: f64,
    /// Failed logins on one account from one source address at once.
    pub login_failures_per_account_ip_burst: f64,
    /// Failed logins on one account from one source address per hour, sustained.
    pub login_failures_per_account_ip_per_hour: f64,
    /// Failed logins on one account from every address together at once.
    pub login_failures_per_account_burst: f64,
    /// Failed logins on one account from every address together per hour, sustained.
    pub login_failures_per_account_per_hour: f64,
    /// Seconds a client has to send a whole request head; slower connections are dropped.
    pub http_header_timeout_s: u64,
    /// Seconds an HTTP keep-alive connection may sit idle between requests.
    pub http_idle_timeout_s: u64,
    /// Open connections from one source address across all shards; more are refused.
    pub connections_per_ip_max: usize,
    /// PEM certificate chain of the QUIC endpoint; with `quic_key_file`. Without them a
    /// self-signed certificate is generated into the data directory and reused.
    pub quic_cert_file: Option<PathBuf>,
    /// PEM private key of `quic_cert_file`.
    pub quic_key_file: Option<PathBuf>,
    /// Seconds a user stays as they were after their last connection went (0: offline at
    /// once).
    pub presence_offline_grace_s: u64,
    /// Milliseconds of a connection's presence window: at most one `presence` frame per
    /// window, holding each changed user's latest status.
    pub presence_flush_ms: u64,
    /// Largest uploaded file in bytes; a larger upload is answered 413 and leaves nothing.
    pub file_bytes_max: u64,
    /// Seconds a signed file link works.
    pub file_url_ttl_s: u64,
    /// Seconds between sweeps of the file store on the local disk, which remove bytes no
    /// live file has (a deletion taken by another node of a cluster, an upload whose
    /// record never came).
    pub file_sweep_interval_s: u64,
    /// Seconds stored bytes must have been left alone before a sweep may remove them: an
    /// upload's record is committed within that time of its bytes.
    pub file_sweep_min_age_s: u64,
    /// Milliseconds a preview worker may run before it is killed (and the file gets no
    /// preview).
    pub preview_timeout_ms: u64,
    /// Seconds of CPU a preview worker may use.
    pub preview_cpu_s: u64,
    /// Address space of a preview worker, bytes.
    pub preview_memory_bytes_max: u64,
    /// Preview workers running at once (each a child process making one preview).
    pub preview_workers: usize,
    /// Where uploaded files' bytes live: `"disk"` (under the data directory) or
    /// `"s3://BUCKET"` (with the `s3_*` keys).
    pub blob_store: String,
    /// The S3 endpoint URL; empty for AWS.
    pub s3_endpoint: String,
    /// The S3 region.
    pub s3_region: String,
    /// The S3 access key ID; empty to take it from the environment.
    pub s3_access_key_id: String,
    /// The S3 secret access key; empty to take it from the environment.
    pub s3_secret_access_key: String,
    /// Whether the S3 endpoint may be plain HTTP.
    pub s3_allow_http: bool,
    /// The full URL of the push gateway's notify endpoint (`API.md` §13), for example
    /// `http://127.0.0.1:5000/_matrix/push/v1/notify`; empty: no pushes, and no decider.
    pub push_gateway_url: String,
    /// The SMTP server email digests go through (`API.md` §13), for example
    /// `smtp://127.0.0.1:2525`, or `smtps://USER:PASSWORD@HOST` for TLS from the start
    /// (`smtp://…?tls=required` for STARTTLS); empty: no email, and with no push gateway,
    /// no decider.
    pub smtp_url: String,
    /// The digests' sender, for example `Chorus <chorus@example.com>`; required with
    /// `smtp_url`.
    pub email_from: String,
    /// The server's public base URL, under which digests link to each message; required
    /// with `smtp_url`.
    pub public_url: String,
    /// This node's id in `cluster` (`API.md` §15); 0 without a cluster.
    pub node_id: u64,
    /// Every node of the cluster and its address between nodes,
    /// `1=HOST:PORT,2=HOST:PORT,…` (shard `s` of a node listens on that port plus `s`);
    /// empty: a single node.
    pub cluster: String,
    /// For fault tests of a cluster: a file this node reads every 100 ms, each line
    /// `cut N` cutting it off from node N both ways (nothing it sends arrives, nothing
    /// from N is taken), and a line `fsync fails` making every fsync of its data
    /// directory fail (the node then stops, exit code 74), until the line is gone.
    /// Unset: none.
    pub cluster_fault_file: Option<PathBuf>,
    /// This node joins a running cluster: its groups start with no members and wait to be
    /// added (`PUT /api/v1/cluster/members` on a node of the cluster). Without it, a
    /// node's first start makes it one of the nodes that begin the cluster: every node
    /// of `cluster`.
    pub cluster_join: bool,
    /// A file holding the key that `PUT /api/v1/cluster/members` must carry (every node
    /// the same file). Unset: the cluster's members cannot be changed.
    pub cluster_admin_key_file: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            data_dir: PathBuf::from(DATA_DIR_DEFAULT),
            http: HTTP_DEFAULT.parse().expect("default HTTP address parses"),
            quic: QUIC_DEFAULT.parse().expect("default QUIC address parses"),
            shards: 0,
            partitions: PARTITIONS_DEFAULT,
            heartbeat_interval_s: HEARTBEAT_INTERVAL_S_DEFAULT,
            presence_offline_grace_s: PRESENCE_OFFLINE_GRACE_S_DEFAULT,
            presence_flush_ms: PRESENCE_FLUSH_MS_DEFAULT,
            request_body_bytes_max: REQUEST_BODY_BYTES_MAX_DEFAULT,
            ws_frame_bytes_max: WS_FRAME_BYTES_MAX_DEFAULT,
            ws_outbound_frames_max: WS_OUTBOUND_FRAMES_MAX_DEFAULT,
            connections_max: CONNECTIONS_MAX_DEFAULT,
            rate_per_s: RATE_PER_S_DEFAULT,
            rate_burst: RATE_BURST_DEFAULT,
            typing_per_s: TYPING_PER_S_DEFAULT,
            token_ttl_s: TOKEN_TTL_S_DEFAULT,
            jwt_secret_file: None,
            signup_per_ip_burst: SIGNUP_PER_IP_BURST_DEFAULT,
            signup_per_ip_per_hour: SIGNUP_PER_IP_PER_HOUR_DEFAULT,
            login_failures_per_ip_burst: LOGIN_FAILURES_PER_IP_BURST_DEFAULT,
            login_failures_per_ip_per_hour: LOGIN_FAILURES_PER_IP_PER_HOUR_DEFAULT,
            login_failures_per_account_ip_burst: LOGIN_FAILURES_PER_ACCOUNT_IP_BURST_DEFAULT,
            login_failures_per_account_ip_per_hour: LOGIN_FAILURES_PER_ACCOUNT_IP_PER_HOUR_DEFAULT,
            login_failures_per_account_burst: LOGIN_FAILURES_PER_ACCOUNT_BURST_DEFAULT,
            login_failures_per_account_per_hour: LOGIN_FAILURES_PER_ACCOUNT_PER_HOUR_DEFAULT,
            http_header_timeout_s: HTTP_HEADER_TIMEOUT_S_DEFAULT,
            http_idle_timeout_s: HTTP_IDLE_TIMEOUT_S_DEFAULT,
            connections_per_ip_max: CONNECTIONS_PER_IP_MAX_DEFAULT,
            quic_cert_file: None,
            quic_key_file: None,
            file_bytes_max: FILE_BYTES_MAX_DEFAULT,
            file_url_ttl_s: FILE_URL_TTL_S_DEFAULT,
            file_sweep_interval_s: FILE_SWEEP_INTERVAL_S_DEFAULT,
            file_sweep_min_age_s: FILE_SWEEP_MIN_AGE_S_DEFAULT,
            preview_timeout_ms: PREVIEW_TIMEOUT_MS_DEFAULT,
            preview_cpu_s: PREVIEW_CPU_S_DEFAULT,
            preview_memory_bytes_max: PREVIEW_MEMORY_BYTES_MAX_DEFAULT,
            preview_workers: PREVIEW_WORKERS_DEFAULT,
            blob_store: "disk".into(),
            s3_endpoint: String::new(),
            s3_region: "us-east-1".into(),
            s3_access_key_id: String::new(),
            s3_secret_access_key: String::new(),
            s3_allow_http: false,
            push_gateway_url: String::new(),
            smtp_url: String::new(),
            email_from: String::new(),
            public_url: String::new(),
            node_id: 0,
            cluster: String::new(),
            cluster_fault_file: None,
            cluster_join: false,
            cluster_admin_key_file: None,
        }
    }
}

impl Config {
    /// The JWT secret file: the configured one, or `jwt.key` in the data directory.
    pub fn jwt_secret_path(&self) -> PathBuf {
        match &self.jwt_secret_file {
            Some(path) => path.clone(),
            None => self.data_dir.join(JWT_SECRET_FILE_NAME),
        }
    }

    /// The S3 bucket files go to, when `blob_store` names one.
    pub fn s3_config(&self) -> Option<crate::files::store::S3Config> {
        let bucket = self.blob_store.strip_prefix("s3://")?;
        let set = |v: &str| Some(v.to_owned()).filter(|v| !v.is_empty());
        Some(crate::files::store::S3Config {
            bucket: bucket.trim_end_matches('/').to_owned(),
            endpoint: set(&self.s3_endpoint),
            region: self.s3_region.clone(),
            access_key_id: set(&self.s3_access_key_id),
            secret_access_key: set(&self.s3_secret_access_key),
            allow_http: self.s3_allow_http,
        })
    }

    /// The cluster's nodes by id, with their addresses between nodes; `None` for a single
    /// node. An unusable list is an error naming what is wrong.
    pub fn cluster_nodes(
        &self,
    ) -> Result<Option<std::collections::BTreeMap<u64, SocketAddr>>, String> {
        if self.cluster.trim().is_empty() {
            return Ok(None);
        }
        let mut nodes = std::collections::BTreeMap::new();
        for item in self.cluster.split(',').map(str::trim) {
            let (id, addr) = item
                .split_once('=')
                .ok_or_else(|| format!("{item:?} is not ID=HOST:PORT"))?;
            let id: u64 = id
                .trim()
                .parse()
                .ok()
                .filter(|id| *id > 0)
                .ok_or_else(|| format!("{id:?} is not a node id (a positive integer)"))?;
            let addr = std::net::ToSocketAddrs::to_socket_addrs(addr.trim())
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| format!("{addr:?} is not HOST:PORT"))?;
            if nodes.insert(id, addr).is_some() {
                return Err(format!("node {id} is listed twice"));
            }
        }
        Ok(Some(nodes))
    }

    /// The number of shards to run: `shards`, or one per core when it is 0.
    pub fn shard_count(&self) -> usize {
        match self.shards {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }

    /// Checks that every value is usable, naming the first one that is not.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.shards > SHARDS_MAX {
            return Err(invalid("shards", format!("at most {SHARDS_MAX}")));
        }
        if self.quic_cert_file.is_some() != self.quic_key_file.is_some() {
            return Err(invalid(
                "quic_cert_file",
                "quic_cert_file and quic_key_file go together".into(),
            ));
        }
        let bucket = self.blob_store.strip_prefix("s3://");
        if self.blob_store != "disk" && bucket.is_none_or(|b| b.trim_end_matches('/').is_empty()) {
            return Err(invalid("blob_store", "\"disk\" or \"s3://BUCKET\"".into()));
        }
        let url = &self.push_gateway_url;
        if !(url.is_empty() || url.starts_with("http://") || url.starts_with("https://")) {
            return Err(invalid(
                "push_gateway_url",
                "an http:// or https:// URL, or empty".into(),
            ));
        }
        self.validate_email()?;
        self.validate_cluster()?;
        if self.partitions == 0 || self.partitions > PARTITIONS_MAX {
            return Err(invalid("partitions", format!("1 to {PARTITIONS_MAX}")));
        }
        let positive = [
            ("heartbeat_interval_s", self.heartbeat_interval_s == 0),
            ("request_body_bytes_max", self.request_body_bytes_max == 0),
            ("ws_frame_bytes_max", self.ws_frame_bytes_max == 0),
            ("ws_outbound_frames_max", self.ws_outbound_frames_max == 0),
            ("connections_max", self.connections_max == 0),
            ("token_ttl_s", self.token_ttl_s == 0),
            ("http_header_timeout_s", self.http_header_timeout_s == 0),
            ("http_idle_timeout_s", self.http_idle_timeout_s == 0),
            ("connections_per_ip_max", self.connections_per_ip_max == 0),
            ("presence_flush_ms", self.presence_flush_ms == 0),
            ("file_bytes_max", self.file_bytes_max == 0),
            ("file_url_ttl_s", self.file_url_ttl_s == 0),
            ("file_sweep_interval_s", self.file_sweep_interval_s == 0),
            ("file_sweep_min_age_s", self.file_sweep_min_age_s == 0),
            ("preview_timeout_ms", self.preview_timeout_ms == 0),
            ("preview_cpu_s", self.preview_cpu_s == 0),
            (
                "preview_memory_bytes_max",
                self.preview_memory_bytes_max == 0,
            ),
            ("preview_workers", self.preview_workers == 0),
        ];
        if let Some((key, _)) = positive.iter().find(|(_, zero)| *zero) {
            return Err(invalid(key, "must be positive".into()));
        }
        for (key, rate) in [
            ("rate_per_s", self.rate_per_s),
            ("typing_per_s", self.typing_per_s),
            ("signup_per_ip_per_hour", self.signup_per_ip_per_hour),
            (
                "login_failures_per_ip_per_hour",
                self.login_failures_per_ip_per_hour,
            ),
            (
                "login_failures_per_account_ip_per_hour",
                self.login_failures_per_account_ip_per_hour,
            ),
            (
                "login_failures_per_account_per_hour",
                self.login_failures_per_account_per_hour,
            ),
        ] {
            if !(rate.is_finite() && rate > 0.0) {
                return Err(invalid(key, "must be a positive number".into()));
            }
        }
        // A burst below one token would refuse every request forever.
        for (key, burst) in [
            ("rate_burst", self.rate_burst),
            ("signup_per_ip_burst", self.signup_per_ip_burst),
            (
                "login_failures_per_ip_burst",
                self.login_failures_per_ip_burst,
            ),
            (
                "login_failures_per_account_ip_burst",
                self.login_failures_per_account_ip_burst,
            ),
            (
                "login_failures_per_account_burst",
                self.login_failures_per_account_burst,
            ),
        ] {
            if !(burst.is_finite() && burst >= 1.0) {
                return Err(invalid(key, "must be at least 1".into()));
            }
        }
        Ok(())
    }
}

impl Config {
    /// Checks the cluster keys: none, or this node among at most the most nodes.
    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let nodes = self.cluster_nodes().map_err(|m| invalid("cluster", m))?;
        match nodes {
            None if self.node_id != 0 => Err(invalid("node_id", "only with cluster".into())),
            None if self.cluster_join => Err(invalid("cluster_join", "only with cluster".into())),
            None => Ok(()),
            Some(nodes) if !nodes.contains_key(&self.node_id) => Err(invalid(
                "node_id",
                format!(
                    "one of the cluster's nodes ({:?})",
                    nodes.keys().collect::<Vec<_>>()
                ),
            )),
            Some(nodes) if nodes.len() > CLUSTER_NODES_MAX => Err(invalid(
                "cluster",
                format!("at most {CLUSTER_NODES_MAX} nodes"),
            )),
            Some(_) => Ok(()),
        }
    }

    fn validate_email(&self) -> Result<(), ConfigError> {
        if self.smtp_url.is_empty() {
            return Ok(());
        }
        if !(self.smtp_url.starts_with("smtp://") || self.smtp_url.starts_with("smtps://")) {
            return Err(invalid(
                "smtp_url",
                "an smtp:// or smtps:// URL, or empty".into(),
            ));
        }
        if self.email_from.is_empty() {
            return Err(invalid(
                "email_from",
                "an address, required with smtp_url".into(),
            ));
        }
        let url = &self.public_url;
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(invalid(
                "public_url",
                "an http:// or https:// URL, required with smtp_url".into(),
            ));
        }
        Ok(())
    }
}

fn invalid(key: &'static str, reason: String) -> ConfigError {
    ConfigError::Invalid { key, reason }
}

/// Why a configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file named with `--config`.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The config file is not valid TOML, has an unknown key, or a value of the wrong type.
    #[error("bad config file {}: {message}", path.display())]
    Parse {
        /// The file named with `--config`.
        path: PathBuf,
        /// The parser's description, with line and column.
        message: String,
    },
    /// A setting has a value the server cannot run with.
    #[error("invalid setting {key}: {reason}")]
    Invalid {
        /// The setting's key, as spelled in the config file.
        key: &'static str,
        /// What values are accepted.
        reason: String,
    },
}

/// The `chorus` command line.
#[derive(Debug, Parser)]
#[command(name = "chorus", version, about = "The Chorus chat server")]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands of `chorus`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a complete single-node server.
    Serve(ServeArgs),
    /// Make one file preview under resource limits (started by the server, not by hand).
    PreviewWorker(PreviewWorkerArgs),
}

/// Flags of `chorus preview-worker`.
#[derive(Debug, Args)]
pub struct PreviewWorkerArgs {
    /// The preview kind: thumb, page1 or code.
    #[arg(long)]
    pub kind: String,
    /// The file to preview.
    #[arg(long)]
    pub input: PathBuf,
    /// Where to write the preview.
    #[arg(long)]
    pub output: PathBuf,
    /// The file's name, for choosing a syntax.
    #[arg(long, default_value = "")]
    pub name: String,
    /// RLIMIT_AS of the worker, bytes.
    #[arg(long)]
    pub memory_bytes: u64,
    /// RLIMIT_CPU of the worker, seconds.
    #[arg(long)]
    pub cpu_s: u64,
}

/// Flags of `chorus serve`. Each is optional so that an absent flag falls through to the
/// config file and then to the default.
#[derive(Debug, Default, Args)]
pub struct ServeArgs {
    /// Data directory [default: ./chorus-data]
    #[arg(long, env = "CHORUS_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// HTTP and WebSocket listen address; port 0 picks a free port [default: 127.0.0.1:8080]
    #[arg(long, env = "CHORUS_HTTP", value_name = "ADDR")]
    pub http: Option<SocketAddr>,
    /// QUIC (UDP) listen address; port 0 picks a free port [default: 127.0.0.1:8443]
    #[arg(long, env = "CHORUS_QUIC", value_name = "ADDR")]
    pub quic: Option<SocketAddr>,
    /// Shards (threads) [default: one per core]
    #[arg(long, env = "CHORUS_SHARDS", value_name = "N")]
    pub shards: Option<usize>,
    /// TOML file holding any of the settings, with the same keys
    #[arg(long, env = "CHORUS_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// This node's id in --cluster
    #[arg(long, env = "CHORUS_NODE_ID", value_name = "N")]
    pub node_id: Option<u64>,
    /// The cluster's nodes: 1=HOST:PORT,2=HOST:PORT,… [default: none, a single node]
    #[arg(long, env = "CHORUS_CLUSTER", value_name = "NODES")]
    pub cluster: Option<String>,
    /// Join a running cluster (its members then add this node) instead of beginning one
    #[arg(long, env = "CHORUS_CLUSTER_JOIN")]
    pub join: bool,
}

impl ServeArgs {
    /// Builds the configuration: flags and environment over the config file over defaults,
    /// then checks it.
    pub fn resolve(self) -> Result<Config, ConfigError> {
        let mut config = match &self.config {
            Some(path) => load_file(path)?,
            None => Config::default(),
        };
        if let Some(data_dir) = self.data_dir {
            config.data_dir = data_dir;
        }
        if let Some(http) = self.http {
            config.http = http;
        }
        if let Some(quic) = self.quic {
            config.quic = quic;
        }
        if let Some(shards) = self.shards {
            config.shards = shards;
        }
        if let Some(node_id) = self.node_id {
            config.node_id = node_id;
        }
        if let Some(cluster) = self.cluster {
            config.cluster = cluster;
        }
        if self.join {
            config.cluster_join = true;
        }
        config.validate()?;
        Ok(config)
    }
}

/// Reads a TOML config file; keys it leaves out keep their defaults.
pub fn load_file(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_toml(&text).map_err(|message| ConfigError::Parse {
        path: path.to_owned(),
        message,
    })
}

/// Most nodes of a cluster. Every node holds every partition (three vote, the rest learn),
/// so each committed event crosses the network once per node: past a few dozen nodes that
/// is the cost to watch, and each shard keeps a connection to every other node.
pub(crate) const CLUSTER_NODES_MAX: usize = 16;

fn parse_toml(text: &str) -> Result<Config, String> {
    toml::from_str(text).map_err(|e: toml::de::Error| e.to_string().trim_end().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn write_config(text: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        file
    }

    fn serve_args(argv: &[&str]) -> ServeArgs {
        let argv = ["chorus", "serve"].iter().chain(argv);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Serve(args) => args,
            Command::PreviewWorker(_) => unreachable!("parsed `chorus serve`"),
        }
    }

    #[test]
    fn defaults_match_the_documented_values() {
        // Proves `chorus serve` with nothing given runs with the contract's defaults.
        let config = ServeArgs::default().resolve().unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.data_dir, PathBuf::from("./chorus-data"));
        assert_eq!(config.http.to_string(), "127.0.0.1:8080");
        assert_eq!(config.quic.to_string(), "127.0.0.1:8443");
        assert_eq!(config.shards, 0);
        assert_eq!(config.partitions, 16);
        assert_eq!(config.request_body_bytes_max, 8 << 20);
        assert_eq!(config.token_ttl_s, 604_800);
        assert_eq!(
            config.jwt_secret_path(),
            PathBuf::from("./chorus-data/jwt.key")
        );
        assert!(config.shard_count() >= 1);
    }

    #[test]
    fn flags_beat_the_file_and_the_file_beats_defaults() {
        // Proves the precedence flag > config file > default, key by key.
        let file = write_config(
            "data_dir = \"/from/file\"\nhttp = \"0.0.0.0:9000\"\nshards = 3\n\
             rate_per_s = 5.5\njwt_secret_file = \"/secrets/jwt\"\n",
        );
        let path = file.path().to_str().unwrap();
        let config = serve_args(&["--config", path, "--http", "127.0.0.1:0", "--shards", "2"])
            .resolve()
            .unwrap();
        assert_eq!(config.http.to_string(), "127.0.0.1:0", "flag over file");
        assert_eq!(config.shards, 2, "flag over file");
        assert_eq!(
            config.data_dir,
            PathBuf::from("/from/file"),
            "file over default"
        );
        assert_eq!(config.rate_per_s, 5.5, "file over default");
        assert_eq!(config.jwt_secret_path(), PathBuf::from("/secrets/jwt"));
        assert_eq!(
            config.quic.to_string(),
            QUIC_DEFAULT,
            "default when unnamed"
        );
        assert_eq!(
            config.partitions, PARTITIONS_DEFAULT,
            "default when unnamed"
        );
    }

    #[test]
    fn every_flag_has_its_environment_variable() {
        // Proves the flags are wired to the contract's variables; clap itself puts a flag
        // before its variable, so checking the wiring avoids racy process-wide env changes.
        let cli = Cli::command();
        let serve = cli.find_subcommand("serve").unwrap();
        let env_of = |id: &str| {
            let arg = serve.get_arguments().find(|a| a.get_id() == id).unwrap();
            arg.get_env().map(|e| e.to_str().unwrap().to_owned())
        };
        assert_eq!(env_of("data_dir").as_deref(), Some("CHORUS_DATA_DIR"));
        assert_eq!(env_of("http").as_deref(), Some("CHORUS_HTTP"));
        assert_eq!(env_of("quic").as_deref(), Some("CHORUS_QUIC"));
        assert_eq!(env_of("shards").as_deref(), Some("CHORUS_SHARDS"));
        assert_eq!(env_of("config").as_deref(), Some("CHORUS_CONFIG"));
        assert_eq!(env_of("node_id").as_deref(), Some("CHORUS_NODE_ID"));
        assert_eq!(env_of("cluster").as_deref(), Some("CHORUS_CLUSTER"));
        cli.debug_assert();
    }

    #[test]
    fn unknown_key_in_file_is_refused() {
        // Proves a misspelled setting is an error rather than a silently ignored line.
        let file = write_config("rate_per_sec = 10.0\n");
        let args = ServeArgs {
            config: Some(file.path().to_owned()),
            ..ServeArgs::default()
        };
        match args.resolve() {
            Err(ConfigError::Parse { message, .. }) => {
                assert!(message.contains("rate_per_sec"), "{message}")
            }
            other => panic!("expected a parse error, got {other:?}"),
        }
    }

    #[test]
    fn malformed_toml_and_wrong_types_are_parse_errors() {
        // Proves broken syntax and ill-typed values are reported with the parser's message.
        for text in ["shards = ", "http = \"not an address\"", "shards = -1"] {
            let err = parse_toml(text).unwrap_err();
            assert!(err.contains("line 1"), "{text:?}: {err}");
        }
    }

    #[test]
    fn missing_file_is_a_read_error() {
        // Proves an unreadable --config file is reported as such, with its path.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.toml");
        let err = load_file(&path).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
        assert!(err.to_string().contains("absent.toml"));
    }

    #[test]
    fn unusable_values_are_refused() {
        // Proves out-of-range values, from the file or a flag, stop the server at start.
        let list = |n: u64| {
            let nodes: Vec<String> = (1..=n).map(|i| format!("{i}=127.0.0.1:{i}")).collect();
            format!("node_id = 1\ncluster = \"{}\"", nodes.join(","))
        };
        let too_many = list(CLUSTER_NODES_MAX as u64 + 1);
        parse_toml(&list(5)).unwrap().validate().unwrap();
        let cases = [
            ("shards = 1025", "shards"),
            ("partitions = 0", "partitions"),
            ("partitions = 65537", "partitions"),
            ("request_body_bytes_max = 0", "request_body_bytes_max"),
            ("ws_outbound_frames_max = 0", "ws_outbound_frames_max"),
            ("connections_max = 0", "connections_max"),
            ("heartbeat_interval_s = 0", "heartbeat_interval_s"),
            ("token_ttl_s = 0", "token_ttl_s"),
            ("rate_per_s = 0.0", "rate_per_s"),
            ("typing_per_s = nan", "typing_per_s"),
            ("rate_burst = 0.5", "rate_burst"),
            ("signup_per_ip_burst = 0.0", "signup_per_ip_burst"),
            (
                "login_failures_per_ip_per_hour = -1.0",
                "login_failures_per_ip_per_hour",
            ),
            ("http_header_timeout_s = 0", "http_header_timeout_s"),
            ("connections_per_ip_max = 0", "connections_per_ip_max"),
            ("smtp_url = \"mail.example.com\"", "smtp_url"),
            ("smtp_url = \"smtp://127.0.0.1:25\"", "email_from"),
            (
                "smtp_url = \"smtp://h\"\nemail_from = \"a@b.c\"",
                "public_url",
            ),
            (
                "smtp_url = \"smtp://h\"\nemail_from = \"a@b.c\"\npublic_url = \"x\"",
                "public_url",
            ),
            ("node_id = 2", "node_id"),
            ("cluster = \"1=127.0.0.1:7001\"", "node_id"),
            (
                "node_id = 3\ncluster = \"1=127.0.0.1:7001,2=127.0.0.1:7002\"",
                "node_id",
            ),
            (
                "node_id = 1\ncluster = \"1=127.0.0.1:7001,1=127.0.0.1:7002\"",
                "cluster",
            ),
            ("node_id = 1\ncluster = \"1=nowhere\"", "cluster"),
            ("node_id = 1\ncluster = \"0=127.0.0.1:7001\"", "cluster"),
            ("node_id = 1\ncluster = \"127.0.0.1:7001\"", "cluster"),
            (too_many.as_str(), "cluster"),
        ];
        for (text, want) in cases {
            let err = parse_toml(text).unwrap().validate().unwrap_err();
            match err {
                ConfigError::Invalid { key, .. } => assert_eq!(key, want, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        // The email keys together are usable.
        let usable = "smtp_url = \"smtps://u:p@mail.example.com\"\n\
                      email_from = \"Chorus <c@example.com>\"\n\
                      public_url = \"https://chat.example.com\"";
        parse_toml(usable).unwrap().validate().unwrap();
        let cluster =
            parse_toml("node_id = 2\ncluster = \"1=127.0.0.1:7001, 2=127.0.0.1:7003\"").unwrap();
        cluster.validate().unwrap();
        let nodes = cluster.cluster_nodes().unwrap().unwrap();
        assert_eq!(nodes[&2].to_string(), "127.0.0.1:7003");
        let err = serve_args(&["--shards", "5000"]).resolve().unwrap_err();
        assert!(matches!(err, ConfigError::Invalid { key: "shards", .. }));
        assert!(Cli::try_parse_from(["chorus", "serve", "--http", "nowhere"]).is_err());
    }
}
