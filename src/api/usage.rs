//! Usage and cost (extension): `GET /v1/usage?start_time=&end_time=&bucket_width=&group_by=model`
//! gives a tenant its tokens, requests and cost in time buckets, shaped like OpenAI's usage
//! API (`{"object": "page", "data": [{"object": "bucket", "start_time", "end_time",
//! "results": [...]}]}`); and [`batch_cost`] is the Batch object's `cost`.
//!
//! Cost uses `[prices."model"]` (`input_per_million`, `output_per_million`,
//! `batch_discount`), looked up by the model a line named, else by what its alias resolves
//! to. Usage without a price costs nothing and is left out of the sum; a cost is `null` when
//! no usage has a price.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::extract::Query;
use super::{AppState, Tenant};
use crate::config::Price;
use crate::error::{ApiError, ApiResult};
use crate::store::{BatchId, RemoteBatch, Usage, UsageRow};

/// The price of `model` (or of the model its alias names).
fn price_of(st: &AppState, model: &str) -> Option<Price> {
    if let Some(p) = st.cfg.prices.get(model) {
        return Some(*p);
    }
    let route = st.router.resolve(model)?;
    route.targets.iter().find_map(|(_, target)| st.cfg.prices.get(&**target).copied())
}

fn cost_of(st: &AppState, rows: &[&UsageRow]) -> Option<f64> {
    let costs: Vec<f64> = rows.iter().filter_map(|r| price_of(st, &r.model).map(|p| p.cost(r.usage.input_tokens, r.usage.output_tokens))).collect();
    (!costs.is_empty()).then(|| round6(costs.iter().sum()))
}

fn round6(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}

/// The remote batches of a batch at batch-kind upstreams (none configured: `None`, no read),
/// each with the tokens its results reported and its `cost` at the batch price; their costs
/// sum into the batch's.
pub async fn remote_batches(st: &AppState, batch_id: &BatchId) -> Option<Value> {
    if !st.router.pools().iter().any(|p| p.remote.is_some()) {
        return None;
    }
    let rows = match st.store.remote_batches(batch_id, None).await {
        Ok(rows) => rows,
        Err(e) => {
            tracing::warn!(batch = %batch_id, error = %crate::Chain(&e), "cannot read the batch's remote batches");
            return None;
        }
    };
    let list: Vec<Value> = rows
        .iter()
        .map(|r| {
            let cost = price_of(st, &r.model).map(|p| round6(row_cost(&p, r)));
            serde_json::json!({
                "id": r.remote_id, "upstream": r.upstream, "model": r.model, "state": r.state, "status": r.remote_status,
                "lines": r.line_count, "input_tokens": r.input_tokens, "output_tokens": r.output_tokens, "cost": cost,
            })
        })
        .collect();
    (!list.is_empty()).then_some(Value::Array(list))
}

/// A remote batch's cost: at the batch price, or at full price for lines its upstream's
/// `fallback` ran online.
fn row_cost(p: &Price, r: &RemoteBatch) -> f64 {
    if r.remote_status.as_deref() == Some(RemoteBatch::ONLINE_FALLBACK) {
        p.full_cost(r.input_tokens, r.output_tokens)
    } else {
        p.cost(r.input_tokens, r.output_tokens)
    }
}

/// What lines run online by a batch upstream's `fallback` cost above the batch price their
/// usage is counted at.
async fn fallback_surcharge(st: &AppState, batch_id: &BatchId) -> f64 {
    if !st.router.pools().iter().any(|p| p.cfg.remote.fallback.is_some()) {
        return 0.0;
    }
    let rows = st.store.remote_batches(batch_id, None).await.unwrap_or_default();
    rows.iter().filter(|r| r.remote_status.as_deref() == Some(RemoteBatch::ONLINE_FALLBACK)).map(|r| surcharge(st, r)).sum()
}

/// What the lines of a fallback record cost above the batch price (0 without a price).
fn surcharge(st: &AppState, r: &RemoteBatch) -> f64 {
    price_of(st, &r.model).map_or(0.0, |p| p.full_cost(r.input_tokens, r.output_tokens) - p.cost(r.input_tokens, r.output_tokens))
}

/// The `cost` of a batch so far; `None` when no price applies (or none is configured).
pub async fn batch_cost(st: &AppState, batch_id: &BatchId) -> Option<f64> {
    if st.cfg.prices.is_empty() {
        return None;
    }
    match st.store.batch_usage(batch_id).await {
        Ok(rows) => {
            let cost = cost_of(st, &rows.iter().collect::<Vec<_>>())?;
            Some(round6(cost + fallback_surcharge(st, batch_id).await))
        }
        Err(e) => {
            tracing::warn!(batch = %batch_id, error = %crate::Chain(&e), "cannot read usage per model for the cost");
            None
        }
    }
}

#[derive(Deserialize)]
pub struct UsageParams {
    start_time: Option<String>,
    end_time: Option<String>,
    bucket_width: Option<String>,
    group_by: Option<String>,
}

/// The latest time a query may name: the year 9999 (well past any usage, and far from the
/// ends of `i64`, so bucket arithmetic cannot overflow).
const MAX_TIME: i64 = 253_402_300_799;

fn time_param(v: Option<&str>, name: &str) -> ApiResult<Option<i64>> {
    let bad = || ApiError::invalid(name, format!("{name} must be unix seconds from 0 to {MAX_TIME}."));
    v.map(|s| s.trim().parse::<i64>().ok().filter(|t| (0..=MAX_TIME).contains(t)).ok_or_else(bad)).transpose()
}

pub async fn get(State(st): State<AppState>, Tenant(tenant): Tenant, Query(p): Query<UsageParams>) -> ApiResult<Json<Value>> {
    let start = time_param(p.start_time.as_deref(), "start_time")?.ok_or_else(|| ApiError::missing("start_time"))?;
    let end = time_param(p.end_time.as_deref(), "end_time")?.unwrap_or_else(|| crate::now_unix() + 1);
    if end <= start {
        return Err(ApiError::invalid("end_time", "end_time must be after start_time."));
    }
    let width = match p.bucket_width.as_deref() {
        None | Some("1d") => 86_400,
        Some("1h") => 3_600,
        Some(_) => return Err(ApiError::invalid("bucket_width", "bucket_width must be 1h or 1d.")),
    };
    let by_model = match p.group_by.as_deref().map(str::trim) {
        None | Some("") => false,
        Some("model") => true,
        Some(_) => return Err(ApiError::invalid("group_by", "group_by supports only model.")),
    };
    // Hours overlapping [start, end): the store keeps usage per hour.
    let from = start - start.rem_euclid(3_600);
    let rows = st.store.usage(&tenant, from, end).await?;
    let bucket_of = |hour: i64| start + (hour.max(start) - start) / width * width;
    let mut buckets: BTreeMap<i64, BTreeMap<Option<&str>, Vec<&UsageRow>>> = BTreeMap::new();
    for r in &rows {
        buckets.entry(bucket_of(r.hour)).or_default().entry(by_model.then_some(r.model.as_str())).or_default().push(r);
    }
    let fallbacks =
        if st.router.pools().iter().any(|p| p.cfg.remote.fallback.is_some()) { st.store.fallback_usage(&tenant, from, end).await? } else { Vec::new() };
    let mut surcharges: BTreeMap<(i64, Option<&str>), f64> = BTreeMap::new();
    for r in &fallbacks {
        let hour = r.created_at - r.created_at.rem_euclid(3_600);
        *surcharges.entry((bucket_of(hour), by_model.then_some(r.model.as_str()))).or_default() += surcharge(&st, r);
    }
    let data: Vec<Value> = buckets
        .iter()
        .map(|(b, groups)| {
            let results: Vec<Value> =
                groups.iter().map(|(model, rows)| result(&st, *model, rows, surcharges.get(&(*b, *model)).copied().unwrap_or(0.0))).collect();
            json!({"object": "bucket", "start_time": b, "end_time": (b + width).min(end), "results": results})
        })
        .collect();
    let all: Vec<&UsageRow> = rows.iter().collect();
    let total = result(&st, None, &all, surcharges.values().sum());
    Ok(Json(json!({"object": "page", "data": data, "has_more": false, "next_page": null, "total": total})))
}

/// One result: sums of `rows`, OpenAI's usage field names, and their cost (with `surcharge`,
/// what lines run at a fallback cost above the batch price).
fn result(st: &AppState, model: Option<&str>, rows: &[&UsageRow], surcharge: f64) -> Value {
    let mut u = Usage::default();
    let mut requests = 0i64;
    for r in rows {
        u.add(&r.usage);
        requests = requests.saturating_add(r.requests);
    }
    json!({
        "object": "usage.result",
        "model": model,
        "input_tokens": u.input_tokens,
        "input_cached_tokens": u.cached_tokens,
        "output_tokens": u.output_tokens,
        "output_reasoning_tokens": u.reasoning_tokens,
        "total_tokens": u.total_tokens,
        "num_model_requests": requests,
        "cost": cost_of(st, rows).map(|c| round6(c + surcharge)),
    })
}
