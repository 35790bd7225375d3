//! An upstream reached over HTTP: any OpenAI-compatible server. Redirects
//! are never followed (a redirect could point the gateway, and the pool's
//! key, anywhere), and the key goes only in the `Authorization` header.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use neocloud_fleet::config::{host_port, is_forbidden_ip, UpstreamHost};
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
            .dns_resolver(Arc::new(GuardedResolver))
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

/// Resolves upstream names at every new connection and keeps only the
/// addresses an upstream may have: a name that resolved to a public
/// address at load and to a metadata address later (DNS rebinding) is not
/// connected to. Address literals never come here; they are checked when
/// the configuration is read.
#[derive(Debug, Clone, Copy)]
struct GuardedResolver;

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let found = tokio::net::lookup_host((host.as_str(), 0)).await?;
            let allowed = allowed_addresses(&host, found)?;
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The addresses of `host` an upstream may have; an error when none is
/// left.
fn allowed_addresses(
    host: &str,
    found: impl Iterator<Item = SocketAddr>,
) -> Result<Vec<SocketAddr>, String> {
    let (allowed, refused): (Vec<SocketAddr>, Vec<SocketAddr>) =
        found.partition(|a| !is_forbidden_ip(a.ip()));
    if allowed.is_empty() {
        return Err(match refused.first() {
            Some(a) => format!(
                "{host} resolves to {}, a link-local, metadata or unusable address; refused",
                a.ip()
            ),
            None => format!("{host} resolves to no address"),
        });
    }
    if let Some(a) = refused.first() {
        tracing::warn!(host, refused = %a.ip(), "an upstream name resolves to a forbidden address too; skipped");
    }
    Ok(allowed)
}

/// Refuses a URL whose host name resolves, now, to a forbidden address
/// (link-local: where cloud metadata services live). A name that does not
/// resolve now may later, and is accepted; every connection checks again.
pub fn check_resolved_host(url: &str) -> Result<(), String> {
    let Some((host, port)) = host_port(url) else {
        return Err(format!("upstream {url:?}: no host"));
    };
    let UpstreamHost::Name(host) = host else {
        return Ok(());
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A name that resolves to a metadata address, alone or beside a
    /// public one, is never connected to there.
    #[test]
    fn forbidden_addresses_are_dropped_at_connection() {
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        let err = allowed_addresses("rebound.example", [addr("169.254.169.254:0")].into_iter())
            .unwrap_err();
        assert!(err.contains("169.254.169.254"), "{err}");
        let mixed = [
            addr("169.254.169.254:0"),
            addr("[fd00:ec2::254]:0"),
            addr("10.0.0.7:0"),
        ];
        assert_eq!(
            allowed_addresses("mixed.example", mixed.into_iter()).unwrap(),
            vec![addr("10.0.0.7:0")]
        );
        assert!(allowed_addresses("none.example", std::iter::empty()).is_err());
    }

    /// The client resolves through the guard: `localhost` still works.
    #[tokio::test]
    async fn the_guarded_resolver_resolves_loopback_names() {
        use reqwest::dns::Resolve;
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        let addrs: Vec<SocketAddr> = GuardedResolver.resolve(name).await.unwrap().collect();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()) && !addrs.is_empty());
    }
}
