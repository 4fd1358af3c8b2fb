//! The store's tests: the conformance suite ([`conformance`]) run on both dialects, and
//! what each dialect must show on its own (SQLite: a file reopened, files of older releases
//! upgraded in place; PostgreSQL: nodes racing on one database), and the schema's state
//! checks. PostgreSQL tests run on a fresh database each (see [`testing`]) and are skipped,
//! saying so, when `BATCHD_TEST_POSTGRES_URL` is unset.

pub mod conformance;
pub mod testing;

use std::time::Duration;

use batchd::store::postgres::PgStore;
use batchd::store::prelude::*;
use batchd::store::sqlite::SqliteStore;
use batchd::store::*;
use testing::TestDatabase;

mod sqlite {
    use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};

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
    async fn reopen_keeps_rows_and_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("batchd.db");
        {
            let s = SqliteStore::open(&path).await.unwrap();
            s.insert_file(&conformance::sample_file("t", "file-keep")).await.unwrap();
        }
        let s = SqliteStore::open(&path).await.unwrap();
        assert_eq!(s.get_file("t", &"file-keep".into(), 0).await.unwrap().id, "file-keep");
        let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM _sqlx_migrations ORDER BY version").fetch_all(s.pool()).await.unwrap();
        assert_eq!(applied, schema::SQLITE.iter().map(|m| m.version).collect::<Vec<_>>(), "each migration recorded once");
    }

    /// A file as the hand-kept migrator of release 2 left it at `user_version` = `version`.
    async fn old_file(path: &std::path::Path, version: i64) -> sqlx::SqlitePool {
        let opts = SqliteConnectOptions::new().filename(path).create_if_missing(true);
        let pool = SqlitePoolOptions::new().max_connections(1).connect_with(opts).await.unwrap();
        for m in schema::SQLITE.iter().take(version as usize) {
            sqlx::raw_sql(&m.sql).execute(&pool).await.unwrap();
        }
        sqlx::raw_sql(&format!("PRAGMA user_version = {version}")).execute(&pool).await.unwrap();
        pool
    }

    /// A data directory written by schema version 1 (results keyed by batch id and line)
    /// opens with every result readable, findable and still counted once.
    #[tokio::test]
    async fn version_1_results_survive_the_migration() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("batchd.db");
        {
            let pool = old_file(&path, 1).await;
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
        let (all, last) = s.results_chunk(&"batch_a".into(), None, 0, 100).await.unwrap().unwrap();
        assert_eq!((all.as_str(), last), ("{\"b\":\"batch_a\",\"line\":1}\n{\"b\":\"batch_a\",\"line\":3}\n", 3));
        let (errors, _) = s.results_chunk(&"batch_a".into(), Some(false), 0, 100).await.unwrap().unwrap();
        assert_eq!(errors, "{\"b\":\"batch_a\",\"line\":3}\n");
        let found = s.result_by_custom_id(&"batch_b".into(), "c1").await.unwrap();
        assert_eq!((found.line, found.record.as_str()), (1, "{\"b\":\"batch_b\",\"line\":1}"), "the same custom_id in another batch is not mixed up");
        let unit = &s.units(&"batch_a".into()).await.unwrap()[0];
        assert_eq!(s.done_lines(&"batch_a".into(), unit).await.unwrap(), [1, 3]);
        let again = conformance::result("batch_a", 1, true);
        let fresh = conformance::result("batch_a", 2, true);
        let out = s.commit_results("n", &[again, fresh]).await.unwrap();
        assert_eq!((out.inserted, out.duplicates), (1, 1), "a line recorded before the migration is not recorded twice");
    }

    /// Every `user_version` release 2 could leave is recorded as the same sqlx migrations,
    /// and the rest applied: the schema ends where a fresh file's is, and `user_version` is 0.
    #[tokio::test]
    async fn every_user_version_bridges_to_the_same_schema() {
        let dir = tempfile::tempdir().unwrap();
        let fresh = SqliteStore::open(&dir.path().join("fresh.db")).await.unwrap();
        let want = table_columns(fresh.pool()).await;
        for version in 1..=schema::LAST_USER_VERSION {
            let path = dir.path().join(format!("v{version}.db"));
            old_file(&path, version).await.close().await;
            let s = SqliteStore::open(&path).await.unwrap();
            assert_eq!(table_columns(s.pool()).await, want, "user_version {version}");
            let user_version: i64 = sqlx::query_scalar("PRAGMA user_version").fetch_one(s.pool()).await.unwrap();
            assert_eq!(user_version, 0, "user_version {version}");
            let applied: Vec<(i64, i64)> =
                sqlx::query_as("SELECT version, execution_time FROM _sqlx_migrations ORDER BY version").fetch_all(s.pool()).await.unwrap();
            assert_eq!(applied.len(), schema::SQLITE.migrations.len());
            assert!(applied.iter().all(|&(v, t)| (v <= version) == (t == 0)), "bridged versions are recorded, later ones run: {applied:?}");
        }
    }

    async fn table_columns(pool: &sqlx::SqlitePool) -> Vec<(String, String)> {
        sqlx::query_as("SELECT m.name, p.name FROM sqlite_master m, pragma_table_info(m.name) p WHERE m.type = 'table' ORDER BY m.name, p.cid")
            .fetch_all(pool)
            .await
            .unwrap()
    }

    /// A file a newer batchd migrated is refused with a message saying so, and left as it is.
    #[tokio::test]
    async fn a_newer_schema_is_refused_with_a_clear_message() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("batchd.db");
        let s = SqliteStore::open(&path).await.unwrap();
        sqlx::query("INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) VALUES (9999, 'from the future', TRUE, x'00', 1)")
            .execute(s.pool())
            .await
            .unwrap();
        s.pool().close().await;
        let err = SqliteStore::open(&path).await.err().expect("a newer schema is refused");
        let msg = batchd::Chain(&err).to_string();
        assert!(msg.contains("version 9999") && msg.contains("upgrade this batchd"), "{msg}");
        let opts = SqliteConnectOptions::new().filename(&path);
        let pool = SqlitePoolOptions::new().connect_with(opts).await.unwrap();
        let kept: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE version = 9999").fetch_one(&pool).await.unwrap();
        assert_eq!(kept, 1);
    }
}

#[test]
fn schema_states() {
    use sqlx::migrate::AppliedMigration;
    let applied = |versions: &[i64]| -> Vec<AppliedMigration> {
        let m = &schema::SQLITE;
        versions
            .iter()
            .map(|v| AppliedMigration { version: *v, checksum: m.iter().find(|x| x.version == *v).map_or(vec![0].into(), |x| x.checksum.clone()) })
            .collect()
    };
    let all: Vec<i64> = schema::SQLITE.iter().map(|m| m.version).collect();
    let state = |v: &[i64]| schema::SchemaState::of(&schema::SQLITE, &applied(v));
    assert_eq!(state(&all), schema::SchemaState::Current);
    assert_eq!(state(&all[..2]), schema::SchemaState::Behind(all[2..].to_vec()));
    let mut ahead = all.clone();
    ahead.push(1000);
    assert_eq!(state(&ahead), schema::SchemaState::Ahead { database: 1000, known: *all.last().unwrap() });
    assert!(state(&ahead).check("SQLite").is_err() && state(&all[..1]).check("SQLite").is_ok());
    let mut modified = applied(&all);
    modified[0].checksum = vec![1, 2, 3].into();
    assert_eq!(schema::SchemaState::of(&schema::SQLITE, &modified), schema::SchemaState::Modified(1));
}

/// Migrations that have run on users' databases never change (sqlx refuses a database whose
/// recorded checksum differs): the first bytes of each one's SHA-384, as release 2 ran them.
#[test]
fn applied_migrations_keep_their_checksums() {
    let pinned = [
        (&schema::POSTGRES, 1, "4cdd94812add8317"),
        (&schema::POSTGRES, 2, "6294568b396a38ac"),
        (&schema::SQLITE, 1, "472f994ff3208445"),
        (&schema::SQLITE, 2, "eed52dd6652d3f8a"),
        (&schema::SQLITE, 3, "cd10579d1cdb2429"),
        (&schema::SQLITE, 4, "51ccfa8b0adf737c"),
        (&schema::SQLITE, 5, "65082e3e64011edb"),
    ];
    for (migrator, version, want) in pinned {
        let m = migrator.iter().find(|m| m.version == version).expect("the migration is still there");
        let got: String = m.checksum[..8].iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(got, want, "migration {version} ({}) was changed", m.description);
    }
}

mod postgres {
    use super::*;

    #[tokio::test]
    async fn conformance_postgres() {
        let Some(db) = TestDatabase::create("conformance_postgres").await else { return };
        let store = PgStore::open(&db.url).await.unwrap();
        conformance::run_all(&store).await;
    }

    /// Nodes starting together on a fresh database: sqlx's migrator holds an advisory lock, so
    /// one of them migrates and the others find the schema done; every one of them works.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nodes_starting_at_once_migrate_once() {
        let Some(db) = TestDatabase::create("nodes_starting_at_once_migrate_once").await else { return };
        let opened = futures::future::join_all((0..6).map(|_| PgStore::open(&db.url))).await;
        let stores: Vec<PgStore> = opened.into_iter().map(|s| s.expect("every node opens the store")).collect();
        let applied: Vec<(i64, bool)> =
            sqlx::query_as("SELECT version, success FROM _sqlx_migrations ORDER BY version").fetch_all(stores[0].pool()).await.unwrap();
        assert_eq!(applied.len(), schema::POSTGRES.migrations.len(), "each migration recorded once");
        assert!(applied.iter().all(|(_, ok)| *ok));
        for (i, s) in stores.iter().enumerate() {
            s.insert_file(&conformance::sample_file("t", &format!("file-{i}"))).await.unwrap();
        }
        let again = PgStore::open(&db.url).await.unwrap();
        assert_eq!(again.existing_file_ids(&(0..6).map(|i| FileId::from(format!("file-{i}"))).collect::<Vec<_>>()).await.unwrap().len(), 6);
    }

    /// A server that cannot be reached is `Unavailable` (the API answers 503), not `Other`.
    #[tokio::test]
    async fn unreachable_server_is_unavailable() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let err = PgStore::open(&format!("postgres://postgres@127.0.0.1:{port}/none")).await.err().expect("nothing listens there");
        assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
        let cause = std::error::Error::source(&err).and_then(|c| c.downcast_ref::<sqlx::Error>());
        assert!(matches!(cause, Some(sqlx::Error::Io(_))), "the driver's error is kept as the source: {err:?}");
    }

    #[tokio::test]
    async fn bad_url_is_reported() {
        let err = PgStore::open("postgres://host:notaport/db").await.err().expect("a bad URL");
        assert!(batchd::Chain(&err).to_string().contains("invalid PostgreSQL URL"), "{err:?}");
    }

    /// Readers page the outbox by id; with writers committing concurrently, a reader that
    /// follows its cursor must still see every event (ids appear in commit order).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn outbox_cursor_sees_every_event_under_concurrent_writers() {
        let Some(db) = TestDatabase::create("outbox_cursor_sees_every_event_under_concurrent_writers").await else { return };
        let store = std::sync::Arc::new(PgStore::open(&db.url).await.unwrap());
        for w in 0..4 {
            store.insert_file(&conformance::sample_file("ob", &format!("file-ob{w}"))).await.unwrap();
            store.insert_batch(&conformance::sample_batch("ob", &format!("batch_ob{w}"), &format!("file-ob{w}")), None).await.unwrap();
        }
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let s = store.clone();
                tokio::spawn(async move {
                    for i in 0..50 {
                        s.append_event(&format!("batch_ob{w}").into(), "batch.stalled", &format!("{{\"i\":{i}}}"), 1).await.unwrap();
                    }
                })
            })
            .collect();
        let filter = EventFilter { tenant: Some("ob".into()), batch_id: None };
        let (mut seen, mut cursor) = (Vec::new(), 0);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while seen.len() < 204 && std::time::Instant::now() < deadline {
            for e in store.events_after(&filter, cursor, 7).await.unwrap() {
                cursor = e.id;
                seen.push(e.id);
            }
        }
        futures::future::join_all(writers).await;
        let all: Vec<i64> = store.events_after(&filter, 0, 10_000).await.unwrap().into_iter().map(|e| e.id).collect();
        assert_eq!(seen, all, "the cursor reader saw every event, in id order");
    }

    /// Results committed by racing nodes for the same lines are recorded and counted once, and
    /// the sums of a batch never overflow into an error.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn racing_nodes_commit_each_line_once() {
        let Some(db) = TestDatabase::create("racing_nodes_commit_each_line_once").await else { return };
        let store = std::sync::Arc::new(PgStore::open(&db.url).await.unwrap());
        store.insert_file(&conformance::sample_file("rc", "file-rc")).await.unwrap();
        store.insert_batch(&conformance::sample_batch("rc", "batch_rc", "file-rc"), None).await.unwrap();
        let unit = WorkUnit {
            batch_id: "batch_rc".into(),
            idx: 0,
            first_line: 1,
            end_line: 1001,
            line_count: 1000,
            byte_offset: 0,
            byte_len: 1,
            epoch: 0,
            ordered: false,
        };
        let v = Validated { total: 1000, model: None, format: InputFormat::Full, units: vec![unit], est_tokens: 0 };
        assert!(store.mark_validated(&"batch_rc".into(), &v, 1).await.unwrap());
        let nodes: Vec<_> = (0..4)
            .map(|n| {
                let s = store.clone();
                tokio::spawn(async move {
                    let mut inserted = 0;
                    // Overlapping groups in different orders, as nodes that lost and retook units send them.
                    for g in 0..10u64 {
                        let start = if n % 2 == 0 { g * 100 + 1 } else { (9 - g) * 100 + 1 };
                        let recs: Vec<_> =
                            (start..start + 100).map(|l| ResultRecord { unit_idx: 0, ..conformance::result("batch_rc", l, l % 7 != 0) }).collect();
                        inserted += s.commit_results(&format!("n{n}"), &recs).await.unwrap().inserted;
                    }
                    inserted
                })
            })
            .collect();
        let total: u64 = futures::future::join_all(nodes).await.into_iter().map(|r| r.unwrap()).sum();
        assert_eq!(total, 1000);
        let b = store.get_batch(None, &"batch_rc".into()).await.unwrap();
        assert_eq!((b.completed + b.failed, b.failed), (1000, 142));
        assert_eq!(store.units(&"batch_rc".into()).await.unwrap()[0].line_count, 1000);
        assert!(store.lease_unit(&"batch_rc".into(), "n", Duration::from_secs(5)).await.unwrap().is_none(), "done counts add up");
    }

    /// A node that writes groups of results stays within the durability budget on this backend:
    /// one transaction per commit, whatever the group size.
    #[tokio::test]
    async fn one_transaction_per_group_commit() {
        let Some(db) = TestDatabase::create("one_transaction_per_group_commit").await else { return };
        let store = PgStore::open(&db.url).await.unwrap();
        store.insert_file(&conformance::sample_file("tx", "file-tx")).await.unwrap();
        store.insert_batch(&conformance::sample_batch("tx", "batch_tx", "file-tx"), None).await.unwrap();
        let units: Vec<WorkUnit> = (0..5)
            .map(|i| WorkUnit {
                batch_id: "batch_tx".into(),
                idx: i,
                first_line: 1 + i as u64 * 200,
                end_line: 201 + i as u64 * 200,
                line_count: 200,
                byte_offset: 0,
                byte_len: 1,
                epoch: 0,
                ordered: false,
            })
            .collect();
        let v = Validated { total: 1000, model: None, format: InputFormat::Full, units, est_tokens: 0 };
        store.mark_validated(&"batch_tx".into(), &v, 1).await.unwrap();
        let before = store.commits();
        for g in 0..2u64 {
            let recs: Vec<_> =
                (g * 500 + 1..=g * 500 + 500).map(|l| ResultRecord { unit_idx: ((l - 1) / 200) as i64, ..conformance::result("batch_tx", l, true) }).collect();
            assert_eq!(store.commit_results("n", &recs).await.unwrap().inserted, 500);
        }
        assert_eq!(store.commits() - before, 2, "two groups of 500, two transactions");
        assert!(store.units(&"batch_tx".into()).await.unwrap().iter().all(|u| u.line_count == 200));
        assert!(store.lease_unit(&"batch_tx".into(), "n", Duration::from_secs(5)).await.unwrap().is_none());
    }

    /// A database release 2 migrated (sqlx, with 0001 and 0002) opens: its recorded
    /// checksums are still this build's, the new migrations apply, and its rows are there.
    #[tokio::test]
    async fn a_release_2_database_migrates_on() {
        let Some(db) = TestDatabase::create("a_release_2_database_migrates_on").await else { return };
        let old_dir = tempfile::tempdir().unwrap();
        for m in schema::POSTGRES.iter().filter(|m| m.version <= 2) {
            std::fs::write(old_dir.path().join(format!("{:04}_{}.sql", m.version, m.description.replace(' ', "_"))), m.sql.as_bytes()).unwrap();
        }
        let old = sqlx::migrate::Migrator::new(old_dir.path()).await.unwrap();
        let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
        old.run(&pool).await.unwrap();
        sqlx::query("INSERT INTO files (id, tenant, bytes, created_at, filename, purpose, blob_key) VALUES ('file-r2', 't', 1, 1, 'a', 'batch', 'k')")
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
        let store = PgStore::open(&db.url).await.expect("release 2's database opens");
        assert_eq!(store.get_file("t", &"file-r2".into(), 0).await.unwrap().bytes, 1);
        let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM _sqlx_migrations ORDER BY version").fetch_all(store.pool()).await.unwrap();
        assert_eq!(applied, schema::POSTGRES.iter().map(|m| m.version).collect::<Vec<_>>());
    }

    /// Tables → (column, not null, integer/text/other), sorted; the layout differences and
    /// SQLite's own tables left out.
    type Columns = std::collections::BTreeMap<String, Vec<(String, bool, &'static str)>>;

    fn class(ty: &str) -> &'static str {
        let ty = ty.to_ascii_lowercase();
        if ty.contains("int") || ty.contains("bool") {
            "integer"
        } else if ty == "text" {
            "text"
        } else {
            "other"
        }
    }

    fn tidy(rows: Vec<(String, String, bool, String)>, side: usize) -> Columns {
        let mut out = Columns::new();
        for (table, column, not_null, ty) in rows {
            let dropped = schema::LAYOUT_DIFFERENCES.iter().any(|d| d.0 == table && [d.1, d.2][side].contains(&column.as_str()));
            if !table.starts_with("sqlite_") && !dropped {
                out.entry(table).or_default().push((column, not_null, class(&ty)));
            }
        }
        out.values_mut().for_each(|c| c.sort());
        out
    }

    /// The two schemas hold the same tables and columns, table by table (but for the result
    /// log's documented layout), and `batchd migrate` copies every one of them but those it
    /// names, with every column but the node state it names.
    #[tokio::test]
    async fn schemas_and_the_copy_plan_agree_table_by_table() {
        let Some(db) = TestDatabase::create("schemas_and_the_copy_plan_agree_table_by_table").await else { return };
        let pg = PgStore::open(&db.url).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let lite = SqliteStore::open(&dir.path().join("batchd.db")).await.unwrap();
        let sqlite = tidy(
            sqlx::query_as("SELECT m.name, p.name, p.\"notnull\" OR p.pk > 0, p.type FROM sqlite_master m, pragma_table_info(m.name) p WHERE m.type = 'table'")
                .fetch_all(lite.pool())
                .await
                .unwrap(),
            0,
        );
        let postgres = tidy(
            sqlx::query_as(
                "SELECT table_name::text, column_name::text, is_nullable = 'NO', data_type::text FROM information_schema.columns
                 WHERE table_schema = current_schema()",
            )
            .fetch_all(pg.pool())
            .await
            .unwrap(),
            1,
        );
        assert_eq!(sqlite.keys().collect::<Vec<_>>(), postgres.keys().collect::<Vec<_>>(), "the same tables");
        for (table, columns) in &sqlite {
            assert_eq!(columns, &postgres[table], "table {table}: the same columns, nullability and kinds");
        }
        let plan = migrate::copy_plan(&mut pg.pool().acquire().await.unwrap()).await.unwrap();
        let planned: Columns = plan.iter().map(|t| (t.name.clone(), t.columns.iter().map(|(c, ..)| (c.clone(), false, "")).collect())).collect();
        for (table, columns) in &sqlite {
            let copied = columns.iter().filter(|c| !migrate::NODE_STATE.contains(&(table.as_str(), c.0.as_str()))).map(|c| c.0.clone());
            match planned.get(table) {
                Some(p) => assert_eq!(p.iter().map(|c| c.0.clone()).collect::<std::collections::BTreeSet<_>>(), copied.collect(), "{table} copied whole"),
                None => assert!(migrate::NOT_COPIED.contains(&table.as_str()), "table {table} is neither copied by batchd migrate nor named as left out"),
            }
        }
        for (table, column) in migrate::NODE_STATE {
            assert!(sqlite[*table].iter().any(|c| c.0 == *column), "{table}.{column} is a real column");
        }
        assert!(migrate::NOT_COPIED.iter().all(|t| sqlite.contains_key(*t)), "every table left out exists");
        assert!(plan.iter().any(|t| t.name == "files" && t.serial.as_deref() == Some("seq")), "sequences are found: {plan:?}");
    }
}
