//! The fleet gateway: one OpenAI API in front of pools of upstreams. The
//! choices (which upstream, whether to retry, when to eject) are the fleet
//! crate's pure functions; this module holds their state, does the I/O
//! ([`http_upstream`], [`engine_upstream`]), forwards requests with retries
//! and fallback ([`dispatch`]), relays streams with a stall timeout
//! ([`relay`]), and serves the routes ([`routes`]).

pub mod dispatch;
pub mod engine_upstream;
pub mod http_upstream;
pub mod relay;
pub mod routes;
pub mod upstream;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use neocloud_accelerators::Catalogue;
use neocloud_fleet::accounting::EnergyLedger;
use neocloud_fleet::config::{FleetConfig, Policy, PoolConfig, UpstreamAddress};
use neocloud_fleet::health::{EjectionPolicy, PoolHealth, RetryBudget};
use neocloud_fleet::metrics::{FleetMetrics, UpstreamMetrics};
use neocloud_fleet::policy::{FleetView, RequestSlo, UpstreamView};
use neocloud_openai::ApiKey;
use upstream::Upstream;

use crate::error::ServerError;
use engine_upstream::EngineUpstream;
use http_upstream::HttpUpstream;

/// Sequences an upstream runs at once when its pool does not say.
const DEFAULT_SLOTS: u32 = 8;
/// Time to first token assumed before any is measured, seconds.
const INITIAL_TTFT_S: f64 = 0.2;
/// Time per output token assumed before any is measured, seconds.
const INITIAL_TPOT_S: f64 = 0.05;
/// Longest wait before a failed upstream is checked again.
const RECHECK_FAILED: Duration = Duration::from_secs(1);
/// Weight of the newest measurement in the running averages.
const EWMA_WEIGHT: f64 = 0.2;

/// What the router tracks of one upstream between requests.
#[derive(Debug)]
pub(crate) struct UpstreamLoad {
    outstanding_requests: u32,
    outstanding_tokens: u64,
    base_ttft_s: f64,
    base_tpot_s: f64,
    ledger: EnergyLedger,
}

/// One upstream and its state.
pub(crate) struct UpstreamSlot {
    /// Index of its pool.
    pub pool: usize,
    /// Index within the pool (for the pool's health).
    pub index: usize,
    /// `POOL/INDEX`: what `x-neocloud-upstream` says (never the URL).
    pub name: String,
    pub upstream: Arc<dyn Upstream>,
    /// The model name it expects: the pool's, or the engine model it names.
    pub served_model: String,
    load: Mutex<UpstreamLoad>,
    /// Its share of the pool's busy power.
    busy_watts: f64,
    /// Its share of the pool's price per hour.
    price_per_hour: f64,
}

/// One pool and its state.
pub(crate) struct PoolRuntime {
    pub config: PoolConfig,
    /// Bearer key for its upstreams (never logged).
    pub api_key: Option<ApiKey>,
    /// Its upstreams, as indices into [`Gateway::upstreams`].
    pub members: Vec<usize>,
    pub health: Mutex<PoolHealth>,
    /// Index of the fallback pool.
    pub fallback: Option<usize>,
    /// The SLO of requests that name none.
    pub slo: Option<RequestSlo>,
    slots: u32,
}

/// The gateway's state, shared by every request.
pub struct Gateway {
    pub(crate) pools: Vec<PoolRuntime>,
    pub(crate) upstreams: Vec<UpstreamSlot>,
    pub(crate) policy: Policy,
    pub(crate) budget: Mutex<RetryBudget>,
    sequence: AtomicU64,
    request_ids: AtomicU64,
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
    /// Builds the gateway for `config`. `engine` holds the in-process
    /// engine's routes when some upstream is `engine:MODEL`.
    pub fn new(config: &FleetConfig, engine: Option<Router>) -> Result<Self, ServerError> {
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
        let mut pools = Vec::new();
        let mut upstreams = Vec::new();
        for (p, pool) in config.pools.iter().enumerate() {
            let watts = pool_watts(pool, &catalogue).map_err(config_error)?;
            let api_key = match &pool.api_key_env {
                Some(var) => Some(std::env::var(var).map(ApiKey::new).map_err(|_| {
                    config_error(format!(
                        "pool {:?}: the environment variable {var} is not set",
                        pool.name
                    ))
                })?),
                None => None,
            };
            let n = pool.upstreams.len();
            let mut members = Vec::new();
            for (i, address) in pool.upstreams.iter().enumerate() {
                let pool_model = pool.served_model.as_ref().unwrap_or(&pool.model);
                let (upstream, served_model): (Arc<dyn Upstream>, String) =
                    match UpstreamAddress::parse(address)
                        .map_err(|e| config_error(e.to_string()))?
                    {
                        UpstreamAddress::Http(url) => {
                            http_upstream::check_resolved_host(&url)
                                .map_err(|m| config_error(format!("pool {:?}: {m}", pool.name)))?;
                            (
                                Arc::new(HttpUpstream::new(&url, api_key.clone(), client.clone())),
                                pool_model.clone(),
                            )
                        }
                        UpstreamAddress::Engine(model) => match &engine {
                            Some(routes) => (Arc::new(EngineUpstream::new(routes.clone())), model),
                            None => {
                                return Err(config_error(format!(
                                    "pool {:?} names the in-process engine, which is not running",
                                    pool.name
                                )))
                            }
                        },
                    };
                members.push(upstreams.len());
                upstreams.push(UpstreamSlot {
                    pool: p,
                    index: i,
                    name: format!("{}/{i}", pool.name),
                    upstream,
                    served_model,
                    load: Mutex::new(UpstreamLoad {
                        outstanding_requests: 0,
                        outstanding_tokens: 0,
                        base_ttft_s: INITIAL_TTFT_S,
                        base_tpot_s: INITIAL_TPOT_S,
                        ledger: EnergyLedger::new(watts / n as f64),
                    }),
                    busy_watts: watts / n as f64,
                    price_per_hour: pool.price_per_hour.unwrap_or(0.0) / n as f64,
                });
            }
            pools.push(PoolRuntime {
                api_key,
                members,
                health: Mutex::new(PoolHealth::new(n, EjectionPolicy::default())),
                fallback: pool
                    .fallback
                    .as_ref()
                    .and_then(|f| config.pools.iter().position(|q| &q.name == f)),
                slo: pool
                    .slo
                    .as_deref()
                    .map(RequestSlo::parse_header)
                    .transpose()
                    .map_err(|e| config_error(e.to_string()))?,
                slots: pool.slots.unwrap_or(DEFAULT_SLOTS),
                config: pool.clone(),
            });
        }
        let metrics = FleetMetrics::new(
            upstreams
                .iter()
                .map(|u| UpstreamMetrics::new(&pools[u.pool].config.name, &u.name))
                .collect(),
        );
        Ok(Gateway {
            pools,
            upstreams,
            policy: config.router.policy,
            budget: Mutex::new(RetryBudget::default()),
            sequence: AtomicU64::new(0),
            request_ids: AtomicU64::new(0),
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
        let mut names: Vec<String> = Vec::new();
        for pool in &self.pools {
            if !names.contains(&pool.config.model) {
                names.push(pool.config.model.clone());
            }
        }
        names
    }

    /// The per-upstream metrics.
    pub fn metrics(&self) -> &FleetMetrics {
        &self.metrics
    }

    /// Starts one task per upstream that checks it at the configured
    /// interval; a failed check takes it out of rotation until one passes.
    pub fn spawn_health_checks(self: &Arc<Self>) {
        for id in 0..self.upstreams.len() {
            let gateway = Arc::downgrade(self);
            let interval = self.check_interval;
            tokio::spawn(async move {
                loop {
                    let Some(gw) = gateway.upgrade() else { return };
                    let slot = &gw.upstreams[id];
                    let ok = slot.upstream.check().await;
                    lock(&gw.pools[slot.pool].health).record_check(slot.index, ok);
                    if !ok {
                        tracing::warn!(upstream = %slot.name, "health check failed");
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

    /// Pools that serve `model`, primary ones first, then their fallbacks
    /// (transitively), each once.
    pub(crate) fn pool_tiers(&self, model: &str) -> Vec<Vec<usize>> {
        let primary: Vec<usize> = (0..self.pools.len())
            .filter(|&p| self.pools[p].config.model == model)
            .collect();
        if primary.is_empty() {
            return Vec::new();
        }
        let mut seen = primary.clone();
        let mut tiers = vec![primary];
        loop {
            let next: Vec<usize> = tiers[tiers.len() - 1]
                .iter()
                .filter_map(|&p| self.pools[p].fallback)
                .filter(|f| !seen.contains(f))
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            if next.is_empty() {
                return tiers;
            }
            seen.extend(&next);
            tiers.push(next);
        }
    }

    /// The router's view of the upstreams of `pools`, less those in `tried`.
    pub(crate) fn view(&self, pools: &[usize], tried: &[usize]) -> FleetView {
        let now = Instant::now();
        let mut view = FleetView::default();
        for &p in pools {
            let pool = &self.pools[p];
            let health = lock(&pool.health);
            for &id in &pool.members {
                let slot = &self.upstreams[id];
                let load = lock(&slot.load);
                view.upstreams.push(UpstreamView {
                    id,
                    outstanding_requests: load.outstanding_requests,
                    outstanding_tokens: load.outstanding_tokens,
                    slots: pool.slots,
                    base_ttft_s: load.base_ttft_s,
                    base_tpot_s: load.base_tpot_s,
                    tokens_per_s: pool.slots as f64 / load.base_tpot_s.max(1e-6),
                    busy_watts: slot.busy_watts,
                    price_per_hour: slot.price_per_hour,
                    available: health.available(slot.index, now) && !tried.contains(&id),
                });
            }
        }
        view
    }

    /// The next value of the round-robin counter.
    pub(crate) fn next_sequence(&self) -> u64 {
        self.sequence.fetch_add(1, Ordering::Relaxed)
    }

    /// Seconds until some upstream of `pools` stops cooling down (at least 1).
    pub(crate) fn soonest_available(&self, pools: &[usize]) -> u64 {
        let now = Instant::now();
        let mut soonest = None::<Duration>;
        for &p in pools {
            let health = lock(&self.pools[p].health);
            for &id in &self.pools[p].members {
                if let Some(until) = health
                    .upstream(self.upstreams[id].index)
                    .and_then(|h| h.unavailable_until())
                {
                    let left = until.saturating_duration_since(now);
                    soonest = Some(soonest.map_or(left, |s| s.min(left)));
                }
            }
        }
        soonest.map_or(1, |d| d.as_secs_f64().ceil().max(1.0) as u64)
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
    id: u64,
    tokens: u64,
    pub started: Instant,
    finished: bool,
}

impl Attempt {
    /// Starts an attempt on `upstream` for a request of about `tokens` tokens.
    pub(crate) fn begin(gateway: &Arc<Gateway>, upstream: usize, tokens: u64) -> Attempt {
        let id = gateway.request_ids.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        {
            let mut load = lock(&gateway.upstreams[upstream].load);
            load.outstanding_requests += 1;
            load.outstanding_tokens += tokens;
            load.ledger.start(id, started);
        }
        gateway.metrics.upstreams[upstream].request();
        Attempt {
            gateway: Arc::clone(gateway),
            upstream,
            id,
            tokens,
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
        let joules = {
            let mut load = lock(&self.gateway.upstreams[self.upstream].load);
            load.outstanding_requests = load.outstanding_requests.saturating_sub(1);
            load.outstanding_tokens = load.outstanding_tokens.saturating_sub(self.tokens);
            load.ledger.finish(self.id, Instant::now())
        };
        self.gateway.metrics.upstreams[self.upstream].joules(joules);
        joules
    }

    /// Folds a measured time to first token and time per output token into
    /// the upstream's running averages.
    pub(crate) fn observe(&self, ttft_s: Option<f64>, tpot_s: Option<f64>) {
        let mut load = lock(&self.gateway.upstreams[self.upstream].load);
        if let Some(t) = ttft_s.filter(|t| t.is_finite() && *t >= 0.0) {
            load.base_ttft_s += EWMA_WEIGHT * (t - load.base_ttft_s);
        }
        if let Some(t) = tpot_s.filter(|t| t.is_finite() && *t > 0.0) {
            load.base_tpot_s += EWMA_WEIGHT * (t - load.base_tpot_s);
        }
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        self.finish();
    }
}

/// One request's place among those in flight and in the retry budget,
/// held until its response ends.
pub(crate) struct BudgetClaim {
    gateway: Arc<Gateway>,
    retries: u32,
}

impl BudgetClaim {
    /// Counts a request as active, unless the gateway is at capacity.
    pub(crate) fn new(gateway: &Arc<Gateway>) -> Result<Self, ServerError> {
        if gateway.in_flight.fetch_add(1, Ordering::SeqCst) >= gateway.max_in_flight {
            gateway.in_flight.fetch_sub(1, Ordering::SeqCst);
            return Err(ServerError::Unavailable(
                "the gateway is at capacity; retry later".into(),
            ));
        }
        lock(&gateway.budget).request_started();
        Ok(BudgetClaim {
            gateway: Arc::clone(gateway),
            retries: 0,
        })
    }

    /// Asks the budget for one more retry.
    pub(crate) fn try_retry(&mut self) -> bool {
        let granted = lock(&self.gateway.budget).try_retry();
        if granted {
            self.retries += 1;
        }
        granted
    }
}

impl Drop for BudgetClaim {
    fn drop(&mut self) {
        let mut budget = lock(&self.gateway.budget);
        for _ in 0..self.retries {
            budget.retry_finished();
        }
        budget.request_finished();
        self.gateway.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}
