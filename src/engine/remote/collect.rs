//! A remote batch's result lines brought back: each mapped to its local line by the stable
//! custom_id batchd gave it (`<shard tag>-L<line>`), turned into the local record (the user's
//! custom_id, batchd's request id), and sorted into final results and lines worth a follow-up
//! remote batch (429, 5xx, `batch_expired`, a line the remote cancelled).

use std::collections::{HashMap, HashSet};

use super::super::dispatch::{self, Prepared};
use crate::store::ResultRecord;
use crate::upstream::remote::{line_of, RemoteLine, RemoteStatus};

/// What came back of one remote batch.
#[derive(Default)]
pub struct Collected {
    /// Final results, to record.
    pub results: Vec<ResultRecord>,
    /// Lines that failed in a way a follow-up remote batch may fix, with the record they end
    /// in if no follow-up does.
    pub retry: HashMap<u64, ResultRecord>,
}

/// Sorts a final remote batch's lines; `lines` are the local lines it holds (those already
/// durable left out), `cancelled` whether the local batch was cancelled (then lines with no
/// answer are left for the finalizer's `batch_cancelled`).
pub fn collect(st: &RemoteStatus, got: Vec<RemoteLine>, lines: &HashMap<u64, &Prepared>, cancelled: bool) -> Collected {
    let mut out = Collected::default();
    let mut seen = HashSet::new();
    for rl in got {
        let Some(p) = line_of(&rl.custom_id).and_then(|n| lines.get(&n)) else { continue };
        if !seen.insert(p.line) {
            continue;
        }
        let rec = record(p, &rl);
        if retryable(&rl) && !cancelled {
            out.retry.insert(p.line, rec);
        } else if rl.status_code.is_some() || !cancelled {
            out.results.push(rec);
        }
    }
    if cancelled {
        return out;
    }
    let (code, message, again) = missing_reason(st);
    for (n, p) in lines {
        if !seen.contains(n) {
            let rec = dispatch::error_record(p, code, &message);
            if again {
                out.retry.insert(*n, rec);
            } else {
                out.results.push(rec);
            }
        }
    }
    out
}

/// Why a line has no result line in a final remote batch, and whether a follow-up may help.
fn missing_reason(st: &RemoteStatus) -> (&'static str, String, bool) {
    let first = st.errors.first();
    match st.status.as_str() {
        "expired" => ("batch_expired", format!("remote batch {} expired before this line ran", st.id), true),
        "failed" if first.is_some_and(|(c, _)| c == "token_limit_exceeded") => {
            ("token_limit_exceeded", format!("remote batch {} was refused: too many tokens enqueued", st.id), true)
        }
        "failed" => ("remote_batch_failed", format!("remote batch {} failed: {}", st.id, first.map_or("no reason given", |(_, m)| m.as_str())), false),
        "cancelled" => ("batch_cancelled", format!("remote batch {} was cancelled at the remote", st.id), true),
        _ => ("remote_result_missing", format!("remote batch {} ended without a result for this line", st.id), true),
    }
}

/// 408, 429, 5xx answers and lines the remote expired or cancelled before they ran.
fn retryable(rl: &RemoteLine) -> bool {
    match (rl.status_code, &rl.error) {
        (Some(s), _) => s == 408 || s == 429 || s >= 500,
        (None, Some((code, _))) => code == "batch_expired" || code == "batch_cancelled",
        (None, None) => false,
    }
}

fn record(p: &Prepared, rl: &RemoteLine) -> ResultRecord {
    match (rl.status_code, rl.body.as_deref()) {
        (Some(status), Some(body)) => dispatch::record_of_answer(p, status, rl.request_id.as_deref(), body.as_bytes()),
        _ => {
            let (code, message) = rl.error.clone().unwrap_or_else(|| ("remote_error".into(), "the remote gave no answer for this line".into()));
            dispatch::error_record(p, &code, &message)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn prepared(line: u64) -> Prepared {
        Prepared {
            batch_id: "batch_x".into(),
            line,
            unit_idx: 0,
            epoch: Some(1),
            custom_id: format!("user-{line}"),
            request_id: format!("batch_req_{line}"),
            body: Bytes::new(),
            model: "m".into(),
            path: "/chat/completions".into(),
            est_tokens: 1,
        }
    }

    fn answer(line: u64, status: u16) -> RemoteLine {
        RemoteLine {
            custom_id: crate::upstream::remote::custom_id("k", line),
            status_code: Some(status),
            request_id: Some("rr".into()),
            body: Some(r#"{"usage":{"prompt_tokens":2,"completion_tokens":3}}"#.into()),
            error: None,
        }
    }

    fn status(s: &str) -> RemoteStatus {
        RemoteStatus { id: "rb".into(), status: s.into(), ..Default::default() }
    }

    #[test]
    fn answers_map_back_and_failures_sort() {
        let ps: Vec<_> = (0..6).map(prepared).collect();
        let lines: HashMap<u64, &Prepared> = ps.iter().map(|p| (p.line, p)).collect();
        // `L3`: the form written before shard tags still maps back.
        let expired = RemoteLine { custom_id: "L3".into(), status_code: None, request_id: None, body: None, error: Some(("batch_expired".into(), "x".into())) };
        let got = vec![answer(0, 200), answer(0, 200), answer(1, 500), answer(2, 400), expired, answer(99, 200)];
        let c = collect(&status("completed"), got, &lines, false);
        let ok: Vec<_> = c.results.iter().map(|r| (r.line, r.ok, r.custom_id.as_str())).collect();
        assert!(ok.contains(&(0, true, "user-0")) && ok.contains(&(2, false, "user-2")), "{ok:?}");
        assert_eq!(c.results.iter().filter(|r| r.line == 0).count(), 1, "a repeated remote line counts once");
        assert_eq!(c.results[0].usage.output_tokens, 3);
        let v: serde_json::Value = serde_json::from_str(&c.results[0].record).unwrap();
        assert_eq!((v["id"].as_str(), v["custom_id"].as_str()), (Some("batch_req_0"), Some("user-0")), "local ids");
        let mut retry: Vec<u64> = c.retry.keys().copied().collect();
        retry.sort();
        assert_eq!(retry, vec![1, 3, 4, 5], "500, batch_expired, and lines with no result line");
    }

    #[test]
    fn a_cancelled_batch_keeps_finished_work_only() {
        let ps: Vec<_> = (0..3).map(prepared).collect();
        let lines: HashMap<u64, &Prepared> = ps.iter().map(|p| (p.line, p)).collect();
        let c = collect(&status("cancelled"), vec![answer(0, 200), answer(1, 503)], &lines, true);
        assert_eq!(c.results.iter().map(|r| r.line).collect::<Vec<_>>(), vec![0, 1]);
        assert!(c.retry.is_empty());
        let failed = RemoteStatus { errors: vec![("invalid_file".into(), "bad".into())], ..status("failed") };
        let c = collect(&failed, vec![], &lines, false);
        assert_eq!((c.results.len(), c.retry.len()), (3, 0), "a remote batch failed for good fails its lines");
    }
}
