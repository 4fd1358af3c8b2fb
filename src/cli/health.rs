//! `batchd health`: asks a server's `/healthz` and exits 0 when it answers 200, else 1.
//!
//! The container image's `HEALTHCHECK` runs it, so the runtime image needs no curl or shell.

use std::time::Duration;

use clap::Args;

pub const EXAMPLES: &str = "Examples:
  batchd health                                   (the server on BATCHD_LISTEN, or 127.0.0.1:8080)
  batchd health --url http://gpu-box:8080/healthz

Exit codes: 0 the server answered 200; 1 it did not (no answer within --timeout-s, or another status).";

#[derive(Args, Debug, Clone)]
pub struct HealthArgs {
    /// The URL to ask [default: /healthz on BATCHD_LISTEN, a wildcard address asked on loopback].
    #[arg(long)]
    pub url: Option<String>,
    /// Seconds to wait for the answer.
    #[arg(long, default_value_t = 5)]
    pub timeout_s: u64,
}

/// The default URL: the address `serve` listens on (`BATCHD_LISTEN`), asked from this host.
fn default_url() -> String {
    let listen = std::env::var("BATCHD_LISTEN").ok().filter(|l| !l.trim().is_empty()).unwrap_or_else(|| crate::config::DEFAULT_LISTEN.to_string());
    let listen = match listen.rsplit_once(':') {
        Some(("0.0.0.0" | "[::]" | "", port)) => format!("127.0.0.1:{port}"),
        _ => listen,
    };
    format!("http://{listen}/healthz")
}

pub async fn run(a: HealthArgs) -> anyhow::Result<i32> {
    let url = a.url.unwrap_or_else(default_url);
    let http = reqwest::Client::builder().timeout(Duration::from_secs(a.timeout_s)).build()?;
    match http.get(&url).send().await {
        Ok(r) if r.status().is_success() => Ok(0),
        Ok(r) => {
            eprintln!("batchd health: {url} answered {}", r.status());
            Ok(1)
        }
        Err(e) => {
            eprintln!("batchd health: no answer from {url}: {e}");
            Ok(1)
        }
    }
}
