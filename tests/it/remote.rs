//! Batch-kind upstreams (`kind = "openai-batch"` and `kind = "anthropic-batch"`): a second
//! `batchd serve` (its own data dir, the mock upstream behind it) plays the hosted provider, a
//! real implementation of the OpenAI Batch + Files API and of Anthropic's Message Batches API.
//! Shards are small (`max_lines = 100`) so a batch spans many remote batches. Every test
//! counts the remote batches on the remote itself: none is ever created twice (by its tag:
//! the metadata tag at OpenAI's API, the custom_ids' shard tag in the results at
//! Anthropic's), and every custom_id comes back exactly once locally. The scenarios that
//! both kinds share run once per kind.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;

/// The provider: a batchd over the mock, each line tried once there (so its failures show in
/// its error file), windows short enough to expire.
fn provider(m: &MockServer, extra_upstream: &str) -> Server {
    Server::start(&config(&m.base_url(), &format!("max_attempts = 1\n{extra_upstream}"), ""))
}

/// The API the provider is spoken to in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    OpenAi,
    Anthropic,
}

impl Kind {
    /// The local upstream's settings for the kind (chat lines carry no `max_tokens`, which
    /// Anthropic's API requires: the upstream's default fills it in).
    fn upstream(self) -> &'static str {
        match self {
            Kind::OpenAi => "kind = \"openai-batch\"\n",
            Kind::Anthropic => "kind = \"anthropic-batch\"\ndefault_max_tokens = 64\n",
        }
    }

    /// Every batch the provider holds, newest first, in one shape: `id`, `status` (OpenAI's
    /// words), `request_counts` `total` and `completed`, and `tag`, what ties it to the local
    /// record (the metadata tag, or the shard tag its results' custom_ids start with; `None`
    /// for an Anthropic batch still running).
    async fn remote_batches(self, api: &Api) -> Vec<Value> {
        let (path, cursor) = match self {
            Kind::OpenAi => ("/batches", "after"),
            Kind::Anthropic => ("/messages/batches", "after_id"),
        };
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let q = after.as_ref().map_or(String::new(), |a| format!("&{cursor}={a}"));
            let (st, page) = api.get(&format!("{path}?limit=100{q}")).await;
            assert_eq!(st, 200, "{page}");
            let items = page["data"].as_array().unwrap().clone();
            after = items.last().and_then(|b| b["id"].as_str()).map(str::to_owned);
            for b in items {
                all.push(match self {
                    Kind::OpenAi => json!({"id": b["id"], "status": b["status"], "request_counts": b["request_counts"], "tag": b["metadata"]["batchd_key"]}),
                    Kind::Anthropic => anthropic_shape(api, &b).await,
                });
            }
            if !page["has_more"].as_bool().unwrap_or(false) {
                return all;
            }
        }
    }
}

/// A Message Batch in the shape [`Kind::remote_batches`] gives.
async fn anthropic_shape(api: &Api, b: &Value) -> Value {
    let c = &b["request_counts"];
    let n = |k: &str| c[k].as_u64().unwrap();
    let total = n("processing") + n("succeeded") + n("errored") + n("canceled") + n("expired");
    let ended = b["processing_status"] == "ended";
    let status = match () {
        _ if !ended => "in_progress",
        _ if !b["cancel_initiated_at"].is_null() => "cancelled",
        _ if n("expired") > 0 => "expired",
        _ => "completed",
    };
    let tag = if ended {
        let id = b["id"].as_str().unwrap();
        let text = api.request(reqwest::Method::GET, &format!("/messages/batches/{id}/results")).send().await.unwrap().text().await.unwrap();
        let tags: std::collections::HashSet<String> =
            text.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()["custom_id"].as_str().unwrap().split("-L").next().unwrap().to_string()).collect();
        assert_eq!(tags.len(), 1, "every request of a remote batch carries its shard's tag: {tags:?}");
        json!(tags.into_iter().next())
    } else {
        Value::Null
    };
    json!({"id": b["id"], "status": status, "request_counts": {"total": total, "completed": n("succeeded")}, "tag": tag})
}

/// A local batchd whose only upstream is the batch API at `base` (`…/v1`).
fn local_config_of(kind: Kind, base: &str, extra: &str) -> String {
    let shard = if extra.contains("max_lines") { "" } else { "max_lines = 100\n" };
    config(base, &format!("{}{shard}poll_interval_s = 0.1\n{extra}", kind.upstream()), "")
}

fn local_config(base: &str, extra: &str) -> String {
    local_config_of(Kind::OpenAi, base, extra)
}

fn local_of(kind: Kind, base: &str, extra: &str) -> Server {
    Server::start(&local_config_of(kind, base, extra))
}

/// Every batch the provider holds at OpenAI's API, newest first.
async fn remote_batches(api: &Api) -> Vec<Value> {
    Kind::OpenAi.remote_batches(api).await
}

/// No two remote batches carry the same tag, and each ended one carries one.
fn assert_no_duplicate_remote(batches: &[Value]) {
    let mut keys: Vec<&str> =
        batches.iter().filter(|b| b["status"] != "in_progress").map(|b| b["tag"].as_str().expect("every remote batch is tagged")).collect();
    keys.sort();
    let n = keys.len();
    keys.dedup();
    assert_eq!(keys.len(), n, "a remote batch was created twice: {keys:?}");
}

/// Each output line answers its own request: the mock echoes the line's own text.
fn assert_answers_match(out: &[Value]) {
    for l in out {
        let cid = l["custom_id"].as_str().unwrap();
        let text = l["response"]["body"]["choices"][0]["message"]["content"].as_str().unwrap_or_default();
        assert!(text.contains(&format!("hello from {cid}")), "line {cid} got another line's answer: {text:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_spans_many_remote_batches_and_comes_back_whole() {
    spans_many_remote_batches(Kind::OpenAi, 1000).await;
}

/// Chat lines go to Anthropic's Message Batches API as Messages requests, inline, and come
/// back chat completions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_a_batch_spans_many_message_batches_and_comes_back_as_chat_completions() {
    spans_many_remote_batches(Kind::Anthropic, 300).await;
}

async fn spans_many_remote_batches(kind: Kind, n: usize) {
    let m = mock(MockArgs::default()).await;
    let p = provider(&m, "");
    let prices = "[prices.\"m\"]\ninput_per_million = 2.0\noutput_per_million = 8.0\nbatch_discount = 0.5\n";
    let s = Server::start(&config(&format!("{}/v1", p.url), &format!("{}max_lines = 100\npoll_interval_s = 0.1", kind.upstream()), prices));
    let api = s.api();
    let id = api.submit(&chat_lines(n, "m")).await;
    let b = api.wait_for(&id, &["completed"], secs(120)).await;
    let (out, err) = final_results(&api, &b, n).await;
    assert_eq!((out.len(), err.len()), (n, 0));
    assert_answers_match(&out);
    assert!(out.iter().all(|l| l["response"]["body"]["object"] == "chat.completion"), "answers in the lines' own API: {:?}", out[0]);
    let u = &b["usage"];
    let (input, output) = (u["input_tokens"].as_f64().unwrap(), u["output_tokens"].as_f64().unwrap());
    assert!(input > 0.0 && output > 0.0, "usage comes back with the results: {b}");
    let cost = b["cost"].as_f64().expect("a priced batch has a cost");
    assert!((cost - (input * 2.0 + output * 8.0) / 1e6 * 0.5).abs() < 1e-5, "the batch price: {cost} for {u}");
    let shards = b["remote_batches"].as_array().expect("the batch lists its remote batches");
    assert_eq!(shards.len(), n.div_ceil(100), "{shards:?}");
    let (shard_cost, shard_output): (f64, f64) =
        shards.iter().fold((0.0, 0.0), |(c, o), r| (c + r["cost"].as_f64().unwrap(), o + r["output_tokens"].as_f64().unwrap()));
    assert!(shards.iter().all(|r| r["state"] == "collected" && r["lines"] == 100 && r["output_tokens"].as_i64() > Some(0)), "{shards:?}");
    assert!((shard_cost - cost).abs() < 1e-5 && shard_output == output, "each remote batch's cost at the batch price, summing to the batch's: {shards:?}");
    let remote = kind.remote_batches(&p.api()).await;
    assert_eq!(remote.len(), n.div_ceil(100), "{n} lines in ⌈{n}/100⌉ remote batches");
    assert_no_duplicate_remote(&remote);
    assert!(remote.iter().all(|r| r["request_counts"]["total"] == 100 && r["status"] == "completed"), "{remote:?}");
    assert_eq!(m.stats().requests, n as u64, "the provider's upstream saw each line once");
    assert!(remote.iter().all(|r| !r["id"].as_str().unwrap().contains(&id[6..])), "remote ids are the provider's own");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_after_the_remote_create_adopts_the_batch_instead_of_creating_it_again() {
    kill9_after_the_create(Kind::OpenAi).await;
}

/// Anthropic's API has no metadata and no idempotency key: the restart finds the Message
/// Batch it created by the shard tag its requests' custom_ids carry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_kill9_after_the_create_adopts_the_message_batch_by_its_custom_ids() {
    kill9_after_the_create(Kind::Anthropic).await;
}

async fn kill9_after_the_create(kind: Kind) {
    let m = mock(MockArgs { latency_ms: 20, ..Default::default() }).await;
    let p = provider(&m, "");
    let cfg = local_config_of(kind, &format!("{}/v1", p.url), "");
    let mut s = Server::start_with(&cfg, &[], &[("BATCHD_FAILPOINT".into(), "remote-created-unrecorded".into())]);
    let api = s.api();
    let id = api.submit(&chat_lines(300, "m")).await;
    // The failpoint kills the local batchd (SIGKILL) right after the first create answered.
    eventually("the local batchd to die at the failpoint", secs(30), || async {
        api.request(reqwest::Method::GET, "/batches").send().await.is_err().then_some(())
    })
    .await;
    let before = kind.remote_batches(&p.api()).await;
    assert!(!before.is_empty(), "the remote holds the batch created before the kill");
    s.env.clear();
    s.restart();
    let api = s.api();
    let b = api.wait_for(&id, &["completed"], secs(120)).await;
    let (out, _) = final_results(&api, &b, 300).await;
    assert_eq!(out.len(), 300);
    assert_answers_match(&out);
    let remote = kind.remote_batches(&p.api()).await;
    assert_no_duplicate_remote(&remote);
    assert_eq!(remote.len(), 3, "300 lines, 3 remote batches, none created twice: {remote:?}");
    assert_eq!(m.stats().requests, 300, "no line paid twice at the provider");
    assert!(s.log().contains("adopted a remote batch created before a restart"), "the restart reconciled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_propagates_and_keeps_finished_work() {
    cancel_mid_run(Kind::OpenAi).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_cancel_propagates_and_keeps_finished_work() {
    cancel_mid_run(Kind::Anthropic).await;
}

async fn cancel_mid_run(kind: Kind) {
    let m = mock(MockArgs { latency_ms: 50, ..Default::default() }).await;
    let p = provider(&m, "max_concurrency = 2");
    let s = local_of(kind, &format!("{}/v1", p.url), "max_lines = 50");
    let api = s.api();
    let id = api.submit(&chat_lines(250, "m")).await;
    let premote = p.api();
    // 22 calls seen with 2 in flight at most: 20 answered.
    eventually("the remote to finish some lines", secs(60), || async { (m.stats().requests >= 22).then_some(()) }).await;
    let (st, _) = api.post(&format!("/batches/{id}/cancel"), &json!({})).await;
    assert_eq!(st, 200);
    let b = api.wait_for(&id, &["cancelled"], secs(60)).await;
    let (out, err) = api.results(&b).await;
    assert_exactly_once(&out, &err, 250);
    assert!(err.iter().all(|l| l["error"]["code"] == "batch_cancelled"), "{err:?}");
    let remote = kind.remote_batches(&premote).await;
    assert_no_duplicate_remote(&remote);
    assert_eq!(remote.len(), 5, "250 lines in remote batches of 50: {remote:?}");
    assert!(remote.iter().all(|r| r["status"] == "cancelled" || r["status"] == "completed"), "the cancel reached the remote: {remote:?}");
    assert!(remote.iter().any(|r| r["status"] == "cancelled"), "{remote:?}");
    let finished: u64 = remote.iter().map(|r| r["request_counts"]["completed"].as_u64().unwrap()).sum();
    assert_eq!(out.len() as u64, finished, "every line the remote finished is kept, and no other");
    assert!(out.len() >= 20 && out.len() < 250, "{}", out.len());
    let requests = m.stats().requests;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(m.stats().requests, requests, "nothing runs at the remote after the cancel");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_line_failures_go_into_a_follow_up_remote_batch() {
    failures_follow_up(Kind::OpenAi).await;
}

/// Anthropic's results give an error's type, not its status: `api_error` (a 500 or 502 at
/// the provider's upstream) is retried, `invalid_request_error` (a 400) is final.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_remote_line_failures_go_into_a_follow_up_message_batch() {
    failures_follow_up(Kind::Anthropic).await;
}

async fn failures_follow_up(kind: Kind) {
    let m = mock(MockArgs::default()).await;
    let p = provider(&m, "");
    let s = local_of(kind, &format!("{}/v1", p.url), "");
    let api = s.api();
    let lines: Vec<String> = (0..200)
        .map(|i| {
            let mock = match i % 10 {
                0 => Some(json!({"fail_times": 1, "by_body": true, "status": 500})),
                5 => Some(json!({"fail_times": 1, "by_body": true, "status": 502})),
                7 => Some(json!({"status": 400})),
                _ => None,
            };
            chat_line(&format!("req-{i}"), "m", mock)
        })
        .collect();
    let id = api.submit(&lines).await;
    let b = api.wait_for(&id, &["completed"], secs(120)).await;
    let (out, err) = final_results(&api, &b, 200).await;
    assert_eq!((out.len(), err.len()), (180, 20), "the 500s and 502s succeed on the follow-up; a 400 is final");
    assert!(err.iter().all(|l| l["response"]["status_code"] == 400), "{err:?}");
    assert!(err.iter().all(|l| l["response"]["body"]["error"]["message"].is_string()), "errors in OpenAI's envelope: {:?}", err[0]);
    assert_answers_match(&out);
    let remote = kind.remote_batches(&p.api()).await;
    assert_no_duplicate_remote(&remote);
    assert_eq!(remote.len(), 3, "two remote batches, then one follow-up of the 40 failed lines: {remote:?}");
    assert_eq!(remote[0]["request_counts"]["total"], 40, "the follow-up holds only the retryable failures");
}

/// A proxy in front of the provider that can answer 500 to polls, lose the answers of
/// creates it did pass on (the remote created the batch; the local batchd sees a 500), and
/// follow the provider to a new port after a restart.
#[derive(Clone)]
struct Proxy {
    url: String,
    target: Arc<Mutex<String>>,
    fail_polls: Arc<AtomicBool>,
    polls_failed: Arc<AtomicU64>,
    /// Creates whose answer is still to be lost.
    lose_creates: Arc<AtomicU64>,
}

async fn proxy(target: &str) -> Proxy {
    use axum::extract::{Request, State};
    use axum::response::IntoResponse;
    fn boom() -> axum::response::Response {
        (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "{\"error\":{\"message\":\"boom\"}}").into_response()
    }
    async fn forward(State((px, http)): State<(Proxy, reqwest::Client)>, req: Request) -> axum::response::Response {
        let path = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
        if px.fail_polls.load(Ordering::SeqCst) && req.method() == axum::http::Method::GET && path.starts_with("/v1/batches/") {
            px.polls_failed.fetch_add(1, Ordering::SeqCst);
            return boom();
        }
        let create = req.method() == axum::http::Method::POST && (path == "/v1/batches" || path == "/v1/messages/batches");
        let url = format!("{}{path}", px.target.lock().unwrap());
        let (parts, body) = req.into_parts();
        let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
        let mut r = http.request(parts.method.clone(), url).body(body);
        for (k, v) in parts.headers.iter().filter(|(k, _)| *k != "host") {
            r = r.header(k, v);
        }
        match r.send().await {
            Ok(_) if create && px.lose_creates.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() => boom(),
            Ok(resp) => {
                let status = resp.status();
                let ct = resp.headers().get("content-type").cloned();
                let bytes = resp.bytes().await.unwrap_or_default();
                let mut out = (status, bytes).into_response();
                if let Some(ct) = ct {
                    out.headers_mut().insert("content-type", ct);
                }
                out
            }
            Err(_) => axum::http::StatusCode::BAD_GATEWAY.into_response(),
        }
    }
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let px = Proxy {
        url: format!("http://{}", l.local_addr().unwrap()),
        target: Arc::new(Mutex::new(target.to_string())),
        fail_polls: Default::default(),
        polls_failed: Default::default(),
        lose_creates: Default::default(),
    };
    let app = axum::Router::new().fallback(forward).with_state((px.clone(), reqwest::Client::new()));
    tokio::spawn(async move { axum::serve(l, app).await });
    px
}

/// Anthropic's create has no idempotency key: a create that reached the remote but whose
/// answer was lost (a 500 here) is looked for before it is sent again, and adopted once the
/// batch it made has ended and shows its tag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_a_create_whose_answer_was_lost_is_adopted_not_made_twice() {
    let m = mock(MockArgs { latency_ms: 10, ..Default::default() }).await;
    let p = provider(&m, "max_concurrency = 4");
    let px = proxy(&p.url).await;
    px.lose_creates.store(2, Ordering::SeqCst);
    let s = local_of(Kind::Anthropic, &format!("{}/v1", px.url), "");
    let api = s.api();
    let id = api.submit(&chat_lines(300, "m")).await;
    let b = api.wait_for(&id, &["completed"], secs(120)).await;
    let (out, err) = final_results(&api, &b, 300).await;
    assert_eq!((out.len(), err.len()), (300, 0));
    assert_answers_match(&out);
    assert_eq!(px.lose_creates.load(Ordering::SeqCst), 0, "two create answers were lost");
    let remote = Kind::Anthropic.remote_batches(&p.api()).await;
    assert_no_duplicate_remote(&remote);
    assert_eq!(remote.len(), 3, "300 lines, 3 Message Batches, none created twice: {remote:?}");
    assert_eq!(m.stats().requests, 300, "no line paid twice at the provider");
    assert_eq!(s.log().matches("adopted a remote batch created before a restart").count(), 2, "both lost creates were found again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polls_answered_500_and_a_remote_killed_mid_run_are_waited_out() {
    let m = mock(MockArgs { latency_ms: 10, ..Default::default() }).await;
    let mut p = provider(&m, "max_concurrency = 4");
    let px = proxy(&p.url).await;
    let s = local_of(Kind::OpenAi, &format!("{}/v1", px.url), "");
    let api = s.api();
    let id = api.submit(&chat_lines(400, "m")).await;
    eventually("the remote batches to be created", secs(30), || async { (remote_batches(&p.api()).await.len() == 4).then_some(()) }).await;
    px.fail_polls.store(true, Ordering::SeqCst);
    eventually("polls to fail", secs(30), || async { (px.polls_failed.load(Ordering::SeqCst) >= 5).then_some(()) }).await;
    p.kill9();
    tokio::time::sleep(Duration::from_millis(500)).await;
    p.spawn();
    *px.target.lock().unwrap() = p.url.clone();
    px.fail_polls.store(false, Ordering::SeqCst);
    let b = api.wait_for(&id, &["completed"], secs(180)).await;
    let (out, _) = final_results(&api, &b, 400).await;
    assert_eq!(out.len(), 400);
    assert_answers_match(&out);
    let remote = remote_batches(&p.api()).await;
    assert_no_duplicate_remote(&remote);
    assert_eq!(remote.len(), 4, "polling failures create nothing new: {remote:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_remote_batch_is_followed_up_within_the_window() {
    expired_remote_followed_up(Kind::OpenAi).await;
}

/// The window reaches a batchd provider as its `completion_window` extension; the expired
/// requests come back as `expired` results and run in a follow-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_an_expired_message_batch_is_followed_up_within_the_window() {
    expired_remote_followed_up(Kind::Anthropic).await;
}

async fn expired_remote_followed_up(kind: Kind) {
    let m = mock(MockArgs { latency_ms: 300, ..Default::default() }).await;
    let p = provider(&m, "max_concurrency = 2");
    let s = local_of(kind, &format!("{}/v1", p.url), "completion_window = \"3s\"");
    let api = s.api();
    let id = api.submit(&chat_lines(60, "m")).await;
    let expired = eventually("the first remote batch to expire", secs(60), || async {
        kind.remote_batches(&p.api()).await.into_iter().find(|r| r["status"] == "expired")
    })
    .await;
    let ran = expired["request_counts"]["completed"].as_u64().unwrap();
    assert!(ran < 60, "the remote ran only part of it before its window closed: {expired}");
    reqwest::Client::new().post(format!("{}/config", m.base_url().trim_end_matches("/v1"))).json(&json!({"latency_ms": 0})).send().await.unwrap();
    let b = api.wait_for(&id, &["completed"], secs(60)).await;
    let (out, err) = final_results(&api, &b, 60).await;
    assert_eq!((out.len(), err.len()), (60, 0), "the expired lines ran in a follow-up");
    assert_answers_match(&out);
    let remote = kind.remote_batches(&p.api()).await;
    assert_no_duplicate_remote(&remote);
    assert!(remote.len() >= 2, "{remote:?}");
}

/// A local batchd whose batch upstream `hosted` (the provider at `provider`, its remote
/// batches given `remote_window`) names `online` (at `online`) its `fallback`; batches may
/// also be created with `user_window`; `m` is priced, at half for batches.
fn fallback_config(provider: &str, online: &str, remote_window: &str, user_window: &str) -> String {
    fallback_config_with(provider, online, remote_window, user_window, "")
}

/// [`fallback_config`] with `online_extra` in the fallback upstream's settings.
fn fallback_config_with(provider: &str, online: &str, remote_window: &str, user_window: &str, online_extra: &str) -> String {
    format!(
        "[[upstreams]]\nname = \"hosted\"\nbase_url = \"{provider}/v1\"\nmodels = [\"m\"]\nkind = \"openai-batch\"\nmax_lines = 100\npoll_interval_s = 0.1\n\
         completion_window = \"{remote_window}\"\nfallback = \"online\"\n\n[[upstreams]]\nname = \"online\"\nbase_url = \"{online}\"\nmodels = [\"m\"]\n{online_extra}\n\
         [batches]\ncompletion_windows = [\"24h\", \"{user_window}\"]\n\n[prices.\"m\"]\ninput_per_million = 2.0\noutput_per_million = 8.0\nbatch_discount = 0.5\n"
    )
}

/// `fallback = "online"`: what an expired remote batch left unfinished runs online at the
/// fallback upstream (a second mock, to count it) instead of in a follow-up remote batch, and
/// the batch's cost prices those lines in full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_remote_batch_falls_back_to_an_online_upstream_at_full_price() {
    let m = mock(MockArgs { latency_ms: 300, ..Default::default() }).await;
    let online = mock(MockArgs::default()).await;
    let p = provider(&m, "max_concurrency = 2");
    let s = Server::start(&fallback_config(&p.url, &online.base_url(), "3s", "3s"));
    let api = s.api();
    let id = api.submit(&chat_lines(60, "m")).await;
    let b = api.wait_for(&id, &["completed"], secs(90)).await;
    let (out, err) = final_results(&api, &b, 60).await;
    assert_eq!((out.len(), err.len()), (60, 0), "{err:?}");
    assert_answers_match(&out);
    let (_, fb) = the_fallback_took_the_rest(&p, &online, &b, "expired").await;
    let (fin, fout) = (fb["input_tokens"].as_f64().unwrap(), fb["output_tokens"].as_f64().unwrap());
    assert!(fout > 0.0, "{fb:?}");
    assert!((fb["cost"].as_f64().unwrap() - (fin * 2.0 + fout * 8.0) / 1e6).abs() < 1e-6, "full price: {fb:?}");
    let u = &b["usage"];
    let (input, output) = (u["input_tokens"].as_f64().unwrap(), u["output_tokens"].as_f64().unwrap());
    let expected = (input * 2.0 + output * 8.0) / 1e6 * 0.5 + (fin * 2.0 + fout * 8.0) / 1e6 * 0.5;
    assert!((b["cost"].as_f64().unwrap() - expected).abs() < 1e-5, "batch price for the remote's lines, full price for the fallback's: {b}");
}

/// A remote batch too slow for the user's window (its own window is a day) is cut short
/// while it runs, before the batch expires: cancelled at the remote, what it finished kept,
/// the rest run at the fallback, each line paid once; the batch completes in its window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_batch_at_risk_of_missing_the_window_falls_back_before_it_expires() {
    let m = mock(MockArgs { latency_ms: 400, ..Default::default() }).await;
    let online = mock(MockArgs::default()).await;
    let p = provider(&m, "max_concurrency = 1");
    let s = Server::start(&fallback_config(&p.url, &online.base_url(), "24h", "12s"));
    let api = s.api();
    let f = api.upload(&chat_lines(60, "m")).await;
    let id = api.create_batch(&f, json!({"completion_window": "12s"})).await["id"].as_str().unwrap().to_string();
    let b = api.wait_for(&id, &["completed", "expired", "failed"], secs(60)).await;
    assert_eq!(b["status"], "completed", "the fallback took the rest in time: {b}");
    assert!(b["completed_at"].as_i64().unwrap() <= b["expires_at"].as_i64().unwrap(), "{b}");
    let (out, err) = final_results(&api, &b, 60).await;
    assert_eq!((out.len(), err.len()), (60, 0), "{err:?}");
    assert_answers_match(&out);
    let (ran, _) = the_fallback_took_the_rest(&p, &online, &b, "cancelled").await;
    assert!(ran > 0, "the remote ran part of it, kept");
}

/// Of a 60-line batch, one remote batch ran part (it ended `status`: expired, or cut short)
/// and the fallback exactly the rest, in one record; the lines the remote ran and the record.
async fn the_fallback_took_the_rest(p: &Server, online: &MockServer, b: &Value, status: &str) -> (u64, Value) {
    let remote = remote_batches(&p.api()).await;
    assert_eq!(remote.len(), 1, "no follow-up remote batch: the fallback took the rest: {remote:?}");
    assert_eq!(remote[0]["status"], status, "{remote:?}");
    let ran = remote[0]["request_counts"]["completed"].as_u64().unwrap();
    assert!(ran < 60, "{remote:?}");
    assert_eq!(online.stats().requests, 60 - ran, "the fallback ran exactly the lines the remote did not: no line paid twice");
    let shards = b["remote_batches"].as_array().unwrap();
    let fb: Vec<&Value> = shards.iter().filter(|r| r["status"] == "online_fallback").collect();
    assert_eq!(fb.len(), 1, "{shards:?}");
    assert_eq!((fb[0]["upstream"].as_str(), fb[0]["lines"].as_u64()), (Some("online"), Some(60 - ran)), "{fb:?}");
    (ran, fb[0].clone())
}

/// `kill -9` while lines run at the fallback: the fallback's record was written before they
/// ran and counted each answer as it came, so no surcharge is lost; after the restart the
/// rest runs there too, and `/v1/usage` prices the fallback's lines in full, as the batch's
/// `cost` does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_while_lines_run_at_the_fallback_loses_no_surcharge_and_usage_shows_it() {
    let m = mock(MockArgs { latency_ms: 300, ..Default::default() }).await;
    let online = mock(MockArgs { latency_ms: 300, ..Default::default() }).await;
    let p = provider(&m, "max_concurrency = 2");
    let mut s = Server::start(&fallback_config_with(&p.url, &online.base_url(), "3s", "3s", "max_concurrency = 2\n"));
    let api = s.api();
    let id = api.submit(&chat_lines(60, "m")).await;
    eventually("some lines to run at the fallback", secs(60), || async { (online.stats().requests >= 10).then_some(()) }).await;
    s.kill9();
    let before = online.stats().requests;
    assert!(before < 50, "killed while the fallback still had lines to run: {before}");
    s.restart();
    let api = s.api();
    let b = api.wait_for(&id, &["completed"], secs(90)).await;
    let (out, err) = final_results(&api, &b, 60).await;
    assert_eq!((out.len(), err.len()), (60, 0), "{err:?}");
    assert_answers_match(&out);
    let remote = remote_batches(&p.api()).await;
    assert_eq!(remote.len(), 1, "{remote:?}");
    let ran = remote[0]["request_counts"]["completed"].as_u64().unwrap();
    let fb: Vec<&Value> = b["remote_batches"].as_array().unwrap().iter().filter(|r| r["status"] == "online_fallback").collect();
    assert_eq!(fb.len(), 2, "one record before the kill, one for the rest after it: {fb:?}");
    assert!(fb.iter().all(|r| r["output_tokens"].as_i64().unwrap() > 0), "the record cut by the kill kept what it counted: {fb:?}");
    let per_line = out.iter().map(|l| l["response"]["body"]["usage"]["completion_tokens"].as_i64().unwrap()).min().unwrap();
    let counted: i64 = fb.iter().map(|r| r["output_tokens"].as_i64().unwrap()).sum();
    assert!(
        counted >= (60 - ran as i64) * per_line,
        "every line the fallback answered is counted ({counted} tokens, {} lines of at least {per_line}): {fb:?}",
        60 - ran
    );
    let surcharge: f64 = fb.iter().map(|r| (r["input_tokens"].as_f64().unwrap() * 2.0 + r["output_tokens"].as_f64().unwrap() * 8.0) / 1e6 * 0.5).sum();
    let (st, usage) = api.get("/usage?start_time=0").await;
    assert_eq!(st, 200, "{usage}");
    let t = &usage["total"];
    let at_batch_price = (t["input_tokens"].as_f64().unwrap() * 2.0 + t["output_tokens"].as_f64().unwrap() * 8.0) / 1e6 * 0.5;
    assert!((t["cost"].as_f64().unwrap() - (at_batch_price + surcharge)).abs() < 1e-5, "/v1/usage adds the fallback's surcharge ({surcharge}): {usage}");
    assert!((t["cost"].as_f64().unwrap() - b["cost"].as_f64().unwrap()).abs() < 1e-5, "as the batch's cost does: {usage} {b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_token_limit_is_learned_and_respected() {
    let m = mock(MockArgs { latency_ms: 5, ..Default::default() }).await;
    // The provider's tenant may have about two of the local's remote batches queued at once.
    let tenant = "[[tenants]]\nname = \"local\"\napi_keys = [\"sk-provider\"]\nmax_queued_tokens = 12000\n";
    let p = Server::start(&config(&m.base_url(), "max_attempts = 1", tenant));
    let papi = p.api_with_key("sk-provider");
    let s =
        Server::start_with(&local_config(&format!("{}/v1", p.url), "api_key_env = \"PROVIDER_KEY\""), &[], &[("PROVIDER_KEY".into(), "sk-provider".into())]);
    let api = s.api();
    let id = api.submit(&chat_lines(800, "m")).await;
    let queued = eventually("tokens enqueued at the remote, shown in /v1/quota", secs(60), || async {
        let (_, q) = api.get("/quota").await;
        let r = q["remote_upstreams"][0].clone();
        (r["queued_tokens"].as_u64().unwrap_or(0) > 0).then_some(r)
    })
    .await;
    assert_eq!((queued["upstream"].as_str(), queued["kind"].as_str()), (Some("mock"), Some("openai-batch")), "{queued}");
    let b = api.wait_for(&id, &["completed"], secs(180)).await;
    let (out, _) = final_results(&api, &b, 800).await;
    assert_eq!(out.len(), 800);
    let remote = remote_batches(&papi).await;
    assert_no_duplicate_remote(&remote);
    assert_eq!(remote.len(), 8, "refused creates created nothing: {remote:?}");
    assert!(s.log().contains("its limit is learned"), "the refusal was learned");
    let refusals = s.log().matches("its limit is learned").count();
    assert!(refusals < 8, "once learned, creates wait for room instead of being refused each time ({refusals} refusals)");
    let (_, q) = api.get("/quota").await;
    let r = &q["remote_upstreams"][0];
    let limit = r["learned_limit"].as_u64().expect("the learned limit is shown");
    assert!(limit > 0, "{r}");
    assert_eq!((r["queued_tokens"].as_u64(), r["room"].as_u64()), (Some(0), Some(limit)), "nothing left enqueued once every remote batch ended: {r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batchd_run_over_a_batch_upstream_resumes_after_ctrl_c_without_creating_again() {
    let m = mock(MockArgs { latency_ms: 30, ..Default::default() }).await;
    let p = provider(&m, "max_concurrency = 4");
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::write(d.join("in.jsonl"), jsonl(&chat_lines(300, "m"))).unwrap();
    std::fs::write(d.join("local.toml"), local_config(&format!("{}/v1", p.url), "")).unwrap();
    let run = || {
        let mut c = std::process::Command::new(BIN);
        c.current_dir(d).args(["run", "in.jsonl", "--config", "local.toml", "-o", "out.jsonl", "--errors", "err.jsonl", "--quiet"]);
        c
    };
    let child = run().stdin(std::process::Stdio::null()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let papi = p.api();
    eventually("the run's remote batches at the provider", secs(60), || async { (remote_batches(&papi).await.len() == 3).then_some(()) }).await;
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let first = wait_out(child, secs(30));
    assert_eq!(first.code, 130, "{first:?}");
    assert!(!d.join("out.jsonl").exists(), "interrupted before the remote batches ended");
    let second = finish(run(), secs(120));
    assert_eq!(second.code, 0, "{second:?}");
    let out: Vec<Value> = std::fs::read_to_string(d.join("out.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_exactly_once(&out, &[], 300);
    assert_answers_match(&out);
    let remote = remote_batches(&papi).await;
    assert_no_duplicate_remote(&remote);
    assert_eq!(remote.len(), 3, "the resumed run followed the remote batches the first one created: {remote:?}");
}

/// `batchd run`'s progress moves with the remote's own counts while its remote batches run
/// (their results come back only when each ends).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batchd_run_over_a_batch_upstream_shows_the_remote_counts_as_progress() {
    let m = mock(MockArgs { latency_ms: 60, ..Default::default() }).await;
    let p = provider(&m, "max_concurrency = 2");
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::write(d.join("in.jsonl"), jsonl(&chat_lines(200, "m"))).unwrap();
    std::fs::write(d.join("local.toml"), local_config(&format!("{}/v1", p.url), "max_lines = 200")).unwrap();
    let mut c = std::process::Command::new(BIN);
    c.current_dir(d).args(["run", "in.jsonl", "--config", "local.toml", "-o", "out.jsonl", "--errors", "err.jsonl"]);
    let out = finish(c, secs(120));
    assert_eq!(out.code, 0, "{out:?}");
    let at_remote: Vec<&str> = out.stderr.lines().filter(|l| l.starts_with("progress:") && l.contains("done at the remote")).collect();
    let line = at_remote.first().unwrap_or_else(|| panic!("no progress line fed by the remote's counts: {}", out.stderr));
    let figure = |prefix: &str| -> u64 { line.split(prefix).nth(1).unwrap().split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap() };
    let (position, done, failed) = (figure("progress: "), figure("done "), figure("failed "));
    assert!(position > done + failed, "the bar counts the lines done at the remote: {line}");
    let remote: u64 = line.split(" done at the remote").next().unwrap().rsplit(' ').next().unwrap().parse().unwrap();
    assert_eq!(position, done + failed + remote, "{line}");
    assert_eq!(std::fs::read_to_string(d.join("out.jsonl")).unwrap().lines().count(), 200);
}
