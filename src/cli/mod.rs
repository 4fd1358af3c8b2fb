//! The `batchd` command line: `serve`, `mock-upstream`, and the commands built on the engine.
//!
//! Exit codes: 0 success; 1 failure (a bad configuration, an error talking to a server);
//! 2 bad usage (clap); 3 the input has validation errors (`validate`, `run`); 4 a batch that
//! `run` or `status --watch` followed ended with lines in the errors file (or failed, expired,
//! cancelled); 130 `run` interrupted.

mod client;
mod connection;
mod health;
mod migrate;
mod progress;
mod retry;
mod run;
mod serve;
mod validate;
mod watch;

use clap::{Parser, Subcommand};

/// `batchd --version`: the crate version and the commit it was built from (build.rs).
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("BATCHD_COMMIT"), ")");

#[derive(Parser, Debug)]
#[command(name = "batchd", version = VERSION, about = "Self-hosted, OpenAI-compatible Batch API server", long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the API server and the engine (embedded SQLite + local files by default).
    #[command(after_help = serve::EXAMPLES)]
    Serve(serve::ServeArgs),
    /// Copy an embedded install (data directory) into PostgreSQL and a blob store, for scale-out.
    #[command(after_help = migrate::EXAMPLES)]
    Migrate(migrate::MigrateArgs),
    /// Run the project's mock OpenAI-compatible upstream (for tests, benchmarks, the quickstart).
    #[command(
        after_help = "Examples:\n  batchd mock-upstream --listen 127.0.0.1:8000\n  batchd mock-upstream --latency-ms 200 --rate-429 0.05 --error-rate 0.05"
    )]
    MockUpstream(crate::mock::MockArgs),
    /// Run a JSONL file through an upstream in-process, with progress and resume; no server.
    #[command(after_help = run::EXAMPLES)]
    Run(run::RunArgs),
    /// Check an input file without sending anything.
    #[command(after_help = validate::EXAMPLES)]
    Validate(validate::ValidateArgs),
    /// Retry the lines that failed: a new batch on the server, or a new input file.
    #[command(after_help = retry::EXAMPLES)]
    Retry(retry::RetryArgs),
    /// Upload a file and create a batch on a server.
    #[command(after_help = client::EXAMPLES)]
    Submit(client::SubmitArgs),
    /// Show a batch (with --watch, follow it live).
    #[command(after_help = client::EXAMPLES)]
    Status(client::StatusArgs),
    /// Download a batch's output and error files.
    #[command(after_help = client::EXAMPLES)]
    Download(client::DownloadArgs),
    /// Cancel a batch.
    #[command(after_help = client::EXAMPLES)]
    Cancel(client::IdArgs),
    /// List batches, newest first.
    #[command(after_help = client::EXAMPLES)]
    List(client::ListArgs),
    /// Ask a server's /healthz (the container image's health check).
    #[command(after_help = health::EXAMPLES)]
    Health(health::HealthArgs),
}

pub async fn main(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Serve(a) => serve::run(a).await.map(|()| 0),
        Command::Migrate(a) => migrate::run(a).await,
        Command::MockUpstream(a) => crate::mock::run(a).await.map(|()| 0),
        Command::Run(a) => run::run(a).await,
        Command::Validate(a) => validate::run(a).await,
        Command::Retry(a) => retry::run(a).await,
        Command::Submit(a) => client::submit(a).await,
        Command::Status(a) => client::status(a).await,
        Command::Download(a) => client::download(a).await,
        Command::Cancel(a) => client::cancel(a).await,
        Command::List(a) => client::list(a).await,
        Command::Health(a) => health::run(a).await,
    }
}
