//! A batch record as Anthropic's `MessageBatch` object, and a result record as its
//! `MessageBatchIndividualResponse` line. Pure functions: the HTTP handlers and `batchd run`
//! render with them.
//!
//! The engine counts a batch's lines as `completed` (2xx answers) and `failed` (everything
//! else, including the lines a cancel or an expiry ended before they ran, which the finalizer
//! fills in as `batch_cancelled` / `batch_expired`). Anthropic tells those apart:
//! `request_counts` splits `failed` by the batch's `unrun` count (recorded before the fill),
//! and each result line says `succeeded`, `errored`, `canceled` or `expired`.

use chrono::{SecondsFormat, TimeZone, Utc};
use serde_json::{json, Value};

use crate::store::{BatchRecord, BatchStatus};
use crate::upstream::translate::anthropic_error_type;

/// A Unix time as RFC 3339 (`2026-12-07T17:46:49Z`), as Anthropic writes its times.
pub fn rfc3339(ts: i64) -> String {
    Utc.timestamp_opt(ts, 0).single().unwrap_or_default().to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// `in_progress` → `canceling` → `ended`.
pub fn processing_status(b: &BatchRecord) -> &'static str {
    match b.status {
        s if s.is_final() => "ended",
        BatchStatus::Cancelling => "canceling",
        BatchStatus::Finalizing if b.finalize_as == Some(BatchStatus::Cancelled) => "canceling",
        _ => "in_progress",
    }
}

/// The requests of the batch in each state; they always sum to its number of requests.
pub fn request_counts(b: &BatchRecord) -> Value {
    let requests = b.total.max(b.est_requests).max(b.completed + b.failed);
    let unrun = b.unrun.unwrap_or(0).clamp(0, b.failed);
    let (mut canceled, mut expired, mut errored, mut processing) = (0, 0, b.failed, requests - b.completed - b.failed);
    match b.status {
        BatchStatus::Cancelled => (canceled, errored, processing) = (unrun + processing, b.failed - unrun, 0),
        BatchStatus::Expired => (expired, errored, processing) = (unrun + processing, b.failed - unrun, 0),
        // A batch the engine could not run: whatever did not succeed failed.
        BatchStatus::Failed | BatchStatus::Completed => (errored, processing) = (requests - b.completed, 0),
        _ => {}
    }
    json!({"processing": processing, "succeeded": b.completed, "errored": errored, "canceled": canceled, "expired": expired})
}

/// When processing ended (any final status).
fn ended_at(b: &BatchRecord) -> Option<i64> {
    b.completed_at.or(b.cancelled_at).or(b.expired_at).or(b.failed_at).filter(|_| b.status.is_final())
}

/// The `MessageBatch` object; `results_url` is where its results are, once it has ended.
pub fn message_batch(b: &BatchRecord, results_url: Option<String>) -> Value {
    let expires = b.expires_at.unwrap_or(b.created_at + 86_400);
    json!({
        "id": b.id,
        "type": "message_batch",
        "processing_status": processing_status(b),
        "request_counts": request_counts(b),
        "ended_at": ended_at(b).map(rfc3339),
        "created_at": rfc3339(b.created_at),
        "expires_at": rfc3339(expires),
        "archived_at": Value::Null,
        "cancel_initiated_at": b.cancelling_at.map(rfc3339),
        "results_url": results_url.filter(|_| b.status.is_final()),
    })
}

/// One result record of the log (an output or error line of OpenAI's Batch API) as
/// Anthropic's `{"custom_id", "result": {"type", …}}`.
pub fn individual_response(record: &Value) -> Value {
    let response = &record["response"];
    let status = response["status_code"].as_u64();
    let code = record["error"]["code"].as_str();
    let result = match (status, code) {
        (Some(200..=299), _) => json!({"type": "succeeded", "message": response["body"]}),
        (_, Some("batch_cancelled")) => json!({"type": "canceled"}),
        (_, Some("batch_expired")) => json!({"type": "expired"}),
        _ => json!({"type": "errored", "error": error_response(record)}),
    };
    json!({"custom_id": record["custom_id"], "result": result})
}

/// Anthropic's `ErrorResponse` for a failed line: the upstream's own error when it answered
/// in Anthropic's envelope (a Messages line always gets its errors in it), else one made from
/// the line's error and status.
fn error_response(record: &Value) -> Value {
    let response = &record["response"];
    let body = &response["body"];
    let status = response["status_code"].as_u64().unwrap_or(500) as u16;
    let (kind, message) = match (body["type"].as_str(), body["error"]["type"].as_str(), body["error"]["message"].as_str()) {
        (Some("error"), Some(t), Some(m)) => (t.to_string(), m.to_string()),
        _ => {
            let m = record["error"]["message"].as_str().or(body["error"]["message"].as_str()).unwrap_or("The request failed.");
            (line_error_type(record["error"]["code"].as_str(), status).to_string(), m.to_string())
        }
    };
    json!({"type": "error", "error": {"type": known_type(&kind), "message": message}, "request_id": response["request_id"]})
}

/// The error type of a line that failed inside batchd (no upstream answer): a refusal at
/// validation is the request's fault, anything else the service's.
fn line_error_type(code: Option<&str>, status: u16) -> &'static str {
    match code {
        Some("unsupported_parameter" | "unsupported_value" | "invalid_value" | "model_not_found") => "invalid_request_error",
        Some("timeout" | "upstream_timeout") => "timeout_error",
        _ if status >= 400 => anthropic_error_type(status),
        _ => "api_error",
    }
}

/// One of the error types Anthropic's SDKs know (`ErrorObject`); `request_too_large` and any
/// other become `invalid_request_error` (a 4xx) or `api_error`.
fn known_type(kind: &str) -> &str {
    const KNOWN: [&str; 9] = [
        "invalid_request_error",
        "authentication_error",
        "billing_error",
        "permission_error",
        "not_found_error",
        "rate_limit_error",
        "timeout_error",
        "api_error",
        "overloaded_error",
    ];
    match kind {
        k if KNOWN.contains(&k) => k,
        "request_too_large" => "invalid_request_error",
        _ => "api_error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(status: BatchStatus, total: i64, completed: i64, failed: i64, unrun: Option<i64>) -> BatchRecord {
        let mut b = BatchRecord::new("msgbatch_x".into(), "t".into(), "f".into(), "/v1/messages".into(), "24h".into(), 0, 86_400);
        (b.status, b.total, b.completed, b.failed, b.unrun, b.est_requests) = (status, total, completed, failed, unrun, total);
        b
    }

    #[test]
    fn request_counts_tell_canceled_and_expired_lines_from_errors_and_always_sum_to_the_requests() {
        let cases = [
            (batch(BatchStatus::Validating, 0, 0, 0, None), [5, 0, 0, 0, 0]),
            (batch(BatchStatus::InProgress, 10, 3, 2, None), [5, 3, 2, 0, 0]),
            (batch(BatchStatus::Cancelling, 10, 3, 2, None), [5, 3, 2, 0, 0]),
            (batch(BatchStatus::Cancelled, 10, 3, 7, Some(5)), [0, 3, 2, 5, 0]),
            (batch(BatchStatus::Expired, 10, 3, 7, Some(4)), [0, 3, 3, 0, 4]),
            (batch(BatchStatus::Completed, 10, 8, 2, None), [0, 8, 2, 0, 0]),
        ];
        for (mut b, [processing, succeeded, errored, canceled, expired]) in cases {
            if b.status == BatchStatus::Validating {
                b.est_requests = 5;
            }
            let c = request_counts(&b);
            let got = ["processing", "succeeded", "errored", "canceled", "expired"].map(|k| c[k].as_i64().unwrap());
            assert_eq!(got, [processing, succeeded, errored, canceled, expired], "{:?}", b.status);
            assert_eq!(got.iter().sum::<i64>(), b.total.max(b.est_requests));
        }
    }

    #[test]
    fn processing_status_follows_the_batch() {
        assert_eq!(processing_status(&batch(BatchStatus::Validating, 0, 0, 0, None)), "in_progress");
        assert_eq!(processing_status(&batch(BatchStatus::Cancelling, 1, 0, 0, None)), "canceling");
        let mut f = batch(BatchStatus::Finalizing, 1, 0, 0, None);
        f.finalize_as = Some(BatchStatus::Cancelled);
        assert_eq!(processing_status(&f), "canceling");
        f.finalize_as = Some(BatchStatus::Completed);
        assert_eq!(processing_status(&f), "in_progress");
        for s in [BatchStatus::Completed, BatchStatus::Cancelled, BatchStatus::Expired, BatchStatus::Failed] {
            assert_eq!(processing_status(&batch(s, 1, 1, 0, None)), "ended");
        }
    }

    #[test]
    fn result_lines_become_succeeded_errored_canceled_or_expired() {
        let ok = json!({"custom_id": "a", "response": {"status_code": 200, "request_id": "r", "body": {"id": "msg_1", "type": "message"}}, "error": null});
        assert_eq!(individual_response(&ok), json!({"custom_id": "a", "result": {"type": "succeeded", "message": {"id": "msg_1", "type": "message"}}}));
        let upstream = json!({"custom_id": "b", "response": {"status_code": 529, "request_id": "r2",
            "body": {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}}, "error": null});
        assert_eq!(
            individual_response(&upstream)["result"],
            json!({"type": "errored", "error": {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}, "request_id": "r2"}})
        );
        let refused = json!({"custom_id": "c", "response": null, "error": {"code": "unsupported_parameter", "message": "no"}});
        assert_eq!(individual_response(&refused)["result"]["error"]["error"], json!({"type": "invalid_request_error", "message": "no"}));
        let too_large =
            json!({"custom_id": "c", "response": {"status_code": 413, "body": {"type": "error", "error": {"type": "request_too_large", "message": "big"}}}});
        assert_eq!(individual_response(&too_large)["result"]["error"]["error"]["type"], "invalid_request_error");
        let cancelled = json!({"custom_id": "d", "response": null, "error": {"code": "batch_cancelled", "message": "x"}});
        assert_eq!(individual_response(&cancelled), json!({"custom_id": "d", "result": {"type": "canceled"}}));
        let expired = json!({"custom_id": "e", "response": null, "error": {"code": "batch_expired", "message": "x"}});
        assert_eq!(individual_response(&expired)["result"], json!({"type": "expired"}));
    }

    #[test]
    fn times_are_rfc3339_in_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_796_665_609), "2026-12-07T17:46:49Z");
    }
}
