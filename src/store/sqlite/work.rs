//! The engine's side: status transitions, claims, leases of work units, and the result log.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnection, SqliteRow};
use sqlx::{QueryBuilder, Row, Sqlite};

use super::files::{insert_file_query, INSERT_FILE_IF_NEW};
use super::outbox::{progress_event, status_event};
use super::{db_err, int, key_line, ms, result_key, SqliteStore, FINAL, NOW_MS, ROWS_PER_INSERT};
use crate::store::tally::{usage_values, Tally, USAGE_COLUMNS};
use crate::store::*;

fn unit_from_row(r: &SqliteRow) -> WorkUnit {
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

fn stored_from_row(row: &SqliteRow) -> StoredResult {
    StoredResult { line: key_line(row.get::<i64, _>("key")), custom_id: row.get("custom_id"), ok: row.get("ok"), record: row.get("record") }
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

/// `col = col + ?`, saturating at the largest integer (SQLite would turn an overflowing sum
/// into a REAL). Bind the (non-negative) addend twice.
fn sat(col: &str) -> String {
    format!("{col} = CASE WHEN {col} > 9223372036854775807 - ? THEN 9223372036854775807 ELSE {col} + ? END")
}

/// Releases the leases and claims of `node` (every node's when `None`).
pub(super) async fn release_node(conn: &mut SqliteConnection, node: Option<&str>) -> Result<()> {
    for sql in [
        "UPDATE units SET lease_owner = NULL, lease_expires = NULL WHERE lease_owner IS NOT NULL AND (?1 IS NULL OR lease_owner = ?1)",
        "UPDATE batches SET claim_owner = NULL, claim_expires = NULL WHERE claim_owner IS NOT NULL AND (?1 IS NULL OR claim_owner = ?1)",
        "UPDATE webhook_deliveries SET claim_owner = NULL, claim_expires = NULL WHERE claim_owner IS NOT NULL AND (?1 IS NULL OR claim_owner = ?1)",
    ] {
        sqlx::query(sql).bind(node).execute(&mut *conn).await.map_err(db_err)?;
    }
    Ok(())
}

impl SqliteStore {
    /// Moves a batch from one of `from` to `to` (setting its timestamp once and `errors`),
    /// with its status event; `false` when it was in none of them.
    async fn transition(&self, id: &str, from: &str, to: BatchStatus, errors: Option<&[LineError]>, now: i64) -> Result<bool> {
        let col = timestamp_column(to);
        let mut tx = self.write_tx().await.map_err(db_err)?;
        let sql = format!(
            "UPDATE batches SET status = ?, {col} = COALESCE({col}, ?), errors = COALESCE(?, errors), claim_owner = NULL, claim_expires = NULL
             WHERE id = ? AND status IN {from}"
        );
        let r = sqlx::query(&sql)
            .bind(to.as_str())
            .bind(now)
            .bind(errors.map(|e| serde_json::to_string(e).unwrap_or_default()))
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        if r.rows_affected() == 0 {
            tx.rollback().await.map_err(db_err)?;
            return Ok(false);
        }
        status_event(&mut tx, id, to, now).await?;
        let r = tx.commit().await.map_err(db_err);
        self.counted(r).map(|_| true)
    }

    /// Results of `results` whose batch is final (nothing may be added to it any more) are
    /// left out; returns the rest.
    async fn drop_final<'a>(conn: &mut SqliteConnection, results: &'a [ResultRecord]) -> Result<Vec<&'a ResultRecord>> {
        let mut ids: Vec<&str> = results.iter().map(|r| r.batch_id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        let mut b = QueryBuilder::<Sqlite>::new("SELECT id FROM batches WHERE status IN ");
        b.push(FINAL).push(" AND id IN (");
        let mut sep = b.separated(", ");
        for id in &ids {
            sep.push_bind(*id);
        }
        b.push(")");
        let finals: Vec<String> = b.build_query_scalar().persistent(false).fetch_all(&mut *conn).await.map_err(db_err)?;
        Ok(results.iter().filter(|r| !finals.contains(&r.batch_id)).collect())
    }

    /// Units among the results' leases that `node` no longer holds under the same epoch.
    async fn lost_units(conn: &mut SqliteConnection, node: &str, results: &[&ResultRecord]) -> Result<Vec<UnitKey>> {
        let mut leases: Vec<(&str, i64, i64)> = results.iter().filter_map(|r| r.epoch.map(|e| (r.batch_id.as_str(), r.unit_idx, e))).collect();
        leases.sort_unstable();
        leases.dedup();
        let mut lost = Vec::new();
        for (batch, idx, epoch) in leases {
            let held: Option<i64> = sqlx::query_scalar("SELECT 1 FROM units WHERE batch_id = ? AND idx = ? AND lease_owner = ? AND epoch = ?")
                .bind(batch)
                .bind(idx)
                .bind(node)
                .bind(epoch)
                .fetch_optional(&mut *conn)
                .await
                .map_err(db_err)?;
            if held.is_none() {
                lost.push(UnitKey { batch_id: batch.to_string(), idx });
            }
        }
        Ok(lost)
    }

    /// Inserts the rows of `keyed` that are new; returns them.
    async fn insert_new<'a>(conn: &mut SqliteConnection, keyed: &[(i64, &'a ResultRecord)]) -> Result<Vec<&'a ResultRecord>> {
        let mut inserted = Vec::with_capacity(keyed.len());
        for chunk in keyed.chunks(ROWS_PER_INSERT) {
            // Fast path: every row is new (no RETURNING to decode). A line already recorded
            // (only after a crash) rolls the chunk back to learn exactly which rows are new.
            let mut sp = sqlx::Connection::begin(&mut *conn).await.map_err(db_err)?;
            let done = insert_results(chunk, "").build().persistent(false).execute(&mut *sp).await.map_err(db_err)?.rows_affected();
            if done == chunk.len() as u64 {
                sp.commit().await.map_err(db_err)?;
                inserted.extend(chunk.iter().map(|(_, r)| *r));
                continue;
            }
            sp.rollback().await.map_err(db_err)?;
            let rows = insert_results(chunk, " RETURNING key").build().persistent(false).fetch_all(&mut *conn).await.map_err(db_err)?;
            let by_key: HashMap<i64, &ResultRecord> = chunk.iter().copied().collect();
            inserted.extend(rows.iter().filter_map(|row| by_key.get(&row.get::<i64, _>(0)).copied()));
        }
        Ok(inserted)
    }
}

#[async_trait]
impl Work for SqliteStore {
    async fn mark_validated(&self, id: &str, v: &Validated, now: i64) -> Result<bool> {
        let mut tx = self.write_tx().await.map_err(db_err)?;
        let r = sqlx::query(
            "UPDATE batches SET status = 'in_progress', in_progress_at = ?, total = ?, model = ?, input_format = ?, est_tokens = ?,
                 claim_owner = NULL, claim_expires = NULL
             WHERE id = ? AND status = 'validating'",
        )
        .bind(now)
        .bind(v.total as i64)
        .bind(&v.model)
        .bind(serde_json::to_value(v.format).ok().and_then(|s| s.as_str().map(str::to_owned)))
        .bind(v.est_tokens.min(i64::MAX as u64) as i64)
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        if r.rows_affected() == 0 {
            tx.rollback().await.map_err(db_err)?;
            return Ok(false);
        }
        sqlx::query("DELETE FROM units WHERE batch_id = ?").bind(id).execute(&mut *tx).await.map_err(db_err)?;
        for chunk in v.units.chunks(ROWS_PER_INSERT) {
            let mut b = QueryBuilder::<Sqlite>::new("INSERT INTO units (batch_id, idx, first_line, end_line, line_count, byte_offset, byte_len) ");
            b.push_values(chunk, |mut row, u| {
                row.push_bind(id)
                    .push_bind(u.idx)
                    .push_bind(u.first_line as i64)
                    .push_bind(u.end_line as i64)
                    .push_bind(u.line_count as i64)
                    .push_bind(u.byte_offset as i64)
                    .push_bind(u.byte_len as i64);
            });
            b.build().persistent(false).execute(&mut *tx).await.map_err(db_err)?;
        }
        status_event(&mut tx, id, BatchStatus::InProgress, now).await?;
        let r = tx.commit().await.map_err(db_err);
        self.counted(r).map(|_| true)
    }

    async fn mark_failed(&self, id: &str, errors: &[LineError], now: i64) -> Result<bool> {
        self.transition(id, "('validating')", BatchStatus::Failed, Some(errors), now).await
    }

    async fn fail_batch(&self, id: &str, errors: &[LineError], now: i64) -> Result<bool> {
        let from = "('validating','in_progress','finalizing','cancelling')";
        let done = self.transition(id, from, BatchStatus::Failed, Some(errors), now).await?;
        if done {
            self.forget_seq(id);
        }
        Ok(done)
    }

    async fn begin_finalizing(&self, id: &str, outcome: BatchStatus, now: i64) -> Result<()> {
        let mut tx = self.write_tx().await.map_err(db_err)?;
        let r = sqlx::query(
            "UPDATE batches SET status = 'finalizing', finalizing_at = COALESCE(finalizing_at, ?), finalize_as = ?
             WHERE id = ? AND status = 'in_progress'",
        )
        .bind(now)
        .bind(outcome.as_str())
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        if r.rows_affected() == 1 {
            status_event(&mut tx, id, BatchStatus::Finalizing, now).await?;
        }
        let r = tx.commit().await.map_err(db_err);
        self.counted(r)
    }

    async fn finish_batch(&self, id: &str, f: &Finish) -> Result<()> {
        let mut tx = self.write_tx().await.map_err(db_err)?;
        for file in [&f.output_file, &f.error_file].into_iter().flatten() {
            insert_file_query(file, INSERT_FILE_IF_NEW).execute(&mut *tx).await.map_err(db_err)?;
        }
        let col = timestamp_column(f.status);
        let sql = format!(
            "UPDATE batches SET status = ?, {col} = COALESCE({col}, ?), output_file_id = ?, error_file_id = ?,
                 claim_owner = NULL, claim_expires = NULL
             WHERE id = ? AND status NOT IN {FINAL}"
        );
        let r = sqlx::query(&sql)
            .bind(f.status.as_str())
            .bind(f.at)
            .bind(f.output_file.as_ref().map(|x| &x.id))
            .bind(f.error_file.as_ref().map(|x| &x.id))
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        if r.rows_affected() == 1 {
            status_event(&mut tx, id, f.status, f.at).await?;
        }
        sqlx::query("UPDATE units SET lease_owner = NULL, lease_expires = NULL WHERE batch_id = ?").bind(id).execute(&mut *tx).await.map_err(db_err)?;
        let r = tx.commit().await.map_err(db_err);
        self.counted(r)?;
        self.forget_seq(id);
        Ok(())
    }

    async fn claim_batch(&self, id: &str, node: &str, ttl: Duration) -> Result<bool> {
        let sql = format!(
            "UPDATE batches SET claim_owner = ?, claim_expires = {NOW_MS} + ?
             WHERE id = ? AND status NOT IN {FINAL} AND (claim_owner IS NULL OR claim_owner = ? OR claim_expires <= {NOW_MS})"
        );
        let r = sqlx::query(&sql).bind(node).bind(ms(ttl)).bind(id).bind(node).execute(&self.pool).await;
        self.counted(r.map_err(db_err)).map(|r| r.rows_affected() == 1)
    }

    async fn release_claim(&self, id: &str, node: &str) -> Result<()> {
        let r = sqlx::query("UPDATE batches SET claim_owner = NULL, claim_expires = NULL WHERE id = ? AND claim_owner = ?")
            .bind(id)
            .bind(node)
            .execute(&self.pool)
            .await;
        self.counted(r.map(|_| ()).map_err(db_err))
    }

    async fn lease_unit(&self, batch_id: &str, node: &str, ttl: Duration) -> Result<Option<WorkUnit>> {
        let sql = format!(
            "UPDATE units SET lease_owner = ?, lease_expires = {NOW_MS} + ?, epoch = epoch + 1 WHERE rowid = (
                 SELECT rowid FROM units WHERE batch_id = ? AND done < line_count
                   AND (lease_owner IS NULL OR lease_expires <= {NOW_MS}) ORDER BY idx LIMIT 1)
             RETURNING *"
        );
        let r = sqlx::query(&sql).bind(node).bind(ms(ttl)).bind(batch_id).fetch_optional(&self.pool).await;
        self.counted(r.map_err(db_err)).map(|r| r.as_ref().map(unit_from_row))
    }

    async fn renew_leases(&self, node: &str, ttl: Duration) -> Result<Vec<UnitKey>> {
        let mut tx = self.write_tx().await.map_err(db_err)?;
        let held: Vec<(String, i64)> = sqlx::query_as(&format!("UPDATE units SET lease_expires = {NOW_MS} + ? WHERE lease_owner = ? RETURNING batch_id, idx"))
            .bind(ms(ttl))
            .bind(node)
            .fetch_all(&mut *tx)
            .await
            .map_err(db_err)?;
        sqlx::query(&format!("UPDATE batches SET claim_expires = {NOW_MS} + ? WHERE claim_owner = ?"))
            .bind(ms(ttl))
            .bind(node)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        let r = tx.commit().await.map_err(db_err);
        self.counted(r)?;
        Ok(held.into_iter().map(|(batch_id, idx)| UnitKey { batch_id, idx }).collect())
    }

    async fn release_leases(&self, node: Option<&str>) -> Result<()> {
        let mut tx = self.write_tx().await.map_err(db_err)?;
        release_node(&mut tx, node).await?;
        let r = tx.commit().await.map_err(db_err);
        self.counted(r)
    }

    async fn release_batch_leases(&self, batch_id: &str, node: &str) -> Result<()> {
        let r = sqlx::query("UPDATE units SET lease_owner = NULL, lease_expires = NULL WHERE batch_id = ? AND lease_owner = ?")
            .bind(batch_id)
            .bind(node)
            .execute(&self.pool)
            .await;
        self.counted(r.map(|_| ()).map_err(db_err))
    }

    async fn units(&self, batch_id: &str) -> Result<Vec<WorkUnit>> {
        let rows = sqlx::query("SELECT * FROM units WHERE batch_id = ? ORDER BY idx").bind(batch_id).fetch_all(&self.pool).await.map_err(db_err)?;
        Ok(rows.iter().map(unit_from_row).collect())
    }

    async fn done_lines(&self, batch_id: &str, unit: &WorkUnit) -> Result<Vec<u64>> {
        let seq = self.seq(batch_id).await?;
        let keys: Vec<i64> = sqlx::query_scalar("SELECT key FROM results WHERE key >= ? AND key < ? ORDER BY key")
            .bind(result_key(seq, unit.first_line))
            .bind(result_key(seq, unit.end_line))
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(keys.into_iter().map(key_line).collect())
    }

    async fn commit_results(&self, node: &str, results: &[ResultRecord]) -> Result<CommitOutcome> {
        if results.is_empty() {
            return Ok(CommitOutcome::default());
        }
        let mut seqs: HashMap<&str, i64> = HashMap::new();
        for r in results {
            if !seqs.contains_key(r.batch_id.as_str()) {
                seqs.insert(&r.batch_id, self.seq(&r.batch_id).await?);
            }
        }
        let mut tx = self.write_tx().await.map_err(db_err)?;
        let live = Self::drop_final(&mut tx, results).await?;
        let keyed: Vec<(i64, &ResultRecord)> = live.iter().map(|r| (result_key(seqs[r.batch_id.as_str()], r.line), *r)).collect();
        let inserted = Self::insert_new(&mut tx, &keyed).await?;
        let now = crate::now_unix();
        apply_counts(&mut tx, &inserted, now).await?;
        let lost = Self::lost_units(&mut tx, node, &live).await?;
        tx.commit().await.map_err(db_err)?;
        self.commits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let n = inserted.len() as u64;
        Ok(CommitOutcome { inserted: n, duplicates: results.len() as u64 - n, lost })
    }

    async fn results_chunk(&self, batch_id: &str, ok: Option<bool>, after_line: u64, limit: u32) -> Result<Option<(String, u64)>> {
        // Two statements rather than `(? IS NULL OR ok = ?)`, which costs a quarter more per row.
        let filter = if ok.is_some() { "AND ok = ?" } else { "" };
        let sql = format!(
            "SELECT group_concat(record, char(10)) AS chunk, max(key) AS last FROM (
                 SELECT record, key FROM results WHERE key > ? AND key < ? {filter} ORDER BY key LIMIT ?)"
        );
        let seq = self.seq(batch_id).await?;
        let mut q = sqlx::query(&sql).bind(result_key(seq, after_line)).bind(result_key(seq + 1, 0));
        if let Some(ok) = ok {
            q = q.bind(ok);
        }
        let row = q.bind(limit as i64).fetch_one(&self.pool).await.map_err(db_err)?;
        // Joined with newlines inside SQLite (one copy per record), the last one added here.
        let chunk: Option<String> = row.get("chunk");
        let last: Option<i64> = row.get("last");
        Ok(chunk.zip(last).map(|(mut c, l)| {
            c.push('\n');
            (c, key_line(l))
        }))
    }

    async fn result_by_custom_id(&self, batch_id: &str, custom_id: &str) -> Result<StoredResult> {
        let seq = self.seq(batch_id).await?;
        sqlx::query("SELECT key, custom_id, ok, record FROM results WHERE key >> 32 = ? AND custom_id = ?")
            .bind(seq)
            .bind(custom_id)
            .fetch_one(&self.pool)
            .await
            .map(|r| stored_from_row(&r))
            .map_err(db_err)
    }
}

/// A multi-row insert of results that skips lines already recorded, with `tail` appended.
/// Build it with `persistent(false)`: a cached statement would keep its last bound records
/// alive, one statement per distinct group size.
fn insert_results<'a>(chunk: &[(i64, &'a ResultRecord)], tail: &str) -> QueryBuilder<'a, Sqlite> {
    let mut b = QueryBuilder::<Sqlite>::new("INSERT INTO results (key, custom_id, ok, record) ");
    b.push_values(chunk.iter().copied(), |mut row, (key, r)| {
        row.push_bind(key).push_bind(&r.custom_id).push_bind(r.ok).push_bind(&r.record);
    });
    b.push(" ON CONFLICT DO NOTHING").push(tail);
    b
}

/// Adds newly inserted results to their batches' counts and usage (saturating), their units'
/// progress and the usage per model, and appends progress events.
async fn apply_counts(tx: &mut SqliteConnection, inserted: &[&ResultRecord], now: i64) -> Result<()> {
    let t = Tally::of(inserted);
    let set: Vec<String> = ["completed", "failed"].iter().chain(USAGE_COLUMNS.iter()).map(|c| sat(c)).collect();
    let batch_sql = format!("UPDATE batches SET {} WHERE id = ?", set.join(", "));
    for (id, (ok, failed, u)) in &t.batches {
        let mut q = sqlx::query(&batch_sql);
        for v in [*ok, *failed].into_iter().chain(usage_values(u)) {
            q = q.bind(v).bind(v);
        }
        q.bind(*id).execute(&mut *tx).await.map_err(db_err)?;
    }
    for ((id, idx), n) in &t.units {
        sqlx::query("UPDATE units SET done = done + ? WHERE batch_id = ? AND idx = ?").bind(n).bind(id).bind(idx).execute(&mut *tx).await.map_err(db_err)?;
    }
    let hour = now - now.rem_euclid(3600);
    let set: Vec<String> = std::iter::once("requests").chain(USAGE_COLUMNS).map(sat).collect();
    let usage_sql = format!(
        "INSERT INTO batch_usage (batch_id, model, hour, requests, {cols}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
         ON CONFLICT (batch_id, model, hour) DO UPDATE SET {set}",
        cols = USAGE_COLUMNS.join(", "),
        set = set.join(", "),
    );
    for ((id, model), (n, u)) in &t.models {
        let values: Vec<i64> = std::iter::once(*n).chain(usage_values(u)).collect();
        let mut q = sqlx::query(&usage_sql).bind(*id).bind(*model).bind(hour);
        for v in &values {
            q = q.bind(v);
        }
        for v in &values {
            q = q.bind(v).bind(v);
        }
        q.execute(&mut *tx).await.map_err(db_err)?;
    }
    for id in t.batches.keys() {
        progress_event(tx, id, now).await?;
    }
    Ok(())
}
