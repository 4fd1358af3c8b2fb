//! batchd — a self-hosted, OpenAI-compatible Batch API server.
//!
//! A map of the crate, in the order a request travels:
//!
//! - [`config`]: layered configuration (defaults < `batchd.toml` < `BATCHD_*` < flags),
//!   validated once into a ready-to-use [`config::Config`].
//! - [`api`]: the HTTP front door (`/v1/files`, `/v1/batches`, `/v1/models`, `/healthz`, the
//!   extensions — progress, event streams, retry, usage, quotas, validation — Anthropic's
//!   Message Batches API on the same batches (`/v1/messages/batches`), and the web console at
//!   `/`, its files built in from `console/`); every error leaves through [`error::ApiError`]
//!   in OpenAI's envelope (Anthropic's on its routes).
//! - [`store`]: metadata (files, batches, work units, results, the event outbox, webhook
//!   deliveries, nodes) behind the [`store::Store`] traits; SQLite is the embedded default,
//!   PostgreSQL serves many nodes; one conformance suite for both.
//! - [`blob`]: file bytes behind [`object_store`]: a local directory, or an S3-compatible bucket.
//! - [`engine`]: supervisor → validator → feeders (leases, deadline-aware shares) → dispatch
//!   (retries) → result writer (group commit) → finalizer (output and error files); cluster
//!   heartbeats, webhooks, stalls, the janitor.
//! - [`upstream`]: routing of models to upstream pools, the HTTP client, and each pool's
//!   adaptive limits (what it learns from 429s, latency and rate-limit headers); each pool
//!   speaks OpenAI's API or Anthropic's Messages API, and [`upstream::translate`] turns a
//!   line and its answer from one into the other.
//! - [`mock`]: an OpenAI-compatible mock upstream (with Anthropic's `/v1/messages` too) for
//!   tests, benchmarks and the quickstart.
//! - [`cli`]: the `batchd` commands (`serve`, `run`, `validate`, `retry`, client commands).
//! - [`backend`] picks the store and blob store a node runs on (embedded SQLite and a local
//!   directory, or PostgreSQL and S3 shared by many nodes), once, at start-up;
//! - [`server`] assembles a node (binds, then backends, engine, HTTP) and stops it
//!   gracefully; [`http`] serves its connections (connection cap with the longest-waiting
//!   connection shed for a newcomer, timeouts, envelopes for what hyper refuses to parse);
//!   [`wire`] renders OpenAI's objects;
//!   [`ids`] makes ids; [`memory`] keeps the allocator's footprint small; [`metrics`] keeps
//!   the Prometheus families; [`secret`] holds what must never print; [`Chain`] prints an
//!   error with its causes.

pub mod api;
pub mod backend;
pub mod blob;
pub mod cli;
pub mod clock;
pub mod config;
pub mod engine;
pub mod error;
pub mod http;
pub mod ids;
pub mod memory;
pub mod metrics;
pub mod mock;
pub mod secret;
pub mod server;
pub mod store;
pub mod upstream;
pub mod wire;

/// Seconds since the Unix epoch, the unit of every timestamp on the wire, by the cluster's
/// clock (see [`clock`]).
pub fn now_unix() -> i64 {
    clock::now_ms().div_euclid(1000)
}

/// Milliseconds since the Unix epoch (for pauses that end within seconds), by the cluster's clock.
pub fn now_unix_ms() -> u64 {
    clock::now_ms().max(0) as u64
}

/// Seconds since the Unix epoch, with a fraction (for rates and ages), by the cluster's clock.
pub fn now_unix_f64() -> f64 {
    clock::now_ms() as f64 / 1000.0
}

/// Displays an error with every cause under it, `outer: inner: innermost`: how a log line or
/// a stored message keeps the whole chain of an error whose `Display` tells its own layer only.
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(e) = cause {
            write!(f, ": {e}")?;
            cause = e.source();
        }
        Ok(())
    }
}
