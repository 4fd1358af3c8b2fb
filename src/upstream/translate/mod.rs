//! Translation between OpenAI's chat completions and Anthropic's Messages API: requests both
//! ways, answers both ways, and error bodies both ways. Pure functions over JSON values; no
//! I/O, no configuration beyond what a call is handed.
//!
//! Four calls cover every route a line can take:
//! - an OpenAI-format line sent to an `api = "anthropic"` upstream: [`chat_to_messages`] on
//!   the way out, [`message_to_chat_answer`] (or [`anthropic_error_to_openai`]) on the way back;
//! - an Anthropic-format request sent to an OpenAI-compatible upstream: [`messages_to_chat`]
//!   out, [`chat_answer_to_message`] (or [`openai_error_to_anthropic`]) back.
//!
//! [`servable`] answers "can this request be served by an upstream that speaks API K?"
//! for a validator, with the same refusal the translation would give.
//!
//! The rule for what has no equivalent on the other side: a parameter that could change what
//! the model generates, or the shape of the answer, is **refused** with a [`Refused`] naming it
//! (so a validator can report it with the line's number); it is never silently dropped. Only
//! hints that cannot change the answer are dropped: Anthropic's `cache_control` (and OpenAI's
//! `prompt_cache_key`) — caching changes cost and latency, never the tokens; OpenAI-compatible
//! servers cache prefixes by themselves (vLLM's automatic prefix caching, SGLang's radix cache)
//! — and `service_tier` (which capacity pool serves the call). A `null` value means "not set"
//! everywhere. The top-level `mock` object (the batchd mock upstream's per-request steering)
//! passes through unchanged both ways. `docs/anthropic.md` has the whole table.

mod content;
mod errors;
mod from_chat;
mod from_messages;

use serde_json::{Map, Value};

pub use errors::{anthropic_error_status, anthropic_error_to_openai, anthropic_error_type, openai_error_to_anthropic};
pub use from_chat::{chat_answer_to_message, chat_to_messages, ToMessages};
pub use from_messages::{message_to_chat_answer, messages_to_chat};

use crate::config::UpstreamApi;

/// Why a request cannot be translated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    /// The parameter (or value) has no equivalent on the other side.
    Unsupported,
    /// The request is malformed where the translation must read it.
    Invalid,
}

/// A request that cannot be translated, naming the parameter (a path into the body, such as
/// `thinking` or `messages[2].content[0].type`) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{param}: {reason}")]
pub struct Refused {
    pub param: String,
    pub kind: RefusalKind,
    pub reason: String,
}

impl Refused {
    /// The error code a validator reports it with, as OpenAI names such errors.
    pub fn code(&self) -> &'static str {
        match self.kind {
            RefusalKind::Unsupported => "unsupported_parameter",
            RefusalKind::Invalid => "invalid_value",
        }
    }
}

/// An answer body that is not what its API promises (not a chat completion, not a Message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unreadable(pub String);

/// The request formats a line can be written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind<'a> {
    /// OpenAI's format, for the endpoint path given (`/chat/completions`, `/embeddings`, …,
    /// without the `/v1` prefix).
    OpenAi(&'a str),
    /// An Anthropic Messages request (`POST /v1/messages`).
    Messages,
}

/// Whether an upstream speaking `api` can serve a request of `kind`: `Ok(true)` when the body
/// goes as it is, `Ok(false)` when it is translated (and translates), `Err` with the refusal
/// otherwise. Costs nothing unless a translation is needed.
pub fn servable(kind: RequestKind<'_>, api: UpstreamApi, body: &Value, opts: &ToMessages) -> Result<bool, Refused> {
    match (kind, api) {
        (RequestKind::OpenAi(_), UpstreamApi::OpenAi) | (RequestKind::Messages, UpstreamApi::Anthropic) => Ok(true),
        (RequestKind::OpenAi(CHAT_PATH), UpstreamApi::Anthropic) => chat_to_messages(body, opts).map(|_| false),
        (RequestKind::OpenAi(path), UpstreamApi::Anthropic) => {
            Err(unsupported("url", format!("an upstream speaking Anthropic's Messages API serves chat completions only, not /v1{path}")))
        }
        (RequestKind::Messages, UpstreamApi::OpenAi) => messages_to_chat(body).map(|_| false),
    }
}

/// The refusal of an OpenAI endpoint other than chat completions for an Anthropic-speaking
/// upstream (`path` below `/v1`).
pub fn no_such_endpoint(path: &str) -> Refused {
    unsupported("url", format!("an upstream speaking Anthropic's Messages API serves chat completions only, not /v1{path}"))
}

/// A body that is not JSON at all.
pub fn invalid_body(e: &serde_json::Error) -> Refused {
    invalid("body", format!("is not valid JSON ({e})"))
}

/// The chat completions path, as lines name it below `/v1`.
pub const CHAT_PATH: &str = "/chat/completions";
/// The Messages path below `/v1`.
pub const MESSAGES_PATH: &str = "/messages";

/// A `msg_…` or `chatcmpl-…` id for an answer, derived from the line's stable request id
/// (`batch_req_<hex>` keeps its hex), so every attempt and every rendering agrees.
pub fn answer_id(prefix: &str, request_id: &str) -> String {
    match request_id.strip_prefix("batch_req_") {
        Some(hex) if !hex.is_empty() => format!("{prefix}{hex}"),
        _ => format!("{prefix}{:032x}", xxhash_rust::xxh3::xxh3_128(request_id.as_bytes())),
    }
}

pub(crate) fn unsupported(param: impl Into<String>, reason: impl Into<String>) -> Refused {
    Refused { param: param.into(), kind: RefusalKind::Unsupported, reason: reason.into() }
}

pub(crate) fn invalid(param: impl Into<String>, reason: impl Into<String>) -> Refused {
    Refused { param: param.into(), kind: RefusalKind::Invalid, reason: reason.into() }
}

/// `at.key`, or `key` at the top.
pub(crate) fn path(at: &str, key: &str) -> String {
    if at.is_empty() {
        key.to_string()
    } else {
        format!("{at}.{key}")
    }
}

/// `at[i]`.
pub(crate) fn index(at: &str, i: usize) -> String {
    format!("{at}[{i}]")
}

/// The object at `at`, or an `Invalid` refusal.
pub(crate) fn object<'a>(v: &'a Value, at: &str) -> Result<&'a Map<String, Value>, Refused> {
    v.as_object().ok_or_else(|| invalid(at, "must be a JSON object"))
}

/// The array at `at`, or an `Invalid` refusal.
pub(crate) fn array<'a>(v: &'a Value, at: &str) -> Result<&'a Vec<Value>, Refused> {
    v.as_array().ok_or_else(|| invalid(at, "must be an array"))
}

/// The string at `at`, or an `Invalid` refusal.
pub(crate) fn string<'a>(v: &'a Value, at: &str) -> Result<&'a str, Refused> {
    v.as_str().ok_or_else(|| invalid(at, "must be a string"))
}

/// Calls `f` with each item of a content array: its `type`, the item, and its path.
pub(crate) fn each_item(items: &[Value], at: &str, mut f: impl FnMut(Option<&str>, &Map<String, Value>, &str) -> Result<(), Refused>) -> Result<(), Refused> {
    for (i, x) in items.iter().enumerate() {
        let at = index(at, i);
        let x = object(x, &at)?;
        f(x.get("type").and_then(Value::as_str), x, &at)?;
    }
    Ok(())
}

/// The set (non-null) entries of an object.
pub(crate) fn set(obj: &Map<String, Value>) -> impl Iterator<Item = (&str, &Value)> {
    obj.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.as_str(), v))
}

/// Refuses the first set key of `obj` not in `known`: the object holds something the other
/// side cannot express.
pub(crate) fn only(obj: &Map<String, Value>, known: &[&str], at: &str, side: &str) -> Result<(), Refused> {
    match set(obj).find(|(k, _)| !known.contains(k)) {
        Some((k, _)) => Err(unsupported(path(at, k), format!("has no equivalent in {side}"))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests;
