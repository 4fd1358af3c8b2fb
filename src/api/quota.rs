//! Queue quotas (extension): per tenant `max_queued_requests` and `max_queued_tokens` bound
//! the lines without a result (and their estimated input tokens) of its batches still
//! validating or running. `GET /v1/quota` shows the limits, what is queued now, the
//! tenant's current rate and when room is expected at it; a create that would go over a
//! limit is refused at once with 429 `quota_exceeded`, saying what is queued against which
//! limit, with `retry-after`.
//!
//! The check and the insert are one store transaction, serialised per tenant (see
//! [`crate::store::Batches::admit_batch`]), and a batch still validating holds the lines
//! counted in its input at create: two creates, however close, cannot together go over a
//! limit.

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use super::{AppState, Tenant};
use crate::engine::rates::{point_of, rate_of, round1, WINDOW_S};
use crate::error::{ApiError, ApiResult};
use crate::store::{Admission, BatchRecord, EventFilter, QueueLimit, QueueLimits, Queued};

/// Progress events read for a tenant's rate (all its running batches, the last minute).
const TENANT_EVENTS: u32 = 1_000;
/// `retry-after` when no rate tells when room comes.
const UNKNOWN_WAIT_S: u64 = 60;

/// The tenant's results and tokens per second over the last minute, summed over its batches.
async fn tenant_rate(st: &AppState, tenant: &str) -> ApiResult<(f64, f64)> {
    let filter = EventFilter { tenant: Some(tenant.into()), batch_id: None };
    let events = st.store.latest_events(&filter, Some("batch.progress"), TENANT_EVENTS).await?;
    let now = crate::now_unix_f64();
    let mut per_batch: std::collections::BTreeMap<&str, Vec<_>> = Default::default();
    for e in events.iter().rev() {
        if let Some(p) = point_of(e) {
            per_batch.entry(e.batch_id.as_str()).or_default().push(p);
        }
    }
    let (mut rps, mut tps) = (0.0, 0.0);
    for points in per_batch.values().filter(|p| p.last().is_some_and(|l| l.at >= now - WINDOW_S)) {
        let (r, t) = rate_of(points, now);
        (rps, tps) = (rps + r, tps + t);
    }
    Ok((round1(rps), round1(tps)))
}

/// Seconds until `queued + adding` fits under `limit` at `rate` per second (0: fits now).
fn wait_for_room(queued: i64, adding: i64, limit: Option<u64>, rate: f64) -> Option<f64> {
    let limit = limit? as i64;
    let over = queued.saturating_add(adding) - limit;
    match over {
        i64::MIN..=0 => Some(0.0),
        _ if rate > 0.0 => Some((over as f64 / rate).ceil()),
        _ => None,
    }
}

/// Inserts a new batch (`record.est_requests`: its counted lines, see [`lines_of`]) unless
/// the tenant's queue would go over one of its limits with it: then nothing is inserted and
/// the answer is a 429 `quota_exceeded` saying what is queued against which limit.
pub async fn admit(st: &AppState, record: &BatchRecord, idempotency_key: Option<&str>) -> ApiResult<BatchRecord> {
    let tenant = record.tenant.as_str();
    let t = st.cfg.tenants.get(tenant);
    let limits = QueueLimits { max_requests: t.and_then(|t| t.max_queued_requests), max_tokens: t.and_then(|t| t.max_queued_tokens) };
    let (q, requests, tokens) = match st.store.admit_batch(record, idempotency_key, limits).await? {
        Admission::Admitted(b) => return Ok(*b),
        Admission::OverQuota { queued, requests, tokens } => (queued, requests, tokens),
    };
    let Some(over) = q.over(&limits, requests, tokens) else {
        return Err(ApiError::internal("the store refused a batch over a quota none of whose limits it is over"));
    };
    let (rps, tps) = tenant_rate(st, tenant).await?;
    let (name, what, queued, adding, limit, rate) = match over {
        QueueLimit::Requests => ("max_queued_requests", "requests", q.requests, requests, limits.max_requests, rps),
        QueueLimit::Tokens => ("max_queued_tokens", "estimated input tokens", q.tokens, tokens, limits.max_tokens, tps),
    };
    let wait = wait_for_room(queued, adding, limit, rate);
    let when = match wait {
        Some(w) => format!("at the current rate ({rate} per second) room is expected in about {w:.0} s"),
        None => "nothing of it is finishing right now, so no time for room can be told".into(),
    };
    let msg = format!(
        "Quota exceeded: tenant {tenant:?} has {queued} {what} queued, and this batch adds about {adding}, against {name} = {}; {when}. \
         See GET /v1/quota.",
        limit.unwrap_or(0)
    );
    Err(ApiError::quota_exceeded(msg, wait.map_or(UNKNOWN_WAIT_S, |w| w.max(1.0) as u64)))
}

/// About how many lines a new input file has (its newlines, read as a stream), when the
/// tenant has a `max_queued_requests` to check it against; 0 otherwise.
pub async fn lines_of(st: &AppState, tenant: &str, file: &crate::store::FileRecord) -> ApiResult<i64> {
    use futures::StreamExt;
    if st.cfg.tenants.get(tenant).is_none_or(|t| t.max_queued_requests.is_none()) {
        return Ok(0);
    }
    let mut stream = st.blob.get_stream(&file.blob_key).await?;
    let (mut lines, mut last) = (0i64, b'\n');
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        lines += memchr::memchr_iter(b'\n', &chunk).count() as i64;
        last = chunk.last().copied().unwrap_or(last);
    }
    Ok(lines + i64::from(last != b'\n'))
}

pub async fn get(State(st): State<AppState>, Tenant(tenant): Tenant) -> ApiResult<Json<Value>> {
    let q: Queued = st.store.queued(Some(&tenant)).await?;
    let (rps, tps) = tenant_rate(&st, &tenant).await?;
    let t = st.cfg.tenants.get(&tenant).cloned().unwrap_or_default();
    // Room for one more line once every configured limit has room; unknown while a limit
    // is reached and nothing finishes.
    let limits = [(q.requests, t.max_queued_requests, rps), (q.tokens, t.max_queued_tokens, tps)];
    let wait = limits.iter().filter(|(_, l, _)| l.is_some()).map(|(q, l, r)| wait_for_room(*q, 1, *l, *r)).try_fold(0.0f64, |a, w| w.map(|w| a.max(w)));
    let now = crate::now_unix();
    let room = |queued: i64, limit: Option<u64>| limit.map(|l| (l as i64 - queued).max(0));
    Ok(Json(json!({
        "object": "quota",
        "tenant": tenant,
        "limits": {"max_queued_requests": t.max_queued_requests, "max_queued_tokens": t.max_queued_tokens},
        "queued": {"batches": q.batches, "requests": q.requests, "tokens": q.tokens},
        "room": {"requests": room(q.requests, t.max_queued_requests), "tokens": room(q.tokens, t.max_queued_tokens)},
        "rate": {"requests_per_second": rps, "tokens_per_second": tps},
        "seconds_until_room": wait,
        "room_expected_at": wait.map(|w| now + w as i64),
        "remote_upstreams": remote_queues(&st.router),
    })))
}

/// Each batch-kind upstream's enqueued tokens as this node knows them: what its open remote
/// batches hold, the limit learned from a `token_limit_exceeded` (`null` until one), and the
/// room left under it.
fn remote_queues(router: &crate::upstream::Router) -> Vec<Value> {
    router
        .pools()
        .iter()
        .filter_map(|p| p.remote.as_ref().map(|r| (p, r.queue.state())))
        .map(|(p, q)| {
            json!({
                "upstream": p.cfg.name,
                "kind": p.cfg.kind.as_str(),
                "queued_tokens": q.enqueued,
                "learned_limit": q.limit,
                "room": q.limit.map(|l| l.saturating_sub(q.enqueued)),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_comes_at_the_current_rate() {
        assert_eq!(wait_for_room(90, 5, Some(100), 0.0), Some(0.0), "fits now");
        assert_eq!(wait_for_room(100, 10, Some(100), 2.0), Some(5.0));
        assert_eq!(wait_for_room(100, 10, Some(100), 0.0), None, "no rate: unknown");
        assert_eq!(wait_for_room(100, 10, None, 0.0), None, "no limit");
    }
}
