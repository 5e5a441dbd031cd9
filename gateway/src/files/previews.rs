//! The server's side of previews: a queue of files to preview, and supervisor threads
//! (`preview_workers` of them) that each make one preview at a time in a `chorus
//! preview-worker` child process and record the outcome in the metadata log.
//!
//! One worker process per preview. `RLIMIT_CPU` counts a process's whole life, so a
//! long-lived worker would run out of CPU after enough files; a fresh process gives every
//! file the whole budget and shares nothing between files, and a crash needs no restart
//! protocol: the next file gets a new worker. The supervisor enforces the wall-clock
//! deadline (`preview_timeout_ms`) by killing the worker; a worker that dies by a signal,
//! exits in any way but success or a clean refusal, or is killed at its deadline is
//! counted in `chorus_preview_worker_crashes_total`, and the file is recorded as having no
//! preview. The server never decodes an untrusted file itself.
//!
//! A supervisor is a plain thread: it blocks on the child and calls the engine through
//! `block_on`, never on a shard. The supervisors share one queue, so a file waits only
//! while every worker is busy; two previews of the same file never run at once (a file is
//! queued once per upload). The queue is bounded ([`PREVIEW_QUEUE_FILES_MAX`]); a file
//! that does not fit stays undecided (its preview answers 202) until the next start, when
//! every live file without a decided preview is queued again.
//!
//! In a cluster the node that leads the directory makes previews (it records the files
//! taken by every node). A preview's bytes on the nodes' disks are copied to a majority
//! before its record, as an upload's are (`super::peers`); a copy that fails leaves the
//! preview undecided. Every [`RESCAN_EVERY`] a thread of the node that leads the directory
//! makes the previews still undecided [`RESCAN_EVERY`] after their upload: those a leader
//! that died had queued, or could not copy (a preview the queue holds too may then be
//! made twice; the second record is refused and its bytes reclaimed).

use super::preview::{kind_for, EXIT_REFUSED};
use super::store::{FileStore, Sha256};
use crate::metrics::Metrics;
use chorus_engine::domain::event::{PreviewMade, PreviewRecord};
use chorus_engine::view::FileView;
use chorus_engine::{Engine, EngineError};
use futures::executor::block_on;
use std::io::{self, Read};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

/// Files waiting for their preview; more are left for the next start.
pub const PREVIEW_QUEUE_FILES_MAX: usize = 1024;
/// The largest preview a worker may write.
const PREVIEW_BYTES_MAX: u64 = 16 << 20;
/// How often the supervisor looks whether its worker ended.
const WAIT_POLL: Duration = Duration::from_millis(5);
/// How often, in a cluster, the directory's leader looks for previews still undecided
/// this long after their upload.
pub const RESCAN_EVERY: Duration = Duration::from_secs(20);
/// How long copies of bytes to, or from, the other nodes may take.
const PEERS_WAIT: Duration = Duration::from_secs(120);

/// Limits of each worker, from the configuration.
#[derive(Clone, Copy, Debug)]
pub struct PreviewLimits {
    /// Wall clock before the worker is killed.
    pub timeout: Duration,
    /// `RLIMIT_CPU`, seconds.
    pub cpu_s: u64,
    /// `RLIMIT_AS`, bytes.
    pub memory_bytes: u64,
    /// Supervisors, so previews made at once.
    pub workers: usize,
}

/// The queue of files to preview.
pub struct Previews {
    tx: SyncSender<FileView>,
    cluster: Cluster,
}

/// The server, once it runs, on a cluster node (`None` on a single node, and until then).
type Cluster = Arc<OnceLock<Weak<crate::ctx::Shared>>>;

impl Previews {
    /// Starts the supervisor threads; the first one first makes the preview of every live
    /// file whose preview is undecided (work a restart interrupted).
    /// A cluster node (`clustered`) leaves the work a restart interrupted to the rescans of
    /// the node that leads the directory.
    pub fn start(
        engine: Engine,
        store: Arc<FileStore>,
        metrics: Arc<Metrics>,
        limits: PreviewLimits,
        clustered: bool,
    ) -> io::Result<Previews> {
        let (tx, rx) = sync_channel(PREVIEW_QUEUE_FILES_MAX);
        let rx = Arc::new(Mutex::new(rx));
        let exe = std::env::current_exe()?;
        let cluster = Cluster::default();
        let maker = || Maker {
            engine: engine.clone(),
            store: store.clone(),
            metrics: metrics.clone(),
            limits,
            exe: exe.clone(),
            cluster: clustered.then(|| cluster.clone()),
        };
        for n in 0..limits.workers.max(1) {
            let (maker, rx) = (maker(), rx.clone());
            std::thread::Builder::new()
                .name(format!("chorus-previews-{n}"))
                .spawn(move || maker.run(n == 0, &rx))?;
        }
        if clustered {
            let maker = maker();
            std::thread::Builder::new()
                .name("chorus-previews-rescan".into())
                .spawn(move || maker.rescans())?;
        }
        Ok(Previews { tx, cluster })
    }

    /// On a cluster node, once the server runs: what the supervisors need of it (whether
    /// this node leads the directory, its peers for the copies).
    pub fn in_cluster(&self, shared: &Arc<crate::ctx::Shared>) {
        let _ = self.cluster.set(Arc::downgrade(shared));
    }

    /// Queues a file just stored, if it has a preview kind.
    pub fn submit(&self, file: FileView) {
        if kind_for(&file.content_type).is_none() {
            return;
        }
        let id = file.id;
        match self.tx.try_send(file) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                tracing::warn!(%id, "preview queue full; the preview waits for the next start");
            }
            Err(TrySendError::Disconnected(_)) => {
                tracing::error!(%id, "the preview supervisor has stopped");
            }
        }
    }
}

/// How one worker run ended.
pub(crate) enum Outcome {
    /// The preview is at `output`.
    Made {
        output: PathBuf,
        width: u32,
        height: u32,
        content_type: String,
    },
    /// The worker found nothing to preview (corrupt, too large, unsupported).
    Refused(String),
    /// The worker crashed, hit a limit, or was killed at its deadline.
    Crashed(String),
}

/// Runs one `chorus preview-worker` of `kind` on `input`, writing to `output`, within the
/// limits and the deadline (the worker is killed at it). Blocks until the worker ends.
pub(crate) fn run_worker(
    exe: &std::path::Path,
    limits: PreviewLimits,
    kind: &str,
    name: &str,
    input: &std::path::Path,
    output: PathBuf,
) -> io::Result<Outcome> {
    let mut child = Command::new(exe)
        .arg("preview-worker")
        .args(["--kind", kind, "--name", name])
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(&output)
        .args(["--memory-bytes", &limits.memory_bytes.to_string()])
        .args(["--cpu-s", &limits.cpu_s.to_string()])
        .env("CHORUS_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + limits.timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        let now = Instant::now();
        if now >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_file(&output);
            return Ok(Outcome::Crashed("killed at its deadline".into()));
        }
        // Never sleep past the deadline: a worker that ends after it is late, however
        // coarse the poll.
        std::thread::sleep(WAIT_POLL.min(deadline - now));
    };
    let (mut stdout, mut stderr) = (String::new(), String::new());
    if let Some(mut out) = child.stdout.take() {
        out.read_to_string(&mut stdout)?;
    }
    if let Some(mut err) = child.stderr.take() {
        err.by_ref().take(4096).read_to_string(&mut stderr)?;
    }
    if status.success() {
        let answer: serde_json::Value = serde_json::from_str(stdout.trim())
            .map_err(|e| io::Error::other(format!("worker answer: {e}")))?;
        let dim = |k: &str| answer[k].as_u64().unwrap_or(0) as u32;
        return Ok(Outcome::Made {
            width: dim("width"),
            height: dim("height"),
            content_type: answer["content_type"].as_str().unwrap_or("").to_owned(),
            output,
        });
    }
    let _ = std::fs::remove_file(&output);
    if status.code() == Some(i32::from(EXIT_REFUSED)) {
        return Ok(Outcome::Refused(stderr.trim().to_owned()));
    }
    Ok(Outcome::Crashed(format!("{status}: {}", stderr.trim())))
}

/// Whether files of this media type get a preview (the others are never listed as waiting
/// for one).
fn previewable(content_type: &str) -> bool {
    kind_for(content_type).is_some()
}

struct Maker {
    engine: Engine,
    store: Arc<FileStore>,
    metrics: Arc<Metrics>,
    limits: PreviewLimits,
    exe: PathBuf,
    /// On a cluster node.
    cluster: Option<Cluster>,
}

impl Maker {
    fn run(self, first: bool, rx: &Mutex<Receiver<FileView>>) {
        if first && self.cluster.is_none() {
            match block_on(self.engine.files_without_previews(previewable)) {
                Ok(files) => files.iter().for_each(|f| self.make(f)),
                Err(e) => tracing::error!(error = %e, "could not list files awaiting previews"),
            }
        }
        loop {
            // The lock is held only while waiting for a file, never while making one.
            let next = rx.lock().expect("the queue lock is never poisoned").recv();
            match next {
                Ok(file) => self.make(&file),
                Err(_) => return,
            }
        }
    }

    /// A cluster node's rescans, every [`RESCAN_EVERY`], until the server is gone.
    fn rescans(self) {
        loop {
            std::thread::sleep(RESCAN_EVERY);
            let gone =
                self.cluster.as_ref().and_then(|c| c.get()).is_some() && self.shared().is_none();
            if gone {
                return;
            }
            self.rescan();
        }
    }

    /// The server, on a cluster node that runs.
    fn shared(&self) -> Option<Arc<crate::ctx::Shared>> {
        self.cluster.as_ref()?.get()?.upgrade()
    }

    /// On the node that leads the directory: makes the previews still undecided
    /// [`RESCAN_EVERY`] after their upload.
    fn rescan(&self) {
        let Some(shared) = self.shared() else { return };
        if !shared.leads_directory() {
            return;
        }
        let files = match block_on(self.engine.files_without_previews(previewable)) {
            Ok(files) => files,
            Err(e) => {
                tracing::debug!(error = %e, "could not list files awaiting previews");
                return;
            }
        };
        let now_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_micros() as u64;
        let age_us = RESCAN_EVERY.as_micros() as u64;
        for file in files {
            if now_us.saturating_sub(file.created_at_us) >= age_us {
                self.make(&file);
            }
        }
    }

    /// On a cluster node whose peers need copies: sends a preview's bytes to a majority of
    /// the nodes, and waits for them.
    fn copy(&self, sha: Sha256, len: u64) -> io::Result<()> {
        let Some(shared) = self.shared() else {
            return Ok(());
        };
        super::peers::on_shard_zero(shared, PEERS_WAIT, move |ctx| async move {
            match super::peers::copies(&ctx) {
                true => super::peers::copy_to_majority(&ctx, sha, len).await,
                false => Ok(()),
            }
        })
    }

    /// On a cluster node: makes sure this node holds the file's bytes (a rescan's file may
    /// have been taken while this node was down).
    fn fetch(&self, file: &FileView) -> io::Result<()> {
        let Some(shared) = self.shared() else {
            return Ok(());
        };
        super::peers::ensure_local_waiting(shared, file.sha256, file.size, PEERS_WAIT)
    }

    fn make(&self, file: &FileView) {
        let Some(kind) = kind_for(&file.content_type) else {
            return;
        };
        // A file deleted while it waited has nothing to preview (and maybe no bytes).
        if block_on(self.engine.linked_file(file.id)).is_err() {
            return;
        }
        if let Err(e) = self.fetch(file) {
            // Undecided: the next rescan tries again.
            tracing::warn!(file = %file.id, error = %e, "a file's bytes to preview are on no peer reached");
            return;
        }
        let made = match self.run_worker(kind, file) {
            Ok(Outcome::Made {
                output,
                width,
                height,
                content_type,
            }) => match self.keep(&output) {
                Ok((sha256, size)) if self.cluster.is_some() => {
                    if let Err(e) = self.copy(sha256, size) {
                        // Undecided: the next rescan tries again.
                        self.store.pins.unpin_upload(&sha256);
                        tracing::warn!(file = %file.id, error = %e, "a preview's bytes could not be copied");
                        return;
                    }
                    Some(PreviewMade {
                        width,
                        height,
                        size,
                        content_type,
                        sha256,
                    })
                }
                Ok((sha256, size)) => Some(PreviewMade {
                    width,
                    height,
                    size,
                    content_type,
                    sha256,
                }),
                Err(e) => {
                    tracing::error!(error = %e, "could not store a preview");
                    None
                }
            },
            Ok(Outcome::Refused(why)) => {
                tracing::debug!(file = %file.id, kind, why, "no preview");
                None
            }
            Ok(Outcome::Crashed(why)) => {
                self.metrics.preview_worker_crashes.inc();
                tracing::warn!(file = %file.id, kind, why, "preview worker crashed");
                None
            }
            Err(e) => {
                tracing::error!(error = %e, "could not run a preview worker");
                None
            }
        };
        self.record(file, kind, made);
    }

    /// Runs one worker on the file's bytes, within the limits and the deadline.
    fn run_worker(&self, kind: &str, file: &FileView) -> io::Result<Outcome> {
        let (input, copied) = self.store.local_copy(&file.sha256, file.size)?;
        let output = self.store.tmp_path();
        let outcome = run_worker(&self.exe, self.limits, kind, &file.name, &input, output);
        if copied {
            let _ = std::fs::remove_file(&input);
        }
        outcome
    }

    /// Moves a worker's output into the store under its SHA-256; returns it and the length.
    fn keep(&self, output: &PathBuf) -> io::Result<(Sha256, u64)> {
        let read = std::fs::File::open(output).and_then(|f| {
            let mut bytes = Vec::new();
            f.take(PREVIEW_BYTES_MAX + 1).read_to_end(&mut bytes)?;
            Ok(bytes)
        });
        let _ = std::fs::remove_file(output);
        let bytes = read?;
        if bytes.len() as u64 > PREVIEW_BYTES_MAX {
            return Err(io::Error::other("the preview is too large"));
        }
        let mut pending = self.store.begin()?;
        pending.append(&bytes)?;
        let done = pending.finish()?;
        let (sha, len) = (done.sha, done.len);
        while !self.store.pins.pin_upload(&sha) {
            std::thread::sleep(Duration::from_millis(2));
        }
        let published = self.store.publish(done);
        // The pin is held until the record is on every shard: see `record`.
        if let Err(e) = published {
            self.store.pins.unpin_upload(&sha);
            return Err(e);
        }
        Ok((sha, len))
    }

    /// Records the outcome, then releases the pin `keep` took. A file deleted meanwhile
    /// takes the preview's bytes with it.
    fn record(&self, file: &FileView, kind: &str, made: Option<PreviewMade>) {
        let sha = made.as_ref().map(|m| m.sha256);
        let record = PreviewRecord {
            file: file.id,
            kind: kind.to_owned(),
            made,
        };
        let recorded = block_on(self.engine.record_preview(record));
        if let Some(sha) = sha {
            self.store.pins.unpin_upload(&sha);
        }
        match recorded {
            Ok(_) => {}
            Err(EngineError::Domain(_)) => {
                if let Some(sha) = sha {
                    self.reclaim(&sha);
                }
            }
            Err(e) => tracing::error!(error = %e, "could not record a preview"),
        }
    }

    fn reclaim(&self, sha: &Sha256) {
        if !self.store.pins.mark_removing(sha) {
            return;
        }
        if let Ok(false) = block_on(self.engine.file_bytes_in_use(*sha)) {
            if let Err(e) = self.store.remove(sha) {
                tracing::warn!(error = %e, "could not remove a preview's bytes");
            }
        }
        self.store.pins.unmark_removing(sha);
    }
}
