//! Assembling and running a batchd node: store and blob store (chosen by [`crate::backend`]),
//! router, engine and HTTP server, with graceful shutdown.
//!
//! [`App::build`] binds the listener (port 0 is fine), then opens the backends and starts the
//! engine, which joins the cluster only then (a node that cannot serve never joins); [`App::run`]
//! serves (through [`crate::http`]: connection cap and timeouts) until the shutdown future
//! resolves, then stops both halves at once: the HTTP server stops accepting and lets in-flight
//! calls finish (within a grace period) while the engine stops leasing, gives in-flight lines a
//! grace period, flushes the result writer and releases leases.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::api::{self, AppState};
use crate::backend::Backends;
use crate::config::Config;
use crate::engine::Engine;
use crate::upstream::Router;

const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

pub struct App {
    listener: tokio::net::TcpListener,
    state: AppState,
    _locks: Vec<crate::backend::DataDirLock>,
}

impl App {
    pub async fn build(cfg: Config) -> anyhow::Result<App> {
        if !cfg.auth_enabled() && !cfg.listen.ip().is_loopback() && !cfg.insecure_no_auth {
            anyhow::bail!(
                "refusing to listen on {} without API keys: configure [[tenants]] with api_keys in batchd.toml, \
                 or pass --insecure-no-auth to serve without authentication",
                cfg.listen
            );
        }
        let cfg = Arc::new(cfg);
        // Bind first: a node that cannot serve (its address is in use) must never join the
        // cluster, where it would count as a live node and take a share of every upstream's
        // limits from the nodes that do serve.
        let listener = crate::http::bind(cfg.listen).with_context(|| format!("binding {}", cfg.listen))?;
        let Backends { store, blob, exclusive, locks } = Backends::open(&cfg).await?;
        let router = Arc::new(Router::new(&cfg.upstreams).context("building upstream clients")?);
        if cfg.upstreams.is_empty() {
            tracing::warn!("no upstream configured: batches are refused at create (start with --upstream URL or set OPENAI_BASE_URL)");
        }
        router.look_at_start();
        let engine = Engine::start(store.clone(), blob.clone(), router.clone(), cfg.clone(), exclusive).await?;
        let streams = api::stream_slots::StreamSlots::new(cfg.http.streams);
        let state = AppState { store, blob, engine, router, cfg, streams };
        Ok(App { listener, state, _locks: locks })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    pub fn engine(&self) -> &Engine {
        &self.state.engine
    }

    pub async fn run(self, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let engine = self.state.engine.clone();
        let limits = self.state.cfg.http;
        let app = api::router(self.state);
        // Event streams never end by themselves: end them when shutdown starts.
        let streams = engine.streams_stop();
        // The engine stops at the signal, while the HTTP server drains, not after it: a stop
        // then takes at most one grace for HTTP or two for the engine (in-flight calls, then
        // making their results durable), 20 s, inside a 30 s stop timeout.
        let stopping = tokio_util::sync::CancellationToken::new();
        let signalled = stopping.clone();
        let shutdown = async move {
            shutdown.await;
            streams.cancel();
            signalled.cancel();
        };
        let http = async {
            crate::http::serve(self.listener, app, limits, shutdown, SHUTDOWN_GRACE).await;
            tracing::info!("HTTP server stopped");
            stopping.cancel();
        };
        let engine_stop = async {
            stopping.cancelled().await;
            tracing::info!("stopping the engine");
            engine.shutdown(SHUTDOWN_GRACE).await;
        };
        tokio::join!(http, engine_stop);
        Ok(())
    }
}

/// Resolves on ctrl-c or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    tracing::info!("shutdown signal received");
}
