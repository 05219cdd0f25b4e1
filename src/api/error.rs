//! What the backend API answers when it does not answer success: every
//! error is `{"error": {"code": "...", "message": "..."}}` with the status
//! below, mapped here and nowhere else.

use actix_web::http::header::{HeaderValue, ALLOW, RETRY_AFTER, WWW_AUTHENTICATE};
use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde_json::json;

/// Seconds a 503 asks the caller to wait (`Retry-After`).
pub const RETRY_AFTER_S: u32 = 1;

/// An error answer of the backend API.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    /// 401: no `Authorization: Bearer` key, or not an accepted one.
    #[error("a valid `Authorization: Bearer <key>` header is required")]
    Unauthorized,
    /// 400: the session id or entity kind/key in the path is malformed.
    #[error("{0}")]
    BadAddress(String),
    /// 400: the user in the path is empty or too long.
    #[error("{0}")]
    BadUser(String),
    /// 400: `Idempotency-Key` missing or malformed.
    #[error("{0}")]
    BadIdempotencyKey(String),
    /// 400: the body is not JSON.
    #[error("the body is not JSON: {0}")]
    BadJson(String),
    /// 415: the body is not sent as `application/json`.
    #[error("send the message as Content-Type: application/json")]
    NotJson,
    /// 413: the body is larger than `limits.max_message_bytes`.
    #[error("the message is larger than limits.max_message_bytes ({0} bytes)")]
    TooLarge(usize),
    /// 404: no such session (never existed, expired or ended).
    #[error("session unknown, expired or ended")]
    SessionNotFound,
    /// 404: no entity kind of that name is registered.
    #[error("no entity kind {0:?} is registered")]
    UnknownKind(String),
    /// 404: no such route.
    #[error("no such endpoint")]
    NoRoute,
    /// 405: the route exists, with these methods only.
    #[error("this endpoint takes {0} only")]
    MethodNotAllowed(&'static str),
    /// 409: the receiver's handler refused the message for good; `code`
    /// and `message` are its error's.
    #[error("{message}")]
    Refused {
        /// The handler's error code (`bad_args`, ...).
        code: String,
        /// The handler's message.
        message: String,
    },
    /// 503: not now (owner unreachable or moving, store down, the handler
    /// answered `unavailable`); retry with the same `Idempotency-Key`.
    #[error("{0}")]
    Unavailable(String),
}

impl ApiError {
    /// The `code` of the error body.
    pub fn code(&self) -> &str {
        match self {
            ApiError::Unauthorized => "unauthorized",
            ApiError::BadAddress(_) => "bad_address",
            ApiError::BadUser(_) => "bad_user",
            ApiError::BadIdempotencyKey(_) => "bad_idempotency_key",
            ApiError::BadJson(_) => "bad_json",
            ApiError::TooLarge(_) => "too_large",
            ApiError::NotJson => "unsupported_media_type",
            ApiError::SessionNotFound => "session_not_found",
            ApiError::UnknownKind(_) => "unknown_kind",
            ApiError::NoRoute => "not_found",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::Refused { code, .. } => code,
            ApiError::Unavailable(_) => "unavailable",
        }
    }

    /// The error body.
    pub fn body(&self) -> serde_json::Value {
        json!({ "error": { "code": self.code(), "message": self.to_string() } })
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::BadAddress(_)
            | ApiError::BadUser(_)
            | ApiError::BadIdempotencyKey(_)
            | ApiError::BadJson(_) => StatusCode::BAD_REQUEST,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::NotJson => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::SessionNotFound | ApiError::UnknownKind(_) | ApiError::NoRoute => {
                StatusCode::NOT_FOUND
            }
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Refused { .. } => StatusCode::CONFLICT,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut r = HttpResponse::build(self.status_code());
        match self {
            ApiError::Unauthorized => {
                r.insert_header((WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")));
            }
            ApiError::Unavailable(_) => {
                r.insert_header((RETRY_AFTER, RETRY_AFTER_S.to_string()));
            }
            ApiError::MethodNotAllowed(allow) => {
                r.insert_header((ALLOW, *allow));
            }
            _ => {}
        }
        r.json(self.body())
    }
}
