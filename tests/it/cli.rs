//! Black-box tests of the `batchd` command line: the real binary against the project's mock
//! upstream (in-process) and, for the client commands, against a spawned `batchd serve`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::{json, Value};

// ---------------------------------------------------------------- helpers

/// Environment variables that would change what a command does; removed from every child.
const AMBIENT: [&str; 12] = [
    "BATCHD_SERVER",
    "BATCHD_API_KEY",
    "BATCHD_UPSTREAM",
    "BATCHD_CONFIG",
    "BATCHD_LISTEN",
    "BATCHD_DATA_DIR",
    "BATCHD_CONCURRENCY",
    "BATCHD_INSECURE_NO_AUTH",
    "BATCHD_LOG",
    "OPENAI_BASE_URL",
    "OPENAI_API_KEY",
    "NO_COLOR",
];

/// `batchd` in `dir` (so no stray ./batchd.toml is read), with a clean environment.
fn cmd(dir: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.current_dir(dir);
    for k in AMBIENT {
        c.env_remove(k);
    }
    c
}

fn batchd(dir: &Path, args: &[&str]) -> Out {
    let mut c = cmd(dir);
    c.args(args);
    finish(c, Duration::from_secs(60))
}

fn write_lines(path: &Path, lines: &[String]) {
    std::fs::write(path, jsonl(lines)).unwrap();
}

fn read_jsonl(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    text.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}"))).collect()
}

fn ids(lines: &[Value]) -> BTreeSet<String> {
    lines.iter().map(|l| l["custom_id"].as_str().unwrap().to_string()).collect()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A bare request body (no custom_id/method/url).
fn bare_line(text: &str, mock: Option<Value>) -> String {
    let mut body = json!({"model": "gpt-test", "messages": [{"role": "user", "content": text}]});
    if let Some(m) = mock {
        body["mock"] = m;
    }
    body.to_string()
}

/// The answer text of an output line.
fn content(l: &Value) -> &str {
    l["response"]["body"]["choices"][0]["message"]["content"].as_str().unwrap_or_default()
}

/// Polls `f` until it holds, at most `timeout`.
fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The batch id from `run`'s first stderr line, "batch batch_X · state in DIR".
fn run_batch_id(stderr: &str) -> String {
    stderr
        .lines()
        .find_map(|l| l.strip_prefix("batch "))
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no batch line in {stderr:?}"))
        .to_string()
}

// ---------------------------------------------------------------- batchd run

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_full_format_writes_openai_lines_and_exit_code_tells_success_or_failure() {
    let m = mock(MockArgs { latency_ms: 5, ..Default::default() }).await;
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();

    // 10 lines, lines req-3 and req-7 answered 400 by the mock: exit 4.
    let lines: Vec<String> = (0..10).map(|i| chat_line(&format!("req-{i}"), "gpt-test", (i == 3 || i == 7).then(|| json!({"status": 400})))).collect();
    write_lines(&d.join("in.jsonl"), &lines);
    let (out, err) = (d.join("out.jsonl"), d.join("err.jsonl"));
    let r = batchd(d, &["run", "in.jsonl", "--upstream", &m.base_url(), "-o", p(&out), "--errors", p(&err)]);
    assert_eq!(r.code, 4, "some lines failed → exit 4: {r:?}");
    let (o, e) = (read_jsonl(&out), read_jsonl(&err));
    assert_exactly_once(&o, &e, 10);
    assert_eq!(ids(&e), BTreeSet::from(["req-3".to_string(), "req-7".to_string()]));
    for l in &o {
        let cid = l["custom_id"].as_str().unwrap();
        assert!(l["id"].as_str().unwrap().starts_with("batch_req_"), "{l}");
        assert_eq!(l["response"]["status_code"], 200, "{l}");
        assert!(l["response"]["request_id"].is_string(), "{l}");
        assert_eq!(l["response"]["body"]["object"], "chat.completion", "{l}");
        assert!(l["error"].is_null(), "{l}");
        assert_eq!(content(l), format!("echo: hello from {cid}"), "each answer belongs to its line");
    }
    for l in &e {
        assert_eq!(l["response"]["status_code"], 400, "{l}");
        assert!(l["response"]["body"]["error"]["message"].is_string(), "{l}");
    }
    // stderr is a pipe: plain progress lines, no escape codes, and a summary.
    assert!(r.stderr.lines().any(|l| l.starts_with("progress: 10/10 ")), "plain progress lines: {}", r.stderr);
    assert!(!r.stderr.contains('\x1b'), "no ANSI escapes when stderr is not a terminal: {:?}", r.stderr);
    assert!(r.stderr.contains("8 succeeded") && r.stderr.contains("2 failed"), "{}", r.stderr);
    assert!(r.stdout.is_empty(), "run writes nothing on stdout: {:?}", r.stdout);

    // Every line succeeds: exit 0 and an empty (but present) errors file.
    write_lines(&d.join("ok.jsonl"), &chat_lines(5, "gpt-test"));
    let (out2, err2) = (d.join("ok_out.jsonl"), d.join("ok_err.jsonl"));
    let r = batchd(d, &["run", "ok.jsonl", "--upstream", &m.base_url(), "-o", p(&out2), "--errors", p(&err2)]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(read_jsonl(&out2).len(), 5);
    assert_eq!(std::fs::read_to_string(&err2).unwrap(), "", "errors file exists and is empty");
    assert_eq!(m.stats().requests, 15, "each line sent once");

    // Running a finished command again sends nothing and writes the same results.
    let r = batchd(d, &["run", "ok.jsonl", "--upstream", &m.base_url(), "-o", p(&out2), "--errors", p(&err2), "-q"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.stderr, "", "--quiet prints nothing");
    assert_eq!(read_jsonl(&out2).len(), 5);
    assert_eq!(m.stats().requests, 15, "a finished run is not sent again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_bare_format_numbers_lines_physically_and_a_mixed_file_exits_3() {
    let m = mock(MockArgs::default()).await;
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // Physical lines: 1 bare, 2 blank, 3 bare, 4 bare (fails 400), 5 blank, 6 bare.
    let text = format!(
        "{}\n\n{}\n{}\n   \n{}\n",
        bare_line("first", None),
        bare_line("third", None),
        bare_line("fourth", Some(json!({"status": 400}))),
        bare_line("sixth", None)
    );
    std::fs::write(d.join("bare.jsonl"), text).unwrap();
    let r = batchd(d, &["run", "bare.jsonl", "--upstream", &m.base_url(), "-o", "out.jsonl", "--errors", "err.jsonl"]);
    assert_eq!(r.code, 4, "{r:?}");
    let (o, e) = (read_jsonl(&d.join("out.jsonl")), read_jsonl(&d.join("err.jsonl")));
    assert_exactly_once(&o, &e, 4);
    let got: BTreeMap<String, String> = o.iter().map(|l| (l["custom_id"].as_str().unwrap().to_string(), content(l).to_string())).collect();
    let want: BTreeMap<String, String> =
        [("line-1", "echo: first"), ("line-3", "echo: third"), ("line-6", "echo: sixth")].iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
    assert_eq!(got, want, "bare line N gets custom_id line-N (physical line numbers, blank lines counted)");
    assert_eq!(ids(&e), BTreeSet::from(["line-4".to_string()]));
    assert_eq!(e[0]["response"]["status_code"], 400);

    // Mixed formats: validation fails, nothing is sent, the line number is printed.
    let before = m.stats().requests;
    let mixed = [bare_line("a", None), chat_line("full-one", "gpt-test", None), bare_line("c", None)];
    write_lines(&d.join("mixed.jsonl"), &mixed);
    let r = batchd(d, &["run", "mixed.jsonl", "--upstream", &m.base_url(), "-o", "mout.jsonl", "--errors", "merr.jsonl"]);
    assert_eq!(r.code, 3, "validation errors → exit 3: {r:?}");
    assert!(r.stderr.contains("line 2:"), "the offending line number is printed: {}", r.stderr);
    assert!(r.stderr.contains("invalid_value"), "{}", r.stderr);
    assert!(!r.stderr.contains("line 1:") && !r.stderr.contains("line 3:"), "only the minority line is blamed: {}", r.stderr);
    assert_eq!(m.stats().requests, before, "nothing is sent for an invalid file");
    assert!(!d.join("mout.jsonl").exists(), "no output file for an invalid input");

    // No upstream at all: a clear error, exit 1.
    let r = batchd(d, &["run", "bare.jsonl", "-o", "x.jsonl"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("--upstream"), "{}", r.stderr);
}

/// `batchd run in.jsonl` against `m` with concurrency 4 (the command the resume tests repeat).
fn slow_run(d: &Path, m: &MockServer) -> Command {
    let mut c = cmd(d);
    c.args(["run", "in.jsonl", "--upstream", &m.base_url(), "-o", "out.jsonl", "--errors", "err.jsonl", "--concurrency", "4"]);
    c
}

/// Interrupts a run part-way with `interrupt`, runs the same command again, checks the
/// resume: every line exactly once, and at most `max_resent` lines sent a second time, each
/// of them one the first run had already sent.
/// `None` for `max_resent` asks for the durability contract's bound: only lines without a
/// durable result at the interruption may be sent again.
async fn interrupted_run_resumes(interrupt: impl FnOnce(&mut Child), want_code: i32, max_resent: Option<u64>) -> (Out, Out) {
    const N: usize = 80;
    let m = mock(MockArgs { latency_ms: 120, ..Default::default() }).await;
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    write_lines(&d.join("in.jsonl"), &chat_lines(N, "gpt-test"));

    let mut child = slow_run(d, &m).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_until("20 requests at the mock", Duration::from_secs(30), || m.stats().requests >= 20);
    interrupt(&mut child);
    let first = wait_out(child, Duration::from_secs(30));
    assert_eq!(first.code, want_code, "{first:?}");
    let before = m.stats_with(Duration::from_secs(60), true);
    let max_resent = match max_resent {
        Some(n) => n,
        None => before.unique_request_ids - durable_results(&d.join("out.batchd")).await,
    };
    let sent_first: BTreeSet<String> = before.request_id_counts.clone().unwrap_or_default().into_keys().collect();
    assert!(before.requests < N as u64, "the run was interrupted part-way ({} sent)", before.requests);
    assert!(!d.join("out.jsonl").exists(), "an interrupted run writes no output file yet");

    let second = finish(slow_run(d, &m), Duration::from_secs(60));
    assert_eq!(second.code, 0, "the resumed run completes: {second:?}");
    assert_eq!(run_batch_id(&first.stderr), run_batch_id(&second.stderr), "the same batch is resumed");
    let (o, e) = (read_jsonl(&d.join("out.jsonl")), read_jsonl(&d.join("err.jsonl")));
    assert!(e.is_empty(), "{e:?}");
    assert_exactly_once(&o, &e, N);
    for l in &o {
        assert_eq!(content(l), format!("echo: hello from {}", l["custom_id"].as_str().unwrap()));
    }
    let s = m.stats_with(Duration::from_secs(60), true);
    let resent: Vec<String> = s.request_id_counts.unwrap_or_default().into_iter().filter(|(_, n)| *n > 1).map(|(id, _)| id).collect();
    assert!(
        resent.len() as u64 <= max_resent,
        "at most {max_resent} lines may be sent again, {} were ({} sent before the interruption)",
        resent.len(),
        before.requests
    );
    assert!(resent.iter().all(|id| sent_first.contains(id)), "only lines the first run had started are sent again");
    assert_eq!(s.duplicate_request_ids, resent.len() as u64, "none more than twice");
    assert_eq!(s.unique_request_ids, N as u64, "every line was sent");
    assert_eq!(s.requests, N as u64 + s.duplicate_request_ids, "nothing else was sent again");
    eprintln!("resume: {} sent before the interruption, {} re-sent", before.requests, resent.len());
    (first, second)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_interrupted_by_ctrl_c_exits_130_and_resumes_without_resending() {
    // Ctrl-C stops cleanly: the lines in flight (120 ms each) finish within the grace period
    // and are saved, so the resumed run sends no line twice.
    let (first, _) = interrupted_run_resumes(
        |c| {
            // SAFETY: sending a signal to our own child process.
            assert_eq!(unsafe { libc::kill(c.id() as i32, libc::SIGINT) }, 0);
        },
        130,
        Some(0),
    )
    .await;
    assert!(first.stderr.contains("interrupted"), "{}", first.stderr);
    assert!(first.stderr.contains("run the same command again"), "says how to resume: {}", first.stderr);
    assert!(first.stderr.contains("lines are done and saved"), "{}", first.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_killed_with_sigkill_mid_request_resends_only_lines_without_a_durable_result() {
    // Killed ~50 ms into a 120 ms round: the lines in flight, and any answered line whose
    // group was not committed yet, are sent again; no line with a durable result is.
    interrupted_run_resumes(
        |c| {
            std::thread::sleep(Duration::from_millis(50));
            c.kill().unwrap()
        },
        -libc::SIGKILL,
        None,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_killed_with_sigkill_right_after_answers_resends_only_lines_without_a_durable_result() {
    // Killed the moment the mock sees a new round: the previous round's answers arrived
    // (their permits freed the slots) but their group may not be committed yet, so they
    // may be sent again too — and nothing else.
    interrupted_run_resumes(|c| c.kill().unwrap(), -libc::SIGKILL, None).await;
}

// ---------------------------------------------------------------- batchd validate

#[test]
fn validate_prints_each_error_with_its_line_and_a_summary() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let full = |id: &str, model: &str, extra: Value| {
        let mut body = json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        json!({"custom_id": id, "method": "POST", "url": "/v1/chat/completions", "body": body}).to_string()
    };
    let lines = [
        "this is not json".to_string(),                  // 1: invalid_json_line
        full("a", "gpt-a", json!({"max_tokens": 1000})), // 2: ok
        full("a", "gpt-a", json!({})),                   // 3: duplicate_custom_id
        String::new(),                                   // 4: blank
        full("s", "gpt-b", json!({"stream": true})),     // 5: unsupported stream
        full("c", "gpt-b", json!({"max_tokens": 500})),  // 6: ok
    ];
    write_lines(&d.join("bad.jsonl"), &lines);
    let r = batchd(d, &["validate", "bad.jsonl"]);
    assert_eq!(r.code, 3, "{r:?}");
    let errs: Vec<&str> = r.stdout.lines().filter(|l| l.starts_with("line ")).collect();
    let blamed: BTreeSet<&str> = errs.iter().map(|l| l.split(':').next().unwrap()).collect();
    assert_eq!(blamed, BTreeSet::from(["line 1", "line 3", "line 5"]), "every error with its line number: {}", r.stdout);
    assert!(errs.iter().any(|l| l.contains("[invalid_json_line]")), "{}", r.stdout);
    assert!(errs.iter().any(|l| l.starts_with("line 3:") && l.contains("[duplicate_custom_id]")), "{}", r.stdout);
    assert!(errs.iter().any(|l| l.starts_with("line 5:") && l.contains("stream")), "{}", r.stdout);
    assert!(r.stdout.contains(&format!("{} errors", errs.len())), "{}", r.stdout);
    assert!(!r.stdout.lines().any(|l| l == "valid"), "{}", r.stdout);

    // A valid file: summary with request count, models and a token estimate; exit 0.
    let good = [full("a", "gpt-a", json!({"max_tokens": 1000})), full("b", "gpt-a", json!({})), full("c", "gpt-b", json!({"max_tokens": 500}))];
    write_lines(&d.join("good.jsonl"), &good);
    let r = batchd(d, &["validate", "good.jsonl"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("3 requests"), "{}", r.stdout);
    assert!(r.stdout.contains("model gpt-a: 2 requests") && r.stdout.contains("model gpt-b: 1 request,"), "{}", r.stdout);
    let est: u64 = r
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("estimated input tokens: "))
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no token estimate: {}", r.stdout));
    let bytes = std::fs::metadata(d.join("good.jsonl")).unwrap().len();
    assert!(est <= bytes / 4 && est + 6 >= bytes / 4, "input tokens are estimated as bytes/4 ({bytes} bytes): {est}");
    assert!(r.stdout.lines().any(|l| l.contains("model gpt-a:") && l.contains("1000")), "max_tokens bound shown per model: {}", r.stdout);
    assert!(r.stdout.lines().any(|l| l == "valid"), "{}", r.stdout);
    assert!(r.stdout.contains("models were not checked"), "without --config models are not checked: {}", r.stdout);

    // With a config whose upstream lists models, an unknown model is an error naming the known ones.
    std::fs::write(d.join("batchd.toml.test"), "[[upstreams]]\nname = \"u\"\nbase_url = \"http://127.0.0.1:9/v1\"\nmodels = [\"gpt-a\", \"gpt-b\"]\n").unwrap();
    let r = batchd(d, &["validate", "good.jsonl", "--config", "batchd.toml.test"]);
    assert_eq!(r.code, 0, "known models are fine: {r:?}");
    assert!(!r.stdout.contains("models were not checked"), "{}", r.stdout);
    let unknown = [full("a", "gpt-a", json!({})), full("b", "llama-9000", json!({}))];
    write_lines(&d.join("unknown.jsonl"), &unknown);
    let r = batchd(d, &["validate", "unknown.jsonl", "--config", "batchd.toml.test"]);
    assert_eq!(r.code, 3, "{r:?}");
    let l = r.stdout.lines().find(|l| l.starts_with("line 2:")).unwrap_or_else(|| panic!("{}", r.stdout));
    assert!(l.contains("[model_not_found]") && l.contains("llama-9000"), "{l}");
    assert!(l.contains("gpt-a") && l.contains("gpt-b"), "lists the known models: {l}");
    assert!(!r.stdout.contains("line 1:"), "{}", r.stdout);

    // Bare and mixed files.
    std::fs::write(d.join("bare.jsonl"), format!("{}\n{}\n", bare_line("x", None), bare_line("y", None))).unwrap();
    let r = batchd(d, &["validate", "bare.jsonl"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("2 requests") && r.stdout.contains("bare"), "{}", r.stdout);
    write_lines(&d.join("mixed.jsonl"), &[bare_line("a", None), bare_line("b", None), full("z", "gpt-a", json!({}))]);
    let r = batchd(d, &["validate", "mixed.jsonl"]);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(r.stdout.lines().any(|l| l.starts_with("line 3:")), "{}", r.stdout);

    // A file that cannot be read: exit 1.
    let r = batchd(d, &["validate", "missing.jsonl"]);
    assert_eq!(r.code, 1, "{r:?}");
}

// ---------------------------------------------------------------- batchd retry

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_writes_exactly_the_failed_lines_filtered_by_status_or_code() {
    let m = mock(MockArgs::default()).await;
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // One attempt, short timeout: a 500 and a hang fail at once instead of being retried.
    std::fs::write(
        d.join("cfg.toml"),
        format!("[[upstreams]]\nname = \"mock\"\nbase_url = \"{}\"\nmodels = [\"*\"]\nmax_attempts = 1\ntimeout_s = 0.5\n", m.base_url()),
    )
    .unwrap();
    let lines = vec![
        chat_line("ok-1", "gpt-test", None),
        chat_line("bad-400", "gpt-test", Some(json!({"status": 400}))),
        chat_line("ok-2", "gpt-test", None),
        chat_line("bad-500", "gpt-test", Some(json!({"status": 500}))),
        chat_line("hang", "gpt-test", Some(json!({"hang": true}))),
        chat_line("ok-3", "gpt-test", None),
    ];
    write_lines(&d.join("in.jsonl"), &lines);
    let r = batchd(d, &["run", "in.jsonl", "--config", "cfg.toml", "-o", "out.jsonl", "--errors", "err.jsonl"]);
    assert_eq!(r.code, 4, "{r:?}");
    let e = read_jsonl(&d.join("err.jsonl"));
    assert_eq!(ids(&e), BTreeSet::from(["bad-400", "bad-500", "hang"].map(String::from)), "{e:?}");
    let hang = e.iter().find(|l| l["custom_id"] == "hang").unwrap();
    assert_eq!(hang["error"]["code"], "request_timeout", "{hang}");

    let retry = |name: &str, filter: &[&str]| -> Vec<String> {
        let mut args = vec!["retry", "err.jsonl", "--input", "in.jsonl", "-o", name];
        args.extend_from_slice(filter);
        let r = batchd(d, &args);
        assert_eq!(r.code, 0, "{r:?}");
        std::fs::read_to_string(d.join(name)).unwrap().lines().map(str::to_owned).collect()
    };
    assert_eq!(retry("all.jsonl", &[]), vec![lines[1].clone(), lines[3].clone(), lines[4].clone()], "every failed line, verbatim, in input order");
    assert_eq!(retry("s400.jsonl", &["--status", "400"]), vec![lines[1].clone()]);
    assert_eq!(retry("s5xx.jsonl", &["--status", "500,503"]), vec![lines[3].clone()]);
    // No failed line answered 429: exit 1, nothing written, and the message says what they failed with.
    let r = batchd(d, &["retry", "err.jsonl", "--input", "in.jsonl", "-o", "s429.jsonl", "--status", "429"]);
    assert_eq!(r.code, 1, "a filter that matches nothing is not a success: {r:?}");
    assert!(r.stderr.contains("none of the 3 failed lines in err.jsonl match --status 429"), "{}", r.stderr);
    assert!(r.stderr.contains("status 400 ×1") && r.stderr.contains("status 500 ×1"), "what they failed with: {}", r.stderr);
    assert!(!d.join("s429.jsonl").exists(), "nothing written");
    let r = batchd(d, &["retry", "err.jsonl", "--input", "in.jsonl", "-o", "s400.jsonl", "--status", "400"]);
    assert!(r.stderr.contains("1 of 3 failed lines written to s400.jsonl --status 400"), "{}", r.stderr);
    assert_eq!(retry("timeout.jsonl", &["--code", "request_timeout"]), vec![lines[4].clone()]);
    assert_eq!(retry("either.jsonl", &["--status", "400", "--code", "request_timeout"]), vec![lines[1].clone(), lines[4].clone()]);

    // Bare input: retry lines are full lines that keep custom_id line-N.
    let bare = format!("{}\n\n{}\n{}\n", bare_line("one", None), bare_line("three", Some(json!({"status": 400}))), bare_line("four", None));
    std::fs::write(d.join("bare.jsonl"), &bare).unwrap();
    let r = batchd(d, &["run", "bare.jsonl", "--config", "cfg.toml", "-o", "bout.jsonl", "--errors", "berr.jsonl"]);
    assert_eq!(r.code, 4, "{r:?}");
    let got = retry_bare(d);
    assert_eq!(got.len(), 1, "{got:?}");
    let original: Value = serde_json::from_str(bare.lines().nth(2).unwrap()).unwrap();
    assert_eq!(got[0], json!({"custom_id": "line-3", "method": "POST", "url": "/v1/chat/completions", "body": original}));
    let r = batchd(d, &["validate", "bretry.jsonl"]);
    assert_eq!(r.code, 0, "the retry file is a valid input: {r:?}");
    assert!(r.stdout.contains("full batch requests"), "{}", r.stdout);
}

fn retry_bare(d: &Path) -> Vec<Value> {
    let r = batchd(d, &["retry", "berr.jsonl", "--input", "bare.jsonl", "-o", "bretry.jsonl"]);
    assert_eq!(r.code, 0, "{r:?}");
    read_jsonl(&d.join("bretry.jsonl"))
}

// ---------------------------------------------------------------- client commands

const KEY: &str = "sk-team-cli";

/// A client command with `BATCHD_SERVER` / `BATCHD_API_KEY` from the environment.
fn client(d: &Path, s: &Server, args: &[&str]) -> Out {
    let mut c = cmd(d);
    c.args(args).env("BATCHD_SERVER", &s.url).env("BATCHD_API_KEY", KEY);
    finish(c, Duration::from_secs(60))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_commands_submit_status_download_cancel_list() {
    let m = mock(MockArgs { latency_ms: 20, ..Default::default() }).await;
    let s = Server::start(&config(&m.base_url(), "", &format!("[[tenants]]\nname = \"team\"\napi_keys = [\"{KEY}\"]")));
    let api = s.api_with_key(KEY);
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let lines: Vec<String> = (0..12).map(|i| chat_line(&format!("req-{i}"), "gpt-test", (i == 5).then(|| json!({"status": 400})))).collect();
    write_lines(&d.join("in.jsonl"), &lines);

    // Auth: a wrong key (from the environment) is refused with the server's message.
    let mut c = cmd(d);
    c.args(["submit", "in.jsonl"]).env("BATCHD_SERVER", &s.url).env("BATCHD_API_KEY", "sk-wrong");
    let r = finish(c, Duration::from_secs(30));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("401") && r.stderr.contains("Incorrect API key"), "the server's message: {}", r.stderr);
    assert!(r.stdout.is_empty(), "{r:?}");
    assert!(r.stderr.contains("check --api-key"), "the hint names the flag: {}", r.stderr);
    // No key at all: the hint says to pass --api-key (not the HTTP header).
    let mut c = cmd(d);
    c.args(["list", "--server", &s.url]);
    let r = finish(c, Duration::from_secs(30));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("pass --api-key KEY (or set BATCHD_API_KEY)"), "{}", r.stderr);
    // Flags win over the environment.
    let mut c = cmd(d);
    c.args(["list", "--server", &s.url, "--api-key", "sk-wrong"]).env("BATCHD_API_KEY", KEY);
    let r = finish(c, Duration::from_secs(30));
    assert_eq!(r.code, 1, "--api-key overrides BATCHD_API_KEY: {r:?}");
    assert!(r.stderr.contains("Incorrect API key"), "{}", r.stderr);
    let mut c = cmd(d);
    c.args(["list", "--server", &s.url]).env("BATCHD_SERVER", "http://127.0.0.1:9").env("BATCHD_API_KEY", KEY);
    let r = finish(c, Duration::from_secs(30));
    assert_eq!(r.code, 0, "--server overrides BATCHD_SERVER: {r:?}");
    // No server there: exit 1 with a message naming it.
    let mut c = cmd(d);
    c.args(["list", "--server", "http://127.0.0.1:9"]).env("BATCHD_API_KEY", KEY);
    let r = finish(c, Duration::from_secs(30));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("cannot reach the server"), "{}", r.stderr);

    // submit prints exactly the batch id on stdout.
    let r = client(d, &s, &["submit", "in.jsonl", "--metadata", "project=cli-test"]);
    assert_eq!(r.code, 0, "{r:?}");
    let id = r.stdout.trim().to_string();
    assert!(id.starts_with("batch_") && !id.contains(char::is_whitespace), "stdout is the id alone: {:?}", r.stdout);
    let b = api.batch(&id).await;
    assert_eq!(b["metadata"]["project"], "cli-test", "{b}");

    // status --watch follows until the end, with plain progress on stderr (not a terminal).
    // It exits 4: the batch completed, but one line is in the errors file.
    let r = client(d, &s, &["status", &id, "--watch"]);
    assert_eq!(r.code, 4, "{r:?}");
    assert!(r.stdout.contains(&id) && r.stdout.contains("completed") && r.stdout.contains("12/12 done, 1 failed"), "{}", r.stdout);
    assert!(r.stderr.contains("progress: 12/12"), "{}", r.stderr);
    let b = api.batch(&id).await;
    assert_eq!(b["status"], "completed", "--watch returned only when the batch ended");

    // status, and status --json (the Batch object).
    let r = client(d, &s, &["status", &id]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.starts_with(&id) && r.stdout.contains(b["output_file_id"].as_str().unwrap()), "{}", r.stdout);
    let r = client(d, &s, &["status", &id, "--json"]);
    assert_eq!(r.code, 0, "{r:?}");
    let j: Value = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("--json prints JSON: {e}: {}", r.stdout));
    assert_eq!(j["id"], id.as_str());
    assert_eq!(j["object"], "batch");
    assert_eq!(j["request_counts"], json!({"total": 12, "completed": 11, "failed": 1}));

    // download writes <id>_output.jsonl and <id>_error.jsonl (the server's names), byte for byte.
    let r = client(d, &s, &["download", &id, "-o", "results"]);
    assert_eq!(r.code, 0, "{r:?}");
    let (out, err) = (d.join("results").join(format!("{id}_output.jsonl")), d.join("results").join(format!("{id}_error.jsonl")));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), api.content(b["output_file_id"].as_str().unwrap()).await);
    assert_eq!(std::fs::read_to_string(&err).unwrap(), api.content(b["error_file_id"].as_str().unwrap()).await);
    let (o, e) = (read_jsonl(&out), read_jsonl(&err));
    assert_exactly_once(&o, &e, 12);
    assert_eq!(ids(&e), BTreeSet::from(["req-5".to_string()]));
    assert!(r.stdout.contains(&format!("{id}_output.jsonl")), "prints the paths written: {}", r.stdout);

    // cancel a batch whose lines never answer; --watch ends at cancelled.
    let hanging: Vec<String> = (0..6).map(|i| chat_line(&format!("slow-{i}"), "gpt-test", Some(json!({"hang": true})))).collect();
    write_lines(&d.join("slow.jsonl"), &hanging);
    let r = client(d, &s, &["submit", "slow.jsonl"]);
    assert_eq!(r.code, 0, "{r:?}");
    let slow = r.stdout.trim().to_string();
    api.wait_for(&slow, &["in_progress"], Duration::from_secs(20)).await;
    let r = client(d, &s, &["cancel", &slow]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains(&slow) && (r.stdout.contains("cancelling") || r.stdout.contains("cancelled")), "{}", r.stdout);
    let r = client(d, &s, &["status", &slow, "--watch"]);
    assert_eq!(r.code, 4, "a cancelled batch is not a success: {r:?}");
    assert!(r.stdout.contains("cancelled"), "{}", r.stdout);
    let r = client(d, &s, &["download", &slow, "-o", "results"]);
    assert_eq!(r.code, 0, "{r:?}");
    let e = read_jsonl(&d.join("results").join(format!("{slow}_error.jsonl")));
    assert_eq!(e.len(), 6, "every cancelled line is in the errors file: {e:?}");
    assert!(e.iter().all(|l| l["error"]["code"] == "batch_cancelled"), "{e:?}");

    // A batch that failed validation: errors without a line number print without "line null".
    std::fs::write(d.join("empty.jsonl"), "\n\n").unwrap();
    let r = client(d, &s, &["submit", "empty.jsonl"]);
    assert_eq!(r.code, 0, "{r:?}");
    let empty = r.stdout.trim().to_string();
    api.wait_for(&empty, &["failed"], Duration::from_secs(20)).await;
    let r = client(d, &s, &["status", &empty]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("[empty_file]"), "{}", r.stdout);
    let r = client(d, &s, &["status", &empty, "--watch"]);
    assert_eq!(r.code, 4, "a batch that failed validation is not a success: {r:?}");
    assert!(!r.stdout.contains("null"), "no \"line null\" for a file-level error: {}", r.stdout);
    // ... and download says there is nothing to download.
    let r = client(d, &s, &["download", &empty, "-o", "results"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("no result files"), "{}", r.stderr);

    // cancel of a batch that had already ended: says so, exit 1.
    let r = client(d, &s, &["cancel", &id]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains(&format!("batch {id} had already ended (completed): nothing to cancel")), "{}", r.stderr);

    // A batch with 40 invalid lines: `status` prints each error, `list` only the first and a count.
    let junk: Vec<String> = (0..40).map(|i| format!("not json {i}")).collect();
    write_lines(&d.join("junk.jsonl"), &junk);
    let r = client(d, &s, &["submit", "junk.jsonl"]);
    let junk_id = r.stdout.trim().to_string();
    api.wait_for(&junk_id, &["failed"], Duration::from_secs(20)).await;
    let r = client(d, &s, &["status", &junk_id]);
    assert_eq!(r.stdout.matches("[invalid_json_line]").count(), 40, "{}", r.stdout);

    // list: newest first, --limit honoured, one error per failed batch.
    let r = client(d, &s, &["list"]);
    assert_eq!(r.code, 0, "{r:?}");
    let listed: Vec<&str> = r.stdout.lines().filter(|l| l.starts_with("batch_")).map(|l| l.split_whitespace().next().unwrap()).collect();
    assert_eq!(listed, vec![junk_id.as_str(), empty.as_str(), slow.as_str(), id.as_str()], "{}", r.stdout);
    assert_eq!(r.stdout.matches("[invalid_json_line]").count(), 1, "{}", r.stdout);
    assert!(r.stdout.contains(&format!("… and 39 more errors: batchd status {junk_id}")), "{}", r.stdout);
    let r = client(d, &s, &["list", "--limit", "1"]);
    assert_eq!(r.stdout.lines().filter(|l| l.starts_with("batch_")).count(), 1, "{}", r.stdout);

    // Every line answered 2xx: --watch exits 0.
    write_lines(&d.join("good.jsonl"), &lines[..5]);
    let r = client(d, &s, &["submit", "good.jsonl"]);
    assert_eq!(r.code, 0, "{r:?}");
    let r = client(d, &s, &["status", r.stdout.trim(), "--watch"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("5/5 done, 0 failed"), "{}", r.stdout);

    // Unknown batch: exit 1 and the server's message.
    let r = client(d, &s, &["status", "batch_doesnotexist"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("404") && r.stderr.contains("batch_doesnotexist"), "{}", r.stderr);
    m.shutdown().await;
}

// ---------------------------------------------------------------- --help

#[test]
fn help_of_every_subcommand_has_examples_and_exit_codes() {
    let tmp = tempfile::tempdir().unwrap();
    // (subcommand, strings its help must contain beyond "Examples:")
    let cases: [(&str, &[&str]); 11] = [
        ("serve", &[]),
        ("mock-upstream", &[]),
        ("run", &["Exit codes", "130", "resume", "line-N"]),
        ("validate", &["Exit codes", "3 it has errors"]),
        ("retry", &["Exit codes", "--status", "--code"]),
        ("submit", &["Exit codes"]),
        ("status", &["Exit codes", "--watch"]),
        ("download", &["Exit codes"]),
        ("cancel", &["Exit codes"]),
        ("list", &["Exit codes"]),
        ("health", &["Exit codes", "/healthz"]),
    ];
    for (sub, wants) in cases {
        let r = batchd(tmp.path(), &[sub, "--help"]);
        assert_eq!(r.code, 0, "{sub} --help: {r:?}");
        assert!(r.stdout.contains("Examples:"), "{sub} --help has Examples:\n{}", r.stdout);
        assert!(r.stdout.contains(&format!("batchd {sub} ")), "{sub}'s examples use it:\n{}", r.stdout);
        for w in wants {
            assert!(r.stdout.contains(w), "{sub} --help mentions {w:?}:\n{}", r.stdout);
        }
        let undescribed = undescribed_args(&r.stdout);
        assert!(undescribed.is_empty(), "{sub} --help: {undescribed:?} have no description:\n{}", r.stdout);
    }
    for sub in ["status", "download", "cancel"] {
        let r = batchd(tmp.path(), &[sub, "--help"]);
        assert!(r.stdout.contains("<ID>") && r.stdout.contains("The batch id (batch_…)"), "{sub}: <ID> is described:\n{}", r.stdout);
    }
    let r = batchd(tmp.path(), &["run", "--help"]);
    for code in ["0 ", "1 ", "3 ", "4 ", "130 "] {
        assert!(r.stdout.contains(code), "run documents exit code {code}:\n{}", r.stdout);
    }
    let r = batchd(tmp.path(), &["frobnicate"]);
    assert_eq!(r.code, 2, "bad usage is exit 2: {r:?}");
}

/// The arguments and options of a `--help` text that have no description: clap prints one after
/// the name on the same line, or (when long) on the next, more indented line; a lone
/// `[default: …]` or `[env: …]` is no description.
fn undescribed_args(help: &str) -> Vec<String> {
    let lines: Vec<&str> = help.lines().collect();
    let mut missing = vec![];
    for (i, l) in lines.iter().enumerate() {
        let t = l.trim_start();
        if !(l.starts_with("  ") && (t.starts_with('-') || t.starts_with('<'))) {
            continue;
        }
        let same_line = t.split("  ").map(str::trim).filter(|p| !p.is_empty()).nth(1);
        let next_line = lines.get(i + 1).filter(|n| n.len() - n.trim_start().len() > l.len() - t.len()).map(|n| n.trim());
        let described = same_line.or(next_line).is_some_and(|d| !d.starts_with('['));
        if !described {
            missing.push(t.to_string());
        }
    }
    missing
}

// ---------------------------------------------------------------- the progress bar on a terminal

/// 80 columns: the progress display must fit a classic terminal without wrapping.
const PTY_COLS: u16 = 80;

/// A very small terminal, `PTY_COLS` wide with auto-wrap: enough of VT100 to show what
/// indicatif draws.
struct Screen {
    rows: Vec<Vec<char>>,
    row: usize,
    col: usize,
}

impl Screen {
    fn render(bytes: &[u8]) -> Screen {
        let text = String::from_utf8_lossy(bytes);
        let mut s = Screen { rows: vec![vec![]], row: 0, col: 0 };
        let mut it = text.chars().peekable();
        while let Some(c) = it.next() {
            match c {
                '\x1b' => {
                    if it.peek() == Some(&'[') {
                        it.next();
                        let mut params = String::new();
                        let mut fin = ' ';
                        for c in it.by_ref() {
                            if ('\x40'..='\x7e').contains(&c) {
                                fin = c;
                                break;
                            }
                            params.push(c);
                        }
                        s.csi(&params, fin);
                    } else {
                        it.next();
                    }
                }
                '\r' => s.col = 0,
                '\n' => s.newline(),
                c if c.is_control() => {}
                c => {
                    if s.col >= PTY_COLS as usize {
                        // Deferred wrap: a character after the last column starts the next row.
                        s.newline();
                        s.col = 0;
                    }
                    let line = &mut s.rows[s.row];
                    if line.len() <= s.col {
                        line.resize(s.col + 1, ' ');
                    }
                    line[s.col] = c;
                    s.col += 1;
                }
            }
        }
        s
    }

    fn newline(&mut self) {
        self.row += 1;
        if self.rows.len() <= self.row {
            self.rows.push(vec![]);
        }
    }

    fn csi(&mut self, params: &str, fin: char) {
        let n = params.trim_start_matches('?').parse::<usize>().unwrap_or(0);
        match fin {
            'A' => self.row = self.row.saturating_sub(n.max(1)),
            'B' => {
                self.row += n.max(1);
                while self.rows.len() <= self.row {
                    self.rows.push(vec![]);
                }
            }
            'G' => self.col = n.saturating_sub(1),
            'C' => self.col += n.max(1),
            'K' => {
                let line = &mut self.rows[self.row];
                match n {
                    0 => line.truncate(self.col),
                    1 => line.iter_mut().take(self.col + 1).for_each(|c| *c = ' '),
                    _ => line.clear(),
                }
            }
            'J' if n == 0 => {
                self.rows[self.row].truncate(self.col);
                self.rows.truncate(self.row + 1);
            }
            _ => {}
        }
    }

    fn lines(&self) -> Vec<String> {
        self.rows.iter().map(|r| r.iter().collect::<String>().trim_end().to_string()).filter(|l| !l.is_empty()).collect()
    }
}

/// What a progress line shows: done/total.
fn counts(line: &str) -> Option<(u64, u64)> {
    line.split_whitespace().find_map(|w| {
        let (a, b) = w.split_once('/')?;
        Some((a.parse().ok()?, b.parse().ok()?))
    })
}

/// The child's terminal output, collected by a reader thread.
struct Pty {
    buf: Arc<Mutex<Vec<u8>>>,
    reader: std::thread::JoinHandle<()>,
}

impl Pty {
    /// Spawns `c` with a new pseudo-terminal (`PTY_COLS` x 50) as stdin, stdout and stderr.
    fn spawn(mut c: Command) -> (Child, Pty) {
        let (mut master, mut slave) = (0, 0);
        let ws = libc::winsize { ws_row: 50, ws_col: PTY_COLS, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: openpty writes two fresh descriptors we then own.
        let rc = unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), &ws) };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: the descriptors are ours alone, each wrapped once.
        let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        c.stdin(slave.try_clone().unwrap()).stdout(slave.try_clone().unwrap()).stderr(slave).env("TERM", "xterm-256color");
        let child = c.spawn().expect("spawn batchd on a pty");
        drop(c); // closes our copies of the slave: the master reads EOF/EIO when the child is gone
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        let mut master = std::fs::File::from(master);
        let reader = std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = master.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
        });
        (child, Pty { buf, reader })
    }

    fn raw(&self) -> Vec<u8> {
        self.buf.lock().unwrap().clone()
    }

    fn screen(&self) -> Vec<String> {
        Screen::render(&self.raw()).lines()
    }

    /// The last rendered progress line, if any.
    fn bar(&self) -> Option<String> {
        self.screen().into_iter().rev().find(|l| counts(l).is_some() && l.contains("ETA"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_bar_on_a_terminal_shows_counts_rate_and_eta_and_moves() {
    const N: usize = 300;
    let m = mock(MockArgs { latency_ms: 50, ..Default::default() }).await;
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let lines: Vec<String> = (0..N).map(|i| bare_line(&format!("q{i}"), None)).collect();
    write_lines(&d.join("in.jsonl"), &lines);
    let mut c = cmd(d);
    c.args(["run", "in.jsonl", "--upstream", &m.base_url(), "-o", "out.jsonl", "--errors", "err.jsonl", "--concurrency", "4"]);
    let (mut child, pty) = Pty::spawn(c);

    // First snapshot: the run is under way.
    let mut first = String::new();
    wait_until("a progress bar with some lines done", Duration::from_secs(30), || {
        first = pty.bar().unwrap_or_default();
        counts(&first).is_some_and(|(done, _)| done >= 10)
    });
    let (done1, total1) = counts(&first).unwrap();
    // Second snapshot, a second later: the counts moved, on the same screen line.
    std::thread::sleep(Duration::from_millis(1000));
    let screen = pty.screen();
    let second = pty.bar().unwrap();
    let (done2, total2) = counts(&second).unwrap();
    assert_eq!((total1, total2), (N as u64, N as u64), "the bar shows done/total: {first:?} {second:?}");
    assert!(done2 > done1, "the counts move: {first:?} then {second:?}");
    assert!(done2 < N as u64, "the run is still going (else this test learns nothing): {second:?}");
    let rate: f64 =
        second.split(" · ").find_map(|p| p.strip_suffix(" req/s")).and_then(|r| r.parse().ok()).unwrap_or_else(|| panic!("req/s on the bar: {second:?}"));
    assert!(rate > 0.0, "a real rate mid-run: {second:?}");
    // The details on the line below: counts and tokens/s, measured over the same moments as
    // req/s (the mock answers 16 completion tokens a line).
    let row = screen.iter().position(|l| *l == second).unwrap();
    let details = screen.get(row + 1).unwrap_or_else(|| panic!("a details line under the bar:\n{}", screen.join("\n")));
    assert!(details.trim_start().starts_with("done ") && details.contains(" · failed 0"), "{details:?}");
    let tok: f64 =
        details.split(" · ").find_map(|p| p.strip_suffix(" tok/s")).and_then(|r| r.parse().ok()).unwrap_or_else(|| panic!("tok/s in the details: {details:?}"));
    assert!((8.0..=32.0).contains(&(tok / rate)), "tok/s and req/s describe the same moments (16 tokens a line): {tok} / {rate}");
    let eta = second.split(" · ").find_map(|p| p.strip_prefix("ETA ")).unwrap_or_else(|| panic!("ETA on the bar: {second:?}"));
    assert!(eta.ends_with('s') && eta[..eta.len() - 1].chars().any(|c| c.is_ascii_digit()), "an ETA in time units mid-run: {second:?}");
    eprintln!("snapshot 1: {first}\nsnapshot 2: {second}");
    let bars = screen.iter().filter(|l| counts(l).is_some() && l.contains("ETA")).count();
    assert_eq!(bars, 1, "the bar redraws in place, it does not scroll:\n{}", screen.join("\n"));
    assert_eq!(screen.len(), 3, "mid-run the screen is the batch line, the bar and its details, none wrapped:\n{}", screen.join("\n"));
    for l in &screen {
        assert!(l.chars().count() < PTY_COLS as usize, "a line fits {PTY_COLS} columns: {l:?}");
    }
    assert!(screen[0].starts_with("batch batch_"), "{screen:?}");

    let code = wait_code(&mut child, Duration::from_secs(60));
    pty.reader.join().unwrap();
    assert_eq!(code, 0);
    let raw = String::from_utf8_lossy(&pty.buf.lock().unwrap()).into_owned();
    assert!(raw.contains('\x1b'), "a terminal gets escape codes (a live bar)");
    assert!(!raw.contains("progress: "), "no plain progress lines on a terminal");
    // Every frame drawn: a full bar only when every line is done (no flash of a full bar
    // while the total is still unknown).
    for frame in raw.split('\r').map(|f| Screen::render(f.as_bytes()).lines().join(" ")) {
        if frame.contains(&"=".repeat(30)) {
            assert_eq!(counts(&frame), Some((N as u64, N as u64)), "a full bar before the end: {frame:?}");
        }
    }
    let screen = Screen::render(raw.as_bytes()).lines();
    eprintln!("final screen:\n{}", screen.join("\n"));
    let last = screen.iter().rev().find(|l| counts(l).is_some()).unwrap_or_else(|| panic!("final bar:\n{}", screen.join("\n")));
    assert_eq!(counts(last), Some((N as u64, N as u64)), "the final screen shows the total done:\n{}", screen.join("\n"));
    assert!(last.contains("completed in ") && last.contains(" req/s avg"), "the final bar says how long it took and the average rate: {last:?}");
    assert_eq!(screen.len(), 5, "the final screen is the batch line, the finished bar, its details and the summary (two lines):\n{}", screen.join("\n"));
    assert_eq!(&screen[1], last);
    assert!(screen[2].trim_start().starts_with(&format!("done {N} · failed 0")), "{:?}", screen[2]);
    assert!(screen[3].starts_with(&format!("completed: {N} succeeded")), "summary on its own line:\n{}", screen.join("\n"));
    assert!(screen[4].starts_with("tokens: ") && screen[4].contains(" in, "), "{:?}", screen[4]);
    for l in &screen {
        assert!(l.chars().count() < PTY_COLS as usize, "a line fits {PTY_COLS} columns: {l:?}");
    }
    assert_eq!(read_jsonl(&d.join("out.jsonl")).len(), N);
}

/// Results durable in a `batchd run` state directory (read after the process is gone).
async fn durable_results(state: &Path) -> u64 {
    use batchd::store::{prelude::*, BatchStatus};
    let store = batchd::store::sqlite::SqliteStore::open(&state.join("batchd.db")).await.unwrap();
    let mut n = 0;
    for (id, _) in store.batches_in(&BatchStatus::ALL).await.unwrap() {
        let b = store.get_batch(None, &id).await.unwrap();
        n += (b.completed + b.failed) as u64;
    }
    n
}

#[test]
fn validate_estimates_cost_from_configured_prices() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let body = |model: &str| json!({"model": model, "messages": [{"role": "user", "content": "x".repeat(396)}], "max_tokens": 100});
    let lines: Vec<String> =
        (0..10).map(|i| json!({"custom_id": format!("c{i}"), "method": "POST", "url": "/v1/chat/completions", "body": body("priced")}).to_string()).collect();
    write_lines(&d.join("in.jsonl"), &lines);
    let per_line_input = lines[0].len() as f64 / 4.0;
    std::fs::write(
        d.join("prices.toml"),
        "[[upstreams]]\nname = \"u\"\nbase_url = \"http://127.0.0.1:9/v1\"\nmodels = [\"priced\"]\n\n[prices.priced]\ninput_per_million = 1000.0\noutput_per_million = 2000.0\n",
    )
    .unwrap();
    let r = batchd(d, &["validate", "in.jsonl", "--config", "prices.toml"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("model priced: 10 requests"), "{}", r.stdout);
    assert!(r.stdout.contains("≤1000 output tokens"), "max_tokens are summed: {}", r.stdout);
    let want = (10.0 * per_line_input.floor() * 1000.0 + 1000.0 * 2000.0) / 1e6;
    let line = r.stdout.lines().find(|l| l.starts_with("estimated cost:")).unwrap_or_else(|| panic!("no cost line: {}", r.stdout));
    let got: f64 = line.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert!((got - want).abs() < 0.01, "cost {got} != {want}");
    let without = batchd(d, &["validate", "in.jsonl"]);
    assert!(!without.stdout.contains("estimated cost"), "no prices, no cost: {}", without.stdout);

    // batch_discount: the estimate is at the batch price, and says the full one.
    let discounted = std::fs::read_to_string(d.join("prices.toml")).unwrap() + "batch_discount = 0.5\n";
    std::fs::write(d.join("discount.toml"), discounted).unwrap();
    let r = batchd(d, &["validate", "in.jsonl", "--config", "discount.toml"]);
    let line = r.stdout.lines().find(|l| l.starts_with("estimated cost:")).unwrap_or_else(|| panic!("no cost line: {}", r.stdout));
    let got: f64 = line.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert!((got - want * 0.5).abs() < 0.01, "half price with batch_discount = 0.5: {got} != {}: {line}", want * 0.5);
    assert!(line.contains(&format!("{want:.4} without batch_discount")), "{line}");

    // One line without max_tokens: "1 request" (not "1 requests"), and its output is not bounded (not "≤0").
    let one = json!({"custom_id": "c", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "priced", "messages": []}});
    write_lines(&d.join("one.jsonl"), &[one.to_string()]);
    let r = batchd(d, &["validate", "one.jsonl", "--config", "discount.toml"]);
    assert!(r.stdout.starts_with("1 request ·") && r.stdout.contains("model priced: 1 request,"), "{}", r.stdout);
    assert!(r.stdout.contains("output tokens not bounded (no max_tokens)") && !r.stdout.contains("≤0"), "{}", r.stdout);
    assert!(r.stdout.contains("output of lines without max_tokens not counted"), "{}", r.stdout);

    // A missing input file is named.
    let r = batchd(d, &["validate", "nosuch.jsonl"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("reading nosuch.jsonl") && r.stderr.contains("No such file"), "{}", r.stderr);
}

/// A configuration batchd cannot use is refused before anything starts, with exit code 1 and
/// one `error:` line that says what to fix (issue #19): a zero `BATCHD_CONCURRENCY` (it used
/// to become 1), a `BATCHD_LOG` that is no filter (it used to be ignored), a tenant named
/// twice (merged), a tenant without keys, a price that is not a number (NaN); and a file that
/// does not parse says its cause once (it used to say it twice).
#[test]
fn bad_configurations_are_refused_with_one_clear_message() {
    let d = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = d.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    let twice = write("twice.toml", "[[tenants]]\nname = \"a\"\napi_keys = [\"k1\"]\n[[tenants]]\nname = \"a\"\napi_keys = [\"k2\"]\n");
    let keyless = write("keyless.toml", "[[tenants]]\nname = \"a\"\napi_keys = [\"k1\"]\n[[tenants]]\nname = \"b\"\n");
    let nan = write("nan.toml", "[prices.m]\ninput_per_million = nan\n");
    let typo = write("typo.toml", "[server]\nlisen = \"127.0.0.1:1\"\n");
    type Case<'a> = (Vec<(&'a str, &'a str)>, Vec<&'a str>, &'a str);
    let cases: Vec<Case> = vec![
        (
            vec![("BATCHD_CONCURRENCY", "0")],
            vec!["--upstream", "http://127.0.0.1:9/v1"],
            "max_concurrency (--concurrency, BATCHD_CONCURRENCY) must be at least 1",
        ),
        (vec![("BATCHD_LOG", "batchd=[[[")], vec![], "BATCHD_LOG=\"batchd=[[[\" is not a log filter"),
        (vec![], vec!["--config", &twice], "two [[tenants]] are named \"a\""),
        (vec![], vec!["--config", &keyless], "tenant \"b\" has no api_keys"),
        (vec![], vec!["--config", &nan], "prices must be finite numbers >= 0"),
        (vec![], vec!["--config", &typo], "unknown field `lisen`"),
    ];
    for (env, args, want) in cases {
        let mut c = cmd(d.path());
        c.args(["serve", "--print-config"]).args(&args).envs(env.iter().copied());
        let out = finish(c, Duration::from_secs(30));
        assert_eq!(out.code, 1, "{env:?} {args:?}: {out:?}");
        assert!(out.stderr.contains(want), "{env:?} {args:?}: {}", out.stderr);
        assert_eq!(out.stderr.matches(want).count(), 1, "said once: {}", out.stderr);
        assert_eq!(out.stderr.matches("error:").count(), 1, "one message: {}", out.stderr);
        assert!(out.stdout.is_empty(), "nothing printed as if it worked: {}", out.stdout);
    }
}

// ---------------------------------------------------------------- serve with no upstream

/// `serve` with no upstream refuses a batch at create with one 400 that names the model and
/// says what to do (not one `model_not_found` per line later); with `OPENAI_BASE_URL` set it
/// takes that upstream (and `OPENAI_API_KEY`), as every OpenAI-compatible tool does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_without_upstream_refuses_at_create_or_takes_openai_base_url() {
    let bare = Server::start_with("", &[], &[]);
    let api = bare.api();
    let file = api.upload(&chat_lines(100, "gpt-4o-mini")).await;
    let (code, body) = api.post("/batches", &json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "24h"})).await;
    assert_eq!(code, 400, "{body}");
    assert_envelope(&body);
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.starts_with("no upstream serves model \"gpt-4o-mini\""), "{msg}");
    assert!(msg.contains("--upstream URL") && msg.contains("README"), "{msg}");
    assert_eq!(body["error"]["code"], "model_not_found", "{body}");
    let (_, list) = api.get("/batches").await;
    assert_eq!(list["data"].as_array().map(Vec::len), Some(0), "nothing was created: {list}");

    let m = mock(MockArgs::default()).await;
    let env = [("OPENAI_BASE_URL".to_string(), m.base_url()), ("OPENAI_API_KEY".to_string(), "sk-from-env".to_string())];
    let s = Server::start_with("", &[], &env);
    let api = s.api();
    let id = api.submit(&chat_lines(5, "gpt-4o-mini")).await;
    let b = api.wait_for(&id, &["completed"], secs(30)).await;
    assert_eq!(b["request_counts"]["completed"], 5, "{b}");
    let mut c = cmd(&s.dir);
    c.args(["serve", "--print-config"]).envs(env.iter().cloned());
    let cfg = finish(c, secs(20));
    assert!(cfg.stdout.contains(&m.base_url()) && cfg.stdout.contains("OPENAI_API_KEY"), "the upstream and its key variable: {}", cfg.stdout);
}
