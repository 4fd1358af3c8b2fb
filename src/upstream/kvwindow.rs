//! A window that follows the inference server (throughput mode, when `metrics_url` answers):
//! a cap on the learned window from the server's own figures, so that it stays full without
//! preempting. A pure function of the samples ([`KvWindow::update`]): no clock, no I/O.
//!
//! - the KV cache is kept below [`KV_POINT`], short of where the server runs out of blocks
//!   and preempts: above it the cap falls to what the running requests would hold at the
//!   point (`running × KV_POINT / usage`);
//! - the preemption counter rising means the point was passed anyway: the cap drops to
//!   [`SHRINK`] × the requests running and that figure is remembered as a ceiling, which the
//!   cap only passes again while the cache shows plenty of room (under [`ROOM`]);
//! - a long waiting queue (more than [`queue_long`] of the running) stops growth, a very long
//!   one (twice that) shrinks the cap by [`SHRINK`]; a short but non-empty queue holds it:
//!   that is the aim, the server full with work ready. A queue beside a cache under
//!   [`NEARLY_EMPTY`] is requests that just arrived, not a full server: it does nothing (at
//!   first contact it held the cap at 4 for a second of a 9-second benchmark);
//! - an empty queue with the cache below the point grows the cap towards the requests the
//!   cache would hold at the point: at most [`MAX_GROWTH`] times per sample while the cache is
//!   nearly empty, twice once it holds something, never while the point has room for less
//!   than one more request (one more would pass it), and only while batchd uses the cap
//!   (nothing is learned from a cap nobody fills).
//!
//! Without the figures (no `metrics_url`, or a page naming neither the KV cache nor the
//! queue) there is no cap: the learned window alone rules, as it did before.

use super::probe::EngineMetrics;

/// Share of the KV cache the window aims to stay under.
pub const KV_POINT: f64 = 0.9;
/// Below this share of the KV cache the cap may pass a remembered ceiling.
pub const ROOM: f64 = 0.6;
/// What the cap is multiplied by after a preemption or under a very long queue.
pub const SHRINK: f64 = 0.8;
/// The cap while a `metrics_url` is configured but has not answered yet.
pub const FIRST_CAP: f64 = 4.0;
/// Most growth per sample: fast while the cache is nearly empty (the learned window's slow
/// start fills the cap within milliseconds), doubling once it holds something (its usage
/// per running request is a noisy figure to project from).
const MAX_GROWTH: f64 = 8.0;
const GROWTH: f64 = 2.0;
/// Below this share of the KV cache the cap may grow [`MAX_GROWTH`] times per sample.
const NEARLY_EMPTY: f64 = 0.1;

/// Why the window is what it is (shown per upstream in `/progress` and `/metrics`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WindowReason {
    /// Slow start: a new upstream's window doubling while full.
    SlowStart,
    /// Learned from the answers (latency, 429s, overloads).
    Learned,
    /// Held by the server's KV cache (its usage or a preemption).
    KvCache,
    /// Held by the server's waiting queue.
    Queue,
}

impl WindowReason {
    pub const ALL: [WindowReason; 4] = [WindowReason::SlowStart, WindowReason::Learned, WindowReason::KvCache, WindowReason::Queue];

    pub fn as_str(self) -> &'static str {
        match self {
            WindowReason::SlowStart => "slow_start",
            WindowReason::Learned => "learned",
            WindowReason::KvCache => "kv_cache",
            WindowReason::Queue => "queue",
        }
    }
}

/// The cap the server's figures put on the window, and why.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cap {
    pub slots: f64,
    pub reason: WindowReason,
}

/// The policy's memory between samples.
#[derive(Debug, Clone, Default)]
pub struct KvWindow {
    cap: Option<f64>,
    /// Where the last preemption came (running requests × [`SHRINK`]).
    ceiling: Option<f64>,
    preemptions: Option<f64>,
}

/// A queue longer than this, for `running` requests running, is long.
pub fn queue_long(running: f64) -> f64 {
    (running / 8.0).max(4.0)
}

impl KvWindow {
    /// The remembered ceiling, if a preemption set one.
    #[cfg(test)]
    pub fn ceiling(&self) -> Option<f64> {
        self.ceiling
    }

    /// The cap before the server's first figures: a new upstream's first window.
    pub fn before_first_sample() -> Cap {
        Cap { slots: FIRST_CAP, reason: WindowReason::KvCache }
    }

    /// Forgets everything (the figures went away): the learned window rules again.
    pub fn reset(&mut self) {
        *self = KvWindow::default();
    }

    /// One sample of the server's figures, with batchd's requests in flight and the most the
    /// window may be: the new cap, or `None` when the sample says nothing about load.
    pub fn update(&mut self, m: &EngineMetrics, in_flight: usize, max: f64) -> Option<Cap> {
        if m.kv_cache_usage.is_none() && m.waiting.is_none() {
            return None;
        }
        let in_flight = in_flight as f64;
        let running = m.running.unwrap_or(in_flight).max(1.0);
        // Before the first sample the cap is the first one (or, figures back after a gap,
        // what was in flight under the learned window).
        let base = self.cap.unwrap_or(in_flight.max(FIRST_CAP));
        let preempted = matches!((self.preemptions, m.preemptions), (Some(a), Some(b)) if b > a);
        if m.preemptions.is_some() {
            self.preemptions = m.preemptions;
        }
        let kv = m.kv_cache_usage.unwrap_or(0.0);
        // A queue beside a nearly empty cache is requests that just arrived (the step under
        // way prefills others), not a full server: it neither holds nor shrinks the cap.
        let waiting = if m.kv_cache_usage.is_some_and(|kv| kv < NEARLY_EMPTY) { 0.0 } else { m.waiting.unwrap_or(0.0) };
        let (slots, reason) = if preempted {
            let c = (SHRINK * base.min(running)).max(1.0);
            self.ceiling = Some(c);
            (c, WindowReason::KvCache)
        } else if kv >= KV_POINT {
            (base.min(running * KV_POINT / kv).max(1.0), WindowReason::KvCache)
        } else if waiting > 2.0 * queue_long(running) {
            ((SHRINK * base).max(1.0), WindowReason::Queue)
        } else if waiting >= 1.0 {
            // Short but not empty is the aim; long (over `queue_long`) stops growth alike.
            (base, WindowReason::Queue)
        } else if in_flight + 1.0 < base {
            (base, WindowReason::KvCache)
        } else {
            self.grow(base, running, kv)
        };
        let slots = slots.min(max).max(1.0);
        self.cap = Some(slots);
        Some(Cap { slots, reason })
    }

    /// Queue empty, cache below the point, the cap in use: towards what the cache holds at
    /// the point (at most [`MAX_GROWTH`] or [`GROWTH`] times the cap), no further than a
    /// remembered ceiling unless the cache has plenty of room.
    fn grow(&self, base: f64, running: f64, kv: f64) -> (f64, WindowReason) {
        if kv <= 0.0 {
            // Nothing in the cache (an idle moment between requests): no figure to project from.
            return (base, WindowReason::KvCache);
        }
        let at_point = running * KV_POINT / kv;
        let growth = if kv < NEARLY_EMPTY { MAX_GROWTH } else { GROWTH };
        let target = at_point.min(base * growth);
        if target < base + 1.0 {
            // Room for less than one more request at the point: one more would pass it.
            return (base, WindowReason::KvCache);
        }
        if let Some(ceiling) = self.ceiling.filter(|_| kv >= ROOM) {
            if target > ceiling {
                return (base.max(ceiling), WindowReason::KvCache);
            }
        }
        (target, WindowReason::KvCache)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(kv: f64, waiting: f64, running: f64, preemptions: f64) -> EngineMetrics {
        EngineMetrics { kv_cache_usage: Some(kv), waiting: Some(waiting), running: Some(running), preemptions: Some(preemptions), prefix_cache_hit_rate: None }
    }

    #[test]
    fn without_load_figures_there_is_no_cap() {
        let mut w = KvWindow::default();
        let only_hits = EngineMetrics { prefix_cache_hit_rate: Some(0.5), preemptions: Some(3.0), ..Default::default() };
        assert_eq!(w.update(&only_hits, 10, 64.0), None);
        assert_eq!(w.update(&EngineMetrics::default(), 10, 64.0), None);
    }

    #[test]
    fn an_empty_queue_and_room_in_the_cache_grow_the_cap_towards_the_point() {
        let mut w = KvWindow::default();
        // 4 running use 5 % of the cache: 72 would fill it to the point; at most 8 times.
        let c = w.update(&m(0.05, 0.0, 4.0, 0.0), 4, 256.0).unwrap();
        assert_eq!((c.slots, c.reason), (32.0, WindowReason::KvCache));
        let c = w.update(&m(0.02, 0.0, 2.0, 0.0), 32, 1000.0).unwrap();
        assert_eq!(c.slots, 90.0, "a nearly empty cache: up to 8 times, here to the point");
        let c = w.update(&m(0.0, 0.0, 0.0, 0.0), 90, 1000.0).unwrap();
        assert_eq!(c.slots, 90.0, "an idle moment (nothing in the cache) says nothing: hold");
        let mut w = KvWindow::default();
        let c = w.update(&m(0.1, 0.0, 4.0, 0.0), 4, 256.0).unwrap();
        assert_eq!(c.slots, 8.0, "10 % of the cache in use: twice");
        w.update(&m(0.2, 0.0, 8.0, 0.0), 8, 256.0);
        w.update(&m(0.4, 0.0, 16.0, 0.0), 16, 256.0);
        let c = w.update(&m(0.8, 0.0, 32.0, 0.0), 32, 256.0).unwrap();
        assert_eq!(c.slots, 36.0, "no further than the point: 32 × 0.9 / 0.8");
        let c = w.update(&m(0.1, 0.0, 4.0, 0.0), 4, 256.0).unwrap();
        assert_eq!(c.slots, 36.0, "a cap nobody fills does not grow");
        let c = w.update(&m(0.1, 0.0, 36.0, 0.0), 36, 40.0).unwrap();
        assert_eq!(c.slots, 40.0, "never above the configured most");
    }

    #[test]
    fn a_preemption_shrinks_the_cap_and_remembers_the_ceiling() {
        let mut w = KvWindow::default();
        let c = w.update(&m(0.5, 0.0, 50.0, 7.0), 50, 256.0).unwrap();
        assert_eq!(c.slots, 90.0, "the counter as found is no preemption");
        let c = w.update(&m(0.85, 0.0, 90.0, 9.0), 90, 256.0).unwrap();
        assert_eq!((c.slots, c.reason), (72.0, WindowReason::KvCache), "0.8 × 90 running");
        assert_eq!(w.ceiling(), Some(72.0));
        let c = w.update(&m(0.7, 0.0, 72.0, 9.0), 72, 256.0).unwrap();
        assert_eq!(c.slots, 72.0, "the cache says room for 92, the ceiling holds at 72");
        let c = w.update(&m(0.3, 0.0, 72.0, 9.0), 72, 256.0).unwrap();
        assert!(c.slots > 72.0, "plenty of room: past the ceiling ({})", c.slots);
    }

    #[test]
    fn a_cache_above_the_point_cuts_the_cap_to_what_fits() {
        let mut w = KvWindow::default();
        let c = w.update(&m(0.99, 0.0, 100.0, 0.0), 100, 256.0).unwrap();
        assert!((c.slots - 100.0 * 0.9 / 0.99).abs() < 1e-9, "{}", c.slots);
        assert_eq!(c.reason, WindowReason::KvCache);
    }

    #[test]
    fn a_queue_beside_a_nearly_empty_cache_is_no_reason_to_hold() {
        let mut w = KvWindow::default();
        let c = w.update(&m(0.02, 3.0, 1.0, 0.0), 4, 256.0).unwrap();
        assert_eq!((c.slots, c.reason), (32.0, WindowReason::KvCache), "3 just arrived beside 1 running, 2 % of the cache: grow");
    }

    #[test]
    fn the_queue_holds_short_and_shrinks_long() {
        let mut w = KvWindow::default();
        w.update(&m(0.5, 0.0, 64.0, 0.0), 64, 256.0);
        let base = w.update(&m(0.5, 0.0, 64.0, 0.0), 64, 256.0).unwrap().slots;
        let c = w.update(&m(0.5, 2.0, 64.0, 0.0), base as usize, 256.0).unwrap();
        assert_eq!((c.slots, c.reason), (base, WindowReason::Queue), "short but not empty: hold");
        let c = w.update(&m(0.5, 12.0, 64.0, 0.0), base as usize, 256.0).unwrap();
        assert_eq!((c.slots, c.reason), (base, WindowReason::Queue), "long: no growth");
        let c = w.update(&m(0.5, 40.0, 64.0, 0.0), base as usize, 256.0).unwrap();
        assert_eq!(c.slots, SHRINK * base, "very long: shrink");
    }
}
