//! How the process uses the C allocator, which every thread's `malloc` goes through.
//!
//! glibc serves a large allocation from its own `mmap` and returns it on free, but by
//! default it raises that threshold to the size of every such block freed (up to 32 MiB),
//! so later blocks of that size come from the heap instead. Password hashing allocates
//! 19 MiB per call: once the threshold had risen, each hash left a 19 MiB hole in a heap
//! that small long-lived allocations then split, and the next hash grew the heap again.
//! Every sign-up kept 6–18 MiB resident for good. A fixed threshold keeps every block of
//! [`MMAP_THRESHOLD_BYTES`] or more in mappings of its own, which go back to the kernel
//! when freed, so the heaps hold only small allocations.

/// Allocations of at least this many bytes get a mapping of their own.
pub const MMAP_THRESHOLD_BYTES: i32 = 1 << 20;

/// Fixes the allocator's mmap threshold (see the module documentation). Called once at
/// start, before the shards allocate.
pub fn tune_allocator() {
    // SAFETY: mallopt only changes the allocator's parameters; it is safe to call at any
    // time, from any thread.
    let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) };
    if ok != 1 {
        tracing::warn!("could not set the allocator's mmap threshold");
    }
}

/// Returns the free memory at the top of every heap and in whole free pages inside them
/// to the kernel, and says whether any was released. glibc keeps freed memory per thread
/// arena for reuse; after a wave of connections closes, this gives most of it back.
pub fn trim() -> bool {
    // SAFETY: malloc_trim walks the allocator's own free lists under its own locks.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// How often the housekeeper looks at the number of open connections.
pub const HOUSEKEEPING_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);
/// Closed connections, counted from the highest number open since the last trim, that
/// make the housekeeper trim.
pub const TRIM_AFTER_CLOSES: usize = 1_000;

/// Decides when freed memory should go back to the kernel: after at least
/// [`TRIM_AFTER_CLOSES`] connections closed since the most were open.
#[derive(Debug, Default)]
pub struct TrimPolicy {
    high_water: usize,
}

impl TrimPolicy {
    /// Sees the number of open connections; true when it is time to trim.
    pub fn observe(&mut self, open: usize) -> bool {
        self.high_water = self.high_water.max(open);
        if self.high_water - open < TRIM_AFTER_CLOSES {
            return false;
        }
        self.high_water = open;
        true
    }
}

/// Runs on a thread of its own until `stop` is set: every [`HOUSEKEEPING_INTERVAL`] it
/// reads the open connections and trims the allocator after a wave of closes. It never
/// touches a shard: `malloc_trim` takes each arena's lock for the time it walks it, which
/// briefly delays that shard's next allocation and nothing else.
pub fn housekeeper(
    open: impl Fn() -> usize + Send + 'static,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("chorus-memory".into())
        .spawn(move || {
            let mut policy = TrimPolicy::default();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::park_timeout(HOUSEKEEPING_INTERVAL);
                if policy.observe(open()) && trim() {
                    tracing::debug!("returned freed memory to the kernel");
                }
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    // The policy trims once per wave of closes, not while connections are opening or
    // after a few closes.
    #[test]
    fn trims_after_a_wave_of_closes() {
        let mut p = TrimPolicy::default();
        assert!(!p.observe(5_000));
        assert!(!p.observe(4_500));
        assert!(p.observe(3_900));
        assert!(!p.observe(3_000));
        assert!(p.observe(2_800));
        assert!(p.observe(0));
        assert!(!p.observe(900));
    }
}
