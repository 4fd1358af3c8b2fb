//! The HTTP side both remote clients share: a client with the upstream's timeout and its
//! auth headers (`Authorization: Bearer`, or Anthropic's `x-api-key` with
//! `anthropic-version`), and the reading of an answer or of an error in either envelope.

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, RequestBuilder, Response};
use serde_json::Value;

use super::RemoteError;
use crate::config::{UpstreamApi, UpstreamConfig};
use crate::upstream::BuildError;

/// A remote's base URL (ending in `/v1`) and a client that authenticates to it.
pub struct Http {
    pub base: String,
    client: reqwest::Client,
}

impl Http {
    pub fn new(cfg: &UpstreamConfig) -> Result<Http, BuildError> {
        let bad = |what: &str| BuildError(format!("upstream {:?}: {what}", cfg.name));
        let mut headers = HeaderMap::new();
        if let Some(key) = &cfg.api_key {
            let (name, value) = crate::upstream::client::auth_header(cfg.api, key)?;
            headers.insert(name, value);
        }
        if cfg.api == UpstreamApi::Anthropic {
            headers.insert(HeaderName::from_static("anthropic-version"), HeaderValue::from_static(crate::upstream::client::ANTHROPIC_VERSION));
        }
        let client = reqwest::Client::builder()
            .timeout(cfg.timeout.min(Duration::from_secs(600)))
            .connect_timeout(Duration::from_secs(10))
            .default_headers(headers)
            .build()
            .map_err(|e| bad(&format!("cannot build its HTTP client: {e}")))?;
        Ok(Http { base: cfg.base_url.clone(), client })
    }

    /// A request to `path` below the base URL.
    pub fn req(&self, method: Method, path: &str) -> RequestBuilder {
        self.client.request(method, format!("{}{path}", self.base))
    }

    /// A request to an absolute URL the remote gave (Anthropic's `results_url`).
    pub fn url(&self, url: &str) -> RequestBuilder {
        self.client.get(url)
    }

    /// Sends; a non-2xx answer becomes [`RemoteError::Status`] with the error's code (OpenAI's
    /// `code`, or Anthropic's `type`) and message.
    pub async fn send(&self, r: RequestBuilder) -> Result<Response, RemoteError> {
        let resp = r.send().await.map_err(RemoteError::Transport)?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        let err = &body["error"];
        let message = err["message"].as_str().unwrap_or("no message").to_string();
        let code = err["code"].as_str().or(err["type"].as_str()).map(str::to_owned);
        Err(RemoteError::Status { status, code, message })
    }

    pub async fn json(&self, r: RequestBuilder) -> Result<Value, RemoteError> {
        self.send(r).await?.json().await.map_err(|e| RemoteError::Decode(e.to_string()))
    }

    /// The JSONL body of `r`, line by line (blank lines skipped).
    pub async fn jsonl(&self, r: RequestBuilder, what: &str) -> Result<Vec<Value>, RemoteError> {
        let text = self.send(r).await?.text().await.map_err(RemoteError::Transport)?;
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).map_err(|e| RemoteError::Decode(format!("a result line of {what}: {e}"))))
            .collect()
    }

    /// The first line of `r`'s body, read no further than it.
    pub async fn first_line(&self, r: RequestBuilder) -> Result<Option<Value>, RemoteError> {
        let mut resp = self.send(r).await?;
        let mut buf = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(RemoteError::Transport)? {
            buf.extend_from_slice(&chunk);
            if let Some(end) = buf.iter().position(|b| *b == b'\n') {
                buf.truncate(end);
                break;
            }
        }
        let line = String::from_utf8_lossy(&buf);
        if line.trim().is_empty() {
            return Ok(None);
        }
        serde_json::from_str(line.trim()).map(Some).map_err(|e| RemoteError::Decode(format!("a result line: {e}")))
    }
}
