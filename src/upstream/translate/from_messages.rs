//! From Anthropic's side: a Messages request as a chat completions request (for an
//! OpenAI-compatible upstream), and a Message answer as a chat completion (for an OpenAI-format
//! line answered by an Anthropic-speaking upstream).

use serde_json::{json, Map, Value};

use super::content::{image_block_to_part, text_block_to_part, text_only_to_chat};
use super::{answer_id, array, each_item, index, invalid, object, only, path, set, string, unsupported, Refused, Unreadable};

const OPENAI: &str = "OpenAI's chat completions";

/// The top-level keys of a Messages request that translate (or are dropped as hints).
const KNOWN: &[&str] = &[
    "model",
    "max_tokens",
    "messages",
    "system",
    "metadata",
    "stop_sequences",
    "temperature",
    "top_p",
    "top_k",
    "tools",
    "tool_choice",
    "stream",
    "thinking",
    "output_config",
    "cache_control",
    "service_tier",
    "mock",
];

/// A Messages request (`POST /v1/messages` body) as a chat completions request.
pub fn messages_to_chat(req: &Value) -> Result<Value, Refused> {
    let req = object(req, "")?;
    only(req, KNOWN, "", OPENAI)?;
    let mut out = Map::new();
    let mut messages = Vec::new();
    if let Some(system) = req.get("system").filter(|s| !s.is_null()) {
        messages.push(json!({"role": "system", "content": text_only_to_chat(system, "system")?}));
    }
    for (i, m) in array(req.get("messages").unwrap_or(&Value::Null), "messages")?.iter().enumerate() {
        message(m, &index("messages", i), &mut messages)?;
    }
    for (k, v) in set(req) {
        let put = match k {
            "model" => Some(("model", Value::String(string(v, k)?.into()))),
            "max_tokens" | "temperature" | "top_p" | "top_k" | "mock" => Some((k, v.clone())),
            "stop_sequences" => Some(("stop", Value::Array(array(v, k)?.clone()))),
            "tools" => Some(("tools", tools(v)?)),
            "metadata" => user(v, &mut out).map(|()| None)?,
            "tool_choice" => tool_choice(v, &mut out).map(|()| None)?,
            "output_config" => output_config(v, &mut out).map(|()| None)?,
            "thinking" => thinking(v).map(|()| None)?,
            "stream" if v == &Value::Bool(false) => None,
            "stream" => return Err(unsupported(k, "streaming is not supported in batches")),
            _ => None,
        };
        if let Some((key, value)) = put {
            out.insert(key.into(), value);
        }
    }
    out.insert("messages".into(), Value::Array(messages));
    Ok(Value::Object(out))
}

/// `metadata.user_id` as OpenAI's `user`.
fn user(v: &Value, out: &mut Map<String, Value>) -> Result<(), Refused> {
    let m = object(v, "metadata")?;
    only(m, &["user_id"], "metadata", OPENAI)?;
    if let Some(u) = m.get("user_id").filter(|u| !u.is_null()) {
        out.insert("user".into(), Value::String(string(u, "metadata.user_id")?.into()));
    }
    Ok(())
}

/// Only `{"type": "disabled"}` has an equivalent (no thinking is what OpenAI-compatible chat
/// asks for by default).
fn thinking(v: &Value) -> Result<(), Refused> {
    match object(v, "thinking")?.get("type").and_then(Value::as_str) {
        Some("disabled") => Ok(()),
        _ => Err(unsupported("thinking", format!("extended thinking has no equivalent in {OPENAI}; only {{\"type\": \"disabled\"}} does"))),
    }
}

/// `output_config.format` (a JSON schema) as `response_format`; `effort` has no equivalent.
fn output_config(v: &Value, out: &mut Map<String, Value>) -> Result<(), Refused> {
    let c = object(v, "output_config")?;
    only(c, &["format"], "output_config", OPENAI)?;
    let Some(format) = c.get("format").filter(|f| !f.is_null()) else { return Ok(()) };
    let f = object(format, "output_config.format")?;
    only(f, &["type", "schema"], "output_config.format", OPENAI)?;
    if f.get("type").and_then(Value::as_str) != Some("json_schema") {
        return Err(invalid("output_config.format.type", "must be \"json_schema\""));
    }
    let schema = object(f.get("schema").unwrap_or(&Value::Null), "output_config.format.schema")?;
    let rf = json!({"type": "json_schema", "json_schema": {"name": "output", "schema": schema, "strict": true}});
    out.insert("response_format".into(), rf);
    Ok(())
}

/// Anthropic tools (client tools only) as OpenAI function tools.
fn tools(v: &Value) -> Result<Value, Refused> {
    let tools = array(v, "tools")?.iter().enumerate().map(|(i, t)| {
        let at = index("tools", i);
        let t = object(t, &at)?;
        if let Some(kind) = t.get("type").and_then(Value::as_str).filter(|k| *k != "custom") {
            return Err(unsupported(path(&at, "type"), format!("the server tool {kind:?} has no equivalent in {OPENAI}")));
        }
        only(t, &["type", "name", "description", "input_schema", "strict", "cache_control"], &at, OPENAI)?;
        let mut f = Map::new();
        f.insert("name".into(), Value::String(string(t.get("name").unwrap_or(&Value::Null), &path(&at, "name"))?.into()));
        if let Some(d) = t.get("description").filter(|d| !d.is_null()) {
            f.insert("description".into(), d.clone());
        }
        f.insert("parameters".into(), Value::Object(object(t.get("input_schema").unwrap_or(&Value::Null), &path(&at, "input_schema"))?.clone()));
        if let Some(s) = t.get("strict").filter(|s| !s.is_null()) {
            f.insert("strict".into(), s.clone());
        }
        Ok(json!({"type": "function", "function": f}))
    });
    Ok(Value::Array(tools.collect::<Result<_, _>>()?))
}

/// `tool_choice` as OpenAI's, and `disable_parallel_tool_use` as `parallel_tool_calls: false`.
fn tool_choice(v: &Value, out: &mut Map<String, Value>) -> Result<(), Refused> {
    let c = object(v, "tool_choice")?;
    only(c, &["type", "name", "disable_parallel_tool_use"], "tool_choice", OPENAI)?;
    let choice = match c.get("type").and_then(Value::as_str) {
        Some("auto") => json!("auto"),
        Some("any") => json!("required"),
        Some("none") => json!("none"),
        Some("tool") => json!({"type": "function", "function": {"name": string(c.get("name").unwrap_or(&Value::Null), "tool_choice.name")?}}),
        _ => return Err(invalid("tool_choice.type", "must be \"auto\", \"any\", \"tool\" or \"none\"")),
    };
    if c.get("disable_parallel_tool_use") == Some(&Value::Bool(true)) {
        out.insert("parallel_tool_calls".into(), Value::Bool(false));
    }
    out.insert("tool_choice".into(), choice);
    Ok(())
}

/// One Anthropic message as one or more chat messages (a user turn's tool results become
/// `tool` messages, placed before the rest of the turn).
fn message(m: &Value, at: &str, out: &mut Vec<Value>) -> Result<(), Refused> {
    let m = object(m, at)?;
    only(m, &["role", "content"], at, OPENAI)?;
    let content = m.get("content").filter(|c| !c.is_null()).ok_or_else(|| invalid(path(at, "content"), "is required"))?;
    let content_at = path(at, "content");
    match m.get("role").and_then(Value::as_str) {
        Some("system") => out.push(json!({"role": "system", "content": text_only_to_chat(content, &content_at)?})),
        Some("user") => user_turn(content, &content_at, out)?,
        Some("assistant") => out.push(assistant_turn(content, &content_at)?),
        _ => return Err(invalid(path(at, "role"), "must be \"user\", \"assistant\" or \"system\"")),
    }
    Ok(())
}

fn user_turn(content: &Value, at: &str, out: &mut Vec<Value>) -> Result<(), Refused> {
    let Value::Array(blocks) = content else {
        out.push(json!({"role": "user", "content": string(content, at)?}));
        return Ok(());
    };
    let (mut parts, mut results) = (Vec::new(), 0);
    each_item(blocks, at, |kind, b, at| {
        match kind {
            Some("text") => parts.push(text_block_to_part(b, at)?),
            Some("image") => parts.push(image_block_to_part(b, at)?),
            Some("tool_result") => {
                out.push(tool_result(b, at)?);
                results += 1;
            }
            other => return Err(block_type(other, at)),
        }
        Ok(())
    })?;
    if results == 0 || !parts.is_empty() {
        out.push(json!({"role": "user", "content": parts}));
    }
    Ok(())
}

/// A `tool_result` block as a `tool` message (text content only; `is_error: true` refused).
fn tool_result(b: &Map<String, Value>, at: &str) -> Result<Value, Refused> {
    only(b, &["type", "tool_use_id", "content", "is_error", "cache_control"], at, OPENAI)?;
    if b.get("is_error") == Some(&Value::Bool(true)) {
        return Err(unsupported(path(at, "is_error"), format!("an error tool result has no equivalent in {OPENAI}")));
    }
    let id = string(b.get("tool_use_id").unwrap_or(&Value::Null), &path(at, "tool_use_id"))?;
    let content = match b.get("content").filter(|c| !c.is_null()) {
        Some(c) => text_only_to_chat(c, &path(at, "content"))?,
        None => Value::String(String::new()),
    };
    Ok(json!({"role": "tool", "tool_call_id": id, "content": content}))
}

fn assistant_turn(content: &Value, at: &str) -> Result<Value, Refused> {
    let Value::Array(blocks) = content else { return Ok(json!({"role": "assistant", "content": string(content, at)?})) };
    let (mut parts, mut calls) = (Vec::new(), Vec::new());
    each_item(blocks, at, |kind, b, at| {
        match kind {
            Some("text") => parts.push(text_block_to_part(b, at)?),
            Some("tool_use") => calls.push(tool_use_to_call(b, at)?),
            other => return Err(block_type(other, at)),
        }
        Ok(())
    })?;
    let mut m = json!({"role": "assistant", "content": if calls.is_empty() || !parts.is_empty() { Value::Array(parts) } else { Value::Null }});
    if !calls.is_empty() {
        m["tool_calls"] = Value::Array(calls);
    }
    Ok(m)
}

/// A `tool_use` block as a tool call (its `input` serialized as the `arguments` string).
fn tool_use_to_call(b: &Map<String, Value>, at: &str) -> Result<Value, Refused> {
    only(b, &["type", "id", "name", "input", "cache_control"], at, OPENAI)?;
    let id = string(b.get("id").unwrap_or(&Value::Null), &path(at, "id"))?;
    let name = string(b.get("name").unwrap_or(&Value::Null), &path(at, "name"))?;
    let input = object(b.get("input").unwrap_or(&Value::Null), &path(at, "input"))?;
    Ok(json!({"id": id, "type": "function", "function": {"name": name, "arguments": Value::Object(input.clone()).to_string()}}))
}

fn block_type(kind: Option<&str>, at: &str) -> Refused {
    match kind {
        Some(k) => unsupported(path(at, "type"), format!("a {k} block here has no equivalent in {OPENAI}")),
        None => invalid(path(at, "type"), "is required"),
    }
}

/// A Message answer as a chat completion: text blocks joined as the content, `tool_use`
/// blocks as tool calls, `stop_reason` as `finish_reason` (a stop sequence also as vLLM's
/// `stop_reason` field of the choice), usage as OpenAI counts it (cache reads and writes
/// included in `prompt_tokens`). Thinking blocks are left out (the translated request never
/// asks for them). `created` is the answer's time (Unix seconds).
pub fn message_to_chat_answer(msg: &Value, request_id: &str, created: i64) -> Result<Value, Unreadable> {
    let m = msg.as_object().filter(|m| m.get("type").and_then(Value::as_str) == Some("message"));
    let m = m.ok_or_else(|| Unreadable("the answer is not an Anthropic Message".into()))?;
    let blocks = m.get("content").and_then(Value::as_array).ok_or_else(|| Unreadable("the Message has no content array".into()))?;
    let (mut text, mut calls) = (None::<String>, Vec::new());
    for b in blocks {
        match b.get("type").and_then(Value::as_str) {
            Some("text") => text.get_or_insert_with(String::new).push_str(b.get("text").and_then(Value::as_str).unwrap_or_default()),
            Some("tool_use") => calls.push(answer_call(b)?),
            Some("thinking" | "redacted_thinking") => {}
            other => return Err(Unreadable(format!("the Message holds a {} block, which chat completions cannot express", other.unwrap_or("typeless")))),
        }
    }
    let stop = m.get("stop_reason").and_then(Value::as_str).unwrap_or("end_turn");
    let mut message = json!({"role": "assistant", "content": text, "refusal": null});
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    let mut choice = json!({"index": 0, "message": message, "logprobs": null, "finish_reason": finish_reason(stop)});
    if let Some(seq) = m.get("stop_sequence").and_then(Value::as_str).filter(|_| stop == "stop_sequence") {
        choice["stop_reason"] = Value::String(seq.into());
    }
    Ok(json!({
        "id": answer_id("chatcmpl-", request_id),
        "object": "chat.completion",
        "created": created,
        "model": m.get("model").cloned().unwrap_or(Value::Null),
        "choices": [choice],
        "usage": chat_usage(m.get("usage").unwrap_or(&Value::Null)),
        "system_fingerprint": null,
    }))
}

fn answer_call(b: &Value) -> Result<Value, Unreadable> {
    let (id, name) = (b.get("id").and_then(Value::as_str), b.get("name").and_then(Value::as_str));
    let (Some(id), Some(name)) = (id, name) else { return Err(Unreadable("a tool_use block lacks its id or name".into())) };
    let input = b.get("input").cloned().unwrap_or_else(|| json!({}));
    Ok(json!({"id": id, "type": "function", "function": {"name": name, "arguments": input.to_string()}}))
}

/// Anthropic's `stop_reason` as OpenAI's `finish_reason`.
fn finish_reason(stop: &str) -> &'static str {
    match stop {
        "max_tokens" | "model_context_window_exceeded" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        _ => "stop",
    }
}

/// Anthropic usage (input tokens counted apart from cache reads and writes) as OpenAI's
/// (prompt tokens include them; cache reads are `cached_tokens`; cache writes keep LiteLLM's
/// `cache_creation_input_tokens` so nothing is lost).
fn chat_usage(u: &Value) -> Value {
    let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
    let (input, output, written, read) = (n("input_tokens"), n("output_tokens"), n("cache_creation_input_tokens"), n("cache_read_input_tokens"));
    let prompt = input.saturating_add(written).saturating_add(read);
    let mut usage = json!({
        "prompt_tokens": prompt,
        "completion_tokens": output,
        "total_tokens": prompt.saturating_add(output),
        "prompt_tokens_details": {"cached_tokens": read},
    });
    if written > 0 {
        usage["cache_creation_input_tokens"] = json!(written);
    }
    usage
}
