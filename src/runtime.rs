//! Process-level tuning for CPU training.

/// Makes glibc's allocator keep freed tensor memory for reuse.
///
/// Training allocates and frees many tensors of tens of megabytes per step.
/// With glibc's defaults each of them is a fresh `mmap` whose pages the
/// kernel must fault in and zero, then an `munmap`: about a third of a
/// training step's time on the 6-layer d256 model (BENCHMARKS.md). Serving
/// blocks up to 32 MiB from the heap and trimming it only above 1 GiB keeps
/// those pages mapped. Call it once, at start-up, before any tensor exists;
/// it does nothing on other C libraries.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before other
    // threads allocate (at the start of main).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}
