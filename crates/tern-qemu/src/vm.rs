//! One running (or paused) QEMU process: launch, adopt, lifecycle and exit detection.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tern_api::{BootSource, PowerState};
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

use crate::command::{build_command, LaunchConfig, RunPaths};
use crate::error::{Error, Result};
use crate::process::{self, VmStats};
use crate::qmp::{self, Qmp};

/// How long QEMU may take to initialise before its launcher process exits.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a QEMU whose monitor closed during the launch may take to exit (then its failure
/// is told with what it printed).
const EXIT_AFTER_QMP_CLOSED: Duration = Duration::from_secs(2);
/// How long to retry connecting to a fresh QMP socket.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// After `quit`, how long QEMU may take to flush disks and exit before it is killed.
const QUIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a SIGKILLed process may take to disappear.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of QEMU's own output quoted in errors.
const LOG_TAIL_BYTES: u64 = 2000;

/// QEMU's run state (QMP `query-status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum RunState {
    /// Created with `-S`, never started.
    Prelaunch,
    Running,
    /// Stopped by `stop` (or by QEMU, e.g. at the end of a migration's downtime).
    Paused,
    /// Waiting for an incoming migration.
    InMigrate,
    /// Migration completed on this (source) side; the guest now runs elsewhere.
    PostMigrate,
    /// Stopped for the final phase of an outgoing migration.
    FinishMigrate,
    Suspended,
    Shutdown,
    GuestPanicked,
    InternalError,
    IoError,
    Watchdog,
    Debug,
    SaveVm,
    RestoreVm,
    Colo,
    /// A state this crate does not know.
    Other(String),
}

impl From<String> for RunState {
    fn from(s: String) -> Self {
        match s.as_str() {
            "prelaunch" => Self::Prelaunch,
            "running" => Self::Running,
            "paused" => Self::Paused,
            "inmigrate" => Self::InMigrate,
            "postmigrate" => Self::PostMigrate,
            "finish-migrate" => Self::FinishMigrate,
            "suspended" => Self::Suspended,
            "shutdown" => Self::Shutdown,
            "guest-panicked" => Self::GuestPanicked,
            "internal-error" => Self::InternalError,
            "io-error" => Self::IoError,
            "watchdog" => Self::Watchdog,
            "debug" => Self::Debug,
            "save-vm" => Self::SaveVm,
            "restore-vm" => Self::RestoreVm,
            "colo" => Self::Colo,
            _ => Self::Other(s),
        }
    }
}

impl From<RunState> for String {
    fn from(s: RunState) -> String {
        s.as_str().to_string()
    }
}

impl RunState {
    /// QEMU's name of the state.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Prelaunch => "prelaunch",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::InMigrate => "inmigrate",
            Self::PostMigrate => "postmigrate",
            Self::FinishMigrate => "finish-migrate",
            Self::Suspended => "suspended",
            Self::Shutdown => "shutdown",
            Self::GuestPanicked => "guest-panicked",
            Self::InternalError => "internal-error",
            Self::IoError => "io-error",
            Self::Watchdog => "watchdog",
            Self::Debug => "debug",
            Self::SaveVm => "save-vm",
            Self::RestoreVm => "restore-vm",
            Self::Colo => "colo",
            Self::Other(s) => s,
        }
    }

    /// The power state the API reports for a live process in this run state.
    pub fn power_state(&self) -> PowerState {
        match self {
            Self::Running => PowerState::Running,
            Self::GuestPanicked | Self::InternalError => PowerState::Crashed,
            Self::Shutdown => PowerState::Stopped,
            Self::Other(_) => PowerState::Unknown,
            _ => PowerState::Paused,
        }
    }
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a QEMU process ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ExitReason {
    /// QEMU announced a shutdown (`SHUTDOWN` event) and exited: the guest powered off
    /// (`guest: true`), or the host asked (`quit`, SIGTERM…). `reason` is QEMU's
    /// (`guest-shutdown`, `host-qmp-quit`, `host-signal`, `guest-panic`…).
    Shutdown { guest: bool, reason: String },
    /// Killed by this driver ([`QemuVm::kill`], or the last step of [`QemuVm::shutdown`]).
    Killed,
    /// Disappeared without a shutdown: killed by someone else, or crashed.
    Crashed { reason: String },
}

impl ExitReason {
    /// True when the end was asked for or done by the guest (not a crash).
    pub fn is_clean(&self) -> bool {
        !matches!(self, ExitReason::Crashed { .. })
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::Shutdown {
                guest: true,
                reason,
            } => write!(f, "guest shut down ({reason})"),
            ExitReason::Shutdown {
                guest: false,
                reason,
            } => write!(f, "host shut down ({reason})"),
            ExitReason::Killed => f.write_str("killed"),
            ExitReason::Crashed { reason } => write!(f, "crashed: {reason}"),
        }
    }
}

/// A QEMU process and its QMP connection.
///
/// Dropping it closes the QMP connection and stops watching the process, but leaves QEMU
/// running: a later [`QemuVm::adopt`] (by this or a restarted agent) takes it back.
#[derive(Debug)]
pub struct QemuVm {
    pid: u32,
    paths: RunPaths,
    qmp: Qmp,
    pidfd: Option<Arc<OwnedFd>>,
    killed: Arc<AtomicBool>,
    exit: watch::Receiver<Option<ExitReason>>,
    watcher: tokio::task::AbortHandle,
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

impl QemuVm {
    /// Starts QEMU for `cfg` and connects to it.
    ///
    /// Returns once QEMU has initialised and answered on QMP (it is started in a session of
    /// its own, not as a daemon: see `command`'s module doc). The VM is then `running`, or `prelaunch`/`inmigrate` with
    /// `start_paused`/`incoming`. Errors quote the end of QEMU's output (bad `-cpu`, a file
    /// it cannot open…); missing kernel/initrd/disk files are named before QEMU runs.
    pub async fn launch(cfg: LaunchConfig) -> Result<QemuVm> {
        cfg.validate()?;
        preflight_files(&cfg)?;
        let paths = cfg.paths();
        std::fs::create_dir_all(&paths.run_dir)
            .map_err(|e| Error::io(format!("create run dir {}", paths.run_dir.display()), e))?;
        if let Ok(pid) = process::read_pidfile(&paths.pidfile) {
            if process::is_qemu_of(pid, &paths.pidfile) {
                return Err(Error::AlreadyRunning {
                    pid,
                    run_dir: paths.run_dir.clone(),
                });
            }
        }
        remove_if_exists(&paths.qmp_socket)?;
        remove_if_exists(&paths.pidfile)?;

        let start_log = File::create(&paths.start_log)
            .map_err(|e| Error::io(format!("create {}", paths.start_log.display()), e))?;
        let start_log2 = start_log
            .try_clone()
            .map_err(|e| Error::io("duplicate the start log descriptor", e))?;
        let argv = build_command(&cfg);
        tracing::info!(vm = %cfg.spec.name, id = %cfg.id, argv = ?argv, "starting QEMU");
        let mut command = tokio::process::Command::new(&argv[0]);
        command
            .args(&argv[1..])
            .current_dir(&paths.run_dir)
            .stdin(std::process::Stdio::null())
            .stdout(start_log)
            .stderr(start_log2)
            // QEMU outlives this handle (and the agent): dropped, tokio reaps it when it ends.
            .kill_on_drop(false);
        let inherit = cfg.inherited_fds();
        let run_as = cfg.run_as.clone();
        if let Some(user) = &run_as {
            give_run_dir(&paths, user)?;
        }
        // Opened before the fork: the child only writes "0" (itself) into each.
        let cgroup_files = cfg
            .cgroup_procs
            .iter()
            .map(|p| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(p)
                    .map_err(|e| Error::io(format!("open {}", p.display()), e))
            })
            .collect::<Result<Vec<File>>>()?;
        let cgroup_fds: Vec<i32> = cgroup_files.iter().map(|f| f.as_raw_fd()).collect();
        // Made before the fork: the hook must not allocate.
        let groups: Vec<nix::unistd::Gid> = run_as
            .iter()
            .flat_map(|u| u.groups.iter().map(|g| nix::unistd::Gid::from_raw(*g)))
            .collect();
        // SAFETY: the hook runs in the forked child before exec. It allocates nothing and only
        // calls setsid(2), write(2), setgroups(2), setgid(2), setuid(2) and fcntl(2), which are
        // async-signal-safe, write and fcntl on descriptors kept open (`cgroup_files`, `cfg`)
        // until the spawn has returned. Clearing close-on-exec there, not here, keeps other processes this agent
        // starts meanwhile from inheriting them.
        unsafe {
            command.pre_exec(move || {
                use nix::fcntl::{fcntl, FcntlArg, FdFlag};
                // A session of its own: no signal for the agent's process group or terminal
                // reaches QEMU, and it needs no fork of its own to get there.
                nix::unistd::setsid().map_err(std::io::Error::from)?;
                // Into the VM's cgroups while still root ("0" is the writer itself).
                for &fd in &cgroup_fds {
                    let fd = std::os::fd::BorrowedFd::borrow_raw(fd);
                    nix::unistd::write(fd, b"0").map_err(std::io::Error::from)?;
                }
                if let Some(user) = &run_as {
                    // Groups first: once the uid is dropped, they can no longer be changed.
                    nix::unistd::setgroups(&groups).map_err(std::io::Error::from)?;
                    nix::unistd::setgid(nix::unistd::Gid::from_raw(user.gid))
                        .map_err(std::io::Error::from)?;
                    nix::unistd::setuid(nix::unistd::Uid::from_raw(user.uid))
                        .map_err(std::io::Error::from)?;
                }
                for &fd in &inherit {
                    let fd = std::os::fd::BorrowedFd::borrow_raw(fd);
                    fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty())).map_err(std::io::Error::from)?;
                }
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .map_err(|e| Error::io(format!("run {}", argv[0]), e))?;
        let Some(pid) = child.id() else {
            return Err(Error::Launch {
                status: "QEMU ended at once".into(),
                stderr_tail: log_tail(&paths.start_log),
            });
        };
        // Ready when QMP answers; QEMU ending first (a bad option, a file it cannot open) is
        // the launch's failure, told with the end of what it printed.
        let attached = tokio::select! {
            r = tokio::time::timeout(LAUNCH_TIMEOUT, Self::attach(pid, paths.clone())) => match r {
                Ok(r) => r,
                Err(_) => Err(Error::Launch {
                    status: format!("no answer in {} s", LAUNCH_TIMEOUT.as_secs()),
                    stderr_tail: log_tail(&paths.start_log),
                }),
            },
            status = child.wait() => {
                let status = status.map_err(|e| Error::io("wait for QEMU", e))?;
                let mut tail = log_tail(&paths.start_log);
                if tail.is_empty() {
                    tail = log_tail(&paths.qemu_log);
                }
                if tail.is_empty() {
                    tail = "(QEMU printed nothing)".into();
                }
                return Err(Error::Launch {
                    status: status.to_string(),
                    stderr_tail: tail,
                });
            }
        };
        match attached {
            Ok(vm) => {
                drop(child);
                tracing::info!(vm = %cfg.spec.name, pid, "QEMU started");
                Ok(vm)
            }
            Err(e) => {
                // It ended while we connected (its monitor closing a moment before it exits):
                // that is the launch's failure, with its words.
                let ended = tokio::time::timeout(EXIT_AFTER_QMP_CLOSED, child.wait()).await;
                if let Ok(Ok(status)) = ended {
                    let tail = log_tail(&paths.start_log);
                    return Err(Error::Launch {
                        status: status.to_string(),
                        stderr_tail: if tail.is_empty() { e.to_string() } else { tail },
                    });
                }
                // We started it and cannot control it: do not leave it behind.
                let _ = child.start_kill();
                let _ = child.wait().await;
                Err(e)
            }
        }
    }

    /// Takes back a QEMU still running from `run_dir` (after an agent restart), from its
    /// pidfile and QMP socket. Does not touch the guest.
    pub async fn adopt(run_dir: &Path) -> Result<QemuVm> {
        let run_dir = std::path::absolute(run_dir)
            .map_err(|e| Error::io(format!("resolve {}", run_dir.display()), e))?;
        let paths = RunPaths::new(&run_dir);
        let not_running = |detail: String| Error::NotRunning {
            run_dir: run_dir.clone(),
            detail,
        };
        let pid = process::read_pidfile(&paths.pidfile)
            .map_err(|e| not_running(format!("pidfile {}: {e}", paths.pidfile.display())))?;
        if !process::is_qemu_of(pid, &paths.pidfile) {
            return Err(not_running(format!(
                "pid {pid} from {} is gone or is not its QEMU",
                paths.pidfile.display()
            )));
        }
        let vm = Self::attach(pid, paths).await?;
        tracing::info!(pid, run_dir = %run_dir.display(), "adopted QEMU");
        Ok(vm)
    }

    async fn attach(pid: u32, paths: RunPaths) -> Result<QemuVm> {
        let pidfd = match process::pidfd_open(pid) {
            Ok(fd) => Some(Arc::new(fd)),
            Err(e) => {
                tracing::warn!(pid, error = %e, "no pidfd; polling /proc for exit");
                None
            }
        };
        let qmp = connect_retry(&paths.qmp_socket, pid).await?;
        let killed = Arc::new(AtomicBool::new(false));
        let (tx, exit) = watch::channel(None);
        let watcher = tokio::spawn(watch_exit(
            pid,
            pidfd.clone(),
            qmp.shared(),
            killed.clone(),
            paths.qemu_log.clone(),
            tx,
        ))
        .abort_handle();
        Ok(QemuVm {
            pid,
            paths,
            qmp,
            pidfd,
            killed,
            exit,
            watcher,
        })
    }

    /// Pid of the QEMU process.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The runtime files of this VM.
    pub fn paths(&self) -> &RunPaths {
        &self.paths
    }

    /// The QMP connection, for commands this type does not wrap.
    pub fn qmp(&self) -> &Qmp {
        &self.qmp
    }

    /// QEMU's run state.
    pub async fn status(&self) -> Result<RunState> {
        #[derive(Deserialize)]
        struct Status {
            status: String,
        }
        let s: Status = self.qmp.execute_as("query-status", None).await?;
        Ok(RunState::from(s.status))
    }

    /// Polls the run state until `want` holds, up to `timeout`.
    pub async fn wait_status(
        &self,
        want: impl Fn(&RunState) -> bool,
        timeout: Duration,
    ) -> Result<RunState> {
        let deadline = Instant::now() + timeout;
        loop {
            let state = self.status().await?;
            if want(&state) {
                return Ok(state);
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!("VM state (still {state})"),
                    timeout_ms: timeout.as_millis() as u64,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the vCPUs (`stop`).
    pub async fn pause(&self) -> Result<()> {
        self.qmp.execute("stop", None).await.map(drop)
    }

    /// Starts or resumes the vCPUs (`cont`): also starts a `-S` VM and a paused migration
    /// destination.
    pub async fn resume(&self) -> Result<()> {
        self.qmp.execute("cont", None).await.map(drop)
    }

    /// Why the process ended, if it has.
    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.exit.borrow().clone()
    }

    /// Waits until the process has ended and says why.
    pub async fn wait_exit(&self) -> ExitReason {
        let mut rx = self.exit.clone();
        let reason = rx.wait_for(|r| r.is_some()).await.map(|r| r.clone());
        match reason {
            Ok(Some(r)) => r,
            // The watcher only goes away with `self`.
            _ => ExitReason::Crashed {
                reason: "exit watcher stopped".into(),
            },
        }
    }

    async fn wait_exit_for(&self, timeout: Duration) -> Option<ExitReason> {
        tokio::time::timeout(timeout, self.wait_exit()).await.ok()
    }

    /// Shuts the VM down: ACPI power button (when running) and up to `timeout` for the guest
    /// to power off; then QMP `quit` (QEMU flushes its disks and exits); then SIGKILL.
    pub async fn shutdown(&self, timeout: Duration) -> Result<ExitReason> {
        if let Some(r) = self.exit_reason() {
            return Ok(r);
        }
        if matches!(self.status().await, Ok(RunState::Running)) {
            match self.qmp.execute("system_powerdown", None).await {
                Ok(_) => {
                    if let Some(r) = self.wait_exit_for(timeout).await {
                        return Ok(r);
                    }
                    tracing::info!(pid = self.pid, "guest ignored the power button; quitting");
                }
                Err(e) => tracing::debug!(error = %e, "system_powerdown failed"),
            }
        }
        if let Err(e) = tokio::time::timeout(QUIT_TIMEOUT, self.qmp.execute("quit", None)).await {
            tracing::debug!(error = %e, "quit did not answer");
        }
        if let Some(r) = self.wait_exit_for(QUIT_TIMEOUT).await {
            return Ok(r);
        }
        tracing::warn!(pid = self.pid, "QEMU did not quit; killing it");
        self.kill().await
    }

    /// Kills QEMU with SIGKILL and waits for it to disappear.
    pub async fn kill(&self) -> Result<ExitReason> {
        if let Some(r) = self.exit_reason() {
            return Ok(r);
        }
        self.killed.store(true, Ordering::SeqCst);
        let sent = match &self.pidfd {
            Some(fd) => process::pidfd_send_signal(fd, libc::SIGKILL),
            None => {
                if process::is_qemu_of(self.pid, &self.paths.pidfile) {
                    nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(self.pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    )
                    .map_err(std::io::Error::from)
                } else {
                    Ok(())
                }
            }
        };
        sent.map_err(|e| Error::io(format!("kill QEMU pid {}", self.pid), e))?;
        self.wait_exit_for(KILL_TIMEOUT)
            .await
            .ok_or_else(|| Error::Timeout {
                what: format!("QEMU pid {} to die after SIGKILL", self.pid),
                timeout_ms: KILL_TIMEOUT.as_millis() as u64,
            })
    }

    /// CPU time, memory and threads of the QEMU process.
    pub fn stats(&self) -> Result<VmStats> {
        process::process_stats(self.pid)
            .map_err(|e| Error::io(format!("read /proc stats of QEMU pid {}", self.pid), e))
    }

    /// Removes the QMP socket and pidfile of a VM that no longer runs (console and QEMU
    /// logs stay for post-mortems). Refuses while a QEMU still runs from `run_dir`.
    pub fn cleanup(run_dir: &Path) -> Result<()> {
        let paths = RunPaths::new(run_dir);
        if let Ok(pid) = process::read_pidfile(&paths.pidfile) {
            if process::is_qemu_of(pid, &paths.pidfile) {
                return Err(Error::AlreadyRunning {
                    pid,
                    run_dir: run_dir.to_path_buf(),
                });
            }
        }
        remove_if_exists(&paths.qmp_socket)?;
        remove_if_exists(&paths.pidfile)?;
        remove_if_exists(&paths.start_log)?;
        crate::migrate::remove_psk(&paths.migration_tls_dir);
        Ok(())
    }
}

/// Names the first missing or unreadable file the VM needs, before QEMU runs.
fn preflight_files(cfg: &LaunchConfig) -> Result<()> {
    let check = |what: &'static str, path: &str, write: bool| -> Result<()> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)
            .map(drop)
            .map_err(|source| Error::MissingFile {
                what,
                path: PathBuf::from(path),
                source,
            })
    };
    if let BootSource::Kernel { kernel, initrd, .. } = &cfg.spec.boot {
        check("kernel", kernel, false)?;
        if let Some(initrd) = initrd {
            check("initrd", initrd, false)?;
        }
    }
    // An iSCSI LUN is no file here: QEMU's initiator reaches it, and says so if it cannot.
    for disk in cfg.spec.disks.iter().filter(|d| !d.is_iscsi()) {
        check("disk image", &disk.path, !disk.readonly)?;
    }
    Ok(())
}

/// Gives QEMU's user its run dir and the files in it QEMU opens by name (the console and log
/// it appends to across starts); everything else there stays the agent's.
fn give_run_dir(paths: &RunPaths, user: &crate::command::RunAs) -> Result<()> {
    let (uid, gid) = (
        Some(nix::unistd::Uid::from_raw(user.uid)),
        Some(nix::unistd::Gid::from_raw(user.gid)),
    );
    for p in [&paths.run_dir, &paths.console_log, &paths.qemu_log] {
        match nix::unistd::chown(p.as_path(), uid, gid) {
            Ok(()) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => {
                return Err(Error::io(
                    format!("give {} to QEMU's user {}", p.display(), user.uid),
                    e.into(),
                ))
            }
        }
    }
    Ok(())
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("remove {}", path.display()), e)),
    }
}

/// The last [`LOG_TAIL_BYTES`] of a log file, trimmed ("" when missing or empty).
pub(crate) fn log_tail(path: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).trim().to_string()
}

async fn connect_retry(socket: &Path, pid: u32) -> Result<Qmp> {
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    loop {
        match Qmp::connect(socket).await {
            Ok(q) => return Ok(q),
            // Not yet listening: QEMU creates the socket while it initialises.
            Err(Error::Io { source, .. })
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) && Instant::now() < deadline
                    && process::pid_alive(pid) =>
            {
                // Short: a migration's destination waits for this socket (QEMU makes it
                // within tens of milliseconds).
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Waits for the process to end, then records why.
async fn watch_exit(
    pid: u32,
    pidfd: Option<Arc<OwnedFd>>,
    qmp: Arc<qmp::Shared>,
    killed: Arc<AtomicBool>,
    qemu_log: PathBuf,
    tx: watch::Sender<Option<ExitReason>>,
) {
    wait_gone(pid, pidfd).await;
    // The SHUTDOWN event precedes the exit on the socket: let the reader drain it to EOF.
    let _ = tokio::time::timeout(Duration::from_secs(2), qmp.closed()).await;
    let reason = if let Some(ev) = qmp.last_shutdown() {
        ExitReason::Shutdown {
            guest: ev.data["guest"].as_bool().unwrap_or(false),
            reason: ev.data["reason"].as_str().unwrap_or("unknown").to_string(),
        }
    } else if killed.load(Ordering::SeqCst) {
        ExitReason::Killed
    } else {
        let tail = log_tail(&qemu_log);
        let mut reason = format!(
            "QEMU pid {pid} disappeared without a SHUTDOWN event (killed by a signal or crashed)"
        );
        if !tail.is_empty() {
            reason.push_str("; its log ends with: ");
            reason.push_str(&tail);
        }
        ExitReason::Crashed { reason }
    };
    tracing::info!(pid, %reason, "QEMU exited");
    tx.send_replace(Some(reason));
}

async fn wait_gone(pid: u32, pidfd: Option<Arc<OwnedFd>>) {
    if let Some(fd) = pidfd {
        // SAFETY: registers the pidfd with tokio's epoll; the Arc moved into the AsyncFd
        // keeps the descriptor open, unchanged, for the AsyncFd's whole life.
        let registered =
            unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) };
        match registered {
            Ok(afd) => {
                // A pidfd turns readable when the process exits (zombie or reaped).
                if afd.readable().await.is_ok() {
                    return;
                }
            }
            Err(e) => tracing::warn!(pid, error = %e, "cannot poll pidfd; polling /proc"),
        }
    }
    while process::pid_alive(pid) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_state_names() {
        for s in ["running", "paused", "inmigrate", "postmigrate", "prelaunch"] {
            assert_eq!(RunState::from(s.to_string()).as_str(), s);
        }
        assert_eq!(
            RunState::from("frobnicating".to_string()),
            RunState::Other("frobnicating".into())
        );
        assert_eq!(RunState::Running.power_state(), PowerState::Running);
        assert_eq!(RunState::InMigrate.power_state(), PowerState::Paused);
        let json = serde_json::to_string(&RunState::PostMigrate).unwrap();
        assert_eq!(json, "\"postmigrate\"");
    }

    #[test]
    fn exit_reason_display() {
        let r = ExitReason::Shutdown {
            guest: true,
            reason: "guest-shutdown".into(),
        };
        assert!(r.is_clean());
        assert_eq!(r.to_string(), "guest shut down (guest-shutdown)");
        assert!(!ExitReason::Crashed { reason: "x".into() }.is_clean());
    }

    #[test]
    fn tail_of_log() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        assert_eq!(log_tail(&p), "");
        std::fs::write(&p, format!("{}END\n", "x".repeat(5000))).unwrap();
        let t = log_tail(&p);
        assert!(t.ends_with("END"));
        assert!(t.len() <= LOG_TAIL_BYTES as usize);
    }
}
