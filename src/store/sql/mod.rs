//! The one SQL store: [`SqlStore<D>`] implements every store trait once, for any [`Dialect`].
//!
//! Each statement is written once, with `$N` placeholders, and runs on SQLite and PostgreSQL
//! alike; the few things that differ are asked of the dialect (its clock, row locks, the
//! admission and outbox locks, saturating sums, the result log's layout). One file per
//! concern: [`files`], [`batches`] (create, read, list, cancel, quotas, usage), [`work`]
//! (transitions, claims, leases), [`results`] (the group commit and the log's reads),
//! [`outbox`] (events, webhook deliveries), [`cluster`] (nodes). Rows decode through the
//! shared `FromRow` types of [`rows`].
//!
//! Every write transaction is counted ([`crate::store::Store::commits`], the durability
//! budget); a group commit of results is one.

mod batches;
mod cluster;
pub mod dialect;
mod files;
mod outbox;
mod remote;
mod results;
mod rows;
mod work;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::{Pool, Transaction};

pub(crate) use dialect::driver_glue;
pub use dialect::{Dialect, Param, Record, Stmt};
pub(crate) use rows::Count;

use crate::store::{Result, Store};

/// Batches in a status that never changes again, as an SQL list.
const FINAL: &str = "('completed','failed','expired','cancelled')";
/// Values per statement where a list is bound one placeholder each (`IN (…)`, multi-row
/// `VALUES`): far below both databases' limits, and a statement that stays small.
const ROWS_PER_STATEMENT: usize = 400;
/// The largest value a stored counter takes, as SQL (sums saturate here).
const MAX: &str = "9223372036854775807";

/// The store over one database pool.
pub struct SqlStore<D: Dialect> {
    pool: Pool<D>,
    commits: AtomicU64,
    /// The dialect's own state for addressing the result log.
    log: D::Log,
}

impl<D: Dialect> SqlStore<D> {
    /// A store over `pool`, whose schema is migrated.
    pub(crate) fn new(pool: Pool<D>) -> SqlStore<D> {
        SqlStore { pool, commits: AtomicU64::new(0), log: D::Log::default() }
    }

    /// The connection pool, for the one-off copy between backends (`store::migrate`) and the
    /// store's tests.
    pub fn pool(&self) -> &Pool<D> {
        &self.pool
    }

    async fn conn(&self) -> Result<PoolConnection<D>> {
        self.pool.acquire().await.map_err(D::error)
    }

    async fn write(&self) -> Result<Transaction<'static, D>> {
        D::begin_write(&self.pool).await.map_err(D::error)
    }

    /// Commits a write transaction, counting it.
    async fn commit(&self, tx: Transaction<'static, D>) -> Result<()> {
        tx.commit().await.map_err(D::error)?;
        self.count();
        Ok(())
    }

    fn count(&self) {
        self.commits.fetch_add(1, Ordering::Relaxed);
    }

    /// Runs one statement on its own (its own transaction), counting it.
    async fn write_one(&self, stmt: Stmt<'_, D>) -> Result<u64> {
        let n = stmt.execute(&mut *self.conn().await?).await?;
        self.count();
        Ok(n)
    }

    /// Runs a read on a pooled connection.
    async fn read<T: Record>(&self, stmt: Stmt<'_, D>) -> Result<Vec<T>> {
        stmt.fetch_all(&mut *self.conn().await?).await
    }
}

impl<D: Dialect> Store for SqlStore<D> {
    fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }
}

/// A duration in whole milliseconds, as the store's times are.
fn ms(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

/// A page of `limit` items from `items` (read with one more, to tell whether more follow).
fn page<T>(mut items: Vec<T>, limit: u32) -> crate::store::Page<T> {
    let has_more = items.len() > limit as usize;
    items.truncate(limit as usize);
    crate::store::Page { items, has_more }
}
