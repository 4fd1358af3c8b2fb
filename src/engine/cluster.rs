//! This node's place among the nodes sharing the store: a heartbeat every second (with the
//! live state only this node knows, and its stakes in each upstream), lease and claim
//! renewal every tenth of `lease_ttl` (at least a second).
//!
//! Renewal returns the units the node still holds; the feeder of any other unit it thinks it
//! holds is stopped at once (another node took the unit over after this node's lease
//! lapsed), and calls for it not yet sent are dropped (`leases`). A renewal that fails is
//! tried again at the next beat, so a database outage loses no lease unless it lasts about
//! `lease_ttl` (at least 9/10 of it, less a second or two). When
//! renewal keeps failing for a whole `lease_ttl`, the leases must be presumed lost, so every
//! feeder stops until renewal works again.
//!
//! Each beat also reads the store's clock, the cluster's one clock (see [`crate::clock`]),
//! and, being a write, tells whether the database takes writes: `batchd_store_writable` is
//! true to the last attempt on an idle node too (the writer's commits, which also hold the
//! engine's health gate, tell it as well).
//!
//! Upstream limits are cluster-wide totals. `max_concurrency` is split by demand (see
//! `shares`): each beat publishes this node's demand and claim and takes its grant; a node
//! whose claim no longer fits its demand beats early (every [`EARLY`] at most). `rpm` and
//! `tpm` are split evenly between the live nodes (`Limiter::set_rate_share`). The first beat
//! happens before the node leases anything, and a node sends nothing before it.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use super::{shares, Inner};
use crate::store::UnitKey;

const BEAT: Duration = Duration::from_secs(1);
/// Leases are renewed every `lease_ttl / RENEWALS` (at least a beat apart).
const RENEWALS: u32 = 10;
/// The soonest a beat follows the one before when this node's claims no longer fit its demand.
const EARLY: Duration = Duration::from_millis(250);
/// How often the heartbeat task looks whether an early beat is due.
const TICK: Duration = Duration::from_millis(50);
/// The longest a heartbeat or a renewal may take before it counts as failed (a hanging
/// database must not hold up the next attempt).
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// Joins the cluster before this node leases anything: the first heartbeat tells the live
/// nodes and this node's claims on upstream slots (until it, the node sends nothing). A
/// store this process owns (`exclusive`) has no other live node: the rows of a crashed
/// predecessor are removed at once, or their claims would hold slots until their heartbeat
/// lapsed.
pub async fn join(inner: &Inner, exclusive: bool) {
    let ttl = inner.cfg.engine.lease_ttl;
    if !exclusive {
        for p in inner.router.pools() {
            p.limiter.claim_until(Some(Instant::now()));
        }
    }
    let nodes = beat(inner, ttl).await;
    if exclusive {
        for n in nodes.iter().filter(|n| n.id != inner.node) {
            if let Err(e) = inner.store.leave(&n.id).await {
                tracing::warn!(node = %n.id, error = %crate::Chain(&e), "could not remove a previous process's node row");
            }
        }
        beat(inner, ttl).await;
    }
}

pub async fn heartbeat(inner: Arc<Inner>) {
    let ttl = inner.cfg.engine.lease_ttl;
    let every = (ttl / RENEWALS).max(BEAT);
    let (mut last_beat, mut next_renewal, mut renewed_ok) = (Instant::now(), Instant::now() + every, Instant::now());
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = inner.soft_stop.cancelled() => return,
        }
        let since = last_beat.elapsed();
        if since < BEAT && (since < EARLY || !inner.stakes.misfit(inner.router.pools())) {
            continue;
        }
        last_beat = Instant::now();
        beat(&inner, ttl).await;
        if Instant::now() < next_renewal {
            continue;
        }
        match renew(&inner, ttl).await {
            Ok(asked) => {
                (renewed_ok, next_renewal) = (asked, asked + every);
            }
            Err(e) => {
                next_renewal = Instant::now() + BEAT;
                tracing::warn!(error = %e, "lease renewal failed; trying again in a second");
                if renewed_ok.elapsed() >= ttl {
                    tracing::error!("leases could not be renewed for a whole lease_ttl; stopping every feeder (other nodes may take the units)");
                    let all: Vec<UnitKey> = inner.held.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect();
                    stop_lost(&inner, all.iter());
                }
            }
        }
    }
}

/// Renews every lease and claim of this node; stops the feeders of the units it lost.
/// Returns when the renewal was asked.
async fn renew(inner: &Inner, ttl: Duration) -> Result<Instant, String> {
    // Units leased after this snapshot may be missing from the renewal's answer; only
    // those leased before it can be judged.
    let before: Vec<UnitKey> = inner.held.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect();
    let asked = Instant::now();
    let held = match tokio::time::timeout(CALL_TIMEOUT, inner.store.renew_leases(&inner.node, ttl)).await {
        Ok(Ok(held)) => held,
        Ok(Err(e)) => return Err(crate::Chain(&e).to_string()),
        Err(_) => return Err(format!("no answer from the database within {CALL_TIMEOUT:?}")),
    };
    inner.leases.renewed(asked, ttl, &held);
    let held: HashSet<UnitKey> = held.into_iter().collect();
    stop_lost(inner, before.iter().filter(|k| !held.contains(*k)));
    Ok(asked)
}

/// Publishes this node's live state and stakes, learns how many nodes are alive, takes
/// this node's grants of upstream slots, and re-divides `rpm` and `tpm` when the number of
/// live nodes changes.
pub async fn beat(inner: &Inner, ttl: Duration) -> Vec<crate::store::NodeInfo> {
    let batches: serde_json::Map<String, serde_json::Value> =
        inner.book.all_counts().into_iter().map(|(id, c)| (id.to_string(), json!({"in_flight": c.in_flight, "retrying": c.retrying}))).collect();
    let info = json!({"batches": batches, "store_writable": inner.health.is_writable()});
    let pools = inner.router.pools();
    let demands: Vec<usize> = pools.iter().map(|p| p.limiter.take_demand()).collect();
    let raises: Mutex<shares::Raises> = Mutex::default();
    let me = (inner.started_at, inner.node.as_str());
    let publish = |others: &[crate::store::NodeInfo]| {
        let (stakes, r) = inner.stakes.publish(pools, &demands, others, me);
        *raises.lock().unwrap_or_else(|p| p.into_inner()) = r;
        shares::with_stakes(info.clone(), stakes).to_string()
    };
    let asked = Instant::now();
    let before = crate::clock::host_ms();
    let answer = tokio::time::timeout(CALL_TIMEOUT, inner.store.heartbeat(&inner.node, inner.started_at, ttl, &publish)).await;
    match answer {
        Ok(Ok(crate::store::Membership { nodes, clock_ms })) => {
            crate::clock::observe(clock_ms, before, crate::clock::host_ms());
            inner.beat_writes.store(true, Ordering::Relaxed);
            // The raises were published: they may be used now, until the heartbeat lapses.
            let until = (!inner.exclusive).then_some(asked + ttl);
            for (p, slots) in raises.into_inner().unwrap_or_else(|p| p.into_inner()) {
                p.limiter.set_claim(slots);
            }
            let n = nodes.len().max(1);
            inner.live.set_nodes(nodes.clone());
            for p in pools {
                p.limiter.claim_until(until);
                p.limiter.set_rate_share(n);
            }
            if inner.live_nodes.swap(n, Ordering::Relaxed) != n {
                tracing::info!(live_nodes = n, "the live nodes changed; upstream limits re-divided");
            }
            nodes
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %crate::Chain(&e), "heartbeat failed");
            if e.is_transient() {
                // The heartbeat is a write: an idle node knows the database is out too.
                inner.beat_writes.store(false, Ordering::Relaxed);
            }
            Vec::new()
        }
        Err(_) => {
            tracing::debug!("heartbeat timed out");
            inner.beat_writes.store(false, Ordering::Relaxed);
            Vec::new()
        }
    }
}

/// Stops the feeders of units this node no longer holds.
fn stop_lost<'a>(inner: &Inner, lost: impl Iterator<Item = &'a UnitKey>) {
    let map = inner.held.lock().unwrap_or_else(|p| p.into_inner());
    for key in lost {
        if let Some(token) = map.get(key).filter(|t| !t.is_cancelled()) {
            tracing::warn!(batch = %key.batch_id, unit = key.idx, "the lease on this unit was lost; stopping its feeder");
            token.cancel();
        }
    }
}
