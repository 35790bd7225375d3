//! neocloud's OpenAI-compatible HTTP server: axum routes over the embedded
//! engine, which runs on its own thread ([`engine_worker`]). Errors leave
//! through one mapping to OpenAI-style JSON ([`error`]).

pub mod engine_worker;
pub mod error;
pub mod routes;

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use tokio::net::TcpListener;

pub use engine_worker::{EngineHandle, ServedModel};
pub use error::ServerError;

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Models to serve.
    pub models: Vec<ServedModel>,
    /// Address to listen on (port 0 picks a free one).
    pub listen: SocketAddr,
    /// Requests that may wait while one runs; beyond that, 503.
    pub queue_capacity: usize,
    /// Largest request body in bytes; beyond that, 413.
    pub body_limit: usize,
}

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    /// The engine thread.
    pub engine: EngineHandle,
    /// Largest request body.
    pub body_limit: usize,
    /// Unix seconds at start-up (the `created` of listed models).
    pub started_at: u64,
}

/// The routes.
pub fn router(state: AppState) -> Router {
    let limit = state.body_limit;
    Router::new()
        .route(
            "/v1/chat/completions",
            post(routes::chat_completions::chat_completions),
        )
        .route("/v1/completions", post(routes::completions::completions))
        .route("/v1/models", get(routes::models::list_models))
        .route("/tokenize", post(routes::tokenize::tokenize))
        .route("/detokenize", post(routes::tokenize::detokenize))
        .route("/health", get(routes::health::health))
        .route("/metrics", get(routes::metrics::metrics))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// Binds, announces the address on `on_listening`, and serves until
/// SIGINT or SIGTERM, finishing requests in flight.
pub async fn serve(
    config: ServerConfig,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<(), ServerError> {
    let engine = EngineHandle::start(config.models, config.queue_capacity)?;
    let state = AppState {
        engine,
        body_limit: config.body_limit,
        started_at: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    let listener = TcpListener::bind(config.listen).await.map_err(|e| {
        ServerError::Unavailable(format!("cannot listen on {}: {e}", config.listen))
    })?;
    let addr = listener
        .local_addr()
        .map_err(|e| ServerError::Unavailable(e.to_string()))?;
    on_listening(addr);
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .map_err(|e| ServerError::Unavailable(format!("server error: {e}")))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}
