//! The web console: a single-page app served at `/` from files built into the binary.
//!
//! The console's files live in `console/` (plain JavaScript modules and CSS, no build step,
//! uPlot vendored under `console/vendor/`) and are compiled in with `include_bytes!`, so a
//! `cargo build` alone serves a working console with no network and no Node. It talks only
//! to the public `/v1` API with the user's key; the one thing it cannot learn there is
//! whether it needs a key, which `GET /console/config` tells without one.
//!
//! - `/` and any other `GET` outside `/v1` that asks for HTML answer the console's page (its
//!   router shows the view, or "not found"); every other unknown path, and every unknown
//!   `/v1/…` route, keeps the OpenAI 404 envelope.
//! - `/assets/…`: the console's files with their content types. Its own files are sent with
//!   `Cache-Control: no-cache` and an `ETag` (a revalidation answers 304); the vendored
//!   library's path carries its version and is cached for a year as immutable.
//! - Every console answer carries a strict Content-Security-Policy: scripts, styles and
//!   connections from this origin only, no inline script or style, no framing.

use std::sync::LazyLock;

use axum::extract::{OriginalUri, Path, State};
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::{auth, batches, files, AppState};
use crate::error::ApiError;

pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; \
                       font-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// One file of the console, built into the binary.
pub struct Asset {
    /// Its path under `console/` (and under `/assets/` on the wire).
    pub path: &'static str,
    pub content_type: &'static str,
    pub bytes: &'static [u8],
}

macro_rules! asset {
    ($path:literal, $ct:expr) => {
        Asset { path: $path, content_type: $ct, bytes: include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/console/", $path)) }
    };
}

const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// Every file of `console/` (a test checks that none is missing).
pub static ASSETS: &[Asset] = &[
    asset!("index.html", "text/html; charset=utf-8"),
    asset!("favicon.svg", "image/svg+xml"),
    asset!("style.css", CSS),
    asset!("app.js", JS),
    asset!("api.js", JS),
    asset!("ui.js", JS),
    asset!("chart.js", JS),
    asset!("views/signin.js", JS),
    asset!("views/batches.js", JS),
    asset!("views/batch.js", JS),
    asset!("views/new.js", JS),
    asset!("views/files.js", JS),
    asset!("vendor/uplot-1.6.32/uPlot.iife.min.js", JS),
    asset!("vendor/uplot-1.6.32/uPlot.min.css", CSS),
    asset!("vendor/uplot-1.6.32/LICENSE", "text/plain; charset=utf-8"),
];

/// Strong validators of [`ASSETS`], in the same order.
static ETAGS: LazyLock<Vec<HeaderValue>> = LazyLock::new(|| {
    ASSETS.iter().map(|a| HeaderValue::from_str(&format!("\"{:016x}\"", xxhash_rust::xxh3::xxh3_64(a.bytes))).expect("hex is a header value")).collect()
});

pub fn routes() -> Router<AppState> {
    Router::new().route("/", get(index)).route("/assets/{*path}", get(asset)).route("/console/config", get(config))
}

async fn index(headers: HeaderMap) -> Response {
    serve(0, &headers)
}

async fn asset(Path(path): Path<String>, headers: HeaderMap) -> Response {
    match ASSETS.iter().position(|a| a.path == path && a.path != "index.html") {
        Some(i) => serve(i, &headers),
        None => ApiError::not_found(format!("The console has no file {path:?}.")).into_response(),
    }
}

/// Answers asset `i`, or 304 when the client's copy is current.
fn serve(i: usize, headers: &HeaderMap) -> Response {
    let (a, etag) = (&ASSETS[i], &ETAGS[i]);
    let fresh = headers.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()).is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let mut resp = if fresh { StatusCode::NOT_MODIFIED.into_response() } else { a.bytes.into_response() };
    let h = resp.headers_mut();
    if !fresh {
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(a.content_type));
    }
    let cache = if a.path.starts_with("vendor/") { "public, max-age=31536000, immutable" } else { "no-cache" };
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    h.insert(header::ETAG, etag.clone());
    security_headers(h);
    resp
}

fn security_headers(h: &mut HeaderMap) {
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
}

/// What the console needs before it can call the API: whether a key is needed (and whose
/// key was sent, if one was: an unknown key is a 401), and the choices a create offers.
async fn config(State(st): State<AppState>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    let sent = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")));
    let tenant = match (st.cfg.auth_enabled(), sent) {
        (false, _) => Some(auth::DEFAULT_TENANT.to_string()),
        (true, None) => None,
        (true, Some(key)) => Some(st.cfg.tenant_for_key(key.trim()).ok_or_else(|| ApiError::unauthorized("Incorrect API key provided."))?.to_string()),
    };
    let windows: Vec<&str> = st.cfg.completion_windows.iter().map(|(w, _)| w.as_str()).collect();
    Ok(Json(json!({
        "object": "console.config",
        "auth_required": st.cfg.auth_enabled(),
        "tenant": tenant,
        "completion_windows": windows,
        "endpoints": batches::ENDPOINTS,
        "max_priority": batches::MAX_PRIORITY,
        "purposes": files::PURPOSES,
        "max_upload_bytes": st.cfg.limits.max_upload_bytes,
        "version": env!("CARGO_PKG_VERSION"),
    })))
}

/// The router's fallback: the console's page for a browser asking for a page outside `/v1`
/// (a deep link such as `/batches/batch_…`), the OpenAI 404 envelope for everything else.
pub async fn fallback(method: Method, OriginalUri(uri): OriginalUri, headers: HeaderMap) -> Response {
    let path = uri.path();
    let api = path == "/v1" || path.starts_with("/v1/");
    let wants_html = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|a| a.contains("text/html"));
    if !api && wants_html && (method == Method::GET || method == Method::HEAD) {
        return serve(0, &headers);
    }
    super::not_found(uri).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every file under `console/` is served, and every served file exists.
    #[test]
    fn every_console_file_is_built_in() {
        fn walk(dir: &std::path::Path, root: &std::path::Path, out: &mut Vec<String>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    walk(&p, root, out);
                } else {
                    out.push(p.strip_prefix(root).unwrap().to_string_lossy().replace('\\', "/"));
                }
            }
        }
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("console");
        let mut on_disk = vec![];
        walk(&root, &root, &mut on_disk);
        let mut built: Vec<String> = ASSETS.iter().map(|a| a.path.to_string()).collect();
        on_disk.sort();
        built.sort();
        assert_eq!(on_disk, built);
    }

    #[test]
    fn no_inline_script_or_style_in_the_page() {
        let html = std::str::from_utf8(ASSETS[0].bytes).unwrap();
        assert!(!html.contains("<script>") && !html.contains("style=") && !html.contains("<style"), "{html}");
        assert!(!html.contains("http://") && !html.contains("https://"), "no remote resource");
    }
}
