//! What the heap-counting tests (`dialog_memory`, `tls_idle_memory`)
//! share: a global allocator that counts live heap bytes, and a media
//! layer that keeps nothing. Each test binary installs the allocator
//! itself (`#[global_allocator] static GLOBAL: Counting = Counting;`),
//! so only those binaries count.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicIsize, Ordering},
    time::Instant,
};

use sip_edge::media::{DialogKey, EndReason, MediaControl, MediaError, SdpEvent};

/// Forwards to `System`, counting live bytes as requested and as glibc
/// malloc chunks.
pub struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);
static LIVE_CHUNKS: AtomicIsize = AtomicIsize::new(0);

/// What glibc malloc takes for `size` bytes on 64-bit: the size plus an
/// 8-byte header, rounded up to 16, at least 32.
fn chunk(size: usize) -> isize {
    (size.saturating_add(8).div_ceil(16) * 16).max(32) as isize
}

fn count(size: usize, sign: isize) {
    LIVE.fetch_add(sign * size as isize, Ordering::Relaxed);
    LIVE_CHUNKS.fetch_add(sign * chunk(size), Ordering::Relaxed);
}

// SAFETY: every call forwards to `System` with the same layout; the
// counters are only statistics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: forwarded as is.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            count(l.size(), 1);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        // SAFETY: forwarded as is.
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            count(l.size(), 1);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: forwarded as is.
        unsafe { System.dealloc(p, l) };
        count(l.size(), -1);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        // SAFETY: forwarded as is.
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            count(l.size(), -1);
            count(new, 1);
        }
        q
    }
}

/// Live heap bytes now: (requested, in malloc chunks).
pub fn live() -> (isize, isize) {
    (
        LIVE.load(Ordering::Relaxed),
        LIVE_CHUNKS.load(Ordering::Relaxed),
    )
}

/// The media layer playing no part: SDP passes unchanged, nothing is kept.
pub struct NoMedia;

impl MediaControl for NoMedia {
    fn on_sdp(&mut self, ev: &SdpEvent<'_>, _now: Instant) -> Result<Vec<u8>, MediaError> {
        Ok(ev.body.to_vec())
    }
    fn on_dialog_end(&mut self, _: &DialogKey, _: Option<&str>, _: EndReason, _: Instant) {}
    fn on_tick(&mut self, _now: Instant) -> Vec<DialogKey> {
        Vec::new()
    }
}
