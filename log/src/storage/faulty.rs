//! A fault layer over any [`StorageRoot`](super::StorageRoot): a disk whose fsyncs fail while a switch is on.
//!
//! Fault tests of real processes use it: a cluster node's data directory is a
//! [`FaultyRoot`] over its [`crate::DiskRoot`], and while its [`DiskFaults`] say so,
//! every [`StorageFile::sync_data`](super::StorageFile::sync_data) and [`Storage::sync_dir`](super::Storage::sync_dir) fails with `EIO` before it
//! reaches the device, as a dying disk's would. Everything else passes through unchanged,
//! so with the switch off the layer changes nothing but one atomic load per fsync.

use super::layer::{Layer, LayeredRoot};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// `EIO`, what a failed fsync returns.
const EIO: i32 = 5;

/// The switch of a [`FaultyRoot`]: shared by every clone, settable from any thread.
#[derive(Clone, Debug, Default)]
pub struct DiskFaults {
    fsync_fails: Arc<AtomicBool>,
}

impl DiskFaults {
    /// Makes every later fsync of the root fail (`true`) or reach the device (`false`).
    pub fn set_fsync_fails(&self, fails: bool) {
        self.fsync_fails.store(fails, Ordering::Relaxed);
    }

    /// Whether fsyncs fail now.
    pub fn fsync_fails(&self) -> bool {
        self.fsync_fails.load(Ordering::Relaxed)
    }

    fn check(&self, what: &str) -> io::Result<()> {
        if self.fsync_fails() {
            let e = io::Error::from_raw_os_error(EIO);
            return Err(io::Error::new(
                e.kind(),
                format!("{what} (fault layer): {e}"),
            ));
        }
        Ok(())
    }
}

impl Layer for DiskFaults {
    fn sync_data(&self) -> io::Result<()> {
        self.check("fdatasync")
    }

    fn sync_dir(&self) -> io::Result<()> {
        self.check("directory fsync")
    }
}

/// A [`StorageRoot`](super::StorageRoot) whose directories and files fail their fsyncs
/// while its [`DiskFaults`] say so.
pub type FaultyRoot<R> = LayeredRoot<R, DiskFaults>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Entry, Log, LogConfig, SimConfig, SimRoot, Storage, StorageRoot};
    use futures::executor::block_on;

    #[test]
    fn fsyncs_fail_while_the_switch_is_on_and_a_log_appending_then_is_poisoned() {
        let faults = DiskFaults::default();
        let root = FaultyRoot::new(SimRoot::new(SimConfig::default()), faults.clone());
        block_on(async {
            let dir = root.dir("p/0").await.expect("dir");
            let (log, _) = Log::open(dir.clone(), LogConfig::default())
                .await
                .expect("open");
            let entry = |payload: &'static [u8]| Entry {
                timestamp_us: 1,
                payload,
            };
            log.append(&[entry(b"kept")]).await.expect("a good disk");
            faults.set_fsync_fails(true);
            let failed = log.append(&[entry(b"lost")]).await;
            assert!(failed.is_err(), "an append whose fsync failed: {failed:?}");
            assert!(log
                .poisoned()
                .is_some_and(|why| why.contains("fault layer")));
            assert!(dir.sync_dir().await.is_err());
            faults.set_fsync_fails(false);
            dir.sync_dir().await.expect("the switch is off");
            // A new log over the same files (the node restarted) holds what was synced.
            let (again, _) = Log::open(dir, LogConfig::default()).await.expect("reopen");
            assert!(again.poisoned().is_none());
            let first = again
                .read(again.first_offset(), 1 << 20)
                .await
                .expect("read");
            assert_eq!(first.first().map(|r| &r.payload[..]), Some(&b"kept"[..]));
        });
    }
}
