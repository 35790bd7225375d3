//! `POST /tokenize` and `POST /detokenize`, in vLLM's shape.

use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ServerError;
use crate::json_body::JsonBody;
use crate::preparation::off_workers;
use crate::AppState;

/// A `/tokenize` request: a prompt, or chat messages.
#[derive(Debug, Deserialize)]
pub struct TokenizeRequest {
    model: String,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    messages: Option<Vec<Value>>,
    #[serde(default)]
    add_special_tokens: Option<bool>,
    #[serde(default)]
    add_generation_prompt: Option<bool>,
}

/// A `/detokenize` request.
#[derive(Debug, Deserialize)]
pub struct DetokenizeRequest {
    model: String,
    tokens: Vec<u64>,
}

/// `/tokenize` and `/detokenize` over the engine of `state`.
pub fn routes(state: AppState) -> axum::Router {
    axum::Router::new()
        .route("/tokenize", axum::routing::post(tokenize))
        .route("/detokenize", axum::routing::post(detokenize))
        .with_state(state)
}

/// Tokenises a prompt, or chat messages through the model's template.
pub async fn tokenize(
    State(state): State<AppState>,
    principal: Option<axum::Extension<neocloud_tenancy::Principal>>,
    JsonBody(req): JsonBody<TokenizeRequest>,
) -> Result<Json<Value>, ServerError> {
    check_model(principal.as_ref().map(|p| &p.0), &req.model)?;
    // Templating and tokenising a long prompt is CPU work: off the async
    // workers.
    off_workers(move || {
        let lm = &state.engine.models()?[state.engine.model_index(&req.model)?];
        let tokens = match (&req.prompt, &req.messages) {
            (Some(p), None) => lm
                .tokenizer
                .encode(p, req.add_special_tokens.unwrap_or(true), true),
            (None, Some(messages)) => {
                lm.encode_chat(messages, None, req.add_generation_prompt.unwrap_or(true))?
            }
            _ => {
                return Err(ServerError::param(
                    "prompt",
                    "give either prompt or messages",
                ))
            }
        };
        Ok(json!({
            "tokens": tokens,
            "count": tokens.len(),
            "max_model_len": lm.model.config.context_length,
        }))
    })
    .await
    .map(Json)
}

/// Turns token ids back into text.
pub async fn detokenize(
    State(state): State<AppState>,
    principal: Option<axum::Extension<neocloud_tenancy::Principal>>,
    JsonBody(req): JsonBody<DetokenizeRequest>,
) -> Result<Json<Value>, ServerError> {
    check_model(principal.as_ref().map(|p| &p.0), &req.model)?;
    let lm = &state.engine.models()?[state.engine.model_index(&req.model)?];
    let vocab = lm.tokenizer.vocab_size() as u64;
    if let Some(bad) = req.tokens.iter().find(|&&t| t >= vocab) {
        return Err(ServerError::param(
            "tokens",
            format!("{bad} is not a token id of this model"),
        ));
    }
    let ids: Vec<u32> = req.tokens.iter().map(|&t| t as u32).collect();
    Ok(Json(json!({ "prompt": lm.tokenizer.decode(&ids, true) })))
}

/// A key that may not use `model` sees it as one that does not exist.
fn check_model(
    principal: Option<&neocloud_tenancy::Principal>,
    model: &str,
) -> Result<(), ServerError> {
    match principal {
        Some(p) if !p.may_use(model) => Err(ServerError::ModelNotFound(model.to_owned())),
        _ => Ok(()),
    }
}
