//! Prefix-aware dispatch (issue 26) end to end: the real `batchd serve` against the mock's
//! engine simulator (`--engine-sim`), whose prefix cache is small enough that the order of
//! lines decides what it computes. A shuffled batch of shared documents must reach the
//! server grouped by document (its answers report the prompt tokens the cache served), with
//! one output line per input line, across work units, a `kill -9`, and two nodes.

use std::time::Duration;

use crate::common::*;
use batchd::mock::sim::SimArgs;
use serde_json::{json, Value};

const DOCS: usize = 8;
const PER_DOC: usize = 12;
const LINES: usize = DOCS * PER_DOC;

/// `DOCS` documents of about 400 tokens × `PER_DOC` questions, shuffled (a fixed permutation):
/// no two neighbours in the file share a document, as in a file grouped by another key.
fn shuffled_lines() -> Vec<String> {
    let docs: Vec<String> = (0..DOCS).map(|d| format!("Document {d}: the quarterly report of division {d}. ").repeat(28)).collect();
    (0..LINES)
        .map(|i| {
            let j = (i * 37) % LINES;
            let (d, q) = (j % DOCS, j / DOCS);
            let body = json!({"model": "m", "max_tokens": 4,
                "messages": [{"role": "system", "content": docs[d]}, {"role": "user", "content": format!("Question {q} about document {d}?")}]});
            json!({"custom_id": format!("d{d}-q{q}"), "method": "POST", "url": "/v1/chat/completions", "body": body}).to_string()
        })
        .collect()
}

/// A simulated server that holds about two documents' worth of KV cache (80 blocks of 16).
async fn sim_mock(speedup: f64) -> MockServer {
    let sim = SimArgs { engine_sim: true, sim_kv_blocks: 80, sim_speedup: speedup, ..SimArgs::default() };
    mock(MockArgs { sim, ..Default::default() }).await
}

/// Units of 10 lines, 2 lines in flight; `prefix_order` as given.
fn sim_config(base_url: &str, prefix_order: bool) -> String {
    config(base_url, &format!("max_concurrency = 2\nprefix_order = {prefix_order}"), "[engine]\nunit_lines = 10\n")
}

/// The share of prompt tokens the server's prefix cache served, from the answers.
fn hit_rate(out: &[Value]) -> f64 {
    let usage = |l: &Value, k: &str| l["response"]["body"]["usage"].pointer(k).and_then(Value::as_u64).unwrap_or(0);
    let cached: u64 = out.iter().map(|l| usage(l, "/prompt_tokens_details/cached_tokens")).sum();
    let prompt: u64 = out.iter().map(|l| usage(l, "/prompt_tokens")).sum();
    cached as f64 / prompt.max(1) as f64
}

/// Runs the shuffled batch to the end on one server; its output and the server's log.
async fn run_once(prefix_order: bool) -> (Vec<Value>, String) {
    let m = sim_mock(20.0).await;
    let s = Server::start(&sim_config(&m.base_url(), prefix_order));
    let api = s.api();
    let id = api.submit(&shuffled_lines()).await;
    let b = api.wait_for(&id, &["completed", "failed"], secs(120)).await;
    let (out, err) = final_results(&api, &b, LINES).await;
    assert!(err.is_empty(), "{err:?}");
    assert_eq!(m.stats().unique_request_ids, LINES as u64);
    // The Batch object shows the prompt tokens the server's cache served (its hit rate).
    let usage = &b["usage"];
    let cached = usage["input_tokens_details"]["cached_tokens"].as_f64().unwrap_or(0.0);
    let input = usage["input_tokens"].as_f64().unwrap_or(0.0);
    assert!((cached / input - hit_rate(&out)).abs() < 0.01, "the batch's usage carries the server's cache hits: {usage}");
    (out, s.log())
}

/// In prefix order the simulated server computes each document about once; in file order it
/// keeps evicting them. The output is the same set of lines either way, ids unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shuffled_batch_reaches_the_server_grouped_by_shared_prefix() {
    let (ordered, log) = run_once(true).await;
    let (file_order, plain_log) = run_once(false).await;
    let (hit, miss) = (hit_rate(&ordered), hit_rate(&file_order));
    println!("prefix-cache hit rate: {hit:.2} in prefix order, {miss:.2} in file order");
    assert!(log.contains("lines ordered by shared prefix"), "the validator ordered the batch");
    assert!(!plain_log.contains("lines ordered by shared prefix"), "prefix_order = false keeps file order");
    assert!(hit >= 0.7, "grouped lines hit the cache: {hit:.2}");
    assert!(hit >= miss + 0.3, "prefix order must beat file order by far: {hit:.2} vs {miss:.2}");
    let ids = |out: &[Value]| {
        let mut v: Vec<String> = out.iter().map(|l| l["custom_id"].as_str().unwrap().to_string()).collect();
        v.sort();
        v
    };
    assert_eq!(ids(&ordered), ids(&file_order), "the same custom_ids, one line each");
    for l in &ordered {
        let cid = l["custom_id"].as_str().unwrap();
        let asked = l["response"]["body"]["choices"][0]["message"]["content"].as_str().unwrap_or_default();
        assert!(!asked.is_empty() && cid.starts_with('d'), "{l}");
    }
}

/// A batch that shares nothing keeps its file-order units (no order file is written).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_shares_nothing_keeps_file_order() {
    let m = sim_mock(50.0).await;
    let s = Server::start(&sim_config(&m.base_url(), true));
    let api = s.api();
    let id = api.submit(&chat_lines(40, "m")).await;
    let b = api.wait_for(&id, &["completed"], secs(60)).await;
    final_results(&api, &b, 40).await;
    assert!(!s.log().contains("lines ordered by shared prefix"));
    assert!(!blob_tree(&s.data).iter().any(|p| p.contains("orders")), "no order file");
}

/// `kill -9` in the middle of an ordered batch: after the restart the units resume where their
/// durable results end, still in prefix order, and every line is answered exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_mid_batch_keeps_the_grouping_and_exactly_once() {
    let m = sim_mock(2.0).await;
    let mut s = Server::start(&sim_config(&m.base_url(), true));
    let api = s.api();
    let id = api.submit(&shuffled_lines()).await;
    eventually("a third of the lines are durable", secs(120), || {
        let (api, id) = (api.clone(), id.clone());
        async move { (done(&api.batch(&id).await) >= LINES as u64 / 3).then_some(()) }
    })
    .await;
    let durable = done(&api.batch(&id).await);
    s.kill9();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent = m.stats().unique_request_ids;
    s.spawn();
    let api = s.api();
    let b = api.wait_for(&id, &["completed"], secs(120)).await;
    let (out, err) = final_results(&api, &b, LINES).await;
    assert!(err.is_empty(), "{err:?}");
    let stats = m.stats();
    assert_eq!(stats.unique_request_ids, LINES as u64, "every line reached the server");
    let repeated = stats.duplicate_request_ids;
    assert!(repeated <= sent - durable, "only calls without a durable result at the kill are repeated: {repeated} > {sent} - {durable}");
    let hit = hit_rate(&out);
    println!("hit rate across a kill -9: {hit:.2}");
    assert!(hit >= 0.6, "the grouping holds across the restart: {hit:.2}");
    assert!(!blob_tree(&s.data).iter().any(|p| p.contains("orders")), "the order file is gone once the batch is final");
}

/// Two nodes on one PostgreSQL database and blob store share an ordered batch's units: each
/// reads the order file, the grouping holds, every line is answered exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_an_ordered_batch() {
    let Some(shared) = crate::cluster::Shared::new("two_nodes_share_an_ordered_batch").await else { return };
    let m = sim_mock(5.0).await;
    let cfg = sim_config(&m.base_url(), true);
    let (a, b) = (shared.node(&cfg), shared.node(&cfg));
    // Both nodes have joined (each takes half of the limit) before the batch exists.
    let db = sqlx::PgPool::connect(&shared.db.url).await.unwrap();
    crate::common::eventually("both nodes live", secs(20), || {
        let db = db.clone();
        async move { (crate::cluster::live_nodes(&db).await.len() == 2).then_some(()) }
    })
    .await;
    let id = a.api().submit(&shuffled_lines()).await;
    let done_batch = b.api().wait_for(&id, &["completed"], secs(120)).await;
    let (out, err) = final_results(&b.api(), &done_batch, LINES).await;
    assert!(err.is_empty(), "{err:?}");
    assert_eq!(m.stats().unique_request_ids, LINES as u64);
    let sent = (crate::cluster::node_requests(&a).await, crate::cluster::node_requests(&b).await);
    println!("hit rate on two nodes: {:.2}; requests sent by each node: {sent:?}", hit_rate(&out));
    assert!(sent.0 > 0 && sent.1 > 0, "both nodes fed units: {sent:?}");
    assert!(hit_rate(&out) >= 0.6, "the grouping holds across nodes: {:.2}", hit_rate(&out));
}

/// Lines with nothing in common, ~190 prompt tokens and 16 output tokens each: the prompt
/// needs 12 blocks of 16, the answer a 13th, so a cache filled at admission preempts.
fn kv_lines(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let own = format!("Unique passage {i:05} of the archive. ").repeat(24);
            let body = json!({"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": own[..760].to_string()}]});
            json!({"custom_id": format!("k{i}"), "method": "POST", "url": "/v1/chat/completions", "body": body}).to_string()
        })
        .collect()
}

/// The simulator's preemption counter, from its `/metrics`.
async fn sim_preemptions(metrics_url: &str) -> f64 {
    let text = reqwest::get(metrics_url).await.unwrap().text().await.unwrap();
    batchd::upstream::EngineMetrics::parse(&text).preemptions.expect("the simulator reports preemptions")
}

/// One run of `KV_LINES` on a fresh simulator (160 blocks: about 12 such requests), window
/// 48; the window follows the server's figures when `follow`. The server's preemptions, and
/// the window reasons and engine figures `/progress` and `/metrics` showed on the way.
async fn kv_run(follow: bool) -> (f64, Vec<Value>, String) {
    const KV_LINES: usize = 240;
    let sim = SimArgs { engine_sim: true, sim_kv_blocks: 160, sim_no_prefix_caching: true, sim_speedup: 2.0, ..SimArgs::default() };
    let m = mock(MockArgs { sim, ..Default::default() }).await;
    let metrics_url = format!("http://{}/metrics", m.addr());
    let follows = if follow { format!("metrics_url = \"{metrics_url}\"\n") } else { String::new() };
    let s = Server::start(&config(&m.base_url(), &format!("max_concurrency = 48\nprefix_order = false\n{follows}"), ""));
    let api = s.api();
    let id = api.submit(&kv_lines(KV_LINES)).await;
    let (mut seen, mut scraped) = (Vec::new(), String::new());
    let root = api.base.trim_end_matches("/v1").to_string();
    loop {
        let b = api.batch(&id).await;
        if b["status"] == "in_progress" {
            seen.push(b["progress"]["upstreams"][0].clone());
            let text = reqwest::get(format!("{root}/metrics")).await.unwrap().text().await.unwrap();
            if text.contains("reason=\"kv_cache\"} 1") {
                scraped = text;
            }
        }
        if ["completed", "failed"].contains(&b["status"].as_str().unwrap_or_default()) {
            let (out, err) = final_results(&api, &b, KV_LINES).await;
            assert_exactly_once(&out, &err, KV_LINES);
            assert!(err.is_empty(), "{err:?}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (sim_preemptions(&metrics_url).await, seen, scraped)
}

/// With `metrics_url`, the window keeps the simulated server's KV cache below the point where
/// it preempts; the same window fixed at 48 makes it preempt. `/progress` and `/metrics` show
/// why the window is what it is, and what the server reports of itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_that_follows_the_kv_cache_does_not_preempt() {
    let (fixed, fixed_seen, _) = kv_run(false).await;
    let (followed, seen, scraped) = kv_run(true).await;
    println!("preemptions: {fixed} with a fixed window of 48, {followed} with the window following the server's figures");
    assert!(fixed > 0.0, "an oversize fixed window preempts on this server");
    // None at all (0–3 before the cap stopped growing a request past the point it aims at).
    assert_eq!(followed, 0.0, "the window that follows the KV cache never makes the server preempt ({fixed} with the fixed window)");
    assert!(fixed_seen.iter().all(|u| u["window_reason"] != "kv_cache" && u["engine"].is_null()), "no figures, no cap: {fixed_seen:?}");
    let capped: Vec<&Value> = seen.iter().filter(|u| u["window_reason"] == "kv_cache").collect();
    assert!(!capped.is_empty(), "progress shows the KV cache holding the window: {seen:?}");
    assert!(capped.iter().any(|u| u["window"].as_f64().unwrap() < 20.0), "held near the ~12 the cache holds: {capped:?}");
    let engine = seen.iter().rev().find(|u| u["engine"].is_object()).expect("progress shows the server's own figures");
    assert!(engine["engine"]["preemptions"].as_f64().is_some_and(|p| p <= followed), "{engine}");
    assert!(engine["engine"]["kv_cache_usage"].as_f64().is_some(), "{engine}");
    for want in ["batchd_upstream_window_reason{upstream=\"mock\",reason=\"kv_cache\"} 1", "batchd_upstream_preemptions{upstream=\"mock\"} "] {
        assert!(scraped.contains(want), "missing {want:?} in\n{scraped}");
    }
}
