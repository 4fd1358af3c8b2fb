//! Keeping the resident set small and flat with glibc's allocator: one arena (threads share
//! it instead of each fragmenting its own), large blocks always mapped on their own, and
//! freed memory handed back to the system after the big one-off phases of a batch
//! (validation, finalization).

/// Blocks from this size up get their own mapping, returned to the system when freed.
const MMAP_THRESHOLD: i32 = 128 << 10;

/// Uses one malloc arena and fixes the mmap threshold; call once, before threads start.
///
/// glibc raises its mmap threshold each time a mapped block is freed (up to 32 MiB), after
/// which multi-megabyte buffers — an upload part, a chunk of results being finalized — are
/// carved from the arenas and their memory stays resident after they are freed. A fixed
/// threshold keeps them out of the arenas: measured on a 100,000-line batch, peak RSS 56 →
/// 40 MB. One arena rather than two: the free space each arena keeps grows with the length
/// of a run, and with two a 1,000,000-line batch peaked 10–15 % above a 100,000-line one
/// (30 against 27 MB); with one, 2–5 % (27.6 against 26.5 MB), at no measurable CPU cost
/// (most small blocks come from the per-thread caches without taking the arena's lock).
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

/// Returns freed heap memory to the system.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory the allocator already considers free.
    unsafe {
        libc::malloc_trim(0);
    }
}
