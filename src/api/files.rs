//! `/v1/files`: upload (streamed to blob storage), list, retrieve, delete, content (with
//! `Range`).
//!
//! An upload's bytes go to the blob store as they arrive, never whole in memory (every part
//! of the form is bounded, see [`super::multipart`]); the file's row is written only after its
//! bytes are complete, so a failed or oversize upload leaves nothing behind. Files of purpose
//! `batch` expire after 30 days by default. Content answers honour one byte range and ignore
//! any other `Range` header; non-ASCII file names go out as RFC 5987 `filename*`.

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::extract::Query;
use super::multipart::{file_too_large, Form, Part, SLACK};
use super::{AppState, Tenant};
use crate::blob::BlobWriter;
use crate::error::{ApiError, ApiResult};
use crate::store::{FileId, FileQuery, FileRecord};
use crate::wire::{self, FileObject};

pub const PURPOSES: [&str; 6] = ["batch", "user_data", "fine-tune", "assistants", "vision", "evals"];
const MIN_EXPIRY: i64 = 3600;
const MAX_EXPIRY: i64 = 2_592_000;
/// Files of purpose `batch` expire after 30 days unless `expires_after` says otherwise, as on
/// the hosted API.
pub const BATCH_FILE_EXPIRY: i64 = 30 * 86_400;

/// The non-file fields of an upload.
#[derive(Default)]
struct UploadForm {
    purpose: Option<String>,
    anchor: Option<String>,
    seconds: Option<String>,
}

pub async fn create(State(st): State<AppState>, Tenant(tenant): Tenant, req: Request) -> ApiResult<Json<FileObject>> {
    st.writable()?;
    let limit = st.cfg.limits.max_upload_bytes;
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit + SLACK) {
        return Err(file_too_large(limit));
    }
    let (parts, body) = req.into_parts();
    let mut mp = Form::new(&parts.headers, body, limit)?;
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

async fn read_form(st: &AppState, mp: &mut Form, key: &str, limit: u64, form: &mut UploadForm, upload: &mut Option<(String, u64)>) -> ApiResult<()> {
    while let Some(part) = mp.next().await? {
        match part.name() {
            "file" if upload.is_none() => {
                let filename = part.file_name().unwrap_or("upload.jsonl").to_string();
                let size = stream_to_blob(part, st.blob.writer(key), limit).await?;
                *upload = Some((filename, size));
            }
            "file" => return Err(ApiError::bad_request("Send exactly one 'file' field.").param("file")),
            "purpose" => form.purpose = Some(part.text().await?),
            "expires_after[anchor]" => form.anchor = Some(part.text().await?),
            "expires_after[seconds]" => form.seconds = Some(part.text().await?),
            _ => part.skip().await?,
        }
    }
    Ok(())
}

async fn stream_to_blob(mut part: Part, mut w: BlobWriter, limit: u64) -> ApiResult<u64> {
    loop {
        let chunk = match part.chunk().await {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(e) => {
                w.abort().await;
                return Err(e);
            }
        };
        if w.written() + chunk.len() as u64 > limit {
            w.abort().await;
            return Err(file_too_large(limit));
        }
        if let Err(e) = w.write(&chunk).await {
            w.abort().await;
            return Err(e.into());
        }
    }
    Ok(w.finish().await?)
}

fn build_record(tenant: &str, id: &str, key: &str, form: UploadForm, upload: Option<(String, u64)>) -> ApiResult<FileRecord> {
    let (filename, bytes) = upload.ok_or_else(|| ApiError::missing("file"))?;
    let purpose = form.purpose.ok_or_else(|| ApiError::missing("purpose"))?;
    if !PURPOSES.contains(&purpose.as_str()) {
        return Err(ApiError::invalid("purpose", format!("Invalid purpose {purpose:?}; expected one of: {}.", PURPOSES.join(", "))));
    }
    let created_at = crate::now_unix();
    let default = (purpose == "batch").then_some(BATCH_FILE_EXPIRY);
    let expires_at = expiry(form.anchor, form.seconds, "expires_after")?.or(default).map(|s| created_at + s);
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
    let items = page.items.iter().map(|f| (f.id.to_string(), FileObject::from(f))).collect();
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

pub async fn retrieve(State(st): State<AppState>, Tenant(tenant): Tenant, Path(id): Path<FileId>) -> ApiResult<Json<FileObject>> {
    let f = st.store.get_file(&tenant, &id, crate::now_unix()).await.map_err(|e| not_found_as(e, || no_such_file(&id)))?;
    Ok(Json(FileObject::from(&f)))
}

pub fn not_found_as(e: crate::store::Error, f: impl FnOnce() -> ApiError) -> ApiError {
    match e {
        crate::store::Error::NotFound => f(),
        other => other.into(),
    }
}

pub async fn delete(State(st): State<AppState>, Tenant(tenant): Tenant, Path(id): Path<FileId>) -> ApiResult<Json<Value>> {
    let f = st.store.delete_file(&tenant, &id, crate::now_unix()).await.map_err(|e| not_found_as(e, || no_such_file(&id)))?;
    if let Err(e) = st.blob.delete(&f.blob_key).await {
        tracing::warn!(file = %id, error = %crate::Chain(&e), "file row deleted but its bytes could not be removed");
    }
    Ok(Json(json!({"id": f.id, "object": "file", "deleted": true})))
}

pub async fn content(State(st): State<AppState>, Tenant(tenant): Tenant, Path(id): Path<FileId>, headers: axum::http::HeaderMap) -> ApiResult<Response> {
    let f = st.store.get_file(&tenant, &id, crate::now_unix()).await.map_err(|e| not_found_as(e, || no_such_file(&id)))?;
    let size = f.bytes as u64;
    let range = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()).map(|r| range_of(r, size)) {
        None | Some(Ranged::Whole) => None,
        Some(Ranged::Part(r)) => Some(r),
        Some(Ranged::Unsatisfiable) => {
            let mut resp = ApiError::range_not_satisfiable(size).into_response();
            resp.headers_mut().insert(header::CONTENT_RANGE, HeaderValue::from_str(&format!("bytes */{size}")).expect("ascii"));
            return Ok(resp);
        }
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
    if let Ok(v) = HeaderValue::from_str(&content_disposition(&f.filename)) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    if let Some(r) = range {
        let v = format!("bytes {}-{}/{size}", r.start, r.end - 1);
        h.insert(header::CONTENT_RANGE, HeaderValue::from_str(&v).expect("ascii"));
    }
    Ok(resp)
}

/// What a `Range` header asks of `size` bytes (RFC 9110 §14.1.2, §14.2).
#[derive(Debug, PartialEq)]
enum Ranged {
    /// No usable range: a malformed header, another unit than bytes, or several ranges (which
    /// batchd does not serve) are ignored and the whole content is sent.
    Whole,
    /// One satisfiable range, half-open.
    Part(std::ops::Range<u64>),
    /// One well-formed range that selects nothing: 416.
    Unsatisfiable,
}

fn range_of(header: &str, size: u64) -> Ranged {
    let Some((unit, spec)) = header.trim().split_once('=') else { return Ranged::Whole };
    if !unit.trim().eq_ignore_ascii_case("bytes") || spec.contains(',') {
        return Ranged::Whole;
    }
    let Some((first, last)) = spec.trim().split_once('-') else { return Ranged::Whole };
    let (first, last) = (position(first), position(last));
    match (first, last) {
        (Some(None), Some(Some(0))) => Ranged::Unsatisfiable,
        (Some(None), Some(Some(_))) if size == 0 => Ranged::Unsatisfiable,
        (Some(None), Some(Some(n))) => Ranged::Part(size - n.min(size)..size),
        (Some(Some(a)), Some(b)) => {
            if b.is_some_and(|b| b < a) {
                Ranged::Whole
            } else if a >= size {
                Ranged::Unsatisfiable
            } else {
                Ranged::Part(a..b.map_or(size, |b| b.min(size - 1) + 1))
            }
        }
        _ => Ranged::Whole,
    }
}

/// One side of a byte range: `Some(None)` when empty, `Some(Some(n))` for digits (a number
/// past `u64` saturates), `None` when malformed.
fn position(s: &str) -> Option<Option<u64>> {
    if s.is_empty() {
        return Some(None);
    }
    if !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(Some(s.parse::<u64>().unwrap_or(u64::MAX)))
}

/// `attachment` with the name: plain when it is simple ASCII, else an ASCII fallback beside
/// the exact name as `filename*=UTF-8''…` (RFC 6266, RFC 5987).
fn content_disposition(name: &str) -> String {
    let fallback: String = name.chars().map(|c| if (c.is_ascii_graphic() || c == ' ') && c != '"' && c != '\\' { c } else { '_' }).collect();
    if fallback == name {
        return format!("attachment; filename=\"{name}\"");
    }
    let mut encoded = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&b) {
            encoded.push(b as char);
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    format!("attachment; filename=\"{fallback}\"; filename*=UTF-8''{encoded}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_follow_rfc_9110() {
        use Ranged::*;
        let cases: &[(&str, Ranged)] = &[
            ("bytes=0-9", Part(0..10)),
            ("bytes=5-", Part(5..100)),
            ("bytes=-10", Part(90..100)),
            ("bytes=-1000", Part(0..100)),
            ("bytes=90-1000", Part(90..100)),
            ("Bytes = 1-1", Part(1..2)),
            ("bytes=100-", Unsatisfiable),
            ("bytes=500-600", Unsatisfiable),
            ("bytes=-0", Unsatisfiable),
            ("bytes=abc", Whole),
            ("bytes=5-2", Whole),
            ("bytes=0-1,5-6", Whole),
            ("items=0-1", Whole),
            ("bytes=-", Whole),
            ("bytes=+1-2", Whole),
            ("bytes=1-2-3", Whole),
            ("garbage", Whole),
            ("bytes=99999999999999999999999-", Unsatisfiable),
        ];
        for (h, want) in cases {
            assert_eq!(&range_of(h, 100), want, "{h}");
        }
        assert_eq!(range_of("bytes=0-", 0), Unsatisfiable);
        assert_eq!(range_of("bytes=-5", 0), Unsatisfiable);
    }

    #[test]
    fn content_disposition_has_an_ascii_fallback_and_the_exact_name() {
        assert_eq!(content_disposition("in put.jsonl"), "attachment; filename=\"in put.jsonl\"");
        assert_eq!(content_disposition("données é.jsonl"), "attachment; filename=\"donn_es _.jsonl\"; filename*=UTF-8''donn%C3%A9es%20%C3%A9.jsonl");
        assert_eq!(content_disposition("a\"b\r.txt"), "attachment; filename=\"a_b_.txt\"; filename*=UTF-8''a%22b%0D.txt");
    }
}
