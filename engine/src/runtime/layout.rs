//! The layout file, `ENGINE` at the root of the data directory: the partition count a data
//! directory was created with, which never changes because channel IDs carry their
//! partition.
//!
//! Format, version 1: the text `chorus-engine layout 1\npartitions N\n`. It is written
//! once, through `ENGINE.tmp`, an fsync, a rename and an fsync of the directory.

use crate::env::Env;
use crate::error::{EngineError, IoError};
use chorus_log::{Storage, StorageFile, StorageRoot};
use std::io;

const NAME: &str = "ENGINE";
const TMP_NAME: &str = "ENGINE.tmp";
/// The most bytes read of a layout file: a valid one is far shorter.
const FILE_BYTES_MAX: usize = 4096;

/// Records the partition count on first open and refuses a different one later.
pub(crate) async fn check<E: Env>(env: &E, partitions: u32) -> Result<(), EngineError> {
    let want = format!("chorus-engine layout 1\npartitions {partitions}\n");
    let failed = |e: io::Error| IoError::new(NAME, e);
    let dir = env.root().dir("").await.map_err(failed)?;
    match read(&dir).await {
        Ok(have) if have == want.as_bytes() => Ok(()),
        Ok(have) => Err(EngineError::Config(format!(
            "{NAME} was created with a different layout: {:?}",
            String::from_utf8_lossy(&have)
        ))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            write(&dir, want.as_bytes()).await.map_err(failed)?;
            Ok(())
        }
        Err(e) => Err(failed(e).into()),
    }
}

async fn read<S: Storage>(dir: &S) -> io::Result<Vec<u8>> {
    let f = dir.open(NAME).await?;
    let bytes = f.read_at(0, FILE_BYTES_MAX).await;
    f.close().await?;
    bytes
}

async fn write<S: Storage>(dir: &S, bytes: &[u8]) -> io::Result<()> {
    // A crash may have left the temporary file of an earlier first open.
    match dir.remove(TMP_NAME).await {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let f = dir.create(TMP_NAME).await?;
    let written = async {
        f.write_at(0, bytes).await?;
        // The real storage pads its last block with zeros; the file ends at its text.
        f.truncate(bytes.len() as u64).await?;
        f.sync_data().await
    }
    .await;
    let closed = f.close().await;
    written?;
    closed?;
    dir.rename(TMP_NAME, NAME).await?;
    dir.sync_dir().await
}
