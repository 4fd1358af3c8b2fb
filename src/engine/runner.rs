//! A batch's life on this node: validate, run, then hand over to the finalizer.
//!
//! Running: `2 × priority` feeders lease work units and wait, one line at a time, in the FIFO
//! queue of the pool that serves the line's model; every batch waiting there gets its turn,
//! so a 10-line batch is not stuck behind a 50,000-line one, and a batch with priority 3
//! gets three turns for one. Each line then runs as its own task (see `dispatch`) and its
//! result goes to the writer. The runner ends when every line is durable (→ `completed`),
//! on cancel (→ `cancelled`), at `expires_at` (→ `expired`), or at shutdown (no change).
//!
//! Memory does not follow the number of lines: a feeder holds one unit at a time, and when
//! the store falls behind (a slow fsync) and the writer's queue is full, at most
//! [`MAX_QUEUED`] finished lines wait for it before the feeders stop starting new ones;
//! before this gate, a one-second stall piled up twenty thousand finished lines (+35 MB).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use super::dispatch::{self, Prepared};
use super::lines::{LineSplitter, ParsedLine};
use super::validator::{validate_stream, Validator};
use super::{finalizer, Active, Inner};
use crate::store::{BatchRecord, BatchStatus, InputFormat, WorkUnit};
use crate::upstream::Route;

/// Feeders per unit of priority: two, so that one keeps lines flowing while the other
/// leases and reads its next unit.
const FEEDERS_PER_PRIORITY: i64 = 2;
const MAX_PRIORITY: i64 = 8;
/// Finished lines of one batch that may wait for room in the writer's queue (which holds
/// `commit_max_results` more) before its feeders pause.
const MAX_QUEUED: usize = 256;

pub async fn handle_batch(inner: Arc<Inner>, b: BatchRecord, h: Active) {
    let id = b.id.clone();
    if let Err(e) = drive(&inner, b, &h).await {
        tracing::error!(batch = %id, error = format!("{e:#}"), "batch step failed; it will be retried");
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = inner.soft_stop.cancelled() => {}
        }
    }
}

async fn drive(inner: &Arc<Inner>, mut b: BatchRecord, h: &Active) -> anyhow::Result<()> {
    if b.status == BatchStatus::Validating {
        validate(inner, &b).await?;
        b = inner.store.get_batch(None, &b.id).await?;
    }
    match b.status {
        BatchStatus::InProgress => run(inner, &b, h).await,
        BatchStatus::Cancelling => finalizer::finish(inner, &b, BatchStatus::Cancelled).await,
        BatchStatus::Finalizing => finalizer::finish(inner, &b, b.finalize_as.unwrap_or(BatchStatus::Completed)).await,
        _ => Ok(()),
    }
}

async fn validate(inner: &Inner, b: &BatchRecord) -> anyhow::Result<()> {
    let now = crate::now_unix();
    let file = match inner.store.get_file(&b.tenant, &b.input_file_id, now).await {
        Ok(f) => f,
        Err(crate::store::Error::NotFound) => {
            let e = crate::store::LineError { code: "invalid_value".into(), message: "The input file no longer exists.".into(), param: Some("input_file_id".into()), line: None };
            inner.store.mark_failed(&b.id, &[e], now).await?;
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let stream = inner.blob.get_stream(&file.blob_key).await?;
    let v = Validator::new(&b.id, &b.endpoint, &inner.router, inner.cfg.limits, inner.cfg.engine.unit_lines).spill_to(inner.cfg.data_dir.join("tmp"));
    let report = validate_stream(stream, file.bytes as u64, v).await?;
    crate::memory::release_free_memory();
    let now = crate::now_unix();
    if report.errors.is_empty() {
        inner.store.mark_validated(&b.id, &report.validated, now).await?;
        tracing::info!(batch = %b.id, lines = report.validated.total, units = report.validated.units.len(), "batch validated");
    } else {
        inner.store.mark_failed(&b.id, &report.errors, now).await?;
        tracing::info!(batch = %b.id, errors = report.errors.len(), "batch failed validation");
    }
    Ok(())
}

/// What one run of a batch needs, shared by its feeders and line tasks.
struct RunCtx {
    inner: Arc<Inner>,
    batch_id: Arc<str>,
    blob_key: String,
    format: InputFormat,
    path: Arc<str>,
    h: Active,
    lines: TaskTracker,
    /// One permit per finished line waiting for room in the writer's queue.
    queued: Semaphore,
}

async fn run(inner: &Arc<Inner>, b: &BatchRecord, h: &Active) -> anyhow::Result<()> {
    let file = inner.store.get_file(&b.tenant, &b.input_file_id, 0).await.context("reading the input file record")?;
    let ctx = Arc::new(RunCtx {
        inner: inner.clone(),
        batch_id: b.id.as_str().into(),
        blob_key: file.blob_key,
        format: b.input_format.unwrap_or(InputFormat::Full),
        path: b.endpoint.strip_prefix("/v1").unwrap_or(&b.endpoint).into(),
        h: h.clone(),
        lines: TaskTracker::new(),
        queued: Semaphore::new(MAX_QUEUED),
    });
    let expiry = expiry_sleep(b.expires_at);
    tokio::pin!(expiry);
    let n = b.priority.clamp(1, MAX_PRIORITY) * FEEDERS_PER_PRIORITY;
    let feeders = futures::future::join_all((0..n).map(|_| feed(ctx.clone())));
    let mut expired = tokio::select! {
        _ = feeders => false,
        _ = h.stop.cancelled() => false,
        _ = &mut expiry => true,
    };
    if expired {
        h.abort.cancel();
    }
    h.stop.cancel();
    ctx.lines.close();
    tokio::select! {
        _ = ctx.lines.wait() => {}
        _ = &mut expiry, if !expired => { expired = true; h.abort.cancel(); ctx.lines.wait().await; }
    }
    inner.writer.flush().await;
    conclude(inner, &b.id, expired).await
}

fn expiry_sleep(expires_at: Option<i64>) -> tokio::time::Sleep {
    let secs = expires_at.map_or(u64::MAX / 4, |t| (t - crate::now_unix()).max(0) as u64);
    tokio::time::sleep(Duration::from_secs(secs.min(10 * 365 * 86_400)))
}

/// Decides how a run ended, from the durable state.
async fn conclude(inner: &Arc<Inner>, id: &str, expired: bool) -> anyhow::Result<()> {
    let b = inner.store.get_batch(None, id).await?;
    inner.store.release_batch_leases(id, &inner.node).await?;
    let all_done = b.completed + b.failed >= b.total;
    let now = crate::now_unix();
    if b.status == BatchStatus::Cancelling {
        return finalizer::finish(inner, &b, BatchStatus::Cancelled).await;
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
    inner.store.begin_finalizing(id, outcome, now).await?;
    let b = inner.store.get_batch(None, id).await?;
    match b.status {
        BatchStatus::Finalizing => finalizer::finish(inner, &b, outcome).await,
        // A cancel landed after the first read (so `begin_finalizing` did nothing): the batch
        // is `cancelling`, and cancelling only ever leads to `cancelled`.
        BatchStatus::Cancelling => finalizer::finish(inner, &b, BatchStatus::Cancelled).await,
        _ => Ok(()),
    }
}

/// Leases units one after another and dispatches their lines, until none is left or the
/// batch stops.
async fn feed(ctx: Arc<RunCtx>) {
    let inner = &ctx.inner;
    let mut routes: HashMap<String, Option<Route>> = HashMap::new();
    while !ctx.h.stop.is_cancelled() {
        let ttl = inner.cfg.engine.lease_ttl.as_secs() as i64;
        let unit = match inner.store.lease_unit(&ctx.batch_id, &inner.node, ttl, crate::now_unix()).await {
            Ok(Some(u)) => u,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "leasing a unit failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if let Err(e) = feed_unit(&ctx, &unit, &mut routes).await {
            tracing::warn!(batch = %ctx.batch_id, unit = unit.idx, error = %e, "feeding a unit failed; it will be retried");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

async fn feed_unit(ctx: &Arc<RunCtx>, unit: &WorkUnit, routes: &mut HashMap<String, Option<Route>>) -> anyhow::Result<()> {
    let inner = &ctx.inner;
    let done: HashSet<u64> = inner.store.done_lines(&ctx.batch_id, unit).await?.into_iter().collect();
    for p in unit_lines(&inner.blob, &ctx.blob_key, unit, ctx.format, &ctx.batch_id, &ctx.path).await? {
        if !done.is_empty() && done.contains(&p.line) {
            continue;
        }
        let route = match routes.get(&p.model) {
            Some(r) => r.clone(),
            None => routes.entry(p.model.clone()).or_insert(inner.router.resolve(&p.model)).clone(),
        };
        let Some(route) = route else {
            let msg = format!("no upstream serves the model {:?} any more", p.model);
            inner.writer.send(dispatch::error_record(&p, "model_not_found", &msg)).await;
            continue;
        };
        let (pool, target, permit) = tokio::select! {
            got = async {
                // Passes at once unless MAX_QUEUED finished lines wait for the writer.
                drop(ctx.queued.acquire().await);
                route.acquire(p.est_tokens, None).await
            } => got,
            _ = ctx.h.stop.cancelled() => return Ok(()),
        };
        let ctx2 = ctx.clone();
        ctx.lines.spawn(async move {
            let run = dispatch::run_line(&ctx2.inner, &p, &route, pool, target, permit);
            let rec = tokio::select! {
                r = run => r,
                _ = ctx2.h.abort.cancelled() => return,
            };
            let _waiting = ctx2.queued.acquire().await;
            ctx2.inner.writer.send(rec).await;
        });
    }
    Ok(())
}

/// Reads a unit's bytes and prepares its request lines (blank lines skipped).
pub(super) async fn unit_lines(blob: &crate::blob::Blob, key: &str, unit: &WorkUnit, format: InputFormat, batch_id: &Arc<str>, path: &Arc<str>) -> anyhow::Result<Vec<Prepared>> {
    let bytes = blob.get_range(key, unit.byte_offset..unit.byte_offset + unit.byte_len).await?;
    let mut out = Vec::with_capacity(unit.line_count as usize);
    let mut splitter = LineSplitter::new(usize::MAX, unit.first_line, 0);
    let mut spans = Vec::with_capacity(unit.line_count as usize);
    splitter.feed(&bytes, &mut |l| {
        if !l.is_blank() {
            spans.push((l.no, l.offset as usize, l.bytes.len()));
        }
    });
    splitter.finish(&mut |l| {
        if !l.is_blank() {
            spans.push((l.no, l.offset as usize, l.bytes.len()));
        }
    });
    for (no, off, len) in spans {
        out.push(prepare(bytes.slice(off..off + len), no, unit.idx, format, batch_id, path));
    }
    Ok(out)
}

fn prepare(line: Bytes, no: u64, unit_idx: i64, format: InputFormat, batch_id: &Arc<str>, path: &Arc<str>) -> Prepared {
    let mut p = Prepared {
        batch_id: batch_id.clone(),
        line: no,
        unit_idx,
        custom_id: format!("line-{no}"),
        request_id: crate::ids::request_id(batch_id, no),
        body: Bytes::new(),
        model: String::new(),
        path: path.clone(),
        est_tokens: line.len() as u64 / 4,
    };
    if let Ok(parsed) = ParsedLine::parse(&line) {
        if format == InputFormat::Full {
            p.custom_id = parsed.custom_id.as_str().unwrap_or_default().to_string();
        }
        if let Some(body) = parsed.body_bytes(&line) {
            p.body = line.slice_ref(body);
        }
        p.model = parsed.model.as_str().unwrap_or_default().to_string();
        p.est_tokens += parsed.max_tokens.unwrap_or(0);
    }
    p
}
