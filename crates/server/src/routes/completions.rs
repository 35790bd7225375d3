//! `POST /v1/completions`: text completion, collected or streamed, with
//! `n` choices per prompt, echo, and prompt scoring (`echo` with `logprobs`
//! and `max_tokens: 0` returns the prompt's teacher-forced
//! log-probabilities, as vLLM does).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::response::{IntoResponse, Response};
use axum::Json;
use neocloud_engine::generation::{GenerateRequest, LoadedModel, ScoredToken};
use neocloud_engine::sampler::{Sampled, TokenLogprob};
use neocloud_openai::chat::Usage;
use neocloud_openai::completions::{
    Completion, CompletionChoice, CompletionChunk, CompletionLogprobs, CompletionRequest,
};

use crate::engine_worker::{JobEvents, Priority, WorkerEvent};
use crate::error::ServerError;
use crate::json_body::parse_json;
use crate::routes::choices::{
    choices_of, collect_all, merge, now, priority_of, response_id, submit_all, MAX_CHOICES,
};
use crate::routes::event_stream::event_stream;
use crate::routes::sampling::{sampling_params, stop_strings};
use crate::usage::UsageMeter;
use crate::AppState;

/// Default `max_tokens` of the completions API.
const DEFAULT_MAX_TOKENS: u32 = 16;

/// The prompts of a request, as token ids.
fn prompts(value: &serde_json::Value, lm: &LoadedModel) -> Result<Vec<Vec<u32>>, ServerError> {
    let bad = || {
        ServerError::param(
            "prompt",
            "prompt must be a string, a list of strings, a list of token ids or a list of such lists",
        )
    };
    let ids = |arr: &[serde_json::Value]| -> Result<Vec<u32>, ServerError> {
        arr.iter()
            .map(|v| {
                v.as_u64()
                    .filter(|&id| (id as usize) < lm.model.config.vocab_size)
                    .map(|id| id as u32)
                    .ok_or_else(|| {
                        ServerError::param("prompt", format!("{v} is not a token id of this model"))
                    })
            })
            .collect()
    };
    let encode = |s: &str| lm.tokenizer.encode(s, true, true);
    let out = match value {
        serde_json::Value::String(s) => vec![encode(s)],
        serde_json::Value::Array(items) if items.is_empty() => return Err(bad()),
        serde_json::Value::Array(items) => match &items[0] {
            serde_json::Value::String(_) => items
                .iter()
                .map(|i| i.as_str().map(encode).ok_or_else(bad))
                .collect::<Result<_, _>>()?,
            serde_json::Value::Number(_) => vec![ids(items)?],
            serde_json::Value::Array(_) => items
                .iter()
                .map(|i| i.as_array().ok_or_else(bad).and_then(|a| ids(a)))
                .collect::<Result<_, _>>()?,
            _ => return Err(bad()),
        },
        _ => return Err(bad()),
    };
    if out.iter().any(|p| p.is_empty()) {
        return Err(ServerError::param("prompt", "the prompt is empty"));
    }
    Ok(out)
}

/// What a validated request asks for.
struct Plan {
    model: usize,
    lm: Arc<LoadedModel>,
    /// One entry per prompt.
    prompts: Vec<Vec<u32>>,
    /// Generation of one choice, without its prompt.
    generate: GenerateRequest,
    n: usize,
    priority: Priority,
    top: Option<usize>,
    echo: bool,
    as_ids: bool,
    stream: bool,
    include_usage: bool,
}

fn validate(req: CompletionRequest, state: &AppState) -> Result<Plan, ServerError> {
    let model = state.engine.model_index(&req.model)?;
    let lm = state.engine.models()?[model].clone();
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ServerError::param("suffix", "suffix is not supported"));
    }
    let n = req.n.unwrap_or(1) as usize;
    if !(1..=MAX_CHOICES).contains(&n) {
        return Err(ServerError::param(
            "n",
            format!("n must be between 1 and {MAX_CHOICES}"),
        ));
    }
    if req.best_of.is_some_and(|b| b as usize != n) {
        return Err(ServerError::param(
            "best_of",
            "best_of is supported only equal to n",
        ));
    }
    let top = req.logprobs.map(|k| k as usize);
    let sampling = sampling_params(
        &req.sampling,
        top.is_some(),
        top.unwrap_or(0),
        lm.model.config.vocab_size,
    )
    .map_err(|e| match e {
        ServerError::InvalidParam { param, message } if param == "top_logprobs" => {
            ServerError::InvalidParam {
                param: "logprobs".into(),
                message,
            }
        }
        other => other,
    })?;
    let stop = stop_strings(req.stop.clone())?;
    let max_tokens = req.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS) as usize;
    let min_tokens = req.min_tokens.unwrap_or(0) as usize;
    if min_tokens > max_tokens {
        return Err(ServerError::param(
            "min_tokens",
            format!("min_tokens ({min_tokens}) exceeds max_tokens ({max_tokens})"),
        ));
    }
    let context = lm.model.config.context_length;
    let prompts = prompts(&req.prompt, &lm)?;
    if prompts.len() * n > MAX_CHOICES {
        return Err(ServerError::param(
            "prompt",
            format!("prompts times n must be at most {MAX_CHOICES}"),
        ));
    }
    for p in &prompts {
        if p.len() + max_tokens > context {
            return Err(ServerError::ContextLengthExceeded {
                param: "prompt".into(),
                message: format!(
                    "this model's context is {context} tokens; the prompt takes {} and max_tokens asks for {max_tokens} more",
                    p.len()
                ),
            });
        }
    }
    Ok(Plan {
        model,
        lm,
        prompts,
        generate: GenerateRequest {
            prompt: Vec::new(),
            max_tokens,
            sampling,
            stop,
            stop_token_ids: Vec::new(),
            ignore_eos: req.ignore_eos.unwrap_or(false),
            min_tokens,
            grammar: None,
            score_prompt: None,
        },
        n,
        priority: priority_of(req.priority)?,
        top,
        echo: req.echo,
        as_ids: req.return_tokens_as_token_ids.unwrap_or(false),
        stream: req.stream,
        include_usage: req.stream_options.is_some_and(|o| o.include_usage),
    })
}

/// The text and log-probabilities an answer starts with: the prompt when
/// `echo` is set, else nothing.
async fn echoed(
    state: &AppState,
    plan: &Plan,
    prompt: &[u32],
) -> Result<(String, Option<CompletionLogprobs>), ServerError> {
    let mut text = String::new();
    let mut logprobs = plan.top.map(|_| CompletionLogprobs::default());
    if plan.echo {
        match logprobs.as_mut() {
            Some(lp) => {
                let scored = score(state, plan, prompt, plan.top.unwrap_or(0)).await?;
                push_logprobs(lp, &plan.lm, prompt, &scored, true, plan.as_ids, &mut text);
            }
            None => text.push_str(&plan.lm.tokenizer.decode(prompt, false)),
        }
    }
    Ok((text, logprobs))
}

fn scored_steps(steps: &[Sampled]) -> Vec<ScoredToken> {
    steps
        .iter()
        .map(|s| ScoredToken {
            logprob: s.token.logprob,
            top: s.top.clone(),
        })
        .collect()
}

/// A text completion request parsed, checked and tokenised: what the
/// engine needs, and the model's name as the client gave it.
pub(crate) struct Prepared {
    model: String,
    plan: Plan,
}

/// Parses `body` and prepares it for the engine's model `served`.
pub(crate) fn prepare(
    state: &AppState,
    body: &[u8],
    served: &str,
) -> Result<Prepared, ServerError> {
    let mut req: CompletionRequest = parse_json(body)?;
    let model = std::mem::replace(&mut req.model, served.to_owned());
    let plan = validate(req, state)?;
    Ok(Prepared { model, plan })
}

/// Answers a text completion prepared for the engine's model, metered
/// into `meter`; the answer names the model as the request did.
pub(crate) async fn answer(
    state: &AppState,
    prepared: Prepared,
    meter: UsageMeter,
) -> Result<Response, ServerError> {
    let state = state.clone();
    let Prepared {
        model: model_name,
        plan,
    } = prepared;
    let id = response_id("cmpl");
    // Echoed prompts (scored first when asked for), one per prompt.
    let mut heads = Vec::with_capacity(plan.prompts.len());
    for prompt in &plan.prompts {
        heads.push(echoed(&state, &plan, prompt).await?);
    }
    let requests: Vec<GenerateRequest> = if plan.generate.max_tokens == 0 {
        Vec::new()
    } else {
        plan.prompts
            .iter()
            .flat_map(|p| {
                let mut r = plan.generate.clone();
                r.prompt = p.clone();
                choices_of(&r, plan.n)
            })
            .collect()
    };
    let jobs = submit_all(&state, plan.model, requests, plan.priority)?;
    if plan.stream {
        return Ok(stream_response(
            plan,
            jobs,
            heads,
            id,
            model_name,
            meter,
            state.write_timeout,
        ));
    }
    let generations = if jobs.is_empty() {
        Vec::new()
    } else {
        collect_all(jobs, &meter).await?
    };
    let cached: usize = generations.iter().map(|g| g.cached_prompt_tokens).sum();
    let prompt_tokens: usize = plan.prompts.iter().map(Vec::len).sum();
    let mut completion_tokens = 0;
    let mut choices = Vec::new();
    for index in 0..plan.prompts.len() * plan.n {
        let (mut text, mut logprobs) = heads[index / plan.n].clone();
        let mut finish_reason = "length";
        if let Some(g) = generations.get(index) {
            completion_tokens += g.tokens.len();
            finish_reason = g.finish_reason.as_str();
            if let Some(lp) = logprobs.as_mut() {
                let before = text.len();
                let scored = scored_steps(&g.steps);
                push_logprobs(
                    lp,
                    &plan.lm,
                    &g.tokens,
                    &scored,
                    false,
                    plan.as_ids,
                    &mut text,
                );
                // Token texts can differ from the final text at a stop string.
                text.truncate(before);
            }
            text.push_str(&g.text);
        }
        choices.push(CompletionChoice {
            text,
            index: index as u32,
            logprobs,
            finish_reason: Some(finish_reason.into()),
        });
    }
    if let Some(reason) = choices.first().and_then(|c| c.finish_reason.as_deref()) {
        meter.finish_reason(reason);
    }
    meter.tokens(
        prompt_tokens as u64,
        completion_tokens as u64,
        cached as u64,
    );
    let usage = Usage::new(prompt_tokens as u32, completion_tokens as u32)
        .with_estimated_energy(meter.energy_now());
    Ok(Json(Completion {
        id,
        object: "text_completion".into(),
        created: now(),
        model: model_name,
        choices,
        usage,
    })
    .into_response())
}

fn stream_response(
    plan: Plan,
    jobs: Vec<JobEvents>,
    heads: Vec<(String, Option<CompletionLogprobs>)>,
    id: String,
    model: String,
    meter: UsageMeter,
    write_stall: Duration,
) -> Response {
    let total = plan.prompts.len() * plan.n;
    let (out, response) = event_stream(write_stall);
    let mut events = merge(jobs);
    tokio::spawn(async move {
        let created = now();
        let send = |choices: Vec<CompletionChoice>, usage: Option<Usage>| {
            let chunk = CompletionChunk {
                id: id.clone(),
                object: "text_completion".into(),
                created,
                model: model.clone(),
                choices,
                usage,
            };
            out.send(chunk)
        };
        let one = |index: usize, text: String, logprobs, finish: Option<&str>| {
            vec![CompletionChoice {
                text,
                index: index as u32,
                logprobs,
                finish_reason: finish.map(str::to_owned),
            }]
        };
        // Characters sent per choice (offsets of streamed log-probabilities).
        let mut chars = vec![0usize; total];
        let mut text_sent = vec![0usize; total];
        let mut steps_sent = vec![0usize; total];
        let generating = plan.generate.max_tokens > 0;
        for (index, sent) in chars.iter_mut().enumerate() {
            let (text, logprobs) = heads[index / plan.n].clone();
            *sent = text.chars().count();
            let finish = (!generating).then_some("length");
            if (!text.is_empty() || !generating)
                && !send(one(index, text, logprobs, finish), None).await
            {
                return;
            }
        }
        let prompt_tokens: usize = plan.prompts.iter().map(Vec::len).sum();
        let mut completion_tokens = 0;
        let mut cached = 0usize;
        let mut first_sent = false;
        let mut finished = 0;
        let expected = if generating { total } else { 0 };
        let logprobs_of = |steps: &[Sampled], offset: usize| {
            plan.top.map(|_| {
                let mut lp = CompletionLogprobs::default();
                let mut text = String::new();
                let tokens: Vec<u32> = steps.iter().map(|s| s.token.id).collect();
                push_logprobs(
                    &mut lp,
                    &plan.lm,
                    &tokens,
                    &scored_steps(steps),
                    false,
                    plan.as_ids,
                    &mut text,
                );
                for o in &mut lp.text_offset {
                    *o += offset;
                }
                lp
            })
        };
        while finished < expected {
            let Some((i, ev)) = events.recv().await else {
                break;
            };
            match ev {
                WorkerEvent::Text { text, steps } => {
                    let logprobs = logprobs_of(&steps, chars[i]);
                    text_sent[i] += text.len();
                    steps_sent[i] += steps.len();
                    chars[i] += text.chars().count();
                    if !text.is_empty() && !first_sent {
                        meter.first_token();
                        first_sent = true;
                    }
                    if !send(one(i, text, logprobs, None), None).await {
                        // Client gone: dropping `events` cancels the jobs.
                        // What was generated is metered all the same.
                        let generated: usize = steps_sent.iter().sum();
                        meter.tokens(prompt_tokens as u64, generated as u64, cached as u64);
                        meter.abandoned();
                        return;
                    }
                }
                WorkerEvent::Done(g) => {
                    completion_tokens += g.tokens.len();
                    cached += g.cached_prompt_tokens;
                    if !g.tokens.is_empty() {
                        meter.first_token();
                    }
                    if finished == 0 {
                        meter.finish_reason(g.finish_reason.as_str());
                    }
                    let rest = g.text.get(text_sent[i]..).unwrap_or("").to_owned();
                    let steps = g.steps.get(steps_sent[i]..).unwrap_or(&[]);
                    steps_sent[i] = g.steps.len();
                    let logprobs = logprobs_of(steps, chars[i]);
                    let finish = Some(g.finish_reason.as_str());
                    let _ = send(one(i, rest, logprobs, finish), None).await;
                    finished += 1;
                }
                WorkerEvent::Failed(e) => {
                    meter.finish_reason("error");
                    out.error(e).await;
                    break;
                }
            }
        }
        if !generating {
            meter.finish_reason("length");
        }
        meter.tokens(
            prompt_tokens as u64,
            completion_tokens as u64,
            cached as u64,
        );
        let joules = meter.energy_now();
        if finished == expected && plan.include_usage {
            let usage = Usage::new(prompt_tokens as u32, completion_tokens as u32)
                .with_estimated_energy(joules);
            let _ = send(Vec::new(), Some(usage)).await;
        }
        out.done().await;
    });
    response
}

/// Scores `tokens` (teacher-forced log-probabilities, `top` alternatives
/// each) as a generation of no tokens that scores its prompt: it runs in
/// the engine's batches within the per-step prefill budget like any
/// prompt, from the model's key/value pool, and ends when the client
/// leaves (dropping this future drops its events, which cancels it).
async fn score(
    state: &AppState,
    plan: &Plan,
    tokens: &[u32],
    top: usize,
) -> Result<Vec<ScoredToken>, ServerError> {
    let mut request = plan.generate.clone();
    request.prompt = tokens.to_vec();
    request.max_tokens = 0;
    request.score_prompt = Some(top);
    let mut events = state
        .engine
        .submit_with_priority(plan.model, request, plan.priority)?;
    while let Some(ev) = events.recv().await {
        match ev {
            WorkerEvent::Done(g) => return Ok(g.prompt_scores),
            WorkerEvent::Failed(e) => return Err(e),
            WorkerEvent::Text { .. } => {}
        }
    }
    Err(ServerError::Unavailable(
        "the engine stopped mid-request".into(),
    ))
}

fn token_name(lm: &LoadedModel, id: u32, as_ids: bool) -> String {
    if as_ids {
        format!("token_id:{id}")
    } else {
        String::from_utf8_lossy(&lm.tokenizer.token_bytes(id, true)).into_owned()
    }
}

/// Appends tokens with their log-probabilities. For a prompt (`first_unscored`),
/// `scored[i]` belongs to `tokens[i + 1]` and the first token has none.
fn push_logprobs(
    lp: &mut CompletionLogprobs,
    lm: &LoadedModel,
    tokens: &[u32],
    scored: &[ScoredToken],
    first_unscored: bool,
    as_ids: bool,
    text: &mut String,
) {
    let top_map = |top: &[TokenLogprob]| -> BTreeMap<String, f32> {
        top.iter()
            .map(|t| (token_name(lm, t.id, as_ids), t.logprob))
            .collect()
    };
    for (i, &id) in tokens.iter().enumerate() {
        let s = if first_unscored {
            i.checked_sub(1).and_then(|j| scored.get(j))
        } else {
            scored.get(i)
        };
        lp.tokens.push(token_name(lm, id, as_ids));
        lp.token_logprobs.push(s.map(|s| s.logprob));
        lp.top_logprobs.push(s.map(|s| top_map(&s.top)));
        lp.text_offset.push(text.chars().count());
        text.push_str(&String::from_utf8_lossy(
            &lm.tokenizer.token_bytes(id, false),
        ));
    }
}
