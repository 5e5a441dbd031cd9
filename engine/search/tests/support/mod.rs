//! What the indexer tests share: an engine and its indexer in a temporary directory.

#![allow(dead_code)] // each test file uses its own part

use chorus_engine::blob::{BlobError, BlobRef};
use chorus_engine::{Engine, EngineConfig};
use chorus_search::extract::{FileToRead, Sources, TextKind};
use chorus_search::Search;
use std::path::Path;
use std::sync::Arc;

/// An engine at `<dir>/engine` (one shard, `partitions` partitions, the consumer
/// `search`) and its indexer over the index at `<dir>/search`.
pub struct Indexed {
    pub engine: Engine,
    pub search: Arc<Search>,
    stop: futures::channel::oneshot::Sender<()>,
    indexer: std::thread::JoinHandle<()>,
}

impl Indexed {
    pub fn start(dir: &Path, partitions: u32, sources: Arc<dyn Sources>) -> Indexed {
        let mut config = EngineConfig::new(dir.join("engine"));
        config.shards = 1;
        config.partitions = partitions;
        config.pin = false;
        config.consumers = vec!["search".into()];
        let engine = Engine::open(config).expect("open engine");
        let search = Search::open(&dir.join("search")).unwrap();
        let (stop, stopped) = futures::channel::oneshot::channel();
        let indexer = chorus_search::indexer::spawn(
            search.clone(),
            chorus_search::indexer::IndexerConfig {
                engine: engine.clone(),
                consumer: "search".into(),
                sources,
            },
            stopped,
        )
        .unwrap();
        Indexed {
            engine,
            search,
            stop,
            indexer,
        }
    }

    /// Stops the indexer and waits for its thread.
    pub fn stop(self) {
        self.stop.send(()).unwrap();
        self.indexer.join().unwrap();
    }
}

/// No file has a body or text.
pub struct NoFiles;

impl Sources for NoFiles {
    fn blob(&self, blob: &BlobRef) -> Result<Vec<u8>, BlobError> {
        Err(BlobError::NotFound(*blob))
    }

    fn file_text(&self, _: &FileToRead, _: TextKind) -> std::io::Result<Option<String>> {
        Ok(None)
    }
}

/// The `/proc/self/task/<tid>` directories of this process's threads named `name`.
pub fn threads_named(name: &str) -> Vec<std::path::PathBuf> {
    let tasks = std::fs::read_dir("/proc/self/task").unwrap();
    tasks
        .filter_map(|t| t.ok())
        .map(|t| t.path())
        .filter(|t| std::fs::read_to_string(t.join("comm")).is_ok_and(|c| c.trim_end() == name))
        .collect()
}
