//! The group commit of results: many answers in one transaction, counted once.
//!
//! A commit locks its batches' rows (in id order) and leaves out results of batches already
//! final; the dialect inserts the rest into the result log, telling which lines were new;
//! only those are added to their batch's counts and usage (saturating), their unit's
//! progress and the usage per model and hour; progress events come last (lock order); and
//! every leased unit's epoch and owner is checked against the committing node.

use std::collections::{BTreeMap, HashSet};

use super::outbox::progress_event;
use super::{Dialect, SqlStore, FINAL, MAX, ROWS_PER_STATEMENT};
use crate::store::*;

/// The usage columns of `batches` and `batch_usage`, in the order of [`usage_values`].
const USAGE_COLUMNS: [&str; 5] = ["input_tokens", "cached_tokens", "output_tokens", "reasoning_tokens", "total_tokens"];

/// A usage as column values, never negative.
fn usage_values(u: &Usage) -> [i64; 5] {
    [u.input_tokens, u.cached_tokens, u.output_tokens, u.reasoning_tokens, u.total_tokens].map(|v| v.max(0))
}

/// `col = col + $n`, saturating at the largest integer instead of failing (PostgreSQL) or
/// turning into a float (SQLite).
fn saturating_add(col: &str, n: usize) -> String {
    format!("{col} = CASE WHEN {col} > {MAX} - ${n} THEN {MAX} ELSE {col} + ${n} END")
}

/// Counts of newly inserted results, in key order (the lock order): per batch (ok, failed,
/// usage), per unit, per model.
#[derive(Default)]
struct Tally<'a> {
    batches: BTreeMap<&'a str, (i64, i64, Usage)>,
    units: BTreeMap<(&'a str, i64), i64>,
    models: BTreeMap<(&'a str, &'a str), (i64, Usage)>,
}

impl<'a> Tally<'a> {
    fn of(inserted: &[&'a ResultRecord]) -> Tally<'a> {
        let mut t = Tally::default();
        for r in inserted {
            let b = t.batches.entry(&r.batch_id).or_default();
            if r.ok {
                b.0 += 1
            } else {
                b.1 += 1
            }
            b.2.add(&r.usage);
            *t.units.entry((&r.batch_id, r.unit_idx)).or_default() += 1;
            let m = t.models.entry((&r.batch_id, &r.model)).or_default();
            m.0 += 1;
            m.1.add(&r.usage);
        }
        t
    }
}

/// Locks the rows of the batches `results` belong to, in id order, and leaves out the
/// results of batches already final (nothing may be added to them any more).
async fn lock_live<'a, D: Dialect>(conn: &mut D::Connection, results: &'a [ResultRecord]) -> Result<Vec<&'a ResultRecord>> {
    let ids: HashSet<&str> = results.iter().map(|r| r.batch_id.as_str()).collect();
    let mut ids: Vec<&str> = ids.into_iter().collect();
    ids.sort_unstable();
    let mut live = HashSet::new();
    for chunk in ids.chunks(ROWS_PER_STATEMENT) {
        let mut s = D::sql("SELECT id FROM batches WHERE id IN (");
        s.push_list(chunk.iter().copied()).push(&format!(") AND status NOT IN {FINAL} ORDER BY id{}", D::FOR_UPDATE));
        live.extend(s.one_off().scalars::<String>(conn).await?);
    }
    Ok(results.iter().filter(|r| live.contains(r.batch_id.as_str())).collect())
}

/// Units among the results' leases that `node` no longer holds under the same epoch.
async fn lost_units<D: Dialect>(conn: &mut D::Connection, node: &str, results: &[&ResultRecord]) -> Result<Vec<UnitKey>> {
    let mut leases: Vec<(&str, i64, i64)> = results.iter().filter_map(|r| r.epoch.map(|e| (r.batch_id.as_str(), r.unit_idx, e))).collect();
    leases.sort_unstable();
    leases.dedup();
    let mut batches: Vec<&str> = leases.iter().map(|l| l.0).collect();
    batches.dedup();
    let mut held = HashSet::new();
    for chunk in batches.chunks(ROWS_PER_STATEMENT) {
        let mut s = D::sql("SELECT batch_id, idx, epoch FROM units WHERE lease_owner = $1 AND batch_id IN (").bind(node);
        s.push_list(chunk.iter().copied()).push(")");
        held.extend(s.one_off().fetch_all::<(String, i64, i64)>(conn).await?);
    }
    let mut lost: Vec<UnitKey> = leases
        .into_iter()
        .filter(|&(b, idx, epoch)| !held.contains(&(b.to_string(), idx, epoch)))
        .map(|(b, idx, _)| UnitKey { batch_id: b.into(), idx })
        .collect();
    lost.dedup();
    Ok(lost)
}

/// Adds newly inserted results to their batches' counts and usage (saturating), their units'
/// progress and the usage per model, and appends progress events (last: see the lock order).
async fn apply_counts<D: Dialect>(conn: &mut D::Connection, inserted: &[&ResultRecord], now: i64) -> Result<()> {
    let t = Tally::of(inserted);
    let set: Vec<String> = ["completed", "failed"].into_iter().chain(USAGE_COLUMNS).enumerate().map(|(i, c)| saturating_add(c, i + 2)).collect();
    let batch_sql = format!("UPDATE batches SET {} WHERE id = $1", set.join(", "));
    for (id, (ok, failed, u)) in &t.batches {
        let mut s = D::sql(batch_sql.as_str()).bind(*id);
        for v in [*ok, *failed].into_iter().chain(usage_values(u)) {
            s = s.bind(v);
        }
        s.execute(conn).await?;
    }
    for ((id, idx), n) in &t.units {
        D::sql("UPDATE units SET done = done + $1 WHERE batch_id = $2 AND idx = $3").bind(*n).bind(*id).bind(*idx).execute(conn).await?;
    }
    upsert_usage::<D>(conn, &t, now - now.rem_euclid(3600)).await?;
    for id in t.batches.keys() {
        progress_event::<D>(conn, id, now).await?;
    }
    Ok(())
}

/// Adds the usage per model of one commit to its hour's rows (saturating).
async fn upsert_usage<D: Dialect>(conn: &mut D::Connection, t: &Tally<'_>, hour: i64) -> Result<()> {
    let cols: Vec<&str> = std::iter::once("requests").chain(USAGE_COLUMNS).collect();
    let set: Vec<String> =
        cols.iter().map(|c| format!("{c} = CASE WHEN batch_usage.{c} > {MAX} - excluded.{c} THEN {MAX} ELSE batch_usage.{c} + excluded.{c} END")).collect();
    let sql = format!(
        "INSERT INTO batch_usage (batch_id, model, hour, {cols}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
         ON CONFLICT (batch_id, model, hour) DO UPDATE SET {set}",
        cols = cols.join(", "),
        set = set.join(", "),
    );
    for ((id, model), (n, u)) in &t.models {
        let mut s = D::sql(sql.as_str()).bind(*id).bind(*model).bind(hour).bind(*n);
        for v in usage_values(u) {
            s = s.bind(v);
        }
        s.execute(conn).await?;
    }
    Ok(())
}

impl<D: Dialect> SqlStore<D> {
    /// [`Work::commit_results`]: one transaction, whatever the number of results.
    pub(super) async fn commit_log(&self, node: &str, results: &[ResultRecord]) -> Result<CommitOutcome> {
        if results.is_empty() {
            return Ok(CommitOutcome::default());
        }
        let mut tx = self.write().await?;
        let live = lock_live::<D>(&mut tx, results).await?;
        let inserted = if live.is_empty() { vec![] } else { D::insert_results(&self.log, &mut tx, &live).await? };
        apply_counts::<D>(&mut tx, &inserted, crate::now_unix()).await?;
        let lost = lost_units::<D>(&mut tx, node, &live).await?;
        self.commit(tx).await?;
        let n = inserted.len() as u64;
        Ok(CommitOutcome { inserted: n, duplicates: results.len() as u64 - n, lost })
    }
}
