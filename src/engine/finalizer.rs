//! Finalization: the result log becomes the output file (2xx answers) and the error file
//! (everything else), streamed in constant memory.
//!
//! For a cancelled or expired batch, lines that never got a result are first recorded as
//! `batch_cancelled` / `batch_expired` errors, so every input line appears exactly once across
//! the two files. File ids derive from the batch id, so a finalization cut short by a crash is
//! simply done again; the files and the final status appear in one store transaction.
//! Memory: one chunk of the log (about [`CHUNK_BYTES`]) and the blob writer's part buffer,
//! whatever the number of results; filling in a cancelled batch holds one unit at a time.

use std::sync::Arc;

use super::dispatch::error_record;
use super::error::{Context, Result};
use super::feeder::Source;
use super::order::order_key;
use super::Inner;
use crate::blob::BlobWriter;
use crate::store::{BatchRecord, BatchStatus, FileId, FileRecord, Finish, InputFormat, ResultRecord};

pub async fn finish(inner: &Arc<Inner>, b: &BatchRecord, status: BatchStatus) -> Result<()> {
    match status {
        BatchStatus::Cancelled => fill_missing(inner, b, "batch_cancelled", "The batch was cancelled before this request ran.").await?,
        BatchStatus::Expired => fill_missing(inner, b, "batch_expired", "The batch expired before this request completed.").await?,
        _ => {}
    }
    // Re-read: the counts must include the lines just filled in.
    let b = &inner.store.get_batch(None, &b.id).await.ctx("reading the batch")?;
    let (output_file, error_file) = write_files(inner, b).await?;
    let finish = Finish { status, at: crate::now_unix(), output_file, error_file };
    inner.store.finish_batch(&b.id, &finish).await.ctx("recording the final status")?;
    // Nothing reads the dispatch order of a final batch (a retry reads the input in file order).
    if let Err(e) = inner.blob.delete(&order_key(&b.id)).await {
        tracing::warn!(batch = %b.id, error = %crate::Chain(&e), "deleting the dispatch order failed");
    }
    inner.live.outbox_changed();
    crate::memory::release_free_memory();
    tracing::info!(batch = %b.id, status = status.as_str(), "batch finished");
    Ok(())
}

/// Records an error result for every line that has none.
async fn fill_missing(inner: &Inner, b: &BatchRecord, code: &str, message: &str) -> Result<()> {
    let units = inner.store.units(&b.id).await.ctx("reading the work units")?;
    if units.is_empty() {
        return Ok(());
    }
    // Counted before any is filled in, and recorded once (a finalization done again keeps it):
    // what Anthropic's request_counts tell as canceled or expired rather than errored.
    let now = inner.store.get_batch(None, &b.id).await.ctx("reading the batch")?;
    inner.store.note_unrun(&b.id, now.total - now.completed - now.failed).await.ctx("recording the lines left unrun")?;
    let file = inner.store.get_file(&b.tenant, &b.input_file_id, 0).await.ctx("reading the input file record")?;
    let path: Arc<str> = b.endpoint.as_str().into();
    let format = b.input_format.unwrap_or(InputFormat::Full);
    let src = Source { blob: &inner.blob, input_key: &file.blob_key, format, batch_id: &b.id, path: &path };
    for unit in units {
        let lines = src.pending(&*inner.store, &unit).await?;
        if lines.is_empty() {
            continue;
        }
        let records: Vec<_> = lines.iter().map(|p| ResultRecord { epoch: None, ..error_record(p, code, message) }).collect();
        inner.store.commit_results(&inner.node, &records).await.ctx("recording the unfinished lines")?;
    }
    Ok(())
}

/// Writes the output and error files; a file that would be empty is not created.
async fn write_files(inner: &Inner, b: &BatchRecord) -> Result<(Option<FileRecord>, Option<FileRecord>)> {
    let now = crate::now_unix();
    let output = write_file(inner, b, true, now).await?;
    let error = write_file(inner, b, false, now).await?;
    Ok((output, error))
}

/// Records read from the log per store call while writing a file: at most this many, and
/// fewer when records are large, so that a chunk stays near [`CHUNK_BYTES`].
const CHUNK_RECORDS: u32 = 2000;
const CHUNK_BYTES: usize = 512 << 10;

/// The number of records to read next from the result log, from the size in bytes of the
/// last chunk of `records` records (also used by the partial-results endpoint).
pub fn next_chunk_records(records: u32, bytes: usize) -> u32 {
    let scaled = records as u64 * CHUNK_BYTES as u64 / bytes.max(1) as u64;
    scaled.clamp(16, CHUNK_RECORDS as u64) as u32
}

/// Streams the 2xx (`ok`) or the other results into one file. The batch's durable counts
/// say when a file would be empty, which spares reading the whole log for nothing.
async fn write_file(inner: &Inner, b: &BatchRecord, ok: bool, now: i64) -> Result<Option<FileRecord>> {
    let kind = if ok { "output" } else { "error" };
    if (if ok { b.completed } else { b.failed }) == 0 {
        return Ok(None);
    }
    let id = crate::ids::batch_output_file_id(&b.id, kind);
    let mut w = inner.blob.writer(&format!("files/{id}"));
    let (mut after, mut records) = (0, 256);
    loop {
        let chunk = match inner.store.results_chunk(&b.id, Some(ok), after, records).await {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(e) => {
                w.abort().await;
                return Err(e).ctx("reading the result log");
            }
        };
        if let Err(e) = w.write(chunk.0.as_bytes()).await {
            w.abort().await;
            return Err(e).ctx("writing the output file");
        }
        after = chunk.1;
        records = next_chunk_records(records, chunk.0.len());
    }
    close(w, &id, b, kind, now).await
}

async fn close(w: BlobWriter, id: &FileId, b: &BatchRecord, kind: &str, now: i64) -> Result<Option<FileRecord>> {
    if w.written() == 0 {
        w.abort().await;
        return Ok(None);
    }
    let bytes = w.finish().await.ctx("writing the output file")?;
    Ok(Some(FileRecord {
        id: id.clone(),
        tenant: b.tenant.clone(),
        bytes: bytes as i64,
        created_at: now,
        filename: format!("{}_{kind}.jsonl", b.id),
        purpose: "batch_output".into(),
        expires_at: b.output_expires_after.map(|s| now + s),
        blob_key: format!("files/{id}"),
    }))
}
