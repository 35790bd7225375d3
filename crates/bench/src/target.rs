//! Endpoints under test: a name, a base URL ending in `/v1`, the model to
//! ask for, and an API key that never appears in output.

use crate::error::BenchError;

pub use neocloud_openai::ApiKey;

/// One endpoint under test.
#[derive(Debug, Clone)]
pub struct Target {
    /// Name in the report.
    pub name: String,
    /// Base URL, ending in `/v1`.
    pub base_url: String,
    /// Model to ask for; `None` until resolved from `/v1/models`.
    pub model: Option<String>,
    /// Key for `Authorization: Bearer`.
    pub api_key: Option<ApiKey>,
}

impl Target {
    /// Parses `NAME=URL[,model=M]`.
    pub fn parse(spec: &str) -> Result<Self, BenchError> {
        let bad = || {
            BenchError::InvalidArgument(format!(
                "--target {spec:?}: expected NAME=URL[,model=MODEL]"
            ))
        };
        let (name, rest) = spec.split_once('=').ok_or_else(bad)?;
        let mut parts = rest.split(',');
        let url = parts.next().filter(|u| !u.is_empty()).ok_or_else(bad)?;
        let mut model = None;
        for part in parts {
            match part.split_once('=') {
                Some(("model", m)) if !m.is_empty() => model = Some(m.to_owned()),
                _ => return Err(bad()),
            }
        }
        if name.is_empty() {
            return Err(bad());
        }
        Target::new(name, url, model)
    }

    /// A target from its parts; the URL must be http(s) and end in `/v1`.
    pub fn new(name: &str, url: &str, model: Option<String>) -> Result<Self, BenchError> {
        let base_url = url.trim_end_matches('/').to_owned();
        if !(base_url.starts_with("http://") || base_url.starts_with("https://"))
            || !base_url.ends_with("/v1")
        {
            return Err(BenchError::InvalidArgument(format!(
                "{url:?}: the base URL must be http(s)://HOST[:PORT][/PATH]/v1"
            )));
        }
        Ok(Target {
            name: name.to_owned(),
            base_url,
            model,
            api_key: None,
        })
    }

    /// The server root (the base URL without `/v1`), where `/tokenize` and
    /// `/metrics` live on neocloud, vLLM and llama.cpp.
    pub fn root_url(&self) -> &str {
        self.base_url.strip_suffix("/v1").unwrap_or(&self.base_url)
    }

    /// The model, once resolved.
    pub fn model(&self) -> &str {
        self.model.as_deref().unwrap_or("")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_target_specs() {
        let t = Target::parse("ours=http://127.0.0.1:8080/v1,model=gemma").unwrap();
        assert_eq!(t.name, "ours");
        assert_eq!(t.base_url, "http://127.0.0.1:8080/v1");
        assert_eq!(t.root_url(), "http://127.0.0.1:8080");
        assert_eq!(t.model.as_deref(), Some("gemma"));
        assert!(Target::parse("x=http://h/v1/").unwrap().model.is_none());
        for bad in [
            "noequals",
            "=http://h/v1",
            "x=ftp://h/v1",
            "x=http://h",
            "x=http://h/v1,foo=1",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }
}
