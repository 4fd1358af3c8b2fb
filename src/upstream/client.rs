//! Sending one request to one upstream and classifying what came back.
//!
//! The request body passes through as bytes. The answer is kept raw; only its status and the
//! headers that steer retries (`retry-after-ms`, `retry-after`, `x-ratelimit-reset-*`) and
//! `x-request-id` are read here.

use std::time::Duration;

use axum::http::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use axum::http::{Request, Uri};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;

use super::conn::{error_chain, ConnError, Connections};
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

/// No usable HTTP answer.
#[derive(Debug, Clone)]
pub enum TransportError {
    Timeout(String),
    Unavailable(String),
    /// The answer was larger than the upstream's `max_response_bytes` (not retried: the
    /// same request would get the same answer, and be paid for again).
    TooLarge(String),
}

impl TransportError {
    pub fn code(&self) -> &'static str {
        match self {
            TransportError::Timeout(_) => "request_timeout",
            TransportError::Unavailable(_) => "upstream_unavailable",
            TransportError::TooLarge(_) => "response_too_large",
        }
    }
    pub fn message(&self) -> &str {
        match self {
            TransportError::Timeout(m) | TransportError::Unavailable(m) | TransportError::TooLarge(m) => m,
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
            Outcome::Transport(TransportError::TooLarge(_)) => false,
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

/// The connections of one pool: HTTP/1.1 keep-alive over hyper's `client::conn`, TLS by
/// rustls with the webpki roots for `https://` upstreams. Measured on the same mock, hyper
/// costs about half the CPU per request of reqwest (14 against 21–29 µs), and keeping the
/// connections here rather than in hyper-util's pooled client saves another task per request.
pub(super) fn build(cfg: &UpstreamConfig) -> Result<Connections, super::BuildError> {
    let mut tcp = HttpConnector::new();
    tcp.set_nodelay(true);
    tcp.enforce_http(false);
    tcp.set_connect_timeout(Some(Duration::from_secs(10).min(cfg.timeout)));
    let tls = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls_config(cfg)?).https_or_http().enable_http1().wrap_connector(tcp);
    let bad = |e: String| super::BuildError(format!("upstream {:?}: bad base_url: {e}", cfg.name));
    let base: Uri = cfg.base_url.parse().map_err(|e: axum::http::uri::InvalidUri| bad(e.to_string()))?;
    let origin = Uri::builder()
        .scheme(base.scheme().cloned().ok_or_else(|| bad("no scheme".into()))?)
        .authority(base.authority().cloned().ok_or_else(|| bad("no host".into()))?)
        .path_and_query("/")
        .build()
        .map_err(|e| bad(e.to_string()))?;
    Connections::new(tls, origin, cfg.max_concurrency.max(16), Duration::from_secs(90)).map_err(bad)
}

/// TLS for `https://` upstreams: rustls trusting the public (webpki) roots and, when the
/// upstream names a `ca_file`, the certificates in it.
fn tls_config(cfg: &UpstreamConfig) -> Result<rustls::ClientConfig, super::BuildError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    if let Some(path) = &cfg.ca_file {
        let bad = |e: String| super::BuildError(format!("upstream {:?}: ca_file {}: {e}", cfg.name, path.display()));
        let certs = CertificateDer::pem_file_iter(path).map_err(|e| bad(e.to_string()))?;
        let mut added = 0;
        for cert in certs {
            roots.add(cert.map_err(|e| bad(e.to_string()))?).map_err(|e| bad(e.to_string()))?;
            added += 1;
        }
        if added == 0 {
            return Err(bad("no PEM certificate in it".into()));
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| super::BuildError(format!("TLS setup failed: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

/// The `Authorization` header of an upstream key, marked sensitive (never logged).
pub(super) fn auth_header(key: &crate::config::Secret) -> Result<HeaderValue, super::BuildError> {
    let mut v = HeaderValue::from_str(&format!("Bearer {}", key.expose()))
        .map_err(|_| super::BuildError("an upstream API key has characters not allowed in an HTTP header".into()))?;
    v.set_sensitive(true);
    Ok(v)
}

impl Pool {
    /// POSTs `body` to `base_url` + `path` (the line's url without its `/v1` prefix); the
    /// whole exchange, answer body included, is cut off at the upstream's timeout.
    pub async fn send(&self, path: &str, body: Bytes, request_id: &str) -> Outcome {
        let uri = match self.uri(path) {
            Ok(u) => u,
            Err(e) => return Outcome::Transport(TransportError::Unavailable(format!("upstream {:?}: bad URL: {e}", self.cfg.name))),
        };
        let mut req = Request::post(uri).header(HOST, self.conns.host().clone()).header(CONTENT_TYPE, "application/json");
        if let Ok(id) = HeaderValue::from_str(request_id) {
            req = req.header("x-request-id", id);
        }
        if let Some(auth) = &self.auth {
            req = req.header(AUTHORIZATION, auth.clone());
        }
        let req = req.body(Full::new(body)).expect("a request of valid parts builds");
        match tokio::time::timeout(self.cfg.timeout, self.exchange(req)).await {
            Ok(Ok(answer)) => Outcome::Answer(answer),
            Ok(Err(e)) => Outcome::Transport(e),
            Err(_) => Outcome::Transport(TransportError::Timeout(format!("upstream {:?} did not answer in time", self.cfg.name))),
        }
    }

    async fn exchange(&self, req: Request<Full<Bytes>>) -> Result<Answer, TransportError> {
        let name = &self.cfg.name;
        let (resp, conn) = self.conns.send(req).await.map_err(|e| match e {
            ConnError::Connect(cause) => TransportError::Unavailable(format!("could not connect to upstream {name:?}: {cause}")),
            ConnError::Http(e) => TransportError::Unavailable(format!("upstream {name:?} failed: {}", error_chain(&e))),
        })?;
        let (parts, body) = resp.into_parts();
        let max = self.cfg.max_response_bytes;
        let too_large = || TransportError::TooLarge(format!("upstream {name:?} answered with more than {max} bytes (max_response_bytes)"));
        let declared = parts.headers.get(axum::http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max) {
            return Err(too_large());
        }
        let body = match http_body_util::Limited::new(body, max as usize).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => return Err(too_large()),
            Err(e) => return Err(TransportError::Unavailable(format!("upstream {name:?} broke off its answer: {e}"))),
        };
        self.conns.put_back(conn);
        let status = parts.status.as_u16();
        let request_id = parts.headers.get("x-request-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
        Ok(Answer { status, retry_after: retry_after(&parts.headers, status), request_id, body })
    }

    fn uri(&self, path: &str) -> Result<Uri, axum::http::uri::InvalidUri> {
        if let Some(u) = self.uris.read().expect("not poisoned").get(path) {
            return Ok(u.clone());
        }
        // Origin-form: the base URL's path (`/v1`) and the line's path.
        let full: Uri = format!("{}{}", self.cfg.base_url, path).parse()?;
        let u: Uri = full.path_and_query().map_or("/", |p| p.as_str()).parse()?;
        self.uris.write().expect("not poisoned").insert(path.to_string(), u.clone());
        Ok(u)
    }
}


/// The wait an upstream asks for: `retry-after-ms`, then `retry-after` (seconds or an HTTP
/// date), then on a 429 the larger of the `x-ratelimit-reset-requests` / `-tokens` durations.
pub fn retry_after(h: &HeaderMap, status: u16) -> Option<Duration> {
    let get = |name: &str| h.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    if let Some(ms) = get("retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        return secs(ms / 1000.0);
    }
    if let Some(v) = get("retry-after") {
        if let Ok(s) = v.parse::<f64>() {
            return secs(s);
        }
        if let Ok(at) = httpdate::parse_http_date(v) {
            let wait = at.duration_since(std::time::SystemTime::now()).unwrap_or_default();
            return secs(wait.as_secs_f64());
        }
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

    #[test]
    fn retry_after_as_an_http_date() {
        let mut h = HeaderMap::new();
        let at = std::time::SystemTime::now() + Duration::from_secs(30);
        h.insert("retry-after", httpdate::fmt_http_date(at).parse().unwrap());
        let wait = retry_after(&h, 503).unwrap();
        assert!(wait > Duration::from_secs(28) && wait <= Duration::from_secs(30), "{wait:?}");
        h.insert("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap());
        assert_eq!(retry_after(&h, 503), Some(Duration::ZERO), "a date in the past means now");
        h.insert("retry-after", "soon".parse().unwrap());
        assert_eq!(retry_after(&h, 503), None, "an unreadable value is ignored");
    }
}
