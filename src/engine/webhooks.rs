//! Webhook deliveries: when a batch ends, its tenant's endpoint gets the event OpenAI sends,
//! signed by the Standard Webhooks scheme, at least once.
//!
//! The store queues a delivery in the transaction that makes a batch final; this task takes
//! the due ones (`Outbox::due_deliveries` claims them for this node, so two nodes never send
//! the same attempt), POSTs each, and records every attempt with when to try again: after a
//! non-2xx answer or no answer within [`ATTEMPT_TIMEOUT`], on the schedule [`RETRY_AFTER`]
//! (about 31 hours in all, jittered), then it gives up. State lives in the store, so a restart
//! goes on where the last process stopped.
//!
//! Each receiver (webhook URL) has its own lane: the deliveries claimed for it wait their turn
//! there, at most [`LANE_CONCURRENCY`] in flight at once, while every other receiver's go
//! on, so one that hangs (each attempt waits [`ATTEMPT_TIMEOUT`]) delays only its own. A
//! delivery whose claim would lapse before its attempt could end is left for a later claim
//! instead of sent (no other node may send it meanwhile); at most [`MAX_HELD`] deliveries
//! are claimed and not yet attempted on this node at once.
//!
//! Deliveries go only where configured: a redirect is not followed (a receiver answering
//! `307 Location: http://internal/…` must not make batchd POST a signed event there); a
//! 3xx is a failed attempt like any non-2xx, tried again on the schedule.
//!
//! `webhook-id` is the event's `evt_…` id, the same on every redelivery (receivers dedupe on
//! it); `webhook-timestamp` is the attempt's time; `webhook-signature` is
//! `v1,` + base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}")), exactly what the official
//! SDK's `client.webhooks.unwrap(payload, headers, secret=…)` verifies. Keys are never logged.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::json;
use tokio::sync::Semaphore;

use super::Inner;
use crate::config::Webhook;
use crate::store::{Delivery, DeliveryAttempt, Event};

pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// A claim outlives one attempt, so no other node takes a delivery in progress.
const CLAIM: Duration = Duration::from_secs(30);
/// The latest an attempt may start after its claim: it ends (at [`ATTEMPT_TIMEOUT`]) with a
/// margin before the claim lapses.
const FRESH: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_secs(1);
const PER_ROUND: u32 = 32;
/// Attempts in flight to one receiver at most.
pub const LANE_CONCURRENCY: usize = 4;
/// Deliveries claimed by this node and not yet attempted, at most.
pub const MAX_HELD: usize = 256;
/// Waits after the 1st, 2nd, … failed attempt; after the last one the delivery is given up.
pub const RETRY_AFTER: [u64; 12] = [1, 5, 30, 120, 300, 1_800, 3_600, 7_200, 14_400, 28_800, 28_800, 28_800];

/// The deliverer task.
pub async fn deliver(inner: Arc<Inner>) {
    let built = reqwest::Client::builder().timeout(ATTEMPT_TIMEOUT).redirect(reqwest::redirect::Policy::none()).user_agent("batchd-webhooks").build();
    let http = match built {
        Ok(c) => c,
        Err(e) => return tracing::error!(error = %e, "cannot build the webhook HTTP client; webhooks are not delivered"),
    };
    let lanes = Arc::new(Lanes::default());
    let mut tick = inner.live.subscribe();
    while !inner.soft_stop.is_cancelled() {
        let room = MAX_HELD.saturating_sub(lanes.held());
        if room > 0 {
            match inner.store.due_deliveries(&inner.node, PER_ROUND.min(room as u32), CLAIM).await {
                Ok(due) => due.into_iter().for_each(|d| lanes.hand(&inner, &http, d)),
                Err(e) => tracing::debug!(error = %crate::Chain(&e), "cannot read due webhook deliveries"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = tick.changed() => {}
            _ = inner.soft_stop.cancelled() => return,
        }
    }
}

/// Each receiver's lane, and the deliveries this node has claimed and not yet attempted.
#[derive(Default)]
struct Lanes {
    /// Receiver URL → its turns.
    lanes: std::sync::Mutex<HashMap<String, Arc<Semaphore>>>,
    /// Event id → when this node last claimed it.
    held: std::sync::Mutex<HashMap<i64, Instant>>,
}

impl Lanes {
    fn held(&self) -> usize {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Queues a claimed delivery in its receiver's lane. One still queued from an earlier
    /// claim (that lapsed while it waited) only has its claim renewed.
    fn hand(self: &Arc<Self>, inner: &Arc<Inner>, http: &reqwest::Client, d: Delivery) {
        if self.held.lock().unwrap_or_else(|p| p.into_inner()).insert(d.event.id, Instant::now()).is_some() {
            return;
        }
        let receiver = inner.cfg.webhook_for(&d.event.tenant).map_or_else(String::new, |h| h.url.clone());
        let lane = self.lanes.lock().unwrap_or_else(|p| p.into_inner()).entry(receiver).or_insert_with(|| Arc::new(Semaphore::new(LANE_CONCURRENCY))).clone();
        let (lanes, inner, http, id) = (self.clone(), inner.clone(), http.clone(), d.event.id);
        inner.tasks.clone().spawn(async move {
            // Waiting for a turn ends with the engine; an attempt under way is finished.
            let turn = tokio::select! {
                t = lane.acquire_owned() => t.ok(),
                _ = inner.soft_stop.cancelled() => None,
            };
            let claimed = lanes.held.lock().unwrap_or_else(|p| p.into_inner()).get(&id).copied();
            match turn {
                Some(_turn) if claimed.is_some_and(|at| at.elapsed() <= FRESH) => attempt(&inner, &http, d).await,
                _ => tracing::debug!(event = id, "a webhook delivery was not attempted before its claim lapsed; it is left for the next claim"),
            }
            lanes.held.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        });
    }
}

/// The event's JSON as OpenAI sends it: `batch.completed|failed|expired|cancelled`.
pub fn payload(e: &Event) -> String {
    let status = serde_json::from_str::<serde_json::Value>(&e.data).ok().and_then(|v| v["status"].as_str().map(str::to_owned)).unwrap_or_default();
    json!({
        "id": crate::ids::event_id(&e.batch_id, e.id),
        "object": "event",
        "type": format!("batch.{status}"),
        "created_at": e.created_at,
        "data": {"id": e.batch_id},
    })
    .to_string()
}

/// `v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`.
pub fn signature(hook: &Webhook, id: &str, timestamp: i64, body: &str) -> String {
    let key_bytes = base64::engine::general_purpose::STANDARD.decode(hook.key.expose()).unwrap_or_default();
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key_bytes);
    let tag = ring::hmac::sign(&key, format!("{id}.{timestamp}.{body}").as_bytes());
    format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(tag.as_ref()))
}

/// When to try again after `attempts` failed attempts (`None`: give up).
fn retry_at_ms(attempts: i64) -> Option<i64> {
    let wait = *RETRY_AFTER.get(usize::try_from(attempts).ok()?.checked_sub(1)?)?;
    let jitter = rand::random_range(0.9..1.1);
    Some((crate::now_unix_f64() * 1000.0) as i64 + (wait as f64 * 1000.0 * jitter) as i64)
}

/// Makes one attempt and records it.
async fn attempt(inner: &Inner, http: &reqwest::Client, d: Delivery) {
    let now = crate::now_unix();
    let Some(hook) = inner.cfg.webhook_for(&d.event.tenant) else {
        let a = DeliveryAttempt {
            event_id: d.event.id,
            status: None,
            error: Some("no webhook is configured for the tenant".into()),
            duration_ms: 0,
            at: now,
            retry_at_ms: None,
            delivered: false,
        };
        return record(inner, &a, "no_webhook").await;
    };
    let id = crate::ids::event_id(&d.event.batch_id, d.event.id);
    let body = payload(&d.event);
    let started = Instant::now();
    let sent = http
        .post(&hook.url)
        .header("content-type", "application/json")
        .header("webhook-id", &id)
        .header("webhook-timestamp", now.to_string())
        .header("webhook-signature", signature(hook, &id, now, &body))
        .body(body)
        .send()
        .await;
    let (status, error) = match sent {
        Ok(r) if r.status().is_success() => (Some(r.status().as_u16()), None),
        Ok(r) => (Some(r.status().as_u16()), Some(format!("the receiver answered {}", r.status()))),
        Err(e) if e.is_timeout() => (None, Some(format!("no answer within {} s", ATTEMPT_TIMEOUT.as_secs()))),
        Err(e) => (None, Some(describe(&e))),
    };
    let delivered = error.is_none();
    let retry_at_ms = if delivered { None } else { retry_at_ms(d.attempts + 1) };
    let outcome = match (delivered, retry_at_ms) {
        (true, _) => "delivered",
        (false, Some(_)) => "retrying",
        (false, None) => "given_up",
    };
    match &error {
        Some(e) if retry_at_ms.is_none() => {
            tracing::warn!(event = %id, batch = %d.event.batch_id, error = %e, attempts = d.attempts + 1, "webhook delivery given up")
        }
        Some(e) => tracing::info!(event = %id, batch = %d.event.batch_id, error = %e, attempt = d.attempts + 1, "webhook delivery failed; will retry"),
        None => tracing::info!(event = %id, batch = %d.event.batch_id, attempt = d.attempts + 1, "webhook delivered"),
    }
    let a = DeliveryAttempt { event_id: d.event.id, status, error, duration_ms: started.elapsed().as_millis() as i64, at: now, retry_at_ms, delivered };
    record(inner, &a, outcome).await;
}

/// A transport error with its causes ("error sending request: … connection refused").
fn describe(e: &reqwest::Error) -> String {
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        out = format!("{out}: {s}");
        source = s.source();
    }
    out
}

async fn record(inner: &Inner, a: &DeliveryAttempt, outcome: &'static str) {
    inner.live.metrics.webhook_attempt(outcome);
    if let Err(e) = inner.store.record_delivery(a).await {
        // The claim lapses and the delivery is made again: at least once.
        tracing::warn!(error = %crate::Chain(&e), event = a.event_id, "cannot record a webhook attempt; it will be made again");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    #[test]
    fn signature_matches_the_standard_webhooks_example() {
        // The Standard Webhooks specification's test vector.
        let key =
            base64::engine::general_purpose::STANDARD.encode(base64::engine::general_purpose::STANDARD.decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap());
        let hook = Webhook { url: "http://x".into(), key: Secret::new(key), secret: Secret::new("whsec_test") };
        let body = r#"{"test": 2432232314}"#;
        assert_eq!(signature(&hook, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body), "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn retries_span_more_than_a_day_then_stop() {
        let total: u64 = RETRY_AFTER.iter().sum();
        assert!(total > 86_400, "{total} s");
        assert!(retry_at_ms(1).is_some() && retry_at_ms(RETRY_AFTER.len() as i64).is_some());
        assert!(retry_at_ms(RETRY_AFTER.len() as i64 + 1).is_none(), "given up after the last wait");
    }

    #[test]
    fn payload_is_the_openai_event() {
        let e = Event {
            id: 7,
            tenant: "t".into(),
            batch_id: "batch_x".into(),
            kind: "batch.status".into(),
            data: r#"{"status":"completed"}"#.into(),
            created_at: 123,
        };
        let v: serde_json::Value = serde_json::from_str(&payload(&e)).unwrap();
        assert_eq!(v["type"], "batch.completed");
        assert_eq!(v["object"], "event");
        assert_eq!(v["data"]["id"], "batch_x");
        assert_eq!(v["id"], crate::ids::event_id("batch_x", 7));
    }
}
