//! The supervisor: finds batches with work and runs each one's next step, alone.
//!
//! It reads only ids and statuses, so one unreadable row cannot hide the others, and it
//! never ends before shutdown. A batch's step that fails is handled by its [`Error`] kind:
//! `Unavailable` waits (the store is down or full; the batch is fine), `Retry` is tried
//! again a few times with growing pauses, `Permanent` fails that batch with a clear message.
//! A step that panics counts as `Retry`. Either way the other batches go on. Each step runs
//! with fresh cancellation handles. Each look also signals this node's runs of batches whose
//! status changed elsewhere (the fallback of `statuses`).

use std::any::Any;
use std::collections::HashSet;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::error::Error;
use super::{runner, statuses, Active, Inner};
use crate::store::{BatchId, BatchStatus, LineError};

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
                inner.live.set_working(&batches);
                signal_runs(&inner, &batches);
                for (id, _) in batches {
                    start_batch(&inner, id);
                }
            }
            Err(e) => tracing::warn!(error = %crate::Chain(&e), "cannot list batches to run; retrying"),
        }
        tokio::select! {
            _ = inner.wake.notified() => {}
            _ = tokio::time::sleep(statuses::look_period(&inner)) => {}
            _ = inner.soft_stop.cancelled() => return,
        }
    }
}

/// The fallback for changes the status feed did not bring (see `statuses`): signals this
/// node's runs of the batches listed, and of those that left the working statuses (their
/// status read once each, while the run is not yet signalled).
fn signal_runs(inner: &Arc<Inner>, listed: &[(BatchId, BatchStatus)]) {
    for (id, status) in listed {
        statuses::apply(inner, id, *status);
    }
    let gone: Vec<BatchId> = {
        let active = inner.active.lock().unwrap_or_else(|p| p.into_inner());
        let listed: HashSet<&str> = listed.iter().map(|(id, _)| id.as_str()).collect();
        active.iter().filter(|(id, a)| !listed.contains(id.as_str()) && !a.cancelled.is_cancelled()).map(|(id, _)| id.clone()).collect()
    };
    for id in gone {
        let inner = inner.clone();
        inner.tasks.clone().spawn(async move {
            match inner.store.get_batch(None, &id).await {
                Ok(b) => statuses::apply(&inner, &id, b.status),
                Err(crate::store::Error::NotFound) => statuses::apply(&inner, &id, BatchStatus::Failed),
                Err(e) => tracing::debug!(batch = %id, error = %crate::Chain(&e), "cannot read the status of a batch run here"),
            }
        });
    }
}

fn start_batch(inner: &Arc<Inner>, id: BatchId) {
    let mut active = inner.active.lock().unwrap();
    if active.contains_key(&id) {
        return;
    }
    let handles = Active { stop: inner.soft_stop.child_token(), abort: inner.hard_stop.child_token(), cancelled: CancellationToken::new() };
    active.insert(id.clone(), handles.clone());
    let inner2 = inner.clone();
    let span = tracing::info_span!("batch", id = %id, tenant = tracing::field::Empty);
    inner.tasks.spawn(async move {
        match contained(runner::handle_batch(&inner2, &id, &handles)).instrument(span).await {
            Ok(()) => {
                inner2.failures.lock().unwrap().remove(&id);
            }
            Err(e) => on_failure(&inner2, &id, e).await,
        }
        inner2.active.lock().unwrap().remove(&id);
        inner2.progress.forget(&id);
    });
}

/// Runs one step, turning a panic into a `Retry` error: a bug met by one batch's step must
/// neither leave that batch marked active (never run again until a restart) nor go unseen.
async fn contained(step: impl Future<Output = Result<(), Error>>) -> Result<(), Error> {
    match AssertUnwindSafe(step).catch_unwind().await {
        Ok(result) => result,
        Err(panic) => Err(Error::Retry(format!("the step panicked: {}", panic_message(panic.as_ref())).into())),
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> &str {
    match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(s), _) => s,
        (_, Some(s)) => s,
        _ => "(no message)",
    }
}

/// Handles a failed step: fails the batch when the error is permanent or the retries are
/// used up, else pauses (the batch stays "active" meanwhile, so the supervisor does not
/// start it again before the pause ends).
async fn on_failure(inner: &Arc<Inner>, id: &BatchId, err: Error) {
    if inner.soft_stop.is_cancelled() {
        return;
    }
    let failures = {
        let mut all = inner.failures.lock().unwrap();
        let n = all.entry(id.clone()).or_default();
        *n += 1;
        *n
    };
    match &err {
        Error::Unavailable(_) => tracing::warn!(batch = %id, error = %crate::Chain(&err), "{} is unavailable; the batch waits", err.outage()),
        Error::Retry(_) => tracing::warn!(batch = %id, error = %crate::Chain(&err), attempt = failures, "a batch step failed; retrying"),
        Error::Permanent { .. } => {}
    }
    if gives_up(&err, failures) {
        fail(inner, id, &err).await;
        inner.failures.lock().unwrap().remove(id);
        return;
    }
    tokio::select! {
        _ = tokio::time::sleep(pause_after(failures)) => {}
        _ = inner.soft_stop.cancelled() => {}
    }
}

/// Whether the `failures`-th consecutive failure of a batch's steps ends the batch.
fn gives_up(err: &Error, failures: u32) -> bool {
    match err {
        Error::Unavailable(_) => false,
        Error::Retry(_) => failures >= MAX_RETRIES,
        Error::Permanent { .. } => true,
    }
}

fn pause_after(failures: u32) -> Duration {
    PAUSE_BASE.saturating_mul(1 << failures.min(8)).min(PAUSE_CAP)
}

/// Fails a batch the engine cannot go on with, keeping the reason in `errors`.
async fn fail(inner: &Inner, id: &BatchId, err: &Error) {
    let (code, message) = match err {
        Error::Permanent { code, message } => (*code, message.clone()),
        other => ("internal_error", format!("The batch could not be processed after {MAX_RETRIES} attempts: {}", crate::Chain(other))),
    };
    tracing::error!(batch = %id, code, error = %message, "failing the batch");
    let e = LineError { code: code.into(), message, param: None, line: None };
    match inner.store.fail_batch(id, &[e], crate::now_unix()).await {
        Ok(true) => super::count(&inner.stats.batches_failed, 1),
        Ok(false) => {}
        Err(e) => tracing::error!(batch = %id, error = %crate::Chain(&e), "could not mark the batch failed; it will be tried again"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_step_is_a_retry_error_and_the_task_goes_on() {
        let step = async {
            let v: Vec<u8> = Vec::new();
            let _ = v[3];
            Ok(())
        };
        match contained(step).await {
            Err(Error::Retry(m)) => assert!(m.to_string().contains("panicked") && m.to_string().contains("index out of bounds"), "{m}"),
            other => panic!("expected a Retry error, got {other:?}"),
        }
        let formatted = contained(async { panic!("bad {}", 7) }).await;
        assert!(matches!(&formatted, Err(Error::Retry(m)) if m.to_string().ends_with("bad 7")), "{formatted:?}");
        assert!(contained(async { Ok(()) }).await.is_ok());
    }

    #[test]
    fn retry_gives_up_after_a_few_unavailable_never_permanent_at_once() {
        let retry = Error::Retry("x".into());
        assert!((1..MAX_RETRIES).all(|n| !gives_up(&retry, n)));
        assert!(gives_up(&retry, MAX_RETRIES));
        assert!(!gives_up(&Error::Unavailable("disk full".into()), 10_000));
        assert!(gives_up(&Error::permanent("input_unavailable", "gone"), 1));
    }

    #[test]
    fn pauses_grow_and_are_capped() {
        let pauses: Vec<Duration> = (1..=12).map(pause_after).collect();
        assert!(pauses.windows(2).all(|w| w[0] <= w[1]), "{pauses:?}");
        assert_eq!(pauses[0], Duration::from_secs(1));
        assert_eq!(*pauses.last().unwrap(), PAUSE_CAP);
        assert_eq!(pause_after(u32::MAX), PAUSE_CAP);
    }
}
