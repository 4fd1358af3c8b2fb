//! Batch rows: create (idempotent per key, within the tenant's quotas), read, list, cancel,
//! what is queued, usage per model.

use async_trait::async_trait;

use super::outbox::status_event;
use super::rows::BatchRow;
use super::{page, Dialect, SqlStore, Stmt, FINAL};
use crate::store::*;

/// The sums of the usage columns of `batch_usage`, for `GROUP BY` reads.
fn usage_sums<D: Dialect>() -> String {
    ["requests", "input_tokens", "cached_tokens", "output_tokens", "reasoning_tokens", "total_tokens"]
        .map(|c| format!("{} AS {c}", D::clamped_sum(c)))
        .join(", ")
}

/// What is queued (see [`Batches::queued`]), on the pool or inside a transaction.
async fn queued_in<D: Dialect>(conn: &mut D::Connection, tenant: Option<&str>) -> Result<Queued> {
    let g = D::GREATEST;
    let left = format!("{g}(total - completed - failed, 0)");
    let requests = D::clamped_sum(&format!("CASE WHEN status = 'in_progress' THEN {left} ELSE est_requests END"));
    // A running batch's tokens in proportion to its lines left (in floating point: the
    // product of two counts may not fit an integer); a validating one's file bytes / 4.
    let tokens = D::clamped_sum(&format!(
        "CASE WHEN status = 'in_progress' THEN est_tokens * 1.0 * {left} / {g}(total, 1)
         ELSE (SELECT f.bytes / 4 FROM files f WHERE f.id = b.input_file_id) END"
    ));
    let stmt = D::sql(format!(
        "SELECT count(*) AS batches, {requests} AS requests, {tokens} AS tokens FROM batches b
         WHERE status IN ('validating', 'in_progress') AND (CAST($1 AS TEXT) IS NULL OR tenant = $1)"
    ));
    stmt.bind(tenant).fetch_one(conn).await
}

/// The batch a tenant created with an idempotency key, if any.
async fn by_key<D: Dialect>(conn: &mut D::Connection, tenant: &str, key: &str) -> Result<Option<BatchId>> {
    D::sql("SELECT id FROM batches WHERE tenant = $1 AND idempotency_key = $2").bind(tenant).bind(key).scalar(conn).await
}

fn insert_batch<'q, D: Dialect>(b: &'q BatchRecord, idempotency_key: Option<&'q str>) -> Stmt<'q, D> {
    D::sql(
        "INSERT INTO batches (id, tenant, idempotency_key, endpoint, input_file_id, completion_window,
             metadata, status, created_at, expires_at, priority, output_expires_after, idempotency_hash, est_requests, api)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
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
    .bind(b.api.as_str())
}

/// The batches of `rows` that can be read: one that cannot is left out (and logged) rather
/// than failing a list.
fn readable(rows: Vec<BatchRow>) -> Vec<BatchRecord> {
    rows.into_iter()
        .filter_map(|r| BatchRecord::try_from(r).map_err(|e| tracing::error!(error = %crate::Chain(&e), "a batch row cannot be read; listing the others")).ok())
        .collect()
}

impl<D: Dialect> SqlStore<D> {
    /// Inside an admission: what the tenant's queue holds and what `b` would add, when that
    /// goes over `limits`.
    async fn over_quota(conn: &mut D::Connection, b: &BatchRecord, limits: QueueLimits) -> Result<Option<Admission>> {
        if limits == QueueLimits::default() {
            return Ok(None);
        }
        let queued = queued_in::<D>(conn, Some(&b.tenant)).await?;
        let tokens: i64 = D::sql("SELECT bytes / 4 FROM files WHERE id = $1").bind(&b.input_file_id).scalar(conn).await?.unwrap_or(0);
        Ok(queued.over(&limits, b.est_requests, tokens).map(|_| Admission::OverQuota { queued, requests: b.est_requests, tokens }))
    }
}

#[async_trait]
impl<D: Dialect> Batches for SqlStore<D> {
    async fn admit_batch(&self, b: &BatchRecord, idempotency_key: Option<&str>, limits: QueueLimits) -> Result<Admission> {
        let mut tx = self.write().await?;
        // Admissions of one tenant take turns (on every node): the count below sees every
        // batch an earlier admission inserted, and none comes between it and the insert.
        // Taken before any other lock; the outbox's lock comes after it, as everywhere.
        D::lock_tenant(&mut tx, &b.tenant).await?;
        let earlier = match idempotency_key {
            Some(key) => by_key::<D>(&mut tx, &b.tenant, key).await?,
            None => None,
        };
        if let Some(id) = earlier {
            drop(tx);
            return Ok(Admission::Admitted(Box::new(self.get_batch(Some(&b.tenant), &id).await?)));
        }
        if let Some(refused) = Self::over_quota(&mut tx, b, limits).await? {
            return Ok(refused);
        }
        let id = if insert_batch::<D>(b, idempotency_key).execute(&mut tx).await? == 1 {
            status_event::<D>(&mut tx, &b.id, b.status, b.created_at).await?;
            b.id.clone()
        } else {
            by_key::<D>(&mut tx, &b.tenant, idempotency_key.unwrap_or_default()).await?.ok_or(Error::NotFound)?
        };
        self.commit(tx).await?;
        Ok(Admission::Admitted(Box::new(self.get_batch(Some(&b.tenant), &id).await?)))
    }

    async fn get_batch(&self, tenant: Option<&str>, id: &BatchId) -> Result<BatchRecord> {
        // A tenant's read does not see a deleted batch; the engine's does.
        let stmt = D::sql("SELECT * FROM batches WHERE id = $1 AND (CAST($2 AS TEXT) IS NULL OR (tenant = $2 AND deleted_at IS NULL))").bind(id).bind(tenant);
        stmt.fetch_one::<BatchRow>(&mut *self.conn().await?).await?.try_into()
    }

    async fn list_batches(&self, tenant: &str, limit: u32, after: Option<&str>) -> Result<Page<BatchRecord>> {
        let cursor = self.cursor_seq("batches", tenant, after).await?;
        let stmt =
            D::sql("SELECT * FROM batches WHERE tenant = $1 AND deleted_at IS NULL AND (CAST($2 AS BIGINT) IS NULL OR seq < $2) ORDER BY seq DESC LIMIT $3");
        let rows: Vec<BatchRow> = self.read(stmt.bind(tenant).bind(cursor).bind(limit as i64 + 1)).await?;
        Ok(page(readable(rows), limit))
    }

    async fn list_batches_of(&self, tenant: &str, api: BatchApi, limit: u32, cursor: ListCursor<'_>) -> Result<Page<BatchRecord>> {
        let (after, newer) = match cursor {
            ListCursor::First => (None, false),
            ListCursor::After(id) => (Some(id), false),
            ListCursor::Before(id) => (Some(id), true),
        };
        let seq = self.cursor_seq("batches", tenant, after).await?;
        let mut s = D::sql("SELECT * FROM batches WHERE tenant = $1 AND api = $2 AND deleted_at IS NULL").bind(tenant).bind(api.as_str());
        if let Some(seq) = seq {
            s.push(if newer { " AND seq > " } else { " AND seq < " }).push_bind(seq);
        }
        // A page of newer items is the one just above the cursor: read upwards, then turned.
        s.push(if newer { " ORDER BY seq ASC LIMIT " } else { " ORDER BY seq DESC LIMIT " }).push_bind(limit as i64 + 1);
        let mut p = page(readable(self.read(s).await?), limit);
        if newer {
            p.items.reverse();
        }
        Ok(p)
    }

    async fn delete_batch(&self, tenant: &str, id: &BatchId) -> Result<BatchRecord> {
        let b = self.get_batch(Some(tenant), id).await?;
        if !b.status.is_final() {
            return Err(Error::Conflict(format!("batch {id} is {}, not ended", b.status.as_str())));
        }
        let now = D::NOW_MS;
        let stmt = D::sql(format!("UPDATE batches SET deleted_at = {now} WHERE id = $1 AND tenant = $2 AND deleted_at IS NULL AND status IN {FINAL}"));
        match self.write_one(stmt.bind(id).bind(tenant)).await? {
            1 => Ok(b),
            _ => Err(Error::NotFound),
        }
    }

    async fn note_unrun(&self, id: &BatchId, lines: i64) -> Result<()> {
        self.write_one(D::sql("UPDATE batches SET unrun = $1 WHERE id = $2 AND unrun IS NULL").bind(lines.max(0)).bind(id)).await.map(|_| ())
    }

    async fn request_cancel(&self, tenant: &str, id: &BatchId, now: i64) -> Result<BatchRecord> {
        let mut tx = self.write().await?;
        let moved = D::sql(
            "UPDATE batches SET status = 'cancelling', cancelling_at = COALESCE(cancelling_at, $1)
             WHERE id = $2 AND tenant = $3 AND status IN ('validating', 'in_progress')",
        )
        .bind(now)
        .bind(id)
        .bind(tenant)
        .execute(&mut tx)
        .await?;
        if moved == 1 {
            status_event::<D>(&mut tx, id, BatchStatus::Cancelling, now).await?;
        }
        self.commit(tx).await?;
        self.get_batch(Some(tenant), id).await
    }

    async fn batches_in(&self, statuses: &[BatchStatus]) -> Result<Vec<(BatchId, BatchStatus)>> {
        let mut s = D::sql("SELECT id, status FROM batches WHERE status IN (");
        s.push_list(statuses.iter().map(|st| st.as_str())).push(") ORDER BY seq ASC");
        let rows: Vec<(BatchId, String)> = self.read(s).await?;
        Ok(rows.into_iter().filter_map(|(id, s)| BatchStatus::parse(&s).map(|s| (id, s))).collect())
    }

    async fn usage(&self, tenant: &str, start: i64, end: i64) -> Result<Vec<UsageRow>> {
        let stmt = D::sql(format!(
            "SELECT '' AS batch_id, model, hour, {sums} FROM batch_usage
             WHERE batch_id IN (SELECT id FROM batches WHERE tenant = $1) AND hour >= $2 AND hour < $3
             GROUP BY model, hour ORDER BY hour, model",
            sums = usage_sums::<D>()
        ));
        self.read(stmt.bind(tenant).bind(start).bind(end)).await
    }

    async fn batch_usage(&self, batch_id: &BatchId) -> Result<Vec<UsageRow>> {
        let stmt = D::sql(format!(
            "SELECT batch_id, model, CAST(0 AS BIGINT) AS hour, {sums} FROM batch_usage WHERE batch_id = $1 GROUP BY batch_id, model ORDER BY model",
            sums = usage_sums::<D>()
        ));
        self.read(stmt.bind(batch_id)).await
    }

    async fn queued(&self, tenant: Option<&str>) -> Result<Queued> {
        queued_in::<D>(&mut *self.conn().await?, tenant).await
    }
}
