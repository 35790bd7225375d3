//! Upstream health as plain state driven by the caller's clock: outlier
//! ejection after consecutive failures (each ejection longer than the last,
//! never more than a share of the pool at once), cool-down after a 429's
//! `Retry-After`, and the retry budget that keeps retries from multiplying
//! load during an incident. No I/O here, so every rule is tested directly.

use std::time::{Duration, Instant};

/// Tuning of ejection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EjectionPolicy {
    /// Consecutive failures that eject an upstream.
    pub consecutive_failures: u32,
    /// First ejection's length; each later one doubles it.
    pub base_ejection: Duration,
    /// Longest ejection.
    pub max_ejection: Duration,
    /// Largest share of a pool's upstreams ejected at once (at least one
    /// upstream always stays in).
    pub max_ejected_share: f64,
}

impl Default for EjectionPolicy {
    fn default() -> Self {
        EjectionPolicy {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejected_share: 0.5,
        }
    }
}

/// Health of one upstream.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UpstreamHealth {
    consecutive_failures: u32,
    /// Ejections so far (the next one lasts `base * 2^times`).
    times_ejected: u32,
    ejected_until: Option<Instant>,
    cooling_until: Option<Instant>,
    /// The last active health check failed.
    check_failed: bool,
}

impl UpstreamHealth {
    /// Whether requests may go to it at `now`.
    pub fn available(&self, now: Instant) -> bool {
        !self.check_failed
            && self.ejected_until.is_none_or(|t| now >= t)
            && self.cooling_until.is_none_or(|t| now >= t)
    }

    /// Whether it is ejected at `now`.
    pub fn ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|t| now < t)
    }

    /// When the current ejection or cool-down ends, if either is set.
    pub fn unavailable_until(&self) -> Option<Instant> {
        match (self.ejected_until, self.cooling_until) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// Ejections so far.
    pub fn times_ejected(&self) -> u32 {
        self.times_ejected
    }

    /// The upstream answered well.
    pub fn record_success(&mut self) {
        self.consecutive_failures = 0;
    }

    /// It answered 429 with `Retry-After`: no requests until then.
    pub fn record_rate_limited(&mut self, now: Instant, retry_after: Duration) {
        self.cooling_until = Some(now + retry_after);
    }

    /// The result of an active health check.
    pub fn record_check(&mut self, ok: bool) {
        self.check_failed = !ok;
    }
}

/// The health of a pool's upstreams, with the ejection rules.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolHealth {
    policy: EjectionPolicy,
    upstreams: Vec<UpstreamHealth>,
}

impl PoolHealth {
    /// A pool of `n` healthy upstreams.
    pub fn new(n: usize, policy: EjectionPolicy) -> Self {
        PoolHealth {
            policy,
            upstreams: vec![UpstreamHealth::default(); n],
        }
    }

    /// One upstream's health.
    pub fn upstream(&self, i: usize) -> Option<&UpstreamHealth> {
        self.upstreams.get(i)
    }

    /// Whether upstream `i` may take requests at `now`.
    pub fn available(&self, i: usize, now: Instant) -> bool {
        self.upstreams.get(i).is_some_and(|u| u.available(now))
    }

    /// Upstream `i` answered well.
    pub fn record_success(&mut self, i: usize) {
        if let Some(u) = self.upstreams.get_mut(i) {
            u.record_success();
        }
    }

    /// Upstream `i` failed (5xx, reset, timeout). Returns whether this
    /// ejected it: after enough consecutive failures, for a time that
    /// doubles with each ejection, unless the pool already has its share out.
    pub fn record_failure(&mut self, i: usize, now: Instant) -> bool {
        let ejected_now = self.upstreams.iter().filter(|u| u.ejected(now)).count();
        let cap = ((self.upstreams.len() as f64 * self.policy.max_ejected_share).floor() as usize)
            .min(self.upstreams.len().saturating_sub(1));
        let policy = self.policy;
        let Some(u) = self.upstreams.get_mut(i) else {
            return false;
        };
        u.consecutive_failures += 1;
        if u.consecutive_failures < policy.consecutive_failures
            || u.ejected(now)
            || ejected_now >= cap
        {
            return false;
        }
        let factor = 2u32.saturating_pow(u.times_ejected.min(16));
        let length = policy
            .base_ejection
            .saturating_mul(factor)
            .min(policy.max_ejection);
        u.ejected_until = Some(now + length);
        u.times_ejected += 1;
        u.consecutive_failures = 0;
        true
    }

    /// Upstream `i` answered 429 with `Retry-After`.
    pub fn record_rate_limited(&mut self, i: usize, now: Instant, retry_after: Duration) {
        if let Some(u) = self.upstreams.get_mut(i) {
            u.record_rate_limited(now, retry_after);
        }
    }

    /// An active health check of upstream `i` finished.
    pub fn record_check(&mut self, i: usize, ok: bool) {
        if let Some(u) = self.upstreams.get_mut(i) {
            u.record_check(ok);
        }
    }
}

/// Retries allowed as a share of requests in flight, with a floor, so that
/// retries cannot multiply load when a whole pool is failing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryBudget {
    /// Share of active requests that may be retries.
    pub ratio: f64,
    /// Retries always allowed at once, whatever the load.
    pub min_concurrent: u32,
    active_requests: u32,
    active_retries: u32,
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget {
            ratio: 0.2,
            min_concurrent: 3,
            active_requests: 0,
            active_retries: 0,
        }
    }
}

impl RetryBudget {
    /// A request started.
    pub fn request_started(&mut self) {
        self.active_requests += 1;
    }

    /// A request ended (whatever its retries did).
    pub fn request_finished(&mut self) {
        self.active_requests = self.active_requests.saturating_sub(1);
    }

    /// Asks for a retry; `true` means go, and [`RetryBudget::retry_finished`]
    /// must follow.
    pub fn try_retry(&mut self) -> bool {
        let allowed =
            ((self.active_requests as f64 * self.ratio).floor() as u32).max(self.min_concurrent);
        if self.active_retries < allowed {
            self.active_retries += 1;
            true
        } else {
            false
        }
    }

    /// A retry ended.
    pub fn retry_finished(&mut self) {
        self.active_retries = self.active_retries.saturating_sub(1);
    }
}

/// Seconds of a `Retry-After` header (delta seconds; HTTP dates are taken
/// as one second), capped so that an upstream cannot switch itself off.
pub fn retry_after(header: Option<&str>, cap: Duration) -> Duration {
    let secs = header
        .and_then(|h| h.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .unwrap_or(1.0);
    // Capped before the conversion: a `Duration` cannot hold every f64
    // (`1e300` would panic), and the cap bounds the wait anyway.
    Duration::from_secs_f64(secs.min(cap.as_secs_f64()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::strategy::Strategy;

    fn policy() -> EjectionPolicy {
        EjectionPolicy {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(35),
            max_ejected_share: 0.5,
        }
    }

    #[test]
    fn consecutive_failures_eject_for_a_growing_time() {
        let t0 = Instant::now();
        let mut pool = PoolHealth::new(4, policy());
        assert!(!pool.record_failure(0, t0));
        assert!(!pool.record_failure(0, t0));
        assert!(pool.record_failure(0, t0));
        assert!(!pool.available(0, t0 + Duration::from_secs(9)));
        assert!(pool.available(0, t0 + Duration::from_secs(10)));
        // A success resets the count.
        let t1 = t0 + Duration::from_secs(11);
        pool.record_failure(0, t1);
        pool.record_success(0);
        assert!(!pool.record_failure(0, t1));
        assert!(!pool.record_failure(0, t1));
        // Second ejection: twice as long; third: capped at the maximum.
        assert!(pool.record_failure(0, t1));
        assert!(!pool.available(0, t1 + Duration::from_secs(19)));
        assert!(pool.available(0, t1 + Duration::from_secs(20)));
        let t2 = t1 + Duration::from_secs(21);
        for _ in 0..3 {
            pool.record_failure(0, t2);
        }
        assert!(!pool.available(0, t2 + Duration::from_secs(34)));
        assert!(pool.available(0, t2 + Duration::from_secs(35)));
        assert_eq!(pool.upstream(0).unwrap().times_ejected(), 3);
    }

    #[test]
    fn no_more_than_the_share_is_ejected_and_one_always_stays() {
        let t0 = Instant::now();
        let mut pool = PoolHealth::new(4, policy());
        let mut ejected = 0;
        for i in 0..4 {
            for _ in 0..3 {
                if pool.record_failure(i, t0) {
                    ejected += 1;
                }
            }
        }
        assert_eq!(ejected, 2, "half of four");
        assert_eq!((0..4).filter(|&i| pool.available(i, t0)).count(), 2);
        let mut single = PoolHealth::new(1, policy());
        for _ in 0..10 {
            assert!(!single.record_failure(0, t0));
        }
        assert!(single.available(0, t0));
    }

    #[test]
    fn rate_limits_cool_down_and_checks_gate() {
        let t0 = Instant::now();
        let mut pool = PoolHealth::new(2, policy());
        let wait = retry_after(Some("7"), Duration::from_secs(60));
        assert_eq!(wait, Duration::from_secs(7));
        pool.record_rate_limited(1, t0, wait);
        assert!(!pool.available(1, t0 + Duration::from_secs(6)));
        assert!(pool.available(1, t0 + Duration::from_secs(7)));
        assert!(pool.available(0, t0));
        pool.record_check(0, false);
        assert!(!pool.available(0, t0));
        pool.record_check(0, true);
        assert!(pool.available(0, t0));
        assert_eq!(
            retry_after(Some("9999"), Duration::from_secs(60)),
            Duration::from_secs(60)
        );
        assert_eq!(
            retry_after(
                Some("Wed, 21 Oct 2015 07:28:00 GMT"),
                Duration::from_secs(60)
            ),
            Duration::from_secs(1)
        );
        assert_eq!(
            retry_after(None, Duration::from_secs(60)),
            Duration::from_secs(1)
        );
    }

    proptest::proptest! {
        /// Whatever an upstream puts in `Retry-After` (numbers of any size
        /// and form, dates, garbage), the parser answers a bounded wait and
        /// never panics.
        #[test]
        fn any_retry_after_header_gives_a_bounded_wait(
            header in proptest::prop_oneof![
                proptest::num::f64::ANY.prop_map(|x| x.to_string()),
                (0u32..400, -400i32..400).prop_map(|(m, e)| format!("{m}e{e}")),
                "[ 0-9eE.+-]{0,24}",
                ".{0,40}",
            ],
            cap_secs in 0u64..100_000,
        ) {
            let cap = Duration::from_secs(cap_secs);
            let wait = retry_after(Some(&header), cap);
            proptest::prop_assert!(wait <= cap.max(Duration::from_secs(1)));
        }
    }

    #[test]
    fn huge_and_odd_retry_after_values_are_capped() {
        let cap = Duration::from_secs(60);
        for header in [
            "1e300",
            "1.7976931348623157e308",
            "18446744073709551616",
            "inf",
            "NaN",
            "-5",
            "1e-300",
        ] {
            let wait = retry_after(Some(header), cap);
            assert!(wait <= cap, "{header}: {wait:?}");
        }
        assert_eq!(retry_after(Some("1e300"), cap), cap);
        assert_eq!(retry_after(Some(" 30 "), cap), Duration::from_secs(30));
    }

    #[test]
    fn retries_stay_within_the_budget() {
        let mut budget = RetryBudget::default();
        // Few requests: the floor of three applies.
        for _ in 0..5 {
            budget.request_started();
        }
        assert!((0..3).all(|_| budget.try_retry()));
        assert!(!budget.try_retry());
        budget.retry_finished();
        assert!(budget.try_retry());
        // Many requests: 20% of them.
        let mut budget = RetryBudget::default();
        for _ in 0..100 {
            budget.request_started();
        }
        let granted = (0..50).filter(|_| budget.try_retry()).count();
        assert_eq!(granted, 20);
        for _ in 0..100 {
            budget.request_finished();
        }
        assert!(!budget.try_retry(), "20 retries still out, floor is 3");
    }
}
