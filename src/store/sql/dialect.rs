//! The seam between the one SQL store and a database: [`Dialect`] holds what truly differs
//! between SQLite and PostgreSQL, [`Stmt`] is a statement written once for both.
//!
//! A statement's text uses `$N` placeholders, which both databases read (SQLite numbers
//! `$N` like `?N`, so a placeholder used twice is bound once). Values bind through
//! [`Param`] and rows decode through [`Record`]: each names both databases, so that generic
//! code can bind and decode without a bound per type and per database; the dialect's
//! `execute`/`fetch_*` are the few lines that hand a statement to the driver.

use std::fmt::Write;

use async_trait::async_trait;
use futures::future::BoxFuture;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgRow, Postgres};
use sqlx::sqlite::{Sqlite, SqliteRow};
use sqlx::{Database, Encode, FromRow, Pool, Transaction, Type};

use crate::store::{Error, Result, ResultRecord, StoredResult, WorkUnit};

/// A value that binds to a statement on every database the store runs on.
pub trait Param<'q>: 'q + Send + Encode<'q, Sqlite> + Type<Sqlite> + Encode<'q, Postgres> + Type<Postgres> {}

impl<'q, T> Param<'q> for T where T: 'q + Send + Encode<'q, Sqlite> + Type<Sqlite> + Encode<'q, Postgres> + Type<Postgres> {}

/// A row type that decodes on every database the store runs on (`#[derive(sqlx::FromRow)]`;
/// a one-column read is a 1-tuple).
pub trait Record: Send + Unpin + for<'r> FromRow<'r, SqliteRow> + for<'r> FromRow<'r, PgRow> {}

impl<T> Record for T where T: Send + Unpin + for<'r> FromRow<'r, SqliteRow> + for<'r> FromRow<'r, PgRow> {}

/// What differs between the databases: SQL fragments, the driver glue, transactions and
/// locks, and the result log's layout. Implemented by `sqlx::Sqlite` ([`crate::store::sqlite`])
/// and `sqlx::Postgres` ([`crate::store::postgres`]).
#[async_trait]
pub trait Dialect: Database + Sized {
    /// What [`Stmt::push_bind`] writes before a placeholder's number (text written by hand
    /// uses `$N`, which both databases read).
    const PLACEHOLDER: &'static str;
    /// The store's clock, in unix milliseconds: every lease, claim, heartbeat and delivery
    /// time is taken from it, never from a node's clock.
    const NOW_MS: &'static str;
    /// What a read in a write transaction appends to lock the rows it returns until the
    /// commit (`FOR UPDATE` where rows are locked; empty where the transaction holds the
    /// whole database).
    const FOR_UPDATE: &'static str;
    /// The same for a read that takes free rows only and skips rows other writers hold.
    const SKIP_LOCKED: &'static str;
    /// The function returning the larger of two values.
    const GREATEST: &'static str;
    /// The function building a JSON object from key, value, … arguments.
    const JSON_OBJECT: &'static str;

    /// An aggregate summing the integer expression `expr` over a group, 0 for none, that
    /// saturates at `i64::MAX` instead of failing or turning into a float.
    fn clamped_sum(expr: &str) -> String;

    /// What the dialect keeps per store to address the result log.
    type Log: Default + Send + Sync + 'static;

    /// Adds `value` to a statement's arguments (see [`driver_glue`] for these four).
    fn add<'q, T: Param<'q>>(args: &mut <Self as Database>::Arguments<'q>, value: T) -> Result<(), BoxDynError>;
    /// Runs a statement; the number of rows it changed.
    fn execute<'c, 'q: 'c>(conn: &'c mut Self::Connection, stmt: Stmt<'q, Self>) -> BoxFuture<'c, Result<u64, sqlx::Error>>;
    fn fetch_all<'c, 'q: 'c, T: Record>(conn: &'c mut Self::Connection, stmt: Stmt<'q, Self>) -> BoxFuture<'c, Result<Vec<T>, sqlx::Error>>;
    fn fetch_optional<'c, 'q: 'c, T: Record>(conn: &'c mut Self::Connection, stmt: Stmt<'q, Self>) -> BoxFuture<'c, Result<Option<T>, sqlx::Error>>;
    /// Classifies a driver error (see [`Error`]).
    fn error(e: sqlx::Error) -> Error;

    /// A transaction that writes: it must not fail later because another writer got in
    /// between its reads and its writes.
    async fn begin_write(pool: &Pool<Self>) -> Result<Transaction<'static, Self>, sqlx::Error>;
    /// Inside a write transaction: waits until no other transaction (on any node) admits a
    /// batch of `tenant`, and keeps the others waiting until the commit.
    async fn lock_tenant(conn: &mut Self::Connection, tenant: &str) -> Result<()>;
    /// Inside a write transaction, just before appending an event: event ids become visible
    /// in the order they were taken (see [`super::outbox`]).
    async fn lock_outbox(conn: &mut Self::Connection) -> Result<()>;

    /// Inserts the results of `live` not recorded before (in one statement or a few), inside
    /// the commit's transaction; returns those it inserted.
    async fn insert_results<'a>(log: &Self::Log, conn: &mut Self::Connection, live: &[&'a ResultRecord]) -> Result<Vec<&'a ResultRecord>>;
    /// See [`crate::store::Work::done_lines`].
    async fn done_lines(log: &Self::Log, pool: &Pool<Self>, batch_id: &str, unit: &WorkUnit) -> Result<Vec<u64>>;
    /// See [`crate::store::Work::results_chunk`].
    async fn results_chunk(log: &Self::Log, pool: &Pool<Self>, batch_id: &str, ok: Option<bool>, after_line: u64, limit: u32) -> Result<Option<(String, u64)>>;
    /// See [`crate::store::Work::result_by_custom_id`].
    async fn result_by_custom_id(log: &Self::Log, pool: &Pool<Self>, batch_id: &str, custom_id: &str) -> Result<StoredResult>;
    /// A batch became final: nothing more is added to its log.
    fn forget_batch(_log: &Self::Log, _batch_id: &str) {}

    /// A statement of this dialect, with `$N` placeholders.
    fn sql<'q>(text: impl Into<String>) -> Stmt<'q, Self> {
        Stmt::new(text)
    }
}

/// The driver glue of a [`Dialect`] impl (`add`, `execute`, `fetch_all`, `fetch_optional`),
/// the same text for every database: sqlx's executors take a concrete connection, which
/// generic code cannot name, so each dialect's impl expands this with its own `Self`.
macro_rules! driver_glue {
    () => {
        fn add<'q, T: $crate::store::sql::Param<'q>>(args: &mut <Self as sqlx::Database>::Arguments<'q>, value: T) -> Result<(), sqlx::error::BoxDynError> {
            sqlx::Arguments::add(args, value)
        }

        fn execute<'c, 'q: 'c>(conn: &'c mut <Self as sqlx::Database>::Connection, stmt: Stmt<'q, Self>) -> BoxFuture<'c, Result<u64, sqlx::Error>> {
            Box::pin(async move {
                let (sql, args, persistent) = stmt.into_parts()?;
                Ok(sqlx::query_with(&sql, args).persistent(persistent).execute(conn).await?.rows_affected())
            })
        }

        fn fetch_all<'c, 'q: 'c, T: Record>(
            conn: &'c mut <Self as sqlx::Database>::Connection,
            stmt: Stmt<'q, Self>,
        ) -> BoxFuture<'c, Result<Vec<T>, sqlx::Error>> {
            Box::pin(async move {
                let (sql, args, persistent) = stmt.into_parts()?;
                sqlx::query_as_with(&sql, args).persistent(persistent).fetch_all(conn).await
            })
        }

        fn fetch_optional<'c, 'q: 'c, T: Record>(
            conn: &'c mut <Self as sqlx::Database>::Connection,
            stmt: Stmt<'q, Self>,
        ) -> BoxFuture<'c, Result<Option<T>, sqlx::Error>> {
            Box::pin(async move {
                let (sql, args, persistent) = stmt.into_parts()?;
                sqlx::query_as_with(&sql, args).persistent(persistent).fetch_optional(conn).await
            })
        }
    };
}
pub(crate) use driver_glue;

/// One SQL statement and its arguments, built by generic code and run by a [`Dialect`].
pub struct Stmt<'q, D: Dialect> {
    sql: String,
    args: <D as Database>::Arguments<'q>,
    bound: usize,
    /// The first value that could not be encoded, reported when the statement runs.
    broken: Option<BoxDynError>,
    persistent: bool,
}

impl<'q, D: Dialect> Stmt<'q, D> {
    pub fn new(text: impl Into<String>) -> Self {
        Stmt { sql: text.into(), args: Default::default(), bound: 0, broken: None, persistent: true }
    }

    /// Binds the next `$N` the text already holds.
    pub fn bind<T: Param<'q>>(mut self, value: T) -> Self {
        self.add(value);
        self
    }

    fn add<T: Param<'q>>(&mut self, value: T) {
        if let Err(e) = D::add(&mut self.args, value) {
            self.broken.get_or_insert(e);
        }
        self.bound += 1;
    }

    /// Appends text.
    pub fn push(&mut self, text: &str) -> &mut Self {
        self.sql.push_str(text);
        self
    }

    /// Appends a placeholder and binds `value` to it.
    pub fn push_bind<T: Param<'q>>(&mut self, value: T) -> &mut Self {
        self.add(value);
        let _ = write!(self.sql, "{}{}", D::PLACEHOLDER, self.bound);
        self
    }

    /// Appends `$a, $b, …`, one placeholder per value.
    pub fn push_list<T: Param<'q>>(&mut self, values: impl IntoIterator<Item = T>) -> &mut Self {
        for (i, v) in values.into_iter().enumerate() {
            if i > 0 {
                self.sql.push_str(", ");
            }
            self.push_bind(v);
        }
        self
    }

    /// Not kept in the connection's statement cache: a statement whose text varies with its
    /// size (a multi-row insert) would otherwise fill the cache and keep its last arguments.
    pub fn one_off(mut self) -> Self {
        self.persistent = false;
        self
    }

    /// The text, the arguments and whether to cache the statement, for the dialect to run.
    pub fn into_parts(self) -> Result<(String, <D as Database>::Arguments<'q>, bool), sqlx::Error> {
        match self.broken {
            Some(e) => Err(sqlx::Error::Encode(e)),
            None => Ok((self.sql, self.args, self.persistent)),
        }
    }

    /// Runs the statement; the number of rows it changed.
    pub async fn execute(self, conn: &mut D::Connection) -> Result<u64> {
        D::execute(conn, self).await.map_err(D::error)
    }

    pub async fn fetch_all<T: Record>(self, conn: &mut D::Connection) -> Result<Vec<T>> {
        D::fetch_all(conn, self).await.map_err(D::error)
    }

    pub async fn fetch_optional<T: Record>(self, conn: &mut D::Connection) -> Result<Option<T>> {
        D::fetch_optional(conn, self).await.map_err(D::error)
    }

    /// The first row; `NotFound` when there is none.
    pub async fn fetch_one<T: Record>(self, conn: &mut D::Connection) -> Result<T> {
        self.fetch_optional(conn).await?.ok_or(Error::NotFound)
    }

    /// The first column of every row.
    pub async fn scalars<T>(self, conn: &mut D::Connection) -> Result<Vec<T>>
    where
        (T,): Record,
    {
        Ok(self.fetch_all::<(T,)>(conn).await?.into_iter().map(|(v,)| v).collect())
    }

    /// The first column of the first row, if any.
    pub async fn scalar<T>(self, conn: &mut D::Connection) -> Result<Option<T>>
    where
        (T,): Record,
    {
        Ok(self.fetch_optional::<(T,)>(conn).await?.map(|(v,)| v))
    }
}
