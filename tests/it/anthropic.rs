//! Issue #24, part 1: upstreams that speak Anthropic's Messages API (`api = "anthropic"`).
//! The real `batchd serve` sends OpenAI-format chat lines to the mock's `/v1/messages` (which
//! insists on `x-api-key` and `anthropic-version`, answers Messages, and fails in Anthropic's
//! envelope), and writes chat completions to the output file. A line that cannot be said in
//! the Messages API fails validation with its line number, before anything is sent; a 529 or a
//! 429 from the upstream costs no attempt and pauses its pool.

use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::{json, Value};

const KEY_ENV: &str = "BATCHD_TEST_ANTHROPIC_KEY";
const KEY: &str = "sk-ant-test-key-0123";

/// A server whose one upstream speaks Anthropic's API, with its key from the environment.
fn anthropic_server(m: &MockServer, extra_upstream: &str) -> Server {
    let upstream = format!("api = \"anthropic\"\napi_key_env = \"{KEY_ENV}\"\n{extra_upstream}");
    spawn_app_with(&config(&m.base_url(), &upstream, ""), &[], &[(KEY_ENV.into(), KEY.into())])
}

async fn anthropic_mock(args: MockArgs) -> MockServer {
    mock(MockArgs { api_key: Some(KEY.into()), ..args }).await
}

/// A full chat line with `body` as its body (the model is `claude-x` unless `body` names one).
fn line(custom_id: &str, body: Value) -> String {
    let mut b = json!({"model": "claude-x", "messages": [{"role": "user", "content": format!("hello from {custom_id}")}]});
    for (k, v) in body.as_object().unwrap() {
        b[k] = v.clone();
    }
    json!({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": b}).to_string()
}

fn by_custom_id(lines: &[Value]) -> std::collections::HashMap<String, Value> {
    lines.iter().map(|l| (l["custom_id"].as_str().unwrap().to_string(), l.clone())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_lines_through_an_anthropic_upstream_come_back_as_chat_completions() {
    let m = anthropic_mock(MockArgs { completion_tokens: 9, ..Default::default() }).await;
    let s = anthropic_server(&m, "default_max_tokens = 256");
    let api = s.api();
    let lines = vec![
        line("plain", json!({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello from plain"}]})),
        line("short", json!({"max_tokens": 3})),
        line("stopped", json!({"max_tokens": 50, "stop": "from"})),
        line(
            "tool",
            json!({"max_completion_tokens": 50, "tool_choice": "required",
                   "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]}),
        ),
    ];
    let id = api.submit(&lines).await;
    let b = api.wait_for(&id, &["completed", "failed"], secs(30)).await;
    let (out, err) = final_results(&api, &b, 4).await;
    assert!(err.is_empty(), "every line succeeds (x-api-key and anthropic-version sent): {err:?}");
    let out = by_custom_id(&out);
    for (cid, l) in &out {
        let body = &l["response"]["body"];
        assert_eq!(body["object"], "chat.completion", "{cid}: {body}");
        let line_id = l["id"].as_str().unwrap();
        assert_eq!(body["id"].as_str().unwrap(), line_id.replacen("batch_req_", "chatcmpl-", 1), "{cid}: the id follows the line");
        assert_eq!(l["response"]["request_id"], line_id, "{cid}: the upstream's request-id header is read");
        assert_eq!(body["model"], "claude-x");
        assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    }
    let plain = &out["plain"]["response"]["body"];
    assert_eq!(plain["choices"][0]["message"]["content"], "echo: hello from plain");
    assert_eq!(plain["choices"][0]["finish_reason"], "stop");
    assert_eq!(plain["usage"]["completion_tokens"], 9);
    let short = &out["short"]["response"]["body"];
    assert_eq!((short["choices"][0]["finish_reason"].as_str(), short["usage"]["completion_tokens"].as_u64()), (Some("length"), Some(3)), "{short}");
    let stopped = &out["stopped"]["response"]["body"]["choices"][0];
    assert_eq!(stopped["message"]["content"], "echo: hello ");
    assert_eq!((stopped["finish_reason"].as_str(), stopped["stop_reason"].as_str()), (Some("stop"), Some("from")), "{stopped}");
    let tool = &out["tool"]["response"]["body"]["choices"][0];
    assert_eq!(tool["finish_reason"], "tool_calls", "{tool}");
    assert!(tool["message"]["content"].is_null());
    assert_eq!(tool["message"]["tool_calls"][0]["function"]["name"], "lookup");
    assert_eq!(tool["message"]["tool_calls"][0]["function"]["arguments"], "{}");
    assert!(tool["message"]["tool_calls"][0]["id"].as_str().unwrap().starts_with("toolu_"));
    let st = m.stats();
    assert_eq!((st.requests, st.by_status.get("200").copied()), (4, Some(4)), "{st:?}");
    let prompt: u64 = out.values().map(|l| l["response"]["body"]["usage"]["prompt_tokens"].as_u64().unwrap()).sum();
    assert_eq!(prompt, st.prompt_tokens, "usage.input_tokens read into prompt_tokens");
    assert_eq!(b["usage"]["input_tokens"].as_u64(), Some(st.prompt_tokens), "the batch's usage sums the translated answers");
    assert_eq!(b["usage"]["output_tokens"].as_u64(), Some(st.completion_tokens));
    assert!(!s.log().contains(KEY), "the key never reaches the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_that_cannot_be_translated_fails_validation_with_its_line_number() {
    let m = anthropic_mock(MockArgs::default()).await;
    let s = anthropic_server(&m, "");
    let api = s.api();
    let lines = vec![
        line("ok", json!({"max_tokens": 5})),
        line("seeded", json!({"max_tokens": 5, "seed": 42})),
        line("no-max", json!({})),
        line("json-mode", json!({"max_tokens": 5, "response_format": {"type": "json_object"}})),
        line("late-system", json!({"max_tokens": 5, "messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]})),
    ];
    let id = api.submit(&lines).await;
    let b = api.wait_for(&id, &["failed", "completed"], secs(30)).await;
    assert_eq!(b["status"], "failed", "{b}");
    let errors: Vec<(u64, String, String)> = b["errors"]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["line"].as_u64().unwrap(), e["code"].as_str().unwrap().to_string(), e["param"].as_str().unwrap().to_string()))
        .collect();
    let want = [
        (2, "unsupported_parameter", "body.seed"),
        (3, "invalid_value", "body.max_tokens"),
        (4, "unsupported_parameter", "body.response_format.type"),
        (5, "unsupported_parameter", "body.messages[1].role"),
    ];
    assert_eq!(errors, want.map(|(l, c, p)| (l, c.to_string(), p.to_string())), "{b}");
    let seeded = &b["errors"]["data"][0]["message"];
    assert_eq!(
        seeded.as_str().unwrap(),
        "Line 2: body.seed cannot be sent to upstream \"mock\", which speaks Anthropic's Messages API: has no equivalent in Anthropic's Messages API."
    );
    assert_eq!(m.stats().requests, 0, "nothing is sent from a batch that failed validation");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_and_rate_limits_from_an_anthropic_upstream_cost_no_attempt_and_pause_the_pool() {
    let m = anthropic_mock(MockArgs::default()).await;
    let s = anthropic_server(&m, "max_attempts = 1\nmax_concurrency = 4");
    let api = s.api();
    let mut lines: Vec<String> = (0..3).map(|i| line(&format!("busy-{i}"), json!({"max_tokens": 5, "mock": {"status": 529, "fail_times": 2}}))).collect();
    lines.push(line("limited", json!({"max_tokens": 5, "mock": {"status": 429, "fail_times": 1, "retry_after_s": 2}})));
    lines.push(line("broken", json!({"max_tokens": 5, "mock": {"status": 500}})));
    let t0 = Instant::now();
    let id = api.submit(&lines).await;
    let (api2, id2) = (api.clone(), id.clone());
    let paused = eventually("the pool pauses for the upstream's 429 or 529", secs(10), || {
        let (api, id) = (api2.clone(), id2.clone());
        async move {
            let b = api.batch(&id).await;
            let u = b["progress"]["upstreams"][0].clone();
            (u["paused"] == true).then_some(u)
        }
    })
    .await;
    assert!(["rate_limited", "overloaded"].contains(&paused["pause_reason"].as_str().unwrap()), "{paused}");
    let b = api.wait_for(&id, &["completed"], secs(30)).await;
    let (out, err) = final_results(&api, &b, 5).await;
    assert_eq!(out.len(), 4, "529s and a 429 cost no attempt with max_attempts = 1: {err:?}");
    assert_eq!(err.len(), 1);
    let e = &err[0];
    assert_eq!((e["custom_id"].as_str(), e["response"]["status_code"].as_u64()), (Some("broken"), Some(500)), "a 500 uses the one attempt");
    assert_eq!(e["response"]["body"]["error"]["type"], "api_error", "the error body in OpenAI's envelope, Anthropic's type kept: {e}");
    let counts = m.stats_with(secs(60), true).request_id_counts.unwrap();
    let ids = ids_by_custom_id(&out);
    for i in 0..3 {
        assert_eq!(counts[&ids[&format!("busy-{i}")]], 3, "each overloaded line was sent three times: {counts:?}");
    }
    assert_eq!(counts[&ids["limited"]], 2);
    assert!(t0.elapsed() >= secs(2), "the 429's retry-after of 2 s was waited out: {:?}", t0.elapsed());
    // 12 calls in all. Paused, the pool sends the 5 first calls, then nothing until the 429's
    // 2 s are over, then the 4 retries and the 3 last tries of the busy lines: at most 7 in
    // any 1.9 s. Unpaced, the busy lines' retries would follow their 529s within ~0.1 s.
    let densest = m.stats_with(Duration::from_millis(1900), false).max_in_window;
    assert!(densest <= 8, "the pool paused: no burst of retries within the pause ({densest} calls within 1.9 s)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_rate_limit_headers_are_read_into_the_learned_rate() {
    // 1,200 rpm announced in anthropic-ratelimit-requests-* on every answer (resets as RFC 3339
    // times), the bucket nearly empty at the start, 429 rate_limit_error with a whole-second
    // retry-after when empty; no rpm in the config. Read wrongly or not at all, the learned
    // rate is missing or far off (2,553 rpm, measured).
    const N: usize = 120;
    let m = anthropic_mock(MockArgs { latency_ms: 20, rpm: 1200.0, ..Default::default() }).await;
    let r = reqwest::Client::new().post(format!("http://{}/config", m.addr())).json(&json!({"limit_start": 0.01})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let s = anthropic_server(&m, "max_concurrency = 32\nmax_attempts = 2\ndefault_max_tokens = 16");
    let api = s.api();
    let id = api.submit(&chat_lines(N, "claude-x")).await;
    let mut learned = None;
    let deadline = Instant::now() + secs(60);
    let b = loop {
        let b = api.batch(&id).await;
        if let Some(rpm) = b["progress"]["upstreams"][0]["learned_rpm"].as_f64() {
            learned = Some(rpm);
        }
        if b["status"] == "completed" {
            break b;
        }
        assert!(Instant::now() < deadline, "{b}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (out, _) = final_results(&api, &b, N).await;
    assert_eq!(out.len(), N, "no line failed for being rate limited");
    // Anthropic's Retry-After is whole seconds: each 429 used to pause the pool a second,
    // after which the header bucket let a window go on the last `remaining` it saw, which
    // answers reordered across connections can make stale (13 to 36 % of the calls refused).
    // Now a 429 the headers explain waits only for the bucket's next request, and one saying
    // nothing is left resyncs the bucket whatever its order.
    let st = m.stats();
    let refused = st.by_status.get("429").copied().unwrap_or(0) as f64 / st.requests.max(1) as f64;
    println!("anthropic 1,200 rpm: {refused:.3} of {} calls refused, learned {learned:?} rpm", st.requests);
    // Measured 1.6 % and 4 % run alone, 18 % with 28 tests in parallel on a load of 10 (answers
    // reordered across connections by a starved scheduler): a bound below the 13–36 % of
    // before that a loaded CI still meets.
    assert!(refused <= 0.25, "at most a quarter of the calls refused: {refused:.3} of {}", st.requests);
    let learned = learned.expect("the headers' rate is shown while running");
    assert!((900.0..=1400.0).contains(&learned), "learned {learned} rpm from the anthropic-ratelimit-requests-* headers of a 1,200 rpm limit");
}
