//! One line's journey upstream: attempts with back-off, and the result record it ends in.
//!
//! Retryable outcomes (connect errors, timeouts, 408/409/429/5xx) are tried again on the pool
//! with the most free capacity (another pool than the one that failed, when there is one);
//! the concurrency slot is given back while waiting, after the pool's limiter has learned
//! from the outcome. A 429 that says "slow down", a 503, a 529 / `overloaded_error`, and
//! `insufficient_quota` cost the line no attempt: it waits out its own `Retry-After` (a
//! stray refusal is the line's alone) and then any pause of the upstream (the pool's, when
//! the refusals are), bounded by the batch's expiry; other failures use one of
//! `max_attempts`, after full-jitter exponential back-off never sooner than the upstream's
//! `Retry-After`. Other answers are final.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{count, Inner};
use crate::store::{BatchId, ResultRecord, Usage};
use crate::upstream::{Answer, Outcome, Permit, Pool, Route};

const BACKOFF_BASE: Duration = Duration::from_millis(500);
const BACKOFF_CAP: Duration = Duration::from_secs(60);
const SLOW_DOWN_JITTER_MS: u64 = 100;

/// A line ready to send.
pub struct Prepared {
    pub batch_id: BatchId,
    pub line: u64,
    pub unit_idx: i64,
    /// The lease epoch of the unit the line was fed under.
    pub epoch: Option<i64>,
    pub custom_id: String,
    pub request_id: String,
    /// The request body as the user wrote it.
    pub body: Bytes,
    pub model: String,
    pub path: Arc<str>,
    pub est_tokens: u64,
}

/// Runs every attempt of one line, starting with a slot already taken on `pool`; `None` when
/// the batch is cancelled while the line waits for another attempt (the line then ends as
/// `batch_cancelled`; a call on the wire is never cut here), or when its unit's lease is
/// found gone before a call is sent (another node runs the line).
pub async fn run_line(
    inner: &Inner,
    p: &Prepared,
    route: &Route,
    mut pool: Arc<Pool>,
    mut target: Arc<str>,
    mut permit: Permit,
    cancelled: &CancellationToken,
) -> Option<ResultRecord> {
    let max_attempts = pool.cfg.max_attempts;
    let mut attempt = 1;
    loop {
        let out = match pool.outgoing(&p.path, &p.body, &p.model, &target) {
            Ok(out) => out,
            Err(refused) => return Some(refused_record(p, &pool, &refused)),
        };
        if !lease_holds(inner, p, cancelled).await {
            tracing::debug!(batch = %p.batch_id, unit = p.unit_idx, line = p.line, "the unit's lease is gone; the call is dropped unsent");
            return None;
        }
        while !permit.current() {
            // Taken before this node's claim lapsed (it was frozen): the slot may be another
            // node's by now.
            drop(permit);
            (pool, target, permit) = tokio::select! {
                got = route.acquire(p.est_tokens, None) => got,
                _ = cancelled.cancelled() => return None,
            };
        }
        count(&inner.stats.sent, 1);
        let sent_at = std::time::Instant::now();
        let span = tracing::debug_span!("attempt", n = attempt, upstream = %pool.cfg.name, model = %target);
        let outcome = pool.send(out.path, out.body.clone(), &p.request_id).instrument(span).await;
        let outcome = pool.incoming(&out, outcome, &p.request_id);
        inner.live.metrics.upstream_call(&pool.cfg.name, &outcome, sent_at.elapsed());
        let signal = pool.settle(permit, &outcome);
        // "Slow down" and "out of quota" are the upstream's state, not the line's fault:
        // they cost no attempt (the batch's expiry bounds them); the line waits what the
        // upstream asked of it, and the pool's pause (if the pool paused) spaces the next try.
        let burns = signal.burns_attempt();
        if !outcome.is_retryable() || (burns && attempt >= max_attempts) {
            return Some(record(p, &pool, outcome, inner));
        }
        let wait = if burns { backoff(attempt, outcome.retry_after()) } else { outcome.retry_after().unwrap_or_default() + slow_down_jitter() };
        tracing::debug!(line = p.line, attempt, upstream = %pool.cfg.name, ?signal, wait_ms = wait.as_millis() as u64, "retrying");
        count(&inner.stats.retries_total, 1);
        inner.live.metrics.retry(&pool.cfg.name);
        let again = async {
            let _waiting = Waiting::new(&inner.stats.retries_waiting);
            let _retrying = inner.book.retrying(&p.batch_id);
            tokio::time::sleep(wait).await;
            inner.health.writable().await;
            route.acquire(p.est_tokens, Some(&pool.cfg.name)).await
        };
        (pool, target, permit) = tokio::select! {
            got = again => got,
            _ = cancelled.cancelled() => return None,
        };
        if burns {
            attempt += 1;
        }
    }
}

/// Whether the lease of the unit `p` was fed under still holds (see `leases`); a line
/// outside any lease, or on a store no other node shares, needs none.
async fn lease_holds(inner: &Inner, p: &Prepared, cancelled: &CancellationToken) -> bool {
    if p.epoch.is_none() || inner.exclusive {
        return true;
    }
    let key = crate::store::UnitKey { batch_id: p.batch_id.clone(), idx: p.unit_idx };
    inner.leases.hold(&key, cancelled).await
}

/// A line told to slow down waits for its pool's pause (in `acquire`), plus up to this much
/// so that the lines of one pause do not all come back in the same instant.
fn slow_down_jitter() -> Duration {
    Duration::from_millis(rand::random_range(0..=SLOW_DOWN_JITTER_MS))
}

/// Counts one retry waiting for its back-off, for as long as it lives (an aborted line
/// drops it mid-sleep).
struct Waiting<'a>(&'a std::sync::atomic::AtomicU64);

impl<'a> Waiting<'a> {
    fn new(gauge: &'a std::sync::atomic::AtomicU64) -> Self {
        count(gauge, 1);
        Waiting(gauge)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Full-jitter exponential back-off, but never sooner than the upstream asked.
pub fn backoff(attempt: u32, retry_after: Option<Duration>) -> Duration {
    let ceiling = BACKOFF_BASE.saturating_mul(1 << attempt.min(16).saturating_sub(1)).min(BACKOFF_CAP);
    let jitter = Duration::from_secs_f64(rand::random_range(0.0..=ceiling.as_secs_f64()));
    retry_after.map_or(jitter, |r| r.max(jitter.min(r + BACKOFF_BASE)))
}

/// A usage number read leniently: an integer, a float (truncated), a string of digits; a
/// null, a missing key or anything else reads as 0. Clamped to `[0, i64::MAX]`, so a buggy or
/// hostile upstream can never make a stored sum overflow or go negative.
fn count_of(v: Option<&Value>) -> i64 {
    let clamp = |f: f64| if f.is_nan() { 0 } else { f.clamp(0.0, i64::MAX as f64) as i64 };
    match v {
        Some(Value::Number(n)) => {
            n.as_i64().map(|i| i.max(0)).or_else(|| n.as_u64().map(|u| u.min(i64::MAX as u64) as i64)).unwrap_or_else(|| clamp(n.as_f64().unwrap_or(0.0)))
        }
        Some(Value::String(s)) => s.trim().parse::<f64>().map(clamp).unwrap_or(0),
        _ => 0,
    }
}

/// The upstream's `usage`, in any of the shapes OpenAI-compatible servers report (chat and
/// completions: `prompt_tokens`/`completion_tokens`; responses: `input_tokens`/
/// `output_tokens`; embeddings: `prompt_tokens` only) and Anthropic's Messages (whose
/// `input_tokens` leave out `cache_read_input_tokens` and `cache_creation_input_tokens`,
/// added back here; LiteLLM's chat usage carries those too, already within `prompt_tokens`),
/// read leniently (see [`count_of`]).
pub fn usage_of(usage: &Value) -> Usage {
    let get = |k: &str| count_of(usage.get(k));
    let detail = |outer: &[&str], k: &str| outer.iter().map(|o| count_of(usage.get(*o).and_then(|d| d.get(k)))).max().unwrap_or(0);
    let apart = |k: &str| if usage.get("prompt_tokens").is_none() { get(k) } else { 0 };
    let (cache_read, cache_written) = (apart("cache_read_input_tokens"), apart("cache_creation_input_tokens"));
    let input = get("prompt_tokens").max(get("input_tokens")).saturating_add(cache_read).saturating_add(cache_written);
    let output = get("completion_tokens").max(get("output_tokens"));
    Usage {
        input_tokens: input,
        cached_tokens: detail(&["prompt_tokens_details", "input_tokens_details"], "cached_tokens").max(cache_read),
        output_tokens: output,
        reasoning_tokens: detail(&["completion_tokens_details", "output_tokens_details"], "reasoning_tokens"),
        total_tokens: get("total_tokens").max(input.saturating_add(output)),
    }
}

#[derive(Deserialize)]
struct WithUsage<'a> {
    /// Kept as text: read as a [`Value`] by [`usage_value`], which never fails.
    #[serde(default, borrow)]
    usage: Option<&'a serde_json::value::RawValue>,
}

/// `usage` as a JSON value. serde_json refuses a number beyond f64 (`1e999`); such a number
/// becomes its text instead, which [`count_of`] reads as the largest count, so an answer the
/// upstream was paid for is never turned into an error by its usage.
fn usage_value(raw: &serde_json::value::RawValue) -> Value {
    if let Ok(v) = serde_json::from_str(raw.get()) {
        return v;
    }
    match serde_json::from_str::<std::collections::BTreeMap<String, &serde_json::value::RawValue>>(raw.get()) {
        Ok(fields) => Value::Object(fields.into_iter().map(|(k, v)| (k, usage_value(v))).collect()),
        Err(_) => Value::String(raw.get().to_string()),
    }
}

/// An upstream body checked in one pass: a JSON object (as every OpenAI answer is), made
/// fit for one JSONL line without re-serializing it, with its usage; `None` when it is not a
/// JSON object. Raw `\n`/`\r` bytes can only be whitespace between tokens in valid JSON (inside
/// strings they are escaped), so turning them into spaces is the only change: every other
/// byte of the upstream's answer is kept as it came.
pub fn parse_body(body: &[u8]) -> Option<(std::borrow::Cow<'_, str>, Usage)> {
    let text = std::str::from_utf8(body).ok()?.trim();
    if !text.starts_with('{') {
        return None;
    }
    let head: WithUsage = serde_json::from_str(text).ok()?;
    let usage = head.usage.map(|raw| usage_of(&usage_value(raw))).unwrap_or_default();
    if memchr::memchr2(b'\n', b'\r', text.as_bytes()).is_none() {
        return Some((text.into(), usage));
    }
    Some((text.replace(['\n', '\r'], " ").into(), usage))
}

fn record(p: &Prepared, pool: &Pool, outcome: Outcome, inner: &Inner) -> ResultRecord {
    match outcome {
        Outcome::Answer(a) => answer_record(p, pool, a, inner),
        Outcome::Transport(e) => error_record(p, e.code(), e.message()),
    }
}

fn push_str(out: &mut String, s: &str) {
    out.push_str(&serde_json::to_string(s).expect("a string serializes"));
}

/// `{"id","custom_id","response":{"status_code","request_id","body"},"error":null}`, with the
/// body copied verbatim (it was checked by `parse_body`).
fn answer_line(p: &Prepared, status: u16, request_id: &str, body: &str) -> String {
    let mut out = String::with_capacity(body.len() + p.custom_id.len() + 160);
    out.push_str("{\"id\":");
    push_str(&mut out, &p.request_id);
    out.push_str(",\"custom_id\":");
    push_str(&mut out, &p.custom_id);
    out.push_str(&format!(",\"response\":{{\"status_code\":{status},\"request_id\":"));
    push_str(&mut out, request_id);
    out.push_str(",\"body\":");
    out.push_str(body);
    out.push_str("},\"error\":null}");
    out
}

fn answer_record(p: &Prepared, pool: &Pool, a: Answer, inner: &Inner) -> ResultRecord {
    let record = record_of_answer(p, a.status, a.request_id.as_deref(), &a.body);
    pool.limiter.settle_tokens(p.est_tokens, record.usage.total_tokens.max(0) as u64);
    count(&inner.stats.output_tokens, record.usage.output_tokens.max(0) as u64);
    record
}

/// The record of an answer to line `p`: the output line when its body is JSON (a 2xx is a
/// success), else the error line of its text. Online answers and those a remote batch brought
/// back (see `engine::remote`) are recorded alike.
pub fn record_of_answer(p: &Prepared, status: u16, request_id: Option<&str>, body: &[u8]) -> ResultRecord {
    let request_id = request_id.unwrap_or(&p.request_id);
    let (ok, record, usage) = match parse_body(body) {
        Some((text, usage)) => ((200..300).contains(&status), answer_line(p, status, request_id, &text), usage),
        None => (false, answer_line(p, status, request_id, &non_json_error_body(status, body)), Usage::default()),
    };
    ResultRecord {
        batch_id: p.batch_id.clone(),
        line: p.line,
        unit_idx: p.unit_idx,
        custom_id: p.custom_id.clone(),
        ok,
        record,
        usage,
        model: p.model.clone(),
        epoch: p.epoch,
    }
}

/// The error body recorded for an answer that is not JSON (nginx's HTML 502 or 413 page, a
/// proxy's plain text): OpenAI's error envelope with code `upstream_error` and a short
/// excerpt of the text, its HTML tags dropped.
pub fn non_json_error_body(status: u16, body: &[u8]) -> String {
    const EXCERPT_CHARS: usize = 200;
    let text = String::from_utf8_lossy(body);
    let mut plain = String::with_capacity(text.len().min(4096));
    let mut in_tag = false;
    for c in text.chars().take(64 << 10) {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => {
                in_tag = false;
                plain.push(' ');
            }
            _ if !in_tag => plain.push(c),
            _ => {}
        }
    }
    let words: Vec<&str> = plain.split_whitespace().collect();
    let mut excerpt: String = words.join(" ").chars().take(EXCERPT_CHARS).collect();
    if excerpt.chars().count() == EXCERPT_CHARS {
        excerpt.push('…');
    }
    let message = if excerpt.is_empty() {
        format!("upstream answered {status} with an empty body")
    } else {
        format!("upstream answered {status} with a body that is not JSON: {excerpt}")
    };
    serde_json::json!({"error": {"message": message, "type": "upstream_error", "param": null, "code": "upstream_error"}}).to_string()
}

/// A line its pool cannot be sent (it cannot be said in the pool's API): no HTTP answer.
fn refused_record(p: &Prepared, pool: &Pool, refused: &crate::upstream::translate::Refused) -> ResultRecord {
    let message =
        format!("{}: /v1{} cannot be sent to upstream {:?}, which speaks {}: {}", refused.param, p.path, pool.cfg.name, pool.cfg.api.words(), refused.reason);
    error_record(p, refused.code(), &message)
}

/// A line with no HTTP answer: transport failure, or a batch that ended before it ran.
pub fn error_record(p: &Prepared, code: &str, message: &str) -> ResultRecord {
    let line = serde_json::json!({
        "id": p.request_id,
        "custom_id": p.custom_id,
        "response": null,
        "error": {"code": code, "message": message},
    });
    ResultRecord {
        batch_id: p.batch_id.clone(),
        line: p.line,
        unit_idx: p.unit_idx,
        custom_id: p.custom_id.clone(),
        ok: false,
        record: line.to_string(),
        usage: Usage::default(),
        model: p.model.clone(),
        epoch: p.epoch,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_honours_retry_after() {
        for _ in 0..100 {
            assert!(backoff(1, None) <= Duration::from_millis(500));
            assert!(backoff(4, None) <= Duration::from_secs(4));
            assert!(backoff(30, None) <= BACKOFF_CAP);
            let b = backoff(1, Some(Duration::from_secs(3)));
            assert!(b >= Duration::from_secs(3) && b <= Duration::from_millis(3500));
        }
    }

    #[test]
    fn non_json_error_pages_get_a_code_and_an_excerpt() {
        let nginx = b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx/1.27.0</center>\r\n</body>\r\n</html>\r\n";
        let v: serde_json::Value = serde_json::from_str(&non_json_error_body(502, nginx)).unwrap();
        assert_eq!(v["error"]["code"], "upstream_error");
        assert_eq!(v["error"]["type"], "upstream_error");
        assert_eq!(v["error"]["message"], "upstream answered 502 with a body that is not JSON: 502 Bad Gateway 502 Bad Gateway nginx/1.27.0");
        let v: serde_json::Value = serde_json::from_str(&non_json_error_body(413, "x".repeat(5000).as_bytes())).unwrap();
        assert!(v["error"]["message"].as_str().unwrap().chars().count() < 300, "a short excerpt");
        let v: serde_json::Value = serde_json::from_str(&non_json_error_body(502, b"  ")).unwrap();
        assert_eq!(v["error"]["message"], "upstream answered 502 with an empty body");
    }

    fn usage_in(body: &str) -> Usage {
        parse_body(body.as_bytes()).unwrap().1
    }

    #[test]
    fn usage_shapes() {
        let chat = r#"{"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7,"prompt_tokens_details":{"cached_tokens":1}}}"#;
        assert_eq!(usage_in(chat), Usage { input_tokens: 3, cached_tokens: 1, output_tokens: 4, reasoning_tokens: 0, total_tokens: 7 });
        let resp = r#"{"usage":{"input_tokens":5,"output_tokens":2,"total_tokens":7,"output_tokens_details":{"reasoning_tokens":1}}}"#;
        assert_eq!(usage_in(resp).reasoning_tokens, 1);
        assert_eq!(usage_in(r#"{"usage":{"prompt_tokens":9,"total_tokens":9}}"#).total_tokens, 9);
        assert_eq!(usage_in(r#"{"id":"x"}"#), Usage::default());
        let message = r#"{"usage":{"input_tokens":20,"output_tokens":31,"cache_creation_input_tokens":100,"cache_read_input_tokens":400}}"#;
        assert_eq!(usage_in(message), Usage { input_tokens: 520, cached_tokens: 400, output_tokens: 31, reasoning_tokens: 0, total_tokens: 551 }, "Anthropic");
        let litellm = r#"{"usage":{"prompt_tokens":520,"completion_tokens":31,"prompt_tokens_details":{"cached_tokens":400},"cache_read_input_tokens":400}}"#;
        assert_eq!(usage_in(litellm).input_tokens, 520, "LiteLLM's copy of the cache counts is within prompt_tokens");
    }

    #[test]
    fn usage_is_read_leniently_and_clamped() {
        let nulls = r#"{"usage":{"prompt_tokens":3,"completion_tokens":null,"total_tokens":null,"completion_tokens_details":{"reasoning_tokens":null}}}"#;
        assert_eq!(usage_in(nulls), Usage { input_tokens: 3, total_tokens: 3, ..Default::default() });
        let odd = r#"{"usage":{"prompt_tokens":"12","completion_tokens":4.9,"total_tokens":"lots","prompt_tokens_details":null}}"#;
        assert_eq!(usage_in(odd), Usage { input_tokens: 12, output_tokens: 4, total_tokens: 16, ..Default::default() });
        let hostile = r#"{"usage":{"prompt_tokens":9223372036854775807,"completion_tokens":18446744073709551615,"total_tokens":-5,"prompt_tokens_details":{"cached_tokens":1e300}}}"#;
        let u = usage_in(hostile);
        assert_eq!((u.input_tokens, u.output_tokens, u.total_tokens, u.cached_tokens), (i64::MAX, i64::MAX, i64::MAX, i64::MAX));
        assert_eq!(usage_in(r#"{"usage":"none"}"#), Usage::default());
        assert_eq!(usage_in(r#"{"usage":[1,2]}"#), Usage::default());
        assert_eq!(usage_in(r#"{"usage":{"prompt_tokens":-3}}"#).input_tokens, 0);
    }

    /// A number beyond f64 (serde_json refuses to read it as a number) in a paid answer: the
    /// answer stays an answer, its body byte for byte, and the count reads as the largest.
    #[test]
    fn usage_beyond_f64_keeps_the_answer() {
        let body =
            r#"{"id":"x","logprob":-1e999,"usage":{"prompt_tokens":1e999,"completion_tokens":2,"completion_tokens_details":{"reasoning_tokens":-1E+999}}}"#;
        let (text, u) = parse_body(body.as_bytes()).expect("still an answer");
        assert_eq!(text, body);
        assert_eq!((u.input_tokens, u.output_tokens, u.reasoning_tokens, u.total_tokens), (i64::MAX, 2, 0, i64::MAX));
        assert_eq!(usage_in(r#"{"usage":[1e999]}"#), Usage::default());
    }

    #[test]
    fn bodies_pass_through_byte_for_byte() {
        let body = r#"{"z":1,"a":1.50,"big":123456789012345678901234567890,"e":1E+2,"s":"caf\u00e9 \n","usage":{"prompt_tokens":null}}"#;
        assert_eq!(parse_body(body.as_bytes()).unwrap().0, body, "key order, number text and escapes are kept");
        assert_eq!(parse_body(b"{\n  \"a\": 1\r\n}\n").unwrap().0, "{   \"a\": 1  }", "only raw newlines (whitespace) change");
        assert!(parse_body(b"<html>").is_none());
        assert!(parse_body(b"{\"a\":").is_none());
        assert!(parse_body(b"[1,2]").is_none(), "an answer is a JSON object");
        assert!(parse_body(b"\xff{}").is_none());
        let p = Prepared {
            batch_id: "b".into(),
            line: 1,
            unit_idx: 0,
            epoch: None,
            custom_id: "c\"1".into(),
            request_id: "batch_req_1".into(),
            body: Bytes::new(),
            model: "m".into(),
            path: "/x".into(),
            est_tokens: 0,
        };
        let line = answer_line(&p, 200, "rid", r#"{"ok":true}"#);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["custom_id"], "c\"1");
        assert_eq!(v["response"]["body"]["ok"], true);
        assert!(v["error"].is_null());
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn json_value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
                ".{0,12}".prop_map(Value::from),
            ];
            leaf.prop_recursive(4, 48, 6, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
                    prop::collection::vec((".{0,8}", inner), 0..6).prop_map(|kv| Value::Object(kv.into_iter().collect())),
                ]
            })
        }

        fn json_object() -> impl Strategy<Value = Value> {
            prop::collection::vec((".{0,8}", json_value()), 0..8).prop_map(|kv| Value::Object(kv.into_iter().collect()))
        }

        proptest! {
            #[test]
            fn no_bytes_make_the_parser_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
                let _ = parse_body(&bytes);
            }

            #[test]
            fn valid_answers_pass_through_unchanged(v in json_object()) {
                let compact = serde_json::to_string(&v).unwrap();
                let (got, _) = parse_body(compact.as_bytes()).unwrap();
                prop_assert_eq!(got.as_ref(), compact.as_str(), "a one-line answer is kept byte for byte");
                let pretty = serde_json::to_string_pretty(&v).unwrap();
                let (got, _) = parse_body(pretty.as_bytes()).unwrap();
                prop_assert!(!got.contains('\n') && !got.contains('\r'), "fit for one JSONL line");
                prop_assert_eq!(got.len(), pretty.trim().len(), "only newlines changed, nothing else");
                prop_assert_eq!(serde_json::from_str::<Value>(&got).unwrap(), serde_json::from_str::<Value>(&pretty).unwrap());
            }

            #[test]
            fn any_usage_reads_as_non_negative_counts(usage in json_value(), rest in json_object()) {
                let mut body = rest;
                body["usage"] = usage;
                let (_, u) = parse_body(body.to_string().as_bytes()).unwrap();
                for n in [u.input_tokens, u.cached_tokens, u.output_tokens, u.reasoning_tokens, u.total_tokens] {
                    prop_assert!(n >= 0);
                }
                prop_assert!(u.total_tokens >= u.input_tokens.max(u.output_tokens));
            }
        }
    }
}
