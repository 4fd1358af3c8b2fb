//! Black-box tests of the extensions that tell what a batch is doing (issue #13): the
//! `/progress` answer, stalls and their recovery, event streams, retry, usage, cost and
//! quotas, driven over plain HTTP against the real binary and the in-process mock upstream.
//! The official SDK's side (webhook signatures, an SSE client, metrics parsing) is in
//! `tests/sdk/test_events.py`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::{json, Value};

/// Reads a whole event stream (until it ends or `timeout`) as (id, type, data JSON).
async fn read_stream(api: &Api, path: &str, last_event_id: Option<i64>, timeout: Duration) -> Vec<(i64, String, Value)> {
    let mut req = api.request(reqwest::Method::GET, path);
    if let Some(l) = last_event_id {
        req = req.header("last-event-id", l.to_string());
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200, "{path}");
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let body = tokio::time::timeout(timeout, resp.text()).await.unwrap_or_else(|_| panic!("the stream {path} did not end within {timeout:?}")).unwrap();
    let mut out = vec![];
    for block in body.split("\n\n").filter(|b| !b.trim().is_empty()) {
        let field = |name: &str| block.lines().find_map(|l| l.strip_prefix(&format!("{name}:")).map(|v| v.trim().to_string()));
        let (Some(id), Some(kind), Some(data)) = (field("id"), field("event"), field("data")) else { continue };
        out.push((id.parse().unwrap(), kind, serde_json::from_str(&data).unwrap()));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_tells_counts_rates_and_upstreams_while_running() {
    let m = mock(MockArgs { latency_ms: 100, ..Default::default() }).await;
    let s = spawn_app(&config(&m.base_url(), "max_concurrency = 4", ""));
    let api = s.api();
    let id = api.submit(&chat_lines(80, "m")).await;
    let p = eventually("a rate while running", secs(30), || {
        let (api, id) = (api.clone(), id.clone());
        async move {
            let (st, p) = api.get(&format!("/batches/{id}/progress")).await;
            assert_eq!(st, 200, "{p}");
            (p["requests_per_second"].as_f64().unwrap_or(0.0) > 0.0 && p["counts"]["in_flight"].as_i64().unwrap_or(0) > 0).then_some(p)
        }
    })
    .await;
    assert_eq!(p["object"], "batch.progress");
    assert_eq!(p["status"], "in_progress");
    let c = &p["counts"];
    let sum: i64 = ["succeeded", "failed", "retrying", "in_flight", "pending"].iter().map(|k| c[k].as_i64().unwrap()).sum();
    assert_eq!(sum, 80, "the counts add up to the total: {p}");
    assert!(p["tokens_per_second"].as_f64().unwrap() > 0.0, "{p}");
    assert!(p["eta_seconds"].as_i64().is_some() && p["projected_finish_at"].as_i64().is_some(), "{p}");
    assert_eq!(p["at_risk"], false);
    assert!(p["stalled"].is_null(), "{p}");
    assert!(p["seconds_since_last_result"].as_f64().unwrap() < 5.0, "{p}");
    let up = &p["upstreams"][0];
    assert_eq!((up["name"].as_str(), up["limit"].as_i64()), (Some("mock"), Some(4)), "{p}");
    assert!(up["in_flight"].as_i64().unwrap() <= 4, "{p}");
    let b = api.wait_for(&id, &["completed"], secs(60)).await;
    let (_, p) = api.get(&format!("/batches/{id}/progress")).await;
    assert_eq!(p["counts"], json!({"total": 80, "succeeded": 80, "failed": 0, "retrying": 0, "in_flight": 0, "pending": 0}), "{p}");
    assert!(p["eta_seconds"].is_null() && p["stalled"].is_null(), "{p}");
    assert_eq!(b["cost"], Value::Null, "no price configured");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_batch_says_why_and_recovers_when_its_upstream_returns() {
    let dead = dead_base_url();
    let port: u16 = dead.trim_start_matches("http://127.0.0.1:").trim_end_matches("/v1").parse().unwrap();
    let s = spawn_app(&config(&dead, "max_attempts = 100\nmax_concurrency = 1", "").replace("[batches]", "[batches]\nstall_after_s = 1.5"));
    let api = s.api();
    let t0 = Instant::now();
    let id = api.submit(&chat_lines(6, "m")).await;
    let p = eventually("a stall", secs(20), || {
        let (api, id) = (api.clone(), id.clone());
        async move {
            let (_, p) = api.get(&format!("/batches/{id}/progress")).await;
            (!p["stalled"].is_null()).then_some(p)
        }
    })
    .await;
    assert!(t0.elapsed() < secs(10), "a stall shows within stall_after_s (plus a check period)");
    let reason = p["stalled"]["reason"].as_str().unwrap();
    assert!(reason.starts_with("upstream unreachable: mock"), "the reason names the upstream: {p}");
    assert!(p["stalled"]["since"].as_i64().unwrap() <= crate_now(), "{p}");
    assert!(p["eta_seconds"].is_null(), "no ETA while stalled: {p}");
    assert_eq!(p["counts"]["retrying"].as_i64().unwrap() + p["counts"]["in_flight"].as_i64().unwrap() + p["counts"]["pending"].as_i64().unwrap(), 6, "{p}");
    let (_, q) = api.get("/quota").await;
    assert_eq!(q["queued"]["requests"], 6, "{q}");

    // The upstream comes back (answering one line at a time): the batch moves again, the
    // stall is told over, and it finishes.
    let m = MockServer::start(MockArgs { listen: format!("127.0.0.1:{port}"), latency_ms: 400, ..Default::default() }).await.unwrap();
    let b = api.wait_for(&id, &["completed"], secs(90)).await;
    assert_eq!(b["request_counts"]["completed"], 6);
    let events = read_stream(&api, &format!("/batches/{id}/events?after=0"), None, secs(10)).await;
    let stalls: Vec<&Value> = events.iter().filter(|(_, k, _)| k == "batch.stalled").map(|(_, _, d)| &d["data"]).collect();
    // Once per stall: a stall, then its recovery (and again if lines waiting on their
    // back-off leave it without a result for stall_after_s once more).
    assert!(stalls.len() >= 2, "one event when it stalls, one when it moves again: {events:?}");
    assert_eq!(stalls[0]["stalled"], true);
    assert!(stalls[0]["reason"].as_str().unwrap().contains("unreachable"), "{stalls:?}");
    assert!(stalls.iter().enumerate().all(|(i, s)| s["stalled"] == (i % 2 == 0)), "stalled and recovered alternate: {stalls:?}");
    m.shutdown().await;
}

fn crate_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_resume_after_a_cursor_end_at_the_final_status_and_keep_tenants_apart() {
    let m = mock(MockArgs { latency_ms: 60, ..Default::default() }).await;
    let tenants = "[[tenants]]\nname = \"a\"\napi_keys = [\"sk-a\"]\n[[tenants]]\nname = \"b\"\napi_keys = [\"sk-b\"]";
    let s = spawn_app(&config(&m.base_url(), "max_concurrency = 2", tenants));
    let (a, b) = (s.api_with_key("sk-a"), s.api_with_key("sk-b"));
    // The tenant stream, opened before the batch exists, sees it from its first status.
    let (opened, open) = tokio::sync::oneshot::channel();
    let tenant_stream = {
        let a = a.clone();
        tokio::spawn(async move {
            let resp = a.request(reqwest::Method::GET, "/events").send().await.unwrap();
            let _ = opened.send(());
            let mut body = resp.bytes_stream();
            let mut text = String::new();
            use futures::StreamExt;
            while let Ok(Some(Ok(chunk))) = tokio::time::timeout(secs(30), body.next()).await {
                text += &String::from_utf8_lossy(&chunk);
                if text.contains("\"status\":\"completed\"") {
                    break;
                }
            }
            text
        })
    };
    tokio::time::timeout(secs(10), open).await.expect("the tenant stream opens").unwrap();
    let id = a.submit(&chat_lines(40, "m")).await;
    let all = read_stream(&a, &format!("/batches/{id}/events"), None, secs(60)).await;
    let kinds: Vec<&str> = all.iter().map(|(_, k, _)| k.as_str()).collect();
    assert_eq!(kinds.first(), Some(&"batch.status"), "{kinds:?}");
    assert!(kinds.iter().filter(|k| **k == "batch.progress").count() >= 1, "progress while counts move: {kinds:?}");
    let (_, _, last) = all.last().unwrap();
    assert_eq!((last["type"].as_str(), last["data"]["status"].as_str()), (Some("batch.status"), Some("completed")), "the stream ends after the final status");
    assert!(all.windows(2).all(|w| w[0].0 < w[1].0), "ids increase");
    assert!(last["id"].as_str().unwrap().starts_with("evt_") && last["batch_id"] == id.as_str());

    // The whole history from 0, then resumed from the middle: no gap, no repeat.
    let history = read_stream(&a, &format!("/batches/{id}/events?after=0"), None, secs(10)).await;
    let mid = history[history.len() / 2].0;
    let rest = read_stream(&a, &format!("/batches/{id}/events"), Some(mid), secs(10)).await;
    let want: Vec<i64> = history.iter().map(|e| e.0).filter(|i| *i > mid).collect();
    assert_eq!(rest.iter().map(|e| e.0).collect::<Vec<_>>(), want, "Last-Event-ID resumes right after it");
    let done = read_stream(&a, &format!("/batches/{id}/events"), Some(history.last().unwrap().0), secs(5)).await;
    assert!(done.is_empty(), "after the final event, the stream ends at once");

    let text = tenant_stream.await.unwrap();
    assert!(text.contains(&id) && text.contains("\"status\":\"validating\""), "the tenant stream saw the batch: {text}");
    let (st, e) = b.get(&format!("/batches/{id}/events")).await;
    assert_eq!((st, e["error"]["param"].as_str()), (404, Some("id")), "another tenant's batch is not found");
    for path in ["progress", "retry"] {
        let method = if path == "retry" { reqwest::Method::POST } else { reqwest::Method::GET };
        let r = b.request(method, &format!("/batches/{id}/{path}")).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 404, "{path}");
    }
    let (st, _) = a.get("/events?after=zz").await;
    assert_eq!(st, 400, "a bad cursor is a 400");
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_makes_a_batch_of_exactly_the_failed_lines() {
    let m = mock(MockArgs::default()).await;
    let s = spawn_app(&config(&m.base_url(), "max_attempts = 1", ""));
    let api = s.api();
    let lines = vec![
        chat_line("ok-1", "m", None),
        chat_line("bad-400", "m", Some(json!({"status": 400}))),
        chat_line("bad-500", "m", Some(json!({"status": 500}))),
        chat_line("ok-2", "m", None),
        // A 502, not a 503: a 503 costs no attempt (it waits out the completion window).
        chat_line("bad-502", "m", Some(json!({"status": 502}))),
    ];
    let file = api.upload(&lines).await;
    let b = api.create_batch(&file, json!({"metadata": {"project": "x"}})).await;
    let id = b["id"].as_str().unwrap().to_string();
    let (st, e) = api.post(&format!("/batches/{id}/retry"), &json!({})).await;
    assert!(st == 409 || st == 200 && e["metadata"]["retry_of"] == id.as_str(), "409 while the batch runs: {e}");
    let done = api.wait_for(&id, &["completed"], secs(30)).await;
    assert_eq!(done["request_counts"]["failed"], 3);

    let (st, r) = api.post(&format!("/batches/{id}/retry"), &json!({})).await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["metadata"], json!({"project": "x", "retry_of": id}), "{r}");
    let input = api.content(r["input_file_id"].as_str().unwrap()).await;
    let ids: Vec<String> = input.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()["custom_id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids, ["bad-400", "bad-500", "bad-502"], "exactly the failed lines, in order, custom_ids unchanged");
    let original: Value = serde_json::from_str(&lines[2]).unwrap();
    let copied: Value = serde_json::from_str(input.lines().nth(1).unwrap()).unwrap();
    assert_eq!(copied["body"], original["body"], "the request body is unchanged");
    let retried = api.wait_for(r["id"].as_str().unwrap(), &["completed"], secs(30)).await;
    assert_eq!(retried["request_counts"]["total"], 3);

    let (st, r) = api.post(&format!("/batches/{id}/retry"), &json!({"status_codes": [500, 502]})).await;
    assert_eq!(st, 200, "{r}");
    let input = api.content(r["input_file_id"].as_str().unwrap()).await;
    assert_eq!(input.lines().count(), 2, "narrowed by status: {input}");
    let (st, e) = api.post(&format!("/batches/{id}/retry"), &json!({"include": ["expired", "cancelled"]})).await;
    assert_eq!((st, e["error"]["code"].as_str()), (400, Some("nothing_to_retry")), "{e}");

    // `batchd retry BATCH_ID` creates the batch on the server and prints its id alone on stdout.
    let mut c = std::process::Command::new(BIN);
    c.args(["retry", &id, "--status", "400", "--server", &s.url]);
    let out = finish(c, secs(30));
    assert_eq!(out.code, 0, "{out:?}");
    let new_id = out.stdout.trim();
    assert!(new_id.starts_with("batch_") && out.stdout == format!("{new_id}\n"), "stdout is the new batch's id: {out:?}");
    assert!(out.stderr.contains(&id) && out.stderr.contains(new_id), "{out:?}");
    let created = api.batch(new_id).await;
    assert_eq!(created["metadata"], json!({"project": "x", "retry_of": id}), "{created}");
    let input = api.content(created["input_file_id"].as_str().unwrap()).await;
    let ids: Vec<String> = input.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()["custom_id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids, ["bad-400"], "--status narrows it as the API's status_codes do");
    api.wait_for(new_id, &["completed"], secs(30)).await;
    let (st, e) = api.post(&format!("/batches/{id}/retry"), &json!({"include": ["broken"]})).await;
    assert_eq!((st, e["error"]["param"].as_str()), (400, Some("include")), "{e}");
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_of_a_cancelled_batch_takes_exactly_its_cancelled_lines() {
    let m = mock(MockArgs::default()).await;
    let s = spawn_app(&config(&m.base_url(), "max_concurrency = 1\nmax_attempts = 1", ""));
    let api = s.api();
    // One line fails at once, one succeeds, then slow lines run one at a time: cancelled
    // once the failure is in, most slow lines never run.
    let mut lines = vec![chat_line("bad-400", "m", Some(json!({"status": 400}))), chat_line("ok", "m", None)];
    lines.extend((0..6).map(|i| chat_line(&format!("slow-{i}"), "m", Some(json!({"latency_ms": 700})))));
    let id = api.submit(&lines).await;
    eventually("the failing line's result", secs(20), || async { (api.batch(&id).await["request_counts"]["failed"].as_i64() >= Some(1)).then_some(()) }).await;
    let (st, b) = api.post(&format!("/batches/{id}/cancel"), &json!({})).await;
    assert_eq!(st, 200, "{b}");
    let done = api.wait_for(&id, &["cancelled"], secs(30)).await;
    let (out, err) = api.results(&done).await;
    let code_of = |e: &Value| e["error"]["code"].as_str().map(str::to_owned);
    let cancelled: Vec<String> =
        err.iter().filter(|e| code_of(e).as_deref() == Some("batch_cancelled")).map(|e| e["custom_id"].as_str().unwrap().to_string()).collect();
    assert!(!cancelled.is_empty() && !cancelled.contains(&"bad-400".to_string()), "slow lines never ran: {err:?}");
    assert!(err.iter().any(|e| e["custom_id"] == "bad-400" && code_of(e).as_deref() != Some("batch_cancelled")), "{err:?}");
    assert_eq!(out.len() + err.len(), lines.len(), "every line once");

    let (st, r) = api.post(&format!("/batches/{id}/retry"), &json!({"include": ["cancelled"]})).await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["metadata"]["retry_of"], id.as_str(), "{r}");
    let input = api.content(r["input_file_id"].as_str().unwrap()).await;
    let parsed: Vec<Value> = input.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let mut ids: Vec<String> = parsed.iter().map(|l| l["custom_id"].as_str().unwrap().to_string()).collect();
    let mut want = cancelled.clone();
    ids.sort();
    want.sort();
    assert_eq!(ids, want, "exactly the cancelled lines: not the failed one, not those that ran");
    for l in &parsed {
        let original = lines.iter().map(|o| serde_json::from_str::<Value>(o).unwrap()).find(|o| o["custom_id"] == l["custom_id"]).unwrap();
        assert_eq!(l["body"], original["body"], "the request is unchanged");
    }
    let retried = api.wait_for(r["id"].as_str().unwrap(), &["completed"], secs(30)).await;
    assert_eq!(retried["request_counts"]["total"].as_u64(), Some(cancelled.len() as u64), "{retried}");
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_cost_and_quotas() {
    let m = mock(MockArgs { latency_ms: 100, ..Default::default() }).await;
    let extra = "[[tenants]]\nname = \"q\"\napi_keys = [\"sk-q\"]\nmax_queued_requests = 25\n\n[prices.\"m\"]\ninput_per_million = 2.0\noutput_per_million = 8.0\nbatch_discount = 0.5";
    let s = spawn_app(&config(&m.base_url(), "max_concurrency = 1", extra));
    let api = s.api_with_key("sk-q");
    let id = api.submit(&chat_lines(20, "m")).await;
    api.wait_for(&id, &["in_progress"], secs(20)).await;

    // 20 queued; 10 more would go over 25.
    let f = api.upload(&chat_lines(10, "m")).await;
    let (st, e) = api.post("/batches", &json!({"input_file_id": f, "endpoint": "/v1/chat/completions", "completion_window": "24h"})).await;
    assert_eq!((st, e["error"]["code"].as_str(), e["error"]["type"].as_str()), (429, Some("quota_exceeded"), Some("rate_limit_error")), "{e}");
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(msg.contains("max_queued_requests = 25") && msg.contains("queued"), "says what is queued against which limit: {msg}");
    let (_, q) = api.get("/quota").await;
    assert_eq!(q["limits"]["max_queued_requests"], 25, "{q}");
    assert!(q["queued"]["requests"].as_i64().unwrap() <= 20 && q["queued"]["batches"] == 1, "{q}");
    assert!(q["rate"]["requests_per_second"].as_f64().is_some(), "{q}");

    let b = api.wait_for(&id, &["completed"], secs(30)).await;
    let u = &b["usage"];
    let want = (u["input_tokens"].as_f64().unwrap() * 2.0 + u["output_tokens"].as_f64().unwrap() * 8.0) / 1e6 * 0.5;
    assert!((b["cost"].as_f64().unwrap() - want).abs() < 1e-6, "cost at the configured price, half off: {b}");
    let (_, q) = api.get("/quota").await;
    assert_eq!((q["queued"]["requests"].as_i64(), q["seconds_until_room"].as_f64()), (Some(0), Some(0.0)), "{q}");

    let now = crate_now();
    let (st, usage) = api.get(&format!("/usage?start_time={}&group_by=model&bucket_width=1h", now - 7200)).await;
    assert_eq!(st, 200, "{usage}");
    let r = &usage["data"][0]["results"][0];
    assert_eq!((r["model"].as_str(), r["num_model_requests"].as_i64()), (Some("m"), Some(20)), "{usage}");
    assert_eq!(r["input_tokens"], u["input_tokens"]);
    assert!((r["cost"].as_f64().unwrap() - want).abs() < 1e-6, "{usage}");
    let (st, e) = api.get("/usage").await;
    assert_eq!((st, e["error"]["param"].as_str()), (400, Some("start_time")));
    let (st, _) = api.post("/batches", &json!({"input_file_id": f, "endpoint": "/v1/chat/completions", "completion_window": "24h"})).await;
    assert_eq!(st, 200, "room again once the queue drained");
    m.shutdown().await;
}

/// Lines the mock answers after `ms`, with custom_ids `{prefix}-{i}` (same sizes for one prefix length).
fn slow_lines(prefix: &str, n: usize, ms: u64) -> Vec<String> {
    (0..n).map(|i| chat_line(&format!("{prefix}-{i}"), "m", Some(json!({"latency_ms": ms})))).collect()
}

async fn create(api: &Api, file: &str) -> (u16, Value) {
    api.post("/batches", &json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "24h"})).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_sent_together_cannot_together_go_over_the_request_quota() {
    let m = mock(MockArgs::default()).await;
    let s = spawn_app(&config(&m.base_url(), "", "[[tenants]]\nname = \"qr\"\napi_keys = [\"sk-qr\"]\nmax_queued_requests = 5\n"));

    // Two creates of 3 lines sent together against a limit of 5. Whichever comes
    // second sees the first, still validating, holding its 3 lines: exactly one is created.
    let api = s.api_with_key("sk-qr");
    let (f1, f2) = (api.upload(&slow_lines("a", 3, 1500)).await, api.upload(&slow_lines("b", 3, 1500)).await);
    let (r1, r2) = tokio::join!(create(&api, &f1), create(&api, &f2));
    let (ok, refused): (Vec<_>, Vec<_>) = [r1, r2].into_iter().partition(|(st, _)| *st == 200);
    assert_eq!((ok.len(), refused.len()), (1, 1), "one fits, the other would go over: {ok:?} {refused:?}");
    let (st, e) = &refused[0];
    assert_eq!((*st, e["error"]["code"].as_str()), (429, Some("quota_exceeded")), "{e}");
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(msg.contains("has 3 requests queued") && msg.contains("adds about 3") && msg.contains("max_queued_requests = 5"), "{msg}");
    let first = ok[0].1["id"].as_str().unwrap().to_string();
    // At once after a create, whether its batch is still validating or running, its lines count.
    let (_, q) = api.get("/quota").await;
    assert_eq!((q["queued"]["batches"].as_i64(), q["queued"]["requests"].as_i64(), q["room"]["requests"].as_i64()), (Some(1), Some(3), Some(2)), "{q}");
    let (st, e) = create(&api, &f2).await;
    assert_eq!((st, e["error"]["code"].as_str()), (429, Some("quota_exceeded")), "a create right after is refused too: {e}");
    let small = api.upload(&slow_lines("c", 2, 0)).await;
    let (st, e) = create(&api, &small).await;
    assert_eq!(st, 200, "what still fits is created: {e}");
    api.wait_for(&first, &["completed"], secs(30)).await;
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_queued_tokens_refuses_a_create_and_shows_in_quota() {
    let m = mock(MockArgs::default()).await;
    let one_file_tokens = (jsonl(&slow_lines("a", 3, 1500)).len() / 4) as i64;
    let token_limit = one_file_tokens * 3 / 2;
    let extra = format!("[[tenants]]\nname = \"qt\"\napi_keys = [\"sk-qt\"]\nmax_queued_tokens = {token_limit}\n");
    let s = spawn_app(&config(&m.base_url(), "", &extra));

    // One file's estimated input tokens fit under the limit, a second does not.
    let tq = s.api_with_key("sk-qt");
    let (g1, g2) = (tq.upload(&slow_lines("a", 3, 1500)).await, tq.upload(&slow_lines("b", 3, 1500)).await);
    let (st, running) = create(&tq, &g1).await;
    assert_eq!(st, 200, "{running}");
    let (st, e) = create(&tq, &g2).await;
    assert_eq!((st, e["error"]["code"].as_str(), e["error"]["type"].as_str()), (429, Some("quota_exceeded"), Some("rate_limit_error")), "{e}");
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(msg.contains(&format!("max_queued_tokens = {token_limit}")) && msg.contains("estimated input tokens"), "{msg}");
    assert!(msg.contains(&format!("adds about {one_file_tokens}")), "the batch's tokens are its file's bytes / 4: {msg}");
    let (_, q) = tq.get("/quota").await;
    assert_eq!(q["limits"], json!({"max_queued_requests": null, "max_queued_tokens": token_limit}), "{q}");
    let queued = q["queued"]["tokens"].as_i64().unwrap();
    assert!(queued > 0 && queued <= one_file_tokens, "{q}");
    assert_eq!(q["room"]["tokens"].as_i64(), Some(token_limit - queued), "{q}");
    assert_eq!(q["room"]["requests"], Value::Null, "no request limit for this tenant: {q}");

    tq.wait_for(running["id"].as_str().unwrap(), &["completed"], secs(30)).await;
    let (_, q) = tq.get("/quota").await;
    assert_eq!(q["queued"]["tokens"].as_i64(), Some(0), "{q}");
    let (st, e) = create(&tq, &g2).await;
    assert_eq!(st, 200, "room again once the first finished: {e}");
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_watch_follows_the_stream_and_shows_a_stall() {
    let m = mock(MockArgs::default()).await;
    let s = spawn_app(&config(&m.base_url(), "", "").replace("[batches]", "[batches]\nstall_after_s = 1"));
    let api = s.api();
    // Two lines answer at once, one hangs for 4 s: the batch stalls, then ends.
    let lines = vec![chat_line("a", "m", None), chat_line("b", "m", None), chat_line("slow", "m", Some(json!({"latency_ms": 4000})))];
    let id = api.submit(&lines).await;
    let mut c = std::process::Command::new(BIN);
    c.args(["status", &id, "--watch", "--server", &s.url]);
    let out = finish(c, secs(60));
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("3/3 done, 0 failed"), "{out:?}");
    assert!(out.stderr.contains("STALLED: 1 requests in flight"), "the stall and its reason are shown: {}", out.stderr);

    // `batchd retry BATCH_ID` asks the server: nothing failed here, so it says so.
    let mut c = std::process::Command::new(BIN);
    c.args(["retry", &id, "--server", &s.url]);
    let out = finish(c, secs(30));
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("nothing to retry"), "{out:?}");
    m.shutdown().await;
}

// ---- issue #19: a shared world ----

/// What a tenant can see of the server while its batch runs — its progress, its Batch
/// object, its event stream, and `/metrics` — as text, read until it holds every one of
/// `markers` (or for at most `limit`).
async fn alice_sees(s: &Server, alice: &Api, id: &str, markers: &[&str], limit: Duration) -> String {
    let stop = tokio_util::sync::CancellationToken::new();
    let stream = {
        let (alice, stop) = (alice.clone(), stop.clone());
        tokio::spawn(async move {
            let resp = alice.request(reqwest::Method::GET, "/events?after=0").send().await.unwrap();
            tokio::select! {
                text = resp.text() => text.unwrap_or_default(),
                _ = stop.cancelled() => String::new(),
            }
        })
    };
    let mut seen = String::new();
    let t = Instant::now();
    while t.elapsed() < limit && !markers.iter().all(|m| seen.contains(m)) {
        seen += &alice.get(&format!("/batches/{id}/progress")).await.1.to_string();
        seen += &alice.batch(id).await.to_string();
        seen += &s.metrics().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    seen + &stream.await.unwrap()
}

/// An upstream that quotes the prompt in its errors (as proxies and custom servers do):
/// bob's text stays in bob's error file. Alice, whose batch runs on the same upstream
/// meanwhile, sees its last error and pause only as status and class — in her progress, her
/// Batch object, her event stream and stall reasons, `/metrics` — and no log line at info
/// level or above carries it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstreams_error_text_stays_with_the_line_that_caused_it() {
    const SECRET: &str = "bob-secret-prompt-7f3a";
    let m = mock(MockArgs::default()).await;
    let tenants = "[[tenants]]\nname = \"alice\"\napi_keys = [\"sk-alice\"]\n[[tenants]]\nname = \"bob\"\napi_keys = [\"sk-bob\"]";
    let cfg = config(&m.base_url(), "max_attempts = 2\nmax_concurrency = 4", tenants).replace("[batches]", "[batches]\nstall_after_s = 1");
    let s = spawn_app(&cfg);
    let (alice, bob) = (s.api_with_key("sk-alice"), s.api_with_key("sk-bob"));
    let echo = |status: u16| format!(r#"{{"error":{{"message":"upstream error {status} while processing prompt: {SECRET}","type":"server_error"}}}}"#);
    let mut lines: Vec<String> = (0..3).map(|i| chat_line(&format!("{SECRET}-{i}"), "m", Some(json!({"status": 500, "body_text": echo(500)})))).collect();
    // Four 429s with a retry-after: a cluster, which pauses the pool (one would be stray).
    lines.extend(
        (0..4).map(|i| chat_line(&format!("limited-{i}"), "m", Some(json!({"status": 429, "body_text": echo(429), "fail_times": 1, "retry_after_s": 3})))),
    );
    let bob_batch = bob.submit(&lines).await;
    let slow: Vec<String> = (0..4).map(|i| chat_line(&format!("a-{i}"), "m", Some(json!({"latency_ms": 2500})))).collect();
    let alice_batch = alice.submit(&slow).await;
    let (last_error, pause) = ("500 Internal Server Error (server error)", "429 Too Many Requests (rate limited) from upstream");
    let seen = alice_sees(&s, &alice, &alice_batch, &[last_error, pause], secs(20)).await;
    assert!(!seen.contains(SECRET), "bob's prompt reached alice: {}", &seen[seen.find(SECRET).unwrap().saturating_sub(300)..][..600]);
    assert!(seen.contains(last_error), "alice saw the upstream's last error, as status and class");
    assert!(seen.contains(pause), "and its pause");

    let b = bob.wait_for(&bob_batch, &["completed"], secs(60)).await;
    let (out, err) = bob.results(&b).await;
    assert_eq!((out.len(), err.len()), (4, 3), "{b}");
    for l in &err {
        let message = l["response"]["body"]["error"]["message"].as_str().unwrap();
        assert!(message.contains(SECRET), "bob's own error file keeps the whole text: {l}");
    }
    alice.wait_for(&alice_batch, &["completed"], secs(60)).await;
    let log = s.log();
    let leaks: Vec<&str> = log.lines().filter(|l| !l.contains("DEBUG") && !l.contains("TRACE") && l.contains(SECRET)).collect();
    assert!(leaks.is_empty(), "log lines at info or above quote the upstream's text: {leaks:?}");
}

/// A stream ends at its lifetime with a `stream.reconnect` event naming where to resume, and
/// a client that resumes there misses no event and sees none twice. A quiet stream is kept
/// alive within the idle timeout, so it lives to its lifetime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_end_at_their_lifetime_and_resume_without_a_gap() {
    let m = mock(MockArgs::default()).await;
    let cfg = config(&m.base_url(), "max_concurrency = 1", "[server]\nstream_lifetime_s = 3\nidle_timeout_s = 1.5");
    let s = spawn_app(&cfg);
    let api = s.api();
    let t = Instant::now();
    let quiet = read_stream(&api, "/events", None, secs(10)).await;
    let lived = t.elapsed();
    assert!(lived >= Duration::from_millis(2500) && lived < Duration::from_secs(5), "a quiet stream lived {lived:?}");
    assert_eq!(quiet.iter().map(|e| e.1.as_str()).collect::<Vec<_>>(), ["stream.reconnect"], "{quiet:?}");

    let lines: Vec<String> = (0..8).map(|i| chat_line(&format!("r-{i}"), "m", Some(json!({"latency_ms": 1000})))).collect();
    let id = api.submit(&lines).await;
    let mut got: Vec<(i64, String, Value)> = Vec::new();
    let mut cursor = None;
    let mut streams = 0;
    loop {
        // From the start of its history; a reconnect's Last-Event-ID takes over `after`.
        let part = read_stream(&api, &format!("/batches/{id}/events?after=0"), cursor, secs(10)).await;
        streams += 1;
        let Some(last) = part.last().cloned() else { break };
        let ended_by_life = last.1 == "stream.reconnect";
        if ended_by_life {
            assert_eq!(last.2["after"], last.0, "the reconnect event names its cursor: {last:?}");
        }
        cursor = Some(last.0);
        got.extend(part.into_iter().filter(|e| e.1 != "stream.reconnect"));
        if !ended_by_life {
            break;
        }
        assert!(streams < 20, "the batch never ended");
    }
    assert!(streams >= 2, "the batch outlived a stream ({streams} streams)");
    let all = read_stream(&api, &format!("/batches/{id}/events?after=0"), None, secs(10)).await;
    let ids = |v: &[(i64, String, Value)]| v.iter().map(|e| e.0).collect::<Vec<_>>();
    assert_eq!(ids(&got), ids(&all), "across {streams} streams: every event once, none missed");
    assert_eq!(got.last().map(|e| e.2["data"]["status"].clone()), Some(json!("completed")));
}

/// `batchd status --watch` follows a batch across streams that end at their lifetime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_watch_resumes_streams_that_end_at_their_lifetime() {
    let m = mock(MockArgs::default()).await;
    let s = spawn_app(&config(&m.base_url(), "max_concurrency = 1", "[server]\nstream_lifetime_s = 1"));
    let lines: Vec<String> = (0..3).map(|i| chat_line(&format!("w-{i}"), "m", Some(json!({"latency_ms": 1200})))).collect();
    let id = s.api().submit(&lines).await;
    let mut c = std::process::Command::new(BIN);
    c.args(["status", &id, "--watch", "--server", &s.url]);
    let out = finish(c, secs(60));
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("3/3 done, 0 failed"), "{out:?}");
}

/// A receiver that answers every POST with `answer` (a status line and headers), recording
/// each request's path; `hang`: never answers, holding the connection.
async fn receiver(answer: &'static str, hang: bool) -> (String, Arc<Mutex<Vec<(Instant, String)>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let seen: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = vec![0u8; 65536];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let path = String::from_utf8_lossy(&got).split_whitespace().nth(1).unwrap_or_default().to_string();
                log.lock().unwrap().push((Instant::now(), path));
                if hang {
                    tokio::time::sleep(secs(120)).await;
                }
                let _ = sock.write_all(format!("{answer}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").as_bytes()).await;
            });
        }
    });
    (url, seen)
}

fn webhook_tenant(name: &str, url: &str) -> String {
    format!("[[tenants]]\nname = \"{name}\"\napi_keys = [\"sk-{name}\"]\nwebhook_url = \"{url}\"\nwebhook_secret = \"whsec_c2VjcmV0LWtleS0xMjM0NTY=\"\n")
}

/// A receiver that redirects (`307 Location: http://127.0.0.1:…/internal-admin`) does not
/// make batchd POST the signed event there: the 3xx is a failed attempt, tried again on the
/// schedule, and the internal listener is never touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_never_follow_redirects() {
    let m = mock(MockArgs::default()).await;
    let (internal, touched) = receiver("HTTP/1.1 200 OK", false).await;
    let internal_admin = internal.replace("/hook", "/internal-admin");
    let redirect: &'static str = Box::leak(format!("HTTP/1.1 307 Temporary Redirect\r\nlocation: {internal_admin}").into_boxed_str());
    let (hook, hits) = receiver(redirect, false).await;
    let s = spawn_app(&config(&m.base_url(), "", &webhook_tenant("t", &hook)));
    let api = s.api_with_key("sk-t");
    let id = api.submit(&chat_lines(2, "m")).await;
    api.wait_for(&id, &["completed"], secs(30)).await;
    eventually("a second attempt, on the retry schedule", secs(20), || async { (hits.lock().unwrap().len() >= 2).then_some(()) }).await;
    // What is under test is that nothing happens: no POST reaches the redirect's target in
    // the half second after the second attempt either.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(touched.lock().unwrap().is_empty(), "the redirect was followed: {:?}", touched.lock().unwrap());
    let metrics = s.metrics().await;
    assert!(metrics.contains("batchd_webhook_deliveries_total{outcome=\"delivered\"} 0"), "a redirect is not a delivery:\n{metrics}");
    assert!(!metrics.contains("batchd_webhook_deliveries_total{outcome=\"retrying\"} 0"), "it is a failed attempt, retried");
}

/// One tenant's receiver hangs (each attempt waits the full 10 s): another tenant's webhook
/// still arrives within a second or two of its batch's end, not after the hanging round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_receiver_delays_only_its_own_webhooks() {
    let m = mock(MockArgs::default()).await;
    let (hanging, stuck) = receiver("HTTP/1.1 200 OK", true).await;
    let (fast, arrived) = receiver("HTTP/1.1 200 OK", false).await;
    let s = spawn_app(&config(&m.base_url(), "", &(webhook_tenant("slow", &hanging) + &webhook_tenant("quick", &fast))));
    let slow = s.api_with_key("sk-slow");
    for _ in 0..3 {
        let id = slow.submit(&chat_lines(1, "m")).await;
        slow.wait_for(&id, &["completed"], secs(30)).await;
    }
    eventually("the hanging receiver holds three attempts", secs(20), || async { (stuck.lock().unwrap().len() >= 3).then_some(()) }).await;
    let quick = s.api_with_key("sk-quick");
    let submitted = Instant::now();
    let id = quick.submit(&chat_lines(1, "m")).await;
    let at = eventually("the quick tenant's webhook", secs(30), || async { arrived.lock().unwrap().first().map(|a| a.0) }).await;
    let took = at.saturating_duration_since(submitted);
    assert_eq!(quick.batch(&id).await["status"], "completed");
    eprintln!("the quick tenant's webhook arrived {took:?} after its batch was submitted, with a hanging receiver");
    assert!(took < Duration::from_secs(3), "delayed {took:?} by another tenant's hanging receiver");
}
