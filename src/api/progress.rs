//! `GET /v1/batches/{id}/progress` (extension): what a batch is doing right now.
//!
//! Durable counts come from the batch row; lines in flight and waiting on retries from every
//! live node (their heartbeats, this node's own book); rates from the last minute of
//! `batch.progress` events; the stall state as `engine::rates` derives it, with the engine's
//! guess of the reason. Any node answers the same for the durable parts.

use axum::extract::{Path, State};
use axum::Json;
use serde_json::{json, Value};

use super::{AppState, Tenant};
use crate::engine::rates::{self, batch_rates, stalled_since, Rates};
use crate::engine::LineCounts;
use crate::engine::Progress;
use crate::error::ApiResult;
use crate::store::{BatchId, BatchRecord, EventFilter};
use crate::upstream::Router;

pub async fn progress(State(st): State<AppState>, Tenant(tenant): Tenant, Path(id): Path<BatchId>) -> ApiResult<Json<Value>> {
    let b = st.tenant_batch(&tenant, &id).await?;
    let filter = EventFilter { tenant: Some(tenant), batch_id: Some(id) };
    let events = st.store.latest_events(&filter, Some("batch.progress"), rates::EVENTS_PER_WINDOW).await?;
    Ok(Json(render(&st, &b, &events)))
}

/// The progress object (see PLAN.md for its shape).
pub fn render(st: &AppState, b: &BatchRecord, events: &[crate::store::Event]) -> Value {
    let now = crate::now_unix_f64();
    let e = estimate(st, b, events, now);
    let live = if b.status.is_final() { LineCounts::default() } else { st.engine.live_counts(&b.id) };
    let remaining = (b.total - b.completed.saturating_add(b.failed)).max(0);
    let (retrying, in_flight) = ((live.retrying as i64).min(remaining), (live.in_flight as i64).min(remaining));
    let stalled = e.stalled_since.map(|since| json!({"since": since as i64, "reason": st.engine.stall_reason(b, live, now - since)}));
    json!({
        "object": "batch.progress",
        "id": b.id,
        "status": b.status.as_str(),
        "counts": {
            "total": b.total,
            "succeeded": b.completed,
            "failed": b.failed,
            "retrying": retrying,
            "in_flight": in_flight,
            "pending": (remaining - retrying - in_flight).max(0),
        },
        "requests_per_second": e.rates.requests_per_second,
        "tokens_per_second": e.rates.tokens_per_second,
        "eta_seconds": e.progress.eta_seconds,
        "seconds_since_last_result": e.rates.last_result_at.map(|t| rates::round1((now - t).max(0.0))),
        "at_risk": e.progress.at_risk,
        "projected_finish_at": e.progress.projected_finish_at,
        "upstreams": upstream_states(&st.router, b.model.as_deref()),
        "stalled": stalled,
    })
}

/// The Batch object's `progress` extension as the whole cluster makes it: from the outbox,
/// the same figures `/progress` gives on any node (used when other nodes are live; alone, a
/// node's own record of its commits says the same at no cost).
pub async fn cluster_progress(st: &AppState, b: &BatchRecord) -> Option<Progress> {
    let filter = EventFilter { tenant: Some(b.tenant.clone()), batch_id: Some(b.id.clone()) };
    let events = st.store.latest_events(&filter, Some("batch.progress"), rates::EVENTS_PER_WINDOW).await.ok()?;
    Some(estimate(st, b, &events, crate::now_unix_f64()).progress)
}

/// What the last minute's progress events tell about a batch at `now`.
struct Estimate {
    rates: Rates,
    stalled_since: Option<f64>,
    progress: Progress,
}

fn estimate(st: &AppState, b: &BatchRecord, events: &[crate::store::Event], now: f64) -> Estimate {
    let r = st.engine.refine(&b.id, batch_rates(b, events, now));
    let remaining = (b.total - b.completed.saturating_add(b.failed)).max(0);
    let stall_after = st.cfg.stall_after.as_secs_f64();
    let stalled_since = stalled_since(b, &r, now, stall_after);
    // No ETA while stalled: the last minute's rate no longer tells when it ends.
    let moving = r.requests_per_second > 0.0 && !b.status.is_final() && stalled_since.is_none();
    let eta = moving.then(|| (remaining as f64 / r.requests_per_second).ceil() as u64);
    let projected = eta.map(|e| now as i64 + e as i64);
    // At risk: at the current rate it ends after it expires, or it is stalled within ten
    // stall periods of its expiry.
    let at_risk = !b.status.is_final()
        && remaining > 0
        && b.expires_at.is_some_and(|exp| projected.is_some_and(|p| p > exp) || (stalled_since.is_some() && (exp as f64 - now) < 10.0 * stall_after));
    let progress = Progress { requests_per_second: r.requests_per_second, eta_seconds: eta, projected_finish_at: projected, at_risk };
    Estimate { rates: r, stalled_since, progress }
}

/// The upstreams serving `model` (every upstream when the batch mixes models), as their
/// limiters see them now: window, limit, in flight, pause and why, last error.
pub fn upstream_states(router: &Router, model: Option<&str>) -> Value {
    serde_json::to_value(router.states_for(model)).unwrap_or_default()
}
