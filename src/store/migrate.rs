//! Moving an embedded install (SQLite) into PostgreSQL: every row of every table, in one
//! PostgreSQL transaction, so that a copy cut short leaves the target as empty as it was.
//!
//! Rows keep their ids and order (`seq`, event ids, so SSE cursors stay valid), and their
//! sequences are moved past them. Leases, claims and nodes are not copied: the target's nodes
//! start fresh and resume every unit from its first line without a durable result. The
//! target must be empty; see `batchd migrate` for the file bytes.
//!
//! What is copied is read from the target's own schema ([`copy_plan`]): every table and
//! column but [`NOT_COPIED`] and [`NODE_STATE`]. The schema is declared once per database,
//! by its migrations, and a test holds the two schemas and this plan to each other.

use std::collections::HashMap;

use sqlx::postgres::PgConnection;
use sqlx::sqlite::SqliteRow;
use sqlx::{Postgres, QueryBuilder, Row};

use super::postgres::PgStore;
use super::sql::{Count, Dialect};
use super::sqlite::{Sqlite, SqliteStore};
use super::{Error, Result};

/// Rows read from SQLite and written to PostgreSQL per statement.
const PAGE: i64 = 500;

/// Tables not copied row for row: the nodes (a target's nodes start fresh), the result log,
/// which [`copy_results`] re-keys (see [`super::schema::LAYOUT_DIFFERENCES`]), and sqlx's
/// record of the migrations (the target has its own).
pub const NOT_COPIED: &[&str] = &["nodes", "results", "_sqlx_migrations"];

/// Columns left behind: leases and claims, which belong to the nodes of the source (the
/// target's nodes take every unit afresh).
pub const NODE_STATE: &[(&str, &str)] = &[
    ("batches", "claim_owner"),
    ("batches", "claim_expires"),
    ("units", "lease_owner"),
    ("units", "lease_expires"),
    ("webhook_deliveries", "claim_owner"),
    ("webhook_deliveries", "claim_expires"),
];

/// A table copied as it is: its columns with their PostgreSQL types, and the column a
/// sequence numbers, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub name: String,
    pub columns: Vec<(String, String)>,
    pub serial: Option<String>,
}

/// Rows copied per table (results included), in copy order.
pub type Copied = Vec<(String, u64)>;

/// What [`copy_rows`] copies into the database behind `conn`, as its schema says.
pub async fn copy_plan(conn: &mut PgConnection) -> Result<Vec<Table>> {
    let columns: Vec<(String, String, String, Option<String>)> = sqlx::query_as(
        "SELECT table_name::text, column_name::text, data_type::text, column_default::text FROM information_schema.columns
         WHERE table_schema = current_schema() ORDER BY table_name, ordinal_position",
    )
    .fetch_all(&mut *conn)
    .await
    .map_err(Postgres::error)?;
    let mut plan: Vec<Table> = Vec::new();
    for (table, column, ty, default) in columns {
        if NOT_COPIED.contains(&table.as_str()) || NODE_STATE.contains(&(table.as_str(), column.as_str())) {
            continue;
        }
        if plan.last().is_none_or(|t| t.name != table) {
            plan.push(Table { name: table, columns: vec![], serial: None });
        }
        let t = plan.last_mut().expect("pushed above");
        if default.is_some_and(|d| d.starts_with("nextval(")) {
            t.serial = Some(column.clone());
        }
        t.columns.push((column, ty));
    }
    Ok(plan)
}

/// One column of a page of rows, typed for an `UNNEST` bind.
enum Column {
    Int(Vec<Option<i64>>),
    Text(Vec<Option<String>>),
    Bool(Vec<Option<bool>>),
}

/// A page of SQLite rows as typed columns; integers read tolerantly, like the store reads them.
fn page_columns(table: &Table, rows: &[SqliteRow]) -> Result<Vec<Column>> {
    let get = |e: sqlx::Error| Error::corrupt(format!("table {}: {e}", table.name));
    table
        .columns
        .iter()
        .map(|(name, ty)| {
            Ok(match ty.as_str() {
                "bigint" => Column::Int(
                    rows.iter().map(|r| r.try_get::<Option<Count>, _>(name.as_str()).map(|v| v.map(i64::from))).collect::<Result<_, _>>().map_err(get)?,
                ),
                "boolean" => Column::Bool(rows.iter().map(|r| r.try_get::<Option<bool>, _>(name.as_str())).collect::<Result<_, _>>().map_err(get)?),
                "text" => Column::Text(rows.iter().map(|r| r.try_get::<Option<String>, _>(name.as_str())).collect::<Result<_, _>>().map_err(get)?),
                other => return Err(Error::corrupt(format!("column {}.{name} has a type batchd migrate does not copy: {other}", table.name))),
            })
        })
        .collect()
}

/// Whether the target holds any file, batch or event (then nothing is copied).
pub async fn target_is_empty(pg: &PgStore) -> Result<bool> {
    let mut conn = pg.pool().acquire().await.map_err(Postgres::error)?;
    target_is_empty_tx(&mut conn).await
}

/// Copies every row of `from` into the empty `to`, in one transaction.
pub async fn copy_rows(from: &SqliteStore, to: &PgStore) -> Result<Copied> {
    let mut tx = to.pool().begin().await.map_err(Postgres::error)?;
    sqlx::query("LOCK TABLE files, batches, events IN EXCLUSIVE MODE").execute(&mut *tx).await.map_err(Postgres::error)?;
    if !target_is_empty_tx(&mut tx).await? {
        return Err(Error::Conflict("the target database already holds files, batches or events".into()));
    }
    let plan = copy_plan(&mut tx).await?;
    let mut copied = Copied::new();
    for table in &plan {
        copied.push((table.name.clone(), copy_table(from, &mut tx, table).await?));
    }
    copied.push(("results".into(), copy_results(from, &mut tx).await?));
    for (table, col) in plan.iter().filter_map(|t| Some((&t.name, t.serial.as_ref()?))) {
        let sql = format!("SELECT setval(pg_get_serial_sequence('{table}', '{col}'), COALESCE(max({col}), 0) + 1, false) FROM {table}");
        sqlx::query(&sql).execute(&mut *tx).await.map_err(Postgres::error)?;
    }
    tx.commit().await.map_err(Postgres::error)?;
    Ok(copied)
}

async fn target_is_empty_tx(tx: &mut PgConnection) -> Result<bool> {
    let any: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM files) OR EXISTS (SELECT 1 FROM batches) OR EXISTS (SELECT 1 FROM events)")
        .fetch_one(&mut *tx)
        .await
        .map_err(Postgres::error)?;
    Ok(!any)
}

/// Copies one table a page at a time, in rowid order.
async fn copy_table(from: &SqliteStore, tx: &mut PgConnection, table: &Table) -> Result<u64> {
    let names: Vec<&str> = table.columns.iter().map(|(n, _)| n.as_str()).collect();
    let select = format!("SELECT rowid AS batchd_rowid, {} FROM {} WHERE rowid > ? ORDER BY rowid LIMIT ?", names.join(", "), table.name);
    let (mut after, mut n) = (0i64, 0u64);
    loop {
        let rows = sqlx::query(&select).bind(after).bind(PAGE).fetch_all(from.pool()).await.map_err(Sqlite::error)?;
        let Some(last) = rows.last() else { return Ok(n) };
        after = last.get("batchd_rowid");
        n += rows.len() as u64;
        insert_page(tx, &table.name, &names, page_columns(table, &rows)?).await?;
    }
}

/// `INSERT INTO table (cols) SELECT * FROM UNNEST($1::…[], …)`.
async fn insert_page(tx: &mut PgConnection, table: &str, names: &[&str], columns: Vec<Column>) -> Result<()> {
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
    b.build().execute(&mut *tx).await.map_err(Postgres::error)?;
    Ok(())
}

/// Copies the result log: SQLite keys a result by `batch seq << 32 | line`, PostgreSQL by
/// (batch id, line).
async fn copy_results(from: &SqliteStore, tx: &mut PgConnection) -> Result<u64> {
    let ids: HashMap<i64, String> =
        sqlx::query_as::<_, (i64, String)>("SELECT seq, id FROM batches").fetch_all(from.pool()).await.map_err(Sqlite::error)?.into_iter().collect();
    let (mut after, mut n) = (i64::MIN, 0u64);
    loop {
        let rows: Vec<(i64, String, i64, String)> = sqlx::query_as("SELECT key, custom_id, ok, record FROM results WHERE key > ? ORDER BY key LIMIT ?")
            .bind(after)
            .bind(PAGE)
            .fetch_all(from.pool())
            .await
            .map_err(Sqlite::error)?;
        let Some(last) = rows.last() else { return Ok(n) };
        after = last.0;
        n += rows.len() as u64;
        let mut batch = Vec::with_capacity(rows.len());
        for (key, ..) in &rows {
            let id = ids.get(&(key >> 32)).ok_or_else(|| Error::corrupt(format!("result key {key} names no batch")))?;
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
    sqlx::query_as("SELECT blob_key, bytes FROM files ORDER BY seq").fetch_all(from.pool()).await.map_err(Sqlite::error)
}
