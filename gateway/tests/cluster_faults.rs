//! A fault test of a cluster against real processes (issue 18's nemeses, short pass):
//! three `chorus serve` nodes take posts to four channels through any node, while a
//! nemesis SIGKILLs and restarts nodes, SIGSTOPs and resumes them, isolates one, and cuts
//! the other two apart through a bridge (each node's fault file). After
//! the faults heal, the checker asks every node for every channel: each acknowledged post
//! is there exactly once, every node has the same posts at the same seqs, and nothing that
//! was never sent appears. It prints the longest time no post was acknowledged.

mod common;

use common::{ClusterConfig, Server, PASSWORD, UNLIMITED};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

const CHANNELS: usize = 4;
/// How long the nemesis runs, unless `CHORUS_FAULT_SECS` says otherwise (the long mode:
/// `CHORUS_FAULT_SECS=3600 cargo test --release -p chorus-gateway --test cluster_faults --
/// --nocapture` runs an hour of faults, one every 2 s).
const FAULTS_FOR: Duration = Duration::from_secs(16);
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
    while Instant::now() < deadline {
        for a in addrs {
            match call(agent, a, "POST", path, token, Some(body)) {
                Some((200 | 201, v)) => return Some(v),
                Some((503 | 401 | 404, _)) | None => {}
                Some((s, v)) => panic!("POST {path} at {a}: {s} {v}"),
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

#[test]
fn acknowledged_posts_survive_kills_and_stops_on_every_node() {
    let cluster = ClusterConfig::three();
    let config = |id: usize| cluster.node(id, UNLIMITED);
    let mut nodes: Vec<Server> = (1..=3).map(|id| Server::start(&config(id))).collect();
    let http: Vec<String> = nodes.iter().map(|s| s.addr.clone()).collect();
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(1))
        .max_idle_connections(0)
        .build();
    let setup = Instant::now() + SETTLE;
    let signup = json!({"email": "w@example.com", "password": PASSWORD, "name": "w"});
    let v = write(&agent, &http, "/api/v1/auth/signup", None, &signup, setup).expect("sign-up");
    let token = v["token"].as_str().unwrap().to_owned();
    let ws = write(
        &agent,
        &http,
        "/api/v1/workspaces",
        Some(&token),
        &json!({"name": "acme"}),
        setup,
    )
    .expect("workspace");
    let wid = ws["workspace"]["id"].as_str().unwrap().to_owned();
    let channels: Vec<String> = (0..CHANNELS)
        .map(|i| {
            let body = json!({"name": format!("c{i}"), "kind": "public"});
            let v = write(
                &agent,
                &http,
                &format!("/api/v1/workspaces/{wid}/channels"),
                Some(&token),
                &body,
                setup,
            )
            .expect("channel");
            v["channel"]["id"].as_str().unwrap().to_owned()
        })
        .collect();

    // The writer: one post at a time, round-robin over the channels, each with its own
    // client_msg_id (a retry after a lost answer is deduplicated); an answer 200 or 201 is
    // an acknowledgement.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, http, token, channels, agent) = (
            stop.clone(),
            http.clone(),
            token.clone(),
            channels.clone(),
            agent.clone(),
        );
        std::thread::spawn(move || {
            let mut acked: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            let mut ack_times = vec![Instant::now()];
            let mut sent = BTreeSet::new();
            let (mut last_ack, mut longest) = (Instant::now(), Duration::ZERO);
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let cid = &channels[n as usize % CHANNELS];
                let text = format!("p{n}");
                sent.insert(text.clone());
                let body = json!({"text": text, "client_msg_id": text});
                let path = format!("/api/v1/channels/{cid}/messages");
                let deadline = Instant::now() + Duration::from_secs(3);
                if write(&agent, &http, &path, Some(&token), &body, deadline).is_some() {
                    acked.entry(cid.clone()).or_default().insert(text);
                    longest = longest.max(last_ack.elapsed());
                    last_ack = Instant::now();
                    ack_times.push(last_ack);
                }
                n += 1;
            }
            ack_times.push(Instant::now());
            (acked, sent, longest, ack_times)
        })
    };

    // The nemesis: every 2 s one fault on a node chosen in turn, healed 1 s later: in turn
    // a SIGKILL (and restart), a SIGSTOP (and SIGCONT), the node isolated from both others
    // (the network halved, 1 | 2), and the node made a bridge (the other two cannot reach
    // each other, both reach it). The cuts go through each node's fault file.
    let cut = |id: usize, peers: &[usize]| {
        let lines: String = peers.iter().map(|p| format!("cut {}\n", p + 1)).collect();
        std::fs::write(cluster.fault_file(id + 1), lines).expect("fault file");
    };
    let faults_for = std::env::var("CHORUS_FAULT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(FAULTS_FOR, Duration::from_secs);
    let started = Instant::now();
    let mut round = 0usize;
    let mut faults = Vec::new();
    // When each fault began, for the report of unavailability windows.
    let mut began: Vec<(usize, Instant)> = Vec::new();
    while started.elapsed() < faults_for {
        began.push((round % 4, Instant::now()));
        let victim = round % 3;
        let others: Vec<usize> = (0..3).filter(|&n| n != victim).collect();
        match round % 4 {
            0 => {
                nodes[victim].kill();
                faults.push(format!("SIGKILL node {}", victim + 1));
                std::thread::sleep(Duration::from_millis(1_000));
                nodes[victim].restart();
            }
            1 => {
                nodes[victim].signal("-STOP");
                faults.push(format!("SIGSTOP node {}", victim + 1));
                std::thread::sleep(Duration::from_millis(1_000));
                nodes[victim].signal("-CONT");
            }
            2 => {
                cut(victim, &others);
                faults.push(format!("node {} isolated", victim + 1));
                // Once any leadership it held has lapsed (an election timeout), the
                // isolated node acknowledges nothing: it can neither commit nor forward.
                std::thread::sleep(Duration::from_millis(500));
                let path = format!("/api/v1/channels/{}/messages", channels[0]);
                let probe = json!({"text": "isolated probe", "client_msg_id": "isolated probe"});
                let answer = call(
                    &agent,
                    &http[victim],
                    "POST",
                    &path,
                    Some(&token),
                    Some(&probe),
                );
                if let Some((200 | 201, v)) = answer {
                    panic!(
                        "node {} acknowledged a post while isolated: {v}",
                        victim + 1
                    );
                }
                std::thread::sleep(Duration::from_millis(500));
                cut(victim, &[]);
            }
            _ => {
                cut(others[0], &others[1..]);
                faults.push(format!("node {} a bridge", victim + 1));
                std::thread::sleep(Duration::from_millis(1_000));
                cut(others[0], &[]);
            }
        }
        std::thread::sleep(Duration::from_millis(1_000));
        round += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (acked, sent, longest, ack_times) = writer.join().expect("writer");
    let total: usize = acked.values().map(BTreeSet::len).sum();
    assert!(total > 0, "nothing was acknowledged");

    // The checker, once every node has caught up.
    let settle = Instant::now() + SETTLE;
    for cid in &channels {
        let want = acked.get(cid).cloned().unwrap_or_default();
        let mut histories = Vec::new();
        for a in &http {
            let h = loop {
                let h = texts(&agent, a, &token, cid);
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
                    let logs: Vec<String> = nodes.iter().map(|n| n.log()).collect();
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
                .map(|a| texts(&agent, a, &token, cid).map_or(0, |h| h.len()))
                .collect();
            if lens.windows(2).all(|w| w[0] == w[1]) {
                let all: Vec<_> = http
                    .iter()
                    .map(|a| texts(&agent, a, &token, cid).unwrap_or_default())
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
    let shown = faults.len().min(8);
    eprintln!(
        "faults: {} in all ({}{}); {} posts sent, {total} acknowledged, longest without an \
         acknowledgement {longest:?}",
        faults.len(),
        faults[..shown].join(", "),
        if shown < faults.len() { ", ..." } else { "" },
        sent.len()
    );
    report_windows(&began, &ack_times);
}

/// Prints, for each kind of fault, how long writes went unacknowledged around it: for
/// each fault, the longest gap between two acknowledgements that overlaps the time from
/// its start to the next fault's; then per kind the count, the median and the largest.
fn report_windows(began: &[(usize, Instant)], acks: &[Instant]) {
    const KINDS: [&str; 4] = ["SIGKILL", "SIGSTOP", "isolated", "bridge"];
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
