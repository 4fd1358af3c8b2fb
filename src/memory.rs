//! Keeping the resident set small and flat with glibc's allocator: one arena (threads share
//! it instead of each fragmenting its own), large blocks always mapped on their own, and
//! freed memory handed back to the system after the big one-off phases of a batch
//! (validation, finalization).

/// Blocks from this size up get their own mapping, returned to the system when freed; the
/// arena keeps at most twice as much free memory at its top before giving it back.
const MMAP_THRESHOLD: i32 = 2 << 20;

/// Uses one malloc arena and fixes the mmap threshold; call once, before threads start.
///
/// glibc raises its mmap threshold each time a mapped block is freed (up to 32 MiB), after
/// which multi-megabyte buffers — upload parts, duplicate detection's sorted runs — are
/// carved from the arena and their memory stays resident after they are freed. A fixed
/// threshold keeps them out (measured on a 100,000-line batch with 5 MB upload parts: peak
/// RSS 56 → 40 MB). Not lower than 2 MiB: the finalizer's half-megabyte chunks would then
/// each be mapped and faulted in afresh, which tripled its CPU time. One arena rather than
/// two: the free space each arena keeps grows with the length of a run, and with two a
/// 1,000,000-line batch peaked 10–15 % above a 100,000-line one (30 against 27 MB); with
/// one, 2–5 %, at no measurable CPU cost (most small blocks come from the per-thread
/// caches without taking the arena's lock).
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD);
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
