//! Which `Host` a request may name. A web page can make its own name
//! resolve to 127.0.0.1 (DNS rebinding) and so reach a server bound to
//! loopback from the user's browser, with its own name in `Host`. A server
//! bound to a loopback address therefore answers only requests addressed to
//! a loopback name (`localhost`, `127.0.0.1` and the rest of 127/8, `::1`),
//! plus the names it is told to take; one bound elsewhere takes any name
//! unless it is told which.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ServerError;

/// The names a server answers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRule {
    /// Loopback names are always taken; others only if listed.
    loopback_only: bool,
    /// Lower-case names taken besides loopback ones (any port).
    allowed: Vec<String>,
}

impl HostRule {
    /// The rule of a server listening on `listen`, told to take `allowed`
    /// names too (an empty list: the default).
    pub fn new(listen: SocketAddr, allowed: &[String]) -> Self {
        HostRule {
            loopback_only: listen.ip().is_loopback() || !allowed.is_empty(),
            allowed: allowed.iter().map(|h| h.to_ascii_lowercase()).collect(),
        }
    }

    /// Whether a request whose `Host` says `host` (or none) is answered.
    pub fn allows(&self, host: Option<&str>) -> bool {
        if !self.loopback_only {
            return true;
        }
        let Some(name) = host.and_then(host_name) else {
            return false;
        };
        is_loopback_name(&name) || self.allowed.contains(&name)
    }
}

/// The name of a `Host` value, lower case, without its port or IPv6
/// brackets; `None` when it is not a plausible host.
fn host_name(value: &str) -> Option<String> {
    let value = value.trim();
    let name = if let Some(v6) = value.strip_prefix('[') {
        v6.split_once(']').map(|(ip, _)| ip)?
    } else {
        match value.rsplit_once(':') {
            Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
            _ => value,
        }
    };
    (!name.is_empty()).then(|| name.to_ascii_lowercase())
}

fn is_loopback_name(name: &str) -> bool {
    name == "localhost"
        || name.ends_with(".localhost")
        || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The middleware: a request to a name the rule refuses gets 403.
pub async fn check_host(
    State(rule): State<Arc<HostRule>>,
    request: Request,
    next: Next,
) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| request.uri().authority().map(|a| a.as_str()));
    if rule.allows(host) {
        return next.run(request).await;
    }
    ServerError::HostNotAllowed.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loopback() -> HostRule {
        HostRule::new(SocketAddr::from(([127, 0, 0, 1], 8080)), &[])
    }

    #[test]
    fn loopback_servers_take_loopback_names_only() {
        let rule = loopback();
        for ok in [
            "localhost",
            "localhost:8080",
            "LOCALHOST",
            "app.localhost:1",
            "127.0.0.1:8080",
            "127.1.2.3",
            "[::1]:8080",
            "[::1]",
        ] {
            assert!(rule.allows(Some(ok)), "{ok}");
        }
        for bad in [
            "evil.example",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
            "169.254.169.254",
            "[fe80::1]",
            "",
            ":8080",
        ] {
            assert!(!rule.allows(Some(bad)), "{bad}");
        }
        assert!(!rule.allows(None));
    }

    #[test]
    fn listed_names_are_taken_and_other_binds_take_any_name() {
        let listed = HostRule::new(
            SocketAddr::from(([127, 0, 0, 1], 8080)),
            &["API.example.com".to_string()],
        );
        assert!(listed.allows(Some("api.example.com:443")));
        assert!(listed.allows(Some("localhost")));
        assert!(!listed.allows(Some("evil.example")));
        let open = HostRule::new(SocketAddr::from(([0, 0, 0, 0], 8080)), &[]);
        assert!(open.allows(Some("evil.example")));
        let open_listed = HostRule::new(
            SocketAddr::from(([0, 0, 0, 0], 8080)),
            &["api.example.com".to_string()],
        );
        assert!(!open_listed.allows(Some("evil.example")));
    }
}
