//! The indexer and the extractor on a real engine in a temporary directory, with a file
//! text source the test holds back: a text taken into a commit that fails is extracted
//! again once the index starts over.

mod support;

use chorus_engine::blob::{BlobError, BlobRef};
use chorus_engine::NewFile;
use chorus_search::extract::{FileToRead, Sources, TextKind};
use chorus_search::query::parse_files;
use chorus_search::search::{run_files, Scope};
use futures::executor::block_on;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use support::Indexed;

/// How long the index may take to show what the test waits for (a guard, not a
/// measurement).
const WAIT: Duration = Duration::from_secs(30);

/// File texts, each answered only once the test opens the gate: `(calls, open)`.
#[derive(Default)]
struct Gated {
    state: Mutex<(u32, bool)>,
    changed: Condvar,
}

impl Gated {
    fn open(&self) {
        self.state.lock().unwrap().1 = true;
        self.changed.notify_all();
    }

    /// Waits until the extractor asked for a text `calls` times.
    fn wait_calls(&self, calls: u32) {
        let s = self.state.lock().unwrap();
        let (s, timeout) = self
            .changed
            .wait_timeout_while(s, WAIT, |s| s.0 < calls)
            .unwrap();
        assert!(!timeout.timed_out(), "{} texts asked, not {calls}", s.0);
    }
}

impl Sources for Gated {
    fn blob(&self, blob: &BlobRef) -> Result<Vec<u8>, BlobError> {
        Err(BlobError::NotFound(*blob))
    }

    fn file_text(&self, _: &FileToRead, _: TextKind) -> std::io::Result<Option<String>> {
        let mut s = self.state.lock().unwrap();
        s.0 += 1;
        self.changed.notify_all();
        let _open = self.changed.wait_while(s, |s| !s.1).unwrap();
        Ok(Some("quokka census".into()))
    }
}

#[test]
fn a_text_lost_with_a_failed_commit_is_extracted_again() {
    let dir = tempfile::tempdir().unwrap();
    let index = dir.path().join("search");
    let gated = Arc::new(Gated::default());
    let indexed = Indexed::start(dir.path(), 2, gated.clone());
    let (engine, search) = (&indexed.engine, &indexed.search);
    let user = block_on(engine.create_user("a@example.com", "alice", "h"))
        .unwrap()
        .id;
    let workspace = block_on(engine.create_workspace(user, "acme")).unwrap().id;
    let file = NewFile {
        name: "late.txt".into(),
        size: 13,
        content_type: "text/plain".into(),
        sha256: [7; 32],
    };
    block_on(engine.store_file(user, workspace, file)).unwrap();
    let scope = Scope {
        user,
        workspace,
        channels: Vec::new(),
    };
    let found = |q: &str| {
        run_files(&search.live(), &parse_files(q).unwrap(), &scope, 0, 10)
            .unwrap()
            .total
    };

    // The file's record is committed (the extractor found it flagged), its text is on its
    // way: the index goes, so the commit that would hold the text fails.
    gated.wait_calls(1);
    assert_eq!(found("late"), 1);
    std::fs::remove_dir_all(&index).unwrap();
    gated.open();
    let deadline = Instant::now() + WAIT;
    while search.status.rebuilds.load(Relaxed) < 1 {
        assert!(Instant::now() < deadline, "the index did not start over");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The rebuilt index flags the file again, and its text is asked for again.
    gated.wait_calls(2);
    while found("quokka") != 1 {
        assert!(Instant::now() < deadline, "the text never came back");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(found("late"), 1);
    indexed.stop();
}
