//! Layers every API request passes through: its request id, its tracing span and its timeout.
//!
//! - `x-request-id`: the client's own (when it is 1–128 visible ASCII characters) is echoed,
//!   else a fresh `req_…` id is made; either way it is on the response (the SDKs expose it as
//!   `_request_id` / `requestID`) and in the request's span, so every log line of the request
//!   carries it.
//! - An error response's cause is logged once, here ([`log_errors`]), in the request's span.
//! - The request timeout bounds the time to the response head. Uploads (`POST /v1/files`)
//!   are exempt: their handler reads the whole body, which may rightly take long; a stalled
//!   upload is cut by the connection's idle timeout instead ([`crate::http`]). So are Message
//!   Batch creates (`POST /v1/messages/batches`), whose body holds the requests. Downloads
//!   are not cut: their head is sent at once and their body streams after it.

use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::{ApiError, ErrorCause};

pub const X_REQUEST_ID: &str = "x-request-id";
const MAX_REQUEST_ID: usize = 128;

/// The id of the request being served, in the request's extensions.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// The client's id when it is usable as is.
fn client_request_id(req: &Request) -> Option<String> {
    let v = req.headers().get(X_REQUEST_ID)?.to_str().ok()?;
    let ok = (1..=MAX_REQUEST_ID).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_graphic());
    ok.then(|| v.to_string())
}

/// Outermost layer: settles the request id and puts it on the request and the response.
pub async fn request_id(mut req: Request, next: Next) -> Response {
    let id = client_request_id(&req).unwrap_or_else(crate::ids::http_request_id);
    let value = HeaderValue::from_str(&id).expect("request ids are visible ASCII");
    req.headers_mut().insert(X_REQUEST_ID, value.clone());
    req.extensions_mut().insert(RequestId(id));
    // Anthropic's SDKs read the id from `request-id`: every answer below its routes has both.
    let anthropic = req.uri().path().starts_with("/v1/messages");
    let mut resp = next.run(req).await;
    if anthropic {
        resp.headers_mut().insert("request-id", value.clone());
    }
    resp.headers_mut().insert(X_REQUEST_ID, value);
    resp
}

/// The span of one request (inside [`request_id`], so the id is known).
pub fn span(req: &Request) -> tracing::Span {
    let id = req.extensions().get::<RequestId>().map_or("", |r| r.0.as_str());
    tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), request_id = %id)
}

/// Logs the outcome of a request inside its span.
pub fn on_response(resp: &Response, latency: Duration, _span: &tracing::Span) {
    let (status, ms) = (resp.status().as_u16(), latency.as_millis() as u64);
    if resp.status().is_server_error() {
        tracing::warn!(status, latency_ms = ms, "answered");
    } else {
        tracing::debug!(status, latency_ms = ms, "answered");
    }
}

/// Logs the cause an error response carries ([`ErrorCause`]), once, with its whole chain,
/// inside the request's span (so with its request id): a 5xx as an error, anything else as
/// a warning.
pub async fn log_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    if let Some(ErrorCause(cause)) = resp.extensions().get::<ErrorCause>() {
        let (status, error) = (resp.status().as_u16(), crate::Chain(&***cause));
        if resp.status().is_server_error() {
            tracing::error!(status, error = %error, "request failed");
        } else {
            tracing::warn!(status, error = %error, "request failed");
        }
    }
    resp
}

/// Answers 408 in the error envelope when the response head takes longer than `limit`.
pub async fn timeout(State(limit): State<Duration>, req: Request, next: Next) -> Response {
    if req.method() == Method::POST && matches!(req.uri().path(), "/v1/files" | "/v1/messages/batches") {
        return next.run(req).await;
    }
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => {
            tracing::warn!(limit_s = limit.as_secs_f64(), "request timed out");
            ApiError::timeout(format!("The server did not answer within {} seconds; retry the request.", limit.as_secs_f64())).into_response()
        }
    }
}
