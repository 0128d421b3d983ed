//! What the engine returns: placements, moves, plans and notes, each with a typed reason and
//! the numbers behind it, so an operator can see why (see [`crate::explain`] for the text).

use serde::{Deserialize, Serialize};

use crate::cost::MigrationCost;
use crate::model::{HostState, Threshold, VmHostRelation};

/// A schedulable resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resource {
    Cpu,
    Memory,
}

impl Resource {
    pub(crate) fn from_index(r: usize) -> Resource {
        if r == 0 {
            Resource::Cpu
        } else {
            Resource::Memory
        }
    }

    /// Unit of the resource's amounts.
    pub fn unit(self) -> &'static str {
        match self {
            Resource::Cpu => "MHz",
            Resource::Memory => "MiB",
        }
    }
}

impl std::fmt::Display for Resource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Resource::Cpu => "CPU",
            Resource::Memory => "memory",
        })
    }
}

/// Normalized load of a host: entitlement (or demand) ÷ capacity, per resource.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Loads {
    pub cpu: f64,
    pub memory: f64,
}

/// Why a VM moves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MoveReason {
    /// Its host is in maintenance (priority 1).
    HostMaintenance { host: String },
    /// It shares a host with `other_vm` against an anti-affinity rule (priority 1).
    AntiAffinity { rule: String, other_vm: String },
    /// Its affinity group is split; it joins the others on the target (priority 1).
    Affinity { rule: String },
    /// Its host breaks a must VM-host rule (priority 1).
    MustRule {
        rule: String,
        relation: VmHostRelation,
        host_group: String,
    },
    /// Its host has more reserved than it has (priority 1).
    ReservationOvercommit {
        host: String,
        resource: Resource,
        reserved: f64,
        capacity: f64,
    },
    /// Its host breaks a should VM-host rule and a compliant host has room (priority 2).
    ShouldRule {
        rule: String,
        relation: VmHostRelation,
        host_group: String,
    },
    /// Its host's demand is above the high-water mark (priority 2).
    HotHost {
        host: String,
        resource: Resource,
        demand: f64,
        capacity: f64,
        high_water: f64,
    },
    /// It closes a load gap of `gap` between its source and destination, at least the
    /// threshold's `min_gap` (priority 2–5 by gap).
    Imbalance { gap: f64, min_gap: f64 },
    /// It follows `leader` of its affinity group, which moves for the reason given there.
    WithGroup { rule: String, leader: String },
}

/// The numbers behind a move.
///
/// `gain` is the reduction of the weighted sum of squared host-load deviations
/// Σ_hosts Σ_resources w_r (load − mean)², the quantity whose root mean is the imbalance; it
/// does not shrink with the number of hosts, so one price of migration fits every cluster
/// size. A move of load `x` between hosts whose loads differ by `Δ` gains about `2x(Δ − x)`.
/// `benefit = gain × (1 − duration ÷ horizon)`,
/// `net = benefit − cost`: balancing moves need `net > 0`. `cost = cost_weight × copied ÷
/// destination memory` (doubled when the guest must be throttled): the copy priced relative
/// to the host, like the gain, so the rule means the same for every host size.
///
/// `gap = gain ÷ (2 × load moved)`, the load moved being the weighted norm of the VM's
/// entitlement over the source's capacity: for one resource, a move of `x` between hosts
/// `Δ` apart has gap `Δ − x`, the mean of the gap before (`Δ`) and after (`Δ − 2x`). Each
/// threshold has a minimum gap ([`crate::model::MIN_GAPS`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoveNumbers {
    pub imbalance_before: f64,
    pub imbalance_after: f64,
    pub gain: f64,
    pub gap: f64,
    pub benefit: f64,
    pub cost: f64,
    pub net: f64,
    pub migration: MigrationCost,
    /// Entitlement loads of the source and destination, before and after.
    pub source_before: Loads,
    pub source_after: Loads,
    pub dest_before: Loads,
    pub dest_after: Loads,
    /// Destination's peak demand ÷ capacity after the move (what headroom is judged on).
    pub dest_peak_after: Loads,
}

/// One migration recommendation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Move {
    pub vm: String,
    pub from_host: String,
    pub to_host: String,
    /// 1 = mandatory (rules, maintenance) … 5 = smallest gain.
    pub priority: u8,
    pub reason: MoveReason,
    pub numbers: MoveNumbers,
    /// May be applied without an operator (the VM's automation level).
    pub automatic: bool,
    /// Should-rules this move breaks (only when nothing compliant fits).
    pub broken_should_rules: Vec<String>,
}

/// Why a host cannot take a VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Rejection {
    /// Not connected (maintenance or disconnected).
    HostState { state: HostState },
    /// The host's CPU lacks features the VM's CPU needs (`missing`, sorted).
    Cpu { missing: Vec<String> },
    /// The VM is already there (or it is the host being emptied).
    Source,
    MustRule {
        rule: String,
        relation: VmHostRelation,
        host_group: String,
    },
    /// `vm` of the same anti-affinity rule runs there.
    AntiAffinity { rule: String, vm: String },
    /// The VM's affinity group runs on `host`.
    AffinityElsewhere { rule: String, host: String },
    /// Unreserved CPU on the host is below the VM's reservation.
    CpuReservation {
        needed_mhz: f64,
        unreserved_mhz: f64,
    },
    /// Unreserved memory on the host is below the VM's reservation.
    MemoryReservation {
        needed_mib: f64,
        unreserved_mib: f64,
    },
    /// The host's peak demand would go above `limit` × capacity.
    Headroom {
        resource: Resource,
        /// Peak demand ÷ capacity after the move.
        load_after: f64,
        limit: f64,
    },
    /// Moving there would not make the cluster better balanced by more than it costs.
    NoGain,
}

/// A host and why it was not chosen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostRejection {
    pub host: String,
    pub rejection: Rejection,
}

/// A successful placement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    pub vm: String,
    pub host: String,
    /// May be applied without an operator (the VM's automation level).
    pub automatic: bool,
    pub imbalance_before: f64,
    pub imbalance_after: f64,
    /// Entitlement load of the chosen host after placement.
    pub host_after: Loads,
    /// Peak demand ÷ capacity of the chosen host after placement.
    pub host_peak_after: Loads,
    /// Should-rules broken because no compliant host fits (empty normally).
    pub broken_should_rules: Vec<String>,
    /// No host has room for the VM's peak demand: it goes where the overload is smallest.
    pub over_high_water: bool,
    /// Next best hosts with their imbalance after (at most 3).
    pub alternatives: Vec<(String, f64)>,
    /// Hosts that could not take the VM, and why.
    pub rejected: Vec<HostRejection>,
}

/// Why a VM cannot be placed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("{}", crate::explain::admission_failure(self))]
pub struct AdmissionFailure {
    pub vm: String,
    /// The VM's resource pool cannot admit its reservation.
    pub pool: Option<PoolRejection>,
    /// Every host, and why it cannot take the VM.
    pub hosts: Vec<HostRejection>,
}

/// A resource pool (or the cluster) that cannot admit a reservation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolRejection {
    pub pool: String,
    pub resource: Resource,
    pub needed: f64,
    pub available: f64,
    /// Why the pool cannot borrow: "cluster" (out of unreserved capacity), "not expandable"
    /// or "limit".
    pub why: String,
}

/// What a balancing pass found besides its moves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Note {
    /// No move closes a gap above the hysteresis band: no balancing started.
    WithinBand { best_gap: f64, start_above: f64 },
    /// Balancing stopped: no further move closes the threshold's gap and gains more than
    /// it costs.
    Balanced { imbalance: f64, min_gap: f64 },
    /// Balancing stopped at the per-pass move cap.
    MoveCapReached { cap: usize },
    /// VMs skipped by balancing because they migrated within the cooldown.
    CoolingDown { vms: usize, cooldown_s: u64 },
    /// A hot host no move could relieve.
    HotUnrelieved {
        host: String,
        resource: Resource,
        load: f64,
    },
    /// A violation or a maintenance VM that cannot be fixed now.
    Blocked(Blocker),
    /// A should-rule violation left in place, and why: no compliant host fits, the VM cannot
    /// move now (cooldown, automation disabled), or the pass's move budget is spent.
    ShouldRuleKept {
        vm: String,
        rule: String,
        why: String,
    },
}

/// A VM that must move but cannot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Blocker {
    pub vm: String,
    pub host: String,
    pub reason: BlockReason,
}

/// Why a VM that must move cannot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BlockReason {
    /// DRS automation is disabled for the VM: move it by hand.
    AutomationDisabled { why_move: MoveReason },
    /// No host can take it; every candidate with its reason.
    NoHost {
        why_move: MoveReason,
        hosts: Vec<HostRejection>,
    },
}

/// Host loads before and after a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostSummary {
    pub host: String,
    pub state: HostState,
    pub vms_before: usize,
    pub vms_after: usize,
    /// Entitlement ÷ capacity.
    pub load_before: Loads,
    pub load_after: Loads,
    /// Latest demand ÷ capacity.
    pub demand_before: Loads,
    pub demand_after: Loads,
}

/// Result of a balancing pass.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BalancePlan {
    pub threshold: Threshold,
    /// Smallest gap a balancing move closes at this threshold (∞ at threshold 1).
    pub min_gap: f64,
    pub imbalance_before: f64,
    pub imbalance_after: f64,
    /// In the order they should run; each carries the imbalance after it.
    pub moves: Vec<Move>,
    pub notes: Vec<Note>,
    pub hosts: Vec<HostSummary>,
}

/// One step of a maintenance plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvacuationStep {
    #[serde(flatten)]
    pub migration: Move,
    /// Planned start and end, seconds from the plan's start, at the configured concurrency.
    pub start_s: f64,
    pub end_s: f64,
}

/// Result of [`crate::evacuate`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvacuationPlan {
    pub host: String,
    /// Ordered by planned start; run them in this order, at most
    /// `max_concurrent_migrations_per_host` at a time per host.
    pub steps: Vec<EvacuationStep>,
    /// VMs that cannot leave, with the reason; the host is empty only when this is empty.
    pub blockers: Vec<Blocker>,
    /// Planned duration at the configured concurrency.
    pub duration_s: f64,
    /// Imbalance of the hosts that stay (the emptied host excluded), before and after.
    pub imbalance_before: f64,
    pub imbalance_after: f64,
    pub hosts: Vec<HostSummary>,
}
