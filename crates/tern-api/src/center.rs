//! The center's REST API (`/api/v1`): inventory, tasks, events, host enrolment.
//!
//! Paths (all need `Authorization: Bearer <token>`; the admin token for users, the enrolment
//! token for `hosts/register`, the host's own token for its heartbeats):
//!
//! | method | path | body → answer |
//! | --- | --- | --- |
//! | POST | /api/v1/clusters | [`CreateCluster`] → [`Cluster`] |
//! | GET | /api/v1/clusters | → `Vec<Cluster>` |
//! | GET | /api/v1/clusters/{name} | → [`Cluster`] |
//! | GET, PUT | /api/v1/clusters/{name}/migration | [`ClusterMigrationSettings`] (PUT: admin) |
//! | POST | /api/v1/hosts/register | [`RegisterHost`] → [`Registered`] |
//! | POST | /api/v1/hosts/{id}/heartbeat | [`Heartbeat`] → `()` |
//! | GET | /api/v1/hosts | → `Vec<Host>` |
//! | GET | /api/v1/hosts/{name} | → [`Host`] |
//! | POST | /api/v1/hosts/{name}/maintenance | [`HostMaintenance`] → [`Task`] (enter: 202, runs; exit: 200, done) |
//! | POST | /api/v1/vms | [`CreateVm`] → [`Vm`] |
//! | GET | /api/v1/vms | → `Vec<Vm>` |
//! | GET | /api/v1/vms/{name} | → [`Vm`] |
//! | POST | /api/v1/vms/{name}/start | → [`Task`] |
//! | POST | /api/v1/vms/{name}/stop | [`StopVm`] → [`Task`] |
//! | DELETE | /api/v1/vms/{name} | → `()` (VM must be stopped) |
//! | GET | /api/v1/vms/{name}/console | `?bytes=N` → text/plain, the serial log's tail |
//! | GET | /api/v1/tasks | → `Vec<Task>` |
//! | GET | /api/v1/tasks/{id} | → [`Task`] |
//! | POST | /api/v1/tasks/{id}/cancel | → [`Task`] |
//! | GET | /api/v1/events | `?limit=N&vm=NAME&host=NAME` → `Vec<Event>` |
//! | GET | /openapi.json | the OpenAPI document (no token needed) |
//!
//! EVC paths (cluster CPU modes, migration dry run): see [`crate::evc`]. DRS paths (settings,
//! recommendations, apply): see [`crate::drs`].

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

pub use crate::migration::MigrationEncryption;
use crate::spec::{HostFacts, HostLoad, HostState, PowerState, VmSpec};

pub const API_PREFIX: &str = "/api/v1";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCluster {
    pub name: String,
    /// EVC baseline (CPU model name); `None` = no baseline.
    #[serde(default)]
    pub evc_mode: Option<String>,
    /// Whether its migrations are encrypted (default `required`).
    #[serde(default)]
    pub migration_encryption: Option<MigrationEncryption>,
}

/// A cluster's migration policy (`GET`/`PUT /clusters/{name}/migration`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClusterMigrationSettings {
    /// `required` (default): every migration stream is encrypted and authenticated with a
    /// key made for it; `opportunistic`: when both hosts can; `disabled`: never.
    pub encryption: MigrationEncryption,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Cluster {
    pub id: Uuid,
    pub name: String,
    pub evc_mode: Option<String>,
    #[serde(default)]
    pub migration_encryption: MigrationEncryption,
    pub hosts: Vec<String>,
    pub created_at: DateTime<Utc>,
}

/// Sent by an agent when it starts (every start: registration is idempotent by host name).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RegisterHost {
    pub name: String,
    pub cluster: String,
    /// `http://IP:PORT` the center reaches the agent's API at.
    pub agent_url: String,
    /// Token the center must present to the agent.
    pub agent_token: String,
    pub facts: HostFacts,
    /// A certificate signing request (PEM) for the host's own key: sent at the first join and
    /// to renew. The certificate the center signs names this host only.
    #[serde(default)]
    pub csr: Option<String>,
}

/// Asks for a one-time join token for a host name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddHost {
    /// How long the token may be used, in seconds (default an hour, at most a week).
    #[serde(default)]
    pub ttl_s: Option<u64>,
}

/// A one-time join token: the agent of `host` registers with it once (give it to the agent
/// with `--enrol-token-file`), then with the secret the center gives it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JoinToken {
    pub host: String,
    /// The token. With TLS it ends in `.sha256-` and the cluster CA's fingerprint, so the agent
    /// holding it can check the center before it sends it.
    pub token: String,
    pub expires_at: DateTime<Utc>,
    /// SHA-256 of the cluster CA's certificate (hex), when the center serves TLS.
    #[serde(default)]
    pub ca_fingerprint: Option<String>,
}

/// What separates a join token's secret from the CA fingerprint it carries.
pub const JOIN_TOKEN_CA_MARK: &str = ".sha256-";

/// The CA fingerprint a join token carries, if any.
pub fn join_token_ca(token: &str) -> Option<&str> {
    token
        .rsplit_once(JOIN_TOKEN_CA_MARK)
        .map(|(_, fp)| fp)
        .filter(|fp| fp.len() == 64 && fp.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Registered {
    pub host_id: Uuid,
    /// The host's secret: the agent keeps it and presents it with its heartbeats and when it
    /// registers again (the center keeps only its hash).
    pub host_token: String,
    /// How often the center expects a heartbeat.
    pub heartbeat_interval_ms: u64,
    /// The host's certificate chain (PEM: the host's, then the CA's), when a signing request
    /// was sent.
    #[serde(default)]
    pub certificate: Option<String>,
    /// The cluster CA's certificate (PEM), when the center serves TLS.
    #[serde(default)]
    pub ca: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Heartbeat {
    pub facts: HostFacts,
    pub load: HostLoad,
    /// Hardware and pressure counters (an older agent sends none).
    #[serde(default)]
    pub health: Option<crate::health::HealthReport>,
}

/// Which VM a host asks about (`GET /api/v1/hosts/{id}/ownership?vm=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct OwnershipQuery {
    pub vm: Uuid,
}

/// What the store records of a VM's owner, as far as the asking host is concerned. A
/// destination whose commit call never came (the leader died after committing) asks any center
/// of the group, standbys included: `owned_here` with the generation it was prepared for means
/// the commit is durable and it may run the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Ownership {
    pub vm: Uuid,
    /// The store names the asking host as the VM's owner.
    pub owned_here: bool,
    /// The generation the VM is owned under; only given to its owner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Host {
    pub id: Uuid,
    pub name: String,
    pub cluster: String,
    pub state: HostState,
    pub agent_url: String,
    pub facts: HostFacts,
    pub load: Option<HostLoad>,
    pub last_heartbeat: Option<DateTime<Utc>>,
    /// Names of the VMs the center places on this host.
    pub vms: Vec<String>,
    /// What keeps this host from doing all its work, for users (it is "degraded" while any
    /// is listed); empty when it is healthy. Disconnection and maintenance show in `state`.
    #[serde(default)]
    pub problems: Vec<String>,
    /// Hardware health and why the host is degraded, if it is (a degraded host takes no new
    /// VMs; the cluster's proactive mode says whether its VMs leave).
    #[serde(default)]
    pub health: crate::health::HostHealth,
    /// The one certificate of this host the center accepts (none with `--insecure-http`).
    #[serde(default)]
    pub certificate: Option<HostCertificate>,
}

/// A host's current certificate, as the center issued it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HostCertificate {
    /// Serial number, hex.
    pub serial: String,
    pub expires_at: DateTime<Utc>,
    pub issued_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    pub spec: VmSpec,
    pub cluster: String,
    /// Host to run on; `None` lets the center place it.
    #[serde(default)]
    pub host: Option<String>,
    /// Make the boot disk from an image: it goes first in `spec.disks` (as
    /// `vms/<name>.qcow2` on the shared storage), and the VM boots from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<crate::images::DiskFromImage>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Vm {
    pub id: Uuid,
    pub spec: VmSpec,
    pub cluster: String,
    /// Host that owns the VM (runs it, or would start it).
    pub host: Option<String>,
    pub desired_state: PowerState,
    pub actual_state: PowerState,
    /// Ownership generation: bumped every time the owning host changes (migration hand-over).
    pub generation: u64,
    pub created_at: DateTime<Utc>,
    /// The CPU the VM runs with (see [`crate::evc`]); `None` until the center resolved it.
    #[serde(default)]
    pub cpu: Option<crate::evc::VmCpuRecord>,
    /// The resource pool it belongs to (`None`: the cluster's root).
    #[serde(default)]
    pub pool: Option<String>,
    /// The policy the host enforces: the VM's own, tightened by its pools' (their limits and
    /// reservations divided down the tree, their shares weighed in). Equal to
    /// `spec.resources` outside pools.
    #[serde(default)]
    pub effective_resources: Option<crate::resources::Resources>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StopVm {
    /// Kill at once instead of asking the guest to power off.
    #[serde(default)]
    pub force: bool,
    /// Grace time for a graceful stop before the process is killed (default 30 s).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    VmStart,
    VmStop,
    VmMigrate,
    /// Host enters maintenance mode: flagged at once, then emptied live.
    HostMaintenanceEnter,
    /// Host leaves maintenance mode (done when recorded).
    HostMaintenanceExit,
    /// A cluster's DRS balance recommendations run as live migrations, several at once.
    DrsApply,
    /// A host's running VMs leave it live (a degraded host, or an operator's evacuate),
    /// without maintenance mode.
    HostEvacuate,
}

/// What `POST /api/v1/hosts/{name}/maintenance` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MaintenanceAction {
    /// Flag the host (nothing new lands or starts there), then live-migrate its running VMs
    /// away and re-home its stopped ones.
    Enter,
    /// Return the host to service.
    Exit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HostMaintenance {
    pub action: MaintenanceAction,
}

/// `GET /api/v1/hosts/{name}/maintenance-plan`: what entering maintenance would do now,
/// without doing it (the scheduler's plan for the running VMs, and who cannot leave).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MaintenancePlan {
    pub host: String,
    /// Live migrations, in the order they would start.
    pub moves: Vec<PlannedMove>,
    /// Running VMs that could not leave, with the reason: the host would not empty.
    pub blockers: Vec<PlanBlocker>,
    /// Stopped VMs, re-homed in the inventory to a host that can take them.
    pub stopped: Vec<String>,
    /// VMs in another state (paused, migrating…), which maintenance would leave in place.
    pub other: Vec<PlanBlocker>,
    /// Load imbalance of the hosts that stay, before and after the moves.
    pub imbalance_before: f64,
    pub imbalance_after: f64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PlannedMove {
    pub vm: String,
    pub to: String,
    /// Why the scheduler chose that host, in words.
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PlanBlocker {
    pub vm: String,
    pub why: String,
}

/// One VM a maintenance task moved (live) or re-homed (stopped).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MaintenanceMove {
    pub vm: String,
    pub to: String,
    /// The migration task (`None` for a stopped VM re-homed in the inventory).
    pub task: Option<Uuid>,
    /// Why the scheduler chose that host.
    pub reason: String,
}

/// A VM a maintenance task left on the host, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MaintenanceLeft {
    pub vm: String,
    pub why: String,
}

/// The result of a `host_maintenance_enter` task.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MaintenanceResult {
    pub host: String,
    /// Running VMs live-migrated away.
    pub migrated: Vec<MaintenanceMove>,
    /// Stopped VMs registered on another host instead.
    pub rehomed: Vec<MaintenanceMove>,
    /// VMs still on the host (running ones make the task fail; stopped ones only warn).
    pub left: Vec<MaintenanceLeft>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl TaskState {
    pub fn is_done(self) -> bool {
        matches!(
            self,
            TaskState::Succeeded | TaskState::Failed | TaskState::Cancelled
        )
    }
}

impl std::fmt::Display for TaskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TaskState::Queued => "queued",
            TaskState::Running => "running",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Task {
    pub id: Uuid,
    pub kind: TaskKind,
    pub vm: Option<String>,
    pub host: Option<String>,
    pub state: TaskState,
    /// 0–100.
    pub progress: u8,
    /// Short human text of the current phase.
    pub phase: String,
    /// Kind-specific result record (e.g. a migration's figures).
    pub result: Option<serde_json::Value>,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl Task {
    /// A task just recorded, before anything has been done for it.
    pub fn queued(
        kind: TaskKind,
        vm: Option<String>,
        host: Option<String>,
        now: DateTime<Utc>,
    ) -> Task {
        Task {
            id: Uuid::new_v4(),
            kind,
            vm,
            host,
            state: TaskState::Queued,
            progress: 0,
            phase: "queued".into(),
            result: None,
            error: None,
            created_at: now,
            finished_at: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventLevel {
    Info,
    Warning,
    Error,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Event {
    pub id: i64,
    pub time: DateTime<Utc>,
    pub level: EventLevel,
    pub message: String,
    pub vm: Option<String>,
    pub host: Option<String>,
    pub task: Option<Uuid>,
    /// Who asked for the change: the name of the API token (`admin` for the center's admin
    /// token file); `None` for what the center did by itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
}

// ---- query strings (the center parses them, the clients send them) ----

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ConsoleQuery {
    /// How many bytes of the log's end to return (default: the agent's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct CanMigrateQuery {
    /// Destination host.
    pub to: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct TaskQuery {
    /// Newest N tasks (default 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// Only this VM's tasks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
}

/// `GET /api/v1/vms` and `/api/v1/hosts`: a page of the listing, by name. Without any field
/// the whole listing comes back (as before paging existed).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only names containing this (case-insensitive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub q: Option<String>,
    /// Names after this one (the last name of the previous page).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    /// At most this many (1–10000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// Only those of this cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// VMs only: those this host owns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// VMs only: `true` for those no host owns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unplaced: Option<bool>,
}

impl ListQuery {
    /// Largest page.
    pub const MAX_LIMIT: u32 = 10_000;

    /// Keeps the names this page holds, in name order: matching `q`, after `after`, at most
    /// `limit`.
    pub fn page<T>(&self, mut items: Vec<T>, name: impl Fn(&T) -> &str) -> Vec<T> {
        items.sort_by(|a, b| name(a).cmp(name(b)));
        let q = self.q.as_deref().map(str::to_lowercase);
        let limit = self
            .limit
            .map_or(usize::MAX, |l| l.min(Self::MAX_LIMIT) as usize);
        items
            .into_iter()
            .filter(|i| self.after.as_deref().is_none_or(|a| name(i) > a))
            .filter(|i| {
                q.as_deref()
                    .is_none_or(|q| name(i).to_lowercase().contains(q))
            })
            .take(limit)
            .collect()
    }
}

/// `GET /api/v1/summary`: the inventory's counts, without listing it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Summary {
    pub hosts: u64,
    pub vms: u64,
    /// Hosts by state (`connected`, `disconnected`, `maintenance`, …); states with none are
    /// left out.
    pub hosts_by_state: std::collections::BTreeMap<String, u64>,
    /// VMs by actual state (`running`, `stopped`, `unknown`, …).
    pub vms_by_state: std::collections::BTreeMap<String, u64>,
    /// Hosts that are degraded (take no new VMs).
    pub degraded_hosts: u64,
    /// Tasks queued or running.
    pub active_tasks: u64,
    pub clusters: Vec<ClusterSummary>,
}

/// One cluster's counts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ClusterSummary {
    pub name: String,
    pub hosts: u64,
    pub vms: u64,
    pub running_vms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EventQuery {
    /// Newest N events (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// Only events about this VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    /// Only events about this host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

// ---- API tokens ----

/// What a token may do. Each role may do everything the one before it may.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads everything but the token list.
    Viewer,
    /// Also creates, starts, stops, deletes and migrates VMs, cancels tasks, puts hosts in
    /// and out of maintenance, applies DRS recommendations.
    Operator,
    /// Also manages clusters, EVC, DRS settings and tokens.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            other => Err(format!(
                "{other:?} is not a role: viewer, operator or admin"
            )),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// Who holds the token, as the event log will name them: `[a-z0-9][a-z0-9-]{0,31}`.
    pub name: String,
    pub role: Role,
}

/// A token as listed: never its secret (the center keeps only a hash of it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ApiToken {
    pub name: String,
    pub role: Role,
    pub created_at: DateTime<Utc>,
    /// The token that created it.
    pub created_by: String,
}

/// A new token: the only time its secret is shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CreatedToken {
    pub name: String,
    pub role: Role,
    /// Present it as `Authorization: Bearer <token>`; it cannot be shown again.
    pub token: String,
}

/// `GET /api/v1/control-plane`: the centers and which one leads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ControlPlane {
    /// Whether this center belongs to an HA group sharing its state in etcd.
    pub ha: bool,
    /// This center's name in the group (`None` for a single center).
    pub center: Option<String>,
    /// The leader as etcd names it (`None` for a single center, or during an election).
    pub leader: Option<CenterRef>,
    /// The leader's term when this center leads (0 otherwise and for a single center).
    pub term: u64,
    /// Whether this center takes changes now (a single center always does).
    pub takes_changes: bool,
}

/// A center of an HA group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CenterRef {
    pub name: String,
    pub url: String,
}

/// `GET /api/v1/whoami`: who a token is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Whoami {
    pub name: String,
    pub role: Role,
}
