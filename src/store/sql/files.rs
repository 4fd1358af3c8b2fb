//! File rows: insert, read, list (paged by `seq`), delete, expiry.
//!
//! A list cursor is the id of the last item of the previous page, read as that item's `seq`.
//! A deleted file leaves a tombstone (its id, tenant and `seq`) for [`TOMBSTONE_TTL_MS`], so
//! that a cursor naming it still places the next page: a client that deletes what it pages
//! through (the SDK's `for f in client.files.list(): client.files.delete(f.id)`) empties
//! the list instead of meeting an unknown cursor.

use async_trait::async_trait;

use super::{page, Dialect, SqlStore, Stmt, FINAL, ROWS_PER_STATEMENT};
use crate::store::*;

/// How long a deleted file's id still works as a list cursor.
pub(super) const TOMBSTONE_TTL_MS: i64 = 7 * 24 * 3600 * 1000;

/// `INSERT` of a file row; with `if_new`, a row with the same id is left as it is.
pub(super) fn insert_file<'q, D: Dialect>(f: &'q FileRecord, if_new: bool) -> Stmt<'q, D> {
    let tail = if if_new { " ON CONFLICT (id) DO NOTHING" } else { "" };
    D::sql(format!("INSERT INTO files (id, tenant, bytes, created_at, filename, purpose, expires_at, blob_key) VALUES ($1, $2, $3, $4, $5, $6, $7, $8){tail}"))
        .bind(&f.id)
        .bind(&f.tenant)
        .bind(f.bytes)
        .bind(f.created_at)
        .bind(&f.filename)
        .bind(&f.purpose)
        .bind(f.expires_at)
        .bind(&f.blob_key)
}

impl<D: Dialect> SqlStore<D> {
    /// The `seq` of a list cursor in `table` (a live row or a tombstone), scoped to the
    /// tenant; an id it never had is `NotFound`.
    pub(super) async fn cursor_seq(&self, table: &str, tenant: &str, after: Option<&str>) -> Result<Option<i64>> {
        let Some(after) = after else { return Ok(None) };
        let stmt =
            D::sql(format!("SELECT seq FROM {table} WHERE id = $1 AND tenant = $2 UNION ALL SELECT seq FROM tombstones WHERE id = $1 AND tenant = $2 LIMIT 1"));
        stmt.bind(after).bind(tenant).scalar(&mut *self.conn().await?).await?.ok_or(Error::NotFound).map(Some)
    }

    /// Deletes the file row `id` where `guard` (SQL) holds, leaving its tombstone and
    /// pruning old ones, in one transaction; whether it was deleted.
    async fn delete_file_row(&self, id: &str, guard: &str) -> Result<bool> {
        let mut tx = self.write().await?;
        let deleted: Option<(String, i64)> =
            D::sql(format!("DELETE FROM files WHERE id = $1{guard} RETURNING tenant, seq")).bind(id).fetch_optional(&mut *tx).await?;
        let Some((tenant, seq)) = deleted else { return Ok(false) };
        let now = D::NOW_MS;
        D::sql(format!("INSERT INTO tombstones (id, tenant, seq, deleted_ms) VALUES ($1, $2, $3, {now}) ON CONFLICT (id) DO NOTHING"))
            .bind(id)
            .bind(tenant)
            .bind(seq)
            .execute(&mut *tx)
            .await?;
        D::sql(format!("DELETE FROM tombstones WHERE deleted_ms < {now} - $1")).bind(TOMBSTONE_TTL_MS).execute(&mut *tx).await?;
        self.commit(tx).await?;
        Ok(true)
    }
}

#[async_trait]
impl<D: Dialect> Files for SqlStore<D> {
    async fn insert_file(&self, f: &FileRecord) -> Result<()> {
        self.write_one(insert_file(f, false)).await.map(|_| ())
    }

    async fn get_file(&self, tenant: &str, id: &FileId, now: i64) -> Result<FileRecord> {
        let stmt = D::sql("SELECT * FROM files WHERE id = $1 AND tenant = $2 AND (expires_at IS NULL OR expires_at > $3)");
        stmt.bind(id).bind(tenant).bind(now).fetch_one(&mut *self.conn().await?).await
    }

    async fn list_files(&self, tenant: &str, q: &FileQuery, now: i64) -> Result<Page<FileRecord>> {
        let cursor = self.cursor_seq("files", tenant, q.after.as_deref()).await?;
        let mut s = D::sql("SELECT * FROM files WHERE tenant = $1 AND (expires_at IS NULL OR expires_at > $2)").bind(tenant).bind(now);
        if let Some(p) = &q.purpose {
            s.push(" AND purpose = ").push_bind(p);
        }
        if let Some(seq) = cursor {
            s.push(if q.ascending { " AND seq > " } else { " AND seq < " }).push_bind(seq);
        }
        s.push(if q.ascending { " ORDER BY seq ASC LIMIT " } else { " ORDER BY seq DESC LIMIT " }).push_bind(q.limit as i64 + 1);
        Ok(page(self.read(s).await?, q.limit))
    }

    async fn delete_file(&self, tenant: &str, id: &FileId, now: i64) -> Result<FileRecord> {
        let file = self.get_file(tenant, id, now).await?;
        let running = format!(" AND NOT EXISTS (SELECT 1 FROM batches WHERE input_file_id = files.id AND status NOT IN {FINAL})");
        if !self.delete_file_row(id, &running).await? {
            return Err(Error::Conflict(format!("file {id} is the input of a batch that is still running; cancel the batch or wait for it to end")));
        }
        Ok(file)
    }

    async fn expired_files(&self, now: i64, limit: u32) -> Result<Vec<FileRecord>> {
        let stmt = D::sql(format!(
            "SELECT * FROM files WHERE expires_at IS NOT NULL AND expires_at <= $1 AND NOT EXISTS
             (SELECT 1 FROM batches WHERE input_file_id = files.id AND status NOT IN {FINAL}) LIMIT $2"
        ));
        self.read(stmt.bind(now).bind(limit as i64)).await
    }

    async fn purge_file(&self, id: &FileId) -> Result<()> {
        self.delete_file_row(id, "").await.map(|_| ())
    }

    async fn existing_file_ids(&self, ids: &[FileId]) -> Result<Vec<FileId>> {
        let mut found = Vec::new();
        for chunk in ids.chunks(ROWS_PER_STATEMENT) {
            let mut s = D::sql("SELECT id FROM files WHERE id IN (");
            s.push_list(chunk).push(")");
            found.extend(s.one_off().scalars::<FileId>(&mut *self.conn().await?).await?);
        }
        Ok(found)
    }
}
