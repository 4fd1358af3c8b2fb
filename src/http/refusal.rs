//! batchd's own answer to a request the HTTP parser refused.
//!
//! hyper answers a request head it cannot parse — two different `Content-Length`s, a head
//! over its size limit, a malformed request line — by itself, with a bare status line and an
//! empty body, and then closes the connection. No request ever reached the router, so no
//! layer added an `x-request-id` and no handler wrote an envelope. The socket ([`super::socket`])
//! recognises that answer (hyper writes it while no request is being served) and sends this
//! one instead: the same status, OpenAI's error envelope, a fresh request id, and
//! `Connection: close`.

use serde_json::json;

/// The answer that replaces hyper's own, if `head` is the start of one (`HTTP/1.x NNN …`).
pub fn replacement(head: &[u8]) -> Option<Vec<u8>> {
    let rest = head.strip_prefix(b"HTTP/1.")?;
    let status = std::str::from_utf8(rest.get(2..5)?).ok()?.parse::<u16>().ok()?;
    let (message, code) = words(status);
    let id = crate::ids::http_request_id();
    tracing::info!(status, request_id = %id, "refused a request the HTTP parser could not read");
    let body = json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": code}}).to_string();
    let reason = axum::http::StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("Bad Request");
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nx-request-id: {id}\r\nconnection: close\r\ndate: {}\r\n\r\n",
        body.len(),
        httpdate::fmt_http_date(std::time::SystemTime::now())
    );
    Some([head.into_bytes(), body.into_bytes()].concat())
}

/// What went wrong, for each status hyper answers by itself.
fn words(status: u16) -> (&'static str, &'static str) {
    match status {
        431 => ("The request's headers are too large (too many, or too long); send fewer or shorter headers.", "request_header_fields_too_large"),
        414 => ("The request's URL is too long.", "uri_too_long"),
        _ => (
            "The request could not be read as HTTP/1.1: its request line or a header is malformed (for example two different Content-Length headers).",
            "malformed_request",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hypers_answers_become_envelopes_with_a_request_id() {
        let out = String::from_utf8(replacement(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n").unwrap()).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"), "{head}");
        assert!(head.contains("\r\nx-request-id: req_") && head.contains("\r\nconnection: close"), "{head}");
        assert!(head.contains(&format!("content-length: {}\r\n", body.len())), "{head}");
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "request_header_fields_too_large");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        let bad = String::from_utf8(replacement(b"HTTP/1.1 400 Bad Request\r\n\r\n").unwrap()).unwrap();
        assert!(bad.contains("\"code\":\"malformed_request\""), "{bad}");
        assert!(replacement(b"{\"not\":\"a head\"}").is_none());
        assert!(replacement(b"HTTP/1.1 4").is_none());
    }
}
