//! `batchd validate`: check an input file without sending anything.

use std::path::PathBuf;

use clap::Args;
use futures::TryStreamExt;
use tokio_util::io::ReaderStream;

use crate::config::{RawConfig, RawUpstream};
use crate::engine::validator::{validate_stream, Validator};
use crate::store::{InputFormat, LineError};
use crate::upstream::Router;

pub const EXAMPLES: &str = "Examples:
  batchd validate prompts.jsonl
  batchd validate prompts.jsonl --config batchd.toml        # also checks models and aliases
  batchd validate docs.jsonl --endpoint /v1/embeddings

With [prices.\"MODEL\"] input_per_million / output_per_million in the config, the summary
also estimates the cost.

Exit codes: 0 the file is valid; 3 it has errors (each printed with its line number); 1 the
file could not be read.";

#[derive(Args, Debug, Clone)]
pub struct ValidateArgs {
    /// The input JSONL file.
    pub input: PathBuf,
    /// Configuration file; its upstreams decide which models are known.
    #[arg(long, env = "BATCHD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Endpoint the lines must target [default: the url of the first full line, else /v1/chat/completions].
    #[arg(long)]
    pub endpoint: Option<String>,
}

/// One error as a user reads it.
pub fn describe(e: &LineError) -> String {
    match e.line {
        Some(l) => format!("line {l}: [{}] {}", e.code, e.message),
        None => format!("[{}] {}", e.code, e.message),
    }
}

pub async fn run(args: ValidateArgs) -> anyhow::Result<i32> {
    let mut raw = RawConfig::load(args.config.as_deref())?;
    let models_checked = !raw.upstreams.is_empty();
    if !models_checked {
        raw.upstreams.push(RawUpstream { name: "any".into(), base_url: "http://127.0.0.1:9/v1".into(), models: vec!["*".into()], ..Default::default() });
    }
    let cfg = raw.resolve()?;
    let router = Router::new(&cfg.upstreams)?;
    let endpoint = match args.endpoint {
        Some(e) => e,
        None => first_url(&args.input).await.unwrap_or_else(|| "/v1/chat/completions".into()),
    };
    let file = tokio::fs::File::open(&args.input).await?;
    let size = file.metadata().await?.len();
    let stream = ReaderStream::with_capacity(file, 1 << 20).map_err(anyhow::Error::from);
    let v = Validator::new("batch_validate", &endpoint, &router, cfg.limits, cfg.engine.unit_lines);
    let report = validate_stream(stream, size, v).await?;
    for e in &report.errors {
        println!("{}", describe(e));
    }
    let format = match report.validated.format {
        InputFormat::Full => "full batch requests",
        InputFormat::Bare => "bare request bodies (custom_id line-N)",
    };
    println!("{} requests · {} bytes · {format} · endpoint {endpoint}", report.validated.total, size);
    let mut cost = None;
    for (m, sum) in &report.models {
        println!("  model {m}: {} requests, ~{} input tokens, ≤{} output tokens (max_tokens)", sum.requests, sum.input_tokens, sum.max_output_tokens);
        if let Some(p) = cfg.prices.get(m) {
            let c = (sum.input_tokens as f64 * p.input_per_million + sum.max_output_tokens as f64 * p.output_per_million) / 1e6;
            *cost.get_or_insert(0.0) += c;
        }
    }
    println!("estimated input tokens: {} (bytes/4)", report.estimated_input_tokens);
    if let Some(c) = cost {
        println!("estimated cost: {c:.4} (configured [prices]; output at most max_tokens)");
    }
    if !models_checked {
        println!("models were not checked: pass --config with [[upstreams]] to check them");
    }
    if report.errors.is_empty() {
        println!("valid");
        Ok(0)
    } else {
        println!("{} errors", report.errors.len());
        Ok(3)
    }
}

/// The `url` of the first full line, to default the endpoint.
async fn first_url(path: &std::path::Path) -> Option<String> {
    use tokio::io::AsyncBufReadExt;
    let f = tokio::fs::File::open(path).await.ok()?;
    let mut lines = tokio::io::BufReader::new(f).lines();
    for _ in 0..100 {
        let line = lines.next_line().await.ok()??;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line).ok()?;
        return v.get("url").and_then(|u| u.as_str()).map(str::to_owned);
    }
    None
}
