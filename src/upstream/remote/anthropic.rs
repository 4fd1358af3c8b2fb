//! Anthropic's Message Batches API at an upstream's `base_url` (which ends in `/v1`): a
//! shard's requests go inline in the create (`{"requests": [{"custom_id", "params"}]}`, no
//! upload), the batch is retrieved, cancelled, and its results read as JSONL at its
//! `results_url` once it has ended.
//!
//! The API has no idempotency key and no metadata. What ties a remote batch to its record is
//! its requests' custom_ids, which all start with the record's tag ([`super::shard_tag`]).
//! A reconciliation ([`BatchApi::find_created`]) lists the batches created around the
//! moment the record was about to be created, skips those already recorded, and reads the
//! first result line of each other one: the one whose custom_id carries the tag is adopted.
//! A candidate still running cannot be read yet ([`RemoteError::Undecided`]): the engine
//! asks again later, and creates nothing meanwhile.

use async_trait::async_trait;
use reqwest::Method;
use serde_json::{json, Map, Value};

use super::http::Http;
use super::{BatchApi, Input, Lookup, RemoteError, RemoteLine, RemoteRequest, RemoteStatus, CLOCK_SLACK_S};
use crate::config::UpstreamConfig;
use crate::upstream::translate::{anthropic_error_status, MESSAGES_PATH};

/// The window of every Message Batch on Anthropic's API; another one is sent as batchd's
/// extension `completion_window` (a batchd provider takes it, Anthropic would not).
const NATIVE_WINDOW: &str = "24h";

/// Anthropic's Message Batches API at an upstream's `base_url`.
pub struct AnthropicBatch {
    http: Http,
}

impl AnthropicBatch {
    pub fn new(cfg: &UpstreamConfig) -> Result<AnthropicBatch, crate::upstream::BuildError> {
        Ok(AnthropicBatch { http: Http::new(cfg)? })
    }

    fn results_request(&self, st: &RemoteStatus) -> reqwest::RequestBuilder {
        match &st.results_url {
            Some(url) => self.http.url(url),
            None => self.http.req(Method::GET, &format!("/messages/batches/{}/results", st.id)),
        }
    }

    /// Whether an ended batch's requests carry `tag` (its first result line tells).
    async fn carries(&self, st: &RemoteStatus, tag: &str) -> Result<bool, RemoteError> {
        let first = self.http.first_line(self.results_request(st)).await?;
        Ok(first.and_then(|l| l["custom_id"].as_str().map(|c| c.starts_with(&format!("{tag}-")))).unwrap_or(false))
    }
}

/// The create's body: each request with its params; the window only when not Anthropic's own.
pub fn create_body(requests: &[RemoteRequest], window: &str) -> Result<Value, RemoteError> {
    let mut list = Vec::with_capacity(requests.len());
    for r in requests {
        if r.path != MESSAGES_PATH {
            return Err(RemoteError::Decode(format!("the Message Batches API runs /v1/messages requests only, not /v1{}", r.path)));
        }
        let params: Value = serde_json::from_slice(&r.body).map_err(|e| RemoteError::Decode(format!("request {}: {e}", r.custom_id)))?;
        list.push(json!({"custom_id": r.custom_id, "params": params}));
    }
    let mut body = Map::new();
    body.insert("requests".into(), Value::Array(list));
    if window != NATIVE_WINDOW {
        body.insert("completion_window".into(), window.into());
    }
    Ok(Value::Object(body))
}

/// A `MessageBatch` in the engine's (OpenAI's) words: `in_progress`, `cancelling`, and once
/// ended `cancelled` (a cancel was initiated), `expired` (requests expired) or `completed`.
pub fn remote_status(v: &Value) -> Result<RemoteStatus, RemoteError> {
    let id = v["id"].as_str().filter(|s| !s.is_empty()).ok_or_else(|| RemoteError::Decode("a Message Batch without an id".into()))?;
    let counts = &v["request_counts"];
    let n = |k: &str| counts[k].as_u64().unwrap_or(0);
    let status = match v["processing_status"].as_str() {
        Some("in_progress") => "in_progress",
        Some("canceling") => "cancelling",
        Some("ended") if !v["cancel_initiated_at"].is_null() => "cancelled",
        Some("ended") if n("expired") > 0 => "expired",
        Some("ended") => "completed",
        other => return Err(RemoteError::Decode(format!("Message Batch {id} has an unknown processing_status {other:?}"))),
    };
    Ok(RemoteStatus {
        id: id.to_string(),
        status: status.into(),
        results_url: v["results_url"].as_str().filter(|s| !s.is_empty()).map(str::to_owned),
        completed: n("succeeded"),
        failed: n("errored") + n("canceled") + n("expired"),
        ..Default::default()
    })
}

/// When a batch was created (RFC 3339), as unix seconds.
fn created_at(v: &Value) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(v["created_at"].as_str()?).ok().map(|t| t.timestamp())
}

/// One result line, `{"custom_id", "result": {"type", …}}`: a success as a 200 with its
/// Message, an error with the status its type stands for and Anthropic's error body,
/// `canceled` and `expired` as lines with no answer (`batch_cancelled`, `batch_expired`).
pub fn remote_line(v: &Value) -> RemoteLine {
    let result = &v["result"];
    let mut line =
        RemoteLine { custom_id: v["custom_id"].as_str().unwrap_or_default().to_string(), status_code: None, request_id: None, body: None, error: None };
    match result["type"].as_str() {
        Some("succeeded") => (line.status_code, line.body) = (Some(200), Some(result["message"].to_string())),
        Some("errored") => {
            let e = &result["error"];
            let kind = e["error"]["type"].as_str().unwrap_or("api_error");
            line.status_code = Some(anthropic_error_status(kind));
            line.request_id = e["request_id"].as_str().map(str::to_owned);
            line.body = Some(json!({"type": "error", "error": e["error"]}).to_string());
        }
        Some("canceled") => line.error = Some(("batch_cancelled".into(), "the remote Message Batch was canceled before this request ran".into())),
        Some("expired") => line.error = Some(("batch_expired".into(), "the remote Message Batch expired before this request ran".into())),
        other => line.error = Some(("remote_error".into(), format!("the remote gave a result of unknown type {other:?}"))),
    }
    line
}

#[async_trait]
impl BatchApi for AnthropicBatch {
    fn uploads(&self) -> bool {
        false
    }

    async fn upload(&self, _name: &str, _requests: &[RemoteRequest]) -> Result<String, RemoteError> {
        Err(RemoteError::Decode("the Message Batches API takes its requests inline; nothing is uploaded".into()))
    }

    async fn create(&self, _key: &str, input: Input<'_>, _endpoint: &str, window: &str) -> Result<RemoteStatus, RemoteError> {
        let Input::Inline(requests) = input else { return Err(RemoteError::Decode("the Message Batches API takes its requests inline".into())) };
        let body = create_body(requests, window)?;
        remote_status(&self.http.json(self.http.req(Method::POST, "/messages/batches").json(&body)).await?)
    }

    fn idempotent(&self) -> bool {
        false
    }

    async fn find_created(&self, look: Lookup<'_>) -> Result<Option<RemoteStatus>, RemoteError> {
        let tag = super::shard_tag(look.key);
        let mut after: Option<String> = None;
        let mut running: Option<String> = None;
        loop {
            let mut r = self.http.req(Method::GET, "/messages/batches").query(&[("limit", "100")]);
            if let Some(a) = &after {
                r = r.query(&[("after_id", a)]);
            }
            let page = self.http.json(r).await?;
            let items = page["data"].as_array().cloned().unwrap_or_default();
            let mut older = items.is_empty();
            for b in &items {
                let at = created_at(b).unwrap_or(i64::MAX);
                older |= at < look.since - CLOCK_SLACK_S;
                let id = b["id"].as_str().unwrap_or_default();
                if at > look.until + CLOCK_SLACK_S || at < look.since - CLOCK_SLACK_S || look.known.contains(id) {
                    continue;
                }
                let st = remote_status(b)?;
                if !st.is_final() {
                    running.get_or_insert(st.id);
                } else if self.carries(&st, &tag).await? {
                    return Ok(Some(st));
                }
            }
            // Newest first: a page reaching before the window holds nothing older to look at.
            if older || !page["has_more"].as_bool().unwrap_or(false) {
                return running.map_or(Ok(None), |id| Err(RemoteError::Undecided(id)));
            }
            after = page["last_id"].as_str().or_else(|| items.last().and_then(|b| b["id"].as_str())).map(str::to_owned);
        }
    }

    async fn get(&self, id: &str) -> Result<RemoteStatus, RemoteError> {
        remote_status(&self.http.json(self.http.req(Method::GET, &format!("/messages/batches/{id}"))).await?)
    }

    async fn cancel(&self, id: &str) -> Result<RemoteStatus, RemoteError> {
        remote_status(&self.http.json(self.http.req(Method::POST, &format!("/messages/batches/{id}/cancel"))).await?)
    }

    async fn results(&self, st: &RemoteStatus) -> Result<Vec<RemoteLine>, RemoteError> {
        let lines = self.http.jsonl(self.results_request(st), &format!("Message Batch {}", st.id)).await?;
        Ok(lines.iter().map(remote_line).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn batch(status: &str, cancel: Option<&str>, counts: [u64; 5]) -> Value {
        let [processing, succeeded, errored, canceled, expired] = counts;
        json!({"id": "msgbatch_1", "type": "message_batch", "processing_status": status, "cancel_initiated_at": cancel,
            "request_counts": {"processing": processing, "succeeded": succeeded, "errored": errored, "canceled": canceled, "expired": expired},
            "created_at": "2026-12-07T17:46:49Z", "results_url": if status == "ended" { json!("http://h/v1/messages/batches/msgbatch_1/results") } else { Value::Null }})
    }

    #[test]
    fn message_batches_read_in_the_engines_words() {
        let st = remote_status(&batch("in_progress", None, [3, 1, 0, 0, 0])).unwrap();
        assert_eq!((st.status.as_str(), st.completed, st.results_url), ("in_progress", 1, None));
        assert_eq!(remote_status(&batch("canceling", Some("t"), [3, 0, 0, 0, 0])).unwrap().status, "cancelling");
        assert_eq!(remote_status(&batch("ended", Some("t"), [0, 1, 0, 2, 0])).unwrap().status, "cancelled");
        let expired = remote_status(&batch("ended", None, [0, 1, 1, 0, 2])).unwrap();
        assert_eq!((expired.status.as_str(), expired.completed, expired.failed), ("expired", 1, 3));
        let done = remote_status(&batch("ended", None, [0, 4, 1, 0, 0])).unwrap();
        assert!(done.is_final() && done.status == "completed" && done.results_url.is_some());
        assert!(remote_status(&json!({"id": "x", "processing_status": "odd"})).is_err());
        assert_eq!(created_at(&batch("ended", None, [0; 5])), Some(1_796_665_609));
    }

    #[test]
    fn result_lines_become_answers_or_unrun_lines() {
        let ok = remote_line(&json!({"custom_id": "b1-L0", "result": {"type": "succeeded", "message": {"id": "msg_1"}}}));
        assert_eq!((ok.status_code, ok.body.as_deref(), ok.error), (Some(200), Some(r#"{"id":"msg_1"}"#), None));
        let err = remote_line(&json!({"custom_id": "b1-L1", "result": {"type": "errored",
            "error": {"type": "error", "error": {"type": "rate_limit_error", "message": "slow"}, "request_id": "req_9"}}}));
        assert_eq!((err.status_code, err.request_id.as_deref()), (Some(429), Some("req_9")));
        let body: Value = serde_json::from_str(err.body.as_deref().unwrap()).unwrap();
        assert_eq!(body, json!({"type": "error", "error": {"type": "rate_limit_error", "message": "slow"}}));
        let expired = remote_line(&json!({"custom_id": "b1-L2", "result": {"type": "expired"}}));
        assert_eq!((expired.status_code, expired.error.map(|e| e.0)), (None, Some("batch_expired".into())));
        let canceled = remote_line(&json!({"custom_id": "b1-L3", "result": {"type": "canceled"}}));
        assert_eq!(canceled.error.map(|e| e.0), Some("batch_cancelled".into()));
        for kind in ["invalid_request_error", "rate_limit_error", "overloaded_error", "api_error", "timeout_error"] {
            assert_eq!(crate::upstream::translate::anthropic_error_type(anthropic_error_status(kind)), kind, "status and type agree both ways");
        }
    }

    #[test]
    fn the_create_carries_requests_inline_and_the_window_only_when_not_anthropics() {
        let r = RemoteRequest { custom_id: "b1-L0".into(), path: MESSAGES_PATH.into(), body: Bytes::from_static(br#"{"model":"m","max_tokens":5}"#) };
        let body = create_body(std::slice::from_ref(&r), "24h").unwrap();
        assert_eq!(body, json!({"requests": [{"custom_id": "b1-L0", "params": {"model": "m", "max_tokens": 5}}]}));
        assert_eq!(create_body(std::slice::from_ref(&r), "1h").unwrap()["completion_window"], "1h");
        let embed = RemoteRequest { path: "/embeddings".into(), ..r };
        assert!(create_body(&[embed], "24h").is_err(), "only Messages requests");
    }
}
