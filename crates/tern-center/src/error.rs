//! The API's error answer: an HTTP status and an [`ErrorBody`] saying what to fix.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use tern_api::ErrorBody;

use crate::store::StoreError;

/// An error answer of the REST API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiErr {
    pub status: StatusCode,
    pub message: String,
}

impl ApiErr {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiErr {
        ApiErr {
            status,
            message: message.into(),
        }
    }
    /// Malformed request or a value that can never be valid.
    pub fn bad_request(message: impl Into<String>) -> ApiErr {
        ApiErr::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn unauthorized(message: impl Into<String>) -> ApiErr {
        ApiErr::new(StatusCode::UNAUTHORIZED, message)
    }
    pub fn not_found(message: impl Into<String>) -> ApiErr {
        ApiErr::new(StatusCode::NOT_FOUND, message)
    }
    /// Clashes with the current state (taken name, VM running, host disconnected…).
    pub fn conflict(message: impl Into<String>) -> ApiErr {
        ApiErr::new(StatusCode::CONFLICT, message)
    }
    /// Well-formed but cannot be satisfied (too big for the host, files missing there…).
    pub fn unprocessable(message: impl Into<String>) -> ApiErr {
        ApiErr::new(StatusCode::UNPROCESSABLE_ENTITY, message)
    }
    /// A host agent the center had to ask failed.
    pub fn bad_gateway(message: impl Into<String>) -> ApiErr {
        ApiErr::new(StatusCode::BAD_GATEWAY, message)
    }
    pub fn internal(message: impl Into<String>) -> ApiErr {
        ApiErr::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
}

impl std::fmt::Display for ApiErr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.status)
    }
}

impl IntoResponse for ApiErr {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = %self.status, "{}", self.message);
        }
        let mut resp = (
            self.status,
            axum::Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

impl From<StoreError> for ApiErr {
    fn from(e: StoreError) -> ApiErr {
        match e {
            StoreError::NotFound(m) => ApiErr::not_found(m),
            StoreError::Conflict(m) => ApiErr::conflict(m),
            StoreError::Unprocessable(m) => ApiErr::unprocessable(m),
            other => ApiErr::internal(other.to_string()),
        }
    }
}

impl From<JsonRejection> for ApiErr {
    fn from(r: JsonRejection) -> ApiErr {
        match r {
            JsonRejection::MissingJsonContentType(_) => ApiErr::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "send the body as JSON with the header Content-Type: application/json",
            ),
            // Bad syntax and bad values alike are the caller's to fix: 400 with serde's words.
            other => ApiErr::bad_request(format!(
                "invalid JSON body: {}",
                other.body_text().trim_start_matches(
                    "Failed to deserialize the JSON body into the target type: "
                )
            )),
        }
    }
}

impl From<PathRejection> for ApiErr {
    fn from(r: PathRejection) -> ApiErr {
        ApiErr::bad_request(format!("invalid path: {}", r.body_text()))
    }
}

impl From<QueryRejection> for ApiErr {
    fn from(r: QueryRejection) -> ApiErr {
        ApiErr::bad_request(format!("invalid query string: {}", r.body_text()))
    }
}
