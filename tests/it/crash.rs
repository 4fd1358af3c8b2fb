//! Crash and restart tests: the real `batchd serve` binary is killed with SIGKILL (or stopped
//! with SIGTERM) while it works and restarted on the same data directory. The durability
//! contract: nothing acknowledged is lost, every line ends up exactly once in output ∪ error,
//! and the only repeated upstream calls are those in flight at the crash.

use std::time::{Duration, Instant};

use crate::common::*;
use rand::Rng;
use serde_json::{json, Value};

/// Lists the batch_output files and returns those whose filename starts with the batch id.
async fn output_files_of(api: &Api, batch_id: &str) -> Vec<Value> {
    let (st, list) = api.get("/files?purpose=batch_output").await;
    assert_eq!(st, 200, "{list}");
    list["data"].as_array().unwrap().iter().filter(|f| f["filename"].as_str().unwrap_or_default().starts_with(batch_id)).cloned().collect()
}

/// Results durable in the store of a stopped server, read with batchd's own store code.
async fn durable_results(s: &Server, batch_id: &str) -> u64 {
    use batchd::store::prelude::*;
    let store = batchd::store::sqlite::SqliteStore::open(&s.dir.join("data").join("batchd.db")).await.unwrap();
    let b = store.get_batch(None, &batch_id.into()).await.unwrap();
    (b.completed + b.failed) as u64
}

const KILL_LINES: usize = 2000;
const KILL_CONCURRENCY: u64 = 32;

/// What a kill -9 loop observed.
struct KillRun {
    kills: u64,
    /// Calls in flight at the mock just before each kill, summed.
    in_flight: u64,
    /// Lines sent upstream but without a durable result at each kill, summed.
    sent_not_durable: u64,
    duplicates: u64,
}

/// Runs a 2000-line batch and kills the server with SIGKILL up to 6 times at random moments,
/// restarting it on the same data directory, until the batch completes; checks the final
/// files and that no acknowledged result was lost.
async fn kill9_loop() -> KillRun {
    const MAX_KILLS: u64 = 6;
    let m = mock(MockArgs { latency_ms: 50, ..Default::default() }).await;
    let mut s = Server::start(&config(&m.base_url(), &format!("max_concurrency = {KILL_CONCURRENCY}"), ""));
    let id = s.api().submit(&chat_lines(KILL_LINES, "m")).await;
    let mut rng = rand::rng();
    let mut run = KillRun { kills: 0, in_flight: 0, sent_not_durable: 0, duplicates: 0 };
    let t0 = Instant::now();
    while run.kills < MAX_KILLS {
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..900))).await;
        let before = s.api().batch(&id).await;
        if before["status"] != "in_progress" && before["status"] != "validating" {
            break;
        }
        let acknowledged = done(&before);
        let in_flight = m.stats().in_flight;
        s.kill9();
        run.kills += 1;
        let sent = m.stats().unique_request_ids;
        let durable = durable_results(&s, &id).await;
        assert!(durable >= acknowledged, "acknowledged results were lost: {acknowledged} counted before the kill, {durable} durable");
        assert!(sent >= durable);
        println!("kill {}: {acknowledged} acknowledged, {durable} durable, {sent} sent, {in_flight} in flight", run.kills);
        run.in_flight += in_flight;
        run.sent_not_durable += sent - durable;
        s.spawn();
    }
    let api = s.api();
    let b = api.wait_for(&id, &["completed", "failed", "expired", "cancelled"], secs(60)).await;
    assert_eq!(b["status"], "completed", "{b}");
    let (out, err) = final_results(&api, &b, KILL_LINES).await;
    assert!(err.is_empty(), "{:?}", &err[..err.len().min(3)]);
    let st = m.stats();
    run.duplicates = st.duplicate_request_ids;
    println!(
        "{} kills in {:?}; {} requests, {} duplicate request ids; at the kills: {} calls in flight, {} sent without a durable result",
        run.kills,
        t0.elapsed(),
        st.requests,
        st.duplicate_request_ids,
        run.in_flight,
        run.sent_not_durable
    );
    assert_eq!(out.len(), KILL_LINES);
    assert_eq!(st.unique_request_ids, KILL_LINES as u64);
    assert!(run.kills >= 3, "the batch finished too early to test anything ({} kills)", run.kills);
    run
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_repeatedly_loses_nothing_and_repeats_only_undurable_calls() {
    let run = kill9_loop().await;
    assert!(
        run.duplicates <= run.sent_not_durable,
        "a call whose result was durable at a crash was repeated: {} duplicates, but only {} calls lacked a durable result at the kills",
        run.duplicates,
        run.sent_not_durable
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_validation_then_restart_completes_exactly_once() {
    const N: usize = 3000;
    let m = mock(MockArgs::default()).await;
    let mut s = Server::start(&config(&m.base_url(), "", ""));
    let api = s.api();
    // ~4 KB lines so that validating 12 MB takes a moment.
    let pad = "v".repeat(4000);
    let lines: Vec<String> = (0..N).map(|i| chat_line(&format!("req-{i}"), "m", None).replace("hello from", &format!("{pad} hello from"))).collect();
    let f = api.upload(&lines).await;
    let created = api.create_batch(&f, json!({})).await;
    let id = created["id"].as_str().unwrap().to_string();
    let seen = api.batch(&id).await;
    s.kill9();
    println!("killed with the batch {} (requests sent so far: {})", seen["status"], m.stats().requests);
    s.spawn();
    let api = s.api();
    let b = api.wait_for(&id, &["completed", "failed"], secs(60)).await;
    assert_eq!(b["status"], "completed", "{b}");
    let (out, _) = final_results(&api, &b, N).await;
    assert_eq!(out.len(), N);
    let st = m.stats();
    assert_eq!(st.unique_request_ids, N as u64);
    if seen["status"] == "validating" {
        assert_eq!(st.duplicate_request_ids, 0, "nothing was in flight during validation");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_finalization_then_restart_writes_each_file_once() {
    const N: usize = 1200;
    // Every other line gets a large JSON error body (kept whole, unlike a non-JSON one), so
    // the error file is ~12 MB and finalization takes long enough to be caught; a fresh
    // server and batch are tried until it is (it always was within three tries).
    let big = "e".repeat(20_000);
    let big_body = json!({"error": {"message": big}}).to_string();
    let lines: Vec<String> = (0..N)
        .map(|i| {
            let mock = (i % 2 == 1).then(|| json!({"status": 400, "body_text": big_body}));
            chat_line(&format!("req-{i}"), "m", mock)
        })
        .collect();
    let mut tries = 0;
    let (m, s, id) = loop {
        tries += 1;
        assert!(tries <= 3, "finalization was never caught running in three tries");
        let m = mock(MockArgs::default()).await;
        let mut s = Server::start(&config(&m.base_url(), "", ""));
        let api = s.api();
        let id = api.submit(&lines).await;
        let deadline = Instant::now() + secs(60);
        let caught = loop {
            let b = api.batch(&id).await;
            if b["status"] == "finalizing" {
                s.kill9();
                break true;
            }
            if b["status"] == "completed" {
                break false;
            }
            assert!(Instant::now() < deadline, "{b}");
            tokio::time::sleep(Duration::from_millis(3)).await;
        };
        if caught {
            s.spawn();
            break (m, s, id);
        }
    };
    let api = s.api();
    let b = api.wait_for(&id, &["completed"], secs(60)).await;
    let (out, err) = final_results(&api, &b, N).await;
    assert_eq!((out.len(), err.len()), (N / 2, N / 2));
    for l in &err {
        assert_eq!(l["response"]["status_code"], 400);
        assert_eq!(l["response"]["body"]["error"]["message"].as_str().map(str::len), Some(big.len()));
    }
    assert_eq!(b["output_file_id"].as_str(), Some(batchd::ids::batch_output_file_id(&id, "output").as_str()));
    assert_eq!(b["error_file_id"].as_str(), Some(batchd::ids::batch_output_file_id(&id, "error").as_str()));
    let files = output_files_of(&api, &id).await;
    assert_eq!(files.len(), 2, "one output and one error file, never a second copy: {files:?}");
    for f in &files {
        let content = api.content(f["id"].as_str().unwrap()).await;
        assert_eq!(f["bytes"].as_u64(), Some(content.len() as u64), "file size matches its content: {f}");
        assert_eq!(content.lines().count(), N / 2);
    }
    assert_eq!(m.stats().duplicate_request_ids, 0, "finalization repeats no upstream call");
    // No debris: the blob directory holds the input and the two files, nothing half-written.
    let mut want: Vec<String> = [b["input_file_id"].as_str().unwrap(), b["output_file_id"].as_str().unwrap(), b["error_file_id"].as_str().unwrap()]
        .iter()
        .map(|id| format!("files/{id}"))
        .collect();
    want.sort();
    assert_eq!(blob_tree(&s.data.join("blobs")), want, "no staging file or unrecorded object is left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_right_after_cancel_still_ends_cancelled() {
    const N: usize = 100;
    let m = mock(MockArgs { latency_ms: 500, ..Default::default() }).await;
    let mut s = Server::start(&config(&m.base_url(), "max_concurrency = 4", ""));
    let api = s.api();
    let id = api.submit(&chat_lines(N, "m")).await;
    api.wait_for(&id, &["in_progress"], secs(20)).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (_, c) = api.post(&format!("/batches/{id}/cancel"), &json!({})).await;
    assert!(c["status"] == "cancelling" || c["status"] == "cancelled", "{c}");
    s.kill9();
    let sent = m.stats().requests;
    s.spawn();
    let api = s.api();
    let b = api.wait_for(&id, &["cancelled", "completed"], secs(20)).await;
    assert_eq!(b["status"], "cancelled", "a cancel acknowledged before a crash holds: {b}");
    let (_, err) = final_results(&api, &b, N).await;
    assert!(err.iter().any(|l| l["error"]["code"] == "batch_cancelled"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(m.stats().requests, sent, "a cancelled batch sends nothing after restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_that_expires_while_the_server_is_down_ends_expired() {
    const N: usize = 30;
    let m = mock(MockArgs { latency_ms: 1000, ..Default::default() }).await;
    let mut s = Server::start(&config(&m.base_url(), "max_concurrency = 2", ""));
    let api = s.api();
    let f = api.upload(&chat_lines(N, "m")).await;
    let b = api.create_batch(&f, json!({"completion_window": "3s"})).await;
    let id = b["id"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    s.kill9();
    tokio::time::sleep(secs(3)).await;
    let sent = m.stats().requests;
    s.spawn();
    let api = s.api();
    let b = api.wait_for(&id, &["expired", "completed"], secs(20)).await;
    assert_eq!(b["status"], "expired", "{b}");
    let (_, err) = final_results(&api, &b, N).await;
    assert!(err.iter().all(|l| l["error"]["code"] == "batch_expired"), "{err:?}");
    assert_eq!(m.stats().requests, sent, "an expired batch sends nothing after restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_is_graceful_and_repeats_nothing() {
    const N: usize = 600;
    let m = mock(MockArgs { latency_ms: 100, ..Default::default() }).await;
    let mut s = Server::start(&config(&m.base_url(), "max_concurrency = 16", ""));
    let api = s.api();
    let id = api.submit(&chat_lines(N, "m")).await;
    eventually("the batch is well under way", secs(30), || {
        let (api, id) = (api.clone(), id.clone());
        async move { (done(&api.batch(&id).await) >= 100).then_some(()) }
    })
    .await;
    let in_flight = m.stats().in_flight;
    let t0 = Instant::now();
    assert!(s.sigterm(), "SIGTERM must end batchd with exit status 0");
    let stop_took = t0.elapsed();
    let st = m.stats();
    println!("graceful stop took {stop_took:?} with {in_flight} calls in flight; {} sent", st.requests);
    assert!(stop_took < secs(10), "in-flight lines of 100 ms do not need the whole grace period: {stop_took:?}");
    assert_eq!(st.in_flight, 0, "in-flight calls were allowed to finish, not cut");
    assert!(st.requests < N as u64, "the test must stop the server mid-run");
    s.spawn();
    let api = s.api();
    let b = api.wait_for(&id, &["completed"], secs(60)).await;
    let (out, _) = final_results(&api, &b, N).await;
    assert_eq!(out.len(), N);
    let st = m.stats();
    assert_eq!(st.unique_request_ids, N as u64);
    assert_eq!(st.duplicate_request_ids, 0, "after a graceful stop no call is repeated");
}

/// The worst case of a stop, as a pod's grace period sees it: lines that hang at the upstream
/// and an upload that stalls mid-body. The engine stops at the signal while the HTTP server
/// drains, so the stop takes one grace period (10 s), not the HTTP one and then the engine's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_hung_lines_and_a_stalled_upload_stops_within_one_grace() {
    use tokio::io::AsyncWriteExt;
    let m = mock(MockArgs::default()).await;
    let mut s = Server::start(&config(&m.base_url(), "max_concurrency = 8", ""));
    let api = s.api();
    let lines: Vec<String> = (0..8).map(|i| chat_line(&format!("hang-{i}"), "m", Some(json!({"latency_ms": 120_000})))).collect();
    api.submit(&lines).await;
    eventually("8 calls hang at the upstream", secs(20), || async { (m.stats().in_flight == 8).then_some(()) }).await;
    // An upload whose body stops half-way: the HTTP server waits for it until its grace ends.
    let addr = s.url.trim_start_matches("http://").to_string();
    let mut stalled = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!("POST /v1/files HTTP/1.1\r\nhost: {addr}\r\ncontent-type: multipart/form-data; boundary=b\r\ncontent-length: 100000\r\n\r\n--b\r\n");
    stalled.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    assert!(s.sigterm(), "SIGTERM ends batchd with exit status 0");
    let took = t0.elapsed();
    println!("stop with 8 hung calls and a stalled upload took {took:?}");
    assert!(took < secs(15), "one grace period (10 s), not two: {took:?}");
    assert!(took >= secs(9), "the in-flight calls had their grace period: {took:?}");
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_with_upstream_faults_keeps_final_answers_exactly_once() {
    const N: usize = 800;
    let m = mock(MockArgs { latency_ms: 20, error_rate: 0.1, rate_429: 0.05, retry_after_s: 0.1, seed: Some(11), ..Default::default() }).await;
    let mut s = Server::start(&config(&m.base_url(), "max_concurrency = 16\nmax_attempts = 3", ""));
    let mut lines = chat_lines(N - 50, "m");
    lines.extend((0..50).map(|i| chat_line(&format!("bad-{i}"), "m", Some(json!({"status": 400})))));
    let id = s.api().submit(&lines).await;
    let mut kills = 0;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(rand::random_range(300..700))).await;
        if s.api().batch(&id).await["status"] != "in_progress" {
            break;
        }
        s.kill9();
        kills += 1;
        s.spawn();
    }
    let api = s.api();
    let b = api.wait_for(&id, &["completed"], secs(60)).await;
    let (out, err) = final_results(&api, &b, N).await;
    println!("{kills} kills; {} ok, {} errors; {} requests", out.len(), err.len(), m.stats().requests);
    assert!(kills >= 1, "the batch finished before any kill");
    let bad: Vec<&Value> = err.iter().filter(|l| l["custom_id"].as_str().unwrap().starts_with("bad-")).collect();
    assert_eq!(bad.len(), 50, "every 400 line ends in the error file once");
    assert!(bad.iter().all(|l| l["response"]["status_code"] == 400));
    for l in err.iter().filter(|l| !l["custom_id"].as_str().unwrap().starts_with("bad-")) {
        let code = l["response"]["status_code"].as_u64().unwrap_or(0);
        assert!(code == 500 || code == 429, "only retries-exhausted lines fail: {l}");
    }
}

/// Issue 15: a restart after `kill -9` in the middle of a big batch sends its next request
/// within 2 s of the process starting. Start-up releases the dead process's leases and the
/// feeder resumes the first unfinished unit from that unit's durable results alone, so the
/// time does not grow with the results already recorded (the bench checks 1,000,000 lines).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_after_kill9_mid_batch_sends_its_next_request_within_2_s() {
    const N: usize = 10_000;
    let m = mock(MockArgs::default()).await;
    let mut s = Server::start(&config(&m.base_url(), "max_concurrency = 64", ""));
    let api = s.api();
    let id = api.submit(&chat_lines(N, "m")).await;
    eventually("40 % of the lines are durable", secs(120), || {
        let (api, id) = (api.clone(), id.clone());
        async move { (done(&api.batch(&id).await) >= N as u64 * 2 / 5).then_some(()) }
    })
    .await;
    s.kill9();
    // Calls the dead process sent may still be counted by the mock: let the count settle.
    let mut before = m.stats().requests;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = m.stats().requests;
        if now == before {
            break;
        }
        before = now;
    }
    let t0 = Instant::now();
    s.spawn();
    let listening = t0.elapsed();
    eventually("the restarted server sends a request", secs(30), || async { (m.stats().requests > before).then_some(()) }).await;
    let first = t0.elapsed();
    println!("restart: listening after {listening:?}, next request after {first:?} ({before} requests before the kill)");
    assert!(first < secs(2), "the first request after the restart took {first:?}");
    let api = s.api();
    let b = api.wait_for(&id, &["completed"], secs(120)).await;
    let (out, err) = final_results(&api, &b, N).await;
    assert_exactly_once(&out, &err, N);
    assert_eq!(m.stats().unique_request_ids, N as u64);
}

/// The node row a killed process leaves must not count as a live node at restart: an embedded
/// server owns its store, so it takes an upstream's whole limit at once, not half of it until
/// the dead row's heartbeat lapses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill9_an_embedded_server_takes_the_whole_upstream_limit_at_once() {
    let m = mock(MockArgs::default()).await;
    let mut s = Server::start(&config(&m.base_url(), "max_concurrency = 8", ""));
    let limit = |url: String| async move {
        let text = reqwest::get(format!("{url}/metrics")).await.unwrap().text().await.unwrap();
        text.lines().find_map(|l| l.strip_prefix("batchd_upstream_limit{upstream=\"mock\"} ").map(|v| v.trim().parse::<f64>().unwrap()))
    };
    assert_eq!(limit(s.url.clone()).await, Some(8.0));
    tokio::time::sleep(Duration::from_millis(1500)).await; // a heartbeat or two: the node row exists
    s.kill9();
    s.spawn();
    assert_eq!(limit(s.url.clone()).await, Some(8.0), "the dead predecessor is not a live node");
}
