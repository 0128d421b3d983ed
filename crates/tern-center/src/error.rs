//! The center's domain error: what went wrong with an operation, by kind, and what to do about
//! it. The domain modules (inventory, EVC, DRS, migration, maintenance, tasks) return it; only
//! the HTTP edge ([`crate::api`]) maps a kind to a status code.

use crate::store::StoreError;

/// Why the center refused or failed an operation. Every message says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CenterError {
    /// Malformed input, or a value that can never be valid.
    #[error("{0}")]
    Invalid(String),
    /// The caller did not prove who it is.
    #[error("{0}")]
    Unauthorized(String),
    /// The caller's role does not allow the call.
    #[error("{0}")]
    Forbidden(String),
    /// The named VM, host, cluster or task does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Clashes with the current state (taken name, VM running, host disconnected…).
    #[error("{0}")]
    Conflict(String),
    /// Well-formed but cannot be satisfied (too big for the host, files missing there…).
    #[error("{0}")]
    Unsatisfiable(String),
    /// A host agent the center had to ask failed.
    #[error("{0}")]
    Agent(String),
    /// The center itself failed (its store, a broken invariant).
    #[error("{0}")]
    Internal(String),
    /// This center cannot change anything now: it is a standby of an HA group (the message
    /// names the leader), or it lost the shared store. Retrying later, or at the leader, works.
    #[error("{0}")]
    Unavailable(String),
}

impl CenterError {
    pub fn invalid(message: impl Into<String>) -> CenterError {
        CenterError::Invalid(message.into())
    }
    pub fn unauthorized(message: impl Into<String>) -> CenterError {
        CenterError::Unauthorized(message.into())
    }
    pub fn forbidden(message: impl Into<String>) -> CenterError {
        CenterError::Forbidden(message.into())
    }
    pub fn not_found(message: impl Into<String>) -> CenterError {
        CenterError::NotFound(message.into())
    }
    pub fn conflict(message: impl Into<String>) -> CenterError {
        CenterError::Conflict(message.into())
    }
    pub fn unsatisfiable(message: impl Into<String>) -> CenterError {
        CenterError::Unsatisfiable(message.into())
    }
    pub fn agent(message: impl Into<String>) -> CenterError {
        CenterError::Agent(message.into())
    }
    pub fn internal(message: impl Into<String>) -> CenterError {
        CenterError::Internal(message.into())
    }

    /// The message alone, for callers that fold it into their own text.
    pub fn message(&self) -> &str {
        match self {
            CenterError::Invalid(m)
            | CenterError::Unauthorized(m)
            | CenterError::Forbidden(m)
            | CenterError::NotFound(m)
            | CenterError::Conflict(m)
            | CenterError::Unsatisfiable(m)
            | CenterError::Agent(m)
            | CenterError::Internal(m)
            | CenterError::Unavailable(m) => m,
        }
    }

    pub fn into_message(self) -> String {
        match self {
            CenterError::Invalid(m)
            | CenterError::Unauthorized(m)
            | CenterError::Forbidden(m)
            | CenterError::NotFound(m)
            | CenterError::Conflict(m)
            | CenterError::Unsatisfiable(m)
            | CenterError::Agent(m)
            | CenterError::Internal(m)
            | CenterError::Unavailable(m) => m,
        }
    }

    pub fn vm_not_found(name: &str) -> CenterError {
        CenterError::not_found(format!("VM {name} does not exist: see tern vm list"))
    }
    pub fn host_not_found(name: &str) -> CenterError {
        CenterError::not_found(format!("host {name} is not registered: see tern host list"))
    }
    pub fn cluster_not_found(name: &str) -> CenterError {
        CenterError::not_found(format!(
            "cluster {name} does not exist: see tern cluster list"
        ))
    }
}

impl From<StoreError> for CenterError {
    fn from(e: StoreError) -> CenterError {
        match e {
            StoreError::NotFound(m) => CenterError::NotFound(m),
            StoreError::Conflict(m) => CenterError::Conflict(m),
            StoreError::Unprocessable(m) => CenterError::Unsatisfiable(m),
            StoreError::NotLeader(m) => CenterError::Unavailable(m),
            e @ StoreError::Shared(_) => CenterError::Unavailable(e.to_string()),
            other => CenterError::Internal(other.to_string()),
        }
    }
}
