//! Clients of hosted Batch APIs, behind one trait ([`BatchApi`]): what `engine::remote` needs
//! of a remote — (upload and) create a shard's batch, find a batch a crash left unrecorded,
//! poll, cancel, and read its result lines.
//!
//! [`OpenAiBatch`] (`openai`) speaks the OpenAI Batch + Files API (OpenAI itself, compatible
//! providers, a batchd): the requests are uploaded as a file, the create carries an
//! idempotency key and a metadata tag. [`AnthropicBatch`] (`anthropic`) speaks Anthropic's
//! Message Batches API (Anthropic, a batchd): the requests go inline in the create, and a
//! batch has no metadata, so it is recognised by its requests' custom_ids, which carry the
//! shard's tag ([`custom_id`]). The engine never learns which one it talks to.

mod anthropic;
mod http;
mod openai;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use serde_json::Value;

pub use anthropic::AnthropicBatch;
pub use openai::OpenAiBatch;

/// The metadata key every remote batch carries where the API has metadata: its idempotency
/// key, found again by listing.
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
    /// A reconciliation cannot tell yet: a batch created around the crash is still running,
    /// and whose it is shows only in its results.
    #[error("remote batch {0} created around the crash is still running; whose it is shows once it ends")]
    Undecided(String),
}

impl RemoteError {
    /// Worth trying again later: the network, 408/409/429, 5xx, an undecided reconciliation.
    pub fn is_retryable(&self) -> bool {
        match self {
            RemoteError::Transport(_) | RemoteError::Decode(_) | RemoteError::Undecided(_) => true,
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
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RemoteStatus {
    pub id: String,
    /// In OpenAI's words (`in_progress`, `cancelling`, `completed`, `expired`, `cancelled`,
    /// `failed`, …), whatever the API.
    pub status: String,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    /// Where the results are read (Anthropic's `results_url`).
    pub results_url: Option<String>,
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
    /// The answer's body, as JSON text, in the API the request was sent in.
    pub body: Option<String>,
    /// A line with no answer: its error code and message (`batch_expired`, …).
    pub error: Option<(String, String)>,
}

/// One request of a remote batch, in the remote's own API.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteRequest {
    /// [`custom_id`] of the shard's tag and the local line.
    pub custom_id: String,
    /// The path below `/v1` (`/chat/completions`, `/messages`).
    pub path: String,
    pub body: Bytes,
}

/// Where a create finds its requests.
#[derive(Debug, Clone, Copy)]
pub enum Input<'a> {
    /// A file uploaded before ([`BatchApi::upload`]).
    File(&'a str),
    /// The requests themselves, sent in the create.
    Inline(&'a [RemoteRequest]),
}

/// What a reconciliation looks for: the remote batch created for `key`, if any, between
/// `since` and `until` (unix s, by the remote's clock give or take a minute); `known` are
/// the remote ids already recorded, which are someone else's.
#[derive(Debug, Clone, Copy)]
pub struct Lookup<'a> {
    pub key: &'a str,
    pub since: i64,
    pub until: i64,
    pub known: &'a HashSet<String>,
}

/// Slack allowed between the local clock and the remote's.
pub const CLOCK_SLACK_S: i64 = 60;

/// The shard tag a remote batch's custom_ids start with: a hash of its record's key, short
/// enough for Anthropic's 64-character custom_ids.
pub fn shard_tag(key: &str) -> String {
    format!("b{:016x}", xxhash_rust::xxh3::xxh3_64(key.as_bytes()))
}

/// The custom_id a local line carries at the remote: the shard's tag, then the line number.
pub fn custom_id(key: &str, line: u64) -> String {
    format!("{}-L{line}", shard_tag(key))
}

/// The local line a remote custom_id names (`<tag>-L<n>`, or `L<n>` as written before tags).
pub fn line_of(custom_id: &str) -> Option<u64> {
    custom_id.rsplit_once("-L").map(|(_, n)| n).or_else(|| custom_id.strip_prefix('L'))?.parse().ok()
}

/// What the engine needs of a hosted Batch API.
#[async_trait]
pub trait BatchApi: Send + Sync {
    /// Whether the requests are uploaded as a file before the create (`true`) or sent in it.
    fn uploads(&self) -> bool;
    /// Uploads a shard's requests as a file; returns the remote file id.
    async fn upload(&self, name: &str, requests: &[RemoteRequest]) -> Result<String, RemoteError>;
    /// Creates a batch for the record `key` (its idempotency key or its tag) over `input`.
    async fn create(&self, key: &str, input: Input<'_>, endpoint: &str, window: &str) -> Result<RemoteStatus, RemoteError>;
    /// Whether repeating a create under the same key is harmless (an idempotency key): when
    /// not, a create that failed without an answer is reconciled before it is sent again.
    fn idempotent(&self) -> bool;
    /// The batch created for `look.key`, if the remote holds one; [`RemoteError::Undecided`]
    /// while that cannot be told yet.
    async fn find_created(&self, look: Lookup<'_>) -> Result<Option<RemoteStatus>, RemoteError>;
    async fn get(&self, id: &str) -> Result<RemoteStatus, RemoteError>;
    async fn cancel(&self, id: &str) -> Result<RemoteStatus, RemoteError>;
    /// Every result line of a final batch.
    async fn results(&self, st: &RemoteStatus) -> Result<Vec<RemoteLine>, RemoteError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_limits_and_retryable_statuses() {
        let st = |status, code: Option<&str>| RemoteError::Status { status, code: code.map(str::to_owned), message: String::new() };
        assert!(st(429, None).is_retryable() && st(503, None).is_retryable() && !st(400, None).is_retryable());
        assert!(st(429, Some("token_limit_exceeded")).is_token_limit());
        assert!(!st(500, None).is_token_limit());
    }

    #[test]
    fn custom_ids_carry_the_shard_tag_and_the_line() {
        let id = custom_id("batch_abc-u3-7", 1234);
        assert!(id.starts_with(&shard_tag("batch_abc-u3-7")) && id.len() <= 64, "{id}");
        assert_ne!(shard_tag("batch_abc-u3-7"), shard_tag("batch_abc-u3-8"));
        assert!(id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'), "Anthropic's custom_id alphabet: {id}");
        assert_eq!((line_of(&id), line_of("L17"), line_of("x-L")), (Some(1234), Some(17), None));
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
