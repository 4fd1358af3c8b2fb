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

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

use crate::blob::{Blob, BlobUrl};
use crate::config::{Config, Secret};
use crate::store::postgres::PgStore;
use crate::store::sqlite::SqliteStore;
use crate::store::Store;

/// A metadata store named by `--database URL`.
#[derive(Debug, Clone, PartialEq)]
pub enum DatabaseUrl {
    Sqlite(PathBuf),
    /// The whole URL, which may hold a password: it prints redacted.
    Postgres(Secret),
}

impl std::str::FromStr for DatabaseUrl {
    type Err = String;

    fn from_str(url: &str) -> Result<DatabaseUrl, String> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let opts = url.parse::<sqlx::postgres::PgConnectOptions>();
            return match opts {
                Ok(_) => Ok(DatabaseUrl::Postgres(Secret::new(url))),
                Err(e) => Err(format!("database URL {} is not a valid PostgreSQL URL: {e}", redact_url(url))),
            };
        }
        if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err("database URL sqlite:// names no file (sqlite://PATH)".into());
            }
            return Ok(DatabaseUrl::Sqlite(PathBuf::from(path)));
        }
        Err(format!("database URL {} is neither postgres://USER@HOST:PORT/DB nor sqlite://PATH", redact_url(url)))
    }
}

impl std::fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DatabaseUrl::Sqlite(p) => write!(f, "sqlite://{}", p.display()),
            DatabaseUrl::Postgres(url) => f.write_str(&redact_url(url.expose())),
        }
    }
}

/// `scheme://user:<redacted>@host/…`: a URL with its password hidden.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let (auth, host) = match rest.rsplit_once('@') {
        Some(split) => split,
        None => return url.to_string(),
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:<redacted>@{host}"),
        None => url.to_string(),
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_urls_parse_and_print_without_password() {
        let p = |s: &str| s.parse::<DatabaseUrl>();
        assert_eq!(p("sqlite:///var/lib/b.db"), Ok(DatabaseUrl::Sqlite("/var/lib/b.db".into())));
        let pg = p("postgres://batchd:hunter2@db.internal:5432/batchd").unwrap();
        assert_eq!(pg.to_string(), "postgres://batchd:<redacted>@db.internal:5432/batchd");
        assert!(!format!("{pg:?}").contains("hunter2"));
        assert!(p("postgresql://u@h/db").is_ok());
        assert!(p("mysql://u@h/db").unwrap_err().contains("neither"));
        assert!(p("sqlite://").is_err());
        let bad = p("postgres://u:pw@h:notaport/db").unwrap_err();
        assert!(bad.contains("not a valid PostgreSQL URL") && !bad.contains("pw@"), "{bad}");
    }
}
