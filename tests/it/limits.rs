//! Issue #11: batchd against upstreams whose limits are not in its config. The real
//! `batchd serve` against the in-process mock upstream playing a concurrency cap that answers
//! 429 (TGI), OpenAI's rate limiter with its headers, nginx's `limit_req`, an exhausted
//! quota, a shared GPU server with online users (standby), and slow lines that time out.
//! Each test asserts what a controller that hammers would get wrong: the share of calls
//! answered 429 in steady state, the throughput against what the upstream can serve, that
//! no line failed for being rate limited, and (standby) the online users' latency.

use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::{json, Value};

/// One reading of the mock's counters.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    requests: u64,
    ok: u64,
    limited: u64,
}

fn sample(m: &MockServer) -> Sample {
    let st = m.stats_with(Duration::from_millis(1), false);
    let get = |k: &str| st.by_status.get(k).copied().unwrap_or(0);
    Sample { at: Instant::now(), requests: st.requests, ok: get("200"), limited: get("429") }
}

/// What the upstream saw between the batch's first 10 % and last 10 % of answers.
#[derive(Debug)]
#[allow(dead_code)] // `calls` is for the failure messages
struct Steady {
    share_429: f64,
    ok_per_s: f64,
    calls: u64,
}

fn steady(samples: &[Sample], n: u64) -> Steady {
    let from = samples.iter().find(|s| s.ok >= n / 10).expect("a tenth of the lines were answered");
    let to = samples.iter().rev().find(|s| s.ok <= n * 9 / 10).expect("samples before the last tenth");
    let calls = to.requests - from.requests;
    Steady {
        share_429: (to.limited - from.limited) as f64 / calls.max(1) as f64,
        ok_per_s: (to.ok - from.ok) as f64 / (to.at - from.at).as_secs_f64().max(1e-3),
        calls,
    }
}

/// Submits `lines`, samples the mock every 50 ms until the batch is final; returns the
/// final batch, the samples, and the batch's `progress.upstreams` as last seen running.
async fn run_sampled(api: &Api, m: &MockServer, lines: &[String], timeout: Duration) -> (Value, Vec<Sample>, Value) {
    let id = api.submit(lines).await;
    let deadline = Instant::now() + timeout;
    let (mut samples, mut upstreams) = (Vec::new(), Value::Null);
    loop {
        samples.push(sample(m));
        let b = api.batch(&id).await;
        if b["status"] == "in_progress" {
            upstreams = b["progress"]["upstreams"].clone();
        }
        if ["completed", "failed", "expired", "cancelled"].contains(&b["status"].as_str().unwrap_or_default()) {
            samples.push(sample(m));
            return (b, samples, upstreams);
        }
        assert!(Instant::now() < deadline, "batch not done in {timeout:?}: {b}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn metrics(s: &Server) -> String {
    reqwest::get(format!("{}/metrics", s.url)).await.unwrap().text().await.unwrap()
}

/// The value of `name{upstream="up"}` in a Prometheus text.
fn gauge(text: &str, name: &str, up: &str) -> Option<f64> {
    let prefix = format!("{name}{{upstream=\"{up}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok())
}

/// The value of `name{upstream="up",reason="why"}` in a Prometheus text.
fn reason_gauge(text: &str, name: &str, up: &str, why: &str) -> Option<f64> {
    let prefix = format!("{name}{{upstream=\"{up}\",reason=\"{why}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok())
}

async fn set(m: &MockServer, patch: Value) {
    let r = reqwest::Client::new().post(format!("http://{}/config", m.addr())).json(&patch).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

// ---------------------------------------------------------------------------------------
// learning limits that are not configured
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrency_cap_answering_429_is_found_and_kept() {
    // The first case: 429 above 16 in flight (TGI's max_concurrent_requests),
    // max_concurrency 64. Before: 86 % of calls were 429, 0.6 of what the upstream serves.
    // 50 ms per answer rather than the 20 ms (bench/ runs that one, on a release
    // build). What "the upstream can serve" is measured at the same moment, on the same
    // busy machine: an identical upstream without the cap, driven by a client that was told
    // the limit (max_concurrency = 16).
    const N: u64 = 2000;
    let capped = mock(MockArgs { latency_ms: 50, capacity: 16, ..Default::default() }).await;
    let told = mock(MockArgs { latency_ms: 50, ..Default::default() }).await;
    let s = Server::start(&config(&capped.base_url(), "max_concurrency = 64", ""));
    let baseline = Server::start(&config(&told.base_url(), "max_concurrency = 16", ""));
    let lines = chat_lines(N as usize, "m");
    let (api, base_api) = (s.api(), baseline.api());
    let ((b, samples, _), (_, base_samples, _)) = tokio::join!(run_sampled(&api, &capped, &lines, secs(30)), run_sampled(&base_api, &told, &lines, secs(30)));
    let (out, _) = final_results(&api, &b, N as usize).await;
    let (st, base) = (steady(&samples, N), steady(&base_samples, N));
    let ratio = st.ok_per_s / base.ok_per_s;
    let metrics = metrics(&s).await;
    let window = gauge(&metrics, "batchd_upstream_window", "mock").unwrap();
    println!(
        "capacity 16: {st:?}; told the limit: {base:?}; ratio {ratio:.2} ({:.2} of the ideal 320 req/s); peak in flight {}; window {window}",
        st.ok_per_s / 320.0,
        capped.stats().peak_in_flight
    );
    assert_eq!(out.len() as u64, N, "no line failed for being rate limited");
    assert!(st.share_429 <= 0.05, "steady-state 429s are at most 5 % of calls: {st:?}");
    assert!(ratio >= 0.85, "throughput {ratio:.2} of what a client told the limit gets: {st:?} vs {base:?}");
    assert!((8.0..=20.0).contains(&window), "the window settles near the cap of 16: {window}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_rate_limit_headers_pace_the_pool_before_the_limit() {
    // The second case, faster: 2,400 rpm announced the way OpenAI does on every
    // answer, the bucket nearly empty at the start (someone else used the key), 429 with
    // retry-after-ms when empty; no rpm in the config. Before: 97 % 429, lines failed.
    const N: u64 = 300;
    let m = mock(MockArgs { latency_ms: 20, rpm: 2400.0, ..Default::default() }).await;
    set(&m, json!({"limit_start": 0.005})).await;
    let s = Server::start(&config(&m.base_url(), "max_concurrency = 64\nmax_attempts = 2", ""));
    let api = s.api();
    let (b, samples, upstreams) = run_sampled(&api, &m, &chat_lines(N as usize, "m"), secs(30)).await;
    let (out, _) = final_results(&api, &b, N as usize).await;
    let st = steady(&samples, N);
    let ratio = st.ok_per_s / 40.0;
    println!("rpm 2400 with headers: {st:?}, {ratio:.2} of 40 req/s; all 429s {}; upstreams {upstreams}", m.stats().by_status.get("429").unwrap_or(&0));
    assert_eq!(out.len() as u64, N, "no line failed for being rate limited (max_attempts = 2)");
    assert!(st.share_429 <= 0.05, "the headers are obeyed before the limit is hit: {st:?}");
    assert!(ratio >= 0.85, "throughput {ratio:.2} of the announced 40 req/s");
    let learned = upstreams[0]["learned_rpm"].as_f64().expect("the headers' rate is shown while running");
    assert!((2000.0..=2600.0).contains(&learned), "learned {learned} rpm from the headers of a 2,400 rpm limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_limit_req_without_retry_after_is_learned_and_no_line_gives_up() {
    // The third case: nginx `limit_req` of 20 r/s (no burst) answering 429 at once
    // with no Retry-After, max_concurrency 16, no rpm. Before: 361 of 500 lines failed
    // within 7 s. nginx counts whole milliseconds and refuses any request that comes sooner
    // than 50 ms after the last, so scheduling jitter alone causes 429s. The simulation in
    // `upstream::control` holds the 0.85 in steady state; here, a debug build on two
    // cores shared with two compilers (load average 3.5 to 4.6) measured 0.89 to 0.90 in three
    // runs, so 0.75 leaves room for a noisier machine while still failing a controller that
    // learns too low a rate (it was 0.6 before).
    const N: u64 = 200;
    let m = mock(MockArgs { latency_ms: 20, limit_rps: 20.0, ..Default::default() }).await;
    let s = Server::start(&config(&m.base_url(), "max_concurrency = 16", ""));
    let api = s.api();
    let (b, samples, upstreams) = run_sampled(&api, &m, &chat_lines(N as usize, "m"), secs(40)).await;
    let (out, _) = final_results(&api, &b, N as usize).await;
    let st = steady(&samples, N);
    let ratio = st.ok_per_s / 20.0;
    println!("nginx 20 r/s: {st:?}, {ratio:.2} of the limit; all statuses {:?}; upstreams {upstreams}", m.stats().by_status);
    assert_eq!(out.len() as u64, N, "a 429 with no header costs no attempt: every line succeeds");
    assert!(st.share_429 <= 0.05, "the learned rate keeps 429s rare: {st:?}");
    assert!(ratio >= 0.75, "throughput {ratio:.2} of the 20 req/s limit");
    let learned = upstreams[0]["learned_rpm"].as_f64().expect("a rate is learned from 429s with no header");
    assert!(learned <= 1320.0, "learned {learned} rpm for a 1,200 rpm limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_told_to_slow_down_forever_end_at_the_completion_window() {
    // A 429 that says "slow down" costs no attempt, so the completion window is what bounds
    // a line the upstream never serves: it ends there as `batch_expired`, like any line not
    // done, and is not sent after it.
    let m = mock(MockArgs::default()).await;
    let s = Server::start(&config(&m.base_url(), "max_attempts = 2", ""));
    let api = s.api();
    let mut lines: Vec<String> = (0..5).map(|i| chat_line(&format!("limited-{i}"), "m", Some(json!({"status": 429, "retry_after_s": 0.2})))).collect();
    lines.push(chat_line("served", "m", None));
    let f = api.upload(&lines).await;
    let t0 = Instant::now();
    let created = api.create_batch(&f, json!({"completion_window": "3s"})).await;
    let id = created["id"].as_str().unwrap().to_string();
    let b = api.wait_for(&id, &["expired", "completed", "failed", "cancelled"], secs(20)).await;
    let took = t0.elapsed();
    assert_eq!(b["status"], "expired", "{b}");
    assert!(took < secs(8), "ended at its 3 s window, not later: {took:?}");
    let (out, err) = final_results(&api, &b, 6).await;
    assert_eq!(out.len(), 1, "the line the upstream served is kept: {err:?}");
    assert_eq!(out[0]["custom_id"], "served");
    assert_eq!(err.len(), 5);
    let counts = m.stats_with(secs(60), true).request_id_counts.unwrap();
    for l in &err {
        assert_eq!(l["error"]["code"], "batch_expired", "{l}");
        assert!(l["response"].is_null(), "{l}");
        let sent = counts.get(l["id"].as_str().unwrap()).copied().unwrap_or(0);
        assert!(sent > 2, "429s cost no attempt: sent {sent} times with max_attempts = 2 before the window ended: {l}");
    }
    let mr = &m;
    eventually("in-flight calls end at expiry", secs(3), || async move { (mr.stats().in_flight == 0).then_some(()) }).await;
    let before = m.stats().requests;
    // Under test: nothing happens — no call in the half second after expiry.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(m.stats().requests, before, "nothing is sent after expiry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_down_429s_cost_no_attempt_but_500s_do() {
    let m = mock(MockArgs::default()).await;
    let s = Server::start(&config(&m.base_url(), "max_attempts = 2", ""));
    let api = s.api();
    let mut lines: Vec<String> =
        (0..5).map(|i| chat_line(&format!("slow-{i}"), "m", Some(json!({"status": 429, "fail_times": 6, "retry_after_s": 0.05})))).collect();
    lines.push(chat_line("broken", "m", Some(json!({"status": 500, "fail_times": 6}))));
    let id = api.submit(&lines).await;
    let b = api.wait_for(&id, &["completed"], secs(30)).await;
    let (out, err) = final_results(&api, &b, 6).await;
    let counts = m.stats_with(secs(60), true).request_id_counts.unwrap();
    assert_eq!(out.len(), 5, "six 429s in a row with max_attempts = 2, and still a success: {err:?} {counts:?}");
    assert!(out.iter().all(|l| counts[l["id"].as_str().unwrap()] == 7), "each slow-down line was sent 7 times: {counts:?}");
    assert_eq!(err.len(), 1);
    assert_eq!(counts[err[0]["id"].as_str().unwrap()], 2, "a 500 still uses up max_attempts = 2");
}

// ---------------------------------------------------------------------------------------
// issue #20: shapes the mock did not make before
// ---------------------------------------------------------------------------------------

/// Lines per second of a batch from first seen in progress to completed.
async fn lines_per_second(api: &Api, m: &MockServer, lines: &[String]) -> (f64, Value) {
    let (b, samples, _) = run_sampled(api, m, lines, secs(120)).await;
    let (first, last) = (samples.iter().find(|s| s.requests > 0).expect("calls were made"), samples.last().unwrap());
    (last.ok as f64 / (last.at - first.at).as_secs_f64().max(1e-3), b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stray_429s_cost_only_their_own_lines() {
    // 5 % of answers 429 at random with retry-after-ms 500, whatever the load (a proxy over
    // several deployments, one of them limited). Before, each paused the whole pool: the
    // issue's 3,000-line batch had not finished after 300 s. Run beside a clean twin at the
    // same moment, so that the busy machine weighs on both alike.
    const N: usize = 1500;
    let stray = mock(MockArgs { latency_ms: 50, rate_429: 0.05, retry_after_s: 0.5, seed: Some(7), ..Default::default() }).await;
    let clean = mock(MockArgs { latency_ms: 50, ..Default::default() }).await;
    let s = Server::start(&config(&stray.base_url(), "max_concurrency = 64\nmax_attempts = 1", ""));
    let c = Server::start(&config(&clean.base_url(), "max_concurrency = 64", ""));
    let lines = chat_lines(N, "m");
    let (api, capi) = (s.api(), c.api());
    let ((rate, b), (clean_rate, _)) = tokio::join!(lines_per_second(&api, &stray, &lines), lines_per_second(&capi, &clean, &lines));
    let (out, err) = final_results(&api, &b, N).await;
    let st = stray.stats();
    println!("stray 429s: {rate:.0} lines/s against {clean_rate:.0} clean ({:.2}); statuses {:?}", rate / clean_rate, st.by_status);
    assert_eq!((out.len(), err.len()), (N, 0), "a 429 costs no attempt, even with max_attempts = 1");
    assert!(st.by_status.get("429").copied().unwrap_or(0) >= 30, "the mock did refuse about 5 %: {:?}", st.by_status);
    // The figure, 0.7 of clean, is the benchmark's (0.83 in `bench/run.sh --only limits`);
    // here two servers share two cores with the rest of the suite (0.68–0.9 seen). Before, every
    // stray 429 paused the pool: 5–8 lines/s against ~290, a ratio near 0.02.
    assert!(rate >= 0.5 * clean_rate, "the batch keeps {:.2} of its clean throughput", rate / clean_rate);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_second_limiter_is_paced_to_the_second() {
    // 2,400 rpm held as a bucket of 40 refilled at 40/s: every answer announces the minute's
    // limit and a reset until the bucket is full; a 429 carries retry-after-ms until the
    // next token. Before (1,200 rpm, 600 lines): 97 % of calls refused.
    const N: u64 = 300;
    let m = mock(MockArgs { latency_ms: 20, rpm: 2400.0, limit_period_s: 1.0, ..Default::default() }).await;
    let s = Server::start(&config(&m.base_url(), "max_concurrency = 64\nmax_attempts = 2", ""));
    let api = s.api();
    let (b, samples, upstreams) = run_sampled(&api, &m, &chat_lines(N as usize, "m"), secs(60)).await;
    let (out, _) = final_results(&api, &b, N as usize).await;
    let st = steady(&samples, N);
    let all = m.stats();
    let refused = all.by_status.get("429").copied().unwrap_or(0) as f64 / all.requests as f64;
    println!("per-second 2,400 rpm: {st:?}, {:.2} of 40 req/s, {refused:.3} of all calls refused; upstreams {upstreams}", st.ok_per_s / 40.0);
    assert_eq!(out.len() as u64, N, "no line failed");
    assert!(refused <= 0.10, "at most 10 % of calls refused: {refused:.3}");
    assert!(st.ok_per_s / 40.0 >= 0.8, "throughput {:.2} of the limit", st.ok_per_s / 40.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_of_503_cost_no_attempt() {
    // nginx answers 503 for limit_req and limit_conn by default: with max_attempts = 2, 5–126
    // of 500 lines failed before. Lines told 503 twice (a third attempt with max_attempts =
    // 2), and a limit_req of 20 r/s answering 503, all end served.
    let m = mock(MockArgs { limit_rps: 20.0, refusal_status: 503, latency_ms: 20, ..Default::default() }).await;
    let s = Server::start(&config(&m.base_url(), "max_concurrency = 16\nmax_attempts = 2", ""));
    let api = s.api();
    let mut lines = chat_lines(60, "m");
    lines.extend((0..3).map(|i| chat_line(&format!("busy-{i}"), "m", Some(json!({"status": 503, "fail_times": 2})))));
    let id = api.submit(&lines).await;
    let b = api.wait_for(&id, &["completed"], secs(60)).await;
    let (out, err) = final_results(&api, &b, lines.len()).await;
    let st = m.stats();
    println!("503s: statuses {:?}", st.by_status);
    assert!(st.by_status.get("503").copied().unwrap_or(0) >= 3, "the mock refused with 503: {:?}", st.by_status);
    assert_eq!((out.len(), err.len()), (lines.len(), 0), "no line failed for a 503: {err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_base_url_answering_404_is_a_warning_at_start_and_on_the_upstream() {
    // infinity-emb serves /embeddings, not /v1/embeddings: a base_url with the wrong prefix
    // answers 404 to everything, and the batch used to end `completed` with no word anywhere.
    let m = mock(MockArgs::default()).await;
    let wrong = format!("http://{}/v2", m.addr());
    let s = Server::start(&config(&wrong, "", ""));
    let sr = &s;
    eventually("the start-up look warns of the 404", secs(10), || async move { sr.log().contains("answered 404").then_some(()) }).await;
    let api = s.api();
    let id = api.submit(&chat_lines(3, "m")).await;
    let b = api.wait_for(&id, &["completed", "failed"], secs(20)).await;
    let (_, err) = final_results(&api, &b, 3).await;
    assert!(err.iter().all(|l| l["response"]["status_code"] == 404), "{err:?}");
    let states = reqwest::get(format!("{}/metrics", s.url)).await.unwrap().text().await.unwrap();
    assert!(states.contains("batchd_upstream"), "metrics still served");
    let log = s.log();
    assert!(log.contains("base_url is likely wrong"), "the warning says what to fix: {}", &log[log.len().saturating_sub(2000)..]);
}

// ---------------------------------------------------------------------------------------
// quota, several upstreams, what is shown
// ---------------------------------------------------------------------------------------

fn upstream(name: &str, url: &str, rest: &str) -> String {
    format!("[[upstreams]]\nname = \"{name}\"\nbase_url = \"{url}\"\nmodels = [\"m\"]\n{rest}\n\n")
}

const WINDOWS: &str = "[batches]\ncompletion_windows = [\"24h\"]\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_out_of_quota_is_paused_and_its_lines_go_to_the_other() {
    let broke = mock(MockArgs::default()).await;
    set(&broke, json!({"quota_exhausted": true})).await;
    let ok = mock(MockArgs { latency_ms: 20, ..Default::default() }).await;
    let cfg = upstream("broke", &broke.base_url(), "max_concurrency = 4\nmax_attempts = 1")
        + &upstream("ok", &ok.base_url(), "max_concurrency = 4\nmax_attempts = 1")
        + WINDOWS;
    let s = Server::start(&cfg);
    let api = s.api();
    let (b, _, upstreams) = run_sampled(&api, &ok, &chat_lines(100, "m"), secs(30)).await;
    let (out, _) = final_results(&api, &b, 100).await;
    println!("quota: broke saw {} requests; upstreams {upstreams}", broke.stats().requests);
    assert_eq!(out.len(), 100, "insufficient_quota burns no line, even with max_attempts = 1");
    assert!(broke.stats().requests <= 8, "the broke upstream is paused after its first answers: {}", broke.stats().requests);
    let shown = upstreams.as_array().unwrap().iter().find(|u| u["name"] == "broke").expect("both pools are shown").clone();
    assert_eq!(shown["paused"], true, "{shown}");
    assert_eq!(shown["pause_reason"], "quota_exhausted", "{shown}");
    // Status and class only: every tenant on the upstream reads this (issue #19).
    assert!(shown["pause_detail"].as_str().unwrap().starts_with("429 Too Many Requests (out of quota); trying again in"), "{shown}");
    let text = metrics(&s).await;
    assert_eq!(gauge(&text, "batchd_upstream_paused", "broke"), Some(1.0), "{text}");
    assert_eq!(gauge(&text, "batchd_upstream_paused", "ok"), Some(0.0));
    assert_eq!(reason_gauge(&text, "batchd_upstream_pause_reason", "broke", "quota_exhausted"), Some(1.0), "{text}");
    assert_eq!(reason_gauge(&text, "batchd_upstream_pause_reason", "broke", "rate_limited"), Some(0.0), "{text}");
    assert_eq!(reason_gauge(&text, "batchd_upstream_pause_reason", "ok", "quota_exhausted"), Some(0.0), "{text}");
    let left = gauge(&text, "batchd_upstream_pause_seconds_remaining", "broke").unwrap();
    assert!(left > 15.0 && left <= 30.0, "a quota pause lasts 30 s: {left} s left");
    assert_eq!(gauge(&text, "batchd_upstream_pause_seconds_remaining", "ok"), Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_shows_its_reason_and_time_left_in_metrics() {
    // Four lines answered 503 once (overloads), one answered 429 with a 2 s retry-after
    // once: while the pool waits out the 429, /metrics says why and for how long, and
    // counts the refusals of the last minute by kind.
    let m = mock(MockArgs::default()).await;
    let s = Server::start(&config(&m.base_url(), "max_attempts = 3", ""));
    let api = s.api();
    let mut lines: Vec<String> = (0..4).map(|i| chat_line(&format!("busy-{i}"), "m", Some(json!({"status": 503, "fail_times": 1})))).collect();
    lines.push(chat_line("limited", "m", Some(json!({"status": 429, "fail_times": 1, "retry_after_s": 2.0}))));
    let id = api.submit(&lines).await;
    let sr = &s;
    let text = eventually("the upstream shows as paused for a rate limit", secs(10), || async move {
        let t = metrics(sr).await;
        (reason_gauge(&t, "batchd_upstream_pause_reason", "mock", "rate_limited") == Some(1.0)).then_some(t)
    })
    .await;
    assert_eq!(gauge(&text, "batchd_upstream_paused", "mock"), Some(1.0), "{text}");
    for other in ["overloaded", "quota_exhausted", "unreachable"] {
        assert_eq!(reason_gauge(&text, "batchd_upstream_pause_reason", "mock", other), Some(0.0), "one reason at a time: {text}");
    }
    let left = gauge(&text, "batchd_upstream_pause_seconds_remaining", "mock").unwrap();
    assert!(left > 0.0 && left <= 2.0, "the 429's retry-after of 2 s: {left} s left");
    assert_eq!(gauge(&text, "batchd_upstream_rate_limited_last_minute", "mock"), Some(1.0), "{text}");
    assert!(gauge(&text, "batchd_upstream_overloaded_last_minute", "mock").unwrap() >= 1.0, "{text}");

    let b = api.wait_for(&id, &["completed"], secs(20)).await;
    let (out, _) = final_results(&api, &b, 5).await;
    assert_eq!(out.len(), 5, "every line succeeds on its second attempt");
    let text = metrics(&s).await;
    assert_eq!(gauge(&text, "batchd_upstream_overloaded_last_minute", "mock"), Some(4.0), "each 503 counts once: {text}");
    assert_eq!(gauge(&text, "batchd_upstream_rate_limited_last_minute", "mock"), Some(1.0), "{text}");
    assert_eq!(gauge(&text, "batchd_upstream_paused", "mock"), Some(0.0), "{text}");
    assert_eq!(reason_gauge(&text, "batchd_upstream_pause_reason", "mock", "rate_limited"), Some(0.0), "no reason once the pause is over: {text}");
    assert_eq!(gauge(&text, "batchd_upstream_pause_seconds_remaining", "mock"), Some(0.0), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_quota_alone_the_batch_waits_and_status_and_run_say_why() {
    let m = mock(MockArgs::default()).await;
    set(&m, json!({"quota_exhausted": true})).await;
    let s = Server::start(&config(&m.base_url(), "max_concurrency = 4\nmax_attempts = 1", ""));
    let api = s.api();
    let id = api.submit(&chat_lines(20, "m")).await;
    let b = eventually("the upstream shows as paused", secs(10), || {
        let api = api.clone();
        let id = id.clone();
        async move {
            let b = api.batch(&id).await;
            (b["progress"]["upstreams"][0]["pause_reason"] == "quota_exhausted").then_some(b)
        }
    })
    .await;
    // Under test: nothing moves during the pause — no line burnt, no call, for half a second.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let b2 = api.batch(&id).await;
    assert_eq!(b2["status"], "in_progress", "{b2}");
    assert_eq!(b2["request_counts"]["failed"], 0, "no line is burnt while the quota is out: {b2}");
    assert!(m.stats().requests <= 4, "one window of requests, then the pause: {}", m.stats().requests);
    assert!(b["progress"]["upstreams"][0]["paused_until_ms"].as_u64().is_some());

    let status = finish(
        {
            let mut c = std::process::Command::new(BIN);
            c.args(["status", &id, "--server", &s.url]).env_remove("BATCHD_API_KEY");
            c
        },
        secs(20),
    );
    println!("{}", status.stdout);
    assert_eq!(status.code, 0, "{status:?}");
    assert!(status.stdout.contains("upstream mock (throughput)"), "batchd status shows the upstream: {}", status.stdout);
    assert!(status.stdout.contains("paused (429 Too Many Requests (out of quota); trying again in"), "{}", status.stdout);

    // `batchd run` says it in its progress line.
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, jsonl(&chat_lines(3, "m"))).unwrap();
    let mut c = std::process::Command::new(BIN);
    c.current_dir(dir.path()).args(["run", input.to_str().unwrap(), "--upstream", &m.base_url(), "--concurrency", "2"]);
    for k in ["BATCHD_UPSTREAM", "BATCHD_CONFIG", "OPENAI_BASE_URL", "OPENAI_API_KEY"] {
        c.env_remove(k);
    }
    let mut child = c.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let stderr = Tail::new(child.stderr.take().unwrap());
    let _stdout = drain(child.stdout.take().unwrap());
    let paused = "paused: default out of quota, ";
    eventually("batchd run's progress line says it is paused", secs(20), || async { stderr.text().contains(paused).then_some(()) }).await;
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let code = wait_code(&mut child, secs(20));
    let err = stderr.join();
    println!("{err}");
    assert_eq!(code, 130, "interrupted: {err}");
    assert!(err.contains("paused: default out of quota, "), "the progress line says why nothing moves: {err}");
    let _ = api.post(&format!("/batches/{id}/cancel"), &json!({})).await;
}

// ---------------------------------------------------------------------------------------
// timeouts
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uniformly_slow_lines_time_out_without_collapsing_the_window() {
    // The issue: 20 lines of 3 s each, timeout_s = 1, 3 attempts, max_concurrency = 20 took
    // 27 s to fail, the window collapsing to near 1.
    let m = mock(MockArgs::default()).await;
    let s = Server::start(&config(&m.base_url(), "timeout_s = 1\nmax_attempts = 3\nmax_concurrency = 20", ""));
    let api = s.api();
    let lines: Vec<String> = (0..20).map(|i| chat_line(&format!("slow-{i}"), "m", Some(json!({"latency_ms": 3000})))).collect();
    let t0 = Instant::now();
    let id = api.submit(&lines).await;
    let b = api.wait_for(&id, &["completed"], secs(30)).await;
    let took = t0.elapsed();
    let (_, err) = final_results(&api, &b, 20).await;
    let window = gauge(&metrics(&s).await, "batchd_upstream_window", "mock").unwrap();
    let counts = m.stats_with(secs(60), true).request_id_counts.unwrap();
    println!("20 slow lines failed in {took:?}; window {window}; peak in flight {}", m.stats().peak_in_flight);
    assert!(err.iter().all(|l| l["error"]["code"] == "request_timeout"), "{err:?}");
    assert!(counts.values().all(|&n| n == 3), "three attempts each: {counts:?}");
    assert!(took < secs(10), "three rounds of 1 s timeouts plus back-off, not 27 s: {took:?}");
    assert!(window >= 10.0, "a timeout shrinks the window gently (10 %, once per round trip), not to near 1: {window}");
}

// ---------------------------------------------------------------------------------------
// standby
// ---------------------------------------------------------------------------------------

/// Closed-loop online clients: each sends a chat request, waits for the answer, thinks
/// 20–80 ms, and goes again, until `stop`; returns (when answered, latency in seconds).
fn online_clients(base: &str, n: usize, stop: tokio_util::sync::CancellationToken) -> tokio::task::JoinHandle<Vec<(Instant, f64)>> {
    let base = base.to_string();
    tokio::spawn(async move {
        let http = reqwest::Client::new();
        let all = (0..n).map(|c| {
            let (http, base, stop) = (http.clone(), base.clone(), stop.clone());
            async move {
                let mut lat = Vec::new();
                let mut i = 0u64;
                while !stop.is_cancelled() {
                    let t = Instant::now();
                    let body = json!({"model": "online", "messages": [{"role": "user", "content": "hi"}]});
                    let ok = http.post(format!("{base}/chat/completions")).json(&body).send().await.is_ok_and(|r| r.status() == 200);
                    if ok {
                        lat.push((Instant::now(), t.elapsed().as_secs_f64()));
                    }
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(20 + (i * 37 + c as u64 * 13) % 60)).await;
                }
                lat
            }
        });
        futures::future::join_all(all).await.concat()
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_yields_to_online_users_and_still_gets_most_of_the_server() {
    // The budget: 16 slots, 100 ms per request, 4 online clients: their median
    // latency stays ≤ 2 × unloaded while the batch gets ≥ 0.6 of the capacity (160 req/s).
    let m = mock(MockArgs { latency_ms: 100, slots: 16, ..Default::default() }).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let alone = online_clients(&m.base_url(), 4, stop.clone());
    // A measurement: the online clients' latency alone, over 1.2 s.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    stop.cancel();
    let unloaded = median(alone.await.unwrap().into_iter().map(|x| x.1).collect());

    let s = Server::start(&config(&m.base_url(), "mode = \"standby\"\nmax_concurrency = 64", ""));
    let api = s.api();
    let stop = tokio_util::sync::CancellationToken::new();
    let online = online_clients(&m.base_url(), 4, stop.clone());
    let id = api.submit(&chat_lines(3000, "m")).await;
    api.wait_for(&id, &["in_progress"], secs(20)).await;
    // Standby's control loop settles (no one signal says it has: part of the measurement).
    tokio::time::sleep(secs(2)).await;
    // The measured span: 5 s once standby has found its level.
    let (b0, t0) = (api.batch(&id).await, Instant::now());
    tokio::time::sleep(secs(5)).await;
    let (b1, t1) = (api.batch(&id).await, Instant::now());
    stop.cancel();
    let lat = online.await.unwrap();
    let _ = api.post(&format!("/batches/{id}/cancel"), &json!({})).await;
    let done = |b: &Value| b["request_counts"]["completed"].as_u64().unwrap_or(0) + b["request_counts"]["failed"].as_u64().unwrap_or(0);
    let share = (done(&b1) - done(&b0)) as f64 / (t1 - t0).as_secs_f64() / 160.0;
    let loaded = median(lat.into_iter().filter(|x| x.0 >= t0 && x.0 <= t1).map(|x| x.1).collect());
    let ratio = loaded / unloaded;
    println!("standby: unloaded online median {:.0} ms, loaded {:.0} ms ({ratio:.2}×); batch {share:.2} of capacity", unloaded * 1000.0, loaded * 1000.0);
    assert!(unloaded < 0.15, "test premise: the online clients alone see about 100 ms ({unloaded})");
    assert!(ratio <= 2.0, "online median latency {ratio:.2} × unloaded");
    assert!(share >= 0.6, "the batch gets {share:.2} of the upstream's capacity");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_backs_off_while_the_upstream_reports_a_queue() {
    // vLLM's `vllm:num_requests_waiting` at `metrics_url`: while others' requests queue there,
    // standby keeps to one request in flight; once the queue is gone it takes capacity back.
    let m = mock(MockArgs { latency_ms: 50, ..Default::default() }).await;
    let metrics_url = format!("http://{}/metrics", m.addr());
    let s = Server::start(&config(&m.base_url(), &format!("mode = \"standby\"\nmax_concurrency = 32\nmetrics_url = \"{metrics_url}\""), ""));
    let api = s.api();
    let id = api.submit(&chat_lines(4000, "m")).await;
    api.wait_for(&id, &["in_progress"], secs(20)).await;
    let mr = &m;
    eventually("standby grows while latency is flat", secs(10), || async move { (mr.stats().in_flight >= 12).then_some(()) }).await;
    set(&m, json!({"extra_waiting": 6})).await;
    let t0 = Instant::now();
    let sr = &s;
    eventually("standby backs off to one request in flight", secs(10), || async move {
        (gauge(&metrics(sr).await, "batchd_upstream_window", "mock")? <= 1.5).then_some(())
    })
    .await;
    let backed_off = t0.elapsed();
    // Requests sent before the window shrank finish within a few latencies.
    eventually("the calls sent before the window shrank end", secs(5), || async move { (mr.stats().in_flight <= 2).then_some(()) }).await;
    let mut queued_peak = 0;
    for _ in 0..20 {
        queued_peak = queued_peak.max(m.stats().in_flight);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    set(&m, json!({"extra_waiting": 0})).await;
    let back = eventually("capacity comes back once the queue is gone", secs(10), || async move {
        let n = mr.stats().in_flight;
        (n >= 12).then_some(n)
    })
    .await;
    let _ = api.post(&format!("/batches/{id}/cancel"), &json!({})).await;
    println!("standby with a reported queue: window 1 after {backed_off:?}, then peak in flight {queued_peak}; {back} after");
    assert!(queued_peak <= 2, "while the queue lasts standby stays at one request in flight: {queued_peak}");
}

// ---------------------------------------------------------------------------------------
// friction: aliases, request ids, compression
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alias_alone_routes_proxy_request_ids_are_kept_and_compressed_answers_are_read() {
    let m = mock(MockArgs::default()).await;
    let cfg = format!("[[upstreams]]\nname = \"local\"\nbase_url = \"{}\"\naliases = {{ fast = \"llama-3.1-8b\" }}\n\n{WINDOWS}", m.base_url());
    let s = Server::start(&cfg);
    let api = s.api();
    let lines = vec![
        chat_line("plain", "fast", None),
        chat_line("litellm", "fast", Some(json!({"id_header": "x-litellm-call-id"}))),
        chat_line("anthropic", "fast", Some(json!({"id_header": "request-id"}))),
        chat_line("gzip", "fast", Some(json!({"encoding": "gzip"}))),
        chat_line("zstd", "fast", Some(json!({"encoding": "zstd"}))),
    ];
    let id = api.submit(&lines).await;
    let b = api.wait_for(&id, &["completed", "failed"], secs(20)).await;
    assert_eq!(b["status"], "completed", "an alias routes without its target in models: {b}");
    let (out, _) = final_results(&api, &b, 5).await;
    for l in &out {
        assert_eq!(l["response"]["body"]["model"], "llama-3.1-8b", "{l}");
        assert_eq!(l["response"]["request_id"], l["id"], "the upstream's id under any of its headers: {l}");
        assert!(l["response"]["body"]["choices"][0]["message"]["content"].as_str().unwrap().starts_with("echo: hello from"), "{l}");
    }
    assert_eq!(m.stats().compressed_answers, 2, "batchd asked for gzip and zstd and read both");

    let f = api.upload(&[chat_line("x", "llama-3.1-8b", None)]).await;
    let b = api.create_batch(&f, json!({})).await;
    let b = api.wait_for(b["id"].as_str().unwrap(), &["failed", "completed"], secs(20)).await;
    assert_eq!(b["status"], "failed", "the alias's target is not routable by its real id: {b}");
}
