//! The node registry: heartbeats on the store's clock (which they read for [`crate::clock`]),
//! a graceful leave, and the status feed.

use std::time::Duration;

use async_trait::async_trait;

use super::work::release_node;
use super::{ms, Dialect, SqlStore};
use crate::store::*;

#[async_trait]
impl<D: Dialect> Cluster for SqlStore<D> {
    async fn heartbeat(&self, node: &str, started_at: i64, ttl: Duration, publish: Publish<'_>) -> Result<Membership> {
        let now = D::NOW_MS;
        let mut tx = self.write().await?;
        D::lock_nodes(&mut tx).await?;
        D::sql(format!("DELETE FROM nodes WHERE expires_ms <= {now}")).execute(&mut tx).await?;
        let others: Vec<NodeInfo> =
            D::sql("SELECT id, started_at, info FROM nodes WHERE id <> $1 ORDER BY started_at, id").bind(node).fetch_all(&mut tx).await?;
        let info = publish(&others);
        D::sql(format!(
            "INSERT INTO nodes (id, started_at, expires_ms, info) VALUES ($1, $2, {now} + $3, $4)
             ON CONFLICT (id) DO UPDATE SET expires_ms = excluded.expires_ms, info = excluded.info"
        ))
        .bind(node)
        .bind(started_at)
        .bind(ms(ttl))
        .bind(&info)
        .execute(&mut tx)
        .await?;
        let clock_ms: i64 = D::sql(format!("SELECT {now}")).scalar(&mut tx).await?.unwrap_or_default();
        self.commit(tx).await?;
        let mut nodes = others;
        nodes.push(NodeInfo { id: node.to_string(), started_at, info });
        nodes.sort_by(|a, b| (a.started_at, &a.id).cmp(&(b.started_at, &b.id)));
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
