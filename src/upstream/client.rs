//! Sending one request to one upstream and classifying what came back.
//!
//! The request body passes through as bytes. The answer is kept raw; only its status and the
//! headers that steer retries (`retry-after-ms`, `retry-after`, `x-ratelimit-reset-*`) and
//! `x-request-id` are read here.

use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{HeaderMap, CONTENT_TYPE};

use super::Pool;
use crate::config::UpstreamConfig;

/// An HTTP answer from the upstream.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
    pub request_id: Option<String>,
    pub retry_after: Option<Duration>,
}

/// No HTTP answer at all.
#[derive(Debug, Clone)]
pub enum TransportError {
    Timeout(String),
    Unavailable(String),
}

impl TransportError {
    pub fn code(&self) -> &'static str {
        match self {
            TransportError::Timeout(_) => "request_timeout",
            TransportError::Unavailable(_) => "upstream_unavailable",
        }
    }
    pub fn message(&self) -> &str {
        match self {
            TransportError::Timeout(m) | TransportError::Unavailable(m) => m,
        }
    }
}

#[derive(Debug, Clone)]
pub enum Outcome {
    Answer(Answer),
    Transport(TransportError),
}

impl Outcome {
    /// Connect errors, timeouts, 408, 409, 429 and 5xx may succeed when tried again.
    pub fn is_retryable(&self) -> bool {
        match self {
            Outcome::Transport(_) => true,
            Outcome::Answer(a) => matches!(a.status, 408 | 409 | 429) || a.status >= 500,
        }
    }

    /// 429 and 5xx mean the upstream is struggling: the pool should slow down.
    pub fn is_overload(&self) -> bool {
        match self {
            Outcome::Transport(TransportError::Timeout(_)) => true,
            Outcome::Transport(_) => false,
            Outcome::Answer(a) => a.status == 429 || a.status >= 500,
        }
    }
}

pub(super) fn build(cfg: &UpstreamConfig) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .pool_max_idle_per_host(cfg.max_concurrency.max(16))
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10).min(cfg.timeout))
        .timeout(cfg.timeout)
        .build()
}

impl Pool {
    /// POSTs `body` to `base_url` + `path` (the line's url without its `/v1` prefix).
    pub async fn send(&self, path: &str, body: Bytes, request_id: &str) -> Outcome {
        let url = match self.url(path) {
            Ok(u) => u,
            Err(e) => return Outcome::Transport(TransportError::Unavailable(format!("upstream {:?}: bad URL: {e}", self.cfg.name))),
        };
        let mut req = self.http.post(url).header(CONTENT_TYPE, "application/json").header("x-request-id", request_id).body(body);
        if let Some(key) = &self.cfg.api_key {
            req = req.bearer_auth(key.expose());
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => return Outcome::Transport(transport_error(&self.cfg.name, e)),
        };
        let status = resp.status().as_u16();
        let retry_after = retry_after(resp.headers(), status);
        let request_id = resp.headers().get("x-request-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
        match resp.bytes().await {
            Ok(body) => Outcome::Answer(Answer { status, body, request_id, retry_after }),
            Err(e) => Outcome::Transport(transport_error(&self.cfg.name, e)),
        }
    }
}

impl Pool {
    fn url(&self, path: &str) -> Result<reqwest::Url, url::ParseError> {
        if let Some(u) = self.urls.read().expect("not poisoned").get(path) {
            return Ok(u.clone());
        }
        let u = reqwest::Url::parse(&format!("{}{}", self.cfg.base_url, path))?;
        self.urls.write().expect("not poisoned").insert(path.to_string(), u.clone());
        Ok(u)
    }
}

/// Describes a transport failure without the URL's query or any header (no secret leaks).
fn transport_error(upstream: &str, e: reqwest::Error) -> TransportError {
    if e.is_timeout() {
        TransportError::Timeout(format!("upstream {upstream:?} did not answer in time"))
    } else if e.is_connect() {
        TransportError::Unavailable(format!("could not connect to upstream {upstream:?}"))
    } else {
        TransportError::Unavailable(format!("upstream {upstream:?} failed: {}", e.without_url()))
    }
}

/// The wait an upstream asks for: `retry-after-ms`, then `retry-after` (seconds), then on a
/// 429 the larger of the `x-ratelimit-reset-requests` / `-tokens` durations.
pub fn retry_after(h: &HeaderMap, status: u16) -> Option<Duration> {
    let get = |name: &str| h.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    if let Some(ms) = get("retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        return secs(ms / 1000.0);
    }
    if let Some(s) = get("retry-after").and_then(|v| v.parse::<f64>().ok()) {
        return secs(s);
    }
    if status != 429 {
        return None;
    }
    ["x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"]
        .into_iter()
        .filter_map(|n| get(n).and_then(parse_go_duration))
        .max()
}

fn secs(s: f64) -> Option<Duration> {
    (s.is_finite() && s >= 0.0).then(|| Duration::from_secs_f64(s.min(3600.0)))
}

/// Parses durations as OpenAI writes them in rate-limit headers: `1s`, `6m0s`, `20ms`, `1h2m`.
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let mut total = 0.0;
    let mut rest = s;
    while !rest.is_empty() {
        let num_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let n: f64 = rest[..num_end].parse().ok()?;
        let unit_end = rest[num_end..].find(|c: char| c.is_ascii_digit()).map_or(rest.len(), |i| num_end + i);
        total += n * match &rest[num_end..unit_end] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_end..];
    }
    secs(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(parse_go_duration("20ms"), Some(Duration::from_millis(20)));
        assert_eq!(parse_go_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_go_duration("abc"), None);
    }

    #[test]
    fn retry_after_headers_in_order() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", "3".parse().unwrap());
        assert_eq!(retry_after(&h, 429), Some(Duration::from_secs(3)));
        h.insert("retry-after-ms", "250".parse().unwrap());
        assert_eq!(retry_after(&h, 503), Some(Duration::from_millis(250)));
        let mut h = HeaderMap::new();
        h.insert("x-ratelimit-reset-requests", "2s".parse().unwrap());
        h.insert("x-ratelimit-reset-tokens", "6m0s".parse().unwrap());
        assert_eq!(retry_after(&h, 429), Some(Duration::from_secs(360)));
        assert_eq!(retry_after(&h, 500), None, "reset headers only steer 429s");
    }
}
