//! Per-upstream limits: an adaptive concurrency window (AIMD) over a fair FIFO semaphore, and
//! token buckets for requests and tokens per minute.
//!
//! - Concurrency never exceeds the window, which never exceeds `max_concurrency`. A 429, 5xx
//!   or timeout halves the window (at most once per second); each success grows it by
//!   `1/window`, so it climbs back by about one per window of successes.
//! - RPM/TPM buckets refill at `limit/61` per second and hold at most that much, so no
//!   60-second window ever holds more than `limit` (the bucket's one-second burst plus sixty
//!   seconds of refill). TPM is charged an estimate before sending and corrected by the usage
//!   the upstream reports. A single request larger than the bucket waits for a full bucket.
//!
//! Waiters on the semaphore are served first come first served, which is what makes batches
//! share an upstream fairly (see `engine::runner`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::time::Instant as TokioInstant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::UpstreamConfig;

const DECREASE_COOLDOWN: Duration = Duration::from_secs(1);
/// Longest a bucket waiter sleeps before looking again, so that tokens credited back by
/// [`Limiter::settle_tokens`] (an estimate larger than the real usage) are seen promptly.
const MAX_BUCKET_SLEEP: Duration = Duration::from_millis(50);

pub struct Limiter {
    sem: Arc<Semaphore>,
    max: usize,
    /// Permits to destroy as they come back, after the window shrank below those in use.
    debt: AtomicUsize,
    in_flight: AtomicUsize,
    window: Mutex<Window>,
    rpm: Option<Mutex<Bucket>>,
    tpm: Option<Mutex<Bucket>>,
}

struct Window {
    size: f64,
    /// Permits that exist (in the semaphore or held) minus the debt.
    capacity: usize,
    last_decrease: Option<Instant>,
}

/// A slot of the upstream's concurrency; returned on drop.
pub struct Permit {
    inner: Option<OwnedSemaphorePermit>,
    limiter: Arc<Limiter>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limiter.in_flight.fetch_sub(1, Ordering::Relaxed);
        if let Some(p) = self.inner.take() {
            let paid = self.limiter.debt.fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| d.checked_sub(1)).is_ok();
            if paid {
                p.forget();
            }
        }
    }
}

impl Limiter {
    pub fn new(cfg: &UpstreamConfig) -> Limiter {
        let max = cfg.max_concurrency.max(1);
        Limiter {
            sem: Arc::new(Semaphore::new(max)),
            max,
            debt: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            window: Mutex::new(Window { size: max as f64, capacity: max, last_decrease: None }),
            rpm: (cfg.rpm > 0).then(|| Mutex::new(Bucket::per_minute(cfg.rpm))),
            tpm: (cfg.tpm > 0).then(|| Mutex::new(Bucket::per_minute(cfg.tpm))),
        }
    }

    /// Waits for a concurrency slot, then for the rate buckets (a slot is taken first so that
    /// a send never lags its rate token).
    pub async fn acquire(self: &Arc<Self>, est_tokens: u64) -> Permit {
        let inner = self.sem.clone().acquire_owned().await.expect("the semaphore is never closed");
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let permit = Permit { inner: Some(inner), limiter: self.clone() };
        if let Some(b) = &self.rpm {
            Bucket::take(b, 1.0).await;
        }
        if let Some(b) = &self.tpm {
            Bucket::take(b, est_tokens as f64).await;
        }
        permit
    }

    /// Corrects the TPM charge once the real usage is known.
    pub fn settle_tokens(&self, estimated: u64, actual: u64) {
        if let Some(b) = &self.tpm {
            b.lock().unwrap().tokens -= actual as f64 - estimated as f64;
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Slots free right now (window minus in flight), for spreading load over pools.
    pub fn free(&self) -> usize {
        self.sem.available_permits()
    }

    pub fn window(&self) -> f64 {
        self.window.lock().unwrap().size
    }

    pub fn on_success(&self) {
        let mut w = self.window.lock().unwrap();
        if w.size >= self.max as f64 {
            return;
        }
        w.size = (w.size + 1.0 / w.size).min(self.max as f64);
        self.resize(&mut w);
    }

    pub fn on_overload(&self) {
        let mut w = self.window.lock().unwrap();
        let now = Instant::now();
        if w.last_decrease.is_some_and(|t| now.duration_since(t) < DECREASE_COOLDOWN) {
            return;
        }
        w.last_decrease = Some(now);
        w.size = (w.size / 2.0).max(1.0);
        self.resize(&mut w);
        tracing::debug!(window = w.size, "upstream overloaded; concurrency window halved");
    }

    fn resize(&self, w: &mut Window) {
        let target = (w.size.floor() as usize).clamp(1, self.max);
        if target < w.capacity {
            let cut = w.capacity - target;
            let forgotten = self.sem.forget_permits(cut);
            self.debt.fetch_add(cut - forgotten, Ordering::AcqRel);
        } else if target > w.capacity {
            let mut grow = target - w.capacity;
            while grow > 0 && self.debt.fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| d.checked_sub(1)).is_ok() {
                grow -= 1;
            }
            self.sem.add_permits(grow);
        }
        w.capacity = target;
    }
}

struct Bucket {
    tokens: f64,
    capacity: f64,
    per_sec: f64,
    last: TokioInstant,
}

impl Bucket {
    fn per_minute(limit: u64) -> Bucket {
        let per_sec = limit as f64 / 61.0;
        let capacity = per_sec.max(1.0);
        Bucket { tokens: capacity, capacity, per_sec, last: TokioInstant::now() }
    }

    fn refill(&mut self, now: TokioInstant) {
        let dt = now.duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.per_sec).min(self.capacity);
        self.last = now;
    }

    async fn take(m: &Mutex<Bucket>, n: f64) {
        loop {
            let wait = {
                let mut b = m.lock().unwrap();
                b.refill(TokioInstant::now());
                let need = n.min(b.capacity);
                if b.tokens >= need {
                    b.tokens -= n;
                    return;
                }
                Duration::from_secs_f64(((need - b.tokens) / b.per_sec).max(0.001))
            };
            tokio::time::sleep(wait.min(MAX_BUCKET_SLEEP)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(max: usize, rpm: u64) -> UpstreamConfig {
        let raw = crate::config::RawUpstream {
            name: "t".into(),
            base_url: "http://127.0.0.1:9/v1".into(),
            max_concurrency: Some(max),
            rpm: Some(rpm),
            ..Default::default()
        };
        crate::config::RawConfig { upstreams: vec![raw], ..Default::default() }.resolve().unwrap().upstreams.remove(0)
    }

    #[tokio::test]
    async fn window_halves_and_recovers() {
        let l = Arc::new(Limiter::new(&cfg(8, 0)));
        let held: Vec<Permit> = futures::future::join_all((0..8).map(|_| l.acquire(0))).await;
        l.on_overload();
        assert_eq!(l.window(), 4.0);
        l.on_overload();
        assert_eq!(l.window(), 4.0, "at most one decrease per cooldown");
        drop(held);
        assert_eq!(l.free(), 4, "permits beyond the window are destroyed as they return");
        for _ in 0..40 {
            l.on_success();
        }
        assert_eq!(l.window(), 8.0);
        assert_eq!(l.free(), 8);
    }

    #[tokio::test(start_paused = true)]
    async fn tpm_waiter_sees_tokens_credited_back() {
        let raw = crate::config::RawUpstream { name: "t".into(), base_url: "http://127.0.0.1:9/v1".into(), tpm: Some(6100), ..Default::default() };
        let cfg = crate::config::RawConfig { upstreams: vec![raw], ..Default::default() }.resolve().unwrap().upstreams.remove(0);
        let l = Arc::new(Limiter::new(&cfg));
        drop(l.acquire(1000).await);
        let start = tokio::time::Instant::now();
        let waiter = tokio::spawn({
            let l = l.clone();
            async move { drop(l.acquire(50).await) }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        l.settle_tokens(1000, 40);
        waiter.await.unwrap();
        let took = start.elapsed().as_secs_f64();
        assert!(took < 1.0, "an estimate of 1000 corrected to 40 lets the next request go within a second, took {took}");
    }

    #[tokio::test(start_paused = true)]
    async fn rpm_bucket_spaces_requests() {
        let l = Arc::new(Limiter::new(&cfg(100, 122)));
        let start = tokio::time::Instant::now();
        for _ in 0..6 {
            drop(l.acquire(0).await);
        }
        let took = start.elapsed().as_secs_f64();
        assert!((1.9..2.6).contains(&took), "2 per second after a 2-request burst, took {took}");
    }
}
