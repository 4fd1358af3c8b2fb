//! Clients of hosted Batch APIs, behind one trait ([`BatchApi`]): what `engine::remote` needs
//! of a remote — upload a shard, create a batch under an idempotency key and a metadata tag,
//! find a tagged batch again, poll, cancel, and read its result lines.
//!
//! [`OpenAiBatch`] speaks the OpenAI Batch + Files API (OpenAI itself, compatible providers, a
//! batchd). Another API (Anthropic's Message Batches) is a second implementation of the same
//! trait; the engine never learns which one it talks to.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde_json::{json, Value};

use crate::config::UpstreamConfig;

/// The metadata key every remote batch carries: its idempotency key, found again by listing.
pub const TAG: &str = "batchd_key";

/// A remote's answer that is not what was asked.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("the remote could not be reached")]
    Transport(#[source] reqwest::Error),
    #[error("the remote answered {status}: {message}")]
    Status { status: u16, code: Option<String>, message: String },
    #[error("the remote's answer could not be read: {0}")]
    Decode(String),
}

impl RemoteError {
    /// Worth trying again later: the network, 408/409/429, 5xx.
    pub fn is_retryable(&self) -> bool {
        match self {
            RemoteError::Transport(_) | RemoteError::Decode(_) => true,
            RemoteError::Status { status, .. } => matches!(status, 408 | 409 | 429) || *status >= 500,
        }
    }

    /// The remote refused a create because too many tokens are enqueued there.
    pub fn is_token_limit(&self) -> bool {
        match self {
            RemoteError::Status { code: Some(c), .. } => c == "token_limit_exceeded" || c == "quota_exceeded",
            RemoteError::Status { status: 429, message, .. } => message.contains("token"),
            _ => false,
        }
    }
}

/// A remote batch as last seen.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteStatus {
    pub id: String,
    pub status: String,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    /// The batch-level errors (e.g. `token_limit_exceeded` of a batch failed at validation).
    pub errors: Vec<(String, String)>,
    /// Finished and failed lines, as the remote counts them.
    pub completed: u64,
    pub failed: u64,
    pub metadata: Value,
}

impl RemoteStatus {
    /// The remote will not change it any more.
    pub fn is_final(&self) -> bool {
        matches!(self.status.as_str(), "completed" | "failed" | "expired" | "cancelled")
    }
}

/// One result line of a remote batch.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteLine {
    pub custom_id: String,
    /// The HTTP answer the remote got for it, when it got one.
    pub status_code: Option<u16>,
    pub request_id: Option<String>,
    /// The answer's body, as JSON text.
    pub body: Option<String>,
    /// A line with no answer: its error code and message (`batch_expired`, …).
    pub error: Option<(String, String)>,
}

/// What the engine needs of a hosted Batch API.
#[async_trait]
pub trait BatchApi: Send + Sync {
    /// Uploads a shard's JSONL; returns the remote file id.
    async fn upload(&self, name: &str, jsonl: Bytes) -> Result<String, RemoteError>;
    /// Creates a batch over an uploaded file, tagged with `key` (also its idempotency key).
    async fn create(&self, key: &str, file_id: &str, endpoint: &str, window: &str) -> Result<RemoteStatus, RemoteError>;
    /// The batch tagged `key`, if the remote holds one created at or after `since` (unix s).
    async fn find_tagged(&self, key: &str, since: i64) -> Result<Option<RemoteStatus>, RemoteError>;
    async fn get(&self, id: &str) -> Result<RemoteStatus, RemoteError>;
    async fn cancel(&self, id: &str) -> Result<RemoteStatus, RemoteError>;
    /// Every result line of a final batch: its output file, then its error file.
    async fn results(&self, st: &RemoteStatus) -> Result<Vec<RemoteLine>, RemoteError>;
}

/// The OpenAI Batch + Files API at an upstream's `base_url` (which ends in `/v1`).
pub struct OpenAiBatch {
    base: String,
    key: Option<String>,
    http: reqwest::Client,
}

impl OpenAiBatch {
    pub fn new(cfg: &UpstreamConfig) -> Result<OpenAiBatch, super::BuildError> {
        let http = reqwest::Client::builder()
            .timeout(cfg.timeout.min(Duration::from_secs(600)))
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| super::BuildError(format!("upstream {:?}: cannot build its HTTP client: {e}", cfg.name)))?;
        Ok(OpenAiBatch { base: cfg.base_url.clone(), key: cfg.api_key.as_ref().map(|k| k.expose().to_string()), http })
    }

    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}{path}", self.base));
        match &self.key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }

    async fn send(&self, r: reqwest::RequestBuilder) -> Result<reqwest::Response, RemoteError> {
        let resp = r.send().await.map_err(RemoteError::Transport)?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        let err = &body["error"];
        let message = err["message"].as_str().unwrap_or("no message").to_string();
        Err(RemoteError::Status { status, code: err["code"].as_str().map(str::to_owned), message })
    }

    async fn json(&self, r: reqwest::RequestBuilder) -> Result<Value, RemoteError> {
        self.send(r).await?.json().await.map_err(|e| RemoteError::Decode(e.to_string()))
    }

    async fn file_lines(&self, id: &str, out: &mut Vec<RemoteLine>) -> Result<(), RemoteError> {
        let text = self.send(self.req(reqwest::Method::GET, &format!("/files/{id}/content"))).await?.text().await.map_err(RemoteError::Transport)?;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: Value = serde_json::from_str(line).map_err(|e| RemoteError::Decode(format!("a result line of file {id}: {e}")))?;
            out.push(remote_line(&v));
        }
        Ok(())
    }
}

/// A batch object's fields the engine reads.
pub fn remote_status(v: &Value) -> Result<RemoteStatus, RemoteError> {
    let s = |k: &str| v[k].as_str().filter(|s| !s.is_empty()).map(str::to_owned);
    let errors = v["errors"]["data"]
        .as_array()
        .map(|a| a.iter().map(|e| (e["code"].as_str().unwrap_or("").to_string(), e["message"].as_str().unwrap_or("").to_string())).collect())
        .unwrap_or_default();
    Ok(RemoteStatus {
        id: s("id").ok_or_else(|| RemoteError::Decode("a batch without an id".into()))?,
        status: s("status").ok_or_else(|| RemoteError::Decode("a batch without a status".into()))?,
        output_file_id: s("output_file_id"),
        error_file_id: s("error_file_id"),
        errors,
        completed: v["request_counts"]["completed"].as_u64().unwrap_or(0),
        failed: v["request_counts"]["failed"].as_u64().unwrap_or(0),
        metadata: v["metadata"].clone(),
    })
}

/// One line of a remote output or error file.
pub fn remote_line(v: &Value) -> RemoteLine {
    let resp = &v["response"];
    let error = v["error"].as_object().map(|e| {
        (e.get("code").and_then(Value::as_str).unwrap_or("remote_error").to_string(), e.get("message").and_then(Value::as_str).unwrap_or("").to_string())
    });
    RemoteLine {
        custom_id: v["custom_id"].as_str().unwrap_or_default().to_string(),
        status_code: resp["status_code"].as_u64().map(|s| s.min(999) as u16),
        request_id: resp["request_id"].as_str().map(str::to_owned),
        body: resp.get("body").filter(|b| !b.is_null()).map(Value::to_string),
        error,
    }
}

#[async_trait]
impl BatchApi for OpenAiBatch {
    async fn upload(&self, name: &str, jsonl: Bytes) -> Result<String, RemoteError> {
        let part = reqwest::multipart::Part::stream(jsonl).file_name(name.to_string()).mime_str("application/jsonl").map_err(RemoteError::Transport)?;
        let form = reqwest::multipart::Form::new().text("purpose", "batch").part("file", part);
        let v = self.json(self.req(reqwest::Method::POST, "/files").multipart(form)).await?;
        v["id"].as_str().map(str::to_owned).ok_or_else(|| RemoteError::Decode("an uploaded file without an id".into()))
    }

    async fn create(&self, key: &str, file_id: &str, endpoint: &str, window: &str) -> Result<RemoteStatus, RemoteError> {
        let body = json!({"input_file_id": file_id, "endpoint": endpoint, "completion_window": window, "metadata": {TAG: key}});
        let v = self.json(self.req(reqwest::Method::POST, "/batches").header("idempotency-key", key).json(&body)).await?;
        remote_status(&v)
    }

    async fn find_tagged(&self, key: &str, since: i64) -> Result<Option<RemoteStatus>, RemoteError> {
        let mut after: Option<String> = None;
        loop {
            let mut r = self.req(reqwest::Method::GET, "/batches").query(&[("limit", "100")]);
            if let Some(a) = &after {
                r = r.query(&[("after", a)]);
            }
            let page = self.json(r).await?;
            let items = page["data"].as_array().cloned().unwrap_or_default();
            for b in &items {
                if b["metadata"][TAG].as_str() == Some(key) {
                    return remote_status(b).map(Some);
                }
            }
            // Newest first: a page reaching before the record was made holds no older match.
            let older = items.last().and_then(|b| b["created_at"].as_i64()).is_some_and(|t| t < since - 60);
            if !page["has_more"].as_bool().unwrap_or(false) || older || items.is_empty() {
                return Ok(None);
            }
            after = items.last().and_then(|b| b["id"].as_str()).map(str::to_owned);
        }
    }

    async fn get(&self, id: &str) -> Result<RemoteStatus, RemoteError> {
        remote_status(&self.json(self.req(reqwest::Method::GET, &format!("/batches/{id}"))).await?)
    }

    async fn cancel(&self, id: &str) -> Result<RemoteStatus, RemoteError> {
        remote_status(&self.json(self.req(reqwest::Method::POST, &format!("/batches/{id}/cancel"))).await?)
    }

    async fn results(&self, st: &RemoteStatus) -> Result<Vec<RemoteLine>, RemoteError> {
        let mut out = Vec::new();
        for id in [&st.output_file_id, &st.error_file_id].into_iter().flatten() {
            self.file_lines(id, &mut out).await?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_objects_and_result_lines_are_read() {
        let b = json!({"id": "batch_1", "status": "failed", "output_file_id": null, "error_file_id": "",
            "errors": {"data": [{"code": "token_limit_exceeded", "message": "too many"}]}, "request_counts": {"completed": 2, "failed": 1},
            "metadata": {TAG: "k"}});
        let st = remote_status(&b).unwrap();
        assert_eq!((&st.output_file_id, &st.error_file_id), (&None, &None), "null and empty ids are no file");
        assert_eq!(st.errors, vec![("token_limit_exceeded".to_string(), "too many".to_string())]);
        assert!(st.is_final());
        assert!(remote_status(&json!({"status": "completed"})).is_err(), "a batch without an id");
        let ok = remote_line(&json!({"custom_id": "L3", "response": {"status_code": 200, "request_id": "r", "body": {"a": 1}}, "error": null}));
        assert_eq!((ok.status_code, ok.body.as_deref(), ok.error), (Some(200), Some(r#"{"a":1}"#), None));
        let expired = remote_line(&json!({"custom_id": "L4", "response": null, "error": {"code": "batch_expired", "message": "m"}}));
        assert_eq!((expired.status_code, expired.error), (None, Some(("batch_expired".into(), "m".into()))));
    }

    #[test]
    fn token_limits_and_retryable_statuses() {
        let st = |status, code: Option<&str>| RemoteError::Status { status, code: code.map(str::to_owned), message: String::new() };
        assert!(st(429, None).is_retryable() && st(503, None).is_retryable() && !st(400, None).is_retryable());
        assert!(st(429, Some("token_limit_exceeded")).is_token_limit());
        assert!(!st(500, None).is_token_limit());
    }
}

/// A batch-kind upstream: its API client and what it has learned of its token queue.
#[derive(Clone)]
pub struct RemoteUpstream {
    pub api: Arc<dyn BatchApi>,
    pub queue: Arc<TokenQueue>,
}

/// Tokens this node has enqueued at a remote (remote batches created and not yet ended), and
/// the most the remote took before it refused a create (`token_limit_exceeded`): learned,
/// then respected — a create waits until it fits, rather than being refused again.
#[derive(Debug, Default)]
pub struct TokenQueue {
    state: Mutex<QueueState>,
    freed: tokio::sync::Notify,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct QueueState {
    pub enqueued: u64,
    /// The learned limit; `None` until the remote refuses once.
    pub limit: Option<u64>,
}

impl TokenQueue {
    pub fn state(&self) -> QueueState {
        *self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until `tokens` more fit under the learned limit (always when nothing is enqueued),
    /// then counts them.
    pub async fn enqueue(&self, tokens: u64) {
        loop {
            let freed = self.freed.notified();
            {
                let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
                if s.enqueued == 0 || s.limit.is_none_or(|l| s.enqueued + tokens <= l) {
                    s.enqueued += tokens;
                    return;
                }
            }
            freed.await;
        }
    }

    /// The remote refused `tokens` more: what was enqueued then is its limit.
    pub fn refused(&self, tokens: u64) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.enqueued = s.enqueued.saturating_sub(tokens);
        s.limit = Some(s.enqueued.max(1));
        tracing::info!(enqueued = s.enqueued, "the remote refused more enqueued tokens; its limit is learned");
    }

    /// A remote batch ended: its tokens leave the queue.
    pub fn release(&self, tokens: u64) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.enqueued = s.enqueued.saturating_sub(tokens);
        drop(s);
        self.freed.notify_waiters();
    }
}
