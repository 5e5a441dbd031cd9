//! File search (`API.md` §12, `GET /workspaces/{wid}/search/files`) on the real binary:
//! files found by name and by the text of text, code and PDF files; only files the caller
//! may read (the files API's rule), never another workspace's; deleted files and unshared
//! ones gone; paging with cursors and an exact total; highlights into the name and a
//! snippet of the text; bad input refused; text extracted after a SIGKILL.
//!
//! Uploads go through the Python `requests` client, as in `files.rs` (CI installs it).

mod common;

use common::{pdf, str_of, Server, User, UNLIMITED};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// How long the index may take to show a change (a guard, not a timing: files wait for
/// their text to be extracted, PDFs in a worker process).
const WAIT: Duration = Duration::from_secs(30);

fn search_raw(s: &Server, user: &User, wid: &str, params: &str) -> common::Resp {
    let path = format!("/api/v1/workspaces/{wid}/search/files?{params}");
    s.call("GET", &path, Some(&user.token), None)
}

/// A file search that must succeed; returns the body.
#[track_caller]
fn search(s: &Server, user: &User, wid: &str, q: &str) -> Value {
    let r = search_raw(s, user, wid, &format!("q={}", common::query_encode(q)));
    assert_eq!(r.status, 200, "q={q}: {}", r.text);
    r.body
}

/// The names of the files found, in order; the total must be the page's length.
#[track_caller]
fn names(s: &Server, user: &User, wid: &str, q: &str) -> Vec<String> {
    let body = search(s, user, wid, q);
    let results = body["results"].as_array().expect("results");
    assert_eq!(
        body["total"].as_u64().unwrap() as usize,
        results.len(),
        "q={q}: {body}"
    );
    results.iter().map(|r| str_of(&r["file"]["name"])).collect()
}

/// Waits until `q` finds exactly the files named `want` (in any order); returns the body.
#[track_caller]
fn wait_names(s: &Server, user: &User, wid: &str, q: &str, want: &[&str]) -> Value {
    let deadline = Instant::now() + WAIT;
    let mut want: Vec<String> = want.iter().map(|n| (*n).to_owned()).collect();
    want.sort();
    loop {
        let body = search(s, user, wid, q);
        let mut got: Vec<String> = body["results"]
            .as_array()
            .expect("results")
            .iter()
            .map(|r| str_of(&r["file"]["name"]))
            .collect();
        got.sort();
        if got == want && body["total"] == want.len() {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "q={q}: found {got:?}, want {want:?} after {WAIT:?}\n{}",
            s.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Uploads `bytes` as `name` with the Python `requests` client; returns the file.
#[track_caller]
fn upload(s: &Server, user: &User, wid: &str, name: &str, ctype: &str, bytes: &[u8]) -> Value {
    let r = common::upload_with_requests(s, user, wid, name, ctype, bytes);
    assert_eq!(r["status"], 201, "{r}\n{}", s.log());
    r["body"]["file"].clone()
}

fn share(s: &Server, user: &User, cid: &str, file: &Value) -> Value {
    let path = format!("/api/v1/channels/{cid}/messages");
    let body = json!({"text": "", "file_ids": [str_of(&file["id"])]});
    s.ok("POST", &path, user, Some(body), 201)["message"].clone()
}

// Name, text, code and PDF matches, with highlights into the name and a snippet of the
// text; the file object is the files API's; deletion removes a file from results.
#[test]
fn finds_by_name_and_text() {
    let s = Server::start(UNLIMITED);
    let alice = s.signup("alice");
    let wid = s.workspace(&alice, &[]);
    let report = upload(
        &s,
        &alice,
        &wid,
        "Quarterly-Report.txt",
        "text/plain",
        b"Q3 summary\n\nRevenue   grew 12% in the north.\n",
    );
    upload(
        &s,
        &alice,
        &wid,
        "widgets.rs",
        "application/octet-stream",
        b"/// Turns widgets around.\nfn frobnicate_widget(w: &mut Widget) {\n    w.spin();\n}\n",
    );
    upload(
        &s,
        &alice,
        &wid,
        "scan.pdf",
        "application/pdf",
        &pdf(&["Minutes of the zanzibar meeting", "Budget approved"]),
    );
    // Not UTF-8, though named and typed as text: found by name, never by what the bytes
    // spell.
    let mut binary = b"\x01\x02 hiddenword ".to_vec();
    binary.extend_from_slice(&[0xff; 64]);
    upload(&s, &alice, &wid, "blob-Café.txt", "text/plain", &binary);

    // The PDF's text is extracted in a worker process: wait for it.
    let found = wait_names(&s, &alice, &wid, "zanzibar", &["scan.pdf"]);
    let hit = &found["results"][0];
    assert_eq!(hit["highlights"], json!([]), "the name did not match");
    assert_eq!(
        hit["snippet"]["text"],
        "Minutes of the zanzibar meeting Budget approved"
    );
    assert_eq!(hit["snippet"]["highlights"], json!([[15, 23]]));
    assert_eq!(
        wait_names(&s, &alice, &wid, "\"budget approved\"", &["scan.pdf"])["total"],
        1
    );

    // A name match: highlights in the name's scalar values, no snippet when the text did
    // not match.
    let body = wait_names(&s, &alice, &wid, "quarterly", &["Quarterly-Report.txt"]);
    let hit = &body["results"][0];
    assert_eq!(hit["highlights"], json!([[0, 9]]));
    assert_eq!(hit["snippet"], Value::Null);
    // The file object is the one the files API answers.
    let direct = s.ok(
        "GET",
        &format!("/api/v1/files/{}", str_of(&report["id"])),
        &alice,
        None,
        200,
    );
    let mut got = hit["file"].clone();
    let mut want = direct["file"].clone();
    got.as_object_mut().unwrap().remove("previews");
    want.as_object_mut().unwrap().remove("previews");
    assert_eq!(got, want);

    // A text match: a snippet with whitespace folded and its own highlights.
    let body = wait_names(&s, &alice, &wid, "revenue", &["Quarterly-Report.txt"]);
    let hit = &body["results"][0];
    assert_eq!(hit["highlights"], json!([]));
    assert_eq!(
        hit["snippet"],
        json!({"text": "Q3 summary Revenue grew 12% in the north.", "highlights": [[11, 18]]})
    );
    // A word in the name and another in the text: both required, each marked where found.
    let body = wait_names(&s, &alice, &wid, "report north", &["Quarterly-Report.txt"]);
    assert_eq!(body["results"][0]["highlights"], json!([[10, 16]]));
    assert_eq!(
        body["results"][0]["snippet"]["highlights"],
        json!([[35, 40]])
    );
    assert_eq!(
        names(&s, &alice, &wid, "report south"),
        Vec::<String>::new()
    );

    // Code, by extension under a generic type; identifiers split at punctuation.
    wait_names(&s, &alice, &wid, "frobnicate", &["widgets.rs"]);
    wait_names(&s, &alice, &wid, "\"frobnicate widget\"", &["widgets.rs"]);
    // Fuzzy and prefix matching work on files as on messages.
    wait_names(&s, &alice, &wid, "frobnicte", &["widgets.rs"]);
    wait_names(&s, &alice, &wid, "quart*", &["Quarterly-Report.txt"]);

    // Binary: the name (accents folded, offsets in scalar values), not the bytes.
    let body = wait_names(&s, &alice, &wid, "cafe", &["blob-Café.txt"]);
    assert_eq!(body["results"][0]["highlights"], json!([[5, 9]]));

    // A PDF the worker cannot read is found by its name, and the files after it still get
    // their text.
    upload(
        &s,
        &alice,
        &wid,
        "broken.pdf",
        "application/pdf",
        b"%PDF-1.7\n1 0 obj <<\n",
    );
    // A name match ranks above a text match.
    upload(
        &s,
        &alice,
        &wid,
        "north.txt",
        "text/plain",
        b"nothing to see",
    );
    wait_names(&s, &alice, &wid, "nothing", &["north.txt"]);
    wait_names(&s, &alice, &wid, "broken", &["broken.pdf"]);
    // Texts are extracted oldest first and committed in order: with north.txt's in, the
    // non-UTF-8 file's turn has come, and its bytes gave no text.
    assert_eq!(names(&s, &alice, &wid, "hiddenword"), Vec::<String>::new());
    let order = wait_names(
        &s,
        &alice,
        &wid,
        "north",
        &["north.txt", "Quarterly-Report.txt"],
    );
    assert_eq!(order["results"][0]["file"]["name"], "north.txt");

    // Deleted: gone from results.
    s.ok(
        "DELETE",
        &format!("/api/v1/files/{}", str_of(&report["id"])),
        &alice,
        None,
        204,
    );
    wait_names(&s, &alice, &wid, "revenue", &[]);
    wait_names(&s, &alice, &wid, "quarterly", &[]);
}

// Only files the caller may read: their own uploads, and files shared in a channel they
// can read while the message that shares them lives; never another workspace's, whose
// members cannot search this one (404). in: keeps files shared in that channel.
#[test]
fn only_readable_files() {
    let s = Server::start(UNLIMITED);
    let alice = s.signup("alice");
    let bob = s.signup("bob");
    let carol = s.signup("carol");
    let dave = s.signup("dave");
    let wid = s.workspace(&alice, &[&bob, &dave]);
    let other = s.workspace(&carol, &[]);
    // Public, and Dave is not in it.
    let general = s.channel(&wid, &alice, "general", &[&bob]);
    let secret = upload(
        &s,
        &bob,
        &wid,
        "bob-plans.txt",
        "text/plain",
        b"classified zeppelin",
    );
    upload(
        &s,
        &carol,
        &other,
        "carol-plans.txt",
        "text/plain",
        b"zeppelin elsewhere",
    );
    upload(
        &s,
        &alice,
        &wid,
        "alice-plans.txt",
        "text/plain",
        b"open zeppelin",
    );

    // Bob finds his own upload; Alice does not, by name or text.
    wait_names(&s, &bob, &wid, "zeppelin", &["bob-plans.txt"]);
    wait_names(&s, &alice, &wid, "zeppelin", &["alice-plans.txt"]);
    assert_eq!(names(&s, &alice, &wid, "classified"), Vec::<String>::new());
    assert_eq!(names(&s, &alice, &wid, "bob"), Vec::<String>::new());
    // Carol finds hers in her workspace only, and cannot search Alice's.
    wait_names(&s, &carol, &other, "zeppelin", &["carol-plans.txt"]);
    search_raw(&s, &carol, &wid, "q=zeppelin").assert_error(404, "not_found");

    // Shared in a channel Alice reads: she finds it; in: that channel keeps it, and her
    // own unshared upload is not in that channel.
    let message = share(&s, &bob, &general, &secret);
    wait_names(&s, &alice, &wid, "classified", &["bob-plans.txt"]);
    wait_names(
        &s,
        &alice,
        &wid,
        "zeppelin",
        &["alice-plans.txt", "bob-plans.txt"],
    );
    wait_names(&s, &alice, &wid, "zeppelin in:#general", &["bob-plans.txt"]);
    wait_names(&s, &alice, &wid, "zeppelin from:me", &["alice-plans.txt"]);
    // Carol still finds nothing of Alice's workspace in hers.
    wait_names(&s, &carol, &other, "classified", &[]);
    // Dave may find the sharing message (a public channel's), but not read the file (not
    // a member), so it is neither shown nor counted.
    let found = search(&s, &dave, &wid, "classified");
    assert_eq!(found["total"], 0, "{found}");
    assert_eq!(found["results"], json!([]), "{found}");

    // The sharing message deleted: Alice loses the file, Bob keeps it.
    let path = format!(
        "/api/v1/channels/{general}/messages/{}",
        str_of(&message["id"])
    );
    s.ok("DELETE", &path, &bob, None, 204);
    wait_names(&s, &alice, &wid, "classified", &[]);
    wait_names(&s, &bob, &wid, "classified", &["bob-plans.txt"]);
}

// Pages of `limit` with a cursor walk every match once; total is exact on every page; bad
// input is 400 with a message.
#[test]
fn pages_and_bad_input() {
    let s = Server::start(UNLIMITED);
    let alice = s.signup("alice");
    let wid = s.workspace(&alice, &[]);
    for i in 0..5 {
        upload(
            &s,
            &alice,
            &wid,
            &format!("ledger-{i}.csv"),
            "text/csv",
            b"a,b\n1,2\n",
        );
    }
    wait_names(
        &s,
        &alice,
        &wid,
        "ledger",
        &[
            "ledger-0.csv",
            "ledger-1.csv",
            "ledger-2.csv",
            "ledger-3.csv",
            "ledger-4.csv",
        ],
    );
    let mut seen = Vec::new();
    let mut params = "q=ledger&limit=2".to_owned();
    for page in 0..3 {
        let r = search_raw(&s, &alice, &wid, &params);
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.body["total"], 5);
        let results = r.body["results"].as_array().unwrap();
        assert_eq!(results.len(), if page < 2 { 2 } else { 1 });
        seen.extend(results.iter().map(|r| str_of(&r["file"]["name"])));
        match r.body["next_cursor"].as_str() {
            Some(c) => params = format!("q=ledger&limit=2&cursor={}", common::query_encode(c)),
            None => assert_eq!(page, 2, "the last page has no cursor"),
        }
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            "ledger-0.csv",
            "ledger-1.csv",
            "ledger-2.csv",
            "ledger-3.csv",
            "ledger-4.csv"
        ]
    );

    for (params, why) in [
        ("q=", "empty"),
        ("q=%2A%2A%2A", "nothing to search for"),
        ("q=ledger+has%3Afile", "has: describes messages"),
        ("q=ledger+is%3Athread", "is: describes messages"),
        ("q=ledger&limit=0", "limit 0"),
        ("q=ledger&limit=101", "limit over 100"),
        ("q=ledger&limit=x", "limit not a number"),
        ("q=ledger&cursor=%21%21", "a cursor that does not decode"),
        ("q=before%3A2024-02-30", "a bad date"),
    ] {
        let r = search_raw(&s, &alice, &wid, params);
        r.assert_error(400, "invalid_request");
        eprintln!("{why}: {}", r.body["error"]["message"]);
    }
    let long = "a".repeat(1001);
    search_raw(&s, &alice, &wid, &format!("q={long}")).assert_error(400, "invalid_request");
    let r = s.call(
        "GET",
        &format!("/api/v1/workspaces/{wid}/search/files?q=x"),
        None,
        None,
    );
    assert_eq!(r.status, 401);
}

// A file whose text was not yet extracted when the server was killed gets it after the
// restart: the flag that asks for it is committed with the file's record.
#[test]
fn text_extracted_after_sigkill() {
    let mut s = Server::start(UNLIMITED);
    let alice = s.signup("alice");
    let wid = s.workspace(&alice, &[]);
    upload(
        &s,
        &alice,
        &wid,
        "late.pdf",
        "application/pdf",
        &pdf(&["quokka census results"]),
    );
    upload(
        &s,
        &alice,
        &wid,
        "late.txt",
        "text/plain",
        b"wombat census results",
    );
    s.kill();
    s.restart();
    wait_names(&s, &alice, &wid, "census", &["late.pdf", "late.txt"]);
    wait_names(&s, &alice, &wid, "quokka", &["late.pdf"]);
    wait_names(&s, &alice, &wid, "wombat", &["late.txt"]);
}
