//! The input of a retry batch: exactly the lines of a final batch that are in its error log
//! (narrowed by kind and upstream status), with their `custom_id`s unchanged.
//!
//! Memory stays bounded whatever the batch's size: the input is streamed (in file order, not
//! by work units, which may follow a dispatch order), and the error log is read one page at
//! a time, side by side. Both are in line order and
//! every error record names one input line by its (unique) `custom_id`, so a line is taken
//! when it is the next error record's line. Lines are written as full batch lines (a bare
//! body keeps its `line-N` id), so the new batch's results match the original lines.

use std::collections::VecDeque;
use std::sync::Arc;

use serde::Deserialize;

use bytes::Bytes;
use futures::StreamExt;

use super::error::{Context, Result};
use super::feeder::Source;
use super::lines::{LineSplitter, RawLine};
use super::{Engine, Inner};
use crate::store::{BatchId, BatchRecord, FileRecord, InputFormat};

/// Which error lines to retry.
#[derive(Debug, Clone)]
pub struct RetryFilter {
    /// Lines whose upstream failed or gave no answer (everything but cancelled and expired).
    pub failed: bool,
    /// `batch_expired` lines.
    pub expired: bool,
    /// `batch_cancelled` lines.
    pub cancelled: bool,
    /// When not empty: only lines whose upstream answered one of these statuses.
    pub status_codes: Vec<u16>,
}

impl Default for RetryFilter {
    fn default() -> Self {
        RetryFilter { failed: true, expired: true, cancelled: true, status_codes: vec![] }
    }
}

#[derive(Deserialize)]
struct ErrorLine {
    custom_id: String,
    #[serde(default)]
    response: Option<StatusOnly>,
    #[serde(default)]
    error: Option<CodeOnly>,
}

#[derive(Deserialize)]
struct StatusOnly {
    #[serde(default)]
    status_code: Option<u16>,
}

#[derive(Deserialize)]
struct CodeOnly {
    #[serde(default)]
    code: Option<String>,
}

impl RetryFilter {
    fn takes(&self, l: &ErrorLine) -> bool {
        let code = l.error.as_ref().and_then(|e| e.code.as_deref());
        let kind_ok = match code {
            Some("batch_expired") => self.expired,
            Some("batch_cancelled") => self.cancelled,
            _ => self.failed,
        };
        let status = l.response.as_ref().and_then(|r| r.status_code);
        kind_ok && (self.status_codes.is_empty() || status.is_some_and(|s| self.status_codes.contains(&s)))
    }
}

/// Error records read per store call.
const PAGE: u32 = 1000;

/// The error log of one batch, read a page at a time: (custom_id, taken).
struct ErrorCursor<'a> {
    inner: &'a Inner,
    batch_id: &'a BatchId,
    filter: &'a RetryFilter,
    after: u64,
    page: VecDeque<(String, bool)>,
    done: bool,
}

impl ErrorCursor<'_> {
    /// The next error record, reading another page when needed.
    async fn peek(&mut self) -> Result<Option<&(String, bool)>> {
        if self.page.is_empty() && !self.done {
            match self.inner.store.results_chunk(self.batch_id, Some(false), self.after, PAGE).await.ctx("reading the error log")? {
                None => self.done = true,
                Some((text, last)) => {
                    self.after = last;
                    for line in text.lines() {
                        if let Ok(l) = serde_json::from_str::<ErrorLine>(line) {
                            let take = self.filter.takes(&l);
                            self.page.push_back((l.custom_id, take));
                        }
                    }
                }
            }
        }
        Ok(self.page.front())
    }
}

/// One full batch line: `{"custom_id","method":"POST","url","body"}`.
fn full_line(custom_id: &str, url: &str, body: &[u8]) -> String {
    let s = |v: &str| serde_json::to_string(v).expect("a string serializes");
    format!("{{\"custom_id\":{},\"method\":\"POST\",\"url\":{},\"body\":{}}}\n", s(custom_id), s(url), String::from_utf8_lossy(body))
}

impl Engine {
    /// Writes the retry input of final batch `b` as a new `batch` file of its tenant (not
    /// recorded yet: the caller records it with the new batch). `None` when no line matches.
    pub async fn retry_input(&self, b: &BatchRecord, filter: &RetryFilter) -> Result<Option<(FileRecord, u64)>> {
        let inner = &self.inner;
        let input = inner.store.get_file(&b.tenant, &b.input_file_id, 0).await.ctx("reading the input file record")?;
        let id = crate::ids::file_id();
        let key = format!("files/{id}");
        let mut w = inner.blob.writer(&key);
        let written = match copy_failed(inner, b, filter, &input.blob_key, &mut w).await {
            Ok(n) => n,
            Err(e) => {
                w.abort().await;
                return Err(e);
            }
        };
        if written == 0 {
            w.abort().await;
            return Ok(None);
        }
        let bytes = w.finish().await.ctx("writing the retry input")?;
        let now = crate::now_unix();
        let name = input.filename.strip_suffix(".jsonl").unwrap_or(&input.filename);
        let file = FileRecord {
            id,
            tenant: b.tenant.clone(),
            bytes: bytes as i64,
            created_at: now,
            filename: format!("{name}.retry.jsonl"),
            purpose: "batch".into(),
            expires_at: input.expires_at.map(|_| now + 30 * 86_400),
            blob_key: key,
        };
        Ok(Some((file, written)))
    }
}

/// Streams the input's lines, writing those the error cursor takes; returns how many.
async fn copy_failed(inner: &Inner, b: &BatchRecord, filter: &RetryFilter, blob_key: &str, w: &mut crate::blob::BlobWriter) -> Result<u64> {
    let mut cursor = ErrorCursor { inner, batch_id: &b.id, filter, after: 0, page: VecDeque::new(), done: false };
    let path: Arc<str> = b.endpoint.as_str().into();
    let src = Source { blob: &inner.blob, input_key: blob_key, format: b.input_format.unwrap_or(InputFormat::Full), batch_id: &b.id, path: &path };
    let mut input = inner.blob.get_stream(blob_key).await.ctx("reading the input file")?;
    let mut splitter = LineSplitter::new(usize::MAX, 1, 0);
    let (mut written, mut more) = (0, true);
    while more {
        let mut lines = Vec::new();
        let mut keep = |l: RawLine<'_>| {
            if !l.is_blank() {
                lines.push((l.no, Bytes::copy_from_slice(l.bytes)));
            }
        };
        match input.next().await {
            Some(chunk) => splitter.feed(&chunk.ctx("reading the input file")?, &mut keep),
            None => {
                splitter.finish(&mut keep);
                more = false;
            }
        }
        let mut out = String::new();
        for (no, line) in lines {
            let p = src.prepare_line(line, no);
            let Some((next, take)) = cursor.peek().await?.cloned() else {
                more = false;
                break;
            };
            if next != p.custom_id {
                continue;
            }
            if take {
                out += &full_line(&p.custom_id, &b.endpoint, &p.body);
                written += 1;
            }
            cursor.page.pop_front();
        }
        w.write(out.as_bytes()).await.ctx("writing the retry input")?;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(v: serde_json::Value) -> ErrorLine {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn the_filter_narrows_by_kind_and_status() {
        let http500 = line(serde_json::json!({"custom_id": "a", "response": {"status_code": 500, "body": {}}, "error": null}));
        let expired = line(serde_json::json!({"custom_id": "b", "response": null, "error": {"code": "batch_expired", "message": "x"}}));
        let down = line(serde_json::json!({"custom_id": "c", "response": null, "error": {"code": "upstream_unavailable", "message": "x"}}));
        let all = RetryFilter::default();
        assert!(all.takes(&http500) && all.takes(&expired) && all.takes(&down));
        let only_expired = RetryFilter { failed: false, cancelled: false, ..Default::default() };
        assert!(!only_expired.takes(&http500) && only_expired.takes(&expired) && !only_expired.takes(&down));
        let status = RetryFilter { status_codes: vec![429, 500], ..Default::default() };
        assert!(status.takes(&http500) && !status.takes(&expired) && !status.takes(&down));
        assert_eq!(
            full_line("x\"", "/v1/embeddings", br#"{"model":"m"}"#),
            "{\"custom_id\":\"x\\\"\",\"method\":\"POST\",\"url\":\"/v1/embeddings\",\"body\":{\"model\":\"m\"}}\n"
        );
    }
}
