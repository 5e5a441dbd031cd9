//! Search (`API.md` §12) end to end on the real binary: the query language and its
//! operators, CJK, highlights, sorting and paging, edits and deletions, people search,
//! freshness (found within a second of the ack), isolation under every operator, restart
//! after SIGKILL, and an index rebuilt from the logs when it is deleted or damaged.

mod common;

use common::{str_of, Server, User, UNLIMITED};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// How long the index may take to catch up after a start (a guard, not a timing).
const CATCH_UP_WAIT: Duration = Duration::from_secs(30);
/// The freshness the API promises.
const FRESH: Duration = Duration::from_secs(1);

fn search_raw(server: &Server, user: &User, wid: &str, params: &str) -> common::Resp {
    let path = format!("/api/v1/workspaces/{wid}/search/messages?{params}");
    server.call("GET", &path, Some(&user.token), None)
}

/// A search that must succeed; returns the body.
#[track_caller]
fn search(server: &Server, user: &User, wid: &str, q: &str) -> Value {
    search_with(server, user, wid, q, "")
}

#[track_caller]
fn search_with(server: &Server, user: &User, wid: &str, q: &str, extra: &str) -> Value {
    let r = search_raw(
        server,
        user,
        wid,
        &format!("q={}{extra}", common::query_encode(q)),
    );
    assert_eq!(r.status, 200, "q={q}: {}", r.text);
    r.body
}

/// The texts of the results, in order.
#[track_caller]
fn texts(server: &Server, user: &User, wid: &str, q: &str) -> Vec<String> {
    let body = search(server, user, wid, q);
    let results = body["results"].as_array().expect("results");
    assert_eq!(
        body["total"].as_u64().unwrap() as usize,
        results.len(),
        "q={q}: {body}"
    );
    results
        .iter()
        .map(|r| str_of(&r["message"]["text"]))
        .collect()
}

/// Waits until `q` has `n` results; returns when it had them. Waiting for more than 0,
/// more than `n` at any moment is a message indexed twice; waiting for 0 is waiting for
/// results to go.
#[track_caller]
fn wait_total(server: &Server, user: &User, wid: &str, q: &str, n: u64) -> Instant {
    let deadline = Instant::now() + CATCH_UP_WAIT;
    loop {
        let total = search(server, user, wid, q)["total"].as_u64().unwrap();
        assert!(
            n == 0 || total <= n,
            "q={q}: {total} results, want {n}: indexed twice?"
        );
        if total == n {
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "q={q}: {total} of {n} after {CATCH_UP_WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

// Every query feature of §12 on one workspace: folding, phrases, exclusion, prefixes,
// fuzzy words ranked below exact ones, CJK runs, highlights, operators, sort and paging,
// edits, deletions, errors, and the people search.
#[test]
fn query_language() {
    let server = Server::start(UNLIMITED);
    let alice = server.signup("alice");
    let bob = server.signup("bob");
    let wid = server.workspace(&alice, &[&bob]);
    let general = server.channel(&wid, &alice, "general", &[&bob]);
    let random = server.channel(&wid, &alice, "random", &[&bob]);
    let post = |u: &User, c: &str, t: &str| server.post(u, c, t);
    let m_cafe = post(&alice, &general, "Café CRÈME at noon");
    post(&alice, &general, "the build failed again");
    post(&bob, &general, "failed to build the docs");
    post(&bob, &random, "deployment finished");
    post(&bob, &random, "deploymant finished with a typo");
    post(&alice, &random, "a cat sat");
    post(&alice, &random, "a cut finger");
    post(&alice, &general, "東京都に行きます");
    post(&bob, &general, "한국어 공부");
    let root = post(&alice, &general, "thread root about llamas");
    let reply_path = format!("/api/v1/channels/{general}/messages");
    let root_id = str_of(&root["id"]);
    server.ok(
        "POST",
        &reply_path,
        &bob,
        Some(json!({"text": "reply about llamas", "thread_id": root_id})),
        201,
    );
    let edited = post(&alice, &general, "original wording zeppelin");
    let deleted = post(&alice, &general, "doomed message walrus");
    // A body over 64 KiB lives in the blob store; it is indexed all the same.
    let long = format!("{} needleinblob", "filler ".repeat(10_000));
    post(&alice, &random, &long);
    let last = post(&alice, &general, "zzlast marker");
    wait_total(&server, &alice, &wid, "zzlast", 1);

    let blob = search(&server, &alice, &wid, "needleinblob");
    assert_eq!(blob["total"], 1);
    assert_eq!(blob["results"][0]["highlights"], json!([[70_001, 70_013]]));

    // Folding for case and accents, both ways.
    for q in ["cafe", "CAFÉ", "crème", "Creme"] {
        assert_eq!(
            texts(&server, &alice, &wid, q),
            ["Café CRÈME at noon"],
            "{q}"
        );
    }
    // Phrases keep word order; words alone do not.
    assert_eq!(
        texts(&server, &alice, &wid, "\"build failed\""),
        ["the build failed again"]
    );
    assert_eq!(texts(&server, &alice, &wid, "build failed").len(), 2);
    // Exclusion.
    assert_eq!(
        texts(&server, &alice, &wid, "failed -docs"),
        ["the build failed again"]
    );
    assert_eq!(
        texts(&server, &alice, &wid, "failed -\"the docs\""),
        ["the build failed again"]
    );
    // Prefix.
    assert_eq!(texts(&server, &alice, &wid, "deploym*").len(), 2);
    assert_eq!(texts(&server, &alice, &wid, "llam*").len(), 2);
    // One edit away for words of 5+ letters, ranked below the exact match.
    assert_eq!(
        texts(&server, &alice, &wid, "deployment"),
        ["deployment finished", "deploymant finished with a typo"]
    );
    assert_eq!(
        texts(&server, &alice, &wid, "deplyoment"),
        ["deployment finished"],
        "a swap is one edit"
    );
    assert_eq!(
        texts(&server, &alice, &wid, "\"deployment\""),
        ["deployment finished"]
    );
    // Shorter words match exactly.
    assert_eq!(texts(&server, &alice, &wid, "cat"), ["a cat sat"]);
    // CJK: any run of 2+ characters, and nothing that is not a run of the text.
    assert_eq!(texts(&server, &alice, &wid, "東京"), ["東京都に行きます"]);
    assert_eq!(texts(&server, &alice, &wid, "京都に"), ["東京都に行きます"]);
    assert!(texts(&server, &alice, &wid, "東都").is_empty());
    assert_eq!(texts(&server, &alice, &wid, "국어"), ["한국어 공부"]);

    // Highlights in Unicode scalar values into message.text.
    let hl = |q: &str| search(&server, &alice, &wid, q)["results"][0]["highlights"].clone();
    assert_eq!(hl("creme"), json!([[5, 10]]));
    assert_eq!(hl("京都"), json!([[1, 3]]));
    assert_eq!(hl("deplyoment"), json!([[0, 10]]));
    assert_eq!(hl("\"build failed\""), json!([[4, 16]]));
    assert_eq!(hl("deploym* -typo"), json!([[0, 10]]));
    assert_eq!(
        search(&server, &alice, &wid, "cafe")["results"][0]["message"]["id"],
        m_cafe["id"]
    );

    // Operators.
    let day = &str_of(&last["created_at"])[..10];
    assert_eq!(texts(&server, &alice, &wid, "finished in:#random").len(), 2);
    assert!(texts(&server, &alice, &wid, "finished in:#general").is_empty());
    assert_eq!(
        texts(&server, &alice, &wid, &format!("finished in:{random}")).len(),
        2
    );
    assert_eq!(
        texts(&server, &bob, &wid, "failed from:me"),
        ["failed to build the docs"]
    );
    assert_eq!(
        texts(&server, &bob, &wid, &format!("failed from:{}", alice.id)),
        ["the build failed again"]
    );
    assert_eq!(
        texts(&server, &alice, &wid, &format!("zzlast on:{day}")).len(),
        1
    );
    assert_eq!(
        texts(&server, &alice, &wid, "zzlast after:2000-01-01").len(),
        1
    );
    assert!(texts(&server, &alice, &wid, "zzlast before:2000-01-01").is_empty());
    assert!(texts(&server, &alice, &wid, "zzlast on:2000-01-01").is_empty());
    assert!(texts(&server, &alice, &wid, &format!("zzlast before:{day}")).is_empty());
    assert!(texts(&server, &alice, &wid, &format!("zzlast after:{day}")).is_empty());
    assert_eq!(
        texts(&server, &alice, &wid, "llamas is:thread"),
        ["reply about llamas"]
    );
    let react = format!(
        "/api/v1/channels/{general}/messages/{}/reactions/tada",
        str_of(&m_cafe["id"])
    );
    server.ok("PUT", &react, &bob, None, 204);
    wait_total(&server, &alice, &wid, "has:reaction", 1);
    assert_eq!(
        texts(&server, &alice, &wid, "has:reaction"),
        ["Café CRÈME at noon"]
    );
    server.ok("DELETE", &react, &bob, None, 204);
    wait_total(&server, &alice, &wid, "has:reaction", 0);
    // A message posted with a file has a file, through a reaction's rewrite of its
    // document too; no other does.
    assert!(texts(&server, &alice, &wid, "has:file").is_empty());
    let fid = common::upload_file(&server, &alice, &wid);
    let m_file = server.ok(
        "POST",
        &format!("/api/v1/channels/{general}/messages"),
        &alice,
        Some(json!({"text": "the zzattached notes", "file_ids": [fid]})),
        201,
    );
    wait_total(&server, &alice, &wid, "has:file", 1);
    let react = format!(
        "/api/v1/channels/{general}/messages/{}/reactions/tada",
        str_of(&m_file["message"]["id"])
    );
    server.ok("PUT", &react, &bob, None, 204);
    wait_total(&server, &alice, &wid, "has:file has:reaction", 1);
    assert_eq!(
        texts(&server, &alice, &wid, "zzattached has:file"),
        ["the zzattached notes"]
    );
    server.ok("DELETE", &react, &bob, None, 204);

    // Edits replace the searched text; deletions remove the message.
    let edit_path = format!(
        "/api/v1/channels/{general}/messages/{}",
        str_of(&edited["id"])
    );
    server.ok(
        "PATCH",
        &edit_path,
        &alice,
        Some(json!({"text": "rewritten wording blimp"})),
        200,
    );
    let del_path = format!(
        "/api/v1/channels/{general}/messages/{}",
        str_of(&deleted["id"])
    );
    server.ok("DELETE", &del_path, &alice, None, 204);
    wait_total(&server, &alice, &wid, "blimp", 1);
    wait_total(&server, &alice, &wid, "walrus", 0);
    assert!(texts(&server, &alice, &wid, "zeppelin").is_empty());
    assert_eq!(
        texts(&server, &alice, &wid, "wording"),
        ["rewritten wording blimp"]
    );

    // Sort by newest, paging with cursors, and an exact total.
    for i in 0..7 {
        post(&alice, &random, &format!("pager item{i}"));
    }
    wait_total(&server, &alice, &wid, "pager", 7);
    let mut seen = Vec::new();
    let mut cursor = String::new();
    loop {
        let body = search_with(
            &server,
            &alice,
            &wid,
            "pager",
            &format!("&sort=newest&limit=3{cursor}"),
        );
        assert_eq!(body["total"], 7);
        for r in body["results"].as_array().unwrap() {
            seen.push(str_of(&r["message"]["text"]));
        }
        match body["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => break,
        }
    }
    let want: Vec<String> = (0..7).rev().map(|i| format!("pager item{i}")).collect();
    assert_eq!(seen, want);

    // Bad input is a 400 with a message; the server stays up.
    for params in [
        "q=".to_owned(),
        format!("q={}", "a".repeat(1001)),
        "q=x&limit=0".into(),
        "q=x&limit=101".into(),
        "q=x&sort=oldest".into(),
        "q=x&cursor=bogus".into(),
        format!("q={}", common::query_encode("before:2024-02-30")),
        format!("q={}", common::query_encode("has:everything")),
        format!("q={}", common::query_encode("from:someone")),
        format!("q={}", common::query_encode("-in:#general")),
    ] {
        search_raw(&server, &alice, &wid, &params).assert_error(400, "invalid_request");
    }
    let stranger = server.signup("stranger");
    search_raw(&server, &stranger, &wid, "q=cafe").assert_error(404, "not_found");
    assert_eq!(texts(&server, &alice, &wid, "cafe").len(), 1);

    // People: a prefix of a name word or of the email, among the workspace's members.
    let people = |q: &str| {
        let path = format!(
            "/api/v1/workspaces/{wid}/search/users?q={}",
            common::query_encode(q)
        );
        let v = server.ok("GET", &path, &alice, None, 200);
        v["users"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| str_of(&u["email"]))
            .collect::<Vec<_>>()
    };
    assert_eq!(people("BO"), ["bob@example.com"]);
    assert_eq!(people("alice@exa"), ["alice@example.com"]);
    assert_eq!(sorted(people("")), ["alice@example.com", "bob@example.com"]);
    assert!(people("stranger").is_empty());
    let path = format!("/api/v1/workspaces/{wid}/search/users?q=a&limit=1");
    let page = server.ok("GET", &path, &alice, None, 200);
    assert_eq!(page["users"].as_array().unwrap().len(), 1);
    assert!(page["next_cursor"].is_null());
}

// Every message of a burst is found within one second of its ack: one thread posts the
// burst and notes each ack, while the test searches for the newest messages without
// pause and notes when each first appears.
#[test]
fn freshness() {
    const BURST: usize = 50;
    let server = Server::start(UNLIMITED);
    let alice = server.signup("alice");
    let wid = server.workspace(&alice, &[]);
    let general = server.channel(&wid, &alice, "general", &[]);
    let acks = std::sync::Mutex::new(std::collections::HashMap::new());
    let mut seen: std::collections::HashMap<String, Instant> = Default::default();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for i in 0..BURST {
                let m = server.post(&alice, &general, &format!("burst{i} fresh"));
                acks.lock()
                    .unwrap()
                    .insert(str_of(&m["id"]), Instant::now());
            }
        });
        let deadline = Instant::now() + CATCH_UP_WAIT;
        while seen.len() < BURST {
            assert!(Instant::now() < deadline, "{} of {BURST} found", seen.len());
            let page = search_with(&server, &alice, &wid, "fresh", "&sort=newest&limit=100");
            let now = Instant::now();
            for r in page["results"].as_array().unwrap() {
                seen.entry(str_of(&r["message"]["id"])).or_insert(now);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    let acks = acks.into_inner().unwrap();
    assert_eq!(acks.len(), BURST);
    for (id, acked) in &acks {
        // Seen before the ack reached the poster counts as no delay.
        let took = seen[id].saturating_duration_since(*acked);
        assert!(
            took < FRESH,
            "{id} found {took:?} after its ack; commits {} taking {} s, the longest {} s",
            server.metric("chorus_search_index_commits_total"),
            server.metric("chorus_search_index_commit_seconds_total"),
            server.metric("chorus_search_index_commit_seconds_max"),
        );
    }
    let page = search(&server, &alice, &wid, "fresh");
    assert_eq!(
        page["results"].as_array().unwrap().len(),
        20,
        "one page of 20"
    );
    assert_eq!(page["total"], BURST);
}

// Messages posted close together become searchable in one index commit: a batch gathers
// for a window after its first event instead of committing at once (a commit's cost is
// mostly fixed, so back-to-back commits cost a node more than its deliveries did). Two
// posts whose acks are well inside the window must share a commit; an attempt whose
// posts came further apart (a stalled machine) proves nothing and is tried again.
#[test]
fn close_posts_share_one_commit() {
    const WINDOW: Duration = chorus_search::indexer::BATCH_WINDOW;
    let server = Server::start(UNLIMITED);
    let alice = server.signup("alice");
    let wid = server.workspace(&alice, &[]);
    let general = server.channel(&wid, &alice, "general", &[]);
    let commits = || server.metric("chorus_search_index_commits_total") as u64;
    // The commit count once nothing is left to index: unchanged over three windows.
    let settled = || {
        let mut last = commits();
        loop {
            std::thread::sleep(WINDOW * 3);
            let now = commits();
            if now == last {
                return now;
            }
            last = now;
        }
    };
    let words = [
        "amber", "birch", "cedar", "delta", "ember", "fjord", "grove", "heron", "inlet", "juniper",
    ];
    let mut shared = 0;
    for word in words {
        let before = settled();
        let first = server.post(&alice, &general, &format!("{word} one"));
        let acked = Instant::now();
        let second = server.post(&alice, &general, &format!("{word} two"));
        let gap = acked.elapsed();
        wait_total(&server, &alice, &wid, word, 2);
        let made = settled() - before;
        assert!(made >= 1, "two posts searchable without a commit?");
        if gap < WINDOW / 3 {
            assert_eq!(
                made,
                1,
                "{} and {} acked {gap:?} apart took {made} commits",
                str_of(&first["id"]),
                str_of(&second["id"]),
            );
            shared += 1;
        }
        if shared == 3 {
            return;
        }
    }
    panic!(
        "only {shared} of 10 attempts posted twice within {:?}",
        WINDOW / 3
    );
}

// A member finds only what they may read, under every operator: never a private channel
// they are not in, never another workspace, and in: naming either matches nothing.
#[test]
fn isolation_under_every_operator() {
    let server = Server::start(UNLIMITED);
    let alice = server.signup("alice");
    let bob = server.signup("bob");
    let carol = server.signup("carol");
    let w1 = server.workspace(&alice, &[&bob]);
    let w2 = server.workspace(&carol, &[&alice, &bob]);
    let open = server.channel(&w1, &alice, "open", &[]); // public; bob is not a member
    let private = {
        let path = format!("/api/v1/workspaces/{w1}/channels");
        let v = server.ok(
            "POST",
            &path,
            &alice,
            Some(json!({"name": "secret", "kind": "private"})),
            201,
        );
        str_of(&v["channel"]["id"])
    };
    let other = server.channel(&w2, &carol, "open", &[&alice]);
    let mut last = String::new();
    for (user, cid) in [
        (&alice, &open),
        (&alice, &private),
        (&carol, &other),
        (&alice, &other),
    ] {
        let m = server.post(user, cid, "zebra crossing");
        let path = format!("/api/v1/channels/{cid}/messages");
        server.ok(
            "POST",
            &path,
            user,
            Some(json!({"text": "zebra reply", "thread_id": m["id"]})),
            201,
        );
        let react = format!(
            "/api/v1/channels/{cid}/messages/{}/reactions/tada",
            str_of(&m["id"])
        );
        server.ok("PUT", &react, user, None, 204);
        last = str_of(&m["created_at"])[..10].to_owned();
    }
    server.post(&alice, &open, "zzdone");
    wait_total(&server, &alice, &w1, "zzdone", 1);
    wait_total(&server, &alice, &w2, "zebra", 4);

    let queries = [
        "zebra".to_owned(),
        "zebr*".into(),
        "\"zebra crossing\"".into(),
        "zebraa".into(),
        "crossing -reply".into(),
        "has:reaction".into(),
        "is:thread".into(),
        format!("on:{last}"),
        "after:2000-01-01".into(),
        "before:2999-01-01".into(),
        format!("from:{}", alice.id),
        format!("from:{}", carol.id),
        "from:me".into(),
        format!("in:{open}"),
        format!("in:{private}"),
        format!("in:{other}"),
        "in:#secret".into(),
        "in:#open zebra".into(),
    ];
    // Every match counted is one a page shows: hits are read by the rule that chose them.
    let whole = |body: &Value, who: &str, q: &str| {
        let shown = body["results"].as_array().unwrap().len() as u64;
        assert_eq!(Some(shown), body["total"].as_u64(), "{who}, q={q}: {body}");
    };
    for q in &queries {
        // Bob, in w1: only the public channel he is not even a member of.
        let body = search_with(&server, &bob, &w1, q, "&limit=100");
        whole(&body, "bob in w1", q);
        for r in body["results"].as_array().unwrap() {
            assert_eq!(
                r["message"]["channel_id"],
                json!(open),
                "bob in w1, q={q}: {r}"
            );
        }
        // Alice, in w1: her channels of w1, never w2's.
        let body = search_with(&server, &alice, &w1, q, "&limit=100");
        whole(&body, "alice in w1", q);
        for r in body["results"].as_array().unwrap() {
            let c = str_of(&r["message"]["channel_id"]);
            assert!(c == open || c == private, "alice in w1, q={q}: {r}");
        }
        // Bob, in w2: a member of w2 but not of its channel... which is public, so readable;
        // never w1's.
        let body = search_with(&server, &bob, &w2, q, "&limit=100");
        whole(&body, "bob in w2", q);
        for r in body["results"].as_array().unwrap() {
            assert_eq!(
                r["message"]["channel_id"],
                json!(other),
                "bob in w2, q={q}: {r}"
            );
        }
    }
    assert_eq!(search(&server, &bob, &w1, "zebra")["total"], 2);
    assert_eq!(
        search(&server, &bob, &w1, &format!("in:{private}"))["total"],
        0
    );
    assert_eq!(search(&server, &bob, &w1, "in:#secret")["total"], 0);
    assert_eq!(
        search(&server, &bob, &w1, &format!("in:{other}"))["total"],
        0
    );
    assert_eq!(search(&server, &alice, &w1, "zebra")["total"], 4);
    assert_eq!(search(&server, &alice, &w2, "zebra")["total"], 4);
    // People search stays within the workspace too.
    let path = format!("/api/v1/workspaces/{w1}/search/users?q=carol");
    assert_eq!(
        server.ok("GET", &path, &alice, None, 200)["users"],
        json!([])
    );
    let outsider = server.signup("dave");
    search_raw(&server, &outsider, &w1, "q=zebra").assert_error(404, "not_found");
}

// After SIGKILL the index resumes from the cursor in its last commit: a message acked just
// before the kill is found, and nothing is indexed twice. An index deleted or damaged
// while the server is down, or deleted while it runs, is rebuilt from the logs in the
// background, and /metrics says so.
#[test]
fn restart_and_rebuild() {
    let mut server = Server::start(UNLIMITED);
    let alice = server.signup("alice");
    let wid = server.workspace(&alice, &[]);
    let general = server.channel(&wid, &alice, "general", &[]);
    for i in 0..30 {
        server.post(&alice, &general, &format!("kiwi number{i}"));
    }
    wait_total(&server, &alice, &wid, "kiwi", 30);
    assert_eq!(
        server.metric("chorus_search_index_state{state=\"ready\"}"),
        1.0
    );
    for i in 30..40 {
        server.post(&alice, &general, &format!("kiwi number{i}"));
    }
    server.post(&alice, &general, "kiwi lastbeforekill");
    server.kill();
    server.restart();
    wait_total(&server, &alice, &wid, "lastbeforekill", 1);
    wait_total(&server, &alice, &wid, "kiwi", 41);
    assert_eq!(server.metric("chorus_search_index_rebuilds_total"), 0.0);

    // Deleted while stopped: rebuilt from the logs.
    assert!(server.terminate().success());
    let index = server.dir().join("data").join("search");
    std::fs::remove_dir_all(&index).unwrap();
    server.restart();
    assert_eq!(server.metric("chorus_search_index_rebuilds_total"), 1.0);
    wait_total(&server, &alice, &wid, "kiwi", 41);
    wait_ready(&server);
    // Ready means the metadata log is indexed too: people search finds its users.
    let path = format!("/api/v1/workspaces/{wid}/search/users?q=alice");
    let users = server.ok("GET", &path, &alice, None, 200)["users"].clone();
    assert_eq!(users.as_array().map(Vec::len), Some(1), "{users}");

    // Damaged while stopped: moved aside and rebuilt.
    server.kill();
    let commit_point = chorus_search::directory::IndexDirectory::commit_point_files(&index);
    assert!(!commit_point.is_empty());
    for file in commit_point {
        std::fs::write(file, b"{ not json").unwrap();
    }
    server.restart();
    assert_eq!(server.metric("chorus_search_index_rebuilds_total"), 1.0);
    wait_total(&server, &alice, &wid, "kiwi", 41);
    wait_ready(&server);
    assert!(server.dir().join("data").join("search.corrupt").exists());

    // Deleted while running: the next commit fails, and the index starts over. The indexer
    // may write a file into the directory while it is being removed: remove until gone.
    let deadline = Instant::now() + CATCH_UP_WAIT;
    while let Err(e) = std::fs::remove_dir_all(&index) {
        if e.kind() == std::io::ErrorKind::NotFound {
            break;
        }
        assert!(Instant::now() < deadline, "remove {}: {e}", index.display());
        std::thread::sleep(Duration::from_millis(10));
    }
    server.post(&alice, &general, "kiwi afterdeletion");
    let deadline = Instant::now() + CATCH_UP_WAIT;
    while server.metric("chorus_search_index_rebuilds_total") < 2.0 {
        assert!(
            Instant::now() < deadline,
            "the deleted index was not rebuilt"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_total(&server, &alice, &wid, "kiwi", 42);
    wait_ready(&server);
}

#[track_caller]
fn wait_ready(server: &Server) {
    let deadline = Instant::now() + CATCH_UP_WAIT;
    while server.metric("chorus_search_index_state{state=\"ready\"}") != 1.0 {
        assert!(Instant::now() < deadline, "the index never became ready");
        std::thread::sleep(Duration::from_millis(20));
    }
}
