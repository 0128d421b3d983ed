//! The agent's state directory: its token and one run directory per VM.
//!
//! ```text
//! STATE_DIR/agent.token          bearer token the center must present (0600)
//! STATE_DIR/vms/<uuid>/spec.json the VmSpec the VM was started with
//! STATE_DIR/vms/<uuid>/generation ownership generation granted by the center
//! STATE_DIR/vms/<uuid>/state.json last state the agent recorded (survives restarts)
//! STATE_DIR/vms/<uuid>/migration.json this host's side of the VM's migration while one is
//!                                 under way, so a restarted agent re-attaches to it
//! STATE_DIR/vms/<uuid>/qmp.sock, qemu.pid, console.log, qemu.log: QEMU's own files
//!                                 (see `tern_qemu::RunPaths`)
//! ```
//!
//! Files are written to a temporary name and renamed, so a crash never leaves half a file.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tern_api::migration::{MigrationSettings, MigrationUri};
use tern_api::{Accelerator, PowerState, VmSpec};
use tern_qemu::RunPaths;
use uuid::Uuid;

/// Longest unix socket path (sun_path is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// What the agent records about a VM besides its spec, so a restart knows what happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub state: PowerState,
    pub accelerator: Accelerator,
    /// Set when the agent asked the VM to stop: its exit is then a stop, not a crash.
    #[serde(default)]
    pub stop_requested: bool,
    #[serde(default)]
    pub exit_reason: Option<String>,
}

/// This host's side of a migration under way, as a restarted agent needs it to re-attach to
/// the QEMU that kept migrating meanwhile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum MigrationRecord {
    Source {
        /// Where the stream goes.
        uri: MigrationUri,
        settings: MigrationSettings,
        /// Wall clock (ms since the Unix epoch) when `migrate` was issued: a restarted agent
        /// judges the deadline and stamps its events from it.
        started_unix_ms: u64,
        /// Whether the guest ran when the migration started (it is resumed on a rollback).
        was_running: bool,
        /// The source's decisions so far, so the center's count of seen events stays right.
        #[serde(default)]
        events: Vec<String>,
    },
    Destination {
        /// Where this host listens, once it does.
        uri: Option<MigrationUri>,
    },
}

/// Paths of one VM's run directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunDir {
    pub id: Uuid,
    pub dir: PathBuf,
}

impl RunDir {
    pub fn spec(&self) -> PathBuf {
        self.dir.join("spec.json")
    }
    pub fn generation(&self) -> PathBuf {
        self.dir.join("generation")
    }
    pub fn record(&self) -> PathBuf {
        self.dir.join("state.json")
    }
    pub fn migration(&self) -> PathBuf {
        self.dir.join("migration.json")
    }
    /// QEMU's files in the run dir (socket, pidfile, console and QEMU logs).
    pub fn paths(&self) -> RunPaths {
        RunPaths::new(&self.dir)
    }

    pub fn create(&self) -> anyhow::Result<()> {
        // 0700: the QMP socket inside gives full control of the VM to whoever reaches it.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .with_context(|| format!("creating the run dir {}", self.dir.display()))?;
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("setting the mode of {}", self.dir.display()))?;
        let sock = self.paths().qmp_socket;
        if sock.as_os_str().len() > MAX_SOCKET_PATH {
            anyhow::bail!(
                "QMP socket path {} is longer than {MAX_SOCKET_PATH} bytes: use a shorter --state-dir",
                sock.display()
            );
        }
        Ok(())
    }

    pub fn write_spec(&self, spec: &VmSpec, generation: u64) -> anyhow::Result<()> {
        // Owner only, like the run dir: a spec names the VM's files and devices.
        write_atomic(&self.spec(), &serde_json::to_vec_pretty(spec)?, 0o600)?;
        write_atomic(
            &self.generation(),
            format!("{generation}\n").as_bytes(),
            0o600,
        )
    }

    pub fn read_spec(&self) -> anyhow::Result<(VmSpec, u64)> {
        let text = std::fs::read(self.spec())
            .with_context(|| format!("reading {}", self.spec().display()))?;
        let spec = serde_json::from_slice(&text)
            .with_context(|| format!("parsing {}", self.spec().display()))?;
        let generation = std::fs::read_to_string(self.generation())
            .ok()
            .and_then(|g| g.trim().parse().ok())
            .unwrap_or(0);
        Ok((spec, generation))
    }

    pub fn write_record(&self, rec: &RunRecord) -> anyhow::Result<()> {
        write_atomic(&self.record(), &serde_json::to_vec_pretty(rec)?, 0o600)
    }

    pub fn read_record(&self) -> Option<RunRecord> {
        let text = std::fs::read(self.record()).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// Written often (with each of the source's decisions, some while the guest is paused)
    /// and only of use while QEMU lives, which a host crash ends too: renamed into place for
    /// atomicity, but not synced.
    pub fn write_migration(&self, rec: &MigrationRecord) -> anyhow::Result<()> {
        write_file(
            &self.migration(),
            &serde_json::to_vec_pretty(rec)?,
            0o644,
            false,
        )
    }

    /// The migration under way, if any. A record that cannot be read is reported and treated
    /// as none: the migration is then handled like one whose driver is lost.
    pub fn read_migration(&self) -> Option<MigrationRecord> {
        let text = match std::fs::read(self.migration()) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(path = %self.migration().display(), error = %e, "cannot read the migration record");
                return None;
            }
        };
        match serde_json::from_slice(&text) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(path = %self.migration().display(), error = %e, "unreadable migration record; ignored");
                None
            }
        }
    }

    /// Forgets the migration (it ended, or this host's part in it did).
    pub fn remove_migration(&self) {
        if let Err(e) = std::fs::remove_file(self.migration()) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %self.migration().display(), error = %e, "cannot remove the migration record");
            }
        }
    }
}

/// The agent's state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    pub root: PathBuf,
}

impl StateDir {
    pub fn open(root: &Path) -> anyhow::Result<StateDir> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root.join("vms"))
            .with_context(|| format!("creating the state dir {}", root.display()))?;
        // QEMU changes to / when it daemonizes: every path handed to it must be absolute.
        let root = std::path::absolute(root)
            .with_context(|| format!("resolving the state dir {}", root.display()))?;
        Ok(StateDir { root })
    }

    pub fn vm(&self, id: Uuid) -> RunDir {
        RunDir {
            id,
            dir: self.root.join("vms").join(id.to_string()),
        }
    }

    /// Run dirs present on disk. Entries that are not `<uuid>` dirs are skipped with a warning.
    pub fn list_vms(&self) -> anyhow::Result<Vec<RunDir>> {
        let dir = self.root.join("vms");
        let mut out = Vec::new();
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?
        {
            let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
            let name = entry.file_name();
            match name.to_str().and_then(|n| Uuid::parse_str(n).ok()) {
                Some(id) if entry.path().is_dir() => out.push(self.vm(id)),
                _ => tracing::warn!(path = %entry.path().display(), "not a VM run dir; ignored"),
            }
        }
        out.sort_by_key(|r| r.id);
        Ok(out)
    }

    /// Takes the state dir for this agent process: a second agent on the same dir would
    /// adopt the same QEMU processes and fight over them. Released when the lock is dropped
    /// (or the process dies); the descriptor is close-on-exec, so QEMU never inherits it.
    pub fn lock(&self) -> anyhow::Result<StateLock> {
        let path = self.root.join("agent.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(StateLock(lock)),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => anyhow::bail!(
                "another agent already runs on the state dir {} (it holds {})",
                self.root.display(),
                path.display()
            ),
            Err((_, e)) => Err(e).with_context(|| format!("locking {}", path.display())),
        }
    }

    /// The agent's own token: read, or created at first start (random, mode 0600).
    pub fn agent_token(&self) -> anyhow::Result<String> {
        let path = self.root.join("agent.token");
        match std::fs::read_to_string(&path) {
            Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_string()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        }
        let token = random_token();
        write_atomic(&path, format!("{token}\n").as_bytes(), 0o600)?;
        tracing::info!(path = %path.display(), "created the agent token");
        Ok(token)
    }
}

impl StateDir {
    fn host_secret_path(&self) -> PathBuf {
        self.root.join("host.secret")
    }

    /// The secret the center gave this host when it joined, if it has one: the host's
    /// credential for heartbeats and for registering again.
    pub fn host_secret(&self) -> Option<String> {
        std::fs::read_to_string(self.host_secret_path())
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
    }

    /// Keeps the host's secret (mode 0600, written atomically and synced: losing it means
    /// asking an admin for a new join token).
    pub fn save_host_secret(&self, secret: &str) -> anyhow::Result<()> {
        write_atomic(
            &self.host_secret_path(),
            format!("{secret}\n").as_bytes(),
            0o600,
        )
    }

    /// Forgets the host's secret (the center no longer accepts it).
    pub fn forget_host_secret(&self) {
        let _ = std::fs::remove_file(self.host_secret_path());
    }
}

/// Exclusive hold on a state dir (see [`StateDir::lock`]).
#[derive(Debug)]
pub struct StateLock(#[allow(dead_code)] nix::fcntl::Flock<std::fs::File>);

/// 32 random bytes as hex.
pub fn random_token() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn write_atomic(path: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    write_file(path, data, mode, true)
}

/// Writes to a temporary name and renames it into place; `sync` makes it durable first.
fn write_file(path: &Path, data: &[u8], mode: u32, sync: bool) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(data)
        .and_then(|()| if sync { f.sync_all() } else { Ok(()) })
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small_spec() -> VmSpec {
        VmSpec {
            firmware: Default::default(),
            cloud_init: None,
            resources: Default::default(),
            name: "a".into(),
            vcpus: 1,
            memory_mib: 64,
            cpu_model: None,
            boot: tern_api::BootSource::Disk,
            disks: vec![],
            nics: vec![],
        }
    }

    #[test]
    fn run_dirs_and_specs_are_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = StateDir::open(dir.path()).expect("open");
        let vm = s.vm(Uuid::new_v4());
        vm.create().expect("create");
        let spec = small_spec();
        vm.write_spec(&spec, 1).expect("spec");
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&vm.dir), 0o700);
        assert_eq!(mode(&vm.spec()), 0o600);
        assert_eq!(mode(&dir.path().join("vms")), 0o700);
    }

    #[test]
    fn token_created_once_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = StateDir::open(dir.path()).expect("open");
        let t1 = s.agent_token().expect("token");
        assert_eq!(t1.len(), 64);
        let t2 = s.agent_token().expect("token again");
        assert_eq!(t1, t2);
        let mode = std::fs::metadata(dir.path().join("agent.token"))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn one_agent_per_state_dir() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = StateDir::open(dir.path()).expect("open");
        let held = s.lock().expect("first lock");
        let err = s.lock().expect_err("second lock refused");
        assert!(format!("{err}").contains("another agent"), "{err}");
        drop(held);
        s.lock().expect("lock again after release");
    }

    #[test]
    fn run_dir_roundtrip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = StateDir::open(dir.path()).expect("open");
        let id = Uuid::new_v4();
        let rd = s.vm(id);
        rd.create().expect("create");
        let spec = small_spec();
        rd.write_spec(&spec, 7).expect("write");
        assert_eq!(rd.read_spec().expect("read"), (spec, 7));
        let rec = RunRecord {
            state: PowerState::Crashed,
            accelerator: Accelerator::Tcg,
            stop_requested: false,
            exit_reason: Some("killed by signal 9".into()),
        };
        rd.write_record(&rec).expect("write record");
        assert_eq!(rd.read_record(), Some(rec));
        assert_eq!(rd.read_migration(), None);
        let mig = MigrationRecord::Source {
            uri: "tcp:10.0.0.2:4444".parse().expect("uri"),
            settings: MigrationSettings {
                multifd_channels: 2,
                max_bandwidth_mib_s: Some(40),
                downtime_limit_ms: 300,
                compression: Default::default(),
                auto_converge: true,
                postcopy_allowed: false,
                deadline_ms: 60_000,
                reasons: vec!["measured".into()],
                downtime_budget_ms: 300,
                zero_page_detection: Default::default(),
                throttle: Default::default(),
                paced_from_link_mbit: Some(400.0),
                encrypted: true,
                relayed: false,
                relay_source: None,
            },
            started_unix_ms: 1_700_000_000_000,
            was_running: true,
            events: vec!["+0.0s started".into()],
        };
        rd.write_migration(&mig).expect("write migration");
        assert_eq!(rd.read_migration(), Some(mig));
        // A damaged record is no record (and no panic).
        std::fs::write(
            rd.migration(),
            b"{\"role\":\"source\",\"uri\":\"exec:rm -rf /\"}",
        )
        .expect("damage");
        assert_eq!(rd.read_migration(), None);
        rd.remove_migration();
        rd.remove_migration();
        assert_eq!(rd.read_migration(), None);
        std::fs::create_dir(dir.path().join("vms/not-a-uuid")).expect("mkdir");
        assert_eq!(s.list_vms().expect("list"), vec![rd]);
    }
}
