//! Fuzz targets of vmsnap: one function per target, `fn run(data: &[u8])`, that feeds
//! arbitrary bytes to the library's parsers of untrusted input and asserts what must hold.
//!
//! The functions live in [`targets`], a directory the main crate's `tests/fuzz_corpus.rs`
//! includes as well, so that `cargo test` replays the corpus and every regression input in
//! `testdata/fuzz/` through the same code without building this crate or libFuzzer.
//! `fuzz_targets/*.rs` wrap them for libFuzzer; see README.md for the engine choice.

#[path = "targets/mod.rs"]
pub mod targets;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;

/// Largest single allocation a target may make: `fuzz.sh`'s `-malloc_limit_mb=256`.
pub const MALLOC_LIMIT: usize = 256 << 20;

/// The system allocator with the single-allocation limit enforced.
///
/// libFuzzer's `-malloc_limit_mb` works through a sanitizer's malloc hooks
/// (`__sanitizer_install_malloc_and_free_hooks`), which a build with `--sanitizer none` does
/// not link: there the flag is accepted and does nothing, and only `-rss_limit_mb` (sampled
/// once a second) would catch an allocation the input does not justify. This allocator
/// aborts on one of [`MALLOC_LIMIT`] bytes or more, which libFuzzer reports as a crash with
/// the input saved.
pub struct LimitedAlloc;

fn over_limit(size: usize) {
    if size < MALLOC_LIMIT {
        return;
    }
    // Stderr is unbuffered and an integer formats without allocating.
    let _ = writeln!(
        std::io::stderr(),
        "==vmsnap-fuzz== out-of-memory: an allocation of {size} bytes (limit {MALLOC_LIMIT})"
    );
    std::process::abort();
}

// SAFETY: every call is passed on to `System` unchanged; the limit check only aborts.
unsafe impl GlobalAlloc for LimitedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        over_limit(layout.size());
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        over_limit(layout.size());
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        over_limit(new_size);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: LimitedAlloc = LimitedAlloc;
