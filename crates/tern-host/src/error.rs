//! Errors of the agent's VM operations, and the HTTP answers they become.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use tern_api::ErrorBody;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The request is wrong (bad spec, missing file): the caller must change it.
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    /// The VM is in a state that does not allow the operation.
    #[error("{0}")]
    Conflict(String),
    /// QEMU refused or failed; the message carries QEMU's own words.
    #[error("{0}")]
    Qemu(String),
    #[error("{0:#}")]
    Internal(#[from] anyhow::Error),
}

impl AgentError {
    pub fn status(&self) -> StatusCode {
        match self {
            AgentError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AgentError::NotFound(_) => StatusCode::NOT_FOUND,
            AgentError::Conflict(_) => StatusCode::CONFLICT,
            AgentError::Qemu(_) => StatusCode::INTERNAL_SERVER_ERROR,
            AgentError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for AgentError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(error = %self, "request failed");
        }
        (
            status,
            Json(ErrorBody {
                error: self.to_string(),
            }),
        )
            .into_response()
    }
}
