//! neocloud's OpenAI-compatible HTTP server: one axum front ([`gateway`])
//! over pools of upstreams, the in-process engine (which runs on its own
//! thread, [`engine_worker`]) among them. Bodies come in through one
//! extractor ([`json_body`]); errors leave through one mapping to
//! OpenAI-style JSON ([`error`]); [`lifecycle`] counts open requests and
//! drains them on shutdown; [`metrics`] holds what `/metrics` reports;
//! `preparation` moves the parsing and tokenising of large bodies off the
//! async workers;
//! [`usage`] sends one record per finished request to a sink.

pub mod access;
pub mod connections;
pub mod engine_worker;
pub mod error;
pub mod gateway;
pub mod host_check;
pub mod json_body;
pub mod lifecycle;
pub mod metrics;
mod preparation;
pub mod routes;
pub mod tool_calls;
pub mod usage;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{Method, Uri};
use axum::response::IntoResponse;
use axum::Router;
use tokio::net::TcpListener;

pub use connections::ConnectionLimits;
pub use engine_worker::{BatchLimits, EngineHandle, ServedModel};
pub use error::ServerError;
pub use lifecycle::Lifecycle;
pub use metrics::Metrics;
pub use neocloud_engine::panel::ActivationPrecision;
pub use usage::{DiscardUsage, FanOutUsage, JsonLinesUsage, LedgerUsage, UsageRecord, UsageSink};

/// How the server runs.
#[derive(Clone)]
pub struct ServerConfig {
    /// Models of the in-process engine: the models served, or those the
    /// fleet's `engine:MODEL` upstreams name.
    pub models: Vec<ServedModel>,
    /// Pools and routing; `None` serves `models` alone, one pool each.
    pub fleet: Option<neocloud_fleet::config::FleetConfig>,
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
    /// Where each finished request's usage record goes.
    pub usage: Arc<dyn UsageSink>,
    /// Host names answered besides loopback ones (see [`host_check`]).
    pub allowed_hosts: Vec<String>,
    /// The lowest `priority` a request may ask for (lower is served first).
    pub min_priority: i64,
    /// Connection cap and client timeouts.
    pub connections: ConnectionLimits,
    /// Tenants and their keys. With a tenant defined, every request needs
    /// a key; with none, requests need no key on a loopback bind (or
    /// anywhere with `allow_anonymous`), and the server refuses to start
    /// on other binds.
    pub tenants: Option<neocloud_tenancy::Store>,
    /// Serve without keys on a non-loopback bind when no tenant exists.
    pub allow_anonymous: bool,
}

/// The in-process engine as the handlers that answer on it see it.
#[derive(Clone)]
pub struct AppState {
    /// The engine thread.
    pub engine: EngineHandle,
    /// Largest request body.
    pub body_limit: usize,
    /// Time allowed to send a body.
    pub body_timeout: Duration,
    /// Time a streamed answer may wait for a client that reads nothing.
    pub write_timeout: Duration,
    /// Open requests and draining.
    pub lifecycle: Arc<Lifecycle>,
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
/// run on, for at most `shutdown_timeout`. `serve --model X` and
/// `serve --config fleet.toml` are the same front: a plain serve is a fleet
/// of one in-process pool per model.
pub async fn serve(
    config: ServerConfig,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<(), ServerError> {
    let metrics = Arc::new(Metrics::default());
    let open_connections = Arc::clone(&metrics.open_connections);
    let lifecycle = Arc::new(Lifecycle::default());
    let started_at = unix_now();
    let fleet = match config.fleet {
        Some(fleet) => fleet,
        None => {
            let names: Vec<String> = config.models.iter().map(|m| m.name.clone()).collect();
            let cores = rayon_threads();
            neocloud_fleet::config::FleetConfig::in_process(&names, cores)
        }
    };
    let engine = if config.models.is_empty() {
        None
    } else {
        Some(EngineHandle::start(
            config.models,
            config.queue_capacity,
            config.batch,
            Arc::clone(&metrics),
        )?)
    };
    let app_state = engine.clone().map(|engine| AppState {
        engine,
        body_limit: config.body_limit,
        body_timeout: config.connections.body_timeout,
        write_timeout: config.connections.write_timeout,
        lifecycle: Arc::clone(&lifecycle),
    });
    let gateway = Arc::new(gateway::Gateway::new(&fleet, app_state.clone())?);
    gateway.spawn_health_checks();
    let state = gateway::routes::GatewayState {
        gateway,
        body_limit: config.body_limit,
        body_timeout: config.connections.body_timeout,
        lifecycle: Arc::clone(&lifecycle),
        metrics,
        started_at,
        engine,
        usage: config.usage,
        min_priority: config.min_priority,
    };
    let access = Arc::new(access_of(config.tenants, config.listen, config.allow_anonymous).await?);
    let hosts = Arc::new(host_check::HostRule::new(
        config.listen,
        &config.allowed_hosts,
    ));
    let app = gateway::routes::router(state, app_state)
        .layer(axum::middleware::from_fn_with_state(
            access,
            access::check_key,
        ))
        .layer(axum::middleware::from_fn_with_state(
            hosts,
            host_check::check_host,
        ));
    let limits = ConnectionLimits {
        max_connections: connections::fit_to_descriptor_limit(config.connections.max_connections),
        ..config.connections
    };
    serve_until_shutdown(
        config.listen,
        app,
        limits,
        open_connections,
        lifecycle,
        config.shutdown_timeout,
        on_listening,
    )
    .await
}

/// How requests get in: keys when a tenant exists; none on loopback (or
/// when allowed) when none does; refused otherwise.
async fn access_of(
    tenants: Option<neocloud_tenancy::Store>,
    listen: SocketAddr,
    allow_anonymous: bool,
) -> Result<access::Access, ServerError> {
    let count = match &tenants {
        Some(store) => store
            .tenant_count()
            .await
            .map_err(|e| ServerError::Unavailable(format!("the tenancy database: {e}")))?,
        None => 0,
    };
    match tenants {
        Some(store) if count > 0 => {
            tracing::info!(tenants = count, "API keys required (Authorization: Bearer nc-...)");
            Ok(access::Access::Keys(store))
        }
        _ if listen.ip().is_loopback() => {
            tracing::info!("no tenant defined: requests need no key on this loopback address (create one with `neocloud tenants create`)");
            Ok(access::Access::Anonymous)
        }
        _ if allow_anonymous => {
            tracing::warn!(%listen, "no tenant defined and --allow-anonymous: anyone who reaches this address may use every model");
            Ok(access::Access::Anonymous)
        }
        _ => Err(ServerError::Unavailable(format!(
            "no tenant is defined and {listen} is not a loopback address: anyone could use every model. Create a tenant and a key (`neocloud tenants create NAME`, `neocloud keys create --tenant NAME`), or pass --allow-anonymous"
        ))),
    }
}

/// Threads of the kernels' pool: the CPU cores a plain serve's pool names.
fn rayon_threads() -> u32 {
    neocloud_engine::kernels::threads().min(u32::MAX as usize) as u32
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
    limits: ConnectionLimits,
    open_connections: Arc<std::sync::atomic::AtomicUsize>,
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
    let server = connections::serve(listener, app, limits, open_connections, drain);
    let deadline = async {
        while !lifecycle.is_draining() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Connections still open after the deadline are cut.
        tokio::time::sleep(timeout + Duration::from_millis(500)).await;
    };
    tokio::select! {
        () = server => Ok(()),
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
