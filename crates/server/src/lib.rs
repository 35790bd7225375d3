//! neocloud's OpenAI-compatible HTTP server: axum routes over the embedded
//! engine, which runs on its own thread ([`engine_worker`]). Bodies come in
//! through one extractor ([`json_body`]); errors leave through one mapping
//! to OpenAI-style JSON ([`error`]); [`lifecycle`] counts open requests and
//! drains them on shutdown; [`metrics`] holds what `/metrics` reports.

pub mod engine_worker;
pub mod error;
pub mod gateway;
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
use axum::serve::ListenerExt;
use axum::Router;
use tokio::net::TcpListener;
use tower_http::catch_panic::CatchPanicLayer;

pub use engine_worker::{BatchLimits, EngineHandle, ServedModel};
pub use error::ServerError;
pub use lifecycle::Lifecycle;
pub use metrics::Metrics;
pub use neocloud_engine::panel::ActivationPrecision;

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Models to serve.
    pub models: Vec<ServedModel>,
    /// Address to listen on (port 0 picks a free one).
    pub listen: SocketAddr,
    /// Requests that may wait for a place in the batch; beyond that, 503.
    pub queue_capacity: usize,
    /// Sequences generated together (continuous batching), and the key/value
    /// memory of each model.
    pub batch: BatchLimits,
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

/// The routes, behind the lifecycle and panic layers.
pub fn router(state: AppState) -> Router {
    routes()
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            lifecycle::track_requests::<AppState>,
        ))
        .with_state(state)
}

/// The engine's routes alone: what the fleet gateway calls in-process.
pub fn engine_routes(state: AppState) -> Router {
    routes()
        .layer(CatchPanicLayer::custom(panic_response))
        .with_state(state)
}

fn routes() -> Router<AppState> {
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
}

/// The answer to a request whose handler panicked: a generic 500.
pub(crate) fn panic_response(
    _: Box<dyn std::any::Any + Send + 'static>,
) -> axum::response::Response {
    ServerError::Internal("a handler panicked".into()).into_response()
}

pub(crate) async fn no_route(method: Method, uri: Uri) -> ServerError {
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
    let engine = EngineHandle::start(config.models, config.queue_capacity, config.batch, metrics)?;
    let lifecycle = Arc::new(Lifecycle::default());
    let state = AppState {
        engine,
        body_limit: config.body_limit,
        started_at: unix_now(),
        lifecycle: Arc::clone(&lifecycle),
    };
    serve_until_shutdown(
        config.listen,
        router(state),
        lifecycle,
        config.shutdown_timeout,
        on_listening,
    )
    .await
}

/// How the fleet gateway runs.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Pools and routing.
    pub fleet: neocloud_fleet::config::FleetConfig,
    /// Models of the in-process engine (for `engine:MODEL` upstreams).
    pub engine_models: Vec<ServedModel>,
    /// The in-process engine's waiting queue.
    pub queue_capacity: usize,
    /// Sequences the in-process engine generates together, and its key/value
    /// memory per model.
    pub batch: BatchLimits,
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Largest request body in bytes.
    pub body_limit: usize,
    /// How long open requests may run on after SIGTERM/SIGINT.
    pub shutdown_timeout: Duration,
}

/// Runs the fleet gateway (with the in-process engine when a pool names
/// it) until SIGINT or SIGTERM, draining as [`serve`] does.
pub async fn serve_gateway(
    config: GatewayConfig,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<(), ServerError> {
    let metrics = Arc::new(Metrics::default());
    let lifecycle = Arc::new(Lifecycle::default());
    let started_at = unix_now();
    let engine = if config.engine_models.is_empty() {
        None
    } else {
        let engine = EngineHandle::start(
            config.engine_models,
            config.queue_capacity,
            config.batch,
            Arc::clone(&metrics),
        )?;
        Some(engine)
    };
    let routes = engine.clone().map(|engine| {
        engine_routes(AppState {
            engine,
            body_limit: config.body_limit,
            started_at,
            lifecycle: Arc::new(Lifecycle::default()),
        })
    });
    let gateway = Arc::new(gateway::Gateway::new(&config.fleet, routes)?);
    gateway.spawn_health_checks();
    let state = gateway::routes::GatewayState {
        gateway,
        body_limit: config.body_limit,
        lifecycle: Arc::clone(&lifecycle),
        metrics,
        started_at,
        engine,
    };
    serve_until_shutdown(
        config.listen,
        gateway::routes::router(state),
        lifecycle,
        config.shutdown_timeout,
        on_listening,
    )
    .await
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn serve_until_shutdown(
    listen: SocketAddr,
    app: Router,
    lifecycle: Arc<Lifecycle>,
    timeout: Duration,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<(), ServerError> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| ServerError::Unavailable(format!("cannot listen on {listen}: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| ServerError::Unavailable(e.to_string()))?;
    on_listening(addr);
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
    // Small writes (SSE events) go out at once, not after the client's
    // delayed acknowledgement of the previous one.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let server = axum::serve(listener, app).with_graceful_shutdown(drain);
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
