//! The server's measurements: gauges, counters and latency histograms,
//! updated lock-free by the engine thread and the HTTP layer, rendered as
//! Prometheus text by `GET /metrics` (names in the style of vLLM's).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use neocloud_engine::scheduler::SlotGauges;
pub use neocloud_fleet::metrics::Histogram;
use neocloud_fleet::metrics::{ITL_BUCKETS, REQUEST_BUCKETS, TOKEN_BUCKETS, TTFT_BUCKETS};

/// Why a request left the engine, as counted by `request_success_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FinishedReason {
    /// A stop token or stop string.
    Stop,
    /// The token or context limit.
    Length,
    /// The client went away.
    Abort,
    /// The engine failed.
    Error,
}

impl FinishedReason {
    const ALL: [FinishedReason; 4] = [
        FinishedReason::Stop,
        FinishedReason::Length,
        FinishedReason::Abort,
        FinishedReason::Error,
    ];

    fn label(self) -> &'static str {
        match self {
            FinishedReason::Stop => "stop",
            FinishedReason::Length => "length",
            FinishedReason::Abort => "abort",
            FinishedReason::Error => "error",
        }
    }
}

/// Everything `/metrics` reports.
#[derive(Debug)]
pub struct Metrics {
    /// Jobs waiting to start and jobs running, counted by their claims.
    pub slots: Arc<SlotGauges>,
    /// Key/value blocks held by running jobs, all models together.
    pub kv_blocks_used: AtomicUsize,
    /// Key/value blocks in the pools of all models.
    pub kv_blocks_total: AtomicUsize,
    /// Running jobs whose blocks were taken back to make room (they run
    /// their positions again later).
    pub preemptions: AtomicU64,
    /// Times the engine loop failed outside any one request's pass and
    /// started afresh (the requests it held failed).
    pub engine_restarts: AtomicU64,
    /// Client connections open now.
    pub open_connections: Arc<AtomicUsize>,
    /// Prompt tokens processed.
    pub prompt_tokens: AtomicU64,
    /// Tokens generated (aborted jobs included).
    pub generation_tokens: AtomicU64,
    /// Prompt tokens whose keys and values came from the prefix cache.
    pub prefix_cache_hit_tokens: AtomicU64,
    finished: [AtomicU64; 4],
    /// Time from arrival to the first generated token.
    pub time_to_first_token: Histogram,
    /// Time between consecutive generated tokens.
    pub inter_token_latency: Histogram,
    /// Time from arrival to the last token.
    pub e2e_request_latency: Histogram,
    /// Time spent waiting in the queue.
    pub queue_time: Histogram,
    /// Prompt tokens per finished request.
    pub request_prompt_tokens: Histogram,
    /// Generated tokens per finished request.
    pub request_generation_tokens: Histogram,
    http_requests: Mutex<BTreeMap<(String, u16), u64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            slots: SlotGauges::new(),
            kv_blocks_used: AtomicUsize::new(0),
            kv_blocks_total: AtomicUsize::new(0),
            preemptions: AtomicU64::new(0),
            engine_restarts: AtomicU64::new(0),
            open_connections: Arc::new(AtomicUsize::new(0)),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            prefix_cache_hit_tokens: AtomicU64::new(0),
            finished: Default::default(),
            time_to_first_token: Histogram::new(TTFT_BUCKETS),
            inter_token_latency: Histogram::new(ITL_BUCKETS),
            e2e_request_latency: Histogram::new(REQUEST_BUCKETS),
            queue_time: Histogram::new(REQUEST_BUCKETS),
            request_prompt_tokens: Histogram::new(TOKEN_BUCKETS),
            request_generation_tokens: Histogram::new(TOKEN_BUCKETS),
            http_requests: Mutex::new(BTreeMap::new()),
        }
    }
}

impl Metrics {
    /// Counts a request that left the engine.
    pub fn finished(&self, reason: FinishedReason) {
        self.finished[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Requests that left the engine for `reason`.
    pub fn finished_count(&self, reason: FinishedReason) -> u64 {
        self.finished[reason as usize].load(Ordering::Relaxed)
    }

    /// Counts an HTTP response.
    pub fn http_response(&self, endpoint: &str, status: u16) {
        if let Ok(mut map) = self.http_requests.lock() {
            *map.entry((endpoint.to_owned(), status)).or_insert(0) += 1;
        }
    }

    /// Prometheus text exposition of everything.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut scalar = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {value}");
        };
        let load = |a: &AtomicUsize| a.load(Ordering::Relaxed);
        scalar(
            "neocloud:num_requests_running",
            "gauge",
            "Requests in the engine now.",
            self.slots.running().to_string(),
        );
        scalar(
            "neocloud:num_requests_waiting",
            "gauge",
            "Requests queued for the engine.",
            self.slots.waiting().to_string(),
        );
        let capacity = load(&self.kv_blocks_total);
        let usage = if capacity == 0 {
            0.0
        } else {
            load(&self.kv_blocks_used) as f64 / capacity as f64
        };
        scalar(
            "neocloud:kv_cache_usage_perc",
            "gauge",
            "Share of the key/value blocks held by running requests (1 = full).",
            format!("{usage:.6}"),
        );
        scalar(
            "neocloud:num_preemptions_total",
            "counter",
            "Running requests whose key/value blocks were taken back, to be computed again.",
            self.preemptions.load(Ordering::Relaxed).to_string(),
        );
        scalar(
            "neocloud:open_connections",
            "gauge",
            "Client connections open now.",
            self.open_connections.load(Ordering::Relaxed).to_string(),
        );
        scalar(
            "neocloud:engine_restarts_total",
            "counter",
            "Times the engine failed outside a request's own pass and started afresh.",
            self.engine_restarts.load(Ordering::Relaxed).to_string(),
        );
        scalar(
            "neocloud:prompt_tokens_total",
            "counter",
            "Prompt tokens processed.",
            self.prompt_tokens.load(Ordering::Relaxed).to_string(),
        );
        scalar(
            "neocloud:generation_tokens_total",
            "counter",
            "Tokens generated.",
            self.generation_tokens.load(Ordering::Relaxed).to_string(),
        );
        scalar(
            "neocloud:prefix_cache_hit_tokens_total",
            "counter",
            "Prompt tokens served from the prefix cache instead of a forward pass.",
            self.prefix_cache_hit_tokens
                .load(Ordering::Relaxed)
                .to_string(),
        );
        let name = "neocloud:request_success_total";
        let _ = writeln!(
            out,
            "# HELP {name} Requests that left the engine, by reason."
        );
        let _ = writeln!(out, "# TYPE {name} counter");
        for reason in FinishedReason::ALL {
            let n = self.finished_count(reason);
            let _ = writeln!(out, "{name}{{finished_reason=\"{}\"}} {n}", reason.label());
        }
        let name = "neocloud:http_requests_total";
        let _ = writeln!(out, "# HELP {name} HTTP responses, by endpoint and status.");
        let _ = writeln!(out, "# TYPE {name} counter");
        if let Ok(map) = self.http_requests.lock() {
            for ((endpoint, status), n) in map.iter() {
                let _ = writeln!(
                    out,
                    "{name}{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}"
                );
            }
        }
        let histograms = [
            (
                &self.time_to_first_token,
                "neocloud:time_to_first_token_seconds",
                "Time from arrival to the first generated token.",
            ),
            (
                &self.inter_token_latency,
                "neocloud:inter_token_latency_seconds",
                "Time between consecutive generated tokens.",
            ),
            (
                &self.e2e_request_latency,
                "neocloud:e2e_request_latency_seconds",
                "Time from arrival to the end of the request.",
            ),
            (
                &self.queue_time,
                "neocloud:request_queue_time_seconds",
                "Time spent waiting for the engine.",
            ),
            (
                &self.request_prompt_tokens,
                "neocloud:request_prompt_tokens",
                "Prompt tokens per request.",
            ),
            (
                &self.request_generation_tokens,
                "neocloud:request_generation_tokens",
                "Generated tokens per request.",
            ),
        ];
        for (h, name, help) in histograms {
            h.render(&mut out, name, help);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_sum_in_seconds() {
        let h = Histogram::new(&[0.1, 1.0]);
        h.observe(0.05);
        h.observe(0.5);
        h.observe(0.7);
        h.observe(3.0);
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"0.1\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"1\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 4\n"), "{out}");
        assert!(out.contains("x_count 4\n"), "{out}");
        assert!((h.sum() - 4.25).abs() < 1e-9);
    }

    #[test]
    fn http_responses_are_counted_by_endpoint_and_status() {
        let m = Metrics::default();
        m.http_response("/v1/models", 200);
        m.http_response("/v1/models", 200);
        m.http_response("/v1/chat/completions", 400);
        let out = m.render();
        assert!(
            out.contains("neocloud:http_requests_total{endpoint=\"/v1/models\",status=\"200\"} 2")
        );
        assert!(out.contains(
            "neocloud:http_requests_total{endpoint=\"/v1/chat/completions\",status=\"400\"} 1"
        ));
    }
}
