//! How long this node knows each of its unit leases holds, on its own monotonic clock: a
//! lease asked for (or renewed) at instant `t` holds at least until `t + lease_ttl`, since
//! the store's expiry is counted from a moment after `t`. No other node can lease the unit
//! before then.
//!
//! A call for a leased line is sent only while its lease is known to hold ([`Leases::hold`]).
//! Past that moment (a node resuming after SIGSTOP, or one whose renewals failed for a
//! whole `lease_ttl`), the call waits for the next renewal, which tells whether the unit is
//! still this node's: if not, the call is dropped before it is sent (another node sends the
//! line), rather than made twice and fenced at the commit.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::store::UnitKey;

/// The leases this node holds, each with when it was leased and until when it holds.
pub struct Leases {
    map: Mutex<HashMap<UnitKey, Lease>>,
    /// Bumped after every renewal's answer is applied.
    renewals: watch::Sender<u64>,
}

#[derive(Debug, Clone, Copy)]
struct Lease {
    leased_at: Instant,
    until: Instant,
}

impl Default for Leases {
    fn default() -> Self {
        Leases { map: Mutex::default(), renewals: watch::channel(0).0 }
    }
}

impl Leases {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<UnitKey, Lease>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A unit leased by a call made at `asked`.
    pub fn leased(&self, key: UnitKey, asked: Instant, ttl: Duration) {
        self.map().insert(key, Lease { leased_at: asked, until: asked + ttl });
    }

    /// A renewal asked at `asked` answered that this node holds `held`: those hold until
    /// `asked + ttl`; the others leased before `asked` are gone (lost, or their unit ended).
    pub fn renewed(&self, asked: Instant, ttl: Duration, held: &[UnitKey]) {
        let held: HashSet<&UnitKey> = held.iter().collect();
        self.map().retain(|k, l| {
            if held.contains(k) {
                l.until = l.until.max(asked + ttl);
                true
            } else {
                l.leased_at >= asked
            }
        });
        self.renewals.send_modify(|n| *n += 1);
    }

    /// Whether `key`'s lease holds now; when this node cannot tell (its lease ran out on its
    /// clock), waits for the next renewal's answer. `false`: the lease is gone, or `stop`
    /// fired first.
    pub async fn hold(&self, key: &UnitKey, stop: &CancellationToken) -> bool {
        let mut renewals = self.renewals.subscribe();
        loop {
            match self.map().get(key) {
                None => return false,
                Some(l) if l.until > Instant::now() => return true,
                Some(l) => {
                    tracing::debug!(batch = %key.batch_id, unit = key.idx, lapsed_ms = l.until.elapsed().as_millis() as u64, "a lease ran out on this node's clock; the call waits for a renewal")
                }
            }
            tokio::select! {
                r = renewals.changed() => if r.is_err() { return false },
                _ = stop.cancelled() => return false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(idx: i64) -> UnitKey {
        UnitKey { batch_id: "batch_l".into(), idx }
    }

    #[tokio::test]
    async fn a_lapsed_lease_waits_for_the_renewal_that_tells() {
        let l = std::sync::Arc::new(Leases::default());
        let ttl = Duration::from_millis(50);
        let stop = CancellationToken::new();
        l.leased(key(1), Instant::now(), ttl);
        l.leased(key(2), Instant::now(), ttl);
        assert!(l.hold(&key(1), &stop).await, "a fresh lease holds");
        assert!(!l.hold(&key(3), &stop).await, "a unit never leased is not held");
        tokio::time::sleep(ttl).await;
        let (a, b) = (l.clone(), l.clone());
        let (s1, s2) = (stop.clone(), stop.clone());
        let kept = tokio::spawn(async move { a.hold(&key(1), &s1).await });
        let lost = tokio::spawn(async move { b.hold(&key(2), &s2).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!kept.is_finished() && !lost.is_finished(), "a lapsed lease waits");
        l.renewed(Instant::now(), ttl, &[key(1)]);
        assert!(kept.await.unwrap(), "the renewal kept unit 1");
        assert!(!lost.await.unwrap(), "unit 2 was taken over: its call is dropped");
    }

    #[tokio::test]
    async fn a_unit_leased_during_a_renewal_is_kept() {
        let l = Leases::default();
        let asked = Instant::now();
        l.leased(key(1), Instant::now(), Duration::from_secs(30));
        l.renewed(asked, Duration::from_secs(30), &[]);
        assert!(l.hold(&key(1), &CancellationToken::new()).await, "leased after the renewal was asked: not judged by it");
    }
}
