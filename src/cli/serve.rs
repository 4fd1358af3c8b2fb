//! `batchd serve`: flags (each also read from `BATCHD_*`) merged over the config file.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;

use crate::config::RawConfig;
use crate::server::{shutdown_signal, App};

pub const EXAMPLES: &str = "Examples:
  batchd serve --upstream http://127.0.0.1:8000/v1
  batchd serve --config batchd.toml --listen 0.0.0.0:8080
  BATCHD_UPSTREAM=http://127.0.0.1:11434/v1 batchd serve --concurrency 8
  batchd serve --database postgres://batchd@db:5432/batchd --blob s3://batchd-files/prod  (one node of several)
  batchd serve --config batchd.toml --print-config";

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "BATCHD_LISTEN")]
    pub listen: Option<String>,
    /// Directory for the embedded store and files [default: ./batchd-data].
    #[arg(long, env = "BATCHD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Metadata store: postgres://USER@HOST:PORT/DB (shared by many nodes) or sqlite://PATH
    /// [default: SQLite in the data directory].
    #[arg(long, env = "BATCHD_DATABASE_URL")]
    pub database: Option<String>,
    /// File bytes: s3://BUCKET/PREFIX (configured by the AWS_* environment) or file://PATH
    /// [default: blobs/ in the data directory]. With --database too, no data directory is used.
    #[arg(long, env = "BATCHD_BLOB_URL")]
    pub blob: Option<String>,
    /// Configuration file [default: ./batchd.toml when it exists].
    #[arg(long, env = "BATCHD_CONFIG")]
    pub config: Option<PathBuf>,
    /// One upstream for every model (an OpenAI-compatible base URL ending in /v1).
    #[arg(long, env = "BATCHD_UPSTREAM")]
    pub upstream: Option<String>,
    /// Max concurrent requests per upstream.
    #[arg(long, env = "BATCHD_CONCURRENCY")]
    pub concurrency: Option<usize>,
    /// Serve without API keys on a non-loopback address.
    #[arg(long, env = "BATCHD_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,
    /// Print the effective configuration (secrets redacted) and exit.
    #[arg(long)]
    pub print_config: bool,
}

impl ServeArgs {
    /// The file layer with the environment and flags merged over it.
    pub fn raw_config(&self) -> anyhow::Result<RawConfig> {
        let mut raw = RawConfig::load(self.config.as_deref())?.with_catch_all_upstream(self.upstream.clone(), self.concurrency);
        if let Some(l) = &self.listen {
            raw.server.listen = Some(l.clone());
        }
        if let Some(d) = &self.data_dir {
            raw.server.data_dir = Some(d.clone());
        }
        if let Some(d) = &self.database {
            raw.server.database = Some(d.clone());
        }
        if let Some(b) = &self.blob {
            raw.server.blob = Some(b.clone());
        }
        if self.insecure_no_auth {
            raw.server.insecure_no_auth = Some(true);
        }
        Ok(raw)
    }
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let cfg = args.raw_config()?.resolve()?;
    if args.print_config {
        print!("{}", cfg.redacted_toml());
        return Ok(());
    }
    let app = App::build(cfg).await?;
    let addr = app.local_addr();
    println!("batchd listening on http://{addr}");
    std::io::stdout().flush()?;
    tracing::info!(%addr, "batchd ready");
    app.run(shutdown_signal()).await
}
