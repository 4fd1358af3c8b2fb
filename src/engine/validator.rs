//! Streaming validation of an input file, before anything is sent upstream.
//!
//! [`Validator`] takes the file's lines one at a time and keeps nothing per line in memory,
//! so its footprint is the same for 1,000 lines or 1,000,000: duplicate `custom_id`s are
//! found by an external sort (`engine::dedup`), and of the errors and of the lines of each
//! format only what a report can list ([`MAX_ERRORS`]) is kept, plus counts. It reports
//! every problem with its 1-based line (the [`MAX_ERRORS`] lowest lines, whatever order
//! they are found in) and, for a good file, cuts it into work units (line ranges with their
//! byte offsets; one per `unit_lines` lines, so a few hundred for a million lines, smaller
//! towards the end so that every node has lines until the batch's last moments). Asked
//! to ([`Validator::order_by_prefix`]), it also keys every line by its prompt prefix
//! (`engine::prefix`) and sorts them (`engine::order`, an external sort like the duplicate
//! finder's): when the lines share prefixes, the units are cut from that order instead.

use std::collections::{BTreeMap, BinaryHeap};
use std::path::PathBuf;

use futures::{Stream, StreamExt};

use super::dedup::{DupFinder, Duplicate};
use super::lines::{Body, Field, LineSplitter, ParsedLine, RawLine};
use super::order::{Cut, Entry, OrderBuilder, Ordered};
use super::prefix::{self, PrefixKey};
use crate::config::Limits;
use crate::store::{BatchId, InputFormat, LineError, Validated, WorkUnit};
use crate::upstream::Router;

pub const MAX_ERRORS: usize = 1000;
/// At most this many distinct models are itemised; the others are summed under
/// [`OTHER_MODELS`] (a catch-all upstream accepts any name, so a file could name millions).
pub const MAX_MODELS: usize = 1000;
pub const OTHER_MODELS: &str = "(other models)";
const MAX_CUSTOM_ID: usize = 512;
/// A unit also ends when it reaches this many bytes, so a feeder's buffer stays bounded.
const MAX_UNIT_BYTES: u64 = 2 << 20;

/// What validation found, good or bad.
#[derive(Debug)]
pub struct Report {
    pub errors: Vec<LineError>,
    /// For a good file: its units, cut from the dispatch order when `order` is set.
    pub validated: Validated,
    /// The dispatch order file, for a good file whose lines share prompt prefixes (only when
    /// asked for with [`Validator::order_by_prefix`]).
    pub order: Option<Ordered>,
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
    batch_id: BatchId,
    endpoint: &'a str,
    router: &'a Router,
    limits: Limits,
    unit_lines: u64,
    errors: ErrorList,
    dups: DupFinder,
    /// The first failure to write the duplicate finder's temporary file, reported at the end.
    spill_error: Option<std::io::Error>,
    bare_lines: FormatLines,
    full_lines: FormatLines,
    models: BTreeMap<String, ModelSummary>,
    tokens: u64,
    requests: u64,
    /// The file's size in bytes, when known (units are cut smaller late in the file).
    size: u64,
    /// Whether units are cut smaller late in the batch (not for a hosted batch API's lines).
    taper: bool,
    units: Vec<WorkUnit>,
    open: Option<WorkUnit>,
    /// Lines and their prefix keys, when units follow the prefix order.
    order: Option<OrderBuilder>,
    scratch: Option<PathBuf>,
}

/// The errors to report: the [`MAX_ERRORS`] with the lowest lines (file-level errors, which
/// have none, first), in whatever order they are found, and how many there were in all.
#[derive(Default)]
struct ErrorList {
    kept: BinaryHeap<Ranked>,
    count: usize,
}

/// An error ranked by (line, order found); the heap's top is the one to drop first.
struct Ranked {
    key: (u64, usize),
    e: LineError,
}

impl PartialEq for Ranked {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}
impl Eq for Ranked {}
impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key.cmp(&other.key)
    }
}

impl ErrorList {
    fn push(&mut self, e: LineError) {
        let r = Ranked { key: (e.line.unwrap_or(0), self.count), e };
        self.count += 1;
        if self.kept.len() < MAX_ERRORS {
            self.kept.push(r);
        } else if self.kept.peek().is_some_and(|top| r.key < top.key) {
            self.kept.pop();
            self.kept.push(r);
        }
    }

    fn into_sorted(self) -> Vec<LineError> {
        self.kept.into_sorted_vec().into_iter().map(|r| r.e).collect()
    }
}

/// The lines written in one format: how many, and the first [`MAX_ERRORS`] of them (all that
/// a report can list should they turn out to be the minority).
#[derive(Default)]
struct FormatLines {
    count: u64,
    first: Vec<u64>,
}

impl FormatLines {
    fn push(&mut self, no: u64) {
        self.count += 1;
        if self.first.len() < MAX_ERRORS {
            self.first.push(no);
        }
    }
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
            errors: ErrorList::default(),
            dups: DupFinder::default(),
            spill_error: None,
            bare_lines: FormatLines::default(),
            full_lines: FormatLines::default(),
            models: BTreeMap::new(),
            tokens: 0,
            requests: 0,
            size: 0,
            taper: true,
            units: vec![],
            open: None,
            order: None,
            scratch: None,
        }
    }

    /// Cuts units in prefix order when the lines share prefixes (see `engine::order`); the
    /// sort spills to `dir` (or the system's temporary directory). Embeddings and
    /// moderations, which a prefix cache does not serve, keep file order.
    pub fn order_by_prefix(mut self, dir: Option<PathBuf>) -> Self {
        if prefix::cacheable(self.endpoint) {
            self.order = Some(OrderBuilder::new(dir.clone()));
            self.scratch = dir;
        }
        self
    }

    /// Duplicate detection spills its sorted runs to an anonymous file in `dir` (by default
    /// the system's temporary directory): about 20 bytes plus the id per line.
    pub fn spill_to(mut self, dir: PathBuf) -> Self {
        self.dups = DupFinder::new(Some(dir.clone()));
        self.scratch = Some(dir);
        self
    }

    fn push(&mut self, e: LineError) {
        self.errors.push(e);
    }

    /// Checks the file size before reading it.
    pub fn check_size(&mut self, bytes: u64) -> bool {
        self.size = bytes;
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
            Ok(p) => {
                self.check(l.no, &p, l.bytes.len() as u64);
                self.check_translation(l.no, &p, l.bytes);
                self.add_to_order(l, &p);
            }
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
        if let Some(m) = p.model.as_str().and_then(|m| self.summary_of(m)) {
            m.input_tokens += len / 4;
            m.max_output_tokens += p.max_tokens.unwrap_or(0);
        }
    }

    fn check_envelope(&mut self, no: u64, p: &ParsedLine<'_>) {
        match &p.custom_id {
            Field::Missing => self.push(missing(no, "custom_id")),
            Field::Str(s) if !s.is_empty() && s.chars().count() <= MAX_CUSTOM_ID => self.check_unique(no, s),
            _ => self.push(err(
                "invalid_value",
                Some(no),
                Some("custom_id"),
                format!("Line {no}: custom_id must be a non-empty string of at most {MAX_CUSTOM_ID} characters."),
            )),
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
        if self.spill_error.is_none() {
            self.spill_error = self.dups.add(no, custom_id).err();
        }
    }

    fn check_body(&mut self, no: u64, p: &ParsedLine<'_>) {
        match p.body {
            Body::Missing => return self.push(missing(no, "body")),
            Body::NotObject => return self.push(err("invalid_value", Some(no), Some("body"), format!("Line {no}: body must be a JSON object."))),
            Body::Object => {}
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

    /// Keys the line by its prompt prefix, where its upstream orders by prefix (by its model
    /// alone elsewhere, so that such lines keep their file order).
    fn add_to_order(&mut self, l: RawLine<'_>, p: &ParsedLine<'_>) {
        let Some(order) = &mut self.order else { return };
        let model = p.model.as_str().unwrap_or_default();
        let key = match p.body_bytes(l.bytes) {
            Some(body) if self.router.prefix_ordered(model) => prefix::prefix_key(self.endpoint, model, body),
            _ => PrefixKey::model_only(model),
        };
        let entry = Entry { line: l.no, offset: l.offset, len: l.bytes.len() as u32 };
        if let Err(e) = order.add(&key, entry) {
            self.spill_error.get_or_insert(e);
            self.order = None;
        }
    }

    /// A line whose model is served by an upstream speaking another API (`api` in its
    /// configuration) is translated at dispatch; what cannot be translated is refused here,
    /// with the line's number and the parameter's name, before anything is sent. Only such
    /// lines are parsed whole.
    fn check_translation(&mut self, no: u64, p: &ParsedLine<'_>, line: &[u8]) {
        let path = self.endpoint.strip_prefix("/v1").unwrap_or(self.endpoint);
        let Some(model) = p.model.as_str().filter(|m| p.body == Body::Object && self.router.translates(m, path)) else { return };
        let Some(body) = p.body_bytes(line).and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok()) else { return };
        if let Err(mut e) = self.router.servable(model, path, &body) {
            if e.refused.param != "url" {
                e.refused.param = format!("body.{}", e.refused.param);
            }
            self.push(err(e.refused.code(), Some(no), Some(&e.refused.param), format!("Line {no}: {e}.")));
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
                // A model at a hosted batch API: its units are its remote batches' shards, cut
                // at full size (see `engine::remote`), not smaller late in the batch.
                self.taper &= !self.router.batched(model);
                let name = if self.models.len() < MAX_MODELS { model } else { OTHER_MODELS };
                self.models.entry(name.to_string()).or_default().requests += 1;
            }
        }
    }

    /// The summary a line's tokens are added to.
    fn summary_of(&mut self, model: &str) -> Option<&mut ModelSummary> {
        if self.models.contains_key(model) {
            return self.models.get_mut(model);
        }
        self.models.get_mut(OTHER_MODELS)
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
            ordered: false,
        });
        unit.end_line = l.no + 1;
        unit.byte_len = l.offset + l.len - unit.byte_offset;
        unit.line_count += request as u64;
        let (count, len, from) = (unit.line_count, unit.byte_len, unit.byte_offset);
        if count >= self.unit_cap(from, l.offset + l.len) || len >= MAX_UNIT_BYTES {
            self.close_unit();
        }
    }

    /// The most lines of a unit that starts at byte `from`, `seen` bytes into the file: fewer
    /// late in the batch (see [`Cut::lines_now`]), the lines still to come estimated from the
    /// file's size and the requests a byte so far.
    fn unit_cap(&self, from: u64, seen: u64) -> u64 {
        let cut = Cut { lines: self.unit_lines, bytes: MAX_UNIT_BYTES, total: self.size };
        if !self.taper || self.size == 0 || seen == 0 {
            return self.unit_lines;
        }
        let remaining = u128::from(self.size.saturating_sub(from)) * u128::from(self.requests) / u128::from(seen);
        cut.lines_now(remaining.min(u128::from(u64::MAX)) as u64)
    }

    fn close_unit(&mut self) {
        if let Some(u) = self.open.take() {
            if u.line_count > 0 {
                self.units.push(u);
            }
        }
    }

    fn check_formats(&mut self) -> InputFormat {
        let (bare, full) = (self.bare_lines.count, self.full_lines.count);
        if bare == 0 || full == 0 {
            return if full == 0 && bare > 0 { InputFormat::Bare } else { InputFormat::Full };
        }
        let bare_minority = bare <= full;
        let (minority, what, other) = if bare_minority {
            (std::mem::take(&mut self.bare_lines), "a bare request body", "full batch requests (custom_id, method, url, body)")
        } else {
            (std::mem::take(&mut self.full_lines), "a full batch request", "bare request bodies")
        };
        for &no in &minority.first {
            let m = format!("Line {no} is {what}, but most lines are {other}; use one format for the whole file.");
            self.push(err("invalid_value", Some(no), None, m));
        }
        // The others come after MAX_ERRORS errors at lower lines: counted, never listed.
        self.errors.count += (minority.count - minority.first.len() as u64) as usize;
        if bare_minority {
            InputFormat::Full
        } else {
            InputFormat::Bare
        }
    }

    /// The report; `Err` only when the duplicate finder's temporary file failed.
    pub fn finish(mut self) -> std::io::Result<Report> {
        self.close_unit();
        if let Some(e) = self.spill_error.take() {
            return Err(e);
        }
        let errors = &mut self.errors;
        std::mem::take(&mut self.dups).finish(|d| errors.push(duplicate(&d)))?;
        let format = self.check_formats();
        if self.requests == 0 && self.errors.count == 0 {
            self.push(err("empty_file", None, None, "The file contains no request lines.".into()));
        }
        let count = self.errors.count;
        let mut errors = std::mem::take(&mut self.errors).into_sorted();
        if count > MAX_ERRORS {
            let m = format!("{} more errors are not listed.", count - MAX_ERRORS);
            errors.push(err("too_many_errors", None, None, m));
        }
        let model = (self.models.len() == 1).then(|| self.models.keys().next().cloned()).flatten();
        let cut = Cut { lines: self.unit_lines, bytes: MAX_UNIT_BYTES, total: if self.taper { self.requests } else { 0 } };
        let order = match self.order.take().filter(|_| errors.is_empty()) {
            Some(o) => o.finish(&self.batch_id, cut, self.scratch.clone())?,
            None => None,
        };
        let units = match &order {
            Some(o) => o.units.clone(),
            None => self.units,
        };
        Ok(Report {
            errors,
            order,
            validated: Validated { total: self.requests, model, format, units, est_tokens: self.tokens },
            models: self.models,
            estimated_input_tokens: self.tokens,
        })
    }
}

fn duplicate(d: &Duplicate<'_>) -> LineError {
    let (no, first, id) = (d.line, d.first, d.custom_id);
    let m = format!("Line {no}: custom_id {id:?} was already used on line {first}; each must be unique.");
    err("duplicate_custom_id", Some(no), Some("custom_id"), m)
}

fn missing(no: u64, param: &str) -> LineError {
    err("missing_required_parameter", Some(no), Some(param), format!("Line {no}: missing required parameter '{param}'."))
}

/// Validates a whole file read as a stream of chunks.
pub async fn validate_stream<S, E>(mut stream: S, size: u64, mut v: Validator<'_>) -> Result<Report, E>
where
    S: Stream<Item = Result<bytes::Bytes, E>> + Unpin,
    E: From<std::io::Error>,
{
    if !v.check_size(size) {
        return Ok(v.finish()?);
    }
    let mut splitter = LineSplitter::new(v.limits.max_line_bytes as usize, 1, 0);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        splitter.feed(&chunk, &mut |l| v.line(l));
        tokio::task::consume_budget().await;
    }
    splitter.finish(&mut |l| v.line(l));
    Ok(v.finish()?)
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
        v.finish().unwrap()
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

    /// Duplicates are found only at the end, after every other error: the list still holds
    /// the errors of the lowest lines, and the count of the others is exact.
    #[test]
    fn the_lowest_lines_are_listed_whatever_order_errors_are_found_in() {
        let mut lines = vec![line("a", "m1"), line("a", "m1")];
        lines.extend((0..1500).map(|_| "not json".to_string()));
        let r = run(&lines.join("\n"), Limits::default());
        assert_eq!(r.errors.len(), MAX_ERRORS + 1);
        assert_eq!((r.errors[0].code.as_str(), r.errors[0].line), ("duplicate_custom_id", Some(2)));
        assert!(r.errors[0].message.contains("already used on line 1"));
        assert_eq!(r.errors[MAX_ERRORS - 1].line, Some(1001));
        assert_eq!(r.errors[MAX_ERRORS].code, "too_many_errors");
        assert_eq!(r.errors[MAX_ERRORS].message, "501 more errors are not listed.");
        // The minority format keeps only the line numbers it can list, and counts the rest.
        let bare = r#"{"model":"m1","messages":[]}"#.to_string();
        let mut mixed: Vec<String> = (0..1300).map(|i| line(&format!("id-{i}"), "m1")).collect();
        mixed.extend(std::iter::repeat_n(bare, 1200));
        let r = run(&mixed.join("\n"), Limits::default());
        assert_eq!(r.validated.format, InputFormat::Full);
        assert_eq!((r.errors[0].line, r.errors[MAX_ERRORS - 1].line), (Some(1301), Some(2300)));
        assert_eq!(r.errors[MAX_ERRORS].message, "200 more errors are not listed.");
    }

    /// A catch-all upstream accepts any model name; past MAX_MODELS names the summary sums
    /// the others instead of growing with the file.
    #[test]
    fn distinct_models_are_capped() {
        let raw = RawUpstream { name: "any".into(), base_url: "http://127.0.0.1:9/v1".into(), models: vec!["*".into()], ..Default::default() };
        let cfg = crate::config::RawConfig { upstreams: vec![raw], ..Default::default() }.resolve().unwrap();
        let r = Router::new(&cfg.upstreams).unwrap();
        let mut v = Validator::new("batch_t", "/v1/chat/completions", &r, Limits::default(), 100);
        let text: String = (0..MAX_MODELS + 5).map(|i| line(&format!("id-{i}"), &format!("model-{i}")) + "\n").collect();
        let mut s = LineSplitter::new(1 << 20, 1, 0);
        s.feed(text.as_bytes(), &mut |l| v.line(l));
        let report = v.finish().unwrap();
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(report.models.len(), MAX_MODELS + 1);
        assert_eq!(report.models[OTHER_MODELS].requests, 5);
        assert!(report.models[OTHER_MODELS].input_tokens > 0);
    }

    /// Lines for a model served by an Anthropic-speaking upstream are checked for what
    /// translates: each refusal names its line and parameter; lines for the OpenAI upstream
    /// are not parsed beyond their head (a `seed` there is fine).
    #[test]
    fn untranslatable_lines_are_refused_with_their_line_and_parameter() {
        let up = |name: &str, api, models: &[&str]| RawUpstream {
            name: name.into(),
            base_url: "http://127.0.0.1:9/v1".into(),
            models: models.iter().map(|m| m.to_string()).collect(),
            api: Some(api),
            ..Default::default()
        };
        let raw = vec![up("claude", crate::config::UpstreamApi::Anthropic, &["c"]), up("vllm", crate::config::UpstreamApi::OpenAi, &["v"])];
        let cfg = crate::config::RawConfig { upstreams: raw, ..Default::default() }.resolve().unwrap();
        let r = Router::new(&cfg.upstreams).unwrap();
        let body = |model: &str, extra: &str| {
            let id = xxhash_rust::xxh3::xxh3_64(format!("{model}{extra}").as_bytes());
            format!(
                r#"{{"custom_id":"{id}","method":"POST","url":"/v1/chat/completions","body":{{"model":"{model}","max_tokens":5,"messages":[{{"role":"user","content":"hi"}}]{extra}}}}}"#
            )
        };
        let text = [body("c", ""), body("c", r#","seed":7"#), body("v", r#","seed":7"#), body("c", r#","n":3"#), body("c", r#","temperature":0.5"#)].join("\n");
        let mut v = Validator::new("batch_t", "/v1/chat/completions", &r, Limits::default(), 100);
        let mut s = LineSplitter::new(1 << 20, 1, 0);
        s.feed(text.as_bytes(), &mut |l| v.line(l));
        s.finish(&mut |l| v.line(l));
        let report = v.finish().unwrap();
        assert_eq!(
            codes(&report),
            [("unsupported_parameter".to_string(), Some(2), Some("body.seed".to_string())), ("unsupported_parameter".into(), Some(4), Some("body.n".into()))]
        );
        assert!(report.errors[0].message.contains("upstream \"claude\"") && report.errors[0].message.contains("Line 2"), "{}", report.errors[0].message);
        let mut v = Validator::new("batch_t", "/v1/embeddings", &r, Limits::default(), 100);
        v.line(RawLine { no: 1, offset: 0, len: 40, bytes: br#"{"model":"c","input":"x"}"#, overlong: false });
        assert_eq!(
            codes(&v.finish().unwrap()),
            [("unsupported_parameter".to_string(), Some(1), Some("url".to_string()))],
            "no embeddings at an Anthropic upstream"
        );
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
