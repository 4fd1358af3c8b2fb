//! The adaptive controller of one upstream pool: how many requests may be in flight (the
//! window), how fast they may be sent (a learned rate and the upstream's own rate-limit
//! headers), and when the pool must not send at all (a pause). Pure state, driven by
//! [`Controller::gate`] before each send and [`Controller::record`] after each answer, with
//! the time passed in: it never reads a clock, so it is tested on a simulated upstream.
//!
//! Throughput mode is loss-based, as TCP and Netflix's AIMD limit are:
//! - a new upstream (or one idle for [`FORGET_AFTER`]) starts with a small window that grows
//!   while it is full, doubling every [`SLOW_START_STEP`] until the first answer comes back
//!   and with every answer (slow start),
//!   until the first overload: first contact draws the refusals of a few milliseconds of
//!   sending, not of a whole window;
//! - a success grows the window by `1/window` when the window was full (about one slot per
//!   round trip), four times slower within a slot of where the last overload happened;
//! - a stray overload is the line's, not the pool's: an overload that names its own wait
//!   (`Retry-After`) but that no rate-limit header explains and no cluster of overloads across
//!   requests follows (fewer than [`CLUSTER_MIN`], or under [`CLUSTER_SHARE`] of the answers of
//!   the last second) neither pauses the pool nor shrinks anything: a proxy balancing over
//!   several deployments answers so when one of them is limited. Its line waits out the wait;
//! - an overload (429 without rate-limit headers that explain it, 503, 529,
//!   `overloaded_error`) decreases at most once per round trip: only an answer to a request
//!   sent after the previous decrease counts (an epoch), as TCP reacts once per window.
//!   When the window was full, the window drops to 0.9 × the concurrency the upstream was
//!   really serving (Little's law over recent successes), not 0.9 × the window. When it was
//!   not full (or is at 1 already) and overloads recur while some requests get through, a
//!   rate is learned instead: 0.85 × the recent goodput, or × the learned rate when that
//!   bound the sending. (An isolated overload only pauses; so does a storm in which nothing
//!   gets through at any pace.) The learned rate grows 50 %/s until an overload shows where
//!   the limit is, then 25 %/s up to 0.8 of that point and 5 %/s just below it, probing
//!   faster and faster beyond it;
//!   it is forgotten once it is far above what the window can carry;
//! - every overload also pauses the whole pool (the upstream's `Retry-After`, else a quarter
//!   of the round trip or one interval of the learned rate, doubling while overloads repeat
//!   with no success between them), so a freed slot is not handed to the next line at once;
//! - a timeout shrinks the window by 10 %, once per epoch, and never pauses: a slow answer
//!   is not an overload signal as strong as a 429.
//!
//! The upstream's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` headers are obeyed
//! before any 429: each answer re-synchronises a bucket holding `remaining` minus what was
//! sent after that request, refilled at `(limit − remaining) / reset` (OpenAI's meaning of
//! reset: until the limit is whole again). The limit is per minute, but the bucket behind it
//! may hold less: a reset shorter than a per-minute bucket would need says how much (OpenAI
//! enforces 60,000 requests a minute as 1,000 a second): the bucket holds
//! `remaining + limit / 60 × reset` and refills at `limit / 60`, so a per-second limiter is
//! paced to the second. A 429 those headers explain only pauses. A
//! request is charged its token estimate times a scale that a 429 with tokens left above the
//! estimate raises (the upstream counts more than batchd estimated) and successes let decay.
//!
//! Standby mode is delay-based, like Envoy's adaptive concurrency: every round trip the
//! median latency of the round is compared with the lowest round median of the last 15 to
//! 30 s (a median, not a single sample, so that ordinary jitter does not read as load); the window
//! becomes `window × clamp(1.1 × min / median, 0.5, 1) + 1`, smoothed by half, so it sits at
//! the knee where latency starts to rise; a round with no rise adds √window, so capacity
//! comes back within a few round trips once online traffic falls. Queued requests reported by the upstream's metrics
//! (vLLM, SGLang) shrink it too. It starts at 2 and doubles per round until latency rises.
//!
//! What is learned ages out: a rate learned from overloads, the headers' buckets, the last
//! error (always shown with its time) are forgotten after [`FORGET_AFTER`] without news, and a
//! pool idle that long starts slowly again.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use super::kvwindow::{Cap, WindowReason};
use crate::config::UpstreamMode;

const BETA_WINDOW: f64 = 0.9;
const BETA_RATE: f64 = 0.85;
const BETA_TIMEOUT: f64 = 0.9;
/// Growth of the window per round trip within a slot of the last overload.
const CAUTIOUS_GROWTH: f64 = 0.25;
/// Growth of a learned rate per second: searching (no overload seen at a known rate yet),
/// recovering, near the last overload, first probe.
const RATE_SEARCH: f64 = 0.5;
const RATE_RECOVER: f64 = 0.25;
const RATE_CAUTIOUS: f64 = 0.05;
const RATE_PROBE: f64 = 0.05;
/// Lowest learned rate: one request every 20 s.
const MIN_RATE: f64 = 0.05;
const MIN_PAUSE: Duration = Duration::from_millis(5);
const MAX_PAUSE: Duration = Duration::from_secs(30);
const QUOTA_PAUSE: Duration = Duration::from_secs(30);
const MAX_QUOTA_PAUSE: Duration = Duration::from_secs(600);
/// Connect failures in a row before the pool pauses as unreachable.
const UNREACHABLE_AFTER: u32 = 3;
/// Standby: latency may exceed the lowest seen by this factor before the window shrinks.
const STANDBY_TOLERANCE: f64 = 1.1;
const STANDBY_START: f64 = 2.0;
/// Throughput: the window a new upstream starts with, and how often slow start doubles it
/// while it is full.
const INITIAL_WINDOW: f64 = 4.0;
pub const SLOW_START_STEP: Duration = Duration::from_millis(10);
/// A cluster of overloads: at least this many in the last second, and at least this share of
/// its answers. Fewer, an overload with its own `Retry-After` is stray.
pub const CLUSTER_MIN: f64 = 4.0;
pub const CLUSTER_SHARE: f64 = 0.25;
/// How long a learned figure, an idle window or the last error is kept without news.
pub const FORGET_AFTER: Duration = Duration::from_secs(300);
/// How long the lowest latency is remembered (two buckets of this length).
const MIN_RTT_BUCKET: Duration = Duration::from_secs(15);
/// Window of the concurrency estimate (Little's law over recent successes).
const LITTLE_BUCKET: Duration = Duration::from_millis(250);
/// A queue metric reading older than this is ignored.
const QUEUE_FRESH: Duration = Duration::from_secs(3);
/// A second overload within this long of the last decrease means sending too fast, not bad luck.
const RECENT_OVERLOAD: Duration = Duration::from_secs(2);
/// How far below what the upstream charges batchd's token estimate may be learned to be: a
/// 429 whose `remaining-tokens` exceeds this many estimates is not about tokens.
const MAX_TOKEN_SCALE: f64 = 8.0;
/// Growth of the token scale on a 429 that shows the estimate too low, and its decay per
/// success (so an estimate once too low is tried again, at about one 429 in a hundred).
const TOKEN_SCALE_UP: f64 = 1.1;
const TOKEN_SCALE_DECAY: f64 = 0.999;

/// What one outcome says about the upstream's load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// An answer the upstream served (2xx, or a final 4xx).
    Ok,
    /// 429 "slow down" (not a quota).
    RateLimited,
    /// 503, 529 or `overloaded_error`; `slow_down` when the upstream said so explicitly
    /// (529 / `overloaded_error`). Like a 429, it costs the line no attempt: nginx answers 503
    /// for `limit_req` and `limit_conn`.
    Overloaded {
        slow_down: bool,
    },
    /// `insufficient_quota` (or 402): out of money or quota, not a rate limit.
    Quota,
    Timeout,
    /// No connection could be made.
    Unreachable,
    /// Any other failure (500, a broken answer): says nothing about load.
    Failed,
    /// A final 4xx the upstream served: nothing to learn.
    Neutral,
}

impl Signal {
    /// Whether an attempt that ended so counts against the line's `max_attempts`: overloads
    /// (429, 503, 529) and quota never do; the batch's completion window bounds them, also
    /// a server answering 503 to everything.
    pub fn burns_attempt(self) -> bool {
        !matches!(self, Signal::RateLimited | Signal::Quota | Signal::Overloaded { .. })
    }
}

/// The rate-limit headers of one answer (OpenAI's names, or LiteLLM's `llm_provider-` copies).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RateHeaders {
    pub requests: Dimension,
    pub tokens: Dimension,
}

/// `x-ratelimit-{limit,remaining,reset}-<dimension>`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Dimension {
    pub limit: Option<f64>,
    pub remaining: Option<f64>,
    pub reset: Option<Duration>,
}

/// Everything the controller learns from one finished attempt.
#[derive(Debug, Clone, Copy)]
pub struct Observation<'a> {
    pub signal: Signal,
    pub retry_after: Option<Duration>,
    pub headers: &'a RateHeaders,
    /// Short words for `last_error` and the pause's detail ("429 Too Many Requests").
    pub detail: &'a str,
}

/// Why a pool is paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PauseReason {
    RateLimited,
    Overloaded,
    QuotaExhausted,
    Unreachable,
}

impl PauseReason {
    /// "rate limited by local-vllm", "local-vllm out of quota".
    pub fn words(self, upstream: &str) -> String {
        match self {
            PauseReason::RateLimited => format!("rate limited by {upstream}"),
            PauseReason::Overloaded => format!("{upstream} overloaded"),
            PauseReason::QuotaExhausted => format!("{upstream} out of quota"),
            PauseReason::Unreachable => format!("{upstream} unreachable"),
        }
    }

    pub const ALL: [PauseReason; 4] = [PauseReason::RateLimited, PauseReason::Overloaded, PauseReason::QuotaExhausted, PauseReason::Unreachable];

    /// The reason's name, as in JSON (`rate_limited`, `quota_exhausted`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            PauseReason::RateLimited => "rate_limited",
            PauseReason::Overloaded => "overloaded",
            PauseReason::QuotaExhausted => "quota_exhausted",
            PauseReason::Unreachable => "unreachable",
        }
    }

    pub fn parse(s: &str) -> Option<PauseReason> {
        PauseReason::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

#[derive(Debug, Clone)]
pub struct Pause {
    pub until: Instant,
    pub reason: PauseReason,
    pub detail: String,
}

/// One send, as the controller saw it; handed back with its outcome.
#[derive(Debug, Clone, Copy)]
pub struct Ticket {
    seq: u64,
    epoch: u64,
    pub sent_at: Instant,
    /// The learned rate held this request back (the rate bound the sending).
    paced: bool,
    /// Tokens charged to the header bucket for this request: the estimate × the token scale.
    est_tokens: f64,
    /// The estimate as given, before the token scale.
    raw_tokens: f64,
    /// A token bucket from the upstream's headers let this request go.
    token_gated: bool,
    /// Estimated tokens of everything sent before this request.
    tokens_before: f64,
}

/// The limits a controller works within: its share of the configured ones.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub mode: UpstreamMode,
    pub max_concurrency: usize,
    /// Configured requests per second (the pool's share of `rpm`), a hard ceiling.
    pub rate_cap: Option<f64>,
    /// The nodes sharing the upstream (this pool's share is one of them): what the
    /// upstream's rate-limit headers announce is divided by it, and a learned rate is
    /// re-divided when it changes.
    pub nodes: usize,
}

pub struct Controller {
    bounds: Bounds,
    window: f64,
    /// The window when the last overload came (0: none yet).
    window_at_loss: f64,
    slow_start: bool,
    rate: Option<f64>,
    rate_at_loss: f64,
    rate_updated: Instant,
    probing_since: Option<Instant>,
    /// The learned rate's schedule: the earliest time of the next send.
    next_send: Instant,
    epoch: u64,
    last_decrease: Option<Instant>,
    /// Decreases since the last success (each doubles the pause).
    strikes: u32,
    quota_strikes: u32,
    unreachable_strikes: u32,
    pause: Option<Pause>,
    seq: u64,
    /// The last send that filled the window.
    filled_at: Option<u64>,
    tokens_sent: f64,
    /// What the upstream charges per estimated token, as far as its 429s showed (≥ 1).
    token_scale: f64,
    srtt: Option<f64>,
    min_rtt: WindowedMin,
    little: Accumulator,
    sends: Accumulator,
    oks: Accumulator,
    headers_seq: Option<u64>,
    header_requests: Option<HeaderBucket>,
    header_tokens: Option<HeaderBucket>,
    round: Round,
    queue: Option<(Instant, f64)>,
    pub counters: Counters,
    /// The last failure, in words, and when it came.
    last_error: Option<(Instant, String)>,
    /// Slow start's time ramp: since when, from which window, the window has been full.
    ramp: Option<(Instant, f64)>,
    /// An answer came back since slow start began: from then on the answers pace its growth
    /// (a slot each), not the clock.
    heard: bool,
    /// Answers and overloads of the last second or two (for clusters of overloads).
    answers: Accumulator,
    overloads: Accumulator,
    /// Until when the stray overloads of late asked their lines to wait: once a cluster shows
    /// the limit is the pool's, the pool waits as long.
    stray_until: Option<Instant>,
    last_send: Option<Instant>,
    /// When the rate-limit headers last said something.
    headers_at: Option<Instant>,
    /// The cap the inference server's own figures put on the window (`kvwindow`).
    cap: Option<Cap>,
}

/// Standby's current measurement round.
struct Round {
    start: Instant,
    samples: Vec<f64>,
}

impl Controller {
    pub fn new(bounds: Bounds, now: Instant) -> Controller {
        let max = bounds.max_concurrency.max(1) as f64;
        let standby = bounds.mode == UpstreamMode::Standby;
        Controller {
            bounds,
            window: if standby { STANDBY_START } else { INITIAL_WINDOW }.min(max),
            window_at_loss: 0.0,
            slow_start: true,
            rate: None,
            rate_at_loss: 0.0,
            rate_updated: now,
            probing_since: None,
            next_send: now,
            epoch: 0,
            last_decrease: None,
            strikes: 0,
            quota_strikes: 0,
            unreachable_strikes: 0,
            pause: None,
            seq: 0,
            filled_at: None,
            tokens_sent: 0.0,
            token_scale: 1.0,
            srtt: None,
            min_rtt: WindowedMin::new(now),
            little: Accumulator::new(now, LITTLE_BUCKET),
            sends: Accumulator::new(now, Duration::from_secs(1)),
            oks: Accumulator::new(now, Duration::from_secs(1)),
            headers_seq: None,
            header_requests: None,
            header_tokens: None,
            round: Round { start: now, samples: Vec::new() },
            queue: None,
            counters: Counters::new(now),
            last_error: None,
            ramp: None,
            heard: false,
            answers: Accumulator::new(now, Duration::from_secs(1)),
            overloads: Accumulator::new(now, Duration::from_secs(1)),
            stray_until: None,
            last_send: None,
            headers_at: None,
            cap: None,
        }
    }

    /// Changes the limits (a new cluster share); the window and rate stay within them. A
    /// learned rate, and what the rate-limit headers allow, are this node's part of the
    /// upstream's: they are re-divided between the new number of nodes.
    pub fn set_bounds(&mut self, bounds: Bounds) {
        let at_ceiling = self.window >= self.max() && bounds.mode == UpstreamMode::Throughput;
        let f = self.bounds.nodes.max(1) as f64 / bounds.nodes.max(1) as f64;
        if f != 1.0 {
            self.rate = self.rate.map(|r| (r * f).max(MIN_RATE));
            self.rate_at_loss *= f;
            for b in [&mut self.header_requests, &mut self.header_tokens].into_iter().flatten() {
                (b.tokens, b.capacity, b.per_sec) = (b.tokens * f, b.capacity * f, b.per_sec * f);
            }
        }
        self.bounds = bounds;
        // A window that nothing had held below its ceiling moves with it.
        self.window = if at_ceiling { self.max() } else { self.window.min(self.max()) };
        if let (Some(r), Some(cap)) = (self.rate, bounds.rate_cap) {
            self.rate = Some(r.min(cap));
        }
    }

    fn max(&self) -> f64 {
        self.bounds.max_concurrency.max(1) as f64
    }

    /// The window: requests allowed in flight (the learned one, under the server's cap).
    pub fn window(&self) -> f64 {
        self.cap.map_or(self.window, |c| self.window.min(c.slots))
    }

    /// Whole slots of the window (at least one).
    pub fn slots(&self) -> usize {
        (self.window().floor() as usize).clamp(1, self.bounds.max_concurrency.max(1))
    }

    /// Caps the window by the inference server's figures (throughput mode), or lifts the cap
    /// (`None`: the figures went away). The learned window under a lifted cap starts from
    /// where the cap held it, not from where it had grown to unused.
    pub fn set_cap(&mut self, cap: Option<Cap>) {
        if cap.is_none() {
            if let Some(c) = self.cap {
                self.window = self.window.min(c.slots.max(1.0));
            }
        }
        self.cap = cap.filter(|_| self.bounds.mode == UpstreamMode::Throughput);
    }

    /// Why the window is what it is: the server's cap when it binds, else slow start or
    /// what the answers taught.
    pub fn reason(&self) -> WindowReason {
        match self.cap {
            Some(c) if c.slots < self.window => c.reason,
            _ if self.slow_start && self.bounds.mode == UpstreamMode::Throughput => WindowReason::SlowStart,
            _ => WindowReason::Learned,
        }
    }

    pub fn pause(&self, now: Instant) -> Option<&Pause> {
        self.pause.as_ref().filter(|p| p.until > now)
    }

    /// The last failure and when it came, unless older than [`FORGET_AFTER`].
    pub fn last_error(&self, now: Instant) -> Option<(Instant, &str)> {
        self.last_error.as_ref().filter(|(at, _)| now - *at < FORGET_AFTER).map(|(at, e)| (*at, e.as_str()))
    }

    fn set_error(&mut self, now: Instant, detail: &str) {
        self.last_error = Some((now, detail.to_string()));
    }

    /// Whether slow start is growing the window by time: a waiter for a slot should look
    /// again soon ([`Controller::tick`]).
    pub fn ramping(&self) -> bool {
        self.slow_start && !self.heard && self.bounds.mode == UpstreamMode::Throughput && self.window < self.max()
    }

    /// Slow start's time ramp: while the window is full, it doubles every
    /// [`SLOW_START_STEP`]; a window not full restarts the ramp from where it is.
    pub fn tick(&mut self, now: Instant, in_flight: usize) {
        if !self.ramping() {
            self.ramp = None;
            return;
        }
        match self.ramp {
            Some((t0, w0)) if in_flight + 1 >= self.slots() => {
                let doublings = ((now - t0).as_secs_f64() / SLOW_START_STEP.as_secs_f64()).min(20.0);
                self.window = self.window.max(w0 * 2f64.powf(doublings)).min(self.max());
            }
            _ => self.ramp = Some((now, self.window)),
        }
    }

    /// Forgets what is older than [`FORGET_AFTER`]: a learned rate with no overload since,
    /// headers not heard since, and (throughput) a window not used since, which starts
    /// slowly again.
    fn age(&mut self, now: Instant) {
        let stale = |t: Option<Instant>| t.is_some_and(|t| now - t >= FORGET_AFTER);
        if self.rate.is_some() && stale(self.last_decrease) {
            (self.rate, self.rate_at_loss, self.probing_since) = (None, 0.0, None);
        }
        if stale(self.headers_at) {
            (self.header_requests, self.header_tokens, self.headers_at) = (None, None, None);
        }
        if self.bounds.mode == UpstreamMode::Throughput && stale(self.last_send) {
            (self.window, self.slow_start, self.window_at_loss, self.ramp, self.heard) = (INITIAL_WINDOW.min(self.max()), true, 0.0, None, false);
        }
    }

    /// [`Controller::learned_rate`], unless what taught it is older than [`FORGET_AFTER`].
    pub fn learned_rate_at(&self, now: Instant) -> Option<f64> {
        let stale = |t: Option<Instant>| t.is_none_or(|t| now - t >= FORGET_AFTER);
        if stale(self.last_decrease) && stale(self.headers_at) {
            return None;
        }
        self.learned_rate()
    }

    /// The sending rate learned from 429s or announced by rate-limit headers, per second.
    pub fn learned_rate(&self) -> Option<f64> {
        let header = self.header_requests.as_ref().map(|b| b.per_sec).filter(|r| *r > 0.0);
        let learned = match (self.rate, header) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        match (learned, self.bounds.rate_cap) {
            (Some(l), Some(cap)) => Some(l.min(cap)),
            (l, _) => l,
        }
    }

    /// Lets one request go now (and returns its ticket), or says until when to wait: a
    /// pause, an empty header bucket, or the learned rate's schedule.
    pub fn gate(&mut self, now: Instant, est_tokens: u64, in_flight: usize) -> Result<Ticket, Instant> {
        self.age(now);
        if let Some(p) = self.pause(now) {
            return Err(p.until);
        }
        let est = est_tokens as f64 * self.token_scale;
        for (bucket, n) in [(&mut self.header_requests, 1.0), (&mut self.header_tokens, est)] {
            if let Some(b) = bucket {
                let at = b.ready_at(now, n);
                if at > now {
                    return Err(at);
                }
            }
        }
        let mut paced = false;
        if let Some(r) = self.rate {
            if self.next_send > now {
                return Err(self.next_send);
            }
            let interval = Duration::from_secs_f64(1.0 / r);
            paced = self.next_send + interval / 2 >= now;
            self.next_send = now.max(self.next_send) + interval;
        }
        for (bucket, n) in [(&mut self.header_requests, 1.0), (&mut self.header_tokens, est)] {
            if let Some(b) = bucket {
                b.tokens -= n;
            }
        }
        self.sends.add(now, 1.0);
        self.last_send = Some(now);
        if in_flight + 1 >= self.slots() {
            self.filled_at = Some(self.seq);
        }
        let ticket = Ticket {
            seq: self.seq,
            epoch: self.epoch,
            sent_at: now,
            paced,
            est_tokens: est,
            raw_tokens: est_tokens as f64,
            token_gated: self.header_tokens.is_some(),
            tokens_before: self.tokens_sent,
        };
        self.seq += 1;
        self.tokens_sent += est;
        Ok(ticket)
    }

    /// Learns from one finished attempt. `in_flight` counts the requests on the wire,
    /// this one included.
    pub fn record(&mut self, now: Instant, t: &Ticket, obs: &Observation, in_flight: usize) {
        self.sync_headers(now, t, obs.headers);
        self.answers.add(now, 1.0);
        match obs.signal {
            Signal::Ok => self.on_ok(now, t, in_flight),
            Signal::RateLimited | Signal::Overloaded { .. } => self.on_overload(now, t, obs, in_flight),
            Signal::Quota => self.on_quota(now, obs),
            Signal::Timeout => self.on_timeout(now, t, obs, in_flight),
            Signal::Unreachable => self.on_unreachable(now, obs),
            Signal::Failed => self.set_error(now, obs.detail),
            // A final answer says nothing about load; a 404 is still shown (a wrong base URL).
            Signal::Neutral if !obs.detail.is_empty() => self.set_error(now, obs.detail),
            Signal::Neutral => {}
        }
        if obs.signal != Signal::Unreachable {
            self.unreachable_strikes = 0;
            self.heard = true;
        }
    }

    fn on_ok(&mut self, now: Instant, t: &Ticket, in_flight: usize) {
        let latency = (now - t.sent_at).as_secs_f64();
        self.srtt = Some(self.srtt.map_or(latency, |s| 0.875 * s + 0.125 * latency));
        self.little.add(now, latency);
        self.oks.add(now, 1.0);
        self.strikes = 0;
        self.quota_strikes = 0;
        self.token_scale = (self.token_scale * TOKEN_SCALE_DECAY).max(1.0);
        match self.bounds.mode {
            UpstreamMode::Throughput => self.grow_window(t, in_flight),
            UpstreamMode::Standby => self.standby_sample(now, latency, in_flight),
        }
        self.grow_rate(now, t);
    }

    /// Whether the window bound the sending while this request was out: it was filled by
    /// this send or a later one, or is full now (a burst that fills the window binds every
    /// request in it, not only the last one), and the learned rate did not hold it back.
    fn window_bound(&self, t: &Ticket, in_flight: usize) -> bool {
        !t.paced && (self.filled_at.is_some_and(|s| s >= t.seq) || in_flight >= self.slots())
    }

    fn grow_window(&mut self, t: &Ticket, in_flight: usize) {
        if !self.window_bound(t, in_flight) || self.window >= self.max() {
            return;
        }
        if self.slow_start {
            // One slot per answer: the window doubles every round trip.
            self.window = (self.window + 1.0).min(self.max());
            return;
        }
        let near_loss = self.window_at_loss > 0.0 && (self.window_at_loss - 1.5..self.window_at_loss + 1.0).contains(&self.window);
        let g = if near_loss { CAUTIOUS_GROWTH } else { 1.0 };
        self.window = (self.window + g / self.window).min(self.max());
    }

    fn grow_rate(&mut self, now: Instant, t: &Ticket) {
        let Some(r) = self.rate else { return };
        let dt = (now - self.rate_updated).as_secs_f64().min(1.0);
        self.rate_updated = now;
        if !t.paced {
            // The window or the supply of lines binds, not the rate: once the rate is far
            // above what the window can carry it has nothing left to say.
            if let Some(srtt) = self.srtt {
                if r > 2.0 * self.max() / srtt.max(1e-3) {
                    self.rate = None;
                }
            }
            return;
        }
        // With no overload seen at a known rate yet (the first one came while the window or
        // the lines bound), the limit could be anywhere above: recover at the fast pace.
        let alpha = if self.rate_at_loss == 0.0 {
            RATE_SEARCH
        } else if r < 0.8 * self.rate_at_loss {
            RATE_RECOVER
        } else if r < self.rate_at_loss {
            self.probing_since = None;
            RATE_CAUTIOUS
        } else {
            let since = *self.probing_since.get_or_insert(now);
            (RATE_PROBE * 2f64.powf((now - since).as_secs_f64())).min(1.0)
        };
        let mut grown = r * (1.0 + alpha * dt);
        if let Some(cap) = self.bounds.rate_cap {
            grown = grown.min(cap);
        }
        self.rate = Some(grown);
    }

    fn on_overload(&mut self, now: Instant, t: &Ticket, obs: &Observation, in_flight: usize) {
        let reason = if obs.signal == Signal::RateLimited { PauseReason::RateLimited } else { PauseReason::Overloaded };
        self.counters.count(now, reason);
        self.set_error(now, obs.detail);
        self.overloads.add(now, 1.0);
        // No request left, or too few tokens for this one, explain a 429: pacing by the
        // headers is the cure, not a smaller window or a learned rate.
        let explained = obs.signal == Signal::RateLimited && self.headers_explain(now, t, obs.headers);
        let asked = obs.retry_after.filter(|d| !d.is_zero());
        if let (false, Some(d)) = (explained, asked) {
            self.stray_until = self.stray_until.max(Some(now + d));
            if !self.clustered(now) {
                // Stray: the line waits out its own Retry-After; the pool goes on.
                return;
            }
        }
        if !explained && self.fresh(now, t) {
            let recent = self.last_decrease.is_some_and(|d| now - d < RECENT_OVERLOAD);
            self.epoch += 1;
            self.last_decrease = Some(now);
            self.strikes += 1;
            // A refusal that names its own wait paces the pool by it: it teaches no rate (a
            // rate is for limiters that say nothing), so that waits it asked for and a rate
            // halved on each of them do not compound.
            let says_nothing = asked.is_none();
            if t.paced {
                if says_nothing {
                    self.decrease_rate(now);
                }
            } else if self.window_bound(t, in_flight) && self.window >= 2.0 {
                self.decrease_window(now);
            } else if says_nothing && (self.rate.is_some() || ((self.window < 2.0 || recent) && self.oks.rate(now).is_some_and(|g| g > 0.0))) {
                self.decrease_rate(now);
            }
            // Else an isolated overload while the window had room, or nothing gets through
            // at any pace (that is no rate limit): the pause, doubling, is enough.
        }
        // The headers say to the millisecond when the next request may go; a Retry-After in
        // whole seconds (Anthropic's) would idle the pool and then let a burst go.
        let wait = match obs.retry_after {
            _ if explained => self.header_wait(now, t.raw_tokens * self.token_scale).min(obs.retry_after.unwrap_or(MAX_PAUSE)).max(MIN_PAUSE),
            Some(d) if !d.is_zero() => d,
            _ => self.backoff_pause(),
        };
        // A cluster: the waits the stray ones asked for were the pool's too.
        let clustered = !explained && self.clustered(now);
        let wait = match self.stray_until {
            Some(u) if clustered && u > now => wait.max(u - now),
            _ => wait,
        };
        let detail = match obs.retry_after {
            Some(d) if !explained => format!("{} from upstream; retry-after {}", obs.detail, human(d)),
            _ => format!("{} from upstream; pausing {}", obs.detail, human(wait)),
        };
        self.pause_for(now, wait, reason, detail);
    }

    /// Whether the overloads of the last second are a cluster: the limit is the pool's.
    fn clustered(&mut self, now: Instant) -> bool {
        let (bad, all) = (self.overloads.sum(now), self.answers.sum(now));
        bad >= CLUSTER_MIN && bad >= CLUSTER_SHARE * all
    }

    /// Only an answer to a request sent after the last decrease may decrease again, and not
    /// within half a round trip of it.
    fn fresh(&self, now: Instant, t: &Ticket) -> bool {
        let half_rtt = Duration::from_secs_f64(self.srtt.unwrap_or(0.0) / 2.0);
        t.epoch == self.epoch && self.last_decrease.is_none_or(|d| now - d >= half_rtt)
    }

    fn decrease_window(&mut self, now: Instant) {
        self.window_at_loss = self.window;
        let served = self.little.rate(now).filter(|c| *c > 0.0).unwrap_or(self.window / 2.0 / BETA_WINDOW);
        self.window = (BETA_WINDOW * self.window.min(served)).max(1.0);
        self.slow_start = false;
        tracing::debug!(window = self.window, "upstream overloaded; window decreased");
    }

    fn decrease_rate(&mut self, now: Instant) {
        // From the learned rate when there is one (it binds), else from what got through:
        // the goodput, but no less than half of what was sent.
        let base = match self.rate {
            Some(r) => r,
            None => {
                let sent = self.sends.rate(now).unwrap_or(1.0).max(MIN_RATE);
                self.oks.rate(now).unwrap_or(0.0).max(sent / 2.0).min(sent)
            }
        };
        // Only a learned rate that bound the sending says where the limit is.
        self.rate_at_loss = if self.rate.is_some() { base } else { 0.0 };
        let mut r = (BETA_RATE * base).max(MIN_RATE);
        if let Some(cap) = self.bounds.rate_cap {
            r = r.min(cap);
        }
        self.rate = Some(r);
        self.rate_updated = now;
        self.probing_since = None;
        self.slow_start = false;
        self.next_send = self.next_send.max(now);
        tracing::debug!(rate = r, "upstream rate limited; sending rate learned");
    }

    /// A quarter of a round trip (or one interval of the learned rate), doubled for each
    /// decrease since the last success.
    fn backoff_pause(&self) -> Duration {
        let mut base = Duration::from_secs_f64((self.srtt.unwrap_or(0.02) / 4.0).clamp(0.005, 1.0));
        if let Some(r) = self.rate {
            base = base.max(Duration::from_secs_f64(1.0 / r));
        }
        let doubled = base.saturating_mul(1 << self.strikes.saturating_sub(1).min(16));
        doubled.clamp(MIN_PAUSE, MAX_PAUSE)
    }

    fn on_quota(&mut self, now: Instant, obs: &Observation) {
        self.set_error(now, obs.detail);
        if self.pause(now).is_some_and(|p| p.reason == PauseReason::QuotaExhausted) {
            return; // an answer to a request sent before the pause began
        }
        let wait = obs.retry_after.unwrap_or_else(|| QUOTA_PAUSE.saturating_mul(1 << self.quota_strikes.min(8)).min(MAX_QUOTA_PAUSE));
        self.quota_strikes += 1;
        let detail = format!("{}; trying again in {}", obs.detail, human(wait));
        self.pause_for(now, wait, PauseReason::QuotaExhausted, detail);
    }

    fn on_timeout(&mut self, now: Instant, t: &Ticket, obs: &Observation, in_flight: usize) {
        self.set_error(now, obs.detail);
        if self.window_bound(t, in_flight) && t.epoch == self.epoch {
            self.epoch += 1;
            self.window = (self.window * BETA_TIMEOUT).max(1.0);
            self.last_decrease = Some(now);
            self.slow_start = false;
        }
    }

    fn on_unreachable(&mut self, now: Instant, obs: &Observation) {
        self.set_error(now, obs.detail);
        self.unreachable_strikes += 1;
        if self.unreachable_strikes >= UNREACHABLE_AFTER {
            let k = (self.unreachable_strikes - UNREACHABLE_AFTER).min(5);
            let wait = Duration::from_secs(1 << k).min(MAX_PAUSE);
            let detail = format!("{}; trying again in {}", obs.detail, human(wait));
            self.pause_for(now, wait, PauseReason::Unreachable, detail);
        }
    }

    /// Pauses the pool until `now + wait`, unless it is paused longer already.
    fn pause_for(&mut self, now: Instant, wait: Duration, reason: PauseReason, detail: String) {
        let until = now + wait;
        if self.pause(now).is_some_and(|p| p.until >= until) {
            return;
        }
        self.pause = Some(Pause { until, reason, detail });
    }

    /// Standby: collects a round trip's latencies, then moves the window by the gradient.
    fn standby_sample(&mut self, now: Instant, latency: f64, in_flight: usize) {
        if self.round.samples.len() < 4096 {
            self.round.samples.push(latency);
        }
        let round = self.min_rtt.get().or(self.srtt).unwrap_or(latency);
        if now - self.round.start < Duration::from_secs_f64(round.max(0.01)) {
            return;
        }
        let median = median(&mut self.round.samples);
        self.round = Round { start: now, samples: Vec::new() };
        self.min_rtt.add(now, median);
        let min = self.min_rtt.get().unwrap_or(median);
        let queued = self.queue.is_some_and(|(at, n)| now - at < QUEUE_FRESH && n >= 1.0);
        let used = in_flight as f64 >= self.window / 2.0;
        let calm = median <= STANDBY_TOLERANCE * min;
        if self.slow_start && calm && !queued {
            if used {
                self.window = (self.window * 2.0).min(self.max());
            }
            return;
        }
        self.slow_start = false;
        if calm && used && !queued {
            // Below the knee: take capacity back quickly, a square root of the window a round.
            self.window = (self.window + self.window.sqrt()).min(self.max());
            return;
        }
        let gradient = (STANDBY_TOLERANCE * min / median).clamp(0.5, 1.0);
        let headroom = if used && !queued { 1.0 } else { 0.0 };
        let target = self.window * gradient + headroom;
        self.window = (0.5 * self.window + 0.5 * target).clamp(1.0, self.max());
    }

    /// Standby: the upstream's own count of queued requests (vLLM, SGLang metrics).
    pub fn on_queue(&mut self, now: Instant, waiting: f64) {
        self.queue = Some((now, waiting));
        if self.bounds.mode == UpstreamMode::Standby && waiting >= 1.0 {
            self.slow_start = false;
            self.window = (self.window * BETA_WINDOW).min(self.window - waiting).max(1.0);
        }
    }

    /// Whether a 429's rate-limit headers explain it: no request left, or a token budget
    /// that this request may have found short (fewer tokens left than [`MAX_TOKEN_SCALE`]
    /// estimates). When the header bucket had let the request go, its accounting was short:
    /// batchd's estimate is lower than what the upstream charges (OpenAI counts the prompt
    /// plus `max_tokens` its own way), or others use the same key. The token scale grows
    /// (to at least what the tokens left prove), and the 429 is the headers' to cure, not
    /// the window's.
    fn headers_explain(&mut self, now: Instant, t: &Ticket, h: &RateHeaders) -> bool {
        if h.requests.remaining.is_some_and(|r| r < 1.0) {
            // Nothing was left when this request came, whatever order its answer came back
            // in: the bucket holds at most what refilled since, less what was sent after it.
            let sent_after = (self.seq - t.seq - 1) as f64;
            if let Some(b) = &mut self.header_requests {
                let cur = (b.tokens + (now - b.at).as_secs_f64() * b.per_sec).min(b.capacity);
                (b.tokens, b.at) = (cur.min(-sent_after), now);
            }
            return true;
        }
        let Some(left) = h.tokens.remaining else { return false };
        let raw = t.raw_tokens.max(1.0);
        if left >= raw * MAX_TOKEN_SCALE {
            return false;
        }
        if t.token_gated {
            let proven = if left >= t.est_tokens { (left + 1.0) / raw } else { 1.0 };
            self.token_scale = (self.token_scale * TOKEN_SCALE_UP).max(proven).min(MAX_TOKEN_SCALE);
            tracing::debug!(scale = self.token_scale, "a token budget ran out sooner than estimated");
        }
        true
    }

    /// Until the header buckets can pay for one more request of `tokens`.
    fn header_wait(&self, now: Instant, tokens: f64) -> Duration {
        let at = |b: &Option<HeaderBucket>, n: f64| b.as_ref().map_or(now, |b| b.ready_at(now, n));
        at(&self.header_requests, 1.0).max(at(&self.header_tokens, tokens.max(1.0))) - now
    }

    /// Re-synchronises the header buckets with a newer answer's headers.
    fn sync_headers(&mut self, now: Instant, t: &Ticket, h: &RateHeaders) {
        if self.headers_seq.is_some_and(|s| s >= t.seq) || *h == RateHeaders::default() {
            return;
        }
        self.headers_seq = Some(t.seq);
        self.headers_at = Some(now);
        let sent_after = (self.seq - t.seq - 1) as f64;
        let tokens_after = self.tokens_sent - t.tokens_before - t.est_tokens;
        let share = 1.0 / self.bounds.nodes.max(1) as f64;
        HeaderBucket::sync(&mut self.header_requests, &h.requests, share, sent_after, now);
        HeaderBucket::sync(&mut self.header_tokens, &h.tokens, share, tokens_after, now);
    }
}

/// What an upstream's rate-limit headers allow this node: its share of `remaining` as of the
/// last answer, minus what it sent since, refilled at its share of the rate the headers imply.
#[derive(Debug, Clone)]
struct HeaderBucket {
    tokens: f64,
    capacity: f64,
    per_sec: f64,
    at: Instant,
}

impl HeaderBucket {
    /// Re-synchronises with one answer's `limit`, `remaining` and `reset` (until the limit is
    /// whole again). The limit is per minute; a reset shorter than a per-minute bucket would
    /// need means a smaller bucket refilled at the same pace (a limit enforced per second),
    /// a longer one a slower pace (a limit per day). A full bucket (reset 0) says nothing of
    /// its size: the size learned before stays.
    fn sync(slot: &mut Option<HeaderBucket>, d: &Dimension, share: f64, used_after: f64, now: Instant) {
        let Some(remaining) = d.remaining else { return };
        // Nothing says how it refills: a bucket would never open again once empty.
        let Some(limit) = d.limit else { return };
        let per_minute = limit / 60.0;
        let (per_sec, size) = match d.reset {
            Some(r) if limit > remaining && !r.is_zero() => {
                let per_sec = per_minute.min((limit - remaining) / r.as_secs_f64());
                (per_sec, (remaining + per_sec * r.as_secs_f64()).min(limit))
            }
            _ => (per_minute, slot.as_ref().map_or(limit, |b| b.capacity / share).max(remaining)),
        };
        let capacity = (share * size).max(1.0);
        *slot = Some(HeaderBucket { tokens: share * remaining - used_after, capacity, per_sec: share * per_sec, at: now });
    }

    fn ready_at(&self, now: Instant, n: f64) -> Instant {
        let tokens = (self.tokens + (now - self.at).as_secs_f64() * self.per_sec).min(self.capacity);
        let need = n.min(self.capacity);
        if tokens >= need {
            return now;
        }
        if self.per_sec <= 0.0 {
            return now + MAX_PAUSE;
        }
        now + Duration::from_secs_f64(((need - tokens) / self.per_sec).min(MAX_PAUSE.as_secs_f64()))
    }
}

/// 429s and overloads per second over the last minute, and since start.
pub struct Counters {
    slots: VecDeque<(u64, u32, u32)>,
    start: Instant,
    pub rate_limited_total: u64,
    pub overloaded_total: u64,
}

impl Counters {
    fn new(now: Instant) -> Counters {
        Counters { slots: VecDeque::new(), start: now, rate_limited_total: 0, overloaded_total: 0 }
    }

    fn count(&mut self, now: Instant, reason: PauseReason) {
        let sec = (now - self.start).as_secs();
        if self.slots.back().is_none_or(|s| s.0 != sec) {
            self.slots.push_back((sec, 0, 0));
        }
        while self.slots.front().is_some_and(|s| s.0 + 60 <= sec) {
            self.slots.pop_front();
        }
        let slot = self.slots.back_mut().expect("just pushed");
        if reason == PauseReason::RateLimited {
            slot.1 += 1;
            self.rate_limited_total += 1;
        } else {
            slot.2 += 1;
            self.overloaded_total += 1;
        }
    }

    /// (429s, overloads) in the last 60 seconds.
    pub fn last_minute(&self, now: Instant) -> (u64, u64) {
        let sec = (now - self.start).as_secs();
        let recent = self.slots.iter().filter(|s| s.0 + 60 > sec);
        recent.fold((0, 0), |(a, b), s| (a + s.1 as u64, b + s.2 as u64))
    }
}

/// A sum over a sliding window of two buckets; `rate` is the sum per second.
struct Accumulator {
    bucket: Duration,
    created: Instant,
    start: Instant,
    cur: f64,
    prev: f64,
    seen: bool,
}

impl Accumulator {
    fn new(now: Instant, bucket: Duration) -> Accumulator {
        Accumulator { bucket, created: now, start: now, cur: 0.0, prev: 0.0, seen: false }
    }

    fn roll(&mut self, now: Instant) {
        let elapsed = now - self.start;
        if elapsed >= self.bucket * 2 {
            (self.prev, self.cur, self.start) = (0.0, 0.0, now);
        } else if elapsed >= self.bucket {
            (self.prev, self.cur, self.start) = (self.cur, 0.0, self.start + self.bucket);
        }
    }

    fn add(&mut self, now: Instant, v: f64) {
        self.roll(now);
        self.cur += v;
        self.seen = true;
    }

    /// The sum over the last one to two buckets.
    fn sum(&mut self, now: Instant) -> f64 {
        self.roll(now);
        self.prev + self.cur
    }

    /// Sum per second over the last one to two buckets; `None` before any value.
    fn rate(&mut self, now: Instant) -> Option<f64> {
        self.roll(now);
        let span = (self.bucket + (now - self.start)).min(now - self.created).as_secs_f64().max(0.05);
        self.seen.then(|| (self.prev + self.cur) / span)
    }
}

/// The lowest value of the last 15 to 30 seconds.
struct WindowedMin {
    start: Instant,
    cur: Option<f64>,
    prev: Option<f64>,
}

impl WindowedMin {
    fn new(now: Instant) -> WindowedMin {
        WindowedMin { start: now, cur: None, prev: None }
    }

    fn add(&mut self, now: Instant, v: f64) {
        if now - self.start >= MIN_RTT_BUCKET {
            (self.prev, self.cur, self.start) = (self.cur, None, now);
        }
        self.cur = Some(self.cur.map_or(v, |c| c.min(v)));
    }

    fn get(&self) -> Option<f64> {
        match (self.cur, self.prev) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mid = v.len() / 2;
    *v.select_nth_unstable_by(mid, |a, b| a.total_cmp(b)).1
}

/// `2 s`, `250 ms`, `1.5 s`, `240 s`.
pub fn human(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 0.95 {
        return format!("{} ms", (s * 1000.0).round());
    }
    let tenths = (s * 10.0).round() / 10.0;
    if s < 10.0 && tenths.fract() != 0.0 {
        format!("{tenths:.1} s")
    } else {
        format!("{} s", s.round())
    }
}

#[cfg(test)]
#[path = "control_sim.rs"]
mod sim;
