//! The fleet gateway: one OpenAI API in front of pools of upstreams. The
//! choices (which upstream, whether to retry, when to eject) and the
//! fleet's state between requests are the fleet crate's
//! ([`neocloud_fleet::route`]); this module holds that state behind a lock,
//! does the I/O ([`http_upstream`], [`engine_upstream`]), forwards requests
//! with retries and fallback ([`dispatch`]), relays streams with a stall
//! timeout ([`relay`]), and serves the routes ([`routes`]).

pub mod dispatch;
pub mod engine_upstream;
pub mod http_upstream;
pub mod relay;
pub mod routes;
pub mod upstream;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use neocloud_accelerators::Catalogue;
use neocloud_fleet::config::{FleetConfig, PoolConfig, UpstreamAddress};
use neocloud_fleet::metrics::{FleetMetrics, UpstreamMetrics};
use neocloud_fleet::route::{AttemptTicket, FleetState};
use neocloud_openai::ApiKey;
use upstream::Upstream;

use crate::error::ServerError;
use crate::AppState;
pub(crate) use engine_upstream::EngineUpstream;
use http_upstream::HttpUpstream;

/// Longest wait before a failed upstream is checked again.
const RECHECK_FAILED: Duration = Duration::from_secs(1);

/// How the gateway reaches one upstream.
#[derive(Clone)]
pub(crate) enum Connection {
    /// Over the network (or any byte-level upstream).
    Remote(Arc<dyn Upstream>),
    /// The in-process engine, called with typed requests.
    Engine(EngineUpstream),
}

impl Connection {
    /// An active health check.
    async fn check(&self) -> bool {
        match self {
            Connection::Remote(upstream) => upstream.check().await,
            Connection::Engine(engine) => engine.check().await,
        }
    }
}

/// The gateway's state, shared by every request.
pub struct Gateway {
    /// The routing state; every decision takes the lock briefly.
    pub(crate) state: Mutex<FleetState>,
    /// Each upstream's connection, by the state's upstream index.
    pub(crate) connections: Vec<Connection>,
    /// Each pool's key for its upstreams (never logged).
    pub(crate) pool_keys: Vec<Option<ApiKey>>,
    pub(crate) metrics: FleetMetrics,
    pub(crate) stall_timeout: Duration,
    pub(crate) request_timeout: Duration,
    check_interval: Duration,
    in_flight: AtomicUsize,
    max_in_flight: usize,
}

/// An upstream reply's `Retry-After`, as text.
pub(crate) fn retry_after_header(headers: &axum::http::HeaderMap) -> Option<String> {
    headers
        .get(axum::http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Locks a mutex, taking the data even if a holder panicked (the state
/// here stays consistent across any single update).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Gateway {
    /// Builds the gateway for `config`. `engine` is the in-process engine
    /// when some upstream is `engine:MODEL`.
    pub fn new(config: &FleetConfig, engine: Option<AppState>) -> Result<Self, ServerError> {
        let catalogue = Catalogue::load(
            config
                .router
                .accelerators_file
                .as_deref()
                .map(std::path::Path::new),
        )
        .map_err(|e| ServerError::Unavailable(e.to_string()))?;
        let config_error =
            |m: String| ServerError::Unavailable(format!("fleet configuration: {m}"));
        let client =
            HttpUpstream::client().map_err(|e| config_error(format!("HTTP client: {e}")))?;
        let watts = config
            .pools
            .iter()
            .map(|pool| pool_watts(pool, &catalogue))
            .collect::<Result<Vec<f64>, String>>()
            .map_err(config_error)?;
        let state = FleetState::new(config, &watts).map_err(|e| config_error(e.to_string()))?;
        let mut pool_keys = Vec::new();
        for pool in &config.pools {
            pool_keys.push(match &pool.api_key_env {
                Some(var) => Some(std::env::var(var).map(ApiKey::new).map_err(|_| {
                    config_error(format!(
                        "pool {:?}: the environment variable {var} is not set",
                        pool.name
                    ))
                })?),
                None => None,
            });
        }
        let mut connections = Vec::new();
        for upstream in &state.upstreams {
            let pool = &config.pools[upstream.pool];
            connections.push(match &upstream.address {
                UpstreamAddress::Http(url) => {
                    http_upstream::check_resolved_host(url)
                        .map_err(|m| config_error(format!("pool {:?}: {m}", pool.name)))?;
                    Connection::Remote(Arc::new(HttpUpstream::new(
                        url,
                        pool_keys[upstream.pool].clone(),
                        client.clone(),
                    )))
                }
                UpstreamAddress::Engine(_) => match &engine {
                    Some(state) => Connection::Engine(EngineUpstream::new(state.clone())),
                    None => {
                        return Err(config_error(format!(
                            "pool {:?} names the in-process engine, which is not running",
                            pool.name
                        )))
                    }
                },
            });
        }
        let metrics = FleetMetrics::new(
            state
                .upstreams
                .iter()
                .map(|u| UpstreamMetrics::new(&state.pools[u.pool].config.name, &u.name))
                .collect(),
        );
        Ok(Gateway {
            state: Mutex::new(state),
            connections,
            pool_keys,
            metrics,
            stall_timeout: Duration::from_secs_f64(config.router.stall_timeout_secs),
            request_timeout: Duration::from_secs_f64(config.router.request_timeout_secs),
            check_interval: Duration::from_secs_f64(config.router.health_check_interval_secs),
            in_flight: AtomicUsize::new(0),
            max_in_flight: config.router.max_in_flight,
        })
    }

    /// The model names clients may ask for, in configuration order.
    pub fn models(&self) -> Vec<String> {
        lock(&self.state).models()
    }

    /// The per-upstream metrics.
    pub fn metrics(&self) -> &FleetMetrics {
        &self.metrics
    }

    /// Starts one task per upstream that checks it at the configured
    /// interval; a failed check takes it out of rotation until one passes.
    pub fn spawn_health_checks(self: &Arc<Self>) {
        for id in 0..self.connections.len() {
            let gateway = Arc::downgrade(self);
            let interval = self.check_interval;
            tokio::spawn(async move {
                loop {
                    let Some(gw) = gateway.upgrade() else { return };
                    let ok = gw.connections[id].check().await;
                    let name = {
                        let mut state = lock(&gw.state);
                        state.record_check(id, ok);
                        state.upstreams[id].name.clone()
                    };
                    if !ok {
                        tracing::warn!(upstream = %name, "health check failed");
                    }
                    drop(gw);
                    // A failed upstream is looked at again soon.
                    let pause = if ok {
                        interval
                    } else {
                        interval.min(RECHECK_FAILED)
                    };
                    tokio::time::sleep(pause).await;
                }
            });
        }
    }
}

/// Busy power of a whole pool: its `watts`, or the catalogue's figure for
/// its accelerator times `count` (10 W per core for `cpu`).
fn pool_watts(pool: &PoolConfig, catalogue: &Catalogue) -> Result<f64, String> {
    if let Some(w) = pool.watts {
        return Ok(w);
    }
    catalogue
        .published_watts(&pool.accelerator)
        .map(|w| w * pool.count as f64)
        .map_err(|e| {
            format!(
                "pool {:?}: {e}; set `watts` or `[router] accelerators_file`",
                pool.name
            )
        })
}

/// One request's claim on one upstream: counted in its load and its energy
/// ledger from creation until [`Attempt::finish`] or drop.
pub(crate) struct Attempt {
    gateway: Arc<Gateway>,
    pub upstream: usize,
    ticket: AttemptTicket,
    pub started: Instant,
    finished: bool,
}

impl Attempt {
    /// Starts an attempt on `upstream` for a request of about `tokens` tokens.
    pub(crate) fn begin(gateway: &Arc<Gateway>, upstream: usize, tokens: u64) -> Attempt {
        let started = Instant::now();
        let ticket = lock(&gateway.state).begin_attempt(upstream, tokens, started);
        gateway.metrics.upstreams[upstream].request();
        Attempt {
            gateway: Arc::clone(gateway),
            upstream,
            ticket,
            started,
            finished: false,
        }
    }

    /// Ends the attempt; the joules its request is charged.
    pub(crate) fn finish(&mut self) -> f64 {
        if self.finished {
            return 0.0;
        }
        self.finished = true;
        let joules = lock(&self.gateway.state).finish_attempt(self.ticket, Instant::now());
        self.gateway.metrics.upstreams[self.upstream].joules(joules);
        joules
    }

    /// Folds a measured time to first token and time per output token into
    /// the upstream's running averages.
    pub(crate) fn observe(&self, ttft_s: Option<f64>, tpot_s: Option<f64>) {
        lock(&self.gateway.state).observe(self.upstream, ttft_s, tpot_s);
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        self.finish();
    }
}

/// One request's place among those in flight and in the retry budget,
/// held until its response ends; it gives back the retries its route took.
pub(crate) struct InFlight {
    gateway: Arc<Gateway>,
    /// Retries the request's route was granted.
    pub retries: u32,
}

impl InFlight {
    /// Counts a request as active, unless the gateway is at capacity.
    pub(crate) fn new(gateway: &Arc<Gateway>) -> Result<Self, ServerError> {
        if gateway.in_flight.fetch_add(1, Ordering::SeqCst) >= gateway.max_in_flight {
            gateway.in_flight.fetch_sub(1, Ordering::SeqCst);
            return Err(ServerError::Unavailable(
                "the gateway is at capacity; retry later".into(),
            ));
        }
        lock(&gateway.state).request_started();
        Ok(InFlight {
            gateway: Arc::clone(gateway),
            retries: 0,
        })
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        lock(&self.gateway.state).request_finished(self.retries);
        self.gateway.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}
