//! Issue #24, part 2: Anthropic's Message Batches API (`/v1/messages/batches`) on the real
//! `batchd serve`, against the mock's `/v1/messages` (an `api = "anthropic"` upstream) and its
//! `/v1/chat/completions` (an OpenAI-compatible one, the requests translated): objects and
//! result lines in Anthropic's shapes, every bad request refused with its index in Anthropic's
//! envelope, tenants by `x-api-key`, lists both ways, delete, cancel mid-run, expiry, and a
//! kill -9 mid-batch after which every custom_id is in the results exactly once.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::{json, Value};

const KEY_ENV: &str = "BATCHD_TEST_MSGBATCH_UPSTREAM_KEY";
const UPSTREAM_KEY: &str = "sk-ant-upstream-1";
const ALICE: &str = "sk-alice";
const BOB: &str = "sk-bob";

/// `claude-x` on an Anthropic-speaking upstream, `local-x` on an OpenAI-compatible one (both
/// the same mock), tenants alice and bob; in this process.
fn server(m: &MockServer, upstream_extra: &str, extra: &str) -> Server {
    spawn_app_with(&server_config(m, upstream_extra, extra), &[], &[(KEY_ENV.into(), UPSTREAM_KEY.into())])
}

/// [`server`] as the real binary (for a kill -9 or the process's memory).
fn server_process(m: &MockServer, upstream_extra: &str, extra: &str) -> Server {
    Server::start_with(&server_config(m, upstream_extra, extra), &[], &[(KEY_ENV.into(), UPSTREAM_KEY.into())])
}

fn server_config(m: &MockServer, upstream_extra: &str, extra: &str) -> String {
    let up = |name: &str, api: &str, model: &str| {
        format!(
            "[[upstreams]]\nname = \"{name}\"\nbase_url = \"{}\"\napi = \"{api}\"\napi_key_env = \"{KEY_ENV}\"\nmodels = [\"{model}\"]\n{upstream_extra}\n",
            m.base_url()
        )
    };
    format!(
        "{}{}\n[batches]\ncompletion_windows = [\"24h\", \"3s\"]\n\n[[tenants]]\nname = \"alice\"\napi_keys = [\"{ALICE}\"]\n[[tenants]]\nname = \"bob\"\napi_keys = [\"{BOB}\"]\n{extra}\n",
        up("claude", "anthropic", "claude-x"),
        up("local", "openai", "local-x"),
    )
}

async fn upstream(args: MockArgs) -> MockServer {
    mock(MockArgs { api_key: Some(UPSTREAM_KEY.into()), ..args }).await
}

/// A client of the Message Batches API as Anthropic's SDKs call it (`x-api-key`).
struct Msg {
    http: reqwest::Client,
    base: String,
    key: String,
}

struct Answer {
    status: u16,
    request_id: Option<String>,
    body: Value,
}

impl Msg {
    fn new(s: &Server, key: &str) -> Msg {
        Msg { http: s.http(), base: format!("{}/v1/messages/batches", s.url), key: key.into() }
    }

    async fn send(&self, r: reqwest::RequestBuilder) -> Answer {
        let r = r.header("x-api-key", &self.key).header("anthropic-version", "2023-06-01").send().await.unwrap();
        let status = r.status().as_u16();
        let request_id = r.headers().get("request-id").map(|v| v.to_str().unwrap().to_string());
        let text = r.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or_else(|_| Value::String(text));
        Answer { status, request_id, body }
    }

    async fn create(&self, body: &Value) -> Answer {
        self.send(self.http.post(&self.base).json(body)).await
    }

    async fn created(&self, requests: Vec<Value>) -> Value {
        let a = self.create(&json!({"requests": requests})).await;
        assert_eq!(a.status, 200, "{}", a.body);
        a.body
    }

    async fn get(&self, path: &str) -> Answer {
        self.send(self.http.get(format!("{}{path}", self.base))).await
    }

    async fn retrieve(&self, id: &str) -> Value {
        let a = self.get(&format!("/{id}")).await;
        assert_eq!(a.status, 200, "{}", a.body);
        a.body
    }

    async fn wait_ended(&self, id: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let b = self.retrieve(id).await;
            if b["processing_status"] == "ended" {
                return b;
            }
            assert!(Instant::now() < deadline, "{id} never ended: {b}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The result lines, read from the batch's `results_url` as the SDKs do.
    async fn results(&self, b: &Value) -> Vec<Value> {
        let url = b["results_url"].as_str().unwrap_or_else(|| panic!("no results_url: {b}"));
        let r = self.http.get(url).header("x-api-key", &self.key).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200);
        r.text().await.unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }
}

fn request(custom_id: &str, model: &str, extra: Value) -> Value {
    let mut params = json!({"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": format!("hello from {custom_id}")}]});
    for (k, v) in extra.as_object().cloned().unwrap_or_default() {
        params[k] = v;
    }
    json!({"custom_id": custom_id, "params": params})
}

fn by_custom_id(results: &[Value]) -> HashMap<String, Value> {
    let map: HashMap<String, Value> = results.iter().map(|r| (r["custom_id"].as_str().unwrap().to_string(), r["result"].clone())).collect();
    assert_eq!(map.len(), results.len(), "every custom_id once");
    map
}

fn assert_rfc3339(v: &Value) {
    let s = v.as_str().unwrap_or_else(|| panic!("not a time: {v}"));
    chrono::DateTime::parse_from_rfc3339(s).unwrap_or_else(|e| panic!("{s}: {e}"));
}

fn assert_anthropic_error(a: &Answer, status: u16, kind: &str) {
    assert_eq!(a.status, status, "{}", a.body);
    assert_eq!(a.body["type"], "error", "{}", a.body);
    assert_eq!(a.body["error"]["type"], kind, "{}", a.body);
    assert!(a.body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(a.request_id.is_some(), "request-id header on errors too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_batch_runs_on_both_kinds_of_upstream_and_reads_in_anthropics_shapes() {
    let m = upstream(MockArgs { completion_tokens: 5, ..Default::default() }).await;
    let s = server(&m, "", "");
    let alice = Msg::new(&s, ALICE);
    let requests = vec![
        request("anthropic-1", "claude-x", json!({"system": "Be brief."})),
        request("anthropic-2", "claude-x", json!({"stop_sequences": ["from"]})),
        request("translated-1", "local-x", json!({"temperature": 0.5})),
        request("translated-2", "local-x", json!({"system": [{"type": "text", "text": "Be brief."}]})),
        request("refused-upstream", "claude-x", json!({"mock": {"status": 400}})),
    ];
    let a = alice.create(&json!({"requests": requests})).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(a.request_id.as_deref().is_some_and(|r| r.starts_with("req_")), "request-id header");
    let b = a.body;
    let id = b["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("msgbatch_"), "{id}");
    assert_eq!(b["type"], "message_batch");
    assert_eq!(b["processing_status"], "in_progress");
    assert_eq!(b["request_counts"], json!({"processing": 5, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}));
    assert_eq!((b["results_url"].clone(), b["ended_at"].clone(), b["archived_at"].clone()), (Value::Null, Value::Null, Value::Null));
    assert_rfc3339(&b["created_at"]);
    assert_rfc3339(&b["expires_at"]);

    let b = alice.wait_ended(&id, secs(30)).await;
    assert_eq!(b["request_counts"], json!({"processing": 0, "succeeded": 4, "errored": 1, "canceled": 0, "expired": 0}), "{b}");
    assert_rfc3339(&b["ended_at"]);
    assert_eq!(b["cancel_initiated_at"], Value::Null);
    assert!(b["results_url"].as_str().unwrap().ends_with(&format!("/v1/messages/batches/{id}/results")));
    let results = by_custom_id(&alice.results(&b).await);
    assert_eq!(results.len(), 5);
    for cid in ["anthropic-1", "anthropic-2", "translated-1", "translated-2"] {
        let r = &results[cid];
        assert_eq!(r["type"], "succeeded", "{cid}: {r}");
        let msg = &r["message"];
        assert_eq!((msg["type"].as_str(), msg["role"].as_str()), (Some("message"), Some("assistant")), "{cid}: {msg}");
        assert!(msg["id"].as_str().unwrap().starts_with("msg_"), "{msg}");
        assert_eq!(msg["content"][0]["type"], "text");
        assert!(msg["content"][0]["text"].as_str().unwrap().contains("echo"), "{msg}");
        assert!(msg["usage"]["input_tokens"].as_u64().unwrap() > 0 && msg["usage"]["output_tokens"].as_u64().is_some(), "{msg}");
    }
    assert_eq!(results["anthropic-2"]["message"]["stop_reason"], "stop_sequence", "the stop sequence reached the upstream");
    let errored = &results["refused-upstream"];
    assert_eq!(errored["type"], "errored");
    assert_eq!(errored["error"]["type"], "error");
    assert_eq!(errored["error"]["error"]["type"], "invalid_request_error", "{errored}");

    // The same batch through OpenAI's API: one engine, one record.
    let openai = s.api_with_key(ALICE).batch(&id).await;
    assert_eq!((openai["endpoint"].as_str(), openai["status"].as_str()), (Some("/v1/messages"), Some("completed")), "{openai}");
    assert_eq!((openai["request_counts"]["completed"].as_u64(), openai["request_counts"]["failed"].as_u64()), (Some(4), Some(1)));
    // Its failed request retried through OpenAI's extension: the new batch is a Message Batch.
    let (status, retried) = s.api_with_key(ALICE).post(&format!("/batches/{id}/retry"), &json!({})).await;
    assert_eq!(status, 200, "{retried}");
    let again = retried["id"].as_str().unwrap();
    assert!(again.starts_with("msgbatch_"), "{retried}");
    let ended = alice.wait_ended(again, secs(30)).await;
    assert_eq!(ended["request_counts"]["errored"], 1, "{ended}");
    assert_eq!(by_custom_id(&alice.results(&ended).await).keys().collect::<Vec<_>>(), ["refused-upstream"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_creates_are_refused_with_every_index_in_anthropics_envelope_and_leave_nothing() {
    let m = upstream(MockArgs::default()).await;
    let s = server(&m, "", "");
    let alice = Msg::new(&s, ALICE);
    let bad = vec![
        request("fine", "claude-x", json!({})),
        request("not ok!", "claude-x", json!({})),
        request("fine", "claude-x", json!({})),
        json!({"custom_id": "no-tokens", "params": {"model": "claude-x", "messages": []}}),
        request("unknown", "gpt-9", json!({})),
        request("streamed", "claude-x", json!({"stream": true})),
        request("untranslatable", "local-x", json!({"thinking": {"type": "enabled", "budget_tokens": 1024}})),
    ];
    let a = alice.create(&json!({"requests": bad})).await;
    assert_anthropic_error(&a, 400, "invalid_request_error");
    let message = a.body["error"]["message"].as_str().unwrap();
    for part in [
        "6 problems",
        "requests.1.custom_id",
        "requests.2.custom_id: custom_id \"fine\" is used by another request",
        "requests.3.params.max_tokens: Field required",
        "requests.4.params.model",
        "requests.5.params.stream",
        "requests.6.params.thinking",
    ] {
        assert!(message.contains(part), "{part:?} not in {message}");
    }
    assert!(!message.contains("requests.0"), "{message}");
    let (_, files) = s.api_with_key(ALICE).get("/files").await;
    assert_eq!(files["data"], json!([]), "a refused create leaves no input file");
    assert_eq!(alice.get("").await.body["data"], json!([]), "nor a batch");

    assert_anthropic_error(&alice.create(&json!({"requests": []})).await, 400, "invalid_request_error");
    assert_anthropic_error(&alice.create(&json!({"requests": [request("a", "claude-x", json!({}))], "bogus": 1})).await, 400, "invalid_request_error");
    let not_json = alice.send(alice.http.post(&alice.base).header("content-type", "application/json").body("{\"requests\": [")).await;
    assert_anthropic_error(&not_json, 400, "invalid_request_error");
    assert_anthropic_error(&Msg::new(&s, "wrong-key").get("").await, 401, "authentication_error");
    assert_anthropic_error(&alice.get("/msgbatch_nope").await, 404, "not_found_error");
    assert_anthropic_error(&alice.get("/msgbatch_nope/results").await, 404, "not_found_error");
    // Routes no handler serves answer in Anthropic's envelope below /v1/messages too.
    assert_anthropic_error(&alice.get("/msgbatch_nope/unknown").await, 404, "not_found_error");
    let put = alice.send(alice.http.put(format!("{}/msgbatch_nope/cancel", alice.base))).await;
    assert_anthropic_error(&put, 405, "invalid_request_error");
    let openai = s.api_with_key(ALICE).get("/nothing-here").await;
    assert_eq!(openai.0, 404);
    assert!(openai.1["error"]["message"].is_string() && openai.1.get("type").is_none(), "OpenAI's envelope elsewhere: {}", openai.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_lists_both_ways_and_delete() {
    let m = upstream(MockArgs { latency_ms: 400, ..Default::default() }).await;
    let s = server(&m, "max_concurrency = 1", "");
    let (alice, bob) = (Msg::new(&s, ALICE), Msg::new(&s, BOB));
    let mut ids = vec![];
    for i in 0..5 {
        ids.push(alice.created(vec![request(&format!("r{i}"), "claude-x", json!({}))]).await["id"].as_str().unwrap().to_string());
    }
    ids.reverse();
    // An OpenAI batch of alice's is not a Message Batch.
    let openai_id = s.api_with_key(ALICE).submit(&[chat_line("c", "local-x", None)]).await;
    assert_eq!(alice.get(&format!("/{openai_id}")).await.status, 404);
    // Bearer is the same tenant as x-api-key.
    let bearer = s.http().get(format!("{}/v1/messages/batches?limit=2", s.url)).bearer_auth(ALICE).send().await.unwrap();
    let page: Value = bearer.json().await.unwrap();
    let names = |p: &Value| p["data"].as_array().unwrap().iter().map(|b| b["id"].as_str().unwrap().to_string()).collect::<Vec<_>>();
    assert_eq!((names(&page), page["has_more"].clone()), (ids[0..2].to_vec(), json!(true)));
    assert_eq!((page["first_id"].as_str(), page["last_id"].as_str()), (Some(ids[0].as_str()), Some(ids[1].as_str())));
    let next = alice.get(&format!("?limit=2&after_id={}", ids[1])).await.body;
    assert_eq!(names(&next), ids[2..4].to_vec());
    let back = alice.get(&format!("?limit=2&before_id={}", ids[4])).await.body;
    assert_eq!((names(&back), back["has_more"].clone()), (ids[2..4].to_vec(), json!(true)));
    assert_anthropic_error(&alice.get(&format!("?after_id={}&before_id={}", ids[0], ids[1])).await, 400, "invalid_request_error");
    // Bob sees none of them, and cannot touch them.
    assert_eq!(bob.get("").await.body["data"], json!([]));
    assert_eq!(bob.get(&format!("/{}", ids[0])).await.status, 404);
    assert_eq!(bob.send(bob.http.post(format!("{}/{}/cancel", bob.base, ids[0]))).await.status, 404);
    assert_eq!(bob.send(bob.http.delete(format!("{}/{}", bob.base, ids[0]))).await.status, 404);
    // A batch still processing is not deleted; once ended it is, with its files.
    let oldest = ids[4].clone();
    let busy = alice.send(alice.http.delete(format!("{}/{}", alice.base, ids[0]))).await;
    assert_anthropic_error(&busy, 400, "invalid_request_error");
    alice.wait_ended(&oldest, secs(30)).await;
    let input = s.api_with_key(ALICE).batch(&oldest).await["input_file_id"].as_str().unwrap().to_string();
    let gone = alice.send(alice.http.delete(format!("{}/{oldest}", alice.base))).await;
    assert_eq!((gone.status, gone.body.clone()), (200, json!({"id": oldest, "type": "message_batch_deleted"})));
    assert_eq!(alice.get(&format!("/{oldest}")).await.status, 404);
    assert!(!names(&alice.get("?limit=100").await.body).contains(&oldest));
    let (status, _) = s.api_with_key(ALICE).get(&format!("/files/{input}")).await;
    assert_eq!(status, 404, "its input file went with it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_mid_run_ends_with_every_request_succeeded_or_canceled() {
    let m = upstream(MockArgs { latency_ms: 150, ..Default::default() }).await;
    let s = server(&m, "max_concurrency = 2", "");
    let alice = Msg::new(&s, ALICE);
    let requests: Vec<Value> = (0..40).map(|i| request(&format!("r{i}"), if i % 2 == 0 { "claude-x" } else { "local-x" }, json!({}))).collect();
    let id = alice.created(requests).await["id"].as_str().unwrap().to_string();
    eventually("some requests succeed", secs(20), || async {
        let b = alice.retrieve(&id).await;
        (b["request_counts"]["succeeded"].as_u64() >= Some(4)).then_some(())
    })
    .await;
    let c = alice.send(alice.http.post(format!("{}/{id}/cancel", alice.base))).await;
    assert_eq!(c.status, 200, "{}", c.body);
    assert!(["canceling", "ended"].contains(&c.body["processing_status"].as_str().unwrap()), "{}", c.body);
    assert_rfc3339(&c.body["cancel_initiated_at"]);
    let b = alice.wait_ended(&id, secs(30)).await;
    let counts = &b["request_counts"];
    let (succeeded, canceled) = (counts["succeeded"].as_u64().unwrap(), counts["canceled"].as_u64().unwrap());
    assert_eq!((succeeded + canceled, counts["errored"].as_u64(), counts["processing"].as_u64()), (40, Some(0), Some(0)), "{b}");
    assert!(canceled > 0 && succeeded >= 4, "{b}");
    let results = by_custom_id(&alice.results(&b).await);
    assert_eq!(results.len(), 40);
    assert_eq!(results.values().filter(|r| r["type"] == "canceled").count() as u64, canceled);
    assert_eq!(results.values().filter(|r| r["type"] == "succeeded").count() as u64, succeeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_batch_keeps_what_finished_and_tells_the_rest_expired() {
    let m = upstream(MockArgs { latency_ms: 300, ..Default::default() }).await;
    let s = server(&m, "max_concurrency = 1", "");
    let alice = Msg::new(&s, ALICE);
    let requests: Vec<Value> = (0..30).map(|i| request(&format!("r{i}"), "claude-x", json!({}))).collect();
    // batchd's extension: a completion window of the server's, here 3 s.
    let id = alice.create(&json!({"requests": requests, "completion_window": "3s"})).await.body["id"].as_str().unwrap().to_string();
    let b = alice.wait_ended(&id, secs(30)).await;
    let counts = &b["request_counts"];
    let (succeeded, expired) = (counts["succeeded"].as_u64().unwrap(), counts["expired"].as_u64().unwrap());
    assert!(succeeded > 0 && expired > 0 && succeeded + expired == 30, "{b}");
    let results = by_custom_id(&alice.results(&b).await);
    assert_eq!(results.values().filter(|r| r["type"] == "expired").count() as u64, expired);
    assert_eq!(results.len(), 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_mid_batch_every_custom_id_once() {
    const N: usize = 400;
    let m = upstream(MockArgs { latency_ms: 60, ..Default::default() }).await;
    let mut s = server_process(&m, "max_concurrency = 8", "[engine]\nunit_lines = 25\n");
    let requests: Vec<Value> = (0..N).map(|i| request(&format!("r{i}"), if i % 3 == 0 { "local-x" } else { "claude-x" }, json!({}))).collect();
    let id = Msg::new(&s, ALICE).created(requests).await["id"].as_str().unwrap().to_string();
    let mut kills = 0;
    let mut seen = 0;
    for _ in 0..2 {
        let alice = Msg::new(&s, ALICE);
        let b = eventually("progress before the kill", secs(20), || async {
            let b = alice.retrieve(&id).await;
            (b["request_counts"]["succeeded"].as_u64().unwrap() > seen + 20 || b["processing_status"] == "ended").then_some(b)
        })
        .await;
        if b["processing_status"] == "ended" {
            break;
        }
        seen = b["request_counts"]["succeeded"].as_u64().unwrap();
        s.kill9();
        kills += 1;
        s.spawn();
    }
    assert!(kills >= 1, "the batch ended before any kill");
    let alice = Msg::new(&s, ALICE);
    let b = alice.wait_ended(&id, secs(60)).await;
    assert_eq!(b["request_counts"]["succeeded"], N, "{b}");
    let results = by_custom_id(&alice.results(&b).await);
    assert_eq!(results.len(), N, "every custom_id exactly once");
    assert!(results.values().all(|r| r["type"] == "succeeded"));
}

/// `batchd run` on `{"custom_id", "params"}` lines: run as a Message Batch, its output and
/// errors files in Anthropic's result lines; through an Anthropic upstream (a 400 in the
/// errors file) and through an OpenAI-compatible one (every request translated).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batchd_run_takes_and_writes_anthropics_format() {
    let m = mock(MockArgs::default()).await;
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let lines: Vec<String> =
        (0..6).map(|i| request(&format!("r{i}"), "claude-x", if i == 4 { json!({"mock": {"status": 400}}) } else { json!({}) }).to_string()).collect();
    std::fs::write(d.join("in.jsonl"), jsonl(&lines)).unwrap();
    std::fs::write(d.join("batchd.toml"), format!("[[upstreams]]\nname = \"a\"\nbase_url = \"{}\"\napi = \"anthropic\"\nmodels = [\"*\"]\n", m.base_url()))
        .unwrap();
    let run = |args: &[&str]| {
        let mut c = std::process::Command::new(BIN);
        c.current_dir(d).env_remove("BATCHD_UPSTREAM").env_remove("BATCHD_CONFIG").args(args);
        finish(c, secs(60))
    };
    let read = |name: &str| -> Vec<Value> { std::fs::read_to_string(d.join(name)).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect() };

    let r = run(&["run", "in.jsonl", "--config", "batchd.toml", "-o", "out.jsonl", "--errors", "err.jsonl", "-q"]);
    assert_eq!(r.code, 4, "one request failed: {}", r.stderr);
    let (out, err) = (by_custom_id(&read("out.jsonl")), by_custom_id(&read("err.jsonl")));
    assert_eq!((out.len(), err.len()), (5, 1));
    assert!(out.values().all(|r| r["type"] == "succeeded" && r["message"]["type"] == "message"), "{out:?}");
    assert_eq!(out["r2"]["message"]["content"][0]["text"], "echo: hello from r2", "each answer belongs to its request");
    assert_eq!(err["r4"]["type"], "errored");
    assert_eq!(err["r4"]["error"]["error"]["type"], "invalid_request_error");

    let plain: Vec<String> = (0..4).map(|i| request(&format!("p{i}"), "local-x", json!({"system": "Be brief."})).to_string()).collect();
    std::fs::write(d.join("plain.jsonl"), jsonl(&plain)).unwrap();
    let r = run(&["run", "plain.jsonl", "--upstream", &m.base_url(), "-o", "p.out.jsonl", "--errors", "p.err.jsonl", "-q"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let out = by_custom_id(&read("p.out.jsonl"));
    assert_eq!(out.len(), 4);
    for (cid, r) in &out {
        assert_eq!(r["type"], "succeeded");
        assert!(r["message"]["id"].as_str().unwrap().starts_with("msg_"), "translated back into a Message: {r}");
        assert_eq!(r["message"]["content"][0]["text"], format!("echo: hello from {cid}"));
    }
    assert!(read("p.err.jsonl").is_empty());
}

/// The server's peak resident memory (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    proc_kb(pid, "VmHWM:") * 1024
}

/// A create is read as it arrives: a 24 MB body of 12,000 requests raises the server's peak
/// memory by far less than its size; over the request limit it is a 400 naming the limit, and
/// over the byte limit (here the server's own, lower than Anthropic's 256 MB) a 413 — also
/// for a chunked body that declares no length.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_are_streamed_and_bounded() {
    let m = upstream(MockArgs::default()).await;
    let s = server_process(&m, "", "[limits]\nmax_lines = 12000\nmax_file_bytes = 26000000\n");
    let alice = Msg::new(&s, ALICE);
    let pad = "x".repeat(1900);
    let body = |n: usize| {
        let reqs: Vec<String> = (0..n).map(|i| request(&format!("r{i}"), "claude-x", json!({"system": pad})).to_string()).collect();
        format!("{{\"requests\": [{}]}}", reqs.join(","))
    };
    let big = body(12_000);
    assert!(big.len() > 24_000_000);
    let t0 = Instant::now();
    // Nothing runs it: the create alone is measured (the batch is cancelled right after).
    let before = peak_rss(s.pid().unwrap());
    let a = alice.send(alice.http.post(&alice.base).header("content-type", "application/json").body(big)).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let grown = peak_rss(s.pid().unwrap()).saturating_sub(before);
    println!("a 24 MB create took {:?} and raised the server's peak memory by {} MB", t0.elapsed(), grown >> 20);
    assert!(grown < 12_000_000, "the body was held in memory: peak grew by {grown} bytes");
    let id = a.body["id"].as_str().unwrap().to_string();
    assert_eq!(a.body["request_counts"]["processing"], 12_000);
    alice.send(alice.http.post(format!("{}/{id}/cancel", alice.base))).await;

    let t0 = Instant::now();
    let few =
        format!("{{\"requests\": [{}]}}", (0..12_001).map(|i| request(&format!("r{i}"), "claude-x", json!({})).to_string()).collect::<Vec<_>>().join(","));
    let a = alice.create(&serde_json::from_str(&few).unwrap()).await;
    assert_anthropic_error(&a, 400, "invalid_request_error");
    assert!(a.body["error"]["message"].as_str().unwrap().contains("requests: a Message Batch holds at most 12000 requests"), "{}", a.body);
    println!("12,001 requests refused in {:?}", t0.elapsed());
    let t0 = Instant::now();

    let chunks: Vec<Result<String, std::io::Error>> =
        (0..30).map(|_| Ok(format!("{},", request("same", "claude-x", json!({"system": "y".repeat(1_000_000)}))))).collect();
    let stream = futures::stream::iter(std::iter::once(Ok("{\"requests\": [".to_string())).chain(chunks));
    let chunked = alice.send(alice.http.post(&alice.base).header("content-type", "application/json").body(reqwest::Body::wrap_stream(stream))).await;
    assert_anthropic_error(&chunked, 413, "request_too_large");
    println!("a chunked body over the limit refused in {:?}", t0.elapsed());
}

/// A body within the byte limit whose requests, written as lines of batchd's format (a little
/// longer), would not be: a 413 too, and nothing stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_input_file_is_held_to_the_servers_limit_too() {
    let m = upstream(MockArgs::default()).await;
    let s = server(&m, "", "[limits]\nmax_file_bytes = 100000\n");
    let alice = Msg::new(&s, ALICE);
    let requests: Vec<Value> =
        (0..1100).map(|i| json!({"custom_id": format!("r{i}"), "params": {"model": "claude-x", "max_tokens": 1, "messages": []}})).collect();
    let body = json!({"requests": requests}).to_string();
    assert!(body.len() < 100_000 && body.len() > 80_000, "{}", body.len());
    let a = alice.send(alice.http.post(&alice.base).header("content-type", "application/json").body(body)).await;
    assert_anthropic_error(&a, 413, "request_too_large");
    let (_, files) = s.api_with_key(ALICE).get("/files").await;
    assert_eq!(files["data"], json!([]));
    assert_eq!(alice.get("").await.body["data"], json!([]));
}
