//! `fleet.toml`: pools of upstreams serving a model, and the router's
//! policy. Unknown keys are errors, and so are upstream URLs whose host is
//! a link-local (cloud metadata) address. Parsing never touches the
//! network: names are resolved and checked by the server that connects.

use std::collections::BTreeSet;
use std::net::IpAddr;

use serde::Deserialize;

use crate::error::FleetError;
use crate::policy::RequestSlo;

/// The whole file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// The pools.
    #[serde(rename = "pool", default)]
    pub pools: Vec<PoolConfig>,
    /// How requests are routed.
    #[serde(default)]
    pub router: RouterConfig,
}

/// One pool: upstreams that serve one model on one kind of accelerator.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Unique name.
    pub name: String,
    /// The model name clients ask for.
    pub model: String,
    /// Accelerator id in `accelerators.toml`, or `cpu`.
    pub accelerator: String,
    /// Accelerators behind the pool.
    #[serde(default = "one")]
    pub count: u32,
    /// Power of the pool at full load, overriding the profile's.
    #[serde(default)]
    pub watts: Option<f64>,
    /// Price per hour, any currency.
    #[serde(default)]
    pub price_per_hour: Option<f64>,
    /// `http(s)://.../v1` servers or `engine:MODEL` for the in-process engine.
    pub upstreams: Vec<String>,
    /// The model name the upstreams expect (default: `model`).
    #[serde(default)]
    pub served_model: Option<String>,
    /// Environment variable holding the upstreams' API key.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// What the upstreams accept (default: `neocloud` when every upstream
    /// is the in-process engine, else `openai`); see [`PoolConfig::profile`].
    #[serde(default, rename = "profile")]
    pub profile_name: Option<Profile>,
    /// Pool to try when this one cannot serve.
    #[serde(default)]
    pub fallback: Option<String>,
    /// Sequences each upstream runs at once before requests queue (default 8).
    #[serde(default)]
    pub slots: Option<u32>,
    /// The SLO of requests that send no `x-neocloud-slo` header, in the
    /// header's syntax (`ttft=500ms,tpot=50ms`).
    #[serde(default)]
    pub slo: Option<String>,
    /// Send the pool's key over plain `http://` to a host that is not
    /// loopback (refused unless set: anyone on the path would read it).
    #[serde(default)]
    pub allow_key_over_http: bool,
}

fn one() -> u32 {
    1
}

impl PoolConfig {
    /// The conformance profile: as configured, else `neocloud` for a pool
    /// of in-process engines, else `openai`.
    pub fn profile(&self) -> Profile {
        match self.profile_name {
            Some(p) => p,
            None if self.upstreams.iter().all(|u| u.starts_with("engine:")) => Profile::Neocloud,
            None => Profile::Openai,
        }
    }
}

/// The router's settings.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouterConfig {
    /// The policy.
    #[serde(default)]
    pub policy: Policy,
    /// A stream that sends nothing for this long is ended with an error
    /// event (and, before its first token, retried elsewhere).
    #[serde(default = "default_stall_timeout")]
    pub stall_timeout_secs: f64,
    /// Longest wait for a whole non-streamed answer.
    #[serde(default = "default_request_timeout")]
    pub request_timeout_secs: f64,
    /// Interval of the active health checks.
    #[serde(default = "default_health_check_interval")]
    pub health_check_interval_secs: f64,
    /// An accelerator catalogue (`accelerators.toml`) in place of the one
    /// built in, for the power of pools that name no `watts`.
    #[serde(default)]
    pub accelerators_file: Option<String>,
    /// Requests forwarded at once; beyond, 503 at once rather than a pile
    /// of connections.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            policy: Policy::default(),
            stall_timeout_secs: default_stall_timeout(),
            request_timeout_secs: default_request_timeout(),
            health_check_interval_secs: default_health_check_interval(),
            accelerators_file: None,
            max_in_flight: default_max_in_flight(),
        }
    }
}

fn default_max_in_flight() -> usize {
    4096
}

fn default_stall_timeout() -> f64 {
    30.0
}

fn default_request_timeout() -> f64 {
    600.0
}

fn default_health_check_interval() -> f64 {
    5.0
}

/// How an upstream is chosen.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// In turn.
    RoundRobin,
    /// Fewest outstanding tokens.
    #[default]
    LeastLoad,
    /// Consistent hashing on the prompt prefix, with bounded load.
    PrefixAffinity,
    /// Most headroom under the request's SLO.
    Slo,
    /// Fewest joules per token among those meeting the SLO.
    Energy,
    /// Cheapest per token among those meeting the SLO.
    Cost,
}

/// Conformance profile: which parameters an upstream accepts.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// OpenAI's API.
    #[default]
    Openai,
    /// vLLM.
    Vllm,
    /// llama.cpp's server.
    Llamacpp,
    /// FuriosaAI's Furiosa-LLM.
    Furiosa,
    /// Rebellions' vllm-rbln.
    Rbln,
    /// Groq's API.
    Groq,
    /// Cerebras' API.
    Cerebras,
    /// SambaNova's API.
    Sambanova,
    /// neocloud itself.
    Neocloud,
}

/// Where an upstream is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamAddress {
    /// An OpenAI-compatible server (base URL ending in `/v1`).
    Http(String),
    /// The in-process engine, serving this model.
    Engine(String),
}

impl UpstreamAddress {
    /// Parses `engine:MODEL` or an `http(s)://` URL.
    pub fn parse(text: &str) -> Result<Self, FleetError> {
        if let Some(model) = text.strip_prefix("engine:") {
            if model.is_empty() {
                return Err(FleetError::Config("`engine:` needs a model name".into()));
            }
            return Ok(UpstreamAddress::Engine(model.to_owned()));
        }
        if !(text.starts_with("http://") || text.starts_with("https://")) {
            return Err(FleetError::Config(format!(
                "upstream {text:?}: expected http(s)://HOST[:PORT]/v1 or engine:MODEL"
            )));
        }
        Ok(UpstreamAddress::Http(text.trim_end_matches('/').to_owned()))
    }
}

/// Addresses of cloud metadata and platform services outside the
/// link-local ranges: Alibaba Cloud's, Oracle Cloud's second, Azure's
/// WireServer, AWS's IPv6 instance metadata service.
const METADATA_ADDRESSES: [IpAddr; 4] = [
    IpAddr::V4(std::net::Ipv4Addr::new(100, 100, 100, 200)),
    IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 0, 192)),
    IpAddr::V4(std::net::Ipv4Addr::new(168, 63, 129, 16)),
    IpAddr::V6(std::net::Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)),
];

/// Host names of cloud metadata services (a trailing dot is ignored).
const METADATA_NAMES: [&str; 7] = [
    "metadata",
    "metadata.google.internal",
    "metadata.goog",
    "metadata.azure.internal",
    "instance-data",
    "instance-data.ec2.internal",
    "metadata.tencentyun.com",
];

/// Whether `ip` is never a legitimate upstream: link-local (where most
/// cloud metadata services live), a metadata service elsewhere
/// ([`METADATA_ADDRESSES`]), unspecified or broadcast, in any IPv6 form
/// that carries an IPv4 address (mapped, compatible, NAT64).
pub fn is_forbidden_ip(ip: IpAddr) -> bool {
    if METADATA_ADDRESSES.contains(&ip) {
        return true;
    }
    match ip {
        IpAddr::V4(v4) => {
            v4.is_link_local() || v4.is_unspecified() || v4.is_broadcast() || v4.octets()[0] == 0
        }
        IpAddr::V6(v6) => {
            if v6.is_loopback() {
                return false;
            }
            let s = v6.segments();
            let embedded = v6
                .to_ipv4_mapped()
                .or_else(|| v6.to_ipv4().filter(|_| s[..6] == [0; 6]))
                .or_else(|| {
                    // NAT64 (64:ff9b::/96) carries an IPv4 address too.
                    (s[..6] == [0x64, 0xff9b, 0, 0, 0, 0]).then(|| {
                        let [a, b] = s[6].to_be_bytes();
                        let [c, d] = s[7].to_be_bytes();
                        std::net::Ipv4Addr::new(a, b, c, d)
                    })
                });
            (s[0] & 0xffc0) == 0xfe80
                || v6.is_unspecified()
                || embedded.is_some_and(|v4| is_forbidden_ip(IpAddr::V4(v4)))
        }
    }
}

/// Whether `ip` is a loopback address (in any IPv6 form of 127.0.0.0/8).
pub fn is_loopback_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// An upstream URL's host, as the URL parser that reqwest uses reads it
/// (so that what is checked is what is connected to: `169.254.169.254.`,
/// `0xa9fea9fe` and `2852039166` are all the same address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamHost {
    /// An address literal.
    Ip(IpAddr),
    /// A name, lower-cased, without a trailing dot.
    Name(String),
}

/// Host and port of an `http(s)://` URL, parsed by the `url` crate.
pub fn host_port(url: &str) -> Option<(UpstreamHost, u16)> {
    let parsed = url::Url::parse(url).ok()?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return None;
    }
    let port = parsed.port_or_known_default()?;
    let host = match parsed.host()? {
        url::Host::Ipv4(v4) => UpstreamHost::Ip(IpAddr::V4(v4)),
        url::Host::Ipv6(v6) => UpstreamHost::Ip(IpAddr::V6(v6)),
        url::Host::Domain(name) => {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            if name.is_empty() {
                return None;
            }
            UpstreamHost::Name(name)
        }
    };
    Some((host, port))
}

/// Refuses URLs whose host is a forbidden address or a metadata service's
/// name. What a name resolves to is checked where it is resolved, at every
/// connection.
pub fn check_upstream_url(url: &str) -> Result<(), FleetError> {
    let (host, _port) =
        host_port(url).ok_or_else(|| FleetError::Config(format!("upstream {url:?}: no host")))?;
    match host {
        UpstreamHost::Ip(ip) if is_forbidden_ip(ip) => Err(FleetError::Config(format!(
            "upstream {url:?} is {ip}, a link-local, metadata or unusable address (cloud metadata services live there); refused"
        ))),
        UpstreamHost::Name(name) if METADATA_NAMES.contains(&name.as_str()) => Err(
            FleetError::Config(format!("upstream {url:?} names a cloud metadata service; refused")),
        ),
        _ => Ok(()),
    }
}

/// Whether `url` reaches a loopback host (an address, or `localhost`).
pub fn is_loopback_url(url: &str) -> bool {
    match host_port(url) {
        Some((UpstreamHost::Ip(ip), _)) => is_loopback_ip(ip),
        Some((UpstreamHost::Name(name), _)) => name == "localhost" || name.ends_with(".localhost"),
        None => false,
    }
}

impl FleetConfig {
    /// The fleet of a plain `serve`: one pool per model of the in-process
    /// engine, named after the model, on `cores` CPU cores.
    pub fn in_process(models: &[String], cores: u32) -> Self {
        FleetConfig {
            pools: models
                .iter()
                .map(|model| PoolConfig {
                    name: model.clone(),
                    model: model.clone(),
                    accelerator: "cpu".into(),
                    count: cores.max(1),
                    watts: None,
                    price_per_hour: None,
                    upstreams: vec![format!("engine:{model}")],
                    served_model: None,
                    api_key_env: None,
                    profile_name: None,
                    fallback: None,
                    slots: None,
                    slo: None,
                    allow_key_over_http: false,
                })
                .collect(),
            router: RouterConfig::default(),
        }
    }

    /// Parses and checks a configuration.
    pub fn parse(text: &str) -> Result<Self, FleetError> {
        let config: FleetConfig =
            toml::from_str(text).map_err(|e| FleetError::Config(e.to_string()))?;
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<(), FleetError> {
        let router = &self.router;
        for (name, value) in [
            ("stall_timeout_secs", router.stall_timeout_secs),
            ("request_timeout_secs", router.request_timeout_secs),
            (
                "health_check_interval_secs",
                router.health_check_interval_secs,
            ),
        ] {
            if !(value.is_finite() && value > 0.0 && value <= 86_400.0) {
                return Err(FleetError::Config(format!(
                    "[router] {name} must be a positive number of seconds (at most a day)"
                )));
            }
        }
        if router.max_in_flight == 0 {
            return Err(FleetError::Config(
                "[router] max_in_flight must be at least 1".into(),
            ));
        }
        if self.pools.is_empty() {
            return Err(FleetError::Config("no [[pool]]".into()));
        }
        let mut names = BTreeSet::new();
        for pool in &self.pools {
            if !names.insert(pool.name.as_str()) {
                return Err(FleetError::Config(format!(
                    "two pools are named {:?}",
                    pool.name
                )));
            }
        }
        for pool in &self.pools {
            let at = |m: String| FleetError::Config(format!("pool {:?}: {m}", pool.name));
            if pool.upstreams.is_empty() {
                return Err(at("no upstreams".into()));
            }
            if pool.count == 0 {
                return Err(at("count must be at least 1".into()));
            }
            if pool.slots == Some(0) {
                return Err(at("slots must be at least 1".into()));
            }
            if let Some(slo) = &pool.slo {
                RequestSlo::parse_header(slo).map_err(|e| at(e.to_string()))?;
            }
            if pool.watts.is_some_and(|w| !(w.is_finite() && w >= 0.0))
                || pool
                    .price_per_hour
                    .is_some_and(|p| !(p.is_finite() && p >= 0.0))
            {
                return Err(at("watts and price_per_hour must be non-negative".into()));
            }
            for upstream in &pool.upstreams {
                if let UpstreamAddress::Http(url) =
                    UpstreamAddress::parse(upstream).map_err(|e| at(e.to_string()))?
                {
                    check_upstream_url(&url).map_err(|e| at(e.to_string()))?;
                    if pool.api_key_env.is_some()
                        && url.starts_with("http://")
                        && !is_loopback_url(&url)
                        && !pool.allow_key_over_http
                    {
                        return Err(at(format!(
                            "upstream {url:?} would get the pool's key over plain http; use https, or set allow_key_over_http = true"
                        )));
                    }
                }
            }
            if let Some(fallback) = &pool.fallback {
                if fallback == &pool.name || !names.contains(fallback.as_str()) {
                    return Err(at(format!("fallback {fallback:?} is not another pool")));
                }
            }
        }
        Ok(())
    }

    /// Indices of the pools serving `model`.
    pub fn pools_for(&self, model: &str) -> Vec<usize> {
        (0..self.pools.len())
            .filter(|&i| self.pools[i].model == model)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
        [[pool]]
        name = "rngd-seoul"
        model = "llama-3.1-8b"
        accelerator = "rngd"
        count = 1
        watts = 150
        price_per_hour = 2.5
        upstreams = ["http://127.0.0.1:9001/v1", "engine:gemma-3-270m"]
        served_model = "meta-llama/Llama-3.1-8B-Instruct"
        api_key_env = "RNGD_KEY"
        profile = "vllm"
        fallback = "h100-pool"

        [[pool]]
        name = "h100-pool"
        model = "llama-3.1-8b"
        accelerator = "h100-sxm"
        upstreams = ["https://gpu.example.com/v1"]

        [router]
        policy = "energy"
    "#;

    #[test]
    fn the_documented_example_parses() {
        let c = FleetConfig::parse(EXAMPLE).unwrap();
        assert_eq!(c.pools.len(), 2);
        assert_eq!(c.pools[0].profile(), Profile::Vllm);
        assert_eq!(c.pools[1].profile(), Profile::Openai);
        assert_eq!(c.pools[1].count, 1);
        assert_eq!(c.router.policy, Policy::Energy);
        assert_eq!(c.pools_for("llama-3.1-8b"), vec![0, 1]);
        assert!(c.pools_for("other").is_empty());
        assert_eq!(
            UpstreamAddress::parse(&c.pools[0].upstreams[1]).unwrap(),
            UpstreamAddress::Engine("gemma-3-270m".into())
        );
    }

    #[test]
    fn mistakes_are_refused() {
        let cases = [
            EXAMPLE.replace("policy = \"energy\"", "policy = \"fastest\""),
            EXAMPLE.replace("count = 1", "cuont = 1"),
            EXAMPLE.replace("count = 1", "count = 1\nslo = \"ttft=fast\""),
            EXAMPLE.replace(
                "policy = \"energy\"",
                "policy = \"energy\"\nstall_timeout_secs = 0",
            ),
            EXAMPLE.replace("name = \"h100-pool\"", "name = \"rngd-seoul\""),
            EXAMPLE.replace("fallback = \"h100-pool\"", "fallback = \"nowhere\""),
            EXAMPLE.replace("https://gpu.example.com/v1", "ftp://gpu.example.com/v1"),
            EXAMPLE.replace("[\"https://gpu.example.com/v1\"]", "[]"),
            "[router]\npolicy = \"slo\"\n".to_string(),
        ];
        for text in cases {
            assert!(FleetConfig::parse(&text).is_err(), "{text}");
        }
    }

    #[test]
    fn metadata_addresses_are_refused() {
        for url in [
            "http://169.254.169.254/v1",
            "http://169.254.169.254:80/latest/v1",
            "http://[fe80::1]:8080/v1",
            "http://[::ffff:169.254.169.254]/v1",
            "http://metadata.google.internal/v1",
            "http://0.0.0.0:8080/v1",
            "http://user@169.254.169.254/v1",
            // What the URL parser reqwest uses reads as 169.254.169.254.
            "http://169.254.169.254./v1",
            "http://0xa9fea9fe/v1",
            "http://2852039166/v1",
            "http://0251.0376.0251.0376/v1",
            "http://169.254.43518/v1",
            "http://[::169.254.169.254]/v1",
            "http://[64:ff9b::a9fe:a9fe]/v1",
            // Metadata services outside link-local, by address and name.
            "http://100.100.100.200/latest/meta-data",
            "http://192.0.0.192/v1",
            "http://168.63.129.16/v1",
            "http://[fd00:ec2::254]/v1",
            "http://metadata.google.internal./v1",
            "http://METADATA.GOOG/v1",
            "http://instance-data/v1",
            "http://metadata.tencentyun.com/v1",
        ] {
            let text = EXAMPLE.replace("https://gpu.example.com/v1", url);
            let err = FleetConfig::parse(&text).unwrap_err();
            assert!(err.to_string().contains("refused"), "{url}: {err}");
        }
        for url in [
            "http://127.0.0.1:8080/v1",
            "http://localhost:8080/v1",
            "http://[::1]:9/v1",
            "https://api.example.com/v1",
            "http://10.0.0.5:8000/v1",
        ] {
            assert!(check_upstream_url(url).is_ok(), "{url}");
        }
    }

    /// A pool's key goes over https, or to loopback, unless the pool says
    /// plain http is meant.
    #[test]
    fn keys_travel_over_https_unless_allowed() {
        let pool = |url: &str, extra: &str| {
            format!(
                "[[pool]]\nname = \"p\"\nmodel = \"m\"\naccelerator = \"cpu\"\napi_key_env = \"K\"\nupstreams = [\"{url}\"]\n{extra}"
            )
        };
        let err = FleetConfig::parse(&pool("http://10.0.0.5:8000/v1", "")).unwrap_err();
        assert!(err.to_string().contains("plain http"), "{err}");
        for ok in [
            pool("https://10.0.0.5/v1", ""),
            pool("http://127.0.0.1:8000/v1", ""),
            pool("http://localhost:8000/v1", ""),
            pool("http://10.0.0.5:8000/v1", "allow_key_over_http = true"),
        ] {
            FleetConfig::parse(&ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }
}
