//! The server's life: open requests are counted until their response body
//! is finished; on SIGTERM/SIGINT the server drains: new requests get 503
//! while open ones (streams included) run on until they end or a deadline
//! passes. Every response is also counted by endpoint and status here.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body::{Frame, SizeHint};
use tokio::sync::Notify;

use crate::error::ServerError;
use crate::metrics::Metrics;
use crate::AppState;

/// What the body extractor and the lifecycle layer need of a handler's
/// state: the front's, or the in-process engine's (for `/tokenize`).
pub trait Front: Clone + Send + Sync + 'static {
    /// Largest request body in bytes.
    fn body_limit(&self) -> usize;
    /// Time allowed to send a body once its head is in.
    fn body_timeout(&self) -> std::time::Duration;
    /// Open requests and draining.
    fn lifecycle(&self) -> &Arc<Lifecycle>;
    /// Where responses are counted.
    fn metrics(&self) -> &Metrics;
}

impl Front for AppState {
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
        self.engine.metrics()
    }
}

/// Whether the server is draining, and how many requests are open.
#[derive(Debug, Default)]
pub struct Lifecycle {
    draining: AtomicBool,
    open: AtomicUsize,
    changed: Notify,
}

impl Lifecycle {
    /// Stops taking new requests.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    /// Whether new requests are refused.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Requests whose response has not finished.
    pub fn open_requests(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Waits until no request is open, or `deadline` passes.
    pub async fn drained(&self, deadline: Duration) {
        let wait = async {
            loop {
                let notified = self.changed.notified();
                if self.open_requests() == 0 {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(deadline, wait).await;
    }
}

/// Decrements the open count when the response body is dropped (sent in
/// full, or abandoned by a client that left).
struct OpenRequest(Arc<Lifecycle>);

impl Drop for OpenRequest {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
        self.0.changed.notify_waiters();
    }
}

/// A response body that holds its request open until it is dropped.
struct TrackedBody {
    inner: Body,
    _open: OpenRequest,
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Middleware: refuses requests while draining, keeps count of open ones,
/// and counts every response by endpoint and status.
pub async fn track_requests<S: Front>(
    State(state): State<S>,
    req: Request,
    next: Next,
) -> Response {
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let lifecycle = Arc::clone(state.lifecycle());
    let response = if lifecycle.is_draining() && endpoint != "/metrics" {
        ServerError::Unavailable("the server is shutting down".into()).into_response()
    } else {
        lifecycle.open.fetch_add(1, Ordering::SeqCst);
        let open = OpenRequest(Arc::clone(&lifecycle));
        let response = next.run(req).await;
        let (parts, inner) = response.into_parts();
        Response::from_parts(parts, Body::new(TrackedBody { inner, _open: open }))
    };
    state
        .metrics()
        .http_response(&endpoint, response.status().as_u16());
    response
}
