//! Energy: power sampled during a level from NVIDIA's management library,
//! a command or a Prometheus gauge, or estimated from an accelerator's
//! published power and the time the target was busy (always labelled as an
//! estimate).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nvml_wrapper::Nvml;
use serde::Serialize;

use neocloud_accelerators::{CatalogError, Catalogue};

use crate::error::BenchError;

/// Where watts come from.
#[derive(Debug, Clone, PartialEq)]
pub enum PowerSource {
    /// A command that prints the current draw in watts.
    Command(String),
    /// A Prometheus text endpoint and the gauge (in watts) to read.
    Prometheus {
        /// The `/metrics` URL.
        url: String,
        /// The gauge's name (labels ignored; series summed).
        metric: String,
    },
    /// NVIDIA GPUs through NVML: one by index, or all of them summed.
    Nvml {
        /// The GPU, or `None` for every GPU.
        gpu: Option<u32>,
    },
    /// Published power of `count` accelerators, times the busy share.
    Estimate {
        /// Accelerator id in `accelerators.toml`, or `cpu`.
        accelerator: String,
        /// How many.
        count: u32,
        /// Watts of all of them at full load.
        watts: f64,
    },
}

pub use neocloud_accelerators::CPU_WATTS_PER_CORE;
/// Interval between power samples.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);

impl PowerSource {
    /// Parses `cmd:COMMAND`, `prometheus:URL#METRIC` or
    /// `estimate:ACCELERATOR[xN]`; `accelerators` is a catalogue file in
    /// place of the built-in one.
    pub fn parse(spec: &str, accelerators: Option<&Path>) -> Result<Self, BenchError> {
        if let Some(cmd) = spec.strip_prefix("cmd:") {
            return Ok(PowerSource::Command(cmd.to_owned()));
        }
        if let Some(rest) = spec.strip_prefix("prometheus:") {
            let (url, metric) = rest.rsplit_once('#').ok_or_else(|| {
                BenchError::InvalidArgument(format!(
                    "--power {spec:?}: expected prometheus:URL#METRIC"
                ))
            })?;
            return Ok(PowerSource::Prometheus {
                url: url.to_owned(),
                metric: metric.to_owned(),
            });
        }
        if let Some(rest) = spec.strip_prefix("estimate:") {
            let (accelerator, count) = match rest.rsplit_once('x') {
                Some((a, n)) if n.parse::<u32>().is_ok() => (a, n.parse().unwrap_or(1)),
                _ => (rest, 1),
            };
            let each = published_watts(accelerators, accelerator)?;
            return Ok(PowerSource::Estimate {
                accelerator: accelerator.to_owned(),
                count,
                watts: each * count as f64,
            });
        }
        if spec == "nvml" || spec.starts_with("nvml:") {
            let gpu = match spec.strip_prefix("nvml:") {
                Some(n) => Some(n.parse::<u32>().map_err(|_| {
                    BenchError::InvalidArgument(format!("--power {spec:?}: expected nvml[:GPU]"))
                })?),
                None => None,
            };
            let source = PowerSource::Nvml { gpu };
            // Fail now rather than report no energy at the end.
            let nvml = Nvml::init()
                .map_err(|e| BenchError::Power(format!("NVML is not available here: {e}")))?;
            nvml_watts(&nvml, gpu).map_err(BenchError::Power)?;
            return Ok(source);
        }
        Err(BenchError::InvalidArgument(format!(
            "--power {spec:?}: expected nvml[:GPU], cmd:COMMAND, prometheus:URL#METRIC or estimate:ACCELERATOR[xN]"
        )))
    }

    /// A label for reports.
    pub fn label(&self) -> String {
        match self {
            PowerSource::Command(c) => format!("cmd:{c}"),
            PowerSource::Nvml { gpu: None } => "nvml".into(),
            PowerSource::Nvml { gpu: Some(g) } => format!("nvml:{g}"),
            PowerSource::Prometheus { url, metric } => format!("prometheus:{url}#{metric}"),
            PowerSource::Estimate {
                accelerator, count, ..
            } => format!("estimate:{accelerator}x{count}"),
        }
    }
}

/// Published power of one accelerator (one core for `cpu`).
fn published_watts(path: Option<&Path>, id: &str) -> Result<f64, BenchError> {
    let data_error = |message: String| BenchError::Data {
        path: path.map_or_else(
            || "built-in accelerators.toml".into(),
            |p| p.display().to_string(),
        ),
        message,
    };
    let catalogue = Catalogue::load(path).map_err(|e| data_error(e.to_string()))?;
    catalogue.published_watts(id).map_err(|e| match e {
        CatalogError::Malformed(message) => data_error(message),
        other => BenchError::Power(other.to_string()),
    })
}

/// Energy over one level.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Energy {
    /// The source's label.
    pub source: String,
    /// Whether the figure is an estimate rather than a reading.
    pub estimate: bool,
    /// Mean watts over the level.
    pub mean_watts: f64,
    /// Joules over the level.
    pub joules: f64,
    /// Joules per generated token.
    pub joules_per_output_token: f64,
    /// Generated tokens per joule.
    pub output_tokens_per_joule: f64,
}

/// Samples power while a level runs.
pub struct PowerMeter {
    samples: Arc<Mutex<Vec<(f64, f64)>>>,
    task: Option<tokio::task::JoinHandle<()>>,
    source: PowerSource,
}

impl PowerMeter {
    /// Starts sampling (nothing to sample for an estimate).
    pub fn start(source: &PowerSource) -> Self {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let task = match source.clone() {
            PowerSource::Estimate { .. } => None,
            live => {
                let samples = samples.clone();
                Some(tokio::spawn(async move {
                    let start = Instant::now();
                    let http = reqwest::Client::new();
                    let nvml = match live {
                        PowerSource::Nvml { .. } => Nvml::init().ok(),
                        _ => None,
                    };
                    loop {
                        if let Some(w) = read_watts(&live, &http, nvml.as_ref()).await {
                            if let Ok(mut s) = samples.lock() {
                                s.push((start.elapsed().as_secs_f64(), w));
                            }
                        }
                        tokio::time::sleep(SAMPLE_EVERY).await;
                    }
                }))
            }
        };
        PowerMeter {
            samples,
            task,
            source: source.clone(),
        }
    }

    /// Stops sampling; energy over `wall` seconds, of which `busy` had a
    /// request in flight, for `output_tokens` generated.
    pub fn finish(mut self, wall: f64, busy: f64, output_tokens: u64) -> Option<Energy> {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        let (joules, mean_watts, estimate) = match &self.source {
            PowerSource::Estimate { watts, .. } => {
                let joules = watts * busy;
                (joules, if wall > 0.0 { joules / wall } else { 0.0 }, true)
            }
            _ => {
                let samples = self.samples.lock().ok()?.clone();
                let mean = samples.iter().map(|s| s.1).sum::<f64>() / samples.len().max(1) as f64;
                if samples.is_empty() {
                    return None;
                }
                (mean * wall, mean, false)
            }
        };
        let tokens = output_tokens as f64;
        Some(Energy {
            source: self.source.label(),
            estimate,
            mean_watts,
            joules,
            joules_per_output_token: if tokens > 0.0 { joules / tokens } else { 0.0 },
            output_tokens_per_joule: if joules > 0.0 { tokens / joules } else { 0.0 },
        })
    }
}

/// Watts drawn now by one GPU or all of them (NVML reports milliwatts).
fn nvml_watts(nvml: &Nvml, gpu: Option<u32>) -> Result<f64, String> {
    let indices = match gpu {
        Some(g) => vec![g],
        None => (0..nvml.device_count().map_err(|e| e.to_string())?).collect(),
    };
    if indices.is_empty() {
        return Err("NVML lists no GPU".into());
    }
    let mut milliwatts = 0u64;
    for i in indices {
        let device = nvml
            .device_by_index(i)
            .map_err(|e| format!("GPU {i}: {e}"))?;
        milliwatts += u64::from(device.power_usage().map_err(|e| format!("GPU {i}: {e}"))?);
    }
    Ok(milliwatts as f64 / 1000.0)
}

async fn read_watts(
    source: &PowerSource,
    http: &reqwest::Client,
    nvml: Option<&Nvml>,
) -> Option<f64> {
    match source {
        PowerSource::Nvml { gpu } => nvml.and_then(|n| nvml_watts(n, *gpu).ok()),
        PowerSource::Command(cmd) => {
            let out = tokio::process::Command::new("sh")
                .args(["-c", cmd])
                .output()
                .await
                .ok()?;
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter_map(|w| w.trim_end_matches(['W', ',']).parse::<f64>().ok())
                .reduce(|a, b| a + b)
        }
        PowerSource::Prometheus { url, metric } => {
            let text = http.get(url).send().await.ok()?.text().await.ok()?;
            prometheus_gauge(&text, metric)
        }
        PowerSource::Estimate { .. } => None,
    }
}

/// The sum of every series of `metric` in Prometheus text.
pub fn prometheus_gauge(text: &str, metric: &str) -> Option<f64> {
    let values: Vec<f64> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(metric)?;
            let rest = if rest.starts_with('{') {
                &rest[rest.find('}')? + 1..]
            } else if rest.starts_with(' ') {
                rest
            } else {
                return None;
            };
            rest.split_whitespace().next()?.parse().ok()
        })
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse() {
        let est = PowerSource::parse("estimate:h100-sxmx8", None).unwrap();
        assert_eq!(
            est,
            PowerSource::Estimate {
                accelerator: "h100-sxm".into(),
                count: 8,
                watts: 5600.0
            }
        );
        let cpu = PowerSource::parse("estimate:cpux2", None).unwrap();
        assert_eq!(est.label(), "estimate:h100-sxmx8");
        assert!(matches!(cpu, PowerSource::Estimate { watts, .. } if watts == 20.0));
        assert!(PowerSource::parse("estimate:nonesuch", None).is_err());
        assert!(matches!(
            PowerSource::parse("prometheus:http://h:9400/metrics#gpu_power_watts", None),
            Ok(PowerSource::Prometheus { .. })
        ));
        assert!(PowerSource::parse("watts", None).is_err());
        assert!(PowerSource::parse("nvml:x", None).is_err());
        // This machine has no NVIDIA GPU: NVML is refused at once, clearly.
        if Nvml::init().is_err() {
            let err = PowerSource::parse("nvml:0", None).unwrap_err();
            assert!(err.to_string().contains("NVML"), "{err}");
        }
    }

    #[test]
    fn gauges_sum_their_series() {
        let text = "# HELP p power\np{gpu=\"0\"} 100.5\np{gpu=\"1\"} 99.5\npower_other 7\n";
        assert_eq!(prometheus_gauge(text, "p"), Some(200.0));
        assert_eq!(prometheus_gauge(text, "q"), None);
    }

    #[tokio::test]
    async fn estimates_scale_with_busy_time_and_commands_are_read() {
        let est = PowerSource::Estimate {
            accelerator: "cpu".into(),
            count: 2,
            watts: 20.0,
        };
        let e = PowerMeter::start(&est).finish(10.0, 5.0, 100).unwrap();
        assert!(e.estimate);
        assert_eq!(e.joules, 100.0);
        assert_eq!(e.joules_per_output_token, 1.0);
        let cmd = PowerSource::Command("echo 42.5".into());
        let meter = PowerMeter::start(&cmd);
        tokio::time::sleep(Duration::from_millis(600)).await;
        let e = meter.finish(2.0, 2.0, 85).unwrap();
        assert!(!e.estimate);
        assert_eq!(e.mean_watts, 42.5);
        assert_eq!(e.joules, 85.0);
    }
}
