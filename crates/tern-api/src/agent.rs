//! A host agent's API (`/v1`), called by the center only, with the agent's token.
//!
//! | method | path | body → answer |
//! | --- | --- | --- |
//! | GET | /v1/facts | → [`HostFacts`] |
//! | GET | /v1/load | → [`HostLoad`] |
//! | GET | /v1/vms | → `Vec<VmRuntime>` |
//! | GET | /v1/vms/{id} | → [`VmRuntime`] |
//! | PUT | /v1/vms/{id} | [`StartVm`] → [`VmRuntime`] (starts it; idempotent if running with the same spec) |
//! | POST | /v1/vms/{id}/stop | [`crate::center::StopVm`] → [`VmRuntime`] |
//! | POST | /v1/vms/{id}/pause, /resume | → [`VmRuntime`] |
//! | DELETE | /v1/vms/{id} | → `()` (kills if running, removes its runtime files) |
//! | GET | /v1/vms/{id}/console | `?bytes=N` → text/plain |
//! | POST | /v1/check-paths | [`CheckPaths`] → [`PathsReport`] (the center validates a VM's files before accepting it) |

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::spec::{Accelerator, PowerState, VmSpec};
pub use crate::spec::{HostFacts, HostLoad};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartVm {
    pub spec: VmSpec,
    /// Ownership generation the center grants this host for the VM.
    pub generation: u64,
}

/// A VM as its host sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmRuntime {
    pub id: Uuid,
    pub spec: VmSpec,
    pub generation: u64,
    pub state: PowerState,
    pub pid: Option<u32>,
    pub accelerator: Accelerator,
    /// Why the process ended, when it did on its own.
    pub exit_reason: Option<String>,
    /// Host-side path of the serial console log.
    pub console_log: String,
    pub taps: Vec<String>,
    /// The VM's CPU cgroup directory, while its QEMU runs on a host with resource control.
    #[serde(default)]
    pub cgroup: Option<String>,
}

/// Asks an agent whether files a VM spec names exist on that host and lie on its shared storage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckPaths {
    pub paths: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PathsReport {
    /// Paths that do not exist (or are not regular files) on the host.
    pub missing: Vec<String>,
    /// Paths that exist but are not under the host's shared storage.
    pub outside_shared_storage: Vec<String>,
    /// iSCSI LUNs (`iscsi://…`) whose portal this host cannot reach, each with the reason.
    #[serde(default)]
    pub unreachable: Vec<String>,
}
