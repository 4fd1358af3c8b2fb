//! The JSON objects of OpenAI's wire contract (File, Batch, lists, deletions), rendered from
//! store records. Fields the SDK marks optional are always present, as `null` when unset.

use serde::Serialize;
use serde_json::{json, Value};

use crate::store::{BatchRecord, FileId, FileRecord, LineError};

#[derive(Serialize)]
pub struct FileObject {
    pub id: FileId,
    pub object: &'static str,
    pub bytes: i64,
    pub created_at: i64,
    pub filename: String,
    pub purpose: String,
    pub status: &'static str,
    pub expires_at: Option<i64>,
    pub status_details: Option<String>,
}

impl From<&FileRecord> for FileObject {
    fn from(f: &FileRecord) -> Self {
        FileObject {
            id: f.id.clone(),
            object: "file",
            bytes: f.bytes,
            created_at: f.created_at,
            filename: f.filename.clone(),
            purpose: f.purpose.clone(),
            status: "processed",
            expires_at: f.expires_at,
            status_details: None,
        }
    }
}

/// `{"object":"list","data":[...],"first_id","last_id","has_more"}`.
pub fn list<T: Serialize>(items: Vec<(String, T)>, has_more: bool) -> Value {
    let first_id = items.first().map(|(id, _)| id.clone());
    let last_id = items.last().map(|(id, _)| id.clone());
    let data: Vec<T> = items.into_iter().map(|(_, v)| v).collect();
    json!({"object": "list", "data": data, "first_id": first_id, "last_id": last_id, "has_more": has_more})
}

fn errors_value(errors: &Option<Vec<LineError>>) -> Value {
    match errors {
        None => Value::Null,
        Some(list) => json!({"object": "list", "data": list}),
    }
}

/// The Batch object, every SDK field present, plus the `progress` extension while running.
pub fn batch_object(b: &BatchRecord, progress: Option<Value>) -> Value {
    let u = &b.usage;
    let mut v = json!({
        "id": b.id,
        "object": "batch",
        "endpoint": b.endpoint,
        "model": b.model,
        "errors": errors_value(&b.errors),
        "input_file_id": b.input_file_id,
        "completion_window": b.completion_window,
        "status": b.status.as_str(),
        "output_file_id": b.output_file_id,
        "error_file_id": b.error_file_id,
        "created_at": b.created_at,
        "in_progress_at": b.in_progress_at,
        "expires_at": b.expires_at,
        "finalizing_at": b.finalizing_at,
        "completed_at": b.completed_at,
        "failed_at": b.failed_at,
        "expired_at": b.expired_at,
        "cancelling_at": b.cancelling_at,
        "cancelled_at": b.cancelled_at,
        "request_counts": {"total": b.total, "completed": b.completed, "failed": b.failed},
        "usage": {
            "input_tokens": u.input_tokens,
            "input_tokens_details": {"cached_tokens": u.cached_tokens},
            "output_tokens": u.output_tokens,
            "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
            "total_tokens": u.total_tokens,
        },
        "metadata": b.metadata,
    });
    if let Some(p) = progress {
        v["progress"] = p;
    }
    v
}
