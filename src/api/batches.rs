//! `/v1/batches`: create, retrieve, list, cancel, and the per-request lookup extension.
//!
//! Create checks every parameter (naming the bad one), returns `validating` at once and wakes
//! the engine; validation itself runs in the engine. A retried create with the same
//! `Idempotency-Key` returns the batch the first call created; the same key with another
//! request (compared by a hash of its canonical JSON) is a 409 `idempotency_key_reused`.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::Json;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::extract::{JsonObject, Query};
use super::files::{cursor_error, expiry, not_found_as, parse_limit};
use super::{no_such_batch, AppState, Tenant};
use crate::error::{ApiError, ApiResult};
use crate::store::{BatchId, BatchRecord, BatchStatus, FileId, FileRecord};
use crate::wire;

pub const ENDPOINTS: [&str; 8] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/moderations",
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/videos",
];
pub(super) const MAX_PRIORITY: i64 = 8;
/// What a create may carry: OpenAI's parameters, then batchd's own (`priority`).
const CREATE_PARAMS: [&str; 6] = ["input_file_id", "endpoint", "completion_window", "metadata", "output_expires_after", "priority"];

pub async fn render(st: &AppState, b: &BatchRecord) -> Value {
    let progress = match b.status {
        BatchStatus::InProgress | BatchStatus::Finalizing | BatchStatus::Cancelling => {
            let p = if st.engine.has_peers() { super::progress::cluster_progress(st, b).await } else { st.engine.progress(b) };
            let mut v = serde_json::to_value(p).ok().filter(Value::is_object).unwrap_or_else(|| Value::Object(Map::new()));
            v["upstreams"] = serde_json::to_value(st.engine.upstreams(b.model.as_deref())).unwrap_or_default();
            Some(v)
        }
        _ => None,
    };
    let mut v = wire::batch_object(b, progress);
    v["cost"] = super::usage::batch_cost(st, &b.id).await.map_or(Value::Null, Value::from);
    if let Some(remote) = super::usage::remote_batches(st, &b.id).await {
        v["remote_batches"] = remote;
    }
    v
}

pub(super) fn string_param(body: &Map<String, Value>, name: &str) -> ApiResult<String> {
    match body.get(name) {
        None | Some(Value::Null) => Err(ApiError::missing(name)),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(ApiError::invalid(name, format!("'{name}' must be a string."))),
    }
}

/// Refuses a body with a parameter not in `known`, as the hosted API does (a misspelt
/// `metdata` would otherwise be dropped without a word).
fn known_params(body: &Map<String, Value>, known: &[&str]) -> ApiResult<()> {
    let unknown: Vec<&str> = body.keys().map(String::as_str).filter(|k| !known.contains(k)).collect();
    match unknown.as_slice() {
        [] => Ok(()),
        [one] => Err(ApiError::bad_request(format!("Unrecognized request argument supplied: {one}"))),
        many => Err(ApiError::bad_request(format!("Unrecognized request arguments supplied: {}", many.join(", ")))),
    }
}

/// The `endpoint` of a create or validate body: one batchd runs batches for.
pub(super) fn endpoint_param(body: &Map<String, Value>) -> ApiResult<String> {
    let endpoint = string_param(body, "endpoint")?;
    if !ENDPOINTS.contains(&endpoint.as_str()) {
        return Err(ApiError::invalid("endpoint", format!("Unsupported endpoint {endpoint:?}; supported: {}.", ENDPOINTS.join(", "))));
    }
    Ok(endpoint)
}

/// The tenant's file `input_file_id`, which must have been uploaded as a batch input.
pub(super) async fn batch_input(st: &AppState, tenant: &str, input_file_id: &FileId) -> ApiResult<FileRecord> {
    let file = st
        .store
        .get_file(tenant, input_file_id, crate::now_unix())
        .await
        .map_err(|e| not_found_as(e, || ApiError::not_found(format!("No such File object: {input_file_id}")).param("input_file_id")))?;
    if file.purpose != "batch" {
        return Err(ApiError::invalid(
            "input_file_id",
            format!("The file {input_file_id} has purpose {:?}; batch inputs must be uploaded with purpose \"batch\".", file.purpose),
        ));
    }
    Ok(file)
}

/// A server started without any upstream refuses a batch at create, once, rather than failing
/// each of its lines with `model_not_found` later. The message names the first line's model.
async fn no_upstream_refusal(st: &AppState, file: &FileRecord) -> ApiResult<()> {
    if !st.cfg.upstreams.is_empty() {
        return Ok(());
    }
    let head = st.blob.get_range(&file.blob_key, 0..(file.bytes.max(0) as u64).min(64 * 1024)).await.unwrap_or_default();
    let first = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let model = serde_json::from_slice::<Value>(first).ok().and_then(|v| v.pointer("/body/model").and_then(Value::as_str).map(str::to_owned));
    let model = model.map_or_else(|| "of this file".to_string(), |m| format!("{m:?}"));
    Err(ApiError::invalid(
        "input_file_id",
        format!("no upstream serves model {model}: this server has no upstream configured; start with --upstream URL (or set OPENAI_BASE_URL) or see README"),
    )
    .code("model_not_found"))
}

pub async fn create(State(st): State<AppState>, Tenant(tenant): Tenant, headers: HeaderMap, JsonObject(body): JsonObject) -> ApiResult<Json<Value>> {
    st.writable()?;
    known_params(&body, &CREATE_PARAMS)?;
    let input_file_id = FileId::from(string_param(&body, "input_file_id")?);
    let endpoint = endpoint_param(&body)?;
    let window = string_param(&body, "completion_window")?;
    let Some((_, duration)) = st.cfg.completion_windows.iter().find(|(w, _)| *w == window) else {
        let allowed: Vec<&str> = st.cfg.completion_windows.iter().map(|(w, _)| w.as_str()).collect();
        return Err(ApiError::invalid("completion_window", format!("Unsupported completion_window {window:?}; allowed: {}.", allowed.join(", "))));
    };
    let metadata = check_metadata(body.get("metadata"))?;
    let output_expires_after = check_output_expiry(body.get("output_expires_after"))?;
    let priority = check_priority(body.get("priority"))?;
    let file = batch_input(&st, &tenant, &input_file_id).await?;
    no_upstream_refusal(&st, &file).await?;
    let lines = super::quota::lines_of(&st, &tenant, &file).await?;
    let now = crate::now_unix();
    let mut record = BatchRecord::new(crate::ids::batch_id(), tenant, input_file_id, endpoint, window, now, now + duration.as_secs() as i64);
    record.metadata = metadata;
    record.priority = priority;
    record.output_expires_after = output_expires_after;
    record.est_requests = lines;
    let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).filter(|k| !k.is_empty());
    record.idempotency_hash = key.map(|_| request_hash(&body));
    let b = super::quota::admit(&st, &record, key).await?;
    if b.id != record.id && b.idempotency_hash.is_some() && b.idempotency_hash != record.idempotency_hash {
        return Err(ApiError::conflict(format!(
            "The Idempotency-Key {:?} was already used with a different request (batch {}); use a new key for a new request.",
            key.unwrap_or_default(),
            b.id
        ))
        .code("idempotency_key_reused"));
    }
    st.engine.wake();
    st.engine.outbox_changed();
    Ok(Json(render(&st, &b).await))
}

/// A hash of the request's canonical JSON (keys sorted at every depth, no spaces): two
/// requests that mean the same have the same hash.
fn request_hash(body: &Map<String, Value>) -> String {
    fn canonical(v: &Value, out: &mut String) {
        match v {
            Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                out.push('{');
                for (i, k) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::String(k.clone()).to_string());
                    out.push(':');
                    canonical(&m[k], out);
                }
                out.push('}');
            }
            Value::Array(a) => {
                out.push('[');
                for (i, x) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    canonical(x, out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut text = String::new();
    canonical(&Value::Object(body.clone()), &mut text);
    format!("{:032x}", xxhash_rust::xxh3::xxh3_128(text.as_bytes()))
}

/// OpenAI's limits: at most 16 keys, keys up to 64 characters, string values up to 512.
fn check_metadata(v: Option<&Value>) -> ApiResult<Option<Map<String, Value>>> {
    let m = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(m)) => m,
        Some(_) => return Err(ApiError::invalid("metadata", "metadata must be an object of string values.")),
    };
    if m.len() > 16 {
        return Err(ApiError::invalid("metadata", format!("metadata has {} keys; at most 16 are allowed.", m.len())));
    }
    for (k, v) in m {
        if k.chars().count() > 64 {
            return Err(ApiError::invalid("metadata", format!("metadata key {k:?} is longer than 64 characters.")));
        }
        match v {
            Value::String(s) if s.chars().count() <= 512 => {}
            Value::String(_) => return Err(ApiError::invalid("metadata", format!("metadata value of {k:?} is longer than 512 characters."))),
            _ => return Err(ApiError::invalid("metadata", format!("metadata value of {k:?} must be a string."))),
        }
    }
    Ok(Some(m.clone()))
}

fn check_output_expiry(v: Option<&Value>) -> ApiResult<Option<i64>> {
    let m = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(m)) => m,
        Some(_) => return Err(ApiError::invalid("output_expires_after", "output_expires_after must be an object with anchor and seconds.")),
    };
    let anchor = m.get("anchor").and_then(Value::as_str).map(str::to_owned);
    let seconds = m.get("seconds").map(|s| s.to_string());
    expiry(anchor, seconds, "output_expires_after")
}

/// The `priority` extension: an integer share from 1 (default) to 8.
pub(super) fn check_priority(v: Option<&Value>) -> ApiResult<i64> {
    match v {
        None | Some(Value::Null) => Ok(1),
        Some(Value::Number(n)) if n.as_i64().is_some_and(|p| (1..=MAX_PRIORITY).contains(&p)) => Ok(n.as_i64().unwrap_or(1)),
        Some(_) => Err(ApiError::invalid("priority", format!("priority must be an integer from 1 to {MAX_PRIORITY}."))),
    }
}

pub async fn retrieve(State(st): State<AppState>, Tenant(tenant): Tenant, Path(id): Path<BatchId>) -> ApiResult<Json<Value>> {
    let b = st.tenant_batch(&tenant, &id).await?;
    Ok(Json(render(&st, &b).await))
}

#[derive(Deserialize)]
pub struct ListParams {
    limit: Option<String>,
    after: Option<String>,
    /// Extension (see [`super::filter`]): statuses to keep, separated by commas.
    status: Option<String>,
    /// Extension: text to find in the id or a metadata value.
    search: Option<String>,
}

pub async fn list(State(st): State<AppState>, Tenant(tenant): Tenant, Query(p): Query<ListParams>) -> ApiResult<Json<Value>> {
    let limit = parse_limit(p.limit.as_deref(), 20, 100)?;
    let page = match super::filter::BatchFilter::parse(p.status.as_deref(), p.search.as_deref())? {
        None => st.store.list_batches(&tenant, limit, p.after.as_deref()).await,
        Some(f) => super::filter::page(&*st.store, &tenant, &f, limit, p.after.as_deref()).await,
    };
    let page = page.map_err(|e| cursor_error(e, "after"))?;
    let mut items = Vec::with_capacity(page.items.len());
    for b in &page.items {
        items.push((b.id.to_string(), render(&st, b).await));
    }
    Ok(Json(wire::list(items, page.has_more)))
}

pub async fn cancel(State(st): State<AppState>, Tenant(tenant): Tenant, Path(id): Path<BatchId>) -> ApiResult<Json<Value>> {
    let b = st.store.request_cancel(&tenant, &id, crate::now_unix()).await.map_err(|e| not_found_as(e, || no_such_batch(&id)))?;
    if b.status == BatchStatus::Cancelling {
        st.engine.cancel(&id);
        st.engine.outbox_changed();
    }
    Ok(Json(render(&st, &b).await))
}

/// Extension: the result line of one request, by `custom_id`, as soon as it is durable.
pub async fn request_result(State(st): State<AppState>, Tenant(tenant): Tenant, Path((id, custom_id)): Path<(BatchId, String)>) -> ApiResult<Json<Value>> {
    st.tenant_batch(&tenant, &id).await?;
    let r = st
        .store
        .result_by_custom_id(&id, &custom_id)
        .await
        .map_err(|e| not_found_as(e, || ApiError::not_found(format!("No result yet for custom_id {custom_id:?} in {id}.")).param("custom_id")))?;
    let mut v: Value = serde_json::from_str(&r.record).map_err(ApiError::internal)?;
    v["line"] = r.line.into();
    Ok(Json(v))
}

#[derive(Deserialize)]
pub struct ResultsParams {
    kind: Option<String>,
}

/// Extension: the durable results so far as JSONL, at any time (partial results).
/// `kind=output` (2xx lines, default), `kind=errors`, or `kind=all`.
pub async fn partial_results(
    State(st): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<BatchId>,
    Query(p): Query<ResultsParams>,
) -> ApiResult<axum::response::Response> {
    use axum::response::IntoResponse;
    let ok = match p.kind.as_deref() {
        None | Some("output") => Some(true),
        Some("errors") => Some(false),
        Some("all") => None,
        Some(_) => return Err(ApiError::invalid("kind", "kind must be output, errors or all.")),
    };
    st.tenant_batch(&tenant, &id).await?;
    // Chunks of about the same size in bytes, however large the records: see the finalizer.
    let chunks = futures::stream::try_unfold((0u64, 256u32), move |(after, records)| {
        let (store, id) = (st.store.clone(), id.clone());
        async move {
            match store.results_chunk(&id, ok, after, records).await {
                Ok(chunk) => Ok(chunk.map(|(text, last)| {
                    let next = crate::engine::next_chunk_records(records, text.len());
                    (bytes::Bytes::from(text), (last, next))
                })),
                Err(e) => Err(std::io::Error::other(e.to_string())),
            }
        }
    });
    Ok(([(axum::http::header::CONTENT_TYPE, "application/jsonl")], axum::body::Body::from_stream(chunks)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_hash_ignores_key_order_and_spacing_only() {
        let a = serde_json::json!({"endpoint": "/v1/embeddings", "metadata": {"a": "1", "b": "2"}, "input_file_id": "f"});
        let b: Value = serde_json::from_str(r#"{ "input_file_id":"f", "metadata":{"b":"2","a":"1"}, "endpoint":"/v1/embeddings" }"#).unwrap();
        let c = serde_json::json!({"endpoint": "/v1/embeddings", "metadata": {"a": "1", "b": "3"}, "input_file_id": "f"});
        let h = |v: &Value| request_hash(v.as_object().unwrap());
        assert_eq!(h(&a), h(&b));
        assert_ne!(h(&a), h(&c));
        assert_ne!(h(&serde_json::json!({"a": [1, 2]})), h(&serde_json::json!({"a": [2, 1]})));
    }
}
