//! What the center remembers over time, for charts: each host's load over the last hour, each
//! cluster's DRS imbalance over the last hour, and each migration's pre-copy passes.
//!
//! Host load and imbalance are kept in the center's memory only (a restarted center starts
//! them again: they are for looking at, not for deciding); a migration's samples are stored
//! with its task, so its timeline can be drawn after it ended.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// A host's load at one moment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LoadSample {
    pub at: DateTime<Utc>,
    /// CPU busy, percent of all cores (0–100).
    pub cpu_percent: f64,
    /// Memory in use, percent of the host's memory (0–100).
    pub memory_used_percent: f64,
}

/// `GET /api/v1/hosts/{name}/load-history`: the last hour, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HostLoadHistory {
    pub host: String,
    /// Time between samples (the center keeps one per period per host).
    pub period_ms: u64,
    pub samples: Vec<LoadSample>,
}

/// A cluster's balance at one moment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ImbalanceSample {
    pub at: DateTime<Utc>,
    /// The DRS engine's imbalance of the cluster as it was.
    pub imbalance: f64,
    /// The imbalance the engine's recommended moves would leave at the cluster's threshold
    /// (the target it works towards).
    pub target: f64,
    /// Moves the engine recommended.
    pub moves: u32,
}

/// `GET /api/v1/clusters/{name}/drs/history`: the last hour, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DrsHistory {
    pub cluster: String,
    pub period_ms: u64,
    /// The cluster's DRS threshold now (1–5).
    pub threshold: u8,
    pub samples: Vec<ImbalanceSample>,
}

/// One reading of a migration's pre-copy, as the center saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MigrationSample {
    /// Since the migration task started.
    pub at_ms: u64,
    /// Pre-copy pass (QEMU's dirty-sync count).
    pub pass: u64,
    pub transferred_bytes: u64,
    pub remaining_bytes: u64,
    /// Link rate of the copy.
    pub mbit_s: f64,
    /// How fast the guest dirties memory.
    pub dirty_rate_mib_s: f64,
    /// The pause QEMU expects if it switched over now.
    pub expected_downtime_ms: u64,
    /// vCPU throttle applied (auto-converge), percent.
    pub throttle_percent: u64,
}

/// `GET /api/v1/tasks/{id}/timeline`: a migration task's pre-copy readings, oldest first, and
/// once it switched over, where its pause fell and how long it was.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MigrationTimeline {
    pub task: Uuid,
    pub vm: Option<String>,
    pub state: crate::center::TaskState,
    pub samples: Vec<MigrationSample>,
    /// When the guest stopped for the switchover, since the task started.
    pub pause_at_ms: Option<u64>,
    /// How long the guest was paused (the center's measure, commit included).
    pub pause_ms: Option<u64>,
    /// The pause as QEMU measured it.
    pub downtime_ms: Option<u64>,
    /// The whole migration, request to result.
    pub total_ms: Option<u64>,
}
