//! Batch rows: create (idempotent per key), read, list, cancel, usage per model.

use async_trait::async_trait;
use sqlx::postgres::PgRow;
use sqlx::Row;

use super::files::{cursor_seq, page};
use super::outbox::status_event;
use super::{db_err, int, opt_int, PgStore};
use crate::store::*;

fn json_col<T: serde::de::DeserializeOwned>(r: &PgRow, col: &str) -> Option<T> {
    r.try_get::<Option<String>, _>(col).ok().flatten().and_then(|s| serde_json::from_str(&s).ok())
}

fn text_col(r: &PgRow, col: &str) -> Option<String> {
    r.try_get::<Option<String>, _>(col).ok().flatten()
}

pub(super) fn batch_from_row(r: &PgRow) -> Result<BatchRecord> {
    let status: String = r.try_get("status").map_err(db_err)?;
    Ok(BatchRecord {
        id: r.try_get("id").map_err(db_err)?,
        tenant: r.try_get("tenant").map_err(db_err)?,
        endpoint: r.try_get("endpoint").map_err(db_err)?,
        input_file_id: r.try_get("input_file_id").map_err(db_err)?,
        completion_window: r.try_get("completion_window").map_err(db_err)?,
        metadata: json_col(r, "metadata"),
        model: text_col(r, "model"),
        status: BatchStatus::parse(&status).ok_or_else(|| Error::Other(format!("unknown status {status}")))?,
        output_file_id: text_col(r, "output_file_id"),
        error_file_id: text_col(r, "error_file_id"),
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
        usage: usage_of(r),
        priority: int(r, "priority").max(1),
        input_format: text_col(r, "input_format").and_then(|s| serde_json::from_value(s.into()).ok()),
        output_expires_after: opt_int(r, "output_expires_after"),
        finalize_as: text_col(r, "finalize_as").and_then(|s| BatchStatus::parse(&s)),
        est_tokens: int(r, "est_tokens"),
        est_requests: int(r, "est_requests"),
        idempotency_hash: text_col(r, "idempotency_hash"),
    })
}

fn usage_of(r: &PgRow) -> Usage {
    Usage {
        input_tokens: int(r, "input_tokens"),
        cached_tokens: int(r, "cached_tokens"),
        output_tokens: int(r, "output_tokens"),
        reasoning_tokens: int(r, "reasoning_tokens"),
        total_tokens: int(r, "total_tokens"),
    }
}

fn usage_from_row(r: &PgRow) -> UsageRow {
    UsageRow { batch_id: r.get("batch_id"), model: r.get("model"), hour: int(r, "hour"), requests: int(r, "requests"), usage: usage_of(r) }
}

/// Sums of the usage columns for `GROUP BY` reads: `sum(bigint)` is a numeric (it cannot
/// overflow), clamped back into the BIGINT range.
const USAGE_SUMS: &str = "LEAST(sum(requests), 9223372036854775807)::bigint AS requests,
    LEAST(sum(input_tokens), 9223372036854775807)::bigint AS input_tokens,
    LEAST(sum(cached_tokens), 9223372036854775807)::bigint AS cached_tokens,
    LEAST(sum(output_tokens), 9223372036854775807)::bigint AS output_tokens,
    LEAST(sum(reasoning_tokens), 9223372036854775807)::bigint AS reasoning_tokens,
    LEAST(sum(total_tokens), 9223372036854775807)::bigint AS total_tokens";

#[async_trait]
impl Batches for PgStore {
    async fn admit_batch(&self, b: &BatchRecord, idempotency_key: Option<&str>, limits: QueueLimits) -> Result<Admission> {
        let mut tx = self.begin().await?;
        // Admissions of one tenant take turns (on every node): the count below sees every
        // batch an earlier admission inserted, and none comes between it and the insert.
        // Taken before any other lock; the outbox's lock comes after it, as everywhere.
        sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))").bind(QUOTA_LOCK).bind(&b.tenant).execute(&mut *tx).await.map_err(db_err)?;
        let earlier: Option<String> = match idempotency_key {
            Some(key) => sqlx::query_scalar("SELECT id FROM batches WHERE tenant = $1 AND idempotency_key = $2")
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
            let tokens: i64 = sqlx::query_scalar("SELECT bytes / 4 FROM files WHERE id = $1")
                .bind(&b.input_file_id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_err)?
                .unwrap_or(0);
            if queued.over(&limits, b.est_requests, tokens).is_some() {
                return Ok(Admission::OverQuota { queued, requests: b.est_requests, tokens });
            }
        }
        let inserted = sqlx::query(
            "INSERT INTO batches (id, tenant, idempotency_key, endpoint, input_file_id, completion_window,
                 metadata, status, created_at, expires_at, priority, output_expires_after, idempotency_hash, est_requests)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
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
        .map_err(db_err)?
        .rows_affected();
        let id = if inserted == 1 {
            status_event(&mut tx, &b.id, b.status, b.created_at).await?;
            b.id.clone()
        } else {
            sqlx::query_scalar("SELECT id FROM batches WHERE tenant = $1 AND idempotency_key = $2")
                .bind(&b.tenant)
                .bind(idempotency_key)
                .fetch_one(&mut *tx)
                .await
                .map_err(db_err)?
        };
        self.commit(tx).await?;
        Ok(Admission::Admitted(Box::new(self.get_batch(Some(&b.tenant), &id).await?)))
    }

    async fn get_batch(&self, tenant: Option<&str>, id: &str) -> Result<BatchRecord> {
        sqlx::query("SELECT * FROM batches WHERE id = $1 AND ($2::text IS NULL OR tenant = $2)")
            .bind(id)
            .bind(tenant)
            .fetch_one(&self.pool)
            .await
            .map_err(db_err)
            .and_then(|r| batch_from_row(&r))
    }

    async fn list_batches(&self, tenant: &str, limit: u32, after: Option<&str>) -> Result<Page<BatchRecord>> {
        let cursor = cursor_seq(self, "batches", tenant, after).await?;
        let rows = sqlx::query("SELECT * FROM batches WHERE tenant = $1 AND ($2::bigint IS NULL OR seq < $2) ORDER BY seq DESC LIMIT $3")
            .bind(tenant)
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
        let mut tx = self.begin().await?;
        let moved = sqlx::query(
            "UPDATE batches SET status = 'cancelling', cancelling_at = COALESCE(cancelling_at, $1)
             WHERE id = $2 AND tenant = $3 AND status IN ('validating', 'in_progress')",
        )
        .bind(now)
        .bind(id)
        .bind(tenant)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?
        .rows_affected();
        if moved == 1 {
            status_event(&mut tx, id, BatchStatus::Cancelling, now).await?;
        }
        self.commit(tx).await?;
        self.get_batch(Some(tenant), id).await
    }

    async fn batches_in(&self, statuses: &[BatchStatus]) -> Result<Vec<(String, BatchStatus)>> {
        let names: Vec<&str> = statuses.iter().map(|s| s.as_str()).collect();
        let rows: Vec<(String, String)> = sqlx::query_as("SELECT id, status FROM batches WHERE status = ANY($1) ORDER BY seq ASC")
            .bind(&names)
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(rows.into_iter().filter_map(|(id, s)| BatchStatus::parse(&s).map(|s| (id, s))).collect())
    }

    async fn usage(&self, tenant: &str, start: i64, end: i64) -> Result<Vec<UsageRow>> {
        let sql = format!(
            "SELECT '' AS batch_id, model, hour, {USAGE_SUMS} FROM batch_usage
             WHERE batch_id IN (SELECT id FROM batches WHERE tenant = $1) AND hour >= $2 AND hour < $3
             GROUP BY model, hour ORDER BY hour, model"
        );
        let rows = sqlx::query(&sql).bind(tenant).bind(start).bind(end).fetch_all(&self.pool).await.map_err(db_err)?;
        Ok(rows.iter().map(usage_from_row).collect())
    }

    async fn batch_usage(&self, batch_id: &str) -> Result<Vec<UsageRow>> {
        let sql =
            format!("SELECT batch_id, model, 0::bigint AS hour, {USAGE_SUMS} FROM batch_usage WHERE batch_id = $1 GROUP BY batch_id, model ORDER BY model");
        let rows = sqlx::query(&sql).bind(batch_id).fetch_all(&self.pool).await.map_err(db_err)?;
        Ok(rows.iter().map(usage_from_row).collect())
    }

    async fn queued(&self, tenant: Option<&str>) -> Result<Queued> {
        queued_in(&self.pool, tenant).await
    }
}

/// The first key of the per-tenant advisory lock that admissions take ("quota" in ASCII);
/// the second is the tenant's hash.
const QUOTA_LOCK: i32 = 0x7175_6f74;

/// [`Batches::queued`], on the pool or inside a transaction.
async fn queued_in<'e>(on: impl sqlx::Executor<'e, Database = sqlx::Postgres>, tenant: Option<&str>) -> Result<Queued> {
    // numeric sums (no overflow), clamped back into the BIGINT range.
    let row = sqlx::query(
        "SELECT count(*)::bigint AS batches,
             LEAST(COALESCE(sum(CASE WHEN status = 'in_progress' THEN GREATEST(total - completed - failed, 0) ELSE est_requests END), 0),
                   9223372036854775807)::bigint AS requests,
             LEAST(trunc(COALESCE(sum(CASE WHEN status = 'in_progress'
                 THEN est_tokens::numeric * GREATEST(total - completed - failed, 0) / GREATEST(total, 1)
                 ELSE (SELECT f.bytes / 4 FROM files f WHERE f.id = b.input_file_id) END), 0)),
                   9223372036854775807)::bigint AS tokens
         FROM batches b WHERE status IN ('validating', 'in_progress') AND ($1::text IS NULL OR tenant = $1)",
    )
    .bind(tenant)
    .fetch_one(on)
    .await
    .map_err(db_err)?;
    Ok(Queued { batches: int(&row, "batches"), requests: int(&row, "requests"), tokens: int(&row, "tokens") })
}
