//! Replays the committed fuzz corpora of the engine's decoders (`fuzz/corpus/event/`,
//! `fuzz/corpus/snapshot/`) through the fuzz targets' checks on the stable toolchain, so
//! every input the fuzzer kept, crashers fixed since included, stays a regression test
//! without nightly or libFuzzer. Each input runs under a cap on the size of any one
//! allocation, in proportion to the input, so a decoder that trusts a length field and
//! allocates for it fails here as it would under the fuzzer's memory limit.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::Path;

/// The largest single allocation allowed per byte of input, past a fixed allowance.
/// Decoding may hold a few times the input (a restored message takes more memory than its
/// bytes in the file); a length that is trusted asks for far more.
const ALLOC_BYTES_PER_INPUT_BYTE: usize = 16;
/// The fixed allowance, for buffers whose size does not depend on the input.
const ALLOC_BYTES_BASE: usize = 64 * 1024;

thread_local! {
    /// The cap on one allocation on this thread: no cap outside an input's decoding.
    static ALLOC_BYTES_MAX: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// The system allocator, refusing (so the process aborts, naming the size) any allocation
/// over the current thread's cap.
struct Capped;

fn within_cap(bytes: usize) -> bool {
    bytes <= ALLOC_BYTES_MAX.try_with(Cell::get).unwrap_or(usize::MAX)
}

// SAFETY: every call is forwarded to `System` unchanged, or refused with a null pointer,
// which the `GlobalAlloc` contract allows.
unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !within_cap(layout.size()) {
            return std::ptr::null_mut();
        }
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !within_cap(layout.size()) {
            return std::ptr::null_mut();
        }
        System.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !within_cap(new_size) {
            return std::ptr::null_mut();
        }
        System.realloc(ptr, layout, new_size)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOCATOR: Capped = Capped;

/// Feeds every file in `fuzz/corpus/<target>/` to `check` under the allocation cap, and
/// checks that the corpus holds inputs that are accepted as well as inputs that are not.
fn replay(target: &str, check: fn(&[u8]) -> bool) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let (mut inputs, mut accepted) = (0, 0);
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read the corpus at {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("list the corpus").path();
        if !path.is_file() {
            continue;
        }
        let data = std::fs::read(&path).expect("read a corpus file");
        // A panic or an abort inside names no input; this line names the one that caused
        // it (an abort loses captured output: rerun with `--nocapture` to see it).
        eprintln!("decoding {} ({} bytes)", path.display(), data.len());
        let cap = ALLOC_BYTES_BASE + ALLOC_BYTES_PER_INPUT_BYTE * data.len();
        ALLOC_BYTES_MAX.with(|c| c.set(cap));
        let ok = check(&data);
        ALLOC_BYTES_MAX.with(|c| c.set(usize::MAX));
        inputs += 1;
        accepted += usize::from(ok);
    }
    assert!(inputs > 0, "the corpus at {} is empty", dir.display());
    assert!(accepted > 0, "no input in {} is accepted", dir.display());
    assert!(
        accepted < inputs,
        "every input in {} is accepted",
        dir.display()
    );
}

// Event payloads: decoding never panics, and what decodes re-encodes to the same event.
#[test]
fn event_corpus_replays_cleanly() {
    replay("event", chorus_engine::fuzzing::event);
}

// Snapshots: parsing never panics or allocates past the cap, and what restores writes out
// to a snapshot that restores the same channels.
#[test]
fn snapshot_corpus_replays_cleanly() {
    replay("snapshot", chorus_engine::fuzzing::snapshot);
}
