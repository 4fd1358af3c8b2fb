//! Behaviour every [`Store`] backend must show, as `pub async fn` checks over `&dyn Store`.
//!
//! Each backend's test module builds its store and calls [`run_all`]; the checks are never
//! forked per backend. They panic with a message naming the broken rule.

use super::*;

pub fn sample_file(tenant: &str, id: &str) -> FileRecord {
    FileRecord {
        id: id.into(),
        tenant: tenant.into(),
        bytes: 10,
        created_at: 1_000,
        filename: "in.jsonl".into(),
        purpose: "batch".into(),
        expires_at: None,
        blob_key: format!("files/{id}"),
    }
}

pub fn sample_batch(tenant: &str, id: &str, input: &str) -> BatchRecord {
    BatchRecord::new(id.into(), tenant.into(), input.into(), "/v1/chat/completions".into(), "24h".into(), 1_000, 1_000 + 86_400)
}

fn units(batch: &str, n: i64, lines_per_unit: u64) -> Vec<WorkUnit> {
    (0..n)
        .map(|i| WorkUnit {
            batch_id: batch.into(),
            idx: i,
            first_line: 1 + i as u64 * lines_per_unit,
            end_line: 1 + (i as u64 + 1) * lines_per_unit,
            line_count: lines_per_unit,
            byte_offset: i as u64 * 100,
            byte_len: 100,
        })
        .collect()
}

pub fn result(batch: &str, line: u64, ok: bool) -> ResultRecord {
    ResultRecord {
        batch_id: batch.into(),
        line,
        unit_idx: ((line - 1) / 10) as i64,
        custom_id: format!("c{line}"),
        ok,
        record: format!("{{\"custom_id\":\"c{line}\"}}"),
        usage: Usage { input_tokens: 2, output_tokens: 3, total_tokens: 5, ..Default::default() },
    }
}

async fn running_batch(store: &dyn Store, tenant: &str, id: &str, n_units: i64) {
    store.insert_file(&sample_file(tenant, &format!("file-{id}"))).await.unwrap();
    store.insert_batch(&sample_batch(tenant, id, &format!("file-{id}")), None).await.unwrap();
    let v = Validated { total: n_units as u64 * 10, model: Some("m".into()), format: InputFormat::Full, units: units(id, n_units, 10) };
    assert!(store.mark_validated(id, &v, 1_001).await.unwrap(), "validating batch must be markable");
}

/// Runs every check on a fresh store.
pub async fn run_all(store: &dyn Store) {
    files_roundtrip_and_isolation(store).await;
    file_pagination(store).await;
    file_expiry(store).await;
    delete_conflicts_while_running(store).await;
    batch_idempotency_and_pagination(store).await;
    cancel_transitions(store).await;
    lease_is_exclusive(store).await;
    expired_lease_is_taken_over(store).await;
    results_idempotent(store).await;
    finish_is_final_and_atomic(store).await;
}

pub async fn files_roundtrip_and_isolation(store: &dyn Store) {
    let f = sample_file("iso-a", "file-iso1");
    store.insert_file(&f).await.unwrap();
    assert_eq!(store.get_file("iso-a", "file-iso1", 0).await.unwrap(), f);
    assert!(matches!(store.get_file("iso-b", "file-iso1", 0).await, Err(Error::NotFound)), "other tenant must not see a file");
    assert!(matches!(store.delete_file("iso-b", "file-iso1", 0).await, Err(Error::NotFound)), "other tenant must not delete");
    assert!(store.insert_file(&f).await.is_err(), "duplicate file id must be refused");
}

pub async fn file_pagination(store: &dyn Store) {
    for i in 0..5 {
        let mut f = sample_file("pg", &format!("file-pg{i}"));
        f.purpose = if i % 2 == 0 { "batch".into() } else { "user_data".into() };
        store.insert_file(&f).await.unwrap();
    }
    let q = |limit, ascending, after: Option<&str>, purpose: Option<&str>| FileQuery {
        purpose: purpose.map(Into::into),
        limit,
        ascending,
        after: after.map(Into::into),
    };
    let p = store.list_files("pg", &q(2, false, None, None), 0).await.unwrap();
    let ids: Vec<_> = p.items.iter().map(|f| f.id.as_str()).collect();
    assert_eq!(ids, ["file-pg4", "file-pg3"], "newest first");
    assert!(p.has_more);
    let p = store.list_files("pg", &q(10, false, Some("file-pg3"), None), 0).await.unwrap();
    let ids: Vec<_> = p.items.iter().map(|f| f.id.as_str()).collect();
    assert_eq!(ids, ["file-pg2", "file-pg1", "file-pg0"], "after cursor");
    assert!(!p.has_more);
    let p = store.list_files("pg", &q(10, true, Some("file-pg1"), Some("batch")), 0).await.unwrap();
    let ids: Vec<_> = p.items.iter().map(|f| f.id.as_str()).collect();
    assert_eq!(ids, ["file-pg2", "file-pg4"], "ascending with purpose");
    assert!(matches!(store.list_files("other", &q(1, true, Some("file-pg1"), None), 0).await, Err(Error::NotFound)));
}

pub async fn file_expiry(store: &dyn Store) {
    let mut f = sample_file("exp", "file-exp");
    f.expires_at = Some(2_000);
    store.insert_file(&f).await.unwrap();
    assert!(store.get_file("exp", "file-exp", 1_999).await.is_ok());
    assert!(matches!(store.get_file("exp", "file-exp", 2_000).await, Err(Error::NotFound)), "expired file is gone");
    let expired = store.expired_files(2_000, 100).await.unwrap();
    assert!(expired.iter().any(|f| f.id == "file-exp"));
    store.purge_file("file-exp").await.unwrap();
    assert!(!store.expired_files(2_000, 100).await.unwrap().iter().any(|f| f.id == "file-exp"));
}

pub async fn delete_conflicts_while_running(store: &dyn Store) {
    running_batch(store, "del", "batch_del", 1).await;
    assert!(matches!(store.delete_file("del", "file-batch_del", 0).await, Err(Error::Conflict(_))));
    assert!(store.get_file("del", "file-batch_del", 0).await.is_ok(), "a refused delete keeps the file");
    let fin = Finish { status: BatchStatus::Completed, at: 1_100, output_file: None, error_file: None };
    store.finish_batch("batch_del", &fin).await.unwrap();
    store.delete_file("del", "file-batch_del", 0).await.unwrap();
    assert!(matches!(store.get_file("del", "file-batch_del", 0).await, Err(Error::NotFound)));
}

pub async fn batch_idempotency_and_pagination(store: &dyn Store) {
    store.insert_file(&sample_file("bp", "file-bp")).await.unwrap();
    let hashed = |id: &str, hash: &str| BatchRecord { idempotency_hash: Some(hash.into()), ..sample_batch("bp", id, "file-bp") };
    let first = store.insert_batch(&hashed("batch_bp1", "hash-1"), Some("key-1")).await.unwrap();
    let again = store.insert_batch(&hashed("batch_bp2", "hash-2"), Some("key-1")).await.unwrap();
    assert_eq!(first.id, again.id, "same idempotency key returns the first batch");
    assert_eq!(again.idempotency_hash.as_deref(), Some("hash-1"), "with the hash of the first request");
    assert!(matches!(store.get_batch(None, "batch_bp2").await, Err(Error::NotFound)));
    let other = store.insert_batch(&sample_batch("bp-other", "batch_bp3", "file-bp"), Some("key-1")).await.unwrap();
    assert_eq!(other.id, "batch_bp3", "idempotency keys are per tenant");
    for i in 4..8 {
        store.insert_batch(&sample_batch("bp", &format!("batch_bp{i}"), "file-bp"), None).await.unwrap();
    }
    let p1 = store.list_batches("bp", 3, None).await.unwrap();
    let ids: Vec<_> = p1.items.iter().map(|b| b.id.as_str()).collect();
    assert_eq!(ids, ["batch_bp7", "batch_bp6", "batch_bp5"]);
    assert!(p1.has_more);
    let p2 = store.list_batches("bp", 3, Some("batch_bp5")).await.unwrap();
    let ids: Vec<_> = p2.items.iter().map(|b| b.id.as_str()).collect();
    assert_eq!(ids, ["batch_bp4", "batch_bp1"]);
    assert!(!p2.has_more);
}

pub async fn cancel_transitions(store: &dyn Store) {
    store.insert_file(&sample_file("cx", "file-cx")).await.unwrap();
    store.insert_batch(&sample_batch("cx", "batch_cx", "file-cx"), None).await.unwrap();
    assert!(matches!(store.request_cancel("cx-other", "batch_cx", 5).await, Err(Error::NotFound)));
    let b = store.request_cancel("cx", "batch_cx", 5).await.unwrap();
    assert_eq!((b.status, b.cancelling_at), (BatchStatus::Cancelling, Some(5)));
    let v = Validated { total: 1, model: None, format: InputFormat::Full, units: vec![] };
    assert!(!store.mark_validated("batch_cx", &v, 6).await.unwrap(), "validation must not undo a cancel");
    assert!(!store.mark_failed("batch_cx", &[], 6).await.unwrap());
    let fin = Finish { status: BatchStatus::Cancelled, at: 7, output_file: None, error_file: None };
    store.finish_batch("batch_cx", &fin).await.unwrap();
    let b = store.request_cancel("cx", "batch_cx", 8).await.unwrap();
    assert_eq!((b.status, b.cancelled_at, b.cancelling_at), (BatchStatus::Cancelled, Some(7), Some(5)));
}

pub async fn lease_is_exclusive(store: &dyn Store) {
    running_batch(store, "ls", "batch_ls", 20).await;
    let tasks = (0..8).map(|n| async move {
        let mut got = vec![];
        while let Some(u) = store.lease_unit("batch_ls", &format!("node{n}"), 30, 2_000).await.unwrap() {
            got.push(u.idx);
        }
        got
    });
    let mut all: Vec<i64> = futures::future::join_all(tasks).await.into_iter().flatten().collect();
    all.sort();
    assert_eq!(all, (0..20).collect::<Vec<_>>(), "every unit leased exactly once across racing nodes");
}

pub async fn expired_lease_is_taken_over(store: &dyn Store) {
    running_batch(store, "lx", "batch_lx", 2).await;
    let a = store.lease_unit("batch_lx", "dead", 10, 3_000).await.unwrap().unwrap();
    store.lease_unit("batch_lx", "dead", 10, 3_000).await.unwrap().unwrap();
    assert!(store.lease_unit("batch_lx", "live", 10, 3_005).await.unwrap().is_none(), "live leases hold");
    let b = store.lease_unit("batch_lx", "live", 10, 3_011).await.unwrap().unwrap();
    assert_eq!(a.idx, b.idx, "an expired lease is taken over, lowest unit first");
    store.renew_leases("live", 100, 3_011).await.unwrap();
    let c = store.lease_unit("batch_lx", "third", 10, 3_050).await.unwrap().unwrap();
    assert_ne!(c.idx, b.idx, "a renewed lease holds");
    store.release_batch_leases("batch_lx", "third").await.unwrap();
    assert_eq!(store.lease_unit("batch_lx", "fourth", 10, 3_050).await.unwrap().unwrap().idx, c.idx);
    store.release_leases(Some("live")).await.unwrap();
    assert_eq!(store.lease_unit("batch_lx", "third", 10, 3_050).await.unwrap().unwrap().idx, b.idx);
}

pub async fn results_idempotent(store: &dyn Store) {
    running_batch(store, "rs", "batch_rs", 2).await;
    let first: Vec<_> = (1..=10).map(|l| result("batch_rs", l, l % 3 != 0)).collect();
    assert_eq!(store.commit_results(&first).await.unwrap().inserted, 10);
    let overlap: Vec<_> = (6..=15).map(|l| result("batch_rs", l, true)).collect();
    let out = store.commit_results(&overlap).await.unwrap();
    assert_eq!((out.inserted, out.duplicates), (5, 5), "already recorded lines are not counted again");
    let racing = (0..4).map(|_| {
        let recs: Vec<_> = (16..=20).map(|l| result("batch_rs", l, false)).collect();
        async move { store.commit_results(&recs).await.unwrap().inserted }
    });
    let inserted: u64 = futures::future::join_all(racing).await.into_iter().sum();
    assert_eq!(inserted, 5, "racing commits of the same lines count them once");
    let b = store.get_batch(None, "batch_rs").await.unwrap();
    assert_eq!((b.completed, b.failed), (12, 8));
    assert_eq!(b.usage.total_tokens, 100);
    let unit = &store.units("batch_rs").await.unwrap()[0];
    assert_eq!(store.done_lines("batch_rs", unit).await.unwrap(), (1..=10).collect::<Vec<_>>());
    assert!(store.lease_unit("batch_rs", "n", 10, 9_000).await.unwrap().is_none(), "done units are not leased");
    let (all, last) = store.results_chunk("batch_rs", None, 0, 100).await.unwrap().unwrap();
    let ids: Vec<String> = all.lines().map(str::to_owned).collect();
    let want: Vec<String> = (1..=20).map(|l| format!("{{\"custom_id\":\"c{l}\"}}")).collect();
    assert_eq!((ids, last), (want, 20), "the log reads in line order");
    let (chunk, last) = store.results_chunk("batch_rs", Some(false), 0, 3).await.unwrap().unwrap();
    assert_eq!((chunk.as_str(), last), ("{\"custom_id\":\"c3\"}\n{\"custom_id\":\"c6\"}\n{\"custom_id\":\"c9\"}\n", 9), "failed lines, in order");
    let (chunk, last) = store.results_chunk("batch_rs", Some(false), 9, 100).await.unwrap().unwrap();
    assert_eq!((chunk.lines().count(), last), (5, 20), "after line 9: 16..=20");
    assert!(store.results_chunk("batch_rs", Some(false), 20, 100).await.unwrap().is_none());
    assert_eq!(store.results_chunk("batch_rs", Some(true), 0, 1000).await.unwrap().unwrap().0.lines().count(), 12);
    assert_eq!(store.result_by_custom_id("batch_rs", "c7").await.unwrap().line, 7);
}

pub async fn finish_is_final_and_atomic(store: &dyn Store) {
    running_batch(store, "fin", "batch_fin", 1).await;
    store.begin_finalizing("batch_fin", BatchStatus::Completed, 1_500).await.unwrap();
    let b = store.get_batch(None, "batch_fin").await.unwrap();
    assert_eq!((b.status, b.finalize_as), (BatchStatus::Finalizing, Some(BatchStatus::Completed)));
    let mut out = sample_file("fin", "file-fin-out");
    out.purpose = "batch_output".into();
    let fin = Finish { status: BatchStatus::Completed, at: 1_600, output_file: Some(out.clone()), error_file: None };
    store.finish_batch("batch_fin", &fin).await.unwrap();
    store.finish_batch("batch_fin", &fin).await.unwrap();
    let b = store.get_batch(Some("fin"), "batch_fin").await.unwrap();
    assert_eq!((b.status, b.finalizing_at, b.completed_at), (BatchStatus::Completed, Some(1_500), Some(1_600)));
    assert_eq!(b.output_file_id.as_deref(), Some("file-fin-out"));
    assert_eq!(store.get_file("fin", "file-fin-out", 0).await.unwrap(), out);
    let other = Finish { status: BatchStatus::Cancelled, at: 1_700, output_file: None, error_file: None };
    store.finish_batch("batch_fin", &other).await.unwrap();
    store.begin_finalizing("batch_fin", BatchStatus::Expired, 1_800).await.unwrap();
    let b = store.get_batch(Some("fin"), "batch_fin").await.unwrap();
    assert_eq!((b.status, b.cancelled_at), (BatchStatus::Completed, None), "a final batch never changes");
}
