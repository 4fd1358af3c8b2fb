//! Remote batches: the lines of a unit routed to a batch-kind upstream (`kind =
//! "openai-batch"` or `"anthropic-batch"`) are not sent one by one but gathered into remote
//! batches at the hosted Batch API, followed there, and their results brought back into the
//! same result log as online answers (so progress, events, cancel, expiry and the output and
//! error files are the batch's own). Each line goes in the pool's API (translated as for an
//! online call, `Pool::outgoing`) and its answer comes back in the line's own
//! (`Pool::remote_answer_back`).
//!
//! A remote batch is a record of the store ([`RemoteBatch`]) that moves
//! `planned → uploaded → created → collected`, each state written before the next step's side
//! effect:
//! - `planned`: its lines are chosen ([`shard`]: one model, within `max_lines`/`max_bytes`);
//! - `uploaded`: its input file is at the remote (its id recorded; an API that takes the
//!   requests inline skips this state);
//! - `created`: the remote created it for the record's key (an `Idempotency-Key` and a
//!   metadata tag where the API has them; every request's custom_id carries the key's tag).
//!   The moment of each create is recorded just before it. A restart that finds a record not
//!   yet `created` first asks the remote for a batch created for it then
//!   ([`BatchApi::find_created`](crate::upstream::remote::BatchApi::find_created), told which
//!   remote ids the store already knows) and adopts the one a crash left unrecorded instead
//!   of creating it again;
//! - `collected`: it ended at the remote and its results are durable here ([`collect`]).
//!
//! A unit's lines are driven in rounds: each round records remote batches for the lines with
//! neither a durable result nor an open remote batch, then follows every open one to its
//! end. Lines that failed there in a way another try may fix (429, 5xx, `batch_expired`)
//! get no result, so the next round puts them into a follow-up remote batch, while the
//! batch's window allows and at most [`MAX_ROUNDS`] times. Everything is derived from the
//! store, so a restart at any instant resumes without a duplicate remote batch.
//!
//! A cancel cancels the open remote batches and keeps what they finished; a shutdown or a
//! lost lease leaves them running at the remote for whoever resumes the unit. A remote's
//! refusal for too many enqueued tokens is learned and respected (`TokenQueue`).

mod collect;
mod fallback;
mod shard;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::dispatch::{self, Prepared};
use super::error::{Context, Error, Result};
use super::feeder::RunCtx;
use crate::store::{RemoteBatch, RemoteState, WorkUnit};
use crate::upstream::remote::{self, Input, Lookup, RemoteError, RemoteLine, RemoteRequest, RemoteStatus, RemoteUpstream, CLOCK_SLACK_S};
use crate::upstream::{Pool, Route};

/// Rounds of follow-up remote batches a unit's lines get before their failure stands.
pub const MAX_ROUNDS: u32 = 4;
/// Longest wait between two polls of a remote batch (or two tries of a failed call).
const POLL_CAP: Duration = Duration::from_secs(60);
/// A follow-up is planned only when this much of the window is left.
const FOLLOW_UP_MARGIN_S: i64 = 2;
/// The test-only failpoint: with `BATCHD_FAILPOINT=remote-created-unrecorded` the process
/// kills itself (SIGKILL) right after a remote create answered and before it is recorded.
const FAILPOINT_ENV: &str = "BATCHD_FAILPOINT";

/// What a reconciliation found.
enum Reconciled {
    /// The remote batch a crash left unrecorded, recorded now.
    Adopted(Box<RemoteStatus>),
    /// None: the record's batch was never created.
    Absent,
    /// The unit stops here before it could tell.
    Stopped,
}

/// A reconciliation's step that failed: reading the known remote ids, or the remote.
#[derive(Debug, thiserror::Error)]
enum FindError {
    #[error("reading the recorded remote batches failed")]
    Store(#[source] crate::store::Error),
    #[error(transparent)]
    Remote(RemoteError),
}

/// The lines a remote batch counts done, in [`EngineStats::remote_done`](super::EngineStats)
/// while it is open (progress fed by the remote's counts), taken out again when dropped: once
/// its results are durable (they count then as the batch's own), or the unit leaves it.
struct SeenDone<'a> {
    stat: &'a std::sync::atomic::AtomicU64,
    n: u64,
}

impl SeenDone<'_> {
    fn see(&mut self, st: &RemoteStatus) {
        let now = st.completed + st.failed;
        if now > self.n {
            super::count(self.stat, now - self.n);
            self.n = now;
        }
    }
}

impl Drop for SeenDone<'_> {
    fn drop(&mut self) {
        let _ = self.stat.fetch_update(std::sync::atomic::Ordering::Relaxed, std::sync::atomic::Ordering::Relaxed, |v| Some(v.saturating_sub(self.n)));
    }
}

/// A pool and the model id it expects.
type Target = (Arc<Pool>, Arc<str>);

/// What a unit's driver keeps of a line between steps: a few numbers. Its bytes are read
/// again from the input when a remote batch is uploaded or collected, so a unit waiting hours
/// on a remote holds no line in memory.
struct Meta {
    /// Index into [`RemoteLines::targets`].
    target: usize,
    est_tokens: u64,
    bytes: u64,
}

/// A unit's lines bound for remote batches.
#[derive(Default)]
pub struct RemoteLines {
    targets: Vec<Target>,
    lines: HashMap<u64, Meta>,
}

impl RemoteLines {
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }
}

/// Takes out of `lines` those whose model a batch-kind upstream serves (the first such
/// target of the route).
pub fn split(lines: Vec<Prepared>, route_of: impl Fn(&str) -> Option<Route>) -> (RemoteLines, Vec<Prepared>) {
    let mut remote = RemoteLines::default();
    let mut online = Vec::with_capacity(lines.len());
    let mut cache: HashMap<String, Option<usize>> = HashMap::new();
    for p in lines {
        let target = *cache.entry(p.model.clone()).or_insert_with(|| {
            let t = route_of(&p.model).and_then(|r| r.targets.into_iter().find(|(pool, _)| pool.remote.is_some()))?;
            remote.targets.push(t);
            Some(remote.targets.len() - 1)
        });
        match target {
            Some(target) => {
                remote.lines.insert(p.line, Meta { target, est_tokens: p.est_tokens, bytes: p.body.len() as u64 + 96 });
            }
            None => online.push(p),
        }
    }
    (remote, online)
}

/// How the driver of a unit should behave now.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Run,
    /// The user cancelled: cancel the remote batches, keep what they finished.
    Cancel,
    /// Shutdown, expiry or a lost lease: leave them to whoever resumes the unit.
    Leave,
}

struct Driver<'a> {
    ctx: &'a Arc<RunCtx>,
    unit: &'a WorkUnit,
    token: &'a CancellationToken,
    lines: HashMap<u64, Meta>,
    targets: Vec<Target>,
    expires_at: Option<i64>,
}

/// Unexpected failures a unit's driver retries before its error ends the run.
const DRIVER_RETRIES: u32 = 3;

/// Drives a unit's remote lines until each has a durable result (or the unit stops here),
/// then hands the unit back to the feeders' bookkeeping. It waits out an unavailable store,
/// retries the unexpected a few times; an error it cannot get past stops the batch's run,
/// which ends with it.
pub async fn drive_unit(ctx: Arc<RunCtx>, unit: WorkUnit, token: CancellationToken, lines: RemoteLines) {
    let span = tracing::info_span!("remote", batch_id = %ctx.batch_id, idx = unit.idx, lines = lines.lines.len());
    let r = run_unit(&ctx, &unit, &token, lines).instrument(span).await;
    ctx.inner.held.lock().unwrap_or_else(|p| p.into_inner()).remove(&unit.key());
    if let Err(e) = r {
        tracing::warn!(batch = %ctx.batch_id, unit = unit.idx, error = %crate::Chain(&e), "a unit's remote batches failed");
        ctx.failed.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e.context(&format!("driving unit {}'s remote batches", unit.idx)));
        ctx.h.stop.cancel();
    }
}

async fn run_unit(ctx: &Arc<RunCtx>, unit: &WorkUnit, token: &CancellationToken, lines: RemoteLines) -> Result<()> {
    let mut failures = 0;
    let b = loop {
        match ctx.inner.store.get_batch(None, &ctx.batch_id).await {
            Ok(b) => break b,
            Err(e) if e.is_transient() && !token.is_cancelled() => tokio::time::sleep(Duration::from_secs(1)).await,
            Err(e) => return Err(Error::from(e).context("reading the batch")),
        }
    };
    let d = Driver { ctx, unit, token, lines: lines.lines, targets: lines.targets, expires_at: b.expires_at };
    loop {
        match d.run().await {
            Ok(()) => return Ok(()),
            Err(e @ Error::Unavailable(_)) => tracing::warn!(error = %crate::Chain(&e), "{} is unavailable; remote batches wait", e.outage()),
            Err(e @ Error::Retry(_)) if failures < DRIVER_RETRIES => {
                failures += 1;
                tracing::warn!(error = %crate::Chain(&e), "driving remote batches failed; retrying");
            }
            Err(e) => return Err(e),
        }
        let mut wait = Duration::from_secs(1);
        if !d.pause(&mut wait).await {
            return Ok(());
        }
    }
}

impl Driver<'_> {
    fn target(&self, line: u64) -> Option<&Target> {
        self.lines.get(&line).map(|m| &self.targets[m.target])
    }

    /// The unit's lines among `wanted` that have no durable result yet, read again.
    async fn prepared(&self, wanted: &[u64]) -> Result<HashMap<u64, Prepared>> {
        let wanted: HashSet<u64> = wanted.iter().copied().collect();
        let pending = self.ctx.source().pending(&*self.ctx.inner.store, self.unit).await?;
        Ok(pending.into_iter().filter(|p| wanted.contains(&p.line)).map(|p| (p.line, p)).collect())
    }

    fn mode(&self) -> Mode {
        if self.ctx.h.cancelled.is_cancelled() {
            Mode::Cancel
        } else if self.token.is_cancelled() || self.ctx.h.abort.is_cancelled() {
            Mode::Leave
        } else {
            Mode::Run
        }
    }

    async fn run(&self) -> Result<()> {
        let (store, batch_id) = (&self.ctx.inner.store, &self.ctx.batch_id);
        let mut failures: HashMap<u64, crate::store::ResultRecord> = HashMap::new();
        let all: Vec<u64> = self.lines.keys().copied().collect();
        for round in 0.. {
            if self.mode() == Mode::Leave {
                return Ok(());
            }
            let rows = store.remote_batches(batch_id, Some(self.unit.idx)).await.ctx("reading the unit's remote batches")?;
            self.close_interrupted(&rows).await?;
            let done: HashSet<u64> = store.done_among(batch_id, &all).await.ctx("reading the unit's finished lines")?.into_iter().collect();
            let open: Vec<RemoteBatch> = rows
                .iter()
                .filter(|r| r.state() != RemoteState::Collected && r.remote_status.as_deref() != Some(RemoteBatch::ONLINE_FALLBACK))
                .cloned()
                .collect();
            let covered: HashSet<u64> = open.iter().flat_map(RemoteBatch::line_numbers).collect();
            let mut fresh: Vec<u64> = all.iter().copied().filter(|l| !done.contains(l) && !covered.contains(l)).collect();
            fresh.sort_unstable();
            let mut planned = Vec::new();
            if !fresh.is_empty() && self.mode() == Mode::Run {
                let in_time = round < MAX_ROUNDS && self.window_allows();
                if (fallback::cut_short(&rows) || !in_time) && self.has_fallback(&fresh) {
                    fresh = self.fall_back(&fresh, rows.len()).await?;
                }
                if !fresh.is_empty() && in_time {
                    planned = self.plan(rows.len(), &fresh).await?;
                } else if !fresh.is_empty() {
                    self.give_up(&fresh, &mut failures).await?;
                }
            }
            if open.is_empty() && planned.is_empty() {
                return Ok(());
            }
            let drives = open.into_iter().map(|r| (r, false)).chain(planned.into_iter().map(|r| (r, true))).map(|(r, fresh)| self.drive(r, fresh));
            for got in futures::future::join_all(drives).await {
                failures.extend(got?);
            }
        }
        Ok(())
    }

    fn window_allows(&self) -> bool {
        self.expires_at.is_none_or(|t| crate::now_unix() + FOLLOW_UP_MARGIN_S < t)
    }

    /// Lines out of rounds or out of time: their last failure stands.
    async fn give_up(&self, lines: &[u64], failures: &mut HashMap<u64, crate::store::ResultRecord>) -> Result<()> {
        let prepared = self.prepared(lines).await?;
        for l in lines {
            let rec = match (failures.remove(l), prepared.get(l)) {
                (Some(rec), _) => rec,
                (None, Some(p)) => dispatch::error_record(p, "remote_retries_exhausted", "no remote batch could run this line"),
                (None, None) => continue,
            };
            self.ctx.inner.writer.send(rec).await;
        }
        self.ctx.inner.writer.flush().await;
        Ok(())
    }

    /// Records remote batches for `fresh` lines (keys numbered after the unit's `known` ones).
    async fn plan(&self, known: usize, fresh: &[u64]) -> Result<Vec<RemoteBatch>> {
        let items: Vec<shard::Item<'_>> = fresh
            .iter()
            .filter_map(|l| self.lines.get(l).map(|m| (l, m)))
            .map(|(l, m)| {
                let (pool, target) = &self.targets[m.target];
                shard::Item { line: *l, upstream: &pool.cfg.name, model: target, bytes: m.bytes }
            })
            .collect();
        let limits = |l: &u64| self.target(*l).map(|(pool, _)| (pool.cfg.remote.max_lines, pool.cfg.remote.max_bytes));
        let (max_lines, max_bytes) = fresh.first().and_then(limits).unwrap_or((u64::MAX, u64::MAX));
        let mut out = Vec::new();
        let now = crate::now_unix();
        for (i, lines) in shard::shards(&items, max_lines, max_bytes).into_iter().enumerate() {
            let (pool, target) = &self.targets[self.lines[&lines[0]].target];
            let row = RemoteBatch {
                key: format!("{}-u{}-{}", self.ctx.batch_id, self.unit.idx, known + i),
                batch_id: self.ctx.batch_id.clone(),
                unit_idx: self.unit.idx,
                upstream: pool.cfg.name.clone(),
                model: target.to_string(),
                lines: RemoteBatch::join_lines(&lines),
                line_count: lines.len() as i64,
                est_tokens: lines.iter().map(|l| self.lines[l].est_tokens).sum::<u64>().min(i64::MAX as u64) as i64,
                state: RemoteState::Planned.as_str().into(),
                input_file_id: None,
                remote_id: None,
                remote_status: None,
                created_at: now,
                updated_at: now,
                input_tokens: 0,
                output_tokens: 0,
            };
            self.ctx.inner.store.plan_remote(&row).await.ctx("recording a remote batch")?;
            out.push(row);
        }
        Ok(out)
    }

    /// Follows one remote batch from its recorded state to its results; returns the lines
    /// worth a follow-up, with the failure each ends in otherwise.
    async fn drive(&self, row: RemoteBatch, fresh: bool) -> Result<HashMap<u64, crate::store::ResultRecord>> {
        let Some(up) = self.upstream(&row.upstream) else {
            return Err(Error::permanent("upstream_gone", format!("upstream {:?} of remote batch {} is no longer a batch upstream", row.upstream, row.key)));
        };
        let st = match row.state() {
            RemoteState::Collected => return Ok(HashMap::new()),
            RemoteState::Created => match &row.remote_id {
                Some(id) => match self.call(|| up.api.get(id)).await {
                    Some(st) => st,
                    None => return Ok(HashMap::new()),
                },
                None => return Err(Error::permanent("corrupt_state", format!("remote batch {} is recorded created without an id", row.key))),
            },
            RemoteState::Planned | RemoteState::Uploaded => match self.start(&up, &row, fresh).await? {
                Some(st) => st,
                None => return Ok(HashMap::new()),
            },
        };
        let mut seen = SeenDone { stat: &self.ctx.inner.stats.remote_done, n: 0 };
        let Some(st) = self.follow(&up, &row, st, &mut seen).await else { return Ok(HashMap::new()) };
        up.queue.release(row.est_tokens as u64);
        self.bring_back(&up, &row, st).await
    }

    fn pool(&self, name: &str) -> Option<&Arc<Pool>> {
        self.ctx.inner.router.pools().iter().find(|p| p.cfg.name == name)
    }

    fn upstream(&self, name: &str) -> Option<RemoteUpstream> {
        self.pool(name).and_then(|p| p.remote.clone())
    }

    /// A remote batch not known to be created: adopted when the remote holds one created for
    /// it (a crash came between the create and its record), else (uploaded and) created.
    async fn start(&self, up: &RemoteUpstream, row: &RemoteBatch, fresh: bool) -> Result<Option<RemoteStatus>> {
        let store = &self.ctx.inner.store;
        if !fresh {
            match self.reconcile(up, row, row.updated_at).await? {
                Reconciled::Adopted(st) => return Ok(Some(*st)),
                Reconciled::Stopped => return Ok(None),
                Reconciled::Absent => {}
            }
        }
        if self.mode() != Mode::Run {
            // Never created, and no longer wanted: its lines end with the batch.
            store.update_remote(&row.key, RemoteState::Collected, None, None, Some("not_created"), crate::now_unix()).await.ctx("recording a remote batch")?;
            return Ok(None);
        }
        let requests = self.requests(row).await?;
        if requests.is_empty() {
            // Every line failed before it could be sent (its error is recorded): nothing to create.
            store.update_remote(&row.key, RemoteState::Collected, None, None, Some("empty"), crate::now_unix()).await.ctx("recording a remote batch")?;
            return Ok(None);
        }
        let endpoint = format!("/v1{}", requests[0].path);
        if !up.api.uploads() {
            return self.create(up, row, RemoteState::Planned, Input::Inline(&requests), &endpoint).await;
        }
        let file_id = match &row.input_file_id {
            Some(id) => id.clone(),
            None => {
                let name = format!("{}.jsonl", row.key);
                let Some(id) = self.call(|| up.api.upload(&name, &requests)).await else { return Ok(None) };
                store.update_remote(&row.key, RemoteState::Uploaded, Some(&id), None, None, crate::now_unix()).await.ctx("recording a remote upload")?;
                id
            }
        };
        self.create(up, row, RemoteState::Uploaded, Input::File(&file_id), &endpoint).await
    }

    /// Looks at the remote for a batch created for `row` from `since` (the moment it was
    /// about to be created) on, and adopts (records) the one found.
    async fn reconcile(&self, up: &RemoteUpstream, row: &RemoteBatch, since: i64) -> Result<Reconciled> {
        let store = &self.ctx.inner.store;
        let until = since + self.pool(&row.upstream).map_or(600, |p| p.cfg.timeout.as_secs() as i64);
        let find = || async {
            let known: HashSet<String> = store.remote_ids(&row.upstream, since - 2 * CLOCK_SLACK_S).await.map_err(FindError::Store)?.into_iter().collect();
            up.api.find_created(Lookup { key: &row.key, since, until, known: &known }).await.map_err(FindError::Remote)
        };
        let Some(found) = self.call(find).await else { return Ok(Reconciled::Stopped) };
        let Some(st) = found else { return Ok(Reconciled::Absent) };
        tracing::info!(key = %row.key, remote = %st.id, "adopted a remote batch created before a restart or a lost answer");
        store.update_remote(&row.key, RemoteState::Created, None, Some(&st.id), Some(&st.status), crate::now_unix()).await.ctx("recording a remote batch")?;
        Ok(Reconciled::Adopted(Box::new(st)))
    }

    /// The remote batch's requests: each line with its stable custom_id (the shard's tag and
    /// the line number), its body as the pool sends it (aliases resolved, translated into the
    /// pool's API). Lines the pool cannot be sent get their error here.
    async fn requests(&self, row: &RemoteBatch) -> Result<Vec<RemoteRequest>> {
        let mut out = Vec::new();
        let lines = row.line_numbers();
        let prepared = self.prepared(&lines).await?;
        for l in lines {
            let (Some(p), Some((pool, target))) = (prepared.get(&l), self.target(l)) else { continue };
            match pool.outgoing(&p.path, &p.body, &p.model, target) {
                Ok(o) => out.push(RemoteRequest { custom_id: remote::custom_id(&row.key, l), path: o.path.to_string(), body: o.body }),
                Err(refused) => {
                    let msg = format!("this /v1{} line cannot be sent to the batch upstream {:?}: {refused}", p.path, pool.cfg.name);
                    self.ctx.inner.writer.send(dispatch::error_record(p, refused.code(), &msg)).await;
                }
            }
        }
        self.ctx.inner.writer.flush().await;
        Ok(out)
    }

    /// Creates the remote batch within the learned token limit, then records it. `state` is
    /// the record's state until then; the moment of each try is recorded first, so that a
    /// reconciliation knows when to look.
    async fn create(&self, up: &RemoteUpstream, row: &RemoteBatch, state: RemoteState, input: Input<'_>, endpoint: &str) -> Result<Option<RemoteStatus>> {
        let store = &self.ctx.inner.store;
        let tokens = row.est_tokens as u64;
        let window = self.upstream_window(&row.upstream);
        let mut wait = Duration::from_millis(200);
        loop {
            tokio::select! {
                _ = up.queue.enqueue(tokens) => {}
                _ = self.stopped() => return Ok(None),
            }
            let tried = crate::now_unix();
            if let Err(e) = store.update_remote(&row.key, state, None, None, Some("creating"), tried).await {
                up.queue.release(tokens);
                return Err(Error::from(e).context("recording a remote create"));
            }
            match up.api.create(&row.key, input, endpoint, &window).await {
                Ok(st) => {
                    failpoint("remote-created-unrecorded");
                    store
                        .update_remote(&row.key, RemoteState::Created, None, Some(&st.id), Some(&st.status), crate::now_unix())
                        .await
                        .ctx("recording a remote batch")?;
                    tracing::info!(key = %row.key, remote = %st.id, lines = row.line_count, "remote batch created");
                    return Ok(Some(st));
                }
                Err(e) if e.is_token_limit() => up.queue.refused(tokens),
                Err(e) if e.is_retryable() => {
                    up.queue.release(tokens);
                    tracing::warn!(key = %row.key, error = %crate::Chain(&e), "creating a remote batch failed; trying again");
                    if !up.api.idempotent() {
                        // The create may have happened all the same: look before sending it again.
                        match self.reconcile(up, row, tried).await? {
                            Reconciled::Adopted(st) => return Ok(Some(*st)),
                            Reconciled::Stopped => return Ok(None),
                            Reconciled::Absent => {}
                        }
                    }
                }
                Err(e) => {
                    up.queue.release(tokens);
                    return Err(Error::Retry(Box::new(e)).context("creating a remote batch"));
                }
            }
            if !self.pause(&mut wait).await {
                return Ok(None);
            }
        }
    }

    fn upstream_window(&self, name: &str) -> String {
        self.pool(name).map_or_else(|| "24h".into(), |p| p.cfg.remote.completion_window.clone())
    }

    /// Polls until the remote batch ends (cancelling it at the remote on a user's cancel, or
    /// when it is [at risk](Self::at_risk) and a fallback can take its rest); `None` when
    /// this node leaves it to another run.
    async fn follow(&self, up: &RemoteUpstream, row: &RemoteBatch, mut st: RemoteStatus, seen: &mut SeenDone<'_>) -> Option<RemoteStatus> {
        let first = self.poll_interval(&row.upstream);
        let mut wait = first;
        let mut cancel_sent = false;
        loop {
            seen.see(&st);
            if st.is_final() {
                return Some(st);
            }
            let cut = match self.mode() {
                Mode::Leave => return None,
                Mode::Cancel => !cancel_sent,
                Mode::Run => !cancel_sent && self.at_risk(row, &st),
            };
            if cut {
                cancel_sent = true;
                if self.mode() == Mode::Run {
                    tracing::info!(key = %row.key, remote = %st.id, done = st.completed + st.failed, lines = row.line_count, "the remote cannot finish in the batch's window at its pace: cancelling it there, keeping what it finished; the rest goes to the fallback");
                }
                match up.api.cancel(&st.id).await {
                    Ok(s) => st = s,
                    Err(e) => tracing::warn!(remote = %st.id, error = %crate::Chain(&e), "cancelling a remote batch failed; polling on"),
                }
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.ctx.h.cancelled.cancelled(), if !cancel_sent => continue,
                _ = self.token.cancelled(), if self.mode() == Mode::Run => continue,
                _ = self.ctx.h.abort.cancelled() => {
                    self.cancel_at_expiry(up, &st.id).await;
                    return None;
                }
            }
            match up.api.get(&st.id).await {
                Ok(s) => {
                    st = s;
                    wait = (wait * 3 / 2).min(self.poll_cap(row, first));
                }
                Err(e) => {
                    tracing::warn!(remote = %st.id, error = %crate::Chain(&e), "polling a remote batch failed; backing off");
                    wait = (wait * 2).min(self.poll_cap(row, first));
                }
            }
        }
    }

    /// The batch expired here: its open remote batch is cancelled (best effort, briefly), so
    /// the remote stops working, and billing, for lines that end as `batch_expired`.
    async fn cancel_at_expiry(&self, up: &RemoteUpstream, id: &str) {
        if self.expires_at.is_none_or(|t| crate::now_unix() < t) {
            return;
        }
        match tokio::time::timeout(Duration::from_secs(5), up.api.cancel(id)).await {
            Ok(Ok(_)) => tracing::info!(remote = %id, "the batch expired; its remote batch is cancelled"),
            Ok(Err(e)) => tracing::warn!(remote = %id, error = %crate::Chain(&e), "the batch expired; cancelling its remote batch failed"),
            Err(_) => tracing::warn!(remote = %id, "the batch expired; cancelling its remote batch timed out"),
        }
    }

    fn poll_interval(&self, name: &str) -> Duration {
        self.pool(name).map_or(Duration::from_secs(5), |p| p.cfg.remote.poll_interval)
    }

    /// Downloads a final remote batch's results, records the final ones durably, then marks
    /// the remote batch collected.
    async fn bring_back(&self, up: &RemoteUpstream, row: &RemoteBatch, st: RemoteStatus) -> Result<HashMap<u64, crate::store::ResultRecord>> {
        let Some(got) = self.call(|| up.api.results(&st)).await else { return Ok(HashMap::new()) };
        let prepared = self.prepared(&row.line_numbers()).await?;
        let lines: HashMap<u64, &Prepared> = prepared.iter().map(|(l, p)| (*l, p)).collect();
        let got = got.into_iter().map(|rl| self.in_the_lines_api(rl, &lines)).collect();
        let c = collect::collect(&st, got, &lines, self.mode() == Mode::Cancel);
        if st.errors.iter().any(|(code, _)| code == "token_limit_exceeded") {
            up.queue.refused(0);
        }
        tracing::info!(key = %row.key, remote = %st.id, status = %st.status, results = c.results.len(), follow_up = c.retry.len(), "remote batch collected");
        // What the remote billed: every answer it gave, those followed up included.
        let (input, output) =
            c.results.iter().chain(c.retry.values()).fold((0i64, 0i64), |(i, o), r| (i + r.usage.input_tokens.max(0), o + r.usage.output_tokens.max(0)));
        for r in c.results {
            super::count(&self.ctx.inner.stats.output_tokens, r.usage.output_tokens.max(0) as u64);
            self.ctx.inner.writer.send(r).await;
        }
        self.ctx.inner.writer.flush().await;
        self.ctx.inner.store.collect_remote(&row.key, &st.status, input, output, crate::now_unix()).await.ctx("recording a remote batch")?;
        Ok(c.retry)
    }

    /// A remote line's answer translated back into the API its line was written in (a chat
    /// line sent to an Anthropic remote as Messages comes back a chat completion).
    fn in_the_lines_api(&self, mut rl: RemoteLine, lines: &HashMap<u64, &Prepared>) -> RemoteLine {
        let Some(n) = remote::line_of(&rl.custom_id) else { return rl };
        let (Some(p), Some((pool, _)), Some(status), Some(body)) = (lines.get(&n), self.target(n), rl.status_code, rl.body.take()) else { return rl };
        let (status, body) = pool.remote_answer_back(&p.path, status, Bytes::from(body), &p.request_id);
        rl.status_code = Some(status);
        rl.body = Some(String::from_utf8_lossy(&body).into_owned());
        rl
    }

    /// Calls the remote until it answers, backing off on failures; `None` once the unit stops
    /// here (shutdown, lost lease, expiry).
    async fn call<T, E, F, Fut>(&self, f: F) -> Option<T>
    where
        E: std::error::Error + 'static,
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        let mut wait = Duration::from_millis(200);
        loop {
            match f().await {
                Ok(v) => return Some(v),
                Err(e) => tracing::warn!(error = %crate::Chain(&e), "a call to the remote failed; backing off"),
            }
            if !self.pause(&mut wait).await {
                return None;
            }
        }
    }

    /// Sleeps `wait` (doubling it, up to [`POLL_CAP`]); `false` when the unit stops meanwhile.
    async fn pause(&self, wait: &mut Duration) -> bool {
        let w = *wait;
        *wait = (*wait * 2).min(POLL_CAP);
        tokio::select! {
            _ = tokio::time::sleep(w) => true,
            _ = self.stopped() => false,
        }
    }

    /// Resolves when the unit stops here for good (not on a cancel: that still collects).
    async fn stopped(&self) {
        tokio::select! {
            _ = self.ctx.h.abort.cancelled() => {}
            _ = async { self.token.cancelled().await; if self.ctx.h.cancelled.is_cancelled() { std::future::pending::<()>().await } } => {}
        }
    }
}

/// The test-only failpoint (see [`FAILPOINT_ENV`]): a real `kill -9` of this process at the
/// named spot.
fn failpoint(name: &str) {
    if std::env::var(FAILPOINT_ENV).is_ok_and(|v| v == name) {
        tracing::warn!(failpoint = name, "failpoint reached: killing this process");
        // SAFETY: kill(2) on our own pid; no memory is touched.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}
