//! `/v1/files`: upload (streamed to blob storage), list, retrieve, delete, content (with
//! `Range`).
//!
//! An upload's bytes go to the blob store as they arrive, never whole in memory; the file's
//! row is written only after its bytes are complete, so a failed or oversize upload leaves
//! nothing behind.

use axum::body::Body;
use axum::extract::multipart::{Field, MultipartRejection};
use axum::extract::{Multipart, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::extract::Query;
use super::{AppState, Tenant};
use crate::blob::BlobWriter;
use crate::error::{ApiError, ApiResult};
use crate::store::{FileQuery, FileRecord};
use crate::wire::{self, FileObject};

pub const PURPOSES: [&str; 6] = ["batch", "user_data", "fine-tune", "assistants", "vision", "evals"];
const MIN_EXPIRY: i64 = 3600;
const MAX_EXPIRY: i64 = 2_592_000;
/// Room for multipart framing and the other fields on top of the file itself.
const MULTIPART_SLACK: u64 = 64 * 1024;

/// The non-file fields of an upload.
#[derive(Default)]
struct UploadForm {
    purpose: Option<String>,
    anchor: Option<String>,
    seconds: Option<String>,
}

pub async fn create(State(st): State<AppState>, Tenant(tenant): Tenant, headers: HeaderMap, mp: Result<Multipart, MultipartRejection>) -> ApiResult<Json<FileObject>> {
    st.writable()?;
    let limit = st.cfg.limits.max_upload_bytes;
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit + MULTIPART_SLACK) {
        return Err(too_large(limit));
    }
    let mut mp = mp.map_err(|e| ApiError::bad_request(format!("The request must be multipart/form-data: {}", e.body_text())))?;
    let id = crate::ids::file_id();
    let key = format!("files/{id}");
    let mut form = UploadForm::default();
    let mut upload: Option<(String, u64)> = None;
    let result = read_form(&st, &mut mp, &key, limit, &mut form, &mut upload).await;
    let record = result.and_then(|()| build_record(&tenant, &id, &key, form, upload.clone()));
    match record {
        Ok(rec) => match st.store.insert_file(&rec).await {
            Ok(()) => Ok(Json(FileObject::from(&rec))),
            Err(e) => {
                let _ = st.blob.delete(&key).await;
                Err(e.into())
            }
        },
        Err(e) => {
            if upload.is_some() {
                let _ = st.blob.delete(&key).await;
            }
            Err(e)
        }
    }
}

async fn read_form(st: &AppState, mp: &mut Multipart, key: &str, limit: u64, form: &mut UploadForm, upload: &mut Option<(String, u64)>) -> ApiResult<()> {
    while let Some(field) = mp.next_field().await.map_err(bad_multipart)? {
        match field.name().unwrap_or_default() {
            "file" if upload.is_none() => {
                let filename = field.file_name().unwrap_or("upload.jsonl").to_string();
                let size = stream_to_blob(field, st.blob.writer(key), limit).await?;
                *upload = Some((filename, size));
            }
            "file" => return Err(ApiError::bad_request("Send exactly one 'file' field.").param("file")),
            "purpose" => form.purpose = Some(text(field).await?),
            "expires_after[anchor]" => form.anchor = Some(text(field).await?),
            "expires_after[seconds]" => form.seconds = Some(text(field).await?),
            _ => drop(text(field).await),
        }
    }
    Ok(())
}

async fn stream_to_blob(mut field: Field<'_>, mut w: BlobWriter, limit: u64) -> ApiResult<u64> {
    loop {
        let chunk = match field.chunk().await {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(e) => {
                w.abort().await;
                return Err(bad_multipart(e));
            }
        };
        if w.written() + chunk.len() as u64 > limit {
            w.abort().await;
            return Err(too_large(limit));
        }
        if let Err(e) = w.write(&chunk).await {
            w.abort().await;
            return Err(e.into());
        }
    }
    Ok(w.finish().await?)
}

async fn text(field: Field<'_>) -> ApiResult<String> {
    let name = field.name().unwrap_or_default().to_string();
    let bytes = field.bytes().await.map_err(bad_multipart)?;
    if bytes.len() > 4096 {
        return Err(ApiError::bad_request(format!("The field '{name}' is too long.")).param(name));
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| ApiError::bad_request(format!("The field '{name}' is not UTF-8 text.")).param(name))
}

fn build_record(tenant: &str, id: &str, key: &str, form: UploadForm, upload: Option<(String, u64)>) -> ApiResult<FileRecord> {
    let (filename, bytes) = upload.ok_or_else(|| ApiError::missing("file"))?;
    let purpose = form.purpose.ok_or_else(|| ApiError::missing("purpose"))?;
    if !PURPOSES.contains(&purpose.as_str()) {
        return Err(ApiError::invalid("purpose", format!("Invalid purpose {purpose:?}; expected one of: {}.", PURPOSES.join(", "))));
    }
    let created_at = crate::now_unix();
    let expires_at = expiry(form.anchor, form.seconds, "expires_after")?.map(|s| created_at + s);
    Ok(FileRecord { id: id.into(), tenant: tenant.into(), bytes: bytes as i64, created_at, filename, purpose, expires_at, blob_key: key.into() })
}

/// Checks an `expires_after` policy: anchor `created_at`, 3600 to 2592000 seconds.
pub fn expiry(anchor: Option<String>, seconds: Option<String>, param: &str) -> ApiResult<Option<i64>> {
    match (anchor, seconds) {
        (None, None) => Ok(None),
        (anchor, seconds) => {
            if anchor.as_deref() != Some("created_at") {
                return Err(ApiError::invalid(&format!("{param}.anchor"), "The only supported anchor is 'created_at'."));
            }
            let s = seconds.and_then(|s| s.trim().parse::<i64>().ok());
            match s {
                Some(s) if (MIN_EXPIRY..=MAX_EXPIRY).contains(&s) => Ok(Some(s)),
                _ => Err(ApiError::invalid(&format!("{param}.seconds"), format!("seconds must be an integer from {MIN_EXPIRY} to {MAX_EXPIRY}."))),
            }
        }
    }
}

fn bad_multipart(e: axum::extract::multipart::MultipartError) -> ApiError {
    ApiError::bad_request(format!("The multipart body is malformed: {}", e.body_text()))
}

fn too_large(limit: u64) -> ApiError {
    ApiError::too_large(format!("The file is larger than the upload limit of {limit} bytes.")).param("file")
}

#[derive(Deserialize)]
pub struct ListParams {
    purpose: Option<String>,
    limit: Option<String>,
    order: Option<String>,
    after: Option<String>,
}

pub async fn list(State(st): State<AppState>, Tenant(tenant): Tenant, Query(p): Query<ListParams>) -> ApiResult<Json<Value>> {
    let limit = parse_limit(p.limit.as_deref(), 10_000, 10_000)?;
    let ascending = match p.order.as_deref() {
        None | Some("desc") => false,
        Some("asc") => true,
        Some(_) => return Err(ApiError::invalid("order", "order must be 'asc' or 'desc'.")),
    };
    let q = FileQuery { purpose: p.purpose, limit, ascending, after: p.after };
    let page = st.store.list_files(&tenant, &q, crate::now_unix()).await.map_err(|e| cursor_error(e, "after"))?;
    let items = page.items.iter().map(|f| (f.id.clone(), FileObject::from(f))).collect();
    Ok(Json(wire::list(items, page.has_more)))
}

/// Parses `limit`, 1 to `max`.
pub fn parse_limit(raw: Option<&str>, default: u32, max: u32) -> ApiResult<u32> {
    match raw {
        None => Ok(default),
        Some(s) => match s.parse::<u32>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(ApiError::invalid("limit", format!("limit must be an integer from 1 to {max}."))),
        },
    }
}

/// An unknown `after` cursor is the caller's mistake: a 400 naming it.
pub fn cursor_error(e: crate::store::Error, param: &str) -> ApiError {
    match e {
        crate::store::Error::NotFound => ApiError::invalid(param, format!("'{param}' is not the id of an object in this list.")),
        other => other.into(),
    }
}

fn no_such_file(id: &str) -> ApiError {
    ApiError::not_found(format!("No such File object: {id}")).param("id")
}

pub async fn retrieve(State(st): State<AppState>, Tenant(tenant): Tenant, Path(id): Path<String>) -> ApiResult<Json<FileObject>> {
    let f = st.store.get_file(&tenant, &id, crate::now_unix()).await.map_err(|e| not_found_as(e, || no_such_file(&id)))?;
    Ok(Json(FileObject::from(&f)))
}

pub fn not_found_as(e: crate::store::Error, f: impl FnOnce() -> ApiError) -> ApiError {
    match e {
        crate::store::Error::NotFound => f(),
        other => other.into(),
    }
}

pub async fn delete(State(st): State<AppState>, Tenant(tenant): Tenant, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let f = st.store.delete_file(&tenant, &id, crate::now_unix()).await.map_err(|e| not_found_as(e, || no_such_file(&id)))?;
    if let Err(e) = st.blob.delete(&f.blob_key).await {
        tracing::warn!(file = %id, error = %e, "file row deleted but its bytes could not be removed");
    }
    Ok(Json(json!({"id": f.id, "object": "file", "deleted": true})))
}

pub async fn content(State(st): State<AppState>, Tenant(tenant): Tenant, Path(id): Path<String>, headers: HeaderMap) -> ApiResult<Response> {
    let f = st.store.get_file(&tenant, &id, crate::now_unix()).await.map_err(|e| not_found_as(e, || no_such_file(&id)))?;
    let size = f.bytes as u64;
    let range = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        Some(r) => Some(parse_range(r, size)?),
        None => None,
    };
    let (status, stream, len) = match &range {
        Some(r) => (StatusCode::PARTIAL_CONTENT, st.blob.get_range_stream(&f.blob_key, r.clone()).await?, r.end - r.start),
        None => (StatusCode::OK, st.blob.get_stream(&f.blob_key).await?, size),
    };
    let mut resp = (status, Body::from_stream(stream)).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{}\"", f.filename.replace(['"', '\\', '\r', '\n'], "_"))) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    if let Some(r) = range {
        let v = format!("bytes {}-{}/{size}", r.start, r.end - 1);
        h.insert(header::CONTENT_RANGE, HeaderValue::from_str(&v).expect("ascii"));
    }
    Ok(resp)
}

/// One byte range of a `Range` header, as a half-open range within `size`.
fn parse_range(header: &str, size: u64) -> ApiResult<std::ops::Range<u64>> {
    let parsed = http_range_header::parse_range_header(header).map_err(|_| ApiError::range_not_satisfiable(size))?;
    let ranges = parsed.validate(size).map_err(|_| ApiError::range_not_satisfiable(size))?;
    match ranges.as_slice() {
        [r] => Ok(*r.start()..*r.end() + 1),
        _ => Err(ApiError::range_not_satisfiable(size)),
    }
}
