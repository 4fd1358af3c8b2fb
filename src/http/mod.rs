//! The HTTP/1 server under the API: an accept loop with a connection cap, per-connection
//! timeouts and graceful shutdown (what `axum::serve` leaves open).
//!
//! - At most `max_connections` connections are open at once. The loop takes a slot before it
//!   accepts, so further clients wait in the kernel's backlog ([`LISTEN_BACKLOG`]) instead of
//!   costing memory here.
//! - A request's head must arrive within `header_read_timeout`, counted from the first read of
//!   a new connection and from the moment a kept-alive connection goes idle (hyper's timer):
//!   a client sending its headers byte by byte is cut off.
//! - A connection on which no byte moves in either direction for `idle_timeout` is closed: an
//!   idle keep-alive connection, a body upload that stalled, a client that stopped reading.
//! - An answer to a request whose body was not read to its end (say a 413 for a body over a
//!   limit) says `Connection: close`, so the client does not send its next request on a
//!   connection about to close. When hyper then ends the connection, the socket lingers
//!   briefly, draining what the client still sends, so that the client can read the answer
//!   instead of a connection reset.
//! - On shutdown: stop accepting, let every connection finish its current exchange and close,
//!   and wait at most `grace` for them.
//!
//! Request timeouts and request ids are layers of the router ([`crate::api`]), not of this
//! module.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::header::CONNECTION;
use axum::http::HeaderValue;
use hyper::body::{Body as HttpBody, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;

use crate::config::HttpLimits;

/// How long a closed connection drains what its client still sends, at most…
const LINGER_TIME: Duration = Duration::from_secs(2);
/// …and how long it waits for more before closing.
const LINGER_QUIET: Duration = Duration::from_millis(250);
/// Bytes drained at most while lingering.
const LINGER_BYTES: u64 = 64 << 20;
/// Pause after a failed accept (e.g. out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Connections the kernel completes and queues while all slots are taken.
pub const LISTEN_BACKLOG: u32 = 1024;

/// Binds a listener with a [`LISTEN_BACKLOG`]-deep accept queue (the standard library's 128
/// drops clients as soon as the connection cap is reached under load).
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Serves `app` on `listener` until `shutdown` resolves, then stops as the module doc says.
pub async fn serve(listener: TcpListener, app: axum::Router, limits: HttpLimits, shutdown: impl Future<Output = ()>, grace: Duration) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            _ = &mut shutdown => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        tracker.spawn(connection(stream, app.clone(), limits, stop.clone(), permit));
    }
    drop(listener);
    stop.cancel();
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(open = tracker.len(), "connections still open after the shutdown grace period are dropped");
    }
}

type BoxedResponse = Pin<Box<dyn Future<Output = Result<axum::response::Response, Infallible>> + Send>>;

/// Serves one connection; `_permit` holds its slot until the socket is closed.
async fn connection(stream: TcpStream, app: axum::Router, limits: HttpLimits, stop: CancellationToken, _permit: OwnedSemaphorePermit) {
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched { inner: stream, activity: activity.clone() });
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| -> BoxedResponse {
        let mut app = app.clone();
        let unread = Arc::new(AtomicBool::new(!req.body().is_end_stream()));
        let req = req.map(|inner| Body::new(Tracked { inner, unread: unread.clone() }));
        Box::pin(async move {
            let mut resp = app.call(req).await?;
            if unread.load(Ordering::Relaxed) {
                resp.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
            }
            Ok(resp)
        })
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout).keep_alive(true);
    let mut conn = builder.serve_connection(io, service);
    let idle = activity.idle_for(limits.idle_timeout);
    tokio::pin!(idle);
    let mut stopping = false;
    let ended = loop {
        tokio::select! {
            r = std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)) => break r,
            _ = &mut idle => {
                tracing::debug!("closing a connection on which nothing moved for the idle timeout");
                return;
            }
            _ = stop.cancelled(), if !stopping => {
                stopping = true;
                Pin::new(&mut conn).graceful_shutdown();
            }
        }
    };
    match ended {
        Ok(()) if !stopping => linger(conn.into_parts().io.into_inner().inner).await,
        Ok(()) => {}
        Err(e) => tracing::debug!(error = %e, "connection ended with an error"),
    }
}

/// Half-closes the socket, then reads and discards what the client still sends (bounded in
/// time and bytes), so that a client still sending a body can read the answer already sent.
async fn linger(mut stream: TcpStream) {
    if stream.shutdown().await.is_err() {
        return;
    }
    let deadline = Instant::now() + LINGER_TIME;
    let mut buf = vec![0u8; 64 * 1024];
    let mut drained = 0u64;
    while drained < LINGER_BYTES && Instant::now() < deadline {
        match tokio::time::timeout(LINGER_QUIET, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => drained += n as u64,
            _ => break,
        }
    }
}

/// A request body that notes when it has been read to its end.
struct Tracked {
    inner: Incoming,
    unread: Arc<AtomicBool>,
}

impl HttpBody for Tracked {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(r, Poll::Ready(None)) || self.inner.is_end_stream() {
            self.unread.store(false, Ordering::Relaxed);
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// When bytes last moved on a connection.
struct Activity {
    start: Instant,
    /// Milliseconds after `start` of the last read or write that moved a byte.
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity { start: Instant::now(), last_ms: AtomicU64::new(0) }
    }

    fn touch(&self) {
        self.last_ms.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn quiet_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }

    /// Resolves once nothing has moved for `timeout`.
    async fn idle_for(&self, timeout: Duration) {
        loop {
            let quiet = self.quiet_for();
            if quiet >= timeout {
                return;
            }
            tokio::time::sleep(timeout - quiet).await;
        }
    }
}

/// A socket that records in its [`Activity`] each read or write that moves a byte.
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
