//! Black-box tests of the HTTP API: the real binary, real SQLite, real HTTP.

use std::time::Duration;

use crate::common::*;
use serde_json::{json, Value};

#[tokio::test]
async fn classic_flow_upload_create_poll_download() {
    let m = mock(MockArgs { latency_ms: 5, ..Default::default() }).await;
    let s = spawn_app(&config(&m.base_url(), "", ""));
    let api = s.api();
    let id = api.submit(&chat_lines(30, "gpt-test")).await;
    let b = api.wait_for(&id, &["completed"], Duration::from_secs(30)).await;
    assert_eq!(b["request_counts"], json!({"total": 30, "completed": 30, "failed": 0}));
    assert_eq!(b["model"], "gpt-test");
    assert!(b["error_file_id"].is_null());
    let (out, err) = api.results(&b).await;
    assert!(err.is_empty());
    assert_exactly_once(&out, &err, 30);
    for l in &out {
        assert!(l["id"].as_str().unwrap().starts_with("batch_req_"));
        assert_eq!(l["response"]["status_code"], 200);
        assert!(l["error"].is_null());
        let cid = l["custom_id"].as_str().unwrap();
        let content = l["response"]["body"]["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(content.contains(&format!("hello from {cid}")), "answer belongs to its line: {content}");
    }
    let u = &b["usage"];
    assert!(u["input_tokens"].as_i64().unwrap() > 0);
    assert_eq!(u["total_tokens"].as_i64().unwrap(), u["input_tokens"].as_i64().unwrap() + u["output_tokens"].as_i64().unwrap());
    let (ip, fz, done) = (b["in_progress_at"].as_i64().unwrap(), b["finalizing_at"].as_i64().unwrap(), b["completed_at"].as_i64().unwrap());
    assert!(b["created_at"].as_i64().unwrap() <= ip && ip <= fz && fz <= done);
    assert_eq!(m.stats().requests, 30);
}

#[tokio::test]
async fn every_endpoint_answers_bad_input_with_the_envelope_and_harms_nothing() {
    let m = mock(MockArgs::default()).await;
    let s = spawn_app(&config(&m.base_url(), "", "[limits]\nmax_upload_bytes = 1000"));
    let api = s.api();
    let keep = api.upload(&chat_lines(2, "m")).await;
    let before = api.content(&keep).await;
    let cases: Vec<(u16, (u16, Value))> = vec![
        (404, api.get("/files/file-nope").await),
        (404, api.get("/batches/batch_nope").await),
        (404, api.get("/nothing/here").await),
        (400, api.post("/batches", &json!({"endpoint": 5})).await),
        (400, api.post("/batches", &json!({"input_file_id": keep, "endpoint": "/v1/images", "completion_window": "24h"})).await),
        (400, api.post("/batches", &json!({"input_file_id": keep, "endpoint": "/v1/chat/completions", "completion_window": "48h"})).await),
        (404, api.post("/batches", &json!({"input_file_id": "file-missing", "endpoint": "/v1/chat/completions", "completion_window": "24h"})).await),
        (400, api.get("/files?limit=0").await),
        (400, api.get("/files?order=sideways").await),
        (400, api.get("/batches?limit=101").await),
        (400, api.upload_as(b"{}".to_vec(), "nonsense", "x.jsonl").await),
        (413, api.upload_as(vec![b'x'; 5000], "batch", "big.jsonl").await),
    ];
    for (want, (got, body)) in cases {
        assert_eq!(got, want, "{body}");
        assert_envelope(&body);
    }
    let r = api.http.post(format!("{}/batches", api.base)).header("content-type", "application/json").body("{not json").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert_envelope(&r.json().await.unwrap());
    let r =
        api.http.post(format!("{}/files", api.base)).header("content-type", "multipart/form-data; boundary=XYZ").body("--XYZ\r\nbroken").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert_envelope(&r.json().await.unwrap());
    assert_eq!(api.content(&keep).await, before, "stored file intact");
    let (_, list) = api.get("/files").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1, "no half-uploaded file was listed: {list}");
}

/// Every kind of malformed input file fails validation with its line number, sends nothing
/// upstream, and leaves what was stored before untouched.
#[tokio::test]
async fn malformed_files_fail_validation_with_line_numbers_and_harm_nothing() {
    let m = mock(MockArgs::default()).await;
    let limits = "[limits]\nmax_lines = 5\nmax_line_bytes = 2000\nmax_file_bytes = 20000";
    let s = spawn_app(&config(&m.base_url(), "", limits));
    let api = s.api();
    let good = api.submit(&chat_lines(3, "m")).await;
    let good = api.wait_for(&good, &["completed"], Duration::from_secs(20)).await;
    let good_output = api.content(good["output_file_id"].as_str().unwrap()).await;
    m.reset_stats();

    let ok = chat_line("ok", "m", None);
    type Case<'a> = (&'a str, Vec<u8>, Vec<(&'a str, Option<u64>)>);
    let cases: Vec<Case> = vec![
        ("truncated JSON", format!("{ok}\n{}\n", &ok[..ok.len() / 2]).into_bytes(), vec![("invalid_json_line", Some(2))]),
        (
            "wrong types",
            format!("{ok}\n{}\n", r#"{"custom_id":7,"method":"POST","url":"/v1/chat/completions","body":"x"}"#).into_bytes(),
            vec![("invalid_value", Some(2)), ("invalid_value", Some(2))],
        ),
        ("huge line", format!("{ok}\n{}\n", chat_line("big", &"m".repeat(3000), None)).into_bytes(), vec![("line_too_large", Some(2))]),
        ("invalid UTF-8", [ok.as_bytes(), b"\n{\"custom_id\":\"\xff\xfe\",\"method\":\"POST\"}\n"].concat(), vec![("invalid_json_line", Some(2))]),
        ("empty file", vec![], vec![("empty_file", None)]),
        ("only blank lines", b"\n  \n\r\n".to_vec(), vec![("empty_file", None)]),
        ("duplicate ids", format!("{ok}\n\n{ok}\n").into_bytes(), vec![("duplicate_custom_id", Some(3))]),
        ("one line over the limit", jsonl(&chat_lines(6, "m")).into_bytes(), vec![("too_many_requests", Some(6))]),
        (
            "file over the byte limit",
            jsonl(&(0..200).map(|i| chat_line(&format!("{i}"), "m", None)).collect::<Vec<_>>()).into_bytes(),
            vec![("file_too_large", None)],
        ),
        ("a JSON array line", format!("{ok}\n[1,2]\n").into_bytes(), vec![("invalid_json_line", Some(2))]),
    ];
    for (what, bytes, want) in cases {
        let (st, f) = api.upload_as(bytes, "batch", "bad.jsonl").await;
        assert_eq!(st, 200, "{what}: {f}");
        let b = api.create_batch(f["id"].as_str().unwrap(), json!({})).await;
        let b = api.wait_for(b["id"].as_str().unwrap(), &["failed", "completed"], Duration::from_secs(20)).await;
        assert_eq!(b["status"], "failed", "{what}: {b}");
        assert!(b["failed_at"].is_i64(), "{what}");
        let got: Vec<(String, Option<u64>)> =
            b["errors"]["data"].as_array().unwrap().iter().map(|e| (e["code"].as_str().unwrap().to_string(), e["line"].as_u64())).collect();
        let want: Vec<(String, Option<u64>)> = want.into_iter().map(|(c, l)| (c.to_string(), l)).collect();
        assert_eq!(got, want, "{what}: {b}");
        for e in b["errors"]["data"].as_array().unwrap() {
            assert!(!e["message"].as_str().unwrap().is_empty(), "{what}: every error says what is wrong");
        }
    }
    assert_eq!(m.stats().requests, 0, "nothing is sent upstream for a failed batch");
    let after = api.batch(good["id"].as_str().unwrap()).await;
    assert_eq!(after, good, "a finished batch is unchanged");
    assert_eq!(api.content(good["output_file_id"].as_str().unwrap()).await, good_output);
}

/// Extensions: partial results while the batch runs, per-request lookup, live progress.
#[tokio::test]
async fn partial_results_and_request_lookup_while_running() {
    let m = mock(MockArgs::default()).await;
    let s = spawn_app(&config(&m.base_url(), "", ""));
    let api = s.api();
    let mut lines = chat_lines(5, "m");
    lines.push(chat_line("slow", "m", Some(json!({"latency_ms": 3000}))));
    lines.push(chat_line("bad", "m", Some(json!({"status": 400}))));
    let id = api.submit(&lines).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let b = loop {
        let b = api.batch(&id).await;
        if b["request_counts"]["completed"] == 5 && b["request_counts"]["failed"] == 1 {
            break b;
        }
        assert!(std::time::Instant::now() < deadline, "fast lines never became durable: {b}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(b["status"], "in_progress", "the slow line is still running");
    assert!(b["progress"].is_object(), "progress extension while running: {b}");
    let text = |kind: &'static str| {
        let api = api.clone();
        let id = id.clone();
        async move { api.http.get(format!("{}/batches/{id}/results?kind={kind}", api.base)).send().await.unwrap().text().await.unwrap() }
    };
    let out = text("output").await;
    assert_eq!(out.lines().count(), 5);
    assert!(!out.contains("\"slow\"") && !out.contains("\"bad\""));
    assert_eq!(text("errors").await.lines().count(), 1);
    assert_eq!(text("all").await.lines().count(), 6);
    let (st, one) = api.get(&format!("/batches/{id}/requests/req-3")).await;
    assert_eq!(st, 200);
    assert_eq!((one["custom_id"].as_str(), one["line"].as_u64()), (Some("req-3"), Some(4)));
    let (st, e) = api.get(&format!("/batches/{id}/requests/slow")).await;
    assert_eq!(st, 404, "no result yet: {e}");
    let (st, _) = api.get(&format!("/batches/{id}/results?kind=nope")).await;
    assert_eq!(st, 400);
    let done = api.wait_for(&id, &["completed"], Duration::from_secs(20)).await;
    assert_eq!(done["request_counts"], json!({"total": 7, "completed": 6, "failed": 1}));
    assert!(done.get("progress").is_none(), "no progress once final");
}

/// The official SDKs' loop `for f in client.files.list(limit=2): client.files.delete(f.id)`
/// (issue 19): each next page asks `after` the last file of the page, which the loop just
/// deleted. It empties the list, instead of stopping with a 400 after two deletes.
#[tokio::test]
async fn deleting_files_while_paging_empties_the_list() {
    let m = mock(MockArgs::default()).await;
    let s = spawn_app(&config(&m.base_url(), "", ""));
    let api = s.api();
    let mut uploaded = Vec::new();
    for i in 0..5 {
        uploaded.push(api.upload(&chat_lines(i + 1, "m")).await);
    }
    let (mut deleted, mut page) = (Vec::new(), "/files?limit=2".to_string());
    loop {
        let (st, list) = api.get(&page).await;
        assert_eq!(st, 200, "{page}: {list}");
        for f in list["data"].as_array().unwrap() {
            let id = f["id"].as_str().unwrap();
            let r = api.request(reqwest::Method::DELETE, &format!("/files/{id}")).send().await.unwrap();
            assert_eq!(r.status(), 200);
            deleted.push(id.to_string());
        }
        if list["has_more"] != true {
            break;
        }
        page = format!("/files?limit=2&after={}", list["last_id"].as_str().unwrap());
    }
    uploaded.reverse();
    assert_eq!(deleted, uploaded, "every file, newest first, each once");
    let (_, left) = api.get("/files").await;
    assert_eq!(left["data"], json!([]));
    let (st, body) = api.get("/files?after=file-never-was").await;
    assert_eq!(st, 400, "an id that never was is still refused: {body}");
}

/// A 500's cause is logged once, at the edge, in the request's span (so with its request id)
/// and with its whole chain; the client gets the generic message only.
#[tokio::test]
async fn an_internal_error_is_logged_once_with_its_request_id_and_cause() {
    let m = mock(MockArgs::default()).await;
    let mut s = spawn_app(&config(&m.base_url(), "", ""));
    let id = s.api().submit(&chat_lines(2, "m")).await;
    s.api().wait_for(&id, &["completed"], Duration::from_secs(30)).await;
    assert!(s.sigterm());
    // One stored result is no longer JSON: reading it is the server's fault, not the client's.
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", s.data.join("batchd.db").display())).await.unwrap();
    sqlx::query("UPDATE results SET record = 'not json' WHERE custom_id = 'req-1'").execute(&pool).await.unwrap();
    pool.close().await;
    s.spawn();
    let r = s.api().request(reqwest::Method::GET, &format!("/batches/{id}/requests/req-1")).header("x-request-id", "req-edge-log-1").send().await.unwrap();
    assert_eq!(r.status(), 500);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["message"], "The server had an error while processing your request.", "no cause reaches the client: {body}");
    let logged = eventually("the failed request is logged", Duration::from_secs(10), || async {
        let log = s.log();
        log.contains("request failed").then_some(log)
    })
    .await;
    let failed: Vec<&str> = logged.lines().filter(|l| l.contains("request failed")).collect();
    assert_eq!(failed.len(), 1, "logged once: {failed:?}");
    assert!(failed[0].contains("req-edge-log-1") && failed[0].contains("status=500") && failed[0].contains("expected ident"), "{}", failed[0]);
    assert_eq!(logged.matches("expected ident").count(), 1, "the cause appears in that line only:\n{logged}");
}
