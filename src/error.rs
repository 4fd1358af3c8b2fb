//! [`ApiError`]: the only error that renders as an HTTP response, in OpenAI's envelope
//! `{"error": {"message", "type", "param", "code"}}`.
//!
//! Store and blob errors convert into it once, here. A 5xx answers a generic message; the
//! cause is kept whole (with its own causes) and never sent, and no message ever contains a
//! secret. Making an `ApiError` logs nothing: its response carries the cause in its
//! extensions ([`ErrorCause`]), and one middleware inside the request's span logs it once,
//! with the request id (`api::layers::log_errors`).

use std::sync::Arc;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::{blob, store};

/// What went wrong inside, behind an error response: in the response's extensions, for the
/// one middleware that logs it. (An `Arc` of a box: one pointer, so `ApiError` stays small.)
#[derive(Debug, Clone)]
pub struct ErrorCause(pub Arc<Box<dyn std::error::Error + Send + Sync>>);

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<String>,
    /// Seconds the client should wait before retrying (429 and 503).
    pub retry_after: Option<u64>,
    /// The error behind this one, logged at the edge and never sent.
    pub cause: Option<ErrorCause>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), kind, param: None, code: None, retry_after: None, cause: None }
    }

    /// Keeps `cause` to be logged when the response leaves.
    pub fn caused_by(mut self, cause: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        self.cause = Some(ErrorCause(Arc::new(cause.into())));
        self
    }

    pub fn param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn code(mut self, code: impl Into<String>) -> Self {
        self.code = Some(code.into());
        self
    }

    /// 400 for a bad parameter, naming it.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self::bad_request(message).param(param).code("invalid_value")
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    pub fn missing(param: &str) -> Self {
        Self::bad_request(format!("Missing required parameter: '{param}'.")).param(param).code("missing_required_parameter")
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_request_error", message).code("invalid_api_key")
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message)
    }

    /// 409; answered with `x-should-retry: false` (retrying cannot help).
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "invalid_request_error", message).code("conflict")
    }

    /// 408: the server did not answer in time.
    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(StatusCode::REQUEST_TIMEOUT, "invalid_request_error", message).code("request_timeout")
    }

    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", message).code("file_too_large")
    }

    pub fn range_not_satisfiable(size: u64) -> Self {
        Self::new(StatusCode::RANGE_NOT_SATISFIABLE, "invalid_request_error", format!("Range not satisfiable; the file has {size} bytes."))
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message);
        e.retry_after = Some(1);
        e
    }

    /// 507: the server cannot store anything right now (its disk is full); reads still work.
    pub fn insufficient_storage() -> Self {
        let mut e = Self::new(StatusCode::INSUFFICIENT_STORAGE, "server_error", "The server is out of storage space; nothing was stored. Retry later.")
            .code("insufficient_storage");
        e.retry_after = Some(5);
        e
    }

    /// 429: the tenant's queue is over one of its quotas (the message says which).
    pub fn quota_exceeded(message: impl Into<String>, retry_after_s: u64) -> Self {
        Self::rate_limited(message, retry_after_s).code("quota_exceeded")
    }

    /// 429 with a `Retry-After`: the tenant asks for more than its share.
    pub fn rate_limited(message: impl Into<String>, retry_after_s: u64) -> Self {
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message);
        e.retry_after = Some(retry_after_s);
        e
    }

    /// 500 with a generic message; `cause` is logged, never sent.
    pub fn internal(cause: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "The server had an error while processing your request.").caused_by(cause)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

/// The answer to a store or blob store that is down: 503, retry shortly.
fn unavailable() -> ApiError {
    ApiError::unavailable("The service is temporarily unavailable; retry shortly.")
}

impl From<store::Error> for ApiError {
    fn from(e: store::Error) -> Self {
        match e {
            store::Error::NotFound => ApiError::not_found("No such object."),
            store::Error::Conflict(m) => ApiError::conflict(m),
            store::Error::Unavailable(_) => unavailable().caused_by(e),
            store::Error::Full(_) => ApiError::insufficient_storage().caused_by(e),
            store::Error::Other(_) => ApiError::internal(e),
        }
    }
}

impl From<blob::Error> for ApiError {
    fn from(e: blob::Error) -> Self {
        match e {
            blob::Error::NotFound(_) => ApiError::not_found("The file's content is no longer available."),
            blob::Error::Unavailable(_) => unavailable().caused_by(e),
            blob::Error::Full(_) => ApiError::insufficient_storage().caused_by(e),
            blob::Error::Other(_) => ApiError::internal(e),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }});
        let mut resp = (self.status, axum::Json(body)).into_response();
        if let Some(cause) = self.cause {
            resp.extensions_mut().insert(cause);
        }
        if let Some(s) = self.retry_after {
            let h = resp.headers_mut();
            h.insert(header::RETRY_AFTER, HeaderValue::from(s));
            h.insert("retry-after-ms", HeaderValue::from(s * 1000));
        }
        if self.status.is_server_error() && self.status != StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut().insert("x-should-retry", HeaderValue::from_static("true"));
        }
        if self.status == StatusCode::CONFLICT {
            resp.headers_mut().insert("x-should-retry", HeaderValue::from_static("false"));
        }
        resp
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
