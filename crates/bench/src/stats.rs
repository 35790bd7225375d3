//! Distribution summaries and service-level objectives.

use serde::Serialize;

use crate::error::BenchError;

/// Mean, percentiles and maximum of a sample (seconds or tokens).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Observations.
    pub count: usize,
    /// Arithmetic mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

impl Summary {
    /// Summarises `values` (percentiles by linear interpolation between
    /// closest ranks, as numpy's default). All zero when empty.
    pub fn of(values: &[f64]) -> Self {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return Summary::default();
        }
        v.sort_by(f64::total_cmp);
        Summary {
            count: v.len(),
            mean: v.iter().sum::<f64>() / v.len() as f64,
            p50: percentile(&v, 50.0),
            p90: percentile(&v, 90.0),
            p99: percentile(&v, 99.0),
            max: v[v.len() - 1],
        }
    }
}

/// The `p`th percentile of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = p / 100.0 * (sorted.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    let frac = rank - lo as f64;
    sorted[lo] + (sorted[hi] - sorted[lo]) * frac
}

/// Latency limits a request must meet to count toward goodput.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Slo {
    /// Time to first token, seconds.
    pub ttft_s: Option<f64>,
    /// Time per output token after the first, seconds.
    pub tpot_s: Option<f64>,
    /// Whole request, seconds.
    pub e2e_s: Option<f64>,
}

/// Named presets: MLPerf Inference LLM latency limits.
pub const SLO_PRESETS: &[(&str, f64, f64)] = &[
    ("mlperf-llama2-70b-server", 2.0, 0.2),
    ("mlperf-llama2-70b-interactive", 0.45, 0.04),
    ("mlperf-llama3.1-8b-server", 2.0, 0.1),
    ("mlperf-llama3.1-8b-interactive", 0.5, 0.03),
];

impl Slo {
    /// Parses `ttft=2s,tpot=100ms,e2e=30s` or a preset name.
    pub fn parse(spec: &str) -> Result<Self, BenchError> {
        if let Some(&(_, ttft, tpot)) = SLO_PRESETS.iter().find(|p| p.0 == spec) {
            return Ok(Slo {
                ttft_s: Some(ttft),
                tpot_s: Some(tpot),
                e2e_s: None,
            });
        }
        let mut slo = Slo::default();
        for part in spec.split(',').filter(|p| !p.is_empty()) {
            let (key, value) = part.split_once('=').ok_or_else(|| bad_slo(spec))?;
            let seconds = parse_duration(value).ok_or_else(|| bad_slo(spec))?;
            match key {
                "ttft" => slo.ttft_s = Some(seconds),
                "tpot" => slo.tpot_s = Some(seconds),
                "e2e" => slo.e2e_s = Some(seconds),
                _ => return Err(bad_slo(spec)),
            }
        }
        if slo == Slo::default() {
            return Err(bad_slo(spec));
        }
        Ok(slo)
    }

    /// Whether one request met every limit.
    pub fn met_by(&self, ttft: f64, tpot: Option<f64>, e2e: f64) -> bool {
        self.ttft_s.is_none_or(|l| ttft <= l)
            && self.tpot_s.is_none_or(|l| tpot.is_none_or(|t| t <= l))
            && self.e2e_s.is_none_or(|l| e2e <= l)
    }
}

fn bad_slo(spec: &str) -> BenchError {
    let presets: Vec<&str> = SLO_PRESETS.iter().map(|p| p.0).collect();
    BenchError::InvalidArgument(format!(
        "--slo {spec:?}: expected ttft=DUR,tpot=DUR,e2e=DUR (DUR like 500ms or 2s) or one of {}",
        presets.join(", ")
    ))
}

/// `250ms`, `2s`, `1.5s`, `100us`, `1m` in seconds.
pub fn parse_duration(text: &str) -> Option<f64> {
    let text = text.trim();
    let (number, scale) = if let Some(n) = text.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = text.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60.0)
    } else {
        (text, 1.0)
    };
    number
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)
        .map(|v| v * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_interpolate_like_numpy() {
        let s = Summary::of(&[1.0, 2.0, 3.0, 4.0, 10.0]);
        assert_eq!(s.count, 5);
        assert!((s.mean - 4.0).abs() < 1e-12);
        assert_eq!(s.p50, 3.0);
        assert!((s.p90 - 7.6).abs() < 1e-12);
        assert!((s.p99 - 9.76).abs() < 1e-12);
        assert_eq!(s.max, 10.0);
        assert_eq!(Summary::of(&[]), Summary::default());
    }

    #[test]
    fn slos_parse_and_judge() {
        let slo = Slo::parse("ttft=2s,tpot=100ms").unwrap();
        assert_eq!(slo.ttft_s, Some(2.0));
        assert_eq!(slo.tpot_s, Some(0.1));
        assert!(slo.met_by(1.9, Some(0.09), 50.0));
        assert!(!slo.met_by(2.1, Some(0.09), 1.0));
        assert!(!slo.met_by(1.0, Some(0.2), 1.0));
        let preset = Slo::parse("mlperf-llama3.1-8b-interactive").unwrap();
        assert_eq!((preset.ttft_s, preset.tpot_s), (Some(0.5), Some(0.03)));
        for bad in ["", "ttft", "ttft=fast", "speed=1s"] {
            assert!(Slo::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_duration("1.5s"), Some(1.5));
        assert_eq!(parse_duration("250ms"), Some(0.25));
    }
}
