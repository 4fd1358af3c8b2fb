//! What the engine tells about itself while it runs: metrics, a tick each time this node
//! appends to the event outbox, the live nodes' published state, and the token that ends
//! long-lived HTTP streams at shutdown.
//!
//! The outbox tick only wakes readers early: they read the outbox itself (durable and the
//! same on every node), and poll it anyway, so events appended by other nodes arrive too.

use std::sync::atomic::Ordering;
use std::sync::Mutex;

use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{Engine, LineCounts};
use crate::metrics::{Metrics, Scrape, UpstreamGauges};
use crate::store::{BatchStatus, NodeInfo};

pub struct Live {
    pub metrics: Metrics,
    outbox: watch::Sender<u64>,
    /// The live nodes as of the last heartbeat (this node included).
    nodes: Mutex<Vec<NodeInfo>>,
    /// Cancelled when the HTTP server starts to shut down: event streams end then.
    pub streams_stop: CancellationToken,
}

impl Default for Live {
    fn default() -> Self {
        Live { metrics: Metrics::default(), outbox: watch::Sender::new(0), nodes: Mutex::default(), streams_stop: CancellationToken::new() }
    }
}

impl Live {
    /// The engine's live state, with a metric series for each of `router`'s upstreams.
    pub fn for_router(router: &crate::upstream::Router) -> Live {
        let live = Live::default();
        live.metrics.prime(router.pools().iter().map(|p| p.cfg.name.as_str()));
        live
    }

    /// This node appended to the outbox (or changed something that did).
    pub fn outbox_changed(&self) {
        self.outbox.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.outbox.subscribe()
    }

    pub fn set_nodes(&self, nodes: Vec<NodeInfo>) {
        *self.nodes.lock().unwrap_or_else(|p| p.into_inner()) = nodes;
    }
}

/// What a node publishes with its heartbeat (see `cluster::beat`).
#[derive(Deserialize, Default)]
struct Published {
    #[serde(default)]
    batches: std::collections::HashMap<String, LineCounts>,
    #[serde(default = "yes")]
    store_writable: bool,
}

fn yes() -> bool {
    true
}

/// `own` plus what the other nodes published for `batch_id`.
fn sum_counts(own: LineCounts, others: &[Published], batch_id: &str) -> LineCounts {
    others
        .iter()
        .filter_map(|p| p.batches.get(batch_id))
        .fold(own, |a, c| LineCounts { in_flight: a.in_flight + c.in_flight, retrying: a.retrying + c.retrying })
}

impl Engine {
    pub fn metrics(&self) -> &Metrics {
        &self.inner.live.metrics
    }

    /// Wakes outbox readers (the API calls it after a change it made).
    pub fn outbox_changed(&self) {
        self.inner.live.outbox_changed();
    }

    /// Ticks each time this node appends to the outbox.
    pub fn outbox_watch(&self) -> watch::Receiver<u64> {
        self.inner.live.outbox.subscribe()
    }

    /// Cancelled when long-lived HTTP streams must end (shutdown).
    pub fn streams_stop(&self) -> CancellationToken {
        self.inner.live.streams_stop.clone()
    }

    /// Lines of a batch in flight or waiting on a retry on every live node: this node's own
    /// counts now, the others' as of their last heartbeat.
    pub fn live_counts(&self, batch_id: &str) -> LineCounts {
        sum_counts(self.inner.book.counts(batch_id), &self.others(), batch_id)
    }

    /// Unix seconds (with a fraction) of this node's last commit of results of `batch_id`:
    /// finer than the outbox's progress events (whole seconds, at most one a second).
    pub fn last_result_at(&self, batch_id: &str) -> Option<f64> {
        let at = self.inner.progress.last(batch_id)?;
        Some(crate::now_unix_f64() - at.elapsed().as_secs_f64())
    }

    /// `r` with this node's own, finer, time of the last result.
    pub fn refine(&self, batch_id: &str, mut r: super::rates::Rates) -> super::rates::Rates {
        if let Some(local) = self.last_result_at(batch_id) {
            r.last_result_at = Some(r.last_result_at.map_or(local, |e| e.max(local)));
        }
        r
    }

    /// Whether the store takes writes, as this node and every other live node see it.
    pub fn cluster_store_writable(&self) -> bool {
        self.store_writable() && self.others().iter().all(|p| p.store_writable)
    }

    /// Whether other nodes are live: a batch's rates are then the cluster's, not this node's.
    pub fn has_peers(&self) -> bool {
        self.inner.live.nodes.lock().unwrap_or_else(|p| p.into_inner()).iter().any(|n| n.id != self.inner.node)
    }

    fn others(&self) -> Vec<Published> {
        let nodes = self.inner.live.nodes.lock().unwrap_or_else(|p| p.into_inner());
        nodes.iter().filter(|n| n.id != self.inner.node).map(|n| serde_json::from_str(&n.info).unwrap_or_default()).collect()
    }

    /// Prometheus text of everything `/metrics` shows.
    pub async fn metrics_text(&self) -> String {
        let inner = &self.inner;
        let s = &inner.stats;
        let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let mut scrape = Scrape {
            store_commits: self.store_commits(),
            results_committed: get(&s.results_committed),
            store_writable: self.store_writable(),
            retries_waiting: get(&s.retries_waiting),
            output_tokens: get(&s.output_tokens),
            batches_failed_by_engine: get(&s.batches_failed),
            upstreams: inner.router.states().iter().map(UpstreamGauges::from).collect(),
            ..Default::default()
        };
        let working = [BatchStatus::Validating, BatchStatus::InProgress, BatchStatus::Finalizing, BatchStatus::Cancelling];
        if let Ok(batches) = inner.store.batches_in(&working).await {
            scrape.batches_by_status = working.iter().map(|w| (w.as_str(), batches.iter().filter(|(_, st)| st == w).count() as i64)).collect();
        }
        if let Ok(q) = inner.store.queued(None).await {
            scrape.lines_pending = q.requests;
        }
        inner.live.metrics.render(&scrape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_nodes_counts_add_up_from_what_their_heartbeat_publishes() {
        // The shape `cluster::beat` publishes.
        let a: Published = serde_json::from_str(r#"{"batches": {"batch_x": {"in_flight": 3, "retrying": 2}}, "store_writable": false}"#).unwrap();
        let b: Published =
            serde_json::from_str(r#"{"batches": {"batch_x": {"in_flight": 1, "retrying": 0}, "batch_y": {"in_flight": 9, "retrying": 9}}}"#).unwrap();
        assert!(!a.store_writable && b.store_writable, "a node that says nothing is taken as writable");
        let own = LineCounts { in_flight: 4, retrying: 1 };
        assert_eq!(sum_counts(own, &[a, b], "batch_x"), LineCounts { in_flight: 8, retrying: 3 });
        let odd: Published = serde_json::from_str("not json").unwrap_or_default();
        assert_eq!(sum_counts(own, &[odd], "batch_x"), own, "an unreadable heartbeat adds nothing");
    }
}
