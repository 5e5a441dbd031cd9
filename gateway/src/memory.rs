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
pub const TRIM_AFTER_FREED_BYTES: usize = 16 << 20;

/// Growth of the process's resident memory since the allocator was last looked at that
/// makes the housekeeper look again (and trim if [`TRIM_AFTER_FREED_BYTES`] came free).
/// Looking is not free: `mallinfo2` walks every free chunk of every arena under that
/// arena's lock, and a shard that allocates meanwhile waits. On a server holding 2.4 GB
/// after a minute of posts, a look every 5 s stalled each shard some 60–100 ms at a time:
/// a single node's p99 at 2,000 messages/s was 91–104 ms with it, 3.8 ms without
/// (`bench/results/2026-12-06-rf1-stall/`). Reading the resident size takes no allocator
/// lock; a burst that leaves hundreds of MiB free first made the process that much larger.
pub const LOOK_AFTER_RESIDENT_BYTES: usize = 128 << 20;

/// Growth of the resident size since the last look made at a burst's end that makes the
/// housekeeper look once the size has stopped growing (it grew less than
/// [`SETTLED_WITHIN_BYTES`] over the last round): the end of a burst. A heap that grows
/// steadily (posts kept in memory) is never settled, so it is looked at only every
/// [`LOOK_AFTER_RESIDENT_BYTES`]; a burst smaller than that (the 19,000 `presence:sub`
/// answers) is still given back when it ends.
pub const LOOK_AFTER_SETTLED_BYTES: usize = 32 << 20;

/// Growth over one housekeeping round below which the resident size counts as settled.
pub const SETTLED_WITHIN_BYTES: usize = 1 << 20;

/// The process's resident memory in bytes (`/proc/self/statm`; no allocator lock).
pub fn resident_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf only reads a system constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * usize::try_from(page).unwrap_or(4096)
}

/// Bytes the allocator holds free in its arenas (resident or not). Walks every arena under
/// its lock: see [`LOOK_AFTER_RESIDENT_BYTES`].
pub fn free_bytes() -> usize {
    // SAFETY: mallinfo2 only reads the allocator's statistics, under its own locks.
    unsafe { libc::mallinfo2().fordblks }
}

/// Decides when freed memory should go back to the kernel: after at least
/// [`TRIM_AFTER_CLOSES`] connections closed since the most were open, or once the
/// allocator's free bytes grew by [`TRIM_AFTER_FREED_BYTES`] since the last trim, which
/// it looks at only after the resident size grew by [`LOOK_AFTER_RESIDENT_BYTES`] since
/// the last look, or by [`LOOK_AFTER_SETTLED_BYTES`] since the last look at a burst's end
/// and then stopped growing.
#[derive(Debug, Default)]
pub struct TrimPolicy {
    high_water: usize,
    /// Free bytes right after the last trim (a trim leaves free chunks free, only not
    /// resident, so the growth since then is what is worth returning).
    free_after: usize,
    /// The resident size at the last look at the allocator (or the lowest since).
    resident_at_look: usize,
    /// The resident size at the last look made because it had settled (or the lowest
    /// since): a look in the middle of a burst does not move it, so the burst's end is
    /// still looked at.
    resident_at_settled: usize,
    /// The resident size seen by the last round.
    resident_before: usize,
}

impl TrimPolicy {
    /// Sees the number of open connections and the resident size, and the allocator's
    /// free bytes (`free`, called only when the resident size grew enough); true when it
    /// is time to trim. After a trim, call [`TrimPolicy::trimmed`].
    pub fn observe(&mut self, open: usize, resident: usize, free: impl FnOnce() -> usize) -> bool {
        self.high_water = self.high_water.max(open);
        let closes = self.high_water - open >= TRIM_AFTER_CLOSES;
        if closes {
            self.high_water = open;
            return true;
        }
        self.resident_at_look = self.resident_at_look.min(resident);
        self.resident_at_settled = self.resident_at_settled.min(resident);
        let settled = resident < self.resident_before + SETTLED_WITHIN_BYTES;
        self.resident_before = resident;
        let step = resident >= self.resident_at_look + LOOK_AFTER_RESIDENT_BYTES;
        let burst_over = settled && resident >= self.resident_at_settled + LOOK_AFTER_SETTLED_BYTES;
        if !step && !burst_over {
            return false;
        }
        self.resident_at_look = resident;
        if burst_over {
            self.resident_at_settled = resident;
        }
        let free = free();
        self.free_after = self.free_after.min(free);
        free - self.free_after >= TRIM_AFTER_FREED_BYTES
    }

    /// Records the free bytes after a trim.
    pub fn trimmed(&mut self, free: usize) {
        self.free_after = free;
    }

    /// Records the resident size of a look at the allocator made outside
    /// [`TrimPolicy::observe`] (at start).
    pub fn looked(&mut self, resident: usize) {
        self.resident_at_look = resident;
        self.resident_at_settled = resident;
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
            policy.looked(resident_bytes());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::park_timeout(HOUSEKEEPING_INTERVAL);
                if policy.observe(open(), resident_bytes(), free_bytes) {
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

    /// The allocator's free bytes as `bytes`, each look at them counted in `looks`.
    fn counted(looks: &std::cell::Cell<usize>, bytes: usize) -> impl FnOnce() -> usize + '_ {
        move || {
            looks.set(looks.get() + 1);
            bytes
        }
    }

    // The policy trims once per wave of closes, not while connections are opening or
    // after a few closes.
    #[test]
    fn trims_after_a_wave_of_closes() {
        let mut p = TrimPolicy::default();
        let none = || 0;
        assert!(!p.observe(5_000, 0, none));
        assert!(!p.observe(4_500, 0, none));
        assert!(p.observe(3_900, 0, none));
        assert!(!p.observe(3_000, 0, none));
        assert!(p.observe(2_800, 0, none));
        assert!(p.observe(0, 0, none));
        assert!(!p.observe(900, 0, none));
    }

    // A burst that leaves much memory free trims once, measured from what the last trim
    // left free (which stays counted as free), and again only after another such burst;
    // the allocator is looked at only once the resident size grew enough since the last
    // look.
    #[test]
    fn trims_after_a_burst_of_frees() {
        const MIB: usize = 1 << 20;
        let grown = |n: usize| n * LOOK_AFTER_RESIDENT_BYTES;
        let mut p = TrimPolicy::default();
        p.trimmed(10 * MIB);
        p.looked(grown(1));
        let looks = std::cell::Cell::new(0);
        let free = |bytes: usize| counted(&looks, bytes);
        // Grown less than the step: not looked at, whatever is free.
        assert!(!p.observe(100, grown(2) - 1, free(500 * MIB)));
        assert_eq!(looks.get(), 0);
        assert!(!p.observe(100, grown(2), free(10 * MIB + TRIM_AFTER_FREED_BYTES - MIB)));
        assert!(p.observe(100, grown(3), free(10 * MIB + TRIM_AFTER_FREED_BYTES)));
        p.trimmed(50 * MIB);
        assert!(!p.observe(100, grown(4), free(60 * MIB)));
        // Free memory reused, then freed again: measured from the lowest seen.
        assert!(!p.observe(100, grown(5), free(20 * MIB)));
        // The resident size fell (a trim): growth counts from the lowest seen.
        assert!(!p.observe(100, grown(1), free(0)));
        assert!(p.observe(100, grown(2), free(20 * MIB + TRIM_AFTER_FREED_BYTES)));
        assert_eq!(looks.get(), 5);
    }

    // A burst smaller than the look step is looked at, and trimmed, once the resident
    // size stops growing; a heap that grows steadily is not, until it grew the whole step.
    #[test]
    fn looks_when_a_smaller_burst_settles() {
        const MIB: usize = 1 << 20;
        let base = 200 * MIB;
        let mut p = TrimPolicy::default();
        p.trimmed(10 * MIB);
        p.looked(base);
        let looks = std::cell::Cell::new(0);
        let free = |bytes: usize| counted(&looks, bytes);
        let burst = 10 * MIB + TRIM_AFTER_FREED_BYTES;
        // Growing steadily, each round more than it settles within: never looked at.
        let step = SETTLED_WITHIN_BYTES + MIB;
        let mut resident = base;
        while resident + step < base + LOOK_AFTER_RESIDENT_BYTES {
            resident += step;
            assert!(!p.observe(100, resident, free(burst)));
        }
        assert_eq!(looks.get(), 0);
        // Settled after growing less than the settled step since the last look: not yet.
        let mut p = TrimPolicy::default();
        p.trimmed(10 * MIB);
        p.looked(base);
        assert!(!p.observe(100, base + LOOK_AFTER_SETTLED_BYTES - MIB, free(burst)));
        assert!(!p.observe(100, base + LOOK_AFTER_SETTLED_BYTES - MIB, free(burst)));
        assert_eq!(looks.get(), 0);
        // Grown past it while growing: not yet; the next round finds it settled and trims.
        let after = base + LOOK_AFTER_SETTLED_BYTES + 8 * MIB;
        assert!(!p.observe(100, after, free(burst)));
        assert_eq!(looks.get(), 0);
        assert!(p.observe(100, after, free(burst)));
        assert_eq!(looks.get(), 1);
        p.trimmed(burst);
        // Settled, not grown again since the look: not looked at again.
        assert!(!p.observe(100, after, free(burst * 2)));
        assert_eq!(looks.get(), 1);
        // A burst past the whole step is looked at in its middle, with little free yet;
        // its end is looked at again when it settles, and trimmed.
        let mut p = TrimPolicy::default();
        p.trimmed(10 * MIB);
        p.looked(base);
        let middle = base + LOOK_AFTER_RESIDENT_BYTES;
        assert!(!p.observe(100, middle, free(10 * MIB)));
        assert_eq!(looks.get(), 2);
        let end = middle + LOOK_AFTER_SETTLED_BYTES / 2;
        assert!(!p.observe(100, end, free(burst)));
        assert_eq!(looks.get(), 2);
        assert!(p.observe(100, end, free(burst)));
        assert_eq!(looks.get(), 3);
    }

    #[test]
    fn resident_bytes_reads_the_process() {
        let r = resident_bytes();
        assert!(r > 1 << 20 && r < 1 << 40, "{r}");
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
