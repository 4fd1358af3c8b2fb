//! `batchd retry`: exactly the lines that failed, again. `batchd retry BATCH_ID` asks the
//! server for a new batch of them (`POST /v1/batches/{id}/retry`); `batchd retry ERRORS
//! --input IN -o OUT` writes a new input file from local files.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use serde_json::Value;

pub const EXAMPLES: &str = "Examples:
  batchd retry batch_abc123                       # a new batch on the server, printed as its id
  batchd retry batch_abc123 --status 429,500 --include failed
  batchd retry prompts.errors.jsonl --input prompts.jsonl -o retry.jsonl
  batchd retry errors.jsonl --input prompts.jsonl -o retry.jsonl --status 429,500,503
  batchd retry errors.jsonl --input prompts.jsonl -o retry.jsonl --code batch_expired,request_timeout

Bare input lines are written as full lines keeping their custom_id (line-N), so the
retry's results match the original lines. Exit codes: 0 written; 1 error, or no failed line
matches --status / --code (nothing is written then).";

#[derive(Args, Debug, Clone)]
pub struct RetryArgs {
    /// A batch id on the server, or the errors file of a finished batch.
    pub errors: PathBuf,
    /// The batch's input file (local form: with an errors file).
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Where to write the retry input (local form).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Server form: only these kinds of error lines (failed, expired, cancelled; comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub include: Vec<String>,
    #[command(flatten)]
    pub server: super::connection::ServerArgs,
    /// Only lines whose upstream answered one of these HTTP statuses (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub status: Vec<u16>,
    /// Only lines with one of these error codes (e.g. batch_expired, request_timeout).
    #[arg(long, value_delimiter = ',')]
    pub code: Vec<String>,
    /// Endpoint for bare input lines (local form).
    #[arg(long, default_value = "/v1/chat/completions")]
    pub endpoint: String,
}

fn selected(line: &Value, args: &RetryArgs) -> bool {
    if args.status.is_empty() && args.code.is_empty() {
        return true;
    }
    let status = line["response"]["status_code"].as_u64().map(|s| s as u16);
    let code = line["error"]["code"].as_str();
    status.is_some_and(|s| args.status.contains(&s)) || code.is_some_and(|c| args.code.iter().any(|x| x == c))
}

/// The failed lines of an errors file: the custom_ids `--status`/`--code` select, and a tally
/// of every failed line by what failed it ("400", "batch_expired"), to say why none matched.
struct Failed {
    selected: HashSet<String>,
    total: usize,
    by_cause: std::collections::BTreeMap<String, usize>,
}

fn failed_ids(args: &RetryArgs) -> anyhow::Result<Failed> {
    let f = std::fs::File::open(&args.errors).with_context(|| format!("reading {}", args.errors.display()))?;
    let mut failed = Failed { selected: HashSet::new(), total: 0, by_cause: Default::default() };
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(&line).with_context(|| format!("{} line {}", args.errors.display(), i + 1))?;
        failed.total += 1;
        let cause = match (v["response"]["status_code"].as_u64(), v["error"]["code"].as_str()) {
            (Some(s), _) => format!("status {s}"),
            (None, Some(c)) => format!("code {c}"),
            (None, None) => "unknown".into(),
        };
        *failed.by_cause.entry(cause).or_default() += 1;
        if selected(&v, args) {
            if let Some(id) = v["custom_id"].as_str() {
                failed.selected.insert(id.to_string());
            }
        }
    }
    Ok(failed)
}

pub async fn run(args: RetryArgs) -> anyhow::Result<i32> {
    let target = args.errors.to_string_lossy().into_owned();
    if target.starts_with("batch_") && args.input.is_none() && !args.errors.exists() {
        return on_server(&args, &target).await;
    }
    let (Some(input), Some(output)) = (&args.input, &args.output) else {
        anyhow::bail!("with an errors file, --input and --output are required (or pass a batch id to retry on the server)");
    };
    local(&args, input, output)
}

/// `POST /v1/batches/{id}/retry`; prints the new batch's id.
async fn on_server(args: &RetryArgs, id: &str) -> anyhow::Result<i32> {
    let c = super::connection::Client::new(&args.server);
    let mut body = serde_json::Map::new();
    if !args.include.is_empty() {
        body.insert("include".into(), args.include.clone().into());
    }
    if !args.status.is_empty() {
        body.insert("status_codes".into(), args.status.clone().into());
    }
    let b = c.json(c.req(reqwest::Method::POST, &format!("/batches/{id}/retry")).json(&body)).await?;
    let new_id = b["id"].as_str().unwrap_or_default();
    println!("{new_id}");
    // (Its request_counts are 0 until it is validated: no line count to tell yet.)
    eprintln!("retrying the failed lines of {id} as {new_id}; follow it with: batchd status {new_id} --watch");
    Ok(0)
}

fn local(args: &RetryArgs, input: &std::path::Path, output: &std::path::Path) -> anyhow::Result<i32> {
    let failed = failed_ids(args)?;
    if failed.selected.is_empty() {
        let causes: Vec<String> = failed.by_cause.iter().map(|(c, n)| format!("{c} ×{n}")).collect();
        let why = if failed.total == 0 { String::new() } else { format!(" (they failed with {})", causes.join(", ")) };
        anyhow::bail!("none of the {} failed lines in {} match{}{}; nothing written", failed.total, args.errors.display(), filter_words(args), why);
    }
    let ids = failed.selected;
    let input = std::fs::File::open(input).with_context(|| format!("reading {}", input.display()))?;
    let mut out = BufWriter::new(std::fs::File::create(output)?);
    let mut written = 0;
    for (i, line) in BufReader::new(input).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let Ok(Value::Object(mut obj)) = serde_json::from_str::<Value>(&line) else { continue };
        let full = ["custom_id", "method", "url"].iter().any(|k| obj.contains_key(*k));
        let id = if full { obj.get("custom_id").and_then(Value::as_str).unwrap_or_default().to_string() } else { format!("line-{}", i + 1) };
        if !ids.contains(&id) {
            continue;
        }
        if full {
            writeln!(out, "{line}")?;
        } else {
            obj = serde_json::json!({"custom_id": id, "method": "POST", "url": args.endpoint, "body": obj}).as_object().cloned().unwrap_or_default();
            writeln!(out, "{}", Value::Object(obj))?;
        }
        written += 1;
    }
    out.flush()?;
    eprintln!("{written} of {} failed lines written to {}{}", failed.total, output.display(), filter_words(args));
    Ok(0)
}

/// " --status 429,500 --code batch_expired", or "" without filters.
fn filter_words(args: &RetryArgs) -> String {
    let mut w = String::new();
    if !args.status.is_empty() {
        w += &format!(" --status {}", args.status.iter().map(u16::to_string).collect::<Vec<_>>().join(","));
    }
    if !args.code.is_empty() {
        w += &format!(" --code {}", args.code.join(","));
    }
    w
}
