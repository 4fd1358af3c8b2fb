//! Live throughput and ETA per batch, fed by the writer after each durable commit.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

const WINDOW: Duration = Duration::from_secs(30);

/// The `progress` extension of a running batch.
#[derive(Debug, Clone, Serialize)]
pub struct Progress {
    /// Durable results per second over the last 30 seconds.
    pub requests_per_second: f64,
    /// Estimated seconds until every line has a result; null until there is a rate.
    pub eta_seconds: Option<u64>,
    /// When the batch will be done at the current rate (unix seconds); null until known.
    pub projected_finish_at: Option<i64>,
    /// The batch will not be done before it expires at the current rate (or makes no
    /// progress at all): its owner learns it early, not at `expired`.
    pub at_risk: bool,
}

/// (when, durable results so far) readings of one batch, oldest first.
type Samples = VecDeque<(Instant, u64)>;

#[derive(Clone, Default)]
pub struct ProgressBook {
    samples: Arc<Mutex<HashMap<String, Samples>>>,
}

impl ProgressBook {
    /// Records that `n` more results of `batch_id` became durable now.
    pub fn record(&self, batch_id: &str, n: u64) {
        let now = Instant::now();
        let mut all = self.samples.lock().unwrap();
        let q = all.entry(batch_id.to_string()).or_default();
        let total = q.back().map_or(0, |s| s.1) + n;
        q.push_back((now, total));
        while q.len() > 2 && now.duration_since(q[1].0) > WINDOW {
            q.pop_front();
        }
    }

    /// The `progress` of a running batch with `remaining` lines due at `expires_at`.
    pub fn get(&self, batch_id: &str, remaining: i64, expires_at: Option<i64>) -> Option<Progress> {
        if !self.samples.lock().unwrap().contains_key(batch_id) {
            return None;
        }
        let rate = self.rate(batch_id);
        let eta = (rate > 0.0).then(|| (remaining.max(0) as f64 / rate).ceil() as u64);
        let projected_finish_at = eta.map(|e| crate::now_unix().saturating_add(e as i64));
        let at_risk = remaining > 0 && expires_at.is_some_and(|t| projected_finish_at.is_none_or(|p| p > t));
        Some(Progress { requests_per_second: (rate * 10.0).round() / 10.0, eta_seconds: eta, projected_finish_at, at_risk })
    }

    /// Results of `batch_id` made durable by this node since it started running the batch.
    pub fn committed(&self, batch_id: &str) -> u64 {
        self.samples.lock().unwrap().get(batch_id).and_then(|q| q.back()).map_or(0, |s| s.1)
    }

    /// Durable results per second over the last [`WINDOW`] (0 until there are two readings).
    pub fn rate(&self, batch_id: &str) -> f64 {
        self.rate_within(batch_id, WINDOW)
    }

    /// Durable results per second over the last `window` (at most [`WINDOW`]): a short one
    /// follows changes of share quickly, a long one is steadier.
    pub fn rate_within(&self, batch_id: &str, window: Duration) -> f64 {
        let all = self.samples.lock().unwrap();
        let Some(q) = all.get(batch_id) else { return 0.0 };
        let now = Instant::now();
        let Some(last) = q.back() else { return 0.0 };
        // The newest reading older than the window is the baseline (its count is before it).
        let base = q.iter().rev().find(|s| now.duration_since(s.0) >= window).or(if q.len() > 1 { q.front() } else { None });
        let (since, before) = base.map_or((q[0].0, 0), |b| (b.0, b.1));
        let secs = now.duration_since(since).as_secs_f64().max(1.0);
        (last.1 - before) as f64 / secs
    }

    /// When this node last made results of `batch_id` durable.
    pub fn last(&self, batch_id: &str) -> Option<Instant> {
        self.samples.lock().unwrap().get(batch_id).and_then(|q| q.back()).map(|s| s.0)
    }

    pub fn forget(&self, batch_id: &str) {
        self.samples.lock().unwrap().remove(batch_id);
    }
}
