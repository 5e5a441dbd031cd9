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
/// Growth of the allocator's free bytes since the last trim that makes the housekeeper
/// trim, whatever the connections did: a burst of large, short-lived allocations (the
/// answers to 19,000 `presence:sub` of 100 users each, 11 KiB apiece) leaves hundreds of
/// MiB free but resident.
pub const TRIM_AFTER_FREED_BYTES: usize = 32 << 20;

/// Bytes the allocator holds free in its arenas (resident or not).
pub fn free_bytes() -> usize {
    // SAFETY: mallinfo2 only reads the allocator's statistics, under its own locks.
    unsafe { libc::mallinfo2().fordblks }
}

/// Decides when freed memory should go back to the kernel: after at least
/// [`TRIM_AFTER_CLOSES`] connections closed since the most were open, or once the
/// allocator's free bytes grew by [`TRIM_AFTER_FREED_BYTES`] since the last trim.
#[derive(Debug, Default)]
pub struct TrimPolicy {
    high_water: usize,
    /// Free bytes right after the last trim (a trim leaves free chunks free, only not
    /// resident, so the growth since then is what is worth returning).
    free_after: usize,
}

impl TrimPolicy {
    /// Sees the number of open connections and the allocator's free bytes; true when it
    /// is time to trim. After a trim, call [`TrimPolicy::trimmed`].
    pub fn observe(&mut self, open: usize, free: usize) -> bool {
        self.high_water = self.high_water.max(open);
        self.free_after = self.free_after.min(free);
        let closes = self.high_water - open >= TRIM_AFTER_CLOSES;
        let freed = free - self.free_after >= TRIM_AFTER_FREED_BYTES;
        if closes {
            self.high_water = open;
        }
        closes || freed
    }

    /// Records the free bytes after a trim.
    pub fn trimmed(&mut self, free: usize) {
        self.free_after = free;
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
            policy.trimmed(free_bytes());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::park_timeout(HOUSEKEEPING_INTERVAL);
                if policy.observe(open(), free_bytes()) {
                    if trim() {
                        tracing::debug!("returned freed memory to the kernel");
                    }
                    policy.trimmed(free_bytes());
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
        assert!(!p.observe(5_000, 0));
        assert!(!p.observe(4_500, 0));
        assert!(p.observe(3_900, 0));
        assert!(!p.observe(3_000, 0));
        assert!(p.observe(2_800, 0));
        assert!(p.observe(0, 0));
        assert!(!p.observe(900, 0));
    }

    // A burst that leaves much memory free trims once, measured from what the last trim
    // left free (which stays counted as free), and again only after another such burst.
    #[test]
    fn trims_after_a_burst_of_frees() {
        let mut p = TrimPolicy::default();
        p.trimmed(10 << 20);
        assert!(!p.observe(100, 30 << 20));
        assert!(p.observe(100, (10 << 20) + TRIM_AFTER_FREED_BYTES));
        p.trimmed(50 << 20);
        assert!(!p.observe(100, 60 << 20));
        // Free memory reused, then freed again: measured from the lowest seen.
        assert!(!p.observe(100, 20 << 20));
        assert!(p.observe(100, (20 << 20) + TRIM_AFTER_FREED_BYTES));
    }

    // The allocator's statistics are readable, and a large free shows in them. Tests on
    // other threads allocate and free at the same time (possibly in the same arena), so a
    // few attempts are allowed; the figure must grow in one of them.
    #[test]
    fn free_bytes_reads_the_allocator() {
        let mut seen = Vec::new();
        for _ in 0..20 {
            // Blocks freed between blocks kept, so that their space cannot fold into the
            // top of the heap and be returned at once. Measured from after the
            // allocations, which may have reused free memory.
            let (blocks, kept): (Vec<Vec<u8>>, Vec<Vec<u8>>) = (0..32)
                .map(|_| (vec![1u8; 64 * 1024], vec![1u8; 64 * 1024]))
                .unzip();
            let before = free_bytes();
            drop(blocks);
            let after = free_bytes();
            drop(kept);
            if after >= before + 16 * 64 * 1024 {
                return;
            }
            seen.push((before, after));
        }
        panic!("2 MiB freed never showed as free: {seen:?}");
    }
}
