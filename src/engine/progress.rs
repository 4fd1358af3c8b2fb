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

    pub fn get(&self, batch_id: &str, remaining: i64) -> Option<Progress> {
        let all = self.samples.lock().unwrap();
        let q = all.get(batch_id)?;
        let (first, last) = (q.front()?, q.back()?);
        let secs = Instant::now().duration_since(first.0).as_secs_f64().max(1.0);
        let rate = (last.1 - if q.len() > 1 { first.1 } else { 0 }) as f64 / secs;
        let eta = (rate > 0.0).then(|| (remaining.max(0) as f64 / rate).ceil() as u64);
        Some(Progress { requests_per_second: (rate * 10.0).round() / 10.0, eta_seconds: eta })
    }

    /// When this node last made results of `batch_id` durable.
    pub fn last(&self, batch_id: &str) -> Option<Instant> {
        self.samples.lock().unwrap().get(batch_id).and_then(|q| q.back()).map(|s| s.0)
    }

    pub fn forget(&self, batch_id: &str) {
        self.samples.lock().unwrap().remove(batch_id);
    }
}
