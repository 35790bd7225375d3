//! The route state machine: the fleet's live state between requests (each
//! upstream's load, running time estimates and energy ledger; each pool's
//! health; the retry budget) and one request's way through it (its pool
//! tiers, the upstreams tried, the retry it may take, why it failed). All
//! of it is plain data on the caller's clock: every method that needs the
//! time takes `now`, so the gateway passes `Instant::now()` and a
//! simulator passes its own. The gateway does the I/O around it.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::accounting::EnergyLedger;
use crate::config::{FleetConfig, Policy, PoolConfig, UpstreamAddress};
use crate::error::FleetError;
use crate::health::{retry_after, EjectionPolicy, PoolHealth, RetryBudget};
use crate::metrics::UpstreamErrorKind;
use crate::policy::{choose, prefix_hash, FleetView, RequestSlo, RouteRequest, UpstreamView};

/// Sequences an upstream runs at once when its pool does not say.
pub const DEFAULT_SLOTS: u32 = 8;
/// Time to first token assumed before any is measured, seconds.
pub const INITIAL_TTFT_S: f64 = 0.2;
/// Time per output token assumed before any is measured, seconds.
pub const INITIAL_TPOT_S: f64 = 0.05;
/// Weight of the newest measurement in the running averages.
pub const EWMA_WEIGHT: f64 = 0.2;
/// Longest cool-down a 429's `Retry-After` can impose.
pub const MAX_COOL_DOWN: Duration = Duration::from_secs(60);
/// Characters of the prompt that key prefix affinity.
pub const PREFIX_CHARS: usize = 256;

/// One upstream's state.
#[derive(Debug)]
pub struct UpstreamState {
    /// Index of its pool.
    pub pool: usize,
    /// Index within the pool (for the pool's health).
    pub index: usize,
    /// `POOL/INDEX`: what `x-neocloud-upstream` says (never the URL).
    pub name: String,
    /// The model name it expects: the pool's, or the engine model it names.
    pub served_model: String,
    /// Where it is.
    pub address: UpstreamAddress,
    outstanding_requests: u32,
    outstanding_tokens: u64,
    base_ttft_s: f64,
    base_tpot_s: f64,
    ledger: EnergyLedger,
    /// Its share of the pool's busy power.
    pub busy_watts: f64,
    /// Its share of the pool's price per hour.
    pub price_per_hour: f64,
}

/// One pool's state.
#[derive(Debug)]
pub struct PoolState {
    /// As configured.
    pub config: PoolConfig,
    /// Its upstreams, as indices into [`FleetState::upstreams`].
    pub members: Vec<usize>,
    /// Its upstreams' health.
    pub health: PoolHealth,
    /// Index of the fallback pool.
    pub fallback: Option<usize>,
    /// The SLO of requests that name none.
    pub slo: Option<RequestSlo>,
    /// Sequences each upstream runs at once.
    pub slots: u32,
}

/// The fleet between requests.
#[derive(Debug)]
pub struct FleetState {
    /// The pools, in configuration order.
    pub pools: Vec<PoolState>,
    /// Every pool's upstreams, pool by pool.
    pub upstreams: Vec<UpstreamState>,
    /// The routing policy.
    pub policy: Policy,
    budget: RetryBudget,
    sequence: u64,
    attempts: u64,
}

/// One attempt on one upstream, counted in its load and energy ledger
/// until [`FleetState::finish_attempt`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttemptTicket {
    /// The upstream.
    pub upstream: usize,
    /// The attempt's number (for the energy ledger).
    pub id: u64,
    /// Tokens it was counted for.
    pub tokens: u64,
}

impl FleetState {
    /// The state of a fresh fleet: `pool_watts[p]` is pool `p`'s busy power.
    pub fn new(config: &FleetConfig, pool_watts: &[f64]) -> Result<Self, FleetError> {
        let mut pools = Vec::new();
        let mut upstreams = Vec::new();
        for (p, pool) in config.pools.iter().enumerate() {
            let watts = pool_watts.get(p).copied().unwrap_or(0.0);
            let n = pool.upstreams.len().max(1);
            let mut members = Vec::new();
            for (i, text) in pool.upstreams.iter().enumerate() {
                let address = UpstreamAddress::parse(text)?;
                let served_model = match &address {
                    UpstreamAddress::Engine(model) => model.clone(),
                    UpstreamAddress::Http(_) => pool
                        .served_model
                        .clone()
                        .unwrap_or_else(|| pool.model.clone()),
                };
                members.push(upstreams.len());
                upstreams.push(UpstreamState {
                    pool: p,
                    index: i,
                    name: format!("{}/{i}", pool.name),
                    served_model,
                    address,
                    outstanding_requests: 0,
                    outstanding_tokens: 0,
                    base_ttft_s: INITIAL_TTFT_S,
                    base_tpot_s: INITIAL_TPOT_S,
                    ledger: EnergyLedger::new(watts / n as f64),
                    busy_watts: watts / n as f64,
                    price_per_hour: pool.price_per_hour.unwrap_or(0.0) / n as f64,
                });
            }
            pools.push(PoolState {
                health: PoolHealth::new(pool.upstreams.len(), EjectionPolicy::default()),
                members,
                fallback: pool
                    .fallback
                    .as_ref()
                    .and_then(|f| config.pools.iter().position(|q| &q.name == f)),
                slo: pool
                    .slo
                    .as_deref()
                    .map(RequestSlo::parse_header)
                    .transpose()?,
                slots: pool.slots.unwrap_or(DEFAULT_SLOTS),
                config: pool.clone(),
            });
        }
        Ok(FleetState {
            pools,
            upstreams,
            policy: config.router.policy,
            budget: RetryBudget::default(),
            sequence: 0,
            attempts: 0,
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

    /// Pools that serve `model`, primary ones first, then their fallbacks
    /// (transitively), each once.
    pub fn pool_tiers(&self, model: &str) -> Vec<Vec<usize>> {
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
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            if next.is_empty() {
                return tiers;
            }
            seen.extend(&next);
            tiers.push(next);
        }
    }

    /// The policy's view of the upstreams of `pools`, less those in `tried`.
    pub fn view(&self, pools: &[usize], tried: &[usize], now: Instant) -> FleetView {
        let mut view = FleetView::default();
        for &p in pools {
            let pool = &self.pools[p];
            for &id in &pool.members {
                let u = &self.upstreams[id];
                view.upstreams.push(UpstreamView {
                    id,
                    outstanding_requests: u.outstanding_requests,
                    outstanding_tokens: u.outstanding_tokens,
                    slots: pool.slots,
                    base_ttft_s: u.base_ttft_s,
                    base_tpot_s: u.base_tpot_s,
                    tokens_per_s: pool.slots as f64 / u.base_tpot_s.max(1e-6),
                    busy_watts: u.busy_watts,
                    price_per_hour: u.price_per_hour,
                    available: pool.health.available(u.index, now) && !tried.contains(&id),
                });
            }
        }
        view
    }

    /// Seconds until some upstream of `pools` stops cooling down (at least 1).
    pub fn soonest_available(&self, pools: &[usize], now: Instant) -> u64 {
        let mut soonest = None::<Duration>;
        for &p in pools {
            let pool = &self.pools[p];
            for &id in &pool.members {
                let until = pool
                    .health
                    .upstream(self.upstreams[id].index)
                    .and_then(|h| h.unavailable_until());
                if let Some(until) = until {
                    let wait = until.saturating_duration_since(now);
                    soonest = Some(soonest.map_or(wait, |s| s.min(wait)));
                }
            }
        }
        soonest.map_or(1, |d| d.as_secs_f64().ceil().max(1.0) as u64)
    }

    /// Counts an attempt of about `tokens` tokens on `upstream` in its load
    /// and energy ledger.
    pub fn begin_attempt(&mut self, upstream: usize, tokens: u64, now: Instant) -> AttemptTicket {
        self.attempts += 1;
        let id = self.attempts;
        let u = &mut self.upstreams[upstream];
        u.outstanding_requests += 1;
        u.outstanding_tokens += tokens;
        u.ledger.start(id, now);
        AttemptTicket {
            upstream,
            id,
            tokens,
        }
    }

    /// Ends an attempt; the joules its request is charged.
    pub fn finish_attempt(&mut self, ticket: AttemptTicket, now: Instant) -> f64 {
        let u = &mut self.upstreams[ticket.upstream];
        u.outstanding_requests = u.outstanding_requests.saturating_sub(1);
        u.outstanding_tokens = u.outstanding_tokens.saturating_sub(ticket.tokens);
        u.ledger.finish(ticket.id, now)
    }

    /// Folds a measured time to first token and time per output token into
    /// `upstream`'s running averages.
    pub fn observe(&mut self, upstream: usize, ttft_s: Option<f64>, tpot_s: Option<f64>) {
        let u = &mut self.upstreams[upstream];
        if let Some(t) = ttft_s.filter(|t| t.is_finite() && *t >= 0.0) {
            u.base_ttft_s += EWMA_WEIGHT * (t - u.base_ttft_s);
        }
        if let Some(t) = tpot_s.filter(|t| t.is_finite() && *t > 0.0) {
            u.base_tpot_s += EWMA_WEIGHT * (t - u.base_tpot_s);
        }
    }

    /// An attempt on `upstream` failed; whether that ejected it.
    pub fn record_failure(&mut self, upstream: usize, now: Instant) -> bool {
        let u = &self.upstreams[upstream];
        self.pools[u.pool].health.record_failure(u.index, now)
    }

    /// An attempt on `upstream` went well (or the request was at fault).
    pub fn record_success(&mut self, upstream: usize) {
        let u = &self.upstreams[upstream];
        self.pools[u.pool].health.record_success(u.index);
    }

    /// `upstream` asked for no requests for `wait`.
    pub fn record_rate_limited(&mut self, upstream: usize, now: Instant, wait: Duration) {
        let u = &self.upstreams[upstream];
        self.pools[u.pool]
            .health
            .record_rate_limited(u.index, now, wait);
    }

    /// An active health check of `upstream` passed or not.
    pub fn record_check(&mut self, upstream: usize, ok: bool) {
        let u = &self.upstreams[upstream];
        self.pools[u.pool].health.record_check(u.index, ok);
    }

    /// A request entered the fleet (it counts in the retry budget).
    pub fn request_started(&mut self) {
        self.budget.request_started();
    }

    /// A request left the fleet, with the retries its route took.
    pub fn request_finished(&mut self, retries: u32) {
        for _ in 0..retries {
            self.budget.retry_finished();
        }
        self.budget.request_finished();
    }
}

/// How one attempt ended, when it gave no answer to pass on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptError {
    /// The upstream failed; another may succeed.
    Failed(UpstreamErrorKind),
    /// The upstream refused the connection: nothing was sent (moving on
    /// is no retry).
    Refused,
    /// The upstream is rate limited for this long.
    RateLimited(Duration),
    /// The upstream is overloaded (503 with `Retry-After`): it cools down
    /// without counting as a failure.
    Busy(Duration),
}

/// Sorts a status into retry (5xx, 429, and 4xx that mean the gateway's
/// own configuration is wrong) or carry on (2xx, and the 4xx that are the
/// request's fault, whose body is read next).
pub fn judge_status(status: u16, retry_after_header: Option<&str>) -> Result<(), AttemptError> {
    match status {
        200..=299 | 400 | 413 | 422 => Ok(()),
        429 => Err(AttemptError::RateLimited(retry_after(
            retry_after_header,
            MAX_COOL_DOWN,
        ))),
        503 if retry_after_header.is_some() => Err(AttemptError::Busy(retry_after(
            retry_after_header,
            MAX_COOL_DOWN,
        ))),
        500..=599 => Err(AttemptError::Failed(UpstreamErrorKind::ServerError)),
        _ => Err(AttemptError::Failed(UpstreamErrorKind::ClientError)),
    }
}

/// What went wrong last on a route, for the answer the client gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Last {
    Nothing,
    Failed,
    RateLimited,
}

/// Why a route ended without an upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteEnd {
    /// No pool serves the model.
    UnknownModel,
    /// Every upstream left was rate limited; one frees up in this many
    /// seconds.
    RateLimited {
        /// Seconds until some upstream takes requests again.
        retry_after_secs: u64,
    },
    /// No upstream could answer (or the retry budget is spent).
    Unavailable,
    /// The retry budget allows no more retries now.
    BudgetExhausted,
}

/// An upstream chosen for the next attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Picked {
    /// The upstream.
    pub upstream: usize,
    /// The upstream whose failure this attempt retries.
    pub retry_of: Option<usize>,
    /// Whether this is the first attempt on a fallback tier.
    pub first_fallback: bool,
}

/// One request's way through the fleet.
#[derive(Debug, Clone)]
pub struct Route {
    tiers: Vec<Vec<usize>>,
    tier: usize,
    fallback_counted: usize,
    tried: Vec<usize>,
    last: Last,
    retries: u32,
    /// The last attempt was refused before anything was sent: moving on
    /// from it is no retry.
    unsent: bool,
    prefix: u64,
    prompt_tokens: u32,
    slo: Option<RequestSlo>,
}

impl Route {
    /// A route for a request for `model` whose prompt reads `prompt`, with
    /// the client's SLO if it gave one.
    pub fn new(
        state: &FleetState,
        model: &str,
        prompt: &str,
        slo: Option<RequestSlo>,
    ) -> Result<Self, RouteEnd> {
        let tiers = state.pool_tiers(model);
        if tiers.is_empty() {
            return Err(RouteEnd::UnknownModel);
        }
        Ok(Route {
            tiers,
            tier: 0,
            fallback_counted: 0,
            tried: Vec::new(),
            last: Last::Nothing,
            retries: 0,
            unsent: false,
            prefix: prefix_hash(prompt, PREFIX_CHARS),
            prompt_tokens: estimated_tokens(prompt),
            slo,
        })
    }

    /// The prompt's size in tokens, as estimated from its text.
    pub fn prompt_tokens(&self) -> u32 {
        self.prompt_tokens
    }

    /// The upstreams tried so far, in order.
    pub fn tried(&self) -> &[usize] {
        &self.tried
    }

    /// Retries granted by the budget so far.
    pub fn retries(&self) -> u32 {
        self.retries
    }

    /// The next upstream to try, by the policy, primary pools first; `None`
    /// when none is left. A retry must fit the budget.
    pub fn pick(
        &mut self,
        state: &mut FleetState,
        now: Instant,
    ) -> Result<Option<Picked>, RouteEnd> {
        while self.tier < self.tiers.len() {
            let tier = &self.tiers[self.tier];
            let slo = self
                .slo
                .or_else(|| tier.iter().find_map(|&p| state.pools[p].slo));
            state.sequence += 1;
            let request = RouteRequest {
                prefix_hash: self.prefix,
                prompt_tokens: self.prompt_tokens,
                slo,
                sequence: state.sequence - 1,
            };
            let view = state.view(tier, &self.tried, now);
            let Some(id) = choose(state.policy, &view, &request) else {
                self.tier += 1;
                continue;
            };
            let retry_of = self.tried.last().copied();
            // Moving on from an upstream that took nothing (its connection
            // was refused) adds no load anywhere: it is not a retry.
            if retry_of.is_some() && !self.unsent {
                if !state.budget.try_retry() {
                    return Err(RouteEnd::BudgetExhausted);
                }
                self.retries += 1;
            }
            self.unsent = false;
            let first_fallback = self.tier > self.fallback_counted;
            if first_fallback {
                self.fallback_counted = self.tier;
            }
            self.tried.push(id);
            return Ok(Some(Picked {
                upstream: id,
                retry_of,
                first_fallback,
            }));
        }
        Ok(None)
    }

    /// The attempt on the last upstream picked failed.
    pub fn failed(&mut self) {
        self.last = Last::Failed;
    }

    /// The attempt on the last upstream picked failed before anything was
    /// sent (the connection was refused): the next pick costs no retry.
    pub fn failed_unsent(&mut self) {
        self.last = Last::Failed;
        self.unsent = true;
    }

    /// The last upstream picked is rate limited.
    pub fn rate_limited(&mut self) {
        if self.last == Last::Nothing {
            self.last = Last::RateLimited;
        }
    }

    /// Why the route ended when no upstream is left.
    pub fn end(&self, state: &FleetState, now: Instant) -> RouteEnd {
        match self.last {
            Last::RateLimited => {
                let pools: Vec<usize> = self.tiers.iter().flatten().copied().collect();
                RouteEnd::RateLimited {
                    retry_after_secs: state.soonest_available(&pools, now),
                }
            }
            Last::Failed | Last::Nothing => RouteEnd::Unavailable,
        }
    }
}

/// A prompt's size in tokens, estimated from its text (four bytes a
/// token).
pub fn estimated_tokens(prompt: &str) -> u32 {
    (prompt.len() / 4 + 1).min(u32::MAX as usize) as u32
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const TWO_POOLS: &str = r#"
[router]
policy = "least-load"

[[pool]]
name = "gpu"
model = "m"
accelerator = "h100-sxm"
upstreams = ["http://10.0.0.1:8000/v1", "http://10.0.0.2:8000/v1"]
fallback = "cpu"

[[pool]]
name = "cpu"
model = "m-small"
accelerator = "cpu"
upstreams = ["engine:gemma-3-270m"]
"#;

    fn state() -> FleetState {
        let config = FleetConfig::parse(TWO_POOLS).unwrap();
        FleetState::new(&config, &[1400.0, 20.0]).unwrap()
    }

    #[test]
    fn a_failing_pool_falls_back_and_every_upstream_is_tried_once() {
        let mut state = state();
        let now = Instant::now();
        state.request_started();
        let mut route = Route::new(&state, "m", "hello", None).unwrap();
        let mut picked = Vec::new();
        while let Some(p) = route.pick(&mut state, now).unwrap() {
            picked.push(p);
            route.failed();
        }
        let ids: BTreeSet<usize> = picked.iter().map(|p| p.upstream).collect();
        assert_eq!(ids, BTreeSet::from([0, 1, 2]));
        // The CPU pool is the fallback: tried last, and counted once.
        assert_eq!(picked[2].upstream, 2);
        assert!(
            picked[2].first_fallback && !picked[1].first_fallback,
            "{picked:?}"
        );
        assert_eq!(picked[0].retry_of, None);
        assert_eq!(picked[1].retry_of, Some(picked[0].upstream));
        assert_eq!(route.retries(), 2);
        assert_eq!(route.end(&state, now), RouteEnd::Unavailable);
        assert_eq!(state.upstreams[2].served_model, "gemma-3-270m");
        state.request_finished(route.retries());
        assert_eq!(state.budget, RetryBudget::default());
    }

    /// An upstream that refused the connection took nothing: moving on
    /// from it spends no retry, so a dead upstream loses no request even
    /// when the budget is spent by others' retries.
    #[test]
    fn moving_on_from_a_refused_connection_spends_no_retry() {
        let mut state = state();
        let now = Instant::now();
        state.request_started();
        // Other requests' retries hold the whole budget (its floor).
        let floor = state.budget.min_concurrent;
        for _ in 0..floor {
            assert!(state.budget.try_retry());
        }
        let mut route = Route::new(&state, "m", "hello", None).unwrap();
        let first = route.pick(&mut state, now).unwrap().unwrap();
        route.failed_unsent();
        let second = route.pick(&mut state, now).unwrap().unwrap();
        assert_eq!(second.retry_of, Some(first.upstream));
        assert_eq!(route.retries(), 0);
        // A failure after sending is a retry, and the budget is spent.
        route.failed();
        assert_eq!(
            route.pick(&mut state, now).unwrap_err(),
            RouteEnd::BudgetExhausted
        );
    }

    #[test]
    fn load_and_energy_follow_attempts_on_the_injected_clock() {
        let mut state = state();
        let t0 = Instant::now();
        let a = state.begin_attempt(0, 100, t0);
        let b = state.begin_attempt(0, 50, t0);
        let view = state.view(&[0], &[], t0);
        assert_eq!(view.upstreams[0].outstanding_requests, 2);
        assert_eq!(view.upstreams[0].outstanding_tokens, 150);
        // 700 W shared by two requests for 2 s: 700 J each.
        let joules = state.finish_attempt(a, t0 + Duration::from_secs(2));
        assert!((joules - 700.0).abs() < 1e-6, "{joules}");
        state.finish_attempt(b, t0 + Duration::from_secs(2));
        let view = state.view(&[0], &[], t0);
        assert_eq!(view.upstreams[0].outstanding_requests, 0);
        state.observe(0, Some(1.2), Some(0.05));
        let ttft = state.view(&[0], &[], t0).upstreams[0].base_ttft_s;
        assert!((ttft - (INITIAL_TTFT_S + EWMA_WEIGHT * (1.2 - INITIAL_TTFT_S))).abs() < 1e-12);
    }

    #[test]
    fn rate_limited_routes_say_when_to_come_back() {
        let mut state = state();
        let now = Instant::now();
        let mut route = Route::new(&state, "m", "x", None).unwrap();
        while let Some(p) = route.pick(&mut state, now).unwrap() {
            state.record_rate_limited(p.upstream, now, Duration::from_secs(7));
            route.rate_limited();
        }
        assert_eq!(
            route.end(&state, now),
            RouteEnd::RateLimited {
                retry_after_secs: 7
            }
        );
        assert_eq!(
            Route::new(&state, "other", "x", None).unwrap_err(),
            RouteEnd::UnknownModel
        );
    }

    #[test]
    fn statuses_sort_into_retry_or_answer() {
        assert!(judge_status(200, None).is_ok());
        assert!(judge_status(400, None).is_ok());
        assert!(matches!(
            judge_status(503, None),
            Err(AttemptError::Failed(UpstreamErrorKind::ServerError))
        ));
        assert_eq!(
            judge_status(429, Some("7")),
            Err(AttemptError::RateLimited(Duration::from_secs(7)))
        );
        assert_eq!(
            judge_status(429, Some("100000")),
            Err(AttemptError::RateLimited(MAX_COOL_DOWN))
        );
        assert_eq!(
            judge_status(503, Some("2")),
            Err(AttemptError::Busy(Duration::from_secs(2)))
        );
        assert!(matches!(
            judge_status(401, None),
            Err(AttemptError::Failed(UpstreamErrorKind::ClientError))
        ));
    }
}
