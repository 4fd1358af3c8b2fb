//! The Messages ⇄ chat completions translation (`batchd::upstream::translate`): golden files
//! for tools and images in both directions (`tests/fixtures/translate/*.json`), and property
//! tests that what both sides can express survives a round trip — a Messages request through
//! a chat request and back, a Message answer through a chat completion and back — that a
//! parameter with no equivalent is refused by name, and that no JSON makes a translation panic.

use batchd::upstream::translate::{chat_answer_to_message, chat_to_messages, message_to_chat_answer, messages_to_chat, RefusalKind, Refused, ToMessages};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

fn fixtures() -> Vec<(String, Value)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/translate");
    let mut out: Vec<(String, Value)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Every golden file holds the two sides of one translation and says which ways it goes.
#[test]
fn golden_files_translate_both_ways() {
    let files = fixtures();
    assert!(files.len() >= 7, "the golden files are found: {:?}", files.iter().map(|f| &f.0).collect::<Vec<_>>());
    let opts = ToMessages::default();
    let mut checked = 0;
    for (name, f) in &files {
        let dir = f["direction"].as_str().unwrap();
        let both = dir == "both";
        let (rid, created) = (f["request_id"].as_str().unwrap_or(""), f["created"].as_i64().unwrap_or(0));
        if f.get("message").is_some() {
            if both || dir == "message_to_chat" {
                assert_eq!(message_to_chat_answer(&f["message"], rid, created).unwrap(), f["chat"], "{name}: Message → chat completion");
                checked += 1;
            }
            if both || dir == "chat_to_message" {
                assert_eq!(chat_answer_to_message(&f["chat"], rid).unwrap(), f["message"], "{name}: chat completion → Message");
                checked += 1;
            }
            continue;
        }
        if both || dir == "messages_to_chat" {
            assert_eq!(messages_to_chat(&f["messages"]).unwrap(), f["chat"], "{name}: Messages → chat");
            checked += 1;
        }
        if both || dir == "chat_to_messages" {
            assert_eq!(chat_to_messages(&f["chat"], &opts).unwrap(), f["messages"], "{name}: chat → Messages");
            checked += 1;
        }
    }
    assert_eq!(checked, 10, "each file's directions were checked");
}

/// The tool-call arguments of a translated request are the tool_use input, as JSON.
#[test]
fn tool_arguments_are_the_input_as_json_text() {
    let f = fixtures().into_iter().find(|f| f.0 == "tools_request.json").unwrap().1;
    let chat = messages_to_chat(&f["messages"]).unwrap();
    let args = chat["messages"][2]["tool_calls"][0]["function"]["arguments"].as_str().unwrap();
    assert_eq!(serde_json::from_str::<Value>(args).unwrap(), json!({"city": "Paris", "unit": "celsius"}));
}

// ---- generators of what both sides can express ----

fn text() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 .,!?é\n]{0,24}"
}

fn text_block() -> impl Strategy<Value = Value> {
    text().prop_map(|t| json!({"type": "text", "text": t}))
}

fn image_block() -> impl Strategy<Value = Value> {
    prop_oneof![
        (prop::sample::select(vec!["image/jpeg", "image/png", "image/gif", "image/webp"]), "[A-Za-z0-9+/]{4,16}={0,2}")
            .prop_map(|(m, d)| json!({"type": "image", "source": {"type": "base64", "media_type": m, "data": d}})),
        "[a-z]{1,8}".prop_map(|p| json!({"type": "image", "source": {"type": "url", "url": format!("https://example.com/{p}.png")}})),
    ]
}

fn small_object() -> impl Strategy<Value = Value> {
    prop::collection::btree_map(
        "[a-z]{1,6}",
        prop_oneof![text().prop_map(Value::from), any::<i32>().prop_map(Value::from), any::<bool>().prop_map(Value::from)],
        0..4,
    )
    .prop_map(|m| Value::Object(m.into_iter().collect()))
}

fn tool_use() -> impl Strategy<Value = Value> {
    ("toolu_[a-z0-9]{4}", "[a-z_]{1,10}", small_object()).prop_map(|(id, name, input)| json!({"type": "tool_use", "id": id, "name": name, "input": input}))
}

fn tool_result() -> impl Strategy<Value = Value> {
    ("toolu_[a-z0-9]{4}", prop_oneof![text().prop_map(Value::from), prop::collection::vec(text_block(), 0..3).prop_map(Value::from)])
        .prop_map(|(id, content)| json!({"type": "tool_result", "tool_use_id": id, "content": content}))
}

/// A user turn: a string, or tool results first, then text and images.
fn user_turn() -> impl Strategy<Value = Value> {
    let blocks =
        (prop::collection::vec(tool_result(), 0..3), prop::collection::vec(prop_oneof![text_block(), image_block()], 0..4)).prop_map(|(mut results, rest)| {
            results.extend(rest);
            Value::Array(results)
        });
    prop_oneof![text().prop_map(Value::from), blocks].prop_map(|c| json!({"role": "user", "content": c}))
}

/// An assistant turn: a string, or text blocks then tool calls.
fn assistant_turn() -> impl Strategy<Value = Value> {
    let blocks = (prop::collection::vec(text_block(), 0..3), prop::collection::vec(tool_use(), 0..3)).prop_map(|(mut t, calls)| {
        t.extend(calls);
        Value::Array(t)
    });
    prop_oneof![text().prop_map(Value::from), blocks].prop_map(|c| json!({"role": "assistant", "content": c}))
}

fn conversation() -> impl Strategy<Value = Vec<Value>> {
    prop::collection::vec((user_turn(), assistant_turn()), 1..4).prop_flat_map(|pairs| {
        let turns: Vec<Value> = pairs.into_iter().flat_map(|(u, a)| [u, a]).collect();
        let n = turns.len();
        (Just(turns), n - 1..=n).prop_map(|(mut t, keep)| {
            t.truncate(keep);
            t
        })
    })
}

fn tool() -> impl Strategy<Value = Value> {
    ("[a-z_]{1,10}", prop::option::of(text()), any::<Option<bool>>()).prop_map(|(name, desc, strict)| {
        let mut t = json!({"name": name, "input_schema": {"type": "object", "properties": {"x": {"type": "string"}}}});
        if let Some(d) = desc {
            t["description"] = d.into();
        }
        if let Some(s) = strict {
            t["strict"] = s.into();
        }
        t
    })
}

fn tool_choice() -> impl Strategy<Value = Value> {
    (prop_oneof![Just(json!({"type": "auto"})), Just(json!({"type": "any"})), "[a-z_]{1,10}".prop_map(|n| json!({"type": "tool", "name": n}))], any::<bool>())
        .prop_map(|(mut c, no_parallel)| {
            if no_parallel {
                c["disable_parallel_tool_use"] = true.into();
            }
            c
        })
}

/// A fraction with an exact decimal form, as users write sampling parameters.
fn fraction() -> impl Strategy<Value = Value> {
    (0u32..=100).prop_map(|n| json!(f64::from(n) / 100.0))
}

/// A Messages request of what both APIs can express.
fn messages_request() -> impl Strategy<Value = Value> {
    let system = prop::option::of(prop_oneof![text().prop_map(Value::from), prop::collection::vec(text_block(), 0..3).prop_map(Value::from)]);
    let sampling =
        (prop::option::of(fraction()), prop::option::of(fraction()), prop::option::of(1u32..200), prop::option::of(prop::collection::vec(text(), 0..3)));
    let tools = prop::option::of((prop::collection::vec(tool(), 1..3), prop::option::of(prop_oneof![tool_choice(), Just(json!({"type": "none"}))])));
    ("[a-z0-9-]{1,12}", 1u64..200_000, system, conversation(), sampling, prop::option::of("[a-z0-9-]{1,12}"), tools).prop_map(
        |(model, max_tokens, system, messages, (temperature, top_p, top_k, stop), user, tools)| {
            let mut r = Map::new();
            r.insert("model".into(), model.into());
            r.insert("max_tokens".into(), max_tokens.into());
            r.insert("messages".into(), messages.into());
            let optional = [
                ("system", system),
                ("temperature", temperature),
                ("top_p", top_p),
                ("top_k", top_k.map(Value::from)),
                ("stop_sequences", stop.map(Value::from)),
                ("metadata", user.map(|u| json!({"user_id": u}))),
            ];
            for (k, v) in optional {
                if let Some(v) = v {
                    r.insert(k.into(), v);
                }
            }
            if let Some((tools, choice)) = tools {
                r.insert("tools".into(), tools.into());
                if let Some(c) = choice {
                    r.insert("tool_choice".into(), c);
                }
            }
            Value::Object(r)
        },
    )
}

/// A Message of what a chat completion can express: at most one text block, then tool calls.
fn message_answer() -> impl Strategy<Value = Value> {
    let stop = prop_oneof![
        Just(("end_turn", Value::Null)),
        Just(("max_tokens", Value::Null)),
        Just(("tool_use", Value::Null)),
        Just(("refusal", Value::Null)),
        "[a-zA-Z#]{1,5}".prop_map(|s| ("stop_sequence", Value::from(s))),
    ];
    let usage = (0u64..1_000_000, 0u64..100_000, 0u64..100_000, 0u64..100_000);
    (prop::option::of(text()), prop::collection::vec(tool_use(), 0..3), stop, usage, "[a-z0-9-]{1,12}").prop_map(|(text, calls, (stop, seq), u, model)| {
        let mut content: Vec<Value> = text.map(|t| json!({"type": "text", "text": t})).into_iter().collect();
        content.extend(calls);
        json!({
            "id": "msg_00000000000000000000000000000abc", "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": stop, "stop_sequence": seq,
            "usage": {"input_tokens": u.0, "output_tokens": u.1, "cache_creation_input_tokens": u.2, "cache_read_input_tokens": u.3},
        })
    })
}

/// A chat completion of what a Message can express: one choice, its text or none, tool calls
/// with object arguments, a finish reason (a stop sequence named as vLLM does), usage with
/// cached prompt tokens and LiteLLM's cache writes.
fn chat_answer() -> impl Strategy<Value = Value> {
    let finish = prop_oneof![
        Just(("stop", None)),
        Just(("length", None)),
        Just(("tool_calls", None)),
        Just(("content_filter", None)),
        "[a-zA-Z#]{1,5}".prop_map(|s| ("stop", Some(s))),
    ];
    let call = ("call_[a-z0-9]{4}", "[a-z_]{1,10}", small_object())
        .prop_map(|(id, name, args)| json!({"id": id, "type": "function", "function": {"name": name, "arguments": args.to_string()}}));
    let usage = (0u64..100_000, 0u64..100_000, 0u64..50_000, 0u64..50_000);
    (prop::option::of(text()), prop::collection::vec(call, 0..3), finish, usage, "[a-z0-9-]{1,12}").prop_map(|(text, calls, (finish, seq), u, model)| {
        let mut message = json!({"role": "assistant", "content": text, "refusal": null});
        if !calls.is_empty() {
            message["tool_calls"] = calls.into();
        }
        let mut choice = json!({"index": 0, "message": message, "logprobs": null, "finish_reason": finish});
        if let Some(seq) = seq {
            choice["stop_reason"] = seq.into();
        }
        let (input, output, written, read) = u;
        let prompt = input + written + read;
        let mut usage =
            json!({"prompt_tokens": prompt, "completion_tokens": output, "total_tokens": prompt + output, "prompt_tokens_details": {"cached_tokens": read}});
        if written > 0 {
            usage["cache_creation_input_tokens"] = written.into();
        }
        json!({"id": "chatcmpl-00000000000000000000000000000abc", "object": "chat.completion", "created": 1_700_000_000, "model": model,
               "choices": [choice], "usage": usage, "system_fingerprint": null})
    })
}

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![Just(Value::Null), any::<bool>().prop_map(Value::from), any::<i64>().prop_map(Value::from), "[a-z_]{0,8}".prop_map(Value::from)];
    leaf.prop_recursive(5, 64, 6, |inner| {
        let keys = prop::sample::select(vec![
            "model",
            "messages",
            "role",
            "content",
            "type",
            "text",
            "tool_calls",
            "tool_use",
            "id",
            "name",
            "input",
            "choices",
            "message",
            "usage",
            "system",
            "tools",
            "function",
            "arguments",
            "image_url",
            "url",
            "source",
            "stop",
            "tool_choice",
            "max_tokens",
        ]);
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::from),
            prop::collection::vec((keys, inner), 0..6).prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
        ]
    })
}

const RID: &str = "batch_req_00000000000000000000000000000abc";

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Messages → chat → Messages gives the request back, whatever its turns, blocks, tools
    /// and sampling parameters.
    #[test]
    fn a_messages_request_round_trips_through_chat(req in messages_request()) {
        let chat = messages_to_chat(&req).unwrap();
        prop_assert!(chat["messages"].as_array().unwrap().iter().all(|m| m["role"] != "user" || m["content"].is_string() || m["content"].is_array()));
        let back = chat_to_messages(&chat, &ToMessages::default()).unwrap();
        prop_assert_eq!(back, req);
    }

    /// A Message → chat completion → Message gives the answer back (content, tool calls, stop
    /// reason and sequence, usage with cache reads and writes).
    #[test]
    fn a_message_answer_round_trips_through_a_chat_completion(msg in message_answer()) {
        let chat = message_to_chat_answer(&msg, RID, 1_700_000_000).unwrap();
        let u = &msg["usage"];
        let prompt = ["input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"].iter().map(|k| u[k].as_u64().unwrap()).sum::<u64>();
        prop_assert_eq!(chat["usage"]["prompt_tokens"].as_u64(), Some(prompt), "OpenAI counts every input token as a prompt token");
        prop_assert_eq!(chat["id"].as_str().unwrap(), "chatcmpl-00000000000000000000000000000abc");
        let back = chat_answer_to_message(&chat, RID).unwrap();
        prop_assert_eq!(back, msg);
    }

    /// A chat completion → Message → chat completion gives the answer back: what an OpenAI-format
    /// line answered through an Anthropic-speaking upstream ends as, compared with what an
    /// OpenAI-compatible one would have answered.
    #[test]
    fn a_chat_completion_round_trips_through_a_message(chat in chat_answer()) {
        let msg = chat_answer_to_message(&chat, RID).unwrap();
        prop_assert_eq!(msg["id"].as_str().unwrap(), "msg_00000000000000000000000000000abc");
        let back = message_to_chat_answer(&msg, RID, 1_700_000_000).unwrap();
        prop_assert_eq!(back, chat);
    }

    /// A parameter with no equivalent, added to a request that translates, is refused by name.
    #[test]
    fn an_untranslatable_parameter_is_refused_by_name(req in messages_request(), which in 0usize..6) {
        let (key, value) = [
            ("thinking", json!({"type": "enabled", "budget_tokens": 2048})),
            ("container", json!("c-1")),
            ("stream", json!(true)),
            ("inference_geo", json!("eu")),
            ("output_config", json!({"effort": "high"})),
            ("metadata", json!({"user_id": "u", "tenant": "t"})),
        ][which].clone();
        let mut bad = req.clone();
        bad[key] = value;
        let e: Refused = messages_to_chat(&bad).unwrap_err();
        prop_assert!(e.param == key || e.param.starts_with(&format!("{key}.")), "{e:?}");
        prop_assert_eq!(e.kind, RefusalKind::Unsupported);
        let chat = messages_to_chat(&req).unwrap();
        let (key, value) = [("seed", json!(7)), ("logprobs", json!(true)), ("n", json!(2)), ("temperature", json!(1.5)), ("reasoning_effort", json!("low")), ("frequency_penalty", json!(0.5))][which].clone();
        let mut bad = chat;
        bad[key] = value;
        let e = chat_to_messages(&bad, &ToMessages::default()).unwrap_err();
        prop_assert_eq!(e.param, key);
    }

    /// No JSON makes a translation panic; a refusal always names a parameter.
    #[test]
    fn no_json_makes_a_translation_panic(v in any_json()) {
        if let Err(e) = messages_to_chat(&v) {
            prop_assert!(!e.reason.is_empty());
        }
        let _ = chat_to_messages(&v, &ToMessages { default_max_tokens: Some(5) });
        let _ = chat_answer_to_message(&v, RID);
        let _ = message_to_chat_answer(&v, RID, 0);
    }
}
