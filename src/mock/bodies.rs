//! OpenAI-shaped JSON bodies of the mock upstream: successful answers for each
//! endpoint, the model list and the `{"error": {...}}` envelope.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::state::{hash_bytes, mix, Shared};

/// The POST endpoints the mock serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
    Embeddings,
    Responses,
    Moderations,
    /// Anthropic's `/v1/messages` (see `messages`).
    Messages,
}

impl Endpoint {
    /// Whether answers of this endpoint carry completion tokens.
    pub fn generates(self) -> bool {
        matches!(self, Endpoint::Chat | Endpoint::Completions | Endpoint::Responses | Endpoint::Messages)
    }
}

/// Models listed by `GET /v1/models`.
pub const MODELS: &[&str] = &["mock-model", "gpt-4o-mini", "gpt-4o", "text-embedding-3-small", "omni-moderation-latest"];

const ECHO_CHARS: usize = 40;

/// Token counts of one successful answer.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    pub prompt: u64,
    pub completion: u64,
    /// Prompt tokens found in the prefix cache (reported only by the engine simulator, as
    /// vLLM reports them in `prompt_tokens_details`).
    pub cached: Option<u64>,
}

fn now_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// `{"error": {...}}` envelope as OpenAI sends it.
pub fn error_envelope(message: &str, kind: &str, code: Option<&str>) -> Value {
    json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
}

/// Body of `GET /v1/models`.
pub fn models() -> Value {
    let data: Vec<Value> = MODELS.iter().map(|m| json!({"id": m, "object": "model", "created": 1_700_000_000u64, "owned_by": "batchd-mock"})).collect();
    json!({"object": "list", "data": data})
}

/// Successful answer body for `ep`, given the parsed request.
pub fn success(ep: Endpoint, sh: &Shared, req: &Value, u: Usage) -> Value {
    let model = req.get("model").and_then(Value::as_str).unwrap_or("mock-model");
    match ep {
        Endpoint::Chat => chat(sh, model, req, u),
        Endpoint::Completions => completion(sh, model, req, u),
        Endpoint::Embeddings => embeddings(model, req, u),
        Endpoint::Responses => responses(sh, model, req, u),
        Endpoint::Moderations => moderations(sh, model, req),
        Endpoint::Messages => super::messages::message(sh, model, req, u),
    }
}

/// `"echo: "` + the first 40 characters of `text`.
pub fn echo(text: &str) -> String {
    let head: String = text.chars().take(ECHO_CHARS).collect();
    format!("echo: {head}")
}

/// Text of a message `content`: a string, or the first part carrying `text`.
fn content_text(content: Option<&Value>) -> &str {
    match content {
        Some(Value::String(s)) => s,
        Some(Value::Array(parts)) => parts.iter().find_map(|p| p.get("text").and_then(Value::as_str)).unwrap_or(""),
        _ => "",
    }
}

/// Text of the last message of a `messages` / `input` array, or the string itself.
pub fn last_text(v: Option<&Value>) -> &str {
    match v {
        Some(Value::String(s)) => s,
        Some(Value::Array(items)) => match items.last() {
            Some(Value::String(s)) => s,
            Some(m) => content_text(m.get("content")),
            None => "",
        },
        _ => "",
    }
}

fn first_text(v: Option<&Value>) -> &str {
    match v {
        Some(Value::String(s)) => s,
        Some(Value::Array(items)) => items.first().and_then(Value::as_str).unwrap_or(""),
        _ => "",
    }
}

fn usage_json(u: Usage) -> Value {
    let mut v = json!({"prompt_tokens": u.prompt, "completion_tokens": u.completion, "total_tokens": u.prompt + u.completion});
    if let Some(cached) = u.cached {
        v["prompt_tokens_details"] = json!({"cached_tokens": cached});
    }
    v
}

fn chat(sh: &Shared, model: &str, req: &Value, u: Usage) -> Value {
    let text = echo(last_text(req.get("messages")));
    json!({
        "id": sh.new_id("chatcmpl-"), "object": "chat.completion", "created": now_s(), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": null},
                     "logprobs": null, "finish_reason": "stop"}],
        "usage": usage_json(u), "system_fingerprint": "fp_mock",
    })
}

fn completion(sh: &Shared, model: &str, req: &Value, u: Usage) -> Value {
    let text = echo(first_text(req.get("prompt")));
    json!({
        "id": sh.new_id("cmpl-"), "object": "text_completion", "created": now_s(), "model": model,
        "choices": [{"text": text, "index": 0, "logprobs": null, "finish_reason": "stop"}],
        "usage": usage_json(u),
    })
}

fn responses(sh: &Shared, model: &str, req: &Value, u: Usage) -> Value {
    let text = echo(last_text(req.get("input")));
    json!({
        "id": sh.new_id("resp_"), "object": "response", "created_at": now_s(), "status": "completed",
        "model": model, "error": null, "incomplete_details": null,
        "output": [{"type": "message", "id": sh.new_id("msg_"), "status": "completed", "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": []}]}],
        "usage": {"input_tokens": u.prompt, "output_tokens": u.completion, "total_tokens": u.prompt + u.completion,
                  "input_tokens_details": {"cached_tokens": u.cached.unwrap_or(0)}, "output_tokens_details": {"reasoning_tokens": 0}},
    })
}

/// Items of an embeddings/moderations `input`: a string, token ids, or an array of either.
fn inputs(req: &Value) -> Vec<&Value> {
    match req.get("input") {
        Some(Value::Array(items)) if !items.is_empty() && !items.iter().all(Value::is_number) => items.iter().collect(),
        Some(v) => vec![v],
        None => vec![],
    }
}

/// Deterministic 8-dim vector derived from the input item.
fn vector(item: &Value) -> Vec<f32> {
    let key = hash_bytes(item.to_string().as_bytes());
    (0..8).map(|k| ((mix(key, k) >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0).collect()
}

fn embedding_value(v: Vec<f32>, base64: bool) -> Value {
    if !base64 {
        return json!(v);
    }
    let bytes: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
    Value::String(base64_encode(&bytes))
}

fn embeddings(model: &str, req: &Value, u: Usage) -> Value {
    let b64 = req.get("encoding_format").and_then(Value::as_str) == Some("base64");
    let data: Vec<Value> = inputs(req)
        .into_iter()
        .enumerate()
        .map(|(i, item)| json!({"object": "embedding", "index": i, "embedding": embedding_value(vector(item), b64)}))
        .collect();
    json!({"object": "list", "data": data, "model": model,
           "usage": {"prompt_tokens": u.prompt, "total_tokens": u.prompt}})
}

const MODERATION_CATEGORIES: &[&str] = &[
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/instructions",
    "self-harm/intent",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
];

fn moderation_result() -> Value {
    let flags: serde_json::Map<String, Value> = MODERATION_CATEGORIES.iter().map(|c| (c.to_string(), json!(false))).collect();
    let scores: serde_json::Map<String, Value> = MODERATION_CATEGORIES.iter().map(|c| (c.to_string(), json!(1e-6))).collect();
    json!({"flagged": false, "categories": flags, "category_scores": scores})
}

fn moderations(sh: &Shared, model: &str, req: &Value) -> Value {
    let results: Vec<Value> = inputs(req).iter().map(|_| moderation_result()).collect();
    json!({"id": sh.new_id("modr-"), "model": model, "results": results})
}

/// Standard base64 (with padding), for `encoding_format: "base64"` embeddings.
fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = ((b[0] as u32) << 16) | ((b[1] as u32) << 8) | b[2] as u32;
        for i in 0..4 {
            let c = if i <= chunk.len() { ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char } else { '=' };
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod body_tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        assert_eq!(base64_encode(b""), "");
        assert_eq!(base64_encode(b"f"), "Zg==");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_encode(b"foo"), "Zm9v");
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn echo_uses_last_message_and_truncates() {
        let req = json!({"messages": [{"role": "user", "content": "first"},
                                      {"role": "user", "content": [{"type": "text", "text": "x".repeat(50)}]}]});
        assert_eq!(echo(last_text(req.get("messages"))), format!("echo: {}", "x".repeat(40)));
        let ids = json!({"input": [1, 2, 3]});
        assert_eq!(inputs(&ids).len(), 1);
        assert_eq!(inputs(&json!({"input": ["a", "b"]})).len(), 2);
    }
}
