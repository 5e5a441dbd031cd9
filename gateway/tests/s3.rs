//! The S3 backend of the file store against a real S3 API: `moto_server` (PyPI
//! `moto[server]`), started here on loopback. Skipped with a reason when moto is not
//! installed, except where `CHORUS_REQUIRE_PEERS` is set (CI installs it and sets that).

mod common;

use common::moto::Moto;
use common::{get_bytes, str_of, upload_bytes as upload, Server, User};
use std::time::{Duration, Instant};

// With blob_store = "s3://…", a file's bytes go to the bucket (a multipart upload for a
// file over one part) and nowhere on the local disk; content and Range are read from it;
// the same bytes are stored once; a preview is made from the bucket's copy; and deleting
// the files removes their objects.
#[test]
fn files_live_in_s3() {
    let Some((moto, config)) = Moto::with_bucket() else {
        return;
    };
    let s = Server::start(&config);
    let alice = s.signup("alice");
    let wid = s.workspace(&alice, &[]);

    let big: Vec<u8> = (0..20_000_000u32)
        .map(|i| (i % 251) as u8 ^ (i >> 16) as u8)
        .collect();
    let f = upload(
        &s,
        &alice,
        &wid,
        "big.bin",
        "application/octet-stream",
        &big,
    );
    let fid = str_of(&f["id"]);
    let sha = str_of(&f["sha256"]);
    assert_eq!(
        moto.file_keys(),
        vec![format!("{}/{}", &sha[..2], &sha[2..])]
    );
    let local = s.dir().join("data/files").join(&sha[..2]).join(&sha[2..]);
    assert!(!local.exists(), "the bytes are not kept on the local disk");
    let (status, body) = get_bytes(
        &s,
        Some(&alice),
        &format!("/api/v1/files/{fid}/content"),
        None,
    );
    assert_eq!(status, 200);
    assert!(body == big, "the content round-trips");
    let (status, body) = get_bytes(
        &s,
        Some(&alice),
        &format!("/api/v1/files/{fid}/content"),
        Some("bytes=19999990-"),
    );
    assert_eq!((status, body.as_slice()), (206, &big[19_999_990..]));

    let again = upload(
        &s,
        &alice,
        &wid,
        "again.bin",
        "application/octet-stream",
        &big,
    );
    assert_eq!(moto.file_keys().len(), 1, "the same bytes are stored once");

    let png = {
        let img = image::RgbImage::from_pixel(720, 360, image::Rgb([1, 2, 3]));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    };
    let p = upload(&s, &alice, &wid, "wide.png", "image/png", &png);
    let pid = str_of(&p["id"]);
    let deadline = Instant::now() + Duration::from_secs(120);
    let thumb = loop {
        let (status, body) = get_bytes(
            &s,
            Some(&alice),
            &format!("/api/v1/files/{pid}/preview/thumb"),
            None,
        );
        if status != 202 {
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
            break body;
        }
        assert!(Instant::now() < deadline, "the thumbnail never came");
        std::thread::sleep(Duration::from_millis(100));
    };
    let thumb = image::load_from_memory(&thumb).expect("a PNG");
    assert_eq!((thumb.width(), thumb.height()), (360, 180));
    assert_eq!(moto.file_keys().len(), 3, "big, the PNG and its thumbnail");

    for id in [fid, str_of(&again["id"]), pid] {
        let r = s.call(
            "DELETE",
            &format!("/api/v1/files/{id}"),
            Some(&alice.token),
            None,
        );
        assert_eq!(r.status, 204, "{}", r.text);
    }
    assert!(moto.file_keys().is_empty(), "{:?}", moto.file_keys());
}

// With an S3 bucket configured, message bodies over 64 KiB (and their frames) go to the
// bucket rather than the local blob store, and read back, also after a SIGKILL.
#[test]
fn large_message_bodies_live_in_s3() {
    let Some((moto, config)) = Moto::with_bucket() else {
        return;
    };
    let mut s = Server::start(&config);
    let alice = s.signup("alice");
    let wid = s.workspace(&alice, &[]);
    let cid = s.channel(&wid, &alice, "general", &[]);
    let text: String = (0..70_000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let posted = s.post(&alice, &cid, &text);
    assert_eq!(str_of(&posted["text"]), text);
    let blobs: Vec<String> = moto
        .keys()
        .into_iter()
        .filter(|k| k.starts_with("blobs/"))
        .collect();
    assert!(!blobs.is_empty(), "{:?}", moto.keys());
    let local = s.dir().join("data/blobs");
    let local_files = std::fs::read_dir(&local)
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| std::fs::read_dir(e.path()).map(|f| f.count()).unwrap_or(0))
                .sum::<usize>()
        })
        .unwrap_or(0);
    assert_eq!(local_files, 0, "no body in the local blob store");
    s.kill();
    s.restart();
    let messages = s.messages(&alice, &cid);
    assert_eq!(str_of(&messages.last().expect("the message")["text"]), text);
}

/// Waits until a search of `kind` (`messages` or `files`) for `q` has `n` results.
#[track_caller]
fn wait_found(s: &Server, user: &User, wid: &str, kind: &str, q: &str, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let path = format!("/api/v1/workspaces/{wid}/search/{kind}?q={q}");
        let r = s.call("GET", &path, Some(&user.token), None);
        assert_eq!(r.status, 200, "{}", r.text);
        if r.body["total"] == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{kind} q={q}: {} after 60 s, want {n}\n{}",
            r.body["total"],
            s.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

// With the S3 backend, search reads through the bucket: a message body over 64 KiB is
// indexed with its text, and so are a text file (a needle past its first 64 KiB) and a
// PDF, whose bytes are nowhere on the local disk.
#[test]
fn search_reads_through_s3() {
    // moto runs until `_moto` drops, at the end of the test.
    let Some((_moto, config)) = Moto::with_bucket() else {
        return;
    };
    let s = Server::start(&config);
    let alice = s.signup("alice");
    let wid = s.workspace(&alice, &[]);
    let cid = s.channel(&wid, &alice, "general", &[]);
    let long = format!("{} needleinbucket", "filler ".repeat(10_000));
    s.post(&alice, &cid, &long);
    wait_found(&s, &alice, &wid, "messages", "needleinbucket", 1);

    let text = format!(
        "{}\nbucketwombat at the end\n",
        "padding line\n".repeat(8_000)
    );
    assert!(text.len() > 64 * 1024);
    let notes = upload(&s, &alice, &wid, "notes.txt", "text/plain", text.as_bytes());
    let pdf = common::pdf(&["the bucketquokka report"]);
    let report = upload(&s, &alice, &wid, "report.pdf", "application/pdf", &pdf);
    for f in [&notes, &report] {
        let sha = str_of(&f["sha256"]);
        let local = s.dir().join("data/files").join(&sha[..2]).join(&sha[2..]);
        assert!(!local.exists(), "the bytes are not on the local disk");
    }
    wait_found(&s, &alice, &wid, "files", "bucketwombat", 1);
    wait_found(&s, &alice, &wid, "files", "bucketquokka", 1);
}
