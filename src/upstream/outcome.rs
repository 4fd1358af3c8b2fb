//! What one attempt upstream came to: an HTTP [`Answer`] (its status, decoded body, and the
//! headers that steer retries and limits, already read) or a [`TransportError`] (no usable
//! answer). Made by `client`, read by `signals` (what it says about load), `dialect` (its
//! body in the line's API) and the engine (retry or record).

use std::time::Duration;

use bytes::Bytes;

use super::control::RateHeaders;

/// An HTTP answer from the upstream.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    /// The body, decoded when the upstream compressed it.
    pub body: Bytes,
    pub request_id: Option<String>,
    pub retry_after: Option<Duration>,
    pub rate_limits: RateHeaders,
}

/// No usable HTTP answer.
#[derive(Debug, Clone)]
pub enum TransportError {
    Timeout(String),
    /// No connection could be made.
    Unreachable(String),
    Unavailable(String),
    /// The answer was larger than the upstream's `max_response_bytes` (not retried: the
    /// same request would get the same answer, and be paid for again).
    TooLarge(String),
}

impl TransportError {
    pub fn code(&self) -> &'static str {
        match self {
            TransportError::Timeout(_) => "request_timeout",
            TransportError::Unreachable(_) | TransportError::Unavailable(_) => "upstream_unavailable",
            TransportError::TooLarge(_) => "response_too_large",
        }
    }
    pub fn message(&self) -> &str {
        match self {
            TransportError::Timeout(m) | TransportError::Unreachable(m) | TransportError::Unavailable(m) | TransportError::TooLarge(m) => m,
        }
    }
}

#[derive(Debug, Clone)]
pub enum Outcome {
    Answer(Answer),
    Transport(TransportError),
}

impl Outcome {
    /// Connect errors, timeouts, 408, 409, 429 and 5xx may succeed when tried again; so may
    /// a 402 (a quota that is paid for again).
    pub fn is_retryable(&self) -> bool {
        match self {
            Outcome::Transport(TransportError::TooLarge(_)) => false,
            Outcome::Transport(_) => true,
            Outcome::Answer(a) => matches!(a.status, 402 | 408 | 409 | 429) || a.status >= 500,
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Outcome::Answer(a) => a.retry_after,
            Outcome::Transport(_) => None,
        }
    }
}
