//! Host health: the hardware and pressure counters an agent reports with each heartbeat,
//! what the center concludes from them, and the cluster's proactive mode (what it does about
//! a degraded host).
//!
//! The agent reports raw counters only; the center judges them against the counters it saw
//! when it first heard of the host (or when an operator last restored it), so errors that
//! predate tern, or that an operator has already dealt with, degrade nothing.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Counters an agent reads on its host; `None` where the host has no such source (no EDAC
/// driver, a virtual disk without an error counter…).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HealthReport {
    /// Corrected memory errors (EDAC `ce_count`, summed over the memory controllers).
    #[serde(default)]
    pub memory_corrected: Option<u64>,
    /// Uncorrected memory errors (EDAC `ue_count`).
    #[serde(default)]
    pub memory_uncorrected: Option<u64>,
    /// Machine-check exceptions (`MCE` of /proc/interrupts, all CPUs).
    #[serde(default)]
    pub machine_checks: Option<u64>,
    /// I/O errors of the disk holding the VMs' storage (the SCSI `ioerr_cnt`).
    #[serde(default)]
    pub disk_errors: Option<u64>,
    /// Receive and transmit errors of the interface carrying migrations.
    #[serde(default)]
    pub nic_errors: Option<u64>,
    /// CPU time stolen from the host by its own hypervisor over the last sample, percent.
    #[serde(default)]
    pub cpu_steal_percent: f64,
    /// Runnable threads per core (the 1-minute load average ÷ cores).
    #[serde(default)]
    pub run_queue_per_core: f64,
}

/// What made a host degraded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HealthSignal {
    MemoryUncorrected,
    MemoryCorrected,
    MachineCheck,
    DiskErrors,
    NicErrors,
    /// Heartbeats that came late or not at all, and disconnections.
    MissedHeartbeats,
    /// QEMU processes that exited without being asked.
    QemuCrashes,
    /// CPU steal or run queue far above the cluster's other hosts (an underperforming host).
    CpuPressure,
    /// An operator marked the host degraded.
    Operator,
}

impl std::fmt::Display for HealthSignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HealthSignal::MemoryUncorrected => "uncorrected memory errors",
            HealthSignal::MemoryCorrected => "corrected memory errors",
            HealthSignal::MachineCheck => "machine-check exceptions",
            HealthSignal::DiskErrors => "disk I/O errors",
            HealthSignal::NicErrors => "network interface errors",
            HealthSignal::MissedHeartbeats => "missed heartbeats",
            HealthSignal::QemuCrashes => "QEMU crashes",
            HealthSignal::CpuPressure => "CPU pressure",
            HealthSignal::Operator => "marked by an operator",
        })
    }
}

/// One reason a host is degraded: the signal and what was seen, e.g. "uncorrected memory
/// errors: 0 → 1 (limit 1)".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HealthFinding {
    pub signal: HealthSignal,
    pub detail: String,
    pub at: DateTime<Utc>,
}

impl std::fmt::Display for HealthFinding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.signal, self.detail)
    }
}

/// A host's health as the center judges it. Degradation is sticky: failing hardware does
/// not heal by itself, so only an operator's restore (after the repair) clears it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HostHealth {
    /// Why the host is degraded; empty when it is healthy.
    #[serde(default)]
    pub degraded: Vec<HealthFinding>,
    /// Signals seen while the cluster's proactive mode is off: shown, acted on by nothing.
    #[serde(default)]
    pub ignored: Vec<HealthFinding>,
    /// The counters of the last heartbeat.
    #[serde(default)]
    pub report: Option<HealthReport>,
}

impl HostHealth {
    pub fn is_degraded(&self) -> bool {
        !self.degraded.is_empty()
    }

    /// The findings, one line ("" when healthy).
    pub fn summary(&self) -> String {
        self.degraded
            .iter()
            .map(|f| f.to_string())
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// What a cluster does with a degraded host (like vSphere Proactive HA). Whatever the mode,
/// a degraded host takes no new VMs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ProactiveMode {
    /// Health signals are shown but degrade nothing; only an operator marks a host degraded.
    #[default]
    Off,
    /// A signal degrades the host and the center recommends emptying it (an event names the
    /// signal and the command); its VMs stay until an operator moves them.
    Recommend,
    /// A signal degrades the host and the center empties it live at once.
    Automatic,
}

impl std::fmt::Display for ProactiveMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ProactiveMode::Off => "off",
            ProactiveMode::Recommend => "recommend",
            ProactiveMode::Automatic => "automatic",
        })
    }
}

impl std::str::FromStr for ProactiveMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(ProactiveMode::Off),
            "recommend" => Ok(ProactiveMode::Recommend),
            "automatic" => Ok(ProactiveMode::Automatic),
            _ => Err(format!(
                "unknown proactive mode {s:?}: use off, recommend or automatic"
            )),
        }
    }
}

/// Body of `PUT /api/v1/hosts/{name}/health`: an operator marks the host degraded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DegradeHost {
    /// Why, for the event log and `tern host show` (1–200 printable characters).
    pub reason: String,
}

/// Checks an operator's reason: printable, one line, 1–200 characters.
pub fn valid_reason(reason: &str) -> bool {
    let n = reason.chars().count();
    (1..=200).contains(&n) && reason.chars().all(|c| !c.is_control())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_print() {
        for m in [
            ProactiveMode::Off,
            ProactiveMode::Recommend,
            ProactiveMode::Automatic,
        ] {
            assert_eq!(m.to_string().parse::<ProactiveMode>(), Ok(m));
        }
        assert!("auto".parse::<ProactiveMode>().is_err());
    }

    #[test]
    fn reasons() {
        assert!(valid_reason("fan 3 failing"));
        assert!(!valid_reason(""));
        assert!(!valid_reason("two\nlines"));
        assert!(!valid_reason(&"x".repeat(201)));
    }
}
