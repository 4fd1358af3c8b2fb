//! PostgreSQL checks, each on a fresh database (see [`super::testing`]); skipped with a
//! message when `BATCHD_TEST_POSTGRES_URL` is unset.

use super::testing::TestDatabase;
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
    let applied: Vec<(i64, bool)> = sqlx::query_as("SELECT version, success FROM _sqlx_migrations ORDER BY version").fetch_all(&stores[0].pool).await.unwrap();
    assert_eq!(applied.len(), MIGRATOR.migrations.len(), "each migration recorded once");
    assert!(applied.iter().all(|(_, ok)| *ok));
    for (i, s) in stores.iter().enumerate() {
        s.insert_file(&conformance::sample_file("t", &format!("file-{i}"))).await.unwrap();
    }
    let again = PgStore::open(&db.url).await.unwrap();
    assert_eq!(again.existing_file_ids(&(0..6).map(|i| format!("file-{i}")).collect::<Vec<_>>()).await.unwrap().len(), 6);
}

/// A server that cannot be reached is `Unavailable` (the API answers 503), not `Other`.
#[tokio::test]
async fn unreachable_server_is_unavailable() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let err = PgStore::open(&format!("postgres://postgres@127.0.0.1:{port}/none")).await.err().expect("nothing listens there");
    assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
}

#[tokio::test]
async fn bad_url_is_reported() {
    let err = PgStore::open("postgres://host:notaport/db").await.err().expect("a bad URL");
    assert!(err.to_string().contains("invalid PostgreSQL URL"), "{err}");
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
                    s.append_event(&format!("batch_ob{w}"), "batch.stalled", &format!("{{\"i\":{i}}}"), 1).await.unwrap();
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
    let unit = WorkUnit { batch_id: "batch_rc".into(), idx: 0, first_line: 1, end_line: 1001, line_count: 1000, byte_offset: 0, byte_len: 1, epoch: 0 };
    let v = Validated { total: 1000, model: None, format: InputFormat::Full, units: vec![unit], est_tokens: 0 };
    assert!(store.mark_validated("batch_rc", &v, 1).await.unwrap());
    let nodes: Vec<_> = (0..4)
        .map(|n| {
            let s = store.clone();
            tokio::spawn(async move {
                let mut inserted = 0;
                // Overlapping groups in different orders, as nodes that lost and retook units send them.
                for g in 0..10u64 {
                    let start = if n % 2 == 0 { g * 100 + 1 } else { (9 - g) * 100 + 1 };
                    let recs: Vec<_> = (start..start + 100).map(|l| ResultRecord { unit_idx: 0, ..conformance::result("batch_rc", l, l % 7 != 0) }).collect();
                    inserted += s.commit_results(&format!("n{n}"), &recs).await.unwrap().inserted;
                }
                inserted
            })
        })
        .collect();
    let total: u64 = futures::future::join_all(nodes).await.into_iter().map(|r| r.unwrap()).sum();
    assert_eq!(total, 1000);
    let b = store.get_batch(None, "batch_rc").await.unwrap();
    assert_eq!((b.completed + b.failed, b.failed), (1000, 142));
    assert_eq!(store.units("batch_rc").await.unwrap()[0].line_count, 1000);
    assert!(store.lease_unit("batch_rc", "n", Duration::from_secs(5)).await.unwrap().is_none(), "done counts add up");
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
        })
        .collect();
    let v = Validated { total: 1000, model: None, format: InputFormat::Full, units, est_tokens: 0 };
    store.mark_validated("batch_tx", &v, 1).await.unwrap();
    let before = store.commits();
    for g in 0..2u64 {
        let recs: Vec<_> =
            (g * 500 + 1..=g * 500 + 500).map(|l| ResultRecord { unit_idx: ((l - 1) / 200) as i64, ..conformance::result("batch_tx", l, true) }).collect();
        assert_eq!(store.commit_results("n", &recs).await.unwrap().inserted, 500);
    }
    assert_eq!(store.commits() - before, 2, "two groups of 500, two transactions");
    assert!(store.units("batch_tx").await.unwrap().iter().all(|u| u.line_count == 200));
    assert!(store.lease_unit("batch_tx", "n", Duration::from_secs(5)).await.unwrap().is_none());
}
