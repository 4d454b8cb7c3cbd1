//! The one error type every handler returns; it never leaks internal details.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::limiter::LimitError;

/// Which response body shape an error takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// `{"error": code, "message": ..., "field": ...}`
    Native,
    /// Piston v2: `{"message": ...}`
    Piston,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
    pub retry_after: Option<u64>,
    pub flavor: Flavor,
}

#[derive(Serialize)]
struct NativeBody<'a> {
    error: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
}

#[derive(Serialize)]
struct PistonBody<'a> {
    message: &'a str,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
            retry_after: None,
            flavor: Flavor::Native,
        }
    }

    /// Malformed JSON or a value of the wrong type (400).
    pub fn bad_request(field: Option<String>, message: impl Into<String>) -> Self {
        ApiError {
            field,
            ..Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
        }
    }

    /// Well-formed but not acceptable (422).
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError {
            field: Some(field.into()),
            ..Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", message)
        }
    }

    /// Over a size limit (413).
    pub fn too_large(field: Option<String>, message: impl Into<String>) -> Self {
        ApiError {
            field,
            ..Self::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", message)
        }
    }

    /// The client was too slow sending its request (408).
    pub fn request_timeout(message: impl Into<String>) -> Self {
        Self::new(StatusCode::REQUEST_TIMEOUT, "request_timeout", message)
    }

    /// A server-side resource is missing (503), e.g. an image that could not be built.
    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError {
            retry_after: Some(30),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
        }
    }

    /// The client closed the connection before the answer (nginx's 499; nobody reads it).
    pub fn client_gone() -> Self {
        Self::new(
            StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            "client_closed",
            "the client closed the connection",
        )
    }

    /// A resource that does not exist (or no longer does), named in the message (404).
    /// The thing is not in a state that allows it (409).
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    pub fn gone_or_missing(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// A cap on things held at once (429, with `Retry-After`).
    pub fn too_many(code: &'static str, message: impl Into<String>, retry_after: u64) -> Self {
        ApiError {
            retry_after: Some(retry_after),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, code, message)
        }
    }

    /// A failure on our side, said in a sentence (500).
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", message)
    }

    /// 401: an API key is needed (`[auth] keys`) and none, or a wrong one, was given.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// 403 with `code`: a request this server will not serve whoever asks again.
    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, code, message)
    }

    /// 426: a WebSocket route asked without a WebSocket handshake.
    pub fn upgrade_required(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UPGRADE_REQUIRED, "upgrade_required", message)
    }

    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "no such route")
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "this route does not take that method",
        )
    }

    pub fn piston(mut self) -> Self {
        self.flavor = Flavor::Piston;
        self
    }
}

impl From<LimitError> for ApiError {
    fn from(e: LimitError) -> Self {
        let (status, code, retry) = match e {
            LimitError::QueueFull(_) => (StatusCode::TOO_MANY_REQUESTS, "saturated", 1),
            LimitError::QueueTimeout(_) => (StatusCode::SERVICE_UNAVAILABLE, "saturated", 5),
            LimitError::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down", 10),
        };
        ApiError {
            retry_after: Some(retry),
            ..Self::new(status, code, format!("{e}; try again later"))
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = match self.flavor {
            Flavor::Native => serde_json::to_vec(&NativeBody {
                error: self.code,
                message: &self.message,
                field: self.field.as_deref(),
            }),
            Flavor::Piston => serde_json::to_vec(&PistonBody {
                message: &self.message,
            }),
        }
        .unwrap_or_default();
        let mut resp = (self.status, body).into_response();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(s) = self.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}
