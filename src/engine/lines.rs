//! Input lines: splitting a byte stream into numbered lines, and parsing one line in either
//! the full batch format or the bare-body extension.
//!
//! Line numbers are physical and 1-based (blank lines count, as in an editor) so that every
//! error points at the line the user sees. Blank lines carry no request. A UTF-8 byte order
//! mark at the start of the stream belongs to no line: the first line starts after it (its
//! `offset` is 3), so a work unit cut from it never holds the mark either.

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

/// The envelope of a full line; unknown keys are ignored.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow, default)]
    custom_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    method: Option<&'a RawValue>,
    #[serde(borrow, default)]
    url: Option<&'a RawValue>,
    #[serde(borrow, default)]
    body: Option<&'a RawValue>,
}

/// The parts of a request body batchd reads; the rest passes through untouched.
#[derive(Deserialize)]
struct BodyHead<'a> {
    #[serde(borrow, default)]
    model: Option<&'a RawValue>,
    #[serde(borrow, default)]
    stream: Option<&'a RawValue>,
    #[serde(default)]
    max_tokens: Option<serde_json::Value>,
    #[serde(default)]
    max_completion_tokens: Option<serde_json::Value>,
    #[serde(default)]
    max_output_tokens: Option<serde_json::Value>,
}

/// A field as found on a line: absent, of the wrong JSON type, or a string.
#[derive(Debug, Clone, PartialEq)]
pub enum Field {
    Missing,
    NotString,
    Str(String),
}

impl Field {
    fn of(raw: Option<&RawValue>) -> Field {
        match raw {
            None => Field::Missing,
            Some(r) if r.get() == "null" => Field::Missing,
            Some(r) => match serde_json::from_str::<String>(r.get()) {
                Ok(s) => Field::Str(s),
                Err(_) => Field::NotString,
            },
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Field::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// One line, parsed just enough to validate and route it.
#[derive(Debug)]
pub struct ParsedLine<'a> {
    /// No `custom_id`, `method` or `url`: the line is a bare request body.
    pub bare: bool,
    pub custom_id: Field,
    pub method: Field,
    pub url: Field,
    /// `None` when missing; `Some(Err(()))` when present but not an object.
    pub body: Option<Result<&'a RawValue, ()>>,
    pub model: Field,
    pub stream_true: bool,
    pub max_tokens: Option<u64>,
}

impl<'a> ParsedLine<'a> {
    /// Parses a line; `Err` completes the sentence "Line N …" (it is not a JSON object).
    pub fn parse(bytes: &'a [u8]) -> Result<ParsedLine<'a>, String> {
        let text = std::str::from_utf8(bytes).map_err(|e| format!("is not valid UTF-8 ({e})"))?;
        if !text.trim_start().starts_with('{') {
            return Err("is not a JSON object".into());
        }
        let env: Envelope<'a> = serde_json::from_str(text).map_err(|e| format!("is not valid JSON ({e})"))?;
        let bare = env.custom_id.is_none() && env.method.is_none() && env.url.is_none();
        let body = if bare { Some(whole_line(text)?) } else { env.body };
        let body = body.map(|b| if b.get().starts_with('{') { Ok(b) } else { Err(()) });
        let head = match body {
            Some(Ok(b)) => serde_json::from_str::<BodyHead<'a>>(b.get()).map_err(|e| format!("has an invalid body ({e})"))?,
            _ => BodyHead { model: None, stream: None, max_tokens: None, max_completion_tokens: None, max_output_tokens: None },
        };
        let max_tokens = [&head.max_tokens, &head.max_completion_tokens, &head.max_output_tokens]
            .into_iter()
            .find_map(|v| v.as_ref().and_then(serde_json::Value::as_u64));
        Ok(ParsedLine {
            bare,
            custom_id: Field::of(env.custom_id),
            method: Field::of(env.method),
            url: Field::of(env.url),
            body,
            model: Field::of(head.model),
            stream_true: head.stream.is_some_and(|s| s.get() == "true"),
            max_tokens,
        })
    }
}

fn whole_line(text: &str) -> Result<&RawValue, String> {
    serde_json::from_str::<&RawValue>(text).map_err(|e| format!("is not valid JSON ({e})"))
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
        assert_eq!(
            got,
            vec![
                (1, 0, 4, "ab".into(), false),
                (2, 4, 3, "cd".into(), false),
                (3, 7, 1, "".into(), false),
                (4, 8, 2, "ef".into(), false)
            ]
        );
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
        assert!(matches!(wrong.body, Some(Err(()))));
        assert_eq!(wrong.url, Field::Missing);
        assert!(ParsedLine::parse(b"[1,2]").is_err());
        assert!(ParsedLine::parse(b"{\"a\":").is_err());
        assert!(ParsedLine::parse(b"{\"a\":\"\xff\"}").is_err());
    }
}
