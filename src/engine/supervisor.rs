//! The supervisor: finds batches with work and runs each one's next step, alone.
//!
//! It reads only ids and statuses, so one unreadable row cannot hide the others, and it
//! never ends before shutdown. A batch's step that fails is handled by its [`Error`] kind:
//! `Unavailable` waits (the store is down or full; the batch is fine), `Retry` is tried
//! again a few times with growing pauses, `Permanent` fails that batch with a clear message.
//! Either way the other batches go on. Each step runs with fresh cancellation handles.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::error::Error;
use super::{runner, Active, Inner};
use crate::store::{BatchStatus, LineError};

const WORK_STATUSES: [BatchStatus; 4] = [BatchStatus::Validating, BatchStatus::InProgress, BatchStatus::Cancelling, BatchStatus::Finalizing];
/// Consecutive unexpected failures of one batch's steps before it is failed.
const MAX_RETRIES: u32 = 5;
const PAUSE_BASE: Duration = Duration::from_millis(500);
const PAUSE_CAP: Duration = Duration::from_secs(30);

/// Finds batches that need work and starts a task for each one not already handled here.
pub async fn supervise(inner: Arc<Inner>) {
    loop {
        match inner.store.batches_in(&WORK_STATUSES).await {
            Ok(batches) => {
                for (id, status) in batches {
                    start_batch(&inner, id, status);
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

fn start_batch(inner: &Arc<Inner>, id: String, status: BatchStatus) {
    let mut active = inner.active.lock().unwrap();
    if let Some(a) = active.get(&id) {
        if status == BatchStatus::Cancelling && !a.cancelled.is_cancelled() {
            a.cancel(inner.cfg.finish_in_flight_on_cancel);
        }
        return;
    }
    let handles = Active { stop: inner.soft_stop.child_token(), abort: inner.hard_stop.child_token(), cancelled: CancellationToken::new() };
    active.insert(id.clone(), handles.clone());
    let inner2 = inner.clone();
    let span = tracing::info_span!("batch", id = %id, tenant = tracing::field::Empty);
    inner.tasks.spawn(async move {
        match runner::handle_batch(&inner2, &id, &handles).instrument(span).await {
            Ok(()) => {
                inner2.failures.lock().unwrap().remove(&id);
            }
            Err(e) => on_failure(&inner2, &id, e).await,
        }
        inner2.active.lock().unwrap().remove(&id);
        inner2.progress.forget(&id);
    });
}

/// Handles a failed step: fails the batch when the error is permanent or the retries are
/// used up, else pauses (the batch stays "active" meanwhile, so the supervisor does not
/// start it again before the pause ends).
async fn on_failure(inner: &Arc<Inner>, id: &str, err: Error) {
    if inner.soft_stop.is_cancelled() {
        return;
    }
    let failures = {
        let mut all = inner.failures.lock().unwrap();
        let n = all.entry(id.to_string()).or_default();
        *n += 1;
        *n
    };
    let give_up = match &err {
        Error::Unavailable(m) => {
            tracing::warn!(batch = id, error = %m, "the store is unavailable; the batch waits");
            false
        }
        Error::Retry(m) => {
            tracing::warn!(batch = id, error = %m, attempt = failures, "a batch step failed; retrying");
            failures >= MAX_RETRIES
        }
        Error::Permanent { .. } => true,
    };
    if give_up {
        fail(inner, id, &err).await;
        inner.failures.lock().unwrap().remove(id);
        return;
    }
    let pause = PAUSE_BASE.saturating_mul(1 << failures.min(8)).min(PAUSE_CAP);
    tokio::select! {
        _ = tokio::time::sleep(pause) => {}
        _ = inner.soft_stop.cancelled() => {}
    }
}

/// Fails a batch the engine cannot go on with, keeping the reason in `errors`.
async fn fail(inner: &Inner, id: &str, err: &Error) {
    let (code, message) = match err {
        Error::Permanent { code, message } => (*code, message.clone()),
        other => ("internal_error", format!("The batch could not be processed after {MAX_RETRIES} attempts: {other}")),
    };
    tracing::error!(batch = id, code, error = %message, "failing the batch");
    let e = LineError { code: code.into(), message, param: None, line: None };
    match inner.store.fail_batch(id, &[e], crate::now_unix()).await {
        Ok(true) => super::count(&inner.stats.batches_failed, 1),
        Ok(false) => {}
        Err(e) => tracing::error!(batch = id, error = %e, "could not mark the batch failed; it will be tried again"),
    }
}
