//! A Message Batch create's body, `{"requests": [{"custom_id", "params"}, …]}`, read as it
//! arrives: each request is parsed on its own (one in memory at a time, however large the
//! body), checked by Anthropic's rules, and written to the blob store as a line of batchd's
//! own format (`{"custom_id", "method": "POST", "url": "/v1/messages", "body": params}`), so
//! the engine runs it like any other input file.
//!
//! The JSON is parsed by serde on a blocking thread reading the body through a bridge; good
//! lines go back over a bounded channel to the task writing the blob. Every problem is kept
//! with its index (`requests.3.params.max_tokens: …`), up to [`MAX_REPORTED`]; after the
//! first one nothing more is written, but the rest of the body is still checked so that one
//! answer lists them all.

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio_util::io::{StreamReader, SyncIoBridge};

use crate::upstream::translate::MESSAGES_PATH;
use crate::upstream::Router;

/// Anthropic's limits on one Message Batch.
pub const MAX_REQUESTS: u64 = 100_000;
pub const MAX_BYTES: u64 = 256 << 20;
/// Problems listed in one answer (the count says how many there were).
pub const MAX_REPORTED: usize = 1000;
const MAX_CUSTOM_ID: usize = 64;
/// The path of every line written (below the server's root).
pub const LINE_URL: &str = "/v1/messages";

/// How much a create may hold: Anthropic's limits, or the server's when lower.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_requests: u64,
    pub max_bytes: u64,
    /// One request as a line of batchd's format.
    pub max_line_bytes: u64,
}

/// One problem of a create, with the request it is in (`None`: the body's).
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub index: Option<u64>,
    /// Where, below the request (`custom_id`, `params.max_tokens`).
    pub at: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.index, self.at.as_str()) {
            (Some(i), "") => write!(f, "requests.{i}: {}", self.message),
            (Some(i), at) => write!(f, "requests.{i}.{at}: {}", self.message),
            (None, "") => write!(f, "{}", self.message),
            (None, at) => write!(f, "{at}: {}", self.message),
        }
    }
}

/// Why a create's body was refused.
#[derive(Debug)]
pub enum Refusal {
    /// Over [`Limits::max_bytes`] (413).
    TooLarge(u64),
    /// Everything wrong with it, lowest index first, and how many problems there were.
    Invalid { problems: Vec<Problem>, count: usize },
}

/// batchd's own parameters a create's body may carry beside `requests`.
pub const EXTENSIONS: [&str; 2] = ["completion_window", "priority"];

/// What a good body held.
#[derive(Debug)]
pub struct Accepted {
    pub requests: u64,
    /// The [`EXTENSIONS`] given, for the handler to check.
    pub extensions: Map<String, Value>,
}

/// Checks one request after another, and makes each good one a line.
pub struct Checker {
    router: Arc<Router>,
    limits: Limits,
    seen: HashSet<String>,
    requests: u64,
    problems: Vec<Problem>,
    count: usize,
    extensions: Map<String, Value>,
}

impl Checker {
    pub fn new(router: Arc<Router>, limits: Limits) -> Self {
        Checker { router, limits, seen: HashSet::new(), requests: 0, problems: vec![], count: 0, extensions: Map::new() }
    }

    fn problem(&mut self, index: Option<u64>, at: &str, message: impl Into<String>) {
        self.count += 1;
        if self.problems.len() < MAX_REPORTED {
            self.problems.push(Problem { index, at: at.into(), message: message.into() });
        }
    }

    pub fn failed(&self) -> bool {
        self.count > 0
    }

    /// The `index`th request: its line when it is good (and nothing was wrong before it).
    pub fn request(&mut self, index: u64, v: Value) -> Option<Vec<u8>> {
        self.requests += 1;
        if self.requests == self.limits.max_requests + 1 {
            let m = format!("a Message Batch holds at most {} requests", self.limits.max_requests);
            self.problem(None, "requests", m);
        }
        let before = self.count;
        let Value::Object(mut m) = v else {
            self.problem(Some(index), "", "Input should be an object with custom_id and params");
            return None;
        };
        for k in m.keys().filter(|k| *k != "custom_id" && *k != "params").cloned().collect::<Vec<_>>() {
            self.problem(Some(index), &k, "Extra inputs are not permitted");
        }
        let custom_id = self.custom_id(index, m.get("custom_id"));
        match m.remove("params") {
            None | Some(Value::Null) => self.problem(Some(index), "params", "Field required"),
            Some(Value::Object(p)) => return self.params(index, custom_id, p, before),
            Some(_) => self.problem(Some(index), "params", "Input should be a valid dictionary"),
        }
        None
    }

    fn custom_id(&mut self, index: u64, v: Option<&Value>) -> Option<String> {
        let valid = |id: &str| (1..=MAX_CUSTOM_ID).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        let problem = match v {
            None | Some(Value::Null) => "Field required".to_string(),
            Some(Value::String(id)) if !valid(id) => format!("String should match pattern '^[a-zA-Z0-9_-]{{1,{MAX_CUSTOM_ID}}}$' (got {id:?})"),
            Some(Value::String(id)) if !self.seen.insert(id.clone()) => format!("custom_id {id:?} is used by another request; each must be unique"),
            Some(Value::String(id)) => return Some(id.clone()),
            Some(_) => "Input should be a valid string".to_string(),
        };
        self.problem(Some(index), "custom_id", problem);
        None
    }

    fn params(&mut self, index: u64, custom_id: Option<String>, p: Map<String, Value>, before: usize) -> Option<Vec<u8>> {
        let at = |k: &str| format!("params.{k}");
        let params_before = self.count;
        match p.get("model") {
            None | Some(Value::Null) => self.problem(Some(index), &at("model"), "Field required"),
            Some(Value::String(model)) if !self.router.knows(model) => {
                let known = self.router.known_models();
                let list = if known.is_empty() { "none are configured".to_string() } else { known.join(", ") };
                self.problem(Some(index), &at("model"), format!("model {model:?} is not served here; known models: {list}"))
            }
            Some(Value::String(_)) => {}
            Some(_) => self.problem(Some(index), &at("model"), "Input should be a valid string"),
        }
        match p.get("max_tokens") {
            None | Some(Value::Null) => self.problem(Some(index), &at("max_tokens"), "Field required"),
            Some(Value::Number(n)) if n.as_u64().is_some_and(|n| n >= 1) => {}
            Some(_) => self.problem(Some(index), &at("max_tokens"), "Input should be an integer of at least 1"),
        }
        match p.get("messages") {
            None | Some(Value::Null) => self.problem(Some(index), &at("messages"), "Field required"),
            Some(Value::Array(_)) => {}
            Some(_) => self.problem(Some(index), &at("messages"), "Input should be a valid list"),
        }
        if p.get("stream").is_some_and(|s| s != &Value::Bool(false) && !s.is_null()) {
            self.problem(Some(index), &at("stream"), "streaming is not supported in a Message Batch; remove stream");
        }
        let body = Value::Object(p);
        if self.count == params_before {
            self.servable(index, &body);
        }
        if self.count > before || self.failed() {
            return None;
        }
        self.line(index, custom_id?, body)
    }

    /// A request routed to an upstream of the other API must translate (Messages → chat).
    fn servable(&mut self, index: u64, body: &Value) {
        let Some(model) = body["model"].as_str() else { return };
        if !self.router.translates(model, MESSAGES_PATH) {
            return;
        }
        if let Err(e) = self.router.servable(model, MESSAGES_PATH, body) {
            let param = &e.refused.param;
            let at = if param == "url" { "params".to_string() } else { format!("params.{param}") };
            self.problem(Some(index), &at, e.to_string());
        }
    }

    fn line(&mut self, index: u64, custom_id: String, body: Value) -> Option<Vec<u8>> {
        let line = serde_json::json!({"custom_id": custom_id, "method": "POST", "url": LINE_URL, "body": body});
        let mut bytes = serde_json::to_vec(&line).ok()?;
        if bytes.len() as u64 > self.limits.max_line_bytes {
            let m = format!("the request has {} bytes, over this server's limit of {} per request", bytes.len(), self.limits.max_line_bytes);
            self.problem(Some(index), "", m);
            return None;
        }
        bytes.push(b'\n');
        Some(bytes)
    }

    /// The outcome once the body has been read whole.
    fn finish(mut self) -> Result<Accepted, Refusal> {
        if self.requests == 0 && self.count == 0 {
            self.problem(None, "requests", "List should have at least 1 item");
        }
        if self.count == 0 {
            return Ok(Accepted { requests: self.requests, extensions: self.extensions });
        }
        self.problems.sort_by_key(|p| p.index.map_or(0, |i| i + 1));
        Err(Refusal::Invalid { problems: self.problems, count: self.count })
    }
}

/// The body's top-level object: `requests` and nothing else.
struct BodySeed<'a> {
    checker: &'a mut Checker,
    sink: &'a mpsc::Sender<Vec<u8>>,
}

impl<'de> DeserializeSeed<'de> for BodySeed<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for BodySeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object with requests")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = false;
        while let Some(key) = map.next_key::<String>()? {
            if key == "requests" && !seen {
                seen = true;
                map.next_value_seed(RequestsSeed { checker: self.checker, sink: self.sink })?;
            } else if EXTENSIONS.contains(&key.as_str()) {
                let v = map.next_value::<Value>()?;
                self.checker.extensions.insert(key, v);
            } else {
                let m = if key == "requests" { "requests is given twice" } else { "Extra inputs are not permitted" };
                self.checker.problem(None, &key, m);
                map.next_value::<IgnoredAny>()?;
            }
        }
        if !seen {
            self.checker.problem(None, "requests", "Field required");
        }
        Ok(())
    }
}

/// The `requests` list, one element at a time.
struct RequestsSeed<'a> {
    checker: &'a mut Checker,
    sink: &'a mpsc::Sender<Vec<u8>>,
}

impl<'de> DeserializeSeed<'de> for RequestsSeed<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for RequestsSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of requests")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut index = 0u64;
        while let Some(v) = seq.next_element::<Value>()? {
            if let Some(line) = self.checker.request(index, v) {
                // The writer gone (it failed) ends the intake: its error is the answer.
                if self.sink.blocking_send(line).is_err() {
                    return Err(serde::de::Error::custom("the request could not be stored"));
                }
            }
            index += 1;
        }
        Ok(())
    }
}

/// Reads `body` (bounded to `limits.max_bytes`) and sends each good line to `sink`, on the
/// calling (blocking) thread.
fn read_blocking(body: impl std::io::Read, mut checker: Checker, sink: mpsc::Sender<Vec<u8>>, too_large: &AtomicBool) -> Result<Accepted, Refusal> {
    let max = checker.limits.max_bytes;
    let mut de = serde_json::Deserializer::from_reader(std::io::BufReader::with_capacity(64 << 10, body));
    let parsed = BodySeed { checker: &mut checker, sink: &sink }.deserialize(&mut de).and_then(|()| de.end());
    if too_large.load(Ordering::Relaxed) {
        return Err(Refusal::TooLarge(max));
    }
    if let Err(e) = parsed {
        let message = if e.is_io() { format!("the request body could not be read: {e}") } else { format!("the body is not valid JSON: {e}") };
        checker.problem(None, "", message);
    }
    checker.finish()
}

/// Starts reading a create's body as it arrives: good lines come out of the receiver, in
/// order; the task's outcome says whether the body was good. Dropping the receiver (a
/// failed write) stops the reading.
pub fn start<S>(body: S, checker: Checker) -> (mpsc::Receiver<Vec<u8>>, Intake)
where
    S: futures::Stream<Item = Result<Bytes, axum::Error>> + Send + 'static,
{
    let max = checker.limits.max_bytes;
    let too_large = Arc::new(AtomicBool::new(false));
    let flag = too_large.clone();
    let mut seen = 0u64;
    let bounded = body.map_err(std::io::Error::other).and_then(move |chunk| {
        seen += chunk.len() as u64;
        let over = seen > max;
        if over {
            flag.store(true, Ordering::Relaxed);
        }
        futures::future::ready(if over { Err(std::io::Error::other("the body is too large")) } else { Ok(chunk) })
    });
    let reader = SyncIoBridge::new(StreamReader::new(Box::pin(bounded)));
    let (tx, rx) = mpsc::channel::<Vec<u8>>(64);
    (rx, Intake(tokio::task::spawn_blocking(move || read_blocking(reader, checker, tx, &too_large))))
}

/// The reading of one body, under way.
pub struct Intake(tokio::task::JoinHandle<Result<Accepted, Refusal>>);

impl Intake {
    /// Its outcome, once the body has been read whole (or the reading stopped).
    pub async fn outcome(self) -> Result<Accepted, Refusal> {
        self.0.await.unwrap_or_else(|e| Err(Refusal::Invalid { problems: vec![panicked(e)], count: 1 }))
    }
}

fn panicked(e: tokio::task::JoinError) -> Problem {
    tracing::error!(error = %e, "reading a Message Batch body panicked");
    Problem { index: None, at: String::new(), message: "the body could not be read".into() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{RawUpstream, UpstreamApi};

    /// `claude` on an Anthropic-speaking upstream (alias `fast`), `local` on an OpenAI one.
    fn router() -> Arc<Router> {
        let up = |name: &str, api, models: &[&str]| RawUpstream {
            name: name.into(),
            base_url: "http://127.0.0.1:9/v1".into(),
            models: models.iter().map(|m| m.to_string()).collect(),
            api: Some(api),
            aliases: [("fast".to_string(), "claude".to_string())].into(),
            ..Default::default()
        };
        let raw = vec![up("a", UpstreamApi::Anthropic, &["claude"]), up("o", UpstreamApi::OpenAi, &["local"])];
        let cfg = crate::config::RawConfig { upstreams: raw, ..Default::default() }.resolve().unwrap();
        Arc::new(Router::new(&cfg.upstreams).unwrap())
    }

    const LIMITS: Limits = Limits { max_requests: 5, max_bytes: 4096, max_line_bytes: 1024 };

    async fn intake(body: &str, limits: Limits) -> (Result<Accepted, Refusal>, Vec<String>) {
        let chunks: Vec<Result<Bytes, axum::Error>> = body.as_bytes().chunks(7).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
        let (mut rx, intake) = start(futures::stream::iter(chunks), Checker::new(router(), limits));
        let mut lines = vec![];
        while let Some(l) = rx.recv().await {
            lines.push(String::from_utf8(l).unwrap());
        }
        (intake.outcome().await, lines)
    }

    fn req(id: &str, params: &str) -> String {
        format!(r#"{{"custom_id": "{id}", "params": {params}}}"#)
    }
    const GOOD: &str = r#"{"model": "claude", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}"#;

    fn problems(r: Result<Accepted, Refusal>) -> Vec<String> {
        match r {
            Err(Refusal::Invalid { problems, count }) => {
                assert_eq!(problems.len(), count);
                problems.iter().map(ToString::to_string).collect()
            }
            other => panic!("expected problems, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn good_requests_become_lines_of_batchd_format_in_order() {
        let body = format!(r#"{{"requests": [{}, {}]}}"#, req("a", GOOD), req("b-2_X", r#"{"model": "fast", "max_tokens": 1, "messages": []}"#));
        let (out, lines) = intake(&body, LIMITS).await;
        assert_eq!(out.unwrap().requests, 2);
        let first: Value = serde_json::from_str(lines[0].trim_end()).unwrap();
        assert_eq!(first["custom_id"], "a");
        assert_eq!(first["url"], "/v1/messages");
        assert_eq!(first["method"], "POST");
        assert_eq!(first["body"], serde_json::from_str::<Value>(GOOD).unwrap());
        assert!(lines.iter().all(|l| l.ends_with('\n')));
        assert_eq!(serde_json::from_str::<Value>(&lines[1]).unwrap()["custom_id"], "b-2_X");
    }

    #[tokio::test]
    async fn every_problem_is_listed_with_its_index_and_nothing_is_written_after_the_first() {
        let reqs = [
            req("ok", GOOD),
            req("bad id!", GOOD),
            req("ok", GOOD),
            req("c", r#"{"model": "nope", "messages": []}"#),
            req("d", r#"{"model": "claude", "max_tokens": 5, "messages": [], "stream": true}"#),
            r#"{"custom_id": "e", "params": {"model": "local", "max_tokens": 5, "messages": [], "thinking": {"type": "enabled", "budget_tokens": 10}}, "extra": 1}"#.into(),
        ];
        let (out, lines) = intake(&format!(r#"{{"requests": [{}], "other": 1}}"#, reqs.join(",")), Limits { max_requests: 10, ..LIMITS }).await;
        let p = problems(out);
        let has = |s: &str| assert!(p.iter().any(|x| x.contains(s)), "{s:?} not in {p:#?}");
        has("other: Extra inputs are not permitted");
        has("requests.1.custom_id: String should match pattern");
        has("requests.2.custom_id: custom_id \"ok\" is used by another request");
        has("requests.3.params.model: model \"nope\" is not served here");
        has("requests.3.params.max_tokens: Field required");
        has("requests.4.params.stream:");
        has("requests.5.extra: Extra inputs are not permitted");
        has("requests.5.params.thinking:");
        assert_eq!(lines.len(), 1, "the good request before the first problem only");
    }

    #[tokio::test]
    async fn the_limits_and_the_shape_of_the_body_are_checked() {
        let many = vec![req("x", GOOD); 6].iter().enumerate().map(|(i, r)| r.replace("\"x\"", &format!("\"x{i}\""))).collect::<Vec<_>>();
        let p = problems(intake(&format!(r#"{{"requests": [{}]}}"#, many.join(",")), Limits { max_bytes: 1 << 20, ..LIMITS }).await.0);
        assert!(p.iter().any(|x| x.contains("at most 5 requests")), "{p:?}");
        let small = Limits { max_bytes: 300, ..LIMITS };
        assert!(matches!(intake(&format!(r#"{{"requests": [{}]}}"#, many.join(",")), small).await.0, Err(Refusal::TooLarge(300))));
        let big = req("big", &GOOD.replace("hi", &"h".repeat(2000)));
        assert!(problems(intake(&format!(r#"{{"requests": [{big}]}}"#), Limits { max_bytes: 1 << 20, ..LIMITS }).await.0)[0]
            .contains("requests.0: the request has"));
        assert_eq!(problems(intake(r#"{"requests": []}"#, LIMITS).await.0), ["requests: List should have at least 1 item"]);
        assert_eq!(problems(intake(r#"{}"#, LIMITS).await.0), ["requests: Field required"]);
        assert!(problems(intake(r#"{"requests": [1, "#, LIMITS).await.0).iter().any(|p| p.contains("not valid JSON")));
        assert!(problems(intake(r#"{"requests": [1]}"#, LIMITS).await.0)[0].starts_with("requests.0: Input should be an object"));
    }
}
