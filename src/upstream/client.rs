//! Sending one request to one upstream and classifying what came back.
//!
//! The request body passes through as bytes, with `Accept-Encoding: gzip, zstd`; the answer
//! is decoded as it streams, capped at `max_response_bytes` of decoded bytes (see `decode`),
//! and kept raw. Only its status, the headers that steer retries and limits (see
//! `signals`) and the upstream's request id (`x-request-id`, `x-litellm-call-id`,
//! `request-id`) are read here. An upstream with `api = "anthropic"` gets its key as
//! `x-api-key` with `anthropic-version`, and its rate-limit headers are read under
//! Anthropic's names; what its bodies say is the business of `dialect`.

use std::time::Duration;

use axum::http::header::{HeaderName, HeaderValue, ACCEPT_ENCODING, AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE, HOST};
use axum::http::{Request, Uri};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;

use super::conn::{error_chain, ConnError, Connections};
use super::decode::{DecodeError, Decoder};
use super::outcome::{Answer, Outcome, TransportError};
use super::{signals, Pool};
use crate::config::{UpstreamApi, UpstreamConfig};

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

/// The Messages API version batchd speaks to an `api = "anthropic"` upstream.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";

/// The header carrying an upstream key, its value marked sensitive (never logged):
/// `Authorization: Bearer KEY`, or Anthropic's `x-api-key: KEY`.
pub(super) fn auth_header(api: UpstreamApi, key: &crate::config::Secret) -> Result<(HeaderName, HeaderValue), super::BuildError> {
    let (name, value) = match api {
        UpstreamApi::OpenAi => (AUTHORIZATION, format!("Bearer {}", key.expose())),
        UpstreamApi::Anthropic => (HeaderName::from_static("x-api-key"), key.expose().to_string()),
    };
    let mut v = HeaderValue::from_str(&value).map_err(|_| super::BuildError("an upstream API key has characters not allowed in an HTTP header".into()))?;
    v.set_sensitive(true);
    Ok((name, v))
}

impl Pool {
    /// POSTs `body` to `base_url` + `path` (the line's url without its `/v1` prefix); the
    /// whole exchange, answer body included, is cut off at the upstream's timeout.
    pub async fn send(&self, path: &str, body: Bytes, request_id: &str) -> Outcome {
        let uri = match self.uri(path) {
            Ok(u) => u,
            Err(e) => return Outcome::Transport(TransportError::Unavailable(format!("upstream {:?}: bad URL: {e}", self.cfg.name))),
        };
        let mut req = Request::post(uri).header(HOST, self.conns.host().clone()).header(CONTENT_TYPE, "application/json").header(ACCEPT_ENCODING, "gzip, zstd");
        if let Ok(id) = HeaderValue::from_str(request_id) {
            req = req.header("x-request-id", id);
        }
        if let Some((name, value)) = &self.auth {
            req = req.header(name, value.clone());
        }
        if self.cfg.api == UpstreamApi::Anthropic {
            req = req.header("anthropic-version", ANTHROPIC_VERSION);
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
            ConnError::Connect(cause) => TransportError::Unreachable(format!("could not connect to upstream {name:?}: {cause}")),
            ConnError::Http(e) => TransportError::Unavailable(format!("upstream {name:?} failed: {}", error_chain(&e))),
        })?;
        let (parts, mut body) = resp.into_parts();
        let max = self.cfg.max_response_bytes;
        let too_large = || TransportError::TooLarge(format!("upstream {name:?} answered with more than {max} bytes once decoded (max_response_bytes)"));
        let unreadable = |e: DecodeError| TransportError::Unavailable(format!("upstream {name:?} sent an unreadable answer: {e}"));
        let declared = parts.headers.get(axum::http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        let mut decoder = Decoder::new(&parts.headers, max).map_err(unreadable)?;
        if declared.is_some_and(|n| n > max) && parts.headers.get(CONTENT_ENCODING).is_none() {
            return Err(too_large());
        }
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| TransportError::Unavailable(format!("upstream {name:?} broke off its answer: {e}")))?;
            if let Ok(data) = frame.into_data() {
                decoder.push(&data).map_err(|e| if let DecodeError::TooLarge(_) = e { too_large() } else { unreadable(e) })?;
            }
        }
        self.conns.put_back(conn);
        let body = decoder.finish().map_err(|e| if let DecodeError::TooLarge(_) = e { too_large() } else { unreadable(e) })?;
        let h = &parts.headers;
        let request_id = REQUEST_ID_HEADERS.iter().find_map(|n| h.get(*n).and_then(|v| v.to_str().ok())).map(str::to_owned);
        let rate_limits = match self.cfg.api {
            UpstreamApi::OpenAi => signals::rate_headers(h),
            UpstreamApi::Anthropic => signals::anthropic_headers(h),
        };
        Ok(Answer { status: parts.status.as_u16(), retry_after: signals::retry_after(h), rate_limits, request_id, body })
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

/// Where the upstream's own id of a request may be: its own header, LiteLLM's, Anthropic's.
const REQUEST_ID_HEADERS: [&str; 3] = ["x-request-id", "x-litellm-call-id", "request-id"];
