//! The mock upstream's server-side limits, as real upstreams enforce them:
//! - `capacity`: above that many requests in flight, an immediate 429 with no header (TGI's
//!   `max_concurrent_requests`, LiteLLM's `max_parallel_requests`), or nginx's 503 for
//!   `limit_conn` with `refusal_status = 503`;
//! - `rpm` / `tpm`: OpenAI's limiter, a bucket of `limit` refilled at `limit` per minute,
//!   reported on every answer in `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`,
//!   and a 429 with `retry-after-ms` when empty (`limit_start` sets how full the buckets
//!   start, as if someone else had been using the key). The bucket holds `limit_period_s`
//!   of the limit: a minute, or a second for a limit enforced over shorter periods;
//! - `limit_rps`: nginx's `limit_req` with no burst and `limit_req_status 429` (or nginx's
//!   default 503), computed as nginx does (whole milliseconds), answered at once with an
//!   HTML page and no header;
//! - `slots`: a GPU server's batch: requests wait in a FIFO queue for one of `slots` before
//!   their latency starts, so latency rises with load.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue};

use super::behaviour::Behaviour;

/// Why a request is refused before it is served.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// An empty rpm/tpm bucket: wait this long, headers included.
    RateLimited { wait: Duration },
    /// nginx's `limit_req`.
    Nginx,
}

pub struct Limits {
    state: Mutex<State>,
    slots: tokio::sync::Semaphore,
}

struct State {
    /// The settings the buckets were made for; new ones reset them.
    made_for: (f64, f64, f64, f64, f64),
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
    nginx: Option<Nginx>,
    slot_count: u64,
}

/// A per-minute `limit` held as a bucket of `size` (the limit, or less when it is enforced
/// over a shorter period), refilled at `limit / 60` a second.
struct Bucket {
    limit: f64,
    size: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(limit: f64, start: f64, period_s: f64) -> Bucket {
        let size = (limit * period_s / 60.0).max(1.0);
        Bucket { limit, size, tokens: size * start, at: Instant::now() }
    }

    fn per_s(&self) -> f64 {
        self.limit / 60.0
    }

    fn refill(&mut self, now: Instant) {
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * self.per_s()).min(self.size);
        self.at = now;
    }

    /// Until `n` tokens are there.
    fn wait_for(&self, n: f64) -> Duration {
        Duration::from_secs_f64(((n.min(self.size) - self.tokens).max(0.0) / self.per_s()).max(0.001))
    }

    /// `limit`, `remaining`, `reset` as OpenAI writes them (reset: until the bucket is full).
    fn headers(&self, kind: &str, h: &mut HeaderMap) {
        let reset = Duration::from_secs_f64(((self.size - self.tokens).max(0.0) / self.per_s()).min(86_400.0));
        let mut put = |name: String, v: String| {
            if let (Ok(n), Ok(v)) = (axum::http::HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(&v)) {
                h.insert(n, v);
            }
        };
        put(format!("x-ratelimit-limit-{kind}"), format!("{}", self.limit.round()));
        put(format!("x-ratelimit-remaining-{kind}"), format!("{}", self.tokens.max(0.0).floor()));
        put(format!("x-ratelimit-reset-{kind}"), go_duration(reset));
    }
}

/// nginx's `limit_req` state: excess in thousandths of a request, last accepted millisecond.
struct Nginx {
    rate_milli: f64,
    excess: f64,
    last: Option<Instant>,
}

impl Limits {
    pub fn new(b: &Behaviour) -> Limits {
        let slots = tokio::sync::Semaphore::new(b.slots as usize);
        let l = Limits {
            state: Mutex::new(State { made_for: (-1.0, -1.0, -1.0, -1.0, -1.0), requests: None, tokens: None, nginx: None, slot_count: b.slots }),
            slots,
        };
        l.configure(b);
        l
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies new settings: rate limiters are made anew when theirs changed; slots are
    /// added or taken away.
    pub fn configure(&self, b: &Behaviour) {
        let mut st = self.lock();
        let key = (b.rpm, b.tpm, b.limit_start, b.limit_rps, b.limit_period_s);
        if st.made_for != key {
            st.made_for = key;
            st.requests = (b.rpm > 0.0).then(|| Bucket::new(b.rpm, b.limit_start, b.limit_period_s));
            st.tokens = (b.tpm > 0.0).then(|| Bucket::new(b.tpm, b.limit_start, b.limit_period_s));
            st.nginx = (b.limit_rps > 0.0).then_some(Nginx { rate_milli: b.limit_rps * 1000.0, excess: 0.0, last: None });
        }
        if b.slots > st.slot_count {
            self.slots.add_permits((b.slots - st.slot_count) as usize);
        } else if b.slots < st.slot_count {
            self.slots.forget_permits((st.slot_count - b.slots) as usize);
        }
        st.slot_count = b.slots;
    }

    /// Admits a request costing `tokens` (rpm/tpm buckets, nginx), writing the rate-limit
    /// headers its answer carries.
    pub fn admit(&self, tokens: f64, h: &mut HeaderMap) -> Result<(), Refusal> {
        let now = Instant::now();
        let mut st = self.lock();
        if let Some(n) = &mut st.nginx {
            let ms = n.last.map_or(i64::MAX / 2, |l| now.duration_since(l).as_millis() as i64) as f64;
            let excess = (n.excess - n.rate_milli * ms / 1000.0 + 1000.0).max(0.0);
            if excess > 0.0 {
                return Err(Refusal::Nginx);
            }
            n.excess = excess;
            n.last = Some(now);
        }
        let State { requests, tokens: tok, .. } = &mut *st;
        let mut wait = Duration::ZERO;
        for (b, n) in [(requests.as_mut(), 1.0), (tok.as_mut(), tokens)] {
            if let Some(b) = b {
                b.refill(now);
                if b.tokens < n.min(b.size) {
                    wait = wait.max(b.wait_for(n));
                }
            }
        }
        if wait.is_zero() {
            requests.iter_mut().for_each(|b| b.tokens -= 1.0);
            tok.iter_mut().for_each(|b| b.tokens -= tokens);
        }
        requests.iter().for_each(|b| b.headers("requests", h));
        tok.iter().for_each(|b| b.headers("tokens", h));
        if wait.is_zero() {
            Ok(())
        } else {
            Err(Refusal::RateLimited { wait })
        }
    }

    /// Waits for one of the server's slots (none to wait for when `slots` is 0).
    pub async fn slot(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        if self.lock().slot_count == 0 {
            return None;
        }
        self.slots.acquire().await.ok()
    }
}

/// `6m0s`, `1.5s`, `20ms`, as OpenAI writes its resets.
fn go_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = d.as_secs_f64();
    let (m, s) = ((secs / 60.0).floor(), secs % 60.0);
    let s = format!("{s:.3}").trim_end_matches('0').trim_end_matches('.').to_string();
    if m > 0.0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod limit_tests {
    use super::*;

    fn behaviour() -> Behaviour {
        Behaviour::from_args(&super::super::MockArgs::default())
    }

    #[test]
    fn go_durations_as_openai_writes_them() {
        assert_eq!(go_duration(Duration::from_millis(20)), "20ms");
        assert_eq!(go_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(go_duration(Duration::from_secs(360)), "6m0s");
    }

    #[test]
    fn an_empty_request_bucket_refuses_with_headers() {
        let l = Limits::new(&Behaviour { rpm: 120.0, limit_start: 2.0 / 120.0, ..behaviour() });
        let mut h = HeaderMap::new();
        assert!(l.admit(1.0, &mut h).is_ok());
        assert_eq!(h["x-ratelimit-limit-requests"], "120");
        assert_eq!(h["x-ratelimit-remaining-requests"], "1");
        assert!(l.admit(1.0, &mut h).is_ok());
        let mut h = HeaderMap::new();
        match l.admit(1.0, &mut h) {
            Err(Refusal::RateLimited { wait }) => assert!(wait > Duration::from_millis(400) && wait <= Duration::from_millis(500), "{wait:?}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(h["x-ratelimit-remaining-requests"], "0");
    }

    #[test]
    fn a_per_second_bucket_announces_the_minute_and_refills_by_the_second() {
        // 1,200 rpm held as 20 requests refilled at 20/s.
        let l = Limits::new(&Behaviour { rpm: 1200.0, limit_period_s: 1.0, ..behaviour() });
        let mut h = HeaderMap::new();
        assert!(l.admit(1.0, &mut h).is_ok());
        assert_eq!(h["x-ratelimit-limit-requests"], "1200");
        assert_eq!(h["x-ratelimit-remaining-requests"], "19");
        let reset = crate::upstream::parse_go_duration(h["x-ratelimit-reset-requests"].to_str().unwrap()).unwrap();
        assert!(reset <= Duration::from_millis(50), "one request's worth until the bucket is full again: {reset:?}");
        for _ in 0..19 {
            assert!(l.admit(1.0, &mut HeaderMap::new()).is_ok());
        }
        match l.admit(1.0, &mut HeaderMap::new()) {
            Err(Refusal::RateLimited { wait }) => assert!(wait <= Duration::from_millis(50), "the next token within 50 ms: {wait:?}"),
            other => panic!("the 21st request in the same instant is refused: {other:?}"),
        }
    }

    #[test]
    fn nginx_limit_req_refuses_what_comes_too_soon() {
        let l = Limits::new(&Behaviour { limit_rps: 20.0, ..behaviour() });
        assert!(l.admit(1.0, &mut HeaderMap::new()).is_ok());
        assert_eq!(l.admit(1.0, &mut HeaderMap::new()), Err(Refusal::Nginx));
        std::thread::sleep(Duration::from_millis(51));
        assert!(l.admit(1.0, &mut HeaderMap::new()).is_ok());
    }
}
