//! The HTTP/1 server under the API: an accept loop with a connection cap, per-connection
//! timeouts and graceful shutdown (what `axum::serve` leaves open).
//!
//! - At most `max_connections` connections are open at once. When every slot is taken and
//!   another client connects, the connection that has waited longest for a request (one that
//!   never sent one, or a kept-alive one nobody uses) is closed to make room (`crowd`): a
//!   crowd of idle sockets costs a real client one shed connection, not the header-read
//!   timeout. A connection serving a request is never cut for room; when every one is
//!   serving, further clients wait in the kernel's backlog ([`LISTEN_BACKLOG`]). Event
//!   streams, which serve for long, may hold only a share of the slots (`api::events`).
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
//! - A request the HTTP parser refuses (hyper answers it by itself) gets batchd's error
//!   envelope and an `x-request-id` like every other answer (`refusal`, `socket`).
//!
//! Request timeouts and request ids are layers of the router ([`crate::api`]), not of this
//! module.

mod bodies;
mod crowd;
mod refusal;
mod socket;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::header::CONNECTION;
use axum::http::HeaderValue;
use hyper::body::{Body as HttpBody, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;

use crate::config::HttpLimits;
use bodies::{Answer, Tracked};
use crowd::{Crowd, Member, Phase};
use socket::Watched;

/// How long a closed connection drains what its client still sends, at most…
const LINGER_TIME: Duration = Duration::from_secs(2);
/// …and how long it waits for more before closing.
const LINGER_QUIET: Duration = Duration::from_millis(250);
/// Bytes drained at most while lingering.
const LINGER_BYTES: u64 = 64 << 20;
/// Pause after a failed accept (e.g. out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How long the accept loop waits for a shed connection's slot before shedding another, and
/// for a slot at all before looking again for a connection to shed.
const SHED_WAIT: Duration = Duration::from_millis(100);
/// How long batchd's answer to an unparsable request may take to be written.
const REFUSAL_FLUSH: Duration = Duration::from_secs(2);

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
    let crowd = Arc::new(Crowd::default());
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    tokio::pin!(shutdown);
    loop {
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
        let permit = tokio::select! {
            p = slot(&slots, &crowd) => p,
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        tracker.spawn(connection(stream, app.clone(), limits, stop.clone(), crowd.join(), permit));
    }
    drop(listener);
    stop.cancel();
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(open = tracker.len(), "connections still open after the shutdown grace period are dropped");
    }
}

/// A connection slot: a free one, else the slot of the connection that has waited longest
/// for a request (shed), else the first slot to free up.
async fn slot(slots: &Arc<Semaphore>, crowd: &Crowd) -> OwnedSemaphorePermit {
    loop {
        if let Ok(p) = slots.clone().try_acquire_owned() {
            return p;
        }
        if crowd.shed_longest_waiting() {
            tracing::debug!(open = crowd.open(), "every connection slot is taken: closed the connection that waited longest for a request");
        }
        if let Ok(p) = tokio::time::timeout(SHED_WAIT, slots.clone().acquire_owned()).await {
            return p.expect("the semaphore is never closed");
        }
    }
}

type BoxedResponse = Pin<Box<dyn Future<Output = Result<axum::response::Response, Infallible>> + Send>>;

/// Serves one connection; `_permit` holds its slot, and `member` its place in the crowd,
/// until the socket is closed.
async fn connection(stream: TcpStream, app: axum::Router, limits: HttpLimits, stop: CancellationToken, member: Member, _permit: OwnedSemaphorePermit) {
    let conn = member.conn.clone();
    let io = TokioIo::new(Watched::new(stream, conn.clone()));
    let served = conn.clone();
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| -> BoxedResponse {
        served.serving();
        let mut app = app.clone();
        let unread = Arc::new(AtomicBool::new(!req.body().is_end_stream()));
        let req = req.map(|inner| Body::new(Tracked { inner, unread: unread.clone() }));
        let conn = served.clone();
        Box::pin(async move {
            let mut resp = app.call(req).await?;
            if unread.load(Ordering::Relaxed) {
                resp.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
            }
            Ok(resp.map(|b| Body::new(Answer::new(b, conn))))
        })
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout).keep_alive(true);
    let mut http = builder.serve_connection(io, service);
    let idle = conn.idle_for(limits.idle_timeout);
    tokio::pin!(idle);
    let (mut stopping, mut shedding) = (false, false);
    let ended = loop {
        tokio::select! {
            r = std::future::poll_fn(|cx| http.poll_without_shutdown(cx)) => break r,
            _ = &mut idle => {
                tracing::debug!("closing a connection on which nothing moved for the idle timeout");
                return;
            }
            _ = conn.shed.cancelled(), if !shedding => {
                if conn.phase() == Phase::Waiting {
                    return;
                }
                shedding = true;
                Pin::new(&mut http).graceful_shutdown();
            }
            _ = stop.cancelled(), if !stopping => {
                stopping = true;
                Pin::new(&mut http).graceful_shutdown();
            }
        }
    };
    match ended {
        Ok(()) if !stopping => linger(http.into_parts().io.into_inner().inner).await,
        Ok(()) => {}
        Err(e) if e.is_parse() || e.is_parse_too_large() => {
            let mut socket = http.into_parts().io.into_inner();
            if tokio::time::timeout(REFUSAL_FLUSH, socket.flush()).await.is_ok_and(|r| r.is_ok()) {
                linger(socket.inner).await;
            }
        }
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
