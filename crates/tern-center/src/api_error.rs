//! The HTTP edge's error answer: a status and an [`ErrorBody`] saying what to fix. Domain
//! errors ([`CenterError`]) become answers here and nowhere else.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use tern_api::ErrorBody;

use crate::error::CenterError;
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
}

/// The status each kind of domain error answers with.
pub fn status_of(e: &CenterError) -> StatusCode {
    match e {
        CenterError::Invalid(_) => StatusCode::BAD_REQUEST,
        CenterError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
        CenterError::Forbidden(_) => StatusCode::FORBIDDEN,
        CenterError::NotFound(_) => StatusCode::NOT_FOUND,
        CenterError::Conflict(_) => StatusCode::CONFLICT,
        CenterError::Unsatisfiable(_) => StatusCode::UNPROCESSABLE_ENTITY,
        CenterError::Agent(_) => StatusCode::BAD_GATEWAY,
        CenterError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        CenterError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
    }
}

impl From<CenterError> for ApiErr {
    fn from(e: CenterError) -> ApiErr {
        ApiErr::new(status_of(&e), e.into_message())
    }
}

impl From<StoreError> for ApiErr {
    fn from(e: StoreError) -> ApiErr {
        CenterError::from(e).into()
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

impl From<JsonRejection> for ApiErr {
    fn from(r: JsonRejection) -> ApiErr {
        match r {
            JsonRejection::MissingJsonContentType(_) => ApiErr::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "send the body as JSON with the header Content-Type: application/json",
            ),
            other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiErr::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "the request body is larger than this server accepts",
            ),
            // Bad syntax and bad values alike are the caller's to fix: 400 with serde's words.
            other => CenterError::invalid(format!(
                "invalid JSON body: {}",
                other.body_text().trim_start_matches(
                    "Failed to deserialize the JSON body into the target type: "
                )
            ))
            .into(),
        }
    }
}

impl From<PathRejection> for ApiErr {
    fn from(r: PathRejection) -> ApiErr {
        CenterError::invalid(format!("invalid path: {}", r.body_text())).into()
    }
}

impl From<QueryRejection> for ApiErr {
    fn from(r: QueryRejection) -> ApiErr {
        CenterError::invalid(format!("invalid query string: {}", r.body_text())).into()
    }
}
