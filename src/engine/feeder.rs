//! Feeders: lease a batch's units one after another and hand their lines to the upstreams.
//!
//! A batch runs two feeders (one keeps lines flowing while the other leases and reads its
//! next unit). Each keeps half of the batch's *turns* — lines waiting in the FIFO queue of
//! the pool that serves their model — so every batch waiting there gets its turn (a 10-line
//! batch is not stuck behind a 50,000-line one), and a batch's share of the pool is its
//! number of turns, which the `scheduler` sets from priority and deadline slack.
//!
//! Memory does not follow the number of lines: a feeder holds one unit at a time, and when
//! the store falls behind (a slow fsync) and the writer's queue is full, at most
//! [`MAX_QUEUED`] finished lines wait for it before the feeders stop starting new ones;
//! without this gate a one-second stall piled up twenty thousand finished lines (+35 MB).
//! Before each line a feeder waits at the health gate (no call whose answer could not be
//! stored), skips lines already durable or already owned by this node (see `book`), and
//! stops when its unit's lease is lost. A unit is a range of the input, read in one piece,
//! or (a batch in prefix order) a range of the batch's order file, whose lines are read by
//! ranged reads of the input ([`Source::pending`]). Each line then runs as its own task (`dispatch`) and
//! its result goes to the writer.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::book::LineGuard;
use super::dispatch::{self, Prepared};
use super::error::{Context, Error, Result};
use super::lines::{LineSplitter, ParsedLine};
use super::order::{self, Entry};
use super::{remote, Active, Inner};
use crate::store::{BatchId, InputFormat, WorkUnit};
use crate::upstream::Route;

const FEEDERS: usize = 2;
/// Finished lines of one batch that may wait for room in the writer's queue (which holds
/// `commit_max_results` more) before its feeders pause.
pub const MAX_QUEUED: usize = 256;
/// Unexpected failures a feeder retries before it gives the error to the runner.
const FEEDER_RETRIES: u32 = 3;

/// What one run of a batch needs, shared by its feeders and line tasks.
pub struct RunCtx {
    pub inner: Arc<Inner>,
    pub batch_id: BatchId,
    pub blob_key: String,
    pub format: InputFormat,
    pub path: Arc<str>,
    pub h: Active,
    pub lines: TaskTracker,
    /// The batch's turns: lines it may have waiting for a slot (set by the scheduler).
    pub turns: watch::Receiver<usize>,
    /// One permit per finished line waiting for room in the writer's queue.
    pub queued: tokio::sync::Semaphore,
    /// The error a unit's remote batches could not get past (see `remote::drive_unit`): the
    /// run ends with it.
    pub failed: std::sync::Mutex<Option<Error>>,
}

/// Runs the batch's feeders until no unit is left to lease here, the batch stops, or one of
/// them meets an error it cannot get past (the other is then dropped mid-wait).
pub async fn feed_all(ctx: Arc<RunCtx>) -> Result<()> {
    futures::future::try_join_all((0..FEEDERS).map(|_| feed(ctx.clone()))).await.map(|_| ())
}

/// Leases units one after another and dispatches their lines.
async fn feed(ctx: Arc<RunCtx>) -> Result<()> {
    let inner = &ctx.inner;
    let mut routes: HashMap<String, Option<Route>> = HashMap::new();
    let mut failures = 0;
    while !ctx.h.stop.is_cancelled() {
        inner.health.writable().await;
        let asked = std::time::Instant::now();
        let unit = match inner.store.lease_unit(&ctx.batch_id, &inner.node, inner.cfg.engine.lease_ttl).await {
            Ok(Some(u)) => {
                inner.leases.leased(u.key(), asked, inner.cfg.engine.lease_ttl);
                u
            }
            Ok(None) => return Ok(()),
            Err(e) => {
                pause_or_fail(&ctx, Error::from(e).context("leasing a unit"), &mut failures).await?;
                continue;
            }
        };
        let token = hold(inner, &unit, &ctx.h);
        let span = tracing::info_span!("unit", batch_id = %ctx.batch_id, idx = unit.idx, lines = unit.line_count, epoch = unit.epoch);
        let fed = feed_unit(&ctx, &unit, &token, &mut routes).instrument(span).await;
        if !matches!(fed, Ok(true)) {
            inner.held.lock().unwrap_or_else(|p| p.into_inner()).remove(&unit.key());
        }
        match fed {
            Ok(_) => failures = 0,
            Err(e) => pause_or_fail(&ctx, e.context(&format!("feeding unit {}", unit.idx)), &mut failures).await?,
        }
    }
    Ok(())
}

/// Registers a freshly leased unit with the token that stops its feeding (a child of the
/// batch's stop token); a feeder still holding the same unit under an older lease stops.
fn hold(inner: &Inner, unit: &WorkUnit, h: &Active) -> CancellationToken {
    let token = h.stop.child_token();
    if let Some(old) = inner.held.lock().unwrap_or_else(|p| p.into_inner()).insert(unit.key(), token.clone()) {
        old.cancel();
    }
    token
}

/// Waits after a failed lease or unit: unavailability as long as it lasts, the unexpected a
/// few times; a permanent error (or too many) goes back to the runner.
async fn pause_or_fail(ctx: &RunCtx, e: Error, failures: &mut u32) -> Result<()> {
    match e {
        Error::Unavailable(_) => tracing::warn!(batch = %ctx.batch_id, error = %crate::Chain(&e), "{} is unavailable; feeding waits", e.outage()),
        Error::Retry(_) if *failures < FEEDER_RETRIES => {
            *failures += 1;
            tracing::warn!(batch = %ctx.batch_id, error = %crate::Chain(&e), "feeding failed; retrying");
        }
        e => return Err(e),
    }
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_secs(1)) => Ok(()),
        _ = ctx.h.stop.cancelled() => Ok(()),
    }
}

/// A line waiting for its slot, with what it needs to run once it has one.
struct Waiting {
    p: Prepared,
    route: Route,
    owned: LineGuard,
}

/// Feeds a unit: lines served by a batch-kind upstream go into remote batches, the others
/// online. The remote batches are driven by a task of the run (`remote::drive_unit`), which
/// holds the unit until they end — hours, at a hosted API — while the feeder moves on to the
/// next unit; `true` when such a task took the unit over.
async fn feed_unit(ctx: &Arc<RunCtx>, unit: &WorkUnit, token: &CancellationToken, routes: &mut HashMap<String, Option<Route>>) -> Result<bool> {
    let pending = ctx.source().pending(&*ctx.inner.store, unit).await?;
    let (remote, online) = remote::split(pending, |m| ctx.inner.router.resolve(m));
    let remote = !remote.is_empty() && {
        ctx.lines.spawn(remote::drive_unit(ctx.clone(), unit.clone(), token.clone(), remote));
        true
    };
    feed_online(ctx, online, token, routes).await?;
    Ok(remote)
}

async fn feed_online(ctx: &Arc<RunCtx>, pending: Vec<Prepared>, token: &CancellationToken, routes: &mut HashMap<String, Option<Route>>) -> Result<()> {
    let inner = &ctx.inner;
    let mut lines = pending.into_iter();
    let mut waiting = futures::stream::FuturesUnordered::new();
    let (mut turns, mut turns_open) = (ctx.turns.clone(), true);
    loop {
        let my_turns = turns.borrow_and_update().div_ceil(FEEDERS).max(1);
        while waiting.len() < my_turns && !token.is_cancelled() {
            let Some(p) = lines.next() else { break };
            let Some(owned) = inner.book.take(&ctx.batch_id, p.line) else { continue };
            let route = match routes.get(&p.model) {
                Some(r) => r.clone(),
                None => routes.entry(p.model.clone()).or_insert(inner.router.resolve(&p.model)).clone(),
            };
            let Some(route) = route else {
                let msg = format!("no upstream serves the model {:?} any more", p.model);
                owned.hand_to_writer();
                inner.writer.send(dispatch::error_record(&p, "model_not_found", &msg)).await;
                continue;
            };
            let w = Waiting { p, route, owned };
            let (ctx2, token2) = (ctx.clone(), token.clone());
            waiting.push(async move {
                // Passes at once unless MAX_QUEUED finished lines wait for the writer.
                drop(ctx2.queued.acquire().await);
                let slot = acquire_writable(&ctx2.inner, &w.route, w.p.est_tokens, &token2).await;
                (w, slot)
            });
        }
        let next = tokio::select! {
            n = futures::StreamExt::next(&mut waiting) => n,
            _ = token.cancelled() => return Ok(()),
            r = turns.changed(), if turns_open => {
                turns_open = r.is_ok();
                continue;
            }
        };
        let Some((w, slot)) = next else { return Ok(()) };
        let Some((pool, target, permit)) = slot else { return Ok(()) };
        let ctx2 = ctx.clone();
        let span = tracing::debug_span!("line", line = w.p.line);
        let task = async move {
            let run = dispatch::run_line(&ctx2.inner, &w.p, &w.route, pool, target, permit, &ctx2.h.cancelled);
            let rec = tokio::select! {
                r = run => match r {
                    Some(r) => r,
                    None => return,
                },
                _ = ctx2.h.abort.cancelled() => return,
            };
            w.owned.hand_to_writer();
            let _waiting = ctx2.queued.acquire().await;
            ctx2.inner.writer.send(rec).await;
        };
        ctx.lines.spawn(task.instrument(span));
    }
}

/// A slot on a pool serving `route`, taken while the store takes writes (the gate may close
/// while a feeder waits for the slot); `None` when `stop` fires first.
pub(super) async fn acquire_writable(
    inner: &Inner,
    route: &Route,
    est_tokens: u64,
    stop: &CancellationToken,
) -> Option<(Arc<crate::upstream::Pool>, Arc<str>, crate::upstream::Permit)> {
    loop {
        let got = tokio::select! {
            got = route.acquire(est_tokens, None) => got,
            _ = stop.cancelled() => return None,
        };
        if inner.health.is_writable() {
            return Some(got);
        }
        drop(got);
        tokio::select! {
            _ = inner.health.writable() => {}
            _ = stop.cancelled() => return None,
        }
    }
}

impl RunCtx {
    pub fn source(&self) -> Source<'_> {
        Source { blob: &self.inner.blob, input_key: &self.blob_key, format: self.format, batch_id: &self.batch_id, path: &self.path }
    }
}

/// Where a batch's lines are read from, and how they are prepared.
pub(super) struct Source<'a> {
    pub blob: &'a crate::blob::Blob,
    pub input_key: &'a str,
    pub format: InputFormat,
    pub batch_id: &'a BatchId,
    pub path: &'a Arc<str>,
}

/// Nearby lines of an ordered unit are read together when at most this many bytes lie
/// between them ...
const READ_GAP: u64 = 16 << 10;
/// ... and one read stays below this.
const MAX_READ: u64 = 1 << 20;
/// Ranged reads of one ordered unit in flight at once (an object store answers each in
/// tens of milliseconds; a local file at once).
const READS_IN_FLIGHT: usize = 8;

impl Source<'_> {
    /// The unit's request lines that have no durable result yet, in dispatch order.
    pub async fn pending(&self, store: &dyn crate::store::Store, unit: &WorkUnit) -> Result<Vec<Prepared>> {
        if unit.ordered {
            return self.pending_listed(store, unit).await;
        }
        let done: HashSet<u64> = store.done_lines(self.batch_id, unit).await.ctx("reading the unit's finished lines")?.into_iter().collect();
        Ok(self.unit_lines(unit).await?.into_iter().filter(|p| !done.contains(&p.line)).collect())
    }

    /// Reads a file-order unit's bytes and prepares its request lines (blank lines skipped).
    async fn unit_lines(&self, unit: &WorkUnit) -> Result<Vec<Prepared>> {
        let bytes = self.blob.get_range(self.input_key, unit.byte_offset..unit.byte_offset + unit.byte_len).await.ctx("reading the input file")?;
        let mut out = Vec::with_capacity(unit.line_count as usize);
        let mut splitter = LineSplitter::new(usize::MAX, unit.first_line, 0);
        let mut spans = Vec::with_capacity(unit.line_count as usize);
        let mut keep = |l: super::lines::RawLine<'_>| {
            if !l.is_blank() {
                spans.push((l.no, l.offset as usize, l.bytes.len()));
            }
        };
        splitter.feed(&bytes, &mut keep);
        splitter.finish(&mut keep);
        for (no, off, len) in spans {
            out.push(self.prepare(bytes.slice(off..off + len), no, unit));
        }
        Ok(out)
    }

    /// An ordered unit: its entries from the order file, those not yet durable, then their
    /// lines by ranged reads of the input (nearby ones together), in the order's order.
    async fn pending_listed(&self, store: &dyn crate::store::Store, unit: &WorkUnit) -> Result<Vec<Prepared>> {
        let key = order::order_key(self.batch_id);
        let records = self.blob.get_range(&key, unit.byte_offset..unit.byte_offset + unit.byte_len).await.ctx("reading the dispatch order")?;
        let mut entries = Entry::parse_all(&records);
        let lines: Vec<u64> = entries.iter().map(|e| e.line).collect();
        let done: HashSet<u64> = store.done_among(self.batch_id, &lines).await.ctx("reading the unit's finished lines")?.into_iter().collect();
        entries.retain(|e| !done.contains(&e.line));
        let spans = order::spans(&entries, READ_GAP, MAX_READ);
        // Collected first: a lazy map over `spans` would make the future not `Send` enough.
        let reads: Vec<_> = spans.iter().map(|(range, _)| self.blob.get_range(self.input_key, range.clone())).collect();
        let chunks: Vec<Bytes> = futures::stream::iter(reads).buffered(READS_IN_FLIGHT).try_collect().await.ctx("reading the input file")?;
        let mut lines: Vec<Option<Bytes>> = vec![None; entries.len()];
        for ((range, members), chunk) in spans.iter().zip(chunks) {
            for &i in members {
                let at = (entries[i].offset - range.start) as usize;
                lines[i] = Some(chunk.slice(at..at + entries[i].len as usize));
            }
        }
        Ok(entries.iter().zip(lines).map(|(e, line)| self.prepare(line.expect("every entry is in a span"), e.line, unit)).collect())
    }

    fn prepare(&self, line: Bytes, no: u64, unit: &WorkUnit) -> Prepared {
        let epoch = (unit.epoch > 0).then_some(unit.epoch);
        prepare(line, no, unit.idx, epoch, self.format, self.batch_id, self.path)
    }

    /// Line `no` read outside any unit (a retry's copy).
    pub fn prepare_line(&self, line: Bytes, no: u64) -> Prepared {
        prepare(line, no, 0, None, self.format, self.batch_id, self.path)
    }
}

fn prepare(line: Bytes, no: u64, unit_idx: i64, epoch: Option<i64>, format: InputFormat, batch_id: &BatchId, path: &Arc<str>) -> Prepared {
    let mut p = Prepared {
        batch_id: batch_id.clone(),
        line: no,
        unit_idx,
        epoch,
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
