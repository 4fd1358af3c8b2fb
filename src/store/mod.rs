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
//! - a work unit's lease carries an epoch raised at each lease; lease and claim expiry are
//!   judged by the store's own clock, never a node's, so nodes with skewed clocks agree;
//! - every change of a batch's status appends a `batch.status` event to the outbox in the same
//!   transaction, and the change that makes a batch final also queues its webhook delivery;
//!   commits append `batch.progress` at most once a second per batch, telling the durable
//!   `request_counts` and `usage.total_tokens` (so that any node can derive rates);
//! - counters saturate: no value an upstream reports can overflow a stored sum;
//! - a list cursor (the id of the last item of a page) keeps placing the next page after the
//!   item it names is deleted.
//!
//! API calls pass a tenant and never see another tenant's rows (`NotFound`, as for a missing id).
//! Engine calls are tenant-blind.
//!
//! Layers, top down:
//! - the traits, split by concern ([`Files`], [`Batches`], [`Work`], [`Cluster`],
//!   [`Outbox`]; [`Store`] is all of them), the records (`model.rs`) and the neutral
//!   [`Error`], which keeps the driver's error as its source;
//! - [`sql::SqlStore`], the one implementation: every statement written once, for any
//!   [`sql::Dialect`];
//! - the dialects: [`sqlite`] (embedded default, [`sqlite::SqliteStore`]) and [`postgres`]
//!   (shared by many nodes, [`postgres::PgStore`]): their clocks, locks, saturating sums and
//!   result-log layouts;
//! - [`schema`]: the migrations of each database and what a node does with a schema not its
//!   own; [`migrate`] copies an embedded install into PostgreSQL; [`url`] names a database.
//!
//! The conformance suite that both dialects pass is test code: `tests/it/store/`.

mod error;
pub mod migrate;
mod model;
pub mod postgres;
pub mod schema;
pub mod sql;
pub mod sqlite;
pub mod url;

use std::time::Duration;

use async_trait::async_trait;

pub use error::{Cause, Error, Result};
pub use model::*;
pub use url::DatabaseUrl;

/// The store traits, for code that calls them on a concrete backend.
pub mod prelude {
    pub use super::{Batches, Cluster, Files, Outbox, Remote, Store, Work};
}

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
    /// Lines already recorded (or of a batch already final), ignored.
    pub duplicates: u64,
    /// Units whose lease the committing node no longer holds (another epoch or owner): its
    /// results were still recorded (they are final answers, and a line is recorded once),
    /// but the node must stop feeding those units.
    pub lost: Vec<UnitKey>,
}

/// Largest value a stored counter takes; sums saturate here.
pub const MAX_COUNT: i64 = i64::MAX;

#[async_trait]
pub trait Files: Send + Sync {
    async fn insert_file(&self, file: &FileRecord) -> Result<()>;
    /// A live (not deleted, not expired at `now`) file of the tenant.
    async fn get_file(&self, tenant: &str, id: &FileId, now: i64) -> Result<FileRecord>;
    async fn list_files(&self, tenant: &str, query: &FileQuery, now: i64) -> Result<Page<FileRecord>>;
    /// Deletes the row; `Conflict` while a batch that is not final reads the file.
    async fn delete_file(&self, tenant: &str, id: &FileId, now: i64) -> Result<FileRecord>;
    /// Files past their `expires_at`, for the janitor to remove (row first, then bytes).
    async fn expired_files(&self, now: i64, limit: u32) -> Result<Vec<FileRecord>>;
    async fn purge_file(&self, id: &FileId) -> Result<()>;
    /// Which of `ids` have a file row (expired or not): the janitor deletes blobs with none.
    async fn existing_file_ids(&self, ids: &[FileId]) -> Result<Vec<FileId>>;
}

#[async_trait]
pub trait Batches: Send + Sync {
    /// Inserts a new batch. With an idempotency key already used by the tenant, returns the
    /// batch created then instead (and inserts nothing).
    async fn insert_batch(&self, batch: &BatchRecord, idempotency_key: Option<&str>) -> Result<BatchRecord> {
        match self.admit_batch(batch, idempotency_key, QueueLimits::default()).await? {
            Admission::Admitted(b) => Ok(*b),
            Admission::OverQuota { .. } => Err(Error::corrupt("a batch with no limits went over a quota")),
        }
    }
    /// [`Batches::insert_batch`] within the tenant's queue quotas: what it has queued (see
    /// [`Batches::queued`]) plus this batch's `est_requests` lines and its input file's
    /// bytes / 4 tokens must stay within `limits`, else nothing is inserted. The check and
    /// the insert are one transaction, serialised with every other admission of the tenant
    /// (on every node), so creates racing each other cannot together go over a limit. A key
    /// used before returns its batch whatever the queue holds.
    async fn admit_batch(&self, batch: &BatchRecord, idempotency_key: Option<&str>, limits: QueueLimits) -> Result<Admission>;
    /// `tenant: None` is the engine's tenant-blind read.
    async fn get_batch(&self, tenant: Option<&str>, id: &BatchId) -> Result<BatchRecord>;
    /// Newest first; `after` is the id of the last item of the previous page.
    async fn list_batches(&self, tenant: &str, limit: u32, after: Option<&str>) -> Result<Page<BatchRecord>>;
    /// Newest first, only the batches created through `api`; `cursor` names the item a page
    /// starts after (older items) or before (newer items, still listed newest first).
    async fn list_batches_of(&self, tenant: &str, api: BatchApi, limit: u32, cursor: ListCursor<'_>) -> Result<Page<BatchRecord>>;
    /// Deletes a final batch for its tenant: it is gone from every read made for a tenant
    /// (its row stays, for the list cursors naming it). `Conflict` while it is not final.
    async fn delete_batch(&self, tenant: &str, id: &BatchId) -> Result<BatchRecord>;
    /// Records the lines a cancel or an expiry ends before they ran, once: a finalization
    /// done again after a crash keeps the first count.
    async fn note_unrun(&self, id: &BatchId, lines: i64) -> Result<()>;
    /// `validating`/`in_progress` → `cancelling`; any other status is returned unchanged.
    async fn request_cancel(&self, tenant: &str, id: &BatchId, now: i64) -> Result<BatchRecord>;
    /// Ids and statuses of the batches in any of `statuses`, oldest first. Only these two
    /// columns are read, so one unreadable row can never hide the others.
    async fn batches_in(&self, statuses: &[BatchStatus]) -> Result<Vec<(BatchId, BatchStatus)>>;
    /// Usage per model and hour of one tenant's batches, hours in `[start, end)`.
    async fn usage(&self, tenant: &str, start: i64, end: i64) -> Result<Vec<UsageRow>>;
    /// Usage per model of one batch (all hours summed; `hour` is 0).
    async fn batch_usage(&self, batch_id: &BatchId) -> Result<Vec<UsageRow>>;
    /// What is queued (batches `validating` or `in_progress`) for one tenant, or for every
    /// tenant with `None`: lines without a result, and their estimated input tokens (a
    /// running batch: its `est_tokens` in proportion to the lines left; a validating one:
    /// its `est_requests` lines and its input file's bytes / 4).
    async fn queued(&self, tenant: Option<&str>) -> Result<Queued>;
}

#[async_trait]
pub trait Work: Send + Sync {
    /// `validating` → `in_progress` with its work units. `false` when the batch left
    /// `validating` meanwhile (a cancel), in which case nothing is written.
    async fn mark_validated(&self, id: &BatchId, v: &Validated, now: i64) -> Result<bool>;
    /// `validating` → `failed` with `errors`. `false` when it left `validating` meanwhile.
    async fn mark_failed(&self, id: &BatchId, errors: &[LineError], now: i64) -> Result<bool>;
    /// Any status that is not final → `failed` with `errors` (a batch the engine cannot go on
    /// with: its input vanished, its stored state is unreadable). `false` if already final.
    async fn fail_batch(&self, id: &BatchId, errors: &[LineError], now: i64) -> Result<bool>;
    /// `in_progress` → `finalizing`, recording the final status it will end in (`completed`
    /// or `expired`) so that a restart mid-finalization ends it the same way. `finalizing_at`
    /// is set once. No-op for a batch in any other status.
    async fn begin_finalizing(&self, id: &BatchId, outcome: BatchStatus, now: i64) -> Result<()>;
    /// Makes a batch final together with its output and error file records.
    async fn finish_batch(&self, id: &BatchId, finish: &Finish) -> Result<()>;

    /// Claims a batch that is not final for a step one node does alone (validation,
    /// finalization): `true` when `node` holds the claim now (newly or again). A claim
    /// expires `ttl` after it was taken or renewed, by the store's clock.
    async fn claim_batch(&self, id: &BatchId, node: &str, ttl: Duration) -> Result<bool>;
    async fn release_claim(&self, id: &BatchId, node: &str) -> Result<()>;

    /// Leases the next unit of the batch that still has lines without results and no live
    /// lease, raising its epoch. Exclusive: two callers never get the same unit.
    async fn lease_unit(&self, batch_id: &BatchId, node: &str, ttl: Duration) -> Result<Option<WorkUnit>>;
    /// Extends every lease and claim `node` holds; returns the units it still holds.
    async fn renew_leases(&self, node: &str, ttl: Duration) -> Result<Vec<UnitKey>>;
    /// Releases the leases and claims of `node`, or all of them when `None` (an embedded
    /// store at start).
    async fn release_leases(&self, node: Option<&str>) -> Result<()>;
    /// Releases the leases `node` holds on one batch's units.
    async fn release_batch_leases(&self, batch_id: &BatchId, node: &str) -> Result<()>;
    async fn units(&self, batch_id: &BatchId) -> Result<Vec<WorkUnit>>;
    /// Line numbers of the unit that already have a durable result.
    async fn done_lines(&self, batch_id: &BatchId, unit: &WorkUnit) -> Result<Vec<u64>>;
    /// Those of `lines` (line numbers of one batch, any order) that already have a durable
    /// result, ascending: the finished lines of a unit that lists its lines (`ordered`).
    async fn done_among(&self, batch_id: &BatchId, lines: &[u64]) -> Result<Vec<u64>>;
    /// Appends results in one transaction, counting only lines not recorded before and
    /// ignoring lines of batches already final; checks each leased unit's epoch and owner
    /// against `node` (see [`CommitOutcome::lost`]).
    async fn commit_results(&self, node: &str, results: &[ResultRecord]) -> Result<CommitOutcome>;
    /// Reads the result log in line order: up to `limit` results after `after_line` (only
    /// those whose `ok` equals `ok`, when given), as one JSONL chunk (each record followed by
    /// a newline) and the last line it holds; `None` when there are no more. The finalizer
    /// and the partial-results endpoint page through the log this way, many records a call.
    async fn results_chunk(&self, batch_id: &BatchId, ok: Option<bool>, after_line: u64, limit: u32) -> Result<Option<(String, u64)>>;
    /// One result by `custom_id` (per-request lookup).
    async fn result_by_custom_id(&self, batch_id: &BatchId, custom_id: &str) -> Result<StoredResult>;
}

/// What a node publishes with its heartbeat, from what the other live nodes published (see
/// [`Cluster::heartbeat`]).
pub type Publish<'a> = &'a (dyn Fn(&[NodeInfo]) -> String + Send + Sync);

#[async_trait]
pub trait Cluster: Send + Sync {
    /// Records that `node` is alive until `ttl` from now (store clock), with what it
    /// publishes (`publish` of the other live nodes: JSON text); forgets nodes whose
    /// heartbeat lapsed; returns the live nodes, `node` included, and the store's clock.
    /// Heartbeats take turns: between reading the others and writing its own, no other
    /// heartbeat writes (what one publishes may depend on what the others published).
    async fn heartbeat(&self, node: &str, started_at: i64, ttl: Duration, publish: Publish<'_>) -> Result<Membership>;
    /// A node leaving gracefully: its row, leases and claims go at once.
    async fn leave(&self, node: &str) -> Result<()>;
    /// Every node's batch status changes as they commit, where the database can push them
    /// (PostgreSQL's `LISTEN`); `None` where it cannot (the embedded store, which has no
    /// other node). A change committed while no feed is open is missed: a caller that opens
    /// one reads the statuses it cares about afterwards.
    async fn status_feed(&self) -> Result<Option<Box<dyn StatusFeed>>>;
}

/// A batch's new status, as a transition committed it (on any node).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusChange {
    pub batch_id: BatchId,
    pub status: BatchStatus,
}

/// The status changes of every node (see [`Cluster::status_feed`]).
#[async_trait]
pub trait StatusFeed: Send {
    /// The next change; an error once the feed's connection is lost (a new feed must be
    /// opened, and changes committed meanwhile are missed).
    async fn next(&mut self) -> Result<StatusChange>;
}

#[async_trait]
pub trait Outbox: Send + Sync {
    /// Events after `after` (an event id) matching `filter`, oldest first.
    async fn events_after(&self, filter: &EventFilter, after: i64, limit: u32) -> Result<Vec<Event>>;
    /// The newest `limit` events matching `filter` (and of type `kind`, when given), newest
    /// first: the last minute of `batch.progress` for rates, the newest id to follow from.
    async fn latest_events(&self, filter: &EventFilter, kind: Option<&str>, limit: u32) -> Result<Vec<Event>>;
    /// Appends an event the engine observed (a stall); the store appends status and progress
    /// events itself.
    async fn append_event(&self, batch_id: &BatchId, kind: &str, data: &str, now: i64) -> Result<i64>;
    /// Deletes `batch.progress` events of final batches created before `before`.
    async fn prune_events(&self, before: i64) -> Result<u64>;
    /// Webhook deliveries due now, claimed by `node` for `lease` (another node does not take
    /// them meanwhile).
    async fn due_deliveries(&self, node: &str, limit: u32, lease: Duration) -> Result<Vec<Delivery>>;
    /// Records one attempt and what comes next (see [`DeliveryAttempt`]).
    async fn record_delivery(&self, attempt: &DeliveryAttempt) -> Result<()>;
    /// Every attempt made for an event, oldest first: (at, status, error).
    async fn delivery_attempts(&self, event_id: i64) -> Result<Vec<DeliveryAttempt>>;
}

/// Remote batches at batch-kind upstreams (`engine::remote`): each is recorded before each
/// step's side effect, so that a restart resumes it instead of creating it again.
#[async_trait]
pub trait Remote: Send + Sync {
    /// Records a planned remote batch; a key recorded before is left as it was (`false`).
    async fn plan_remote(&self, r: &RemoteBatch) -> Result<bool>;
    /// Moves a remote batch to `state`, recording what became known (a `None` keeps the old value).
    async fn update_remote(
        &self,
        key: &str,
        state: RemoteState,
        input_file_id: Option<&str>,
        remote_id: Option<&str>,
        remote_status: Option<&str>,
        now: i64,
    ) -> Result<()>;
    /// Marks a remote batch collected: its results are durable, its final remote status and
    /// the tokens they reported recorded.
    async fn collect_remote(&self, key: &str, remote_status: &str, input_tokens: i64, output_tokens: i64, now: i64) -> Result<()>;
    /// Adds tokens to a remote batch's (the lines its fallback ran, each as its answer came).
    async fn add_remote_usage(&self, key: &str, input_tokens: i64, output_tokens: i64) -> Result<()>;
    /// The records of lines `tenant`'s batches ran at a fallback
    /// ([`RemoteBatch::ONLINE_FALLBACK`]), begun in `[start, end)`.
    async fn fallback_usage(&self, tenant: &str, start: i64, end: i64) -> Result<Vec<RemoteBatch>>;
    /// The remote batches of a batch (of one unit, when given), oldest first.
    async fn remote_batches(&self, batch_id: &BatchId, unit_idx: Option<i64>) -> Result<Vec<RemoteBatch>>;
    /// The remote ids recorded for `upstream`'s remote batches touched at or after `since`
    /// (the batches a reconciliation by content need not look into: they are known).
    async fn remote_ids(&self, upstream: &str, since: i64) -> Result<Vec<String>>;
}

/// Everything a node needs from its metadata store.
pub trait Store: Files + Batches + Work + Cluster + Outbox + Remote + 'static {
    /// Number of write transactions committed since start (for the durability budget).
    fn commits(&self) -> u64;
}
