//! `GET /v1/models`: every model and alias the router can serve.

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use super::{AppState, Tenant};

pub async fn list(State(st): State<AppState>, _t: Tenant) -> Json<Value> {
    let created = crate::now_unix();
    let data: Vec<Value> = st
        .router
        .model_list()
        .into_iter()
        .map(|(id, owner)| json!({"id": id, "object": "model", "created": created, "owned_by": owner, "shutdown_date": null}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}
