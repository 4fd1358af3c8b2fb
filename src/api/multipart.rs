//! `multipart/form-data` bodies read with every part bounded before it is read.
//!
//! The `file` part may be as large as the upload limit and is handed out chunk by chunk; every
//! other part is at most [`MAX_FIELD_BYTES`], a form has at most [`MAX_PARTS`] parts, and the
//! whole body at most the upload limit plus [`SLACK`]. The parser (multer) buffers the part
//! headers until their end; a meter on the body refuses a body once more than
//! [`MAX_UNREAD_BYTES`] of it were taken in without reaching the handler, so a part header
//! that never ends is not buffered either. Every refusal is an [`ApiError`]: 413 for a size,
//! 400 for a malformed body.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::http::{header, HeaderMap};
use bytes::Bytes;
use futures::Stream;
use multer::{Constraints, SizeLimit};

use crate::error::{ApiError, ApiResult};

/// Largest non-file part (`purpose`, `expires_after[…]`, anything unknown).
pub const MAX_FIELD_BYTES: u64 = 4096;
/// Most parts in one form.
pub const MAX_PARTS: usize = 16;
/// Room for framing and the non-file parts on top of the file itself.
pub const SLACK: u64 = 128 * 1024;
/// Bytes taken in but not yet handed to the handler (part headers, boundaries, the chunk
/// being parsed) at most.
pub const MAX_UNREAD_BYTES: u64 = 1 << 20;

/// A form being read, part by part.
pub struct Form {
    inner: multer::Multipart<'static>,
    meter: Arc<Meter>,
    parts: usize,
    file_limit: u64,
}

/// One part of a [`Form`].
pub struct Part {
    inner: multer::Field<'static>,
    meter: Arc<Meter>,
    file_limit: u64,
}

impl Form {
    /// Starts reading `body`; `file_limit` bounds the `file` part.
    pub fn new(headers: &HeaderMap, body: Body, file_limit: u64) -> ApiResult<Form> {
        let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
        let boundary = multer::parse_boundary(ct).map_err(|e| ApiError::bad_request(format!("The request must be multipart/form-data: {e}")))?;
        let meter = Arc::new(Meter::default());
        let stream = Metered { inner: body.into_data_stream(), meter: meter.clone() };
        let limits = SizeLimit::new().whole_stream(file_limit + SLACK).per_field(MAX_FIELD_BYTES).for_field("file", file_limit);
        let inner = multer::Multipart::with_constraints(stream, boundary, Constraints::new().size_limit(limits));
        Ok(Form { inner, meter, parts: 0, file_limit })
    }

    pub async fn next(&mut self) -> ApiResult<Option<Part>> {
        let field = self.inner.next_field().await.map_err(|e| refusal(e, self.file_limit))?;
        let Some(inner) = field else { return Ok(None) };
        self.parts += 1;
        if self.parts > MAX_PARTS {
            return Err(ApiError::bad_request(format!("The form has more than {MAX_PARTS} parts.")));
        }
        Ok(Some(Part { inner, meter: self.meter.clone(), file_limit: self.file_limit }))
    }
}

impl Part {
    pub fn name(&self) -> &str {
        self.inner.name().unwrap_or_default()
    }

    pub fn file_name(&self) -> Option<&str> {
        self.inner.file_name()
    }

    /// The next chunk of the part's content.
    pub async fn chunk(&mut self) -> ApiResult<Option<Bytes>> {
        let c = self.inner.chunk().await.map_err(|e| refusal(e, self.file_limit))?;
        if let Some(c) = &c {
            self.meter.handed(c.len());
        }
        Ok(c)
    }

    /// The whole part as UTF-8 text (at most [`MAX_FIELD_BYTES`]).
    pub async fn text(mut self) -> ApiResult<String> {
        let mut buf = Vec::new();
        while let Some(c) = self.chunk().await? {
            buf.extend_from_slice(&c);
        }
        let name = self.name().to_string();
        String::from_utf8(buf).map_err(|_| ApiError::bad_request(format!("The field '{name}' is not UTF-8 text.")).param(name))
    }

    /// Reads the part to its end, keeping nothing.
    pub async fn skip(mut self) -> ApiResult<()> {
        while self.chunk().await?.is_some() {}
        Ok(())
    }
}

/// A multer error as the client's mistake: 413 for a size, 400 otherwise.
fn refusal(e: multer::Error, file_limit: u64) -> ApiError {
    match e {
        multer::Error::FieldSizeExceeded { field_name, .. } if field_name.as_deref() == Some("file") => file_too_large(file_limit),
        multer::Error::FieldSizeExceeded { field_name, .. } => {
            let name = field_name.unwrap_or_default();
            ApiError::too_large(format!("The field '{name}' is longer than {MAX_FIELD_BYTES} bytes.")).param(name).code("field_too_large")
        }
        multer::Error::StreamSizeExceeded { .. } => file_too_large(file_limit),
        multer::Error::StreamReadFailed(cause) if cause.downcast_ref::<Unread>().is_some() => {
            ApiError::too_large(format!("The multipart framing (part headers) is larger than {MAX_UNREAD_BYTES} bytes.")).code("request_too_large")
        }
        other => ApiError::bad_request(format!("The multipart body is malformed: {other}")),
    }
}

pub fn file_too_large(limit: u64) -> ApiError {
    ApiError::too_large(format!("The file is larger than the upload limit of {limit} bytes.")).param("file")
}

/// Counts the body's bytes taken in and handed out.
#[derive(Default)]
struct Meter {
    taken: AtomicU64,
    handed: AtomicU64,
}

impl Meter {
    fn handed(&self, n: usize) {
        self.handed.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn take(&self, n: usize) -> bool {
        let taken = self.taken.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        taken.saturating_sub(self.handed.load(Ordering::Relaxed)) <= MAX_UNREAD_BYTES
    }
}

/// The body is refused: too much of it was taken in without reaching the handler.
#[derive(Debug)]
struct Unread;

impl std::fmt::Display for Unread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "more than {MAX_UNREAD_BYTES} bytes of multipart framing")
    }
}

impl std::error::Error for Unread {}

/// The request body, counted by a [`Meter`].
struct Metered {
    inner: axum::body::BodyDataStream,
    meter: Arc<Meter>,
}

impl Stream for Metered {
    type Item = Result<Bytes, Box<dyn std::error::Error + Send + Sync>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match Pin::new(&mut self.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) if !self.meter.take(chunk.len()) => Poll::Ready(Some(Err(Box::new(Unread)))),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
            other => other.map(|o| o.map(|r| r.map_err(|e| Box::new(e) as _))),
        }
    }
}
