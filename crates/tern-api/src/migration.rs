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
//! | POST | /v1/migrations/{vm}/frames | → [`QueuedFrames`] (source, after the switchover: the frames its paused QEMU left unread on the VM's taps) |
//! | POST | /v1/migrations/{vm}/commit | [`Commit`] → `()` (destination: the center recorded it as owner — deliver the handed-over frames, run the guest, announce its MAC) |
//! | POST | /v1/migrations/{vm}/abort | → `()` (source: cancel and resume the guest; destination: kill the incoming QEMU) |
//! | POST | /v1/migrations/{vm}/finish | → `()` (source, after commit: quit the paused QEMU and clean up; never resumes) |
//! | POST | /v1/bandwidth-sink | → [`BandwidthSink`] (destination: accept one probe connection on the migration address) |
//! | POST | /v1/bandwidth-probe | [`BandwidthProbe`] → [`BandwidthReport`] (source agent sends to the destination's probe port) |
//!
//! `GET /v1/migrations/{vm}?wait_ms=N` answers as soon as the state differs from
//! `?state=S` (or after N ms), so the center learns of pre-switchover without polling fast.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::spec::VmSpec;

/// A user's request to move a VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
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
    /// Measure the link before choosing the settings even when a figure measured between the
    /// same two hosts in the last minutes is known (after a change to the network).
    #[serde(default)]
    pub probe_link: bool,
}

/// Largest cap a request may give: 1 Tbit/s (checked before any arithmetic on it).
pub const MAX_BANDWIDTH_MBIT: u64 = 1_000_000;
/// Longest deadline a request may give: a week.
pub const MAX_DEADLINE_MS: u64 = 7 * 24 * 3600 * 1000;
/// Largest pause a request may allow: a minute (a longer one is an outage, not a migration).
pub const MAX_DOWNTIME_MS: u64 = 60_000;

impl MigrateVm {
    /// Checks every number before anything computes with it; the error names the field.
    pub fn check(&self) -> Result<(), String> {
        if let Some(b) = self.bandwidth_mbit {
            if b == 0 {
                return Err(
                    "bandwidth_mbit 0 would never send anything: give a cap above 0, \
                            or none"
                        .into(),
                );
            }
            if b > MAX_BANDWIDTH_MBIT {
                return Err(format!(
                    "bandwidth_mbit {b} is above {MAX_BANDWIDTH_MBIT} (1 Tbit/s): give the cap \
                     in Mbit/s"
                ));
            }
        }
        match self.deadline_ms {
            Some(0) => return Err("deadline_ms must be above 0".into()),
            Some(d) if d > MAX_DEADLINE_MS => {
                return Err(format!(
                    "deadline_ms {d} is above {MAX_DEADLINE_MS} (a week): give it in \
                     milliseconds"
                ))
            }
            _ => {}
        }
        if let Some(d) = self.downtime_ms.filter(|d| *d > MAX_DOWNTIME_MS) {
            return Err(format!(
                "downtime_ms {d} is above {MAX_DOWNTIME_MS} (a minute): give it in milliseconds"
            ));
        }
        Ok(())
    }
}

/// What tern knew of the guest and the link when it chose the settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Measurements {
    pub memory_mib: u64,
    /// Guest dirty rate measured before the copy (QMP `calc-dirty-rate`); `None` when it was
    /// not measured: tern starts copying at once and judges the rate from QEMU's first pass.
    #[serde(default)]
    pub dirty_rate_mib_s: Option<f64>,
    /// Usable bandwidth of the migration link between the two agents; NaN (`null` in JSON)
    /// when it could not be measured.
    #[serde(deserialize_with = "nan_if_null")]
    pub link_mbit: f64,
    /// How old the link figure was, in seconds, when it was remembered from an earlier probe
    /// between the same two hosts; `None`: probed for this migration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_age_s: Option<u64>,
}

/// JSON has no NaN: serde writes it as `null`, and this reads `null` back as NaN.
fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// The settings tern chose, each with the reason.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrationSettings {
    /// Parallel multifd channels; 0 = a single migration stream (multifd off).
    pub multifd_channels: u32,
    /// `None` = unlimited.
    pub max_bandwidth_mib_s: Option<u64>,
    /// Downtime limit the migration starts with.
    pub downtime_limit_ms: u64,
    /// `multifd-compression`.
    pub compression: Compression,
    pub auto_converge: bool,
    pub postcopy_allowed: bool,
    pub deadline_ms: u64,
    /// One line per decision: what and why.
    pub reasons: Vec<String>,
    /// Largest downtime limit the migration may be raised to when pre-copy stalls (the
    /// request's budget); 0 = no raise beyond `downtime_limit_ms`.
    #[serde(default)]
    pub downtime_budget_ms: u64,
    /// `zero-page-detection`.
    #[serde(default)]
    pub zero_page_detection: ZeroPageDetection,
    /// How auto-converge throttles the guest's vCPUs.
    #[serde(default)]
    pub throttle: ThrottlePlan,
    /// The link measurement `max_bandwidth_mib_s` was derived from. `Some` means the pace is
    /// tern's own guess, re-judged from QEMU's transfer rate while the migration runs (a
    /// measurement disturbed by a fault must not slow a migration for minutes); `None` means
    /// the cap is the user's, or there is none, and stays as it is.
    #[serde(default)]
    pub paced_from_link_mbit: Option<f64>,
    /// The stream is encrypted and authenticated with QEMU's TLS under a key made for this
    /// migration alone ([`MigrationKey`]); the reason is among `reasons`.
    #[serde(default)]
    pub encrypted: bool,
    /// An encrypted stream is carried by the two hosts' relays (`tern host relay`): each QEMU
    /// streams in clear to a relay on its own host, and the relays speak TLS 1.3 between
    /// the hosts, authenticated by the same key. Else QEMU's own TLS carries it.
    #[serde(default)]
    pub relayed: bool,
    /// A relayed stream's source address (the source host's migration address): its relay
    /// connects from it, and the destination's relay takes connections from it alone,
    /// closing any other before TLS. None: any peer may try (and must prove the key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "10.77.0.11")]
    pub relay_source: Option<std::net::IpAddr>,
}

/// Whether a cluster's migrations are encrypted: `migration_encryption` of the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MigrationEncryption {
    /// Every migration is encrypted; one between hosts that cannot is refused.
    #[default]
    Required,
    /// Encrypted when both hosts can, plain otherwise (the task says which and why).
    Opportunistic,
    /// Never encrypted: for an isolated migration network where the CPU matters more.
    Disabled,
}

impl MigrationEncryption {
    pub const ALL: [MigrationEncryption; 3] = [
        MigrationEncryption::Required,
        MigrationEncryption::Opportunistic,
        MigrationEncryption::Disabled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MigrationEncryption::Required => "required",
            MigrationEncryption::Opportunistic => "opportunistic",
            MigrationEncryption::Disabled => "disabled",
        }
    }
}

impl std::fmt::Display for MigrationEncryption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for MigrationEncryption {
    type Err = String;

    fn from_str(s: &str) -> Result<MigrationEncryption, String> {
        MigrationEncryption::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| {
                format!("{s:?} is no migration encryption: use required, opportunistic or disabled")
            })
    }
}

/// The pre-shared key of one migration's TLS (256 bits): made by the center for that migration
/// alone and given only to its two agents, so only the intended source can feed the
/// destination and only the intended destination can read the stream. Hex on the wire, never
/// in `Debug` output, logs or the task.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MigrationKey([u8; 32]);

impl MigrationKey {
    pub fn from_bytes(bytes: [u8; 32]) -> MigrationKey {
        MigrationKey(bytes)
    }

    /// The key itself (what a migration relay proves it holds).
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lower-case hex, the form QEMU's `keys.psk` file takes.
    pub fn to_hex(&self) -> String {
        use std::fmt::Write;
        self.0.iter().fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    }
}

impl std::fmt::Debug for MigrationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MigrationKey(<secret>)")
    }
}

impl TryFrom<String> for MigrationKey {
    type Error = String;

    fn try_from(s: String) -> Result<MigrationKey, String> {
        let b = s.as_bytes();
        if b.len() != 64 {
            return Err(format!(
                "a migration key is 64 hex digits, not {} characters",
                b.len()
            ));
        }
        let mut key = [0u8; 32];
        for (i, pair) in b.chunks(2).enumerate() {
            let digit = |c: u8| (c as char).to_digit(16);
            match (digit(pair[0]), digit(pair[1])) {
                (Some(h), Some(l)) => key[i] = (h * 16 + l) as u8,
                _ => return Err("a migration key is 64 hex digits".into()),
            }
        }
        Ok(MigrationKey(key))
    }
}

impl From<MigrationKey> for String {
    fn from(k: MigrationKey) -> String {
        k.to_hex()
    }
}

/// `multifd-compression`: how multifd channels compress pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    #[default]
    None,
    Zstd,
}

impl Compression {
    /// QEMU's name for it.
    pub fn as_qemu(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Zstd => "zstd",
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_qemu())
    }
}

/// `zero-page-detection`: where zero pages are found (QEMU >= 9.0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ZeroPageDetection {
    /// Not at all.
    None,
    /// In the main migration thread.
    #[default]
    Legacy,
    /// In the multifd sender threads.
    Multifd,
}

impl ZeroPageDetection {
    /// QEMU's name for it.
    pub fn as_qemu(self) -> &'static str {
        match self {
            ZeroPageDetection::None => "none",
            ZeroPageDetection::Legacy => "legacy",
            ZeroPageDetection::Multifd => "multifd",
        }
    }
}

impl std::fmt::Display for ZeroPageDetection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_qemu())
    }
}

/// Where a migration stream goes: QEMU's `tcp:ADDRESS:PORT`, the only transport tern uses.
/// Parsed, never passed through: QEMU's migrate URI also takes `exec:` (a shell command run
/// by QEMU) and `file:`, which no peer may be able to name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MigrationUri(std::net::SocketAddr);

impl MigrationUri {
    /// A target at `addr`; the port must be a real one (not 0), the address a unicast one.
    pub fn new(addr: std::net::SocketAddr) -> Result<MigrationUri, String> {
        let ip = addr.ip();
        if addr.port() == 0 {
            return Err(format!("migration target {addr} has no port"));
        }
        if ip.is_unspecified() || ip.is_multicast() {
            return Err(format!("migration target {addr} is not a unicast address"));
        }
        if let std::net::IpAddr::V4(v4) = ip {
            if v4.is_broadcast() {
                return Err(format!("migration target {addr} is not a unicast address"));
            }
        }
        Ok(MigrationUri(addr))
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.0
    }
}

impl std::str::FromStr for MigrationUri {
    type Err = String;

    fn from_str(s: &str) -> Result<MigrationUri, String> {
        let rest = s.strip_prefix("tcp:").ok_or_else(|| {
            format!("migration target {s:?} is not tcp:ADDRESS:PORT (the only transport tern uses)")
        })?;
        let addr = rest
            .parse::<std::net::SocketAddr>()
            .map_err(|e| format!("migration target {s:?} is not tcp:ADDRESS:PORT: {e}"))?;
        MigrationUri::new(addr)
    }
}

impl TryFrom<String> for MigrationUri {
    type Error = String;

    fn try_from(s: String) -> Result<MigrationUri, String> {
        s.parse()
    }
}

impl From<MigrationUri> for String {
    fn from(u: MigrationUri) -> String {
        u.to_string()
    }
}

impl std::fmt::Display for MigrationUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // SocketAddr writes IPv6 in brackets, as QEMU wants it.
        write!(f, "tcp:{}", self.0)
    }
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
    /// When the source's QEMU stopped the guest (`STOP`, the source host's clock) and the
    /// destination's resumed it (`RESUME`, the destination host's clock): the guest's pause
    /// as QEMU saw it, exact to the hosts' clock sync.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_at: Option<DateTime<Utc>>,
}

/// Destination: prepare an incoming QEMU for this VM.
///
/// Without `settings` the QEMU only starts (paused, `-incoming defer`): the center starts it
/// while it measures the guest and the link, then sends the settings with [`ListenIncoming`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PrepareIncoming {
    pub spec: VmSpec,
    /// Generation the destination will own the VM under once committed.
    pub generation: u64,
    #[serde(default)]
    pub settings: Option<MigrationSettings>,
    /// The migration's TLS key, with `settings` that say `encrypted`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub key: Option<MigrationKey>,
}

/// Destination: the settings of a migration prepared without them; configure and listen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ListenIncoming {
    pub settings: MigrationSettings,
    /// The migration's TLS key, when `settings` say `encrypted`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub key: Option<MigrationKey>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct IncomingReady {
    /// QEMU migration URI the source must connect to, e.g. `tcp:10.77.0.12:49152`; `None`
    /// while the destination is started but not listening yet (prepared without settings).
    #[schema(value_type = Option<String>, example = "tcp:10.77.0.12:49152")]
    pub uri: Option<MigrationUri>,
}

/// Source: start streaming to the destination.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartOutgoing {
    /// Where to send: the destination's [`IncomingReady::uri`], `tcp:ADDRESS:PORT` only.
    #[schema(value_type = String, example = "tcp:10.77.0.12:49152")]
    pub uri: MigrationUri,
    pub settings: MigrationSettings,
    /// The migration's TLS key, when `settings` say `encrypted`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub key: Option<MigrationKey>,
    /// Send the final state the moment the guest pauses at pre-switchover, without waiting
    /// for `switchover`: the round trip to the center then leaves the guest's pause. The
    /// center still decides: nothing runs at the destination before its commit, and an abort
    /// resumes the source even once everything is sent. Absent: wait for `switchover`.
    /// The cost: once everything is sent, a caller that hangs holds the guest paused until it
    /// decides, past the switchover watchdog's bound; tern's own center does not ask it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub switch_over_at_pause: bool,
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
    /// Source: when QEMU stopped the guest for the switchover (its `STOP` event, this host's
    /// clock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_at: Option<DateTime<Utc>>,
}

/// A rollback, told to one end. The source may get the frames the destination's taps queued
/// after the LAN was steered there ([`QueuedFrames`] taken at the destination): it delivers
/// them to the guest, in order, before it resumes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AbortMigration {
    #[serde(default)]
    pub frames: Vec<HandedFrame>,
}

/// The destination's answer to a commit: the guest runs there.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Committed {
    /// When the guest resumed (QEMU's `RESUME` event, the destination host's clock); `None`
    /// when the commit was a repeat of one already done.
    #[serde(default)]
    pub resumed_at: Option<DateTime<Utc>>,
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
            stopped_at: None,
        }
    }
}

/// Source: measure the guest's dirty rate over `duration_ms` (50 ms to 60 s).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
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

/// Destination: the center recorded this host as the VM's owner.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Commit {
    pub generation: u64,
    /// Frames the paused source left unread on the VM's taps ([`QueuedFrames`]): delivered to
    /// the guest here, ahead of what this host's taps queued since the LAN was steered.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub frames: Vec<HandedFrame>,
}

/// The offload fields of a frame as a tap hands it over (`struct virtio_net_hdr`): a frame
/// whose checksum the sender left to the NIC, or a TCP segment larger than the MTU, is only
/// correct together with them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VnetHeader {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

/// One Ethernet frame addressed to a migrating VM that reached its tap on the source after the
/// guest stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HandedFrame {
    /// Which NIC of the VM's spec (index) it was queued for.
    pub nic: u16,
    #[serde(default)]
    pub header: VnetHeader,
    /// The frame from its destination MAC on (base64).
    #[serde(with = "base64_bytes")]
    #[schema(value_type = String, format = Byte)]
    pub data: Vec<u8>,
}

/// The most frames, and frame bytes, one hand-over carries: they must fit one request to the
/// destination agent, and a pause's worth of requests to a VM is far less. Frames beyond are
/// dropped (and counted): their senders retransmit them, as without a hand-over.
pub const MAX_HANDED_FRAMES: usize = 1024;
pub const MAX_HANDED_BYTES: usize = 128 * 1024;

/// Source, after the final state was sent: what the guest's taps held, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct QueuedFrames {
    /// Frames to one of the VM's MACs, and (from a source) broadcast and multicast frames: a
    /// destination's taps take no floods before its steer, and merges the copies both got
    /// after it.
    pub frames: Vec<HandedFrame>,
    /// Broadcast and multicast frames left out by a destination handing frames back in a
    /// rollback: the source's taps received their own copies.
    pub skipped_flooded: u32,
    /// Frames to other MACs (flooded unknown unicast) left out: not the VM's.
    pub skipped_foreign: u32,
    /// Frames left out beyond [`MAX_HANDED_FRAMES`] / [`MAX_HANDED_BYTES`].
    pub skipped_over_limit: u32,
    /// Of `frames`, those the source's QEMU had read around the pause and not given the guest
    /// (at most two per tap), named from the source's recording of its taps.
    #[serde(default)]
    pub recovered: u32,
}

/// Frame bytes as base64 text in JSON.
mod base64_bytes {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(data: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(data))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .map_err(serde::de::Error::custom)
    }
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

#[cfg(test)]
mod request_tests {
    use super::*;

    fn req() -> MigrateVm {
        MigrateVm {
            to: "h2".into(),
            downtime_ms: None,
            deadline_ms: None,
            bandwidth_mbit: None,
            allow_postcopy: false,
            dry_run: false,
            probe_link: false,
        }
    }

    #[test]
    fn numbers_are_range_checked_and_the_error_names_the_field() {
        assert_eq!(req().check(), Ok(()));
        let ok = MigrateVm {
            bandwidth_mbit: Some(MAX_BANDWIDTH_MBIT),
            deadline_ms: Some(MAX_DEADLINE_MS),
            downtime_ms: Some(MAX_DOWNTIME_MS),
            ..req()
        };
        assert_eq!(ok.check(), Ok(()));
        let cases = [
            (
                "bandwidth_mbit",
                MigrateVm {
                    bandwidth_mbit: Some(0),
                    ..req()
                },
            ),
            (
                "bandwidth_mbit",
                MigrateVm {
                    bandwidth_mbit: Some(200_000_000_000_000),
                    ..req()
                },
            ),
            (
                "deadline_ms",
                MigrateVm {
                    deadline_ms: Some(0),
                    ..req()
                },
            ),
            (
                "deadline_ms",
                MigrateVm {
                    deadline_ms: Some(u64::MAX),
                    ..req()
                },
            ),
            (
                "downtime_ms",
                MigrateVm {
                    downtime_ms: Some(u64::MAX),
                    ..req()
                },
            ),
        ];
        for (field, r) in cases {
            let e = r.check().expect_err(field);
            assert!(e.starts_with(field), "{e}");
        }
    }

    #[test]
    fn a_misspelt_field_is_refused_by_name() {
        let e = serde_json::from_str::<MigrateVm>(r#"{"to":"h2","bandwith_mbit":100}"#)
            .expect_err("a typo must not be ignored");
        assert!(e.to_string().contains("bandwith_mbit"), "{e}");
    }
}

#[cfg(test)]
mod uri_tests {
    use super::*;

    #[test]
    fn migration_targets_are_tcp_with_a_real_port_only() {
        let u: MigrationUri = "tcp:10.77.0.12:49152".parse().unwrap();
        assert_eq!(u.to_string(), "tcp:10.77.0.12:49152");
        let v6: MigrationUri = "tcp:[fd00::2]:4000".parse().unwrap();
        assert_eq!(v6.to_string(), "tcp:[fd00::2]:4000");
        for bad in [
            // QEMU would run this as a shell command.
            "exec:touch /tmp/owned",
            "exec:/bin/sh -c 'id'",
            "file:/etc/passwd",
            "unix:/run/qemu.sock",
            "fd:3",
            "rdma:10.0.0.1:4000",
            "tcp:10.0.0.1:0",
            "tcp:0.0.0.0:4000",
            "tcp:255.255.255.255:4000",
            "tcp:224.0.0.1:4000",
            "tcp:host.example:4000",
            "tcp:10.0.0.1:4000,exec:id",
            "tcp:10.0.0.1",
            "",
        ] {
            assert!(bad.parse::<MigrationUri>().is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn a_hostile_start_request_does_not_deserialize() {
        let settings = serde_json::json!({
            "multifd_channels": 0, "max_bandwidth_mib_s": null, "downtime_limit_ms": 300,
            "compression": "none", "auto_converge": true, "postcopy_allowed": false,
            "deadline_ms": 60000, "reasons": []
        });
        let good = serde_json::json!({ "uri": "tcp:10.0.0.2:4000", "settings": settings });
        let req: StartOutgoing = serde_json::from_value(good).unwrap();
        assert_eq!(req.uri.addr().port(), 4000);
        assert_eq!(req.settings.zero_page_detection, ZeroPageDetection::Legacy);
        let exec = serde_json::json!({ "uri": "exec:id", "settings": settings });
        assert!(serde_json::from_value::<StartOutgoing>(exec).is_err());
        let mut odd = settings.clone();
        odd["compression"] = serde_json::json!("zlib,multifd-channels=64");
        let bad = serde_json::json!({ "uri": "tcp:10.0.0.2:4000", "settings": odd });
        assert!(serde_json::from_value::<StartOutgoing>(bad).is_err());
    }
}

#[cfg(test)]
mod key_tests {
    use super::*;

    #[test]
    fn keys_cross_the_wire_as_hex_and_never_show_in_debug_output() {
        let key = MigrationKey::from_bytes([0xa5; 32]);
        let json = serde_json::to_string(&key).unwrap();
        assert_eq!(json, format!("\"{}\"", "a5".repeat(32)));
        assert_eq!(serde_json::from_str::<MigrationKey>(&json).unwrap(), key);
        assert!(!format!("{key:?}").contains("a5"));
        let req = StartOutgoing {
            uri: "tcp:10.0.0.2:4000".parse().unwrap(),
            settings: serde_json::from_value(serde_json::json!({
                "multifd_channels": 0, "max_bandwidth_mib_s": null, "downtime_limit_ms": 300,
                "compression": "none", "auto_converge": false, "postcopy_allowed": false,
                "deadline_ms": 1000, "reasons": [], "encrypted": true
            }))
            .unwrap(),
            key: Some(key),
            switch_over_at_pause: false,
        };
        assert!(
            !format!("{req:?}").contains("a5a5"),
            "a logged request shows no key"
        );
    }

    #[test]
    fn malformed_keys_are_refused() {
        for bad in [
            "",
            "a5",
            &"g0".repeat(32),
            &"a5".repeat(33),
            &"é".repeat(32),
        ] {
            assert!(
                MigrationKey::try_from(bad.to_string()).is_err(),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn encryption_modes_parse_from_their_names_only() {
        for m in MigrationEncryption::ALL {
            assert_eq!(m.as_str().parse::<MigrationEncryption>(), Ok(m));
        }
        assert_eq!(
            MigrationEncryption::default(),
            MigrationEncryption::Required
        );
        assert!("Required".parse::<MigrationEncryption>().is_err());
        assert!("off".parse::<MigrationEncryption>().is_err());
    }
}
