//! The one harness the gateway's end-to-end tests share: the real `chorus` binary started
//! on free ports in a fresh data directory, REST calls through `ureq`, and WebSocket
//! clients through `tungstenite`, all over real sockets.
//!
//! A test binary uses what it needs of this module, so unused helpers are allowed here.
//! Every wait is bounded: a server that never prints its address, a frame that never
//! arrives or a drain that never ends fails the test instead of hanging it.
#![allow(dead_code)]

pub mod moto;
pub mod push_sink;
pub mod smtp;

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tungstenite::{Message, WebSocket};

/// How long a server may take to print its address.
pub const START_WAIT: Duration = Duration::from_secs(20);
/// How long a drained server may take to exit.
pub const DRAIN_WAIT: Duration = Duration::from_secs(20);
/// How long a restart may retry binding the address a killed server held.
pub const REBIND_WAIT: Duration = Duration::from_secs(10);
/// How long a test waits for a frame it expects before failing.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The password every test account uses.
pub const PASSWORD: &str = "correct horse battery";
/// Settings under which no test reaches a sign-up or login limit: tests that sign up many
/// users from one address and are not about those limits add these.
pub const AUTH_UNLIMITED: &str = "signup_per_ip_burst = 1000000.0\n\
login_failures_per_ip_burst = 1000000.0\nlogin_failures_per_account_burst = 1000000.0\n\
login_failures_per_account_ip_burst = 1000000.0\n";
/// [`AUTH_UNLIMITED`] and no per-user rate limit either.
pub const UNLIMITED: &str = "rate_per_s = 1000000.0\nrate_burst = 1000000.0\n\
signup_per_ip_burst = 1000000.0\n\
login_failures_per_ip_burst = 1000000.0\nlogin_failures_per_account_burst = 1000000.0\n\
login_failures_per_account_ip_burst = 1000000.0\n";

/// A loopback cluster's nodes' settings (`API.md` §15): free cluster addresses for three
/// nodes of the harness's two shards, one JWT secret for all (so a token works on every
/// node), and the settings of each.
pub struct ClusterConfig {
    /// The nodes' addresses between nodes, node `i + 1` at `addrs[i]`.
    pub addrs: Vec<std::net::SocketAddr>,
    jwt: tempfile::TempDir,
}

impl ClusterConfig {
    /// Three nodes' worth.
    pub fn three() -> ClusterConfig {
        ClusterConfig::of(3)
    }

    /// `n` nodes' worth (of two shards each), with one cluster admin key.
    pub fn of(n: usize) -> ClusterConfig {
        let c = ClusterConfig {
            addrs: chorus_replication::engine_env::free_loopback_addrs(n, 2),
            jwt: tempfile::tempdir().expect("tempdir"),
        };
        let key: String = (0..32)
            .map(|_| format!("{:02x}", rand::random::<u8>()))
            .collect();
        std::fs::write(c.admin_key_file(), key).expect("admin key");
        c
    }

    /// Node `id`'s settings, with `extra` settings after them.
    pub fn node(&self, id: usize, extra: &str) -> String {
        let all: Vec<usize> = (1..=self.addrs.len()).collect();
        self.node_in(id, &all, extra)
    }

    /// Starts every node of the cluster, each with `extra` after its settings.
    pub fn start_all(&self, extra: &str) -> Vec<Server> {
        (1..=self.addrs.len())
            .map(|id| Server::start(&self.node(id, extra)))
            .collect()
    }

    /// Node `id`'s settings in a cluster of the nodes `ids` (from 1), with `extra` after.
    pub fn node_in(&self, id: usize, ids: &[usize], extra: &str) -> String {
        let cluster: Vec<String> = ids
            .iter()
            .map(|i| format!("{i}={}", self.addrs[i - 1]))
            .collect();
        format!(
            "node_id = {id}\ncluster = \"{}\"\njwt_secret_file = \"{}\"\n\
             cluster_fault_file = \"{}\"\ncluster_admin_key_file = \"{}\"\n{extra}",
            cluster.join(","),
            self.jwt.path().join("jwt.key").display(),
            self.fault_file(id).display(),
            self.admin_key_file().display()
        )
    }

    /// The cluster admin key's file.
    pub fn admin_key_file(&self) -> std::path::PathBuf {
        self.jwt.path().join("admin.key")
    }

    /// The body of `PUT /api/v1/cluster/members` placing the cluster on nodes `ids`.
    pub fn members_body(&self, ids: &[usize]) -> Value {
        let key = std::fs::read_to_string(self.admin_key_file()).expect("admin key");
        let nodes: serde_json::Map<String, Value> = ids
            .iter()
            .map(|i| (i.to_string(), Value::from(self.addrs[i - 1].to_string())))
            .collect();
        serde_json::json!({"key": key, "nodes": nodes})
    }

    /// Node `id`'s fault file: each line `cut N` cuts it off from node N (both ways).
    pub fn fault_file(&self, id: usize) -> std::path::PathBuf {
        self.jwt.path().join(format!("faults-{id}"))
    }
}

/// A running `chorus serve` on a data directory that outlives restarts; killed on drop.
pub struct Server {
    child: Option<Child>,
    /// `host:port` of the HTTP and WebSocket listener.
    pub addr: String,
    /// `host:port` of the QUIC endpoint (a new port after each restart).
    pub quic_addr: String,
    dir: tempfile::TempDir,
    agent: ureq::Agent,
}

impl Server {
    /// Starts a server with two shards and the given TOML settings over the defaults.
    pub fn start(config: &str) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("chorus.toml"), config).expect("config");
        let (child, addr, quic_addr) =
            spawn(dir.path(), "127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        // No pooled connections: a request never lands on a connection the server has just
        // closed (it may close one after an answer that left a request body unread), which
        // would read as an unexpected EOF and is not what a test asks about.
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(30))
            .max_idle_connections(0)
            .build();
        Server {
            child: Some(child),
            addr,
            quic_addr,
            dir,
            agent,
        }
    }

    /// `http://host:port`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The server process's ID.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// The data directory's parent, which also holds the config and the server's log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's standard error so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// The server's resident memory in KiB, from `/proc`.
    pub fn rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmRSS:")
    }

    /// How many files the server holds open.
    pub fn open_files(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// SIGKILL: no drain, no flush; only what was durable survives.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL");
            child.wait().expect("reap");
        }
    }

    /// Sends a signal (`-STOP`, `-CONT`, ...) to the server.
    pub fn signal(&self, which: &str) {
        let sent = Command::new("kill")
            .args([which, &self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(sent.success(), "kill {which} failed");
    }

    /// SIGTERM, then waits for the drain to end; returns the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(sent.success(), "kill -TERM failed");
        let deadline = Instant::now() + DRAIN_WAIT;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("the server did not finish draining within {DRAIN_WAIT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to `wait` for the server to exit by itself; its status, or `None` if it
    /// still runs (it is then left running).
    pub fn wait_exit(&mut self, wait: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + wait;
        loop {
            let child = self.child.as_mut().expect("running");
            if let Some(status) = child.try_wait().expect("wait") {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the server again on the same data directory and address. Binding may fail
    /// for a moment after a kill; it is retried until [`REBIND_WAIT`].
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "kill or terminate the server first");
        let deadline = Instant::now() + REBIND_WAIT;
        loop {
            match spawn(self.dir.path(), &self.addr) {
                Ok((child, addr, quic_addr)) => {
                    assert_eq!(addr, self.addr, "the restarted server moved");
                    self.child = Some(child);
                    self.quic_addr = quic_addr;
                    return;
                }
                Err(e) if Instant::now() < deadline => {
                    eprintln!("restart: {e}; retrying");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("the server did not come back: {e}"),
            }
        }
    }

    /// Starts the server again on the same data directory and address, once: the error
    /// (with the log's tail) if it does not come up.
    pub fn start_again(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "kill or terminate the server first");
        let (child, _, quic_addr) = spawn(self.dir.path(), &self.addr)?;
        self.child = Some(child);
        self.quic_addr = quic_addr;
        Ok(())
    }

    // -----------------------------------------------------------------------------------
    // REST
    // -----------------------------------------------------------------------------------

    /// Sends a request with a raw body and the given headers.
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Resp {
        let mut req = self
            .agent
            .request(method, &format!("{}{path}", self.base_url()));
        for (k, v) in headers {
            req = req.set(k, v);
        }
        let result = match body {
            Some(b) => req.send_bytes(b),
            None => req.call(),
        };
        let resp = match result {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {path}: {e}"),
        };
        Resp::read(resp, method, path)
    }

    /// Sends a request with a bearer token (if given) and a JSON body (if given).
    pub fn call(&self, method: &str, path: &str, token: Option<&str>, body: Option<Value>) -> Resp {
        let auth = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| vec![("Authorization", a)])
            .unwrap_or_default();
        let bytes = body.map(|b| b.to_string().into_bytes());
        self.raw(method, path, &headers, bytes.as_deref())
    }

    /// A call as `user` that must answer `status`; returns the body.
    #[track_caller]
    pub fn ok(
        &self,
        method: &str,
        path: &str,
        user: &User,
        body: Option<Value>,
        status: u16,
    ) -> Value {
        let r = self.call(method, path, Some(&user.token), body);
        assert_eq!(r.status, status, "{method} {path}: {}", r.text);
        r.body
    }

    /// Signs up `name@example.com`.
    #[track_caller]
    pub fn signup(&self, name: &str) -> User {
        let email = format!("{name}@example.com");
        let body = json!({"email": email, "password": PASSWORD, "name": name});
        let r = self.call("POST", "/api/v1/auth/signup", None, Some(body));
        assert_eq!(r.status, 201, "signup {name}: {}", r.text);
        User {
            id: str_of(&r.body["user"]["id"]),
            email,
            token: str_of(&r.body["token"]),
        }
    }

    /// A workspace owned by `owner` with `members` added; returns its ID.
    #[track_caller]
    pub fn workspace(&self, owner: &User, members: &[&User]) -> String {
        let v = self.ok(
            "POST",
            "/api/v1/workspaces",
            owner,
            Some(json!({"name": "acme"})),
            201,
        );
        let wid = str_of(&v["workspace"]["id"]);
        for m in members {
            let path = format!("/api/v1/workspaces/{wid}/members");
            self.ok("POST", &path, owner, Some(json!({"email": m.email})), 201);
        }
        wid
    }

    /// A public channel created by `owner` with `members` added; returns its ID.
    #[track_caller]
    pub fn channel(&self, wid: &str, owner: &User, name: &str, members: &[&User]) -> String {
        let path = format!("/api/v1/workspaces/{wid}/channels");
        let body = json!({"name": name, "kind": "public"});
        let v = self.ok("POST", &path, owner, Some(body), 201);
        let cid = str_of(&v["channel"]["id"]);
        for m in members {
            let path = format!("/api/v1/channels/{cid}/members");
            self.ok("POST", &path, owner, Some(json!({"user_id": m.id})), 201);
        }
        cid
    }

    /// Posts a message over REST; returns it.
    #[track_caller]
    pub fn post(&self, user: &User, cid: &str, text: &str) -> Value {
        let path = format!("/api/v1/channels/{cid}/messages");
        self.ok("POST", &path, user, Some(json!({"text": text})), 201)["message"].clone()
    }

    /// The channel's messages, oldest first (at most 200).
    #[track_caller]
    pub fn messages(&self, user: &User, cid: &str) -> Vec<Value> {
        let path = format!("/api/v1/channels/{cid}/messages?limit=200");
        let v = self.ok("GET", &path, user, None, 200);
        let mut messages = v["messages"].as_array().expect("messages").clone();
        messages.reverse();
        messages
    }

    /// The last seq of a channel, as `user` sees it.
    #[track_caller]
    pub fn last_seq(&self, user: &User, cid: &str) -> u64 {
        let v = self.ok("GET", &format!("/api/v1/channels/{cid}"), user, None, 200);
        v["channel"]["last_seq"].as_u64().expect("last_seq")
    }

    /// The SHA-256 of the QUIC certificate the server generated, for pinning.
    pub fn quic_pin(&self) -> String {
        let data = self.dir.path().join("data");
        let cert = chorus_gateway::quic::cert::load(
            &data.join(chorus_gateway::quic::cert::CERT_FILE_NAME),
            &data.join(chorus_gateway::quic::cert::KEY_FILE_NAME),
        )
        .expect("the generated QUIC certificate");
        cert.fingerprint()
    }

    /// A counter or gauge from `/metrics`.
    pub fn metric(&self, name: &str) -> f64 {
        let text = self.raw("GET", "/metrics", &[], None).text;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics"))
    }

    // -----------------------------------------------------------------------------------
    // WebSocket
    // -----------------------------------------------------------------------------------

    /// Opens a WebSocket with the token in the query; returns it after reading `hello`.
    #[track_caller]
    pub fn connect(&self, user: &User) -> (Ws, Value) {
        let mut ws = self.connect_raw(&user.token).expect("upgrade");
        let hello = ws.recv();
        assert_eq!(hello["type"], "hello", "{hello}");
        (ws, hello)
    }

    /// Opens a WebSocket with a token; the upgrade's error when it is refused.
    pub fn connect_raw(&self, token: &str) -> Result<Ws, tungstenite::Error> {
        let stream = TcpStream::connect(&self.addr).expect("connect");
        stream
            .set_read_timeout(Some(READ_TIMEOUT))
            .expect("timeout");
        let url = format!("ws://{}/ws/v1/connect?token={token}", self.addr);
        match tungstenite::client(url, stream) {
            Ok((socket, _)) => Ok(Ws {
                socket,
                stash: Default::default(),
            }),
            Err(tungstenite::HandshakeError::Failure(e)) => Err(e),
            Err(tungstenite::HandshakeError::Interrupted(_)) => panic!("blocking handshake"),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `chorus serve` on `dir` and `http`; returns it and the HTTP and QUIC addresses
/// it printed, or why it did not start (it exited, for example because the address was
/// taken).
fn spawn(dir: &Path, http: &str) -> Result<(Child, String, String), String> {
    let log_path = dir.join("server.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .expect("log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_chorus"))
        .arg("serve")
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(["--http", http, "--quic", "127.0.0.1:0", "--shards", "2"])
        .arg("--config")
        .arg(dir.join("chorus.toml"))
        .env("CHORUS_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("spawn chorus");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    // The line is read on a thread so that a server that never prints fails the test
    // after START_WAIT instead of hanging it; the pipe stays drained for the server's life.
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let found = lines.by_ref().map_while(Result::ok).find_map(|l| {
            let rest = l.strip_prefix("listening ")?.to_owned();
            let field = |key: &str| {
                rest.split(' ')
                    .find_map(|kv| kv.strip_prefix(key))
                    .map(str::to_owned)
            };
            Some((field("http=")?, field("quic=")?))
        });
        let _ = tx.send(found);
        for _ in lines {}
    });
    match rx.recv_timeout(START_WAIT) {
        Ok(Some((http, quic))) => Ok((child, http, quic)),
        other => {
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            Err(format!(
                "no address printed ({other:?}); log tail: {tail:?}"
            ))
        }
    }
}

/// A field of `/proc/PID/status` in KiB.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// The path of a file in the directory of a running test's server, for messages.
pub fn path_in(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// How long a call to a cluster may be retried while the cluster settles.
pub const SETTLE_WAIT: Duration = Duration::from_secs(30);

/// Calls `call` again while it answers 503 (a leader being elected) or 401/404 (a node
/// whose directory has not applied a write made through another node yet), for at most
/// [`SETTLE_WAIT`]; its last answer, for the caller to check.
pub fn settled(call: impl Fn() -> Resp) -> Resp {
    let deadline = Instant::now() + SETTLE_WAIT;
    loop {
        let r = call();
        if !matches!(r.status, 503 | 401 | 404) || Instant::now() > deadline {
            return r;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Signs `name` up through node `s` of a cluster, on `device` if one is named.
#[track_caller]
pub fn cluster_signup(s: &Server, name: &str, device: Option<&str>) -> User {
    let email = format!("{name}@example.com");
    let mut body = json!({"email": email, "password": PASSWORD, "name": name});
    if let Some(d) = device {
        body["device_id"] = json!(d);
    }
    let r = settled(|| s.call("POST", "/api/v1/auth/signup", None, Some(body.clone())));
    assert_eq!(r.status, 201, "sign-up {name}: {}", r.text);
    User {
        id: str_of(&r.body["user"]["id"]),
        email,
        token: str_of(&r.body["token"]),
    }
}

/// A workspace of `owner`'s made through node `s` of a cluster; its ID.
#[track_caller]
pub fn cluster_workspace(s: &Server, owner: &User) -> String {
    let r = settled(|| {
        let body = json!({"name": "acme"});
        s.call("POST", "/api/v1/workspaces", Some(&owner.token), Some(body))
    });
    assert_eq!(r.status, 201, "{}", r.text);
    str_of(&r.body["workspace"]["id"])
}

/// `member` added to workspace `wid` by its owner, through node `s` of a cluster.
#[track_caller]
pub fn cluster_add_member(s: &Server, owner: &User, wid: &str, member: &User) {
    let r = settled(|| {
        let body = json!({"email": member.email});
        let path = format!("/api/v1/workspaces/{wid}/members");
        s.call("POST", &path, Some(&owner.token), Some(body))
    });
    assert_eq!(r.status, 201, "{}", r.text);
}

/// A public channel `name` of `owner`'s in workspace `wid`, made through node `s` of a
/// cluster; its ID.
#[track_caller]
pub fn cluster_channel(s: &Server, owner: &User, wid: &str, name: &str) -> String {
    let r = settled(|| {
        let body = json!({"name": name, "kind": "public"});
        let path = format!("/api/v1/workspaces/{wid}/channels");
        s.call("POST", &path, Some(&owner.token), Some(body))
    });
    assert_eq!(r.status, 201, "{}", r.text);
    str_of(&r.body["channel"]["id"])
}

/// `member` added to channel `cid` by `owner`, through node `s` of a cluster.
#[track_caller]
pub fn cluster_channel_member(s: &Server, owner: &User, cid: &str, member: &User) {
    let r = settled(|| {
        let path = format!("/api/v1/channels/{cid}/members");
        s.call(
            "POST",
            &path,
            Some(&owner.token),
            Some(json!({"user_id": member.id})),
        )
    });
    assert_eq!(r.status, 201, "{}", r.text);
}

/// Alice, and bob in her workspace and in her channel `general`, made through node `s` of
/// a cluster: (alice, bob, the workspace's ID, the channel's ID).
#[track_caller]
pub fn cluster_pair(s: &Server) -> (User, User, String, String) {
    let alice = cluster_signup(s, "alice", None);
    let bob = cluster_signup(s, "bob", None);
    let wid = cluster_workspace(s, &alice);
    cluster_add_member(s, &alice, &wid, &bob);
    let cid = cluster_channel(s, &alice, &wid, "general");
    cluster_channel_member(s, &alice, &cid, &bob);
    (alice, bob, wid, cid)
}

/// An account made by sign-up.
#[derive(Clone, Debug)]
pub struct User {
    pub id: String,
    pub email: String,
    pub token: String,
}

/// An answer: status, a few headers, and the body as JSON (`Null` when empty or not JSON).
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub content_type: Option<String>,
    pub retry_after: Option<String>,
    pub allow: Option<String>,
    pub content_length: Option<String>,
    pub text: String,
    pub body: Value,
}

impl Resp {
    fn read(resp: ureq::Response, method: &str, path: &str) -> Resp {
        let status = resp.status();
        let header = |name: &str| resp.header(name).map(str::to_owned);
        let (content_type, retry_after, allow, content_length) = (
            header("content-type"),
            header("retry-after"),
            header("allow"),
            header("content-length"),
        );
        let mut text = String::new();
        resp.into_reader()
            .take(64 * 1024 * 1024)
            .read_to_string(&mut text)
            .expect("read body");
        let json = content_type.as_deref() == Some("application/json");
        let body = if text.is_empty() || !json {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{method} {path}: {e}: {text}"))
        };
        Resp {
            status,
            content_type,
            retry_after,
            allow,
            content_length,
            text,
            body,
        }
    }

    /// Asserts an error answer in `API.md`'s shape with this status and code.
    #[track_caller]
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "{}", self.text);
        assert_eq!(self.content_type.as_deref(), Some("application/json"));
        assert_eq!(self.body["error"]["code"], code, "{}", self.text);
        assert!(
            self.body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{}",
            self.text
        );
    }
}

/// A JSON string's value; panics on anything else.
#[track_caller]
pub fn str_of(v: &Value) -> String {
    v.as_str()
        .unwrap_or_else(|| panic!("not a string: {v}"))
        .to_owned()
}

/// A client WebSocket over a blocking socket with a read timeout. Frames skipped while
/// waiting for one of a given type are kept, in order, for the next reads.
pub struct Ws {
    pub socket: WebSocket<TcpStream>,
    stash: std::collections::VecDeque<Value>,
}

impl Ws {
    /// A client over a socket whose handshake the test did itself.
    pub fn new(socket: WebSocket<TcpStream>) -> Ws {
        Ws {
            socket,
            stash: Default::default(),
        }
    }

    pub fn send(&mut self, frame: Value) {
        self.socket
            .send(Message::text(frame.to_string()))
            .expect("send");
    }

    pub fn send_raw(&mut self, message: Message) {
        self.socket.send(message).expect("send");
    }

    /// The next JSON frame; fails on a close, a timeout or a non-JSON frame.
    #[track_caller]
    pub fn recv(&mut self) -> Value {
        if let Some(v) = self.stash.pop_front() {
            return v;
        }
        self.read_socket()
    }

    #[track_caller]
    fn read_socket(&mut self) -> Value {
        loop {
            match self.socket.read() {
                Ok(Message::Text(t)) => return serde_json::from_str(&t).expect("JSON frame"),
                Ok(Message::Ping(_) | Message::Pong(_)) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// The next frame of the given type; frames before it are kept for later reads.
    #[track_caller]
    pub fn recv_type(&mut self, kind: &str) -> Value {
        if let Some(i) = self.stash.iter().position(|v| v["type"] == kind) {
            return self.stash.remove(i).expect("found");
        }
        loop {
            let v = self.read_socket();
            if v["type"] == kind {
                return v;
            }
            assert!(self.stash.len() < 10_000, "no {kind} frame");
            self.stash.push_back(v);
        }
    }

    /// The next frame of the given type if one comes within `wait` (frames before it are
    /// kept for later reads); `None` otherwise, with the connection still usable.
    pub fn recv_type_within(&mut self, kind: &str, wait: Duration) -> Option<Value> {
        if let Some(i) = self.stash.iter().position(|v| v["type"] == kind) {
            return self.stash.remove(i);
        }
        let deadline = Instant::now() + wait;
        let stream = self.socket.get_ref().try_clone().expect("clone the stream");
        let found = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break None;
            }
            stream.set_read_timeout(Some(left)).expect("timeout");
            match self.socket.read() {
                Ok(Message::Text(t)) => {
                    let v: Value = serde_json::from_str(&t).expect("JSON frame");
                    if v["type"] == kind {
                        break Some(v);
                    }
                    self.stash.push_back(v);
                }
                Ok(Message::Ping(_) | Message::Pong(_)) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                other => panic!("expected a text frame, got {other:?}"),
            }
        };
        stream
            .set_read_timeout(Some(READ_TIMEOUT))
            .expect("timeout");
        found
    }

    /// Whether a frame of this type was read and kept for later.
    pub fn stash_holds(&self, kind: &str) -> bool {
        self.stash.iter().any(|v| v["type"] == kind)
    }

    /// Sends a ping with a ref and waits for its pong, skipping other frames: the
    /// connection is alive and has handled everything sent before.
    #[track_caller]
    pub fn ping(&mut self, reference: &str) {
        self.send(json!({"type": "ping", "ref": reference}));
        let pong = self.recv_type("pong");
        assert_eq!(pong["ref"], reference);
    }

    /// Reads until a close frame; returns its code and reason, and the JSON frames before.
    #[track_caller]
    pub fn recv_close(&mut self) -> (u16, String, Vec<Value>) {
        let mut before: Vec<Value> = self.stash.drain(..).collect();
        loop {
            match self.socket.read() {
                Ok(Message::Text(t)) => before.push(serde_json::from_str(&t).expect("JSON")),
                Ok(Message::Close(Some(f))) => {
                    return (u16::from(f.code), f.reason.to_string(), before)
                }
                Ok(Message::Close(None)) => panic!("close without a code"),
                Ok(_) => continue,
                Err(e) => panic!("expected a close frame, got {e}"),
            }
        }
    }
}

/// `GET path` on `s`, with `user`'s token if given (none for a signed link) and a
/// `Range` if given: the status and the body's bytes.
pub fn get_bytes(
    s: &Server,
    user: Option<&User>,
    path: &str,
    range: Option<&str>,
) -> (u16, Vec<u8>) {
    let mut req = ureq::get(&format!("{}{path}", s.base_url()));
    if let Some(u) = user {
        req = req.set("Authorization", &format!("Bearer {}", u.token));
    }
    if let Some(r) = range {
        req = req.set("Range", r);
    }
    let resp = match req.call() {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{path}: {e}"),
    };
    let status = resp.status();
    let mut body = Vec::new();
    resp.into_reader().read_to_end(&mut body).expect("body");
    (status, body)
}

/// Uploads a small text file as `user` with a multipart body made here; returns its ID.
pub fn upload_file(s: &Server, user: &User, wid: &str) -> String {
    str_of(&upload_bytes(s, user, wid, "t.txt", "text/plain", b"hello")["id"])
}

/// Uploads `bytes` as `name` with a multipart body made here; returns the file.
pub fn upload_bytes(
    s: &Server,
    user: &User,
    wid: &str,
    name: &str,
    ctype: &str,
    bytes: &[u8],
) -> Value {
    let r = upload_bytes_raw(s, user, wid, name, ctype, bytes);
    assert_eq!(r.status, 201, "{}", r.text);
    r.body["file"].clone()
}

/// Uploads `bytes` as `name` with a multipart body made here; returns the answer.
pub fn upload_bytes_raw(
    s: &Server,
    user: &User,
    wid: &str,
    name: &str,
    ctype: &str,
    bytes: &[u8],
) -> Resp {
    let b = "chorus-test-boundary";
    let mut body = format!(
        "--{b}\r\nContent-Disposition: form-data; name=\"workspace_id\"\r\n\r\n{wid}\r\n\
         --{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n\
         Content-Type: {ctype}\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(bytes);
    body.extend_from_slice(format!("\r\n--{b}--\r\n").as_bytes());
    let auth = format!("Bearer {}", user.token);
    let ct = format!("multipart/form-data; boundary={b}");
    let headers = [
        ("Authorization", auth.as_str()),
        ("Content-Type", ct.as_str()),
    ];
    s.raw("POST", "/api/v1/files/upload", &headers, Some(&body))
}

/// PDFs written byte by byte, shared with the gateway's own unit tests.
#[path = "../../src/files/test_pdf.rs"]
pub mod test_pdf;

/// A one-page PDF showing `lines`, a word at a time (`test_pdf::text_lines`).
pub fn pdf(lines: &[&str]) -> Vec<u8> {
    test_pdf::text_lines(lines)
}

/// `q` percent-encoded for a query string (everything but the unreserved characters).
pub fn query_encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Uploads `bytes` as `name` with the Python `requests` client; returns its
/// `{"status","body"}`.
pub fn upload_with_requests(
    s: &Server,
    user: &User,
    wid: &str,
    name: &str,
    ctype: &str,
    bytes: &[u8],
) -> Value {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("upload");
    std::fs::write(&path, bytes).expect("write");
    upload_path_with_requests(s, user, wid, name, ctype, &path)
}

/// Uploads the file at `path` as `name` with the Python `requests` client (its script is
/// `tests/peers/files_client.py`); returns its `{"status","body"}`.
pub fn upload_path_with_requests(
    s: &Server,
    user: &User,
    wid: &str,
    name: &str,
    ctype: &str,
    path: &Path,
) -> Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers/files_client.py");
    let out = Command::new("python3")
        .arg(script)
        .args([&s.base_url(), &user.token, wid, name, ctype])
        .arg(path)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "the requests client failed (is requests installed? python3 -m pip install requests): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON line")
}
