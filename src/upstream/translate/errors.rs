//! Error bodies both ways: OpenAI's `{"error": {"message", "type", "param", "code"}}` and
//! Anthropic's `{"type": "error", "error": {"type", "message"}}`. The HTTP status is kept;
//! only the body changes shape. A body that is not JSON yields a message that quotes its
//! beginning.

use serde_json::{json, Value};

/// Anthropic's error type for an HTTP status, as its API assigns them.
pub fn anthropic_error_type(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        504 => "timeout_error",
        400..=499 => "invalid_request_error",
        _ => "api_error",
    }
}

/// The HTTP status an Anthropic error type stands for (the inverse of
/// [`anthropic_error_type`]; Anthropic's batch results give the type, not the status).
pub fn anthropic_error_status(kind: &str) -> u16 {
    match kind {
        "invalid_request_error" => 400,
        "authentication_error" => 401,
        "billing_error" => 402,
        "permission_error" => 403,
        "not_found_error" => 404,
        "request_too_large" => 413,
        "rate_limit_error" => 429,
        "timeout_error" => 504,
        "overloaded_error" => 529,
        _ => 500,
    }
}

/// The message of an error body in either envelope (or the body's own text).
fn message_of(body: &[u8]) -> String {
    const EXCERPT: usize = 200;
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        let e = &v["error"];
        if let Some(m) = e["message"].as_str().or(e.as_str()).or(v["message"].as_str()) {
            return m.to_string();
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        "the upstream sent an empty error body".to_string()
    } else {
        text.chars().take(EXCERPT).collect()
    }
}

/// An OpenAI-compatible upstream's error answer as Anthropic's error envelope.
pub fn openai_error_to_anthropic(status: u16, body: &[u8]) -> Value {
    json!({"type": "error", "error": {"type": anthropic_error_type(status), "message": message_of(body)}})
}

/// An Anthropic-speaking upstream's error answer as OpenAI's error envelope: `type` keeps
/// Anthropic's error type (`rate_limit_error`, `overloaded_error`, …); `code` says the same
/// in OpenAI's words where it has some.
pub fn anthropic_error_to_openai(status: u16, body: &[u8]) -> Value {
    let parsed = serde_json::from_slice::<Value>(body).ok();
    let kind = parsed.as_ref().and_then(|v| v["error"]["type"].as_str()).unwrap_or_else(|| anthropic_error_type(status)).to_string();
    let code = match kind.as_str() {
        "rate_limit_error" => Some("rate_limit_exceeded"),
        "authentication_error" => Some("invalid_api_key"),
        "billing_error" => Some("insufficient_quota"),
        _ => None,
    };
    json!({"error": {"message": message_of(body), "type": kind, "param": null, "code": code}})
}
