//! Upstreams: which pool serves a model ([`Router`]), and each pool's HTTP client and limits
//! ([`Pool`]).
//!
//! A model name is resolved through the operator's aliases to the exact upstream model id.
//! Several pools may serve one model; the dispatcher spreads lines over them by free capacity
//! and fails over between them on retries. Keys live only inside [`Pool`]s and never print.

mod client;
mod conn;
mod limiter;

use std::collections::BTreeSet;
use std::sync::Arc;

pub use client::{Answer, Outcome, TransportError};
pub use limiter::{Limiter, Permit};

use crate::config::UpstreamConfig;

/// One upstream: its configuration, its keep-alive connections and its limiter.
pub struct Pool {
    pub cfg: UpstreamConfig,
    conns: conn::Connections,
    /// `Authorization: Bearer …`, marked sensitive.
    auth: Option<axum::http::HeaderValue>,
    /// Parsed URIs of the paths sent so far (parsing one per request is measurable).
    uris: std::sync::RwLock<std::collections::HashMap<String, axum::http::Uri>>,
    pub limiter: Arc<Limiter>,
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
        if others.is_empty() { self.targets.iter().collect() } else { others }
    }

    /// Takes a slot on a pool that serves the route: the one with the most free capacity when
    /// any has a slot free, else whichever frees one first, so a saturated slow pool never
    /// holds lines back from an idle fast one.
    pub async fn acquire(&self, est_tokens: u64, avoid: Option<&str>) -> (Arc<Pool>, Arc<str>, Permit) {
        if let [(pool, model)] = self.targets.as_slice() {
            return (pool.clone(), model.clone(), pool.limiter.acquire(est_tokens).await);
        }
        let cands = self.candidates(avoid);
        let best = cands.iter().max_by_key(|(p, _)| p.limiter.free()).expect("a route has a target");
        if cands.len() == 1 || best.0.limiter.free() > 0 {
            let permit = best.0.limiter.acquire(est_tokens).await;
            return (best.0.clone(), best.1.clone(), permit);
        }
        let waits = cands.into_iter().map(|(p, m)| {
            Box::pin(async move { (p.clone(), m.clone(), p.limiter.acquire(est_tokens).await) })
        });
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
                let auth = c.api_key.as_ref().map(client::auth_header).transpose()?;
                let pool = Pool { limiter: Arc::new(Limiter::new(c)), conns: client::build(c)?, auth, uris: Default::default(), cfg: c.clone() };
                Ok(Arc::new(pool))
            })
            .collect::<Result<Vec<_>, BuildError>>()?;
        Ok(Router { pools })
    }

    pub fn pools(&self) -> &[Arc<Pool>] {
        &self.pools
    }

    /// Resolves a model name (or alias) to the pools that serve it.
    pub fn resolve(&self, model: &str) -> Option<Route> {
        let targets: Vec<_> = self
            .pools
            .iter()
            .filter_map(|p| resolve_in(&p.cfg, model).map(|m| (p.clone(), Arc::<str>::from(m))))
            .collect();
        (!targets.is_empty()).then_some(Route { targets })
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
        let raw = RawConfig {
            upstreams: vec![up("a", &["m1"], &[("fast", "m1")]), up("b", &["m1", "m2"], &[])],
            ..Default::default()
        };
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
    fn catch_all_serves_everything() {
        let raw = RawConfig { upstreams: vec![up("any", &["*"], &[])], ..Default::default() };
        let r = Router::new(&raw.resolve().unwrap().upstreams).unwrap();
        assert!(r.knows("whatever"));
        assert!(r.known_models().is_empty());
    }
}
