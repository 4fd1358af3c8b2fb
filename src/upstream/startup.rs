//! The start-up look at each upstream: `GET {base_url}/models`, once, in the background. A
//! base URL that answers 404 there is most likely wrong (infinity-emb serves `/embeddings`,
//! not `/v1/embeddings`): every line would fail with 404 and the batch end `completed` with
//! nothing said. That is a warning in the log at start, on the pool (`progress.upstreams[].
//! warning`) and in a stall's reason. A key refused (401, 403) is one too; an upstream not
//! answering yet is not (it may come up later, and its lines will say so).

use std::sync::Weak;
use std::time::Duration;

use axum::http::header::{HeaderName, HeaderValue};

use super::Pool;

const TIMEOUT: Duration = Duration::from_secs(5);

/// What the look found wrong, in words, or `None` when nothing.
pub fn verdict(status: u16, url: &str) -> Option<String> {
    match status {
        404 => Some(format!("GET {url} answered 404: its base_url is likely wrong (does the server serve its API under /v1, or without it?)")),
        401 | 403 => Some(format!("GET {url} answered {status}: the upstream refuses its api_key")),
        _ => None,
    }
}

pub(super) fn spawn(pool: Weak<Pool>, auth: Option<(HeaderName, HeaderValue)>) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
    rt.spawn(async move {
        let Some((name, base)) = pool.upgrade().map(|p| (p.cfg.name.clone(), p.cfg.base_url.clone())) else { return };
        let url = format!("{}/models", base.trim_end_matches('/'));
        let Ok(http) = reqwest::Client::builder().timeout(TIMEOUT).build() else { return };
        let mut req = http.get(&url);
        if let Some((k, v)) = auth {
            req = req.header(k, v);
        }
        let status = match req.send().await {
            Ok(r) => r.status().as_u16(),
            Err(e) => return tracing::info!(upstream = %name, error = %e, "upstream not reachable at start; its lines will say if it stays so"),
        };
        if let Some(words) = verdict(status, &url) {
            tracing::warn!(upstream = %name, "{words}");
            if let Some(p) = pool.upgrade() {
                p.warn(words);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_404_or_a_refused_key_is_a_warning_and_nothing_else_is() {
        let w = verdict(404, "http://h/v1/models").unwrap();
        assert!(w.contains("404") && w.contains("base_url"), "{w}");
        assert!(verdict(401, "u").unwrap().contains("api_key"));
        for ok in [200, 405, 500, 503] {
            assert_eq!(verdict(ok, "u"), None, "{ok}");
        }
    }
}
