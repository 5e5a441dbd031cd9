//! Messages posted per workspace, for `/metrics`: a committed-event consumer, and the proof
//! that the consumer seam works end to end.
//!
//! It reads every channel partition's log through [`chorus_engine::Consumer`] from its own
//! cursors, counts posted messages (with or without files) by workspace, and stores the
//! counts together with the cursors in one file, written whole through a temporary name, fsynced, renamed and
//! the directory fsynced. Counts and cursors therefore never disagree on disk: after a
//! crash it resumes from the cursors it stored with the counts, so no event is counted
//! twice or missed. Only then does it acknowledge the cursors to the engine, whose
//! retention watermark keeps the log from them on.
//!
//! It runs as one task on shard 0 with one read in flight per partition; the reads wait in
//! the partitions until a commit brings events. The file is written on the blocking pool at
//! most every [`PERSIST_INTERVAL`], so a busy server pays one small fsync per interval, not
//! per event.

use chorus_engine::consumer::{CommittedKind, CommittedPage, LogId};
use chorus_engine::Consumer;
use chorus_engine::Engine;
use futures::channel::oneshot;
use futures::future::{select, Either, LocalBoxFuture};
use futures::stream::{FuturesUnordered, StreamExt};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The consumer's name, declared in the engine's configuration.
pub const CONSUMER_NAME: &str = "workspace-messages";
/// The longest the counts may run ahead of the file. A store is a file written and
/// fsynced, a rename and a directory fsync, on the disk the logs commit to, so a busy
/// server stores once a second; what it costs is only that the engine keeps a second more
/// of log for this consumer, and that a restart counts up to a second of events again from
/// the stored cursors (never twice: the counts are stored with them).
pub const PERSIST_INTERVAL: Duration = Duration::from_secs(1);
/// How long the consumer waits before reading a log again after a read failed.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// The file's format version.
const STATE_VERSION: u32 = 1;

/// What the file holds: per partition, the offset of the next event to count; per
/// workspace, the messages counted so far.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// [`STATE_VERSION`].
    pub version: u32,
    /// The next offset to read, by partition.
    pub cursors: BTreeMap<u32, u64>,
    /// Messages counted, by workspace ID.
    pub counts: BTreeMap<String, u64>,
}

impl State {
    /// Counts the messages of a page of `partition`, moves its cursor past them, and
    /// returns the new count of each workspace whose count moved: the counts a page
    /// changes, not all of them, so publishing it costs the page's workspaces however many
    /// the server holds.
    pub fn apply(&mut self, partition: u32, page: &CommittedPage) -> BTreeMap<String, u64> {
        let mut moved = BTreeMap::new();
        // The ID's text, written into one buffer: an allocation per workspace the page
        // touches, not per message.
        let mut key = String::new();
        for e in &page.events {
            if let CommittedKind::Channel(r) = &e.event {
                if r.event.posted().is_some() {
                    key.clear();
                    write!(key, "{}", r.workspace).expect("writing to a String");
                    match self.counts.get_mut(key.as_str()) {
                        Some(n) => *n += 1,
                        None => {
                            self.counts.insert(key.clone(), 1);
                        }
                    }
                    if !moved.contains_key(key.as_str()) {
                        moved.insert(key.clone(), 0);
                    }
                }
            }
        }
        for (workspace, n) in &mut moved {
            *n = self.counts[workspace];
        }
        self.cursors.insert(partition, page.next);
        moved
    }
}

/// Where the state lives in a data directory.
pub fn state_path(data_dir: &Path) -> PathBuf {
    data_dir
        .join("consumers")
        .join(format!("{CONSUMER_NAME}.json"))
}

/// Reads the state file; a missing file is the empty state (count from the start).
pub fn load(path: &Path) -> std::io::Result<State> {
    match std::fs::read(path) {
        Ok(bytes) => {
            let state: State = serde_json::from_slice(&bytes)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            if state.version != STATE_VERSION {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("state version {} is not {STATE_VERSION}", state.version),
                ));
            }
            Ok(state)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State {
            version: STATE_VERSION,
            ..State::default()
        }),
        Err(e) => Err(e),
    }
}

/// Writes the state durably: a temporary file, fsync, rename over the old one, fsync of
/// the directory. A crash leaves the old file or the new one, never a mix.
pub fn store(path: &Path, state: &State) -> std::io::Result<()> {
    let dir = path.parent().expect("the state file is in a directory");
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("json.tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(&serde_json::to_vec(state).expect("the state serializes"))?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// The result of one partition's read.
type Read = (u32, Result<CommittedPage, chorus_engine::EngineError>);

fn read(consumer: &Consumer, partition: u32, from: u64) -> LocalBoxFuture<'static, Read> {
    let consumer = consumer.clone();
    Box::pin(async move {
        let page = consumer.read(LogId::Partition(partition), from).await;
        (partition, page)
    })
}

/// Runs the consumer until `stop` fires, then stores what it counted. Call it on a shard.
pub async fn run(
    engine: Engine,
    metrics: Arc<crate::metrics::Metrics>,
    path: PathBuf,
    mut stop: oneshot::Receiver<()>,
) {
    let consumer = match engine.consumer(CONSUMER_NAME) {
        Ok(c) => c,
        Err(e) => return tracing::error!(error = %e, "workspace metrics not counted"),
    };
    let load_path = path.clone();
    let mut state = match glommio::executor()
        .spawn_blocking(move || load(&load_path))
        .await
    {
        Ok(state) => state,
        Err(e) => {
            // Counting again from zero would count everything twice into a scraper that
            // saw the old values; stop rather than publish wrong numbers.
            return tracing::error!(error = %e, path = %path.display(), "workspace metrics not counted");
        }
    };
    metrics.set_workspace_messages(&state.counts);
    let mut reads: FuturesUnordered<LocalBoxFuture<'static, Read>> = FuturesUnordered::new();
    for p in 0..engine.config().partitions {
        let from = state.cursors.get(&p).copied().unwrap_or(0);
        reads.push(read(&consumer, p, from));
    }
    let mut dirty = false;
    // One timer for the whole run: it fires every interval however busy the reads are.
    let mut tick = glommio::timer::Timer::new(PERSIST_INTERVAL);
    loop {
        let next = select(reads.next(), &mut tick);
        match select(next, &mut stop).await {
            Either::Left((Either::Left((Some((p, Ok(page))), _)), _)) => {
                let moved = state.apply(p, &page);
                metrics.set_workspace_messages(&moved);
                dirty = true;
                reads.push(read(&consumer, p, page.next));
            }
            Either::Left((Either::Left((Some((p, Err(e))), _)), _)) => {
                tracing::warn!(error = %e, partition = p, "workspace metrics: read failed");
                glommio::timer::sleep(RETRY_INTERVAL).await;
                let from = state.cursors.get(&p).copied().unwrap_or(0);
                reads.push(read(&consumer, p, from));
            }
            Either::Left((Either::Left((None, _)), _)) => break,
            Either::Left((Either::Right(_), _)) => {
                if dirty {
                    persist(&consumer, &path, &state).await;
                    dirty = false;
                }
                tick.reset(PERSIST_INTERVAL);
            }
            Either::Right(_) => break,
        }
    }
    if dirty {
        persist(&consumer, &path, &state).await;
    }
}

/// Stores the state, then acknowledges its cursors: the engine may drop log segments only
/// before what is durably counted.
async fn persist(consumer: &Consumer, path: &Path, state: &State) {
    let (path, snapshot) = (path.to_owned(), state.clone());
    let stored = glommio::executor()
        .spawn_blocking(move || store(&path, &snapshot))
        .await;
    match stored {
        Ok(()) => {
            for (p, cursor) in &state.cursors {
                consumer.acknowledge(LogId::Partition(*p), *cursor);
            }
        }
        Err(e) => tracing::warn!(error = %e, "workspace metrics: state not stored"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The state round-trips through its file, a missing file is the empty state, and a file
    // of another version is refused rather than counted over.
    #[test]
    fn state_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = state_path(dir.path());
        assert_eq!(load(&path).unwrap().counts.len(), 0);
        let mut state = load(&path).unwrap();
        state.cursors.insert(3, 17);
        state.counts.insert("W1".into(), 5);
        store(&path, &state).unwrap();
        assert_eq!(load(&path).unwrap(), state);
        std::fs::write(&path, br#"{"version":9,"cursors":{},"counts":{}}"#).unwrap();
        assert!(load(&path).is_err());
    }
}
