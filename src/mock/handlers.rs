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

use super::behaviour::{Behaviour, BehaviourPatch};
use super::bodies::{self, Endpoint, Usage};
use super::limits::Refusal;
use super::state::{hash_bytes, Shared};
use std::sync::atomic::Ordering::Relaxed;

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
    /// `gzip` or `zstd`: compress a successful answer when the request accepts it.
    encoding: Option<String>,
    /// Send the request id under this header instead of `x-request-id` (as proxies do:
    /// `x-litellm-call-id`, `request-id`).
    id_header: Option<String>,
}

/// The header a response carries its request id under, when not `x-request-id`.
#[derive(Clone)]
struct IdHeader(String);

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
    let mut limit_headers = HeaderMap::new();
    if let Some(refused) = refuse(sh, &cfg, body.len(), &mut limit_headers) {
        return Some(refused);
    }
    let _slot = if cfg.slots > 0 {
        sh.queued.fetch_add(1, Relaxed);
        let slot = sh.limits.slot().await;
        sh.queued.fetch_sub(1, Relaxed);
        slot
    } else {
        None
    };
    let id_header = ctl.as_ref().and_then(|c| c.id_header.clone());
    let mut resp = serve(ep, sh, headers, body, seen, req, ctl, cfg).await?;
    if let Some(h) = id_header {
        resp.extensions_mut().insert(IdHeader(h));
    }
    Some(with_headers(resp, limit_headers))
}

/// The server-side limits (see `limits`): an answer when the request is refused at once.
fn refuse(sh: &Shared, cfg: &Behaviour, body_len: usize, limit_headers: &mut HeaderMap) -> Option<Response> {
    if cfg.quota_exhausted {
        let msg = "You exceeded your current quota, please check your plan and billing details (simulated).";
        let body = bodies::error_envelope(msg, "insufficient_quota", Some("insufficient_quota"));
        return Some(json_response(StatusCode::TOO_MANY_REQUESTS, &body));
    }
    let limited = cfg.rpm > 0.0 || cfg.tpm > 0.0 || cfg.limit_rps > 0.0;
    let tokens = (body_len / 4) as f64 + cfg.completion_tokens as f64;
    match if limited { sh.limits.admit(tokens, limit_headers) } else { Ok(()) } {
        Ok(()) => {}
        Err(Refusal::Nginx) => return Some(nginx_refusal(cfg.refusal_status)),
        Err(Refusal::RateLimited { wait }) => {
            let mut resp = error_response(429, "Rate limit reached for requests (simulated OpenAI limiter).");
            resp.headers_mut().insert("retry-after-ms", HeaderValue::from(wait.as_millis().max(1) as u64));
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(wait.as_secs_f64().ceil() as u64));
            return Some(with_headers(resp, std::mem::take(limit_headers)));
        }
    }
    if cfg.capacity > 0 && sh.in_flight() > cfg.capacity {
        if cfg.refusal_status == 503 {
            return Some(nginx_refusal(503));
        }
        let body = serde_json::json!({"error": "Model is overloaded", "error_type": "overloaded"});
        return Some(json_response(StatusCode::TOO_MANY_REQUESTS, &body));
    }
    None
}

const NGINX_429: &str = "<html>\r\n<head><title>429 Too Many Requests</title></head>\r\n<body>\r\n<center><h1>429 Too Many Requests</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n";
const NGINX_503: &str = "<html>\r\n<head><title>503 Service Temporarily Unavailable</title></head>\r\n<body>\r\n<center><h1>503 Service Temporarily Unavailable</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n";

/// nginx's refusal page for `limit_req` / `limit_conn`: 429, or its default 503.
fn nginx_refusal(status: u16) -> Response {
    let (code, page) = if status == 503 { (StatusCode::SERVICE_UNAVAILABLE, NGINX_503) } else { (StatusCode::TOO_MANY_REQUESTS, NGINX_429) };
    (code, [(header::CONTENT_TYPE, "text/html")], page).into_response()
}

fn with_headers(mut resp: Response, extra: HeaderMap) -> Response {
    resp.headers_mut().extend(extra);
    resp
}

/// Plans and answers a request admitted by the limits.
#[allow(clippy::too_many_arguments)]
async fn serve(ep: Endpoint, sh: &Shared, headers: &HeaderMap, body: &Bytes, seen: u64, req: Value, ctl: Option<Control>, cfg: Behaviour) -> Option<Response> {
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
            let per_token = if sh.sim.is_some() { 0.0 } else { cfg.per_token_ms * completion_tokens as f64 };
            sleep_ms(base_ms + per_token).await;
            let u = match usage(ep, sh, &req, body.len(), completion_tokens).await {
                Ok(u) => u,
                Err(refused) => return Some(refused),
            };
            let encoding = ctl.as_ref().and_then(|c| c.encoding.as_deref()).filter(|e| accepts(headers, e));
            Some(succeed(ep, sh, &req, u, encoding))
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

/// The token counts of a successful answer: bytes / 4 of the body and the configured
/// completion, or what the engine simulator computed (its refusal is a ready answer).
async fn usage(ep: Endpoint, sh: &Shared, req: &Value, body_len: usize, completion_tokens: u32) -> Result<Usage, Response> {
    let Some(sim) = &sh.sim else {
        return Ok(Usage { prompt: (body_len as u64 / 4).max(1), completion: u64::from(completion_tokens), cached: None });
    };
    let output = if ep.generates() { requested_max(req).unwrap_or(completion_tokens) } else { 0 };
    match sim.run(super::sim::prompt::tokens(ep, req), output).await {
        Ok(d) => Ok(Usage { prompt: d.prompt_tokens.into(), completion: d.output_tokens.into(), cached: Some(d.cached_tokens.into()) }),
        Err(super::sim::SimError::Refused(r)) => Err(error_response(400, &r.to_string())),
        Err(e @ super::sim::SimError::Stopped) => Err(error_response(503, &e.to_string())),
    }
}

/// The output length a request asks for (`max_tokens` and its newer spellings): the engine
/// simulator generates exactly that many tokens, as a benchmark run with `ignore_eos` does.
fn requested_max(req: &Value) -> Option<u32> {
    ["max_tokens", "max_completion_tokens", "max_output_tokens"].iter().find_map(|k| req.get(*k)?.as_u64()).map(|n| n.min(u64::from(u32::MAX)) as u32)
}

fn succeed(ep: Endpoint, sh: &Shared, req: &Value, mut u: Usage, encoding: Option<&str>) -> Response {
    if ep == Endpoint::Messages {
        u = super::messages::usage(req, u);
    }
    let json = bodies::success(ep, sh, req, u);
    sh.record_success(u.prompt, u.completion);
    let Some(encoding) = encoding else { return json_response(StatusCode::OK, &json) };
    let plain = serde_json::to_vec(&json).unwrap_or_default();
    let packed = match encoding {
        "zstd" => zstd::stream::encode_all(&plain[..], 3),
        _ => {
            use std::io::Write;
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            gz.write_all(&plain).and_then(|()| gz.finish())
        }
    };
    let Ok(packed) = packed else { return json_response(StatusCode::OK, &json) };
    sh.compressed.fetch_add(1, Relaxed);
    let ce = if encoding == "zstd" { "zstd" } else { "gzip" };
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json"), (header::CONTENT_ENCODING, ce)], packed).into_response()
}

/// Whether the request's `Accept-Encoding` lists `encoding`.
fn accepts(headers: &HeaderMap, encoding: &str) -> bool {
    let list = headers.get(header::ACCEPT_ENCODING).and_then(|v| v.to_str().ok()).unwrap_or("");
    list.split(',').any(|e| e.split(';').next().is_some_and(|name| name.trim().eq_ignore_ascii_case(encoding)))
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
    let name = resp.extensions_mut().remove::<IdHeader>().map_or(REQUEST_ID.to_string(), |h| h.0);
    if let (Ok(n), Ok(v)) = (axum::http::HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(rid)) {
        resp.headers_mut().insert(n, v);
    }
    resp
}

pub fn rid_for(sh: &Shared, headers: &HeaderMap) -> String {
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
            sh.limits.configure(&new);
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

/// `GET /metrics`: the engine simulator's state, or the queue for `slots`, as vLLM reports it.
pub async fn metrics(State(sh): St) -> Response {
    let queued = sh.queued.load(Relaxed);
    let extra = sh.behaviour().extra_waiting;
    if let Some(sim) = &sh.sim {
        return (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain; version=0.0.4")], super::sim::metrics_text(sim, queued as f64 + extra)).into_response();
    }
    let waiting = queued as f64 + extra;
    let running = sh.in_flight().saturating_sub(queued);
    let text = format!(
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n# TYPE vllm:num_requests_waiting gauge\n\
         vllm:num_requests_waiting{{model_name=\"mock-model\"}} {waiting}\n\
         # HELP vllm:num_requests_running Number of requests in model execution batches.\n# TYPE vllm:num_requests_running gauge\n\
         vllm:num_requests_running{{model_name=\"mock-model\"}} {running}\n"
    );
    (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// `POST /stats/reset`.
pub async fn reset_stats(State(sh): St) -> StatusCode {
    sh.reset();
    StatusCode::NO_CONTENT
}
