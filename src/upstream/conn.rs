//! Keep-alive HTTP/1.1 connections to one upstream, reused most-recent first.
//!
//! hyper's own `client::conn` does the protocol; this module only keeps idle connections.
//! It replaces hyper-util's general-purpose pooled client, which per request hashes a pool
//! key, races a lazy connect against the checkout and spawns a task to return the
//! connection once the answer's body is read. Here a request pops an idle sender, and the
//! caller hands it back with [`Connections::put_back`] after reading the body; only when the
//! connection is not ready for another request yet (rare once the body is read) does a task
//! wait for it, a bounded time. No lock is held across an await. A request that a stale
//! connection never sent is sent again on a fresh one, so a server closing idle connections
//! costs nothing but a reconnect.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderValue, Request, Response, Uri};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use tower_service::Service;

type Connector = HttpsConnector<HttpConnector>;

/// How long a returned connection may take to become ready for another request.
const READY_WAIT: Duration = Duration::from_secs(5);

/// Why no answer came back.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("could not connect: {0}")]
    Connect(String),
    #[error("{0}")]
    Http(#[from] hyper::Error),
}

pub struct Connections {
    connector: Connector,
    /// Scheme and authority of the upstream, for connecting.
    origin: Uri,
    /// The `Host` header every request carries.
    host: HeaderValue,
    idle: Arc<Mutex<Vec<Idle>>>,
    max_idle: usize,
    idle_timeout: Duration,
}

struct Idle {
    sender: SendRequest<Full<Bytes>>,
    since: Instant,
}

/// A connection lent to one request; give it back with [`Connections::put_back`].
pub struct Lent(SendRequest<Full<Bytes>>);

impl Connections {
    pub fn new(connector: Connector, origin: Uri, max_idle: usize, idle_timeout: Duration) -> Result<Connections, String> {
        let authority = origin.authority().ok_or("the upstream URL has no host")?;
        let host = HeaderValue::from_str(authority.as_str()).map_err(|e| e.to_string())?;
        Ok(Connections { connector, origin, host, idle: Arc::default(), max_idle, idle_timeout })
    }

    pub fn host(&self) -> &HeaderValue {
        &self.host
    }

    /// Sends `req` (origin-form URI, `Host` set) on an idle connection, or a new one.
    pub async fn send(&self, mut req: Request<Full<Bytes>>) -> Result<(Response<Incoming>, Lent), ConnError> {
        while let Some(mut sender) = self.take_idle() {
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok((resp, Lent(sender))),
                Err(mut e) => match e.take_message() {
                    // The connection died while idle and never sent it: try the next one.
                    Some(unsent) => req = unsent,
                    None => return Err(e.into_error().into()),
                },
            }
        }
        let mut sender = self.connect().await?;
        let resp = sender.send_request(req).await?;
        Ok((resp, Lent(sender)))
    }

    /// Keeps a connection for the next request once its answer has been read in full. It
    /// never waits: a connection still busy (say, writing a body the server answered early)
    /// is watched by a task for at most [`READY_WAIT`], then dropped.
    pub fn put_back(&self, Lent(mut sender): Lent) {
        if sender.is_ready() {
            return keep(&self.idle, self.max_idle, sender);
        }
        if sender.is_closed() {
            return;
        }
        let (idle, max_idle) = (self.idle.clone(), self.max_idle);
        tokio::spawn(async move {
            if let Ok(Ok(())) = tokio::time::timeout(READY_WAIT, sender.ready()).await {
                keep(&idle, max_idle, sender);
            }
        });
    }

    /// The most recently used idle connection still open and not idle for too long.
    fn take_idle(&self) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(c) = idle.pop() {
            if c.since.elapsed() < self.idle_timeout && c.sender.is_ready() {
                return Some(c.sender);
            }
        }
        None
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, ConnError> {
        let io = self.connector.clone().call(self.origin.clone()).await.map_err(|e| ConnError::Connect(error_chain(&*e)))?;
        let (sender, conn) = http1::Builder::new().handshake(io).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        Ok(sender)
    }
}

/// An error and its causes (a TLS failure hides its reason in a source), without any URL or
/// header, so no secret can leak.
pub(super) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out += &format!(": {c}");
        cause = c.source();
    }
    out
}

/// Adds a ready connection to the idle ones, unless enough are kept already.
fn keep(idle: &Mutex<Vec<Idle>>, max_idle: usize, sender: SendRequest<Full<Bytes>>) {
    let mut idle = idle.lock().unwrap_or_else(|p| p.into_inner());
    if idle.len() < max_idle {
        idle.push(Idle { sender, since: Instant::now() });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A raw HTTP/1.1 server answering `{}` to every request; it closes each connection after
    /// one answer when `close_each` (without saying so), like a server with a short keep-alive.
    async fn server(close_each: bool) -> (Uri, Arc<AtomicUsize>, Arc<Mutex<Vec<String>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin: Uri = format!("http://{}/", listener.local_addr().unwrap()).parse().unwrap();
        let (conns, heads) = (Arc::new(AtomicUsize::new(0)), Arc::new(Mutex::new(Vec::new())));
        let (c, h) = (conns.clone(), heads.clone());
        tokio::spawn(async move {
            loop {
                let (mut sock, _) = listener.accept().await.unwrap();
                c.fetch_add(1, Ordering::SeqCst);
                let h = h.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        let mut chunk = [0u8; 4096];
                        let n = sock.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
                        let head = String::from_utf8_lossy(&buf[..end]).to_string();
                        let len: usize =
                            head.lines().find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap())).unwrap_or(0);
                        if buf.len() < end + 4 + len {
                            continue;
                        }
                        buf.drain(..end + 4 + len);
                        h.lock().unwrap().push(head);
                        sock.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}").await.unwrap();
                        if close_each {
                            return;
                        }
                    }
                });
            }
        });
        (origin, conns, heads)
    }

    fn connections(origin: Uri) -> Connections {
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        let tls = hyper_rustls::HttpsConnectorBuilder::new().with_webpki_roots().https_or_http().enable_http1().wrap_connector(tcp);
        Connections::new(tls, origin, 4, Duration::from_secs(90)).unwrap()
    }

    async fn post(c: &Connections) -> Result<u16, ConnError> {
        let req = Request::post("/v1/chat/completions").header("host", c.host().clone()).body(Full::new(Bytes::from_static(b"{\"a\":1}"))).unwrap();
        let (resp, lent) = c.send(req).await?;
        let status = resp.status().as_u16();
        http_body_util::BodyExt::collect(resp.into_body()).await?;
        c.put_back(lent);
        Ok(status)
    }

    #[tokio::test]
    async fn one_connection_serves_sequential_requests() {
        let (origin, conns, heads) = server(false).await;
        let c = connections(origin.clone());
        for _ in 0..20 {
            assert_eq!(post(&c).await.unwrap(), 200);
        }
        assert_eq!(conns.load(Ordering::SeqCst), 1, "keep-alive: one connection for 20 requests");
        let head = heads.lock().unwrap()[0].clone();
        let authority = origin.authority().unwrap().as_str().to_string();
        assert!(head.starts_with("POST /v1/chat/completions HTTP/1.1\r\n"), "origin-form request line: {head}");
        assert!(head.to_ascii_lowercase().contains(&format!("host: {authority}")), "Host header: {head}");
    }

    #[tokio::test]
    async fn connections_closed_by_the_server_are_replaced_without_failing_a_request() {
        let (origin, conns, heads) = server(true).await;
        let c = connections(origin);
        for i in 0..10 {
            assert_eq!(post(&c).await.unwrap(), 200, "request {i}");
        }
        assert_eq!(heads.lock().unwrap().len(), 10, "each request reached the server once");
        assert_eq!(conns.load(Ordering::SeqCst), 10);
    }

    #[tokio::test]
    async fn concurrent_requests_each_get_a_connection_and_idle_ones_are_capped() {
        let (origin, conns, _) = server(false).await;
        let c = Arc::new(connections(origin));
        let all = (0..8).map(|_| {
            let c = c.clone();
            tokio::spawn(async move { post(&c).await.unwrap() })
        });
        for r in futures::future::join_all(all).await {
            assert_eq!(r.unwrap(), 200);
        }
        assert!(conns.load(Ordering::SeqCst) <= 8);
        assert!(c.idle.lock().unwrap().len() <= 4, "at most max_idle connections are kept");
    }

    #[tokio::test]
    async fn an_answer_before_the_body_is_sent_is_returned_at_once() {
        // The server answers 413 after the head and never reads the 8 MB body: the answer
        // must come back at once, and the busy connection must not be reused.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin: Uri = format!("http://{}/", listener.local_addr().unwrap()).parse().unwrap();
        tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let mut head = Vec::new();
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = sock.read(&mut buf).await.unwrap();
                head.extend_from_slice(&buf[..n]);
            }
            sock.write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 2\r\n\r\n{}").await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let c = connections(origin);
        let body = Bytes::from(vec![b'x'; 8 << 20]);
        let req = Request::post("/v1/files").header("host", c.host().clone()).body(Full::new(body)).unwrap();
        let started = Instant::now();
        let answer = tokio::time::timeout(Duration::from_secs(10), async {
            let (resp, lent) = c.send(req).await.unwrap();
            let status = resp.status().as_u16();
            http_body_util::BodyExt::collect(resp.into_body()).await.unwrap();
            c.put_back(lent);
            status
        })
        .await
        .expect("the early answer came back");
        assert_eq!(answer, 413);
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
        assert!(c.idle.lock().unwrap().is_empty(), "a connection still writing is not idle");
    }

    #[tokio::test]
    async fn an_unreachable_upstream_is_a_connect_error() {
        let port = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
        let c = connections(format!("http://127.0.0.1:{port}/").parse().unwrap());
        assert!(matches!(post(&c).await, Err(ConnError::Connect(_))));
    }
}
