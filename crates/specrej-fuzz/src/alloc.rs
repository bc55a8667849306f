//! The allocation cap: while an input runs, one allocation over 1 GiB fails (the process then
//! aborts, leaving the input in `target/fuzz/<target>/current`). The peak single allocation
//! is reported.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// The largest allocation an input may make.
pub const CAP: usize = 1 << 30;

static ARMED: AtomicBool = AtomicBool::new(false);
static PEAK: AtomicUsize = AtomicUsize::new(0);

struct Capped;

#[allow(unsafe_code, reason = "a GlobalAlloc is an unsafe trait; this one forwards to System")]
unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !admit(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded unchanged; the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !admit(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` through this allocator with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !admit(new_size) {
            return std::ptr::null_mut();
        }
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[allow(unsafe_code, reason = "registering the global allocator")]
#[global_allocator]
static GLOBAL: Capped = Capped;

fn admit(size: usize) -> bool {
    if !ARMED.load(Ordering::Relaxed) {
        return true;
    }
    PEAK.fetch_max(size, Ordering::Relaxed);
    if size > CAP {
        // No allocation here: the message is a static string.
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            b"ALLOCATION OVER 1 GiB: the input is in target/fuzz/<target>/current\n",
        );
        return false;
    }
    true
}

pub fn arm() {
    ARMED.store(true, Ordering::Relaxed);
}

pub fn disarm() {
    ARMED.store(false, Ordering::Relaxed);
}

/// Starts a new peak (one per target).
pub fn reset_peak() {
    PEAK.store(0, Ordering::Relaxed);
}

/// The largest single allocation while armed.
pub fn peak() -> usize {
    PEAK.load(Ordering::Relaxed)
}
