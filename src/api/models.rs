//! `GET /v1/models`: every model and alias the router can serve; `GET /v1/models/{id}`: one.
//!
//! An upstream that serves every model (`models = ["*"]`) is asked for its own list
//! (`GET {base_url}/models`), which is cached for [`LIST_TTL`]. A failed fetch is tolerated:
//! the last good list is served (or none), and the fetch is tried again after [`RETRY_AFTER`].

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::{Extension, Json};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::{AppState, Tenant};
use crate::config::{Secret, UpstreamConfig};
use crate::error::{ApiError, ApiResult};

/// How long a fetched list is served before it is fetched again.
pub const LIST_TTL: Duration = Duration::from_secs(300);
/// How long after a failed fetch the next one is tried.
pub const RETRY_AFTER: Duration = Duration::from_secs(15);
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// A model list larger than this is not read.
const MAX_LIST_BYTES: usize = 4 << 20;

/// The `created` of every model: batchd cannot know when a model was made, and upstreams do
/// not agree (vLLM answers the time of the call), so it is one fixed time (2024-01-01), the
/// same on every call and every node.
pub const CREATED: i64 = 1_704_067_200;

pub async fn list(State(st): State<AppState>, Extension(catalog): Extension<Arc<Catalog>>, _t: Tenant) -> Json<Value> {
    let data: Vec<Value> = models(&st, &catalog).await.into_iter().map(|(id, owner)| model_object(&id, &owner)).collect();
    Json(json!({"object": "list", "data": data}))
}

/// `GET /v1/models/{id}` (the SDK's `client.models.retrieve`): one model or alias of the
/// list; an id may hold slashes (`meta-llama/Llama-3.1-8B-Instruct`).
pub async fn retrieve(State(st): State<AppState>, Extension(catalog): Extension<Arc<Catalog>>, _t: Tenant, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    match models(&st, &catalog).await.into_iter().find(|(m, _)| *m == id) {
        Some((id, owner)) => Ok(Json(model_object(&id, &owner))),
        None => Err(ApiError::not_found(format!("The model '{id}' does not exist")).param("model").code("model_not_found")),
    }
}

/// (id, owner) of every model and alias the router serves by name, then those the
/// catch-all upstreams list, each once.
async fn models(st: &AppState, catalog: &Catalog) -> Vec<(String, String)> {
    let mut models = st.router.model_list();
    let mut seen: std::collections::HashSet<String> = models.iter().map(|(id, _)| id.clone()).collect();
    for (id, owner) in catalog.fetched().await {
        if seen.insert(id.clone()) {
            models.push((id, owner));
        }
    }
    models
}

fn model_object(id: &str, owner: &str) -> Value {
    json!({"id": id, "object": "model", "created": CREATED, "owned_by": owner, "shutdown_date": null})
}

/// The model lists of the catch-all upstreams, fetched on demand and cached.
pub struct Catalog {
    sources: Vec<Source>,
    ttl: Duration,
    retry_after: Duration,
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
        Self::with_timing(upstreams, LIST_TTL, RETRY_AFTER)
    }

    fn with_timing(upstreams: &[UpstreamConfig], ttl: Duration, retry_after: Duration) -> Catalog {
        let sources = upstreams.iter().filter(|u| u.models.iter().any(|m| m == "*")).filter_map(Source::new).collect();
        Catalog { sources, ttl, retry_after }
    }

    /// (id, owner) of every model the catch-all upstreams list, in their order.
    pub async fn fetched(&self) -> Vec<(String, String)> {
        let lists = futures::future::join_all(self.sources.iter().map(|s| s.models(self.ttl, self.retry_after))).await;
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

    async fn models(&self, ttl: Duration, retry_after: Duration) -> Vec<(String, String)> {
        let mut c = self.cache.lock().await;
        if c.refresh_at.is_none_or(|t| Instant::now() >= t) {
            match self.fetch().await {
                Ok(models) => {
                    c.models = models;
                    c.refresh_at = Some(Instant::now() + ttl);
                }
                Err(e) => {
                    tracing::warn!(upstream = %self.name, error = %e, "listing the upstream's models failed; serving the last list");
                    c.refresh_at = Some(Instant::now() + retry_after);
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
    use axum::response::IntoResponse;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// An upstream whose `/v1/models` counts its calls and fails while `failing` is set.
    async fn upstream(calls: Arc<AtomicUsize>, failing: Arc<AtomicBool>) -> String {
        let app = axum::Router::new().route(
            "/v1/models",
            axum::routing::get(move || async move {
                calls.fetch_add(1, Ordering::SeqCst);
                if failing.load(Ordering::SeqCst) {
                    return (axum::http::StatusCode::SERVICE_UNAVAILABLE, "down").into_response();
                }
                Json(json!({"data": [{"id": "up-1", "owned_by": "acme"}, {"id": "up-2"}]})).into_response()
            }),
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1", l.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(l, app).await });
        url
    }

    fn cfg(url: &str, models: &[&str]) -> Vec<UpstreamConfig> {
        let raw =
            crate::config::RawUpstream { name: "u".into(), base_url: url.into(), models: models.iter().map(|m| m.to_string()).collect(), ..Default::default() };
        crate::config::RawConfig { upstreams: vec![raw], ..Default::default() }.resolve().unwrap().upstreams
    }

    #[tokio::test]
    async fn lists_are_cached_refreshed_and_kept_through_failures() {
        let (calls, failing) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
        let url = upstream(calls.clone(), failing.clone()).await;
        let want = vec![("up-1".to_string(), "acme".to_string()), ("up-2".to_string(), "u".to_string())];
        let c = Catalog::with_timing(&cfg(&url, &["*"]), Duration::from_millis(300), Duration::from_millis(300));
        assert_eq!(c.fetched().await, want);
        assert_eq!(c.fetched().await, want);
        assert_eq!(calls.load(Ordering::SeqCst), 1, "cached within the TTL");
        failing.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert_eq!(c.fetched().await, want, "a failed refresh serves the last list");
        assert_eq!(c.fetched().await, want);
        assert_eq!(calls.load(Ordering::SeqCst), 2, "a failed fetch is not retried at once");
        assert!(Catalog::new(&cfg(&url, &["only-this"])).fetched().await.is_empty(), "only catch-all upstreams are asked");
        let fresh = Catalog::new(&cfg(&url, &["*"]));
        assert!(fresh.fetched().await.is_empty(), "a failing upstream lists nothing, and no error");
    }

    #[test]
    fn lists_are_read_leniently() {
        let body = br#"{"object":"list","data":[{"id":"a","owned_by":"org"},{"id":"b"},{"id":5},{"name":"c"}]}"#;
        assert_eq!(parse_list(body, "up").unwrap(), vec![("a".into(), "org".into()), ("b".into(), "up".into())]);
        assert!(parse_list(b"<html>", "up").is_err());
        assert!(parse_list(br#"{"models":[]}"#, "up").is_err());
    }
}
