//! Standby's look at the upstream's own queue: polls `metrics_url` (vLLM's or SGLang's
//! Prometheus `/metrics`) twice a second and hands the number of queued requests
//! (`vllm:num_requests_waiting`, `sglang:num_queue_reqs`, summed over their label sets) to
//! the pool's limiter. A queue there means the server is full: batchd backs off even before
//! latency shows it. A metrics endpoint that fails is skipped quietly (latency still
//! steers); the task ends with its pool.

use std::sync::Weak;
use std::time::Duration;

use super::Pool;

const EVERY: Duration = Duration::from_millis(500);
const TIMEOUT: Duration = Duration::from_secs(2);
const QUEUE_METRICS: [&str; 2] = ["vllm:num_requests_waiting", "sglang:num_queue_reqs"];

pub(super) fn spawn(pool: Weak<Pool>) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
    rt.spawn(async move {
        let http = match reqwest::Client::builder().timeout(TIMEOUT).build() {
            Ok(c) => c,
            Err(e) => return tracing::warn!(error = %e, "metrics probe not started"),
        };
        let mut failing = false;
        loop {
            let Some(url) = pool.upgrade().and_then(|p| p.cfg.metrics_url.clone()) else { return };
            match scrape(&http, &url).await {
                Ok(Some(waiting)) => {
                    failing = false;
                    let Some(p) = pool.upgrade() else { return };
                    p.limiter.on_queue(waiting);
                }
                Ok(None) => {}
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "metrics_url could not be read; standby follows latency alone");
                }
                Err(_) => {}
            }
            tokio::time::sleep(EVERY).await;
        }
    });
}

async fn scrape(http: &reqwest::Client, url: &str) -> Result<Option<f64>, reqwest::Error> {
    let text = http.get(url).send().await?.error_for_status()?.text().await?;
    Ok(queued(&text))
}

/// The queued requests in a Prometheus text exposition, `None` when it reports none of the
/// known queue metrics.
pub fn queued(text: &str) -> Option<f64> {
    let mut total = None;
    for line in text.lines().map(str::trim).filter(|l| !l.starts_with('#')) {
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        if !QUEUE_METRICS.contains(&&line[..name_end]) {
            continue;
        }
        // The value is the first number after the labels (a timestamp may follow).
        let after_labels = line[name_end..].rsplit_once('}').map_or(&line[name_end..], |(_, rest)| rest);
        let v = after_labels.split_whitespace().next().and_then(|v| v.parse::<f64>().ok());
        if let Some(v) = v.filter(|v| v.is_finite()) {
            *total.get_or_insert(0.0) += v;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vllm_and_sglang_queues_are_read() {
        let vllm = "# HELP vllm:num_requests_waiting Number of requests waiting.\n# TYPE vllm:num_requests_waiting gauge\n\
            vllm:num_requests_waiting{engine=\"0\",model_name=\"llama\"} 3.0\nvllm:num_requests_running{model_name=\"llama\"} 16.0\n\
            vllm:num_requests_waiting{engine=\"1\",model_name=\"llama\"} 2.0 1700000000000\n";
        assert_eq!(queued(vllm), Some(5.0));
        assert_eq!(queued("sglang:num_queue_reqs{model_name=\"m\"} 7\n"), Some(7.0));
        assert_eq!(queued("sglang:num_queue_reqs 0\n"), Some(0.0));
        assert_eq!(queued("vllm:num_requests_running 4\n"), None);
    }
}
