//! Fault injection: what a hostile or broken upstream sends, what a corrupted store row
//! holds, a disk that fills up mid-batch, and crashes that leave debris. The real `batchd
//! serve` binary must go on serving every other batch and tenant, lose nothing, and leave
//! nothing behind.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the hostile upstream answers to a request whose body says `"hostile": KIND`.
fn hostile_answer(kind: &str) -> Option<(u16, Vec<u8>)> {
    let chat = |usage: &str| {
        format!(
            r#"{{"id":"chatcmpl-h","object":"chat.completion","model":"h","choices":[{{"index":0,"message":{{"role":"assistant","content":"hi"}},"finish_reason":"stop"}}],"usage":{usage}}}"#
        )
    };
    let body = match kind {
        "huge_usage" => chat(r#"{"prompt_tokens":9223372036854775807,"completion_tokens":9223372036854775807,"total_tokens":9223372036854775807}"#),
        "negative_usage" => chat(r#"{"prompt_tokens":-7,"completion_tokens":-1,"total_tokens":-8}"#),
        "null_usage" => chat(r#"{"prompt_tokens":3,"completion_tokens":null,"total_tokens":null,"completion_tokens_details":{"reasoning_tokens":null}}"#),
        "float_usage" => chat(r#"{"prompt_tokens":3.0,"completion_tokens":2.5,"total_tokens":5.5}"#),
        "string_usage" => chat(r#"{"prompt_tokens":"3","completion_tokens":"two","total_tokens":"5"}"#),
        "pretty" => "{\n  \"id\": \"x\",\n  \"n\": 1.50,\n  \"usage\": {\"prompt_tokens\": 1}\n}\n".to_string(),
        "non_json_200" => "<html><body>upstream proxy says hi</body></html>".to_string(),
        "beyond_f64_usage" => chat(r#"{"prompt_tokens":3,"completion_tokens":1e999,"total_tokens":1e999}"#),
        _ => return None,
    };
    Some((200, body.into_bytes()))
}

/// A raw TCP upstream that misbehaves on purpose: it answers each request according to the
/// `"hostile"` field of its JSON body, and counts attempts per `x-request-id`.
struct Hostile {
    url: String,
    attempts: Arc<Mutex<HashMap<String, u32>>>,
}

impl Hostile {
    async fn start() -> Hostile {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let attempts: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
        let counts = attempts.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                tokio::spawn(serve_hostile(sock, counts.clone()));
            }
        });
        Hostile { url, attempts }
    }

    fn attempts_of(&self, kind: &str) -> Vec<u32> {
        let all = self.attempts.lock().unwrap();
        all.iter().filter(|(k, _)| k.starts_with(&format!("{kind}#"))).map(|(_, n)| *n).collect()
    }
}

async fn read_request(sock: &mut TcpStream) -> Option<(HashMap<String, String>, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let headers: HashMap<String, String> =
        head.lines().skip(1).filter_map(|l| l.split_once(':').map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))).collect();
    let len: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some((headers, body))
}

async fn serve_hostile(mut sock: TcpStream, attempts: Arc<Mutex<HashMap<String, u32>>>) {
    while let Some((headers, body)) = read_request(&mut sock).await {
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let kind = v["hostile"].as_str().unwrap_or("huge_usage").to_string();
        let rid = headers.get("x-request-id").cloned().unwrap_or_default();
        *attempts.lock().unwrap().entry(format!("{kind}#{rid}")).or_default() += 1;
        let head = |status: u16, extra: &str| format!("HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n{extra}\r\n");
        match kind.as_str() {
            "closed" => return,
            "truncated" => {
                let _ = sock.write_all(format!("{}{{\"id\":\"trunc", head(200, "content-length: 500\r\n")).as_bytes()).await;
                return;
            }
            "stalled" => {
                let _ = sock.write_all(format!("{}{{\"id\":\"stall", head(200, "content-length: 500\r\n")).as_bytes()).await;
                tokio::time::sleep(secs(60)).await;
                return;
            }
            "huge_declared" => {
                let _ = sock.write_all(head(200, "content-length: 3000000\r\n").as_bytes()).await;
                let _ = sock.write_all(&vec![b' '; 3_000_000]).await;
            }
            "huge_chunked" => {
                let _ = sock.write_all(head(200, "transfer-encoding: chunked\r\n").as_bytes()).await;
                let piece = format!("{:x}\r\n{}\r\n", 100_000, " ".repeat(100_000));
                for _ in 0..30 {
                    if sock.write_all(piece.as_bytes()).await.is_err() {
                        return;
                    }
                }
                let _ = sock.write_all(b"0\r\n\r\n").await;
            }
            "gzip_bomb" | "zstd_bomb" => {
                let (encoding, body) = if kind == "gzip_bomb" { ("gzip", gzip_bomb()) } else { ("zstd", zstd_bomb()) };
                let extra = format!("content-encoding: {encoding}\r\ncontent-length: {}\r\n", body.len());
                let _ = sock.write_all(head(200, &extra).as_bytes()).await;
                let _ = sock.write_all(body).await;
            }
            other => {
                let (status, bytes) = hostile_answer(other).expect("a known kind");
                let _ = sock.write_all(head(status, &format!("content-length: {}\r\n", bytes.len())).as_bytes()).await;
                let _ = sock.write_all(&bytes).await;
            }
        }
    }
}

/// A JSON answer of `mb` MiB once decoded, as concatenated compressed pieces (gzip members,
/// zstd frames): `{"pad":"aaa…a"}`, each MiB of `a`s compressed once and repeated.
fn bomb(mb: usize, compress: impl Fn(&[u8]) -> Vec<u8>) -> Vec<u8> {
    let chunk = compress(&vec![b'a'; 1 << 20]);
    let mut out = compress(b"{\"pad\":\"");
    for _ in 0..mb {
        out.extend_from_slice(&chunk);
    }
    out.extend_from_slice(&compress(b"\"}"));
    out
}

/// 200 MB of JSON in about 200 KB of gzip (the size of the issue's bomb).
fn gzip_bomb() -> &'static [u8] {
    static BOMB: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BOMB.get_or_init(|| {
        bomb(200, |data| {
            use std::io::Write;
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
            gz.write_all(data).unwrap();
            gz.finish().unwrap()
        })
    })
}

/// 1 GB of JSON in a few dozen KB of zstd.
fn zstd_bomb() -> &'static [u8] {
    static BOMB: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BOMB.get_or_init(|| bomb(1024, |data| zstd::stream::encode_all(data, 19).unwrap()))
}

fn hostile_line(kind: &str, i: usize) -> String {
    let body = json!({"model": "h", "messages": [{"role": "user", "content": "x"}], "hostile": kind});
    json!({"custom_id": format!("{kind}-{i}"), "method": "POST", "url": "/v1/chat/completions", "body": body}).to_string()
}

const KINDS: [&str; 13] = [
    "huge_usage",
    "negative_usage",
    "null_usage",
    "float_usage",
    "string_usage",
    "pretty",
    "non_json_200",
    "huge_declared",
    "huge_chunked",
    "truncated",
    "stalled",
    "closed",
    "huge_usage",
];

/// One batch full of hostile answers ends with each line filed where it belongs, usage
/// saturated but readable; the server then runs another batch and survives a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_answers_never_stop_the_engine() {
    let hostile = Hostile::start().await;
    let good = mock(MockArgs::default()).await;
    let cfg = format!(
        "[[upstreams]]\nname = \"hostile\"\nbase_url = \"{}\"\nmodels = [\"h\"]\nmax_attempts = 2\ntimeout_s = 1\nmax_response_bytes = 1000000\n\n\
         [[upstreams]]\nname = \"good\"\nbase_url = \"{}\"\nmodels = [\"m\"]\n",
        hostile.url,
        good.base_url()
    );
    let mut s = Server::start(&cfg);
    let api = s.api();
    let lines: Vec<String> = KINDS.iter().enumerate().flat_map(|(i, k)| (0..3).map(move |j| hostile_line(k, i * 10 + j))).collect();
    let id = api.submit(&lines).await;
    let b = api.wait_for(&id, &["completed"], secs(40)).await;
    let (out, err) = final_results(&api, &b, lines.len()).await;
    let by_id: HashMap<&str, &Value> = out.iter().chain(&err).map(|l| (l["custom_id"].as_str().unwrap(), l)).collect();
    let kind_of = |l: &Value| l["custom_id"].as_str().unwrap().rsplit_once('-').unwrap().0.to_string();
    for l in &out {
        let k = kind_of(l);
        assert!(
            ["huge_usage", "negative_usage", "null_usage", "float_usage", "string_usage", "pretty"].contains(&k.as_str()),
            "{k} must not be in the output: {l}"
        );
    }
    assert_eq!(out.len(), 7 * 3, "every valid 2xx answer lands in the output file");
    // The upstream's bytes, unchanged (the pretty one only loses its raw newlines).
    let output_text = api.content(b["output_file_id"].as_str().unwrap()).await;
    for kind in ["huge_usage", "null_usage", "float_usage", "string_usage", "negative_usage"] {
        let sent = String::from_utf8(hostile_answer(kind).unwrap().1).unwrap();
        assert!(output_text.contains(&format!("\"body\":{sent}}}")), "{kind}: body must pass through byte for byte");
    }
    assert!(output_text.contains(r#""body":{   "id": "x",   "n": 1.50,   "usage": {"prompt_tokens": 1} }"#), "pretty JSON keeps its bytes");
    let error_of = |k: &str| err.iter().filter(|l| kind_of(l) == k).cloned().collect::<Vec<_>>();
    for l in error_of("non_json_200") {
        assert_eq!(l["response"]["status_code"], 200, "{l}");
        assert!(l["response"]["body"]["error"]["message"].as_str().unwrap().contains("upstream proxy says hi"), "{l}");
    }
    for k in ["huge_declared", "huge_chunked"] {
        for l in error_of(k) {
            assert_eq!(l["error"]["code"], "response_too_large", "{l}");
        }
        assert!(hostile.attempts_of(k).iter().all(|n| *n == 1), "{k}: an oversize answer is not asked for again");
    }
    for (k, code) in [("truncated", "upstream_unavailable"), ("closed", "upstream_unavailable"), ("stalled", "request_timeout")] {
        for l in error_of(k) {
            assert_eq!(l["error"]["code"], code, "{l}");
        }
        assert_eq!(hostile.attempts_of(k), [2, 2, 2], "{k}: retried up to max_attempts");
    }
    assert_eq!(by_id.len(), lines.len());
    let usage = &b["usage"];
    assert_eq!(usage["input_tokens"].as_i64(), Some(i64::MAX), "usage saturates: {usage}");
    assert_eq!(usage["total_tokens"].as_i64(), Some(i64::MAX));
    let (st, list) = api.get("/batches").await;
    assert_eq!(st, 200, "the list still answers: {list}");
    // The engine goes on with other batches, and the batch stays readable after a restart.
    let next = api.submit(&chat_lines(20, "m")).await;
    let nb = api.wait_for(&next, &["completed"], secs(20)).await;
    final_results(&api, &nb, 20).await;
    s.restart();
    let api = s.api();
    assert_eq!(api.batch(&id).await["usage"]["input_tokens"].as_i64(), Some(i64::MAX));
    let again = api.submit(&chat_lines(5, "m")).await;
    api.wait_for(&again, &["completed"], secs(20)).await;
}

/// A row an older build wrote with a REAL in an integer column, and a batch whose input
/// bytes vanished: the first reads (clamped), the second fails alone with a clear reason,
/// and new batches of every tenant still run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_batch_fails_alone_and_the_engine_goes_on() {
    let m = mock(MockArgs { latency_ms: 50, ..MockArgs::default() }).await;
    let mut s = Server::start(&config(&m.base_url(), "max_concurrency = 2", ""));
    let api = s.api();
    let done = api.submit(&chat_lines(5, "m")).await;
    api.wait_for(&done, &["completed"], secs(20)).await;
    let running = api.submit(&chat_lines(400, "m")).await;
    api.wait_for(&running, &["in_progress"], secs(20)).await;
    s.kill9();
    let db = s.data.join("batchd.db");
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display())).await.unwrap();
    sqlx::query("UPDATE batches SET input_tokens = 1e300, total_tokens = 9.5e18, output_tokens = -1.5 WHERE id = ?").bind(&done).execute(&pool).await.unwrap();
    let input: String = sqlx::query_scalar("SELECT input_file_id FROM batches WHERE id = ?").bind(&running).fetch_one(&pool).await.unwrap();
    pool.close().await;
    std::fs::remove_file(s.data.join("blobs/files").join(&input)).unwrap();
    s.spawn();
    let api = s.api();
    let b = api.batch(&done).await;
    assert_eq!(b["status"], "completed");
    assert_eq!(b["usage"]["input_tokens"].as_i64(), Some(i64::MAX), "a REAL is clamped on read: {b}");
    assert_eq!(b["usage"]["output_tokens"].as_i64(), Some(0));
    let failed = api.wait_for(&running, &["failed"], secs(20)).await;
    let e = &failed["errors"]["data"][0];
    assert_eq!(e["code"], "input_unavailable", "{failed}");
    assert!(e["message"].as_str().unwrap().contains("missing"), "{e}");
    assert!(failed["failed_at"].is_i64());
    let (st, _) = api.get("/batches").await;
    assert_eq!(st, 200);
    let fresh = api.submit(&chat_lines(10, "m")).await;
    let fb = api.wait_for(&fresh, &["completed"], secs(20)).await;
    final_results(&api, &fb, 10).await;
}

/// A small tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

impl Tmpfs {
    /// `None` (with the reason printed) where mounting is not allowed.
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mnt");
        std::fs::create_dir(&path).unwrap();
        let out = std::process::Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(&path).output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs { _dir: dir, path }),
            Ok(o) => {
                eprintln!("SKIPPED: cannot mount a tmpfs here ({}); the full-disk test needs root", String::from_utf8_lossy(&o.stderr).trim());
                None
            }
            Err(e) => {
                eprintln!("SKIPPED: cannot run mount ({e}); the full-disk test needs root");
                None
            }
        }
    }

    fn free(&self) -> u64 {
        let c = std::ffi::CString::new(self.path.to_str().unwrap()).unwrap();
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
        st.f_bavail as u64 * st.f_frsize as u64
    }

    /// Fills the filesystem until `leave` bytes are free; returns the filler's path.
    fn fill(&self, leave: u64) -> std::path::PathBuf {
        let filler = self.path.join("filler");
        let n = self.free().saturating_sub(leave);
        let f = std::fs::File::create(&filler).unwrap();
        use std::io::Write;
        let mut w = std::io::BufWriter::new(f);
        let block = vec![0u8; 64 * 1024];
        let mut written = 0;
        while written < n {
            let k = block.len().min((n - written) as usize);
            if w.write_all(&block[..k]).is_err() {
                break;
            }
            written += k as u64;
        }
        let _ = w.flush();
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

async fn metric(url: &str, name: &str) -> Option<f64> {
    let text = reqwest::get(format!("{url}/metrics")).await.ok()?.text().await.ok()?;
    text.lines().find_map(|l| l.strip_prefix(name).and_then(|rest| rest.trim().parse().ok()))
}

const FULL_LINES: usize = 6000;
const FULL_CONCURRENCY: u64 = 16;
const FULL_GROUP: u64 = 64;

/// Starts a batch on a data dir that fills up mid-batch; returns once the store reports that
/// it cannot write.
async fn fill_mid_batch(fs: &Tmpfs, m: &MockServer) -> (Server, String, std::path::PathBuf) {
    let cfg = config(
        &m.base_url(),
        &format!("max_concurrency = {FULL_CONCURRENCY}"),
        &format!("[engine]\ncommit_interval_ms = 50\ncommit_min_results = {FULL_GROUP}\ncommit_max_results = {}\n", 2 * FULL_GROUP),
    );
    let s = Server::start_with_data(&cfg, Some(fs.path.join("data")));
    let api = s.api();
    let lines: Vec<String> = (0..FULL_LINES).map(|i| chat_line(&format!("req-{i}"), "m", Some(json!({"completion_tokens": 60})))).collect();
    let file = api.upload(&lines).await;
    let filler = fs.fill(1_500_000);
    let id = api.create_batch(&file, json!({})).await["id"].as_str().unwrap().to_string();
    let url = s.url.clone();
    eventually("the store reports that it cannot write", secs(60), || {
        let url = url.clone();
        async move { (metric(&url, "batchd_store_writable").await == Some(0.0)).then_some(()) }
    })
    .await;
    (s, id, filler)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_pauses_upstream_calls_and_everything_resumes_by_itself() {
    let Some(fs) = Tmpfs::mount("24m") else { return };
    let m = mock(MockArgs { latency_ms: 5, ..MockArgs::default() }).await;
    let (mut s, id, filler) = fill_mid_batch(&fs, &m).await;
    let api = s.api();
    // Writes are refused with the envelope; reads keep answering.
    let (st, v) = api.upload_as(b"{\"a\":1}\n".to_vec(), "batch", "x.jsonl").await;
    assert!(st == 507 || st == 503, "upload while full: {st} {v}");
    assert!(v["error"]["message"].is_string(), "{v}");
    let file_ok = api.get("/files").await;
    assert_eq!(file_ok.0, 200, "reads keep answering while full");
    let during = api.batch(&id).await;
    assert_eq!(during["status"], "in_progress", "{during}");
    let (st, v) =
        api.post("/batches", &json!({"input_file_id": during["input_file_id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"})).await;
    assert!(st == 507 || st == 503, "create while full: {st} {v}");
    assert!(v["error"]["message"].is_string(), "{v}");
    // No calls whose answers could not be stored: only those already in flight finish.
    let calls_at_full = m.stats().requests;
    tokio::time::sleep(secs(3)).await;
    let paused_calls = m.stats().requests - calls_at_full;
    assert!(paused_calls <= FULL_CONCURRENCY, "{paused_calls} calls were made while the disk was full");
    std::fs::remove_file(&filler).unwrap();
    let b = api.wait_for(&id, &["completed"], secs(60)).await;
    final_results(&api, &b, FULL_LINES).await;
    let st = m.stats();
    assert_eq!(st.duplicate_request_ids, 0, "no line was sent twice");
    assert_eq!(st.requests as usize, FULL_LINES);
    let (st, _) = api.upload_as(b"{\"a\":1}\n".to_vec(), "batch", "x.jsonl").await;
    assert_eq!(st, 200, "writes work again");
    assert!(s.sigterm(), "SIGTERM stops the server cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_works_while_the_disk_is_full_and_a_restart_finishes_the_batch() {
    let Some(fs) = Tmpfs::mount("24m") else { return };
    let m = mock(MockArgs { latency_ms: 5, ..MockArgs::default() }).await;
    let (mut s, id, filler) = fill_mid_batch(&fs, &m).await;
    let t = Instant::now();
    assert!(s.sigterm(), "SIGTERM exits 0 while the disk is full");
    assert!(t.elapsed() < secs(25), "and within the grace periods: {:?}", t.elapsed());
    let before = m.stats();
    std::fs::remove_file(&filler).unwrap();
    s.spawn();
    let api = s.api();
    let b = api.wait_for(&id, &["completed"], secs(90)).await;
    final_results(&api, &b, FULL_LINES).await;
    let resent = m.stats().requests - before.requests;
    let durable_before = FULL_LINES as u64 - resent;
    // In flight = on the wire (≤ the concurrency), or answered and not yet durable: at most one
    // group (≤ commit_max_results) plus the writer's queue (as long as a group).
    let bound = FULL_CONCURRENCY + 2 * (2 * FULL_GROUP);
    assert!(before.requests - durable_before <= bound, "only lines in flight at the stop run again: {} sent, {durable_before} durable", before.requests);
}

/// kill -9 in the middle of an upload leaves a staging file, and a crash between writing a
/// file's bytes and recording it leaves an object no row names: a restart removes both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_mid_upload_leaves_no_debris_after_restart() {
    let m = mock(MockArgs::default()).await;
    let mut s = Server::start(&config(&m.base_url(), "", ""));
    let kept = s.api().upload(&chat_lines(3, "m")).await;
    let url = format!("{}/v1/files", s.url);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(2);
    let upload = tokio::spawn(async move {
        let body = reqwest::Body::wrap_stream(tokio_stream_from(rx));
        let part = reqwest::multipart::Part::stream(body).file_name("big.jsonl");
        let form = reqwest::multipart::Form::new().text("purpose", "batch").part("file", part);
        let _ = reqwest::Client::new().post(url).multipart(form).send().await;
    });
    let line = format!("{}\n", chat_line("x", "m", None));
    let chunk: Vec<u8> = line.repeat((1 << 20) / line.len()).into_bytes();
    for _ in 0..12 {
        tx.send(Ok(chunk.clone())).await.unwrap();
    }
    let blobs = s.data.join("blobs");
    let staged = || {
        let found = blob_tree(&blobs).iter().any(|f| f.contains('#'));
        async move { found.then_some(()) }
    };
    eventually("a staging file appears", secs(20), staged).await;
    s.kill9();
    drop(tx);
    let _ = upload.await;
    std::fs::write(blobs.join("files/file-orphan-of-a-crash"), b"bytes no row names").unwrap();
    assert!(blob_tree(&blobs).iter().any(|f| f.contains('#')), "the crash left a staging file");
    s.spawn();
    let want = vec![format!("files/{kept}")];
    let clean = || {
        let left = blob_tree(&blobs);
        let done = left == want;
        async move { done.then_some(()) }
    };
    eventually("the debris is gone", secs(20), clean).await;
    assert_eq!(s.api().content(&kept).await.lines().count(), 3, "recorded files are kept");
}

fn tokio_stream_from(mut rx: tokio::sync::mpsc::Receiver<Result<Vec<u8>, std::io::Error>>) -> impl futures::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

// ---- issue #19: decoded size is what counts; a paid answer stays an answer ----

/// Compression bombs among ordinary answers — gzip decoding to 200 MB, zstd to 1 GB, at the
/// default `max_response_bytes` (32 MB) — fail at once as `response_too_large`, each asked
/// for once, in bounded memory (four in flight at most: 4 × 32 MB), and the batch finishes
/// promptly with every other line answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compression_bombs_fail_at_once_in_bounded_memory() {
    let (gzip, zstd) = (gzip_bomb().len(), zstd_bomb().len());
    let hostile = Hostile::start().await;
    let cfg = format!("[[upstreams]]\nname = \"hostile\"\nbase_url = \"{}\"\nmodels = [\"h\"]\nmax_concurrency = 4\n", hostile.url);
    let s = Server::start(&cfg);
    let api = s.api();
    let kinds = ["gzip_bomb", "zstd_bomb", "pretty", "null_usage", "pretty"];
    let lines: Vec<String> = (0..60).map(|i| hostile_line(kinds[i % kinds.len()], i)).collect();
    let t = Instant::now();
    let id = api.submit(&lines).await;
    let b = api.wait_for(&id, &["completed"], secs(90)).await;
    let took = t.elapsed();
    let peak = proc_mb(s.pid().unwrap(), "VmHWM:");
    eprintln!("24 bombs (gzip {gzip} B → 200 MiB, zstd {zstd} B → 1 GiB) among 60 lines, concurrency 4: done in {took:?}, server peak RSS {peak} MiB");
    let (out, err) = final_results(&api, &b, 60).await;
    assert_eq!((out.len(), err.len()), (36, 24), "{b}");
    for l in &err {
        assert_eq!(l["error"]["code"], "response_too_large", "{l}");
        assert!(l["error"]["message"].as_str().unwrap().contains("once decoded"), "{l}");
    }
    for k in ["gzip_bomb", "zstd_bomb"] {
        let attempts = hostile.attempts_of(k);
        assert!(attempts.len() == 12 && attempts.iter().all(|n| *n == 1), "{k}: asked for once each: {attempts:?}");
    }
    assert!(took < secs(30), "the batch took {took:?}");
    assert!(peak < 250, "peak RSS {peak} MiB with bombs in flight");
}

/// A paid 2xx answer whose `usage` holds a number beyond f64 (`1e999`) stays an output line,
/// byte for byte, its count saturated; and the output-token metric stops at its maximum
/// instead of wrapping when such counts add up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_beyond_f64_stays_an_answer_and_metrics_saturate() {
    let hostile = Hostile::start().await;
    let cfg = format!("[[upstreams]]\nname = \"hostile\"\nbase_url = \"{}\"\nmodels = [\"h\"]\n", hostile.url);
    let s = Server::start(&cfg);
    let api = s.api();
    let lines: Vec<String> = (0..2).map(|i| hostile_line("beyond_f64_usage", i)).chain((0..3).map(|i| hostile_line("huge_usage", 10 + i))).collect();
    let id = api.submit(&lines).await;
    let b = api.wait_for(&id, &["completed"], secs(30)).await;
    assert_eq!(b["request_counts"], json!({"total": 5, "completed": 5, "failed": 0}), "every paid answer is an output line: {b}");
    assert!(b["error_file_id"].is_null(), "{b}");
    // The output holds `1e999`, which serde_json will not read: its lines are checked as text.
    let text = api.content(b["output_file_id"].as_str().unwrap()).await;
    assert_eq!(text.lines().filter(|l| l.contains("\"status_code\":200")).count(), 5, "{text}");
    let sent = String::from_utf8(hostile_answer("beyond_f64_usage").unwrap().1).unwrap();
    assert!(text.contains(&format!("\"body\":{sent}}}")), "the answer is kept byte for byte");
    assert_eq!(b["usage"]["output_tokens"].as_i64(), Some(i64::MAX), "{b}");
    let metrics = s.metrics().await;
    let tokens = metrics.lines().find_map(|l| l.strip_prefix("batchd_output_tokens_total ")).unwrap_or_else(|| panic!("{metrics}"));
    assert_eq!(tokens, u64::MAX.to_string(), "the output-token counter saturates");
}
