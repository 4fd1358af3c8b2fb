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
//! server shuts down. A comment line keeps idle connections alive.

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
use super::{AppState, Tenant};
use crate::error::{ApiError, ApiResult};
use crate::store::{BatchStatus, Event, EventFilter, Store};

pub const POLL: Duration = Duration::from_millis(500);
const KEEP_ALIVE: Duration = Duration::from_secs(15);
const PAGE: u32 = 500;

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
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(p): Query<StreamParams>,
) -> ApiResult<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>> {
    let after = cursor(&headers, &p)?;
    let b = st.tenant_batch(&tenant, &id).await?;
    let filter = EventFilter { tenant: Some(tenant), batch_id: Some(id) };
    // Without a cursor: the batch's whole history, but of its progress only the newest.
    let newest_progress = match after {
        Some(_) => 0,
        None => st.store.latest_events(&filter, Some("batch.progress"), 1).await?.first().map_or(0, |e| e.id),
    };
    let mut reader = Reader::new(&st, filter, after.unwrap_or(0), true);
    reader.skip_progress_before = newest_progress;
    if b.status.is_final() {
        // A client that has seen the final event gets an empty stream that ends at once.
        let last = st.store.latest_events(&reader.filter, Some("batch.status"), 1).await?;
        reader.done = last.first().is_none_or(|e| e.id <= reader.cursor);
    }
    Ok(sse(reader))
}

pub async fn tenant_events(
    State(st): State<AppState>,
    Tenant(tenant): Tenant,
    headers: HeaderMap,
    Query(p): Query<StreamParams>,
) -> ApiResult<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>> {
    let filter = EventFilter { tenant: Some(tenant), batch_id: None };
    let after = match cursor(&headers, &p)? {
        Some(a) => a,
        None => st.store.latest_events(&filter, None, 1).await?.first().map_or(0, |e| e.id),
    };
    Ok(sse(Reader::new(&st, filter, after, false)))
}

fn sse(reader: Reader) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let stream = futures::stream::unfold(reader, |mut r| async move { r.next().await.map(|e| (Ok(e), r)) });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE).text("keep-alive"))
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
}

impl Reader {
    fn new(st: &AppState, filter: EventFilter, cursor: i64, one_batch: bool) -> Reader {
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
        }
    }

    /// The next event to send; `None` ends the stream.
    async fn next(&mut self) -> Option<SseEvent> {
        loop {
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
            if self.done || self.stop.is_cancelled() {
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

fn render(e: &Event) -> SseEvent {
    SseEvent::default().event(&e.kind).id(e.id.to_string()).data(event_json(e).to_string())
}
