//! Input lines: splitting a byte stream into numbered lines, and parsing one line in either
//! the full batch format or the bare-body extension.
//!
//! Line numbers are physical and 1-based (blank lines count, as in an editor) so that every
//! error points at the line the user sees. Blank lines carry no request. A UTF-8 byte order
//! mark at the start of the stream belongs to no line: the first line starts after it (its
//! `offset` is 3), so a work unit cut from it never holds the mark either.

use std::borrow::Cow;

use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

/// One physical line, without its `\n` (and without a trailing `\r`).
#[derive(Debug, Clone, Copy)]
pub struct RawLine<'a> {
    pub no: u64,
    /// Byte offset of the line's first byte in the file.
    pub offset: u64,
    /// Length including the line terminator.
    pub len: u64,
    pub bytes: &'a [u8],
    /// The line was longer than the splitter keeps; `bytes` holds only its beginning.
    pub overlong: bool,
}

impl RawLine<'_> {
    pub fn is_blank(&self) -> bool {
        !self.overlong && self.bytes.iter().all(u8::is_ascii_whitespace)
    }
}

/// The UTF-8 byte order mark some editors put at the start of a file.
pub const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Splits a stream of chunks into lines, keeping at most `max_line` bytes of any one line.
pub struct LineSplitter {
    buf: Vec<u8>,
    max_line: usize,
    overlong: bool,
    next_no: u64,
    line_start: u64,
    pos: u64,
    /// The first bytes of the stream, held until it is known whether they are a BOM.
    head: Option<Vec<u8>>,
}

impl LineSplitter {
    pub fn new(max_line: usize, first_line: u64, first_offset: u64) -> Self {
        let head = Some(Vec::with_capacity(BOM.len()));
        LineSplitter { buf: Vec::new(), max_line, overlong: false, next_no: first_line, line_start: first_offset, pos: first_offset, head }
    }

    pub fn feed(&mut self, chunk: &[u8], out: &mut impl FnMut(RawLine<'_>)) {
        let Some(head) = &mut self.head else { return self.split(chunk, out) };
        let take = (BOM.len() - head.len()).min(chunk.len());
        head.extend_from_slice(&chunk[..take]);
        if head.len() < BOM.len() && BOM.starts_with(head) {
            return;
        }
        self.skip_bom(out);
        self.split(&chunk[take..], out);
    }

    /// Drops a complete BOM from the held head, or passes the head on as data.
    fn skip_bom(&mut self, out: &mut impl FnMut(RawLine<'_>)) {
        let Some(head) = self.head.take() else { return };
        if head == BOM {
            self.pos += BOM.len() as u64;
            self.line_start = self.pos;
        } else {
            self.split(&head, out);
        }
    }

    fn split(&mut self, chunk: &[u8], out: &mut impl FnMut(RawLine<'_>)) {
        let mut rest = chunk;
        while let Some(i) = memchr::memchr(b'\n', rest) {
            let head = &rest[..i];
            self.pos += i as u64 + 1;
            if self.buf.is_empty() && !self.overlong && head.len() <= self.max_line {
                self.emit(head, false, out);
            } else {
                self.keep(head);
                let buf = std::mem::take(&mut self.buf);
                self.emit(&buf, self.overlong, out);
                self.buf = buf;
                self.buf.clear();
                self.overlong = false;
            }
            rest = &rest[i + 1..];
        }
        self.pos += rest.len() as u64;
        self.keep(rest);
    }

    /// Emits the last line when the stream did not end with a newline.
    pub fn finish(&mut self, out: &mut impl FnMut(RawLine<'_>)) {
        self.skip_bom(out);
        if !self.buf.is_empty() || self.overlong {
            let buf = std::mem::take(&mut self.buf);
            self.emit(&buf, self.overlong, out);
        }
    }

    fn keep(&mut self, part: &[u8]) {
        let room = self.max_line.saturating_sub(self.buf.len());
        if part.len() > room {
            self.overlong = true;
        }
        self.buf.extend_from_slice(&part[..part.len().min(room)]);
    }

    fn emit(&mut self, bytes: &[u8], overlong: bool, out: &mut impl FnMut(RawLine<'_>)) {
        let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
        out(RawLine { no: self.next_no, offset: self.line_start, len: self.pos - self.line_start, bytes, overlong });
        self.next_no += 1;
        self.line_start = self.pos;
    }
}

/// Everything batchd reads from a line, in either format, in one pass: the envelope keys of
/// a full line, its `body` (read for its head only), and — for a bare line, whose body is
/// the line itself — the same head keys at the top. Unknown keys are skipped; a key given
/// twice keeps its last value.
#[derive(Default)]
struct Flat<'a> {
    custom_id: Option<&'a RawValue>,
    method: Option<&'a RawValue>,
    url: Option<&'a RawValue>,
    body: BodyField<'a>,
    head: Head<'a>,
}

impl<'de: 'a, 'a> Deserialize<'de> for Flat<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(FlatVisitor)
    }
}

struct FlatVisitor;

impl<'de> Visitor<'de> for FlatVisitor {
    type Value = Flat<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Flat<'de>, A::Error> {
        let mut flat = Flat::default();
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            match key.as_ref() {
                "custom_id" => flat.custom_id = Some(map.next_value()?),
                "method" => flat.method = Some(map.next_value()?),
                "url" => flat.url = Some(map.next_value()?),
                "body" => flat.body = map.next_value()?,
                other => flat.head.take(other, &mut map)?,
            }
        }
        Ok(flat)
    }
}

/// The parts of a request body batchd reads; the rest passes through untouched.
#[derive(Default)]
struct Head<'a> {
    model: Option<&'a RawValue>,
    stream: Option<&'a RawValue>,
    /// `max_tokens`, `max_completion_tokens`, `max_output_tokens`, in that order.
    max: [Option<&'a RawValue>; 3],
}

impl<'a> Head<'a> {
    /// Reads one key of a map being visited into the head, skipping any other.
    fn take<A: MapAccess<'a>>(&mut self, key: &str, map: &mut A) -> Result<(), A::Error> {
        let slot = match key {
            "model" => &mut self.model,
            "stream" => &mut self.stream,
            "max_tokens" => &mut self.max[0],
            "max_completion_tokens" => &mut self.max[1],
            "max_output_tokens" => &mut self.max[2],
            _ => return map.next_value::<IgnoredAny>().map(drop),
        };
        *slot = Some(map.next_value()?);
        Ok(())
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Head<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(HeadVisitor)
    }
}

struct HeadVisitor;

impl<'de> Visitor<'de> for HeadVisitor {
    type Value = Head<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Head<'de>, A::Error> {
        let mut head = Head::default();
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            head.take(&key, &mut map)?;
        }
        Ok(head)
    }
}

/// A full line's `body`: absent, not an object (null included), or an object's head.
#[derive(Default)]
enum BodyField<'a> {
    #[default]
    Missing,
    NotObject,
    Object(Head<'a>),
}

impl<'de: 'a, 'a> Deserialize<'de> for BodyField<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(BodyVisitor)
    }
}

struct BodyVisitor;

macro_rules! not_object {
    ($($name:ident: $t:ty),*) => {$(
        fn $name<E: serde::de::Error>(self, _: $t) -> Result<BodyField<'de>, E> {
            Ok(BodyField::NotObject)
        }
    )*};
}

impl<'de> Visitor<'de> for BodyVisitor {
    type Value = BodyField<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<BodyField<'de>, A::Error> {
        HeadVisitor.visit_map(map).map(BodyField::Object)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<BodyField<'de>, A::Error> {
        IgnoredAny.visit_seq(seq).map(|_| BodyField::NotObject)
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<BodyField<'de>, E> {
        Ok(BodyField::NotObject)
    }

    not_object!(visit_bool: bool, visit_i64: i64, visit_u64: u64, visit_f64: f64, visit_str: &str);
}

/// A field as found on a line: absent, of the wrong JSON type, or a string (borrowed from
/// the line unless it has escapes).
#[derive(Debug, Clone, PartialEq)]
pub enum Field<'a> {
    Missing,
    NotString,
    Str(Cow<'a, str>),
}

impl<'a> Field<'a> {
    fn of(raw: Option<&'a RawValue>) -> Field<'a> {
        let Some(text) = raw.map(RawValue::get) else { return Field::Missing };
        if text == "null" {
            return Field::Missing;
        }
        // The parser has checked the string; without a backslash its text is its value.
        if let Some(plain) = text.strip_prefix('"').and_then(|t| t.strip_suffix('"')).filter(|t| !t.contains('\\')) {
            return Field::Str(Cow::Borrowed(plain));
        }
        match serde_json::from_str::<String>(text) {
            Ok(s) => Field::Str(Cow::Owned(s)),
            Err(_) => Field::NotString,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Field::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// A line's request body: absent, present but not a JSON object, or an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    Missing,
    NotObject,
    Object,
}

/// One line, parsed just enough to validate and route it.
#[derive(Debug)]
pub struct ParsedLine<'a> {
    /// No `custom_id`, `method` or `url`: the line is a bare request body.
    pub bare: bool,
    pub custom_id: Field<'a>,
    pub method: Field<'a>,
    pub url: Field<'a>,
    pub body: Body,
    pub model: Field<'a>,
    pub stream_true: bool,
    pub max_tokens: Option<u64>,
}

impl<'a> ParsedLine<'a> {
    /// Parses a line in one pass; `Err` completes the sentence "Line N …" (it is not a JSON
    /// object).
    pub fn parse(bytes: &'a [u8]) -> Result<ParsedLine<'a>, String> {
        let text = std::str::from_utf8(bytes).map_err(|e| format!("is not valid UTF-8 ({e})"))?;
        if !text.trim_start().starts_with('{') {
            return Err("is not a JSON object".into());
        }
        let flat: Flat<'a> = serde_json::from_str(text).map_err(|e| format!("is not valid JSON ({e})"))?;
        let bare = flat.custom_id.is_none() && flat.method.is_none() && flat.url.is_none();
        let (body, head) = match (bare, flat.body) {
            (true, _) => (Body::Object, flat.head),
            (false, BodyField::Object(h)) => (Body::Object, h),
            (false, BodyField::NotObject) => (Body::NotObject, Head::default()),
            (false, BodyField::Missing) => (Body::Missing, Head::default()),
        };
        Ok(ParsedLine {
            bare,
            custom_id: Field::of(flat.custom_id),
            method: Field::of(flat.method),
            url: Field::of(flat.url),
            body,
            model: Field::of(head.model),
            stream_true: head.stream.is_some_and(|s| s.get() == "true"),
            max_tokens: head.max.iter().flatten().find_map(|v| v.get().parse::<u64>().ok()),
        })
    }

    /// The request body's bytes within `line` (the whole line for a bare line): a second,
    /// shallow pass, for the dispatcher only. `None` unless the body is an object.
    pub fn body_bytes<'l>(&self, line: &'l [u8]) -> Option<&'l [u8]> {
        #[derive(Deserialize)]
        struct JustBody<'a> {
            #[serde(borrow, default)]
            body: Option<&'a RawValue>,
        }
        match (self.body, self.bare) {
            (Body::Object, true) => Some(line),
            (Body::Object, false) => {
                let text = std::str::from_utf8(line).ok()?;
                let raw = serde_json::from_str::<JustBody<'_>>(text).ok()?.body?;
                Some(raw.get().as_bytes())
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]], max: usize) -> Vec<(u64, u64, u64, String, bool)> {
        let mut s = LineSplitter::new(max, 1, 0);
        let mut out = vec![];
        let mut f = |l: RawLine<'_>| out.push((l.no, l.offset, l.len, String::from_utf8_lossy(l.bytes).into_owned(), l.overlong));
        for c in chunks {
            s.feed(c, &mut f);
        }
        s.finish(&mut f);
        out
    }

    #[test]
    fn splits_across_chunks_with_offsets() {
        let got = split(&[b"ab\r\nc", b"d\n\nef"], 100);
        assert_eq!(got, vec![(1, 0, 4, "ab".into(), false), (2, 4, 3, "cd".into(), false), (3, 7, 1, "".into(), false), (4, 8, 2, "ef".into(), false)]);
    }

    #[test]
    fn a_leading_bom_belongs_to_no_line() {
        let want = vec![(1, 3, 3, "ab".into(), false), (2, 6, 1, "c".into(), false)];
        assert_eq!(split(&[b"\xEF\xBB\xBFab\nc"], 100), want);
        assert_eq!(split(&[b"\xEF", b"\xBB", b"\xBFab\n", b"c"], 100), want, "a BOM split across chunks");
        assert_eq!(split(&[b"\xEF\xBB"], 100), vec![(1, 0, 2, "\u{FFFD}".into(), false)], "half a BOM is data");
        assert_eq!(split(&[b"\xEF\xBBx\n"], 100)[0].2, 4);
        assert_eq!(split(&[b"a\n\xEF\xBB\xBFb"], 100)[1].3, "\u{FEFF}b", "only at the start");
        assert_eq!(split(&[b"\xEF\xBB\xBF"], 100), vec![], "a file of only a BOM has no line");
    }

    #[test]
    fn overlong_lines_are_cut_and_flagged() {
        let got = split(&[b"0123456789", b"abc\nok\n"], 4);
        assert_eq!(got[0].3, "0123");
        assert!(got[0].4);
        assert_eq!((got[0].2, got[1].1), (14, 14));
        assert_eq!(got[1], (2, 14, 3, "ok".into(), false));
    }

    #[test]
    fn parses_full_and_bare_lines() {
        let full = br#"{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":"m","max_tokens":7,"stream":false}}"#;
        let p = ParsedLine::parse(full).unwrap();
        assert!(!p.bare);
        assert_eq!(p.custom_id, Field::Str("a".into()));
        assert_eq!(p.model.as_str(), Some("m"));
        assert_eq!(p.max_tokens, Some(7));
        assert!(!p.stream_true);
        let bare = ParsedLine::parse(br#"{"model":"m","messages":[],"stream":true}"#).unwrap();
        assert!(bare.bare && bare.stream_true);
        assert_eq!(bare.model.as_str(), Some("m"));
        let wrong = ParsedLine::parse(br#"{"custom_id":5,"method":"POST","body":[1]}"#).unwrap();
        assert_eq!(wrong.custom_id, Field::NotString);
        assert_eq!(wrong.body, Body::NotObject);
        assert_eq!(wrong.url, Field::Missing);
        let escaped = ParsedLine::parse(br#"{"custom_id":"a\"b\u00e9","method":"POST"}"#).unwrap();
        assert_eq!(escaped.custom_id, Field::Str("a\"bé".into()));
        let null_body = ParsedLine::parse(br#"{"custom_id":"a","body":null}"#).unwrap();
        assert_eq!(null_body.body, Body::NotObject);
        assert_eq!(ParsedLine::parse(br#"{"custom_id":"a"}"#).unwrap().body, Body::Missing);
        assert!(ParsedLine::parse(b"[1,2]").is_err());
        assert!(ParsedLine::parse(b"{\"a\":").is_err());
        assert!(ParsedLine::parse(b"{\"a\":\"\xff\"}").is_err());
    }

    /// One pass reads the body's head in place; the dispatcher asks for the body's bytes.
    #[test]
    fn body_head_and_bytes() {
        let full = br#"{"url":"/v1/x","model":"top","body":{"messages":[{"model":"inner"}],"model":"a","model":"b","max_tokens":1.5,"max_completion_tokens":9},"custom_id":"c"}"#;
        let p = ParsedLine::parse(full).unwrap();
        assert_eq!((p.model.as_str(), p.max_tokens), (Some("b"), Some(9)), "the body's keys, last one wins, nested ones ignored");
        let body = p.body_bytes(full).unwrap();
        assert!(body.starts_with(br#"{"messages""#) && body.ends_with(b"9}"));
        let bare = br#" {"model":"m","body":{"model":"x"},"max_output_tokens":3} "#;
        let p = ParsedLine::parse(bare).unwrap();
        assert!(p.bare);
        assert_eq!((p.model.as_str(), p.max_tokens, p.body_bytes(bare)), (Some("m"), Some(3), Some(&bare[..])));
        let not_object = br#"{"custom_id":"a","body":"x"}"#;
        assert_eq!(ParsedLine::parse(not_object).unwrap().body_bytes(not_object), None);
    }
}
