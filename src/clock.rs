//! The cluster's one clock: every time batchd stores, compares or shows (`created_at`,
//! `expires_at`, deadlines, `at_risk`, file expiry, pauses) is the store's clock, not the
//! host's, so that nodes whose clocks disagree still agree on when a batch expires (issue #21).
//!
//! The store judges leases, claims and heartbeats by its own clock already; each heartbeat
//! also reads that clock, and [`observe`] keeps the offset between it and this host's clock.
//! [`now_ms`] is the host's clock plus that offset. An embedded store's clock is the host's
//! (the offset stays 0). A reading moves the offset only when the offset in use does not fit
//! it (by more than half the round trip and [`SLACK_MS`]), so time does not jitter with each
//! heartbeat's latency.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::SystemTime;

/// Milliseconds the store's clock is ahead of this host's (negative: behind).
static OFFSET_MS: AtomicI64 = AtomicI64::new(0);
static SKEW_TOLD: AtomicBool = AtomicBool::new(false);
/// How far a reading may stray from the offset in use, beyond its round trip, before the
/// offset follows it.
const SLACK_MS: i64 = 100;
/// A host clock this far from the store's is told once in the log.
const TELL_SKEW_MS: i64 = 1_000;

/// This host's clock, in unix milliseconds.
pub fn host_ms() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis().min(i64::MAX as u128) as i64)
}

/// The cluster's time, in unix milliseconds.
pub fn now_ms() -> i64 {
    host_ms().saturating_add(OFFSET_MS.load(Ordering::Relaxed))
}

/// The offset in use (store clock minus host clock), in milliseconds.
pub fn offset_ms() -> i64 {
    OFFSET_MS.load(Ordering::Relaxed)
}

/// Takes a reading of the store's clock, `store_ms`, made between host times `before_ms`
/// and `after_ms`; returns the offset in use afterwards.
pub fn observe(store_ms: i64, before_ms: i64, after_ms: i64) -> i64 {
    let seen = store_ms - before_ms / 2 - after_ms / 2;
    let half_trip = (after_ms - before_ms).max(0) / 2;
    let current = OFFSET_MS.load(Ordering::Relaxed);
    let next = next_offset(current, seen, half_trip);
    if next != current {
        OFFSET_MS.store(next, Ordering::Relaxed);
        if next.abs() >= TELL_SKEW_MS && !SKEW_TOLD.swap(true, Ordering::Relaxed) {
            let side = if next > 0 { "behind" } else { "ahead of" };
            tracing::warn!(
                offset_ms = next,
                "this host's clock is {:.1} s {side} the database's; batchd keeps the database's time (expiry, deadlines, stored times)",
                next.abs() as f64 / 1000.0
            );
        }
    }
    next
}

/// The offset after a reading `seen` (± `half_trip`) when `current` is in use.
fn next_offset(current: i64, seen: i64, half_trip: i64) -> i64 {
    if (seen - current).abs() > half_trip + SLACK_MS {
        seen
    } else {
        current
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_offset_follows_a_reading_that_disagrees_and_ignores_jitter() {
        assert_eq!(next_offset(0, 180_000, 5), 180_000, "a clock 3 minutes off is followed at once");
        assert_eq!(next_offset(180_000, 180_040, 5), 180_000, "40 ms of jitter does not move it");
        assert_eq!(next_offset(180_000, 180_300, 250), 180_000, "a slow round trip says little");
        assert_eq!(next_offset(180_000, -90_000_000, 5), -90_000_000, "25 h the other way");
    }
}
