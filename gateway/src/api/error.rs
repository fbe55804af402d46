//! The API's one error shape: an HTTP status and `{"error": MESSAGE, "code": CODE}`.
//!
//! `code` is a stable machine-readable word (documented in docs/api.md); `error` is the
//! sentence an admin acts on (the same text the CLI prints). Every refusal of a request
//! (`4xx`) happens before anything is written.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::replication::actions::ActionError;
use crate::replication::DbError;

/// An error answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

#[derive(Serialize)]
struct Body<'a> {
    error: &'a str,
    code: &'a str,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    /// The store (or another dependency) cannot be reached or read.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Body {
            error: &self.message,
            code: self.code,
        };
        let mut r = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer realm=\"standby\""),
            );
        }
        r
    }
}

impl From<ActionError> for ApiError {
    fn from(e: ActionError) -> Self {
        let message = e.to_string();
        match e {
            ActionError::Invalid(_) => Self::bad_request(message),
            ActionError::NotFound(_) => Self::not_found(message),
            ActionError::Conflict(_) => Self::conflict(message),
            ActionError::Db(_) | ActionError::Catalog(_) => Self::internal(message),
        }
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        ActionError::from(e).into()
    }
}

impl From<crate::catalog::CatalogError> for ApiError {
    fn from(e: crate::catalog::CatalogError) -> Self {
        use crate::catalog::CatalogError as C;
        match e {
            C::NotFound(_) => Self::not_found(e.to_string()),
            C::BadName(_) => Self::bad_request(e.to_string()),
            e => Self::internal(e.to_string()),
        }
    }
}

/// A rejected JSON body, query or path (axum's own rejections), in the same shape.
pub fn rejection(status: StatusCode, text: String) -> ApiError {
    let status = if status.is_client_error() {
        status
    } else {
        StatusCode::BAD_REQUEST
    };
    ApiError::new(status, "invalid_request", text)
}
