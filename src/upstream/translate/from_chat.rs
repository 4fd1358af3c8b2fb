//! From OpenAI's side: a chat completions request as a Messages request (for an
//! Anthropic-speaking upstream), and a chat completion answer as a Message (for an
//! Anthropic-format request answered by an OpenAI-compatible upstream).

use serde_json::{json, Map, Value};

use super::content::{image_part_to_block, text_only_to_messages, text_part_to_block};
use super::{answer_id, array, index, invalid, object, only, path, set, string, unsupported, Refused, Unreadable};

const ANTHROPIC: &str = "Anthropic's Messages API";

/// What a chat request cannot say and the upstream must be told.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ToMessages {
    /// `max_tokens` for a request that sets none (Anthropic requires one); `None`: refuse.
    pub default_max_tokens: Option<u64>,
}

/// The top-level keys of a chat request that translate, that are dropped as hints, or that
/// are accepted at their no-op value (checked below).
const KNOWN: &[&str] = &[
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "stop",
    "user",
    "safety_identifier",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "stream",
    "n",
    "logprobs",
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
    "store",
    "modalities",
    "service_tier",
    "prompt_cache_key",
    "mock",
];

/// A chat completions request as a Messages request.
pub fn chat_to_messages(req: &Value, opts: &ToMessages) -> Result<Value, Refused> {
    let req = object(req, "")?;
    only(req, KNOWN, "", ANTHROPIC)?;
    let mut out = Map::new();
    out.insert("model".into(), Value::String(string(req.get("model").unwrap_or(&Value::Null), "model")?.into()));
    let (system, messages) = conversation(array(req.get("messages").unwrap_or(&Value::Null), "messages")?)?;
    out.insert("max_tokens".into(), max_tokens(req, opts)?);
    if let Some(system) = system {
        out.insert("system".into(), system);
    }
    out.insert("messages".into(), Value::Array(messages));
    for (k, v) in set(req) {
        let put = match k {
            "temperature" => Some((k, temperature(v)?)),
            "top_p" | "top_k" | "mock" => Some((k, v.clone())),
            "stop" => Some(("stop_sequences", stop(v)?)),
            "tools" => Some(("tools", tools(v)?)),
            "tool_choice" => Some(("tool_choice", tool_choice(v)?)),
            "response_format" => response_format(v, &mut out).map(|()| None)?,
            _ => no_op(k, v).map(|()| None)?,
        };
        if let Some((key, value)) = put {
            out.insert(key.into(), value);
        }
    }
    user_id(req, &mut out)?;
    if req.get("parallel_tool_calls") == Some(&Value::Bool(false)) {
        let choice = out.entry("tool_choice").or_insert_with(|| json!({"type": "auto"}));
        if choice["type"] != "none" {
            choice["disable_parallel_tool_use"] = Value::Bool(true);
        }
    }
    Ok(Value::Object(out))
}

/// The keys accepted only at the value that asks for nothing (and the hints, dropped).
fn no_op(k: &str, v: &Value) -> Result<(), Refused> {
    let fine = match k {
        "n" => v.as_u64() == Some(1),
        "stream" | "logprobs" | "store" => v == &Value::Bool(false),
        "frequency_penalty" | "presence_penalty" => v.as_f64() == Some(0.0),
        "logit_bias" => v.as_object().is_some_and(Map::is_empty),
        "modalities" => v.as_array().is_some_and(|m| m.iter().all(|x| x == "text")),
        "model" | "messages" | "max_tokens" | "max_completion_tokens" | "user" | "safety_identifier" | "parallel_tool_calls" => true,
        "service_tier" | "prompt_cache_key" => true,
        _ => false,
    };
    match (fine, k) {
        (true, _) => Ok(()),
        (false, "stream") => Err(unsupported(k, "streaming is not supported in batches")),
        _ => Err(unsupported(k, format!("the value {v} has no equivalent in {ANTHROPIC}"))),
    }
}

/// `max_completion_tokens`, else `max_tokens`, else the upstream's default.
fn max_tokens(req: &Map<String, Value>, opts: &ToMessages) -> Result<Value, Refused> {
    for k in ["max_completion_tokens", "max_tokens"] {
        if let Some(v) = req.get(k).filter(|v| !v.is_null()) {
            return v.as_u64().map(Value::from).ok_or_else(|| invalid(k, "must be a non-negative integer"));
        }
    }
    opts.default_max_tokens
        .map(Value::from)
        .ok_or_else(|| invalid("max_tokens", "an upstream speaking Anthropic's Messages API requires max_tokens (or default_max_tokens on the upstream)"))
}

/// Anthropic's temperature ranges 0 to 1, OpenAI's 0 to 2.
fn temperature(v: &Value) -> Result<Value, Refused> {
    match v.as_f64() {
        Some(t) if (0.0..=1.0).contains(&t) => Ok(v.clone()),
        Some(_) => Err(unsupported("temperature", format!("{v} is above 1, the highest temperature {ANTHROPIC} accepts"))),
        None => Err(invalid("temperature", "must be a number")),
    }
}

fn stop(v: &Value) -> Result<Value, Refused> {
    match v {
        Value::String(s) => Ok(json!([s])),
        Value::Array(a) if a.iter().all(Value::is_string) => Ok(v.clone()),
        _ => Err(invalid("stop", "must be a string or an array of strings")),
    }
}

/// `user` (or `safety_identifier`) as `metadata.user_id`.
fn user_id(req: &Map<String, Value>, out: &mut Map<String, Value>) -> Result<(), Refused> {
    let ids: Vec<&str> =
        ["user", "safety_identifier"].iter().filter_map(|k| req.get(*k).filter(|v| !v.is_null()).map(|v| string(v, k))).collect::<Result<_, _>>()?;
    match ids.as_slice() {
        [] => Ok(()),
        [a, b] if a != b => Err(unsupported("safety_identifier", format!("differs from user; {ANTHROPIC} has one metadata.user_id"))),
        [id, ..] => {
            out.insert("metadata".into(), json!({"user_id": id}));
            Ok(())
        }
    }
}

/// Function tools as Anthropic client tools.
fn tools(v: &Value) -> Result<Value, Refused> {
    let tools = array(v, "tools")?.iter().enumerate().map(|(i, t)| {
        let at = index("tools", i);
        let t = object(t, &at)?;
        if t.get("type").and_then(Value::as_str) != Some("function") {
            return Err(unsupported(path(&at, "type"), format!("only function tools have an equivalent in {ANTHROPIC}")));
        }
        only(t, &["type", "function"], &at, ANTHROPIC)?;
        let f_at = path(&at, "function");
        let f = object(t.get("function").unwrap_or(&Value::Null), &f_at)?;
        only(f, &["name", "description", "parameters", "strict"], &f_at, ANTHROPIC)?;
        let mut tool = Map::new();
        tool.insert("name".into(), Value::String(string(f.get("name").unwrap_or(&Value::Null), &path(&f_at, "name"))?.into()));
        if let Some(d) = f.get("description").filter(|d| !d.is_null()) {
            tool.insert("description".into(), d.clone());
        }
        let schema = match f.get("parameters").filter(|p| !p.is_null()) {
            Some(p) => Value::Object(object(p, &path(&f_at, "parameters"))?.clone()),
            None => json!({"type": "object", "properties": {}}),
        };
        tool.insert("input_schema".into(), schema);
        if let Some(s) = f.get("strict").filter(|s| !s.is_null()) {
            tool.insert("strict".into(), s.clone());
        }
        Ok(Value::Object(tool))
    });
    Ok(Value::Array(tools.collect::<Result<_, _>>()?))
}

fn tool_choice(v: &Value) -> Result<Value, Refused> {
    match v {
        Value::String(s) => match s.as_str() {
            "auto" => Ok(json!({"type": "auto"})),
            "required" => Ok(json!({"type": "any"})),
            "none" => Ok(json!({"type": "none"})),
            _ => Err(invalid("tool_choice", "must be \"auto\", \"required\", \"none\" or a named function")),
        },
        Value::Object(c) => {
            only(c, &["type", "function"], "tool_choice", ANTHROPIC)?;
            if c.get("type").and_then(Value::as_str) != Some("function") {
                return Err(unsupported("tool_choice.type", format!("only a named function has an equivalent in {ANTHROPIC}")));
            }
            let f = object(c.get("function").unwrap_or(&Value::Null), "tool_choice.function")?;
            only(f, &["name"], "tool_choice.function", ANTHROPIC)?;
            Ok(json!({"type": "tool", "name": string(f.get("name").unwrap_or(&Value::Null), "tool_choice.function.name")?}))
        }
        _ => Err(invalid("tool_choice", "must be a string or an object")),
    }
}

/// `text` is the default; a JSON schema becomes `output_config.format`; `json_object` (JSON
/// without a schema) has no equivalent.
fn response_format(v: &Value, out: &mut Map<String, Value>) -> Result<(), Refused> {
    let f = object(v, "response_format")?;
    match f.get("type").and_then(Value::as_str) {
        Some("text") => only(f, &["type"], "response_format", ANTHROPIC),
        Some("json_schema") => {
            only(f, &["type", "json_schema"], "response_format", ANTHROPIC)?;
            let js = object(f.get("json_schema").unwrap_or(&Value::Null), "response_format.json_schema")?;
            only(js, &["name", "schema", "strict", "description"], "response_format.json_schema", ANTHROPIC)?;
            let schema = object(js.get("schema").unwrap_or(&Value::Null), "response_format.json_schema.schema")?;
            out.insert("output_config".into(), json!({"format": {"type": "json_schema", "schema": schema}}));
            Ok(())
        }
        Some(other) => Err(unsupported("response_format.type", format!("{other:?} has no equivalent in {ANTHROPIC}"))),
        None => Err(invalid("response_format.type", "is required")),
    }
}

/// The chat messages as Anthropic's `system` (the leading system and developer messages) and
/// `messages` (tool messages become `tool_result` blocks of a user turn, with the user
/// message that follows them).
fn conversation(messages: &[Value]) -> Result<(Option<Value>, Vec<Value>), Refused> {
    let leading = messages.iter().take_while(|m| matches!(m.get("role").and_then(Value::as_str), Some("system" | "developer"))).count();
    let system = if leading == 0 { None } else { Some(system_prompt(&messages[..leading])?) };
    let mut out: Vec<Value> = Vec::new();
    // Whether the last turn in `out` is a user turn opened by tool results.
    let mut open_results = false;
    for (i, m) in messages.iter().enumerate().skip(leading) {
        let at = index("messages", i);
        let o = object(m, &at)?;
        let role = o.get("role").and_then(Value::as_str);
        let known: &[&str] = match role {
            Some("assistant") => &["role", "content", "tool_calls"],
            Some("tool") => &["role", "content", "tool_call_id"],
            _ => &["role", "content"],
        };
        only(o, known, &at, ANTHROPIC)?;
        match role {
            Some("user") if open_results => append(out.last_mut().expect("an open turn"), user_blocks(o, &at)?),
            Some("user") => out.push(json!({"role": "user", "content": user_content(o, &at)?})),
            Some("tool") if open_results => append(out.last_mut().expect("an open turn"), vec![tool_result(o, &at)?]),
            Some("tool") => out.push(json!({"role": "user", "content": [tool_result(o, &at)?]})),
            Some("assistant") => out.push(assistant(o, &at)?),
            Some("system" | "developer") => {
                return Err(unsupported(path(&at, "role"), format!("a system message after the conversation has begun has no equivalent in {ANTHROPIC}")))
            }
            _ => return Err(invalid(path(&at, "role"), "must be \"system\", \"developer\", \"user\", \"assistant\" or \"tool\"")),
        }
        open_results = role == Some("tool") || (open_results && role == Some("user"));
    }
    Ok((system, out))
}

fn append(turn: &mut Value, blocks: Vec<Value>) {
    if let Some(content) = turn["content"].as_array_mut() {
        content.extend(blocks);
    }
}

/// The leading system messages as one system prompt: the content of a lone one as it is, else
/// the text blocks of all of them.
fn system_prompt(messages: &[Value]) -> Result<Value, Refused> {
    let contents = messages.iter().enumerate().map(|(i, m)| {
        let at = index("messages", i);
        let o = object(m, &at)?;
        only(o, &["role", "content"], &at, ANTHROPIC)?;
        text_only_to_messages(o.get("content").unwrap_or(&Value::Null), &path(&at, "content"))
    });
    let mut contents = contents.collect::<Result<Vec<_>, _>>()?;
    if contents.len() == 1 {
        return Ok(contents.remove(0));
    }
    let blocks = contents.into_iter().flat_map(|c| match c {
        Value::String(s) => vec![json!({"type": "text", "text": s})],
        Value::Array(blocks) => blocks,
        _ => vec![],
    });
    Ok(Value::Array(blocks.collect()))
}

/// A user message's content: a string stays a string, parts become blocks.
fn user_content(o: &Map<String, Value>, at: &str) -> Result<Value, Refused> {
    match o.get("content") {
        Some(Value::String(s)) => Ok(Value::String(s.clone())),
        _ => user_blocks(o, at).map(Value::Array),
    }
}

fn user_blocks(o: &Map<String, Value>, at: &str) -> Result<Vec<Value>, Refused> {
    let at = path(at, "content");
    match o.get("content") {
        Some(Value::String(s)) => Ok(vec![json!({"type": "text", "text": s})]),
        Some(Value::Array(parts)) => parts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let at = index(&at, i);
                let p = object(p, &at)?;
                match p.get("type").and_then(Value::as_str) {
                    Some("text") => text_part_to_block(p, &at),
                    Some("image_url") => image_part_to_block(p, &at),
                    Some(other) => Err(unsupported(path(&at, "type"), format!("a {other} part has no equivalent in {ANTHROPIC}"))),
                    None => Err(invalid(path(&at, "type"), "is required")),
                }
            })
            .collect(),
        _ => Err(invalid(at, "must be a string or an array of content parts")),
    }
}

/// A `tool` message as a `tool_result` block.
fn tool_result(o: &Map<String, Value>, at: &str) -> Result<Value, Refused> {
    let id = string(o.get("tool_call_id").unwrap_or(&Value::Null), &path(at, "tool_call_id"))?;
    let content = text_only_to_messages(o.get("content").unwrap_or(&Value::Null), &path(at, "content"))?;
    Ok(json!({"type": "tool_result", "tool_use_id": id, "content": content}))
}

/// An assistant message: its text, then its tool calls as `tool_use` blocks.
fn assistant(o: &Map<String, Value>, at: &str) -> Result<Value, Refused> {
    let calls = match o.get("tool_calls").filter(|c| !c.is_null()) {
        Some(c) => array(c, &path(at, "tool_calls"))?
            .iter()
            .enumerate()
            .map(|(i, c)| tool_use(c, &index(&path(at, "tool_calls"), i)))
            .collect::<Result<Vec<_>, _>>()?,
        None => vec![],
    };
    let content_at = path(at, "content");
    let text = match o.get("content").filter(|c| !c.is_null()) {
        Some(c) => Some(text_only_to_messages(c, &content_at)?),
        None => None,
    };
    let content = match (text, calls.is_empty()) {
        (Some(t), true) => t,
        (None, true) => Value::String(String::new()),
        (text, false) => {
            let mut blocks = match text {
                Some(Value::String(s)) if !s.is_empty() => vec![json!({"type": "text", "text": s})],
                Some(Value::Array(b)) => b,
                _ => vec![],
            };
            blocks.extend(calls);
            Value::Array(blocks)
        }
    };
    Ok(json!({"role": "assistant", "content": content}))
}

/// A tool call as a `tool_use` block (its `arguments` must be a JSON object).
fn tool_use(c: &Value, at: &str) -> Result<Value, Refused> {
    let c = object(c, at)?;
    only(c, &["id", "type", "function"], at, ANTHROPIC)?;
    let f_at = path(at, "function");
    let f = object(c.get("function").unwrap_or(&Value::Null), &f_at)?;
    let id = string(c.get("id").unwrap_or(&Value::Null), &path(at, "id"))?;
    let name = string(f.get("name").unwrap_or(&Value::Null), &path(&f_at, "name"))?;
    let args_at = path(&f_at, "arguments");
    let args = string(f.get("arguments").unwrap_or(&Value::Null), &args_at)?;
    let input = match serde_json::from_str::<Value>(args) {
        Ok(v @ Value::Object(_)) => v,
        _ => return Err(invalid(args_at, "must be a JSON object encoded as a string")),
    };
    Ok(json!({"type": "tool_use", "id": id, "name": name, "input": input}))
}

/// A chat completion as a Message (its first choice): the content as a text block, tool
/// calls as `tool_use` blocks, `finish_reason` as `stop_reason` (a stop sequence recognised
/// from vLLM's `stop_reason` or SGLang's `matched_stop` string), usage as Anthropic counts it
/// (input tokens apart from cache reads). Reasoning text some servers add
/// (`reasoning_content`) is left out: the request asked for no thinking.
pub fn chat_answer_to_message(answer: &Value, request_id: &str) -> Result<Value, Unreadable> {
    let choice = answer.get("choices").and_then(|c| c.get(0)).ok_or_else(|| Unreadable("the answer is not a chat completion (no choices)".into()))?;
    let msg = choice.get("message").and_then(Value::as_object).ok_or_else(|| Unreadable("the answer's choice has no message".into()))?;
    let mut content = Vec::new();
    match msg.get("content") {
        Some(Value::String(s)) => content.push(json!({"type": "text", "text": s})),
        Some(Value::Array(parts)) => {
            let text: String = parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).collect();
            content.push(json!({"type": "text", "text": text}));
        }
        _ => {}
    }
    for call in msg.get("tool_calls").and_then(Value::as_array).into_iter().flatten() {
        content.push(answer_tool_use(call)?);
    }
    let matched = ["stop_reason", "matched_stop"].iter().find_map(|k| choice.get(*k).and_then(Value::as_str));
    let (stop_reason, stop_sequence) = match (choice.get("finish_reason").and_then(Value::as_str), matched) {
        (Some("stop") | None, Some(seq)) => ("stop_sequence", Value::String(seq.into())),
        (Some("length"), _) => ("max_tokens", Value::Null),
        (Some("tool_calls" | "function_call"), _) => ("tool_use", Value::Null),
        (Some("content_filter"), _) => ("refusal", Value::Null),
        _ => ("end_turn", Value::Null),
    };
    Ok(json!({
        "id": answer_id("msg_", request_id),
        "type": "message",
        "role": "assistant",
        "model": answer.get("model").cloned().unwrap_or(Value::Null),
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": message_usage(answer.get("usage").unwrap_or(&Value::Null)),
    }))
}

fn answer_tool_use(call: &Value) -> Result<Value, Unreadable> {
    let f = call.get("function").ok_or_else(|| Unreadable("a tool call has no function".into()))?;
    let (id, name) = (call.get("id").and_then(Value::as_str), f.get("name").and_then(Value::as_str));
    let (Some(id), Some(name)) = (id, name) else { return Err(Unreadable("a tool call lacks its id or name".into())) };
    let args = f.get("arguments").and_then(Value::as_str).unwrap_or("{}");
    match serde_json::from_str::<Value>(if args.trim().is_empty() { "{}" } else { args }) {
        Ok(input @ Value::Object(_)) => Ok(json!({"type": "tool_use", "id": id, "name": name, "input": input})),
        _ => Err(Unreadable(format!("the tool call {name:?} has arguments that are not a JSON object"))),
    }
}

/// OpenAI usage as Anthropic's: `input_tokens` leave out cache reads (`cached_tokens`) and
/// cache writes (LiteLLM's `cache_creation_input_tokens`, when present).
fn message_usage(u: &Value) -> Value {
    let n = |v: Option<&Value>| v.and_then(Value::as_u64).unwrap_or(0);
    let prompt = n(u.get("prompt_tokens"));
    let read = n(u.get("prompt_tokens_details").and_then(|d| d.get("cached_tokens")));
    let written = n(u.get("cache_creation_input_tokens"));
    json!({
        "input_tokens": prompt.saturating_sub(read).saturating_sub(written),
        "output_tokens": n(u.get("completion_tokens")),
        "cache_creation_input_tokens": written,
        "cache_read_input_tokens": read,
    })
}
