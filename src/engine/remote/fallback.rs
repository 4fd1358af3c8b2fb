//! The lines a remote could not finish in the user's window, sent online instead: when a
//! batch upstream names a `fallback` (an online upstream serving the same models), a unit's
//! lines that a remote batch left unfinished because it expired, or because it was cut short
//! when [at risk](Driver::at_risk) (cancelled at the remote, what it finished kept), or that
//! the window leaves no room for another remote round, run there line by line (the same
//! `run_line` as any online line: retries, limits, cancel), at full price. No line is paid
//! twice but one that failed at the remote. They are then recorded as a
//! remote-batch record with status [`RemoteBatch::ONLINE_FALLBACK`] and the tokens they
//! used, which the batch's cost prices without the batch discount.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::super::dispatch::{self, Prepared};
use super::super::error::{Context, Result};
use super::super::feeder::acquire_writable;
use super::{Driver, FOLLOW_UP_MARGIN_S, POLL_CAP};
use crate::store::{RemoteBatch, RemoteState};
use crate::upstream::remote::RemoteStatus;
use crate::upstream::{Pool, Route};

/// Whether the unit's remote batches include one that ended before all its lines ran
/// (`expired`, or `cancelled` while the batch runs on: cut short when at risk), or a
/// fallback already ran some: the rest is for the fallback.
pub(super) fn cut_short(rows: &[RemoteBatch]) -> bool {
    rows.iter().any(|r| matches!(r.remote_status.as_deref(), Some("expired" | "cancelled" | RemoteBatch::ONLINE_FALLBACK)))
}

/// Whether a remote batch started at `started`, `done` of its `total` lines finished at
/// `now`, cannot finish before `expires_at` (less a margin for the fallback to take over) at
/// the pace it has shown: its projected finish (its elapsed time per finished line, times the
/// lines left) is past the window; with none finished yet, it has already taken as long as
/// is left.
fn behind(started: i64, now: i64, expires_at: i64, total: u64, done: u64) -> bool {
    if done >= total {
        return false;
    }
    let (elapsed, left) = ((now - started).max(0), expires_at - FOLLOW_UP_MARGIN_S - now);
    if left <= 0 {
        return true;
    }
    if done == 0 {
        return elapsed >= left;
    }
    elapsed as f64 * (total - done) as f64 / done as f64 > left as f64
}

impl Driver<'_> {
    /// Whether the remote batch `row`, at `st`, is at risk of not finishing in the batch's
    /// window ([`behind`]) while its upstream has a `fallback` to take the rest.
    pub(super) fn at_risk(&self, row: &RemoteBatch, st: &RemoteStatus) -> bool {
        let Some(expires_at) = self.expires_at else { return false };
        if self.pool(&row.upstream).is_none_or(|p| p.cfg.remote.fallback.is_none()) {
            return false;
        }
        behind(row.created_at, crate::now_unix(), expires_at, row.line_count.max(0) as u64, st.completed + st.failed)
    }

    /// The longest wait between two polls of `row`: with a fallback and a window, a quarter
    /// of what is left of it (at least `first`), so the risk is seen in time.
    pub(super) fn poll_cap(&self, row: &RemoteBatch, first: Duration) -> Duration {
        let fallback = self.pool(&row.upstream).is_some_and(|p| p.cfg.remote.fallback.is_some());
        match self.expires_at {
            Some(t) if fallback => Duration::from_secs(((t - crate::now_unix()).max(0) / 4) as u64).clamp(first, POLL_CAP.max(first)),
            _ => POLL_CAP,
        }
    }

    /// The fallback route of `line`: its batch upstream's `fallback` pool, serving its model.
    fn fallback_route(&self, p: &Prepared) -> Option<(Arc<Pool>, Route)> {
        let (pool, _) = self.target(p.line)?;
        let name = pool.cfg.remote.fallback.as_deref()?;
        let route = self.ctx.inner.router.resolve(&p.model)?;
        let (fb, target) = route.targets.into_iter().find(|(fb, _)| fb.cfg.name == name)?;
        Some((fb.clone(), Route { targets: vec![(fb, target)] }))
    }

    /// Whether any of `lines` has a fallback to go to.
    pub(super) fn has_fallback(&self, lines: &[u64]) -> bool {
        lines.iter().filter_map(|l| self.target(*l)).any(|(pool, _)| pool.cfg.remote.fallback.is_some())
    }

    /// Runs `lines` online at their fallback; returns those without one (their failure
    /// stands). `known` is how many remote-batch records the unit has (the record's key is
    /// `…-f<n>`, apart from the remote batches' `…-<n>`).
    pub(super) async fn fall_back(&self, lines: &[u64], known: usize) -> Result<Vec<u64>> {
        let prepared = self.prepared(lines).await?;
        let mut groups: BTreeMap<String, Vec<(&Prepared, Route)>> = BTreeMap::new();
        let mut rest = Vec::new();
        for l in lines {
            match prepared.get(l).map(|p| (p, self.fallback_route(p))) {
                Some((p, Some((pool, route)))) => groups.entry(pool.cfg.name.clone()).or_default().push((p, route)),
                Some((_, None)) => rest.push(*l),
                None => {}
            }
        }
        for (i, (name, items)) in groups.into_iter().enumerate() {
            tracing::info!(upstream = %name, lines = items.len(), "the remote cannot finish these lines in time; they run online at the fallback, at full price");
            let key = format!("{}-u{}-f{}", self.ctx.batch_id, self.unit.idx, known + i);
            let line_numbers: Vec<u64> = items.iter().map(|(p, _)| p.line).collect();
            self.begin(&key, &name, &items[0].1.targets[0].1, &line_numbers).await?;
            let runs = items.iter().map(|(p, route)| self.run_counted(&key, p, route));
            for r in futures::future::join_all(runs).await {
                r?;
            }
            self.ctx.inner.writer.flush().await;
            let store = &self.ctx.inner.store;
            store.update_remote(&key, RemoteState::Collected, None, None, None, crate::now_unix()).await.ctx("recording lines run at a fallback")?;
        }
        Ok(rest)
    }

    /// One line at the fallback: its tokens are added to the record `key` as its answer
    /// comes, before its result is written (a crash in between runs it again, and it is paid
    /// again: the record counts what the fallback billed).
    async fn run_counted(&self, key: &str, p: &Prepared, route: &Route) -> Result<()> {
        let Some(r) = self.run_online(p, route).await else { return Ok(()) };
        let store = &self.ctx.inner.store;
        store.add_remote_usage(key, r.usage.input_tokens.max(0), r.usage.output_tokens.max(0)).await.ctx("counting a line run at a fallback")?;
        self.ctx.inner.writer.send(r).await;
        Ok(())
    }

    /// Closes the records of fallback runs a crash or a stop interrupted: what they counted
    /// stands, and their lines with no result are the fallback's again.
    pub(super) async fn close_interrupted(&self, rows: &[RemoteBatch]) -> Result<()> {
        let open = rows.iter().filter(|r| r.remote_status.as_deref() == Some(RemoteBatch::ONLINE_FALLBACK) && r.state() != RemoteState::Collected);
        for r in open {
            let store = &self.ctx.inner.store;
            store.update_remote(&r.key, RemoteState::Collected, None, None, None, crate::now_unix()).await.ctx("closing an interrupted fallback record")?;
        }
        Ok(())
    }

    /// One line through the fallback route, as the feeder runs an online line; `None` when
    /// the batch stops first.
    async fn run_online(&self, p: &Prepared, route: &Route) -> Option<crate::store::ResultRecord> {
        let inner = &self.ctx.inner;
        let (pool, target, permit) = acquire_writable(inner, route, p.est_tokens, self.token).await?;
        tokio::select! {
            r = dispatch::run_line(inner, p, route, pool, target, permit, &self.ctx.h.cancelled) => r,
            _ = self.ctx.h.abort.cancelled() => None,
        }
    }

    /// The record of lines about to run at a fallback, written before the first runs (with
    /// the fallback's status: it is never driven as a remote batch); tokens are added as
    /// their answers come.
    async fn begin(&self, key: &str, upstream: &str, model: &str, lines: &[u64]) -> Result<()> {
        let now = crate::now_unix();
        let row = RemoteBatch {
            key: key.to_string(),
            batch_id: self.ctx.batch_id.clone(),
            unit_idx: self.unit.idx,
            upstream: upstream.to_string(),
            model: model.to_string(),
            lines: RemoteBatch::join_lines(lines),
            line_count: lines.len() as i64,
            est_tokens: 0,
            state: RemoteState::Planned.as_str().into(),
            input_file_id: None,
            remote_id: None,
            remote_status: Some(RemoteBatch::ONLINE_FALLBACK.into()),
            created_at: now,
            updated_at: now,
            input_tokens: 0,
            output_tokens: 0,
        };
        self.ctx.inner.store.plan_remote(&row).await.ctx("recording lines run at a fallback")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::behind;

    #[test]
    fn a_remote_is_behind_when_its_pace_misses_the_window() {
        // 100 lines, 10 done in 10 s: 90 s more, 60 s left.
        assert!(behind(0, 10, 72, 100, 10));
        // 50 done in 10 s: 10 s more, 60 s left.
        assert!(!behind(0, 10, 72, 100, 50));
        // Nothing done yet: behind once it took as long as is left.
        assert!(!behind(0, 5, 20, 100, 0));
        assert!(behind(0, 10, 20, 100, 0));
        // Done, or no window left.
        assert!(!behind(0, 100, 50, 10, 10));
        assert!(behind(0, 1, 2, 10, 9));
    }
}
