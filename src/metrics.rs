//! Prometheus metrics (`GET /metrics`), kept by the `prometheus-client` crate and written in
//! the Prometheus text format 0.0.4.
//!
//! Two kinds of families:
//! - live ones, updated where things happen: upstream requests by outcome and their latency,
//!   retries, 429s, store commit latency, webhook deliveries;
//! - scrape-time ones, read when `/metrics` is asked ([`Scrape`]): store commits, results,
//!   lines pending, batches by status, the store's health, per-upstream gauges.
//!
//! [`Metrics`] also remembers each upstream's most recent outcome ([`UpstreamRecent`]), which
//! the stall detector reads to say *why* a batch does not move. Family names are documented
//! in the README; the bench reads `batchd_store_commits_total`,
//! `batchd_results_committed_total` and `batchd_store_writable`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::upstream::{Outcome, PauseReason, TransportError, WindowReason};

pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

type Labels = Vec<(&'static str, String)>;

/// How far back "recent" upstream outcomes count for stall reasons.
const RECENT: Duration = Duration::from_secs(60);

/// The last outcomes seen from one upstream (this node's view).
#[derive(Debug, Clone, Default)]
pub struct UpstreamRecent {
    pub last_success: Option<Instant>,
    /// When and what the last failure was (`429 Too Many Requests`, `connection refused`, …).
    pub last_error: Option<(Instant, String)>,
    /// The last failure was a 429.
    pub last_rate_limited: bool,
    /// The last failure was no HTTP answer at all (connect error, timeout).
    pub last_unreachable: bool,
}

impl UpstreamRecent {
    /// The upstream's last outcome, within the last minute, was a failure.
    pub fn failing(&self) -> bool {
        match &self.last_error {
            Some((at, _)) => at.elapsed() < RECENT && self.last_success.is_none_or(|s| s < *at),
            None => false,
        }
    }
}

pub struct Metrics {
    registry: Registry,
    upstream_requests: Family<Labels, Counter>,
    upstream_latency: Family<Labels, Histogram>,
    retries: Family<Labels, Counter>,
    rate_limited: Family<Labels, Counter>,
    commit_seconds: Histogram,
    webhook_deliveries: Family<Labels, Counter>,
    recent: Mutex<HashMap<String, UpstreamRecent>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let upstream_requests = Family::<Labels, Counter>::default();
        registry.register(
            "batchd_upstream_requests",
            "Requests sent upstream, retries included, by upstream and outcome (2xx, 4xx, 429, 5xx, timeout, unreachable, too_large)",
            upstream_requests.clone(),
        );
        let upstream_latency = Family::<Labels, Histogram>::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register("batchd_upstream_latency_seconds", "Time from sending a request upstream to its whole answer, by upstream", upstream_latency.clone());
        let retries = Family::<Labels, Counter>::default();
        registry.register("batchd_retries", "Upstream attempts that were retried, by upstream", retries.clone());
        let rate_limited = Family::<Labels, Counter>::default();
        registry.register("batchd_upstream_rate_limited", "429 answers from upstreams, by upstream", rate_limited.clone());
        let commit_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        registry.register("batchd_store_commit_seconds", "Time to commit one group of results to the store", commit_seconds.clone());
        let webhook_deliveries = Family::<Labels, Counter>::default();
        registry.register(
            "batchd_webhook_deliveries",
            "Webhook delivery attempts by outcome (delivered, retrying, given_up, no_webhook)",
            webhook_deliveries.clone(),
        );
        Metrics { registry, upstream_requests, upstream_latency, retries, rate_limited, commit_seconds, webhook_deliveries, recent: Mutex::default() }
    }
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

fn upstream(name: &str) -> Labels {
    vec![("upstream", name.to_string())]
}

/// The `outcome` label of one upstream call.
pub fn outcome_class(o: &Outcome) -> &'static str {
    match o {
        Outcome::Answer(a) if a.status == 429 => "429",
        Outcome::Answer(a) if (200..300).contains(&a.status) => "2xx",
        Outcome::Answer(a) if a.status >= 500 => "5xx",
        Outcome::Answer(_) => "4xx",
        Outcome::Transport(TransportError::Timeout(_)) => "timeout",
        Outcome::Transport(TransportError::Unreachable(_)) => "unreachable",
        Outcome::Transport(TransportError::Unavailable(_)) => "broken",
        Outcome::Transport(TransportError::TooLarge(_)) => "too_large",
    }
}

impl Metrics {
    /// Creates the labelled series of every upstream and webhook outcome at zero, so that
    /// every family is present from the first scrape (and rates start from a known 0).
    pub fn prime<'a>(&self, upstreams: impl IntoIterator<Item = &'a str>) {
        for name in upstreams {
            let _ = self.retries.get_or_create(&upstream(name));
            let _ = self.rate_limited.get_or_create(&upstream(name));
            let _ = self.upstream_latency.get_or_create(&upstream(name));
            let _ = self.upstream_requests.get_or_create(&vec![("upstream", name.to_string()), ("outcome", "2xx".to_string())]);
        }
        for outcome in ["delivered", "retrying", "given_up", "no_webhook"] {
            let _ = self.webhook_deliveries.get_or_create(&vec![("outcome", outcome.to_string())]);
        }
    }

    /// Records one call to `name` that ended with `o` after `took`.
    pub fn upstream_call(&self, name: &str, o: &Outcome, took: Duration) {
        let class = outcome_class(o);
        self.upstream_requests.get_or_create(&vec![("upstream", name.to_string()), ("outcome", class.to_string())]).inc();
        self.upstream_latency.get_or_create(&upstream(name)).observe(took.as_secs_f64());
        if class == "429" {
            self.rate_limited.get_or_create(&upstream(name)).inc();
        }
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let r = recent.entry(name.to_string()).or_default();
        match o {
            Outcome::Answer(a) if !o.is_retryable() || (200..300).contains(&a.status) => r.last_success = Some(Instant::now()),
            Outcome::Answer(a) => {
                r.last_error = Some((Instant::now(), format!("{} from upstream", a.status)));
                (r.last_rate_limited, r.last_unreachable) = (a.status == 429, false);
            }
            Outcome::Transport(e) => {
                r.last_error = Some((Instant::now(), e.message().to_string()));
                (r.last_rate_limited, r.last_unreachable) = (false, !matches!(e, TransportError::TooLarge(_)));
            }
        }
    }

    pub fn retry(&self, name: &str) {
        self.retries.get_or_create(&upstream(name)).inc();
    }

    pub fn commit_took(&self, took: Duration) {
        self.commit_seconds.observe(took.as_secs_f64());
    }

    pub fn webhook_attempt(&self, outcome: &'static str) {
        self.webhook_deliveries.get_or_create(&vec![("outcome", outcome.to_string())]).inc();
    }

    /// This node's view of one upstream's recent outcomes.
    pub fn recent(&self, name: &str) -> UpstreamRecent {
        self.recent.lock().unwrap_or_else(|p| p.into_inner()).get(name).cloned().unwrap_or_default()
    }

    /// The text exposition: the live families, then the scrape-time ones.
    pub fn render(&self, s: &Scrape) -> String {
        let mut out = String::new();
        let _ = prometheus_text::encode(&mut out, &self.registry);
        let _ = prometheus_text::encode(&mut out, &s.registry());
        out
    }
}

/// Per-upstream state read at scrape time: the pool's limits and what it learned.
#[derive(Debug, Clone, Default)]
pub struct UpstreamGauges {
    pub name: String,
    pub in_flight: i64,
    pub window: f64,
    pub limit: i64,
    pub learned_rpm: Option<f64>,
    pub paused: bool,
    /// Why it is paused, while it is.
    pub pause_reason: Option<PauseReason>,
    /// Seconds until the pause ends (0 while not paused).
    pub pause_seconds_remaining: f64,
    pub rate_limited_last_minute: u64,
    pub overloaded_last_minute: u64,
    /// Why the window is what it is.
    pub window_reason: Option<WindowReason>,
    /// The server's own figures (`metrics_url`), when read lately.
    pub engine: Option<crate::upstream::EngineMetrics>,
}

impl From<&crate::upstream::UpstreamState> for UpstreamGauges {
    fn from(s: &crate::upstream::UpstreamState) -> Self {
        let left_ms = s.paused_until_ms.filter(|_| s.paused).map_or(0, |u| u.saturating_sub(crate::now_unix_ms()));
        UpstreamGauges {
            name: s.name.clone(),
            in_flight: s.in_flight as i64,
            window: s.window,
            limit: s.limit as i64,
            learned_rpm: s.learned_rpm,
            paused: s.paused,
            pause_reason: s.pause_reason.filter(|_| s.paused),
            pause_seconds_remaining: left_ms as f64 / 1000.0,
            rate_limited_last_minute: s.rate_limited_last_minute,
            overloaded_last_minute: s.overloaded_last_minute,
            window_reason: Some(s.window_reason),
            engine: s.engine,
        }
    }
}

/// Values read when `/metrics` is asked.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    pub store_commits: u64,
    pub results_committed: u64,
    pub store_writable: bool,
    pub retries_waiting: u64,
    pub output_tokens: u64,
    pub batches_failed_by_engine: u64,
    /// Lines of running batches without a durable result (every node's).
    pub lines_pending: i64,
    /// Batches in each working status (final ones are history, not state).
    pub batches_by_status: Vec<(&'static str, i64)>,
    pub upstreams: Vec<UpstreamGauges>,
}

impl Scrape {
    fn registry(&self) -> Registry {
        let mut r = Registry::default();
        r.register("batchd_store_commits", "Store write transactions committed", ConstCounter::new(self.store_commits));
        r.register("batchd_results_committed", "Results made durable", ConstCounter::new(self.results_committed));
        r.register("batchd_output_tokens", "Output tokens reported by upstreams", ConstCounter::new(self.output_tokens));
        r.register("batchd_batches_failed_by_engine", "Batches failed because a step could not succeed", ConstCounter::new(self.batches_failed_by_engine));
        r.register("batchd_store_writable", "1 while the store takes writes, 0 while it is full or unreachable", ConstGauge::new(self.store_writable as i64));
        r.register("batchd_retries_waiting", "Retries waiting for their back-off", ConstGauge::new(self.retries_waiting as i64));
        r.register("batchd_lines_pending", "Lines of running batches without a durable result", ConstGauge::new(self.lines_pending));
        let by_status = Family::<Labels, Gauge>::default();
        for (status, n) in &self.batches_by_status {
            by_status.get_or_create(&vec![("status", status.to_string())]).set(*n);
        }
        r.register("batchd_batches", "Batches in each working status", by_status);
        self.register_upstreams(&mut r);
        r
    }

    /// The per-upstream gauges: one family each, labelled by upstream.
    fn register_upstreams(&self, r: &mut Registry) {
        type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;
        let in_flight = Family::<Labels, Gauge>::default();
        let window = Family::<Labels, FloatGauge>::default();
        let limit = Family::<Labels, Gauge>::default();
        let learned = Family::<Labels, FloatGauge>::default();
        let paused = Family::<Labels, Gauge>::default();
        let reason = Family::<Labels, Gauge>::default();
        let left = Family::<Labels, FloatGauge>::default();
        let limited = Family::<Labels, Gauge>::default();
        let overloaded = Family::<Labels, Gauge>::default();
        for u in &self.upstreams {
            let l = upstream(&u.name);
            in_flight.get_or_create(&l).set(u.in_flight);
            window.get_or_create(&l).set(u.window);
            limit.get_or_create(&l).set(u.limit);
            if let Some(rpm) = u.learned_rpm {
                learned.get_or_create(&l).set(rpm);
            }
            paused.get_or_create(&l).set(u.paused as i64);
            for r in PauseReason::ALL {
                let labels = vec![("upstream", u.name.clone()), ("reason", r.as_str().to_string())];
                reason.get_or_create(&labels).set((u.pause_reason == Some(r)) as i64);
            }
            left.get_or_create(&l).set(u.pause_seconds_remaining);
            limited.get_or_create(&l).set(u.rate_limited_last_minute as i64);
            overloaded.get_or_create(&l).set(u.overloaded_last_minute as i64);
        }
        r.register("batchd_upstream_in_flight", "Requests in flight to each upstream", in_flight);
        r.register("batchd_upstream_window", "Concurrency window learned for each upstream", window);
        r.register("batchd_upstream_limit", "This node's share of each upstream's max_concurrency", limit);
        r.register("batchd_upstream_learned_rpm", "Requests per minute learned from 429s or rate-limit headers", learned);
        r.register("batchd_upstream_paused", "1 while the upstream is paused (why: batchd_upstream_pause_reason)", paused);
        r.register(
            "batchd_upstream_pause_reason",
            "1 for the reason the upstream is paused (rate_limited, overloaded, quota_exhausted, unreachable), 0 for the others",
            reason,
        );
        r.register("batchd_upstream_pause_seconds_remaining", "Seconds until the upstream's pause ends, 0 while not paused", left);
        r.register("batchd_upstream_rate_limited_last_minute", "429 answers in the last minute", limited);
        r.register("batchd_upstream_overloaded_last_minute", "Overloaded answers (503, 529) in the last minute", overloaded);
        self.register_engines(r);
    }

    /// Why each window is what it is, and what each server reports of itself (`metrics_url`).
    fn register_engines(&self, r: &mut Registry) {
        type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;
        let reason = Family::<Labels, Gauge>::default();
        let hit_rate = Family::<Labels, FloatGauge>::default();
        let preemptions = Family::<Labels, FloatGauge>::default();
        let kv = Family::<Labels, FloatGauge>::default();
        let waiting = Family::<Labels, FloatGauge>::default();
        for u in &self.upstreams {
            if let Some(why) = u.window_reason {
                for r in WindowReason::ALL {
                    let labels = vec![("upstream", u.name.clone()), ("reason", r.as_str().to_string())];
                    reason.get_or_create(&labels).set((why == r) as i64);
                }
            }
            let Some(e) = &u.engine else { continue };
            let l = upstream(&u.name);
            for (family, value) in [(&hit_rate, e.prefix_cache_hit_rate), (&preemptions, e.preemptions), (&kv, e.kv_cache_usage), (&waiting, e.waiting)] {
                if let Some(v) = value {
                    family.get_or_create(&l).set(v);
                }
            }
        }
        r.register("batchd_upstream_window_reason", "1 for why the window is what it is (slow_start, learned, kv_cache, queue), 0 for the others", reason);
        r.register("batchd_upstream_prefix_cache_hit_rate", "Share of prompt tokens the upstream's prefix cache served, as it reports", hit_rate);
        r.register("batchd_upstream_preemptions", "Preemptions the upstream reports since it started", preemptions);
        r.register("batchd_upstream_kv_cache_usage", "Share of the upstream's KV cache in use, as it reports", kv);
        r.register("batchd_upstream_waiting", "Requests queued in the upstream, as it reports", waiting);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::Answer;

    fn answer(status: u16) -> Outcome {
        Outcome::Answer(Answer { status, body: Default::default(), request_id: None, retry_after: None, rate_limits: Default::default() })
    }

    /// Every family `/metrics` renders is in the table of docs/deploy.md.
    #[test]
    fn every_family_is_documented() {
        let docs = include_str!("../docs/deploy.md");
        let engine = crate::upstream::EngineMetrics {
            kv_cache_usage: Some(0.5),
            waiting: Some(1.0),
            running: Some(2.0),
            preemptions: Some(0.0),
            prefix_cache_hit_rate: Some(0.4),
        };
        let u = UpstreamGauges {
            name: "a".into(),
            learned_rpm: Some(60.0),
            window_reason: Some(WindowReason::KvCache),
            engine: Some(engine),
            ..Default::default()
        };
        let text = Metrics::default().render(&Scrape { upstreams: vec![u], ..Default::default() });
        assert!(text.contains("batchd_upstream_window_reason{upstream=\"a\",reason=\"kv_cache\"} 1"), "{text}");
        assert!(text.contains("batchd_upstream_prefix_cache_hit_rate{upstream=\"a\"} 0.4"), "{text}");
        let families: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.split(' ').next()).collect();
        assert!(families.len() > 20, "{families:?}");
        for f in families {
            let base = f.trim_end_matches("_total");
            assert!(docs.contains(&format!("`{base}")), "{f} is not in the metrics table of docs/deploy.md");
        }
    }

    #[test]
    fn families_render_with_their_labels() {
        let m = Metrics::default();
        m.upstream_call("a", &answer(200), Duration::from_millis(12));
        m.upstream_call("a", &answer(429), Duration::from_millis(3));
        m.upstream_call("a", &Outcome::Transport(TransportError::Unreachable("connection refused".into())), Duration::from_millis(1));
        m.retry("a");
        m.commit_took(Duration::from_millis(2));
        m.webhook_attempt("delivered");
        let idle = UpstreamGauges { name: "a".into(), window: 64.0, limit: 64, ..Default::default() };
        let learning = UpstreamGauges {
            name: "b".into(),
            window: 8.5,
            learned_rpm: Some(1180.0),
            paused: true,
            pause_reason: Some(PauseReason::RateLimited),
            pause_seconds_remaining: 1.5,
            rate_limited_last_minute: 3,
            overloaded_last_minute: 2,
            ..Default::default()
        };
        let s = Scrape {
            store_commits: 7,
            store_writable: true,
            batches_by_status: vec![("in_progress", 2)],
            upstreams: vec![idle, learning],
            ..Default::default()
        };
        let text = m.render(&s);
        for want in [
            "batchd_upstream_requests_total{upstream=\"a\",outcome=\"2xx\"} 1",
            "batchd_upstream_requests_total{upstream=\"a\",outcome=\"429\"} 1",
            "batchd_upstream_rate_limited_total{upstream=\"a\"} 1",
            "batchd_retries_total{upstream=\"a\"} 1",
            "batchd_upstream_latency_seconds_count{upstream=\"a\"} 3",
            "batchd_store_commit_seconds_count 1",
            "batchd_webhook_deliveries_total{outcome=\"delivered\"} 1",
            "batchd_store_commits_total 7",
            "batchd_store_writable 1",
            "batchd_batches{status=\"in_progress\"} 2",
            "batchd_upstream_window{upstream=\"a\"} 64",
            "batchd_upstream_paused{upstream=\"a\"} 0",
            "batchd_upstream_window{upstream=\"b\"} 8.5",
            "batchd_upstream_learned_rpm{upstream=\"b\"} 1180",
            "batchd_upstream_paused{upstream=\"b\"} 1",
            "batchd_upstream_rate_limited_last_minute{upstream=\"b\"} 3",
            "batchd_upstream_overloaded_last_minute{upstream=\"b\"} 2",
            "batchd_upstream_overloaded_last_minute{upstream=\"a\"} 0",
            "batchd_upstream_pause_reason{upstream=\"b\",reason=\"rate_limited\"} 1",
            "batchd_upstream_pause_reason{upstream=\"b\",reason=\"quota_exhausted\"} 0",
            "batchd_upstream_pause_reason{upstream=\"a\",reason=\"rate_limited\"} 0",
            "batchd_upstream_pause_reason{upstream=\"a\",reason=\"unreachable\"} 0",
            "batchd_upstream_pause_seconds_remaining{upstream=\"b\"} 1.5",
            "batchd_upstream_pause_seconds_remaining{upstream=\"a\"} 0.0",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        assert!(!text.contains("batchd_upstream_learned_rpm{upstream=\"a\"}"), "no rate learned, no sample");
        let r = m.recent("a");
        assert!(r.failing() && r.last_unreachable && !r.last_rate_limited);
        m.upstream_call("a", &answer(200), Duration::from_millis(1));
        assert!(!m.recent("a").failing(), "a success clears the failure");
    }
}
