//! The server's error type and its one mapping to OpenAI-style responses.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use neocloud_engine::EngineError;
use neocloud_openai::{ApiError, ErrorKind};

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A parameter is missing, malformed or out of range.
    #[error("{message}")]
    InvalidParam {
        /// The parameter at fault.
        param: String,
        /// What is wrong with it.
        message: String,
    },
    /// The body is not a valid request.
    #[error("{0}")]
    InvalidBody(String),
    /// The prompt, with the tokens asked for, does not fit the context.
    #[error("{message}")]
    ContextLengthExceeded {
        /// `messages` or `prompt`.
        param: String,
        /// The counts.
        message: String,
    },
    /// No route answers this method and path.
    #[error("no route for {0}")]
    NoRoute(String),
    /// No served model has this name.
    #[error("the model `{0}` does not exist")]
    ModelNotFound(String),
    /// The body exceeds the limit.
    #[error("the request body exceeds {0} bytes")]
    TooLarge(usize),
    /// The body did not arrive within the time allowed (seconds).
    #[error("the request body did not arrive within {0} s")]
    BodyTimeout(u64),
    /// The waiting queue is full, or the models are still loading.
    #[error("{0}")]
    Unavailable(String),
    /// The engine failed, or refused a request as a whole.
    #[error("engine error: {0}")]
    Engine(EngineError),
    /// Every upstream that could serve the request is rate limited.
    #[error("{message}")]
    RateLimited {
        /// What happened.
        message: String,
        /// Seconds until one may take requests again.
        retry_after_secs: u64,
    },
    /// An upstream refused the request; its error, cleaned of anything
    /// that is not the client's business.
    #[error("upstream refused the request: {}", .0.message)]
    Upstream(ApiError),
    /// A fault on our side (a panic while serving); the detail is logged.
    #[error("internal error: {0}")]
    Internal(String),
    /// No valid API key (missing, malformed, unknown, revoked, expired, or
    /// its tenant disabled): one message for all, the reason is logged.
    #[error("Incorrect or missing API key. Send `Authorization: Bearer nc-...` with a key from `neocloud keys create`.")]
    Unauthorized,
    /// The request names a host this server does not answer to.
    #[error("this server does not answer requests addressed to that host; start it with --allowed-host NAME to take it")]
    HostNotAllowed,
}

impl From<EngineError> for ServerError {
    /// The engine's refusal of one parameter is the client's 400 naming it.
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::InvalidParameter { param, message } => ServerError::param(param, message),
            other => ServerError::Engine(other),
        }
    }
}

impl ServerError {
    /// A 400 naming `param`.
    pub fn param(param: impl Into<String>, message: impl Into<String>) -> Self {
        ServerError::InvalidParam {
            param: param.into(),
            message: message.into(),
        }
    }

    /// The OpenAI-shaped error.
    pub fn to_api_error(&self) -> ApiError {
        match self {
            ServerError::InvalidParam { param, message } => ApiError::invalid_param(param, message),
            ServerError::InvalidBody(m) => ApiError::new(ErrorKind::InvalidRequestError, m),
            ServerError::ContextLengthExceeded { param, message } => {
                ApiError::invalid_param(param, message).with_code("context_length_exceeded")
            }
            ServerError::ModelNotFound(_) => {
                ApiError::new(ErrorKind::NotFoundError, self.to_string())
                    .with_param("model")
                    .with_code("model_not_found")
            }
            ServerError::NoRoute(_) => ApiError::new(ErrorKind::NotFoundError, self.to_string()),
            ServerError::TooLarge(_) => ApiError::new(ErrorKind::RequestTooLarge, self.to_string()),
            ServerError::BodyTimeout(_) => {
                ApiError::new(ErrorKind::RequestTimeout, self.to_string()).with_code("timeout")
            }
            ServerError::Unavailable(m) => ApiError::new(ErrorKind::ServiceUnavailable, m),
            ServerError::RateLimited { message, .. } => {
                ApiError::new(ErrorKind::RateLimitError, message).with_code("rate_limit_exceeded")
            }
            ServerError::Upstream(api) => api.clone(),
            ServerError::Unauthorized => {
                ApiError::new(ErrorKind::AuthenticationError, self.to_string())
                    .with_code("invalid_api_key")
            }
            ServerError::HostNotAllowed => {
                ApiError::new(ErrorKind::PermissionError, self.to_string())
                    .with_code("host_not_allowed")
            }
            ServerError::Engine(EngineError::InvalidRequest(m)) => {
                ApiError::new(ErrorKind::InvalidRequestError, m)
            }
            ServerError::Engine(EngineError::InvalidParameter { param, message }) => {
                ApiError::invalid_param(*param, message)
            }
            ServerError::Engine(EngineError::Template(m)) => ApiError::new(
                ErrorKind::InvalidRequestError,
                format!("the chat template rejected the messages: {m}"),
            )
            .with_param("messages"),
            ServerError::Engine(_) | ServerError::Internal(_) => {
                ApiError::new(ErrorKind::ServerError, "internal server error")
            }
        }
    }
}

impl IntoResponse for ServerError {
    fn into_response(self) -> Response {
        if matches!(self, ServerError::Engine(_) | ServerError::Internal(_)) {
            tracing::error!(error = %self, "request failed");
        }
        let api = self.to_api_error();
        let status =
            StatusCode::from_u16(api.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = (status, api.to_json()).into_response();
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let ServerError::RateLimited {
            retry_after_secs, ..
        } = self
        {
            headers.insert(
                header::RETRY_AFTER,
                HeaderValue::from(retry_after_secs.max(1)),
            );
        } else if status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One of every error the server answers with: each variant, and each
    /// kind of engine error.
    fn every_error() -> Vec<(&'static str, ServerError)> {
        let io = || std::io::Error::new(std::io::ErrorKind::NotFound, "/models/secret-path.gguf");
        vec![
            (
                "invalid_param",
                ServerError::param("temperature", "temperature must be within [0, 2], got 3"),
            ),
            (
                "invalid_body",
                ServerError::InvalidBody(
                    "the body is not valid JSON: expected value at line 1 column 1".into(),
                ),
            ),
            (
                "context_length",
                ServerError::ContextLengthExceeded {
                    param: "messages".into(),
                    message: "the prompt has 40000 tokens; the model's context is 32768".into(),
                },
            ),
            ("no_route", ServerError::NoRoute("GET /v1/nowhere".into())),
            (
                "model_not_found",
                ServerError::ModelNotFound("gpt-5".into()),
            ),
            ("too_large", ServerError::TooLarge(2 << 20)),
            (
                "unavailable",
                ServerError::Unavailable("the server is at capacity; retry shortly".into()),
            ),
            (
                "rate_limited",
                ServerError::RateLimited {
                    message: "every upstream is rate limited".into(),
                    retry_after_secs: 7,
                },
            ),
            (
                "upstream",
                ServerError::Upstream(ApiError::invalid_param(
                    "temperature",
                    "the upstream refused temperature",
                )),
            ),
            (
                "internal",
                ServerError::Internal("a panic at src/secret.rs:12".into()),
            ),
            ("host_not_allowed", ServerError::HostNotAllowed),
            (
                "engine_io",
                ServerError::Engine(EngineError::Io {
                    path: "/models/secret-path.gguf".into(),
                    source: io(),
                }),
            ),
            (
                "engine_gguf",
                ServerError::Engine(EngineError::Gguf("bad magic".into())),
            ),
            (
                "engine_model",
                ServerError::Engine(EngineError::Model("no such architecture".into())),
            ),
            (
                "engine_shape",
                ServerError::Engine(EngineError::Shape("3 != 4".into())),
            ),
            (
                "engine_tokenizer",
                ServerError::Engine(EngineError::Tokenizer("no vocabulary".into())),
            ),
            (
                "engine_template",
                ServerError::Engine(EngineError::Template("unknown filter".into())),
            ),
            (
                "engine_invalid_request",
                ServerError::Engine(EngineError::InvalidRequest("the prompt is empty".into())),
            ),
            (
                "engine_invalid_parameter",
                ServerError::from(EngineError::InvalidParameter {
                    param: "top_p",
                    message: "top_p must be greater than 0".into(),
                }),
            ),
            (
                "engine_out_of_kv",
                ServerError::Engine(EngineError::OutOfKvMemory("no block left".into())),
            ),
        ]
    }

    fn render(errors: &[(&str, ServerError)]) -> String {
        let mut out = String::new();
        for (name, error) in errors {
            let api = error.to_api_error();
            out.push_str(&format!("{name}: {} {}\n", api.status(), api.to_json()));
        }
        out
    }

    /// Every error kind is pinned to its status and JSON body. After a
    /// deliberate change, `UPDATE_SNAPSHOTS=1` rewrites the file.
    #[test]
    fn every_error_kind_keeps_its_status_and_body() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("snapshots/errors.txt");
        let rendered = render(&every_error());
        if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &rendered).unwrap();
        }
        let pinned = std::fs::read_to_string(&path).unwrap();
        assert_eq!(rendered, pinned, "errors changed; see {}", path.display());
        // Server-side faults never show their detail.
        for line in rendered.lines().filter(|l| l.contains(" 500 ")) {
            assert!(!line.contains("secret"), "{line}");
        }
    }
}
