//! `batchd run`: one JSONL file to output and error files, in-process, with progress.
//!
//! The run lives in a state directory (an embedded store and blob directory, `--state` or
//! `<output>.batchd/`). The input file and the batch get ids derived from the input's path,
//! size, modification time and endpoint, so running the same command again finds the same
//! batch and resumes it from its durable results; nothing that finished is sent again.
//!
//! An input in Anthropic's Message Batches format (one `{"custom_id", "params"}` per line,
//! told by its first line) is run as a Message Batch: each line becomes a `/v1/messages`
//! request line as it is copied in (line numbers kept, so validation errors name the
//! user's lines), and the output and errors files hold Anthropic's result lines
//! (`{"custom_id", "result": {"type": "succeeded", "message"}}`, `errored`, …).

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tokio::io::AsyncReadExt;

use super::progress::{Display, Pause, Rates, Snapshot};
use crate::api::message_batches::{anthropic_lines, intake::LINE_URL};
use crate::blob::Blob;
use crate::config::RawConfig;
use crate::engine::Engine;
use crate::store::{BatchApi, BatchId, BatchRecord, BatchStatus, FileId, FileRecord, Store};
use crate::upstream::Router;

pub const EXAMPLES: &str = "Examples:
  batchd run prompts.jsonl --upstream http://127.0.0.1:8000/v1
  batchd run prompts.jsonl --upstream http://127.0.0.1:11434/v1 -o answers.jsonl --concurrency 8
  batchd run docs.jsonl --endpoint /v1/embeddings --config batchd.toml --rpm 3000 --tpm 1000000

Input lines are full batch requests ({\"custom_id\",\"method\",\"url\",\"body\"}) or bare request
bodies ({\"model\": ..., \"messages\": ...}); bare line N gets custom_id \"line-N\".
Lines in Anthropic's Message Batches format ({\"custom_id\",\"params\"}) are run as
/v1/messages requests, and their results written in Anthropic's format.
Ctrl-C stops cleanly; run the same command again to resume.

Exit codes: 0 every line succeeded; 1 error; 3 the input failed validation;
4 finished, but some lines are in the errors file; 130 interrupted (resumable).";

const TENANT: &str = "local";
/// `batchd run` has no deadline; its batches expire after this long.
const RUN_WINDOW_S: i64 = 365 * 86_400;

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// The input JSONL file.
    pub input: PathBuf,
    /// Upstream base URL (ending in /v1) for every model.
    #[arg(long, env = "BATCHD_UPSTREAM")]
    pub upstream: Option<String>,
    /// Output file [default: INPUT with .output.jsonl].
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Errors file [default: INPUT with .errors.jsonl].
    #[arg(long)]
    pub errors: Option<PathBuf>,
    /// Endpoint of every line (bare lines use it as their url).
    #[arg(long, default_value = "/v1/chat/completions")]
    pub endpoint: String,
    /// Configuration file (upstreams, aliases, limits).
    #[arg(long, env = "BATCHD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Max concurrent requests per upstream.
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Requests per minute per upstream (0 = unlimited).
    #[arg(long)]
    pub rpm: Option<u64>,
    /// Tokens per minute per upstream (0 = unlimited).
    #[arg(long)]
    pub tpm: Option<u64>,
    /// State directory [default: OUTPUT.batchd next to the output].
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// No progress output.
    #[arg(short, long)]
    pub quiet: bool,
}

pub fn with_suffix(input: &Path, suffix: &str) -> PathBuf {
    let stem = input.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "batch".into());
    input.with_file_name(format!("{stem}{suffix}"))
}

impl RunArgs {
    fn raw_config(&self) -> anyhow::Result<RawConfig> {
        let mut raw = RawConfig::load(self.config.as_deref())?.with_catch_all_upstream(self.upstream.clone(), self.concurrency);
        for u in &mut raw.upstreams {
            u.rpm = self.rpm.or(u.rpm);
            u.tpm = self.tpm.or(u.tpm);
        }
        if raw.upstreams.is_empty() {
            anyhow::bail!("no upstream: pass --upstream URL (an OpenAI-compatible base URL ending in /v1) or --config FILE");
        }
        Ok(raw)
    }
}

pub async fn run(args: RunArgs) -> anyhow::Result<i32> {
    let output = args.output.clone().unwrap_or_else(|| with_suffix(&args.input, ".output.jsonl"));
    let errors = args.errors.clone().unwrap_or_else(|| with_suffix(&args.input, ".errors.jsonl"));
    let state = args.state.clone().unwrap_or_else(|| with_suffix(&output, ".batchd"));
    let mut raw = args.raw_config()?;
    // The state directory is this run's data directory (validation spills there too).
    raw.server.data_dir = Some(state.clone());
    let cfg = Arc::new(raw.resolve()?);
    let interrupted = tokio_util::sync::CancellationToken::new();
    tokio::spawn({
        let t = interrupted.clone();
        async move {
            crate::server::shutdown_signal().await;
            t.cancel();
        }
    });
    let (store, blob, _lock) = crate::backend::open_data_dir(&state).await?;
    let batch = tokio::select! {
        b = open_batch(&*store, &blob, &args) => b?,
        _ = interrupted.cancelled() => {
            eprintln!("interrupted before the run started; nothing was sent. Run the same command again to start.");
            return Ok(130);
        }
    };
    if !args.quiet {
        eprintln!("batch {} · state in {}", batch.id, state.display());
    }
    let router = Arc::new(Router::new(&cfg.upstreams)?);
    let engine = Engine::start(store.clone(), blob.clone(), router.clone(), cfg, true).await?;
    let watched = tokio::select! {
        r = watch(&*store, &engine, &router, &batch.id, args.quiet) => Some(r?),
        _ = interrupted.cancelled() => None,
    };
    engine.shutdown(Duration::from_secs(5)).await;
    let Some(b) = watched else {
        let b = store.get_batch(None, &batch.id).await?;
        eprintln!(
            "\ninterrupted: {} of {} lines are done and saved in {}.\nrun the same command again to resume; finished lines are not sent again.",
            b.completed + b.failed,
            b.total,
            state.display()
        );
        return Ok(130);
    };
    conclude(&*store, &blob, &b, &output, &errors, args.quiet).await
}

/// Finds the batch of this input (same path, size, mtime and endpoint) or creates it.
async fn open_batch(store: &dyn Store, blob: &Blob, args: &RunArgs) -> anyhow::Result<BatchRecord> {
    let path = std::fs::canonicalize(&args.input).with_context(|| format!("reading {}", args.input.display()))?;
    let meta = std::fs::metadata(&path)?;
    let anthropic = is_anthropic(&path).await?;
    let endpoint = if anthropic { LINE_URL.to_string() } else { args.endpoint.clone() };
    let mtime = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
    let key = format!("run:{}:{}:{mtime}:{endpoint}", path.display(), meta.len());
    let file_id = crate::ids::batch_output_file_id(&key, "input");
    let now = crate::now_unix();
    if store.get_file(TENANT, &file_id, now).await.is_err() {
        let bytes = copy_into_blob(&path, blob, &format!("files/{file_id}"), anthropic).await?;
        let filename = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        let rec = FileRecord {
            id: file_id.clone(),
            tenant: TENANT.into(),
            bytes: bytes as i64,
            created_at: now,
            filename,
            purpose: "batch".into(),
            expires_at: None,
            blob_key: format!("files/{file_id}"),
        };
        store.insert_file(&rec).await?;
    }
    let (id, api) = if anthropic { (crate::ids::message_batch_id(), BatchApi::Anthropic) } else { (crate::ids::batch_id(), BatchApi::OpenAi) };
    let mut b = BatchRecord::new(id, TENANT.into(), file_id, endpoint, "365d".into(), now, now + RUN_WINDOW_S);
    b.api = api;
    Ok(store.insert_batch(&b, Some(&key)).await?)
}

/// Whether the input is in Anthropic's Message Batches format: its first line that is not
/// blank is an object with `params` and no `url` or `body`.
async fn is_anthropic(path: &Path) -> anyhow::Result<bool> {
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(tokio::fs::File::open(path).await?).lines();
    while let Some(line) = lines.next_line().await? {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        return Ok(v.get("params").is_some() && v.get("url").is_none() && v.get("body").is_none());
    }
    Ok(false)
}

/// A line of Anthropic's format as a line of batchd's (`/v1/messages`); any other line is
/// kept as it is, for validation to report with its number.
pub fn messages_line(line: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(line) {
        Ok(serde_json::Value::Object(mut m)) if m.contains_key("params") && !m.contains_key("url") => {
            let custom_id = m.remove("custom_id").unwrap_or_default();
            let body = m.remove("params").unwrap_or_default();
            serde_json::json!({"custom_id": custom_id, "method": "POST", "url": LINE_URL, "body": body}).to_string()
        }
        _ => line.to_string(),
    }
}

async fn copy_into_blob(path: &Path, blob: &Blob, key: &str, anthropic: bool) -> anyhow::Result<u64> {
    let mut f = tokio::fs::File::open(path).await?;
    let mut w = blob.writer(key);
    if anthropic {
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(f).lines();
        while let Some(line) = lines.next_line().await? {
            w.write(messages_line(&line).as_bytes()).await?;
            w.write(b"\n").await?;
        }
        return Ok(w.finish().await?);
    }
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        w.write(&buf[..n]).await?;
    }
    Ok(w.finish().await?)
}

/// Shows progress until the batch is final.
async fn watch(store: &dyn Store, engine: &Engine, router: &Router, id: &BatchId, quiet: bool) -> anyhow::Result<BatchRecord> {
    let mut display = Display::new(quiet);
    let mut rates = Rates::new();
    loop {
        let b = store.get_batch(None, id).await?;
        let mut snap = snapshot(&b, engine, &mut rates);
        snap.paused = router.states().iter().filter_map(|s| Some(Pause { words: s.pause_reason?.words(&s.name), until_ms: s.paused_until_ms? })).collect();
        if b.status.is_final() {
            display.finish(&snap);
            return Ok(b);
        }
        display.update(&snap);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn snapshot(b: &BatchRecord, engine: &Engine, rates: &mut Rates) -> Snapshot {
    let tokens = engine.stats().output_tokens.load(Ordering::Relaxed);
    let (requests_per_second, tokens_per_second) = rates.observe((b.completed + b.failed) as u64, tokens);
    let progress = engine.progress(b);
    let end = b.completed_at.or(b.cancelled_at).or(b.expired_at).or(b.failed_at);
    Snapshot {
        status: b.status.as_str().into(),
        total: b.total as u64,
        completed: b.completed as u64,
        failed: b.failed as u64,
        requests_per_second,
        tokens_per_second,
        eta_seconds: progress.and_then(|p| p.eta_seconds),
        retries_waiting: engine.stats().retries_waiting.load(Ordering::Relaxed),
        note: None,
        paused: vec![],
        took_seconds: end.map(|e| (e - b.in_progress_at.unwrap_or(b.created_at)).max(0) as u64),
        at_remote: engine.stats().remote_done.load(Ordering::Relaxed),
    }
}

async fn conclude(store: &dyn Store, blob: &Blob, b: &BatchRecord, output: &Path, errors: &Path, quiet: bool) -> anyhow::Result<i32> {
    if b.status == BatchStatus::Failed {
        eprintln!("the input failed validation:");
        for e in b.errors.iter().flatten() {
            eprintln!("  {}", super::validate::describe(e));
        }
        return Ok(3);
    }
    let anthropic = b.api == BatchApi::Anthropic;
    save(store, blob, &b.tenant, b.output_file_id.as_ref(), output, anthropic).await?;
    save(store, blob, &b.tenant, b.error_file_id.as_ref(), errors, anthropic).await?;
    if !quiet {
        eprintln!(
            "{}: {} succeeded → {}; {} failed → {}\ntokens: {} in, {} out",
            b.status.as_str(),
            b.completed,
            output.display(),
            b.failed,
            errors.display(),
            b.usage.input_tokens,
            b.usage.output_tokens
        );
    }
    Ok(if b.failed > 0 { 4 } else { 0 })
}

/// Writes a result file (empty when the batch has none), atomically; in Anthropic's result
/// lines for a Message Batch.
async fn save(store: &dyn Store, blob: &Blob, tenant: &str, file_id: Option<&FileId>, to: &Path, anthropic: bool) -> anyhow::Result<()> {
    use futures::StreamExt;
    use tokio::io::AsyncWriteExt;
    let tmp = to.with_extension("jsonl.partial");
    let mut out = tokio::fs::File::create(&tmp).await.with_context(|| format!("writing {}", tmp.display()))?;
    if let Some(id) = file_id {
        let f = store.get_file(tenant, id, 0).await?;
        let mut s = blob.get_stream(&f.blob_key).await?;
        // Anthropic's lines are rendered whole lines at a time: a chunk's last partial line
        // waits for the next chunk.
        let mut pending: Vec<u8> = vec![];
        while let Some(chunk) = s.next().await {
            let chunk = chunk?;
            if !anthropic {
                out.write_all(&chunk).await?;
                continue;
            }
            pending.extend_from_slice(&chunk);
            if let Some(end) = pending.iter().rposition(|&b| b == b'\n') {
                let whole: Vec<u8> = pending.drain(..=end).collect();
                out.write_all(anthropic_lines(&String::from_utf8_lossy(&whole)).as_bytes()).await?;
            }
        }
        if !pending.is_empty() {
            out.write_all(anthropic_lines(&String::from_utf8_lossy(&pending)).as_bytes()).await?;
        }
        out.flush().await?;
    }
    out.sync_all().await?;
    drop(out);
    tokio::fs::rename(&tmp, to).await?;
    Ok(())
}
