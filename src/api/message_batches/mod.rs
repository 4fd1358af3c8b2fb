//! `/v1/messages/batches`: Anthropic's Message Batches API, as its SDKs call it — create,
//! retrieve, list, cancel, delete, results.
//!
//! A Message Batch is a batch like any other: its requests become an input file in batchd's
//! own line format (`intake`, streamed and checked as the body arrives), and its record is
//! marked `api = anthropic`, so the engine runs it unchanged (exactly once through kill -9,
//! limits, cancel, expiry, priorities, quotas, events, retry, the console). Only what a client
//! reads differs: objects and result lines are rendered in Anthropic's shapes at read time
//! (`render`), errors leave in Anthropic's envelope with a `request-id` header (`envelope`).
//! This API lists only Message Batches; OpenAI's `/v1/batches` shows them too (endpoint
//! `/v1/messages`), so every extension of it (progress, events, retry, per-request lookup,
//! partial results) works on them by id.

mod envelope;
pub mod intake;
pub mod render;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::extract::Query;
use super::files::{cursor_error, not_found_as, parse_limit, BATCH_FILE_EXPIRY};
use super::AppState;
use crate::error::ApiError;
use crate::store::{BatchApi, BatchId, BatchRecord, FileRecord, ListCursor};
pub use envelope::AnthropicError;
use envelope::{AnthropicResult, AnthropicTenant};
use intake::{Accepted, Checker, Limits, Refusal};

/// Message Batches end processing this long after creation, as on Anthropic's API, unless the
/// create names another of the server's completion windows (extension).
const WINDOW: &str = "24h";
const WINDOW_S: i64 = 86_400;

/// The routes, below `/v1`.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/messages/batches", post(create).get(list))
        .route("/messages/batches/{id}", get(retrieve).delete(delete))
        .route("/messages/batches/{id}/cancel", post(cancel))
        .route("/messages/batches/{id}/results", get(results))
}

fn no_such_batch(id: &str) -> AnthropicError {
    AnthropicError(ApiError::not_found(format!("No Message Batch found with id {id:?}.")))
}

/// The tenant's Message Batch `id` (an OpenAI batch's id is not one).
async fn tenant_batch(st: &AppState, tenant: &str, id: &BatchId) -> AnthropicResult<BatchRecord> {
    let b = st.store.get_batch(Some(tenant), id).await.map_err(|e| not_found_as(e, || no_such_batch(id).0))?;
    if b.api != BatchApi::Anthropic {
        return Err(no_such_batch(id));
    }
    Ok(b)
}

/// Where a batch's results are read, as an absolute URL on the host the client called (the
/// SDKs fetch `results_url` as given).
fn results_url(headers: &HeaderMap, id: &str) -> String {
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("localhost");
    let scheme = headers.get("x-forwarded-proto").and_then(|v| v.to_str().ok()).filter(|s| *s == "https").unwrap_or("http");
    format!("{scheme}://{host}/v1/messages/batches/{id}/results")
}

fn object(headers: &HeaderMap, b: &BatchRecord) -> Json<Value> {
    Json(render::message_batch(b, Some(results_url(headers, &b.id))))
}

/// How much one create may hold: Anthropic's limits, or the server's when lower.
fn limits(st: &AppState) -> Limits {
    let l = &st.cfg.limits;
    Limits { max_requests: intake::MAX_REQUESTS.min(l.max_lines), max_bytes: intake::MAX_BYTES.min(l.max_file_bytes), max_line_bytes: l.max_line_bytes }
}

async fn create(State(st): State<AppState>, AnthropicTenant(tenant): AnthropicTenant, headers: HeaderMap, body: Body) -> AnthropicResult<Json<Value>> {
    st.writable()?;
    let limits = limits(&st);
    let json = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|c| c.to_ascii_lowercase().contains("json"));
    if !json {
        return Err(ApiError::bad_request("The request body must be JSON, sent with 'Content-Type: application/json'.").into());
    }
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_bytes) {
        return Err(too_large(limits.max_bytes));
    }
    let file_id = crate::ids::file_id();
    let key = format!("files/{file_id}");
    let (accepted, bytes) = store_requests(&st, &key, body, limits).await?;
    let now = crate::now_unix();
    let file = FileRecord {
        id: file_id.clone(),
        tenant: tenant.clone(),
        bytes: bytes as i64,
        created_at: now,
        filename: "message_batch_requests.jsonl".into(),
        purpose: "batch".into(),
        expires_at: Some(now + BATCH_FILE_EXPIRY),
        blob_key: key.clone(),
    };
    let admitted = admit(&st, &tenant, &file, &accepted, now).await;
    if admitted.is_err() {
        let _ = st.store.purge_file(&file.id).await;
        let _ = st.blob.delete(&key).await;
    }
    let b = admitted?;
    st.engine.wake();
    st.engine.outbox_changed();
    Ok(object(&headers, &b))
}

/// Streams the body's requests, checked, into the blob `key`; its size when all were good.
async fn store_requests(st: &AppState, key: &str, body: Body, limits: Limits) -> AnthropicResult<(Accepted, u64)> {
    let (mut lines, intake) = intake::start(body.into_data_stream(), Checker::new(st.router.clone(), limits));
    let mut w = st.blob.writer(key);
    // The lines are a little longer than the requests: the file is held to the server's limit too.
    let max_file = st.cfg.limits.max_file_bytes;
    while let Some(line) = lines.recv().await {
        let written = if w.written() + line.len() as u64 > max_file { Err(too_large(max_file)) } else { w.write(&line).await.map_err(AnthropicError::from) };
        if let Err(e) = written {
            drop(lines);
            let _ = intake.outcome().await;
            w.abort().await;
            return Err(e);
        }
    }
    match intake.outcome().await {
        Ok(accepted) => Ok((accepted, w.finish().await?)),
        Err(refusal) => {
            w.abort().await;
            Err(refused(refusal))
        }
    }
}

fn too_large(max: u64) -> AnthropicError {
    AnthropicError(ApiError::too_large(format!("A Message Batch may be at most {max} bytes.")))
}

/// A refused body: 413 when too large, else a 400 listing every problem with its index.
fn refused(r: Refusal) -> AnthropicError {
    match r {
        Refusal::TooLarge(max) => too_large(max),
        Refusal::Invalid { problems, count } => {
            let mut list: Vec<String> = problems.iter().map(ToString::to_string).collect();
            if count > problems.len() {
                list.push(format!("and {} more", count - problems.len()));
            }
            let what = if count == 1 { "1 problem".to_string() } else { format!("{count} problems") };
            AnthropicError(ApiError::bad_request(format!("{what} in the Message Batch: {}", list.join("; "))))
        }
    }
}

/// Records the input file and the batch (within the tenant's quotas).
async fn admit(st: &AppState, tenant: &str, file: &FileRecord, a: &Accepted, now: i64) -> Result<BatchRecord, ApiError> {
    let (window, seconds) = window(st, a.extensions.get("completion_window"))?;
    let priority = super::batches::check_priority(a.extensions.get("priority"))?;
    st.store.insert_file(file).await?;
    let mut record = BatchRecord::new(crate::ids::message_batch_id(), tenant.into(), file.id.clone(), intake::LINE_URL.into(), window, now, now + seconds);
    record.api = BatchApi::Anthropic;
    record.est_requests = a.requests as i64;
    record.priority = priority;
    super::quota::admit(st, &record, None).await
}

/// The batch's window: 24 hours, or (extension) one of the server's completion windows.
fn window(st: &AppState, asked: Option<&Value>) -> Result<(String, i64), ApiError> {
    let Some(asked) = asked.filter(|v| !v.is_null()) else { return Ok((WINDOW.into(), WINDOW_S)) };
    let found = asked.as_str().and_then(|w| st.cfg.completion_windows.iter().find(|(name, _)| name == w));
    match found {
        Some((name, d)) => Ok((name.clone(), d.as_secs() as i64)),
        None => {
            let allowed: Vec<&str> = st.cfg.completion_windows.iter().map(|(w, _)| w.as_str()).collect();
            Err(ApiError::invalid("completion_window", format!("completion_window must be one of: {}.", allowed.join(", "))))
        }
    }
}

async fn retrieve(
    State(st): State<AppState>,
    AnthropicTenant(tenant): AnthropicTenant,
    headers: HeaderMap,
    Path(id): Path<BatchId>,
) -> AnthropicResult<Json<Value>> {
    Ok(object(&headers, &tenant_batch(&st, &tenant, &id).await?))
}

#[derive(Deserialize)]
struct ListParams {
    before_id: Option<String>,
    after_id: Option<String>,
    limit: Option<String>,
}

async fn list(State(st): State<AppState>, AnthropicTenant(tenant): AnthropicTenant, headers: HeaderMap, q: Query<ListParams>) -> AnthropicResult<Json<Value>> {
    let Query(p) = q;
    let limit = parse_limit(p.limit.as_deref(), 20, 1000)?;
    let (cursor, param) = match (p.before_id.as_deref(), p.after_id.as_deref()) {
        (Some(_), Some(_)) => return Err(ApiError::bad_request("Give before_id or after_id, not both.").into()),
        (Some(b), None) => (ListCursor::Before(b), "before_id"),
        (None, Some(a)) => (ListCursor::After(a), "after_id"),
        (None, None) => (ListCursor::First, ""),
    };
    let page = st.store.list_batches_of(&tenant, BatchApi::Anthropic, limit, cursor).await.map_err(|e| cursor_error(e, param))?;
    let data: Vec<Value> = page.items.iter().map(|b| object(&headers, b).0).collect();
    let first = page.items.first().map(|b| b.id.clone());
    let last = page.items.last().map(|b| b.id.clone());
    Ok(Json(json!({"data": data, "has_more": page.has_more, "first_id": first, "last_id": last})))
}

async fn cancel(
    State(st): State<AppState>,
    AnthropicTenant(tenant): AnthropicTenant,
    headers: HeaderMap,
    Path(id): Path<BatchId>,
) -> AnthropicResult<Json<Value>> {
    tenant_batch(&st, &tenant, &id).await?;
    let b = st.store.request_cancel(&tenant, &id, crate::now_unix()).await.map_err(|e| not_found_as(e, || no_such_batch(&id).0))?;
    if b.status == crate::store::BatchStatus::Cancelling {
        st.engine.cancel(&id);
        st.engine.outbox_changed();
    }
    Ok(object(&headers, &b))
}

/// Deletes an ended batch, and its input and result files with it.
async fn delete(State(st): State<AppState>, AnthropicTenant(tenant): AnthropicTenant, Path(id): Path<BatchId>) -> AnthropicResult<Json<Value>> {
    tenant_batch(&st, &tenant, &id).await?;
    let b = st.store.delete_batch(&tenant, &id).await.map_err(|e| match e {
        crate::store::Error::Conflict(_) => {
            ApiError::bad_request(format!("Message Batch {id} is still processing: it can be deleted once it has ended (cancel it first to end it sooner)."))
        }
        other => not_found_as(other, || no_such_batch(&id).0),
    })?;
    let now = crate::now_unix();
    for file in [Some(&b.input_file_id), b.output_file_id.as_ref(), b.error_file_id.as_ref()].into_iter().flatten() {
        match st.store.delete_file(&tenant, file, now).await {
            Ok(f) => {
                if let Err(e) = st.blob.delete(&f.blob_key).await {
                    tracing::warn!(file = %f.id, error = %crate::Chain(&e), "file row deleted but its bytes could not be removed");
                }
            }
            Err(e) => tracing::debug!(file = %file, error = %crate::Chain(&e), "a deleted batch's file was already gone"),
        }
    }
    Ok(Json(json!({"id": id, "type": "message_batch_deleted"})))
}

/// The results as JSONL, one `MessageBatchIndividualResponse` per request, read from the
/// result log in chunks (constant memory), once processing has ended.
async fn results(State(st): State<AppState>, AnthropicTenant(tenant): AnthropicTenant, Path(id): Path<BatchId>) -> AnthropicResult<Response> {
    let b = tenant_batch(&st, &tenant, &id).await?;
    if !b.status.is_final() {
        return Err(ApiError::bad_request(format!("Message Batch {id} has not ended yet: its results are available once processing_status is ended.")).into());
    }
    let chunks = futures::stream::try_unfold((0u64, 256u32), move |(after, records)| {
        let (store, id) = (st.store.clone(), id.clone());
        async move {
            match store.results_chunk(&id, None, after, records).await {
                Ok(chunk) => Ok(chunk.map(|(text, last)| {
                    let next = crate::engine::next_chunk_records(records, text.len());
                    (bytes::Bytes::from(anthropic_lines(&text)), (last, next))
                })),
                Err(e) => Err(std::io::Error::other(e.to_string())),
            }
        }
    });
    Ok((StatusCode::OK, [(header::CONTENT_TYPE, "application/binary")], Body::from_stream(chunks)).into_response())
}

/// Result records (JSONL) as Anthropic's result lines (JSONL); an unreadable record is
/// logged and left out.
pub fn anthropic_lines(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match serde_json::from_str::<Value>(line) {
            Ok(record) => {
                out.push_str(&render::individual_response(&record).to_string());
                out.push('\n');
            }
            Err(e) => tracing::error!(error = %e, "a result record cannot be read; left out of the results"),
        }
    }
    out
}
