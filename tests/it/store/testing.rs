//! A fresh PostgreSQL database per test, for the store's tests and the cluster tests.
//!
//! `BATCHD_TEST_POSTGRES_URL` names a server and a database to connect to for
//! administration (`postgres://postgres@127.0.0.1:5432/test`); each [`TestDatabase`] creates
//! a database with a random name there and drops it when dropped. When the variable is unset,
//! [`TestDatabase::create`] returns `None` and says why, and the caller skips its test.

use std::str::FromStr;

use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};

/// The variable that enables the PostgreSQL tests.
pub const ENV: &str = "BATCHD_TEST_POSTGRES_URL";

pub struct TestDatabase {
    /// The URL of the fresh database.
    pub url: String,
    admin: String,
    name: String,
}

impl TestDatabase {
    /// Creates a fresh, empty database; `None` (after printing why) when `ENV` is unset.
    pub async fn create(test: &str) -> Option<TestDatabase> {
        let Ok(admin) = std::env::var(ENV) else {
            eprintln!("skipping {test}: set {ENV}=postgres://USER@HOST:PORT/DB to run it against PostgreSQL");
            return None;
        };
        let name = format!("batchd_test_{}", batchd::ids::batch_id().trim_start_matches("batch_").to_lowercase());
        let url = with_database(&admin, &name).unwrap_or_else(|| panic!("{ENV} must be a URL with a database path: {admin}"));
        let mut conn = admin_conn(&admin).await;
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut conn).await.expect("CREATE DATABASE");
        let _ = conn.close().await;
        Some(TestDatabase { url, admin, name })
    }
}

impl Drop for TestDatabase {
    /// Drops the database on a thread of its own (a `Drop` cannot await), closing whatever
    /// connections are still open to it.
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
            rt.block_on(async {
                let mut conn = admin_conn(&admin).await;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut conn).await
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(_))) {
            eprintln!("could not drop the test database {}", self.name);
        }
    }
}

async fn admin_conn(admin: &str) -> PgConnection {
    let opts = PgConnectOptions::from_str(admin).unwrap_or_else(|e| panic!("{ENV} is not a PostgreSQL URL: {e}"));
    PgConnection::connect_with(&opts).await.unwrap_or_else(|e| panic!("cannot connect to {ENV}={admin}: {e}"))
}

/// `url` with its database (the path) replaced by `db`, the query string kept.
pub fn with_database(url: &str, db: &str) -> Option<String> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let (scheme, rest) = base.split_once("://")?;
    let host = rest.split_once('/').map_or(rest, |(h, _)| h);
    Some(match query {
        Some(q) => format!("{scheme}://{host}/{db}?{q}"),
        None => format!("{scheme}://{host}/{db}"),
    })
}

mod tests {
    #[test]
    fn database_is_replaced_and_query_kept() {
        use super::with_database;
        assert_eq!(with_database("postgres://u@h:5432/test", "x").as_deref(), Some("postgres://u@h:5432/x"));
        assert_eq!(with_database("postgres://u@h/test?sslmode=disable", "x").as_deref(), Some("postgres://u@h/x?sslmode=disable"));
        assert_eq!(with_database("postgres://u@h:5432", "x").as_deref(), Some("postgres://u@h:5432/x"));
        assert_eq!(with_database("nonsense", "x"), None);
    }
}
