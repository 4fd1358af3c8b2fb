//! Server-sent events (extension): `GET /v1/batches/{id}/events` (one batch) and
//! `GET /v1/events` (every batch of the tenant).
//!
//! Events are read from the store's outbox — durable and the same on every node — after a
//! cursor: the `Last-Event-ID` header of a reconnect (or `?after=`), so a client that
//! reconnects misses nothing. Without one, a batch's stream starts with its history (its
//! status and stall events, and only its newest progress event) and the tenant's stream
//! starts now. A reader is woken when this node appends (the engine's outbox tick) and polls
//! every [`POLL`] for what other nodes append. Each event is
//!
//! ```text
//! event: batch.progress
//! id: 42
//! data: {"id":"evt_…","type":"batch.progress","created_at":…,"batch_id":"batch_…","data":{…}}
//! ```
//!
//! A batch's stream ends after its final `batch.status` event; every stream ends when the
//! server shuts down, and after `stream_lifetime_s` (give or take a tenth, so that a crowd of
//! clients does not come back at once) with a last event that names where to resume:
//!
//! ```text
//! event: stream.reconnect
//! id: 42
//! data: {"object":"stream.reconnect","after":42,"message":"…"}
//! ```
//!
//! A client reconnects with that id as `Last-Event-ID` and misses nothing. Streams are
//! counted per tenant and in all ([`super::stream_slots`]). A comment line keeps a quiet
//! stream alive, a third of the idle timeout apart (at most 15 s), so the idle timeout never
//! closes a stream that is still read.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures::Stream;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::extract::Query;
use super::stream_slots::StreamSlot;
use super::{AppState, Tenant};
use crate::error::{ApiError, ApiResult};
use crate::store::{BatchId, BatchStatus, Event, EventFilter, Store};

pub const POLL: Duration = Duration::from_millis(500);
const PAGE: u32 = 500;
/// The type of the last event of a stream that reached its lifetime.
pub const RECONNECT: &str = "stream.reconnect";

#[derive(Deserialize)]
pub struct StreamParams {
    after: Option<String>,
}

/// The cursor a client resumes from: `Last-Event-ID`, else `?after=`.
fn cursor(headers: &HeaderMap, p: &StreamParams) -> ApiResult<Option<i64>> {
    let raw = headers.get("last-event-id").and_then(|v| v.to_str().ok()).map(str::to_owned).or_else(|| p.after.clone());
    match raw.as_deref().map(str::trim) {
        None | Some("") => Ok(None),
        Some(s) => s.parse::<i64>().map(Some).map_err(|_| ApiError::invalid("after", "Last-Event-ID (or after) must be the id of an event.")),
    }
}

pub async fn batch_events(
    State(st): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<BatchId>,
    headers: HeaderMap,
    Query(p): Query<StreamParams>,
) -> ApiResult<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>> {
    let after = cursor(&headers, &p)?;
    let b = st.tenant_batch(&tenant, &id).await?;
    let slot = st.streams.take(&tenant)?;
    let filter = EventFilter { tenant: Some(tenant), batch_id: Some(id) };
    // Without a cursor: the batch's whole history, but of its progress only the newest.
    let newest_progress = match after {
        Some(_) => 0,
        None => st.store.latest_events(&filter, Some("batch.progress"), 1).await?.first().map_or(0, |e| e.id),
    };
    let mut reader = Reader::new(&st, filter, after.unwrap_or(0), true, slot);
    reader.skip_progress_before = newest_progress;
    if b.status.is_final() {
        // A client that has seen the final event gets an empty stream that ends at once.
        let last = st.store.latest_events(&reader.filter, Some("batch.status"), 1).await?;
        reader.done = last.first().is_none_or(|e| e.id <= reader.cursor);
    }
    Ok(sse(reader, st.cfg.http.keep_alive()))
}

pub async fn tenant_events(
    State(st): State<AppState>,
    Tenant(tenant): Tenant,
    headers: HeaderMap,
    Query(p): Query<StreamParams>,
) -> ApiResult<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>> {
    let cursor = cursor(&headers, &p)?;
    let slot = st.streams.take(&tenant)?;
    let filter = EventFilter { tenant: Some(tenant), batch_id: None };
    let after = match cursor {
        Some(a) => a,
        None => st.store.latest_events(&filter, None, 1).await?.first().map_or(0, |e| e.id),
    };
    Ok(sse(Reader::new(&st, filter, after, false, slot), st.cfg.http.keep_alive()))
}

fn sse(reader: Reader, keep_alive: Duration) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let stream = futures::stream::unfold(reader, |mut r| async move { r.next().await.map(|e| (Ok(e), r)) });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(keep_alive).text("keep-alive"))
}

/// When a stream opened now ends: its lifetime, less up to a tenth.
fn end_of_life(lifetime: Duration) -> tokio::time::Instant {
    tokio::time::Instant::now() + lifetime.mul_f64(rand::random_range(0.9..=1.0))
}

/// Follows the outbox after a cursor.
struct Reader {
    store: std::sync::Arc<dyn Store>,
    filter: EventFilter,
    cursor: i64,
    buf: VecDeque<Event>,
    /// One batch's stream: ends after its final status.
    one_batch: bool,
    skip_progress_before: i64,
    done: bool,
    tick: tokio::sync::watch::Receiver<u64>,
    stop: CancellationToken,
    /// When the stream ends and tells where to resume.
    end_of_life: tokio::time::Instant,
    /// Held for as long as the stream lives.
    _slot: StreamSlot,
}

impl Reader {
    fn new(st: &AppState, filter: EventFilter, cursor: i64, one_batch: bool, slot: StreamSlot) -> Reader {
        Reader {
            store: st.store.clone(),
            filter,
            cursor,
            buf: VecDeque::new(),
            one_batch,
            skip_progress_before: 0,
            done: false,
            tick: st.engine.outbox_watch(),
            stop: st.engine.streams_stop(),
            end_of_life: end_of_life(st.streams.limits().lifetime),
            _slot: slot,
        }
    }

    /// The next event to send; `None` ends the stream.
    async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if self.done || self.stop.is_cancelled() {
                return None;
            }
            if tokio::time::Instant::now() >= self.end_of_life {
                self.done = true;
                return Some(reconnect(self.cursor));
            }
            if let Some(e) = self.buf.pop_front() {
                self.cursor = e.id;
                if e.kind == "batch.progress" && e.id < self.skip_progress_before {
                    continue;
                }
                if self.one_batch && is_final_status(&e) {
                    self.done = true;
                    self.buf.clear();
                }
                return Some(render(&e));
            }
            if self.done {
                return None;
            }
            match self.store.events_after(&self.filter, self.cursor, PAGE).await {
                Ok(evs) if !evs.is_empty() => {
                    self.buf.extend(evs);
                    continue;
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "reading the outbox for a stream failed; trying again"),
            }
            tokio::select! {
                _ = self.tick.changed() => {}
                _ = tokio::time::sleep(POLL) => {}
                _ = tokio::time::sleep_until(self.end_of_life) => {}
                _ = self.stop.cancelled() => return None,
            }
        }
    }
}

fn is_final_status(e: &Event) -> bool {
    e.kind == "batch.status"
        && serde_json::from_str::<Value>(&e.data).ok().and_then(|v| v["status"].as_str().and_then(BatchStatus::parse)).is_some_and(BatchStatus::is_final)
}

/// The JSON of one event, as streamed (and as the console reads it).
pub fn event_json(e: &Event) -> Value {
    json!({
        "id": crate::ids::event_id(&e.batch_id, e.id),
        "type": e.kind,
        "created_at": e.created_at,
        "batch_id": e.batch_id,
        "data": serde_json::from_str::<Value>(&e.data).unwrap_or(Value::Null),
    })
}

/// The last event of a stream that reached its lifetime: where to resume.
fn reconnect(after: i64) -> SseEvent {
    let message = "The stream reached its lifetime (stream_lifetime_s); reconnect with this event's id as Last-Event-ID.";
    let data = json!({"object": RECONNECT, "after": after, "message": message});
    SseEvent::default().event(RECONNECT).id(after.to_string()).data(data.to_string())
}

fn render(e: &Event) -> SseEvent {
    SseEvent::default().event(&e.kind).id(e.id.to_string()).data(event_json(e).to_string())
}
