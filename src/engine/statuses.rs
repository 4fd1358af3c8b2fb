//! Batch status changes made anywhere in the cluster, applied to this node's runs at once.
//!
//! A cancel, an expiry or a failure is decided by one node; every other node working on the
//! batch must stop too, within the same second as the node that decided (issue #27), and
//! whatever `lease_ttl_s` is. The store pushes every committed status change to the nodes
//! that listen ([`crate::store::Cluster::status_feed`]: PostgreSQL's `LISTEN/NOTIFY`, one
//! connection per node, nothing sent while nothing changes), and [`apply`] signals this
//! node's run of the batch: a cancel as a cancel (in-flight calls finish only with
//! `finish_in_flight_on_cancel`), any other end of the run (finalizing, completed, failed,
//! expired) as a halt that aborts its calls. A change that starts work (a new or validated
//! batch) wakes the supervisor, so other nodes join at once instead of at its next look.
//!
//! The fallback is the supervisor's look at the working batches (every second, every half
//! second while the feed is down): it applies the statuses it reads, and those of runs whose
//! batch left the working statuses. A feed that opens (again) wakes the supervisor, since
//! changes committed while it was closed were missed.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::Inner;
use crate::store::BatchStatus;

/// The pause before a feed that failed is opened again.
const REOPEN: Duration = Duration::from_secs(1);

/// Follows the store's status feed until shutdown; returns at once where there is none.
pub async fn listen(inner: Arc<Inner>) {
    loop {
        let feed = tokio::select! {
            f = inner.store.status_feed() => f,
            _ = inner.soft_stop.cancelled() => return,
        };
        match feed {
            Ok(None) => return,
            Ok(Some(mut feed)) => {
                inner.listening.store(true, Ordering::Relaxed);
                inner.wake.notify_one();
                let lost = loop {
                    let next = tokio::select! {
                        n = feed.next() => n,
                        _ = inner.soft_stop.cancelled() => return,
                    };
                    match next {
                        Ok(change) => apply(&inner, &change.batch_id, change.status),
                        Err(e) => break e,
                    }
                };
                inner.listening.store(false, Ordering::Relaxed);
                tracing::warn!(error = %crate::Chain(&lost), "the status feed was lost; opening it again (meanwhile the supervisor looks every half second)");
            }
            Err(e) => tracing::warn!(error = %crate::Chain(&e), "cannot open the status feed; trying again"),
        }
        tokio::select! {
            _ = tokio::time::sleep(REOPEN) => {}
            _ = inner.soft_stop.cancelled() => return,
        }
    }
}

/// Signals this node's run of batch `id`, if it has one, that the batch is now `status`.
/// A run already signalled is left alone; a batch with work this node does not run yet
/// wakes the supervisor.
pub fn apply(inner: &Inner, id: &str, status: BatchStatus) {
    let active = inner.active.lock().unwrap_or_else(|p| p.into_inner());
    let Some(a) = active.get(id) else {
        drop(active);
        if matches!(status, BatchStatus::Validating | BatchStatus::InProgress) {
            inner.wake.notify_one();
        }
        return;
    };
    if a.cancelled.is_cancelled() {
        return;
    }
    match status {
        BatchStatus::Validating | BatchStatus::InProgress => {}
        BatchStatus::Cancelling | BatchStatus::Cancelled => {
            tracing::info!(batch = id, "the batch was cancelled; stopping its work here");
            a.cancel(inner.cfg.finish_in_flight_on_cancel);
        }
        BatchStatus::Finalizing | BatchStatus::Completed | BatchStatus::Failed | BatchStatus::Expired => {
            tracing::info!(batch = id, status = status.as_str(), "the batch's run ended; stopping its work here");
            a.halt();
        }
    }
}

/// How long the supervisor waits between its looks at the working batches: its look is the
/// only way this node learns of other nodes' changes while the feed is down.
pub fn look_period(inner: &Inner) -> Duration {
    let alone = inner.live_nodes.load(Ordering::Relaxed) <= 1;
    if alone || inner.listening.load(Ordering::Relaxed) {
        Duration::from_secs(1)
    } else {
        Duration::from_millis(500)
    }
}
