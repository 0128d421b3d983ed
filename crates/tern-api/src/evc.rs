//! EVC (CPU compatibility) in the center's API: a host's CPU capability, a VM's recorded CPU,
//! cluster EVC modes and the migration dry run.
//!
//! | method | path | body → answer |
//! | --- | --- | --- |
//! | POST | /api/v1/clusters/{name}/evc | [`SetEvcMode`] → [`EvcModeChange`] |
//! | GET | /api/v1/clusters/{name}/evc-modes | → [`EvcModes`] |
//! | GET | /api/v1/vms/{name}/can-migrate | `?to=HOST` → [`MigrationCheckReport`] (a dry run: nothing moves) |

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::spec::Accelerator;

/// What QEMU's `host` (KVM) or `max` (TCG) CPU model gives guests on a host: the input of the
/// center's EVC checks (with [`crate::HostFacts::cpu_capability`] and `cpu_ceiling`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HostCpu {
    /// CPUID vendor string of that model (`GenuineIntel`, `AuthenticAMD`); under KVM the
    /// physical CPU's.
    #[serde(default)]
    pub vendor: Option<String>,
    #[serde(default)]
    pub family: u32,
    #[serde(default)]
    pub model: u32,
    #[serde(default)]
    pub stepping: u32,
    #[serde(default)]
    pub model_id: String,
    /// Features before the `--cpu-ceiling` cut (QEMU names).
    #[serde(default)]
    pub uncapped: Vec<String>,
    /// Catalogue baselines the host can run (after its ceiling), in catalogue order.
    #[serde(default)]
    pub supported_baselines: Vec<String>,
    /// The most capable of those.
    #[serde(default)]
    pub best_baseline: Option<String>,
}

/// How a VM's CPU was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VmCpuSource {
    /// The cluster's EVC mode (the VM names no model).
    ClusterMode,
    /// The default baseline: the VM names no model and the cluster has no mode.
    Default,
    /// A model the VM names.
    Named,
    /// The host's whole CPU: migrates only to a host with an identical CPU.
    HostPassthrough,
}

/// The CPU a VM runs with: resolved when it is created, recorded again at each power-on, and
/// checked against every migration destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmCpuRecord {
    pub source: VmCpuSource,
    /// Baseline name, or `host-passthrough`.
    pub model: String,
    /// QEMU's `-cpu` argument (the same on a migration destination).
    pub qemu_cpu: String,
    /// The exact features the guest sees (besides the accelerator's fixed additions).
    pub features: Vec<String>,
    pub accelerator: Accelerator,
    /// The vendor the guest sees when the host fixes it (KVM).
    #[serde(default)]
    pub guest_vendor: Option<String>,
    /// Host it was resolved on.
    pub host: String,
    /// True once the VM powered on with it (false: resolved at creation, not started since).
    pub powered_on: bool,
}

/// Sets (or clears, with `mode: null`) a cluster's EVC mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetEvcMode {
    /// Catalogue baseline name (`x86-64-v2`, `Haswell`…); `None` clears the mode.
    #[serde(default)]
    pub mode: Option<String>,
}

/// Which way a mode change went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EvcChangeKind {
    Unchanged,
    Set,
    Clear,
    Raise,
    Lower,
    Sideways,
}

/// A mode change the center made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EvcModeChange {
    pub cluster: String,
    pub kind: EvcChangeKind,
    pub from: Option<String>,
    pub to: Option<String>,
    /// Powered-on VMs that take their CPU from the cluster's mode: they keep the features they
    /// started with until they are powered off and on again.
    pub vms_keep_features_until_power_cycle: Vec<String>,
    /// One human sentence on what the change means for running VMs.
    pub note: String,
}

/// One host's view of the catalogue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HostEvc {
    pub host: String,
    pub ceiling: Option<String>,
    /// Most capable baseline the host runs; `None` if it reported no CPU capability.
    pub best: Option<String>,
    pub supported: Vec<String>,
}

/// The EVC modes a cluster can have.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EvcModes {
    pub cluster: String,
    pub current: Option<String>,
    /// Modes every host of the cluster supports, in catalogue order.
    pub modes: Vec<String>,
    /// The most capable of those.
    pub best: Option<String>,
    pub hosts: Vec<HostEvc>,
    /// Hosts that reported no CPU capability (their agent could not probe QEMU): they are
    /// left out of `modes`.
    #[serde(default)]
    pub unknown_hosts: Vec<String>,
}

/// What a migration pre-check judges. The dry run (`can-migrate`), DRS and maintenance run
/// the host-side ones; a migration adds the ones about its source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CheckKind {
    /// The VM can move now: running, no other task acting on it.
    State,
    /// The destination takes VMs: connected, not in maintenance, another host than the source.
    Host,
    /// The destination has cores enough for the VM's vCPUs.
    Vcpus,
    /// The destination has the VM's memory free.
    Memory,
    /// The destination sees the VM's disks (shared storage).
    Storage,
    /// The destination runs the VM's CPU (EVC).
    Cpu,
    /// The source host's agent is connected.
    Source,
    /// The destination's QEMU loads the source's stream.
    Qemu,
    /// The VM's MAC is not live anywhere else.
    Mac,
    /// The stream can be encrypted as the cluster's policy asks.
    Encryption,
    /// The destination enforces the VM's resource policy (shares, reservations, limits).
    Resources,
    /// Running on the destination keeps the cluster's must and anti-affinity rules.
    Rules,
}

impl CheckKind {
    /// The name used on the wire and in messages (`state`, `host`…).
    pub fn name(self) -> &'static str {
        match self {
            CheckKind::State => "state",
            CheckKind::Host => "host",
            CheckKind::Vcpus => "vcpus",
            CheckKind::Memory => "memory",
            CheckKind::Storage => "storage",
            CheckKind::Cpu => "cpu",
            CheckKind::Source => "source",
            CheckKind::Qemu => "qemu",
            CheckKind::Mac => "mac",
            CheckKind::Encryption => "encryption",
            CheckKind::Resources => "resources",
            CheckKind::Rules => "rules",
        }
    }

    /// Judges the VM or its source, not the destination: placement across hosts ignores it.
    pub fn about_the_vm(self) -> bool {
        matches!(self, CheckKind::State | CheckKind::Source | CheckKind::Mac)
    }
}

impl std::fmt::Display for CheckKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.name())
    }
}

/// One pre-check of a migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MigrationCheck {
    pub check: CheckKind,
    pub ok: bool,
    /// What was found (and, when it failed, what to do).
    pub detail: String,
}

/// The pre-checks of moving a VM to a host, each with its result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MigrationCheckReport {
    pub vm: String,
    pub from: Option<String>,
    pub to: String,
    /// True when every check passed.
    pub ok: bool,
    pub checks: Vec<MigrationCheck>,
}

impl MigrationCheckReport {
    /// The failed checks as `kind: detail`, for a one-line reason.
    pub fn failures(&self) -> Vec<String> {
        self.checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| format!("{}: {}", c.check, c.detail))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_kinds_keep_their_wire_names() {
        for k in [
            CheckKind::State,
            CheckKind::Host,
            CheckKind::Vcpus,
            CheckKind::Memory,
            CheckKind::Storage,
            CheckKind::Cpu,
            CheckKind::Source,
            CheckKind::Qemu,
            CheckKind::Mac,
        ] {
            let wire = serde_json::to_string(&k).expect("serialize");
            assert_eq!(wire, format!("\"{}\"", k.name()));
            assert_eq!(serde_json::from_str::<CheckKind>(&wire).expect("parse"), k);
        }
    }
}
