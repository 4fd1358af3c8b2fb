//! The OpenAI Batch + Files API at an upstream's `base_url` (which ends in `/v1`): a shard's
//! requests are uploaded as a JSONL file, the create carries the record's key as its
//! `Idempotency-Key` and as the metadata tag [`TAG`], and a restart finds an unrecorded
//! batch again by listing for that tag.

use async_trait::async_trait;
use bytes::Bytes;
use reqwest::Method;
use serde_json::{json, Value};

use super::http::Http;
use super::{BatchApi, Input, Lookup, RemoteError, RemoteLine, RemoteRequest, RemoteStatus, CLOCK_SLACK_S, TAG};
use crate::config::UpstreamConfig;

/// The OpenAI Batch + Files API at an upstream's `base_url`.
pub struct OpenAiBatch {
    http: Http,
}

impl OpenAiBatch {
    pub fn new(cfg: &UpstreamConfig) -> Result<OpenAiBatch, crate::upstream::BuildError> {
        Ok(OpenAiBatch { http: Http::new(cfg)? })
    }

    async fn file_lines(&self, id: &str, out: &mut Vec<RemoteLine>) -> Result<(), RemoteError> {
        let lines = self.http.jsonl(self.http.req(Method::GET, &format!("/files/{id}/content")), &format!("file {id}")).await?;
        out.extend(lines.iter().map(remote_line));
        Ok(())
    }
}

/// A shard's requests as the lines of a batch input file.
pub fn input_file(requests: &[RemoteRequest]) -> Bytes {
    let mut out = Vec::new();
    for r in requests {
        let line = json!({
            "custom_id": r.custom_id,
            "method": "POST",
            "url": format!("/v1{}", r.path),
            "body": serde_json::from_slice::<Value>(&r.body).unwrap_or(Value::Null),
        });
        out.extend_from_slice(line.to_string().as_bytes());
        out.push(b'\n');
    }
    Bytes::from(out)
}

/// A batch object's fields the engine reads.
pub fn remote_status(v: &Value) -> Result<RemoteStatus, RemoteError> {
    let s = |k: &str| v[k].as_str().filter(|s| !s.is_empty()).map(str::to_owned);
    let errors = v["errors"]["data"]
        .as_array()
        .map(|a| a.iter().map(|e| (e["code"].as_str().unwrap_or("").to_string(), e["message"].as_str().unwrap_or("").to_string())).collect())
        .unwrap_or_default();
    Ok(RemoteStatus {
        id: s("id").ok_or_else(|| RemoteError::Decode("a batch without an id".into()))?,
        status: s("status").ok_or_else(|| RemoteError::Decode("a batch without a status".into()))?,
        output_file_id: s("output_file_id"),
        error_file_id: s("error_file_id"),
        results_url: None,
        errors,
        completed: v["request_counts"]["completed"].as_u64().unwrap_or(0),
        failed: v["request_counts"]["failed"].as_u64().unwrap_or(0),
        metadata: v["metadata"].clone(),
    })
}

/// One line of a remote output or error file.
pub fn remote_line(v: &Value) -> RemoteLine {
    let resp = &v["response"];
    let error = v["error"].as_object().map(|e| {
        (e.get("code").and_then(Value::as_str).unwrap_or("remote_error").to_string(), e.get("message").and_then(Value::as_str).unwrap_or("").to_string())
    });
    RemoteLine {
        custom_id: v["custom_id"].as_str().unwrap_or_default().to_string(),
        status_code: resp["status_code"].as_u64().map(|s| s.min(999) as u16),
        request_id: resp["request_id"].as_str().map(str::to_owned),
        body: resp.get("body").filter(|b| !b.is_null()).map(Value::to_string),
        error,
    }
}

#[async_trait]
impl BatchApi for OpenAiBatch {
    fn uploads(&self) -> bool {
        true
    }

    async fn upload(&self, name: &str, requests: &[RemoteRequest]) -> Result<String, RemoteError> {
        let part =
            reqwest::multipart::Part::stream(input_file(requests)).file_name(name.to_string()).mime_str("application/jsonl").map_err(RemoteError::Transport)?;
        let form = reqwest::multipart::Form::new().text("purpose", "batch").part("file", part);
        let v = self.http.json(self.http.req(Method::POST, "/files").multipart(form)).await?;
        v["id"].as_str().map(str::to_owned).ok_or_else(|| RemoteError::Decode("an uploaded file without an id".into()))
    }

    async fn create(&self, key: &str, input: Input<'_>, endpoint: &str, window: &str) -> Result<RemoteStatus, RemoteError> {
        let Input::File(file_id) = input else { return Err(RemoteError::Decode("the OpenAI Batch API creates batches over uploaded files only".into())) };
        let body = json!({"input_file_id": file_id, "endpoint": endpoint, "completion_window": window, "metadata": {TAG: key}});
        let v = self.http.json(self.http.req(Method::POST, "/batches").header("idempotency-key", key).json(&body)).await?;
        remote_status(&v)
    }

    fn idempotent(&self) -> bool {
        true
    }

    async fn find_created(&self, look: Lookup<'_>) -> Result<Option<RemoteStatus>, RemoteError> {
        let mut after: Option<String> = None;
        loop {
            let mut r = self.http.req(Method::GET, "/batches").query(&[("limit", "100")]);
            if let Some(a) = &after {
                r = r.query(&[("after", a)]);
            }
            let page = self.http.json(r).await?;
            let items = page["data"].as_array().cloned().unwrap_or_default();
            for b in &items {
                if b["metadata"][TAG].as_str() == Some(look.key) {
                    return remote_status(b).map(Some);
                }
            }
            // Newest first: a page reaching before the record was made holds no older match.
            let older = items.last().and_then(|b| b["created_at"].as_i64()).is_some_and(|t| t < look.since - CLOCK_SLACK_S);
            if !page["has_more"].as_bool().unwrap_or(false) || older || items.is_empty() {
                return Ok(None);
            }
            after = items.last().and_then(|b| b["id"].as_str()).map(str::to_owned);
        }
    }

    async fn get(&self, id: &str) -> Result<RemoteStatus, RemoteError> {
        remote_status(&self.http.json(self.http.req(Method::GET, &format!("/batches/{id}"))).await?)
    }

    async fn cancel(&self, id: &str) -> Result<RemoteStatus, RemoteError> {
        remote_status(&self.http.json(self.http.req(Method::POST, &format!("/batches/{id}/cancel"))).await?)
    }

    async fn results(&self, st: &RemoteStatus) -> Result<Vec<RemoteLine>, RemoteError> {
        let mut out = Vec::new();
        for id in [&st.output_file_id, &st.error_file_id].into_iter().flatten() {
            self.file_lines(id, &mut out).await?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_objects_and_result_lines_are_read() {
        let b = json!({"id": "batch_1", "status": "failed", "output_file_id": null, "error_file_id": "",
            "errors": {"data": [{"code": "token_limit_exceeded", "message": "too many"}]}, "request_counts": {"completed": 2, "failed": 1},
            "metadata": {TAG: "k"}});
        let st = remote_status(&b).unwrap();
        assert_eq!((&st.output_file_id, &st.error_file_id), (&None, &None), "null and empty ids are no file");
        assert_eq!(st.errors, vec![("token_limit_exceeded".to_string(), "too many".to_string())]);
        assert!(st.is_final());
        assert!(remote_status(&json!({"status": "completed"})).is_err(), "a batch without an id");
        let ok = remote_line(&json!({"custom_id": "L3", "response": {"status_code": 200, "request_id": "r", "body": {"a": 1}}, "error": null}));
        assert_eq!((ok.status_code, ok.body.as_deref(), ok.error), (Some(200), Some(r#"{"a":1}"#), None));
        let expired = remote_line(&json!({"custom_id": "L4", "response": null, "error": {"code": "batch_expired", "message": "m"}}));
        assert_eq!((expired.status_code, expired.error), (None, Some(("batch_expired".into(), "m".into()))));
    }

    #[test]
    fn requests_become_lines_of_an_input_file() {
        let r = RemoteRequest { custom_id: "bx-L1".into(), path: "/chat/completions".into(), body: Bytes::from_static(br#"{"model":"m"}"#) };
        let text = String::from_utf8(input_file(&[r.clone(), r]).to_vec()).unwrap();
        let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0], json!({"custom_id": "bx-L1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m"}}));
    }
}
