//! Mock LLM upstream: a small OpenAI-compatible HTTP server for tests and
//! benchmarks (`batchd mock-upstream`).
//!
//! It answers `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings`,
//! `/v1/responses` and `/v1/moderations` with realistic OpenAI-shaped bodies
//! whose text is `"echo: "` + the first 40 characters of the request's last
//! message / prompt / input, and usage with prompt tokens = body bytes / 4.
//! `GET /v1/models` lists a few models. Every answer carries `x-request-id`
//! (the request's, echoed, or a generated one). `POST /v1/messages` answers in
//! Anthropic's shapes, with the same knobs (see `messages`).
//!
//! It can simulate, randomly (seeded) per request: base and per-token latency,
//! 500s, 429s with `retry-after` / `retry-after-ms`, and hangs (never
//! answering until the client gives up), plus an `api_key` check (401).
//! And the limits real upstreams enforce (see `limits`): a concurrency cap
//! answering 429 or 503 (`capacity`, `refusal_status`), OpenAI's rpm/tpm limiter with its
//! `x-ratelimit-*` headers (over a minute, or a second: `limit_period_s`), nginx's
//! `limit_req` (429 or 503), random 429s with a chosen retry-after (`rate_429`,
//! `retry_after_s`), one thread of its own (`--threads 1`), `insufficient_quota`
//! (`quota_exhausted`), and `slots` with a FIFO queue behind them, so latency
//! rises with load; `GET /metrics` reports that queue as vLLM does
//! (`vllm:num_requests_waiting`).
//! A request whose body holds a top-level `"mock"` object is deterministic
//! instead (no random faults): `status`, `latency_ms`, `hang`,
//! `retry_after_s`, `fail_times` (fail the first N attempts with the same
//! `x-request-id`, or the same body when it has none), `body_text`,
//! `completion_tokens`, `encoding` (`gzip` or `zstd`: compress the answer
//! when the request's `Accept-Encoding` allows it).
//!
//! Admin endpoints: `GET|POST /config` (live behaviour, every knob above),
//! `GET /stats?window_ms=N&ids=1` and `POST /stats/reset` (see [`Stats`]),
//! `GET /metrics` (Prometheus text).

mod behaviour;
mod bodies;
mod handlers;
mod limits;
mod messages;
pub mod sim;
mod state;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post, MethodRouter};
use axum::serve::ListenerExt;
use axum::Router;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use behaviour::Behaviour;
use bodies::Endpoint;
pub use state::Stats;

use state::Shared;

/// Run a mock OpenAI-compatible LLM upstream (for tests and benchmarks).
#[derive(Debug, Clone, clap::Args)]
pub struct MockArgs {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub listen: String,
    /// Base latency of every answer, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Extra latency per completion token of a successful answer, in milliseconds.
    #[arg(long, default_value_t = 0.0)]
    pub per_token_ms: f64,
    /// Completion tokens per generated answer.
    #[arg(long, default_value_t = 16)]
    pub completion_tokens: u32,
    /// Fraction of requests answered 500.
    #[arg(long, default_value_t = 0.0)]
    pub error_rate: f64,
    /// Fraction of requests answered 429.
    #[arg(long, default_value_t = 0.0)]
    pub rate_429: f64,
    /// Retry-After sent with 429s, in seconds (`retry-after` rounded up, `retry-after-ms` exact).
    #[arg(long, default_value_t = 1.0)]
    pub retry_after_s: f64,
    /// Fraction of requests that never answer (until the client gives up).
    #[arg(long, default_value_t = 0.0)]
    pub hang_rate: f64,
    /// Seed of the random fault decisions (default: from entropy).
    #[arg(long)]
    pub seed: Option<u64>,
    /// If set, require `Authorization: Bearer KEY` on `/v1/*`, else answer 401.
    #[arg(long)]
    pub api_key: Option<String>,
    /// Above this many requests in flight, answer 429 at once with no header (0: no cap).
    #[arg(long, default_value_t = 0)]
    pub capacity: u64,
    /// Serve this many requests at once, queueing the rest FIFO (0: no queue).
    #[arg(long, default_value_t = 0)]
    pub slots: u64,
    /// Requests per minute, OpenAI-style with x-ratelimit-* headers (0: none).
    #[arg(long, default_value_t = 0.0)]
    pub rpm: f64,
    /// Tokens per minute, OpenAI-style with x-ratelimit-* headers (0: none).
    #[arg(long, default_value_t = 0.0)]
    pub tpm: f64,
    /// nginx `limit_req` rate in requests per second, no burst, refused with no header (0: none).
    #[arg(long, default_value_t = 0.0)]
    pub limit_rps: f64,
    /// Seconds of the rpm/tpm limit the buckets hold: 60, or 1 for a limit enforced per second.
    #[arg(long, default_value_t = 60.0)]
    pub limit_period_s: f64,
    /// Status of the `--capacity` and `--limit-rps` refusals: 429, or 503 as nginx answers.
    #[arg(long, default_value_t = 429)]
    pub refusal_status: u16,
    /// Serve on a runtime of its own with this many threads (1: one thread, as a small
    /// CPU-bound server); 0 shares the process's.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    #[command(flatten)]
    pub sim: sim::SimArgs,
}

impl Default for MockArgs {
    fn default() -> Self {
        MockArgs {
            listen: "127.0.0.1:8000".into(),
            latency_ms: 0,
            per_token_ms: 0.0,
            completion_tokens: 16,
            error_rate: 0.0,
            rate_429: 0.0,
            retry_after_s: 1.0,
            hang_rate: 0.0,
            seed: None,
            api_key: None,
            capacity: 0,
            slots: 0,
            rpm: 0.0,
            tpm: 0.0,
            limit_rps: 0.0,
            limit_period_s: 60.0,
            refusal_status: 429,
            threads: 0,
            sim: sim::SimArgs::default(),
        }
    }
}

/// A running mock upstream; stops on [`MockServer::shutdown`] (or when dropped).
pub struct MockServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// How long `shutdown` waits for in-flight answers before aborting the server.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

impl MockServer {
    /// Binds, starts serving in a background tokio task, returns at once.
    pub async fn start(args: MockArgs) -> std::io::Result<MockServer> {
        Behaviour::from_args(&args).validate().map_err(std::io::Error::other)?;
        args.sim.validate().map_err(std::io::Error::other)?;
        let listener = tokio::net::TcpListener::bind(&args.listen).await?;
        let addr = listener.local_addr()?;
        let (stop, stop_rx) = watch::channel(false);
        let shared = Arc::new(Shared::new(&args, stop_rx.clone()));
        let app = router(shared.clone());
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
            let mut rx = stop_rx;
            let _ = rx.wait_for(|stop| *stop).await;
        });
        let task = tokio::spawn(async move {
            if let Err(e) = serve.await {
                tracing::error!("mock upstream server error: {e}");
            }
        });
        Ok(MockServer { addr, shared, stop, task })
    }

    /// The bound address (the real port when listening on port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR/v1`, the base URL to configure clients with.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Current counters, as `GET /stats` (60 s window, no id map).
    pub fn stats(&self) -> Stats {
        self.shared.stats(Duration::from_millis(60_000), false)
    }

    /// Counters with a custom arrival window, optionally with `request_id_counts`.
    pub fn stats_with(&self, window: Duration, with_ids: bool) -> Stats {
        self.shared.stats(window, with_ids)
    }

    /// Zeroes the counters, as `POST /stats/reset`.
    pub fn reset_stats(&self) {
        self.shared.reset();
    }

    /// The live behaviour settings, as `GET /config`.
    pub fn behaviour(&self) -> Behaviour {
        self.shared.behaviour()
    }

    /// Stops accepting, ends hanging requests (503), waits briefly for the rest.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let mut task = self.task;
        if tokio::time::timeout(SHUTDOWN_GRACE, &mut task).await.is_err() {
            task.abort();
        }
    }
}

fn endpoint(ep: Endpoint) -> MethodRouter<Arc<Shared>> {
    post(move |s, h, b| handlers::handle(ep, s, h, b))
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/chat/completions", endpoint(Endpoint::Chat))
        .route("/v1/completions", endpoint(Endpoint::Completions))
        .route("/v1/embeddings", endpoint(Endpoint::Embeddings))
        .route("/v1/responses", endpoint(Endpoint::Responses))
        .route("/v1/moderations", endpoint(Endpoint::Moderations))
        .route("/v1/messages", post(messages::handle))
        .route("/v1/models", get(handlers::models))
        .route("/config", get(handlers::get_config).post(handlers::set_config))
        .route("/stats", get(handlers::get_stats))
        .route("/stats/reset", post(handlers::reset_stats))
        .route("/metrics", get(handlers::metrics))
        .fallback(handlers::not_found)
        .layer(DefaultBodyLimit::disable())
        .with_state(shared)
}

/// CLI entry: start, print `mock-upstream listening on http://ADDR`, serve until ctrl-c/SIGTERM.
pub async fn run(args: MockArgs) -> anyhow::Result<()> {
    if args.threads > 0 {
        return run_on_own_runtime(args).await;
    }
    let server = MockServer::start(args).await?;
    announce(server.addr())?;
    stop_signal().await;
    server.shutdown().await;
    Ok(())
}

fn announce(addr: SocketAddr) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "mock-upstream listening on http://{addr}")?;
    out.flush()
}

/// `--threads N`: the server runs on a runtime of N threads of its own (one thread: a
/// current-thread runtime), so that it is as fast as a small server, not as the whole process.
async fn run_on_own_runtime(args: MockArgs) -> anyhow::Result<()> {
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let threads = args.threads;
    let thread = std::thread::Builder::new().name("mock-upstream".into()).spawn(move || {
        let rt = if threads == 1 {
            tokio::runtime::Builder::new_current_thread().enable_all().build()
        } else {
            tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()
        };
        let rt = match rt {
            Ok(rt) => rt,
            Err(e) => return drop(ready_tx.send(Err(e))),
        };
        rt.block_on(async move {
            match MockServer::start(args).await {
                Ok(server) => {
                    let _ = ready_tx.send(Ok(server.addr()));
                    let _ = stop_rx.await;
                    server.shutdown().await;
                }
                Err(e) => drop(ready_tx.send(Err(e))),
            }
        });
    })?;
    let addr = ready_rx.await.map_err(|_| anyhow::anyhow!("the mock's runtime ended before it started"))??;
    announce(addr)?;
    stop_signal().await;
    let _ = stop_tx.send(());
    tokio::task::spawn_blocking(move || thread.join()).await?.map_err(|_| anyhow::anyhow!("the mock's runtime panicked"))?;
    Ok(())
}

async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
