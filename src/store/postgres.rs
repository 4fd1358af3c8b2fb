//! The scale-out dialect: PostgreSQL, shared by any number of nodes ([`PgStore`]).
//!
//! Same store as the embedded one (the same statements, checked by the same conformance
//! suite); what differs is how it is reached by several writers at once:
//! - lease, claim, heartbeat and delivery times come from the server's clock (`now()`);
//! - a unit or a delivery is taken with `FOR UPDATE SKIP LOCKED`, so racing nodes never wait
//!   on each other and never get the same one; a commit of results locks its batches' rows
//!   first (in id order), so it never races a transition of the same batch;
//! - admissions of one tenant take turns under a transaction-scoped advisory lock, and so do
//!   appends to the outbox (its ids become visible in commit order) and heartbeats (what a
//!   node publishes, its claim on upstream slots, follows what the others published);
//! - results are inserted with one `UNNEST … ON CONFLICT DO NOTHING RETURNING` statement,
//!   which tells exactly which lines were new; the log is keyed by (batch id, line);
//! - every status change is told to the other nodes with `pg_notify` in the transition's
//!   transaction (delivered at its commit, on channel [`STATUS_CHANNEL`]); each node listens
//!   on a connection of its own ([`PgStatusFeed`]), so a cancel, an expiry or a failure
//!   through one node stops the others' work at once, at no cost while nothing changes;
//! - the schema is migrated with `sqlx::migrate!` on a dedicated connection, under sqlx's
//!   advisory lock, so nodes starting together migrate once.
//!
//! Errors: a lost or refused connection, a pool timeout or a server shutting down is
//! `Unavailable` (the API answers 503, the engine waits), a full disk (SQLSTATE 53100) is
//! `Full`, a unique violation is `Conflict`, the rest `Other`.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPoolOptions};
use sqlx::{Connection, Pool, Transaction};

pub use sqlx::Postgres;

use super::sql::{driver_glue, Dialect, Record, SqlStore, Stmt};
use super::{schema, BatchStatus, Error, Result, ResultRecord, StatusChange, StatusFeed, StoredResult, WorkUnit};

/// The scale-out store.
pub type PgStore = SqlStore<Postgres>;

/// Connections per node: the writer, the feeders' leases, the heartbeat and API calls.
const MAX_CONNECTIONS: u32 = 16;
/// How long a call waits for a connection before it reports the store unavailable.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);
/// The first key of the per-tenant advisory lock that admissions take ("quota" in ASCII);
/// the second is the tenant's hash.
const QUOTA_LOCK: i32 = 0x7175_6f74;
/// The channel batch status changes are notified on; the payload is `<status> <batch id>`.
pub const STATUS_CHANNEL: &str = "batchd_status";
/// The advisory lock key of the outbox (an arbitrary constant: "batchd" in ASCII).
const OUTBOX_LOCK: i64 = 0x6261_7463_6864;
/// The advisory lock key that heartbeats take turns under ("nodes" in ASCII).
const NODES_LOCK: i64 = 0x006e_6f64_6573;

impl SqlStore<Postgres> {
    /// Connects to `url` (`postgres://user@host:5432/db`) and migrates the schema.
    pub async fn open(url: &str) -> Result<PgStore> {
        let opts = PgConnectOptions::from_str(url).map_err(|e| Error::Other(format!("invalid PostgreSQL URL: {e}").into()))?.application_name("batchd");
        // Migrated on a connection of its own: sqlx's migrator holds a session advisory lock
        // (keyed by the database name) for the whole run, so when several nodes start at once
        // one migrates and the others wait, then find nothing to do.
        let mut conn = PgConnection::connect_with(&opts).await.map_err(Postgres::error)?;
        let migrated = schema::migrate_postgres(&mut conn).await;
        let _ = conn.close().await;
        migrated?;
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .idle_timeout(Duration::from_secs(300))
            .connect_lazy_with(opts);
        Ok(SqlStore::new(pool))
    }
}

/// SQLSTATEs after which the same call may succeed later: connection exceptions (class 08),
/// the server shutting down or starting (57P01–57P03), too many connections (53300), out of
/// memory (53200), and a transaction aborted as a deadlock or serialization victim.
fn is_transient_state(code: &str) -> bool {
    code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "53300" | "53200" | "40001" | "40P01")
}

#[async_trait]
impl Dialect for Postgres {
    const PLACEHOLDER: &'static str = "$";
    /// The transaction's start, in unix milliseconds.
    const NOW_MS: &'static str = "(extract(epoch from now()) * 1000)::bigint";
    const FOR_UPDATE: &'static str = " FOR UPDATE";
    const SKIP_LOCKED: &'static str = " FOR UPDATE SKIP LOCKED";
    const GREATEST: &'static str = "GREATEST";
    const JSON_OBJECT: &'static str = "json_build_object";

    /// `sum()` of integers is a numeric (it cannot overflow), clamped back into the BIGINT range.
    fn clamped_sum(expr: &str) -> String {
        format!("LEAST(COALESCE(trunc(sum({expr})), 0), 9223372036854775807)::bigint")
    }

    type Log = ();

    driver_glue!();

    fn error(e: sqlx::Error) -> Error {
        let class: fn(super::error::Cause) -> Error = match &e {
            sqlx::Error::RowNotFound => return Error::NotFound,
            sqlx::Error::Database(d) => match d.code().as_deref() {
                Some("53100") => Error::Full,
                Some("23505") => return Error::Conflict(d.message().to_string()),
                Some(c) if is_transient_state(c) => Error::Unavailable,
                _ => Error::Other,
            },
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => Error::Unavailable,
            _ => Error::Other,
        };
        class(Box::new(e))
    }

    async fn begin_write(pool: &Pool<Self>) -> Result<Transaction<'static, Self>, sqlx::Error> {
        pool.begin().await
    }

    async fn lock_tenant(conn: &mut PgConnection, tenant: &str) -> Result<()> {
        Self::sql("SELECT pg_advisory_xact_lock($1, hashtext($2))").bind(QUOTA_LOCK).bind(tenant).execute(conn).await.map(|_| ())
    }

    async fn lock_nodes(conn: &mut PgConnection) -> Result<()> {
        Self::sql("SELECT pg_advisory_xact_lock($1)").bind(NODES_LOCK).execute(conn).await.map(|_| ())
    }

    async fn lock_outbox(conn: &mut PgConnection) -> Result<()> {
        Self::sql("SELECT pg_advisory_xact_lock($1)").bind(OUTBOX_LOCK).execute(conn).await.map(|_| ())
    }

    /// One statement, rows in key order (the lock order).
    async fn insert_results<'a>(_log: &(), conn: &mut PgConnection, live: &[&'a ResultRecord]) -> Result<Vec<&'a ResultRecord>> {
        let mut sorted: Vec<&ResultRecord> = live.to_vec();
        sorted.sort_unstable_by(|a, b| (&a.batch_id, a.line).cmp(&(&b.batch_id, b.line)));
        sorted.dedup_by(|a, b| a.batch_id == b.batch_id && a.line == b.line);
        let column = |f: fn(&ResultRecord) -> &str| sorted.iter().map(|r| f(r)).collect::<Vec<&str>>();
        let keys: Vec<(String, i64)> = sqlx::query_as(
            "INSERT INTO results (batch_id, line, custom_id, ok, record)
             SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::bool[], $5::text[])
             ON CONFLICT DO NOTHING RETURNING batch_id, line",
        )
        .bind(column(|r| r.batch_id.as_str()))
        .bind(sorted.iter().map(|r| r.line as i64).collect::<Vec<i64>>())
        .bind(column(|r| &r.custom_id))
        .bind(sorted.iter().map(|r| r.ok).collect::<Vec<bool>>())
        .bind(column(|r| &r.record))
        .fetch_all(&mut *conn)
        .await
        .map_err(Self::error)?;
        let by_key: HashMap<(&str, i64), &ResultRecord> = sorted.iter().map(|r| ((r.batch_id.as_str(), r.line as i64), *r)).collect();
        Ok(keys.iter().filter_map(|(b, l)| by_key.get(&(b.as_str(), *l)).copied()).collect())
    }

    async fn notify_status(conn: &mut PgConnection, batch_id: &str, status: BatchStatus) -> Result<()> {
        let payload = format!("{} {batch_id}", status.as_str());
        Self::sql("SELECT pg_notify($1, $2)").bind(STATUS_CHANNEL).bind(payload).execute(conn).await.map(|_| ())
    }

    async fn status_feed(pool: &Pool<Self>) -> Result<Option<Box<dyn StatusFeed>>> {
        let mut listener = PgListener::connect_with(pool).await.map_err(Self::error)?;
        listener.eager_reconnect(false);
        listener.listen(STATUS_CHANNEL).await.map_err(Self::error)?;
        Ok(Some(Box::new(PgStatusFeed(listener))))
    }

    async fn done_lines(_log: &(), pool: &Pool<Self>, batch_id: &str, unit: &WorkUnit) -> Result<Vec<u64>> {
        let stmt = Self::sql("SELECT line FROM results WHERE batch_id = $1 AND line >= $2 AND line < $3 ORDER BY line");
        let stmt = stmt.bind(batch_id).bind(unit.first_line as i64).bind(unit.end_line as i64);
        Ok(stmt.scalars::<i64>(&mut *pool.acquire().await.map_err(Self::error)?).await?.into_iter().map(|l| l as u64).collect())
    }

    async fn done_among(_log: &(), pool: &Pool<Self>, batch_id: &str, lines: &[u64]) -> Result<Vec<u64>> {
        let lines: Vec<i64> = lines.iter().map(|&l| l as i64).collect();
        let done: Vec<i64> = sqlx::query_scalar("SELECT line FROM results WHERE batch_id = $1 AND line = ANY($2::bigint[]) ORDER BY line")
            .bind(batch_id)
            .bind(lines)
            .fetch_all(&mut *pool.acquire().await.map_err(Self::error)?)
            .await
            .map_err(Self::error)?;
        Ok(done.into_iter().map(|l| l as u64).collect())
    }

    async fn results_chunk(_log: &(), pool: &Pool<Self>, batch_id: &str, ok: Option<bool>, after_line: u64, limit: u32) -> Result<Option<(String, u64)>> {
        let mut s =
            Self::sql("SELECT string_agg(record, E'\\n' ORDER BY line), max(line) FROM (SELECT record, line FROM results WHERE batch_id = $1 AND line > $2")
                .bind(batch_id)
                .bind(after_line.min(i64::MAX as u64) as i64);
        if let Some(ok) = ok {
            s.push(" AND ok = ").push_bind(ok);
        }
        s.push(" ORDER BY line LIMIT ").push_bind(limit as i64).push(") page");
        let (chunk, last) = s.fetch_one::<(Option<String>, Option<i64>)>(&mut *pool.acquire().await.map_err(Self::error)?).await?;
        Ok(chunk.zip(last).map(|(mut c, l)| {
            c.push('\n');
            (c, l as u64)
        }))
    }

    async fn result_by_custom_id(_log: &(), pool: &Pool<Self>, batch_id: &str, custom_id: &str) -> Result<StoredResult> {
        let stmt = Self::sql("SELECT line, custom_id, ok, record FROM results WHERE batch_id = $1 AND custom_id = $2 ORDER BY line LIMIT 1");
        let (line, custom_id, ok, record) =
            stmt.bind(batch_id).bind(custom_id).fetch_one::<(i64, String, bool, String)>(&mut *pool.acquire().await.map_err(Self::error)?).await?;
        Ok(StoredResult { line: line as u64, custom_id, ok, record })
    }
}

/// The status changes of every node, on a `LISTEN`ing connection of this node's pool.
pub struct PgStatusFeed(PgListener);

#[async_trait]
impl StatusFeed for PgStatusFeed {
    async fn next(&mut self) -> Result<StatusChange> {
        loop {
            match self.0.try_recv().await {
                Ok(Some(n)) => match parse_status_payload(n.payload()) {
                    Some(change) => return Ok(change),
                    None => tracing::debug!(payload = n.payload(), "an unreadable status notification; ignored"),
                },
                Ok(None) => return Err(Error::Unavailable("the connection listening for status changes was lost".into())),
                Err(e) => return Err(Postgres::error(e)),
            }
        }
    }
}

/// Reads a notification's `<status> <batch id>`.
fn parse_status_payload(payload: &str) -> Option<StatusChange> {
    let (status, id) = payload.split_once(' ')?;
    Some(StatusChange { batch_id: id.into(), status: BatchStatus::parse(status)? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_payloads_read_back_and_odd_ones_are_refused() {
        let c = parse_status_payload("cancelling batch_abc").unwrap();
        assert_eq!((c.batch_id.as_str(), c.status), ("batch_abc", BatchStatus::Cancelling));
        assert!(parse_status_payload("cancelling").is_none());
        assert!(parse_status_payload("paused batch_abc").is_none());
    }
}
