//! File rows: insert, read, list (paged by `seq`), delete, expiry.

use async_trait::async_trait;
use sqlx::sqlite::{SqlitePool, SqliteRow};
use sqlx::{QueryBuilder, Row, Sqlite};

use super::{db_err, SqliteStore, FINAL};
use crate::store::*;

pub(super) fn file_from_row(r: &SqliteRow) -> FileRecord {
    FileRecord {
        id: r.get("id"),
        tenant: r.get("tenant"),
        bytes: super::int(r, "bytes"),
        created_at: super::int(r, "created_at"),
        filename: r.get("filename"),
        purpose: r.get("purpose"),
        expires_at: super::opt_int(r, "expires_at"),
        blob_key: r.get("blob_key"),
    }
}

pub(super) const INSERT_FILE: &str = "INSERT INTO files (id, tenant, bytes, created_at, filename, purpose, expires_at, blob_key)
     VALUES (?, ?, ?, ?, ?, ?, ?, ?)";
pub(super) const INSERT_FILE_IF_NEW: &str = "INSERT INTO files (id, tenant, bytes, created_at, filename, purpose, expires_at, blob_key)
     VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING";

/// `INSERT` of a file row (`sql` is [`INSERT_FILE`] or [`INSERT_FILE_IF_NEW`]).
pub(super) fn insert_file_query<'a>(f: &'a FileRecord, sql: &'static str) -> sqlx::query::Query<'a, Sqlite, sqlx::sqlite::SqliteArguments<'a>> {
    sqlx::query(sql).bind(&f.id).bind(&f.tenant).bind(f.bytes).bind(f.created_at).bind(&f.filename).bind(&f.purpose).bind(f.expires_at).bind(&f.blob_key)
}

/// The `seq` of a list cursor, scoped to the tenant; an unknown cursor is a `NotFound`.
pub(super) async fn cursor_seq(pool: &SqlitePool, table: &str, tenant: &str, after: Option<&str>) -> Result<Option<i64>> {
    let Some(after) = after else { return Ok(None) };
    let sql = format!("SELECT seq FROM {table} WHERE id = ? AND tenant = ?");
    sqlx::query_scalar(&sql).bind(after).bind(tenant).fetch_one(pool).await.map(Some).map_err(db_err)
}

pub(super) fn page<T>(mut items: Vec<T>, limit: u32) -> Page<T> {
    let has_more = items.len() > limit as usize;
    items.truncate(limit as usize);
    Page { items, has_more }
}

#[async_trait]
impl Files for SqliteStore {
    async fn insert_file(&self, f: &FileRecord) -> Result<()> {
        let r = insert_file_query(f, INSERT_FILE).execute(&self.pool).await;
        self.counted(r.map(|_| ()).map_err(db_err))
    }

    async fn get_file(&self, tenant: &str, id: &str, now: i64) -> Result<FileRecord> {
        sqlx::query("SELECT * FROM files WHERE id = ? AND tenant = ? AND (expires_at IS NULL OR expires_at > ?)")
            .bind(id)
            .bind(tenant)
            .bind(now)
            .fetch_one(&self.pool)
            .await
            .map(|r| file_from_row(&r))
            .map_err(db_err)
    }

    async fn list_files(&self, tenant: &str, q: &FileQuery, now: i64) -> Result<Page<FileRecord>> {
        let cursor = cursor_seq(&self.pool, "files", tenant, q.after.as_deref()).await?;
        let mut b = QueryBuilder::<Sqlite>::new("SELECT * FROM files WHERE tenant = ");
        b.push_bind(tenant).push(" AND (expires_at IS NULL OR expires_at > ").push_bind(now).push(")");
        if let Some(p) = &q.purpose {
            b.push(" AND purpose = ").push_bind(p);
        }
        if let Some(seq) = cursor {
            b.push(if q.ascending { " AND seq > " } else { " AND seq < " }).push_bind(seq);
        }
        b.push(if q.ascending { " ORDER BY seq ASC" } else { " ORDER BY seq DESC" });
        b.push(" LIMIT ").push_bind(q.limit as i64 + 1);
        let rows = b.build().fetch_all(&self.pool).await.map_err(db_err)?;
        Ok(page(rows.iter().map(file_from_row).collect(), q.limit))
    }

    async fn delete_file(&self, tenant: &str, id: &str, now: i64) -> Result<FileRecord> {
        let file = self.get_file(tenant, id, now).await?;
        let sql = format!(
            "DELETE FROM files WHERE id = ? AND NOT EXISTS
             (SELECT 1 FROM batches WHERE input_file_id = files.id AND status NOT IN {FINAL})"
        );
        let r = sqlx::query(&sql).bind(id).execute(&self.pool).await.map_err(db_err)?;
        self.commits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if r.rows_affected() == 0 {
            return Err(Error::Conflict(format!("file {id} is the input of a batch that is still running; cancel the batch or wait for it to end")));
        }
        Ok(file)
    }

    async fn expired_files(&self, now: i64, limit: u32) -> Result<Vec<FileRecord>> {
        let sql = format!(
            "SELECT * FROM files WHERE expires_at IS NOT NULL AND expires_at <= ? AND NOT EXISTS
             (SELECT 1 FROM batches WHERE input_file_id = files.id AND status NOT IN {FINAL}) LIMIT ?"
        );
        let rows = sqlx::query(&sql).bind(now).bind(limit as i64).fetch_all(&self.pool).await.map_err(db_err)?;
        Ok(rows.iter().map(file_from_row).collect())
    }

    async fn purge_file(&self, id: &str) -> Result<()> {
        let r = sqlx::query("DELETE FROM files WHERE id = ?").bind(id).execute(&self.pool).await;
        self.counted(r.map(|_| ()).map_err(db_err))
    }

    async fn existing_file_ids(&self, ids: &[String]) -> Result<Vec<String>> {
        let mut found = Vec::new();
        for chunk in ids.chunks(super::ROWS_PER_INSERT) {
            let mut b = QueryBuilder::<Sqlite>::new("SELECT id FROM files WHERE id IN (");
            let mut sep = b.separated(", ");
            for id in chunk {
                sep.push_bind(id);
            }
            b.push(")");
            let rows = b.build().persistent(false).fetch_all(&self.pool).await.map_err(db_err)?;
            found.extend(rows.iter().map(|r| r.get::<String, _>(0)));
        }
        Ok(found)
    }
}
