//! neocloud's OpenAI-compatible HTTP server: axum routes over the embedded
//! engine, which runs on its own thread ([`engine_worker`]). Bodies come in
//! through one extractor ([`json_body`]); errors leave through one mapping
//! to OpenAI-style JSON ([`error`]); [`lifecycle`] counts open requests and
//! drains them on shutdown; [`metrics`] holds what `/metrics` reports.

pub mod engine_worker;
pub mod error;
pub mod json_body;
pub mod lifecycle;
pub mod metrics;
pub mod routes;
pub mod tool_calls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{Method, Uri};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use tokio::net::TcpListener;
use tower_http::catch_panic::CatchPanicLayer;

pub use engine_worker::{EngineHandle, ServedModel};
pub use error::ServerError;
pub use lifecycle::Lifecycle;
pub use metrics::Metrics;

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
    /// How long open requests may run on after SIGTERM/SIGINT.
    pub shutdown_timeout: Duration,
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
    /// Open requests and draining.
    pub lifecycle: Arc<Lifecycle>,
}

/// The routes.
pub fn router(state: AppState) -> Router {
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
        .fallback(no_route)
        .layer(CatchPanicLayer::custom(|_| {
            ServerError::Internal("a handler panicked".into()).into_response()
        }))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            lifecycle::track_requests,
        ))
        .with_state(state)
}

async fn no_route(method: Method, uri: Uri) -> ServerError {
    ServerError::NoRoute(format!("{method} {}", uri.path()))
}

/// Binds, announces the address on `on_listening`, and serves until
/// SIGINT or SIGTERM. Then it drains: new requests get 503 while open ones
/// run on, for at most `shutdown_timeout`.
pub async fn serve(
    config: ServerConfig,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<(), ServerError> {
    let metrics = Arc::new(Metrics::default());
    let engine = EngineHandle::start(config.models, config.queue_capacity, metrics)?;
    let lifecycle = Arc::new(Lifecycle::default());
    let state = AppState {
        engine,
        body_limit: config.body_limit,
        started_at: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        lifecycle: Arc::clone(&lifecycle),
    };
    let listener = TcpListener::bind(config.listen).await.map_err(|e| {
        ServerError::Unavailable(format!("cannot listen on {}: {e}", config.listen))
    })?;
    let addr = listener
        .local_addr()
        .map_err(|e| ServerError::Unavailable(e.to_string()))?;
    on_listening(addr);
    let timeout = config.shutdown_timeout;
    let draining = Arc::clone(&lifecycle);
    let drain = async move {
        shutdown_signal().await;
        tracing::info!(
            open = draining.open_requests(),
            "shutting down; draining open requests"
        );
        draining.start_draining();
        draining.drained(timeout).await;
    };
    let server = axum::serve(listener, router(state)).with_graceful_shutdown(drain);
    let deadline = async {
        while !lifecycle.is_draining() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Connections still open after the deadline are cut.
        tokio::time::sleep(timeout + Duration::from_millis(500)).await;
    };
    tokio::select! {
        served = server => served.map_err(|e| ServerError::Unavailable(format!("server error: {e}"))),
        _ = deadline => Ok(()),
    }
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
