//! Upstreams: which pool serves a model ([`Router`]), and each pool's HTTP client and limits
//! ([`Pool`]).
//!
//! A model name is resolved through the operator's aliases to the exact upstream model id
//! (an alias routes by itself; its target is routable by its own id only where listed).
//! Several pools may serve one model; the dispatcher spreads lines over them by free capacity,
//! skips paused ones, and fails over between them on retries. Keys live only inside
//! [`Pool`]s and never print.
//!
//! Each pool learns its upstream's limits by itself (`control`, enforced by `limiter`), from
//! what its answers say (`signals`, over the `outcome` of each attempt) and from the
//! upstream's own metrics (`probe`: vLLM's, SGLang's or llama.cpp's, in both modes). A look
//! at each upstream's `/models` at start (`startup`) warns of a base URL that answers 404.
//! [`Router::states`] shows what was learned ([`UpstreamState`]).
//!
//! A pool speaks the API its configuration says (`api`: OpenAI's, or Anthropic's Messages);
//! a line written in the other is translated for it and its answer translated back
//! (`dialect`, over the pure functions of [`translate`]). [`Router::translates`] and
//! [`Router::servable`] let a validator refuse, before anything is sent, what cannot be.

mod client;
mod conn;
mod control;
mod decode;
mod dialect;
mod kvwindow;
mod limiter;
mod outcome;
mod probe;
pub mod remote;
mod signals;
mod startup;
pub mod translate;

use std::collections::BTreeSet;
use std::sync::{Arc, Once};

pub use control::{human, PauseReason, Signal};
pub use dialect::{Outgoing, Translation};
pub use kvwindow::WindowReason;
pub use limiter::{Limiter, Permit};
pub use outcome::{Answer, Outcome, TransportError};
pub use probe::EngineMetrics;
pub use signals::parse_go_duration;

use crate::config::{UpstreamConfig, UpstreamMode};

/// One upstream: its configuration, its keep-alive connections and its limiter.
pub struct Pool {
    pub cfg: UpstreamConfig,
    conns: conn::Connections,
    /// `Authorization: Bearer …` (or Anthropic's `x-api-key`), marked sensitive.
    auth: Option<(axum::http::HeaderName, axum::http::HeaderValue)>,
    /// Parsed URIs of the paths sent so far (parsing one per request is measurable).
    uris: std::sync::RwLock<std::collections::HashMap<String, axum::http::Uri>>,
    pub limiter: Arc<Limiter>,
    /// Starts the `metrics_url` probe on first use.
    probe: Once,
    /// A batch-kind upstream's Batch API client (`engine::remote` sends its lines there).
    pub remote: Option<remote::RemoteUpstream>,
    /// What the start-up look found wrong (a base URL answering 404).
    warning: std::sync::Mutex<Option<String>>,
    /// The upstream's own figures, as last read from `metrics_url`, and when.
    engine: std::sync::Mutex<Option<(tokio::time::Instant, EngineMetrics)>>,
}

/// A line that an upstream serving its model cannot be sent: it cannot be said in the API
/// the upstream speaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} cannot be sent to upstream {upstream:?}, which speaks {}: {}", refused.param, api.words(), refused.reason)]
pub struct Unservable {
    pub upstream: String,
    pub api: crate::config::UpstreamApi,
    pub refused: translate::Refused,
}

/// An upstream that cannot be set up.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BuildError(pub String);

/// A model's resolution: the pools that serve it, each with the model id it expects.
#[derive(Clone)]
pub struct Route {
    pub targets: Vec<(Arc<Pool>, Arc<str>)>,
}

impl Route {
    /// The targets to use, leaving out `avoid` (a pool that just failed) when another exists.
    fn candidates(&self, avoid: Option<&str>) -> Vec<&(Arc<Pool>, Arc<str>)> {
        let others: Vec<_> = self.targets.iter().filter(|t| avoid.is_none_or(|a| t.0.cfg.name != a)).collect();
        if others.is_empty() {
            self.targets.iter().collect()
        } else {
            others
        }
    }

    /// Takes a slot on a pool that serves the route: the one with the most free capacity when
    /// any has a slot free (a paused pool has none), else whichever frees one first, so a
    /// saturated slow pool never holds lines back from an idle fast one.
    pub async fn acquire(&self, est_tokens: u64, avoid: Option<&str>) -> (Arc<Pool>, Arc<str>, Permit) {
        for (pool, _) in &self.targets {
            pool.start_probe();
        }
        if let [(pool, model)] = self.targets.as_slice() {
            return (pool.clone(), model.clone(), pool.limiter.acquire(est_tokens).await);
        }
        let mut cands = self.candidates(avoid);
        if cands.iter().all(|(p, _)| p.limiter.paused()) {
            cands = self.targets.iter().collect();
        }
        let best = cands.iter().max_by_key(|(p, _)| p.limiter.free()).expect("a route has a target");
        if cands.len() == 1 || best.0.limiter.free() > 0 {
            let permit = best.0.limiter.acquire(est_tokens).await;
            return (best.0.clone(), best.1.clone(), permit);
        }
        let waits = cands.into_iter().map(|(p, m)| Box::pin(async move { (p.clone(), m.clone(), p.limiter.acquire(est_tokens).await) }));
        futures::future::select_all(waits).await.0
    }
}

pub struct Router {
    pools: Vec<Arc<Pool>>,
}

impl Router {
    pub fn new(cfgs: &[UpstreamConfig]) -> Result<Router, BuildError> {
        let pools = cfgs
            .iter()
            .map(|c| {
                let auth = c.api_key.as_ref().map(|k| client::auth_header(c.api, k)).transpose()?;
                let limiter = Arc::new(Limiter::new(c));
                let api: Option<Arc<dyn remote::BatchApi>> = match c.kind {
                    crate::config::UpstreamKind::OpenaiBatch => Some(Arc::new(remote::OpenAiBatch::new(c)?)),
                    crate::config::UpstreamKind::AnthropicBatch => Some(Arc::new(remote::AnthropicBatch::new(c)?)),
                    crate::config::UpstreamKind::Online => None,
                };
                let remote = api.map(|api| remote::RemoteUpstream { api, queue: Default::default() });
                let pool = Pool {
                    limiter,
                    conns: client::build(c)?,
                    auth,
                    uris: Default::default(),
                    cfg: c.clone(),
                    probe: Once::new(),
                    warning: Default::default(),
                    engine: Default::default(),
                    remote,
                };
                Ok(Arc::new(pool))
            })
            .collect::<Result<Vec<_>, BuildError>>()?;
        Ok(Router { pools })
    }

    pub fn pools(&self) -> &[Arc<Pool>] {
        &self.pools
    }

    /// Looks at every upstream's `/models` in the background (see `startup`).
    pub fn look_at_start(&self) {
        for p in &self.pools {
            startup::spawn(Arc::downgrade(p), p.auth.clone());
        }
    }

    /// Resolves a model name (or alias) to the pools that serve it.
    pub fn resolve(&self, model: &str) -> Option<Route> {
        let targets: Vec<_> = self.pools.iter().filter_map(|p| resolve_in(&p.cfg, model).map(|m| (p.clone(), Arc::<str>::from(m)))).collect();
        (!targets.is_empty()).then_some(Route { targets })
    }

    /// What every pool has learned about its upstream.
    pub fn states(&self) -> Vec<UpstreamState> {
        self.pools.iter().map(|p| p.state()).collect()
    }

    /// The states of the pools serving `model` (every pool when `None`: a batch of mixed
    /// models).
    pub fn states_for(&self, model: Option<&str>) -> Vec<UpstreamState> {
        let serves = |p: &Pool| model.is_none_or(|m| resolve_in(&p.cfg, m).is_some());
        self.pools.iter().filter(|p| serves(p)).map(|p| p.state()).collect()
    }

    /// Whether a pool serving `model` speaks another API than lines of `path` (below `/v1`)
    /// are written in, so that their bodies are translated for it. Allocates nothing: a
    /// validator asks it of every line, and parses only the lines it says yes for.
    pub fn translates(&self, model: &str, path: &str) -> bool {
        self.pools.iter().any(|p| dialect::translation(path, p.cfg.api) != Translation::None && resolve_in(&p.cfg, model).is_some())
    }

    /// Whether every pool serving `model` can be sent a line of `path` with this body; else
    /// the first pool that cannot, and why.
    pub fn servable(&self, model: &str, path: &str, body: &serde_json::Value) -> Result<(), Unservable> {
        for p in self.pools.iter().filter(|p| resolve_in(&p.cfg, model).is_some()) {
            let opts = dialect::to_messages(&p.cfg);
            translate::servable(dialect::request_kind(path), p.cfg.api, body, &opts).map_err(|refused| Unservable {
                upstream: p.cfg.name.clone(),
                api: p.cfg.api,
                refused,
            })?;
        }
        Ok(())
    }

    /// Whether lines for `model` go to a hosted batch API (an upstream of a batch `kind`).
    pub fn batched(&self, model: &str) -> bool {
        self.pools.iter().any(|p| p.cfg.kind.is_batch() && resolve_in(&p.cfg, model).is_some())
    }

    /// Whether lines for `model` are dispatched in prefix order: a pool serving it says so
    /// (`prefix_order`, on by default). Allocates nothing.
    pub fn prefix_ordered(&self, model: &str) -> bool {
        self.pools.iter().any(|p| p.cfg.prefix_order && resolve_in(&p.cfg, model).is_some())
    }

    pub fn knows(&self, model: &str) -> bool {
        self.pools.iter().any(|p| resolve_in(&p.cfg, model).is_some())
    }

    /// Every model and alias that can be named, sorted (a catch-all `*` is not listed).
    pub fn known_models(&self) -> Vec<String> {
        let mut all = BTreeSet::new();
        for p in &self.pools {
            all.extend(p.cfg.models.iter().filter(|m| *m != "*").cloned());
            all.extend(p.cfg.aliases.keys().cloned());
        }
        all.into_iter().collect()
    }

    /// Pairs of (name, owner) for `GET /v1/models`.
    pub fn model_list(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut seen = BTreeSet::new();
        for p in &self.pools {
            let names = p.cfg.models.iter().filter(|m| *m != "*").chain(p.cfg.aliases.keys());
            for m in names {
                if seen.insert(m.clone()) {
                    out.push((m.clone(), p.cfg.name.clone()));
                }
            }
        }
        out
    }
}

/// What an upstream's pool has learned, for `/progress`, `/metrics`, `batchd status` and
/// `batchd run` (one per pool; the shape is a contract with the console and the API).
#[derive(Debug, Clone, serde::Serialize)]
pub struct UpstreamState {
    pub name: String,
    pub mode: UpstreamMode,
    pub in_flight: usize,
    pub window: f64,
    /// Why the window is what it is: `slow_start`, `learned` (from the answers), `kv_cache`
    /// or `queue` (the server's own figures hold it).
    pub window_reason: WindowReason,
    /// This node's share of `max_concurrency`.
    pub limit: usize,
    pub learned_rpm: Option<f64>,
    pub paused: bool,
    /// Unix time in milliseconds.
    pub paused_until_ms: Option<u64>,
    pub pause_reason: Option<PauseReason>,
    pub pause_detail: Option<String>,
    /// What the start-up look found wrong (a base URL answering 404), in words.
    pub warning: Option<String>,
    /// The last failure in words, and when it came (Unix time in milliseconds); neither once
    /// it is older than five minutes.
    pub last_error: Option<String>,
    pub last_error_at_ms: Option<u64>,
    pub rate_limited_last_minute: u64,
    pub overloaded_last_minute: u64,
    /// The upstream's own figures from `metrics_url`, when read in the last few seconds.
    pub engine: Option<EngineMetrics>,
}

impl UpstreamState {
    /// "rate limited by local-vllm, 2 s" while paused.
    pub fn pause_words(&self) -> Option<String> {
        let (reason, until) = (self.pause_reason?, self.paused_until_ms?);
        let left = until.saturating_sub(crate::now_unix_ms());
        Some(format!("{}, {}", reason.words(&self.name), control::human(std::time::Duration::from_millis(left))))
    }
}

impl Pool {
    /// Tells the pool's limiter how an attempt went and returns its slot; says what the
    /// outcome meant.
    pub fn settle(&self, permit: Permit, outcome: &Outcome) -> Signal {
        let signal = signals::classify(outcome);
        // Words are for failures only (last_error, pause details): a success costs none.
        // A 404 is a final answer, but shown: a wrong base URL answers nothing else.
        let not_found = matches!(outcome, Outcome::Answer(a) if a.status == 404);
        let detail = if matches!(signal, Signal::Ok | Signal::Neutral) && !not_found { String::new() } else { signals::describe(outcome) };
        let headers = match outcome {
            Outcome::Answer(a) => a.rate_limits,
            Outcome::Transport(_) => Default::default(),
        };
        let obs = control::Observation { signal, retry_after: outcome.retry_after(), headers: &headers, detail: &detail };
        self.limiter.settle(permit, &obs);
        signal
    }

    pub fn state(&self) -> UpstreamState {
        let now = tokio::time::Instant::now();
        let now_ms = crate::now_unix_ms();
        self.limiter.with_controller(|c, limit| {
            let pause = c.pause(now);
            let (rate_limited, overloaded) = c.counters.last_minute(now);
            let last_error = c.last_error(now);
            UpstreamState {
                name: self.cfg.name.clone(),
                mode: self.cfg.mode,
                in_flight: self.limiter.in_flight(),
                window: (c.window() * 10.0).round() / 10.0,
                window_reason: c.reason(),
                limit,
                learned_rpm: c.learned_rate_at(now).map(|r| (r * 600.0).round() / 10.0),
                paused: pause.is_some(),
                paused_until_ms: pause.map(|p| now_ms + (p.until - now).as_millis() as u64),
                pause_reason: pause.map(|p| p.reason),
                pause_detail: pause.map(|p| p.detail.clone()),
                warning: self.warning.lock().unwrap_or_else(|p| p.into_inner()).clone(),
                last_error: last_error.map(|e| e.1.to_owned()),
                last_error_at_ms: last_error.map(|e| now_ms.saturating_sub((now - e.0).as_millis() as u64)),
                rate_limited_last_minute: rate_limited,
                overloaded_last_minute: overloaded,
                engine: self.engine.lock().unwrap_or_else(|p| p.into_inner()).filter(|(at, _)| now - *at < ENGINE_FRESH).map(|e| e.1),
            }
        })
    }

    /// The start-up look found something wrong.
    fn warn(&self, words: String) {
        *self.warning.lock().unwrap_or_else(|p| p.into_inner()) = Some(words);
    }

    /// A new reading of the upstream's own figures: kept, and its queue handed to the limiter.
    fn on_metrics(&self, m: EngineMetrics) {
        *self.engine.lock().unwrap_or_else(|p| p.into_inner()) = Some((tokio::time::Instant::now(), m));
        self.limiter.on_metrics(&m);
    }

    /// `metrics_url` failed or named nothing known: the window follows the answers alone.
    fn on_metrics_lost(&self) {
        *self.engine.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.limiter.metrics_lost();
    }

    /// Starts polling `metrics_url` (in either mode), once, for as long as the pool lives.
    fn start_probe(self: &Arc<Self>) {
        if self.cfg.metrics_url.is_none() {
            return;
        }
        self.probe.call_once(|| probe::spawn(Arc::downgrade(self)));
    }
}

/// How long a reading of `metrics_url` is shown.
const ENGINE_FRESH: std::time::Duration = std::time::Duration::from_secs(5);

fn resolve_in<'a>(cfg: &'a UpstreamConfig, model: &'a str) -> Option<&'a str> {
    if let Some(target) = cfg.aliases.get(model) {
        return Some(target);
    }
    cfg.models.iter().any(|m| m == "*" || m == model).then_some(model)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{RawConfig, RawUpstream};

    fn up(name: &str, models: &[&str], aliases: &[(&str, &str)]) -> RawUpstream {
        RawUpstream {
            name: name.into(),
            base_url: "http://127.0.0.1:9/v1".into(),
            models: models.iter().map(|s| s.to_string()).collect(),
            aliases: aliases.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn aliases_resolve_and_unknown_models_do_not() {
        let raw = RawConfig { upstreams: vec![up("a", &["m1"], &[("fast", "m1")]), up("b", &["m1", "m2"], &[])], ..Default::default() };
        let r = Router::new(&raw.resolve().unwrap().upstreams).unwrap();
        let route = r.resolve("fast").unwrap();
        assert_eq!(route.targets.len(), 1);
        assert_eq!(&*route.targets[0].1, "m1");
        assert_eq!(r.resolve("m1").unwrap().targets.len(), 2, "two pools serve m1");
        assert!(r.resolve("m3").is_none());
        assert_eq!(r.known_models(), ["fast", "m1", "m2"]);
        let route = r.resolve("m1").unwrap();
        let names = |avoid| route.candidates(avoid).iter().map(|t| t.0.cfg.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(Some("a")), ["b"], "failover avoids the pool that failed");
        assert_eq!(names(Some("zzz")), ["a", "b"]);
    }

    #[test]
    fn an_alias_alone_routes_and_its_target_stays_unlisted() {
        let raw = RawConfig { upstreams: vec![up("a", &[], &[("fast", "llama-3.1-8b-instruct")]), up("b", &["m2"], &[])], ..Default::default() };
        let r = Router::new(&raw.resolve().unwrap().upstreams).unwrap();
        let route = r.resolve("fast").expect("an alias routes without listing its target");
        assert_eq!(&*route.targets[0].1, "llama-3.1-8b-instruct");
        assert!(r.resolve("llama-3.1-8b-instruct").is_none(), "the target is not routable by its real id");
        assert!(r.resolve("other").is_none(), "an upstream with aliases only is no catch-all");
        assert_eq!(r.known_models(), ["fast", "m2"]);
    }

    #[test]
    fn states_show_each_pool() {
        let raw = RawConfig { upstreams: vec![up("a", &["m1"], &[]), up("b", &["m2"], &[])], ..Default::default() };
        let r = Router::new(&raw.resolve().unwrap().upstreams).unwrap();
        let s = r.states();
        assert_eq!(s.len(), 2);
        let v = serde_json::to_value(&s[0]).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "name",
                "mode",
                "in_flight",
                "window",
                "window_reason",
                "limit",
                "learned_rpm",
                "paused",
                "paused_until_ms",
                "pause_reason",
                "pause_detail",
                "warning",
                "last_error",
                "last_error_at_ms",
                "rate_limited_last_minute",
                "overloaded_last_minute",
                "engine"
            ],
            "the contract's fields, in order"
        );
        assert_eq!(v["mode"], "throughput");
        assert_eq!(v["window"], 4.0, "a new upstream starts slowly");
        assert_eq!(v["window_reason"], "slow_start");
        assert!(v["pause_reason"].is_null());
        assert_eq!(r.states_for(Some("m2")).iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["b"]);
        let paused = UpstreamState {
            name: "local-vllm".into(),
            paused: true,
            paused_until_ms: Some(crate::now_unix_ms() + 2000),
            pause_reason: Some(PauseReason::RateLimited),
            ..s[0].clone()
        };
        assert_eq!(paused.pause_words().as_deref(), Some("rate limited by local-vllm, 2 s"));
        assert_eq!(s[0].pause_words(), None);
    }

    #[test]
    fn catch_all_serves_everything() {
        let raw = RawConfig { upstreams: vec![up("any", &["*"], &[])], ..Default::default() };
        let r = Router::new(&raw.resolve().unwrap().upstreams).unwrap();
        assert!(r.knows("whatever"));
        assert!(r.known_models().is_empty());
    }
}
