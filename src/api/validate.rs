//! `POST /v1/batches/validate` (extension): checks an uploaded input file for an endpoint
//! without creating a batch, so a client (the web console) can show every problem with its
//! line before anything is queued.
//!
//! `{"input_file_id": "file-…", "endpoint": "/v1/chat/completions"}` answers
//! `{"object": "validation", "valid", "total", "errors": [{"code", "message", "param", "line"}],
//! "models": {"m": {"requests", "input_tokens", "max_output_tokens"}}, …}`. The file is
//! streamed through [`crate::engine::validator`] with the server's limits and routes, exactly
//! as the engine validates a created batch, so the two never disagree. The file must be the
//! caller's (another tenant's is a 404) and of purpose `batch`, as at create.

use axum::extract::State;
use axum::Json;
use serde_json::{json, Map, Value};

use super::batches::{batch_input, endpoint_param, string_param};
use super::extract::JsonObject;
use super::{AppState, Tenant};
use crate::engine::validator::{validate_stream, Report, Validator};
use crate::error::ApiResult;
use crate::store::{FileId, InputFormat};

pub async fn validate(State(st): State<AppState>, Tenant(tenant): Tenant, JsonObject(body): JsonObject) -> ApiResult<Json<Value>> {
    let input_file_id = FileId::from(string_param(&body, "input_file_id")?);
    let endpoint = endpoint_param(&body)?;
    let file = batch_input(&st, &tenant, &input_file_id).await?;
    let stream = st.blob.get_stream(&file.blob_key).await?;
    let v = Validator::new("batch_validate", &endpoint, &st.router, st.cfg.limits, st.cfg.engine.unit_lines);
    let report = validate_stream(stream, file.bytes as u64, v).await?;
    crate::memory::release_free_memory();
    Ok(Json(render(&input_file_id, &endpoint, &report)))
}

/// The validation object.
fn render(input_file_id: &str, endpoint: &str, r: &Report) -> Value {
    let models: Map<String, Value> = r
        .models
        .iter()
        .map(|(m, s)| (m.clone(), json!({"requests": s.requests, "input_tokens": s.input_tokens, "max_output_tokens": s.max_output_tokens})))
        .collect();
    let format = match r.validated.format {
        InputFormat::Full => "full",
        InputFormat::Bare => "bare",
    };
    json!({
        "object": "validation",
        "input_file_id": input_file_id,
        "endpoint": endpoint,
        "valid": r.errors.is_empty(),
        "total": r.validated.total,
        "format": format,
        "errors": r.errors,
        "models": models,
        "estimated_input_tokens": r.estimated_input_tokens,
    })
}
