//! [`ApiError`]: the only error that renders as an HTTP response, in OpenAI's envelope
//! `{"error": {"message", "type", "param", "code"}}`.
//!
//! Store and blob errors convert into it once, here. A 5xx answers a generic message; the
//! cause goes to the log (never to the client), and no message ever contains a secret.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::{blob, store};

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<String>,
    /// Seconds the client should wait before retrying (429 and 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), kind, param: None, code: None, retry_after: None }
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
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "The server had an error while processing your request.")
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

impl From<store::Error> for ApiError {
    fn from(e: store::Error) -> Self {
        match e {
            store::Error::NotFound => ApiError::not_found("No such object."),
            store::Error::Conflict(m) => ApiError::conflict(m),
            store::Error::Unavailable(m) => {
                tracing::error!(error = %m, "store unavailable");
                ApiError::unavailable("The service is temporarily unavailable; retry shortly.")
            }
            store::Error::Full(m) => {
                tracing::error!(error = %m, "store out of space");
                ApiError::insufficient_storage()
            }
            store::Error::Other(m) => ApiError::internal(m),
        }
    }
}

impl From<blob::Error> for ApiError {
    fn from(e: blob::Error) -> Self {
        match e {
            blob::Error::NotFound(_) => ApiError::not_found("The file's content is no longer available."),
            blob::Error::Unavailable(m) => {
                tracing::error!(error = %m, "blob store unavailable");
                ApiError::unavailable("The service is temporarily unavailable; retry shortly.")
            }
            blob::Error::Full(m) => {
                tracing::error!(error = %m, "blob store out of space");
                ApiError::insufficient_storage()
            }
            blob::Error::Other(m) => ApiError::internal(m),
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
