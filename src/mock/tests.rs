//! End-to-end tests of the mock upstream over real HTTP (reqwest against a
//! `MockServer` on port 0).

use std::time::{Duration, Instant};

use reqwest::{Client, StatusCode};
use serde_json::{json, Value};

use super::{MockArgs, MockServer};

fn args() -> MockArgs {
    MockArgs { listen: "127.0.0.1:0".into(), ..MockArgs::default() }
}

async fn start(a: MockArgs) -> MockServer {
    MockServer::start(a).await.expect("mock starts")
}

fn chat_body(text: &str) -> Value {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": text}]})
}

async fn post(srv: &MockServer, path: &str, body: &Value, rid: Option<&str>) -> reqwest::Response {
    let mut req = Client::new().post(format!("{}{path}", srv.base_url())).json(body);
    if let Some(rid) = rid {
        req = req.header("x-request-id", rid);
    }
    req.send().await.expect("request sent")
}

fn header<'a>(r: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    r.headers().get(name).and_then(|v| v.to_str().ok())
}

fn prompt_tokens(body: &Value) -> u64 {
    (serde_json::to_vec(body).unwrap().len() as u64 / 4).max(1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_success_shape_and_usage() {
    let srv = start(MockArgs { completion_tokens: 7, ..args() }).await;
    assert_ne!(srv.addr().port(), 0);
    let body = chat_body("what is the answer to life, the universe and everything? 42");
    let r = post(&srv, "/chat/completions", &body, None).await;
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["model"], "gpt-4o-mini");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], "echo: what is the answer to life, the universe");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let p = prompt_tokens(&body);
    assert_eq!(v["usage"], json!({"prompt_tokens": p, "completion_tokens": 7, "total_tokens": p + 7}));
    let s = srv.stats();
    assert_eq!((s.requests, s.prompt_tokens, s.completion_tokens), (1, p, 7));
    assert_eq!(s.by_status.get("200"), Some(&1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_endpoint_shapes() {
    let srv = start(MockArgs { completion_tokens: 5, ..args() }).await;
    let emb = json!({"model": "text-embedding-3-small", "input": ["a", "b", "c"]});
    let v: Value = post(&srv, "/embeddings", &emb, None).await.json().await.unwrap();
    assert_eq!(v["object"], "list");
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    assert_eq!(data[2]["index"], 2);
    assert_eq!(data[0]["embedding"].as_array().unwrap().len(), 8);
    assert_ne!(data[0]["embedding"], data[1]["embedding"]);
    assert_eq!(v["usage"], json!({"prompt_tokens": prompt_tokens(&emb), "total_tokens": prompt_tokens(&emb)}));

    let resp = json!({"model": "gpt-4o", "input": "tell me a story"});
    let v: Value = post(&srv, "/responses", &resp, None).await.json().await.unwrap();
    assert_eq!(v["object"], "response");
    assert_eq!(v["output"][0]["content"][0]["text"], "echo: tell me a story");
    let p = prompt_tokens(&resp);
    let usage = json!({"input_tokens": p, "output_tokens": 5, "total_tokens": p + 5,
                       "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}});
    assert_eq!(v["usage"], usage);

    let v: Value = post(&srv, "/completions", &json!({"model": "m", "prompt": "hello"}), None).await.json().await.unwrap();
    assert_eq!((v["object"].as_str(), v["choices"][0]["text"].as_str()), (Some("text_completion"), Some("echo: hello")));

    let v: Value = post(&srv, "/moderations", &json!({"input": ["x", "y"]}), None).await.json().await.unwrap();
    assert_eq!(v["results"].as_array().unwrap().len(), 2);
    assert_eq!(v["results"][0]["flagged"], false);

    let v: Value = Client::new().get(format!("{}/models", srv.base_url())).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["object"], "list");
    assert!(v["data"].as_array().unwrap().iter().any(|m| m["id"] == "gpt-4o-mini"));
    // Only generating endpoints count completion tokens: responses + completions.
    assert_eq!(srv.stats().completion_tokens, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_id_is_echoed_or_generated() {
    let srv = start(args()).await;
    let r = post(&srv, "/chat/completions", &chat_body("hi"), Some("line-17")).await;
    assert_eq!(header(&r, "x-request-id"), Some("line-17"));
    let a = post(&srv, "/chat/completions", &chat_body("hi"), None).await;
    let b = post(&srv, "/chat/completions", &chat_body("hi"), None).await;
    let (a, b) = (header(&a, "x-request-id").unwrap(), header(&b, "x-request-id").unwrap());
    assert!(!a.is_empty() && a != b);
    let bad = Client::new().post(format!("{}/embeddings", srv.base_url())).header("x-request-id", "bad-1");
    let r = bad.body("{not json").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(header(&r, "x-request-id"), Some("bad-1"));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(v["error"]["message"].is_string() && v["error"]["param"].is_null() && v["error"]["code"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_request_status_and_fail_times() {
    let srv = start(args()).await;
    let mut body = chat_body("x");
    body["mock"] = json!({"status": 503});
    let r = post(&srv, "/chat/completions", &body, None).await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.json::<Value>().await.unwrap()["error"]["message"].is_string());

    body["mock"] = json!({"fail_times": 2});
    let statuses = [
        post(&srv, "/chat/completions", &body, Some("r1")).await.status(),
        post(&srv, "/chat/completions", &body, Some("r1")).await.status(),
        post(&srv, "/chat/completions", &body, Some("r1")).await.status(),
        post(&srv, "/chat/completions", &body, Some("r2")).await.status(),
    ];
    assert_eq!(statuses.map(|s| s.as_u16()), [500, 500, 200, 500]);

    body["mock"] = json!({"fail_times": 1, "status": 502, "body_text": "<html>bad gateway</html>"});
    let r = post(&srv, "/chat/completions", &body, Some("r3")).await;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(r.text().await.unwrap(), "<html>bad gateway</html>");
    assert_eq!(post(&srv, "/chat/completions", &body, Some("r3")).await.status(), StatusCode::OK);

    // Without an x-request-id, attempts are keyed by the body.
    body["mock"] = json!({"fail_times": 1, "status": 429});
    assert_eq!(post(&srv, "/chat/completions", &body, None).await.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(post(&srv, "/chat/completions", &body, None).await.status(), StatusCode::OK);

    let s = srv.stats();
    assert_eq!(s.by_status.get("500"), Some(&3));
    assert_eq!(s.by_status.get("200"), Some(&3));
    assert_eq!(s.requests, 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_headers() {
    let srv = start(MockArgs { rate_429: 1.0, retry_after_s: 1.2, ..args() }).await;
    let r = post(&srv, "/chat/completions", &chat_body("x"), None).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&r, "retry-after"), Some("2"));
    assert_eq!(header(&r, "retry-after-ms"), Some("1200"));
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], "rate_limit_exceeded");

    let mut body = chat_body("x");
    body["mock"] = json!({"status": 429, "retry_after_s": 0.25});
    let r = post(&srv, "/chat/completions", &body, None).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!((header(&r, "retry-after"), header(&r, "retry-after-ms")), (Some("1"), Some("250")));
    // A request with "mock" is exempt from random faults.
    body["mock"] = json!({"latency_ms": 0});
    assert_eq!(post(&srv, "/chat/completions", &body, None).await.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hang_times_out_without_blocking_others() {
    let srv = start(MockArgs { hang_rate: 1.0, ..args() }).await;
    let client = Client::builder().timeout(Duration::from_millis(300)).build().unwrap();
    let url = format!("{}/chat/completions", srv.base_url());
    let hung = tokio::spawn(client.post(&url).json(&chat_body("x")).send());
    assert!(wait_until(|| srv.stats().hangs == 1).await);
    let mut ok_body = chat_body("y");
    ok_body["mock"] = json!({});
    let ok = client.post(&url).json(&ok_body).send().await;
    assert_eq!(ok.unwrap().status(), StatusCode::OK, "a hanging request blocks nothing");
    assert_eq!(srv.stats().in_flight, 1);
    assert!(hung.await.unwrap().unwrap_err().is_timeout());
    assert!(wait_until(|| srv.stats().in_flight == 0).await, "in_flight returns to 0 after disconnect");
    let s = srv.stats();
    assert_eq!((s.hangs, s.requests, s.peak_in_flight), (1, 2, 2));
    assert_eq!(s.by_status.values().sum::<u64>(), 1, "hangs are not in by_status");
}

async fn wait_until(cond: impl Fn() -> bool) -> bool {
    for _ in 0..100 {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_releases_hanging_requests() {
    let srv = start(args()).await;
    let url = format!("{}/chat/completions", srv.base_url());
    let mut body = chat_body("x");
    body["mock"] = json!({"hang": true});
    let pending = tokio::spawn(async move { Client::new().post(&url).json(&body).send().await });
    assert!(wait_until(|| srv.stats().hangs == 1).await);
    let t = Instant::now();
    srv.shutdown().await;
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(pending.await.unwrap().unwrap().status(), StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peak_in_flight_counts_concurrency() {
    let srv = start(MockArgs { latency_ms: 200, ..args() }).await;
    let client = Client::new();
    let url = format!("{}/chat/completions", srv.base_url());
    let t = Instant::now();
    let reqs = (0..20).map(|i| client.post(&url).json(&chat_body(&format!("q{i}"))).send());
    let results = futures::future::join_all(reqs).await;
    assert!(results.iter().all(|r| r.as_ref().unwrap().status() == StatusCode::OK));
    assert!(t.elapsed() >= Duration::from_millis(200) && t.elapsed() < Duration::from_millis(1500));
    let s = srv.stats();
    assert_eq!((s.peak_in_flight, s.in_flight, s.requests), (20, 0, 20));

    srv.reset_stats();
    for _ in 0..3 {
        post(&srv, "/chat/completions", &chat_body("seq"), None).await;
    }
    let s = srv.stats();
    assert_eq!((s.peak_in_flight, s.requests), (1, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_request_ids_are_counted() {
    let srv = start(args()).await;
    for rid in [Some("a"), Some("a"), Some("b"), Some("a"), None] {
        post(&srv, "/embeddings", &json!({"input": "z"}), rid).await;
    }
    let s = srv.stats();
    assert_eq!((s.requests, s.unique_request_ids, s.duplicate_request_ids), (5, 2, 2));
    assert!(s.request_id_counts.is_none());
    let plain: Value = Client::new().get(format!("http://{}/stats", srv.addr())).send().await.unwrap().json().await.unwrap();
    assert!(plain.get("request_id_counts").is_none());
    let url = format!("http://{}/stats?ids=1", srv.addr());
    let s: super::Stats = Client::new().get(url).send().await.unwrap().json().await.unwrap();
    let counts = s.request_id_counts.unwrap();
    assert_eq!((counts.len(), counts["a"], counts["b"]), (2, 3, 1));

    let r = Client::new().post(format!("http://{}/stats/reset", srv.addr())).send().await.unwrap();
    assert!(r.status().is_success());
    let s = srv.stats();
    assert_eq!((s.requests, s.unique_request_ids, s.prompt_tokens), (0, 0, 0));
    assert!(s.by_status.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_in_window_finds_densest_burst() {
    let srv = start(args()).await;
    let burst = |n: usize| {
        let srv = &srv;
        futures::future::join_all((0..n).map(move |_| async move { post(srv, "/embeddings", &json!({"input": "w"}), None).await }))
    };
    // The gap is long and the window wide, so that a loaded machine spreading a burst over
    // a few hundred milliseconds still finds the same answer.
    burst(5).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    burst(3).await;
    let get = |q: &'static str| {
        let url = format!("http://{}/stats?window_ms={q}", srv.addr());
        async move { Client::new().get(url).send().await.unwrap().json::<Value>().await.unwrap() }
    };
    assert_eq!(get("1000").await["max_in_window"], 5);
    assert_eq!(get("60000").await["max_in_window"], 8);
    assert_eq!(srv.stats().max_in_window, 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_changes_apply_live() {
    let srv = start(args()).await;
    let url = format!("http://{}/config", srv.addr());
    let client = Client::new();
    let r = client.post(&url).json(&json!({"completion_tokens": 3, "latency_ms": 150})).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let cfg: Value = client.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!((cfg["completion_tokens"].as_u64(), cfg["latency_ms"].as_u64()), (Some(3), Some(150)));
    assert_eq!(cfg["retry_after_s"], 1.0, "fields not in the patch are kept");

    let t = Instant::now();
    let v: Value = post(&srv, "/chat/completions", &chat_body("x"), None).await.json().await.unwrap();
    assert!(t.elapsed() >= Duration::from_millis(150));
    assert_eq!(v["usage"]["completion_tokens"], 3);

    for bad in [json!({"error_rate": 2.0}), json!({"bogus": 1})] {
        assert_eq!(client.post(&url).json(&bad).send().await.unwrap().status(), StatusCode::BAD_REQUEST);
    }
    client.post(&url).json(&json!({"rate_429": 1.0, "latency_ms": 0})).send().await.unwrap();
    assert_eq!(srv.behaviour().completion_tokens, 3);
    let r = post(&srv, "/chat/completions", &chat_body("x"), None).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_is_enforced() {
    let srv = start(MockArgs { api_key: Some("sk-test".into()), ..args() }).await;
    let url = format!("{}/chat/completions", srv.base_url());
    let client = Client::new();
    let r = client.post(&url).json(&chat_body("x")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.headers().contains_key("x-request-id"));
    let v: Value = r.json().await.unwrap();
    assert_eq!((v["error"]["type"].as_str(), v["error"]["code"].as_str()), (Some("invalid_request_error"), Some("invalid_api_key")));
    let wrong = client.post(&url).bearer_auth("sk-other").json(&chat_body("x")).send().await.unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let ok = client.post(&url).bearer_auth("sk-test").json(&chat_body("x")).send().await.unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    let models = client.get(format!("{}/models", srv.base_url())).send().await.unwrap();
    assert_eq!(models.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(srv.stats().by_status.get("401"), Some(&2));
}

async fn status_sequence(seed: u64) -> Vec<u16> {
    let srv = start(MockArgs { seed: Some(seed), error_rate: 0.3, rate_429: 0.2, ..args() }).await;
    let mut out = Vec::new();
    for _ in 0..100 {
        out.push(post(&srv, "/embeddings", &json!({"input": "s"}), None).await.status().as_u16());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_faults_are_reproducible_and_proportional() {
    let a = status_sequence(42).await;
    assert_eq!(a, status_sequence(42).await);
    assert_ne!(a, status_sequence(43).await);
    let count = |s: u16| a.iter().filter(|&&x| x == s).count();
    assert!((15..=45).contains(&count(500)), "500s: {}", count(500));
    assert!((8..=35).contains(&count(429)), "429s: {}", count(429));
    assert_eq!(count(200) + count(500) + count(429), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_side_limits_queue_and_metrics() {
    // Latencies long enough that a loaded machine still has all three requests in flight at once.
    let srv = start(MockArgs { latency_ms: 1000, capacity: 2, ..args() }).await;
    let body = chat_body("x");
    let three = futures::future::join_all((0..3).map(|_| post(&srv, "/chat/completions", &body, None))).await;
    let mut statuses: Vec<u16> = three.iter().map(|r| r.status().as_u16()).collect();
    statuses.sort();
    assert_eq!(statuses, [200, 200, 429], "the third request in flight is refused at once");
    let refused = three.into_iter().find(|r| r.status() == StatusCode::TOO_MANY_REQUESTS).unwrap();
    assert!(header(&refused, "retry-after").is_none(), "a capacity 429 carries no header");

    let url = format!("http://{}/config", srv.addr());
    let client = Client::new();
    client.post(&url).json(&json!({"capacity": 0, "slots": 1, "latency_ms": 2000, "extra_waiting": 2})).send().await.unwrap();
    let t = Instant::now();
    let two = futures::future::join_all((0..2).map(|_| post(&srv, "/chat/completions", &body, None)));
    let want = "vllm:num_requests_waiting{model_name=\"mock-model\"} 3";
    let metrics = async {
        // Read while the first request holds the slot (2 s): 1 queued + 2 extra. At least one
        // read, however late a loaded machine lets it start.
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let text = client.get(format!("http://{}/metrics", srv.addr())).send().await.unwrap().text().await.unwrap();
            if text.contains(want) || t.elapsed() > Duration::from_millis(1800) {
                break text;
            }
        }
    };
    let (two, metrics) = tokio::join!(two, metrics);
    assert!(two.iter().all(|r| r.status() == StatusCode::OK));
    assert!(t.elapsed() >= Duration::from_millis(4000), "one slot: the second request waited for the first");
    assert!(metrics.contains(want), "1 queued + 2 extra: {metrics}");

    // 6 rpm with one request's worth left: the next token is 10 s away, however slow the
    // machine is between the two requests.
    client.post(&url).json(&json!({"slots": 0, "latency_ms": 0, "rpm": 6, "limit_start": 0.17})).send().await.unwrap();
    let ok = post(&srv, "/chat/completions", &body, None).await;
    assert_eq!(ok.status(), StatusCode::OK);
    assert_eq!(header(&ok, "x-ratelimit-limit-requests"), Some("6"));
    assert_eq!(header(&ok, "x-ratelimit-remaining-requests"), Some("0"));
    let limited = post(&srv, "/chat/completions", &body, None).await;
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(header(&limited, "retry-after-ms").is_some_and(|v| v.parse::<u64>().unwrap() > 0));

    client.post(&url).json(&json!({"rpm": 0, "quota_exhausted": true})).send().await.unwrap();
    let broke = post(&srv, "/chat/completions", &body, None).await;
    assert_eq!(broke.status(), StatusCode::TOO_MANY_REQUESTS);
    let v: Value = broke.json().await.unwrap();
    assert_eq!(v["error"]["code"], "insufficient_quota");

    // nginx's default refusals: 503 for limit_conn (capacity) and limit_req, with no header.
    client.post(&url).json(&json!({"quota_exhausted": false, "limit_rps": 1, "refusal_status": 503})).send().await.unwrap();
    let first = post(&srv, "/chat/completions", &body, None).await;
    let second = post(&srv, "/chat/completions", &body, None).await;
    assert_eq!((first.status().as_u16(), second.status().as_u16()), (200, 503), "the second within a second is refused with 503");
    assert!(header(&second, "retry-after").is_none());
    let bad = client.post(&url).json(&json!({"refusal_status": 500})).send().await.unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST, "only 429 or 503");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_are_compressed_only_when_asked_for() {
    let srv = start(args()).await;
    let mut body = chat_body("x");
    body["mock"] = json!({"encoding": "gzip", "id_header": "x-litellm-call-id"});
    let plain = Client::new(); // reqwest without its gzip feature sends no Accept-Encoding
    let r = plain.post(format!("{}/chat/completions", srv.base_url())).json(&body).send().await.unwrap();
    assert!(header(&r, "content-encoding").is_none(), "no Accept-Encoding, no compression");
    assert!(header(&r, "x-litellm-call-id").is_some() && header(&r, "x-request-id").is_none());
    let r = plain.post(format!("{}/chat/completions", srv.base_url())).header("accept-encoding", "gzip, zstd").json(&body).send().await.unwrap();
    assert_eq!(header(&r, "content-encoding"), Some("gzip"));
    assert_eq!(srv.stats().compressed_answers, 1);
}
