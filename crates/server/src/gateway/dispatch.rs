//! Forwarding one request: choose an upstream by the router's policy, adapt
//! the body to its conformance profile, send it, and judge the reply. A
//! failure before anything reached the client (no connection, a 5xx, a
//! 429, a stream that broke before its first event) is retried on another
//! upstream, then on the fallback pools, while the retry budget allows.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::response::Response;
use bytes::Bytes;
use neocloud_fleet::conformance;
use neocloud_fleet::metrics::UpstreamErrorKind;
use neocloud_fleet::policy::RequestSlo;
use neocloud_fleet::route::{self, judge_status, AttemptError, RouteEnd};
use neocloud_openai::{ApiError, ApiKey, ErrorKind};
use serde_json::{json, Map, Value};
use tokio_stream::StreamExt;

use super::relay::Relay;
use super::upstream::{BodyStream, Endpoint, UpstreamFailure, UpstreamRequest};
use super::{lock, Attempt, Connection, EngineUpstream, Gateway, InFlight};
use crate::error::ServerError;
use crate::usage::UsageMeter;

/// Largest non-streamed answer read from an upstream.
const MAX_ANSWER_BYTES: usize = 64 << 20;
/// Largest error body read from an upstream.
const MAX_ERROR_BYTES: usize = 64 << 10;
/// Output tokens assumed when a request names no limit.
const DEFAULT_OUTPUT_TOKENS: u64 = 256;
/// How long a retry may wait for a place in the retry budget before the
/// request gets its 503.
const RETRY_WAIT: Duration = Duration::from_secs(10);
/// How often a waiting retry looks for a place.
const RETRY_POLL: Duration = Duration::from_millis(20);

/// A request, checked enough to route.
pub struct Forward {
    /// Which endpoint.
    pub endpoint: Endpoint,
    /// The body, parsed.
    pub body: Map<String, Value>,
    /// The body as the client sent it (the in-process engine parses it
    /// into its typed request).
    pub bytes: Bytes,
    /// The model the client asked for.
    pub model: String,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// The SLO from `x-neocloud-slo`.
    pub slo: Option<RequestSlo>,
    /// The request's usage.
    pub meter: UsageMeter,
}

/// The answer, complete or as a stream.
pub enum Answer {
    /// A whole JSON body.
    Complete(Bytes),
    /// A stream an upstream has accepted.
    Stream(Box<Relay>),
    /// The in-process engine's own response, passed on as it is.
    Engine(Response),
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

/// One request's way through the fleet (the fleet crate's [`route::Route`])
/// with its place among the requests in flight.
pub(crate) struct Route {
    gw: Arc<Gateway>,
    f: Forward,
    route: route::Route,
    /// An upstream picked but not tried yet.
    pending: Option<usize>,
    in_flight: InFlight,
    output_tokens: u64,
    /// Whether the client asked for usage in its stream.
    pub wants_usage: bool,
}

impl Route {
    fn new(gw: &Arc<Gateway>, f: Forward) -> Result<Route, ServerError> {
        let prompt = prompt_text(&f.body);
        let route = route::Route::new(&lock(&gw.state), &f.model, &prompt, f.slo)
            .map_err(|_| ServerError::ModelNotFound(f.model.clone()))?;
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
            in_flight: InFlight::new(gw)?,
            f,
            route,
            pending: None,
            output_tokens,
            wants_usage,
        })
    }

    /// The next upstream to try, by the policy, primary pools first; `None`
    /// when none is left. A retry must fit the budget: it waits for a place
    /// among the retries in flight (so that retries never multiply load)
    /// for [`RETRY_WAIT`] at most, rather than lose the request at once.
    async fn pick(&mut self) -> Result<Option<usize>, ServerError> {
        let deadline = Instant::now() + RETRY_WAIT;
        let picked = loop {
            let picked = {
                let mut state = lock(&self.gw.state);
                let picked = self.route.pick(&mut state, Instant::now());
                self.in_flight.retries = self.route.retries();
                picked
            };
            match picked {
                Err(RouteEnd::BudgetExhausted) if Instant::now() < deadline => {
                    tokio::time::sleep(RETRY_POLL).await;
                }
                other => break other,
            }
        };
        match picked {
            Ok(Some(p)) => {
                if let Some(previous) = p.retry_of {
                    self.gw.metrics.upstreams[previous].retry();
                }
                if p.first_fallback {
                    self.gw.metrics.fallback();
                }
                Ok(Some(p.upstream))
            }
            Ok(None) => Ok(None),
            Err(_) => {
                tracing::warn!(model = %self.f.model, "retry budget exhausted");
                Err(self.exhausted())
            }
        }
    }

    /// Sends the request to upstreams in turn until one accepts it (2xx),
    /// refuses it for the client's own fault (a 4xx, passed on), or none is
    /// left (503, or 429 when all were rate limited).
    pub(crate) async fn open_next(&mut self) -> Result<Opened, ServerError> {
        loop {
            let id = match self.pending.take() {
                Some(id) => id,
                None => self.next_upstream().await?,
            };
            let gw = Arc::clone(&self.gw);
            let target = Target::of(&gw, id);
            let upstream = match &gw.connections[id] {
                Connection::Remote(upstream) => Arc::clone(upstream),
                Connection::Engine(engine) => {
                    // The engine as a fallback of a byte-level route: its
                    // answer is read like any upstream's.
                    let attempt = Attempt::begin(&gw, id, self.tokens());
                    let response = self.ask_engine(engine, &target).await?;
                    let body = response
                        .into_body()
                        .into_data_stream()
                        .map(|chunk| chunk.map_err(|e| UpstreamFailure::Body(e.to_string())));
                    return Ok(Opened {
                        attempt,
                        body: Box::pin(body),
                        pool: target.pool_name,
                        upstream: target.upstream_name,
                        dropped: Vec::new(),
                        rewrite_model: None,
                    });
                }
            };
            let pool_key = gw.pool_keys[target.pool].clone();
            let mut body = self.f.body.clone();
            body.insert("model".into(), Value::String(target.served_model.clone()));
            if self.f.stream {
                // Usage is always asked for, so that streamed answers are
                // metered; the client sees it only if it asked.
                let options = body.entry("stream_options").or_insert_with(|| json!({}));
                if let Some(o) = options.as_object_mut() {
                    o.insert("include_usage".into(), Value::Bool(true));
                }
            }
            let adapted =
                conformance::adapt(target.profile, Value::Object(body)).map_err(|param| {
                    ServerError::param(
                        param.clone(),
                        format!(
                            "`{param}` is not supported by the upstreams of pool {:?}, which serves this model",
                            target.pool_name
                        ),
                    )
                })?;
            let bytes = serde_json::to_vec(&adapted.body)
                .map_err(|e| ServerError::Internal(format!("re-encoding a request: {e}")))?;
            let attempt = Attempt::begin(&gw, id, self.tokens());
            let request = UpstreamRequest {
                endpoint: self.f.endpoint,
                body: Bytes::from(bytes),
                api_key: pool_key.clone(),
            };
            // A stream's headers come at once; a whole answer only at its end.
            let wait = if self.f.stream {
                gw.stall_timeout
            } else {
                gw.request_timeout
            };
            let reply = match tokio::time::timeout(wait, upstream.send(request)).await {
                Err(_) => Err(AttemptError::Failed(UpstreamErrorKind::Timeout)),
                Ok(Err(UpstreamFailure::Refused(_))) => Err(AttemptError::Refused),
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
                Err(AttemptError::Refused) => {
                    failed(&gw, id, UpstreamErrorKind::Connect);
                    self.route.failed_unsent();
                    continue;
                }
                Err(AttemptError::RateLimited(wait)) => {
                    gw.metrics.upstreams[id].error(UpstreamErrorKind::RateLimited);
                    lock(&gw.state).record_rate_limited(id, Instant::now(), wait);
                    self.route.rate_limited();
                    continue;
                }
                Err(AttemptError::Busy(wait)) => {
                    gw.metrics.upstreams[id].error(UpstreamErrorKind::ServerError);
                    lock(&gw.state).record_rate_limited(id, Instant::now(), wait);
                    self.route.failed();
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
                lock(&gw.state).record_success(id);
                return Err(ServerError::Upstream(refusal(
                    reply.status,
                    &body,
                    pool_key.as_ref().map(ApiKey::expose),
                )));
            }
            target.meter(&self.f.meter);
            return Ok(Opened {
                attempt,
                body: reply.body,
                dropped: adapted.dropped,
                rewrite_model: (target.served_model != self.f.model).then(|| self.f.model.clone()),
                pool: target.pool_name,
                upstream: target.upstream_name,
            });
        }
    }

    /// The next upstream by the policy, or why there is none.
    async fn next_upstream(&mut self) -> Result<usize, ServerError> {
        match self.pick().await? {
            Some(id) => Ok(id),
            None => {
                self.gw.metrics.unserved();
                Err(self.exhausted())
            }
        }
    }

    /// Tokens an attempt is counted for in its upstream's load.
    fn tokens(&self) -> u64 {
        self.route.prompt_tokens() as u64 + self.output_tokens
    }

    /// Picks the first upstream; when it is the in-process engine, the
    /// request is answered there, with the client's bytes parsed into the
    /// engine's typed request and the engine's response passed on as it
    /// is. Otherwise the pick waits for [`Route::open_next`].
    async fn answer_in_process(&mut self) -> Result<Option<Dispatched>, ServerError> {
        let id = self.next_upstream().await?;
        let gw = Arc::clone(&self.gw);
        let Connection::Engine(engine) = &gw.connections[id] else {
            self.pending = Some(id);
            return Ok(None);
        };
        let target = Target::of(&gw, id);
        self.f
            .meter
            .attach_attempt(Attempt::begin(&gw, id, self.tokens()));
        let response = self.ask_engine(engine, &target).await?;
        Ok(Some(Dispatched {
            pool: target.pool_name,
            upstream: target.upstream_name,
            dropped: Vec::new(),
            answer: Answer::Engine(response),
        }))
    }

    /// The in-process engine's answer to the request, metered as served by
    /// `target`.
    async fn ask_engine(
        &self,
        engine: &EngineUpstream,
        target: &Target,
    ) -> Result<Response, ServerError> {
        target.meter(&self.f.meter);
        engine
            .answer(
                self.f.endpoint,
                &target.served_model,
                &self.f.bytes,
                self.f.meter.clone(),
            )
            .await
    }

    /// The gateway.
    pub(crate) fn gateway(&self) -> &Gateway {
        &self.gw
    }

    /// The request's usage.
    pub(crate) fn meter(&self) -> &UsageMeter {
        &self.f.meter
    }

    /// How long a stream may stay silent.
    pub(crate) fn stall_timeout(&self) -> Duration {
        self.gw.stall_timeout
    }

    /// An accepted attempt failed before anything reached the client.
    pub(crate) fn failed(&mut self, id: usize, kind: UpstreamErrorKind) {
        failed(&self.gw, id, kind);
        self.route.failed();
    }

    /// The error when no attempt succeeded.
    fn exhausted(&self) -> ServerError {
        match self.route.end(&lock(&self.gw.state), Instant::now()) {
            RouteEnd::RateLimited { retry_after_secs } => ServerError::RateLimited {
                message: "every upstream serving this model is rate limited; retry later".into(),
                retry_after_secs,
            },
            _ => ServerError::Unavailable(
                "no upstream serving this model could answer; retry later".into(),
            ),
        }
    }
}

/// Where one picked upstream is, as the route and the meter name it.
struct Target {
    served_model: String,
    profile: neocloud_fleet::config::Profile,
    pool_name: String,
    upstream_name: String,
    accelerator: String,
    pool: usize,
}

impl Target {
    fn of(gw: &Gateway, id: usize) -> Target {
        let state = lock(&gw.state);
        let u = &state.upstreams[id];
        let pool = &state.pools[u.pool].config;
        Target {
            served_model: u.served_model.clone(),
            profile: pool.profile(),
            pool_name: pool.name.clone(),
            upstream_name: u.name.clone(),
            accelerator: pool.accelerator.clone(),
            pool: u.pool,
        }
    }

    /// Names it in the request's usage.
    fn meter(&self, meter: &UsageMeter) {
        meter.served_by(&self.pool_name, &self.upstream_name, &self.accelerator);
    }
}

/// Sends `f` where the policy says, retrying and falling back as allowed.
pub async fn forward(gw: &Arc<Gateway>, f: Forward) -> Result<Dispatched, ServerError> {
    let stream = f.stream;
    let mut route = Route::new(gw, f)?;
    if let Some(dispatched) = route.answer_in_process().await? {
        return Ok(dispatched);
    }
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
            let meter = route.meter().clone();
            match complete(gw, opened, &meter).await {
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
    gw.metrics.upstreams[id].error(kind);
    let (ejected, name) = {
        let mut state = lock(&gw.state);
        let ejected = state.record_failure(id, Instant::now());
        (ejected, state.upstreams[id].name.clone())
    };
    if ejected {
        gw.metrics.upstreams[id].ejection();
        tracing::warn!(upstream = %name, "upstream ejected after consecutive failures");
    } else {
        tracing::debug!(upstream = %name, kind = kind.label(), "upstream attempt failed");
    }
}

/// A successful attempt's upstream is in good health.
pub(crate) fn succeeded(gw: &Gateway, id: usize) {
    lock(&gw.state).record_success(id);
}

/// Reads an accepted non-streamed answer and adds its energy.
async fn complete(
    gw: &Arc<Gateway>,
    opened: Opened,
    meter: &UsageMeter,
) -> Result<Bytes, UpstreamErrorKind> {
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
    meter_answer(meter, &answer);
    if let Some(model) = rewrite_model {
        answer.insert("model".into(), Value::String(model));
    }
    succeeded(gw, attempt.upstream);
    serde_json::to_vec(&answer)
        .map(Bytes::from)
        .map_err(|_| UpstreamErrorKind::BadReply)
}

/// Puts what an upstream's answer (or last stream chunk) says of usage
/// into the request's meter: token counts, energy, and the first choice's
/// finish reason.
pub(crate) fn meter_answer(meter: &UsageMeter, answer: &Map<String, Value>) {
    if let Some(usage) = answer.get("usage").and_then(Value::as_object) {
        let count = |v: Option<&Value>| v.and_then(Value::as_u64).unwrap_or(0);
        let cached = usage
            .get("prompt_tokens_details")
            .and_then(|d| d.get("cached_tokens"));
        meter.tokens(
            count(usage.get("prompt_tokens")),
            count(usage.get("completion_tokens")),
            count(cached),
        );
        if let Some(joules) = usage.get("energy_joules").and_then(Value::as_f64) {
            let source = usage
                .get("energy_source")
                .and_then(Value::as_str)
                .unwrap_or("estimated");
            meter.set_energy(joules, source);
        }
    }
    let finish = answer
        .get("choices")
        .and_then(Value::as_array)
        .and_then(|c| c.first())
        .and_then(|c| c.get("finish_reason"))
        .and_then(Value::as_str);
    if let Some(reason) = finish {
        meter.finish_reason(reason);
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
