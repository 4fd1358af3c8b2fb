//! Whether the store can take results right now: the gate in front of every upstream call.
//!
//! The result writer closes the gate when a commit fails because the store is unavailable or
//! out of space, and opens it again after the next commit that succeeds. Feeders and retries
//! wait at the gate before sending, so no upstream call is made whose answer could not be
//! stored: while the disk is full, only the calls already in flight finish (their results
//! wait in memory, bounded by the concurrency, until they can be committed).

use tokio::sync::watch;

#[derive(Clone)]
pub struct Health {
    writable: watch::Sender<bool>,
}

impl Default for Health {
    fn default() -> Self {
        Health { writable: watch::Sender::new(true) }
    }
}

impl Health {
    pub fn set_writable(&self, ok: bool) {
        self.writable.send_if_modified(|w| std::mem::replace(w, ok) != ok);
    }

    pub fn is_writable(&self) -> bool {
        *self.writable.borrow()
    }

    /// Returns once the store takes writes.
    pub async fn writable(&self) {
        let mut rx = self.writable.subscribe();
        let _ = rx.wait_for(|ok| *ok).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn waiters_pass_only_while_writable() {
        let h = Health::default();
        tokio::time::timeout(Duration::from_millis(50), h.writable()).await.expect("open by default");
        h.set_writable(false);
        assert!(tokio::time::timeout(Duration::from_millis(50), h.writable()).await.is_err(), "closed gate holds");
        let h2 = h.clone();
        let waiter = tokio::spawn(async move { h2.writable().await });
        h.set_writable(true);
        tokio::time::timeout(Duration::from_secs(1), waiter).await.expect("opening releases waiters").unwrap();
    }
}
