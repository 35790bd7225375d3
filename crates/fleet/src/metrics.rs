//! The fleet's measurements per pool and upstream (requests, errors by
//! kind, retries, ejections, joules, latency histograms), kept with atomics
//! and rendered as Prometheus text. The [`Histogram`] here is also the
//! engine server's.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Bucket bounds of time to first token, in seconds (vLLM's).
pub const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
/// Bucket bounds of inter-token latency, in seconds (vLLM's).
pub const ITL_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
/// Bucket bounds of whole-request latencies, in seconds (vLLM's).
pub const REQUEST_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];
/// Bucket bounds of token counts per request.
pub const TOKEN_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 20000.0,
    50000.0,
];

/// A Prometheus histogram with fixed buckets.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Observations at or below each bound (not cumulative; summed on render).
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    /// Sum of observations, in millionths.
    sum_micros: AtomicU64,
}

impl Histogram {
    /// An empty histogram with these bucket bounds.
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn observe(&self, value: f64) {
        if let Some(i) = self.bounds.iter().position(|&b| value <= b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let micros = (value.max(0.0) * 1e6).round() as u64;
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// Records a duration in seconds.
    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_secs_f64());
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Sum of the observations so far.
    pub fn sum(&self) -> f64 {
        self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
    }

    /// Renders the histogram as one Prometheus family.
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        family_header(out, name, "histogram", help);
        self.render_series(out, name, "");
    }

    /// Renders the series of one label set (`pool="a",upstream="a/0"`, or
    /// empty), without the family's header.
    pub fn render_series(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (bound, n) in self.bounds.iter().zip(&self.buckets) {
            cumulative += n.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
            );
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let braced = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braced} {}", self.sum());
        let _ = writeln!(out, "{name}_count{braced} {count}");
    }
}

/// Writes a family's `# HELP` and `# TYPE` lines.
pub fn family_header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Why an upstream attempt failed, as counted by `upstream_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    /// No connection, or it broke before the headers.
    Connect,
    /// A 5xx status.
    ServerError,
    /// A 429.
    RateLimited,
    /// A 4xx other than 429 (the request's fault, passed on).
    ClientError,
    /// A reply that was not valid JSON or SSE.
    BadReply,
    /// No byte within the allowed time.
    Timeout,
    /// The stream broke off after the first token.
    Broken,
}

impl UpstreamErrorKind {
    const ALL: [UpstreamErrorKind; 7] = [
        UpstreamErrorKind::Connect,
        UpstreamErrorKind::ServerError,
        UpstreamErrorKind::RateLimited,
        UpstreamErrorKind::ClientError,
        UpstreamErrorKind::BadReply,
        UpstreamErrorKind::Timeout,
        UpstreamErrorKind::Broken,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            UpstreamErrorKind::Connect => "connect",
            UpstreamErrorKind::ServerError => "server_error",
            UpstreamErrorKind::RateLimited => "rate_limited",
            UpstreamErrorKind::ClientError => "client_error",
            UpstreamErrorKind::BadReply => "bad_reply",
            UpstreamErrorKind::Timeout => "timeout",
            UpstreamErrorKind::Broken => "broken",
        }
    }
}

/// The counters and histograms of one upstream.
#[derive(Debug)]
pub struct UpstreamMetrics {
    pool: String,
    upstream: String,
    requests: AtomicU64,
    errors: [AtomicU64; 7],
    retries: AtomicU64,
    ejections: AtomicU64,
    /// Joules, in millionths.
    microjoules: AtomicU64,
    /// Time to first token as the gateway saw it.
    pub time_to_first_token: Histogram,
    /// Time between streamed chunks.
    pub inter_token_latency: Histogram,
}

impl UpstreamMetrics {
    /// Metrics of upstream `upstream` in pool `pool`.
    pub fn new(pool: &str, upstream: &str) -> Self {
        UpstreamMetrics {
            pool: pool.to_owned(),
            upstream: upstream.to_owned(),
            requests: AtomicU64::new(0),
            errors: Default::default(),
            retries: AtomicU64::new(0),
            ejections: AtomicU64::new(0),
            microjoules: AtomicU64::new(0),
            time_to_first_token: Histogram::new(TTFT_BUCKETS),
            inter_token_latency: Histogram::new(ITL_BUCKETS),
        }
    }

    /// A request was sent to it.
    pub fn request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests sent so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// An attempt failed.
    pub fn error(&self, kind: UpstreamErrorKind) {
        if let Some(i) = UpstreamErrorKind::ALL.iter().position(|k| *k == kind) {
            self.errors[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Failed attempts of one kind so far.
    pub fn errors(&self, kind: UpstreamErrorKind) -> u64 {
        UpstreamErrorKind::ALL
            .iter()
            .position(|k| *k == kind)
            .map_or(0, |i| self.errors[i].load(Ordering::Relaxed))
    }

    /// A request was retried away from it.
    pub fn retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    /// It was ejected.
    pub fn ejection(&self) {
        self.ejections.fetch_add(1, Ordering::Relaxed);
    }

    /// Ejections so far.
    pub fn ejections(&self) -> u64 {
        self.ejections.load(Ordering::Relaxed)
    }

    /// Energy attributed to its requests.
    pub fn joules(&self, joules: f64) {
        let micro = (joules.max(0.0) * 1e6).round() as u64;
        self.microjoules.fetch_add(micro, Ordering::Relaxed);
    }

    fn labels(&self) -> String {
        format!(
            "pool=\"{}\",upstream=\"{}\"",
            escape(&self.pool),
            escape(&self.upstream)
        )
    }
}

/// A label value with Prometheus escapes.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The metrics of every upstream, and of requests no upstream could take.
#[derive(Debug, Default)]
pub struct FleetMetrics {
    /// Per upstream, in fleet order.
    pub upstreams: Vec<UpstreamMetrics>,
    fallbacks: AtomicU64,
    unserved: AtomicU64,
}

impl FleetMetrics {
    /// Metrics for these upstreams.
    pub fn new(upstreams: Vec<UpstreamMetrics>) -> Self {
        FleetMetrics {
            upstreams,
            ..FleetMetrics::default()
        }
    }

    /// A request went to a fallback pool.
    pub fn fallback(&self) {
        self.fallbacks.fetch_add(1, Ordering::Relaxed);
    }

    /// A request found no upstream able to serve it.
    pub fn unserved(&self) {
        self.unserved.fetch_add(1, Ordering::Relaxed);
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let counter = |out: &mut String,
                       name: &str,
                       help: &str,
                       value: &dyn Fn(&UpstreamMetrics) -> String| {
            family_header(out, name, "counter", help);
            for u in &self.upstreams {
                let _ = writeln!(out, "{name}{{{}}} {}", u.labels(), value(u));
            }
        };
        counter(
            &mut out,
            "neocloud:upstream_requests_total",
            "Requests sent to each upstream (retries included).",
            &|u| u.requests().to_string(),
        );
        counter(
            &mut out,
            "neocloud:upstream_retries_total",
            "Requests retried elsewhere after this upstream failed.",
            &|u| u.retries.load(Ordering::Relaxed).to_string(),
        );
        counter(
            &mut out,
            "neocloud:upstream_ejections_total",
            "Times each upstream was ejected.",
            &|u| u.ejections().to_string(),
        );
        counter(
            &mut out,
            "neocloud:upstream_energy_joules_total",
            "Energy attributed to each upstream's requests.",
            &|u| format!("{:.6}", u.microjoules.load(Ordering::Relaxed) as f64 / 1e6),
        );
        let name = "neocloud:upstream_errors_total";
        family_header(
            &mut out,
            name,
            "counter",
            "Failed upstream attempts, by kind.",
        );
        for u in &self.upstreams {
            for kind in UpstreamErrorKind::ALL {
                let _ = writeln!(
                    out,
                    "{name}{{{},kind=\"{}\"}} {}",
                    u.labels(),
                    kind.label(),
                    u.errors(kind)
                );
            }
        }
        for (name, help, pick) in [
            (
                "neocloud:upstream_time_to_first_token_seconds",
                "Time to first token through each upstream.",
                (|u: &UpstreamMetrics| &u.time_to_first_token)
                    as fn(&UpstreamMetrics) -> &Histogram,
            ),
            (
                "neocloud:upstream_inter_token_latency_seconds",
                "Time between streamed chunks from each upstream.",
                |u: &UpstreamMetrics| &u.inter_token_latency,
            ),
        ] {
            family_header(&mut out, name, "histogram", help);
            for u in &self.upstreams {
                pick(u).render_series(&mut out, name, &u.labels());
            }
        }
        for (name, help, count) in [
            (
                "neocloud:fallback_requests_total",
                "Requests sent to a fallback pool.",
                &self.fallbacks,
            ),
            (
                "neocloud:unserved_requests_total",
                "Requests no upstream could take.",
                &self.unserved,
            ),
        ] {
            family_header(&mut out, name, "counter", help);
            let _ = writeln!(out, "{name} {}", count.load(Ordering::Relaxed));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labelled_series_render_per_upstream() {
        let a = UpstreamMetrics::new("cpu", "cpu/0");
        a.request();
        a.error(UpstreamErrorKind::RateLimited);
        a.joules(1.5);
        a.time_to_first_token.observe(0.05);
        let m = FleetMetrics::new(vec![a, UpstreamMetrics::new("gpu", "gpu/0")]);
        let text = m.render();
        assert!(
            text.contains("neocloud:upstream_requests_total{pool=\"cpu\",upstream=\"cpu/0\"} 1"),
            "{text}"
        );
        assert!(text.contains("neocloud:upstream_errors_total{pool=\"cpu\",upstream=\"cpu/0\",kind=\"rate_limited\"} 1"));
        assert!(text.contains(
            "neocloud:upstream_energy_joules_total{pool=\"cpu\",upstream=\"cpu/0\"} 1.500000"
        ));
        assert!(text.contains("neocloud:upstream_time_to_first_token_seconds_bucket{pool=\"cpu\",upstream=\"cpu/0\",le=\"0.06\"} 1"));
        assert!(text.contains("neocloud:upstream_time_to_first_token_seconds_count{pool=\"gpu\",upstream=\"gpu/0\"} 0"));
        assert_eq!(escape("a\"b"), "a\\\"b");
    }
}
