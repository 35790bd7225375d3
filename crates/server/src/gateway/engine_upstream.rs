//! The in-process engine as an upstream: requests go through the engine's
//! own routes (validation, queueing, streaming) without a socket.

use std::time::Duration;

use super::upstream::{BoxFuture, Upstream, UpstreamFailure, UpstreamReply, UpstreamRequest};
use axum::body::Body;
use axum::http::{header, Method, Request};
use axum::Router;
use tokio_stream::StreamExt;
use tower::ServiceExt;

/// How long a health check waits for models still loading.
const CHECK_PATIENCE: Duration = Duration::from_secs(5);

/// The engine's routes, called in-process.
#[derive(Clone)]
pub struct EngineUpstream {
    routes: Router,
}

impl EngineUpstream {
    /// An upstream over these routes (see [`crate::engine_routes`]).
    pub fn new(routes: Router) -> Self {
        EngineUpstream { routes }
    }
}

impl Upstream for EngineUpstream {
    fn send(
        &self,
        request: UpstreamRequest,
    ) -> BoxFuture<'_, Result<UpstreamReply, UpstreamFailure>> {
        Box::pin(async move {
            let http = Request::builder()
                .method(Method::POST)
                .uri(format!("/v1/{}", request.endpoint.path()))
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(request.body))
                .map_err(|e| UpstreamFailure::Connect(e.to_string()))?;
            let response = self
                .routes
                .clone()
                .oneshot(http)
                .await
                .map_err(|e| UpstreamFailure::Connect(e.to_string()))?;
            let status = response.status().as_u16();
            let retry_after = super::retry_after_header(response.headers());
            let body = response
                .into_body()
                .into_data_stream()
                .map(|chunk| chunk.map_err(|e| UpstreamFailure::Body(e.to_string())));
            Ok(UpstreamReply {
                status,
                retry_after,
                body: Box::pin(body),
            })
        })
    }

    fn check(&self) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            // While the models load, /health says 503: wait a little for
            // the load rather than report a healthy engine as down.
            let deadline = tokio::time::Instant::now() + CHECK_PATIENCE;
            loop {
                let Ok(http) = Request::builder()
                    .method(Method::GET)
                    .uri("/health")
                    .body(Body::empty())
                else {
                    return false;
                };
                if matches!(self.routes.clone().oneshot(http).await, Ok(r) if r.status().is_success())
                {
                    return true;
                }
                if tokio::time::Instant::now() >= deadline {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    }
}
