//! The open connections, and which of them may be closed to make room: the crowd the accept
//! loop sheds from when every connection slot is taken and another client is waiting.
//!
//! Each connection is in one [`Phase`]: waiting for a request (never sent one, or kept alive
//! after its last answer), serving one (from the moment its head is read until its answer is
//! flushed), or ending one (the answer's body is done, its last bytes not yet flushed). Only a
//! waiting connection may be shed, the one that has waited longest first, and only once it has
//! waited [`MIN_WAIT`]: a crowd of sockets that send nothing (or kept-alive connections nobody
//! uses) then costs a new client one shed connection, not the header-read timeout. A serving
//! connection — an upload, a download, an event stream — is never cut to make room.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long a connection must have waited before it may be shed (a client that has just
/// connected gets the time to send its request).
pub const MIN_WAIT: Duration = Duration::from_millis(250);

/// Where a connection is in its exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Waiting = 0,
    Serving = 1,
    Ending = 2,
}

/// One open connection, as its socket, its service and the accept loop see it.
pub struct Conn {
    start: Instant,
    /// Milliseconds after `start` of the last read or write that moved a byte.
    last_io_ms: AtomicU64,
    phase: AtomicU8,
    /// Milliseconds after `start` when it last began waiting.
    waiting_since_ms: AtomicU64,
    /// Cancelled when the accept loop sheds it.
    pub shed: CancellationToken,
}

impl Conn {
    fn new() -> Conn {
        Conn {
            start: Instant::now(),
            last_io_ms: AtomicU64::new(0),
            phase: AtomicU8::new(0),
            waiting_since_ms: AtomicU64::new(0),
            shed: CancellationToken::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Waiting,
            1 => Phase::Serving,
            _ => Phase::Ending,
        }
    }

    /// Its service was called: a request is being served.
    pub fn serving(&self) {
        self.phase.store(Phase::Serving as u8, Ordering::Release);
    }

    /// The answer's body is done (its last bytes may still be buffered).
    pub fn ending(&self) {
        let _ = self.phase.compare_exchange(Phase::Serving as u8, Phase::Ending as u8, Ordering::AcqRel, Ordering::Acquire);
    }

    /// The socket flushed: an answer that was ending is out, and the connection waits.
    pub fn flushed(&self) {
        if self.phase.compare_exchange(Phase::Ending as u8, Phase::Waiting as u8, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            self.waiting_since_ms.store(self.now_ms(), Ordering::Release);
        }
    }

    /// A byte moved on the socket.
    pub fn touch(&self) {
        self.last_io_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    fn quiet_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_io_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }

    /// Resolves once nothing has moved on the socket for `timeout`.
    pub async fn idle_for(&self, timeout: Duration) {
        loop {
            let quiet = self.quiet_for();
            if quiet >= timeout {
                return;
            }
            tokio::time::sleep(timeout - quiet).await;
        }
    }

    /// How long it has been waiting for a request; `None` while it serves one.
    fn waited(&self) -> Option<Duration> {
        (self.phase() == Phase::Waiting).then(|| Duration::from_millis(self.now_ms().saturating_sub(self.waiting_since_ms.load(Ordering::Acquire))))
    }
}

/// Every open connection.
#[derive(Default)]
pub struct Crowd {
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    next: AtomicU64,
}

/// A connection's place in the crowd; leaves it when dropped.
pub struct Member {
    crowd: Arc<Crowd>,
    id: u64,
    pub conn: Arc<Conn>,
}

impl Drop for Member {
    fn drop(&mut self) {
        self.crowd.conns.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
    }
}

impl Crowd {
    /// Adds a new connection (waiting since now).
    pub fn join(self: &Arc<Self>) -> Member {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn::new());
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).insert(id, conn.clone());
        Member { crowd: self.clone(), id, conn }
    }

    /// How many connections are open.
    pub fn open(&self) -> usize {
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Sheds the connection that has waited longest, if one has waited at least
    /// [`MIN_WAIT`] (and is not shed already); says whether one was.
    pub fn shed_longest_waiting(&self) -> bool {
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let longest = conns
            .values()
            .filter(|c| !c.shed.is_cancelled())
            .filter_map(|c| c.waited().map(|w| (w, c)))
            .filter(|(w, _)| *w >= MIN_WAIT)
            .max_by_key(|(w, _)| *w);
        match longest {
            Some((_, c)) => {
                c.shed.cancel();
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_longest_waiting_connection_is_shed_and_serving_ones_never() {
        let crowd = Arc::new(Crowd::default());
        let old = crowd.join();
        tokio::time::advance(Duration::from_secs(5)).await;
        let busy = crowd.join();
        busy.conn.serving();
        let young = crowd.join();
        tokio::time::advance(Duration::from_secs(1)).await;
        let fresh = crowd.join();
        assert!(crowd.shed_longest_waiting());
        assert!(old.conn.shed.is_cancelled(), "the one that waited longest goes first");
        assert!(crowd.shed_longest_waiting());
        assert!(young.conn.shed.is_cancelled());
        assert!(!crowd.shed_longest_waiting(), "a serving one, and one that has just connected, stay");
        assert!(!busy.conn.shed.is_cancelled() && !fresh.conn.shed.is_cancelled());
        busy.conn.ending();
        assert!(!crowd.shed_longest_waiting(), "an answer not yet flushed is still served");
        busy.conn.flushed();
        tokio::time::advance(MIN_WAIT).await;
        assert!(crowd.shed_longest_waiting(), "waiting again after its answer");
        assert!(fresh.conn.shed.is_cancelled() || busy.conn.shed.is_cancelled());
        drop(old);
        assert_eq!(crowd.open(), 3, "a connection leaves when it ends");
    }
}
