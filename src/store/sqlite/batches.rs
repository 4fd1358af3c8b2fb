//! Batch rows: create (idempotent per key), read, list, cancel, usage per model.

use async_trait::async_trait;
use sqlx::sqlite::SqliteRow;
use sqlx::{QueryBuilder, Row, Sqlite};

use super::files::{cursor_seq, page};
use super::outbox::status_event;
use super::{db_err, int, opt_int, SqliteStore};
use crate::store::*;

fn json_col<T: serde::de::DeserializeOwned>(r: &SqliteRow, col: &str) -> Option<T> {
    r.get::<Option<String>, _>(col).and_then(|s| serde_json::from_str(&s).ok())
}

pub(super) fn batch_from_row(r: &SqliteRow) -> Result<BatchRecord> {
    let status: String = r.try_get("status").map_err(db_err)?;
    Ok(BatchRecord {
        id: r.try_get("id").map_err(db_err)?,
        tenant: r.try_get("tenant").map_err(db_err)?,
        endpoint: r.try_get("endpoint").map_err(db_err)?,
        input_file_id: r.try_get("input_file_id").map_err(db_err)?,
        completion_window: r.try_get("completion_window").map_err(db_err)?,
        metadata: json_col(r, "metadata"),
        model: r.try_get("model").unwrap_or(None),
        status: BatchStatus::parse(&status).ok_or_else(|| Error::Other(format!("unknown status {status}")))?,
        output_file_id: r.try_get("output_file_id").unwrap_or(None),
        error_file_id: r.try_get("error_file_id").unwrap_or(None),
        errors: json_col(r, "errors"),
        created_at: int(r, "created_at"),
        in_progress_at: opt_int(r, "in_progress_at"),
        expires_at: opt_int(r, "expires_at"),
        finalizing_at: opt_int(r, "finalizing_at"),
        completed_at: opt_int(r, "completed_at"),
        failed_at: opt_int(r, "failed_at"),
        expired_at: opt_int(r, "expired_at"),
        cancelling_at: opt_int(r, "cancelling_at"),
        cancelled_at: opt_int(r, "cancelled_at"),
        total: int(r, "total"),
        completed: int(r, "completed"),
        failed: int(r, "failed"),
        usage: usage_columns(r),
        priority: int(r, "priority").max(1),
        input_format: r.get::<Option<String>, _>("input_format").and_then(|s| serde_json::from_value(s.into()).ok()),
        output_expires_after: opt_int(r, "output_expires_after"),
        finalize_as: r.get::<Option<String>, _>("finalize_as").and_then(|s| BatchStatus::parse(&s)),
        est_tokens: int(r, "est_tokens"),
        est_requests: int(r, "est_requests"),
        idempotency_hash: r.try_get("idempotency_hash").unwrap_or(None),
    })
}

fn usage_from_row(r: &SqliteRow) -> UsageRow {
    UsageRow { batch_id: r.get("batch_id"), model: r.get("model"), hour: int(r, "hour"), requests: int(r, "requests"), usage: usage_columns(r) }
}

/// The usage columns of a `batches` or `batch_usage` row.
fn usage_columns(r: &SqliteRow) -> Usage {
    Usage {
        input_tokens: int(r, "input_tokens"),
        cached_tokens: int(r, "cached_tokens"),
        output_tokens: int(r, "output_tokens"),
        reasoning_tokens: int(r, "reasoning_tokens"),
        total_tokens: int(r, "total_tokens"),
    }
}

/// Sums of the usage columns for `GROUP BY` reads. `total()` (a float) rather than `sum()`
/// (an error on overflow), cast back: SQLite clamps the cast to the integer range.
const USAGE_SUMS: &str = "CAST(total(requests) AS INTEGER) AS requests,
    CAST(total(input_tokens) AS INTEGER) AS input_tokens,
    CAST(total(cached_tokens) AS INTEGER) AS cached_tokens,
    CAST(total(output_tokens) AS INTEGER) AS output_tokens,
    CAST(total(reasoning_tokens) AS INTEGER) AS reasoning_tokens,
    CAST(total(total_tokens) AS INTEGER) AS total_tokens";

#[async_trait]
impl Batches for SqliteStore {
    async fn admit_batch(&self, b: &BatchRecord, idempotency_key: Option<&str>, limits: QueueLimits) -> Result<Admission> {
        // `BEGIN IMMEDIATE` holds the write lock from the first statement: no other
        // admission (or any write) comes between the quota's count and the insert.
        let mut tx = self.write_tx().await.map_err(db_err)?;
        let earlier: Option<String> = match idempotency_key {
            Some(key) => sqlx::query_scalar("SELECT id FROM batches WHERE tenant = ? AND idempotency_key = ?")
                .bind(&b.tenant)
                .bind(key)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_err)?,
            None => None,
        };
        if let Some(id) = earlier {
            drop(tx);
            return Ok(Admission::Admitted(Box::new(self.get_batch(Some(&b.tenant), &id).await?)));
        }
        if limits != QueueLimits::default() {
            let queued = queued_in(&mut *tx, Some(&b.tenant)).await?;
            let tokens: i64 = sqlx::query_scalar("SELECT bytes / 4 FROM files WHERE id = ?")
                .bind(&b.input_file_id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_err)?
                .unwrap_or(0);
            if queued.over(&limits, b.est_requests, tokens).is_some() {
                return Ok(Admission::OverQuota { queued, requests: b.est_requests, tokens });
            }
        }
        let r = sqlx::query(
            "INSERT INTO batches (id, tenant, idempotency_key, endpoint, input_file_id, completion_window,
                 metadata, status, created_at, expires_at, priority, output_expires_after, idempotency_hash, est_requests)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
             ON CONFLICT (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING",
        )
        .bind(&b.id)
        .bind(&b.tenant)
        .bind(idempotency_key)
        .bind(&b.endpoint)
        .bind(&b.input_file_id)
        .bind(&b.completion_window)
        .bind(b.metadata.as_ref().map(|m| serde_json::to_string(m).unwrap_or_default()))
        .bind(b.status.as_str())
        .bind(b.created_at)
        .bind(b.expires_at)
        .bind(b.priority)
        .bind(b.output_expires_after)
        .bind(&b.idempotency_hash)
        .bind(b.est_requests.max(0))
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        let id = if r.rows_affected() == 1 {
            status_event(&mut tx, &b.id, b.status, b.created_at).await?;
            b.id.clone()
        } else {
            sqlx::query_scalar("SELECT id FROM batches WHERE tenant = ? AND idempotency_key = ?")
                .bind(&b.tenant)
                .bind(idempotency_key)
                .fetch_one(&mut *tx)
                .await
                .map_err(db_err)?
        };
        let r = tx.commit().await.map_err(db_err);
        self.counted(r)?;
        Ok(Admission::Admitted(Box::new(self.get_batch(Some(&b.tenant), &id).await?)))
    }

    async fn get_batch(&self, tenant: Option<&str>, id: &str) -> Result<BatchRecord> {
        sqlx::query("SELECT * FROM batches WHERE id = ? AND (? IS NULL OR tenant = ?)")
            .bind(id)
            .bind(tenant)
            .bind(tenant)
            .fetch_one(&self.pool)
            .await
            .map_err(db_err)
            .and_then(|r| batch_from_row(&r))
    }

    async fn list_batches(&self, tenant: &str, limit: u32, after: Option<&str>) -> Result<Page<BatchRecord>> {
        let cursor = cursor_seq(&self.pool, "batches", tenant, after).await?;
        let rows = sqlx::query("SELECT * FROM batches WHERE tenant = ? AND (? IS NULL OR seq < ?) ORDER BY seq DESC LIMIT ?")
            .bind(tenant)
            .bind(cursor)
            .bind(cursor)
            .bind(limit as i64 + 1)
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?;
        // A row that cannot be read is left out (and logged) rather than failing the list.
        let items = rows
            .iter()
            .filter_map(|r| batch_from_row(r).map_err(|e| tracing::error!(error = %e, "a batch row cannot be read; listing the others")).ok())
            .collect();
        Ok(page(items, limit))
    }

    async fn request_cancel(&self, tenant: &str, id: &str, now: i64) -> Result<BatchRecord> {
        let mut tx = self.write_tx().await.map_err(db_err)?;
        let r = sqlx::query(
            "UPDATE batches SET status = 'cancelling', cancelling_at = COALESCE(cancelling_at, ?)
             WHERE id = ? AND tenant = ? AND status IN ('validating', 'in_progress')",
        )
        .bind(now)
        .bind(id)
        .bind(tenant)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        if r.rows_affected() == 1 {
            status_event(&mut tx, id, BatchStatus::Cancelling, now).await?;
        }
        let r = tx.commit().await.map_err(db_err);
        self.counted(r)?;
        self.get_batch(Some(tenant), id).await
    }

    async fn batches_in(&self, statuses: &[BatchStatus]) -> Result<Vec<(String, BatchStatus)>> {
        let mut b = QueryBuilder::<Sqlite>::new("SELECT id, status FROM batches WHERE status IN (");
        let mut sep = b.separated(", ");
        for s in statuses {
            sep.push_bind(s.as_str());
        }
        b.push(") ORDER BY seq ASC");
        let rows = b.build().fetch_all(&self.pool).await.map_err(db_err)?;
        Ok(rows.iter().filter_map(|r| BatchStatus::parse(r.get::<&str, _>(1)).map(|s| (r.get::<String, _>(0), s))).collect())
    }

    async fn usage(&self, tenant: &str, start: i64, end: i64) -> Result<Vec<UsageRow>> {
        let sql = format!(
            "SELECT '' AS batch_id, model, hour, {USAGE_SUMS} FROM batch_usage
             WHERE batch_id IN (SELECT id FROM batches WHERE tenant = ?) AND hour >= ? AND hour < ?
             GROUP BY model, hour ORDER BY hour, model"
        );
        let rows = sqlx::query(&sql).bind(tenant).bind(start).bind(end).fetch_all(&self.pool).await.map_err(db_err)?;
        Ok(rows.iter().map(usage_from_row).collect())
    }

    async fn batch_usage(&self, batch_id: &str) -> Result<Vec<UsageRow>> {
        let sql = format!("SELECT batch_id, model, 0 AS hour, {USAGE_SUMS} FROM batch_usage WHERE batch_id = ? GROUP BY model ORDER BY model");
        let rows = sqlx::query(&sql).bind(batch_id).fetch_all(&self.pool).await.map_err(db_err)?;
        Ok(rows.iter().map(usage_from_row).collect())
    }

    async fn queued(&self, tenant: Option<&str>) -> Result<Queued> {
        queued_in(&self.pool, tenant).await
    }
}

/// [`Batches::queued`], on the pool or inside a transaction.
async fn queued_in<'e>(on: impl sqlx::Executor<'e, Database = Sqlite>, tenant: Option<&str>) -> Result<Queued> {
    // Sums as floats (`total()`), cast back: SQLite clamps the cast to the integer range.
    let row = sqlx::query(
        "SELECT count(*) AS batches,
             CAST(total(CASE WHEN status = 'in_progress' THEN max(total - completed - failed, 0) ELSE est_requests END) AS INTEGER) AS requests,
             CAST(total(CASE WHEN status = 'in_progress'
                 THEN est_tokens * (max(total - completed - failed, 0) * 1.0 / max(total, 1))
                 ELSE (SELECT f.bytes / 4 FROM files f WHERE f.id = b.input_file_id) END) AS INTEGER) AS tokens
         FROM batches b WHERE status IN ('validating', 'in_progress') AND (? IS NULL OR tenant = ?)",
    )
    .bind(tenant)
    .bind(tenant)
    .fetch_one(on)
    .await
    .map_err(db_err)?;
    Ok(Queued { batches: int(&row, "batches"), requests: int(&row, "requests"), tokens: int(&row, "tokens") })
}
