//! Black-box tests of the execution engine: the real `batchd serve` binary against the
//! in-process mock upstream (`batchd::mock::MockServer`), observed through the HTTP API and
//! the mock's counters. Lines steer the mock with their `"mock"` body object where a
//! deterministic answer is needed.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::{json, Value};

/// A chat line with `extra` merged into its body.
fn line_with(custom_id: &str, model: &str, extra: Value) -> String {
    let mut v: Value = serde_json::from_str(&chat_line(custom_id, model, None)).unwrap();
    for (k, x) in extra.as_object().unwrap() {
        v["body"][k] = x.clone();
    }
    v.to_string()
}

async fn wait_idle(m: &MockServer, timeout: Duration, what: &str) {
    eventually(what, timeout, || async move { (m.stats().in_flight == 0).then_some(()) }).await;
}

fn id_counts(m: &MockServer) -> std::collections::BTreeMap<String, u64> {
    m.stats_with(secs(60), true).request_id_counts.unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// 1. limits
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_limit_is_reached_and_never_exceeded() {
    let m = mock(MockArgs { latency_ms: 100, ..Default::default() }).await;
    let s = spawn_app(&config(&m.base_url(), "max_concurrency = 4", ""));
    let api = s.api();
    let t0 = Instant::now();
    let id = api.submit(&chat_lines(60, "m")).await;
    let b = api.wait_for(&id, &["completed"], secs(30)).await;
    let took = t0.elapsed();
    let st = m.stats();
    assert_eq!(st.peak_in_flight, 4, "max_concurrency = 4 must be reached and never exceeded: {st:?}");
    assert_eq!(st.requests, 60);
    assert_eq!(st.duplicate_request_ids, 0);
    assert!(took >= Duration::from_millis(1400), "60 lines × 100 ms / 4 cannot finish in {took:?}");
    let (out, _) = final_results(&api, &b, 60).await;
    assert_eq!(out.len(), 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpm_limit_spaces_requests() {
    // rpm 120: the bucket refills 120/61 ≈ 1.97 per second and holds at most that much, so
    // 8 lines go out as a burst of ~2 and then one every ~0.51 s: ≈ 3.05 s in all.
    let m = mock(MockArgs::default()).await;
    let s = spawn_app(&config(&m.base_url(), "rpm = 120", ""));
    let api = s.api();
    let t0 = Instant::now();
    let id = api.submit(&chat_lines(8, "m")).await;
    let b = api.wait_for(&id, &["completed"], secs(30)).await;
    let took = t0.elapsed();
    final_results(&api, &b, 8).await;
    let st = m.stats_with(Duration::from_millis(1000), false);
    assert_eq!(st.requests, 8);
    assert!(took >= Duration::from_millis(2500), "rpm = 120 lets 8 requests through in ≥ ~3 s, took {took:?}");
    assert!(st.max_in_window <= 3, "at most 3 arrivals within any 1 s at rpm 120: {}", st.max_in_window);
    let half = m.stats_with(Duration::from_millis(450), false).max_in_window;
    assert!(half <= 2, "at most 2 arrivals within any 450 ms at rpm 120: {half}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_limit_spaces_requests() {
    // tpm 6100 → 100 tokens/s, bucket of 100. Every line is estimated at ~150 tokens
    // (bytes/4 + max_tokens 100) and really costs ~130 (prompt bytes/4 + 100 completion
    // tokens), so after the first one each line waits ≥ 1.2 s for the bucket.
    let m = mock(MockArgs::default()).await;
    let s = spawn_app(&config(&m.base_url(), "tpm = 6100", ""));
    let api = s.api();
    let lines: Vec<String> = (0..4).map(|i| line_with(&format!("t-{i}"), "m", json!({"max_tokens": 100, "mock": {"completion_tokens": 100}}))).collect();
    let t0 = Instant::now();
    let id = api.submit(&lines).await;
    let b = api.wait_for(&id, &["completed"], secs(30)).await;
    let took = t0.elapsed();
    final_results(&api, &b, 4).await;
    let st = m.stats_with(Duration::from_millis(1000), false);
    assert_eq!(st.requests, 4);
    let per_request = (st.prompt_tokens + st.completion_tokens) / 4;
    assert!(per_request > 100, "test premise: each request costs more than the bucket holds ({per_request})");
    assert_eq!(st.max_in_window, 1, "tpm 6100 with ~{per_request}-token requests allows one per second at most");
    assert!(took >= Duration::from_millis(3300), "4 requests of ~{per_request} tokens at 100 tokens/s took only {took:?}");
    assert_eq!(b["usage"]["total_tokens"].as_u64(), Some(st.prompt_tokens + st.completion_tokens), "usage is summed from upstream usage");
}

// ---------------------------------------------------------------------------------------
// 2. retries
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured() {
    let m = mock(MockArgs::default()).await;
    let s = spawn_app(&config(&m.base_url(), "", ""));
    let api = s.api();
    let line = chat_line("ra", "m", Some(json!({"status": 429, "fail_times": 1, "retry_after_s": 2})));
    let t0 = Instant::now();
    let id = api.submit(&[line]).await;
    let b = api.wait_for(&id, &["completed", "failed"], secs(30)).await;
    let took = t0.elapsed();
    let (out, _) = final_results(&api, &b, 1).await;
    assert_eq!(out.len(), 1, "the line succeeds on its second attempt: {b}");
    assert_eq!(out[0]["response"]["status_code"], 200);
    let st = m.stats_with(Duration::from_millis(2000), false);
    assert_eq!(st.requests, 2);
    assert_eq!(st.by_status.get("429"), Some(&1));
    assert_eq!(st.max_in_window, 1, "the retry came sooner than Retry-After (2 s) after the 429");
    assert!(took >= secs(2), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_attempts_is_respected_and_4xx_is_final() {
    let m = mock(MockArgs::default()).await;
    let s = spawn_app(&config(&m.base_url(), "max_attempts = 3", ""));
    let api = s.api();
    let lines = vec![
        chat_line("always-500", "m", Some(json!({"status": 500}))),
        chat_line("bad-400", "m", Some(json!({"status": 400}))),
        chat_line("conflict-409", "m", Some(json!({"status": 409, "fail_times": 2}))),
        chat_line("ok", "m", None),
    ];
    let id = api.submit(&lines).await;
    let b = api.wait_for(&id, &["completed"], secs(30)).await;
    let (out, err) = final_results(&api, &b, 4).await;
    let ids = ids_by_custom_id(&[out.clone(), err.clone()].concat());
    let counts = id_counts(&m);
    assert_eq!(counts[&ids["always-500"]], 3, "a 500 is retried up to max_attempts = 3 in all");
    assert_eq!(counts[&ids["bad-400"]], 1, "a 400 is never retried");
    assert_eq!(counts[&ids["conflict-409"]], 3, "409 is retryable: two failures then success");
    assert_eq!(counts[&ids["ok"]], 1);
    assert_eq!(m.stats().requests, 8);

    let by_cid: HashMap<&str, &Value> = err.iter().map(|l| (l["custom_id"].as_str().unwrap(), l)).collect();
    assert_eq!(err.len(), 2, "{err:?}");
    let e500 = by_cid["always-500"];
    assert_eq!(e500["response"]["status_code"], 500);
    assert!(e500["error"].is_null(), "{e500}");
    assert_eq!(
        e500["response"]["body"],
        json!({"error": {"message": "The server had an error while processing your request (simulated).", "type": "server_error", "param": null, "code": null}}),
        "the upstream's JSON error body is kept unchanged"
    );
    assert_eq!(e500["response"]["request_id"], e500["id"], "the mock echoes our x-request-id");
    let e400 = by_cid["bad-400"];
    assert_eq!(e400["response"]["status_code"], 400);
    assert_eq!(e400["response"]["body"]["error"]["message"], "Simulated upstream error with status 400.");
    assert!(e400["error"].is_null());
    let ok: BTreeSet<&str> = out.iter().map(|l| l["custom_id"].as_str().unwrap()).collect();
    assert_eq!(ok, BTreeSet::from(["conflict-409", "ok"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_request_is_cut_at_timeout_and_retried() {
    let m = mock(MockArgs::default()).await;
    let s = spawn_app(&config(&m.base_url(), "timeout_s = 1\nmax_attempts = 2", ""));
    let api = s.api();
    let lines = vec![chat_line("hang", "m", Some(json!({"hang": true}))), chat_line("ok", "m", None)];
    let t0 = Instant::now();
    let id = api.submit(&lines).await;
    let b = api.wait_for(&id, &["completed"], secs(20)).await;
    let took = t0.elapsed();
    let (out, err) = final_results(&api, &b, 2).await;
    assert_eq!((out.len(), err.len()), (1, 1));
    let e = &err[0];
    assert_eq!(e["custom_id"], "hang");
    assert!(e["response"].is_null(), "no HTTP answer: response is null: {e}");
    assert_eq!(e["error"]["code"], "request_timeout", "{e}");
    assert!(e["error"]["message"].as_str().is_some_and(|s| !s.is_empty()));
    assert_eq!(id_counts(&m)[e["id"].as_str().unwrap()], 2, "timed out twice with max_attempts = 2");
    assert_eq!(m.stats().hangs, 2);
    assert!(took >= secs(2), "two attempts of 1 s each: {took:?}");
    assert!(took < secs(10), "timeout_s = 1 must cut the hanging request: {took:?}");
    wait_idle(&m, secs(5), "the mock sees the hung connections closed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_json_upstream_body_becomes_an_error_message() {
    let m = mock(MockArgs::default()).await;
    let s = spawn_app(&config(&m.base_url(), "max_attempts = 2", ""));
    let api = s.api();
    let text = "<html>upstream exploded\n\"badly\"</html>";
    let lines = vec![
        chat_line("text-500", "m", Some(json!({"status": 500, "body_text": text}))),
        chat_line("empty-502", "m", Some(json!({"status": 502, "body_text": ""}))),
    ];
    let id = api.submit(&lines).await;
    let b = api.wait_for(&id, &["completed"], secs(20)).await;
    let (out, err) = final_results(&api, &b, 2).await;
    assert!(out.is_empty());
    let by_cid: HashMap<&str, &Value> = err.iter().map(|l| (l["custom_id"].as_str().unwrap(), l)).collect();
    let e = by_cid["text-500"];
    assert_eq!(e["response"]["status_code"], 500);
    let body = &e["response"]["body"]["error"];
    assert_eq!(body["code"], "upstream_error", "a non-JSON error page gets a code: {e}");
    assert!(body["message"].as_str().unwrap().ends_with("upstream exploded \"badly\""), "and a short excerpt, tags dropped: {e}");
    assert!(e["error"].is_null());
    let e = by_cid["empty-502"];
    assert_eq!(e["response"]["status_code"], 502);
    let msg = e["response"]["body"]["error"]["message"].as_str().unwrap_or_default();
    assert!(!msg.is_empty(), "an empty body still gets a message: {e}");
    assert_eq!(m.stats().requests, 4, "both lines retried once (5xx), max_attempts = 2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_with_random_faults_is_exactly_once() {
    const N: usize = 600;
    let m = mock(MockArgs { latency_ms: 5, error_rate: 0.05, rate_429: 0.05, hang_rate: 0.005, retry_after_s: 0.2, seed: Some(7), ..Default::default() }).await;
    let s = spawn_app(&config(&m.base_url(), "timeout_s = 1\nmax_attempts = 6\nmax_concurrency = 32", ""));
    let api = s.api();
    let t0 = Instant::now();
    let id = api.submit(&chat_lines(N, "m")).await;
    let b = api.wait_for(&id, &["completed"], secs(60)).await;
    let took = t0.elapsed();
    let (out, err) = final_results(&api, &b, N).await;
    let st = m.stats_with(secs(60), true);
    let counts = st.request_id_counts.clone().unwrap();
    println!("soak: {took:?}, {} requests, {} hangs, statuses {:?}, {} ok, {} errors", st.requests, st.hangs, st.by_status, out.len(), err.len());
    assert_eq!(st.unique_request_ids, N as u64, "every line reached the upstream under its own id");
    assert_eq!(counts.values().sum::<u64>(), st.requests);
    assert!(st.hangs > 0 && st.by_status.contains_key("429") && st.by_status.contains_key("500"), "faults were injected: {st:?}");
    let answered: u64 = st.by_status.values().sum();
    assert_eq!(answered + st.hangs, st.requests);
    // A 429 costs no attempt (issue #11): only the mock's other answers count against 6.
    let limited = st.by_status.get("429").copied().unwrap_or(0);
    assert!(counts.values().all(|&n| n <= 6 + limited), "no line was tried more than max_attempts = 6 times, 429s aside");
    for l in &out {
        assert_eq!(l["response"]["status_code"], 200);
    }
    for l in &err {
        assert!(counts[l["id"].as_str().unwrap()] >= 6, "a line fails only after 6 attempts: {l}");
    }
    let ok_answers = st.by_status.get("200").copied().unwrap_or(0);
    assert_eq!(ok_answers, out.len() as u64, "each 200 answer became exactly one output line");
}

// ---------------------------------------------------------------------------------------
// 3. cancel and expiry
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_mid_run_aborts_in_flight_and_keeps_finished_lines() {
    const N: usize = 40;
    let m = mock(MockArgs { latency_ms: 1000, ..Default::default() }).await;
    let s = spawn_app(&config(&m.base_url(), "max_concurrency = 4", ""));
    let api = s.api();
    let id = api.submit(&chat_lines(N, "m")).await;
    eventually("the batch runs with ≥ 1 finished line", secs(20), || {
        let (api, id) = (api.clone(), id.clone());
        async move {
            let b = api.batch(&id).await;
            (b["status"] == "in_progress" && done(&b) >= 1).then_some(())
        }
    })
    .await;
    let in_flight = m.stats().in_flight;
    let (st, c) = api.post(&format!("/batches/{id}/cancel"), &json!({})).await;
    assert_eq!(st, 200, "{c}");
    assert!(in_flight > 0, "test premise: calls were in flight at the cancel");
    assert!(c["status"] == "cancelling" || c["status"] == "cancelled", "{c}");
    assert!(c["cancelling_at"].is_i64(), "{c}");
    let t_cancel = Instant::now();
    wait_idle(&m, secs(2), "in-flight calls are aborted within 2 s").await;
    println!("in-flight calls aborted {:?} after cancel", t_cancel.elapsed());
    let before = m.stats().requests;
    // Under test: nothing happens — no call in the second after the cancel.
    tokio::time::sleep(secs(1)).await;
    assert_eq!(m.stats().requests, before, "no request may be sent after a cancel");
    let b = api.wait_for(&id, &["cancelled"], secs(10)).await;
    assert!(b["cancelled_at"].is_i64() && b["cancelling_at"].is_i64(), "{b}");
    assert!(b["completed_at"].is_null() && b["expired_at"].is_null(), "{b}");
    let (out, err) = final_results(&api, &b, N).await;
    assert!(!out.is_empty() && out.len() < N, "finished lines are kept, the rest cancelled: {b}");
    for l in &err {
        assert!(l["response"].is_null(), "{l}");
        assert_eq!(l["error"]["code"], "batch_cancelled", "{l}");
    }
    assert!(before < N as u64, "cancel stopped dispatch before every line was sent");

    let (st, again) = api.post(&format!("/batches/{id}/cancel"), &json!({})).await;
    assert_eq!(st, 200);
    assert_eq!(again, b, "cancelling a cancelled batch changes nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_completed_batch_returns_it_unchanged() {
    let m = mock(MockArgs::default()).await;
    let s = spawn_app(&config(&m.base_url(), "", ""));
    let api = s.api();
    let id = api.submit(&chat_lines(3, "m")).await;
    let b = api.wait_for(&id, &["completed"], secs(20)).await;
    let (st, c) = api.post(&format!("/batches/{id}/cancel"), &json!({})).await;
    assert_eq!(st, 200, "{c}");
    assert_eq!(c, b, "a final batch never changes");
    // Under test: nothing happens after the cancel either.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(api.batch(&id).await, b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_keeps_finished_lines_and_marks_the_rest_expired() {
    const N: usize = 30;
    let m = mock(MockArgs { latency_ms: 1000, ..Default::default() }).await;
    let s = spawn_app(&config(&m.base_url(), "max_concurrency = 2", ""));
    let api = s.api();
    let f = api.upload(&chat_lines(N, "m")).await;
    let t0 = Instant::now();
    let created = api.create_batch(&f, json!({"completion_window": "3s"})).await;
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(created["expires_at"].as_i64().unwrap() - created["created_at"].as_i64().unwrap(), 3);
    let b = api.wait_for(&id, &["expired", "completed", "cancelled", "failed"], secs(20)).await;
    println!("expired after {:?}", t0.elapsed());
    assert_eq!(b["status"], "expired", "{b}");
    assert!(b["expired_at"].is_i64() && b["finalizing_at"].is_i64(), "{b}");
    assert!(b["completed_at"].is_null() && b["cancelled_at"].is_null(), "{b}");
    assert!(b["expired_at"].as_i64() >= b["expires_at"].as_i64(), "{b}");
    let (out, err) = final_results(&api, &b, N).await;
    assert!(!out.is_empty(), "lines finished before expiry are kept: {b}");
    for l in &err {
        assert!(l["response"].is_null(), "{l}");
        assert_eq!(l["error"]["code"], "batch_expired", "{l}");
    }
    wait_idle(&m, secs(3), "in-flight calls are aborted at expiry").await;
    let before = m.stats().requests;
    // Under test: nothing happens — no call in the half second after expiry.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(m.stats().requests, before, "nothing is sent after expiry");
}

// ---------------------------------------------------------------------------------------
// 4. sharing
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_batch_is_not_stuck_behind_a_big_one() {
    let m = mock(MockArgs { latency_ms: 20, ..Default::default() }).await;
    let s = spawn_app(&config(&m.base_url(), "max_concurrency = 8", ""));
    let api = s.api();
    let big = api.submit(&chat_lines(3000, "m")).await;
    eventually("the big batch is under way", secs(20), || {
        let (api, big) = (api.clone(), big.clone());
        async move { (done(&api.batch(&big).await) >= 100).then_some(()) }
    })
    .await;
    let t0 = Instant::now();
    let small = api.submit(&chat_lines(10, "m")).await;
    let sb = api.wait_for(&small, &["completed"], secs(20)).await;
    let took = t0.elapsed();
    let bb = api.batch(&big).await;
    println!("small batch done in {took:?}; big batch at {}/3000", done(&bb));
    final_results(&api, &sb, 10).await;
    assert!(took < secs(4), "a 10-line batch must not wait behind a 3000-line one: {took:?}");
    assert!(done(&bb) < 1500, "the big batch was still far from done: {bb}");
    assert_eq!(bb["status"], "in_progress");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_gets_a_larger_share() {
    let m = mock(MockArgs { latency_ms: 20, ..Default::default() }).await;
    let s = spawn_app(&config(&m.base_url(), "max_concurrency = 4", "[engine]\nunit_lines = 50"));
    let api = s.api();
    let f1 = api.upload(&chat_lines(1500, "m")).await;
    let f2 = api.upload(&chat_lines(1500, "m")).await;
    let low = api.create_batch(&f1, json!({})).await["id"].as_str().unwrap().to_string();
    let high = api.create_batch(&f2, json!({"priority": 4})).await["id"].as_str().unwrap().to_string();
    api.wait_for(&low, &["in_progress"], secs(20)).await;
    api.wait_for(&high, &["in_progress"], secs(20)).await;
    // A measurement: what each batch got in 3 s.
    tokio::time::sleep(secs(3)).await;
    let (l, h) = (api.batch(&low).await, api.batch(&high).await);
    let (dl, dh) = (done(&l), done(&h));
    println!("after 3 s: low {dl}, high (priority 4) {dh}");
    assert!(dl > 0, "the low-priority batch is not starved");
    assert!(dh >= 2 * dl, "priority 4 gets clearly more than priority 1: high {dh} vs low {dl}");
    assert!(dh < 1500, "the test must measure while both run");
    let (_, c) = api.post(&format!("/batches/{low}/cancel"), &json!({})).await;
    assert_eq!(c["status"], "cancelling");
}

// ---------------------------------------------------------------------------------------
// 5. routing
// ---------------------------------------------------------------------------------------

fn upstream(name: &str, url: &str, rest: &str) -> String {
    format!("[[upstreams]]\nname = \"{name}\"\nbase_url = \"{url}\"\n{rest}\n\n")
}

const WINDOWS: &str = "[batches]\ncompletion_windows = [\"24h\"]\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_route_to_their_upstream_with_aliases_rewritten() {
    let (m1, m2) = (mock(MockArgs::default()).await, mock(MockArgs::default()).await);
    let cfg =
        upstream("one", &m1.base_url(), "models = [\"m-a\"]\naliases = { a = \"m-a\" }") + &upstream("two", &m2.base_url(), "models = [\"m-b\"]") + WINDOWS;
    let s = spawn_app(&cfg);
    let api = s.api();
    let mut lines: Vec<String> = (0..10).map(|i| chat_line(&format!("a-{i}"), "a", None)).collect();
    lines.extend((0..10).map(|i| chat_line(&format!("b-{i}"), "m-b", None)));
    let id = api.submit(&lines).await;
    let b = api.wait_for(&id, &["completed", "failed"], secs(20)).await;
    assert_eq!(b["status"], "completed", "{b}");
    let (out, _) = final_results(&api, &b, 20).await;
    assert!(b["model"].is_null(), "mixed models: batch.model is null: {b}");
    let (mut ids_a, mut ids_b) = (BTreeSet::new(), BTreeSet::new());
    for l in &out {
        let cid = l["custom_id"].as_str().unwrap();
        let model = &l["response"]["body"]["model"];
        if cid.starts_with("a-") {
            assert_eq!(model, "m-a", "the alias is rewritten to the upstream's model id: {l}");
            ids_a.insert(l["id"].as_str().unwrap().to_string());
        } else {
            assert_eq!(model, "m-b", "{l}");
            ids_b.insert(l["id"].as_str().unwrap().to_string());
        }
    }
    let got_a: BTreeSet<String> = id_counts(&m1).into_keys().collect();
    let got_b: BTreeSet<String> = id_counts(&m2).into_keys().collect();
    assert_eq!(got_a, ids_a, "upstream one gets exactly the lines of model a");
    assert_eq!(got_b, ids_b, "upstream two gets exactly the lines of model m-b");
    assert_eq!(m1.stats().requests + m2.stats().requests, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstreams_serving_one_model_share_the_load() {
    let (m1, m2) = (mock(MockArgs { latency_ms: 50, ..Default::default() }).await, mock(MockArgs { latency_ms: 50, ..Default::default() }).await);
    let cfg = upstream("one", &m1.base_url(), "models = [\"m\"]\nmax_concurrency = 2")
        + &upstream("two", &m2.base_url(), "models = [\"m\"]\nmax_concurrency = 2")
        + WINDOWS;
    let s = spawn_app(&cfg);
    let api = s.api();
    let id = api.submit(&chat_lines(40, "m")).await;
    let b = api.wait_for(&id, &["completed"], secs(20)).await;
    final_results(&api, &b, 40).await;
    let (r1, r2) = (m1.stats().requests, m2.stats().requests);
    println!("load split: {r1} / {r2}");
    assert_eq!(r1 + r2, 40);
    assert!(r1 >= 8 && r2 >= 8, "both upstreams take a fair part of the load: {r1} / {r2}");
    assert!(m1.stats().peak_in_flight <= 2 && m2.stats().peak_in_flight <= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_fail_over_from_a_dead_upstream() {
    let live = mock(MockArgs { latency_ms: 10, ..Default::default() }).await;
    let dead = dead_base_url();
    for order in [[&live.base_url(), &dead], [&dead, &live.base_url()]] {
        live.reset_stats();
        let cfg = upstream("first", order[0], "models = [\"m\"]\nmax_concurrency = 4")
            + &upstream("second", order[1], "models = [\"m\"]\nmax_concurrency = 4")
            + WINDOWS;
        let s = spawn_app(&cfg);
        let api = s.api();
        let id = api.submit(&chat_lines(30, "m")).await;
        let b = api.wait_for(&id, &["completed"], secs(30)).await;
        let (out, _) = final_results(&api, &b, 30).await;
        assert_eq!(out.len(), 30, "every line fails over to the live upstream: {b}");
        assert_eq!(live.stats().unique_request_ids, 30);
        assert_eq!(live.stats().duplicate_request_ids, 0, "a line is sent to the live upstream once");
    }
}

// ---------------------------------------------------------------------------------------
// 6. headers, secrets, live progress
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_id_and_api_key_are_sent_and_the_key_never_leaks() {
    const KEY: &str = "sk-engine-test-Zq8vX1secretvalue";
    let m = mock(MockArgs { api_key: Some(KEY.into()), ..Default::default() }).await;
    let key_env = [("BATCHD_ENGINE_TEST_UPSTREAM_KEY".to_string(), KEY.to_string())];
    let s = spawn_app_with(&config(&m.base_url(), "api_key_env = \"BATCHD_ENGINE_TEST_UPSTREAM_KEY\"", ""), &[], &key_env);
    let api = s.api();
    let mut lines = chat_lines(20, "m");
    lines.push(chat_line("fails", "m", Some(json!({"status": 400}))));
    let id = api.submit(&lines).await;
    let b = api.wait_for(&id, &["completed"], secs(20)).await;
    let (out, err) = final_results(&api, &b, 21).await;
    assert_eq!(out.len(), 20, "the key was accepted by the upstream (no 401): {err:?}");
    let st = m.stats_with(secs(60), true);
    assert_eq!(st.by_status.get("401"), None);
    let sent: BTreeSet<String> = st.request_id_counts.unwrap().into_keys().collect();
    let ids: BTreeSet<String> = out.iter().chain(&err).map(|l| l["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(sent, ids, "every upstream call carries x-request-id == the line's id");
    for l in &out {
        assert_eq!(l["response"]["request_id"], l["id"], "{l}");
    }
    let mut everything = s.log();
    for key in ["output_file_id", "error_file_id"] {
        everything += &api.content(b[key].as_str().unwrap()).await;
    }
    everything += &b.to_string();
    assert!(!everything.contains(KEY) && !everything.contains("Zq8vX1secret"), "the upstream key leaked into logs or files");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_counts_and_progress_are_live() {
    const N: usize = 200;
    let m = mock(MockArgs { latency_ms: 50, ..Default::default() }).await;
    let s = spawn_app(&config(&m.base_url(), "max_concurrency = 4", ""));
    let api = s.api();
    let id = api.submit(&chat_lines(N, "m")).await;
    let (mut increases, mut last, mut rps_seen, mut eta_seen) = (0, 0, 0.0f64, false);
    let deadline = Instant::now() + secs(30);
    let b = loop {
        let b = api.batch(&id).await;
        let d = done(&b);
        assert!(d >= last, "request_counts never go backwards");
        if d > last && b["status"] == "in_progress" {
            increases += 1;
        }
        last = d;
        if b["status"] == "in_progress" {
            assert!(b.get("progress").is_some(), "a running batch shows the progress extension: {b}");
            rps_seen = rps_seen.max(b["progress"]["requests_per_second"].as_f64().unwrap_or(0.0));
            eta_seen |= b["progress"]["eta_seconds"].as_u64().is_some();
        }
        if b["status"] == "completed" {
            break b;
        }
        assert!(Instant::now() < deadline, "{b}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!("{increases} increases seen; max requests_per_second {rps_seen}");
    final_results(&api, &b, N).await;
    assert!(increases >= 3, "completed grows while running, not all at the end ({increases} increases)");
    assert!(rps_seen > 0.0, "progress.requests_per_second > 0 while running");
    assert!(eta_seen, "progress.eta_seconds is given once there is a rate");
}

// ---------------------------------------------------------------------------------------
// 7. more engine behaviour
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_estimate_is_corrected_by_actual_usage() {
    // tpm 6100 → 100 tokens/s. Each line is estimated at ~1040 tokens (max_tokens 1000) but
    // really uses ~50. Once the first answer has corrected the estimate, the next line may go
    // within about a second; 6 lines should take a few seconds, not 6 × 10 s.
    let m = mock(MockArgs::default()).await;
    let s = spawn_app(&config(&m.base_url(), "tpm = 6100", ""));
    let api = s.api();
    let lines: Vec<String> = (0..6).map(|i| line_with(&format!("t-{i}"), "m", json!({"max_tokens": 1000}))).collect();
    let t0 = Instant::now();
    let id = api.submit(&lines).await;
    let b = api.wait_for(&id, &["completed"], secs(40)).await;
    let took = t0.elapsed();
    final_results(&api, &b, 6).await;
    let st = m.stats();
    let used = st.prompt_tokens + st.completion_tokens;
    println!("6 lines using {used} tokens in all took {took:?} at tpm 6100");
    assert!(used < 600, "test premise: the lines really use few tokens ({used})");
    assert!(took < secs(12), "the TPM bucket must credit back the unused estimate: 6 lines using {used} tokens took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_second_upstream_does_not_stall_a_fast_one() {
    let fast = mock(MockArgs { latency_ms: 10, ..Default::default() }).await;
    let slow = mock(MockArgs { latency_ms: 500, ..Default::default() }).await;
    let cfg = upstream("fast", &fast.base_url(), "models = [\"m\"]\nmax_concurrency = 2")
        + &upstream("slow", &slow.base_url(), "models = [\"m\"]\nmax_concurrency = 2")
        + WINDOWS;
    let s = spawn_app(&cfg);
    let api = s.api();
    let t0 = Instant::now();
    let id = api.submit(&chat_lines(60, "m")).await;
    let b = api.wait_for(&id, &["completed"], secs(30)).await;
    let took = t0.elapsed();
    final_results(&api, &b, 60).await;
    println!("60 lines took {took:?}: fast {} / slow {}", fast.stats().requests, slow.stats().requests);
    // The fast upstream alone would need 60 × 10 ms / 2 = 0.3 s.
    assert!(took < secs(3), "lines waited for the slow upstream while the fast one was idle: {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_lines_with_blank_lines_and_crlf_are_sent_as_written() {
    let m = mock(MockArgs::default()).await;
    let s = spawn_app(&config(&m.base_url(), "", ""));
    let api = s.api();
    let body = |t: &str| json!({"model": "m", "messages": [{"role": "user", "content": t}]}).to_string();
    let text = format!("{}\r\n\r\n{}\r\n   \n{}", body("first"), body("third"), body("fifth"));
    let (st, f) = api.upload_as(text.into_bytes(), "batch", "bare.jsonl").await;
    assert_eq!(st, 200, "{f}");
    let b = api.create_batch(f["id"].as_str().unwrap(), json!({})).await;
    let b = api.wait_for(b["id"].as_str().unwrap(), &["completed", "failed"], secs(20)).await;
    assert_eq!(b["status"], "completed", "{b}");
    let (out, _) = final_results(&api, &b, 3).await;
    let got: HashMap<&str, &str> =
        out.iter().map(|l| (l["custom_id"].as_str().unwrap(), l["response"]["body"]["choices"][0]["message"]["content"].as_str().unwrap())).collect();
    let want = HashMap::from([("line-1", "echo: first"), ("line-3", "echo: third"), ("line-5", "echo: fifth")]);
    assert_eq!(got, want, "physical line numbers name bare lines; each answer belongs to its line");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_and_responses_go_to_their_paths_with_usage_summed() {
    let m = mock(MockArgs::default()).await;
    let s = spawn_app(&config(&m.base_url(), "", ""));
    let api = s.api();
    for (endpoint, body) in [
        ("/v1/embeddings", json!({"model": "e", "input": "some text to embed"})),
        ("/v1/responses", json!({"model": "r", "input": "say hi", "mock": {"completion_tokens": 7}})),
    ] {
        let lines: Vec<String> = (0..5).map(|i| json!({"custom_id": format!("c{i}"), "method": "POST", "url": endpoint, "body": body}).to_string()).collect();
        let f = api.upload(&lines).await;
        let b = api.create_batch(&f, json!({"endpoint": endpoint})).await;
        let b = api.wait_for(b["id"].as_str().unwrap(), &["completed", "failed"], secs(20)).await;
        assert_eq!(b["status"], "completed", "{b}");
        let (out, _) = final_results(&api, &b, 5).await;
        let u = &b["usage"];
        let sum = |f: &dyn Fn(&Value) -> i64| out.iter().map(|l| f(&l["response"]["body"]["usage"])).sum::<i64>();
        if endpoint == "/v1/embeddings" {
            assert_eq!(out[0]["response"]["body"]["object"], "list");
            assert_eq!(u["input_tokens"].as_i64(), Some(sum(&|u| u["prompt_tokens"].as_i64().unwrap())), "{b}");
            assert_eq!(u["output_tokens"], 0);
        } else {
            assert_eq!(out[0]["response"]["body"]["object"], "response");
            assert_eq!(u["input_tokens"].as_i64(), Some(sum(&|u| u["input_tokens"].as_i64().unwrap())), "{b}");
            assert_eq!(u["output_tokens"], 35, "{b}");
        }
        assert_eq!(u["total_tokens"].as_i64(), Some(u["input_tokens"].as_i64().unwrap() + u["output_tokens"].as_i64().unwrap()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_line_json_answers_stay_one_jsonl_line() {
    let m = mock(MockArgs::default()).await;
    let s = spawn_app(&config(&m.base_url(), "max_attempts = 1", ""));
    let api = s.api();
    let pretty = "{\n  \"id\": \"x\",\n  \"note\": \"line\\nbreak\",\n  \"usage\": {\"prompt_tokens\": 3, \"completion_tokens\": 4, \"total_tokens\": 7}\n}";
    let lines = vec![
        chat_line("pretty-200", "m", Some(json!({"status": 200, "body_text": pretty}))),
        chat_line("pretty-500", "m", Some(json!({"status": 500, "body_text": pretty}))),
        chat_line("plain", "m", None),
    ];
    let id = api.submit(&lines).await;
    let b = api.wait_for(&id, &["completed"], secs(20)).await;
    let (out, err) = final_results(&api, &b, 3).await;
    let p = out.iter().find(|l| l["custom_id"] == "pretty-200").expect("a 2xx JSON answer goes to the output file");
    assert_eq!(p["response"]["body"], serde_json::from_str::<Value>(pretty).unwrap());
    assert_eq!(err[0]["response"]["body"], serde_json::from_str::<Value>(pretty).unwrap());
    assert!(b["usage"]["total_tokens"].as_i64().unwrap() >= 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_gives_upstream_unavailable_after_max_attempts() {
    let s = spawn_app(&config(&dead_base_url(), "max_attempts = 2", ""));
    let api = s.api();
    let id = api.submit(&chat_lines(3, "m")).await;
    let b = api.wait_for(&id, &["completed"], secs(20)).await;
    let (_, err) = final_results(&api, &b, 3).await;
    for l in &err {
        assert!(l["response"].is_null(), "{l}");
        assert_eq!(l["error"]["code"], "upstream_unavailable", "{l}");
        let msg = l["error"]["message"].as_str().unwrap();
        assert!(!msg.contains("127.0.0.1"), "no upstream address in user-visible errors: {msg}");
        assert!(msg.contains("refused"), "the cause is named: {msg}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_can_let_in_flight_lines_finish() {
    const N: usize = 40;
    let m = mock(MockArgs { latency_ms: 1000, ..Default::default() }).await;
    // `extra` lands in the [batches] table that `config` ends with.
    let s = spawn_app(&config(&m.base_url(), "max_concurrency = 4", "finish_in_flight_on_cancel = true"));
    let api = s.api();
    let id = api.submit(&chat_lines(N, "m")).await;
    api.wait_for(&id, &["in_progress"], secs(20)).await;
    let mr = &m;
    eventually("calls in flight", secs(10), || async move { (mr.stats().in_flight == 4).then_some(()) }).await;
    let sent = m.stats().requests;
    let (_, c) = api.post(&format!("/batches/{id}/cancel"), &json!({})).await;
    assert_eq!(c["status"], "cancelling", "{c}");
    let b = api.wait_for(&id, &["cancelled"], secs(10)).await;
    let (out, err) = final_results(&api, &b, N).await;
    assert_eq!(m.stats().requests, sent, "nothing new is sent after the cancel");
    assert_eq!(out.len() as u64, sent, "every call in flight at the cancel finished and was kept: {b}");
    assert!(err.iter().all(|l| l["error"]["code"] == "batch_cancelled"));
}

/// Letting in-flight calls finish does not mean waiting out a long pause: lines waiting for
/// another attempt (here behind a 30 s Retry-After) end as `batch_cancelled` at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_does_not_wait_for_lines_held_by_an_upstream_pause() {
    let m = mock(MockArgs::default()).await;
    let s = spawn_app(&config(&m.base_url(), "max_concurrency = 4", "finish_in_flight_on_cancel = true"));
    let api = s.api();
    let lines: Vec<String> = (0..8).map(|i| chat_line(&format!("r{i}"), "m", Some(json!({"status": 429, "retry_after_s": 30})))).collect();
    let id = api.submit(&lines).await;
    eventually("the upstream said slow down: lines wait for another attempt, no call is open", secs(10), || async {
        let c = api.get(&format!("/batches/{id}/progress")).await.1["counts"].clone();
        (c["retrying"].as_i64() >= Some(1) && m.stats().in_flight == 0).then_some(())
    })
    .await;
    let t0 = Instant::now();
    let (_, c) = api.post(&format!("/batches/{id}/cancel"), &json!({})).await;
    assert_eq!(c["status"], "cancelling", "{c}");
    let b = api.wait_for(&id, &["cancelled"], secs(10)).await;
    assert!(t0.elapsed() < secs(5), "cancelled in {:?}, not after the 30 s pause", t0.elapsed());
    let (out, err) = final_results(&api, &b, 8).await;
    assert!(out.is_empty());
    assert!(err.iter().all(|l| l["error"]["code"] == "batch_cancelled"), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_window_recovers_after_429s() {
    let m = mock(MockArgs { latency_ms: 50, ..Default::default() }).await;
    let s = spawn_app(&config(&m.base_url(), "max_concurrency = 8", ""));
    let api = s.api();
    let storm: Vec<String> = (0..24).map(|i| chat_line(&format!("s-{i}"), "m", Some(json!({"status": 429, "fail_times": 1, "retry_after_s": 0.05})))).collect();
    let id = api.submit(&storm).await;
    let b = api.wait_for(&id, &["completed"], secs(30)).await;
    let (out, _) = final_results(&api, &b, 24).await;
    assert_eq!(out.len(), 24);
    assert_eq!(m.stats().by_status.get("429"), Some(&24));
    m.reset_stats();
    let id = api.submit(&chat_lines(300, "m")).await;
    let b = api.wait_for(&id, &["completed"], secs(30)).await;
    final_results(&api, &b, 300).await;
    let st = m.stats();
    assert_eq!(st.peak_in_flight, 8, "after the 429s the window grows back to max_concurrency (no slot is lost): {st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_body_bytes_pass_through_unchanged() {
    let m = mock(MockArgs::default()).await;
    let s = spawn_app(&config(&m.base_url(), "", ""));
    let api = s.api();
    let body = format!(r#"{{ "model" : "m",{}"messages":[{{"role":"user","content":"caf\u00e9 \ud83d\ude00"}}] , "temperature":1.50 }}"#, " ".repeat(400));
    let line = format!(r#"{{"custom_id":"w","method":"POST","url":"/v1/chat/completions","body":{body}}}"#);
    let id = api.submit(&[line]).await;
    let b = api.wait_for(&id, &["completed"], secs(20)).await;
    let (out, _) = final_results(&api, &b, 1).await;
    assert_eq!(out[0]["response"]["body"]["choices"][0]["message"]["content"], "echo: café 😀");
    assert_eq!(m.stats().prompt_tokens, body.len() as u64 / 4, "the upstream got the body's bytes as written, not re-serialized JSON");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_racing_completion_never_ends_completed() {
    // Cancels land at random moments around the end of 1-line batches. Whatever wins, a
    // batch whose cancel was acknowledged (`cancelling`) must end `cancelled`: the state
    // machine has no cancelling → completed edge.
    let m = mock(MockArgs { latency_ms: 60, ..Default::default() }).await;
    let s = spawn_app(&config(&m.base_url(), "", ""));
    let api = s.api();
    let f = api.upload(&chat_lines(1, "m")).await;
    // Calibrate: how long a 1-line batch takes from create to final, here and now.
    let mut took = vec![];
    for _ in 0..5 {
        let t0 = Instant::now();
        let id = api.create_batch(&f, json!({})).await["id"].as_str().unwrap().to_string();
        loop {
            if api.batch(&id).await["status"] == "completed" {
                break;
            }
            assert!(t0.elapsed() < secs(10));
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        took.push(t0.elapsed());
    }
    took.sort();
    let typical = took[2].as_millis() as u64;
    // Cancels spread over the ~60 ms before the typical completion, when the runner concludes.
    let mut tasks = vec![];
    for i in 0..60u64 {
        let api = api.clone();
        let id = api.create_batch(&f, json!({})).await["id"].as_str().unwrap().to_string();
        let delay = Duration::from_millis((typical + 10).saturating_sub(i));
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let (_, c) = api.post(&format!("/batches/{id}/cancel"), &json!({})).await;
            (id, c["status"].as_str().unwrap().to_string())
        }));
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let mut bad = vec![];
    let mut seen = HashMap::<String, u32>::new();
    for t in tasks {
        let (id, answered) = t.await.unwrap();
        let b = api.wait_for(&id, &["completed", "cancelled", "failed", "expired"], secs(20)).await;
        let fin = b["status"].as_str().unwrap().to_string();
        *seen.entry(format!("{answered} → {fin}")).or_default() += 1;
        if answered == "cancelling" && fin != "cancelled" {
            bad.push(b.clone());
        }
        if fin == "completed" {
            assert!(b["finalizing_at"].is_i64(), "completed without finalizing: {b}");
        }
        final_results(&api, &b, if b["request_counts"]["total"] == 0 { 0 } else { 1 }).await;
    }
    println!("typical 1-line batch: {typical} ms; cancel answer → final status: {seen:?}");
    assert!(bad.is_empty(), "acknowledged cancels that did not end cancelled: {bad:#?}");
}

// ---------------------------------------------------------------------------------------
// 7. TLS upstreams
// ---------------------------------------------------------------------------------------

/// A TLS front for `backend` (plain HTTP): a certificate for `localhost` signed by a fresh CA.
/// Returns the front's port and the CA certificate as PEM.
async fn tls_front(backend: std::net::SocketAddr) -> (u16, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    use tokio_rustls::rustls;
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string()]).unwrap().signed_by(&key, &ca, &ca_key).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()))
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // A client that rejects the certificate ends the handshake: nothing to serve.
                let Ok(mut tls) = acceptor.accept(sock).await else { return };
                let mut plain = tokio::net::TcpStream::connect(backend).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    (port, ca.pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstream_with_a_private_ca_is_trusted_only_through_ca_file() {
    let m = mock(MockArgs::default()).await;
    let (port, ca_pem) = tls_front(m.addr()).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let url = format!("https://localhost:{port}/v1");

    // With the CA in ca_file: every line runs over TLS, on kept-alive connections.
    let s = spawn_app(&config(&url, &format!("max_concurrency = 4\nca_file = {:?}", ca_file.display().to_string()), ""));
    let api = s.api();
    let id = api.submit(&chat_lines(20, "m")).await;
    let b = api.wait_for(&id, &["completed"], secs(30)).await;
    let (out, _) = final_results(&api, &b, 20).await;
    assert_eq!(out.len(), 20, "{b}");
    assert_eq!(m.stats().unique_request_ids, 20, "every line reached the upstream through TLS");
    drop(s);

    // Without it the server's certificate is not trusted: no line reaches the upstream, and
    // the error says why.
    m.reset_stats();
    let s = spawn_app(&config(&url, "max_attempts = 1", ""));
    let api = s.api();
    let id = api.submit(&chat_lines(2, "m")).await;
    let b = api.wait_for(&id, &["completed"], secs(30)).await;
    let (_, err) = final_results(&api, &b, 2).await;
    for l in &err {
        let msg = l["error"]["message"].as_str().unwrap();
        assert_eq!(l["error"]["code"], "upstream_unavailable", "{l}");
        assert!(msg.contains("certificate"), "the TLS failure is named: {msg}");
    }
    assert_eq!(m.stats().requests, 0, "nothing was sent over an untrusted connection");

    // A ca_file that holds no certificate is refused at start, with its name.
    std::fs::write(dir.path().join("empty.pem"), "not a certificate\n").unwrap();
    let bad_cfg = config(&url, &format!("ca_file = {:?}", dir.path().join("empty.pem").display().to_string()), "");
    std::fs::write(dir.path().join("bad.toml"), bad_cfg).unwrap();
    let mut serve = std::process::Command::new(BIN);
    serve.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"]).arg(dir.path().join("data")).arg("--config").arg(dir.path().join("bad.toml"));
    let Out { code, stderr, .. } = finish(serve, secs(20));
    assert_ne!(code, 0);
    assert!(stderr.contains("ca_file") && stderr.contains("empty.pem"), "{stderr}");
}

// ---------------------------------------------------------------------------------------
// 6. deadlines
// ---------------------------------------------------------------------------------------

/// One slow upstream (4 slots × 100 ms = 40 lines/s) and windows short enough to test.
async fn deadline_setup() -> (MockServer, Server) {
    let m = mock(MockArgs { latency_ms: 100, ..Default::default() }).await;
    let cfg = format!(
        "[[upstreams]]\nname = \"slow\"\nbase_url = \"{}\"\nmax_concurrency = 4\n\n[batches]\ncompletion_windows = [\"24h\", \"16s\", \"6s\"]\n\n[engine]\nunit_lines = 50\n",
        m.base_url()
    );
    let s = spawn_app(&cfg);
    (m, s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_window_batch_behind_a_long_one_finishes_in_time_and_the_long_one_keeps_going() {
    let (_m, s) = deadline_setup().await;
    let api = s.api();
    let big = api.submit(&chat_lines(3000, "m")).await;
    eventually("the long batch is under way", secs(20), || {
        let (api, big) = (api.clone(), big.clone());
        async move { (done(&api.batch(&big).await) >= 40).then_some(()) }
    })
    .await;
    // 360 lines in 16 s need about 75 % of the pool; an even split (20/s) would take 18 s.
    let f = api.upload(&chat_lines(360, "m")).await;
    let t0 = Instant::now();
    let short = api.create_batch(&f, json!({"completion_window": "16s"})).await["id"].as_str().unwrap().to_string();
    let big_at_start = done(&api.batch(&big).await);
    let sb = api.wait_for(&short, &["completed", "expired"], secs(30)).await;
    let took = t0.elapsed();
    let big_after = done(&api.batch(&big).await);
    println!("short batch {} in {took:?}; long batch moved {} lines meanwhile", sb["status"], big_after - big_at_start);
    assert_eq!(sb["status"], "completed", "the 16 s batch finishes inside its window: {sb}");
    final_results(&api, &sb, 360).await;
    assert!(big_after - big_at_start >= 30, "the long batch is not starved meanwhile: {} lines", big_after - big_at_start);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_cannot_make_its_window_is_flagged_at_risk_early() {
    let (_m, s) = deadline_setup().await;
    let api = s.api();
    let f = api.upload(&chat_lines(600, "m")).await;
    let created = api.create_batch(&f, json!({"completion_window": "6s"})).await;
    let id = created["id"].as_str().unwrap().to_string();
    let expires_at = created["expires_at"].as_i64().unwrap();
    let flagged = eventually("progress.at_risk", secs(10), || {
        let (api, id) = (api.clone(), id.clone());
        async move {
            let b = api.batch(&id).await;
            (b["progress"]["at_risk"] == true).then_some(b)
        }
    })
    .await;
    let now = batchd::now_unix();
    assert!(now < expires_at - 2, "flagged well before it expires ({now} vs {expires_at})");
    let projected = flagged["progress"]["projected_finish_at"].as_i64().expect("a projected finish");
    assert!(projected > expires_at, "the projection is past the deadline: {flagged}");
    let end = api.wait_for(&id, &["expired"], secs(20)).await;
    final_results(&api, &end, 600).await;
}
