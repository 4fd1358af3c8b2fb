//! `batchd status --watch`: follows a batch through its event stream
//! (`GET /v1/batches/{id}/events`) instead of polling, reading `/progress` when an event
//! arrives (at most once a second) for rates, ETA and stalls. A stream that ends (at its
//! lifetime, a restart) or drops is resumed with `Last-Event-ID`, one refused for too many
//! streams after its `Retry-After`; a server without the stream (an older batchd) is polled
//! instead.

use std::time::{Duration, Instant};

use anyhow::bail;
use futures::StreamExt;
use serde_json::Value;

use super::connection::{Client, FINAL};
use super::progress::{Display, Snapshot};

/// One server-sent event.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct SseEvent {
    pub event: String,
    pub id: Option<String>,
    pub data: String,
}

/// Splits a text/event-stream into events (comments and keep-alives are dropped).
#[derive(Default)]
pub struct SseParser {
    buf: String,
    cur: SseEvent,
}

impl SseParser {
    pub fn feed(&mut self, chunk: &str, out: &mut Vec<SseEvent>) {
        self.buf.push_str(chunk);
        while let Some(i) = self.buf.find('\n') {
            let line: String = self.buf.drain(..=i).collect();
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if !self.cur.data.is_empty() || !self.cur.event.is_empty() {
                    out.push(std::mem::take(&mut self.cur));
                }
                continue;
            }
            let (field, value) = line.split_once(':').map_or((line, ""), |(f, v)| (f, v.strip_prefix(' ').unwrap_or(v)));
            match field {
                "event" => self.cur.event = value.to_string(),
                "id" => self.cur.id = Some(value.to_string()),
                "data" if self.cur.data.is_empty() => self.cur.data = value.to_string(),
                "data" => {
                    self.cur.data.push('\n');
                    self.cur.data.push_str(value);
                }
                _ => {}
            }
        }
    }
}

/// Reads `/progress` into the snapshot: rates, ETA, retries, the stall reason.
async fn add_progress(c: &Client, id: &str, s: &mut Snapshot) {
    let Ok(r) = c.send(c.req(reqwest::Method::GET, &format!("/batches/{id}/progress"))).await else { return };
    let Ok(p) = r.json::<Value>().await else { return };
    s.requests_per_second = p["requests_per_second"].as_f64().unwrap_or(0.0);
    s.tokens_per_second = p["tokens_per_second"].as_f64().unwrap_or(0.0);
    s.eta_seconds = p["eta_seconds"].as_u64();
    s.retries_waiting = p["counts"]["retrying"].as_u64().unwrap_or(0);
    s.note = p["stalled"]["reason"].as_str().map(|r| format!("STALLED: {r}"));
    s.paused = super::progress::paused_list(&p["upstreams"]);
}

fn apply(s: &mut Snapshot, e: &SseEvent) {
    let Ok(v) = serde_json::from_str::<Value>(&e.data) else { return };
    let d = &v["data"];
    if let Some(st) = d["status"].as_str() {
        s.status = st.to_string();
    }
    let rc = &d["request_counts"];
    if let (Some(t), Some(c), Some(f)) = (rc["total"].as_u64(), rc["completed"].as_u64(), rc["failed"].as_u64()) {
        (s.total, s.completed, s.failed) = (t, c, f);
    }
    if e.event == "batch.stalled" {
        s.note = d["reason"].as_str().map(|r| format!("STALLED: {r}"));
    }
}

/// Follows the batch until it ends; returns its final Batch object, or `None` when the
/// server has no event stream (the caller polls instead).
pub async fn follow(c: &Client, id: &str, display: &mut Display, mut s: Snapshot) -> anyhow::Result<Option<Value>> {
    let mut last_id: Option<String> = None;
    let mut last_progress = Instant::now() - Duration::from_secs(10);
    let mut failures = 0;
    loop {
        let mut req = c.req(reqwest::Method::GET, &format!("/batches/{id}/events")).header("accept", "text/event-stream");
        if let Some(l) = &last_id {
            req = req.header("last-event-id", l);
        }
        let resp = match req.send().await {
            Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND && last_id.is_none() => {
                let body: Value = r.json().await.unwrap_or_default();
                if body["error"]["message"].as_str().is_some_and(|m| m.starts_with("Unknown request URL")) {
                    return Ok(None);
                }
                bail!("server answered 404: {}", body["error"]["message"].as_str().unwrap_or("(no message)"));
            }
            Ok(r) if r.status().is_success() => r,
            // Too many streams open (the tenant's or the server's): wait as told, then resume.
            Ok(r) if matches!(r.status().as_u16(), 429 | 503) && failures < 30 => {
                failures += 1;
                let wait = r.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok()).unwrap_or(1);
                tokio::time::sleep(Duration::from_secs(wait.clamp(1, 10))).await;
                continue;
            }
            Ok(r) => bail!("server answered {} to the event stream", r.status()),
            Err(e) if failures < 30 => {
                failures += 1;
                tracing::debug!(error = %e, "event stream lost; reconnecting");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        failures = 0;
        let mut parser = SseParser::default();
        let mut body = resp.bytes_stream();
        loop {
            // No event for a second: redraw anyway (a pause's countdown moves), with fresh
            // rates and pauses once a second.
            let chunk = match tokio::time::timeout(Duration::from_secs(1), body.next()).await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break,
                Err(_) => {
                    if last_progress.elapsed() >= Duration::from_secs(1) {
                        last_progress = Instant::now();
                        add_progress(c, id, &mut s).await;
                    }
                    display.update(&s);
                    continue;
                }
            };
            let Ok(chunk) = chunk else { break };
            let mut events = Vec::new();
            parser.feed(&String::from_utf8_lossy(&chunk), &mut events);
            for e in events {
                last_id = e.id.clone().or(last_id);
                apply(&mut s, &e);
                if FINAL.contains(&s.status.as_str()) {
                    return Ok(Some(c.json(c.req(reqwest::Method::GET, &format!("/batches/{id}"))).await?));
                }
                if last_progress.elapsed() >= Duration::from_secs(1) || e.event == "batch.stalled" {
                    last_progress = Instant::now();
                    add_progress(c, id, &mut s).await;
                }
                display.update(&s);
            }
        }
        // The stream ended without the final event (its lifetime, a restart, a proxy):
        // resume after the last event it sent (its `stream.reconnect` names it).
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_chunks_and_comments_are_dropped() {
        let mut p = SseParser::default();
        let mut out = vec![];
        p.feed(": keep-alive\n\nevent: batch.progress\nid: 4", &mut out);
        assert!(out.is_empty());
        p.feed("2\ndata: {\"a\":1}\n\nevent: batch.status\r\ndata: x\r\ndata: y\r\n\r\n", &mut out);
        assert_eq!(out[0], SseEvent { event: "batch.progress".into(), id: Some("42".into()), data: "{\"a\":1}".into() });
        assert_eq!(out[1].data, "x\ny");
    }
}
