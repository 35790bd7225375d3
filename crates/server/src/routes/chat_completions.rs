//! `POST /v1/chat/completions`: validation, prompt rendering, and the
//! streamed or collected answer, with `n` choices and tool calls.

use std::time::Duration;

use axum::response::{IntoResponse, Response};
use axum::Json;
use neocloud_engine::generation::{GenerateRequest, LoadedModel};
use neocloud_engine::json_grammar::Grammar;
use neocloud_engine::sampler::Sampled;
use neocloud_openai::chat::{
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
    ChatCompletionRequest, ChatDelta, ChoiceLogprobs, TokenLogprob, ToolCallDelta, Usage,
};

use crate::engine_worker::{JobEvents, Priority, WorkerEvent};
use crate::error::ServerError;
use crate::json_body::parse_json;
use crate::routes::choices::{
    choices_of, collect_all, merge, now, priority_of, response_id, submit_all, MAX_CHOICES,
};
use crate::routes::event_stream::event_stream;
use crate::routes::sampling::{sampling_params, stop_strings};
use crate::tool_calls::{self, ToolCallStream};
use crate::usage::UsageMeter;
use crate::AppState;

const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

/// What a validated request asks for.
struct Plan {
    model: usize,
    generate: GenerateRequest,
    n: usize,
    priority: Priority,
    logprobs: bool,
    /// Names of the tools offered, when answers are parsed for calls.
    tool_names: Option<Vec<String>>,
    stream: bool,
    include_usage: bool,
}

fn check_messages(messages: &[serde_json::Value]) -> Result<(), ServerError> {
    if messages.is_empty() {
        return Err(ServerError::param("messages", "messages must not be empty"));
    }
    for (i, m) in messages.iter().enumerate() {
        let role = m.get("role").and_then(|r| r.as_str());
        if !role.is_some_and(|r| ROLES.contains(&r)) {
            return Err(ServerError::param(
                format!("messages[{i}].role"),
                format!("messages[{i}].role must be one of {}", ROLES.join(", ")),
            ));
        }
        let has_tool_calls = m
            .get("tool_calls")
            .is_some_and(|c| c.as_array().is_some_and(|a| !a.is_empty()));
        match m.get("content") {
            None | Some(serde_json::Value::Null) if role == Some("assistant") && has_tool_calls => {
            }
            Some(serde_json::Value::String(_)) => {}
            Some(serde_json::Value::Array(parts))
                if parts.iter().all(|p| {
                    p.get("type").and_then(|t| t.as_str()) == Some("text")
                        && p.get("text").is_some_and(|t| t.is_string())
                }) => {}
            _ => {
                return Err(ServerError::param(
                    format!("messages[{i}].content"),
                    format!("messages[{i}].content must be a string or a list of text parts"),
                ))
            }
        }
        if let Some(calls) = m.get("tool_calls").filter(|c| !c.is_null()) {
            let well_formed = role == Some("assistant")
                && calls.as_array().is_some_and(|a| {
                    a.iter().all(|c| {
                        c.pointer("/function/name").is_some_and(|n| n.is_string())
                            && c.pointer("/function/arguments")
                                .is_some_and(|a| a.is_string())
                    })
                });
            if !well_formed {
                return Err(ServerError::param(
                    format!("messages[{i}].tool_calls"),
                    "tool_calls belong to assistant messages, each with function.name and function.arguments as strings",
                ));
            }
        }
    }
    Ok(())
}

fn check_tools(tools: &[serde_json::Value]) -> Result<(), ServerError> {
    for (i, t) in tools.iter().enumerate() {
        let ok = t.get("type").and_then(|t| t.as_str()) == Some("function")
            && t.pointer("/function/name").is_some_and(|n| n.is_string());
        if !ok {
            return Err(ServerError::param(
                format!("tools[{i}]"),
                "each tool must be {\"type\": \"function\", \"function\": {\"name\": ...}}",
            ));
        }
    }
    Ok(())
}

fn validate(req: ChatCompletionRequest, state: &AppState) -> Result<Plan, ServerError> {
    let model = state.engine.model_index(&req.model)?;
    let lm: &LoadedModel = &state.engine.models()?[model];
    check_messages(&req.messages)?;
    let n = req.n.unwrap_or(1) as usize;
    if !(1..=MAX_CHOICES).contains(&n) {
        return Err(ServerError::param(
            "n",
            format!("n must be between 1 and {MAX_CHOICES}"),
        ));
    }
    let grammar = match &req.response_format {
        None => None,
        Some(rf) => match rf.get("type").and_then(|t| t.as_str()) {
            Some("text") => None,
            Some("json_object") => Some(Grammar::JsonObject),
            Some("json_schema") => {
                return Err(ServerError::param(
                    "response_format",
                    "response_format json_schema is not supported yet; json_object is",
                ))
            }
            _ => {
                return Err(ServerError::param(
                    "response_format",
                    "response_format.type must be text, json_object or json_schema",
                ))
            }
        },
    };
    let tool_choice = match &req.tool_choice {
        None => "auto",
        Some(serde_json::Value::String(s)) if s == "auto" || s == "none" => s.as_str(),
        Some(_) => {
            return Err(ServerError::param(
                "tool_choice",
                "tool_choice must be auto or none (forced tool calls are not supported yet)",
            ))
        }
    };
    if let Some(tools) = &req.tools {
        check_tools(tools)?;
    }
    let top_logprobs = req.top_logprobs.unwrap_or(0) as usize;
    let logprobs = req.logprobs.unwrap_or(false);
    if top_logprobs > 0 && !logprobs {
        return Err(ServerError::param(
            "top_logprobs",
            "top_logprobs needs logprobs: true",
        ));
    }
    let sampling = sampling_params(
        &req.sampling,
        logprobs,
        top_logprobs,
        lm.model.config.vocab_size,
    )?;
    let stop = stop_strings(req.stop)?;
    let template = lm.chat_template.as_ref().ok_or_else(|| {
        ServerError::param(
            "messages",
            "this model has no chat template; use /v1/completions",
        )
    })?;
    let tools = match tool_choice {
        "none" => None,
        _ => req.tools.as_deref().filter(|t| !t.is_empty()),
    };
    let tool_names = tools
        .filter(|_| tool_calls::template_uses_tool_call_tags(template.source()))
        .map(|tools| {
            tools
                .iter()
                .filter_map(|t| t.pointer("/function/name").and_then(|n| n.as_str()))
                .map(str::to_owned)
                .collect()
        });
    let prompt = lm.encode_chat(&req.messages, tools, true)?;
    let context = lm.model.config.context_length;
    let max_tokens = req.max_completion_tokens.or(req.max_tokens);
    let param = if req.max_completion_tokens.is_some() {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    if max_tokens == Some(0) {
        return Err(ServerError::param(
            param,
            format!("{param} must be at least 1"),
        ));
    }
    let asked = max_tokens.map(|m| m as usize).unwrap_or(1);
    if prompt.len() + asked > context {
        return Err(ServerError::ContextLengthExceeded {
            param: "messages".into(),
            message: format!(
                "this model's context is {context} tokens; the messages take {} and {param} asks for {asked} more",
                prompt.len()
            ),
        });
    }
    let max_tokens = max_tokens.map_or(context - prompt.len(), |m| m as usize);
    let min_tokens = req.min_tokens.unwrap_or(0) as usize;
    if min_tokens > max_tokens {
        return Err(ServerError::param(
            "min_tokens",
            format!("min_tokens ({min_tokens}) exceeds {param} ({max_tokens})"),
        ));
    }
    Ok(Plan {
        model,
        generate: GenerateRequest {
            prompt,
            max_tokens,
            sampling,
            stop,
            stop_token_ids: Vec::new(),
            ignore_eos: req.ignore_eos.unwrap_or(false),
            min_tokens,
            grammar,
            score_prompt: None,
        },
        n,
        priority: priority_of(req.priority)?,
        logprobs,
        tool_names,
        stream: req.stream,
        include_usage: req.stream_options.is_some_and(|o| o.include_usage),
    })
}

/// What every choice of a response shares.
struct Answer {
    id: String,
    model: String,
    lm: std::sync::Arc<LoadedModel>,
    prompt_tokens: u32,
    logprobs: bool,
    tool_names: Option<Vec<String>>,
}

impl Answer {
    fn logprobs_of(&self, steps: &[Sampled]) -> Option<ChoiceLogprobs> {
        self.logprobs.then(|| ChoiceLogprobs {
            content: steps.iter().map(|s| step_logprob(&self.lm, s)).collect(),
        })
    }

    fn call_id_prefix(&self, choice: usize) -> String {
        let suffix = self.id.strip_prefix("chatcmpl-").unwrap_or(&self.id);
        format!("call_{suffix}_{choice}")
    }
}

/// A chat request parsed, checked, templated and tokenised: what the
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
    let mut req: ChatCompletionRequest = parse_json(body)?;
    let model = std::mem::replace(&mut req.model, served.to_owned());
    let plan = validate(req, state)?;
    Ok(Prepared { model, plan })
}

/// Answers a chat completion prepared for the engine's model, metered
/// into `meter` (tokens, first token, finish reason, and the energy that
/// goes into `usage`); the answer names the model as the request did.
pub(crate) async fn answer(
    state: &AppState,
    prepared: Prepared,
    meter: UsageMeter,
) -> Result<Response, ServerError> {
    let Prepared { model, plan } = prepared;
    let answer = Answer {
        id: response_id("chatcmpl"),
        model,
        lm: state.engine.models()?[plan.model].clone(),
        prompt_tokens: plan.generate.prompt.len() as u32,
        logprobs: plan.logprobs,
        tool_names: plan.tool_names,
    };
    let jobs = submit_all(
        state,
        plan.model,
        choices_of(&plan.generate, plan.n),
        plan.priority,
    )?;
    if plan.stream {
        return Ok(stream_response(
            jobs,
            answer,
            plan.include_usage,
            meter,
            state.write_timeout,
        ));
    }
    let generations = collect_all(jobs, &meter).await?;
    let cached: usize = generations.iter().map(|g| g.cached_prompt_tokens).sum();
    let mut completion_tokens = 0;
    let choices: Vec<ChatChoice> = generations
        .into_iter()
        .enumerate()
        .map(|(i, g)| {
            completion_tokens += g.tokens.len() as u32;
            let parsed = answer
                .tool_names
                .as_ref()
                .and_then(|names| tool_calls::parse(&g.text, names, &answer.call_id_prefix(i)));
            let (content, calls, finish) = match parsed {
                Some(p) => (p.content, Some(p.calls), "tool_calls"),
                None => (Some(g.text), None, g.finish_reason.as_str()),
            };
            ChatChoice {
                index: i as u32,
                message: AssistantMessage {
                    role: "assistant".into(),
                    content,
                    tool_calls: calls,
                },
                logprobs: answer.logprobs_of(&g.steps),
                finish_reason: finish.into(),
            }
        })
        .collect();
    if let Some(first) = choices.first() {
        meter.finish_reason(&first.finish_reason);
    }
    meter.tokens(
        answer.prompt_tokens as u64,
        completion_tokens as u64,
        cached as u64,
    );
    let usage = Usage::new(answer.prompt_tokens, completion_tokens)
        .with_estimated_energy(meter.energy_now());
    let body = ChatCompletion {
        id: answer.id,
        object: "chat.completion".into(),
        created: now(),
        model: answer.model,
        choices,
        usage,
    };
    Ok(Json(body).into_response())
}

fn step_logprob(lm: &LoadedModel, s: &Sampled) -> TokenLogprob {
    let mut entry = token_logprob(lm, s.token.id, s.token.logprob);
    entry.top_logprobs = Some(
        s.top
            .iter()
            .map(|t| token_logprob(lm, t.id, t.logprob))
            .collect(),
    );
    entry
}

fn token_logprob(lm: &LoadedModel, id: u32, logprob: f32) -> TokenLogprob {
    let bytes = lm.tokenizer.token_bytes(id, true);
    TokenLogprob {
        token: String::from_utf8_lossy(&bytes).into_owned(),
        logprob,
        bytes,
        top_logprobs: None,
    }
}

/// Per-choice progress of a stream.
#[derive(Default)]
struct ChoiceStream {
    text_sent: usize,
    steps_sent: usize,
    tool_calls: Option<ToolCallStream>,
}

fn stream_response(
    jobs: Vec<JobEvents>,
    answer: Answer,
    include_usage: bool,
    meter: UsageMeter,
    write_stall: Duration,
) -> Response {
    let n = jobs.len();
    let mut events = merge(jobs);
    let (out, response) = event_stream(write_stall);
    tokio::spawn(async move {
        let created = now();
        let chunk = |choices: Vec<ChatChunkChoice>, usage: Option<Usage>| ChatCompletionChunk {
            id: answer.id.clone(),
            object: "chat.completion.chunk".into(),
            created,
            model: answer.model.clone(),
            choices,
            usage,
        };
        let send = |c: ChatCompletionChunk| out.send(c);
        let choice = |index: usize, delta: ChatDelta, logprobs, finish: Option<&str>| {
            vec![ChatChunkChoice {
                index: index as u32,
                delta,
                logprobs,
                finish_reason: finish.map(str::to_owned),
            }]
        };
        let mut states: Vec<ChoiceStream> = (0..n)
            .map(|_| ChoiceStream {
                tool_calls: answer.tool_names.clone().map(ToolCallStream::new),
                ..ChoiceStream::default()
            })
            .collect();
        for i in 0..n {
            let delta = ChatDelta {
                role: Some("assistant".into()),
                content: Some(String::new()),
                tool_calls: None,
            };
            if !send(chunk(choice(i, delta, None, None), None)).await {
                return;
            }
        }
        let mut finished = 0;
        let mut completion_tokens = 0;
        let mut cached = 0usize;
        let mut first_sent = false;
        while let Some((i, ev)) = events.recv().await {
            let state = &mut states[i];
            match ev {
                WorkerEvent::Text { text, steps } => {
                    state.text_sent += text.len();
                    state.steps_sent += steps.len();
                    let content = match state.tool_calls.as_mut() {
                        Some(t) => t.push(&text),
                        None => text,
                    };
                    let logprobs = answer.logprobs_of(&steps);
                    if content.is_empty() && logprobs.is_none() {
                        continue;
                    }
                    if !content.is_empty() && !first_sent {
                        meter.first_token();
                        first_sent = true;
                    }
                    let delta = ChatDelta {
                        content: Some(content),
                        ..ChatDelta::default()
                    };
                    if !send(chunk(choice(i, delta, logprobs, None), None)).await {
                        // Client gone: dropping `events` cancels the jobs.
                        // What was generated is metered all the same.
                        let generated: usize = states.iter().map(|s| s.steps_sent).sum();
                        meter.tokens(answer.prompt_tokens as u64, generated as u64, cached as u64);
                        meter.abandoned();
                        return;
                    }
                }
                WorkerEvent::Done(g) => {
                    completion_tokens += g.tokens.len() as u32;
                    cached += g.cached_prompt_tokens;
                    if !g.tokens.is_empty() {
                        meter.first_token();
                    }
                    let rest = g.text.get(state.text_sent..).unwrap_or("");
                    let steps = g.steps.get(state.steps_sent..).unwrap_or(&[]);
                    state.steps_sent = g.steps.len();
                    let (content, calls) = match state.tool_calls.take() {
                        Some(mut t) => {
                            let mut content = t.push(rest);
                            let (tail, calls) = t.finish(&answer.call_id_prefix(i));
                            content.push_str(&tail);
                            (content, calls)
                        }
                        None => (rest.to_owned(), Vec::new()),
                    };
                    let logprobs = answer.logprobs_of(steps);
                    if !content.is_empty()
                        || logprobs.as_ref().is_some_and(|l| !l.content.is_empty())
                    {
                        let delta = ChatDelta {
                            content: Some(content),
                            ..ChatDelta::default()
                        };
                        let _ = send(chunk(choice(i, delta, logprobs, None), None)).await;
                    }
                    let finish = if calls.is_empty() {
                        g.finish_reason.as_str()
                    } else {
                        let deltas = calls
                            .into_iter()
                            .enumerate()
                            .map(|(k, c)| ToolCallDelta {
                                index: k as u32,
                                id: c.id,
                                kind: c.kind,
                                function: c.function,
                            })
                            .collect();
                        let delta = ChatDelta {
                            tool_calls: Some(deltas),
                            ..ChatDelta::default()
                        };
                        let _ = send(chunk(choice(i, delta, None, None), None)).await;
                        "tool_calls"
                    };
                    if finished == 0 {
                        meter.finish_reason(finish);
                    }
                    let _ = send(chunk(
                        choice(i, ChatDelta::default(), None, Some(finish)),
                        None,
                    ))
                    .await;
                    finished += 1;
                    if finished == n {
                        break;
                    }
                }
                WorkerEvent::Failed(e) => {
                    meter.finish_reason("error");
                    out.error(e).await;
                    break;
                }
            }
        }
        meter.tokens(
            answer.prompt_tokens as u64,
            completion_tokens as u64,
            cached as u64,
        );
        let joules = meter.energy_now();
        if finished == n && include_usage {
            let usage =
                Usage::new(answer.prompt_tokens, completion_tokens).with_estimated_energy(joules);
            let _ = send(chunk(Vec::new(), Some(usage))).await;
        }
        out.done().await;
    });
    response
}
