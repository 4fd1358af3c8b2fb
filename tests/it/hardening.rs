//! Hostile and unlucky clients against the real binary (issue #10, API side): huge bodies are
//! refused without being buffered, slow, idle and stalled connections are cut off and cost
//! little, and the SDK-visible fixes (request ids, retry hints, idempotency, ranges, expiry,
//! file names, endpoints, models, BOM, redacted secrets). Every refusal is an error envelope
//! and harms nothing stored.

use std::io::{Read, Write};
use std::net::TcpStream as StdTcp;
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MB: u64 = 1 << 20;

/// Open sockets of a process (files such as SQLite's come and go with its pool).
fn open_fds(pid: u32) -> usize {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return 0 };
    dir.flatten().filter(|e| std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().starts_with("socket:"))).count()
}

/// How many connections wait in the accept queue of the listener on `addr` (`127.0.0.1:PORT`),
/// from `/proc/net/tcp` (a listening socket's `rx_queue`).
fn accept_queue(addr: &str) -> Option<u64> {
    let port: u16 = addr.rsplit(':').next()?.parse().ok()?;
    let local = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/tcp").ok()?.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1) == Some(&local.as_str()) && f.get(3) == Some(&"0A")).then(|| u64::from_str_radix(f.get(4)?.split(':').nth(1)?, 16).ok())?
    })
}

fn host(s: &Server) -> String {
    s.url.trim_start_matches("http://").to_string()
}

/// A parsed HTTP answer read off a raw socket.
struct Raw {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Raw {
    fn parse(bytes: &[u8]) -> Option<Raw> {
        let end = bytes.windows(4).position(|w| w == b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&bytes[..end]).into_owned();
        let status = head.split_whitespace().nth(1)?.parse().ok()?;
        Some(Raw { status, head, body: bytes[end + 4..].to_vec() })
    }

    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("status {}: body is not JSON ({e}): {:?}", self.status, String::from_utf8_lossy(&self.body)))
    }
}

/// Sends `head` and then up to `total` body bytes (`prefix`, then filler), as fast as the
/// server takes them, while another thread reads the answer. Returns the answer and how
/// many body bytes the server let through before it stopped reading.
fn flood(addr: &str, head: &str, prefix: &[u8], total: u64, chunked: bool) -> (Raw, u64) {
    let mut s = StdTcp::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut r = s.try_clone().unwrap();
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    });
    s.write_all(head.as_bytes()).unwrap();
    let filler = vec![b'x'; MB as usize];
    let mut sent = 0u64;
    let mut piece = prefix.to_vec();
    while sent < total {
        if piece.is_empty() {
            piece = filler[..(total - sent).min(MB) as usize].to_vec();
        }
        let ok = if chunked {
            s.write_all(format!("{:x}\r\n", piece.len()).as_bytes()).and_then(|_| s.write_all(&piece)).and_then(|_| s.write_all(b"\r\n"))
        } else {
            s.write_all(&piece)
        };
        if ok.is_err() {
            break;
        }
        sent += piece.len() as u64;
        piece.clear();
    }
    if chunked && sent >= total {
        let _ = s.write_all(b"0\r\n\r\n");
    }
    let answer = reader.join().unwrap();
    let raw = Raw::parse(&answer).unwrap_or_else(|| panic!("no HTTP answer after {sent} bytes: {:?}", String::from_utf8_lossy(&answer)));
    (raw, sent)
}

fn request_head(method: &str, path: &str, host: &str, content_type: &str, length: Option<u64>) -> String {
    let framing = match length {
        Some(n) => format!("Content-Length: {n}"),
        None => "Transfer-Encoding: chunked".to_string(),
    };
    format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n{framing}\r\n\r\n")
}

const BOUNDARY: &str = "hardening-boundary";

fn multipart_head(host: &str, length: Option<u64>) -> String {
    request_head("POST", "/v1/files", host, &format!("multipart/form-data; boundary={BOUNDARY}"), length)
}

/// A 1 GB chunked field, a 400 MB `purpose`, a part header that never ends and 600 MB JSON
/// bodies (chunked and declared) are refused with 413 envelopes while the server's peak
/// resident memory stays small; nothing is stored and the server goes on working.
#[tokio::test]
async fn huge_bodies_are_refused_without_buffering() {
    let m = mock(MockArgs::default()).await;
    let s = Server::start(&config(&m.base_url(), "", ""));
    let api = s.api();
    let keep = api.upload(&chat_lines(2, "m")).await;
    let addr = host(&s);
    let file_part = format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jsonl\"\r\n\r\n{{}}\r\n");
    /// What, request head, body prefix, body size, chunked, the param the 413 names.
    type Case<'a> = (&'a str, String, Vec<u8>, u64, bool, Option<&'a str>);
    let cases: Vec<Case> = vec![
        (
            "1 GB chunked unknown field",
            multipart_head(&addr, None),
            format!("{file_part}--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"junk\"\r\n\r\n").into_bytes(),
            1 << 30,
            true,
            Some("junk"),
        ),
        (
            "400 MB purpose",
            multipart_head(&addr, None),
            format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n").into_bytes(),
            400 * MB,
            true,
            Some("purpose"),
        ),
        (
            "part header without end",
            multipart_head(&addr, None),
            format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\nX-Pad: ").into_bytes(),
            400 * MB,
            true,
            None,
        ),
        (
            "600 MB chunked JSON",
            request_head("POST", "/v1/batches", &addr, "application/json", None),
            b"{\"metadata\": {\"k\": \"".to_vec(),
            600 * MB,
            true,
            None,
        ),
        (
            "600 MB declared JSON",
            request_head("POST", "/v1/batches", &addr, "application/json", Some(600 * MB)),
            b"{\"metadata\": {\"k\": \"".to_vec(),
            600 * MB,
            false,
            None,
        ),
    ];
    for (what, head, prefix, total, chunked, param) in cases {
        let t = Instant::now();
        let (answer, sent) = tokio::task::spawn_blocking(move || flood(&addr_of(&head), &head, &prefix, total, chunked)).await.unwrap();
        assert_eq!(answer.status, 413, "{what}: {}", String::from_utf8_lossy(&answer.body));
        let body = answer.json();
        assert_envelope(&body);
        if let Some(p) = param {
            assert_eq!(body["error"]["param"], p, "{what}: {body}");
        }
        assert!(answer.header("x-request-id").is_some(), "{what}");
        assert!(sent < total / 4, "{what}: the server read {sent} of {total} bytes before refusing");
        eprintln!("{what}: 413 after {} ms, {} MiB let through", t.elapsed().as_millis(), sent / MB);
    }
    let peak = proc_mb(s.pid().unwrap(), "VmHWM:");
    eprintln!("server peak RSS (VmHWM): {peak} MiB");
    assert!(peak < 100, "peak RSS {peak} MiB: a body was buffered");
    let (_, list) = api.get("/files").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1, "nothing was stored: {list}");
    assert_eq!(api.content(&keep).await, jsonl(&chat_lines(2, "m")));
    let id = api.submit(&chat_lines(3, "m")).await;
    api.wait_for(&id, &["completed"], Duration::from_secs(20)).await;
}

/// The address in a request head's Host header.
fn addr_of(head: &str) -> String {
    head.lines().find_map(|l| l.strip_prefix("Host: ")).unwrap().to_string()
}

/// Small bodies over the limits: a 300 KiB JSON body, a 5000-byte purpose, too many parts.
#[tokio::test]
async fn bodies_over_the_small_limits_get_envelopes() {
    let m = mock(MockArgs::default()).await;
    let s = spawn_app(&config(&m.base_url(), "", ""));
    let api = s.api();
    let big = json!({"input_file_id": "file-x", "endpoint": "/v1/chat/completions", "completion_window": "24h", "metadata": {"k": "v".repeat(300_000)}});
    for _ in 0..5 {
        // Refused unread: the answer closes the connection, so the next request (on the same
        // client) never meets a connection closed under it.
        let r = api.http.post(format!("{}/batches", api.base)).json(&big).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 413);
        assert_eq!(r.headers()["connection"], "close");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "request_too_large", "{v}");
        let (st, _) = api.get("/files").await;
        assert_eq!(st, 200);
    }
    let form =
        reqwest::multipart::Form::new().text("purpose", "b".repeat(5000)).part("file", reqwest::multipart::Part::bytes(b"{}\n".to_vec()).file_name("a.jsonl"));
    let r = api.http.post(format!("{}/files", api.base)).multipart(form).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 413);
    let v: Value = r.json().await.unwrap();
    assert_eq!((v["error"]["param"].as_str(), v["error"]["code"].as_str()), (Some("purpose"), Some("field_too_large")), "{v}");
    let mut form = reqwest::multipart::Form::new().text("purpose", "batch");
    for i in 0..20 {
        form = form.text(format!("extra{i}"), "x");
    }
    let r = api.http.post(format!("{}/files", api.base)).multipart(form.part("file", reqwest::multipart::Part::bytes(b"{}\n".to_vec()))).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert_envelope(&r.json().await.unwrap());
    let (_, list) = api.get("/files").await;
    assert!(list["data"].as_array().unwrap().is_empty(), "{list}");
}

/// Opens a connection and sends nothing; resolves with how long the server kept it open
/// (`None`: still open after `wait`).
async fn held_open(addr: String, wait: Duration, slow_head: bool) -> Option<Duration> {
    let t = Instant::now();
    let mut c = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(&addr)).await.ok()?.ok()?;
    let mut buf = [0u8; 1024];
    let head = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nX-Slow: ");
    let mut sent = 0;
    loop {
        let step = if slow_head { Duration::from_millis(100) } else { wait };
        tokio::select! {
            r = c.read(&mut buf) => if matches!(r, Ok(0) | Err(_)) { return Some(t.elapsed()) },
            _ = tokio::time::sleep(step) => {
                if t.elapsed() > wait {
                    return None;
                }
                if slow_head {
                    let byte = head.as_bytes().get(sent).copied().unwrap_or(b'a');
                    if c.write_all(&[byte]).await.is_err() {
                        return Some(t.elapsed());
                    }
                    sent += 1;
                }
            }
        }
    }
}

/// 100 clients sending their headers a byte at a time and 1,800 that send nothing: each is
/// closed soon after the header-read timeout, the server's memory stays small, a normal
/// client is served meanwhile, every socket is released, and SIGTERM still stops it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slowloris_and_idle_crowds_are_closed_and_cost_little() {
    let m = mock(MockArgs::default()).await;
    let mut s = Server::start(&config(&m.base_url(), "", "[server]\nheader_read_timeout_s = 1\nidle_timeout_s = 3"));
    let (pid, addr) = (s.pid().unwrap(), host(&s));
    let (rss0, fds0) = (proc_mb(pid, "VmRSS:"), open_fds(pid));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..1900 {
        tasks.push(tokio::spawn(held_open(addr.clone(), Duration::from_secs(20), i < 100)));
    }
    let mut peak = 0;
    let mut served = None;
    while t.elapsed() < Duration::from_secs(4) {
        peak = peak.max(proc_mb(pid, "VmRSS:"));
        if served.is_none() && t.elapsed() > Duration::from_millis(500) {
            let r = reqwest::Client::new().get(format!("{}/healthz", s.url)).timeout(Duration::from_secs(5)).send().await;
            served = Some(r.map(|r| r.status().as_u16()).map_err(|e| e.to_string()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let held: Vec<Option<Duration>> = futures::future::join_all(tasks).await.into_iter().map(Result::unwrap).collect();
    let open = held.iter().filter(|h| h.is_none()).count();
    let longest = held.iter().flatten().max().copied().unwrap_or_default();
    let slow_longest = held[..100].iter().flatten().max().copied().unwrap_or_default();
    eprintln!(
        "RSS {rss0} MiB before, peak {peak} MiB with 1,900 hostile connections; slowest close {longest:?} (slowloris {slow_longest:?}); fds {fds0} before"
    );
    assert_eq!(served, Some(Ok(200)), "a normal client is served during the attack");
    assert_eq!(open, 0, "{open} connections were never closed");
    assert!(slow_longest < Duration::from_secs(5), "a slowloris connection lived {slow_longest:?}");
    assert!(peak < rss0 + 60, "RSS grew from {rss0} to {peak} MiB");
    eventually("sockets released", Duration::from_secs(10), || async { (open_fds(pid) <= fds0 + 2).then_some(()) }).await;
    let before = open_fds(pid);
    let late: Vec<_> = (0..50).map(|_| tokio::spawn(held_open(addr.clone(), Duration::from_secs(20), true))).collect();
    // Most of them held by the server is enough (one of its own sockets may close meanwhile).
    eventually("the late slow clients are connected", Duration::from_secs(10), || async { (open_fds(pid) >= before + 40).then_some(()) }).await;
    let t = Instant::now();
    assert!(s.sigterm(), "SIGTERM with slow clients connected exits 0");
    assert!(t.elapsed() < Duration::from_secs(15), "shutdown took {:?}", t.elapsed());
    for l in late {
        assert!(l.await.unwrap().is_some());
    }
}

/// With `max_connections = 4`: a fifth client waits while four connections are serving
/// (stalled uploads), and is served at once while four are only waiting for a request (the
/// one that waited longest is closed to make room; the others stay).
#[tokio::test]
async fn connections_are_capped_and_waiting_ones_make_room() {
    let m = mock(MockArgs::default()).await;
    let s = spawn_app(&config(&m.base_url(), "", "[server]\nheader_read_timeout_s = 20\nmax_connections = 4"));
    let addr = host(&s);
    let mut uploads = Vec::new();
    for _ in 0..4 {
        uploads.push(upload_being_served(&addr).await);
    }
    let http = reqwest::Client::new();
    let r = http.get(format!("{}/healthz", s.url)).timeout(Duration::from_millis(1500)).send().await;
    assert!(r.is_err(), "a fifth connection is not served while four are serving");
    drop(uploads);
    let r = http.get(format!("{}/healthz", s.url)).timeout(Duration::from_secs(10)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200, "served once the uploads went");

    // Four idle connections of different ages (what is under test: the oldest goes first).
    // The server accepts in order, so each is in the crowd before the request below.
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(TcpStream::connect(&addr).await.unwrap());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let t = Instant::now();
    let r = http.get(format!("{}/healthz", s.url)).timeout(Duration::from_secs(10)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(t.elapsed() < Duration::from_secs(1), "served after {:?} with four idle connections open", t.elapsed());
    let (first, rest) = idle.split_at_mut(1);
    assert_shed_oldest_first(&mut first[0], &mut rest[2]).await;
}

/// A stalled upload the server is serving: its head asks `Expect: 100-continue`, and the
/// server's `100 Continue` (sent once the handler reads the body) says it is served.
async fn upload_being_served(addr: &str) -> TcpStream {
    let mut c = TcpStream::connect(addr).await.unwrap();
    let head = multipart_head(addr, Some(10_000)).replacen("\r\n\r\n", "\r\nExpect: 100-continue\r\n\r\n", 1);
    c.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf)).await.expect("100 Continue within 10 s").unwrap();
        assert!(n > 0, "closed before 100 Continue: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 100 "), "{:?}", String::from_utf8_lossy(&got));
    c.write_all(format!("--{BOUNDARY}\r\n").as_bytes()).await.unwrap();
    c
}

/// The connection that waited longest was closed to make room; the youngest is still open.
async fn assert_shed_oldest_first(oldest: &mut TcpStream, youngest: &mut TcpStream) {
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(2), oldest.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "the connection that waited longest was closed: {closed:?}");
    let open = tokio::time::timeout(Duration::from_millis(300), youngest.read(&mut buf)).await;
    assert!(open.is_err(), "the youngest idle connection stays open: {open:?}");
}

/// A stalled upload, a download nobody reads, a kept-alive connection left idle and a JSON
/// body that never completes are all ended; nothing half-uploaded is stored.
#[tokio::test]
async fn stalled_and_idle_connections_are_closed() {
    let m = mock(MockArgs::default()).await;
    let s = spawn_app(&config(&m.base_url(), "", "[server]\nheader_read_timeout_s = 1\nidle_timeout_s = 2\nrequest_timeout_s = 1"));
    let api = s.api();
    let addr = host(&s);
    let big = vec![b'x'; 32 << 20];
    let (st, f) = api.upload_as(big.clone(), "user_data", "big.bin").await;
    assert_eq!(st, 200, "{f}");
    let fid = f["id"].as_str().unwrap().to_string();

    // A download nobody reads is cut once nothing moves for the idle timeout (the server
    // says so in its log); only then does the client read.
    let mut c = TcpStream::connect(&addr).await.unwrap();
    c.write_all(format!("GET /v1/files/{fid}/content HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes()).await.unwrap();
    let cut = "closing a connection on which nothing moved for the idle timeout";
    eventually("the stalled download is cut", Duration::from_secs(10), || async { s.log().contains(cut).then_some(()) }).await;
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "the stalled download was not closed");
    assert!(got.len() < big.len(), "the server kept sending to a client that did not read ({} bytes)", got.len());

    // An upload that stops mid-body is closed after the idle timeout.
    let mut c = TcpStream::connect(&addr).await.unwrap();
    let part = format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"s.jsonl\"\r\n\r\n{{}}\n");
    c.write_all(multipart_head(&addr, Some(10_000)).as_bytes()).await.unwrap();
    c.write_all(part.as_bytes()).await.unwrap();
    let t = Instant::now();
    let mut sink = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut sink)).await;
    assert!(r.is_ok(), "the stalled upload was not closed");
    assert!(t.elapsed() >= Duration::from_millis(1500), "closed after {:?}, before the idle timeout", t.elapsed());

    // A JSON body that never completes: 408 in the envelope once the request timeout passes.
    let mut c = TcpStream::connect(&addr).await.unwrap();
    c.write_all(request_head("POST", "/v1/batches", &addr, "application/json", Some(100)).as_bytes()).await.unwrap();
    c.write_all(b"{\"input_file_id\":").await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut answer)).await;
    let raw = Raw::parse(&answer).expect("an answer");
    assert_eq!(raw.status, 408);
    assert_eq!(raw.json()["error"]["code"], "request_timeout");
    assert!(raw.header("x-request-id").is_some());

    // A kept-alive connection left idle after a request is closed.
    let mut c = TcpStream::connect(&addr).await.unwrap();
    c.write_all(format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = c.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let t = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "the idle connection stayed open");
    assert!(t.elapsed() < Duration::from_secs(4), "closed after {:?}", t.elapsed());

    let (_, list) = api.get("/files").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1, "nothing half-uploaded is stored: {list}");
}

/// Every answer carries `x-request-id` (echoed when the client sent a usable one, else
/// `req_…`), and the server's log lines of that request carry it too.
#[tokio::test]
async fn every_answer_has_a_request_id_that_is_logged() {
    let m = mock(MockArgs::default()).await;
    let s = spawn_app(&config(&m.base_url(), "", ""));
    let api = s.api();
    let http = &api.http;
    let mut seen = std::collections::HashSet::new();
    for path in ["/v1/files", "/v1/nope", "/healthz", "/v1/batches/batch_x", "/metrics"] {
        let r = http.get(format!("{}{path}", s.url)).send().await.unwrap();
        let id = r.headers().get("x-request-id").unwrap_or_else(|| panic!("{path} has no x-request-id")).to_str().unwrap().to_string();
        assert!(id.starts_with("req_") && id.len() > 10, "{id}");
        assert!(seen.insert(id), "ids are unique");
    }
    let r = http.get(format!("{}/v1/files/file-missing", s.url)).header("x-request-id", "client-chosen-42").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 404);
    assert_eq!(r.headers()["x-request-id"], "client-chosen-42");
    let r = http.get(format!("{}/v1/files", s.url)).header("x-request-id", "x".repeat(300)).send().await.unwrap();
    assert!(r.headers()["x-request-id"].to_str().unwrap().starts_with("req_"), "an unusable id is replaced");
    eventually("the request id in the log", Duration::from_secs(5), || async {
        let log = s.log();
        log.lines().any(|l| l.contains("request_id=client-chosen-42") && l.contains("status=404")).then_some(())
    })
    .await;
}

/// A reused Idempotency-Key with another body is a 409 `idempotency_key_reused` that says
/// not to retry; with the same body (any key order) it returns the first batch; a body with
/// a repeated key is a 400. Only one batch exists afterwards.
#[tokio::test]
async fn idempotency_and_duplicate_keys() {
    let m = mock(MockArgs::default()).await;
    let s = spawn_app(&config(&m.base_url(), "", ""));
    let api = s.api();
    let f = api.upload(&chat_lines(2, "m")).await;
    let send = |body: String| {
        let api = api.clone();
        async move {
            let r = api
                .http
                .post(format!("{}/batches", api.base))
                .header("content-type", "application/json")
                .header("idempotency-key", "key-1")
                .body(body)
                .send()
                .await
                .unwrap();
            let retry = r.headers().get("x-should-retry").map(|v| v.to_str().unwrap().to_string());
            (r.status().as_u16(), retry, r.json::<Value>().await.unwrap())
        }
    };
    let (st, _, first) =
        send(format!(r#"{{"input_file_id":"{f}","endpoint":"/v1/chat/completions","completion_window":"24h","metadata":{{"a":"1","b":"2"}}}}"#)).await;
    assert_eq!(st, 200, "{first}");
    let (st, _, again) =
        send(format!(r#"{{ "metadata": {{"b":"2","a":"1"}}, "completion_window":"24h", "endpoint":"/v1/chat/completions", "input_file_id":"{f}" }}"#)).await;
    assert_eq!((st, &again["id"]), (200, &first["id"]), "the same request in another key order is the same request");
    let (st, retry, e) = send(format!(r#"{{"input_file_id":"{f}","endpoint":"/v1/embeddings","completion_window":"24h"}}"#)).await;
    assert_eq!(st, 409, "{e}");
    assert_envelope(&e);
    assert_eq!(e["error"]["code"], "idempotency_key_reused");
    assert_eq!(retry.as_deref(), Some("false"));
    let r = api
        .http
        .post(format!("{}/batches", api.base))
        .header("content-type", "application/json")
        .body(format!(r#"{{"input_file_id":"{f}","endpoint":"/v1/chat/completions","endpoint":"/v1/embeddings","completion_window":"24h"}}"#))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let e: Value = r.json().await.unwrap();
    assert!(e["error"]["message"].as_str().unwrap().contains("\"endpoint\" appears twice"), "{e}");
    let (_, list) = api.get("/batches").await;
    let ids: Vec<&Value> = list["data"].as_array().unwrap().iter().map(|b| &b["id"]).collect();
    assert_eq!(ids, vec![&first["id"]], "exactly one batch was created");
    let done = api.wait_for(first["id"].as_str().unwrap(), &["completed"], Duration::from_secs(20)).await;
    assert_eq!(done["endpoint"], "/v1/chat/completions");
}

/// Range: one satisfiable range is a 206; a malformed, multi-range or non-bytes header is
/// ignored (200, the whole content); a well-formed range past the end is a 416 envelope.
/// Content-Disposition carries a non-ASCII name as RFC 5987 `filename*` beside a fallback.
#[tokio::test]
async fn ranges_and_content_disposition() {
    let m = mock(MockArgs::default()).await;
    let s = spawn_app(&config(&m.base_url(), "", ""));
    let api = s.api();
    let data = b"0123456789".to_vec();
    let name = "données ✓.txt";
    let body = format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nuser_data\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n\r\n0123456789\r\n--{BOUNDARY}--\r\n");
    let r = api
        .http
        .post(format!("{}/files", api.base))
        .header("content-type", format!("multipart/form-data; boundary={BOUNDARY}"))
        .body(body)
        .send()
        .await
        .unwrap();
    let f: Value = r.json().await.unwrap();
    assert_eq!(f["filename"], name, "{f}");
    let id = f["id"].as_str().unwrap();
    let get = |range: Option<&'static str>| {
        let api = api.clone();
        let id = id.to_string();
        async move {
            let mut req = api.http.get(format!("{}/files/{id}/content", api.base));
            if let Some(r) = range {
                req = req.header("range", r);
            }
            let r = req.send().await.unwrap();
            let h = r.headers().clone();
            (r.status().as_u16(), h, r.bytes().await.unwrap().to_vec())
        }
    };
    let (st, h, b) = get(Some("bytes=2-4")).await;
    assert_eq!((st, b.as_slice(), h["content-range"].to_str().unwrap()), (206, &data[2..5], "bytes 2-4/10"));
    for ignored in ["bytes=abc", "bytes=0-1,4-5", "items=0-3", "bytes=5-2", "bytes"] {
        let (st, _, b) = get(Some(ignored)).await;
        assert_eq!((st, b.as_slice()), (200, data.as_slice()), "{ignored}");
    }
    let (st, h, b) = get(Some("bytes=50-60")).await;
    assert_eq!(st, 416);
    assert_eq!(h["content-range"], "bytes */10");
    assert_envelope(&serde_json::from_slice(&b).unwrap());
    let (_, h, _) = get(None).await;
    let cd = h["content-disposition"].to_str().unwrap();
    assert_eq!(cd, "attachment; filename=\"donn_es _.txt\"; filename*=UTF-8''donn%C3%A9es%20%E2%9C%93.txt");
}

/// Batch files expire after 30 days unless `expires_after` says otherwise; other purposes do
/// not; the image and video endpoints are accepted at create.
#[tokio::test]
async fn default_expiry_and_new_endpoints() {
    let m = mock(MockArgs::default()).await;
    let s = spawn_app(&config(&m.base_url(), "", ""));
    let api = s.api();
    let (_, f) = api.upload_as(jsonl(&chat_lines(1, "m")).into_bytes(), "batch", "a.jsonl").await;
    assert_eq!(f["expires_at"].as_i64().unwrap() - f["created_at"].as_i64().unwrap(), 30 * 86_400, "{f}");
    let (_, u) = api.upload_as(b"x".to_vec(), "user_data", "u.bin").await;
    assert!(u["expires_at"].is_null(), "{u}");
    let form = reqwest::multipart::Form::new()
        .text("purpose", "batch")
        .text("expires_after[anchor]", "created_at")
        .text("expires_after[seconds]", "7200")
        .part("file", reqwest::multipart::Part::bytes(b"{}\n".to_vec()).file_name("b.jsonl"));
    let e: Value = api.http.post(format!("{}/files", api.base)).multipart(form).send().await.unwrap().json().await.unwrap();
    assert_eq!(e["expires_at"].as_i64().unwrap() - e["created_at"].as_i64().unwrap(), 7200, "{e}");
    for endpoint in ["/v1/images/generations", "/v1/images/edits", "/v1/videos"] {
        let line = json!({"custom_id": "a", "method": "POST", "url": endpoint, "body": {"model": "m", "prompt": "a cat"}}).to_string();
        let fid = api.upload(&[line]).await;
        let b = api.create_batch(&fid, json!({"endpoint": endpoint})).await;
        assert_eq!(b["endpoint"], endpoint);
        let b = api.wait_for(b["id"].as_str().unwrap(), &["completed", "failed"], Duration::from_secs(20)).await;
        assert_eq!(b["request_counts"]["total"], 1, "validated and run: {b}");
    }
}

/// `/v1/models` lists a catch-all upstream's own models, and an unreachable catch-all
/// upstream does not break the list (caching and refresh: the unit tests of `api::models`).
#[tokio::test]
async fn models_of_catch_all_upstreams_are_listed() {
    let m = mock(MockArgs::default()).await;
    let dead = dead_base_url();
    let extra = format!("[[upstreams]]\nname = \"gone\"\nbase_url = \"{dead}\"\nmodels = [\"*\"]\n\n[[upstreams]]\nname = \"fixed\"\nbase_url = \"{dead}\"\nmodels = [\"only-this\"]\n");
    let s = spawn_app(&config(&m.base_url(), "", &extra));
    let api = s.api();
    let (st, v) = api.get("/models").await;
    assert_eq!(st, 200, "{v}");
    let ids: Vec<&str> = v["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    for want in ["gpt-4o-mini", "text-embedding-3-small", "omni-moderation-latest", "only-this"] {
        assert!(ids.contains(&want), "{want} missing from {ids:?}");
    }
    assert!(!ids.contains(&"*"));
    let (st, again) = api.get("/models").await;
    assert_eq!((st, &again), (200, &v), "the same list again (cached)");
}

/// A file that starts with a UTF-8 BOM (as some editors write it) runs like any other.
#[tokio::test]
async fn a_file_with_a_bom_runs() {
    let m = mock(MockArgs::default()).await;
    let s = spawn_app(&config(&m.base_url(), "", ""));
    let api = s.api();
    let mut bytes = b"\xEF\xBB\xBF".to_vec();
    bytes.extend_from_slice(jsonl(&chat_lines(5, "m")).replace('\n', "\r\n").as_bytes());
    let (_, f) = api.upload_as(bytes, "batch", "bom.jsonl").await;
    let b = api.create_batch(f["id"].as_str().unwrap(), json!({})).await;
    let b = api.wait_for(b["id"].as_str().unwrap(), &["completed", "failed"], Duration::from_secs(20)).await;
    assert_eq!(b["status"], "completed", "{b}");
    let (out, _) = final_results(&api, &b, 5).await;
    assert!(out.iter().any(|l| l["custom_id"] == "req-0"), "the first line keeps its custom_id");
}

/// Tenant keys never appear in `--print-config` (readable TOML) nor in the log.
#[tokio::test]
async fn tenant_keys_never_print() {
    const KEY: &str = "sk-hardening-tenant-key-9f3";
    let m = mock(MockArgs::default()).await;
    let cfg = config(&m.base_url(), "", &format!("[[tenants]]\nname = \"team\"\napi_keys = [\"{KEY}\"]"));
    let s = spawn_app(&cfg);
    let api = s.api_with_key(KEY);
    api.submit(&chat_lines(1, "m")).await;
    let (st, _) = s.api_with_key("sk-wrong").get("/files").await;
    assert_eq!(st, 401);
    let mut c = std::process::Command::new(BIN);
    c.args(["serve", "--print-config", "--config"]).arg(s.dir.join("batchd.toml")).env_remove("BATCHD_LOG");
    let out = finish(c, Duration::from_secs(30));
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(!out.stdout.contains(KEY), "{}", out.stdout);
    let printed: toml::Value = toml::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout));
    assert_eq!(printed["tenants"][0]["api_keys"][0].as_str(), Some("<redacted>"));
    assert!(!s.log().contains(KEY), "a key reached the log");
}

// ---- issue #19: no tenant can take the server; every answer batchd writes is an envelope ----

/// Sends a raw request head on a new connection and reads the answer's head and whatever of
/// its body arrives with it; the socket stays open (kept by the caller). A connection closed
/// before it could send its request (shed to make room: on a loaded machine a client of a
/// crowd may be slow to write) is opened again, as any client would.
async fn raw_request(addr: &str, head: &str) -> (TcpStream, Raw) {
    for _ in 0..10 {
        if let Some(answered) = try_raw_request(addr, head).await {
            return answered;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no answer in ten connections to {addr}");
}

async fn try_raw_request(addr: &str, head: &str) -> Option<(TcpStream, Raw)> {
    let mut c = TcpStream::connect(addr).await.ok()?;
    c.write_all(head.as_bytes()).await.ok()?;
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(60), c.read(&mut buf)).await.expect("an answer within 60 s").ok()?;
        got.extend_from_slice(&buf[..n]);
        match Raw::parse(&got) {
            Some(r) if r.header("content-length").is_none_or(|l| r.body.len() >= l.parse::<usize>().unwrap()) => return Some((c, r)),
            _ if n == 0 => return None,
            _ => {}
        }
    }
}

fn two_tenants(base_url: &str) -> String {
    config(base_url, "", "[[tenants]]\nname = \"alice\"\napi_keys = [\"sk-alice\"]\n[[tenants]]\nname = \"bob\"\napi_keys = [\"sk-bob\"]")
}

/// One tenant opens 1,100 event streams: 32 are served (its cap), the other 1,068 get a 429
/// envelope with a request id; meanwhile `/healthz`, another tenant's upload, create and own
/// stream are all answered within a second each.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_with_a_thousand_streams_cannot_take_the_server() {
    let m = mock(MockArgs::default()).await;
    let s = Server::start(&two_tenants(&m.base_url()));
    let addr = host(&s);
    let head = format!("GET /v1/events HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer sk-alice\r\nAccept: text/event-stream\r\n\r\n");
    let t = Instant::now();
    let opened: Vec<(TcpStream, Raw)> = futures::future::join_all((0..1100).map(|_| {
        let (addr, head) = (addr.clone(), head.clone());
        tokio::spawn(async move { raw_request(&addr, &head).await })
    }))
    .await
    .into_iter()
    .map(Result::unwrap)
    .collect();
    let streams = opened.iter().filter(|(_, r)| r.status == 200).count();
    let refused: Vec<&Raw> = opened.iter().map(|(_, r)| r).filter(|r| r.status == 429).collect();
    eprintln!("1,100 stream requests answered in {:?}: {streams} streams, {} refused", t.elapsed(), refused.len());
    assert_eq!((streams, refused.len()), (32, 1068), "32 streams per tenant, every other request refused");
    for r in refused.iter().take(20) {
        assert_eq!(r.json()["error"]["code"], "too_many_streams");
        assert_envelope(&r.json());
        assert!(r.header("x-request-id").is_some() && r.header("retry-after").is_some(), "{}", r.head);
    }
    let http = reqwest::Client::new();
    let t = Instant::now();
    let r = http.get(format!("{}/healthz", s.url)).timeout(Duration::from_secs(30)).send().await.unwrap();
    let healthz = t.elapsed();
    assert_eq!(r.status().as_u16(), 200);
    let bob = s.api_with_key("sk-bob");
    let t = Instant::now();
    let file = bob.upload(&chat_lines(3, "m")).await;
    let upload = t.elapsed();
    let t = Instant::now();
    let b = bob.create_batch(&file, json!({})).await;
    let create = t.elapsed();
    let t = Instant::now();
    let (_stream, own) = raw_request(&addr, &head.replace("sk-alice", "sk-bob")).await;
    let bob_stream = t.elapsed();
    eprintln!("with alice's streams open: /healthz {healthz:?}, bob's upload {upload:?}, create {create:?}, stream {bob_stream:?}");
    assert_eq!(own.status, 200, "bob has streams of his own: {}", own.head);
    for (what, took) in [("/healthz", healthz), ("bob's upload", upload), ("bob's create", create), ("bob's stream", bob_stream)] {
        assert!(took < Duration::from_secs(1), "{what} took {took:?}");
    }
    bob.wait_for(b["id"].as_str().unwrap(), &["completed"], secs(30)).await;
    drop(opened);
}

/// 1,100 sockets that connect and send nothing take every connection slot; a real request
/// is still answered within a second: the sockets that waited longest are closed for it,
/// the youngest stay (the header-read timeout, 30 s, is not what frees the room).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_crowd_makes_room_for_a_real_request_at_once() {
    let m = mock(MockArgs::default()).await;
    let s = Server::start(&config(&m.base_url(), "", ""));
    let addr = host(&s);
    let pid = s.pid().unwrap();
    let mut crowd = Vec::new();
    for _ in 0..1100 {
        crowd.push(TcpStream::connect(&addr).await.unwrap());
    }
    // The whole crowd accepted (none left in the listener's queue), every connection slot
    // (1,024 by default) taken.
    eventually("the crowd takes every slot", Duration::from_secs(20), || async { (accept_queue(&addr) == Some(0) && open_fds(pid) >= 1024).then_some(()) })
        .await;
    let http = reqwest::Client::new();
    for round in 0..3 {
        let t = Instant::now();
        let r = http.get(format!("{}/healthz", s.url)).timeout(Duration::from_secs(30)).send().await.unwrap();
        let took = t.elapsed();
        eprintln!("round {round}: /healthz answered in {took:?} with 1,100 idle sockets connected");
        assert_eq!(r.status().as_u16(), 200);
        assert!(took < Duration::from_secs(1), "round {round}: {took:?}");
    }
    let (first, rest) = crowd.split_at_mut(1);
    assert_shed_oldest_first(&mut first[0], rest.last_mut().unwrap()).await;
}

/// Requests hyper's parser refuses — two different Content-Lengths, a header block over its
/// size, too many headers, a malformed request line — get batchd's envelope and an
/// `x-request-id` (hyper alone answers an empty body), and the server goes on serving.
#[tokio::test]
async fn requests_the_parser_refuses_get_the_envelope_and_a_request_id() {
    let m = mock(MockArgs::default()).await;
    let s = spawn_app(&config(&m.base_url(), "", ""));
    let addr = host(&s);
    let many: String = (0..150).map(|i| format!("X-H{i}: v\r\n")).collect();
    let cases = [
        (format!("POST /v1/batches HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello"), 400, "malformed_request"),
        (format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nX-Big: {}\r\n\r\n", "a".repeat(2_000_000)), 431, "request_header_fields_too_large"),
        (format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n{many}\r\n"), 431, "request_header_fields_too_large"),
        ("GARBAGE\r\n\r\n".to_string(), 400, "malformed_request"),
    ];
    for (head, status, code) in cases {
        let (_c, r) = raw_request(&addr, &head).await;
        assert_eq!(r.status, status, "{}", r.head);
        let v = r.json();
        assert_envelope(&v);
        assert_eq!(v["error"]["code"], code, "{v}");
        assert!(r.header("x-request-id").is_some_and(|id| id.starts_with("req_")), "{}", r.head);
        assert_eq!(r.header("content-type").as_deref(), Some("application/json"));
    }
    let (_, ok) = raw_request(&addr, &format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n")).await;
    assert_eq!(ok.status, 200, "the server goes on serving");
}

/// A create with a parameter the API does not know (a misspelt `metdata`) is the hosted
/// API's 400, and creates nothing; batchd's own `priority` is still accepted.
#[tokio::test]
async fn unknown_create_parameters_are_refused_and_extensions_accepted() {
    let m = mock(MockArgs::default()).await;
    let s = spawn_app(&config(&m.base_url(), "", ""));
    let api = s.api();
    let file = api.upload(&chat_lines(2, "m")).await;
    let body = |extra: Value| {
        let mut b = json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "24h"});
        b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        b
    };
    let (st, v) = api.post("/batches", &body(json!({"metdata": {"run": "1"}}))).await;
    assert_eq!(st, 400, "{v}");
    assert_envelope(&v);
    assert_eq!(v["error"]["message"], "Unrecognized request argument supplied: metdata");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    let (st, v) = api.post("/batches", &body(json!({"metdata": {}, "windw": "1h"}))).await;
    assert_eq!((st, v["error"]["message"].as_str()), (400, Some("Unrecognized request arguments supplied: metdata, windw")));
    let (_, list) = api.get("/batches").await;
    assert!(list["data"].as_array().unwrap().is_empty(), "nothing was created: {list}");
    let b = api.create_batch(&file, json!({"priority": 3, "metadata": {"run": "1"}, "output_expires_after": {"anchor": "created_at", "seconds": 3600}})).await;
    assert_eq!(b["metadata"]["run"], "1", "{b}");
}

/// `GET /v1/models/{id}` answers each model of the list (an id with a slash too) and a 404
/// `model_not_found` for others; `created` is the same on every call.
#[tokio::test]
async fn models_are_retrieved_one_by_one_with_a_stable_created() {
    let m = mock(MockArgs::default()).await;
    let s = spawn_app(&config(&m.base_url(), "aliases = { \"org/fast-model\" = \"gpt-4o-mini\" }", ""));
    let api = s.api();
    let (_, first) = api.get("/models").await;
    // Under test: `created` does not move when the clock passes a second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (_, second) = api.get("/models").await;
    assert_eq!(first, second, "the list, created included, is the same a second later");
    let data = first["data"].as_array().unwrap();
    assert!(data.iter().any(|m| m["id"] == "org/fast-model"), "{first}");
    for model in data {
        let id = model["id"].as_str().unwrap();
        let (st, one) = api.get(&format!("/models/{id}")).await;
        assert_eq!((st, &one), (200, model), "{id}");
    }
    let (st, v) = api.get("/models/no-such-model").await;
    assert_eq!(st, 404, "{v}");
    assert_envelope(&v);
    assert_eq!((v["error"]["code"].as_str(), v["error"]["param"].as_str()), (Some("model_not_found"), Some("model")));
}

/// `/v1/usage` with a start time at the ends of i64 is a 400 envelope naming the parameter,
/// not empty totals (or an overflow).
#[tokio::test]
async fn usage_times_out_of_range_are_refused() {
    let m = mock(MockArgs::default()).await;
    let s = spawn_app(&config(&m.base_url(), "", ""));
    let api = s.api();
    api.wait_for(&api.submit(&chat_lines(2, "m")).await, &["completed"], secs(20)).await;
    for q in ["start_time=-9223372036854775808", "start_time=-1", "start_time=0&end_time=9223372036854775807"] {
        let (st, v) = api.get(&format!("/usage?{q}")).await;
        assert_eq!(st, 400, "{q}: {v}");
        assert_envelope(&v);
    }
    let (st, v) = api.get("/usage?start_time=0").await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["total"]["num_model_requests"], 2, "the earliest start counts everything: {v}");
}
