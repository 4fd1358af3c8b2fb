//! The node registry: heartbeats on the store's clock (which they read for [`crate::clock`]),
//! a graceful leave, and the status feed.

use std::time::Duration;

use async_trait::async_trait;

use super::work::release_node;
use super::{ms, Dialect, SqlStore};
use crate::store::*;

#[async_trait]
impl<D: Dialect> Cluster for SqlStore<D> {
    async fn heartbeat(&self, node: &str, started_at: i64, ttl: Duration, info: &str) -> Result<Membership> {
        let now = D::NOW_MS;
        let mut tx = self.write().await?;
        D::sql(format!(
            "INSERT INTO nodes (id, started_at, expires_ms, info) VALUES ($1, $2, {now} + $3, $4)
             ON CONFLICT (id) DO UPDATE SET expires_ms = excluded.expires_ms, info = excluded.info"
        ))
        .bind(node)
        .bind(started_at)
        .bind(ms(ttl))
        .bind(info)
        .execute(&mut tx)
        .await?;
        D::sql(format!("DELETE FROM nodes WHERE expires_ms <= {now}")).execute(&mut tx).await?;
        let nodes: Vec<NodeInfo> = D::sql("SELECT id, started_at, info FROM nodes ORDER BY started_at, id").fetch_all(&mut tx).await?;
        let clock_ms: i64 = D::sql(format!("SELECT {now}")).scalar(&mut tx).await?.unwrap_or_default();
        self.commit(tx).await?;
        Ok(Membership { nodes, clock_ms })
    }

    async fn leave(&self, node: &str) -> Result<()> {
        let mut tx = self.write().await?;
        D::sql("DELETE FROM nodes WHERE id = $1").bind(node).execute(&mut tx).await?;
        release_node::<D>(&mut tx, Some(node)).await?;
        self.commit(tx).await
    }

    async fn status_feed(&self) -> Result<Option<Box<dyn StatusFeed>>> {
        D::status_feed(&self.pool).await
    }
}
