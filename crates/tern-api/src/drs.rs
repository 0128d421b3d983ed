//! DRS (cluster scheduling) in the center's API: per-cluster settings, the engine's current
//! balance recommendations, and applying them as live migrations.
//!
//! | method | path | body → answer |
//! | --- | --- | --- |
//! | GET | /api/v1/clusters/{name}/drs | → [`DrsSettings`] |
//! | PUT | /api/v1/clusters/{name}/drs | [`DrsSettings`] → [`DrsSettings`] |
//! | GET | /api/v1/clusters/{name}/drs/recommendations | → [`DrsRecommendations`] |
//! | POST | /api/v1/clusters/{name}/drs/apply | → [`crate::center::Task`] (202; kind `drs_apply`, result [`DrsApplyResult`]) |
//! | GET | /api/v1/clusters/{name}/rules | → [`DrsRule`]s |
//! | POST | /api/v1/clusters/{name}/rules | [`DrsRule`] → [`DrsRule`] (201) |
//! | DELETE | /api/v1/rules/{name} | → 204 |

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
    /// What the cluster does with a host whose health degrades (default off).
    #[serde(default)]
    pub proactive: crate::health::ProactiveMode,
}

impl Default for DrsSettings {
    fn default() -> DrsSettings {
        DrsSettings {
            automation: DrsAutomation::Manual,
            threshold: DRS_DEFAULT_THRESHOLD,
            proactive: crate::health::ProactiveMode::Off,
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

/// What a placement rule asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DrsRuleKind {
    /// The VMs run on one host together.
    Affinity,
    /// No two of the VMs share a host.
    AntiAffinity,
    /// The VMs never run outside the rule's hosts.
    MustRunOn,
    /// The VMs never run on the rule's hosts.
    MustNotRunOn,
    /// The VMs run on the rule's hosts unless nothing there fits (reported when broken).
    ShouldRunOn,
    /// The VMs stay off the rule's hosts unless nothing else fits (reported when broken).
    ShouldNotRunOn,
}

impl DrsRuleKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DrsRuleKind::Affinity => "affinity",
            DrsRuleKind::AntiAffinity => "anti_affinity",
            DrsRuleKind::MustRunOn => "must_run_on",
            DrsRuleKind::MustNotRunOn => "must_not_run_on",
            DrsRuleKind::ShouldRunOn => "should_run_on",
            DrsRuleKind::ShouldNotRunOn => "should_not_run_on",
        }
    }

    /// Whether the rule ties VMs to hosts (and so names hosts).
    pub fn names_hosts(self) -> bool {
        !matches!(self, DrsRuleKind::Affinity | DrsRuleKind::AntiAffinity)
    }
}

impl std::fmt::Display for DrsRuleKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for DrsRuleKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s.replace('-', "_").as_str() {
            "affinity" => DrsRuleKind::Affinity,
            "anti_affinity" => DrsRuleKind::AntiAffinity,
            "must_run_on" => DrsRuleKind::MustRunOn,
            "must_not_run_on" => DrsRuleKind::MustNotRunOn,
            "should_run_on" => DrsRuleKind::ShouldRunOn,
            "should_not_run_on" => DrsRuleKind::ShouldNotRunOn,
            _ => {
                return Err(format!(
                    "rule kind {s:?}: expected affinity, anti-affinity, must-run-on, \
                     must-not-run-on, should-run-on or should-not-run-on"
                ))
            }
        })
    }
}

/// A placement rule of a cluster: VMs together, apart, or tied to hosts. DRS never breaks an
/// affinity, anti-affinity or must rule (placement, balancing and maintenance respect them,
/// and a migration that would break one is refused); should rules give way only when nothing
/// else fits, and are reported then.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DrsRule {
    /// Unique in the center, like a VM name.
    pub name: String,
    pub kind: DrsRuleKind,
    /// VM names (of the cluster).
    pub vms: Vec<String>,
    /// Host names, for the kinds that name hosts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
}

impl std::fmt::Display for DrsRule {
    /// `db-apart: anti_affinity of db-1, db-2` / `pin: must_run_on of web-1 on h1, h2`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} of {}", self.name, self.kind, self.vms.join(", "))?;
        if !self.hosts.is_empty() {
            write!(f, " on {}", self.hosts.join(", "))?;
        }
        Ok(())
    }
}
