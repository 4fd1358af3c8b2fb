//! HTTP handlers of the mock upstream: the OpenAI-compatible `/v1/*` endpoints
//! (with random faults and per-request `"mock"` control) and the `/config`
//! and `/stats` admin endpoints.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;

use super::bodies::{self, Endpoint, Usage};
use super::state::{hash_bytes, Behaviour, BehaviourPatch, Shared};

pub type St = State<Arc<Shared>>;

const REQUEST_ID: &str = "x-request-id";
const DEFAULT_WINDOW_MS: u64 = 60_000;

/// Per-request overrides, read from the top-level `"mock"` object of a request body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Control {
    status: Option<u16>,
    latency_ms: Option<u64>,
    #[serde(default)]
    hang: bool,
    retry_after_s: Option<f64>,
    fail_times: Option<u32>,
    body_text: Option<String>,
    completion_tokens: Option<u32>,
}

/// What to do with one request.
#[derive(Debug)]
enum Plan {
    Hang,
    Fail { status: u16, retry_after_s: f64, body_text: Option<String> },
    Succeed { completion_tokens: u32 },
}

/// Handles one POST `/v1/*` request, keeping the in-flight count and stats.
pub async fn handle(ep: Endpoint, State(sh): St, headers: HeaderMap, body: Bytes) -> Response {
    let _flight = sh.enter();
    let client_rid = headers.get(REQUEST_ID).and_then(|v| v.to_str().ok());
    let seen = sh.arrive(client_rid);
    let rid = client_rid.map_or_else(|| sh.new_id("req_"), str::to_owned);
    let resp = match process(ep, &sh, &headers, &body, seen).await {
        Some(r) => {
            sh.record_status(r.status().as_u16());
            r
        }
        None => error_response(503, "The mock upstream is shutting down."),
    };
    with_rid(resp, &rid)
}

/// Answers a request; `None` means it hung until the server shut down.
async fn process(ep: Endpoint, sh: &Shared, headers: &HeaderMap, body: &Bytes, seen: u64) -> Option<Response> {
    let (req, ctl) = match prepare(sh, headers, body) {
        Ok(x) => x,
        Err(resp) => return Some(resp),
    };
    let cfg = sh.behaviour();
    let attempt = || if seen > 0 { seen } else { sh.body_attempt(hash_bytes(body)) };
    let plan = match &ctl {
        Some(c) => controlled_plan(ep, &cfg, c, attempt),
        None => random_plan(ep, sh, &cfg),
    };
    let base_ms = ctl.as_ref().and_then(|c| c.latency_ms).unwrap_or(cfg.latency_ms) as f64;
    match plan {
        Plan::Hang => {
            sh.record_hang();
            let _ = sh.shutdown.clone().wait_for(|stop| *stop).await;
            None
        }
        Plan::Fail { status, retry_after_s, body_text } => {
            sleep_ms(base_ms).await;
            Some(fail_response(status, retry_after_s, body_text))
        }
        Plan::Succeed { completion_tokens } => {
            sleep_ms(base_ms + cfg.per_token_ms * completion_tokens as f64).await;
            Some(succeed(ep, sh, &req, body.len(), completion_tokens))
        }
    }
}

/// Auth check, JSON parsing and `"mock"` extraction; `Err` is a ready answer.
#[allow(clippy::result_large_err)]
fn prepare(sh: &Shared, headers: &HeaderMap, body: &[u8]) -> Result<(Value, Option<Control>), Response> {
    if !authorized(sh, headers) {
        return Err(unauthorized());
    }
    let req: Value = match serde_json::from_slice(body) {
        Ok(v @ Value::Object(_)) => v,
        _ => return Err(error_response(400, "We could not parse the JSON body of your request.")),
    };
    let ctl = match req.get("mock") {
        None => None,
        Some(m) => Some(Control::deserialize(m).map_err(|e| error_response(400, &format!("invalid \"mock\" object: {e}")))?),
    };
    Ok((req, ctl))
}

fn controlled_plan(ep: Endpoint, cfg: &Behaviour, c: &Control, attempt: impl FnOnce() -> u64) -> Plan {
    if c.hang {
        return Plan::Hang;
    }
    let default_status = if c.fail_times.is_some() { 500 } else { 200 };
    let status = c.status.unwrap_or(default_status);
    let faulty = c.body_text.is_some() || !(200..300).contains(&status);
    let fail = match c.fail_times {
        Some(n) => attempt() <= u64::from(n),
        None => faulty,
    };
    if fail {
        let retry_after_s = c.retry_after_s.unwrap_or(cfg.retry_after_s);
        return Plan::Fail { status, retry_after_s, body_text: c.body_text.clone() };
    }
    let tokens = c.completion_tokens.unwrap_or(cfg.completion_tokens);
    Plan::Succeed { completion_tokens: if ep.generates() { tokens } else { 0 } }
}

fn random_plan(ep: Endpoint, sh: &Shared, cfg: &Behaviour) -> Plan {
    let u = sh.draw();
    let fail = |status| Plan::Fail { status, retry_after_s: cfg.retry_after_s, body_text: None };
    if u < cfg.hang_rate {
        Plan::Hang
    } else if u < cfg.hang_rate + cfg.rate_429 {
        fail(429)
    } else if u < cfg.hang_rate + cfg.rate_429 + cfg.error_rate {
        fail(500)
    } else {
        Plan::Succeed { completion_tokens: if ep.generates() { cfg.completion_tokens } else { 0 } }
    }
}

async fn sleep_ms(ms: f64) {
    if ms > 0.0 {
        tokio::time::sleep(Duration::from_secs_f64(ms / 1000.0)).await;
    }
}

fn succeed(ep: Endpoint, sh: &Shared, req: &Value, body_len: usize, completion_tokens: u32) -> Response {
    let u = Usage { prompt: (body_len as u64 / 4).max(1), completion: u64::from(completion_tokens) };
    let json = bodies::success(ep, sh, req, u);
    sh.record_success(u.prompt, u.completion);
    json_response(StatusCode::OK, &json)
}

fn authorized(sh: &Shared, headers: &HeaderMap) -> bool {
    let Some(key) = &sh.api_key else { return true };
    let given = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    given.and_then(|v| v.strip_prefix("Bearer ")) == Some(key.as_str())
}

fn unauthorized() -> Response {
    let msg = "Incorrect API key provided. You can find your API key in your batchd mock configuration.";
    let body = bodies::error_envelope(msg, "invalid_request_error", Some("invalid_api_key"));
    json_response(StatusCode::UNAUTHORIZED, &body)
}

fn status_code(status: u16) -> StatusCode {
    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// Error envelope whose `type`/`code` follow the status like OpenAI's do.
fn error_response(status: u16, message: &str) -> Response {
    let (kind, code) = match status {
        429 => ("requests", Some("rate_limit_exceeded")),
        400..=499 => ("invalid_request_error", None),
        _ => ("server_error", None),
    };
    json_response(status_code(status), &bodies::error_envelope(message, kind, code))
}

fn fail_response(status: u16, retry_after_s: f64, body_text: Option<String>) -> Response {
    let mut resp = match body_text {
        Some(text) => (status_code(status), [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response(),
        None => error_response(status, &failure_message(status)),
    };
    if status == 429 {
        let h = resp.headers_mut();
        h.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s.ceil() as u64));
        h.insert("retry-after-ms", HeaderValue::from((retry_after_s * 1000.0).round() as u64));
    }
    resp
}

fn failure_message(status: u16) -> String {
    match status {
        429 => "Rate limit reached (simulated by batchd mock upstream).".into(),
        500 => "The server had an error while processing your request (simulated).".into(),
        s => format!("Simulated upstream error with status {s}."),
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    (status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response()
}

fn with_rid(mut resp: Response, rid: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(rid) {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    resp
}

fn rid_for(sh: &Shared, headers: &HeaderMap) -> String {
    let given = headers.get(REQUEST_ID).and_then(|v| v.to_str().ok());
    given.map_or_else(|| sh.new_id("req_"), str::to_owned)
}

/// `GET /v1/models`.
pub async fn models(State(sh): St, headers: HeaderMap) -> Response {
    let resp = if authorized(&sh, &headers) { json_response(StatusCode::OK, &bodies::models()) } else { unauthorized() };
    with_rid(resp, &rid_for(&sh, &headers))
}

/// Any other path: OpenAI-style 404.
pub async fn not_found(State(sh): St, headers: HeaderMap) -> Response {
    with_rid(error_response(404, "Unknown endpoint (batchd mock upstream)."), &rid_for(&sh, &headers))
}

/// `GET /config`: the live behaviour settings.
pub async fn get_config(State(sh): St) -> Response {
    json_response(StatusCode::OK, &serde_json::to_value(sh.behaviour()).unwrap_or_default())
}

/// `POST /config`: replace the behaviour fields present in the JSON body.
pub async fn set_config(State(sh): St, body: Bytes) -> Response {
    let patch: BehaviourPatch = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => return error_response(400, &format!("invalid config: {e}")),
    };
    let mut cfg = sh.cfg.write().unwrap_or_else(|e| e.into_inner());
    match cfg.patched(patch) {
        Ok(new) => {
            *cfg = new;
            json_response(StatusCode::OK, &serde_json::to_value(new).unwrap_or_default())
        }
        Err(e) => error_response(400, &format!("invalid config: {e}")),
    }
}

#[derive(Debug, Deserialize)]
pub struct StatsQuery {
    window_ms: Option<u64>,
    ids: Option<String>,
}

/// `GET /stats?window_ms=N&ids=1`.
pub async fn get_stats(State(sh): St, Query(q): Query<StatsQuery>) -> Response {
    let window = Duration::from_millis(q.window_ms.unwrap_or(DEFAULT_WINDOW_MS));
    let ids = matches!(q.ids.as_deref(), Some("1" | "true" | "yes"));
    json_response(StatusCode::OK, &serde_json::to_value(sh.stats(window, ids)).unwrap_or_default())
}

/// `POST /stats/reset`.
pub async fn reset_stats(State(sh): St) -> StatusCode {
    sh.reset();
    StatusCode::NO_CONTENT
}
