//! The committed-event consumer seam end to end, through its proof consumer: the messages
//! posted per workspace in `/metrics` are counted from the log exactly once, and after a
//! SIGKILL the counter resumes from the cursor it stored with its counts, so nothing is
//! counted twice or missed.

mod common;

use common::{Server, User, UNLIMITED};
use std::time::{Duration, Instant};

/// How long the counter may take to catch up with what was posted (a guard, not a timing).
const CATCH_UP_WAIT: Duration = Duration::from_secs(20);

fn metric_name(workspace: &str) -> String {
    format!("chorus_workspace_messages_total{{workspace=\"{workspace}\"}}")
}

/// The count of a workspace, or 0 before its first message.
fn count(server: &Server, workspace: &str) -> u64 {
    let text = server.raw("GET", "/metrics", &[], None).text;
    let name = metric_name(workspace);
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name.as_str())?
                .strip_prefix(' ')?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// Waits until every workspace's count is what was posted; a count above it anywhere, at
/// any moment, is a message counted twice.
#[track_caller]
fn wait_for(server: &Server, want: &[(&str, u64)]) {
    let deadline = Instant::now() + CATCH_UP_WAIT;
    loop {
        let got: Vec<u64> = want.iter().map(|(w, _)| count(server, w)).collect();
        for ((w, n), g) in want.iter().zip(&got) {
            assert!(
                g <= n,
                "workspace {w} counted {g} of {n} messages: some twice"
            );
        }
        if want.iter().zip(&got).all(|((_, n), g)| g == n) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "counts {got:?}, want {want:?} after {CATCH_UP_WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn post_many(server: &Server, user: &User, channels: &[&str], n: usize, tag: &str) {
    for i in 0..n {
        server.post(user, channels[i % channels.len()], &format!("{tag} {i}"));
    }
}

// Counts per workspace match what was posted, survive SIGKILLs at any point (right after
// posting, right after catching up), and never count a message twice.
#[test]
fn workspace_counts_survive_sigkill_exactly_once() {
    let mut server = Server::start(UNLIMITED);
    let alice = server.signup("alice");
    let bob = server.signup("bob");
    let wa = server.workspace(&alice, &[]);
    let wb = server.workspace(&bob, &[]);
    let a1 = server.channel(&wa, &alice, "one", &[]);
    let a2 = server.channel(&wa, &alice, "two", &[]);
    let b1 = server.channel(&wb, &bob, "general", &[]);

    post_many(&server, &alice, &[&a1, &a2], 30, "first");
    post_many(&server, &bob, &[&b1], 20, "first");
    wait_for(&server, &[(&wa, 30), (&wb, 20)]);

    // Killed right after posting: the counter may not have read, or stored, the last ones.
    post_many(&server, &alice, &[&a1, &a2], 25, "second");
    post_many(&server, &bob, &[&b1], 5, "second");
    server.kill();
    server.restart();
    wait_for(&server, &[(&wa, 55), (&wb, 25)]);

    // Killed right after catching up: the stored cursor may lag the shown counts.
    server.kill();
    server.restart();
    wait_for(&server, &[(&wa, 55), (&wb, 25)]);
    post_many(&server, &alice, &[&a2], 7, "third");
    wait_for(&server, &[(&wa, 62), (&wb, 25)]);

    // A clean drain stores the last counts too.
    assert!(server.terminate().success());
    server.restart();
    wait_for(&server, &[(&wa, 62), (&wb, 25)]);
}
