//! Live migration: the request a user makes, the settings tern chooses, progress, the result
//! record, and the calls the center makes to the two agents.
//!
//! Center (user-facing):
//!
//! | method | path | body → answer |
//! | --- | --- | --- |
//! | POST | /api/v1/vms/{name}/migrate | [`MigrateVm`] → [`crate::center::Task`] (kind `vm_migrate`; its `result` is a [`MigrationResult`] when done) |
//!
//! Agents (center-only), one migration per VM at a time:
//!
//! | method | path | body → answer |
//! | --- | --- | --- |
//! | POST | /v1/migrations/{vm}/incoming | [`PrepareIncoming`] → [`IncomingReady`] (destination: QEMU `-incoming defer`, paused, listening on the migration address for this migration only) |
//! | POST | /v1/migrations/{vm}/outgoing | [`StartOutgoing`] → `()` (source: start streaming; stops paused at pre-switchover) |
//! | GET | /v1/migrations/{vm} | → [`AgentMigrationStatus`] |
//! | POST | /v1/migrations/{vm}/switchover | → `()` (source: send the final state; the guest stays paused on both sides) |
//! | POST | /v1/migrations/{vm}/commit | [`Commit`] → `()` (destination: the center recorded it as owner — run the guest, announce its MAC) |
//! | POST | /v1/migrations/{vm}/abort | → `()` (source: cancel and resume the guest; destination: kill the incoming QEMU) |
//! | POST | /v1/migrations/{vm}/finish | → `()` (source, after commit: quit the paused QEMU and clean up; never resumes) |
//! | POST | /v1/bandwidth-probe | [`BandwidthProbe`] → [`BandwidthReport`] (source agent sends to the destination's probe port) |

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::spec::VmSpec;

/// A user's request to move a VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MigrateVm {
    /// Destination host name.
    pub to: String,
    /// Largest pause the guest may see (default 300 ms).
    #[serde(default)]
    pub downtime_ms: Option<u64>,
    /// Give up (and leave the VM on the source) after this long; default scales with memory.
    #[serde(default)]
    pub deadline_ms: Option<u64>,
    /// Cap on the migration stream's bandwidth, in Mbit/s.
    #[serde(default)]
    pub bandwidth_mbit: Option<u64>,
    /// Allow switching to post-copy when pre-copy cannot converge.
    #[serde(default)]
    pub allow_postcopy: bool,
    /// Run the pre-checks only (nothing moves).
    #[serde(default)]
    pub dry_run: bool,
}

/// What tern measured before choosing settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Measurements {
    pub memory_mib: u64,
    /// Guest dirty rate from QMP `calc-dirty-rate`.
    pub dirty_rate_mib_s: f64,
    /// Usable bandwidth of the migration link, measured between the two agents.
    pub link_mbit: f64,
}

/// The settings tern chose, each with the reason.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MigrationSettings {
    pub multifd_channels: u32,
    /// `None` = unlimited.
    pub max_bandwidth_mib_s: Option<u64>,
    pub downtime_limit_ms: u64,
    /// `multifd-compression`: "none" or "zstd".
    pub compression: String,
    pub auto_converge: bool,
    pub postcopy_allowed: bool,
    pub deadline_ms: u64,
    /// One line per decision: what and why.
    pub reasons: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MigrationPhase {
    Prechecks,
    PreparingDestination,
    Measuring,
    PreCopy,
    Throttling,
    PostCopy,
    Switchover,
    Committing,
    CleaningUp,
    RollingBack,
    Done,
}

/// Live figures of a running migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MigrationProgress {
    pub phase: MigrationPhase,
    /// Pre-copy pass (QEMU's dirty-sync-count).
    pub pass: u64,
    pub transferred_bytes: u64,
    pub remaining_bytes: u64,
    pub total_bytes: u64,
    pub mbit_s: f64,
    pub dirty_rate_mib_s: f64,
    pub expected_downtime_ms: u64,
    pub elapsed_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MigrationOutcome {
    /// The VM runs on the destination.
    Completed,
    /// The VM runs on the source, as before.
    RolledBack,
}

/// The record of a finished migration (a `vm_migrate` task's `result`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MigrationResult {
    pub task: Uuid,
    pub vm: String,
    pub from: String,
    pub to: String,
    pub status: MigrationOutcome,
    pub total_ms: u64,
    /// Guest pause as QEMU measured it.
    pub downtime_ms: u64,
    pub setup_ms: u64,
    pub bytes: u64,
    pub passes: u64,
    pub settings: MigrationSettings,
    pub measurements: Measurements,
    /// Why it rolled back, if it did.
    pub error: Option<String>,
}

/// Destination: prepare an incoming QEMU for this VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PrepareIncoming {
    pub spec: VmSpec,
    /// Generation the destination will own the VM under once committed.
    pub generation: u64,
    pub settings: MigrationSettings,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct IncomingReady {
    /// QEMU migration URI the source must connect to, e.g. `tcp:10.77.0.12:49152`.
    pub uri: String,
}

/// Source: start streaming to the destination.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StartOutgoing {
    pub uri: String,
    pub settings: MigrationSettings,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AgentMigrationState {
    /// Destination: listening, guest not yet received.
    Listening,
    /// Source: pre-copy running.
    Active,
    /// Source: guest paused, final state not yet sent; waiting for `switchover`.
    PreSwitchover,
    /// Source: all state sent; destination: all state received, guest paused.
    Completed,
    /// Destination: guest running after commit.
    Running,
    Failed,
    Cancelled,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AgentMigrationStatus {
    pub vm: Uuid,
    pub state: AgentMigrationState,
    pub progress: Option<MigrationProgress>,
    /// QEMU's own figures once known.
    pub downtime_ms: Option<u64>,
    pub setup_ms: Option<u64>,
    pub total_ms: Option<u64>,
    pub error: Option<String>,
    /// Decisions taken while running (escalations), each with its reason.
    pub events: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Commit {
    pub generation: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BandwidthProbe {
    /// Destination agent URL whose probe port to send to.
    pub to_migration_address: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BandwidthReport {
    pub bytes: u64,
    pub elapsed_ms: u64,
    pub mbit_s: f64,
}
