//! Files (`API.md` §11) on the real binary: uploads sent as multipart forms by a Python
//! `requests` client (an HTTP client written elsewhere), content with `Range`, signed
//! links, who may read, deletion, durability across SIGKILL, the size limit, hostile names,
//! and the server's memory during a 100 MiB upload.
//!
//! CI installs `requests`; elsewhere a test without it fails with that reason.

mod common;

use common::{proc_status_kib, str_of, Server, User, UNLIMITED};
use serde_json::Value;
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A 1×1 PNG.
const PNG: &[u8] = &[
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52,
    0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x06, 0x00, 0x00, 0x00, 0x1f, 0x15, 0xc4,
    0x89, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9c, 0x63, 0xf8, 0xcf, 0xc0, 0xf0,
    0x1f, 0x00, 0x05, 0x00, 0x01, 0xff, 0x89, 0x99, 0x3d, 0x1d, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45,
    0x4e, 0x44, 0xae, 0x42, 0x60, 0x82,
];

/// An answer with its raw bytes and every header (names in lowercase).
struct Got {
    status: u16,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl Got {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("no {name} header in {:?}", self.headers))
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

fn fetch(s: &Server, method: &str, path: &str, headers: &[(&str, &str)]) -> Got {
    let mut req = ureq::request(method, &format!("{}{path}", s.base_url()));
    for (k, v) in headers {
        req = req.set(k, v);
    }
    let resp = match req.call() {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {path}: {e}"),
    };
    let status = resp.status();
    let headers = resp
        .headers_names()
        .into_iter()
        .filter_map(|n| Some((n.to_lowercase(), resp.header(&n)?.to_owned())))
        .collect();
    let mut body = Vec::new();
    resp.into_reader().read_to_end(&mut body).expect("body");
    Got {
        status,
        headers,
        body,
    }
}

fn get(s: &Server, user: &User, path: &str, extra: &[(&str, &str)]) -> Got {
    let auth = format!("Bearer {}", user.token);
    let mut headers = vec![("Authorization", auth.as_str())];
    headers.extend_from_slice(extra);
    fetch(s, "GET", path, &headers)
}

fn call(s: &Server, method: &str, user: &User, path: &str) -> Got {
    let auth = format!("Bearer {}", user.token);
    fetch(s, method, path, &[("Authorization", &auth)])
}

/// Uploads `bytes` as `name` with the Python client; returns `{"status","body"}`.
fn upload(s: &Server, user: &User, wid: &str, name: &str, ctype: &str, bytes: &[u8]) -> Value {
    common::upload_with_requests(s, user, wid, name, ctype, bytes)
}

/// Uploads and expects 201; returns the file.
#[track_caller]
fn uploaded(s: &Server, user: &User, wid: &str, name: &str, ctype: &str, bytes: &[u8]) -> Value {
    let r = upload(s, user, wid, name, ctype, bytes);
    assert_eq!(r["status"], 201, "{r}\n{}", s.log());
    r["body"]["file"].clone()
}

/// `v` without the `previews` of the files in it: previews are made in the background, so
/// a file object read later may have gained them.
fn strip(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| *k != "previews")
                .map(|(k, v)| (k.clone(), strip(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip).collect()),
        other => other.clone(),
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    let out = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().expect("stdin").write_all(bytes)?;
            c.wait_with_output()
        })
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)[..64].to_owned()
}

/// Every regular file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// The stored files' bytes: every file of the store but its temporary directory.
fn stored(s: &Server) -> Vec<PathBuf> {
    let root = s.dir().join("data/files");
    files_under(&root)
        .into_iter()
        .filter(|p| !p.starts_with(root.join("tmp")))
        .collect()
}

// Each kind of file round-trips byte for byte with its metadata; images the browser shows
// are inline and everything else (HTML and SVG above all) an attachment, always with
// nosniff and an ETag of the sha256; a declared type the bytes contradict is refused.
#[test]
fn upload_and_download_each_type() {
    let s = Server::start(UNLIMITED);
    let alice = s.signup("alice");
    let wid = s.workspace(&alice, &[]);
    let binary: Vec<u8> = (0..70_000u32).map(|i| (i * 7 + i / 13) as u8).collect();
    let cases: [(&str, &str, &[u8], &str, &str); 7] = [
        ("dot.png", "image/png", PNG, "image/png", "inline"),
        (
            "photo.jpg",
            "image/jpg",
            b"\xff\xd8\xff\xe0\x00\x10JFIF\x00",
            "image/jpeg",
            "inline",
        ),
        (
            "paper.pdf",
            "application/pdf",
            b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\n",
            "application/pdf",
            "attachment",
        ),
        (
            "notes.txt",
            "text/plain",
            "héllo wörld\n".as_bytes(),
            "text/plain",
            "attachment",
        ),
        (
            "page.html",
            "text/html",
            b"<html><script>alert(1)</script></html>",
            "text/html",
            "attachment",
        ),
        (
            "logo.svg",
            "image/svg+xml",
            b"<svg xmlns=\"http://www.w3.org/2000/svg\"><script>alert(1)</script></svg>",
            "image/svg+xml",
            "attachment",
        ),
        (
            "blob.bin",
            "",
            &binary,
            "application/octet-stream",
            "attachment",
        ),
    ];
    for (name, declared, bytes, stored_type, disposition) in cases {
        let f = uploaded(&s, &alice, &wid, name, declared, bytes);
        assert_eq!(f["name"], name);
        assert_eq!(f["size"], bytes.len() as u64);
        assert_eq!(f["content_type"], stored_type, "{name}");
        assert_eq!(f["workspace_id"], wid.as_str());
        assert_eq!(f["user_id"], alice.id.as_str());
        assert_eq!(f["sha256"], sha256_hex(bytes).as_str());
        assert_eq!(f["previews"], serde_json::json!({}));
        assert!(str_of(&f["created_at"]).ends_with('Z'));
        let fid = str_of(&f["id"]);
        let meta = get(&s, &alice, &format!("/api/v1/files/{fid}"), &[]);
        assert_eq!(meta.status, 200);
        assert_eq!(strip(&meta.json()["file"]), strip(&f));
        let c = get(&s, &alice, &format!("/api/v1/files/{fid}/content"), &[]);
        assert_eq!(c.status, 200, "{name}");
        assert_eq!(c.body, bytes, "{name}");
        assert_eq!(c.header("content-type"), stored_type);
        assert_eq!(c.header("x-content-type-options"), "nosniff");
        assert!(
            c.header("content-disposition").starts_with(disposition),
            "{name}"
        );
        assert_eq!(c.header("etag"), format!("\"{}\"", sha256_hex(bytes)));
        let etag = c.header("etag").to_owned();
        let again = get(
            &s,
            &alice,
            &format!("/api/v1/files/{fid}/content"),
            &[("If-None-Match", &etag)],
        );
        assert_eq!(again.status, 304);
    }
    let r = upload(
        &s,
        &alice,
        &wid,
        "fake.png",
        "image/png",
        b"<html>not a png</html>",
    );
    assert_eq!(r["status"], 400, "{r}");
    assert_eq!(r["body"]["error"]["code"], "content_type_mismatch");
    let r = upload(&s, &alice, &wid, "real.png", "image/jpeg", PNG);
    assert_eq!(r["body"]["error"]["code"], "content_type_mismatch");
}

// Range answers 206 with exactly the bytes asked for in each form of the header, and 416
// with the file's length when nothing of it is asked for.
#[test]
fn content_ranges() {
    let s = Server::start(UNLIMITED);
    let alice = s.signup("alice");
    let wid = s.workspace(&alice, &[]);
    let bytes: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let f = uploaded(
        &s,
        &alice,
        &wid,
        "big.bin",
        "application/octet-stream",
        &bytes,
    );
    let path = format!("/api/v1/files/{}/content", str_of(&f["id"]));
    for (range, start, end) in [
        ("bytes=0-99", 0usize, 99usize),
        ("bytes=999990-", 999_990, 999_999),
        ("bytes=-10", 999_990, 999_999),
        ("bytes=500000-2000000", 500_000, 999_999),
    ] {
        let r = get(&s, &alice, &path, &[("Range", range)]);
        assert_eq!(r.status, 206, "{range}");
        assert_eq!(r.body, &bytes[start..=end], "{range}");
        assert_eq!(
            r.header("content-range"),
            format!("bytes {start}-{end}/1000000")
        );
    }
    let r = get(&s, &alice, &path, &[("Range", "bytes=1000000-")]);
    assert_eq!(r.status, 416);
    assert_eq!(r.header("content-range"), "bytes */1000000");
    assert_eq!(r.json()["error"]["code"], "range_not_satisfiable");
    let whole = get(&s, &alice, &path, &[]);
    assert_eq!((whole.status, whole.body.len()), (200, bytes.len()));
}

// Over file_bytes_max the upload is 413 and nothing of it stays on disk; the server keeps
// serving, and an upload within the limit then succeeds.
#[test]
fn oversized_upload_is_refused_and_leaves_nothing() {
    let s = Server::start(&format!("{UNLIMITED}file_bytes_max = 1048576\n"));
    let alice = s.signup("alice");
    let wid = s.workspace(&alice, &[]);
    let big = vec![b'x'; 1_048_577];
    let r = upload(&s, &alice, &wid, "big.txt", "text/plain", &big);
    assert_eq!(r["status"], 413, "{r}");
    assert_eq!(r["body"]["error"]["code"], "too_large");
    assert!(stored(&s).is_empty(), "{:?}", stored(&s));
    assert!(files_under(&s.dir().join("data/files/tmp")).is_empty());
    let fits = vec![b'y'; 1_048_576];
    let f = uploaded(&s, &alice, &wid, "fits.bin", "", &fits);
    assert_eq!(f["size"], 1_048_576);
    assert_eq!(stored(&s).len(), 1);
}

// A name that would climb out of a directory is stored and shown as given, and nothing is
// created outside the data directory's file store.
#[test]
fn traversal_names_stay_names() {
    let s = Server::start(UNLIMITED);
    let alice = s.signup("alice");
    let wid = s.workspace(&alice, &[]);
    let before = files_under(s.dir());
    let f = uploaded(&s, &alice, &wid, "../../x", "text/plain", b"escape?");
    assert_eq!(f["name"], "../../x");
    let f2 = uploaded(&s, &alice, &wid, "/etc/passwd", "text/plain", b"escape!");
    assert_eq!(f2["name"], "/etc/passwd");
    let new: Vec<PathBuf> = files_under(s.dir())
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    let data = s.dir().join("data");
    for p in &new {
        assert!(
            p.starts_with(&data) || p.ends_with("server.log"),
            "{p:?} was created"
        );
        assert!(
            !p.ends_with("x") && !p.ends_with("passwd"),
            "{p:?} was created"
        );
    }
    assert!(!s.dir().join("x").exists());
    assert!(!s.dir().parent().unwrap().join("x").exists());
    let c = get(
        &s,
        &alice,
        &format!("/api/v1/files/{}/content", str_of(&f["id"])),
        &[],
    );
    assert_eq!(c.body, b"escape?");
    assert!(c
        .header("content-disposition")
        .contains("filename*=UTF-8''%2E%2E%2F%2E%2E%2Fx"));
}

// A signed link serves the content without a token until it expires; a changed signature,
// expiry or file ID is 403, and a deleted file's link is 404.
#[test]
fn signed_links() {
    let s = Server::start(&format!("{UNLIMITED}file_url_ttl_s = 2\n"));
    let alice = s.signup("alice");
    let wid = s.workspace(&alice, &[]);
    let f = uploaded(&s, &alice, &wid, "dot.png", "image/png", PNG);
    let fid = str_of(&f["id"]);
    let other = uploaded(&s, &alice, &wid, "other.txt", "text/plain", b"other");
    let r = call(&s, "POST", &alice, &format!("/api/v1/files/{fid}/url"));
    assert_eq!(r.status, 200);
    let url = str_of(&r.json()["url"]);
    assert!(str_of(&r.json()["expires_at"]).ends_with('Z'));
    let c = fetch(&s, "GET", &url, &[]);
    assert_eq!(c.status, 200);
    assert_eq!(c.body, PNG);
    assert_eq!(c.header("x-content-type-options"), "nosniff");
    // Tampering: the signature, the expiry, and the file.
    let sig_at = url.find("sig=").unwrap() + 4;
    let mut bad_sig = url.clone();
    let flipped = if &url[sig_at..sig_at + 1] == "0" {
        "1"
    } else {
        "0"
    };
    bad_sig.replace_range(sig_at..sig_at + 1, flipped);
    let later = url.replace("expires=", "expires=9");
    let moved = url.replace(&fid, &str_of(&other["id"]));
    for tampered in [&bad_sig, &later, &moved] {
        let r = fetch(&s, "GET", tampered, &[]);
        assert_eq!(r.status, 403, "{tampered}");
        assert_eq!(r.json()["error"]["code"], "invalid_link");
    }
    // Expiry: the link works for file_url_ttl_s seconds and no longer.
    std::thread::sleep(Duration::from_millis(3_100));
    let r = fetch(&s, "GET", &url, &[]);
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"]["code"], "link_expired");
    // Deletion: a fresh link answers 404 once the file is gone.
    let r = call(&s, "POST", &alice, &format!("/api/v1/files/{fid}/url"));
    let url = str_of(&r.json()["url"]);
    assert_eq!(fetch(&s, "GET", &url, &[]).status, 200);
    assert_eq!(
        call(&s, "DELETE", &alice, &format!("/api/v1/files/{fid}")).status,
        204
    );
    assert_eq!(fetch(&s, "GET", &url, &[]).status, 404);
}

// The uploader reads a file; another member of the workspace, a user of another workspace,
// and an unknown or malformed ID all get the same 404; no token is 401.
#[test]
fn who_may_read() {
    let s = Server::start(UNLIMITED);
    let alice = s.signup("alice");
    let bob = s.signup("bob");
    let mallory = s.signup("mallory");
    let wid = s.workspace(&alice, &[&bob]);
    let other_wid = s.workspace(&mallory, &[]);
    let f = uploaded(&s, &alice, &wid, "dot.png", "image/png", PNG);
    let fid = str_of(&f["id"]);
    for path in [
        format!("/api/v1/files/{fid}"),
        format!("/api/v1/files/{fid}/content"),
    ] {
        assert_eq!(get(&s, &alice, &path, &[]).status, 200);
        for outsider in [&bob, &mallory] {
            let r = get(&s, outsider, &path, &[]);
            assert_eq!(r.status, 404, "{path}");
            assert_eq!(r.json()["error"]["code"], "not_found");
        }
        assert_eq!(fetch(&s, "GET", &path, &[]).status, 401);
    }
    for outsider in [&bob, &mallory] {
        assert_eq!(
            call(&s, "POST", outsider, &format!("/api/v1/files/{fid}/url")).status,
            404
        );
        assert_eq!(
            call(&s, "DELETE", outsider, &format!("/api/v1/files/{fid}")).status,
            404
        );
    }
    for unknown in ["F9999999", "Fzzzz", "nonsense", "C1"] {
        assert_eq!(
            get(&s, &alice, &format!("/api/v1/files/{unknown}"), &[]).status,
            404
        );
    }
    // Uploading to a workspace one is not in is 404 too, and stores nothing.
    let before = stored(&s).len();
    let r = upload(&s, &mallory, &wid, "x.txt", "text/plain", b"intruder");
    assert_eq!(r["status"], 404, "{r}");
    let r = upload(&s, &alice, &other_wid, "x.txt", "text/plain", b"intruder");
    assert_eq!(r["status"], 404, "{r}");
    assert_eq!(stored(&s).len(), before);
    let r = fetch(&s, "PUT", &format!("/api/v1/files/{fid}"), &[]);
    assert_eq!(r.status, 405);
}

// Deleting a file makes its metadata, content and links 404 at once; its bytes go when no
// other live file has the same bytes, and stay while one does; a workspace admin may delete
// a member's file, another member may not learn it exists.
#[test]
fn deletion() {
    let s = Server::start(UNLIMITED);
    let alice = s.signup("alice");
    let bob = s.signup("bob");
    let carol = s.signup("carol");
    let wid = s.workspace(&alice, &[&bob, &carol]);
    // Bytes with no preview kind, so that the store holds exactly the files' bytes.
    let a = uploaded(&s, &bob, &wid, "a.bin", "", b"same bytes");
    let b = uploaded(&s, &bob, &wid, "b.bin", "", b"same bytes");
    assert_eq!(a["sha256"], b["sha256"]);
    assert_eq!(stored(&s).len(), 1, "the same bytes are stored once");
    let (aid, bid) = (str_of(&a["id"]), str_of(&b["id"]));
    assert_eq!(
        call(&s, "DELETE", &carol, &format!("/api/v1/files/{aid}")).status,
        404
    );
    assert_eq!(
        call(&s, "DELETE", &bob, &format!("/api/v1/files/{aid}")).status,
        204
    );
    for path in [
        format!("/api/v1/files/{aid}"),
        format!("/api/v1/files/{aid}/content"),
    ] {
        assert_eq!(get(&s, &bob, &path, &[]).status, 404);
    }
    assert_eq!(
        call(&s, "POST", &bob, &format!("/api/v1/files/{aid}/url")).status,
        404
    );
    assert_eq!(
        call(&s, "DELETE", &bob, &format!("/api/v1/files/{aid}")).status,
        404
    );
    assert_eq!(stored(&s).len(), 1, "b still has the bytes");
    assert_eq!(
        get(&s, &bob, &format!("/api/v1/files/{bid}/content"), &[]).body,
        b"same bytes"
    );
    // The owner (an admin) deletes bob's file, though only bob may read it.
    assert_eq!(
        call(&s, "DELETE", &alice, &format!("/api/v1/files/{bid}")).status,
        204
    );
    assert_eq!(
        get(&s, &bob, &format!("/api/v1/files/{bid}"), &[]).status,
        404
    );
    assert!(stored(&s).is_empty(), "{:?}", stored(&s));
    // The same bytes can be uploaded again afterwards.
    let c = uploaded(&s, &bob, &wid, "c.bin", "", b"same bytes");
    let got = get(
        &s,
        &bob,
        &format!("/api/v1/files/{}/content", str_of(&c["id"])),
        &[],
    );
    assert_eq!(got.body, b"same bytes");
}

// A file whose upload was answered 201 is there, bytes and metadata, after a SIGKILL.
#[test]
fn file_survives_sigkill() {
    let mut s = Server::start(UNLIMITED);
    let alice = s.signup("alice");
    let wid = s.workspace(&alice, &[]);
    let bytes: Vec<u8> = (0..300_000u32).map(|i| (i % 97) as u8).collect();
    let f = uploaded(
        &s,
        &alice,
        &wid,
        "kept.bin",
        "application/octet-stream",
        &bytes,
    );
    s.kill();
    s.restart();
    let fid = str_of(&f["id"]);
    assert_eq!(
        get(&s, &alice, &format!("/api/v1/files/{fid}"), &[]).json()["file"],
        f
    );
    let c = get(&s, &alice, &format!("/api/v1/files/{fid}/content"), &[]);
    assert_eq!(c.body, bytes);
}

// A 100 MiB upload streams through: the server's resident memory grows by at most 16 MiB
// while it is received (sampled from /proc, and its high-water mark), and the file is whole.
#[test]
fn large_upload_streams_in_bounded_memory() {
    let s = Server::start(UNLIMITED);
    let alice = s.signup("alice");
    let wid = s.workspace(&alice, &[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("big");
    let size = 100usize << 20;
    let bytes: Vec<u8> = (0..size)
        .map(|i| (i % 251) as u8 ^ (i >> 20) as u8)
        .collect();
    std::fs::write(&path, &bytes).expect("write");
    let sha = sha256_hex(&bytes);
    drop(bytes);
    let pid = s.pid();
    let rss_before = proc_status_kib(pid, "VmRSS:");
    let hwm_before = proc_status_kib(pid, "VmHWM:");
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut most = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                most = most.max(proc_status_kib(pid, "VmRSS:"));
                std::thread::sleep(Duration::from_millis(5));
            }
            most
        })
    };
    let r = common::upload_path_with_requests(
        &s,
        &alice,
        &wid,
        "big.bin",
        "application/octet-stream",
        &path,
    );
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let most = sampler.join().unwrap();
    let hwm_after = proc_status_kib(pid, "VmHWM:");
    assert_eq!(r["status"], 201, "{r}");
    assert_eq!(r["body"]["file"]["size"], size as u64);
    assert_eq!(r["body"]["file"]["sha256"], sha.as_str());
    let grew_kib = most.saturating_sub(rss_before);
    eprintln!(
        "RSS before {rss_before} KiB, most during {most} KiB (+{grew_kib}), VmHWM {hwm_before} -> {hwm_after} KiB"
    );
    assert!(grew_kib <= 16 * 1024, "RSS grew by {grew_kib} KiB");
    assert!(hwm_after.saturating_sub(rss_before.max(hwm_before)) <= 16 * 1024);
}

/// Posts `body` to a channel as `user`; returns the answer.
fn send(s: &Server, user: &User, cid: &str, body: Value) -> common::Resp {
    s.call(
        "POST",
        &format!("/api/v1/channels/{cid}/messages"),
        Some(&user.token),
        Some(body),
    )
}

// Files on messages, over REST and the WebSocket: a message shows its files; a member of
// the channel may then read them (metadata, content, links) and nobody else may; the limits
// of file_ids; a deleted file shows as deleted; deleting the message takes the members'
// access away again; and all of it survives a drained restart (snapshots) and a SIGKILL
// (the log).
#[test]
fn messages_carry_files_and_grant_reading() {
    let mut s = Server::start(UNLIMITED);
    let alice = s.signup("alice");
    let bob = s.signup("bob");
    let carol = s.signup("carol");
    let mallory = s.signup("mallory");
    let wid = s.workspace(&alice, &[&bob, &carol]);
    let cid = s.channel(&wid, &alice, "general", &[&bob]);
    let other_wid = s.workspace(&alice, &[]);
    let f1 = uploaded(&s, &alice, &wid, "dot.png", "image/png", PNG);
    let f2 = uploaded(&s, &alice, &wid, "notes.txt", "text/plain", b"notes");
    let f3 = uploaded(&s, &alice, &other_wid, "elsewhere.txt", "text/plain", b"x");
    let b1 = uploaded(&s, &bob, &wid, "bobs.txt", "text/plain", b"bob's");
    let id = |f: &Value| str_of(&f["id"]);

    // Before any message, only the uploader reads a file.
    assert_eq!(
        get(&s, &bob, &format!("/api/v1/files/{}", id(&f1)), &[]).status,
        404
    );
    let r = send(
        &s,
        &alice,
        &cid,
        serde_json::json!({"text": "", "file_ids": [id(&f1)]}),
    );
    assert_eq!(r.status, 201, "{}", r.text);
    let m1 = r.body["message"].clone();
    assert_eq!(strip(&m1["files"]), strip(&serde_json::json!([f1])));
    assert_eq!(m1["text"], "");

    // Over the WebSocket, through the same session core.
    let (mut ws, _) = s.connect(&alice);
    ws.send(
        serde_json::json!({"type": "message:send", "ref": "w1", "channel_id": cid,
        "text": "notes", "file_ids": [id(&f2)]}),
    );
    let ack = ws.recv_type("ack");
    assert_eq!(ack["ref"], "w1");
    assert_eq!(
        strip(&ack["message"]["files"]),
        strip(&serde_json::json!([f2]))
    );
    ws.send(
        serde_json::json!({"type": "message:send", "ref": "w2", "channel_id": cid,
        "text": "x", "file_ids": [id(&b1)]}),
    );
    let err = ws.recv_type("error");
    assert_eq!(err["ref"], "w2");
    assert_eq!(err["code"], "not_found");

    // A channel member reads the files; a member of the workspace outside the channel and
    // a user of another workspace do not.
    for f in [&f1, &f2] {
        let fid = id(f);
        assert_eq!(
            strip(&get(&s, &bob, &format!("/api/v1/files/{fid}"), &[]).json()["file"]),
            strip(f)
        );
        let c = get(&s, &bob, &format!("/api/v1/files/{fid}/content"), &[]);
        assert_eq!(c.status, 200);
        for outsider in [&carol, &mallory] {
            assert_eq!(
                get(&s, outsider, &format!("/api/v1/files/{fid}/content"), &[]).status,
                404
            );
        }
    }
    let link = call(&s, "POST", &bob, &format!("/api/v1/files/{}/url", id(&f1)));
    assert_eq!(link.status, 200);
    assert_eq!(
        fetch(&s, "GET", &str_of(&link.json()["url"]), &[]).body,
        PNG
    );
    // Reading a file does not let a member delete it.
    assert_eq!(
        call(&s, "DELETE", &bob, &format!("/api/v1/files/{}", id(&f1))).status,
        403
    );

    // The rules of file_ids.
    let eleven: Vec<String> = (0..11).map(|_| id(&f1)).collect();
    let r = send(
        &s,
        &alice,
        &cid,
        serde_json::json!({"text": "x", "file_ids": eleven}),
    );
    r.assert_error(400, "too_many");
    let r = send(
        &s,
        &alice,
        &cid,
        serde_json::json!({"text": "x", "file_ids": [id(&f1), id(&f1)]}),
    );
    r.assert_error(400, "invalid_request");
    for foreign in [id(&b1), id(&f3), "F999999".into(), "junk".into()] {
        let r = send(
            &s,
            &alice,
            &cid,
            serde_json::json!({"text": "x", "file_ids": [foreign]}),
        );
        r.assert_error(404, "not_found");
    }
    send(
        &s,
        &alice,
        &cid,
        serde_json::json!({"text": " ", "file_ids": []}),
    )
    .assert_error(400, "invalid_request");

    // Deleting the message takes the members' access away; the uploader keeps it.
    let f4 = uploaded(&s, &alice, &wid, "brief.txt", "text/plain", b"brief");
    let m4 = send(
        &s,
        &alice,
        &cid,
        serde_json::json!({"text": "brief", "file_ids": [id(&f4)]}),
    );
    let m4 = str_of(&m4.body["message"]["id"]);
    assert_eq!(
        get(&s, &bob, &format!("/api/v1/files/{}", id(&f4)), &[]).status,
        200
    );
    assert_eq!(
        call(
            &s,
            "DELETE",
            &alice,
            &format!("/api/v1/channels/{cid}/messages/{m4}")
        )
        .status,
        204
    );
    assert_eq!(
        get(&s, &bob, &format!("/api/v1/files/{}", id(&f4)), &[]).status,
        404
    );
    assert_eq!(
        get(&s, &alice, &format!("/api/v1/files/{}", id(&f4)), &[]).status,
        200
    );

    // A deleted file shows as deleted in its message, and nobody reads it.
    assert_eq!(
        call(&s, "DELETE", &alice, &format!("/api/v1/files/{}", id(&f2))).status,
        204
    );
    let files_of = |s: &Server, seq: &Value| {
        s.messages(&bob, &cid)
            .into_iter()
            .find(|m| m["seq"] == *seq)
            .expect("message")["files"]
            .clone()
    };
    let m2_seq = ack["message"]["seq"].clone();
    let deleted = serde_json::json!([{"id": id(&f2), "deleted": true}]);
    assert_eq!(files_of(&s, &m2_seq), deleted);
    assert_eq!(
        get(&s, &bob, &format!("/api/v1/files/{}/content", id(&f2)), &[]).status,
        404
    );

    // After a drained restart (from snapshots) and after a SIGKILL (from the log).
    drop(ws);
    assert!(s.terminate().success());
    s.restart();
    assert_eq!(
        strip(&files_of(&s, &m1["seq"])),
        strip(&serde_json::json!([f1]))
    );
    assert_eq!(files_of(&s, &m2_seq), deleted);
    assert_eq!(
        get(&s, &bob, &format!("/api/v1/files/{}/content", id(&f1)), &[]).body,
        PNG
    );
    assert_eq!(
        get(&s, &bob, &format!("/api/v1/files/{}", id(&f4)), &[]).status,
        404
    );
    s.kill();
    s.restart();
    assert_eq!(
        strip(&files_of(&s, &m1["seq"])),
        strip(&serde_json::json!([f1]))
    );
    assert_eq!(
        get(&s, &bob, &format!("/api/v1/files/{}/content", id(&f1)), &[]).body,
        PNG
    );
    assert_eq!(
        get(&s, &carol, &format!("/api/v1/files/{}", id(&f1)), &[]).status,
        404
    );
}

/// An image of `w` × `h` in `format`, a gradient so that it compresses like a photo.
fn image_bytes(w: u32, h: u32, format: image::ImageFormat) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, 128])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut out, format)
        .expect("encode");
    out.into_inner()
}

/// A one-page PDF, 200 × 100 points, with a blue rectangle.
fn pdf_bytes() -> Vec<u8> {
    common::test_pdf::one_page(200, 100, "0 0 1 rg 20 20 100 50 re f\n")
}

/// Asks for a preview until it is decided (202 meanwhile, with Retry-After); returns the
/// final answer.
fn preview(s: &Server, user: &User, fid: &str, kind: &str) -> Got {
    let path = format!("/api/v1/files/{fid}/preview/{kind}");
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let r = get(s, user, &path, &[]);
        if r.status != 202 {
            return r;
        }
        assert_eq!(r.header("retry-after"), "1");
        assert!(
            std::time::Instant::now() < deadline,
            "the {kind} preview of {fid} never came"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[track_caller]
fn assert_no_preview(r: &Got) {
    assert_eq!(r.status, 404, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["error"]["code"], "no_preview");
}

// Previews are made by the worker: thumbnails of PNG, JPEG, GIF and WebP images fitted in
// 360 px and never upscaled, with the file object's dimensions matching the PNG; the first
// page of a PDF at 1024 px; highlighted HTML of the first 200 lines of code; and none for
// a type that has none.
#[test]
fn previews_of_each_kind() {
    let s = Server::start(UNLIMITED);
    let alice = s.signup("alice");
    let wid = s.workspace(&alice, &[]);
    for (name, ctype, format, (w, h), (tw, th)) in [
        (
            "a.png",
            "image/png",
            image::ImageFormat::Png,
            (800, 600),
            (360, 270),
        ),
        (
            "b.jpg",
            "image/jpeg",
            image::ImageFormat::Jpeg,
            (300, 900),
            (120, 360),
        ),
        (
            "c.gif",
            "image/gif",
            image::ImageFormat::Gif,
            (100, 50),
            (100, 50),
        ),
        (
            "d.webp",
            "image/webp",
            image::ImageFormat::WebP,
            (720, 720),
            (360, 360),
        ),
    ] {
        let f = uploaded(&s, &alice, &wid, name, ctype, &image_bytes(w, h, format));
        let fid = str_of(&f["id"]);
        let r = preview(&s, &alice, &fid, "thumb");
        assert_eq!(
            r.status,
            200,
            "{name}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.header("content-type"), "image/png");
        assert_eq!(r.header("x-content-type-options"), "nosniff");
        let png = image::load_from_memory(&r.body).expect("a PNG");
        assert_eq!((png.width(), png.height()), (tw, th), "{name}");
        let meta = get(&s, &alice, &format!("/api/v1/files/{fid}"), &[]).json();
        assert_eq!(
            meta["file"]["previews"],
            serde_json::json!({"thumb": {"width": tw, "height": th}}),
            "{name}"
        );
        assert_no_preview(&get(
            &s,
            &alice,
            &format!("/api/v1/files/{fid}/preview/code"),
            &[],
        ));
    }

    let f = uploaded(
        &s,
        &alice,
        &wid,
        "paper.pdf",
        "application/pdf",
        &pdf_bytes(),
    );
    let r = preview(&s, &alice, &str_of(&f["id"]), "page1");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let page = image::load_from_memory(&r.body).expect("a PNG").to_rgba8();
    assert_eq!(page.dimensions(), (1024, 512));
    // The rectangle is blue, the rest of the page white.
    let inside = page.get_pixel(300, 300).0;
    assert!(inside[2] > 200 && inside[0] < 60, "{inside:?}");
    assert_eq!(page.get_pixel(1000, 20).0, [255, 255, 255, 255]);

    let src: String = (0..300)
        .map(|i| format!("fn f{i}() -> &'static str {{ \"<i>{i}</i>\" }}\n"))
        .collect();
    let f = uploaded(&s, &alice, &wid, "lib.rs", "text/x-rust", src.as_bytes());
    let fid = str_of(&f["id"]);
    let r = preview(&s, &alice, &fid, "code");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.header("content-type").starts_with("text/html"));
    assert!(r.header("content-disposition").starts_with("attachment"));
    let html = String::from_utf8(r.body).unwrap();
    assert!(html.contains("<span") && html.contains("f199") && !html.contains("f200"));
    assert!(!html.contains("<i>"), "the code is escaped");
    let meta = get(&s, &alice, &format!("/api/v1/files/{fid}"), &[]).json();
    assert_eq!(meta["file"]["previews"], serde_json::json!({"code": {}}));

    let f = uploaded(&s, &alice, &wid, "blob.bin", "", &[7u8; 1000]);
    assert_no_preview(&get(
        &s,
        &alice,
        &format!("/api/v1/files/{}/preview/thumb", str_of(&f["id"])),
        &[],
    ));
    assert_no_preview(&get(
        &s,
        &alice,
        &format!("/api/v1/files/{}/preview/nope", str_of(&f["id"])),
        &[],
    ));
}

/// A PNG whose header claims `w` × `h` and whose data is `data` (compressed already).
fn png_with(w: u32, h: u32, color_type: u8, idat: &[u8]) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        let mut crc = 0xffff_ffffu32;
        for b in &body {
            crc ^= u32::from(*b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        out.extend_from_slice(&body);
        out.extend_from_slice(&(!crc).to_be_bytes());
    }
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, color_type, 0, 0, 0]);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    chunk(&mut out, b"IHDR", &ihdr);
    if !idat.is_empty() {
        chunk(&mut out, b"IDAT", idat);
    }
    chunk(&mut out, b"IEND", &[]);
    out
}

/// zlib of `n` zero bytes, made by Python's zlib (a C library, fast in any build).
fn zlib_zeros(n: usize) -> Vec<u8> {
    let out = Command::new("python3")
        .args([
            "-c",
            &format!("import sys,zlib; sys.stdout.buffer.write(zlib.compress(bytes({n}), 9))"),
        ])
        .output()
        .expect("python3");
    assert!(out.status.success());
    out.stdout
}

// Files the worker cannot preview are kept and served, and get no preview: a corrupt
// image, a decompression bomb, a 60-megapixel image, a truncated PDF, and binary junk
// declared as code; the server stays up throughout.
#[test]
fn unpreviewable_files_get_no_preview() {
    let s = Server::start(UNLIMITED);
    let alice = s.signup("alice");
    let wid = s.workspace(&alice, &[]);
    let mut corrupt = image_bytes(200, 200, image::ImageFormat::Png);
    let half = corrupt.len() / 2;
    corrupt[half..].iter_mut().for_each(|b| *b = 0x5a);
    // 20,000 × 20,000 grey pixels (400 MB) in a few hundred KB.
    let bomb = png_with(20_000, 20_000, 0, &zlib_zeros(20_001 * 2_000));
    let sixty_mp = png_with(8_000, 7_500, 2, &[]);
    let mut truncated_pdf = pdf_bytes();
    truncated_pdf.truncate(60);
    let junk: Vec<u8> = (0..5000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    for (name, ctype, bytes, kind) in [
        ("corrupt.png", "image/png", corrupt, "thumb"),
        ("bomb.png", "image/png", bomb, "thumb"),
        ("huge.png", "image/png", sixty_mp, "thumb"),
        ("cut.pdf", "application/pdf", truncated_pdf, "page1"),
        ("junk.txt", "text/plain", junk, "code"),
    ] {
        let f = uploaded(&s, &alice, &wid, name, ctype, &bytes);
        let fid = str_of(&f["id"]);
        assert_no_preview(&preview(&s, &alice, &fid, kind));
        let c = get(&s, &alice, &format!("/api/v1/files/{fid}/content"), &[]);
        assert_eq!(
            (c.status, c.body),
            (200, bytes),
            "{name} is kept and served"
        );
        let meta = get(&s, &alice, &format!("/api/v1/files/{fid}"), &[]).json();
        assert_eq!(meta["file"]["previews"], serde_json::json!({}), "{name}");
    }
    assert_eq!(fetch(&s, "GET", "/healthz", &[]).status, 200);
}

// A worker that does not finish in time is killed and counted as crashed in /metrics; the
// file gets no preview and the server keeps serving. The images are large enough that no
// worker decodes one within the 1 ms deadline (a 64 px one once did, before the poll
// stopped sleeping past the deadline).
#[test]
fn worker_crashes_are_counted() {
    let s = Server::start(&format!("{UNLIMITED}preview_timeout_ms = 1\n"));
    let alice = s.signup("alice");
    let wid = s.workspace(&alice, &[]);
    assert_eq!(s.metric("chorus_preview_worker_crashes_total"), 0.0);
    let f = uploaded(
        &s,
        &alice,
        &wid,
        "a.png",
        "image/png",
        &image_bytes(1600, 1600, image::ImageFormat::Png),
    );
    assert_no_preview(&preview(&s, &alice, &str_of(&f["id"]), "thumb"));
    assert_eq!(s.metric("chorus_preview_worker_crashes_total"), 1.0);
    let f = uploaded(
        &s,
        &alice,
        &wid,
        "b.png",
        "image/png",
        &image_bytes(1600, 800, image::ImageFormat::Png),
    );
    assert_no_preview(&preview(&s, &alice, &str_of(&f["id"]), "thumb"));
    assert_eq!(s.metric("chorus_preview_worker_crashes_total"), 2.0);
    assert_eq!(fetch(&s, "GET", "/healthz", &[]).status, 200);
}

// A preview still owed when the server is killed is made after the restart; deleting the
// file makes its preview 404 and removes the preview's bytes with the file's.
#[test]
fn previews_survive_restarts_and_go_with_the_file() {
    let mut s = Server::start(UNLIMITED);
    let alice = s.signup("alice");
    let wid = s.workspace(&alice, &[]);
    let f = uploaded(
        &s,
        &alice,
        &wid,
        "a.png",
        "image/png",
        &image_bytes(500, 400, image::ImageFormat::Png),
    );
    let fid = str_of(&f["id"]);
    s.kill();
    s.restart();
    let r = preview(&s, &alice, &fid, "thumb");
    assert_eq!(r.status, 200, "{}", s.log());
    assert_eq!(stored(&s).len(), 2, "the file and its thumbnail");
    assert_eq!(
        call(&s, "DELETE", &alice, &format!("/api/v1/files/{fid}")).status,
        204
    );
    assert_eq!(
        get(
            &s,
            &alice,
            &format!("/api/v1/files/{fid}/preview/thumb"),
            &[]
        )
        .status,
        404
    );
    assert!(stored(&s).is_empty(), "{:?}", stored(&s));
}
