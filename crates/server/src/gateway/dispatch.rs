//! Forwarding one request: choose an upstream by the router's policy, adapt
//! the body to its conformance profile, send it, and judge the reply. A
//! failure before anything reached the client (no connection, a 5xx, a
//! 429, a stream that broke before its first event) is retried on another
//! upstream, then on the fallback pools, while the retry budget allows.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::upstream::{BodyStream, Endpoint, UpstreamRequest};
use bytes::Bytes;
use neocloud_fleet::conformance;
use neocloud_fleet::health::retry_after;
use neocloud_fleet::metrics::UpstreamErrorKind;
use neocloud_fleet::policy::{choose, prefix_hash, RequestSlo, RouteRequest};
use neocloud_openai::{ApiError, ApiKey, ErrorKind};
use serde_json::{json, Map, Value};
use tokio_stream::StreamExt;

use super::relay::Relay;
use super::{lock, Attempt, BudgetClaim, Gateway};
use crate::error::ServerError;

/// Longest cool-down a 429's `Retry-After` can impose.
const MAX_COOL_DOWN: Duration = Duration::from_secs(60);
/// Largest non-streamed answer read from an upstream.
const MAX_ANSWER_BYTES: usize = 64 << 20;
/// Largest error body read from an upstream.
const MAX_ERROR_BYTES: usize = 64 << 10;
/// Characters of the prompt that key prefix affinity.
const PREFIX_CHARS: usize = 256;
/// Output tokens assumed when a request names no limit.
const DEFAULT_OUTPUT_TOKENS: u64 = 256;

/// A request, checked enough to route.
pub struct Forward {
    /// Which endpoint.
    pub endpoint: Endpoint,
    /// The body as the client sent it.
    pub body: Map<String, Value>,
    /// The model the client asked for.
    pub model: String,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// The SLO from `x-neocloud-slo`.
    pub slo: Option<RequestSlo>,
}

/// The answer, complete or as a stream.
pub enum Answer {
    /// A whole JSON body.
    Complete(Bytes),
    /// A stream an upstream has accepted.
    Stream(Box<Relay>),
}

/// Where a request went and what came back.
pub struct Dispatched {
    /// The pool's name.
    pub pool: String,
    /// The upstream's name (`POOL/INDEX`).
    pub upstream: String,
    /// Parameters removed for the upstream's profile.
    pub dropped: Vec<String>,
    /// The answer.
    pub answer: Answer,
}

/// How one attempt ended, when it did not produce an answer.
pub(crate) enum AttemptError {
    /// The upstream failed; another may succeed.
    Failed(UpstreamErrorKind),
    /// The upstream is rate limited for this long.
    RateLimited(Duration),
    /// The upstream is overloaded (503 with `Retry-After`): it cools down
    /// without counting as a failure.
    Busy(Duration),
}

/// What went wrong last, for the error the client gets.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Last {
    Nothing,
    Failed,
    RateLimited,
}

/// An upstream that accepted a request (a 2xx status), its body unread.
pub(crate) struct Opened {
    pub attempt: Attempt,
    pub body: BodyStream,
    pub pool: String,
    pub upstream: String,
    pub dropped: Vec<String>,
    /// The client's model name, when the upstream's differs.
    pub rewrite_model: Option<String>,
}

/// One request's way through the fleet: the pools that may serve it, the
/// upstreams tried so far, and its place in the retry budget.
pub(crate) struct Route {
    gw: Arc<Gateway>,
    f: Forward,
    tiers: Vec<Vec<usize>>,
    tier: usize,
    fallback_counted: usize,
    tried: Vec<usize>,
    last: Last,
    claim: BudgetClaim,
    prefix: u64,
    prompt_tokens: u32,
    output_tokens: u64,
    /// Whether the client asked for usage in its stream.
    pub wants_usage: bool,
}

impl Route {
    fn new(gw: &Arc<Gateway>, f: Forward) -> Result<Route, ServerError> {
        let tiers = gw.pool_tiers(&f.model);
        if tiers.is_empty() {
            return Err(ServerError::ModelNotFound(f.model));
        }
        let prompt = prompt_text(&f.body);
        let prompt_tokens = (prompt.len() / 4 + 1).min(u32::MAX as usize) as u32;
        let output_tokens = ["max_completion_tokens", "max_tokens"]
            .iter()
            .find_map(|k| f.body.get(*k).and_then(Value::as_u64))
            .unwrap_or(DEFAULT_OUTPUT_TOKENS);
        let wants_usage = f
            .body
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Ok(Route {
            gw: Arc::clone(gw),
            prefix: prefix_hash(&prompt, PREFIX_CHARS),
            f,
            tiers,
            tier: 0,
            fallback_counted: 0,
            tried: Vec::new(),
            last: Last::Nothing,
            claim: BudgetClaim::new(gw)?,
            prompt_tokens,
            output_tokens,
            wants_usage,
        })
    }

    /// The next upstream to try, by the policy, primary pools first; `None`
    /// when none is left. A retry must fit the budget.
    fn pick(&mut self) -> Result<Option<usize>, ServerError> {
        while self.tier < self.tiers.len() {
            let tier = &self.tiers[self.tier];
            let slo = self
                .f
                .slo
                .or_else(|| tier.iter().find_map(|&p| self.gw.pools[p].slo));
            let route = RouteRequest {
                prefix_hash: self.prefix,
                prompt_tokens: self.prompt_tokens,
                slo,
                sequence: self.gw.next_sequence(),
            };
            let Some(id) = choose(self.gw.policy, &self.gw.view(tier, &self.tried), &route) else {
                self.tier += 1;
                continue;
            };
            if let Some(&previous) = self.tried.last() {
                if !self.claim.try_retry() {
                    tracing::warn!(model = %self.f.model, "retry budget exhausted");
                    return Err(self.exhausted());
                }
                self.gw.metrics.upstreams[previous].retry();
            }
            if self.tier > self.fallback_counted {
                self.gw.metrics.fallback();
                self.fallback_counted = self.tier;
            }
            self.tried.push(id);
            return Ok(Some(id));
        }
        Ok(None)
    }

    /// Sends the request to upstreams in turn until one accepts it (2xx),
    /// refuses it for the client's own fault (a 4xx, passed on), or none is
    /// left (503, or 429 when all were rate limited).
    pub(crate) async fn open_next(&mut self) -> Result<Opened, ServerError> {
        loop {
            let Some(id) = self.pick()? else {
                self.gw.metrics.unserved();
                return Err(self.exhausted());
            };
            let gw = Arc::clone(&self.gw);
            let slot = &gw.upstreams[id];
            let pool = &gw.pools[slot.pool];
            let mut body = self.f.body.clone();
            body.insert("model".into(), Value::String(slot.served_model.clone()));
            if self.f.stream {
                // Usage is always asked for, so that streamed answers are
                // metered; the client sees it only if it asked.
                let options = body.entry("stream_options").or_insert_with(|| json!({}));
                if let Some(o) = options.as_object_mut() {
                    o.insert("include_usage".into(), Value::Bool(true));
                }
            }
            let adapted =
                conformance::adapt(pool.config.profile(), Value::Object(body)).map_err(|param| {
                    ServerError::param(
                        param.clone(),
                        format!(
                            "`{param}` is not supported by the upstreams of pool {:?}, which serves this model",
                            pool.config.name
                        ),
                    )
                })?;
            let bytes = serde_json::to_vec(&adapted.body)
                .map_err(|e| ServerError::Internal(format!("re-encoding a request: {e}")))?;
            let attempt = Attempt::begin(&gw, id, self.prompt_tokens as u64 + self.output_tokens);
            let request = UpstreamRequest {
                endpoint: self.f.endpoint,
                body: Bytes::from(bytes),
                api_key: pool.api_key.clone(),
            };
            // A stream's headers come at once; a whole answer only at its end.
            let wait = if self.f.stream {
                gw.stall_timeout
            } else {
                gw.request_timeout
            };
            let reply = match tokio::time::timeout(wait, slot.upstream.send(request)).await {
                Err(_) => Err(AttemptError::Failed(UpstreamErrorKind::Timeout)),
                Ok(Err(_)) => Err(AttemptError::Failed(UpstreamErrorKind::Connect)),
                Ok(Ok(reply)) => {
                    judge_status(reply.status, reply.retry_after.as_deref()).map(|()| reply)
                }
            };
            let reply = match reply {
                Ok(reply) => reply,
                Err(AttemptError::Failed(kind)) => {
                    self.failed(id, kind);
                    continue;
                }
                Err(AttemptError::RateLimited(wait)) => {
                    gw.metrics.upstreams[id].error(UpstreamErrorKind::RateLimited);
                    lock(&pool.health).record_rate_limited(slot.index, Instant::now(), wait);
                    if self.last == Last::Nothing {
                        self.last = Last::RateLimited;
                    }
                    continue;
                }
                Err(AttemptError::Busy(wait)) => {
                    gw.metrics.upstreams[id].error(UpstreamErrorKind::ServerError);
                    lock(&pool.health).record_rate_limited(slot.index, Instant::now(), wait);
                    self.last = Last::Failed;
                    continue;
                }
            };
            if !(200..300).contains(&reply.status) {
                let body = tokio::time::timeout(
                    gw.stall_timeout,
                    read_capped(reply.body, MAX_ERROR_BYTES),
                )
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
                gw.metrics.upstreams[id].error(UpstreamErrorKind::ClientError);
                lock(&pool.health).record_success(slot.index);
                return Err(ServerError::Upstream(refusal(
                    reply.status,
                    &body,
                    pool.api_key.as_ref().map(ApiKey::expose),
                )));
            }
            return Ok(Opened {
                attempt,
                body: reply.body,
                pool: pool.config.name.clone(),
                upstream: slot.name.clone(),
                dropped: adapted.dropped,
                rewrite_model: (slot.served_model != self.f.model).then(|| self.f.model.clone()),
            });
        }
    }

    /// The gateway.
    pub(crate) fn gateway(&self) -> &Gateway {
        &self.gw
    }

    /// How long a stream may stay silent.
    pub(crate) fn stall_timeout(&self) -> Duration {
        self.gw.stall_timeout
    }

    /// An accepted attempt failed before anything reached the client.
    pub(crate) fn failed(&mut self, id: usize, kind: UpstreamErrorKind) {
        failed(&self.gw, id, kind);
        self.last = Last::Failed;
    }

    /// The error when no attempt succeeded.
    fn exhausted(&self) -> ServerError {
        match self.last {
            Last::RateLimited => {
                let pools: Vec<usize> = self.tiers.iter().flatten().copied().collect();
                ServerError::RateLimited {
                    message: "every upstream serving this model is rate limited; retry later"
                        .into(),
                    retry_after_secs: self.gw.soonest_available(&pools),
                }
            }
            Last::Failed | Last::Nothing => ServerError::Unavailable(
                "no upstream serving this model could answer; retry later".into(),
            ),
        }
    }
}

/// Sends `f` where the policy says, retrying and falling back as allowed.
pub async fn forward(gw: &Arc<Gateway>, f: Forward) -> Result<Dispatched, ServerError> {
    let stream = f.stream;
    let mut route = Route::new(gw, f)?;
    loop {
        let opened = route.open_next().await?;
        let (pool, upstream, dropped) = (
            opened.pool.clone(),
            opened.upstream.clone(),
            opened.dropped.clone(),
        );
        let answer = if stream {
            Answer::Stream(Box::new(Relay::new(route, opened)))
        } else {
            let id = opened.attempt.upstream;
            match complete(gw, opened).await {
                Ok(bytes) => Answer::Complete(bytes),
                Err(kind) => {
                    route.failed(id, kind);
                    continue;
                }
            }
        };
        return Ok(Dispatched {
            pool,
            upstream,
            dropped,
            answer,
        });
    }
}

/// Records a failed attempt: counted, and perhaps an ejection.
pub(crate) fn failed(gw: &Gateway, id: usize, kind: UpstreamErrorKind) {
    let slot = &gw.upstreams[id];
    gw.metrics.upstreams[id].error(kind);
    let ejected = lock(&gw.pools[slot.pool].health).record_failure(slot.index, Instant::now());
    if ejected {
        gw.metrics.upstreams[id].ejection();
        tracing::warn!(upstream = %slot.name, "upstream ejected after consecutive failures");
    } else {
        tracing::debug!(upstream = %slot.name, kind = kind.label(), "upstream attempt failed");
    }
}

/// A successful attempt's upstream is in good health.
pub(crate) fn succeeded(gw: &Gateway, id: usize) {
    let slot = &gw.upstreams[id];
    lock(&gw.pools[slot.pool].health).record_success(slot.index);
}

/// Reads an accepted non-streamed answer and adds its energy.
async fn complete(gw: &Arc<Gateway>, opened: Opened) -> Result<Bytes, UpstreamErrorKind> {
    let Opened {
        mut attempt,
        body,
        rewrite_model,
        ..
    } = opened;
    let deadline = attempt.started + gw.request_timeout;
    let body =
        match tokio::time::timeout_at(deadline.into(), read_capped(body, MAX_ANSWER_BYTES)).await {
            Err(_) => return Err(UpstreamErrorKind::Timeout),
            Ok(result) => result?,
        };
    let Ok(Value::Object(mut answer)) = serde_json::from_slice::<Value>(&body) else {
        return Err(UpstreamErrorKind::BadReply);
    };
    if !answer.get("choices").is_some_and(Value::is_array) {
        return Err(UpstreamErrorKind::BadReply);
    }
    let elapsed = attempt.started.elapsed().as_secs_f64();
    let completion_tokens = answer
        .get("usage")
        .and_then(|u| u.get("completion_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(0);
    attempt.observe(
        None,
        (completion_tokens > 0).then(|| elapsed / completion_tokens as f64),
    );
    let joules = attempt.finish();
    add_energy(&mut answer, joules);
    if let Some(model) = rewrite_model {
        answer.insert("model".into(), Value::String(model));
    }
    succeeded(gw, attempt.upstream);
    serde_json::to_vec(&answer)
        .map(Bytes::from)
        .map_err(|_| UpstreamErrorKind::BadReply)
}

/// Sorts a status into retry (5xx, 429, and 4xx that mean the gateway's
/// own configuration is wrong) or carry on (2xx, and the 4xx that are the
/// request's fault, whose body is read next).
pub(crate) fn judge_status(
    status: u16,
    retry_after_header: Option<&str>,
) -> Result<(), AttemptError> {
    match status {
        200..=299 | 400 | 413 | 422 => Ok(()),
        429 => Err(AttemptError::RateLimited(retry_after(
            retry_after_header,
            MAX_COOL_DOWN,
        ))),
        503 if retry_after_header.is_some() => Err(AttemptError::Busy(retry_after(
            retry_after_header,
            MAX_COOL_DOWN,
        ))),
        500..=599 => Err(AttemptError::Failed(UpstreamErrorKind::ServerError)),
        _ => Err(AttemptError::Failed(UpstreamErrorKind::ClientError)),
    }
}

/// Reads a body up to `limit` bytes.
pub(crate) async fn read_capped(
    mut body: BodyStream,
    limit: usize,
) -> Result<Vec<u8>, UpstreamErrorKind> {
    let mut out = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|_| UpstreamErrorKind::Connect)?;
        if out.len() + chunk.len() > limit {
            return Err(UpstreamErrorKind::BadReply);
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// Adds the energy extension to an answer's `usage`, unless the upstream
/// measured its own.
pub(crate) fn add_energy(answer: &mut Map<String, Value>, joules: f64) {
    let usage = answer.entry("usage").or_insert_with(|| json!({}));
    let Some(usage) = usage.as_object_mut() else {
        return;
    };
    let measured = usage.get("energy_source").and_then(Value::as_str) == Some("measured")
        && usage.get("energy_joules").is_some_and(Value::is_number);
    if !measured {
        let rounded = (joules * 1e6).round() / 1e6;
        usage.insert("energy_joules".into(), json!(rounded));
        usage.insert("energy_source".into(), json!("estimated"));
    }
}

/// An upstream's 4xx, as the client may see it: an OpenAI-shaped error's
/// message (cut short, with the pool's key blanked out) and its `param` and
/// `code`; anything else becomes a generic message.
pub(crate) fn refusal(status: u16, body: &[u8], key: Option<&str>) -> ApiError {
    let kind = if status == 413 {
        ErrorKind::RequestTooLarge
    } else {
        ErrorKind::InvalidRequestError
    };
    let generic = ApiError::new(
        kind,
        format!("the upstream refused the request (HTTP {status})"),
    );
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return generic;
    };
    let Some(error) = value.get("error").filter(|e| e.is_object()) else {
        return generic;
    };
    let Some(message) = error.get("message").and_then(Value::as_str) else {
        return generic;
    };
    // Redact first, then cut: a key straddling the cut would survive the
    // other order. Every field is redacted.
    let redact = |text: &str| match key.filter(|k| k.len() >= 4) {
        Some(key) => text.replace(key, "[redacted]"),
        None => text.to_owned(),
    };
    let message: String = redact(message).chars().take(500).collect();
    let short = |field: &str| {
        error
            .get(field)
            .and_then(Value::as_str)
            .map(redact)
            .filter(|s| s.len() <= 64)
    };
    let mut api = ApiError::new(kind, message);
    api.param = short("param");
    api.code = short("code");
    api
}

/// The prompt's text, for prefix affinity and the token estimate: chat
/// messages' text in order, or the completion prompt.
fn prompt_text(body: &Map<String, Value>) -> String {
    let mut text = String::new();
    if let Some(messages) = body.get("messages").and_then(Value::as_array) {
        for m in messages {
            match m.get("content") {
                Some(Value::String(s)) => text.push_str(s),
                Some(Value::Array(parts)) => {
                    for p in parts {
                        if let Some(s) = p.get("text").and_then(Value::as_str) {
                            text.push_str(s);
                        }
                    }
                }
                _ => {}
            }
            text.push('\n');
        }
    }
    match body.get("prompt") {
        Some(Value::String(s)) => text.push_str(s),
        Some(Value::Array(items)) => {
            if let Some(s) = items.first().and_then(Value::as_str) {
                text.push_str(s);
            }
        }
        _ => {}
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_refusals_keep_the_message_but_not_the_key() {
        let body = br#"{"error":{"message":"bad key sk-secret-123 for model","type":"invalid_request_error","param":"temperature","code":null}}"#;
        let api = refusal(400, body, Some("sk-secret-123"));
        assert_eq!(api.message, "bad key [redacted] for model");
        assert_eq!(api.param.as_deref(), Some("temperature"));
        assert_eq!(api.status(), 400);
        let raw = refusal(400, b"Traceback (most recent call last): /srv/app.py", None);
        assert_eq!(raw.message, "the upstream refused the request (HTTP 400)");
        assert_eq!(refusal(413, b"{}", None).status(), 413);
        // A key straddling the 500-character cut, and keys in `param` and
        // `code`, are redacted too.
        let key = "sk-straddling-the-cut";
        for at in 480..500 {
            let message = format!("{}{key} tail", "x".repeat(at));
            let body =
                json!({"error": {"message": message, "param": key, "code": format!("c-{key}")}});
            let api = refusal(400, body.to_string().as_bytes(), Some(key));
            let shown = format!("{} {:?} {:?}", api.message, api.param, api.code);
            assert!(!shown.contains(&key[..8]), "{at}: {shown}");
        }
    }

    #[test]
    fn statuses_sort_into_retry_or_answer() {
        assert!(judge_status(200, None).is_ok());
        assert!(judge_status(400, None).is_ok());
        assert!(matches!(
            judge_status(503, None),
            Err(AttemptError::Failed(UpstreamErrorKind::ServerError))
        ));
        assert!(matches!(
            judge_status(429, Some("7")),
            Err(AttemptError::RateLimited(d)) if d == Duration::from_secs(7)
        ));
        assert!(matches!(
            judge_status(429, Some("100000")),
            Err(AttemptError::RateLimited(d)) if d == MAX_COOL_DOWN
        ));
        assert!(matches!(
            judge_status(401, None),
            Err(AttemptError::Failed(UpstreamErrorKind::ClientError))
        ));
    }

    #[test]
    fn measured_energy_is_kept_and_missing_energy_is_estimated() {
        let mut answer = json!({"usage": {"completion_tokens": 3}})
            .as_object()
            .unwrap()
            .clone();
        add_energy(&mut answer, 1.23456789);
        assert_eq!(answer["usage"]["energy_joules"], json!(1.234568));
        assert_eq!(answer["usage"]["energy_source"], json!("estimated"));
        let mut measured = json!({"usage": {"energy_joules": 9.0, "energy_source": "measured"}})
            .as_object()
            .unwrap()
            .clone();
        add_energy(&mut measured, 1.0);
        assert_eq!(measured["usage"]["energy_joules"], json!(9.0));
    }
}
