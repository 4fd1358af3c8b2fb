//! The refusal rules, the hints that are dropped, error shapes and ids, one case each (the
//! golden files and the property tests are in `tests/it/translate.rs`).

use serde_json::{json, Value};

use super::*;

fn messages_req(extra: Value) -> Value {
    let mut r = json!({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]});
    for (k, v) in extra.as_object().unwrap() {
        r[k] = v.clone();
    }
    r
}

fn chat_req(extra: Value) -> Value {
    let mut r = json!({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]});
    for (k, v) in extra.as_object().unwrap() {
        r[k] = v.clone();
    }
    r
}

fn user_blocks(blocks: Value) -> Value {
    messages_req(json!({"messages": [{"role": "user", "content": blocks}]}))
}

#[test]
fn what_a_chat_upstream_cannot_be_told_is_refused_by_name() {
    let cases = [
        (messages_req(json!({"thinking": {"type": "enabled", "budget_tokens": 1024}})), "thinking"),
        (messages_req(json!({"thinking": {"type": "adaptive"}})), "thinking"),
        (messages_req(json!({"stream": true})), "stream"),
        (messages_req(json!({"container": "x"})), "container"),
        (messages_req(json!({"output_config": {"effort": "low"}})), "output_config.effort"),
        (messages_req(json!({"tools": [{"type": "web_search_20250305", "name": "web_search"}]})), "tools[0].type"),
        (messages_req(json!({"tools": [{"name": "t", "input_schema": {"type": "object"}, "defer_loading": true}]})), "tools[0].defer_loading"),
        (
            user_blocks(json!([{"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"}}])),
            "messages[0].content[0].type",
        ),
        (user_blocks(json!([{"type": "image", "source": {"type": "file", "file_id": "f"}}])), "messages[0].content[0].source.type"),
        (user_blocks(json!([{"type": "tool_result", "tool_use_id": "t", "content": "boom", "is_error": true}])), "messages[0].content[0].is_error"),
        (
            user_blocks(json!([{"type": "tool_result", "tool_use_id": "t", "content": [{"type": "image", "source": {"type": "url", "url": "https://x"}}]}])),
            "messages[0].content[0].content[0].type",
        ),
        (user_blocks(json!([{"type": "text", "text": "x", "citations": [{"type": "char_location"}]}])), "messages[0].content[0].citations"),
        (
            messages_req(json!({"messages": [{"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": "s"}]}]})),
            "messages[0].content[0].type",
        ),
        (messages_req(json!({"system": [{"type": "image", "source": {"type": "url", "url": "https://x"}}]})), "system[0].type"),
    ];
    for (req, param) in cases {
        let e = messages_to_chat(&req).unwrap_err();
        assert_eq!(e.param, param, "{req}: {e}");
        assert_eq!(e.kind, RefusalKind::Unsupported, "{e}");
        assert_eq!(e.code(), "unsupported_parameter");
    }
}

#[test]
fn what_an_anthropic_upstream_cannot_be_told_is_refused_by_name() {
    let opts = ToMessages::default();
    let cases = [
        (chat_req(json!({"seed": 1})), "seed"),
        (chat_req(json!({"n": 2})), "n"),
        (chat_req(json!({"logprobs": true})), "logprobs"),
        (chat_req(json!({"top_logprobs": 2})), "top_logprobs"),
        (chat_req(json!({"frequency_penalty": 0.1})), "frequency_penalty"),
        (chat_req(json!({"logit_bias": {"50256": -100}})), "logit_bias"),
        (chat_req(json!({"temperature": 1.3})), "temperature"),
        (chat_req(json!({"stream": true})), "stream"),
        (chat_req(json!({"response_format": {"type": "json_object"}})), "response_format.type"),
        (chat_req(json!({"reasoning_effort": "high"})), "reasoning_effort"),
        (chat_req(json!({"functions": [{"name": "f"}]})), "functions"),
        (chat_req(json!({"audio": {"voice": "alloy"}, "modalities": ["text", "audio"]})), "audio"),
        (chat_req(json!({"modalities": ["text", "audio"]})), "modalities"),
        (chat_req(json!({"tools": [{"type": "custom", "custom": {"name": "x"}}]})), "tools[0].type"),
        (chat_req(json!({"user": "a", "safety_identifier": "b"})), "safety_identifier"),
        (chat_req(json!({"messages": [{"role": "user", "content": "hi", "name": "alice"}]})), "messages[0].name"),
        (chat_req(json!({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "late"}]})), "messages[1].role"),
        (
            chat_req(json!({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "x", "format": "wav"}}]}]})),
            "messages[0].content[0].type",
        ),
        (
            chat_req(json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}}]}]})),
            "messages[0].content[0].image_url.detail",
        ),
        (
            chat_req(json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/tiff;base64,AAAA"}}]}]})),
            "messages[0].content[0].image_url.url",
        ),
        (chat_req(json!({"messages": [{"role": "assistant", "content": null, "refusal": "no"}]})), "messages[0].refusal"),
        (chat_req(json!({"messages": [{"role": "function", "name": "f", "content": "x"}]})), "messages[0].name"),
    ];
    for (req, param) in cases {
        let e = chat_to_messages(&req, &opts).unwrap_err();
        assert_eq!(e.param, param, "{req}: {e}");
    }
    let e = chat_to_messages(&json!({"model": "m", "messages": []}), &opts).unwrap_err();
    assert_eq!((e.param.as_str(), e.kind, e.code()), ("max_tokens", RefusalKind::Invalid, "invalid_value"), "Anthropic requires max_tokens");
    let bad_args =
        chat_req(json!({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}]}));
    assert_eq!(chat_to_messages(&bad_args, &opts).unwrap_err().param, "messages[0].tool_calls[0].function.arguments");
}

/// Caching and capacity hints cannot change the answer: they are dropped, not refused; a
/// null means "not set"; parameters at their no-op value are accepted.
#[test]
fn hints_are_dropped_and_no_op_values_accepted() {
    let req = messages_req(json!({
        "cache_control": {"type": "ephemeral"}, "service_tier": "auto", "thinking": {"type": "disabled"}, "stream": false, "container": null,
        "tools": [{"name": "t", "input_schema": {"type": "object"}, "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral", "ttl": "1h"}}]}],
    }));
    let chat = messages_to_chat(&req).unwrap();
    assert_eq!(
        chat,
        json!({"model": "m", "max_tokens": 10, "tools": [{"type": "function", "function": {"name": "t", "parameters": {"type": "object"}}}],
               "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]})
    );
    let req = chat_req(json!({"n": 1, "stream": false, "logprobs": false, "presence_penalty": 0, "logit_bias": {}, "store": false, "modalities": ["text"],
                              "service_tier": "flex", "prompt_cache_key": "k", "seed": null, "response_format": {"type": "text"}}));
    let m = chat_to_messages(&req, &ToMessages::default()).unwrap();
    assert_eq!(m, json!({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}));
    let with_default = chat_to_messages(&json!({"model": "m", "messages": []}), &ToMessages { default_max_tokens: Some(77) }).unwrap();
    assert_eq!(with_default["max_tokens"], 77);
    let both = chat_req(json!({"max_completion_tokens": 5}));
    assert_eq!(chat_to_messages(&both, &ToMessages::default()).unwrap()["max_tokens"], 5, "max_completion_tokens wins over max_tokens");
    let mock = chat_req(json!({"mock": {"status": 529}}));
    assert_eq!(chat_to_messages(&mock, &ToMessages::default()).unwrap()["mock"], json!({"status": 529}), "the mock's steering passes through");
    let no_parallel = chat_req(json!({"parallel_tool_calls": false}));
    assert_eq!(chat_to_messages(&no_parallel, &ToMessages::default()).unwrap()["tool_choice"], json!({"type": "auto", "disable_parallel_tool_use": true}));
}

#[test]
fn servable_says_whether_a_body_goes_as_is_translated_or_not_at_all() {
    let opts = ToMessages::default();
    let chat = chat_req(json!({}));
    assert_eq!(servable(RequestKind::OpenAi(CHAT_PATH), UpstreamApi::OpenAi, &Value::Null, &opts), Ok(true), "nothing is read when nothing is translated");
    assert_eq!(servable(RequestKind::OpenAi(CHAT_PATH), UpstreamApi::Anthropic, &chat, &opts), Ok(false));
    assert_eq!(servable(RequestKind::OpenAi("/embeddings"), UpstreamApi::Anthropic, &chat, &opts).unwrap_err().param, "url");
    assert_eq!(servable(RequestKind::Messages, UpstreamApi::Anthropic, &Value::Null, &opts), Ok(true));
    assert_eq!(servable(RequestKind::Messages, UpstreamApi::OpenAi, &messages_req(json!({})), &opts), Ok(false));
    assert_eq!(servable(RequestKind::Messages, UpstreamApi::OpenAi, &messages_req(json!({"stream": true})), &opts).unwrap_err().param, "stream");
}

#[test]
fn error_bodies_change_envelope_and_keep_their_message() {
    let anthropic = br#"{"type":"error","error":{"type":"rate_limit_error","message":"Number of requests has exceeded your rate limit"}}"#;
    assert_eq!(
        anthropic_error_to_openai(429, anthropic),
        json!({"error": {"message": "Number of requests has exceeded your rate limit", "type": "rate_limit_error", "param": null, "code": "rate_limit_exceeded"}})
    );
    let openai = br#"{"error":{"message":"The model `x` does not exist","type":"invalid_request_error","param":null,"code":"model_not_found"}}"#;
    assert_eq!(
        openai_error_to_anthropic(404, openai),
        json!({"type": "error", "error": {"type": "not_found_error", "message": "The model `x` does not exist"}})
    );
    assert_eq!(
        openai_error_to_anthropic(503, br#"{"error":"Model is overloaded","error_type":"overloaded"}"#)["error"],
        json!({"type": "overloaded_error", "message": "Model is overloaded"})
    );
    assert_eq!(openai_error_to_anthropic(502, b"<html>bad gateway</html>")["error"]["message"], "<html>bad gateway</html>");
    let types: Vec<_> = [400, 401, 402, 403, 404, 413, 422, 429, 500, 504, 529].iter().map(|s| anthropic_error_type(*s)).collect();
    assert_eq!(
        types,
        [
            "invalid_request_error",
            "authentication_error",
            "billing_error",
            "permission_error",
            "not_found_error",
            "request_too_large",
            "invalid_request_error",
            "rate_limit_error",
            "api_error",
            "timeout_error",
            "overloaded_error"
        ]
    );
}

#[test]
fn answer_ids_follow_the_line() {
    assert_eq!(answer_id("msg_", "batch_req_00ff"), "msg_00ff");
    assert_eq!(answer_id("chatcmpl-", "batch_req_00ff"), "chatcmpl-00ff");
    let other = answer_id("msg_", "req-1");
    assert!(other.starts_with("msg_") && other.len() == 36, "{other}");
    assert_eq!(other, answer_id("msg_", "req-1"), "stable");
}

/// What a chat completion answer from a server says about why it stopped.
#[test]
fn stop_reasons_from_every_server() {
    let answer = |choice: Value| json!({"model": "m", "choices": [choice], "usage": {"prompt_tokens": 1, "completion_tokens": 1}});
    let stop = |choice: Value| chat_answer_to_message(&answer(choice), "r").unwrap();
    let msg = json!({"role": "assistant", "content": "x"});
    let m = stop(json!({"message": msg, "finish_reason": "stop", "matched_stop": "###"}));
    assert_eq!((m["stop_reason"].as_str(), m["stop_sequence"].as_str()), (Some("stop_sequence"), Some("###")), "SGLang");
    let m = stop(json!({"message": msg, "finish_reason": "stop", "stop_reason": 128009}));
    assert_eq!((m["stop_reason"].as_str(), m["stop_sequence"].as_str()), (Some("end_turn"), None), "vLLM's stop token id is no stop sequence");
    assert_eq!(stop(json!({"message": msg, "finish_reason": "content_filter"}))["stop_reason"], "refusal");
    assert_eq!(stop(json!({"message": msg, "finish_reason": "function_call"}))["stop_reason"], "tool_use");
    let bad = answer(json!({"message": {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{oops"}}]}}));
    assert!(chat_answer_to_message(&bad, "r").unwrap_err().0.contains("not a JSON object"));
    assert!(chat_answer_to_message(&json!({"object": "list"}), "r").is_err());
    assert!(message_to_chat_answer(&json!({"type": "message", "content": [{"type": "server_tool_use"}]}), "r", 0).is_err());
}
