//! What a pool is sent for a line, and what its answer becomes for the line.
//!
//! A line is written in one API — OpenAI's (its path is the endpoint's, `/chat/completions`,
//! `/embeddings`, …) or Anthropic's Messages (path `/messages`) — and each pool speaks one
//! (`api` in its configuration). When they agree the body passes through as bytes (only an
//! alias's model id is rewritten). When they differ the body is parsed and translated
//! (`translate`), sent to the pool's own path, and the answer translated back: a success into
//! the line's answer shape, an error body into the line's error envelope, both keeping the
//! status code. Only lines that need translation pay for parsing.

use bytes::Bytes;
use serde_json::Value;

use super::outcome::{Answer, Outcome};
use super::translate::{self, Refused, ToMessages, CHAT_PATH, MESSAGES_PATH};
use super::Pool;
use crate::config::{UpstreamApi, UpstreamConfig};

/// Which way a line's body was translated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Translation {
    /// Sent as the line wrote it.
    None,
    /// A chat completions line sent to an Anthropic-speaking pool.
    ChatToMessages,
    /// A Messages line sent to an OpenAI-compatible pool.
    MessagesToChat,
}

/// A line's request as a pool is sent it.
#[derive(Debug, Clone)]
pub struct Outgoing<'a> {
    pub path: &'a str,
    pub body: Bytes,
    pub translation: Translation,
}

/// The way a line of `path` is translated for an upstream speaking `api`.
pub fn translation(path: &str, api: UpstreamApi) -> Translation {
    match (path == MESSAGES_PATH, api) {
        (false, UpstreamApi::Anthropic) => Translation::ChatToMessages,
        (true, UpstreamApi::OpenAi) => Translation::MessagesToChat,
        _ => Translation::None,
    }
}

/// What `cfg`'s upstream needs to know to translate a chat request for itself.
pub fn to_messages(cfg: &UpstreamConfig) -> ToMessages {
    ToMessages { default_max_tokens: cfg.default_max_tokens }
}

/// The request kind of a line of `path` (below `/v1`).
pub fn request_kind(path: &str) -> translate::RequestKind<'_> {
    if path == MESSAGES_PATH {
        translate::RequestKind::Messages
    } else {
        translate::RequestKind::OpenAi(path)
    }
}

impl Pool {
    /// The path and body this pool is sent for a line of `path` whose body names `model`,
    /// served here as `target`. `Err` when the line cannot be said in the pool's API (the
    /// validator refuses such lines first; a configuration changed since can still get here).
    pub fn outgoing<'a>(&self, path: &'a str, body: &Bytes, model: &str, target: &str) -> Result<Outgoing<'a>, Refused> {
        let translation = translation(path, self.cfg.api);
        if translation == Translation::None {
            return Ok(Outgoing { path, body: body_for(body, model, target), translation });
        }
        let request: Value = serde_json::from_slice(body).map_err(|e| translate::invalid_body(&e))?;
        let (path, mut out) = match translation {
            Translation::ChatToMessages if path == CHAT_PATH => (MESSAGES_PATH, translate::chat_to_messages(&request, &to_messages(&self.cfg))?),
            Translation::MessagesToChat => (CHAT_PATH, translate::messages_to_chat(&request)?),
            _ => return Err(translate::no_such_endpoint(path)),
        };
        out["model"] = Value::String(target.to_string());
        Ok(Outgoing { path, body: Bytes::from(serde_json::to_vec(&out).expect("a JSON value serializes")), translation })
    }

    /// The pool's answer as the line expects it (see the module's doc).
    pub fn incoming(&self, out: &Outgoing<'_>, outcome: Outcome, request_id: &str) -> Outcome {
        match (outcome, out.translation) {
            (outcome, Translation::None) | (outcome @ Outcome::Transport(_), _) => outcome,
            (Outcome::Answer(a), t) => Outcome::Answer(self.answer_back(a, t, request_id)),
        }
    }

    /// A remote batch's answer (`status`, `body`) for a line of `path`, as the line expects
    /// it: the same translation back as [`Pool::incoming`] gives an online answer.
    pub fn remote_answer_back(&self, path: &str, status: u16, body: Bytes, request_id: &str) -> (u16, Bytes) {
        let t = translation(path, self.cfg.api);
        if t == Translation::None {
            return (status, body);
        }
        let a = Answer { status, body, request_id: None, retry_after: None, rate_limits: Default::default() };
        let a = self.answer_back(a, t, request_id);
        (a.status, a.body)
    }

    fn answer_back(&self, a: Answer, t: Translation, request_id: &str) -> Answer {
        let ok = (200..300).contains(&a.status);
        let Ok(v) = serde_json::from_slice::<Value>(&a.body) else {
            // A body that is not JSON is left for the result record to describe.
            return a;
        };
        let body = match (t, ok) {
            (Translation::ChatToMessages, true) => translate::message_to_chat_answer(&v, request_id, crate::now_unix()),
            (Translation::MessagesToChat, true) => translate::chat_answer_to_message(&v, request_id),
            (Translation::ChatToMessages, false) => Ok(translate::anthropic_error_to_openai(a.status, &a.body)),
            (_, false) => Ok(translate::openai_error_to_anthropic(a.status, &a.body)),
            (Translation::None, true) => Ok(v),
        };
        match body {
            Ok(body) => Answer { body: Bytes::from(serde_json::to_vec(&body).expect("a JSON value serializes")), ..a },
            Err(e) => self.unreadable(a, t, &e),
        }
    }

    /// A 2xx answer that is not what its API promises: a 502 (batchd is the gateway that got
    /// an invalid answer), in the line's error envelope.
    fn unreadable(&self, a: Answer, t: Translation, e: &translate::Unreadable) -> Answer {
        let message = format!("upstream {:?} answered {} with a body batchd cannot translate: {e}", self.cfg.name, a.status);
        let body = match t {
            Translation::MessagesToChat => serde_json::json!({"type": "error", "error": {"type": "api_error", "message": message}}),
            _ => serde_json::json!({"error": {"message": message, "type": "upstream_error", "param": null, "code": "untranslatable_answer"}}),
        };
        Answer { status: 502, body: Bytes::from(body.to_string()), ..a }
    }
}

/// The body to send in the line's own API: unchanged unless an alias resolved the model to
/// another id.
pub fn body_for(body: &Bytes, model: &str, target: &str) -> Bytes {
    if model == target {
        return body.clone();
    }
    match serde_json::from_slice::<serde_json::Map<String, Value>>(body) {
        Ok(mut m) => {
            m.insert("model".into(), target.into());
            Bytes::from(serde_json::to_vec(&m).unwrap_or_else(|_| body.to_vec()))
        }
        Err(_) => body.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{RawConfig, RawUpstream};

    fn pool(api: UpstreamApi, default_max_tokens: Option<u64>) -> std::sync::Arc<Pool> {
        let raw = RawUpstream { name: "u".into(), base_url: "http://127.0.0.1:9/v1".into(), api: Some(api), default_max_tokens, ..Default::default() };
        let cfg = RawConfig { upstreams: vec![raw], ..Default::default() }.resolve().unwrap();
        super::super::Router::new(&cfg.upstreams).unwrap().pools()[0].clone()
    }

    fn answer(status: u16, body: Value) -> Outcome {
        Outcome::Answer(Answer { status, body: Bytes::from(body.to_string()), request_id: None, retry_after: None, rate_limits: Default::default() })
    }

    fn body_of(o: &Outcome) -> (u16, Value) {
        match o {
            Outcome::Answer(a) => (a.status, serde_json::from_slice(&a.body).unwrap()),
            Outcome::Transport(e) => panic!("{e:?}"),
        }
    }

    #[test]
    fn alias_rewrites_only_the_model() {
        let body = Bytes::from_static(br#"{"model":"alias","messages":[{"role":"user","content":"hi"}]}"#);
        assert_eq!(body_for(&body, "m", "m"), body);
        let v: Value = serde_json::from_slice(&body_for(&body, "alias", "real")).unwrap();
        assert_eq!(v["model"], "real");
        assert_eq!(v["messages"][0]["content"], "hi");
    }

    #[test]
    fn lines_in_the_pools_api_pass_through_as_bytes() {
        let body = Bytes::from_static(b"{\"model\":\"m\",  \"messages\":[]}");
        let out = pool(UpstreamApi::OpenAi, None).outgoing(CHAT_PATH, &body, "m", "m").unwrap();
        assert_eq!((out.path, out.translation), (CHAT_PATH, Translation::None));
        assert_eq!(out.body, body, "not even re-serialized");
        let out = pool(UpstreamApi::Anthropic, None).outgoing(MESSAGES_PATH, &body, "m", "m").unwrap();
        assert_eq!((out.path, out.body), (MESSAGES_PATH, body));
    }

    #[test]
    fn a_chat_line_goes_to_an_anthropic_pool_as_messages_and_comes_back_as_a_chat_completion() {
        let p = pool(UpstreamApi::Anthropic, Some(64));
        let body = Bytes::from_static(br#"{"model":"alias","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"}]}"#);
        let out = p.outgoing(CHAT_PATH, &body, "alias", "claude-x").unwrap();
        assert_eq!((out.path, out.translation), (MESSAGES_PATH, Translation::ChatToMessages));
        let sent: Value = serde_json::from_slice(&out.body).unwrap();
        assert_eq!(sent, serde_json::json!({"model": "claude-x", "max_tokens": 64, "system": "be brief", "messages": [{"role": "user", "content": "hi"}]}));
        let msg = serde_json::json!({"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x", "content": [{"type": "text", "text": "hello"}],
            "stop_reason": "max_tokens", "stop_sequence": null, "usage": {"input_tokens": 5, "output_tokens": 64}});
        let (status, back) = body_of(&p.incoming(&out, answer(200, msg), "batch_req_42"));
        assert_eq!(status, 200);
        assert_eq!((back["id"].as_str(), back["object"].as_str()), (Some("chatcmpl-42"), Some("chat.completion")));
        assert_eq!(back["choices"][0]["message"]["content"], "hello");
        assert_eq!(back["choices"][0]["finish_reason"], "length");
        assert_eq!(back["usage"]["prompt_tokens"], 5);
        let err = serde_json::json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}});
        let (status, back) = body_of(&p.incoming(&out, answer(529, err), "batch_req_42"));
        assert_eq!((status, back["error"]["type"].as_str(), back["error"]["message"].as_str()), (529, Some("overloaded_error"), Some("Overloaded")));
        let (status, back) = body_of(&p.incoming(&out, answer(200, serde_json::json!({"unexpected": true})), "batch_req_42"));
        assert_eq!(status, 502, "a 2xx that is no Message is the upstream's fault, told in OpenAI's envelope");
        assert_eq!(back["error"]["code"], "untranslatable_answer");
    }

    #[test]
    fn a_messages_line_goes_to_an_openai_pool_as_chat_and_comes_back_as_a_message() {
        let p = pool(UpstreamApi::OpenAi, None);
        let body = Bytes::from_static(br#"{"model":"m","max_tokens":9,"messages":[{"role":"user","content":"hi"}],"top_k":5}"#);
        let out = p.outgoing(MESSAGES_PATH, &body, "m", "m").unwrap();
        assert_eq!((out.path, out.translation), (CHAT_PATH, Translation::MessagesToChat));
        let chat = serde_json::json!({"id": "c", "model": "m", "choices": [{"index": 0, "message": {"role": "assistant", "content": "yo"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}});
        let (status, back) = body_of(&p.incoming(&out, answer(200, chat), "batch_req_7"));
        assert_eq!((status, back["id"].as_str(), back["stop_reason"].as_str()), (200, Some("msg_7"), Some("end_turn")));
        let (status, back) = body_of(&p.incoming(&out, answer(429, serde_json::json!({"error": {"message": "slow down", "type": "requests"}})), "batch_req_7"));
        assert_eq!(back, serde_json::json!({"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}));
        assert_eq!(status, 429);
    }

    #[test]
    fn what_cannot_be_said_is_refused_by_name() {
        let p = pool(UpstreamApi::Anthropic, None);
        let no_max = Bytes::from_static(br#"{"model":"m","messages":[]}"#);
        assert_eq!(p.outgoing(CHAT_PATH, &no_max, "m", "m").unwrap_err().param, "max_tokens");
        let embeddings = Bytes::from_static(br#"{"model":"m","input":"x"}"#);
        assert_eq!(p.outgoing("/embeddings", &embeddings, "m", "m").unwrap_err().param, "url");
        assert_eq!(p.outgoing(CHAT_PATH, &Bytes::from_static(b"{nope"), "m", "m").unwrap_err().param, "body");
    }
}
