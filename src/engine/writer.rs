//! The result writer: makes results durable in groups.
//!
//! Finished lines arrive on a bounded channel. The writer commits a group in one store
//! transaction once it holds `commit_min_results`, or once its oldest result has waited
//! `commit_interval`, taking everything already queued (up to `commit_max_results`). So the
//! number of commits follows the number of results, not the clock: about one per
//! `commit_min_results` results under load, and a result waits at most `commit_interval`.
//! A flush barrier lets a runner wait until everything it sent is durable. A failed commit
//! is retried with back-off; results are never dropped while the process lives.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::progress::ProgressBook;
use super::EngineStats;
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

    /// Returns once every result sent before this call is durable.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

pub fn spawn(store: Arc<dyn Store>, cfg: EngineConfig, progress: ProgressBook, stats: Arc<EngineStats>) -> WriterHandle {
    let (tx, rx) = mpsc::channel(cfg.commit_max_results.min(1024));
    tokio::spawn(run(store, cfg, progress, stats, rx));
    WriterHandle { tx }
}

async fn run(store: Arc<dyn Store>, cfg: EngineConfig, progress: ProgressBook, stats: Arc<EngineStats>, mut rx: mpsc::Receiver<Msg>) {
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
        let inserted = commit(&*store, &group, &progress).await;
        super::count(&stats.results_committed, inserted);
        group.clear();
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

/// Commits a group, retrying until it is durable; returns how many results were new.
async fn commit(store: &dyn Store, group: &[ResultRecord], progress: &ProgressBook) -> u64 {
    if group.is_empty() {
        return 0;
    }
    let mut delay = Duration::from_millis(50);
    let inserted = loop {
        match store.commit_results(group).await {
            Ok(o) => break o.inserted,
            Err(e) => {
                tracing::error!(error = %e, results = group.len(), "committing results failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    };
    let mut per_batch: std::collections::HashMap<&str, u64> = Default::default();
    for r in group {
        *per_batch.entry(&r.batch_id).or_default() += 1;
    }
    for (b, n) in per_batch {
        progress.record(b, n);
    }
    inserted
}
