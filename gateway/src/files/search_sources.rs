//! What the search indexer reads besides the logs ([`chorus_search::extract::Sources`]):
//! message bodies in the engine's blob store, and the text of uploaded files, both
//! through the configured backend (the local disk or the S3 bucket), so a server on S3
//! indexes the same text as one on the disk.
//!
//! - **Bodies** over 64 KiB: read from `blobs/` on the disk without opening the store (which
//!   would clear writes in progress), or from the bucket with [`S3BlobStore`]'s blocking
//!   read; checked against length and hash either way.
//! - **Text and code files**: only their first [`TEXT_BYTES_MAX`] bytes are read (ranged
//!   reads on S3), then kept if they are UTF-8 without NUL bytes.
//! - **PDFs**: a `chorus preview-worker --kind text` process per file, the preview
//!   worker's sandbox (`setrlimit` on address space and CPU time, killed at the preview
//!   deadline): a hostile PDF takes down that process only, and the file is indexed by
//!   its name. On S3 the worker reads a local copy in the store's `tmp/`, removed after.
//!
//! - **In a cluster on each node's disk**, bytes this node lacks (it was down when they
//!   were written, or its disk was replaced) are fetched from a peer and kept, as any
//!   other reader here would: a body through the engine's blob store, a file's bytes by
//!   `super::peers::ensure_local` on shard 0. Without it, such a node indexed those
//!   messages and files without their text, for good.
//!
//! Every method blocks; the indexer and its extractor call them on their own threads.

use super::previews::{run_worker, Outcome, PreviewLimits};
use super::store::{FileStore, S3BlobStore};
use crate::metrics::Metrics;
use chorus_engine::blob::{BlobError, BlobRef};
use chorus_search::extract::{cap_text, plain_text, FileToRead, Sources, TextKind, TEXT_BYTES_MAX};
use futures::executor::block_on;
use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Where message bodies over 64 KiB are.
pub enum Blobs {
    /// The engine's blob directory on the local disk.
    Disk(PathBuf),
    /// The bucket.
    S3(S3BlobStore),
}

/// The server's [`Sources`].
pub struct SearchSources {
    /// Message bodies.
    pub blobs: Blobs,
    /// File bytes.
    pub store: Arc<FileStore>,
    /// This executable, to run workers.
    pub exe: PathBuf,
    /// The workers' limits (the preview limits).
    pub limits: PreviewLimits,
    /// Where worker crashes are counted.
    pub metrics: Arc<Metrics>,
    /// The server, on a cluster node: what this node lacks is fetched from a peer.
    pub peers: Option<Arc<crate::ctx::Shared>>,
}

/// How long the indexer waits for bytes fetched from a peer.
const FETCH_WAIT: Duration = Duration::from_secs(120);

impl Sources for SearchSources {
    fn blob(&self, blob: &BlobRef) -> Result<Vec<u8>, BlobError> {
        match &self.blobs {
            Blobs::Disk(root) => match (chorus_engine::blob::read_blob(root, blob), &self.peers) {
                (Err(BlobError::NotFound(_) | BlobError::Corrupt { .. }), Some(shared)) => {
                    block_on(shared.engine.blob(*blob)).map(|b| b.to_vec())
                }
                (read, _) => read,
            },
            Blobs::S3(s3) => s3.get_blocking(blob).map(|b| b.to_vec()),
        }
    }

    fn file_text(&self, file: &FileToRead, kind: TextKind) -> io::Result<Option<String>> {
        let read = |file: &FileToRead| match kind {
            TextKind::Plain => self.plain(file),
            TextKind::Pdf => self.pdf(file),
        };
        let read = match read(file) {
            Err(e) if e.kind() == io::ErrorKind::NotFound && self.peers.is_some() => {
                self.fetch(file).and_then(|()| read(file))
            }
            other => other,
        };
        match read {
            // The bytes are gone (the file was deleted and its bytes reclaimed) or do not
            // match their record: there is no text to index.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::InvalidData
                ) =>
            {
                tracing::debug!(error = %e, file = %file.id, "search: no bytes to read");
                Ok(None)
            }
            other => other,
        }
    }
}

impl SearchSources {
    /// Fetches a file's bytes from a peer that holds them, on shard 0; `NotFound` when no
    /// peer does (the file was deleted, say).
    fn fetch(&self, file: &FileToRead) -> io::Result<()> {
        let Some(shared) = self.peers.clone() else {
            return Err(io::ErrorKind::NotFound.into());
        };
        super::peers::ensure_local_waiting(shared, file.sha256, file.size, FETCH_WAIT)
    }

    fn plain(&self, file: &FileToRead) -> io::Result<Option<String>> {
        let n = file.size.min(TEXT_BYTES_MAX as u64) as usize;
        if n == 0 {
            return Ok(Some(String::new()));
        }
        let source = self.store.open_bytes(&file.sha256, file.size)?;
        let head = self.store.read_at(&source, 0, n)?;
        Ok(plain_text(&head))
    }

    fn pdf(&self, file: &FileToRead) -> io::Result<Option<String>> {
        let (input, copied) = self.store.local_copy(&file.sha256, file.size)?;
        let output = self.store.tmp_path();
        let kind = super::preview::TEXT_KIND;
        let outcome = run_worker(&self.exe, self.limits, kind, &file.name, &input, output);
        if copied {
            let _ = std::fs::remove_file(&input);
        }
        match outcome? {
            Outcome::Made { output, .. } => {
                let read = std::fs::File::open(&output).and_then(|f| {
                    let mut bytes = Vec::new();
                    f.take(TEXT_BYTES_MAX as u64).read_to_end(&mut bytes)?;
                    Ok(bytes)
                });
                let _ = std::fs::remove_file(&output);
                // The worker wrote UTF-8; a character cut by the limit is dropped.
                Ok(Some(cap_text(
                    String::from_utf8_lossy(&read?)
                        .trim_end_matches('\u{fffd}')
                        .to_owned(),
                )))
            }
            Outcome::Refused(why) => {
                tracing::debug!(file = %file.id, why, "search: no text in the PDF");
                Ok(None)
            }
            Outcome::Crashed(why) => {
                self.metrics.preview_worker_crashes.inc();
                tracing::warn!(file = %file.id, why, "search: PDF text worker crashed");
                Ok(None)
            }
        }
    }
}
