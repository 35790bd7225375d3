//! `neocloud bench`: drives any OpenAI-compatible endpoint over HTTP and
//! measures what it does under load: time to first token, time per output
//! token, inter-token latency, end-to-end latency, throughput, goodput under
//! an SLO, and energy per token.
//!
//! [`workload`] makes the requests, [`load`] sends them (closed or open
//! loop), [`client`] times each stream, [`report`] and [`html`] summarise,
//! [`power`] measures or estimates energy.

pub mod client;
pub mod error;
pub mod html;
pub mod load;
pub mod power;
pub mod report;
pub mod stats;
pub mod target;
pub mod workload;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Args;

pub use error::BenchError;

use client::Client;
use load::{Arrival, LevelPlan, Load};
use power::{PowerMeter, PowerSource};
use report::{LevelReport, Report, TargetInfo, SCHEMA};
use stats::Slo;
use target::{ApiKey, Target};
use workload::{Api, Length, RequestSpec, TokenCounter};

/// Arguments of `neocloud bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Base URL of one target, ending in `/v1`.
    #[arg(long)]
    pub url: Option<String>,
    /// Model to ask for (default: the first one the target lists).
    #[arg(long)]
    pub model: Option<String>,
    /// Environment variable holding the API key (never printed).
    #[arg(long)]
    pub api_key_env: Option<String>,
    /// A target `NAME=URL[,model=M]` (repeatable; run side by side).
    #[arg(long = "target")]
    pub targets: Vec<String>,
    /// Closed-loop levels: requests in flight, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub concurrency: Vec<usize>,
    /// Open-loop levels: requests per second, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub rate: Vec<f64>,
    /// Gaps between open-loop arrivals.
    #[arg(long, value_enum, default_value_t = Arrival::Poisson)]
    pub arrival: Arrival,
    /// Gamma shape for `--arrival gamma` (below 1 is burstier).
    #[arg(long, default_value_t = 1.0)]
    pub burstiness: f64,
    /// Requests per level (default 32 without --duration).
    #[arg(long)]
    pub requests: Option<usize>,
    /// Seconds per level (requests stop being sent after it).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Unrecorded requests before each level.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Find the highest rate meeting --slo (starting at the first --rate,
    /// else 1/s), doubling then bisecting.
    #[arg(long)]
    pub sweep: bool,
    /// Probes of a sweep, at most.
    #[arg(long, default_value_t = 8)]
    pub sweep_steps: usize,
    /// Prompt tokens `MEAN[:STDDEV]` of synthetic requests.
    #[arg(long, default_value = "128")]
    pub input_tokens: String,
    /// Tokens to generate per request (sent as max_tokens, with ignore_eos
    /// and min_tokens unless --no-fixed-output).
    #[arg(long, default_value_t = 128)]
    pub output_tokens: u32,
    /// Do not send ignore_eos/min_tokens (for targets that refuse them).
    #[arg(long)]
    pub no_fixed_output: bool,
    /// Tokens of a prefix shared by every prompt (prefix-cache tests).
    #[arg(long, default_value_t = 0)]
    pub prefix_tokens: usize,
    /// A JSONL dataset instead of synthetic prompts.
    #[arg(long)]
    pub dataset: Option<PathBuf>,
    /// Chat or completions API.
    #[arg(long, value_enum, default_value_t = Api::Chat)]
    pub api: Api,
    /// Sampling temperature.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Latency limits for goodput: `ttft=2s,tpot=100ms[,e2e=..]` or a preset
    /// (mlperf-llama2-70b-server, mlperf-llama2-70b-interactive,
    /// mlperf-llama3.1-8b-server, mlperf-llama3.1-8b-interactive).
    #[arg(long)]
    pub slo: Option<String>,
    /// Power source: `nvml[:GPU]`, `cmd:COMMAND`, `prometheus:URL#METRIC`
    /// or `estimate:ACCELERATOR[xN]` (`cpu` for cores).
    #[arg(long)]
    pub power: Option<String>,
    /// An accelerator catalogue for `--power estimate:` in place of the
    /// one built in.
    #[arg(long, env = "NEOCLOUD_ACCELERATORS")]
    pub accelerators: Option<PathBuf>,
    /// Seed of prompts and arrival times.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Seconds a stream may stay silent before it counts as timed out.
    #[arg(long, default_value_t = 300.0)]
    pub timeout: f64,
    /// Write the JSON report here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write the HTML report here.
    #[arg(long)]
    pub html: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

fn targets_of(args: &BenchArgs) -> Result<Vec<Target>, BenchError> {
    let mut targets = Vec::new();
    if let Some(url) = &args.url {
        targets.push(Target::new("target", url, args.model.clone())?);
    }
    for spec in &args.targets {
        let mut t = Target::parse(spec)?;
        if t.model.is_none() {
            t.model = args.model.clone();
        }
        targets.push(t);
    }
    if targets.is_empty() {
        return Err(BenchError::InvalidArgument(
            "name a target with --url or --target".into(),
        ));
    }
    if let Some(var) = &args.api_key_env {
        let key = std::env::var(var).map_err(|_| {
            BenchError::InvalidArgument(format!("--api-key-env {var}: the variable is not set"))
        })?;
        for t in &mut targets {
            t.api_key = Some(ApiKey::new(key.clone()));
        }
    }
    Ok(targets)
}

/// Runs the bench and returns the report (also written where asked).
pub async fn run(args: BenchArgs) -> Result<Report, BenchError> {
    let mut targets = targets_of(&args)?;
    let slo = args.slo.as_deref().map(Slo::parse).transpose()?;
    if args.sweep && slo.is_none() {
        return Err(BenchError::InvalidArgument("--sweep needs --slo".into()));
    }
    let power = args
        .power
        .as_deref()
        .map(|p| PowerSource::parse(p, args.accelerators.as_deref()))
        .transpose()?;
    if args.rate.iter().any(|r| !(r.is_finite() && *r > 0.0)) || args.burstiness <= 0.0 {
        return Err(BenchError::InvalidArgument(
            "--rate values and --burstiness must be positive".into(),
        ));
    }
    let client = Arc::new(Client::new(Duration::from_secs_f64(args.timeout.max(1.0)))?);
    for t in &mut targets {
        if t.model.is_none() {
            t.model = Some(client.first_model(t).await?);
        }
    }
    let requests = args.requests.unwrap_or(if args.duration.is_some() {
        1_000_000
    } else {
        32
    });
    if requests == 0 || args.concurrency.contains(&0) {
        return Err(BenchError::InvalidArgument(
            "--requests and --concurrency values must be at least 1".into(),
        ));
    }
    let input = Length::parse(&args.input_tokens)?;
    let mut levels: Vec<Load> = args
        .concurrency
        .iter()
        .map(|&c| Load::Concurrency(c))
        .collect();
    if !args.sweep {
        levels.extend(args.rate.iter().map(|&r| Load::Rate(r)));
    }
    if levels.is_empty() && !args.sweep {
        levels.push(Load::Concurrency(1));
    }
    // Fresh prompts for every level (and the warm-up), up to a bound.
    let per_level = requests.min(512);
    let level_count = levels.len() + if args.sweep { args.sweep_steps } else { 0 };
    let prompt_count = (per_level * level_count + args.warmup).min(8192);
    let specs: Vec<RequestSpec> = match &args.dataset {
        Some(path) => workload::dataset(path, args.output_tokens)?,
        None => {
            let mut counter = TokenCounter::new(&client, &targets[0]);
            let specs = workload::synthetic(
                &mut counter,
                args.seed,
                prompt_count,
                input,
                args.prefix_tokens,
                args.output_tokens,
            )
            .await;
            if !counter.is_exact() && !args.quiet {
                eprintln!(
                    "note: {} has no /tokenize; prompt lengths are estimated at {} tokens per word",
                    targets[0].name,
                    workload::TOKENS_PER_WORD_ESTIMATE
                );
            }
            specs
        }
    };
    let path = match args.api {
        Api::Chat => "/chat/completions",
        Api::Completions => "/completions",
    };
    let bodies: Vec<Arc<Vec<serde_json::Value>>> = targets
        .iter()
        .map(|t| {
            Arc::new(
                specs
                    .iter()
                    .map(|s| {
                        workload::request_body(
                            s,
                            args.api,
                            t.model(),
                            args.temperature,
                            !args.no_fixed_output,
                        )
                    })
                    .collect(),
            )
        })
        .collect();
    let targets: Vec<Arc<Target>> = targets.into_iter().map(Arc::new).collect();
    let runner = Runner {
        args: &args,
        client,
        targets: &targets,
        bodies: &bodies,
        path,
        requests,
        per_level,
        slo: slo.as_ref(),
        power: power.as_ref(),
    };
    let mut reports = Vec::new();
    for (i, load) in levels.iter().enumerate() {
        // Targets take turns, and the order rotates from level to level, so
        // that each sees the same machine conditions on average.
        for k in 0..targets.len() {
            let t = (i + k) % targets.len();
            reports.push(runner.level(t, *load, i).await);
        }
    }
    let mut sweep = vec![None; targets.len()];
    if args.sweep {
        for (t, best) in sweep.iter_mut().enumerate() {
            *best = runner.sweep(t, &mut reports).await;
        }
    }
    reports.sort_by_key(|l| l.target);
    let report = Report {
        schema: SCHEMA.into(),
        started_at: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        seed: args.seed,
        settings: settings_json(&args, requests),
        slo,
        targets: targets
            .iter()
            .map(|t| TargetInfo {
                name: t.name.clone(),
                base_url: t.base_url.clone(),
                model: t.model().to_owned(),
            })
            .collect(),
        levels: reports,
        sweep,
    };
    if let Some(path) = &args.out {
        let json = serde_json::to_string_pretty(&report).unwrap_or_default();
        write_file(path, &json)?;
    }
    if let Some(path) = &args.html {
        write_file(path, &html::render(&report))?;
    }
    Ok(report)
}

fn write_file(path: &std::path::Path, text: &str) -> Result<(), BenchError> {
    std::fs::write(path, text).map_err(|source| BenchError::Write {
        path: path.display().to_string(),
        source,
    })
}

fn settings_json(args: &BenchArgs, requests: usize) -> serde_json::Value {
    serde_json::json!({
        "api": args.api,
        "concurrency": args.concurrency,
        "rate": args.rate,
        "arrival": args.arrival,
        "burstiness": args.burstiness,
        "requests_per_level": requests,
        "duration_s": args.duration,
        "warmup": args.warmup,
        "input_tokens": args.input_tokens,
        "output_tokens": args.output_tokens,
        "fixed_output": !args.no_fixed_output,
        "prefix_tokens": args.prefix_tokens,
        "dataset": args.dataset.as_ref().map(|p| p.display().to_string()),
        "temperature": args.temperature,
        "power": args.power,
        "sweep": args.sweep,
    })
}

struct Runner<'a> {
    args: &'a BenchArgs,
    client: Arc<Client>,
    targets: &'a [Arc<Target>],
    bodies: &'a [Arc<Vec<serde_json::Value>>],
    path: &'a str,
    requests: usize,
    per_level: usize,
    slo: Option<&'a Slo>,
    power: Option<&'a PowerSource>,
}

impl Runner<'_> {
    /// Runs level number `index` (which picks its prompts and arrival seed).
    async fn level(&self, t: usize, load: Load, index: usize) -> LevelReport {
        let target = &self.targets[t];
        let bodies = &self.bodies[t];
        // The warm-up uses the prompts after every level's.
        for w in 0..self.args.warmup {
            let body = &bodies[bodies.len() - 1 - w % bodies.len()];
            let _ = self.client.run(target, self.path, body).await;
        }
        let seed = self.args.seed.wrapping_add(index as u64);
        let bar = if self.args.quiet {
            indicatif::ProgressBar::hidden()
        } else {
            indicatif::ProgressBar::new(self.requests.min(1_000_000) as u64)
        };
        let style =
            indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed}")
                .map(|s| s.progress_chars("=> "))
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
        bar.set_style(style);
        bar.set_message(format!("{} {:?}", target.name, load));
        let meter = self.power.map(PowerMeter::start);
        let on_done = || bar.inc(1);
        let plan = LevelPlan {
            load,
            requests: self.requests,
            duration: self.args.duration.map(Duration::from_secs_f64),
            arrival: self.args.arrival,
            burstiness: self.args.burstiness,
            seed,
            path: self.path,
            bodies: bodies.clone(),
            first: index * self.per_level,
            on_done: &on_done,
        };
        let (outcomes, wall) = load::run_level(self.client.clone(), target.clone(), plan).await;
        bar.finish_and_clear();
        let busy = load::busy_seconds(&outcomes);
        let output: u64 = outcomes
            .iter()
            .filter(|o| o.error.is_none())
            .map(|o| o.output_tokens)
            .sum();
        let energy = meter.and_then(|m| m.finish(wall, busy, output));
        LevelReport::new(t, load, &outcomes, wall, self.slo, energy)
    }

    /// Doubles the rate until the SLO fails, then bisects.
    async fn sweep(&self, t: usize, reports: &mut Vec<LevelReport>) -> Option<f64> {
        let mut rate = self.args.rate.first().copied().unwrap_or(1.0);
        let (mut good, mut bad): (Option<f64>, Option<f64>) = (None, None);
        for step in 0..self.args.sweep_steps {
            let index = self.args.concurrency.len() + step;
            let report = self.level(t, Load::Rate(rate), index).await;
            let ok = report.goodput.as_ref().is_some_and(|g| g.p99_within_slo);
            reports.push(report);
            if ok {
                good = Some(rate);
            } else {
                bad = Some(rate);
            }
            rate = match (good, bad) {
                (Some(g), None) => g * 2.0,
                (None, Some(b)) => b / 2.0,
                (Some(g), Some(b)) => (g + b) / 2.0,
                (None, None) => rate,
            };
        }
        good
    }
}
