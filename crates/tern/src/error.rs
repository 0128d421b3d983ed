//! Exit codes scripts can trust, and the CLI's error that carries one with a next step.

use std::fmt;

use tern_api::ApiError;

/// Exit codes of the `tern` CLI (0 is success). Documented in `tern --help`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    /// The operation failed, or the server failed (5xx).
    Failed = 1,
    /// The command line is wrong (clap also exits with 2).
    Usage = 2,
    /// The object named does not exist (404).
    NotFound = 3,
    /// The center refused the request (4xx other than 404, including 401).
    Refused = 4,
    /// The center cannot be reached (nothing configured, connection refused, timeout).
    Unreachable = 5,
}

impl ExitKind {
    pub fn code(self) -> u8 {
        self as u8
    }
}

/// An error the CLI prints (message, then what to do next) before exiting with its code.
#[derive(Debug)]
pub struct CliError {
    pub kind: ExitKind,
    pub message: String,
    pub hint: Option<String>,
}

impl CliError {
    pub fn new(kind: ExitKind, message: impl Into<String>) -> Self {
        CliError {
            kind,
            message: message.into(),
            hint: None,
        }
    }

    pub fn usage(message: impl Into<String>) -> Self {
        Self::new(ExitKind::Usage, message)
    }

    pub fn failed(message: impl Into<String>) -> Self {
        Self::new(ExitKind::Failed, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ExitKind::NotFound, message)
    }

    /// Adds (or replaces) the "what to do next" line.
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Adds a hint unless the message already names a `tern` command to run.
    pub fn hint_unless_told(self, hint: impl Into<String>) -> Self {
        if self.message.contains("tern ") {
            self
        } else {
            self.hint(hint)
        }
    }

    /// Maps an API error to an exit code and a generic next step; `list_cmd` is the command
    /// that lists what exists, suggested when the object is not found.
    pub fn from_api(e: ApiError, list_cmd: &str) -> Self {
        match e {
            ApiError::Status { status, message } => match status {
                404 => CliError::not_found(message)
                    .hint_unless_told(format!("see what exists with `{list_cmd}`")),
                401 => CliError::new(ExitKind::Refused, format!("{message} (HTTP 401)")).hint(
                    "pass the center's admin token with --token or TERN_TOKEN \
                     (a lab's is in <lab dir>/admin.token)",
                ),
                400..=499 => CliError::new(ExitKind::Refused, format!("{message} (HTTP {status})")),
                _ => CliError::failed(format!("the center failed: {message} (HTTP {status})"))
                    .hint("see the center's log (a lab's is <lab dir>/logs/center.log)"),
            },
            ApiError::Transport { endpoint, source } => CliError::new(
                ExitKind::Unreachable,
                format!(
                    "cannot reach the center at {endpoint}: {}",
                    tern_api::error::error_chain(&source)
                ),
            )
            .hint(
                "is it running? Point --center / TERN_CENTER at it, or check the lab with \
                 `tern lab status`",
            ),
            ApiError::Tls { detail } => {
                CliError::new(ExitKind::Unreachable, format!("TLS: {detail}"))
                    .hint("trust the cluster's CA once with `tern trust URL`, or pass --ca FILE")
            }
            ApiError::BadName(e) => CliError::usage(e.to_string()),
            ApiError::Decode { endpoint, detail } => {
                CliError::failed(format!("unexpected answer from {endpoint}: {detail}"))
                    .hint("the center may run a different tern version than this CLI")
            }
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CliError {}

/// A name given on the command line that cannot be a path segment.
impl From<tern_api::routes::BadName> for CliError {
    fn from(e: tern_api::routes::BadName) -> Self {
        CliError::usage(e.to_string())
    }
}

impl From<anyhow::Error> for CliError {
    fn from(e: anyhow::Error) -> Self {
        match e.downcast::<CliError>() {
            Ok(c) => c,
            Err(e) => CliError::failed(format!("{e:#}")),
        }
    }
}

/// `Result<T, ApiError>` → `Result<T, CliError>` with the listing command to suggest on 404.
pub trait ApiResultExt<T> {
    fn or_list(self, list_cmd: &str) -> Result<T, CliError>;
}

impl<T> ApiResultExt<T> for Result<T, ApiError> {
    fn or_list(self, list_cmd: &str) -> Result<T, CliError> {
        self.map_err(|e| CliError::from_api(e, list_cmd))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(status: u16) -> ApiError {
        ApiError::Status {
            status,
            message: "m".into(),
        }
    }

    #[test]
    fn api_errors_map_to_exit_codes() {
        assert_eq!(
            CliError::from_api(status(404), "x").kind,
            ExitKind::NotFound
        );
        assert_eq!(CliError::from_api(status(401), "x").kind, ExitKind::Refused);
        assert_eq!(CliError::from_api(status(409), "x").kind, ExitKind::Refused);
        assert_eq!(CliError::from_api(status(422), "x").kind, ExitKind::Refused);
        assert_eq!(CliError::from_api(status(500), "x").kind, ExitKind::Failed);
        let d = ApiError::Decode {
            endpoint: "e".into(),
            detail: "d".into(),
        };
        assert_eq!(CliError::from_api(d, "x").kind, ExitKind::Failed);
    }

    #[test]
    fn anyhow_keeps_cli_errors() {
        let e: anyhow::Error = CliError::not_found("gone").into();
        assert_eq!(CliError::from(e).kind, ExitKind::NotFound);
        let e = anyhow::anyhow!("boom");
        assert_eq!(CliError::from(e).kind, ExitKind::Failed);
    }
}
