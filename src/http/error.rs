//! The one error type of the HTTP edge: every refusal of the HTTP API, of a WebSocket
//! handshake and of the other routes is an [`HttpError`], whose variant decides its status,
//! its `code` and its headers. Handlers return `Result<HttpResponse, HttpError>` and actix-web
//! answers an error with [`ResponseError::error_response`]; the upgrade path (off actix-web,
//! `super::upgrade`) calls the same method. The body is always `{"error":{"code","message"}}`
//! (SPEC §3) with the message the error displays.

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde_json::json;

use crate::bus::BusError;
use crate::protocol::ErrorCode;

/// Why a request was refused. Client errors (4xx) are kept apart from ours (5xx).
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The HTTP API without `api.key`: switched off, not a wrong key.
    #[error("the HTTP API is disabled on this server (api.key is not set)")]
    ApiDisabled,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Unauthorized(String),
    /// `retry_after` is the whole seconds sent as `Retry-After`.
    #[error("{message}")]
    RateLimited { retry_after: u64, message: String },
    #[error("{0}")]
    BadRequest(String),
    /// A message text over `limits.max_message_chars`: `too_long`, as the `error` frame says.
    #[error("{0}")]
    TooLong(String),
    /// A request body over this many bytes.
    #[error("the request body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("{0}")]
    NotFound(&'static str),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
    #[error(transparent)]
    Bus(#[from] BusError),
    /// A request to a WebSocket endpoint that is no valid handshake: actix-http's own answer.
    #[error(transparent)]
    Handshake(#[from] actix_http::ws::HandshakeError),
}

impl HttpError {
    /// The `code` of the JSON body.
    pub fn code(&self) -> &'static str {
        match self {
            Self::ApiDisabled | Self::Forbidden(_) => ErrorCode::Forbidden.as_str(),
            Self::Unauthorized(_) => "unauthorized",
            Self::RateLimited { .. } => ErrorCode::RateLimited.as_str(),
            Self::BadRequest(_) | Self::Handshake(_) => ErrorCode::BadRequest.as_str(),
            Self::TooLong(_) => ErrorCode::TooLong.as_str(),
            Self::TooLarge(_) => "too_large",
            Self::NotFound(_) => "not_found",
            Self::Unavailable(_) => ErrorCode::Unavailable.as_str(),
            Self::Internal(_) => ErrorCode::Internal.as_str(),
            Self::Bus(e) => e.code().as_str(),
        }
    }
}

impl ResponseError for HttpError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::ApiDisabled | Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::BadRequest(_) | Self::TooLong(_) => StatusCode::BAD_REQUEST,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Unavailable(_) | Self::Bus(BusError::Unavailable(_)) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Internal(_) | Self::Bus(BusError::Internal(_)) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            Self::Handshake(e) => actix_http::Response::from(e).status(),
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let Self::Handshake(e) = self {
            // What a WebSocket client library expects from a failed handshake, as before.
            return e.error_response();
        }
        let mut resp = HttpResponse::build(self.status_code())
            .json(json!({"error": {"code": self.code(), "message": self.to_string()}}));
        let headers = resp.headers_mut();
        match self {
            // RFC 6750 §3: a 401 names the scheme the client should use.
            Self::Unauthorized(_) => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Self::RateLimited { retry_after, .. } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after));
            }
            _ => {}
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_the_status_and_code_the_contract_names() {
        let cases = [
            (HttpError::ApiDisabled, 403, "forbidden"),
            (HttpError::Forbidden("x".into()), 403, "forbidden"),
            (HttpError::Unauthorized("x".into()), 401, "unauthorized"),
            (
                HttpError::RateLimited {
                    retry_after: 3,
                    message: "x".into(),
                },
                429,
                "rate_limited",
            ),
            (HttpError::BadRequest("x".into()), 400, "bad_request"),
            (HttpError::TooLong("x".into()), 400, "too_long"),
            (HttpError::TooLarge(10), 413, "too_large"),
            (HttpError::NotFound("x"), 404, "not_found"),
            (HttpError::Unavailable("x".into()), 503, "unavailable"),
            (HttpError::Internal("x".into()), 500, "internal"),
            (
                HttpError::Bus(BusError::Unavailable("down".into())),
                503,
                "unavailable",
            ),
            (
                HttpError::Bus(BusError::Internal("bug".into())),
                500,
                "internal",
            ),
        ];
        for (e, status, code) in cases {
            assert_eq!(
                (e.status_code().as_u16(), e.code()),
                (status, code),
                "{e:?}"
            );
            assert_eq!(e.error_response().status().as_u16(), status, "{e:?}");
        }
    }

    #[test]
    fn a_401_names_bearer_and_a_429_says_when_to_retry() {
        let unauthorized = HttpError::Unauthorized("no".into()).error_response();
        assert_eq!(
            unauthorized
                .headers()
                .get(header::WWW_AUTHENTICATE)
                .unwrap(),
            "Bearer"
        );
        let limited = HttpError::RateLimited {
            retry_after: 7,
            message: "slow down".into(),
        }
        .error_response();
        assert_eq!(limited.headers().get(header::RETRY_AFTER).unwrap(), "7");
        let other = HttpError::BadRequest("x".into()).error_response();
        assert!(other.headers().get(header::RETRY_AFTER).is_none());
        assert!(other.headers().get(header::WWW_AUTHENTICATE).is_none());
    }
}
