//! `batchd migrate`: moves an embedded install (a data directory: SQLite + a local blob
//! directory) to PostgreSQL and a blob URL (S3 or another directory), for scale-out.
//!
//! Stop the embedded server first (the data directory's lock is taken, so a running one is
//! refused). The file bytes are copied first (an object already there with the same size is
//! skipped, so a second run after a failure redoes only what is missing), then every row in
//! one PostgreSQL transaction. A target database that already holds data is refused: nothing
//! is merged. Batches that were running resume on the new nodes from their first line without
//! a durable result.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use futures::TryStreamExt;

use crate::backend::DataDirLock;
use crate::blob::{Blob, BlobUrl};
use crate::store::migrate;
use crate::store::postgres::PgStore;
use crate::store::sqlite::SqliteStore;
use crate::store::DatabaseUrl;

pub const EXAMPLES: &str = "Examples:
  batchd migrate --from-data-dir ./batchd-data --database postgres://batchd@db:5432/batchd --blob s3://batchd-files/prod
  AWS_ENDPOINT_URL=http://minio:9000 batchd migrate --from-data-dir /var/lib/batchd --database postgres://batchd@db/batchd --blob s3://batchd";

#[derive(Args, Debug, Clone)]
pub struct MigrateArgs {
    /// The embedded install to copy (holds batchd.db and blobs/); its server must be stopped.
    #[arg(long)]
    pub from_data_dir: PathBuf,
    /// The target PostgreSQL database (must be empty).
    #[arg(long, env = "BATCHD_DATABASE_URL")]
    pub database: String,
    /// The target blob store: s3://BUCKET/PREFIX (AWS_* environment) or file://PATH.
    #[arg(long, env = "BATCHD_BLOB_URL")]
    pub blob: String,
}

pub async fn run(a: MigrateArgs) -> anyhow::Result<i32> {
    let url = match a.database.parse::<DatabaseUrl>().map_err(anyhow::Error::msg)? {
        DatabaseUrl::Postgres(url) => url,
        DatabaseUrl::Sqlite(_) => anyhow::bail!("the target of a migration is a PostgreSQL database (postgres://…)"),
    };
    let blob_url: BlobUrl = a.blob.parse().map_err(anyhow::Error::msg)?;
    let dir = &a.from_data_dir;
    let db_file = dir.join("batchd.db");
    anyhow::ensure!(db_file.is_file(), "{} holds no embedded store (no batchd.db)", dir.display());
    let _lock = DataDirLock::acquire(dir).context("stop the server that uses it first")?;
    let from = SqliteStore::open(&db_file).await.context("opening the embedded store")?;
    let from_blob = Blob::local(&dir.join("blobs")).context("opening the embedded blob directory")?;
    let to = PgStore::open(url.expose()).await.context("opening the target database")?;
    if !migrate::target_is_empty(&to).await? {
        eprintln!("error: the target database already holds files, batches or events; batchd migrate copies into an empty database only");
        return Ok(1);
    }
    let to_blob = Blob::open(&blob_url).with_context(|| format!("opening the target blob store {blob_url}"))?;
    let (copied, skipped, missing) = copy_blobs(&from, &from_blob, &to_blob).await?;
    eprintln!("file bytes: {copied} objects copied, {skipped} already there, {missing} missing in the source");
    let rows = migrate::copy_rows(&from, &to).await.context("copying the rows")?;
    for (table, n) in rows {
        eprintln!("{table}: {n} rows");
    }
    println!("migrated {} to {} and {blob_url}", dir.display(), DatabaseUrl::Postgres(url));
    Ok(0)
}

/// Copies the bytes of every file row; returns (copied, already there, missing).
async fn copy_blobs(from: &SqliteStore, src: &Blob, dst: &Blob) -> anyhow::Result<(u64, u64, u64)> {
    let (mut copied, mut skipped, mut missing) = (0, 0, 0);
    for (key, bytes) in migrate::file_blobs(from).await? {
        if dst.size(&key).await.ok() == Some(bytes as u64) {
            skipped += 1;
            continue;
        }
        let mut stream = match src.get_stream(&key).await {
            Ok(s) => s,
            Err(crate::blob::Error::NotFound(_)) => {
                tracing::warn!(key, "a file row names bytes the source does not have; its content will be unavailable");
                missing += 1;
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("reading {key}")),
        };
        let mut w = dst.writer(&key);
        while let Some(chunk) = stream.try_next().await.with_context(|| format!("reading {key}"))? {
            w.write(&chunk).await.with_context(|| format!("writing {key}"))?;
        }
        w.finish().await.with_context(|| format!("writing {key}"))?;
        copied += 1;
    }
    Ok((copied, skipped, missing))
}
