//! `batchd retry`: a new input file holding exactly the lines that failed.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use serde_json::Value;

pub const EXAMPLES: &str = "Examples:
  batchd retry prompts.errors.jsonl --input prompts.jsonl -o retry.jsonl
  batchd retry errors.jsonl --input prompts.jsonl -o retry.jsonl --status 429,500,503
  batchd retry errors.jsonl --input prompts.jsonl -o retry.jsonl --code batch_expired,request_timeout

Bare input lines are written as full lines keeping their custom_id (line-N), so the
retry's results match the original lines. Exit codes: 0 written; 1 error.";

#[derive(Args, Debug, Clone)]
pub struct RetryArgs {
    /// The errors file of a finished batch.
    pub errors: PathBuf,
    /// The batch's input file.
    #[arg(long)]
    pub input: PathBuf,
    /// Where to write the retry input.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Only lines whose upstream answered one of these HTTP statuses (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub status: Vec<u16>,
    /// Only lines with one of these error codes (e.g. batch_expired, request_timeout).
    #[arg(long, value_delimiter = ',')]
    pub code: Vec<String>,
    /// Endpoint for bare input lines.
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

fn failed_ids(args: &RetryArgs) -> anyhow::Result<HashSet<String>> {
    let f = std::fs::File::open(&args.errors).with_context(|| format!("reading {}", args.errors.display()))?;
    let mut ids = HashSet::new();
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(&line).with_context(|| format!("{} line {}", args.errors.display(), i + 1))?;
        if selected(&v, args) {
            if let Some(id) = v["custom_id"].as_str() {
                ids.insert(id.to_string());
            }
        }
    }
    Ok(ids)
}

pub fn run(args: RetryArgs) -> anyhow::Result<i32> {
    let ids = failed_ids(&args)?;
    let input = std::fs::File::open(&args.input).with_context(|| format!("reading {}", args.input.display()))?;
    let mut out = BufWriter::new(std::fs::File::create(&args.output)?);
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
    eprintln!("{written} of {} failed lines written to {}", ids.len(), args.output.display());
    Ok(0)
}
