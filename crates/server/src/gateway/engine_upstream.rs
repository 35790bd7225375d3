//! The in-process engine as an upstream. Requests reach the engine's
//! handlers as typed values, parsed once from the bytes the client sent;
//! their answers (a JSON body, or the engine's own event stream) go to the
//! client as they are: no re-serialisation, no SSE re-parsing.

use std::time::Duration;

use axum::body::Bytes;
use axum::response::Response;
use neocloud_openai::chat::ChatCompletionRequest;
use neocloud_openai::completions::CompletionRequest;

use super::upstream::Endpoint;
use crate::error::ServerError;
use crate::json_body::parse_json;
use crate::routes::{chat_completions, completions};
use crate::usage::UsageMeter;
use crate::AppState;

/// How long a health check waits for models still loading.
const CHECK_PATIENCE: Duration = Duration::from_secs(5);

/// The engine, called in-process.
#[derive(Clone)]
pub struct EngineUpstream {
    state: AppState,
}

impl EngineUpstream {
    /// An upstream over the engine of `state`.
    pub fn new(state: AppState) -> Self {
        EngineUpstream { state }
    }

    /// Answers `body` (the client's bytes) at `endpoint` with the engine's
    /// model `served`, metered into `meter`; the answer names the model as
    /// the client did.
    pub async fn answer(
        &self,
        endpoint: Endpoint,
        served: &str,
        body: &Bytes,
        meter: UsageMeter,
    ) -> Result<Response, ServerError> {
        match endpoint {
            Endpoint::ChatCompletions => {
                let request: ChatCompletionRequest = parse_json(body)?;
                chat_completions::answer(&self.state, request, served, meter).await
            }
            Endpoint::Completions => {
                let request: CompletionRequest = parse_json(body)?;
                completions::answer(&self.state, request, served, meter).await
            }
        }
    }

    /// Whether the engine answers: its models are loaded (waiting a little
    /// while they load, rather than report a healthy engine as down).
    pub async fn check(&self) -> bool {
        let deadline = tokio::time::Instant::now() + CHECK_PATIENCE;
        loop {
            if self.state.engine.models().is_ok() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
