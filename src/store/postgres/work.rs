//! The engine's side: status transitions, claims, leases of work units, and the result log.
//!
//! Lock order, the same in every transaction, so that two nodes never deadlock: batch rows
//! (in id order) → unit rows → result rows → the outbox lock (see [`super::outbox`]).

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnection, PgRow};
use sqlx::Row;

use super::files::insert_file;
use super::outbox::{progress_event, status_event};
use super::{db_err, int, ms, PgStore, FINAL, NOW_MS};
use crate::store::tally::{usage_values, Tally, USAGE_COLUMNS};
use crate::store::*;

fn unit_from_row(r: &PgRow) -> WorkUnit {
    WorkUnit {
        batch_id: r.get("batch_id"),
        idx: r.get("idx"),
        first_line: int(r, "first_line") as u64,
        end_line: int(r, "end_line") as u64,
        line_count: int(r, "line_count") as u64,
        byte_offset: int(r, "byte_offset") as u64,
        byte_len: int(r, "byte_len") as u64,
        epoch: int(r, "epoch"),
    }
}

/// The column that records when a batch entered `status`.
fn timestamp_column(status: BatchStatus) -> &'static str {
    match status {
        BatchStatus::Validating => "created_at",
        BatchStatus::InProgress => "in_progress_at",
        BatchStatus::Finalizing => "finalizing_at",
        BatchStatus::Completed => "completed_at",
        BatchStatus::Failed => "failed_at",
        BatchStatus::Expired => "expired_at",
        BatchStatus::Cancelling => "cancelling_at",
        BatchStatus::Cancelled => "cancelled_at",
    }
}

/// `col = col + $n`, saturating at the largest BIGINT instead of raising an overflow error.
fn sat(col: &str, n: usize) -> String {
    format!("{col} = CASE WHEN {col} > 9223372036854775807 - ${n} THEN 9223372036854775807 ELSE {col} + ${n} END")
}

/// Releases the leases and claims of `node` (every node's when `None`).
pub(super) async fn release_node(conn: &mut PgConnection, node: Option<&str>) -> Result<()> {
    for sql in [
        "UPDATE batches SET claim_owner = NULL, claim_expires = NULL WHERE claim_owner IS NOT NULL AND ($1::text IS NULL OR claim_owner = $1)",
        "UPDATE units SET lease_owner = NULL, lease_expires = NULL WHERE lease_owner IS NOT NULL AND ($1::text IS NULL OR lease_owner = $1)",
        "UPDATE webhook_deliveries SET claim_owner = NULL, claim_expires = NULL WHERE claim_owner IS NOT NULL AND ($1::text IS NULL OR claim_owner = $1)",
    ] {
        sqlx::query(sql).bind(node).execute(&mut *conn).await.map_err(db_err)?;
    }
    Ok(())
}

impl PgStore {
    /// Moves a batch from one of `from` to `to` (setting its timestamp once and `errors`),
    /// with its status event; `false` when it was in none of them.
    async fn transition(&self, id: &str, from: &str, to: BatchStatus, errors: Option<&[LineError]>, now: i64) -> Result<bool> {
        let col = timestamp_column(to);
        let mut tx = self.begin().await?;
        let sql = format!(
            "UPDATE batches SET status = $1, {col} = COALESCE({col}, $2), errors = COALESCE($3, errors), claim_owner = NULL, claim_expires = NULL
             WHERE id = $4 AND status IN {from}"
        );
        let moved = sqlx::query(&sql)
            .bind(to.as_str())
            .bind(now)
            .bind(errors.map(|e| serde_json::to_string(e).unwrap_or_default()))
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?
            .rows_affected();
        if moved == 0 {
            return Ok(false);
        }
        status_event(&mut tx, id, to, now).await?;
        self.commit(tx).await.map(|_| true)
    }
}

/// Locks the rows of the batches `results` belong to, in id order, and leaves out the
/// results of batches already final (nothing may be added to them any more). Holding the
/// locks until commit keeps a transition of the same batch from landing in between.
async fn lock_live<'a>(conn: &mut PgConnection, results: &'a [ResultRecord]) -> Result<Vec<&'a ResultRecord>> {
    let mut ids: Vec<&str> = results.iter().map(|r| r.batch_id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT id, status FROM batches WHERE id = ANY($1) ORDER BY id FOR UPDATE").bind(&ids).fetch_all(&mut *conn).await.map_err(db_err)?;
    let live: Vec<String> = rows.into_iter().filter(|(_, s)| BatchStatus::parse(s).is_some_and(|s| !s.is_final())).map(|(id, _)| id).collect();
    Ok(results.iter().filter(|r| live.contains(&r.batch_id)).collect())
}

/// Inserts the results not recorded yet (one statement, rows in key order); returns them.
async fn insert_new<'a>(conn: &mut PgConnection, live: &[&'a ResultRecord]) -> Result<Vec<&'a ResultRecord>> {
    let mut sorted: Vec<&ResultRecord> = live.to_vec();
    sorted.sort_unstable_by(|a, b| (&a.batch_id, a.line).cmp(&(&b.batch_id, b.line)));
    sorted.dedup_by(|a, b| a.batch_id == b.batch_id && a.line == b.line);
    let batch: Vec<&str> = sorted.iter().map(|r| r.batch_id.as_str()).collect();
    let line: Vec<i64> = sorted.iter().map(|r| r.line as i64).collect();
    let custom: Vec<&str> = sorted.iter().map(|r| r.custom_id.as_str()).collect();
    let ok: Vec<bool> = sorted.iter().map(|r| r.ok).collect();
    let record: Vec<&str> = sorted.iter().map(|r| r.record.as_str()).collect();
    let keys: Vec<(String, i64)> = sqlx::query_as(
        "INSERT INTO results (batch_id, line, custom_id, ok, record)
         SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::bool[], $5::text[])
         ON CONFLICT DO NOTHING RETURNING batch_id, line",
    )
    .bind(&batch)
    .bind(&line)
    .bind(&custom)
    .bind(&ok)
    .bind(&record)
    .fetch_all(&mut *conn)
    .await
    .map_err(db_err)?;
    let by_key: HashMap<(&str, i64), &ResultRecord> = sorted.iter().map(|r| ((r.batch_id.as_str(), r.line as i64), *r)).collect();
    Ok(keys.iter().filter_map(|(b, l)| by_key.get(&(b.as_str(), *l)).copied()).collect())
}

/// Units among the results' leases that `node` no longer holds under the same epoch.
async fn lost_units(conn: &mut PgConnection, node: &str, results: &[&ResultRecord]) -> Result<Vec<UnitKey>> {
    let mut leases: Vec<(&str, i64, i64)> = results.iter().filter_map(|r| r.epoch.map(|e| (r.batch_id.as_str(), r.unit_idx, e))).collect();
    leases.sort_unstable();
    leases.dedup();
    if leases.is_empty() {
        return Ok(vec![]);
    }
    let batch: Vec<&str> = leases.iter().map(|l| l.0).collect();
    let idx: Vec<i64> = leases.iter().map(|l| l.1).collect();
    let epoch: Vec<i64> = leases.iter().map(|l| l.2).collect();
    let lost: Vec<(String, i64)> = sqlx::query_as(
        "SELECT v.batch_id, v.idx FROM UNNEST($2::text[], $3::bigint[], $4::bigint[]) AS v(batch_id, idx, epoch)
         WHERE NOT EXISTS (SELECT 1 FROM units u WHERE u.batch_id = v.batch_id AND u.idx = v.idx
                           AND u.lease_owner = $1 AND u.epoch = v.epoch)
         ORDER BY v.batch_id, v.idx",
    )
    .bind(node)
    .bind(&batch)
    .bind(&idx)
    .bind(&epoch)
    .fetch_all(&mut *conn)
    .await
    .map_err(db_err)?;
    let mut lost: Vec<UnitKey> = lost.into_iter().map(|(batch_id, idx)| UnitKey { batch_id, idx }).collect();
    lost.dedup();
    Ok(lost)
}

#[async_trait]
impl Work for PgStore {
    async fn mark_validated(&self, id: &str, v: &Validated, now: i64) -> Result<bool> {
        let mut tx = self.begin().await?;
        let moved = sqlx::query(
            "UPDATE batches SET status = 'in_progress', in_progress_at = $1, total = $2, model = $3, input_format = $4, est_tokens = $5,
                 claim_owner = NULL, claim_expires = NULL
             WHERE id = $6 AND status = 'validating'",
        )
        .bind(now)
        .bind(v.total as i64)
        .bind(&v.model)
        .bind(serde_json::to_value(v.format).ok().and_then(|s| s.as_str().map(str::to_owned)))
        .bind(v.est_tokens.min(i64::MAX as u64) as i64)
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?
        .rows_affected();
        if moved == 0 {
            return Ok(false);
        }
        sqlx::query("DELETE FROM units WHERE batch_id = $1").bind(id).execute(&mut *tx).await.map_err(db_err)?;
        let col = |f: fn(&WorkUnit) -> i64| v.units.iter().map(f).collect::<Vec<i64>>();
        sqlx::query(
            "INSERT INTO units (batch_id, idx, first_line, end_line, line_count, byte_offset, byte_len)
             SELECT $1::text, * FROM UNNEST($2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[], $7::bigint[])",
        )
        .bind(id)
        .bind(col(|u| u.idx))
        .bind(col(|u| u.first_line as i64))
        .bind(col(|u| u.end_line as i64))
        .bind(col(|u| u.line_count as i64))
        .bind(col(|u| u.byte_offset as i64))
        .bind(col(|u| u.byte_len as i64))
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        status_event(&mut tx, id, BatchStatus::InProgress, now).await?;
        self.commit(tx).await.map(|_| true)
    }

    async fn mark_failed(&self, id: &str, errors: &[LineError], now: i64) -> Result<bool> {
        self.transition(id, "('validating')", BatchStatus::Failed, Some(errors), now).await
    }

    async fn fail_batch(&self, id: &str, errors: &[LineError], now: i64) -> Result<bool> {
        self.transition(id, "('validating','in_progress','finalizing','cancelling')", BatchStatus::Failed, Some(errors), now).await
    }

    async fn begin_finalizing(&self, id: &str, outcome: BatchStatus, now: i64) -> Result<()> {
        let mut tx = self.begin().await?;
        let moved = sqlx::query(
            "UPDATE batches SET status = 'finalizing', finalizing_at = COALESCE(finalizing_at, $1), finalize_as = $2
             WHERE id = $3 AND status = 'in_progress'",
        )
        .bind(now)
        .bind(outcome.as_str())
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?
        .rows_affected();
        if moved == 1 {
            status_event(&mut tx, id, BatchStatus::Finalizing, now).await?;
        }
        self.commit(tx).await
    }

    async fn finish_batch(&self, id: &str, f: &Finish) -> Result<()> {
        let mut tx = self.begin().await?;
        let col = timestamp_column(f.status);
        let sql = format!(
            "UPDATE batches SET status = $1, {col} = COALESCE({col}, $2), output_file_id = $3, error_file_id = $4,
                 claim_owner = NULL, claim_expires = NULL
             WHERE id = $5 AND status NOT IN {FINAL}"
        );
        let moved = sqlx::query(&sql)
            .bind(f.status.as_str())
            .bind(f.at)
            .bind(f.output_file.as_ref().map(|x| &x.id))
            .bind(f.error_file.as_ref().map(|x| &x.id))
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?
            .rows_affected();
        if moved == 1 {
            for file in [&f.output_file, &f.error_file].into_iter().flatten() {
                insert_file(&mut *tx, file, true).await?;
            }
        }
        sqlx::query("UPDATE units SET lease_owner = NULL, lease_expires = NULL WHERE batch_id = $1 AND lease_owner IS NOT NULL")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        if moved == 1 {
            status_event(&mut tx, id, f.status, f.at).await?;
        }
        self.commit(tx).await
    }

    async fn claim_batch(&self, id: &str, node: &str, ttl: Duration) -> Result<bool> {
        let sql = format!(
            "UPDATE batches SET claim_owner = $1, claim_expires = {NOW_MS} + $2
             WHERE id = $3 AND status NOT IN {FINAL} AND (claim_owner IS NULL OR claim_owner = $1 OR claim_expires <= {NOW_MS})"
        );
        let r = sqlx::query(&sql).bind(node).bind(ms(ttl)).bind(id).execute(&self.pool).await;
        self.counted(r.map_err(db_err)).map(|r| r.rows_affected() == 1)
    }

    async fn release_claim(&self, id: &str, node: &str) -> Result<()> {
        let r = sqlx::query("UPDATE batches SET claim_owner = NULL, claim_expires = NULL WHERE id = $1 AND claim_owner = $2")
            .bind(id)
            .bind(node)
            .execute(&self.pool)
            .await;
        self.counted(r.map(|_| ()).map_err(db_err))
    }

    async fn lease_unit(&self, batch_id: &str, node: &str, ttl: Duration) -> Result<Option<WorkUnit>> {
        let sql = format!(
            "UPDATE units SET lease_owner = $2, lease_expires = {NOW_MS} + $3, epoch = epoch + 1
             WHERE (batch_id, idx) = (
                 SELECT batch_id, idx FROM units WHERE batch_id = $1 AND done < line_count
                   AND (lease_owner IS NULL OR lease_expires <= {NOW_MS})
                 ORDER BY idx LIMIT 1 FOR UPDATE SKIP LOCKED)
             RETURNING *"
        );
        let r = sqlx::query(&sql).bind(batch_id).bind(node).bind(ms(ttl)).fetch_optional(&self.pool).await;
        self.counted(r.map_err(db_err)).map(|r| r.as_ref().map(unit_from_row))
    }

    async fn renew_leases(&self, node: &str, ttl: Duration) -> Result<Vec<UnitKey>> {
        let mut tx = self.begin().await?;
        sqlx::query(&format!(
            "UPDATE batches SET claim_expires = {NOW_MS} + $1
             WHERE id IN (SELECT id FROM batches WHERE claim_owner = $2 ORDER BY id FOR UPDATE)"
        ))
        .bind(ms(ttl))
        .bind(node)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        let held: Vec<(String, i64)> =
            sqlx::query_as(&format!("UPDATE units SET lease_expires = {NOW_MS} + $1 WHERE lease_owner = $2 RETURNING batch_id, idx"))
                .bind(ms(ttl))
                .bind(node)
                .fetch_all(&mut *tx)
                .await
                .map_err(db_err)?;
        self.commit(tx).await?;
        Ok(held.into_iter().map(|(batch_id, idx)| UnitKey { batch_id, idx }).collect())
    }

    async fn release_leases(&self, node: Option<&str>) -> Result<()> {
        let mut tx = self.begin().await?;
        release_node(&mut tx, node).await?;
        self.commit(tx).await
    }

    async fn release_batch_leases(&self, batch_id: &str, node: &str) -> Result<()> {
        let r = sqlx::query("UPDATE units SET lease_owner = NULL, lease_expires = NULL WHERE batch_id = $1 AND lease_owner = $2")
            .bind(batch_id)
            .bind(node)
            .execute(&self.pool)
            .await;
        self.counted(r.map(|_| ()).map_err(db_err))
    }

    async fn units(&self, batch_id: &str) -> Result<Vec<WorkUnit>> {
        let rows = sqlx::query("SELECT * FROM units WHERE batch_id = $1 ORDER BY idx").bind(batch_id).fetch_all(&self.pool).await.map_err(db_err)?;
        Ok(rows.iter().map(unit_from_row).collect())
    }

    async fn done_lines(&self, batch_id: &str, unit: &WorkUnit) -> Result<Vec<u64>> {
        let lines: Vec<i64> = sqlx::query_scalar("SELECT line FROM results WHERE batch_id = $1 AND line >= $2 AND line < $3 ORDER BY line")
            .bind(batch_id)
            .bind(unit.first_line as i64)
            .bind(unit.end_line as i64)
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(lines.into_iter().map(|l| l as u64).collect())
    }

    async fn commit_results(&self, node: &str, results: &[ResultRecord]) -> Result<CommitOutcome> {
        if results.is_empty() {
            return Ok(CommitOutcome::default());
        }
        let mut tx = self.begin().await?;
        let live = lock_live(&mut tx, results).await?;
        let inserted = if live.is_empty() { vec![] } else { insert_new(&mut tx, &live).await? };
        apply_counts(&mut tx, &inserted, crate::now_unix()).await?;
        let lost = lost_units(&mut tx, node, &live).await?;
        self.commit(tx).await?;
        let n = inserted.len() as u64;
        Ok(CommitOutcome { inserted: n, duplicates: results.len() as u64 - n, lost })
    }

    async fn results_chunk(&self, batch_id: &str, ok: Option<bool>, after_line: u64, limit: u32) -> Result<Option<(String, u64)>> {
        let filter = if ok.is_some() { "AND ok = $4" } else { "" };
        let sql = format!(
            "SELECT string_agg(record, E'\\n' ORDER BY line) AS chunk, max(line) AS last FROM (
                 SELECT record, line FROM results WHERE batch_id = $1 AND line > $2 {filter} ORDER BY line LIMIT $3) page"
        );
        let mut q = sqlx::query(&sql).bind(batch_id).bind(after_line.min(i64::MAX as u64) as i64).bind(limit as i64);
        if let Some(ok) = ok {
            q = q.bind(ok);
        }
        let row = q.fetch_one(&self.pool).await.map_err(db_err)?;
        let chunk: Option<String> = row.try_get("chunk").map_err(db_err)?;
        let last: Option<i64> = row.try_get("last").map_err(db_err)?;
        Ok(chunk.zip(last).map(|(mut c, l)| {
            c.push('\n');
            (c, l as u64)
        }))
    }

    async fn result_by_custom_id(&self, batch_id: &str, custom_id: &str) -> Result<StoredResult> {
        sqlx::query("SELECT line, custom_id, ok, record FROM results WHERE batch_id = $1 AND custom_id = $2 ORDER BY line LIMIT 1")
            .bind(batch_id)
            .bind(custom_id)
            .fetch_one(&self.pool)
            .await
            .map(|r| StoredResult { line: int(&r, "line") as u64, custom_id: r.get("custom_id"), ok: r.get("ok"), record: r.get("record") })
            .map_err(db_err)
    }
}

/// Adds newly inserted results to their batches' counts and usage (saturating), their units'
/// progress and the usage per model, and appends progress events (last: see the lock order).
async fn apply_counts(tx: &mut PgConnection, inserted: &[&ResultRecord], now: i64) -> Result<()> {
    let t = Tally::of(inserted);
    let mut batches: Vec<_> = t.batches.iter().collect();
    batches.sort_unstable_by_key(|(id, _)| **id);
    let set: Vec<String> = ["completed", "failed"].iter().chain(USAGE_COLUMNS.iter()).enumerate().map(|(i, c)| sat(c, i + 2)).collect();
    let batch_sql = format!("UPDATE batches SET {} WHERE id = $1", set.join(", "));
    for (id, (ok, failed, u)) in &batches {
        let mut q = sqlx::query(&batch_sql).bind(**id);
        for v in [*ok, *failed].into_iter().chain(usage_values(u)) {
            q = q.bind(v);
        }
        q.execute(&mut *tx).await.map_err(db_err)?;
    }
    let mut units: Vec<_> = t.units.iter().map(|((b, i), n)| (*b, *i, *n)).collect();
    units.sort_unstable();
    if !units.is_empty() {
        sqlx::query(
            "UPDATE units u SET done = u.done + v.n FROM UNNEST($1::text[], $2::bigint[], $3::bigint[]) AS v(batch_id, idx, n)
             WHERE u.batch_id = v.batch_id AND u.idx = v.idx",
        )
        .bind(units.iter().map(|u| u.0).collect::<Vec<_>>())
        .bind(units.iter().map(|u| u.1).collect::<Vec<_>>())
        .bind(units.iter().map(|u| u.2).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
    }
    upsert_usage(tx, &t, now - now.rem_euclid(3600)).await?;
    for (id, _) in batches {
        progress_event(tx, id, now).await?;
    }
    Ok(())
}

/// Adds the usage per model of one commit to its hour's rows (saturating).
async fn upsert_usage(tx: &mut PgConnection, t: &Tally<'_>, hour: i64) -> Result<()> {
    if t.models.is_empty() {
        return Ok(());
    }
    let mut models: Vec<_> = t.models.iter().collect();
    models.sort_unstable_by_key(|(k, _)| **k);
    let cols: Vec<&str> = std::iter::once("requests").chain(USAGE_COLUMNS).collect();
    let set: Vec<String> = cols
        .iter()
        .map(|c| {
            format!("{c} = CASE WHEN batch_usage.{c} > 9223372036854775807 - excluded.{c} THEN 9223372036854775807 ELSE batch_usage.{c} + excluded.{c} END")
        })
        .collect();
    let sql = format!(
        "INSERT INTO batch_usage (batch_id, model, hour, {cols})
         SELECT b, m, $3, r, i, c, o, rs, t FROM UNNEST($1::text[], $2::text[], $4::bigint[], $5::bigint[], $6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[])
             AS v(b, m, r, i, c, o, rs, t)
         ON CONFLICT (batch_id, model, hour) DO UPDATE SET {set}",
        cols = cols.join(", "),
        set = set.join(", "),
    );
    let values: Vec<[i64; 6]> = models
        .iter()
        .map(|(_, (n, u))| {
            let v = usage_values(u);
            [*n, v[0], v[1], v[2], v[3], v[4]]
        })
        .collect();
    let column = |i: usize| values.iter().map(|v| v[i]).collect::<Vec<i64>>();
    sqlx::query(&sql)
        .bind(models.iter().map(|((b, _), _)| *b).collect::<Vec<&str>>())
        .bind(models.iter().map(|((_, m), _)| *m).collect::<Vec<&str>>())
        .bind(hour)
        .bind(column(0))
        .bind(column(1))
        .bind(column(2))
        .bind(column(3))
        .bind(column(4))
        .bind(column(5))
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
    Ok(())
}
