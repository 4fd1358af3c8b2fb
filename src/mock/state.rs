//! Shared state of the mock upstream: the live behaviour config, lock-free
//! counters, the request-id / arrival tracker and the [`Stats`] snapshot.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::behaviour::Behaviour;
use super::MockArgs;

/// Counters snapshot, as served by `GET /stats`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Requests received on the POST `/v1/*` endpoints (any outcome).
    pub requests: u64,
    /// Answers per HTTP status code ("200", "429", ...); hangs are not counted.
    pub by_status: BTreeMap<String, u64>,
    /// Requests that hung (never answered).
    pub hangs: u64,
    /// Requests currently being handled (hanging ones included).
    pub in_flight: u64,
    /// Max of `in_flight` since the last reset.
    pub peak_in_flight: u64,
    /// Distinct client-supplied `x-request-id` values seen since reset.
    pub unique_request_ids: u64,
    /// Requests whose client-supplied `x-request-id` had already been seen.
    pub duplicate_request_ids: u64,
    /// Sum of prompt tokens over successful answers.
    pub prompt_tokens: u64,
    /// Sum of completion tokens over successful answers.
    pub completion_tokens: u64,
    /// Most request arrivals within any `window_ms` window since reset.
    pub max_in_window: u64,
    /// Requests waiting for one of the `slots` right now.
    #[serde(default)]
    pub queued: u64,
    /// Answers sent compressed (the client asked with `Accept-Encoding`).
    #[serde(default)]
    pub compressed_answers: u64,
    /// Times each client-supplied `x-request-id` was seen (only with `?ids=1`, and only while
    /// the mock has seen at most 100,000 distinct ids since its last reset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id_counts: Option<BTreeMap<String, u64>>,
}

const STATUS_SLOTS: usize = 600;

/// Distinct request ids whose text is kept for `?ids=1`; beyond it only their counts are (a
/// million-line benchmark would otherwise hold a million strings and slow the mock down).
const NAMES_KEPT: usize = 100_000;

#[derive(Default)]
struct Tracker {
    /// Times each client-supplied `x-request-id` was seen, by a 64-bit hash of it (a
    /// collision among a million ids has a chance of about 1 in 30 million).
    ids: HashMap<u64, u64>,
    /// The ids' text, while there are at most [`NAMES_KEPT`]; `None` once there were more.
    names: Option<HashMap<u64, String>>,
    duplicates: u64,
    body_attempts: HashMap<u64, u64>,
    arrivals: Vec<Instant>,
}

impl Tracker {
    fn new() -> Tracker {
        Tracker { names: Some(HashMap::new()), ..Tracker::default() }
    }

    /// Counts one arrival of `rid`; returns how often it has been seen.
    fn count(&mut self, rid: &str) -> u64 {
        let key = xxhash_rust::xxh3::xxh3_64(rid.as_bytes());
        let n = self.ids.entry(key).or_insert(0);
        *n += 1;
        if *n > 1 {
            self.duplicates += 1;
        } else if let Some(names) = &mut self.names {
            if names.len() < NAMES_KEPT {
                names.insert(key, rid.to_owned());
            } else {
                self.names = None;
            }
        }
        *n
    }
}

/// State shared by all handlers.
pub struct Shared {
    pub cfg: RwLock<Behaviour>,
    pub api_key: Option<String>,
    pub shutdown: watch::Receiver<bool>,
    seed: u64,
    salt: u64,
    draws: AtomicU64,
    ids: AtomicU64,
    requests: AtomicU64,
    hangs: AtomicU64,
    in_flight: AtomicU64,
    peak: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    by_status: Box<[AtomicU64]>,
    tracker: Mutex<Tracker>,
    pub limits: super::limits::Limits,
    pub queued: AtomicU64,
    pub compressed: AtomicU64,
    /// The engine simulator answering successes (`--engine-sim`).
    pub sim: Option<super::sim::Sim>,
}

/// Decrements `in_flight` when dropped, so cancelled requests are accounted for.
pub struct FlightGuard<'a>(&'a Shared);

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Deterministic pseudo-random u64 for (key, index).
pub fn mix(key: u64, i: u64) -> u64 {
    splitmix(key ^ splitmix(i))
}

pub fn hash_bytes(b: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    b.hash(&mut h);
    h.finish()
}

impl Shared {
    pub fn new(args: &MockArgs, shutdown: watch::Receiver<bool>) -> Self {
        Shared {
            cfg: RwLock::new(Behaviour::from_args(args)),
            api_key: args.api_key.clone(),
            shutdown,
            seed: args.seed.unwrap_or_else(rand::random),
            salt: rand::random(),
            draws: AtomicU64::new(0),
            ids: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            hangs: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
            by_status: (0..STATUS_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            tracker: Mutex::new(Tracker::new()),
            limits: super::limits::Limits::new(&Behaviour::from_args(args)),
            queued: AtomicU64::new(0),
            compressed: AtomicU64::new(0),
            sim: args.sim.engine_sim.then(|| super::sim::Sim::start(&args.sim)),
        }
    }

    pub fn behaviour(&self) -> Behaviour {
        *self.cfg.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Next value of the seeded random sequence, uniform in [0, 1).
    pub fn draw(&self) -> f64 {
        let n = self.draws.fetch_add(1, Relaxed);
        (mix(self.seed, n) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A fresh unique id such as `chatcmpl-1a2b...`.
    pub fn new_id(&self, prefix: &str) -> String {
        let n = self.ids.fetch_add(1, Relaxed);
        format!("{prefix}{:016x}", mix(self.salt, n))
    }

    /// Requests being handled now (queued or hanging ones included).
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Relaxed)
    }

    /// Marks a request as in flight until the guard is dropped.
    pub fn enter(&self) -> FlightGuard<'_> {
        let now = self.in_flight.fetch_add(1, Relaxed) + 1;
        self.peak.fetch_max(now, Relaxed);
        FlightGuard(self)
    }

    /// Records an arrival; returns how often `rid` has been seen (0 if none).
    pub fn arrive(&self, rid: Option<&str>) -> u64 {
        self.requests.fetch_add(1, Relaxed);
        let mut t = self.tracker.lock().unwrap_or_else(|e| e.into_inner());
        t.arrivals.push(Instant::now());
        rid.map_or(0, |rid| t.count(rid))
    }

    /// Counts attempts of an identical body (used when no x-request-id is sent).
    pub fn body_attempt(&self, hash: u64) -> u64 {
        let mut t = self.tracker.lock().unwrap_or_else(|e| e.into_inner());
        let n = t.body_attempts.entry(hash).or_insert(0);
        *n += 1;
        *n
    }

    pub fn record_status(&self, status: u16) {
        if let Some(slot) = self.by_status.get(status as usize) {
            slot.fetch_add(1, Relaxed);
        }
    }

    pub fn record_success(&self, prompt: u64, completion: u64) {
        self.prompt_tokens.fetch_add(prompt, Relaxed);
        self.completion_tokens.fetch_add(completion, Relaxed);
    }

    pub fn record_hang(&self) {
        self.hangs.fetch_add(1, Relaxed);
    }

    pub fn reset(&self) {
        let mut t = self.tracker.lock().unwrap_or_else(|e| e.into_inner());
        *t = Tracker::new();
        for c in [&self.requests, &self.hangs, &self.prompt_tokens, &self.completion_tokens, &self.compressed] {
            c.store(0, Relaxed);
        }
        self.by_status.iter().for_each(|c| c.store(0, Relaxed));
        self.peak.store(self.in_flight.load(Relaxed), Relaxed);
    }

    pub fn stats(&self, window: Duration, with_ids: bool) -> Stats {
        let t = self.tracker.lock().unwrap_or_else(|e| e.into_inner());
        Stats {
            requests: self.requests.load(Relaxed),
            by_status: self.status_map(),
            hangs: self.hangs.load(Relaxed),
            in_flight: self.in_flight.load(Relaxed),
            peak_in_flight: self.peak.load(Relaxed),
            unique_request_ids: t.ids.len() as u64,
            duplicate_request_ids: t.duplicates,
            prompt_tokens: self.prompt_tokens.load(Relaxed),
            completion_tokens: self.completion_tokens.load(Relaxed),
            max_in_window: max_in_window(&t.arrivals, window),
            queued: self.queued.load(Relaxed),
            compressed_answers: self.compressed.load(Relaxed),
            request_id_counts: with_ids.then_some(()).and(t.names.as_ref()).map(|names| names.iter().map(|(k, name)| (name.clone(), t.ids[k])).collect()),
        }
    }

    fn status_map(&self) -> BTreeMap<String, u64> {
        let counts = self.by_status.iter().map(|c| c.load(Relaxed)).enumerate();
        counts.filter(|(_, n)| *n > 0).map(|(s, n)| (s.to_string(), n)).collect()
    }
}

/// Largest number of instants (sorted ascending) within a span shorter than `window`.
fn max_in_window(arrivals: &[Instant], window: Duration) -> u64 {
    let (mut start, mut best) = (0usize, 0usize);
    for (end, t) in arrivals.iter().enumerate() {
        while start < end && t.duration_since(arrivals[start]) >= window {
            start += 1;
        }
        best = best.max(end + 1 - start);
    }
    best as u64
}

#[cfg(test)]
mod window_tests {
    use super::*;

    #[test]
    fn ids_are_counted_exactly_and_their_text_kept_up_to_a_bound() {
        let mut t = Tracker::new();
        assert_eq!((t.count("a"), t.count("b"), t.count("a")), (1, 1, 2));
        assert_eq!((t.ids.len(), t.duplicates), (2, 1));
        assert_eq!(t.names.as_ref().map(|n| n.len()), Some(2));
        for i in 0..NAMES_KEPT {
            t.count(&format!("id-{i}"));
        }
        assert!(t.names.is_none(), "past the bound no text is kept");
        assert_eq!(t.count("a"), 3, "counts stay exact");
        assert_eq!((t.ids.len(), t.duplicates), (NAMES_KEPT + 2, 2));
    }

    #[test]
    fn sliding_window_counts_densest_span() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let v = [at(0), at(10), at(20), at(500), at(505), at(510), at(515), at(2000)];
        assert_eq!(max_in_window(&v, Duration::from_millis(100)), 4);
        assert_eq!(max_in_window(&v, Duration::from_millis(5)), 1);
        assert_eq!(max_in_window(&v, Duration::from_millis(6)), 2);
        assert_eq!(max_in_window(&v, Duration::from_millis(600)), 7);
        assert_eq!(max_in_window(&[], Duration::from_millis(600)), 0);
    }
}
