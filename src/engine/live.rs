//! What the engine tells about itself while it runs: metrics (answered from memory, the
//! store's figures as last read), a tick each time this node
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
use crate::store::{BatchId, BatchStatus, NodeInfo};

pub struct Live {
    pub metrics: Metrics,
    outbox: watch::Sender<u64>,
    /// The live nodes as of the last heartbeat (this node included).
    nodes: Mutex<Vec<NodeInfo>>,
    /// Cancelled when the HTTP server starts to shut down: event streams end then.
    pub streams_stop: CancellationToken,
    /// What `/metrics` shows of the store, kept in memory so that a scrape never waits on it.
    view: Mutex<StoreView>,
}

/// The store's figures as last read: the working batches by status (the supervisor's look,
/// every second), the lines pending (read in the background when a scrape finds them older
/// than [`VIEW_AGE`]).
#[derive(Default)]
struct StoreView {
    by_status: Vec<(&'static str, i64)>,
    lines_pending: i64,
    pending_read_at: Option<std::time::Instant>,
    reading: bool,
}

const VIEW_AGE: std::time::Duration = std::time::Duration::from_secs(1);
const WORKING: [BatchStatus; 4] = [BatchStatus::Validating, BatchStatus::InProgress, BatchStatus::Finalizing, BatchStatus::Cancelling];

impl Default for Live {
    fn default() -> Self {
        Live {
            metrics: Metrics::default(),
            outbox: watch::Sender::new(0),
            nodes: Mutex::default(),
            streams_stop: CancellationToken::new(),
            view: Mutex::default(),
        }
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

    /// The working batches as the supervisor just read them.
    pub fn set_working(&self, batches: &[(BatchId, BatchStatus)]) {
        let by_status = WORKING.iter().map(|w| (w.as_str(), batches.iter().filter(|(_, st)| st == w).count() as i64)).collect();
        self.view.lock().unwrap_or_else(|p| p.into_inner()).by_status = by_status;
    }

    /// Whether the lines pending are due for a read (and marks one as started).
    fn pending_due(&self) -> bool {
        let mut v = self.view.lock().unwrap_or_else(|p| p.into_inner());
        let due = !v.reading && v.pending_read_at.is_none_or(|t| t.elapsed() >= VIEW_AGE);
        v.reading |= due;
        due
    }

    fn set_pending(&self, lines: Option<i64>) {
        let mut v = self.view.lock().unwrap_or_else(|p| p.into_inner());
        v.reading = false;
        v.pending_read_at = Some(std::time::Instant::now());
        if let Some(n) = lines {
            v.lines_pending = n;
        }
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

    /// Prometheus text of everything `/metrics` shows, from memory: the store's figures are
    /// the last read (see `StoreView`), so a scrape answers at once through a store outage.
    pub async fn metrics_text(&self) -> String {
        let inner = &self.inner;
        let s = &inner.stats;
        let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let mut scrape = Scrape {
            store_commits: self.store_commits(),
            results_committed: get(&s.results_committed),
            store_writable: self.store_writable() && inner.beat_writes.load(Ordering::Relaxed),
            retries_waiting: get(&s.retries_waiting),
            output_tokens: get(&s.output_tokens),
            batches_failed_by_engine: get(&s.batches_failed),
            upstreams: inner.router.states().iter().map(UpstreamGauges::from).collect(),
            ..Default::default()
        };
        if inner.live.pending_due() {
            let inner = inner.clone();
            tokio::spawn(async move {
                let read = tokio::time::timeout(std::time::Duration::from_secs(30), inner.store.queued(None)).await;
                inner.live.set_pending(read.ok().and_then(Result::ok).map(|q| q.requests));
            });
        }
        {
            let v = inner.live.view.lock().unwrap_or_else(|p| p.into_inner());
            scrape.batches_by_status.clone_from(&v.by_status);
            scrape.lines_pending = v.lines_pending;
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
