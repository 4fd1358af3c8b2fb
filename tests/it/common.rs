//! Test helpers: start a batchd node on a random port with a temporary data dir — the real
//! `batchd` binary ([`Server::start`]) or the same app in this process ([`spawn_app`]) —,
//! talk to it with the HTTP shapes the openai SDK sends, and build input files.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub use batchd::mock::{MockArgs, MockServer};

use crate::app::InProcess;

pub const BIN: &str = env!("CARGO_BIN_EXE_batchd");

/// A running batchd node: a `batchd serve` child process, or the same app in this process.
pub struct Server {
    child: Option<Child>,
    /// The node when it runs in this process ([`spawn_app`]).
    app: Option<InProcess>,
    in_process: bool,
    pub url: String,
    pub dir: PathBuf,
    /// The data directory (`dir/data` unless started with [`Server::start_with_data`]).
    pub data: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    pub extra_args: Vec<String>,
    /// Extra environment of the child (e.g. the `AWS_*` keys of a shared bucket).
    pub env: Vec<(String, String)>,
    /// One HTTP client for every [`Api`] of this server (a client costs tens of milliseconds
    /// to make: its TLS roots).
    http: reqwest::Client,
}

impl Server {
    /// Starts a server with `config` (TOML) in a fresh temporary directory.
    pub fn start(config: &str) -> Server {
        Self::start_with_data(config, None)
    }

    /// Starts a server whose data directory is `data` (e.g. on a small filesystem).
    pub fn start_with_data(config: &str, data: Option<PathBuf>) -> Server {
        Self::launch(config, data, &[], &[], false)
    }

    /// Starts a server with `config`, extra flags (`--database`, `--blob`, …) and environment.
    pub fn start_with(config: &str, args: &[String], env: &[(String, String)]) -> Server {
        Self::launch(config, None, args, env, false)
    }

    fn launch(config: &str, data: Option<PathBuf>, args: &[String], env: &[(String, String)], in_process: bool) -> Server {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        std::fs::write(dir.join("batchd.toml"), config).unwrap();
        let data = data.unwrap_or_else(|| dir.join("data"));
        let (extra_args, env, http) = (args.to_vec(), env.to_vec(), reqwest::Client::new());
        let mut s = Server { child: None, app: None, in_process, url: String::new(), dir, data, _tmp: Some(tmp), extra_args, env, http };
        s.spawn();
        s
    }

    /// Starts the node again (after [`Server::sigterm`] or [`Server::kill9`]) on the same data.
    pub fn spawn(&mut self) {
        if self.in_process {
            let cfg = InProcess::config(&self.data, &self.dir.join("batchd.toml"), &self.extra_args, &self.env);
            let app = InProcess::start(cfg, &self.dir.join("batchd.log"));
            self.url = app.url.clone();
            self.app = Some(app);
            return;
        }
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(&self.data)
            .arg("--config")
            .arg(self.dir.join("batchd.toml"))
            .args(&self.extra_args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("BATCHD_LOG", "batchd=debug")
            .stdout(Stdio::piped())
            .stderr(log_file(&self.dir));
        let mut child = cmd.spawn().expect("spawn batchd");
        self.url = read_listen_line(&mut child, "batchd listening on ", &self.dir);
        self.child = Some(child);
    }

    pub fn api(&self) -> Api {
        Api::with_client(self.http(), &self.url, None)
    }

    pub fn api_with_key(&self, key: &str) -> Api {
        Api::with_client(self.http(), &self.url, Some(key))
    }

    /// The HTTP client this server's [`Api`]s share.
    pub fn http(&self) -> reqwest::Client {
        self.http.clone()
    }

    /// SIGKILL: no chance to flush or clean up (the binary only: a crash is a process's).
    pub fn kill9(&mut self) {
        assert!(!self.in_process, "kill -9 needs a process: start this test's server with Server::start");
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM and wait for a graceful exit; returns whether it exited 0.
    pub fn sigterm(&mut self) -> bool {
        if let Some(app) = self.app.take() {
            return app.stop();
        }
        let Some(mut c) = self.child.take() else { return false };
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st.success();
            }
            if Instant::now() > deadline {
                c.kill().unwrap();
                panic!("batchd did not stop within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGSTOP (`true`) or SIGCONT (`false`): the process freezes, or goes on, as a paused
    /// VM or a long GC pause would.
    pub fn freeze(&self, stop: bool) {
        let pid = self.pid().expect("a running child") as i32;
        unsafe { libc::kill(pid, if stop { libc::SIGSTOP } else { libc::SIGCONT }) };
    }

    /// The pid of the running child (`None` in process).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// `GET /metrics`, as text.
    pub async fn metrics(&self) -> String {
        self.http.get(format!("{}/metrics", self.url)).send().await.unwrap().text().await.unwrap()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("batchd.log")).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // An in-process node ends with its `InProcess`.
        if !self.in_process {
            self.kill9();
        }
    }
}

/// Starts the app `batchd serve` runs with `config` (TOML) in this process, in a fresh
/// temporary directory, on a runtime of its own (see [`crate::app`]): for tests where no
/// process boundary is under test. The handle reads as [`Server::start`]'s.
pub fn spawn_app(config: &str) -> Server {
    Server::launch(config, None, &[], &[], true)
}

/// [`spawn_app`] with extra `serve` flags and the upstreams' key variables.
pub fn spawn_app_with(config: &str, args: &[String], env: &[(String, String)]) -> Server {
    Server::launch(config, None, args, env, true)
}

fn log_file(dir: &Path) -> std::fs::File {
    std::fs::OpenOptions::new().create(true).append(true).open(dir.join("batchd.log")).unwrap()
}

/// Reads the child's stdout until its "listening on" line; keeps draining it afterwards.
pub fn read_listen_line(child: &mut Child, prefix: &str, dir: &Path) -> String {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let prefix = prefix.to_string();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if !sent {
                if let Some(u) = line.strip_prefix(&prefix) {
                    let _ = tx.send(u.trim().to_string());
                    sent = true;
                }
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(u) => u,
        Err(_) => {
            let log = std::fs::read_to_string(dir.join("batchd.log")).unwrap_or_default();
            panic!("batchd did not report its address; log:\n{log}");
        }
    }
}

/// A small OpenAI-shaped HTTP client.
#[derive(Clone)]
pub struct Api {
    pub http: reqwest::Client,
    pub base: String,
    key: Option<String>,
}

impl Api {
    pub fn new(url: &str, key: Option<&str>) -> Api {
        Self::with_client(reqwest::Client::new(), url, key)
    }

    pub fn with_client(http: reqwest::Client, url: &str, key: Option<&str>) -> Api {
        Api { http, base: format!("{url}/v1"), key: key.map(str::to_owned) }
    }

    fn auth(&self, r: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }

    /// A request to `path` (under `/v1`) with the key, to send as it is.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.auth(self.http.request(method, format!("{}{path}", self.base)))
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self.auth(self.http.get(format!("{}{path}", self.base))).send().await.unwrap();
        status_json(r).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self.auth(self.http.post(format!("{}{path}", self.base))).json(body).send().await.unwrap();
        status_json(r).await
    }

    pub async fn upload_as(&self, bytes: Vec<u8>, purpose: &str, filename: &str) -> (u16, Value) {
        let form = reqwest::multipart::Form::new()
            .text("purpose", purpose.to_string())
            .part("file", reqwest::multipart::Part::bytes(bytes).file_name(filename.to_string()));
        let r = self.auth(self.http.post(format!("{}/files", self.base))).multipart(form).send().await.unwrap();
        status_json(r).await
    }

    /// Uploads `lines` as a batch input and returns the file id.
    pub async fn upload(&self, lines: &[String]) -> String {
        let (st, v) = self.upload_as(jsonl(lines).into_bytes(), "batch", "input.jsonl").await;
        assert_eq!(st, 200, "upload failed: {v}");
        v["id"].as_str().unwrap().to_string()
    }

    pub async fn create_batch(&self, file_id: &str, extra: Value) -> Value {
        let mut body = json!({"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"});
        for (k, v) in extra.as_object().cloned().unwrap_or_default() {
            body[k] = v;
        }
        let (st, v) = self.post("/batches", &body).await;
        assert_eq!(st, 200, "create failed: {v}");
        v
    }

    /// Uploads and creates in one go.
    pub async fn submit(&self, lines: &[String]) -> String {
        let f = self.upload(lines).await;
        self.create_batch(&f, json!({})).await["id"].as_str().unwrap().to_string()
    }

    pub async fn batch(&self, id: &str) -> Value {
        let (st, v) = self.get(&format!("/batches/{id}")).await;
        assert_eq!(st, 200, "{v}");
        v
    }

    /// Polls until the batch is in one of `statuses`.
    pub async fn wait_for(&self, id: &str, statuses: &[&str], timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let b = self.batch(id).await;
            if statuses.contains(&b["status"].as_str().unwrap_or_default()) {
                return b;
            }
            assert!(Instant::now() < deadline, "batch {id} never reached {statuses:?}; last: {b}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn content(&self, file_id: &str) -> String {
        let r = self.auth(self.http.get(format!("{}/files/{file_id}/content", self.base))).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200);
        r.text().await.unwrap()
    }

    /// Output and error lines of a final batch, parsed.
    pub async fn results(&self, batch: &Value) -> (Vec<Value>, Vec<Value>) {
        let mut out = (vec![], vec![]);
        for (key, dst) in [("output_file_id", &mut out.0), ("error_file_id", &mut out.1)] {
            if let Some(id) = batch[key].as_str() {
                *dst = self.content(id).await.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
            }
        }
        out
    }
}

async fn status_json(r: reqwest::Response) -> (u16, Value) {
    let st = r.status().as_u16();
    let text = r.text().await.unwrap();
    let v = serde_json::from_str(&text).unwrap_or_else(|_| panic!("status {st}: body is not JSON: {text:?}"));
    (st, v)
}

pub fn jsonl(lines: &[String]) -> String {
    let mut s = lines.join("\n");
    s.push('\n');
    s
}

/// A full chat line; `mock` (if any) steers the mock upstream for this line.
pub fn chat_line(custom_id: &str, model: &str, mock: Option<Value>) -> String {
    let mut body = json!({"model": model, "messages": [{"role": "user", "content": format!("hello from {custom_id}")}]});
    if let Some(m) = mock {
        body["mock"] = m;
    }
    json!({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}).to_string()
}

pub fn chat_lines(n: usize, model: &str) -> Vec<String> {
    (0..n).map(|i| chat_line(&format!("req-{i}"), model, None)).collect()
}

/// A config with one upstream at `base_url` serving every model.
pub fn config(base_url: &str, extra_upstream: &str, extra: &str) -> String {
    format!(
        "[[upstreams]]\nname = \"mock\"\nbase_url = \"{base_url}\"\nmodels = [\"*\"]\n{extra_upstream}\n\n[batches]\ncompletion_windows = [\"24h\", \"1h\", \"3s\"]\n\n{extra}\n"
    )
}

pub async fn mock(args: MockArgs) -> MockServer {
    MockServer::start(MockArgs { listen: "127.0.0.1:0".into(), ..args }).await.unwrap()
}

/// Asserts that every custom_id appears exactly once across output and error lines.
pub fn assert_exactly_once(out: &[Value], err: &[Value], expected: usize) {
    let mut seen = std::collections::HashMap::new();
    for l in out.iter().chain(err) {
        *seen.entry(l["custom_id"].as_str().unwrap().to_string()).or_insert(0) += 1;
    }
    let dups: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dups.is_empty(), "custom_ids appear more than once: {dups:?}");
    assert_eq!(seen.len(), expected, "every line must appear exactly once");
}

// ---- helpers added for tests/it/engine.rs and tests/it/crash.rs ----

/// Polls `f` every 20 ms until it returns `Some`, panicking with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An `http://127.0.0.1:PORT/v1` URL on which nothing listens (connections are refused).
pub fn dead_base_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    format!("http://127.0.0.1:{port}/v1")
}

/// Downloads the files of a final batch and checks the invariants every final batch keeps:
/// every custom_id exactly once across output and error, `request_counts` add up to `total`
/// and match the line counts of the files, output lines are 2xx, ids are stable line ids.
pub async fn final_results(api: &Api, b: &Value, total: usize) -> (Vec<Value>, Vec<Value>) {
    let (out, err) = api.results(b).await;
    assert_exactly_once(&out, &err, total);
    let rc = &b["request_counts"];
    assert_eq!(rc["total"].as_u64(), Some(total as u64), "request_counts.total: {b}");
    assert_eq!(rc["completed"].as_u64(), Some(out.len() as u64), "request_counts.completed == output lines: {b}");
    assert_eq!(rc["failed"].as_u64(), Some(err.len() as u64), "request_counts.failed == error lines: {b}");
    for l in &out {
        let st = l["response"]["status_code"].as_u64().unwrap_or(0);
        assert!((200..300).contains(&st), "output line is not 2xx: {l}");
        assert!(l["error"].is_null(), "{l}");
    }
    for l in out.iter().chain(&err) {
        assert!(l["id"].as_str().is_some_and(|i| i.starts_with("batch_req_")), "{l}");
    }
    (out, err)
}

/// custom_id → line id (`batch_req_…`, the `x-request-id` sent upstream).
pub fn ids_by_custom_id(lines: &[Value]) -> std::collections::HashMap<String, String> {
    lines.iter().map(|l| (l["custom_id"].as_str().unwrap().to_string(), l["id"].as_str().unwrap().to_string())).collect()
}

// ---- child processes ----

#[derive(Debug)]
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Spawns `c` with piped output and waits for it, at most `timeout`.
pub fn finish(mut c: Command, timeout: Duration) -> Out {
    let child = c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn batchd");
    wait_out(child, timeout)
}

/// Reads a pipe to its end on a thread (so a full pipe never blocks the child).
pub fn drain(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        String::from_utf8_lossy(&v).into_owned()
    })
}

/// A pipe read on a thread as it arrives: what came so far can be looked at while the child
/// runs (to wait for a line it prints), and the whole of it once the pipe ends.
pub struct Tail {
    text: std::sync::Arc<std::sync::Mutex<String>>,
    reader: std::thread::JoinHandle<()>,
}

impl Tail {
    pub fn new(mut r: impl Read + Send + 'static) -> Tail {
        let text = std::sync::Arc::<std::sync::Mutex<String>>::default();
        let into = text.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = r.read(&mut buf) {
                into.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Tail { text, reader }
    }

    /// What the pipe carried so far.
    pub fn text(&self) -> String {
        self.text.lock().unwrap().clone()
    }

    /// Everything, once the pipe ends.
    pub fn join(self) -> String {
        let Tail { text, reader } = self;
        reader.join().unwrap();
        let all = text.lock().unwrap().clone();
        all
    }
}

/// Waits for a child spawned with piped stdout/stderr; kills it after `timeout`.
pub fn wait_out(mut child: Child, timeout: Duration) -> Out {
    let out = drain(child.stdout.take().unwrap());
    let err = drain(child.stderr.take().unwrap());
    let code = wait_code(&mut child, timeout);
    Out { code, stdout: out.join().unwrap(), stderr: err.join().unwrap() }
}

/// The exit code (-SIGNAL when killed by a signal); panics after `timeout`.
pub fn wait_code(child: &mut Child, timeout: Duration) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code().unwrap_or_else(|| -st.signal().unwrap_or(0));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("batchd did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every object and staging file under a local blob directory, sorted.
pub fn blob_tree(dir: &std::path::Path) -> Vec<String> {
    let mut out = vec![];
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().unwrap().is_dir() {
                dirs.push(e.path());
            } else {
                out.push(e.path().strip_prefix(dir).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    out
}

/// `n` seconds.
pub fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// A Batch object's durable results so far: completed plus failed.
pub fn done(b: &Value) -> u64 {
    b["request_counts"]["completed"].as_u64().unwrap_or(0) + b["request_counts"]["failed"].as_u64().unwrap_or(0)
}

/// Asserts that `v` is OpenAI's error envelope: a non-empty message and every other field present.
pub fn assert_envelope(v: &Value) {
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "error.message missing: {v}");
    for k in ["type", "param", "code"] {
        assert!(e.as_object().unwrap().contains_key(k), "error.{k} missing: {v}");
    }
}

/// A `/proc/PID/status` figure in KiB (`VmHWM:` the peak resident set, `VmRSS:` the current).
pub fn proc_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("{field} not in /proc/{pid}/status"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// [`proc_kb`] in MiB.
pub fn proc_mb(pid: u32, field: &str) -> u64 {
    proc_kb(pid, field) / 1024
}
