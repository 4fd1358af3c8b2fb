//! The upstream's own figures, read from `metrics_url` (a Prometheus `/metrics`) twice a
//! second in both modes, into one typed structure ([`EngineMetrics`]) whatever the server:
//! vLLM's names, SGLang's and llama.cpp's (`--metrics`). The queue steers standby (a queue
//! there means the server is full: batchd backs off even before latency shows it); every
//! figure is kept on the pool for what reads it (`/progress`, a KV-cache-driven window). A
//! page that names none of the figures known here is a warning, once; so is an endpoint that
//! fails (latency still steers). The task ends with its pool.

use std::sync::Weak;
use std::time::Duration;

use super::Pool;

const EVERY: Duration = Duration::from_millis(500);
const TIMEOUT: Duration = Duration::from_secs(2);

/// What an inference server says about its own load, each figure `None` when it does not
/// report it.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct EngineMetrics {
    /// Share of the KV cache in use, 0 to 1 (the busiest engine's).
    pub kv_cache_usage: Option<f64>,
    /// Requests queued, not yet running (summed over engines).
    pub waiting: Option<f64>,
    /// Requests running (summed over engines).
    pub running: Option<f64>,
    /// Preemptions since the server started (a counter).
    pub preemptions: Option<f64>,
    /// Share of prompt tokens found in the prefix cache, 0 to 1.
    pub prefix_cache_hit_rate: Option<f64>,
}

/// How the samples of one metric's label sets (engines, models) add up.
#[derive(Clone, Copy)]
enum Fold {
    Sum,
    Max,
}

/// Each figure under each server's name for it, first match wins.
const WAITING: [&str; 3] = ["vllm:num_requests_waiting", "sglang:num_queue_reqs", "llamacpp:requests_deferred"];
const RUNNING: [&str; 3] = ["vllm:num_requests_running", "sglang:num_running_reqs", "llamacpp:requests_processing"];
const KV_CACHE: [&str; 4] = ["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "sglang:token_usage", "llamacpp:kv_cache_usage_ratio"];
const PREEMPTIONS: [&str; 1] = ["vllm:num_preemptions_total"];
const HIT_RATE: [&str; 2] = ["vllm:gpu_prefix_cache_hit_rate", "sglang:cache_hit_rate"];
/// vLLM V1 counts prefix-cache queries and hits (in tokens) instead of a rate.
const PREFIX_HITS: &str = "vllm:prefix_cache_hits_total";
const PREFIX_QUERIES: &str = "vllm:prefix_cache_queries_total";

impl EngineMetrics {
    /// Reads a Prometheus text exposition.
    pub fn parse(text: &str) -> EngineMetrics {
        let samples: Vec<(&str, f64)> = text.lines().filter_map(sample).collect();
        let first = |names: &[&str], fold: Fold| names.iter().find_map(|n| folded(&samples, n, fold));
        let counted = match (folded(&samples, PREFIX_HITS, Fold::Sum), folded(&samples, PREFIX_QUERIES, Fold::Sum)) {
            (Some(h), Some(q)) if q > 0.0 => Some((h / q).clamp(0.0, 1.0)),
            _ => None,
        };
        EngineMetrics {
            kv_cache_usage: first(&KV_CACHE, Fold::Max),
            waiting: first(&WAITING, Fold::Sum),
            running: first(&RUNNING, Fold::Sum),
            preemptions: first(&PREEMPTIONS, Fold::Sum),
            prefix_cache_hit_rate: first(&HIT_RATE, Fold::Max).or(counted),
        }
    }

    /// Whether the page named any figure known here.
    pub fn known(&self) -> bool {
        *self != EngineMetrics::default()
    }
}

/// One sample line: its metric name and value (labels and a timestamp skipped).
fn sample(line: &str) -> Option<(&str, f64)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(['{', ' ']).unwrap_or(line.len());
    // The value is the first number after the labels (a timestamp may follow).
    let after_labels = line[name_end..].rsplit_once('}').map_or(&line[name_end..], |(_, rest)| rest);
    let v = after_labels.split_whitespace().next()?.parse::<f64>().ok().filter(|v| v.is_finite())?;
    Some((&line[..name_end], v))
}

fn folded(samples: &[(&str, f64)], name: &str, fold: Fold) -> Option<f64> {
    let mut values = samples.iter().filter(|(n, _)| *n == name).map(|(_, v)| *v);
    let first = values.next()?;
    Some(values.fold(first, |a, v| match fold {
        Fold::Sum => a + v,
        Fold::Max => a.max(v),
    }))
}

pub(super) fn spawn(pool: Weak<Pool>) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
    rt.spawn(async move {
        let http = match reqwest::Client::builder().timeout(TIMEOUT).build() {
            Ok(c) => c,
            Err(e) => return tracing::warn!(error = %e, "metrics probe not started"),
        };
        let (mut failing, mut warned_unknown) = (false, false);
        loop {
            let Some((name, url)) = pool.upgrade().and_then(|p| Some((p.cfg.name.clone(), p.cfg.metrics_url.clone()?))) else { return };
            match scrape(&http, &url).await {
                Ok(m) if m.known() => {
                    failing = false;
                    let Some(p) = pool.upgrade() else { return };
                    p.on_metrics(m);
                }
                Ok(_) if !warned_unknown => {
                    warned_unknown = true;
                    if let Some(p) = pool.upgrade() {
                        p.on_metrics_lost();
                    }
                    tracing::warn!(upstream = %name, url = %url, "metrics_url names none of the figures batchd knows (vLLM's, SGLang's or llama.cpp's); it is not used");
                }
                Ok(_) => {}
                Err(e) if !failing => {
                    failing = true;
                    if let Some(p) = pool.upgrade() {
                        p.on_metrics_lost();
                    }
                    tracing::warn!(upstream = %name, error = %e, "metrics_url could not be read; the window follows the answers alone");
                }
                Err(_) => {}
            }
            tokio::time::sleep(EVERY).await;
        }
    });
}

async fn scrape(http: &reqwest::Client, url: &str) -> Result<EngineMetrics, reqwest::Error> {
    let text = http.get(url).send().await?.error_for_status()?.text().await?;
    Ok(EngineMetrics::parse(&text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vllm_sglang_and_llama_cpp_figures_are_read() {
        let vllm = "# HELP vllm:num_requests_waiting Number of requests waiting.\n# TYPE vllm:num_requests_waiting gauge\n\
            vllm:num_requests_waiting{engine=\"0\",model_name=\"llama\"} 3.0\nvllm:num_requests_running{model_name=\"llama\"} 16.0\n\
            vllm:num_requests_waiting{engine=\"1\",model_name=\"llama\"} 2.0 1700000000000\n\
            vllm:kv_cache_usage_perc{engine=\"0\"} 0.25\nvllm:kv_cache_usage_perc{engine=\"1\"} 0.75\n\
            vllm:num_preemptions_total{engine=\"0\"} 7\nvllm:prefix_cache_queries_total 200\nvllm:prefix_cache_hits_total 50\n";
        let m = EngineMetrics::parse(vllm);
        let want =
            EngineMetrics { kv_cache_usage: Some(0.75), waiting: Some(5.0), running: Some(16.0), preemptions: Some(7.0), prefix_cache_hit_rate: Some(0.25) };
        assert_eq!(m, want, "queues summed over engines, the busiest engine's cache");
        let sglang =
            "sglang:num_queue_reqs{model_name=\"m\"} 7\nsglang:num_running_reqs{model_name=\"m\"} 4\nsglang:token_usage 0.5\nsglang:cache_hit_rate 0.9\n";
        let m = EngineMetrics::parse(sglang);
        assert_eq!((m.waiting, m.running, m.kv_cache_usage, m.prefix_cache_hit_rate), (Some(7.0), Some(4.0), Some(0.5), Some(0.9)));
        let llama = "# HELP llamacpp:requests_deferred Number of requests deferred.\n# TYPE llamacpp:requests_deferred gauge\n\
            llamacpp:requests_deferred 46\nllamacpp:requests_processing 4\nllamacpp:kv_cache_usage_ratio 0.97\nllamacpp:tokens_predicted_total 17029\n";
        let m = EngineMetrics::parse(llama);
        assert_eq!((m.waiting, m.running, m.kv_cache_usage), (Some(46.0), Some(4.0), Some(0.97)));
        assert_eq!(EngineMetrics::parse("sglang:num_queue_reqs 0\n").waiting, Some(0.0));
        let unknown = EngineMetrics::parse("process_cpu_seconds_total 12\nhttp_requests_total{code=\"200\"} 5\n");
        assert!(!unknown.known(), "a page with none of the known names: {unknown:?}");
        assert!(EngineMetrics::parse("llamacpp:requests_processing 1\n").known());
    }
}
