//! The engine's side of a batch: status transitions, claims, and leases of work units.
//!
//! Lock order, the same in every transaction, so that two nodes never deadlock where rows
//! are locked (PostgreSQL): batch rows (in id order) → unit rows → result rows → the outbox
//! lock (see [`super::outbox`]).

use std::time::Duration;

use async_trait::async_trait;

use super::files::insert_file;
use super::outbox::status_event;
use super::{ms, Dialect, SqlStore, FINAL, ROWS_PER_STATEMENT};
use crate::store::*;

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

/// Releases the leases and claims of `node` (every node's when `None`), in lock order.
pub(super) async fn release_node<D: Dialect>(conn: &mut D::Connection, node: Option<&str>) -> Result<()> {
    for (table, owner, expires) in
        [("batches", "claim_owner", "claim_expires"), ("units", "lease_owner", "lease_expires"), ("webhook_deliveries", "claim_owner", "claim_expires")]
    {
        let sql = format!("UPDATE {table} SET {owner} = NULL, {expires} = NULL WHERE {owner} IS NOT NULL AND (CAST($1 AS TEXT) IS NULL OR {owner} = $1)");
        D::sql(sql).bind(node).execute(conn).await?;
    }
    Ok(())
}

impl<D: Dialect> SqlStore<D> {
    /// Moves a batch from one of `from` to `to` (setting its timestamp once and `errors`),
    /// with its status event; `false` when it was in none of them.
    async fn transition(&self, id: &str, from: &str, to: BatchStatus, errors: Option<&[LineError]>, now: i64) -> Result<bool> {
        let col = timestamp_column(to);
        let mut tx = self.write().await?;
        let moved = D::sql(format!(
            "UPDATE batches SET status = $1, {col} = COALESCE({col}, $2), errors = COALESCE($3, errors), claim_owner = NULL, claim_expires = NULL
             WHERE id = $4 AND status IN {from}"
        ))
        .bind(to.as_str())
        .bind(now)
        .bind(errors.map(|e| serde_json::to_string(e).unwrap_or_default()))
        .bind(id)
        .execute(&mut tx)
        .await?;
        if moved == 0 {
            return Ok(false);
        }
        status_event::<D>(&mut tx, id, to, now).await?;
        self.commit(tx).await?;
        if to.is_final() {
            D::forget_batch(&self.log, id);
        }
        Ok(true)
    }

    /// Inserts a validated batch's work units, a multi-row statement per chunk.
    async fn insert_units(conn: &mut D::Connection, id: &str, units: &[WorkUnit]) -> Result<()> {
        for chunk in units.chunks(ROWS_PER_STATEMENT) {
            let mut s = D::sql("INSERT INTO units (batch_id, idx, first_line, end_line, line_count, byte_offset, byte_len, ordered) VALUES ");
            for (i, u) in chunk.iter().enumerate() {
                s.push(if i == 0 { "(" } else { ", (" }).push_bind(id);
                for v in [u.idx, u.first_line as i64, u.end_line as i64, u.line_count as i64, u.byte_offset as i64, u.byte_len as i64] {
                    s.push(", ").push_bind(v);
                }
                s.push(", ").push_bind(u.ordered).push(")");
            }
            s.one_off().execute(conn).await?;
        }
        Ok(())
    }
}

#[async_trait]
impl<D: Dialect> Work for SqlStore<D> {
    async fn mark_validated(&self, id: &BatchId, v: &Validated, now: i64) -> Result<bool> {
        let mut tx = self.write().await?;
        let moved = D::sql(
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
        .execute(&mut tx)
        .await?;
        if moved == 0 {
            return Ok(false);
        }
        D::sql("DELETE FROM units WHERE batch_id = $1").bind(id).execute(&mut tx).await?;
        Self::insert_units(&mut tx, id, &v.units).await?;
        status_event::<D>(&mut tx, id, BatchStatus::InProgress, now).await?;
        self.commit(tx).await.map(|_| true)
    }

    async fn mark_failed(&self, id: &BatchId, errors: &[LineError], now: i64) -> Result<bool> {
        self.transition(id, "('validating')", BatchStatus::Failed, Some(errors), now).await
    }

    async fn fail_batch(&self, id: &BatchId, errors: &[LineError], now: i64) -> Result<bool> {
        self.transition(id, "('validating','in_progress','finalizing','cancelling')", BatchStatus::Failed, Some(errors), now).await
    }

    async fn begin_finalizing(&self, id: &BatchId, outcome: BatchStatus, now: i64) -> Result<()> {
        let mut tx = self.write().await?;
        let moved = D::sql(
            "UPDATE batches SET status = 'finalizing', finalizing_at = COALESCE(finalizing_at, $1), finalize_as = $2
             WHERE id = $3 AND status = 'in_progress'",
        )
        .bind(now)
        .bind(outcome.as_str())
        .bind(id)
        .execute(&mut tx)
        .await?;
        if moved == 1 {
            status_event::<D>(&mut tx, id, BatchStatus::Finalizing, now).await?;
        }
        self.commit(tx).await
    }

    async fn finish_batch(&self, id: &BatchId, f: &Finish) -> Result<()> {
        let mut tx = self.write().await?;
        let col = timestamp_column(f.status);
        let moved = D::sql(format!(
            "UPDATE batches SET status = $1, {col} = COALESCE({col}, $2), output_file_id = $3, error_file_id = $4,
                 claim_owner = NULL, claim_expires = NULL
             WHERE id = $5 AND status NOT IN {FINAL}"
        ))
        .bind(f.status.as_str())
        .bind(f.at)
        .bind(f.output_file.as_ref().map(|x| &x.id))
        .bind(f.error_file.as_ref().map(|x| &x.id))
        .bind(id)
        .execute(&mut tx)
        .await?;
        if moved == 1 {
            for file in [&f.output_file, &f.error_file].into_iter().flatten() {
                insert_file::<D>(file, true).execute(&mut tx).await?;
            }
        }
        D::sql("UPDATE units SET lease_owner = NULL, lease_expires = NULL WHERE batch_id = $1 AND lease_owner IS NOT NULL").bind(id).execute(&mut tx).await?;
        if moved == 1 {
            status_event::<D>(&mut tx, id, f.status, f.at).await?;
        }
        self.commit(tx).await?;
        D::forget_batch(&self.log, id);
        Ok(())
    }

    async fn claim_batch(&self, id: &BatchId, node: &str, ttl: Duration) -> Result<bool> {
        let now = D::NOW_MS;
        let stmt = D::sql(format!(
            "UPDATE batches SET claim_owner = $1, claim_expires = {now} + $2
             WHERE id = $3 AND status NOT IN {FINAL} AND (claim_owner IS NULL OR claim_owner = $1 OR claim_expires <= {now})"
        ));
        Ok(self.write_one(stmt.bind(node).bind(ms(ttl)).bind(id)).await? == 1)
    }

    async fn release_claim(&self, id: &BatchId, node: &str) -> Result<()> {
        let stmt = D::sql("UPDATE batches SET claim_owner = NULL, claim_expires = NULL WHERE id = $1 AND claim_owner = $2");
        self.write_one(stmt.bind(id).bind(node)).await.map(|_| ())
    }

    async fn lease_unit(&self, batch_id: &BatchId, node: &str, ttl: Duration) -> Result<Option<WorkUnit>> {
        let now = D::NOW_MS;
        let stmt = D::sql(format!(
            "UPDATE units SET lease_owner = $2, lease_expires = {now} + $3, epoch = epoch + 1
             WHERE batch_id = $1 AND idx = (
                 SELECT idx FROM units WHERE batch_id = $1 AND done < line_count AND (lease_owner IS NULL OR lease_expires <= {now})
                 ORDER BY idx LIMIT 1{skip})
             RETURNING *",
            skip = D::SKIP_LOCKED
        ));
        let unit = stmt.bind(batch_id).bind(node).bind(ms(ttl)).fetch_optional::<WorkUnit>(&mut *self.conn().await?).await?;
        self.count();
        Ok(unit)
    }

    async fn renew_leases(&self, node: &str, ttl: Duration) -> Result<Vec<UnitKey>> {
        let (now, lock) = (D::NOW_MS, D::FOR_UPDATE);
        let mut tx = self.write().await?;
        D::sql(format!("UPDATE batches SET claim_expires = {now} + $1 WHERE id IN (SELECT id FROM batches WHERE claim_owner = $2 ORDER BY id{lock})"))
            .bind(ms(ttl))
            .bind(node)
            .execute(&mut tx)
            .await?;
        let held: Vec<(BatchId, i64)> = D::sql(format!("UPDATE units SET lease_expires = {now} + $1 WHERE lease_owner = $2 RETURNING batch_id, idx"))
            .bind(ms(ttl))
            .bind(node)
            .fetch_all(&mut tx)
            .await?;
        self.commit(tx).await?;
        Ok(held.into_iter().map(|(batch_id, idx)| UnitKey { batch_id, idx }).collect())
    }

    async fn release_leases(&self, node: Option<&str>) -> Result<()> {
        let mut tx = self.write().await?;
        release_node::<D>(&mut tx, node).await?;
        self.commit(tx).await
    }

    async fn release_batch_leases(&self, batch_id: &BatchId, node: &str) -> Result<()> {
        let stmt = D::sql("UPDATE units SET lease_owner = NULL, lease_expires = NULL WHERE batch_id = $1 AND lease_owner = $2");
        self.write_one(stmt.bind(batch_id).bind(node)).await.map(|_| ())
    }

    async fn units(&self, batch_id: &BatchId) -> Result<Vec<WorkUnit>> {
        self.read(D::sql("SELECT * FROM units WHERE batch_id = $1 ORDER BY idx").bind(batch_id)).await
    }

    async fn done_lines(&self, batch_id: &BatchId, unit: &WorkUnit) -> Result<Vec<u64>> {
        D::done_lines(&self.log, &self.pool, batch_id, unit).await
    }

    async fn done_among(&self, batch_id: &BatchId, lines: &[u64]) -> Result<Vec<u64>> {
        D::done_among(&self.log, &self.pool, batch_id, lines).await
    }

    async fn commit_results(&self, node: &str, results: &[ResultRecord]) -> Result<CommitOutcome> {
        self.commit_log(node, results).await
    }

    async fn results_chunk(&self, batch_id: &BatchId, ok: Option<bool>, after_line: u64, limit: u32) -> Result<Option<(String, u64)>> {
        D::results_chunk(&self.log, &self.pool, batch_id, ok, after_line, limit).await
    }

    async fn result_by_custom_id(&self, batch_id: &BatchId, custom_id: &str) -> Result<StoredResult> {
        D::result_by_custom_id(&self.log, &self.pool, batch_id, custom_id).await
    }
}
