//! Upstream slots that follow demand: how the nodes of a cluster split each upstream's
//! `max_concurrency` between them.
//!
//! Every heartbeat publishes, per upstream, this node's *demand* (the most slots it could
//! have used since its last beat: slots taken plus lines waiting for one) and its *claim*
//! (the most calls it may have in flight). Each beat computes every node's target from the
//! published demands ([`targets`]: demand-first water-filling, the rest split evenly) and
//! this node's grant: its target, but never more than what the others' claims leave free
//! ([`grant`]). Heartbeats take turns in the store (`Cluster::heartbeat`), so the claims
//! in the store never add up to more than the limit:
//! - a node lowers at once (before its heartbeat commits) and publishes the slots it still
//!   has taken when that is more, so the others raise only into slots really free;
//! - a node raises only after the heartbeat that published the raise has committed;
//! - a node's claim lapses with its heartbeat row (`lease_ttl`): others may take its slots
//!   then, and the node itself sends nothing past that moment until a heartbeat renews it
//!   (`Limiter::set_claim`'s `until`), which matters after a SIGSTOP.
//!
//! A node with nothing to send thus gives its slots to the nodes that have lines, and takes
//! them back (they lower at their next beat) when it has lines again. A node whose claim
//! does not fit its demand beats early ([`Stakes::misfit`]), so that handovers take a beat
//! of the others rather than two. A node that publishes no stakes (an older version) is
//! counted at the even share it takes.

use std::collections::HashMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::store::NodeInfo;
use crate::upstream::Pool;

/// One node's stake in one upstream, as published with its heartbeat.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stake {
    /// The most calls the node may have in flight.
    pub claim: usize,
    /// The slots the node could use.
    pub demand: usize,
}

/// Every node's target share of `limit` slots, for the nodes' `demands` (in an order every
/// node agrees on): each node gets what it demands, up to an equal level that uses the
/// whole limit (a node demanding less leaves the rest to the others); slots nobody demands
/// are split evenly, so a node whose demand grows has some at once.
pub fn targets(limit: usize, demands: &[usize]) -> Vec<usize> {
    let n = demands.len();
    let mut alloc = vec![0; n];
    let mut left = limit;
    let mut open: Vec<usize> = (0..n).filter(|&i| demands[i] > 0).collect();
    while left > 0 && !open.is_empty() {
        let level = left / open.len();
        if level == 0 {
            for &i in open.iter().take(left) {
                alloc[i] += 1;
            }
            left = left.saturating_sub(open.len());
            break;
        }
        for &i in &open {
            let give = level.min(demands[i] - alloc[i]);
            alloc[i] += give;
            left -= give;
        }
        open.retain(|&i| alloc[i] < demands[i]);
    }
    for (i, a) in alloc.iter_mut().enumerate() {
        *a += left / n.max(1) + usize::from(i < left % n.max(1));
    }
    alloc
}

/// What node `me` of `stakes` may claim of `limit`: its target, within what the other
/// nodes' claims leave free.
pub fn grant(limit: usize, me: usize, stakes: &[Stake]) -> usize {
    let demands: Vec<usize> = stakes.iter().map(|s| s.demand).collect();
    let others: usize = stakes.iter().enumerate().filter(|(i, _)| *i != me).map(|(_, s)| s.claim).sum();
    targets(limit, &demands)[me].min(limit.saturating_sub(others))
}

/// What this node published last, and the target it could not reach yet, per upstream.
#[derive(Debug, Clone, Copy, Default)]
struct Published {
    stake: Stake,
    target: usize,
}

/// This node's stakes as last published, per upstream name.
#[derive(Default)]
pub struct Stakes {
    last: Mutex<HashMap<String, Published>>,
}

/// The raises a heartbeat may apply once it has committed.
pub type Raises = Vec<(std::sync::Arc<Pool>, usize)>;

/// The heartbeat info's key for the stakes.
const KEY: &str = "upstreams";

impl Stakes {
    /// This node's stakes in every pool, given the other live nodes (`others`, in the
    /// store's order) and this node's place among them (`started_at`, `node`): lowers claims
    /// at once, and returns the stakes to publish and the raises to apply after the commit.
    pub fn publish(&self, pools: &[std::sync::Arc<Pool>], demands: &[usize], others: &[NodeInfo], me: (i64, &str)) -> (serde_json::Value, Raises) {
        let theirs: Vec<serde_json::Value> = others.iter().map(|n| serde_json::from_str(&n.info).unwrap_or_default()).collect();
        let me_at = others.iter().filter(|n| (n.started_at, n.id.as_str()) < me).count();
        let nodes = others.len() + 1;
        let (mut out, mut raises) = (serde_json::Map::new(), Vec::new());
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        for (pool, &demand) in pools.iter().zip(demands) {
            let limit = pool.limiter.cluster_limit();
            let mut stakes: Vec<Stake> = theirs.iter().enumerate().map(|(rank, v)| stake_of(v, &pool.cfg.name, limit, nodes, rank)).collect();
            let current = pool.limiter.limit();
            stakes.insert(me_at, Stake { claim: current, demand });
            let target = targets(limit, &stakes.iter().map(|s| s.demand).collect::<Vec<_>>())[me_at];
            let granted = grant(limit, me_at, &stakes);
            let claim = if granted <= current {
                pool.limiter.set_claim(granted)
            } else {
                raises.push((pool.clone(), granted));
                granted
            };
            let stake = Stake { claim, demand };
            tracing::debug!(upstream = %pool.cfg.name, claim, demand, target, granted, held = pool.limiter.held(), stakes = ?stakes, "upstream slots claimed");
            last.insert(pool.cfg.name.clone(), Published { stake, target });
            out.insert(pool.cfg.name.clone(), serde_json::to_value(stake).unwrap_or_default());
        }
        (serde_json::Value::Object(out), raises)
    }

    /// Whether some pool's claim no longer fits this node's demand, so that a heartbeat
    /// before the usual one helps: slots taken beyond a lowered claim came back (the others
    /// may raise once this is published), lines wait while a raise is pending or while the
    /// published demand no longer tells it, or the node went idle with a demand published.
    pub fn misfit(&self, pools: &[std::sync::Arc<Pool>]) -> bool {
        let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        pools.iter().any(|pool| {
            let Some(p) = last.get(&pool.cfg.name) else { return false };
            let l = &pool.limiter;
            let (claim, held, waiting) = (l.limit(), l.held(), l.waiting());
            let returned = p.stake.claim > claim.max(held);
            let starved = waiting > 0 && claim < l.cluster_limit() && (p.target > claim || p.stake.demand <= claim);
            let idle = p.stake.demand > 0 && held + waiting == 0;
            returned || starved || idle
        })
    }
}

/// What a node published for `pool`, or (an older node that publishes none) the even share
/// it takes as number `rank` of `nodes`.
fn stake_of(info: &serde_json::Value, pool: &str, limit: usize, nodes: usize, rank: usize) -> Stake {
    match info.get(KEY).and_then(|u| u.get(pool)) {
        Some(v) => serde_json::from_value(v.clone()).unwrap_or_default(),
        None => {
            let even = limit / nodes + usize::from(rank < limit % nodes);
            Stake { claim: even, demand: even }
        }
    }
}

/// Adds this node's stakes to its heartbeat info.
pub fn with_stakes(mut info: serde_json::Value, stakes: serde_json::Value) -> serde_json::Value {
    if let Some(o) = info.as_object_mut() {
        o.insert(KEY.to_string(), stakes);
    }
    info
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(claim: usize, demand: usize) -> Stake {
        Stake { claim, demand }
    }

    #[test]
    fn targets_fill_demand_first_and_split_the_rest_evenly() {
        assert_eq!(targets(24, &[40, 0, 0]), [24, 0, 0], "one node with lines takes every slot");
        assert_eq!(targets(24, &[40, 40, 40]), [8, 8, 8]);
        assert_eq!(targets(24, &[3, 40, 40]), [3, 11, 10], "a node near its end leaves the rest to the others");
        assert_eq!(targets(24, &[0, 0, 0]), [8, 8, 8], "an idle cluster splits evenly");
        assert_eq!(targets(24, &[6, 0, 0]), [12, 6, 6], "slots nobody demands are split evenly");
        assert_eq!(targets(2, &[5, 5, 5]), [1, 1, 0], "never more than the limit");
        for d in [[1usize, 2, 3], [0, 50, 1], [24, 24, 0], [7, 0, 9]] {
            assert_eq!(targets(24, &d).iter().sum::<usize>(), 24, "{d:?}: the targets use the limit exactly");
        }
    }

    #[test]
    fn a_node_raises_only_into_slots_the_others_gave_up() {
        // Node 0 now has lines; nodes 1 and 2 (idle) still claim their even shares.
        let stakes = [st(8, 40), st(8, 0), st(8, 0)];
        assert_eq!(grant(24, 0, &stakes), 8, "the others have not lowered yet");
        assert_eq!(grant(24, 1, &stakes), 0, "an idle node lowers to nothing");
        let stakes = [st(8, 40), st(0, 0), st(8, 0)];
        assert_eq!(grant(24, 0, &stakes), 16, "it takes what one gave up");
        let stakes = [st(8, 40), st(0, 0), st(0, 0)];
        assert_eq!(grant(24, 0, &stakes), 24);
        // Node 1 has lines again: node 0 lowers first, then node 1 raises.
        let stakes = [st(24, 40), st(0, 40), st(0, 0)];
        assert_eq!(grant(24, 1, &stakes), 0);
        assert_eq!(grant(24, 0, &stakes), 12);
        let stakes = [st(12, 40), st(0, 40), st(0, 0)];
        assert_eq!(grant(24, 1, &stakes), 12);
    }

    #[test]
    fn claims_taken_in_turns_never_pass_the_limit() {
        // Random demands, nodes beating in random order, each with its grant: the sum of the
        // claims stays within the limit at every step.
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(21);
        let limit = 24;
        let mut stakes = vec![st(8, 0), st(8, 0), st(8, 0)];
        for _ in 0..10_000 {
            let me = rng.gen_range(0..3);
            stakes[me].demand = rng.gen_range(0..40);
            stakes[me].claim = grant(limit, me, &stakes);
            assert!(stakes.iter().map(|s| s.claim).sum::<usize>() <= limit, "{stakes:?}");
        }
    }

    #[test]
    fn an_older_node_counts_at_its_even_share() {
        let v: serde_json::Value = serde_json::json!({"batches": {}});
        assert_eq!(stake_of(&v, "mock", 24, 3, 0), st(8, 8));
        assert_eq!(stake_of(&v, "mock", 10, 3, 0), st(4, 4), "10 = 4 + 3 + 3, as old nodes split it");
        let v = serde_json::json!({KEY: {"mock": {"claim": 5, "demand": 9}}});
        assert_eq!(stake_of(&v, "mock", 24, 3, 0), st(5, 9));
    }
}
