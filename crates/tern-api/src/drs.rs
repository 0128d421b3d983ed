//! DRS (cluster scheduling) in the center's API: per-cluster settings, the engine's current
//! balance recommendations, and applying them as live migrations.
//!
//! | method | path | body → answer |
//! | --- | --- | --- |
//! | GET | /api/v1/clusters/{name}/drs | → [`DrsSettings`] |
//! | PUT | /api/v1/clusters/{name}/drs | [`DrsSettings`] → [`DrsSettings`] |
//! | GET | /api/v1/clusters/{name}/drs/recommendations | → [`DrsRecommendations`] |
//! | POST | /api/v1/clusters/{name}/drs/apply | → [`crate::center::Task`] (202; kind `drs_apply`, result [`DrsApplyResult`]) |

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// What the center does with the engine's balance recommendations for a cluster.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DrsAutomation {
    /// Recommendations are only shown and recorded; an operator applies them.
    #[default]
    Manual,
    /// The center places VMs (creation, start) but only records balance recommendations.
    Partially,
    /// The center also applies balance recommendations by itself, on its DRS period.
    Fully,
}

impl DrsAutomation {
    pub fn as_str(self) -> &'static str {
        match self {
            DrsAutomation::Manual => "manual",
            DrsAutomation::Partially => "partially",
            DrsAutomation::Fully => "fully",
        }
    }

    pub fn parse(s: &str) -> Option<DrsAutomation> {
        match s {
            "manual" => Some(DrsAutomation::Manual),
            "partially" => Some(DrsAutomation::Partially),
            "fully" => Some(DrsAutomation::Fully),
            _ => None,
        }
    }
}

impl std::fmt::Display for DrsAutomation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Smallest and largest migration threshold.
pub const DRS_THRESHOLDS: std::ops::RangeInclusive<u8> = 1..=5;
/// Migration threshold of a cluster that was never set.
pub const DRS_DEFAULT_THRESHOLD: u8 = 3;

/// A cluster's DRS settings (defaults: manual, threshold 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DrsSettings {
    pub automation: DrsAutomation,
    /// Migration threshold 1..5: 1 = mandatory moves only (rules, maintenance), 5 = also
    /// moves closing small load gaps.
    pub threshold: u8,
}

impl Default for DrsSettings {
    fn default() -> DrsSettings {
        DrsSettings {
            automation: DrsAutomation::Manual,
            threshold: DRS_DEFAULT_THRESHOLD,
        }
    }
}

/// One move the engine recommends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DrsRecommendation {
    pub vm: String,
    pub from_host: String,
    pub to_host: String,
    /// 1 = mandatory … 5 = smallest gain.
    pub priority: u8,
    /// Why, in words.
    pub reason: String,
    /// Cluster imbalance before and after this move.
    pub imbalance_before: f64,
    pub imbalance_after: f64,
    /// The engine's full line: numbers, host loads before and after.
    pub detail: String,
}

/// The engine's current recommendations for a cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DrsRecommendations {
    pub cluster: String,
    pub settings: DrsSettings,
    pub imbalance_before: f64,
    pub imbalance_after: f64,
    pub recommendations: Vec<DrsRecommendation>,
    /// The whole pass in words (host loads, moves, notes).
    pub text: String,
}

/// One recommendation an apply task ran.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DrsApplied {
    pub vm: String,
    pub from_host: String,
    pub to_host: String,
    pub reason: String,
    /// The migration task (`None` when it was refused before one was queued).
    pub task: Option<Uuid>,
    /// `None` when the VM moved; otherwise why not.
    pub error: Option<String>,
}

/// The result of a `drs_apply` task.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DrsApplyResult {
    pub cluster: String,
    pub applied: Vec<DrsApplied>,
}
