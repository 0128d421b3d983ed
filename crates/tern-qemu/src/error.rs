//! The errors of the QEMU driver: what failed, with the detail needed to act on it.

use std::path::PathBuf;

/// Result of every fallible operation of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Error class of a failed QMP command, as QEMU names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QmpErrorClass {
    GenericError,
    CommandNotFound,
    DeviceNotActive,
    DeviceNotFound,
    KvmMissingCap,
    /// A class this crate does not know (QEMU may add some).
    Other(String),
}

impl QmpErrorClass {
    pub fn parse(class: &str) -> Self {
        match class {
            "GenericError" => Self::GenericError,
            "CommandNotFound" => Self::CommandNotFound,
            "DeviceNotActive" => Self::DeviceNotActive,
            "DeviceNotFound" => Self::DeviceNotFound,
            "KVMMissingCap" => Self::KvmMissingCap,
            other => Self::Other(other.to_string()),
        }
    }
}

impl std::fmt::Display for QmpErrorClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::GenericError => "GenericError",
            Self::CommandNotFound => "CommandNotFound",
            Self::DeviceNotActive => "DeviceNotActive",
            Self::DeviceNotFound => "DeviceNotFound",
            Self::KvmMissingCap => "KVMMissingCap",
            Self::Other(s) => s,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `--accel kvm` was asked for on a host that cannot give it.
    #[error("KVM was requested but is not usable: {0}; use accel auto or tcg")]
    KvmUnavailable(String),
    /// The launch configuration is inconsistent (checked before QEMU is started).
    #[error("invalid VM configuration: {0}")]
    Config(String),
    /// A file the VM needs (kernel, initrd, disk image) is missing or unreadable.
    #[error("{what} {path} cannot be opened: {source}")]
    MissingFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// QEMU refused to start; `stderr_tail` is the end of what it printed.
    #[error("QEMU failed to start ({status}): {stderr_tail}")]
    Launch { status: String, stderr_tail: String },
    /// A QEMU process already runs from this run directory.
    #[error("QEMU (pid {pid}) is already running from {run_dir}")]
    AlreadyRunning { pid: u32, run_dir: PathBuf },
    /// No live QEMU could be found for a run directory (adopt).
    #[error("no running QEMU for {run_dir}: {detail}")]
    NotRunning { run_dir: PathBuf, detail: String },
    /// QEMU answered a QMP command with an error.
    #[error("QMP command `{command}` failed: {class}: {desc}")]
    Qmp {
        command: String,
        class: QmpErrorClass,
        desc: String,
    },
    /// The QMP connection is closed (QEMU exited, or the socket was shut).
    #[error("QMP connection closed (QEMU exited?)")]
    QmpClosed,
    /// QEMU sent something that is not QMP.
    #[error("QMP protocol error: {0}")]
    Protocol(String),
    /// A migration failed, was cancelled, or cannot do what was asked in its state.
    #[error("migration: {0}")]
    Migration(String),
    #[error("timed out after {timeout_ms} ms waiting for {what}")]
    Timeout { what: String, timeout_ms: u64 },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// QMP error class, when QEMU refused a command.
    pub fn qmp_class(&self) -> Option<&QmpErrorClass> {
        match self {
            Error::Qmp { class, .. } => Some(class),
            _ => None,
        }
    }
}
