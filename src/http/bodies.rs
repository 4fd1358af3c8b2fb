//! The bodies of one exchange, watched: the request's (was it read to its end?) and the
//! answer's (when it is done, the exchange is ending; see [`super::crowd::Phase`]).

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};

use super::crowd::Conn;

/// A request body that notes when it has been read to its end.
pub struct Tracked {
    pub inner: Incoming,
    pub unread: Arc<AtomicBool>,
}

impl HttpBody for Tracked {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(r, Poll::Ready(None)) || self.inner.is_end_stream() {
            self.unread.store(false, Ordering::Relaxed);
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An answer's body that tells its connection when hyper is done with it (dropped: sent,
/// or abandoned with the connection).
pub struct Answer {
    inner: Body,
    conn: Arc<Conn>,
}

impl Answer {
    pub fn new(inner: Body, conn: Arc<Conn>) -> Answer {
        Answer { inner, conn }
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        self.conn.ending();
    }
}

impl HttpBody for Answer {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
