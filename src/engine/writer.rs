//! The result writer: makes results durable in groups.
//!
//! Finished lines arrive on a bounded channel. The writer commits a group in one store
//! transaction once it holds `commit_min_results`, or once its oldest result has waited
//! `commit_interval`, taking everything already queued (up to `commit_max_results`). So the
//! number of commits follows the number of results, not the clock: about one per
//! `commit_min_results` results under load, and a result waits at most `commit_interval`.
//! A flush barrier lets a runner wait until everything it sent is durable.
//!
//! A commit that fails because the store is unavailable or full closes the [`Health`] gate
//! (no new upstream calls) and is retried with back-off until it succeeds; only a hard stop
//! gives it up (those results were in flight, and a restart sends them again). A commit that
//! fails for another reason is split per batch, so that one batch's bad result never blocks
//! the others: the results of a batch that still cannot be committed are dropped from memory
//! (their lines run again later). Units whose lease the commit reports lost are stopped.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::book::Book;
use super::health::Health;
use super::progress::ProgressBook;
use super::{EngineStats, Held};
use crate::config::EngineConfig;
use crate::store::{ResultRecord, Store};

enum Msg {
    Result(ResultRecord),
    Flush(oneshot::Sender<()>),
}

#[derive(Clone)]
pub struct WriterHandle {
    tx: mpsc::Sender<Msg>,
}

impl WriterHandle {
    /// Queues a result; waits when the writer is behind (back-pressure).
    pub async fn send(&self, r: ResultRecord) {
        if self.tx.send(Msg::Result(r)).await.is_err() {
            tracing::error!("result writer has stopped; a result was not recorded");
        }
    }

    /// Returns once every result sent before this call is durable (or given up at a hard
    /// stop).
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// What the writer shares with the rest of the engine.
pub struct WriterCtx {
    pub store: Arc<dyn Store>,
    pub cfg: EngineConfig,
    pub node: String,
    pub progress: ProgressBook,
    pub stats: Arc<EngineStats>,
    pub health: Health,
    pub book: Book,
    pub held: Held,
    /// Gives up retrying a commit (the process is going down hard).
    pub hard_stop: CancellationToken,
    /// Commit latency; the outbox tick (a commit may append `batch.progress`).
    pub live: Arc<super::Live>,
}

pub fn spawn(ctx: WriterCtx) -> WriterHandle {
    let (tx, rx) = mpsc::channel(ctx.cfg.commit_max_results.min(1024));
    tokio::spawn(run(ctx, rx));
    WriterHandle { tx }
}

async fn run(ctx: WriterCtx, mut rx: mpsc::Receiver<Msg>) {
    let cfg = ctx.cfg;
    let mut group = Vec::with_capacity(cfg.commit_max_results);
    let mut waiters = Vec::new();
    while let Some(first) = rx.recv().await {
        take(first, &mut group, &mut waiters);
        let deadline = tokio::time::Instant::now() + cfg.commit_interval;
        loop {
            while group.len() < cfg.commit_max_results {
                match rx.try_recv() {
                    Ok(m) => take(m, &mut group, &mut waiters),
                    Err(_) => break,
                }
            }
            if group.len() >= cfg.commit_min_results || group.len() >= cfg.commit_max_results || !waiters.is_empty() {
                break;
            }
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(m)) => take(m, &mut group, &mut waiters),
                _ => break,
            }
        }
        commit(&ctx, &group).await;
        for r in group.drain(..) {
            ctx.book.release(&r.batch_id, r.line);
        }
        for w in waiters.drain(..) {
            let _ = w.send(());
        }
    }
}

fn take(m: Msg, group: &mut Vec<ResultRecord>, waiters: &mut Vec<oneshot::Sender<()>>) {
    match m {
        Msg::Result(r) => group.push(r),
        Msg::Flush(w) => waiters.push(w),
    }
}

/// Commits a group (see the module doc for what happens when that fails).
async fn commit(ctx: &WriterCtx, group: &[ResultRecord]) {
    if group.is_empty() {
        return;
    }
    match commit_retrying(ctx, group).await {
        Ok(()) => {}
        Err(e) if e.is_transient() => {}
        Err(e) => {
            tracing::warn!(error = %crate::Chain(&e), results = group.len(), "a group commit failed; committing batch by batch");
            let mut per_batch: HashMap<&str, Vec<ResultRecord>> = HashMap::new();
            for r in group {
                per_batch.entry(&r.batch_id).or_default().push(r.clone());
            }
            for (batch, results) in per_batch {
                if let Err(e) = commit_retrying(ctx, &results).await {
                    tracing::error!(batch, error = %crate::Chain(&e), results = results.len(), "results of this batch cannot be committed; they will run again");
                }
            }
        }
    }
}

/// Commits one group, retrying while the store is unavailable or full (the gate stays closed
/// meanwhile) until it succeeds or a hard stop; returns other errors at once.
async fn commit_retrying(ctx: &WriterCtx, group: &[ResultRecord]) -> crate::store::Result<()> {
    let mut delay = Duration::from_millis(50);
    loop {
        let started = std::time::Instant::now();
        match ctx.store.commit_results(&ctx.node, group).await {
            Ok(o) => {
                ctx.live.metrics.commit_took(started.elapsed());
                ctx.live.outbox_changed();
                ctx.health.set_writable(true);
                super::count(&ctx.stats.results_committed, o.inserted);
                record_progress(ctx, group);
                for key in &o.lost {
                    if let Some(token) = ctx.held.lock().unwrap_or_else(|p| p.into_inner()).get(key) {
                        tracing::warn!(batch = %key.batch_id, unit = key.idx, "the lease on this unit was lost; stopping its feeder");
                        token.cancel();
                    }
                }
                return Ok(());
            }
            Err(e) if e.is_transient() => {
                if ctx.health.is_writable() {
                    tracing::error!(error = %crate::Chain(&e), results = group.len(), "the store cannot take results; pausing upstream calls until it can");
                }
                ctx.health.set_writable(false);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = ctx.hard_stop.cancelled() => {
                        tracing::warn!(results = group.len(), "stopping with results that could not be stored; their lines run again after restart");
                        return Err(e);
                    }
                }
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(e),
        }
    }
}

fn record_progress(ctx: &WriterCtx, group: &[ResultRecord]) {
    let mut per_batch: HashMap<&str, u64> = HashMap::new();
    for r in group {
        *per_batch.entry(&r.batch_id).or_default() += 1;
    }
    for (b, n) in per_batch {
        ctx.progress.record(b, n);
    }
}
