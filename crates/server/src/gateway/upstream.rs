//! The `Upstream` trait: one server that answers OpenAI-style completion
//! requests, whether a remote HTTP endpoint or the in-process engine. The
//! trait only moves bytes; the gateway decides what a reply means.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use futures_core::Stream;
use neocloud_openai::ApiKey;

/// A boxed future, as the trait's methods return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A reply body arriving in pieces.
pub type BodyStream = Pin<Box<dyn Stream<Item = Result<Bytes, UpstreamFailure>> + Send>>;

/// The OpenAI endpoints the gateway forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`.
    ChatCompletions,
    /// `POST /v1/completions`.
    Completions,
}

impl Endpoint {
    /// The path below the upstream's `/v1`.
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat/completions",
            Endpoint::Completions => "completions",
        }
    }
}

/// One request as sent to an upstream.
#[derive(Clone)]
pub struct UpstreamRequest {
    /// Which endpoint.
    pub endpoint: Endpoint,
    /// The JSON body, already adapted to the upstream.
    pub body: Bytes,
    /// Bearer token for the upstream, if its pool has one.
    pub api_key: Option<ApiKey>,
}

impl fmt::Debug for UpstreamRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key never reaches a log.
        f.debug_struct("UpstreamRequest")
            .field("endpoint", &self.endpoint)
            .field("body_bytes", &self.body.len())
            .field("api_key", &self.api_key)
            .finish()
    }
}

/// An upstream's answer: its status, the headers the gateway reads, and
/// the body as it arrives.
pub struct UpstreamReply {
    /// HTTP status.
    pub status: u16,
    /// `Retry-After`, when present.
    pub retry_after: Option<String>,
    /// The body.
    pub body: BodyStream,
}

/// Why an upstream gave no usable answer. The texts are for logs; clients
/// get a generic message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// The connection was refused: nothing was sent.
    Refused(String),
    /// The connection broke before the headers (the request may have
    /// reached the upstream).
    Connect(String),
    /// The body broke off.
    Body(String),
    /// No byte within the allowed time.
    Timeout,
}

impl fmt::Display for UpstreamFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpstreamFailure::Refused(m) => write!(f, "connection refused: {m}"),
            UpstreamFailure::Connect(m) => write!(f, "connection failed: {m}"),
            UpstreamFailure::Body(m) => write!(f, "reply broke off: {m}"),
            UpstreamFailure::Timeout => f.write_str("timed out"),
        }
    }
}

/// A server that answers completion requests.
pub trait Upstream: Send + Sync {
    /// Sends one request; resolves when the reply's status is known.
    fn send(
        &self,
        request: UpstreamRequest,
    ) -> BoxFuture<'_, Result<UpstreamReply, UpstreamFailure>>;

    /// An active health check: whether it answers at all.
    fn check(&self) -> BoxFuture<'_, bool>;
}
