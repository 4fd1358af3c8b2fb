//! SQLite-only checks: the conformance suite on a real file, reopening, and migrations.

use super::*;

async fn open() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("batchd.db")).await.unwrap();
    (dir, store)
}

#[tokio::test]
async fn conformance_sqlite() {
    let (_dir, store) = open().await;
    conformance::run_all(&store).await;
}

#[tokio::test]
async fn reopen_keeps_rows_and_schema_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("batchd.db");
    {
        let s = SqliteStore::open(&path).await.unwrap();
        s.insert_file(&conformance::sample_file("t", "file-keep")).await.unwrap();
    }
    let s = SqliteStore::open(&path).await.unwrap();
    assert_eq!(s.get_file("t", "file-keep", 0).await.unwrap().id, "file-keep");
}

/// A data directory written by schema version 1 (results keyed by batch id and line)
/// opens with every result readable, findable and still counted once.
#[tokio::test]
async fn version_1_results_survive_the_migration() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("batchd.db");
    {
        let opts = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display())).unwrap().create_if_missing(true);
        let pool = SqlitePoolOptions::new().max_connections(1).connect_with(opts).await.unwrap();
        sqlx::raw_sql(MIGRATIONS[0]).execute(&pool).await.unwrap();
        sqlx::raw_sql("PRAGMA user_version = 1").execute(&pool).await.unwrap();
        for b in ["batch_a", "batch_b"] {
            sqlx::query(
                "INSERT INTO batches (id, tenant, endpoint, input_file_id, completion_window, status, created_at, total)
                 VALUES (?, 't', '/v1/chat/completions', 'file-x', '24h', 'in_progress', 1, 3)",
            )
            .bind(b)
            .execute(&pool)
            .await
            .unwrap();
            sqlx::query("INSERT INTO units (batch_id, idx, first_line, end_line, line_count, byte_offset, byte_len) VALUES (?, 0, 1, 4, 3, 0, 10)")
                .bind(b)
                .execute(&pool)
                .await
                .unwrap();
        }
        // Interleaved, as two running batches write them; line 2 of batch_a never ran.
        for (b, line, ok) in [("batch_b", 1, true), ("batch_a", 3, false), ("batch_a", 1, true), ("batch_b", 2, true)] {
            sqlx::query("INSERT INTO results (batch_id, line, custom_id, ok, record) VALUES (?, ?, ?, ?, ?)")
                .bind(b)
                .bind(line)
                .bind(format!("c{line}"))
                .bind(ok)
                .bind(format!("{{\"b\":\"{b}\",\"line\":{line}}}"))
                .execute(&pool)
                .await
                .unwrap();
        }
    }
    let s = SqliteStore::open(&path).await.unwrap();
    let version: i64 = sqlx::query_scalar("PRAGMA user_version").fetch_one(&s.pool).await.unwrap();
    assert_eq!(version, MIGRATIONS.len() as i64);
    let (all, last) = s.results_chunk("batch_a", None, 0, 100).await.unwrap().unwrap();
    assert_eq!((all.as_str(), last), ("{\"b\":\"batch_a\",\"line\":1}\n{\"b\":\"batch_a\",\"line\":3}\n", 3));
    let (errors, _) = s.results_chunk("batch_a", Some(false), 0, 100).await.unwrap().unwrap();
    assert_eq!(errors, "{\"b\":\"batch_a\",\"line\":3}\n");
    let found = s.result_by_custom_id("batch_b", "c1").await.unwrap();
    assert_eq!((found.line, found.record.as_str()), (1, "{\"b\":\"batch_b\",\"line\":1}"), "the same custom_id in another batch is not mixed up");
    let unit = &s.units("batch_a").await.unwrap()[0];
    assert_eq!(s.done_lines("batch_a", unit).await.unwrap(), [1, 3]);
    let again = conformance::result("batch_a", 1, true);
    let fresh = conformance::result("batch_a", 2, true);
    let out = s.commit_results("n", &[again, fresh]).await.unwrap();
    assert_eq!((out.inserted, out.duplicates), (1, 1), "a line recorded before the migration is not recorded twice");
}
