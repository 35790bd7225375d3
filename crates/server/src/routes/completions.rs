//! `POST /v1/completions`: text completion, echo, and prompt scoring
//! (`echo` with `logprobs` and `max_tokens: 0` returns the prompt's
//! teacher-forced log-probabilities, as vLLM does).

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use neocloud_engine::generation::{GenerateRequest, LoadedModel, ScoredToken};
use neocloud_engine::sampler::TokenLogprob;
use neocloud_openai::chat::Usage;
use neocloud_openai::completions::{
    Completion, CompletionChoice, CompletionLogprobs, CompletionRequest,
};

use crate::engine_worker::{JobKind, WorkerEvent};
use crate::error::ServerError;
use crate::routes::chat_completions::{collect, now, parse_body};
use crate::routes::sampling::{sampling_params, stop_strings};
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

/// The handler.
pub async fn completions(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ServerError> {
    let req: CompletionRequest = parse_body(body, state.body_limit)?;
    let model = state.engine.model_index(&req.model)?;
    let lm = state.engine.models()?[model].clone();
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ServerError::param("suffix", "suffix is not supported"));
    }
    if req.n.is_some_and(|n| n != 1) || req.best_of.is_some_and(|n| n != 1) {
        let param = if req.n.is_some_and(|n| n != 1) {
            "n"
        } else {
            "best_of"
        };
        return Err(ServerError::param(
            param,
            format!("only {param} = 1 is supported"),
        ));
    }
    if req.stream {
        return Err(ServerError::param(
            "stream",
            "streaming /v1/completions is not supported yet; use /v1/chat/completions",
        ));
    }
    let top = req.logprobs.map(|k| k as usize);
    let sampling = sampling_params(&req.sampling, top.unwrap_or(0), lm.model.config.vocab_size)
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
    let as_ids = req.return_tokens_as_token_ids.unwrap_or(false);
    let max_tokens = req.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS) as usize;
    let context = lm.model.config.context_length;
    let mut choices = Vec::new();
    let mut usage = Usage::default();
    for (index, prompt) in prompts(&req.prompt, &lm)?.into_iter().enumerate() {
        if prompt.len() + max_tokens.min(1) > context {
            return Err(ServerError::param(
                "prompt",
                format!(
                    "the prompt has {} tokens; the context is {context}",
                    prompt.len()
                ),
            ));
        }
        let mut text = String::new();
        let mut logprobs = top.map(|_| CompletionLogprobs::default());
        if req.echo {
            if let Some(lp) = logprobs.as_mut() {
                let scored = score(&state, model, &prompt, top.unwrap_or(0)).await?;
                push_logprobs(lp, &lm, &prompt, &scored, true, as_ids, &mut text);
            } else {
                text.push_str(&lm.tokenizer.decode(&prompt, false));
            }
        }
        let mut finish_reason = "length".to_string();
        let mut completion_tokens = 0;
        if max_tokens > 0 {
            let request = GenerateRequest {
                prompt: prompt.clone(),
                max_tokens: max_tokens.min(context - prompt.len()),
                sampling: sampling.clone(),
                stop: stop.clone(),
                stop_token_ids: Vec::new(),
                ignore_eos: req.ignore_eos.unwrap_or(false),
            };
            let g = collect(state.engine.submit(model, request)?).await?;
            completion_tokens = g.tokens.len();
            finish_reason = g.finish_reason.as_str().into();
            match logprobs.as_mut() {
                Some(lp) => {
                    let scored: Vec<ScoredToken> = g
                        .steps
                        .iter()
                        .map(|s| ScoredToken {
                            logprob: s.token.logprob,
                            top: s.top.clone(),
                        })
                        .collect();
                    let before = text.len();
                    push_logprobs(lp, &lm, &g.tokens, &scored, false, as_ids, &mut text);
                    // Token texts can differ from the final text at a stop string.
                    text.truncate(before);
                    text.push_str(&g.text);
                }
                None => text.push_str(&g.text),
            }
        }
        usage.prompt_tokens += prompt.len() as u32;
        usage.completion_tokens += completion_tokens as u32;
        choices.push(CompletionChoice {
            text,
            index: index as u32,
            logprobs,
            finish_reason,
        });
    }
    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens;
    Ok(Json(Completion {
        id: format!("cmpl-{:x}", now()),
        object: "text_completion".into(),
        created: now(),
        model: req.model,
        choices,
        usage,
    })
    .into_response())
}

async fn score(
    state: &AppState,
    model: usize,
    tokens: &[u32],
    top: usize,
) -> Result<Vec<ScoredToken>, ServerError> {
    let mut events = state.engine.submit_job(
        model,
        JobKind::Score {
            tokens: tokens.to_vec(),
            top,
        },
    )?;
    while let Some(ev) = events.recv().await {
        match ev {
            WorkerEvent::Scored(s) => return Ok(s),
            WorkerEvent::Failed(e) => return Err(e.into()),
            WorkerEvent::Text(_) | WorkerEvent::Done(_) => {}
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
