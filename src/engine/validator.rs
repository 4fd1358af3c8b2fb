//! Streaming validation of an input file, before anything is sent upstream.
//!
//! [`Validator`] takes the file's lines one at a time and keeps only what it must (a 128-bit
//! hash per `custom_id`, the line numbers of each format), so memory does not grow with line
//! size. It reports every problem with its 1-based line (capped at [`MAX_ERRORS`]) and, for a
//! good file, cuts it into work units (line ranges with their byte offsets).

use std::collections::{BTreeMap, HashMap};

use futures::{Stream, StreamExt};

use super::lines::{Field, LineSplitter, ParsedLine, RawLine};
use crate::config::Limits;
use crate::store::{InputFormat, LineError, Validated, WorkUnit};
use crate::upstream::Router;

pub const MAX_ERRORS: usize = 1000;
const MAX_CUSTOM_ID: usize = 512;
/// A unit also ends when it reaches this many bytes, so a feeder's buffer stays bounded.
const MAX_UNIT_BYTES: u64 = 2 << 20;

/// What validation found, good or bad.
#[derive(Debug, Clone)]
pub struct Report {
    pub errors: Vec<LineError>,
    pub validated: Validated,
    /// Requests and token estimates per model, as named in the lines.
    pub models: BTreeMap<String, ModelSummary>,
    pub estimated_input_tokens: u64,
}

/// What a file asks of one model: requests, input tokens estimated as bytes/4, and output
/// tokens bounded by the lines' `max_tokens` (0 where a line sets none).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelSummary {
    pub requests: u64,
    pub input_tokens: u64,
    pub max_output_tokens: u64,
}

pub struct Validator<'a> {
    batch_id: String,
    endpoint: &'a str,
    router: &'a Router,
    limits: Limits,
    unit_lines: u64,
    errors: Vec<LineError>,
    error_count: usize,
    seen: HashMap<u128, u64>,
    bare_lines: Vec<u64>,
    full_lines: Vec<u64>,
    models: BTreeMap<String, ModelSummary>,
    tokens: u64,
    requests: u64,
    units: Vec<WorkUnit>,
    open: Option<WorkUnit>,
}

fn err(code: &str, line: Option<u64>, param: Option<&str>, message: String) -> LineError {
    LineError { code: code.into(), message, param: param.map(Into::into), line }
}

impl<'a> Validator<'a> {
    pub fn new(batch_id: &str, endpoint: &'a str, router: &'a Router, limits: Limits, unit_lines: u64) -> Self {
        Validator {
            batch_id: batch_id.into(),
            endpoint,
            router,
            limits,
            unit_lines,
            errors: vec![],
            error_count: 0,
            seen: HashMap::new(),
            bare_lines: vec![],
            full_lines: vec![],
            models: BTreeMap::new(),
            tokens: 0,
            requests: 0,
            units: vec![],
            open: None,
        }
    }

    fn push(&mut self, e: LineError) {
        self.error_count += 1;
        if self.errors.len() < MAX_ERRORS {
            self.errors.push(e);
        }
    }

    /// Checks the file size before reading it.
    pub fn check_size(&mut self, bytes: u64) -> bool {
        if bytes > self.limits.max_file_bytes {
            let m = format!("The file has {bytes} bytes, over the limit of {} bytes.", self.limits.max_file_bytes);
            self.push(err("file_too_large", None, None, m));
            return false;
        }
        true
    }

    pub fn line(&mut self, l: RawLine<'_>) {
        if l.is_blank() {
            self.extend_unit(l, false);
            return;
        }
        self.requests += 1;
        if self.requests == self.limits.max_lines + 1 {
            let m = format!("The file has more than {} requests, the limit per batch.", self.limits.max_lines);
            self.push(err("too_many_requests", Some(l.no), None, m));
        }
        self.extend_unit(l, true);
        if l.overlong {
            let m = format!("Line {} is longer than the limit of {} bytes.", l.no, self.limits.max_line_bytes);
            return self.push(err("line_too_large", Some(l.no), None, m));
        }
        match ParsedLine::parse(l.bytes) {
            Err(e) => self.push(err("invalid_json_line", Some(l.no), None, format!("Line {} {e}.", l.no))),
            Ok(p) => self.check(l.no, &p, l.bytes.len() as u64),
        }
    }

    fn check(&mut self, no: u64, p: &ParsedLine<'_>, len: u64) {
        if p.bare {
            self.bare_lines.push(no);
        } else {
            self.full_lines.push(no);
            self.check_envelope(no, p);
        }
        self.check_body(no, p);
        self.tokens += len / 4;
        if let Some(m) = p.model.as_str().and_then(|m| self.models.get_mut(m)) {
            m.input_tokens += len / 4;
            m.max_output_tokens += p.max_tokens.unwrap_or(0);
        }
    }

    fn check_envelope(&mut self, no: u64, p: &ParsedLine<'_>) {
        match &p.custom_id {
            Field::Missing => self.push(missing(no, "custom_id")),
            Field::Str(s) if !s.is_empty() && s.chars().count() <= MAX_CUSTOM_ID => self.check_unique(no, s),
            _ => self.push(err("invalid_value", Some(no), Some("custom_id"), format!("Line {no}: custom_id must be a non-empty string of at most {MAX_CUSTOM_ID} characters."))),
        }
        match &p.method {
            Field::Missing => self.push(missing(no, "method")),
            Field::Str(s) if s == "POST" => {}
            _ => self.push(err("invalid_value", Some(no), Some("method"), format!("Line {no}: method must be \"POST\"."))),
        }
        match &p.url {
            Field::Missing => self.push(missing(no, "url")),
            Field::Str(s) if s == self.endpoint => {}
            _ => self.push(err("invalid_url", Some(no), Some("url"), format!("Line {no}: url must be \"{}\", the batch's endpoint.", self.endpoint))),
        }
    }

    fn check_unique(&mut self, no: u64, custom_id: &str) {
        let h = xxhash_rust::xxh3::xxh3_128(custom_id.as_bytes());
        if let Some(first) = self.seen.insert(h, no) {
            self.seen.insert(h, first);
            let m = format!("Line {no}: custom_id {custom_id:?} was already used on line {first}; each must be unique.");
            self.push(err("duplicate_custom_id", Some(no), Some("custom_id"), m));
        }
    }

    fn check_body(&mut self, no: u64, p: &ParsedLine<'_>) {
        match &p.body {
            None => return self.push(missing(no, "body")),
            Some(Err(())) => return self.push(err("invalid_value", Some(no), Some("body"), format!("Line {no}: body must be a JSON object."))),
            Some(Ok(_)) => {}
        }
        match &p.model {
            Field::Missing => self.push(missing(no, "body.model")),
            Field::NotString => self.push(err("invalid_value", Some(no), Some("body.model"), format!("Line {no}: body.model must be a string."))),
            Field::Str(m) => self.check_model(no, m),
        }
        if p.stream_true {
            let m = format!("Line {no}: streaming is not supported in batches; remove \"stream\": true.");
            self.push(err("unsupported_value", Some(no), Some("body.stream"), m));
        }
    }

    fn check_model(&mut self, no: u64, model: &str) {
        if !self.models.contains_key(model) && !self.router.knows(model) {
            let known = self.router.known_models();
            let list = if known.is_empty() { "none are configured".to_string() } else { known.join(", ") };
            let m = format!("Line {no}: the model {model:?} is not served here. Known models: {list}.");
            return self.push(err("model_not_found", Some(no), Some("body.model"), m));
        }
        match self.models.get_mut(model) {
            Some(m) => m.requests += 1,
            None => {
                self.models.insert(model.to_string(), ModelSummary { requests: 1, ..Default::default() });
            }
        }
    }

    fn extend_unit(&mut self, l: RawLine<'_>, request: bool) {
        let unit = self.open.get_or_insert_with(|| WorkUnit {
            batch_id: self.batch_id.clone(),
            idx: self.units.len() as i64,
            first_line: l.no,
            end_line: l.no,
            line_count: 0,
            byte_offset: l.offset,
            byte_len: 0,
            epoch: 0,
        });
        unit.end_line = l.no + 1;
        unit.byte_len = l.offset + l.len - unit.byte_offset;
        unit.line_count += request as u64;
        if unit.line_count >= self.unit_lines || unit.byte_len >= MAX_UNIT_BYTES {
            self.close_unit();
        }
    }

    fn close_unit(&mut self) {
        if let Some(u) = self.open.take() {
            if u.line_count > 0 {
                self.units.push(u);
            }
        }
    }

    fn check_formats(&mut self) -> InputFormat {
        if self.bare_lines.is_empty() || self.full_lines.is_empty() {
            return if self.full_lines.is_empty() && !self.bare_lines.is_empty() { InputFormat::Bare } else { InputFormat::Full };
        }
        let bare_minority = self.bare_lines.len() <= self.full_lines.len();
        let (minority, what, other) = if bare_minority {
            (std::mem::take(&mut self.bare_lines), "a bare request body", "full batch requests (custom_id, method, url, body)")
        } else {
            (std::mem::take(&mut self.full_lines), "a full batch request", "bare request bodies")
        };
        for no in minority {
            let m = format!("Line {no} is {what}, but most lines are {other}; use one format for the whole file.");
            self.push(err("invalid_value", Some(no), None, m));
        }
        if bare_minority { InputFormat::Full } else { InputFormat::Bare }
    }

    pub fn finish(mut self) -> Report {
        self.close_unit();
        let format = self.check_formats();
        if self.requests == 0 && self.errors.is_empty() {
            self.push(err("empty_file", None, None, "The file contains no request lines.".into()));
        }
        self.errors.sort_by_key(|e| e.line.unwrap_or(0));
        if self.error_count > MAX_ERRORS {
            let m = format!("{} more errors are not listed.", self.error_count - MAX_ERRORS);
            self.errors.push(err("too_many_errors", None, None, m));
        }
        let model = (self.models.len() == 1).then(|| self.models.keys().next().cloned()).flatten();
        Report {
            errors: self.errors,
            validated: Validated { total: self.requests, model, format, units: self.units, est_tokens: self.tokens },
            models: self.models,
            estimated_input_tokens: self.tokens,
        }
    }
}

fn missing(no: u64, param: &str) -> LineError {
    err("missing_required_parameter", Some(no), Some(param), format!("Line {no}: missing required parameter '{param}'."))
}

/// Validates a whole file read as a stream of chunks.
pub async fn validate_stream<S, E>(mut stream: S, size: u64, mut v: Validator<'_>) -> Result<Report, E>
where
    S: Stream<Item = Result<bytes::Bytes, E>> + Unpin,
{
    if !v.check_size(size) {
        return Ok(v.finish());
    }
    let mut splitter = LineSplitter::new(v.limits.max_line_bytes as usize, 1, 0);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        splitter.feed(&chunk, &mut |l| v.line(l));
        tokio::task::consume_budget().await;
    }
    splitter.finish(&mut |l| v.line(l));
    Ok(v.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RawUpstream;

    fn router() -> Router {
        let raw = RawUpstream {
            name: "u".into(),
            base_url: "http://127.0.0.1:9/v1".into(),
            models: vec!["m1".into(), "m2".into()],
            aliases: [("alias".to_string(), "m1".to_string())].into(),
            ..Default::default()
        };
        let cfg = crate::config::RawConfig { upstreams: vec![raw], ..Default::default() }.resolve().unwrap();
        Router::new(&cfg.upstreams).unwrap()
    }

    fn run(text: &str, limits: Limits) -> Report {
        let r = router();
        let mut v = Validator::new("batch_t", "/v1/chat/completions", &r, limits, 2);
        let mut s = LineSplitter::new(limits.max_line_bytes as usize, 1, 0);
        s.feed(text.as_bytes(), &mut |l| v.line(l));
        s.finish(&mut |l| v.line(l));
        v.finish()
    }

    fn line(id: &str, model: &str) -> String {
        format!(r#"{{"custom_id":"{id}","method":"POST","url":"/v1/chat/completions","body":{{"model":"{model}","messages":[]}}}}"#)
    }

    fn codes(r: &Report) -> Vec<(String, Option<u64>, Option<String>)> {
        r.errors.iter().map(|e| (e.code.clone(), e.line, e.param.clone())).collect()
    }

    #[test]
    fn good_file_is_cut_into_units() {
        let text = format!("{}\n\n{}\n{}\n", line("a", "m1"), line("b", "alias"), line("c", "m1"));
        let r = run(&text, Limits::default());
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(r.validated.total, 3);
        assert_eq!(r.models["m1"].requests, 2);
        assert_eq!(r.models["m1"].input_tokens, (line("a", "m1").len() / 4 * 2) as u64);
        let u = &r.validated.units;
        assert_eq!(u.len(), 2);
        assert_eq!((u[0].first_line, u[0].end_line, u[0].line_count, u[0].byte_offset), (1, 4, 2, 0));
        assert_eq!((u[1].first_line, u[1].end_line, u[1].line_count), (4, 5, 1));
        assert_eq!(u[1].byte_offset + u[1].byte_len, text.len() as u64);
        assert_eq!(r.validated.model, None, "two distinct models named");
    }

    #[test]
    fn every_problem_has_its_line() {
        let text = [
            "not json".to_string(),
            r#"{"method":"POST","url":"/v1/chat/completions","body":{"model":"m1"}}"#.into(),
            r#"{"custom_id":"x","method":"GET","url":"/v1/embeddings","body":{"model":"nope"}}"#.into(),
            line("d", "m1"),
            line("d", "m1"),
            r#"{"custom_id":"s","method":"POST","url":"/v1/chat/completions","body":{"model":"m1","stream":true}}"#.into(),
            r#"{"custom_id":"t","method":"POST","url":"/v1/chat/completions","body":"x"}"#.into(),
        ]
        .join("\n");
        let r = run(&text, Limits::default());
        let got = codes(&r);
        let want = [
            ("invalid_json_line", 1, None),
            ("missing_required_parameter", 2, Some("custom_id")),
            ("invalid_value", 3, Some("method")),
            ("invalid_url", 3, Some("url")),
            ("model_not_found", 3, Some("body.model")),
            ("duplicate_custom_id", 5, Some("custom_id")),
            ("unsupported_value", 6, Some("body.stream")),
            ("invalid_value", 7, Some("body")),
        ];
        let want: Vec<_> = want.iter().map(|(c, l, p)| (c.to_string(), Some(*l), p.map(String::from))).collect();
        assert_eq!(got, want);
        assert!(r.errors[4].message.contains("m1") && r.errors[4].message.contains("alias"), "lists known models");
    }

    #[test]
    fn limits_and_formats() {
        let small = Limits { max_lines: 2, ..Limits::default() };
        let text = [line("a", "m1"), line("b", "m1"), line("c", "m1")].join("\n");
        assert_eq!(codes(&run(&text, small)), vec![("too_many_requests".into(), Some(3), None)]);
        assert_eq!(codes(&run("\n \n", Limits::default()))[0].0, "empty_file");
        let bare = r#"{"model":"m1","messages":[]}"#;
        let r = run(&format!("{bare}\n{bare}\n"), Limits::default());
        assert!(r.errors.is_empty());
        assert_eq!(r.validated.format, InputFormat::Bare);
        assert_eq!(r.validated.model.as_deref(), Some("m1"));
        let mixed = run(&format!("{bare}\n{}\n{bare}\n", line("a", "m1")), Limits::default());
        assert_eq!(codes(&mixed), vec![("invalid_value".into(), Some(2), None)]);
        let tiny = Limits { max_line_bytes: 10, ..Limits::default() };
        assert_eq!(codes(&run(&line("a", "m1"), tiny))[0].0, "line_too_large");
    }
}
