//! The in-process engine as an upstream. Requests reach the engine's
//! handlers as typed values, parsed once from the bytes the client sent;
//! their answers (a JSON body, or the engine's own event stream) go to the
//! client as they are: no re-serialisation, no SSE re-parsing.

use std::time::Duration;

use axum::body::Bytes;
use axum::response::Response;

use super::upstream::Endpoint;
use crate::error::ServerError;
use crate::preparation::prepare;
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
        let state = self.state.clone();
        let bytes = body.clone();
        let served = served.to_owned();
        match endpoint {
            Endpoint::ChatCompletions => {
                let prepared = prepare(body.len(), move || {
                    chat_completions::prepare(&state, &bytes, &served)
                })
                .await?;
                chat_completions::answer(&self.state, prepared, meter).await
            }
            Endpoint::Completions => {
                let prepared = prepare(body.len(), move || {
                    completions::prepare(&state, &bytes, &served)
                })
                .await?;
                completions::answer(&self.state, prepared, meter).await
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
