//! Stalls: a running batch with lines left and no new result for `[batches] stall_after_s`.
//!
//! Whether a batch is stalled is derived from the store (its last `batch.progress` event, see
//! [`super::rates`]), so any node answers the same. *Why* it is stalled is this node's best
//! guess in words ([`reason`]): the store cannot write, every upstream serving it is rate
//! limited or unreachable, every line left is waiting on a retry, or requests hang.
//!
//! The watcher task looks at the running batches every quarter of `stall_after` (within
//! 0.5–15 s; two small reads per running batch) and appends one `batch.stalled` event when a
//! batch stalls (`"stalled": true`, with `since` and `reason`) and one when it moves again
//! (`"stalled": false`). Before appending it reads the batch's last `batch.stalled` event, so
//! a restart or a second node does not tell the same stall twice.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::rates::{batch_rates, stalled_since};
use super::{Engine, Inner, LineCounts};
use crate::metrics::UpstreamRecent;
use crate::store::{BatchId, BatchRecord, BatchStatus, EventFilter};
use crate::upstream::PauseReason;

/// What the reason is guessed from.
pub struct Clues {
    pub store_writable: bool,
    /// Pauses of the upstreams serving the batch: why, and in words ("rate limited by
    /// local-vllm, 2 s"); `None` for one that is not paused.
    pub pauses: Vec<Option<(PauseReason, String)>>,
    /// The upstreams serving the batch, with this node's view of their recent outcomes.
    pub upstreams: Vec<(String, UpstreamRecent)>,
    /// Lines in flight and waiting on retries, on every node.
    pub counts: LineCounts,
    pub stalled_for: f64,
    /// What the start-up look at the upstreams serving the batch found wrong ("upstream X:
    /// GET …/models answered 404 …").
    pub warnings: Vec<String>,
}

/// The most likely reason a batch does not move, in words, with what the start-up look at
/// its upstreams found wrong.
pub fn reason(c: &Clues) -> String {
    let r = likeliest(c);
    if c.warnings.is_empty() {
        return r;
    }
    format!("{r}; {}", c.warnings.join("; "))
}

fn likeliest(c: &Clues) -> String {
    if !c.store_writable {
        return "the store cannot take writes (disk full or database unreachable); upstream calls are held until it can".into();
    }
    // Paused by its own state (rate limits, overload, quota): an unreachable one is told
    // below, with the connection error.
    let paused: Vec<&(PauseReason, String)> = c.pauses.iter().flatten().collect();
    if !c.pauses.is_empty() && paused.len() == c.pauses.len() && paused.iter().all(|(r, _)| *r != PauseReason::Unreachable) {
        let all: Vec<&str> = paused.iter().map(|(_, w)| w.as_str()).collect();
        return format!("every upstream serving the batch is paused: {}", all.join("; "));
    }
    let failing: Vec<&(String, UpstreamRecent)> = c.upstreams.iter().filter(|(_, r)| r.failing()).collect();
    if !c.upstreams.is_empty() && failing.len() == c.upstreams.len() {
        let names = |v: &[&(String, UpstreamRecent)]| v.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ");
        let last = |r: &UpstreamRecent| r.last_error.as_ref().map(|e| e.1.clone()).unwrap_or_default();
        if failing.iter().all(|(_, r)| r.last_rate_limited) {
            return format!("every upstream serving the batch is rate limited (429): {}", names(&failing));
        }
        if failing.iter().all(|(_, r)| r.last_unreachable) {
            let detail: Vec<String> = failing.iter().map(|(n, r)| format!("{n} ({})", last(r))).collect();
            return format!("upstream unreachable: {}", detail.join("; "));
        }
        let detail: Vec<String> = failing.iter().map(|(n, r)| format!("{n}: {}", last(r))).collect();
        return format!("every upstream serving the batch is failing: {}", detail.join("; "));
    }
    let LineCounts { in_flight, retrying } = c.counts;
    if retrying > 0 && in_flight == 0 {
        return format!("all {retrying} lines in progress are waiting on retries");
    }
    if in_flight > 0 {
        return format!("{in_flight} requests in flight, none answered for {:.0} s (the upstream is slow or not answering)", c.stalled_for);
    }
    "no node is working on the batch (no line in flight or waiting on a retry)".into()
}

impl Engine {
    /// The likely reason `b` is stalled (see [`reason`]).
    pub fn stall_reason(&self, b: &BatchRecord, counts: LineCounts, stalled_for: f64) -> String {
        reason(&clues(&self.inner, b, counts, stalled_for, self.cluster_store_writable()))
    }
}

fn clues(inner: &Inner, b: &BatchRecord, counts: LineCounts, stalled_for: f64, store_writable: bool) -> Clues {
    let serving: Vec<String> = match b.model.as_deref().and_then(|m| inner.router.resolve(m)) {
        Some(route) => route.targets.iter().map(|(p, _)| p.cfg.name.clone()).collect(),
        None => inner.router.pools().iter().map(|p| p.cfg.name.clone()).collect(),
    };
    let states: Vec<_> = inner.router.states().into_iter().filter(|s| serving.contains(&s.name)).collect();
    let pauses = states.iter().map(|s| s.pause_reason.zip(s.pause_words())).collect();
    let warnings = states.iter().filter_map(|s| Some(format!("upstream {}: {}", s.name, s.warning.as_ref()?))).collect();
    let upstreams = serving.into_iter().map(|n| (n.clone(), inner.live.metrics.recent(&n))).collect();
    Clues { store_writable, pauses, upstreams, counts, stalled_for, warnings }
}

/// The watcher task (see the module doc).
pub(crate) async fn watch(inner: Arc<Inner>) {
    let every = (inner.cfg.stall_after / 4).clamp(Duration::from_millis(500), Duration::from_secs(15));
    let engine = Engine { inner: inner.clone() };
    let mut known: HashMap<BatchId, bool> = HashMap::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = inner.soft_stop.cancelled() => return,
        }
        let Ok(running) = inner.store.batches_in(&[BatchStatus::InProgress]).await else { continue };
        known.retain(|id, _| running.iter().any(|(r, _)| r == id));
        for (id, _) in running {
            if let Err(e) = look(&engine, &id, &mut known).await {
                tracing::debug!(batch = %id, error = %crate::Chain(&e), "stall check failed");
            }
        }
    }
}

/// Checks one batch and tells a change of its stall state.
async fn look(engine: &Engine, id: &BatchId, known: &mut HashMap<BatchId, bool>) -> crate::store::Result<()> {
    let inner = &engine.inner;
    let b = inner.store.get_batch(None, id).await?;
    let filter = EventFilter { tenant: None, batch_id: Some(id.clone()) };
    let events = inner.store.latest_events(&filter, Some("batch.progress"), 1).await?;
    let now = crate::now_unix_f64();
    let r = engine.refine(id, batch_rates(&b, &events, now));
    let since = stalled_since(&b, &r, now, inner.cfg.stall_after.as_secs_f64());
    let was = known.get(id).copied();
    if was == Some(since.is_some()) {
        return Ok(());
    }
    known.insert(id.clone(), since.is_some());
    let last = inner.store.latest_events(&filter, Some("batch.stalled"), 1).await?;
    let told = last.first().and_then(|e| serde_json::from_str::<serde_json::Value>(&e.data).ok()).is_some_and(|v| v["stalled"] == true);
    let data = match since {
        Some(s) if !told => {
            let reason = engine.stall_reason(&b, engine.live_counts(id), now - s);
            tracing::warn!(batch = %id, since = s as i64, reason = %reason, "the batch is stalled");
            json!({"stalled": true, "since": s as i64, "reason": reason, "request_counts": counts(&b)})
        }
        None if told => {
            tracing::info!(batch = %id, "the batch moves again");
            json!({"stalled": false, "since": null, "reason": null, "recovered_at": now as i64, "request_counts": counts(&b)})
        }
        _ => return Ok(()),
    };
    inner.store.append_event(id, "batch.stalled", &data.to_string(), now as i64).await?;
    inner.live.outbox_changed();
    Ok(())
}

fn counts(b: &BatchRecord) -> serde_json::Value {
    json!({"total": b.total, "completed": b.completed, "failed": b.failed})
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn recent(rate_limited: bool, unreachable: bool, msg: &str) -> UpstreamRecent {
        UpstreamRecent { last_success: None, last_error: Some((Instant::now(), msg.into())), last_rate_limited: rate_limited, last_unreachable: unreachable }
    }

    #[test]
    fn reasons_name_the_likely_cause() {
        let base = base_clone();
        assert!(reason(&Clues { store_writable: false, ..base }).contains("store cannot take writes"));
        let limited =
            Clues { upstreams: vec![("a".into(), recent(true, false, "429 from upstream"))], counts: LineCounts { in_flight: 0, retrying: 3 }, ..base_clone() };
        assert_eq!(reason(&limited), "every upstream serving the batch is rate limited (429): a");
        let down = Clues { upstreams: vec![("a".into(), recent(false, true, "connection refused"))], ..base_clone() };
        assert_eq!(reason(&down), "upstream unreachable: a (connection refused)");
        let mixed = Clues {
            upstreams: vec![("a".into(), recent(false, true, "x")), ("b".into(), UpstreamRecent::default())],
            counts: LineCounts { in_flight: 0, retrying: 2 },
            ..base_clone()
        };
        assert_eq!(reason(&mixed), "all 2 lines in progress are waiting on retries", "one upstream still works");
        let hanging = Clues { counts: LineCounts { in_flight: 4, retrying: 0 }, ..base_clone() };
        assert!(reason(&hanging).starts_with("4 requests in flight, none answered for 30 s"));
        assert!(reason(&base_clone()).starts_with("no node is working"));
        let paused = Clues {
            pauses: vec![
                Some((PauseReason::RateLimited, "rate limited by a, 2 s".into())),
                Some((PauseReason::QuotaExhausted, "out of quota at b, 30 s".into())),
            ],
            ..base_clone()
        };
        assert_eq!(reason(&paused), "every upstream serving the batch is paused: rate limited by a, 2 s; out of quota at b, 30 s");
        let one_paused = Clues {
            pauses: vec![Some((PauseReason::RateLimited, "rate limited by a, 2 s".into())), None],
            counts: LineCounts { in_flight: 0, retrying: 2 },
            ..base_clone()
        };
        assert_eq!(reason(&one_paused), "all 2 lines in progress are waiting on retries", "another upstream still takes lines");
        let wrong_url = Clues { warnings: vec!["upstream a: GET http://h/v1/models answered 404: its base_url is likely wrong".into()], ..base_clone() };
        assert!(reason(&wrong_url).ends_with("; upstream a: GET http://h/v1/models answered 404: its base_url is likely wrong"), "{}", reason(&wrong_url));
    }

    fn base_clone() -> Clues {
        Clues { store_writable: true, pauses: vec![], upstreams: vec![], counts: LineCounts::default(), stalled_for: 30.0, warnings: vec![] }
    }
}
