//! An upstream's answer body, decoded as its frames arrive and capped on the decoded size.
//!
//! batchd asks for `Accept-Encoding: gzip, zstd`; an answer in either (or `x-gzip`, or none)
//! is decoded frame by frame into one buffer that never grows past the upstream's
//! `max_response_bytes`. The cap is on what the answer *means*, not on what crossed the wire:
//! a 200 KB gzip member that decodes to 200 MB stops at the cap, having used no more memory
//! than the cap, and the line fails at once with `response_too_large` (not retried: the same
//! request would get the same answer, and be paid for again). The compressed bytes are
//! bounded too, a little above the cap (a compressed answer is hardly ever larger than what
//! it decodes to), so a stream that decodes to nothing cannot run on either.
//!
//! zstd frames name the window their decoder must keep; a window larger than the cap (or
//! than 8 MB, for small caps) is refused (`WindowLogMax`), so a frame header cannot make the
//! decoder reserve much more than an answer may hold.

use std::io::Write;

use axum::http::header::{HeaderMap, CONTENT_ENCODING};
use bytes::Bytes;

/// Why an answer body could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// More than the cap, decoded or on the wire.
    #[error("more than {0} bytes")]
    TooLarge(u64),
    /// An encoding batchd did not ask for, or bytes that do not decode.
    #[error("{0}")]
    Unreadable(String),
}

/// The decoded bytes so far, refusing to hold more than `max`.
struct Capped {
    out: Vec<u8>,
    max: usize,
    over: bool,
}

impl Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.out.len() + buf.len() > self.max {
            self.over = true;
            return Err(std::io::Error::other("over max_response_bytes"));
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

enum Codec {
    Identity(Capped),
    Gzip(Box<flate2::write::MultiGzDecoder<Capped>>),
    Zstd(Box<zstd::stream::write::Decoder<'static, Capped>>),
}

/// Decodes one answer body as its frames arrive (see the module doc).
pub struct Decoder {
    codec: Codec,
    max: u64,
    /// Bytes received so far, and how many may come.
    raw: u64,
    raw_max: u64,
}

impl Decoder {
    /// A decoder for the answer whose headers are `h`, holding at most `max` decoded bytes.
    pub fn new(h: &HeaderMap, max: u64) -> Result<Decoder, DecodeError> {
        let encoding = h.get(CONTENT_ENCODING).and_then(|v| v.to_str().ok()).map(|v| v.trim().to_ascii_lowercase());
        let sink = Capped { out: Vec::new(), max: usize::try_from(max).unwrap_or(usize::MAX), over: false };
        let unreadable = |e: std::io::Error| DecodeError::Unreadable(e.to_string());
        let codec = match encoding.as_deref() {
            None | Some("" | "identity") => Codec::Identity(sink),
            Some("gzip" | "x-gzip") => Codec::Gzip(Box::new(flate2::write::MultiGzDecoder::new(sink))),
            Some("zstd") => {
                let mut raw = zstd::stream::raw::Decoder::new().map_err(unreadable)?;
                raw.set_parameter(zstd::stream::raw::DParameter::WindowLogMax(window_log_max(max))).map_err(unreadable)?;
                Codec::Zstd(Box::new(zstd::stream::write::Decoder::with_decoder(sink, raw)))
            }
            Some(other) => return Err(DecodeError::Unreadable(format!("content-encoding {other:?} was not asked for"))),
        };
        let raw_max = match codec {
            Codec::Identity(_) => max,
            _ => max.saturating_add(max / 64).saturating_add(4096),
        };
        Ok(Decoder { codec, max, raw: 0, raw_max })
    }

    /// Takes the next frame of the body.
    pub fn push(&mut self, data: &[u8]) -> Result<(), DecodeError> {
        self.raw += data.len() as u64;
        if self.raw > self.raw_max {
            return Err(DecodeError::TooLarge(self.max));
        }
        let written = match &mut self.codec {
            Codec::Identity(sink) => sink.write_all(data),
            Codec::Gzip(d) => d.write_all(data),
            Codec::Zstd(d) => d.write_all(data),
        };
        written.map_err(|e| self.failure(e))
    }

    /// The whole decoded body, once the last frame has been pushed.
    pub fn finish(mut self) -> Result<Bytes, DecodeError> {
        let finished = match &mut self.codec {
            Codec::Identity(_) => Ok(()),
            Codec::Gzip(d) => d.try_finish(),
            Codec::Zstd(d) => d.do_finish(),
        };
        finished.map_err(|e| self.failure(e))?;
        let sink = match &mut self.codec {
            Codec::Identity(sink) => sink,
            Codec::Gzip(d) => d.get_mut(),
            Codec::Zstd(d) => d.get_mut(),
        };
        Ok(Bytes::from(std::mem::take(&mut sink.out)))
    }

    /// An error of the codec: the cap (the sink refused more), or bytes that do not decode.
    fn failure(&self, e: std::io::Error) -> DecodeError {
        let sink = match &self.codec {
            Codec::Identity(sink) => sink,
            Codec::Gzip(d) => d.get_ref(),
            Codec::Zstd(d) => d.get_ref(),
        };
        if sink.over {
            DecodeError::TooLarge(self.max)
        } else {
            DecodeError::Unreadable(e.to_string())
        }
    }
}

/// The largest zstd window an answer of at most `max` bytes may need: its size rounded up to
/// a power of two, but never below the 8 MB every zstd decoder is to support (what encoders
/// use when they do not know the size in advance) nor above zstd's default limit (128 MB).
fn window_log_max(max: u64) -> u32 {
    (u64::BITS - max.saturating_sub(1).leading_zeros()).clamp(23, 27)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(name: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_ENCODING, name.parse().unwrap());
        h
    }

    /// Decodes `body` pushed in frames of `frame` bytes.
    fn decode(h: &HeaderMap, body: &[u8], max: u64, frame: usize) -> Result<Bytes, DecodeError> {
        let mut d = Decoder::new(h, max)?;
        for chunk in body.chunks(frame.max(1)) {
            d.push(chunk)?;
        }
        d.finish()
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(data).unwrap();
        gz.finish().unwrap()
    }

    #[test]
    fn gzip_zstd_and_identity_answers_are_decoded_in_any_framing() {
        let text = br#"{"object":"list","data":[{"embedding":[0.1,0.2,0.3]}]}"#.repeat(50);
        let gz = gzip(&text);
        assert!(gz.len() < text.len() / 4);
        let zs = zstd::stream::encode_all(&text[..], 3).unwrap();
        for frame in [1, 7, 4096] {
            assert_eq!(decode(&encoded("gzip"), &gz, 1 << 20, frame).unwrap(), Bytes::from(text.clone()));
            assert_eq!(decode(&encoded("zstd"), &zs, 1 << 20, frame).unwrap(), Bytes::from(text.clone()));
            assert_eq!(decode(&HeaderMap::new(), &text, 1 << 20, frame).unwrap(), Bytes::from(text.clone()));
        }
        let two_members = [gzip(b"{\"a\":"), gzip(b"1}")].concat();
        assert_eq!(decode(&encoded("x-gzip"), &two_members, 1024, 3).unwrap(), Bytes::from_static(b"{\"a\":1}"), "gzip members are concatenated");
    }

    #[test]
    fn what_does_not_decode_is_unreadable() {
        assert!(matches!(decode(&encoded("gzip"), b"not gzip", 1024, 4), Err(DecodeError::Unreadable(_))));
        assert!(matches!(decode(&encoded("zstd"), b"not zstd", 1024, 4), Err(DecodeError::Unreadable(_))));
        assert!(matches!(decode(&encoded("br"), b"x", 1024, 4), Err(DecodeError::Unreadable(_))), "an encoding not asked for");
        let gz = gzip(b"{\"a\":1}");
        assert!(matches!(decode(&encoded("gzip"), &gz[..gz.len() - 3], 1024, 4), Err(DecodeError::Unreadable(_))), "a cut-off member");
        let zs = zstd::stream::encode_all(&b"{\"a\":1}"[..], 3).unwrap();
        assert!(matches!(decode(&encoded("zstd"), &zs[..zs.len() - 2], 1024, 4), Err(DecodeError::Unreadable(_))), "a cut-off frame");
    }

    /// A bomb stops at the cap, however far it would decode: the buffer never grows past it.
    #[test]
    fn bombs_stop_at_the_cap_on_decoded_bytes() {
        let zeros = vec![0u8; 8 << 20];
        let gz = gzip(&zeros);
        let zs = zstd::stream::encode_all(&zeros[..], 3).unwrap();
        assert!(gz.len() < 64 << 10 && zs.len() < 64 << 10);
        for (name, body) in [("gzip", &gz), ("zstd", &zs)] {
            let mut d = Decoder::new(&encoded(name), 1 << 20).unwrap();
            let err = body.chunks(16 << 10).try_for_each(|c| d.push(c)).unwrap_err();
            assert!(matches!(err, DecodeError::TooLarge(n) if n == 1 << 20), "{name}: {err}");
        }
        assert!(matches!(decode(&HeaderMap::new(), &zeros, 1 << 20, 4096), Err(DecodeError::TooLarge(_))));
        assert!(decode(&encoded("gzip"), &gz, 8 << 20, 4096).is_ok(), "exactly the cap is taken");
        let junk = vec![0u8; 2 << 20];
        assert!(matches!(decode(&encoded("gzip"), &[gz.clone(), junk].concat(), 1 << 20, 4096), Err(DecodeError::TooLarge(_) | DecodeError::Unreadable(_))));
    }

    #[test]
    fn zstd_windows_larger_than_the_cap_are_refused() {
        let big = (0..(4u32 << 20)).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect::<Vec<u8>>();
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        enc.set_parameter(zstd::stream::raw::CParameter::WindowLog(26)).unwrap();
        enc.set_parameter(zstd::stream::raw::CParameter::EnableLongDistanceMatching(true)).unwrap();
        enc.write_all(&big).unwrap();
        let framed = enc.finish().unwrap();
        assert_eq!(window_log_max(1 << 20), 23);
        assert_eq!(window_log_max(32 << 20), 25);
        assert_eq!(window_log_max((32 << 20) + 1), 26);
        assert_eq!(window_log_max(u64::MAX), 27);
        assert_eq!(decode(&encoded("zstd"), &framed, 64 << 20, 4096).unwrap().len(), big.len(), "a 64 MB window for a 64 MB cap");
        let refused = decode(&encoded("zstd"), &framed, 16 << 20, 4096);
        assert!(matches!(refused, Err(DecodeError::Unreadable(_))), "a 64 MB window for a 16 MB cap: {refused:?}");
    }
}
