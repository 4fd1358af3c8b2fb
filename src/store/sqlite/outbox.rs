//! The event outbox, webhook deliveries and the node registry.
//!
//! Status events are appended by the transitions themselves (see [`status_event`]), in their
//! transaction; a final status also queues the batch's webhook delivery there.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnection, SqliteRow};
use sqlx::{QueryBuilder, Row, Sqlite};

use super::{db_err, ms, SqliteStore, FINAL, NOW_MS};
use crate::store::tally::progress_data;
use crate::store::*;

/// Appends a `batch.status` event describing the batch's row as it now is, inside the
/// caller's transaction; for a final status, also queues its webhook delivery.
pub(super) async fn status_event(conn: &mut SqliteConnection, batch_id: &str, status: BatchStatus, now: i64) -> Result<i64> {
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO events (tenant, batch_id, type, data, created_at)
         SELECT tenant, id, 'batch.status', json_object('status', status,
                'request_counts', json_object('total', total, 'completed', completed, 'failed', failed)), ?
         FROM batches WHERE id = ? RETURNING id",
    )
    .bind(now)
    .bind(batch_id)
    .fetch_one(&mut *conn)
    .await
    .map_err(db_err)?;
    if status.is_final() {
        sqlx::query(&format!("INSERT INTO webhook_deliveries (event_id, next_attempt_ms) VALUES (?, {NOW_MS})"))
            .bind(id)
            .execute(&mut *conn)
            .await
            .map_err(db_err)?;
    }
    Ok(id)
}

/// Appends a `batch.progress` event for a batch whose counts just moved, unless one was
/// appended less than a second ago (by the store's clock).
pub(super) async fn progress_event(conn: &mut SqliteConnection, batch_id: &str, now: i64) -> Result<()> {
    let row = sqlx::query(&format!(
        "UPDATE batches SET last_progress_ms = {NOW_MS} WHERE id = ? AND last_progress_ms <= {NOW_MS} - 1000
         RETURNING tenant, total, completed, failed, total_tokens"
    ))
    .bind(batch_id)
    .fetch_optional(&mut *conn)
    .await
    .map_err(db_err)?;
    let Some(row) = row else { return Ok(()) };
    let data = progress_data(super::int(&row, "total"), super::int(&row, "completed"), super::int(&row, "failed"), super::int(&row, "total_tokens"));
    sqlx::query("INSERT INTO events (tenant, batch_id, type, data, created_at) VALUES (?, ?, 'batch.progress', ?, ?)")
        .bind(row.get::<String, _>("tenant"))
        .bind(batch_id)
        .bind(data)
        .bind(now)
        .execute(&mut *conn)
        .await
        .map_err(db_err)?;
    Ok(())
}

fn event_from_row(r: &SqliteRow) -> Event {
    Event {
        id: r.get("id"),
        tenant: r.get("tenant"),
        batch_id: r.get("batch_id"),
        kind: r.get("type"),
        data: r.get("data"),
        created_at: super::int(r, "created_at"),
    }
}

fn attempt_from_row(r: &SqliteRow) -> DeliveryAttempt {
    DeliveryAttempt {
        event_id: r.get("event_id"),
        status: super::opt_int(r, "status").map(|s| s as u16),
        error: r.get("error"),
        duration_ms: super::int(r, "duration_ms"),
        at: super::int(r, "at"),
        retry_at_ms: super::opt_int(r, "retry_at_ms"),
        delivered: r.get("delivered"),
    }
}

#[async_trait]
impl Cluster for SqliteStore {
    async fn heartbeat(&self, node: &str, started_at: i64, ttl: Duration, info: &str) -> Result<Vec<NodeInfo>> {
        let mut tx = self.write_tx().await.map_err(db_err)?;
        sqlx::query(&format!(
            "INSERT INTO nodes (id, started_at, expires_ms, info) VALUES (?, ?, {NOW_MS} + ?, ?)
             ON CONFLICT (id) DO UPDATE SET expires_ms = excluded.expires_ms, info = excluded.info"
        ))
        .bind(node)
        .bind(started_at)
        .bind(ms(ttl))
        .bind(info)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        sqlx::query(&format!("DELETE FROM nodes WHERE expires_ms <= {NOW_MS}")).execute(&mut *tx).await.map_err(db_err)?;
        let rows = sqlx::query("SELECT id, started_at, info FROM nodes ORDER BY started_at, id").fetch_all(&mut *tx).await.map_err(db_err)?;
        let r = tx.commit().await.map_err(db_err);
        self.counted(r)?;
        Ok(rows.iter().map(|r| NodeInfo { id: r.get("id"), started_at: super::int(r, "started_at"), info: r.get("info") }).collect())
    }

    async fn leave(&self, node: &str) -> Result<()> {
        let mut tx = self.write_tx().await.map_err(db_err)?;
        sqlx::query("DELETE FROM nodes WHERE id = ?").bind(node).execute(&mut *tx).await.map_err(db_err)?;
        super::work::release_node(&mut tx, Some(node)).await?;
        let r = tx.commit().await.map_err(db_err);
        self.counted(r)
    }
}

#[async_trait]
impl Outbox for SqliteStore {
    async fn events_after(&self, filter: &EventFilter, after: i64, limit: u32) -> Result<Vec<Event>> {
        let mut b = QueryBuilder::<Sqlite>::new("SELECT * FROM events WHERE id > ");
        b.push_bind(after);
        if let Some(t) = &filter.tenant {
            b.push(" AND tenant = ").push_bind(t);
        }
        if let Some(id) = &filter.batch_id {
            b.push(" AND batch_id = ").push_bind(id);
        }
        b.push(" ORDER BY id LIMIT ").push_bind(limit as i64);
        let rows = b.build().fetch_all(&self.pool).await.map_err(db_err)?;
        Ok(rows.iter().map(event_from_row).collect())
    }

    async fn latest_events(&self, filter: &EventFilter, kind: Option<&str>, limit: u32) -> Result<Vec<Event>> {
        let mut b = QueryBuilder::<Sqlite>::new("SELECT * FROM events WHERE 1 = 1");
        if let Some(t) = &filter.tenant {
            b.push(" AND tenant = ").push_bind(t);
        }
        if let Some(id) = &filter.batch_id {
            b.push(" AND batch_id = ").push_bind(id);
        }
        if let Some(k) = kind {
            b.push(" AND type = ").push_bind(k);
        }
        b.push(" ORDER BY id DESC LIMIT ").push_bind(limit as i64);
        let rows = b.build().fetch_all(&self.pool).await.map_err(db_err)?;
        Ok(rows.iter().map(event_from_row).collect())
    }

    async fn append_event(&self, batch_id: &str, kind: &str, data: &str, now: i64) -> Result<i64> {
        let r = sqlx::query_scalar(
            "INSERT INTO events (tenant, batch_id, type, data, created_at) SELECT tenant, id, ?, ?, ? FROM batches WHERE id = ? RETURNING id",
        )
        .bind(kind)
        .bind(data)
        .bind(now)
        .bind(batch_id)
        .fetch_one(&self.pool)
        .await
        .map_err(db_err);
        self.counted(r)
    }

    async fn prune_events(&self, before: i64) -> Result<u64> {
        let sql = format!(
            "DELETE FROM events WHERE type = 'batch.progress' AND created_at < ?
             AND batch_id IN (SELECT id FROM batches WHERE status IN {FINAL})"
        );
        let r = sqlx::query(&sql).bind(before).execute(&self.pool).await.map_err(db_err);
        self.counted(r).map(|r| r.rows_affected())
    }

    async fn due_deliveries(&self, node: &str, limit: u32, lease: Duration) -> Result<Vec<Delivery>> {
        // A read first: the deliverer asks often, and nothing due must cost no write.
        let due: Option<i64> = sqlx::query_scalar(&format!(
            "SELECT 1 FROM webhook_deliveries WHERE state = 'pending' AND next_attempt_ms <= {NOW_MS}
               AND (claim_owner IS NULL OR claim_expires <= {NOW_MS}) LIMIT 1"
        ))
        .fetch_optional(&self.pool)
        .await
        .map_err(db_err)?;
        if due.is_none() {
            return Ok(Vec::new());
        }
        let mut tx = self.write_tx().await.map_err(db_err)?;
        let claimed: Vec<(i64, i64)> = sqlx::query_as(&format!(
            "UPDATE webhook_deliveries SET claim_owner = ?, claim_expires = {NOW_MS} + ?
             WHERE event_id IN (SELECT event_id FROM webhook_deliveries WHERE state = 'pending'
                 AND next_attempt_ms <= {NOW_MS} AND (claim_owner IS NULL OR claim_expires <= {NOW_MS})
                 ORDER BY next_attempt_ms LIMIT ?)
             RETURNING event_id, attempts"
        ))
        .bind(node)
        .bind(ms(lease))
        .bind(limit as i64)
        .fetch_all(&mut *tx)
        .await
        .map_err(db_err)?;
        let mut out = Vec::with_capacity(claimed.len());
        for (event_id, attempts) in claimed {
            let row = sqlx::query("SELECT * FROM events WHERE id = ?").bind(event_id).fetch_one(&mut *tx).await.map_err(db_err)?;
            out.push(Delivery { event: event_from_row(&row), attempts });
        }
        let r = tx.commit().await.map_err(db_err);
        self.counted(r)?;
        Ok(out)
    }

    async fn record_delivery(&self, a: &DeliveryAttempt) -> Result<()> {
        let mut tx = self.write_tx().await.map_err(db_err)?;
        sqlx::query("INSERT INTO webhook_attempts (event_id, at, status, error, duration_ms, delivered, retry_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?)")
            .bind(a.event_id)
            .bind(a.at)
            .bind(a.status.map(i64::from))
            .bind(&a.error)
            .bind(a.duration_ms)
            .bind(a.delivered)
            .bind(a.retry_at_ms)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        let state = match (a.delivered, a.retry_at_ms) {
            (true, _) => "delivered",
            (false, Some(_)) => "pending",
            (false, None) => "failed",
        };
        sqlx::query(
            "UPDATE webhook_deliveries SET state = ?, attempts = attempts + 1, next_attempt_ms = COALESCE(?, next_attempt_ms),
                 claim_owner = NULL, claim_expires = NULL WHERE event_id = ?",
        )
        .bind(state)
        .bind(a.retry_at_ms)
        .bind(a.event_id)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        let r = tx.commit().await.map_err(db_err);
        self.counted(r)
    }

    async fn delivery_attempts(&self, event_id: i64) -> Result<Vec<DeliveryAttempt>> {
        let rows =
            sqlx::query("SELECT * FROM webhook_attempts WHERE event_id = ? ORDER BY rowid").bind(event_id).fetch_all(&self.pool).await.map_err(db_err)?;
        Ok(rows.iter().map(attempt_from_row).collect())
    }
}
