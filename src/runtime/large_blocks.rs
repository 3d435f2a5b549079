//! A global allocator that serves tensor-sized blocks from huge pages and reuses them.
//!
//! A training step allocates and frees the same large tensors (hundreds of
//! megabytes at long context) every step. Through glibc each of them is a fresh
//! `mmap` whose 4 KiB pages the kernel faults in and zeroes one by one, then an
//! `munmap`: on the 6-layer model at 2 x 16,384 frames the kernel's page
//! clearing and fault handling took about a third of the step (BENCHMARKS.md).
//! Blocks from [`LARGE_BLOCK`] up are therefore mapped here directly, advised as
//! transparent huge pages (512x fewer faults), and on release kept for the next
//! request that fits (best fit; a larger block gives back its tail), so a
//! steady-state step maps, faults and zeroes far less.
//!
//! Cached blocks are resident memory. By default the cache only fills the
//! headroom below the most large-block bytes ever live at once, so it does not
//! raise the process's peak; [`set_cache_extra`] lets it grow past that mark,
//! trading peak memory for fewer fresh pages.
//!
//! Written by hand because the allocator crates do not fit: jemalloc with its
//! decay disabled and `thp:always` was as fast as the huge pages alone but
//! peaked 25 % higher in RSS on the same step, and glibc's own huge-page tunable
//! (`GLIBC_TUNABLES`) is read only at process start and still zeroes every block.
//!
//! Everything below [`LARGE_BLOCK`] goes to the system allocator unchanged.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Requests of at least this many bytes are mapped and cached here.
pub const LARGE_BLOCK: usize = 4 << 20;
/// Transparent huge page size on x86-64 and most aarch64 kernels; blocks are
/// rounded up to and aligned on it.
const HUGE_PAGE: usize = 2 << 20;
/// Largest alignment served from mappings (page alignment); larger ones go to the system.
const MAX_ALIGN: usize = 4096;
/// Cached blocks at most.
const SLOTS: usize = 1024;

/// Bytes the cache may hold beyond the headroom below the high-water mark.
static EXTRA: AtomicUsize = AtomicUsize::new(0);

/// Released blocks awaiting reuse, oldest first.
struct Cache {
    /// (address, mapped length) of each cached block; the first `len` entries are used.
    blocks: [(usize, usize); SLOTS],
    /// Used entries.
    len: usize,
    /// Sum of the cached lengths.
    bytes: usize,
    /// Mapped bytes handed out and not yet released.
    live: usize,
    /// Most bytes ever live at once: the cache only fills the headroom below it.
    high: usize,
}

impl Cache {
    /// Removes and returns the smallest cached block of at least `size` mapped
    /// bytes (the newest among equals), its tail past `size` unmapped: the head's
    /// pages stay resident, so the caller faults in nothing.
    fn take(&mut self, size: usize) -> Option<usize> {
        let mut best: Option<usize> = None;
        for i in (0..self.len).rev() {
            let len = self.blocks[i].1;
            if len >= size && best.is_none_or(|b| len < self.blocks[b].1) {
                best = Some(i);
                if len == size {
                    break;
                }
            }
        }
        let i = best?;
        let (addr, len) = self.blocks[i];
        self.blocks.copy_within(i + 1..self.len, i);
        self.len -= 1;
        self.bytes -= len;
        if len > size {
            unmap(addr + size, len - size);
        }
        Some(addr)
    }

    /// Unmaps the oldest block.
    fn evict_oldest(&mut self) {
        let (addr, size) = self.blocks[0];
        self.blocks.copy_within(1..self.len, 0);
        self.len -= 1;
        self.bytes -= size;
        unmap(addr, size);
    }
}

static CACHE: Mutex<Cache> = Mutex::new(Cache {
    blocks: [(0, 0); SLOTS],
    len: 0,
    bytes: 0,
    live: 0,
    high: 0,
});

/// Locks the cache; nothing panics while it is held, so poisoning cannot carry a broken state.
fn cache() -> std::sync::MutexGuard<'static, Cache> {
    CACHE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Lets the cache hold `bytes` more than the headroom below the high-water
/// mark of live large blocks (default 0: the cache never raises the peak).
/// Larger values avoid more fresh pages (faster steps) at up to that much more
/// peak resident memory; extra blocks beyond a lowered value go back to the
/// kernel, oldest first.
pub fn set_cache_extra(bytes: usize) {
    EXTRA.store(bytes, Ordering::Relaxed);
    let mut c = cache();
    let room = (c.high - c.live).saturating_add(bytes);
    c.shrink_to(room);
}

/// The global allocator of the `lcasr` binary and the benchmarks: install with
/// `#[global_allocator] static A: lcasr::runtime::LargeBlockAlloc = lcasr::runtime::LargeBlockAlloc;`.
pub struct LargeBlockAlloc;

/// Mapped length of a large request.
fn mapped_len(size: usize) -> usize {
    size.div_ceil(HUGE_PAGE) * HUGE_PAGE
}

/// Whether a request is served by this module rather than the system allocator.
fn is_large(layout: Layout) -> bool {
    layout.size() >= LARGE_BLOCK && layout.align() <= MAX_ALIGN
}

/// Maps `len` fresh zeroed bytes aligned on a huge page, advised as huge pages; 0 on failure.
fn map(len: usize) -> usize {
    let Some(total) = len.checked_add(HUGE_PAGE) else {
        return 0;
    };
    // SAFETY: an anonymous private mapping touches no existing memory.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return 0;
    }
    let raw = raw as usize;
    let start = raw.div_ceil(HUGE_PAGE) * HUGE_PAGE;
    // Trim the unaligned head and the tail so the block is exactly `len` bytes.
    if start > raw {
        unmap(raw, start - raw);
    }
    let tail = raw + total - (start + len);
    if tail > 0 {
        unmap(start + len, tail);
    }
    // SAFETY: advising our own fresh mapping; failure (THP off) only loses speed.
    unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
    start
}

/// Returns a mapping to the kernel.
fn unmap(addr: usize, len: usize) {
    // SAFETY: callers pass a range this module mapped and no longer hands out.
    unsafe { libc::munmap(addr as *mut libc::c_void, len) };
}

impl Cache {
    /// Unmaps the oldest blocks until at most `bytes` stay cached.
    fn shrink_to(&mut self, bytes: usize) {
        while self.bytes > bytes {
            self.evict_oldest();
        }
    }

    /// A block of `len` mapped bytes: a cached one when it fits (then `true`),
    /// else a fresh mapping, made room for by unmapping cached blocks so that
    /// live plus cached bytes stay within the high-water mark of live bytes.
    fn obtain(&mut self, len: usize) -> (usize, bool) {
        let hit = self.take(len);
        let live = self.live + len;
        let high = self.high.max(live);
        if hit.is_none() {
            self.shrink_to((high - live).saturating_add(EXTRA.load(Ordering::Relaxed)));
        }
        let addr = hit.unwrap_or_else(|| map(len));
        if addr != 0 {
            self.live = live;
            self.high = high;
        }
        (addr, hit.is_some())
    }

    /// Caches a released block when the budget and the headroom below the
    /// high-water mark allow, unmapping older blocks to make room; else unmaps it.
    fn release(&mut self, addr: usize, len: usize) {
        self.live -= len;
        let room = (self.high - self.live).saturating_add(EXTRA.load(Ordering::Relaxed));

        if len > room {
            unmap(addr, len);
            return;
        }
        self.shrink_to(room - len);
        if self.len == SLOTS {
            self.evict_oldest();
        }
        self.blocks[self.len] = (addr, len);
        self.len += 1;
        self.bytes += len;
    }
}

// SAFETY: large blocks are page-aligned (MAX_ALIGN bounds what they serve),
// at least `size` bytes long, and owned by exactly one caller between `alloc`
// and `dealloc`; everything else is the system allocator's.
unsafe impl GlobalAlloc for LargeBlockAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !is_large(layout) {
            return System.alloc(layout);
        }
        cache().obtain(mapped_len(layout.size())).0 as *mut u8
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !is_large(layout) {
            return System.alloc_zeroed(layout);
        }
        let (addr, reused) = cache().obtain(mapped_len(layout.size()));
        let ptr = addr as *mut u8;
        if reused {
            std::ptr::write_bytes(ptr, 0, layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if !is_large(layout) {
            return System.dealloc(ptr, layout);
        }
        cache().release(ptr as usize, mapped_len(layout.size()));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
        match (is_large(layout), is_large(new_layout)) {
            (false, false) => System.realloc(ptr, layout, new_size),
            (true, true) if mapped_len(layout.size()) == mapped_len(new_size) => ptr,
            _ => {
                let new = self.alloc(new_layout);
                if !new.is_null() {
                    std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                    self.dealloc(ptr, layout);
                }
                new
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_blocks_are_aligned_reused_and_zeroed() {
        let a = LargeBlockAlloc;
        let layout = Layout::from_size_align(LARGE_BLOCK + 12_345, 64).unwrap();
        // SAFETY: layouts are non-zero; every block is freed with its own layout.
        unsafe {
            let p = a.alloc(layout);
            assert!(!p.is_null());
            assert_eq!(p as usize % HUGE_PAGE, 0);
            std::ptr::write_bytes(p, 7, layout.size());
            a.dealloc(p, layout);
            let q = a.alloc_zeroed(layout);
            let block = std::slice::from_raw_parts(q, layout.size());
            assert!(
                block.iter().all(|&b| b == 0),
                "a reused block must be zeroed"
            );
            // Growing within the same mapped length keeps the block; past it, the data moves.
            let r = a.realloc(q, layout, layout.size() + 100);
            assert_eq!(r, q);
            let bigger = Layout::from_size_align(layout.size() + 100, 64).unwrap();
            *r.add(5) = 9;
            let s = a.realloc(r, bigger, 3 * LARGE_BLOCK);
            assert_eq!(*s.add(5), 9);
            let s_layout = Layout::from_size_align(3 * LARGE_BLOCK, 64).unwrap();
            // Shrinking below the threshold hands the data to the system allocator.
            let t = a.realloc(s, s_layout, 64);
            assert_eq!(*t.add(5), 9);
            a.dealloc(t, Layout::from_size_align(64, 64).unwrap());
        }
    }
}
