//! Upgrades in place: a data directory made by release 2 (`tests/fixtures/datadir-r2`, made
//! by `tests/fixtures/make-datadir-r2.sh` with the batchd of commit 7762084, whose SQLite
//! schema was versioned by `PRAGMA user_version` = 5) opens with today's batchd: its schema
//! is bridged to sqlx's migrations and migrated, every file, batch, result and output byte is
//! there, and a new batch runs on it.

use std::path::Path;
use std::time::Duration;

use batchd::blob::Blob;
use batchd::store::prelude::*;
use batchd::store::sqlite::SqliteStore;
use batchd::store::{BatchStatus, Error};
use futures::TryStreamExt;
use serde_json::json;

use crate::common::*;

const F1: &str = "file-L468vnuHZe8Sx4IzVflE87Ie";
const B1: &str = "batch_or8QpRTjzqY5MuaFpMGqGPyg";
const F2: &str = "file-rf6wkUu1izGVlJS3zETXFq2d";
const B2: &str = "batch_uCM43CbYdpGux4KEKyRB9QxO";
const F3: &str = "file-uAPLKQ6m8lVTkEn2e3wxPYwg";
const OUT: &str = "file-251419ac5e4737d8a583b8ba359affc2";
/// When the fixture was made (its input files expire 30 days later, so the store is read as
/// of then, and the HTTP checks below touch nothing that expires).
const MADE_AT: i64 = 1_796_654_364;

/// A copy of the fixture (opening migrates in place).
fn fixture_copy() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/datadir-r2"), &tmp.path().join("data"));
    tmp
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

async fn blob_text(blob: &Blob, key: &str) -> String {
    let parts: Vec<bytes::Bytes> = blob.get_stream(key).await.unwrap().try_collect().await.unwrap();
    String::from_utf8(parts.concat()).unwrap()
}

#[tokio::test]
async fn a_release_2_data_dir_is_migrated_in_place_and_keeps_everything() {
    let tmp = fixture_copy();
    let data = tmp.path().join("data");
    {
        let store = SqliteStore::open(&data.join("batchd.db")).await.expect("the release-2 file opens");
        let files: Vec<_> =
            store.list_files("default", &batchd::store::FileQuery { purpose: None, limit: 10, ascending: true, after: None }, MADE_AT).await.unwrap().items;
        let ids: Vec<&str> = files.iter().map(|f| f.id.as_str()).collect();
        assert_eq!(ids, [F1, OUT, F2, F3], "every file, in upload order");
        let blob = Blob::local(&data.join("blobs")).unwrap();
        assert!(blob_text(&blob, &files[3].blob_key).await.contains("\"custom_id\":\"u1\""), "the unused input's bytes");

        let done = store.get_batch(Some("default"), &B1.into()).await.unwrap();
        assert_eq!((done.status, done.total, done.completed, done.failed), (BatchStatus::Completed, 3, 3, 0));
        assert_eq!((done.usage.input_tokens, done.usage.output_tokens, done.usage.total_tokens), (51, 48, 99));
        assert_eq!(done.output_file_id.as_deref(), Some(OUT));
        assert_eq!(done.metadata.unwrap()["fixture"], "done");
        let (log, last) = store.results_chunk(&B1.into(), None, 0, 100).await.unwrap().unwrap();
        assert_eq!(last, 3);
        let output = blob_text(&blob, &store.get_file("default", &OUT.into(), MADE_AT).await.unwrap().blob_key).await;
        assert_eq!(log, output, "the result log and the output file hold the same three lines");
        assert_eq!(store.result_by_custom_id(&B1.into(), "r2").await.unwrap().line, 2);

        let failed = store.get_batch(None, &B2.into()).await.unwrap();
        assert_eq!(failed.status, BatchStatus::Failed);
        assert_eq!(failed.errors.unwrap()[0].code, "duplicate_custom_id");
        let usage = store.batch_usage(&B1.into()).await.unwrap();
        assert_eq!((usage[0].model.as_str(), usage[0].requests, usage[0].usage.total_tokens), ("gpt-4o-mini", 3, 99));
        assert!(matches!(store.get_batch(Some("other"), &B1.into()).await, Err(Error::NotFound)));
    }
    let (user_version, applied) = schema_record(&data.join("batchd.db")).await;
    assert_eq!(user_version, 0, "from now on the sqlx record alone says where the schema is");
    assert_eq!(applied, batchd::store::schema::SQLITE.iter().map(|m| m.version).collect::<Vec<_>>());

    let m = mock(MockArgs::default()).await;
    let s = Server::start_with_data(&config(&m.base_url(), "", ""), Some(data));
    let api = s.api();
    let b = api.batch(B1).await;
    assert_eq!((b["status"].as_str(), &b["request_counts"]), (Some("completed"), &json!({"total": 3, "completed": 3, "failed": 0})));
    let content = api.content(OUT).await;
    assert_eq!(content.lines().count(), 3);
    let (_, list) = api.get("/batches").await;
    assert_eq!(list["data"].as_array().unwrap().iter().map(|b| b["id"].as_str().unwrap()).collect::<Vec<_>>(), [B2, B1]);
    let id = api.submit(&chat_lines(4, "gpt-4o-mini")).await;
    let fresh = api.wait_for(&id, &["completed"], Duration::from_secs(60)).await;
    assert_eq!(fresh["request_counts"], json!({"total": 4, "completed": 4, "failed": 0}));
    let (_, list) = api.get("/batches?limit=1").await;
    assert_eq!(list["data"][0]["id"], id.as_str(), "the new batch lists first, after the release-2 ones");
}

/// `PRAGMA user_version` and the versions sqlx recorded, read straight from the file.
async fn schema_record(db: &Path) -> (i64, Vec<i64>) {
    use sqlx::Connection;
    let mut c = sqlx::SqliteConnection::connect_with(&sqlx::sqlite::SqliteConnectOptions::new().filename(db)).await.unwrap();
    let v: i64 = sqlx::query_scalar("PRAGMA user_version").fetch_one(&mut c).await.unwrap();
    let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version").fetch_all(&mut c).await.unwrap();
    (v, applied)
}
