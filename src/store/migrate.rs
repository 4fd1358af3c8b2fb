//! Moving an embedded install (SQLite) into PostgreSQL: every row of every table, in one
//! PostgreSQL transaction, so that a copy cut short leaves the target as empty as it was.
//!
//! Rows keep their ids and order (`seq`, event ids, so SSE cursors stay valid), and their
//! sequences are moved past them. Leases, claims and nodes are not copied: the target's nodes
//! start fresh and resume every unit from its first line without a durable result. The
//! target must be empty; see `batchd migrate` for the file bytes.

use std::collections::HashMap;

use sqlx::sqlite::SqliteRow;
use sqlx::{Postgres, QueryBuilder, Row};

use super::postgres::{db_err as pg_err, PgStore};
use super::sqlite::{db_err as sqlite_err, SqliteStore};
use super::{Error, Result};

/// Rows read from SQLite and written to PostgreSQL per statement.
const PAGE: i64 = 500;

#[derive(Clone, Copy)]
enum Kind {
    Int,
    Text,
    Bool,
}

/// A table copied as it is: its name and columns (the same on both sides).
struct Table {
    name: &'static str,
    cols: &'static [(&'static str, Kind)],
}

use Kind::*;

const TABLES: &[Table] = &[
    Table {
        name: "files",
        cols: &[
            ("seq", Int),
            ("id", Text),
            ("tenant", Text),
            ("bytes", Int),
            ("created_at", Int),
            ("filename", Text),
            ("purpose", Text),
            ("expires_at", Int),
            ("blob_key", Text),
        ],
    },
    Table {
        name: "batches",
        cols: &[
            ("seq", Int),
            ("id", Text),
            ("tenant", Text),
            ("idempotency_key", Text),
            ("idempotency_hash", Text),
            ("endpoint", Text),
            ("input_file_id", Text),
            ("completion_window", Text),
            ("metadata", Text),
            ("model", Text),
            ("status", Text),
            ("output_file_id", Text),
            ("error_file_id", Text),
            ("errors", Text),
            ("created_at", Int),
            ("in_progress_at", Int),
            ("expires_at", Int),
            ("finalizing_at", Int),
            ("completed_at", Int),
            ("failed_at", Int),
            ("expired_at", Int),
            ("cancelling_at", Int),
            ("cancelled_at", Int),
            ("total", Int),
            ("completed", Int),
            ("failed", Int),
            ("input_tokens", Int),
            ("cached_tokens", Int),
            ("output_tokens", Int),
            ("reasoning_tokens", Int),
            ("total_tokens", Int),
            ("priority", Int),
            ("input_format", Text),
            ("output_expires_after", Int),
            ("finalize_as", Text),
            ("est_tokens", Int),
            ("last_progress_ms", Int),
            ("est_requests", Int),
        ],
    },
    Table {
        name: "units",
        cols: &[
            ("batch_id", Text),
            ("idx", Int),
            ("first_line", Int),
            ("end_line", Int),
            ("line_count", Int),
            ("byte_offset", Int),
            ("byte_len", Int),
            ("done", Int),
            ("epoch", Int),
        ],
    },
    Table { name: "events", cols: &[("id", Int), ("tenant", Text), ("batch_id", Text), ("type", Text), ("data", Text), ("created_at", Int)] },
    Table { name: "webhook_deliveries", cols: &[("event_id", Int), ("state", Text), ("attempts", Int), ("next_attempt_ms", Int)] },
    Table {
        name: "webhook_attempts",
        cols: &[("event_id", Int), ("at", Int), ("status", Int), ("error", Text), ("duration_ms", Int), ("delivered", Bool), ("retry_at_ms", Int)],
    },
    Table {
        name: "batch_usage",
        cols: &[
            ("batch_id", Text),
            ("model", Text),
            ("hour", Int),
            ("requests", Int),
            ("input_tokens", Int),
            ("cached_tokens", Int),
            ("output_tokens", Int),
            ("reasoning_tokens", Int),
            ("total_tokens", Int),
        ],
    },
];

/// Sequences moved past the copied ids: (table, column).
const SEQUENCES: &[(&str, &str)] = &[("files", "seq"), ("batches", "seq"), ("events", "id"), ("webhook_attempts", "id")];

/// Rows copied per table (results included), in copy order.
pub type Copied = Vec<(&'static str, u64)>;

/// One column of a page of rows, typed for an `UNNEST` bind.
enum Column {
    Int(Vec<Option<i64>>),
    Text(Vec<Option<String>>),
    Bool(Vec<Option<bool>>),
}

/// An integer read tolerantly (a REAL left by an old overflow is clamped), like the SQLite store.
fn sqlite_int(r: &SqliteRow, col: &str) -> Option<i64> {
    if let Ok(v) = r.try_get::<Option<i64>, _>(col) {
        return v;
    }
    r.try_get::<Option<f64>, _>(col).ok().flatten().map(|f| if f.is_finite() { f.clamp(0.0, i64::MAX as f64) as i64 } else { i64::MAX })
}

fn page_columns(table: &Table, rows: &[SqliteRow]) -> Vec<Column> {
    table
        .cols
        .iter()
        .map(|(name, kind)| match kind {
            Int => Column::Int(rows.iter().map(|r| sqlite_int(r, name)).collect()),
            Text => Column::Text(rows.iter().map(|r| r.try_get::<Option<String>, _>(*name).ok().flatten()).collect()),
            Bool => Column::Bool(rows.iter().map(|r| sqlite_int(r, name).map(|v| v != 0)).collect()),
        })
        .collect()
}

/// Whether the target holds any file, batch or event (then nothing is copied).
pub async fn target_is_empty(pg: &PgStore) -> Result<bool> {
    let mut conn = pg.pool().acquire().await.map_err(pg_err)?;
    target_is_empty_tx(&mut conn).await
}

/// Copies every row of `from` into the empty `to`, in one transaction.
pub async fn copy_rows(from: &SqliteStore, to: &PgStore) -> Result<Copied> {
    let mut tx = to.pool().begin().await.map_err(pg_err)?;
    sqlx::query("LOCK TABLE files, batches, events IN EXCLUSIVE MODE").execute(&mut *tx).await.map_err(pg_err)?;
    if !target_is_empty_tx(&mut tx).await? {
        return Err(Error::Conflict("the target database already holds files, batches or events".into()));
    }
    let mut copied = Copied::new();
    for table in TABLES {
        copied.push((table.name, copy_table(from, &mut tx, table).await?));
    }
    copied.push(("results", copy_results(from, &mut tx).await?));
    for (table, col) in SEQUENCES {
        let sql = format!("SELECT setval(pg_get_serial_sequence('{table}', '{col}'), COALESCE(max({col}), 0) + 1, false) FROM {table}");
        sqlx::query(&sql).execute(&mut *tx).await.map_err(pg_err)?;
    }
    tx.commit().await.map_err(pg_err)?;
    Ok(copied)
}

async fn target_is_empty_tx(tx: &mut sqlx::PgConnection) -> Result<bool> {
    let any: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM files) OR EXISTS (SELECT 1 FROM batches) OR EXISTS (SELECT 1 FROM events)")
        .fetch_one(&mut *tx)
        .await
        .map_err(pg_err)?;
    Ok(!any)
}

/// Copies one table a page at a time, in rowid order.
async fn copy_table(from: &SqliteStore, tx: &mut sqlx::PgConnection, table: &Table) -> Result<u64> {
    let names: Vec<&str> = table.cols.iter().map(|(n, _)| *n).collect();
    let select = format!("SELECT rowid AS batchd_rowid, {} FROM {} WHERE rowid > ? ORDER BY rowid LIMIT ?", names.join(", "), table.name);
    let (mut after, mut n) = (0i64, 0u64);
    loop {
        let rows = sqlx::query(&select).bind(after).bind(PAGE).fetch_all(from.pool()).await.map_err(sqlite_err)?;
        let Some(last) = rows.last() else { return Ok(n) };
        after = last.get("batchd_rowid");
        n += rows.len() as u64;
        insert_page(tx, table.name, &names, page_columns(table, &rows)).await?;
    }
}

/// `INSERT INTO table (cols) SELECT * FROM UNNEST($1::…[], …)`.
async fn insert_page(tx: &mut sqlx::PgConnection, table: &str, names: &[&str], columns: Vec<Column>) -> Result<()> {
    let mut b = QueryBuilder::<Postgres>::new(format!("INSERT INTO {table} ({}) SELECT * FROM UNNEST(", names.join(", ")));
    let mut sep = b.separated(", ");
    for c in columns {
        match c {
            Column::Int(v) => sep.push_bind(v).push_unseparated("::bigint[]"),
            Column::Text(v) => sep.push_bind(v).push_unseparated("::text[]"),
            Column::Bool(v) => sep.push_bind(v).push_unseparated("::bool[]"),
        };
    }
    b.push(")");
    b.build().execute(&mut *tx).await.map_err(pg_err)?;
    Ok(())
}

/// Copies the result log: SQLite keys a result by `batch seq << 32 | line`, PostgreSQL by
/// (batch id, line).
async fn copy_results(from: &SqliteStore, tx: &mut sqlx::PgConnection) -> Result<u64> {
    let ids: HashMap<i64, String> =
        sqlx::query_as::<_, (i64, String)>("SELECT seq, id FROM batches").fetch_all(from.pool()).await.map_err(sqlite_err)?.into_iter().collect();
    let (mut after, mut n) = (i64::MIN, 0u64);
    loop {
        let rows: Vec<(i64, String, i64, String)> = sqlx::query_as("SELECT key, custom_id, ok, record FROM results WHERE key > ? ORDER BY key LIMIT ?")
            .bind(after)
            .bind(PAGE)
            .fetch_all(from.pool())
            .await
            .map_err(sqlite_err)?;
        let Some(last) = rows.last() else { return Ok(n) };
        after = last.0;
        n += rows.len() as u64;
        let mut batch = Vec::with_capacity(rows.len());
        for (key, ..) in &rows {
            let id = ids.get(&(key >> 32)).ok_or_else(|| Error::Other(format!("result key {key} names no batch")))?;
            batch.push(Some(id.clone()));
        }
        let columns = vec![
            Column::Text(batch),
            Column::Int(rows.iter().map(|r| Some(r.0 & 0xffff_ffff)).collect()),
            Column::Text(rows.iter().map(|r| Some(r.1.clone())).collect()),
            Column::Bool(rows.iter().map(|r| Some(r.2 != 0)).collect()),
            Column::Text(rows.into_iter().map(|r| Some(r.3)).collect()),
        ];
        insert_page(tx, "results", &["batch_id", "line", "custom_id", "ok", "record"], columns).await?;
    }
}

/// The blob key and size of every file row of `from`, for copying the bytes first.
pub async fn file_blobs(from: &SqliteStore) -> Result<Vec<(String, i64)>> {
    sqlx::query_as("SELECT blob_key, bytes FROM files ORDER BY seq").fetch_all(from.pool()).await.map_err(sqlite_err)
}
