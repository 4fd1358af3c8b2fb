//! Backend selection, in one place at start-up: which [`Store`] and which [`Blob`] a node
//! uses, from `--database URL` and `--blob URL` (or their `BATCHD_*` variables and
//! `[server] database` / `[server] blob`).
//!
//! - database: none (the default) is the embedded SQLite file `DATA_DIR/batchd.db`;
//!   `sqlite://PATH` another SQLite file; `postgres://…` (or `postgresql://…`) PostgreSQL.
//! - blob: none (the default) is the directory `DATA_DIR/blobs`; `file://PATH` (or a plain
//!   path) another directory; `s3://BUCKET/PREFIX` an S3-compatible bucket.
//!
//! An embedded SQLite store belongs to one process (`exclusive`: leases left by a crashed
//! predecessor are released at start, and a lock file keeps a second process out). With both a
//! database and a blob URL given, nothing is written to local disk: no data directory, no lock.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;

use crate::blob::{Blob, BlobUrl};
use crate::config::Config;
use crate::store::postgres::PgStore;
use crate::store::sqlite::SqliteStore;
use crate::store::{DatabaseUrl, Store};

/// What a node runs on.
pub struct Backends {
    pub store: Arc<dyn Store>,
    pub blob: Blob,
    /// The store belongs to this process alone (embedded SQLite).
    pub exclusive: bool,
    /// Held for the life of the process when a local store or directory is used.
    pub locks: Vec<DataDirLock>,
}

impl Backends {
    /// Opens the store and blob store `cfg` names.
    pub async fn open(cfg: &Config) -> anyhow::Result<Backends> {
        let mut locks = Vec::new();
        if cfg.database.is_none() || cfg.blob.is_none() {
            std::fs::create_dir_all(&cfg.data_dir).with_context(|| format!("creating data directory {}", cfg.data_dir.display()))?;
            locks.push(DataDirLock::acquire(&cfg.data_dir)?);
        }
        let database = cfg.database.clone().unwrap_or_else(|| DatabaseUrl::Sqlite(cfg.data_dir.join("batchd.db")));
        let (store, exclusive): (Arc<dyn Store>, bool) = match &database {
            DatabaseUrl::Sqlite(path) => {
                if cfg.database.is_some() {
                    locks.push(lock_beside(path)?);
                }
                (Arc::new(SqliteStore::open(path).await.with_context(|| format!("opening the SQLite store {}", path.display()))?), true)
            }
            DatabaseUrl::Postgres(url) => {
                let store = PgStore::open(url.expose()).await.with_context(|| format!("opening the PostgreSQL store {database}"))?;
                (Arc::new(store), false)
            }
        };
        let blob_url = cfg.blob.clone().unwrap_or_else(|| BlobUrl::Local(cfg.data_dir.join("blobs")));
        let blob = Blob::open(&blob_url).with_context(|| format!("opening the blob store {blob_url}"))?;
        tracing::info!(database = %database, blob = %blob_url, "backends opened");
        Ok(Backends { store, blob, exclusive, locks })
    }
}

/// Locks `PATH.lock` next to an SQLite file given by URL (its directory is created if
/// missing), so that two processes never open it as their own.
fn lock_beside(path: &Path) -> anyhow::Result<DataDirLock> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut lock = path.as_os_str().to_owned();
    lock.push(".lock");
    DataDirLock::acquire_file(Path::new(&lock))
}

/// Opens the embedded store (`batchd.db`) and blob directory (`blobs/`) of a data directory,
/// holding an exclusive lock on it for the life of the process.
pub async fn open_data_dir(dir: &Path) -> anyhow::Result<(Arc<dyn Store>, Blob, DataDirLock)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating data directory {}", dir.display()))?;
    let lock = DataDirLock::acquire(dir)?;
    let store = SqliteStore::open(&dir.join("batchd.db")).await.context("opening the SQLite store")?;
    let blob = Blob::local(&dir.join("blobs")).context("opening the blob directory")?;
    Ok((Arc::new(store), blob, lock))
}

/// An exclusive advisory lock on the data directory: two processes never share one.
pub struct DataDirLock {
    _file: std::fs::File,
}

impl DataDirLock {
    pub fn acquire(dir: &Path) -> anyhow::Result<DataDirLock> {
        Self::acquire_file(&dir.join("batchd.lock")).map_err(|_| anyhow::anyhow!("the data directory {} is in use by another batchd process", dir.display()))
    }

    /// Locks one lock file (created if missing).
    pub fn acquire_file(path: &Path) -> anyhow::Result<DataDirLock> {
        use std::os::fd::AsRawFd;
        let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(path)?;
        // SAFETY: flock on a file descriptor we own; no memory is shared.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            anyhow::bail!("{} is locked by another batchd process", path.display());
        }
        Ok(DataDirLock { _file: file })
    }
}
