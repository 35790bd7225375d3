//! Wire types of the OpenAI API shared by neocloud's server and bench:
//! chat completions ([`chat`]), the model list ([`models`]), the SSE framing
//! ([`sse`]) and errors.
//!
//! This crate depends on no other workspace crate. It owns the one place
//! where an error becomes an HTTP status and an OpenAI-style JSON body:
//! `{"error": {"message", "type", "param", "code"}}`.

use serde::{Deserialize, Serialize};

pub use api_key::ApiKey;

pub mod api_key;
pub mod chat;
pub mod completions;
pub mod models;
pub mod sse;

/// The kinds of error the API reports, each with its HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// 400: the request is malformed or a parameter is out of range.
    InvalidRequestError,
    /// 401: missing or wrong API key.
    AuthenticationError,
    /// 403: the key may not do this.
    PermissionError,
    /// 404: unknown model or route.
    NotFoundError,
    /// 408: the client sent its request too slowly.
    RequestTimeout,
    /// 413: the request body is too large.
    RequestTooLarge,
    /// 429: rate limit or budget exceeded.
    RateLimitError,
    /// 500: a fault on our side.
    ServerError,
    /// 503: overloaded or still loading.
    ServiceUnavailable,
}

impl ErrorKind {
    /// The HTTP status code of this kind.
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::InvalidRequestError => 400,
            ErrorKind::AuthenticationError => 401,
            ErrorKind::PermissionError => 403,
            ErrorKind::NotFoundError => 404,
            ErrorKind::RequestTimeout => 408,
            ErrorKind::RequestTooLarge => 413,
            ErrorKind::RateLimitError => 429,
            ErrorKind::ServerError => 500,
            ErrorKind::ServiceUnavailable => 503,
        }
    }
}

/// An error as the API reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// Human-readable explanation.
    pub message: String,
    /// Error class.
    #[serde(rename = "type")]
    pub kind: ErrorKind,
    /// The request parameter at fault, when there is one.
    pub param: Option<String>,
    /// A short machine-readable code, when there is one.
    pub code: Option<String>,
}

/// The JSON envelope of an error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ApiError,
}

impl ApiError {
    /// An error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError {
            message: message.into(),
            kind,
            param: None,
            code: None,
        }
    }

    /// A 400 naming the parameter at fault.
    pub fn invalid_param(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError {
            param: Some(param.into()),
            ..Self::new(ErrorKind::InvalidRequestError, message)
        }
    }

    /// Sets the parameter at fault.
    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    /// Sets the machine-readable code.
    pub fn with_code(mut self, code: impl Into<String>) -> Self {
        self.code = Some(code.into());
        self
    }

    /// The HTTP status of this error.
    pub fn status(&self) -> u16 {
        self.kind.status()
    }

    /// The response body.
    pub fn to_json(&self) -> String {
        serde_json::to_string(&ErrorBody { error: self.clone() })
            .unwrap_or_else(|_| r#"{"error":{"message":"internal error","type":"server_error","param":null,"code":null}}"#.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_serialise_in_openai_shape() {
        let e = ApiError::invalid_param("temperature", "temperature must be within [0, 2]")
            .with_code("invalid_value");
        assert_eq!(e.status(), 400);
        assert_eq!(
            e.to_json(),
            r#"{"error":{"message":"temperature must be within [0, 2]","type":"invalid_request_error","param":"temperature","code":"invalid_value"}}"#
        );
        let back: ErrorBody = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(back.error, e);
    }

    #[test]
    fn every_kind_has_its_status() {
        let table = [
            (ErrorKind::InvalidRequestError, 400),
            (ErrorKind::AuthenticationError, 401),
            (ErrorKind::PermissionError, 403),
            (ErrorKind::NotFoundError, 404),
            (ErrorKind::RequestTimeout, 408),
            (ErrorKind::RequestTooLarge, 413),
            (ErrorKind::RateLimitError, 429),
            (ErrorKind::ServerError, 500),
            (ErrorKind::ServiceUnavailable, 503),
        ];
        for (kind, status) in table {
            assert_eq!(kind.status(), status, "{kind:?}");
        }
    }
}
