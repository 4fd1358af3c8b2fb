//! Authentication: `Authorization: Bearer KEY` (or `x-api-key: KEY`, as Anthropic's clients
//! send it) maps to a tenant. With no keys configured, every caller is the tenant `default`.
//! A missing or unknown key is a 401 `invalid_api_key`.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;

use super::AppState;
use crate::error::ApiError;

pub use crate::config::DEFAULT_TENANT;

/// Anthropic's API key header.
pub const X_API_KEY: &str = "x-api-key";

/// The tenant making the call; every store call of a handler is scoped to it.
#[derive(Debug, Clone)]
pub struct Tenant(pub String);

impl FromRequestParts<AppState> for Tenant {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, Self::Rejection> {
        if !st.cfg.auth_enabled() {
            return Ok(Tenant(DEFAULT_TENANT.into()));
        }
        let header = parts.headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok());
        let bearer = header.and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")));
        let Some(key) = bearer.or_else(|| parts.headers.get(X_API_KEY).and_then(|v| v.to_str().ok())) else {
            return Err(ApiError::unauthorized("You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'."));
        };
        match st.cfg.tenant_for_key(key.trim()) {
            Some(t) => Ok(Tenant(t.to_string())),
            None => Err(ApiError::unauthorized("Incorrect API key provided.")),
        }
    }
}
