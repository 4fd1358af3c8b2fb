//! The janitor: removes what nobody needs any more.
//!
//! - files past their `expires_at`: the row first, then the bytes;
//! - crash debris: staging files of uploads that never finished, and finished objects under
//!   `files/` that no file row names (a crash between writing a file's bytes and recording
//!   it). At the start of a process that owns its store nothing can be in progress, so all
//!   of it goes at once, before any batch step runs (`Engine::start`); later sweeps only
//!   touch debris older than [`DEBRIS_AGE`], which no upload or finalization in progress
//!   can be;
//! - `batch.progress` events of final batches older than [`EVENT_RETENTION`] (status events
//!   are kept: they are the batch's history).

use std::sync::Arc;
use std::time::Duration;

use super::Inner;
use crate::store::FileId;

const PERIOD: Duration = Duration::from_secs(30);
/// Debris sweeps run every this many periods.
const SWEEP_EVERY: u32 = 20;
pub const DEBRIS_AGE: Duration = Duration::from_secs(3600);
const EVENT_RETENTION: i64 = 7 * 86_400;

pub async fn janitor(inner: Arc<Inner>) {
    let mut round = 0u32;
    loop {
        remove_expired_files(&inner).await;
        round += 1;
        if round.is_multiple_of(SWEEP_EVERY) {
            sweep_debris(&inner, DEBRIS_AGE).await;
            if let Err(e) = inner.store.prune_events(crate::now_unix() - EVENT_RETENTION).await {
                tracing::debug!(error = %crate::Chain(&e), "pruning old progress events failed");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(PERIOD) => {}
            _ = inner.soft_stop.cancelled() => return,
        }
    }
}

async fn remove_expired_files(inner: &Inner) {
    let Ok(files) = inner.store.expired_files(crate::now_unix(), 100).await else { return };
    for f in files {
        if inner.store.purge_file(&f.id).await.is_ok() {
            let _ = inner.blob.delete(&f.blob_key).await;
            tracing::info!(file = %f.id, "expired file removed");
        }
    }
}

/// Removes staging files and unrecorded objects older than `min_age`.
pub async fn sweep_debris(inner: &Inner, min_age: Duration) {
    match inner.blob.sweep_staging(min_age) {
        Ok(0) => {}
        Ok(n) => tracing::info!(bytes = n, "removed staging files of interrupted uploads"),
        Err(e) => tracing::warn!(error = %crate::Chain(&e), "sweeping staging files failed"),
    }
    let objects = match inner.blob.list("files").await {
        Ok(o) => o,
        Err(e) => return tracing::warn!(error = %crate::Chain(&e), "listing blobs for debris failed"),
    };
    let old: Vec<_> = objects.into_iter().filter(|o| o.modified.elapsed().unwrap_or_default() >= min_age).collect();
    for chunk in old.chunks(500) {
        let ids: Vec<FileId> = chunk.iter().filter_map(|o| o.key.strip_prefix("files/").map(FileId::from)).collect();
        let Ok(known) = inner.store.existing_file_ids(&ids).await else { return };
        for o in chunk {
            let id = o.key.strip_prefix("files/").unwrap_or_default();
            if !known.iter().any(|k| k == id) && inner.blob.delete(&o.key).await.is_ok() {
                tracing::info!(key = %o.key, bytes = o.size, "removed an object no file row names (crash debris)");
            }
        }
    }
}
