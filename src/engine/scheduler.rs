//! Shares of the upstream capacity between the batches running on this node: by priority,
//! and by deadline slack.
//!
//! Batches share a pool through its FIFO queue: a batch's share of the pool is the number of
//! its lines waiting there (its *turns*) over everyone's. Every half second the scheduler
//! sets each batch's turns from [`plan`]:
//!
//! 1. a batch's *need* is the rate that finishes its remaining lines before its deadline
//!    (with a margin), as a share of the pool's recent throughput;
//! 2. when all needs fit, each batch gets its need and the rest is split by priority — a
//!    batch with no deadline pressure behaves exactly as with priority alone;
//! 3. when they do not fit, needs are served earliest deadline first, weighted by priority,
//!    after a floor that every batch keeps ([`FLOOR`] of the capacity split by priority), so
//!    a long batch never starves.
//!
//! The total number of turns is `4 × Σ priority` (at least [`MIN_TURNS`]): enough for a fine
//! split, and each is only a line waiting for a slot, so it costs next to nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use super::progress::ProgressBook;
use crate::store::BatchId;

/// Share of the capacity every running batch keeps, split by priority.
pub const FLOOR: f64 = 0.1;
/// A batch aims to finish by this fraction of its remaining window.
const MARGIN: f64 = 0.8;
/// Rates are measured over this long: long enough to smooth, short enough that a change of
/// shares shows within a few rounds.
const RATE_WINDOW: Duration = Duration::from_secs(5);
const TURNS_PER_PRIORITY: usize = 4;
const MIN_TURNS: usize = 16;
/// Most turns one batch takes.
const MAX_TURNS: usize = 64;
const PERIOD: Duration = Duration::from_millis(500);

/// What the scheduler knows of one running batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Demand {
    pub priority: u32,
    /// Seconds left before the batch expires (`None`: no deadline).
    pub seconds_left: Option<f64>,
    pub remaining: u64,
    /// Durable results per second recently.
    pub rate: f64,
}

/// Turns for `demands`, in order (see the module doc).
pub fn plan(demands: &[Demand]) -> Vec<usize> {
    let total_prio: f64 = demands.iter().map(|d| d.priority.max(1) as f64).sum();
    let turns = (TURNS_PER_PRIORITY as f64 * total_prio).max(MIN_TURNS as f64).max(demands.len() as f64);
    let capacity: f64 = demands.iter().map(|d| d.rate).sum();
    let prio_share = |d: &Demand| d.priority.max(1) as f64 / total_prio;
    if capacity <= 0.0 {
        return apportion(&demands.iter().map(prio_share).collect::<Vec<_>>(), turns as usize);
    }
    let needs: Vec<f64> = demands.iter().map(|d| need(d) / capacity).collect();
    let sum_needs: f64 = needs.iter().sum();
    let shares: Vec<f64> = if sum_needs <= 1.0 {
        demands.iter().zip(&needs).map(|(d, n)| n + (1.0 - sum_needs) * prio_share(d)).collect()
    } else {
        earliest_deadline_first(demands, &needs, prio_share)
    };
    apportion(&shares, turns as usize)
}

/// The rate that finishes `d` within its margin; 0 without a deadline.
fn need(d: &Demand) -> f64 {
    match d.seconds_left {
        None => 0.0,
        Some(left) => d.remaining as f64 / (left * MARGIN - 1.0).max(1.0),
    }
}

/// Overload: every batch keeps its floor; the rest goes to needs in deadline order, a
/// batch at a time (priority breaks ties), until it runs out.
fn earliest_deadline_first(demands: &[Demand], needs: &[f64], prio_share: impl Fn(&Demand) -> f64) -> Vec<f64> {
    let mut shares: Vec<f64> = demands.iter().map(|d| FLOOR * prio_share(d)).collect();
    let mut left = 1.0 - FLOOR;
    let mut order: Vec<usize> = (0..demands.len()).collect();
    order.sort_by(|&a, &b| {
        let deadline = |i: usize| demands[i].seconds_left.unwrap_or(f64::INFINITY);
        deadline(a).total_cmp(&deadline(b)).then(demands[b].priority.cmp(&demands[a].priority))
    });
    for i in order {
        let give = (needs[i] - shares[i]).clamp(0.0, left);
        shares[i] += give;
        left -= give;
    }
    if left > 0.0 {
        let total: f64 = demands.iter().map(&prio_share).sum();
        for (s, d) in shares.iter_mut().zip(demands) {
            *s += left * prio_share(d) / total;
        }
    }
    shares
}

/// Splits `total` turns by `shares` (largest remainder), every batch at least one (taken
/// from the largest), none above [`MAX_TURNS`].
fn apportion(shares: &[f64], total: usize) -> Vec<usize> {
    let sum: f64 = shares.iter().sum::<f64>().max(f64::MIN_POSITIVE);
    let exact: Vec<f64> = shares.iter().map(|s| s / sum * total as f64).collect();
    let mut out: Vec<usize> = exact.iter().map(|x| x.floor() as usize).collect();
    let mut order: Vec<usize> = (0..exact.len()).collect();
    order.sort_by(|&a, &b| (exact[b] - exact[b].floor()).total_cmp(&(exact[a] - exact[a].floor())));
    for &i in order.iter().take(total.saturating_sub(out.iter().sum())) {
        out[i] += 1;
    }
    while let Some(i) = out.iter().position(|n| *n == 0) {
        out[i] = 1;
        let largest = (0..out.len()).max_by_key(|&j| out[j]).unwrap_or(i);
        if out[largest] > 1 {
            out[largest] -= 1;
        }
    }
    out.into_iter().map(|n| n.min(MAX_TURNS)).collect()
}

/// A batch's entry: what it demands and where its turns are published.
struct Entry {
    priority: u32,
    expires_at: Option<i64>,
    total_remaining: u64,
    committed_at_join: u64,
    target: watch::Sender<usize>,
}

/// The batches running on this node and their turns.
#[derive(Clone, Default)]
pub struct Scheduler {
    batches: Arc<Mutex<HashMap<BatchId, Entry>>>,
}

impl Scheduler {
    /// Registers a run of a batch with `remaining` lines; the receiver tells its turns. The
    /// entry goes when the returned guard drops.
    pub fn join(
        &self,
        batch: &BatchId,
        priority: i64,
        expires_at: Option<i64>,
        remaining: u64,
        progress: &ProgressBook,
    ) -> (watch::Receiver<usize>, Membership) {
        let priority = priority.clamp(1, 8) as u32;
        let (tx, rx) = watch::channel(TURNS_PER_PRIORITY * priority as usize);
        let entry = Entry { priority, expires_at, total_remaining: remaining, committed_at_join: progress.committed(batch), target: tx };
        self.batches.lock().unwrap_or_else(|p| p.into_inner()).insert(batch.clone(), entry);
        (rx, Membership { scheduler: self.clone(), batch: batch.clone() })
    }

    /// Recomputes every batch's turns from its progress.
    pub fn rebalance(&self, progress: &ProgressBook, now: i64) {
        let all = self.batches.lock().unwrap_or_else(|p| p.into_inner());
        let ids: Vec<&BatchId> = all.keys().collect();
        let demands: Vec<Demand> = ids
            .iter()
            .map(|id| {
                let e = &all[*id];
                let done = progress.committed(id).saturating_sub(e.committed_at_join);
                Demand {
                    priority: e.priority,
                    seconds_left: e.expires_at.map(|t| (t - now) as f64),
                    remaining: e.total_remaining.saturating_sub(done),
                    rate: progress.rate_within(id, RATE_WINDOW),
                }
            })
            .collect();
        for (id, n) in ids.iter().zip(plan(&demands)) {
            all[*id].target.send_if_modified(|t| std::mem::replace(t, n) != n);
        }
    }
}

/// Keeps a batch registered with the scheduler while it runs.
pub struct Membership {
    scheduler: Scheduler,
    batch: BatchId,
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.scheduler.batches.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.batch);
    }
}

pub async fn run(inner: Arc<super::Inner>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(PERIOD) => {}
            _ = inner.soft_stop.cancelled() => return,
        }
        inner.scheduler.rebalance(&inner.progress, crate::now_unix());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(priority: u32, seconds_left: Option<f64>, remaining: u64, rate: f64) -> Demand {
        Demand { priority, seconds_left, remaining, rate }
    }

    #[test]
    fn without_deadline_pressure_shares_follow_priority() {
        assert_eq!(plan(&[d(1, None, 1000, 10.0)]), [16]);
        assert_eq!(plan(&[d(1, None, 1000, 10.0), d(4, None, 1000, 30.0)]), [4, 16]);
        let day = Some(86_400.0);
        assert_eq!(plan(&[d(1, day, 1000, 20.0), d(1, day, 50_000, 20.0)]), [8, 8], "a day is plenty for both");
    }

    #[test]
    fn an_urgent_batch_gets_what_it_needs_and_the_long_one_keeps_the_rest() {
        // Pool: 40 lines/s. The short batch needs 300 lines in 12 s: 300 / (12 × 0.8 − 1) ≈ 34.9/s.
        let plan = plan(&[d(1, Some(86_400.0), 2000, 20.0), d(1, Some(12.0), 300, 20.0)]);
        assert_eq!(plan.iter().sum::<usize>(), 16);
        assert_eq!(plan, [1, 15], "what the urgent batch needs (87 %) plus half the rest");
    }

    #[test]
    fn overload_serves_the_earliest_deadline_first_but_never_starves() {
        // Both need more than the whole pool; the one due first gets all but the floor.
        let demands = [d(1, Some(3_600.0), 400_000, 50.0), d(1, Some(60.0), 10_000, 50.0), d(2, None, 1_000, 0.0)];
        let p = plan(&demands);
        assert!(p[1] > p[0], "earlier deadline first: {p:?}");
        assert!(p.iter().all(|n| *n >= 1), "every batch keeps a turn: {p:?}");
        assert!(p[0] >= 1 && p[2] >= 1 && p[1] >= 12, "{p:?}");
        assert_eq!(p.iter().sum::<usize>(), 16);
    }

    #[test]
    fn apportionment_keeps_the_total_and_a_turn_each() {
        assert_eq!(apportion(&[0.2, 0.8], 10), [2, 8]);
        assert_eq!(apportion(&[0.001, 0.999], 4), [1, 3]);
        assert_eq!(apportion(&[1.0, 1.0, 1.0], 2), [1, 1, 1], "more batches than turns: one each");
        assert_eq!(apportion(&[1.0], 100), [MAX_TURNS]);
    }

    #[test]
    fn before_any_rate_is_known_priority_decides() {
        assert_eq!(plan(&[d(3, Some(10.0), 100, 0.0), d(1, None, 100, 0.0)]), [12, 4]);
    }
}
