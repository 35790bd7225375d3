//! `GET /v1/models`.

use axum::extract::State;
use axum::Json;
use neocloud_openai::models::{Model, ModelList};

use crate::AppState;

/// Lists the served models.
pub async fn list_models(State(state): State<AppState>) -> Json<ModelList> {
    Json(ModelList {
        object: "list".into(),
        data: state
            .engine
            .names()
            .iter()
            .map(|name| Model {
                id: name.clone(),
                object: "model".into(),
                created: state.started_at,
                owned_by: "neocloud".into(),
            })
            .collect(),
    })
}
