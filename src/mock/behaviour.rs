//! The mock upstream's behaviour knobs ([`Behaviour`]): what it answers and how (latency,
//! random faults, the limits of `limits`), set from the command line and changed at runtime
//! through `POST /config` ([`BehaviourPatch`]).

use serde::{Deserialize, Serialize};

use super::MockArgs;

/// Behaviour knobs, changeable at runtime through `POST /config`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Behaviour {
    pub latency_ms: u64,
    pub per_token_ms: f64,
    pub completion_tokens: u32,
    pub error_rate: f64,
    pub rate_429: f64,
    pub retry_after_s: f64,
    pub hang_rate: f64,
    /// Above this many requests in flight, an immediate refusal with no header (0: no cap).
    pub capacity: u64,
    /// Requests served at once; the rest wait in a FIFO queue (0: no queue).
    pub slots: u64,
    /// OpenAI-style requests / tokens per minute, with x-ratelimit-* headers (0: none).
    pub rpm: f64,
    pub tpm: f64,
    /// How full the rpm/tpm buckets start (0 to 1), whenever they are (re)configured.
    pub limit_start: f64,
    /// Seconds of the rpm/tpm limit the buckets hold: 60 (OpenAI's minute), or 1 for a limit
    /// enforced per second (1,200 rpm as a bucket of 20 refilled at 20/s). The headers still
    /// announce the per-minute limit, and reset when the bucket is full again.
    #[serde(default = "minute")]
    pub limit_period_s: f64,
    /// nginx `limit_req` rate, requests per second, no burst (0: none).
    pub limit_rps: f64,
    /// The status `capacity` and `limit_rps` refuse with: 429 (TGI, LiteLLM,
    /// `limit_req_status 429`) or 503 (nginx's default for `limit_conn` and `limit_req`).
    #[serde(default = "too_many")]
    pub refusal_status: u16,
    /// Every request answered 429 `insufficient_quota`.
    pub quota_exhausted: bool,
    /// Added to the real queue in `/metrics`' `vllm:num_requests_waiting` (others' load).
    pub extra_waiting: f64,
}

/// Partial update of [`Behaviour`]: fields present replace the current ones.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BehaviourPatch {
    latency_ms: Option<u64>,
    per_token_ms: Option<f64>,
    completion_tokens: Option<u32>,
    error_rate: Option<f64>,
    rate_429: Option<f64>,
    retry_after_s: Option<f64>,
    hang_rate: Option<f64>,
    capacity: Option<u64>,
    slots: Option<u64>,
    rpm: Option<f64>,
    tpm: Option<f64>,
    limit_start: Option<f64>,
    limit_period_s: Option<f64>,
    limit_rps: Option<f64>,
    refusal_status: Option<u16>,
    quota_exhausted: Option<bool>,
    extra_waiting: Option<f64>,
}

impl Behaviour {
    pub fn from_args(a: &MockArgs) -> Self {
        Behaviour {
            latency_ms: a.latency_ms,
            per_token_ms: a.per_token_ms,
            completion_tokens: a.completion_tokens,
            error_rate: a.error_rate,
            rate_429: a.rate_429,
            retry_after_s: a.retry_after_s,
            hang_rate: a.hang_rate,
            capacity: a.capacity,
            slots: a.slots,
            rpm: a.rpm,
            tpm: a.tpm,
            limit_start: 1.0,
            limit_period_s: a.limit_period_s,
            limit_rps: a.limit_rps,
            refusal_status: a.refusal_status,
            quota_exhausted: false,
            extra_waiting: 0.0,
        }
    }

    /// Applies `p` and validates the result; `self` is unchanged on error.
    pub fn patched(&self, p: BehaviourPatch) -> Result<Behaviour, String> {
        let mut b = *self;
        b.latency_ms = p.latency_ms.unwrap_or(b.latency_ms);
        b.per_token_ms = p.per_token_ms.unwrap_or(b.per_token_ms);
        b.completion_tokens = p.completion_tokens.unwrap_or(b.completion_tokens);
        b.error_rate = p.error_rate.unwrap_or(b.error_rate);
        b.rate_429 = p.rate_429.unwrap_or(b.rate_429);
        b.retry_after_s = p.retry_after_s.unwrap_or(b.retry_after_s);
        b.hang_rate = p.hang_rate.unwrap_or(b.hang_rate);
        b.capacity = p.capacity.unwrap_or(b.capacity);
        b.slots = p.slots.unwrap_or(b.slots);
        b.rpm = p.rpm.unwrap_or(b.rpm);
        b.tpm = p.tpm.unwrap_or(b.tpm);
        b.limit_start = p.limit_start.unwrap_or(b.limit_start);
        b.limit_rps = p.limit_rps.unwrap_or(b.limit_rps);
        b.limit_period_s = p.limit_period_s.unwrap_or(b.limit_period_s);
        b.refusal_status = p.refusal_status.unwrap_or(b.refusal_status);
        b.quota_exhausted = p.quota_exhausted.unwrap_or(b.quota_exhausted);
        b.extra_waiting = p.extra_waiting.unwrap_or(b.extra_waiting);
        b.validate().map(|_| b)
    }

    pub fn validate(&self) -> Result<(), String> {
        let rates = [("error_rate", self.error_rate), ("rate_429", self.rate_429), ("hang_rate", self.hang_rate)];
        for (name, r) in rates {
            if !(0.0..=1.0).contains(&r) {
                return Err(format!("{name} must be within [0, 1], got {r}"));
            }
        }
        if !(self.per_token_ms >= 0.0 && self.per_token_ms.is_finite()) {
            return Err("per_token_ms must be a finite number >= 0".into());
        }
        if !(self.retry_after_s >= 0.0 && self.retry_after_s.is_finite()) {
            return Err("retry_after_s must be a finite number >= 0".into());
        }
        for (name, v) in [("rpm", self.rpm), ("tpm", self.tpm), ("limit_rps", self.limit_rps), ("extra_waiting", self.extra_waiting)] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(format!("{name} must be a finite number >= 0"));
            }
        }
        if !(self.limit_period_s > 0.0 && self.limit_period_s <= 60.0) {
            return Err(format!("limit_period_s must be within (0, 60], got {}", self.limit_period_s));
        }
        if ![429, 503].contains(&self.refusal_status) {
            return Err(format!("refusal_status must be 429 or 503, got {}", self.refusal_status));
        }
        if !(0.0..=1.0).contains(&self.limit_start) {
            return Err(format!("limit_start must be within [0, 1], got {}", self.limit_start));
        }
        Ok(())
    }
}

fn minute() -> f64 {
    60.0
}

fn too_many() -> u16 {
    429
}
