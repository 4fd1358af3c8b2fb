//! Per-upstream limits: the adaptive [`Controller`](super::control::Controller) enforced over
//! a fair FIFO semaphore, and token buckets for the configured requests and tokens per minute.
//!
//! - Concurrency never exceeds the controller's window, which never exceeds this node's
//!   share of `max_concurrency`. A window that shrinks destroys permits as they come back
//!   (a debt), so a slot freed by an overload is not handed to the next line. While slow
//!   start grows the window by time, waiters for a slot look again every few milliseconds.
//! - Configured RPM/TPM are hard ceilings: buckets refilled at `limit/61` per second holding
//!   at most that much, so no 60-second window ever holds more than `limit` (the bucket's
//!   one-second burst plus sixty seconds of refill). TPM is charged an estimate before
//!   sending and corrected by the usage the upstream reports. A request larger than the
//!   bucket waits for a full bucket. What the controller learns never lifts them.
//! - After its slot, a request passes the controller's gate (a pause, the upstream's
//!   rate-limit headers, a learned rate): one waiter at a time, in order, so a paused pool
//!   has one sleeper rather than a crowd polling.
//!
//! Waiters on the semaphore are served first come first served, which is what makes batches
//! share an upstream fairly (see `engine::runner`).
//!
//! In a cluster, this node's share of `max_concurrency` is a *claim* (`set_claim`) that the
//! heartbeat sets from every node's demand (`engine::shares`): slots taken plus lines waiting
//! for one, the peak since the last look (`take_demand`). A claim may be 0, and it lapses:
//! past its `until` no request passes the gate until a heartbeat renews it (a node resuming
//! after SIGSTOP, whose slots the others may have taken, sends nothing before it knows).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::control::{Bounds, Controller, Observation, Ticket};
use super::kvwindow::KvWindow;
use super::probe::EngineMetrics;
use crate::config::UpstreamConfig;

/// Longest a bucket or gate waiter sleeps before looking again, so that tokens credited back
/// by [`Limiter::settle_tokens`] (an estimate larger than the real usage) are seen promptly.
const MAX_BUCKET_SLEEP: Duration = Duration::from_millis(50);
const MAX_GATE_SLEEP: Duration = Duration::from_millis(250);
/// How often a waiter for a slot lets slow start grow the window.
const RAMP_TICK: Duration = Duration::from_millis(2);

pub struct Limiter {
    sem: Arc<Semaphore>,
    /// Permits to destroy as they come back, after the window shrank below those in use.
    debt: AtomicUsize,
    /// Requests on the wire (past the gate, not yet answered).
    in_flight: AtomicUsize,
    /// Slots taken (a permit exists for them), on the wire or about to be.
    held: AtomicUsize,
    /// Requests waiting for a slot.
    waiting: AtomicUsize,
    /// The most of `held + waiting` since the last [`Limiter::take_demand`].
    peak_demand: AtomicUsize,
    /// Times this node's claim lapsed before it was renewed: a permit taken before a lapse
    /// is stale (see [`Permit::current`]).
    lapses: AtomicUsize,
    /// One waiter at a time at the gate.
    gate: tokio::sync::Mutex<()>,
    state: Mutex<State>,
    base: Base,
}

/// The configured limits, before dividing them between nodes.
#[derive(Debug, Clone, Copy)]
struct Base {
    mode: crate::config::UpstreamMode,
    max_concurrency: usize,
    rpm: u64,
    tpm: u64,
}

struct State {
    ctl: Controller,
    /// Permits that exist (in the semaphore or held) minus the debt.
    capacity: usize,
    max: usize,
    share: usize,
    rpm: Option<Bucket>,
    tpm: Option<Bucket>,
    /// Throughput: the cap the server's figures put on the window.
    kv: KvWindow,
    /// When this node's claim on `max` lapses (`None`: never, a node alone by construction).
    claim_until: Option<Instant>,
}

/// A slot of the upstream's concurrency; returned on drop. [`Limiter::settle`] tells the
/// controller how the request went before the slot is returned.
pub struct Permit {
    inner: Option<OwnedSemaphorePermit>,
    ticket: Option<Ticket>,
    limiter: Arc<Limiter>,
    /// The limiter's lapses when the wait for the slot began.
    lapses: usize,
}

impl Permit {
    /// Whether the permit may still be used: this node's claim has not lapsed since it was
    /// taken. A node frozen (SIGSTOP) with permits in hand must not use them on resuming:
    /// the other nodes may have taken its slots meanwhile; it gives them back and waits
    /// for new ones within its renewed claim.
    pub fn current(&self) -> bool {
        let l = &self.limiter;
        l.lapses.load(Ordering::Acquire) == self.lapses && l.lock().claim_until.is_none_or(|u| u > Instant::now())
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.ticket.take().is_some() {
            self.limiter.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(p) = self.inner.take() {
            self.limiter.held.fetch_sub(1, Ordering::Relaxed);
            let paid = self.limiter.pay_debt();
            if paid {
                p.forget();
            }
        }
    }
}

impl Limiter {
    pub fn new(cfg: &UpstreamConfig) -> Limiter {
        let base = Base { mode: cfg.mode, max_concurrency: cfg.max_concurrency.max(1), rpm: cfg.rpm, tpm: cfg.tpm };
        let now = Instant::now();
        let mut ctl = Controller::new(bounds(&base, 1, base.max_concurrency), now);
        if cfg.metrics_url.is_some() {
            // Slow start waits for the server's first figures rather than racing past its
            // KV cache in the first milliseconds; a `metrics_url` that fails lifts this.
            ctl.set_cap(Some(KvWindow::before_first_sample()));
        }
        let capacity = ctl.slots();
        let state = State { ctl, capacity, max: base.max_concurrency, share: 1, rpm: None, tpm: None, kv: KvWindow::default(), claim_until: None };
        let l = Limiter {
            sem: Arc::new(Semaphore::new(capacity)),
            debt: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            held: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            peak_demand: AtomicUsize::new(0),
            lapses: AtomicUsize::new(0),
            gate: tokio::sync::Mutex::new(()),
            state: Mutex::new(state),
            base,
        };
        l.set_share(1, 0);
        l
    }

    /// Works within this node's share of the configured limits, for `live_nodes` nodes of
    /// which this one is number `rank` (0-based, in an order every node agrees on):
    /// `max_concurrency` is split so that the shares add up to it exactly (the first
    /// `max_concurrency % live_nodes` nodes take one more; every node at least one), `rpm`
    /// and `tpm` evenly.
    pub fn set_share(&self, live_nodes: usize, rank: usize) {
        let n = live_nodes.max(1);
        self.set_rate_share(n);
        self.set_claim(share_of(self.base.max_concurrency, n, rank));
    }

    /// Works within this node's share of `rpm` and `tpm`, split evenly between `live_nodes`.
    pub fn set_rate_share(&self, live_nodes: usize) {
        let n = live_nodes.max(1);
        let mut st = self.lock();
        if st.share == n && st.rpm.is_some() == (self.base.rpm > 0) && st.tpm.is_some() == (self.base.tpm > 0) {
            return;
        }
        st.share = n;
        st.rpm = Bucket::share_of(st.rpm.take(), self.base.rpm, n);
        st.tpm = Bucket::share_of(st.tpm.take(), self.base.tpm, n);
        let max = st.max;
        st.ctl.set_bounds(bounds(&self.base, n, max));
        self.resize(&mut st);
    }

    /// Works within `slots` of `max_concurrency` (0: sends nothing). Slots taken beyond a
    /// lowered claim are destroyed as they come back; what this node may still have in
    /// flight, the claim or the slots taken if more, is returned (what the node must
    /// publish: the others may use only the rest).
    pub fn set_claim(&self, slots: usize) -> usize {
        let slots = slots.min(self.base.max_concurrency);
        let mut st = self.lock();
        if st.max != slots {
            st.max = slots;
            let n = st.share;
            st.ctl.set_bounds(bounds(&self.base, n, slots));
            self.resize(&mut st);
        }
        slots.max(self.held())
    }

    /// The claim holds until `until` (`None`: for good); past it, no request passes the gate.
    pub fn claim_until(&self, until: Option<std::time::Instant>) {
        let mut st = self.lock();
        if st.claim_until.is_some_and(|u| u <= Instant::now()) {
            self.lapses.fetch_add(1, Ordering::AcqRel);
        }
        st.claim_until = until.map(Instant::from_std);
    }

    /// Slots taken (on the wire or about to be).
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    /// Requests waiting for a slot.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// The configured cluster-wide `max_concurrency`.
    pub fn cluster_limit(&self) -> usize {
        self.base.max_concurrency
    }

    /// Slots this node could use: the most of slots taken plus requests waiting for one since
    /// the last call (which starts a new period), at most the cluster's limit.
    pub fn take_demand(&self) -> usize {
        let now = self.demand_now();
        self.peak_demand.swap(now, Ordering::AcqRel).max(now).min(self.base.max_concurrency)
    }

    /// Slots taken plus requests waiting for one, at this moment.
    fn demand_now(&self) -> usize {
        self.held.load(Ordering::Acquire) + self.waiting.load(Ordering::Acquire)
    }

    /// Pays one permit of the debt a lowered window owes, if it owes any (`false`: none owed).
    fn pay_debt(&self) -> bool {
        self.debt.fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| d.checked_sub(1)).is_ok()
    }

    fn note_demand(&self) {
        self.peak_demand.fetch_max(self.demand_now(), Ordering::AcqRel);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for a concurrency slot, then for the rate buckets, then for the controller's
    /// gate (a slot is taken first so that a send never lags its rate token).
    pub async fn acquire(self: &Arc<Self>, est_tokens: u64) -> Permit {
        // Stamped before waiting for the slot, not once it is taken: the semaphore hands a
        // returned slot to a waiter at once, but the waiter reads the stamp only when next
        // polled. A slot handed over under a lapsed claim, its waiter polled after the
        // renewal (a node resuming from SIGSTOP wakes everything at once), would otherwise
        // read the renewed count and be used on top of the claim the others were granted.
        let lapses = self.lapses.load(Ordering::Acquire);
        let inner = {
            let _waiting = Waiter::new(self);
            let slot = self.slot().await;
            self.held.fetch_add(1, Ordering::AcqRel);
            slot
        };
        let mut permit = Permit { inner: Some(inner), ticket: None, limiter: self.clone(), lapses };
        self.take_bucket(|st| st.rpm.as_mut(), 1.0).await;
        self.take_bucket(|st| st.tpm.as_mut(), est_tokens as f64).await;
        let _turn = self.gate.lock().await;
        loop {
            let now = Instant::now();
            let res = {
                let mut st = self.lock();
                if st.claim_until.is_some_and(|u| u <= now) {
                    // The claim lapsed (the node was stopped, or its heartbeats fail): the
                    // others may have its slots; wait for a heartbeat to renew it.
                    Err(now + MAX_BUCKET_SLEEP)
                } else {
                    let res = st.ctl.gate(now, est_tokens, self.in_flight.load(Ordering::Relaxed));
                    // A pool idle for long starts slowly again: the gate may have shrunk the window.
                    self.resize(&mut st);
                    res
                }
            };
            match res {
                Ok(t) => {
                    self.in_flight.fetch_add(1, Ordering::Relaxed);
                    permit.ticket = Some(t);
                    return permit;
                }
                Err(until) => tokio::time::sleep_until(until.min(now + MAX_GATE_SLEEP)).await,
            }
        }
    }

    /// A concurrency slot, within the window: a permit that comes out of the semaphore while
    /// the window owes permits (a debt) is destroyed instead. Most of the debt is paid as
    /// slots come back ([`Permit`]'s drop), but a slot handed to a waiter that is dropped
    /// before it runs (a feeder stopped because its unit was lost, a line cancelled) goes
    /// straight back into the semaphore: used, it would put a node above its lowered claim.
    async fn slot(&self) -> OwnedSemaphorePermit {
        loop {
            let p = self.permit().await;
            if !self.pay_debt() {
                return p;
            }
            p.forget();
        }
    }

    /// A permit of the semaphore. While slow start grows the window by time, a waiter looks
    /// again every [`RAMP_TICK`] and lets the window grow ([`Controller::tick`]).
    async fn permit(&self) -> OwnedSemaphorePermit {
        loop {
            if !self.lock().ctl.ramping() {
                return self.sem.clone().acquire_owned().await.expect("the semaphore is never closed");
            }
            if let Ok(p) = tokio::time::timeout(RAMP_TICK, self.sem.clone().acquire_owned()).await {
                return p.expect("the semaphore is never closed");
            }
            let mut st = self.lock();
            st.ctl.tick(Instant::now(), self.in_flight.load(Ordering::Relaxed));
            self.resize(&mut st);
        }
    }

    async fn take_bucket(&self, pick: impl Fn(&mut State) -> Option<&mut Bucket>, n: f64) {
        loop {
            let wait = {
                let mut st = self.lock();
                match pick(&mut st) {
                    None => return,
                    Some(b) => match b.take(Instant::now(), n) {
                        None => return,
                        Some(w) => w,
                    },
                }
            };
            tokio::time::sleep(wait.min(MAX_BUCKET_SLEEP)).await;
        }
    }

    /// Tells the controller how a request went, then returns its slot (after the window
    /// has shrunk, if it did).
    pub fn settle(&self, permit: Permit, obs: &Observation) {
        if let Some(t) = permit.ticket.as_ref() {
            let mut st = self.lock();
            let (now, in_flight) = (Instant::now(), self.in_flight.load(Ordering::Relaxed));
            st.ctl.tick(now, in_flight);
            st.ctl.record(now, t, obs, in_flight);
            self.resize(&mut st);
        }
        drop(permit);
    }

    /// A reading of the upstream's own figures: its queue steers standby; in throughput
    /// mode its KV cache, queue and preemptions cap the window (`kvwindow`).
    pub fn on_metrics(&self, m: &EngineMetrics) {
        let mut st = self.lock();
        let now = Instant::now();
        if let Some(waiting) = m.waiting {
            st.ctl.on_queue(now, waiting);
        }
        if self.base.mode == crate::config::UpstreamMode::Throughput {
            let max = st.max as f64;
            let cap = st.kv.update(m, self.in_flight(), max);
            st.ctl.set_cap(cap);
        }
        self.resize(&mut st);
    }

    /// The figures could not be read: the learned window alone rules again.
    pub fn metrics_lost(&self) {
        let mut st = self.lock();
        st.kv.reset();
        st.ctl.set_cap(None);
        self.resize(&mut st);
    }

    /// Corrects the TPM charge once the real usage is known.
    pub fn settle_tokens(&self, estimated: u64, actual: u64) {
        if let Some(b) = &mut self.lock().tpm {
            b.tokens -= actual as f64 - estimated as f64;
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Slots free right now (window minus in flight), for spreading load over pools; none
    /// while the pool is paused.
    pub fn free(&self) -> usize {
        if self.paused() {
            return 0;
        }
        self.sem.available_permits()
    }

    pub fn paused(&self) -> bool {
        self.lock().ctl.pause(Instant::now()).is_some()
    }

    pub fn window(&self) -> f64 {
        self.lock().ctl.window()
    }

    /// This node's share of `max_concurrency`.
    pub fn limit(&self) -> usize {
        self.lock().max
    }

    /// Reads the controller's state under its lock.
    pub(super) fn with_controller<T>(&self, f: impl FnOnce(&Controller, usize) -> T) -> T {
        let st = self.lock();
        f(&st.ctl, st.max)
    }

    /// Brings the semaphore's permits to the controller's window (none for a claim of 0).
    fn resize(&self, st: &mut State) {
        let target = if st.max == 0 { 0 } else { st.ctl.slots().clamp(1, st.max) };
        if target < st.capacity {
            let cut = st.capacity - target;
            let forgotten = self.sem.forget_permits(cut);
            self.debt.fetch_add(cut - forgotten, Ordering::AcqRel);
        } else if target > st.capacity {
            let mut grow = target - st.capacity;
            while grow > 0 && self.pay_debt() {
                grow -= 1;
            }
            self.sem.add_permits(grow);
        }
        st.capacity = target;
    }
}

/// Counts a request waiting for a slot, for as long as it waits (a waiter dropped mid-wait
/// stops counting).
struct Waiter<'a>(&'a Limiter);

impl<'a> Waiter<'a> {
    fn new(l: &'a Limiter) -> Self {
        l.waiting.fetch_add(1, Ordering::AcqRel);
        l.note_demand();
        Waiter(l)
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.0.note_demand();
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

fn bounds(base: &Base, n: usize, max_concurrency: usize) -> Bounds {
    let rate_cap = (base.rpm > 0).then(|| base.rpm as f64 / 60.0 / n as f64);
    Bounds { mode: base.mode, max_concurrency, rate_cap, nodes: n }
}

/// Node `rank`'s part of `total` split over `n` nodes: the parts add up to `total` (when
/// `total >= n`; else every node takes one).
fn share_of(total: usize, n: usize, rank: usize) -> usize {
    (total / n + usize::from(rank % n < total % n)).max(1)
}

struct Bucket {
    tokens: f64,
    capacity: f64,
    per_sec: f64,
    last: Instant,
}

impl Bucket {
    fn per_minute(limit: f64) -> Bucket {
        let per_sec = limit / 61.0;
        let capacity = per_sec.max(1.0);
        Bucket { tokens: capacity, capacity, per_sec, last: Instant::now() }
    }

    /// A node's share of a per-minute `limit` (none when 0), as full as `old` was: a
    /// re-division must not hand every node a fresh burst.
    fn share_of(old: Option<Bucket>, limit: u64, nodes: usize) -> Option<Bucket> {
        (limit > 0).then(|| {
            let mut b = Bucket::per_minute((limit as f64 / nodes as f64).max(1.0));
            if let Some(o) = old {
                b.tokens = o.tokens.min(o.capacity) * b.per_sec / o.per_sec;
                b.last = o.last;
            }
            b
        })
    }

    /// Takes `n` tokens, or says how long until there are enough.
    fn take(&mut self, now: Instant, n: f64) -> Option<Duration> {
        let dt = now.duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.per_sec).min(self.capacity);
        self.last = now;
        let need = n.min(self.capacity);
        if self.tokens >= need {
            self.tokens -= n;
            return None;
        }
        Some(Duration::from_secs_f64(((need - self.tokens) / self.per_sec).max(0.001)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::control::{Dimension, RateHeaders, Signal};
    use super::*;

    fn cfg(max: usize, rpm: u64) -> UpstreamConfig {
        cfg3(max, rpm, 0)
    }

    fn cfg3(max: usize, rpm: u64, tpm: u64) -> UpstreamConfig {
        let raw = crate::config::RawUpstream {
            name: "t".into(),
            base_url: "http://127.0.0.1:9/v1".into(),
            max_concurrency: Some(max),
            rpm: Some(rpm),
            tpm: Some(tpm),
            ..Default::default()
        };
        crate::config::RawConfig { upstreams: vec![raw], ..Default::default() }.resolve().unwrap().upstreams.remove(0)
    }

    /// This node's share of (max_concurrency, rpm, tpm), read from its semaphore's limit and
    /// its buckets (each refilled at `limit / 61` per second).
    fn shares(l: &Limiter) -> (usize, f64, f64) {
        let st = l.lock();
        let per_minute = |b: &Option<Bucket>| b.as_ref().map_or(0.0, |b| (b.per_sec * 61.0 * 1000.0).round() / 1000.0);
        (st.max, per_minute(&st.rpm), per_minute(&st.tpm))
    }

    fn obs(signal: Signal, h: &RateHeaders) -> Observation<'_> {
        Observation { signal, retry_after: None, headers: h, detail: "429 Too Many Requests" }
    }

    #[tokio::test]
    async fn an_overload_shrinks_the_window_and_successes_grow_it_back() {
        let l = Arc::new(Limiter::new(&cfg(8, 0)));
        let h = RateHeaders::default();
        assert_eq!(l.window(), 4.0, "a new upstream starts slowly");
        while l.window() < 8.0 {
            let held: Vec<Permit> = futures::future::join_all((0..l.window() as usize).map(|_| l.acquire(0))).await;
            for p in held {
                l.settle(p, &obs(Signal::Ok, &h));
            }
        }
        let mut held: Vec<Permit> = futures::future::join_all((0..8).map(|_| l.acquire(0))).await;
        assert_eq!(l.in_flight(), 8);
        l.settle(held.pop().unwrap(), &obs(Signal::RateLimited, &h));
        let w = l.window();
        assert!(w < 8.0, "a full window shrinks on a 429: {w}");
        l.settle(held.pop().unwrap(), &obs(Signal::RateLimited, &h));
        assert_eq!(l.window(), w, "at most one decrease per round trip");
        drop(held);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!l.paused(), "the pause after a 429 is short without a retry-after");
        assert_eq!(l.free(), w.floor() as usize, "permits beyond the window are destroyed as they return");
        for _ in 0..200 {
            let held: Vec<Permit> = futures::future::join_all((0..l.window() as usize).map(|_| l.acquire(0))).await;
            for p in held {
                l.settle(p, &obs(Signal::Ok, &h));
            }
        }
        assert_eq!(l.window(), 8.0);
        assert_eq!(l.free(), 8);
        assert_eq!(l.in_flight(), 0);
    }

    #[tokio::test]
    async fn a_claim_bounds_the_slots_and_a_lapsed_one_sends_nothing() {
        let l = Arc::new(Limiter::new(&cfg(8, 0)));
        assert_eq!(l.set_claim(0), 0);
        let waiter = tokio::spawn({
            let l = l.clone();
            async move { l.acquire(0).await }
        });
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(!waiter.is_finished(), "a claim of 0 sends nothing");
        assert_eq!((l.waiting(), l.take_demand()), (1, 1), "a waiter is demand");
        assert_eq!(l.set_claim(2), 2);
        let first = waiter.await.unwrap();
        assert!(first.current());
        assert_eq!(l.set_claim(0), 1, "a lowered claim publishes the slot still taken");
        drop(first);
        assert_eq!((l.held(), l.free()), (0, 0), "the slot taken beyond the claim is destroyed as it comes back");

        l.set_claim(2);
        l.claim_until(Some(std::time::Instant::now() + Duration::from_millis(30)));
        let stale = l.acquire(0).await;
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert!(!stale.current(), "past its claim, a slot is not used");
        let blocked = tokio::spawn({
            let l = l.clone();
            async move { l.acquire(0).await }
        });
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(!blocked.is_finished(), "a lapsed claim lets nothing through the gate");
        l.claim_until(Some(std::time::Instant::now() + Duration::from_secs(30)));
        let waited = blocked.await.unwrap();
        assert!(!waited.current() && !stale.current(), "slots taken before the renewal are stale: they must be taken again");
        drop((waited, stale));
        assert!(l.acquire(0).await.current(), "a slot taken within the renewed claim is used");
    }

    #[tokio::test]
    async fn a_slot_handed_over_before_a_renewal_is_stale_however_late_its_waiter_runs() {
        let l = Arc::new(Limiter::new(&cfg(1, 0)));
        l.claim_until(Some(std::time::Instant::now() + Duration::from_millis(20)));
        let held = l.acquire(0).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
        let waiter = tokio::spawn({
            let l = l.clone();
            async move { l.acquire(0).await.current() }
        });
        tokio::task::yield_now().await;
        assert_eq!(l.waiting(), 1, "the waiter waits for the only slot");
        // The slot comes back while the claim has lapsed and goes to the waiter; the claim is
        // renewed before the waiter runs again (no await in between on this one thread).
        drop(held);
        l.claim_until(Some(std::time::Instant::now() + Duration::from_secs(30)));
        assert!(!waiter.await.unwrap(), "a slot handed over under the lapsed claim is stale, though its waiter ran after the renewal");
        assert!(l.acquire(0).await.current(), "a slot waited for within the renewed claim is used");
    }

    #[tokio::test]
    async fn a_slot_given_back_by_a_dropped_waiter_pays_the_debt_of_a_lowered_claim() {
        let l = Arc::new(Limiter::new(&cfg(2, 0)));
        let (first, second) = (l.acquire(0).await, l.acquire(0).await);
        let mut dropped = Box::pin(l.acquire(0));
        assert!(futures::poll!(dropped.as_mut()).is_pending(), "no third slot of 2");
        // The first slot comes back and is handed to the waiter; the claim is lowered to 1
        // (a debt: the waiter's slot is not in the semaphore); the waiter is dropped before
        // it runs, so the slot goes back into the semaphore without paying the debt.
        drop(first);
        assert_eq!(l.set_claim(1), 1);
        drop(dropped);
        let third = tokio::time::timeout(Duration::from_millis(30), l.acquire(0)).await;
        assert!(third.is_err(), "a second slot in use on a claim of 1");
        drop(second);
        let alone = l.acquire(0).await;
        assert_eq!((l.held(), l.free()), (1, 0), "one slot, the claim's");
        drop(alone);
    }

    #[tokio::test]
    async fn set_share_divides_the_limits() {
        let l = Arc::new(Limiter::new(&cfg(10, 120)));
        assert_eq!(l.limit(), 10);
        l.set_share(3, 0);
        assert_eq!(l.limit(), 4, "10 = 4 + 3 + 3");
        assert_eq!(l.free(), 4);
        assert_eq!(l.window(), 4.0);
        let rate = l.with_controller(|c, _| c.learned_rate());
        assert_eq!(rate, None, "nothing learned yet");
        let held: Vec<Permit> = futures::future::join_all((0..4).map(|_| l.acquire(0))).await;
        assert_eq!(l.free(), 0, "no fifth request in flight on a third of 10");
        drop(held);
        l.set_share(3, 2);
        assert_eq!(l.limit(), 3);
        l.set_share(1, 0);
        assert_eq!((l.limit(), l.free()), (10, 10), "back to the whole when alone");
        let parts: usize = (0..4).map(|r| share_of(10, 4, r)).sum();
        assert_eq!(parts, 10, "the shares add up to the configured total");
        assert_eq!((0..16).map(|r| share_of(10, 16, r)).min(), Some(1), "every node keeps a slot");
    }

    #[tokio::test(start_paused = true)]
    async fn set_share_divides_the_request_rate() {
        let l = Arc::new(Limiter::new(&cfg(100, 244)));
        l.set_share(2, 1);
        let start = Instant::now();
        for _ in 0..6 {
            drop(l.acquire(0).await);
        }
        let took = start.elapsed().as_secs_f64();
        assert!((1.9..2.6).contains(&took), "half of 244 rpm is 2 per second after a 2-request burst, took {took}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_re_division_carries_the_buckets_fill_over() {
        // 244 rpm alone is 4 a second with a burst of 4; drained, then halved, the bucket
        // stays empty: the next request waits for half a second, not for nothing.
        let l = Arc::new(Limiter::new(&cfg(100, 244)));
        for _ in 0..4 {
            drop(l.acquire(0).await);
        }
        l.set_share(2, 1);
        let start = Instant::now();
        drop(l.acquire(0).await);
        let took = start.elapsed().as_secs_f64();
        assert!((0.4..0.7).contains(&took), "a drained bucket stays drained through a re-division: waited {took} s");
    }

    #[tokio::test(start_paused = true)]
    async fn set_share_divides_the_token_rate() {
        // 24,400 tpm is 400 tokens/s alone, 200 tokens/s (a bucket of 200) on half of it.
        let l = Arc::new(Limiter::new(&cfg3(100, 0, 24_400)));
        l.set_share(2, 1);
        let start = Instant::now();
        for _ in 0..6 {
            drop(l.acquire(100).await);
            l.settle_tokens(100, 100);
        }
        let took = start.elapsed().as_secs_f64();
        assert!((1.9..2.6).contains(&took), "half of 24,400 tpm is 200 tokens a second after a 200-token burst: 600 tokens took {took} s");
    }

    #[tokio::test]
    async fn shares_are_re_divided_when_a_node_leaves() {
        let nodes: Vec<Arc<Limiter>> = (0..3).map(|_| Arc::new(Limiter::new(&cfg3(11, 1200, 90_000)))).collect();
        for (rank, l) in nodes.iter().enumerate() {
            l.set_share(3, rank);
        }
        let three: Vec<_> = nodes.iter().map(|l| shares(l)).collect();
        assert_eq!(three, [(4, 400.0, 30_000.0), (4, 400.0, 30_000.0), (3, 400.0, 30_000.0)], "11 = 4 + 4 + 3; rpm and tpm by thirds");
        // The middle node leaves: the other two are now ranks 0 and 1 of 2.
        let (first, last) = (&nodes[0], &nodes[2]);
        first.set_share(2, 0);
        last.set_share(2, 1);
        let two = [shares(first), shares(last)];
        assert_eq!(two, [(6, 600.0, 45_000.0), (5, 600.0, 45_000.0)], "11 = 6 + 5; rpm and tpm by halves");
        for (after, before) in two.iter().zip([three[0], three[2]]) {
            assert!(after.0 > before.0 && after.1 > before.1 && after.2 > before.2, "each remaining node gets more: {before:?} → {after:?}");
        }
        assert_eq!(two.iter().map(|s| s.0).sum::<usize>(), 11, "the concurrency shares add up to the total exactly");
        assert_eq!(two.iter().map(|s| s.1).sum::<f64>(), 1200.0, "the rpm shares add up to the total");
        assert_eq!(two.iter().map(|s| s.2).sum::<f64>(), 90_000.0, "the tpm shares add up to the total");
        assert_eq!((first.free(), last.free()), (6, 5), "the new slots are usable at once");
    }

    #[tokio::test]
    async fn a_rate_announced_in_headers_is_divided_between_nodes() {
        // The upstream's x-ratelimit-* headers describe the whole key, which every node uses:
        // a node takes its share of what they announce, as it does of a configured rpm.
        let l = Arc::new(Limiter::new(&cfg(64, 0)));
        let requests = Dimension { limit: Some(1200.0), remaining: Some(1100.0), reset: Some(Duration::from_secs(5)) };
        let h = RateHeaders { requests, tokens: Dimension::default() };
        let p = l.acquire(0).await;
        l.settle(p, &obs(Signal::Ok, &h));
        let alone = l.with_controller(|c, _| c.learned_rate()).expect("a rate from the headers");
        assert!((alone * 60.0 - 1200.0).abs() < 1e-6, "alone, the whole 1,200 rpm: {}", alone * 60.0);
        l.set_share(2, 1);
        let p = l.acquire(0).await;
        l.settle(p, &obs(Signal::Ok, &h));
        let half = l.with_controller(|c, _| c.learned_rate()).expect("a rate from the headers");
        assert!((half * 60.0 - 600.0).abs() < 1e-6, "one of two nodes takes half of the announced 1,200 rpm: {}", half * 60.0);
    }

    #[tokio::test(start_paused = true)]
    async fn configured_tpm_caps_what_the_headers_announce() {
        // tpm = 6,100: 100 tokens a second, a bucket of 100. The upstream's headers announce
        // a million tokens a minute, nearly all of them left: what they say never lifts the
        // configured ceiling.
        let l = Arc::new(Limiter::new(&cfg3(64, 0, 6_100)));
        let tokens = Dimension { limit: Some(1_000_000.0), remaining: Some(999_000.0), reset: Some(Duration::from_millis(60)) };
        let h = RateHeaders { requests: Dimension::default(), tokens };
        let start = Instant::now();
        for _ in 0..12 {
            let p = l.acquire(50).await;
            l.settle(p, &obs(Signal::Ok, &h));
            l.settle_tokens(50, 50);
        }
        let took = start.elapsed().as_secs_f64();
        assert!((4.9..5.6).contains(&took), "600 tokens at 100 a second after a 100-token burst take 5 s, took {took}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_paused_pool_lets_nothing_through_until_the_pause_ends() {
        let l = Arc::new(Limiter::new(&cfg(4, 0)));
        let h = RateHeaders::default();
        let o = Observation { signal: Signal::RateLimited, retry_after: Some(Duration::from_secs(3)), headers: &h, detail: "429" };
        // A cluster of 429s (four in a second, every answer): the limit is the pool's.
        let held: Vec<Permit> = futures::future::join_all((0..4).map(|_| l.acquire(0))).await;
        for p in held {
            l.settle(p, &o);
        }
        assert!(l.paused());
        assert_eq!(l.free(), 0, "a paused pool offers no free slot to the router");
        let start = Instant::now();
        drop(l.acquire(0).await);
        let took = start.elapsed();
        assert!(took >= Duration::from_secs(3) && took < Duration::from_millis(3300), "{took:?}");
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
