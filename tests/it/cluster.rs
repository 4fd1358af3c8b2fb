//! Scale-out, end to end: several `batchd serve` processes on one PostgreSQL database and one
//! blob store (an S3 bucket when `BATCHD_TEST_S3_URL` is set, else a directory they share),
//! against the project's mock upstream. Each test makes a fresh database (and bucket) and is
//! skipped, with a message, when `BATCHD_TEST_POSTGRES_URL` is unset.
//!
//! - any node serves any call; work is shared; a cancel through one node stops all of them
//!   within a second of its answer, whatever `lease_ttl_s`;
//!   priorities and fair share hold across nodes as on one;
//!   every node's Batch object shows the cluster's rate and deadline risk;
//! - a node killed with SIGKILL loses its leases at `lease_ttl` and the others finish its
//!   units; a node stopped with SIGTERM hands them back at once (asserted in the database);
//!   every line ends up exactly once, and only calls without a durable result at the kill are
//!   repeated;
//! - the database connection cut mid-batch (a proxy in front of PostgreSQL, broken and
//!   restored): calls answer 503, upstream calls pause, the batch completes exactly once;
//! - the object store cut mid-batch: reads keep answering, the batch completes exactly once;
//! - `batchd migrate` moves an embedded install, running batch included;
//! - the backends chosen by environment or by the config file, with no data directory.

use std::time::{Duration, Instant};

use crate::common::*;
use crate::store::testing::TestDatabase;
use batchd::blob::conformance::testing::TestBucket;
use serde_json::{json, Value};

/// One fresh database and one fresh blob store, shared by the nodes of a test.
pub(crate) struct Shared {
    pub(crate) db: TestDatabase,
    bucket: Option<TestBucket>,
    dir: tempfile::TempDir,
}

impl Shared {
    pub(crate) async fn new(test: &str) -> Option<Shared> {
        let db = TestDatabase::create(test).await?;
        let bucket = TestBucket::create(test).await;
        Some(Shared { db, bucket, dir: tempfile::tempdir().unwrap() })
    }

    fn blob_url(&self) -> String {
        match &self.bucket {
            Some(b) => b.url("cluster").to_string(),
            None => format!("file://{}", self.dir.path().join("blobs").display()),
        }
    }

    fn args(&self, database: &str) -> Vec<String> {
        ["--database", database, "--blob", &self.blob_url()].map(String::from).to_vec()
    }

    fn env(&self) -> Vec<(String, String)> {
        self.bucket.as_ref().map(|b| b.env().into_iter().map(|(k, v)| (k.to_string(), v)).collect()).unwrap_or_default()
    }

    pub(crate) fn node(&self, config: &str) -> Server {
        self.node_on(config, &self.db.url)
    }

    /// A node with more environment (a faked clock).
    fn node_with_env(&self, config: &str, extra: &[(String, String)]) -> Server {
        let mut env = self.env();
        env.extend(extra.iter().cloned());
        Server::start_with(config, &self.args(&self.db.url), &env)
    }

    fn node_on(&self, config: &str, database: &str) -> Server {
        let s = Server::start_with(config, &self.args(database), &self.env());
        assert!(!s.dir.join("data").exists(), "a node with --database and --blob writes nothing to local disk");
        s
    }
}

fn cluster_config(base_url: &str, concurrency: usize) -> String {
    config(base_url, &format!("max_concurrency = {concurrency}"), "[engine]\nlease_ttl_s = 3\nunit_lines = 100\ncommit_interval_ms = 100")
}

/// Upstream requests one node has sent, from its `/metrics` (summed over labels).
pub(crate) async fn node_requests(s: &Server) -> u64 {
    let text = reqwest::get(format!("{}/metrics", s.url)).await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with("batchd_upstream_requests_total"))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.trim().parse::<f64>().ok()))
        .sum::<f64>() as u64
}

/// The nodes whose heartbeat has not lapsed, by the database's clock.
pub(crate) async fn live_nodes(db: &sqlx::PgPool) -> Vec<String> {
    sqlx::query_scalar("SELECT id FROM nodes WHERE expires_ms > (extract(epoch from clock_timestamp()) * 1000)::bigint ORDER BY id")
        .fetch_all(db)
        .await
        .unwrap()
}

async fn wait_done(api: &Api, id: &str, at_least: u64) -> Value {
    eventually(&format!("{at_least} lines of {id} done"), secs(60), || {
        let (api, id) = (api.clone(), id.to_string());
        async move {
            let b = api.batch(&id).await;
            (done(&b) >= at_least || !["validating", "in_progress"].contains(&b["status"].as_str().unwrap_or_default())).then_some(b)
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_share_work_survive_kill9_and_sigterm() {
    const LIMIT: usize = 12;
    const N: usize = 3000;
    let Some(shared) = Shared::new("three_nodes_share_work_survive_kill9_and_sigterm").await else { return };
    let m = mock(MockArgs { latency_ms: 40, ..Default::default() }).await;
    let cfg = cluster_config(&m.base_url(), LIMIT);
    let mut nodes: Vec<Server> = (0..3).map(|_| shared.node(&cfg)).collect();
    let apis: Vec<Api> = nodes.iter().map(Server::api).collect();

    // Any node serves any call: a file uploaded through node 1 reads back through node 2.
    let lines = chat_lines(N, "m");
    let file = apis[0].upload(&lines).await;
    assert_eq!(apis[1].content(&file).await, jsonl(&lines), "a file uploaded via node 1 is readable via node 2");

    // A cancel through one node stops the calls of every node within about a second (slow
    // lines, so that the batch is still running when every node has joined).
    let slow: Vec<String> = (0..N).map(|i| chat_line(&format!("slow-{i}"), "m", Some(json!({"latency_ms": 200})))).collect();
    let slow_file = apis[0].upload(&slow).await;
    let cancel_id = apis[0].create_batch(&slow_file, json!({})).await["id"].as_str().unwrap().to_string();
    for (i, n) in nodes.iter().enumerate() {
        eventually(&format!("node {} takes part", i + 1), secs(30), || async move { (node_requests(n).await > 0).then_some(()) }).await;
    }
    assert_eq!(apis[2].batch(&cancel_id).await["status"], "in_progress", "the first batch must still run when it is cancelled");
    let (st, c) = apis[1].post(&format!("/batches/{cancel_id}/cancel"), &json!({})).await;
    assert_eq!(st, 200, "{c}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (sent, in_flight) = (m.stats().requests, m.stats().in_flight);
    tokio::time::sleep(secs(1)).await;
    assert_eq!((m.stats().requests, in_flight), (sent, 0), "no node sends anything 1.5 s after a cancel through another one");
    let b = apis[2].wait_for(&cancel_id, &["cancelled"], secs(30)).await;
    let (_, err) = final_results(&apis[2], &b, N).await;
    assert!(err.iter().any(|l| l["error"]["code"] == "batch_cancelled"));

    // Work shared by three nodes; one killed, one stopped gracefully; the third finishes.
    m.reset_stats();
    let id = apis[0].create_batch(&file, json!({})).await["id"].as_str().unwrap().to_string();
    let seen = wait_done(&apis[2], &id, 600).await;
    assert_eq!(seen["status"], "in_progress", "the batch finished too early to test anything");
    // Every node's Batch object tells the cluster's rate, not the third of it that node makes.
    let (before, t0) = (done(&apis[0].batch(&id).await), Instant::now());
    tokio::time::sleep(secs(1)).await;
    let rate = (done(&apis[0].batch(&id).await) - before) as f64 / t0.elapsed().as_secs_f64();
    for (i, api) in apis.iter().enumerate() {
        let p = &api.batch(&id).await["progress"];
        let rps = p["requests_per_second"].as_f64().unwrap_or(0.0);
        assert!(rps > 0.5 * rate, "node {} says {rps} lines/s where the cluster makes {rate:.0}: {p}", i + 1);
        assert_eq!(p["at_risk"], false, "node {}: a 24 h batch of seconds is not at risk: {p}", i + 1);
    }
    nodes[0].kill9();
    let sent = m.stats().unique_request_ids;
    let durable = done(&apis[1].batch(&id).await);
    let bound = sent - durable;
    println!("kill -9 of node 1: {sent} lines sent, {durable} durable");
    wait_done(&apis[2], &id, durable + 600).await;
    let db = sqlx::PgPool::connect(&shared.db.url).await.unwrap();
    eventually("the killed node's heartbeat lapses", secs(10), || {
        let db = db.clone();
        async move { (live_nodes(&db).await.len() == 2).then_some(()) }
    })
    .await;
    assert_eq!(apis[2].batch(&id).await["status"], "in_progress", "the batch finished before the SIGTERM");
    let t0 = Instant::now();
    assert!(nodes[1].sigterm(), "SIGTERM ends a node with status 0");
    println!("SIGTERM of node 2 took {:?}", t0.elapsed());
    // It handed its leases back as it left, not at their expiry: only the last node holds any.
    let live = live_nodes(&db).await;
    assert_eq!(live.len(), 1, "the stopped node left the nodes table at once: {live:?}");
    let held: Vec<(String,)> = sqlx::query_as(
        "SELECT DISTINCT lease_owner FROM units WHERE lease_owner IS NOT NULL AND lease_expires > (extract(epoch from clock_timestamp()) * 1000)::bigint",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    assert!(held.iter().all(|(owner,)| *owner == live[0]), "leases still held by a node that left: {held:?} (live: {live:?})");

    let b = apis[2].wait_for(&id, &["completed", "failed", "expired", "cancelled"], secs(60)).await;
    assert_eq!(b["status"], "completed", "{b}");
    let (out, _) = final_results(&apis[2], &b, N).await;
    assert_eq!(out.len(), N);
    let st = m.stats();
    println!("{} requests, {} duplicates (bound {bound}), peak in flight {}", st.requests, st.duplicate_request_ids, st.peak_in_flight);
    assert_eq!(st.unique_request_ids, N as u64);
    assert!(st.duplicate_request_ids <= bound, "re-sent calls ({}) exceed the lines without a durable result at the kill ({bound})", st.duplicate_request_ids);
    assert!(st.peak_in_flight as usize <= LIMIT, "peak concurrency {} above the cluster-wide max_concurrency {LIMIT}", st.peak_in_flight);

    // Finalization happened once: one completed event, one output file.
    let store = batchd::store::postgres::PgStore::open(&shared.db.url).await.unwrap();
    use batchd::store::prelude::*;
    let filter = batchd::store::EventFilter { tenant: None, batch_id: Some(id.as_str().into()) };
    let finals: Vec<_> = store
        .events_after(&filter, 0, 10_000)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "batch.status" && serde_json::from_str::<Value>(&e.data).unwrap()["status"] == "completed")
        .collect();
    assert_eq!(finals.len(), 1, "one final status event");
    let (_, files) = apis[2].get("/files?purpose=batch_output").await;
    let ours = files["data"].as_array().unwrap().iter().filter(|f| f["filename"].as_str().unwrap_or_default().starts_with(&id)).count();
    assert_eq!(ours, 1, "one output file");
}

/// The mock's call count and calls in flight, sampled every 100 ms for `span`: (ms since the
/// first sample, calls, in flight).
async fn sample_calls(m: &MockServer, span: Duration) -> Vec<(u128, u64, u64)> {
    let t0 = Instant::now();
    let mut samples = Vec::new();
    while t0.elapsed() <= span {
        let st = m.stats();
        samples.push((t0.elapsed().as_millis(), st.requests, st.in_flight));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    samples
}

/// Issue #27: a cancel through one node stops the calls of every node within a second of its
/// answer, and aborts their calls in flight, with the default `lease_ttl_s` (30 s) and with
/// 60 s: nodes learn of the cancel as it commits, not at their next lease renewal (TTL/3).
/// Three nodes, 24 calls at once at 50 ms, the batch created through node 3 and cancelled
/// through node 2 while every node sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_through_another_node_stops_every_node_within_a_second_whatever_the_lease_ttl() {
    for ttl in [None, Some(60)] {
        let name = format!("cancel_stops_every_node_ttl_{}", ttl.unwrap_or(30));
        let Some(shared) = Shared::new(&name).await else { return };
        let m = mock(MockArgs { latency_ms: 50, ..Default::default() }).await;
        let ttl_line = ttl.map(|t| format!("lease_ttl_s = {t}\n")).unwrap_or_default();
        let cfg = config(&m.base_url(), "max_concurrency = 24", &format!("[engine]\n{ttl_line}unit_lines = 100"));
        let nodes: Vec<Server> = (0..3).map(|_| shared.node(&cfg)).collect();
        let apis: Vec<Api> = nodes.iter().map(Server::api).collect();
        let id = apis[2].submit(&chat_lines(5000, "m")).await;
        for (i, n) in nodes.iter().enumerate() {
            eventually(&format!("node {} takes part", i + 1), secs(30), || async move { (node_requests(n).await > 0).then_some(()) }).await;
        }
        let before = apis[0].batch(&id).await;
        assert_eq!(before["status"], "in_progress", "the batch must still run when it is cancelled: {before}");
        let in_flight_at_cancel = m.stats().in_flight;
        let (st, c) = apis[1].post(&format!("/batches/{id}/cancel"), &json!({})).await;
        assert_eq!(st, 200, "{c}");
        let samples = sample_calls(&m, secs(3)).await;
        let last = samples.last().unwrap().1;
        let last_call_ms = samples.iter().find(|s| s.1 == last).map_or(0, |s| s.0);
        let settled_ms = samples.iter().find(|s| s.2 == 0).map_or(u128::MAX, |s| s.0);
        println!(
            "lease_ttl_s {}: {in_flight_at_cancel} calls in flight at the cancel; the last call by {last_call_ms} ms, none in flight from {settled_ms} ms",
            ttl.unwrap_or(30)
        );
        assert!(in_flight_at_cancel > 0, "test premise: calls were in flight at the cancel");
        let late: Vec<_> = samples.iter().filter(|s| s.0 >= 1000 && (s.1 != last || s.2 != 0)).collect();
        assert!(late.is_empty(), "lease_ttl_s {}: calls made or in flight 1 s after the cancel's answer (ms, calls, in flight): {late:?}", ttl.unwrap_or(30));
        let b = apis[0].wait_for(&id, &["cancelled"], secs(30)).await;
        assert!(b["request_counts"]["completed"].as_u64().unwrap() < 5000, "the batch was cut short: {b}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priorities_and_fair_share_hold_across_nodes() {
    const N: usize = 3000;
    let Some(shared) = Shared::new("priorities_and_fair_share_hold_across_nodes").await else { return };
    let m = mock(MockArgs { latency_ms: 20, ..Default::default() }).await;
    let cfg = cluster_config(&m.base_url(), 8);
    let nodes: Vec<Server> = (0..2).map(|_| shared.node(&cfg)).collect();
    let apis: Vec<Api> = nodes.iter().map(Server::api).collect();
    let (f1, f2) = (apis[0].upload(&chat_lines(N, "m")).await, apis[apis.len() - 1].upload(&chat_lines(N, "m")).await);
    let low = apis[0].create_batch(&f1, json!({})).await["id"].as_str().unwrap().to_string();
    let high = apis[apis.len() - 1].create_batch(&f2, json!({"priority": 4})).await["id"].as_str().unwrap().to_string();
    for (i, n) in nodes.iter().enumerate() {
        eventually(&format!("node {} takes part", i + 1), secs(30), || async move { (node_requests(n).await > 0).then_some(()) }).await;
    }
    let start = (done(&apis[0].batch(&low).await), done(&apis[0].batch(&high).await));
    tokio::time::sleep(secs(3)).await;
    let (l, h) = (apis[apis.len() - 1].batch(&low).await, apis[0].batch(&high).await);
    let (dl, dh) = (done(&l) - start.0, done(&h) - start.1);
    println!("3 s on two nodes: low {dl}, high (priority 4) {dh}");
    assert!(dl > 0, "the low-priority batch is not starved");
    // One node gives priority 4 about 3.5 times priority 1's lines here; two nodes, each
    // batch validated on another, about 2.25 times (see docs/deploy.md): clearly more, not
    // yet the same split.
    assert!(dh as f64 >= 1.5 * dl as f64, "priority 4 gets clearly more than priority 1 across the cluster: high {dh} vs low {dl}");
    assert_eq!(h["status"], "in_progress", "the test must measure while both run");

    // A small batch created through either node does not wait behind the two big ones.
    for api in &apis {
        let t0 = Instant::now();
        let id = api.submit(&chat_lines(10, "m")).await;
        let b = api.wait_for(&id, &["completed", "failed"], secs(20)).await;
        assert_eq!(b["status"], "completed", "{b}");
        assert!(t0.elapsed() < secs(5), "a 10-line batch waited {:?} behind two 3000-line ones", t0.elapsed());
    }
    for id in [&low, &high] {
        let (st, c) = apis[0].post(&format!("/batches/{id}/cancel"), &json!({})).await;
        assert_eq!(st, 200, "{c}");
    }
}

/// A node whose backends come from the environment or its config file, started in `cwd`
/// with no `--data-dir`.
fn node_without_data_dir(cwd: &std::path::Path, name: &str, config: &str, env: &[(String, String)]) -> (std::process::Child, String) {
    let cfg = cwd.join(format!("{name}.toml"));
    std::fs::write(&cfg, config).unwrap();
    let log = std::fs::File::create(cwd.join("batchd.log")).unwrap();
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--config"]).arg(&cfg).current_dir(cwd);
    cmd.env_remove("BATCHD_DATA_DIR").envs(env.iter().map(|(k, v)| (k, v))).stdout(std::process::Stdio::piped()).stderr(log);
    let mut child = cmd.spawn().unwrap();
    let url = read_listen_line(&mut child, "batchd listening on ", cwd);
    (child, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_from_the_environment_or_the_config_file_need_no_data_dir() {
    let Some(shared) = Shared::new("backends_from_the_environment_or_the_config_file_need_no_data_dir").await else { return };
    let m = mock(MockArgs::default()).await;
    let cwd = tempfile::tempdir().unwrap();
    let base = cluster_config(&m.base_url(), 4);
    let mut env = shared.env();
    env.extend([("BATCHD_DATABASE_URL".to_string(), shared.db.url.clone()), ("BATCHD_BLOB_URL".to_string(), shared.blob_url())]);
    let (mut by_env, url_env) = node_without_data_dir(cwd.path(), "by_env", &base, &env);
    let keys = format!("[server]\ndatabase = \"{}\"\nblob = \"{}\"\n\n{base}", shared.db.url, shared.blob_url());
    let (mut by_file, url_file) = node_without_data_dir(cwd.path(), "by_file", &keys, &shared.env());

    let (a, b) = (Api::new(&url_env, None), Api::new(&url_file, None));
    let id = a.submit(&chat_lines(20, "m")).await;
    let done = b.wait_for(&id, &["completed", "failed"], secs(30)).await;
    assert_eq!(
        done["status"], "completed",
        "a batch created through the node configured by environment finishes, seen through the one configured by file: {done}"
    );
    final_results(&b, &done, 20).await;
    let local: Vec<String> = std::fs::read_dir(cwd.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(local.iter().all(|n| n.ends_with(".toml") || n == "batchd.log"), "nothing but the config and the log on local disk: {local:?}");
    for c in [&mut by_env, &mut by_file] {
        c.kill().unwrap();
        c.wait().unwrap();
    }
}

/// A TCP proxy in front of PostgreSQL or the S3 server that the test can break (every
/// connection dropped, new ones closed at once: a restart), make hang (connections kept open,
/// nothing forwarded: a network cut that drops packets) and restore.
struct ChaosProxy {
    port: u16,
    mode: tokio::sync::watch::Sender<Mode>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Up,
    Refused,
    Hanging,
}

impl ChaosProxy {
    async fn start(target: std::net::SocketAddr) -> ChaosProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = tokio::sync::watch::Sender::new(Mode::Up);
        let rx = mode.subscribe();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let mut rx = rx.clone();
                tokio::spawn(async move {
                    let now = *rx.borrow_and_update();
                    if now == Mode::Refused {
                        return;
                    }
                    if now == Mode::Hanging {
                        // Held open, silent, until the proxy is restored.
                        let _ = rx.wait_for(|m| *m == Mode::Up).await;
                        return;
                    }
                    let Ok(mut server) = tokio::net::TcpStream::connect(target).await else { return };
                    let cut = tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => return,
                        m = rx.wait_for(|m| *m != Mode::Up) => m.map(|m| *m).unwrap_or(Mode::Refused),
                    };
                    if cut == Mode::Hanging {
                        let _ = rx.wait_for(|m| *m == Mode::Up).await;
                    }
                });
            }
        });
        ChaosProxy { port, mode }
    }

    fn cut(&self) {
        self.mode.send_replace(Mode::Refused);
    }

    fn hang(&self) {
        self.mode.send_replace(Mode::Hanging);
    }

    fn restore(&self) {
        self.mode.send_replace(Mode::Up);
    }
}

/// A proxy in front of the shared database, and the URL that goes through it.
async fn database_proxy(shared: &Shared) -> (ChaosProxy, String) {
    let (_, target) = via_proxy(&shared.db.url, 0);
    let proxy = ChaosProxy::start(target).await;
    let (url, _) = via_proxy(&shared.db.url, proxy.port);
    (proxy, url)
}

/// A proxy in front of the shared bucket's S3 server, and the environment that sends a node
/// through it.
async fn bucket_proxy(shared: &Shared, bucket: &TestBucket) -> (ChaosProxy, Vec<(String, String)>) {
    let endpoint = bucket.endpoint.trim_start_matches("http://");
    let target = std::net::ToSocketAddrs::to_socket_addrs(endpoint).unwrap().next().unwrap();
    let proxy = ChaosProxy::start(target).await;
    let mut env = shared.env();
    env.retain(|(k, _)| k != "AWS_ENDPOINT_URL");
    env.push(("AWS_ENDPOINT_URL".into(), format!("http://127.0.0.1:{}", proxy.port)));
    (proxy, env)
}

fn via_proxy(url: &str, port: u16) -> (String, std::net::SocketAddr) {
    let opts: sqlx::postgres::PgConnectOptions = url.parse().unwrap();
    let target = format!("{}:{}", opts.get_host(), opts.get_port());
    let target = std::net::ToSocketAddrs::to_socket_addrs(&target).unwrap().next().unwrap();
    let db = opts.get_database().unwrap().to_string();
    let user = opts.get_username().to_string();
    (format!("postgres://{user}@127.0.0.1:{port}/{db}"), target)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_connection_cut_mid_batch_pauses_and_resumes_exactly_once() {
    const N: usize = 1500;
    let Some(shared) = Shared::new("database_connection_cut_mid_batch_pauses_and_resumes_exactly_once").await else { return };
    let m = mock(MockArgs { latency_ms: 20, ..Default::default() }).await;
    let (proxy, url) = database_proxy(&shared).await;
    let node = shared.node_on(&cluster_config(&m.base_url(), 8), &url);
    let api = node.api();
    let id = api.submit(&chat_lines(N, "m")).await;
    let before = wait_done(&api, &id, 300).await;
    assert_eq!(before["status"], "in_progress");

    proxy.cut();
    let durable = done(&before);
    let t0 = Instant::now();
    let (st, body) = api.get(&format!("/batches/{id}")).await;
    println!("GET during the cut answered {st} in {:?}", t0.elapsed());
    assert_eq!(st, 503, "a call that needs the database answers 503 while it is gone: {body}");
    assert_eq!(body["error"]["type"], "server_error", "in the error envelope: {body}");
    // /metrics answers from memory at once, and says the store takes no writes.
    let t0 = Instant::now();
    let text = reqwest::get(format!("{}/metrics", node.url)).await.unwrap().text().await.unwrap();
    println!("/metrics during the cut answered in {:?}", t0.elapsed());
    assert!(t0.elapsed() < secs(1), "a scrape never waits on the store ({:?})", t0.elapsed());
    assert!(text.contains("batchd_lines_pending"), "the store's figures as last read: {text}");
    eventually("batchd_store_writable says 0 through the cut", secs(10), || async {
        let text = reqwest::get(format!("{}/metrics", node.url)).await.unwrap().text().await.unwrap();
        text.lines().any(|l| l.trim() == "batchd_store_writable 0").then_some(())
    })
    .await;
    // The engine pauses: once the calls in flight have finished, nothing new is sent.
    tokio::time::sleep(secs(1)).await;
    let paused_at = m.stats().requests;
    tokio::time::sleep(secs(4)).await;
    let during = m.stats().requests - paused_at;
    let sent = m.stats().unique_request_ids;
    println!("while cut: {during} requests sent in 4 s; {sent} lines sent, {durable} durable before the cut");
    assert!(during <= 8, "upstream calls pause while results cannot be stored ({during} sent)");

    proxy.restore();
    let b = api.wait_for(&id, &["completed", "failed"], secs(60)).await;
    assert_eq!(b["status"], "completed", "{b}");
    let (out, _) = final_results(&api, &b, N).await;
    assert_eq!(out.len(), N);
    let st = m.stats();
    println!("{} requests, {} duplicates", st.requests, st.duplicate_request_ids);
    assert_eq!(st.unique_request_ids, N as u64, "nothing lost");
    assert!(st.duplicate_request_ids <= sent - durable, "nothing re-sent beyond what lacked a durable result at the cut");
}

/// The object store cut off mid-batch (a proxy in front of the S3 server, broken for a few
/// seconds, then restored): reads that need only the database keep answering, the engine
/// waits for the bucket, and the batch completes with every line once and none sent twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_store_cut_mid_batch_reads_keep_answering_and_nothing_is_lost() {
    const N: usize = 1500;
    let Some(shared) = Shared::new("object_store_cut_mid_batch_reads_keep_answering_and_nothing_is_lost").await else { return };
    let Some(bucket) = &shared.bucket else { return };
    let (proxy, env) = bucket_proxy(&shared, bucket).await;
    let m = mock(MockArgs { latency_ms: 20, ..Default::default() }).await;
    let node = Server::start_with(&cluster_config(&m.base_url(), 8), &shared.args(&shared.db.url), &env);
    let api = node.api();
    let id = api.submit(&chat_lines(N, "m")).await;
    let before = wait_done(&api, &id, 300).await;
    assert_eq!(before["status"], "in_progress");

    proxy.cut();
    let cut_at = Instant::now();
    while cut_at.elapsed() < secs(3) {
        let (st, b) = api.get(&format!("/batches/{id}")).await;
        assert_eq!(st, 200, "reading a batch needs only the database: {b}");
        let (st, list) = api.get("/batches?limit=5").await;
        assert_eq!(st, 200, "{list}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let during = done(&api.batch(&id).await);
    println!("{} lines done before the cut, {during} when it ended", done(&before));
    proxy.restore();

    let b = api.wait_for(&id, &["completed", "failed"], secs(90)).await;
    assert_eq!(b["status"], "completed", "{b}");
    let (out, _) = final_results(&api, &b, N).await;
    assert_eq!(out.len(), N);
    let st = m.stats();
    assert_eq!((st.unique_request_ids, st.duplicate_request_ids), (N as u64, 0), "every line sent once: nothing lost, nothing re-sent");
}

/// Calls one node has in flight, from its `/metrics`.
async fn node_in_flight(s: &Server) -> u64 {
    let text = reqwest::get(format!("{}/metrics", s.url)).await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with("batchd_upstream_in_flight"))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.trim().parse::<f64>().ok()))
        .sum::<f64>() as u64
}

/// The most times any unit of `batch` was leased (1: no lease was ever lost).
async fn max_epoch(db: &sqlx::PgPool, batch: &str) -> i64 {
    sqlx::query_scalar("SELECT max(epoch) FROM units WHERE batch_id = $1").bind(batch).fetch_one(db).await.unwrap()
}

/// Issue #21: a node frozen (SIGSTOP) past `lease_ttl` while the other takes its units and
/// its slots over, then resumed (SIGCONT), sends nothing for the units it lost (its calls
/// waiting for a slot or a retry are dropped before they are sent) and nothing beyond the
/// cluster's `max_concurrency`, from its first call on. Before, it went on with its old share
/// for up to a renewal period: about 30 calls made twice here, and 18 in flight against 12.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_resumed_after_sigstop_drops_the_calls_of_units_it_lost_and_keeps_the_limit() {
    const LIMIT: usize = 12;
    const N: usize = 900;
    let Some(shared) = Shared::new("a_node_resumed_after_sigstop_drops_the_calls_of_units_it_lost").await else { return };
    let m = mock(MockArgs { latency_ms: 200, ..Default::default() }).await;
    let cfg = cluster_config(&m.base_url(), LIMIT);
    let (first, second) = (shared.node(&cfg), shared.node(&cfg));
    let api = first.api();
    let id = api.submit(&chat_lines(N, "m")).await;
    for n in [&first, &second] {
        eventually("both nodes send", secs(30), || async move { (node_requests(n).await > 20).then_some(()) }).await;
    }
    let in_flight = node_in_flight(&second).await;
    second.freeze(true);
    let db = sqlx::PgPool::connect(&shared.db.url).await.unwrap();
    eventually("the frozen node's heartbeat lapses", secs(15), || {
        let db = db.clone();
        async move { (live_nodes(&db).await.len() == 1).then_some(()) }
    })
    .await;
    // The first node takes the frozen one's units and slots over.
    tokio::time::sleep(secs(2)).await;
    let durable = done(&api.batch(&id).await);
    assert!(durable < N as u64 - 200, "the batch is nearly done before the frozen node resumes: {durable}");
    second.freeze(false);
    let b = api.wait_for(&id, &["completed", "failed", "expired", "cancelled"], secs(120)).await;
    assert_eq!(b["status"], "completed", "{b}");
    let (out, _) = final_results(&api, &b, N).await;
    assert_eq!(out.len(), N);
    let st = m.stats();
    println!("{} calls in flight on the frozen node; {} lines sent twice; peak in flight {}", in_flight, st.duplicate_request_ids, st.peak_in_flight);
    assert!(st.peak_in_flight as usize <= LIMIT, "the resumed node kept its old share: {} in flight against {LIMIT}", st.peak_in_flight);
    // Lines sent twice: those the frozen node had in flight or not yet committed (about a
    // commit interval's worth), which the other node sent again; no call after resuming.
    let bound = in_flight + 8;
    assert!(
        st.duplicate_request_ids <= bound,
        "{} lines sent twice, more than the frozen node's {in_flight} in flight (+8 uncommitted)",
        st.duplicate_request_ids
    );
}

/// Issue #21: a database outage shorter than `lease_ttl` loses no lease: renewal is tried
/// again a second after a failure (before, only every third of `lease_ttl`, so a 5 s cut
/// with `lease_ttl_s = 8` let leases expire and the units were leased again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_shorter_than_the_lease_ttl_loses_no_lease() {
    const N: usize = 1500;
    let Some(shared) = Shared::new("a_database_outage_shorter_than_the_lease_ttl_loses_no_lease").await else { return };
    let m = mock(MockArgs { latency_ms: 50, ..Default::default() }).await;
    let (proxy, url) = database_proxy(&shared).await;
    let cfg = config(&m.base_url(), "max_concurrency = 8", "[engine]\nlease_ttl_s = 8\nunit_lines = 100\ncommit_interval_ms = 100");
    let (first, second) = (shared.node_on(&cfg, &url), shared.node_on(&cfg, &url));
    let api = first.api();
    let id = api.submit(&chat_lines(N, "m")).await;
    for n in [&first, &second] {
        eventually("both nodes send", secs(30), || async move { (node_requests(n).await > 20).then_some(()) }).await;
    }
    proxy.cut();
    tokio::time::sleep(secs(5)).await;
    proxy.restore();
    let b = api.wait_for(&id, &["completed", "failed", "expired", "cancelled"], secs(120)).await;
    assert_eq!(b["status"], "completed", "{b}");
    let db = sqlx::PgPool::connect(&shared.db.url).await.unwrap();
    let (epoch, st) = (max_epoch(&db, &id).await, m.stats());
    println!("after a 5 s cut: units leased at most {epoch} times, {} lines sent twice", st.duplicate_request_ids);
    assert_eq!(epoch, 1, "a unit was leased again: a lease was lost in an outage shorter than lease_ttl");
    assert_eq!((st.unique_request_ids, st.duplicate_request_ids), (N as u64, 0), "every line sent once");
}

/// Issue #21: how soon a call that needs the object store answers 503 while the S3 server is
/// cut off, refused (a restart) or hanging (packets dropped) — the figures docs/deploy.md
/// gives — and that it does answer, in the error envelope, well before a client's timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_store_cut_answers_503_in_seconds_refused_or_hanging() {
    let Some(shared) = Shared::new("an_object_store_cut_answers_503_in_seconds").await else { return };
    let Some(bucket) = &shared.bucket else { return };
    let (proxy, env) = bucket_proxy(&shared, bucket).await;
    let m = mock(MockArgs::default()).await;
    let node = Server::start_with(&cluster_config(&m.base_url(), 8), &shared.args(&shared.db.url), &env);
    let api = node.api();
    let file = api.upload(&chat_lines(10, "m")).await;
    for (kind, cut) in [("refused", Mode::Refused), ("hanging", Mode::Hanging)] {
        if cut == Mode::Hanging {
            proxy.hang()
        } else {
            proxy.cut()
        }
        let t0 = Instant::now();
        let r = api.request(reqwest::Method::GET, &format!("/files/{file}/content")).send().await.unwrap();
        let (st, body) = (r.status().as_u16(), r.text().await.unwrap());
        let took = t0.elapsed();
        println!("S3 {kind}: GET /files/{{id}}/content answered {st} after {took:?}");
        proxy.restore();
        assert_eq!(st, 503, "{kind}: {body}");
        assert!(took < secs(40), "{kind}: a download waits {took:?} for an unreachable object store");
        tokio::time::sleep(secs(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_moves_an_embedded_install_with_its_running_batch() {
    const N: usize = 400;
    let Some(shared) = Shared::new("migrate_moves_an_embedded_install_with_its_running_batch").await else { return };
    let m = mock(MockArgs { latency_ms: 30, ..Default::default() }).await;
    let cfg = config(&m.base_url(), "max_concurrency = 8", "[engine]\nunit_lines = 50");
    let mut embedded = Server::start(&cfg);
    let api = embedded.api();
    let finished = api.submit(&chat_lines(20, "m")).await;
    let finished = api.wait_for(&finished, &["completed"], secs(30)).await;
    let (out_before, _) = api.results(&finished).await;
    let running = api.submit(&chat_lines(N, "m")).await;
    let seen = wait_done(&api, &running, 100).await;
    assert_eq!(seen["status"], "in_progress");
    embedded.kill9();
    let data = embedded.dir.join("data");
    let sent = m.stats().unique_request_ids;

    let migrate = |args: &[String]| {
        let mut c = std::process::Command::new(BIN);
        c.arg("migrate").arg("--from-data-dir").arg(&data).args(args).envs(shared.env());
        finish(c, secs(60))
    };
    let args = shared.args(&shared.db.url);
    let first = migrate(&args);
    assert_eq!(first.code, 0, "{first:?}");
    assert!(first.stderr.contains("results:"), "{}", first.stderr);
    let again = migrate(&args);
    assert_eq!(again.code, 1, "a second run into a database that is no longer empty is refused: {again:?}");
    assert!(again.stderr.contains("empty database only"), "{}", again.stderr);

    let node = shared.node(&cfg);
    let api = node.api();
    let b = api.batch(finished["id"].as_str().unwrap()).await;
    assert_eq!((b["status"].as_str(), done(&b)), (Some("completed"), 20), "the finished batch came along: {b}");
    let (out_after, _) = api.results(&b).await;
    assert_eq!(out_after, out_before, "its output file reads back the same");
    let b = api.wait_for(&running, &["completed"], secs(60)).await;
    let (out, _) = final_results(&api, &b, N).await;
    assert_eq!(out.len(), N);
    let st = m.stats();
    assert_eq!(st.unique_request_ids, N as u64 + 20);
    assert!(st.duplicate_request_ids <= sent - done(&seen), "only lines without a durable result at the kill run again");
    let (_, list) = api.get("/batches?limit=10").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 2);
}

/// A bad backend URL stops the start with a message that names it (and no password).
#[test]
fn bad_backend_urls_are_refused_at_start() {
    for (flag, url, want) in [
        ("--database", "mysql://u:secret@h/db", "neither postgres://"),
        ("--database", "postgres://u:secret@h:port/db", "not a valid PostgreSQL URL"),
        ("--blob", "gs://bucket", "neither s3://"),
    ] {
        let mut c = std::process::Command::new(BIN);
        c.args(["serve", "--listen", "127.0.0.1:0", flag, url]);
        let out = finish(c, secs(20));
        assert_eq!(out.code, 1, "{out:?}");
        assert!(out.stderr.contains(want), "{flag} {url}: {}", out.stderr);
        assert!(!out.stderr.contains("secret"), "a password never prints: {}", out.stderr);
    }
}

/// A node that cannot serve never joins (issue #19): six starts on the shared database that
/// fail to bind (the healthy node's address is in use) leave the nodes table and the healthy
/// node's share of the upstream's limit (all 8 of it) as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_starts_never_join_the_cluster() {
    let Some(shared) = Shared::new("failed_starts_never_join_the_cluster").await else { return };
    let m = mock(MockArgs::default()).await;
    let cfg = cluster_config(&m.base_url(), 8);
    let healthy = shared.node(&cfg);
    let limit = || async {
        let text = reqwest::get(format!("{}/metrics", healthy.url)).await.unwrap().text().await.unwrap();
        text.lines().find_map(|l| l.strip_prefix("batchd_upstream_limit{upstream=\"mock\"} ")).map(|v| v.trim().to_string())
    };
    assert_eq!(limit().await.as_deref(), Some("8"));
    let db = sqlx::PgPool::connect(&shared.db.url).await.unwrap();
    assert_eq!(live_nodes(&db).await.len(), 1);
    let taken = healthy.url.trim_start_matches("http://").to_string();
    for _ in 0..6 {
        let mut c = std::process::Command::new(BIN);
        c.args(["serve", "--listen", &taken, "--config"]).arg(healthy.dir.join("batchd.toml")).args(shared.args(&shared.db.url));
        c.envs(shared.env()).env_remove("BATCHD_LOG");
        let out = finish(c, secs(60));
        assert_eq!(out.code, 1, "{out:?}");
        assert!(out.stderr.contains(&format!("binding {taken}")), "{out:?}");
    }
    // The failed nodes would have been seen within a beat (1 s) and lived for lease_ttl (3 s).
    let t = Instant::now();
    while t.elapsed() < secs(4) {
        assert_eq!(live_nodes(&db).await.len(), 1, "a node that never served is not a live node");
        assert_eq!(limit().await.as_deref(), Some("8"), "the healthy node keeps its whole share");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Issue #21: a node older than the schema (a newer batchd migrated the database during a
/// rolling upgrade) refuses to start with a message that says so and what to do, instead of
/// sqlx's "migration N was previously applied but is missing"; the running nodes go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_older_than_the_schema_says_so_and_the_others_go_on() {
    let Some(shared) = Shared::new("a_node_older_than_the_schema_says_so").await else { return };
    let m = mock(MockArgs::default()).await;
    let cfg = cluster_config(&m.base_url(), 8);
    let running = shared.node(&cfg);
    let db = sqlx::PgPool::connect(&shared.db.url).await.unwrap();
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) VALUES (9999, 'from a newer batchd', TRUE, '\\x00', 1)",
    )
    .execute(&db)
    .await
    .unwrap();
    let mut c = std::process::Command::new(BIN);
    c.args(["serve", "--listen", "127.0.0.1:0", "--config"]).arg(running.dir.join("batchd.toml")).args(shared.args(&shared.db.url));
    c.envs(shared.env()).env_remove("BATCHD_LOG");
    let out = finish(c, secs(60));
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("newer than this batchd knows") && out.stderr.contains("upgrade this batchd"), "{out:?}");
    assert!(!out.stderr.contains("previously applied but is missing"), "{out:?}");
    let id = running.api().submit(&chat_lines(20, "m")).await;
    assert_eq!(running.api().wait_for(&id, &["completed", "failed"], secs(60)).await["status"], "completed", "the running node goes on");
}

/// Debian's libfaketime (the thread-safe build), when installed (`scripts/test.sh` installs it).
fn libfaketime() -> Option<&'static str> {
    ["/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1", "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
}

/// The environment that moves a process's wall clock by `offset` (libfaketime's "+3m",
/// "-3m", "+25h"); its monotonic clock stays true.
fn skewed_clock(lib: &str, offset: &str) -> Vec<(String, String)> {
    [("LD_PRELOAD", lib), ("FAKETIME", offset), ("FAKETIME_DONT_FAKE_MONOTONIC", "1"), ("FAKETIME_NO_CACHE", "1")]
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .to_vec()
}

/// Issue #21: one clock for the cluster. One node of two runs with its wall clock 3 minutes
/// ahead, 3 minutes behind, or 25 hours ahead (libfaketime); batches with a 2-minute window
/// (24 h for the 25 h skew), created through either node and run by both, do not expire
/// early, and their stored times are the database's; a 3-second batch created through the
/// true node and run by the skewed one alone expires on time, neither early nor late.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skewed_node_clock_changes_no_expiry_and_no_stored_time() {
    let Some(lib) = libfaketime() else {
        println!("skipped: libfaketime is not installed (Debian's faketime; scripts/test.sh installs it)");
        return;
    };
    for (skew, window, window_s) in [("+3m", "2m", 120), ("-3m", "2m", 120), ("+25h", "24h", 86_400)] {
        let Some(shared) = Shared::new(&format!("skewed_clock_{}", skew.replace(['+', '-'], "x"))).await else { return };
        let m = mock(MockArgs { latency_ms: 300, ..Default::default() }).await;
        let cfg = format!(
            "[[upstreams]]\nname = \"mock\"\nbase_url = \"{}\"\nmodels = [\"*\"]\nmax_concurrency = 4\n\n\
             [batches]\ncompletion_windows = [\"{window}\", \"3s\"]\n\n[engine]\nlease_ttl_s = 3\nunit_lines = 10\n",
            m.base_url()
        );
        let mut honest = shared.node(&cfg);
        let skewed = shared.node_with_env(&cfg, &skewed_clock(lib, skew));
        let (a, b) = (honest.api(), skewed.api());
        let file = a.upload(&chat_lines(200, "m")).await;
        let t0 = now_secs();
        let via_skewed = b.create_batch(&file, json!({"completion_window": window})).await;
        let via_honest = a.create_batch(&file, json!({"completion_window": window})).await;
        for (who, c) in [("the skewed node", &via_skewed), ("the true node", &via_honest)] {
            let created = c["created_at"].as_i64().unwrap();
            assert!((created - t0).abs() <= 2, "{skew}: created_at through {who} is the database's time ({t0}): {c}");
            assert_eq!(c["expires_at"].as_i64().unwrap() - created, window_s, "{skew}: {c}");
        }
        eventually(&format!("{skew}: the skewed node takes part"), secs(30), || async { (node_requests(&skewed).await > 0).then_some(()) }).await;
        tokio::time::sleep(secs(3)).await;
        for c in [&via_skewed, &via_honest] {
            let seen = b.batch(c["id"].as_str().unwrap()).await;
            assert_eq!(seen["status"], "in_progress", "{skew}: a {window} batch does not expire within seconds: {seen}");
            let p = &seen["progress"];
            if let (Some(finish), Some(eta)) = (p["projected_finish_at"].as_i64(), p["eta_seconds"].as_i64()) {
                let now = now_secs();
                assert!((finish - eta - now).abs() <= 2, "{skew}: the skewed node projects from the database's time ({now}): {p}");
                assert_eq!(p["at_risk"], finish > seen["expires_at"].as_i64().unwrap(), "{skew}: at_risk against the stored expiry: {p}");
            }
        }
        for c in [&via_skewed, &via_honest] {
            let (st, body) = a.post(&format!("/batches/{}/cancel", c["id"].as_str().unwrap()), &json!({})).await;
            assert_eq!(st, 200, "{body}");
        }

        // The skewed node alone runs a 3-second batch the true node created.
        let short = a.create_batch(&file, json!({"completion_window": "3s"})).await;
        let created = Instant::now();
        assert!(honest.sigterm(), "the true node stops");
        let id = short["id"].as_str().unwrap();
        let ended = b.wait_for(id, &["expired", "completed", "failed", "cancelled"], secs(60)).await;
        let took = created.elapsed();
        println!("{skew}: a 3 s batch run by the skewed node alone ended {} after {took:?}", ended["status"]);
        assert_eq!(ended["status"], "expired", "{skew}: {ended}");
        // Without one clock: at once (+3m, +25h) or about 3 minutes late (-3m); the bound allows
        // for a loaded machine (finalization is part of it).
        assert!(took >= Duration::from_millis(2_000) && took <= secs(10), "{skew}: a 3 s batch expired after {took:?}: neither early nor late");
        let late = ended["finalizing_at"].as_i64().unwrap() - ended["expires_at"].as_i64().unwrap();
        assert!((0..=2).contains(&late), "{skew}: the stored times say it began finalizing {late} s after its expiry: {ended}");
    }
}

fn now_secs() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// The least rate of three nodes, as a fraction of one node's, that the throughput test accepts.
const KEEP_UP: f64 = 0.9;

/// Lines a second of one batch of `n` lines through `api`, from its creation to its end
/// (`completed`), and the peak of calls in flight at the mock meanwhile.
async fn timed_batch(api: &Api, m: &MockServer, file: &str, n: u64) -> (f64, u64) {
    m.reset_stats();
    let t0 = Instant::now();
    let id = api.create_batch(file, json!({})).await["id"].as_str().unwrap().to_string();
    let b = api.wait_for(&id, &["completed", "failed", "expired", "cancelled"], secs(120)).await;
    assert_eq!((b["status"].as_str(), done(&b)), (Some("completed"), n), "{b}");
    (n as f64 / t0.elapsed().as_secs_f64(), m.stats().peak_in_flight)
}

/// Issue #21: three nodes keep up with one on an upstream that is the bottleneck (24 calls
/// at once at 150 ms, `max_concurrency = 24` for the cluster, default `unit_lines`): one
/// 2,000-line batch, one 6,000-line batch, and a 6,000-line batch that a third node joins
/// mid-way; in-flight at the mock reaches the cluster limit on three nodes. Units shrink late
/// in a batch, so every node has lines until the end, and slots follow demand (`shares`), so
/// a node without lines lends its slots to those with lines. At 100 ms the debug build on
/// the shared 2-core machine is itself near its limit (one node 174–218 lines/s of 240 from
/// run to run), which the ratio then measures; at 150 ms both make 146–148 of 160, and three
/// nodes measured 0.99–1.01 of one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_keep_up_with_one_on_a_bound_upstream() {
    const LIMIT: u64 = 24;
    let Some(shared) = Shared::new("three_nodes_keep_up_with_one_on_a_bound_upstream").await else { return };
    let m = mock(MockArgs { latency_ms: 150, slots: LIMIT, ..Default::default() }).await;
    let cfg = config(&m.base_url(), &format!("max_concurrency = {LIMIT}"), "");
    let first = shared.node(&cfg);
    let api = first.api();
    let (small, big) = (api.upload(&chat_lines(2000, "m")).await, api.upload(&chat_lines(6000, "m")).await);
    let (one_small, _) = timed_batch(&api, &m, &small, 2000).await;
    let (one_big, _) = timed_batch(&api, &m, &big, 6000).await;

    let second = shared.node(&cfg);
    let mut third = shared.node(&cfg);
    tokio::time::sleep(secs(2)).await;
    let (three_small, peak) = timed_batch(&api, &m, &small, 2000).await;
    let (three_big, _) = timed_batch(&second.api(), &m, &big, 6000).await;
    println!("2,000 lines: {one_small:.0} lines/s on one node, {three_small:.0} on three (peak in flight {peak}); 6,000: {one_big:.0} and {three_big:.0}");
    assert_eq!(peak, LIMIT, "three nodes fill the cluster's limit, and never pass it");
    assert!(three_small >= KEEP_UP * one_small, "2,000 lines on three nodes: {three_small:.0} lines/s against {one_small:.0} on one");
    assert!(three_big >= KEEP_UP * one_big, "6,000 lines on three nodes: {three_big:.0} lines/s against {one_big:.0} on one");

    // A third node joining mid-batch works within seconds and slows nothing.
    assert!(third.sigterm());
    let t0 = Instant::now();
    let id = api.create_batch(&big, json!({})).await["id"].as_str().unwrap().to_string();
    m.reset_stats();
    wait_done(&api, &id, 1500).await;
    let joined = shared.node(&cfg);
    let joined_at = Instant::now();
    let b = api.wait_for(&id, &["completed", "failed", "expired", "cancelled"], secs(120)).await;
    let rate = 6000.0 / t0.elapsed().as_secs_f64();
    let calls = node_requests(&joined).await;
    println!(
        "6,000 lines, a node joining mid-batch: {rate:.0} lines/s (one node: {one_big:.0}); it made {calls} calls in the batch's last {:?}",
        joined_at.elapsed()
    );
    assert_eq!(b["status"], "completed", "{b}");
    assert!(calls > 0, "the joining node works before the batch ends");
    assert!(rate >= KEEP_UP * one_big, "a node joining mid-batch: {rate:.0} lines/s against {one_big:.0} on one node");
    assert!(m.stats().peak_in_flight <= LIMIT, "the cluster's limit holds as a node joins");
}
