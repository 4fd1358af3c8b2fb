//! `batchd validate`: check an input file without sending anything.

use std::path::PathBuf;

use anyhow::Context;
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
    let file = tokio::fs::File::open(&args.input).await.with_context(|| format!("reading {}", args.input.display()))?;
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
    println!("{} · {} bytes · {format} · endpoint {endpoint}", plural(report.validated.total, "request"), size);
    let mut cost: Option<Cost> = None;
    for (m, sum) in &report.models {
        let output = match sum.max_output_tokens {
            0 => "output tokens not bounded (no max_tokens)".to_string(),
            n => format!("≤{n} output tokens (max_tokens)"),
        };
        println!("  model {m}: {}, ~{} input tokens, {output}", plural(sum.requests, "request"), sum.input_tokens);
        if let Some(p) = cfg.prices.get(m) {
            let full = (sum.input_tokens as f64 * p.input_per_million + sum.max_output_tokens as f64 * p.output_per_million) / 1e6;
            let c = cost.get_or_insert(Cost::default());
            c.full += full;
            c.batch += full * (1.0 - p.batch_discount);
            c.unbounded |= sum.max_output_tokens == 0;
        }
    }
    println!("estimated input tokens: {} (bytes/4)", report.estimated_input_tokens);
    if let Some(c) = cost {
        println!("{}", c.words());
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

/// The estimated cost of the priced models: at the batch price and at the full one.
#[derive(Default)]
struct Cost {
    full: f64,
    batch: f64,
    /// Some lines set no max_tokens: their output is not counted.
    unbounded: bool,
}

impl Cost {
    fn words(&self) -> String {
        let output = if self.unbounded { "output of lines without max_tokens not counted" } else { "output at most max_tokens" };
        if (self.full - self.batch).abs() < f64::EPSILON {
            format!("estimated cost: {:.4} (configured [prices]; {output})", self.full)
        } else {
            format!("estimated cost: {:.4} at the batch price ({:.4} without batch_discount; configured [prices]; {output})", self.batch, self.full)
        }
    }
}

/// "1 request", "2 requests".
pub(super) fn plural(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
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
