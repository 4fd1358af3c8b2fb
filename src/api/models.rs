//! `GET /v1/models`: every model and alias the router can serve.
//!
//! An upstream that serves every model (`models = ["*"]`) is asked for its own list
//! (`GET {base_url}/models`), which is cached for [`LIST_TTL`]. A failed fetch is tolerated:
//! the last good list is served (or none), and the fetch is tried again after [`RETRY_AFTER`].

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::{Extension, Json};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::{AppState, Tenant};
use crate::config::{Secret, UpstreamConfig};

/// How long a fetched list is served before it is fetched again.
pub const LIST_TTL: Duration = Duration::from_secs(300);
/// How long after a failed fetch the next one is tried.
pub const RETRY_AFTER: Duration = Duration::from_secs(15);
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// A model list larger than this is not read.
const MAX_LIST_BYTES: usize = 4 << 20;

pub async fn list(State(st): State<AppState>, Extension(catalog): Extension<Arc<Catalog>>, _t: Tenant) -> Json<Value> {
    let created = crate::now_unix();
    let mut models = st.router.model_list();
    let mut seen: std::collections::HashSet<String> = models.iter().map(|(id, _)| id.clone()).collect();
    for (id, owner) in catalog.fetched().await {
        if seen.insert(id.clone()) {
            models.push((id, owner));
        }
    }
    let data: Vec<Value> = models
        .into_iter()
        .map(|(id, owner)| json!({"id": id, "object": "model", "created": created, "owned_by": owner, "shutdown_date": null}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

/// The model lists of the catch-all upstreams, fetched on demand and cached.
pub struct Catalog {
    sources: Vec<Source>,
}

struct Source {
    name: String,
    url: String,
    key: Option<Secret>,
    client: reqwest::Client,
    cache: Mutex<Cached>,
}

#[derive(Default)]
struct Cached {
    models: Vec<(String, String)>,
    /// When the list is to be fetched again; `None` before the first fetch.
    refresh_at: Option<Instant>,
}

impl Catalog {
    pub fn new(upstreams: &[UpstreamConfig]) -> Catalog {
        let sources = upstreams.iter().filter(|u| u.models.iter().any(|m| m == "*")).filter_map(Source::new).collect();
        Catalog { sources }
    }

    /// (id, owner) of every model the catch-all upstreams list, in their order.
    pub async fn fetched(&self) -> Vec<(String, String)> {
        let lists = futures::future::join_all(self.sources.iter().map(Source::models)).await;
        lists.into_iter().flatten().collect()
    }
}

impl Source {
    fn new(u: &UpstreamConfig) -> Option<Source> {
        let mut b = reqwest::Client::builder().timeout(FETCH_TIMEOUT);
        if let Some(path) = &u.ca_file {
            let pem = std::fs::read(path).ok()?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem).ok()? {
                b = b.add_root_certificate(cert);
            }
        }
        let client = b.build().map_err(|e| tracing::warn!(upstream = %u.name, error = %e, "cannot list this upstream's models")).ok()?;
        Some(Source { name: u.name.clone(), url: format!("{}/models", u.base_url), key: u.api_key.clone(), client, cache: Mutex::default() })
    }

    async fn models(&self) -> Vec<(String, String)> {
        let mut c = self.cache.lock().await;
        if c.refresh_at.is_none_or(|t| Instant::now() >= t) {
            match self.fetch().await {
                Ok(models) => {
                    c.models = models;
                    c.refresh_at = Some(Instant::now() + LIST_TTL);
                }
                Err(e) => {
                    tracing::warn!(upstream = %self.name, error = %e, "listing the upstream's models failed; serving the last list");
                    c.refresh_at = Some(Instant::now() + RETRY_AFTER);
                }
            }
        }
        c.models.clone()
    }

    async fn fetch(&self) -> Result<Vec<(String, String)>, String> {
        let mut req = self.client.get(&self.url);
        if let Some(k) = &self.key {
            req = req.bearer_auth(k.expose());
        }
        let resp = req.send().await.map_err(|e| format!("request failed: {}", e.without_url()))?;
        if !resp.status().is_success() {
            return Err(format!("answered {}", resp.status()));
        }
        let mut body = Vec::new();
        let mut chunks = resp.bytes_stream();
        while let Some(chunk) = chunks.next().await {
            body.extend_from_slice(&chunk.map_err(|e| format!("reading the answer failed: {}", e.without_url()))?);
            if body.len() > MAX_LIST_BYTES {
                return Err(format!("the list is larger than {MAX_LIST_BYTES} bytes"));
            }
        }
        parse_list(&body, &self.name)
    }
}

/// Reads `{"data": [{"id", "owned_by"}…]}`; entries without a string id are skipped.
fn parse_list(body: &[u8], upstream: &str) -> Result<Vec<(String, String)>, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("the answer is not JSON: {e}"))?;
    let data = v.get("data").and_then(Value::as_array).ok_or("the answer has no data list")?;
    Ok(data
        .iter()
        .filter_map(|m| {
            let id = m.get("id")?.as_str()?.to_string();
            let owner = m.get("owned_by").and_then(Value::as_str).unwrap_or(upstream).to_string();
            Some((id, owner))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_are_read_leniently() {
        let body = br#"{"object":"list","data":[{"id":"a","owned_by":"org"},{"id":"b"},{"id":5},{"name":"c"}]}"#;
        assert_eq!(parse_list(body, "up").unwrap(), vec![("a".into(), "org".into()), ("b".into(), "up".into())]);
        assert!(parse_list(b"<html>", "up").is_err());
        assert!(parse_list(br#"{"models":[]}"#, "up").is_err());
    }
}
