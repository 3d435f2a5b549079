//! Process-level tuning for CPU training, and the process's memory use.

pub mod device;
#[cfg(target_os = "linux")]
mod large_blocks;
pub mod peak;

#[cfg(target_os = "linux")]
pub use large_blocks::{set_cache_extra, LargeBlockAlloc, LARGE_BLOCK};

/// Environment variable: MiB that [`LargeBlockAlloc`]'s cache of released
/// blocks may hold beyond the headroom below the peak (default 0; see
/// `set_cache_extra`). Read by [`tune_allocator`].
pub const CACHE_ENV: &str = "LCASR_ALLOC_CACHE_MIB";

/// Makes glibc's allocator keep freed tensor memory for reuse.
///
/// Training allocates and frees many tensors of tens of megabytes per step.
/// With glibc's defaults each of them is a fresh `mmap` whose pages the
/// kernel must fault in and zero, then an `munmap`: about a third of a
/// training step's time on the 6-layer d256 model (BENCHMARKS.md). Serving
/// blocks up to 32 MiB from the heap and trimming it only above 1 GiB keeps
/// those pages mapped. Blocks from [`LARGE_BLOCK`] up bypass glibc when the
/// binary installs [`LargeBlockAlloc`] (the CLI and the benchmarks do); this
/// also applies [`CACHE_ENV`] to it. Call it once, at start-up, before any
/// tensor exists; the glibc part does nothing on other C libraries.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before other
    // threads allocate (at the start of main).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
    #[cfg(target_os = "linux")]
    if let Some(mib) = std::env::var(CACHE_ENV)
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        set_cache_extra(mib << 20);
    }
}
