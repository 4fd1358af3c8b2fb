//! The HTTP front door: OpenAI's Files and Batches APIs (plus `/v1/models` and `/healthz`),
//! and the extensions that tell what a batch is doing: progress, event streams, retry,
//! usage and quotas (`progress`, `events`, `retry`, `usage`, `quota`), validation without a
//! batch (`validate`), list filters (`filter`); Anthropic's Message Batches API on the same
//! batches (`message_batches`); and the web console at `/` (`console`).
//! Event streams are counted per tenant and in all ([`stream_slots`]), so no tenant can hold
//! every connection.
//!
//! One file per resource. Handlers check their input, call the store, blob and engine, and
//! render wire objects; every failure leaves as an [`ApiError`] in OpenAI's envelope,
//! including malformed JSON or multipart, unknown routes, panics and timeouts. Every body is
//! bounded before it is read (see `extract` and `multipart`); every response carries an
//! `x-request-id` ([`layers`]).

mod auth;
mod batches;
mod console;
mod events;
mod extract;
mod files;
mod filter;
pub mod layers;
pub mod message_batches;
mod models;
mod multipart;
mod progress;
mod quota;
mod retry;
pub mod stream_slots;
mod usage;
mod validate;

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;

use crate::blob::Blob;
use crate::config::Config;
use crate::engine::Engine;
use crate::error::ApiError;
use crate::store::{BatchId, BatchRecord, Store};

pub use auth::Tenant;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub blob: Blob,
    pub engine: Engine,
    pub router: Arc<crate::upstream::Router>,
    pub cfg: Arc<Config>,
    /// The event streams open, per tenant and in all (see `stream_slots`).
    pub streams: Arc<stream_slots::StreamSlots>,
}

impl AppState {
    /// Refuses a write the store could not finish: while the engine cannot commit results
    /// (the disk is full, the database unreachable), new files and batches are refused with
    /// 507 and `Retry-After` instead of being half accepted. Reads go on.
    pub fn writable(&self) -> Result<(), ApiError> {
        if self.engine.store_writable() {
            Ok(())
        } else {
            Err(ApiError::insufficient_storage())
        }
    }

    /// The tenant's batch `id`; another tenant's, or none, is a 404 naming the id.
    pub async fn tenant_batch(&self, tenant: &str, id: &BatchId) -> Result<BatchRecord, ApiError> {
        self.store.get_batch(Some(tenant), id).await.map_err(|e| files::not_found_as(e, || no_such_batch(id)))
    }
}

/// The 404 of a batch id the tenant has no batch by.
pub fn no_such_batch(id: &str) -> ApiError {
    ApiError::not_found(format!("No such Batch object: {id}")).param("id")
}

pub fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/files", post(files::create).get(files::list))
        .route("/files/{id}", get(files::retrieve).delete(files::delete))
        .route("/files/{id}/content", get(files::content))
        .route("/batches", post(batches::create).get(batches::list))
        .route("/batches/validate", post(validate::validate))
        .route("/batches/{id}", get(batches::retrieve))
        .route("/batches/{id}/cancel", post(batches::cancel))
        .route("/batches/{id}/requests/{custom_id}", get(batches::request_result))
        .route("/batches/{id}/results", get(batches::partial_results))
        .route("/batches/{id}/progress", get(progress::progress))
        .route("/batches/{id}/events", get(events::batch_events))
        .route("/batches/{id}/retry", post(retry::retry))
        .route("/events", get(events::tenant_events))
        .route("/usage", get(usage::get))
        .route("/quota", get(quota::get))
        .route("/models", get(models::list))
        .route("/models/{*id}", get(models::retrieve))
        .merge(message_batches::routes())
        .layer(axum::extract::DefaultBodyLimit::disable());
    Router::new()
        .nest("/v1", v1)
        .merge(console::routes())
        .route("/healthz", get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }))
        .route("/metrics", get(metrics))
        .fallback(console::fallback)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(CatchPanicLayer::custom(|_| ApiError::internal("a handler panicked").into_response()))
        .layer(axum::middleware::from_fn_with_state(state.cfg.http.request_timeout, layers::timeout))
        .layer(axum::middleware::from_fn(layers::log_errors))
        .layer(TraceLayer::new_for_http().make_span_with(layers::span).on_response(layers::on_response))
        .layer(axum::middleware::from_fn(layers::request_id))
        .layer(axum::Extension(Arc::new(models::Catalog::new(&state.cfg.upstreams))))
        .with_state(state)
}

async fn metrics(axum::extract::State(st): axum::extract::State<AppState>) -> impl IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], st.engine.metrics_text().await)
}

async fn not_found(uri: axum::http::Uri) -> Response {
    in_its_envelope(&uri, ApiError::not_found(format!("Unknown request URL: {}. Please check the URL for typos.", uri.path())))
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    let mut e = ApiError::bad_request(format!("{method} is not supported on {}.", uri.path()));
    e.status = StatusCode::METHOD_NOT_ALLOWED;
    in_its_envelope(&uri, e)
}

/// An error no handler made (an unknown route, a method a route does not take), in the
/// envelope of the API its path belongs to: Anthropic's below `/v1/messages`, else OpenAI's.
fn in_its_envelope(uri: &axum::http::Uri, e: ApiError) -> Response {
    if uri.path().starts_with("/v1/messages") {
        message_batches::AnthropicError(e).into_response()
    } else {
        e.into_response()
    }
}
