//! Behaviour every [`Store`] backend must show, as `pub async fn` checks over `&dyn Store`.
//!
//! Each backend's test module builds its store and calls [`run_all`]; the checks are never
//! forked per backend. They panic with a message naming the broken rule. Every check uses
//! its own tenant and batch ids, so they can run one after another on one store.

use std::time::Duration;

use batchd::store::prelude::*;
use batchd::store::*;

const NODE: &str = "node-a";
const LONG: Duration = Duration::from_secs(60);
/// A lease or claim that has expired by the time anyone looks.
const GONE: Duration = Duration::ZERO;

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
            epoch: 0,
            // The second unit lists its lines in an order file: the flag must round-trip.
            ordered: i == 1,
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
        model: "m".into(),
        epoch: None,
    }
}

/// Results of lines `lines` run under `unit`'s lease.
fn leased(unit: &WorkUnit, lines: impl Iterator<Item = u64>) -> Vec<ResultRecord> {
    lines.map(|l| ResultRecord { unit_idx: unit.idx, epoch: Some(unit.epoch), ..result(&unit.batch_id, l, true) }).collect()
}

fn validated(total: u64, units: Vec<WorkUnit>) -> Validated {
    Validated { total, model: Some("m".into()), format: InputFormat::Full, units, est_tokens: total * 10 }
}

async fn running_batch(store: &dyn Store, tenant: &str, id: &str, n_units: i64) {
    store.insert_file(&sample_file(tenant, &format!("file-{id}"))).await.unwrap();
    store.insert_batch(&sample_batch(tenant, id, &format!("file-{id}")), None).await.unwrap();
    let v = validated(n_units as u64 * 10, units(id, n_units, 10));
    assert!(store.mark_validated(&id.into(), &v, 1_001).await.unwrap(), "validating batch must be markable");
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
    lease_epochs_fence_commits(store).await;
    claims_are_exclusive(store).await;
    results_idempotent(store).await;
    sums_saturate_and_stay_readable(store).await;
    finish_is_final_and_atomic(store).await;
    late_results_never_change_a_final_batch(store).await;
    fail_batch_from_any_live_status(store).await;
    status_events_follow_every_transition(store).await;
    webhook_deliveries_are_durable_and_claimed(store).await;
    nodes_heartbeat_and_leave(store).await;
    usage_per_model_and_hour(store).await;
    latest_events_newest_first(store).await;
    queued_counts_unfinished_lines(store).await;
    admission_keeps_the_queue_within_its_limits(store).await;
    list_cursors_survive_deletion(store).await;
    remote_batches_are_recorded_once_and_move_on(store).await;
    message_batches_list_by_api_both_ways_and_delete_once_ended(store).await;
}

pub async fn files_roundtrip_and_isolation(store: &dyn Store) {
    let f = sample_file("iso-a", "file-iso1");
    store.insert_file(&f).await.unwrap();
    assert_eq!(store.get_file("iso-a", &"file-iso1".into(), 0).await.unwrap(), f);
    assert!(matches!(store.get_file("iso-b", &"file-iso1".into(), 0).await, Err(Error::NotFound)), "other tenant must not see a file");
    assert!(matches!(store.delete_file("iso-b", &"file-iso1".into(), 0).await, Err(Error::NotFound)), "other tenant must not delete");
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
    assert!(store.get_file("exp", &"file-exp".into(), 1_999).await.is_ok());
    assert!(matches!(store.get_file("exp", &"file-exp".into(), 2_000).await, Err(Error::NotFound)), "expired file is gone");
    let expired = store.expired_files(2_000, 100).await.unwrap();
    assert!(expired.iter().any(|f| f.id == "file-exp"));
    store.purge_file(&"file-exp".into()).await.unwrap();
    assert!(!store.expired_files(2_000, 100).await.unwrap().iter().any(|f| f.id == "file-exp"));
}

pub async fn delete_conflicts_while_running(store: &dyn Store) {
    running_batch(store, "del", "batch_del", 1).await;
    assert!(matches!(store.delete_file("del", &"file-batch_del".into(), 0).await, Err(Error::Conflict(_))));
    assert!(store.get_file("del", &"file-batch_del".into(), 0).await.is_ok(), "a refused delete keeps the file");
    let fin = Finish { status: BatchStatus::Completed, at: 1_100, output_file: None, error_file: None };
    store.finish_batch(&"batch_del".into(), &fin).await.unwrap();
    store.delete_file("del", &"file-batch_del".into(), 0).await.unwrap();
    assert!(matches!(store.get_file("del", &"file-batch_del".into(), 0).await, Err(Error::NotFound)));
}

pub async fn batch_idempotency_and_pagination(store: &dyn Store) {
    store.insert_file(&sample_file("bp", "file-bp")).await.unwrap();
    let hashed = |id: &str, hash: &str| BatchRecord { idempotency_hash: Some(hash.into()), ..sample_batch("bp", id, "file-bp") };
    let first = store.insert_batch(&hashed("batch_bp1", "hash-1"), Some("key-1")).await.unwrap();
    let again = store.insert_batch(&hashed("batch_bp2", "hash-2"), Some("key-1")).await.unwrap();
    assert_eq!(first.id, again.id, "same idempotency key returns the first batch");
    assert_eq!(again.idempotency_hash.as_deref(), Some("hash-1"), "with the hash of the first request");
    assert!(matches!(store.get_batch(None, &"batch_bp2".into()).await, Err(Error::NotFound)));
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
    assert!(matches!(store.request_cancel("cx-other", &"batch_cx".into(), 5).await, Err(Error::NotFound)));
    let b = store.request_cancel("cx", &"batch_cx".into(), 5).await.unwrap();
    assert_eq!((b.status, b.cancelling_at), (BatchStatus::Cancelling, Some(5)));
    assert!(!store.mark_validated(&"batch_cx".into(), &validated(1, vec![]), 6).await.unwrap(), "validation must not undo a cancel");
    assert!(!store.mark_failed(&"batch_cx".into(), &[], 6).await.unwrap());
    let fin = Finish { status: BatchStatus::Cancelled, at: 7, output_file: None, error_file: None };
    store.finish_batch(&"batch_cx".into(), &fin).await.unwrap();
    let b = store.request_cancel("cx", &"batch_cx".into(), 8).await.unwrap();
    assert_eq!((b.status, b.cancelled_at, b.cancelling_at), (BatchStatus::Cancelled, Some(7), Some(5)));
}

pub async fn lease_is_exclusive(store: &dyn Store) {
    running_batch(store, "ls", "batch_ls", 20).await;
    let tasks = (0..8).map(|n| async move {
        let mut got = vec![];
        while let Some(u) = store.lease_unit(&"batch_ls".into(), &format!("node{n}"), LONG).await.unwrap() {
            got.push(u.idx);
        }
        got
    });
    let mut all: Vec<i64> = futures::future::join_all(tasks).await.into_iter().flatten().collect();
    all.sort();
    assert_eq!(all, (0..20).collect::<Vec<_>>(), "every unit leased exactly once across racing nodes");
}

pub async fn expired_lease_is_taken_over(store: &dyn Store) {
    running_batch(store, "lx", "batch_lx", 3).await;
    let a = store.lease_unit(&"batch_lx".into(), "dead", GONE).await.unwrap().unwrap();
    let live = store.lease_unit(&"batch_lx".into(), "live", LONG).await.unwrap().unwrap();
    assert_eq!((a.idx, live.idx), (0, 0), "an expired lease is taken over, lowest unit first");
    assert_eq!(live.epoch, a.epoch + 1, "each lease raises the epoch");
    let b = store.lease_unit(&"batch_lx".into(), "live", LONG).await.unwrap().unwrap();
    let c = store.lease_unit(&"batch_lx".into(), "third", LONG).await.unwrap().unwrap();
    assert_eq!((b.idx, c.idx), (1, 2));
    assert!(store.lease_unit(&"batch_lx".into(), "fourth", LONG).await.unwrap().is_none(), "live leases hold");
    let mut held = store.renew_leases("live", LONG).await.unwrap();
    held.sort();
    assert_eq!(held, [live.key(), b.key()], "renewal returns the units still held");
    assert!(store.renew_leases("dead", LONG).await.unwrap().is_empty(), "a lease taken over is not renewed");
    store.release_batch_leases(&"batch_lx".into(), "third").await.unwrap();
    assert_eq!(store.lease_unit(&"batch_lx".into(), "fourth", LONG).await.unwrap().unwrap().idx, c.idx);
    store.release_leases(Some("live")).await.unwrap();
    assert_eq!(store.lease_unit(&"batch_lx".into(), "third", LONG).await.unwrap().unwrap().idx, 0);
}

pub async fn lease_epochs_fence_commits(store: &dyn Store) {
    running_batch(store, "lf", "batch_lf", 2).await;
    let old = store.lease_unit(&"batch_lf".into(), "slow", GONE).await.unwrap().unwrap();
    let new = store.lease_unit(&"batch_lf".into(), "fast", LONG).await.unwrap().unwrap();
    assert_eq!(old.idx, new.idx);
    let out = store.commit_results("slow", &leased(&old, 1..=4)).await.unwrap();
    assert_eq!(out.inserted, 4, "a late node's answers are still recorded once");
    assert_eq!(out.lost, [old.key()], "but it learns that it lost the unit");
    let out = store.commit_results("fast", &leased(&new, 3..=6)).await.unwrap();
    assert_eq!((out.inserted, out.duplicates), (2, 2));
    assert!(out.lost.is_empty(), "the current holder keeps its lease");
    let unfenced = store.commit_results("anyone", &[result("batch_lf", 15, false)]).await.unwrap();
    assert!(unfenced.lost.is_empty(), "records written outside a lease are not fenced");
    assert_eq!(store.get_batch(None, &"batch_lf".into()).await.unwrap().completed, 6);
}

pub async fn claims_are_exclusive(store: &dyn Store) {
    running_batch(store, "cl", "batch_cl", 1).await;
    assert!(store.claim_batch(&"batch_cl".into(), "a", LONG).await.unwrap());
    assert!(!store.claim_batch(&"batch_cl".into(), "b", LONG).await.unwrap(), "a live claim holds");
    assert!(store.claim_batch(&"batch_cl".into(), "a", LONG).await.unwrap(), "the holder may claim again");
    store.release_claim(&"batch_cl".into(), "b").await.unwrap();
    assert!(!store.claim_batch(&"batch_cl".into(), "b", LONG).await.unwrap(), "only the holder releases");
    store.release_claim(&"batch_cl".into(), "a").await.unwrap();
    assert!(store.claim_batch(&"batch_cl".into(), "b", GONE).await.unwrap());
    assert!(store.claim_batch(&"batch_cl".into(), "c", LONG).await.unwrap(), "an expired claim is taken over");
    let racing = (0..6).map(|n| async move { store.claim_batch(&"batch_cl".into(), &format!("r{n}"), LONG).await.unwrap() });
    assert!(!futures::future::join_all(racing).await.into_iter().any(|x| x), "nobody takes a live claim");
    store.release_leases(Some("c")).await.unwrap();
    let racing = (0..6).map(|n| async move { store.claim_batch(&"batch_cl".into(), &format!("r{n}"), LONG).await.unwrap() });
    assert_eq!(futures::future::join_all(racing).await.into_iter().filter(|x| *x).count(), 1, "one racer wins a free claim");
    let fin = Finish { status: BatchStatus::Completed, at: 2_000, output_file: None, error_file: None };
    store.finish_batch(&"batch_cl".into(), &fin).await.unwrap();
    assert!(!store.claim_batch(&"batch_cl".into(), "z", LONG).await.unwrap(), "a final batch cannot be claimed");
}

pub async fn results_idempotent(store: &dyn Store) {
    running_batch(store, "rs", "batch_rs", 2).await;
    let first: Vec<_> = (1..=10).map(|l| result("batch_rs", l, l % 3 != 0)).collect();
    assert_eq!(store.commit_results(NODE, &first).await.unwrap().inserted, 10);
    let overlap: Vec<_> = (6..=15).map(|l| result("batch_rs", l, true)).collect();
    let out = store.commit_results(NODE, &overlap).await.unwrap();
    assert_eq!((out.inserted, out.duplicates), (5, 5), "already recorded lines are not counted again");
    let racing = (0..4).map(|_| {
        let recs: Vec<_> = (16..=20).map(|l| result("batch_rs", l, false)).collect();
        async move { store.commit_results(NODE, &recs).await.unwrap().inserted }
    });
    let inserted: u64 = futures::future::join_all(racing).await.into_iter().sum();
    assert_eq!(inserted, 5, "racing commits of the same lines count them once");
    let b = store.get_batch(None, &"batch_rs".into()).await.unwrap();
    assert_eq!((b.completed, b.failed), (12, 8));
    assert_eq!(b.usage.total_tokens, 100);
    let all_units = store.units(&"batch_rs".into()).await.unwrap();
    assert_eq!(all_units.iter().map(|u| u.ordered).collect::<Vec<_>>(), [false, true]);
    let unit = &all_units[0];
    assert_eq!(store.done_lines(&"batch_rs".into(), unit).await.unwrap(), (1..=10).collect::<Vec<_>>());
    let asked: Vec<u64> = [25, 3, 19, 4000, 7].into_iter().chain(30..1000).collect();
    assert_eq!(
        store.done_among(&"batch_rs".into(), &asked).await.unwrap(),
        [3, 7, 19],
        "lines of an ordered unit, asked in any order, over several statements"
    );
    assert!(store.done_among(&"batch_rs".into(), &[]).await.unwrap().is_empty());
    assert!(store.lease_unit(&"batch_rs".into(), "n", LONG).await.unwrap().is_none(), "done units are not leased");
    let (all, last) = store.results_chunk(&"batch_rs".into(), None, 0, 100).await.unwrap().unwrap();
    let ids: Vec<String> = all.lines().map(str::to_owned).collect();
    let want: Vec<String> = (1..=20).map(|l| format!("{{\"custom_id\":\"c{l}\"}}")).collect();
    assert_eq!((ids, last), (want, 20), "the log reads in line order");
    let (chunk, last) = store.results_chunk(&"batch_rs".into(), Some(false), 0, 3).await.unwrap().unwrap();
    assert_eq!((chunk.as_str(), last), ("{\"custom_id\":\"c3\"}\n{\"custom_id\":\"c6\"}\n{\"custom_id\":\"c9\"}\n", 9), "failed lines, in order");
    let (chunk, last) = store.results_chunk(&"batch_rs".into(), Some(false), 9, 100).await.unwrap().unwrap();
    assert_eq!((chunk.lines().count(), last), (5, 20), "after line 9: 16..=20");
    assert!(store.results_chunk(&"batch_rs".into(), Some(false), 20, 100).await.unwrap().is_none());
    assert_eq!(store.results_chunk(&"batch_rs".into(), Some(true), 0, 1000).await.unwrap().unwrap().0.lines().count(), 12);
    assert_eq!(store.result_by_custom_id(&"batch_rs".into(), "c7").await.unwrap().line, 7);
}

pub async fn finish_is_final_and_atomic(store: &dyn Store) {
    running_batch(store, "fin", "batch_fin", 1).await;
    store.begin_finalizing(&"batch_fin".into(), BatchStatus::Completed, 1_500).await.unwrap();
    let b = store.get_batch(None, &"batch_fin".into()).await.unwrap();
    assert_eq!((b.status, b.finalize_as), (BatchStatus::Finalizing, Some(BatchStatus::Completed)));
    let mut out = sample_file("fin", "file-fin-out");
    out.purpose = "batch_output".into();
    let fin = Finish { status: BatchStatus::Completed, at: 1_600, output_file: Some(out.clone()), error_file: None };
    store.finish_batch(&"batch_fin".into(), &fin).await.unwrap();
    store.finish_batch(&"batch_fin".into(), &fin).await.unwrap();
    let b = store.get_batch(Some("fin"), &"batch_fin".into()).await.unwrap();
    assert_eq!((b.status, b.finalizing_at, b.completed_at), (BatchStatus::Completed, Some(1_500), Some(1_600)));
    assert_eq!(b.output_file_id.as_deref(), Some("file-fin-out"));
    assert_eq!(store.get_file("fin", &"file-fin-out".into(), 0).await.unwrap(), out);
    let other = Finish { status: BatchStatus::Cancelled, at: 1_700, output_file: None, error_file: None };
    store.finish_batch(&"batch_fin".into(), &other).await.unwrap();
    store.begin_finalizing(&"batch_fin".into(), BatchStatus::Expired, 1_800).await.unwrap();
    let b = store.get_batch(Some("fin"), &"batch_fin".into()).await.unwrap();
    assert_eq!((b.status, b.cancelled_at), (BatchStatus::Completed, None), "a final batch never changes");
}

pub async fn sums_saturate_and_stay_readable(store: &dyn Store) {
    running_batch(store, "sat", "batch_sat", 1).await;
    let huge = Usage { input_tokens: i64::MAX - 5, output_tokens: i64::MAX, total_tokens: i64::MAX, cached_tokens: 7, reasoning_tokens: 0 };
    let recs: Vec<_> = (1..=3).map(|l| ResultRecord { usage: huge, ..result("batch_sat", l, true) }).collect();
    store.commit_results(NODE, &recs[..1]).await.unwrap();
    store.commit_results(NODE, &recs[1..]).await.unwrap();
    let b = store.get_batch(Some("sat"), &"batch_sat".into()).await.unwrap();
    assert_eq!((b.usage.input_tokens, b.usage.total_tokens, b.usage.cached_tokens), (MAX_COUNT, MAX_COUNT, 21), "sums saturate");
    assert_eq!(store.list_batches("sat", 10, None).await.unwrap().items.len(), 1, "the row still lists");
    let per_model = store.batch_usage(&"batch_sat".into()).await.unwrap();
    assert_eq!((per_model[0].requests, per_model[0].usage.output_tokens), (3, MAX_COUNT));
}

pub async fn late_results_never_change_a_final_batch(store: &dyn Store) {
    running_batch(store, "late", "batch_late", 1).await;
    store.commit_results(NODE, &[result("batch_late", 1, true)]).await.unwrap();
    let fin = Finish { status: BatchStatus::Cancelled, at: 2_000, output_file: None, error_file: None };
    store.finish_batch(&"batch_late".into(), &fin).await.unwrap();
    let out = store.commit_results(NODE, &[result("batch_late", 2, true), result("batch_late", 3, false)]).await.unwrap();
    assert_eq!((out.inserted, out.duplicates), (0, 2), "a final batch takes no more results");
    let b = store.get_batch(None, &"batch_late".into()).await.unwrap();
    assert_eq!((b.completed, b.failed), (1, 0));
    assert_eq!(store.results_chunk(&"batch_late".into(), None, 0, 100).await.unwrap().unwrap().0.lines().count(), 1);
}

pub async fn fail_batch_from_any_live_status(store: &dyn Store) {
    running_batch(store, "fb", "batch_fb", 1).await;
    store.lease_unit(&"batch_fb".into(), NODE, LONG).await.unwrap().unwrap();
    let why = LineError { code: "input_unreadable".into(), message: "gone".into(), param: None, line: None };
    assert!(store.fail_batch(&"batch_fb".into(), std::slice::from_ref(&why), 3_000).await.unwrap());
    let b = store.get_batch(None, &"batch_fb".into()).await.unwrap();
    assert_eq!((b.status, b.failed_at, b.errors.as_deref()), (BatchStatus::Failed, Some(3_000), Some(&[why.clone()][..])));
    assert!(!store.fail_batch(&"batch_fb".into(), &[why], 3_001).await.unwrap(), "a final batch is not failed again");
    assert_eq!(store.get_batch(None, &"batch_fb".into()).await.unwrap().failed_at, Some(3_000));
}

fn kinds(events: &[Event]) -> Vec<(String, String)> {
    events
        .iter()
        .map(|e| {
            let v: serde_json::Value = serde_json::from_str(&e.data).expect("event data is JSON");
            (e.kind.clone(), v["status"].as_str().unwrap_or("").to_string())
        })
        .collect()
}

pub async fn status_events_follow_every_transition(store: &dyn Store) {
    let mine = EventFilter { tenant: Some("ev".into()), batch_id: None };
    let start = store.events_after(&EventFilter::default(), 0, 100_000).await.unwrap().last().map_or(0, |e| e.id);
    running_batch(store, "ev", "batch_ev", 1).await;
    let recs: Vec<_> = (1..=4).map(|l| result("batch_ev", l, true)).collect();
    store.commit_results(NODE, &recs[..2]).await.unwrap();
    store.commit_results(NODE, &recs[2..]).await.unwrap();
    store.begin_finalizing(&"batch_ev".into(), BatchStatus::Completed, 1_200).await.unwrap();
    store.begin_finalizing(&"batch_ev".into(), BatchStatus::Completed, 1_201).await.unwrap();
    let fin = Finish { status: BatchStatus::Completed, at: 1_300, output_file: None, error_file: None };
    store.finish_batch(&"batch_ev".into(), &fin).await.unwrap();
    store.finish_batch(&"batch_ev".into(), &fin).await.unwrap();
    let evs = store.events_after(&mine, start, 100).await.unwrap();
    let want = [
        ("batch.status", "validating"),
        ("batch.status", "in_progress"),
        ("batch.progress", ""),
        ("batch.status", "finalizing"),
        ("batch.status", "completed"),
    ];
    let want: Vec<(String, String)> = want.iter().map(|(k, s)| (k.to_string(), s.to_string())).collect();
    assert_eq!(kinds(&evs), want, "one event per transition, progress at most once a second");
    assert!(evs.windows(2).all(|w| w[0].id < w[1].id), "ids increase");
    let progress: serde_json::Value = serde_json::from_str(&evs[2].data).unwrap();
    assert_eq!(progress["request_counts"]["completed"], 2, "progress tells the durable counts");
    let done: serde_json::Value = serde_json::from_str(&evs[4].data).unwrap();
    assert_eq!(done["request_counts"]["completed"], 4);
    let after = store.events_after(&mine, evs[1].id, 100).await.unwrap();
    assert_eq!(after.len(), 3, "reading resumes after a cursor without a gap");
    let other = EventFilter { tenant: Some("ev-other".into()), batch_id: None };
    assert!(store.events_after(&other, start, 100).await.unwrap().is_empty(), "another tenant sees none");
    let one = EventFilter { tenant: Some("ev".into()), batch_id: Some("batch_nope".into()) };
    assert!(store.events_after(&one, start, 100).await.unwrap().is_empty());
    let stalled = store.append_event(&"batch_ev".into(), "batch.stalled", r#"{"reason":"x"}"#, 1_400).await.unwrap();
    assert!(stalled > evs[4].id);
    assert!(store.prune_events(i64::MAX).await.unwrap() >= 1, "progress events of final batches are pruned");
    assert_eq!(store.events_after(&mine, start, 100).await.unwrap().len(), 5);
}

pub async fn webhook_deliveries_are_durable_and_claimed(store: &dyn Store) {
    let start = store.events_after(&EventFilter::default(), 0, 100_000).await.unwrap().last().map_or(0, |e| e.id);
    // Drain what earlier checks queued, so that only this check's delivery is due.
    loop {
        let due = store.due_deliveries("drain", 100, LONG).await.unwrap();
        if due.is_empty() {
            break;
        }
        for d in due {
            let a = DeliveryAttempt { event_id: d.event.id, status: Some(200), error: None, duration_ms: 1, at: 1, retry_at_ms: None, delivered: true };
            store.record_delivery(&a).await.unwrap();
        }
    }
    running_batch(store, "wh", "batch_wh", 1).await;
    assert!(store.due_deliveries("n1", 10, LONG).await.unwrap().is_empty(), "nothing is queued before a batch is final");
    let fin = Finish { status: BatchStatus::Expired, at: 5_000, output_file: None, error_file: None };
    store.finish_batch(&"batch_wh".into(), &fin).await.unwrap();
    let due = store.due_deliveries("n1", 10, LONG).await.unwrap();
    assert_eq!(due.len(), 1, "the final status queued one delivery");
    let d = &due[0];
    assert!(d.event.id > start && d.event.batch_id == "batch_wh" && d.event.kind == "batch.status" && d.attempts == 0);
    assert!(store.due_deliveries("n2", 10, LONG).await.unwrap().is_empty(), "a claimed delivery is not handed out twice");
    let failed = DeliveryAttempt {
        event_id: d.event.id,
        status: Some(500),
        error: Some("boom".into()),
        duration_ms: 3,
        at: 5_001,
        retry_at_ms: Some(0),
        delivered: false,
    };
    store.record_delivery(&failed).await.unwrap();
    let again = store.due_deliveries("n2", 10, LONG).await.unwrap();
    assert_eq!((again.len(), again[0].attempts), (1, 1), "a failed attempt is due again when its retry time comes");
    let later = DeliveryAttempt { retry_at_ms: Some(i64::MAX / 2), ..failed.clone() };
    store.record_delivery(&later).await.unwrap();
    assert!(store.due_deliveries("n3", 10, LONG).await.unwrap().is_empty(), "not before its retry time");
    let ok = DeliveryAttempt { status: Some(204), error: None, retry_at_ms: None, delivered: true, ..failed.clone() };
    store.record_delivery(&ok).await.unwrap();
    let attempts = store.delivery_attempts(d.event.id).await.unwrap();
    let statuses: Vec<_> = attempts.iter().map(|a| (a.status, a.delivered)).collect();
    assert_eq!(statuses, [(Some(500), false), (Some(500), false), (Some(204), true)], "every attempt is recorded");
}

pub async fn nodes_heartbeat_and_leave(store: &dyn Store) {
    let ids = |m: Membership| m.nodes.into_iter().map(|n| n.id).filter(|i| i.starts_with("hb-")).collect::<Vec<_>>();
    let first = store.heartbeat("hb-1", 10, LONG, &|_| "{}".into()).await.unwrap();
    assert!((first.clock_ms - batchd::clock::host_ms()).abs() < 5_000, "the store's clock is read: {}", first.clock_ms);
    ids(first);
    let both = store.heartbeat("hb-2", 20, LONG, &|others| format!(r#"{{"saw":{}}}"#, others.iter().filter(|n| n.id == "hb-1").count())).await.unwrap();
    let mine = both.nodes.iter().find(|n| n.id == "hb-2").map(|n| n.info.clone());
    assert_eq!(mine.as_deref(), Some(r#"{"saw":1}"#), "a node publishes what it made of the others' rows");
    assert_eq!(ids(both), ["hb-1", "hb-2"], "live nodes, oldest first");
    store.heartbeat("hb-1", 10, GONE, &|_| "{}".into()).await.unwrap();
    assert_eq!(ids(store.heartbeat("hb-2", 20, LONG, &|_| "{}".into()).await.unwrap()), ["hb-2"], "a lapsed node is forgotten");
    running_batch(store, "hb", "batch_hb", 1).await;
    store.lease_unit(&"batch_hb".into(), "hb-2", LONG).await.unwrap().unwrap();
    store.claim_batch(&"batch_hb".into(), "hb-2", LONG).await.unwrap();
    store.leave("hb-2").await.unwrap();
    assert!(store.lease_unit(&"batch_hb".into(), "hb-3", LONG).await.unwrap().is_some(), "a leaving node hands its leases back");
    assert!(store.claim_batch(&"batch_hb".into(), "hb-3", LONG).await.unwrap(), "and its claims");
    assert!(ids(store.heartbeat("hb-3", 30, LONG, &|_| "{}".into()).await.unwrap()).iter().all(|i| i != "hb-2"));
    store.leave("hb-3").await.unwrap();
}

pub async fn usage_per_model_and_hour(store: &dyn Store) {
    running_batch(store, "use", "batch_use", 1).await;
    let recs: Vec<_> = (1..=5).map(|l| ResultRecord { model: if l <= 3 { "a".into() } else { "b".into() }, ..result("batch_use", l, l != 5) }).collect();
    store.commit_results(NODE, &recs).await.unwrap();
    let per_model = store.batch_usage(&"batch_use".into()).await.unwrap();
    let got: Vec<_> = per_model.iter().map(|u| (u.model.as_str(), u.requests, u.usage.total_tokens)).collect();
    assert_eq!(got, [("a", 3, 15), ("b", 2, 10)], "failed lines count as requests too");
    let now = batchd::now_unix();
    let rows = store.usage("use", now - 7_200, now + 7_200).await.unwrap();
    assert_eq!(rows.iter().map(|r| r.requests).sum::<i64>(), 5);
    assert!(rows.iter().all(|r| r.hour % 3600 == 0 && r.hour <= now));
    assert!(store.usage("use-other", now - 7_200, now + 7_200).await.unwrap().is_empty(), "per tenant");
    assert!(store.usage("use", now + 3_600, now + 7_200).await.unwrap().is_empty(), "per time range");
}

pub async fn latest_events_newest_first(store: &dyn Store) {
    running_batch(store, "lat", "batch_lat", 1).await;
    store.commit_results(NODE, &[result("batch_lat", 1, true)]).await.unwrap();
    store.append_event(&"batch_lat".into(), "batch.stalled", r#"{"stalled":true}"#, 1_500).await.unwrap();
    let mine = EventFilter { tenant: Some("lat".into()), batch_id: Some("batch_lat".into()) };
    let all = store.latest_events(&mine, None, 10).await.unwrap();
    let kinds: Vec<&str> = all.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["batch.stalled", "batch.progress", "batch.status", "batch.status"], "newest first");
    assert!(all.windows(2).all(|w| w[0].id > w[1].id));
    let progress = store.latest_events(&mine, Some("batch.progress"), 10).await.unwrap();
    assert_eq!(progress.len(), 1, "only the kind asked for");
    let data: serde_json::Value = serde_json::from_str(&progress[0].data).unwrap();
    assert_eq!(data["usage"]["total_tokens"], 5, "progress events tell the durable total tokens");
    assert_eq!(store.latest_events(&mine, None, 1).await.unwrap()[0].kind, "batch.stalled", "a limit of one is the newest");
    let tenant = EventFilter { tenant: Some("lat".into()), batch_id: None };
    assert_eq!(store.latest_events(&tenant, None, 1).await.unwrap()[0].id, all[0].id);
    let other = EventFilter { tenant: Some("lat-other".into()), batch_id: None };
    assert!(store.latest_events(&other, None, 10).await.unwrap().is_empty(), "another tenant sees none");
}

pub async fn queued_counts_unfinished_lines(store: &dyn Store) {
    assert_eq!(store.queued(Some("que")).await.unwrap(), Queued::default(), "nothing queued yet");
    running_batch(store, "que", "batch_que", 2).await; // 20 lines, est_tokens 200
    store.commit_results(NODE, &(1..=5).map(|l| result("batch_que", l, true)).collect::<Vec<_>>()).await.unwrap();
    store.insert_file(&FileRecord { bytes: 4_000, ..sample_file("que", "file-que-v") }).await.unwrap();
    store.insert_batch(&BatchRecord { est_requests: 12, ..sample_batch("que", "batch_que_v", "file-que-v") }, None).await.unwrap();
    let q = store.queued(Some("que")).await.unwrap();
    assert_eq!(
        q,
        Queued { batches: 2, requests: 15 + 12, tokens: 150 + 1_000 },
        "lines left of running batches; validating ones by the lines counted at create and their file's size"
    );
    store.request_cancel("que", &"batch_que_v".into(), 2_000).await.unwrap();
    assert_eq!(store.queued(Some("que")).await.unwrap(), Queued { batches: 1, requests: 15, tokens: 150 }, "a cancelled batch queues nothing");
    assert!(store.queued(None).await.unwrap().requests >= 15, "every tenant with None");
    assert_eq!(store.queued(Some("que-other")).await.unwrap(), Queued::default(), "per tenant");
}

pub async fn admission_keeps_the_queue_within_its_limits(store: &dyn Store) {
    let t = "adm";
    store.insert_file(&FileRecord { bytes: 400, ..sample_file(t, "file-adm") }).await.unwrap(); // 100 tokens
    let batch = |id: &str| BatchRecord { est_requests: 10, ..sample_batch(t, id, "file-adm") };
    let lines_25 = QueueLimits { max_requests: Some(25), max_tokens: None };
    let first = store.admit_batch(&batch("batch_adm_k"), Some("key-adm"), lines_25).await.unwrap();
    assert!(matches!(&first, Admission::Admitted(b) if b.id == "batch_adm_k" && b.est_requests == 10), "room for the first: {first:?}");

    // Six admissions of 10 lines at once against 10 queued and a limit of 25: exactly one fits,
    // however they interleave (the count and the insert are one step per tenant).
    // (Reads at once first, so that a pooled backend has a connection ready for each.)
    futures::future::join_all((0..8).map(|_| store.queued(Some(t)))).await;
    let ids: Vec<String> = (0..6).map(|i| format!("batch_adm_{i}")).collect();
    let tries = ids.iter().map(|id| {
        let b = batch(id);
        async move { store.admit_batch(&b, None, lines_25).await.unwrap() }
    });
    let outcomes = futures::future::join_all(tries).await;
    let admitted: Vec<&str> = outcomes.iter().filter_map(|o| if let Admission::Admitted(b) = o { Some(b.id.as_str()) } else { None }).collect();
    assert_eq!(admitted.len(), 1, "racing admissions must not together go over the limit: {admitted:?} admitted");
    for o in &outcomes {
        if let Admission::OverQuota { queued, requests, tokens } = o {
            assert_eq!((queued.requests, queued.batches, *requests, *tokens), (20, 2, 10, 100), "what is queued and what the batch adds: {o:?}");
        }
    }
    let q = store.queued(Some(t)).await.unwrap();
    assert_eq!(q, Queued { batches: 2, requests: 20, tokens: 200 }, "the refused batches were not inserted");
    let refused = ids.iter().zip(&outcomes).find(|(_, o)| matches!(o, Admission::OverQuota { .. })).unwrap().0;
    assert!(matches!(store.get_batch(Some(t), &refused.as_str().into()).await, Err(Error::NotFound)), "a refused batch does not exist");

    // A create retried with its idempotency key gets its batch back, however full the queue.
    let again = store.admit_batch(&batch("batch_adm_again"), Some("key-adm"), lines_25).await.unwrap();
    assert!(matches!(&again, Admission::Admitted(b) if b.id == "batch_adm_k"), "{again:?}");

    // Tokens: 200 queued plus 100.
    let tokens = |max| QueueLimits { max_requests: None, max_tokens: Some(max) };
    let over = store.admit_batch(&batch("batch_adm_t1"), None, tokens(299)).await.unwrap();
    assert!(matches!(over, Admission::OverQuota { queued: Queued { tokens: 200, .. }, tokens: 100, .. }), "{over:?}");
    assert!(matches!(store.admit_batch(&batch("batch_adm_t2"), None, tokens(300)).await.unwrap(), Admission::Admitted(_)), "exactly at the limit fits");
    assert!(
        matches!(store.admit_batch(&batch("batch_adm_free"), None, QueueLimits::default()).await.unwrap(), Admission::Admitted(_)),
        "no limits, no refusal"
    );

    // A cancel frees its lines.
    let q = store.queued(Some(t)).await.unwrap();
    assert_eq!(q.requests, 40);
    for id in ["batch_adm_k", "batch_adm_t2", "batch_adm_free"] {
        store.request_cancel(t, &id.into(), 2_000).await.unwrap();
    }
    assert!(matches!(store.admit_batch(&batch("batch_adm_after"), None, lines_25).await.unwrap(), Admission::Admitted(_)), "room once cancelled");
    assert_eq!(store.queued(Some("adm-other")).await.unwrap(), Queued::default(), "per tenant");
}

/// The SDK's loop `for f in client.files.list(limit=2): client.files.delete(f.id)`: each page
/// starts after the last item of the previous one, which was just deleted.
pub async fn list_cursors_survive_deletion(store: &dyn Store) {
    let t = "cur";
    for i in 0..5 {
        store.insert_file(&sample_file(t, &format!("file-cur{i}"))).await.unwrap();
    }
    let q = |after: Option<&str>, ascending| FileQuery { purpose: None, limit: 2, ascending, after: after.map(Into::into) };
    let (mut deleted, mut after) = (Vec::new(), None::<String>);
    loop {
        let p = store.list_files(t, &q(after.as_deref(), false), 0).await.expect("a cursor naming a deleted file still places the page");
        for f in &p.items {
            store.delete_file(t, &f.id, 0).await.unwrap();
            deleted.push(f.id.clone());
        }
        after = p.items.last().map(|f| f.id.to_string());
        if !p.has_more {
            break;
        }
    }
    assert_eq!(deleted, ["file-cur4", "file-cur3", "file-cur2", "file-cur1", "file-cur0"], "deleting what it pages through empties the list");
    assert!(store.list_files(t, &q(None, false), 0).await.unwrap().items.is_empty());
    for i in 5..8 {
        store.insert_file(&sample_file(t, &format!("file-cur{i}"))).await.unwrap();
    }
    let p = store.list_files(t, &q(Some("file-cur2"), true), 0).await.unwrap();
    let ids: Vec<_> = p.items.iter().map(|f| f.id.as_str()).collect();
    assert_eq!(ids, ["file-cur5", "file-cur6"], "a deleted file's place holds in ascending order too");
    store.purge_file(&"file-cur6".into()).await.unwrap();
    let p = store.list_files(t, &q(Some("file-cur6"), false), 0).await.unwrap();
    assert_eq!(p.items.iter().map(|f| f.id.as_str()).collect::<Vec<_>>(), ["file-cur5"], "and after the janitor purged it");
    assert!(matches!(store.list_files("cur-other", &q(Some("file-cur2"), false), 0).await, Err(Error::NotFound)), "another tenant's deleted id is unknown");
    assert!(matches!(store.list_files(t, &q(Some("file-never"), false), 0).await, Err(Error::NotFound)), "an id never stored is unknown");
}

/// A remote batch is recorded once per key (a second plan of the same key changes nothing),
/// moves on keeping what an update leaves out, and is read back per unit, oldest first.
pub async fn remote_batches_are_recorded_once_and_move_on(store: &dyn Store) {
    let row = |key: &str, unit: i64, at: i64| RemoteBatch {
        key: key.into(),
        batch_id: "batch_remote".into(),
        unit_idx: unit,
        upstream: "hosted".into(),
        model: "m".into(),
        lines: RemoteBatch::join_lines(&[1, 2, 5]),
        line_count: 3,
        est_tokens: 42,
        state: RemoteState::Planned.as_str().into(),
        input_file_id: None,
        remote_id: None,
        remote_status: None,
        created_at: at,
        updated_at: at,
        input_tokens: 0,
        output_tokens: 0,
    };
    assert!(store.plan_remote(&row("k0", 0, 10)).await.unwrap());
    assert!(!store.plan_remote(&RemoteBatch { lines: "9".into(), ..row("k0", 0, 10) }).await.unwrap(), "a key is planned once");
    assert!(store.plan_remote(&row("k1", 0, 11)).await.unwrap());
    assert!(store.plan_remote(&row("k2", 1, 12)).await.unwrap());
    store.update_remote("k0", RemoteState::Uploaded, Some("file-1"), None, None, 20).await.unwrap();
    store.update_remote("k0", RemoteState::Created, None, Some("rb-1"), Some("validating"), 21).await.unwrap();
    assert!(matches!(store.update_remote("nope", RemoteState::Created, None, None, None, 1).await, Err(Error::NotFound)));
    let unit0 = store.remote_batches(&"batch_remote".into(), Some(0)).await.unwrap();
    assert_eq!(unit0.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(), ["k0", "k1"]);
    let k0 = &unit0[0];
    assert_eq!((k0.state(), k0.input_file_id.as_deref(), k0.remote_id.as_deref()), (RemoteState::Created, Some("file-1"), Some("rb-1")));
    assert_eq!((k0.line_numbers(), k0.est_tokens, k0.updated_at), (vec![1, 2, 5], 42, 21));
    assert_eq!(store.remote_batches(&"batch_remote".into(), None).await.unwrap().len(), 3);
    assert!(store.remote_batches(&"batch_other".into(), None).await.unwrap().is_empty());
    assert_eq!(store.remote_ids("hosted", 21).await.unwrap(), ["rb-1"], "recorded remote ids, touched since");
    store.collect_remote("k0", "completed", 300, 70, 30).await.unwrap();
    let k0 = store.remote_batches(&"batch_remote".into(), Some(0)).await.unwrap().remove(0);
    assert_eq!((k0.state(), k0.remote_status.as_deref(), k0.input_tokens, k0.output_tokens), (RemoteState::Collected, Some("completed"), 300, 70));
    assert!(matches!(store.collect_remote("nope", "completed", 0, 0, 1).await, Err(Error::NotFound)));
    assert!(store.remote_ids("hosted", 31).await.unwrap().is_empty());
    assert!(store.remote_ids("other", 0).await.unwrap().is_empty());
}

/// Anthropic's Message Batches: listed apart from OpenAI's batches, newest first, a page
/// after or before a cursor; deleted only once final, then gone from the tenant's reads (not
/// the engine's), its id still a cursor; the unrun count recorded once.
pub async fn message_batches_list_by_api_both_ways_and_delete_once_ended(store: &dyn Store) {
    let t = "mb";
    store.insert_file(&sample_file(t, "file-mb")).await.unwrap();
    let mut ids = vec![];
    for i in 0..7 {
        let id = format!("msgbatch_mb{i}");
        let mut b = sample_batch(t, &id, "file-mb");
        b.api = BatchApi::Anthropic;
        store.insert_batch(&b, None).await.unwrap();
        // An OpenAI batch between every two: never in the Anthropic list.
        store.insert_batch(&sample_batch(t, &format!("batch_mb{i}"), "file-mb"), None).await.unwrap();
        ids.push(id);
    }
    ids.reverse(); // newest first, as lists are
    let list = |cursor| async move { store.list_batches_of(t, BatchApi::Anthropic, 3, cursor).await.unwrap() };
    let names = |p: &Page<BatchRecord>| p.items.iter().map(|b| b.id.to_string()).collect::<Vec<_>>();
    let first = list(ListCursor::First).await;
    assert_eq!((names(&first), first.has_more), (ids[0..3].to_vec(), true));
    assert!(first.items.iter().all(|b| b.api == BatchApi::Anthropic));
    let next = list(ListCursor::After(&ids[2])).await;
    assert_eq!((names(&next), next.has_more), (ids[3..6].to_vec(), true));
    let last = list(ListCursor::After(&ids[5])).await;
    assert_eq!((names(&last), last.has_more), (ids[6..].to_vec(), false));
    let back = list(ListCursor::Before(&ids[6])).await;
    assert_eq!((names(&back), back.has_more), (ids[3..6].to_vec(), true), "the page just above the cursor, newest first");
    let top = list(ListCursor::Before(&ids[2])).await;
    assert_eq!((names(&top), top.has_more), (ids[0..2].to_vec(), false));
    assert_eq!(store.list_batches(t, 100, None).await.unwrap().items.len(), 14, "OpenAI's list shows both kinds");

    let id = ids[3].as_str();
    assert!(matches!(store.delete_batch(t, &id.into()).await, Err(Error::Conflict(_))), "a batch not ended is not deleted");
    assert!(matches!(store.delete_batch("mb-other", &id.into()).await, Err(Error::NotFound)));
    store.note_unrun(&id.into(), 4).await.unwrap();
    store.note_unrun(&id.into(), 9).await.unwrap();
    store.finish_batch(&id.into(), &Finish { status: BatchStatus::Cancelled, at: 2_000, output_file: None, error_file: None }).await.unwrap();
    let deleted = store.delete_batch(t, &id.into()).await.unwrap();
    assert_eq!((deleted.status, deleted.unrun), (BatchStatus::Cancelled, Some(4)), "the first unrun count stays");
    assert!(matches!(store.get_batch(Some(t), &id.into()).await, Err(Error::NotFound)), "a deleted batch is gone for its tenant");
    assert!(store.get_batch(None, &id.into()).await.is_ok(), "the engine still reads it");
    assert!(matches!(store.delete_batch(t, &id.into()).await, Err(Error::NotFound)), "deleted once");
    let after = list(ListCursor::After(id)).await;
    assert_eq!(names(&after), ids[4..7].to_vec(), "a deleted batch's id still places the next page");
    assert!(!list(ListCursor::First).await.items.iter().chain(store.list_batches(t, 100, None).await.unwrap().items.iter()).any(|b| b.id == id));
}
