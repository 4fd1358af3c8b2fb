//! This node's place among the nodes sharing the store: a heartbeat every second (with the
//! live state only this node knows), lease and claim renewal every third of `lease_ttl`.
//!
//! Renewal returns the units the node still holds; the feeder of any other unit it thinks it
//! holds is stopped at once (another node took the unit over after this node's lease
//! lapsed). When renewal keeps failing for a whole `lease_ttl`, the leases must be presumed
//! lost, so every feeder stops until renewal works again.
//!
//! Each beat also reads the store's clock, the cluster's one clock (see [`crate::clock`]),
//! and, being a write, tells whether the database takes writes: `batchd_store_writable` is
//! true to the last attempt on an idle node too (the writer's commits, which also hold the
//! engine's health gate, tell it as well).
//!
//! Upstream limits are cluster-wide totals: each node takes its share of every upstream's
//! `max_concurrency`, `rpm` and `tpm` (`Limiter::set_share`), by the number of live nodes
//! and its rank among them (oldest first), re-divided as soon as a heartbeat sees a node join
//! or leave. The first beat happens before the node leases anything.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use super::Inner;
use crate::store::UnitKey;

const BEAT: Duration = Duration::from_secs(1);

/// Joins the cluster before this node leases anything: the first heartbeat tells the live
/// nodes and this node's share of upstream limits. When other nodes run, it waits until they
/// have seen it too (their next beat) and looks again, so that for no moment do the shares
/// add up to more than an upstream's limit. A store this process owns (`exclusive`) has no
/// other live node: the rows of a crashed predecessor are removed at once, or it would keep
/// half of every limit until their heartbeat lapsed.
pub async fn join(inner: &Inner, exclusive: bool) {
    let ttl = inner.cfg.engine.lease_ttl;
    let nodes = beat(inner, ttl).await;
    if exclusive {
        for n in nodes.iter().filter(|n| n.id != inner.node) {
            if let Err(e) = inner.store.leave(&n.id).await {
                tracing::warn!(node = %n.id, error = %crate::Chain(&e), "could not remove a previous process's node row");
            }
        }
        beat(inner, ttl).await;
    } else if inner.live_nodes.load(Ordering::Relaxed) > 1 {
        tokio::time::sleep(BEAT + BEAT / 4).await;
        beat(inner, ttl).await;
    }
}

pub async fn heartbeat(inner: Arc<Inner>) {
    let ttl = inner.cfg.engine.lease_ttl;
    let mut last_renewal = Instant::now();
    let mut renewed_ok = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(BEAT) => {}
            _ = inner.soft_stop.cancelled() => return,
        }
        beat(&inner, ttl).await;
        if last_renewal.elapsed() < ttl / 3 {
            continue;
        }
        last_renewal = Instant::now();
        // Units leased after this snapshot may be missing from the renewal's answer; only
        // those leased before it can be judged.
        let before: Vec<UnitKey> = inner.held.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect();
        match inner.store.renew_leases(&inner.node, ttl).await {
            Ok(held) => {
                renewed_ok = Instant::now();
                let held: HashSet<UnitKey> = held.into_iter().collect();
                stop_lost(&inner, before.iter().filter(|k| !held.contains(*k)));
            }
            Err(e) => {
                tracing::warn!(error = %crate::Chain(&e), "lease renewal failed");
                if renewed_ok.elapsed() >= ttl {
                    tracing::error!("leases could not be renewed for a whole lease_ttl; stopping every feeder (other nodes may take the units)");
                    stop_lost(&inner, before.iter());
                }
            }
        }
    }
}

/// Publishes this node's live state and learns how many nodes are alive (and this node's
/// place among them), re-dividing cluster-wide upstream limits when that changes.
pub async fn beat(inner: &Inner, ttl: Duration) -> Vec<crate::store::NodeInfo> {
    let batches: serde_json::Map<String, serde_json::Value> =
        inner.book.all_counts().into_iter().map(|(id, c)| (id.to_string(), json!({"in_flight": c.in_flight, "retrying": c.retrying}))).collect();
    let info = json!({"batches": batches, "store_writable": inner.health.is_writable()}).to_string();
    let before = crate::clock::host_ms();
    match inner.store.heartbeat(&inner.node, inner.started_at, ttl, &info).await {
        Ok(crate::store::Membership { nodes, clock_ms }) => {
            crate::clock::observe(clock_ms, before, crate::clock::host_ms());
            inner.beat_writes.store(true, Ordering::Relaxed);
            let n = nodes.len().max(1);
            // Nodes come oldest first, the same order on every node: the rank splits limits.
            let rank = nodes.iter().position(|x| x.id == inner.node).unwrap_or(0);
            inner.live.set_nodes(nodes.clone());
            let before = inner.live_nodes.swap(n, Ordering::Relaxed);
            let rank_before = inner.rank.swap(rank, Ordering::Relaxed);
            if before != n || rank_before != rank {
                tracing::info!(live_nodes = n, rank, "the live nodes changed; upstream limits re-divided");
                for p in inner.router.pools() {
                    p.limiter.set_share(n, rank);
                }
            }
            nodes
        }
        Err(e) => {
            tracing::debug!(error = %crate::Chain(&e), "heartbeat failed");
            if e.is_transient() {
                // The heartbeat is a write: an idle node knows the database is out too.
                inner.beat_writes.store(false, Ordering::Relaxed);
            }
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
