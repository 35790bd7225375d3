//! Results: per level and target, the latency summaries, throughput,
//! goodput, errors and energy; written as versioned JSON, a console table,
//! and (in `html`) a self-contained page.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::client::Outcome;
use crate::load::Load;
use crate::power::Energy;
use crate::stats::{Slo, Summary};

/// The JSON schema's name and version; bumped on incompatible changes.
pub const SCHEMA: &str = "neocloud-bench/1";

/// A target as reported.
#[derive(Debug, Clone, Serialize)]
pub struct TargetInfo {
    /// Name.
    pub name: String,
    /// Base URL.
    pub base_url: String,
    /// Model asked for.
    pub model: String,
}

/// Goodput of a level.
#[derive(Debug, Clone, Serialize)]
pub struct Goodput {
    /// Requests per second that met every limit.
    pub requests_per_s: f64,
    /// Share of requests that met every limit.
    pub share: f64,
    /// Whether the level meets the SLO as MLPerf judges a run: p99 TTFT
    /// and p99 TPOT within the limits (and p99 end-to-end, when given).
    pub p99_within_slo: bool,
}

/// One level against one target.
#[derive(Debug, Clone, Serialize)]
pub struct LevelReport {
    /// Index of the target in `targets`.
    pub target: usize,
    /// The load.
    pub load: Load,
    /// Requests sent.
    pub requests: usize,
    /// Requests answered in full.
    pub completed: usize,
    /// Failed requests by kind (`http_503`, `timeout`, `stream`...).
    pub errors: BTreeMap<String, usize>,
    /// Seconds from the first send to the last answer.
    pub duration_s: f64,
    /// Time to first token.
    pub ttft_s: Summary,
    /// Time per output token after the first.
    pub tpot_s: Summary,
    /// Gaps between chunks with text.
    pub itl_s: Summary,
    /// Whole request.
    pub e2e_s: Summary,
    /// Prompt tokens per request (from `usage`).
    pub input_tokens: Summary,
    /// Generated tokens per request (from `usage`).
    pub output_tokens: Summary,
    /// Completed requests per second.
    pub request_throughput: f64,
    /// Generated tokens per second.
    pub output_throughput: f64,
    /// Prompt and generated tokens per second.
    pub total_throughput: f64,
    /// Goodput, when an SLO was given.
    pub goodput: Option<Goodput>,
    /// Energy, when a power source was given.
    pub energy: Option<Energy>,
    /// Per-request samples (seconds), for distributions.
    pub samples: Samples,
}

/// Raw per-request figures of a level.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Samples {
    /// Time to first token of each completed request.
    pub ttft_s: Vec<f64>,
    /// End-to-end time of each completed request.
    pub e2e_s: Vec<f64>,
}

impl LevelReport {
    /// Summarises the outcomes of one level.
    pub fn new(
        target: usize,
        load: Load,
        outcomes: &[Outcome],
        duration_s: f64,
        slo: Option<&Slo>,
        energy: Option<Energy>,
    ) -> Self {
        let ok: Vec<&Outcome> = outcomes.iter().filter(|o| o.error.is_none()).collect();
        let mut errors = BTreeMap::new();
        for o in outcomes {
            if let Some(kind) = &o.error {
                *errors.entry(kind.clone()).or_insert(0) += 1;
            }
        }
        let ttft: Vec<f64> = ok.iter().filter_map(|o| o.ttft).collect();
        let tpot: Vec<f64> = ok.iter().filter_map(|o| o.tpot()).collect();
        let itl: Vec<f64> = ok
            .iter()
            .flat_map(|o| o.chunk_gaps.iter().copied())
            .collect();
        let e2e: Vec<f64> = ok.iter().map(|o| o.e2e).collect();
        let inputs: Vec<f64> = ok
            .iter()
            .filter_map(|o| o.input_tokens)
            .map(|t| t as f64)
            .collect();
        let outputs: Vec<f64> = ok.iter().map(|o| o.output_tokens as f64).collect();
        let per_s = |x: f64| {
            if duration_s > 0.0 {
                x / duration_s
            } else {
                0.0
            }
        };
        let out_tokens: f64 = outputs.iter().sum();
        let in_tokens: f64 = inputs.iter().sum();
        let goodput = slo.map(|slo| {
            let good = ok
                .iter()
                .filter(|o| slo.met_by(o.ttft.unwrap_or(f64::INFINITY), o.tpot(), o.e2e))
                .count();
            let ttft_p99 = Summary::of(&ttft).p99;
            let tpot_p99 = Summary::of(&tpot).p99;
            let e2e_p99 = Summary::of(&e2e).p99;
            Goodput {
                requests_per_s: per_s(good as f64),
                share: if outcomes.is_empty() {
                    0.0
                } else {
                    good as f64 / outcomes.len() as f64
                },
                p99_within_slo: errors.is_empty()
                    && !ok.is_empty()
                    && slo.ttft_s.is_none_or(|l| ttft_p99 <= l)
                    && slo.tpot_s.is_none_or(|l| tpot_p99 <= l)
                    && slo.e2e_s.is_none_or(|l| e2e_p99 <= l),
            }
        });
        LevelReport {
            target,
            load,
            requests: outcomes.len(),
            completed: ok.len(),
            errors,
            duration_s,
            ttft_s: Summary::of(&ttft),
            tpot_s: Summary::of(&tpot),
            itl_s: Summary::of(&itl),
            e2e_s: Summary::of(&e2e),
            input_tokens: Summary::of(&inputs),
            output_tokens: Summary::of(&outputs),
            request_throughput: per_s(ok.len() as f64),
            output_throughput: per_s(out_tokens),
            total_throughput: per_s(out_tokens + in_tokens),
            goodput,
            energy,
            samples: Samples {
                ttft_s: ttft,
                e2e_s: e2e,
            },
        }
    }
}

/// A whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// [`SCHEMA`].
    pub schema: String,
    /// Unix seconds at the start.
    pub started_at: u64,
    /// The seed of prompts and arrivals.
    pub seed: u64,
    /// The command line's settings, for the record.
    pub settings: serde_json::Value,
    /// The SLO goodput was judged against.
    pub slo: Option<Slo>,
    /// The endpoints, in order.
    pub targets: Vec<TargetInfo>,
    /// Every level of every target, in the order run.
    pub levels: Vec<LevelReport>,
    /// For `--sweep`: per target, the highest rate found within the SLO.
    pub sweep: Vec<Option<f64>>,
}

fn ms(s: f64) -> String {
    format!("{:.1}", s * 1000.0)
}

impl Report {
    /// The console table: one row per level and target.
    pub fn table(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "{:<14} {:>12} {:>5} {:>5} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>8}\n",
            "target",
            "load",
            "ok",
            "err",
            "ttft p50",
            "ttft p99",
            "tpot p50",
            "itl p50",
            "e2e p50",
            "out tok/s",
            "goodput"
        ));
        for l in &self.levels {
            let name = self.targets.get(l.target).map_or("?", |t| t.name.as_str());
            let load = match l.load {
                Load::Concurrency(c) => format!("conc {c}"),
                Load::Rate(r) => format!("rate {r}/s"),
            };
            let errors: usize = l.errors.values().sum();
            let goodput = l
                .goodput
                .as_ref()
                .map_or("-".into(), |g| format!("{:.2}/s", g.requests_per_s));
            out.push_str(&format!(
                "{:<14} {:>12} {:>5} {:>5} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10.1} {:>8}\n",
                name,
                load,
                l.completed,
                errors,
                ms(l.ttft_s.p50),
                ms(l.ttft_s.p99),
                ms(l.tpot_s.p50),
                ms(l.itl_s.p50),
                ms(l.e2e_s.p50),
                l.output_throughput,
                goodput
            ));
            if let Some(e) = &l.energy {
                out.push_str(&format!(
                    "{:<14} {:>12} energy: {:.1} W mean, {:.3} J/token, {:.2} tokens/J{}\n",
                    "",
                    "",
                    e.mean_watts,
                    e.joules_per_output_token,
                    e.output_tokens_per_joule,
                    if e.estimate { " (estimate)" } else { "" }
                ));
            }
        }
        out.push_str("latencies in ms\n");
        for (t, best) in self.targets.iter().zip(&self.sweep) {
            if let Some(rate) = best {
                out.push_str(&format!(
                    "{}: highest rate within the SLO: {rate:.2} requests/s\n",
                    t.name
                ));
            }
        }
        out
    }
}
