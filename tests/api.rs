//! Black-box tests of the HTTP API: the real binary, real SQLite, real HTTP.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn assert_envelope(v: &Value) {
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "error.message missing: {v}");
    for k in ["type", "param", "code"] {
        assert!(e.as_object().unwrap().contains_key(k), "error.{k} missing: {v}");
    }
}

#[tokio::test]
async fn classic_flow_upload_create_poll_download() {
    let m = mock(MockArgs { latency_ms: 5, ..Default::default() }).await;
    let s = Server::start(&config(&m.base_url(), "", ""));
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
    let s = Server::start(&config(&m.base_url(), "", "[limits]\nmax_upload_bytes = 1000"));
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
    let r = api.http.post(format!("{}/files", api.base)).header("content-type", "multipart/form-data; boundary=XYZ").body("--XYZ\r\nbroken").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert_envelope(&r.json().await.unwrap());
    assert_eq!(api.content(&keep).await, before, "stored file intact");
    let (_, list) = api.get("/files").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1, "no half-uploaded file was listed: {list}");
}
