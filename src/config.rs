//! Configuration: layered input ([`RawConfig`]) resolved once into a ready [`Config`].
//!
//! Layers, lowest first: built-in defaults < `batchd.toml` (or `--config FILE`) <
//! `BATCHD_*` environment variables < command-line flags. The CLI merges its flags (which
//! clap already fills from the environment) into a [`RawConfig`] read from the file, then
//! calls [`RawConfig::resolve`]. Upstream API keys are read from the environment variable
//! each upstream names, at that step, and are held as [`Secret`]s that never print.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A configuration problem, reported before anything starts.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The cause is the error's `source` (printed once, after the path, by `{:#}`).
    #[error("cannot read config file {}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid config file {}", path.display())]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

pub use crate::secret::{Secret, REDACTED};

/// The file and environment layers, as written by the user. Every field is optional.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub tenants: Vec<RawTenant>,
    #[serde(default)]
    pub upstreams: Vec<RawUpstream>,
    #[serde(default)]
    pub batches: RawBatches,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub engine: RawEngine,
    /// Prices per model (or alias), for cost estimates: `[prices."gpt-4o-mini"]`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub prices: BTreeMap<String, Price>,
    /// The webhook of the tenant `default` (no tenants configured), and of any tenant that
    /// sets none itself.
    #[serde(default)]
    pub webhooks: RawWebhook,
}

/// Dollars (or any currency) per million tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    #[serde(default)]
    pub input_per_million: f64,
    #[serde(default)]
    pub output_per_million: f64,
    /// Share taken off for batch work: 0.5 means half price, as the hosted Batch API charges.
    #[serde(default)]
    pub batch_discount: f64,
}

impl Price {
    /// The cost of `input` and `output` tokens at this price, batch discount applied.
    pub fn cost(&self, input: i64, output: i64) -> f64 {
        self.full_cost(input, output) * (1.0 - self.batch_discount)
    }

    /// The cost without the batch discount (lines a batch upstream's `fallback` ran online).
    pub fn full_cost(&self, input: i64, output: i64) -> f64 {
        (input.max(0) as f64 * self.input_per_million + output.max(0) as f64 * self.output_per_million) / 1e6
    }
}

/// Where a tenant's batch events are POSTed (Standard Webhooks), as written.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebhook {
    pub url: Option<String>,
    /// `whsec_` + base64 of the key, as OpenAI issues them (another string is the key itself).
    pub secret: Option<Secret>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub insecure_no_auth: Option<bool>,
    /// `postgres://…` or `sqlite://PATH` (default: SQLite in the data directory).
    pub database: Option<String>,
    /// `s3://BUCKET/PREFIX` or `file://PATH` (default: `blobs/` in the data directory).
    pub blob: Option<String>,
    /// Seconds a client has to send a request's head (also bounds a keep-alive wait).
    pub header_read_timeout_s: Option<f64>,
    /// Seconds without a byte in either direction after which a connection is closed.
    pub idle_timeout_s: Option<f64>,
    /// Seconds a request may take to be answered (uploads and downloads excepted).
    pub request_timeout_s: Option<f64>,
    /// Open client connections at most; more wait to be accepted.
    pub max_connections: Option<usize>,
    /// Event streams open at once, all tenants together (below `max_connections`, so that
    /// streams never take every connection); default half of `max_connections`.
    pub max_streams: Option<usize>,
    /// Event streams one tenant may hold open at once.
    pub max_streams_per_tenant: Option<usize>,
    /// Seconds after which an event stream ends (its client resumes with `Last-Event-ID`).
    pub stream_lifetime_s: Option<f64>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawTenant {
    pub name: String,
    #[serde(default)]
    pub api_keys: Vec<Secret>,
    pub webhook_url: Option<String>,
    pub webhook_secret: Option<Secret>,
    /// Most lines without a result this tenant may have queued; a create beyond it is a 429.
    pub max_queued_requests: Option<u64>,
    /// Most estimated input tokens of lines without a result this tenant may have queued.
    pub max_queued_tokens: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub name: String,
    pub base_url: String,
    pub api_key_env: Option<String>,
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default)]
    pub aliases: BTreeMap<String, String>,
    pub max_concurrency: Option<usize>,
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub timeout_s: Option<f64>,
    pub max_attempts: Option<u32>,
    /// PEM file of extra certificate authorities to trust for an `https://` upstream (an
    /// internal CA, a self-signed server), besides the public (webpki) roots.
    pub ca_file: Option<PathBuf>,
    /// Largest answer body accepted; a larger one is an error line `response_too_large`.
    pub max_response_bytes: Option<u64>,
    /// `throughput` (default): take all the upstream will give. `standby`: keep its latency
    /// near the knee, yielding to online traffic.
    pub mode: Option<UpstreamMode>,
    /// vLLM's or SGLang's Prometheus `/metrics`: queued requests there also slow standby.
    pub metrics_url: Option<String>,
    /// The API the upstream speaks: `openai` (default: chat completions and the other
    /// OpenAI endpoints) or `anthropic` (`/v1/messages`, `x-api-key`, `anthropic-version`).
    pub api: Option<UpstreamApi>,
    /// `api = "anthropic"` only: the `max_tokens` sent for a chat-completions line that sets
    /// none (Anthropic requires it). Unset: such a line fails validation.
    pub default_max_tokens: Option<u64>,
    /// Dispatch a batch's lines grouped by shared prompt prefix, longest first, so that the
    /// server's prefix cache computes each shared prefix once (default `true`; embeddings and
    /// moderations are always sent in file order).
    pub prefix_order: Option<bool>,
    /// `online` (default: each line is one call), `openai-batch` or `anthropic-batch` (lines
    /// are gathered into remote batches at a hosted Batch API; see `engine::remote` and
    /// docs/remote-batches.md).
    pub kind: Option<UpstreamKind>,
    /// Batch kinds: most lines in one remote batch (default 50,000, the hosted API's cap).
    pub max_lines: Option<u64>,
    /// Batch kinds: most bytes in one remote batch's input file (default 200 MB).
    pub max_bytes: Option<u64>,
    /// Batch kinds: first interval between polls of a remote batch; it doubles up to 60 s
    /// (default 5 s).
    pub poll_interval_s: Option<f64>,
    /// Batch kinds: the `completion_window` asked of the remote (default `24h`).
    pub completion_window: Option<String>,
    /// Batch kinds: an online upstream serving the same models, to which the lines a remote
    /// batch could not finish in time (it expired, or the window allows no follow-up) are
    /// sent, at full price (default: none, they fail).
    pub fallback: Option<String>,
}

/// How an upstream is used: one call per line, or remote batches at a hosted Batch API.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamKind {
    #[default]
    Online,
    /// The OpenAI Batch + Files API at `base_url` (OpenAI, compatible providers, a batchd).
    OpenaiBatch,
    /// Anthropic's Message Batches API at `base_url` (Anthropic, a batchd); implies `api =
    /// "anthropic"`.
    AnthropicBatch,
}

impl UpstreamKind {
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamKind::Online => "online",
            UpstreamKind::OpenaiBatch => "openai-batch",
            UpstreamKind::AnthropicBatch => "anthropic-batch",
        }
    }

    pub fn is_batch(self) -> bool {
        self != UpstreamKind::Online
    }
}

/// How lines are gathered into remote batches at a batch-kind upstream.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteBatchConfig {
    pub max_lines: u64,
    pub max_bytes: u64,
    pub poll_interval: Duration,
    pub completion_window: String,
    /// The online upstream that takes what the remote cannot finish in time.
    pub fallback: Option<String>,
}

impl Default for RemoteBatchConfig {
    fn default() -> Self {
        RemoteBatchConfig { max_lines: 50_000, max_bytes: 200 * MB, poll_interval: Duration::from_secs(5), completion_window: "24h".into(), fallback: None }
    }
}

impl RemoteBatchConfig {
    /// The hosted API's own caps as defaults: OpenAI's 50,000 lines / 200 MB, Anthropic's
    /// 100,000 requests / 256 MB.
    pub fn for_kind(kind: UpstreamKind) -> RemoteBatchConfig {
        match kind {
            UpstreamKind::AnthropicBatch => RemoteBatchConfig { max_lines: 100_000, max_bytes: 256 * MB, ..Default::default() },
            _ => RemoteBatchConfig::default(),
        }
    }
}

/// The API an upstream speaks; lines in the other one are translated (`upstream::translate`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamApi {
    #[default]
    OpenAi,
    Anthropic,
}

impl UpstreamApi {
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamApi::OpenAi => "openai",
            UpstreamApi::Anthropic => "anthropic",
        }
    }

    /// The API's name in a sentence.
    pub fn words(self) -> &'static str {
        match self {
            UpstreamApi::OpenAi => "OpenAI's API",
            UpstreamApi::Anthropic => "Anthropic's Messages API",
        }
    }
}

/// How an upstream is shared (see `upstream::control`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamMode {
    #[default]
    Throughput,
    Standby,
}

impl UpstreamMode {
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamMode::Throughput => "throughput",
            UpstreamMode::Standby => "standby",
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawBatches {
    pub completion_windows: Option<Vec<String>>,
    /// Whether cancel lets in-flight requests finish (true) or aborts them (false, default).
    pub finish_in_flight_on_cancel: Option<bool>,
    /// Seconds without a new result (while lines remain) after which a batch is stalled.
    pub stall_after_s: Option<f64>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub max_lines: Option<u64>,
    pub max_file_bytes: Option<u64>,
    pub max_upload_bytes: Option<u64>,
    pub max_line_bytes: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawEngine {
    pub commit_interval_ms: Option<u64>,
    pub commit_min_results: Option<usize>,
    pub commit_max_results: Option<usize>,
    pub unit_lines: Option<u64>,
    pub lease_ttl_s: Option<u64>,
}

/// The validated configuration that every other module reads.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub insecure_no_auth: bool,
    /// The metadata store; `None`: embedded SQLite in `data_dir` (see [`crate::backend`]).
    pub database: Option<crate::store::DatabaseUrl>,
    /// The blob store; `None`: a directory in `data_dir`.
    pub blob: Option<crate::blob::BlobUrl>,
    /// API key → tenant name. Empty: no authentication, every call is tenant `default`.
    pub api_keys: BTreeMap<Secret, String>,
    pub upstreams: Vec<UpstreamConfig>,
    pub completion_windows: Vec<(String, Duration)>,
    pub finish_in_flight_on_cancel: bool,
    pub limits: Limits,
    pub engine: EngineConfig,
    pub prices: BTreeMap<String, Price>,
    pub http: HttpLimits,
    /// Per tenant: webhook and quotas (a tenant without an entry has neither, except the
    /// `[webhooks]` fallback).
    pub tenants: BTreeMap<String, TenantConfig>,
    /// `[webhooks]`: the webhook of tenants that set none.
    pub webhook: Option<Webhook>,
    pub stall_after: Duration,
}

/// How long and how many client connections the HTTP server keeps (see [`crate::http`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HttpLimits {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub request_timeout: Duration,
    pub max_connections: usize,
    pub streams: StreamLimits,
}

/// How many event streams may be open, and for how long (see `api::events`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StreamLimits {
    /// All tenants together; always below `max_connections`.
    pub max_open: usize,
    pub per_tenant: usize,
    pub lifetime: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        let max_connections = 1024;
        HttpLimits {
            header_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(75),
            request_timeout: Duration::from_secs(60),
            max_connections,
            streams: StreamLimits { max_open: max_connections / 2, per_tenant: 32, lifetime: Duration::from_secs(300) },
        }
    }
}

impl HttpLimits {
    /// How often an event stream with nothing to say sends a comment: often enough that the
    /// idle timeout never closes it (a third of it), at most every 15 s.
    pub fn keep_alive(&self) -> Duration {
        (self.idle_timeout / 3).min(Duration::from_secs(15))
    }
}

/// A tenant's own settings besides its keys.
#[derive(Debug, Clone, Default)]
pub struct TenantConfig {
    pub webhook: Option<Webhook>,
    pub max_queued_requests: Option<u64>,
    pub max_queued_tokens: Option<u64>,
}

/// A webhook endpoint and the key its deliveries are signed with.
#[derive(Debug, Clone)]
pub struct Webhook {
    pub url: String,
    /// The HMAC key: the base64-decoded part of a `whsec_…` secret.
    pub key: Secret,
    /// The secret as written (shown redacted by `--print-config`).
    pub secret: Secret,
}

impl Webhook {
    fn effective(&self) -> RawWebhook {
        RawWebhook { url: Some(self.url.clone()), secret: Some(self.secret.clone()) }
    }
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub name: String,
    pub base_url: String,
    pub api_key: Option<Secret>,
    pub models: Vec<String>,
    pub aliases: BTreeMap<String, String>,
    pub max_concurrency: usize,
    pub rpm: u64,
    pub tpm: u64,
    pub timeout: Duration,
    pub max_attempts: u32,
    pub ca_file: Option<PathBuf>,
    pub max_response_bytes: u64,
    /// The environment variable the key was read from (printed by `--print-config`).
    pub api_key_env: Option<String>,
    pub mode: UpstreamMode,
    pub metrics_url: Option<String>,
    pub api: UpstreamApi,
    pub default_max_tokens: Option<u64>,
    pub prefix_order: bool,
    pub kind: UpstreamKind,
    /// Batch kinds only: how lines are gathered into remote batches.
    pub remote: RemoteBatchConfig,
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_lines: u64,
    pub max_file_bytes: u64,
    pub max_upload_bytes: u64,
    pub max_line_bytes: u64,
}

#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Longest a result waits before its group is committed.
    pub commit_interval: Duration,
    /// A group is committed as soon as it holds this many results.
    pub commit_min_results: usize,
    pub commit_max_results: usize,
    pub unit_lines: u64,
    pub lease_ttl: Duration,
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_DATA_DIR: &str = "batchd-data";
pub const DEFAULT_CONCURRENCY: usize = 64;
/// The largest input file a batch may have (line numbers stay below 2^32).
pub const MAX_FILE_BYTES: u64 = u32::MAX as u64;
/// 32 MB: far above any chat or embeddings answer, far below what would hurt memory.
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 32 << 20;
const MB: u64 = 1_000_000;

impl Default for Limits {
    /// 1,000,000 lines and 2 GB: the sizes batchd is tested at (`bench/run.sh`: peak RSS
    /// under 30 MB whatever the number of lines). The hosted API allows 50,000 and 200 MB.
    fn default() -> Self {
        Limits { max_lines: 1_000_000, max_file_bytes: 2000 * MB, max_upload_bytes: 2000 * MB, max_line_bytes: 10 * MB }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            commit_interval: Duration::from_millis(150),
            commit_min_results: 512,
            commit_max_results: 1000,
            unit_lines: 2000,
            lease_ttl: Duration::from_secs(30),
        }
    }
}

impl RawConfig {
    /// Reads a TOML file. A missing *default* file is not an error: the caller decides.
    pub fn from_file(path: &Path) -> Result<RawConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.to_owned(), source })
    }

    /// Reads `--config FILE` when given, else `./batchd.toml` when it exists, else defaults.
    pub fn load(explicit: Option<&Path>) -> Result<RawConfig, ConfigError> {
        match explicit {
            Some(p) => Self::from_file(p),
            None if Path::new("batchd.toml").exists() => Self::from_file(Path::new("batchd.toml")),
            None => Ok(RawConfig::default()),
        }
    }

    /// Adds the single catch-all upstream of `--upstream URL` (or of `OPENAI_BASE_URL` and
    /// `OPENAI_API_KEY` when no upstream is configured at all).
    pub fn with_catch_all_upstream(mut self, url: Option<String>, concurrency: Option<usize>) -> Self {
        let (url, key_env) = match url {
            Some(u) => (Some(u), None),
            None if self.upstreams.is_empty() => match std::env::var("OPENAI_BASE_URL") {
                Ok(u) if !u.is_empty() => (Some(u), Some("OPENAI_API_KEY".to_string())),
                _ => (None, None),
            },
            None => (None, None),
        };
        if let Some(base_url) = url {
            self.upstreams.retain(|u| u.name != "default");
            self.upstreams.push(RawUpstream {
                name: "default".into(),
                base_url,
                api_key_env: key_env,
                models: vec!["*".into()],
                max_concurrency: concurrency,
                ..Default::default()
            });
        } else if let Some(c) = concurrency {
            for u in &mut self.upstreams {
                u.max_concurrency = Some(c);
            }
        }
        self
    }

    /// Validates everything once; the result is ready to use.
    pub fn resolve(self) -> Result<Config, ConfigError> {
        let listen_text = self.server.listen.clone().unwrap_or_else(|| DEFAULT_LISTEN.to_string());
        let listen: SocketAddr = listen_text.parse().map_err(|_| ConfigError::Invalid(format!("listen address {listen_text:?} is not HOST:PORT")))?;
        let api_keys = resolve_tenants(&self.tenants)?;
        let upstreams = self.upstreams.iter().map(resolve_upstream).collect::<Result<Vec<_>, _>>()?;
        check_unique_names(&upstreams)?;
        check_fallbacks(&upstreams)?;
        let windows = self.batches.completion_windows.clone().unwrap_or_else(|| vec!["24h".into()]);
        let completion_windows = windows.iter().map(|w| parse_window(w).map(|d| (w.clone(), d))).collect::<Result<Vec<_>, _>>()?;
        Ok(Config {
            listen,
            data_dir: self.server.data_dir.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            insecure_no_auth: self.server.insecure_no_auth.unwrap_or(false),
            database: self.server.database.as_deref().filter(|u| !u.is_empty()).map(str::parse).transpose().map_err(ConfigError::Invalid)?,
            blob: self.server.blob.as_deref().filter(|u| !u.is_empty()).map(str::parse).transpose().map_err(ConfigError::Invalid)?,
            api_keys,
            upstreams,
            completion_windows,
            finish_in_flight_on_cancel: self.batches.finish_in_flight_on_cancel.unwrap_or(false),
            limits: resolve_limits(&self.limits)?,
            engine: resolve_engine(&self.engine)?,
            prices: resolve_prices(&self.prices)?,
            http: resolve_http(&self.server)?,
            tenants: self.tenants.iter().map(|t| Ok((t.name.clone(), resolve_tenant(t)?))).collect::<Result<_, ConfigError>>()?,
            webhook: resolve_webhook("[webhooks]", &self.webhooks)?,
            stall_after: resolve_stall(self.batches.stall_after_s)?,
        })
    }
}

fn resolve_prices(prices: &BTreeMap<String, Price>) -> Result<BTreeMap<String, Price>, ConfigError> {
    let amount = |x: f64| x.is_finite() && x >= 0.0;
    for (model, p) in prices {
        if !(0.0..=1.0).contains(&p.batch_discount) || !amount(p.input_per_million) || !amount(p.output_per_million) {
            return Err(ConfigError::Invalid(format!("[prices.{model:?}]: prices must be finite numbers >= 0 and batch_discount within 0..=1")));
        }
    }
    Ok(prices.clone())
}

fn resolve_tenant(t: &RawTenant) -> Result<TenantConfig, ConfigError> {
    let raw = RawWebhook { url: t.webhook_url.clone(), secret: t.webhook_secret.clone() };
    Ok(TenantConfig {
        webhook: resolve_webhook(&format!("tenant {:?}", t.name), &raw)?,
        max_queued_requests: t.max_queued_requests,
        max_queued_tokens: t.max_queued_tokens,
    })
}

/// A webhook needs both a URL and a secret; a `whsec_` secret must be valid base64.
fn resolve_webhook(whose: &str, w: &RawWebhook) -> Result<Option<Webhook>, ConfigError> {
    use base64::Engine as _;
    let bad = |what: &str| ConfigError::Invalid(format!("{whose}: {what}"));
    let (url, secret) = match (&w.url, &w.secret) {
        (None, None) => return Ok(None),
        (Some(u), Some(s)) => (u, s),
        _ => return Err(bad("a webhook needs both a URL and a secret")),
    };
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(bad("the webhook URL must start with http:// or https://"));
    }
    let written = secret.clone();
    let secret = secret.expose();
    let key = match secret.strip_prefix("whsec_") {
        Some(b64) => base64::engine::general_purpose::STANDARD.decode(b64).map_err(|_| bad("the webhook secret after whsec_ is not base64"))?,
        None => secret.as_bytes().to_vec(),
    };
    if key.is_empty() {
        return Err(bad("the webhook secret is empty"));
    }
    // The key is kept as text (base64) inside the redacting Secret.
    Ok(Some(Webhook { url: url.clone(), key: Secret::new(base64::engine::general_purpose::STANDARD.encode(key)), secret: written }))
}

fn resolve_stall(s: Option<f64>) -> Result<Duration, ConfigError> {
    let s = s.unwrap_or(120.0);
    if !(s.is_finite() && s >= 0.5) {
        return Err(ConfigError::Invalid("batches.stall_after_s must be at least 0.5".into()));
    }
    Ok(Duration::from_secs_f64(s))
}

/// The tenant every call belongs to on a server without API keys.
pub const DEFAULT_TENANT: &str = "default";

/// API key → tenant. Each tenant is named once; each has keys, except `default` on a server
/// where no tenant has any (its webhook or quotas, without authentication).
fn resolve_tenants(tenants: &[RawTenant]) -> Result<BTreeMap<Secret, String>, ConfigError> {
    let mut keys = BTreeMap::new();
    let mut names = std::collections::HashSet::new();
    let auth = tenants.iter().any(|t| !t.api_keys.is_empty());
    for t in tenants {
        if t.name.trim().is_empty() {
            return Err(ConfigError::Invalid("a tenant has an empty name".into()));
        }
        if !names.insert(t.name.as_str()) {
            return Err(ConfigError::Invalid(format!("two [[tenants]] are named {:?}; give each tenant one entry (with all its keys)", t.name)));
        }
        if t.api_keys.is_empty() && (auth || t.name != DEFAULT_TENANT) {
            return Err(ConfigError::Invalid(format!(
                "tenant {:?} has no api_keys, so no call could reach it; give it at least one key (a server without keys serves only the tenant {DEFAULT_TENANT:?})",
                t.name
            )));
        }
        for k in &t.api_keys {
            if k.expose().is_empty() {
                return Err(ConfigError::Invalid(format!("tenant {:?} has an empty API key", t.name)));
            }
            if keys.insert(k.clone(), t.name.clone()).is_some() {
                return Err(ConfigError::Invalid(format!("an API key of tenant {:?} is used twice", t.name)));
            }
        }
    }
    Ok(keys)
}

fn resolve_upstream(u: &RawUpstream) -> Result<UpstreamConfig, ConfigError> {
    let bad = |what: String| ConfigError::Invalid(format!("upstream {:?}: {what}", u.name));
    if !(u.base_url.starts_with("http://") || u.base_url.starts_with("https://")) {
        return Err(bad(format!("base_url {:?} must start with http:// or https://", u.base_url)));
    }
    let api_key = match &u.api_key_env {
        None => None,
        Some(var) => match std::env::var(var) {
            Ok(v) if !v.is_empty() => Some(Secret::new(v)),
            _ => return Err(bad(format!("environment variable {var} (api_key_env) is not set"))),
        },
    };
    // An alias routes by itself; its target is routable by its own id only when listed.
    let models = if u.models.is_empty() && u.aliases.is_empty() { vec!["*".to_string()] } else { u.models.clone() };
    if let Some(url) = u.metrics_url.as_deref().filter(|m| !(m.starts_with("http://") || m.starts_with("https://"))) {
        return Err(bad(format!("metrics_url {url:?} must start with http:// or https://")));
    }
    if u.ca_file.is_some() && !u.base_url.starts_with("https://") {
        return Err(bad("ca_file is only used with an https:// base_url".into()));
    }
    let kind = u.kind.unwrap_or_default();
    let api = api_of(u, kind).map_err(bad)?;
    if u.default_max_tokens.is_some() && api != UpstreamApi::Anthropic {
        return Err(bad("default_max_tokens is only used with api = \"anthropic\"".into()));
    }
    if u.default_max_tokens == Some(0) {
        return Err(bad("default_max_tokens must be at least 1".into()));
    }
    if u.max_concurrency == Some(0) {
        return Err(bad("max_concurrency (--concurrency, BATCHD_CONCURRENCY) must be at least 1".into()));
    }
    if u.max_attempts == Some(0) {
        return Err(bad("max_attempts must be at least 1".into()));
    }
    let timeout_s = u.timeout_s.unwrap_or(600.0);
    if !(timeout_s > 0.0 && timeout_s.is_finite()) {
        return Err(bad("timeout_s must be positive".into()));
    }
    let remote = resolve_remote(u, kind).map_err(bad)?;
    Ok(UpstreamConfig {
        name: u.name.clone(),
        base_url: u.base_url.trim_end_matches('/').to_string(),
        api_key,
        models,
        aliases: u.aliases.clone(),
        max_concurrency: u.max_concurrency.unwrap_or(DEFAULT_CONCURRENCY),
        rpm: u.rpm.unwrap_or(0),
        tpm: u.tpm.unwrap_or(0),
        timeout: Duration::from_secs_f64(timeout_s),
        max_attempts: u.max_attempts.unwrap_or(5),
        ca_file: u.ca_file.clone(),
        max_response_bytes: u.max_response_bytes.unwrap_or(DEFAULT_MAX_RESPONSE_BYTES).max(1024),
        api_key_env: u.api_key_env.clone(),
        mode: u.mode.unwrap_or_default(),
        metrics_url: u.metrics_url.clone(),
        api,
        default_max_tokens: u.default_max_tokens,
        prefix_order: u.prefix_order.unwrap_or(true),
        kind,
        remote,
    })
}

/// The API an upstream speaks: a batch kind names its own (`anthropic-batch` is Anthropic's
/// Messages, so chat lines are translated for it), and refuses another.
fn api_of(u: &RawUpstream, kind: UpstreamKind) -> Result<UpstreamApi, String> {
    let own = match kind {
        UpstreamKind::Online => return Ok(u.api.unwrap_or_default()),
        UpstreamKind::OpenaiBatch => UpstreamApi::OpenAi,
        UpstreamKind::AnthropicBatch => UpstreamApi::Anthropic,
    };
    match u.api {
        Some(api) if api != own => Err(format!("kind = \"{}\" speaks {}; it cannot be combined with api = \"{}\"", kind.as_str(), own.words(), api.as_str())),
        _ => Ok(own),
    }
}

/// The remote-batch settings of an upstream, refused on an online one.
fn resolve_remote(u: &RawUpstream, kind: UpstreamKind) -> Result<RemoteBatchConfig, String> {
    let d = RemoteBatchConfig::for_kind(kind);
    let set = u.max_lines.is_some() || u.max_bytes.is_some() || u.poll_interval_s.is_some() || u.completion_window.is_some() || u.fallback.is_some();
    match kind {
        UpstreamKind::Online if set => {
            return Err(
                "max_lines, max_bytes, poll_interval_s, completion_window and fallback are only used with a batch kind (\"openai-batch\", \"anthropic-batch\")"
                    .into(),
            )
        }
        UpstreamKind::Online => return Ok(d),
        UpstreamKind::OpenaiBatch | UpstreamKind::AnthropicBatch => {}
    }
    let poll = u.poll_interval_s.unwrap_or(d.poll_interval.as_secs_f64());
    if !(poll > 0.0 && poll.is_finite()) {
        return Err("poll_interval_s must be positive".into());
    }
    let cfg = RemoteBatchConfig {
        max_lines: u.max_lines.unwrap_or(d.max_lines),
        max_bytes: u.max_bytes.unwrap_or(d.max_bytes),
        poll_interval: Duration::from_secs_f64(poll),
        completion_window: u.completion_window.clone().unwrap_or(d.completion_window),
        fallback: u.fallback.clone(),
    };
    if cfg.max_lines == 0 || cfg.max_bytes == 0 {
        return Err("max_lines and max_bytes must be at least 1".into());
    }
    Ok(cfg)
}

/// A batch upstream's `fallback` names another upstream, an online one.
fn check_fallbacks(upstreams: &[UpstreamConfig]) -> Result<(), ConfigError> {
    for u in upstreams {
        let Some(name) = &u.remote.fallback else { continue };
        match upstreams.iter().find(|o| &o.name == name) {
            Some(o) if !o.kind.is_batch() => {}
            Some(_) => return Err(ConfigError::Invalid(format!("upstream {:?}: its fallback {name:?} is a batch upstream; it must be an online one", u.name))),
            None => return Err(ConfigError::Invalid(format!("upstream {:?}: its fallback {name:?} is no upstream", u.name))),
        }
    }
    Ok(())
}

fn check_unique_names(upstreams: &[UpstreamConfig]) -> Result<(), ConfigError> {
    let mut seen = std::collections::HashSet::new();
    match upstreams.iter().find(|u| !seen.insert(u.name.as_str())) {
        Some(u) => Err(ConfigError::Invalid(format!("two upstreams are named {:?}", u.name))),
        None => Ok(()),
    }
}

fn resolve_limits(l: &RawLimits) -> Result<Limits, ConfigError> {
    let d = Limits::default();
    let limits = Limits {
        max_lines: l.max_lines.unwrap_or(d.max_lines),
        max_file_bytes: l.max_file_bytes.unwrap_or(d.max_file_bytes),
        max_upload_bytes: l.max_upload_bytes.unwrap_or(d.max_upload_bytes),
        max_line_bytes: l.max_line_bytes.unwrap_or(d.max_line_bytes),
    };
    if limits.max_lines == 0 || limits.max_file_bytes == 0 || limits.max_upload_bytes == 0 || limits.max_line_bytes == 0 {
        return Err(ConfigError::Invalid("limits must be positive".into()));
    }
    // A result's key holds its physical line number in 32 bits, and a file has at most one
    // line per byte.
    if limits.max_file_bytes > MAX_FILE_BYTES {
        return Err(ConfigError::Invalid(format!("limits.max_file_bytes must be at most {MAX_FILE_BYTES} (4 GB)")));
    }
    Ok(limits)
}

fn resolve_engine(e: &RawEngine) -> Result<EngineConfig, ConfigError> {
    let d = EngineConfig::default();
    let cfg = EngineConfig {
        commit_interval: e.commit_interval_ms.map(Duration::from_millis).unwrap_or(d.commit_interval),
        commit_min_results: e.commit_min_results.unwrap_or(d.commit_min_results).max(1),
        commit_max_results: e.commit_max_results.unwrap_or(d.commit_max_results).max(1),
        unit_lines: e.unit_lines.unwrap_or(d.unit_lines).max(1),
        lease_ttl: e.lease_ttl_s.map(Duration::from_secs).unwrap_or(d.lease_ttl),
    };
    if cfg.lease_ttl < Duration::from_secs(3) {
        return Err(ConfigError::Invalid("engine.lease_ttl_s must be at least 3".into()));
    }
    Ok(cfg)
}

fn resolve_http(s: &RawServer) -> Result<HttpLimits, ConfigError> {
    let d = HttpLimits::default();
    let secs = |v: Option<f64>, name: &str, default: Duration| match v {
        None => Ok(default),
        Some(x) if x > 0.0 && x.is_finite() && x < 1e9 => Ok(Duration::from_secs_f64(x)),
        Some(_) => Err(ConfigError::Invalid(format!("server.{name} must be a positive number of seconds"))),
    };
    let max_connections = s.max_connections.unwrap_or(d.max_connections);
    if max_connections == 0 {
        return Err(ConfigError::Invalid("server.max_connections must be at least 1".into()));
    }
    let streams = StreamLimits {
        max_open: s.max_streams.unwrap_or(max_connections / 2),
        per_tenant: s.max_streams_per_tenant.unwrap_or(d.streams.per_tenant),
        lifetime: secs(s.stream_lifetime_s, "stream_lifetime_s", d.streams.lifetime)?,
    };
    if streams.max_open >= max_connections {
        return Err(ConfigError::Invalid(format!(
            "server.max_streams ({}) must be below server.max_connections ({max_connections}): event streams may never take every connection",
            streams.max_open
        )));
    }
    if streams.per_tenant == 0 {
        return Err(ConfigError::Invalid("server.max_streams_per_tenant must be at least 1".into()));
    }
    Ok(HttpLimits {
        header_read_timeout: secs(s.header_read_timeout_s, "header_read_timeout_s", d.header_read_timeout)?,
        idle_timeout: secs(s.idle_timeout_s, "idle_timeout_s", d.idle_timeout)?,
        request_timeout: secs(s.request_timeout_s, "request_timeout_s", d.request_timeout)?,
        max_connections,
        streams,
    })
}

/// Parses a completion window such as `24h`, `90m`, `30s` or `7d`.
pub fn parse_window(w: &str) -> Result<Duration, ConfigError> {
    let bad = || ConfigError::Invalid(format!("completion window {w:?} is not like 24h, 90m, 30s or 7d"));
    let (num, unit) = w.split_at(w.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(bad()),
    };
    if secs == 0 {
        return Err(bad());
    }
    Ok(Duration::from_secs(secs))
}

impl Config {
    /// The webhook a tenant's events go to: its own, else `[webhooks]`.
    pub fn webhook_for(&self, tenant: &str) -> Option<&Webhook> {
        self.tenants.get(tenant).and_then(|t| t.webhook.as_ref()).or(self.webhook.as_ref())
    }

    /// Where big one-off phases spill to disk (validation's duplicate detection): the data
    /// directory's `tmp/` when this node has one, else the system's temporary directory.
    pub fn scratch_dir(&self) -> Option<PathBuf> {
        (self.database.is_none() || self.blob.is_none()).then(|| self.data_dir.join("tmp"))
    }

    /// Whether calls must carry an API key.
    pub fn auth_enabled(&self) -> bool {
        !self.api_keys.is_empty()
    }

    /// The tenant whose key `key` is, comparing every key in constant time.
    pub fn tenant_for_key(&self, key: &str) -> Option<&str> {
        let mut found = None;
        for (k, tenant) in &self.api_keys {
            if k.matches(key) {
                found = Some(tenant.as_str());
            }
        }
        found
    }

    /// The effective configuration as TOML, secrets redacted (for `--print-config`): the
    /// resolved values in the layout of `batchd.toml`, serialized by serde.
    pub fn redacted_toml(&self) -> String {
        toml::to_string(&self.effective()).unwrap_or_else(|e| format!("# cannot print the configuration: {e}\n"))
    }

    /// Every tenant, with its keys (`keys`, by tenant), webhook and quotas.
    fn effective_tenants(&self, mut keys: BTreeMap<&str, Vec<Secret>>) -> Vec<RawTenant> {
        let mut names: std::collections::BTreeSet<&str> = keys.keys().copied().collect();
        names.extend(self.tenants.keys().map(String::as_str));
        names
            .into_iter()
            .map(|name| {
                let t = self.tenants.get(name).cloned().unwrap_or_default();
                let webhook = t.webhook.as_ref().map(Webhook::effective).unwrap_or_default();
                RawTenant {
                    name: name.into(),
                    api_keys: keys.remove(name).unwrap_or_default(),
                    webhook_url: webhook.url,
                    webhook_secret: webhook.secret,
                    max_queued_requests: t.max_queued_requests,
                    max_queued_tokens: t.max_queued_tokens,
                }
            })
            .collect()
    }

    /// The resolved configuration as a [`RawConfig`] (every field set, keys as [`Secret`]s).
    pub fn effective(&self) -> RawConfig {
        let mut tenants: BTreeMap<&str, Vec<Secret>> = BTreeMap::new();
        for (key, t) in &self.api_keys {
            tenants.entry(t).or_default().push(key.clone());
        }
        let h = &self.http;
        RawConfig {
            server: RawServer {
                listen: Some(self.listen.to_string()),
                data_dir: Some(self.data_dir.clone()),
                insecure_no_auth: Some(self.insecure_no_auth),
                database: self.database.as_ref().map(|d| d.to_string()),
                blob: self.blob.as_ref().map(|b| b.to_string()),
                header_read_timeout_s: Some(h.header_read_timeout.as_secs_f64()),
                idle_timeout_s: Some(h.idle_timeout.as_secs_f64()),
                request_timeout_s: Some(h.request_timeout.as_secs_f64()),
                max_connections: Some(h.max_connections),
                max_streams: Some(h.streams.max_open),
                max_streams_per_tenant: Some(h.streams.per_tenant),
                stream_lifetime_s: Some(h.streams.lifetime.as_secs_f64()),
            },
            tenants: self.effective_tenants(tenants),
            upstreams: self.upstreams.iter().map(UpstreamConfig::effective).collect(),
            batches: RawBatches {
                completion_windows: Some(self.completion_windows.iter().map(|(w, _)| w.clone()).collect()),
                finish_in_flight_on_cancel: Some(self.finish_in_flight_on_cancel),
                stall_after_s: Some(self.stall_after.as_secs_f64()),
            },
            limits: RawLimits {
                max_lines: Some(self.limits.max_lines),
                max_file_bytes: Some(self.limits.max_file_bytes),
                max_upload_bytes: Some(self.limits.max_upload_bytes),
                max_line_bytes: Some(self.limits.max_line_bytes),
            },
            engine: RawEngine {
                commit_interval_ms: Some(self.engine.commit_interval.as_millis() as u64),
                commit_min_results: Some(self.engine.commit_min_results),
                commit_max_results: Some(self.engine.commit_max_results),
                unit_lines: Some(self.engine.unit_lines),
                lease_ttl_s: Some(self.engine.lease_ttl.as_secs()),
            },
            prices: self.prices.clone(),
            webhooks: self.webhook.as_ref().map(Webhook::effective).unwrap_or_default(),
        }
    }
}

impl UpstreamConfig {
    fn effective(&self) -> RawUpstream {
        RawUpstream {
            name: self.name.clone(),
            base_url: self.base_url.clone(),
            api_key_env: self.api_key_env.clone(),
            models: self.models.clone(),
            aliases: self.aliases.clone(),
            max_concurrency: Some(self.max_concurrency),
            rpm: Some(self.rpm),
            tpm: Some(self.tpm),
            timeout_s: Some(self.timeout.as_secs_f64()),
            max_attempts: Some(self.max_attempts),
            ca_file: self.ca_file.clone(),
            max_response_bytes: Some(self.max_response_bytes),
            mode: Some(self.mode),
            metrics_url: self.metrics_url.clone(),
            api: Some(self.api),
            default_max_tokens: self.default_max_tokens,
            prefix_order: Some(self.prefix_order),
            kind: Some(self.kind),
            max_lines: self.kind.is_batch().then_some(self.remote.max_lines),
            max_bytes: self.kind.is_batch().then_some(self.remote.max_bytes),
            poll_interval_s: self.kind.is_batch().then_some(self.remote.poll_interval.as_secs_f64()),
            completion_window: self.kind.is_batch().then(|| self.remote.completion_window.clone()),
            fallback: self.remote.fallback.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_resolve() {
        let c = RawConfig::default().resolve().unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert!(!c.auth_enabled());
        assert_eq!(c.completion_windows[0].1, Duration::from_secs(86_400));
        assert_eq!((c.limits.max_lines, c.limits.max_file_bytes), (1_000_000, 2_000_000_000));
    }

    #[test]
    fn tenants_and_upstreams_parse() {
        let raw: RawConfig = toml::from_str(
            r#"
            [[tenants]]
            name = "team-a"
            api_keys = ["sk-a1", "sk-a2"]
            [[upstreams]]
            name = "local"
            base_url = "http://127.0.0.1:8000/v1/"
            models = ["llama-8b"]
            aliases = { llama = "llama-8b" }
            rpm = 10
            [batches]
            completion_windows = ["24h", "30s"]
            "#,
        )
        .unwrap();
        let c = raw.resolve().unwrap();
        assert_eq!(c.api_keys.get("sk-a2").map(String::as_str), Some("team-a"));
        assert_eq!(c.upstreams[0].base_url, "http://127.0.0.1:8000/v1");
        assert_eq!(c.upstreams[0].rpm, 10);
        assert_eq!(c.upstreams[0].api, UpstreamApi::OpenAi, "openai unless said otherwise");
        assert_eq!(c.completion_windows[1].1, Duration::from_secs(30));
    }

    #[test]
    fn bad_values_are_rejected_with_a_reason() {
        let bad_mode = toml::from_str::<RawConfig>("[[upstreams]]\nname='a'\nbase_url='http://x/v1'\nmode='fast'");
        assert!(bad_mode.unwrap_err().to_string().contains("standby"), "the modes are named");
        assert!(parse_window("24x").is_err());
        assert!(parse_window("0h").is_err());
        let unknown_key = toml::from_str::<RawConfig>("[server]\nlisen = '1'");
        assert!(unknown_key.is_err());
        let missing_env: RawConfig = toml::from_str("[[upstreams]]\nname='a'\nbase_url='http://x/v1'\napi_key_env='BATCHD_TEST_SURELY_UNSET'").unwrap();
        assert!(missing_env.resolve().unwrap_err().to_string().contains("BATCHD_TEST_SURELY_UNSET"));
        let huge: RawConfig = toml::from_str("[limits]\nmax_file_bytes = 5000000000").unwrap();
        assert!(huge.resolve().unwrap_err().to_string().contains("max_file_bytes must be at most"));
        let not_anthropic: RawConfig = toml::from_str("[[upstreams]]\nname='a'\nbase_url='http://x/v1'\ndefault_max_tokens=5").unwrap();
        assert!(not_anthropic.resolve().unwrap_err().to_string().contains("only used with api = \"anthropic\""));
        assert!(toml::from_str::<RawConfig>("[[upstreams]]\nname='a'\nbase_url='http://x/v1'\napi='claude'").unwrap_err().to_string().contains("anthropic"));
        let ca_on_http: RawConfig = toml::from_str("[[upstreams]]\nname='a'\nbase_url='http://x/v1'\nca_file='ca.pem'").unwrap();
        assert!(ca_on_http.resolve().unwrap_err().to_string().contains("ca_file is only used with an https://"));
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("sk-very-secret");
        assert!(!format!("{s:?}").contains("very-secret"));
        assert!(!format!("{s}").contains("very-secret"));
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"<redacted>\"");
        assert!(s.matches("sk-very-secret") && !s.matches("sk-very-secreT") && !s.matches("sk-very") && !s.matches(""));
    }

    /// `--print-config` is TOML that loads back as the same configuration, keys redacted.
    #[test]
    fn print_config_is_redacted_toml_that_loads_back() {
        std::env::set_var("BATCHD_TEST_PRINT_KEY", "sk-upstream-secret");
        let raw: RawConfig = toml::from_str(
            "[server]\nidle_timeout_s = 5\n[[tenants]]\nname = 'a'\napi_keys = ['sk-tenant-secret-1', 'sk-tenant-secret-2']\n\
             [[upstreams]]\nname = 'u'\nbase_url = 'http://x/v1'\napi_key_env = 'BATCHD_TEST_PRINT_KEY'\naliases = { a = 'm' }\nmodels = ['m']\n\
             [prices.m]\ninput_per_million = 1.5",
        )
        .unwrap();
        let debug = format!("{raw:?}");
        assert!(!debug.contains("sk-tenant-secret"), "{debug}");
        let cfg = raw.resolve().unwrap();
        assert!(!format!("{cfg:?}").contains("secret"), "Debug of Config shows no key");
        assert_eq!(cfg.tenant_for_key("sk-tenant-secret-2"), Some("a"));
        assert_eq!(cfg.tenant_for_key("sk-tenant-secret-3"), None);
        let text = cfg.redacted_toml();
        assert!(!text.contains("secret-1") && !text.contains("sk-upstream-secret"), "{text}");
        assert!(text.contains("api_keys = [\"<redacted>\", \"<redacted>\"]"), "{text}");
        assert!(text.contains("[server]") && text.contains("[[upstreams]]") && text.contains("idle_timeout_s = 5.0"), "{text}");
        let mut back: RawConfig = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(back.tenants[0].api_keys.len(), 2);
        back.tenants[0].api_keys.pop(); // two redacted keys would be one key used twice
        let again = back.resolve().unwrap();
        assert_eq!(again.redacted_toml(), text.replacen(", \"<redacted>\"", "", 1), "printing is stable");
        assert_eq!(again.http, cfg.http);
        assert_eq!(again.upstreams[0].aliases, cfg.upstreams[0].aliases);
        let raw: RawConfig =
            toml::from_str("[[tenants]]\nname='a'\napi_keys=['k']\nwebhook_url='http://h/x'\nwebhook_secret='whsec_c2VjcmV0LWtleQ=='").unwrap();
        let c = raw.resolve().unwrap();
        assert!(!format!("{c:?}").contains("c2VjcmV0"), "webhook keys never print");
        assert!(!c.redacted_toml().contains("c2VjcmV0"));
        assert!(c.redacted_toml().contains("webhook_url = \"http://h/x\"\nwebhook_secret = \"<redacted>\""), "{}", c.redacted_toml());
        let back: RawConfig = toml::from_str(&c.redacted_toml()).unwrap();
        assert_eq!(back.tenants[0].webhook_url.as_deref(), Some("http://h/x"), "the webhook loads back");
    }

    /// Each refusal names what to fix, once: a tenant written twice (it used to be merged,
    /// the second entry replacing the first's quota and webhook), a tenant no key reaches,
    /// a price that is not a finite amount, a zero concurrency or attempt count.
    #[test]
    fn doubtful_tenants_prices_and_zeros_are_refused() {
        let refused = |text: &str| toml::from_str::<RawConfig>(text).unwrap().resolve().unwrap_err().to_string();
        let twice = refused("[[tenants]]\nname='a'\napi_keys=['k1']\nmax_queued_requests=5\n[[tenants]]\nname='a'\napi_keys=['k2']");
        assert!(twice.contains("two [[tenants]] are named \"a\""), "{twice}");
        let keyless = refused("[[tenants]]\nname='a'\napi_keys=['k']\n[[tenants]]\nname='b'");
        assert!(keyless.contains("tenant \"b\" has no api_keys"), "{keyless}");
        assert!(refused("[[tenants]]\nname='ops'").contains("has no api_keys"), "without keys only `default` is served");
        let default_only: RawConfig = toml::from_str("[[tenants]]\nname='default'\nmax_queued_requests=3").unwrap();
        assert_eq!(default_only.resolve().unwrap().tenants["default"].max_queued_requests, Some(3), "the keyless server's own tenant");
        for price in ["nan", "inf", "-inf", "-1.0"] {
            for field in ["input_per_million", "output_per_million"] {
                let e = refused(&format!("[prices.m]\n{field} = {price}"));
                assert!(e.contains("[prices.\"m\"]: prices must be finite numbers >= 0"), "{field} = {price}: {e}");
            }
        }
        assert!(refused("[prices.m]\nbatch_discount = nan").contains("batch_discount within 0..=1"));
        let zero = RawConfig::default().with_catch_all_upstream(Some("http://127.0.0.1:9/v1".into()), Some(0));
        assert!(zero.resolve().unwrap_err().to_string().contains("max_concurrency (--concurrency, BATCHD_CONCURRENCY) must be at least 1"));
        assert!(refused("[[upstreams]]\nname='u'\nbase_url='http://x/v1'\nmax_attempts=0").contains("max_attempts must be at least 1"));
    }

    /// A file that cannot be read or parsed says so once: the cause is the error's source,
    /// not also part of its text (anyhow's `{:#}` prints both).
    #[test]
    fn file_errors_name_their_cause_once() {
        let dir = tempfile::tempdir().unwrap();
        let missing = anyhow::Error::from(RawConfig::load(Some(&dir.path().join("none.toml"))).unwrap_err());
        let text = format!("{missing:#}");
        assert_eq!(text.matches("No such file").count(), 1, "{text}");
        std::fs::write(dir.path().join("bad.toml"), "[server]\nlisen = 1\n").unwrap();
        let bad = anyhow::Error::from(RawConfig::load(Some(&dir.path().join("bad.toml"))).unwrap_err());
        let text = format!("{bad:#}");
        assert_eq!(text.matches("unknown field `lisen`").count(), 1, "{text}");
        assert!(text.starts_with("invalid config file "), "{text}");
    }

    #[test]
    fn webhooks_quotas_and_prices_resolve() {
        let raw: RawConfig = toml::from_str(
            r#"
            [[tenants]]
            name = "a"
            api_keys = ["k"]
            webhook_url = "http://127.0.0.1:9/hook"
            webhook_secret = "whsec_c2VjcmV0LWtleQ=="
            max_queued_requests = 10
            [[tenants]]
            name = "b"
            api_keys = ["k2"]
            [webhooks]
            url = "http://127.0.0.1:9/ops"
            secret = "plain-key"
            [batches]
            stall_after_s = 2
            [prices."m"]
            input_per_million = 2.0
            output_per_million = 8.0
            batch_discount = 0.5
            "#,
        )
        .unwrap();
        let c = raw.resolve().unwrap();
        assert_eq!(c.webhook_for("a").unwrap().url, "http://127.0.0.1:9/hook");
        assert_eq!(c.webhook_for("b").unwrap().url, "http://127.0.0.1:9/ops", "[webhooks] serves tenants without one");
        assert_eq!(c.tenants["a"].max_queued_requests, Some(10));
        assert_eq!(c.stall_after, Duration::from_secs(2));
        assert!((c.prices["m"].cost(1_000_000, 1_000_000) - 5.0).abs() < 1e-9, "(2 + 8) at half price");
        let half: RawConfig = toml::from_str("[webhooks]\nurl='http://x'").unwrap();
        assert!(half.resolve().unwrap_err().to_string().contains("both a URL and a secret"));
        let bad: RawConfig = toml::from_str("[webhooks]\nurl='http://x'\nsecret='whsec_***'").unwrap();
        assert!(bad.resolve().unwrap_err().to_string().contains("not base64"));
    }

    /// A batch-kind upstream's settings resolve with the hosted caps as defaults, print and
    /// load back; they are refused on an online upstream; a batch kind speaks its own API.
    #[test]
    fn batch_kind_upstreams_resolve_and_refuse_what_does_not_apply() {
        let up = |extra: &str| format!("[[upstreams]]\nname='h'\nbase_url='http://127.0.0.1:9/v1'\n{extra}");
        let c = toml::from_str::<RawConfig>(&up("kind='openai-batch'\nmax_lines=100\npoll_interval_s=0.5")).unwrap().resolve().unwrap();
        let u = &c.upstreams[0];
        assert_eq!((u.kind, u.remote.max_lines, u.remote.max_bytes), (UpstreamKind::OpenaiBatch, 100, 200 * MB));
        assert_eq!((u.remote.poll_interval, u.remote.completion_window.as_str()), (Duration::from_millis(500), "24h"));
        let printed = toml::to_string(&u.effective()).unwrap();
        let back: RawUpstream = toml::from_str(&printed).unwrap();
        assert_eq!((back.kind, back.max_lines), (Some(UpstreamKind::OpenaiBatch), Some(100)), "{printed}");
        let online = toml::from_str::<RawConfig>(&up("")).unwrap().resolve().unwrap();
        assert_eq!(online.upstreams[0].kind, UpstreamKind::Online);
        let refused = |extra: &str| toml::from_str::<RawConfig>(&up(extra)).unwrap().resolve().unwrap_err().to_string();
        assert!(refused("max_lines=5").contains("only used with a batch kind"));
        assert!(refused("kind='openai-batch'\napi='anthropic'").contains("cannot be combined"));
        assert!(refused("kind='anthropic-batch'\napi='openai'").contains("cannot be combined"));
        let a = toml::from_str::<RawConfig>(&up("kind='anthropic-batch'\ndefault_max_tokens=64")).unwrap().resolve().unwrap();
        let a = &a.upstreams[0];
        assert_eq!((a.kind, a.api, a.remote.max_lines, a.remote.max_bytes), (UpstreamKind::AnthropicBatch, UpstreamApi::Anthropic, 100_000, 256 * MB));
        assert!(refused("kind='openai-batch'\nmax_lines=0").contains("at least 1"));
        assert!(refused("fallback='x'").contains("only used with a batch kind"));
        assert!(refused("kind='openai-batch'\nfallback='nope'").contains("is no upstream"));
        let two = |fallback_kind: &str| {
            let t = format!("{}\nkind='openai-batch'\nfallback='o'\n[[upstreams]]\nname='o'\nbase_url='http://127.0.0.1:9/v1'\n{fallback_kind}", up(""));
            toml::from_str::<RawConfig>(&t).unwrap().resolve()
        };
        assert_eq!(two("").unwrap().upstreams[0].remote.fallback.as_deref(), Some("o"));
        assert!(two("kind='openai-batch'").unwrap_err().to_string().contains("must be an online one"));
        assert!(refused("kind='openai-batch'\npoll_interval_s=-1").contains("positive"));
        assert!(toml::from_str::<RawConfig>(&up("kind='batch'")).is_err(), "an unknown kind");
    }
}
