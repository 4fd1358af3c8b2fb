//! The mock upstream's Anthropic side: `POST /v1/messages`, answered in Anthropic's shapes
//! with every failure knob of the OpenAI endpoints (latency, error and 429 rates, hangs,
//! the server-side limits, token usage, the per-request `"mock"` object).
//!
//! A request goes through the same pipeline as the OpenAI endpoints (`handlers::handle`,
//! which answers a success with [`message`]); what differs is at the edges:
//! - in: the key is read from `x-api-key` (not `Authorization`), and `anthropic-version` is
//!   required, as Anthropic's API requires it (400 without);
//! - out: error bodies in Anthropic's envelope `{"type": "error", "error": {"type", "message"}}`
//!   with Anthropic's statuses — a concurrency cap's refusal is `529 overloaded_error`, an
//!   exhausted quota `402 billing_error`, a 429 `rate_limit_error` with `retry-after` (and no
//!   `retry-after-ms`); the rate limiter's headers as `anthropic-ratelimit-{requests,tokens}-
//!   {limit,remaining,reset}` with RFC 3339 resets; the request id as `request-id`.
//!
//! A Message echoes the last user message like the chat answer does, and behaves as the real
//! API does where the translation needs to be exercised: a `tool_choice` of `any` or `tool`
//! is answered by a `tool_use` block (`stop_reason: "tool_use"`), a stop sequence found in the
//! text cuts it there (`stop_sequence`), and more completion tokens than `max_tokens` stop at
//! `max_tokens` (usage counts only those).

use std::time::{Duration, SystemTime};

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{json, Value};

use super::bodies::{self, Endpoint, Usage};
use super::handlers::{self, St};
use super::state::Shared;
use crate::upstream::translate::anthropic_error_type;

/// The largest error body reshaped (the mock's own are a few hundred bytes).
const MAX_ERROR_BODY: usize = 64 << 10;

/// `POST /v1/messages`.
pub async fn handle(State(sh): St, mut headers: HeaderMap, body: Bytes) -> Response {
    if !headers.contains_key("anthropic-version") {
        let resp = error(StatusCode::BAD_REQUEST, "invalid_request_error", "anthropic-version: header is required");
        return with_request_id(resp, &handlers::rid_for(&sh, &headers));
    }
    headers.remove(header::AUTHORIZATION);
    if let Some(key) = headers.get("x-api-key").and_then(|k| k.to_str().ok()).and_then(|k| HeaderValue::from_str(&format!("Bearer {k}")).ok()) {
        headers.insert(header::AUTHORIZATION, key);
    }
    let resp = handlers::handle(Endpoint::Messages, State(sh), headers, body).await;
    anthropic_shape(resp).await
}

/// A response of the shared pipeline in Anthropic's shapes (headers always; the body of a
/// JSON error answer).
async fn anthropic_shape(resp: Response) -> Response {
    let (mut parts, body) = resp.into_parts();
    rename_headers(&mut parts.headers);
    let is_json = parts.headers.get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if parts.status.is_success() || !is_json {
        return Response::from_parts(parts, body);
    }
    let Ok(bytes) = axum::body::to_bytes(body, MAX_ERROR_BODY).await else { return Response::from_parts(parts, axum::body::Body::empty()) };
    let (status, kind, message) = error_of(parts.status, &bytes);
    parts.status = status;
    let envelope = json!({"type": "error", "error": {"type": kind, "message": message}});
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(envelope.to_string()))
}

/// The status, Anthropic error type and message of one of the mock's OpenAI-shaped errors.
fn error_of(status: StatusCode, body: &[u8]) -> (StatusCode, &'static str, String) {
    let v: Value = serde_json::from_slice(body).unwrap_or_default();
    let e = &v["error"];
    let message = e["message"].as_str().or(e.as_str()).unwrap_or("error").to_string();
    if v["error_type"] == "overloaded" {
        return (StatusCode::from_u16(529).expect("529 is a status"), "overloaded_error", message);
    }
    if e["code"] == "insufficient_quota" {
        return (StatusCode::PAYMENT_REQUIRED, "billing_error", message);
    }
    (status, anthropic_error_type(status.as_u16()), message)
}

/// `x-request-id` as `request-id`; `x-ratelimit-<part>-<kind>` as
/// `anthropic-ratelimit-<kind>-<part>` (resets as RFC 3339 times); no `retry-after-ms`.
fn rename_headers(h: &mut HeaderMap) {
    if let Some(id) = h.remove("x-request-id") {
        h.insert("request-id", id);
    }
    h.remove("retry-after-ms");
    for kind in ["requests", "tokens"] {
        for part in ["limit", "remaining", "reset"] {
            let Some(v) = h.remove(format!("x-ratelimit-{part}-{kind}").as_str()) else { continue };
            let v = if part == "reset" { rfc3339_after(&v) } else { Some(v) };
            if let (Ok(name), Some(v)) = (HeaderName::from_bytes(format!("anthropic-ratelimit-{kind}-{part}").as_bytes()), v) {
                h.insert(name, v);
            }
        }
    }
}

/// A Go duration (`1.5s`) as the RFC 3339 time that far from now.
fn rfc3339_after(v: &HeaderValue) -> Option<HeaderValue> {
    let wait = crate::upstream::parse_go_duration(v.to_str().ok()?)?;
    let at = chrono::DateTime::<chrono::Utc>::from(SystemTime::now() + wait + Duration::from_millis(999));
    HeaderValue::from_str(&at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)).ok()
}

fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    let body = json!({"type": "error", "error": {"type": kind, "message": message}});
    (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

fn with_request_id(mut resp: Response, rid: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(rid) {
        resp.headers_mut().insert("request-id", v);
    }
    resp
}

/// The usage of a Message: no more completion tokens than the request's `max_tokens`.
pub fn usage(req: &Value, u: Usage) -> Usage {
    let max = req.get("max_tokens").and_then(Value::as_u64).unwrap_or(u64::MAX);
    Usage { completion: u.completion.min(max), ..u }
}

/// A successful Message (see the module's doc for how it stops).
pub fn message(sh: &Shared, model: &str, req: &Value, u: Usage) -> Value {
    let (content, stop_reason, stop_sequence) = match forced_tool(req) {
        Some(name) => (json!([{"type": "tool_use", "id": sh.new_id("toolu_"), "name": name, "input": {}}]), "tool_use", Value::Null),
        None => text_answer(req, u),
    };
    json!({
        "id": sh.new_id("msg_"), "type": "message", "role": "assistant", "model": model,
        "content": content, "stop_reason": stop_reason, "stop_sequence": stop_sequence,
        "usage": {"input_tokens": u.prompt, "output_tokens": u.completion, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0},
    })
}

/// The tool a `tool_choice` of `tool` (by name) or `any` (the first tool) makes the model call.
fn forced_tool(req: &Value) -> Option<String> {
    let choice = req.get("tool_choice")?;
    let first = || req.get("tools")?.get(0)?.get("name")?.as_str().map(str::to_owned);
    match choice.get("type")?.as_str()? {
        "tool" => choice.get("name")?.as_str().map(str::to_owned),
        "any" => first(),
        _ => None,
    }
}

fn text_answer(req: &Value, u: Usage) -> (Value, &'static str, Value) {
    let mut text = bodies::echo(bodies::last_text(req.get("messages")));
    let stops = req.get("stop_sequences").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str);
    if let Some((at, seq)) = stops.filter_map(|s| text.find(s).map(|at| (at, s))).min() {
        text.truncate(at);
        return (json!([{"type": "text", "text": text}]), "stop_sequence", Value::String(seq.into()));
    }
    let capped = req.get("max_tokens").and_then(Value::as_u64).is_some_and(|m| u.completion >= m);
    (json!([{"type": "text", "text": text}]), if capped { "max_tokens" } else { "end_turn" }, Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_take_anthropics_types_and_statuses() {
        let capacity = br#"{"error":"Model is overloaded","error_type":"overloaded"}"#;
        assert_eq!(error_of(StatusCode::TOO_MANY_REQUESTS, capacity), (StatusCode::from_u16(529).unwrap(), "overloaded_error", "Model is overloaded".into()));
        let quota = br#"{"error":{"message":"quota","type":"insufficient_quota","code":"insufficient_quota"}}"#;
        assert_eq!(error_of(StatusCode::TOO_MANY_REQUESTS, quota).0, StatusCode::PAYMENT_REQUIRED);
        let limited = br#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#;
        assert_eq!(error_of(StatusCode::TOO_MANY_REQUESTS, limited).1, "rate_limit_error");
        assert_eq!(error_of(StatusCode::INTERNAL_SERVER_ERROR, b"{}").1, "api_error");
    }

    #[test]
    fn rate_limit_headers_take_anthropics_names() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("x-ratelimit-limit-requests", "60"),
            ("x-ratelimit-remaining-requests", "59"),
            ("x-ratelimit-reset-requests", "1s"),
            ("retry-after-ms", "5"),
            ("x-request-id", "r1"),
        ] {
            h.insert(k, HeaderValue::from_static(v));
        }
        rename_headers(&mut h);
        assert_eq!(h["anthropic-ratelimit-requests-limit"], "60");
        assert_eq!(h["anthropic-ratelimit-requests-remaining"], "59");
        let reset = chrono::DateTime::parse_from_rfc3339(h["anthropic-ratelimit-requests-reset"].to_str().unwrap()).unwrap();
        let ahead = reset.timestamp() - chrono::DateTime::<chrono::Utc>::from(SystemTime::now()).timestamp();
        assert!((1..=2).contains(&ahead), "{ahead}");
        assert_eq!(h["request-id"], "r1");
        assert!(!h.contains_key("retry-after-ms") && !h.contains_key("x-ratelimit-limit-requests"));
    }

    #[test]
    fn answers_stop_as_the_request_says() {
        let u = Usage { prompt: 5, completion: 16, cached: None };
        let req =
            json!({"max_tokens": 100, "messages": [{"role": "user", "content": "count to three, then END and more"}], "stop_sequences": ["END", "three"]});
        let (content, stop, seq) = text_answer(&req, u);
        assert_eq!(
            (content[0]["text"].as_str(), stop, seq.as_str()),
            (Some("echo: count to "), "stop_sequence", Some("three")),
            "the first sequence in the text"
        );
        let short = json!({"max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]});
        assert_eq!(text_answer(&short, usage(&short, u)).1, "max_tokens");
        assert_eq!(usage(&short, u).completion, 4);
        let tools = json!({"tools": [{"name": "a"}, {"name": "b"}], "tool_choice": {"type": "any"}});
        assert_eq!(forced_tool(&tools).as_deref(), Some("a"));
        assert_eq!(forced_tool(&json!({"tools": [{"name": "a"}], "tool_choice": {"type": "tool", "name": "b"}})).as_deref(), Some("b"));
        assert_eq!(forced_tool(&json!({"tools": [{"name": "a"}], "tool_choice": {"type": "auto"}})), None);
    }

    mod http {
        use super::super::super::{MockArgs, MockServer};
        use serde_json::{json, Value};

        async fn start(a: MockArgs) -> MockServer {
            MockServer::start(MockArgs { listen: "127.0.0.1:0".into(), ..a }).await.unwrap()
        }

        async fn post(srv: &MockServer, body: &Value, headers: &[(&str, &str)]) -> (u16, reqwest::header::HeaderMap, Value) {
            let mut req = reqwest::Client::new().post(format!("{}/messages", srv.base_url())).json(body);
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            let r = req.send().await.unwrap();
            let (status, h) = (r.status().as_u16(), r.headers().clone());
            (status, h, r.json().await.unwrap())
        }

        const VERSION: (&str, &str) = ("anthropic-version", "2023-06-01");

        fn request(extra: Value) -> Value {
            let mut r = json!({"model": "claude-x", "max_tokens": 100, "messages": [{"role": "user", "content": "hello there"}]});
            for (k, v) in extra.as_object().unwrap() {
                r[k] = v.clone();
            }
            r
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_message_with_usage_and_request_id() {
            let srv = start(MockArgs { completion_tokens: 7, api_key: Some("sk-ant".into()), ..Default::default() }).await;
            let body = request(json!({}));
            let (st, h, v) = post(&srv, &body, &[VERSION, ("x-api-key", "sk-ant"), ("x-request-id", "rid-1")]).await;
            assert_eq!(st, 200, "{v}");
            assert_eq!((v["type"].as_str(), v["role"].as_str(), v["model"].as_str()), (Some("message"), Some("assistant"), Some("claude-x")));
            assert!(v["id"].as_str().unwrap().starts_with("msg_"));
            assert_eq!(v["content"], json!([{"type": "text", "text": "echo: hello there"}]));
            assert_eq!((v["stop_reason"].as_str(), v["stop_sequence"].is_null()), (Some("end_turn"), true));
            let prompt = (serde_json::to_vec(&body).unwrap().len() / 4) as u64;
            assert_eq!(v["usage"], json!({"input_tokens": prompt, "output_tokens": 7, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}));
            assert_eq!(h["request-id"], "rid-1");
            assert!(!h.contains_key("x-request-id"));
            assert_eq!((srv.stats().prompt_tokens, srv.stats().completion_tokens), (prompt, 7));
            let (st, _, v) = post(&srv, &body, &[VERSION, ("authorization", "Bearer sk-ant")]).await;
            assert_eq!((st, v["type"].as_str(), v["error"]["type"].as_str()), (401, Some("error"), Some("authentication_error")), "the key goes in x-api-key");
            let (st, _, v) = post(&srv, &body, &[("x-api-key", "sk-ant")]).await;
            assert_eq!((st, v["error"]["type"].as_str()), (400, Some("invalid_request_error")), "anthropic-version is required");
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn failures_in_anthropics_envelope() {
            let srv = start(MockArgs::default()).await;
            let (st, h, v) = post(&srv, &request(json!({"mock": {"status": 429, "retry_after_s": 2}})), &[VERSION]).await;
            assert_eq!(
                v,
                json!({"type": "error", "error": {"type": "rate_limit_error", "message": "Rate limit reached (simulated by batchd mock upstream)."}})
            );
            assert_eq!((st, h["retry-after"].to_str().unwrap()), (429, "2"));
            assert!(!h.contains_key("retry-after-ms"), "Anthropic sends retry-after only");
            let (st, _, v) = post(&srv, &request(json!({"mock": {"status": 529}})), &[VERSION]).await;
            assert_eq!((st, v["error"]["type"].as_str()), (529, Some("overloaded_error")));
            let (st, _, v) = post(&srv, &request(json!({"mock": {"status": 500}})), &[VERSION]).await;
            assert_eq!((st, v["error"]["type"].as_str()), (500, Some("api_error")));
            let (st, _, v) = post(&srv, &request(json!({"mock": {"status": 200, "completion_tokens": 500}})), &[VERSION]).await;
            assert_eq!((st, v["stop_reason"].as_str(), v["usage"]["output_tokens"].as_u64()), (200, Some("max_tokens"), Some(100)), "capped at max_tokens");
            let (_, _, v) =
                post(&srv, &request(json!({"tools": [{"name": "lookup", "input_schema": {"type": "object"}}], "tool_choice": {"type": "any"}})), &[VERSION])
                    .await;
            assert_eq!(
                (v["stop_reason"].as_str(), v["content"][0]["type"].as_str(), v["content"][0]["name"].as_str()),
                (Some("tool_use"), Some("tool_use"), Some("lookup"))
            );
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn limits_answer_as_anthropic_does() {
            let srv = start(MockArgs { rpm: 60.0, ..Default::default() }).await;
            let (st, h, _) = post(&srv, &request(json!({})), &[VERSION]).await;
            assert_eq!(st, 200);
            assert_eq!(
                (h["anthropic-ratelimit-requests-limit"].to_str().unwrap(), h["anthropic-ratelimit-requests-remaining"].to_str().unwrap()),
                ("60", "59")
            );
            assert!(chrono::DateTime::parse_from_rfc3339(h["anthropic-ratelimit-requests-reset"].to_str().unwrap()).is_ok());
            assert!(!h.contains_key("x-ratelimit-limit-requests"));
            let capped = start(MockArgs { capacity: 1, latency_ms: 300, ..Default::default() }).await;
            let body = request(json!({}));
            let (a, b) = tokio::join!(post(&capped, &body, &[VERSION]), post(&capped, &body, &[VERSION]));
            let mut statuses = [a.0, b.0];
            statuses.sort();
            assert_eq!(statuses, [200, 529], "over capacity is overloaded_error");
            let broke = start(MockArgs::default()).await;
            reqwest::Client::new().post(format!("http://{}/config", broke.addr())).json(&json!({"quota_exhausted": true})).send().await.unwrap();
            let (st, _, v) = post(&broke, &request(json!({})), &[VERSION]).await;
            assert_eq!((st, v["error"]["type"].as_str()), (402, Some("billing_error")));
        }
    }
}
