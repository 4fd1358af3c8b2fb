//! Anthropic's side of the HTTP edge: its error envelope and the caller's tenant read from
//! `x-api-key` as well as `Authorization: Bearer` (the `request-id` header is set in
//! `api::layers::request_id`).
//!
//! Handlers of the Message Batches API fail with an [`AnthropicError`]: the same
//! [`ApiError`] every other handler makes (so store and blob errors convert once, in
//! `crate::error`), rendered as `{"type": "error", "error": {"type", "message"}}` with the
//! type Anthropic gives its status. The cause stays in the response's extensions for the one
//! middleware that logs it.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::super::{AppState, Tenant};
use crate::error::ApiError;
use crate::upstream::translate::anthropic_error_type;

/// An [`ApiError`] in Anthropic's envelope.
#[derive(Debug)]
pub struct AnthropicError(pub ApiError);

impl<E: Into<ApiError>> From<E> for AnthropicError {
    fn from(e: E) -> Self {
        AnthropicError(e.into())
    }
}

pub type AnthropicResult<T> = Result<T, AnthropicError>;

impl IntoResponse for AnthropicError {
    /// OpenAI's rendering settles the status, the headers (`retry-after`, `x-should-retry`)
    /// and the cause to log; only the body is Anthropic's.
    fn into_response(self) -> Response {
        let body = json!({"type": "error", "error": {"type": error_type(self.0.status), "message": self.0.message}});
        let mut resp = self.0.into_response();
        *resp.body_mut() = axum::body::Body::from(body.to_string());
        resp
    }
}

/// Anthropic's error type for a status batchd answers (507, a full disk, is an `api_error`).
fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        408 => "timeout_error",
        409 => "invalid_request_error",
        s => anthropic_error_type(s),
    }
}

/// The caller's tenant, for Anthropic's routes: `x-api-key` (what Anthropic's SDKs and
/// curl examples send) or `Authorization: Bearer`, against the same keys and tenants as
/// OpenAI's routes; a refusal in Anthropic's envelope.
pub struct AnthropicTenant(pub String);

impl FromRequestParts<AppState> for AnthropicTenant {
    type Rejection = AnthropicError;

    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, Self::Rejection> {
        let Tenant(t) = Tenant::from_request_parts(parts, st).await.map_err(|e| {
            if e.status == StatusCode::UNAUTHORIZED && parts.headers.get(super::super::auth::X_API_KEY).is_none() {
                AnthropicError(ApiError::unauthorized("x-api-key header is required"))
            } else {
                AnthropicError(e)
            }
        })?;
        Ok(AnthropicTenant(t))
    }
}
