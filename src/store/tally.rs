//! What a commit of results adds up to, whatever the backend: counts and usage per batch,
//! progress per unit, usage per model. Each backend turns a [`Tally`] into its own SQL.

use std::collections::HashMap;

use super::{ResultRecord, Usage};

/// Counts of newly inserted results: per batch (ok, failed, usage), per unit, per model.
#[derive(Default)]
pub(crate) struct Tally<'a> {
    pub batches: HashMap<&'a str, (i64, i64, Usage)>,
    pub units: HashMap<(&'a str, i64), i64>,
    pub models: HashMap<(&'a str, &'a str), (i64, Usage)>,
}

impl<'a> Tally<'a> {
    pub fn of(inserted: &[&'a ResultRecord]) -> Tally<'a> {
        let mut t = Tally::default();
        for r in inserted {
            let b = t.batches.entry(&r.batch_id).or_default();
            if r.ok {
                b.0 += 1
            } else {
                b.1 += 1
            }
            b.2.add(&r.usage);
            *t.units.entry((&r.batch_id, r.unit_idx)).or_default() += 1;
            let m = t.models.entry((&r.batch_id, &r.model)).or_default();
            m.0 += 1;
            m.1.add(&r.usage);
        }
        t
    }
}

/// The usage columns of `batches` and `batch_usage`, in the order of [`usage_values`].
pub(crate) const USAGE_COLUMNS: [&str; 5] = ["input_tokens", "cached_tokens", "output_tokens", "reasoning_tokens", "total_tokens"];

/// A usage as column values, never negative.
pub(crate) fn usage_values(u: &Usage) -> [i64; 5] {
    [u.input_tokens, u.cached_tokens, u.output_tokens, u.reasoning_tokens, u.total_tokens].map(|v| v.max(0))
}

/// The data of a `batch.progress` event.
pub(crate) fn progress_data(total: i64, completed: i64, failed: i64, total_tokens: i64) -> String {
    serde_json::json!({
        "request_counts": {"total": total, "completed": completed, "failed": failed},
        "usage": {"total_tokens": total_tokens},
    })
    .to_string()
}
