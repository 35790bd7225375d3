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
    /// The waiting queue is full, or the models are still loading.
    #[error("{0}")]
    Unavailable(String),
    /// The engine failed.
    #[error("engine error: {0}")]
    Engine(#[from] EngineError),
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
            ServerError::Unavailable(m) => ApiError::new(ErrorKind::ServiceUnavailable, m),
            ServerError::RateLimited { message, .. } => {
                ApiError::new(ErrorKind::RateLimitError, message).with_code("rate_limit_exceeded")
            }
            ServerError::Upstream(api) => api.clone(),
            ServerError::Engine(EngineError::InvalidRequest(m)) => {
                ApiError::new(ErrorKind::InvalidRequestError, m)
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
