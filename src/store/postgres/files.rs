//! File rows: insert, read, list (paged by `seq`), delete, expiry.

use async_trait::async_trait;
use sqlx::postgres::{PgExecutor, PgRow};
use sqlx::{Postgres, QueryBuilder, Row};

use super::{db_err, PgStore, FINAL};
use crate::store::*;

pub(super) fn file_from_row(r: &PgRow) -> FileRecord {
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

/// Inserts a file row; with `if_new`, a row with the same id is left as it is.
pub(super) async fn insert_file<'e>(conn: impl PgExecutor<'e>, f: &FileRecord, if_new: bool) -> Result<()> {
    let sql = if if_new {
        "INSERT INTO files (id, tenant, bytes, created_at, filename, purpose, expires_at, blob_key)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (id) DO NOTHING"
    } else {
        "INSERT INTO files (id, tenant, bytes, created_at, filename, purpose, expires_at, blob_key)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
    };
    sqlx::query(sql)
        .bind(&f.id)
        .bind(&f.tenant)
        .bind(f.bytes)
        .bind(f.created_at)
        .bind(&f.filename)
        .bind(&f.purpose)
        .bind(f.expires_at)
        .bind(&f.blob_key)
        .execute(conn)
        .await
        .map(|_| ())
        .map_err(db_err)
}

/// The `seq` of a list cursor, scoped to the tenant; an unknown cursor is a `NotFound`.
pub(super) async fn cursor_seq(store: &PgStore, table: &str, tenant: &str, after: Option<&str>) -> Result<Option<i64>> {
    let Some(after) = after else { return Ok(None) };
    let sql = format!("SELECT seq FROM {table} WHERE id = $1 AND tenant = $2");
    sqlx::query_scalar(&sql).bind(after).bind(tenant).fetch_one(&store.pool).await.map(Some).map_err(db_err)
}

pub(super) fn page<T>(mut items: Vec<T>, limit: u32) -> Page<T> {
    let has_more = items.len() > limit as usize;
    items.truncate(limit as usize);
    Page { items, has_more }
}

#[async_trait]
impl Files for PgStore {
    async fn insert_file(&self, f: &FileRecord) -> Result<()> {
        let r = insert_file(&self.pool, f, false).await;
        self.counted(r)
    }

    async fn get_file(&self, tenant: &str, id: &str, now: i64) -> Result<FileRecord> {
        sqlx::query("SELECT * FROM files WHERE id = $1 AND tenant = $2 AND (expires_at IS NULL OR expires_at > $3)")
            .bind(id)
            .bind(tenant)
            .bind(now)
            .fetch_one(&self.pool)
            .await
            .map(|r| file_from_row(&r))
            .map_err(db_err)
    }

    async fn list_files(&self, tenant: &str, q: &FileQuery, now: i64) -> Result<Page<FileRecord>> {
        let cursor = cursor_seq(self, "files", tenant, q.after.as_deref()).await?;
        let mut b = QueryBuilder::<Postgres>::new("SELECT * FROM files WHERE tenant = ");
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
            "DELETE FROM files WHERE id = $1 AND NOT EXISTS
             (SELECT 1 FROM batches WHERE input_file_id = files.id AND status NOT IN {FINAL})"
        );
        let r = sqlx::query(&sql).bind(id).execute(&self.pool).await.map_err(db_err);
        let r = self.counted(r)?;
        if r.rows_affected() == 0 {
            return Err(Error::Conflict(format!("file {id} is the input of a batch that is still running; cancel the batch or wait for it to end")));
        }
        Ok(file)
    }

    async fn expired_files(&self, now: i64, limit: u32) -> Result<Vec<FileRecord>> {
        let sql = format!(
            "SELECT * FROM files WHERE expires_at IS NOT NULL AND expires_at <= $1 AND NOT EXISTS
             (SELECT 1 FROM batches WHERE input_file_id = files.id AND status NOT IN {FINAL}) LIMIT $2"
        );
        let rows = sqlx::query(&sql).bind(now).bind(limit as i64).fetch_all(&self.pool).await.map_err(db_err)?;
        Ok(rows.iter().map(file_from_row).collect())
    }

    async fn purge_file(&self, id: &str) -> Result<()> {
        let r = sqlx::query("DELETE FROM files WHERE id = $1").bind(id).execute(&self.pool).await;
        self.counted(r.map(|_| ()).map_err(db_err))
    }

    async fn existing_file_ids(&self, ids: &[String]) -> Result<Vec<String>> {
        sqlx::query_scalar("SELECT id FROM files WHERE id = ANY($1)").bind(ids).fetch_all(&self.pool).await.map_err(db_err)
    }
}
