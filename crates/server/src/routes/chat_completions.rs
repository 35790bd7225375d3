//! `POST /v1/chat/completions`: validation, prompt rendering, and the
//! streamed or collected answer.

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use neocloud_engine::generation::{GenerateRequest, Generation, LoadedModel};
use neocloud_openai::chat::{
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
    ChatCompletionRequest, ChatDelta, ChoiceLogprobs, TokenLogprob, Usage,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::engine_worker::WorkerEvent;
use crate::error::ServerError;
use crate::routes::sampling::{sampling_params, stop_strings};
use crate::AppState;

const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

/// Parses the body, mapping every failure to an OpenAI-style error.
pub(crate) fn parse_body<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<T, ServerError> {
    let bytes = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ServerError::TooLarge(limit)
        } else {
            ServerError::InvalidBody(format!("could not read the body: {r}"))
        }
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ServerError::InvalidBody(format!("the body is not a valid request: {e}")))
}

/// What a validated request asks for.
struct Plan {
    model: usize,
    generate: GenerateRequest,
    logprobs: Option<usize>,
    stream: bool,
    include_usage: bool,
}

fn validate(req: ChatCompletionRequest, state: &AppState) -> Result<Plan, ServerError> {
    let model = state.engine.model_index(&req.model)?;
    let lm: &LoadedModel = &state.engine.models()?[model];
    if req.messages.is_empty() {
        return Err(ServerError::param("messages", "messages must not be empty"));
    }
    for (i, m) in req.messages.iter().enumerate() {
        let role = m.get("role").and_then(|r| r.as_str());
        if !role.is_some_and(|r| ROLES.contains(&r)) {
            return Err(ServerError::param(
                "messages",
                format!("messages[{i}].role must be one of {}", ROLES.join(", ")),
            ));
        }
        match m.get("content") {
            None | Some(serde_json::Value::Null) if role == Some("assistant") => {}
            Some(serde_json::Value::String(_)) => {}
            Some(serde_json::Value::Array(parts))
                if parts.iter().all(|p| {
                    p.get("type").and_then(|t| t.as_str()) == Some("text")
                        && p.get("text").is_some_and(|t| t.is_string())
                }) => {}
            _ => {
                return Err(ServerError::param(
                    "messages",
                    format!("messages[{i}].content must be a string or a list of text parts"),
                ))
            }
        }
    }
    if req.n.is_some_and(|n| n != 1) {
        return Err(ServerError::param("n", "only n = 1 is supported"));
    }
    if let Some(rf) = &req.response_format {
        match rf.get("type").and_then(|t| t.as_str()) {
            Some("text") => {}
            Some(t @ ("json_object" | "json_schema")) => {
                return Err(ServerError::param(
                    "response_format",
                    format!("response_format {t} is not supported yet"),
                ))
            }
            _ => {
                return Err(ServerError::param(
                    "response_format",
                    "response_format.type must be text, json_object or json_schema",
                ))
            }
        }
    }
    match req.tool_choice.as_ref().and_then(|t| t.as_str()) {
        None if req.tool_choice.is_none() => {}
        Some("auto" | "none") => {}
        _ => {
            return Err(ServerError::param(
                "tool_choice",
                "tool_choice must be auto or none (forced tool calls are not supported yet)",
            ))
        }
    }
    if req.min_tokens.is_some_and(|m| m > 0) {
        return Err(ServerError::param(
            "min_tokens",
            "min_tokens is not supported yet",
        ));
    }
    let top_logprobs = req.top_logprobs.unwrap_or(0) as usize;
    let logprobs = match req.logprobs {
        Some(true) => Some(top_logprobs),
        _ if top_logprobs > 0 => {
            return Err(ServerError::param(
                "top_logprobs",
                "top_logprobs needs logprobs: true",
            ))
        }
        _ => None,
    };
    if top_logprobs > 20 {
        return Err(ServerError::param(
            "top_logprobs",
            "top_logprobs must be at most 20",
        ));
    }
    if req.stream && logprobs.is_some() {
        return Err(ServerError::param(
            "logprobs",
            "logprobs with stream: true are not supported yet",
        ));
    }
    let sampling = sampling_params(
        &req.sampling,
        logprobs.unwrap_or(0),
        lm.model.config.vocab_size,
    )?;
    let stop = stop_strings(req.stop)?;
    let template = lm.chat_template.as_ref().ok_or_else(|| {
        ServerError::param(
            "messages",
            "this model has no chat template; use /v1/completions",
        )
    })?;
    let tools = match req.tool_choice.as_ref().and_then(|t| t.as_str()) {
        Some("none") => None,
        _ => req.tools.as_deref().filter(|t| !t.is_empty()),
    };
    let prompt_text = template.render(&req.messages, tools, true)?;
    let prompt = lm.encode_chat_prompt(&prompt_text);
    let context = lm.model.config.context_length;
    if prompt.len() >= context {
        return Err(ServerError::param(
            "messages",
            format!(
                "the prompt has {} tokens; the context is {context}",
                prompt.len()
            ),
        ));
    }
    let room = context - prompt.len();
    let max_tokens = match req.max_completion_tokens.or(req.max_tokens) {
        Some(0) => {
            return Err(ServerError::param(
                "max_tokens",
                "max_tokens must be at least 1",
            ))
        }
        Some(n) => (n as usize).min(room),
        None => room,
    };
    Ok(Plan {
        model,
        generate: GenerateRequest {
            prompt,
            max_tokens,
            sampling,
            stop,
            stop_token_ids: Vec::new(),
            ignore_eos: req.ignore_eos.unwrap_or(false),
        },
        logprobs,
        stream: req.stream,
        include_usage: req.stream_options.is_some_and(|o| o.include_usage),
    })
}

pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn request_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("chatcmpl-{t:x}{n:04x}")
}

/// The handler.
pub async fn chat_completions(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ServerError> {
    let req: ChatCompletionRequest = parse_body(body, state.body_limit)?;
    let model_name = req.model.clone();
    let plan = validate(req, &state)?;
    let prompt_tokens = plan.generate.prompt.len() as u32;
    let events = state.engine.submit(plan.model, plan.generate)?;
    let id = request_id();
    if plan.stream {
        return Ok(stream_response(
            events,
            id,
            model_name,
            prompt_tokens,
            plan.include_usage,
        ));
    }
    let lm = state.engine.models()?[plan.model].clone();
    let generation = collect(events).await?;
    let logprobs = plan.logprobs.map(|_| ChoiceLogprobs {
        content: generation
            .steps
            .iter()
            .map(|s| {
                let mut entry = token_logprob(&lm, s.token.id, s.token.logprob);
                entry.top_logprobs = Some(
                    s.top
                        .iter()
                        .map(|t| token_logprob(&lm, t.id, t.logprob))
                        .collect(),
                );
                entry
            })
            .collect(),
    });
    let body = ChatCompletion {
        id,
        object: "chat.completion".into(),
        created: now(),
        model: model_name,
        choices: vec![ChatChoice {
            index: 0,
            message: AssistantMessage {
                role: "assistant".into(),
                content: Some(generation.text.clone()),
            },
            logprobs,
            finish_reason: generation.finish_reason.as_str().into(),
        }],
        usage: Usage::new(prompt_tokens, generation.tokens.len() as u32),
    };
    Ok(Json(body).into_response())
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

pub(crate) async fn collect(
    mut events: mpsc::Receiver<WorkerEvent>,
) -> Result<Generation, ServerError> {
    while let Some(ev) = events.recv().await {
        match ev {
            WorkerEvent::Text(_) => {}
            WorkerEvent::Done(g) => return Ok(*g),
            WorkerEvent::Failed(e) => return Err(e.into()),
            WorkerEvent::Scored(_) => break,
        }
    }
    Err(ServerError::Unavailable(
        "the engine stopped mid-request".into(),
    ))
}

fn stream_response(
    mut events: mpsc::Receiver<WorkerEvent>,
    id: String,
    model: String,
    prompt_tokens: u32,
    include_usage: bool,
) -> Response {
    let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(16);
    tokio::spawn(async move {
        let created = now();
        let chunk = |choices: Vec<ChatChunkChoice>, usage: Option<Usage>| ChatCompletionChunk {
            id: id.clone(),
            object: "chat.completion.chunk".into(),
            created,
            model: model.clone(),
            choices,
            usage,
        };
        let delta = |role: Option<&str>, content: Option<String>, finish: Option<&str>| {
            vec![ChatChunkChoice {
                index: 0,
                delta: ChatDelta {
                    role: role.map(str::to_owned),
                    content,
                },
                finish_reason: finish.map(str::to_owned),
            }]
        };
        let send = |c: ChatCompletionChunk| {
            let tx = tx.clone();
            async move {
                let data = serde_json::to_string(&c).unwrap_or_default();
                tx.send(Ok(Event::default().data(data))).await.is_ok()
            }
        };
        if !send(chunk(
            delta(Some("assistant"), Some(String::new()), None),
            None,
        ))
        .await
        {
            return;
        }
        while let Some(ev) = events.recv().await {
            match ev {
                WorkerEvent::Text(t) => {
                    if !send(chunk(delta(None, Some(t), None), None)).await {
                        // Client gone: dropping `events` cancels the job.
                        return;
                    }
                }
                WorkerEvent::Done(g) => {
                    let finish = g.finish_reason.as_str();
                    let _ = send(chunk(delta(None, None, Some(finish)), None)).await;
                    if include_usage {
                        let usage = Usage::new(prompt_tokens, g.tokens.len() as u32);
                        let _ = send(chunk(Vec::new(), Some(usage))).await;
                    }
                    break;
                }
                WorkerEvent::Failed(e) => {
                    let err = ServerError::from(e).to_api_error();
                    let _ = tx.send(Ok(Event::default().data(err.to_json()))).await;
                    break;
                }
                WorkerEvent::Scored(_) => break,
            }
        }
        let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
    });
    Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response()
}
