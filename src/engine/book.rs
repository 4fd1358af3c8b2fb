//! The lines this node owns: fed to an upstream and not yet durable.
//!
//! A line enters the book when a feeder hands it to a line task and leaves it when its result
//! is committed (or dropped). A feeder skips lines already in the book, so re-leasing a unit
//! (after a lease renewal failed, say) never sends a line twice from this node. The book
//! also counts lines waiting on a retry, for progress. Its size is bounded by the lines in
//! flight, never by the size of a batch.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use crate::store::BatchId;

#[derive(Default)]
struct BatchLines {
    lines: HashSet<u64>,
    retrying: usize,
}

/// Live counts of one batch's lines on this node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LineCounts {
    /// Sent or being answered, or answered and waiting for the group commit.
    pub in_flight: usize,
    /// Waiting for their back-off before another attempt.
    pub retrying: usize,
}

#[derive(Clone, Default)]
pub struct Book {
    batches: Arc<Mutex<HashMap<BatchId, BatchLines>>>,
}

impl Book {
    /// Takes `line` of `batch`; `None` when this node already owns it. The line is given up
    /// when the guard drops, unless [`LineGuard::hand_to_writer`] passed it on (the writer
    /// then releases it once its result is committed).
    pub fn take(&self, batch: &BatchId, line: u64) -> Option<LineGuard> {
        let mut all = self.batches.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = all.entry(batch.clone()).or_default().lines.insert(line);
        fresh.then(|| LineGuard { book: self.clone(), batch: batch.clone(), line, armed: true })
    }

    /// Gives `line` up: durable, dropped, or aborted.
    pub fn release(&self, batch: &str, line: u64) {
        let mut all = self.batches.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = all.get_mut(batch) {
            b.lines.remove(&line);
            if b.lines.is_empty() && b.retrying == 0 {
                all.remove(batch);
            }
        }
    }

    /// Marks one line of `batch` as waiting for a retry, until the guard drops.
    pub fn retrying(&self, batch: &BatchId) -> RetryGuard {
        let mut all = self.batches.lock().unwrap_or_else(|p| p.into_inner());
        all.entry(batch.clone()).or_default().retrying += 1;
        RetryGuard { book: self.clone(), batch: batch.clone() }
    }

    pub fn counts(&self, batch: &str) -> LineCounts {
        let all = self.batches.lock().unwrap_or_else(|p| p.into_inner());
        all.get(batch).map_or_else(LineCounts::default, |b| LineCounts { in_flight: b.lines.len().saturating_sub(b.retrying), retrying: b.retrying })
    }

    /// Counts of every batch with lines here.
    pub fn all_counts(&self) -> Vec<(BatchId, LineCounts)> {
        let all = self.batches.lock().unwrap_or_else(|p| p.into_inner());
        all.iter().map(|(id, b)| (id.clone(), LineCounts { in_flight: b.lines.len().saturating_sub(b.retrying), retrying: b.retrying })).collect()
    }
}

/// Ownership of one line by this node (see [`Book::take`]).
pub struct LineGuard {
    book: Book,
    batch: BatchId,
    line: u64,
    armed: bool,
}

impl LineGuard {
    /// The line's result goes to the writer, which releases the line after the commit.
    pub fn hand_to_writer(mut self) {
        self.armed = false;
    }
}

impl Drop for LineGuard {
    fn drop(&mut self) {
        if self.armed {
            self.book.release(&self.batch, self.line);
        }
    }
}

pub struct RetryGuard {
    book: Book,
    batch: BatchId,
}

impl Drop for RetryGuard {
    fn drop(&mut self) {
        let mut all = self.book.batches.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = all.get_mut(&*self.batch) {
            b.retrying = b.retrying.saturating_sub(1);
            if b.lines.is_empty() && b.retrying == 0 {
                all.remove(&*self.batch);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_owned_once_until_released() {
        let book = Book::default();
        let b = BatchId::from("batch_x");
        let three = book.take(&b, 3).unwrap();
        assert!(book.take(&b, 3).is_none(), "the same line cannot be taken twice");
        book.take(&b, 4).unwrap().hand_to_writer();
        let guard = book.retrying(&b);
        assert_eq!(book.counts("batch_x"), LineCounts { in_flight: 1, retrying: 1 });
        drop(guard);
        drop(three);
        assert!(book.take(&b, 3).is_some(), "a dropped guard gives the line up");
        assert!(book.take(&b, 4).is_none(), "a line handed to the writer stays owned");
        book.release("batch_x", 4);
        assert!(book.all_counts().is_empty(), "nothing is kept for a batch with no lines");
    }
}
