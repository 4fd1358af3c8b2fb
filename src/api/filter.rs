//! The filters of `GET /v1/batches` (extension, used by the web console): `status=` one
//! status or several separated by commas, and `search=` text found, case-insensitively, in a
//! batch's id or in one of its metadata values. Without either, the list is OpenAI's.
//!
//! A filtered page is read from the store's own newest-first pages, keeping the matches, so
//! it needs nothing of a store backend beyond `list_batches` and keeps its cursor semantics:
//! `after` is the id of the last batch returned, and `has_more` says whether another match
//! exists after it. A search reads the tenant's batches until it has a page of matches (or
//! none are left), so a rare match in a long history costs one pass over it.

use crate::error::{ApiError, ApiResult};
use crate::store::{BatchRecord, BatchStatus, Page, Store};

/// Batches read per store call while filtering.
const SCAN_PAGE: u32 = 200;
/// The longest `search` text.
const MAX_SEARCH: usize = 512;

/// What a filtered list keeps.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchFilter {
    statuses: Vec<BatchStatus>,
    /// Lowercased search text.
    needle: Option<String>,
}

impl BatchFilter {
    /// The filter of the query parameters; `None` when they ask for none.
    pub fn parse(status: Option<&str>, search: Option<&str>) -> ApiResult<Option<BatchFilter>> {
        let mut statuses = vec![];
        for s in status.unwrap_or_default().split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let st = BatchStatus::parse(s).ok_or_else(|| {
                let all: Vec<&str> = BatchStatus::ALL.iter().map(|s| s.as_str()).collect();
                ApiError::invalid("status", format!("Unknown status {s:?}; use one or more of {}, separated by commas.", all.join(", ")))
            })?;
            statuses.push(st);
        }
        let needle = search.map(str::trim).filter(|s| !s.is_empty()).map(str::to_lowercase);
        if needle.as_ref().is_some_and(|n| n.chars().count() > MAX_SEARCH) {
            return Err(ApiError::invalid("search", format!("search is longer than {MAX_SEARCH} characters.")));
        }
        Ok((!statuses.is_empty() || needle.is_some()).then_some(BatchFilter { statuses, needle }))
    }

    pub fn matches(&self, b: &BatchRecord) -> bool {
        if !self.statuses.is_empty() && !self.statuses.contains(&b.status) {
            return false;
        }
        let Some(n) = &self.needle else { return true };
        b.id.to_lowercase().contains(n) || b.metadata.as_ref().is_some_and(|m| m.values().any(|v| v.as_str().is_some_and(|s| s.to_lowercase().contains(n))))
    }
}

/// Up to `limit` of the tenant's batches matching `f`, newest first, after the batch `after`.
pub async fn page(store: &dyn Store, tenant: &str, f: &BatchFilter, limit: u32, after: Option<&str>) -> crate::store::Result<Page<BatchRecord>> {
    let mut items = Vec::with_capacity(limit as usize + 1);
    let mut cursor = after.map(str::to_owned);
    loop {
        let scanned = store.list_batches(tenant, SCAN_PAGE, cursor.as_deref()).await?;
        cursor = scanned.items.last().map(|b| b.id.to_string());
        for b in scanned.items {
            if f.matches(&b) {
                items.push(b);
                if items.len() > limit as usize {
                    items.truncate(limit as usize);
                    return Ok(Page { items, has_more: true });
                }
            }
        }
        if !scanned.has_more {
            return Ok(Page { items, has_more: false });
        }
        tokio::task::consume_budget().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(id: &str, status: BatchStatus, meta: &[(&str, &str)]) -> BatchRecord {
        let mut b = BatchRecord::new(id.into(), "t".into(), "file-x".into(), "/v1/chat/completions".into(), "24h".into(), 1, 2);
        b.status = status;
        if !meta.is_empty() {
            b.metadata = Some(meta.iter().map(|(k, v)| (k.to_string(), serde_json::Value::from(*v))).collect());
        }
        b
    }

    #[test]
    fn filters_by_status_and_by_id_or_metadata_value() {
        assert_eq!(BatchFilter::parse(None, Some("  ")).unwrap(), None);
        assert!(BatchFilter::parse(Some("running"), None).is_err());
        let f = BatchFilter::parse(Some("completed, failed"), None).unwrap().unwrap();
        assert!(f.matches(&batch("batch_a", BatchStatus::Completed, &[])));
        assert!(!f.matches(&batch("batch_a", BatchStatus::InProgress, &[])));
        let s = BatchFilter::parse(None, Some("Nightly")).unwrap().unwrap();
        assert!(s.matches(&batch("batch_a", BatchStatus::Completed, &[("job", "nightly-eval")])));
        assert!(!s.matches(&batch("batch_a", BatchStatus::Completed, &[("nightly", "x")])), "keys are not searched");
        assert!(BatchFilter::parse(None, Some("ATCH_A")).unwrap().unwrap().matches(&batch("batch_abc", BatchStatus::Failed, &[])));
        let both = BatchFilter::parse(Some("failed"), Some("eval")).unwrap().unwrap();
        assert!(!both.matches(&batch("batch_a", BatchStatus::Completed, &[("job", "eval")])));
    }
}
