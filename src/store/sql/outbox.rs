//! The event outbox and webhook deliveries.
//!
//! Status events are appended by the transitions themselves ([`status_event`]), in their
//! transaction; a final status also queues the batch's webhook delivery there, and every
//! status is told to the nodes listening for it ([`Dialect::notify_status`]) at the commit. Commits of
//! results append progress ([`progress_event`]), at most one a second per batch.
//!
//! Readers page through the outbox by id (`id > cursor`), so ids must become visible in
//! order: where transactions commit concurrently (PostgreSQL), an id taken first could
//! commit last and a reader past it would never see it. So every append takes the dialect's
//! outbox lock first ([`Dialect::lock_outbox`]), held until the commit, as the transaction's
//! last lock (after every row lock), so it is held briefly and never waited on while holding
//! a row another appender needs.

use std::time::Duration;

use async_trait::async_trait;

use super::rows::{AttemptRow, Count};
use super::{ms, Dialect, SqlStore, FINAL, ROWS_PER_STATEMENT};
use crate::store::*;

/// The data of a `batch.progress` event.
fn progress_data(total: i64, completed: i64, failed: i64, total_tokens: i64) -> String {
    serde_json::json!({
        "request_counts": {"total": total, "completed": completed, "failed": failed},
        "usage": {"total_tokens": total_tokens},
    })
    .to_string()
}

/// Appends a `batch.status` event describing the batch's row as it now is, inside the
/// caller's transaction; for a final status, also queues its webhook delivery.
pub(super) async fn status_event<D: Dialect>(conn: &mut D::Connection, batch_id: &str, status: BatchStatus, now: i64) -> Result<i64> {
    D::lock_outbox(conn).await?;
    let j = D::JSON_OBJECT;
    let stmt = D::sql(format!(
        "INSERT INTO events (tenant, batch_id, type, data, created_at)
         SELECT tenant, id, 'batch.status',
                CAST({j}('status', status, 'request_counts', {j}('total', total, 'completed', completed, 'failed', failed)) AS TEXT), $1
         FROM batches WHERE id = $2 RETURNING id"
    ));
    let id: i64 = stmt.bind(now).bind(batch_id).scalar(conn).await?.ok_or(Error::NotFound)?;
    D::notify_status(conn, batch_id, status).await?;
    if status.is_final() {
        D::sql(format!("INSERT INTO webhook_deliveries (event_id, next_attempt_ms) VALUES ($1, {})", D::NOW_MS)).bind(id).execute(conn).await?;
    }
    Ok(id)
}

/// Appends a `batch.progress` event for a batch whose counts just moved, unless one was
/// appended less than a second ago (by the store's clock).
pub(super) async fn progress_event<D: Dialect>(conn: &mut D::Connection, batch_id: &str, now: i64) -> Result<()> {
    let due = D::sql(format!(
        "UPDATE batches SET last_progress_ms = {now_ms} WHERE id = $1 AND last_progress_ms <= {now_ms} - 1000
         RETURNING tenant, total, completed, failed, total_tokens",
        now_ms = D::NOW_MS
    ));
    let Some((tenant, total, completed, failed, tokens)) = due.bind(batch_id).fetch_optional::<(String, Count, Count, Count, Count)>(conn).await? else {
        return Ok(());
    };
    let data = progress_data(total.into(), completed.into(), failed.into(), tokens.into());
    D::lock_outbox(conn).await?;
    D::sql("INSERT INTO events (tenant, batch_id, type, data, created_at) VALUES ($1, $2, 'batch.progress', $3, $4)")
        .bind(tenant)
        .bind(batch_id)
        .bind(data)
        .bind(now)
        .execute(conn)
        .await?;
    Ok(())
}

/// The tenant and batch conditions of an event read.
fn filtered<'q, D: Dialect>(mut stmt: super::Stmt<'q, D>, filter: &'q EventFilter) -> super::Stmt<'q, D> {
    if let Some(t) = &filter.tenant {
        stmt.push(" AND tenant = ").push_bind(t);
    }
    if let Some(id) = &filter.batch_id {
        stmt.push(" AND batch_id = ").push_bind(id);
    }
    stmt
}

#[async_trait]
impl<D: Dialect> Outbox for SqlStore<D> {
    async fn events_after(&self, filter: &EventFilter, after: i64, limit: u32) -> Result<Vec<Event>> {
        let mut s = filtered(D::sql("SELECT * FROM events WHERE id > $1").bind(after), filter);
        s.push(" ORDER BY id LIMIT ").push_bind(limit as i64);
        self.read(s).await
    }

    async fn latest_events(&self, filter: &EventFilter, kind: Option<&str>, limit: u32) -> Result<Vec<Event>> {
        let mut s = filtered(D::sql("SELECT * FROM events WHERE 1 = 1"), filter);
        if let Some(k) = kind {
            s.push(" AND type = ").push_bind(k);
        }
        s.push(" ORDER BY id DESC LIMIT ").push_bind(limit as i64);
        self.read(s).await
    }

    async fn append_event(&self, batch_id: &BatchId, kind: &str, data: &str, now: i64) -> Result<i64> {
        let mut tx = self.write().await?;
        D::lock_outbox(&mut tx).await?;
        let stmt =
            D::sql("INSERT INTO events (tenant, batch_id, type, data, created_at) SELECT tenant, id, $1, $2, $3 FROM batches WHERE id = $4 RETURNING id");
        let id = stmt.bind(kind).bind(data).bind(now).bind(batch_id).scalar(&mut tx).await?.ok_or(Error::NotFound)?;
        self.commit(tx).await?;
        Ok(id)
    }

    async fn prune_events(&self, before: i64) -> Result<u64> {
        let stmt = D::sql(format!(
            "DELETE FROM events WHERE type = 'batch.progress' AND created_at < $1
             AND batch_id IN (SELECT id FROM batches WHERE status IN {FINAL})"
        ));
        self.write_one(stmt.bind(before)).await
    }

    async fn due_deliveries(&self, node: &str, limit: u32, lease: Duration) -> Result<Vec<Delivery>> {
        let now = D::NOW_MS;
        let due = format!("state = 'pending' AND next_attempt_ms <= {now} AND (claim_owner IS NULL OR claim_expires <= {now})");
        // A read first: the deliverer asks often, and nothing due must cost no write.
        let any: Option<i64> = D::sql(format!("SELECT event_id FROM webhook_deliveries WHERE {due} LIMIT 1")).scalar(&mut *self.conn().await?).await?;
        if any.is_none() {
            return Ok(Vec::new());
        }
        let mut tx = self.write().await?;
        let claim = D::sql(format!(
            "UPDATE webhook_deliveries SET claim_owner = $1, claim_expires = {now} + $2
             WHERE event_id IN (SELECT event_id FROM webhook_deliveries WHERE {due} ORDER BY next_attempt_ms LIMIT $3{skip})
             RETURNING event_id, attempts, next_attempt_ms",
            skip = D::SKIP_LOCKED
        ));
        let mut claimed: Vec<(i64, i64, i64)> = claim.bind(node).bind(ms(lease)).bind(limit as i64).fetch_all(&mut tx).await?;
        claimed.sort_unstable_by_key(|&(id, _, next)| (next, id));
        let mut events = Vec::with_capacity(claimed.len());
        for chunk in claimed.chunks(ROWS_PER_STATEMENT) {
            let mut s = D::sql("SELECT * FROM events WHERE id IN (");
            s.push_list(chunk.iter().map(|c| c.0)).push(")");
            events.extend(s.one_off().fetch_all::<Event>(&mut tx).await?);
        }
        self.commit(tx).await?;
        Ok(claimed
            .into_iter()
            .filter_map(|(id, attempts, _)| events.iter().position(|e| e.id == id).map(|i| Delivery { event: events.swap_remove(i), attempts }))
            .collect())
    }

    async fn record_delivery(&self, a: &DeliveryAttempt) -> Result<()> {
        let mut tx = self.write().await?;
        D::sql("INSERT INTO webhook_attempts (event_id, at, status, error, duration_ms, delivered, retry_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7)")
            .bind(a.event_id)
            .bind(a.at)
            .bind(a.status.map(i64::from))
            .bind(&a.error)
            .bind(a.duration_ms)
            .bind(a.delivered)
            .bind(a.retry_at_ms)
            .execute(&mut tx)
            .await?;
        let state = match (a.delivered, a.retry_at_ms) {
            (true, _) => "delivered",
            (false, Some(_)) => "pending",
            (false, None) => "failed",
        };
        D::sql(
            "UPDATE webhook_deliveries SET state = $1, attempts = attempts + 1, next_attempt_ms = COALESCE($2, next_attempt_ms),
                 claim_owner = NULL, claim_expires = NULL WHERE event_id = $3",
        )
        .bind(state)
        .bind(a.retry_at_ms)
        .bind(a.event_id)
        .execute(&mut tx)
        .await?;
        self.commit(tx).await
    }

    async fn delivery_attempts(&self, event_id: i64) -> Result<Vec<DeliveryAttempt>> {
        let rows: Vec<AttemptRow> = self.read(D::sql("SELECT * FROM webhook_attempts WHERE event_id = $1 ORDER BY id").bind(event_id)).await?;
        Ok(rows.into_iter().map(Into::into).collect())
    }
}
