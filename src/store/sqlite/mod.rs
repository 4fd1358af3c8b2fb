//! The embedded store: one SQLite file in WAL mode, `synchronous = FULL`.
//!
//! Writes are serialised by SQLite itself; every engine write is a single statement or one
//! short transaction, so a `kill -9` leaves either all of a group commit or none of it.
//! The schema is versioned with `PRAGMA user_version` and migrated on open. Lease, claim and
//! heartbeat times are taken from SQLite's clock (unix milliseconds), like the PostgreSQL
//! backend takes them from the server's.
//!
//! One file per concern: `files`, `batches`, `work` (transitions, claims, leases,
//! results), `outbox` (events, webhook deliveries, nodes).

mod batches;
mod files;
mod outbox;
mod work;

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow, SqliteSynchronous};
use sqlx::Row;

use super::*;

/// Each entry migrates the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    include_str!("schema_v1.sql"),
    include_str!("schema_v2.sql"),
    include_str!("schema_v3.sql"),
    include_str!("schema_v4.sql"),
    include_str!("schema_v5.sql"),
];
const FINAL: &str = "('completed','failed','expired','cancelled')";
const ROWS_PER_INSERT: usize = 400;
/// The store's clock, in unix milliseconds.
const NOW_MS: &str = "CAST(unixepoch('subsec') * 1000 AS INTEGER)";

pub struct SqliteStore {
    pool: SqlitePool,
    commits: AtomicU64,
    /// `batches.seq` by batch id (immutable once created): the high half of result keys.
    seqs: Mutex<HashMap<String, i64>>,
}

/// A result's key: its batch's `seq` and its line, packed (lines are below 2^32).
fn result_key(seq: i64, line: u64) -> i64 {
    (seq << 32) | line as i64
}

fn key_line(key: i64) -> u64 {
    (key & 0xffff_ffff) as u64
}

/// SQLite's primary result code for "database or disk is full".
const SQLITE_FULL: &str = "13";

pub(crate) fn db_err(e: sqlx::Error) -> Error {
    match e {
        sqlx::Error::RowNotFound => Error::NotFound,
        sqlx::Error::Database(d) if d.code().is_some_and(|c| c == SQLITE_FULL) => Error::Full(d.message().to_string()),
        sqlx::Error::Database(d) if d.message().contains("disk is full") => Error::Full(d.message().to_string()),
        sqlx::Error::Database(d) if ["database is locked", "disk I/O error", "unable to open"].iter().any(|m| d.message().contains(m)) => {
            Error::Unavailable(d.message().to_string())
        }
        sqlx::Error::Io(io) if io.kind() == std::io::ErrorKind::StorageFull => Error::Full(io.to_string()),
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => Error::Unavailable(e.to_string()),
        other => Error::Other(other.to_string()),
    }
}

fn ms(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and migrates it.
    pub async fn open(path: &Path) -> Result<SqliteStore> {
        let opts = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
            .map_err(db_err)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(5))
            .pragma("cache_size", "-2000")
            // Process-wide: all connections' page caches together stay near 4 MiB. Without
            // it they fill up to 4 × 2 MB as the file grows (10 MB held after finalizing
            // 1,000,000 results, under 1 MB after 100,000).
            .pragma("soft_heap_limit", "4194304");
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10))
            // A transaction that failed mid-way (SQLITE_FULL rolls it back inside SQLite, and
            // the driver's own ROLLBACK then fails) leaves the driver believing the connection
            // is still in it, and every later BEGIN on it fails: close such a connection
            // instead of returning it to the pool, so a full disk never wedges the store.
            .after_release(|conn, _| Box::pin(async move { Ok(!sqlx::Connection::is_in_transaction(conn)) }))
            .connect_with(opts)
            .await
            .map_err(db_err)?;
        let store = SqliteStore { pool, commits: AtomicU64::new(0), seqs: Mutex::default() };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<()> {
        let mut conn = self.pool.acquire().await.map_err(db_err)?;
        let version: i64 = sqlx::query_scalar("PRAGMA user_version").fetch_one(&mut *conn).await.map_err(db_err)?;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let mut tx = sqlx::Connection::begin(&mut *conn).await.map_err(db_err)?;
            sqlx::raw_sql(sql).execute(&mut *tx).await.map_err(db_err)?;
            sqlx::raw_sql(&format!("PRAGMA user_version = {}", i + 1)).execute(&mut *tx).await.map_err(db_err)?;
            tx.commit().await.map_err(db_err)?;
            tracing::info!(version = i + 1, "migrated the SQLite schema");
        }
        Ok(())
    }

    /// The connection pool, for the one-off copy into another backend (`store::migrate`).
    pub(crate) fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// The `seq` of a batch, from the cache or the store.
    async fn seq(&self, batch_id: &str) -> Result<i64> {
        if let Some(s) = self.seqs.lock().unwrap_or_else(|p| p.into_inner()).get(batch_id) {
            return Ok(*s);
        }
        let seq: i64 = sqlx::query_scalar("SELECT seq FROM batches WHERE id = ?").bind(batch_id).fetch_one(&self.pool).await.map_err(db_err)?;
        self.seqs.lock().unwrap_or_else(|p| p.into_inner()).insert(batch_id.to_string(), seq);
        Ok(seq)
    }

    /// A write transaction that takes SQLite's write lock at once (`BEGIN IMMEDIATE`): a
    /// transaction that reads first and writes later could otherwise fail with "database is
    /// locked" when another writer got in between, whatever the busy timeout.
    async fn write_tx(&self) -> std::result::Result<sqlx::Transaction<'static, sqlx::Sqlite>, sqlx::Error> {
        self.pool.begin_with("BEGIN IMMEDIATE").await
    }

    fn counted<T>(&self, r: Result<T>) -> Result<T> {
        if r.is_ok() {
            self.commits.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// Drops a batch's cached `seq` once it is final (the cache stays as small as the set of
    /// batches in flight).
    fn forget_seq(&self, batch_id: &str) {
        self.seqs.lock().unwrap_or_else(|p| p.into_inner()).remove(batch_id);
    }
}

/// An integer column read tolerantly: a REAL (written by an older build that overflowed) is
/// clamped into range, a NULL or anything else reads as 0. One odd row never fails a read.
fn int(r: &SqliteRow, col: &str) -> i64 {
    if let Ok(v) = r.try_get::<Option<i64>, _>(col) {
        return v.unwrap_or(0);
    }
    match r.try_get::<Option<f64>, _>(col) {
        Ok(Some(f)) if f.is_finite() => f.clamp(0.0, i64::MAX as f64) as i64,
        Ok(Some(f)) if f > 0.0 => i64::MAX,
        _ => 0,
    }
}

fn opt_int(r: &SqliteRow, col: &str) -> Option<i64> {
    r.try_get::<Option<i64>, _>(col).ok().flatten()
}

impl Store for SqliteStore {
    fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests;
