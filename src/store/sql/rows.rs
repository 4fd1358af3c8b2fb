//! The rows the store reads that are not records as they are (see the store's `model`):
//! `sqlx::FromRow` types shared by both databases, and how each becomes a record; and the
//! reading of a [`WorkUnit`], whose numbers are checked.
//!
//! Reads are tolerant where an old build may have left odd values: a counter that an older
//! SQLite build let overflow into a REAL reads clamped ([`Count`]), an unreadable JSON column
//! reads as absent, a priority below 1 as 1. Only a status that is not one reads as an error.

use sqlx::error::BoxDynError;
use sqlx::postgres::{PgTypeInfo, PgValueRef, Postgres};
use sqlx::sqlite::{Sqlite, SqliteTypeInfo, SqliteValueRef};
use sqlx::{ColumnIndex, Decode, FromRow, Row, Type};

use crate::store::*;

/// An integer column read tolerantly: on SQLite a REAL (an overflowed sum written by an older
/// build) is clamped into `0..=i64::MAX` and a NULL reads as 0; on PostgreSQL a BIGINT.
pub(crate) struct Count(i64);

impl From<Count> for i64 {
    fn from(c: Count) -> i64 {
        c.0
    }
}

impl Type<Sqlite> for Count {
    fn type_info() -> SqliteTypeInfo {
        <i64 as Type<Sqlite>>::type_info()
    }

    fn compatible(ty: &SqliteTypeInfo) -> bool {
        <i64 as Type<Sqlite>>::compatible(ty) || <f64 as Type<Sqlite>>::compatible(ty)
    }
}

impl<'r> Decode<'r, Sqlite> for Count {
    fn decode(value: SqliteValueRef<'r>) -> Result<Self, BoxDynError> {
        if <f64 as Type<Sqlite>>::compatible(&sqlx::ValueRef::type_info(&value)) {
            let f = <f64 as Decode<Sqlite>>::decode(value)?;
            return Ok(Count(if f.is_nan() { 0 } else { f.clamp(0.0, i64::MAX as f64) as i64 }));
        }
        <i64 as Decode<Sqlite>>::decode(value).map(Count)
    }
}

impl Type<Postgres> for Count {
    fn type_info() -> PgTypeInfo {
        <i64 as Type<Postgres>>::type_info()
    }
}

impl<'r> Decode<'r, Postgres> for Count {
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        <i64 as Decode<Postgres>>::decode(value).map(Count)
    }
}

/// A `batches` row as read; its counters are [`Count`]s.
#[derive(sqlx_macros::FromRow)]
pub(super) struct BatchRow {
    id: BatchId,
    tenant: String,
    endpoint: String,
    input_file_id: FileId,
    completion_window: String,
    metadata: Option<String>,
    model: Option<String>,
    status: String,
    output_file_id: Option<FileId>,
    error_file_id: Option<FileId>,
    errors: Option<String>,
    created_at: Count,
    in_progress_at: Option<i64>,
    expires_at: Option<i64>,
    finalizing_at: Option<i64>,
    completed_at: Option<i64>,
    failed_at: Option<i64>,
    expired_at: Option<i64>,
    cancelling_at: Option<i64>,
    cancelled_at: Option<i64>,
    total: Count,
    completed: Count,
    failed: Count,
    input_tokens: Count,
    cached_tokens: Count,
    output_tokens: Count,
    reasoning_tokens: Count,
    total_tokens: Count,
    priority: Count,
    input_format: Option<String>,
    output_expires_after: Option<i64>,
    finalize_as: Option<String>,
    est_tokens: Count,
    est_requests: Count,
    idempotency_hash: Option<String>,
    api: String,
    unrun: Option<i64>,
}

/// A work unit as read from either database: its line and byte numbers are `BIGINT`s that
/// must fit a `u64`.
impl<'r, R: Row> FromRow<'r, R> for WorkUnit
where
    &'r str: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    bool: Decode<'r, R::Database> + Type<R::Database>,
{
    fn from_row(row: &'r R) -> sqlx::Result<WorkUnit> {
        let unsigned = |column: &'r str| -> sqlx::Result<u64> {
            let n: i64 = row.try_get(column)?;
            u64::try_from(n).map_err(|e| sqlx::Error::ColumnDecode { index: column.to_string(), source: Box::new(e) })
        };
        Ok(WorkUnit {
            batch_id: row.try_get("batch_id")?,
            idx: row.try_get("idx")?,
            first_line: unsigned("first_line")?,
            end_line: unsigned("end_line")?,
            line_count: unsigned("line_count")?,
            byte_offset: unsigned("byte_offset")?,
            byte_len: unsigned("byte_len")?,
            ordered: row.try_get("ordered")?,
            epoch: row.try_get("epoch")?,
        })
    }
}

fn json<T: serde::de::DeserializeOwned>(text: Option<String>) -> Option<T> {
    text.and_then(|s| serde_json::from_str(&s).ok())
}

impl TryFrom<BatchRow> for BatchRecord {
    type Error = Error;

    fn try_from(r: BatchRow) -> Result<BatchRecord> {
        let status = BatchStatus::parse(&r.status).ok_or_else(|| Error::corrupt(format!("batch {} has an unknown status {:?}", r.id, r.status)))?;
        let api = BatchApi::parse(&r.api).ok_or_else(|| Error::corrupt(format!("batch {} has an unknown api {:?}", r.id, r.api)))?;
        Ok(BatchRecord {
            id: r.id,
            tenant: r.tenant,
            endpoint: r.endpoint,
            input_file_id: r.input_file_id,
            completion_window: r.completion_window,
            metadata: json(r.metadata),
            model: r.model,
            status,
            output_file_id: r.output_file_id,
            error_file_id: r.error_file_id,
            errors: json(r.errors),
            created_at: r.created_at.0,
            in_progress_at: r.in_progress_at,
            expires_at: r.expires_at,
            finalizing_at: r.finalizing_at,
            completed_at: r.completed_at,
            failed_at: r.failed_at,
            expired_at: r.expired_at,
            cancelling_at: r.cancelling_at,
            cancelled_at: r.cancelled_at,
            total: r.total.0,
            completed: r.completed.0,
            failed: r.failed.0,
            usage: Usage {
                input_tokens: r.input_tokens.0,
                cached_tokens: r.cached_tokens.0,
                output_tokens: r.output_tokens.0,
                reasoning_tokens: r.reasoning_tokens.0,
                total_tokens: r.total_tokens.0,
            },
            priority: r.priority.0.max(1),
            input_format: r.input_format.and_then(|s| serde_json::from_value(s.into()).ok()),
            output_expires_after: r.output_expires_after,
            finalize_as: r.finalize_as.and_then(|s| BatchStatus::parse(&s)),
            est_tokens: r.est_tokens.0,
            est_requests: r.est_requests.0,
            idempotency_hash: r.idempotency_hash,
            api,
            unrun: r.unrun,
        })
    }
}

#[derive(sqlx_macros::FromRow)]
pub(super) struct AttemptRow {
    event_id: i64,
    status: Option<i64>,
    error: Option<String>,
    duration_ms: i64,
    at: i64,
    retry_at_ms: Option<i64>,
    delivered: bool,
}

impl From<AttemptRow> for DeliveryAttempt {
    fn from(r: AttemptRow) -> DeliveryAttempt {
        let status = r.status.map(|s| s.clamp(0, u16::MAX as i64) as u16);
        DeliveryAttempt {
            event_id: r.event_id,
            status,
            error: r.error,
            duration_ms: r.duration_ms,
            at: r.at,
            retry_at_ms: r.retry_at_ms,
            delivered: r.delivered,
        }
    }
}
