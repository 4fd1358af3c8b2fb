//! Property-based tests of the input-line splitter, the line parser and the validator: no
//! input makes them panic, valid files always validate, and every reported line number and
//! byte range is right, whatever the chunking, line endings, blank lines or a leading BOM.

use batchd::config::{Limits, RawConfig, RawUpstream};
use batchd::engine::lines::{LineSplitter, ParsedLine, RawLine, BOM};
use batchd::engine::validator::{Report, Validator};
use batchd::upstream::Router;
use proptest::prelude::*;
use serde_json::json;

const ENDPOINT: &str = "/v1/chat/completions";

fn router() -> &'static Router {
    static ROUTER: std::sync::OnceLock<Router> = std::sync::OnceLock::new();
    ROUTER.get_or_init(|| {
        let raw = RawUpstream { name: "u".into(), base_url: "http://127.0.0.1:9/v1".into(), models: vec!["m1".into(), "m2".into()], ..Default::default() };
        let cfg = RawConfig { upstreams: vec![raw], ..Default::default() }.resolve().unwrap();
        Router::new(&cfg.upstreams).unwrap()
    })
}

#[derive(Debug, Clone, PartialEq)]
struct Line {
    no: u64,
    offset: u64,
    len: u64,
    bytes: Vec<u8>,
    overlong: bool,
}

fn split(data: &[u8], cuts: &[usize], max_line: usize, first_line: u64) -> Vec<Line> {
    let mut s = LineSplitter::new(max_line, first_line, 0);
    let mut out = vec![];
    let mut f = |l: RawLine<'_>| out.push(Line { no: l.no, offset: l.offset, len: l.len, bytes: l.bytes.to_vec(), overlong: l.overlong });
    let mut at = 0;
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
    cuts.sort_unstable();
    for c in cuts.into_iter().chain([data.len()]) {
        s.feed(&data[at..c.max(at)], &mut f);
        at = c.max(at);
    }
    s.finish(&mut f);
    out
}

fn validate(data: &[u8], cuts: &[usize], limits: Limits, unit_lines: u64) -> Report {
    let mut v = Validator::new("batch_p", ENDPOINT, router(), limits, unit_lines);
    for l in split(data, cuts, limits.max_line_bytes as usize, 1) {
        v.line(RawLine { no: l.no, offset: l.offset, len: l.len, bytes: &l.bytes, overlong: l.overlong });
    }
    v.finish().expect("no spill error")
}

/// Bytes rich in the characters that matter to a line splitter and a BOM check.
fn bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![4 => any::<u8>(), 2 => Just(b'\n'), 1 => Just(b'\r'), 1 => Just(0xEF), 1 => Just(0xBB), 1 => Just(0xBF), 1 => Just(b'{')],
        0..300,
    )
}

/// A valid request line's body: a known model and arbitrary extra content.
fn body() -> impl Strategy<Value = serde_json::Value> {
    (prop_oneof![Just("m1"), Just("m2")], ".{0,40}", any::<i64>(), any::<bool>(), prop::option::of(0u64..100_000)).prop_map(|(model, text, n, flag, max)| {
        let mut b = json!({"model": model, "messages": [{"role": "user", "content": text}], "seed": n, "logprobs": flag, "stream": false});
        if let Some(m) = max {
            b["max_tokens"] = m.into();
        }
        b
    })
}

/// How the lines of a generated file are laid out.
#[derive(Debug, Clone)]
struct Layout {
    bom: bool,
    crlf: bool,
    final_newline: bool,
    /// Blank lines (possibly with spaces) before each request line.
    blanks: Vec<u8>,
}

fn layout(n: usize) -> impl Strategy<Value = Layout> {
    (any::<bool>(), any::<bool>(), any::<bool>(), prop::collection::vec(0u8..3, n)).prop_map(|(bom, crlf, final_newline, blanks)| Layout {
        bom,
        crlf,
        final_newline,
        blanks,
    })
}

/// Lays out `lines` as a file; returns it with each request line's physical number.
fn file(lines: &[String], l: &Layout) -> (Vec<u8>, Vec<u64>) {
    let eol = if l.crlf { "\r\n" } else { "\n" };
    let mut out = if l.bom { BOM.to_vec() } else { vec![] };
    let mut numbers = vec![];
    let mut no = 1;
    for (i, line) in lines.iter().enumerate() {
        for b in 0..l.blanks[i] {
            out.extend_from_slice(if b % 2 == 0 { "  " } else { "" }.as_bytes());
            out.extend_from_slice(eol.as_bytes());
            no += 1;
        }
        out.extend_from_slice(line.as_bytes());
        numbers.push(no);
        no += 1;
        if i + 1 < lines.len() || l.final_newline {
            out.extend_from_slice(eol.as_bytes());
        }
    }
    (out, numbers)
}

fn full_lines(bodies: &[serde_json::Value]) -> Vec<String> {
    bodies.iter().enumerate().map(|(i, b)| json!({"custom_id": format!("id-{i}-é"), "method": "POST", "url": ENDPOINT, "body": b}).to_string()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    /// Any bytes in any chunking split into the same lines, numbered in order, whose byte
    /// ranges tile the input (after a leading BOM) exactly.
    #[test]
    fn splitting_is_independent_of_chunking_and_tiles_the_input(data in bytes(), cuts in prop::collection::vec(any::<usize>(), 0..8), max_line in 1usize..64, first in 1u64..5) {
        let whole = split(&data, &[], max_line, first);
        prop_assert_eq!(&split(&data, &cuts, max_line, first), &whole);
        let start = if data.starts_with(BOM) { 3 } else { 0 };
        let mut at = start as u64;
        for (i, l) in whole.iter().enumerate() {
            prop_assert_eq!(l.no, first + i as u64);
            prop_assert_eq!(l.offset, at);
            let raw = &data[l.offset as usize..(l.offset + l.len) as usize];
            let ends = raw.last() == Some(&b'\n');
            prop_assert!(ends || (l.offset + l.len) as usize == data.len(), "only the last line may lack a newline");
            let head = if ends { &raw[..raw.len() - 1] } else { raw };
            prop_assert!(!head.contains(&b'\n'));
            prop_assert_eq!(l.overlong, head.len() > max_line);
            let kept = &head[..head.len().min(max_line)];
            prop_assert_eq!(&l.bytes[..], kept.strip_suffix(b"\r").unwrap_or(kept));
            at += l.len;
        }
        prop_assert_eq!(at as usize, data.len().max(start));
        let newlines = data[start.min(data.len())..].iter().filter(|b| **b == b'\n').count();
        let tail = !data[start.min(data.len())..].ends_with(b"\n") && data.len() > start;
        prop_assert_eq!(whole.len(), newlines + tail as usize);
    }

    /// The parser and the validator never panic, and every line an error names exists.
    #[test]
    fn no_input_panics(data in bytes(), cuts in prop::collection::vec(any::<usize>(), 0..4), max_line in 1u64..200) {
        for line in data.split(|b| *b == b'\n') {
            let _ = ParsedLine::parse(line);
        }
        let limits = Limits { max_line_bytes: max_line, max_lines: 20, ..Limits::default() };
        let r = validate(&data, &cuts, limits, 3);
        let physical = split(&data, &[], usize::MAX, 1).len() as u64;
        for e in &r.errors {
            prop_assert!(e.line.is_none_or(|n| (1..=physical).contains(&n)), "{:?} names a line past {}", e, physical);
            prop_assert!(!e.message.is_empty());
        }
    }

    /// JSON-shaped lines with arbitrary text never panic the parser.
    #[test]
    fn json_shaped_lines_never_panic(s in r#"\{("[a-z_]{0,10}":("[^"]{0,10}"|[0-9]{1,3}|\{|\[|null|true|,))*\}?"#) {
        let _ = ParsedLine::parse(s.as_bytes());
    }

    /// A file of valid lines always validates, whatever its layout, and its work units hold
    /// every request line exactly once, in order, over contiguous bytes.
    #[test]
    fn valid_files_validate_and_units_cover_them((bodies, l) in prop::collection::vec(body(), 1..25).prop_flat_map(|b| { let n = b.len(); (Just(b), layout(n)) }),
                                                 cuts in prop::collection::vec(any::<usize>(), 0..6), unit_lines in 1u64..6) {
        let lines = full_lines(&bodies);
        let (data, _) = file(&lines, &l);
        let r = validate(&data, &cuts, Limits::default(), unit_lines);
        prop_assert!(r.errors.is_empty(), "{:?}", r.errors);
        prop_assert_eq!(r.validated.total, lines.len() as u64);
        let units = &r.validated.units;
        prop_assert_eq!(units.iter().map(|u| u.line_count).sum::<u64>(), lines.len() as u64);
        prop_assert_eq!(units[0].byte_offset, if l.bom { 3 } else { 0 });
        for w in units.windows(2) {
            prop_assert_eq!(w[0].end_line, w[1].first_line);
            prop_assert_eq!(w[0].byte_offset + w[0].byte_len, w[1].byte_offset);
        }
        let last = units.last().unwrap();
        prop_assert!(last.byte_offset + last.byte_len <= data.len() as u64);
        let bare: Vec<String> = bodies.iter().map(|b| b.to_string()).collect();
        let (bare_data, _) = file(&bare, &l);
        let r = validate(&bare_data, &cuts, Limits::default(), unit_lines);
        prop_assert!(r.errors.is_empty(), "bare bodies: {:?}", r.errors);
        prop_assert_eq!(r.validated.total, bodies.len() as u64);
    }

    /// One broken line among valid ones is reported once, with its physical line number.
    #[test]
    fn a_broken_line_is_reported_at_its_line((bodies, l, k) in prop::collection::vec(body(), 1..20).prop_flat_map(|b| { let n = b.len(); (Just(b), layout(n), 0..n) }),
                                             breakage in 0usize..4) {
        let mut lines = full_lines(&bodies);
        let (code, broken) = match breakage {
            0 => ("invalid_json_line", lines[k].chars().take(lines[k].chars().count() / 2).collect()),
            1 => ("model_not_found", lines[k].replacen("\"model\":\"m", "\"model\":\"x", 1)),
            2 => ("duplicate_custom_id", if k == 0 { lines[k].replacen("\"model\":\"m", "\"model\":\"x", 1) } else { lines[k].replacen(&format!("id-{k}-"), "id-0-", 1) }),
            _ => ("invalid_url", lines[k].replacen(ENDPOINT, "/v1/embeddings", 1)),
        };
        lines[k] = broken;
        let (data, numbers) = file(&lines, &l);
        let r = validate(&data, &[], Limits::default(), 4);
        let want_code = if breakage == 2 && k == 0 { "model_not_found" } else { code };
        let got: Vec<(&str, Option<u64>)> = r.errors.iter().map(|e| (e.code.as_str(), e.line)).collect();
        prop_assert_eq!(got, vec![(want_code, Some(numbers[k]))]);
    }
}
