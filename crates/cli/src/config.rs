//! `neocloud.toml`: the serve settings a file can hold. Unknown keys are
//! errors; command-line flags and `NEOCLOUD_*` variables override the file.

use std::path::{Path, PathBuf};

use anyhow::Context;
use neocloud_fleet::config::FleetConfig;
use serde::Deserialize;

/// A config file's `activation_bits`: a number of bits or a name.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum ActivationBitsValue {
    /// `16` or `8`.
    Bits(i64),
    /// `"mixed"`.
    Name(String),
}

impl std::fmt::Display for ActivationBitsValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ActivationBitsValue::Bits(bits) => write!(f, "{bits}"),
            ActivationBitsValue::Name(name) => write!(f, "{name:?}"),
        }
    }
}

/// The file's contents; every key is optional.
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServeFile {
    /// Models to serve (catalogue names, paths, `hf:` or `pip:` specs).
    pub models: Option<Vec<String>>,
    /// Address to listen on.
    pub host: Option<String>,
    /// Port to listen on.
    pub port: Option<u16>,
    /// Requests that may wait; beyond that, 503.
    pub queue: Option<usize>,
    /// Sequences generated together.
    pub max_batch: Option<usize>,
    /// Key/value memory per served model, in MiB.
    pub kv_cache_mb: Option<usize>,
    /// Largest request body in bytes.
    pub body_limit: Option<usize>,
    /// Seconds open requests may run on after SIGTERM.
    pub shutdown_timeout_secs: Option<u64>,
    /// Worker threads for the compute kernels.
    pub threads: Option<usize>,
    /// Bits per activation in the matrix products: 16, 8 or `"mixed"`.
    pub activation_bits: Option<ActivationBitsValue>,
    /// A file that gets one JSON line of usage per finished request.
    pub usage_log: Option<PathBuf>,
    /// Host names answered besides loopback ones.
    pub allowed_hosts: Option<Vec<String>>,
    /// The lowest `priority` a request may ask for.
    pub min_priority: Option<i64>,
    /// Client connections open at once.
    pub max_connections: Option<usize>,
    /// Seconds a client may take to send a request head (and stay idle).
    pub header_timeout_secs: Option<u64>,
    /// Seconds a client may take to send a request body.
    pub body_timeout_secs: Option<u64>,
    /// Seconds a streamed answer may wait for a client that reads nothing.
    pub write_timeout_secs: Option<u64>,
    /// The tenancy database: `sqlite:PATH` or `postgres://...`.
    pub database_url: Option<String>,
    /// The fleet (`[[pool]]` and `[router]`): when present, serve runs the
    /// gateway.
    #[serde(skip)]
    pub fleet: Option<FleetConfig>,
}

impl ServeFile {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the config file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in the config file {}", path.display()))
    }

    /// Parses config text. `[[pool]]` and `[router]` go to the fleet's
    /// configuration, the other keys to the serve settings.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut table: toml::Table = toml::from_str(text)?;
        let mut fleet = toml::Table::new();
        for key in ["pool", "router"] {
            if let Some(value) = table.remove(key) {
                fleet.insert(key.to_owned(), value);
            }
        }
        let mut file: ServeFile = ServeFile::deserialize(toml::Value::Table(table))?;
        if !fleet.is_empty() {
            file.fleet = Some(FleetConfig::parse(&toml::to_string(&fleet)?)?);
        }
        Ok(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_parses() {
        let f = ServeFile::parse(
            r#"
            models = ["gemma-3-270m", "qwen2.5-coder-0.5b-instruct"]
            host = "0.0.0.0"
            port = 9000
            queue = 8
            body_limit = 1048576
            shutdown_timeout_secs = 5
            threads = 2
            activation_bits = 8
            "#,
        )
        .unwrap();
        assert_eq!(f.port, Some(9000));
        assert_eq!(f.models.as_ref().map(Vec::len), Some(2));
        assert_eq!(f.shutdown_timeout_secs, Some(5));
        assert_eq!(f.activation_bits, Some(ActivationBitsValue::Bits(8)));
        let mixed = ServeFile::parse("activation_bits = \"mixed\"").unwrap();
        assert_eq!(
            mixed.activation_bits,
            Some(ActivationBitsValue::Name("mixed".into()))
        );
    }

    #[test]
    fn pools_make_a_fleet() {
        let f = ServeFile::parse(
            r#"
            port = 9000
            [[pool]]
            name = "cpu"
            model = "gemma"
            accelerator = "cpu"
            upstreams = ["engine:gemma-3-270m"]
            [router]
            policy = "round-robin"
            "#,
        )
        .unwrap();
        assert_eq!(f.port, Some(9000));
        assert_eq!(f.fleet.unwrap().pools[0].name, "cpu");
        assert!(ServeFile::parse("port = 1\n[router]\npolicy = \"slo\"\n").is_err());
        assert!(ServeFile::parse("[[pool]]\nname = \"x\"\nmodle = 1\n").is_err());
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_errors() {
        let err = ServeFile::parse("prot = 9000").unwrap_err();
        assert!(format!("{err:#}").contains("prot"), "{err:#}");
        assert!(ServeFile::parse("port = \"x\"").is_err());
        assert!(ServeFile::parse("port = 70000").is_err());
    }
}
