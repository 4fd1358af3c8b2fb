//! The scale-out store: PostgreSQL, shared by any number of nodes.
//!
//! Same semantics as the embedded [`super::sqlite`] store, checked by the same conformance
//! suite; what differs is how they are reached with several writers:
//! - lease, claim, heartbeat and delivery times come from the server's clock (`NOW_MS`);
//! - a unit is leased with `FOR UPDATE SKIP LOCKED`, so racing nodes never wait on each
//!   other and never get the same unit;
//! - a commit of results locks its batches' rows first (in id order), so it never races a
//!   transition of the same batch, and inserts its rows with `ON CONFLICT DO NOTHING
//!   RETURNING`, which tells exactly which lines were new;
//! - event ids follow commit order: a transaction appending events takes the outbox's
//!   transaction-scoped advisory lock just before, as its last lock (see `outbox`);
//! - the schema is migrated with `sqlx::migrate!` (`migrations/postgres`) on a dedicated
//!   connection, under sqlx's advisory lock, so nodes starting together migrate once.
//!
//! Errors are mapped once (`db_err`): a lost or refused connection, a pool timeout or a
//! server shutting down is `Unavailable` (the API answers 503, the engine waits), a full disk
//! (SQLSTATE 53100) is `Full`, a unique violation is `Conflict`, the rest `Other`.

mod batches;
mod files;
mod outbox;
mod work;

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Connection, Row};

use super::*;

/// The schema migrations, embedded at build time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

const FINAL: &str = "('completed','failed','expired','cancelled')";
/// The server's clock, in unix milliseconds (the transaction's start).
const NOW_MS: &str = "(extract(epoch from now()) * 1000)::bigint";
/// Connections per node: the writer, the feeders' leases, the heartbeat and API calls.
const MAX_CONNECTIONS: u32 = 16;
/// How long a call waits for a connection before it reports the store unavailable.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

pub struct PgStore {
    pool: PgPool,
    commits: AtomicU64,
}

/// Maps a driver error to the store's neutral error, once for every query.
pub(crate) fn db_err(e: sqlx::Error) -> Error {
    match e {
        sqlx::Error::RowNotFound => Error::NotFound,
        sqlx::Error::Database(d) => {
            let code = d.code().map(|c| c.into_owned()).unwrap_or_default();
            let msg = d.message().to_string();
            match code.as_str() {
                "53100" => Error::Full(msg),
                "23505" => Error::Conflict(msg),
                c if is_transient_state(c) => Error::Unavailable(format!("{msg} (SQLSTATE {c})")),
                c => Error::Other(format!("{msg} (SQLSTATE {c})")),
            }
        }
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => Error::Unavailable(e.to_string()),
        other => Error::Other(other.to_string()),
    }
}

/// SQLSTATEs after which the same call may succeed later: connection exceptions (class 08),
/// the server shutting down or starting (57P01–57P03), too many connections (53300), out of
/// memory (53200), and a transaction aborted as a deadlock or serialization victim.
fn is_transient_state(code: &str) -> bool {
    code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "53300" | "53200" | "40001" | "40P01")
}

fn ms(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

impl PgStore {
    /// Connects to `url` (`postgres://user@host:5432/db`) and migrates the schema.
    pub async fn open(url: &str) -> Result<PgStore> {
        let opts = PgConnectOptions::from_str(url).map_err(|e| Error::Other(format!("invalid PostgreSQL URL: {e}")))?.application_name("batchd");
        Self::migrate(&opts).await?;
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .idle_timeout(Duration::from_secs(300))
            .connect_lazy_with(opts);
        Ok(PgStore { pool, commits: AtomicU64::new(0) })
    }

    /// Applies the pending migrations on a connection of its own. sqlx's migrator holds a
    /// session advisory lock (keyed by the database name) for the whole run, so when several
    /// nodes start at once one migrates and the others wait, then find nothing to do.
    async fn migrate(opts: &PgConnectOptions) -> Result<()> {
        let mut conn = sqlx::PgConnection::connect_with(opts).await.map_err(db_err)?;
        let r = MIGRATOR.run(&mut conn).await;
        let _ = conn.close().await;
        r.map_err(|e| match e {
            sqlx::migrate::MigrateError::Execute(e) => db_err(e),
            other => Error::Other(format!("migrating the PostgreSQL schema: {other}")),
        })
    }

    /// The connection pool, for the one-off copy from another backend (`store::migrate`).
    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }

    fn counted<T>(&self, r: Result<T>) -> Result<T> {
        if r.is_ok() {
            self.commits.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    async fn begin(&self) -> Result<sqlx::Transaction<'static, sqlx::Postgres>> {
        self.pool.begin().await.map_err(db_err)
    }

    /// Commits a transaction, counting it.
    async fn commit(&self, tx: sqlx::Transaction<'static, sqlx::Postgres>) -> Result<()> {
        let r = tx.commit().await.map_err(db_err);
        self.counted(r)
    }
}

/// A BIGINT column; a NULL reads as 0.
fn int(r: &PgRow, col: &str) -> i64 {
    r.try_get::<Option<i64>, _>(col).ok().flatten().unwrap_or(0)
}

fn opt_int(r: &PgRow, col: &str) -> Option<i64> {
    r.try_get::<Option<i64>, _>(col).ok().flatten()
}

impl Store for PgStore {
    fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }
}

pub mod testing;

#[cfg(test)]
mod tests;
