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
//! | POST | /v1/migrations/{vm}/incoming | [`PrepareIncoming`] → [`IncomingReady`] (destination: QEMU `-incoming defer`, paused; with settings it also listens on the migration address for this migration only) |
//! | POST | /v1/migrations/{vm}/listen | [`ListenIncoming`] → [`IncomingReady`] (destination prepared without settings: configure it and listen) |
//! | POST | /v1/migrations/{vm}/outgoing | [`StartOutgoing`] → `()` (source: start streaming; stops paused at pre-switchover) |
//! | GET | /v1/migrations/{vm} | → [`AgentMigrationStatus`] |
//! | POST | /v1/migrations/{vm}/measure | [`MeasureDirtyRate`] → [`DirtyRateReport`] (source: the guest's dirty rate, QMP `calc-dirty-rate`) |
//! | POST | /v1/migrations/{vm}/steer | → [`AgentMigrationStatus`] (destination, while the source is paused at pre-switchover: still listening? then point the LAN at this host's taps; what was done is in `events`) |
//! | POST | /v1/migrations/{vm}/switchover | → [`AgentMigrationStatus`] (source: send the final state and answer once all is sent; the guest stays paused on both sides) |
//! | POST | /v1/migrations/{vm}/commit | [`Commit`] → `()` (destination: the center recorded it as owner — run the guest, announce its MAC) |
//! | POST | /v1/migrations/{vm}/abort | → `()` (source: cancel and resume the guest; destination: kill the incoming QEMU) |
//! | POST | /v1/migrations/{vm}/finish | → `()` (source, after commit: quit the paused QEMU and clean up; never resumes) |
//! | POST | /v1/bandwidth-sink | → [`BandwidthSink`] (destination: accept one probe connection on the migration address) |
//! | POST | /v1/bandwidth-probe | [`BandwidthProbe`] → [`BandwidthReport`] (source agent sends to the destination's probe port) |
//!
//! `GET /v1/migrations/{vm}?wait_ms=N` answers as soon as the state differs from
//! `?state=S` (or after N ms), so the center learns of pre-switchover without polling fast.

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
    /// Parallel multifd channels; 0 = a single migration stream (multifd off).
    pub multifd_channels: u32,
    /// `None` = unlimited.
    pub max_bandwidth_mib_s: Option<u64>,
    /// Downtime limit the migration starts with.
    pub downtime_limit_ms: u64,
    /// `multifd-compression`: "none" or "zstd".
    pub compression: String,
    pub auto_converge: bool,
    pub postcopy_allowed: bool,
    pub deadline_ms: u64,
    /// One line per decision: what and why.
    pub reasons: Vec<String>,
    /// Largest downtime limit the migration may be raised to when pre-copy stalls (the
    /// request's budget); 0 = no raise beyond `downtime_limit_ms`.
    #[serde(default)]
    pub downtime_budget_ms: u64,
    /// `zero-page-detection`: "multifd" (in the sender threads), "legacy" (main thread) or
    /// "none".
    #[serde(default = "default_zero_page_detection")]
    pub zero_page_detection: String,
    /// How auto-converge throttles the guest's vCPUs.
    #[serde(default)]
    pub throttle: ThrottlePlan,
}

fn default_zero_page_detection() -> String {
    "legacy".into()
}

/// Auto-converge parameters: QEMU slows the vCPUs when, over two bitmap syncs, the guest
/// dirtied more than `trigger_threshold_pct` % of what was sent, starting at `initial_pct`
/// and adding `increment_pct` each time it happens again, up to `max_pct`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ThrottlePlan {
    pub trigger_threshold_pct: u8,
    pub initial_pct: u8,
    pub increment_pct: u8,
    pub max_pct: u8,
}

impl Default for ThrottlePlan {
    /// QEMU's defaults.
    fn default() -> Self {
        ThrottlePlan {
            trigger_threshold_pct: 50,
            initial_pct: 20,
            increment_pct: 10,
            max_pct: 99,
        }
    }
}

/// Where a host's QEMU migration stands, as its agent reports it. The center's own stages
/// (pre-checks, measuring, committing…) are `tern_motion::Stage`, not phases of QEMU's run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MigrationPhase {
    /// Copying memory while the guest runs.
    PreCopy,
    /// Pre-copy with the guest's vCPUs throttled so the copy catches up.
    Throttling,
    /// The guest runs on the destination, which fetches the pages it lacks from the source.
    PostCopy,
    /// The guest is paused for the final copy of its state.
    Switchover,
    /// The migration is being cancelled; the source keeps the guest.
    RollingBack,
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
    /// vCPU throttle auto-converge applies now (0 = none).
    #[serde(default)]
    pub cpu_throttle_pct: u64,
    /// Downtime limit in force now.
    #[serde(default)]
    pub downtime_limit_ms: u64,
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
    /// Guest pause from the source stopping at pre-switchover until the destination was told
    /// to run it, as the center measured it (includes the commit).
    #[serde(default)]
    pub pause_ms: Option<u64>,
}

/// Destination: prepare an incoming QEMU for this VM.
///
/// Without `settings` the QEMU only starts (paused, `-incoming defer`): the center starts it
/// while it measures the guest and the link, then sends the settings with [`ListenIncoming`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PrepareIncoming {
    pub spec: VmSpec,
    /// Generation the destination will own the VM under once committed.
    pub generation: u64,
    #[serde(default)]
    pub settings: Option<MigrationSettings>,
}

/// Destination: the settings of a migration prepared without them; configure and listen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ListenIncoming {
    pub settings: MigrationSettings,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct IncomingReady {
    /// QEMU migration URI the source must connect to, e.g. `tcp:10.77.0.12:49152`; `None`
    /// while the destination is started but not listening yet (prepared without settings).
    pub uri: Option<String>,
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
    /// Bytes sent (source, once completed).
    #[serde(default)]
    pub bytes: Option<u64>,
    /// Dirty-bitmap syncs (source, once completed).
    #[serde(default)]
    pub passes: Option<u64>,
    /// Source: how long the guest waited paused at pre-switchover until all was sent.
    #[serde(default)]
    pub paused_ms: Option<u64>,
    /// Source: the migration went post-copy, so the source's memory is no longer the whole
    /// guest and it can never resume — the only way left is forward.
    #[serde(default)]
    pub postcopy: bool,
}

impl AgentMigrationStatus {
    /// A status with nothing known yet but its state.
    pub fn new(vm: Uuid, state: AgentMigrationState) -> AgentMigrationStatus {
        AgentMigrationStatus {
            vm,
            state,
            progress: None,
            downtime_ms: None,
            setup_ms: None,
            total_ms: None,
            error: None,
            events: Vec::new(),
            bytes: None,
            passes: None,
            paused_ms: None,
            postcopy: false,
        }
    }
}

/// Source: measure the guest's dirty rate over `duration_ms` (50 ms to 60 s).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MeasureDirtyRate {
    pub duration_ms: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DirtyRateReport {
    pub dirty_rate_mib_s: f64,
    pub duration_ms: u32,
}

/// Destination: where the bandwidth probe must send (`IP:PORT` on the migration address).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BandwidthSink {
    pub address: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Commit {
    pub generation: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BandwidthProbe {
    /// The destination's probe sink, `IP:PORT` ([`BandwidthSink::address`]).
    pub to_migration_address: String,
    /// Most bytes to send (the probe also stops after a quarter of a second).
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BandwidthReport {
    /// Bytes the rate is computed from: those that arrived after the sink's warm-up (slow
    /// start and a shaper's burst left out), or all of them when the window was too short.
    pub bytes: u64,
    /// The time those bytes took to arrive.
    pub elapsed_ms: u64,
    pub mbit_s: f64,
}
