//! Errors of tern-cpu: every refusal names the model, host, VM and features involved.

use thiserror::Error;

/// Why a CPU compatibility question was answered "no" (or could not be answered).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CpuError {
    #[error("unknown CPU model {name:?}; known models: {known}")]
    UnknownModel { name: String, known: String },

    #[error("cannot read QEMU's CPU model expansion: {0}")]
    Expansion(String),

    #[error(
        "CPU ceiling {ceiling} is a {ceiling_vendor} model but this host's CPU is {host_vendor}; \
         pick a ceiling of the host's vendor or an x86-64 level"
    )]
    CeilingVendor {
        ceiling: String,
        ceiling_vendor: String,
        host_vendor: String,
    },

    /// Intel and AMD never mix: a vendor model on the other vendor's host, or a host of the
    /// other vendor joining a cluster.
    #[error("{subject} is {found} but {required} is required: Intel and AMD never mix")]
    VendorMismatch {
        subject: String,
        found: String,
        required: String,
    },

    #[error("{subject} lacks features of {target}: {}", list(missing))]
    MissingFeatures {
        subject: String,
        target: String,
        missing: Vec<String>,
    },

    #[error("cannot set EVC mode {mode}: {}", hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>().join("; "))]
    HostsLackMode {
        mode: String,
        hosts: Vec<HostMissing>,
    },

    #[error(
        "cannot set EVC mode {mode}: powered-on VMs use features above it ({}); power them off \
         or move them out of the cluster first",
        vms.iter().map(|v| v.to_string()).collect::<Vec<_>>().join("; ")
    )]
    VmsAboveMode { mode: String, vms: Vec<VmExtra> },

    #[error(
        "CPU model {model} has features above the cluster's EVC mode {mode}: {}; pick a model \
         the mode contains",
        list(extra)
    )]
    ModelAboveMode {
        model: String,
        mode: String,
        extra: Vec<String>,
    },

    #[error(
        "host-passthrough is not allowed in a cluster with EVC mode {mode}: the VM would see \
         features above the mode"
    )]
    PassthroughWithMode { mode: String },

    #[error(
        "a host-passthrough VM migrates only to a host with an identical CPU; {host} differs: {}",
        list(differences)
    )]
    PassthroughNotIdentical {
        host: String,
        differences: Vec<String>,
    },

    #[error("the VM runs under {vm}, {host} runs guests under {dest}: QEMU cannot migrate between accelerators")]
    AccelMismatch {
        host: String,
        vm: String,
        dest: String,
    },
}

/// One host that lacks features of a mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostMissing {
    pub host: String,
    /// Missing features, or a vendor mismatch as `vendor <name>`.
    pub missing: Vec<String>,
}

impl std::fmt::Display for HostMissing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "host {} lacks {}", self.host, list(&self.missing))
    }
}

/// One powered-on VM that uses features a new mode lacks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmExtra {
    pub vm: String,
    pub features: Vec<String>,
}

impl std::fmt::Display for VmExtra {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VM {} uses {}", self.vm, list(&self.features))
    }
}

pub(crate) fn list(items: &[String]) -> String {
    items.join(", ")
}
