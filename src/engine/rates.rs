//! Throughput over the last minute, derived from the outbox's `batch.progress` events (each
//! tells the durable `request_counts` and `usage.total_tokens` at its time), so that any
//! node can answer for any batch. Also: whether a batch is stalled.

use crate::store::{BatchRecord, BatchStatus, Event};

/// The window rates are measured over.
pub const WINDOW_S: f64 = 60.0;
/// Progress events to read for one batch's window (at most one a second is appended).
pub const EVENTS_PER_WINDOW: u32 = 75;

/// One reading: when, results so far, total tokens so far (unknown in older events).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub at: f64,
    pub done: i64,
    pub tokens: Option<i64>,
}

/// A batch's throughput and last result.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rates {
    pub requests_per_second: f64,
    pub tokens_per_second: f64,
    /// Unix seconds of the newest progress event (the last results committed then).
    pub last_result_at: Option<f64>,
}

/// The reading a `batch.progress` event holds.
pub fn point_of(e: &Event) -> Option<Point> {
    let v: serde_json::Value = serde_json::from_str(&e.data).ok()?;
    let rc = &v["request_counts"];
    let done = rc["completed"].as_i64()?.saturating_add(rc["failed"].as_i64().unwrap_or(0));
    Some(Point { at: e.created_at as f64, done, tokens: v["usage"]["total_tokens"].as_i64() })
}

/// Rates at `now` over the readings `points` (oldest first, the last one being the latest
/// known): from the newest reading at least a window old (else the oldest) to the latest.
/// Measured up to `now`, so a batch that stopped moving decays to 0.
pub fn rate_of(points: &[Point], now: f64) -> (f64, f64) {
    let (Some(last), Some(first)) = (points.last(), points.first()) else { return (0.0, 0.0) };
    let base = points.iter().rev().find(|p| p.at <= now - WINDOW_S).unwrap_or(first);
    let secs = now - base.at;
    if secs < 1.0 {
        return (0.0, 0.0);
    }
    let rps = (last.done - base.done).max(0) as f64 / secs;
    let tps = match (last.tokens, base.tokens) {
        (Some(l), Some(b)) => (l - b).max(0) as f64 / secs,
        // Older events carry no tokens: the average per result times the result rate.
        _ => last.tokens.map_or(0.0, |t| if last.done > 0 { rps * t as f64 / last.done as f64 } else { 0.0 }),
    };
    (round1(rps), round1(tps))
}

pub fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// A batch's rates from its newest progress events (newest first, as
/// `Outbox::latest_events` returns them) and its current durable counts.
pub fn batch_rates(b: &BatchRecord, newest_first: &[Event], now: f64) -> Rates {
    let mut points: Vec<Point> = newest_first.iter().rev().filter_map(point_of).collect();
    let last_result_at = points.last().map(|p| p.at);
    if let Some(t) = b.in_progress_at {
        if points.first().is_none_or(|p| p.at > t as f64) {
            points.insert(0, Point { at: t as f64, done: 0, tokens: Some(0) });
        }
    }
    points.push(Point { at: now, done: b.completed.saturating_add(b.failed), tokens: Some(b.usage.total_tokens) });
    let (rps, tps) = if b.status.is_final() { (0.0, 0.0) } else { rate_of(&points, now) };
    Rates { requests_per_second: rps, tokens_per_second: tps, last_result_at }
}

/// When a running batch with lines left has had no new result for `stall_after` seconds:
/// since when nothing has finished (its last result, or when it started running).
pub fn stalled_since(b: &BatchRecord, r: &Rates, now: f64, stall_after: f64) -> Option<f64> {
    if b.status != BatchStatus::InProgress || b.completed.saturating_add(b.failed) >= b.total {
        return None;
    }
    let started = b.in_progress_at.map(|t| t as f64);
    let since = match (r.last_result_at, started) {
        (Some(a), Some(b)) => a.max(b),
        (a, b) => a.or(b)?,
    };
    (now - since >= stall_after).then_some(since)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(at: f64, done: i64, tokens: i64) -> Point {
        Point { at, done, tokens: Some(tokens) }
    }

    #[test]
    fn rates_span_the_last_minute_and_decay_when_nothing_moves() {
        let pts = [p(0.0, 0, 0), p(50.0, 100, 1000), p(100.0, 200, 2000), p(130.0, 260, 2600)];
        assert_eq!(rate_of(&pts, 130.0), (2.0, 20.0), "from the reading at t=50 (the newest ≥ 60 s old) to now");
        let (rps, _) = rate_of(&pts, 230.0);
        assert!(rps < 1.0, "a minute and more without progress brings the rate down: {rps}");
        assert_eq!(rate_of(&[p(10.0, 5, 0)], 10.5), (0.0, 0.0), "no rate before a second has passed");
        let old = [Point { at: 0.0, done: 0, tokens: None }, p(10.0, 10, 500)];
        assert_eq!(rate_of(&old, 10.0), (1.0, 50.0), "tokens estimated from the average when older events lack them");
    }

    #[test]
    fn a_batch_is_stalled_only_while_running_with_lines_left() {
        let mut b = crate::store::BatchRecord::new("batch_s".into(), "t".into(), "file-s".into(), "/v1/chat/completions".into(), "24h".into(), 1_000, 87_400);
        (b.status, b.total, b.completed, b.in_progress_at) = (BatchStatus::InProgress, 10, 4, Some(100));
        let r = Rates { last_result_at: Some(150.0), ..Default::default() };
        assert_eq!(stalled_since(&b, &r, 200.0, 60.0), None);
        assert_eq!(stalled_since(&b, &r, 210.0, 60.0), Some(150.0));
        assert_eq!(stalled_since(&b, &Rates::default(), 170.0, 60.0), Some(100.0), "never a result: since it started");
        b.completed = 10;
        assert_eq!(stalled_since(&b, &r, 500.0, 60.0), None, "no lines left");
    }
}
