//! The two ends of one live migration over QMP: [`Outgoing`] drives the source QEMU,
//! [`Incoming`] prepares and hands over the destination QEMU.
//!
//! The rules these ends keep so that the hand-over is a transaction (the center decides; these
//! obey and never decide ownership themselves):
//! - The source stops at `pre-switchover` with its guest paused and waits for an explicit
//!   [`Outgoing::switchover`] or [`Outgoing::abort`]. If neither comes within
//!   [`OutgoingOptions::switchover_wait`] it aborts on its own: a guest must not stay paused
//!   for a center that is gone, and nothing can have been committed before switchover. On a
//!   [`SwitchoverLeave`] that holds (its center was heard from just before) it sends its
//!   final state at once instead, and the switchover only waits for the end of the copy.
//! - Until the source has sent everything, any failure (destination gone, deadline, cancel)
//!   leaves the source running as before: QEMU restarts a guest whose migration failed, and
//!   the driver checks and `cont`s it if needed.
//! - After completion the source stays paused (`postmigrate`). Only an explicit
//!   [`Outgoing::abort`] — the center's word that the destination never ran — resumes it;
//!   [`Outgoing::finish`] quits it once the destination is committed.
//! - The destination starts with `-S` and `late-block-activate`: it runs no guest code and
//!   takes no disk write lock before [`Incoming::commit`]. QEMU's own announce at the end of
//!   loading is turned off (`announce-rounds` 0) so the LAN learns the new port only when the
//!   destination is committed, never while the source may still be resumed.
//! - `validate-uuid` makes the destination refuse a stream from any VM but the one it was
//!   started for; `return-path` makes the source's `completed` mean the destination loaded
//!   everything.

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tern_api::migration::{
    AgentMigrationState, Compression, MigrationKey, MigrationPhase, MigrationProgress,
    MigrationSettings, MigrationUri,
};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::command::{Incoming as IncomingMode, LaunchConfig, RunPaths};
use crate::error::{Error, Result};
use crate::migration::{AnnounceParams, MigrationStats, MigrationStatus};
use crate::vm::{QemuVm, RunState};
use tern_motion::{Action, ConvergenceWatcher, Decision};

/// How often the source is sampled (`query-migrate`); `MIGRATION` events wake it sooner.
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(100);
/// How long the source waits paused at pre-switchover for a decision before resuming itself
/// (the guest's pause limit below is usually shorter, and wins).
pub const SWITCHOVER_WAIT: Duration = Duration::from_secs(10);
/// Beyond the downtime budget, how long the guest may stay paused at the source before the
/// switchover watchdog gives it back: the center's decision and the final copy both fit in
/// the budget on a working link; the margin covers a loaded host, not a broken link.
pub const PAUSE_MARGIN: Duration = Duration::from_secs(2);
/// How long a cancelled migration may take to end, and a source guest to run again.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a post-copy source may take to send its last pages before `finish` gives up.
const POSTCOPY_DRAIN_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a committed destination may take to report `running`.
const RUN_TIMEOUT: Duration = Duration::from_secs(10);

/// Announce rounds after the hand-over: the first goes at once, then seven more within about
/// 1.5 s. A switch learns the new port from the first frame; the repeats cover frames lost
/// while a busy LAN drops some, and re-teach a switch that saw the old port since.
pub const COMMIT_ANNOUNCE: AnnounceParams = AnnounceParams {
    initial_ms: 20,
    max_ms: 400,
    rounds: 8,
    step_ms: 50,
};

/// Which end of a migration a QEMU is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Destination,
}

/// Migration capabilities tern sets, explicitly on or off (a previous attempt's leftovers
/// must not leak in). Both ends get the same set except the two one-sided ones.
pub fn capabilities(settings: &MigrationSettings, side: Side) -> Vec<(&'static str, bool)> {
    let multifd = settings.multifd_channels > 0 || settings.compression != Compression::None;
    vec![
        ("events", true),
        ("return-path", true),
        ("validate-uuid", true),
        ("multifd", multifd),
        ("postcopy-ram", settings.postcopy_allowed),
        ("auto-converge", settings.auto_converge),
        ("pause-before-switchover", side == Side::Source),
        ("late-block-activate", side == Side::Destination),
    ]
}

/// Migration parameters, in QEMU's names.
pub fn parameters(settings: &MigrationSettings, side: Side) -> Value {
    let mib = 1024 * 1024;
    let mut p = json!({
        // 0 is unlimited (QEMU >= 8.1). Post-copy keeps QEMU's default (unlimited): its pages
        // are what the running guest waits for, and a capped stream delays them too (measured:
        // a 4 MiB/s cap held a client's stream for 6 s after a post-copy switchover).
        "max-bandwidth": settings.max_bandwidth_mib_s.map(|m| m * mib).unwrap_or(0),
        "downtime-limit": settings.downtime_limit_ms,
        "multifd-compression": settings.compression.as_qemu(),
        "zero-page-detection": settings.zero_page_detection.as_qemu(),
        "throttle-trigger-threshold": settings.throttle.trigger_threshold_pct,
        "cpu-throttle-initial": settings.throttle.initial_pct,
        "cpu-throttle-increment": settings.throttle.increment_pct,
        "max-cpu-throttle": settings.throttle.max_pct,
    });
    if settings.multifd_channels > 0 || settings.compression != Compression::None {
        p["multifd-channels"] = json!(settings.multifd_channels.max(1));
    }
    if side == Side::Destination {
        p["announce-rounds"] = json!(0);
    }
    p
}

/// `relayed`: QEMU streams in clear to a relay on its own host, which encrypts between the
/// hosts (`tern_host::relay`), so QEMU gets no TLS credentials whatever the settings say.
async fn configure(
    vm: &QemuVm,
    settings: &MigrationSettings,
    key: Option<&MigrationKey>,
    side: Side,
    relayed: bool,
) -> Result<()> {
    vm.set_migration_capabilities(&capabilities(settings, side))
        .await?;
    let mut params = parameters(settings, side);
    params["tls-creds"] = json!(if relayed {
        ""
    } else {
        set_tls(vm, settings, key, side).await?
    });
    vm.set_migration_parameters(params).await
}

/// The finite-field Diffie-Hellman group `ffdhe2048` of RFC 7919 (public, standard
/// parameters), in the PKCS#3 form QEMU reads as `dh-params.pem`. Without that file QEMU's
/// server credentials generate a fresh 2048-bit group at every `object-add`: measured at
/// 210–460 ms of a destination's preparation on the lab machine, against about 3 ms with it.
const FFDHE2048_PEM: &str = "-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
";

/// QOM id of the TLS credentials tern gives a migrating QEMU.
const TLS_CREDS_ID: &str = "tern-migration-tls";
/// The identity both ends present with the pre-shared key.
const TLS_PSK_USER: &str = "tern";

/// Gives QEMU this migration's TLS credentials (QEMU's `tls-creds-psk`, replacing any an
/// earlier attempt left) and returns what `tls-creds` must name; `""` for a plain stream.
///
/// Both ends hold the same key, so the TLS handshake authenticates each to the other: a
/// process that connects to the destination's port without it fails the handshake, and QEMU
/// drops that connection and keeps listening (measured on QEMU 10: a plain destination fed
/// 64 junk bytes fails its migration instead). QEMU reads the key from `keys.psk` in a
/// directory: the source's client credentials read it once, when created, so its copy is
/// removed at once; the destination's server credentials read it at every handshake (one per
/// multifd channel), so it stays in the VM's 0700 run dir until the migration ends.
async fn set_tls(
    vm: &QemuVm,
    settings: &MigrationSettings,
    key: Option<&MigrationKey>,
    side: Side,
) -> Result<&'static str> {
    let key = match (settings.encrypted, key) {
        (false, None) => return Ok(""),
        (true, Some(key)) => key,
        (true, None) => {
            return Err(Error::Migration(
                "the migration is to be encrypted but no key came with it".into(),
            ))
        }
        (false, Some(_)) => {
            return Err(Error::Migration(
                "a migration key came with settings that do not encrypt".into(),
            ))
        }
    };
    // An earlier attempt's credentials hold an older key; none is no error.
    let _ = vm
        .qmp()
        .execute("object-del", Some(json!({ "id": TLS_CREDS_ID })))
        .await;
    let dir = vm.paths().migration_tls_dir.clone();
    write_psk(&dir, key, crate::process::owner(vm.pid()))?;
    let mut creds = json!({
        "qom-type": "tls-creds-psk",
        "id": TLS_CREDS_ID,
        // Relative to QEMU's working directory, its run dir.
        "dir": RunPaths::MIGRATION_TLS_DIR,
        "endpoint": match side { Side::Source => "client", Side::Destination => "server" },
    });
    if side == Side::Source {
        // A server finds the key by the name the client presents.
        creds["username"] = json!(TLS_PSK_USER);
    }
    let added = vm.qmp().execute("object-add", Some(creds)).await;
    if side == Side::Source || added.is_err() {
        remove_psk(&dir);
    }
    added?;
    Ok(TLS_CREDS_ID)
}

/// QEMU's URI for a unix socket in its run dir: relative to its working directory (the run
/// dir), because QEMU's user may not search the run dir's parents.
fn qemu_unix_uri(vm: &QemuVm, socket: &std::path::Path) -> String {
    let paths = vm.paths();
    let path = socket.strip_prefix(&paths.run_dir).unwrap_or(socket);
    format!("unix:{}", path.display())
}

/// Makes the directory of the VM's relay socket afresh (0700, owned by QEMU's user, who
/// creates the destination's socket and connects to the source's) and returns the socket's
/// path ([`RunPaths::migration_socket`]).
pub fn relay_socket(vm: &QemuVm) -> Result<std::path::PathBuf> {
    let socket = vm.paths().migration_socket.clone();
    let Some(dir) = socket.parent() else {
        return Err(Error::Migration(format!(
            "{} has no directory",
            socket.display()
        )));
    };
    fresh_dir_for_qemu(dir, crate::process::owner(vm.pid()))?;
    Ok(socket)
}

/// Makes `dir` afresh, 0700 and owned by QEMU's user (`owner`) when it is not root: where a
/// migration's files for QEMU go (the TLS key, the relay socket).
fn fresh_dir_for_qemu(dir: &std::path::Path, owner: Option<(u32, u32)>) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let io = |what: &str, e| Error::io(format!("{what} {}", dir.display()), e);
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("remove", e)),
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(|e| io("create", e))?;
    if let Some((uid, gid)) = owner.filter(|(uid, _)| *uid != 0) {
        nix::unistd::chown(
            dir,
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
        )
        .map_err(|e| io("give QEMU's user", e.into()))?;
    }
    Ok(())
}

/// Writes `keys.psk` (0600) in `dir` (0700), created afresh.
/// Writes the key where QEMU reads it: a 0700 directory and a 0600 file, both owned by QEMU's
/// user (`owner`) when it is not root.
fn write_psk(dir: &std::path::Path, key: &MigrationKey, owner: Option<(u32, u32)>) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |what: &str, e| Error::io(format!("{what} {}", dir.display()), e);
    fresh_dir_for_qemu(dir, owner)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dir.join("keys.psk"))
        .map_err(|e| io("write the migration key in", e))?;
    writeln!(f, "{TLS_PSK_USER}:{}", key.to_hex())
        .map_err(|e| io("write the migration key in", e))?;
    // Public, and read by the server end only.
    std::fs::write(dir.join("dh-params.pem"), FFDHE2048_PEM)
        .map_err(|e| io("write the DH group in", e))?;
    if let Some((uid, gid)) = owner.filter(|(uid, _)| *uid != 0) {
        let ids = (
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
        );
        nix::unistd::fchown(&f, ids.0, ids.1)
            .map_err(|e| io("give QEMU's user the migration key in", e.into()))?;
    }
    Ok(())
}

/// Removes a migration's key from the run dir (its credentials in QEMU stay until replaced).
pub(crate) fn remove_psk(dir: &std::path::Path) {
    let _ = std::fs::remove_dir_all(dir);
}

/// Figures of a finished (or post-copy switched) outgoing migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationReport {
    /// Guest pause as QEMU measured it (source).
    pub downtime_ms: u64,
    pub total_ms: u64,
    pub setup_ms: u64,
    /// Bytes sent (RAM).
    pub bytes: u64,
    /// Dirty-bitmap syncs (1 + RAM passes).
    pub passes: u64,
    /// From the source pausing at pre-switchover until it had sent everything.
    pub paused_ms: u64,
    /// From `switchover()` until the source had sent everything.
    pub switchover_ms: u64,
    /// True when the migration went post-copy: the destination must run for it to complete.
    pub postcopy: bool,
}

/// What the source end reports.
#[derive(Debug, Clone, PartialEq)]
pub struct OutgoingStatus {
    pub state: AgentMigrationState,
    pub progress: MigrationProgress,
    /// Decisions taken while running, each with its reason, oldest first.
    pub events: Vec<String>,
    pub report: Option<MigrationReport>,
    pub error: Option<String>,
}

/// Tuning of [`Outgoing`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingOptions {
    pub sample_interval: Duration,
    /// Longest pause at pre-switchover waiting for [`Outgoing::switchover`].
    pub switchover_wait: Duration,
    /// The switchover watchdog's margin: the guest stays paused at the source for at most
    /// the downtime budget plus this; then a pending decision is refused, or a final copy
    /// that has not finished is cut (its sockets shut), and the guest runs on the source.
    pub pause_margin: Duration,
    /// Stream in clear to a relay listening on this host's unix socket (the VM's
    /// [`RunPaths::migration_socket`]) instead of to the destination's URI: the relay encrypts
    /// and carries it there. `None`: QEMU sends to the URI itself, with its own TLS when the
    /// settings encrypt.
    pub relay: Option<std::path::PathBuf>,
    /// Leave to send the final state the moment the guest pauses at pre-switchover, while
    /// it holds ([`SwitchoverLeave`]), instead of waiting for [`Outgoing::switchover`], which
    /// then only waits for the end of the copy. `None`: always wait for the decision.
    pub switchover_leave: Option<Arc<SwitchoverLeave>>,
}

/// Leave for a source to send its final state at the pause without waiting for the decision:
/// the decision's round trip then leaves the guest's pause. It holds while whoever decides
/// the hand-over has been heard from within `max_age` ([`SwitchoverLeave::renew`]).
///
/// Why a lease: a source paused at pre-switchover can give its guest back on its own when
/// nobody decides (the switchover watchdog), since nothing can have run elsewhere; once it
/// has sent everything it cannot, since the decider may have committed the destination. So
/// a source whose decider has gone quiet waits for the decision as without leave, and a
/// decider lost after the leave was used holds the guest paused until it (or its successor)
/// commits or rolls back — the same as one lost just after it said to switch over.
#[derive(Debug)]
pub struct SwitchoverLeave {
    heard: std::sync::Mutex<Instant>,
    max_age: Duration,
}

impl SwitchoverLeave {
    /// A leave heard from now, holding for `max_age` after each renewal.
    pub fn new(max_age: Duration) -> Arc<SwitchoverLeave> {
        Arc::new(SwitchoverLeave {
            heard: std::sync::Mutex::new(Instant::now()),
            max_age,
        })
    }

    /// The decider was heard from just now.
    pub fn renew(&self) {
        *self.heard.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    /// How long ago the decider was last heard from.
    pub fn silent_for(&self) -> Duration {
        self.heard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed()
    }

    /// Whether the leave holds now.
    pub fn holds(&self) -> bool {
        self.silent_for() <= self.max_age
    }
}

impl PartialEq for SwitchoverLeave {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
    }
}

impl Eq for SwitchoverLeave {}

impl Default for OutgoingOptions {
    fn default() -> Self {
        OutgoingOptions {
            sample_interval: SAMPLE_INTERVAL,
            switchover_wait: SWITCHOVER_WAIT,
            pause_margin: PAUSE_MARGIN,
            relay: None,
            switchover_leave: None,
        }
    }
}

/// What a lost driver knew, for [`Outgoing::attach`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    /// Time since the migration started.
    pub elapsed: Duration,
    /// Whether the guest ran when it started (a rollback resumes it).
    pub was_running: bool,
    /// The decisions reported so far.
    pub events: Vec<String>,
}

enum Control {
    Switchover(oneshot::Sender<Result<MigrationReport>>),
    Abort(String, oneshot::Sender<Result<()>>),
    Detach(oneshot::Sender<()>),
}

/// The source end of a migration: configures QEMU, starts `migrate`, samples progress, applies
/// the [`ConvergenceWatcher`]'s escalations, and stops paused at pre-switchover for the
/// hand-over decision.
pub struct Outgoing {
    vm: Arc<QemuVm>,
    /// Shared with the driver task; this end publishes too once the driver has ended.
    status: Arc<watch::Sender<OutgoingStatus>>,
    ctl: mpsc::Sender<Control>,
    was_running: bool,
    /// The driver's [`OutgoingOptions::switchover_leave`].
    leave: Option<Arc<SwitchoverLeave>>,
}

impl std::fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outgoing")
            .field("pid", &self.vm.pid())
            .field("state", &self.status.borrow().state)
            .finish()
    }
}

impl Outgoing {
    /// Configures the source and starts sending to `uri` (the destination's
    /// [`Incoming::uri`]). Returns once QEMU has accepted `migrate`; progress is then watched
    /// by a task of its own. Dropping the `Outgoing` before completion aborts the migration.
    pub async fn start(
        vm: Arc<QemuVm>,
        uri: &MigrationUri,
        settings: &MigrationSettings,
        key: Option<&MigrationKey>,
        opts: OutgoingOptions,
    ) -> Result<Outgoing> {
        let current = vm.query_migrate().await?;
        if !matches!(current.status, MigrationStatus::None) && !current.status.is_finished() {
            return Err(Error::Migration(format!(
                "a migration is already {} on this VM",
                current.status
            )));
        }
        let was_running = vm.status().await? == RunState::Running;
        let relayed = opts.relay.is_some();
        configure(&vm, settings, key, Side::Source, relayed).await?;
        let started = Instant::now();
        match &opts.relay {
            Some(socket) => vm.migrate(&qemu_unix_uri(&vm, socket)).await?,
            None => vm.migrate(&uri.to_string()).await?,
        }
        let mut events = Vec::new();
        let line = format!(
            "started to {uri}: {} channel(s){}, compression {}, downtime limit {} ms (budget {} \
             ms), max-bandwidth {}, deadline {} s",
            settings.multifd_channels.max(1),
            match (settings.encrypted, relayed, settings.relay_source) {
                (true, true, Some(from)) => {
                    format!(" encrypted by the hosts' relays (taken from {from} only)")
                }
                (true, true, None) => " encrypted by the hosts' relays".into(),
                (true, false, _) => " encrypted by QEMU".into(),
                (false, ..) => String::new(),
            },
            settings.compression,
            settings.downtime_limit_ms,
            settings.downtime_budget_ms,
            settings
                .max_bandwidth_mib_s
                .map(|m| format!("{m} MiB/s"))
                .unwrap_or_else(|| "unlimited".into()),
            settings.deadline_ms / 1000
        );
        tracing::info!(pid = vm.pid(), "migration {line}");
        events.push(format!("+0.0s {line}"));
        let status = Arc::new(watch::Sender::new(OutgoingStatus {
            state: AgentMigrationState::Active,
            progress: progress(
                &current,
                0,
                MigrationPhase::PreCopy,
                settings.downtime_limit_ms,
            ),
            events,
            report: None,
            error: None,
        }));
        let (ctl, ctl_rx) = mpsc::channel(4);
        let leave = opts.switchover_leave.clone();
        let driver = Driver::new(&vm, settings, opts, started, &status, was_running);
        tokio::spawn(driver.run(ctl_rx));
        Ok(Outgoing {
            vm,
            status,
            ctl,
            was_running,
            leave,
        })
    }

    /// Takes over a migration this process did not start: its driver was lost (the agent
    /// restarted) while QEMU went on migrating. `resume` says what the lost driver knew.
    ///
    /// - Still copying (setup or pre-copy): watched on from here, with a fresh convergence
    ///   watcher over the migration's whole elapsed time, so its deadline still holds.
    /// - Paused at pre-switchover: nobody can tell for how long the guest has waited, and
    ///   nothing was committed before the switchover, so the migration is cancelled and the
    ///   source resumed at once (the switchover watchdog's rule).
    /// - In its final copy or post-copy (the lost driver had let it continue): watched to its
    ///   end, the watchdog re-armed for one margin.
    /// - Ended (completed, failed, cancelled): reported as such, so that the center's commit,
    ///   finish or abort finds it.
    ///
    /// Refuses a QEMU that has no migration at all: then there is nothing to take over.
    pub async fn attach(
        vm: Arc<QemuVm>,
        settings: &MigrationSettings,
        opts: OutgoingOptions,
        resume: Resume,
    ) -> Result<Outgoing> {
        let stats = vm.query_migrate().await?;
        if matches!(stats.status, MigrationStatus::None) {
            return Err(Error::Migration(
                "QEMU has no migration to re-attach to".into(),
            ));
        }
        let now = Instant::now();
        let started = now.checked_sub(resume.elapsed).unwrap_or(now);
        let phase = match stats.status {
            MigrationStatus::PreSwitchover | MigrationStatus::Device => MigrationPhase::Switchover,
            _ => MigrationPhase::PreCopy,
        };
        let status = Arc::new(watch::Sender::new(OutgoingStatus {
            state: AgentMigrationState::Active,
            progress: progress(
                &stats,
                resume.elapsed.as_millis() as u64,
                phase,
                settings.downtime_limit_ms,
            ),
            events: resume.events,
            report: None,
            error: None,
        }));
        let (ctl, ctl_rx) = mpsc::channel(4);
        let leave = opts.switchover_leave.clone();
        let mut driver = Driver::new(&vm, settings, opts, started, &status, resume.was_running);
        driver.event(format!(
            "re-attached after the agent restarted: QEMU kept the migration going ({}, pass {}, {:.1} MiB left)",
            stats.status,
            stats.dirty_sync_count,
            stats.remaining_bytes as f64 / 1048576.0
        ));
        match stats.status {
            MigrationStatus::PreSwitchover => {
                driver.pre_switchover_since = Some(now);
                driver
                    .status_tx
                    .send_modify(|s| s.state = AgentMigrationState::PreSwitchover);
                let reason = "the guest was paused at pre-switchover while the agent was away, for longer than its pause limit can be vouched for; the guest runs on the source";
                if let Err(e) = driver.abort(reason).await {
                    tracing::error!(error = %e, "abort at pre-switchover after re-attaching failed");
                }
                // The driver is done: `ctl_rx` is dropped, and the calls see the ended state.
            }
            MigrationStatus::Device
            | MigrationStatus::PostcopyActive
            | MigrationStatus::PostcopyPaused
            | MigrationStatus::PostcopyRecover
            | MigrationStatus::PostcopyRecoverSetup
            | MigrationStatus::Completed => {
                // The lost driver had let it continue.
                driver.pre_switchover_since = Some(now);
                driver.continued_at = Some(now);
                driver
                    .status_tx
                    .send_modify(|s| s.state = AgentMigrationState::PreSwitchover);
                if stats.status == MigrationStatus::Device {
                    driver.arm_watchdog(now + driver.opts.pause_margin);
                }
                tokio::spawn(driver.run(ctl_rx));
            }
            _ => {
                tokio::spawn(driver.run(ctl_rx));
            }
        }
        Ok(Outgoing {
            vm,
            status,
            ctl,
            was_running: resume.was_running,
            leave,
        })
    }

    /// The source VM.
    pub fn vm(&self) -> &Arc<QemuVm> {
        &self.vm
    }

    /// Stops following the migration without touching QEMU, which goes on migrating alone
    /// (an agent shutting down for a restart: the next one re-attaches with
    /// [`Outgoing::attach`]). Dropping this `Outgoing` afterwards no longer aborts.
    pub async fn detach(&self) {
        let (tx, rx) = oneshot::channel();
        if self.ctl.send(Control::Detach(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Whoever decides the hand-over was heard from just now: renews the leave to switch over
    /// at the pause, if there is one ([`SwitchoverLeave`]).
    pub fn decider_heard(&self) {
        if let Some(l) = &self.leave {
            l.renew();
        }
    }

    /// Whether the guest ran when the migration started (a rollback resumes it then).
    pub fn was_running(&self) -> bool {
        self.was_running
    }

    /// The latest status.
    pub fn status(&self) -> OutgoingStatus {
        self.status.borrow().clone()
    }

    /// A receiver that sees every status change.
    pub fn watch(&self) -> watch::Receiver<OutgoingStatus> {
        self.status.subscribe()
    }

    /// Waits until the migration is paused at pre-switchover (`Ok`) or has ended without
    /// getting there (`Err` with the reason).
    pub async fn wait_pre_switchover(&self, timeout: Duration) -> Result<OutgoingStatus> {
        let mut rx = self.status.subscribe();
        let wait = rx.wait_for(|s| {
            !matches!(
                s.state,
                AgentMigrationState::Active | AgentMigrationState::Listening
            )
        });
        let status = match tokio::time::timeout(timeout, wait).await {
            Err(_) => {
                return Err(Error::Timeout {
                    what: "the migration to reach pre-switchover".into(),
                    timeout_ms: timeout.as_millis() as u64,
                })
            }
            Ok(Err(_)) => self.status(),
            Ok(Ok(s)) => s.clone(),
        };
        match status.state {
            AgentMigrationState::PreSwitchover => Ok(status),
            // Post-copy switched: completes only once the destination runs.
            AgentMigrationState::Completed if status.report.is_some() => Ok(status),
            other => Err(Error::Migration(format!(
                "migration ended {other:?} before pre-switchover: {}",
                status.error.unwrap_or_default()
            ))),
        }
    }

    /// Lets a migration paused at pre-switchover send its final state (`migrate-continue`)
    /// and waits until the source has sent everything (on [`OutgoingOptions::switchover_leave`]
    /// it may be sending already: this then only waits). The guest then stays paused on both
    /// ends until the destination is committed ([`Incoming::commit`]) or this end aborted.
    pub async fn switchover(&self) -> Result<MigrationReport> {
        let (tx, rx) = oneshot::channel();
        if self.ctl.send(Control::Switchover(tx)).await.is_err() {
            return self.finished_report();
        }
        match rx.await {
            Ok(r) => r,
            Err(_) => self.finished_report(),
        }
    }

    fn finished_report(&self) -> Result<MigrationReport> {
        let s = self.status();
        match (s.state, s.report) {
            (AgentMigrationState::Completed, Some(r)) => Ok(r),
            (state, _) => Err(Error::Migration(format!(
                "no switchover possible: migration is {state:?}{}",
                s.error.map(|e| format!(" ({e})")).unwrap_or_default()
            ))),
        }
    }

    /// Gives the migration up and makes sure the source guest runs again (if it ran before).
    ///
    /// Before completion this cancels. After completion it resumes the source (`cont`
    /// re-activates its disks) and re-announces its MAC: the caller must know that the
    /// destination never ran the guest (the center's ownership record says so).
    pub async fn abort(&self, reason: &str) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        if self
            .ctl
            .send(Control::Abort(reason.to_string(), tx))
            .await
            .is_ok()
        {
            if let Ok(r) = rx.await {
                return r;
            }
        }
        // The driver has ended: the migration completed, failed or was cancelled.
        let status = self.status();
        match status.state {
            AgentMigrationState::Completed => {
                if status.report.as_ref().is_some_and(|r| r.postcopy) {
                    return Err(Error::Migration(
                        "the migration went post-copy: the source's memory is no longer whole, \
                         it cannot resume"
                            .into(),
                    ));
                }
                tracing::warn!(pid = self.vm.pid(), reason, "resuming a migrated source");
                resume_source(&self.vm, self.was_running).await?;
                if self.was_running {
                    // The LAN may have been taught the destination's port meanwhile.
                    self.vm.announce_self(&COMMIT_ANNOUNCE).await?;
                }
                self.status.send_modify(|s| {
                    s.state = AgentMigrationState::Cancelled;
                    s.error = Some(reason.to_string());
                    s.progress.phase = MigrationPhase::RollingBack;
                    s.events.push(format!(
                        "rolled back after completion: {reason}; source resumed"
                    ));
                });
                Ok(())
            }
            _ => resume_source(&self.vm, self.was_running).await,
        }
    }

    /// After the destination is committed: quits the paused source QEMU. Refuses if the
    /// source guest is running (it must never run again once the destination owns the VM —
    /// if it does, something is badly wrong and a human must look).
    ///
    /// After a post-copy switchover the source still serves the pages the destination has not
    /// fetched yet: it is quit only once QEMU reports the migration completed.
    pub async fn finish(&self) -> Result<()> {
        let state = self.vm.status().await?;
        if state == RunState::Running {
            return Err(Error::Migration(
                "the source guest is running: refusing to quit it as a migrated source".into(),
            ));
        }
        let deadline = Instant::now() + POSTCOPY_DRAIN_TIMEOUT;
        loop {
            let m = self.vm.query_migrate().await?;
            match m.status {
                MigrationStatus::PostcopyActive
                | MigrationStatus::PostcopyPaused
                | MigrationStatus::PostcopyRecover
                | MigrationStatus::PostcopyRecoverSetup => {
                    if Instant::now() > deadline {
                        return Err(Error::Timeout {
                            what: format!(
                                "post-copy to finish sending ({:.1} MiB left, {})",
                                m.remaining_bytes as f64 / 1048576.0,
                                m.status
                            ),
                            timeout_ms: POSTCOPY_DRAIN_TIMEOUT.as_millis() as u64,
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                _ => break,
            }
        }
        // Freeing the guest's memory takes the CPU for a while: it must yield to the VMs
        // still running here.
        let pid = self.vm.pid();
        match crate::process::lowest_priority(pid) {
            Ok(n) => tracing::debug!(pid, threads = n, "migrated source lowered to nice 19"),
            Err(e) => tracing::debug!(pid, error = %e, "migrated source kept its priority"),
        }
        self.vm.shutdown(Duration::ZERO).await.map(drop)
    }
}

const POSTCOPY_CANNOT_ABORT: &str =
    "the migration is in post-copy: the source's memory is no longer whole, it cannot resume";

/// Whether an abort failed only because the migration is in post-copy (it goes on).
fn is_postcopy_refusal(r: &Result<()>) -> bool {
    matches!(r, Err(Error::Migration(m)) if m == POSTCOPY_CANNOT_ABORT)
}

/// How long a cancel may stay `cancelling` before tern yanks the migration's sockets.
const CANCEL_GRACE: Duration = Duration::from_secs(1);

/// After `migrate_cancel`: if QEMU is still `cancelling` after [`CANCEL_GRACE`] (a sender
/// blocked on a link that went silent), shuts down all the migration's sockets. Returns the
/// event to record when it had to.
async fn unblock_cancel(vm: &QemuVm) -> Option<String> {
    let started = Instant::now();
    loop {
        match vm.query_migrate().await {
            Ok(m) if m.status == MigrationStatus::Cancelling => {}
            _ => return None,
        }
        if started.elapsed() >= CANCEL_GRACE {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Some(match vm.yank_migration().await {
        Ok(()) => format!(
            "cancel still pending after {} ms (a sender blocked on the silent link): shut down the migration's sockets (QMP yank)",
            CANCEL_GRACE.as_millis()
        ),
        Err(e) => format!(
            "cancel still pending after {} ms; shutting down the migration's sockets failed: {e}",
            CANCEL_GRACE.as_millis()
        ),
    })
}

/// Waits for a failed or cancelled migration's source to run again, `cont`ing it if QEMU did
/// not restart it itself.
async fn resume_source(vm: &QemuVm, was_running: bool) -> Result<()> {
    if !was_running {
        return Ok(());
    }
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let ended = loop {
        let m = vm.query_migrate().await?;
        if matches!(m.status, MigrationStatus::None) || m.status.is_finished() {
            break m.status;
        }
        if Instant::now() > deadline {
            return Err(Error::Timeout {
                what: format!("the migration to end (still {})", m.status),
                timeout_ms: SETTLE_TIMEOUT.as_millis() as u64,
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // QEMU restarts the guest itself right after a failed or cancelled migration ends; after a
    // completed one it leaves it paused (`postmigrate`) for good: waiting there would only
    // lengthen the guest's pause (it did, by 500 ms, in every rollback after a switchover).
    if ended != MigrationStatus::Completed
        && vm
            .wait_status(|s| *s == RunState::Running, Duration::from_millis(500))
            .await
            .is_ok()
    {
        return Ok(());
    }
    vm.resume().await?;
    vm.wait_status(|s| *s == RunState::Running, SETTLE_TIMEOUT)
        .await
        .map(drop)
}

fn progress(
    s: &MigrationStats,
    elapsed_ms: u64,
    phase: MigrationPhase,
    downtime_limit_ms: u64,
) -> MigrationProgress {
    MigrationProgress {
        phase,
        pass: s.dirty_sync_count,
        transferred_bytes: s.transferred_bytes,
        remaining_bytes: s.remaining_bytes,
        total_bytes: s.total_bytes,
        mbit_s: s.mbps,
        dirty_rate_mib_s: (s.dirty_pages_rate * s.page_size_bytes) as f64 / (1024.0 * 1024.0),
        expected_downtime_ms: s.expected_downtime_ms.unwrap_or(0),
        elapsed_ms,
        cpu_throttle_pct: s.cpu_throttle_percent.unwrap_or(0),
        downtime_limit_ms,
    }
}

enum Flow {
    Continue,
    Done,
}

struct Driver {
    vm: Arc<QemuVm>,
    watcher: ConvergenceWatcher,
    /// Longest the guest may stay paused here (downtime budget + margin).
    pause_limit: Duration,
    /// Set when the watchdog cut a final copy that outlived the pause limit.
    watchdog_fired: Arc<std::sync::atomic::AtomicBool>,
    opts: OutgoingOptions,
    started: Instant,
    status_tx: Arc<watch::Sender<OutgoingStatus>>,
    was_running: bool,
    pre_switchover_since: Option<Instant>,
    continued_at: Option<Instant>,
    switchover_reply: Option<oneshot::Sender<Result<MigrationReport>>>,
}

impl Driver {
    fn new(
        vm: &Arc<QemuVm>,
        settings: &MigrationSettings,
        opts: OutgoingOptions,
        started: Instant,
        status_tx: &Arc<watch::Sender<OutgoingStatus>>,
        was_running: bool,
    ) -> Driver {
        let budget_ms = settings.downtime_budget_ms.max(settings.downtime_limit_ms);
        Driver {
            vm: vm.clone(),
            watcher: ConvergenceWatcher::new(settings),
            pause_limit: Duration::from_millis(budget_ms) + opts.pause_margin,
            watchdog_fired: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            opts,
            started,
            status_tx: status_tx.clone(),
            was_running,
            pre_switchover_since: None,
            continued_at: None,
            switchover_reply: None,
        }
    }

    fn elapsed_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn event(&self, line: String) {
        tracing::info!(pid = self.vm.pid(), "migration: {line}");
        let stamped = format!("+{:.1}s {line}", self.elapsed_ms() as f64 / 1000.0);
        self.status_tx.send_modify(|s| s.events.push(stamped));
    }

    fn end(&mut self, state: AgentMigrationState, error: Option<String>) {
        if let Some(e) = &error {
            self.event(format!("ended {state:?}: {e}"));
        }
        self.status_tx.send_modify(|s| {
            s.state = state;
            s.error = error.clone();
            s.progress.phase = MigrationPhase::RollingBack;
        });
        if let Some(reply) = self.switchover_reply.take() {
            let _ = reply.send(Err(Error::Migration(
                error.unwrap_or_else(|| format!("migration ended {state:?}")),
            )));
        }
    }

    async fn run(mut self, mut ctl: mpsc::Receiver<Control>) {
        let mut events = self.vm.qmp().events();
        let mut tick = tokio::time::interval(self.opts.sample_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                c = ctl.recv() => match c {
                    Some(Control::Switchover(reply)) => {
                        if let Err(e) = self.switchover(reply).await {
                            tracing::warn!(error = %e, "switchover refused");
                        }
                    }
                    Some(Control::Detach(reply)) => {
                        tracing::info!(pid = self.vm.pid(), "migration driver detached: QEMU goes on alone");
                        let _ = reply.send(());
                        return;
                    }
                    Some(Control::Abort(reason, reply)) => {
                        let r = self.abort(&reason).await;
                        let refused = is_postcopy_refusal(&r);
                        let _ = reply.send(r);
                        if refused {
                            // Post-copy: the migration must finish; keep watching it.
                            continue;
                        }
                        return;
                    }
                    None => {
                        if let Err(e) = self.abort("the migration's owner went away").await {
                            tracing::error!(error = %e, "abort after the owner went away failed");
                        }
                        return;
                    }
                },
                ev = events.recv() => match ev {
                    Ok(e) if e.name != "MIGRATION" && e.name != "MIGRATION_PASS" => continue,
                    Err(broadcast::error::RecvError::Closed) => {
                        // QEMU is gone: the sample below reports it. Stop listening.
                        events = broadcast::channel(1).1;
                    }
                    _ => {}
                },
                _ = tick.tick() => {}
            }
            if let Flow::Done = self.sample().await {
                return;
            }
        }
    }

    async fn sample(&mut self) -> Flow {
        let stats = match self.vm.query_migrate().await {
            Ok(s) => s,
            Err(e) => {
                let why = match self.vm.exit_reason() {
                    Some(r) => format!("the source QEMU ended: {r}"),
                    None => format!("cannot query the source QEMU: {e}"),
                };
                self.end(AgentMigrationState::Failed, Some(why));
                return Flow::Done;
            }
        };
        let elapsed = self.elapsed_ms();
        let phase = match stats.status {
            MigrationStatus::PostcopyActive
            | MigrationStatus::PostcopyPaused
            | MigrationStatus::PostcopyRecover
            | MigrationStatus::PostcopyRecoverSetup => MigrationPhase::PostCopy,
            MigrationStatus::PreSwitchover | MigrationStatus::Device => MigrationPhase::Switchover,
            MigrationStatus::Completed => MigrationPhase::Switchover,
            MigrationStatus::Cancelling | MigrationStatus::Cancelled | MigrationStatus::Failed => {
                MigrationPhase::RollingBack
            }
            _ if stats.cpu_throttle_percent.unwrap_or(0) > 0 => MigrationPhase::Throttling,
            _ => MigrationPhase::PreCopy,
        };
        let limit = self.watcher.downtime_limit_ms();
        self.status_tx
            .send_modify(|s| s.progress = progress(&stats, elapsed, phase, limit));

        for d in self.watcher.observe(elapsed, &stats.precopy_sample()) {
            if let Flow::Done = self.apply(d).await {
                return Flow::Done;
            }
        }
        match stats.status {
            MigrationStatus::PreSwitchover => {
                let since = match self.pre_switchover_since {
                    Some(t) => t,
                    None => {
                        let now = Instant::now();
                        self.pre_switchover_since = Some(now);
                        self.status_tx
                            .send_modify(|s| s.state = AgentMigrationState::PreSwitchover);
                        self.event(format!(
                            "pre-switchover: guest paused in pass {} with {:.1} MiB left for \
                             the final copy; {}",
                            stats.dirty_sync_count,
                            stats.remaining_bytes as f64 / 1048576.0,
                            match &self.opts.switchover_leave {
                                Some(l) if l.holds() => "sending it at once (the center \
                                    commits or rolls back after)"
                                    .to_string(),
                                Some(l) => format!(
                                    "the center was last heard {} ms ago: waiting for its \
                                     decision",
                                    l.silent_for().as_millis()
                                ),
                                None => "waiting for the hand-over decision".to_string(),
                            }
                        ));
                        if self
                            .opts
                            .switchover_leave
                            .as_ref()
                            .is_some_and(|l| l.holds())
                        {
                            if let Err(e) = self.send_final_state(now).await {
                                // The decision (or the watchdog) comes as without leave.
                                self.event(format!("sending the final state at once failed: {e}"));
                            }
                        }
                        now
                    }
                };
                let wait = self.opts.switchover_wait.min(self.pause_limit);
                if self.continued_at.is_none() && since.elapsed() > wait {
                    let reason = format!(
                        "no switchover decision within {} ms of pausing (switchover watchdog: \
                         the guest's pause is bounded by its downtime budget plus {} ms); the \
                         guest runs on the source",
                        wait.as_millis(),
                        self.opts.pause_margin.as_millis()
                    );
                    if let Err(e) = self.abort(&reason).await {
                        tracing::error!(error = %e, "abort at pre-switchover failed");
                    }
                    return Flow::Done;
                }
                Flow::Continue
            }
            MigrationStatus::Completed => {
                // A driver that re-attached may find a post-copy already completed: then the
                // source's memory was never whole at the end, and it must not resume.
                self.complete(&stats, stats.postcopy_bytes > 0);
                Flow::Done
            }
            MigrationStatus::PostcopyActive if self.continued_at.is_some() => {
                // The device state is across: completion needs the destination to run.
                self.complete(&stats, true);
                Flow::Done
            }
            MigrationStatus::Failed => {
                let mut why = stats
                    .error
                    .clone()
                    .unwrap_or_else(|| "QEMU reported the migration failed".into());
                if self
                    .watchdog_fired
                    .load(std::sync::atomic::Ordering::Relaxed)
                {
                    why = format!(
                        "switchover watchdog: the final copy had not finished {} ms after the \
                         guest paused (its downtime budget plus {} ms), so its sockets were \
                         shut ({why})",
                        self.pause_limit.as_millis(),
                        self.opts.pause_margin.as_millis()
                    );
                }
                let resumed = resume_source(&self.vm, self.was_running).await;
                let why = match resumed {
                    Ok(()) => format!("{why}; source running"),
                    Err(e) => format!("{why}; resuming the source failed: {e}"),
                };
                self.end(AgentMigrationState::Failed, Some(why));
                Flow::Done
            }
            MigrationStatus::Cancelled => {
                let resumed = resume_source(&self.vm, self.was_running).await;
                let why = match resumed {
                    Ok(()) => "cancelled outside tern; source running".to_string(),
                    Err(e) => format!("cancelled outside tern; resuming the source failed: {e}"),
                };
                self.end(AgentMigrationState::Cancelled, Some(why));
                Flow::Done
            }
            _ => Flow::Continue,
        }
    }

    fn complete(&mut self, stats: &MigrationStats, postcopy: bool) {
        let now = Instant::now();
        let since = |t: Option<Instant>| {
            t.map(|t| now.duration_since(t).as_millis() as u64)
                .unwrap_or(0)
        };
        let report = MigrationReport {
            downtime_ms: stats.downtime_ms.unwrap_or(0),
            total_ms: stats.total_time_ms.unwrap_or_else(|| self.elapsed_ms()),
            setup_ms: stats.setup_time_ms.unwrap_or(0),
            bytes: stats.transferred_bytes,
            passes: stats.dirty_sync_count,
            paused_ms: since(self.pre_switchover_since),
            switchover_ms: since(self.continued_at),
            postcopy,
        };
        self.event(format!(
            "{}: {:.1} MiB sent in {} passes, {} ms total, QEMU downtime {} ms, paused {} ms \
             at the source",
            if postcopy {
                "switched to the destination (post-copy)"
            } else {
                "all state sent"
            },
            report.bytes as f64 / 1048576.0,
            report.passes,
            report.total_ms,
            report.downtime_ms,
            report.paused_ms
        ));
        self.status_tx.send_modify(|s| {
            s.state = AgentMigrationState::Completed;
            s.report = Some(report.clone());
        });
        if let Some(reply) = self.switchover_reply.take() {
            let _ = reply.send(Ok(report));
        }
    }

    async fn apply(&mut self, d: Decision) -> Flow {
        let result = match &d.action {
            Action::RaiseDowntime { downtime_limit_ms } => {
                self.vm
                    .set_migration_parameters(json!({ "downtime-limit": downtime_limit_ms }))
                    .await
            }
            Action::Throttle {
                trigger_threshold_pct,
                initial_pct,
                increment_pct,
            } => {
                self.vm
                    .set_migration_parameters(json!({
                        "throttle-trigger-threshold": trigger_threshold_pct,
                        "cpu-throttle-initial": initial_pct,
                        "cpu-throttle-increment": increment_pct,
                    }))
                    .await
            }
            Action::StartPostcopy => self.vm.migrate_start_postcopy().await,
            Action::SetBandwidth {
                max_bandwidth_mib_s,
            } => {
                // 0 = unlimited, as when the migration was set up.
                let bytes = max_bandwidth_mib_s.map(|m| m * 1024 * 1024).unwrap_or(0);
                self.vm
                    .set_migration_parameters(json!({ "max-bandwidth": bytes }))
                    .await
            }
            Action::Hold | Action::Note => Ok(()),
            Action::Cancel => {
                if let Err(e) = self.abort(&d.reason).await {
                    tracing::error!(error = %e, "cancel at the deadline failed");
                }
                return Flow::Done;
            }
        };
        match result {
            Ok(()) => self.event(d.reason),
            Err(e) => self.event(format!("{} — but QEMU refused: {e}", d.reason)),
        }
        Flow::Continue
    }

    async fn switchover(&mut self, reply: oneshot::Sender<Result<MigrationReport>>) -> Result<()> {
        let state = self.status_tx.borrow().state;
        if state == AgentMigrationState::PreSwitchover
            && self.continued_at.is_some()
            && self.switchover_reply.is_none()
        {
            // Already sending (since the pause, on leave; or a driver taken over mid-copy): the
            // answer comes with the end of the copy.
            self.switchover_reply = Some(reply);
            return Ok(());
        }
        if state != AgentMigrationState::PreSwitchover || self.continued_at.is_some() {
            let e = Error::Migration(format!(
                "switchover needs the migration paused at pre-switchover; it is {state:?}"
            ));
            let msg = e.to_string();
            let _ = reply.send(Err(e));
            return Err(Error::Migration(msg));
        }
        if let Err(e) = self.send_final_state(Instant::now()).await {
            let msg = e.to_string();
            let _ = reply.send(Err(e));
            return Err(Error::Migration(msg));
        }
        self.switchover_reply = Some(reply);
        Ok(())
    }

    /// `migrate-continue`, with the switchover watchdog armed first: QEMU may answer it only
    /// once the final copy lets go of its main loop, which on a silent link is never.
    async fn send_final_state(&mut self, now: Instant) -> Result<()> {
        self.arm_watchdog(self.pre_switchover_since.unwrap_or(now) + self.pause_limit);
        self.vm.migrate_continue().await?;
        self.continued_at = Some(now);
        self.event("switchover: sending the final state".into());
        Ok(())
    }

    /// The switchover watchdog. The final copy runs with QEMU's main loop held: on a link
    /// that went silent it blocks until TCP gives up (minutes), the guest paused all along,
    /// and no in-band command is heard. So a task of its own waits for `deadline` and, if the
    /// copy is still going (and has not turned post-copy, which must finish), shuts the
    /// migration's sockets out of band. The copy then fails, QEMU resumes the guest on the
    /// source, and the driver reports why. Nothing has been committed at that point — the
    /// destination runs only after the source completed — so giving the guest back is safe.
    fn arm_watchdog(&self, deadline: Instant) {
        let vm = self.vm.clone();
        let status = self.status_tx.subscribe();
        let fired = self.watchdog_fired.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(deadline.into()).await;
            let still_copying = {
                let s = status.borrow();
                s.state == AgentMigrationState::PreSwitchover
                    && s.progress.phase != MigrationPhase::PostCopy
            };
            if !still_copying {
                return;
            }
            fired.store(true, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(pid = vm.pid(), "switchover watchdog: the final copy outlived the pause limit; shutting its sockets");
            if let Err(e) = vm.yank_migration().await {
                tracing::error!(pid = vm.pid(), error = %e, "switchover watchdog: yank failed");
            }
        });
    }

    /// Cancels (before completion) and makes sure the source runs again.
    ///
    /// If the migration cannot be ended (QEMU does not answer, or stays `cancelling`), it is
    /// marked failed with why, so that the VM is not held as "being migrated" forever; QEMU
    /// itself refuses a new migration while its old one is still active. Only a post-copy
    /// migration, which must finish, keeps its state.
    async fn abort(&mut self, reason: &str) -> Result<()> {
        let r = self.cancel_and_resume(reason).await;
        if let Err(e) = &r {
            if !is_postcopy_refusal(&r) {
                self.end(
                    AgentMigrationState::Failed,
                    Some(format!("{reason}; ending the migration failed: {e}")),
                );
            }
        }
        r
    }

    async fn cancel_and_resume(&mut self, reason: &str) -> Result<()> {
        self.event(format!("aborting: {reason}"));
        let stats = self.vm.query_migrate().await?;
        match stats.status {
            MigrationStatus::PostcopyActive
            | MigrationStatus::PostcopyPaused
            | MigrationStatus::PostcopyRecover
            | MigrationStatus::PostcopyRecoverSetup => {
                self.event(format!("abort refused: {POSTCOPY_CANNOT_ABORT}"));
                return Err(Error::Migration(POSTCOPY_CANNOT_ABORT.into()));
            }
            MigrationStatus::Completed => {
                resume_source(&self.vm, self.was_running).await?;
            }
            s if s.is_finished() => {
                resume_source(&self.vm, self.was_running).await?;
            }
            _ => {
                self.vm.migrate_cancel().await?;
                if let Some(event) = unblock_cancel(&self.vm).await {
                    self.event(event);
                }
                resume_source(&self.vm, self.was_running).await?;
            }
        }
        if self.was_running {
            // The destination may have steered the LAN to its port at pre-switchover: teach
            // it the source's port again rather than wait for the guest to speak.
            if let Err(e) = self.vm.announce_self(&COMMIT_ANNOUNCE).await {
                self.event(format!("re-announcing the source's MAC failed: {e}"));
            }
        }
        let state = self.vm.status().await?;
        self.end(
            AgentMigrationState::Cancelled,
            Some(format!("{reason}; source {state}")),
        );
        Ok(())
    }
}

/// What the destination end reports.
#[derive(Debug, Clone, PartialEq)]
pub struct IncomingStatus {
    pub state: AgentMigrationState,
    pub stats: Option<MigrationStats>,
    pub error: Option<String>,
}

/// The destination end of a migration: a paused QEMU with the VM's spec, listening on the
/// migration address for this VM's stream only, run only on [`Incoming::commit`].
#[derive(Debug)]
pub struct Incoming {
    vm: Arc<QemuVm>,
    /// Set once QEMU listens.
    uri: OnceLock<MigrationUri>,
}

impl Incoming {
    /// Starts the destination QEMU for `cfg` (forced to `-incoming defer` and `-S`), gives it
    /// the same capabilities and parameters as the source, and makes it listen on
    /// `listen:<ephemeral port>`. On any failure the QEMU is killed again.
    pub async fn prepare(
        cfg: LaunchConfig,
        settings: &MigrationSettings,
        key: Option<&MigrationKey>,
        listen: IpAddr,
    ) -> Result<Incoming> {
        let run_dir = cfg.run_dir.clone();
        let incoming = Self::launch(cfg).await?;
        match incoming.listen(settings, key, listen).await {
            Ok(_) => Ok(incoming),
            Err(e) => {
                let _ = incoming.vm.kill().await;
                let _ = QemuVm::cleanup(&run_dir);
                Err(e)
            }
        }
    }

    /// Starts the destination QEMU for `cfg` (forced to `-incoming defer` and `-S`) without
    /// listening yet: [`Incoming::listen`] follows once the settings are known.
    pub async fn launch(mut cfg: LaunchConfig) -> Result<Incoming> {
        cfg.incoming = Some(IncomingMode::Defer);
        cfg.start_paused = true;
        let vm = Arc::new(QemuVm::launch(cfg).await?);
        Ok(Incoming {
            vm,
            uri: OnceLock::new(),
        })
    }

    /// Gives the destination the same capabilities and parameters as the source and makes it
    /// listen on `listen:<ephemeral port>`; returns the URI the source must send to. The
    /// caller removes the QEMU if this fails.
    pub async fn listen(
        &self,
        settings: &MigrationSettings,
        key: Option<&MigrationKey>,
        listen: IpAddr,
    ) -> Result<MigrationUri> {
        if let Some(uri) = self.uri.get() {
            return Err(Error::Migration(format!(
                "the destination already listens on {uri}"
            )));
        }
        let listen_uri = match listen {
            IpAddr::V4(a) => format!("tcp:{a}:0"),
            IpAddr::V6(a) => format!("tcp:[{a}]:0"),
        };
        configure(&self.vm, settings, key, Side::Destination, false).await?;
        self.vm.migrate_incoming(&listen_uri).await?;
        let stats = self.vm.query_migrate().await?;
        let uri = stats
            .socket_addresses
            .iter()
            .find_map(|a| a.parse::<MigrationUri>().ok())
            .ok_or_else(|| {
                Error::Migration(format!(
                    "the destination did not report its listening port for {listen_uri} (it \
                     reported {:?})",
                    stats.socket_addresses
                ))
            })?;
        tracing::info!(pid = self.vm.pid(), %uri, "destination listening");
        Ok(*self.uri.get_or_init(|| uri))
    }

    /// Gives the destination the source's capabilities and parameters and makes it listen
    /// in clear on its run dir's [`RunPaths::migration_socket`], for a relay on this host
    /// that receives the encrypted stream; [`Incoming::relayed_at`] then records where the
    /// source must send to. The caller removes the QEMU if this fails.
    pub async fn listen_for_relay(
        &self,
        settings: &MigrationSettings,
    ) -> Result<std::path::PathBuf> {
        if let Some(uri) = self.uri.get() {
            return Err(Error::Migration(format!(
                "the destination already listens on {uri}"
            )));
        }
        let socket = relay_socket(&self.vm)?;
        configure(&self.vm, settings, None, Side::Destination, true).await?;
        self.vm
            .migrate_incoming(&qemu_unix_uri(&self.vm, &socket))
            .await?;
        tracing::info!(pid = self.vm.pid(), socket = %socket.display(), "destination listening for its relay");
        Ok(socket)
    }

    /// Records the relay's address as where the source sends to (after
    /// [`Incoming::listen_for_relay`]); the first one recorded stays.
    pub fn relayed_at(&self, uri: MigrationUri) -> MigrationUri {
        *self.uri.get_or_init(|| uri)
    }

    /// Takes back a destination QEMU (after an agent restart).
    pub fn adopt(vm: Arc<QemuVm>, uri: Option<MigrationUri>) -> Incoming {
        let cell = OnceLock::new();
        if let Some(uri) = uri {
            let _ = cell.set(uri);
        }
        Incoming { vm, uri: cell }
    }

    /// The URI the source must send to, e.g. `tcp:10.77.0.12:40123`; `None` until it listens.
    pub fn uri(&self) -> Option<MigrationUri> {
        self.uri.get().copied()
    }

    /// Whether [`Incoming::listen`] (or [`Incoming::prepare`]) has made QEMU listen.
    pub fn is_listening(&self) -> bool {
        self.uri.get().is_some()
    }

    pub fn vm(&self) -> &Arc<QemuVm> {
        &self.vm
    }

    /// Where the incoming migration stands.
    pub async fn status(&self) -> IncomingStatus {
        if let Some(r) = self.vm.exit_reason() {
            return IncomingStatus {
                state: AgentMigrationState::Failed,
                stats: None,
                error: Some(format!("destination QEMU ended: {r}")),
            };
        }
        let stats = match self.vm.query_migrate().await {
            Ok(s) => s,
            Err(e) => {
                return IncomingStatus {
                    state: AgentMigrationState::Failed,
                    stats: None,
                    error: Some(format!("cannot query the destination QEMU: {e}")),
                }
            }
        };
        let state = match stats.status {
            MigrationStatus::Completed => match self.vm.status().await {
                Ok(RunState::Running) => AgentMigrationState::Running,
                _ => AgentMigrationState::Completed,
            },
            MigrationStatus::Failed => AgentMigrationState::Failed,
            MigrationStatus::Cancelled => AgentMigrationState::Cancelled,
            MigrationStatus::PostcopyActive => match self.vm.status().await {
                Ok(RunState::Running) => AgentMigrationState::Running,
                _ => AgentMigrationState::Completed,
            },
            _ => AgentMigrationState::Listening,
        };
        let error = stats.error.clone();
        IncomingStatus {
            state,
            stats: Some(stats),
            error,
        }
    }

    /// Waits until all state is in (the guest paused here), or fails when the migration
    /// failed or the QEMU ended.
    pub async fn wait_received(&self, timeout: Duration) -> Result<IncomingStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status().await;
            match s.state {
                AgentMigrationState::Completed | AgentMigrationState::Running => return Ok(s),
                AgentMigrationState::Failed | AgentMigrationState::Cancelled => {
                    return Err(Error::Migration(format!(
                        "incoming migration {:?}: {}",
                        s.state,
                        s.error.unwrap_or_default()
                    )))
                }
                _ => {}
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout {
                    what: "the incoming migration to complete".into(),
                    timeout_ms: timeout.as_millis() as u64,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The center has recorded this host as the VM's owner: announce the VM's MACs (RARP and
    /// the virtio guest announce, so the LAN learns the new port at once) and run the guest.
    /// Idempotent: a guest already running is left alone.
    pub async fn commit(&self, announce: &AnnounceParams) -> Result<Option<DateTime<Utc>>> {
        let s = self.status().await;
        match s.state {
            AgentMigrationState::Running => return Ok(None),
            AgentMigrationState::Completed => {}
            other => {
                return Err(Error::Migration(format!(
                    "cannot commit: the incoming migration is {other:?}{}",
                    s.error.map(|e| format!(" ({e})")).unwrap_or_default()
                )))
            }
        }
        // Announce first: frames for the VM then queue on this host's tap while the vCPUs
        // start, instead of going to the old port.
        self.vm.announce_self(announce).await?;
        let mut events = self.vm.qmp().events();
        self.vm.resume().await?;
        // Everything is received: the key has no connection left to admit.
        remove_psk(&self.vm.paths().migration_tls_dir);
        self.vm
            .wait_status(|s| *s == RunState::Running, RUN_TIMEOUT)
            .await?;
        // QEMU sends `RESUME` before it answers `cont`, so it is already queued here.
        let mut resumed = None;
        loop {
            match events.try_recv() {
                Ok(e) if e.name == "RESUME" => resumed = Some(e.timestamp),
                Ok(_) | Err(broadcast::error::TryRecvError::Lagged(_)) => {}
                Err(_) => break,
            }
        }
        tracing::info!(
            pid = self.vm.pid(),
            ?resumed,
            "destination committed and running"
        );
        Ok(resumed)
    }

    /// Kills the destination QEMU and removes its runtime files. Refuses once the guest runs
    /// here: a committed destination is the only copy.
    pub async fn abort(&self) -> Result<()> {
        if self.vm.exit_reason().is_none()
            && matches!(self.vm.status().await, Ok(RunState::Running))
        {
            return Err(Error::Migration(
                "the destination runs the guest (committed): refusing to kill it".into(),
            ));
        }
        self.vm.kill().await?;
        QemuVm::cleanup(&self.vm.paths().run_dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_api::migration::ThrottlePlan;

    fn settings(channels: u32, compression: Compression, postcopy: bool) -> MigrationSettings {
        MigrationSettings {
            multifd_channels: channels,
            max_bandwidth_mib_s: Some(2),
            downtime_limit_ms: 150,
            compression,
            auto_converge: true,
            postcopy_allowed: postcopy,
            deadline_ms: 60_000,
            reasons: vec![],
            downtime_budget_ms: 300,
            zero_page_detection: tern_api::migration::ZeroPageDetection::Multifd,
            throttle: ThrottlePlan::default(),
            paced_from_link_mbit: None,
            encrypted: false,
            relayed: false,
            relay_source: None,
        }
    }

    #[test]
    fn both_ends_agree_except_one_sided_capabilities() {
        let s = settings(4, Compression::Zstd, false);
        let src = capabilities(&s, Side::Source);
        let dst = capabilities(&s, Side::Destination);
        let get = |caps: &[(&str, bool)], name: &str| {
            caps.iter()
                .find(|(n, _)| *n == name)
                .unwrap_or_else(|| panic!("{name} missing"))
                .1
        };
        for name in [
            "events",
            "return-path",
            "validate-uuid",
            "multifd",
            "postcopy-ram",
        ] {
            assert_eq!(get(&src, name), get(&dst, name), "{name}");
        }
        assert!(get(&src, "multifd"));
        assert!(get(&src, "pause-before-switchover"));
        assert!(!get(&dst, "pause-before-switchover"));
        assert!(get(&dst, "late-block-activate"));
        assert!(!get(&src, "late-block-activate"));

        let p = parameters(&s, Side::Source);
        assert_eq!(p["max-bandwidth"], 2 * 1024 * 1024);
        assert_eq!(p["multifd-channels"], 4);
        assert_eq!(p["multifd-compression"], "zstd");
        assert_eq!(p["downtime-limit"], 150);
        assert!(p.get("announce-rounds").is_none());
        let d = parameters(&s, Side::Destination);
        assert_eq!(d["announce-rounds"], 0);
        assert_eq!(d["multifd-channels"], 4);

        let single = settings(0, Compression::None, true);
        assert!(!get(&capabilities(&single, Side::Source), "multifd"));
        assert!(get(&capabilities(&single, Side::Source), "postcopy-ram"));
        assert!(parameters(&single, Side::Source)
            .get("multifd-channels")
            .is_none());
        let mut unlimited = single.clone();
        unlimited.max_bandwidth_mib_s = None;
        assert_eq!(parameters(&unlimited, Side::Source)["max-bandwidth"], 0);
    }
}
