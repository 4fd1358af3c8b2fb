//! A batch's steps on this node: validate, run, then hand over to the finalizer.
//!
//! Validation and finalization are claimed on the batch row, so one node does each. Running is
//! shared: every node's feeders lease units (see `feeder`). The run ends when every line is
//! durable (→ `completed`), on cancel (→ `cancelled`), at `expires_at` (→ `expired`), at
//! shutdown (no change), or when no unit is left to lease here (others hold them; the
//! supervisor looks again shortly).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::task::TaskTracker;

use super::error::{Context, Error, Result};
use super::feeder::{self, RunCtx};
use super::order::{order_key, Ordered};
use super::validator::{validate_stream, Validator};
use super::{finalizer, Active, Inner};
use crate::store::{BatchId, BatchRecord, BatchStatus, InputFormat, LineError};

/// Runs the step the batch's status calls for.
pub async fn handle_batch(inner: &Arc<Inner>, id: &BatchId, h: &Active) -> Result<()> {
    let b = load(inner, id).await?;
    tracing::Span::current().record("tenant", b.tenant.as_str());
    match b.status {
        BatchStatus::Validating => {
            if claim(inner, id).await? {
                validate(inner, &b).await?;
                let b = load(inner, id).await?;
                if b.status == BatchStatus::InProgress {
                    return run(inner, &b, h).await;
                }
            }
            Ok(())
        }
        BatchStatus::InProgress => run(inner, &b, h).await,
        BatchStatus::Cancelling => finalize(inner, &b, BatchStatus::Cancelled).await,
        BatchStatus::Finalizing => finalize(inner, &b, b.finalize_as.unwrap_or(BatchStatus::Completed)).await,
        _ => Ok(()),
    }
}

/// Reads a batch; a row that exists but cannot be read is a permanent error for it alone.
async fn load(inner: &Inner, id: &BatchId) -> Result<BatchRecord> {
    match inner.store.get_batch(None, id).await {
        Err(crate::store::Error::Other(m)) => Err(Error::permanent("corrupt_state", format!("the batch's stored state cannot be read ({m})"))),
        other => other.ctx("reading the batch"),
    }
}

async fn claim(inner: &Inner, id: &BatchId) -> Result<bool> {
    inner.store.claim_batch(id, &inner.node, inner.cfg.engine.lease_ttl).await.ctx("claiming the batch")
}

/// Finalizes under the batch's claim (another node holding it finalizes instead).
async fn finalize(inner: &Arc<Inner>, b: &BatchRecord, status: BatchStatus) -> Result<()> {
    if !claim(inner, &b.id).await? {
        return Ok(());
    }
    let r = finalizer::finish(inner, b, status).await;
    if r.is_err() {
        let _ = inner.store.release_claim(&b.id, &inner.node).await;
    }
    r
}

async fn validate(inner: &Inner, b: &BatchRecord) -> Result<()> {
    let now = crate::now_unix();
    let file = match inner.store.get_file(&b.tenant, &b.input_file_id, now).await {
        Ok(f) => f,
        Err(crate::store::Error::NotFound) => {
            let e =
                LineError { code: "invalid_value".into(), message: "The input file no longer exists.".into(), param: Some("input_file_id".into()), line: None };
            inner.store.mark_failed(&b.id, &[e], now).await.ctx("failing the batch")?;
            return Ok(());
        }
        Err(e) => return Err(Error::from(e).context("reading the input file record")),
    };
    let stream = inner.blob.get_stream(&file.blob_key).await.ctx("reading the input file")?;
    let mut v = Validator::new(&b.id, &b.endpoint, &inner.router, inner.cfg.limits, inner.cfg.engine.unit_lines);
    if let Some(dir) = inner.cfg.scratch_dir() {
        v = v.spill_to(dir);
    }
    let v = v.order_by_prefix(inner.cfg.scratch_dir());
    let report = validate_stream(stream, file.bytes as u64, v).await.ctx("reading the input file")?;
    crate::memory::release_free_memory();
    if let Some(order) = report.order {
        store_order(inner, &b.id, order).await?;
    }
    let now = crate::now_unix();
    if report.errors.is_empty() {
        inner.store.mark_validated(&b.id, &report.validated, now).await.ctx("recording the work units")?;
        tracing::info!(batch = %b.id, lines = report.validated.total, units = report.validated.units.len(), "batch validated");
    } else {
        inner.store.mark_failed(&b.id, &report.errors, now).await.ctx("recording the validation errors")?;
        tracing::info!(batch = %b.id, errors = report.errors.len(), "batch failed validation");
    }
    inner.live.outbox_changed();
    Ok(())
}

/// Uploads a batch's dispatch order before its units, which read it, are recorded (a crash
/// in between validates again and writes the same order again).
async fn store_order(inner: &Inner, batch_id: &str, order: Ordered) -> Result<()> {
    let mut w = inner.blob.writer(&order_key(batch_id));
    let copied = copy_file(order.file, &mut w).await;
    if copied.is_err() {
        w.abort().await;
        return copied;
    }
    w.finish().await.ctx("writing the dispatch order")?;
    tracing::info!(batch = %batch_id, shared = order.shared, units = order.units.len(), "lines ordered by shared prefix");
    Ok(())
}

/// Copies a local file into a blob writer, 256 KiB at a time.
async fn copy_file(file: std::fs::File, w: &mut crate::blob::BlobWriter) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut file = tokio::fs::File::from_std(file);
    let io = |e: std::io::Error| crate::blob::Error::from(e);
    file.rewind().await.map_err(io).ctx("reading the dispatch order")?;
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = file.read(&mut buf).await.map_err(io).ctx("reading the dispatch order")?;
        if n == 0 {
            return Ok(());
        }
        w.write(&buf[..n]).await.ctx("writing the dispatch order")?;
    }
}

async fn run(inner: &Arc<Inner>, b: &BatchRecord, h: &Active) -> Result<()> {
    let file = inner.store.get_file(&b.tenant, &b.input_file_id, 0).await;
    let file = match file {
        Err(crate::store::Error::NotFound) => return Err(Error::permanent("input_unavailable", "the batch's input file was deleted")),
        other => other.ctx("reading the input file record")?,
    };
    let batch_id = b.id.clone();
    let remaining = (b.total - b.completed - b.failed).max(0) as u64;
    let (turns, _membership) = inner.scheduler.join(&batch_id, b.priority, b.expires_at, remaining, &inner.progress);
    let ctx = Arc::new(RunCtx {
        inner: inner.clone(),
        batch_id,
        blob_key: file.blob_key,
        format: b.input_format.unwrap_or(InputFormat::Full),
        path: b.endpoint.strip_prefix("/v1").unwrap_or(&b.endpoint).into(),
        h: h.clone(),
        lines: TaskTracker::new(),
        turns,
        queued: tokio::sync::Semaphore::new(feeder::MAX_QUEUED),
        failed: Default::default(),
    });
    let expiry = expiry_sleep(b.expires_at);
    tokio::pin!(expiry);
    let (fed, mut expired) = tokio::select! {
        r = feeder::feed_all(ctx.clone()) => (r, false),
        _ = h.stop.cancelled() => (Ok(()), false),
        _ = &mut expiry => (Ok(()), true),
    };
    if expired {
        h.abort.cancel();
    }
    // Feeding ended: the line tasks finish. Remote units (`remote::drive_unit`) go on until
    // their remote batches end, so the batch's stop is given only when feeding failed; a
    // cancel, an expiry or a shutdown reaches them through it meanwhile.
    if expired || fed.is_err() {
        h.stop.cancel();
    }
    ctx.lines.close();
    tokio::select! {
        _ = ctx.lines.wait() => {}
        _ = &mut expiry, if !expired => { expired = true; h.abort.cancel(); h.stop.cancel(); ctx.lines.wait().await; }
    }
    h.stop.cancel();
    inner.writer.flush().await;
    fed?;
    if let Some(e) = ctx.failed.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(e);
    }
    conclude(inner, &b.id, expired).await
}

fn expiry_sleep(expires_at: Option<i64>) -> tokio::time::Sleep {
    let secs = expires_at.map_or(u64::MAX / 4, |t| (t - crate::now_unix()).max(0) as u64);
    tokio::time::sleep(Duration::from_secs(secs.min(10 * 365 * 86_400)))
}

/// Decides how a run ended, from the durable state.
async fn conclude(inner: &Arc<Inner>, id: &BatchId, expired: bool) -> Result<()> {
    let b = load(inner, id).await?;
    inner.store.release_batch_leases(id, &inner.node).await.ctx("handing back leases")?;
    let all_done = b.completed + b.failed >= b.total;
    let now = crate::now_unix();
    if b.status == BatchStatus::Cancelling {
        return finalize(inner, &b, BatchStatus::Cancelled).await;
    }
    if inner.soft_stop.is_cancelled() {
        return Ok(());
    }
    let outcome = if all_done {
        BatchStatus::Completed
    } else if expired || b.expires_at.is_some_and(|t| now >= t) {
        BatchStatus::Expired
    } else {
        return Ok(());
    };
    inner.store.begin_finalizing(id, outcome, now).await.ctx("starting finalization")?;
    inner.live.outbox_changed();
    let b = load(inner, id).await?;
    match b.status {
        BatchStatus::Finalizing => finalize(inner, &b, b.finalize_as.unwrap_or(outcome)).await,
        // A cancel landed after the first read (so `begin_finalizing` did nothing): the batch
        // is `cancelling`, and cancelling only ever leads to `cancelled`.
        BatchStatus::Cancelling => finalize(inner, &b, BatchStatus::Cancelled).await,
        _ => Ok(()),
    }
}
