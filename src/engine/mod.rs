//! The execution engine: turns created batches into output and error files.
//!
//! ```text
//! supervisor ─► validator ─► runner (feeders lease units) ─► dispatch (limits, retries)
//!                                                              │
//!                            finalizer ◄── writer (group commit) ◄┘
//! ```
//! - [`validator`] streams the input once and cuts it into work units;
//! - `runner` leases units and feeds their lines to the upstream pools; batches share a
//!   pool fairly because each batch waits in the pool's FIFO queue with `2 × priority` feeders;
//! - `dispatch` runs one line's attempts with back-off and turns the answer into a result;
//! - `writer` makes results durable in groups (one commit per many results) — a result is
//!   counted only once its group is committed;
//! - `finalizer` streams the result log into the output and error files.
//!
//! Cancel and expiry are signals: a per-batch token stops the feeders at once and aborts
//! in-flight calls. A `kill -9` is safe at any instant: on restart a unit resumes at the
//! lines that have no durable result, so only calls in flight at the crash are repeated.

mod dedup;
mod dispatch;
mod finalizer;
pub mod lines;
mod progress;
mod runner;
pub mod validator;
mod writer;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::blob::Blob;
use crate::config::Config;
use crate::store::{BatchStatus, Store};
use crate::upstream::Router;

pub use finalizer::next_chunk_records;
pub use progress::Progress;

/// Live counters of the engine, for progress displays and metrics.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub sent: AtomicU64,
    pub retries_waiting: AtomicU64,
    pub retries_total: AtomicU64,
    pub output_tokens: AtomicU64,
    pub results_committed: AtomicU64,
}

/// Cancellation handles of one batch the engine is working on.
#[derive(Clone)]
struct Active {
    /// Stops feeding new lines (cancel, expiry, shutdown).
    stop: CancellationToken,
    /// Aborts in-flight calls.
    abort: CancellationToken,
}

pub(crate) struct Inner {
    store: Arc<dyn Store>,
    blob: Blob,
    router: Arc<Router>,
    cfg: Arc<Config>,
    node: String,
    writer: writer::WriterHandle,
    active: Mutex<HashMap<String, Active>>,
    wake: Notify,
    soft_stop: CancellationToken,
    hard_stop: CancellationToken,
    tasks: TaskTracker,
    progress: progress::ProgressBook,
    stats: Arc<EngineStats>,
}

/// A handle on the running engine; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl Engine {
    /// Starts the engine's tasks. An embedded store belongs to this process alone, so leases
    /// left by a previous (crashed) process are released first.
    pub async fn start(store: Arc<dyn Store>, blob: Blob, router: Arc<Router>, cfg: Arc<Config>, exclusive: bool) -> crate::store::Result<Engine> {
        if exclusive {
            store.release_leases(None).await?;
        }
        let progress = progress::ProgressBook::default();
        let stats = Arc::new(EngineStats::default());
        let writer = writer::spawn(store.clone(), cfg.engine, progress.clone(), stats.clone());
        let inner = Arc::new(Inner {
            store,
            blob,
            router,
            cfg,
            node: format!("node-{}", crate::ids::batch_id().trim_start_matches("batch_")),
            writer,
            active: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            soft_stop: CancellationToken::new(),
            hard_stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
            progress,
            stats,
        });
        inner.tasks.spawn(supervise(inner.clone()));
        inner.tasks.spawn(heartbeat(inner.clone()));
        inner.tasks.spawn(janitor(inner.clone()));
        Ok(Engine { inner })
    }

    /// Tells the engine that a batch was created or changed.
    pub fn wake(&self) {
        self.inner.wake.notify_one();
    }

    /// Signals a batch that the API just moved to `cancelling`.
    pub fn cancel(&self, batch_id: &str) {
        if let Some(a) = self.inner.active.lock().unwrap().get(batch_id) {
            a.stop.cancel();
            if !self.inner.cfg.finish_in_flight_on_cancel {
                a.abort.cancel();
            }
        }
        self.wake();
    }

    /// Live throughput and ETA of a running batch (the `progress` extension).
    pub fn progress(&self, batch_id: &str, remaining: i64) -> Option<Progress> {
        self.inner.progress.get(batch_id, remaining)
    }

    pub fn stats(&self) -> &EngineStats {
        &self.inner.stats
    }

    pub fn store_commits(&self) -> u64 {
        self.inner.store.commits()
    }

    /// Prometheus text exposition of the engine's counters.
    pub fn metrics_text(&self) -> String {
        let s = &self.inner.stats;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut out = String::new();
        let mut put = |name: &str, kind: &str, help: &str, v: u64| {
            out += &format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n");
        };
        put("batchd_store_commits_total", "counter", "Store write transactions committed.", self.store_commits());
        put("batchd_results_committed_total", "counter", "Results made durable.", get(&s.results_committed));
        put("batchd_upstream_requests_total", "counter", "Requests sent upstream, retries included.", get(&s.sent));
        put("batchd_retries_total", "counter", "Upstream attempts that were retried.", get(&s.retries_total));
        put("batchd_retries_waiting", "gauge", "Retries waiting for their back-off.", get(&s.retries_waiting));
        put("batchd_output_tokens_total", "counter", "Output tokens reported by upstreams.", get(&s.output_tokens));
        for p in self.inner.router.pools() {
            let n = &p.cfg.name;
            out += &format!("batchd_upstream_in_flight{{upstream=\"{n}\"}} {}\n", p.limiter.in_flight());
            out += &format!("batchd_upstream_window{{upstream=\"{n}\"}} {}\n", p.limiter.window());
        }
        out
    }

    /// Graceful stop: no new lines; in-flight lines get `grace` to finish; durable results
    /// are flushed; leases are released.
    pub async fn shutdown(&self, grace: Duration) {
        let inner = &self.inner;
        inner.soft_stop.cancel();
        inner.tasks.close();
        if tokio::time::timeout(grace, inner.tasks.wait()).await.is_err() {
            tracing::warn!("in-flight requests did not finish within the grace period; aborting them");
            inner.hard_stop.cancel();
            inner.tasks.wait().await;
        }
        inner.writer.flush().await;
        if let Err(e) = inner.store.release_leases(Some(&inner.node)).await {
            tracing::warn!(error = %e, "could not release leases at shutdown; they will expire");
        }
    }
}

const WORK_STATUSES: [BatchStatus; 4] =
    [BatchStatus::Validating, BatchStatus::InProgress, BatchStatus::Cancelling, BatchStatus::Finalizing];

/// Finds batches that need work and starts a task for each one not already handled here.
async fn supervise(inner: Arc<Inner>) {
    loop {
        match inner.store.batches_in(&WORK_STATUSES).await {
            Ok(batches) => {
                for b in batches {
                    start_batch(&inner, b);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot list batches to run; retrying"),
        }
        tokio::select! {
            _ = inner.wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = inner.soft_stop.cancelled() => return,
        }
    }
}

fn start_batch(inner: &Arc<Inner>, b: crate::store::BatchRecord) {
    let mut active = inner.active.lock().unwrap();
    if let Some(a) = active.get(&b.id) {
        if b.status == BatchStatus::Cancelling && !a.stop.is_cancelled() {
            a.stop.cancel();
            if !inner.cfg.finish_in_flight_on_cancel {
                a.abort.cancel();
            }
        }
        return;
    }
    let handles = Active { stop: inner.soft_stop.child_token(), abort: inner.hard_stop.child_token() };
    active.insert(b.id.clone(), handles.clone());
    let inner2 = inner.clone();
    inner.tasks.spawn(async move {
        let id = b.id.clone();
        runner::handle_batch(inner2.clone(), b, handles).await;
        inner2.active.lock().unwrap().remove(&id);
        inner2.progress.forget(&id);
    });
}

async fn heartbeat(inner: Arc<Inner>) {
    let ttl = inner.cfg.engine.lease_ttl;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(ttl / 3) => {}
            _ = inner.soft_stop.cancelled() => return,
        }
        if let Err(e) = inner.store.renew_leases(&inner.node, ttl.as_secs() as i64, crate::now_unix()).await {
            tracing::warn!(error = %e, "lease renewal failed");
        }
    }
}

/// Removes files past their `expires_at`: the row first, then the bytes.
async fn janitor(inner: Arc<Inner>) {
    loop {
        if let Ok(files) = inner.store.expired_files(crate::now_unix(), 100).await {
            for f in files {
                if inner.store.purge_file(&f.id).await.is_ok() {
                    let _ = inner.blob.delete(&f.blob_key).await;
                    tracing::info!(file = %f.id, "expired file removed");
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(30)) => {}
            _ = inner.soft_stop.cancelled() => return,
        }
    }
}

pub(crate) fn count(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}
