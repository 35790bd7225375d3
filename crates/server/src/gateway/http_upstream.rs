//! An upstream reached over HTTP: any OpenAI-compatible server. Redirects
//! are never followed (a redirect could point the gateway, and the pool's
//! key, anywhere), and the key goes only in the `Authorization` header.

use std::net::{IpAddr, ToSocketAddrs};
use std::time::Duration;

use neocloud_fleet::config::{host_port, is_forbidden_ip};
use neocloud_openai::ApiKey;

use super::upstream::{BoxFuture, Upstream, UpstreamFailure, UpstreamReply, UpstreamRequest};
use tokio_stream::StreamExt;

/// How long a connection may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a health check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// A remote OpenAI-compatible server.
#[derive(Debug, Clone)]
pub struct HttpUpstream {
    /// Base URL, ending in `/v1`.
    base_url: String,
    client: reqwest::Client,
    /// Key for the health check, when the pool has one.
    api_key: Option<ApiKey>,
}

impl HttpUpstream {
    /// The HTTP client all upstreams share (one connection pool, kept per
    /// host): redirects never followed, small writes sent at once.
    pub fn client() -> Result<reqwest::Client, reqwest::Error> {
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
    }

    /// An upstream at `base_url` (`http(s)://HOST[:PORT]/v1`), reached
    /// through `client` (see [`HttpUpstream::client`]).
    pub fn new(base_url: &str, api_key: Option<ApiKey>, client: reqwest::Client) -> Self {
        HttpUpstream {
            base_url: base_url.trim_end_matches('/').to_owned(),
            client,
            api_key,
        }
    }
}

/// Refuses a URL whose host name resolves, now, to a forbidden address
/// (link-local: where cloud metadata services live). A name that does not
/// resolve now may later, and is accepted.
pub fn check_resolved_host(url: &str) -> Result<(), String> {
    let Some((host, port)) = host_port(url) else {
        return Err(format!("upstream {url:?}: no host"));
    };
    if host.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    if let Ok(addrs) = (host.as_str(), port).to_socket_addrs() {
        for addr in addrs {
            if is_forbidden_ip(addr.ip()) {
                return Err(format!(
                    "upstream {url:?} resolves to {}, a link-local or unusable address (cloud metadata services live there); refused",
                    addr.ip()
                ));
            }
        }
    }
    Ok(())
}

/// The error's kind and no more: reqwest's messages carry the URL.
fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timeout".into()
    } else if e.is_connect() {
        "connection refused or unreachable".into()
    } else if e.is_body() || e.is_decode() {
        "body interrupted".into()
    } else {
        "request failed".into()
    }
}

impl Upstream for HttpUpstream {
    fn send(
        &self,
        request: UpstreamRequest,
    ) -> BoxFuture<'_, Result<UpstreamReply, UpstreamFailure>> {
        Box::pin(async move {
            let url = format!("{}/{}", self.base_url, request.endpoint.path());
            let mut builder = self
                .client
                .post(url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(request.body);
            if let Some(key) = &request.api_key {
                builder = builder.bearer_auth(key.expose());
            }
            let response = builder.send().await.map_err(|e| {
                // reqwest says `is_connect` when no connection was made
                // (refused, unreachable, DNS): nothing was sent.
                if e.is_connect() {
                    UpstreamFailure::Refused(describe(&e))
                } else {
                    UpstreamFailure::Connect(describe(&e))
                }
            })?;
            let status = response.status().as_u16();
            let retry_after = super::retry_after_header(response.headers());
            let body = response
                .bytes_stream()
                .map(|chunk| chunk.map_err(|e| UpstreamFailure::Body(describe(&e))));
            Ok(UpstreamReply {
                status,
                retry_after,
                body: Box::pin(body),
            })
        })
    }

    fn check(&self) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            let mut builder = self
                .client
                .get(format!("{}/models", self.base_url))
                .timeout(CHECK_TIMEOUT);
            if let Some(key) = &self.api_key {
                builder = builder.bearer_auth(key.expose());
            }
            matches!(builder.send().await, Ok(r) if r.status().is_success())
        })
    }
}
