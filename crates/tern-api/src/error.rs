//! The error body every API answers with, and the client-side error.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// JSON body of every 4xx/5xx answer: what went wrong and what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: String,
}

/// What a call through the HTTP client can fail with.
#[cfg(feature = "client")]
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The server answered with an error status.
    #[error("{message} (HTTP {status})")]
    Status { status: u16, message: String },
    /// No answer: refused, timed out, or the TLS handshake failed (the chain of causes says
    /// which; reqwest's own text alone hides it).
    #[error("cannot reach {endpoint}: {}", error_chain(source))]
    Transport {
        endpoint: String,
        #[source]
        source: reqwest::Error,
    },
    /// TLS settings that cannot be used; nothing was sent.
    #[error("TLS: {detail}")]
    Tls { detail: String },
    #[error("unexpected answer from {endpoint}: {detail}")]
    Decode { endpoint: String, detail: String },
    /// A name that cannot be sent as one path segment; nothing was sent.
    #[error(transparent)]
    BadName(#[from] crate::routes::BadName),
}

#[cfg(feature = "client")]
impl ApiError {
    /// HTTP status of an error answer, if the server answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The server does not know what was asked for (HTTP 404): a domain answer, not a fault.
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }

    /// The request conflicts with the current state (HTTP 409): already done, or busy.
    pub fn is_conflict(&self) -> bool {
        self.status() == Some(409)
    }
}

/// An error and its causes, `: `-separated, each said once (reqwest repeats its cause in its
/// text in some versions).
#[cfg(feature = "client")]
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !out.contains(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        cur = c.source();
    }
    out
}
