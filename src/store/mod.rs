//! Metadata storage: files, batches, work units and the result log, behind [`Store`].
//!
//! The store owns every fact that must survive a crash, except file bytes (see [`crate::blob`]).
//! Invariants every backend keeps:
//! - a work unit is leased by one node at a time; an expired lease may be taken over;
//! - a result is recorded at most once per (batch, line), and the batch's `request_counts` and
//!   `usage` change in the same transaction as the results they count, so only durable results
//!   are ever counted;
//! - a final batch (`completed`, `failed`, `expired`, `cancelled`) never changes again;
//! - the output and error files of a batch appear in the same transaction that makes it final.
//!
//! API calls pass a tenant and never see another tenant's rows (`NotFound`, as for a missing id).
//! Engine calls are tenant-blind. Backends: [`sqlite`] (embedded default). The conformance
//! checks in [`conformance`] run against every backend.

pub mod conformance;
mod model;
pub mod sqlite;

use async_trait::async_trait;

pub use model::*;

/// A backend-neutral store error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("not found")]
    NotFound,
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store error: {0}")]
    Other(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One page of a list, with whether more follow.
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub has_more: bool,
}

/// Query of `GET /v1/files`.
#[derive(Debug, Clone)]
pub struct FileQuery {
    pub purpose: Option<String>,
    pub limit: u32,
    pub ascending: bool,
    pub after: Option<String>,
}

/// What a commit of results did: only rows not recorded before are counted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommitOutcome {
    pub inserted: u64,
    pub duplicates: u64,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    // ---- files (tenant-scoped) ----
    async fn insert_file(&self, file: &FileRecord) -> Result<()>;
    /// A live (not deleted, not expired at `now`) file of the tenant.
    async fn get_file(&self, tenant: &str, id: &str, now: i64) -> Result<FileRecord>;
    async fn list_files(&self, tenant: &str, query: &FileQuery, now: i64) -> Result<Page<FileRecord>>;
    /// Deletes the row; `Conflict` while a batch that is not final reads the file.
    async fn delete_file(&self, tenant: &str, id: &str, now: i64) -> Result<FileRecord>;
    /// Files past their `expires_at`, for the janitor to remove (row first, then bytes).
    async fn expired_files(&self, now: i64, limit: u32) -> Result<Vec<FileRecord>>;
    async fn purge_file(&self, id: &str) -> Result<()>;

    // ---- batches (tenant-scoped) ----
    /// Inserts a new batch. With an idempotency key already used by the tenant, returns the
    /// batch created then instead (and inserts nothing).
    async fn insert_batch(&self, batch: &BatchRecord, idempotency_key: Option<&str>) -> Result<BatchRecord>;
    /// `tenant: None` is the engine's tenant-blind read.
    async fn get_batch(&self, tenant: Option<&str>, id: &str) -> Result<BatchRecord>;
    /// Newest first; `after` is the id of the last item of the previous page.
    async fn list_batches(&self, tenant: &str, limit: u32, after: Option<&str>) -> Result<Page<BatchRecord>>;
    /// `validating`/`in_progress` → `cancelling`; any other status is returned unchanged.
    async fn request_cancel(&self, tenant: &str, id: &str, now: i64) -> Result<BatchRecord>;

    // ---- engine ----
    /// Batches in any of `statuses`, oldest first.
    async fn batches_in(&self, statuses: &[BatchStatus]) -> Result<Vec<BatchRecord>>;
    /// `validating` → `in_progress` with its work units. `false` when the batch left
    /// `validating` meanwhile (a cancel), in which case nothing is written.
    async fn mark_validated(&self, id: &str, v: &Validated, now: i64) -> Result<bool>;
    /// `validating` → `failed` with `errors`. `false` when it left `validating` meanwhile.
    async fn mark_failed(&self, id: &str, errors: &[LineError], now: i64) -> Result<bool>;
    /// `in_progress` → `finalizing`, recording the final status it will end in (`completed`
    /// or `expired`) so that a restart mid-finalization ends it the same way. `finalizing_at`
    /// is set once. No-op for a batch in any other status.
    async fn begin_finalizing(&self, id: &str, outcome: BatchStatus, now: i64) -> Result<()>;
    /// Makes a batch final together with its output and error file records.
    async fn finish_batch(&self, id: &str, finish: &Finish) -> Result<()>;

    /// Leases the next unit of the batch that still has lines without results and no live
    /// lease. Exclusive: two callers never get the same unit.
    async fn lease_unit(&self, batch_id: &str, node: &str, ttl_s: i64, now: i64) -> Result<Option<WorkUnit>>;
    async fn renew_leases(&self, node: &str, ttl_s: i64, now: i64) -> Result<()>;
    /// Releases the leases of `node`, or every lease when `None` (an embedded store at start).
    async fn release_leases(&self, node: Option<&str>) -> Result<()>;
    /// Releases the leases `node` holds on one batch's units.
    async fn release_batch_leases(&self, batch_id: &str, node: &str) -> Result<()>;
    async fn units(&self, batch_id: &str) -> Result<Vec<WorkUnit>>;
    /// Line numbers of the unit that already have a durable result.
    async fn done_lines(&self, batch_id: &str, unit: &WorkUnit) -> Result<Vec<u64>>;
    /// Appends results in one transaction, counting only lines not recorded before.
    async fn commit_results(&self, results: &[ResultRecord]) -> Result<CommitOutcome>;
    /// Reads the result log in line order: up to `limit` results after `after_line` (only
    /// those whose `ok` equals `ok`, when given), as one JSONL chunk (each record followed by
    /// a newline) and the last line it holds; `None` when there are no more. The finalizer
    /// and the partial-results endpoint page through the log this way, many records a call.
    async fn results_chunk(&self, batch_id: &str, ok: Option<bool>, after_line: u64, limit: u32) -> Result<Option<(String, u64)>>;
    /// One result by `custom_id` (per-request lookup).
    async fn result_by_custom_id(&self, batch_id: &str, custom_id: &str) -> Result<StoredResult>;
    /// Number of write transactions committed since start (for the durability budget).
    fn commits(&self) -> u64;
}
