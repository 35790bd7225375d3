//! `GET /metrics`: Prometheus text exposition, names in the style of vLLM's.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use crate::AppState;

/// Renders the engine's gauges and counters.
pub async fn metrics(State(state): State<AppState>) -> Response {
    let s = state.engine.stats();
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        let _ = writeln!(out, "{name} {value}");
    };
    metric(
        "neocloud:num_requests_running",
        "gauge",
        "Requests generating now.",
        s.running.load(Ordering::Relaxed) as u64,
    );
    metric(
        "neocloud:num_requests_waiting",
        "gauge",
        "Requests queued for the engine.",
        s.waiting.load(Ordering::Relaxed) as u64,
    );
    metric(
        "neocloud:prompt_tokens_total",
        "counter",
        "Prompt tokens processed.",
        s.prompt_tokens.load(Ordering::Relaxed),
    );
    metric(
        "neocloud:generation_tokens_total",
        "counter",
        "Tokens generated.",
        s.generation_tokens.load(Ordering::Relaxed),
    );
    metric(
        "neocloud:request_cancelled_total",
        "counter",
        "Requests ended because the client went away.",
        s.cancelled.load(Ordering::Relaxed),
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
