//! The records the store keeps, independent of any database or wire format. Those read as
//! they are stored derive `sqlx::FromRow`, so that both dialects decode them alike; a batch,
//! whose columns need checking as they are read, has its own row type (`sql::rows`).

use serde::{Deserialize, Serialize};

pub use crate::ids::{BatchId, FileId};

/// A stored file's metadata; its bytes live in the blob store under `blob_key`.
#[derive(Debug, Clone, PartialEq, sqlx_macros::FromRow)]
pub struct FileRecord {
    pub id: FileId,
    pub tenant: String,
    pub bytes: i64,
    pub created_at: i64,
    pub filename: String,
    pub purpose: String,
    pub expires_at: Option<i64>,
    pub blob_key: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchStatus {
    /// The status a batch is created in.
    #[default]
    Validating,
    Failed,
    InProgress,
    Finalizing,
    Completed,
    Expired,
    Cancelling,
    Cancelled,
}

impl BatchStatus {
    pub const ALL: [BatchStatus; 8] = [
        BatchStatus::Validating,
        BatchStatus::Failed,
        BatchStatus::InProgress,
        BatchStatus::Finalizing,
        BatchStatus::Completed,
        BatchStatus::Expired,
        BatchStatus::Cancelling,
        BatchStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BatchStatus::Validating => "validating",
            BatchStatus::Failed => "failed",
            BatchStatus::InProgress => "in_progress",
            BatchStatus::Finalizing => "finalizing",
            BatchStatus::Completed => "completed",
            BatchStatus::Expired => "expired",
            BatchStatus::Cancelling => "cancelling",
            BatchStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<BatchStatus> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn is_final(self) -> bool {
        matches!(self, BatchStatus::Completed | BatchStatus::Failed | BatchStatus::Expired | BatchStatus::Cancelled)
    }
}

/// Token usage, summed from upstream `usage` objects.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, sqlx_macros::FromRow)]
pub struct Usage {
    pub input_tokens: i64,
    pub cached_tokens: i64,
    pub output_tokens: i64,
    pub reasoning_tokens: i64,
    pub total_tokens: i64,
}

impl Usage {
    /// Adds `o`, saturating: no upstream answer, however large or negative its numbers, can
    /// overflow a sum (negative counts were already clamped to 0 when parsed).
    pub fn add(&mut self, o: &Usage) {
        self.input_tokens = self.input_tokens.saturating_add(o.input_tokens.max(0));
        self.cached_tokens = self.cached_tokens.saturating_add(o.cached_tokens.max(0));
        self.output_tokens = self.output_tokens.saturating_add(o.output_tokens.max(0));
        self.reasoning_tokens = self.reasoning_tokens.saturating_add(o.reasoning_tokens.max(0));
        self.total_tokens = self.total_tokens.saturating_add(o.total_tokens.max(0));
    }
}

/// One validation problem, as reported in `errors.data`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineError {
    pub code: String,
    pub message: String,
    pub param: Option<String>,
    pub line: Option<u64>,
}

/// How the input lines are written: full batch lines, or bare request bodies (extension).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputFormat {
    Full,
    Bare,
}

/// The API a batch was created through: it says how the batch's object and results are
/// rendered, never how it runs (the engine runs every batch the same way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BatchApi {
    /// OpenAI's Batch API (`/v1/batches`).
    #[default]
    OpenAi,
    /// Anthropic's Message Batches API (`/v1/messages/batches`).
    Anthropic,
}

impl BatchApi {
    pub fn as_str(self) -> &'static str {
        match self {
            BatchApi::OpenAi => "openai",
            BatchApi::Anthropic => "anthropic",
        }
    }

    pub fn parse(s: &str) -> Option<BatchApi> {
        match s {
            "openai" => Some(BatchApi::OpenAi),
            "anthropic" => Some(BatchApi::Anthropic),
            _ => None,
        }
    }
}

/// Where a page of a list starts: after the item `After` names (older items, the default
/// direction), or before the item `Before` names (newer items).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListCursor<'a> {
    First,
    After(&'a str),
    Before(&'a str),
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct BatchRecord {
    pub id: BatchId,
    pub tenant: String,
    pub endpoint: String,
    pub input_file_id: FileId,
    pub completion_window: String,
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    pub model: Option<String>,
    pub status: BatchStatus,
    pub output_file_id: Option<FileId>,
    pub error_file_id: Option<FileId>,
    pub errors: Option<Vec<LineError>>,
    pub created_at: i64,
    pub in_progress_at: Option<i64>,
    pub expires_at: Option<i64>,
    pub finalizing_at: Option<i64>,
    pub completed_at: Option<i64>,
    pub failed_at: Option<i64>,
    pub expired_at: Option<i64>,
    pub cancelling_at: Option<i64>,
    pub cancelled_at: Option<i64>,
    pub total: i64,
    pub completed: i64,
    pub failed: i64,
    pub usage: Usage,
    /// Share of the upstream capacity relative to other batches (1 = normal).
    pub priority: i64,
    pub input_format: Option<InputFormat>,
    /// Seconds after creation at which output/error files expire (`output_expires_after`).
    pub output_expires_after: Option<i64>,
    /// While `finalizing`: the final status finalization will set.
    pub finalize_as: Option<BatchStatus>,
    /// Estimated input tokens of the whole input (bytes / 4), known once validated.
    pub est_tokens: i64,
    /// Lines of the input counted when the batch was created (its newlines; 0 when not
    /// counted): what a `validating` batch holds against `max_queued_requests`.
    pub est_requests: i64,
    /// Hash of the create request, stored with its idempotency key: a later create with the
    /// same key and another hash is refused.
    pub idempotency_hash: Option<String>,
    /// The API the batch was created through.
    pub api: BatchApi,
    /// Lines a cancel or an expiry ended before they ran (known once finalizing has begun).
    pub unrun: Option<i64>,
}

impl BatchRecord {
    /// A batch just created: `validating`, nothing counted, every optional field unset.
    pub fn new(id: BatchId, tenant: String, input_file_id: FileId, endpoint: String, completion_window: String, created_at: i64, expires_at: i64) -> Self {
        BatchRecord { id, tenant, endpoint, input_file_id, completion_window, created_at, expires_at: Some(expires_at), priority: 1, ..Default::default() }
    }
}

/// A range of input lines, leased and run as one piece of work; or, for a batch dispatched in
/// prefix order (`ordered`), a range of its order file (`engine::order`). Read from a row by
/// `sql::rows` (its `u64`s are checked `BIGINT`s).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkUnit {
    pub batch_id: BatchId,
    pub idx: i64,
    /// Physical 1-based number of the unit's first line (ordered: its lowest line).
    pub first_line: u64,
    /// Physical 1-based number one past the unit's last line (ordered: past its highest).
    pub end_line: u64,
    /// Number of request lines (blank lines excluded) in the unit.
    pub line_count: u64,
    /// The unit's bytes: of the input file, or (ordered) of the batch's order file.
    pub byte_offset: u64,
    pub byte_len: u64,
    /// The unit lists its lines in the batch's order file rather than holding a range of
    /// the input (`engine::order`).
    pub ordered: bool,
    /// Lease epoch: raised by one each time the unit is leased, so a commit can tell whether
    /// the lease it worked under is still the current one (0: never leased).
    pub epoch: i64,
}

impl WorkUnit {
    pub fn key(&self) -> UnitKey {
        UnitKey { batch_id: self.batch_id.clone(), idx: self.idx }
    }
}

/// Names one work unit.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UnitKey {
    pub batch_id: BatchId,
    pub idx: i64,
}

/// What validation found for a good file.
#[derive(Debug, Clone)]
pub struct Validated {
    pub total: u64,
    pub model: Option<String>,
    pub format: InputFormat,
    pub units: Vec<WorkUnit>,
    /// Estimated input tokens of the whole file (bytes / 4), for quotas.
    pub est_tokens: u64,
}

/// One final answer for one line, as it goes into the output or error file.
#[derive(Debug, Clone)]
pub struct ResultRecord {
    pub batch_id: BatchId,
    pub line: u64,
    pub unit_idx: i64,
    pub custom_id: String,
    /// True for a 2xx answer (output file), false for everything else (error file).
    pub ok: bool,
    /// The whole output/error line as compact JSON, without a newline.
    pub record: String,
    pub usage: Usage,
    /// The model the line named (before aliases), for usage per model.
    pub model: String,
    /// The lease epoch of the unit the line ran under; `None` for records written outside a
    /// lease (the finalizer's `batch_cancelled` / `batch_expired` lines).
    pub epoch: Option<i64>,
}

/// A result as read back from the log.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredResult {
    pub line: u64,
    pub custom_id: String,
    pub ok: bool,
    pub record: String,
}

/// How a batch ends: its final status and the files finalization wrote.
#[derive(Debug, Clone)]
pub struct Finish {
    pub status: BatchStatus,
    pub at: i64,
    pub output_file: Option<FileRecord>,
    pub error_file: Option<FileRecord>,
}

/// One entry of the event outbox: written in the same transaction as the change it tells of.
#[derive(Debug, Clone, PartialEq, sqlx_macros::FromRow)]
pub struct Event {
    /// Increasing in commit order within one store; the SSE `id` and the resume cursor.
    pub id: i64,
    pub tenant: String,
    pub batch_id: BatchId,
    /// `batch.status`, `batch.progress`, `batch.stalled`, …
    #[sqlx(rename = "type")]
    pub kind: String,
    /// A JSON object, as text.
    pub data: String,
    pub created_at: i64,
}

/// Which events a reader wants: one tenant's, optionally one batch's (`None`: every tenant,
/// for the engine's own readers).
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub tenant: Option<String>,
    pub batch_id: Option<BatchId>,
}

/// A webhook delivery waiting to be made (the event it carries is final-status).
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub event: Event,
    /// Attempts made so far.
    pub attempts: i64,
}

/// What one delivery attempt did.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryAttempt {
    pub event_id: i64,
    /// The receiver's HTTP status, when it answered.
    pub status: Option<u16>,
    pub error: Option<String>,
    pub duration_ms: i64,
    pub at: i64,
    /// `Some(unix ms)`: try again then; `None`: done (delivered, or given up when not 2xx).
    pub retry_at_ms: Option<i64>,
    pub delivered: bool,
}

/// What a heartbeat learns: the live nodes and the store's clock.
#[derive(Debug, Clone, PartialEq)]
pub struct Membership {
    /// Oldest first (by `started_at`, then id).
    pub nodes: Vec<NodeInfo>,
    /// The store's clock during the heartbeat, in unix milliseconds (see [`crate::clock`]).
    pub clock_ms: i64,
}

/// A live node, as its last heartbeat described it.
#[derive(Debug, Clone, PartialEq, sqlx_macros::FromRow)]
pub struct NodeInfo {
    pub id: String,
    pub started_at: i64,
    /// What the node published with its heartbeat (JSON text): live per-batch and
    /// per-upstream state that only it knows.
    pub info: String,
}

/// Usage of one model within one batch during one hour.
#[derive(Debug, Clone, PartialEq, sqlx_macros::FromRow)]
pub struct UsageRow {
    pub batch_id: BatchId,
    pub model: String,
    /// Unix seconds of the hour's start.
    pub hour: i64,
    pub requests: i64,
    #[sqlx(flatten)]
    pub usage: Usage,
}

/// What a tenant (or everyone) has queued: see [`super::Batches::queued`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, sqlx_macros::FromRow)]
pub struct Queued {
    /// Batches `validating` or `in_progress`.
    pub batches: i64,
    /// Lines of running batches without a durable result; a validating batch counts the
    /// lines counted at its create ([`BatchRecord::est_requests`]).
    pub requests: i64,
    /// Estimated input tokens of those lines.
    pub tokens: i64,
}

impl Queued {
    /// The first of `limits` that adding `requests` lines and `tokens` tokens to what is
    /// queued goes over, if any.
    pub fn over(&self, limits: &QueueLimits, requests: i64, tokens: i64) -> Option<QueueLimit> {
        let past = |queued: i64, adding: i64, limit: Option<u64>| limit.is_some_and(|l| queued.saturating_add(adding.max(0)) > l.min(i64::MAX as u64) as i64);
        if past(self.requests, requests, limits.max_requests) {
            Some(QueueLimit::Requests)
        } else if past(self.tokens, tokens, limits.max_tokens) {
            Some(QueueLimit::Tokens)
        } else {
            None
        }
    }
}

/// One of a tenant's queue quotas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueLimit {
    Requests,
    Tokens,
}

/// A tenant's queue quotas, checked by [`super::Batches::admit_batch`] (`None`: no limit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueLimits {
    pub max_requests: Option<u64>,
    pub max_tokens: Option<u64>,
}

/// What [`super::Batches::admit_batch`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Admission {
    /// The batch was inserted (or, for an idempotency key used before, the batch created
    /// then is returned).
    Admitted(Box<BatchRecord>),
    /// Nothing was inserted: what is queued now, plus the batch's lines and tokens, would go
    /// over a limit.
    OverQuota { queued: Queued, requests: i64, tokens: i64 },
}

/// Where a remote batch stands; each state is recorded before the next step's side effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoteState {
    /// Its lines are chosen; nothing sent yet (or an upload whose file id was not recorded).
    Planned,
    /// Its input file is at the remote; the create may or may not have happened.
    Uploaded,
    /// The remote created it (its id is known): polled until it ends.
    Created,
    /// Ended at the remote and its results are durable here.
    Collected,
}

impl RemoteState {
    pub fn as_str(self) -> &'static str {
        match self {
            RemoteState::Planned => "planned",
            RemoteState::Uploaded => "uploaded",
            RemoteState::Created => "created",
            RemoteState::Collected => "collected",
        }
    }

    pub fn parse(s: &str) -> Option<RemoteState> {
        [RemoteState::Planned, RemoteState::Uploaded, RemoteState::Created, RemoteState::Collected].into_iter().find(|st| st.as_str() == s)
    }
}

/// One remote batch: a shard of a unit's lines, of one model, at one batch-kind upstream.
#[derive(Debug, Clone, PartialEq, sqlx_macros::FromRow)]
pub struct RemoteBatch {
    /// The idempotency key, also the `batchd_key` metadata tag at the remote.
    pub key: String,
    pub batch_id: BatchId,
    pub unit_idx: i64,
    pub upstream: String,
    pub model: String,
    /// Line numbers, comma-separated (see [`RemoteBatch::line_numbers`]).
    pub lines: String,
    pub line_count: i64,
    pub est_tokens: i64,
    pub state: String,
    pub input_file_id: Option<String>,
    pub remote_id: Option<String>,
    pub remote_status: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    /// The tokens its results reported, recorded when it was collected.
    pub input_tokens: i64,
    pub output_tokens: i64,
}

impl RemoteBatch {
    /// The `remote_status` of a record of lines a remote could not finish in time, sent
    /// online to the batch upstream's `fallback` (at full price).
    pub const ONLINE_FALLBACK: &'static str = "online_fallback";

    pub fn line_numbers(&self) -> Vec<u64> {
        self.lines.split(',').filter_map(|l| l.parse().ok()).collect()
    }

    pub fn join_lines(lines: &[u64]) -> String {
        lines.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
    }

    /// The recorded state (an unknown one reads as `planned`: reconciled, never created twice).
    pub fn state(&self) -> RemoteState {
        RemoteState::parse(&self.state).unwrap_or(RemoteState::Planned)
    }
}
