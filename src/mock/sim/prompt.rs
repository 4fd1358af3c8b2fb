//! What the simulated server computes on: a request body rendered through a chat template
//! and cut into tokens.
//!
//! The template is shaped like Llama 3's: a begin-of-text marker, then the tools (when the
//! request declares any) as a system turn, then every message in order as
//! `<|start_header_id|>ROLE<|end_header_id|>\n\nCONTENT<|eot_id|>`, then the header of the
//! assistant's turn. Content is the message's text (a string, or the text of its parts;
//! an image part contributes its URL; tool calls their JSON). `/v1/completions` renders its
//! prompt as is, `/v1/responses` its `instructions` as a system turn then its `input`,
//! Anthropic's `/v1/messages` its `system` then its messages, embeddings their `input`.
//!
//! The tokenizer is a stand-in with the right proportions, not a real vocabulary: every 4
//! bytes of the rendered text are one token (about what BPE tokenizers give for English), so
//! two requests share a token prefix exactly when their rendered texts share a byte prefix of
//! that length. That is the property prefix caching depends on; batchd's own prefix key
//! (`engine::prefix`) is computed independently, from the request as sent.

use serde_json::Value;

use super::super::bodies::Endpoint;

/// Bytes of rendered text per token.
pub const BYTES_PER_TOKEN: usize = 4;

const BEGIN: &str = "<|begin_of_text|>";
const END_OF_TURN: &str = "<|eot_id|>";

/// The prompt of `body` as the simulated server tokenizes it.
pub fn tokens(ep: Endpoint, body: &Value) -> Vec<u32> {
    tokenize(render(ep, body).as_bytes())
}

/// The text the template produces for `body`.
pub fn render(ep: Endpoint, body: &Value) -> String {
    let mut out = String::from(BEGIN);
    match ep {
        Endpoint::Completions => prompt(&mut out, body.get("prompt")),
        Endpoint::Embeddings | Endpoint::Moderations => prompt(&mut out, body.get("input")),
        Endpoint::Chat => {
            tools(&mut out, body.get("tools"));
            messages(&mut out, body.get("messages"));
        }
        Endpoint::Responses => {
            if let Some(text) = body.get("instructions").and_then(Value::as_str) {
                turn(&mut out, "system", text);
            }
            tools(&mut out, body.get("tools"));
            match body.get("input") {
                Some(Value::String(s)) => turn(&mut out, "user", s),
                other => messages(&mut out, other),
            }
        }
        Endpoint::Messages => {
            tools(&mut out, body.get("tools"));
            match body.get("system") {
                Some(Value::String(s)) => turn(&mut out, "system", s),
                Some(parts @ Value::Array(_)) => turn(&mut out, "system", &content_text(Some(parts))),
                _ => {}
            }
            messages(&mut out, body.get("messages"));
        }
    }
    if ep.generates() && ep != Endpoint::Completions {
        out.push_str("<|start_header_id|>assistant<|end_header_id|>\n\n");
    }
    out
}

/// Every [`BYTES_PER_TOKEN`] bytes make a token (the last one padded with zeros).
pub fn tokenize(text: &[u8]) -> Vec<u32> {
    text.chunks(BYTES_PER_TOKEN)
        .map(|c| {
            let mut t = [0u8; BYTES_PER_TOKEN];
            t[..c.len()].copy_from_slice(c);
            u32::from_le_bytes(t)
        })
        .collect()
}

fn turn(out: &mut String, role: &str, content: &str) {
    out.push_str("<|start_header_id|>");
    out.push_str(role);
    out.push_str("<|end_header_id|>\n\n");
    out.push_str(content);
    out.push_str(END_OF_TURN);
}

fn tools(out: &mut String, tools: Option<&Value>) {
    if let Some(t @ Value::Array(list)) = tools {
        if !list.is_empty() {
            turn(out, "system", &format!("You may call these tools: {t}"));
        }
    }
}

fn messages(out: &mut String, messages: Option<&Value>) {
    let Some(Value::Array(list)) = messages else { return };
    for m in list {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
        let mut content = content_text(m.get("content"));
        if let Some(calls) = m.get("tool_calls").filter(|c| !c.is_null()) {
            content.push_str(&calls.to_string());
        }
        turn(out, role, &content);
    }
}

/// The text of a message's content: a string, or its parts' text (an image part: its URL).
fn content_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts.iter().map(part_text).collect(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

fn part_text(part: &Value) -> String {
    if let Some(text) = part.get("text").and_then(Value::as_str) {
        return text.to_string();
    }
    let image = part.get("image_url").map(|u| u.get("url").unwrap_or(u));
    match image.or_else(|| part.get("source")) {
        Some(Value::String(url)) => format!("<|image|>{url}"),
        Some(v) => format!("<|image|>{v}"),
        None => part.to_string(),
    }
}

/// A completion's prompt or an embedding's input: a string, the first of a list of strings,
/// or token ids (kept as their decimal text).
fn prompt(out: &mut String, p: Option<&Value>) {
    match p {
        Some(Value::String(s)) => out.push_str(s),
        Some(Value::Array(items)) => match items.first() {
            Some(Value::String(s)) => out.push_str(s),
            Some(first @ Value::Array(_)) => out.push_str(&first.to_string()),
            Some(_) => out.push_str(&Value::Array(items.clone()).to_string()),
            None => {}
        },
        Some(other) => out.push_str(&other.to_string()),
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn chat_renders_tools_then_messages_in_order_then_the_assistant_header() {
        let body = json!({"model": "m", "messages": [{"role": "system", "content": "be brief"},
            {"content": [{"type": "text", "text": "what is "}, {"type": "image_url", "image_url": {"url": "http://x/cat.png"}}], "role": "user"}],
            "tools": [{"type": "function", "function": {"name": "f"}}]});
        let text = render(Endpoint::Chat, &body);
        let tools = text.find("You may call these tools").unwrap();
        let system = text.find("be brief").unwrap();
        let user = text.find("<|start_header_id|>user<|end_header_id|>\n\nwhat is <|image|>http://x/cat.png<|eot_id|>").unwrap();
        assert!(text.starts_with(BEGIN) && tools < system && system < user);
        assert!(text.ends_with("<|start_header_id|>assistant<|end_header_id|>\n\n"));
    }

    #[test]
    fn requests_sharing_leading_messages_share_a_token_prefix_as_long_as_their_text() {
        let doc = "d".repeat(4000);
        let a = json!({"messages": [{"role": "system", "content": doc}, {"role": "user", "content": "first question"}]});
        let b = json!({"messages": [{"role": "system", "content": doc}, {"role": "user", "content": "second one"}]});
        let (ta, tb) = (tokens(Endpoint::Chat, &a), tokens(Endpoint::Chat, &b));
        let shared = ta.iter().zip(&tb).take_while(|(x, y)| x == y).count();
        let common_text = render(Endpoint::Chat, &a).bytes().zip(render(Endpoint::Chat, &b).bytes()).take_while(|(x, y)| x == y).count();
        assert_eq!(shared, common_text / BYTES_PER_TOKEN);
        assert!(shared > 1000, "the 4,000-byte document is shared: {shared} tokens");
    }

    #[test]
    fn tokens_are_four_bytes_with_the_tail_padded() {
        assert_eq!(tokenize(b"abcdefg"), vec![u32::from_le_bytes(*b"abcd"), u32::from_le_bytes([b'e', b'f', b'g', 0])]);
        assert!(tokenize(b"").is_empty());
        let completion = tokens(Endpoint::Completions, &json!({"prompt": ["hello there", "ignored"]}));
        assert_eq!(completion.len(), (BEGIN.len() + "hello there".len()).div_ceil(4));
        let responses = render(Endpoint::Responses, &json!({"instructions": "rules", "input": "hi"}));
        assert!(responses.contains("system<|end_header_id|>\n\nrules") && responses.contains("user<|end_header_id|>\n\nhi"));
        let messages = render(Endpoint::Messages, &json!({"system": "sys", "messages": [{"role": "user", "content": "q"}]}));
        assert!(messages.find("sys").unwrap() < messages.find("q<|eot_id|>").unwrap());
    }
}
