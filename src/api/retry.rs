//! `POST /v1/batches/{id}/retry` (extension): a new batch of exactly the input lines of a
//! final batch that are in its error file, `custom_id`s unchanged, `metadata.retry_of` = the
//! original id. The body (optional) narrows the lines:
//! `{"include": ["failed", "expired", "cancelled"], "status_codes": [429, 500]}`.
//! 409 while the batch is not final, 400 when no line matches.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::Json;
use serde_json::{Map, Value};

use super::batches::render;
use super::{quota, AppState, Tenant};
use crate::engine::RetryFilter;
use crate::error::{ApiError, ApiResult};
use crate::store::{BatchId, BatchRecord, FileId};

pub async fn retry(State(st): State<AppState>, Tenant(tenant): Tenant, Path(id): Path<BatchId>, body: Bytes) -> ApiResult<Json<Value>> {
    let filter = parse_filter(&body)?;
    let b = st.tenant_batch(&tenant, &id).await?;
    if !b.status.is_final() {
        let msg = format!("The batch {id} is {}; only a batch that has ended (completed, failed, expired or cancelled) can be retried.", b.status.as_str());
        return Err(ApiError::conflict(msg).code("batch_not_final"));
    }
    st.writable()?;
    let nothing = || ApiError::bad_request(format!("No line of {id} matches: nothing to retry.")).code("nothing_to_retry");
    if b.failed == 0 {
        return Err(nothing());
    }
    let (file, lines) = st.engine.retry_input(&b, &filter).await.map_err(engine_error)?.ok_or_else(nothing)?;
    if let Err(e) = st.store.insert_file(&file).await {
        let _ = st.blob.delete(&file.blob_key).await;
        return Err(e.into());
    }
    let mut record = retry_record(&b, &file.id);
    record.est_requests = lines as i64;
    let created = match quota::admit(&st, &record, None).await {
        Ok(created) => created,
        Err(e) => {
            // Refused (over quota) or not stored: the new input file goes with it.
            let _ = st.store.purge_file(&file.id).await;
            let _ = st.blob.delete(&file.blob_key).await;
            return Err(e);
        }
    };
    st.engine.wake();
    st.engine.outbox_changed();
    tracing::info!(batch = %created.id, retry_of = %b.id, lines, "retry batch created");
    Ok(Json(render(&st, &created).await))
}

/// The new batch: the original's endpoint, window, metadata and priority, `retry_of` added.
fn retry_record(b: &BatchRecord, input_file_id: &FileId) -> BatchRecord {
    let now = crate::now_unix();
    let window = b.expires_at.map_or(86_400, |e| (e - b.created_at).max(1));
    let mut r =
        BatchRecord::new(crate::ids::batch_id(), b.tenant.clone(), input_file_id.clone(), b.endpoint.clone(), b.completion_window.clone(), now, now + window);
    let mut metadata = b.metadata.clone().unwrap_or_default();
    if metadata.len() >= 16 && !metadata.contains_key("retry_of") {
        // OpenAI allows 16 keys: make room for retry_of rather than refuse the retry.
        let drop = metadata.keys().next_back().cloned().unwrap_or_default();
        metadata.remove(&drop);
    }
    metadata.insert("retry_of".into(), Value::String(b.id.to_string()));
    r.metadata = Some(metadata);
    r.priority = b.priority;
    r.output_expires_after = b.output_expires_after;
    if b.api == crate::store::BatchApi::Anthropic {
        r.id = crate::ids::message_batch_id();
        r.api = b.api;
    }
    r
}

fn parse_filter(body: &[u8]) -> ApiResult<RetryFilter> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(RetryFilter::default());
    }
    let m: Map<String, Value> = serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("The body must be a JSON object: {e}")))?;
    let mut f = RetryFilter::default();
    if let Some(inc) = m.get("include").filter(|v| !v.is_null()) {
        let kinds = inc.as_array().ok_or_else(|| ApiError::invalid("include", "include must be a list of failed, expired, cancelled."))?;
        (f.failed, f.expired, f.cancelled) = (false, false, false);
        for k in kinds {
            match k.as_str() {
                Some("failed") => f.failed = true,
                Some("expired") => f.expired = true,
                Some("cancelled") => f.cancelled = true,
                _ => return Err(ApiError::invalid("include", format!("Unknown include value {k}; use failed, expired or cancelled."))),
            }
        }
    }
    if let Some(codes) = m.get("status_codes").filter(|v| !v.is_null()) {
        let list = codes.as_array().ok_or_else(|| ApiError::invalid("status_codes", "status_codes must be a list of HTTP statuses."))?;
        for c in list {
            let code = c.as_u64().filter(|c| (100..600).contains(c)).ok_or_else(|| ApiError::invalid("status_codes", format!("{c} is not an HTTP status.")))?;
            f.status_codes.push(code as u16);
        }
    }
    Ok(f)
}

fn engine_error(e: crate::engine::Error) -> ApiError {
    match e {
        crate::engine::Error::Unavailable(_) => ApiError::unavailable("The service is temporarily unavailable; retry shortly.").caused_by(e),
        crate::engine::Error::Permanent { code: "input_unavailable" | "state_missing", .. } => {
            ApiError::conflict("The batch's input file no longer exists, so its lines cannot be sent again.").code("input_unavailable")
        }
        other => ApiError::internal(other),
    }
}
