//! Client commands against a running server: `submit`, `status`, `download`, `cancel`, `list`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use serde_json::{json, Value};

use super::connection::{Client, ServerArgs, FINAL};
use super::progress::{Display, Snapshot};

pub const EXAMPLES: &str = "Examples:
  batchd submit prompts.jsonl --server http://127.0.0.1:8080
  batchd status batch_abc123 --watch
  batchd download batch_abc123 -o results/
  batchd cancel batch_abc123
  BATCHD_SERVER=http://gpu-box:8080 BATCHD_API_KEY=sk-team-a batchd list

Exit codes: 0 success; 1 error (the server's message is printed), or `cancel` of a batch that
had already ended; 4 `status --watch`
followed the batch to its end, but not every line succeeded (some are in the errors file, or
the batch ended failed, expired or cancelled).";

#[derive(Args, Debug, Clone)]
pub struct SubmitArgs {
    /// The input JSONL file.
    pub file: PathBuf,
    /// The endpoint every line targets (a full line's url must match it).
    #[arg(long, default_value = "/v1/chat/completions")]
    pub endpoint: String,
    /// How long the batch may run (one of the server's completion windows).
    #[arg(long, default_value = "24h")]
    pub completion_window: String,
    /// Metadata as KEY=VALUE (repeatable).
    #[arg(long, value_parser = parse_kv)]
    pub metadata: Vec<(String, String)>,
    #[command(flatten)]
    pub server: ServerArgs,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

pub async fn submit(a: SubmitArgs) -> anyhow::Result<i32> {
    let c = Client::new(&a.server);
    let bytes = tokio::fs::read(&a.file).await.with_context(|| format!("reading {}", a.file.display()))?;
    let name = a.file.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_else(|| "input.jsonl".into());
    let form = reqwest::multipart::Form::new().text("purpose", "batch").part("file", reqwest::multipart::Part::bytes(bytes).file_name(name));
    let file = c.json(c.req(reqwest::Method::POST, "/files").multipart(form)).await?;
    let metadata: serde_json::Map<String, Value> = a.metadata.into_iter().map(|(k, v)| (k, Value::String(v))).collect();
    let body = json!({"input_file_id": file["id"], "endpoint": a.endpoint, "completion_window": a.completion_window,
                      "metadata": if metadata.is_empty() { Value::Null } else { Value::Object(metadata) }});
    let b = c.json(c.req(reqwest::Method::POST, "/batches").json(&body)).await?;
    println!("{}", b["id"].as_str().unwrap_or_default());
    eprintln!("submitted {} as {} ({})", a.file.display(), b["id"].as_str().unwrap_or_default(), b["status"].as_str().unwrap_or_default());
    Ok(0)
}

#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    /// The batch id (batch_…), as `submit` and `list` print it.
    pub id: String,
    /// Follow the batch with a live progress display until it ends.
    #[arg(long)]
    pub watch: bool,
    /// Print the whole Batch object as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub server: ServerArgs,
}

fn snapshot(b: &Value) -> Snapshot {
    let n = |k: &str| b["request_counts"][k].as_u64().unwrap_or(0);
    Snapshot {
        status: b["status"].as_str().unwrap_or_default().into(),
        total: n("total"),
        completed: n("completed"),
        failed: n("failed"),
        requests_per_second: b["progress"]["requests_per_second"].as_f64().unwrap_or(0.0),
        tokens_per_second: 0.0,
        eta_seconds: b["progress"]["eta_seconds"].as_u64(),
        retries_waiting: 0,
        note: None,
        paused: super::progress::paused_list(&b["progress"]["upstreams"]),
        took_seconds: ["completed_at", "failed_at", "expired_at", "cancelled_at"]
            .iter()
            .find_map(|k| b[*k].as_i64())
            .map(|end| (end - b["in_progress_at"].as_i64().or(b["created_at"].as_i64()).unwrap_or(end)).max(0) as u64),
        at_remote: 0,
    }
}

pub async fn status(a: StatusArgs) -> anyhow::Result<i32> {
    let c = Client::new(&a.server);
    let path = format!("/batches/{}", a.id);
    if !a.watch {
        let b = c.json(c.req(reqwest::Method::GET, &path)).await?;
        print_batch(&b, a.json, ALL_ERRORS);
        return Ok(0);
    }
    let mut display = Display::new(false);
    let first = c.json(c.req(reqwest::Method::GET, &path)).await?;
    let followed = if FINAL.contains(&first["status"].as_str().unwrap_or_default()) {
        Some(first.clone())
    } else {
        super::watch::follow(&c, &a.id, &mut display, snapshot(&first)).await?
    };
    if let Some(b) = followed {
        let s = snapshot(&b);
        display.finish(&s);
        print_batch(&b, a.json, ALL_ERRORS);
        return Ok(if s.status == "completed" && s.failed == 0 { 0 } else { 4 });
    }
    // An older server without event streams: poll.
    loop {
        let b = c.json(c.req(reqwest::Method::GET, &path)).await?;
        let s = snapshot(&b);
        if FINAL.contains(&s.status.as_str()) {
            display.finish(&s);
            print_batch(&b, a.json, ALL_ERRORS);
            return Ok(if s.status == "completed" && s.failed == 0 { 0 } else { 4 });
        }
        display.update(&s);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// How many of a batch's validation errors `status` and `cancel` print (every one), and `list`.
const ALL_ERRORS: usize = usize::MAX;
const LIST_ERRORS: usize = 1;

fn print_batch(b: &Value, as_json: bool, max_errors: usize) {
    if as_json {
        println!("{}", serde_json::to_string_pretty(b).unwrap_or_default());
        return;
    }
    let s = snapshot(b);
    println!(
        "{}  {}  {}/{} done, {} failed  output {}  errors {}",
        b["id"].as_str().unwrap_or_default(),
        s.status,
        s.completed + s.failed,
        s.total,
        s.failed,
        b["output_file_id"].as_str().unwrap_or("-"),
        b["error_file_id"].as_str().unwrap_or("-")
    );
    for l in super::progress::upstream_lines(&b["progress"]["upstreams"]) {
        println!("  {l}");
    }
    let errors = b["errors"]["data"].as_array().map(Vec::as_slice).unwrap_or_default();
    for e in errors.iter().take(max_errors) {
        // File-level errors (empty_file, too_many_errors, ...) have `"line": null`.
        let at = e["line"].as_u64().map(|l| format!("line {l}: ")).unwrap_or_default();
        println!("  {at}[{}] {}", e["code"].as_str().unwrap_or_default(), e["message"].as_str().unwrap_or_default());
    }
    if errors.len() > max_errors {
        println!("  … and {} more errors: batchd status {}", errors.len() - max_errors, b["id"].as_str().unwrap_or_default());
    }
}

#[derive(Args, Debug, Clone)]
pub struct DownloadArgs {
    /// The batch id (batch_…), as `submit` and `list` print it.
    pub id: String,
    /// Directory to write `<id>_output.jsonl` and `<id>_error.jsonl` into (the server's names).
    #[arg(short, long, default_value = ".")]
    pub output_dir: PathBuf,
    #[command(flatten)]
    pub server: ServerArgs,
}

pub async fn download(a: DownloadArgs) -> anyhow::Result<i32> {
    use futures::StreamExt;
    use tokio::io::AsyncWriteExt;
    let c = Client::new(&a.server);
    let b = c.json(c.req(reqwest::Method::GET, &format!("/batches/{}", a.id))).await?;
    tokio::fs::create_dir_all(&a.output_dir).await?;
    for (field, suffix) in [("output_file_id", "output"), ("error_file_id", "error")] {
        let Some(fid) = b[field].as_str() else { continue };
        let to = a.output_dir.join(format!("{}_{suffix}.jsonl", a.id));
        let resp = c.send(c.req(reqwest::Method::GET, &format!("/files/{fid}/content"))).await?;
        let mut f = tokio::fs::File::create(&to).await?;
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            f.write_all(&chunk?).await?;
        }
        f.flush().await?;
        println!("{}", to.display());
    }
    if b["output_file_id"].is_null() && b["error_file_id"].is_null() {
        bail!("batch {} has no result files yet (status {})", a.id, b["status"].as_str().unwrap_or_default());
    }
    Ok(0)
}

#[derive(Args, Debug, Clone)]
pub struct IdArgs {
    /// The batch id (batch_…), as `submit` and `list` print it.
    pub id: String,
    #[command(flatten)]
    pub server: ServerArgs,
}

pub async fn cancel(a: IdArgs) -> anyhow::Result<i32> {
    let c = Client::new(&a.server);
    let b = c.json(c.req(reqwest::Method::POST, &format!("/batches/{}/cancel", a.id))).await?;
    print_batch(&b, false, ALL_ERRORS);
    let status = b["status"].as_str().unwrap_or_default();
    if status != "cancelling" && status != "cancelled" {
        eprintln!("batch {} had already ended ({status}): nothing to cancel", a.id);
        return Ok(1);
    }
    Ok(0)
}

#[derive(Args, Debug, Clone)]
pub struct ListArgs {
    /// How many batches to show, newest first.
    #[arg(long, default_value_t = 20)]
    pub limit: u32,
    #[command(flatten)]
    pub server: ServerArgs,
}

pub async fn list(a: ListArgs) -> anyhow::Result<i32> {
    let c = Client::new(&a.server);
    let page = c.json(c.req(reqwest::Method::GET, &format!("/batches?limit={}", a.limit))).await?;
    for b in page["data"].as_array().into_iter().flatten() {
        print_batch(b, false, LIST_ERRORS);
    }
    Ok(0)
}
