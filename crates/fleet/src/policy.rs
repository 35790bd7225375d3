//! Routing policies: pure functions from a snapshot of the fleet
//! ([`FleetView`]) and a request to the upstream that should serve it. The
//! gateway calls them per request; the planner can call the same code on a
//! simulated fleet.

use crate::config::Policy;
use crate::error::FleetError;

/// What the router knows of one upstream at one instant.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamView {
    /// Stable identifier (index in the fleet).
    pub id: usize,
    /// Requests sent and not finished.
    pub outstanding_requests: u32,
    /// Prompt and output tokens of those requests still to be processed.
    pub outstanding_tokens: u64,
    /// Sequences it runs at once before requests queue.
    pub slots: u32,
    /// Recent time to first token with an empty queue, seconds.
    pub base_ttft_s: f64,
    /// Recent time per output token at light load, seconds.
    pub base_tpot_s: f64,
    /// Tokens per second it processes when busy (prompt and output).
    pub tokens_per_s: f64,
    /// Power when busy, watts (its share of the pool's).
    pub busy_watts: f64,
    /// Price per hour (its share of the pool's), any currency.
    pub price_per_hour: f64,
    /// Whether it may take requests (healthy, not ejected, not cooling).
    pub available: bool,
}

impl UpstreamView {
    /// Predicted time to first token for a new request of `prompt_tokens`:
    /// the work queued ahead of it, then its own prompt, at the measured rate.
    pub fn predicted_ttft(&self, prompt_tokens: u32) -> f64 {
        let rate = self.tokens_per_s.max(1e-9);
        let queued = if self.outstanding_requests < self.slots {
            0.0
        } else {
            self.outstanding_tokens as f64 / rate
        };
        self.base_ttft_s + queued + prompt_tokens as f64 / rate
    }

    /// Predicted time per output token: sequences beyond the slots share them.
    pub fn predicted_tpot(&self) -> f64 {
        let running = (self.outstanding_requests + 1) as f64;
        let slots = self.slots.max(1) as f64;
        self.base_tpot_s * (running / slots).max(1.0)
    }

    /// Joules per generated token when busy.
    pub fn joules_per_token(&self) -> f64 {
        self.busy_watts / self.tokens_per_s.max(1e-9)
    }

    /// Price per generated token when busy.
    pub fn price_per_token(&self) -> f64 {
        self.price_per_hour / 3600.0 / self.tokens_per_s.max(1e-9)
    }
}

/// A snapshot of the upstreams that can serve one request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FleetView {
    /// The candidates.
    pub upstreams: Vec<UpstreamView>,
}

/// Latency limits of one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RequestSlo {
    /// Time to first token, seconds.
    pub ttft_s: f64,
    /// Time per output token, seconds.
    pub tpot_s: f64,
}

impl RequestSlo {
    /// Parses the `x-neocloud-slo` header: `ttft=500ms,tpot=50ms` (either
    /// part may be left out; a missing limit is no limit).
    pub fn parse_header(value: &str) -> Result<Self, FleetError> {
        let bad = || {
            FleetError::Config(format!(
                "x-neocloud-slo {value:?}: expected ttft=DUR,tpot=DUR with DUR like 500ms or 2s"
            ))
        };
        let mut slo = RequestSlo {
            ttft_s: f64::INFINITY,
            tpot_s: f64::INFINITY,
        };
        let mut any = false;
        for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, duration) = part.split_once('=').ok_or_else(bad)?;
            let seconds = parse_seconds(duration).ok_or_else(bad)?;
            match key.trim() {
                "ttft" => slo.ttft_s = seconds,
                "tpot" => slo.tpot_s = seconds,
                _ => return Err(bad()),
            }
            any = true;
        }
        if any {
            Ok(slo)
        } else {
            Err(bad())
        }
    }
}

/// `500ms`, `2s` or `1.5` (seconds) as seconds.
fn parse_seconds(text: &str) -> Option<f64> {
    let text = text.trim();
    let (number, scale) = match text.strip_suffix("ms") {
        Some(n) => (n, 1e-3),
        None => (text.strip_suffix('s').unwrap_or(text), 1.0),
    };
    number
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v > 0.0)
        .map(|v| v * scale)
}

/// What the router knows of a request.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteRequest {
    /// Hash of the prompt's first tokens or characters.
    pub prefix_hash: u64,
    /// Prompt tokens (or an estimate).
    pub prompt_tokens: u32,
    /// The SLO, from `x-neocloud-slo` or the pool's default.
    pub slo: Option<RequestSlo>,
    /// A counter that advances per request (round-robin).
    pub sequence: u64,
}

/// Load bound of prefix affinity (consistent hashing with bounded loads):
/// an upstream takes a request while its outstanding requests stay below
/// this factor times the mean (counting the new one), or below its slots,
/// since an upstream with a free slot queues nothing.
pub const AFFINITY_LOAD_FACTOR: f64 = 1.25;

/// The upstream that should serve `req`, or `None` when none is available.
pub fn choose(policy: Policy, view: &FleetView, req: &RouteRequest) -> Option<usize> {
    let up: Vec<&UpstreamView> = view.upstreams.iter().filter(|u| u.available).collect();
    if up.is_empty() {
        return None;
    }
    let pick = match policy {
        Policy::RoundRobin => up[(req.sequence % up.len() as u64) as usize],
        Policy::LeastLoad => *up.iter().min_by_key(|u| (u.outstanding_tokens, u.id))?,
        Policy::PrefixAffinity => prefix_affinity(&up, req.prefix_hash)?,
        Policy::Slo => within_slo(&up, req, |u| -headroom(u, req))?,
        Policy::Energy => within_slo(&up, req, UpstreamView::joules_per_token)?,
        Policy::Cost => within_slo(&up, req, UpstreamView::price_per_token)?,
    };
    Some(pick.id)
}

/// Smallest relative slack against the SLO (larger is better).
fn headroom(u: &UpstreamView, req: &RouteRequest) -> f64 {
    match req.slo {
        Some(slo) => {
            let ttft = (slo.ttft_s - u.predicted_ttft(req.prompt_tokens)) / slo.ttft_s;
            let tpot = (slo.tpot_s - u.predicted_tpot()) / slo.tpot_s;
            ttft.min(tpot)
        }
        None => -u.predicted_ttft(req.prompt_tokens),
    }
}

/// Among upstreams predicted to meet the SLO, the one with the lowest
/// `score`; when none does, the one predicted fastest to first token.
fn within_slo<'a>(
    up: &[&'a UpstreamView],
    req: &RouteRequest,
    score: impl Fn(&UpstreamView) -> f64,
) -> Option<&'a UpstreamView> {
    let meets = |u: &&&UpstreamView| match req.slo {
        Some(slo) => {
            u.predicted_ttft(req.prompt_tokens) <= slo.ttft_s && u.predicted_tpot() <= slo.tpot_s
        }
        None => true,
    };
    let by = |a: &&&UpstreamView, b: &&&UpstreamView, f: &dyn Fn(&UpstreamView) -> f64| {
        f(a).total_cmp(&f(b)).then(a.id.cmp(&b.id))
    };
    up.iter()
        .filter(meets)
        .min_by(|a, b| by(a, b, &score))
        .or_else(|| {
            up.iter().min_by(|a, b| {
                by(a, b, &|u: &UpstreamView| {
                    u.predicted_ttft(req.prompt_tokens)
                })
            })
        })
        .copied()
}

/// Rendezvous hashing on the prefix, skipping upstreams loaded beyond the
/// bound, so that a popular prefix spills over instead of piling up.
fn prefix_affinity<'a>(up: &[&'a UpstreamView], prefix_hash: u64) -> Option<&'a UpstreamView> {
    let total: u32 = up.iter().map(|u| u.outstanding_requests).sum();
    let bound = (AFFINITY_LOAD_FACTOR * (total + 1) as f64 / up.len() as f64).ceil() as u32;
    let mut ranked: Vec<&&UpstreamView> = up.iter().collect();
    ranked.sort_by_key(|u| std::cmp::Reverse(mix(prefix_hash ^ mix(u.id as u64))));
    ranked
        .iter()
        .find(|u| u.outstanding_requests < bound.max(u.slots).max(1))
        .or(ranked.first())
        .map(|u| **u)
}

/// SplitMix64's finaliser: spreads hash bits.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// FNV-1a hash of a prompt's first `len` bytes: the prefix key.
pub fn prefix_hash(prompt: &str, len: usize) -> u64 {
    let mut end = len.min(prompt.len());
    while !prompt.is_char_boundary(end) {
        end -= 1;
    }
    prompt.as_bytes()[..end]
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(id: usize) -> UpstreamView {
        UpstreamView {
            id,
            outstanding_requests: 0,
            outstanding_tokens: 0,
            slots: 8,
            base_ttft_s: 0.05,
            base_tpot_s: 0.02,
            tokens_per_s: 2000.0,
            busy_watts: 700.0,
            price_per_hour: 3.0,
            available: true,
        }
    }

    fn request(slo: Option<RequestSlo>) -> RouteRequest {
        RouteRequest {
            prefix_hash: 1,
            prompt_tokens: 200,
            slo,
            sequence: 0,
        }
    }

    #[test]
    fn energy_picks_the_frugal_pool_when_both_meet_the_slo_and_the_fast_one_otherwise() {
        // 0: a fast GPU drawing 700 W; 1: an NPU at 150 W, slower per token.
        let gpu = upstream(0);
        let npu = UpstreamView {
            busy_watts: 150.0,
            tokens_per_s: 1000.0,
            base_tpot_s: 0.03,
            base_ttft_s: 0.1,
            ..upstream(1)
        };
        assert!(npu.joules_per_token() < gpu.joules_per_token());
        let view = FleetView {
            upstreams: vec![gpu.clone(), npu.clone()],
        };
        let loose = Some(RequestSlo {
            ttft_s: 1.0,
            tpot_s: 0.05,
        });
        assert_eq!(choose(Policy::Energy, &view, &request(loose)), Some(1));
        // Only the GPU meets a tight TPOT limit.
        let tight = Some(RequestSlo {
            ttft_s: 1.0,
            tpot_s: 0.025,
        });
        assert_eq!(choose(Policy::Energy, &view, &request(tight)), Some(0));
        // Neither meets an impossible one: the faster to first token.
        let impossible = Some(RequestSlo {
            ttft_s: 0.001,
            tpot_s: 0.001,
        });
        assert_eq!(choose(Policy::Energy, &view, &request(impossible)), Some(0));
        // Load moves the prediction: a queued NPU no longer meets the TTFT.
        let busy_npu = UpstreamView {
            outstanding_requests: 8,
            outstanding_tokens: 4000,
            ..npu
        };
        let view = FleetView {
            upstreams: vec![gpu, busy_npu],
        };
        assert_eq!(choose(Policy::Energy, &view, &request(loose)), Some(0));
    }

    #[test]
    fn cost_and_slo_policies_rank_by_price_and_headroom() {
        let cheap = UpstreamView {
            price_per_hour: 1.0,
            base_tpot_s: 0.04,
            ..upstream(1)
        };
        let view = FleetView {
            upstreams: vec![upstream(0), cheap],
        };
        let slo = Some(RequestSlo {
            ttft_s: 1.0,
            tpot_s: 0.05,
        });
        assert_eq!(choose(Policy::Cost, &view, &request(slo)), Some(1));
        assert_eq!(choose(Policy::Slo, &view, &request(slo)), Some(0));
    }

    #[test]
    fn prefix_affinity_keeps_a_prefix_on_one_upstream_while_load_stays_bounded() {
        let mut view = FleetView {
            upstreams: (0..4).map(upstream).collect(),
        };
        let shared = prefix_hash("You are a helpful assistant. Answer briefly.", 32);
        let req = |sequence| RouteRequest {
            prefix_hash: shared,
            prompt_tokens: 100,
            slo: None,
            sequence,
        };
        let first = choose(Policy::PrefixAffinity, &view, &req(0)).unwrap();
        // Light load: every request with the prefix goes to the same place.
        for s in 1..3 {
            view.upstreams[first].outstanding_requests += 1;
            assert_eq!(choose(Policy::PrefixAffinity, &view, &req(s)), Some(first));
        }
        // Piled up beyond the bound: the next one spills over, and no
        // upstream ever holds more than the bound.
        view.upstreams[first].outstanding_requests = 10;
        let other = choose(Policy::PrefixAffinity, &view, &req(9)).unwrap();
        assert_ne!(other, first);
        let mut loads = vec![0u32; 4];
        let mut view = FleetView {
            upstreams: (0..4).map(upstream).collect(),
        };
        for s in 0..40 {
            let i = choose(Policy::PrefixAffinity, &view, &req(s)).unwrap();
            loads[i] += 1;
            view.upstreams[i].outstanding_requests += 1;
        }
        let bound = (AFFINITY_LOAD_FACTOR * 40.0 / 4.0).ceil() as u32;
        assert!(loads.iter().all(|&l| l <= bound), "{loads:?}");
        // Different prefixes spread over the upstreams.
        let view = FleetView {
            upstreams: (0..4).map(upstream).collect(),
        };
        let spread: std::collections::BTreeSet<usize> = (0..64)
            .map(|k| {
                let r = RouteRequest {
                    prefix_hash: prefix_hash(&format!("system prompt number {k}"), 32),
                    ..req(0)
                };
                choose(Policy::PrefixAffinity, &view, &r).unwrap()
            })
            .collect();
        assert_eq!(spread.len(), 4);
    }

    #[test]
    fn slo_headers_parse() {
        let slo = RequestSlo::parse_header("ttft=500ms, tpot=50ms").unwrap();
        assert_eq!((slo.ttft_s, slo.tpot_s), (0.5, 0.05));
        let only = RequestSlo::parse_header("tpot=0.1s").unwrap();
        assert!(only.ttft_s.is_infinite() && only.tpot_s == 0.1);
        for bad in [
            "",
            "ttft",
            "ttft=fast",
            "latency=1s",
            "ttft=0ms",
            "ttft=-1s",
        ] {
            assert!(RequestSlo::parse_header(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn round_robin_and_least_load_skip_unavailable_upstreams() {
        let mut view = FleetView {
            upstreams: (0..3).map(upstream).collect(),
        };
        view.upstreams[1].available = false;
        let picks: Vec<usize> = (0..4)
            .map(|s| {
                let r = RouteRequest {
                    sequence: s,
                    ..request(None)
                };
                choose(Policy::RoundRobin, &view, &r).unwrap()
            })
            .collect();
        assert_eq!(picks, vec![0, 2, 0, 2]);
        view.upstreams[0].outstanding_tokens = 500;
        assert_eq!(choose(Policy::LeastLoad, &view, &request(None)), Some(2));
        for u in &mut view.upstreams {
            u.available = false;
        }
        assert_eq!(choose(Policy::LeastLoad, &view, &request(None)), None);
    }
}
