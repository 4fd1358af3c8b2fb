//! The HTTP side of the client commands (`submit`, `status`, `download`, `cancel`, `list`
//! and `status --watch`): a server URL and an API key, requests under `/v1`, and the server's
//! error envelope turned into a message with a hint for a refused key.

use anyhow::{bail, Context};
use clap::Args;
use serde_json::Value;

use crate::config::Secret;

/// The statuses a batch ends in.
pub(super) const FINAL: [&str; 4] = ["completed", "failed", "expired", "cancelled"];

#[derive(Args, Debug, Clone)]
pub struct ServerArgs {
    /// The batchd server's URL.
    #[arg(long, env = "BATCHD_SERVER", default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// API key, when the server has tenants configured.
    #[arg(long, env = "BATCHD_API_KEY", hide_env_values = true)]
    pub api_key: Option<Secret>,
}

pub(super) struct Client {
    http: reqwest::Client,
    base: String,
    key: Option<Secret>,
}

impl Client {
    pub(super) fn new(a: &ServerArgs) -> Client {
        Client { http: reqwest::Client::new(), base: format!("{}/v1", a.server.trim_end_matches('/')), key: a.api_key.clone() }
    }

    pub(super) fn req(&self, m: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(m, format!("{}{path}", self.base));
        match &self.key {
            Some(k) => r.bearer_auth(k.expose()),
            None => r,
        }
    }

    pub(super) async fn send(&self, r: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        let resp = r.send().await.with_context(|| format!("cannot reach the server at {}", self.base))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or_default();
        let message = body["error"]["message"].as_str().unwrap_or("(no message)");
        if status == reqwest::StatusCode::UNAUTHORIZED {
            let hint = if self.key.is_some() {
                "the API key given is not one of the server's: check --api-key / BATCHD_API_KEY"
            } else {
                "pass --api-key KEY (or set BATCHD_API_KEY)"
            };
            bail!("server answered {status}: {message}\n{hint}");
        }
        bail!("server answered {status}: {message}")
    }

    pub(super) async fn json(&self, r: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        Ok(self.send(r).await?.json().await?)
    }
}
