//! The schema of each database, as `sqlx::migrate!` migrations (`migrations/sqlite`,
//! `migrations/postgres`), and what a node does with a database whose schema is not its own.
//!
//! - A database behind this build is migrated on open (in order, each migration once, under
//!   sqlx's lock where several nodes may start at once).
//! - A database ahead of this build (migrated by a newer batchd) is refused with a message
//!   that says so, before anything runs: [`SchemaState::check`] is the one place that
//!   decides, and the hook for a rolling upgrade's rules (say, letting an older node run on
//!   a schema whose newer migrations only add tables).
//! - An SQLite file made before the move to sqlx recorded its version in
//!   `PRAGMA user_version` (1–5), each version the SQL of the sqlx migration with the same
//!   number: [`bridge_user_version`] records those as applied, once, and the migrator goes
//!   on from there.
//!
//! The two schemas hold the same tables and columns but for [`LAYOUT_DIFFERENCES`]; a test
//! reads both and `batchd migrate`'s table list and holds them to that.

use sqlx::migrate::{AppliedMigration, Migrate, MigrateError, Migrator};
use sqlx::postgres::PgConnection;
use sqlx::sqlite::SqliteConnection;
use sqlx::{Connection, Sqlite};

use super::sql::Dialect;
use super::{Error, Result};

pub static SQLITE: Migrator = sqlx_macros::migrate!("migrations/sqlite");
pub static POSTGRES: Migrator = sqlx_macros::migrate!("migrations/postgres");

/// The last `PRAGMA user_version` the hand-kept SQLite migrator wrote (release 2).
pub const LAST_USER_VERSION: i64 = 5;

/// Where the columns of the two schemas differ by design: (table, SQLite-only columns,
/// PostgreSQL-only columns). SQLite keys a result by one integer (`batches.seq << 32 |
/// line`, the rowid); PostgreSQL by (batch id, line).
pub const LAYOUT_DIFFERENCES: &[(&str, &[&str], &[&str])] = &[("results", &["key"], &["batch_id", "line"])];

/// Where a database's schema stands against this build's migrations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SchemaState {
    /// Every migration this build knows is applied, and no other.
    Current,
    /// These migrations are still to apply (a database made by an older build).
    Behind(Vec<i64>),
    /// The database holds migrations this build does not know: a newer batchd migrated it.
    Ahead { database: i64, known: i64 },
    /// A migration the database recorded differs from this build's of the same version.
    Modified(i64),
}

impl SchemaState {
    /// Compares what a database recorded with what `migrator` holds.
    pub fn of(migrator: &Migrator, applied: &[AppliedMigration]) -> SchemaState {
        let known = migrator.iter().map(|m| m.version).max().unwrap_or(0);
        if applied.iter().any(|a| !migrator.version_exists(a.version)) {
            return SchemaState::Ahead { database: applied.iter().map(|a| a.version).max().unwrap_or(0), known };
        }
        if let Some(m) = migrator.iter().find(|m| applied.iter().any(|a| a.version == m.version && a.checksum != m.checksum)) {
            return SchemaState::Modified(m.version);
        }
        let pending: Vec<i64> = migrator.iter().map(|m| m.version).filter(|v| !applied.iter().any(|a| a.version == *v)).collect();
        if pending.is_empty() {
            SchemaState::Current
        } else {
            SchemaState::Behind(pending)
        }
    }

    /// Whether this build may open the database (migrating it when it is behind).
    pub fn check(&self, what: &str) -> Result<()> {
        let refuse = |msg: String| Err(Error::Other(msg.into()));
        match self {
            SchemaState::Current | SchemaState::Behind(_) => Ok(()),
            SchemaState::Ahead { database, known } => refuse(format!(
                "the {what} schema is at version {database}, newer than this batchd knows (up to {known}): a newer batchd migrated it; \
                 upgrade this batchd to that version or later (a schema is never migrated back)"
            )),
            SchemaState::Modified(v) => {
                refuse(format!("schema migration {v} recorded in the {what} database differs from this build's: it was migrated by another build of batchd"))
            }
        }
    }
}

/// Refuses a schema this build cannot run on (see [`SchemaState::check`]).
async fn check_schema<C: Migrate>(migrator: &Migrator, conn: &mut C, what: &str) -> Result<()> {
    // Under the migrator's lock: nodes starting together would race to create the table.
    conn.lock().await.map_err(migrate_error)?;
    let applied = match conn.ensure_migrations_table().await {
        Ok(()) => conn.list_applied_migrations().await,
        Err(e) => Err(e),
    };
    conn.unlock().await.map_err(migrate_error)?;
    let applied = applied.map_err(migrate_error)?;
    let state = SchemaState::of(migrator, &applied);
    state.check(what)?;
    if let SchemaState::Behind(pending) = &state {
        tracing::info!(database = what, migrations = ?pending, "migrating the schema");
    }
    Ok(())
}

fn migrate_error(e: MigrateError) -> Error {
    match e {
        MigrateError::Execute(e) | MigrateError::ExecuteMigration(e, _) if !matches!(e, sqlx::Error::Database(_)) => Error::Unavailable(Box::new(e)),
        other => Error::Other(Box::new(other)),
    }
}

/// Migrates an SQLite database (bridging a `user_version` first).
pub async fn migrate_sqlite(conn: &mut SqliteConnection) -> Result<()> {
    bridge_user_version(conn).await?;
    check_schema(&SQLITE, conn, "SQLite").await?;
    SQLITE.run(conn).await.map_err(migrate_error)
}

/// Migrates a PostgreSQL database, on a connection of its own (sqlx's advisory lock is held
/// for the session).
pub async fn migrate_postgres(conn: &mut PgConnection) -> Result<()> {
    check_schema(&POSTGRES, conn, "PostgreSQL").await?;
    POSTGRES.run(conn).await.map_err(migrate_error)
}

/// Records an SQLite file's `user_version` as the sqlx migrations it stands for, in one
/// transaction, and sets `user_version` to 0: from then on `_sqlx_migrations` alone says
/// where the schema is, and a batchd older than the bridge refuses the file (its own
/// migrator starts again at version 1, and fails on the existing tables) instead of running
/// on a schema it does not know.
pub async fn bridge_user_version(conn: &mut SqliteConnection) -> Result<()> {
    let version: i64 = sqlx::query_scalar("PRAGMA user_version").fetch_one(&mut *conn).await.map_err(Sqlite::error)?;
    if version == 0 {
        return Ok(());
    }
    if version > LAST_USER_VERSION {
        return Err(Error::Other(format!("the SQLite schema's user_version is {version}; no batchd ever wrote more than {LAST_USER_VERSION}").into()));
    }
    let mut tx = conn.begin().await.map_err(Sqlite::error)?;
    tx.ensure_migrations_table().await.map_err(migrate_error)?;
    for m in SQLITE.iter().filter(|m| m.version <= version) {
        sqlx::query("INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) VALUES ($1, $2, TRUE, $3, 0)")
            .bind(m.version)
            .bind(&*m.description)
            .bind(&*m.checksum)
            .execute(&mut *tx)
            .await
            .map_err(Sqlite::error)?;
    }
    sqlx::query("PRAGMA user_version = 0").execute(&mut *tx).await.map_err(Sqlite::error)?;
    tx.commit().await.map_err(Sqlite::error)?;
    tracing::info!(user_version = version, "recorded the SQLite schema's version as sqlx migrations");
    Ok(())
}
