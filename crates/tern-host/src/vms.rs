//! The VMs of this host: start, stop, pause, resume, delete, re-adoption after an agent
//! restart, and one supervisor task per QEMU process that records how it ended.
//!
//! Every lifecycle operation on a VM holds that VM's operation lock, so operations on one VM
//! run one at a time while different VMs proceed in parallel. The in-memory state of a VM is
//! mirrored to its run dir (`state.json`) before and after each step, so a restarted agent
//! can tell a VM that was stopped on purpose from one that crashed while it was away.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tern_api::agent::{StartVm, VmRuntime};
use tern_api::center::StopVm;
use tern_api::migration::{MigrationKey, MigrationSettings};
use tern_api::{Accelerator, BootSource, PowerState, VmSpec};
use tern_qemu::{ExitReason, IncomingMigration, LaunchConfig, QemuVm, RunState};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::error::AgentError;
use crate::store::{RunDir, RunRecord, StateDir};
use crate::tap;

/// Grace time of a graceful stop when the request gives none.
const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a fresh QEMU may take to report `running`.
const START_RUNNING_TIMEOUT: Duration = Duration::from_secs(30);
/// Period of new attempts to adopt a live QEMU that did not answer at agent start.
const ADOPT_RETRY: Duration = Duration::from_secs(5);
/// How long the supervisor may take to record an exit QEMU already reported.
const EXIT_RECORD_TIMEOUT: Duration = Duration::from_secs(15);

/// Host settings the VM manager needs.
#[derive(Debug, Clone)]
pub struct VmHostConfig {
    pub store: StateDir,
    pub accelerator: Accelerator,
    pub bridge: Option<String>,
    pub qemu: std::path::PathBuf,
    pub default_cpu_model: String,
    /// The only place a VM's files (disks, kernel, initrd) may come from. `None`: this host
    /// runs no VM that names a file.
    pub shared_storage: Option<std::path::PathBuf>,
    /// The users QEMU runs as, one per VM; `None`: root.
    pub qemu_users: Option<Arc<crate::qemu_user::QemuUsers>>,
    /// The VMs' cgroups; `None`: this host cannot enforce resource policies.
    pub resource_control: Option<Arc<crate::cgroups::ResourceControl>>,
    /// UEFI firmware for VMs that boot with it.
    pub uefi: crate::firmware::UefiFirmware,
}

/// A QEMU process the agent controls.
struct Live {
    vm: Arc<QemuVm>,
    pid: u32,
    /// Turns true once the supervisor has recorded the process's end.
    recorded: watch::Receiver<bool>,
}

struct VmState {
    spec: VmSpec,
    generation: u64,
    power: PowerState,
    accelerator: Accelerator,
    exit_reason: Option<String>,
    taps: Vec<String>,
    stop_requested: bool,
    live: Option<Live>,
    /// Set once deleted: an operation that waited for the lock must not resurrect it.
    deleted: bool,
}

impl VmState {
    fn record(&self) -> RunRecord {
        RunRecord {
            state: self.power,
            accelerator: self.accelerator,
            stop_requested: self.stop_requested,
            exit_reason: self.exit_reason.clone(),
        }
    }
}

struct Slot {
    run: RunDir,
    /// The VM's CPU cgroup on this host (reported while QEMU runs).
    cgroup: Option<std::path::PathBuf>,
    /// Serialises lifecycle operations on this VM.
    op: tokio::sync::Mutex<()>,
    st: Mutex<VmState>,
    /// Held while an exit is recorded (taps, cgroups, run dir cleaned): a delete waits for it,
    /// so the cleanup of a QEMU that just ended never meets the next QEMU of the same VM here
    /// (an incoming migration right after), whose cgroups and run dir have the same names.
    exit_cleanup: Mutex<()>,
}

impl Slot {
    fn st(&self) -> MutexGuard<'_, VmState> {
        // A panic inside a short critical section leaves the state usable.
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn runtime(&self) -> VmRuntime {
        let st = self.st();
        VmRuntime {
            id: self.run.id,
            spec: st.spec.clone(),
            generation: st.generation,
            state: st.power,
            pid: st.live.as_ref().map(|l| l.pid),
            accelerator: st.accelerator,
            exit_reason: st.exit_reason.clone(),
            console_log: self.run.paths().console_log.display().to_string(),
            taps: st.taps.clone(),
            cgroup: st
                .live
                .as_ref()
                .and(self.cgroup.as_ref())
                .map(|d| d.display().to_string()),
        }
    }

    fn persist(&self) {
        let rec = {
            let st = self.st();
            // A deleted VM's run dir is being removed: writing into it would re-create files
            // under `remove_dir_all` and make the removal fail.
            if st.deleted {
                return;
            }
            st.record()
        };
        if let Err(e) = self.run.write_record(&rec) {
            tracing::warn!(vm = %self.run.id, error = %format!("{e:#}"), "cannot record the VM state");
        }
    }
}

/// The VMs of this host.
pub struct VmManager {
    host: VmHostConfig,
    slots: Mutex<HashMap<Uuid, Arc<Slot>>>,
    /// Stops the supervisors when the agent shuts down (QEMU processes keep running).
    shutdown: CancellationToken,
    /// Sets up the bridge ports of incoming VMs' taps.
    ports: crate::steer::Steerer,
}

/// One VM's pid and identity, for load sampling.
#[derive(Debug, Clone)]
pub struct VmProc {
    pub id: Uuid,
    pub name: String,
    pub state: PowerState,
    pub pid: Option<u32>,
}

fn tap_names(id: Uuid, spec: &VmSpec) -> Vec<String> {
    (0..spec.nics.len()).map(|i| tap::tap_name(id, i)).collect()
}

/// State and reason recorded when a QEMU process has ended.
fn classify_exit(stop_requested: bool, reason: &ExitReason) -> (PowerState, Option<String>) {
    match reason {
        _ if stop_requested => (PowerState::Stopped, None),
        ExitReason::Shutdown { reason: r, .. } if r == "guest-panic" => {
            (PowerState::Crashed, Some(reason.to_string()))
        }
        // The guest powered off, or someone asked QEMU to quit: a clean end.
        ExitReason::Shutdown { .. } => (PowerState::Stopped, Some(reason.to_string())),
        ExitReason::Killed => (
            PowerState::Crashed,
            Some("killed without a stop request".to_string()),
        ),
        ExitReason::Crashed { reason } => (PowerState::Crashed, Some(reason.clone())),
    }
}

fn qemu_error(e: tern_qemu::Error) -> AgentError {
    use tern_qemu::Error as E;
    match e {
        E::Config(_) | E::MissingFile { .. } | E::KvmUnavailable(_) => {
            AgentError::BadRequest(e.to_string())
        }
        E::AlreadyRunning { .. } => AgentError::Conflict(e.to_string()),
        other => AgentError::Qemu(other.to_string()),
    }
}

/// Checks what the agent itself relies on before QEMU sees the spec. The spec comes from the
/// network: every file it names must be a regular file inside the shared storage (after
/// resolving symlinks and `..`), or a hostile peer could hand a guest the host's disk
/// (`/dev/sda`) or secrets (`-initrd /etc/shadow` lands in guest memory).
fn validate(
    spec: &VmSpec,
    bridge: Option<&str>,
    shared_storage: Option<&std::path::Path>,
    resource_control: bool,
) -> Result<(), AgentError> {
    check_resources(spec, resource_control)?;
    if let Some(ci) = &spec.cloud_init {
        ci.check().map_err(AgentError::BadRequest)?;
    }
    if !tern_api::valid_name(&spec.name) {
        return Err(AgentError::BadRequest(format!(
            "VM name {:?} is not [a-z0-9][a-z0-9-]{{0,31}}",
            spec.name
        )));
    }
    if spec.nics.len() > tap::MAX_NICS {
        return Err(AgentError::BadRequest(format!(
            "{} NICs: at most {} are supported",
            spec.nics.len(),
            tap::MAX_NICS
        )));
    }
    for nic in &spec.nics {
        if tern_api::parse_unicast_mac(&nic.mac).is_none() {
            return Err(AgentError::BadRequest(format!(
                "NIC MAC {:?} is not a unicast xx:xx:xx:xx:xx:xx address",
                nic.mac
            )));
        }
    }
    if !spec.nics.is_empty() && bridge.is_none() {
        return Err(AgentError::BadRequest(
            "the VM has NICs but this host has no VM bridge: start the agent with --bridge"
                .to_string(),
        ));
    }
    for d in spec.disks.iter().filter(|d| d.is_iscsi()) {
        if d.iscsi().is_none() || d.format != tern_api::DiskFormat::Raw {
            return Err(AgentError::BadRequest(format!(
                "disk {:?} is not a raw iSCSI LUN written iscsi://IP:PORT/IQN/LUN",
                d.path
            )));
        }
    }
    let mut files: Vec<(&str, &str)> = spec
        .disks
        .iter()
        .filter(|d| !d.is_iscsi())
        .map(|d| ("disk", d.path.as_str()))
        .collect();
    if let BootSource::Kernel { kernel, initrd, .. } = &spec.boot {
        files.push(("kernel", kernel));
        if let Some(i) = initrd {
            files.push(("initrd", i));
        }
    }
    if files.is_empty() {
        return Ok(());
    }
    let Some(root) = shared_storage else {
        return Err(AgentError::BadRequest(
            "this host has no shared storage (--shared-storage): it runs no VM that names files"
                .to_string(),
        ));
    };
    let paths: Vec<String> = files.iter().map(|(_, p)| p.to_string()).collect();
    let report = crate::paths::check(&paths, Some(root));
    for (what, path) in files {
        if report.missing.iter().any(|m| m == path) {
            return Err(AgentError::BadRequest(format!(
                "{what} {path} is not a file on this host"
            )));
        }
        if report.outside_shared_storage.iter().any(|m| m == path) {
            return Err(AgentError::BadRequest(format!(
                "{what} {path} is outside this host's shared storage {}: a VM may only use \
                 files there",
                root.display()
            )));
        }
    }
    Ok(())
}

/// Checks a VM's resource policy, and that this host can enforce one it names.
fn check_resources(spec: &VmSpec, resource_control: bool) -> Result<(), AgentError> {
    spec.resources
        .check(spec.vcpus, spec.memory_mib)
        .map_err(AgentError::BadRequest)?;
    if !resource_control && !spec.resources.is_default() {
        return Err(AgentError::BadRequest(format!(
            "VM {} has a resource policy ({}) and this host cannot enforce one: no cgroup CPU \
             controller could be prepared (see the agent's log and --cgroup-parent)",
            spec.name, spec.resources
        )));
    }
    Ok(())
}

impl VmManager {
    pub fn new(host: VmHostConfig) -> Arc<VmManager> {
        Arc::new(VmManager {
            host,
            slots: Mutex::new(HashMap::new()),
            shutdown: CancellationToken::new(),
            ports: crate::steer::Steerer::default(),
        })
    }

    /// The spec's files, opened for QEMU beneath this host's shared storage (see
    /// [`crate::paths`]); a spec without files needs none.
    fn open_files(&self, spec: &VmSpec) -> Result<Vec<tern_qemu::OpenedFile>, AgentError> {
        let Some(root) = self.host.shared_storage.as_deref() else {
            // `validate` refused a spec with files on a host without shared storage.
            return Ok(Vec::new());
        };
        crate::paths::open_for_qemu(spec, root).map_err(|e| match e {
            crate::paths::OpenError::Other(..) => AgentError::Internal(anyhow::anyhow!(e)),
            _ => AgentError::BadRequest(e.to_string()),
        })
    }

    /// The files the spec implies: UEFI's code and the VM's variables (made at a first start
    /// when `create`), and the cloud-init seed, written into the run dir.
    fn guest_files(
        &self,
        id: Uuid,
        spec: &VmSpec,
        run_dir: &std::path::Path,
        create: bool,
    ) -> Result<tern_qemu::GuestFiles, AgentError> {
        let mut files = tern_qemu::GuestFiles::default();
        if spec.firmware == tern_api::Firmware::Uefi {
            use crate::firmware::FirmwareError as F;
            let root = self
                .host
                .shared_storage
                .as_deref()
                .ok_or(AgentError::BadRequest(F::NoSharedStorage.to_string()))?;
            files.uefi = Some(self.host.uefi.open(root, id, create).map_err(|e| match e {
                F::Io(..) => AgentError::Internal(anyhow::anyhow!(e)),
                F::Open(crate::paths::OpenError::Other(..)) => {
                    AgentError::Internal(anyhow::anyhow!(e))
                }
                _ => AgentError::BadRequest(e.to_string()),
            })?);
        }
        let seed = crate::seed::write(run_dir, id, spec).map_err(|e| {
            AgentError::Internal(anyhow::anyhow!("writing the cloud-init seed: {e}"))
        })?;
        if let Some(path) = seed {
            let f = std::fs::File::open(&path).map_err(|e| {
                AgentError::Internal(anyhow::anyhow!("opening {}: {e}", path.display()))
            })?;
            files.seed = Some(tern_qemu::SharedFd(Arc::new(f.into())));
        }
        Ok(files)
    }

    /// A uid for a QEMU about to start, none of the running QEMUs' (`None`: QEMU runs as
    /// root). Held until the returned value is dropped, after the QEMU is recorded live.
    fn reserve_user(&self) -> Result<Option<crate::qemu_user::Reserved>, AgentError> {
        let Some(users) = &self.host.qemu_users else {
            return Ok(None);
        };
        let running: Vec<u32> = self
            .slots()
            .values()
            .filter_map(|s| s.st().live.as_ref().map(|l| l.pid))
            .filter_map(|pid| tern_qemu::process_owner(pid).map(|(uid, _)| uid))
            .collect();
        users
            .reserve(running)
            .map(Some)
            .map_err(AgentError::Internal)
    }

    fn slots(&self) -> MutexGuard<'_, HashMap<Uuid, Arc<Slot>>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn slot(&self, id: Uuid) -> Result<Arc<Slot>, AgentError> {
        self.slots()
            .get(&id)
            .cloned()
            .ok_or_else(|| AgentError::NotFound(format!("no VM {id} on this host")))
    }

    pub fn list(&self) -> Vec<VmRuntime> {
        let slots: Vec<Arc<Slot>> = self.slots().values().cloned().collect();
        let mut out: Vec<VmRuntime> = slots.iter().map(|s| s.runtime()).collect();
        out.sort_by(|a, b| a.spec.name.cmp(&b.spec.name).then(a.id.cmp(&b.id)));
        out
    }

    /// The bridge VM taps join, if this host has one.
    pub fn bridge(&self) -> Option<&str> {
        self.host.bridge.as_deref()
    }

    pub fn get(&self, id: Uuid) -> Result<VmRuntime, AgentError> {
        Ok(self.slot(id)?.runtime())
    }

    /// Pids and states of every VM, for the load sampler.
    pub fn procs(&self) -> Vec<VmProc> {
        let slots: Vec<Arc<Slot>> = self.slots().values().cloned().collect();
        slots
            .iter()
            .map(|s| {
                let st = s.st();
                VmProc {
                    id: s.run.id,
                    name: st.spec.name.clone(),
                    state: st.power,
                    pid: st.live.as_ref().map(|l| l.pid),
                }
            })
            .collect()
    }

    /// Starts the VM, or answers at once when it already runs with the same spec.
    pub async fn start(self: Arc<Self>, id: Uuid, req: StartVm) -> Result<VmRuntime, AgentError> {
        validate(
            &req.spec,
            self.host.bridge.as_deref(),
            self.host.shared_storage.as_deref(),
            self.host.resource_control.is_some(),
        )?;
        let (slot, created) = {
            let mut slots = self.slots();
            match slots.get(&id) {
                Some(s) => (s.clone(), false),
                None => {
                    let s = Arc::new(Slot {
                        run: self.host.store.vm(id),
                        cgroup: self.cgroup_dir(id),
                        op: tokio::sync::Mutex::new(()),
                        exit_cleanup: Mutex::new(()),
                        st: Mutex::new(VmState {
                            spec: req.spec.clone(),
                            generation: req.generation,
                            power: PowerState::Stopped,
                            accelerator: self.host.accelerator,
                            exit_reason: None,
                            taps: tap_names(id, &req.spec),
                            stop_requested: false,
                            live: None,
                            deleted: false,
                        }),
                    });
                    slots.insert(id, s.clone());
                    (s, true)
                }
            }
        };
        let _op = slot.op.lock().await;
        {
            let mut st = slot.st();
            if st.deleted {
                return Err(AgentError::Conflict(format!(
                    "VM {id} was deleted while this start waited; start it again"
                )));
            }
            if st.live.is_some() {
                if st.spec != req.spec {
                    return Err(AgentError::Conflict(format!(
                        "VM {} already runs here with a different spec; stop it first",
                        st.spec.name
                    )));
                }
                let regenerated = st.generation != req.generation;
                st.generation = req.generation;
                drop(st);
                if regenerated {
                    slot.run
                        .write_spec(&req.spec, req.generation)
                        .map_err(AgentError::Internal)?;
                }
                return Ok(slot.runtime());
            }
        }
        Self::refuse_uncontrolled(&slot)?;
        let result = self.launch(&slot, &req).await;
        if result.is_err() {
            if let Some(rc) = &self.host.resource_control {
                rc.remove(id);
            }
        }
        if result.is_err() && created {
            // A VM that never ran leaves nothing behind.
            slot.st().deleted = true;
            self.slots().remove(&id);
            if let Err(e) = std::fs::remove_dir_all(&slot.run.dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(vm = %id, error = %e, "cannot remove the run dir of a failed start");
                }
            }
        }
        result
    }

    async fn launch(
        self: &Arc<Self>,
        slot: &Arc<Slot>,
        req: &StartVm,
    ) -> Result<VmRuntime, AgentError> {
        let id = slot.run.id;
        let taps = tap_names(id, &req.spec);
        slot.run.create().map_err(AgentError::Internal)?;
        slot.run
            .write_spec(&req.spec, req.generation)
            .map_err(AgentError::Internal)?;
        {
            let mut st = slot.st();
            st.spec = req.spec.clone();
            st.generation = req.generation;
            st.accelerator = self.host.accelerator;
            st.taps = taps.clone();
            st.stop_requested = false;
        }
        slot.persist();
        let user = self.reserve_user()?;
        let owner = user.as_ref().map(|u| u.owner());
        if let Some(bridge) = &self.host.bridge {
            for t in &taps {
                if let Err(e) = tap::ensure_tap(t, bridge, owner) {
                    remove_taps(&taps);
                    return Err(match e {
                        tap::TapError::NoBridge(_) | tap::TapError::NotATap(_) => {
                            AgentError::BadRequest(e.to_string())
                        }
                        _ => AgentError::Internal(anyhow::anyhow!("creating tap {t}: {e}")),
                    });
                }
            }
        }
        let files = match self.open_files(&req.spec) {
            Ok(f) => f,
            Err(e) => {
                remove_taps(&taps);
                return Err(e);
            }
        };
        let guest_files = match self.guest_files(id, &req.spec, &slot.run.dir, true) {
            Ok(f) => f,
            Err(e) => {
                remove_taps(&taps);
                return Err(e);
            }
        };
        let cgroup_procs = match self.cgroup_procs(id) {
            Ok(p) => p,
            Err(e) => {
                remove_taps(&taps);
                return Err(e);
            }
        };
        let cfg = LaunchConfig {
            cgroup_procs,
            id,
            spec: req.spec.clone(),
            run_dir: slot.run.dir.clone(),
            taps: taps.clone(),
            accel: self.host.accelerator,
            qemu_binary: self.host.qemu.clone(),
            default_cpu_model: self.host.default_cpu_model.clone(),
            incoming: None,
            start_paused: false,
            files,
            run_as: user.as_ref().map(|u| u.run_as()),
            guest_files: guest_files.clone(),
        };
        let vm = match QemuVm::launch(cfg).await {
            Ok(vm) => Arc::new(vm),
            Err(e) => {
                remove_taps(&taps);
                tracing::warn!(vm = %req.spec.name, %id, error = %e, "QEMU did not start");
                return Err(qemu_error(e));
            }
        };
        if let Err(e) = vm
            .wait_status(|s| *s == RunState::Running, START_RUNNING_TIMEOUT)
            .await
        {
            let _ = vm.kill().await;
            drop(vm);
            remove_taps(&taps);
            if let Err(e) = QemuVm::cleanup(&slot.run.dir) {
                tracing::warn!(vm = %req.spec.name, error = %e, "cannot clean the run dir");
            }
            return Err(AgentError::Qemu(format!(
                "QEMU started but did not report running: {e}"
            )));
        }
        self.adopt_live(slot, vm, PowerState::Running);
        tracing::info!(vm = %req.spec.name, %id, generation = req.generation, "VM running");
        Ok(slot.runtime())
    }

    /// Records a live QEMU in the slot and starts its supervisor.
    fn adopt_live(self: &Arc<Self>, slot: &Arc<Slot>, vm: Arc<QemuVm>, power: PowerState) {
        let (tx, rx) = watch::channel(false);
        {
            let mut st = slot.st();
            st.live = Some(Live {
                vm: vm.clone(),
                pid: vm.pid(),
                recorded: rx,
            });
            st.power = power;
            st.exit_reason = None;
        }
        slot.persist();
        if let Some(rc) = &self.host.resource_control {
            // A QEMU started here joined its groups before it ran; one adopted after an agent
            // restart (or started before tern had resource control) is moved in now.
            if let Err(e) = rc.adopt(slot.run.id, vm.pid()) {
                tracing::warn!(vm = %slot.run.id, error = %format!("{e:#}"), "cannot put QEMU into its cgroup");
            }
        }
        self.enforce_resources();
        let this = self.clone();
        let slot = slot.clone();
        tokio::spawn(async move { this.supervise(slot, vm, tx).await });
    }

    fn cgroup_dir(&self, id: Uuid) -> Option<std::path::PathBuf> {
        self.host.resource_control.as_ref().map(|rc| rc.cpu_dir(id))
    }

    /// The `cgroup.procs` files a QEMU about to start for VM `id` joins (none without
    /// resource control).
    fn cgroup_procs(&self, id: Uuid) -> Result<Vec<std::path::PathBuf>, AgentError> {
        match &self.host.resource_control {
            Some(rc) => rc.prepare(id).map_err(|e| {
                AgentError::Internal(e.context(format!("preparing the cgroups of VM {id}")))
            }),
            None => Ok(Vec::new()),
        }
    }

    /// Writes every live VM's cgroup limits from their policies (a VM's reservation changes
    /// the others' weights, so all are written together). Returns the errors by VM.
    fn enforce_resources(&self) -> Vec<(Uuid, anyhow::Error)> {
        let Some(rc) = &self.host.resource_control else {
            return Vec::new();
        };
        let live: Vec<(Uuid, VmSpec)> = self
            .slots()
            .values()
            .filter_map(|s| {
                let st = s.st();
                if st.live.is_some() {
                    return Some((s.run.id, st.spec.clone()));
                }
                // An incoming VM's vCPUs are paused: its group weighs its migration threads
                // alone (a weight for its vCPUs would go to those threads). Its memory
                // policy waits for the commit, as before: QEMU is still filling its memory.
                (!st.deleted && rc.is_migrating(s.run.id)).then(|| {
                    let mut spec = st.spec.clone();
                    spec.resources.cpu_shares = tern_api::Shares::Custom(1);
                    spec.resources.cpu_reservation = None;
                    spec.resources.memory_limit_mib = None;
                    spec.resources.memory_reservation_mib = None;
                    (s.run.id, spec)
                })
            })
            .collect();
        let refs: Vec<(Uuid, &VmSpec)> = live.iter().map(|(id, s)| (*id, s)).collect();
        let errors = rc.enforce(&refs);
        for (id, e) in &errors {
            tracing::warn!(vm = %id, error = %format!("{e:#}"), "cannot apply the VM's resource policy");
        }
        errors
    }

    /// VM `id` migrates (out, or in) with `threads` migration threads in its cgroup (0: no
    /// longer): its weight and quota grow by theirs ([`crate::cgroups::ResourceControl::set_migration_threads`]).
    /// Puts a helper process of VM `id`'s migration (its relay) into the VM's CPU group.
    pub fn join_migration_cpu(&self, id: Uuid, pid: u32) {
        if let Some(rc) = &self.host.resource_control {
            if let Err(e) = rc.join_cpu(id, pid) {
                tracing::warn!(vm = %id, "the migration relay runs outside the VM's group: {e:#}");
            }
        }
    }

    pub fn set_migration_threads(&self, id: Uuid, threads: u32) {
        if let Some(rc) = &self.host.resource_control {
            rc.set_migration_threads(id, threads);
            self.enforce_resources();
        }
    }

    /// Changes a VM's resource policy; a running VM's cgroup follows at once. A policy the
    /// kernel refuses (a memory limit below what QEMU uses now) is undone and reported.
    pub async fn set_resources(
        &self,
        id: Uuid,
        resources: tern_api::Resources,
    ) -> Result<VmRuntime, AgentError> {
        let slot = self.slot(id)?;
        let _op = slot.op.lock().await;
        let (old, mut spec, generation) = {
            let st = slot.st();
            (st.spec.resources.clone(), st.spec.clone(), st.generation)
        };
        spec.resources = resources;
        check_resources(&spec, self.host.resource_control.is_some())?;
        slot.st().spec.resources = spec.resources.clone();
        if let Some((_, e)) = self.enforce_resources().into_iter().find(|(v, _)| *v == id) {
            slot.st().spec.resources = old;
            self.enforce_resources();
            return Err(AgentError::BadRequest(format!(
                "the host refused VM {}'s new resource policy: {e:#}",
                spec.name
            )));
        }
        slot.run
            .write_spec(&spec, generation)
            .map_err(AgentError::Internal)?;
        tracing::info!(vm = %spec.name, %id, resources = %spec.resources, "resource policy changed");
        Ok(slot.runtime())
    }

    /// Follows one QEMU process: pause/resume events, then its end.
    async fn supervise(
        self: Arc<Self>,
        slot: Arc<Slot>,
        vm: Arc<QemuVm>,
        recorded: watch::Sender<bool>,
    ) {
        let mut events = vm.qmp().events();
        let mut events_open = true;
        let reason = loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                r = vm.wait_exit() => break r,
                ev = events.recv(), if events_open => match ev {
                    Ok(ev) => {
                        let power = match ev.name.as_str() {
                            "STOP" => Some(PowerState::Paused),
                            "RESUME" => Some(PowerState::Running),
                            _ => None,
                        };
                        if let Some(p) = power {
                            let mut st = slot.st();
                            if st.live.as_ref().map(|l| l.pid) == Some(vm.pid()) {
                                st.power = p;
                            }
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => events_open = false,
                },
            }
        };
        self.record_exit(&slot, vm.pid(), &reason);
        recorded.send_replace(true);
    }

    fn record_exit(&self, slot: &Slot, pid: u32, reason: &ExitReason) {
        let _cleanup = slot.exit_cleanup.lock().unwrap_or_else(|p| p.into_inner());
        let (name, power, why, taps) = {
            let mut st = slot.st();
            if st.live.as_ref().map(|l| l.pid) != Some(pid) {
                return;
            }
            st.live = None;
            let (power, why) = classify_exit(st.stop_requested, reason);
            st.power = power;
            st.exit_reason = why.clone();
            (st.spec.name.clone(), power, why, st.taps.clone())
        };
        remove_taps(&taps);
        if let Some(rc) = &self.host.resource_control {
            rc.remove(slot.run.id);
            self.enforce_resources();
        }
        if let Err(e) = QemuVm::cleanup(&slot.run.dir) {
            tracing::warn!(vm = %name, error = %e, "cannot clean the run dir");
        }
        slot.persist();
        match power {
            PowerState::Crashed => tracing::warn!(
                vm = %name, id = %slot.run.id, pid, reason = why.as_deref().unwrap_or(""),
                "VM crashed"
            ),
            _ => tracing::info!(
                vm = %name, id = %slot.run.id, pid, reason = why.as_deref().unwrap_or("stop requested"),
                "VM stopped"
            ),
        }
    }

    /// The live QEMU of a VM, for an operation that needs one.
    fn live(slot: &Slot) -> Result<(Arc<QemuVm>, watch::Receiver<bool>), AgentError> {
        let st = slot.st();
        match &st.live {
            Some(l) => Ok((l.vm.clone(), l.recorded.clone())),
            None => Err(AgentError::Conflict(format!(
                "VM {} is {}, not running",
                st.spec.name, st.power
            ))),
        }
    }

    /// Refuses operations on a VM whose live QEMU could not be adopted.
    fn refuse_uncontrolled(slot: &Slot) -> Result<(), AgentError> {
        let st = slot.st();
        if st.live.is_none() && st.power == PowerState::Unknown {
            return Err(AgentError::Conflict(format!(
                "VM {} has a QEMU process the agent cannot control yet ({}); the agent keeps \
                 trying to adopt it",
                st.spec.name,
                st.exit_reason.clone().unwrap_or_default()
            )));
        }
        Ok(())
    }

    async fn wait_recorded(mut rx: watch::Receiver<bool>) -> Result<(), AgentError> {
        match tokio::time::timeout(EXIT_RECORD_TIMEOUT, rx.wait_for(|r| *r)).await {
            Ok(Ok(_)) => Ok(()),
            // Sender gone: the supervisor stopped (agent shutting down).
            Ok(Err(_)) => Ok(()),
            Err(_) => Err(AgentError::Internal(anyhow::anyhow!(
                "QEMU exited but its end was not recorded within {} s",
                EXIT_RECORD_TIMEOUT.as_secs()
            ))),
        }
    }

    /// Stops the VM: ACPI power button, then quit, then kill (or kill at once with `force`).
    /// A VM that is not running is answered as it is.
    pub async fn stop(&self, id: Uuid, req: StopVm) -> Result<VmRuntime, AgentError> {
        let slot = self.slot(id)?;
        let _op = slot.op.lock().await;
        Self::refuse_uncontrolled(&slot)?;
        let (vm, recorded) = match Self::live(&slot) {
            Ok(l) => l,
            Err(_) => return Ok(slot.runtime()),
        };
        slot.st().stop_requested = true;
        slot.persist();
        let name = slot.st().spec.name.clone();
        let result = if req.force {
            tracing::info!(vm = %name, %id, "killing VM (forced stop)");
            vm.kill().await
        } else {
            let timeout = req
                .timeout_ms
                .map(Duration::from_millis)
                .unwrap_or(DEFAULT_STOP_TIMEOUT);
            tracing::info!(vm = %name, %id, timeout_ms = timeout.as_millis() as u64, "stopping VM");
            vm.shutdown(timeout).await
        };
        if let Err(e) = result {
            return Err(AgentError::Qemu(format!("stopping VM {name}: {e}")));
        }
        Self::wait_recorded(recorded).await?;
        Ok(slot.runtime())
    }

    pub async fn pause(&self, id: Uuid) -> Result<VmRuntime, AgentError> {
        let slot = self.slot(id)?;
        let _op = slot.op.lock().await;
        let (vm, _) = Self::live(&slot)?;
        vm.pause().await.map_err(qemu_error)?;
        slot.st().power = PowerState::Paused;
        slot.persist();
        Ok(slot.runtime())
    }

    pub async fn resume(&self, id: Uuid) -> Result<VmRuntime, AgentError> {
        let slot = self.slot(id)?;
        let _op = slot.op.lock().await;
        let (vm, _) = Self::live(&slot)?;
        vm.resume().await.map_err(qemu_error)?;
        slot.st().power = PowerState::Running;
        slot.persist();
        Ok(slot.runtime())
    }

    /// Kills the VM if it runs, removes its taps and its run dir.
    pub async fn delete(&self, id: Uuid) -> Result<(), AgentError> {
        let slot = self.slot(id)?;
        let _op = slot.op.lock().await;
        Self::refuse_uncontrolled(&slot)?;
        if let Ok((vm, recorded)) = Self::live(&slot) {
            slot.st().stop_requested = true;
            slot.persist();
            vm.kill()
                .await
                .map_err(|e| AgentError::Qemu(format!("killing VM {id}: {e}")))?;
            Self::wait_recorded(recorded).await?;
        }
        // An exit being recorded right now (its QEMU ended by itself, or quit by a finished
        // migration) completes its cleanup before the VM is gone from here.
        let waiting = slot.clone();
        let _ = tokio::task::spawn_blocking(move || {
            drop(
                waiting
                    .exit_cleanup
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()),
            )
        })
        .await;
        let (taps, name) = {
            let mut st = slot.st();
            st.deleted = true;
            (st.taps.clone(), st.spec.name.clone())
        };
        remove_taps(&taps);
        self.slots().remove(&id);
        // A state record already being written when `deleted` was set may still land in the
        // dir while it is removed: try again briefly.
        let mut attempt = 0;
        loop {
            match std::fs::remove_dir_all(&slot.run.dir) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(_) if attempt < 5 => {
                    attempt += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                Err(e) => {
                    return Err(AgentError::Internal(anyhow::anyhow!(
                        "removing {}: {e}",
                        slot.run.dir.display()
                    )))
                }
            }
        }
        tracing::info!(vm = %name, %id, "VM deleted");
        Ok(())
    }

    /// The last `bytes` of the VM's serial console log.
    pub async fn console_tail(&self, id: Uuid, bytes: u64) -> Result<String, AgentError> {
        let slot = self.slot(id)?;
        let path = slot.run.paths().console_log;
        tokio::task::spawn_blocking(move || read_tail(&path, bytes))
            .await
            .map_err(|e| AgentError::Internal(anyhow::anyhow!("console read task failed: {e}")))?
            .map_err(AgentError::Internal)
    }

    /// Loads every run dir: re-adopts VMs whose QEMU still runs (without touching them) and
    /// records how the others ended.
    pub async fn recover(self: &Arc<Self>) -> anyhow::Result<()> {
        for run in self.host.store.list_vms()? {
            let id = run.id;
            let (spec, generation) = match run.read_spec() {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(vm = %id, error = %format!("{e:#}"), "run dir without a readable spec; ignored");
                    continue;
                }
            };
            let rec = run.read_record();
            let slot = Arc::new(Slot {
                run: run.clone(),
                cgroup: self.cgroup_dir(id),
                op: tokio::sync::Mutex::new(()),
                exit_cleanup: Mutex::new(()),
                st: Mutex::new(VmState {
                    taps: tap_names(id, &spec),
                    spec,
                    generation,
                    power: PowerState::Stopped,
                    accelerator: rec
                        .as_ref()
                        .map_or(self.host.accelerator, |r| r.accelerator),
                    exit_reason: rec.as_ref().and_then(|r| r.exit_reason.clone()),
                    stop_requested: rec.as_ref().is_some_and(|r| r.stop_requested),
                    live: None,
                    deleted: false,
                }),
            });
            self.slots().insert(id, slot.clone());
            let name = slot.st().spec.name.clone();
            match QemuVm::adopt(&run.dir).await {
                Ok(vm) => {
                    let vm = Arc::new(vm);
                    let power = match vm.status().await {
                        Ok(s) => s.power_state(),
                        Err(e) => {
                            tracing::warn!(vm = %name, error = %e, "adopted QEMU does not answer query-status");
                            PowerState::Unknown
                        }
                    };
                    tracing::info!(vm = %name, %id, pid = vm.pid(), state = %power, "re-adopted running VM");
                    self.adopt_live(&slot, vm.clone(), power);
                    // A recorded migration is re-attached to by `Migrations::recover`.
                    if run.read_migration().is_none() {
                        tokio::spawn(async move { cancel_orphan_migration(&vm, &name).await });
                    }
                }
                Err(tern_qemu::Error::NotRunning { detail, .. }) => {
                    let (power, why) = match &rec {
                        Some(r) if r.stop_requested => (PowerState::Stopped, None),
                        Some(r) if matches!(r.state, PowerState::Stopped | PowerState::Crashed) => {
                            (r.state, r.exit_reason.clone())
                        }
                        Some(r) => (
                            PowerState::Crashed,
                            Some(format!(
                                "QEMU ended while the agent was not running (it was {}; {detail})",
                                r.state
                            )),
                        ),
                        None => (PowerState::Stopped, None),
                    };
                    self.record_gone(&slot, power, why);
                }
                Err(e) => {
                    // Alive but not answering: leave the process alone, say so, retry later.
                    tracing::error!(vm = %name, %id, error = %e, "cannot adopt the VM's QEMU; leaving it untouched and retrying");
                    {
                        let mut st = slot.st();
                        st.power = PowerState::Unknown;
                        st.exit_reason = Some(format!("cannot adopt its QEMU: {e}"));
                    }
                    let this = self.clone();
                    tokio::spawn(async move { this.retry_adopt(slot).await });
                }
            }
        }
        Ok(())
    }

    /// Records a VM whose QEMU is gone (found at agent start): state, taps, stale files.
    fn record_gone(&self, slot: &Slot, power: PowerState, why: Option<String>) {
        let (name, taps) = {
            let mut st = slot.st();
            st.power = power;
            st.exit_reason = why;
            (st.spec.name.clone(), st.taps.clone())
        };
        remove_taps(&taps);
        if let Some(rc) = &self.host.resource_control {
            rc.remove(slot.run.id);
            self.enforce_resources();
        }
        if let Err(e) = QemuVm::cleanup(&slot.run.dir) {
            tracing::warn!(vm = %name, error = %e, "cannot clean the run dir");
        }
        slot.persist();
        tracing::info!(vm = %name, id = %slot.run.id, state = %power, "VM not running");
    }

    /// Tries again to adopt a live QEMU that did not answer, until it does or is gone.
    async fn retry_adopt(self: Arc<Self>, slot: Arc<Slot>) {
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                () = tokio::time::sleep(ADOPT_RETRY) => {}
            }
            let _op = slot.op.lock().await;
            if slot.st().deleted {
                return;
            }
            match QemuVm::adopt(&slot.run.dir).await {
                Ok(vm) => {
                    let vm = Arc::new(vm);
                    let power = match vm.status().await {
                        Ok(s) => s.power_state(),
                        Err(_) => PowerState::Unknown,
                    };
                    tracing::info!(vm = %slot.st().spec.name, pid = vm.pid(), state = %power, "adopted the VM's QEMU at last");
                    self.adopt_live(&slot, vm, power);
                    return;
                }
                Err(tern_qemu::Error::NotRunning { detail, .. }) => {
                    self.record_gone(
                        &slot,
                        PowerState::Crashed,
                        Some(format!(
                            "QEMU ended before the agent could adopt it ({detail})"
                        )),
                    );
                    return;
                }
                Err(e) => {
                    tracing::debug!(vm = %slot.run.id, error = %e, "still cannot adopt");
                }
            }
        }
    }

    /// The run dir of a VM (known here or not).
    pub fn run_dir(&self, id: Uuid) -> crate::store::RunDir {
        self.host.store.vm(id)
    }

    /// The run dirs on disk.
    pub fn run_dirs(&self) -> anyhow::Result<Vec<crate::store::RunDir>> {
        self.host.store.list_vms()
    }

    /// The live QEMU of a VM (a migration's source, a dirty-rate measurement).
    pub fn live_qemu(&self, id: Uuid) -> Result<Arc<QemuVm>, AgentError> {
        let slot = self.slot(id)?;
        Self::live(&slot).map(|(vm, _)| vm)
    }

    /// Starts the destination end of a migration: a paused QEMU with the VM's spec, listening
    /// on `listen` for this VM's stream only once it has the `settings` (now if given, else
    /// through [`IncomingMigration::listen`]). The VM is then listed here (paused) and
    /// supervised like any other; it runs only once the migration is committed.
    pub async fn prepare_incoming(
        self: &Arc<Self>,
        id: Uuid,
        spec: VmSpec,
        generation: u64,
        settings: Option<&MigrationSettings>,
        key: Option<&MigrationKey>,
        listen: IpAddr,
    ) -> Result<IncomingMigration, AgentError> {
        validate(
            &spec,
            self.host.bridge.as_deref(),
            self.host.shared_storage.as_deref(),
            self.host.resource_control.is_some(),
        )?;
        let slot = {
            let mut slots = self.slots();
            if let Some(s) = slots.get(&id) {
                let st = s.st();
                return Err(AgentError::Conflict(format!(
                    "VM {} is already known on this host ({}): delete it here before migrating \
                     it in",
                    st.spec.name, st.power
                )));
            }
            let s = Arc::new(Slot {
                run: self.host.store.vm(id),
                cgroup: self.cgroup_dir(id),
                op: tokio::sync::Mutex::new(()),
                exit_cleanup: Mutex::new(()),
                st: Mutex::new(VmState {
                    spec: spec.clone(),
                    generation,
                    power: PowerState::Stopped,
                    accelerator: self.host.accelerator,
                    exit_reason: None,
                    taps: tap_names(id, &spec),
                    stop_requested: false,
                    live: None,
                    deleted: false,
                }),
            });
            slots.insert(id, s.clone());
            s
        };
        let _op = slot.op.lock().await;
        let result = self
            .launch_incoming(&slot, spec, generation, settings, key, listen)
            .await;
        if result.is_err() {
            if let Some(rc) = &self.host.resource_control {
                rc.remove(id);
            }
            slot.st().deleted = true;
            self.slots().remove(&id);
            if let Err(e) = std::fs::remove_dir_all(&slot.run.dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(vm = %id, error = %e, "cannot remove the run dir of a failed incoming migration");
                }
            }
        }
        result
    }

    async fn launch_incoming(
        self: &Arc<Self>,
        slot: &Arc<Slot>,
        spec: VmSpec,
        generation: u64,
        settings: Option<&MigrationSettings>,
        key: Option<&MigrationKey>,
        listen: IpAddr,
    ) -> Result<IncomingMigration, AgentError> {
        let id = slot.run.id;
        let taps = tap_names(id, &spec);
        slot.run.create().map_err(AgentError::Internal)?;
        slot.run
            .write_spec(&spec, generation)
            .map_err(AgentError::Internal)?;
        slot.persist();
        let user = self.reserve_user()?;
        let owner = user.as_ref().map(|u| u.owner());
        if let Some(bridge) = &self.host.bridge {
            for t in &taps {
                // Up only once its port takes no floods: the guest runs at the source until
                // the steer, and gets every broadcast there ([`crate::steer::Steerer::set_flooding`]).
                let made = tap::ensure_tap_down(t, bridge, owner);
                if made.is_ok() {
                    if let Err(e) = self.ports.set_flooding(t, false).await {
                        tracing::warn!(vm = %id, tap = %t, error = %e, "the incoming VM's tap takes floods before the steer: the guest may get broadcasts twice");
                    }
                }
                if let Err(e) = made.and_then(|()| tap::bring_up(t)) {
                    remove_taps(&taps);
                    return Err(AgentError::Internal(anyhow::anyhow!(
                        "creating tap {t}: {e}"
                    )));
                }
            }
        }
        let files = match self.open_files(&spec) {
            Ok(f) => f,
            Err(e) => {
                remove_taps(&taps);
                return Err(e);
            }
        };
        let guest_files = match self.guest_files(id, &spec, &slot.run.dir, false) {
            Ok(f) => f,
            Err(e) => {
                remove_taps(&taps);
                return Err(e);
            }
        };
        let cgroup_procs = match self.cgroup_procs(id) {
            Ok(p) => p,
            Err(e) => {
                remove_taps(&taps);
                return Err(e);
            }
        };
        let cfg = LaunchConfig {
            cgroup_procs,
            id,
            spec: spec.clone(),
            run_dir: slot.run.dir.clone(),
            taps: taps.clone(),
            accel: self.host.accelerator,
            qemu_binary: self.host.qemu.clone(),
            default_cpu_model: self.host.default_cpu_model.clone(),
            incoming: Some(tern_qemu::Incoming::Defer),
            start_paused: true,
            files,
            run_as: user.as_ref().map(|u| u.run_as()),
            guest_files: guest_files.clone(),
        };
        let prepared = match settings {
            Some(settings) => IncomingMigration::prepare(cfg, settings, key, listen).await,
            None => IncomingMigration::launch(cfg).await,
        };
        let incoming = match prepared {
            Ok(i) => i,
            Err(e) => {
                remove_taps(&taps);
                tracing::warn!(vm = %spec.name, %id, error = %e, "incoming QEMU did not start");
                return Err(qemu_error(e));
            }
        };
        self.adopt_live(slot, incoming.vm().clone(), PowerState::Paused);
        tracing::info!(vm = %spec.name, %id, uri = ?incoming.uri(), "migration destination started");
        Ok(incoming)
    }

    /// Records the ownership generation the center granted (a committed destination).
    pub fn set_generation(&self, id: Uuid, generation: u64) -> Result<(), AgentError> {
        let slot = self.slot(id)?;
        let spec = {
            let mut st = slot.st();
            st.generation = generation;
            st.spec.clone()
        };
        slot.run
            .write_spec(&spec, generation)
            .map_err(AgentError::Internal)
    }

    /// Removes a VM whose guest must not be running here (a migrated-away source, an
    /// aborted destination): kills its QEMU and removes its files. Refuses a running guest.
    pub async fn remove_idle(&self, id: Uuid) -> Result<(), AgentError> {
        if let Ok(vm) = self.live_qemu(id) {
            if matches!(vm.status().await, Ok(RunState::Running)) {
                return Err(AgentError::Conflict(format!(
                    "VM {id} runs its guest on this host: refusing to remove it"
                )));
            }
        }
        self.delete(id).await
    }

    /// Stops supervising (agent shutdown); QEMU processes keep running.
    pub fn release(&self) {
        self.shutdown.cancel();
        let slots: Vec<Arc<Slot>> = self.slots().drain().map(|(_, s)| s).collect();
        for s in slots {
            // Dropping the QemuVm closes its QMP connection; the process lives on.
            s.st().live = None;
        }
    }
}

/// After an agent restart: an outgoing migration still going in QEMU that no record lets the
/// agent re-attach to lost its driver and would leave the guest paused at pre-switchover for
/// good. Nothing can have been committed before the switchover, so cancelling it (and running
/// the guest again) is always safe. An incoming migration, or a completed outgoing one, waits
/// for the center's decision.
pub(crate) async fn cancel_orphan_migration(vm: &QemuVm, name: &str) {
    use tern_qemu::MigrationStatus as M;
    let (Ok(m), Ok(run)) = (vm.query_migrate().await, vm.status().await) else {
        return;
    };
    let outgoing_unfinished = matches!(
        m.status,
        M::Setup | M::Active | M::PreSwitchover | M::Device | M::Cancelling
    ) && run != RunState::InMigrate;
    if !outgoing_unfinished {
        return;
    }
    tracing::warn!(vm = name, status = %m.status, "an outgoing migration lost its driver (agent restart): cancelling it");
    if let Err(e) = vm.migrate_cancel().await {
        tracing::error!(vm = name, error = %e, "cannot cancel the orphaned migration");
        return;
    }
    for _ in 0..300 {
        match vm.query_migrate().await {
            Ok(m) if m.status.is_finished() => break,
            Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(_) => return,
        }
    }
    // QEMU restarts the guest itself after a cancel; make sure.
    if vm
        .wait_status(|s| *s == RunState::Running, Duration::from_secs(2))
        .await
        .is_err()
    {
        if let Err(e) = vm.resume().await {
            tracing::error!(vm = name, error = %e, "cannot resume the guest after cancelling");
        }
    }
}

fn remove_taps(taps: &[String]) {
    for t in taps {
        if let Err(e) = tap::remove_tap(t) {
            tracing::warn!(tap = %t, error = %e, "cannot remove tap");
        }
    }
}

fn read_tail(path: &std::path::Path, bytes: u64) -> anyhow::Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(String::new()),
        Err(e) => return Err(anyhow::anyhow!("opening {}: {e}", path.display())),
    };
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(bytes)))?;
    let mut buf = Vec::new();
    f.take(bytes).read_to_end(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits() {
        let crash = ExitReason::Crashed {
            reason: "signal 9".into(),
        };
        assert_eq!(
            classify_exit(false, &crash),
            (PowerState::Crashed, Some("signal 9".into()))
        );
        assert_eq!(classify_exit(true, &crash), (PowerState::Stopped, None));
        let guest_off = ExitReason::Shutdown {
            guest: true,
            reason: "guest-shutdown".into(),
        };
        assert_eq!(classify_exit(false, &guest_off).0, PowerState::Stopped);
        let panic = ExitReason::Shutdown {
            guest: true,
            reason: "guest-panic".into(),
        };
        assert_eq!(classify_exit(false, &panic).0, PowerState::Crashed);
        assert_eq!(
            classify_exit(true, &ExitReason::Killed).0,
            PowerState::Stopped
        );
    }

    #[test]
    fn tails() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("console.log");
        assert_eq!(read_tail(&p, 10).expect("missing is empty"), "");
        std::fs::write(&p, "hello world\n").expect("write");
        assert_eq!(read_tail(&p, 6).expect("tail"), "world\n");
        assert_eq!(read_tail(&p, 1000).expect("all"), "hello world\n");
    }

    #[test]
    fn specs_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kernel = dir.path().join("vmlinuz");
        std::fs::write(&kernel, b"k").expect("write");
        let mut spec = VmSpec {
            firmware: Default::default(),
            cloud_init: None,
            resources: Default::default(),
            name: "ok".into(),
            vcpus: 1,
            memory_mib: 64,
            cpu_model: None,
            boot: BootSource::Kernel {
                kernel: kernel.display().to_string(),
                initrd: None,
                cmdline: String::new(),
            },
            disks: vec![],
            nics: vec![],
        };
        let root = Some(dir.path());
        assert!(validate(&spec, None, root, false).is_ok());
        // A policy needs a host that enforces it, and must be one that can hold.
        spec.resources.cpu_limit = Some(tern_api::CpuAmount::CorePercent(50));
        let e = validate(&spec, None, root, false).expect_err("no resource control");
        assert!(e.to_string().contains("cannot enforce"), "{e}");
        assert!(validate(&spec, None, root, true).is_ok());
        spec.resources.memory_limit_mib = Some(1);
        let e = validate(&spec, None, root, true).expect_err("limit below the RAM");
        assert!(e.to_string().contains("below the VM's"), "{e}");
        spec.resources = Default::default();
        spec.nics.push(tern_api::NicSpec {
            mac: "52:54:00:00:00:01".into(),
        });
        let e = validate(&spec, None, root, false).expect_err("no bridge");
        assert!(e.to_string().contains("--bridge"), "{e}");
        assert!(validate(&spec, Some("br0"), root, false).is_ok());
        // Files outside the shared storage, or any file without one, are refused.
        let e = validate(&spec, Some("br0"), None, false).expect_err("no shared storage");
        assert!(e.to_string().contains("--shared-storage"), "{e}");
        let elsewhere = tempfile::tempdir().expect("tempdir");
        let secret = elsewhere.path().join("shadow");
        std::fs::write(&secret, b"root:x").expect("write");
        let link = dir.path().join("innocent.img");
        std::os::unix::fs::symlink(&secret, &link).expect("symlink");
        for (kernel, initrd, disk) in [
            (
                kernel.display().to_string(),
                Some(secret.display().to_string()),
                None,
            ),
            (
                kernel.display().to_string(),
                Some(link.display().to_string()),
                None,
            ),
            (
                kernel.display().to_string(),
                None,
                Some("/dev/null".to_string()),
            ),
            (
                format!(
                    "{}/../{}",
                    dir.path().display(),
                    secret.strip_prefix("/").expect("absolute").display()
                ),
                None,
                None,
            ),
        ] {
            let mut bad = spec.clone();
            bad.boot = BootSource::Kernel {
                kernel,
                initrd,
                cmdline: String::new(),
            };
            if let Some(path) = disk {
                bad.disks.push(tern_api::DiskSpec {
                    bus: Default::default(),
                    path,
                    format: Default::default(),
                    readonly: false,
                    datastore: None,
                    volume: None,
                });
            }
            let e =
                validate(&bad, Some("br0"), root, false).expect_err("outside the shared storage");
            assert!(matches!(e, AgentError::BadRequest(_)), "{e}");
        }
        spec.boot = BootSource::Kernel {
            kernel: "/nonexistent/vmlinuz".into(),
            initrd: None,
            cmdline: String::new(),
        };
        let e = validate(&spec, Some("br0"), root, false).expect_err("missing kernel");
        assert!(matches!(e, AgentError::BadRequest(_)));
        assert!(e.to_string().contains("/nonexistent/vmlinuz"), "{e}");
    }
}
