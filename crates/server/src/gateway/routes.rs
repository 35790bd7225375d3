//! The one HTTP front, for a plain serve and a fleet alike: each
//! completion forwarded through [`super::dispatch`]. Every answer names its
//! pool and upstream in `x-neocloud-pool` and `x-neocloud-upstream`, and the
//! parameters dropped for the upstream in `x-neocloud-dropped-params`.

use std::sync::Arc;

use super::upstream::Endpoint;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Extension;
use axum::{Json, Router};
use neocloud_fleet::conformance::DROPPED_PARAMS_HEADER;
use neocloud_fleet::policy::RequestSlo;
use neocloud_openai::models::{Model, ModelList};
use neocloud_tenancy::Principal;
use serde_json::Value;
use tower_http::catch_panic::CatchPanicLayer;

use super::dispatch::{forward, Answer, Forward};
use super::Gateway;
use crate::error::ServerError;
use crate::json_body::JsonRequest;
use crate::lifecycle::{self, Front, Lifecycle};
use crate::metrics::Metrics;
use crate::usage::{UsageMeter, UsageSink};

/// The header that carries a request's latency objective.
pub const SLO_HEADER: &str = "x-neocloud-slo";
/// The header naming the pool that served a request.
pub const POOL_HEADER: &str = "x-neocloud-pool";
/// The header naming the upstream that served a request.
pub const UPSTREAM_HEADER: &str = "x-neocloud-upstream";
/// The header that carries a request's id (the usage record's).
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Fields that would make a proxy call somewhere else; never followed.
const REDIRECTING_FIELDS: &[&str] = &["api_base", "base_url", "api_key", "api_version"];

/// Shared state of the gateway's handlers.
#[derive(Clone)]
pub struct GatewayState {
    /// Pools, upstreams and their state.
    pub gateway: Arc<Gateway>,
    /// Largest request body.
    pub body_limit: usize,
    /// Time allowed to send a body.
    pub body_timeout: std::time::Duration,
    /// Open requests and draining.
    pub lifecycle: Arc<Lifecycle>,
    /// HTTP counters, and the in-process engine's gauges when it runs.
    pub metrics: Arc<Metrics>,
    /// Unix seconds at start-up.
    pub started_at: u64,
    /// The in-process engine, when a pool names it.
    pub engine: Option<crate::EngineHandle>,
    /// Where each finished request's usage record goes.
    pub usage: Arc<dyn UsageSink>,
    /// The lowest `priority` a request may ask for: lower ones would
    /// overtake (and preempt) everyone else's.
    pub min_priority: i64,
}

impl Front for GatewayState {
    fn body_limit(&self) -> usize {
        self.body_limit
    }

    fn body_timeout(&self) -> std::time::Duration {
        self.body_timeout
    }

    fn lifecycle(&self) -> &Arc<Lifecycle> {
        &self.lifecycle
    }

    fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

/// The one front, for every mode: the fleet's routes, and `/tokenize` and
/// `/detokenize` of the in-process engine (`engine`) when it runs, behind
/// the lifecycle and panic layers.
pub fn router(state: GatewayState, engine: Option<crate::AppState>) -> Router {
    let mut routes = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(list_models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(state.clone());
    if let Some(engine) = engine {
        routes = routes.merge(crate::routes::tokenize::routes(engine));
    }
    routes
        .fallback(crate::no_route)
        .layer(CatchPanicLayer::custom(crate::panic_response))
        .layer(axum::middleware::from_fn_with_state(
            state,
            lifecycle::track_requests::<GatewayState>,
        ))
}

async fn chat_completions(
    State(state): State<GatewayState>,
    principal: Option<Extension<Principal>>,
    headers: HeaderMap,
    body: JsonRequest,
) -> Response {
    let principal = principal.map(|Extension(p)| p);
    relay(state, Endpoint::ChatCompletions, principal, &headers, body).await
}

async fn completions(
    State(state): State<GatewayState>,
    principal: Option<Extension<Principal>>,
    headers: HeaderMap,
    body: JsonRequest,
) -> Response {
    let principal = principal.map(|Extension(p)| p);
    relay(state, Endpoint::Completions, principal, &headers, body).await
}

/// Forwards a completion request with its usage meter: the record goes out
/// once the answer ends, with the answer's status. Every answer carries
/// the request's id in `x-request-id`.
async fn relay(
    state: GatewayState,
    endpoint: Endpoint,
    principal: Option<Principal>,
    headers: &HeaderMap,
    body: JsonRequest,
) -> Response {
    // A UUIDv7: unique across replicas and restarts, and ordered by time
    // (the ledger's key).
    let request_id = uuid::Uuid::now_v7().to_string();
    let model = body
        .value
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let meter = UsageMeter::new(Arc::clone(&state.usage), request_id.clone(), model.clone());
    if let Some(p) = &principal {
        meter.principal(&p.tenant, &p.key_id);
    }
    let allowed = principal.as_ref().is_none_or(|p| p.may_use(&model));
    let routed = if allowed {
        route(state, endpoint, headers, body, meter.clone()).await
    } else {
        // Another tenant's model is as unknown as one that does not exist.
        Err(ServerError::ModelNotFound(model))
    };
    let mut response = match routed {
        Ok(response) => response,
        Err(error) => error.into_response(),
    };
    meter.status(response.status().as_u16());
    drop(meter);
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    response
}

/// Checks what routing needs, forwards, and shapes the response.
async fn route(
    state: GatewayState,
    endpoint: Endpoint,
    headers: &HeaderMap,
    body: JsonRequest,
    meter: UsageMeter,
) -> Result<Response, ServerError> {
    let JsonRequest { value: body, bytes } = body;
    let Value::Object(body) = body else {
        return Err(ServerError::InvalidBody(
            "the request body must be a JSON object".into(),
        ));
    };
    if let Some(field) = REDIRECTING_FIELDS.iter().find(|f| body.contains_key(**f)) {
        return Err(ServerError::param(
            *field,
            format!("`{field}` is not accepted: the gateway chooses where requests go"),
        ));
    }
    let model = match body.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        Some(_) => return Err(ServerError::param("model", "`model` must be a string")),
        None => return Err(ServerError::param("model", "`model` is required")),
    };
    if let Some(priority) = body.get("priority").and_then(Value::as_i64) {
        if priority < state.min_priority {
            return Err(ServerError::param(
                "priority",
                format!(
                    "priority {priority} is below {}, the lowest this server takes (lower is served first, and would preempt other requests)",
                    state.min_priority
                ),
            ));
        }
    }
    let stream = match body.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ServerError::param("stream", "`stream` must be a boolean")),
    };
    let slo = match headers.get(SLO_HEADER) {
        None => None,
        Some(v) => {
            let text = v.to_str().map_err(|_| {
                ServerError::InvalidBody(format!("the {SLO_HEADER} header is not text"))
            })?;
            Some(
                RequestSlo::parse_header(text)
                    .map_err(|e| ServerError::InvalidBody(e.to_string()))?,
            )
        }
    };
    let dispatched = forward(
        &state.gateway,
        Forward {
            endpoint,
            body,
            bytes,
            model,
            stream,
            slo,
            meter,
        },
    )
    .await?;
    let mut response = match dispatched.answer {
        Answer::Engine(response) => response,
        Answer::Complete(bytes) => (
            [(header::CONTENT_TYPE, "application/json")],
            axum::body::Body::from(bytes),
        )
            .into_response(),
        Answer::Stream(relay) => (
            [
                (header::CONTENT_TYPE, "text/event-stream"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            relay.into_body(),
        )
            .into_response(),
    };
    let out = response.headers_mut();
    for (name, value) in [
        (POOL_HEADER, dispatched.pool),
        (UPSTREAM_HEADER, dispatched.upstream),
        (DROPPED_PARAMS_HEADER, dispatched.dropped.join(",")),
    ] {
        if value.is_empty() {
            continue;
        }
        if let Ok(v) = HeaderValue::from_str(&value) {
            out.insert(name, v);
        }
    }
    Ok(response)
}

async fn list_models(
    State(state): State<GatewayState>,
    principal: Option<Extension<Principal>>,
) -> Json<ModelList> {
    Json(ModelList {
        object: "list".into(),
        data: state
            .gateway
            .models()
            .into_iter()
            .filter(|id| principal.as_ref().is_none_or(|Extension(p)| p.may_use(id)))
            .map(|id| Model {
                id,
                object: "model".into(),
                created: state.started_at,
                owned_by: "neocloud".into(),
            })
            .collect(),
    })
}

/// Ready once the in-process engine (if any) has loaded its models.
async fn health(State(state): State<GatewayState>) -> Response {
    match state.engine.as_ref().map(|e| e.models()) {
        Some(Err(e)) => e.into_response(),
        _ => Json(serde_json::json!({"status": "ok"})).into_response(),
    }
}

async fn metrics(State(state): State<GatewayState>) -> Response {
    let mut text = state.metrics.render();
    text.push_str(&state.gateway.metrics().render());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
