//! What an upstream's answer says about its limits: the wait it asks for, its rate-limit
//! headers, and whether the outcome means "slow down", "out of quota", "overloaded", or
//! nothing about load at all ([`Signal`]).
//!
//! Headers are read under OpenAI's names and under LiteLLM's `llm_provider-` copies (LiteLLM
//! forwards a provider's headers with that prefix and sends no `retry-after` of its own); an
//! upstream with `api = "anthropic"` is read under Anthropic's names instead
//! ([`anthropic_headers`]), into the same signals.

use std::time::{Duration, SystemTime};

use axum::http::HeaderMap;

use super::control::{Dimension, RateHeaders, Signal};
use super::outcome::{Answer, Outcome, TransportError};

/// Longest wait taken from a header (a day's quota reset is not a reason to sleep longer).
const MAX_HEADER_WAIT: Duration = Duration::from_secs(3600);
/// Error bodies larger than this are not searched for an error type.
const MAX_ERROR_BODY: usize = 64 << 10;

/// A header under its own name, or under LiteLLM's copy of it (`[name, llm_provider-name]`).
fn header<'a>(h: &'a HeaderMap, names: [&str; 2]) -> Option<&'a str> {
    let get = |n: &str| h.get(n).and_then(|v| v.to_str().ok()).map(str::trim).filter(|v| !v.is_empty());
    get(names[0]).or_else(|| get(names[1]))
}

/// `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`, each with its LiteLLM name.
const RATE_HEADERS: [[[&str; 2]; 3]; 2] = [
    [
        ["x-ratelimit-limit-requests", "llm_provider-x-ratelimit-limit-requests"],
        ["x-ratelimit-remaining-requests", "llm_provider-x-ratelimit-remaining-requests"],
        ["x-ratelimit-reset-requests", "llm_provider-x-ratelimit-reset-requests"],
    ],
    [
        ["x-ratelimit-limit-tokens", "llm_provider-x-ratelimit-limit-tokens"],
        ["x-ratelimit-remaining-tokens", "llm_provider-x-ratelimit-remaining-tokens"],
        ["x-ratelimit-reset-tokens", "llm_provider-x-ratelimit-reset-tokens"],
    ],
];

/// The wait an upstream asks for: `retry-after-ms`, then `retry-after` (seconds or an HTTP
/// date), each also under LiteLLM's `llm_provider-` prefix.
pub fn retry_after(h: &HeaderMap) -> Option<Duration> {
    if let Some(ms) = header(h, ["retry-after-ms", "llm_provider-retry-after-ms"]).and_then(|v| v.parse::<f64>().ok()) {
        return secs(ms / 1000.0);
    }
    let v = header(h, ["retry-after", "llm_provider-retry-after"])?;
    if let Ok(s) = v.parse::<f64>() {
        return secs(s);
    }
    let at = httpdate::parse_http_date(v).ok()?;
    secs(at.duration_since(SystemTime::now()).unwrap_or_default().as_secs_f64())
}

/// `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`.
pub fn rate_headers(h: &HeaderMap) -> RateHeaders {
    let dim = |[limit, remaining, reset]: [[&str; 2]; 3]| Dimension {
        limit: number(h, limit),
        remaining: number(h, remaining),
        reset: header(h, reset).and_then(parse_reset),
    };
    RateHeaders { requests: dim(RATE_HEADERS[0]), tokens: dim(RATE_HEADERS[1]) }
}

/// Anthropic's `anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{limit,
/// remaining,reset}` (resets are RFC 3339 times), as the same two dimensions: requests, and
/// tokens — Anthropic's combined `tokens-*` when sent (it is the most restrictive of its
/// limits in effect), else whichever of the input and output token limits has the smaller
/// share left.
pub fn anthropic_headers(h: &HeaderMap) -> RateHeaders {
    let dim = |kind: &str| {
        let name = |part: &str| format!("anthropic-ratelimit-{kind}-{part}");
        let (limit, remaining, reset) = (name("limit"), name("remaining"), name("reset"));
        let lite = |n: &str| format!("llm_provider-{n}");
        Dimension {
            limit: number(h, [&limit, &lite(&limit)]),
            remaining: number(h, [&remaining, &lite(&remaining)]),
            reset: header(h, [&reset, &lite(&reset)]).and_then(parse_anthropic_reset),
        }
    };
    let tokens = dim("tokens");
    let tokens = if tokens != Dimension::default() { tokens } else { tighter(dim("input-tokens"), dim("output-tokens")) };
    RateHeaders { requests: dim("requests"), tokens }
}

/// Of two token dimensions, the one with the smaller share of its limit left.
fn tighter(a: Dimension, b: Dimension) -> Dimension {
    let left = |d: &Dimension| match (d.remaining, d.limit) {
        (Some(r), Some(l)) if l > 0.0 => r / l,
        (Some(_), _) => 0.5,
        _ => f64::INFINITY,
    };
    if left(&b) < left(&a) {
        b
    } else {
        a
    }
}

/// A reset as Anthropic writes it: an RFC 3339 time (or, as a fallback, what [`parse_reset`]
/// reads).
pub fn parse_anthropic_reset(s: &str) -> Option<Duration> {
    let Ok(at) = chrono::DateTime::parse_from_rfc3339(s) else { return parse_reset(s) };
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).ok()?.as_secs_f64();
    secs((at.timestamp_millis() as f64 / 1000.0 - now).max(0.0))
}

fn number(h: &HeaderMap, names: [&str; 2]) -> Option<f64> {
    header(h, names).and_then(|v| v.parse::<f64>().ok()).filter(|n| n.is_finite() && *n >= 0.0)
}

/// A reset as providers write it: a Go duration (`6m0s`, `20ms`, `1.5s`), plain seconds,
/// or a Unix time in seconds.
pub fn parse_reset(s: &str) -> Option<Duration> {
    if let Ok(n) = s.parse::<f64>() {
        if n > 1e9 {
            let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).ok()?.as_secs_f64();
            return secs((n - now).max(0.0));
        }
        return secs(n);
    }
    parse_go_duration(s)
}

fn secs(s: f64) -> Option<Duration> {
    (s.is_finite() && s >= 0.0).then(|| Duration::from_secs_f64(s).min(MAX_HEADER_WAIT))
}

/// Parses durations as OpenAI writes them in rate-limit headers: `1s`, `6m0s`, `20ms`, `1h2m`.
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let mut total = 0.0;
    let mut rest = s;
    while !rest.is_empty() {
        let num_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let n: f64 = rest[..num_end].parse().ok()?;
        let unit_end = rest[num_end..].find(|c: char| c.is_ascii_digit()).map_or(rest.len(), |i| num_end + i);
        total += n * match &rest[num_end..unit_end] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_end..];
    }
    secs(total)
}

/// What an outcome says about the upstream's load.
pub fn classify(o: &Outcome) -> Signal {
    match o {
        Outcome::Transport(TransportError::Timeout(_)) => Signal::Timeout,
        Outcome::Transport(TransportError::Unreachable(_)) => Signal::Unreachable,
        Outcome::Transport(_) => Signal::Failed,
        Outcome::Answer(a) => classify_answer(a),
    }
}

fn classify_answer(a: &Answer) -> Signal {
    match a.status {
        200..=299 => Signal::Ok,
        402 => Signal::Quota,
        429 => match error_kind(&a.body) {
            Kind::Quota => Signal::Quota,
            Kind::Overloaded => Signal::Overloaded { slow_down: true },
            Kind::Other => Signal::RateLimited,
        },
        529 => Signal::Overloaded { slow_down: true },
        503 => Signal::Overloaded { slow_down: error_kind(&a.body) == Kind::Overloaded },
        504 => Signal::Timeout,
        500..=599 => Signal::Failed,
        // A final 4xx (or 408/409): the upstream served it; it says nothing about load.
        _ => Signal::Neutral,
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Kind {
    Quota,
    Overloaded,
    Other,
}

/// The error type of an error body: OpenAI's `{"error": {"type", "code"}}`, Anthropic's
/// `overloaded_error`, TGI's `{"error_type": "overloaded"}`.
fn error_kind(body: &[u8]) -> Kind {
    if body.len() > MAX_ERROR_BODY {
        return Kind::Other;
    }
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else { return Kind::Other };
    let e = &v["error"];
    let words = [&e["type"], &e["code"], &v["error_type"], &v["type"]];
    let said = |w: &str| words.iter().any(|x| x.as_str().is_some_and(|s| s.contains(w)));
    if said("insufficient_quota") || said("quota_exceeded") || said("billing") {
        Kind::Quota
    } else if said("overloaded") {
        Kind::Overloaded
    } else {
        Kind::Other
    }
}

/// A short description of an outcome, for `last_error` and pause details: shown to every
/// tenant whose batches the upstream serves, so it says only the answer's status and what
/// batchd made of it ("500 Internal Server Error (server error)", "429 Too Many Requests
/// (out of quota)"), or batchd's own words for no answer. The upstream's error text may
/// quote the request (proxies and custom servers echo the prompt): it stays in that line's
/// result, which only its tenant reads.
pub fn describe(o: &Outcome) -> String {
    match o {
        Outcome::Transport(e) => e.message().to_string(),
        Outcome::Answer(a) => {
            let reason = axum::http::StatusCode::from_u16(a.status).ok().and_then(|s| s.canonical_reason()).unwrap_or("");
            let status = format!("{} {reason}", a.status).trim_end().to_string();
            match class(classify_answer(a)) {
                Some(class) => format!("{status} ({class})"),
                None => status,
            }
        }
    }
}

/// What batchd made of an answer, in words.
fn class(s: Signal) -> Option<&'static str> {
    match s {
        Signal::RateLimited => Some("rate limited"),
        Signal::Overloaded { .. } => Some("overloaded"),
        Signal::Quota => Some("out of quota"),
        Signal::Timeout => Some("timeout"),
        Signal::Failed => Some("server error"),
        Signal::Unreachable => Some("unreachable"),
        Signal::Ok | Signal::Neutral => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        h
    }

    fn answer(status: u16, body: &str) -> Outcome {
        Outcome::Answer(Answer { status, body: Bytes::from(body.to_string()), request_id: None, retry_after: None, rate_limits: RateHeaders::default() })
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(parse_go_duration("20ms"), Some(Duration::from_millis(20)));
        assert_eq!(parse_go_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_go_duration("2m59.56s"), Some(Duration::from_millis(179_560)));
        assert_eq!(parse_go_duration("abc"), None);
        assert_eq!(parse_reset("7"), Some(Duration::from_secs(7)));
    }

    #[test]
    fn retry_after_in_every_spelling() {
        assert_eq!(retry_after(&headers(&[("retry-after", "3")])), Some(Duration::from_secs(3)));
        assert_eq!(retry_after(&headers(&[("retry-after", "3"), ("retry-after-ms", "250")])), Some(Duration::from_millis(250)));
        assert_eq!(retry_after(&headers(&[("llm_provider-retry-after", "2")])), Some(Duration::from_secs(2)), "LiteLLM");
        assert_eq!(retry_after(&headers(&[("llm_provider-retry-after-ms", "1500")])), Some(Duration::from_millis(1500)));
        assert_eq!(retry_after(&headers(&[("x-ratelimit-reset-requests", "2s")])), None, "a reset is not a retry-after");
        let at = SystemTime::now() + Duration::from_secs(30);
        let wait = retry_after(&headers(&[("retry-after", &httpdate::fmt_http_date(at))])).unwrap();
        assert!(wait > Duration::from_secs(28) && wait <= Duration::from_secs(30), "{wait:?}");
        let past = headers(&[("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT")]);
        assert_eq!(retry_after(&past), Some(Duration::ZERO), "a date in the past means now");
        assert_eq!(retry_after(&headers(&[("retry-after", "soon")])), None, "an unreadable value is ignored");
    }

    #[test]
    fn openai_and_litellm_rate_limit_headers() {
        let h = headers(&[
            ("x-ratelimit-limit-requests", "1200"),
            ("x-ratelimit-remaining-requests", "1187"),
            ("x-ratelimit-reset-requests", "650ms"),
            ("llm_provider-x-ratelimit-limit-tokens", "40000"),
            ("llm_provider-x-ratelimit-remaining-tokens", "39000"),
            ("llm_provider-x-ratelimit-reset-tokens", "1.5s"),
        ]);
        let r = rate_headers(&h);
        assert_eq!(r.requests, Dimension { limit: Some(1200.0), remaining: Some(1187.0), reset: Some(Duration::from_millis(650)) });
        assert_eq!(r.tokens, Dimension { limit: Some(40000.0), remaining: Some(39000.0), reset: Some(Duration::from_millis(1500)) });
        assert_eq!(rate_headers(&HeaderMap::new()), RateHeaders::default());
    }

    #[test]
    fn anthropic_rate_limit_headers() {
        let in_30s = chrono::DateTime::<chrono::Utc>::from(SystemTime::now() + Duration::from_secs(30)).to_rfc3339();
        let h = headers(&[
            ("anthropic-ratelimit-requests-limit", "50"),
            ("anthropic-ratelimit-requests-remaining", "49"),
            ("anthropic-ratelimit-requests-reset", &in_30s),
            ("anthropic-ratelimit-tokens-limit", "90000"),
            ("anthropic-ratelimit-tokens-remaining", "80000"),
            ("anthropic-ratelimit-tokens-reset", "2024-04-24T15:55:20Z"),
            ("anthropic-ratelimit-input-tokens-remaining", "1"),
        ]);
        let r = anthropic_headers(&h);
        assert_eq!((r.requests.limit, r.requests.remaining), (Some(50.0), Some(49.0)));
        let reset = r.requests.reset.unwrap();
        assert!(reset > Duration::from_secs(28) && reset <= Duration::from_secs(30), "{reset:?}");
        assert_eq!(
            r.tokens,
            Dimension { limit: Some(90000.0), remaining: Some(80000.0), reset: Some(Duration::ZERO) },
            "the combined limit wins; a past reset is now"
        );
        let split = headers(&[
            ("anthropic-ratelimit-input-tokens-limit", "40000"),
            ("anthropic-ratelimit-input-tokens-remaining", "30000"),
            ("anthropic-ratelimit-output-tokens-limit", "8000"),
            ("anthropic-ratelimit-output-tokens-remaining", "800"),
            ("anthropic-ratelimit-output-tokens-reset", "2099-01-01T00:00:00+00:00"),
        ]);
        let r = anthropic_headers(&split);
        assert_eq!((r.tokens.limit, r.tokens.remaining), (Some(8000.0), Some(800.0)), "output has 10 % left, input 75 %: output is the tighter");
        assert_eq!(r.tokens.reset, Some(MAX_HEADER_WAIT), "a far reset is capped");
        assert_eq!(r.requests, Dimension::default());
        assert_eq!(anthropic_headers(&headers(&[("x-ratelimit-limit-requests", "5")])), RateHeaders::default(), "OpenAI's names are not Anthropic's");
        assert_eq!(anthropic_headers(&headers(&[("llm_provider-anthropic-ratelimit-requests-remaining", "3")])).requests.remaining, Some(3.0), "LiteLLM");
    }

    #[test]
    fn outcomes_are_classified_by_status_and_error_type() {
        let quota = r#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#;
        assert_eq!(classify(&answer(429, quota)), Signal::Quota);
        assert_eq!(classify(&answer(429, r#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#)), Signal::RateLimited);
        assert_eq!(classify(&answer(429, "<html>429 Too Many Requests</html>")), Signal::RateLimited);
        assert_eq!(classify(&answer(429, r#"{"error":"Model is overloaded","error_type":"overloaded"}"#)), Signal::Overloaded { slow_down: true }, "TGI");
        assert_eq!(
            classify(&answer(529, r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#)),
            Signal::Overloaded { slow_down: true }
        );
        assert_eq!(classify(&answer(503, "")), Signal::Overloaded { slow_down: false });
        let anthropic_429 =
            r#"{"type":"error","error":{"type":"rate_limit_error","message":"Number of request tokens has exceeded your per-minute rate limit"}}"#;
        assert_eq!(classify(&answer(429, anthropic_429)), Signal::RateLimited);
        assert_eq!(classify(&answer(402, r#"{"type":"error","error":{"type":"billing_error","message":"credit"}}"#)), Signal::Quota);
        assert_eq!(classify(&answer(500, "{}")), Signal::Failed);
        assert_eq!(classify(&answer(400, "{}")), Signal::Neutral);
        assert_eq!(classify(&answer(200, "{}")), Signal::Ok);
        assert_eq!(classify(&Outcome::Transport(TransportError::Timeout("t".into()))), Signal::Timeout);
        assert_eq!(describe(&answer(429, quota)), "429 Too Many Requests (out of quota)");
    }

    /// What other tenants may see of an answer is its status and class, never its text: an
    /// upstream that echoes the prompt in its errors must not show one tenant's prompt to
    /// another.
    #[test]
    fn descriptions_never_quote_the_answer() {
        let echo = r#"{"error":{"message":"error while processing prompt: SECRET-PROMPT-TEXT","type":"server_error","code":"SECRET-CODE"}}"#;
        for (status, want) in [
            (500, "500 Internal Server Error (server error)"),
            (429, "429 Too Many Requests (rate limited)"),
            (503, "503 Service Unavailable (overloaded)"),
            (504, "504 Gateway Timeout (timeout)"),
            (402, "402 Payment Required (out of quota)"),
            (400, "400 Bad Request"),
        ] {
            let d = describe(&answer(status, echo));
            assert_eq!(d, want);
            assert!(!d.contains("SECRET"), "{d}");
        }
        assert_eq!(describe(&answer(599, "plain SECRET text")), "599 (server error)");
    }
}
