//! A secret that redacts itself: API keys of upstreams, of the bench's
//! targets and of clients. `{:?}` and `{}` print `<redacted>`; the key is
//! read only through [`ApiKey::expose`], for an `Authorization` header or a
//! hash. It is neither serialised nor compared in variable time here.

/// An API key. Printing it never shows it.
#[derive(Clone)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wraps a key.
    pub fn new(key: impl Into<String>) -> Self {
        ApiKey(key.into())
    }

    /// The key itself, for the `Authorization` header (or a hash) only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

impl std::fmt::Display for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_never_print() {
        let k = ApiKey::new("sk-secret");
        for shown in [format!("{k:?}"), format!("{k}"), format!("{:?}", Some(&k))] {
            assert!(!shown.contains("secret"), "{shown}");
        }
        assert_eq!(k.expose(), "sk-secret");
    }
}
