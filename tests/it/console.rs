//! Black-box tests of what the web console (issue #14) needs from the server, against the real
//! binary: `POST /v1/batches/validate` (the engine's validator, no batch created, tenant
//! scoped), the list filters of `GET /v1/batches`, and the console itself — its page and
//! files at `/` with their content types, caching and Content-Security-Policy,
//! `/console/config`, and how unknown paths answer. The console's behaviour in a browser is
//! tested in `tests/browser/` (headless Chromium).

use std::time::Duration;

use crate::common::*;
use serde_json::{json, Value};

const TENANTS: &str = "[[tenants]]\nname = \"a\"\napi_keys = [\"sk-a\"]\n[[tenants]]\nname = \"b\"\napi_keys = [\"sk-b\"]";

fn validate_body(file: &str) -> Value {
    json!({"input_file_id": file, "endpoint": "/v1/chat/completions"})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_reports_what_the_engine_would_and_creates_nothing() {
    let m = mock(MockArgs::default()).await;
    let cfg = config(&m.base_url(), "models = [\"m\"]", TENANTS).replace("models = [\"*\"]\n", "");
    let s = spawn_app(&cfg);
    let (a, b) = (s.api_with_key("sk-a"), s.api_with_key("sk-b"));

    let bad = [
        chat_line("x", "m", None),
        "not json".to_string(),
        chat_line("x", "m", None),
        chat_line("y", "unknown-model", None),
        json!({"custom_id": "z", "method": "POST", "url": "/v1/embeddings", "body": {"model": "m"}}).to_string(),
    ];
    let bad_id = a.upload(&bad).await;
    let (st, v) = a.post("/batches/validate", &validate_body(&bad_id)).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!((v["object"].as_str(), v["valid"].as_bool(), v["total"].as_u64()), (Some("validation"), Some(false), Some(5)), "{v}");
    let got: Vec<(String, u64)> = v["errors"].as_array().unwrap().iter().map(|e| (e["code"].as_str().unwrap().into(), e["line"].as_u64().unwrap())).collect();
    let want = [("invalid_json_line", 2), ("duplicate_custom_id", 3), ("model_not_found", 4), ("invalid_url", 5)];
    assert_eq!(got, want.iter().map(|(c, l)| (c.to_string(), *l)).collect::<Vec<_>>(), "{v}");
    assert_eq!(v["models"]["m"]["requests"], 3, "{v}");
    let (_, list) = a.get("/batches").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 0, "validation creates no batch");

    // The engine, validating the same file for a created batch, finds exactly the same.
    let failed = a.create_batch(&bad_id, json!({})).await;
    let failed = a.wait_for(failed["id"].as_str().unwrap(), &["failed"], Duration::from_secs(30)).await;
    assert_eq!(failed["errors"]["data"], v["errors"], "the same validator: {failed}");

    let good_id = a.upload(&chat_lines(7, "m")).await;
    let (st, v) = a.post("/batches/validate", &validate_body(&good_id)).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!((v["valid"].as_bool(), v["total"].as_u64(), v["format"].as_str()), (Some(true), Some(7), Some("full")), "{v}");
    assert_eq!(v["errors"], json!([]));
    assert!(v["models"]["m"]["input_tokens"].as_u64().unwrap() > 0, "{v}");

    // Scoped to the tenant; the key is required; parameters are checked as at create.
    let (st, v) = b.post("/batches/validate", &validate_body(&good_id)).await;
    assert_eq!((st, v["error"]["param"].as_str()), (404, Some("input_file_id")), "{v}");
    let (st, v) = s.api().post("/batches/validate", &validate_body(&good_id)).await;
    assert_eq!((st, v["error"]["code"].as_str()), (401, Some("invalid_api_key")), "{v}");
    let (st, v) = a.post("/batches/validate", &json!({"input_file_id": good_id, "endpoint": "/v1/nope"})).await;
    assert_eq!((st, v["error"]["param"].as_str()), (400, Some("endpoint")), "{v}");
    let (st, v) = a.post("/batches/validate", &json!({"endpoint": "/v1/chat/completions"})).await;
    assert_eq!((st, v["error"]["param"].as_str()), (400, Some("input_file_id")), "{v}");
    let (_, data) = a.upload_as(b"{}\n".to_vec(), "user_data", "notes.jsonl").await;
    let (st, v) = a.post("/batches/validate", &validate_body(data["id"].as_str().unwrap())).await;
    assert_eq!((st, v["error"]["param"].as_str()), (400, Some("input_file_id")), "{v}");
    let (_, list) = a.get("/batches").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1, "only the created batch exists: {list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_list_filters_by_status_and_searches_ids_and_metadata_values() {
    let m = mock(MockArgs::default()).await;
    let s = spawn_app(&config(&m.base_url(), "", TENANTS));
    let (a, b) = (s.api_with_key("sk-a"), s.api_with_key("sk-b"));
    let good = a.upload(&chat_lines(2, "m")).await;
    let mut ids = vec![];
    for job in ["nightly-eval", "Nightly-Run", "ad-hoc"] {
        let batch = a.create_batch(&good, json!({"metadata": {"job": job}})).await;
        ids.push(batch["id"].as_str().unwrap().to_string());
    }
    let bad = a.upload(&["not json".to_string()]).await;
    let failed = a.create_batch(&bad, json!({})).await["id"].as_str().unwrap().to_string();
    for id in &ids {
        a.wait_for(id, &["completed"], Duration::from_secs(30)).await;
    }
    a.wait_for(&failed, &["failed"], Duration::from_secs(30)).await;
    b.submit(&chat_lines(1, "m")).await;

    let listed = |v: &Value| v["data"].as_array().unwrap().iter().map(|b| b["id"].as_str().unwrap().to_string()).collect::<Vec<_>>();
    let (st, v) = a.get("/batches?status=failed").await;
    assert_eq!((st, listed(&v)), (200, vec![failed.clone()]), "{v}");
    let (_, v) = a.get("/batches?status=completed,failed").await;
    assert_eq!(listed(&v).len(), 4, "{v}");
    let (_, v) = a.get("/batches?search=nightly").await;
    assert_eq!(listed(&v), vec![ids[1].clone(), ids[0].clone()], "newest first, case-insensitive: {v}");
    let (_, v) = a.get(&format!("/batches?search={}", &ids[2][6..].to_lowercase())).await;
    assert_eq!(listed(&v), vec![ids[2].clone()], "part of an id: {v}");
    let (_, v) = a.get("/batches?search=job").await;
    assert!(listed(&v).is_empty(), "metadata keys are not values: {v}");

    // Pages of a filtered list follow the matches.
    let (_, p1) = a.get("/batches?search=nightly&limit=1").await;
    assert_eq!((listed(&p1), p1["has_more"].as_bool()), (vec![ids[1].clone()], Some(true)), "{p1}");
    let (_, p2) = a.get(&format!("/batches?search=nightly&limit=1&after={}", ids[1])).await;
    assert_eq!((listed(&p2), p2["has_more"].as_bool()), (vec![ids[0].clone()], Some(false)), "{p2}");

    let (_, v) = b.get("/batches?search=nightly").await;
    assert!(listed(&v).is_empty(), "another tenant's batches never match: {v}");
    let (st, v) = a.get("/batches?status=running").await;
    assert_eq!((st, v["error"]["param"].as_str()), (400, Some("status")), "{v}");
}

async fn get(url: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut r = reqwest::Client::new().get(url);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.send().await.unwrap()
}

fn header<'a>(r: &'a reqwest::Response, name: &str) -> &'a str {
    r.headers().get(name).map_or("", |v| v.to_str().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_is_served_at_the_root_with_strict_headers() {
    let m = mock(MockArgs::default()).await;
    let s = spawn_app(&config(&m.base_url(), "", TENANTS));
    let html = "text/html,application/xhtml+xml";

    let r = get(&format!("{}/", s.url), &[]).await;
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(header(&r, "content-type"), "text/html; charset=utf-8");
    let csp = header(&r, "content-security-policy").to_string();
    assert!(csp.contains("script-src 'self'") && csp.contains("default-src 'none'") && !csp.contains("unsafe"), "{csp}");
    assert_eq!((header(&r, "cache-control"), header(&r, "x-content-type-options")), ("no-cache", "nosniff"));
    let etag = header(&r, "etag").to_string();
    let page = r.text().await.unwrap();
    assert!(page.contains("<script type=\"module\" src=\"/assets/app.js\">"), "{page}");
    let r = get(&format!("{}/", s.url), &[("if-none-match", &etag)]).await;
    assert_eq!(r.status().as_u16(), 304, "a current copy is revalidated");

    let r = get(&format!("{}/assets/app.js", s.url), &[]).await;
    assert_eq!((r.status().as_u16(), header(&r, "content-type")), (200, "text/javascript; charset=utf-8"));
    let r = get(&format!("{}/assets/style.css", s.url), &[]).await;
    assert_eq!(header(&r, "content-type"), "text/css; charset=utf-8");
    let r = get(&format!("{}/assets/vendor/uplot-1.6.32/uPlot.iife.min.js", s.url), &[]).await;
    assert_eq!(r.status().as_u16(), 200);
    assert!(header(&r, "cache-control").contains("immutable"), "the versioned library is cached for good");
    let r = get(&format!("{}/assets/nope.js", s.url), &[("accept", html)]).await;
    assert_eq!(r.status().as_u16(), 404);

    // A browser's deep link gets the page; the API's unknown routes keep their envelope.
    let r = get(&format!("{}/batches/batch_x", s.url), &[("accept", html)]).await;
    assert_eq!((r.status().as_u16(), header(&r, "content-type")), (200, "text/html; charset=utf-8"));
    for path in ["/v1/nope", "/v1/batches/x/nope", "/v1"] {
        let r = get(&format!("{}{path}", s.url), &[("accept", html)]).await;
        assert_eq!(r.status().as_u16(), 404, "{path}");
        let v: Value = r.json().await.unwrap();
        assert!(v["error"]["message"].as_str().unwrap().contains(path), "{path}: {v}");
    }
    let r = get(&format!("{}/batches/batch_x", s.url), &[("accept", "application/json")]).await;
    assert_eq!(r.status().as_u16(), 404, "not a browser: the JSON 404");
    assert!(r.json::<Value>().await.unwrap()["error"].is_object());
    assert_eq!(get(&format!("{}/healthz", s.url), &[("accept", html)]).await.status().as_u16(), 200);

    // What the console learns before it has a key.
    let v: Value = get(&format!("{}/console/config", s.url), &[]).await.json().await.unwrap();
    assert_eq!((v["auth_required"].as_bool(), v["tenant"].is_null()), (Some(true), true), "{v}");
    assert_eq!(v["completion_windows"], json!(["24h", "1h", "3s"]), "{v}");
    assert_eq!(v["max_priority"], 8);
    let v: Value = get(&format!("{}/console/config", s.url), &[("authorization", "Bearer sk-b")]).await.json().await.unwrap();
    assert_eq!(v["tenant"], "b");
    let r = get(&format!("{}/console/config", s.url), &[("authorization", "Bearer wrong")]).await;
    assert_eq!(r.status().as_u16(), 401);

    let open = spawn_app(&config(&m.base_url(), "", ""));
    let v: Value = get(&format!("{}/console/config", open.url), &[]).await.json().await.unwrap();
    assert_eq!((v["auth_required"].as_bool(), v["tenant"].as_str()), (Some(false), Some("default")), "{v}");
}
