//! `GET /health`: 200 once the models are loaded, 503 before (or if loading failed).

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::AppState;

/// Reports readiness.
pub async fn health(State(state): State<AppState>) -> Response {
    match state.engine.models() {
        Ok(_) => Json(serde_json::json!({"status": "ok"})).into_response(),
        Err(e) => e.into_response(),
    }
}
