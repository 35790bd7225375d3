//! Who a request speaks for. With tenants defined, every request but
//! `/health` and `/metrics` carries `Authorization: Bearer nc-...`; the key
//! is checked against the tenancy store and the [`Principal`] it speaks
//! for travels with the request. A refusal is one 401 for every reason
//! (the reason, and the key's public id only, go to the log).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use neocloud_tenancy::store::now_secs;
use neocloud_tenancy::{Principal, Store};

use crate::error::ServerError;

/// Paths open without a key: probes and scrapes.
const OPEN_PATHS: &[&str] = &["/health", "/metrics"];

/// How requests are let in.
#[derive(Clone)]
pub enum Access {
    /// No key needed (no tenant defined, on loopback or when allowed).
    Anonymous,
    /// A valid key of a tenant in this store.
    Keys(Store),
}

/// The middleware: checks the key (when keys are on) and puts the
/// [`Principal`] in the request's extensions.
pub async fn check_key(
    State(access): State<Arc<Access>>,
    mut req: Request,
    next: Next,
) -> Response {
    let Access::Keys(store) = access.as_ref() else {
        return next.run(req).await;
    };
    if OPEN_PATHS.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .unwrap_or("");
    match store.authenticate(token, now_secs()).await {
        Ok(Ok(principal)) => {
            req.extensions_mut().insert(principal);
            next.run(req).await
        }
        Ok(Err(refusal)) => {
            let key_id = neocloud_tenancy::keys::PresentedKey::parse(token)
                .map(|k| k.public_id)
                .unwrap_or_default();
            tracing::info!(?refusal, key_id, "request refused: no valid API key");
            ServerError::Unauthorized.into_response()
        }
        Err(e) => {
            tracing::error!(error = %e, "the key store did not answer");
            ServerError::Unavailable("the key store is unavailable; retry shortly".into())
                .into_response()
        }
    }
}

/// The principal of a request, when keys are on.
pub fn principal_of(extensions: &axum::http::Extensions) -> Option<&Principal> {
    extensions.get::<Principal>()
}
