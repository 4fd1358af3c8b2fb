//! Content pieces both APIs have: text, and images (base64 or URL). Anthropic writes them as
//! content blocks (`{"type": "text"}`, `{"type": "image", "source": …}`), OpenAI as content
//! parts (`{"type": "text"}`, `{"type": "image_url", "image_url": {"url"}}`, a base64 image
//! being a `data:` URL).

use serde_json::{json, Map, Value};

use super::{each_item, invalid, object, only, path, string, unsupported, Refused};

const ANTHROPIC: &str = "Anthropic's Messages API";
const OPENAI: &str = "OpenAI's chat completions";

/// The image types Anthropic accepts inline.
pub const IMAGE_TYPES: [&str; 4] = ["image/jpeg", "image/png", "image/gif", "image/webp"];

/// An Anthropic text block as an OpenAI text part (`cache_control` dropped: a hint).
pub fn text_block_to_part(b: &Map<String, Value>, at: &str) -> Result<Value, Refused> {
    only(b, &["type", "text", "cache_control", "citations"], at, OPENAI)?;
    if b.get("citations").and_then(Value::as_array).is_some_and(|c| !c.is_empty()) {
        return Err(unsupported(path(at, "citations"), format!("has no equivalent in {OPENAI}")));
    }
    let text = string(b.get("text").unwrap_or(&Value::Null), &path(at, "text"))?;
    Ok(json!({"type": "text", "text": text}))
}

/// An OpenAI text part as an Anthropic text block.
pub fn text_part_to_block(p: &Map<String, Value>, at: &str) -> Result<Value, Refused> {
    only(p, &["type", "text"], at, ANTHROPIC)?;
    let text = string(p.get("text").unwrap_or(&Value::Null), &path(at, "text"))?;
    Ok(json!({"type": "text", "text": text}))
}

/// An Anthropic image block as an OpenAI `image_url` part: a base64 source becomes a
/// `data:` URL, a URL source stays a URL.
pub fn image_block_to_part(b: &Map<String, Value>, at: &str) -> Result<Value, Refused> {
    only(b, &["type", "source", "cache_control"], at, OPENAI)?;
    let at = path(at, "source");
    let source = object(b.get("source").unwrap_or(&Value::Null), &at)?;
    let url = match source.get("type").and_then(Value::as_str) {
        Some("base64") => {
            only(source, &["type", "media_type", "data"], &at, OPENAI)?;
            let media = string(source.get("media_type").unwrap_or(&Value::Null), &path(&at, "media_type"))?;
            let data = string(source.get("data").unwrap_or(&Value::Null), &path(&at, "data"))?;
            format!("data:{media};base64,{data}")
        }
        Some("url") => {
            only(source, &["type", "url"], &at, OPENAI)?;
            string(source.get("url").unwrap_or(&Value::Null), &path(&at, "url"))?.to_string()
        }
        Some(other) => return Err(unsupported(path(&at, "type"), format!("an image source of type {other:?} has no equivalent in {OPENAI}"))),
        None => return Err(invalid(path(&at, "type"), "must be \"base64\" or \"url\"")),
    };
    Ok(json!({"type": "image_url", "image_url": {"url": url}}))
}

/// An OpenAI `image_url` part as an Anthropic image block. `detail` other than `auto` is
/// refused (Anthropic has no detail level).
pub fn image_part_to_block(p: &Map<String, Value>, at: &str) -> Result<Value, Refused> {
    only(p, &["type", "image_url"], at, ANTHROPIC)?;
    let at = path(at, "image_url");
    let image = object(p.get("image_url").unwrap_or(&Value::Null), &at)?;
    only(image, &["url", "detail"], &at, ANTHROPIC)?;
    if image.get("detail").and_then(Value::as_str).is_some_and(|d| d != "auto") {
        return Err(unsupported(path(&at, "detail"), format!("only \"auto\" has an equivalent in {ANTHROPIC}")));
    }
    let url_at = path(&at, "url");
    let url = string(image.get("url").unwrap_or(&Value::Null), &url_at)?;
    let source = match url.strip_prefix("data:") {
        Some(data_url) => base64_source(data_url, &url_at)?,
        None if url.starts_with("https://") || url.starts_with("http://") => json!({"type": "url", "url": url}),
        None => return Err(invalid(url_at, "must be an http(s) URL or a base64 data: URL")),
    };
    Ok(json!({"type": "image", "source": source}))
}

/// `<media type>;base64,<data>` (a data URL after `data:`) as an Anthropic base64 source.
fn base64_source(data_url: &str, at: &str) -> Result<Value, Refused> {
    let Some((head, data)) = data_url.split_once(',') else { return Err(invalid(at, "a data: URL needs a comma before its data")) };
    let Some(media) = head.strip_suffix(";base64") else {
        return Err(unsupported(at, "only base64 data: URLs have an equivalent in Anthropic's Messages API"));
    };
    if !IMAGE_TYPES.contains(&media) {
        return Err(unsupported(at, format!("the image type {media:?} is not one Anthropic accepts ({})", IMAGE_TYPES.join(", "))));
    }
    Ok(json!({"type": "base64", "media_type": media, "data": data}))
}

/// Anthropic content (a string, or blocks) made only of text blocks, as OpenAI content: a
/// string stays a string, blocks become text parts. Used where OpenAI takes text only
/// (system prompts, tool results).
pub fn text_only_to_chat(content: &Value, at: &str) -> Result<Value, Refused> {
    text_only(content, at, text_block_to_part, ("block", OPENAI))
}

/// OpenAI content (a string, or parts) made only of text parts, as Anthropic content.
pub fn text_only_to_messages(content: &Value, at: &str) -> Result<Value, Refused> {
    text_only(content, at, text_part_to_block, ("part", ANTHROPIC))
}

/// A string as it is, or an array whose every item is text, each converted by `text`;
/// `(item, side)` name what the items are called and the API the others have no equivalent in.
fn text_only(content: &Value, at: &str, text: fn(&Map<String, Value>, &str) -> Result<Value, Refused>, (item, side): (&str, &str)) -> Result<Value, Refused> {
    let Value::Array(items) = content else {
        return content.as_str().map(|s| Value::String(s.into())).ok_or_else(|| invalid(at, format!("must be a string or an array of content {item}s")));
    };
    let mut converted = Vec::with_capacity(items.len());
    each_item(items, at, |kind, x, at| {
        match kind {
            Some("text") => converted.push(text(x, at)?),
            other => return Err(unsupported(path(at, "type"), format!("a {} {item} here has no equivalent in {side}", other.unwrap_or("typeless")))),
        }
        Ok(())
    })?;
    Ok(Value::Array(converted))
}
