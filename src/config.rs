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
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid config file {path}: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// A secret string (an API key): its `Debug` and `Display` never show the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

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
    #[serde(default)]
    pub prices: BTreeMap<String, Price>,
}

/// Dollars (or any currency) per million tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    #[serde(default)]
    pub input_per_million: f64,
    #[serde(default)]
    pub output_per_million: f64,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub insecure_no_auth: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawTenant {
    pub name: String,
    #[serde(default)]
    pub api_keys: Vec<String>,
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
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawBatches {
    pub completion_windows: Option<Vec<String>>,
    /// Whether cancel lets in-flight requests finish (true) or aborts them (false, default).
    pub finish_in_flight_on_cancel: Option<bool>,
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
    /// API key → tenant name. Empty: no authentication, every call is tenant `default`.
    pub api_keys: BTreeMap<String, String>,
    pub upstreams: Vec<UpstreamConfig>,
    pub completion_windows: Vec<(String, Duration)>,
    pub finish_in_flight_on_cancel: bool,
    pub limits: Limits,
    pub engine: EngineConfig,
    pub prices: BTreeMap<String, Price>,
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
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
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
        let listen: SocketAddr = listen_text
            .parse()
            .map_err(|_| ConfigError::Invalid(format!("listen address {listen_text:?} is not HOST:PORT")))?;
        let api_keys = resolve_tenants(&self.tenants)?;
        let upstreams = self.upstreams.iter().map(resolve_upstream).collect::<Result<Vec<_>, _>>()?;
        check_unique_names(&upstreams)?;
        let windows = self.batches.completion_windows.clone().unwrap_or_else(|| vec!["24h".into()]);
        let completion_windows = windows
            .iter()
            .map(|w| parse_window(w).map(|d| (w.clone(), d)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Config {
            listen,
            data_dir: self.server.data_dir.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            insecure_no_auth: self.server.insecure_no_auth.unwrap_or(false),
            api_keys,
            upstreams,
            completion_windows,
            finish_in_flight_on_cancel: self.batches.finish_in_flight_on_cancel.unwrap_or(false),
            limits: resolve_limits(&self.limits)?,
            engine: resolve_engine(&self.engine)?,
            prices: self.prices.clone(),
        })
    }
}

fn resolve_tenants(tenants: &[RawTenant]) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut keys = BTreeMap::new();
    for t in tenants {
        if t.name.trim().is_empty() {
            return Err(ConfigError::Invalid("a tenant has an empty name".into()));
        }
        for k in &t.api_keys {
            if k.is_empty() {
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
    let models = if u.models.is_empty() { vec!["*".to_string()] } else { u.models.clone() };
    for (alias, target) in &u.aliases {
        if !models.iter().any(|m| m == "*" || m == target) {
            return Err(bad(format!("alias {alias:?} points to {target:?}, which is not in its models")));
        }
    }
    if u.ca_file.is_some() && !u.base_url.starts_with("https://") {
        return Err(bad("ca_file is only used with an https:// base_url".into()));
    }
    let timeout_s = u.timeout_s.unwrap_or(600.0);
    if !(timeout_s > 0.0 && timeout_s.is_finite()) {
        return Err(bad("timeout_s must be positive".into()));
    }
    Ok(UpstreamConfig {
        name: u.name.clone(),
        base_url: u.base_url.trim_end_matches('/').to_string(),
        api_key,
        models,
        aliases: u.aliases.clone(),
        max_concurrency: u.max_concurrency.unwrap_or(DEFAULT_CONCURRENCY).max(1),
        rpm: u.rpm.unwrap_or(0),
        tpm: u.tpm.unwrap_or(0),
        timeout: Duration::from_secs_f64(timeout_s),
        max_attempts: u.max_attempts.unwrap_or(5).max(1),
        ca_file: u.ca_file.clone(),
    })
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
    /// Whether calls must carry an API key.
    pub fn auth_enabled(&self) -> bool {
        !self.api_keys.is_empty()
    }

    /// The effective configuration as TOML, secrets redacted (for `--print-config`).
    pub fn redacted_toml(&self) -> String {
        let mut tenants: BTreeMap<&str, usize> = BTreeMap::new();
        for t in self.api_keys.values() {
            *tenants.entry(t).or_default() += 1;
        }
        let mut out = format!(
            "[server]\nlisten = \"{}\"\ndata_dir = {:?}\ninsecure_no_auth = {}\n",
            self.listen, self.data_dir, self.insecure_no_auth
        );
        for (name, n) in tenants {
            out += &format!("\n[[tenants]]\nname = {name:?}\napi_keys = [{}]\n", vec!["\"<redacted>\""; n].join(", "));
        }
        for u in &self.upstreams {
            out += &format!(
                "\n[[upstreams]]\nname = {:?}\nbase_url = {:?}\napi_key = {}\nmodels = {:?}\naliases = {:?}\nmax_concurrency = {}\nrpm = {}\ntpm = {}\ntimeout_s = {}\nmax_attempts = {}\n",
                u.name, u.base_url, if u.api_key.is_some() { "\"<redacted>\"" } else { "\"<none>\"" },
                u.models, u.aliases, u.max_concurrency, u.rpm, u.tpm, u.timeout.as_secs_f64(), u.max_attempts
            );
        }
        let windows: Vec<&str> = self.completion_windows.iter().map(|(w, _)| w.as_str()).collect();
        out += &format!(
            "\n[batches]\ncompletion_windows = {windows:?}\nfinish_in_flight_on_cancel = {}\n\n[limits]\nmax_lines = {}\nmax_file_bytes = {}\nmax_upload_bytes = {}\nmax_line_bytes = {}\n",
            self.finish_in_flight_on_cancel, self.limits.max_lines, self.limits.max_file_bytes,
            self.limits.max_upload_bytes, self.limits.max_line_bytes
        );
        out
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
        assert_eq!(c.completion_windows[1].1, Duration::from_secs(30));
    }

    #[test]
    fn bad_values_are_rejected_with_a_reason() {
        let alias_to_unknown: RawConfig = toml::from_str(
            "[[upstreams]]\nname='a'\nbase_url='http://x/v1'\nmodels=['m']\naliases={ x = 'other' }",
        )
        .unwrap();
        assert!(alias_to_unknown.resolve().unwrap_err().to_string().contains("alias"));
        assert!(parse_window("24x").is_err());
        assert!(parse_window("0h").is_err());
        let unknown_key = toml::from_str::<RawConfig>("[server]\nlisen = '1'");
        assert!(unknown_key.is_err());
        let missing_env: RawConfig = toml::from_str(
            "[[upstreams]]\nname='a'\nbase_url='http://x/v1'\napi_key_env='BATCHD_TEST_SURELY_UNSET'",
        )
        .unwrap();
        assert!(missing_env.resolve().unwrap_err().to_string().contains("BATCHD_TEST_SURELY_UNSET"));
        let ca_on_http: RawConfig = toml::from_str("[[upstreams]]\nname='a'\nbase_url='http://x/v1'\nca_file='ca.pem'").unwrap();
        assert!(ca_on_http.resolve().unwrap_err().to_string().contains("ca_file is only used with an https://"));
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("sk-very-secret");
        assert!(!format!("{s:?}").contains("very-secret"));
    }
}
