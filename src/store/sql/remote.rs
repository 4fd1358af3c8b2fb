//! Remote batches at batch-kind upstreams: the record a restart resumes from (`engine::remote`).

use async_trait::async_trait;

use super::{Dialect, SqlStore};
use crate::store::*;

/// A remote batch's columns, as [`RemoteBatch`] reads them.
const COLUMNS: &str =
    "key, batch_id, unit_idx, upstream, model, lines, line_count, est_tokens, state, input_file_id, remote_id, remote_status, created_at, updated_at,
     input_tokens, output_tokens";

#[async_trait]
impl<D: Dialect> Remote for SqlStore<D> {
    async fn plan_remote(&self, r: &RemoteBatch) -> Result<bool> {
        let mut tx = self.write().await?;
        let n = D::sql(
            "INSERT INTO remote_batches (key, batch_id, unit_idx, upstream, model, lines, line_count, est_tokens, state, input_file_id, remote_id, remote_status, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) ON CONFLICT (key) DO NOTHING",
        )
        .bind(&r.key)
        .bind(&r.batch_id)
        .bind(r.unit_idx)
        .bind(&r.upstream)
        .bind(&r.model)
        .bind(&r.lines)
        .bind(r.line_count)
        .bind(r.est_tokens)
        .bind(&r.state)
        .bind(r.input_file_id.as_deref())
        .bind(r.remote_id.as_deref())
        .bind(r.remote_status.as_deref())
        .bind(r.created_at)
        .bind(r.updated_at)
        .execute(&mut tx)
        .await?;
        self.commit(tx).await?;
        Ok(n == 1)
    }

    async fn update_remote(
        &self,
        key: &str,
        state: RemoteState,
        input_file_id: Option<&str>,
        remote_id: Option<&str>,
        remote_status: Option<&str>,
        now: i64,
    ) -> Result<()> {
        let stmt = D::sql(
            "UPDATE remote_batches SET state = $1, input_file_id = COALESCE($2, input_file_id), remote_id = COALESCE($3, remote_id),
                 remote_status = COALESCE($4, remote_status), updated_at = $5
             WHERE key = $6",
        )
        .bind(state.as_str())
        .bind(input_file_id)
        .bind(remote_id)
        .bind(remote_status)
        .bind(now)
        .bind(key);
        self.update_one(stmt).await
    }

    async fn collect_remote(&self, key: &str, remote_status: &str, input_tokens: i64, output_tokens: i64, now: i64) -> Result<()> {
        let stmt = D::sql("UPDATE remote_batches SET state = $1, remote_status = $2, input_tokens = $3, output_tokens = $4, updated_at = $5 WHERE key = $6")
            .bind(RemoteState::Collected.as_str())
            .bind(remote_status)
            .bind(input_tokens)
            .bind(output_tokens)
            .bind(now)
            .bind(key);
        self.update_one(stmt).await
    }

    async fn add_remote_usage(&self, key: &str, input_tokens: i64, output_tokens: i64) -> Result<()> {
        let stmt = D::sql("UPDATE remote_batches SET input_tokens = input_tokens + $1, output_tokens = output_tokens + $2 WHERE key = $3")
            .bind(input_tokens)
            .bind(output_tokens)
            .bind(key);
        self.update_one(stmt).await
    }

    async fn fallback_usage(&self, tenant: &str, start: i64, end: i64) -> Result<Vec<RemoteBatch>> {
        let stmt = D::sql(format!(
            "SELECT {COLUMNS} FROM remote_batches
             WHERE batch_id IN (SELECT id FROM batches WHERE tenant = $1) AND remote_status = $2 AND created_at >= $3 AND created_at < $4
             ORDER BY created_at, key"
        ))
        .bind(tenant)
        .bind(RemoteBatch::ONLINE_FALLBACK)
        .bind(start)
        .bind(end);
        stmt.fetch_all(&mut *self.conn().await?).await
    }

    async fn remote_batches(&self, batch_id: &BatchId, unit_idx: Option<i64>) -> Result<Vec<RemoteBatch>> {
        let stmt = D::sql(format!(
            "SELECT {COLUMNS} FROM remote_batches WHERE batch_id = $1 AND (CAST($2 AS BIGINT) IS NULL OR unit_idx = $2) ORDER BY created_at, key"
        ))
        .bind(batch_id)
        .bind(unit_idx);
        stmt.fetch_all(&mut *self.conn().await?).await
    }

    async fn remote_ids(&self, upstream: &str, since: i64) -> Result<Vec<String>> {
        let stmt = D::sql("SELECT remote_id FROM remote_batches WHERE upstream = $1 AND remote_id IS NOT NULL AND updated_at >= $2").bind(upstream).bind(since);
        let rows: Vec<(String,)> = stmt.fetch_all(&mut *self.conn().await?).await?;
        Ok(rows.into_iter().map(|(id,)| id).collect())
    }
}

impl<D: Dialect> SqlStore<D> {
    /// Runs an update of one remote batch's row in its own transaction; `NotFound` when no
    /// row has its key.
    async fn update_one(&self, stmt: super::Stmt<'_, D>) -> Result<()> {
        let mut tx = self.write().await?;
        if stmt.execute(&mut tx).await? == 0 {
            return Err(Error::NotFound);
        }
        self.commit(tx).await
    }
}
