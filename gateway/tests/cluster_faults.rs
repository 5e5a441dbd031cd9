//! A fault test of a cluster against real processes (issue 18's nemeses, short pass):
//! three, then five, `chorus serve` nodes take posts to four channels through any node,
//! while a nemesis SIGKILLs and restarts nodes, SIGSTOPs and resumes them, isolates one,
//! cuts the others apart through a bridge, kills the leader of the first channel's
//! partition, stops a node cleanly (SIGTERM, as a rolling restart does), makes one node's
//! disk fail every fsync (the node must stop, and is restarted on a good disk), and (on
//! five nodes) splits the network 2 | 3 (cuts and the failing disk go through each node's
//! fault file). After the faults heal, the checker asks every node for every channel: each
//! acknowledged post is there exactly once, every node has the same posts at the same seqs,
//! and nothing that was never sent appears; every acknowledged post is pushed (to a reader
//! in every channel, through a push gateway sink) and nothing unsent is. It prints how long
//! no post was acknowledged around each kind of fault, and how many pushes were repeated.

mod common;

use chorus_replication::placement;
use common::push_sink::Sink;
use common::{str_of, ClusterConfig, Server, PASSWORD, UNLIMITED};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

const CHANNELS: usize = 4;
/// How long the nemesis runs, unless `CHORUS_FAULT_SECS` says otherwise (the long mode:
/// `CHORUS_FAULT_SECS=3600 cargo test --release -p chorus-gateway --test cluster_faults --
/// --nocapture` runs an hour of faults, one every 2 s or so).
const FAULTS_FOR: Duration = Duration::from_secs(20);
/// How long the cluster may take to settle after the faults.
const SETTLE: Duration = Duration::from_secs(30);

/// A call that may meet a dead or stopped node: `None` for no answer within a second.
fn call(
    agent: &ureq::Agent,
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> Option<(u16, Value)> {
    let mut req = agent.request(method, &format!("http://{addr}{path}"));
    if let Some(t) = token {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    let r = match body {
        Some(b) => req
            .set("Content-Type", "application/json")
            .send_string(&b.to_string()),
        None => req.call(),
    };
    let r = match r {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(_) => return None,
    };
    let status = r.status();
    let text = r.into_string().ok()?;
    Some((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
}

/// Sends a write to the nodes in turn until one acknowledges it, or `deadline` passes.
fn write(
    agent: &ureq::Agent,
    addrs: &[String],
    path: &str,
    token: Option<&str>,
    body: &Value,
    deadline: Instant,
) -> Option<Value> {
    send(agent, addrs, "POST", path, token, body, deadline)
}

/// [`write`] with another method.
fn send(
    agent: &ureq::Agent,
    addrs: &[String],
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &Value,
    deadline: Instant,
) -> Option<Value> {
    while Instant::now() < deadline {
        for a in addrs {
            match call(agent, a, method, path, token, Some(body)) {
                Some((200 | 201, v)) => return Some(v),
                Some((503 | 401 | 404, _)) | None => {}
                Some((s, v)) => panic!("{method} {path} at {a}: {s} {v}"),
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

fn texts(agent: &ureq::Agent, addr: &str, token: &str, cid: &str) -> Option<Vec<(u64, String)>> {
    let mut out = Vec::new();
    let mut before: Option<String> = None;
    loop {
        let path = match before {
            Some(b) => format!("/api/v1/channels/{cid}/messages?limit=200&before={b}"),
            None => format!("/api/v1/channels/{cid}/messages?limit=200"),
        };
        let (status, v) = call(agent, addr, "GET", &path, Some(token), None)?;
        if status != 200 {
            return None;
        }
        let page = v["messages"].as_array()?;
        for m in page {
            out.push((m["seq"].as_u64()?, m["text"].as_str()?.to_owned()));
        }
        match v["next_cursor"].as_str() {
            Some(c) if !page.is_empty() => before = Some(c.to_owned()),
            _ => break,
        }
    }
    out.sort();
    Some(out)
}

/// One cluster at a time: two at once would be ten processes on the test machine's cores.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn acknowledged_posts_survive_faults_on_three_nodes() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    run(3);
}

#[test]
fn acknowledged_posts_survive_faults_on_five_nodes() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    run(5);
}

/// Membership under writes (the add-and-remove nemesis): three nodes take posts; a fourth,
/// started with `cluster_join`, is added (`PUT /api/v1/cluster/members` through node 1) and
/// every partition moves to placement over four nodes; then node 1 is removed (through node
/// 2), every partition moves to placement over nodes 2 to 4, and node 1 stops (SIGTERM).
/// The writer goes through every member throughout. Every acknowledged post is then on
/// nodes 2 to 4 exactly once, at the same seqs, and nothing unsent appears.
#[test]
fn acknowledged_posts_survive_a_node_joining_and_another_leaving() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let cluster = ClusterConfig::of(4);
    let founders = [1, 2, 3];
    let mut nodes: Vec<Server> = founders
        .iter()
        .map(|&id| Server::start(&cluster.node_in(id, &founders, UNLIMITED)))
        .collect();
    let mut http: Vec<String> = nodes.iter().map(|s| s.addr.clone()).collect();
    let work = Workload::prepare(&http);
    let live = std::sync::Arc::new(std::sync::Mutex::new(http.clone()));
    let last_acked = LastAcked::default();
    let writer = Writer::start(&work, live.clone(), last_acked.clone());
    let reader = Reader::start(&work, live.clone(), last_acked);
    std::thread::sleep(Duration::from_secs(1));

    let joining = format!("cluster_join = true\n{UNLIMITED}");
    nodes.push(Server::start(&cluster.node_in(4, &[1, 2, 3, 4], &joining)));
    http.push(nodes[3].addr.clone());
    let began = Instant::now();
    ask_members(&work, &http[0], &cluster.members_body(&[1, 2, 3, 4]));
    live.lock().unwrap().push(http[3].clone());
    wait_placed(&work, &http[1], &[1, 2, 3, 4]);
    let joined_in = began.elapsed();
    std::thread::sleep(Duration::from_secs(1));

    live.lock().unwrap().retain(|a| *a != http[0]);
    let began = Instant::now();
    ask_members(&work, &http[1], &cluster.members_body(&[2, 3, 4]));
    wait_placed(&work, &http[1], &[2, 3, 4]);
    let left_in = began.elapsed();
    let status = nodes[0].terminate();
    assert!(status.success(), "node 1 exited {status}");
    // Removed, it does not come back on its old data (it would serve the past).
    let refused = nodes[0]
        .start_again()
        .expect_err("node 1 started again after its removal");
    assert!(
        refused.contains("was removed from the cluster"),
        "{refused}"
    );
    std::thread::sleep(Duration::from_secs(1));

    let written = writer.finish();
    let reads = reader.finish();
    assert!(
        reads.stale.is_empty() && reads.reads > reads.refused,
        "{} reads while the membership changed, {} refused, {} stale: {:?}",
        reads.reads,
        reads.refused,
        reads.stale.len(),
        &reads.stale[..reads.stale.len().min(5)]
    );
    let faults = ["node 4 added".to_owned(), "node 1 removed".to_owned()];
    check(&work, &http[1..], &written, &faults, &|| {
        nodes[1..].iter().map(|n| n.log()).collect()
    });
    let total: usize = written.acked.values().map(BTreeSet::len).sum();
    eprintln!(
        "membership: node 4 placed in {joined_in:?}, node 1 gone in {left_in:?}; {} posts sent, \
         {total} acknowledged, longest without an acknowledgement {:?}; {} reads ({} refused), \
         none stale",
        written.sent.len(),
        written.longest,
        reads.reads,
        reads.refused
    );
}

/// Asks the cluster, through the node at `addr`, to be placed on the nodes `body` names;
/// the ask must be committed (numbered).
fn ask_members(w: &Workload, addr: &str, body: &Value) {
    let path = "/api/v1/cluster/members";
    let (status, v) = call(&w.agent, addr, "PUT", path, None, Some(body)).expect("an answer");
    assert_eq!(status, 200, "{v}");
    assert!(v["ask"].as_u64().is_some_and(|n| n > 0), "{v}");
}

/// Waits until the node at `addr` shows every partition voted on by placement's nodes over
/// `ids` (node ids).
fn wait_placed(w: &Workload, addr: &str, ids: &[u64]) {
    let deadline = Instant::now() + SETTLE;
    loop {
        let view = call(
            &w.agent,
            addr,
            "GET",
            "/api/v1/cluster",
            Some(&w.token),
            None,
        );
        let placed = view.as_ref().is_some_and(|(status, v)| {
            let parts = v["partitions"].as_array();
            *status == 200
                && parts.is_some_and(|parts| {
                    parts.iter().all(|p| {
                        let mut want = placement::replicas(p["id"].as_u64().unwrap() as u32, ids);
                        want.sort_unstable();
                        let have: Vec<u64> = p["replicas"]
                            .as_array()
                            .map(|r| r.iter().filter_map(Value::as_u64).collect())
                            .unwrap_or_default();
                        have == want
                    })
                })
        });
        if placed {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the partitions never moved to {ids:?}: {view:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The kinds of fault, in the order the nemesis takes them (the last on five nodes only).
const KINDS: [&str; 8] = [
    "SIGKILL",
    "SIGSTOP",
    "isolated",
    "bridge",
    "leader SIGKILL",
    "SIGTERM",
    "fsync fails",
    "halves",
];

/// How long a node whose fsyncs fail may go on before it stops.
const DISK_FAILURE_STOPS_WITHIN: Duration = Duration::from_secs(10);

/// Partition `partition` in `GET /api/v1/cluster` of the first node that answers.
fn partition_view(
    agent: &ureq::Agent,
    http: &[String],
    token: &str,
    partition: u64,
) -> Option<Value> {
    http.iter().find_map(|a| {
        let (status, v) = call(agent, a, "GET", "/api/v1/cluster", Some(token), None)?;
        let partitions = v["partitions"].as_array().filter(|_| status == 200)?;
        partitions
            .iter()
            .find(|p| p["id"].as_u64() == Some(partition))
            .cloned()
    })
}

/// A node id in a cluster view as a node index (from 0).
fn index(id: &Value) -> Option<usize> {
    Some(id.as_u64()? as usize - 1)
}

/// The leader of `partition` as the first node that answers knows it, if any.
fn leader_of(agent: &ureq::Agent, http: &[String], token: &str, partition: u64) -> Option<usize> {
    index(&partition_view(agent, http, token, partition)?["leader"])
}

/// The voters of `partition`, from the first node that answers.
fn voters_of(agent: &ureq::Agent, http: &[String], token: &str, partition: u64) -> Vec<usize> {
    let view = partition_view(agent, http, token, partition);
    let ids = view.as_ref().and_then(|p| p["replicas"].as_array());
    ids.map_or_else(Vec::new, |ids| ids.iter().filter_map(index).collect())
}

/// A sign-up, a workspace and its channels, made through whichever node takes them.
struct Workload {
    agent: ureq::Agent,
    token: String,
    channels: Vec<String>,
    /// Each channel's partition.
    partitions: Vec<u64>,
}

impl Workload {
    fn prepare(http: &[String]) -> Workload {
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(1))
            .max_idle_connections(0)
            .build();
        let setup = Instant::now() + SETTLE;
        let signup = json!({"email": "w@example.com", "password": PASSWORD, "name": "w"});
        let v = write(&agent, http, "/api/v1/auth/signup", None, &signup, setup).expect("sign-up");
        let token = v["token"].as_str().unwrap().to_owned();
        let ws = write(
            &agent,
            http,
            "/api/v1/workspaces",
            Some(&token),
            &json!({"name": "acme"}),
            setup,
        )
        .expect("workspace");
        let wid = ws["workspace"]["id"].as_str().unwrap().to_owned();
        // The reader: in every channel, pushed for every message on one device, and never
        // connected (every node decides the same pushes).
        let reader = json!({"email": "r@example.com", "password": PASSWORD, "name": "r"});
        let v = write(&agent, http, "/api/v1/auth/signup", None, &reader, setup).expect("r");
        let (reader_token, reader_id) = (str_of(&v["token"]), str_of(&v["user"]["id"]));
        let members = format!("/api/v1/workspaces/{wid}/members");
        let body = json!({"email": "r@example.com"});
        write(&agent, http, &members, Some(&token), &body, setup).expect("r joins");
        let prefs = json!({"push": "all"});
        let path = "/api/v1/me/notification-prefs";
        send(
            &agent,
            http,
            "PATCH",
            path,
            Some(&reader_token),
            &prefs,
            setup,
        )
        .expect("prefs");
        let device = json!({"app_id": "chat.chorus", "pushkey": "key-r", "platform": "fcm"});
        let path = "/api/v1/me/push-devices";
        write(&agent, http, path, Some(&reader_token), &device, setup).expect("device");
        let (channels, partitions): (Vec<String>, Vec<u64>) = (0..CHANNELS)
            .map(|i| {
                let body = json!({"name": format!("c{i}"), "kind": "public"});
                let v = write(
                    &agent,
                    http,
                    &format!("/api/v1/workspaces/{wid}/channels"),
                    Some(&token),
                    &body,
                    setup,
                )
                .expect("channel");
                let c = &v["channel"];
                (
                    c["id"].as_str().unwrap().to_owned(),
                    c["partition"].as_u64().unwrap(),
                )
            })
            .unzip();
        for cid in &channels {
            let path = format!("/api/v1/channels/{cid}/members");
            let body = json!({"user_id": reader_id});
            write(&agent, http, &path, Some(&token), &body, setup).expect("r in the channel");
        }
        Workload {
            agent,
            token,
            channels,
            partitions,
        }
    }
}

/// What the writer sent and was acknowledged.
struct Written {
    /// Acknowledged posts, by channel.
    acked: BTreeMap<String, BTreeSet<String>>,
    sent: BTreeSet<String>,
    /// The longest time between two acknowledgements.
    longest: Duration,
    ack_times: Vec<Instant>,
}

/// The writer: one post at a time, round-robin over the channels, each with its own
/// client_msg_id (a retry after a lost answer is deduplicated), through the nodes `http`
/// names at the time; an answer 200 or 201 is an acknowledgement.
struct Writer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Written>,
}

/// Runs `body` on a thread of its own as the workload's user, until the flag it is given
/// is set: returns the flag and the thread. `body` gets the flag, the user's token, the
/// channels and an agent.
fn client_thread<T: Send + 'static>(
    w: &Workload,
    body: impl FnOnce(&std::sync::atomic::AtomicBool, String, Vec<String>, ureq::Agent) -> T
        + Send
        + 'static,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::thread::JoinHandle<T>,
) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (stopping, token, channels, agent) = (
        stop.clone(),
        w.token.clone(),
        w.channels.clone(),
        w.agent.clone(),
    );
    let thread = std::thread::spawn(move || body(&stopping, token, channels, agent));
    (stop, thread)
}

/// Each channel's last acknowledged post, as the writer learns them.
type LastAcked = std::sync::Arc<std::sync::Mutex<BTreeMap<String, String>>>;

impl Writer {
    fn start(
        w: &Workload,
        http: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
        last_acked: LastAcked,
    ) -> Writer {
        let (stop, thread) = client_thread(w, move |stopping, token, channels, agent| {
            let mut acked: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            let mut ack_times = vec![Instant::now()];
            let mut sent = BTreeSet::new();
            let (mut last_ack, mut longest) = (Instant::now(), Duration::ZERO);
            let mut n = 0u64;
            while !stopping.load(std::sync::atomic::Ordering::Relaxed) {
                let cid = &channels[n as usize % CHANNELS];
                let text = format!("p{n}");
                sent.insert(text.clone());
                let body = json!({"text": text, "client_msg_id": text});
                let path = format!("/api/v1/channels/{cid}/messages");
                let deadline = Instant::now() + Duration::from_secs(3);
                let nodes = http.lock().unwrap().clone();
                if write(&agent, &nodes, &path, Some(&token), &body, deadline).is_some() {
                    last_acked.lock().unwrap().insert(cid.clone(), text.clone());
                    acked.entry(cid.clone()).or_default().insert(text);
                    longest = longest.max(last_ack.elapsed());
                    last_ack = Instant::now();
                    ack_times.push(last_ack);
                }
                n += 1;
            }
            ack_times.push(Instant::now());
            Written {
                acked,
                sent,
                longest,
                ack_times,
            }
        });
        Writer { stop, thread }
    }

    fn finish(self) -> Written {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let written = self.thread.join().expect("writer");
        let total: usize = written.acked.values().map(BTreeSet::len).sum();
        assert!(total > 0, "nothing was acknowledged");
        written
    }
}

/// What the reader saw under the faults.
#[derive(Default)]
struct Reads {
    reads: usize,
    /// Reads a node refused (503 or no answer: no leader confirmed, or a node down).
    refused: usize,
    /// Reads that missed a post acknowledged before they were sent.
    stale: Vec<String>,
}

/// A reader under the faults (`API.md` §15: a read on any node sees every write
/// acknowledged before it was sent): every 20 ms it reads the newest 200 messages of a
/// channel through each node in turn, and the channel's last post acknowledged before the
/// read must be among them (or, read whole on the same node, have 200 newer ones).
struct Reader {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Reads>,
}

impl Reader {
    fn start(
        w: &Workload,
        http: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
        last_acked: LastAcked,
    ) -> Reader {
        let (stop, thread) = client_thread(w, move |stopping, token, channels, agent| {
            let mut seen = Reads::default();
            let mut k = 0usize;
            while !stopping.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(20));
                let nodes = http.lock().unwrap().clone();
                let node = &nodes[k % nodes.len()];
                let cid = &channels[(k / nodes.len()) % CHANNELS];
                k += 1;
                let Some(want) = last_acked.lock().unwrap().get(cid).cloned() else {
                    continue;
                };
                seen.reads += 1;
                let path = format!("/api/v1/channels/{cid}/messages?limit=200");
                let page: Option<Vec<String>> =
                    match call(&agent, node, "GET", &path, Some(&token), None) {
                        Some((200, v)) => v["messages"].as_array().map(|ms| {
                            ms.iter()
                                .filter_map(|m| m["text"].as_str().map(str::to_owned))
                                .collect()
                        }),
                        _ => None,
                    };
                let Some(page) = page else {
                    seen.refused += 1;
                    continue;
                };
                if page.contains(&want) {
                    continue;
                }
                // Not among the newest: fine only if 200 posts came after it since.
                let Some(all) = texts(&agent, node, &token, cid) else {
                    continue;
                };
                let newer = all.iter().rposition(|(_, t)| *t == want);
                let newer = newer.map(|at| all.len() - 1 - at);
                if newer.is_none_or(|n| n < page.len()) {
                    seen.stale.push(format!(
                        "{node}: channel {cid} read without {want}, acknowledged before the \
                         read ({} messages in the page)",
                        page.len()
                    ));
                }
            }
            seen
        });
        Reader { stop, thread }
    }

    fn finish(self) -> Reads {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().expect("reader")
    }
}

/// Clients on the SDK (`chorus-client`), each knowing every node: one posts `s{n}` over
/// its event stream (`message:send`, its own `client_msg_id` each, sent again after a
/// lost answer or an `unavailable`), the other reads every channel's events. Each moves to
/// another node when its connection is lost or cannot be made, and resumes there.
struct SdkClients {
    /// Set to stop posting; then set `done` to stop reading.
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The writer's acknowledged and sent posts, and its stream's counters, once it stops.
    written: std::sync::mpsc::Receiver<(Written, chorus_client::Stats)>,
    /// What the reading stream delivered: (channel, seq, text).
    received: std::sync::Arc<std::sync::Mutex<Vec<(String, u64, String)>>>,
    /// The reading stream's counters, when it ends.
    thread: std::thread::JoinHandle<chorus_client::Stats>,
}

impl SdkClients {
    fn start(w: &Workload, http: &[String]) -> SdkClients {
        use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
        use std::sync::{Arc, Mutex};
        let (stop, done) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let received: Arc<Mutex<Vec<(String, u64, String)>>> = Arc::default();
        let (written_tx, written) = std::sync::mpsc::channel();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let urls: Vec<String> = http.iter().map(|a| format!("http://{a}")).collect();
        let channels = w.channels.clone();
        let (stopping, finishing, got) = (stop.clone(), done.clone(), received.clone());
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async move {
                let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
                let connect = |skip: usize| {
                    let client = chorus_client::Client::cluster(&urls).expect("URLs");
                    for _ in 0..skip {
                        client.next_node();
                    }
                    async move {
                        loop {
                            let opened = async {
                                let session = client.login("w@example.com", PASSWORD).await?;
                                session
                                    .connect(chorus_client::ConnectOptions::default())
                                    .await
                            };
                            match tokio::time::timeout(Duration::from_secs(3), opened).await {
                                Ok(Ok(stream)) => return stream,
                                _ => client.next_node(),
                            }
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                };
                let mut reader = connect(1).await;
                let _ = ready_tx.send(());
                let reading = tokio::spawn(async move {
                    while !finishing.load(Relaxed) {
                        let next = reader.next_event();
                        match tokio::time::timeout(Duration::from_millis(100), next).await {
                            Ok(Ok(e)) => {
                                if let Some(m) = e.message() {
                                    got.lock().unwrap().push((e.channel_id, e.seq, m.text));
                                }
                            }
                            Ok(Err(e)) => panic!("the reading stream ended: {e}"),
                            Err(_) => {}
                        }
                    }
                    reader.stats()
                });
                let writer = connect(0).await;
                let handle = writer.handle();
                let mut written = Written {
                    acked: BTreeMap::new(),
                    sent: BTreeSet::new(),
                    longest: Duration::ZERO,
                    ack_times: Vec::new(),
                };
                let mut n = 0usize;
                while !stopping.load(Relaxed) {
                    let cid = &channels[n % CHANNELS];
                    let text = format!("s{n}");
                    written.sent.insert(text.clone());
                    let deadline = Instant::now() + Duration::from_secs(3);
                    while Instant::now() < deadline {
                        let sending = handle.send(cid, &text, &text);
                        match tokio::time::timeout(Duration::from_secs(1), sending).await {
                            Ok(Ok(_)) => {
                                written.acked.entry(cid.clone()).or_default().insert(text);
                                break;
                            }
                            Ok(Err(chorus_client::Error::Closed)) => {
                                panic!("the writer's stream ended")
                            }
                            _ => tokio::time::sleep(Duration::from_millis(50)).await,
                        }
                    }
                    n += 1;
                }
                let _ = written_tx.send((written, writer.stats()));
                writer.close().await;
                reading.await.expect("the reader")
            })
        });
        // Started before any post, the reader has every post to receive.
        ready.recv_timeout(SETTLE).expect("the SDK reader connects");
        SdkClients {
            stop,
            done,
            written,
            received,
            thread,
        }
    }

    /// Stops posting: what the SDK writer sent and was acknowledged, and its counters.
    fn stop_writing(&self) -> (Written, chorus_client::Stats) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.written
            .recv_timeout(SETTLE)
            .expect("the SDK writer stops")
    }

    /// What the reading stream has delivered so far.
    fn received(&self) -> Vec<(String, u64, String)> {
        self.received.lock().unwrap().clone()
    }

    /// Stops reading; the reading stream's counters.
    fn stop_reading(self) -> chorus_client::Stats {
        self.done.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().expect("the SDK clients")
    }
}

/// The SDK reader, once the faults healed: it received every acknowledged post (REST and
/// SDK) in its channel, each once, in seq order per channel with no gap the stream had to
/// repair, across every reconnection to another node.
fn check_reader(sdk: SdkClients, w: &Workload, written: &Written) {
    let deadline = Instant::now() + SETTLE;
    loop {
        let got: BTreeSet<(String, String)> = (sdk.received().into_iter())
            .map(|(c, _, t)| (c, t))
            .collect();
        let missing: Vec<(&String, &String)> = (written.acked.iter())
            .flat_map(|(c, texts)| texts.iter().map(move |t| (c, t)))
            .filter(|(c, t)| !got.contains(&((*c).clone(), (*t).clone())))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the SDK reader never received {} acknowledged posts ({:?}...)",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let received = sdk.received();
    let stats = sdk.stop_reading();
    for cid in &w.channels {
        let seqs: Vec<u64> = (received.iter())
            .filter(|(c, _, _)| c == cid)
            .map(|(_, seq, _)| *seq)
            .collect();
        assert!(
            seqs.windows(2).all(|p| p[1] == p[0] + 1),
            "channel {cid}: the reader's seqs go {seqs:?}"
        );
    }
    let texts: Vec<&String> = received.iter().map(|(_, _, t)| t).collect();
    let distinct: BTreeSet<&&String> = texts.iter().collect();
    assert_eq!(texts.len(), distinct.len(), "a post delivered twice");
    assert_eq!(
        stats.gaps_detected, 0,
        "gaps the stream repaired: {stats:?}"
    );
    eprintln!(
        "SDK reader: {} events over {} connections, {} repeats dropped",
        received.len(),
        stats.connections,
        stats.repeats_dropped
    );
}

/// The checker, once every node of `http` has caught up: every acknowledged post is in
/// its channel exactly once on every node, at the same seq everywhere, and nothing that was
/// never sent appears. `logs` are shown if a node never holds what it should.
fn check(
    w: &Workload,
    http: &[String],
    written: &Written,
    faults: &[String],
    logs: &dyn Fn() -> Vec<String>,
) {
    let (agent, token) = (&w.agent, &w.token);
    let (acked, sent) = (&written.acked, &written.sent);
    let settle = Instant::now() + SETTLE;
    for cid in &w.channels {
        let want = acked.get(cid).cloned().unwrap_or_default();
        let mut histories = Vec::new();
        for a in http {
            let h = loop {
                let h = texts(agent, a, token, cid);
                let missing: Vec<&String> = match &h {
                    Some(h) => {
                        let have: BTreeSet<&String> = h.iter().map(|(_, t)| t).collect();
                        want.iter().filter(|t| !have.contains(t)).collect()
                    }
                    None => want.iter().collect(),
                };
                if missing.is_empty() {
                    break h.unwrap_or_default();
                }
                if Instant::now() >= settle {
                    let logs = logs();
                    panic!(
                        "node {a} never held channel {cid}'s acknowledged posts: missing {} of {} \
                         ({:?}...), it has {:?}; faults {faults:?}; logs {logs:?}",
                        missing.len(),
                        want.len(),
                        &missing[..missing.len().min(5)],
                        h.map(|h| h.len())
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            let mut seen = BTreeSet::new();
            for (_, t) in &h {
                assert!(seen.insert(t.clone()), "{t} twice in {cid} on {a}");
                assert!(sent.contains(t), "{t} in {cid} on {a} was never sent");
            }
            histories.push(h);
        }
        // Nodes may still apply the last unacknowledged posts: compare the common prefix
        // once every node has the same length.
        let deadline = Instant::now() + SETTLE;
        loop {
            let lens: Vec<usize> = http
                .iter()
                .map(|a| texts(agent, a, token, cid).map_or(0, |h| h.len()))
                .collect();
            if lens.windows(2).all(|w| w[0] == w[1]) {
                let all: Vec<_> = http
                    .iter()
                    .map(|a| texts(agent, a, token, cid).unwrap_or_default())
                    .collect();
                if all.windows(2).all(|w| w[0] == w[1]) {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "channel {cid}: the nodes never agreed ({lens:?})"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn run(n: usize) {
    let cluster = ClusterConfig::of(n);
    let sink = Sink::start();
    let settings = format!("{UNLIMITED}push_gateway_url = \"{}\"\n", sink.url);
    let config = |id: usize| cluster.node(id, &settings);
    let mut nodes: Vec<Server> = (1..=n).map(|id| Server::start(&config(id))).collect();
    let http: Vec<String> = nodes.iter().map(|s| s.addr.clone()).collect();
    let work = Workload::prepare(&http);
    let (agent, token) = (&work.agent, &work.token);
    let (channels, partitions) = (&work.channels, &work.partitions);
    let sdk = SdkClients::start(&work, &http);
    let last_acked = LastAcked::default();
    let addrs = std::sync::Arc::new(std::sync::Mutex::new(http.clone()));
    let writer = Writer::start(&work, addrs.clone(), last_acked.clone());
    let reader = Reader::start(&work, addrs, last_acked);

    // The nemesis: every 2 s one fault on a node chosen in turn, healed 1 s later: in turn
    // a SIGKILL (and restart), a SIGSTOP (and SIGCONT), the node isolated from all others,
    // the node made a bridge (the others split in two groups that cannot reach each other,
    // both reach it), the leader of the first channel's partition SIGKILLed (and
    // restarted), a SIGTERM (a clean stop, as in a rolling restart, and a restart), a disk
    // that fails every fsync (the node must stop by itself; it restarts), and on five nodes the network split in halves: the node and the next one apart from the
    // other three. The cuts go through each node's fault file.
    let cut = |id: usize, peers: &[usize]| {
        let lines: String = peers.iter().map(|p| format!("cut {}\n", p + 1)).collect();
        std::fs::write(cluster.fault_file(id + 1), lines).expect("fault file");
    };
    // Cuts every node of `side` off from every node not in it (an empty side mends all).
    let split = |side: &[usize]| {
        for id in 0..n {
            let peers: Vec<usize> = (0..n)
                .filter(|p| !side.is_empty() && side.contains(&id) != side.contains(p))
                .collect();
            cut(id, &peers);
        }
    };
    // A post sent to `node` on a side that holds fewer than two voters of the channel's
    // partition: it must not be acknowledged (it can neither commit nor forward), once any
    // leadership the side held has lapsed (an election timeout; the caller waits 0.5 s).
    let probes = std::cell::Cell::new(0usize);
    let probe = |node: usize, side: &[usize], what: &str| {
        for (cid, p) in channels.iter().zip(partitions) {
            let voters = voters_of(agent, &http, token, *p);
            if voters.len() < 3 || voters.iter().filter(|v| side.contains(v)).count() >= 2 {
                continue;
            }
            let path = format!("/api/v1/channels/{cid}/messages");
            let text = format!("{what} probe");
            let body = json!({"text": text, "client_msg_id": text});
            let answer = call(agent, &http[node], "POST", &path, Some(token), Some(&body));
            if let Some((200 | 201, v)) = answer {
                panic!(
                    "node {} acknowledged a post while {what} (side {side:?}, voters \
                     {voters:?}): {v}",
                    node + 1
                );
            }
            probes.set(probes.get() + 1);
        }
    };
    let faults_for = std::env::var("CHORUS_FAULT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(FAULTS_FOR, Duration::from_secs);
    let kinds = if n >= 5 { KINDS.len() } else { KINDS.len() - 1 };
    let started = Instant::now();
    let mut round = 0usize;
    let mut faults = Vec::new();
    // When each fault began, for the report of unavailability windows.
    let mut began: Vec<(usize, Instant)> = Vec::new();
    // How long each node with a failing disk took to stop by itself.
    let mut disk_stops: Vec<Duration> = Vec::new();
    while started.elapsed() < faults_for {
        let kind = round % kinds;
        began.push((kind, Instant::now()));
        let victim = round % n;
        let others: Vec<usize> = (0..n).filter(|&x| x != victim).collect();
        match kind {
            0 | 4 => {
                let victim = match kind {
                    0 => victim,
                    _ => leader_of(agent, &http, token, partitions[0]).unwrap_or(victim),
                };
                nodes[victim].kill();
                faults.push(format!("{} node {}", KINDS[kind], victim + 1));
                std::thread::sleep(Duration::from_millis(1_000));
                nodes[victim].restart();
            }
            5 => {
                // A step of a rolling restart: the node hands its leaderships over,
                // drains and exits 0, and comes back on its data.
                let status = nodes[victim].terminate();
                assert!(status.success(), "node {} exited {status}", victim + 1);
                faults.push(format!("SIGTERM node {}", victim + 1));
                std::thread::sleep(Duration::from_millis(500));
                nodes[victim].restart();
            }
            6 => {
                // The node's disk fails every fsync: its next write of any group fails,
                // and the node stops (fail-stop, exit 74) rather than go on with a log it
                // cannot trust; it restarts on a good disk and is caught up by its peers.
                let file = cluster.fault_file(victim + 1);
                std::fs::write(&file, "fsync fails\n").expect("fault file");
                let failing = Instant::now();
                let status = nodes[victim].wait_exit(DISK_FAILURE_STOPS_WITHIN);
                let status = status.unwrap_or_else(|| {
                    panic!(
                        "node {} went on for {DISK_FAILURE_STOPS_WITHIN:?} with failing fsyncs",
                        victim + 1
                    )
                });
                assert_eq!(
                    status.code(),
                    Some(74),
                    "node {} exited {status}",
                    victim + 1
                );
                disk_stops.push(failing.elapsed());
                faults.push(format!(
                    "fsync fails on node {} (stopped in {:?})",
                    victim + 1,
                    failing.elapsed()
                ));
                std::fs::write(&file, "").expect("fault file");
                nodes[victim].restart();
            }
            1 => {
                nodes[victim].signal("-STOP");
                faults.push(format!("SIGSTOP node {}", victim + 1));
                std::thread::sleep(Duration::from_millis(1_000));
                nodes[victim].signal("-CONT");
            }
            2 => {
                split(&[victim]);
                faults.push(format!("node {} isolated", victim + 1));
                std::thread::sleep(Duration::from_millis(500));
                probe(victim, &[victim], "isolated");
                std::thread::sleep(Duration::from_millis(500));
                split(&[]);
            }
            3 => {
                let (a, b) = others.split_at(others.len() / 2);
                for &x in a {
                    cut(x, b);
                }
                for &x in b {
                    cut(x, a);
                }
                faults.push(format!("node {} a bridge", victim + 1));
                std::thread::sleep(Duration::from_millis(1_000));
                split(&[]);
            }
            _ => {
                let minority = [victim, (victim + 1) % n];
                split(&minority);
                faults.push(format!(
                    "nodes {} and {} apart from the rest",
                    minority[0] + 1,
                    minority[1] + 1
                ));
                std::thread::sleep(Duration::from_millis(500));
                probe(victim, &minority, "in the minority");
                std::thread::sleep(Duration::from_millis(500));
                split(&[]);
            }
        }
        std::thread::sleep(Duration::from_millis(1_000));
        round += 1;
    }
    let mut written = writer.finish();
    let reads = reader.finish();
    assert!(
        reads.stale.is_empty(),
        "{} of {} reads under the faults were stale: {:?}",
        reads.stale.len(),
        reads.reads,
        &reads.stale[..reads.stale.len().min(5)]
    );
    assert!(
        reads.reads > reads.refused,
        "every read under the faults was refused"
    );
    eprintln!(
        "reader: {} reads under the faults, {} refused, none stale",
        reads.reads, reads.refused
    );
    let (by_sdk, sdk_stats) = sdk.stop_writing();
    let sdk_acked: usize = by_sdk.acked.values().map(BTreeSet::len).sum();
    assert!(sdk_acked > 0, "nothing the SDK sent was acknowledged");
    eprintln!(
        "SDK writer: {} posts sent, {sdk_acked} acknowledged, over {} connections",
        by_sdk.sent.len(),
        sdk_stats.connections
    );
    for (cid, texts) in by_sdk.acked {
        written.acked.entry(cid).or_default().extend(texts);
    }
    written.sent.extend(by_sdk.sent);
    check(&work, &http, &written, &faults, &|| {
        nodes.iter().map(|n| n.log()).collect()
    });
    check_pushes(&sink, &written, faults.len());
    check_reader(sdk, &work, &written);
    let total: usize = written.acked.values().map(BTreeSet::len).sum();
    let shown = faults.len().min(8);
    eprintln!(
        "{n} nodes: faults: {} in all ({}{}); {} posts sent, {total} acknowledged, longest \
         without an acknowledgement {:?}; {} probes of a cut-off side refused",
        faults.len(),
        faults[..shown].join(", "),
        if shown < faults.len() { ", ..." } else { "" },
        written.sent.len(),
        written.longest,
        probes.get()
    );
    report_windows(&began, &written.ack_times);
    if !disk_stops.is_empty() {
        disk_stops.sort();
        eprintln!(
            "a node whose fsyncs fail stopped within (n = {}): median {:?}, largest {:?}",
            disk_stops.len(),
            disk_stops[disk_stops.len() / 2],
            disk_stops[disk_stops.len() - 1]
        );
    }
}

/// The pushes, once the faults healed: every acknowledged post is pushed to the reader
/// (decided on every node, sent only by the directory's leader, whoever that was when),
/// nothing never sent is pushed, and a push is repeated only across a change of the
/// sending node (reported; each carries the message's `event_id`, for the gateway).
fn check_pushes(sink: &Sink, written: &Written, faults: usize) {
    let texts = || -> Vec<String> {
        let bodies = sink.accepted();
        let body = |b: &Value| str_of(&b["notification"]["content"]["body"]);
        bodies.iter().map(body).collect()
    };
    let acked: BTreeSet<&String> = written.acked.values().flatten().collect();
    let deadline = Instant::now() + SETTLE;
    loop {
        let pushed: BTreeSet<String> = texts().into_iter().collect();
        let missing: Vec<&&String> = acked.iter().filter(|t| !pushed.contains(**t)).collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} acknowledged posts never pushed ({:?}...)",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));
    let all = texts();
    let mut per_text: BTreeMap<&String, usize> = BTreeMap::new();
    for t in &all {
        assert!(written.sent.contains(t), "a push of {t}, never sent");
        *per_text.entry(t).or_default() += 1;
    }
    let repeated: usize = per_text.values().map(|n| n - 1).sum();
    eprintln!(
        "pushes: all {} acknowledged posts pushed, {} pushes in all, {repeated} repeated \
         over {faults} faults",
        acked.len(),
        all.len()
    );
}

/// Prints, for each kind of fault, how long writes went unacknowledged around it: for
/// each fault, the longest gap between two acknowledgements that overlaps the time from
/// its start to the next fault's; then per kind the count, the median and the largest.
fn report_windows(began: &[(usize, Instant)], acks: &[Instant]) {
    let mut by_kind: Vec<Vec<Duration>> = vec![Vec::new(); KINDS.len()];
    for (i, (kind, start)) in began.iter().enumerate() {
        let end = began.get(i + 1).map_or(Instant::now(), |(_, s)| *s);
        let window = acks
            .windows(2)
            .filter(|w| w[1] > *start && w[0] < end)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default();
        by_kind[*kind].push(window);
    }
    for (kind, mut windows) in KINDS.iter().zip(by_kind) {
        if windows.is_empty() {
            continue;
        }
        windows.sort();
        eprintln!(
            "unavailability around {kind} (n = {}): median {:?}, largest {:?}",
            windows.len(),
            windows[windows.len() / 2],
            windows[windows.len() - 1]
        );
    }
}
