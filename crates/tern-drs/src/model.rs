//! The cluster snapshot the engine reads: hosts, VMs, rules, resource pools and settings.
//!
//! Plain serde data, documented field by field with units in the names. A snapshot is what
//! the center knows at one instant; the engine never mutates it and never looks anywhere
//! else. The JSON form is documented in the crate README and shipped as an example under
//! `crates/tern-drs/examples/snapshot.json`.

use serde::{Deserialize, Serialize};

/// Everything the engine decides from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    /// Time of the snapshot, seconds on any monotonic clock shared with
    /// [`LastMigration::at_s`] (the center uses Unix time, the simulator its own clock).
    #[serde(default)]
    pub now_s: u64,
    #[serde(default)]
    pub config: Config,
    pub hosts: Vec<Host>,
    #[serde(default)]
    pub vms: Vec<Vm>,
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Resource pools below the cluster's root pool. VMs without a pool sit in the root.
    #[serde(default)]
    pub pools: Vec<Pool>,
}

/// Connection and maintenance state of a host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    /// Takes VMs; counted in balancing.
    #[default]
    Connected,
    /// Being emptied: takes no VMs; its VMs must leave (priority 1).
    Maintenance,
    /// Unreachable: takes no VMs; its VMs cannot be moved and are ignored.
    Disconnected,
    /// Failing or underperforming hardware (proactive HA's quarantine): takes no VMs and
    /// leaves the balance metric; its VMs stay until the center empties it.
    Degraded,
}

/// A host of the cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Host {
    /// Unique within the snapshot.
    pub name: String,
    /// CPU capacity available to VMs: cores × MHz per core (minus what the host keeps).
    pub cpu_mhz: f64,
    /// Memory available to VMs.
    pub memory_mib: f64,
    #[serde(default)]
    pub state: HostState,
    /// Host groups this host belongs to (targets of VM-host rules).
    #[serde(default)]
    pub groups: Vec<String>,
    /// CPU features the host can give a guest (under an EVC mode: the mode's features), for
    /// CPU fit: a VM runs here only if its [`Vm::cpu_features`] are all in this list.
    /// `None`: not modelled, any VM's CPU runs here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_features: Option<Vec<String>>,
}

/// Proportional share of a resource under contention.
///
/// Levels are the usual vSphere ratios (low : normal : high = 1 : 2 : 4), scaled per VM by
/// its size (per vCPU for CPU, per MiB for memory) and fixed for pools; `custom` is an
/// absolute number of shares.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Shares {
    Low,
    #[default]
    Normal,
    High,
    Custom(u32),
}

impl Shares {
    fn level(self) -> Option<f64> {
        match self {
            Shares::Low => Some(1.0),
            Shares::Normal => Some(2.0),
            Shares::High => Some(4.0),
            Shares::Custom(_) => None,
        }
    }

    /// CPU shares of a VM: 1000 per vCPU at `normal`, scaled by level.
    pub fn vm_cpu(self, vcpus: u32) -> f64 {
        match self.level() {
            Some(l) => l * 500.0 * f64::from(vcpus.max(1)),
            None => self.custom_value(),
        }
    }

    /// Memory shares of a VM: 10 per MiB at `normal`, scaled by level.
    pub fn vm_memory(self, memory_mib: f64) -> f64 {
        match self.level() {
            Some(l) => l * 5.0 * memory_mib.max(1.0),
            None => self.custom_value(),
        }
    }

    /// CPU shares of a pool: 4000 at `normal`.
    pub fn pool_cpu(self) -> f64 {
        match self.level() {
            Some(l) => l * 2000.0,
            None => self.custom_value(),
        }
    }

    /// Memory shares of a pool: 327,680 at `normal` (a 32 GiB VM's worth).
    pub fn pool_memory(self) -> f64 {
        match self.level() {
            Some(l) => l * 163_840.0,
            None => self.custom_value(),
        }
    }

    fn custom_value(self) -> f64 {
        match self {
            Shares::Custom(n) => f64::from(n.max(1)),
            _ => 1.0,
        }
    }
}

/// How far DRS may act on its own, for the cluster or overridden per VM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Automation {
    /// Placement and migrations are applied automatically.
    #[default]
    FullyAutomated,
    /// Placement is automatic; migrations are recommendations an operator applies.
    PartiallyAutomated,
    /// Placement and migrations are recommendations only.
    Manual,
    /// DRS never moves this VM; evacuation lists it as a blocker.
    Disabled,
}

impl Automation {
    /// Whether a migration of a VM at this level may be applied without an operator.
    pub fn migrates_automatically(self) -> bool {
        matches!(self, Automation::FullyAutomated)
    }

    /// Whether a placement of a VM at this level may be applied without an operator.
    pub fn places_automatically(self) -> bool {
        matches!(
            self,
            Automation::FullyAutomated | Automation::PartiallyAutomated
        )
    }
}

/// When and from where a VM last migrated (for the cooldown).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LastMigration {
    /// Completion time, same clock as [`Snapshot::now_s`].
    pub at_s: u64,
    /// Host it left.
    #[serde(default)]
    pub from_host: Option<String>,
}

/// A VM: where it runs, its size, its demand and its controls.
///
/// Demand comes in two figures. `*_demand_*` is the latest sample (the mean over the last
/// few minutes, like a DRS period): entitlements and balancing use it. `*_peak_*` is a high
/// percentile over a longer window (the center uses the p95 of the last hour; missing = the
/// latest sample): headroom checks use it, so no move lands a VM where its usual peaks
/// would push a host above the high-water mark.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    /// Unique within the snapshot.
    pub name: String,
    /// Host it runs on; `None` for a VM being placed (powered off).
    #[serde(default)]
    pub host: Option<String>,
    pub vcpus: u32,
    /// Configured memory (what a migration copies).
    pub memory_mib: f64,
    /// Latest CPU demand.
    #[serde(default)]
    pub cpu_demand_mhz: f64,
    /// Latest memory demand (active, touched memory).
    #[serde(default)]
    pub memory_demand_mib: f64,
    #[serde(default)]
    pub cpu_peak_mhz: Option<f64>,
    #[serde(default)]
    pub memory_peak_mib: Option<f64>,
    #[serde(default)]
    pub cpu_reservation_mhz: f64,
    #[serde(default)]
    pub memory_reservation_mib: f64,
    #[serde(default)]
    pub cpu_limit_mhz: Option<f64>,
    #[serde(default)]
    pub memory_limit_mib: Option<f64>,
    #[serde(default)]
    pub cpu_shares: Shares,
    #[serde(default)]
    pub memory_shares: Shares,
    /// Resource pool (by name); `None` = the root pool.
    #[serde(default)]
    pub pool: Option<String>,
    /// Per-VM override of [`Config::automation`].
    #[serde(default)]
    pub automation: Option<Automation>,
    #[serde(default)]
    pub last_migration: Option<LastMigration>,
    /// Rate at which the guest dirties memory (measured by the agent, e.g. QMP
    /// `calc-dirty-rate`); drives the migration cost.
    #[serde(default)]
    pub dirty_mib_per_s: f64,
    /// CPU features the VM's CPU model needs from its host (its baseline's or, for a
    /// host-passthrough CPU, the host's it started on). Empty: runs on any host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpu_features: Vec<String>,
}

impl Vm {
    /// A VM with the given size and demand and every control at its default.
    pub fn new(name: impl Into<String>, vcpus: u32, memory_mib: f64) -> Vm {
        Vm {
            name: name.into(),
            host: None,
            vcpus,
            memory_mib,
            cpu_demand_mhz: 0.0,
            memory_demand_mib: 0.0,
            cpu_peak_mhz: None,
            memory_peak_mib: None,
            cpu_reservation_mhz: 0.0,
            memory_reservation_mib: 0.0,
            cpu_limit_mhz: None,
            memory_limit_mib: None,
            cpu_shares: Shares::Normal,
            memory_shares: Shares::Normal,
            pool: None,
            automation: None,
            last_migration: None,
            dirty_mib_per_s: 0.0,
            cpu_features: Vec::new(),
        }
    }

    /// Peak CPU demand: the high percentile, never below the latest sample.
    pub fn cpu_peak(&self) -> f64 {
        self.cpu_peak_mhz.unwrap_or(0.0).max(self.cpu_demand_mhz)
    }

    /// Peak memory demand: the high percentile, never below the latest sample.
    pub fn memory_peak(&self) -> f64 {
        self.memory_peak_mib
            .unwrap_or(0.0)
            .max(self.memory_demand_mib)
    }
}

/// Whether a VM-host rule requires or prefers, and in which direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmHostRelation {
    /// Never run outside the host group.
    MustRunOn,
    /// Never run inside the host group.
    MustNotRunOn,
    /// Run inside the group unless nothing there fits (reported when broken).
    ShouldRunOn,
    /// Stay out of the group unless nothing else fits (reported when broken).
    ShouldNotRunOn,
}

impl VmHostRelation {
    /// Must-rules are hard constraints; should-rules are preferences.
    pub fn is_must(self) -> bool {
        matches!(
            self,
            VmHostRelation::MustRunOn | VmHostRelation::MustNotRunOn
        )
    }

    /// Whether a host in (`in_group`) or out of the group satisfies the rule.
    pub fn allows(self, in_group: bool) -> bool {
        match self {
            VmHostRelation::MustRunOn | VmHostRelation::ShouldRunOn => in_group,
            VmHostRelation::MustNotRunOn | VmHostRelation::ShouldNotRunOn => !in_group,
        }
    }
}

impl std::fmt::Display for VmHostRelation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmHostRelation::MustRunOn => "must run on",
            VmHostRelation::MustNotRunOn => "must not run on",
            VmHostRelation::ShouldRunOn => "should run on",
            VmHostRelation::ShouldNotRunOn => "should not run on",
        })
    }
}

/// A placement rule. VM-VM rules are hard (DRS never breaks them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Rule {
    /// These VMs run on one host together (moved as a group).
    Affinity { name: String, vms: Vec<String> },
    /// No two of these VMs share a host.
    AntiAffinity { name: String, vms: Vec<String> },
    /// These VMs must / should run on / not on the hosts of `host_group`.
    VmHost {
        name: String,
        vms: Vec<String>,
        host_group: String,
        relation: VmHostRelation,
    },
}

impl Rule {
    pub fn name(&self) -> &str {
        match self {
            Rule::Affinity { name, .. }
            | Rule::AntiAffinity { name, .. }
            | Rule::VmHost { name, .. } => name,
        }
    }

    pub fn vms(&self) -> &[String] {
        match self {
            Rule::Affinity { vms, .. }
            | Rule::AntiAffinity { vms, .. }
            | Rule::VmHost { vms, .. } => vms,
        }
    }
}

/// CPU controls of a resource pool (default: no reservation, no limit, normal shares,
/// expandable).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolCpu {
    #[serde(default)]
    pub reservation_mhz: f64,
    #[serde(default)]
    pub limit_mhz: Option<f64>,
    #[serde(default)]
    pub shares: Shares,
    /// Children may reserve more than `reservation_mhz` by borrowing from the parent.
    #[serde(default = "yes")]
    pub expandable_reservation: bool,
}

/// Memory controls of a resource pool (default: no reservation, no limit, normal shares,
/// expandable).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolMemory {
    #[serde(default)]
    pub reservation_mib: f64,
    #[serde(default)]
    pub limit_mib: Option<f64>,
    #[serde(default)]
    pub shares: Shares,
    /// Children may reserve more than `reservation_mib` by borrowing from the parent.
    #[serde(default = "yes")]
    pub expandable_reservation: bool,
}

fn yes() -> bool {
    true
}

impl Default for PoolCpu {
    fn default() -> PoolCpu {
        PoolCpu {
            reservation_mhz: 0.0,
            limit_mhz: None,
            shares: Shares::Normal,
            expandable_reservation: true,
        }
    }
}

impl Default for PoolMemory {
    fn default() -> PoolMemory {
        PoolMemory {
            reservation_mib: 0.0,
            limit_mib: None,
            shares: Shares::Normal,
            expandable_reservation: true,
        }
    }
}

/// A resource pool: a node of the tree that divides the cluster's capacity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pool {
    /// Unique within the snapshot.
    pub name: String,
    /// Parent pool; `None` = child of the root (the whole cluster).
    #[serde(default)]
    pub parent: Option<String>,
    #[serde(default)]
    pub cpu: PoolCpu,
    #[serde(default)]
    pub memory: PoolMemory,
}

/// Engine settings. Every field has a default; a snapshot may set any subset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Cluster automation level (VMs may override).
    pub automation: Automation,
    /// Weight of CPU in the imbalance metric; memory gets `1 - cpu_weight`.
    ///
    /// Equal weights by default: memory is the resource that cannot be overcommitted
    /// gracefully (a host short of memory swaps, one short of CPU only queues), and CPU is
    /// the one whose demand moves; neither may be ignored. With equal weights the imbalance
    /// is the root mean square of the CPU and memory standard deviations.
    pub cpu_weight: f64,
    /// A host whose latest demand exceeds this fraction of its capacity (CPU or memory) is
    /// hot: DRS relieves it at priority 2. No balancing move takes a destination's expected
    /// peak above it, unless the destination stays cooler than the source after the move
    /// (a host's expected peak: its latest demand + √Σ (peak − latest)² over its VMs).
    pub high_water: f64,
    /// A balancing move needs the VM's last migration to be at least this old; mandatory
    /// moves ignore it. Stops ping-pong.
    pub cooldown_s: u64,
    /// Balancing never moves a VM back to the host it left within this time of leaving.
    pub return_cooldown_s: u64,
    /// Balancing (priority ≥ 2) moves per pass; mandatory moves and moves off a host over
    /// capacity are not capped. Default: a quarter of the usable hosts, at least 4.
    pub max_moves_per_pass: Option<usize>,
    /// A pass starts balancing only when some move closes a gap this fraction above the
    /// threshold's minimum, and then continues down to the minimum. Stops reacting to drift.
    pub hysteresis: f64,
    /// How long the demand a move is based on is expected to last: the benefit of a move is
    /// its gain over this horizon minus the migration time.
    pub benefit_horizon_s: f64,
    /// Price of a migration per destination-host memory copied, in gain units: a move must
    /// gain more than `cost_weight × copied MiB ÷ destination memory MiB` (see
    /// [`crate::decision::MoveNumbers`]).
    pub cost_weight: f64,
    /// Bandwidth of one migration stream.
    pub migration_bandwidth_mib_per_s: f64,
    /// Pause the guest may see at switchover (sets when pre-copy stops).
    pub max_downtime_ms: f64,
    /// CPU a migration costs on each of its two hosts while it runs.
    pub migration_cpu_mhz: f64,
    /// Migrations one host may run at once (ordering of evacuation plans, simulator).
    pub max_concurrent_migrations_per_host: usize,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            automation: Automation::FullyAutomated,
            cpu_weight: 0.5,
            high_water: 0.9,
            cooldown_s: 3600,
            return_cooldown_s: 4 * 3600,
            max_moves_per_pass: None,
            hysteresis: 0.5,
            benefit_horizon_s: 3600.0,
            cost_weight: 0.04,
            migration_bandwidth_mib_per_s: 1100.0,
            max_downtime_ms: 300.0,
            migration_cpu_mhz: 1000.0,
            max_concurrent_migrations_per_host: 2,
        }
    }
}

/// Smallest load gap a balancing move must close, by threshold (index = threshold 1..5;
/// threshold 1 makes no balancing moves).
///
/// A move's gap is its gain per unit of load moved (see [`crate::decision::MoveNumbers`]):
/// about the difference between source and destination load, averaged over the move. It
/// does not depend on the number of hosts or the size of the VMs, so one threshold means the
/// same in every cluster. A balancing move whose gap is at least `MIN_GAPS[p]` (and below
/// `MIN_GAPS[p - 1]`) has priority `p`; threshold `t` makes moves of priority `t` or less.
pub const MIN_GAPS: [f64; 6] = [f64::INFINITY, f64::INFINITY, 0.05, 0.025, 0.0125, 0.00625];

/// DRS migration threshold, 1 (conservative: mandatory moves only) to 5 (aggressive).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub struct Threshold(u8);

impl Threshold {
    pub const MANDATORY_ONLY: Threshold = Threshold(1);
    pub const DEFAULT: Threshold = Threshold(3);

    /// `None` unless `1 <= level <= 5`.
    pub fn new(level: u8) -> Option<Threshold> {
        (1..=5).contains(&level).then_some(Threshold(level))
    }

    pub fn level(self) -> u8 {
        self.0
    }

    /// Smallest gap a balancing move closes at this threshold (∞ for threshold 1).
    pub fn min_gap(self) -> f64 {
        MIN_GAPS[usize::from(self.0)]
    }
}

impl Default for Threshold {
    fn default() -> Threshold {
        Threshold::DEFAULT
    }
}

impl TryFrom<u8> for Threshold {
    type Error = String;
    fn try_from(v: u8) -> Result<Threshold, String> {
        Threshold::new(v).ok_or_else(|| format!("threshold must be 1..5, got {v}"))
    }
}

impl From<Threshold> for u8 {
    fn from(t: Threshold) -> u8 {
        t.0
    }
}

impl std::fmt::Display for Threshold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A snapshot the engine cannot read: each variant names what to fix.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SnapshotError {
    #[error("duplicate host name {0:?}")]
    DuplicateHost(String),
    #[error("duplicate VM name {0:?}")]
    DuplicateVm(String),
    #[error("duplicate pool name {0:?}")]
    DuplicatePool(String),
    #[error("VM {vm:?} runs on unknown host {host:?}")]
    UnknownHost { vm: String, host: String },
    #[error("VM {vm:?} is in unknown pool {pool:?}")]
    UnknownPool { vm: String, pool: String },
    #[error("pool {pool:?} has unknown parent {parent:?}")]
    UnknownParent { pool: String, parent: String },
    #[error("pool {0:?} is its own ancestor (cycle in the pool tree)")]
    PoolCycle(String),
    #[error("rule {rule:?} names unknown VM {vm:?}")]
    UnknownRuleVm { rule: String, vm: String },
    #[error(
        "host {host:?} has a non-positive or non-finite capacity; give cpu_mhz and memory_mib > 0"
    )]
    BadCapacity { host: String },
    #[error("VM {vm:?} has a negative or non-finite {field}")]
    BadNumber { vm: String, field: &'static str },
    #[error("config: {0}")]
    BadConfig(String),
    #[error("unknown host {0:?}")]
    NoSuchHost(String),
}
