//! The embedded dialect: one SQLite file in WAL mode, `synchronous = FULL` ([`SqliteStore`]).
//!
//! SQLite serialises writers itself: every write transaction starts with `BEGIN IMMEDIATE`,
//! which takes the write lock at once, so a transaction never fails half-way because another
//! writer came between its reads and its writes, and needs no row locks (`FOR UPDATE` is
//! empty) and no advisory locks (admissions and the outbox are in turn already). The clock is
//! SQLite's (`unixepoch('subsec')`), like PostgreSQL's server clock.
//!
//! The result log is keyed by one integer, `batches.seq << 32 | line`, the table's rowid: a
//! result costs one table entry and one index entry (by custom_id), and a batch's results are
//! one contiguous range in line order. Each batch's `seq` is cached while it runs.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Pool, Transaction};

pub use sqlx::Sqlite;

use super::sql::{driver_glue, Dialect, Record, SqlStore, Stmt};
use super::{schema, Error, Result, ResultRecord, StoredResult, WorkUnit};

/// The embedded store.
pub type SqliteStore = SqlStore<Sqlite>;

/// Rows per multi-row insert of results.
const ROWS_PER_INSERT: usize = 400;

impl SqlStore<Sqlite> {
    /// Opens (creating if needed) the database file and migrates it.
    pub async fn open(path: &Path) -> Result<SqliteStore> {
        let opts = SqliteConnectOptions::new()
            .filename(path)
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
            .map_err(Sqlite::error)?;
        schema::migrate_sqlite(&mut *pool.acquire().await.map_err(Sqlite::error)?).await?;
        Ok(SqlStore::new(pool))
    }
}

/// SQLite's primary result code for "database or disk is full".
const SQLITE_FULL: &str = "13";

#[async_trait]
impl Dialect for Sqlite {
    /// `?NNN`: numbered like `$NNN`, but found without a search of the names seen so far.
    const PLACEHOLDER: &'static str = "?";
    const NOW_MS: &'static str = "CAST(unixepoch('subsec') * 1000 AS INTEGER)";
    const FOR_UPDATE: &'static str = "";
    const SKIP_LOCKED: &'static str = "";
    const GREATEST: &'static str = "max";
    const JSON_OBJECT: &'static str = "json_object";

    /// `total()` (a float, never an overflow error as `sum()` is), cast back: SQLite clamps
    /// the cast into the integer range.
    fn clamped_sum(expr: &str) -> String {
        format!("CAST(total({expr}) AS INTEGER)")
    }

    type Log = Seqs;

    driver_glue!();

    fn error(e: sqlx::Error) -> Error {
        let class: fn(super::error::Cause) -> Error = match &e {
            sqlx::Error::RowNotFound => return Error::NotFound,
            sqlx::Error::Database(d) if d.code().is_some_and(|c| c == SQLITE_FULL) || d.message().contains("disk is full") => Error::Full,
            sqlx::Error::Database(d) if ["database is locked", "disk I/O error", "unable to open"].iter().any(|m| d.message().contains(m)) => {
                Error::Unavailable
            }
            sqlx::Error::Io(io) if io.kind() == std::io::ErrorKind::StorageFull => Error::Full,
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => Error::Unavailable,
            _ => Error::Other,
        };
        class(Box::new(e))
    }

    /// `BEGIN IMMEDIATE`: the write lock from the first statement on.
    async fn begin_write(pool: &Pool<Self>) -> Result<Transaction<'static, Self>, sqlx::Error> {
        pool.begin_with("BEGIN IMMEDIATE").await
    }

    /// The write transaction already holds SQLite's one write lock.
    async fn lock_tenant(_conn: &mut SqliteConnection, _tenant: &str) -> Result<()> {
        Ok(())
    }

    /// The write transaction already holds SQLite's one write lock: ids are taken in commit order.
    async fn lock_outbox(_conn: &mut SqliteConnection) -> Result<()> {
        Ok(())
    }

    async fn insert_results<'a>(log: &Seqs, conn: &mut SqliteConnection, live: &[&'a ResultRecord]) -> Result<Vec<&'a ResultRecord>> {
        let mut keyed = Vec::with_capacity(live.len());
        for r in live {
            keyed.push((result_key(log.seq(conn, &r.batch_id).await?, r.line), *r));
        }
        let mut inserted = Vec::with_capacity(keyed.len());
        for chunk in keyed.chunks(ROWS_PER_INSERT) {
            inserted.extend(insert_chunk(conn, chunk).await?);
        }
        Ok(inserted)
    }

    async fn done_lines(log: &Seqs, pool: &Pool<Self>, batch_id: &str, unit: &WorkUnit) -> Result<Vec<u64>> {
        let conn = &mut *pool.acquire().await.map_err(Self::error)?;
        let seq = log.seq(conn, batch_id).await?;
        let stmt = Self::sql("SELECT key FROM results WHERE key >= $1 AND key < $2 ORDER BY key")
            .bind(result_key(seq, unit.first_line))
            .bind(result_key(seq, unit.end_line));
        Ok(stmt.scalars::<i64>(conn).await?.into_iter().map(key_line).collect())
    }

    /// `key IN (...)`, a statement per [`ROWS_PER_INSERT`] lines.
    async fn done_among(log: &Seqs, pool: &Pool<Self>, batch_id: &str, lines: &[u64]) -> Result<Vec<u64>> {
        let conn = &mut *pool.acquire().await.map_err(Self::error)?;
        let seq = log.seq(conn, batch_id).await?;
        let mut done = Vec::new();
        for chunk in lines.chunks(ROWS_PER_INSERT) {
            let mut s = Self::sql("SELECT key FROM results WHERE key IN (");
            for (i, &line) in chunk.iter().enumerate() {
                s.push(if i == 0 { "" } else { ", " }).push_bind(result_key(seq, line));
            }
            s.push(")");
            done.extend(s.one_off().scalars::<i64>(conn).await?.into_iter().map(key_line));
        }
        done.sort_unstable();
        Ok(done)
    }

    async fn results_chunk(log: &Seqs, pool: &Pool<Self>, batch_id: &str, ok: Option<bool>, after_line: u64, limit: u32) -> Result<Option<(String, u64)>> {
        let conn = &mut *pool.acquire().await.map_err(Self::error)?;
        let seq = log.seq(conn, batch_id).await?;
        let mut s = Self::sql("SELECT group_concat(record, char(10)), max(key) FROM (SELECT record, key FROM results WHERE key > $1 AND key < $2")
            .bind(result_key(seq, after_line))
            .bind(result_key(seq + 1, 0));
        // Two statements rather than `($3 IS NULL OR ok = $3)`, which costs a quarter more per row.
        if let Some(ok) = ok {
            s.push(" AND ok = ").push_bind(ok);
        }
        s.push(" ORDER BY key LIMIT ").push_bind(limit as i64).push(")");
        // Joined with newlines inside SQLite (one copy per record), the last one added here.
        let (chunk, last) = s.fetch_one::<(Option<String>, Option<i64>)>(conn).await?;
        Ok(chunk.zip(last).map(|(mut c, l)| {
            c.push('\n');
            (c, key_line(l))
        }))
    }

    async fn result_by_custom_id(log: &Seqs, pool: &Pool<Self>, batch_id: &str, custom_id: &str) -> Result<StoredResult> {
        let conn = &mut *pool.acquire().await.map_err(Self::error)?;
        let seq = log.seq(conn, batch_id).await?;
        let stmt = Self::sql("SELECT key, custom_id, ok, record FROM results WHERE key >> 32 = $1 AND custom_id = $2").bind(seq).bind(custom_id);
        let (key, custom_id, ok, record) = stmt.fetch_one::<(i64, String, bool, String)>(conn).await?;
        Ok(StoredResult { line: key_line(key), custom_id, ok, record })
    }

    fn forget_batch(log: &Seqs, batch_id: &str) {
        log.0.lock().unwrap_or_else(|p| p.into_inner()).remove(batch_id);
    }
}

/// `batches.seq` by batch id (immutable once created): the high half of result keys, cached
/// while a batch runs (the cache stays as small as the set of batches in flight).
#[derive(Default)]
pub struct Seqs(Mutex<HashMap<String, i64>>);

impl Seqs {
    async fn seq(&self, conn: &mut SqliteConnection, batch_id: &str) -> Result<i64> {
        if let Some(s) = self.0.lock().unwrap_or_else(|p| p.into_inner()).get(batch_id) {
            return Ok(*s);
        }
        let seq: i64 = Sqlite::sql("SELECT seq FROM batches WHERE id = $1").bind(batch_id).scalar(conn).await?.ok_or(Error::NotFound)?;
        self.0.lock().unwrap_or_else(|p| p.into_inner()).insert(batch_id.to_string(), seq);
        Ok(seq)
    }
}

/// A result's key: its batch's `seq` and its line, packed (lines are below 2^32).
fn result_key(seq: i64, line: u64) -> i64 {
    (seq << 32) | line as i64
}

fn key_line(key: i64) -> u64 {
    (key & 0xffff_ffff) as u64
}

/// Inserts the rows of `chunk` that are new; returns them. Fast path: every row is new (no
/// `RETURNING` to decode), inside a savepoint; a line already recorded (only after a crash
/// or a lost lease) rolls the chunk back to learn exactly which rows are new.
async fn insert_chunk<'a>(conn: &mut SqliteConnection, chunk: &[(i64, &'a ResultRecord)]) -> Result<Vec<&'a ResultRecord>> {
    let mut sp = sqlx::Connection::begin(&mut *conn).await.map_err(Sqlite::error)?;
    if insert_results(chunk, "").build().persistent(false).execute(&mut *sp).await.map_err(Sqlite::error)?.rows_affected() == chunk.len() as u64 {
        sp.commit().await.map_err(Sqlite::error)?;
        return Ok(chunk.iter().map(|(_, r)| *r).collect());
    }
    sp.rollback().await.map_err(Sqlite::error)?;
    let keys: Vec<i64> = insert_results(chunk, " RETURNING key").build_query_scalar().persistent(false).fetch_all(&mut *conn).await.map_err(Sqlite::error)?;
    let by_key: HashMap<i64, &ResultRecord> = chunk.iter().copied().collect();
    Ok(keys.iter().filter_map(|k| by_key.get(k).copied()).collect())
}

/// A multi-row insert of results that skips lines already recorded, with `tail` appended.
/// Plain `?` placeholders: SQLite looks a numbered or named one up in a list, once per
/// placeholder when the statement is prepared and again when it is bound, which costs
/// milliseconds for the 1,600 of a group. Built with `persistent(false)`: a cached statement
/// would keep its last bound records alive, one statement per distinct group size.
fn insert_results<'q>(chunk: &[(i64, &'q ResultRecord)], tail: &str) -> sqlx::QueryBuilder<'q, Sqlite> {
    let mut b = sqlx::QueryBuilder::new("INSERT INTO results (key, custom_id, ok, record) ");
    b.push_values(chunk.iter().copied(), |mut row, (key, r)| {
        row.push_bind(key).push_bind(r.custom_id.as_str()).push_bind(r.ok).push_bind(r.record.as_str());
    });
    b.push(" ON CONFLICT DO NOTHING").push(tail);
    b
}
