//! The execution engine: turns created batches into output and error files.
//!
//! ```text
//! supervisor ─► validator ─► runner (feeders lease units) ─► dispatch (limits, retries)
//!                                                              │
//!                            finalizer ◄── writer (group commit) ◄┘
//! ```
//! - `supervisor` finds batches with work and runs each one's steps, turning every failure
//!   into a typed [`Error`]: it waits out an unavailable store, retries the unexpected a few
//!   times, and fails the one batch whose step cannot succeed; it never stops itself;
//! - [`validator`] streams the input once and cuts it into work units; [`prefix`] keys each
//!   line by the leading part the server will compute, and [`order`] sorts lines by those
//!   keys (with `extsort`, the external sort the duplicate finder `dedup` uses too) into a
//!   dispatch order whose ranges become the units, when lines share prefixes;
//! - `runner` leases units and feeds their lines to the upstream pools; batches share a
//!   pool fairly because each batch waits in the pool's FIFO queue with `2 × priority` feeders;
//! - `dispatch` runs one line's attempts with back-off and turns the answer into a result;
//!   lines served by a batch-kind upstream go into remote batches instead (`remote`);
//! - `writer` makes results durable in groups (one commit per many results) — a result is
//!   counted only once its group is committed; while the store cannot write, the
//!   [`health`] gate holds every new upstream call;
//! - `finalizer` streams the result log into the output and error files;
//! - `cluster` keeps this node's heartbeat, leases and claims alive and stops the feeders
//!   of units it lost (`leases` drops their calls not yet sent); `shares` splits each
//!   upstream's `max_concurrency` between the nodes by demand; `statuses` applies every node's status changes (a cancel, an
//!   expiry, a failure) to this node's runs as they commit; `janitor` removes expired
//!   files and crash debris.
//!
//! Steps one node does alone (validation, finalization) are claimed on the batch; units are
//! leased with an epoch, so a node that lost a lease learns it at its next commit or
//! heartbeat. Cancel and expiry are signals: a per-batch token stops the feeders at once and
//! aborts in-flight calls, on every node (see `statuses`). A `kill -9` is safe at any
//! instant: on restart a unit resumes at the lines that have no durable result, so only
//! calls in flight at the crash are repeated.

mod book;
mod cluster;
mod dedup;
mod dispatch;
pub mod error;
mod extsort;
mod feeder;
mod finalizer;
pub mod health;
mod janitor;
mod leases;
pub mod lines;
mod live;
pub mod order;
pub mod prefix;
mod progress;
pub mod rates;
mod remote;
mod retry;
mod runner;
mod scheduler;
mod shares;
pub mod stall;
mod statuses;
mod supervisor;
pub mod validator;
mod webhooks;
mod writer;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::blob::Blob;
use crate::config::Config;
use crate::store::{BatchId, Store, UnitKey};
use crate::upstream::Router;

pub use book::LineCounts;
pub use error::Error;
pub use finalizer::next_chunk_records;
pub use live::Live;
pub use progress::Progress;
pub use retry::RetryFilter;

/// Live counters of the engine, for progress displays and metrics.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub sent: AtomicU64,
    pub retries_waiting: AtomicU64,
    pub retries_total: AtomicU64,
    pub output_tokens: AtomicU64,
    pub results_committed: AtomicU64,
    /// Lines the remote counts as done (completed or failed) in remote batches not yet
    /// brought back: progress that is not durable here yet (`engine::remote`).
    pub remote_done: AtomicU64,
    /// Batches failed by the engine because a step could not succeed.
    pub batches_failed: AtomicU64,
}

/// Cancellation handles of one batch the engine is working on.
#[derive(Clone)]
struct Active {
    /// Stops feeding new lines (cancel, expiry, shutdown).
    stop: CancellationToken,
    /// Aborts in-flight calls.
    abort: CancellationToken,
    /// The batch was cancelled: lines waiting for a retry or an upstream's pause give up
    /// (they end as `batch_cancelled`), even when in-flight calls may finish.
    cancelled: CancellationToken,
}

impl Active {
    /// A user's cancel: stop feeding, drop lines waiting on retries, and abort the calls on
    /// the wire unless they may finish.
    fn cancel(&self, finish_in_flight: bool) {
        self.cancelled.cancel();
        self.stop.cancel();
        if !finish_in_flight {
            self.abort.cancel();
        }
    }

    /// The batch's run ended elsewhere (finalizing, completed, failed, expired): stop
    /// feeding, drop the lines waiting on retries and abort the calls on the wire.
    fn halt(&self) {
        self.cancelled.cancel();
        self.stop.cancel();
        self.abort.cancel();
    }
}

/// The units this node holds a lease on, each with the token that stops its feeder.
pub(crate) type Held = Arc<Mutex<HashMap<UnitKey, CancellationToken>>>;

pub(crate) struct Inner {
    store: Arc<dyn Store>,
    blob: Blob,
    router: Arc<Router>,
    cfg: Arc<Config>,
    node: String,
    started_at: i64,
    writer: writer::WriterHandle,
    active: Mutex<HashMap<BatchId, Active>>,
    wake: Notify,
    soft_stop: CancellationToken,
    hard_stop: CancellationToken,
    tasks: TaskTracker,
    progress: progress::ProgressBook,
    stats: Arc<EngineStats>,
    health: health::Health,
    book: book::Book,
    held: Held,
    /// Live nodes sharing the store, as of the last heartbeat (1 for an embedded store).
    live_nodes: AtomicUsize,
    /// How long each of this node's unit leases is known to hold (see `leases`).
    leases: leases::Leases,
    /// This node's stakes in the upstreams' slots, as last published (see `shares`).
    stakes: shares::Stakes,
    /// The store belongs to this process alone: no other node can take slots or units.
    exclusive: bool,
    /// The store's status feed is open: other nodes' changes arrive as they commit.
    listening: AtomicBool,
    /// The last heartbeat (a write) went through: with the writer's health, what
    /// `batchd_store_writable` tells.
    beat_writes: AtomicBool,
    /// Consecutive failed steps per batch (see `supervisor`).
    failures: Mutex<HashMap<BatchId, u32>>,
    scheduler: scheduler::Scheduler,
    /// Events, metrics and live cluster state (see `live`).
    live: Arc<Live>,
}

/// A handle on the running engine; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl Engine {
    /// Starts the engine's tasks. An embedded store belongs to this process alone
    /// (`exclusive`), so leases and claims left by a previous (crashed) process are released
    /// first, and crash debris in the blob store is swept.
    pub async fn start(store: Arc<dyn Store>, blob: Blob, router: Arc<Router>, cfg: Arc<Config>, exclusive: bool) -> crate::store::Result<Engine> {
        if exclusive {
            store.release_leases(None).await?;
        }
        let node = format!("node-{}", crate::ids::batch_id().trim_start_matches("batch_"));
        let (progress, stats, health, book, held) = Default::default();
        let live = Arc::new(Live::for_router(&router));
        let hard_stop = CancellationToken::new();
        let writer = writer::spawn(writer::WriterCtx {
            store: store.clone(),
            cfg: cfg.engine,
            node: node.clone(),
            progress: ProgressBook::clone(&progress),
            stats: Arc::clone(&stats),
            health: health::Health::clone(&health),
            book: book::Book::clone(&book),
            held: Held::clone(&held),
            hard_stop: hard_stop.clone(),
            live: live.clone(),
        });
        let inner = Arc::new(Inner {
            store,
            blob,
            router,
            cfg,
            node,
            started_at: crate::now_unix(),
            writer,
            active: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            soft_stop: CancellationToken::new(),
            hard_stop,
            tasks: TaskTracker::new(),
            progress,
            stats,
            health,
            book,
            held,
            live_nodes: AtomicUsize::new(1),
            leases: leases::Leases::default(),
            stakes: shares::Stakes::default(),
            exclusive,
            listening: AtomicBool::new(false),
            beat_writes: AtomicBool::new(true),
            failures: Mutex::default(),
            scheduler: scheduler::Scheduler::default(),
            live,
        });
        if exclusive {
            // Before any step runs: a finalization restarted meanwhile could otherwise have
            // its freshly written file taken for debris.
            janitor::sweep_debris(&inner, Duration::ZERO).await;
        }
        cluster::join(&inner, exclusive).await;
        // Every engine log line names this node (the spans of batches, units and lines nest in it).
        let span = tracing::info_span!("node", id = %inner.node);
        tracing::info!(parent: &span, live_nodes = inner.live_nodes.load(Ordering::Relaxed), "the engine started");
        inner.tasks.spawn(supervisor::supervise(inner.clone()).instrument(span.clone()));
        inner.tasks.spawn(cluster::heartbeat(inner.clone()).instrument(span.clone()));
        inner.tasks.spawn(scheduler::run(inner.clone()).instrument(span.clone()));
        inner.tasks.spawn(janitor::janitor(inner.clone()).instrument(span.clone()));
        inner.tasks.spawn(stall::watch(inner.clone()).instrument(span.clone()));
        inner.tasks.spawn(webhooks::deliver(inner.clone()).instrument(span.clone()));
        inner.tasks.spawn(statuses::listen(inner.clone()).instrument(span));
        Ok(Engine { inner })
    }

    /// Tells the engine that a batch was created or changed.
    pub fn wake(&self) {
        self.inner.wake.notify_one();
    }

    /// Signals a batch that the API just moved to `cancelling`.
    pub fn cancel(&self, batch_id: &str) {
        if let Some(a) = self.inner.active.lock().unwrap().get(batch_id) {
            a.cancel(self.inner.cfg.finish_in_flight_on_cancel);
        }
        self.wake();
    }

    /// Live throughput, ETA and deadline risk of a running batch (the `progress` extension).
    pub fn progress(&self, b: &crate::store::BatchRecord) -> Option<Progress> {
        self.inner.progress.get(&b.id, b.total - b.completed - b.failed, b.expires_at)
    }

    /// Lines of a batch in flight or waiting on a retry on this node.
    pub fn line_counts(&self, batch_id: &str) -> LineCounts {
        self.inner.book.counts(batch_id)
    }

    /// Whether the store takes writes (false while it is out of space or unreachable).
    pub fn store_writable(&self) -> bool {
        self.inner.health.is_writable()
    }

    pub fn node_id(&self) -> &str {
        &self.inner.node
    }

    pub fn live_nodes(&self) -> usize {
        self.inner.live_nodes.load(Ordering::Relaxed)
    }

    /// What each pool serving `model` has learned (every pool for a batch of mixed models).
    pub fn upstreams(&self, model: Option<&str>) -> Vec<crate::upstream::UpstreamState> {
        self.inner.router.states_for(model)
    }

    pub fn stats(&self) -> &EngineStats {
        &self.inner.stats
    }

    pub fn store_commits(&self) -> u64 {
        self.inner.store.commits()
    }

    /// Graceful stop: no new lines; in-flight lines get `grace` to finish; durable results
    /// are flushed (for at most `grace` more: a store that cannot write does not hold the
    /// process); leases and claims are handed back.
    pub async fn shutdown(&self, grace: Duration) {
        let inner = &self.inner;
        inner.soft_stop.cancel();
        inner.tasks.close();
        if tokio::time::timeout(grace, inner.tasks.wait()).await.is_err() {
            tracing::warn!("in-flight requests did not finish within the grace period; aborting them");
            inner.hard_stop.cancel();
            inner.tasks.wait().await;
        }
        if tokio::time::timeout(grace, inner.writer.flush()).await.is_err() {
            tracing::warn!("results could not be made durable within the grace period; their lines run again after restart");
            inner.hard_stop.cancel();
        }
        if let Err(e) = inner.store.leave(&inner.node).await {
            tracing::warn!(error = %crate::Chain(&e), "could not hand back leases at shutdown; they will expire");
        }
    }
}

use progress::ProgressBook;

/// Adds `n` to a counter, stopping at `u64::MAX` instead of wrapping to a small number (an
/// upstream may report any usage: three answers of `i64::MAX` output tokens would wrap).
pub(crate) fn count(c: &AtomicU64, n: u64) {
    let _ = c.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v.saturating_add(n)));
}
